"""Where ``engine.partition`` cuts: layer counts chosen from per-layer costs.

``cut_points`` is the min-max cut (a DP over the cut points:
``balance="parameters"``, and where ``balance="time"`` starts when there
are too many cuts to simulate each). ``balance="time"`` measures each
layer's F, I and W seconds (``_measured``: on a group's first rank,
broadcast, so every rank cuts alike) and keeps the cut whose simulated
step of the schedule is shortest (``_best_simulated``). Pure functions of
the costs but for the measuring, kept apart from the cutting of the model
itself (engine.partition) so each can be read and tested alone.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

from mesh import Comm

from .choose import kept_random, time_layer
from .ir import Schedule
from .replay import replay
from .simulate import _costs
from .stagebuild import as_module, build, is_module
from .torch_stage import TorchStage
from .verify import verify

__all__ = ["cut_points", "uniform_counts"]

_KINDS = ("F", "I", "W")
_EXHAUSTIVE = 400    # simulate every cut when there are at most this many


def cut_points(costs: Sequence[Any], num_stages: int) -> list[int]:
    """Layer counts of the contiguous cut of ``costs`` into ``num_stages``
    non-empty stages whose largest stage sum is smallest (the first such
    cut); costs may be numbers or tuples of numbers (summed item by item,
    compared in order: a tie-break)."""
    n = len(costs)
    vals = [tuple(c) if isinstance(c, tuple) else (c,) for c in costs]
    prefix = [tuple(0 for _ in vals[0])]
    for c in vals:
        prefix.append(tuple(x + y for x, y in zip(prefix[-1], c)))

    def span(j: int, i: int) -> tuple[Any, ...]:
        return tuple(x - y for x, y in zip(prefix[i], prefix[j]))

    best = [span(0, i) for i in range(n + 1)]        # one stage over layers [0, i)
    back: list[list[int]] = [[0] * (n + 1)]
    for k in range(1, num_stages):
        row, arg = list(best), [0] * (n + 1)
        for i in range(k + 1, n + 1):
            choice = min(range(k, i), key=lambda j: (max(best[j], span(j, i)), j))
            row[i], arg[i] = max(best[choice], span(choice, i)), choice
        best = row
        back.append(arg)
    bounds = [n]
    for k in range(num_stages - 1, 0, -1):
        bounds.append(back[k][bounds[-1]])
    bounds.append(0)
    bounds.reverse()
    return [b - a for a, b in zip(bounds, bounds[1:])]


def uniform_counts(n: int, num_stages: int) -> list[int]:
    """Layer counts as equal as they can be, the longer stages last: stage
    s starts at layer ``s * n // num_stages`` (``balance="uniform"``)."""
    return [(s + 1) * n // num_stages - s * n // num_stages for s in range(num_stages)]


def _stage_costs(layer_costs: dict[str, list[float]],
                 counts: Sequence[int]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in ("F", "B", "I", "W")}
    start = 0
    for c in counts:
        for k in _KINDS:
            out[k].append(sum(layer_costs[k][start:start + c]))
        out["B"].append(out["I"][-1] + out["W"][-1])
        start += c
    return out


def _best_simulated(layer_costs: dict[str, list[float]], sched: Schedule) -> list[int]:
    """The cut whose simulated step of ``sched`` is shortest (see the module
    docstring); ties go to the smaller largest stage, then the earlier cut."""
    lowered = verify(sched)
    n, p = len(layer_costs["F"]), sched.num_stages
    per_layer = [sum(layer_costs[k][i] for k in _KINDS) for i in range(n)]

    def key(counts: Sequence[int]) -> tuple[float, float, tuple[int, ...]]:
        run = replay(lowered, _costs(_stage_costs(layer_costs, counts), p))
        bounds = list(itertools.accumulate(counts, initial=0))
        heaviest = max(sum(per_layer[a:b]) for a, b in zip(bounds, bounds[1:]))
        return max((e.end for e in run.events), default=0.0), heaviest, tuple(counts)

    if math.comb(n - 1, p - 1) <= _EXHAUSTIVE:
        cuts = itertools.combinations(range(1, n), p - 1)
        every = [[b - a for a, b in zip((0,) + c, c + (n,))] for c in cuts]
        return list(min(key(c) for c in every)[2])
    best = min(key(c) for c in (cut_points(per_layer, p), uniform_counts(n, p)))
    for _ in range(4 * n):
        moves = []
        for b1, b2 in itertools.combinations_with_replacement(range(p - 1), 2):
            for d1, d2 in ((1, 0), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1)):
                bounds = list(itertools.accumulate(best[2], initial=0))
                bounds[b1 + 1] += d1
                if b2 != b1:
                    bounds[b2 + 1] += d2
                c = [b - a for a, b in zip(bounds, bounds[1:])]
                if min(c) >= 1:
                    moves.append(c)
        top = min((key(c) for c in moves), default=best)
        if top >= best:
            break
        best = top
    return list(best[2])


# -- measuring ---------------------------------------------------------------


def _measured(items: list[Any], kinds: list[str], sample: Any, reps: int,
              group: Any) -> dict[str, list[float]]:
    """Seconds per layer for F, I and W on ``sample`` (engine.choose's
    ``time_layer``), measured on the group's first rank and broadcast (with
    a group; where it cannot measure, no sample or a layer that fails,
    every rank raises: alone, it left the others waiting in the broadcast)."""
    costs: dict[str, list[float]] | None = None
    error: BaseException | None = None
    if group is None or group.rank == 0:
        try:
            if sample is None:
                raise ValueError(f"balance='time' measures each of the {len(items)} layers on "
                                 "a sample micro-batch: pass sample= (with group=, on its "
                                 "first rank, which measures)")
            costs = {k: [] for k in _KINDS}
            x = sample
            with kept_random():     # rank 0's streams as the others': timing draws none
                for item, kind in zip(items, kinds):
                    layer = build(item, kind)
                    if is_module(layer) or not callable(getattr(layer, "backward", None)):
                        layer = TorchStage(as_module(layer))
                    lc, x = time_layer(layer, x, reps)
                    for k in _KINDS:
                        costs[k].append(getattr(lc, k))
        except Exception as e:
            if group is None:
                raise
            error, costs = e, None
    if group is not None:
        import collectives
        told = collectives.broadcast_object(
            group, costs if error is None else f"{type(error).__name__}: {error}", root=0)
        if error is not None:
            raise error
        if isinstance(told, str):
            where = (f"rank {group.ranks[group.rank]}: " if isinstance(group, Comm) else "")
            raise ValueError(f"{where}engine.partition(balance='time') failed on the first "
                             f"rank of its group, which times the layers: {told}")
        costs = told
    assert costs is not None
    return {k: [float(v) for v in costs[k]] for k in _KINDS}
