"""``asyncbalance report RUN_DIR... -o REPORT.md``: tables (mean ± std over seeds) and plots."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

from ..errors import InvalidInputError
from ..io import check_output_file

#: The plots written beside REPORT.md, REPORT-<scenario>-<suffix> (see
#: ``asyncbalance.training.report``).
PLOT_SUFFIXES = ("-accuracy.png", "-imbalance.png", "-imbalance-epochs.png", "-fa-law.png",
                 "-bp-law.png")


def add_parser(sub: argparse._SubParsersAction) -> str:
    parser = sub.add_parser(
        "report", help="summarise training runs as markdown tables and PNG plots",
        description="Collect every run record (summary.json + epochs.csv) at or below the "
                    "given directories, group runs by scenario and label, and write a markdown "
                    "report with PNG plots beside it (REPORT-accuracy.png, ...). Runs of one "
                    "group must differ only in their seed. Existing files are not replaced "
                    "unless --overwrite; a run's own records never are.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("-o", "--output", required=True, metavar="REPORT.md")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing report and its plots")
    return "report"


def report_outputs(output: str | os.PathLike) -> list[Path]:
    """REPORT.md and the existing files beside it that a report of that name may replace
    (its plots, whichever scenarios they are of)."""
    out = Path(output)
    if not out.parent.is_dir():
        return [out]
    plots = [p for p in out.parent.glob(f"{out.stem}-*.png")
             if p.name.endswith(PLOT_SUFFIXES)]
    return [out, *sorted(plots)]


def check_report_outputs(runs: list[str], output: str, overwrite: bool) -> None:
    """Refuse outputs that are the records read, and existing files unless ``overwrite``."""
    from ..training.records import EPOCHS, SUMMARY, find_runs

    inputs = {os.path.realpath(run / name) for run in find_runs(runs)
              for name in (SUMMARY, EPOCHS)}
    for target in report_outputs(output):
        if os.path.realpath(target) in inputs:
            raise InvalidInputError("-o/--output", f"{target} is one of the run records the "
                                    "report reads; write the report elsewhere")
    check_output_file(output, "-o/--output")
    for target in report_outputs(output):
        try:
            info = os.stat(target)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and not overwrite:
            raise InvalidInputError("-o/--output", f"{target} already exists; choose another "
                                    "name or add --overwrite")


def run(args: argparse.Namespace) -> int:
    from ..training.report import build_report  # imported on use: it loads matplotlib

    check_report_outputs(args.runs, args.output, args.overwrite)
    build_report(args.runs, args.output)
    print(f"wrote {args.output}")
    return 0
