"""mpi4py's communicators over meshrun's: Comm (and Intracomm, the same)
wraps a MeshComm (the topologies, Cartcomm, Graphcomm and Distgraphcomm:
topo.py); Split, Dup, Create_cart and the rest map onto Comm.split,
Comm.dup, mesh.grid and Comm.group,
Get_group's Group (group.py) onto the communicator's world ranks, Create
onto Comm.split and Create_group onto Comm.group.
What meshrun does not provide raises NotImplementedError naming the call
and what to use instead."""
from __future__ import annotations

import functools
import inspect
import itertools
import math
import os
import sys
import weakref
from typing import Any, Callable, Sequence

import mesh
from mesh import Comm as MeshComm

from .attrs import Attributes
from .group import Group, comm_ranks
from .objects import ObjectCollectives
from .p2p import PointToPoint
from .types import (CONGRUENT, ERR_COMM, ERR_ROOT, IDENT, SIMILAR, UNDEFINED, UNEQUAL,
                    Exception)
from .vinit import UnevenInits

__all__ = ["Comm", "Intracomm", "COMM_NULL", "COMM_TYPE_SHARED", "not_provided"]

COMM_TYPE_SHARED = 0       # (Open MPI's)
_HANDLES: "weakref.WeakValueDictionary[int, Comm]" = weakref.WeakValueDictionary()
"""toint's numbers (the handles kept as long as the program keeps them)."""
_NUMBERS = itertools.count(1)

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


class Comm(PointToPoint, UnevenInits, ObjectCollectives, Attributes):
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
        if of is None and g is not None and not hasattr(g, "rank"):
            raise TypeError(f"collectives.MPI.{type(self).__name__}(): expecting a "
                            f"communicator, got {type(g).__name__}")
        g = of._g if of is not None else g
        self._g = g         # type: ignore[assignment]
        self._posted = 0
        self._name: str = of.Get_name() if of is not None else \
            "MPI_COMM_WORLD" if g is not None and g is mesh.world.current() else ""
        if of is not None:      # (a handle of the same communicator: its attributes)
            self.__dict__["_attr_values"] = of._attrs

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

    def toint(self) -> int:
        """mpi4py's integer handle: a number of this process's, which
        ``Comm.fromint`` (and ``f2py``, ``py2f``'s) turns back into this
        handle; COMM_NULL's is 0."""
        if self._g is None:
            return 0
        got = next((k for k, v in _HANDLES.items() if v is self), None)
        if got is None:
            got = next(_NUMBERS)
            _HANDLES[got] = self
        return got

    py2f = toint

    @classmethod
    def fromint(cls, handle: int) -> "Comm":
        got = _HANDLES.get(int(handle)) if handle else COMM_NULL
        if got is None:
            raise ValueError(f"collectives.MPI Comm.fromint({handle}): no such handle")
        return got

    f2py = fromint

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

    name = property(Get_name, Set_name)

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

    def Dup(self, info: Any = None) -> "Comm":
        """(``info`` taken and not used; the attributes through their copy_fn)"""
        dup = self._like(self._g.dup())
        self._copy_attrs(dup)
        return dup

    def Clone(self) -> "Comm":
        return self.Dup()

    def _like(self, g: MeshComm) -> "Comm":
        return Intracomm(g)

    _kept = False       # COMM_WORLD's and COMM_SELF's handles: Free refuses them

    def Free(self) -> None:
        """MPI_Comm_free: this handle becomes COMM_NULL's equal (meshrun's
        communicator has nothing to free: dropped); COMM_WORLD and COMM_SELF
        raise MPI.Exception (ERR_COMM), as MPI's."""
        if self._kept or self._g is None:
            raise Exception(ERR_COMM, f"collectives.MPI Free: {self._name or 'MPI.COMM_NULL'} "
                            f"can not be freed")
        self._delete_attrs()
        self._g = None      # type: ignore[assignment]

    @classmethod
    def Join(cls, fd: int) -> "Comm":
        raise not_provided("Join")

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
                       maxprocs: Sequence[int] | int | None = None, info: Any = None,
                       root: int = 0, errcodes: list[Any] | None = None) -> "Comm":
        """MPI_Comm_spawn_multiple: Spawn of several commands, one item of
        each list a command (its children in that order; ``maxprocs`` one
        int: that many of each), one bridge; ``errcodes``: filled with a
        list of 0s a command."""
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
        from .topo import standard_index
        nodes, _ = standard_index([int(i) for i in index], [int(e) for e in edges])
        return self._g.rank if self._g.rank < len(nodes) else UNDEFINED

    def Abort(self, errorcode: int = 0) -> None:
        """MPI_Abort: this process ends at once with ``errorcode``; meshrun
        then stops every rank and reports it."""
        print(f"collectives.MPI: rank {self._g.rank} called Abort({errorcode})",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(int(errorcode) or 1)

    def Set_errhandler(self, errhandler: Any) -> None:
        pass

    def Get_errhandler(self) -> Any:
        return None

    def Call_errhandler(self, errorcode: int) -> None:
        pass


class Intracomm(Comm):
    """mpi4py's Intracomm (every communicator here is one). Its calls that
    take a ``root`` check it first: one outside the communicator raises
    MPI.Exception (ERR_ROOT) on every rank, as MPI's (meshrun's own calls:
    ValueError)."""

    def __init__(self, g: "MeshComm | Comm | None" = None) -> None:
        """(mpi4py's ``MPI.Intracomm(comm)``: TypeError for an intercommunicator)"""
        if isinstance(g, Comm) and g.Is_inter():
            raise TypeError(f"collectives.MPI.Intracomm(): expecting an intracommunicator, got "
                            f"{type(g).__name__} (MPI.Intercomm(comm) takes it)")
        super().__init__(g)

    @classmethod
    def Create_from_group(cls, group: Group, stringtag: str = "", info: Any = None,
                          errhandler: Any = None) -> "Comm":
        raise not_provided("Create_from_group (MPI-4's sessions: use comm.Create_group)")


def _rooted(fn: Callable[..., Any], at: int, default: int) -> Callable[..., Any]:
    """``fn`` with its root (positional argument ``at``, after self) checked."""
    @functools.wraps(fn)
    def call(self: Comm, *args: Any, **kw: Any) -> Any:
        root = kw["root"] if "root" in kw else args[at] if len(args) > at else default
        g = self._g
        if g is not None and (isinstance(root, bool) or not isinstance(root, int)
                              and not hasattr(root, "__index__") or not 0 <= root < g.size):
            raise Exception(ERR_ROOT, f"rank {g.rank}: collectives.MPI {fn.__name__}: root "
                            f"{root!r} is no rank of the communicator (0..{g.size - 1})")
        return fn(self, *args, **kw)
    return call


for _name in dir(Comm):
    _fn = getattr(Comm, _name)
    if _name[:1].isalpha() and inspect.isfunction(_fn):
        _params = list(inspect.signature(_fn).parameters.values())[1:]
        _at = next((i for i, p in enumerate(_params) if p.name == "root"), None)
        if _at is not None:
            setattr(Intracomm, _name, _rooted(_fn, _at, _params[_at].default))


COMM_NULL = Comm(None)
COMM_NULL._name = "MPI_COMM_NULL"
