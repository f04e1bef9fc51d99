"""mpi4py's communicators over meshrun's: Comm (and Intracomm, the same)
wraps a MeshComm (the topologies, Cartcomm, Graphcomm and Distgraphcomm:
topo.py); Split, Dup, Create_cart and the rest map onto Comm.split,
Comm.dup, mesh.grid and Comm.group,
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

from .group import Group, comm_ranks
from .objects import ObjectCollectives
from .p2p import PointToPoint
from .types import CONGRUENT, IDENT, SIMILAR, TAG_UB, UNDEFINED, UNEQUAL
from .vinit import UnevenInits

__all__ = ["Comm", "Intracomm", "COMM_NULL", "COMM_TYPE_SHARED", "not_provided"]

COMM_TYPE_SHARED = 0       # (Open MPI's)

def not_provided(name: str) -> NotImplementedError:
    """The error for an mpi4py call collectives.MPI does not provide."""
    if name in ("Join", "Publish_name", "Lookup_name", "Unpublish_name"):
        why = ("no sockets of the caller's joined, no name service: two running jobs join "
               "by Open_port, Accept and Connect (the port's name passed by hand); new "
               "processes: Spawn, or mesh.spawn(fn, n)")
    elif "eighbor_" in name:
        why = ("the neighborhood collectives are those of a communicator with a topology: "
               "make one with Create_cart, Create_graph, Create_dist_graph_adjacent or "
               "Create_dist_graph")
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
    is_topo = property(lambda self: self.Get_topology() != UNDEFINED)

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

    def Spawn(self, command: str, args: Sequence[str] | None = None, maxprocs: int = 1,
              info: Any = None, root: int = 0, errcodes: list[int] | None = None) -> "Comm":
        """MPI_Comm_spawn, collective over this communicator: ``maxprocs``
        processes of ``command`` (``args`` after it) on the root's host, and
        the Intercomm to them (spawn.py; ``info``: MPI.INFO_NULL, or a
        mapping of "wdir" alone; ``errcodes``: filled with 0s)."""
        from .spawn import spawn
        return spawn(self, command, args, maxprocs, info, root, errcodes)

    def Spawn_multiple(self, command: Sequence[str], args: Sequence[Sequence[str]] | None = None,
                       maxprocs: Sequence[int] | None = None, info: Any = None, root: int = 0,
                       errcodes: list[int] | None = None) -> "Comm":
        """MPI_Comm_spawn_multiple: Spawn of several commands, one item of
        each list a command (its children in that order), one bridge."""
        from .spawn import spawn
        return spawn(self, command, args, maxprocs, info, root, errcodes, multiple=True)

    def Accept(self, port_name: str, info: Any = None, root: int = 0) -> "Comm":
        """MPI_Comm_accept: the Intercomm to the job that Connects to
        ``port_name`` (MPI.Open_port's, the root's), collective (ports.py)."""
        from .ports import accept
        return accept(self, port_name, info, root)

    def Connect(self, port_name: str, info: Any = None, root: int = 0) -> "Comm":
        """MPI_Comm_connect: the Intercomm to the job that Accepts on
        ``port_name``, collective (ports.py)."""
        from .ports import connect
        return connect(self, port_name, info, root)

    @staticmethod
    def Get_parent() -> "Comm":
        """A spawned process's Intercomm to its parents; MPI.COMM_NULL in
        a process not spawned, and after its Disconnect (spawn.py)."""
        from .spawn import get_parent
        return get_parent()

    def Split(self, color: int = 0, key: int = 0) -> "Comm":
        c = None if color is None or color == UNDEFINED or color < 0 else int(color)
        sub = self._g.split(c, int(key))
        return COMM_NULL if sub is None else Intracomm(sub)

    def Create_intercomm(self, local_leader: int, peer_comm: "Comm", remote_leader: int,
                         tag: int = 0) -> "Comm":
        """MPI_Intercomm_create, collective over this communicator: an
        Intercomm of its processes and the group whose leader is
        ``remote_leader`` (a rank of ``peer_comm``) (inter.py)."""
        from .inter import create_intercomm
        return create_intercomm(self, local_leader, peer_comm, remote_leader, tag)

    def Split_type(self, split_type: int, key: int = 0, info: Any = None) -> "Comm":
        if split_type == UNDEFINED:
            return self.Split(UNDEFINED, key)
        if split_type != COMM_TYPE_SHARED:
            raise not_provided(f"Split_type({split_type})")
        return Intracomm(self._g.split_host(int(key)))

    def Create_cart(self, dims: Sequence[int], periods: Sequence[bool] | None = None,
                    reorder: bool = False) -> "Comm":
        """A Cartcomm over the first prod(dims) ranks (row-major, as MPI's
        without reorder); COMM_NULL on the others (topo.py)."""
        from .topo import create_cart
        return create_cart(self, dims, periods)

    def Create_graph(self, index: Sequence[int], edges: Sequence[int],
                     reorder: bool = False) -> "Comm":
        """A Graphcomm over the first len(index) ranks; COMM_NULL on the
        others (topo.py)."""
        from .topo import create_graph
        return create_graph(self, index, edges)

    def Create_dist_graph_adjacent(self, sources: Sequence[int], destinations: Sequence[int],
                                   sourceweights: Any = None, destweights: Any = None,
                                   info: Any = None, reorder: bool = False) -> "Comm":
        """A Distgraphcomm of this rank's own in- and out-edges, in order
        (collective: every edge is checked to be named at both ends)."""
        from .topo import create_dist_graph_adjacent
        return create_dist_graph_adjacent(self, sources, destinations, sourceweights,
                                          destweights)

    def Create_dist_graph(self, sources: Sequence[int], degrees: Sequence[int],
                          destinations: Sequence[int], weights: Any = None, info: Any = None,
                          reorder: bool = False) -> "Comm":
        """A Distgraphcomm of the edges every rank names (``degrees[i]``
        destinations of ``sources[i]``), each rank learning its own
        (collective: one all_to_all)."""
        from .topo import create_dist_graph
        return create_dist_graph(self, sources, degrees, destinations, weights)

    def Cart_map(self, dims: Sequence[int], periods: Sequence[bool] | None = None) -> int:
        """This rank's rank in Create_cart(dims)'s communicator (ranks kept),
        UNDEFINED past it."""
        return self._g.rank if self._g.rank < math.prod(int(d) for d in dims) else UNDEFINED

    def Graph_map(self, index: Sequence[int], edges: Sequence[int]) -> int:
        return self._g.rank if self._g.rank < len(index) else UNDEFINED

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


COMM_NULL = Comm(None)
