"""Rescaling symmetries of a torch model, found by tracing it with ``torch.fx``.

A *unit* is one output feature of a ``Linear`` or one output channel of a ``Conv1d/2d/3d``.
Multiplying a unit's incoming weights and bias by ``s > 0`` and dividing the weights that read
it by ``s**c`` keeps the model's function whenever every path from the unit to the next
weighted layer passes only through positively homogeneous operations of total degree ``c``.

The model is run once on a probe batch by an fx interpreter that carries, next to every
tensor, a *label* tensor of the same shape: the atom ``(unit, degree)`` that scales each
element, 0 for elements that no unit scales. Shape operations (flatten, reshape, permute,
cat, slicing, chunk) are applied to the labels themselves, so channels stay identifiable
through them without special cases. Rules for the other operations:

* ReLU, LeakyReLU, Identity, Dropout, negation, a product with a constant: labels unchanged.
* max/avg/adaptive pools, upsampling (every interpolation mode is linear), mean/sum over
  non-batch dims: need one unit per pooled channel.
* eval-mode BatchNorm: a per-channel affine map ``a x + b``; scaling x by s scales the output
  by s once ``b`` is scaled too (``beta`` and ``running_mean`` times s; gamma and the variance
  stay). Such "shifts" are recorded and rescaled with the unit.
* a module with a ``homogeneity_degree`` attribute (e.g. ``PowerReLU``): degree multiplied.
* an addition ties the scales of everything added together (one shared scale per element):
  the residual stream of a ResNet becomes one scale per channel.
* anything else (tanh, GELU, softmax, LayerNorm, attention, a product of two tensors, a
  function fx cannot see through) is a *boundary*: the units reaching it are pinned to
  scale 1 and the boundary is recorded with its module path and the reason.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F  # noqa: N812 - torch's own convention

from .errors import InvalidInputError

FIXED = -1  # class index of units pinned to scale 1

TRANSPOSED_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
WEIGHTED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *TRANSPOSED_MODULES)
# Positively homogeneous of degree 1 elementwise: f(s x) = s f(x) for s > 0. PReLU keeps its
# (per-channel) slope: max(0, sx) + a min(0, sx) = s (max(0, x) + a min(0, x)).
ELEMENTWISE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d,
                       nn.Dropout2d, nn.Dropout3d)
ZERO_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d,
                    nn.ConstantPad2d, nn.ConstantPad3d)
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample)
SHAPE_MODULES = (nn.Flatten, nn.Unflatten)
ELEMENTWISE_FUNCTIONS = (torch.relu, torch.relu_, F.relu, F.relu_, F.leaky_relu, F.dropout,
                         F.dropout1d, F.dropout2d, F.dropout3d, torch.neg, operator.neg,
                         operator.pos, torch.abs, torch.abs_, operator.abs, F.prelu)
ELEMENTWISE_METHODS = ("relu", "relu_", "neg", "abs", "abs_", "contiguous", "clone", "detach",
                       "to", "float", "double", "half", "bfloat16", "type_as")
ADD_FUNCTIONS = (operator.add, operator.iadd, operator.sub, operator.isub, torch.add,
                 torch.sub)
ADD_METHODS = ("add", "add_", "sub", "sub_")
SCALE_FUNCTIONS = (operator.mul, operator.imul, torch.mul, operator.truediv,
                   operator.itruediv, torch.div)
SCALE_METHODS = ("mul", "mul_", "div", "div_")
POOL_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
                  F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                  F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                  F.adaptive_max_pool3d, F.interpolate)
SHAPE_FUNCTIONS = (torch.flatten, torch.reshape, torch.permute, torch.transpose,
                   torch.squeeze, torch.unsqueeze, torch.cat, torch.concat, torch.stack,
                   torch.chunk, torch.split, operator.getitem, torch.narrow, torch.movedim,
                   torch.unflatten, torch.t)
SHAPE_METHODS = ("flatten", "reshape", "view", "permute", "transpose", "squeeze", "unsqueeze",
                 "chunk", "split", "narrow", "expand", "repeat", "movedim", "unflatten", "t",
                 "view_as", "reshape_as", "expand_as")
# max and min of elements that share one scale s > 0 are scaled by s too.
REDUCE_FUNCTIONS = (torch.mean, torch.sum, torch.amax, torch.amin)
REDUCE_METHODS = ("mean", "sum", "amax", "amin")
PAD_FUNCTIONS = (F.pad,)

SUPPORTED = ("Linear", "Conv1d/2d/3d", "ConvTranspose1d/2d/3d", "ReLU", "LeakyReLU", "PReLU",
             "abs", "Identity", "Dropout", "MaxPool", "AvgPool", "AdaptiveAvgPool/MaxPool",
             "Upsample", "eval-mode BatchNorm", "Flatten", "zero padding", "amax/amin",
             "reshape/permute/cat/slicing", "addition", "product with a constant",
             "modules with a homogeneity_degree")

# Why the usual non-homogeneous modules stop the rescaling, by class name.
BOUNDARY_REASONS = {
    "Tanh": "tanh is not positively homogeneous",
    "Sigmoid": "sigmoid is not positively homogeneous",
    "GELU": "GELU is not positively homogeneous",
    "SiLU": "SiLU is not positively homogeneous",
    "Softmax": "softmax is not positively homogeneous",
    "LayerNorm": "LayerNorm normalises each sample, so the output does not follow a rescaling",
    "GroupNorm": "GroupNorm normalises each sample, so the output does not follow a rescaling",
    "MultiheadAttention": "attention (softmax of products) is not positively homogeneous",
    "TransformerEncoderLayer": "torch's fused encoder layer cannot be traced into (write the "
                               "block with separate Linear modules to balance its feed-forward "
                               "units)",
    "Embedding": "an embedding is a lookup table, not a homogeneous map of its input",
}


@dataclass(frozen=True)
class Boundary:
    """An operation that stopped the rescaling of ``n_units`` units reaching it."""

    path: str
    op: str
    reason: str
    n_units: int

    def __str__(self) -> str:
        return f"{self.path} ({self.op}): {self.reason} [{self.n_units} units]"


@dataclass(frozen=True, eq=False)
class WeightedLayer:
    """A Linear or Conv call: its output units and the atom scaling each input feature."""

    path: str
    module: nn.Module
    units: np.ndarray  # (out_features or out_channels,) unit ids
    in_atoms: np.ndarray  # (in_features or in_channels,) atom ids, 0 = not scaled


@dataclass(frozen=True, eq=False)
class ChannelShift:
    """An eval-mode BatchNorm whose shift (beta, running_mean) follows its input's scale."""

    path: str
    module: nn.Module
    atoms: np.ndarray  # (channels,) atom ids, degree 1


