"""mpi4py's persistent collectives of uneven blocks (MPI-4's
Allgatherv_init, Alltoallv_init, Gatherv_init, Scatterv_init,
Reduce_scatter_init) over collectives.persistent's ``*_v_init``: the
buffer specs read once, at the init, as views of the caller's memory (the
counts that MPI gives the root alone exchanged there, by the one small
all_gather the blocking v-calls make each call), each ``Start`` then
reading the send buffer as it is (``MPI.IN_PLACE``'s block copied out
first, as coll.py's even ``*_init`` do) and the result written into the
receive buffer, the gaps between its blocks kept. A derived datatype's
elements are packed at each start and unpacked at each wait, its counts
in items and its displacements in extents, as the blocking v-calls'."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .. import persistent as P
from .buffers import Buf, own_block, spec, vspec
from .coll import Collectives, _copying, _matched, _persistent_op, _steps, packing, unpacking
from .requests import Prequest
from .types import OPS, Op

__all__ = ["UnevenInits"]

_SUM = OPS["SUM"]


def _own(recv: Buf, rank: int, what: str) -> tuple[np.ndarray, Callable[[], None]]:
    """MPI.IN_PLACE's send block: rank ``rank``'s block of ``recv``, copied
    out at each start (a derived datatype's elements packed first)."""
    assert recv.counts is not None and recv.displs is not None
    d, k = recv.displs[rank], recv.counts[rank]
    send = np.empty(k, recv.view.dtype)
    before = _steps(packing(recv), _copying(send, recv.view[d:d + k], what))
    assert before is not None
    return send, before


class UnevenInits(Collectives):
    """The uneven persistent collectives of collectives.MPI's Comm (``info``
    taken and not used, as the even ones')."""

    def Allgatherv_init(self, sendbuf: Any, recvbuf: Any, info: Any = None) -> Prequest:
        g, what = self._g, "Allgatherv_init"
        recv = vspec(recvbuf, what, g.size, packs=True)
        before: Callable[[], None] | None
        if own_block(sendbuf):
            send, before = _own(recv, g.rank, what)
        else:
            sent = spec(sendbuf, what, packs=True)
            send, before = sent.view, packing(sent)
        return Prequest(P.all_gather_v_init(g, send, recv.counts, out=recv.view,
                                            displs=recv.displs), before=before,
                        finish=unpacking(recv))

    def Alltoallv_init(self, sendbuf: Any, recvbuf: Any, info: Any = None) -> Prequest:
        """With IN_PLACE the blocks sent are the receive buffer's, as its
        counts and displacements place them (copied out at each start)."""
        g, what = self._g, "Alltoallv_init"
        recv = vspec(recvbuf, what, g.size, packs=True)
        if own_block(sendbuf):
            flat = np.empty_like(recv.view)
            before = _steps(packing(recv), _copying(flat, recv.view, what))
            send = Buf(flat, flat, recv.counts, recv.displs)
        else:
            send = vspec(sendbuf, what, g.size, packs=True)
            before = packing(send)
        req = P.all_to_all_v_init(g, send.view, send.counts, recv.counts, out=recv.view,
                                  send_displs=send.displs, recv_displs=recv.displs)
        return Prequest(req, before=before, finish=unpacking(recv))

    def Gatherv_init(self, sendbuf: Any, recvbuf: Any, root: int = 0,
                     info: Any = None) -> Prequest:
        """The counts, the root's, go to every rank at the init (one small
        all_gather: the init is collective, as MPI's); a derived datatype's
        blocks are checked against them there."""
        g, what = self._g, "Gatherv_init"
        recv = vspec(recvbuf, what, g.size, packs=True) if g.rank == root else None
        before: Callable[[], None] | None
        if own_block(sendbuf) and recv is not None:
            send, before = _own(recv, root, what)
        else:
            sent = spec(sendbuf, what, packs=True)
            send, before = sent.view, packing(sent)
        counts = self._counts(len(send))
        if recv is None:
            return Prequest(P.gather_v_init(g, send, counts, root), before=before)
        _matched(g, recv, counts, what)
        return Prequest(P.gather_v_init(g, send, counts, root, out=recv.view,
                                        displs=recv.displs), before=before,
                        finish=unpacking(recv))

    def Scatterv_init(self, sendbuf: Any, recvbuf: Any, root: int = 0,
                      info: Any = None) -> Prequest:
        """The counts as Gatherv_init's; with IN_PLACE the root's block
        stays where it is."""
        g, what = self._g, "Scatterv_init"
        send = vspec(sendbuf, what, g.size, packs=True) if g.rank == root else None
        recv = None if own_block(recvbuf) and send is not None else \
            spec(recvbuf, what, packs=True)
        if recv is None:
            assert send is not None and send.counts is not None
            mine = send.counts[root]
        else:
            mine = len(recv.view)
        counts = self._counts(mine)
        if send is not None:
            _matched(g, send, counts, what)
        out = None if recv is None else recv.view
        req = P.scatter_v_init(g, None if send is None else send.view, counts, root, out=out,
                               displs=None if send is None else send.displs,
                               dtype=None if out is None else out.dtype)
        return Prequest(req, before=packing(send), finish=unpacking(recv))

    def Reduce_scatter_init(self, sendbuf: Any, recvbuf: Any, recvcounts: Any = None,
                            op: Op = _SUM, info: Any = None) -> Prequest:
        """``recvcounts`` None: each rank's receive count, exchanged at the
        init (a derived datatype's: in its items). With IN_PLACE the input is
        ``recvbuf``'s first sum(counts) elements, the result its first block
        (MPI's)."""
        g, what = self._g, "Reduce_scatter_init"
        recv = spec(recvbuf, what, packs=True)
        dt = recv.datatype
        per = dt.typemap.n if dt is not None and dt.typemap is not None else 1
        sent = None
        if own_block(sendbuf):
            if recvcounts is None:
                raise ValueError(f"collectives.MPI {what}: MPI.IN_PLACE needs recvcounts")
            counts = [int(k) * per for k in recvcounts]
            send = np.empty(sum(counts), recv.view.dtype)
            before = _steps(packing(recv), _copying(send, recv.view[:sum(counts)], what))
            out = recv.view[:counts[g.rank]]
        else:
            out = recv.view
            sent = spec(sendbuf, what, packs=True)
            send, before = sent.view, packing(sent)
            counts = [int(k) * per for k in recvcounts] if recvcounts is not None \
                else self._counts(len(out))
        req = P.reduce_scatter_v_init(g, send, counts, _persistent_op(op, what, recv, sent),
                                      out=out)
        return Prequest(req, before=before, finish=unpacking(recv))
