"""Background balancing in training: overhead per epoch, and how balanced the weights stay.

The same training run (Fashion-MNIST, 784-256-256-10, backprop, SGD lr 0.05, batch 128,
seed 0) with no balancing and with ``balancing.mode = "background"`` on Ray shard hosts
(2 shards per layer, log-scales applied every 25 steps, the hosts given the current costs
every 2 boundaries), in three variants: monitors (float64 function check, central optimum)
sampled (``monitor.check_every = 0``: at the last boundary of each epoch only) on paced
hosts (the default), the same on free-running hosts (``async_clock = "free"``), and
monitors at every boundary on paced hosts. Each repeat runs plain, then each
variant followed by plain, so all see the same machine load; an overhead is the background
epoch time over the mean of the two plain runs around it. At the
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
from dataclasses import replace

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
           ) -> tuple[float, float, float]:
    seconds = train_seconds(result)
    steady = steady_seconds(result) / steady_plain
    start = result.summary["async_runtime_start_seconds"]
    monitor = result.summary["monitor_seconds"]
    ratio = (seconds - start) / plain
    # The monitors (float64 function check, central optimum) measure the balancing; the
    # record reports their time apart, so the balancing's own cost is shown without it too.
    unmonitored = (seconds - start - monitor) / plain
    # the time the training thread spent at the boundaries (the one-time start excluded)
    boundary = result.summary["balance_seconds"] - start
    rows = [r for r in result.rows[1:] if r.get("n_checked")]
    dist = [r["distance_to_optimum"] for r in rows]
    stale = [r.get("staleness_steps") for r in rows]
    print(f"    {name}: {ratio:.3f}x the plain epoch time without the one-time start of the "
          f"hosts ({start:.2f} s; {seconds / plain:.2f}x with it; {unmonitored:.3f}x without "
          f"the monitors' own time); "
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
    return ratio, steady, unmonitored


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
    free = replace(background, async_clock="free")
    # Each background variant runs between two plain runs, so all see the same load.
    variants = (("sampled", "background, paced hosts, monitors at epoch ends", background,
                 MonitorConfig(check_every=0)),
                ("sampled, free hosts", "background, free hosts, monitors at epoch ends",
                 free, MonitorConfig(check_every=0)),
                ("every", "background, paced hosts, monitors every boundary", background,
                 MonitorConfig()))
    print(f"{source}; {data.x_train.shape[0]} training samples; {args.epochs} epochs; "
          f"{args.repeats} repeats")
    ratios: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        plain = [train_run(TrainConfig(**common, balancing=BalancingConfig()), seed=0,
                           data=data)]
        runs = []
        for _, _, balancing, monitor in variants:
            runs.append(train_run(TrainConfig(**common, balancing=balancing, monitor=monitor),
                                  seed=0, data=data))
            plain.append(train_run(TrainConfig(**common, balancing=BalancingConfig()), seed=0,
                                   data=data))
        epochs = [f"{train_seconds(r) / args.epochs:.3f}" for r in plain]
        print(f"  repeat {repeat + 1}: plain epochs {epochs} s", flush=True)
        for index, (name, label, _, _) in enumerate(variants):
            around = plain[index:index + 2]
            ratio, steady_ratio, unmonitored = report(label, runs[index],
                                         statistics.mean(train_seconds(r) for r in around),
                                         statistics.mean(steady_seconds(r) for r in around),
                                         args.epochs)
            ratios.setdefault(name, []).append(ratio)
            ratios.setdefault(name + " (epochs 2 on)", []).append(steady_ratio)
            ratios.setdefault(name + " (without the monitors' time)", []).append(unmonitored)
    for name, values in ratios.items():
        print(f"{name}: median {statistics.median(values):.3f}x, range "
              f"{min(values):.3f} - {max(values):.3f}x without the one-time start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
