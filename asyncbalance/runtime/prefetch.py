"""``prefetch(array, index)``: ask the CPU for the cache line of ``array[index]`` ahead of use
(``prefetch_write``: ahead of a store).

The compiled loops of ``block_loops`` read arrays of every link (10^7 and more entries) at
addresses no hardware prefetcher can guess; each such read waits on main memory. Requested a
few dozen iterations ahead, those waits overlap: measured at 10^5 neurons (fan-in 133), a
delivery 37 -> 18 ns and a move's neighbour read 16 -> 6 ns; the fan-out's stores into its
arrival windows (one stream per window) 11 -> 7.5 ns per link message.

It is LLVM's ``llvm.prefetch`` (high locality, data cache): a hint that never faults
and changes no result, so an index past the end is harmless. Outside compiled code (no numba)
it does nothing.
"""

from __future__ import annotations

from typing import Any

try:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # without numba the loops run as Python, where a hint has no use
    intrinsic = None

__all__ = ["prefetch", "prefetch_write"]


def _no_op(array: Any, index: int) -> None:
    del array, index


def _hint(write: int) -> Any:
    """The intrinsic ``(array, index) -> None`` asking for ``array[index]``'s line, to read
    (``write`` 0) or to write (1: the line comes exclusive, so the store that follows does
    not wait for it)."""

    @intrinsic
    def hint(typingctx, array, index):  # pragma: no cover
        del typingctx
        if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
            return None
        signature = types.void(array, index)

        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            address = builder.bitcast(builder.gep(data, [args[1]]), cgutils.voidptr_t)
            # The intrinsic's name carries its pointer type: "p0i8" where llvmlite's IR
            # spells typed pointers (LLVM with opaque pointers renames it to "p0", checked
            # in the emitted code: prefetcht0), "p0" where it spells them "ptr".
            suffix = "p0" if str(cgutils.voidptr_t) == "ptr" else "p0i8"
            i32 = ir.IntType(32)
            function = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t, i32, i32,
                                                                i32]),
                f"llvm.prefetch.{suffix}")
            # read or write, high temporal locality (3), data cache (1)
            builder.call(function, [address, i32(write), i32(3), i32(1)])
            return context.get_dummy_value()

        return signature, codegen

    return hint


if intrinsic is None:
    prefetch = prefetch_write = _no_op
else:
    prefetch = _hint(0)
    prefetch_write = _hint(1)
