"""The one worker thread that a block and a block host hand half of a large pass to.

The compiled loops release the GIL (numba ``nogil``), and so do numpy's sorts and ufuncs, so
a pass split in two parts runs on two cores. One long-lived thread serves every block of the
process: creating a thread per pass would cost more than the small passes save.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

_worker: ThreadPoolExecutor | None = None


def second_thread() -> ThreadPoolExecutor:
    """The process's worker thread (started on first use)."""
    global _worker
    if _worker is None:
        _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block")
    return _worker
