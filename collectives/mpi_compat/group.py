"""mpi4py's Group over meshrun: a group is a list of processes, kept as
their world ranks (a meshrun communicator's ``ranks``), so that any two
groups of one world compare and translate ranks without a message. Every
Group call is local, as MPI's; a communicator is made of one by
``comm.Create(group)`` (a Split, collective over ``comm``) or
``comm.Create_group(group)`` (meshrun's ``Comm.group``, over the group's
members alone: comm.py)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .types import IDENT, PROC_NULL, SIMILAR, UNDEFINED, UNEQUAL

__all__ = ["Group", "GROUP_EMPTY", "GROUP_NULL", "comm_ranks"]


class Group:
    """mpi4py's Group: ``members`` the processes' world ranks in the group's
    order, ``me`` this process's world rank (None on GROUP_NULL, which
    ``Free`` makes of a group, as mpi4py's does)."""

    def __init__(self, group: "Group | None" = None, *, members: Sequence[int] = (),
                 me: int | None = None) -> None:
        """``group``: another handle of it (mpi4py's ``MPI.Group(g)``, equal
        to it)."""
        self._members: tuple[int, ...] = tuple(members)
        self._me: int | None = me
        self._handle = object()
        if group is not None:
            self._members, self._me, self._handle = group._members, group._me, group._handle

    def _live(self, what: str) -> tuple[int, ...]:
        if self._me is None:
            raise ValueError(f"collectives.MPI Group.{what}: the group is MPI.GROUP_NULL "
                             f"(freed)")
        return self._members

    def _made(self, members: Sequence[int]) -> "Group":
        """A group of ``members``: GROUP_EMPTY itself where none (Open MPI's)."""
        return Group(members=members, me=self._me) if members else GROUP_EMPTY

    def __eq__(self, other: object) -> bool:
        """(the same handle, as mpi4py's: a freed one is GROUP_NULL's equal;
        compare members with ``Compare``)"""
        if isinstance(other, Group):
            return self._handle is other._handle or (self._me is None and other._me is None)
        return NotImplemented

    def __hash__(self) -> int:
        return id(self._handle)

    def __bool__(self) -> bool:
        return self._me is not None

    def __repr__(self) -> str:
        return "MPI.GROUP_NULL" if self._me is None else \
            f"<MPI.Group of world ranks {list(self._members)}>"

    def Get_size(self) -> int:
        return len(self._live("Get_size"))

    def Get_rank(self) -> int:
        """This process's rank in the group; MPI.UNDEFINED if not in it."""
        members = self._live("Get_rank")
        return members.index(self._me) if self._me in members else UNDEFINED

    size = property(Get_size)
    rank = property(Get_rank)

    def _ranks(self, ranks: Sequence[int], what: str, repeat: bool = False) -> list[int]:
        """``ranks`` of this group as ints, each in it and none twice
        (``repeat``: Translate_ranks's, where a rank may come again and
        MPI.PROC_NULL stands for itself)."""
        n = len(self._live(what))
        got: list[int] = []
        for r in ranks:
            if repeat and r == PROC_NULL:
                got.append(PROC_NULL)
                continue
            if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or not 0 <= r < n:
                raise ValueError(f"collectives.MPI Group.{what}({list(ranks)!r:.100}): {r!r} "
                                 f"is no rank of the group (0..{n - 1})")
            if int(r) in got and not repeat:
                raise ValueError(f"collectives.MPI Group.{what}({list(ranks)!r:.100}): rank "
                                 f"{r} is given twice")
            got.append(int(r))
        return got

    def Incl(self, ranks: Sequence[int]) -> "Group":
        """The group of ``ranks`` of this one, in that order."""
        return self._made([self._members[r] for r in self._ranks(ranks, "Incl")])

    def Excl(self, ranks: Sequence[int]) -> "Group":
        """This group without ``ranks``, in its order."""
        drop = set(self._ranks(ranks, "Excl"))
        return self._made([w for r, w in enumerate(self._members) if r not in drop])

    def _spans(self, spans: Sequence[tuple[int, int, int]], what: str) -> list[int]:
        """MPI's (first, last, stride) triplets, ``last`` included, as ranks."""
        out: list[int] = []
        for span in spans:
            first, last, stride = (int(v) for v in span)
            if stride == 0:
                raise ValueError(f"collectives.MPI Group.{what}: {tuple(span)} has stride 0")
            out.extend(range(first, last + (1 if stride > 0 else -1), stride))
        return out

    def Range_incl(self, ranks: Sequence[tuple[int, int, int]]) -> "Group":
        return self.Incl(self._spans(ranks, "Range_incl"))

    def Range_excl(self, ranks: Sequence[tuple[int, int, int]]) -> "Group":
        return self.Excl(self._spans(ranks, "Range_excl"))

    @classmethod
    def Union(cls, group1: "Group", group2: "Group") -> "Group":
        """group1's processes, then group2's not in group1 (MPI's order)."""
        a, b = group1._live("Union"), group2._live("Union")
        return (group2 if group1 is GROUP_EMPTY else group1)._made(
            a + tuple(w for w in b if w not in a))

    @classmethod
    def Intersection(cls, group1: "Group", group2: "Group") -> "Group":
        """group1's processes that are in group2, in group1's order."""
        a, b = group1._live("Intersection"), group2._live("Intersection")
        return group1._made([w for w in a if w in b])

    Intersect = Intersection

    @classmethod
    def Difference(cls, group1: "Group", group2: "Group") -> "Group":
        """group1's processes that are not in group2, in group1's order."""
        a, b = group1._live("Difference"), group2._live("Difference")
        return group1._made([w for w in a if w not in b])

    def Translate_ranks(self, ranks: Sequence[int] | None = None,
                        group: "Group | None" = None) -> list[int]:
        """Each of ``ranks`` (all where None) as the rank of that process in
        ``group`` (the world's where None), MPI.UNDEFINED where not in it; a
        rank may come more than once, and MPI.PROC_NULL gives MPI.PROC_NULL
        (MPI's rules)."""
        members = self._live("Translate_ranks")
        picked = range(len(members)) if ranks is None else \
            self._ranks(ranks, "Translate_ranks", repeat=True)
        if group is None:
            return [PROC_NULL if r == PROC_NULL else members[r] for r in picked]
        there = group._live("Translate_ranks")
        return [PROC_NULL if r == PROC_NULL else there.index(members[r])
                if members[r] in there else UNDEFINED for r in picked]

    def Compare(self, group: "Group") -> int:
        """MPI.IDENT: the same processes in the same order; MPI.SIMILAR: in
        another order; else MPI.UNEQUAL."""
        a, b = self._live("Compare"), group._live("Compare")
        return IDENT if a == b else SIMILAR if sorted(a) == sorted(b) else UNEQUAL

    def Dup(self) -> "Group":
        """(a new handle of the same processes: not equal, IDENT)"""
        return self._made(self._live("Dup"))

    def Free(self) -> None:
        """(this handle becomes MPI.GROUP_NULL's equal; GROUP_EMPTY stays)"""
        if self is not GROUP_EMPTY:
            self._me = None

    free = Free

    def in_comm(self, ranks: Sequence[int], what: str, rank: int) -> list[int]:
        """The group's processes as ranks of a communicator whose world
        ranks are ``ranks`` (every one must be there; ``rank``, the
        caller's world rank, names it in the error)."""
        where = {w: r for r, w in enumerate(ranks)}
        outside = [w for w in self._live(what) if w not in where]
        if outside:
            raise ValueError(f"rank {rank}: collectives.MPI {what}: the group's world rank(s) "
                             f"{outside} are not in the communicator (world ranks "
                             f"{list(ranks)!r:.200})")
        return [where[w] for w in self._members]


def comm_ranks(group: object, ranks: Sequence[int], what: str, rank: int) -> list[int]:
    """``group`` (an MPI.Group, else TypeError) as ranks of a communicator
    whose world ranks are ``ranks`` (Group.in_comm)."""
    if not isinstance(group, Group):
        raise TypeError(f"rank {rank}: collectives.MPI {what}: expecting an MPI.Group "
                        f"(comm.Get_group().Incl(ranks)...), got {type(group).__name__}")
    return group.in_comm(ranks, what, rank)


GROUP_EMPTY = Group(members=(), me=-1)
"""(``me`` -1: no process, but not GROUP_NULL)"""
GROUP_NULL = Group(me=None)
