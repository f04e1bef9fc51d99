"""mpi4py's buffer specifications read into numpy views of the caller's
memory: ``buf``, ``[buf, MPI.DOUBLE]``, ``[buf, count, MPI.DOUBLE]``,
``[buf, (count, displ), MPI.DOUBLE]``, and the v-calls' ``[buf, counts,
displs, MPI.DOUBLE]`` (``[buf, counts, MPI.DOUBLE]``, ``[buf, (counts,
displs), MPI.DOUBLE]``); ``MPI.IN_PLACE``. A buffer is any C-contiguous
numpy array or object with the buffer protocol, seen as a flat array of
the datatype's elements (its bytes reinterpreted, as MPI reads them). A
derived datatype's elements are packed into a contiguous array, the view
that the call sends or receives into; a receiving call then unpacks it
(``Buf.done``) into their places, the buffer's other bytes untouched."""
from __future__ import annotations

import ctypes

from dataclasses import dataclass
from typing import Any

import numpy as np

from .datatypes import Blocks, Selection, Typemap
from .types import ERR_TYPE, IN_PLACE, Datatype, Exception as MPIException, datatype_of

__all__ = ["Buf", "spec", "in_place", "own_block", "vspec", "copy_into", "check_signature"]


@dataclass
class Buf:
    """A buffer spec read: ``flat``, the whole buffer as 1-D elements of its
    datatype; ``view``, its ``count`` elements from ``displ`` (what a send
    sends and a receive fills); ``counts`` and ``displs`` for the v-calls;
    ``sel``, a derived datatype's elements (``view`` their packed copy,
    ``flat`` the buffer's bytes; a v-call's ``counts`` and ``displs`` then
    in the packed elements); ``datatype``, that derived datatype."""

    flat: np.ndarray
    view: np.ndarray
    counts: list[int] | None = None
    displs: list[int] | None = None
    sel: Selection | Blocks | None = None
    datatype: Datatype | None = None

    @property
    def typed(self) -> bool:
        """Whether a message into it must hold its datatype's elements (a
        derived one's; a predefined one reads any message's bytes)."""
        return self.sel is not None

    def done(self) -> None:
        """A receive's elements into their places (a derived datatype's)."""
        if self.sel is not None:
            self.sel.put(self.view)

    def done_with(self, value: Any) -> Any:
        """``done``, as a receive request's finish (its value passed on)."""
        self.done()
        return value

    def refresh(self) -> None:
        """The buffer's elements packed again (a persistent send's start)."""
        if self.sel is not None:
            self.view[...] = self.sel.get()


def in_place(buf: Any) -> bool:
    return buf is IN_PLACE


def own_block(buf: Any) -> bool:
    """MPI.IN_PLACE, or None where mpi4py reads None as it (an intracommunicator
    collective's send buffer; a Scatter's receive buffer on its root): the
    rank's own block stays where it is."""
    return buf is IN_PLACE or buf is None


def _flat(buf: Any, dtype: np.dtype | None, what: str) -> np.ndarray:
    if isinstance(buf, np.ndarray):
        a = buf
    elif buf is None:                   # (mpi4py's: an empty message, MPI.BOTTOM of 0 bytes)
        a = np.empty(0, np.uint8)
    else:
        try:
            a = np.asarray(memoryview(buf))
        except TypeError:
            got = _dlpack(buf, what)
            if got is None:
                raise TypeError(f"collectives.MPI {what}: {type(buf).__name__} is not a "
                                f"buffer (a numpy array, bytearray, memoryview or a CPU "
                                f"array with __dlpack__; objects go by the lowercase calls: "
                                f"send, recv, bcast...)") from None
            a = got
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


