"""The checks of an intercommunicator call's arguments (intercoll.py's
``_checked``): pure functions of every rank's arguments, in the order of
the union of the two groups, made by every rank of the union alike (by its
rank 0, which tells the others, above 16 ranks), so that every rank has
the same answer: ``("", value)``, or what is wrong (naming the ranks, by
their world ranks and their ranks in their groups) and None, or MPI's
error class where MPI names one (ERR_ROOT)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .types import ERR_ROOT, PROC_NULL, ROOT

__all__ = ["Sides"]

Verdict = tuple[str, Any]


@dataclass(frozen=True)
class Sides:
    """The union's two groups: its first ``k`` ranks, then the rest;
    ``world``, each union rank's world rank."""

    k: int
    world: tuple[int, ...]

    def who(self, u: int) -> str:
        """Union rank ``u`` as a verdict names it (the same words on every rank)."""
        k = self.k
        return f"world rank {self.world[u]} (rank {u if u < k else u - k} of its group)"

    def across(self, u: int) -> list[tuple[int, int]]:
        """Union rank ``u``'s remote group: (its union rank, ``u``'s rank in
        that one's remote group), for each of its ranks in order."""
        k, n = self.k, len(self.world)
        return [(k + j, u) for j in range(n - k)] if u < k else [(j, u - k) for j in range(k)]

    def roots(self, got: list[Any]) -> Verdict:
        """A rooted call's ``[root, blocks]``: one group MPI.ROOT on one rank
        and MPI.PROC_NULL on the others, the other group the root's rank,
        every one of them; where given, each block's bytes alike at the root
        (its list, one a remote rank) and at the other group's rank."""
        k = self.k
        roots = [x[0] for x in got]
        for u, r in enumerate(roots):
            if r not in (ROOT, PROC_NULL) and not 0 <= r < len(self.across(u)):
                return (f"{self.who(u)} passed root {r}, which is none of MPI.ROOT, "
                        f"MPI.PROC_NULL and the other group's {len(self.across(u))} ranks "
                        f"(MPI_ERR_ROOT)", ERR_ROOT)
        sides = [(roots[:k], 0), (roots[k:], k)]
        rooted = [s for s in sides if ROOT in s[0]]
        names = {ROOT: "MPI.ROOT", PROC_NULL: "MPI.PROC_NULL"}

        def said(xs: list[Any]) -> str:
            return ", ".join(f"root {names.get(x, x)} on rank {i}" for i, x in enumerate(xs))
        if len(rooted) != 1:
            return (f"no group has the root (MPI.ROOT): the groups passed root "
                    f"{said(roots[:k])} and {said(roots[k:])}" if not rooted else
                    f"both groups passed MPI.ROOT: {said(roots[:k])} and {said(roots[k:])}",
                    None)
        theirs, at = rooted[0]
        other, off = sides[1] if rooted[0] is sides[0] else sides[0]
        tops = [i for i, x in enumerate(theirs) if x == ROOT]
        if len(tops) > 1 or any(x not in (ROOT, PROC_NULL) for x in theirs):
            return (f"ranks {tops} of the root's group passed MPI.ROOT: one rank of it "
                    f"passes MPI.ROOT, the others MPI.PROC_NULL ({said(theirs)})", None)
        if any(x != tops[0] for x in other):
            return f"the root is rank {tops[0]} of the other group, which passed " \
                   f"{said(other)}", None
        mine = got[at + tops[0]][1]
        for j, (_, b) in enumerate(got[off:off + len(other)]):
            if mine is not None and b is not None and b != mine[j]:
                return (f"the root (rank {tops[0]}) has {mine[j]} bytes for rank {j} of the "
                        f"other group (world rank {self.world[off + j]}), whose buffer has "
                        f"{b} (MPI's counts and datatypes agree at both ends)", None)
        return "", None

    def pairs(self, got: list[Any]) -> Verdict:
        """Every rank's ``[sends, recvs]`` (bytes to and from each remote
        rank): each block's bytes alike at its two ends."""
        for u, (sends, _) in enumerate(got):
            for j, (v, me) in enumerate(self.across(u)):
                if sends[j] != got[v][1][me]:
                    return (f"{self.who(u)} sends {sends[j]} bytes to rank {j} of the other "
                            f"group, {self.who(v)}, which expects {got[v][1][me]} from it "
                            f"(MPI's counts and datatypes agree at both ends)", None)
        return "", None

    def sums(self, got: list[Any]) -> Verdict:
        """A Reduce_scatter's ``[send bytes, recvcounts in bytes]``: one
        recvcounts a group, each rank's input their sum, the two groups'
        sums alike (MPI's)."""
        k = self.k
        totals = []
        for side in (range(k), range(k, len(self.world))):
            counts = [got[u][1] for u in side]
            if any(c != counts[0] for c in counts):
                return ("the ranks of one group passed recvcounts (in bytes) " + ", ".join(
                    f"{c} on {self.who(u)}" for u, c in zip(side, counts)) +
                    " (one recvcounts a group)", None)
            totals.append(sum(counts[0]))
            for u in side:
                if got[u][0] != totals[-1]:
                    return (f"{self.who(u)} passes {got[u][0]} bytes to reduce; its group's "
                            f"recvcounts sum to {totals[-1]}", None)
        if totals[0] != totals[1]:
            return (f"the groups' recvcounts sum to {totals[0]} and {totals[1]} bytes: each "
                    f"group's reduction is scattered over the other's", None)
        return "", None

    def lengths(self, got: list[Any]) -> Verdict:
        """Every rank's count of objects (alltoall's): one a remote rank."""
        for u, n in enumerate(got):
            if n != len(self.across(u)):
                return (f"{self.who(u)} passed {n} objects for a remote group of "
                        f"{len(self.across(u))} (one a remote rank)", None)
        return "", None

    def colors(self, got: list[Any]) -> Verdict:
        """Split's ``[color, key, ok]``: every rank's ``[color, key]``."""
        bad = [self.who(u) for u, (_, _, ok) in enumerate(got) if not ok]
        if bad:
            return f"the color or key of {', '.join(bad)} is not an int", None
        return "", [row[:2] for row in got]

    def subgroups(self, got: list[Any]) -> Verdict:
        """Create's groups (their world ranks): one a group, of its own
        ranks; the union's ranks of each, in the group's order."""
        out = []
        for side in (range(self.k), range(self.k, len(self.world))):
            said = got[side[0]]
            if any(got[u] != said for u in side):
                return ("the ranks of one group passed different groups (world ranks " +
                        ", ".join(f"{got[u]} on {self.who(u)}" for u in side) +
                        "): every rank of a group passes the same", None)
            own = [self.world[u] for u in side]
            if any(x not in own for x in said):
                return (f"the group of world ranks {said}, passed by {self.who(side[0])}, "
                        f"is not a subgroup of its group (world ranks {own})", None)
            out.append([self.world.index(x) for x in said])
        return "", out