@dataclass(frozen=True)
class SymmetryGroup:
    """Classes of tied units with one degree, named after the first module they come from."""

    name: str
    size: int
    degree: float
    modules: tuple[str, ...]  # every module whose output units belong to the group


@dataclass(frozen=True, eq=False)
class Symmetry:
    """The rescaling symmetry of a model: every unit's class (one log-scale each) and group.

    ``unit_class[k]`` is the class of unit k (FIXED when pinned, unit 0 = not scaled);
    class c lives at position ``class_index[c]`` of group ``class_group[c]``.
    """

    layers: tuple[WeightedLayer, ...]
    shifts: tuple[ChannelShift, ...]
    boundaries: tuple[Boundary, ...]
    unit_paths: tuple[tuple[str, int], ...]
    atom_unit: np.ndarray
    atom_degree: np.ndarray
    unit_class: np.ndarray
    class_group: np.ndarray
    class_index: np.ndarray
    groups: tuple[SymmetryGroup, ...]
    # The model's outputs on the probe batch during discovery (tensor leaves, float64 copies).
    outputs: tuple[torch.Tensor, ...] = ()
    # The traced model (its modules and parameters are the model's own).
    graph_module: fx.GraphModule | None = None

    @property
    def n_units(self) -> int:
        """Units found (output features and channels of the weighted layers)."""
        return len(self.unit_paths) - 1

    @property
    def n_free_units(self) -> int:
        """Units that get a log-scale (not pinned)."""
        return int(np.count_nonzero(self.unit_class[1:] != FIXED))

    @property
    def n_classes(self) -> int:
        return int(self.class_group.shape[0])

    def atom_class(self, atoms: np.ndarray) -> np.ndarray:
        return self.unit_class[self.atom_unit[atoms]]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, k: int) -> int:
        root = k
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[k] != root:
            self.parent[k], k = root, self.parent[k]
        return root

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        # The smaller root wins, so unit 0 (not scaled) stays the root of the pinned class.
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        return True


