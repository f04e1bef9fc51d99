"""The candidates simulated again: under load, re-timed, re-costed.

``loaded`` and ``under_load`` simulate the candidates with others'
processes on the shared cores; ``retimed`` the chosen schedule with its
stages timed again in its own order (engine.profiling.time_program),
``recosted`` a candidate with a dry run of its own schedule's costs,
and ``calibrated`` every row of the table as the chosen schedule's
re-time corrects it (``busiest_compute``: the compute on its busiest
rank). engine.distribute calls them after its choice.
"""
from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Mapping, Sequence

from .candidates import Candidate, best_first
from .costs import LayerCost, Span, as_run, helper_charge, stage_costs

__all__ = ["loaded", "under_load", "calibrated", "retimed", "recosted", "busiest_compute"]


def loaded(cand: Candidate, load: float) -> Candidate:
    """``cand`` simulated again with others' processes wanting the cores
    its ranks share (``load``, pp ranks' worth: engine.simulate's; what
    ``Job.retime`` fits to a dry run, engine.measured_choice's ``fitted_load``).
    Where the ranks outnumber the cores a quiet host lends an idle rank's
    core to the others, so a bubble costs little; a loaded one gives it to
    the other processes, so the load slows a schedule whose ranks take
    turns more than one whose ranks compute at once, and the ranking can
    change. Its costs as they are, less the mesh threads' CPU charged to
    its F, B and I (``charge``): the load is fitted to a dry run whose
    mesh threads ran on those cores beside the stages, so it holds that
    CPU already, as ``Job.retime``'s prediction (which charges none) does;
    charged again, the chosen row at eight ranks on two cores was up to
    1.5x the re-time's prediction (1.24x in the median), 2.3-4.2 ms charged
    to actions of 4-9 ms (BENCHMARKS.md, thirty-ninth session). A candidate with a core a rank
    (``cores`` None), where no load is fitted, is as it was."""
    if cand.cores is None or (load == cand.load and not any(cand.charge)):
        return cand
    costs = cand.costs
    if any(cand.charge):
        costs = {k: [c - cand.charge[s] for s, c in enumerate(v)] if k in ("F", "B", "I")
                 else v for k, v in cand.costs.items()}
    rep = cand.schedule.simulate(costs, cand.cores, load)
    return replace(cand, makespan=rep.makespan, bubble=rep.bubble, load=load, costs=costs,
                   charge=())


def under_load(cands: Sequence[Candidate], chosen: Candidate | None, load: float
               ) -> tuple[list[Candidate], Candidate | None]:
    """``cands`` each ``loaded`` with ``load``, best first, and ``chosen``
    (one of them, or None) as loaded: the table's rows and its mark. As
    in engine.distribute's choice, where some rows were costed by their
    own dry run (``measured``) and the best is not, those lead: the
    others' figures are a lower bound. Nothing changes where ``chosen``
    was simulated with ``load`` already."""
    if chosen is None or loaded(chosen, load) is chosen:
        return list(cands), chosen
    again = [loaded(c, load) for c in cands]
    mark = next((a for c, a in zip(cands, again) if c is chosen), None)
    ranked = best_first(again)
    if ranked[0].measured or not any(c.measured for c in ranked):
        return ranked, mark
    return [c for c in ranked if c.measured] + [c for c in ranked if not c.measured], mark


def _compute(cand: Candidate, kind: str, stage: int) -> float:
    """The compute seconds ``cand``'s costs hold for a ``kind`` action of
    ``stage``: its cost less the executor's own time per action
    (``overhead``, unless the ranks share cores: then it is the
    ``"fixed"`` cost) and the mesh threads' CPU (``charge``, but for W)."""
    fixed = "fixed" in cand.costs
    return (cand.costs[kind][stage] - (0.0 if fixed else cand.overhead)
            - (cand.charge[stage] if cand.charge and kind != "W" else 0.0))


