"""``asyncbalance show RUN_DIR``: the summary of a run (or sweep) record as a table."""

from __future__ import annotations

import argparse

from ..runtime.record import read_summary
from ..runtime.report import summary_table, sweep_table


def add_parser(sub: argparse._SubParsersAction) -> str:
    parser = sub.add_parser("show", help="print a run record's summary as a table",
                            description="Print summary.json (or a sweep's sweep.json) of a "
                                        "run directory written by 'asyncbalance run'.")
    parser.add_argument("run_dir", metavar="RUN_DIR")
    return "show"


def run(args: argparse.Namespace) -> int:
    summary = read_summary(args.run_dir)
    print(sweep_table(summary) if "points" in summary else summary_table(summary))
    return 0
