"""The target side of an RMA window (mesh.window): what the inbox hands it.

A window's requests come on its own group's tags at and above
mesh.inbox.RMA_TAGS, each saying in its tag what it is:

    RMA_TAGS | code << 48 | offset      code 0: a put (an array); 1 + i: an
                                        accumulate of OPS[i]; CONTROL: an
                                        object [kind, reply tag, ...]

``Target`` applies them in the thread of this rank that reads (the
progress thread, or a caller waiting on the mesh): a put is claimed into
its place in the exposed array before its bytes are read (``claim``); an
accumulate is combined under the window's lock once whole; a get, a lock,
an unlock, a flush, a get-accumulate (a fetch-and-op: of one element) and
a compare-and-swap are answered on their reply tags. A put, a get, an
accumulate or a get-accumulate at elements that are no one run (a strided
target: a column of a matrix) is one control request too, its elements'
places given as runs (``runs``: from its offset, (start, length) pairs of
int64), applied as one fancy-indexed operation (UPDATE: a put or an
accumulate, its values as bytes; GET and FETCH: the runs last). It keeps the lock
table: the holders, and the lock requests that wait, granted in order.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from . import tensors, wire
from .errors import LostPeerError, MeshError
from .inbox import RMA_TAGS
from .match import MATCHED, Pending

if TYPE_CHECKING:
    from .transport import Transport

__all__ = ["Target", "OPS", "DROPPED", "SHIFT", "MAX_OFFSET", "CONTROL", "GET", "LOCK",
           "UNLOCK", "FLUSH", "FETCH", "SWAP", "UPDATE", "exposed", "same", "runs", "places"]

_log = logging.getLogger("mesh.transport")

OPS = ("replace", "sum", "prod", "min", "max", "band", "bor", "bxor", "land", "lor", "lxor")
"""accumulate's ops: MPI's REPLACE, SUM, PROD, MIN, MAX, BAND, BOR, BXOR,
LAND, LOR, LXOR (as the collectives' ops: collectives.ops)."""
SHIFT = 48                      # a request's tag: RMA_TAGS | code << SHIFT | offset
MAX_OFFSET = (1 << SHIFT) - 1
CONTROL = 15                    # the code of a request that is an object, not an array
GET, LOCK, UNLOCK, FLUSH, FETCH, SWAP, UPDATE = range(7)     # its kinds


def runs(index: np.ndarray) -> bytes:
    """Element offsets ``index`` (in order) as the wire's runs: (start,
    length) pairs of int64, a run each stretch of consecutive offsets."""
    index = np.asarray(index, np.int64).reshape(-1)
    if index.size == 0:
        return b""
    cut = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate(([0], cut))
    lengths = np.diff(np.concatenate((starts, [index.size])))
    return np.stack([index[starts], lengths], axis=1).astype(np.int64).tobytes()


def places(raw: Any, offset: int, n: int, size: int) -> np.ndarray:
    """The element indices that ``runs``' bytes ``raw`` from ``offset`` name:
    ``n`` of them, each in a window of ``size`` elements (else MeshError)."""
    if not isinstance(raw, bytes) or len(raw) % 16:
        raise MeshError("malformed runs")
    pairs = np.frombuffer(raw, np.int64).reshape(-1, 2)
    starts, lengths = pairs[:, 0], pairs[:, 1]
    if (starts < 0).any() or (lengths <= 0).any() or int(lengths.sum()) != n or (
            len(pairs) and offset + int((starts + lengths).max()) > size):
        raise MeshError(f"runs of {n} elements from offset {offset} past a window of {size}")
    before = np.cumsum(lengths) - lengths
    return offset + np.repeat(starts - before, lengths) + np.arange(n, dtype=np.int64)


def exposed(buf: Any, what: str) -> np.ndarray:
    """The memory a window exposes, as a flat numpy view of ``buf``."""
    if tensors.is_tensor(buf):
        if not buf.is_cpu:
            raise TypeError(f"{what}: a window exposes a CPU tensor, not one on {buf.device}")
        if not buf.is_contiguous():
            raise ValueError(f"{what}: a window exposes a contiguous tensor")
        view = tensors.out_view(buf, what)
    elif isinstance(buf, np.ndarray):
        view = buf
    else:
        raise TypeError(f"{what}: a window exposes a numpy array or a CPU torch tensor, not "
                        f"{type(buf).__name__}")
    if not wire.dtype_ok(view.dtype):
        raise TypeError(f"{what}: a window's dtype is numeric, not {view.dtype}")
    if not (view.flags.c_contiguous and view.flags.writeable):
        raise ValueError(f"{what}: a window exposes a writable C-contiguous array")
    return view.reshape(-1)


def same(a: np.dtype, b: np.dtype) -> bool:
    """One dtype (bfloat16's bits are not plain uint16)."""
    return a == b and (a.metadata is None) is (b.metadata is None)


class Target:
    """The target side of the window named ``name`` (its group ``gid``),
    exposing ``flat``: registered in ``Inbox.handlers`` while it lives."""

    def __init__(self, t: "Transport", gid: int, name: str, flat: np.ndarray) -> None:
        from collectives.ops import apply      # (mesh does not import it at import time)
        self._t, self._gid, self.name, self._flat, self.dtype = t, gid, name, flat, flat.dtype
        self._combine = apply
        self._mu = threading.Lock()        # the memory, and the lock table below
        self._holders: dict[int, bool] = {}    # world rank -> exclusive
        self._queue: deque[tuple[int, int, bool]] = deque()   # (world rank, reply, excl)
        self._ufuncs: dict[int, Any] = {}

    def arrive(self, src: int, tag: int, value: Any) -> None:
        """Apply a request from world rank ``src`` (Inbox.arrive)."""
        code, offset = (tag - RMA_TAGS) >> SHIFT, (tag - RMA_TAGS) & MAX_OFFSET
        try:
            if code == CONTROL:
                self._serve(src, value)
            else:
                self._apply(code, offset, value)
        except Exception as e:      # (never the reading thread's end)
            _log.error("rank %d: window %s: a request from world rank %d failed: %s",
                       self._t.rank, self.name, src, e)

    def claim(self, src: int, tag: int, nbytes: int) -> Pending | None:
        """Where a put of ``nbytes`` from world rank ``src`` goes (Inbox.claim):
        its place in the window, which the reader fills straight from the
        ring, the socket's frames or the origin's memory (mesh.direct); None
        for the rest, applied once whole (``arrive``)."""
        offset = tag - RMA_TAGS
        size = self.dtype.itemsize
        if offset > MAX_OFFSET or nbytes < 0 or nbytes % size:   # (not a put: code 0)
            return None
        count = nbytes // size
        if offset + count > self._flat.size:
            return None
        req = Pending(self._gid, src, tag, self._flat[offset:offset + count], None,
                      "window put")
        req.state = MATCHED
        return req

    def _apply(self, code: int, offset: int, value: Any) -> None:
        """A put (code 0) not claimed, or an accumulate (1 + its op's index
        in OPS), under the window's lock: atomic against the others."""
        flat = self._flat
        if type(value) is not np.ndarray or not same(value.dtype, self.dtype) \
                or code > len(OPS) or offset + value.size > flat.size:
            raise MeshError(f"a malformed put or accumulate (code {code}, offset {offset})")
        view = flat[offset:offset + value.size]
        if code <= 1:       # a put, or an accumulate's "replace"
            with self._mu:
                view[...] = value.reshape(-1)
            return
        ufunc = self._ufunc(code)
        with self._mu:
            self._combine(ufunc, view, value.reshape(-1), view)

    def _ufunc(self, code: int) -> Any:
        """The ufunc of accumulate code ``code`` (1 + its op's index in OPS, > 1)."""
        ufunc = self._ufuncs.get(code)
        if ufunc is None:
            from collectives import ops
            ufunc = self._ufuncs[code] = getattr(np, ops.resolve(OPS[code - 1], self.dtype)
                                                 .ufunc_name)
        return ufunc

    def _combined(self, code: int, ufunc: Any, old: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``old (op) x`` for accumulate code ``code`` (1: replace)."""
        if code <= 1:
            return x
        new = old.copy()
        self._combine(ufunc, new, x, new)
        return new

    def _update(self, offset: int, code: int, raw: Any, at: Any) -> None:
        """A put (code 0) or an accumulate at the elements that the runs
        ``at`` name from ``offset`` (its values ``raw``), under the lock."""
        x = np.frombuffer(raw, self.dtype) if isinstance(raw, bytes) else np.empty(0)
        if code > len(OPS) or not isinstance(raw, bytes) or len(raw) % self.dtype.itemsize:
            raise MeshError(f"a malformed strided put or accumulate (code {code})")
        idx = places(at, offset, x.size, self._flat.size)
        ufunc = self._ufunc(code) if code > 1 else None
        with self._mu:
            self._flat[idx] = self._combined(code, ufunc, self._flat[idx], x)

    def _fetch(self, src: int, reply: int, offset: int, code: int, raw: Any,
               at: Any = None) -> None:
        """Get_accumulate and Fetch_and_op (``code``: 0 no op, else as
        accumulate's; ``raw``: the operand, any number of elements; ``at``:
        runs, its elements' places, else from ``offset`` on) or, with
        code -1, Compare_and_swap (``raw``: the compare value, then the new):
        the elements' values before, answered; the change atomic, as an
        accumulate's."""
        x = np.frombuffer(raw, self.dtype) if isinstance(raw, bytes) else np.empty(0)
        n = 1 if code < 0 else x.size
        if (x.size != 2 if code < 0 else x.size < 1) or code > len(OPS) or (
                at is None and offset + n > self._flat.size):
            raise MeshError(f"a malformed fetch (code {code}, offset {offset}, {x.size} "
                            f"elements)")
        ufunc = self._ufunc(code) if code > 1 else None
        if at is not None:
            idx = places(at, offset, n, self._flat.size)
            with self._mu:
                old = self._flat[idx]
                self._flat[idx] = self._combined(code, ufunc, old, x)
            self._reply(src, reply, old)
            return
        view = self._flat[offset:offset + n]
        with self._mu:
            old = view.copy()
            if code < 0:
                if old[0] == x[0]:
                    view[0] = x[1]
            elif code == 1:
                view[...] = x
            elif ufunc is not None:
                self._combine(ufunc, view, x, view)
        self._reply(src, reply, old)

    def _serve(self, src: int, msg: Any) -> None:
        """A control request (an object): a get, a lock, an unlock, a flush,
        a fetch-and-op, a compare-and-swap (their operands as bytes, last)."""
        ok = isinstance(msg, list) and len(msg) >= 2
        fetch = ok and (len(msg) == 5 and msg[0] in (FETCH, SWAP)
                        or len(msg) == 6 and msg[0] in (FETCH, UPDATE))
        strided = ok and len(msg) == 5 and msg[0] == GET
        if not (ok and all(type(v) is int and v >= 0
                           for v in msg[:4 if fetch or strided else None])):
            raise MeshError(f"a malformed request {msg!r:.200}")
        kind, reply = msg[0], msg[1]
        granted: list[tuple[int, int]] = []
        if kind == UPDATE:
            self._update(msg[2], msg[3], msg[4], msg[5])
            return
        if fetch:
            self._fetch(src, reply, msg[2], msg[3] if kind == FETCH else -1, msg[4],
                        msg[5] if len(msg) == 6 else None)
            return
        if kind == GET and len(msg) in (4, 5):
            offset, count = msg[2], msg[3]
            if offset + count > self._flat.size:
                raise MeshError(f"a get of {count} elements at {offset} past the window")
            self._reply(src, reply, self._flat[places(msg[4], offset, count, self._flat.size)]
                        if strided else self._flat[offset:offset + count])
            return
        if kind == LOCK and len(msg) == 3:
            exclusive = bool(msg[2])
            with self._mu:
                if not self._queue and self._free_for(exclusive):
                    self._holders[src] = exclusive
                    granted.append((src, reply))
                else:
                    self._queue.append((src, reply, exclusive))
        elif kind == UNLOCK:
            with self._mu:
                if self._holders.pop(src, None) is None:    # (a lock asked, given up on)
                    self._queue = deque(q for q in self._queue if q[0] != src)
                granted = self._grant()
            if reply:
                self._reply(src, reply, 0)
        elif kind == FLUSH:
            self._reply(src, reply, 0)
        else:
            raise MeshError(f"a malformed request {msg!r}")
        for r, tag in granted:
            self._reply(r, tag, 0)

    def _free_for(self, exclusive: bool) -> bool:
        return not self._holders if exclusive else not any(self._holders.values())

    def _grant(self) -> list[tuple[int, int]]:
        """The queued locks that may be granted now, in order (``_mu`` held)."""
        granted = []
        while self._queue and self._free_for(self._queue[0][2]):
            src, reply, exclusive = self._queue.popleft()
            self._holders[src] = exclusive
            granted.append((src, reply))
        return granted

    def _reply(self, dst: int, tag: int, obj: Any) -> None:
        out = self._t.isend(dst, self._gid, tag, obj, None,
                            f"window {self.name}: reply to world rank {dst}")
        if out.error is not None and not isinstance(out.error, LostPeerError):
            _log.error("rank %d: %s", self._t.rank, out.error)

    def lost(self, rank: int) -> None:
        """World rank ``rank`` is gone (Inbox.peer_gone): its locks here go."""
        with self._mu:
            held = self._holders.pop(rank, None)
            self._queue = deque(q for q in self._queue if q[0] != rank)
            granted = self._grant() if held is not None else []
        for r, tag in granted:
            self._reply(r, tag, 0)


class _Dropped:
    """What a freed window leaves in ``Inbox.handlers`` until its group is
    forgotten: a request that still comes (its origin left the window on an
    error) is dropped, its credit granted back, and holds nothing."""

    def arrive(self, src: int, tag: int, value: Any) -> None:
        pass

    def claim(self, src: int, tag: int, nbytes: int) -> None:
        return None

    def lost(self, rank: int) -> None:
        pass


DROPPED = _Dropped()
