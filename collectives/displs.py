"""Displacements for the v-collectives (MPI's ``[buf, counts, displs, type]``).

MPI places rank r's block at ``displs[r]`` (elements of the buffer; here rows,
as the counts are) instead of packed in rank order, and leaves what lies
between the blocks as it was. The packed calls (collectives.api) move the
blocks; this module cuts the send side's blocks out of the caller's array
(one copy, none where they lie packed already) and places the receive side's
into ``out=`` (the caller's buffer: its gaps are kept) or a new zeroed array.
Each works on the caller's kind of array (numpy, a device array, a torch
tensor). What is wrong with a call's displacements (not ``g.size`` integers
>= 0, blocks that overlap or end past their buffer, an ``out=`` of another
shape or dtype) is found before the call and fails it on every rank (the
packed call's ``bad``), naming the rank whose block it is. Only calls given
``displs``/``out=`` come here: the packed ones copy nothing more."""
from __future__ import annotations

import sys
from typing import Any, Callable

import numpy as np

from mesh import Comm, device
from mesh.tensors import is_tensor

from .device.paths import DeviceWork
from .runner import named

__all__ = ["scatter_v", "gather_v", "all_gather_v", "all_to_all_v"]


def _ints(x: Any, n: int) -> list[int] | None:
    """``x`` (a sequence, numpy array or tensor of ``n`` integers >= 0) as
    ints, or None."""
    if is_tensor(x) or isinstance(x, np.ndarray):
        x = x.tolist()
    try:
        got = list(x)
    except TypeError:
        return None
    if len(got) != n or any(not isinstance(k, (int, np.integer)) or isinstance(k, bool)
                            or k < 0 for k in got):
        return None
    return [int(k) for k in got]


def _packed(counts: list[int]) -> list[int]:
    off, at = [], 0
    for k in counts:
        off.append(at)
        at += k
    return off


def _blocks(g: Comm, me: str, what: str, counts: list[int], displs: Any, rows: int | None,
            buf: str, apart: bool = True) -> tuple[list[int], str | None]:
    """``displs`` as ints (the packed offsets where None) and what is wrong
    with them: not ``g.size`` integers >= 0, a block ending past ``rows``
    (None: no end), or (``apart``) two blocks that overlap."""
    n = g.size
    if displs is None:
        return _packed(counts), None
    got = _ints(displs, n)
    if got is None:
        return [], f"{me}: {what} must be {n} integers >= 0 (one a rank), got {displs!r:.200}"
    spans = sorted((d, d + k, r) for r, (d, k) in enumerate(zip(got, counts)) if k)
    for lo, hi, r in spans:
        if rows is not None and hi > rows:
            return [], (f"{me}: {named(g, r)}'s block, rows [{lo}, {hi}) ({what}[{r}] = {lo}, "
                        f"{counts[r]} rows), ends past {buf}'s {rows} rows")
    if apart:
        for (lo, hi, r), (lo2, hi2, r2) in zip(spans, spans[1:]):
            if lo2 < hi:
                return [], (f"{me}: {named(g, r2)}'s block, rows [{lo2}, {hi2}) ({what}[{r2}] "
                            f"= {lo2}), overlaps {named(g, r)}'s, rows [{lo}, {hi}) ({what}[{r}]"
                            f" = {lo}): blocks may not overlap")
    return got, None


def _kind(x: Any) -> str:
    return "a torch tensor" if is_tensor(x) else "a numpy array" if isinstance(
        x, np.ndarray) else "a device array" if device.is_device(x) else type(x).__name__


def _cut(a: Any, counts: list[int], displs: list[int]) -> Any:
    """The blocks of ``a`` at ``displs``, packed in rank order: ``a`` itself
    (its first rows) where they are already."""
    total = sum(counts)
    if displs == _packed(counts):
        return a[:total] if a.shape[0] != total else a
    if is_tensor(a):
        return sys.modules["torch"].cat([a[d:d + k] for d, k in zip(displs, counts)])
    if isinstance(a, np.ndarray):
        return np.concatenate([a[d:d + k] for d, k in zip(displs, counts)])
    a = device.as_cupy(a)       # (a device array: CuPy's, or one it views)
    dest = _zeros(a, total)
    at = 0
    for d, k in zip(displs, counts):
        dest[at:at + k] = a[d:d + k]
        at += k
    return dest


def _zeros(like: Any, rows: int) -> Any:
    """A new array of ``rows`` zero rows like ``like``'s (its kind, dtype, device)."""
    shape = (rows,) + tuple(like.shape[1:])
    if is_tensor(like):
        return like.new_zeros(shape)
    if isinstance(like, np.ndarray):
        return np.zeros(shape, like.dtype)
    return device.cupy().zeros(shape, like.dtype)


def _out_problem(me: str, out: Any, a: Any, rows: int) -> str | None:
    """What keeps ``out`` from taking ``rows`` rows like ``a``'s, or None."""
    if _kind(out) != _kind(a) or not hasattr(out, "shape") or not len(out.shape):
        return f"{me}: out= must be {_kind(a)} with rows, as the array sent is; got " \
               f"{type(out).__name__}"
    shape = getattr(a, "shape", None)
    if shape is not None and len(shape) and (tuple(out.shape[1:]) != tuple(shape[1:])
                                             or out.dtype != a.dtype):
        return (f"{me}: out= is {out.dtype}{list(out.shape)}: its rows must be "
                f"{a.dtype}{list(shape[1:])}, as the array's")
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        return f"{me}: out= is read-only"
    return None


