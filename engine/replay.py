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

With ``cores`` (how many ranks can compute at once at full speed: fewer
than the ranks where processes outnumber a host's cores) the ranks share
them: while k ranks are in compute actions, each runs at ``min(1,
cores / k)`` of its speed (processor sharing), so an action that has the
host to itself takes its cost and one that overlaps others' takes longer;
``costs["fixed"]`` is then a time every F, B, I and W adds after its
work, unshared (the executor's own, measured where it ran; without
``cores`` it is simply added to F, B, I and W), and AR and OPT are
unshared waits too (the dp group's all-reduce, timed where it ran). The
walk then goes in time order. ``load``: other processes on the host that
want the cores too, in ranks' worth (others' jobs, fitted to a dry run
before the step: engine.measured_choice.fitted_load), so ``k`` computing
ranks each get ``min(1, cores / (k + load))``: a rank computing alone on a host that
others load gets less than the whole of it, and little more than one that
overlaps (with load 0 the sharing above, unchanged).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

from .ir import (B, F, I, RECV_B, RECV_F, SEND_B, SEND_F, W, Action, MessageKey, Schedule,
                 message_key)

__all__ = ["Event", "Replay", "replay", "Cost"]

Cost = Union[float, Sequence[float]]

_STAGE_WORK = (F, B, I, W)      # the actions ``costs["fixed"]`` is added to


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


def replay(sched: Schedule, costs: Mapping[str, Cost] | None = None,
           cores: float | None = None, load: float = 0.0) -> Replay:
    """Run every rank's list of the lowered ``sched``; an action whose kind
    (or ``"send"``) has no cost in ``costs`` takes no time. ``cores`` and
    ``load``: see the module docstring."""
    c = costs or {}
    if not (math.isfinite(load) and load >= 0):
        raise ValueError(f"load must be a finite number >= 0, got {load}")
    if cores is not None and cores < sched.num_ranks + load:
        return _shared(sched, c, cores, load)
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
                    end = start + _cost(c, a.kind, a.stage) + (
                        _cost(c, "fixed", a.stage) if a.kind in _STAGE_WORK else 0.0)
                events.append(Event(r, pc[r], a, start, end))
                clock[r] = end
                pc[r] += 1
                moved = True
    stuck = {r: pc[r] for r, row in enumerate(sched.ranks) if pc[r] < len(row)}
    return Replay(sched, tuple(events), stuck)


def _shared(sched: Schedule, c: Mapping[str, Cost], cores: float, load: float = 0.0
            ) -> Replay:
    """``replay`` with the ranks sharing ``cores`` (and ``load`` others): at
    every moment each rank in a compute action's work advances at ``min(1,
    cores / (busy + load))``; the walk goes in time order, a rank's next
    action starting when its last one ended (``start[r]``)."""
    if cores <= 0:
        raise ValueError(f"cores must be positive, got {cores}")
    n = sched.num_ranks
    pc = [0] * n
    start = [0.0] * n                    # when rank r's current action started
    arrived: dict[MessageKey, list[float]] = {}
    events: list[Event] = []
    work: dict[int, float] = {}          # rank -> work left in its compute action
    until: dict[int, float] = {}         # rank -> when its wait (a receive, a fixed part) ends
    now = 0.0

    def finish(r: int) -> None:
        events.append(Event(r, pc[r], sched.ranks[r][pc[r]], start[r], now))
        pc[r] += 1
        start[r] = now

    def advance(r: int) -> None:
        """Run rank r's actions that take no time now; stop at one that does."""
        row = sched.ranks[r]
        while pc[r] < len(row) and r not in work and r not in until:
            a = row[pc[r]]
            if a.kind in (SEND_F, SEND_B):
                arrived.setdefault(message_key(a), []).append(now + _cost(c, "send", a.stage))
            elif a.kind in (RECV_F, RECV_B):
                queue = arrived.get(message_key(a))
                if not queue:
                    return               # the send has not happened yet
                end = max(start[r] + _cost(c, "recv", a.stage), queue.pop(0))
                if end > now:
                    until[r] = end
                    return
            elif a.kind not in _STAGE_WORK:       # AR, OPT: waits on the dp group, unshared
                cost = _cost(c, a.kind, a.stage)
                if cost > 0:
                    until[r] = now + cost
                    return
            else:
                cost = _cost(c, a.kind, a.stage)
                if cost > 0:
                    work[r] = cost
                    return
                fixed = _cost(c, "fixed", a.stage)
                if fixed > 0:
                    until[r] = now + fixed
                    return
            finish(r)

    while True:
        before = None
        while before != pc:              # a send can let a receive that waited go on
            before = list(pc)
            for r in range(n):
                advance(r)
        if not work and not until:
            break
        rate = min(1.0, cores / (len(work) + load)) if work else 1.0
        step = min([w / rate for w in work.values()] + [t - now for t in until.values()])
        now += step
        for r in list(work):
            left = work[r] - step * rate
            if left > 1e-12 * max(1.0, work[r]):
                work[r] = left
                continue
            del work[r]
            a = sched.ranks[r][pc[r]]
            fixed = _cost(c, "fixed", a.stage) if a.kind in _STAGE_WORK else 0.0
            if fixed > 0:
                until[r] = now + fixed
            else:
                finish(r)
        for r in [r for r, t in until.items() if t <= now]:
            del until[r]
            finish(r)
    stuck = {r: pc[r] for r, row in enumerate(sched.ranks) if pc[r] < len(row)}
    return Replay(sched, tuple(events), stuck)
