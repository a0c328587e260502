"""Training options the study needs: the optimiser state at a balancing step inside
training, weights-only balancing, [-1, 1] inputs, the validation split, lr decay."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from asyncbalance.config import from_mapping
from asyncbalance.errors import InvalidInputError
from asyncbalance.training.balancing import balance_model, unit_log_imbalance
from asyncbalance.training.config import DataConfig, TrainConfig
from asyncbalance.training.data import load_dataset
from asyncbalance.training.loop import train_run
from asyncbalance.training.models import MLP
from asyncbalance.training.weights_only import WeightsOnlyView


def _config(**over) -> TrainConfig:
    base = {"epochs": 2, "device": "cpu", "data": {"name": "digits", "batch_size": 64},
            "model": {"widths": [0, 16, 12, 0]}, "optimizer": {"name": "adam", "lr": 1e-2},
            "monitor": {"optimum": False, "probe_size": 64}}
    for key, value in over.items():
        node = base
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return from_mapping(TrainConfig, base)


def _adam_with_state(model: MLP) -> torch.optim.Adam:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.arange(20) % 3
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("mode", ["transform", "keep", "reset"])
def test_balance_model_applies_the_optimizer_state_mode(mode: str) -> None:
    torch.manual_seed(0)
    model = MLP((5, 6, 4, 3)).double()
    opt = _adam_with_state(model)
    old_w = {p: p.detach().clone() for p in model.parameters()}
    old_m = {p: opt.state[p]["exp_avg"].clone() for p in model.parameters()}
    old_v = {p: opt.state[p]["exp_avg_sq"].clone() for p in model.parameters()}
    balance_model(model, 2.0, "full", with_optimum=False, optimizer=opt, optimizer_state=mode)
    for p in model.parameters():
        s = p.detach() / old_w[p]          # the factor seen on the weights themselves
        rescaled = not torch.allclose(s, torch.ones_like(s))
        if mode == "keep" or not rescaled:
            assert torch.equal(opt.state[p]["exp_avg"], old_m[p])
        elif mode == "reset":
            assert p not in opt.state or not opt.state[p]
        else:
            torch.testing.assert_close(opt.state[p]["exp_avg"], old_m[p] / s,
                                       rtol=1e-12, atol=0)
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"], old_v[p] / s**2,
                                       rtol=1e-12, atol=0)
    assert any(not torch.allclose(p.detach(), old_w[p]) for p in model.parameters())


def test_training_modes_differ_and_transform_is_the_default() -> None:
    assert TrainConfig().balancing.optimizer_state == "transform"
    accs = {}
    for mode in ("transform", "keep", "reset"):
        cfg = _config(**{"balancing.mode": "partial", "balancing.p": 1.0,
                         "balancing.optimizer_state": mode})
        rows = train_run(cfg, 0).rows
        accs[mode] = [r["train_loss"] for r in rows[2:]]
    assert accs["transform"] != accs["keep"] and accs["transform"] != accs["reset"]
    with pytest.raises(InvalidInputError, match="transform, keep, reset"):
        _config(**{"balancing.optimizer_state": "rescale"})


def test_weights_only_balancing_ignores_biases() -> None:
    torch.manual_seed(1)
    model = MLP((5, 7, 3)).double()
    probe = torch.randn(32, 5, dtype=torch.float64)
    biases = [layer.bias.detach().clone() for layer in model.layers]
    event = balance_model(WeightsOnlyView(model), 2.0, "full", probe, with_optimum=False)
    assert all(torch.equal(layer.bias, b) for layer, b in zip(model.layers, biases,
                                                                strict=True))
    # the weights alone are balanced: ||in_k||^2 = ||out_k||^2 without the bias
    w1, w2 = model.layers[0].weight.detach(), model.layers[1].weight.detach()
    np.testing.assert_allclose(w1.pow(2).sum(1).numpy(), w2.pow(2).sum(0).numpy(), rtol=1e-9)
    # with a bias the function changes (what the arm measures) ...
    assert event.function_rel_error > 1e-6
    # ... and the exact balancing of the same weights would not have changed it
    twin = MLP((5, 7, 3)).double()
    twin.load_state_dict(copy.deepcopy(model.state_dict()))
    assert balance_model(twin, 2.0, "full", probe, with_optimum=False).function_rel_error \
        < 1e-12
    # without biases the two balancings coincide and preserve the function
    nobias = MLP((5, 7, 3), bias=False).double()
    assert balance_model(WeightsOnlyView(nobias), 2.0, "full", probe,
                         with_optimum=False).function_rel_error < 1e-12
    assert np.abs(unit_log_imbalance(nobias, 2.0)).max() < 1e-8


def test_weights_only_arm_in_training_reports_the_function_change() -> None:
    exact = train_run(_config(**{"balancing.mode": "partial"}), 0).summary
    loose = train_run(_config(**{"balancing.mode": "partial",
                                 "balancing.include_biases": False}), 0).summary
    assert exact["max_function_rel_error_at_balance"] < 1e-12
    assert loose["max_function_rel_error_at_balance"] > 1e-6


def test_symmetric_scaling_and_validation_split() -> None:
    unit = load_dataset(DataConfig(name="digits"))
    sym = load_dataset(DataConfig(name="digits", scaling="symmetric"))
    np.testing.assert_array_equal(sym.x_train, 2 * unit.x_train - 1)
    assert unit.x_train.min() == 0.0 and sym.x_train.min() == -1.0
    assert sym.x_train.max() == 1.0
    val = load_dataset(DataConfig(name="digits", validation_fraction=0.2))
    # the held-out part comes from the training set, the test set is not used at all
    assert val.x_train.shape[0] + val.x_test.shape[0] == unit.x_train.shape[0]
    rows = {r.tobytes() for r in unit.x_train}
    assert all(r.tobytes() in rows for r in val.x_test)
    test_rows = {r.tobytes() for r in unit.x_test}
    assert not any(r.tobytes() in test_rows and r.tobytes() not in rows for r in val.x_test)
    assert set(np.unique(val.y_test)) == set(range(10))     # stratified
    held = {r.tobytes() for r in val.x_test}
    assert not any(r.tobytes() in held for r in val.x_train)  # disjoint
    with pytest.raises(InvalidInputError, match="scaling"):
        DataConfig(scaling="centered")


def test_lr_decay_and_eval_every() -> None:
    cfg = _config(**{"optimizer.name": "sgd", "optimizer.lr": 0.1, "optimizer.lr_decay": 0.5,
                     "epochs": 5, "monitor.eval_every": 2})
    result = train_run(cfg, 0)
    assert [r["epoch"] for r in result.rows] == [0, 2, 4, 5]
    steps_per_epoch = -(-result.summary["n_train"] // 64)
    assert [r["step"] for r in result.rows] == [0, 2 * steps_per_epoch, 4 * steps_per_epoch,
                                                5 * steps_per_epoch]
    # a decay of 1e-9 per epoch leaves only the first epoch's steps with a real lr: the test
    # loss stays where epoch 1 left it (to float32 rounding); without decay it keeps moving
    frozen = train_run(_config(**{"optimizer.name": "sgd", "optimizer.lr": 0.1,
                                  "optimizer.lr_decay": 1e-9, "epochs": 3}), 0).rows
    moving = train_run(_config(**{"optimizer.name": "sgd", "optimizer.lr": 0.1,
                                  "epochs": 3}), 0).rows
    assert frozen[1]["test_loss"] == pytest.approx(moving[1]["test_loss"], rel=1e-6)
    assert frozen[3]["test_loss"] == pytest.approx(frozen[1]["test_loss"], rel=1e-6)
    assert abs(moving[3]["test_loss"] - moving[1]["test_loss"]) > 1e-3
    with pytest.raises(InvalidInputError, match="lr_decay"):
        _config(**{"optimizer.lr_decay": 1.5})


def test_validation_folds_are_a_stratified_k_fold_of_the_training_set() -> None:
    unit = load_dataset(DataConfig(name="digits"))
    rows = [r.tobytes() for r in unit.x_train]
    index_of = {r: i for i, r in enumerate(rows)}
    # digits has a few duplicate images: count them by position, not by bytes
    assert len(index_of) > 0.98 * len(rows)
    k = 5
    held_count = np.zeros(len(rows), dtype=int)
    sizes = []
    for fold in range(k):
        data = load_dataset(DataConfig(name="digits", validation_folds=k,
                                       validation_fold=fold))
        assert data.x_train.shape[0] + data.x_test.shape[0] == len(rows)
        held = {r.tobytes() for r in data.x_test}
        assert not any(r.tobytes() in held for r in data.x_train)           # disjoint
        for r in data.x_test:
            held_count[index_of[r.tobytes()]] += 1
        sizes.append(np.bincount(data.y_test, minlength=10))
    unique = np.array([index_of[r] == i for i, r in enumerate(rows)])
    # over the k folds every training sample is held out exactly once
    assert (held_count[unique] == 1).all()
    # stratified: a class's count differs by at most one between folds
    per_class = np.array(sizes)
    assert (per_class.max(axis=0) - per_class.min(axis=0) <= 1).all()
    # the partition is drawn from split_seed (like the data set's own split)
    first = load_dataset(DataConfig(name="digits", validation_folds=k))
    again = load_dataset(DataConfig(name="digits", validation_folds=k))
    np.testing.assert_array_equal(first.x_test, again.x_test)
    with pytest.raises(InvalidInputError, match="validation_folds"):
        DataConfig(validation_folds=1)
    with pytest.raises(InvalidInputError, match="validation_fold"):
        DataConfig(validation_folds=5, validation_fold=5)
    with pytest.raises(InvalidInputError, match="validation_fold"):
        DataConfig(validation_fold=1)
    with pytest.raises(InvalidInputError, match="validation_folds"):
        DataConfig(validation_folds=5, validation_fraction=0.2)
    summary = train_run(_config(**{"data.validation_folds": 3, "epochs": 1}), 0).summary
    assert summary["evaluated_on"] == "validation"


def test_folds_of_a_subset_cover_one_subset_when_its_seed_is_fixed() -> None:
    # Tuning seed s trains with seed s on fold s: with the subset's seed fixed, the folds
    # partition one subset; with the run's seed, each fold would come from another subset.
    def held(fold: int, subset_seed: int) -> tuple[set[bytes], set[bytes]]:
        data = load_dataset(DataConfig(name="digits", fraction=0.3, validation_folds=3,
                                       validation_fold=fold, subset_seed=subset_seed), fold)
        return {r.tobytes() for r in data.x_test}, {r.tobytes() for r in data.x_train}

    parts = [held(f, 0) for f in range(3)]
    subset = parts[0][0] | parts[0][1]
    assert all(h | t == subset for h, t in parts)
    assert sum(len(h) for h, _ in parts) == len(subset)
    drifting = [held(f, -1) for f in range(3)]
    assert any(h | t != drifting[0][0] | drifting[0][1] for h, t in drifting[1:])
    with pytest.raises(InvalidInputError, match="subset_seed"):
        DataConfig(subset_seed=-2)
