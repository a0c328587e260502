"""``balance_`` on a full-width ResNet-18 against one forward+backward pass, side by side.

The CIFAR ResNet-18 (3x3 stem of 64 channels, four stages of two basic blocks, widths 64 to
512, eval-mode BatchNorm with its statistics drawn away from the defaults, a 10-way Linear
head: 11.2 M parameters), one 1x3x32x32 input, float32, one torch thread. The rounds
interleave (forward+backward, balance_ with the function check, balance_ without it) on fresh
copies of the same model, so every measurement sees the same machine load; the tables give
medians, the ratios of the medians and the medians of each round's own ratio, in wall time
and in the process's CPU time (which leaves out the time other processes held the core).
``balance_`` times include everything it does: the fx discovery (one pass of the model), the
cost aggregation, the exact solve, the write-back and, with the check, three more passes:
two in float64 (before and after the rescaling) and one in the model's dtype (after).

Usage: python benchmarks/bench_torch_balance.py [--rounds 7] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from torch import nn

from asyncbalance.torch_bridge import balance_

GOAL_RATIO = 5.0  # issue 18: balance_ with the check within 5 forward+backward passes


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR ResNet-18 (He et al. 2016, as in the usual CIFAR-10 code)."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks, c = [], 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(c, width, stride), BasicBlock(width, width, 1)]
            c = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(self.layers(h)), 1))


def trained_like_resnet18(seed: int = 0) -> nn.Module:
    """ResNet-18 in eval mode with BatchNorm statistics and affine parameters drawn away from
    their defaults (as after training), so the balance is not trivial."""
    torch.manual_seed(seed)
    model = ResNet18()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.uniform_(-1, 1, generator=generator)
                module.running_var.copy_(0.3 + 2.7 * torch.rand(n, generator=generator))
                module.weight.copy_(0.3 + 1.7 * torch.rand(n, generator=generator))
                module.bias.uniform_(-1, 1, generator=generator)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 1:
        print("--rounds and --threads must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    model = trained_like_resnet18()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    n_params = sum(p.numel() for p in model.parameters())

    def forward_backward(m: nn.Module) -> None:
        m.zero_grad(set_to_none=True)
        m(x).sum().backward()

    names = ("forward+backward", "balance_", "balance_ (no check)")
    runs = {"forward+backward": forward_backward,
            "balance_": lambda m: reports.append(balance_(m, p=2.0, example=x)),
            "balance_ (no check)": lambda m: balance_(m, p=2.0, example=x,
                                                     check_function=False)}
    # Wall time, and the process's CPU time: on a shared machine the second leaves out the
    # time other processes held the core (one torch thread: CPU time ~ unloaded wall time).
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times = {clock: {name: [] for name in names} for clock in clocks}
    reports: list = []
    forward_backward(copy.deepcopy(model))  # warm-up: first-call allocations and dispatch
    balance_(copy.deepcopy(model), p=2.0, example=x)
    for _ in range(args.rounds):
        for name in names:
            m = copy.deepcopy(model)
            started = {clock: read() for clock, read in clocks.items()}
            runs[name](m)
            for clock, read in clocks.items():
                times[clock][name].append(read() - started[clock])
    report = reports[-1]
    print(f"ResNet-18, {n_params / 1e6:.1f} M parameters, input 1x3x32x32, float32, "
          f"{args.threads} thread(s), {args.rounds} interleaved rounds, torch "
          f"{torch.__version__}")
    print(f"balance_: {report.n_units} of {report.n_units_found} units, {report.n_scales} "
          f"log-scales, {report.iterations} Newton iterations, function change "
          f"{report.function_change:.1e} (float32) / {report.function_change_float64:.1e} "
          "(float64)")
    summary: dict[str, dict] = {}
    for clock in clocks:
        values = times[clock]
        medians = {k: statistics.median(v) for k, v in values.items()}
        base = medians["forward+backward"]

        def per_round(name: str, values: dict = values) -> float:
            # Each round's own ratio: load drifts slower than a round cancel in it.
            return statistics.median(b / f for b, f in zip(
                values[name], values["forward+backward"], strict=True))

        print(f"\n{clock} time:\n")
        print("| what | median s | min s | max s | x forward+backward (ratio of medians) | "
              "median of per-round ratios |")
        print("|---|---|---|---|---|---|")
        for name in names:
            print(f"| {name} | {medians[name]:.3f} | {min(values[name]):.3f} | "
                  f"{max(values[name]):.3f} | {medians[name] / base:.1f} | "
                  f"{per_round(name):.1f} |")
        summary[clock] = {"seconds": values, "medians": medians,
                          "ratio_of_medians": {n: medians[n] / base for n in names},
                          "median_per_round_ratio": {n: per_round(n) for n in names}}
    for clock in clocks:
        ratio = summary[clock]["ratio_of_medians"]["balance_"]
        print(f"goal ({clock} time): balance_ with the check <= {GOAL_RATIO:g}x "
              f"forward+backward: {'met' if ratio <= GOAL_RATIO else 'NOT met'} "
              f"({ratio:.1f}x, ratio of the medians)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"n_params": n_params, "threads": args.threads, "rounds": args.rounds,
                       "torch": torch.__version__, **summary}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
