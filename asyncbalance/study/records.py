"""Study run records: one small JSON file per finished run, written atomically.

A record holds the cell and seed, the hash of the training configuration (a record whose
configuration no longer matches the study is stale and re-run), the summary figures, the
per-epoch curves the report needs and the provenance block. Temporary files (dot-prefixed)
of an interrupted write are never read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..io import write_json

CURVE_KEYS = ("epoch", "step", "test_accuracy", "test_loss", "train_loss", "train_accuracy",
              "imbalance_median", "imbalance_max", "function_rel_error", "bp_law_drift",
              "bp_law_rms", "fa_law_drift", "alignment_deg_mean", "feedback_cosine",
              "distance_to_optimum", "seconds")
SUMMARY_KEYS = ("test_accuracy", "best_test_accuracy", "train_accuracy", "test_loss",
                "n_train", "n_test", "dataset", "evaluated_on", "device", "seconds",
                "n_balance_events", "max_function_rel_error_at_balance",
                "max_function_rel_error_float32", "balance_seconds", "bp_law_drift",
                "fa_law_drift", "parameters", "torch_version")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def curves(rows: list[dict]) -> dict[str, list]:
    out: dict[str, list] = {}
    for key in CURVE_KEYS:
        if any(key in row for row in rows):
            out[key] = [_clean(row.get(key)) for row in rows]
    return out


def make_record(job_fields: Mapping[str, Any], config_hash: str, mapping: Mapping[str, Any],
                summary: Mapping[str, Any], rows: list[dict], provenance: Mapping[str, Any]
                ) -> dict[str, Any]:
    return {**job_fields, "config_hash": config_hash, "config": mapping,
            "summary": {k: _clean(summary.get(k)) for k in SUMMARY_KEYS if k in summary},
            "curves": curves(rows), "provenance": dict(provenance)}


def write_record(path: Path, record: Mapping[str, Any]) -> None:
    write_json(path, record)


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, or None when it is missing or unreadable (then it is re-run)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and "curves" in data else None


def iter_records(root: Path) -> list[dict[str, Any]]:
    """Every readable record below ``root`` (hidden temporary files skipped)."""
    out = []
    if not root.is_dir():
        return out
    for path in sorted(root.rglob("seed-*.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        record = read_record(path)
        if record is not None:
            record["_path"] = str(path)
            out.append(record)
    return out
