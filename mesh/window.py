"""One-sided communication, MPI's RMA windows: ``win = comm.window(array)``.

Every rank of the communicator exposes an array (numpy, or a CPU torch
tensor); any rank then puts into, gets from and accumulates into any rank's
array at an element offset, the target taking no part: its thread that
reads the socket (the progress thread while it computes, or a caller of its
own blocked in a wait: mesh.progress) applies each request as it comes,
handed over by the inbox (``Inbox.handlers``) instead of queued for a
receive, to the window's target side (mesh.rma). Here: the origin's side.

    origin                                    target (its reading thread)
    put(x, r, off)         array, tag REQ|0|off     window[off:off+n] = x (in place)
    accumulate(x, r, off)  array, tag REQ|1+op|off  window[off:off+n] op= x (its lock)
    get(r, off, n)         [GET, reply, off, n]     window[off:off+n] back, tag reply
    get_accumulate(x, r, off) [FETCH, reply, off, 1+op, x]  window[off:off+n] back, then op= x
    put/accumulate(x, r, off, index=i)  [UPDATE, 0, off, op, x, runs]  window[off+i] (op)= x
    get(r, off, index=i)   [GET, reply, off, n, runs]   window[off+i] back, tag reply
    get_accumulate(..., index=i)  [FETCH, ..., x, runs]  window[off+i] back, then op= x
    lock(r, exclusive)     [LOCK, reply, excl]      granted (reply) now or once free
    flush(r), unlock(r)    [FLUSH|UNLOCK, reply]    reply (an unlock releases first)
    fence(), free()        a flush of each rank written to, then a barrier
    post(g) / start(g)     tag POSTED to each origin of g / waits for each target's
    complete() / wait()    its operations done here, tag DONE to each target / waits for
                           each origin's (PSCW: MPI's general active target)

A rank's messages to another are handed over in the order it sent them, on
every path (rings, socket, direct reads, streams, pieces), so a flush's or
an unlock's reply says that every operation sent before it is applied; a
fence's barrier comes after every rank's flushes, so no operation of the
next epoch meets one of the last; a target's ``wait`` takes an origin's
DONE after everything it sent before it, so its epoch's operations are
applied. The window's traffic (and the barrier) goes on a communicator of
its own (``dup``). A window from ``Comm.shared_window`` exposes memory
that every rank of one host maps (mesh.shared): the same operations, and
plain loads and stores through ``shared(rank)``'s views besides.
"""
from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from . import tensors
from .errors import MeshError, MeshTimeoutError, MismatchError
from .inbox import RMA_TAGS
from .match import Pending
from .peer import Outgoing
from .request import Request
from .rings import fence as _memory_fence
from .rma import (CONTROL, DROPPED, FETCH, FLUSH, GET, LOCK, MAX_OFFSET, OPS, SHIFT, SWAP,
                  UNLOCK, UPDATE, Target, exposed, runs, same)
from .status import PROC_NULL

if TYPE_CHECKING:
    from .comm import Comm
    from .shared import Segment

__all__ = ["Window", "OPS"]

_PRUNE = 512                    # operations kept per target before the done ones are dropped
_EPOCH = ("put", "get", "accumulate", "get_accumulate", "fetch_and_op",
          "compare_and_swap")                          # need one
_POSTED, _DONE = RMA_TAGS - 1, RMA_TAGS - 2            # PSCW's notices (plain messages)


