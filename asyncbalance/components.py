"""Connected components of the hidden units over their nonzero hidden-to-hidden costs.

Labels are numbered in the order of each component's smallest unit (the numbering of
``scipy.sparse.csgraph.connected_components``, which labels components as a scan over the
units meets them). A union-find over the cost blocks' own index arrays holds one parent per
unit and nothing per edge: at 10^5 neurons (1.3e7 edges) the edge-list graph that scipy needs
(row and column arrays, ones, its CSR copy) took 0.7 GiB on top of a 0.46 GiB problem and
decided the whole set-up's peak. Without numba the scipy path runs.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .graph import CostGraph

try:
    import numba
except ImportError:  # the scipy path takes over
    numba = None

__all__ = ["unit_components"]


def _find(parent: np.ndarray, a: int) -> int:  # pragma: no cover
    """The root of ``a``, halving the path on the way (every node skips to its grandparent)."""
    while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
    return a


def _union_csr(parent: np.ndarray, indptr: np.ndarray, indices: np.ndarray, keep: np.ndarray,
               row0: int, col0: int) -> None:  # pragma: no cover
    """Join unit ``row0 + r`` with unit ``col0 + indices[k]`` for every entry k of row r that
    ``keep`` marks. The smaller root becomes the parent: each root is its set's smallest unit."""
    for r in range(indptr.shape[0] - 1):
        for k in range(indptr[r], indptr[r + 1]):
            if keep[k]:
                a = _find(parent, row0 + r)
                b = _find(parent, col0 + indices[k])
                if a < b:
                    parent[b] = a
                elif b < a:
                    parent[a] = b


def _roots(parent: np.ndarray) -> np.ndarray:  # pragma: no cover
    roots = np.empty(parent.shape[0], dtype=np.int64)
    for a in range(parent.shape[0]):
        roots[a] = _find(parent, a)
    return roots


if numba is not None:
    _find = numba.njit(cache=True, nogil=True)(_find)
    _union_csr = numba.njit(cache=True, nogil=True)(_union_csr)
    _roots = numba.njit(cache=True, nogil=True)(_roots)
COMPILED = numba is not None


def unit_components(graph: CostGraph) -> np.ndarray:
    """Component label of every hidden unit (see the module doc for the numbering)."""
    if not COMPILED:
        return _scipy_components(graph)
    parent = np.arange(graph.n_units, dtype=np.int64)
    for block in graph.blocks:
        if graph.sparse:
            # CSR costs share the weights' pattern: one pass over its index arrays.
            first = block.costs[0]
            keep = np.zeros(first.data.shape[0], dtype=bool)
            for cost in block.costs:
                keep |= cost.data != 0
            indptr, indices = first.indptr, first.indices
        else:
            # Dense costs (small nets): their nonzero entries, row by row, as CSR.
            total = sum(block.costs)
            rows_of, indices = np.nonzero(total)
            indptr = np.concatenate([[0], np.cumsum(np.bincount(rows_of,
                                                                minlength=total.shape[0]))])
            keep = np.ones(indices.shape[0], dtype=bool)
        _union_csr(parent, indptr, indices, keep, int(block.dst[0]), int(block.src[0]))
    # Roots are smallest members: ranking them numbers components by their smallest unit.
    return np.unique(_roots(parent), return_inverse=True)[1].astype(np.int32)


def _scipy_components(graph: CostGraph) -> np.ndarray:
    n = graph.n_units
    rows, cols = [np.arange(n)], [np.arange(n)]
    for b in graph.blocks:
        if graph.sparse:
            total = sum(b.costs).tocoo()
            keep = total.data != 0
            i, j = total.row[keep], total.col[keep]
        else:
            i, j = np.nonzero(sum(b.costs))
        rows.append(i + b.dst[0])
        cols.append(j + b.src[0])
    r, c = np.concatenate(rows), np.concatenate(cols)
    adjacency = coo_matrix((np.ones(r.shape[0]), (r, c)), shape=(n, n))
    return connected_components(adjacency, directed=False)[1]
