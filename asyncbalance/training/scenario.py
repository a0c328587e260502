"""Scenario files -> one validated ``TrainConfig`` per (sweep point, setting, variant).

``[settings.<label>]`` and ``[variants.<label>]`` tables hold overrides as dotted keys
(``"optimizer.lr" = 0.01``) or nested tables; ``--set key=value`` overrides are applied last.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import (
    apply_overrides,
    expand_sweep,
    flatten_table,
    from_mapping,
    load_toml,
    set_dotted,
)
from ..errors import InvalidInputError
from .config import TrainConfig


def _labelled(data: dict[str, Any], key: str) -> list[tuple[str, dict[str, Any]]]:
    table = data.pop(key, None)
    if table is None:
        return [("", {})]
    if not isinstance(table, dict) or not table:
        raise InvalidInputError(key, "must be a non-empty table of labelled override tables")
    out = []
    for label, overrides in table.items():
        if not isinstance(overrides, dict):
            raise InvalidInputError(f"{key}.{label}", "must be a table of dotted-key overrides")
        out.append((label, flatten_table(overrides)))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-") or "run"


def point_label(point: Mapping[str, Any]) -> str:
    parts = []
    for key, value in point.items():
        shown = "-".join(str(v) for v in value) if isinstance(value, list) else str(value)
        parts.append(f"{key.split('.')[-1]}={shown}")
    return ",".join(parts)


def scenario_configs(data: Mapping[str, Any], overrides: Sequence[str] = (),
                     only: Sequence[str] = ()) -> list[TrainConfig]:
    """Expand a scenario mapping into validated configs (``only``: keep labels containing
    any of these substrings)."""
    base = copy.deepcopy(dict(data))
    settings = _labelled(base, "settings")
    variants = _labelled(base, "variants")
    configs = []
    for point in expand_sweep(base):
        sweep_point = point.pop("_sweep_point", {})
        for set_label, set_over in settings:
            for var_label, var_over in variants:
                merged = copy.deepcopy(point)
                for key, value in {**set_over, **var_over}.items():
                    set_dotted(merged, key, value)
                merged = apply_overrides(merged, overrides)
                label = "/".join(x for x in (point_label(sweep_point), set_label, var_label)
                                 if x) or str(merged.get("label") or "default")
                merged["label"] = label
                if only and not any(o in label for o in only):
                    continue
                configs.append(from_mapping(TrainConfig, merged))
    if not configs:
        raise InvalidInputError("--only", "matches no run label of the scenario")
    return configs


def load_scenario(path: str | Path, overrides: Sequence[str] = (),
                  only: Sequence[str] = ()) -> list[TrainConfig]:
    data = load_toml(path)
    data.setdefault("name", Path(path).stem)
    return scenario_configs(data, overrides, only)


def run_dir_name(config: TrainConfig, seed: int) -> Path:
    return Path(_slug(config.name)) / Path(*[_slug(p) for p in config.label.split("/")]) \
        / f"seed-{seed}"
