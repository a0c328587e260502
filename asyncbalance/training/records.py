"""Run records: ``summary.json`` and ``epochs.csv`` in a run directory, written atomically.

The files are written into a hidden temporary directory beside the target, which is renamed
into place only when both are complete: a failed run leaves no partial run directory.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..errors import InvalidInputError
from ..io import atomic_write, make_temp_dir, write_json

SUMMARY = "summary.json"
EPOCHS = "epochs.csv"


def _cell(value: object) -> object:
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    if value is None:
        return ""
    return value


def epochs_csv(rows: Sequence[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    return buffer.getvalue()


def write_run(directory: str | os.PathLike, summary: dict, rows: Sequence[dict],
              overwrite: bool = False) -> Path:
    """Write the run record to ``directory``; an existing record there is an error unless
    ``overwrite`` (then it is replaced as a whole, never mixed with the new files)."""
    target = Path(directory)
    if target.exists() and not overwrite:
        raise existing_run_error(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, f".{target.name}.")
    try:
        write_json(tmp / SUMMARY, summary)
        with atomic_write(tmp / EPOCHS, "w") as handle:
            handle.write(epochs_csv(rows))
        if target.exists():
            if not overwrite:  # another run claimed the directory while this one trained
                raise existing_run_error(target)
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
        raise
    return target


def existing_run_error(target: Path) -> InvalidInputError:
    return InvalidInputError("--out", f"{target} already holds a run record; pass --overwrite "
                             "to replace it, or choose another --out")


def read_epochs(path: str | os.PathLike) -> list[dict]:
    """Rows of an ``epochs.csv`` with numbers converted (empty cells become None)."""
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            parsed: dict = {}
            for key, value in row.items():
                if value == "":
                    parsed[key] = None
                    continue
                try:
                    parsed[key] = float(value)
                except ValueError:
                    parsed[key] = value
            rows.append(parsed)
    return rows


def find_runs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Every run directory (holding ``summary.json``) at or below the given paths."""
    runs: list[Path] = []
    for path in paths:
        root = Path(path)
        if (root / SUMMARY).is_file():
            runs.append(root)
        elif root.is_dir():
            runs += sorted(p.parent for p in root.rglob(SUMMARY)
                           if not any(part.startswith(".") for part in p.parent.parts[-1:]))
    return runs
