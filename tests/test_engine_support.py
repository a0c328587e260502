"""Shared builders and weight-level reference computations for the engine tests.

Nothing here is a test. The reference functions work on a network's actual weights (sums of
|w|^p over incoming and outgoing edges, a dense Hessian built edge by edge) and do not use the
engine's cost graph or kernels, so the tests can judge those against an independent account.
"""

from __future__ import annotations

import numpy as np

from asyncbalance import Network, Regulariser, layered_network, lp, recurrent_network

C1_ACTIVATIONS = ("relu", "leaky_relu:0.1", "abs", "linear")


def random_layered(rng: np.random.Generator, sizes: list[int], biases: list[bool] | bool = True,
                   activation: str = "relu", spread: float = 1.0) -> Network:
    """An MLP with normal weights; each layer scaled by exp(U(-spread, spread)) so that the
    starting point is clearly unbalanced."""
    n_layers = len(sizes) - 1
    flags = [biases] * n_layers if isinstance(biases, bool) else list(biases)
    weights, bs = [], []
    for i in range(n_layers):
        scale = np.exp(rng.uniform(-spread, spread)) / np.sqrt(sizes[i])
        weights.append(rng.standard_normal((sizes[i + 1], sizes[i])) * scale)
        bs.append(rng.standard_normal(sizes[i + 1]) * scale if flags[i] else None)
    return layered_network(weights, bs, activation)


def random_recurrent(rng: np.random.Generator, n_in: int, n_hidden: int, n_out: int,
                     bias: bool = True, bias_out: bool = True, activation: str = "relu",
                     gain: float = 0.9) -> Network:
    """``h_t = f(W_in x_t + W_rec h_{t-1} + b)``, ``y_t = W_out h_t + b_out`` with a dense
    W_rec (self-loops and cycles) of spectral scale about ``gain``."""
    spread = np.exp(rng.uniform(-1.0, 1.0, size=3))
    w_in = rng.standard_normal((n_hidden, n_in)) * spread[0] / np.sqrt(n_in)
    w_rec = rng.standard_normal((n_hidden, n_hidden)) * gain / np.sqrt(n_hidden)
    w_out = rng.standard_normal((n_out, n_hidden)) * spread[1] / np.sqrt(n_hidden)
    b = rng.standard_normal(n_hidden) * spread[2] if bias else None
    b_out = rng.standard_normal(n_out) if bias_out else None
    return recurrent_network(w_in, w_rec, w_out, b, b_out, activation)


def _unit_index(network: Network) -> dict[str, np.ndarray | None]:
    offsets = network.hidden_offsets()
    return {g.name: (np.arange(*offsets[g.name]) if g.hidden else None)
            for g in network.groups}


def _edge_blocks(network: Network, reg: Regulariser):
    """Per connection: (dst indices | None, src indices | None, [K_t (n_dst, n_src)])."""
    index = _unit_index(network)
    for conn in network.connections:
        shaped = np.abs(conn.unit_axes(np.asarray(network.weights[conn.key])))
        costs = [(shaped**p).sum(axis=2) for p in reg.powers]
        yield index[conn.dst], index[conn.src], costs


def weight_cost(network: Network, p: float | Regulariser) -> float:
    """R = sum over every weight and bias of g(|w|), straight from the arrays."""
    reg = p if isinstance(p, Regulariser) else lp(p)
    return float(sum(reg.cost(np.asarray(w)) for w in network.weights.values()))


def weight_flows(network: Network, p: float | Regulariser) -> tuple[np.ndarray, np.ndarray]:
    """Per hidden unit k: ``(sum_in sum_t coef p_t |w|^p_t, sum_out ...)`` (self-loops in
    both). For L_p this is p times (Sigma_in |w|^p, Sigma_out |w|^p)."""
    reg = p if isinstance(p, Regulariser) else lp(p)
    into = np.zeros(network.n_hidden)
    out = np.zeros(network.n_hidden)
    for dst, src, costs in _edge_blocks(network, reg):
        weighted = sum(c * pw * k for c, pw, k in zip(reg.coefs, reg.powers, costs, strict=True))
        if dst is not None:
            np.add.at(into, dst, weighted.sum(axis=1))
        if src is not None:
            np.add.at(out, src, weighted.sum(axis=0))
    return into, out


def weight_gradient(network: Network, p: float | Regulariser) -> np.ndarray:
    """dR/du at the network's current weights: ``into - c * out`` per hidden unit."""
    into, out = weight_flows(network, p)
    return into - network.degrees() * out


def weight_hessian(network: Network, p: float | Regulariser) -> np.ndarray:
    """Dense Hessian of R(u) at u = 0 for the network's current weights.

    Every edge j -> i contributes ``coef p^2 g_ij (e_i - c_j e_j)(e_i - c_j e_j)^T`` (visible
    ends dropped), so this is assembled edge by edge, independently of the engine.
    """
    reg = p if isinstance(p, Regulariser) else lp(p)
    n = network.n_hidden
    c = network.degrees()
    hess = np.zeros((n, n))
    for dst, src, costs in _edge_blocks(network, reg):
        m = sum(cf * pw * pw * k for cf, pw, k in zip(reg.coefs, reg.powers, costs, strict=True))
        if dst is not None:
            np.add.at(hess, (dst, dst), m.sum(axis=1))
        if src is not None:
            np.add.at(hess, (src, src), c[src] ** 2 * m.sum(axis=0))
        if dst is not None and src is not None:
            cross = m * c[src][None, :]
            np.add.at(hess, (dst[:, None], src[None, :]), -cross)
            np.add.at(hess, (src[None, :], dst[:, None]), -cross)
    return hess


def distance_bound(hessian: np.ndarray, grad_a: np.ndarray, grad_b: np.ndarray) -> float:
    """A bound on ||u_a - u_b||_2 for two near-optimal points of a strictly convex R.

    Near the optimum g(u) = H (u - u_true) + O(|u - u_true|^2), so each point lies within
    ||g||_2 / lambda_min of u_true; a factor 2 covers the change of H over that distance and
    a floor of 1e3 EPS * sqrt(n) / lambda_min * ||H|| covers rounding of the gradients.
    """
    eigen = np.linalg.eigvalsh(hessian)
    lam_min, lam_max = float(eigen[0]), float(eigen[-1])
    assert lam_min > 0, "R must be strictly convex here"
    n = hessian.shape[0]
    floor = 1e3 * np.finfo(np.float64).eps * np.sqrt(n) * lam_max / lam_min
    return 2.0 * (np.linalg.norm(grad_a) + np.linalg.norm(grad_b)) / lam_min + floor
