"""``engine.distribute``'s ``schedule=`` and ``microbatches=``: checked on
each rank before anything is exchanged (``_schedule_named``), said so the
ranks' lists of candidates can be compared (``_candidates_said``), and
resolved into the schedules to cut, time and rank (``_schedules``: a
Schedule as it is, verified; a name, or a family of yours, at each
micro-batch count; a list of candidates, ``_candidates``), with a row
saying why for each candidate that cannot run (more stages than the
model's layers, more micro-batches than the sample's rows, a name that
does not take that pp and count, a family's that raises or fails
verification), and what became of each of yours said for the
ranks to agree on (engine.user_schedules' ``made_agreed``).
"""
from __future__ import annotations

import hashlib
import numbers
from typing import Any, Sequence

from .choose import SCHEDULES, builtin, microbatch_counts, table, yours
from .ir import Schedule
from .schedules import _NAMES, by_name, is_name
from .user_schedules import Family, family_or_name, made_entry, verified


def _microbatches_checked(microbatches: Any) -> int | None:
    """``microbatches=`` as an int, or None; a ValueError for anything
    but a whole number of at least 1 (or None)."""
    if microbatches is not None and (isinstance(microbatches, bool) or not isinstance(
            microbatches, numbers.Integral) or microbatches < 1):
        raise ValueError(f"microbatches={microbatches!r}: a whole number of at least 1 "
                         "(or None: schedule='auto' tries p, 2p, 4p...)")
    return None if microbatches is None else int(microbatches)


def _schedule_named(schedule: Any, microbatches: int | None) -> None:
    """Refuse a ``schedule=`` that is neither "auto", a built-in's name, a
    Schedule nor a list of candidates (names, "auto", Schedules, families:
    see ``_candidates``) (None, a generator not called: "'NoneType' object
    has no attribute 'lower'"), and ``microbatches=`` other than a
    Schedule's own (which ran with its own count, the one given left
    unsaid)."""
    if isinstance(schedule, (list, tuple)):
        if not schedule:
            raise ValueError("schedule=[]: a list of candidates needs at least one (a name, "
                             "'auto' for every built-in, or an engine.Schedule)")
        for k, item in enumerate(schedule):
            if isinstance(item, (list, tuple)):
                raise TypeError(f"schedule= candidate {k} is a {type(item).__name__}: a list "
                                f"of candidates holds names, engine.Schedule objects and "
                                f"families (make(p, m) -> engine.Schedule)")
            if callable(item) and not isinstance(item, (str, Schedule)):
                continue        # (a family: made at each count, each result checked)
            try:
                _schedule_named(item, None)
            except (TypeError, ValueError) as e:
                raise type(e)(f"schedule= candidate {k}: {e}") from None
    elif isinstance(schedule, Schedule):
        if microbatches is not None and microbatches != schedule.num_microbatches:
            raise ValueError(f"microbatches={microbatches}, but schedule {schedule.name!r} "
                             f"runs {schedule.num_microbatches}: a Schedule's micro-batches "
                             f"are its own (leave microbatches= out, or make it for "
                             f"{microbatches})")
    elif not isinstance(schedule, str):
        name = getattr(schedule, "__name__", None) if callable(schedule) else None
        text = repr(schedule)
        raise TypeError(f"schedule= takes 'auto', a name ({_NAMES}), an engine.Schedule or a "
                        f"list of them, "
                        + (f"not the function {name}: call it, {name}(p, m), or list it, "
                           f"schedule=[{name}], to rank it at each micro-batch count" if name else
                           f"not {text if len(text) <= 60 else type(schedule).__name__}"))
    elif schedule != "auto" and not is_name(schedule):
        text = schedule if len(schedule) <= 40 else schedule[:37] + "..."
        raise ValueError(f"unknown schedule {text!r}: use {_NAMES}, or 'auto'; a schedule "
                         f"of your own is passed as the Schedule itself (engine.Schedule."
                         f"build(...); one saved as JSON: engine.Schedule.from_json(text))")


def _families(given: Sequence[Any]) -> list[Any]:
    """``schedule=[...]`` with each callable read (``family_or_name``): a
    built-in generator as its name, any other a ``Family``."""
    out: list[Any] = []
    for item in given:
        if callable(item) and not isinstance(item, (str, Schedule)):
            item = family_or_name(item, 1 + sum(isinstance(f, Family) for f in out))
        out.append(item)
    return out


def _candidates_said(schedule: Any) -> list[str] | None:
    """What a rank's list of candidates is, to set beside the other ranks'
    (``_same_model``): each name as by_name reads it, each Schedule by its
    name and a digest of its JSON, each family by its name (what each rank
    made of it is set beside the others' too: ``_candidates``' ``made``);
    None for a schedule= that is no list."""
    if not isinstance(schedule, (list, tuple)):
        return None
    said = []
    for item in _families(schedule):
        if isinstance(item, Schedule):
            digest = hashlib.sha1(item.to_json().encode()).hexdigest()[:8]
            said.append(f"Schedule {item.name!r} #{digest}")
        elif isinstance(item, Family):
            said.append(f"family {item.name!r}")
        else:
            said.append(repr(str(item).lower().replace("_", "-")))
    return said