def _placing(counts: list[int], displs: list[int], out: Any, asked: bool) -> Callable:
    """The step that places a packed result's blocks at ``displs`` in ``out``
    (or a new zeroed array) and returns it; the result as is when not
    ``asked`` (a rank where the call returns None)."""
    def place(res: Any) -> Any:
        if not asked or res is None:
            return res
        dest = out
        if dest is None:
            dest = _zeros(res, max((d + k for d, k in zip(displs, counts) if k), default=0))
        elif not is_tensor(dest) and not isinstance(dest, np.ndarray):
            dest = device.as_cupy(dest)         # (written through CuPy's view of it)
        at = 0
        if is_tensor(dest):
            import torch
            with torch.no_grad():       # (a write into the caller's tensor, not a graph op)
                for d, k in zip(displs, counts):
                    dest[d:d + k] = res[at:at + k]
                    at += k
            return dest
        for d, k in zip(displs, counts):
            dest[d:d + k] = res[at:at + k]
            at += k
        return dest if out is None else out
    return place


def _then(res: Any, place: Callable, async_op: bool, host: bool) -> Any:
    """``place(res)``, or for an async call a Work whose wait gives it (a host
    array's placed as the call completes, in its lane: DeviceWork)."""
    return DeviceWork(res, place, eager=host) if async_op else place(res)


def scatter_v(call: Callable, g: Comm, a: Any, counts: Any, root: Any, displs: Any,
              async_op: bool, timeout: Any, dtype: Any) -> Any:
    """collectives.api.scatter_v with the root's ``displs`` (ignored elsewhere)."""
    me = f"rank {g.ranks[g.rank]}: scatter_v on group {g.name}"
    sizes = _ints(counts, g.size)
    bad = None
    if sizes is not None and isinstance(root, (int, np.integer)) and root == g.rank \
            and hasattr(a, "shape") and len(a.shape):
        at, bad = _blocks(g, me, "displs", sizes, displs, int(a.shape[0]), "the array")
        if bad is None:
            a = _cut(a, sizes, at)
    return call(g, a, counts, root, async_op, timeout, dtype, bad)


def _gathered(call: Callable, g: Comm, a: Any, counts: Any, displs: Any, out: Any,
              asked: bool, name: str, args: tuple, async_op: bool) -> Any:
    """gather_v or all_gather_v (``call(*args, bad)``) placed at ``displs``
    on the ranks that get the result (``asked``)."""
    me = f"rank {g.ranks[g.rank]}: {name} on group {g.name}"
    sizes = _ints(counts, g.size)
    bad: str | None = None
    at: list[int] = []
    if asked and sizes is None and counts is None:
        bad = f"{me}: displs and out= need the counts (counts=None exchanges them)"
    elif asked and sizes is not None:
        rows = None if out is None or not hasattr(out, "shape") or not len(out.shape) \
            else int(out.shape[0])
        at, bad = _blocks(g, me, "displs", sizes, displs, rows, "out=")
        if bad is None and out is not None:
            bad = _out_problem(me, out, a, rows or 0)
    res = call(*args, bad)
    place = _placing(sizes or [], at, out, asked and bad is None)
    return _then(res, place, async_op, isinstance(a, np.ndarray))


def gather_v(call: Callable, g: Comm, a: Any, counts: Any, root: Any, displs: Any, out: Any,
             async_op: bool, timeout: Any) -> Any:
    """collectives.api.gather_v with the root's ``displs`` and ``out=``."""
    asked = isinstance(root, (int, np.integer)) and root == g.rank
    return _gathered(call, g, a, counts, displs, out, asked, "gather_v",
                     (g, a, counts, root, async_op, timeout), async_op)


def all_gather_v(call: Callable, g: Comm, a: Any, counts: Any, displs: Any, out: Any,
                 async_op: bool, timeout: Any) -> Any:
    """collectives.api.all_gather_v with ``displs`` and ``out=``."""
    return _gathered(call, g, a, counts, displs, out, True, "all_gather_v",
                     (g, a, counts, async_op, timeout), async_op)


def all_to_all_v(call: Callable, g: Comm, a: Any, send_counts: Any, recv_counts: Any,
                 send_displs: Any, recv_displs: Any, out: Any, async_op: bool,
                 timeout: Any) -> Any:
    """collectives.api.all_to_all_v with ``send_displs`` (blocks that may
    overlap: they are only read, as MPI's sdispls), ``recv_displs`` and
    ``out=``."""
    me = f"rank {g.ranks[g.rank]}: all_to_all_v on group {g.name}"
    sends, recvs = _ints(send_counts, g.size), _ints(recv_counts, g.size)
    bad: str | None = None
    at: list[int] = []
    if sends is not None and send_displs is not None and hasattr(a, "shape") and len(a.shape):
        cut, bad = _blocks(g, me, "send_displs", sends, send_displs, int(a.shape[0]),
                           "the array", apart=False)
        if bad is None:
            a = _cut(a, sends, cut)
    placing = recv_displs is not None or out is not None
    if bad is None and placing and recv_counts is None:
        bad = f"{me}: recv_displs and out= need recv_counts (None exchanges them)"
    elif bad is None and placing and recvs is not None:
        rows = None if out is None or not hasattr(out, "shape") or not len(out.shape) \
            else int(out.shape[0])
        at, bad = _blocks(g, me, "recv_displs", recvs, recv_displs, rows, "out=")
        if bad is None and out is not None:
            bad = _out_problem(me, out, a, rows or 0)
    res = call(g, a, send_counts, recv_counts, async_op, timeout, bad)
    if not placing:
        return res
    place = _placing(recvs or [], at, out, bad is None)
    return _then(res, place, async_op, isinstance(a, np.ndarray))