def _dlpack(buf: Any, what: str) -> np.ndarray | None:
    """A CPU array's memory by DLPack (mpi4py takes ``__dlpack__`` objects as
    buffers: a CPU torch tensor, its test suite's DLPack arrays); None for
    another object. The capsule is read as mpi4py reads it (not consumed:
    its producer frees the tensor with it, which the array returned keeps),
    so any element type numpy has goes, a complex one as two float lanes too."""
    if not hasattr(buf, "__dlpack__"):
        return None
    device = buf.__dlpack_device__() if hasattr(buf, "__dlpack_device__") else (1, 0)
    if int(device[0]) != 1:             # (kDLCPU)
        raise TypeError(f"collectives.MPI {what}: a device array (DLPack device {device}): "
                        f"collectives.MPI's buffers are host memory (meshrun's own calls take "
                        f"GPU arrays: README, GPU arrays)")
    capsule = buf.__dlpack__()
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    versioned = ctypes.pythonapi.PyCapsule_IsValid(ctypes.py_object(capsule),
                                                    b"dltensor_versioned")
    ptr = get(capsule, b"dltensor_versioned" if versioned else b"dltensor")
    # (DLManagedTensorVersioned: version (2 x uint32), manager_ctx, deleter, flags (uint64),
    # then the DLTensor; DLManagedTensor: the DLTensor first)
    t = _DLTensor.from_address(ptr + (32 if versioned else 0))
    code, bits, lanes = t.code, t.bits, t.lanes
    if lanes == 2 and code == 2:        # (a complex as two floats)
        code, bits, lanes = 5, bits * 2, 1
    kind = {0: "i", 1: "u", 2: "f", 5: "c", 6: "b"}.get(code)
    if kind is None or lanes != 1:
        raise TypeError(f"collectives.MPI {what}: a DLPack array of type code {t.code}, "
                        f"{t.bits} bits, {t.lanes} lanes: no numpy dtype")
    dtype = np.dtype(np.longdouble if kind == "f" and bits == 8 * np.dtype(np.longdouble).itemsize
                     and bits > 64 else np.clongdouble if kind == "c" and bits > 128
                     else f"{kind}{bits // 8}" if kind != "b" else np.bool_)
    shape = tuple(t.shape[i] for i in range(t.ndim))
    strides = tuple(t.strides[i] * dtype.itemsize for i in range(t.ndim)) \
        if t.strides else None
    size = int(np.prod(shape)) if shape else 1
    if size == 0 or not t.data:
        return np.empty(shape, dtype)
    iface = {"version": 3, "shape": shape, "typestr": dtype.str, "strides": strides,
             "data": (t.data + t.byte_offset, False)}
    return np.asarray(_Memory(iface, (buf, capsule)))


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device_type", ctypes.c_int32),
                ("device_id", ctypes.c_int32), ("ndim", ctypes.c_int32),
                ("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16),
                ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _Memory:
    """An array interface over memory ``keep`` owns (kept alive by the array made of it)."""

    def __init__(self, iface: dict[str, Any], keep: Any) -> None:
        self.__array_interface__, self.keep = iface, keep


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
        # (a datatype of None: inferred from the buffer, as a spec without one)
        dt = items.pop() if len(items) > 1 and (_is_dt(items[-1]) or items[-1] is None) \
            else None
        if len(items) > 3:
            raise ValueError(f"collectives.MPI {what}: a buffer spec is [buf, datatype], "
                            f"[buf, count, datatype] or [buf, counts, displs, datatype], got "
                            f"{len(buf)} items")
        return items[0], items[1:], dt
    return buf, [], None


def _count(mid: list[Any], what: str, per: int) -> tuple[int | None, int] | None:
    """A spec's (count, displacement), counts times ``per``; None: neither
    given. mpi4py's forms: ``[buf, count, dt]``, ``[buf, (count, displ),
    dt]``, ``[buf, count, displ, dt]``, a count of None inferred from the
    buffer (spec's), a displacement of None 0."""
    if not mid:
        return None
    c, d = (mid[0], None) if len(mid) == 1 else mid
    if len(mid) == 1 and isinstance(c, (tuple, list)):
        if len(c) != 2:
            raise ValueError(f"collectives.MPI {what}: a (count, displacement) pair, got "
                             f"{c!r:.60}")
        c, d = c
    if isinstance(c, (tuple, list)) or isinstance(d, (tuple, list)):
        raise TypeError(f"collectives.MPI {what}: [buf, count, datatype] takes one count "
                        f"and one displacement (ints), got {c!r:.40} and {d!r:.40}")
    displ = 0 if d is None else int(d)
    if displ < 0:
        raise ValueError(f"collectives.MPI {what}: a negative displacement, {displ}")
    return (None if c is None else int(c) * per), displ


def spec(buf: Any, what: str, *, per: int = 1, packs: bool = False) -> Buf:
    """A non-v spec. ``per``: the blocks the buffer holds when no count is
    given (a collective's receive buffer: one block a rank); the view is
    then one block's count times ``per``. ``packs``: the call takes a
    derived datatype (packed, and unpacked by ``Buf.done`` where it
    receives)."""
    data, mid, dt = _parts(buf, what)
    if isinstance(dt, Datatype) and dt.typemap is not None:
        return _packed(data, mid, dt, what, per, packs)
    flat = _flat(data, datatype_of(dt, what), what)
    given, displ = _count(mid, what, per) or (None, 0)
    count = (len(flat) - displ) // per * per if given is None else given
    if displ < 0 or count < 0 or displ + count > len(flat):
        raise ValueError(f"collectives.MPI {what}: {count} elements from {displ} overrun a "
                         f"buffer of {len(flat)}")
    return Buf(flat, flat[displ:displ + count])


def _packed(data: Any, mid: list[Any], dt: Datatype, what: str, per: int, packs: bool) -> Buf:
    """A spec of a derived datatype: its items' elements packed (mpi4py's
    displacement counts whole extents; with no count, the buffer holds whole
    extents, as mpi4py infers it)."""
    tm, raw = _usable(data, dt, what, packs)
    got, displ = _count(mid, what, per) or (None, 0)
    if got is None:
        if tm.extent <= 0 or len(raw) % tm.extent:
            raise ValueError(f"collectives.MPI {what}: can not infer the count: a buffer of "
                             f"{len(raw)} bytes is no whole number of {dt!r}'s extent, "
                             f"{tm.extent}: give it, [buf, count, datatype]")
        got = (len(raw) // tm.extent - displ) // per * per
    count = got
    if count < 0:
        raise ValueError(f"collectives.MPI {what}: a negative count, {count}")
    sel = Selection(tm, dt.dtype, raw, count, displ * tm.extent, what)
    return Buf(raw, sel.get(), sel=sel, datatype=dt)


def _usable(data: Any, dt: Datatype, what: str, packs: bool) -> tuple[Typemap, np.ndarray]:
    """A derived datatype's typemap and the buffer's bytes, where the call
    takes one and it is committed (as MPI, MPI_ERR_TYPE)."""
    if not packs:
        datatype_of(dt, what)       # (raises, naming the calls that take one)
    if not dt.committed or dt.freed:
        state, fix = ("freed", "make another") if dt.freed else ("not committed",
                                                                  "call its Commit() first")
        raise MPIException(ERR_TYPE, f"collectives.MPI {what}: {dt!r} is {state} "
                                     f"(MPI_ERR_TYPE: invalid datatype): {fix}")
    assert dt.typemap is not None
    return dt.typemap, _flat(data, None, what).view(np.uint8)


def vspec(buf: Any, what: str, size: int, packs: bool = False) -> Buf:
    """A v-call's spec, read as mpi4py reads it: counts a sequence, one int
    (every rank's) or None (the buffer split as evenly as it goes, the first
    ranks an element more); displacements a sequence, one int (a stride) or
    None (packed); a pair ``(counts, displs)`` in place of the counts.
    ``packs``: as spec's (a derived datatype's counts in items, its
    displacements in extents)."""
    data, mid, dt = _parts(buf, what)
    tm = None
    if isinstance(dt, Datatype) and dt.typemap is not None:
        tm, flat = _usable(data, dt, what, packs)
        items = len(flat) // tm.extent if tm.extent > 0 else 0
    else:
        flat = _flat(data, datatype_of(dt, what), what)
        items = len(flat)
    c: Any = mid[0] if mid else None
    d: Any = mid[1] if len(mid) > 1 else None
    if len(mid) == 1 and isinstance(c, tuple) and len(c) == 2:
        c, d = c
    if c is None:
        counts = [items // size + (items % size > r) for r in range(size)]
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
    if tm is None:
        return Buf(flat, flat, counts, displs)
    assert isinstance(dt, Datatype)
    blocks = Blocks([Selection(tm, dt.dtype, flat, k, at * tm.extent, what)
                     for k, at in zip(counts, displs)], dt.dtype)
    return Buf(flat, blocks.get(), [s.n for s in blocks.sels], blocks.starts[:-1], sel=blocks,
               datatype=dt)


def check_signature(typed: bool, view: np.ndarray, got: Any, where: str) -> None:
    """MPI's rule that a message's type signature match the receive's: where
    ``typed`` (a derived datatype's ``view``) the message's elements must be
    its elements' dtype (``where``: the call, naming the ranks)."""
    if typed and isinstance(got, np.ndarray) and got.dtype != view.dtype:
        raise MPIException(ERR_TYPE, f"{where}: the type signatures differ (MPI_ERR_TYPE): "
                                     f"the message holds {got.size} x {got.dtype}, the "
                                     f"receive's datatype takes {view.dtype}")


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
