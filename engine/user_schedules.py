"""A user's own schedules among ``engine.distribute``'s candidates.

A schedule family, ``make(p, m) -> Schedule`` (as the built-in generators
are), is made at each micro-batch count as a built-in's name is
(``Family``: engine.candidates' ``builtin`` calls it where it looks a name
up), each one checked and verified, a failure a row saying why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .ir import Schedule
from .schedules import is_name

__all__ = ["Family", "family_or_name"]


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