class _Tracer(fx.Tracer):
    """torch.nn modules and modules declaring a ``homogeneity_degree`` stay leaves; the path
    of the innermost module being traced is kept to name it when tracing fails."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return hasattr(m, "homogeneity_degree") or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict):
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` as an fx graph; a clear error naming the module when tracing fails."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as error:  # fx raises many kinds; all mean "cannot see through"
        where = tracer.failed_in or "the top-level forward"
        raise InvalidInputError(
            "model", f"torch.fx cannot trace {type(model).__name__} (failed in {where!r}: "
            f"{type(error).__name__}: {error}); balance_ needs a traceable forward, e.g. "
            "without data-dependent control flow") from error
    return fx.GraphModule(model, graph)


def _zeros_like(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return torch.zeros(value.shape, dtype=torch.int64)
    if isinstance(value, (tuple, list)):
        return type(value)(_zeros_like(v) for v in value)
    if isinstance(value, dict):
        return {k: _zeros_like(v) for k, v in value.items()}
    return None


def _has_tensor(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def _label_atoms(label: object) -> set[int]:
    if isinstance(label, torch.Tensor):
        return set(torch.unique(label).tolist())
    if isinstance(label, (tuple, list)):
        return set().union(*(_label_atoms(v) for v in label)) if label else set()
    if isinstance(label, dict):
        return set().union(*(_label_atoms(v) for v in label.values())) if label else set()
    return set()


def _per_channel(label: torch.Tensor, dim: int) -> torch.Tensor | None:
    """The atom of every slice along ``dim`` when each slice has one atom, else None."""
    flat = label.movedim(dim, 0).reshape(label.shape[dim], -1)
    if flat.shape[1] == 0:
        return None
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    return flat[:, 0].clone() if bool(torch.all(lo == hi)) else None


def _channel_label(atoms: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    view = [1] * len(shape)
    view[dim] = atoms.shape[0]
    return atoms.view(view).expand(shape).clone()


class _Discovery(fx.Interpreter):
    """Runs the traced model on a probe batch, labelling every tensor with its atoms."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.units = _UnionFind()
        self.units.add()  # unit 0: "not scaled"
        self.unit_paths: list[tuple[str, int]] = [("", -1)]
        self.atoms: list[tuple[int, float]] = [(0, 1.0)]
        self.atom_ids: dict[tuple[int, float], int] = {(0, 1.0): 0}
        self.labels: dict[fx.Node, object] = {}
        self.layers: list[WeightedLayer] = []
        self.shifts: list[ChannelShift] = []
        self.boundaries: list[Boundary] = []
        self.called: dict[int, WeightedLayer] = {}
        self.shift_calls: dict[int, ChannelShift] = {}

    # -- atoms and units -------------------------------------------------------------------
    def atom(self, unit: int, degree: float) -> int:
        key = (unit, float(degree))
        if key not in self.atom_ids:
            self.atom_ids[key] = len(self.atoms)
            self.atoms.append(key)
        return self.atom_ids[key]

    def new_units(self, path: str, count: int) -> np.ndarray:
        first = len(self.units.parent)
        self.units.parent.extend(range(first, first + count))  # each its own root
        self.unit_paths.extend((path, index) for index in range(count))
        return np.arange(first, first + count, dtype=np.int64)

    def pin(self, atoms: set[int] | np.ndarray) -> int:
        """Pin the units of ``atoms`` to scale 1; the number of units newly pinned."""
        return sum(self.units.union(0, self.atoms[int(a)][0]) for a in atoms if int(a) != 0)

    def boundary(self, path: str, op: str, reason: str, atoms: set[int]) -> None:
        units = {self.units.find(self.atoms[a][0]) for a in atoms if a != 0}
        units.discard(0)
        touched = {self.atoms[a][0] for a in atoms if a != 0}
        self.pin(atoms)
        if touched:
            self.boundaries.append(Boundary(path, op, reason, len(touched)))

    # -- interpretation --------------------------------------------------------------------
    def run_node(self, n: fx.Node) -> object:
        value = super().run_node(n)
        self.labels[n] = self.label(n, value)
        for done in self.user_to_last_uses.get(n, []):
            self.labels.pop(done, None)
        return value

    def arg_label(self, a: object) -> object:
        """Label of a node argument (zeros for constants), or the value of a non-tensor."""
        if not isinstance(a, fx.Node):
            return a
        label = self.labels.get(a)
        value = self.env.get(a)
        if label is None:
            return _zeros_like(value) if _has_tensor(value) else value
        return label

    def is_data(self, a: object) -> bool:
        return isinstance(a, fx.Node) and self.labels.get(a) is not None

    def where(self, n: fx.Node) -> str:
        stack = n.meta.get("nn_module_stack") or {}
        owner = next(reversed(stack.values()))[0] if stack else ""
        # The node's own name tells two additions in one module apart (add, add_1).
        return f"{owner}:{n.name}" if owner else n.name

    def label(self, n: fx.Node, value: object) -> object:
        if n.op == "placeholder":
            return _zeros_like(value)
        if n.op == "get_attr":
            return None
        if n.op == "output":
            # The model's outputs must not change: units reaching them keep scale 1.
            self.pin(_label_atoms(fx.node.map_arg(n.args, self.arg_label)))
            return None
        if not _has_tensor(value):
            return None  # sizes, shapes, flags: nothing to scale
        inputs = [a for a in (*n.args, *n.kwargs.values()) if self.is_data(a)]
        if not inputs and not any(isinstance(a, (list, tuple)) for a in n.args):
            return None  # computed from constants only (sizes, parameters)
        if n.op == "call_module":
            return self.module_label(n, self.fetch_attr(n.target), value)
        return self.function_label(n, value)

    def all_atoms(self, n: fx.Node) -> set[int]:
        return _label_atoms([self.arg_label(a) for a in (*n.args, *n.kwargs.values())])

    def stop(self, n: fx.Node, value: object, path: str, op: str, reason: str) -> object:
        self.boundary(path, op, reason, self.all_atoms(n))
        return _zeros_like(value)

    def module_label(self, n: fx.Node, module: nn.Module, value: object) -> object:
        path, kind = str(n.target), type(module).__name__
        x = self.arg_label(n.args[0]) if n.args else None
        if isinstance(module, WEIGHTED_MODULES):
            return self.weighted(n, module, path, x, value)
        if kind in BOUNDARY_REASONS:
            return self.stop(n, value, path, kind, BOUNDARY_REASONS[kind])
        if not isinstance(x, torch.Tensor) or not isinstance(value, torch.Tensor):
            return self.stop(n, value, path, kind, "takes or returns several tensors")
        if isinstance(module, ELEMENTWISE_MODULES):
            return x
        if hasattr(module, "homogeneity_degree"):
            return self.raise_degree(x, float(module.homogeneity_degree))
        if isinstance(module, POOL_MODULES):
            return self.pool(n, value, path, kind, x)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return self.batchnorm(n, module, path, x, value)
        if isinstance(module, SHAPE_MODULES):
            return self.on_labels(n, value, path, kind, lambda *a, **k: module(*a, **k))
        if isinstance(module, ZERO_PAD_MODULES) and module.value == 0:
            return self.padded(n, value, path, kind, x, module.padding, "constant")
        reason = BOUNDARY_REASONS.get(kind, f"{kind} is not a known positively homogeneous "
                                            "module")
        return self.stop(n, value, path, kind, reason)

    def function_label(self, n: fx.Node, value: object) -> object:
        path = self.where(n)
        target = n.target
        method = n.op == "call_method"
        name = target if method else getattr(target, "__name__", str(target))
        if (method and target in ELEMENTWISE_METHODS) or (
                not method and target in ELEMENTWISE_FUNCTIONS):
            x = self.arg_label(n.args[0])
            # prelu's slope must not depend on the input (then it is a product of two).
            slope_is_data = target is F.prelu and any(
                self.is_data(a) for a in (*n.args[1:], *n.kwargs.values()))
            if isinstance(x, torch.Tensor) and isinstance(value, torch.Tensor) and not \
                    slope_is_data:
                return x
        elif not method and target in PAD_FUNCTIONS:
            return self.pad(n, value, path, str(name))
        elif (method and target in ADD_METHODS) or (not method and target in ADD_FUNCTIONS):
            return self.add(n, value, path, str(name))
        elif (method and target in SCALE_METHODS) or (
                not method and target in SCALE_FUNCTIONS):
            return self.scale(n, value, path, str(name))
        elif not method and target in POOL_FUNCTIONS:
            x = self.arg_label(n.args[0])
            if isinstance(x, torch.Tensor):
                return self.pool(n, value, path, str(name), x)
        elif (method and target in REDUCE_METHODS) or (
                not method and target in REDUCE_FUNCTIONS):
            return self.reduce(n, value, path, str(name))
        elif (method and target in SHAPE_METHODS) or (
                not method and target in SHAPE_FUNCTIONS):
            if method:
                return self.on_labels(n, value, path, str(name),
                                      lambda obj, *a, **k: getattr(obj, target)(*a, **k))
            return self.on_labels(n, value, path, str(name), target)
        return self.stop(n, value, path, str(name), f"{name} is not a known positively "
                         "homogeneous operation")

    # -- rules -----------------------------------------------------------------------------
    def weighted(self, n: fx.Node, module: nn.Module, path: str, x: object,
                 value: object) -> object:
        kind = type(module).__name__
        if id(module) in self.called:
            # Shared weights: both calls would need the same scales on both sides.
            first = self.called[id(module)]
            atoms = self.all_atoms(n) | set(first.in_atoms.tolist()) | {
                self.atom(int(u), 1.0) for u in first.units}
            self.boundary(path, kind, "the module is called more than once (shared weights)",
                          atoms)
            return _zeros_like(value)
        if not isinstance(x, torch.Tensor):
            return self.stop(n, value, path, kind, "takes several tensors")
        dim = x.ndim - 1 if isinstance(module, nn.Linear) else 1
        in_atoms = _per_channel(x, dim)
        if in_atoms is None:
            # Input features that mix units cannot be read by one column: pin them.
            self.boundary(path, kind, "its input features are not each scaled by one unit",
                          _label_atoms(x))
            in_atoms = torch.zeros(x.shape[dim], dtype=torch.int64)
        out_dim = value.ndim - 1 if isinstance(module, nn.Linear) else 1
        units = self.new_units(path, value.shape[out_dim])
        # New units: their degree-1 atoms are new too, registered in one go.
        first = len(self.atoms)
        keys = [(int(u), 1.0) for u in units]
        self.atoms.extend(keys)
        self.atom_ids.update(zip(keys, range(first, first + len(keys)), strict=True))
        atoms = torch.arange(first, first + len(keys), dtype=torch.int64)
        layer = WeightedLayer(path, module, units, in_atoms.numpy())
        self.layers.append(layer)
        self.called[id(module)] = layer
        return _channel_label(atoms, value.shape, out_dim)

    def raise_degree(self, x: torch.Tensor, degree: float) -> torch.Tensor:
        lookup = torch.arange(len(self.atoms), dtype=torch.int64)
        for a in torch.unique(x).tolist():
            unit, old = self.atoms[a]
            if unit != 0:
                lookup[a] = self.atom(unit, old * degree)
        return lookup[x]

    def pool(self, n: fx.Node, value: object, path: str, op: str, x: torch.Tensor) -> object:
        channels = _per_channel(x, 1) if x.ndim >= 2 else None
        if channels is None or not isinstance(value, torch.Tensor):
            return self.stop(n, value, path, op, "pools over positions scaled by different "
                             "units (or returns indices)")
        return _channel_label(channels, value.shape, 1)

    def pad(self, n: fx.Node, value: object, path: str, op: str) -> object:
        args = fx.node.map_arg(n.args, lambda a: self.env.get(a))
        kwargs = fx.node.map_arg(n.kwargs, lambda a: self.env.get(a))
        names = ("input", "pad", "mode", "value")
        given = {**dict(zip(names, args, strict=False)), **kwargs}
        x = self.arg_label(n.args[0]) if n.args else None
        fill = given.get("value")
        if given.get("mode", "constant") == "constant" and fill not in (None, 0, 0.0):
            return self.stop(n, value, path, op, "pads with a nonzero constant")
        return self.padded(n, value, path, op, x, given.get("pad"),
                           given.get("mode", "constant"))

    def padded(self, n: fx.Node, value: object, path: str, op: str, x: object, pad: object,
               mode: str) -> object:
        """Zero padding: the new elements are 0, which any scale keeps, so they take the
        label of their nearest element (the channel's own unit when a spatial dim is
        padded). Reflect, replicate and circular padding copy elements: the labels are
        padded the same way."""
        label = None
        if isinstance(x, torch.Tensor) and isinstance(value, torch.Tensor):
            try:
                if mode == "constant":
                    label = _nearest_pad(x, tuple(int(v) for v in pad))
                else:
                    label = F.pad(x.double(), tuple(pad), mode=mode).long()
            except (RuntimeError, TypeError, ValueError, IndexError, NotImplementedError):
                label = None
        if label is None or label.shape != value.shape:
            return self.stop(n, value, path, op, "a padding the labels cannot follow")
        return label

    def batchnorm(self, n: fx.Node, module: nn.Module, path: str, x: torch.Tensor,
                  value: torch.Tensor) -> object:
        kind = type(module).__name__
        if module.training or module.running_mean is None:
            return self.stop(n, value, path, kind, "BatchNorm normalises by batch statistics "
                             "in training mode (call model.eval() first)")
        channels = _per_channel(x, 1) if x.ndim >= 2 else None
        if channels is None:
            return self.stop(n, value, path, kind, "its channels mix units")
        nonunit = {a for a in channels.tolist() if self.atoms[a][1] != 1.0}
        if nonunit:
            self.boundary(path, kind, "its input has homogeneity degree != 1, so its shift "
                          "cannot follow the scale", nonunit)
            return _zeros_like(value)
        first = self.shift_calls.get(id(module))
        if first is not None:
            # One shift (beta, running_mean) serves both calls: the units feeding channel c
            # in the two calls must share one scale. Tie them; pin a channel where one side
            # is not rescaled.
            pinned: set[int] = set()
            for a, b in zip(first.atoms.tolist(), channels.tolist(), strict=True):
                if a == b:
                    continue
                if self.atoms[a][0] == 0 or self.atoms[b][0] == 0:
                    pinned |= {a, b}
                else:
                    self.units.union(self.atoms[a][0], self.atoms[b][0])
            if pinned:
                self.boundary(path, kind, "is applied twice, once to channels that are not "
                              "rescaled", pinned)
            return x
        shift = ChannelShift(path, module, channels.numpy())
        self.shifts.append(shift)
        self.shift_calls[id(module)] = shift
        return x

    def add(self, n: fx.Node, value: object, path: str, op: str) -> object:
        operands = [n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("other")]
        if not all(self.is_data(a) for a in operands) or not isinstance(value, torch.Tensor):
            return self.stop(n, value, path, op, "adds a constant to scaled units")
        a, b = torch.broadcast_tensors(*(self.arg_label(o) for o in operands))
        # Pairs encoded as one integer: a 1-D unique is far faster than unique(dim=0).
        width = len(self.atoms)
        codes = torch.unique(a.reshape(-1) * width + b.reshape(-1)).tolist()
        pinned: set[int] = set()
        mixed: set[int] = set()
        for x, y in (divmod(code, width) for code in codes):
            if x == y:
                continue
            (ux, dx), (uy, dy) = self.atoms[x], self.atoms[y]
            if ux == 0 or uy == 0:
                pinned |= {x, y}
            elif dx != dy:
                mixed |= {x, y}
            else:
                self.units.union(ux, uy)
        if pinned:
            self.boundary(path, op, "adds scaled units to a tensor that is not rescaled (the "
                          "input, a boundary's output or a pinned unit)", pinned)
        if mixed:
            self.boundary(path, op, "adds units of different homogeneity degrees", mixed)
        return a.clone()

    def scale(self, n: fx.Node, value: object, path: str, op: str) -> object:
        first, second = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("other")
        divide = op in ("truediv", "itruediv", "div", "div_")
        data = [a for a in (first, second) if self.is_data(a)]
        if len(data) == 1 and isinstance(value, torch.Tensor) and not (
                divide and self.is_data(second)):
            return self.arg_label(data[0]).expand(value.shape).clone()
        reason = "divides by a tensor that depends on the input" if len(data) == 1 else \
            "multiplies two tensors that both depend on the input"
        return self.stop(n, value, path, op, reason)

    def reduce(self, n: fx.Node, value: object, path: str, op: str) -> object:
        x = self.arg_label(n.args[0])
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        keepdim = bool(n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False))
        if not isinstance(x, torch.Tensor) or dims is None:
            return self.stop(n, value, path, op, "reduces over every dimension, batch "
                             "included")
        dims = [d % x.ndim for d in ((dims,) if isinstance(dims, int) else dims)]
        if not dims:
            return self.stop(n, value, path, op, "reduces over every dimension, batch "
                             "included")
        if 0 in dims:
            return self.stop(n, value, path, op, "reduces over the batch")
        lo, hi = x.amin(dim=dims, keepdim=keepdim), x.amax(dim=dims, keepdim=keepdim)
        if not bool(torch.all(lo == hi)):
            return self.stop(n, value, path, op, "averages elements scaled by different "
                             "units")
        return hi

    def on_labels(self, n: fx.Node, value: object, path: str, op: str,
                  fn: Callable) -> object:
        """Apply a shape operation to the labels themselves."""
        args = fx.node.map_arg(n.args, self.arg_label)
        kwargs = fx.node.map_arg(n.kwargs, self.arg_label)
        try:
            result = fn(*args, **kwargs)
        except (RuntimeError, TypeError, ValueError, IndexError):
            result = None
        if not _same_shapes(result, value):
            return self.stop(n, value, path, op, "a shape operation the labels cannot follow")
        return result


