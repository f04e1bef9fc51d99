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

from typing import Any, Callable

import numpy as np

import mesh

from .. import api as C
from .. import persistent as P
from .buffers import Buf, check_signature, copy_into, in_place, spec, vspec
from .requests import Prequest, Request
from .types import ERR_TYPE, OPS, Op
from .types import Exception as MPIException

__all__ = ["Collectives", "coll_op"]

_SUM = OPS["SUM"]


def coll_op(op: Any, what: str) -> Any:
    """The op as collectives take it ("sum", a collectives.Op)."""
    if not isinstance(op, Op):
        raise TypeError(f"collectives.MPI {what}: op must be an MPI.Op (MPI.SUM, "
                        f"MPI.Op.Create(fn)), got {op!r:.60}")
    return op.coll


def _persistent_op(op: Any, what: str) -> Any:
    if isinstance(op, Op) and op.name in ("MAXLOC", "MINLOC"):
        raise NotImplementedError(f"collectives.MPI {what} with {op.name}: not provided "
                                  f"(the pair types' persistent form): call Allreduce each "
                                  f"iteration")
    return coll_op(op, what)


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


def _gathering(g: mesh.Comm, sendbuf: Any, recvbuf: Any, what: str,
               root: int | None = None) -> tuple[np.ndarray, Buf | None]:
    """A Gather's (``root``) or an Allgather's (None) block to send and
    receive buffer (None off the root): with IN_PLACE, a copy of the rank's
    own block of the receive buffer, where MPI reads it."""
    own = g.rank if root is None else root
    recv = spec(recvbuf, what, per=g.size, packs=True) if g.rank == own else None
    if in_place(sendbuf) and recv is not None:
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
        recv = spec(recvbuf, "Reduce").view if mine else None
        send = recv if in_place(sendbuf) and recv is not None else spec(sendbuf, "Reduce").view
        if isinstance(op, Op) and op.name in ("MAXLOC", "MINLOC"):
            _loc(g, send, recv, op, "Reduce")
            return
        if recv is not None:
            if send is not recv:
                copy_into(recv, send, "Reduce")
            C.reduce(g, recv, root, coll_op(op, "Reduce"))
        else:
            C.reduce(g, send, root, coll_op(op, "Reduce"))

    def Allreduce(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> None:
        recv = spec(recvbuf, "Allreduce").view
        send = recv if in_place(sendbuf) else spec(sendbuf, "Allreduce").view
        if isinstance(op, Op) and op.name in ("MAXLOC", "MINLOC"):
            _loc(self._g, send, recv, op, "Allreduce")
            return
        if send is not recv:
            copy_into(recv, send, "Allreduce")
        C.all_reduce(self._g, recv, coll_op(op, "Allreduce"))

    # -- persistent (MPI-4's *_init: collectives.persistent) ------------------------------
    def Allreduce_init(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> Prequest:
        """Each start all-reduces, in place on ``recvbuf``, what ``sendbuf``
        holds then (copied in at the start, unless MPI.IN_PLACE)."""
        recv = spec(recvbuf, "Allreduce_init").view
        send = None if in_place(sendbuf) else spec(sendbuf, "Allreduce_init").view
        req = P.all_reduce_init(self._g, recv, _persistent_op(op, "Allreduce_init"))
        return Prequest(req, before=_copying(recv, send, "Allreduce_init"))

    def Bcast_init(self, buf: Any, root: int = 0) -> Prequest:
        return Prequest(P.broadcast_init(self._g, spec(buf, "Bcast_init").view, root))

    def Reduce_init(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM,
                    root: int = 0) -> Prequest:
        """As Allreduce_init on the root; the others' ``sendbuf`` is read
        as it is at each start."""
        g = self._g
        name = _persistent_op(op, "Reduce_init")
        if g.rank != root:
            return Prequest(P.reduce_init(g, spec(sendbuf, "Reduce_init").view, root, name))
        recv = spec(recvbuf, "Reduce_init").view
        send = None if in_place(sendbuf) else spec(sendbuf, "Reduce_init").view
        return Prequest(P.reduce_init(g, recv, root, name),
                        before=_copying(recv, send, "Reduce_init"))

    def Allgather_init(self, sendbuf: Any, recvbuf: Any) -> Prequest:
        g = self._g
        recv = spec(recvbuf, "Allgather_init", per=g.size).view
        k = len(recv) // g.size
        if in_place(sendbuf):       # (this rank's block, copied out at each start)
            send = np.empty(k, recv.dtype)
            mine = recv[g.rank * k:(g.rank + 1) * k]
            before: Callable[[], None] | None = lambda: copy_into(send, mine, "Allgather_init")
        else:
            send, before = spec(sendbuf, "Allgather_init").view, None
        req = P.all_gather_init(g, send, out=recv.reshape(g.size, -1))
        return Prequest(req, before=before)

    def Barrier_init(self) -> Prequest:
        return Prequest(P.barrier_init(self._g))

    def Alltoall_init(self, sendbuf: Any, recvbuf: Any) -> Prequest:
        g = self._g
        recv = spec(recvbuf, "Alltoall_init", per=g.size).view
        if in_place(sendbuf):       # (the receive buffer, copied out at each start)
            send = np.empty_like(recv)
            before = _copying(send, recv, "Alltoall_init")
        else:
            send, before = spec(sendbuf, "Alltoall_init", per=g.size).view, None
        req = P.all_to_all_init(g, send.reshape(g.size, -1), out=recv.reshape(g.size, -1))
        return Prequest(req, before=before)

    def Gather_init(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Prequest:
        g = self._g
        if g.rank != root:
            return Prequest(P.gather_init(g, spec(sendbuf, "Gather_init").view, root))
        recv = spec(recvbuf, "Gather_init", per=g.size).view
        before = None
        if in_place(sendbuf):       # (the root's block, copied out at each start)
            k = len(recv) // g.size
            send = np.empty(k, recv.dtype)
            before = _copying(send, recv[root * k:(root + 1) * k], "Gather_init")
        else:
            send = spec(sendbuf, "Gather_init").view
        req = P.gather_init(g, send, root, out=recv.reshape(g.size, -1))
        return Prequest(req, before=before)

    def Scatter_init(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Prequest:
        g = self._g
        if g.rank == root:
            blocks = spec(sendbuf, "Scatter_init", per=g.size).view.reshape(g.size, -1)
            out = None if in_place(recvbuf) else spec(recvbuf, "Scatter_init").view
            return Prequest(P.scatter_init(g, blocks, root, out=out))
        recv = spec(recvbuf, "Scatter_init").view
        return Prequest(P.scatter_init(g, None, root, out=recv, dtype=recv.dtype,
                                       shape=recv.shape))

    def Scan_init(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> Prequest:
        return self._scan_init(P.scan_init, sendbuf, recvbuf, op, "Scan_init")

    def Exscan_init(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> Prequest:
        """Rank 0's ``recvbuf`` is left as it was (MPI's is undefined)."""
        return self._scan_init(P.exscan_init, sendbuf, recvbuf, op, "Exscan_init")

    def _scan_init(self, init: Callable[..., Any], sendbuf: Any, recvbuf: Any, op: Op,
                   what: str) -> Prequest:
        recv = spec(recvbuf, what).view
        if in_place(sendbuf):       # (the receive buffer, copied out at each start)
            send = np.empty_like(recv)
            before = _copying(send, recv, what)
        else:
            send, before = spec(sendbuf, what).view, None
        return Prequest(init(self._g, send, _persistent_op(op, what), out=recv), before=before)

    def Reduce_scatter_block_init(self, sendbuf: Any, recvbuf: Any,
                                  op: Op = _SUM) -> Prequest:
        """With IN_PLACE the input is ``recvbuf`` whole, the result its
        first block (MPI's)."""
        g, what = self._g, "Reduce_scatter_block_init"
        if in_place(sendbuf):
            whole = spec(recvbuf, what, per=g.size).view
            send = np.empty_like(whole)
            out = whole[:len(whole) // g.size]
            before = _copying(send, whole, what)
        else:
            send, before = spec(sendbuf, what, per=g.size).view, None
            out = spec(recvbuf, what).view
        return Prequest(P.reduce_scatter_init(g, send, _persistent_op(op, what), out=out),
                        before=before)

    def Iallreduce(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> Request:
        recv = spec(recvbuf, "Iallreduce").view
        if not in_place(sendbuf):
            copy_into(recv, spec(sendbuf, "Iallreduce").view, "Iallreduce")
        return Request(C.all_reduce(self._g, recv, coll_op(op, "Iallreduce"), async_op=True))

    def Ibcast(self, buf: Any, root: int = 0) -> Request:
        b = spec(buf, "Ibcast", packs=True)
        work = C.broadcast(self._g, b.view, root, async_op=True)
        return Request(work, finish=b.done_with if b.typed and self._g.rank != root else None)

    def Ibarrier(self) -> Request:
        return Request(C.barrier(self._g, async_op=True))

    def Ireduce(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM, root: int = 0) -> Request:
        g = self._g
        recv = spec(recvbuf, "Ireduce").view if g.rank == root else None
        if recv is None:
            send = spec(sendbuf, "Ireduce").view
        else:
            send = recv
            if not in_place(sendbuf):
                copy_into(recv, spec(sendbuf, "Ireduce").view, "Ireduce")
        return Request(C.reduce(g, send, root, coll_op(op, "Ireduce"), async_op=True))

    def Igather(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Request:
        g = self._g
        send, recv = _gathering(g, sendbuf, recvbuf, "Igather", root)
        return Request(C.gather(g, send, root, async_op=True),
                       finish=lambda rows: _into(g, recv, rows, "Igather"))

    def Iscatter(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Request:
        g = self._g
        blocks = spec(sendbuf, "Iscatter", per=g.size, packs=True).view.reshape(g.size, -1) \
            if g.rank == root else None
        recv = None if in_place(recvbuf) else spec(recvbuf, "Iscatter", packs=True)
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
        send = recv.view.copy() if in_place(sendbuf) else \
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
        if in_place(recvbuf) and blocks is not None:
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
        send = recv.view.copy() if in_place(sendbuf) else \
            spec(sendbuf, "Alltoall", per=g.size, packs=True).view
        _into(g, recv, C.all_to_all(g, send.reshape(g.size, -1)), "Alltoall")

    def Gatherv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:
        g = self._g
        recv = vspec(recvbuf, "Gatherv", g.size, packs=True) if g.rank == root else None
        if in_place(sendbuf) and recv is not None:
            assert recv.counts is not None and recv.displs is not None
            d, k = recv.displs[root], recv.counts[root]
            send = recv.view[d:d + k].copy()
        else:
            send = spec(sendbuf, "Gatherv", packs=True).view
        counts = self._counts(len(send))
        if recv is None:
            C.gather_v(g, send, counts, root)
            return
        C.gather_v(g, send, counts, root, displs=recv.displs, out=recv.view)
        _matched(g, recv, counts, "Gatherv")
        recv.done()

    def Scatterv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:
        g = self._g
        send = vspec(sendbuf, "Scatterv", g.size, packs=True) if g.rank == root else None
        recv = None if in_place(recvbuf) else spec(recvbuf, "Scatterv", packs=True)
        if send is not None and recv is None:
            assert send.counts is not None
            mine = send.counts[root]
        else:
            mine = 0 if recv is None else len(recv.view)
        counts = self._counts(mine)
        got = C.scatter_v(g, None if send is None else send.view, counts, root,
                          dtype=None if recv is None else recv.view.dtype,
                          displs=None if send is None else send.displs)
        _into(g, recv, got, "Scatterv")
        if send is not None:
            _matched(g, send, counts, "Scatterv")

    def Allgatherv(self, sendbuf: Any, recvbuf: Any) -> None:
        g = self._g
        recv = vspec(recvbuf, "Allgatherv", g.size, packs=True)
        assert recv.counts is not None and recv.displs is not None
        if in_place(sendbuf):
            d, k = recv.displs[g.rank], recv.counts[g.rank]
            send = recv.view[d:d + k].copy()
        else:
            send = spec(sendbuf, "Allgatherv", packs=True).view
        C.all_gather_v(g, send, recv.counts, displs=recv.displs, out=recv.view)
        recv.done()

    def Alltoallv(self, sendbuf: Any, recvbuf: Any) -> None:
        g = self._g
        recv = vspec(recvbuf, "Alltoallv", g.size, packs=True)
        send = recv if in_place(sendbuf) else vspec(sendbuf, "Alltoallv", g.size, packs=True)
        flat = send.view.copy() if send is recv else send.view
        C.all_to_all_v(g, flat, send.counts, recv.counts, send_displs=send.displs,
                       recv_displs=recv.displs, out=recv.view)
        recv.done()

    def Reduce_scatter_block(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> None:
        g = self._g
        if in_place(sendbuf):
            whole = spec(recvbuf, "Reduce_scatter_block", per=g.size).view
            recv, send = whole[:len(whole) // g.size], whole.copy()
        else:
            recv = spec(recvbuf, "Reduce_scatter_block").view
            send = spec(sendbuf, "Reduce_scatter_block", per=g.size).view
        mine = C.reduce_scatter(g, send, coll_op(op, "Reduce_scatter_block"))
        copy_into(recv, mine, "Reduce_scatter_block")

    def Reduce_scatter(self, sendbuf: Any, recvbuf: Any, recvcounts: Any = None,
                       op: Op = _SUM) -> None:
        g = self._g
        if in_place(sendbuf):
            if recvcounts is None:
                raise ValueError("collectives.MPI Reduce_scatter: MPI.IN_PLACE needs "
                                 "recvcounts")
            whole = spec(recvbuf, "Reduce_scatter").view
            counts = [int(k) for k in recvcounts]
            recv, send = whole[:counts[g.rank]], whole.copy()[:sum(counts)]
        else:
            recv = spec(recvbuf, "Reduce_scatter").view
            send = spec(sendbuf, "Reduce_scatter").view
            counts = [int(k) for k in recvcounts] if recvcounts is not None \
                else self._counts(len(recv))
        mine = C.reduce_scatter_v(g, send, counts, coll_op(op, "Reduce_scatter"))
        copy_into(recv, mine, "Reduce_scatter")

    def Scan(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> None:
        recv = spec(recvbuf, "Scan").view
        send = recv if in_place(sendbuf) else spec(sendbuf, "Scan").view
        copy_into(recv, C.scan(self._g, send, coll_op(op, "Scan")), "Scan")

    def Exscan(self, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> None:
        """(rank 0's receive buffer is left as it was, as MPI leaves it)"""
        recv = spec(recvbuf, "Exscan").view
        send = recv.copy() if in_place(sendbuf) else spec(sendbuf, "Exscan").view
        got = C.exscan(self._g, send, coll_op(op, "Exscan"))
        if got is not None:
            copy_into(recv, got, "Exscan")
