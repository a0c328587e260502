"""Networks as weights plus unit structure: layered MLPs, recurrent nets, conv channels.

A ``Network`` lists unit groups (visible: input, output, bias; hidden: with a homogeneous
activation) and connections between them. Each connection says how its weight array maps onto
(destination unit, source unit) pairs: ``dense`` (out x in), ``bias`` (out,), ``conv``
(out, in, kh, kw: units are channels) and ``flatten`` (out, in*positions: a Linear after a
flatten of a conv, channel-major). That mapping is all the balancing math needs.

A ``dense`` connection's weights may also be a ``scipy.sparse`` matrix (stored as CSR): a sparse
net keeps only its synapses, so nets far too large for dense matrices still fit in memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .activations import Activation, parse_activation
from .errors import InvalidInputError, ResultOverflowError

LAYOUTS = ("dense", "bias", "conv", "flatten")
VISIBLE_GROUPS = ("input", "output", "bias")


@dataclass(frozen=True)
class UnitGroup:
    """A named set of units; ``activation is None`` marks a visible (never rescaled) group."""

    name: str
    size: int
    activation: Activation | None = None

    @property
    def hidden(self) -> bool:
        return self.activation is not None

    @property
    def degree(self) -> float:
        return 0.0 if self.activation is None else self.activation.degree


@dataclass(frozen=True)
class Connection:
    """Weights ``key`` linking group ``src`` to group ``dst`` with the given array layout."""

    key: str
    dst: str
    src: str
    layout: str = "dense"
    positions: int = 1

    def unit_axes(self, weight: np.ndarray) -> np.ndarray:
        """View of ``weight`` as (n_dst, n_src, rest) for aggregation and scaling."""
        if self.layout == "dense":
            return weight.reshape(weight.shape[0], weight.shape[1], 1)
        if self.layout == "bias":
            return weight.reshape(weight.shape[0], 1, 1)
        if self.layout == "conv":
            return weight.reshape(weight.shape[0], weight.shape[1], -1)
        if self.layout == "flatten":
            return weight.reshape(weight.shape[0], weight.shape[1] // self.positions,
                                  self.positions)
        raise InvalidInputError("layout", f"unknown layout {self.layout!r}", LAYOUTS)


@dataclass(frozen=True, eq=False)
class Network:
    """Weights keyed by name plus the unit groups and connections they form."""

    groups: tuple[UnitGroup, ...]
    connections: tuple[Connection, ...]
    weights: Mapping[str, np.ndarray]
    kind: str = "custom"
    meta: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise InvalidInputError("groups", f"duplicate group names in {names}")
        by_name = {g.name: g for g in self.groups}
        for conn in self.connections:
            for end in (conn.dst, conn.src):
                if end not in by_name:
                    raise InvalidInputError(conn.key, f"refers to unknown group {end!r}", names)
            if conn.key not in self.weights:
                raise InvalidInputError(conn.key, "weight array is missing")
            weight = self.weights[conn.key]
            n_dst, n_src = by_name[conn.dst].size, by_name[conn.src].size
            if sp.issparse(weight):
                _check_sparse_weight(conn, weight, n_dst, n_src)
                continue
            check_finite(conn.key, weight)
            shaped = conn.unit_axes(weight) if _layout_ok(conn, weight) else None
            if shaped is None or shaped.shape[0] != n_dst or shaped.shape[1] != n_src:
                raise InvalidInputError(
                    conn.key,
                    f"shape {weight.shape} does not link {conn.src} ({n_src} units) to "
                    f"{conn.dst} ({n_dst} units) with layout {conn.layout!r}")

    @property
    def hidden_groups(self) -> tuple[UnitGroup, ...]:
        return tuple(g for g in self.groups if g.hidden)

    @property
    def n_hidden(self) -> int:
        return sum(g.size for g in self.hidden_groups)

    def group(self, name: str) -> UnitGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise InvalidInputError("group", f"unknown group {name!r}", [g.name for g in self.groups])

    def hidden_offsets(self) -> dict[str, tuple[int, int]]:
        """Global index range [start, stop) of every hidden group, in declaration order."""
        offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for g in self.hidden_groups:
            offsets[g.name] = (start, start + g.size)
            start += g.size
        return offsets

    def degrees(self) -> np.ndarray:
        return np.concatenate([np.full(g.size, g.degree) for g in self.hidden_groups]) \
            if self.hidden_groups else np.zeros(0)

    def with_weights(self, weights: Mapping[str, np.ndarray]) -> Network:
        return Network(self.groups, self.connections, dict(weights), self.kind, self.meta)


def is_sparse_weight(weight: object) -> bool:
    """True for a ``scipy.sparse`` weight matrix (the CSR form of a sparse ``dense`` layout)."""
    return sp.issparse(weight)


def _check_sparse_weight(conn: Connection, weight: sp.sparray, n_dst: int, n_src: int) -> None:
    if conn.layout != "dense" or weight.format != "csr":
        raise InvalidInputError(conn.key, f"a sparse weight matrix must be CSR with layout "
                                f"'dense', got {weight.format} with layout {conn.layout!r}")
    check_finite(conn.key, weight.data)
    if weight.shape != (n_dst, n_src):
        raise InvalidInputError(
            conn.key, f"shape {weight.shape} does not link {conn.src} ({n_src} units) to "
            f"{conn.dst} ({n_dst} units) with layout 'dense'")


def _layout_ok(conn: Connection, weight: np.ndarray) -> bool:
    expected_ndim = {"dense": 2, "bias": 1, "conv": 4, "flatten": 2}.get(conn.layout)
    if expected_ndim is None:
        raise InvalidInputError(conn.key, f"unknown layout {conn.layout!r}", LAYOUTS)
    if weight.ndim != expected_ndim:
        return False
    if conn.layout == "flatten":
        return conn.positions > 0 and weight.shape[1] % conn.positions == 0
    return True


#: dtype kinds accepted as weights: floating point, signed and unsigned integers.
NUMERIC_KINDS = "fiu"
_KIND_NAMES = {"b": "boolean", "c": "complex", "O": "object (pickled Python objects)",
               "U": "text", "S": "bytes", "V": "structured/void", "M": "datetime",
               "m": "timedelta"}


def check_weight_array(name: str, array: np.ndarray, where: str = "") -> None:
    """Refuse arrays that cannot be weights: non-numeric, complex, boolean or empty."""
    kind = array.dtype.kind
    if kind not in NUMERIC_KINDS:
        what = _KIND_NAMES.get(kind, f"dtype {array.dtype}")
        raise InvalidInputError(name, f"{where}has {what} values (dtype {array.dtype}); weights "
                                "must be real numbers (float or integer)")
    if array.size == 0:
        raise InvalidInputError(name, f"{where}is empty (shape {array.shape}); every weight "
                                "array needs at least one entry")



def check_finite(name: str, array: np.ndarray) -> None:
    """Refuse NaN or infinite weights, naming the array and the first bad index."""
    if not np.issubdtype(np.asarray(array).dtype, np.number):
        raise InvalidInputError(name, f"must be numeric, got dtype {np.asarray(array).dtype}")
    bad = ~np.isfinite(array)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        value = np.asarray(array)[index]
        raise InvalidInputError(name, f"contains a non-finite value ({value}) at index {index}")


def _as_float_array(name: str, value: object) -> np.ndarray:
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError):
        raise InvalidInputError(name, "is not a numeric array") from None
    # Checked before the cast: float64(complex) would silently drop the imaginary part.
    check_weight_array(name, raw)
    array = np.array(raw, dtype=np.float64)
    check_finite(name, array)
    return array


def _as_float_matrix(name: str, value: object) -> np.ndarray | sp.csr_array:
    """A float64 copy of a layer matrix: dense, or CSR (canonical, without stored zeros)."""
    if not sp.issparse(value):
        return _as_float_array(name, value)
    check_weight_array(name, value.data if value.nnz else np.zeros(1, value.dtype))
    matrix = sp.csr_array(value, dtype=np.float64, copy=True)
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    check_finite(name, matrix.data)
    return matrix


def layered_network(
    weights: Sequence[np.ndarray | sp.sparray],
    biases: Sequence[np.ndarray | None] | None = None,
    activation: str | Activation | Sequence[str | Activation] = "relu",
) -> Network:
    """An MLP ``x -> f(W1 x + b1) -> ... -> WL h + bL`` (torch Linear convention, out x in).

    Hidden units are the outputs of layers 1..L-1. ``activation`` is one activation for all
    hidden layers or one per hidden layer. ``biases`` may be None or contain None entries.
    A layer matrix may be ``scipy.sparse`` (kept as CSR); biases are always dense.
    """
    if len(weights) < 1:
        raise InvalidInputError("weights", "needs at least one layer matrix")
    if biases is None:
        biases = [None] * len(weights)
    if len(biases) != len(weights):
        raise InvalidInputError("biases", f"has {len(biases)} entries for {len(weights)} layers")
    mats = [_as_float_matrix(f"W{i + 1}", w) for i, w in enumerate(weights)]
    for i, w in enumerate(mats):
        if w.ndim != 2:
            raise InvalidInputError(f"W{i + 1}", f"must be 2-D (out x in), got shape {w.shape}")
    for i in range(1, len(mats)):
        if mats[i].shape[1] != mats[i - 1].shape[0]:
            raise InvalidInputError(
                f"W{i + 1}", f"has {mats[i].shape[1]} inputs but W{i} has "
                f"{mats[i - 1].shape[0]} outputs (shapes {mats[i - 1].shape}, {mats[i].shape})")
    if isinstance(activation, (str, Activation)):
        acts = [parse_activation(activation)] * (len(mats) - 1)
    else:
        acts = [parse_activation(a, f"activation[{i}]") for i, a in enumerate(activation)]
        if len(acts) != len(mats) - 1:
            raise InvalidInputError("activation", f"has {len(acts)} entries for "
                                    f"{len(mats) - 1} hidden layers")
    groups = [UnitGroup("input", mats[0].shape[1])]
    groups += [UnitGroup(f"h{i + 1}", w.shape[0], a)
               for i, (w, a) in enumerate(zip(mats[:-1], acts, strict=True))]
    groups += [UnitGroup("output", mats[-1].shape[0])]
    names = [g.name for g in groups]
    arrays: dict[str, np.ndarray] = {}
    conns: list[Connection] = []
    has_bias = False
    for i, w in enumerate(mats):
        arrays[f"W{i + 1}"] = w
        conns.append(Connection(f"W{i + 1}", names[i + 1], names[i], "dense"))
        b = biases[i]
        if b is not None:
            b = _as_float_array(f"b{i + 1}", b)
            if b.shape != (w.shape[0],):
                raise InvalidInputError(f"b{i + 1}", f"shape {b.shape} should be ({w.shape[0]},) "
                                        f"to match W{i + 1} {w.shape}")
            arrays[f"b{i + 1}"] = b
            conns.append(Connection(f"b{i + 1}", names[i + 1], "bias", "bias"))
            has_bias = True
    if has_bias:
        groups.append(UnitGroup("bias", 1))
    spec = acts[0].spec if acts and all(a == acts[0] for a in acts) else "mixed"
    return Network(tuple(groups), tuple(conns), arrays, kind="layered",
                   meta={"n_layers": len(mats), "activation": spec if acts else "none"})


def recurrent_network(
    W_in: np.ndarray | None,  # noqa: N803 - the field names of the npz format
    W_rec: np.ndarray,  # noqa: N803
    W_out: np.ndarray | None,  # noqa: N803
    b: np.ndarray | None = None,
    b_out: np.ndarray | None = None,
    activation: str | Activation = "relu",
) -> Network:
    """``h_t = f(W_in x_t + W_rec h_{t-1} + b)``, ``y_t = W_out h_t + b_out``.

    ``W_rec`` may have cycles and self-loops. ``W_in``/``W_out`` may be None, in which case
    the hidden units have no path to a visible unit and the optimum is fixed up to a gauge.
    """
    act = parse_activation(activation)
    rec = _as_float_array("W_rec", W_rec)
    if rec.ndim != 2 or rec.shape[0] != rec.shape[1]:
        raise InvalidInputError("W_rec", f"must be square (hidden x hidden), got {rec.shape}")
    n = rec.shape[0]
    groups = [UnitGroup("hidden", n, act)]
    conns = [Connection("W_rec", "hidden", "hidden", "dense")]
    arrays = {"W_rec": rec}
    has_bias = False
    if W_in is not None:
        w_in = _as_float_array("W_in", W_in)
        if w_in.ndim != 2 or w_in.shape[0] != n:
            raise InvalidInputError("W_in", f"must be ({n}, n_in), got shape {w_in.shape}")
        groups.insert(0, UnitGroup("input", w_in.shape[1]))
        conns.append(Connection("W_in", "hidden", "input", "dense"))
        arrays["W_in"] = w_in
    if W_out is not None:
        w_out = _as_float_array("W_out", W_out)
        if w_out.ndim != 2 or w_out.shape[1] != n:
            raise InvalidInputError("W_out", f"must be (n_out, {n}), got shape {w_out.shape}")
        groups.append(UnitGroup("output", w_out.shape[0]))
        conns.append(Connection("W_out", "output", "hidden", "dense"))
        arrays["W_out"] = w_out
    if b is not None:
        bias = _as_float_array("b", b)
        if bias.shape != (n,):
            raise InvalidInputError("b", f"shape {bias.shape} should be ({n},)")
        conns.append(Connection("b", "hidden", "bias", "bias"))
        arrays["b"] = bias
        has_bias = True
    if b_out is not None:
        if W_out is None:
            raise InvalidInputError("b_out", "given without W_out")
        bias_out = _as_float_array("b_out", b_out)
        if bias_out.shape != (arrays["W_out"].shape[0],):
            raise InvalidInputError("b_out", f"shape {bias_out.shape} should be "
                                    f"({arrays['W_out'].shape[0]},)")
        conns.append(Connection("b_out", "output", "bias", "bias"))
        arrays["b_out"] = bias_out
        has_bias = True
    if has_bias:
        groups.append(UnitGroup("bias", 1))
    return Network(tuple(groups), tuple(conns), arrays, kind="recurrent",
                   meta={"activation": act.spec})


RECURRENT_KEYS = ("W_in", "W_rec", "W_out", "b", "b_out")


def network_from_arrays(arrays: Mapping[str, np.ndarray],
                        activation: str | Activation = "relu") -> Network:
    """Build a layered (``W1, b1, ..., WL, bL``) or recurrent (``W_rec`` ...) network."""
    keys = set(arrays)
    if "W_rec" in keys:
        unknown = keys - set(RECURRENT_KEYS)
        if unknown:
            raise InvalidInputError(sorted(unknown)[0], "unexpected key in a recurrent network",
                                    RECURRENT_KEYS)
        return recurrent_network(arrays.get("W_in"), arrays["W_rec"], arrays.get("W_out"),
                                 arrays.get("b"), arrays.get("b_out"), activation)
    layer_ids = []
    for key in keys:
        if len(key) < 2 or key[0] not in "Wb" or not key[1:].isdigit():
            raise InvalidInputError(
                key, "unexpected key: layered networks use W1, b1, ..., WL, bL; recurrent ones "
                "use W_in, W_rec, W_out, b, b_out", ["W<i>", "b<i>", *RECURRENT_KEYS])
        if key[1:] != str(int(key[1:])) or int(key[1:]) < 1:
            # W0 or W01 would otherwise be ignored or misread without a word.
            raise InvalidInputError(
                key, f"layers are numbered from 1 without leading zeros (W1, b1, ..., WL, "
                f"bL); rename {key} and the keys after it", ["W<i>", "b<i>", *RECURRENT_KEYS])
        layer_ids.append(int(key[1:]))
    n_layers = max((i for i in layer_ids), default=0)
    missing = [f"W{i}" for i in range(1, n_layers + 1) if f"W{i}" not in keys]
    if n_layers == 0 or missing:
        raise InvalidInputError(missing[0] if missing else "W1",
                                "missing layer matrix (layers must be numbered 1..L)")
    return layered_network([arrays[f"W{i}"] for i in range(1, n_layers + 1)],
                           [arrays.get(f"b{i}") for i in range(1, n_layers + 1)], activation)


def scale_network(network: Network, log_scales: np.ndarray) -> Network:
    """The effective network ``w_ij = w0_ij * exp(u_i - c_j u_j)`` for the given log-scales.

    Every log-scale vector gives a network with exactly the same input-output function.
    """
    log_scales = np.asarray(log_scales, dtype=np.float64)
    if log_scales.shape != (network.n_hidden,):
        raise InvalidInputError("log_scales", f"shape {log_scales.shape} should be "
                                f"({network.n_hidden},)")
    offsets = network.hidden_offsets()
    by_name = {g.name: g for g in network.groups}
    new = dict(network.weights)
    for conn in network.connections:
        dst, src = by_name[conn.dst], by_name[conn.src]
        if not (dst.hidden or src.hidden):
            continue
        weight = network.weights[conn.key]
        with np.errstate(over="ignore"):
            factor_dst = np.exp(log_scales[slice(*offsets[dst.name])]) if dst.hidden \
                else np.ones(dst.size)
            factor_src = np.exp(-src.degree * log_scales[slice(*offsets[src.name])]) \
                if src.hidden else np.ones(src.size)
        with np.errstate(over="ignore", invalid="ignore"):
            if sp.issparse(weight):
                rows = np.repeat(np.arange(weight.shape[0]), np.diff(weight.indptr))
                data = weight.data * factor_dst[rows] * factor_src[weight.indices]
                scaled = sp.csr_array((data, weight.indices.copy(), weight.indptr.copy()),
                                      shape=weight.shape)
                values = data
            else:
                shaped = conn.unit_axes(weight)
                scaled = shaped * factor_dst[:, None, None] * factor_src[None, :, None]
                values = scaled
        if not np.all(np.isfinite(values)):
            raise ResultOverflowError(
                conn.key, "the balanced weights overflow float64: the balanced network "
                f"rescales hidden units by factors up to e^{float(np.max(np.abs(log_scales))):.0f}"
                ", beyond the float64 range (1.8e308); it cannot be represented in float64")
        new[conn.key] = scaled if sp.issparse(scaled) else scaled.reshape(weight.shape)
    return network.with_weights(new)


def random_sparse_layer(rng: np.random.Generator, n_out: int, n_in: int, fan_in: int,
                        gain: float = 1.0, unit_spread: float = 0.0) -> sp.csr_array:
    """An (n_out, n_in) CSR layer: each row links ``min(fan_in, n_in)`` distinct random inputs.

    An input that no row drew is then linked to one random row, so every neuron of the layer
    below has a reader (else a wide layer under a narrow one would be mostly dead units).
    Weights are Gaussian with std ``gain / sqrt(links of the row)``, each row times
    ``exp(unit_spread * N(0, 1))``. Memory and time are O(links): no dense matrix is made.
    """
    k = min(fan_in, n_in)
    if 2 * k > n_in:
        # Most inputs are linked: a per-row shuffle of all of them costs at most 2 k per row.
        cols = np.sort(rng.permuted(np.broadcast_to(np.arange(n_in), (n_out, n_in)),
                                    axis=1)[:, :k], axis=1)
    else:
        # Draw with replacement and redraw the repeats (few: about k^2 / 2 n_in per row).
        cols = np.sort(rng.integers(0, n_in, size=(n_out, k)), axis=1)
        while True:
            repeat = np.zeros(cols.shape, dtype=bool)
            repeat[:, 1:] = cols[:, 1:] == cols[:, :-1]
            if not repeat.any():
                break
            cols[repeat] = rng.integers(0, n_in, size=int(repeat.sum()))
            cols.sort(axis=1)
    rows = np.repeat(np.arange(n_out), k)
    unread = np.nonzero(np.bincount(cols.reshape(-1), minlength=n_in) == 0)[0]
    rows = np.concatenate([rows, rng.integers(0, n_out, size=unread.size)])
    cols = np.concatenate([cols.reshape(-1), unread])
    counts = np.bincount(rows, minlength=n_out)
    row_scale = gain / np.sqrt(np.maximum(counts, 1)) * np.exp(
        unit_spread * rng.standard_normal(n_out))
    data = rng.standard_normal(rows.size) * row_scale[rows]
    layer = sp.csr_array((data, (rows, cols)), shape=(n_out, n_in))
    layer.sum_duplicates()
    layer.eliminate_zeros()
    if max(layer.nnz, n_in) < 2**31:
        # int32 indices: a third less memory than int64 per synapse.
        layer = sp.csr_array((layer.data, layer.indices.astype(np.int32),
                              layer.indptr.astype(np.int32)), shape=layer.shape)
    return layer
