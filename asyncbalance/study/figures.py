"""Accuracy (or monitor) curves of a cell's arms, mean with a band of one sample sd; and the
paired gap between two arms against epoch with its 95 % interval."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..io import atomic_write
from .cells import Cell, curve, mean_curve
from .stats import t_interval


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




def gap_curves(cell: Cell, arm: str, against: str, key: str = "test_accuracy"
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean paired gap (arm − against) and its 95 % t interval per recorded epoch,
    over the seeds both arms have (curves cut to the shortest)."""
    seeds = sorted(set(cell.runs.get(arm, {})) & set(cell.runs.get(against, {})))
    rows = []
    epochs = None
    for seed in seeds:
        ea, va = curve(cell.runs[arm][seed], key)
        eb, vb = curve(cell.runs[against][seed], key)
        n = min(len(va), len(vb))
        if n == 0:
            continue
        epochs = ea[:n] if epochs is None or len(ea[:n]) < len(epochs) else epochs
        rows.append([np.nan if x is None or y is None else x - y
                     for x, y in zip(va[:n], vb[:n], strict=True)])
    if len(rows) < 2 or epochs is None:
        return np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0)
    n = min(len(r) for r in rows)
    d = np.array([r[:n] for r in rows], dtype=float)
    low, high, mean = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    for i in range(n):
        column = d[:, i][np.isfinite(d[:, i])]
        if column.size >= 2:
            iv = t_interval(column)
            mean[i], low[i], high[i] = iv.mean, iv.low, iv.high
    return np.asarray(epochs[:n], dtype=float), mean, low, high


def gap_figure(cell: Cell, pairs: Sequence[tuple[str, str]], title: str, path: Path,
               scale: float = 100.0) -> bool:
    """The paired gap of each pair against epoch with its 95 % t interval as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=80)
    drawn = False
    for arm, against in pairs:
        e, m, low, high = gap_curves(cell, arm, against)
        if e.size == 0 or not np.isfinite(m).any():
            continue
        ax.plot(e, scale * m, label=f"{arm} − {against}", lw=1.3)
        ax.fill_between(e, scale * low, scale * high, alpha=0.2)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("paired gap (points)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)
    return True
