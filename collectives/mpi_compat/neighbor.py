"""MPI-3's neighborhood collectives (mpi4py's Topocomm, the base of
Cartcomm, Graphcomm and Distgraphcomm: topo.py): each rank sends a block
to each of its out-neighbours and receives one from each of its
in-neighbours, in MPI's order (``_edges``), as one collective of the
communicator (its tag, deadline, abort on every member). Buffers as
mpi4py's: Neighbor_allgather and Neighbor_alltoall, their v-forms
(receives of predefined datatypes), Neighbor_alltoallw (``[buf, counts,
displs in bytes, datatypes]``, a datatype a neighbour, derived ones
packed and unpacked), each nonblocking (``Ineighbor_*``) and persistent
(MPI-4's ``Neighbor_*_init``: collectives.persistent's starts); lowercase
``neighbor_allgather``, ``neighbor_alltoall`` of objects.

Which message lands in which block: where two ranks are neighbours more
than once, the k-th message one sends the other (in its destination
order) is the k-th the other receives from it (in its source order), as
MPI's non-overtaking rule matches them; each message's fingerprint names
its k, so a count that differs fails instead of landing in the wrong
block (a Cartesian communicator labels them by direction: topo.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from mesh import Comm as MeshComm

from .. import persistent as P
from ..runner import Ctx, _name_the_call, start
from .buffers import _flat, _usable, in_place, spec, vspec
from .comm import Comm, Intracomm
from .datatypes import Selection
from .requests import Prequest, Request
from .tuples import unwrap, wrap
from .types import ERR_TRUNCATE, ERR_TYPE, PROC_NULL, Datatype, datatype_of
from .types import Exception as MPIException

__all__ = ["Topocomm", "Wblocks", "occurrences"]

Recv = tuple[int, dict]             # (source, the label its message carries)
Send = tuple[int, int, dict]        # (destination, block, label), in the order posted


def occurrences(ranks: Sequence[int]) -> list[int]:
    """For each entry of ``ranks``, how many entries before it name the
    same rank: [1, 2, 1, 1] gives [0, 0, 1, 2]."""
    seen: dict[int, int] = {}
    out = []
    for r in ranks:
        out.append(seen.get(r, 0))
        seen[r] = out[-1] + 1
    return out


@dataclass
class _Bufs:
    """A call's buffers: ``blocks``, what goes to each out-neighbour;
    ``outs``, where each in-neighbour's block lands (None: returned);
    ``place(got)``, after the receives (an alltoallw's blocks unpacked);
    ``refresh()``, at each persistent start (derived blocks packed again)."""

    blocks: list[Any]
    outs: list[Any] | None
    place: Callable[[list[Any]], None] | None = None
    refresh: Callable[[], None] | None = None


def _split(view: np.ndarray, n: int) -> list[np.ndarray]:
    return [] if n == 0 else list(view.reshape(n, -1))


class Topocomm(Intracomm):
    """mpi4py's Topocomm: a communicator with a topology (Cartcomm,
    Graphcomm, Distgraphcomm) and its neighborhood collectives."""

    def __init__(self, g: "MeshComm | Comm | None" = None) -> None:
        """(mpi4py's ``MPI.Topocomm()``: COMM_NULL's; ``MPI.Topocomm(comm)``
        of a communicator with no topology: TypeError)"""
        if type(self) is Topocomm and isinstance(g, Comm) and not isinstance(g, Topocomm):
            raise TypeError(f"collectives.MPI.Topocomm(): expecting a communicator with a "
                            f"topology, got {type(g).__name__}")
        super().__init__(g)

    def _edges(self) -> tuple[list[int], list[int]]:
        """(sources, destinations) in MPI's neighbour order."""
        raise NotImplementedError

    def _routes(self) -> tuple[list[Recv], list[Send]]:
        """The receives, one an in-neighbour in order, and the sends in the
        order posted, each message labelled by its k (see the module's
        docstring)."""
        srcs, dsts = self._edges()
        return ([(s, {"k": k}) for s, k in zip(srcs, occurrences(srcs))],
                [(d, j, {"k": k}) for j, (d, k) in enumerate(zip(dsts, occurrences(dsts)))])

    # -- mpi4py's Topocomm properties -----------------------------------------------------
    @property
    def degrees(self) -> tuple[int, int]:
        srcs, dsts = self._edges()
        return len(srcs), len(dsts)

    indegree = property(lambda self: self.degrees[0])
    outdegree = property(lambda self: self.degrees[1])
    inoutedges = property(lambda self: self._edges())
    inedges = property(lambda self: self._edges()[0])
    outedges = property(lambda self: self._edges()[1])

    # -- the exchange ----------------------------------------------------------------------
    def _neighbor(self, name: str, bufs: Callable[[], _Bufs], async_op: bool) -> Any:
        """Block j to out-neighbour j, in-neighbour i's block into
        ``outs[i]`` (or returned; a PROC_NULL's untouched, or None), as one
        collective: ``bufs()`` reads the buffers in its prepare, so that a
        rank's bad argument fails the call on every member."""
        fp = {"coll": name}

        def prepare(tuning: Any) -> tuple[dict, Callable[[Ctx], list[Any]]]:
            recvs, sends = self._routes()
            b = bufs()
            if len(b.blocks) != len(sends) or b.outs is not None and len(b.outs) != len(recvs):
                raise ValueError(f"rank {self._g.rank}: {name}: {len(b.blocks)} blocks to "
                                 f"send and {len(b.outs or recvs)} to receive, for "
                                 f"{len(sends)} destinations and {len(recvs)} sources")

            def body(ctx: Ctx) -> list[Any]:
                got = [None if src == PROC_NULL else
                       ctx.irecv(src, None if b.outs is None else b.outs[i], dict(fp, **at))
                       for i, (src, at) in enumerate(recvs)]
                sent = [ctx.isend(b.blocks[j], dst, dict(fp, **at))
                        for dst, j, at in sends if dst != PROC_NULL]
                values = [None if r is None else r.wait() for r in got]
                for s in sent:
                    s.wait()
                if b.place is not None:
                    b.place(values)
                return values
            return fp, body
        return start(self._g, name, prepare, async_op)

    def _bufs(self, kind: str, sendbuf: Any, recvbuf: Any, name: str) -> _Bufs:
        """The buffers of Neighbor_<kind> (allgather, alltoall, their v-forms,
        alltoallw) as ``name`` reads them."""
        nin, nout = self.degrees
        if kind == "alltoallw":
            return self._w(sendbuf, recvbuf, name, nin, nout)
        if kind.endswith("v"):
            r = vspec(recvbuf, name, nin)
            assert r.counts is not None and r.displs is not None
            outs = [r.view[d:d + k] for k, d in zip(r.counts, r.displs)]
            if kind == "allgatherv":
                return _Bufs([spec(sendbuf, name, packs=True).view] * nout, outs)
            s = vspec(sendbuf, name, nout, packs=True)
            assert s.counts is not None and s.displs is not None
            return _Bufs([s.view[d:d + k] for k, d in zip(s.counts, s.displs)], outs)
        outs = _split(spec(recvbuf, name, per=max(nin, 1)).view, nin)
        if kind == "allgather":
            return _Bufs([spec(sendbuf, name, packs=True).view] * nout, outs)
        return _Bufs(_split(spec(sendbuf, name, per=max(nout, 1), packs=True).view, nout), outs)

    def _w(self, sendbuf: Any, recvbuf: Any, name: str, nin: int, nout: int) -> _Bufs:
        """Neighbor_alltoallw's: a count, a byte displacement and a datatype
        a neighbour; a derived datatype's items packed (again at each
        persistent start) and unpacked into their places; a message must
        hold its receive block's bytes (a derived one's elements)."""
        sends = _wblocks(sendbuf, name, nout, "send")
        recvs = _wblocks(recvbuf, name, nin, "receive")
        srcs = self._edges()[0]
        me = self._g.rank

        def place(got: list[Any]) -> None:
            for i, (value, (sel, view)) in enumerate(zip(got, recvs)):
                if value is None:
                    continue
                a = np.ascontiguousarray(value).reshape(-1)
                where = f"rank {me}: collectives.MPI {name}: block {i}, from rank {srcs[i]}"
                if sel is not None and a.dtype != view.dtype:
                    raise MPIException(ERR_TYPE, f"{where}: the type signatures differ "
                                                 f"(MPI_ERR_TYPE): the message holds {a.size} "
                                                 f"x {a.dtype}, the datatype takes {view.dtype}")
                if a.nbytes != view.nbytes:
                    raise MPIException(ERR_TRUNCATE if a.nbytes > view.nbytes else ERR_TYPE,
                                       f"{where}: the message holds {a.nbytes} bytes, the "
                                       f"receive's count and datatype {view.nbytes}")
                if sel is not None:
                    sel.put(a)
                else:
                    view.view(np.uint8)[:] = a.view(np.uint8)

        def refresh() -> None:
            for sel, view in sends:
                if sel is not None:
                    view[...] = sel.get()
        return _Bufs([view for _, view in sends], None, place, refresh)

    # -- the calls -------------------------------------------------------------------------
    def _call(self, kind: str, sendbuf: Any, recvbuf: Any) -> None:
        name = f"Neighbor_{kind}"
        self._neighbor(name, lambda: self._bufs(kind, sendbuf, recvbuf, name), False)

    def _icall(self, kind: str, sendbuf: Any, recvbuf: Any) -> Request:
        name = f"Ineighbor_{kind}"
        return Request(self._neighbor(name, lambda: self._bufs(kind, sendbuf, recvbuf, name),
                                      True))

    def _init(self, kind: str, sendbuf: Any, recvbuf: Any) -> Prequest:
        """MPI-4's persistent form: the buffers read once, here (a bad one
        raises here), each start sending what they hold then."""
        name = f"Neighbor_{kind}_init"
        try:
            b = self._bufs(kind, sendbuf, recvbuf, name)
        except (ValueError, TypeError) as e:
            _name_the_call(e, self._g, name)
            raise

        def again() -> _Bufs:
            if b.refresh is not None:
                b.refresh()
            return b
        return Prequest(P._init(self._g, name, lambda: self._neighbor(name, again, True)))

    def Neighbor_allgather(self, sendbuf: Any, recvbuf: Any) -> None:
        """``sendbuf`` to every out-neighbour; ``recvbuf``'s block i from
        in-neighbour i (a PROC_NULL's untouched)."""
        self._call("allgather", sendbuf, recvbuf)

    def Neighbor_alltoall(self, sendbuf: Any, recvbuf: Any) -> None:
        """``sendbuf``'s block j to out-neighbour j, ``recvbuf``'s block i
        from in-neighbour i."""
        self._call("alltoall", sendbuf, recvbuf)

    def Neighbor_allgatherv(self, sendbuf: Any, recvbuf: Any) -> None:
        """As Neighbor_allgather, ``recvbuf`` ``[buf, counts, displs, type]``
        (a count and a displacement an in-neighbour)."""
        self._call("allgatherv", sendbuf, recvbuf)

    def Neighbor_alltoallv(self, sendbuf: Any, recvbuf: Any) -> None:
        self._call("alltoallv", sendbuf, recvbuf)

    def Neighbor_alltoallw(self, sendbuf: Any, recvbuf: Any) -> None:
        """``[buf, counts, displs, datatypes]`` each side (displacements in
        bytes; ``[buf, (counts, displs), datatypes]`` too), one entry a
        neighbour."""
        self._call("alltoallw", sendbuf, recvbuf)

    def Ineighbor_allgather(self, sendbuf: Any, recvbuf: Any) -> Request:
        return self._icall("allgather", sendbuf, recvbuf)

    def Ineighbor_alltoall(self, sendbuf: Any, recvbuf: Any) -> Request:
        return self._icall("alltoall", sendbuf, recvbuf)

    def Ineighbor_allgatherv(self, sendbuf: Any, recvbuf: Any) -> Request:
        return self._icall("allgatherv", sendbuf, recvbuf)

    def Ineighbor_alltoallv(self, sendbuf: Any, recvbuf: Any) -> Request:
        return self._icall("alltoallv", sendbuf, recvbuf)

    def Ineighbor_alltoallw(self, sendbuf: Any, recvbuf: Any) -> Request:
        return self._icall("alltoallw", sendbuf, recvbuf)

    def Neighbor_allgather_init(self, sendbuf: Any, recvbuf: Any, info: Any = None) -> Prequest:
        return self._init("allgather", sendbuf, recvbuf)

    def Neighbor_alltoall_init(self, sendbuf: Any, recvbuf: Any, info: Any = None) -> Prequest:
        return self._init("alltoall", sendbuf, recvbuf)

    def Neighbor_allgatherv_init(self, sendbuf: Any, recvbuf: Any,
                                 info: Any = None) -> Prequest:
        return self._init("allgatherv", sendbuf, recvbuf)

    def Neighbor_alltoallv_init(self, sendbuf: Any, recvbuf: Any,
                                info: Any = None) -> Prequest:
        return self._init("alltoallv", sendbuf, recvbuf)

    def Neighbor_alltoallw_init(self, sendbuf: Any, recvbuf: Any,
                                info: Any = None) -> Prequest:
        return self._init("alltoallw", sendbuf, recvbuf)

    def neighbor_allgather(self, sendobj: Any) -> list[Any]:
        """Each in-neighbour's object, in order (None for PROC_NULL)."""
        w = wrap(sendobj)
        got = self._neighbor("neighbor_allgather",
                             lambda: _Bufs([w] * self.outdegree, None), False)
        return [None if v is None else unwrap(v) for v in got]

    def neighbor_alltoall(self, sendobj: Sequence[Any]) -> list[Any]:
        """``sendobj[j]`` to out-neighbour j; what each in-neighbour sent."""
        def bufs() -> _Bufs:
            n = self.outdegree
            if sendobj is None or len(sendobj) != n:
                raise ValueError(f"rank {self._g.rank}: neighbor_alltoall: expecting {n} "
                                 f"objects (one an out-neighbour), got {sendobj!r:.60}")
            return _Bufs([wrap(o) for o in sendobj], None)
        got = self._neighbor("neighbor_alltoall", bufs, False)
        return [None if v is None else unwrap(v) for v in got]


