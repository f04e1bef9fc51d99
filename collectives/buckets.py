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

Gradients are all host (numpy) arrays or all device arrays of one GPU
(CuPy, or anything with ``__cuda_array_interface__`` or DLPack, such as
torch CUDA tensors, reduced in place through a CuPy view). Device buckets
live on that GPU and go through collectives.all_reduce's device paths; the
copies into and out of them run on the current stream, so, as for every
device collective, ``wait()``'s results are ready for work queued after it
on that stream.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import numpy as np

from mesh import device

from .ops import resolve
from .runner import check_comm
from .api import all_reduce   # host arrays, or device ones, each on its path

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

    def __init__(self, members: list[int], grads: Sequence[Any], xp: Any) -> None:
        self.members = members
        self.offsets = []
        off = 0
        for i in members:
            self.offsets.append(off)
            off += grads[i].size
        self.buf = xp.empty(off, grads[members[0]].dtype)
        self.pending = set(members)
        self.work: Any = None


class GradReducer:
    """All-reduce a fixed list of gradient arrays, bucket by bucket, as they
    become ready; ``wait()`` leaves every gradient averaged (``op="avg"``,
    the default) or summed (``op="sum"``) over the group, in place.
    ``timeout`` bounds each bucket's all_reduce (default: the group's)."""

    def __init__(self, g: Any, grads: Sequence[Any], bucket_bytes: int =
                 DEFAULT_BUCKET_BYTES, op: str = "avg", timeout: float | None = None) -> None:
        check_comm(g, "GradReducer")
        self.g = g
        self.timeout = timeout
        self.grads = list(grads)
        self.on_device = bool(self.grads) and device.is_device(self.grads[0])
        for i, a in enumerate(self.grads):
            if device.is_device(a) != self.on_device:
                raise TypeError(f"gradient {i} is a {'host' if self.on_device else 'device'} "
                                f"array and gradient 0 is not: a GradReducer takes all host "
                                f"(numpy) or all device gradients")
            if not self.on_device and (not isinstance(a, np.ndarray) or not a.flags.writeable):
                raise TypeError(f"gradient {i} is not a writable numpy array")
        # What the buckets copy from and back into: the arrays themselves, or
        # CuPy views of device arrays (sharing their memory).
        self._views = [self._view(a) for a in self.grads]
        self._gpu: Any = None
        xp: Any = np
        if self.on_device:
            xp = device.cupy()
            ids = {v.device.id for v in self._views}
            if len(ids) != 1:
                raise ValueError(f"gradients live on GPUs {sorted(ids)}: a GradReducer's "
                                 f"gradients share one GPU")
            self._gpu = ids.pop()
        for v in self._views:
            resolve(op, v.dtype)
        self.op = op
        plan = bucket_plan([v.nbytes for v in self._views], [v.dtype for v in self._views],
                           bucket_bytes)
        with self._on_gpu():
            self.buckets = [_Bucket(m, self._views, xp) for m in plan]
        self._where = {i: b for b in self.buckets for i in b.members}

    def _view(self, a: Any) -> Any:
        return device.as_cupy(a) if self.on_device else a

    def _on_gpu(self) -> Any:
        return device.cupy().cuda.Device(self._gpu) if self.on_device else \
            contextlib.nullcontext()

    def ready(self, i: int, grad: Any = None) -> None:
        """Gradient ``i`` is final (``grad`` replaces the array registered for
        it: same shape and dtype, and host or device as the others). Buckets
        launch in plan order (the same on every rank, as collectives must),
        each once all its gradients are ready."""
        if grad is not None:
            if device.is_device(grad) != self.on_device:
                raise TypeError(f"gradient {i}: a {'host' if self.on_device else 'device'} "
                                f"array replaces a {'device' if self.on_device else 'host'} one")
            old, new = self._views[i], self._view(grad)
            if new.shape != old.shape or new.dtype != old.dtype:
                raise ValueError(f"gradient {i} was {old.dtype}{old.shape}, "
                                 f"now {new.dtype}{new.shape}")
            self.grads[i], self._views[i] = grad, new
        self._where[i].pending.discard(i)
        for b in self.buckets:
            if b.pending:
                break
            if b.work is None:
                self._launch(b)

    def _launch(self, b: _Bucket) -> None:
        with self._on_gpu():
            for i, off in zip(b.members, b.offsets):
                v = self._views[i]
                b.buf[off:off + v.size] = v.reshape(-1)
            b.work = all_reduce(self.g, b.buf, op=self.op, async_op=True, timeout=self.timeout)

    def wait(self) -> None:
        """Launch what is left (in bucket order), wait for every bucket,
        copy the results into the gradients; ready for the next step."""
        for b in self.buckets:
            if b.work is None:
                self._launch(b)
        with self._on_gpu():
            for b in self.buckets:
                b.work.wait()
                b.work = None
                b.pending = set(b.members)
                for i, off in zip(b.members, b.offsets):
                    v = self._views[i]
                    v[...] = b.buf[off:off + v.size].reshape(v.shape)


def all_reduce_grads(g: Any, grads: Sequence[Any], bucket_bytes: int =
                     DEFAULT_BUCKET_BYTES, op: str = "avg", timeout: float | None = None) -> None:
    """All gradients at once through fusion buckets (no overlap with
    backward; build a GradReducer and call ``ready`` for that)."""
    GradReducer(g, grads, bucket_bytes, op, timeout).wait()
