"""MPI's intercommunicators (mpi4py's Intercomm): two disjoint groups of
one world, each rank naming the other group's ranks. It is a meshrun
communicator of both groups' processes (``union``: the group whose rank 0
has the lower world rank first, Open MPI's order for ``Merge`` where both
pass the same ``high``), made by ``world.group`` (no message); a message to
remote rank k is a send to the union's rank ``remote offset + k``, in the
union's own context, and a receive's Status names the remote rank again.
Its collectives: intercoll.py. ``Intracomm.Create_intercomm`` makes one
(``create_intercomm``): every rank's leaders checked alike, the leaders'
groups exchanged over ``peer_comm`` with ``tag``, each broadcast in its
group; ``Split`` and ``Create`` make more of one (an Intercomm of a
``group`` of the union each, on its members). Spawn's, Accept's and
Connect's intercommunicators (spawn.py, ports.py) are these, over a bridge
mesh's two groups. What an intracommunicator has and MPI has not on an
intercommunicator (Scan, Exscan, Split_type, the topologies...) raises
NotImplementedError."""
from __future__ import annotations

from typing import Any

import numpy as np

import mesh
from mesh import Comm as MeshComm

from ..runner import Ctx
from .comm import COMM_NULL, Comm, Intracomm, not_provided
from .group import Group
from .interobjects import InterObjects
from .requests import Request, Status
from .types import ANY_SOURCE, ANY_TAG, CONGRUENT, IDENT, PROC_NULL, SIMILAR, UNEQUAL

__all__ = ["Intercomm", "create_intercomm"]


class _Remote(Request):
    """A receive request whose Status names the remote group's rank."""

    _ro: int

    def _complete(self, status: Status | None, timeout: float | None = None) -> Any:
        value = super()._complete(status, timeout)
        _back(status, self._ro)
        return value


def _back(status: Status | None, ro: int) -> None:
    if status is not None and status.source >= 0:
        status.source -= ro


