"""Persistent collectives (MPI-4's MPI_Allreduce_init, MPI_Bcast_init and
the others, the uneven ones MPI_Allgatherv_init... too; mpi4py's
``comm.Allreduce_init(sendbuf, recvbuf, op)``, ``Bcast_init``, ..., then
``Prequest.Start`` and ``Wait``): a collective that repeats each
iteration, set up once and started as often as wanted::

    p = C.all_reduce_init(g, grads, op="sum")      # checked and planned once
    for step in range(steps):
        ...                                        # write grads
        p.start()                                  # or mesh.startall([p, q])
        p.wait()                                   # grads: the sum

Each init returns a mesh ``Prequest`` (mesh.persistent, as ``send_init``'s),
so ``start``, ``mesh.startall``, ``wait``, ``test``, ``mesh.waitall``,
``waitany``, ``testall`` and the rest take it beside point-to-point ones,
with MPI's rules: starting an active one raises MeshError, an inactive
one's wait returns None at once. A start is the group's next collective,
made as the ``async_op=True`` call would be: every member starts it in the
same order as its other collectives on the group (MPI's rule too), a rank
whose init said another collective, shape, dtype, op or root makes every
member's start or wait raise MismatchError, a bad argument fails the
first start on every member (each start, as the call would), and its
``timeout`` counts from each start. Its arrays belong to the call from
the start until the wait or test that completes it (as an async call's:
it may read and write them any time in between), so each start uses what
they hold when it is made. The wait returns the result: ``a`` (in place: all_reduce,
broadcast, reduce), ``out=`` (the array given at init, written each start:
the others), else a new array each start (None where the call gives
none: off a gather's root, a barrier).

What a start saves against a fresh async call: for a numpy all_reduce,
the arguments' checks, the op, the algorithm, the layout and the
fingerprint, made once at init (again only where the MESH_COLL_*
tuning changed since), and the same-host board's short way
(collectives.shm.tiny) once a start has settled it, where an async call
always takes the long way. Such a start, where the group has nothing
else going on, posts this rank's array on the board at once and leaves
the rest (the peers' posts read and combined) to its wait, in the
waiting thread (runner.post: no Work, no lane), which the peers do not
need to finish theirs; the group's next call, a test, done() or waitany
hand the rest to the lane instead. For every other start, a wait (with
no timeout) that finds it not yet begun by the group's lane runs it
itself, as a blocking call runs (runner.run_by_waiter), without the
lane's hand-off.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from mesh import ANY, Comm, Request, Status
from mesh.match import Pending
from mesh.persistent import Prequest, _empty
from mesh.request import _answered

from . import api, debug
from .displs import _ints
from .host import paths as host
from .host.paths_reduce import all_reduce_plan
from .host.paths_route import _skipped
from .plan import Tuning
from .runner import NOT_NOW, Body, Ctx, check_comm, post, run_by_waiter, start
from .shm import tiny
from .tensors import is_tensor
from .userop import Op

__all__ = ["all_reduce_init", "broadcast_init", "reduce_init", "all_gather_init",
           "reduce_scatter_init", "all_to_all_init", "gather_init", "scatter_init",
           "scan_init", "exscan_init", "barrier_init", "all_gather_v_init", "all_to_all_v_init",
           "gather_v_init", "scatter_v_init", "reduce_scatter_v_init"]


class _Started(Request):
    """One start of a persistent collective: its Work (runner's, or the
    DeviceWork of a call on a copy: a tensor, a device array, a float16
    average) as a mesh Request, for mesh.waitall, waitany and the rest:
    its item a Pending completed as the call finishes (and a waitany
    reading the socket woken then: Progress.nudge), its status MPI's empty
    one, ``out`` (the init's) written with the result where the call did
    not write it there itself."""

    __slots__ = ("_work", "_out")

    def __init__(self, g: Comm, work: Any, desc: str, out: Any = None) -> None:
        item = Pending(g.gid, ANY, 0, None, None, desc)
        super().__init__(g, item)
        self._work, self._out = work, out
        nudge = g._t.progress.nudge

        def ended(w: Any) -> None:
            error = getattr(getattr(w, "_work", w), "_error", None)
            if error is None:
                item.complete(None)
            else:
                item.fail(error)
            nudge()
        work.add_done_callback(ended)

    def wait(self, timeout: float | None = None, status: Status | None = None) -> Any:
        _answered(self, timeout, status, _empty, "wait")
        try:
            value = self._work.wait(timeout)
        except BaseException:
            self._spent = self._spent or self._work.done()
            raise
        self._spent = True
        out = self._out
        if out is None or value is None:
            return value
        if value is not out and not (isinstance(value, np.ndarray) and isinstance(out, np.ndarray)
                                     and np.may_share_memory(value, out)):
            _copy(out, value)
        return out

    def done(self) -> bool:
        return bool(self._work.done())

    def get_status(self, status: Status | None = None) -> bool:
        _answered(self, None, status, _empty, "get_status")
        return self.done()

    def cancel(self) -> bool:
        return False        # (MPI's Cancel of a collective: not allowed; nothing done here)

    @property
    def status(self) -> Status | None:
        return None


class _Posted(Request):
    """One start of a persistent all_reduce that posted on the board
    (runner.post: the short way's first half), its wait finishing it in
    the waiting thread (``Posted.run``); a wait with a timeout, a test,
    done() or waitany hand the rest to the group's lane first
    (``Posted.to_lane``) and wait for that."""

    __slots__ = ("posted", "_nudge")

    def __init__(self, g: Comm, desc: str) -> None:
        super().__init__(g, Pending(g.gid, ANY, 0, None, None, desc))
        self.posted: Any = None
        self._nudge = g._t.progress.nudge

    def ended(self, error: BaseException | None) -> None:
        """(Posted's ``done_with``) The call is done: its item too."""
        item = self._item
        assert isinstance(item, Pending)
        if error is None:
            item.complete(None)
        else:
            item.fail(error)
        self._nudge()

    def wait(self, timeout: float | None = None, status: Status | None = None) -> Any:
        _answered(self, timeout, status, _empty, "wait")
        try:
            if timeout is None:
                value = self.posted.run()
            else:
                work = self.posted.to_lane()
                value = self.posted.run() if work is None else work.wait(timeout)
        except BaseException:
            self._spent = self._spent or self.done()
            raise
        self._spent = True
        return value

    def done(self) -> bool:
        work = self.posted.to_lane()
        item = self._item
        assert isinstance(item, Pending)
        return item.event.is_set() if work is None else bool(work.done())

    def get_status(self, status: Status | None = None) -> bool:
        _answered(self, None, status, _empty, "get_status")
        return self.done()

    def cancel(self) -> bool:
        return False

    @property
    def status(self) -> Status | None:
        return None


def _copy(out: Any, value: Any) -> None:
    """A result written into the init's ``out`` (its size checked at init)."""
    if is_tensor(out):
        import torch
        src = value if is_tensor(value) else torch.as_tensor(np.asarray(value))
        with torch.no_grad():
            out.copy_(src.reshape(out.shape))
    else:
        out[...] = value.reshape(out.shape)


def _init(g: Comm, name: str, call: Callable[[], Any], out: Any = None,
          bad: str | None = None, timeout: Any = None) -> Prequest:
    """A persistent ``name`` whose each start is ``call()`` (an async
    collective, run_by_waiter), its result into ``out``; ``bad``: what is
    wrong with the init's arguments, raised by each start on every member
    (the call's own checks raise its other errors there too)."""
    desc = f"{name} on group {g.name}"
    if bad is not None:
        err = bad

        def refuse(t: Tuning) -> tuple[dict, Body]:
            raise ValueError(err)
        call = lambda: start(g, name, refuse, True, timeout)    # noqa: E731
    return Prequest(g, lambda: _Started(g, run_by_waiter(call), desc, out), desc)


def _out_of(g: Comm, name: str, out: Any, shape: tuple[int, ...] | None) -> str | None:
    """What is wrong with an init's ``out=`` for a result of ``shape``
    (None: not known here, the copy says), if anything."""
    if out is None or shape is None:
        return None
    me = f"rank {g.ranks[g.rank]}: {name}_init on group {g.name}"
    if not (isinstance(out, np.ndarray) or is_tensor(out)
            or hasattr(out, "__cuda_array_interface__")):
        return f"{me}: out= must be an array or tensor, got {type(out).__name__}"
    n = math.prod(out.shape)
    if n != math.prod(shape):
        return f"{me}: out= has {n} elements, shaped {tuple(out.shape)}; the result has " \
               f"{math.prod(shape)}, shaped {shape}"
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        return f"{me}: out= is read-only"
    return None


def _shape(a: Any) -> tuple[int, ...] | None:
    shape = getattr(a, "shape", None)
    return None if shape is None else tuple(shape)


def all_reduce_init(g: Comm, a: Any, op: str | Op = "sum", algorithm: str | None = None,
                    timeout: float | None = None) -> Prequest:
    """MPI's Allreduce_init (in place): each start all-reduces ``a`` as
    ``C.all_reduce(g, a, op, async_op=True)`` would; the wait returns ``a``.
    A numpy array's call is planned once, here (module docstring)."""
    check_comm(g, "all_reduce_init")
    if type(a) is np.ndarray and isinstance(op, str) and not api._half_avg(a, op):
        return _planned(g, a, op, algorithm, timeout)
    return _init(g, "all_reduce", lambda: api.all_reduce(g, a, op, True, algorithm, timeout))


def _planned(g: Comm, a: np.ndarray, op: str, algorithm: str | None,
             timeout: float | None) -> Prequest:
    """A numpy all_reduce's persistent form: all_reduce_plan's fingerprint
    and body made now, for every start under this tuning; the body takes
    the short way's plan (collectives.shm.tiny.settled) once a start has
    settled one."""
    prepare = all_reduce_plan(g, a, op, algorithm)
    tuning: Tuning | None = None
    fp: dict = {}
    body: Body = lambda ctx: None       # noqa: E731
    try:
        now = Tuning.from_env()
        fp, body = prepare(now)
        tuning = now
    except Exception:       # (each start raises it, under its tag, on every member)
        pass
    short = algorithm is None and a.flags.c_contiguous and a.flags.writeable and g.size > 1

    def run(ctx: Ctx) -> Any:
        plan = tiny.settled(ctx.g, ctx.tuning, a, op) if short else None
        if plan is None:
            return body(ctx)
        rest = plan.step(ctx.tag, a)
        if rest is not None:
            rest(ctx)
        if debug.ON:
            debug.note(g, "all_reduce", tiny.SHORT_PATH, a.nbytes)
        return a

    def planned(t: Tuning) -> tuple[dict, Body]:
        if t is tuning:
            return fp, run
        return prepare(t)   # (the tuning changed since: planned again)
    skipped = _skipped(g, "all_reduce", a, 0, algorithm)
    call = lambda: start(g, "all_reduce", planned, True, timeout, skipped)   # noqa: E731
    if not short or not (timeout is None or type(timeout) is float and timeout >= 0):
        return _init(g, "all_reduce", call)
    desc = f"all_reduce on group {g.name}"

    def begin() -> Request:
        """A start: posted on the board where a start has settled the short
        way's plan under this tuning and the group has nothing else going
        on (runner.post), else as an async call (_Started)."""
        try:
            t = Tuning.from_env()
        except ValueError:      # (start raises it, naming the call)
            t = None
        plan = tiny.settled(g, t, a, op) if t is tuning and t is not None else None
        if plan is not None:
            inner = _Posted(g, desc)
            got = post(g, "all_reduce", plan.fp, plan.tuning,
                       lambda tag, x: bool(plan.quick.post(-tag, x)), plan.after, a, timeout,
                       inner.ended)
            if got is not NOT_NOW:
                if debug.ON:
                    debug.note(g, "all_reduce", tiny.SHORT_PATH, a.nbytes)
                inner.posted = got
                return inner
        return _Started(g, run_by_waiter(call), desc)
    return Prequest(g, begin, desc)


def broadcast_init(g: Comm, a: Any, root: int = 0, algorithm: str | None = None,
                   timeout: float | None = None) -> Prequest:
    """MPI's Bcast_init: each start broadcasts the root's ``a`` into the
    others' ``a`` (C.broadcast); the wait returns ``a``."""
    check_comm(g, "broadcast_init")
    return _init(g, "broadcast", lambda: api.broadcast(g, a, root, True, algorithm, timeout))


def reduce_init(g: Comm, a: Any, root: int = 0, op: str | Op = "sum",
                algorithm: str | None = None, timeout: float | None = None) -> Prequest:
    """MPI's Reduce_init (in place on the root): each start reduces ``a``
    into the root's (C.reduce); the wait returns ``a``."""
    check_comm(g, "reduce_init")
    return _init(g, "reduce", lambda: api.reduce(g, a, root, op, True, algorithm, timeout))


def all_gather_init(g: Comm, a: Any, out: Any = None,
                    timeout: float | None = None) -> Prequest:
    """MPI's Allgather_init: each start gathers every rank's ``a``
    (C.all_gather) into ``out`` (shaped ``(g.size, *a.shape)``, or any
    shape of that size), which the wait returns (a new array each start
    without it)."""
    check_comm(g, "all_gather_init")
    shape = _shape(a)
    bad = _out_of(g, "all_gather", out, None if shape is None else (g.size,) + shape)
    if type(a) is np.ndarray:
        return _init(g, "all_gather", lambda: host.all_gather(g, a, True, timeout, out), out,
                     bad, timeout)
    return _init(g, "all_gather", lambda: api.all_gather(g, a, True, timeout), out, bad, timeout)


def reduce_scatter_init(g: Comm, a: Any, op: str | Op = "sum", out: Any = None,
                        timeout: float | None = None) -> Prequest:
    """MPI's Reduce_scatter_block_init: each start reduces ``a`` and gives
    this rank its ``a.shape[0] // g.size`` rows (C.reduce_scatter), into
    ``out``, which the wait returns (a new array each start without it)."""
    check_comm(g, "reduce_scatter_init")
    shape = _shape(a)
    want = None if not shape or shape[0] % g.size else (shape[0] // g.size,) + shape[1:]
    bad = _out_of(g, "reduce_scatter", out, want)
    if type(a) is np.ndarray and isinstance(op, str) and not api._half_avg(a, op, False):
        return _init(g, "reduce_scatter",
                     lambda: host.reduce_scatter(g, a, op, True, timeout, out), out, bad, timeout)
    return _init(g, "reduce_scatter", lambda: api.reduce_scatter(g, a, op, True, timeout), out,
                 bad, timeout)


def all_to_all_init(g: Comm, a: Any, out: Any = None,
                    timeout: float | None = None) -> Prequest:
    """MPI's Alltoall_init: each start exchanges ``a``'s blocks of rows
    (C.all_to_all) into ``out`` (``a``'s shape), which the wait returns (a
    new array each start without it)."""
    check_comm(g, "all_to_all_init")
    bad = _out_of(g, "all_to_all", out, _shape(a))
    if type(a) is np.ndarray:
        return _init(g, "all_to_all", lambda: host.all_to_all(g, a, True, timeout, out), out,
                     bad, timeout)
    return _init(g, "all_to_all", lambda: api.all_to_all(g, a, True, timeout), out, bad, timeout)


def gather_init(g: Comm, a: Any, root: int = 0, out: Any = None,
                timeout: float | None = None) -> Prequest:
    """MPI's Gather_init: each start gathers every rank's ``a`` on the root
    (C.gather) into its ``out`` (``(g.size, *a.shape)``), which its wait
    returns (a new array each start without it; None off the root, where
    ``out`` is not used)."""
    check_comm(g, "gather_init")
    shape = _shape(a)
    mine = g.rank == root
    bad = _out_of(g, "gather", out, None if shape is None or not mine else (g.size,) + shape)
    out = out if mine else None
    if type(a) is np.ndarray:
        return _init(g, "gather", lambda: host.gather(g, a, root, True, timeout, out), out,
                     bad, timeout)
    return _init(g, "gather", lambda: api.gather(g, a, root, True, timeout), out, bad, timeout)


def scatter_init(g: Comm, a: Any = None, root: int = 0, out: Any = None,
                 timeout: float | None = None, dtype: Any = None,
                 shape: tuple[int, ...] | None = None) -> Prequest:
    """MPI's Scatter_init: each start gives rank r row r of the root's
    ``a`` (C.scatter; ``dtype=``, ``shape=`` off the root as there), into
    ``out``, which the wait returns (a new array each start without it)."""
    check_comm(g, "scatter_init")
    rows = _shape(a) if g.rank == root else None
    want = rows[1:] if rows else (None if shape is None else tuple(shape))
    bad = _out_of(g, "scatter", out, want)
    if type(a) is np.ndarray or a is None:
        return _init(g, "scatter",
                     lambda: host.scatter(g, a, root, True, timeout, dtype, shape, out), out,
                     bad, timeout)
    return _init(g, "scatter", lambda: api.scatter(g, a, root, True, timeout, dtype, shape),
                 out, bad, timeout)


def scan_init(g: Comm, a: Any, op: str | Op = "sum", out: Any = None,
              timeout: float | None = None) -> Prequest:
    """MPI's Scan_init: each start gives rank r the ``a`` of ranks 0..r
    reduced (C.scan), into ``out`` (``a``'s shape), which the wait returns
    (a new array each start without it)."""
    check_comm(g, "scan_init")
    bad = _out_of(g, "scan", out, _shape(a))
    return _init(g, "scan", lambda: api.scan(g, a, op, True, timeout), out, bad, timeout)


def exscan_init(g: Comm, a: Any, op: str | Op = "sum", out: Any = None,
                timeout: float | None = None) -> Prequest:
    """MPI's Exscan_init: as scan_init, ranks 0..r-1 (C.exscan); rank 0's
    wait returns None (``out`` left as it was)."""
    check_comm(g, "exscan_init")
    bad = _out_of(g, "exscan", out, _shape(a))
    return _init(g, "exscan", lambda: api.exscan(g, a, op, True, timeout), out, bad, timeout)


def _no_counts(g: Comm, name: str, *counts: Any) -> str | None:
    """What is wrong where an uneven init's counts are None (MPI's are given
    at init; None would exchange them at each start, blocking it)."""
    if any(c is None for c in counts):
        return f"rank {g.ranks[g.rank]}: {name}_init on group {g.name}: the counts are " \
               f"required (MPI's are given at init)"
    return None


def all_gather_v_init(g: Comm, a: Any, counts: Any, out: Any = None, displs: Any = None,
                      timeout: float | None = None) -> Prequest:
    """MPI's Allgatherv_init: each start gathers every rank's ``a``
    (``counts[r]`` rows from rank r) as C.all_gather_v(g, a, counts,
    displs=, out=) would, into ``out``, which the wait returns (a new array
    each start without it). Counts of None (as any bad argument) fail each
    start on every member."""
    check_comm(g, "all_gather_v_init")
    return _init(g, "all_gather_v",
                 lambda: api.all_gather_v(g, a, counts, True, timeout, displs, out), out,
                 _no_counts(g, "all_gather_v", counts), timeout)


def all_to_all_v_init(g: Comm, a: Any, send_counts: Any, recv_counts: Any, out: Any = None,
                      send_displs: Any = None, recv_displs: Any = None,
                      timeout: float | None = None) -> Prequest:
    """MPI's Alltoallv_init: each start exchanges ``a``'s blocks as
    C.all_to_all_v(g, a, send_counts, recv_counts, ...) would (the blocks
    cut out of ``a`` at the start where ``send_displs`` place them apart),
    into ``out``, which the wait returns (a new array each start without it)."""
    check_comm(g, "all_to_all_v_init")
    return _init(g, "all_to_all_v",
                 lambda: api.all_to_all_v(g, a, send_counts, recv_counts, True, timeout,
                                          send_displs, recv_displs, out), out,
                 _no_counts(g, "all_to_all_v", send_counts, recv_counts), timeout)


def gather_v_init(g: Comm, a: Any, counts: Any, root: int = 0, out: Any = None,
                  displs: Any = None, timeout: float | None = None) -> Prequest:
    """MPI's Gatherv_init: each start gathers every rank's ``a`` on the
    root (C.gather_v; ``displs`` and ``out=`` the root's), which its wait
    returns (``out``, else a new array each start; None off the root)."""
    check_comm(g, "gather_v_init")
    out = out if g.rank == root else None
    return _init(g, "gather_v",
                 lambda: api.gather_v(g, a, counts, root, True, timeout, displs, out), out,
                 _no_counts(g, "gather_v", counts), timeout)


def scatter_v_init(g: Comm, a: Any, counts: Any, root: int = 0, out: Any = None,
                   displs: Any = None, timeout: float | None = None,
                   dtype: Any = None) -> Prequest:
    """MPI's Scatterv_init: each start gives rank r its ``counts[r]`` rows
    of the root's ``a`` (C.scatter_v; ``displs`` the root's, ``dtype=`` as
    there), into ``out``, which the wait returns (a new array each start
    without it)."""
    check_comm(g, "scatter_v_init")
    sizes, shape = _ints(counts, g.size), _shape(a) if g.rank == root else None
    bad = _no_counts(g, "scatter_v", counts) or _out_of(
        g, "scatter_v", out, (sizes[g.rank],) + shape[1:] if sizes and shape else None)
    return _init(g, "scatter_v",
                 lambda: api.scatter_v(g, a, counts, root, True, timeout, dtype, displs), out,
                 bad, timeout)


def reduce_scatter_v_init(g: Comm, a: Any, counts: Any, op: str | Op = "sum", out: Any = None,
                          timeout: float | None = None) -> Prequest:
    """MPI's Reduce_scatter_init: each start reduces ``a`` and gives rank r
    its ``counts[r]`` rows (C.reduce_scatter_v), into ``out``, which the
    wait returns (a new array each start without it)."""
    check_comm(g, "reduce_scatter_v_init")
    sizes, shape = _ints(counts, g.size), _shape(a)
    bad = _no_counts(g, "reduce_scatter_v", counts) or _out_of(
        g, "reduce_scatter_v", out, (sizes[g.rank],) + shape[1:] if sizes and shape else None)
    return _init(g, "reduce_scatter_v",
                 lambda: api.reduce_scatter_v(g, a, counts, op, True, timeout), out, bad,
                 timeout)


def barrier_init(g: Comm, timeout: float | None = None) -> Prequest:
    """MPI's Barrier_init: each start enters a barrier (C.barrier), which
    its wait completes once every member has started it."""
    check_comm(g, "barrier_init")
    return _init(g, "barrier", lambda: api.barrier(g, True, timeout))
