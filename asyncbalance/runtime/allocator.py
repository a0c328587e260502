"""Keep the memory a run frees for its own reuse instead of handing it back to the system.

glibc serves every allocation above its mmap threshold (32 MiB at most) with a fresh mapping
and unmaps it on free, so a simulator window's arrays of link messages (tens of MB each, a
few per window) come back as new pages every window, each page faulted in and zeroed again.
On a virtual machine that reclaims freed memory this is slow: measured on the 2-core VM of
BENCHMARKS.md, touching 1 GiB of fresh pages took 5 s, reusing freed ones 0.06 s. At 10^5
neurons (BENCHMARKS.md) a run spent 14-22 s in the system, against 12 s with this.

``retain_freed_memory`` has the allocator serve large arrays from its heap and trim the heap
only when 2 GiB at its top are free, so that freed arrays are reused in place. The process
keeps its peak size until it ends (which the memory estimate already assumes of a run).
Only the command line calls it, for the process that runs the simulator or coordinates a
run; a library user's allocator is left as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# The largest value mallopt takes (an int): a heap is trimmed only when 2 GiB at its top
# are free at once.
_TRIM_ABOVE = 2**31 - 1


def retain_freed_memory() -> bool:
    """Large allocations from the heap, and no trimming (glibc only); whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    trimmed = mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE)
    mapped = mallopt(_M_MMAP_MAX, 0)
    return bool(trimmed and mapped)
