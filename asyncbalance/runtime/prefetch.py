"""``prefetch(array, index)``: ask the CPU for the cache line of ``array[index]`` ahead of use.

The compiled loops of ``block_loops`` read arrays of every link (10^7 and more entries) at
addresses no hardware prefetcher can guess; each such read waits on main memory. Requested a
few dozen iterations ahead, those waits overlap: measured at 10^5 neurons (fan-in 133), a
delivery 37 -> 20 ns and a move's neighbour read 16 -> 6 ns.

It is LLVM's ``llvm.prefetch`` (read, high locality, data cache): a hint that never faults
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

__all__ = ["prefetch"]


def _no_op(array: Any, index: int) -> None:
    del array, index


if intrinsic is None:
    prefetch = _no_op
else:
    @intrinsic
    def prefetch(typingctx, array, index):  # type: ignore[no-redef]  # pragma: no cover
        del typingctx
        if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
            return None
        signature = types.void(array, index)

        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            address = builder.bitcast(builder.gep(data, [args[1]]), cgutils.voidptr_t)
            # The intrinsic's name carries its pointer type: "p0" where LLVM's pointers are
            # opaque (llvmlite >= 0.45), "p0i8" before.
            suffix = "p0" if str(cgutils.voidptr_t) == "ptr" else "p0i8"
            i32 = ir.IntType(32)
            function = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t, i32, i32,
                                                                i32]),
                f"llvm.prefetch.{suffix}")
            # read (0), high temporal locality (3), data cache (1)
            builder.call(function, [address, i32(0), i32(3), i32(1)])
            return context.get_dummy_value()

        return signature, codegen
