"""``asyncbalance run SCENARIO.toml [--out DIR] [--backend B] [--address A] [--set k=v]``."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from ..config import check_scenario_command
from ..errors import InvalidInputError
from ..io import check_writable_dir, json_text, nearest_existing
from ..progress import Progress
from ..runtime.allocator import retain_freed_memory
from ..runtime.coordinator import run_points
from ..runtime.memory_estimate import check_scenario_memory
from ..runtime.record import Sample
from ..runtime.report import summary_table, sweep_table
from ..runtime.scenario import BACKENDS, Scenario, load_scenarios


def add_parser(sub: argparse._SubParsersAction) -> str:
    parser = sub.add_parser(
        "run", help="run an asynchronous balancing scenario (simulator or Ray)",
        description="Balance a network with shards that talk over delayed, lossy links, "
                    "judge every sample against the exact optimum and write a run record "
                    "(summary.json, events.msgpack, trace.csv, convergence.png).")
    parser.add_argument("scenario", metavar="SCENARIO.toml")
    parser.add_argument("--out", metavar="DIR",
                        help="run directory to create (default runs/NAME-YYYYmmdd-HHMMSS)")
    parser.add_argument("--backend", choices=BACKENDS, help="override the scenario's backend")
    parser.add_argument("--address", metavar="ADDR",
                        help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a scenario key, e.g. links.mean=2")
    parser.add_argument("--json", action="store_true",
                        help="print the summary (a sweep's: sweep.json) as JSON on stdout "
                             "instead of the table")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    return "run"


class _ProgressBar:
    """Progress on a log scale: from the first error down to the tolerance."""

    def __init__(self, quiet: bool, n_points: int):
        self.display = Progress("run", quiet=quiet)
        self.first: float | None = None
        self.name = ""
        self.n_points = n_points
        self.point = 0

    def __call__(self, sample: Sample, scenario: Scenario) -> None:
        if self.first is None or scenario.name != self.name or sample.time == 0.0:
            self.first = max(sample.max_abs_error, scenario.stop.tol * 10)
            self.name = scenario.name
            self.point += 1
        span = math.log(self.first / scenario.stop.tol)
        error = sample.max_abs_error
        done = math.log(self.first / max(error, 1e-300)) / span if math.isfinite(error) else 0
        filled = int(round(20 * min(max(done, 0.0), 1.0)))
        which = f" point {self.point}/{self.n_points}" if self.n_points > 1 else ""
        self.display.label = f"run {scenario.name}{which}"
        self.display.update(f"[{'#' * filled}{'.' * (20 - filled)}] t={sample.time:.4g} "
                            f"max|u-u*|={sample.max_abs_error:.2e} "
                            f"msgs={sample.messages_sent}")

    def close(self) -> None:
        self.display.close()


def run(args: argparse.Namespace) -> int:
    check_scenario_command(args.scenario, "run")
    checking = Progress("run", args.quiet)
    points = load_scenarios(args.scenario, args.overrides,
                            lambda done, total: checking.update(
                                f"checking sweep point {done}/{total}", force=done == 0))
    checking.close()
    for point in points:
        # Before anything is built: a scenario too large for this machine is refused.
        check_scenario_memory(point.scenario)
    backends = {args.backend or p.scenario.backend for p in points}
    if args.address and "ray" not in backends:
        raise InvalidInputError("--address", "names a Ray cluster, but this run uses the "
                                "simulator (add --backend ray)", BACKENDS)
    out = Path(args.out) if args.out else _default_out(points[0].scenario.name)
    _check_out(out)
    bar = _ProgressBar(args.quiet, len(points))
    # Arrays freed by one simulator window are reused by the next (see ``allocator``).
    retain_freed_memory()
    try:
        result = run_points(points, out, backend=args.backend, address=args.address,
                            progress=bar, command_line=getattr(args, "command_line", None))
    finally:
        bar.close()
    if "points" in result:
        converged = all(row["converged"] for row in result["points"])
        table = sweep_table(result)
    else:
        converged = bool(result["converged"])
        table = summary_table(result)
    if args.json:
        sys.stdout.write(json_text(result))
    else:
        print(table)
        print(f"record: {out}")
    if not converged:
        print("asyncbalance run: did not reach the tolerance within the budget",
              file=sys.stderr)
    return 0 if converged else 1


def _check_out(out: Path) -> None:
    """Refuse an existing --out and a parent that cannot take a new directory, before work."""
    if out.exists():
        raise InvalidInputError("--out", f"{out} already exists; choose a new directory")
    check_writable_dir(nearest_existing(out.parent), "--out")


def _default_out(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{name}-{stamp}"
    suffix = 1
    while out.exists():
        suffix += 1
        out = Path("runs") / f"{name}-{stamp}-{suffix}"
    return out
