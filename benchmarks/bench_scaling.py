"""Scale-out benchmark of block hosts: measure, fit the cost model, write docs/scaling.md.

Three steps, each its own module under ``benchmarks/scaling/``: ``measure`` (the simulator,
two block hosts exchanging frames in one process, local Ray on 1 - 2 hosts; raw points to
``benchmarks/results/scaling.json``), ``fit`` (least squares, held-out checks of the
largest points, the many-node extrapolation; pure) and ``page`` (the generated page).

Usage:
  .venv/bin/python benchmarks/bench_scaling.py              # everything (~10 min, 2 cores)
  .venv/bin/python benchmarks/bench_scaling.py --skip-ray   # simulator and in-process only
  .venv/bin/python benchmarks/bench_scaling.py --only-ray   # measure the Ray points again
  .venv/bin/python benchmarks/bench_scaling.py --from-json  # refit and rewrite the page
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scaling.fit import analyse  # noqa: E402
from benchmarks.scaling.large import balance_large, towers_network  # noqa: E402,F401
from benchmarks.scaling.page import write_page  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "scaling.json"
PARTIAL = ROOT / "benchmarks" / "results" / "scaling.partial.json"
DOC = ROOT / "docs" / "scaling.md"


def _save(data: dict, path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
    tmp.replace(path)


def _save_partial(data: dict) -> None:
    """What is measured so far, beside the results (which stay whole until the end)."""
    _save(data, PARTIAL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-ray", action="store_true", help="no Ray points")
    parser.add_argument("--only-ray", action="store_true",
                        help="measure the Ray points again, keep the others from the JSON")
    parser.add_argument("--with-pairs", action="store_true",
                        help="with --only-ray: the in-process two-host points again too")
    parser.add_argument("--from-json", action="store_true",
                        help=f"refit {RESULTS.relative_to(ROOT)} and rewrite the page only")
    args = parser.parse_args(argv)
    if args.with_pairs and not args.only_ray:
        parser.error("--with-pairs: only with --only-ray")
    if sum((args.skip_ray, args.only_ray, args.from_json)) > 1:
        parser.error("--skip-ray, --only-ray and --from-json: choose one")
    if (args.from_json or args.only_ray) and not RESULTS.is_file():
        print(f"error: {RESULTS.relative_to(ROOT)} is missing: run without --from-json or "
              "--only-ray", file=sys.stderr)
        return 2
    if args.from_json:
        data = json.loads(RESULTS.read_text())
    else:
        from benchmarks.scaling.measure import measure

        previous = json.loads(RESULTS.read_text()) if args.only_ray else None
        data = measure(skip_ray=args.skip_ray, save=_save_partial, previous=previous,
                       pair=args.only_ray and args.with_pairs)
        command = " ".join([".venv/bin/python benchmarks/bench_scaling.py",
                            *(argv if argv is not None else sys.argv[1:])])
        data["commands"] = [*(previous or {}).get("commands", []), command]
        _save(data)
        PARTIAL.unlink(missing_ok=True)
    analysis = analyse(data)
    for line in analysis["summary_lines"]:
        print(line)
    write_page(DOC, data, analysis)
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