class Window:
    """An RMA window over ``comm`` (made by ``Comm.window``, collectively)."""

    def __init__(self, comm: "Comm", buf: Any, timeout: float | None = None,
                 shared: "Segment | None" = None) -> None:
        t = comm._t
        where = f"rank {t.rank}: window on group {comm.name}"
        bad: Exception | None = None
        try:
            flat = exposed(buf, where)
        except (TypeError, ValueError) as e:    # (said to the others too: none waits for it)
            flat, bad = np.empty(0), e
        n = comm._windows
        comm._windows += 1
        sub = comm.dup()
        sub.name = f"{comm.name}/window#{n}"
        t.groups[sub.gid] = (sub.name, sub.ranks)
        self.name, self.array, self.dtype = sub.name, buf, flat.dtype
        self.rank, self.size = sub.rank, sub.size
        self._c, self._t, self._gid, self._flat = sub, t, sub.gid, flat
        self._locked: dict[int, bool] = {}     # origin side: targets this rank locked
        self._fenced = False
        self._freed = False
        self._ids = itertools.count(1)
        self._open: dict[int, list[Any]] = {}  # per target: sends and gets not waited for
        self._dirty: set[int] = set()          # targets put or accumulated into, unflushed
        self._said: dict[tuple[str, int], str] = {}     # (op, rank) -> its description
        self._started: list[int] = []          # PSCW: targets of this rank's access epoch,
        self._early: set[int] = set()          # (their posts a failed start took)
        self._posted: list[tuple[int, Pending]] = []    # origins of its exposure epoch
        self._access = self._exposure = False  # (epochs open: their groups may be empty)
        self._shared = shared                  # (a shared window's memory: mesh.shared)
        self._target_side: Target | None = None     # (mesh.rma: what the inbox hands on)
        try:
            import collectives      # (mesh does not import it at import time: Comm.split)
            self._target_side = Target(t, sub.gid, sub.name, flat)
            t.inbox.handlers[self._gid] = self._target_side     # before a peer can send
            table = collectives.all_gather_object(
                comm, ["", -1] if bad else [tensors.dtype_name(self.dtype), int(flat.size)],
                timeout=timeout)
        except BaseException:
            self._release()
            raise
        wrong = [r for r, (_, c) in enumerate(table) if c < 0]
        if bad is not None or wrong:
            self._release()
            raise bad or ValueError(f"{where}: the array of rank(s) {wrong} cannot be exposed "
                                    f"(see their error)")
        names = [str(d) for d, _ in table]
        if len(set(names)) > 1:
            self._release()
            raise MismatchError(f"{where}: the ranks' arrays differ in dtype ("
                                f"{', '.join(f'rank {r}: {d}' for r, d in enumerate(names))}); "
                                f"a window has one dtype (sizes may differ)")
        self.sizes = [int(c) for _, c in table]

    def __repr__(self) -> str:
        return f"<Window {self.name} rank {self.rank}/{self.size} {self.sizes[self.rank]} " \
               f"x {tensors.dtype_name(self.dtype)}>"

    # -- origin side: operations -------------------------------------------------

    def put(self, x: Any, rank: int, offset: int = 0, index: Any = None) -> None:
        """MPI's Put: ``x`` into rank ``rank``'s window from element
        ``offset`` on; done there by the epoch's end (``fence``, ``flush``,
        ``unlock``), and ``x`` in use until then, as MPI's origin buffer.
        ``index=``: element offsets from ``offset``, one for each of ``x``'s
        elements, where they go (MPI's strided target datatype: a column,
        ``np.arange(rows) * cols``), sent as one request of runs."""
        self._update(x, rank, offset, 0, "put", index)

    def rput(self, x: Any, rank: int, offset: int = 0, index: Any = None) -> Request:
        """MPI's Rput: ``put`` as a request, done once ``x`` may be reused
        (sent or copied: MPI's local completion); applied at the target by
        the epoch's end, as a put."""
        return self._request(self._update(x, rank, offset, 0, "put", index))

    def raccumulate(self, x: Any, rank: int, offset: int = 0, op: str = "sum",
                    index: Any = None) -> Request:
        """MPI's Raccumulate: ``accumulate`` as a request (as ``rput``'s)."""
        return self._request(self._update(x, rank, offset, self._code(op), "accumulate",
                                          index))

    def accumulate(self, x: Any, rank: int, offset: int = 0, op: str = "sum",
                   index: Any = None) -> None:
        """MPI's Accumulate: rank ``rank``'s window elements from ``offset``
        on (``index=``: at those offsets from it, as ``put``'s) become
        ``window (op) x``, each atomically against other accumulates (MPI's
        rule); ``op`` one of OPS ("replace": a put)."""
        self._update(x, rank, offset, self._code(op), "accumulate", index)

    def get(self, rank: int, offset: int = 0, count: int | None = None, out: Any = None,
            timeout: float | None = None, index: Any = None) -> Any:
        """MPI's Get, waited for: ``count`` elements (default: to the end) of
        rank ``rank``'s window from ``offset``, into ``out=`` (a writable
        contiguous array or tensor of the window's dtype) or a new 1-D array;
        ``index=``: the elements at those offsets from ``offset`` instead
        (as ``put``'s), in its order."""
        return self.rget(rank, offset, count, out, index).wait(timeout)

    def _request(self, item: Outgoing | None) -> Request:
        return _done(self._c, None) if item is None else Request(self._c, item)

    def rget(self, rank: int, offset: int = 0, count: int | None = None,
             out: Any = None, index: Any = None) -> Request:
        """MPI's Rget: ``get`` as a request (its ``wait`` returns the data);
        the epoch's end (``fence``, ``flush``, ``unlock``) completes it too."""
        self._check("get")
        if rank == PROC_NULL:
            return _done(self._c, out)
        w = self._target(rank, "get")
        size = self.sizes[rank]
        at = self._index(index, count, rank, offset, "get")
        if at and count is None:
            count = len(np.asarray(index))
        if count is None:
            count = size - offset if isinstance(offset, (int, np.integer)) else -1
        self._range(rank, offset, count, "get")
        self._out(out, count, rank, "get from")
        reply = next(self._ids)
        item = self._t.irecv(self._gid, w, reply, out, None, self._what("get from", rank))
        try:
            self._send(rank, w, RMA_TAGS | CONTROL << SHIFT,
                       [GET, reply, int(offset), int(count)] + at, "get from")
        except BaseException:
            self._t.cancel(item)
            raise
        self._keep(rank, item)
        return Request(self._c, item)

    def _index(self, index: Any, count: int | None, rank: int, offset: Any,
               op: str) -> list[bytes]:
        """``index=``'s runs for the request ([]: none), its offsets checked
        against rank ``rank``'s window (and ``count``, where given)."""
        if index is None:
            return []
        at = np.asarray(index)
        if at.dtype.kind not in "iu" or at.ndim != 1:
            raise TypeError(f"rank {self._t.rank}: window {self.name}: {op} rank {rank}: "
                            f"index= is a 1-D array of element offsets, got {at.dtype} of "
                            f"shape {at.shape}")
        if count is not None and at.size != count:
            raise ValueError(f"rank {self._t.rank}: window {self.name}: {op} rank {rank}: "
                             f"{at.size} offsets in index= for {count} elements")
        if at.size and (at.min() < 0 or not np.diff(np.sort(at)).all()):
            raise ValueError(f"rank {self._t.rank}: window {self.name}: {op} rank {rank}: "
                             f"index= offsets must be distinct and not negative")
        self._range(rank, offset, int(at.max()) + 1 if at.size else 0, op)
        return [runs(at)]

    def _out(self, out: Any, count: int, rank: int, op: str) -> None:
        """Refuse an ``out=`` that is not ``count`` elements of the window's dtype."""
        if out is not None:
            view = tensors.out_view(out, self._what(op, rank)) \
                if tensors.is_tensor(out) else out
            if not isinstance(view, np.ndarray) or not same(view.dtype, self.dtype) \
                    or view.size != count:
                raise TypeError(f"rank {self._t.rank}: window {self.name}: {op} rank {rank}: "
                                f"out= is not an array of {count} {tensors.dtype_name(self.dtype)}")

    def get_accumulate(self, x: Any, rank: int, offset: int = 0, op: str = "sum",
                       out: Any = None, timeout: float | None = None, index: Any = None) -> Any:
        """MPI's Get_accumulate, waited for: rank ``rank``'s window elements
        from ``offset`` on (as many as ``x`` has) become ``window (op) x``,
        atomically as an accumulate, and their values before come back (into
        ``out=``, or a new 1-D array); ``op`` one of OPS or "no_op" (an
        atomic read: ``x``'s values unused, its size the count); ``index=``: at
        those offsets from ``offset``, as ``put``'s."""
        return self.rget_accumulate(x, rank, offset, op, out, index).wait(timeout)

    def rget_accumulate(self, x: Any, rank: int, offset: int = 0, op: str = "sum",
                        out: Any = None, index: Any = None) -> Request:
        """MPI's Rget_accumulate: ``get_accumulate`` as a request (its
        ``wait`` returns the values before); the epoch's end completes it too."""
        self._check("get_accumulate")
        code = 0 if op == "no_op" else self._code(op)
        if rank == PROC_NULL:
            return _done(self._c, out)
        self._target(rank, "get_accumulate")
        a = self._operand(x, rank, "get_accumulate")
        at = self._index(index, a.size, rank, offset, "get_accumulate")
        if not at:
            self._range(rank, offset, a.size, "get_accumulate")
        if a.size == 0:
            raise ValueError(f"rank {self._t.rank}: window {self.name}: get_accumulate: no "
                             f"elements")
        self._out(out, a.size, rank, "get_accumulate on")
        item = self._ask(rank, [FETCH, int(offset), code, a.tobytes()] + at,
                         "get_accumulate on", out)
        self._keep(rank, item)
        return Request(self._c, item)

    def fetch_and_op(self, value: Any, rank: int, offset: int = 0, op: str = "sum",
                     timeout: float | None = None) -> Any:
        """MPI's Fetch_and_op: element ``offset`` of rank ``rank``'s window
        becomes ``element (op) value`` (``op`` one of OPS, or "no_op": an
        atomic read), atomically as an accumulate; returns the element's
        value before (a numpy scalar), waited for."""
        code = 0 if op == "no_op" else self._code(op)
        return self._fetch(rank, offset, FETCH, code, [value], "fetch_and_op", timeout)

    def compare_and_swap(self, value: Any, compare: Any, rank: int, offset: int = 0,
                         timeout: float | None = None) -> Any:
        """MPI's Compare_and_swap: element ``offset`` of rank ``rank``'s
        window becomes ``value`` if it equals ``compare``, atomically as an
        accumulate; returns the element's value before, waited for."""
        return self._fetch(rank, offset, SWAP, 0, [compare, value], "compare_and_swap",
                           timeout)

    def _fetch(self, rank: int, offset: int, kind: int, code: int, values: list,
               op: str, timeout: float | None) -> Any:
        self._check(op)
        if rank == PROC_NULL:
            return None
        self._target(rank, op)      # (checked: a rank of the group, in an epoch)
        parts = [self._operand(v, rank, op) for v in values]
        if any(p.size != 1 for p in parts):
            raise ValueError(f"rank {self._t.rank}: window {self.name}: {op}: one element, "
                             f"not {[p.size for p in parts]}")
        a = np.concatenate(parts)
        self._range(rank, offset, 1, op)
        item = self._ask(rank, [kind, int(offset), code, a.tobytes()], f"{op} on")
        return self._t.wait(item, timeout)[0]

    def _code(self, op: str) -> int:
        """An accumulate op's code (1 + its index in OPS), checked for the dtype."""
        if op not in OPS:
            raise ValueError(f"rank {self._t.rank}: window {self.name}: accumulate op {op!r}; "
                             f"one of {', '.join(OPS)}")
        if op != "replace":
            from collectives import ops
            ops.resolve(op, self.dtype)     # (TypeError: an op the dtype cannot take)
            if self.dtype.metadata is not None:
                raise TypeError(f"rank {self._t.rank}: window {self.name}: accumulate {op!r} "
                                f"on bfloat16: put and get only")
        return 1 + OPS.index(op)

    def _operand(self, x: Any, rank: int, op: str) -> np.ndarray:
        """``x`` as a flat C-contiguous array of the window's dtype (numbers
        and lists cast to it; another dtype's array or tensor refused)."""
        if tensors.is_tensor(x):
            a = tensors.operand(x, f"rank {self._t.rank}: window {self.name}: {op}")[0]
        elif isinstance(x, np.ndarray):
            a = x
        else:
            a = np.asarray(x, self.dtype)   # (numbers and lists take the window's dtype)
        if not isinstance(a, np.ndarray):
            raise TypeError(f"rank {self._t.rank}: window {self.name}: {op}: a CPU array")
        if not same(a.dtype, self.dtype):
            raise TypeError(f"rank {self._t.rank}: window {self.name}: {op} to rank {rank}: "
                            f"{tensors.dtype_name(a.dtype)} into a window of "
                            f"{tensors.dtype_name(self.dtype)} (the same dtype only)")
        return np.ascontiguousarray(a).reshape(-1)

    def _update(self, x: Any, rank: int, offset: int, code: int, op: str,
                index: Any = None) -> Outgoing | None:
        """Send a put or an accumulate: what it is in flight as (None: done);
        ``index``: at those element offsets from ``offset``, one request
        (UPDATE: its values' bytes and the offsets' runs)."""
        self._check(op)
        if rank == PROC_NULL:
            return None
        w = self._target(rank, op)
        a = self._operand(x, rank, op)
        at = self._index(index, a.size, rank, offset, op)
        if not at:
            self._range(rank, offset, a.size, op)
        self._dirty.add(rank)
        if at:
            return self._send(rank, w, RMA_TAGS | CONTROL << SHIFT,
                              [UPDATE, 0, int(offset), code, a.tobytes(), *at], f"{op} to")
        return self._send(rank, w, RMA_TAGS | code << SHIFT | int(offset), a, f"{op} to")

    # -- origin side: synchronization ---------------------------------------------

    def fence(self, timeout: float | None = None) -> None:
        """MPI's Fence, collective: every operation of the epoch, by any
        rank, is applied at its target when it returns on that target, and
        this rank's own are complete (its buffers free, its gets in)."""
        self._check("fence")
        if self._locked:
            raise MeshError(f"rank {self._t.rank}: window {self.name}: fence while this rank "
                            f"holds locks on rank(s) {sorted(self._locked)}: unlock them first")
        self._pscw_closed("fence")
        self._closing("fence", timeout)
        self._fenced = True

    def lock(self, rank: int, exclusive: bool = False, timeout: float | None = None) -> None:
        """MPI's Lock (passive target): returns once rank ``rank`` granted
        it, shared or ``exclusive``; the target calls nothing."""
        self._check("lock")
        if rank == PROC_NULL:
            return
        self._lock_many([rank], exclusive, timeout)

    def lock_all(self, timeout: float | None = None) -> None:
        """MPI's Lock_all: a shared lock on every rank."""
        self._check("lock_all")
        self._lock_many(range(self.size), False, timeout)

    def unlock(self, rank: int, timeout: float | None = None) -> None:
        """MPI's Unlock: once every operation of this rank's on ``rank`` is
        applied there (and complete here), the lock is released."""
        self._check("unlock")
        if rank == PROC_NULL:
            return
        self._target(rank, "unlock")
        self._sync([rank], UNLOCK, "unlock", timeout)

    def unlock_all(self, timeout: float | None = None) -> None:
        """MPI's Unlock_all: ``unlock`` of every rank this rank locked."""
        self._check("unlock_all")
        self._sync(sorted(self._locked), UNLOCK, "unlock_all", timeout)

    def flush(self, rank: int, timeout: float | None = None) -> None:
        """MPI's Flush: every operation of this rank's on ``rank`` is
        applied there when it returns; the lock stays."""
        self._check("flush")
        if rank == PROC_NULL:
            return
        self._target(rank, "flush")
        self._sync([rank], FLUSH, "flush", timeout)

    def flush_all(self, timeout: float | None = None) -> None:
        """MPI's Flush_all: ``flush`` of every rank this rank locked."""
        self._check("flush_all")
        self._sync(sorted(self._locked), FLUSH, "flush_all", timeout)

    # -- origin and target side: PSCW (general active target synchronization) -------

    def post(self, ranks: Any, timeout: float | None = None) -> None:
        """MPI's Post: open this rank's window to the origins ``ranks`` (this
        window's ranks) until ``wait``; returns at once, as MPI's."""
        self._check("post")
        if self._exposure:
            raise MeshError(f"rank {self._t.rank}: window {self.name}: post while the last "
                            f"post's epoch is open: call win.wait() first")
        group = self._group(ranks, "post")
        items = [(r, self._done_from(r)) for r in group]
        try:
            for r in group:
                self._notice(r, _POSTED, "post to")
        except BaseException:
            for _, item in items:
                self._t.cancel(item)
            raise
        self._posted, self._exposure = items, True

    def start(self, ranks: Any, timeout: float | None = None) -> None:
        """MPI's Start: an access epoch on the targets ``ranks``, once each
        posted (it waits for their ``post``); ``complete`` ends it."""
        self._check("start")
        if self._access:
            raise MeshError(f"rank {self._t.rank}: window {self.name}: start while the last "
                            f"start's epoch is open: call win.complete() first")
        if self._locked:
            raise MeshError(f"rank {self._t.rank}: window {self.name}: start while this rank "
                            f"holds locks on rank(s) {sorted(self._locked)}: unlock them first")
        group = self._group(ranks, "start")
        deadline = time.monotonic() + (self._t.timeout if timeout is None else timeout)
        items = [(r, self._t.irecv(self._gid, self._c.ranks[r], _POSTED, None, None,
                                   self._what("start: the post of", r)))
                 for r in group if r not in self._early]
        try:
            for _, item in items:
                self._t.wait(item, max(0.0, deadline - time.monotonic()))
        except BaseException:       # (the posts taken count for the next start: a retry)
            for r, item in items:
                if item.error is None and (item.event.is_set() or not self._t.cancel(item)):
                    self._early.add(r)
            raise
        self._early.difference_update(group)
        self._started, self._access = group, True

    def complete(self, timeout: float | None = None) -> None:
        """MPI's Complete: this rank's operations on the started targets are
        complete here (its buffers free, its gets in), and each target is
        told, its ``wait`` returning once every origin has told it."""
        self._check("complete")
        if not self._access:
            raise MeshError(f"rank {self._t.rank}: window {self.name}: complete without "
                            f"start")
        group, self._started, self._access = self._started, [], False
        deadline = time.monotonic() + (self._t.timeout if timeout is None else timeout)
        self._dirty.difference_update(group)
        self._complete(group, deadline)
        for r in group:
            self._notice(r, _DONE, "complete to")

    def wait(self, timeout: float | None = None) -> None:
        """MPI's Wait: once every origin of ``post`` has called ``complete``:
        their operations are applied here, and the exposure epoch ends."""
        self._check("wait")
        if not self._exposure:
            raise MeshError(f"rank {self._t.rank}: window {self.name}: wait without post")
        deadline = time.monotonic() + (self._t.timeout if timeout is None else timeout)
        while self._posted:
            r, item = self._posted[0]
            try:
                self._t.wait(item, max(0.0, deadline - time.monotonic()))
            except MeshTimeoutError:    # (withdrawn: posted again, the epoch still open)
                self._posted[0] = (r, self._done_from(r))
                raise
            self._posted.pop(0)
        self._exposure = False

    def test(self) -> bool:
        """MPI's Test: ``wait`` if every origin has completed (True), else
        False at once, the epoch still open. What has come is read first (as
        ``Request.test`` reads it: MPI_Win_test makes progress), so an
        origin's ``complete`` that returned before a barrier both passed is
        seen by a test after it (where another thread has the reading turn,
        as the progress thread may on a loaded machine, it is given up to
        50 ms to read what has come; a test that read finds it at once)."""
        self._check("test")
        if not self._exposure:
            raise MeshError(f"rank {self._t.rank}: window {self.name}: test without post")
        if not all(item.event.is_set() for _, item in self._posted):
            if not self._t.poke():
                deadline = time.monotonic() + 0.05
                for _, item in self._posted:
                    if not item.event.wait(max(0.0, deadline - time.monotonic())):
                        break
            if not all(item.event.is_set() for _, item in self._posted):
                return False
        self.wait(0)
        return True

    def _done_from(self, rank: int) -> Pending:
        """The receive of origin ``rank``'s DONE (its ``complete``)."""
        return self._t.irecv(self._gid, self._c.ranks[rank], _DONE, None, None,
                             self._what("wait for", rank))

    def _group(self, ranks: Any, op: str) -> list[int]:
        """PSCW's group: distinct ranks of this window."""
        group = [int(r) for r in ranks]
        for r in group:
            self._target(r, op)
        if len(set(group)) != len(group):
            raise ValueError(f"rank {self._t.rank}: window {self.name}: {op}: ranks {group} "
                             f"repeat one")
        return group

    def _notice(self, rank: int, tag: int, op: str) -> None:
        out = self._t.isend(self._c.ranks[rank], self._gid, tag, 0, None, self._what(op, rank))
        if out.error is not None:
            raise out.error

    # -- shared memory ---------------------------------------------------------------

    def shared(self, rank: int) -> np.ndarray:
        """MPI's Shared_query, of a window from ``Comm.shared_window``: rank
        ``rank``'s memory, a numpy view this rank loads from and stores into
        (seen by the others after a ``sync`` and a synchronization: a fence,
        a barrier)."""
        self._check("shared")
        if self._shared is None:
            raise MeshError(f"rank {self._t.rank}: window {self.name}: shared({rank}) of a "
                            f"window over private memory (Comm.shared_window makes one that "
                            f"every rank of a host maps)")
        self._target(rank, "shared")
        return self._shared.views[rank]

    def sync(self) -> None:
        """MPI's Win_sync: a full memory fence, between this rank's loads and
        stores through ``shared`` views and the others'."""
        self._check("sync")
        _memory_fence()

    @property
    def freed(self) -> bool:
        """Whether free() ran (on this rank)."""
        return self._freed

    def free(self, timeout: float | None = None) -> None:
        """MPI's Win_free, collective: once every rank's operations on this
        rank's window are applied, it is exposed no more; any call on it
        then raises. This rank must hold no lock."""
        if self._freed:
            return
        if self._locked:
            raise MeshError(f"rank {self._t.rank}: window {self.name}: free while this rank "
                            f"holds locks on rank(s) {sorted(self._locked)}: unlock them first")
        self._pscw_closed("free")
        try:
            self._closing("free", timeout)
        finally:
            self._release()

    def __enter__(self) -> "Window":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.free()
        else:       # (leaving on an error: freed here only, no wait for the others)
            self._release()

    def _pscw_closed(self, op: str) -> None:
        if self._access or self._exposure:
            raise MeshError(f"rank {self._t.rank}: window {self.name}: {op} while this rank's "
                            + ("start" if self._access else "post")
                            + "'s epoch is open (complete or wait first)")

    def _lock_many(self, ranks: Any, exclusive: bool, timeout: float | None) -> None:
        ranks = list(ranks)
        op = "lock_all" if len(ranks) > 1 else "lock"
        if self._access:        # (one access epoch at a time, as MPI's: MPI_ERR_RMA_SYNC)
            raise MeshError(f"rank {self._t.rank}: window {self.name}: {op} while this rank's "
                            f"start's epoch is open on rank(s) {self._started}: call "
                            f"win.complete() first")
        for r in ranks:
            self._target(r, op)
            if r in self._locked:
                raise MeshError(f"rank {self._t.rank}: window {self.name}: {op}: this rank "
                                f"holds a lock on rank {r} already (unlock it first)")
        kind = "exclusive" if exclusive else "shared"
        asked = [(r, self._ask(r, [LOCK, int(bool(exclusive))], f"{op} ({kind}) of"))
                 for r in ranks]
        deadline = time.monotonic() + (self._t.timeout if timeout is None else timeout)
        try:
            for r, item in asked:
                self._t.wait(item, max(0.0, deadline - time.monotonic()))
                self._locked[r] = bool(exclusive)
        except BaseException:
            for r, _ in asked:      # the target drops the request, or releases it granted
                self._locked.pop(r, None)
                self._tell(r, [UNLOCK, 0])
            raise

    def _sync(self, ranks: list[int], kind: int, op: str, timeout: float | None) -> None:
        """Flush or unlock ``ranks``: a request each, answered once what this
        rank sent before it is applied; this rank's own operations waited for."""
        for r in ranks:
            if r not in self._locked and (kind == UNLOCK or not self._fenced):
                raise MeshError(f"rank {self._t.rank}: window {self.name}: {op} of rank {r}, "
                                f"which this rank has not locked")
        deadline = time.monotonic() + (self._t.timeout if timeout is None else timeout)
        asked = [(r, self._ask(r, [kind], f"{op} of")) for r in ranks]
        self._dirty.difference_update(ranks)
        try:
            self._complete(ranks, deadline)
            for _, item in asked:
                self._t.wait(item, max(0.0, deadline - time.monotonic()))
        finally:
            if kind == UNLOCK:
                for r in ranks:
                    self._locked.pop(r, None)

    def _closing(self, op: str, timeout: float | None) -> None:
        """A fence's (a free's) end of the epoch: a flush of each rank this
        rank put or accumulated into since the last one, this rank's own
        operations waited for, then a barrier: past it, every operation of
        the epoch is applied at its target, before any of the next can come."""
        t = self._t
        deadline = time.monotonic() + (t.timeout if timeout is None else timeout)
        asked = [self._ask(r, [FLUSH], f"{op}: flush of") for r in sorted(self._dirty)
                 if r != self.rank]
        self._dirty.clear()
        self._complete(list(self._open), deadline)
        for item in asked:
            t.wait(item, max(0.0, deadline - time.monotonic()))
        import collectives
        collectives.barrier(self._c, timeout=max(0.0, deadline - time.monotonic()))

    def _complete(self, ranks: list[int], deadline: float) -> None:
        """Wait for this rank's sends and gets to ``ranks`` (local completion)."""
        for r in ranks:
            items = self._open.pop(r, ())
            for i, item in enumerate(items):
                try:
                    self._t.wait(item, max(0.0, deadline - time.monotonic()))
                except BaseException:
                    self._open.setdefault(r, []).extend(items[i + 1:])
                    raise

    def _ask(self, rank: int, args: list[Any], op: str, out: Any = None) -> Pending:
        """Send the control request ``args`` (its reply tag put second) to
        ``rank``; the posted receive of its reply (into ``out=``)."""
        w = self._c.ranks[rank]
        reply = next(self._ids)
        item = self._t.irecv(self._gid, w, reply, out, None, self._what(op, rank))
        try:
            self._send(rank, w, RMA_TAGS | CONTROL << SHIFT, [args[0], reply, *args[1:]], op,
                       False)
        except BaseException:
            self._t.cancel(item)
            raise
        return item

    def _tell(self, rank: int, args: list[int]) -> None:
        """A control request that wants no reply (errors ignored: best effort)."""
        w = self._c.ranks[rank]
        self._t.isend(w, self._gid, RMA_TAGS | CONTROL << SHIFT, args, None,
                      self._what("unlock of", rank))

    def _send(self, rank: int, w: int, tag: int, obj: Any, op: str,
              keep: bool = True) -> Outgoing | None:
        t = self._t
        if type(obj) is np.ndarray and w != t.rank and \
                t.send_ring(w, self._gid, tag, obj) is not None:
            return None     # (a small array by a same-host ring: copied, done)
        out = t.isend(w, self._gid, tag, obj, None, self._what(op, rank))
        if out.error is not None:
            raise out.error
        if keep:
            self._keep(rank, out)
        return out

    def _keep(self, rank: int, item: Outgoing | Pending) -> None:
        items = self._open.setdefault(rank, [])
        items.append(item)
        if len(items) >= _PRUNE:    # (a long epoch: those done, and fine, dropped)
            items[:] = [i for i in items if not (i.event.is_set() and i.error is None and (
                not isinstance(i, Outgoing) or i.done()))]

    def _check(self, op: str) -> None:
        if self._freed:
            raise MeshError(f"rank {self._t.rank}: window {self.name}: {op} on a freed window")

    def _target(self, rank: int, op: str) -> int:
        if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) \
                or not 0 <= rank < self.size:
            raise ValueError(f"rank {self._t.rank}: window {self.name}: {op} rank {rank!r}: its "
                             f"group has ranks 0..{self.size - 1}")
        w = self._c.ranks[int(rank)]
        if op in _EPOCH and not (self._fenced or rank in self._locked or
                                 rank in self._started):
            raise MeshError(f"rank {self._t.rank}: window {self.name}: {op} on rank {rank} "
                            f"outside an epoch: call win.fence() (every rank), "
                            f"win.lock({rank}) or win.start([{rank}]) first")
        return w

    def _range(self, rank: int, offset: Any, count: int, op: str) -> None:
        size = self.sizes[rank]
        if not isinstance(offset, (int, np.integer)) or isinstance(offset, bool) \
                or not 0 <= offset <= MAX_OFFSET or count < 0 or offset + count > size:
            raise ValueError(f"rank {self._t.rank}: window {self.name}: {op} rank {rank} at "
                             f"offset {offset!r}, {count} elements: out of range (its window "
                             f"has {size})")

    def _what(self, op: str, rank: int) -> str:
        """An operation as errors name it: ``window world/window#0: put to rank 1``."""
        said = self._said.get((op, rank))
        if said is None:
            w = self._c.ranks[rank]
            peer = f"rank {rank}" if w == rank else f"rank {rank} (world rank {w})"
            said = self._said[(op, rank)] = f"window {self.name}: {op} {peer}"
        return said

    def _release(self) -> None:
        """Exposed no more: requests that come later are dropped (mesh.rma.DROPPED,
        until the group is forgotten: Inbox.forget)."""
        self._freed = True
        side = self._target_side
        if side is not None and self._t.inbox.handlers.get(self._gid) is side:
            self._t.inbox.handlers[self._gid] = DROPPED
        self._open.clear()
        for _, item in self._posted:
            self._t.cancel(item)
        self._posted, self._started = [], []
        self._access = self._exposure = False

def _done(comm: "Comm", value: Any) -> Request:
    """A request done at once with ``value`` (a get from PROC_NULL)."""
    from .request import _Null
    return _Null(comm, value)