def calibrated(cands: Sequence[Candidate], row: Candidate | None, again: Candidate | None,
               helper: float = 0.0) -> tuple[list[Candidate], Candidate | None]:
    """The table's rows as the re-time (``again``: engine.distribute's
    ``job.chosen``, the chosen schedule re-timed as its steps will run)
    corrects the chosen one's (``row``, one of ``cands``, simulated from
    the profile), every row simulated again with what the re-time learned
    (BENCHMARKS.md, forty-third session): each compute action's cost times
    the chosen schedule's busiest rank's re-timed compute over its
    profiled (``busiest_compute``: the stages timed again in the
    schedule's order, stretched by the share of a core the steps get); the
    executor's own time per action, each message's and each receive's
    from the re-time's dry run of the chosen schedule (``overhead``,
    ``send``, ``recv``), the mesh threads' CPU per message end ``helper``
    (``helper_charge``; none where the re-time's stretch holds it); the
    re-time's cores and load; then every row times the re-time's
    prediction over the chosen row so simulated (what the terms leave out:
    its median over runs, a schedule's own overheads), so the chosen row
    is ``job.predicted``. Ranked again as ``under_load`` ranks (rows
    costed by their own dry run first where the best is not).
    ``(list(cands), row)`` where nothing was re-timed."""
    if row is None or again is None or row is again or not any(c is row for c in cands):
        return list(cands), row
    base = busiest_compute(row)
    factor = busiest_compute(again) / base if base > 0 else 1.0
    fixed = again.cores is not None
    send = max(again.costs.get("send") or [0.0])
    recv = max(again.costs.get("recv") or [0.0])

    def simulated(c: Candidate) -> Candidate:
        charge = helper_charge(c.schedule, helper) if helper else [0.0] * len(c.counts)
        costs: dict[str, list[float]] = {
            kind: [_compute(c, kind, s) * factor + (0.0 if fixed else again.overhead)
                   + (charge[s] if kind != "W" else 0.0) for s in range(len(c.costs[kind]))]
            for kind in ("F", "B", "I", "W")}
        n = len(costs["F"])
        costs.update(send=[send] * n, recv=[recv] * n)
        if fixed:
            costs["fixed"] = [again.overhead] * n
        rep = c.schedule.simulate(costs, again.cores, again.load)
        return replace(c, makespan=rep.makespan, bubble=rep.bubble, costs=costs,
                       cores=again.cores, load=again.load, charge=tuple(charge),
                       overhead=again.overhead)

    at = next(i for i, c in enumerate(cands) if c is row)
    rows = [simulated(c) for c in cands]
    rest = again.makespan / rows[at].makespan if rows[at].makespan > 0 else 1.0
    rows = [replace(r, makespan=r.makespan * rest, retimed=(factor, rest)) for r in rows]
    rows[at] = mark = replace(rows[at], makespan=again.makespan)   # (job.predicted, exactly)
    ranked = best_first(rows)
    if not ranked[0].measured and any(c.measured for c in ranked):
        ranked = [c for c in ranked if c.measured] + [c for c in ranked if not c.measured]
    return ranked, mark


