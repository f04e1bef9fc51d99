"""The schedule as a text grid: one row per rank, one column per time unit.

Times come from the simulator, so what the grid shows is what the
simulator predicts for the costs given: an action spans ``cost / unit``
cells (its label, then ``-`` cells), and an idle cell, a bubble, is ``.``.
With the default unit costs every action is one cell (not
``simulate()``'s own defaults, whose B is 2: ``engine.show`` draws those)::

    0 | 0F0 0F1  .  0B0  .  0B1
    1 |  .  1F0 1B0 1F1 1B1  .
"""
from __future__ import annotations

import math
from typing import Mapping

from .ir import Schedule
from .replay import Cost
from .simulate import simulate

__all__ = ["render", "UNIT_COSTS"]

UNIT_COSTS: dict[str, float] = {"F": 1.0, "B": 1.0, "I": 1.0, "W": 1.0, "send": 0.0,
                                "AR": 0.0, "OPT": 0.0}

_SHOWN = ("F", "B", "I", "W", "AR", "OPT")


def render(sched: Schedule, costs: Mapping[str, Cost] | None = None,
           cores: float | None = None, load: float = 0.0) -> str:
    """Grid of ``sched`` simulated with ``costs`` (unit costs by default;
    ``cores`` and ``load``: engine.simulate's, the ranks sharing that many
    cores with that many others' processes).

    The time unit is the smallest positive cost of an action shown, so with
    ``{"F": 1, "B": 2}`` a backward takes two cells; or a half, a third...
    of it (down to an eighth) where that puts every action's start and end
    on a cell's edge (``{"send": 0.5}``: an F of two cells). Past that an
    action starts at its nearest cell, after the one before it on its rank:
    every action is shown, in order, though some cells then stretch."""
    merged: dict[str, Cost] = dict(UNIT_COSTS)
    merged.update(costs or {})
    report = simulate(sched, merged, cores, load)
    shown = [e for e in report.events if e.action.kind in _SHOWN and e.end > e.start]
    if not shown:
        return "\n".join(f"{r} |" for r in range(sched.num_ranks))
    unit = _unit(shown)
    width = max(len(str(e.action)) for e in shown)
    placed = []
    free = [0] * sched.num_ranks       # each rank's first cell after its last action
    for e in sorted(shown, key=lambda e: (e.rank, e.start)):
        col = max(math.floor(e.start / unit + 0.5), free[e.rank])
        span = max(1, math.floor((e.end - e.start) / unit + 0.5))
        free[e.rank] = col + span
        placed.append((e, col, span))
    grid = [[".".center(width)] * max(free) for _ in range(sched.num_ranks)]
    for e, col, span in placed:
        grid[e.rank][col] = str(e.action).center(width)
        for c in range(col + 1, col + span):
            grid[e.rank][c] = "-" * width
    pad = len(str(sched.num_ranks - 1))
    return "\n".join(f"{r:>{pad}} | {' '.join(row)}".rstrip() for r, row in enumerate(grid))


def _unit(shown: list) -> float:
    """The cell's time: the shortest action's, or the first of its half,
    third... eighth on whose multiples every start and end falls."""
    shortest = min(e.end - e.start for e in shown)
    for k in range(1, 9):
        unit = shortest / k
        if all(abs(t / unit - round(t / unit)) < 1e-6 for e in shown for t in (e.start, e.end)):
            return unit
    return shortest
