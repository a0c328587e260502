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
import scipy.sparse as sp

from . import kernels
from .components import unit_components
from .errors import InvalidInputError, NonConvergenceError
from .graph import Block, CostGraph


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
    sweeps: int = 0  # exact layer sweeps run before or between Newton steps


def gauge_components(graph: CostGraph) -> list[np.ndarray]:
    """Sets of free c = 1 units with no path to a visible unit (R is flat along their sum)."""
    touches_visible = (graph.visible_in.sum(0) > 0) | (graph.visible_out.sum(0) > 0) | graph.dead
    if touches_visible.all():
        # The common case (every unit has a bias or an input/output edge): nothing floats.
        return []
    labels = unit_components(graph)
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
    labels = unit_components(graph)
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


class _Float32Overflow(ArithmeticError):
    """A float32 Hessian product left the float32 range; the step is redone in float64."""


# float32 spans about [1.2e-38, 3.4e38]; each factor of a float32 product is kept inside
# [1e-30, 1e30] so that sums over thousands of terms keep a margin both ways.
_FLOAT32_LOG_LIMIT = float(np.log(1e30))
# Layer sweeps used to bring a stalled Newton iteration into its region of fast convergence.
_RESCUE_SWEEPS = 20_000
_RESCUE_TARGET = 1e-3
# Far from the optimum (a unit's costs in and out differ by more than e^8) Newton on sums of
# exponentials moves u by about 1/p per step; a few exact sweeps cover any distance at once.
_FAR = 8.0
_FAR_SWEEPS = 50
# Balanced scales of ordinary networks stay within e^(+-10 / p); beyond that the solver checks
# that a minimiser exists at all (the check costs about one pass over the edges).
_FAR_SCALE = 10.0


def check_costs_finite(graph: CostGraph) -> None:
    """Refuse a cost graph whose costs |w|^p overflowed float64 while it was built."""
    for t, p in enumerate(graph.powers):
        for name, values in (("incoming", graph.visible_in[t]), ("outgoing", graph.visible_out[t])):
            bad = ~np.isfinite(values)
            if bad.any():
                group = graph.group_names[graph.group_of(int(np.argmax(bad)))]
                raise InvalidInputError(
                    "p", f"the {name} costs |w|^p of hidden group {group!r} overflow float64 at "
                    f"p = {p:g} (|w|^p exceeds 1.8e308 once |w| > {_largest_weight(p):.3g}); "
                    "use a smaller p or rescale the weights")
        for st in [*graph.stacks, *graph.sparse_blocks]:
            if not np.all(np.isfinite(_cost_values(st.costs[t]))):
                group = graph.group_names[graph.group_of(_dst_start(st))]
                raise InvalidInputError(
                    "p", f"the costs |w|^p of the weights into hidden group {group!r} overflow "
                    f"float64 at p = {p:g} (|w|^p exceeds 1.8e308 once |w| > "
                    f"{_largest_weight(p):.3g}); use a smaller p or rescale the weights")
    if not np.isfinite(graph.constant_cost):
        raise InvalidInputError(
            "p", "the costs |w|^p of the weights between visible units (e.g. output biases) "
            f"overflow float64 at p = {float(np.max(graph.powers)):g}; use a smaller p or "
            "rescale the weights")


def _cost_values(costs: np.ndarray) -> np.ndarray:
    """The stored cost values of a dense array or a CSR matrix."""
    return costs.data if sp.issparse(costs) else costs


def _dst_start(block: object) -> int:
    return block.dst[0] if isinstance(block, Block) else block.dst_start


def _largest_weight(p: float) -> float:
    return float(np.exp(np.log(np.finfo(np.float64).max) / p))


def _cost_range(graph: CostGraph) -> tuple[float, float]:
    """Largest and smallest nonzero hidden-to-hidden cost (1.0 for a missing bound)."""
    largest, smallest = 0.0, np.inf
    for st in [*graph.stacks, *graph.sparse_blocks]:
        for k in st.costs:
            values = _cost_values(k)
            nonzero = values[values > 0]
            if nonzero.size:
                largest = max(largest, float(nonzero.max()))
                smallest = min(smallest, float(nonzero.min()))
    return (largest or 1.0), (smallest if np.isfinite(smallest) else 1.0)


