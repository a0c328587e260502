"""``asyncbalance train SCENARIO.toml [--out DIR] [--device cpu|cuda] [--set key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..progress import Progress

if TYPE_CHECKING:
    from ..training.data import Dataset


def add_parser(sub: argparse._SubParsersAction) -> str:
    parser = sub.add_parser(
        "train", help="train models with balancing interleaved (scenario file)",
        description="Run every configuration and seed of a training scenario; each run writes "
                    "DIR/<scenario>/<label>/seed-<s>/summary.json and epochs.csv.")
    parser.add_argument("scenario", metavar="SCENARIO.toml")
    parser.add_argument("--out", default="runs", metavar="DIR", help="output root (default runs)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="override the scenario's device (auto: CUDA when present)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        dest="overrides", help="override a scenario key, e.g. seeds=2")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="run only labels containing TEXT (repeatable)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="directory of IDX files (train-images-idx3-ubyte[.gz], ...)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    return "train"


def run(args: argparse.Namespace) -> int:
    # torch is imported here, not at start-up, so the other subcommands start quickly.
    from ..training.data import load_dataset
    from ..training.loop import resolve_device, train_run
    from ..training.records import write_run
    from ..training.scenario import load_scenario, run_dir_name

    configs = load_scenario(args.scenario, args.overrides, args.only)
    total = sum(c.seeds for c in configs)
    cache: dict[tuple, Dataset] = {}
    done = 0
    for config in configs:
        device = str(resolve_device(args.device or config.device))
        for seed in range(config.first_seed, config.first_seed + config.seeds):
            done += 1
            key = (config.data, seed if config.data.fraction < 1 else None, args.data_dir)
            if key not in cache:
                cache[key] = load_dataset(config.data, seed, args.data_dir)
            progress = Progress(f"[{done}/{total}] {config.label} seed {seed}", args.quiet)
            result = train_run(config, seed, device, data=cache[key],
                               data_dir=args.data_dir, progress=progress.update)
            progress.close()
            target = write_run(Path(args.out) / run_dir_name(config, seed), result.summary,
                               result.rows)
            if not args.quiet:
                s = result.summary
                err = s["max_function_rel_error_at_balance"]
                print(f"{config.label or config.name} seed {seed}: test accuracy "
                      f"{100 * s['test_accuracy']:.2f}% (best {100 * s['best_test_accuracy']:.2f}"
                      f"%), {s['seconds']:.1f}s on {s['device']}, balance events "
                      f"{s['n_balance_events']}, max float64 function change "
                      f"{'n/a' if err is None else f'{err:.1e}'} -> {target}", file=sys.stderr)
    return 0
