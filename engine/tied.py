"""Tied weights: one parameter held by several stages, kept equal.

``engine.partition`` unties a parameter that layers of two stages share (an
embedding and an output head) into one copy per stage, and marks each copy
on its stage object::

    stage.tied = ((Tie("embed.weight", (0, 3)), index), ...)   # index into params()/grads()

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

Equal gradients keep the copies equal only if every copy is stepped: an
optimizer made over ``model.parameters()`` before the cut holds the first
owner's copy and not a later stage's own, and the copies drift apart with
no error (one process's model has one parameter). So before the sum the
owners compare a fingerprint of their copies' bits (an integer sum of
them: exact, in any order; one small all-reduce), and all raise alike
where they differ, naming the tie, its stages and the fix.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

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
        self._ranks = [ranks for _, _, ranks, _ in self._held]   # each tie's owners' pp ranks
        self._done = 0          # the collectives this step made: two a tie with a group

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

    def reduce(self, timeout: float | None = None,
               elsewhere: Callable[[int, int], bool] | None = None) -> None:
        """Check that each tie's copies are still equal (``_check``), then
        sum its gradients over its copies, into every copy. ``elsewhere(s,
        i)``: whether stage s's parameter i holds no values of its own
        here (ZeRO stage 3's placeholder on a replica that does not own it),
        a copy the check leaves out."""
        for (tie, members, group, _), ranks in zip(self.ties, self._ranks):
            held = [(s, i) for s, i in members if elsewhere is None or not elsewhere(s, i)]
            self._check(tie, held, group, ranks, timeout)
            grads = [self.stages[s].grads()[i] for s, i in members]
            total = widened(grads[0])         # (bfloat16: summed in float32, rounded once)
            for g in grads[1:]:
                total += widened(g)
            if group is not None:
                self._done += 1
                collectives.all_reduce(group, total, op="sum", timeout=timeout)
            for g in grads:
                g[...] = total

    def _check(self, tie: Tie, held: list[tuple[int, int]], group: Comm | None,
               ranks: list[int], timeout: float | None) -> None:
        """Raise ValueError, on every owner alike, where the tie's copies
        differ: each owner puts (1, its copies' fingerprint) in its slots
        of a sum over the owners (2 where its own copies differ; 0 where
        it holds no values: ``held``, the copies it holds values of, is empty)."""
        prints = [_fingerprint(self.stages[s].params()[i]) for s, i in held]
        values = [f for f in prints if f is not None]
        n = 1 if group is None else group.size
        me = 0 if group is None else group.rank
        slots = np.zeros(2 * n, dtype=np.int64)
        if values:
            slots[2 * me] = 1 if len(set(values)) == 1 else 2
            slots[2 * me + 1] = values[0]
        if group is not None:
            self._done += 1
            collectives.all_reduce(group, slots, op="sum", timeout=timeout)
        seen = {int(slots[2 * r + 1]) for r in range(n) if slots[2 * r] == 1}
        split = [ranks[r] for r in range(n) if slots[2 * r] == 2]
        if len(seen) < 2 and not split:
            return
        who = f"pp rank {ranks[me]}" if group is None else f"rank {group.ranks[me]}"
        where = (f"pp rank {split[0]} holds copies that differ" if split else
                 f"ranks {group.ranks} (pp ranks {ranks}) hold copies that differ"
                 if group is not None else "")
        raise ValueError(
            f"{who}: tied parameter {tie.name!r} (one parameter of the model, a copy on each of "
            f"stages {list(tie.stages)}) is no longer equal on its stages ({where}) as the "
            "step sums its gradients: something changed some copies only. An optimizer made "
            "over model.parameters() before engine.distribute steps the first stage's copy, "
            "not a later stage's own: make it over job.parameters() (this rank's stages, "
            "each copy included), after distribute; set weights through "
            "job.load_state_dict(), which sets every copy")

    def abandon(self, reason: str, kind: AbortKind, lost: int | None) -> None:
        """Fail the checks and sums this step will not make on the other
        owners (two collectives a tie with a group)."""
        made = self._done
        for _, _, group, _ in self.ties:
            for _ in range(2 if group is not None else 0):
                assert group is not None
                if made:
                    made -= 1
                else:
                    collectives.abandon(group, reason, kind, lost)
        self._done = 2 * sum(group is not None for _, _, group, _ in self.ties)


def _fingerprint(a: Any) -> int | None:
    """The sum of ``a``'s bytes read as int64 words (wrapping; where its
    bytes do not make whole words, its elements read as integers of their
    width): equal bits give equal sums on any host, in any order; None for
    an array with no elements (a freed ZeRO stage 3 copy). Words, not
    elements: torch sums int64 some 15x faster than int32 widened to int64
    (a 50257 x 768 float32 embedding: 12 ms against 220 ms a step)."""
    if not hasattr(a, "numel"):                 # numpy (or CuPy: its own sum, on its device)
        if a.size == 0:
            return None
        flat = a.ravel()
        if a.nbytes % 8 == 0:
            return int(flat.view("i8").sum())
        wide = a.itemsize in (1, 2, 4, 8)
        return int(flat.view(f"i{a.itemsize}" if wide else "i1").sum(dtype="int64"))
    if a.numel() == 0:
        return None
    torch = sys.modules["torch"]
    t = a.detach().contiguous().view(-1)
    if t.numel() * t.element_size() % 8 == 0:
        try:
            words = t.view(torch.int64)
        except RuntimeError:        # (a view whose offset is not a whole word in: a copy's)
            words = t.clone().view(torch.int64)
        return int(words.sum())
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if t.element_size() not in ints:            # (complex128: its bytes)
        t = t.view(torch.int8)
    return int(t.view(ints[t.element_size()]).sum(dtype=torch.int64))
