"""mpi4py's communicators over meshrun's: Comm (and Intracomm, the same)
wraps a MeshComm, Cartcomm a mesh.Grid over one; Split, Dup, Create_cart,
Sub and the rest map onto Comm.split, Comm.dup, mesh.grid and Comm.group,
Get_group's Group (group.py) onto the communicator's world ranks, Create
onto Comm.split and Create_group onto Comm.group.
What meshrun does not provide raises NotImplementedError naming the call
and what to use instead."""
from __future__ import annotations

import math
import os
import sys
from typing import Any, Sequence

import mesh
from mesh import Comm as MeshComm

from ..runner import Ctx, start
from .buffers import spec, vspec
from .group import Group, comm_ranks
from .objects import ObjectCollectives
from .p2p import PointToPoint
from .requests import Request
from .tuples import unwrap, wrap
from .types import CART, CONGRUENT, IDENT, PROC_NULL, SIMILAR, TAG_UB, UNDEFINED, UNEQUAL
from .vinit import UnevenInits

__all__ = ["Comm", "Intracomm", "Cartcomm", "COMM_NULL", "COMM_TYPE_SHARED", "not_provided"]

COMM_TYPE_SHARED = 0       # (Open MPI's)

_PERSISTENT = ("Alltoallw_init",)

_NONBLOCKING = ("Igatherv", "Iscatterv", "Iallgatherv", "Ialltoallv", "Ialltoallw",
                "Ireduce_scatter", "Ireduce_scatter_block", "Iscan", "Iexscan")


def not_provided(name: str) -> NotImplementedError:
    """The error for an mpi4py call collectives.MPI does not provide."""
    if name in _PERSISTENT:
        why = ("no w-forms (a datatype a rank): Alltoallv_init with one datatype "
               "(README)")
    elif name in _NONBLOCKING:
        why = (f"of the nonblocking collectives Iallreduce, Ibcast, Ibarrier, Ireduce, "
               f"Igather, Iscatter, Iallgather and Ialltoall are provided: call {name[1:]} "
               f"(blocking), or run it in a thread")
    elif name in ("Spawn", "Spawn_multiple", "Accept", "Connect", "Create_intercomm",
                  "Merge", "Get_parent", "Join"):
        why = ("no intercommunicators and no processes joining a running mesh: "
               "mesh.spawn(fn, n) runs a function in n new processes of their own mesh")
    elif "eighbor_" in name:
        why = ("the neighborhood collectives are provided on a Cartesian communicator "
               "(Create_cart) alone, and of them Neighbor_allgather, Neighbor_alltoall, "
               "their v-, lowercase and nonblocking forms: else, for each dimension d, src, dst "
               "= cart.Shift(d, 1), then a Sendrecv to dst from src and one to src from dst")
    elif name in ("Create_graph", "Create_dist_graph", "Create_dist_graph_adjacent"):
        why = "graph topologies are not provided: use Create_cart, or point-to-point"
    else:
        why = "not provided (README, \"Coming from mpi4py\", lists what is)"
    return NotImplementedError(f"collectives.MPI: {name}: {why}")