def _nearest_pad(label: torch.Tensor, pad: tuple[int, ...]) -> torch.Tensor:
    """``F.pad``'s (left, right) pairs from the last dim, applied with each new element
    taking its nearest old element's label (negative pads crop)."""
    if len(pad) % 2 or len(pad) // 2 > label.ndim:
        raise ValueError("bad padding")
    for i in range(len(pad) // 2):
        dim = label.ndim - 1 - i
        left, right = pad[2 * i], pad[2 * i + 1]
        size = label.shape[dim]
        if size == 0:
            raise ValueError("empty dim")
        index = torch.arange(-left, size + right).clamp(0, size - 1)
        label = label.index_select(dim, index)
    return label


def _same_shapes(label: object, value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return isinstance(label, torch.Tensor) and label.shape == value.shape
    if isinstance(value, (tuple, list)):
        return isinstance(label, (tuple, list)) and len(label) == len(value) and all(
            _same_shapes(a, b) for a, b in zip(label, value, strict=True))
    return True


def _tensors_of(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _storage_span(t: torch.Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, one past the last byte) of a tensor's elements."""
    size = t.element_size()
    extent = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True))
    start = t.storage_offset() * size
    return t.untyped_storage().data_ptr(), start, start + extent * size


def _pin_shared_tensors(found: _Discovery, graph_module: fx.GraphModule) -> None:
    """A rescaled parameter or buffer reached from another place too (another module
    sharing it, weight tying with an Embedding, a direct read ``F.linear(x, self.fc.weight)``,
    another tensor viewing the same memory) would change that other use: the units whose
    scales it carries keep scale 1 (weights: both sides; biases and shifts: the units)."""
    reach: dict[int, list[str]] = {}  # tensor id -> every place that reaches it
    tensors: dict[int, torch.Tensor] = {}
    seen_modules: set[int] = set()
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            module = graph_module.get_submodule(str(node.target))
            if id(module) in seen_modules:
                continue  # a module called twice is one owner (the call rules handle it)
            seen_modules.add(id(module))
            for t in _tensors_of(module):
                reach.setdefault(id(t), []).append(str(node.target))
                tensors[id(t)] = t
        elif node.op == "get_attr":
            value = graph_module
            for part in str(node.target).split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor):
                reach.setdefault(id(value), []).append(f"a direct read of {node.target}")
                tensors[id(value)] = value
    # Distinct tensors over overlapping memory are one tensor reached twice.
    spans = {k: _storage_span(t) for k, t in tensors.items() if t.numel() and not t.is_meta}
    by_storage: dict[int, list[int]] = {}
    for k, (ptr, _, _) in spans.items():
        by_storage.setdefault(ptr, []).append(k)
    for keys in by_storage.values():
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                (_, a0, a1), (_, b0, b1) = spans[a], spans[b]
                if a0 < b1 and b0 < a1:
                    reach[a] = reach[a] + reach[b]
                    reach[b] = reach[b] + reach[a]

    def others(tensor: torch.Tensor | None, owner: str) -> list[str]:
        if tensor is None:
            return []
        return [r for r in dict.fromkeys(reach.get(id(tensor), [])) if r != owner]

    for layer in found.layers:
        module = layer.module
        for attr in ("weight", "bias"):
            elsewhere = others(getattr(module, attr, None), layer.path)
            if elsewhere:
                atoms = {found.atom(int(u), 1.0) for u in layer.units}
                if attr == "weight":
                    atoms |= set(layer.in_atoms.tolist())
                found.boundary(layer.path, type(module).__name__, f"its {attr} is also "
                               f"reached through {', '.join(elsewhere)}", atoms)
    for shift in found.shifts:
        for attr in ("bias", "running_mean"):
            elsewhere = others(getattr(shift.module, attr, None), shift.path)
            if elsewhere:
                found.boundary(shift.path, type(shift.module).__name__, f"its {attr} is also "
                               f"reached through {', '.join(elsewhere)}",
                               set(shift.atoms.tolist()))


