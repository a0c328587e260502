"""The boundary monitors (float64 function check, central optimum) run exactly when the
schedule says: every ``check_every``-th boundary of the run, and at the last boundary of
each epoch with ``check_epoch_end``. The expected boundaries are worked out here from the
definition (boundaries every ``every`` steps, an epoch of ceil(n / batch) steps); what ran
is observed by wrapping ``balance_model`` (the probe it was given) and the optimum solver.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import asyncbalance.training.balancing as balancing
import asyncbalance.training.loop as loop
from asyncbalance.training.config import (
    BalancingConfig,
    DataConfig,
    ModelConfig,
    MonitorConfig,
    TrainConfig,
)
from asyncbalance.training.data import Dataset

N_TRAIN, BATCH, EVERY, EPOCHS = 80, 8, 3, 3  # 10 steps per epoch, boundaries at 3, 6, 9, ...


def _data() -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.random((N_TRAIN + 16, 12)).astype(np.float32)
    y = rng.integers(0, 3, N_TRAIN + 16)
    return Dataset(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], (12,), 3, "synthetic")


def expected_checks(check_every: int, epoch_end: bool) -> list[bool]:
    steps_per_epoch = math.ceil(N_TRAIN / BATCH)
    boundary_steps = list(range(EVERY, EPOCHS * steps_per_epoch + 1, EVERY))
    out = []
    for index, step in enumerate(boundary_steps):
        epoch_end_step = math.ceil(step / steps_per_epoch) * steps_per_epoch
        last = step + EVERY > epoch_end_step
        out.append((check_every > 0 and index % check_every == 0) or (epoch_end and last))
    return out


@pytest.mark.parametrize("check_every, epoch_end", [(1, True), (4, False), (0, True),
                                                    (2, True), (0, False)])
def test_monitors_run_exactly_when_scheduled(monkeypatch: pytest.MonkeyPatch,
                                             check_every: int, epoch_end: bool) -> None:
    probes: list[bool] = []
    solves: list[int] = []
    original_balance, original_solve = balancing.balance_model, balancing.solve_optimum

    def spy_balance(*args, **kwargs):
        probes.append(args[3] is not None)
        return original_balance(*args, **kwargs)

    def spy_solve(*args, **kwargs):
        solves.append(len(probes))
        return original_solve(*args, **kwargs)

    monkeypatch.setattr(loop, "balance_model", spy_balance)
    monkeypatch.setattr(balancing, "solve_optimum", spy_solve)
    config = TrainConfig(
        epochs=EPOCHS, device="cpu", data=DataConfig(batch_size=BATCH),
        model=ModelConfig(kind="mlp", widths=(0, 10, 0)),
        balancing=BalancingConfig(mode="partial", unit="step", every=EVERY, p=2.0),
        monitor=MonitorConfig(probe_size=16, optimum=True, alignment=False,
                              check_every=check_every, check_epoch_end=epoch_end))
    result = loop.train_run(config, seed=0, data=_data())
    expected = expected_checks(check_every, epoch_end)
    assert probes == expected
    # the optimum was solved at exactly the checked boundaries (1-based call numbers)
    assert solves == [i + 1 for i, checked in enumerate(expected) if checked]
    summary = result.summary
    assert summary["n_balance_events"] == len(expected)
    assert summary["n_checked_events"] == sum(expected)
    rows = result.rows[1:]
    assert [r["n_checked"] for r in rows] == [
        sum(expected[i] for i in range(len(expected))
            if (i + 1) * EVERY in range((e - 1) * 10 + 1, e * 10 + 1)) for e in (1, 2, 3)]
    for row in rows:
        if row["n_checked"]:
            assert 0 <= row["function_rel_error"] < 1e-12
            assert row["monitor_seconds"] > 0
        else:
            assert "function_rel_error" not in row
    if sum(expected):
        assert summary["max_function_rel_error_at_balance"] < 1e-12
    else:
        assert summary["max_function_rel_error_at_balance"] is None
