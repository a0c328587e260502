"""``asyncbalance study run|report|plan STUDY.toml --budget smoke|cpu|full``."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

DEFAULT_RECORDS = "studies/records"


def add_parser(sub: argparse._SubParsersAction) -> str:
    parser = sub.add_parser(
        "study", help="run a study of claims (resumable) and report it",
        description="A study file lists claims, their settings and arms, and budgets. "
                    "'run' trains every job of a budget not yet recorded (one JSON record per "
                    "run, written atomically; finished runs are skipped, so an interrupted "
                    "run resumes where it stopped); 'report' writes the claims report from "
                    "the records; 'plan' lists the jobs.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("run", "run the jobs of a budget not yet recorded"),
                       ("plan", "list the jobs of a budget and how many have a record of "
                                "their current configuration"),
                       ("report", "write the claims report from the records")):
        p = actions.add_parser(name, help=text, description=text)
        p.add_argument("study", metavar="STUDY.toml")
        p.add_argument("--budget", required=True, choices=("smoke", "cpu", "full"))
        p.add_argument("--records", default=DEFAULT_RECORDS, metavar="DIR",
                       help=f"record root (default {DEFAULT_RECORDS}); records go to "
                            "DIR/<study>/<budget>/")
        p.add_argument("--claim", action="append", default=[], metavar="ID",
                       help="only this claim (repeatable)")
        if name == "run":
            p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
            p.add_argument("--data-dir", default=None, metavar="DIR",
                           help="directory of the Fashion-MNIST IDX files")
            p.add_argument("--threads", type=int, default=1,
                           help="torch CPU threads (default 1)")
            p.add_argument("--max-runs", type=int, default=None, metavar="N",
                           help="stop after N new runs (resume later)")
            p.add_argument("--no-ensemble", action="store_true",
                           help="train every seed as a run of its own (default: the pending "
                                "seeds of a cell train as one ensemble where the "
                                "configuration allows it)")
            p.add_argument("--part", default="1/1", metavar="I/N",
                           help="run only the I-th of N parts of the jobs (whole cells, dealt "
                                "out in turn), so that N processes started with the same "
                                "arguments and --part 1/N .. N/N share one record folder "
                                "without running a job twice (default 1/1: all)")
            p.add_argument("--quiet", action="store_true")
        if name == "report":
            p.add_argument("-o", "--output", default="docs/claims.md", metavar="REPORT.md")
            p.add_argument("--readme", default=None, metavar="README.md",
                           help="rewrite the claims summary block of this README")
            p.add_argument("--run-command", default=None, metavar="TEXT",
                           help="the run command to print in the report")
    return "study"


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..study.spec import load_study, parse_part, plan

    part = parse_part(args.part) if args.action == "run" else (1, 1)
    study = load_study(args.study)
    claims = tuple(args.claim)
    if args.action == "run":
        from ..study.runner import run_study
        log = (lambda _text: None) if args.quiet else (lambda text: print(text, flush=True))
        stats = run_study(study, args.budget, args.records, claims, args.device, args.data_dir,
                          args.threads, args.max_runs, log, ensemble=not args.no_ensemble,
                          part=part)
        print(f"study {study.name} budget {args.budget}: {stats.ran} runs done, "
              f"{stats.skipped} already recorded, {stats.planned} planned "
              f"({stats.seconds:.0f}s)", file=sys.stderr)
        return 0
    if args.action == "plan":
        from ..study.runner import record_root, record_state
        jobs = plan(study, args.budget, claims)
        root = record_root(args.records, study, args.budget)
        total: Counter = Counter()
        states: Counter = Counter()
        for job in jobs:
            total[(job.claim, job.phase)] += 1
            states[(job.claim, job.phase, record_state(study, args.budget, job, root))] += 1
        for (claim, phase), n in total.items():
            waiting = states[(claim, phase, "awaiting tuning")]
            print(f"{claim:32s} {phase:5s} {states[(claim, phase, 'current')]:4d}/{n} recorded"
                  + (f" ({waiting} more awaiting their tuning)" if waiting else ""))
        return 0
    from ..study.report import write_report
    path = write_report(study, args.budget, Path(args.records), Path(args.output), claims,
                        Path(args.readme) if args.readme else None, args.run_command)
    print(f"report written to {path}", file=sys.stderr)
    return 0