def _pin_mixed_degrees(found: _Discovery) -> dict[int, float]:
    """Degree of every class as read by the next layers; classes read at two degrees are
    pinned (one log-scale cannot serve both)."""
    degrees: dict[int, set[float]] = {}
    for layer in found.layers:
        for a in set(layer.in_atoms.tolist()):
            unit, degree = found.atoms[a]
            if unit != 0:
                degrees.setdefault(found.units.find(unit), set()).add(degree)
    result: dict[int, float] = {}
    for root, seen in degrees.items():
        if root == 0:
            continue
        if len(seen) > 1:
            atoms = {a for a, (u, _) in enumerate(found.atoms) if u and found.units.find(u) == root}
            found.boundary(found.unit_paths[root][0], "degree", "its units are read through "
                           f"different homogeneity degrees {sorted(seen)}", atoms)
        else:
            result[root] = seen.pop()
    return result


def _tensor_leaves(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensor_leaves(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensor_leaves(v)]
    return []


def discover(model: nn.Module, example: tuple[torch.Tensor, ...],
             seed: int | None = None) -> Symmetry:
    """Trace ``model`` and run it on ``example`` to find its rescaling symmetry. With
    ``seed``, the pass draws its random masks (dropout) from ``torch.manual_seed(seed)``;
    the caller's random state is left alone either way."""
    graph_module = trace(model)
    found = _Discovery(graph_module)
    # A training-mode BatchNorm updates its running statistics on every pass: put them back.
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    # Dropout in training mode draws random masks: leave the caller's random state alone.
    devices = [t.device for t in example if t.device.type == "cuda"]
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        try:
            if seed is not None:
                torch.manual_seed(seed)
            result = found.run(*example)
            outputs = tuple(t.detach().to(torch.float64).clone() for t in _tensor_leaves(result))
        except (RuntimeError, TypeError, ValueError, IndexError) as error:
            raise InvalidInputError("example", f"the model fails on the probe batch (shapes "
                                    f"{[tuple(t.shape) for t in example]}): {error}") from error
        finally:
            for name, value in buffers.items():
                model.get_buffer(name).copy_(value)
    _pin_shared_tensors(found, graph_module)
    degrees = _pin_mixed_degrees(found)
    n_units = len(found.unit_paths)
    # Every unit's root by pointer jumping over the union-find forest (roots are fixed
    # points of parent), then one class per root, numbered by the root's first unit.
    roots = np.asarray(found.units.parent, dtype=np.int64)
    while not np.array_equal(jumped := roots[roots], roots):
        roots = jumped
    pinned_root = int(roots[0])
    unit_class = np.full(n_units, FIXED, dtype=np.int64)
    free = np.nonzero(roots[1:] != pinned_root)[0] + 1
    distinct, first_unit = np.unique(roots[free], return_index=True)
    order = np.argsort(first_unit, kind="stable")
    class_of_distinct = np.empty(len(distinct), dtype=np.int64)
    class_of_distinct[order] = np.arange(len(distinct))
    unit_class[free] = class_of_distinct[np.searchsorted(distinct, roots[free])]
    class_roots = [int(r) for r in distinct[order]]
    # Engine groups: classes keyed by their first module and their degree. Layers hold
    # consecutive unit ids in creation order, so visiting them in order lists each class's
    # modules in the order of their first unit.
    members: dict[int, list[str]] = {}
    for layer in found.layers:
        classes = unit_class[layer.units]
        for c in np.unique(classes[classes != FIXED]).tolist():
            paths = members.setdefault(c, [])
            if layer.path not in paths:
                paths.append(layer.path)
    group_keys: dict[tuple[str, float], int] = {}
    class_group = np.zeros(len(class_roots), dtype=np.int64)
    class_index = np.zeros(len(class_roots), dtype=np.int64)
    sizes: list[int] = []
    group_modules: list[list[str]] = []
    for c, root in enumerate(class_roots):
        degree = degrees.get(root, 1.0)
        key = (members[c][0], degree)
        if key not in group_keys:
            group_keys[key] = len(sizes)
            sizes.append(0)
            group_modules.append([])
        g = group_keys[key]
        class_group[c], class_index[c] = g, sizes[g]
        sizes[g] += 1
        group_modules[g] += [p for p in members[c] if p not in group_modules[g]]
    names = [path if degree == 1.0 else f"{path}^{degree:g}"
             for (path, degree) in group_keys]
    groups = tuple(SymmetryGroup(name or "input", sizes[g], degree, tuple(group_modules[g]))
                   for g, (name, (_, degree)) in enumerate(zip(names, group_keys, strict=True)))
    atom_unit = np.array([u for u, _ in found.atoms], dtype=np.int64)
    atom_degree = np.array([d for _, d in found.atoms], dtype=np.float64)
    return Symmetry(tuple(found.layers), tuple(found.shifts), tuple(found.boundaries),
                    tuple(found.unit_paths), atom_unit, atom_degree, unit_class, class_group,
                    class_index, groups, outputs, graph_module)
