"""Background balancing in training: overhead per epoch, and how balanced the weights stay.

The same training run (Fashion-MNIST, 784-256-256-10, backprop, SGD lr 0.05, batch 128,
seed 0) with no balancing and with ``balancing.mode = "background"`` on Ray shard hosts
(2 shards per layer, log-scales applied every 25 steps, the hosts given the current costs
every 2 boundaries), in two variants: the monitors (float64 function check, central
optimum) at every boundary, and sampled (``monitor.check_every = 0``: at the last boundary
of each epoch only). Each repeat runs plain / background, monitors sampled / plain /
background, monitors at every boundary / plain, so all see the same machine load; an
overhead is the background epoch time over the mean of the two plain runs around it. At the
checked boundaries the record has the staleness (steps) and the distance of the applied
log-scales to the optimum of the current weights (the epoch-end rows: the last boundary of
each epoch), with the distance of the first boundary (nothing applied yet: how unbalanced
the initial weights are). Monitor seconds are reported apart.

Falls back to scikit-learn's digits (64 inputs) when Fashion-MNIST is absent, and says so.
Usage: .venv/bin/python benchmarks/bench_background.py [--epochs 3] [--fraction 0.25]
[--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from asyncbalance.errors import InvalidInputError
from asyncbalance.training.config import (
    BalancingConfig,
    DataConfig,
    ModelConfig,
    MonitorConfig,
    OptimizerConfig,
    TrainConfig,
)
from asyncbalance.training.data import load_dataset
from asyncbalance.training.loop import train_run


def train_seconds(result) -> float:
    """Seconds of the epochs themselves (gradient steps and balancing boundaries)."""
    return sum(row["seconds"] for row in result.rows[1:])


def steady_seconds(result) -> float:
    """Seconds of the epochs after the first (the hosts start during the first)."""
    return sum(row["seconds"] for row in result.rows[2:])


def report(name: str, result, plain: float, steady_plain: float, epochs: int
           ) -> tuple[float, float]:
    seconds = train_seconds(result)
    steady = steady_seconds(result) / steady_plain
    start = result.summary["async_runtime_start_seconds"]
    monitor = result.summary["monitor_seconds"]
    ratio = (seconds - start) / plain
    # the time the training thread spent at the boundaries (the one-time start excluded)
    boundary = result.summary["balance_seconds"] - start
    rows = [r for r in result.rows[1:] if r.get("n_checked")]
    dist = [r["distance_to_optimum"] for r in rows]
    stale = [r.get("staleness_steps") for r in rows]
    print(f"    {name}: {ratio:.3f}x the plain epoch time without the one-time start of the "
          f"hosts ({start:.2f} s; {seconds / plain:.2f}x with it); "
          f"{(seconds - start - plain) / result.summary['n_balance_events'] * 1e3:.1f} ms per "
          f"boundary, of which monitors {monitor / result.summary['n_balance_events'] * 1e3:.1f}"
          f" ms ({result.summary['n_checked_events']} of {result.summary['n_balance_events']} "
          f"boundaries checked); in the training thread the boundaries took "
          f"{boundary * 1e3:.0f} ms + monitors {monitor * 1e3:.0f} ms = "
          f"{100 * (boundary + monitor) / plain:.1f}% of the plain run; distance to the "
          f"current optimum at the epoch ends "
          f"{[f'{d:.1e}' for d in dist]} (staleness {stale} steps); first boundary "
          f"{result.summary['max_distance_to_optimum']:.2f}; function error <= "
          f"{result.summary['max_function_rel_error_at_balance']:.1e}; epochs 2 - {epochs} "
          f"alone: {steady:.3f}x the plain ones", flush=True)
    return ratio, steady


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads of the training process (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
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
    plans = (("plain-1", BalancingConfig(), MonitorConfig()),
             ("sampled", background, MonitorConfig(check_every=0)),
             ("plain-2", BalancingConfig(), MonitorConfig()),
             ("every", background, MonitorConfig()),
             ("plain-3", BalancingConfig(), MonitorConfig()))
    print(f"{source}; {data.x_train.shape[0]} training samples; {args.epochs} epochs; "
          f"{args.repeats} repeats")
    ratios: dict[str, list[float]] = {"sampled": [], "every": [], "sampled (epochs 2 on)": [],
                                      "every (epochs 2 on)": []}
    for repeat in range(args.repeats):
        runs = {}
        for name, balancing, monitor in plans:
            runs[name] = train_run(TrainConfig(**common, balancing=balancing, monitor=monitor),
                                   seed=0, data=data)
        plain = {name: train_seconds(runs[name]) for name in ("plain-1", "plain-2", "plain-3")}
        steady = {name: steady_seconds(runs[name]) for name in plain}
        epochs = [f"{v / args.epochs:.3f}" for v in plain.values()]
        print(f"  repeat {repeat + 1}: plain epochs {epochs} s", flush=True)
        for name, label, around in (
                ("sampled", "background, monitors at epoch ends", ("plain-1", "plain-2")),
                ("every", "background, monitors every boundary", ("plain-2", "plain-3"))):
            ratio, steady_ratio = report(label, runs[name],
                                         statistics.mean(plain[k] for k in around),
                                         statistics.mean(steady[k] for k in around),
                                         args.epochs)
            ratios[name].append(ratio)
            ratios[name + " (epochs 2 on)"].append(steady_ratio)
    for name, values in ratios.items():
        print(f"{name}: median {statistics.median(values):.3f}x, range "
              f"{min(values):.3f} - {max(values):.3f}x without the one-time start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
