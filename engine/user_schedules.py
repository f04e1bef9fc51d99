"""A user's own schedules among ``engine.distribute``'s candidates.

A schedule family, ``make(p, m) -> Schedule`` (as the built-in generators
are), is made at each micro-batch count as a built-in's name is
(``Family``: engine.candidates' ``builtin`` calls it where it looks a name
up), each one checked and verified, a failure a row saying why. What each
rank made of its own schedules (``made_entry``: a digest of each, or why
it could not) is set beside the other ranks' (``made_agreed``): a schedule
built from code that depends on the rank fails on every rank at once,
naming the ranks, instead of on some while the others measure.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .ir import Schedule
from .schedules import is_name

__all__ = ["Family", "family_or_name", "made_entry", "made_agreed"]


def _first_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text if len(text) <= 200 else text[:197] + '...'}"


@dataclass(frozen=True)
class Family:
    """A user's schedule family: ``make(p, m)`` at each count tried, its
    rows named ``name(p,m)`` as a built-in's are. Calling it makes, checks
    and verifies one; anything wrong (``make`` raising, a result other
    than a Schedule of p ranks and m micro-batches, one that fails
    verification) is a ValueError of one line saying so: its row's."""

    make: Callable[[int, int], Any]
    name: str

    def __str__(self) -> str:
        return self.name

    def __call__(self, p: int, m: int) -> Schedule:
        try:
            sched = self.make(p, m)
        except Exception as e:
            raise ValueError(f"{self.name}({p}, {m}) raised {_first_line(e)}") from e
        if not isinstance(sched, Schedule):
            raise ValueError(f"{self.name}({p}, {m}) returned a {type(sched).__name__}, "
                             f"not an engine.Schedule")
        if (sched.num_ranks, sched.num_microbatches) != (p, m):
            raise ValueError(f"{self.name}({p}, {m}) made a schedule of {sched.num_ranks} "
                             f"ranks and {sched.num_microbatches} micro-batches")
        sched = sched.replace(sched.ranks, name=f"{self.name}({p},{m})")
        try:
            sched.validate()        # (the lowered copy it checked not kept: as made)
        except ValueError as e:
            raise ValueError(str(e).splitlines()[0]) from e
        return sched


def family_or_name(make: Callable[..., Any], k: int) -> str | Family:
    """A callable of ``schedule=[...]``: a built-in generator
    (``engine.one_f_one_b``) as its name, so it is that built-in's
    candidate; any other a Family named by its ``name`` attribute, else
    its ``__name__`` (a lambda's or a partial's: "family #k", k counting
    the families in the list from 1)."""
    own = getattr(make, "__name__", None)
    if getattr(make, "__module__", None) == "engine.schedules" and is_name(own):
        assert isinstance(own, str)
        return own
    name = getattr(make, "name", None)
    if not isinstance(name, str) or not name:
        name = own if isinstance(own, str) and own.isidentifier() else f"family #{k}"
    return Family(make, name)


def made_entry(sched: Schedule | None, label: str, why: BaseException | str | None = None
               ) -> list[str]:
    """One entry of what a rank made of its own schedules: ``label`` and a
    digest of ``sched``, or why it could not make or run it."""
    if why is not None:
        return [label, f"failed: {why if isinstance(why, str) else _first_line(why)}"]
    assert sched is not None
    return [label, "#" + hashlib.sha1(sched.to_json().encode()).hexdigest()[:8]]


def verified(sched: Schedule, p: int, made: list[list[str]] | None, yours: str = ""
             ) -> Schedule:
    """``sched`` checked for ``p`` pipeline ranks and verified (``validate``:
    a ``ScheduleError`` naming it), what became of it appended to ``made``
    (``made_entry``; before the error is raised too). ``yours``: how the
    error names it beside its name (" (yours #2)")."""
    try:
        if sched.num_ranks != p:
            raise ValueError(f"schedule {sched.name!r}{yours} has {sched.num_ranks} ranks, "
                             f"the grid's pp axis {p}")
        sched.validate()        # (the lowered copy it checked not kept: as given)
    except ValueError as e:
        if made is not None:
            made.append(made_entry(None, repr(sched.name), e))
        raise
    if made is not None:
        made.append(made_entry(sched, repr(sched.name)))
    return sched


def made_agreed(rank: int, everyone: Sequence[Sequence[Sequence[str]] | None]) -> None:
    """Raise the same ValueError on every rank (``rank``: this one) where the
    ranks made their own schedules otherwise (``everyone``: each rank's
    ``made_entry`` lists; None where it made none, failing before): the first
    schedule that differs, each group of ranks with what it made of it or
    why it failed. Ranks whose entries name other schedules (other lists)
    are left to the list's own check."""
    given = [[list(e) for e in m] for m in everyone if m is not None]
    ranks = [r for r, m in enumerate(everyone) if m is not None]
    for i in range(min((len(m) for m in given), default=0)):
        if len({m[i][0] for m in given}) > 1:
            return
        groups: dict[str, list[int]] = {}
        for r, m in zip(ranks, given):
            groups.setdefault(m[i][1], []).append(r)
        if len(groups) > 1:
            raise ValueError(
                f"rank {rank}: engine.distribute: your schedule {given[0][i][0]} is not the "
                f"same on every rank: " + "; ".join(
                    f"ranks {rs} " + (f"made {what}" if what.startswith("#") else what)
                    for what, rs in groups.items())
                + "; make your schedules from code that does not depend on the rank")
