"""Pure array kernels of balancing: flows, cost, imbalance, local moves, Hessian products.

Notation (DESIGN §1): log-scales ``u`` (one per hidden unit), degrees ``c``, term powers ``p``.
For term t the edge j -> i costs ``K_ij * exp(p (u_i - c_j u_j))``. ``incoming[t, k]`` (A_k)
sums the costs of the edges into k, ``outgoing[t, k]`` (B_k) those out of k. Self-loops are in
both. The gradient of the total cost is ``sum_t coef_t p_t (A_t - c B_t)``.

A dense graph's costs are stacked arrays (batched matrix products); a sparse graph's are CSR
blocks (``graph.sparse_blocks``), each taking two sparse matrix-vector products per pass.
"""

from __future__ import annotations

import numpy as np

from .graph import CostGraph


def _exp_pair(graph: CostGraph, log_scales: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    p = graph.powers[t]
    return np.exp(p * log_scales), np.exp(-p * graph.degrees * log_scales)


def _stack_forward(stack, k: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``K_i @ x_i`` for every block i of a stack, flattened onto the dst range."""
    xs = x[stack.src_start:stack.src_stop].reshape(stack.count, stack.n_src, 1)
    return np.matmul(k, xs).reshape(-1)


def _stack_backward(stack, k: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``y_i @ K_i`` for every block i of a stack, flattened onto the src range."""
    ys = y[stack.dst_start:stack.dst_stop].reshape(stack.count, 1, stack.n_dst)
    return np.matmul(ys, k).reshape(-1)


def unit_flows(graph: CostGraph, log_scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(incoming, outgoing)``, each (T, H): A_k and B_k per regulariser term.

    Each block costs two matrix-vector products: ``exp(p u_i) * (K @ exp(-p c u))_i`` and its
    transpose, so no (n_dst x n_src) temporary is formed.
    """
    incoming = np.empty_like(graph.visible_in)
    outgoing = np.empty_like(graph.visible_out)
    for t in range(graph.n_terms):
        up, down = _exp_pair(graph, log_scales, t)
        into = graph.visible_in[t].copy()
        out = graph.visible_out[t].copy()
        for st in graph.stacks:
            k = st.costs[t]
            into[st.dst_start:st.dst_stop] += _stack_forward(st, k, down)
            out[st.src_start:st.src_stop] += _stack_backward(st, k, up)
        for b in graph.sparse_blocks:
            k = b.costs[t]
            into[b.dst[0]:b.dst[1]] += k @ down[b.src[0]:b.src[1]]
            out[b.src[0]:b.src[1]] += k.T @ up[b.dst[0]:b.dst[1]]
        incoming[t] = up * into
        outgoing[t] = down * out
    return incoming, outgoing


def unit_flows_range(graph: CostGraph, log_scales: np.ndarray, start: int, stop: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Like ``unit_flows`` but computed only for units ``start <= k < stop`` (zero elsewhere).

    A shard needs the flows of its own units only; this skips the rows and columns of the
    others, about half the matrix-vector work when the rest is a halo of neighbours.
    """
    incoming = np.zeros_like(graph.visible_in)
    outgoing = np.zeros_like(graph.visible_out)
    for t in range(graph.n_terms):
        up, down = _exp_pair(graph, log_scales, t)
        into = graph.visible_in[t, start:stop].copy()
        out = graph.visible_out[t, start:stop].copy()
        for b in graph.blocks:
            k = b.costs[t]
            lo, hi = max(b.dst[0], start), min(b.dst[1], stop)
            if lo < hi:
                into[lo - start:hi - start] += k[lo - b.dst[0]:hi - b.dst[0]] @ \
                    down[b.src[0]:b.src[1]]
            lo, hi = max(b.src[0], start), min(b.src[1], stop)
            if lo < hi and graph.sparse:
                out[lo - start:hi - start] += k[:, lo - b.src[0]:hi - b.src[0]].T @ \
                    up[b.dst[0]:b.dst[1]]
            elif lo < hi:
                out[lo - start:hi - start] += up[b.dst[0]:b.dst[1]] @ \
                    k[:, lo - b.src[0]:hi - b.src[0]]
        incoming[t, start:stop] = up[start:stop] * into
        outgoing[t, start:stop] = down[start:stop] * out
    return incoming, outgoing


def total_cost(graph: CostGraph, log_scales: np.ndarray,
               flows: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """The regulariser R(u) summed over every weight and bias, constant edges included."""
    incoming, _ = unit_flows(graph, log_scales) if flows is None else flows
    cost = graph.constant_cost
    for t in range(graph.n_terms):
        _, down = _exp_pair(graph, log_scales, t)
        # Every edge ends either at a hidden unit (counted in A) or at an output (here).
        cost += graph.coefs[t] * (incoming[t].sum() + (down * graph.visible_out[t]).sum())
    return float(cost)


def weighted_flows(graph: CostGraph, flows: tuple[np.ndarray, np.ndarray]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(sum_t coef p A_t, c * sum_t coef p B_t)``: the two sides of the balance condition."""
    incoming, outgoing = flows
    weight = (graph.coefs * graph.powers)[:, None]
    return (weight * incoming).sum(axis=0), graph.degrees * (weight * outgoing).sum(axis=0)


def gradient(graph: CostGraph, log_scales: np.ndarray,
             flows: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """dR/du; zero at dead units, which are never moved."""
    flows = unit_flows(graph, log_scales) if flows is None else flows
    into, out = weighted_flows(graph, flows)
    return np.where(graph.dead, 0.0, into - out)


def log_imbalance(graph: CostGraph, log_scales: np.ndarray,
                  flows: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``log(A_k / (c_k B_k))`` per unit (weighted over terms); 0 at dead units."""
    flows = unit_flows(graph, log_scales) if flows is None else flows
    into, out = weighted_flows(graph, flows)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log(into) - np.log(out)
    return np.where(graph.dead, 0.0, ratio)


def max_log_imbalance(graph: CostGraph, log_scales: np.ndarray,
                      flows: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    values = np.abs(log_imbalance(graph, log_scales, flows))
    return float(values.max()) if values.size else 0.0


def _self_loop_flow(graph: CostGraph, log_scales: np.ndarray) -> np.ndarray:
    """(T, H) current cost of each unit's self-loop, ``s_k exp(p (1 - c_k) u_k)``."""
    rates = graph.powers[:, None] * (1.0 - graph.degrees)[None, :]
    return graph.self_cost * np.exp(rates * log_scales[None, :])


def local_move_terms(graph: CostGraph, log_scales: np.ndarray, units: np.ndarray,
                     flows: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The 1-D problem of moving each unit alone: ``phi(d) = sum_j w_j exp(r_j d)``.

    Returns ``(weights, rates)`` of shape (len(units), 3T): incoming (rate p), outgoing
    (rate -c p) and self-loop (rate p (1-c)) terms, each times the term's coefficient.
    """
    incoming, outgoing = flows
    loops = _self_loop_flow(graph, log_scales)[:, units]
    c = graph.degrees[units][None, :]
    p = graph.powers[:, None]
    coef = graph.coefs[:, None]
    weights = np.concatenate([
        coef * np.maximum(incoming[:, units] - loops, 0.0),
        coef * np.maximum(outgoing[:, units] - loops, 0.0),
        coef * loops,
    ]).T
    rates = np.concatenate([np.broadcast_to(p, loops.shape), -c * p, p * (1.0 - c)]).T
    return weights, rates


def solve_exp_sum(weights: np.ndarray, rates: np.ndarray, guess: np.ndarray | None = None,
                  max_iter: int = 100) -> np.ndarray:
    """Minimise ``phi_k(d) = sum_j weights[k, j] exp(rates[k, j] d)`` for every row k.

    phi is convex, and strictly so with a unique minimiser when some weight with a positive
    rate and some with a negative rate are > 0. Safeguarded Newton on phi' = 0: a bracket is
    grown until phi' changes sign, then Newton steps that leave it fall back to bisection.
    Converges to machine precision (|step| < 1e-15 (1 + |d|)).
    """
    n = weights.shape[0]
    d = np.zeros(n) if guess is None else np.array(guess, dtype=np.float64)

    def slope(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        e = weights * np.exp(rates * x[:, None])
        return (e * rates).sum(axis=1), (e * rates * rates).sum(axis=1)

    lo, hi = d - 1.0, d + 1.0
    width = np.ones(n)
    for _ in range(200):
        s_lo, _ = slope(lo)
        s_hi, _ = slope(hi)
        bad_lo, bad_hi = s_lo > 0, s_hi < 0
        if not (bad_lo.any() or bad_hi.any()):
            break
        width = np.where(bad_lo | bad_hi, width * 2.0, width)
        lo = np.where(bad_lo, lo - width, lo)
        hi = np.where(bad_hi, hi + width, hi)
    d = np.clip(d, lo, hi)
    for _ in range(max_iter):
        g, h = slope(d)
        lo = np.where(g < 0, d, lo)
        hi = np.where(g > 0, d, hi)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.where(h > 0, g / h, 0.0)
        candidate = d - step
        outside = ~((candidate > lo) & (candidate < hi)) | ~np.isfinite(candidate)
        candidate = np.where(outside, 0.5 * (lo + hi), candidate)
        done = np.abs(candidate - d) <= 1e-15 * (1.0 + np.abs(d))
        d = candidate
        if done.all():
            break
    return d


def exact_moves(graph: CostGraph, log_scales: np.ndarray, units: np.ndarray,
                flows: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Log-scale change that balances each unit in ``units`` exactly, the others held fixed.

    For one L_p term and no self-loop (or c = 1) this is the closed form
    ``log(c B / A) / (p (1 + c))``; otherwise a safe 1-D root solve. Dead units do not move.
    Moves of several units are exact together only if no edge links them.
    """
    units = np.asarray(units, dtype=np.intp)
    flows = unit_flows(graph, log_scales) if flows is None else flows
    live = ~graph.dead[units]
    if graph.n_terms == 1 and live.all() and not graph.self_cost.any():
        # The common case (one L_p term, no self-loops, all live), in a few array operations:
        # asynchronous shards call this once per wake.
        cc = graph.degrees[units]
        return (np.log(cc * flows[1][0, units]) - np.log(flows[0][0, units])) / \
            (graph.powers[0] * (1.0 + cc))
    moves = np.zeros(units.shape[0])
    if not live.any():
        return moves
    active = units[live]
    c = graph.degrees[active]
    has_loop = (graph.self_cost[:, active] > 0).any(axis=0)
    closed = (graph.n_terms == 1) & (~has_loop | (c == 1.0))
    result = np.zeros(active.shape[0])
    if closed.any():
        idx = active[closed]
        p = graph.powers[0]
        loops = _self_loop_flow(graph, log_scales)[0, idx]
        a = flows[0][0, idx] - loops
        b = flows[1][0, idx] - loops
        cc = graph.degrees[idx]
        result[closed] = (np.log(cc * b) - np.log(a)) / (p * (1.0 + cc))
    if (~closed).any():
        idx = active[~closed]
        weights, rates = local_move_terms(graph, log_scales, idx, flows)
        result[~closed] = solve_exp_sum(weights, rates)
    moves[live] = result
    return moves


def move_cost_decrease(graph: CostGraph, log_scales: np.ndarray, units: np.ndarray,
                       moves: np.ndarray, flows: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """R(before) - R(after) when each unit alone moves by ``moves`` (the others fixed).

    For c = 1, L_p and an exact move this equals ``(sqrt(A) - sqrt(B))**2`` (seed 001, eq. 14).
    """
    units = np.asarray(units, dtype=np.intp)
    weights, rates = local_move_terms(graph, log_scales, units, flows)
    after = (weights * np.exp(rates * np.asarray(moves)[:, None])).sum(axis=1)
    return weights.sum(axis=1) - after


def single_precision_costs(graph: CostGraph) -> tuple[tuple[np.ndarray, ...], ...]:
    """float32 copies of the stacked costs, for Hessian products inside Newton's solver.

    The products are memory-bound; half the bytes per pass halves their time, and a Newton
    direction accurate to ~1e-7 still converges (the gradient stays float64). A sparse
    graph's CSR blocks follow the stacks, in ``graph.sparse_blocks`` order.
    """
    return (tuple(tuple(k.astype(np.float32) for k in st.costs) for st in graph.stacks)
            + tuple(tuple(k.astype(np.float32) for k in b.costs) for b in graph.sparse_blocks))


def hessian_vector_product(graph: CostGraph, log_scales: np.ndarray, vector: np.ndarray,
                           flows: tuple[np.ndarray, np.ndarray] | None = None,
                           costs32: tuple[tuple[np.ndarray, ...], ...] | None = None
                           ) -> np.ndarray:
    """``H v`` for the Hessian of R at ``log_scales``, restricted to free (non-dead) units.

    ``H = sum_t coef p^2 [diag(A + c^2 B) - C - C^T]`` with ``C_ij = c_j K_ij e^{p(u_i - c_j
    u_j)}`` over hidden-to-hidden edges: a weighted graph Laplacian for c = 1 (seed 004).
    With ``costs32`` (from ``single_precision_costs``) the block products run in float32.
    """
    flows = unit_flows(graph, log_scales) if flows is None else flows
    incoming, outgoing = flows
    v = np.where(graph.dead, 0.0, vector)
    c = graph.degrees
    result = np.zeros_like(v)
    for t in range(graph.n_terms):
        p = graph.powers[t]
        up, down = _exp_pair(graph, log_scales, t)
        term = (incoming[t] + c * c * outgoing[t]) * v
        weighted_src = c * down * v
        weighted_dst = up * v
        pulled = np.zeros_like(v)
        pushed = np.zeros_like(v)
        if costs32 is not None:
            weighted_src = weighted_src.astype(np.float32)
            weighted_dst = weighted_dst.astype(np.float32)
        for s_index, st in enumerate(graph.stacks):
            k = st.costs[t] if costs32 is None else costs32[s_index][t]
            pulled[st.dst_start:st.dst_stop] += _stack_forward(st, k, weighted_src)
            pushed[st.src_start:st.src_stop] += _stack_backward(st, k, weighted_dst)
        for b_index, b in enumerate(graph.sparse_blocks, start=len(graph.stacks)):
            k = b.costs[t] if costs32 is None else costs32[b_index][t]
            pulled[b.dst[0]:b.dst[1]] += k @ weighted_src[b.src[0]:b.src[1]]
            pushed[b.src[0]:b.src[1]] += k.T @ weighted_dst[b.dst[0]:b.dst[1]]
        term -= up * pulled + c * down * pushed
        result += graph.coefs[t] * p * p * term
    return np.where(graph.dead, 0.0, result)


def hessian_diagonal(graph: CostGraph, log_scales: np.ndarray,
                     flows: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Exact diagonal of H (self-loops contribute ``(1 - c)^2 s``)."""
    incoming, outgoing = flows
    c = graph.degrees
    loops = _self_loop_flow(graph, log_scales)
    weight = (graph.coefs * graph.powers**2)[:, None]
    diag = (weight * (incoming + c * c * outgoing - 2.0 * c * loops)).sum(axis=0)
    return np.where(graph.dead, 1.0, diag)


def group_coupling(graph: CostGraph, log_scales: np.ndarray,
                   flows: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``Z^T H Z`` for Z the indicator vectors of the groups (free units only).

    The coarse operator of the two-level preconditioner: one matrix-vector product per block.
    """
    n_groups = len(graph.group_ranges)
    coarse = np.zeros((n_groups, n_groups))
    diag = hessian_diagonal(graph, log_scales, flows)
    free = graph.free.astype(np.float64)
    group_index = {r: g for g, r in enumerate(graph.group_ranges)}
    loops = _self_loop_flow(graph, log_scales)
    weight = (graph.coefs * graph.powers**2)
    for g, (start, stop) in enumerate(graph.group_ranges):
        # The diagonal of H already holds the self-loop part; the blocks below subtract the
        # full C + C^T, whose diagonal (2 c s) must then be added back once.
        coarse[g, g] += (diag[start:stop] * free[start:stop]).sum()
        back = (weight[:, None] * 2.0 * graph.degrees[start:stop] * loops[:, start:stop]).sum(0)
        coarse[g, g] += (back * free[start:stop]).sum()
    for t in range(graph.n_terms):
        p = graph.powers[t]
        up, down = _exp_pair(graph, log_scales, t)
        c_down = graph.degrees * down * free
        up_free = up * free
        for st in graph.stacks:
            per_block = (_stack_forward(st, st.costs[t], c_down)
                         * up_free[st.dst_start:st.dst_stop]).reshape(st.count, -1).sum(1)
            for i, total in enumerate(per_block):
                gd = group_index.get((st.dst_start + i * st.n_dst,
                                      st.dst_start + (i + 1) * st.n_dst))
                gs = group_index.get((st.src_start + i * st.n_src,
                                      st.src_start + (i + 1) * st.n_src))
                if gd is None or gs is None:
                    continue
                value = graph.coefs[t] * p * p * total
                coarse[gd, gs] -= value
                coarse[gs, gd] -= value
        for b in graph.sparse_blocks:
            gd, gs = group_index.get(b.dst), group_index.get(b.src)
            if gd is None or gs is None:
                continue
            total = float((b.costs[t] @ c_down[b.src[0]:b.src[1]])
                          @ up_free[b.dst[0]:b.dst[1]])
            value = graph.coefs[t] * p * p * total
            coarse[gd, gs] -= value
            coarse[gs, gd] -= value
    return coarse
