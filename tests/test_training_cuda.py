"""Training on CUDA against the CPU run of the same seed (``pytest -m cuda`` selects these;
without a CUDA device they skip).

The seed fixes the initialisation, feedback, data order and alignment batch on the CPU
generators, so both devices start from the same weights and see the same batches; only the
float32 products are summed in another order (cuBLAS; TF32 is off for matmuls by default).
Tolerances: per-epoch losses relative 1e-4 (a few float32 eps per step, ~90 steps, no chaos
at this size; another seed or batch order is off by > 1e-2); accuracies at most two test
samples apart (inputs at a decision boundary may flip under a 1e-6 change of the logits);
the balancing's float64 function check 1e-12 on either device.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asyncbalance.training.config import (
    BalancingConfig,
    DataConfig,
    ModelConfig,
    MonitorConfig,
    OptimizerConfig,
    RegulariserConfig,
    TrainConfig,
    TrainerConfig,
)
from asyncbalance.training.data import Dataset
from asyncbalance.training.ensemble import train_ensemble
from asyncbalance.training.loop import train_run

# Every case here is a CUDA case: `pytest -m cuda` selects them, and without a CUDA device
# they skip with this reason.
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: training on CUDA needs a GPU and a "
    "CUDA build of torch (bash scripts/bootstrap.sh --cuda)")]
DEVICE = "cuda"
LOSS_RTOL = 1e-4


def clusters(n_train: int = 600, n_test: int = 200, features: int = 32, classes: int = 5,
             seed: int = 0) -> Dataset:
    """Gaussian clusters (learnable in an epoch or two; no scikit-learn needed)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (classes, features))
    y = rng.integers(0, classes, n_train + n_test)
    x = (centres[y] + rng.normal(0.0, 1.0, (y.size, features))).astype(np.float32)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], (features,), classes,
                   "clusters")


def dfa_config(epochs: int = 2) -> TrainConfig:
    return TrainConfig(
        epochs=epochs, data=DataConfig(batch_size=16),
        model=ModelConfig(kind="mlp", widths=(0, 48, 32, 0)),
        trainer=TrainerConfig(rule="dfa"), optimizer=OptimizerConfig(name="sgd", lr=0.05),
        regulariser=RegulariserConfig(kind="l1", strength=1e-4),
        balancing=BalancingConfig(mode="partial", p=1.0),
        monitor=MonitorConfig(probe_size=64))


def assert_same_run(cpu, cuda, n_test: int) -> None:
    for r1, r2 in zip(cpu.rows[1:], cuda.rows[1:], strict=True):
        for key in ("train_loss", "test_loss"):
            assert abs(r1[key] - r2[key]) <= LOSS_RTOL * abs(r1[key]), (key, r1[key], r2[key])
        assert abs(r1["test_accuracy"] - r2["test_accuracy"]) <= 2.0 / n_test + 1e-12
    assert cuda.summary["max_function_rel_error_at_balance"] <= 1e-12
    assert cuda.summary["n_balance_events"] == cpu.summary["n_balance_events"] > 0


@pytest.mark.parametrize("rule", ["dfa", "backprop"])
def test_training_on_cuda_equals_the_cpu_run(rule: str) -> None:
    data = clusters()
    base = dfa_config()
    config = TrainConfig(**{**base.__dict__, "trainer": TrainerConfig(rule=rule)})
    cpu = train_run(config, seed=3, device="cpu", data=data)
    cuda = train_run(config, seed=3, device=DEVICE, data=data)
    assert cuda.summary["device"].startswith(DEVICE)
    assert_same_run(cpu, cuda, data.x_test.shape[0])


def test_ensemble_on_cuda_equals_separate_cpu_runs() -> None:
    data = clusters()
    config = dfa_config()
    seeds = [0, 1, 2]
    together = train_ensemble(config, seeds, [data] * len(seeds), device=DEVICE)
    for seed, ens in zip(seeds, together, strict=True):
        assert not isinstance(ens, Exception), ens
        assert_same_run(train_run(config, seed, device="cpu", data=data), ens,
                        data.x_test.shape[0])
