"""Seeds trained as one ensemble of stacked weights equal their separate runs.

Ground truth is ``train_run`` of each seed (autograd for backprop, the hand-written rules of
``rules.py`` for DFA/FA, ``balance_model`` per run). The ensemble sums its batched products
in another order, so it matches to float32 rounding, not bit for bit.

Tolerances (measured on digits, 2 epochs, 64-32-16-10, batch 32: train loss <= 6e-8, test loss <=
1.4e-7, unit log-imbalance <= 3e-7, accuracies equal):
- losses: relative 1e-5. float32 has eps 1.2e-7; a reordered sum perturbs the weights by a
  few eps per step and ~90 steps of SGD/Adam carry that along without chaos at this size. A
  member trained on another member's batch order or initialisation is off by > 1e-2.
- per-unit log-imbalance: absolute 1e-5 (the same weights to ~1e-6 relative).
- accuracies: at most one test sample apart (an input at a decision boundary may flip under
  a 1e-7 change of the logits).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asyncbalance.config import from_mapping
from asyncbalance.training.config import TrainConfig
from asyncbalance.training.data import load_dataset
from asyncbalance.training.ensemble import ensemble_fallback_reason, train_ensemble
from asyncbalance.training.loop import train_run

LOSS_RTOL = 1e-5
IMBALANCE_ATOL = 1e-5
SEEDS = (0, 1, 2)


def _config(rule: str, **over) -> TrainConfig:
    base = {"epochs": 2, "device": "cpu", "data": {"name": "digits", "batch_size": 32},
            "model": {"widths": [0, 24, 16, 0]}, "trainer": {"rule": rule},
            "optimizer": {"name": "sgd", "lr": 5e-2},
            "balancing": {"mode": "partial", "p": 1.0},
            "monitor": {"probe_size": 64, "alignment": rule != "backprop"}}
    for key, value in over.items():
        node = base
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return from_mapping(TrainConfig, base)


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12)


def assert_same_runs(config: TrainConfig, datas: list) -> None:
    separate = [train_run(config, seed, data=data) for seed, data in zip(SEEDS, datas,
                                                                           strict=True)]
    together = train_ensemble(config, SEEDS, datas)
    assert len(together) == len(SEEDS)
    for seed, one, ens in zip(SEEDS, separate, together, strict=True):
        assert not isinstance(ens, Exception), ens
        assert ens.summary["seed"] == seed and ens.summary["ensemble_size"] == len(SEEDS)
        assert [r["epoch"] for r in ens.rows] == [r["epoch"] for r in one.rows]
        n_test = one.summary["n_test"]
        for r1, r2 in zip(one.rows, ens.rows, strict=True):
            assert r1["step"] == r2["step"] and r1["n_balance"] == r2["n_balance"]
            for key in ("train_loss", "test_loss"):
                if np.isfinite(r1[key]):
                    assert _close(r1[key], r2[key], LOSS_RTOL), (seed, r1["epoch"], key,
                                                                 r1[key], r2[key])
            for key in ("test_accuracy", "train_accuracy"):
                if np.isfinite(r1[key]):
                    assert abs(r1[key] - r2[key]) <= 1.0 / n_test + 1e-12, (seed, key)
            for key in ("bp_law_drift", "fa_law_drift", "cost_after"):
                if key in r1:
                    assert _close(r1[key], r2[key], 1e-4), (seed, r1["epoch"], key)
        u1 = np.asarray(one.summary["final_unit_log_imbalance"])
        u2 = np.asarray(ens.summary["final_unit_log_imbalance"])
        assert np.max(np.abs(u1 - u2)) <= IMBALANCE_ATOL
        # balancing did act in every member (partial sweeps at both epoch ends)
        assert ens.summary["n_balance_events"] == one.summary["n_balance_events"] == 2
        assert ens.summary["max_function_rel_error_at_balance"] <= 1e-12


def test_a_member_that_diverges_with_a_finite_loss_leaves_the_others_training(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The end of an epoch refuses a finite loss far above the untrained model's (as a
    # separate run does): that member's outcome is the error, the others finish as their
    # separate runs. It used to escape the ensemble and end a whole study.
    from asyncbalance.training import loop
    from asyncbalance.training.loop import DivergedError

    original = loop.SeedRun.end_epoch

    def end_epoch(self, epoch, *args, **kwargs):
        if self.seed == 1 and epoch == 1:
            raise DivergedError("optimizer.lr", "training diverged in epoch 1 (test)")
        return original(self, epoch, *args, **kwargs)

    monkeypatch.setattr(loop.SeedRun, "end_epoch", end_epoch)
    config = _config("dfa")
    datas = [load_dataset(config.data, seed) for seed in SEEDS]
    together = train_ensemble(config, SEEDS, datas)
    assert isinstance(together[1], DivergedError)
    for seed in (0, 2):
        alone = train_run(config, seed, data=datas[seed])
        got = together[seed]
        assert not isinstance(got, Exception), got
        assert [r["epoch"] for r in got.rows] == [r["epoch"] for r in alone.rows]
        assert _close(got.rows[-1]["train_loss"], alone.rows[-1]["train_loss"], LOSS_RTOL)


@pytest.mark.parametrize("rule", ["backprop", "dfa", "fa"])
def test_ensemble_equals_separate_runs_with_balancing(rule: str) -> None:
    config = _config(rule, **{"regulariser.kind": "l1", "regulariser.strength": 1e-4})
    data = load_dataset(config.data, 0)
    assert_same_runs(config, [data] * len(SEEDS))


def test_ensemble_adam_state_transform_and_per_seed_subsets() -> None:
    # Adam moments transformed per member at each balancing step; each seed its own
    # stratified subset (the stacked-data path) and step-unit boundaries.
    config = _config("dfa", **{"optimizer.name": "adam", "optimizer.lr": 1e-2,
                               "balancing.unit": "step", "balancing.every": 20,
                               "data.fraction": 0.5})
    datas = [load_dataset(config.data, seed) for seed in SEEDS]
    assert not np.array_equal(datas[0].x_train, datas[1].x_train)
    separate = [train_run(config, s, data=d) for s, d in zip(SEEDS, datas, strict=True)]
    together = train_ensemble(config, SEEDS, datas)
    for one, ens in zip(separate, together, strict=True):
        assert ens.summary["n_balance_events"] == one.summary["n_balance_events"] >= 2
        for r1, r2 in zip(one.rows[1:], ens.rows[1:], strict=True):
            assert _close(r1["train_loss"], r2["train_loss"], LOSS_RTOL)
            assert _close(r1["test_loss"], r2["test_loss"], LOSS_RTOL)


def test_members_share_storage_with_the_stack_and_differ_by_seed() -> None:
    from asyncbalance.training.ensemble import StackedMLP
    from asyncbalance.training.models import MLP

    torch.manual_seed(0)
    members = [MLP((4, 3, 2)) for _ in range(2)]
    stack = StackedMLP(members)
    with torch.no_grad():
        stack.weights[0][1].mul_(2.0)
    assert torch.equal(members[1].layers[0].weight, stack.weights[0][1])
    assert not torch.equal(members[0].layers[0].weight, members[1].layers[0].weight)


def test_fallback_reasons() -> None:
    assert ensemble_fallback_reason(_config("backprop")) is None
    assert "model.kind" in ensemble_fallback_reason(_config("backprop", **{
        "model.kind": "cnn"}))
    assert "background" in ensemble_fallback_reason(_config("backprop", **{
        "balancing.mode": "background"}))


def test_study_runner_batches_seeds_by_default_and_falls_back(tmp_path) -> None:
    from asyncbalance.study.records import iter_records
    from asyncbalance.study.runner import record_root, run_study
    from asyncbalance.study.spec import parse_study

    study = parse_study({
        "name": "e", "base": {"data": {"name": "digits", "batch_size": 32}, "device": "cpu",
                              "model": {"widths": [0, 16, 0]},
                              "monitor": {"probe_size": 32, "alignment": False}},
        "budgets": {"smoke": {"seeds": 3, "tune_seeds": 2}},
        "claim": [{"id": "c", "epochs": {"smoke": 2}, "baseline": "plain",
                   "arms": {"plain": {},
                            "l1_nb": {"set": {"balancing.mode": "partial", "balancing.p": 1.0}},
                            "wild": {"set": {"optimizer.lr": 1e30}},
                            "rnn": {"set": {"model.kind": "rnn", "model.hidden": 8}}},
                   "settings": {"paper": {},
                                "tuned": {"tune": {"optimizer.lr": [1e-2, 1e-1]}}}}]})
    logs: list[str] = []
    batched = run_study(study, "smoke", tmp_path / "a", log=logs.append)
    single = run_study(study, "smoke", tmp_path / "b", log=lambda _: None, ensemble=False)
    assert batched.ran == single.ran == batched.planned
    a = {r["_path"].split("/smoke/")[1]: r for r in iter_records(
        record_root(tmp_path / "a", study, "smoke"))}
    b = {r["_path"].split("/smoke/")[1]: r for r in iter_records(
        record_root(tmp_path / "b", study, "smoke"))}
    assert sorted(a) == sorted(b) and len(a) == batched.planned
    for key, rec in a.items():
        other = b[key]
        assert "ensemble" not in other
        if rec["arm"] == "rnn":
            assert "ensemble" not in rec  # fell back to separate runs
        else:
            assert rec["ensemble"]["seeds"] == list(range(len(rec["ensemble"]["seeds"])))
            assert len(rec["ensemble"]["seeds"]) == (2 if rec["phase"] == "tune" else 3)
        assert rec["config_hash"] == other["config_hash"] and rec["tuned"] == other["tuned"]
        if rec["arm"] == "wild" and rec["setting"] == "paper":  # tuning replaces its lr
            assert "diverged" in rec and "diverged" in other
            continue
        s1, s2 = rec["summary"], other["summary"]
        assert abs(s1["test_accuracy"] - s2["test_accuracy"]) <= 1.0 / s2["n_test"] + 1e-12
        for l1, l2 in zip(rec["curves"]["train_loss"][1:], other["curves"]["train_loss"][1:],
                          strict=True):
            assert _close(l1, l2, LOSS_RTOL), key
    assert run_study(study, "smoke", tmp_path / "a", log=lambda _: None).ran == 0
