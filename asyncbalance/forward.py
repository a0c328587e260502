"""Float64 forward passes of numpy networks, for checking that balancing preserves function.

Layered networks may hold ``scipy.sparse`` (CSR) layer matrices.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .activations import parse_activation
from .errors import InvalidInputError
from .network import Network


def forward(network: Network, inputs: np.ndarray) -> np.ndarray:
    """Outputs of a layered network for inputs (batch, n_in), or of a recurrent network for
    input sequences (batch, steps, n_in) -> (batch, steps, n_out) starting from h = 0."""
    w = network.weights
    if network.kind == "layered":
        h = np.asarray(inputs, dtype=np.float64)
        n_layers = int(network.meta["n_layers"])
        hidden = network.hidden_groups
        for i in range(1, n_layers + 1):
            weight = w[f"W{i}"]
            # A CSR layer: (W h^T)^T is a sparse-times-dense product, never a dense W.
            h = np.asarray((weight @ h.T).T) if sp.issparse(weight) else h @ weight.T
            if f"b{i}" in w:
                h = h + w[f"b{i}"]
            if i < n_layers:
                h = hidden[i - 1].activation(h)
        return h
    act = parse_activation(str(network.meta.get("activation", "relu")))
    if network.kind == "recurrent":
        x = np.asarray(inputs, dtype=np.float64)
        n_hidden = w["W_rec"].shape[0]
        h = np.zeros((x.shape[0], n_hidden))
        outputs = []
        for t in range(x.shape[1]):
            pre = h @ w["W_rec"].T
            if "W_in" in w:
                pre = pre + x[:, t] @ w["W_in"].T
            if "b" in w:
                pre = pre + w["b"]
            h = act(pre)
            y = h @ w["W_out"].T if "W_out" in w else h
            if "b_out" in w:
                y = y + w["b_out"]
            outputs.append(y)
        return np.stack(outputs, axis=1)
    raise InvalidInputError("network.kind", f"no numpy forward pass for {network.kind!r}",
                            ["layered", "recurrent"])


def probe_inputs(network: Network, batch: int = 64, steps: int = 6, seed: int = 0) -> np.ndarray:
    """A seeded standard-normal probe batch shaped for ``forward``."""
    rng = np.random.default_rng(seed)
    n_in = network.group("input").size if any(g.name == "input" for g in network.groups) else 1
    if network.kind == "recurrent":
        return rng.standard_normal((batch, steps, n_in))
    return rng.standard_normal((batch, n_in))


def function_rel_error(original: Network, balanced: Network,
                       inputs: np.ndarray | None = None) -> float:
    """``max |f_bal(x) - f(x)| / max |f(x)|`` over the probe batch (float64).

    A recurrent network without ``W_out`` has no visible output (its hidden state is what the
    scaling changes by design), so it is refused.
    """
    if original.kind == "recurrent" and "W_out" not in original.weights:
        raise InvalidInputError("W_out", "a recurrent network without W_out has no visible "
                                "output to compare")
    x = probe_inputs(original) if inputs is None else inputs
    reference = forward(original, x)
    changed = forward(balanced, x)
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    if scale == 0.0:
        return float(np.max(np.abs(changed))) if changed.size else 0.0
    return float(np.max(np.abs(changed - reference)) / scale)
