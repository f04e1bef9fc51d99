"""Replay a lowered schedule: walk every rank's list in dependency order.

The one walk behind both the verifier (does every rank finish?) and the
simulator (when does each action run?). It follows the executor: each rank
runs its list in order; a compute action occupies its rank for its cost; a
send costs the sender nothing and arrives ``costs["send"]`` later; a receive
waits until its message has arrived, and takes at least ``costs["recv"]``
(what reading a message still partly in flight costs the receiver). Since sends never block, each rank's
timeline depends only on its own list and the arrival times, so ranks are
advanced in any order until all finish or none can move (a deadlock); which
ranks get stuck does not depend on the costs. A cost is one number for
every stage, or a sequence with one number per stage (a send's is its
sending stage's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence, Union

from .ir import RECV_B, RECV_F, SEND_B, SEND_F, Action, MessageKey, Schedule, message_key

__all__ = ["Event", "Replay", "replay", "Cost"]

Cost = Union[float, Sequence[float]]


@dataclass(frozen=True)
class Event:
    """One executed action: which rank, what, and when."""

    rank: int
    index: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class Replay:
    """The events in the order they ran and, for each rank that could not
    finish, the index of the receive it is stuck on (empty when none)."""

    schedule: Schedule
    events: tuple[Event, ...]
    stuck: Mapping[int, int]


def _cost(costs: Mapping[str, Cost], key: str, stage: int) -> float:
    value = costs.get(key, 0.0)
    return float(value) if isinstance(value, (int, float)) else float(value[stage])


def replay(sched: Schedule, costs: Mapping[str, Cost] | None = None) -> Replay:
    """Run every rank's list of the lowered ``sched``; an action whose kind
    (or ``"send"``) has no cost in ``costs`` takes no time."""
    c = costs or {}
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
                    arrival = start + _cost(c, "send", a.stage)
                    arrived.setdefault(message_key(a), []).append(arrival)
                    end = start
                elif a.kind in (RECV_F, RECV_B):
                    queue = arrived.get(message_key(a))
                    if not queue:
                        break
                    end = max(start + _cost(c, "recv", a.stage), queue.pop(0))
                else:
                    end = start + _cost(c, a.kind, a.stage)
                events.append(Event(r, pc[r], a, start, end))
                clock[r] = end
                pc[r] += 1
                moved = True
    stuck = {r: pc[r] for r, row in enumerate(sched.ranks) if pc[r] < len(row)}
    return Replay(sched, tuple(events), stuck)