def _float32_is_safe(graph: CostGraph, log_scales: np.ndarray,
                     cost_range: tuple[float, float]) -> bool:
    """True when float32 Hessian products can neither overflow nor flush terms to zero.

    A product multiplies a cost by ``c exp(-p c u_j)`` or ``exp(p u_i)`` and by a vector
    scaled to max 1; the largest and smallest such factor must stay inside [1e-30, 1e30].
    """
    if log_scales.size == 0:
        return True
    c_max = max(1.0, float(np.max(graph.degrees)))
    exponent = (float(np.max(graph.powers)) * c_max * float(np.max(np.abs(log_scales)))
                + np.log(c_max))
    largest, smallest = cost_range
    return bool(np.log(largest) + exponent <= _FLOAT32_LOG_LIMIT
                and np.log(smallest) - exponent >= -_FLOAT32_LOG_LIMIT)


def _newton_direction(graph: CostGraph, u: np.ndarray, flows: tuple[np.ndarray, np.ndarray],
                      grad: np.ndarray, rtol: float, costs32: tuple | None,
                      components: list[np.ndarray], group_of: np.ndarray
                      ) -> tuple[np.ndarray, int]:
    """Approximate ``-H^{-1} g`` by preconditioned CG; float32 products when ``costs32``."""
    free = graph.free
    with np.errstate(over="ignore", invalid="ignore"):
        diag = kernels.hessian_diagonal(graph, u, flows)
        coarse = kernels.group_coupling(graph, u, flows)
    # Where exp(p u) leaves float64 the preconditioner degrades to what is still finite;
    # a poor direction then fails the line search and the sweeps take over.
    diag = np.where(np.isfinite(diag) & (diag > 0), diag, 1.0)
    coarse_inverse = np.linalg.pinv(coarse) if np.all(np.isfinite(coarse)) \
        else np.zeros_like(coarse)

    def apply_h(v: np.ndarray) -> np.ndarray:
        # H is linear: scaling v to max 1 keeps float32 products away from underflow as the
        # CG residuals shrink, and the scale is restored in float64.
        size = float(np.max(np.abs(v), initial=0.0))
        if size == 0.0 or not np.isfinite(size):
            return np.zeros_like(v) if size == 0.0 else np.full_like(v, np.nan)
        product = kernels.hessian_vector_product(graph, u, v / size, flows, costs32) * size
        if costs32 is not None and not np.all(np.isfinite(product)):
            raise _Float32Overflow
        return product

    def precondition(r: np.ndarray) -> np.ndarray:
        r = np.where(free, r, 0.0)
        coarse_r = np.bincount(group_of, weights=r, minlength=coarse_inverse.shape[0])
        correction = (coarse_inverse @ coarse_r)[group_of]
        return np.where(free, r / diag + correction, 0.0)

    with np.errstate(over="ignore", invalid="ignore"):
        direction, inner = _pcg(apply_h, -grad, precondition, rtol, 500, components)
    if not np.all(np.isfinite(direction)) or not grad @ direction < 0:
        # CG lost positive curvature to rounding: fall back to the preconditioned gradient,
        # a descent direction whenever the (positive) preconditioner is.
        direction = project_gauge(-precondition(grad), components)
    return direction, inner