def _wblocks(buf: Any, name: str, n: int, side: str,
             each: str = "neighbour") -> list[tuple[Selection | None, np.ndarray]]:
    """An alltoallw spec's blocks: for each neighbour (Alltoallw's: rank;
    ``each``) (a derived datatype's Selection or None, the block's
    elements: a view of the buffer for a predefined datatype, a packed copy
    for a derived one)."""
    if not isinstance(buf, (list, tuple)) or len(buf) not in (3, 4):
        raise TypeError(f"collectives.MPI {name}: the {side} buffer is [buf, counts, displs, "
                        f"datatypes] or [buf, (counts, displs), datatypes], got {buf!r:.60}")
    data, (counts, displs), types = (buf[0], buf[1], buf[2]) if len(buf) == 3 else \
        (buf[0], (buf[1], buf[2]), buf[3])
    try:
        counts, displs, types = list(counts), list(displs), list(types)
    except TypeError:
        raise TypeError(f"collectives.MPI {name}: the {side} buffer's counts, displacements "
                        f"and datatypes are sequences") from None
    if not len(counts) == len(displs) == len(types) == n:
        raise ValueError(f"collectives.MPI {name}: {len(counts)} counts, {len(displs)} "
                         f"displacements and {len(types)} datatypes to {side}, for {n} "
                         f"{each}s")
    raw = _flat(data, None, name).view(np.uint8) if n else np.empty(0, np.uint8)
    out: list[tuple[Selection | None, np.ndarray]] = []
    for k, d, t in zip(counts, displs, types):
        k, d = int(k), int(d)
        if isinstance(t, Datatype) and t.typemap is not None:
            sel = Selection(_usable(data, t, name, True)[0], t.dtype, raw, k, d, name)
            out.append((sel, sel.get() if side == "send" else np.empty(sel.n, t.dtype)))
            continue
        dt = datatype_of(t, name)
        if dt is None:
            raise TypeError(f"collectives.MPI {name}: the {side} buffer's datatypes: one "
                            f"a {each} (MPI.INT, a derived one...), got None")
        if k < 0 or d < 0 or d + k * dt.itemsize > len(raw):
            raise ValueError(f"collectives.MPI {name}: {k} x {dt} from byte {d} overrun a "
                             f"{side} buffer of {len(raw)} bytes")
        out.append((None, raw[d:d + k * dt.itemsize].view(dt)))
    return out


