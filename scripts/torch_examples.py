"""Print the example tables of docs/torch.md: ``balance_`` on a ResNet-style net, a small VGG
and a transformer encoder layer, in float64 and float32.

    .venv/bin/python scripts/torch_examples.py > /tmp/torch_examples.md
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from asyncbalance.torch_bridge import balance_


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
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


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, stride=2), BasicBlock(32, 32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def small_vgg() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.5), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(64, 10))


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer with a ReLU feed-forward part."""

    def __init__(self, d_model: int = 32, heads: int = 4, d_ff: int = 64) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.ff_in = nn.Linear(d_model, d_ff)
        self.ff_out = nn.Linear(d_ff, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attn(x, x, x, need_weights=False)
        x = self.norm1(x + attended)
        return self.norm2(x + self.ff_out(torch.relu(self.ff_in(x))))


def trained_looking(model: nn.Module, seed: int) -> nn.Module:
    """Layer gains spread over e^+-1 and non-default BatchNorm statistics, as after training."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.mul_(float(np.exp(rng.uniform(-1, 1))))
            elif isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.from_numpy(rng.normal(0, 0.5, n)))
                module.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, n)))
                module.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, n)))
                module.bias.copy_(torch.from_numpy(rng.normal(0, 0.2, n)))
    return model.eval()


def section(title: str, model: nn.Module, example: torch.Tensor) -> None:
    model64 = copy.deepcopy(model).double()
    report = balance_(model64, p=2.0, example=example.double())
    report32 = balance_(model, p=2.0, example=example)
    print(f"### {title}\n")
    print(f"{report.n_units} of {report.n_units_found} units balanced "
          f"({report.n_scales} log-scales in {len(report.groups)} "
          f"group{'s' * (len(report.groups) != 1)}).\n")
    print("| group | units | tied with | log-scales (min, max) |")
    print("|---|---|---|---|")
    for group in report.groups:
        u = report.log_scales[group.name]
        tied = ", ".join(group.modules[1:]) or "-"
        print(f"| `{group.name}` | {group.size} | {tied} | {u.min():+.3f}, {u.max():+.3f} |")
    if report.boundaries:
        print("\nNot balanced:\n")
        print("| where | op | reason | units |")
        print("|---|---|---|---|")
        for b in report.boundaries:
            print(f"| `{b.path}` | {b.op} | {b.reason} | {b.n_units} |")
    print(f"\n- cost `sum w^2` of the rescaled parameters: {report.cost_before:.4f} -> "
          f"{report.cost_after:.4f}; of all parameters: {report.model_cost_before:.4f} -> "
          f"{report.model_cost_after:.4f}")
    print(f"- function change on the probe batch: {report.function_change_float64:.1e} "
          f"(float64 model); {report32.function_change:.1e} (float32 model; its float64 "
          f"account: {report32.function_change_float64:.1e})")
    print(f"- solve: {report.iterations} Newton iterations, max log-imbalance "
          f"{report.max_log_imbalance:.1e}, {report.seconds:.2f} s\n")


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    section("ResNet-style network (two stages of basic blocks, eval-mode BatchNorm)",
            trained_looking(ResNet(), 1), torch.randn(8, 3, 16, 16, generator=generator))
    torch.manual_seed(0)
    section("Small VGG (conv-BN-ReLU, max-pool, dropout, two Linear layers)",
            trained_looking(small_vgg(), 2), torch.randn(8, 3, 32, 32, generator=generator))
    torch.manual_seed(0)
    section("Transformer encoder layer (ReLU feed-forward part)",
            trained_looking(EncoderLayer(), 3), torch.randn(8, 10, 32, generator=generator))


if __name__ == "__main__":
    main()
