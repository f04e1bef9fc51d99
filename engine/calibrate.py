"""What the executor itself costs: per action and per message, measured.

The layer costs engine.choose measures leave out the executor's own work:
the Python around each action (the loop, the trace's clock, posting and
matching messages) and a message's time from one rank's send to its
neighbour's receive (serialisation, the mesh's threads, the OS waking the
receiver). ``calibrate`` runs a dry pipeline, no-op stages handing on an
array of the activation's size, over the pp group and measures both: the
executor's fixed cost per compute action (each rank's step time outside its
receives, over its compute actions) and, given that, the message time that
makes the simulator's step of the dry run as long as the measured one.
engine.distribute adds them to the simulated costs (``overhead`` and
``send`` of engine.choose.candidates), so the prediction covers what a real
step pays besides its layers.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

import collectives
from mesh import Comm

from .executor import Pipeline
from .ir import B, F, I, RECV_B, RECV_F, W
from .schedules import one_f_one_b
from .simulate import simulate

__all__ = ["calibrate"]

_COMPUTE = (F, B, I, W)


class _Noop:
    """A stage that computes nothing and hands on ``out`` both ways."""

    def __init__(self, out: Any) -> None:
        self.out = out

    def forward(self, x: Any) -> tuple[Any, Any]:
        return self.out, None

    def backward(self, ctx: Any, gy: Any) -> Any:
        return self.out

    def params(self) -> list[Any]:
        return []

    def grads(self) -> list[Any]:
        return []


def _busy(events: list[list[Any]], wall: float) -> tuple[float, int]:
    """A rank's step time outside its receives, and its compute actions."""
    waits = sum(e[3] - e[2] for e in events if e[1] in (RECV_F, RECV_B)) / 1e9
    return wall - waits, sum(1 for e in events if e[1] in _COMPUTE)


def calibrate(world: Comm, pp: Comm, m: int, nbytes: int, steps: int = 5,
              tag_base: int = 0, timeout: float | None = None) -> tuple[float, float]:
    """``(seconds per compute action, seconds per message)`` of the executor
    on ``pp`` (1F1B over ``m`` micro-batches, messages of ``nbytes``), the
    medians of ``steps`` dry steps after one to warm up. Collective over
    ``world`` (every pp group of it runs its own dry pipeline): every rank
    gets the same figures."""
    sched = one_f_one_b(pp.size, m)
    act = np.zeros(max(1, nbytes // 8))
    pipe = Pipeline(pp, _Noop(act), sched, loss_fn=lambda y, t: (0.0, y), timeout=timeout,
                    tag_base=tag_base)
    dummy = np.zeros((m, 1))
    rows = []
    for i in range(steps + 1):
        collectives.barrier(world, timeout=timeout)
        t0 = time.time()
        pipe.step(dummy, dummy)
        t1 = time.time()
        if i:
            rows.append((t0, t1, *_busy(pipe.events, t1 - t0)))
    groups: dict[tuple[int, ...], list[Any]] = {}
    for ranks, mine in collectives.all_gather_object(world, (pp.ranks, rows)):
        groups.setdefault(tuple(ranks), []).append(mine)
    per_action, spans = [], []
    for members in groups.values():
        for s in range(steps):
            busy = sum(r[s][2] for r in members)
            count = sum(r[s][3] for r in members)
            per_action.append(busy / max(1, count))
            spans.append(max(r[s][1] for r in members) - min(r[s][0] for r in members))
    action, span = statistics.median(per_action), statistics.median(spans)
    return action, _message_time(sched, action, span)


def _message_time(sched: Any, action: float, span: float) -> float:
    """The message time at which the simulated dry step lasts ``span``
    (0 when the actions alone make it that long): by bisection, the
    simulated step growing with the message time."""
    def predicted(send: float) -> float:
        return simulate(sched, {"F": action, "B": action, "I": action, "W": action,
                                "send": send}).makespan

    if sched.num_ranks == 1 or predicted(0.0) >= span:
        return 0.0
    lo, hi = 0.0, span
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predicted(mid) < span else (lo, mid)
    return (lo + hi) / 2
