"""mpi4py's persistent collectives of uneven blocks (MPI-4's
Allgatherv_init, Alltoallv_init, Gatherv_init, Scatterv_init,
Reduce_scatter_init) over collectives.persistent's ``*_v_init``: the
buffer specs read once, at the init, as views of the caller's memory (the
counts that MPI gives the root alone exchanged there, by the one small
all_gather the blocking v-calls make each call), each ``Start`` then
reading the send buffer as it is (``MPI.IN_PLACE``'s block copied out
first, as coll.py's even ``*_init`` do) and the result written into the
receive buffer, the gaps between its blocks kept."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .. import persistent as P
from .buffers import Buf, in_place, spec, vspec
from .coll import Collectives, _copying, _persistent_op
from .requests import Prequest
from .types import OPS, Op

__all__ = ["UnevenInits"]

_SUM = OPS["SUM"]


def _own(recv: Buf, rank: int, what: str) -> tuple[np.ndarray, Callable[[], None]]:
    """MPI.IN_PLACE's send block: rank ``rank``'s block of ``recv``, copied
    out at each start."""
    assert recv.counts is not None and recv.displs is not None
    d, k = recv.displs[rank], recv.counts[rank]
    send = np.empty(k, recv.flat.dtype)
    before = _copying(send, recv.flat[d:d + k], what)
    assert before is not None
    return send, before


class UnevenInits(Collectives):
    """The uneven persistent collectives of collectives.MPI's Comm (``info``
    taken and not used, as the even ones')."""

    def Allgatherv_init(self, sendbuf: Any, recvbuf: Any, info: Any = None) -> Prequest:
        g, what = self._g, "Allgatherv_init"
        recv = vspec(recvbuf, what, g.size)
        if in_place(sendbuf):
            send, before = _own(recv, g.rank, what)
        else:
            send, before = spec(sendbuf, what).view, None
        return Prequest(P.all_gather_v_init(g, send, recv.counts, out=recv.flat,
                                            displs=recv.displs), before=before)

    def Alltoallv_init(self, sendbuf: Any, recvbuf: Any, info: Any = None) -> Prequest:
        """With IN_PLACE the blocks sent are the receive buffer's, as its
        counts and displacements place them (copied out at each start)."""
        g, what = self._g, "Alltoallv_init"
        recv = vspec(recvbuf, what, g.size)
        before = None
        if in_place(sendbuf):
            flat = np.empty_like(recv.flat)
            before = _copying(flat, recv.flat, what)
            send = Buf(flat, flat, recv.counts, recv.displs)
        else:
            send = vspec(sendbuf, what, g.size)
        req = P.all_to_all_v_init(g, send.flat, send.counts, recv.counts, out=recv.flat,
                                  send_displs=send.displs, recv_displs=recv.displs)
        return Prequest(req, before=before)

    def Gatherv_init(self, sendbuf: Any, recvbuf: Any, root: int = 0,
                     info: Any = None) -> Prequest:
        """The counts, the root's, go to every rank at the init (one small
        all_gather: the init is collective, as MPI's)."""
        g, what = self._g, "Gatherv_init"
        recv = vspec(recvbuf, what, g.size) if g.rank == root else None
        before = None
        if in_place(sendbuf) and recv is not None:
            send, before = _own(recv, root, what)
        else:
            send = spec(sendbuf, what).view
        counts = self._counts(len(send))
        if recv is None:
            return Prequest(P.gather_v_init(g, send, counts, root))
        return Prequest(P.gather_v_init(g, send, counts, root, out=recv.flat,
                                        displs=recv.displs), before=before)

    def Scatterv_init(self, sendbuf: Any, recvbuf: Any, root: int = 0,
                      info: Any = None) -> Prequest:
        """The counts as Gatherv_init's; with IN_PLACE the root's block
        stays where it is."""
        g, what = self._g, "Scatterv_init"
        send = vspec(sendbuf, what, g.size) if g.rank == root else None
        recv = None if in_place(recvbuf) and send is not None else spec(recvbuf, what).view
        if recv is None:
            assert send is not None and send.counts is not None
            mine = send.counts[root]
        else:
            mine = len(recv)
        counts = self._counts(mine)
        req = P.scatter_v_init(g, None if send is None else send.flat, counts, root, out=recv,
                               displs=None if send is None else send.displs,
                               dtype=None if recv is None else recv.dtype)
        return Prequest(req)

    def Reduce_scatter_init(self, sendbuf: Any, recvbuf: Any, recvcounts: Any = None,
                            op: Op = _SUM, info: Any = None) -> Prequest:
        """``recvcounts`` None: each rank's receive count, exchanged at the
        init. With IN_PLACE the input is ``recvbuf``'s first sum(counts)
        elements, the result its first block (MPI's)."""
        g, what = self._g, "Reduce_scatter_init"
        before = None
        if in_place(sendbuf):
            if recvcounts is None:
                raise ValueError(f"collectives.MPI {what}: MPI.IN_PLACE needs recvcounts")
            whole = spec(recvbuf, what).view
            counts = [int(k) for k in recvcounts]
            send = np.empty(sum(counts), whole.dtype)
            before = _copying(send, whole[:sum(counts)], what)
            out = whole[:counts[g.rank]]
        else:
            out = spec(recvbuf, what).view
            send = spec(sendbuf, what).view
            counts = [int(k) for k in recvcounts] if recvcounts is not None \
                else self._counts(len(out))
        req = P.reduce_scatter_v_init(g, send, counts, _persistent_op(op, what), out=out)
        return Prequest(req, before=before)
