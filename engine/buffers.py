"""dp replicas' buffers kept equal to replica 0's after each step, as DDP's
``broadcast_buffers`` keeps them.

A buffer a training forward changes (a BatchNorm's running statistics) is
changed by each replica's own micro-batches, so the replicas' copies part:
``job.state_dict()`` gathered replica 0's, while ``eval_step`` ran every
replica on its own, and its loss was no model's (a BatchNorm at dp=2: not
the loss of the state saved, with nothing said). After a step that
succeeded, each module whose buffers changed in it takes replica 0's: one
broadcast per dtype over the dp group. A module's buffers change where
one of their version counters moved (a BatchNorm's running mean is written
by its kernel without moving its own, but its ``num_batches_tracked``
moves); constant ones (a causal mask) never travel.
"""
from __future__ import annotations

from typing import Any, Iterable

import collectives
from mesh import Comm

__all__ = ["ReplicaBuffers"]


class ReplicaBuffers:
    """The buffers of ``modules`` (every torch stage's module of this rank)
    that ``sync`` makes replica 0's over ``dp``; ``mark`` before a step."""

    def __init__(self, dp: Comm | None, modules: Iterable[Any]) -> None:
        self.dp = dp if dp is not None and dp.size > 1 else None
        self.owners = [m for top in modules for m in top.modules()
                       if next(m.buffers(recurse=False), None) is not None] if self.dp else []
        self.versions: list[tuple[int, ...]] = []

    def _now(self) -> list[tuple[int, ...]]:
        return [tuple(b._version for b in m.buffers(recurse=False)) for m in self.owners]

    def mark(self) -> None:
        """Note the buffers' versions before a step."""
        if self.owners:
            self.versions = self._now()

    def sync(self, timeout: float | None = None) -> None:
        """Give every replica replica 0's buffers of the modules whose
        buffers changed since ``mark`` (collective over dp: every replica
        runs the same code, so the same modules' buffers change)."""
        if self.dp is None or not self.owners or not self.versions:
            return
        import torch
        changed = [b for m, was, now in zip(self.owners, self.versions, self._now())
                   if was != now for b in m.buffers(recurse=False)]
        by_dtype: dict[Any, list[Any]] = {}
        for b in changed:
            by_dtype.setdefault(b.dtype, []).append(b)
        for group in by_dtype.values():
            flat = torch.cat([b.detach().reshape(-1) for b in group])
            collectives.broadcast(self.dp, flat, root=0, timeout=timeout)
            with torch.no_grad():
                for b, part in zip(group, flat.split([b.numel() for b in group])):
                    b.copy_(part.view_as(b))
        self.versions = []