def _candidates(given: Sequence[Any], p: int, ms: Sequence[int], chunks: int, L: int,
                rows: int, made: list[list[str]] | None = None
                ) -> tuple[list[Schedule], list[tuple[str, int, str]]]:
    """``schedule=[...]``'s candidates (``["auto"]``: "auto"'s) and the rows
    of those that cannot run: each name (``"auto"``: every built-in; a
    built-in generator, ``engine.zb_v``: its name) at each count of
    ``ms``, each family (``make(p, m)``: engine.user_schedules' ``Family``)
    at each count as a name is, each result checked and verified, each
    Schedule as it is (its own pp, stages, placement and
    micro-batches: verified, ``yours``); a schedule of more stages than
    ``L`` layers, a name that does not take that p and m, a family's
    that raises or fails verification, or a Schedule of more
    micro-batches than the sample's ``rows``, is a row saying why.
    ``made``: what became of each family's and Schedule's, appended
    (``made_entry``), for the ranks to agree on."""
    given = _families(given)
    names: list[str] = []
    kinds: set[str] = set()         # (a built-in named twice, or by "auto" too: once)
    for item in given:
        for name in (SCHEDULES if item == "auto" else [item]) if isinstance(item, str) else []:
            kind = by_name(name, 1, 1).name.split("(")[0]
            if kind not in kinds:
                kinds.add(kind)
                names.append(name)
    unrun: list[tuple[str, int, str]] = []
    made_here = builtin(names, p, ms, chunks, unrun)
    families = [f for f in given if isinstance(f, Family)]
    theirs: list[tuple[str, int, str]] = []
    own = builtin(families, p, ms, chunks, theirs)
    if made is not None:        # (builtin's order: each count, each family)
        by = {s.name: s for s in own}
        why = {name: text for name, _, text in theirs}
        made.extend(made_entry(by.get(label), label, why.get(label))
                    for m in ms for label in (f"{f.name}({p},{m})" for f in families))
    unrun.extend(theirs)
    scheds = []
    for sched in made_here + own + yours(
            [s for s in given if isinstance(s, Schedule)], p, made):
        m = sched.num_microbatches
        if m > rows:
            unrun.append((sched.name, m, f"{m} micro-batches need a batch of at least {m} "
                                         f"rows; the sample has {rows}"))
        else:
            scheds.append(sched)
    for sched in scheds:
        if sched.num_stages > L:
            unrun.append((sched.name, sched.num_microbatches,
                          f"needs {sched.num_stages} stages, the model has {L} layers"))
    return [s for s in scheds if s.num_stages <= L], unrun


def _schedules(schedule: Any, p: int, L: int, rows: int, microbatches: int | None,
               chunks: int, made: list[list[str]] | None = None
               ) -> tuple[list[Schedule], list[tuple[str, int, str]]]:
    """The schedules ``schedule=`` (checked by ``_schedule_named``) gives at
    pp=``p`` for a model of ``L`` layers and a sample of ``rows`` (0: none),
    before any layer is timed: a Schedule itself (verified), a name's at
    ``microbatches`` or the counts ``microbatch_counts`` tries, or a list's
    candidates (``_candidates``); and the rows of the candidates that cannot
    run. A ValueError where none can. ``made``: what became of each
    Schedule and family of yours (engine.user_schedules' ``made_entry``),
    appended before any raise, for the ranks to agree on (``_same_model``):
    one made otherwise on some ranks fails on every rank, naming them."""
    given = list(schedule) if isinstance(schedule, (list, tuple)) else None
    auto = given is not None or isinstance(schedule, str) and schedule == "auto"
    unrun: list[tuple[str, int, str]] = []
    if isinstance(schedule, Schedule):
        scheds = [verified(schedule, p, made)]   # (before any layer is timed)
    else:
        if microbatches is not None:
            ms = [microbatches]
        else:
            ms = microbatch_counts(p, rows) if rows else [2 * p]
        if not ms:      # fewer rows than pipeline ranks: not even one micro-batch a rank
            raise ValueError(f"{p} micro-batches (one a pipeline rank, the fewest tried at "
                             f"pp={p}) need a batch of at least {p} rows; the sample has "
                             f"{rows}")
        if rows and ms[0] > rows and given is None:
            raise ValueError(f"{ms[0]} micro-batches need a batch of at least {ms[0]} "
                             f"rows; the sample has {rows}")
        if auto:    # each candidate, or the row saying why it cannot run (none timed yet)
            scheds, unrun = _candidates(given or ["auto"], p, ms, chunks, L, rows, made)
            if not scheds:
                raise ValueError("no candidate schedule can run:\n" + table([], None, unrun))
        else:
            assert isinstance(schedule, str)
            by_name(schedule, p, ms[0], chunks)       # an unknown name raises here
            scheds = builtin([schedule], p, ms, chunks)
        if not scheds:
            raise ValueError(f"no schedule {schedule!r} for pp={p} at micro-batch counts "
                             f"{ms}")
    fit = [s for s in scheds if s.num_stages <= L]      # before any layer is timed
    if not fit:
        what = "every candidate schedule needs at least" if auto else \
            f"schedule {scheds[0].name} needs"
        raise ValueError(f"the model has {L} layers: {what} "
                         f"{min(s.num_stages for s in scheds)} pipeline stages on pp={p}, "
                         f"a layer each at least")
    return fit, unrun
