"""Simulate a lowered schedule on all ranks at once, with per-action costs.

The model matches the executor: each rank runs its list in order; a compute
action occupies its rank for its cost; a send costs the sender nothing and
arrives ``costs["send"]`` later; a receive waits until its message has
arrived. Since sends never block, each rank's timeline depends only on its
own list and the arrival times, so ranks are advanced in any order until
all finish or none can move (a deadlock).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .ir import AR, OPT, B, F, I, W, RECV_B, RECV_F, SEND_B, SEND_F, Action, Schedule

__all__ = ["SimReport", "Event", "simulate", "DEFAULT_COSTS", "message_key", "run_ranks"]

DEFAULT_COSTS: dict[str, float] = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0, "send": 0.0,
                                   "AR": 0.0, "OPT": 0.0}

MessageKey = tuple[str, int, int, int]


def message_key(a: Action) -> MessageKey:
    """Identity of the message a SEND/RECV moves: (F|B, from stage, to stage, mb).

    ``1SEND_F3`` and ``2RECV_F3`` both name ("F", 1, 2, 3)."""
    assert a.mb is not None
    if a.kind == SEND_F:
        return (F, a.stage, a.stage + 1, a.mb)
    if a.kind == RECV_F:
        return (F, a.stage - 1, a.stage, a.mb)
    if a.kind == SEND_B:
        return (B, a.stage, a.stage - 1, a.mb)
    if a.kind == RECV_B:
        return (B, a.stage + 1, a.stage, a.mb)
    raise ValueError(f"{a} moves no message")


@dataclass(frozen=True)
class Event:
    """One executed action: which rank, what, and when."""

    rank: int
    index: int
    action: Action
    start: float
    end: float


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
        unknown = set(costs) - set(merged)
        if unknown:
            raise ValueError(f"unknown cost keys {sorted(unknown)}; known: {sorted(merged)}")
        merged.update({k: float(v) for k, v in costs.items()})
    for k, v in merged.items():
        if v < 0:
            raise ValueError(f"cost {k}={v} is negative")
    return merged


def run_ranks(sched: Schedule, costs: Mapping[str, float] | None = None
              ) -> tuple[list[Event], dict[int, int]]:
    """Run every rank's list; return the events and, for ranks that could not
    finish, the index of the receive each is stuck on (empty when none)."""
    c = _costs(costs)
    clock = [0.0] * sched.num_ranks
    pc = [0] * sched.num_ranks
    arrived: dict[MessageKey, list[float]] = {}
    events: list[Event] = []
    moved = True
    while moved:
        moved = False
        for r, row in enumerate(sched.ranks):
            while pc[r] < len(row):
                a = row[pc[r]]
                start = clock[r]
                if a.kind in (SEND_F, SEND_B):
                    arrived.setdefault(message_key(a), []).append(start + c["send"])
                    end = start
                elif a.kind in (RECV_F, RECV_B):
                    queue = arrived.get(message_key(a))
                    if not queue:
                        break
                    end = max(start, queue.pop(0))
                else:
                    end = start + c[a.kind]
                events.append(Event(r, pc[r], a, start, end))
                clock[r] = end
                pc[r] += 1
                moved = True
    stuck = {r: pc[r] for r, row in enumerate(sched.ranks) if pc[r] < len(row)}
    return events, stuck


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
    from .verify import verify
    lowered = verify(sched)
    events, _ = run_ranks(lowered, costs)
    makespan = max((e.end for e in events), default=0.0)
    busy = [0.0] * lowered.num_ranks
    for e in events:
        if e.action.kind in (F, B, I, W, AR, OPT):
            busy[e.rank] += e.end - e.start
    total = makespan * lowered.num_ranks
    bubble = 1.0 - sum(busy) / total if total else 0.0
    return SimReport(makespan, bubble, _peaks(lowered), tuple(busy), tuple(events))