def retimed(cand: Candidate, times: Mapping[int, LayerCost], overhead: float = 0.0,
            helper: float = 0.0, send: float | None = None,
            recv: float | None = None,
            runs: Sequence[Mapping[int, LayerCost]] = (),
            cores: float | None = None, load: float = 0.0) -> Candidate:
    """``cand`` simulated again with the stages of ``times`` (stage index:
    its F, B, I and W, timed whole again, e.g. right before the steps) in
    place of their profiled costs, plus ``overhead`` per action and the
    ``helper_charge``; ``send`` and ``recv``, when given, the time of every
    message and the least every receive takes (else the candidate's own);
    the other costs and ``summed`` are kept. With ``runs`` (the stages'
    times of each run of the re-time, every rank's runs paired in order:
    they ran at once), the makespan is the median over the runs of each
    run's simulated step, not the step of the median times: a step waits
    for the slower side at each message, so where the ranks hand work back
    and forth often (two micro-batches, zero-bubble schedules) the median
    step is longer than the step of median actions (quiet ZB-V(2,2): 4-5%,
    each step simulated from its own actions; 1F1B(2,8): none). With
    ``cores`` (fewer than the ranks: engine.simulate's), the ranks share
    that many cores, and ``overhead`` is each action's unshared
    ``"fixed"`` cost instead of a part of its own; ``load``, others'
    processes sharing them too (engine.simulate's)."""
    charge = helper_charge(cand.schedule, helper)
    costs = _with_times(cand.costs, times, overhead, charge, cores is not None)
    if send is not None:
        costs["send"] = [send] * len(costs["send"])
    if recv is not None:
        costs["recv"] = [recv] * len(costs["send"])
    rep = cand.schedule.simulate(costs, cores, load)
    makespan = rep.makespan
    if runs:
        makespan = statistics.median([
            cand.schedule.simulate(_with_times(costs, run, overhead, charge, cores is not None),
                                   cores, load).makespan
            for run in runs])
    return replace(cand, makespan=makespan, bubble=rep.bubble, costs=costs, cores=cores,
                   load=load, charge=tuple(charge), overhead=overhead)


def _with_times(costs: Mapping[str, list[float]], times: Mapping[int, LayerCost],
                overhead: float, charge: Sequence[float], fixed: bool = False
                ) -> dict[str, list[float]]:
    """``costs`` with the stages of ``times`` in place (their F, B, I, W plus
    ``overhead`` and, but for W, the stage's ``charge``; with ``fixed``,
    ``overhead`` goes to the ``"fixed"`` cost instead)."""
    out = {k: list(v) for k, v in costs.items()}
    if fixed:
        out["fixed"] = [overhead] * len(out["F"])
    for st, lc in times.items():
        for kind in ("F", "B", "I", "W"):
            out[kind][st] = (getattr(lc, kind) + (0.0 if fixed else overhead)
                             + (charge[st] if kind != "W" else 0.0))
    return out


def recosted(cand: Candidate, row: dict[int, LayerCost], scale: float = 1.0,
             whole: Mapping[Span, LayerCost] | None = None, overhead: float = 0.0,
             send: float = 0.0, helper: float = 0.0, recv: float = 0.0) -> Candidate:
    """``cand`` simulated again with the executor's costs measured on a dry
    run of its own schedule (``overhead`` per action, ``send`` per message,
    ``recv`` per receive, ``helper`` per message end: engine.calibrate) in
    place of those its micro-batch count's 1F1B dry run gave; its stages
    as ``candidates`` cost them (``row``, ``whole``, ``scale``); marked
    ``measured``."""
    charge = helper_charge(cand.schedule, helper) if helper else None
    run_row, run_whole = as_run(row, whole, cand.recompute, cand.counts)
    costs = stage_costs(run_row, cand.counts, scale, overhead, send, run_whole, charge, recv,
                        cand.cores is not None)
    rep = cand.schedule.simulate(costs, cand.cores, cand.load)
    return replace(cand, makespan=rep.makespan, bubble=rep.bubble, costs=costs, measured=True,
                   charge=tuple(charge or ()), overhead=overhead)


def busiest_compute(cand: Candidate) -> float:
    """Seconds of compute a step on ``cand``'s busiest rank, as its costs
    hold it: its F, B, I and W actions' costs less the executor's own time
    per action (``overhead``) and the mesh threads' CPU (``charge``)."""
    fixed = "fixed" in cand.costs
    most = 0.0
    for program in cand.schedule.ranks:
        most = max(most, sum(cand.costs[a.kind][a.stage] - (0.0 if fixed else cand.overhead)
                             - (cand.charge[a.stage] if cand.charge and a.kind != "W" else 0.0)
                             for a in program if a.kind in ("F", "B", "I", "W")))
    return most