class Comm(PointToPoint, UnevenInits, ObjectCollectives):
    """mpi4py's Comm over a meshrun communicator (``comm.mesh``: it, for
    meshrun's own calls); COMM_NULL's is None."""

    def __new__(cls, *args: Any, **kw: Any) -> "Comm":
        """(as mpi4py's, taking the communicator: a subclass's ``__new__``
        calls ``super().__new__(cls, comm)``, mpi4py's demo/reductions)"""
        return super().__new__(cls)

    def __init__(self, g: "MeshComm | Comm | None" = None) -> None:
        """``g`` a meshrun communicator, or a Comm (mpi4py's
        ``MPI.Intracomm(comm)``: another handle of its communicator)."""
        of = g if isinstance(g, Comm) else None
        g = of._g if of is not None else g
        self._g = g         # type: ignore[assignment]
        self._posted = 0
        self._name: str = of.Get_name() if of is not None else \
            "MPI_COMM_WORLD" if g is not None and g is mesh.world.current() else ""

    @property
    def mesh(self) -> MeshComm:
        return self._g

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Comm):
            return self._g is other._g
        return NotImplemented

    __hash__ = object.__hash__

    def __bool__(self) -> bool:
        return self._g is not None

    def __repr__(self) -> str:
        return "MPI.COMM_NULL" if self._g is None else f"<MPI.{type(self).__name__} " \
               f"rank {self._g.rank} of {self._g.size}>"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name[:1].islower() and not name.startswith("neighbor_"):
            raise AttributeError(f"collectives.MPI.Comm has no attribute {name!r}")
        raise not_provided(name)

    def Get_rank(self) -> int:
        return self._g.rank

    def Get_size(self) -> int:
        return self._g.size

    rank = property(Get_rank)
    size = property(Get_size)

    def Get_name(self) -> str:
        return self._name

    def Set_name(self, name: str) -> None:
        self._name = str(name)

    name = property(Get_name)

    def Is_inter(self) -> bool:
        return False

    def Is_intra(self) -> bool:
        return True

    is_inter = property(Is_inter)
    is_intra = property(Is_intra)

    def Get_topology(self) -> int:
        return UNDEFINED

    topology = property(Get_topology)

    def Compare(self, other: "Comm") -> int:
        """MPI.IDENT: the same communicator; MPI.CONGRUENT: the same
        processes in the same order (a Dup); MPI.SIMILAR: in another order;
        else MPI.UNEQUAL."""
        if self._g is other._g:
            return IDENT
        a, b = self._g.ranks, other._g.ranks
        return CONGRUENT if a == b else SIMILAR if sorted(a) == sorted(b) else UNEQUAL

    def Get_group(self) -> Group:
        """The communicator's processes (their world ranks), in its order."""
        if self._g is None:
            raise ValueError("collectives.MPI Get_group: MPI.COMM_NULL has no group")
        return Group(members=self._g.ranks, me=self._g.ranks[self._g.rank])

    group = property(Get_group)

    def Create(self, group: Group) -> "Comm":
        """MPI_Comm_create, collective over this communicator (every rank
        calls it, as its other collectives): a communicator of ``group``'s
        processes in its order, COMM_NULL on the others. It is ``Split``,
        the color the group's first process, the key the rank in it (so
        that ranks passing disjoint groups each get their own, as MPI
        allows)."""
        mine = comm_ranks(group, self._g.ranks, "Create", self._g.ranks[self._g.rank])
        at = group.Get_rank()
        sub = self._g.split(None if at == UNDEFINED else mine[0], at)
        return COMM_NULL if sub is None else Intracomm(sub)

    def Create_group(self, group: Group, tag: int = 0) -> "Comm":
        """MPI_Comm_create_group, collective over ``group``'s processes alone
        (no message: meshrun's ``Comm.group``, whose members make groups of
        the same ranks in the same order): a communicator of them in the
        group's order; COMM_NULL on a process not in it. ``tag`` is taken
        and not used: Create_group calls of one group from several threads
        must come in the same order on every member."""
        mine = comm_ranks(group, self._g.ranks, "Create_group", self._g.ranks[self._g.rank])
        if group.Get_rank() == UNDEFINED:
            return COMM_NULL
        sub = self._g.group(mine)
        assert sub is not None
        return Intracomm(sub)

    def Dup(self) -> "Comm":
        return self._like(self._g.dup())

    Clone = Dup

    def _like(self, g: MeshComm) -> "Comm":
        return Intracomm(g)

    def Free(self) -> None:
        """(nothing to free: drop it; COMM_NULL's and the world's stay)"""

    def Disconnect(self) -> None:
        pass

    def Split(self, color: int = 0, key: int = 0) -> "Comm":
        c = None if color is None or color == UNDEFINED or color < 0 else int(color)
        sub = self._g.split(c, int(key))
        return COMM_NULL if sub is None else Intracomm(sub)

    def Split_type(self, split_type: int, key: int = 0, info: Any = None) -> "Comm":
        if split_type == UNDEFINED:
            return self.Split(UNDEFINED, key)
        if split_type != COMM_TYPE_SHARED:
            raise not_provided(f"Split_type({split_type})")
        return Intracomm(self._g.split_host(int(key)))

    def Create_cart(self, dims: Sequence[int], periods: Sequence[bool] | None = None,
                    reorder: bool = False) -> "Comm":
        """A Cartcomm over the first prod(dims) ranks (row-major, as MPI's
        without reorder); COMM_NULL on the others."""
        dims = [int(d) for d in dims]
        n = math.prod(dims)
        if n > self._g.size:
            raise ValueError(f"rank {self._g.rank}: Create_cart: dims {dims} need {n} ranks, "
                             f"the communicator has {self._g.size}")
        sub = self._g if n == self._g.size else self._g.group(list(range(n)))
        if sub is None:
            return COMM_NULL
        per = [bool(p) for p in (periods if periods is not None else [False] * len(dims))]
        return Cartcomm(sub, dims, per)

    def Abort(self, errorcode: int = 0) -> None:
        """MPI_Abort: this process ends at once with ``errorcode``; meshrun
        then stops every rank and reports it."""
        print(f"collectives.MPI: rank {self._g.rank} called Abort({errorcode})",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(int(errorcode) or 1)

    def Get_attr(self, keyval: int) -> Any:
        """MPI.TAG_UB's: the largest tag (meshrun's, 2**63 - 1); None else."""
        return 2 ** 63 - 1 if keyval == TAG_UB else None

    def Set_errhandler(self, errhandler: Any) -> None:
        pass

    def Get_errhandler(self) -> Any:
        return None

    def Call_errhandler(self, errorcode: int) -> None:
        pass


class Intracomm(Comm):
    """mpi4py's Intracomm (every communicator here is one)."""


class Cartcomm(Intracomm):
    """mpi4py's Cartcomm: a mesh.Grid with axes d0, d1... over the
    communicator (row-major), periodicity kept per dimension for Shift and
    Get_cart_rank."""

    dims: list[int]
    periods: list[int]      # (1 or 0, as mpi4py's Get_topo gives them)
    _grid: mesh.Grid

    def __init__(self, g: "MeshComm | Comm", dims: list[int] | None = None,
                 periods: Sequence[Any] | None = None) -> None:
        """``g`` a meshrun communicator with its ``dims`` and ``periods``, or
        a Cartcomm (mpi4py's ``MPI.Cartcomm(cart)``: another handle of it)."""
        grid = None
        if isinstance(g, Comm) and dims is None:
            if not isinstance(g, Cartcomm):
                raise TypeError(f"collectives.MPI Cartcomm: expecting a Cartesian "
                                f"communicator, got {type(g).__name__}")
            dims, periods, grid = g.dims, g.periods, g._grid
        if dims is None or periods is None:
            raise TypeError("collectives.MPI Cartcomm: takes a Cartcomm (MPI.Cartcomm(cart)); "
                            "make one with comm.Create_cart(dims, periods)")
        super().__init__(g)
        self.dims, self.periods = list(dims), [int(bool(p)) for p in periods]
        self._grid = grid or mesh.grid(self._g, **{f"d{i}": d for i, d in enumerate(dims)})

    def _like(self, g: MeshComm) -> "Comm":
        return Cartcomm(g, self.dims, self.periods)

    def Get_topology(self) -> int:
        return CART

    topology = property(Get_topology)

    def Get_dim(self) -> int:
        return len(self.dims)

    ndim = property(Get_dim)

    def Get_coords(self, rank: int) -> list[int]:
        return list(self._grid.coords(rank).values())

    @property
    def coords(self) -> list[int]:
        return self.Get_coords(self._g.rank)

    def Get_topo(self) -> tuple[list[int], list[int], list[int]]:
        return list(self.dims), list(self.periods), self.coords

    topo = property(Get_topo)

    def Get_cart_rank(self, coords: Sequence[int]) -> int:
        at = {}
        for i, (c, d, p) in enumerate(zip(coords, self.dims, self.periods)):
            at[f"d{i}"] = int(c) % d if p else int(c)
        return self._grid.rank_of(**at)

    def Shift(self, direction: int, disp: int) -> tuple[int, int]:
        return self._grid.shift(f"d{direction}", disp,
                                periodic=bool(self.periods[direction]))

    def Sub(self, remain_dims: Sequence[bool]) -> "Cartcomm":
        """The ranks that share this rank's coordinates along the dimensions
        dropped, ranked along those kept (every rank makes every such
        communicator, in the same order, as mesh.grid does)."""
        keep = [bool(k) for k in remain_dims]
        lines: dict[tuple[int, ...], list[int]] = {}
        for r in range(self._g.size):
            c = self.Get_coords(r)
            lines.setdefault(tuple(v for v, k in zip(c, keep) if not k), []).append(r)
        mine = None
        for line in lines.values():
            g = self._g.group(line)
            if g is not None:
                mine = g
        assert mine is not None
        return Cartcomm(mine, [d for d, k in zip(self.dims, keep) if k] or [1],
                        [p for p, k in zip(self.periods, keep) if k] or [0])

    # -- MPI-3's neighborhood collectives -------------------------------------------------
    def _neighbors(self) -> list[int]:
        """MPI's neighbour order on a Cartesian communicator: for each
        dimension, Shift(d, 1)'s source, then its destination."""
        return [r for d in range(len(self.dims)) for r in self.Shift(d, 1)]

    def _neighbor(self, name: str, blocks: list[Any], outs: list[Any] | None,
                  async_op: bool) -> Any:
        """Block i to neighbour i, and neighbour i's block for this rank
        received (into ``outs[i]``, or returned; a PROC_NULL's untouched or
        None), as one collective of the communicator (its tag, deadline,
        abort on every member). What goes to the destination of dimension
        d arrives as the receiver's source block, and the other way round.
        Where one rank is a neighbour twice (a periodic dimension of 1 or
        2), both messages come on the call's tag, so each rank sends in the
        order its peers post: for each d, the destination's block first,
        receives in neighbour order (meshrun matches messages of one sender
        and tag in order, as MPI); each message's fingerprint names its
        direction, so a mismatch fails instead of landing in the wrong block."""
        nbrs = self._neighbors()
        fp = {"coll": name, "ndims": len(nbrs) // 2}

        def body(ctx: Ctx) -> list[Any]:
            recvs = [None if src == PROC_NULL else
                     ctx.irecv(src, None if outs is None else outs[i], dict(fp, dir=i))
                     for i, src in enumerate(nbrs)]
            sends = [ctx.isend(blocks[i ^ 1], nbrs[i ^ 1], dict(fp, dir=i))
                     for i in range(len(nbrs)) if nbrs[i ^ 1] != PROC_NULL]
            got = [None if r is None else r.wait() for r in recvs]
            for s in sends:
                s.wait()
            return got
        return start(self._g, name, lambda tuning: (fp, body), async_op)

    def _neighbor_bufs(self, sendbuf: Any, recvbuf: Any, name: str,
                       all_to_all: bool) -> tuple[list[Any], list[Any]]:
        """The blocks to send and the receive buffer's blocks, a neighbour
        each; a v-call's (its name ending in v) where its counts and
        displacements put them (receives of predefined datatypes only)."""
        n = 2 * len(self.dims)
        if name.endswith("v"):
            r = vspec(recvbuf, name, n)
            assert r.counts is not None and r.displs is not None
            outs = [r.view[d:d + k] for k, d in zip(r.counts, r.displs)]
            if not all_to_all:
                return [spec(sendbuf, name, packs=True).view] * n, outs
            s = vspec(sendbuf, name, n, packs=True)
            assert s.counts is not None and s.displs is not None
            return [s.view[d:d + k] for k, d in zip(s.counts, s.displs)], outs
        recv = spec(recvbuf, name, per=n).view.reshape(n, -1)
        if all_to_all:
            sends = list(spec(sendbuf, name, per=n, packs=True).view.reshape(n, -1))
        else:
            sends = [spec(sendbuf, name, packs=True).view] * n
        return sends, list(recv)

    def Neighbor_allgather(self, sendbuf: Any, recvbuf: Any) -> None:
        """``sendbuf`` to every neighbour; ``recvbuf``'s block i from
        neighbour i (MPI's order, see _neighbors; PROC_NULL's untouched)."""
        self._neighbor("Neighbor_allgather",
                       *self._neighbor_bufs(sendbuf, recvbuf, "Neighbor_allgather", False),
                       False)

    def Neighbor_alltoall(self, sendbuf: Any, recvbuf: Any) -> None:
        """``sendbuf``'s block i to neighbour i, ``recvbuf``'s block i from it."""
        self._neighbor("Neighbor_alltoall",
                       *self._neighbor_bufs(sendbuf, recvbuf, "Neighbor_alltoall", True), False)

    def Neighbor_allgatherv(self, sendbuf: Any, recvbuf: Any) -> None:
        """As Neighbor_allgather, ``recvbuf`` ``[buf, counts, displs, type]``
        (a count and a displacement a neighbour)."""
        self._neighbor("Neighbor_allgatherv",
                       *self._neighbor_bufs(sendbuf, recvbuf, "Neighbor_allgatherv", False),
                       False)

    def Neighbor_alltoallv(self, sendbuf: Any, recvbuf: Any) -> None:
        self._neighbor("Neighbor_alltoallv",
                       *self._neighbor_bufs(sendbuf, recvbuf, "Neighbor_alltoallv", True),
                       False)

    def Ineighbor_allgather(self, sendbuf: Any, recvbuf: Any) -> Request:
        return Request(self._neighbor(
            "Ineighbor_allgather",
            *self._neighbor_bufs(sendbuf, recvbuf, "Ineighbor_allgather", False), True))

    def Ineighbor_alltoall(self, sendbuf: Any, recvbuf: Any) -> Request:
        return Request(self._neighbor(
            "Ineighbor_alltoall",
            *self._neighbor_bufs(sendbuf, recvbuf, "Ineighbor_alltoall", True), True))

    def Ineighbor_allgatherv(self, sendbuf: Any, recvbuf: Any) -> Request:
        return Request(self._neighbor(
            "Ineighbor_allgatherv",
            *self._neighbor_bufs(sendbuf, recvbuf, "Ineighbor_allgatherv", False), True))

    def Ineighbor_alltoallv(self, sendbuf: Any, recvbuf: Any) -> Request:
        return Request(self._neighbor(
            "Ineighbor_alltoallv",
            *self._neighbor_bufs(sendbuf, recvbuf, "Ineighbor_alltoallv", True), True))

    def neighbor_allgather(self, sendobj: Any) -> list[Any]:
        """Each neighbour's object, in MPI's neighbour order (None for PROC_NULL)."""
        w = wrap(sendobj)
        got = self._neighbor("neighbor_allgather", [w] * (2 * len(self.dims)), None, False)
        return [None if v is None else unwrap(v) for v in got]

    def neighbor_alltoall(self, sendobj: Sequence[Any]) -> list[Any]:
        """``sendobj[i]`` to neighbour i; what each neighbour sent this rank."""
        n = 2 * len(self.dims)
        if sendobj is None or len(sendobj) != n:
            raise ValueError(f"rank {self._g.rank}: neighbor_alltoall: expecting {n} objects "
                             f"(two a dimension), got {sendobj!r:.60}")
        got = self._neighbor("neighbor_alltoall", [wrap(o) for o in sendobj], None, False)
        return [None if v is None else unwrap(v) for v in got]


COMM_NULL = Comm(None)
