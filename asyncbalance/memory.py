"""Memory the machine can give this process, and a refusal when a job cannot fit.

``available_bytes`` is the least of: the kernel's estimate of memory available without
swapping plus free swap (``/proc/meminfo``), the address-space limit (``ulimit -v``) less
what the process already maps, and the cgroup's ``memory.max`` less its current use. On a
system without ``/proc`` only the address-space limit is known (None if unlimited).
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

from .errors import InvalidInputError

__all__ = ["available_bytes", "check_fits", "format_bytes"]


def _meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[name] = int(parts[0]) * 1024
    return values


def _mapped_bytes() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _cgroup_room() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            return max(int(limit) - used, 0)
    return None


def available_bytes() -> int | None:
    """Bytes this process can still allocate (see the module doc); None when unknown."""
    candidates = []
    info = _meminfo()
    if "MemAvailable" in info:
        candidates.append(info["MemAvailable"] + info.get("SwapFree", 0))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        candidates.append(max(soft - _mapped_bytes(), 0))
    room = _cgroup_room()
    if room is not None:
        candidates.append(room)
    return min(candidates) if candidates else None


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def check_fits(field: str, needed: float, what: str, advice: str,
               available: int | None = None) -> None:
    """Refuse (``InvalidInputError`` naming ``field``) when ``needed`` bytes exceed what is
    available. ``what`` says what the estimate covers; ``advice`` how to shrink the job."""
    room = available_bytes() if available is None else available
    if room is not None and needed > room:
        raise InvalidInputError(field, f"needs about {format_bytes(needed)} of memory "
                                f"({what}) but about {format_bytes(room)} is available; "
                                f"{advice}")
