"""The unique balanced state: the minimiser of the convex cost R(u), by Newton's method.

Each Newton step solves ``H d = -g`` by conjugate gradients with matrix-free Hessian products
(two matrix-vector products per block) and a two-level preconditioner: Jacobi plus an exact
correction on the span of the per-group indicator vectors (the "tied" directions). The
coarse part removes the slow depth-wise modes that make plain layer sweeps need thousands of
iterations on deep narrow networks. A backtracking line search keeps R decreasing.

Gauge: a connected set of c = 1 hidden units with no edge to a visible unit can be shifted
by a common constant without changing R. Such sets are fixed by making their mean log-scale
zero, and are listed in the certificate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from . import kernels
from .errors import InvalidInputError, NonConvergenceError
from .graph import CostGraph


@dataclass(frozen=True)
class Certificate:
    """Evidence that ``log_scales`` is the balanced optimum."""

    log_scales: np.ndarray
    cost: float
    max_log_imbalance: float
    relative_gradient_norm: float
    iterations: int
    inner_iterations: int
    seconds: float
    gauge_components: tuple[tuple[int, ...], ...] = field(default=())
    dead_units: tuple[int, ...] = field(default=())


def gauge_components(graph: CostGraph) -> list[np.ndarray]:
    """Sets of free c = 1 units with no path to a visible unit (R is flat along their sum)."""
    touches_visible = (graph.visible_in.sum(0) > 0) | (graph.visible_out.sum(0) > 0) | graph.dead
    if touches_visible.all():
        # The common case (every unit has a bias or an input/output edge): nothing floats.
        return []
    labels = _unit_components(graph)
    anchored = np.unique(labels[touches_visible])
    floating = []
    for label in np.setdiff1d(np.unique(labels), anchored):
        members = np.nonzero(labels == label)[0]
        if np.all(graph.degrees[members] == 1.0):
            floating.append(members)
    return floating


def check_bounded(graph: CostGraph) -> None:
    """Raise if some connected set of c = 1 units reaches visible units on one side only.

    Shrinking (or growing) such a set together lowers R forever, so no balanced state exists:
    e.g. a recurrent net with input weights or biases but no output weights.
    """
    labels = _unit_components(graph)
    into_visible = graph.visible_out.sum(0) > 0
    from_visible = graph.visible_in.sum(0) > 0
    for label in np.unique(labels):
        members = np.nonzero((labels == label) & graph.free)[0]
        if members.size == 0 or np.any(graph.degrees[members] != 1.0):
            continue
        has_in, has_out = from_visible[members].any(), into_visible[members].any()
        if has_in != has_out:
            side = "an output (no outgoing weights to visible units, e.g. W_out)" if has_in \
                else "an input or bias (no incoming weights from visible units, e.g. W_in or b)"
            groups = sorted({graph.group_names[graph.group_of(int(k))] for k in members})
            raise InvalidInputError(
                "network", f"hidden units {members[:8].tolist()}{'...' if members.size > 8 else ''}"
                f" of group(s) {groups} have no path to {side}: R has no minimiser, so no "
                "balanced state exists")


def _unit_components(graph: CostGraph) -> np.ndarray:
    """Connected-component label of every hidden unit over nonzero hidden-to-hidden edges."""
    n = graph.n_units
    rows, cols = [np.arange(n)], [np.arange(n)]
    for b in graph.blocks:
        i, j = np.nonzero(sum(b.costs))
        rows.append(i + b.dst[0])
        cols.append(j + b.src[0])
    r, c = np.concatenate(rows), np.concatenate(cols)
    adjacency = coo_matrix((np.ones(r.shape[0]), (r, c)), shape=(n, n))
    return connected_components(adjacency, directed=False)[1]


def project_gauge(vector: np.ndarray, components: list[np.ndarray]) -> np.ndarray:
    """Subtract each gauge component's mean (in place); R and the function are unchanged."""
    for members in components:
        vector[members] -= vector[members].mean()
    return vector


def _pcg(apply_h: Callable[[np.ndarray], np.ndarray], rhs: np.ndarray,
         precondition: Callable[[np.ndarray], np.ndarray], rtol: float, max_iter: int,
         components: list[np.ndarray]) -> tuple[np.ndarray, int]:
    x = np.zeros_like(rhs)
    r = rhs.copy()
    z = project_gauge(precondition(r), components)
    d = z.copy()
    rz = r @ z
    target = rtol * np.linalg.norm(rhs)
    for it in range(1, max_iter + 1):
        hd = apply_h(d)
        curvature = d @ hd
        if curvature <= 0:
            return x, it
        step = rz / curvature
        x += step * d
        r -= step * hd
        if np.linalg.norm(r) <= target:
            return x, it
        z = project_gauge(precondition(r), components)
        rz_new = r @ z
        d = z + (rz_new / rz) * d
        rz = rz_new
    return x, max_iter


