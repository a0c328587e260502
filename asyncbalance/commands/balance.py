"""``asyncbalance balance NET.npz --p P ... -o OUT.npz [--report REPORT.json] [--json]``."""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from ..activations import ACTIVATION_CHOICES, parse_activation
from ..balance import balance_network
from ..errors import InvalidInputError, ResultOverflowError
from ..io import StagedFiles, check_distinct, check_output_file, json_text, load_npz, write_npz
from ..network import network_from_arrays
from ..progress import Progress
from ..provenance import finish, provenance
from ..regularisers import lp
from ..schedules import METHODS


def add_parser(sub: argparse._SubParsersAction) -> str:
    parser = sub.add_parser(
        "balance", help="balance a network stored as .npz",
        description="Balance a layered (W1, b1, ..., WL, bL) or recurrent (W_in, W_rec, W_out, "
                    "b, b_out) network under the L_p regulariser and write the balanced weights. "
                    "OUT.npz may be NET.npz itself (balanced in place, file mode kept).")
    parser.add_argument("net", metavar="NET.npz")
    parser.add_argument("--p", type=float, required=True, help="regulariser power, > 0")
    parser.add_argument("--method", default="exact", choices=METHODS)
    parser.add_argument("--activation", default="relu",
                        help=f"hidden activation: {' | '.join(ACTIVATION_CHOICES)}")
    parser.add_argument("--tol", type=float, default=1e-10,
                        help="stop when max_k |log(A_k / (c_k B_k))| <= tol (default 1e-10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stochastic schedule")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.npz")
    parser.add_argument("--report", metavar="REPORT.json",
                        help="write the report (with provenance) as JSON")
    parser.add_argument("--json", action="store_true",
                        help="print the report as JSON on stdout instead of the summary line")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress and no summary line (--json still prints)")
    return "balance"


def run(args: argparse.Namespace) -> int:
    record = provenance(getattr(args, "command_line", None))
    regulariser = lp(args.p)
    activation = parse_activation(args.activation, "--activation")
    if not (math.isfinite(args.tol) and args.tol > 0):
        raise InvalidInputError("--tol", f"must be a finite number > 0, got {args.tol}")
    if args.seed < 0:
        raise InvalidInputError("--seed", f"must be an integer >= 0, got {args.seed}")
    # Every output is checked before any work, so a bad path costs nothing and writes nothing.
    check_output_file(args.output, "-o/--output")
    if args.report:
        check_output_file(args.report, "--report")
    check_distinct([("NET.npz", args.net), ("--report", args.report)])
    check_distinct([("-o/--output", args.output), ("--report", args.report)])
    network = network_from_arrays(load_npz(args.net, "NET.npz"), activation)
    if network.n_hidden == 0:
        raise InvalidInputError(
            "NET.npz", f"{args.net} has no hidden units (a single layer): there is nothing to "
            "balance, since balancing rescales hidden units between two layers")
    progress = Progress(f"balance ({args.method})", quiet=args.quiet)
    try:
        # Overflow is detected and reported in words; numpy's warnings would only add noise.
        with np.errstate(all="ignore"):
            balanced, _, report = balance_network(
                network, regulariser, method=args.method, tol=args.tol, seed=args.seed,
                progress=lambda it, imb: progress.update(
                    f"iteration {it}, max log-imbalance {imb:.2e}"))
    except ResultOverflowError as exc:
        raise ResultOverflowError(exc.field, f"{str(exc).split(': ', 1)[1]} (at --p {args.p:g})"
                                  ) from None
    finally:
        progress.close()
    summary = {**report.to_dict(), "input": str(args.net), "output": str(args.output),
               "provenance": finish(record)}
    with StagedFiles() as staged:
        with staged.open(args.output, "wb") as handle:
            write_npz(handle, {key: balanced.weights[key] for key in network.weights})
        if args.report:
            with staged.open(args.report, "w") as handle:
                handle.write(json_text(summary))
        staged.commit()
    if args.json:
        sys.stdout.write(json_text(summary))
    elif not args.quiet:
        error = report.function_max_rel_error
        print(f"cost {report.cost_before:.6g} -> {report.cost_after:.6g}, max log-imbalance "
              f"{report.max_log_imbalance:.2e}, {report.iterations} iterations, "
              f"{report.seconds:.3f}s, function rel. error "
              f"{'n/a' if error is None else f'{error:.1e}'} -> {args.output}")
    return 0
