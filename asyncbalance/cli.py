"""The ``asyncbalance`` command line: one subcommand per module in ``asyncbalance.commands``.

Exit status: 0 success; 1 the command ran but did not converge (or reach its tolerance);
2 bad input (options, files, scenarios, records: one line naming the file, key or option),
or no room for the output (a full disk);
3 internal error (one line here, the traceback in a file named on that line);
130 interrupted (Ctrl-C); 141 stdout closed by its reader (e.g. ``| head``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import pkgutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from typing import NoReturn

from . import commands
from .errors import BalanceError, NonConvergenceError

EXIT_OK = 0
EXIT_NOT_CONVERGED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = _Parser(
        prog="asyncbalance",
        description="Synaptic neural balance: exact, local and asynchronous balancing.",
        epilog="exit status: 0 ok, 1 ran but did not converge, 2 bad input, 3 internal error "
               "(traceback saved to a file), 130 interrupted")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers = {}
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        name = module.add_parser(sub)
        handlers[name] = module.run
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    # The command line as typed, for the provenance of records (main may be called directly).
    args.command_line = list(sys.argv) if argv is None else ["asyncbalance", *map(str, argv)]
    prefix = f"asyncbalance {args.command}"
    previous = _interrupt_on_sigterm()
    try:
        return int(handlers[args.command](args) or 0)
    except NonConvergenceError as exc:
        print(f"{prefix}: did not converge: {exc}", file=sys.stderr)
        return EXIT_NOT_CONVERGED
    except BalanceError as exc:
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError as exc:
        # What the estimates before the work did not foresee: still the input's size.
        print(f"{prefix}: error: out of memory ({type(exc).__name__}: "
              f"{str(exc).strip()[:200] or 'no details'}); use a smaller network, fewer "
              "units per shard or a machine with more memory", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # The reader of stdout went away (``| head``): stop quietly, as Unix tools do; the
        # interpreter's final flush must not fail on the closed pipe either.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # The machine's state, not a fault of the program: said in one line.
            where = f" writing {exc.filename}" if exc.filename else ""
            print(f"{prefix}: error: no space left on the device{where}; free some space or "
                  "write elsewhere (a run's record is kept, marked incomplete)", file=sys.stderr)
            return EXIT_BAD_INPUT
        if exc.filename is None:
            return _internal_error(prefix, exc)
        # A file the command was given or told to write cannot be used: an input problem.
        print(f"{prefix}: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - the last resort: one line and a saved traceback
        return _internal_error(prefix, exc)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt_on_sigterm() -> object:
    """SIGTERM (a job scheduler's stop, ``kill``) ends a command as Ctrl-C does: a run's
    record is marked incomplete and interrupted, not left at "running". The previous
    handler, to restore (None where none was set: not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _internal_error(prefix: str, exc: BaseException) -> int:
    text = "".join(traceback.format_exception(exc))
    try:
        fd, path = tempfile.mkstemp(prefix=f"asyncbalance-error-{time.strftime('%Y%m%d-%H%M%S')}-",
                                    suffix=".txt")
        with os.fdopen(fd, "w") as handle:
            handle.write(f"command line: {sys.argv}\n\n{text}")
        where = f"traceback written to {path}"
    except OSError as write_error:
        where = f"the traceback could not be saved ({write_error.strerror or write_error})"
    message = str(exc).strip().splitlines()
    print(f"{prefix}: internal error: {type(exc).__name__}: "
          f"{message[0] if message else 'no details'} ({where}; please report it)",
          file=sys.stderr)
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
