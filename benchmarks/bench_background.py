"""Background balancing in training: overhead per epoch, and how balanced the weights stay.

The same training run (Fashion-MNIST, 784-256-256-10, backprop, SGD lr 0.05, batch 128,
seed 0) with no balancing and with ``balancing.mode = "background"`` on Ray shard hosts
(2 shards per layer, log-scales applied every 25 steps, the hosts given the current costs
every 2 boundaries). Runs alternate plain / background / plain so both see the same machine
load; the overhead is the background epoch time over the mean of the two plain ones. At each
boundary the record has the staleness (steps) and the distance of the applied log-scales to
the optimum of the current weights; printed as median and max per run, with the distance of
the first boundary (nothing applied yet: how unbalanced the initial weights are).

Falls back to scikit-learn's digits (64 inputs) when Fashion-MNIST is absent, and says so.
Usage: .venv/bin/python benchmarks/bench_background.py [--epochs 3] [--fraction 0.25]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

from asyncbalance.errors import InvalidInputError
from asyncbalance.training.config import (
    BalancingConfig,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
)
from asyncbalance.training.data import load_dataset
from asyncbalance.training.loop import train_run


def train_seconds(result) -> float:
    """Seconds of the epochs themselves (gradient steps and balancing boundaries)."""
    return sum(row["seconds"] for row in result.rows[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.25)
    args = parser.parse_args()
    data_config = DataConfig(name="fashion_mnist", fraction=args.fraction, batch_size=128)
    try:
        data = load_dataset(data_config, 0)
        source = f"Fashion-MNIST, {args.fraction:g} of the training set"
    except InvalidInputError as exc:
        data_config = DataConfig(name="digits", batch_size=128)
        data = load_dataset(data_config, 0)
        source = f"digits (Fashion-MNIST not found: {exc})"
    common = {"epochs": args.epochs, "device": "cpu", "data": data_config,
              "model": ModelConfig(kind="mlp", widths=(0, 256, 256, 0)),
              "optimizer": OptimizerConfig(name="sgd", lr=0.05)}
    background = BalancingConfig(mode="background", unit="step", every=25, p=2.0,
                                 async_backend="ray", async_shards=2, async_reload_every=2)
    print(f"{source}; {data.x_train.shape[0]} training samples; {args.epochs} epochs")
    runs = {}
    for name, balancing in (("plain-1", BalancingConfig()), ("background", background),
                            ("plain-2", BalancingConfig())):
        result = train_run(TrainConfig(**common, balancing=balancing), seed=0, data=data)
        runs[name] = result
        print(f"  {name:>10}: {train_seconds(result) / args.epochs:.3f} s per epoch, test "
              f"accuracy {result.rows[-1]['test_accuracy']:.4f}", flush=True)
    plain = statistics.mean(train_seconds(runs[k]) for k in ("plain-1", "plain-2"))
    bg = runs["background"]
    bg_s = train_seconds(bg)
    start = bg.summary["async_runtime_start_seconds"]
    print(f"overhead of background balancing: {bg_s / plain:.3f}x the plain epoch time; "
          f"{(bg_s - start) / plain:.3f}x without the one-time start of the hosts "
          f"({start:.2f} s); {(bg_s - start - plain) / bg.summary['n_balance_events'] * 1e3:.0f}"
          " ms per boundary")
    stale = [r["staleness_steps"] for r in bg.rows if "staleness_steps" in r]
    dist = [r["distance_to_optimum"] for r in bg.rows if "staleness_steps" in r]
    print(f"boundaries: {bg.summary['n_balance_events']}; staleness at the recorded rows "
          f"{stale} steps; distance to the current optimum at the rows "
          f"{[f'{d:.2e}' for d in dist]}; first boundary (nothing applied) "
          f"{bg.summary['max_distance_to_optimum']:.2e}; function error at boundaries <= "
          f"{bg.summary['max_function_rel_error_at_balance']:.1e}")
    if np.isfinite(dist).all() and dist:
        print(f"median distance {statistics.median(dist):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
