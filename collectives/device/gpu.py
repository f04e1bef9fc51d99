"""What the device paths of the collectives share: one call's view of its
device array, and the two CUDA streams it runs on.

Stream semantics, for every device collective (staged or CUDA IPC)::

    caller's current stream:  ...user work... [start]         (recorded at the call)
    up stream:                 waits [start] | H2D copies, reductions, peer copies
    down stream:               waits [start] | D2H copies
    host:                      waits (bounded) for both streams before the call,
                               or its Work.wait(), returns

So a collective sees all the work queued on the caller's current stream
before it was called, and its result is complete on the device when the
call (or ``wait()``) returns: any stream may use it then. Work queued on
the caller's stream after an ``async_op=True`` call is not waited for.
The streams are created once per group and device and reused.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

from mesh import Comm, device

from ..runner import Ctx

__all__ = ["Call", "Lanes", "lanes", "where"]


def where(ctx: Ctx) -> str:
    """How errors name this collective: rank, collective, number, group."""
    return ctx.where()


class Call:
    """One device collective's array, taken in the calling thread: a CuPy
    view of it (never a copy), its device, and the ``start`` event recorded
    on the caller's current stream."""

    def __init__(self, a: Any) -> None:
        self.cp = cp = device.cupy()
        self.arr = device.as_cupy(a)
        self.dev = int(self.arr.device.id)
        with cp.cuda.Device(self.dev):
            self.start = cp.cuda.Event(disable_timing=True)
            self.start.record(cp.cuda.get_current_stream())

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.arr.dtype)

    def flat(self, lanes: "Lanes") -> Any:
        """A flat C-contiguous view of the array; a copy (made on the up
        stream) when the array is not contiguous: ``write_back`` then."""
        if self.arr.flags.c_contiguous:
            return self.arr.reshape(-1)
        with lanes.up:
            return self.cp.ascontiguousarray(self.arr).reshape(-1)

    def write_back(self, lanes: "Lanes", flat: Any) -> None:
        if not self.arr.flags.c_contiguous:
            with lanes.up:
                self.arr[...] = flat.reshape(self.arr.shape)


class Lanes:
    """The up and down streams of one call, both after ``start``."""

    def __init__(self, ctx: Ctx, call: Call, up: Any, down: Any) -> None:
        self.cp, self.up, self.down = call.cp, up, down
        self.ctx = ctx
        self.what = where(ctx)
        up.wait_event(call.start)
        down.wait_event(call.start)

    def event(self, stream: Any) -> Any:
        """A new event recorded on ``stream``."""
        ev = self.cp.cuda.Event(disable_timing=True)
        ev.record(stream)
        return ev

    def wait(self, event: Any) -> None:
        """The host waits (bounded by the call's deadline) for ``event``."""
        device.wait_event(event, self.ctx.left(), self.what)

    def copy(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        """Queue a copy of ``nbytes`` between any two pointers (host, device,
        a peer's device) on ``stream``."""
        if nbytes:
            self.cp.cuda.runtime.memcpyAsync(dst, src, nbytes, device.MEMCPY_DEFAULT, stream.ptr)

    def sync(self) -> None:
        """Wait until everything queued on both streams is done. (The down
        stream first: on tests/fakecupy.py's lazy streams, a copy down that
        did not wait for the up stream's work then reads stale data.)"""
        self.wait(self.event(self.down))
        self.wait(self.event(self.up))


_streams: "weakref.WeakKeyDictionary[Comm, dict[int, tuple[Any, Any]]]" = \
    weakref.WeakKeyDictionary()
_lock = threading.Lock()


def lanes(ctx: Ctx, call: Call) -> Lanes:
    """The group's streams on the call's device (made on first use), set to
    wait for the call's start; the caller holds ``cp.cuda.Device(call.dev)``.
    One group's collectives run one at a time, so its streams are not shared."""
    with _lock:
        per = _streams.setdefault(ctx.g, {})
        pair = per.get(call.dev)
    if pair is None:
        cp = call.cp
        pair = (cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True))
        with _lock:
            per[call.dev] = pair
    return Lanes(ctx, call, *pair)
