"""Accuracy (or monitor) curves of a cell's arms, mean with a band of one sample sd."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..io import atomic_write
from .cells import Cell, mean_curve


def cell_figure(cell: Cell, arms: Sequence[str], title: str, path: Path,
            key: str = "test_accuracy", ylabel: str = "test accuracy (%)",
            scale: float = 100.0, log: bool = False) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=80)
    drawn = False
    for arm in arms:
        runs = cell.runs.get(arm, {})
        if not runs:
            continue
        e, m, sd = mean_curve(runs, key)
        if e.size == 0 or not np.isfinite(m).any():
            continue
        ax.plot(e, scale * m, label=f"{arm} (n={len(runs)})", lw=1.4)
        ax.fill_between(e, scale * (m - sd), scale * (m + sd), alpha=0.2)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)
    return True


