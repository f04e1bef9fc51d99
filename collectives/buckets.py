"""Gradient all-reduce for a training loop: fusion buckets launched as soon
as backward has produced their gradients, so communication overlaps the
rest of backward.

    reducer = collectives.GradReducer(world, grads)    # once: plans buckets
    for step in ...:
        ... backward, last layer first; after each gradient is final:
        reducer.ready(i)            # the bucket holding grads[i] may launch
        reducer.wait()              # grads now hold the average over ranks

Buckets follow backward's order (the last gradients first), hold one dtype
each and about ``bucket_bytes``; their fusion buffers are allocated once
and reused every step.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .api import all_reduce
from .ops import resolve

__all__ = ["DEFAULT_BUCKET_BYTES", "bucket_plan", "GradReducer", "all_reduce_grads"]

DEFAULT_BUCKET_BYTES = 25 << 20


def bucket_plan(sizes: Sequence[int], dtypes: Sequence[Any],
                bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[int]]:
    """Indices of the gradients in each bucket, in launch order: walking the
    list backwards, a bucket closes once it holds ``bucket_bytes`` or the
    next gradient has another dtype. ``sizes`` are in bytes.

    >>> bucket_plan([4, 4, 4, 8], ["f4", "f4", "f4", "f8"], 8)
    [[3], [2, 1], [0]]
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    plan: list[list[int]] = []
    held, dtype = 0, None
    for i in reversed(range(len(sizes))):
        dt = np.dtype(dtypes[i])
        if not plan or held >= bucket_bytes or dt != dtype:
            plan.append([])
            held, dtype = 0, dt
        plan[-1].append(i)
        held += sizes[i]
    return plan


class _Bucket:
    __slots__ = ("members", "buf", "offsets", "pending", "work")

    def __init__(self, members: list[int], grads: Sequence[np.ndarray]) -> None:
        self.members = members
        self.offsets = []
        off = 0
        for i in members:
            self.offsets.append(off)
            off += grads[i].size
        self.buf = np.empty(off, grads[members[0]].dtype)
        self.pending = set(members)
        self.work: Any = None


class GradReducer:
    """All-reduce a fixed list of gradient arrays, bucket by bucket, as they
    become ready; ``wait()`` leaves every gradient averaged (``op="avg"``,
    the default) or summed (``op="sum"``) over the group, in place."""

    def __init__(self, g: Any, grads: Sequence[np.ndarray], bucket_bytes: int =
                 DEFAULT_BUCKET_BYTES, op: str = "avg") -> None:
        self.g = g
        self.grads = list(grads)
        for i, a in enumerate(self.grads):
            if not isinstance(a, np.ndarray) or not a.flags.writeable:
                raise TypeError(f"gradient {i} is not a writable numpy array")
        for a in self.grads:
            resolve(op, a.dtype)
        self.op = op
        plan = bucket_plan([a.nbytes for a in self.grads], [a.dtype for a in self.grads],
                           bucket_bytes)
        self.buckets = [_Bucket(m, self.grads) for m in plan]
        self._where = {i: b for b in self.buckets for i in b.members}

    def ready(self, i: int, grad: np.ndarray | None = None) -> None:
        """Gradient ``i`` is final (``grad`` replaces the array registered for
        it, same shape and dtype). Buckets launch in plan order (the same on
        every rank, as collectives must), each once all its gradients are ready."""
        if grad is not None:
            if grad.shape != self.grads[i].shape or grad.dtype != self.grads[i].dtype:
                raise ValueError(f"gradient {i} was {self.grads[i].dtype}{self.grads[i].shape}, "
                                 f"now {grad.dtype}{grad.shape}")
            self.grads[i] = grad
        self._where[i].pending.discard(i)
        for b in self.buckets:
            if b.pending:
                break
            if b.work is None:
                self._launch(b)

    def _launch(self, b: _Bucket) -> None:
        for i, off in zip(b.members, b.offsets):
            a = self.grads[i]
            b.buf[off:off + a.size] = a.reshape(-1)
        b.work = all_reduce(self.g, b.buf, op=self.op, async_op=True)

    def wait(self) -> None:
        """Launch what is left (in bucket order), wait for every bucket,
        copy the results into the gradients; ready for the next step."""
        for b in self.buckets:
            if b.work is None:
                self._launch(b)
        for b in self.buckets:
            b.work.wait()
            b.work = None
            b.pending = set(b.members)
            for i, off in zip(b.members, b.offsets):
                a = self.grads[i]
                a[...] = b.buf[off:off + a.size].reshape(a.shape)


def all_reduce_grads(g: Any, grads: Sequence[np.ndarray], bucket_bytes: int =
                     DEFAULT_BUCKET_BYTES, op: str = "avg") -> None:
    """All gradients at once through fusion buckets (no overlap with
    backward; build a GradReducer and call ``ready`` for that)."""
    GradReducer(g, grads, bucket_bytes, op).wait()
