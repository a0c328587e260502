"""``asyncbalance train SCENARIO.toml [--out DIR] [--device cpu|cuda] [--set key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import check_scenario_command
from ..io import check_writable_dir, json_text, nearest_existing
from ..progress import Progress
from ..provenance import finish, provenance

if TYPE_CHECKING:
    from ..training.data import Dataset


def add_parser(sub: argparse._SubParsersAction) -> str:
    parser = sub.add_parser(
        "train", help="train models with balancing interleaved (scenario file)",
        description="Run every configuration and seed of a training scenario; each run writes "
                    "DIR/<scenario>/<label>/seed-<s>/summary.json and epochs.csv. An existing "
                    "run directory is an error unless --overwrite.")
    parser.add_argument("scenario", metavar="SCENARIO.toml")
    parser.add_argument("--out", default="runs", metavar="DIR", help="output root (default runs)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing run records of the same scenario, label and seed")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="override the scenario's device (auto: CUDA when present)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        dest="overrides", help="override a scenario key, e.g. seeds=2")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="run only labels containing TEXT (repeatable)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="directory of IDX files (train-images-idx3-ubyte[.gz], ...)")
    parser.add_argument("--json", action="store_true",
                        help='print {"runs": [summary, ...]} as JSON on stdout at the end')
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    return "train"


# Bytes per MLP parameter while training with balancing: float32 weight, gradient and two
# optimiser moments (16), the float64 twin for the function check (8), its cost (8) and a
# scaled copy (8).
BYTES_PER_PARAMETER = 40


def check_model_memory(config: object, data: Dataset) -> None:
    """Refuse an MLP whose parameters cannot fit in memory, before it is built."""
    from ..memory import check_fits

    model = config.model  # type: ignore[attr-defined]
    if model.kind != "mlp":
        return
    widths = [int(w) for w in model.widths]
    widths[0] = widths[0] or data.n_features
    widths[-1] = widths[-1] or data.n_classes
    params = sum((i + 1) * o for i, o in zip(widths[:-1], widths[1:], strict=True))
    check_fits("model.widths", BYTES_PER_PARAMETER * params,
               f"{params:.3g} parameters x {BYTES_PER_PARAMETER} bytes",
               "use narrower layers (model.widths)")


def _check_out_root(out: Path) -> None:
    """The output root must be (or be creatable as) a writable directory."""
    check_writable_dir(nearest_existing(out), "--out")


def run(args: argparse.Namespace) -> int:
    # torch is imported here, not at start-up, so the other subcommands start quickly.
    from ..training.data import load_dataset
    from ..training.loop import resolve_device, train_run
    from ..training.records import existing_run_error, write_run
    from ..training.scenario import load_scenario, run_dir_name

    check_scenario_command(args.scenario, "train")
    configs = load_scenario(args.scenario, args.overrides, args.only)
    out = Path(args.out)
    _check_out_root(out)
    jobs = [(config, seed) for config in configs
            for seed in range(config.first_seed, config.first_seed + config.seeds)]
    targets = [out / run_dir_name(config, seed) for config, seed in jobs]
    # Refused before any training: a rerun must not silently replace earlier results.
    for target in targets:
        if target.exists() and not args.overwrite:
            raise existing_run_error(target)
    cache: dict[tuple, Dataset] = {}
    # Every job's model is checked against the memory before the first one trains.
    for config, seed in jobs:
        key = (config.data, seed if config.data.fraction < 1 else None, args.data_dir)
        if key not in cache:
            cache[key] = load_dataset(config.data, seed, args.data_dir)
        check_model_memory(config, cache[key])
    summaries = []
    for done, ((config, seed), target) in enumerate(zip(jobs, targets, strict=True), start=1):
        record = provenance(getattr(args, "command_line", None))
        device = str(resolve_device(args.device or config.device))
        key = (config.data, seed if config.data.fraction < 1 else None, args.data_dir)
        progress = Progress(f"[{done}/{len(jobs)}] {config.label} seed {seed}", args.quiet)
        try:
            result = train_run(config, seed, device, data=cache[key],
                               data_dir=args.data_dir, progress=progress.update)
        finally:
            progress.close()
        summary = {**result.summary, "provenance": finish(record)}
        write_run(target, summary, result.rows, overwrite=args.overwrite)
        summaries.append(summary)
        if not args.quiet and not args.json:
            err = summary["max_function_rel_error_at_balance"]
            print(f"{config.label or config.name} seed {seed}: test accuracy "
                  f"{100 * summary['test_accuracy']:.2f}% (best "
                  f"{100 * summary['best_test_accuracy']:.2f}%), {summary['seconds']:.1f}s on "
                  f"{summary['device']}, balance events {summary['n_balance_events']}, max "
                  f"float64 function change {'n/a' if err is None else f'{err:.1e}'} -> "
                  f"{target}")
            sys.stdout.flush()
    if args.json:
        sys.stdout.write(json_text({"runs": summaries}))
    return 0