def solve_optimum(
    graph: CostGraph,
    tol: float = 1e-12,
    max_iterations: int = 100,
    initial: np.ndarray | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> Certificate:
    """Minimise R(u) to ``max_k |log(A_k / (c_k B_k))| <= tol``; raise if that fails.

    Starts from u = 0 (or ``initial``). Dead units stay at 0. Newton steps use float32
    Hessian products only while every factor fits float32 with a wide margin, float64
    otherwise. If Newton stalls (a line search that cannot decrease R, or the iteration cap),
    exact layer sweeps bring u close to the optimum and Newton resumes from there, so the
    solver succeeds wherever plain sweeps (``method='full'``) do.
    """
    start = time.perf_counter()
    check_costs_finite(graph)
    n = graph.n_units
    u = np.zeros(n) if initial is None else np.array(initial, dtype=np.float64)
    u[graph.dead] = 0.0
    components = gauge_components(graph)
    u = project_gauge(u, components)
    sweeps = 0
    if kernels.max_log_imbalance(graph, u) > _FAR:
        u, sweeps = _sweeps(graph, u, _FAR, _FAR_SWEEPS)
    group_of = np.zeros(n, dtype=np.intp)
    for g, (s0, s1) in enumerate(graph.group_ranges):
        group_of[s0:s1] = g
    inner_total = 0
    cost_range = _cost_range(graph)
    costs32: tuple | None = None  # made on first use: most extreme inputs never need it
    float64_only = False
    rescued = False
    flows = kernels.unit_flows(graph, u)
    cost = kernels.total_cost(graph, u, flows)
    imbalance = kernels.max_log_imbalance(graph, u, flows)
    grad = kernels.gradient(graph, u, flows)
    scale = np.linalg.norm(kernels.weighted_flows(graph, flows)[0]) or 1.0
    iteration = 0
    budget = max_iterations
    # ``not <=`` so that a NaN imbalance keeps iterating (and ends in an error), never passes.
    while not imbalance <= tol:
        stalled = iteration >= budget
        if not stalled:
            iteration += 1
            use32 = not float64_only and _float32_is_safe(graph, u, cost_range)
            if use32 and costs32 is None:
                costs32 = kernels.single_precision_costs(graph)
            # Inexact Newton: a loose linear solve far away, a tight one near the optimum.
            rtol = min(0.1, max(1e-12, np.sqrt(np.linalg.norm(grad) / scale)))
            try:
                direction, inner = _newton_direction(
                    graph, u, flows, grad, rtol, costs32 if use32 else None, components,
                    group_of)
            except _Float32Overflow:
                float64_only = True
                continue
            inner_total += inner
            accepted = _line_search(graph, u, direction, grad, cost, imbalance)
            if accepted is None and use32:
                float64_only = True
                continue
            stalled = accepted is None
        if stalled:
            if rescued or not np.isfinite(cost):
                check_bounded(graph)
                raise NonConvergenceError("exact", iteration, imbalance, tol)
            rescued, float64_only = True, True
            u, more = _sweeps(graph, u, max(tol, _RESCUE_TARGET), _RESCUE_SWEEPS)
            sweeps += more
            budget = iteration + max_iterations
            flows = kernels.unit_flows(graph, u)
            cost = kernels.total_cost(graph, u, flows)
            imbalance = kernels.max_log_imbalance(graph, u, flows)
            grad = kernels.gradient(graph, u, flows)
            continue
        trial, flows, cost, imbalance = accepted
        # Rounding drifts u along a flat gauge direction; R and the flows do not see it.
        u = project_gauge(trial, components)
        grad = kernels.gradient(graph, u, flows)
        if progress is not None:
            progress(iteration, imbalance)
    if u.size and float(np.max(graph.powers)) * float(np.max(np.abs(u))) > _FAR_SCALE:
        # An unbounded R (units reaching visible units on one side only) also ends here, once
        # the one-sided costs fade below the tolerance; only far-moved scales need the check.
        check_bounded(graph)
    relative_gradient = float(np.linalg.norm(grad) / scale)
    return Certificate(
        log_scales=u, cost=cost, max_log_imbalance=imbalance,
        relative_gradient_norm=relative_gradient, iterations=iteration,
        inner_iterations=inner_total, seconds=time.perf_counter() - start,
        gauge_components=tuple(tuple(int(i) for i in m) for m in components),
        dead_units=tuple(int(i) for i in np.nonzero(graph.dead)[0]), sweeps=sweeps)


def _line_search(graph: CostGraph, u: np.ndarray, direction: np.ndarray, grad: np.ndarray,
                 cost: float, imbalance: float) -> tuple | None:
    """Backtrack from the full step; ``(u, flows, cost, imbalance)`` or None if none helps."""
    step = 1.0
    slope = grad @ direction
    while step >= 1e-10:
        trial = u + step * direction
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            flows = kernels.unit_flows(graph, trial)
            trial_cost = kernels.total_cost(graph, trial, flows)
            trial_imbalance = kernels.max_log_imbalance(graph, trial, flows)
        # Near the optimum R changes below rounding; then accept on the imbalance.
        if np.isfinite(trial_cost) and (
                trial_cost <= cost + 1e-4 * step * slope
                or (trial_imbalance < imbalance and trial_cost <= cost * (1 + 1e-14))):
            return trial, flows, trial_cost, trial_imbalance
        step *= 0.5
    return None


def _sweeps(graph: CostGraph, u: np.ndarray, target: float, cap: int
            ) -> tuple[np.ndarray, int]:
    """Exact layer sweeps until the max log-imbalance is <= ``target`` (at most ``cap``).

    Each sweep balances every unit given its neighbours, whatever the magnitudes, so it makes
    progress where Newton's quadratic model is poor (costs spanning hundreds of decades).
    """
    from .schedules import layer_sweep  # schedules builds on this module

    done = 0
    with np.errstate(over="ignore", under="ignore"):
        while done < cap and not kernels.max_log_imbalance(graph, u) <= target:
            u = layer_sweep(graph, u)
            done += 1
    return project_gauge(u, gauge_components(graph)), done
