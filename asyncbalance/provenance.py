"""What produced a record: package and library versions, git commit, command line, host, time.

Every ``summary.json`` carries this block so that a result can be traced back to the code
and the environment that made it. Nothing here imports torch or ray: their versions come
from the installed distribution metadata, which is fast and cannot fail on a broken CUDA.
"""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

PACKAGE = "asyncbalance"
_LIBRARIES = ("numpy", "torch", "ray")
# A git call on a healthy checkout takes milliseconds; the bound only guards a hung filesystem.
_GIT_TIMEOUT_S = 2.0


def utc_now() -> str:
    """The current time in UTC, ISO 8601 with seconds and an explicit offset."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def distribution_version(name: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit(path: Path | None = None) -> str | None:
    """The commit checked out where the package lives, or None when not in a git checkout.

    A ``+dirty`` suffix marks uncommitted changes to tracked files. Never raises: without git,
    outside a checkout or on a timeout the answer is None.
    """
    where = path if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=False,
        )
        if head.returncode != 0:
            return None
        commit = head.stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if not commit:
        return None
    if dirty.returncode == 0 and dirty.stdout.strip():
        return commit + "+dirty"
    return commit


def provenance(argv: list[str] | None = None) -> dict:
    """The provenance block of a record, with ``started_utc`` set to now.

    ``argv`` is the command line (defaults to ``sys.argv``); the caller adds ``finished_utc``
    when the work ends.
    """
    command = list(sys.argv if argv is None else argv)
    return {
        "package": PACKAGE,
        "package_version": distribution_version(PACKAGE),
        "git_commit": git_commit(),
        "command_line": command,
        "started_utc": utc_now(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        **{lib: distribution_version(lib) for lib in _LIBRARIES},
    }


def finish(record: dict) -> dict:
    """Stamp the end time on a provenance block (returns the same dict)."""
    record["finished_utc"] = utc_now()
    return record