class Intercomm(InterObjects, Comm):
    """mpi4py's Intercomm over ``union`` (both groups' processes, the
    local group's ``nl`` from ``lo``, the remote's ``nr`` from ``ro``)."""

    _lo: int
    _nl: int
    _ro: int
    _nr: int
    _bridge: Any = None     # (a Spawn's: spawn.py)

    def __init__(self, union: "MeshComm | Intercomm | None" = None, lo: int = 0, nl: int = 0,
                 ro: int = 0, nr: int = 0) -> None:
        """(``MPI.Intercomm(inter)``: another handle of ``inter``; ``MPI.Intercomm()``
        COMM_NULL's; an intracommunicator: TypeError, as mpi4py's)"""
        if isinstance(union, Comm) and not isinstance(union, Intercomm):
            raise TypeError(f"collectives.MPI.Intercomm(): expecting an intercommunicator, "
                            f"got {type(union).__name__}")
        super().__init__(union)
        if isinstance(union, Intercomm):
            lo, nl, ro, nr = union._lo, union._nl, union._ro, union._nr
        self._lo, self._nl, self._ro, self._nr = lo, nl, ro, nr

    def __repr__(self) -> str:
        return f"<MPI.Intercomm rank {self.rank} of {self._nl}, remote size {self._nr}>"

    @classmethod
    def Create_from_groups(cls, local_group: Group, local_leader: int, remote_group: Group,
                           remote_leader: int, stringtag: str = "", info: Any = None,
                           errhandler: Any = None) -> "Intercomm":
        """(NotImplementedError, as Intracomm.Create_from_group's: a program that
        catches it, as mpi4py's suite does, goes on in step on every rank)"""
        raise not_provided("Intercomm.Create_from_groups (MPI-4's sessions: use "
                           "Intracomm.Create_intercomm)")

    # -- what it is --------------------------------------------------------------------
    def Get_rank(self) -> int:
        return self._g.rank - self._lo

    def Get_size(self) -> int:
        return self._nl

    def Get_remote_size(self) -> int:
        return self._nr

    rank = property(Get_rank)
    size = property(Get_size)
    remote_size = property(Get_remote_size)

    def Is_inter(self) -> bool:
        return True

    def Is_intra(self) -> bool:
        return False

    is_inter = property(Is_inter)
    is_intra = property(Is_intra)

    def _world(self, at: int, n: int) -> list[int]:
        return list(self._g.ranks[at:at + n])

    def Get_group(self) -> Group:
        """The local group (its world ranks)."""
        return Group(members=self._world(self._lo, self._nl), me=self._g.ranks[self._g.rank])

    def Get_remote_group(self) -> Group:
        return Group(members=self._world(self._ro, self._nr), me=self._g.ranks[self._g.rank])

    group = property(Get_group)
    remote_group = property(Get_remote_group)

    def Compare(self, other: Comm) -> int:
        """IDENT: the same; CONGRUENT: the same groups in the same order (a
        Dup); SIMILAR: the same processes each side; else UNEQUAL."""
        if not isinstance(other, Intercomm):
            return UNEQUAL
        if self._g is other._g:
            return IDENT
        mine = (self._world(self._lo, self._nl), self._world(self._ro, self._nr))
        theirs = (other._world(other._lo, other._nl), other._world(other._ro, other._nr))
        if mine == theirs:
            return CONGRUENT
        return SIMILAR if [sorted(x) for x in mine] == [sorted(x) for x in theirs] else UNEQUAL

    def Dup(self, info: Any = None) -> "Intercomm":
        """Collective over both groups (meshrun's ``dup`` of the union: no
        message; ``info`` taken and not used)."""
        return Intercomm(self._g.dup(), self._lo, self._nl, self._ro, self._nr)

    def Clone(self) -> "Intercomm":
        return self.Dup()

    def Merge(self, high: bool = False) -> Intracomm:
        """An Intracomm of both groups: the group that passed ``high=False``
        first, where both passed the same the one whose rank 0 has the
        lower world rank (Open MPI's); collective over both groups."""
        def body(ctx: Ctx) -> list[int]:
            return self._verdict(ctx, bool(high), self._highs)
        order = self._run("Merge", body)
        return Intracomm(self._g.group(order))

    def _highs(self, got: list[Any]) -> tuple[str, Any]:
        """Union rank 0's answer to every rank's ``high``: the union's ranks in
        the merged order, or what is wrong."""
        first, second = got[:self._first], got[self._first:]
        for side in (first, second):
            if len(set(side)) > 1:
                return (f"the ranks of one group passed high={side} (one value a group)",
                        None)
        a = list(range(self._first))
        b = list(range(self._first, self._g.size))
        return "", (b + a if first[0] and not second[0] else a + b)

    def Split(self, color: int = 0, key: int = 0) -> Comm:
        """MPI_Comm_split of an intercommunicator, collective over both
        groups: an Intercomm whose local group is this group's ranks that
        passed ``color``, its remote group the remote group's that did, each
        ranked by ``key`` then by its rank; COMM_NULL where ``color`` is
        MPI.UNDEFINED (or negative) or no rank of one of the two groups
        passed it (MPI's). The colors and keys go to every rank (by the
        union's rank 0), which makes every color's communicator alike."""
        def whole(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        ok = whole(color) and whole(key)
        mine = [int(color) if ok and color >= 0 else -1, int(key) if ok else 0, ok]

        def body(ctx: Ctx) -> Any:
            return self._verdict(ctx, mine, self._sides.colors)
        table = self._run("Split", body)
        k, n = self._first, self._g.size
        made: Intercomm | None = None
        for c in sorted({row[0] for row in table if row[0] >= 0}):
            sides = [sorted((u for u in side if table[u][0] == c), key=lambda u: (table[u][1], u))
                     for side in (range(k), range(k, n))]
            got = self._made(*sides)
            made = made if got is None else got
        return COMM_NULL if made is None else made

    def _made(self, a: list[int], b: list[int]) -> "Intercomm | None":
        """The Intercomm of the union's ranks ``a`` (of the first group) and
        ``b`` (of the second), on their members (None on the others, and
        where either is empty); every rank of the union makes it, in the
        same order (``group``'s rule)."""
        if not a or not b:
            return None
        w = self._g.ranks
        first, second = (a, b) if w[a[0]] < w[b[0]] else (b, a)
        sub = self._g.group(first + second)
        if sub is None:
            return None
        mine = first if self._g.rank in first else second
        lo, ro = (0, len(first)) if mine is first else (len(first), 0)
        return Intercomm(sub, lo, len(mine), ro, len(first) + len(second) - len(mine))

    def Create(self, group: Group) -> Comm:
        """MPI_Comm_create of an intercommunicator, collective over both
        groups: each group passes one subgroup of itself (every rank of it
        the same); an Intercomm of the two subgroups, in their order, on
        their members; COMM_NULL on the others and where either is empty."""
        if not isinstance(group, Group):
            raise TypeError(f"{self._me()}: collectives.MPI Intercomm.Create: expecting an "
                            f"MPI.Group (inter.Get_group().Incl(ranks)...), got "
                            f"{type(group).__name__}")
        mine = list(group._live("Intercomm.Create"))

        def body(ctx: Ctx) -> Any:
            return self._verdict(ctx, mine, self._sides.subgroups)
        a, b = self._run("Create", body)
        made = self._made(a, b)
        return COMM_NULL if made is None else made

    @property
    def Create_group(self) -> Any:
        return self.__getattr__("Create_group")

    def __getattr__(self, name: str) -> Any:
        if name == "Create_group":      # (as mpi4py's Intercomm: none, an AttributeError)
            raise AttributeError("collectives.MPI: Intercomm has no Create_group (mpi4py's is "
                                 "Intracomm's; MPI's Comm_create_group takes an "
                                 "intracommunicator): Create(group), collective over both "
                                 "groups, or Merge().Create_group(group)")
        return super().__getattr__(name)

    # -- point-to-point: ranks of the remote group ---------------------------------------
    def _to(self, r: int, what: str) -> int:
        if r == PROC_NULL:
            return r
        if not isinstance(r, (int, np.integer)) or not 0 <= r < self._nr:
            raise ValueError(f"{self._me()}: collectives.MPI Intercomm.{what}: rank {r!r} "
                             f"out of range: the remote group has {self._nr} ranks "
                             f"(0..{self._nr - 1})")
        return self._ro + int(r)

    def _from(self, r: int, what: str) -> int:
        return r if r == ANY_SOURCE else self._to(r, what)

    def _remote(self, req: Request) -> Request:
        out = _Remote.__new__(_Remote)
        out.__dict__.update(req.__dict__)
        out._ro = self._ro
        return out

    def Send(self, buf: Any, dest: int, tag: int = 0) -> None:
        super().Send(buf, self._to(dest, "Send"), tag)

    def Ssend(self, buf: Any, dest: int, tag: int = 0) -> None:
        super().Ssend(buf, self._to(dest, "Ssend"), tag)

    def Isend(self, buf: Any, dest: int, tag: int = 0) -> Request:
        return super().Isend(buf, self._to(dest, "Isend"), tag)

    def Recv(self, buf: Any, source: int = ANY_SOURCE, tag: int = ANY_TAG,
             status: Status | None = None) -> None:
        super().Recv(buf, self._from(source, "Recv"), tag, status)
        _back(status, self._ro)

    def Irecv(self, buf: Any, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Request:
        return self._remote(super().Irecv(buf, self._from(source, "Irecv"), tag))

    def Sendrecv(self, sendbuf: Any, dest: int, sendtag: int = 0, recvbuf: Any = None,
                 source: int = ANY_SOURCE, recvtag: int = ANY_TAG,
                 status: Status | None = None) -> None:
        super().Sendrecv(sendbuf, self._to(dest, "Sendrecv"), sendtag, recvbuf,
                         self._from(source, "Sendrecv"), recvtag, status)
        _back(status, self._ro)

    def Probe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG,
              status: Status | None = None) -> bool:
        super().Probe(self._from(source, "Probe"), tag, status)
        _back(status, self._ro)
        return True

    def Iprobe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG,
               status: Status | None = None) -> bool:
        got = super().Iprobe(self._from(source, "Iprobe"), tag, status)
        _back(status, self._ro)
        return got

    probe, iprobe = Probe, Iprobe

    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        super().send(obj, self._to(dest, "send"), tag)

    def ssend(self, obj: Any, dest: int, tag: int = 0) -> None:
        super().ssend(obj, self._to(dest, "ssend"), tag)

    def isend(self, obj: Any, dest: int, tag: int = 0) -> Request:
        return super().isend(obj, self._to(dest, "isend"), tag)

    def recv(self, buf: Any = None, source: int = ANY_SOURCE, tag: int = ANY_TAG,
             status: Status | None = None) -> Any:
        value = super().recv(buf, self._from(source, "recv"), tag, status)
        _back(status, self._ro)
        return value

    def irecv(self, buf: Any = None, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Request:
        return self._remote(super().irecv(buf, self._from(source, "irecv"), tag))

    def sendrecv(self, sendobj: Any, dest: int, sendtag: int = 0, recvbuf: Any = None,
                 source: int = ANY_SOURCE, recvtag: int = ANY_TAG,
                 status: Status | None = None) -> Any:
        value = super().sendrecv(sendobj, self._to(dest, "sendrecv"), sendtag, recvbuf,
                                 self._from(source, "sendrecv"), recvtag, status)
        _back(status, self._ro)
        return value


    def Disconnect(self) -> None:
        """MPI_Comm_disconnect, collective over both groups: a barrier; a
        Spawn's bridge closed in its parents (spawn.py); the handle then
        MPI.COMM_NULL's equal."""
        from .spawn import disconnect
        disconnect(self)


_OURS = {n for c in Intercomm.__mro__[:3] for n in vars(c) if not n.startswith("_")}
_ANY = {"Get_name", "Set_name", "name", "Free", "Get_parent", "Abort", "Get_attr",
        "Set_errhandler", "Get_errhandler", "Call_errhandler", "Get_topology", "topology",
        "is_topo", "mesh"}


def _refused(name: str) -> Any:
    def call(self: Intercomm, *args: Any, **kw: Any) -> Any:
        raise not_provided(f"{name} on an intercommunicator")
    call.__name__ = name
    return call


for _name in dir(Comm):
    if not _name.startswith("_") and _name not in _OURS and _name not in _ANY:
        setattr(Intercomm, _name, _refused(_name))


def create_intercomm(local: Comm, local_leader: int, peer_comm: Comm, remote_leader: int,
                     tag: int = 0) -> Intercomm:
    """MPI_Intercomm_create, collective over ``local``: every rank's leaders
    and tag checked alike (one small all_gather), the leaders' groups
    exchanged over ``peer_comm`` with ``tag``, then broadcast in each group;
    the two groups must be disjoint."""
    g, what = local.mesh, "Create_intercomm"
    me = f"rank {g.rank}: collectives.MPI {what}"
    args = [int(local_leader), int(remote_leader), int(tag)]
    said = local.allgather(args)
    if any(a != said[0] for a in said):
        raise ValueError(f"{me}: the ranks of this group disagree on (local_leader, "
                         f"remote_leader, tag): " + ", ".join(
                             f"rank {r} {tuple(a)}" for r, a in enumerate(said)))
    if not 0 <= local_leader < g.size:
        raise ValueError(f"{me}: local_leader {local_leader} out of range (0..{g.size - 1})")
    mine = list(g.ranks)
    theirs: Any = None
    if g.rank == local_leader:
        if not 0 <= remote_leader < peer_comm.size:
            theirs = f"remote_leader {remote_leader} out of range of peer_comm " \
                     f"(0..{peer_comm.size - 1})"
        else:
            theirs = peer_comm.sendrecv(mine, remote_leader, tag, None, remote_leader, tag)
    theirs = local.bcast(theirs, root=local_leader)
    if isinstance(theirs, str):
        raise ValueError(f"{me}: {theirs}")
    both = set(mine) & set(theirs)
    if both:
        raise ValueError(f"{me}: the groups overlap: world ranks {sorted(both)} are in both "
                         f"(this group's {mine}, the remote's {list(theirs)})")
    first, second = (mine, theirs) if mine[0] < theirs[0] else (theirs, mine)
    world = mesh.world.current()
    assert world is not None
    union = world.group(list(first) + list(second))
    assert union is not None
    lo, ro = (0, len(first)) if first is mine else (len(first), 0)
    return Intercomm(union, lo, len(mine), ro, len(theirs))
