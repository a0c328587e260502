"""Training benchmarks, measured side by side in one run.

1. Epoch time with vs without partial balancing (one layer-wise L1 sweep) every epoch on
   Fashion-MNIST 784-512-256-128-64-10, backprop, SGD, batch 256. The epochs alternate
   (plain, balanced, plain, ...) on two copies of the same model so both see the same machine
   load. Balancing is timed alone (read weights, build the cost graph, one sweep, write back)
   and with the monitors (float64 function check on 256 probe inputs and the central optimum).
2. DFA step time vs backprop step time on the same model and the same batch.

Falls back to a synthetic data set of the same shape (60000 x 784, 10 classes) when the IDX
files are absent, and says so. Usage: python benchmarks/bench_training.py [--epochs 3]
[--steps 200] [--device auto|cpu|cuda] [--data-dir DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import numpy as np
import torch

from asyncbalance.errors import InvalidInputError
from asyncbalance.training.balancing import balance_model
from asyncbalance.training.config import DataConfig, TrainerConfig
from asyncbalance.training.data import load_dataset
from asyncbalance.training.loop import resolve_device
from asyncbalance.training.models import MLP
from asyncbalance.training.rules import Backprop, make_rule

WIDTHS = (784, 512, 256, 128, 64, 10)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def data_tensors(data_dir: str | None, device: torch.device):
    try:
        data = load_dataset(DataConfig(name="fashion_mnist"), data_dir=data_dir)
        x, y, source = data.x_train, data.y_train, "Fashion-MNIST IDX files"
    except InvalidInputError as exc:
        rng = np.random.default_rng(0)
        x = rng.random((60000, 784), dtype=np.float32)
        y = rng.integers(0, 10, 60000)
        source = f"SYNTHETIC 60000 x 784 (Fashion-MNIST not found: {exc})"
    return torch.from_numpy(x).to(device), torch.from_numpy(np.asarray(y)).to(device), source


def epoch(model: MLP, rule, opt, x, y, order, batch: int, device) -> float:
    sync(device)
    start = time.perf_counter()
    for i in range(0, x.shape[0], batch):
        idx = order[i:i + batch]
        rule.compute(x[idx], y[idx])
        opt.step()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); use 1 on a shared machine")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    device = resolve_device(args.device)
    x, y, source = data_tensors(args.data_dir, device)
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name()})"
                                 if device.type == "cuda" else
                                 f" ({torch.get_num_threads()} torch threads)"))
    print(f"data: {source}")
    print(f"model: {'-'.join(map(str, WIDTHS))}, batch {args.batch}, SGD lr 1e-3")

    torch.manual_seed(0)
    plain = MLP(WIDTHS).to(device)
    balanced = copy.deepcopy(plain)
    runs = {}
    for name, model in (("plain", plain), ("balanced", balanced)):
        runs[name] = (model, Backprop(model), torch.optim.SGD(model.parameters(), lr=1e-3))
    probe = x[:256]
    generator = torch.Generator().manual_seed(0)
    t_plain, t_bal_epoch, t_balance, t_monitored = [], [], [], []
    # warm-up epoch each (allocators, kernels), not timed
    order = torch.randperm(x.shape[0], generator=generator).to(device)
    for name in runs:
        epoch(*runs[name], x, y, order, args.batch, device)
    for _ in range(args.epochs):
        order = torch.randperm(x.shape[0], generator=generator).to(device)
        t_plain.append(epoch(*runs["plain"], x, y, order, args.batch, device))
        t = epoch(*runs["balanced"], x, y, order, args.batch, device)
        sync(device)
        start = time.perf_counter()
        balance_model(balanced, 1.0, "partial", probe=None, with_optimum=False)
        sync(device)
        t_balance.append(time.perf_counter() - start)
        t_bal_epoch.append(t + t_balance[-1])
        start = time.perf_counter()
        twin = copy.deepcopy(balanced)
        balance_model(twin, 1.0, "partial", probe=probe, with_optimum=True)
        sync(device)
        t_monitored.append(time.perf_counter() - start)
    ep, epb = statistics.median(t_plain), statistics.median(t_bal_epoch)
    bal, mon = statistics.median(t_balance), statistics.median(t_monitored)
    print(f"\n[1] epoch time, median of {args.epochs} alternating epochs")
    print(f"  epoch without balancing:            {ep:8.3f} s")
    print(f"  epoch with partial balancing:       {epb:8.3f} s")
    print(f"  ratio with / without:               {epb / ep:8.4f}")
    print(f"  partial balancing alone:            {1e3 * bal:8.2f} ms = {100 * bal / ep:.2f}% "
          "of a plain epoch (goal <= 3%)")
    print(f"  partial balancing with monitors:    {1e3 * mon:8.2f} ms = {100 * mon / ep:.2f}% "
          "of a plain epoch")

    torch.manual_seed(1)
    model = MLP(WIDTHS).to(device)
    rules = {"backprop": Backprop(model), "dfa": make_rule(model, TrainerConfig(rule="dfa"), 0)}
    xb, yb = x[:args.batch], y[:args.batch]
    for rule in rules.values():
        for _ in range(10):
            rule.compute(xb, yb)
    times: dict[str, list[float]] = {name: [] for name in rules}
    for _ in range(args.steps):
        for name, rule in rules.items():  # alternate, same batch, same weights
            sync(device)
            start = time.perf_counter()
            rule.compute(xb, yb)
            sync(device)
            times[name].append(time.perf_counter() - start)
    bp, dfa = statistics.median(times["backprop"]), statistics.median(times["dfa"])
    print(f"\n[2] gradient computation per step (forward + update rule, no optimiser), "
          f"median of {args.steps} alternating steps")
    print(f"  backprop step: {1e3 * bp:8.3f} ms")
    print(f"  DFA step:      {1e3 * dfa:8.3f} ms")
    print(f"  ratio DFA / backprop: {dfa / bp:.3f}")


if __name__ == "__main__":
    main()
