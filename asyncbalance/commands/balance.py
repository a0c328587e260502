"""``asyncbalance balance NET.npz --p P ... -o OUT.npz [--report REPORT.json]``."""

from __future__ import annotations

import argparse
import sys

from ..activations import ACTIVATION_CHOICES, parse_activation
from ..balance import balance_network
from ..errors import InvalidInputError
from ..io import load_npz, save_npz, write_json
from ..network import network_from_arrays
from ..progress import Progress
from ..regularisers import lp
from ..schedules import METHODS


def add_parser(sub: argparse._SubParsersAction) -> str:
    parser = sub.add_parser(
        "balance", help="balance a network stored as .npz",
        description="Balance a layered (W1, b1, ..., WL, bL) or recurrent (W_in, W_rec, W_out, "
                    "b, b_out) network under the L_p regulariser and write the balanced weights.")
    parser.add_argument("net", metavar="NET.npz")
    parser.add_argument("--p", type=float, required=True, help="regulariser power, > 0")
    parser.add_argument("--method", default="exact", choices=METHODS)
    parser.add_argument("--activation", default="relu",
                        help=f"hidden activation: {' | '.join(ACTIVATION_CHOICES)}")
    parser.add_argument("--tol", type=float, default=1e-10,
                        help="stop when max_k |log(A_k / (c_k B_k))| <= tol (default 1e-10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stochastic schedule")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.npz")
    parser.add_argument("--report", metavar="REPORT.json")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    return "balance"


def run(args: argparse.Namespace) -> int:
    regulariser = lp(args.p)
    activation = parse_activation(args.activation, "--activation")
    if not (args.tol > 0):
        raise InvalidInputError("--tol", f"must be > 0, got {args.tol}")
    network = network_from_arrays(load_npz(args.net, "NET.npz"), activation)
    progress = Progress(f"balance ({args.method})", quiet=args.quiet)
    balanced, _, report = balance_network(
        network, regulariser, method=args.method, tol=args.tol, seed=args.seed,
        progress=lambda it, imb: progress.update(f"iteration {it}, max log-imbalance {imb:.2e}"))
    progress.close()
    # Nothing is written unless balancing succeeded; both files are replaced atomically.
    save_npz(args.output, {key: balanced.weights[key] for key in network.weights})
    if args.report:
        write_json(args.report, report.to_dict())
    if not args.quiet:
        error = report.function_max_rel_error
        print(f"cost {report.cost_before:.6g} -> {report.cost_after:.6g}, max log-imbalance "
              f"{report.max_log_imbalance:.2e}, {report.iterations} iterations, "
              f"{report.seconds:.3f}s, function rel. error "
              f"{'n/a' if error is None else f'{error:.1e}'}", file=sys.stderr)
    return 0
