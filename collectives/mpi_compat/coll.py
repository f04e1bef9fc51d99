"""mpi4py's buffer collectives (Bcast, Reduce, Allreduce, Gather, Scatter,
Allgather, Alltoall, their v-forms, Reduce_scatter, Scan, Exscan, and
the nonblocking Iallreduce, Ibcast, Ibarrier, Ireduce, Igather, Iscatter,
Iallgather, Ialltoall: collectives' async_op, the result copied into the
receive buffer at the wait) over collectives' calls: the buffer specs
read as views of the caller's memory (buffers.py; a derived datatype's
elements packed, and unpacked into the receive buffer after, by the calls
that PACKED_BY in types.py names), each call one of
collectives' (the v-calls' counts, which MPI gives the root alone, one small
all_gather more), results written into the receive buffer."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np

import mesh
from mesh.errors import MismatchError

from .. import api as C
from .. import persistent as P
from ..ops import resolve
from ..userop import Op as UserOp
from .buffers import Buf, check_signature, copy_into, own_block, spec, vspec
from .datatypes import Selection, Typemap
from .requests import Prequest, Request
from .types import ERR_TYPE, OPS, Datatype, Op
from .types import Exception as MPIException

__all__ = ["Collectives", "coll_op", "reduce_local"]

_SUM = OPS["SUM"]


def coll_op(op: Any, what: str) -> Any:
    """The op as collectives take it ("sum", a collectives.Op)."""
    if not isinstance(op, Op):
        raise TypeError(f"collectives.MPI {what}: op must be an MPI.Op (MPI.SUM, "
                        f"MPI.Op.Create(fn)), got {op!r:.60}")
    return op.coll


def _is_loc(op: Any) -> bool:
    return isinstance(op, Op) and op.name in ("MAXLOC", "MINLOC")


def _reducing(op: Any, what: str, *bufs: Buf | None) -> Any:
    """The op as collectives take it for a reduction over ``bufs``, a
    derived datatype's packed elements where one is: a builtin op combines
    them elementwise; a user op (Op.Create's ``fn(inbuf, inoutbuf,
    datatype)``) is shown its operands as MPI shows them, in the datatype's
    layout, with the datatype."""
    name = coll_op(op, what)
    dt = next((b.datatype for b in bufs if b is not None and b.datatype is not None), None)
    if dt is None or not isinstance(name, UserOp) or not name._dtype_arg:
        return name
    return _in_layout(name, dt)


def _in_layout(user: UserOp, dt: Datatype) -> UserOp:
    """``user`` over ``dt``'s packed elements: each operand unpacked into
    ``count x extent`` bytes from its first item's origin (as MPI hands a
    user op a derived datatype's items; mpi4py's buffers), ``fn`` called on
    them and ``dt``, the elements of its second packed back."""
    tm = dt.typemap
    assert tm is not None
    fn = user.fn

    def layout(a: np.ndarray, b: np.ndarray, _: Any) -> None:
        count = a.size // tm.n if tm.n else 0
        ina, inout = _laid(tm, dt, count, a), _laid(tm, dt, count, b)
        fn(ina[0], inout[0], dt)
        b[...] = inout[1].get()

    return UserOp(layout, commute=user.commute, name=f"{user.label} over a derived datatype")


def _laid(tm: Typemap, dt: Datatype, count: int,
          packed: np.ndarray) -> tuple[memoryview, Selection]:
    """``count`` items of ``tm``, ``packed``'s elements in their places in
    zeroed bytes: (the ``count x extent`` bytes from the first item's
    origin, a memoryview; the Selection of their elements)."""
    lo, hi = tm.span()
    size = count * max(tm.extent, 0)
    base = max(0, -lo, -(lo + (count - 1) * tm.extent)) if count else 0
    raw = np.zeros(base + max(size, hi + max(0, (count - 1) * tm.extent)), np.uint8)
    sel = Selection(tm, dt.dtype, raw, count, base, "Op.Create")
    sel.put(packed)
    return memoryview(raw.data)[base:base + size], sel


@contextmanager
def _signatures(g: mesh.Comm, what: str, *bufs: Buf | None) -> Iterator[None]:
    """A reduction over a derived datatype whose ranks' elements differ
    (meshrun's MismatchError): MPI's ERR_TYPE, naming them."""
    try:
        yield
    except MismatchError as e:
        if not any(b is not None and b.typed for b in bufs):
            raise
        raise MPIException(ERR_TYPE, f"rank {g.rank}: collectives.MPI {what}, group {g.name}: "
                                     f"the type signatures differ (MPI_ERR_TYPE): {e}") from e


def _persistent_op(op: Any, what: str, *bufs: Buf | None) -> Any:
    if isinstance(op, Op) and op.name in ("MAXLOC", "MINLOC"):
        raise NotImplementedError(f"collectives.MPI {what} with {op.name}: not provided "
                                  f"(the pair types' persistent form): call Allreduce each "
                                  f"iteration")
    return _reducing(op, what, *bufs)


def _steps(*steps: Callable[[], None] | None) -> Callable[[], None] | None:
    """A start's steps, in order (None: none)."""
    todo = [f for f in steps if f is not None]
    if not todo:
        return None
    if len(todo) == 1:
        return todo[0]

    def run() -> None:
        for f in todo:
            f()
    return run


def packing(b: Buf | None) -> Callable[[], None] | None:
    """A persistent call's start step for ``b``: a derived datatype's
    elements packed again, as the buffer holds them then."""
    return b.refresh if b is not None and b.typed else None


def unpacking(b: Buf | None) -> Callable[[Any], Any] | None:
    """A persistent call's wait step for ``b``: its elements unpacked
    into their places (a derived datatype's)."""
    return b.done_with if b is not None and b.typed else None


def _opt(b: Buf | None) -> np.ndarray | None:
    return None if b is None else b.view


def _copying(recv: np.ndarray, send: np.ndarray | None,
             what: str) -> Callable[[], None] | None:
    """A start's first step: ``send`` copied into ``recv`` (None: in place)."""
    if send is None:
        return None
    return lambda: copy_into(recv, send, what)


def _loc(g: mesh.Comm, send: np.ndarray, recv: np.ndarray | None, op: Op, what: str) -> None:
    """MAXLOC or MINLOC over pair types (MPI.DOUBLE_INT...): collectives'
    all_reduce_loc on the values and their indices."""
    if send.dtype.names != ("v", "i"):
        raise TypeError(f"collectives.MPI {what} by {op.name}: the buffers must be of a pair "
                        f"type (MPI.DOUBLE_INT, MPI.TWOINT...), got {send.dtype}")
    v, i = C.all_reduce_loc(g, send["v"], index=send["i"],
                            op="max" if op.name == "MAXLOC" else "min")
    if recv is not None:
        recv["v"], recv["i"] = v, i


def _view(buf: Buf | None, other: Buf | None = None) -> np.ndarray:
    """``buf``'s view (None: MPI.IN_PLACE's, ``other``'s)."""
    b = other if buf is None else buf
    assert b is not None
    return b.view


def _gathering(g: mesh.Comm, sendbuf: Any, recvbuf: Any, what: str,
               root: int | None = None) -> tuple[np.ndarray, Buf | None]:
    """A Gather's (``root``) or an Allgather's (None) block to send and
    receive buffer (None off the root): with IN_PLACE, a copy of the rank's
    own block of the receive buffer, where MPI reads it."""
    own = g.rank if root is None else root
    recv = spec(recvbuf, what, per=g.size, packs=True) if g.rank == own else None
    if own_block(sendbuf) and recv is not None:
        k = len(recv.view) // g.size
        return recv.view[own * k:(own + 1) * k].copy(), recv
    return spec(sendbuf, what, packs=True).view, recv


def _into(g: mesh.Comm, recv: Buf | None, got: Any, what: str) -> None:
    """A collective's result into its receive buffer (a nonblocking one's at
    its wait), a derived datatype's elements unpacked into their places."""
    if recv is not None and got is not None:
        check_signature(recv.typed, recv.view, got,
                        f"rank {g.rank}: collectives.MPI {what}, group {g.name}")
        copy_into(recv.view, got, what)
        recv.done()


def _now(got: Any, finish: Callable[[Any], Any]) -> None:
    """A blocking call's result through the finish its nonblocking form runs at its wait."""
    finish(got)


def _request(work: Any, finish: Callable[[Any], Any]) -> Request:
    return Request(work, finish=finish)


def _nothing(_: Any) -> None:
    pass


def _copying_done(out: np.ndarray, recv: Buf, what: str) -> Callable[[Any], None]:
    """A reduction's result copied into ``out`` (a derived ``recv`` unpacked);
    None (rank 0's Exscan): the receive buffer left as it was."""
    def finish(got: Any) -> None:
        if got is not None:
            copy_into(out, got, what)
            recv.done()
    return finish


def _matched(g: mesh.Comm, b: Buf, counts: list[int], what: str) -> None:
    """A root's v-call over a derived datatype, after the call (every rank
    through it): each rank's elements must be its block's, MPI's matching
    type signatures."""
    if b.typed and counts != b.counts:
        assert b.counts is not None
        r = next(r for r, (k, mine) in enumerate(zip(counts, b.counts)) if k != mine)
        raise MPIException(ERR_TYPE, f"rank {g.rank}: collectives.MPI {what}, group {g.name}: "
                                     f"the type signatures differ (MPI_ERR_TYPE): rank {r} "
                                     f"has {counts[r]} x {b.view.dtype}, the root's datatype "
                                     f"block for it {b.counts[r]}")


def reduce_local(op: Op, inbuf: Any, inoutbuf: Any) -> None:
    """Op.Reduce_local: ``inoutbuf = inbuf (op) inoutbuf`` in this process,
    the two buffers' elements alike in count and type (ValueError, as
    mpi4py's, where they are not)."""
    what = f"{op!r}.Reduce_local"
    a, b = spec(inbuf, what, packs=True), spec(inoutbuf, what, packs=True)
    x, y = a.view, b.view
    if x.dtype != y.dtype or x.size != y.size:
        raise ValueError(f"collectives.MPI {what}: the buffers differ: {x.size} x {x.dtype} "
                         f"in, {y.size} x {y.dtype} inout")
    if _is_loc(op):
        if y.dtype.names != ("v", "i"):
            raise TypeError(f"collectives.MPI {what}: the buffers must be of a pair type "
                            f"(MPI.DOUBLE_INT, MPI.TWOINT...), got {y.dtype}")
        better = x["v"] > y["v"] if op.name == "MAXLOC" else x["v"] < y["v"]
        take = better | ((x["v"] == y["v"]) & (x["i"] < y["i"]))
        y[take] = x[take]
    elif isinstance(name := _reducing(op, what, a, b), UserOp):
        ro = x.view()
        ro.flags.writeable = False      # (MPI's invec: fn writes only its second operand)
        got = name.fn(ro, y, b.datatype) if name._dtype_arg else name.fn(ro, y)
        if got is not None and got is not y:
            y[...] = got
    else:
        resolve(name, y.dtype).combine(y, x, src_first=True)
    b.done()


class Collectives:
    """The buffer half of collectives.MPI's Comm's collectives."""

    _g: mesh.Comm

    def _counts(self, mine: int) -> list[int]:
        got = C.all_gather(self._g, np.array([mine], np.int64))
        return [int(k) for k in np.asarray(got).reshape(-1)]

    def Barrier(self) -> None:
        C.barrier(self._g)

    barrier = Barrier

    def Bcast(self, buf: Any, root: int = 0) -> None:
        b = spec(buf, "Bcast", packs=True)
        C.broadcast(self._g, b.view, root)
        if self._g.rank != root:
            b.done()

    def Reduce(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM, root: int = 0) -> None:
        g, mine = self._g, self._g.rank == root
        recv = spec(recvbuf, "Reduce", packs=True) if mine else None
        sent = None if own_block(sendbuf) and recv is not None else \
            spec(sendbuf, "Reduce", packs=True)
        send = recv.view if sent is None and recv is not None else _view(sent)
        with _signatures(g, "Reduce", recv, sent):
            if _is_loc(op):
                _loc(g, send, None if recv is None else recv.view, op, "Reduce")
            elif recv is not None:
                if send is not recv.view:
                    copy_into(recv.view, send, "Reduce")
                C.reduce(g, recv.view, root, _reducing(op, "Reduce", recv, sent))
            else:
                C.reduce(g, send, root, _reducing(op, "Reduce", sent))
        if recv is not None:
            recv.done()

    def Allreduce(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> None:
        g = self._g
        recv = spec(recvbuf, "Allreduce", packs=True)
        sent = None if own_block(sendbuf) else spec(sendbuf, "Allreduce", packs=True)
        with _signatures(g, "Allreduce", recv, sent):
            if _is_loc(op):
                _loc(g, _view(sent, recv), recv.view, op, "Allreduce")
            else:
                if sent is not None:
                    copy_into(recv.view, sent.view, "Allreduce")
                C.all_reduce(g, recv.view, _reducing(op, "Allreduce", recv, sent))
        recv.done()

    # -- persistent (MPI-4's *_init: collectives.persistent) ------------------------------
    def Allreduce_init(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> Prequest:
        """Each start all-reduces, in place on ``recvbuf``, what ``sendbuf``
        holds then (copied in at the start, unless MPI.IN_PLACE); a derived
        datatype's elements packed at each start, unpacked at each wait."""
        what = "Allreduce_init"
        recv = spec(recvbuf, what, packs=True)
        sent = None if own_block(sendbuf) else spec(sendbuf, what, packs=True)
        req = P.all_reduce_init(self._g, recv.view, _persistent_op(op, what, recv, sent))
        return Prequest(req, before=_steps(packing(recv if sent is None else sent),
                                           _copying(recv.view, _opt(sent), what)),
                        finish=unpacking(recv))

    def Bcast_init(self, buf: Any, root: int = 0) -> Prequest:
        b = spec(buf, "Bcast_init", packs=True)
        mine = self._g.rank == root
        return Prequest(P.broadcast_init(self._g, b.view, root),
                        before=packing(b) if mine else None,
                        finish=None if mine else unpacking(b))

    def Reduce_init(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM,
                    root: int = 0) -> Prequest:
        """As Allreduce_init on the root; the others' ``sendbuf`` is read
        as it is at each start."""
        g, what = self._g, "Reduce_init"
        if g.rank != root:
            mine = spec(sendbuf, what, packs=True)
            return Prequest(P.reduce_init(g, mine.view, root, _persistent_op(op, what, mine)),
                            before=packing(mine))
        recv = spec(recvbuf, what, packs=True)
        sent = None if own_block(sendbuf) else spec(sendbuf, what, packs=True)
        return Prequest(P.reduce_init(g, recv.view, root, _persistent_op(op, what, recv, sent)),
                        before=_steps(packing(recv if sent is None else sent),
                                      _copying(recv.view, _opt(sent), what)),
                        finish=unpacking(recv))

    def Allgather_init(self, sendbuf: Any, recvbuf: Any) -> Prequest:
        g, what = self._g, "Allgather_init"
        recv = spec(recvbuf, what, per=g.size, packs=True)
        k = len(recv.view) // g.size
        if own_block(sendbuf):       # (this rank's block, copied out at each start)
            send = np.empty(k, recv.view.dtype)
            mine = recv.view[g.rank * k:(g.rank + 1) * k]
            before = _steps(packing(recv), lambda: copy_into(send, mine, what))
        else:
            sent = spec(sendbuf, what, packs=True)
            send, before = sent.view, packing(sent)
        req = P.all_gather_init(g, send, out=recv.view.reshape(g.size, -1))
        return Prequest(req, before=before, finish=unpacking(recv))

    def Barrier_init(self) -> Prequest:
        return Prequest(P.barrier_init(self._g))

    def Alltoall_init(self, sendbuf: Any, recvbuf: Any) -> Prequest:
        g, what = self._g, "Alltoall_init"
        recv = spec(recvbuf, what, per=g.size, packs=True)
        if own_block(sendbuf):       # (the receive buffer, copied out at each start)
            send = np.empty_like(recv.view)
            before = _steps(packing(recv), _copying(send, recv.view, what))
        else:
            sent = spec(sendbuf, what, per=g.size, packs=True)
            send, before = sent.view, packing(sent)
        req = P.all_to_all_init(g, send.reshape(g.size, -1), out=recv.view.reshape(g.size, -1))
        return Prequest(req, before=before, finish=unpacking(recv))

    def Gather_init(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Prequest:
        g, what = self._g, "Gather_init"
        if g.rank != root:
            sent = spec(sendbuf, what, packs=True)
            return Prequest(P.gather_init(g, sent.view, root), before=packing(sent))
        recv = spec(recvbuf, what, per=g.size, packs=True)
        if own_block(sendbuf):       # (the root's block, copied out at each start)
            k = len(recv.view) // g.size
            send = np.empty(k, recv.view.dtype)
            before = _steps(packing(recv),
                            _copying(send, recv.view[root * k:(root + 1) * k], what))
        else:
            sent = spec(sendbuf, what, packs=True)
            send, before = sent.view, packing(sent)
        req = P.gather_init(g, send, root, out=recv.view.reshape(g.size, -1))
        return Prequest(req, before=before, finish=unpacking(recv))

    def Scatter_init(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Prequest:
        g, what = self._g, "Scatter_init"
        if g.rank == root:
            sent = spec(sendbuf, what, per=g.size, packs=True)
            recv = None if own_block(recvbuf) else spec(recvbuf, what, packs=True)
            return Prequest(P.scatter_init(g, sent.view.reshape(g.size, -1), root,
                                           out=_opt(recv)),
                            before=packing(sent), finish=unpacking(recv))
        recv = spec(recvbuf, what, packs=True)
        return Prequest(P.scatter_init(g, None, root, out=recv.view, dtype=recv.view.dtype,
                                       shape=recv.view.shape), finish=unpacking(recv))

    def Scan_init(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> Prequest:
        return self._scan_init(P.scan_init, sendbuf, recvbuf, op, "Scan_init")

    def Exscan_init(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> Prequest:
        """Rank 0's ``recvbuf`` is left as it was (MPI's is undefined)."""
        return self._scan_init(P.exscan_init, sendbuf, recvbuf, op, "Exscan_init")

    def _scan_init(self, init: Callable[..., Any], sendbuf: Any, recvbuf: Any, op: Op,
                   what: str) -> Prequest:
        recv = spec(recvbuf, what, packs=True)
        sent = None if own_block(sendbuf) else spec(sendbuf, what, packs=True)
        if sent is None:            # (the receive buffer, copied out at each start)
            send = np.empty_like(recv.view)
            before = _steps(packing(recv), _copying(send, recv.view, what))
        else:   # (a derived receive buffer packed too: rank 0's Exscan unpacks it as it was)
            send, before = sent.view, _steps(packing(sent), packing(recv))
        return Prequest(init(self._g, send, _persistent_op(op, what, recv, sent),
                             out=recv.view), before=before, finish=unpacking(recv))

    def Reduce_scatter_block_init(self, sendbuf: Any, recvbuf: Any,
                                  op: Op = _SUM) -> Prequest:
        """With IN_PLACE the input is ``recvbuf`` whole, the result its
        first block (MPI's)."""
        g, what = self._g, "Reduce_scatter_block_init"
        if own_block(sendbuf):
            recv = spec(recvbuf, what, per=g.size, packs=True)
            send = np.empty_like(recv.view)
            out = recv.view[:len(recv.view) // g.size]
            sent, before = None, _steps(packing(recv), _copying(send, recv.view, what))
        else:
            sent = spec(sendbuf, what, per=g.size, packs=True)
            recv = spec(recvbuf, what, packs=True)
            send, out, before = sent.view, recv.view, packing(sent)
        req = P.reduce_scatter_init(g, send, _persistent_op(op, what, recv, sent), out=out)
        return Prequest(req, before=before, finish=unpacking(recv))

    def Iallreduce(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> Request:
        recv = spec(recvbuf, "Iallreduce", packs=True)
        sent = None if own_block(sendbuf) else spec(sendbuf, "Iallreduce", packs=True)
        if sent is not None:
            copy_into(recv.view, sent.view, "Iallreduce")
        with _signatures(self._g, "Iallreduce", recv, sent):
            work = C.all_reduce(self._g, recv.view, _reducing(op, "Iallreduce", recv, sent),
                                async_op=True)
        return Request(work, finish=recv.done_with if recv.typed else None)

    def Ibcast(self, buf: Any, root: int = 0) -> Request:
        b = spec(buf, "Ibcast", packs=True)
        work = C.broadcast(self._g, b.view, root, async_op=True)
        return Request(work, finish=b.done_with if b.typed and self._g.rank != root else None)

    def Ibarrier(self) -> Request:
        return Request(C.barrier(self._g, async_op=True))

    def Ireduce(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM, root: int = 0) -> Request:
        g = self._g
        recv = spec(recvbuf, "Ireduce", packs=True) if g.rank == root else None
        sent = None if own_block(sendbuf) and recv is not None else \
            spec(sendbuf, "Ireduce", packs=True)
        if recv is not None and sent is not None:
            copy_into(recv.view, sent.view, "Ireduce")
        with _signatures(g, "Ireduce", recv, sent):
            work = C.reduce(g, _view(recv, sent) if recv is not None else _view(sent), root,
                            _reducing(op, "Ireduce", recv, sent), async_op=True)
        return Request(work, finish=recv.done_with if recv is not None and recv.typed
                       else None)

    def Igather(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Request:
        g = self._g
        send, recv = _gathering(g, sendbuf, recvbuf, "Igather", root)
        return Request(C.gather(g, send, root, async_op=True),
                       finish=lambda rows: _into(g, recv, rows, "Igather"))

    def Iscatter(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Request:
        g = self._g
        blocks = spec(sendbuf, "Iscatter", per=g.size, packs=True).view.reshape(g.size, -1) \
            if g.rank == root else None
        recv = None if own_block(recvbuf) else spec(recvbuf, "Iscatter", packs=True)
        work = C.scatter(g, blocks, root, async_op=True,
                         dtype=None if recv is None else recv.view.dtype,
                         shape=None if recv is None else recv.view.shape)
        return Request(work, finish=lambda row: _into(g, recv, row, "Iscatter"))

    def Iallgather(self, sendbuf: Any, recvbuf: Any) -> Request:
        g = self._g
        send, recv = _gathering(g, sendbuf, recvbuf, "Iallgather")
        return Request(C.all_gather(g, send, async_op=True),
                       finish=lambda rows: _into(g, recv, rows, "Iallgather"))

    def Ialltoall(self, sendbuf: Any, recvbuf: Any) -> Request:
        g = self._g
        recv = spec(recvbuf, "Ialltoall", per=g.size, packs=True)
        send = recv.view.copy() if own_block(sendbuf) else \
            spec(sendbuf, "Ialltoall", per=g.size, packs=True).view
        return Request(C.all_to_all(g, send.reshape(g.size, -1), async_op=True),
                       finish=lambda got: _into(g, recv, got, "Ialltoall"))

    def Gather(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:
        g = self._g
        send, recv = _gathering(g, sendbuf, recvbuf, "Gather", root)
        _into(g, recv, C.gather(g, send, root), "Gather")

    def Scatter(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:
        g = self._g
        mine = g.rank == root
        blocks = None
        if mine:
            send = spec(sendbuf, "Scatter", per=g.size, packs=True).view
            blocks = send.reshape(g.size, -1)
        if own_block(recvbuf) and blocks is not None:
            C.scatter(g, blocks, root)
            return
        recv = spec(recvbuf, "Scatter", packs=True)
        row = C.scatter(g, blocks, root, dtype=recv.view.dtype, shape=recv.view.shape)
        _into(g, recv, row, "Scatter")

    def Allgather(self, sendbuf: Any, recvbuf: Any) -> None:
        g = self._g
        send, recv = _gathering(g, sendbuf, recvbuf, "Allgather")
        _into(g, recv, C.all_gather(g, send), "Allgather")

    def Alltoall(self, sendbuf: Any, recvbuf: Any) -> None:
        g = self._g
        recv = spec(recvbuf, "Alltoall", per=g.size, packs=True)
        send = recv.view.copy() if own_block(sendbuf) else \
            spec(sendbuf, "Alltoall", per=g.size, packs=True).view
        _into(g, recv, C.all_to_all(g, send.reshape(g.size, -1)), "Alltoall")

    def Gatherv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:
        _now(*self._gatherv(sendbuf, recvbuf, root, "Gatherv", False))

    def Igatherv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Request:
        """(the counts are agreed at the call, the blocks move until the wait)"""
        return _request(*self._gatherv(sendbuf, recvbuf, root, "Igatherv", True))

    def _gatherv(self, sendbuf: Any, recvbuf: Any, root: int, what: str,
                 async_op: bool) -> tuple[Any, Callable[[Any], Any]]:
        g = self._g
        recv = vspec(recvbuf, what, g.size, packs=True) if g.rank == root else None
        if own_block(sendbuf) and recv is not None:
            assert recv.counts is not None and recv.displs is not None
            d, k = recv.displs[root], recv.counts[root]
            send = recv.view[d:d + k].copy()
        else:
            send = spec(sendbuf, what, packs=True).view
        counts = self._counts(len(send))
        if recv is None:
            return C.gather_v(g, send, counts, root, async_op=async_op), _nothing
        work = C.gather_v(g, send, counts, root, displs=recv.displs, out=recv.view,
                          async_op=async_op)

        def finish(_: Any) -> None:
            assert recv is not None
            _matched(g, recv, counts, what)
            recv.done()
        return work, finish

    def Scatterv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:
        _now(*self._scatterv(sendbuf, recvbuf, root, "Scatterv", False))

    def Iscatterv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Request:
        """(the counts are agreed at the call, the blocks move until the wait)"""
        return _request(*self._scatterv(sendbuf, recvbuf, root, "Iscatterv", True))

    def _scatterv(self, sendbuf: Any, recvbuf: Any, root: int, what: str,
                  async_op: bool) -> tuple[Any, Callable[[Any], Any]]:
        g = self._g
        send = vspec(sendbuf, what, g.size, packs=True) if g.rank == root else None
        recv = None if own_block(recvbuf) else spec(recvbuf, what, packs=True)
        if send is not None and recv is None:
            assert send.counts is not None
            mine = send.counts[root]
        else:
            mine = 0 if recv is None else len(recv.view)
        counts = self._counts(mine)
        work = C.scatter_v(g, None if send is None else send.view, counts, root,
                           dtype=None if recv is None else recv.view.dtype,
                           displs=None if send is None else send.displs, async_op=async_op)

        def finish(got: Any) -> None:
            _into(g, recv, got, what)
            if send is not None:
                _matched(g, send, counts, what)
        return work, finish

    def Allgatherv(self, sendbuf: Any, recvbuf: Any) -> None:
        _now(*self._allgatherv(sendbuf, recvbuf, "Allgatherv", False))

    def Iallgatherv(self, sendbuf: Any, recvbuf: Any) -> Request:
        return _request(*self._allgatherv(sendbuf, recvbuf, "Iallgatherv", True))

    def _allgatherv(self, sendbuf: Any, recvbuf: Any, what: str,
                    async_op: bool) -> tuple[Any, Callable[[Any], Any]]:
        g = self._g
        recv = vspec(recvbuf, what, g.size, packs=True)
        assert recv.counts is not None and recv.displs is not None
        if own_block(sendbuf):
            d, k = recv.displs[g.rank], recv.counts[g.rank]
            send = recv.view[d:d + k].copy()
        else:
            send = spec(sendbuf, what, packs=True).view
        return (C.all_gather_v(g, send, recv.counts, displs=recv.displs, out=recv.view,
                               async_op=async_op), lambda _: recv.done())

    def Alltoallv(self, sendbuf: Any, recvbuf: Any) -> None:
        _now(*self._alltoallv(sendbuf, recvbuf, "Alltoallv", False))

    def Ialltoallv(self, sendbuf: Any, recvbuf: Any) -> Request:
        return _request(*self._alltoallv(sendbuf, recvbuf, "Ialltoallv", True))

    def _alltoallv(self, sendbuf: Any, recvbuf: Any, what: str,
                   async_op: bool) -> tuple[Any, Callable[[Any], Any]]:
        g = self._g
        recv = vspec(recvbuf, what, g.size, packs=True)
        send = recv if own_block(sendbuf) else vspec(sendbuf, what, g.size, packs=True)
        flat = send.view.copy() if send is recv else send.view
        return (C.all_to_all_v(g, flat, send.counts, recv.counts, send_displs=send.displs,
                               recv_displs=recv.displs, out=recv.view, async_op=async_op),
                lambda _: recv.done())

    def Alltoallw(self, sendbuf: Any, recvbuf: Any) -> None:
        """``[buf, counts, displs, datatypes]`` each side (displacements in
        bytes; ``[buf, (counts, displs), datatypes]`` too), one entry a
        rank, a derived datatype's items packed and unpacked; MPI.IN_PLACE:
        the receive buffer's blocks are sent. A block's bytes must be the
        same at both ends (MismatchError naming both counts, on the two
        ranks)."""
        from .neighbor import Wblocks       # (neighbor.py imports comm.py, which imports this)
        g = self._g
        w = Wblocks(g, sendbuf, recvbuf, "Alltoallw")
        try:
            got = C.all_to_all_v(g, w.flat, w.sends, w.recvs)
        except MismatchError as e:
            raise MismatchError(f"rank {g.rank}: collectives.MPI Alltoallw, group {g.name}: "
                                f"a block's bytes differ between its sender and its "
                                f"receiver (counts x datatypes' sizes): {e}") from e
        w.place(got)

    def Ialltoallw(self, sendbuf: Any, recvbuf: Any) -> Request:
        from .neighbor import Wblocks
        w = Wblocks(self._g, sendbuf, recvbuf, "Ialltoallw")
        return Request(C.all_to_all_v(self._g, w.flat, w.sends, w.recvs, async_op=True),
                       finish=w.place)

    def Alltoallw_init(self, sendbuf: Any, recvbuf: Any, info: Any = None) -> Prequest:
        """Each start sends what the send buffer's blocks hold then."""
        from .neighbor import Wblocks
        w = Wblocks(self._g, sendbuf, recvbuf, "Alltoallw_init")
        out = np.empty(sum(w.recvs), np.uint8)
        req = P.all_to_all_v_init(self._g, w.flat, w.sends, w.recvs, out=out)
        return Prequest(req, before=w.pack, finish=w.place)

    def Reduce_scatter_block(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> None:
        _now(*self._reduce_scatter_block(sendbuf, recvbuf, op, "Reduce_scatter_block", False))

    def Ireduce_scatter_block(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> Request:
        return _request(*self._reduce_scatter_block(sendbuf, recvbuf, op,
                                                   "Ireduce_scatter_block", True))

    def _reduce_scatter_block(self, sendbuf: Any, recvbuf: Any, op: Op, what: str,
                              async_op: bool) -> tuple[Any, Callable[[Any], Any]]:
        g = self._g
        if own_block(sendbuf):
            recv = spec(recvbuf, what, per=g.size, packs=True)
            sent, send = None, recv.view.copy()
            out = recv.view[:len(recv.view) // g.size]
        else:
            recv = spec(recvbuf, what, packs=True)
            sent = spec(sendbuf, what, per=g.size, packs=True)
            send, out = sent.view, recv.view
        with _signatures(g, what, recv, sent):
            work = C.reduce_scatter(g, send, _reducing(op, what, recv, sent),
                                    async_op=async_op)
        return work, _copying_done(out, recv, what)

    def Reduce_scatter(self, sendbuf: Any, recvbuf: Any, recvcounts: Any = None,
                       op: Op = _SUM) -> None:
        """(a derived datatype's ``recvcounts`` in its items)"""
        _now(*self._reduce_scatter(sendbuf, recvbuf, recvcounts, op, "Reduce_scatter", False))

    def Ireduce_scatter(self, sendbuf: Any, recvbuf: Any, recvcounts: Any = None,
                        op: Op = _SUM) -> Request:
        """(``recvcounts`` left out: agreed at the call)"""
        return _request(*self._reduce_scatter(sendbuf, recvbuf, recvcounts, op,
                                             "Ireduce_scatter", True))

    def _reduce_scatter(self, sendbuf: Any, recvbuf: Any, recvcounts: Any, op: Op, what: str,
                        async_op: bool) -> tuple[Any, Callable[[Any], Any]]:
        g = self._g
        recv = spec(recvbuf, what, packs=True)
        per = recv.datatype.typemap.n if recv.datatype is not None and \
            recv.datatype.typemap is not None else 1
        if own_block(sendbuf):
            if recvcounts is None:
                raise ValueError(f"collectives.MPI {what}: MPI.IN_PLACE needs recvcounts")
            counts = [int(k) * per for k in recvcounts]
            sent, send = None, recv.view.copy()[:sum(counts)]
            out = recv.view[:counts[g.rank]]
        else:
            sent = spec(sendbuf, what, packs=True)
            send, out = sent.view, recv.view
            counts = [int(k) * per for k in recvcounts] if recvcounts is not None \
                else self._counts(len(out))
        with _signatures(g, what, recv, sent):
            work = C.reduce_scatter_v(g, send, counts, _reducing(op, what, recv, sent),
                                      async_op=async_op)
        return work, _copying_done(out, recv, what)

    def Scan(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> None:
        _now(*self._scan(C.scan, sendbuf, recvbuf, op, "Scan", False))

    def Iscan(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> Request:
        return _request(*self._scan(C.scan, sendbuf, recvbuf, op, "Iscan", True))

    def Exscan(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> None:
        """(rank 0's receive buffer is left as it was, as MPI leaves it)"""
        _now(*self._scan(C.exscan, sendbuf, recvbuf, op, "Exscan", False))

    def Iexscan(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> Request:
        """(rank 0's receive buffer is left as it was, as MPI leaves it)"""
        return _request(*self._scan(C.exscan, sendbuf, recvbuf, op, "Iexscan", True))

    def _scan(self, call: Callable[..., Any], sendbuf: Any, recvbuf: Any, op: Op, what: str,
              async_op: bool) -> tuple[Any, Callable[[Any], Any]]:
        recv = spec(recvbuf, what, packs=True)
        sent = None if own_block(sendbuf) else spec(sendbuf, what, packs=True)
        send = recv.view.copy() if sent is None else sent.view
        with _signatures(self._g, what, recv, sent):
            work = call(self._g, send, _reducing(op, what, recv, sent), async_op=async_op)
        return work, _copying_done(recv.view, recv, what)
