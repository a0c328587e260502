"""``asyncbalance report RUN_DIR... -o REPORT.md``: tables (mean ± std over seeds) and plots."""

from __future__ import annotations

import argparse

from ..io import check_output_file


def add_parser(sub: argparse._SubParsersAction) -> str:
    parser = sub.add_parser(
        "report", help="summarise training runs as markdown tables and PNG plots",
        description="Collect every run record (summary.json + epochs.csv) at or below the "
                    "given directories, group runs by scenario and label, and write a markdown "
                    "report with PNG plots beside it. Runs of one group must differ only in "
                    "their seed.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("-o", "--output", required=True, metavar="REPORT.md")
    return "report"


def run(args: argparse.Namespace) -> int:
    from ..training.report import build_report  # imported on use: it loads matplotlib

    check_output_file(args.output, "-o/--output")
    build_report(args.runs, args.output)
    print(f"wrote {args.output}")
    return 0
