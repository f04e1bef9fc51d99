"""Reduction operators: which ufunc combines two buffers, for which dtypes.

An op is resolved once per collective (``resolve(name, dtype)``) into a
``ReduceOp`` whose ``combine`` runs in place on numpy arrays, or on CuPy
arrays through the same ufunc names (the array module is looked up from the
array, so CuPy is never imported here).

    sum prod min max avg      every numeric dtype (avg of bool refused)
    band bor bxor             integers and bool
    land lor lxor             integers and bool: MPI's LAND, LOR, LXOR (1 or 0 in
                              the array's dtype, True or False for bool)

avg of integers is the sum divided by n, truncated toward zero, as NCCL's
(torch code written for NCCL, Lightning's ``sync_dist`` among it, averages
int64 counts with ReduceOp.AVG).

Booleans follow logic: sum and max are "or", prod and min are "and".
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mesh import device
from mesh.tensors import dtype_name

__all__ = ["OPS", "ReduceOp", "Combines", "resolve", "array_module", "apply", "FP_RAISED"]

OPS = ("sum", "prod", "min", "max", "avg", "band", "bor", "bxor", "land", "lor", "lxor")

_UFUNC = {"sum": "add", "avg": "add", "prod": "multiply", "min": "minimum",
          "max": "maximum", "band": "bitwise_and", "bor": "bitwise_or",
          "bxor": "bitwise_xor", "land": "logical_and", "lor": "logical_or",
          "lxor": "logical_xor"}
_INTEGRAL = ("band", "bor", "bxor", "land", "lor", "lxor")


def array_module(a: Any) -> Any:
    """numpy, or the array's own module (cupy) when it is not a numpy array."""
    if isinstance(a, np.ndarray):
        return np
    mod = type(a).__module__.split(".")[0]
    if mod == "cupy":
        import cupy
        return cupy
    if device.is_device(a):     # (the stand-in mesh.device.use put in CuPy's place)
        return device.cupy()
    return np


FP_RAISED = (FloatingPointError, RuntimeWarning)
"""What a numpy ufunc raises for an overflow or an invalid value under the
caller's ``np.seterr(all="raise")`` or a ``warnings`` filter that makes
RuntimeWarning an error: only once its whole output is written (numpy
checks the floating-point flags after the loop)."""


def apply(ufunc: Any, x: Any, y: Any, out: Any) -> None:
    """``ufunc(x, y, out=out)`` whatever the calling thread's floating-point
    error settings: the reduction is the collective's, as MPI's and NCCL's
    (an overflow gives inf, as IEEE says). Raising would fail the call on
    the ranks that happened to reduce the element (and only where the call
    ran in a thread with those settings: a Work's lane has numpy's
    defaults), while their peers return the result. A try costs nothing
    where nothing is raised; np.errstate costs about 2 us a call."""
    if ufunc is np.add and out.dtype == _HALF and _half_add(x, y, out):
        return
    try:
        ufunc(x, y, out=out)
    except FP_RAISED:
        pass        # (the output is whole: see FP_RAISED)


_HALF = np.dtype(np.float16)


def _half_add(x: Any, y: Any, out: Any = None) -> bool:
    """``out = x + y`` (``out`` default ``x``) for float16 numpy arrays by
    torch where it is loaded (numpy's float16 add converts element by
    element: 20 times its float32 add; torch's, the same IEEE sum rounded
    once, about as fast as float32's): whether it did (not for other
    arrays, small or read-only ones, or without torch)."""
    out = x if out is None else out
    torch = sys.modules.get("torch")
    if torch is None or any(type(a) is not np.ndarray or not a.dtype.isnative or
                            not a.flags.writeable or not a.flags.c_contiguous
                            for a in (x, y, out)) or out.size < 4096 or \
            not x.shape == y.shape == out.shape or out.dtype != _HALF or \
            x.dtype != _HALF or y.dtype != _HALF:
        return False
    try:
        torch.add(torch.from_numpy(x), torch.from_numpy(y), out=torch.from_numpy(out))
    except (TypeError, RuntimeError, ValueError):
        return False
    return True


class Combines(Protocol):
    """What an algorithm that only combines whole operands needs of an op
    (recursive doubling): ReduceOp, or a user op (collectives.userop)."""

    def combine(self, dst: Any, src: Any, src_first: bool = False) -> None: ...


