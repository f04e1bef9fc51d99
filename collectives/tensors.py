"""torch tensors through the collectives (collectives.api hands them here).

A CPU tensor runs on the host paths as a numpy view of its memory, a CUDA
tensor on the device paths as a CuPy view (on torch's current stream):
in-place collectives write into the caller's tensor (non-contiguous views
too), the others return tensors of the caller's dtype on its device.

bfloat16 travels as its raw 16 bits, except where values are combined
(all_reduce, reduce, reduce_scatter): there it is widened to float32 for the
whole reduction and rounded back to bfloat16 once, at the end, from a
float32 result that is bitwise the same on every rank, so the bfloat16
result is too. Fingerprints name it bfloat16 (mesh.tensors).
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from mesh import tensors
from mesh.tensors import is_tensor

from .device.paths import DeviceWork
from .runner import start

__all__ = ["is_tensor", "run"]

_REDUCING = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_v", "scan", "exscan")
_IN_PLACE = ("all_reduce", "broadcast", "reduce")


def run(fn: Callable[..., Any], name: str, g: Any, t: Any, **kw: Any) -> Any:
    """``fn(g, view of t, **kw)`` (a collectives.api function) for the
    tensor ``t``; its result as the blocking call or ``Work.wait()`` of a
    tensor collective returns it: ``t`` itself when in place, else a tensor
    like ``t``. A dtype meshrun cannot carry fails the call on every member."""
    torch = sys.modules["torch"]
    async_op = kw.get("async_op", False)
    root = kw.get("root", 0)
    wide = name in _REDUCING and t.dtype == torch.bfloat16
    try:
        if name in ("scatter", "scatter_v") and g.rank != root:   # t only says what the
            # rows should be
            kw["dtype"] = tensors.check(t, f"rank {g.ranks[g.rank]}: {name} on group {g.name}")
            arr, shares = None, True
        elif name in ("scatter", "scatter_v") and t.is_cuda and t.dtype == torch.bfloat16:
            # the root's rows staged here, as the host copy's would be, keeping bfloat16's
            # name (a CuPy view is plain uint16: the others would see another dtype)
            arr, shares = tensors.operand(t.cpu(), f"rank {g.ranks[g.rank]}: {name} on group "
                                                   f"{g.name}")
        else:
            arr, shares = tensors.operand(t, f"rank {g.ranks[g.rank]}: {name} on group "
                                             f"{g.name}", wide)
    except TypeError as e:
        err = e

        def refuse(tuning: Any) -> Any:
            raise err
        return start(g, name, refuse, async_op, kw.get("timeout"))
    if not t.is_cuda:
        res = fn(g, arr, **kw)
    else:
        with tensors.stream_of(t):
            res = fn(g, arr, **kw)

    def finish(result: Any) -> Any:
        if name in _IN_PLACE:
            if name == "reduce" and g.rank != root:
                return t
            if shares:
                return tensors.written(t)
            with tensors.stream_of(t), torch.no_grad():     # (copy_ counts as a write)
                t.copy_(tensors.to_torch(arr, t))
            return t
        if result is None:
            return None
        with tensors.stream_of(t):
            return tensors.to_torch(result, t)
    # a CPU tensor run on a copy (bfloat16 widened) has its result written back in the
    # lane as the call completes, as one on its own memory has, waited or not
    copied = not t.is_cuda and not shares and name in _IN_PLACE and (
        name != "reduce" or g.rank == root)
    return DeviceWork(res, finish, eager=copied) if async_op else finish(res)
