"""Scenario files: TOML -> validated frozen dataclasses, ``--set`` overrides and sweeps.

A scenario section maps onto a frozen dataclass. ``from_mapping`` checks every key against the
dataclass fields (unknown keys are errors that list the valid ones), converts values to the
annotated types, checks ``Literal`` choices, and lets ``__post_init__`` validate the rest. All
errors are ``InvalidInputError`` naming the dotted key (``runtime.delay.mean``).

Sweeps: a top-level ``[sweep]`` table maps dotted keys to lists of values; ``expand_sweep``
returns one plain mapping per point of the grid (the cartesian product, in key order).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .errors import InvalidInputError
from .io import check_input_file

T = TypeVar("T")


def load_toml(path: str | Path, field: str = "SCENARIO") -> dict[str, Any]:
    file = check_input_file(path, field, "scenario (TOML)")
    try:
        with file.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInputError(field, f"{file} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        hint = (" (a network .npz is balanced with 'asyncbalance balance')"
                if file.suffix == ".npz" else "")
        raise InvalidInputError(field, f"{file} is not a text (TOML) scenario file: it is not "
                                f"valid UTF-8{hint}") from None
    except PermissionError:
        raise InvalidInputError(field, f"{file} is not readable (permission denied)") from None
    except OSError as exc:
        raise InvalidInputError(field, f"{file} cannot be read ({exc.strerror or exc})") from None


# Top-level tables and keys that only one kind of scenario has.
_MARKERS = {
    "train": ("trainer", "model", "optimizer", "data", "epochs", "seeds", "balancing",
              "variants", "settings", "monitor", "batch_size"),
    "run": ("network", "links", "partition", "stop", "wake", "balance", "faults", "ray",
            "backend"),
}


def scenario_kind(data: Mapping[str, Any]) -> str | None:
    """``"train"`` or ``"run"``: the command a scenario's top-level keys belong to (or None)."""
    scores = {kind: sum(key in data for key in keys) for kind, keys in _MARKERS.items()}
    best = max(scores, key=lambda kind: scores[kind])
    if scores[best] == 0 or list(scores.values()).count(scores[best]) > 1:
        return None
    return best


def check_scenario_command(path: str | Path, command: str, field: str = "SCENARIO.toml"
                           ) -> dict[str, Any]:
    """Load a scenario and refuse one written for the other command, naming the right one."""
    data = load_toml(path, field)
    if not data:
        # Valid TOML, but running every default silently is rarely what was meant.
        raise InvalidInputError(field, f"{path} is empty (no keys); a scenario sets at least "
                                "its name and network, see scenarios/quickstart.toml")
    kind = scenario_kind(data)
    if kind is not None and kind != command:
        what = "a training" if kind == "train" else "an asynchronous balancing"
        keys = ", ".join(f"[{k}]" if isinstance(data[k], dict) else k
                         for k in _MARKERS[kind] if k in data)
        raise InvalidInputError(field, f"{path} is {what} scenario (it has {keys}); run it "
                                f"with 'asyncbalance {kind} {path}'")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with value parsed as a TOML value (bare words become strings)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InvalidInputError("--set", f"expected key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of ``data`` with each ``key.sub=value`` set (tables created as needed)."""
    result = copy.deepcopy(dict(data))
    for text in overrides:
        key, value = parse_override(text)
        set_path(result, key_parts(key), value)
    return result


def key_parts(key: str) -> list[str]:
    """The parts of a TOML dotted key: ``sweep."links.mean"`` is ``["sweep", "links.mean"]``
    (a quoted part keeps its dots, as in a scenario file)."""
    try:
        parsed: Any = tomllib.loads(f"{key} = 0")
    except tomllib.TOMLDecodeError:
        raise InvalidInputError("--set", f"{key!r} is not a key (write key.sub=value; quote "
                                'a part that holds dots: sweep."links.mean"=[0, 1])') from None
    parts = []
    while isinstance(parsed, dict) and len(parsed) == 1:
        (part, parsed), = parsed.items()
        parts.append(part)
    return parts


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    set_path(data, key.split("."), value)


def set_path(data: dict[str, Any], parts: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise InvalidInputError(".".join(parts[: i + 1]), "is a value, not a table")
        node = child
    node[parts[-1]] = value


def expand_sweep(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One mapping per grid point of the ``[sweep]`` table (which is removed from each)."""
    base = copy.deepcopy(dict(data))
    sweep = base.pop("sweep", None)
    if not sweep:
        return [base]
    if not isinstance(sweep, dict):
        raise InvalidInputError("sweep", "must be a table of key = [values]")
    flat = _flatten(sweep)
    for key, values in flat.items():
        if not isinstance(values, list) or not values:
            raise InvalidInputError(f"sweep.{key}", "must be a non-empty list of values")
    points = []
    for combo in itertools.product(*flat.values()):
        point = copy.deepcopy(base)
        for key, value in zip(flat, combo, strict=True):
            set_dotted(point, key, value)
        point["_sweep_point"] = dict(zip(flat, combo, strict=True))
        points.append(point)
    return points


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def from_mapping(cls: type[T], data: Any, path: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``data``, validating keys, types and choices."""
    where = path or cls.__name__
    if not isinstance(data, Mapping):
        raise InvalidInputError(where, f"must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields and not k.startswith("_")]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise InvalidInputError(key, "unknown key", sorted(fields))
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = convert(hints[name], data[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InvalidInputError(key, "is required")
    try:
        return cls(**kwargs)
    except InvalidInputError as exc:
        if path and not exc.field.startswith(path):
            raise InvalidInputError(f"{path}.{exc.field}", str(exc).split(": ", 1)[-1]
                                    .split(" (valid choices")[0], exc.choices) from None
        raise


def convert(hint: Any, value: Any, key: str) -> Any:
    """Convert a TOML value to the annotated type ``hint`` or raise naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Literal:
        if value not in args:
            raise InvalidInputError(key, f"invalid value {value!r}", [str(a) for a in args])
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, key)
            except InvalidInputError as exc:
                errors.append(exc)
        raise errors[0] if errors else InvalidInputError(key, f"invalid value {value!r}")
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, key)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise InvalidInputError(key, f"must be a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise InvalidInputError(key, f"must have {len(args)} entries, got {len(value)}")
            return tuple(convert(a, v, f"{key}[{i}]")
                         for i, (a, v) in enumerate(zip(args, value, strict=True)))
        inner = args[0] if args else Any
        converted = [convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise InvalidInputError(key, f"must be a table, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise InvalidInputError(key, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInputError(key, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInputError(key, f"must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise InvalidInputError(key, f"must be a string, got {value!r}")
        return value
    return value


def flatten_table(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as one level of dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten_table(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
