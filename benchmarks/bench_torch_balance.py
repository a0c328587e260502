"""``balance_`` on a full-width ResNet-18 against one forward+backward pass, side by side.

The CIFAR ResNet-18 (3x3 stem of 64 channels, four stages of two basic blocks, widths 64 to
512, eval-mode BatchNorm with its statistics drawn away from the defaults, a 10-way Linear
head: 11.2 M parameters), one 1x3x32x32 input, float32, one torch thread. The rounds
interleave (forward+backward, balance_ with the function check, balance_ without it) on fresh
copies of the same model, so every measurement sees the same machine load; the table gives
medians and the ratios of the medians. ``balance_`` times include everything it does: the
fx discovery, the cost aggregation, the exact solve, the write-back and (with the check) the
four probe passes, two of them on a float64 copy.

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

    times: dict[str, list[float]] = {"forward+backward": [], "balance_": [],
                                     "balance_ (no check)": []}
    reports = []
    forward_backward(copy.deepcopy(model))  # warm-up: first-call allocations and dispatch
    balance_(copy.deepcopy(model), p=2.0, example=x)
    for _ in range(args.rounds):
        m = copy.deepcopy(model)
        start = time.perf_counter()
        forward_backward(m)
        times["forward+backward"].append(time.perf_counter() - start)
        m = copy.deepcopy(model)
        start = time.perf_counter()
        reports.append(balance_(m, p=2.0, example=x))
        times["balance_"].append(time.perf_counter() - start)
        m = copy.deepcopy(model)
        start = time.perf_counter()
        balance_(m, p=2.0, example=x, check_function=False)
        times["balance_ (no check)"].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    base = medians["forward+backward"]
    report = reports[-1]
    print(f"ResNet-18, {n_params / 1e6:.1f} M parameters, input 1x3x32x32, float32, "
          f"{args.threads} thread(s), {args.rounds} interleaved rounds, torch "
          f"{torch.__version__}")
    print(f"balance_: {report.n_units} of {report.n_units_found} units, {report.n_scales} "
          f"log-scales, {report.iterations} Newton iterations, function change "
          f"{report.function_change:.1e} (float32) / {report.function_change_float64:.1e} "
          "(float64)")
    print("| what | median s | min s | max s | x forward+backward |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {medians[name]:.3f} | {min(values):.3f} | {max(values):.3f} | "
              f"{medians[name] / base:.1f} |")
    ratio = medians["balance_"] / base
    # Each round's own ratio (its balance_ over its forward+backward, measured seconds
    # apart): slow drifts of the machine's load cancel within a round.
    def per_round_ratio(name: str) -> float:
        return statistics.median(b / f for b, f in zip(times[name], times["forward+backward"],
                                                       strict=True))

    per_round = per_round_ratio("balance_")
    print(f"median of the per-round ratios: {per_round:.1f}x (with the check), "
          f"{per_round_ratio('balance_ (no check)'):.1f}x (without)")
    print(f"goal: balance_ with the check <= {GOAL_RATIO:g}x forward+backward: "
          f"{'met' if ratio <= GOAL_RATIO else 'NOT met'} ({ratio:.1f}x, ratio of the "
          "medians)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"n_params": n_params, "threads": args.threads, "rounds": args.rounds,
                       "seconds": times, "medians": medians,
                       "ratio_balance_with_check": ratio,
                       "median_per_round_ratio_with_check": per_round,
                       "ratio_balance_without_check": medians["balance_ (no check)"] / base},
                      handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
