"""Simulate a lowered schedule on all ranks at once, with per-action costs.

The timing model is the replay's (engine.replay), which follows the
executor; this module adds the costs and sums the replay up: makespan,
bubble, busy time and peak activations per rank. A cost is one number, or
one per stage (``{"F": [1.0, 2.5, 1.0], ...}``: what a partition measured);
``"fixed"`` is a time every F, B, I and W adds, which does not share the
cores when ``cores`` is given (see engine.replay).
"""
from __future__ import annotations

import math
import numbers

from dataclasses import dataclass
from typing import Mapping, Sequence

from .ir import AR, OPT, B, F, I, W, Schedule
from .replay import Cost, Event
from .verify import verified_replay

__all__ = ["SimReport", "simulate", "DEFAULT_COSTS"]

_BUSY = (F, B, I, W, AR, OPT)

DEFAULT_COSTS: dict[str, float] = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0, "send": 0.0,
                                   "recv": 0.0, "AR": 0.0, "OPT": 0.0, "fixed": 0.0}


@dataclass(frozen=True)
class SimReport:
    """What the simulator predicts for one step.

    ``bubble`` is the idle fraction of all ranks over the makespan (compute
    time only counts as busy). ``peak_activations[r]`` is the most
    micro-batches rank r holds activations for at once, counted from F to
    the last action that reads them: B, or W when the backward is split
    (the weight gradient needs the stage's inputs)."""

    makespan: float
    bubble: float
    peak_activations: tuple[int, ...]
    busy: tuple[float, ...]
    events: tuple[Event, ...]

    @property
    def span_bubble(self) -> float:
        """Idle fraction inside each rank's own span, from its first compute
        action to its last: the bubble of back-to-back steps when each rank
        starts the next step as soon as it is done (no flush between steps;
        the zero-bubble paper's measure, under which ZB-H2 has none)."""
        spans: dict[int, list[float]] = {}
        for e in self.events:
            if e.action.kind in _BUSY and e.end > e.start:
                lo, hi, busy = spans.setdefault(e.rank, [e.start, e.end, 0.0])
                spans[e.rank] = [min(lo, e.start), max(hi, e.end), busy + e.end - e.start]
        total = sum(hi - lo for lo, hi, _ in spans.values())
        return 1.0 - sum(b for _, _, b in spans.values()) / total if total else 0.0

    def rank_bubble(self, rank: int) -> float:
        """Idle fraction of one rank over the whole makespan."""
        return 1.0 - self.busy[rank] / self.makespan if self.makespan else 0.0

    def __str__(self) -> str:
        peaks = " ".join(str(n) for n in self.peak_activations)
        return (f"makespan {self.makespan:g}  bubble {self.bubble:.1%} "
                f"(within each rank's span {self.span_bubble:.1%})  "
                f"peak activations per rank [{peaks}]")


def _costs(costs: Mapping[str, Cost] | None, num_stages: int) -> dict[str, Cost]:
    merged: dict[str, Cost] = dict(DEFAULT_COSTS)
    if costs:
        unknown = set(costs) - set(merged)
        if unknown:
            raise ValueError(f"unknown cost keys {sorted(unknown)}; known: {sorted(merged)}")
        for k, v in costs.items():
            if isinstance(v, numbers.Real) and not isinstance(v, bool):
                merged[k] = float(v)
                continue
            if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
                raise ValueError(f"cost {k}={v!r}: a number of seconds (or time units), or "
                                 f"one for each of the {num_stages} stages")
            if len(v) != num_stages:
                raise ValueError(f"cost {k} has {len(v)} per-stage values for "
                                 f"{num_stages} stages")
            merged[k] = tuple(float(x) for x in v)
    for k, v in merged.items():
        values = v if isinstance(v, Sequence) else [v]
        if not all(math.isfinite(x) for x in values):
            raise ValueError(f"cost {k}={v} is not a finite number")
        if min(values) < 0:
            raise ValueError(f"cost {k}={v} is negative")
    return merged


def _peaks(sched: Schedule) -> tuple[int, ...]:
    peaks = []
    for row in sched.ranks:
        live = peak = 0
        for a in row:
            if a.kind == F:
                live += 1
                peak = max(peak, live)
            elif a.kind in (B, W):
                live -= 1
        peaks.append(peak)
    return tuple(peaks)


def simulate(sched: Schedule, costs: Mapping[str, Cost] | None = None,
             cores: float | None = None, load: float = 0.0) -> SimReport:
    """Predict one step of ``sched`` (lowered first if it is compute-only).
    ``cores``: how many ranks can compute at once at full speed, where the
    ranks share fewer cores than they are (engine.replay: processor
    sharing); None, every rank has its own. ``load``: other processes
    that share those cores, in ranks' worth (engine.replay).

    Raises ScheduleError when the schedule is invalid or deadlocks."""
    run = verified_replay(sched, _costs(costs, sched.num_stages), cores, load)
    lowered, events = run.schedule, run.events
    makespan = max((e.end for e in events), default=0.0)
    busy = [0.0] * lowered.num_ranks
    for e in events:
        if e.action.kind in _BUSY:
            busy[e.rank] += e.end - e.start
    total = makespan * lowered.num_ranks
    bubble = 1.0 - sum(busy) / total if total else 0.0
    return SimReport(makespan, bubble, _peaks(lowered), tuple(busy), events)
