"""Tied weights: one parameter held by several stages, kept equal.

``engine.partition`` unties a parameter that layers of two stages share (an
embedding and an output head) into one copy per stage, and marks each copy
on its stage object::

    stage.tied = ((Tie("0.weight", (0, 3)), index), ...)   # index into params()/grads()

A Pipeline reads the marks of its stages (``TiedGrads``): when it is built
it copies the first owner's value to the other copies (a broadcast when
the owners are on different pp ranks), and after each step's backward
passes it sums the copies' gradients over the owners, so every copy holds
the gradient of the one shared parameter and an optimizer keeps them equal.
The sum runs after the dp all-reduces (a sum of averages is the average of
the sums), so a schedule with OPT actions cannot have ties. It sums this
step's gradients only: what the copies held before the step (each the same
sum, from the last one) is set aside by the executor and added back once,
after it, so accumulating over steps (no ``zero_grad()`` between them) adds
the shared parameter's gradient once a step, as torch does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import collectives
from mesh import AbortKind, Comm

from .ir import Schedule
from .torch_stage import widened

__all__ = ["Tie", "TiedGrads"]


@dataclass(frozen=True)
class Tie:
    """A shared parameter: its name in the model and the stages holding a
    copy, the first of which is the source of the value."""

    name: str
    stages: tuple[int, ...]


class TiedGrads:
    """The ties of one pp rank's stages, their marks checked (a ValueError),
    and, once ``join`` made them, the group joining each tie's owner ranks
    (None when this rank holds every copy): made only once every pp rank's
    checks passed, as each rank counts the groups it made of the same ranks."""

    def __init__(self, schedule: Schedule, stages: Mapping[int, Any]) -> None:
        local: dict[Tie, list[tuple[int, int]]] = {}
        for s, stage in sorted(stages.items()):
            for tie, index in getattr(stage, "tied", ()):
                if s not in tie.stages:
                    raise ValueError(f"stage {s} is marked as a copy of tied parameter "
                                     f"{tie.name!r}, held by stages {list(tie.stages)}")
                local.setdefault(tie, []).append((s, int(index)))
        self._held: list[tuple[Tie, list[tuple[int, int]], list[int], int]] = []
        for tie in sorted(local, key=lambda t: t.name):
            held = {s for s, _ in local[tie]}
            bad = [s for s in tie.stages if not 0 <= s < schedule.num_stages
                   or (s in stages and s not in held)]
            if bad:
                raise ValueError(f"tied parameter {tie.name!r} of stages {list(tie.stages)}: "
                                 f"stages {bad} are not in {schedule.name!r} or hold no "
                                 f"marked copy")
            ranks = sorted({schedule.rank_of(s) for s in tie.stages})
            self._held.append((tie, local[tie], ranks,
                               ranks.index(schedule.rank_of(tie.stages[0]))))
        self.ties: list[tuple[Tie, list[tuple[int, int]], Comm | None, int]] = []
        self.stages = stages
        self._done = 0

    def join(self, pp: Comm) -> None:
        """Make each tie's group of its owners' pp ranks (``ties``)."""
        self.ties = [(tie, members, pp.group(ranks) if len(ranks) > 1 else None, root)
                     for tie, members, ranks, root in self._held]

    def __bool__(self) -> bool:
        return bool(self._held)

    def broadcast(self, timeout: float | None = None) -> None:
        """Give every copy the first owner's value."""
        for tie, members, group, root in self.ties:
            params = [self.stages[s].params()[i] for s, i in members]
            source = next((p for (s, _), p in zip(members, params) if s == tie.stages[0]),
                          params[0])
            if group is not None:
                collectives.broadcast(group, source, root=root, timeout=timeout)
            for p in params:
                if p is not source:
                    p[...] = source

    def start(self) -> None:
        """A step begins. The executor has set aside what every gradient
        held before it (``_Step.prior``, added back after ``reduce``), so
        the copies hold this step's gradients only and their sum counts the
        shared parameter's old gradient once, whatever the dp layout (the
        copies, equal after the last step, each held it)."""
        self._done = 0

    def reduce(self, timeout: float | None = None) -> None:
        """Sum each tie's gradients over its copies, into every copy."""
        for _, members, group, _ in self.ties:
            grads = [self.stages[s].grads()[i] for s, i in members]
            total = widened(grads[0])         # (bfloat16: summed in float32, rounded once)
            for g in grads[1:]:
                total += widened(g)
            self._done += 1
            if group is not None:
                collectives.all_reduce(group, total, op="sum", timeout=timeout)
            for g in grads:
                g[...] = total

    def abandon(self, reason: str, kind: AbortKind, lost: int | None) -> None:
        """Fail the sums this step will not make on the other owners."""
        for _, _, group, _ in self.ties[self._done:]:
            if group is not None:
                collectives.abandon(group, reason, kind, lost)
        self._done = len(self.ties)
