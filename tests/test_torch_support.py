"""Models and helpers shared by the ``balance_`` tests on torch models. Nothing here is a test.

Every model is defined here with torch alone, made clearly unbalanced (layer gains spread
over a factor e^3, BatchNorm statistics and affine parameters drawn away from their
defaults) and put in eval mode.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from asyncbalance.training.models import EncoderBlock


def unbalance_(model: nn.Module, seed: int, spread: float = 1.5) -> nn.Module:
    """Scale every weighted layer by exp(U(-spread, spread)); randomise BatchNorm state."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                module.weight.mul_(float(np.exp(rng.uniform(-spread, spread))))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.from_numpy(rng.uniform(-1, 1, n)))
                module.running_var.copy_(torch.from_numpy(rng.uniform(0.3, 3.0, n)))
                module.weight.copy_(torch.from_numpy(rng.uniform(0.3, 2.0, n)))
                module.bias.copy_(torch.from_numpy(rng.uniform(-1, 1, n)))
    return model.eval()


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus the shortcut, then ReLU. A stride or a
    change of width uses a 1x1 conv + BN shortcut, otherwise the identity."""

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
    """Stem conv-BN-ReLU, blocks of widths ``widths`` (the first identity, then downsampling
    ones), global average pool, Linear head."""

    def __init__(self, widths: tuple[int, ...] = (6, 6, 10), n_out: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks = [BasicBlock(widths[0], widths[1])]
        blocks += [BasicBlock(a, b, 2) for a, b in zip(widths[1:-1], widths[2:], strict=True)]
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        return self.head(torch.flatten(self.pool(self.blocks(x)), 1))


def vgg() -> nn.Sequential:
    """conv-BN-ReLU-conv-ReLU-maxpool, conv-ReLU-maxpool, flatten, dropout, Linear-ReLU,
    dropout, Linear (input 3 x 8 x 8)."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 2 * 2, 12), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(12, 4))


class EncoderClassifier(nn.Module):
    """Linear embedding of the tokens, one post-norm encoder layer with a ReLU feed-forward
    part (attention, LayerNorm), mean over tokens, Linear head."""

    def __init__(self, features: int = 5, d_model: int = 8, d_ff: int = 12,
                 n_out: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(features, d_model)
        self.block = EncoderBlock(d_model, 2, d_ff, "relu")
        self.head = nn.Linear(d_model, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)).mean(dim=1))


def tanh_middle() -> nn.Sequential:
    """Linear-ReLU-Linear-Tanh-Linear-LeakyReLU-Linear: the units of the second Linear meet
    tanh; the others are free."""
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.Tanh(),
                         nn.Linear(6, 8), nn.LeakyReLU(0.2), nn.Linear(8, 3))


class TinyUNet(nn.Module):
    """Encoder conv, pooled conv, upsampled and concatenated with the encoder features
    (skip connection by concatenation), conv, 1x1 conv head."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(2, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.Conv2d(10, 5, 3, padding=1)
        self.head = nn.Conv2d(5, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.relu(self.enc(x))
        d = torch.relu(self.down(self.pool(e)))
        h = torch.relu(self.dec(torch.cat([self.up(d), e], dim=1)))
        return self.head(h)


class LinearResidual(nn.Module):
    """stem Linear-ReLU, one block ``s + L2(relu(L1 s))`` then ReLU, Linear head."""

    def __init__(self, n_in: int = 4, width: int = 6, hidden: int = 8, n_out: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(n_in, width)
        self.l1 = nn.Linear(width, hidden)
        self.l2 = nn.Linear(hidden, width)
        self.head = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        s = torch.relu(s + self.l2(torch.relu(self.l1(s))))
        return self.head(s)


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float64
          ) -> tuple[nn.Module, torch.Tensor]:
    """Model ``name``, unbalanced and in eval mode, with a seeded probe batch."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 100)
    models = {"resnet": (ResNet, (4, 3, 8, 8)), "vgg": (vgg, (4, 3, 8, 8)),
              "encoder": (EncoderClassifier, (4, 6, 5)), "tanh": (tanh_middle, (4, 5)),
              "unet": (TinyUNet, (2, 2, 8, 8)), "residual": (LinearResidual, (6, 4))}
    make, shape = models[name]
    model = unbalance_(make().to(torch.float64), seed).to(dtype)
    return model, torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def outputs(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).detach().to(torch.float64).cpu().numpy()


def param_cost(model: nn.Module, p: float) -> float:
    """``sum |w|**p`` over every parameter, from the stored values."""
    return float(sum(float(t.detach().double().abs().pow(p).sum())
                     for t in model.parameters()))


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
