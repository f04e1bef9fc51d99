"""Simulate a lowered schedule on all ranks at once, with per-action costs.

The timing model is the replay's (engine.replay), which follows the
executor; this module adds the costs and sums the replay up: makespan,
bubble, busy time and peak activations per rank.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from .ir import AR, OPT, B, F, I, W, Schedule
from .replay import Event
from .verify import verified_replay

__all__ = ["SimReport", "simulate", "DEFAULT_COSTS"]

DEFAULT_COSTS: dict[str, float] = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0, "send": 0.0,
                                   "AR": 0.0, "OPT": 0.0}

# A cost may be given per stage: "1F" is stage 1's forward (stages of
# uneven size), and overrides "F" for that stage.
_STAGE_KEY = re.compile(r"^\d+(F|B|I|W|AR|OPT)$")


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

    def rank_bubble(self, rank: int) -> float:
        """Idle fraction of one rank over the whole makespan."""
        return 1.0 - self.busy[rank] / self.makespan if self.makespan else 0.0

    def __str__(self) -> str:
        peaks = " ".join(str(n) for n in self.peak_activations)
        return (f"makespan {self.makespan:g}  bubble {self.bubble:.1%}  "
                f"peak activations per rank [{peaks}]")


def _costs(costs: Mapping[str, float] | None) -> dict[str, float]:
    merged = dict(DEFAULT_COSTS)
    if costs:
        unknown = {k for k in costs if k not in merged and not _STAGE_KEY.match(k)}
        if unknown:
            raise ValueError(f"unknown cost keys {sorted(unknown)}; known: {sorted(merged)}, "
                             "or per stage such as '1F'")
        merged.update({k: float(v) for k, v in costs.items()})
    for k, v in merged.items():
        if v < 0:
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


def simulate(sched: Schedule, costs: Mapping[str, float] | None = None) -> SimReport:
    """Predict one step of ``sched`` (lowered first if it is compute-only).

    Raises ScheduleError when the schedule is invalid or deadlocks."""
    run = verified_replay(sched, _costs(costs))
    lowered, events = run.schedule, run.events
    makespan = max((e.end for e in events), default=0.0)
    busy = [0.0] * lowered.num_ranks
    for e in events:
        if e.action.kind in (F, B, I, W, AR, OPT):
            busy[e.rank] += e.end - e.start
    total = makespan * lowered.num_ranks
    bubble = 1.0 - sum(busy) / total if total else 0.0
    return SimReport(makespan, bubble, _peaks(lowered), tuple(busy), events)