@dataclass(frozen=True)
class ReduceOp:
    """A named reduction bound to one dtype. ``combine(dst, src)`` does
    ``dst = dst (op) src`` in place; ``finish(buf, n)`` applies what is left
    once n contributions are combined (the division of avg)."""

    name: str
    dtype: np.dtype

    @property
    def ufunc_name(self) -> str:
        """The name of the ufunc that combines two operands (numpy's and
        CuPy's agree): ``add`` for sum and avg, ``maximum`` for max..."""
        return _UFUNC[self.name]

    def combine(self, dst: Any, src: Any, src_first: bool = False) -> None:
        """``dst = dst (op) src``, or ``src (op) dst`` with ``src_first``.
        The order of the operands can change the bits (a complex product
        rounds differently as a*b and b*a), so two ranks that must agree
        combine the same two operands in the same order."""
        ufunc = getattr(array_module(dst), self.ufunc_name)
        x, y = (src, dst) if src_first else (dst, src)
        if dst.size == 1 and isinstance(dst, np.ndarray):
            # numpy runs a one-element ufunc whose output is its first operand
            # as a reduction into it, another way (a sum of two NaNs gives the
            # second's, a complex product is rounded otherwise): the two ranks
            # of a recursive-doubling exchange, each writing into the operand
            # it holds, returned other bits. Into a buffer of its own it gives
            # what it gives for more elements, in place or not.
            out = np.empty_like(dst)
            apply(ufunc, x, y, out)
            dst[...] = out
        else:
            apply(ufunc, x, y, dst)

    def finish(self, buf: Any, n: int) -> None:
        if self.name == "avg" and n > 1 and buf.size:
            if self.dtype.kind in "iu":
                _divide_toward_zero(buf, n)
            else:
                try:
                    buf /= n
                except FP_RAISED:   # (a subnormal's underflow, under np.seterr(all="raise"))
                    pass


def _divide_toward_zero(buf: Any, n: int) -> None:
    """``buf`` (integers) divided by ``n`` in place, the quotient truncated
    toward zero (C's and NCCL's, not numpy's floor), exact at any magnitude."""
    xp = array_module(buf)
    if n > int(np.iinfo(buf.dtype).max):    # (more ranks than the dtype counts: |q| < 2)
        wide = buf.astype(np.int64 if buf.dtype.kind == "i" else np.uint64)
        _divide_toward_zero(wide, n)
        buf[...] = wide
        return
    if buf.dtype.kind == "u":
        xp.floor_divide(buf, n, out=buf)
        return
    # (ufuncs only, on numpy and CuPy alike) a negative floor with a
    # remainder is one below the truncated quotient
    rem = xp.minimum(xp.remainder(buf, n), 1)                   # 1: a remainder
    xp.floor_divide(buf, n, out=buf)
    below = xp.minimum(xp.maximum(xp.multiply(buf, -1), 0), 1)  # 1: negative
    xp.add(buf, xp.multiply(rem, below), out=buf)     # (a 0-d buf: numpy scalars between)


def _problem(name: str, dt: np.dtype) -> str | None:
    kind = dt.kind
    if kind not in "biufc":
        return f"dtype {dtype_name(dt)} is not numeric"
    if name in _INTEGRAL and kind not in "biu":
        return f"op {name!r} needs an integer or bool dtype, got {dtype_name(dt)}"
    if name == "avg" and kind == "b":
        return "op 'avg' is undefined for bool (use 'max' for any, 'min' for all)"
    if name in ("min", "max") and kind == "c":
        return f"op {name!r} is undefined for complex dtype {dt}"
    return None


def resolve(name: str, dtype: Any) -> ReduceOp:
    """The ReduceOp for ``name`` on ``dtype``; ValueError for an unknown op,
    TypeError for an op that the dtype cannot take."""
    if not isinstance(name, str) or name not in _UFUNC:
        if type(name).__name__ == "Op":     # (collectives.userop's: not importable here)
            raise ValueError(f"a user op ({name!r}) is taken by all_reduce, reduce, "
                             f"reduce_scatter, reduce_scatter_v, scan, exscan, GradReducer "
                             f"and all_reduce_grads, not here")
        raise ValueError(f"unknown reduction op {name!r}; expected one of {', '.join(OPS)} "
                         f"(or a collectives.Op)")
    dt = np.dtype(dtype)
    problem = _problem(name, dt)
    if problem:
        raise TypeError(problem)
    return ReduceOp(name, dt)
