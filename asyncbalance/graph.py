"""The cost graph: aggregated block costs ``K[i, j] = sum |w|**p`` between hidden units.

Only these aggregates matter for balancing. Edges from visible units (inputs, the bias unit)
collapse into one incoming cost per hidden unit, edges into visible units (outputs) into one
outgoing cost, and visible-to-visible edges into a constant.

A network with ``scipy.sparse`` weights gives a sparse graph: each hidden-to-hidden block keeps
its costs as CSR matrices (one per regulariser term, all on the weights' sparsity pattern) and
there are no dense stacks. The kernels run the same formulas on either form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .errors import InvalidInputError
from .network import Network
from .regularisers import Regulariser, as_regulariser


@dataclass(frozen=True, eq=False)
class Block:
    """Costs of the edges from hidden units ``src`` to hidden units ``dst`` (index ranges).

    ``costs[t]`` is the (n_dst, n_src) aggregate for regulariser term t: a dense array, or
    a CSR matrix in a sparse graph.
    """

    dst: tuple[int, int]
    src: tuple[int, int]
    costs: tuple[np.ndarray, ...]

    @property
    def is_internal(self) -> bool:
        """True when the block links units of overlapping ranges (recurrent connections)."""
        return self.dst[0] < self.src[1] and self.src[0] < self.dst[1]


@dataclass(frozen=True, eq=False)
class BlockStack:
    """``count`` blocks of equal shape on consecutive index ranges, stored as one array.

    Block i links src ``[src_start + i n_src, ...)`` to dst ``[dst_start + i n_dst, ...)``.
    A deep chain of equal-width layers becomes one stack, so a kernel pass is one batched
    matrix product instead of a Python loop over layers.
    """

    dst_start: int
    src_start: int
    count: int
    n_dst: int
    n_src: int
    costs: tuple[np.ndarray, ...]  # per term, (count, n_dst, n_src)

    @property
    def dst_stop(self) -> int:
        return self.dst_start + self.count * self.n_dst

    @property
    def src_stop(self) -> int:
        return self.src_start + self.count * self.n_src


def plan_runs(ranges: list[tuple[tuple[int, int], tuple[int, int]]]) -> list[list[int]]:
    """Indices of maximal runs of consecutive equal-shape, non-internal (dst, src) ranges."""
    runs: list[list[int]] = []
    i = 0
    while i < len(ranges):
        (d0, d1), (s0, s1) = ranges[i]
        n_dst, n_src = d1 - d0, s1 - s0
        internal = d0 < s1 and s0 < d1
        j = i + 1
        while (not internal and j < len(ranges)
               and ranges[j] == ((d0 + (j - i) * n_dst, d0 + (j - i + 1) * n_dst),
                                 (s0 + (j - i) * n_src, s0 + (j - i + 1) * n_src))):
            j += 1
        runs.append(list(range(i, j)))
        i = j
    return runs


def stack_blocks(blocks: list[Block], n_terms: int) -> tuple[list[Block], list[BlockStack]]:
    """Group runs of consecutive equal-shape blocks; blocks become views into the stacks."""
    stacks: list[BlockStack] = []
    views: list[Block] = []
    for run_index in plan_runs([(b.dst, b.src) for b in blocks]):
        run = [blocks[i] for i in run_index]
        first = run[0]
        costs = tuple(np.stack([b.costs[t] for b in run]) if len(run) > 1
                      else run[0].costs[t][None] for t in range(n_terms))
        stacks.append(BlockStack(first.dst[0], first.src[0], len(run),
                                 first.dst[1] - first.dst[0], first.src[1] - first.src[0],
                                 costs))
        for offset, b in enumerate(run):
            views.append(Block(b.dst, b.src, tuple(c[offset] for c in costs)))
    return views, stacks


def _powered(raw: np.ndarray, p: float, out: np.ndarray | None = None) -> np.ndarray:
    """``sum_rest |raw|**p`` as (n_dst, n_src), into ``out`` when given (no extra copy)."""
    if raw.shape[2] == 1:
        powered = np.abs(raw[:, :, 0], out=out)
    else:
        powered = np.abs(raw)
    # Powered in place: peak memory stays near one copy of the weights.
    if p == 2.0:
        np.multiply(powered, powered, out=powered)
    elif p != 1.0:
        np.power(powered, p, out=powered)
    if raw.shape[2] == 1:
        return powered
    return powered.sum(axis=2, out=out)


@dataclass(frozen=True, eq=False)
class CostGraph:
    """Everything the balancing kernels need, as plain arrays.

    Attributes:
        coefs, powers: the regulariser terms ``sum_t coefs[t] * |w|**powers[t]``.
        degrees: homogeneity degree c_k per hidden unit (1 for BiLU).
        group_names, group_ranges: hidden groups (layers) and their index ranges.
        visible_in: (T, H) cost of edges into unit k from visible units (inputs, bias).
        visible_out: (T, H) cost of edges from unit k to visible units (outputs).
        self_cost: (T, H) cost of self-loops k -> k (also contained in the blocks).
        blocks: hidden-to-hidden costs, one per connection.
        stacks: the same costs grouped for batched kernels (blocks are views into them);
            empty in a sparse graph.
        constant_cost: regularised cost of visible-to-visible edges (never changes).
        dead: units with no incoming or no outgoing cost; they are never rescaled.
    """

    coefs: np.ndarray
    powers: np.ndarray
    degrees: np.ndarray
    group_names: tuple[str, ...]
    group_ranges: tuple[tuple[int, int], ...]
    visible_in: np.ndarray
    visible_out: np.ndarray
    self_cost: np.ndarray
    blocks: tuple[Block, ...]
    stacks: tuple[BlockStack, ...]
    constant_cost: float
    dead: np.ndarray
    sparse: bool = False  # True: block costs are CSR matrices and ``stacks`` is empty

    @property
    def sparse_blocks(self) -> tuple[Block, ...]:
        """The blocks the kernels treat one by one (CSR costs); empty in a dense graph."""
        return self.blocks if self.sparse else ()

    @property
    def n_units(self) -> int:
        return int(self.degrees.shape[0])

    @property
    def n_terms(self) -> int:
        return int(self.powers.shape[0])

    @property
    def free(self) -> np.ndarray:
        return ~self.dead

    def group_of(self, unit: int) -> int:
        for g, (start, stop) in enumerate(self.group_ranges):
            if start <= unit < stop:
                return g
        raise IndexError(unit)

    def group_has_internal_edges(self, group: int) -> bool:
        start, stop = self.group_ranges[group]
        return any(b.dst[0] < stop and b.dst[1] > start and b.src[0] < stop and b.src[1] > start
                   for b in self.blocks)


def _sparse_powered(weight: sp.csr_array, p: float) -> sp.csr_array:
    """``|w|**p`` elementwise on the CSR pattern of ``weight`` (no dense matrix)."""
    data = np.abs(weight.data)
    if p == 2.0:
        np.multiply(data, data, out=data)
    elif p != 1.0:
        np.power(data, p, out=data)
    return sp.csr_array((data, weight.indices, weight.indptr), shape=weight.shape)


def build_cost_graph(network: Network, regulariser: float | Regulariser) -> CostGraph:
    """Aggregate the network's weights into block costs for ``regulariser``.

    If any weight matrix is ``scipy.sparse`` the graph is sparse (CSR block costs). A hidden
    unit whose costs on one side all underflow float64 to 0 although its weights there are
    not all zero is refused (``InvalidInputError`` naming ``p``): it would count as dead or
    balanced at u = 0, and every schedule would return that as a success.
    """
    graph = _build_cost_graph(network, regulariser)
    _check_no_vanished_side(network, graph)
    return graph


def _check_no_vanished_side(network: Network, graph: CostGraph) -> None:
    if not np.any(graph.powers > 1.0):
        return  # |w|^p >= |w| for |w| <= 1: nothing nonzero underflows
    from .kernels import unit_flows

    zero = np.zeros(graph.n_units)
    into, out = unit_flows(graph, zero)
    vanished_in, vanished_out = ~np.any(into > 0, axis=0), ~np.any(out > 0, axis=0)
    if not (vanished_in.any() or vanished_out.any()) or not (
            np.isfinite(into).all() and np.isfinite(out).all()):
        return  # none vanished, or costs overflowed: reported first, by the solvers
    # Rare: a dead unit (exact zeros) or underflow. At p = 1 a cost is 0 only for zeros.
    into1, out1 = unit_flows(_build_cost_graph(network, 1.0), zero)
    bad = (vanished_in & (into1[0] > 0)) | (vanished_out & (out1[0] > 0))
    if bad.any():
        k = int(np.argmax(bad))
        side = "incoming" if vanished_in[k] and into1[0, k] > 0 else "outgoing"
        p = float(np.max(graph.powers))
        raise InvalidInputError(
            "p", f"every {side} cost |w|^p of a unit of hidden group "
            f"{graph.group_names[graph.group_of(k)]!r} underflows to 0 in float64 at p = "
            f"{p:g} (its weights are below about {5e-324 ** (1.0 / p):.3g}), so its balance "
            "cannot be computed; use a smaller p or rescale the weights")


def _build_cost_graph(network: Network, regulariser: float | Regulariser) -> CostGraph:
    if any(sp.issparse(w) for w in network.weights.values()):
        return _build_sparse_cost_graph(network, regulariser)
    reg = as_regulariser(regulariser)
    powers = np.array(reg.powers, dtype=np.float64)
    coefs = np.array(reg.coefs, dtype=np.float64)
    n_terms = len(powers)
    offsets = network.hidden_offsets()
    n_hidden = network.n_hidden
    by_name = {g.name: g for g in network.groups}
    visible_in = np.zeros((n_terms, n_hidden))
    visible_out = np.zeros((n_terms, n_hidden))
    self_cost = np.zeros((n_terms, n_hidden))
    constant = 0.0
    hidden_links = []
    for conn in network.connections:
        dst, src = by_name[conn.dst], by_name[conn.src]
        raw = conn.unit_axes(network.weights[conn.key])
        if dst.hidden and src.hidden:
            hidden_links.append((offsets[dst.name], offsets[src.name], raw))
            continue
        costs = [_powered(raw, p) for p in powers]
        if dst.hidden:
            d0, d1 = offsets[dst.name]
            for t, k in enumerate(costs):
                visible_in[t, d0:d1] += k.sum(axis=1)
        elif src.hidden:
            s0, s1 = offsets[src.name]
            for t, k in enumerate(costs):
                visible_out[t, s0:s1] += k.sum(axis=0)
        else:
            constant += float(sum(c * k.sum() for c, k in zip(coefs, costs, strict=True)))
    # Costs between hidden groups are written straight into their stacked storage.
    blocks: list[Block] = []
    stacks: list[BlockStack] = []
    for run in plan_runs([(d, s) for d, s, _ in hidden_links]):
        (d0, d1), (s0, s1), _ = hidden_links[run[0]]
        n_dst, n_src = d1 - d0, s1 - s0
        storage = tuple(np.empty((len(run), n_dst, n_src)) for _ in powers)
        for slot, index in enumerate(run):
            dst_range, src_range, raw = hidden_links[index]
            for t, p in enumerate(powers):
                _powered(raw, p, out=storage[t][slot])
            block = Block(dst_range, src_range, tuple(k[slot] for k in storage))
            blocks.append(block)
            if block.is_internal:
                lo, hi = max(dst_range[0], src_range[0]), min(dst_range[1], src_range[1])
                rows = np.arange(lo, hi) - dst_range[0]
                cols = np.arange(lo, hi) - src_range[0]
                for t, k in enumerate(block.costs):
                    self_cost[t, lo:hi] += k[rows, cols]
        stacks.append(BlockStack(d0, s0, len(run), n_dst, n_src, storage))
    names = tuple(g.name for g in network.hidden_groups)
    ranges = tuple(offsets[n] for n in names)
    incoming = visible_in.sum(axis=0).copy()
    outgoing = visible_out.sum(axis=0).copy()
    for b in blocks:
        total = b.costs[0] if n_terms == 1 else sum(b.costs)
        incoming[b.dst[0]:b.dst[1]] += total.sum(axis=1)
        outgoing[b.src[0]:b.src[1]] += total.sum(axis=0)
    own = self_cost.sum(axis=0)
    # Self-loops alone cannot balance a unit: it needs other incoming and outgoing edges.
    # The relative margin absorbs the rounding of (incoming - own) when only a loop exists.
    margin = 1e-13 * np.maximum(own, 0.0)
    dead = ((incoming - own) <= margin) | ((outgoing - own) <= margin)
    return CostGraph(coefs, powers, network.degrees(), names, ranges, visible_in,
                     visible_out, self_cost, tuple(blocks), tuple(stacks), constant, dead)


def _build_sparse_cost_graph(network: Network, regulariser: float | Regulariser) -> CostGraph:
    """``build_cost_graph`` for a network with sparse weights: CSR blocks, no stacks."""
    reg = as_regulariser(regulariser)
    powers = np.array(reg.powers, dtype=np.float64)
    coefs = np.array(reg.coefs, dtype=np.float64)
    n_terms = len(powers)
    offsets = network.hidden_offsets()
    n_hidden = network.n_hidden
    by_name = {g.name: g for g in network.groups}
    visible_in = np.zeros((n_terms, n_hidden))
    visible_out = np.zeros((n_terms, n_hidden))
    self_cost = np.zeros((n_terms, n_hidden))
    constant = 0.0
    blocks: list[Block] = []
    for conn in network.connections:
        dst, src = by_name[conn.dst], by_name[conn.src]
        weight = network.weights[conn.key]
        if sp.issparse(weight):
            # Every term keeps the weights' pattern: the kernels and the layout rely on it.
            costs = [_sparse_powered(weight, p) for p in powers]
        else:
            raw = conn.unit_axes(weight)
            costs = [_powered(raw, p) for p in powers]
            if dst.hidden and src.hidden:
                # A dense array between hidden groups joins the sparse blocks as CSR, all terms
                # on the pattern of its nonzero aggregates.
                pattern = sp.csr_array(np.abs(raw).sum(axis=2))
                pattern.eliminate_zeros()
                rows = np.repeat(np.arange(pattern.shape[0]), np.diff(pattern.indptr))
                costs = [sp.csr_array((k[rows, pattern.indices], pattern.indices,
                                       pattern.indptr), shape=pattern.shape) for k in costs]
        if dst.hidden and src.hidden:
            matrices = tuple(costs)
            block = Block(offsets[dst.name], offsets[src.name], matrices)
            blocks.append(block)
            if block.is_internal:
                lo, hi = max(block.dst[0], block.src[0]), min(block.dst[1], block.src[1])
                rows = np.arange(lo, hi) - block.dst[0]
                cols = np.arange(lo, hi) - block.src[0]
                for t, k in enumerate(matrices):
                    self_cost[t, lo:hi] += np.asarray(k[rows, cols]).reshape(-1)
            continue
        if dst.hidden:
            d0, d1 = offsets[dst.name]
            for t, k in enumerate(costs):
                visible_in[t, d0:d1] += np.asarray(k.sum(axis=1)).reshape(-1)
        elif src.hidden:
            s0, s1 = offsets[src.name]
            for t, k in enumerate(costs):
                visible_out[t, s0:s1] += np.asarray(k.sum(axis=0)).reshape(-1)
        else:
            constant += float(sum(c * k.sum() for c, k in zip(coefs, costs, strict=True)))
    names = tuple(g.name for g in network.hidden_groups)
    ranges = tuple(offsets[n] for n in names)
    incoming = visible_in.sum(axis=0).copy()
    outgoing = visible_out.sum(axis=0).copy()
    for b in blocks:
        for k in b.costs:
            incoming[b.dst[0]:b.dst[1]] += k.sum(axis=1)
            outgoing[b.src[0]:b.src[1]] += k.sum(axis=0)
    own = self_cost.sum(axis=0)
    # The same rule (and margin) as the dense graph.
    margin = 1e-13 * np.maximum(own, 0.0)
    dead = ((incoming - own) <= margin) | ((outgoing - own) <= margin)
    return CostGraph(coefs, powers, network.degrees(), names, ranges, visible_in,
                     visible_out, self_cost, tuple(blocks), (), constant, dead, sparse=True)
