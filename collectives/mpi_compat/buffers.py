"""mpi4py's buffer specifications read into numpy views of the caller's
memory: ``buf``, ``[buf, MPI.DOUBLE]``, ``[buf, count, MPI.DOUBLE]``,
``[buf, (count, displ), MPI.DOUBLE]``, and the v-calls' ``[buf, counts,
displs, MPI.DOUBLE]`` (``[buf, counts, MPI.DOUBLE]``, ``[buf, (counts,
displs), MPI.DOUBLE]``); ``MPI.IN_PLACE``. A buffer is any C-contiguous
numpy array or object with the buffer protocol, seen as a flat array of
the datatype's elements (its bytes reinterpreted, as MPI reads them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .types import IN_PLACE, Datatype, datatype_of

__all__ = ["Buf", "spec", "in_place", "vspec", "copy_into"]


@dataclass
class Buf:
    """A buffer spec read: ``flat``, the whole buffer as 1-D elements of its
    datatype; ``view``, its ``count`` elements from ``displ`` (what a send
    sends and a receive fills); ``counts`` and ``displs`` for the v-calls."""

    flat: np.ndarray
    view: np.ndarray
    counts: list[int] | None = None
    displs: list[int] | None = None


def in_place(buf: Any) -> bool:
    return buf is IN_PLACE


def _flat(buf: Any, dtype: np.dtype | None, what: str) -> np.ndarray:
    if isinstance(buf, np.ndarray):
        a = buf
    else:
        try:
            a = np.asarray(memoryview(buf))
        except TypeError:
            raise TypeError(f"collectives.MPI {what}: {type(buf).__name__} is not a buffer "
                            f"(a numpy array, bytearray or memoryview; objects go by the "
                            f"lowercase calls: send, recv, bcast...)") from None
    if not a.flags.c_contiguous:
        raise ValueError(f"collectives.MPI {what}: the buffer is not contiguous (as mpi4py's "
                         f"BufferError): pass a contiguous copy, np.ascontiguousarray(a)")
    flat = a.reshape(-1)
    if dtype is not None and flat.dtype != dtype:
        if flat.nbytes % dtype.itemsize:
            raise ValueError(f"collectives.MPI {what}: a buffer of {flat.nbytes} bytes is no "
                             f"whole number of {dtype} elements")
        flat = flat.view(np.uint8).view(dtype)
    return flat


def _is_dt(x: Any) -> bool:
    return isinstance(x, (Datatype, str, np.dtype, type))


def _ints(x: Any, what: str) -> list[int]:
    try:
        return [int(k) for k in x]
    except (TypeError, ValueError):
        raise TypeError(f"collectives.MPI {what}: counts and displacements are sequences "
                        f"of ints, got {x!r:.60}") from None


def _parts(buf: Any, what: str) -> tuple[Any, list[Any], Any]:
    """(the buffer, the middle items, the datatype) of a spec."""
    if isinstance(buf, (list, tuple)) and buf and not isinstance(buf[0], (int, float)):
        items = list(buf)
        dt = items.pop() if len(items) > 1 and _is_dt(items[-1]) else None
        if len(items) > 3:
            raise TypeError(f"collectives.MPI {what}: a buffer spec is [buf, datatype], "
                            f"[buf, count, datatype] or [buf, counts, displs, datatype], got "
                            f"{len(buf)} items")
        return items[0], items[1:], dt
    return buf, [], None


def spec(buf: Any, what: str, *, per: int = 1) -> Buf:
    """A non-v spec. ``per``: the blocks the buffer holds when no count is
    given (a collective's receive buffer: one block a rank); the view is
    then one block's count times ``per``."""
    data, mid, dt = _parts(buf, what)
    flat = _flat(data, datatype_of(dt, what), what)
    displ = 0
    if not mid:
        count = len(flat) // per * per
    else:
        c = mid[0]
        if isinstance(c, (tuple, list)) and len(c) == 2:
            count, displ = int(c[0]) * per, int(c[1])
        else:
            count = int(c) * per
        if len(mid) > 1:
            raise TypeError(f"collectives.MPI {what}: [buf, count, datatype] takes one count")
    if displ < 0 or count < 0 or displ + count > len(flat):
        raise ValueError(f"collectives.MPI {what}: {count} elements from {displ} overrun a "
                         f"buffer of {len(flat)}")
    return Buf(flat, flat[displ:displ + count])


def vspec(buf: Any, what: str, size: int) -> Buf:
    """A v-call's spec, read as mpi4py reads it: counts a sequence, one int
    (every rank's) or None (the buffer split as evenly as it goes, the first
    ranks an element more); displacements a sequence, one int (a stride) or
    None (packed); a pair ``(counts, displs)`` in place of the counts."""
    data, mid, dt = _parts(buf, what)
    flat = _flat(data, datatype_of(dt, what), what)
    c: Any = mid[0] if mid else None
    d: Any = mid[1] if len(mid) > 1 else None
    if len(mid) == 1 and isinstance(c, tuple) and len(c) == 2:
        c, d = c
    if c is None:
        counts = [len(flat) // size + (len(flat) % size > r) for r in range(size)]
    elif isinstance(c, (int, np.integer)):
        counts = [int(c)] * size
    else:
        counts = _ints(c, what)
    if len(counts) != size:
        raise ValueError(f"collectives.MPI {what}: {len(counts)} counts for {size} ranks")
    if d is None:
        displs = list(np.cumsum([0] + counts[:-1]).tolist())
    elif isinstance(d, (int, np.integer)):
        displs = [int(d) * r for r in range(size)]
    else:
        displs = _ints(d, what)
    return Buf(flat, flat, counts, displs)


def copy_into(dst: np.ndarray, src: Any, what: str) -> None:
    """``src``'s elements into the start of ``dst`` (its bytes, where the
    dtypes differ, as MPI moves them)."""
    a = np.ascontiguousarray(src).reshape(-1)
    if a.dtype != dst.dtype:
        raw, into = a.view(np.uint8), dst.view(np.uint8)
        if len(raw) > len(into):
            raise ValueError(f"collectives.MPI {what}: {len(raw)} bytes for a buffer of "
                             f"{len(into)}")
        into[:len(raw)] = raw
        return
    dst[:len(a)] = a
