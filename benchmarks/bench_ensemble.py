"""Seeds as one ensemble against the same seeds one after another, side by side in one run.

A study cell: ``--seeds`` seeds of an MLP (default 784-256-10 on Fashion-MNIST, batch 256,
SGD lr 1e-3, [-1, 1] inputs, L1 partial balancing after every epoch, the study's monitors:
128-input function probe, conservation laws, no optimum, no alignment). Each repeat trains
the cell twice, as ``train_run`` per seed (what the study runner did) and as one
``train_ensemble``, the order alternating between repeats so both see the same machine
load. Throughput ratio = sequential wall time / ensemble wall time (data loaded once,
outside the timing). Per-seed final test accuracies of the two are compared too.

``--small`` runs the same on scikit-learn's digits with 64-32-10 and batch 32 (a smoke-size
cell, where a step is mostly Python overhead).

Usage: .venv/bin/python benchmarks/bench_ensemble.py [--seeds 5] [--epochs 1] [--repeats 3]
[--threads 1] [--small] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from asyncbalance.config import from_mapping
from asyncbalance.training.config import TrainConfig
from asyncbalance.training.data import load_dataset
from asyncbalance.training.ensemble import train_ensemble
from asyncbalance.training.loop import train_run


def cell_config(small: bool, epochs: int, device: str) -> TrainConfig:
    data = {"name": "digits", "batch_size": 32} if small else \
        {"name": "fashion_mnist", "batch_size": 256, "scaling": "symmetric"}
    widths = [0, 32, 0] if small else [0, 256, 0]
    return from_mapping(TrainConfig, {
        "epochs": epochs, "device": device, "data": data, "model": {"widths": widths},
        "optimizer": {"name": "sgd", "lr": 1e-3},
        "balancing": {"mode": "partial", "p": 1.0},
        "monitor": {"probe_size": 128, "optimum": False, "alignment": False}})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    config = cell_config(args.small, args.epochs, args.device)
    data = load_dataset(config.data, 0)
    seeds = list(range(args.seeds))
    widths = "-".join(str(w) for w in (data.n_features, *config.model.widths[1:-1],
                                       data.n_classes))
    print(f"{data.name}: {data.x_train.shape[0]} training samples; {widths}, batch "
          f"{config.data.batch_size}, {args.epochs} epoch(s), {len(seeds)} seeds, L1 partial "
          f"balancing every epoch; device {args.device}, {torch.get_num_threads()} torch "
          "thread(s)", flush=True)
    train_run(config, 0, data=data)  # warm-up: imports, allocator, kernels (not timed)
    ratios, worst_acc = [], 0.0
    for repeat in range(args.repeats):
        times: dict[str, float] = {}
        accs: dict[str, list[float]] = {}
        order = ("sequential", "ensemble") if repeat % 2 == 0 else ("ensemble", "sequential")
        for name in order:
            start = time.perf_counter()
            if name == "sequential":
                results = [train_run(config, s, data=data) for s in seeds]
            else:
                results = train_ensemble(config, seeds, [data] * len(seeds))
            times[name] = time.perf_counter() - start
            accs[name] = [r.summary["test_accuracy"] for r in results]
        ratio = times["sequential"] / times["ensemble"]
        ratios.append(ratio)
        diff = max(abs(a - b) for a, b in zip(accs["sequential"], accs["ensemble"],
                                              strict=True))
        worst_acc = max(worst_acc, diff)
        print(f"  repeat {repeat + 1}: sequential {times['sequential']:.2f} s, ensemble "
              f"{times['ensemble']:.2f} s, throughput x{ratio:.2f}; accuracies "
              f"{[round(a, 4) for a in accs['ensemble']]}, largest per-seed difference "
              f"{diff:.1e}", flush=True)
    print(f"throughput ratio (sequential / ensemble): median x{statistics.median(ratios):.2f}, "
          f"range x{min(ratios):.2f} - x{max(ratios):.2f} over {len(ratios)} repeats; largest "
          f"per-seed accuracy difference {worst_acc:.1e} (one test sample = "
          f"{1 / data.x_test.shape[0]:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