def solve_optimum(
    graph: CostGraph,
    tol: float = 1e-12,
    max_iterations: int = 100,
    initial: np.ndarray | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> Certificate:
    """Minimise R(u) to ``max_k |log(A_k / (c_k B_k))| <= tol``; raise if that fails.

    Starts from u = 0 (or ``initial``). Dead units stay at 0.
    """
    start = time.perf_counter()
    n = graph.n_units
    u = np.zeros(n) if initial is None else np.array(initial, dtype=np.float64)
    u[graph.dead] = 0.0
    components = gauge_components(graph)
    u = project_gauge(u, components)
    group_of = np.zeros(n, dtype=np.intp)
    for g, (s0, s1) in enumerate(graph.group_ranges):
        group_of[s0:s1] = g
    free = graph.free
    inner_total = 0
    costs32 = kernels.single_precision_costs(graph)
    flows = kernels.unit_flows(graph, u)
    cost = kernels.total_cost(graph, u, flows)
    imbalance = kernels.max_log_imbalance(graph, u, flows)
    grad = kernels.gradient(graph, u, flows)
    scale = np.linalg.norm(kernels.weighted_flows(graph, flows)[0]) or 1.0
    iteration = 0
    while imbalance > tol:
        if iteration >= max_iterations:
            check_bounded(graph)
            raise NonConvergenceError("exact", iteration, imbalance, tol)
        iteration += 1
        diag = kernels.hessian_diagonal(graph, u, flows)
        coarse = kernels.group_coupling(graph, u, flows)
        coarse_inverse = np.linalg.pinv(coarse)
        snapshot_u, snapshot_flows = u, flows

        def apply_h(v: np.ndarray, _u: np.ndarray = snapshot_u,
                    _f: tuple = snapshot_flows) -> np.ndarray:
            return kernels.hessian_vector_product(graph, _u, v, _f, costs32)

        def precondition(r: np.ndarray, _diag: np.ndarray = diag,
                         _coarse_inv: np.ndarray = coarse_inverse) -> np.ndarray:
            r = np.where(free, r, 0.0)
            coarse_r = np.bincount(group_of, weights=r, minlength=_coarse_inv.shape[0])
            correction = (_coarse_inv @ coarse_r)[group_of]
            return np.where(free, r / _diag + correction, 0.0)

        # Inexact Newton: a loose linear solve far away, a tight one near the optimum.
        rtol = min(0.1, max(1e-12, np.sqrt(np.linalg.norm(grad) / scale)))
        direction, inner = _pcg(apply_h, -grad, precondition, rtol, 500, components)
        inner_total += inner
        step = 1.0
        slope = grad @ direction
        while True:
            trial = u + step * direction
            trial_flows = kernels.unit_flows(graph, trial)
            trial_cost = kernels.total_cost(graph, trial, trial_flows)
            trial_imbalance = kernels.max_log_imbalance(graph, trial, trial_flows)
            # Near the optimum R changes below rounding; then accept on the imbalance.
            if (trial_cost <= cost + 1e-4 * step * slope
                    or (trial_imbalance < imbalance and trial_cost <= cost * (1 + 1e-14))):
                break
            step *= 0.5
            if step < 1e-10:
                check_bounded(graph)
                raise NonConvergenceError("exact", iteration, imbalance, tol)
        # Rounding drifts u along a flat gauge direction; R and the flows do not see it.
        u = project_gauge(trial, components)
        flows, cost, imbalance = trial_flows, trial_cost, trial_imbalance
        grad = kernels.gradient(graph, u, flows)
        if progress is not None:
            progress(iteration, imbalance)
    relative_gradient = float(np.linalg.norm(grad) / scale)
    return Certificate(
        log_scales=u, cost=cost, max_log_imbalance=imbalance,
        relative_gradient_norm=relative_gradient, iterations=iteration,
        inner_iterations=inner_total, seconds=time.perf_counter() - start,
        gauge_components=tuple(tuple(int(i) for i in m) for m in components),
        dead_units=tuple(int(i) for i in np.nonzero(graph.dead)[0]))