class Wblocks:
    """Alltoallw's buffers (``_wblocks``, a block a rank) as one exchange
    of bytes by all_to_all_v: ``flat`` the send blocks' bytes in rank order
    (``pack()`` again at each persistent start: MPI.IN_PLACE's are the
    receive blocks), ``sends`` and ``recvs`` each block's bytes,
    ``place(got)`` the received bytes into their blocks (a derived
    datatype's unpacked)."""

    def __init__(self, g: MeshComm, sendbuf: Any, recvbuf: Any, what: str,
                 n: int | None = None) -> None:
        """(``n``: the blocks each side, ``g.size`` unless given: an
        intercommunicator's remote group's size)"""
        n = g.size if n is None else n
        self._recv = _wblocks(recvbuf, what, n, "receive", "rank")
        own = in_place(sendbuf) or (sendbuf is None and n is None)    # (mpi4py's None)
        self._from = self._recv if own else \
            _wblocks(sendbuf, what, n, "send", "rank")
        self.sends = [v.nbytes for _, v in self._from]
        self.recvs = [v.nbytes for _, v in self._recv]
        self.flat = np.empty(sum(self.sends), np.uint8)
        self.pack()

    def pack(self) -> None:
        at = 0
        for sel, view in self._from:
            v = view if sel is None else sel.get()
            self.flat[at:at + v.nbytes] = np.ascontiguousarray(v).reshape(-1).view(np.uint8)
            at += v.nbytes

    def place(self, got: Any) -> None:
        raw = np.asarray(got).reshape(-1).view(np.uint8)
        at = 0
        for (sel, view), k in zip(self._recv, self.recvs):
            block = raw[at:at + k]
            at += k
            if sel is not None:
                sel.put(block.view(view.dtype))
            else:
                view.reshape(-1).view(np.uint8)[:] = block
