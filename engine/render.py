"""The schedule as a text grid: one row per rank, one column per time unit.

Times come from the simulator, so what the grid shows is what the
simulator predicts: an action spans ``cost / unit`` cells (its label, then
``-`` cells), and an idle cell, a bubble, is ``.``. With the default unit
costs every action is one cell::

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
           cores: float | None = None) -> str:
    """Grid of ``sched`` simulated with ``costs`` (unit costs by default;
    ``cores``: engine.simulate's, the ranks sharing that many cores).

    The time unit is the smallest positive cost of an action shown, so with
    ``{"F": 1, "B": 2}`` a backward takes two cells."""
    merged: dict[str, Cost] = dict(UNIT_COSTS)
    merged.update(costs or {})
    report = simulate(sched, merged, cores)
    shown = [e for e in report.events if e.action.kind in _SHOWN and e.end > e.start]
    if not shown:
        return "\n".join(f"{r} |" for r in range(sched.num_ranks))
    unit = min(e.end - e.start for e in shown)
    width = max(len(str(e.action)) for e in shown)
    ncols = max(math.ceil(e.end / unit - 1e-9) for e in shown)
    grid = [[".".center(width)] * ncols for _ in range(sched.num_ranks)]
    for e in shown:
        col = round(e.start / unit)
        span = max(1, round((e.end - e.start) / unit))
        grid[e.rank][col] = str(e.action).center(width)
        for c in range(col + 1, min(col + span, ncols)):
            grid[e.rank][c] = "-" * width
    pad = len(str(sched.num_ranks - 1))
    return "\n".join(f"{r:>{pad}} | {' '.join(row)}".rstrip() for r, row in enumerate(grid))
