"""The staged path with overlap: the pipelined ring of collectives.host.ring run
on a device array, its segments moving through reused pinned host buffers
(slots) and every reduction done on the GPU.

The links carry the same messages in the same order as the host ring
(``message_order``); per segment::

    down stream:  D2H   buf[seg] -> slot                  what this rank sends
    sockets:      slot --isend--> right;   left --irecv--> slot
    up stream:    H2D   slot -> scratch;  buf[seg] (op)= scratch    reduce step
                  H2D   slot -> buf[seg]; the slot itself is sent on    store step

A segment reduced at one step and sent at the next goes down again after
its add (the down stream waits for the up stream's event); one that is
only stored is forwarded from its slot with no copy. While segment k is
being reduced, later segments are on the wire and earlier ones on their
way down, so copies, transfers and reductions overlap.

The host waits (bounded) for a slot's down-copy before sending it, and a
slot goes back to the pool with what still reads it (its up-copy's event,
its send); it is taken again only once they are done. So no slot is sent
before its copy has landed or overwritten while a copy or a send reads it.
Because sends leave in link order and each waited for its copy, any region
this rank has sent from is read before a later step overwrites it.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

import numpy as np

from mesh import device

from ..host.ring import message_order
from ..ops import ReduceOp
from ..plan import ring_chunk, ring_chunks, segment_count, segments
from ..runner import Ctx
from .gpu import Lanes

__all__ = ["ring", "slot_count"]


def slot_count(window: int) -> int:
    """Pinned slots one ring needs: up to 2 * window receives posted, and
    up to 2 * window + 1 segments final but not yet sent (copied down a
    window ahead of the link, or received and waiting to be sent on)."""
    return 4 * window + 2


class _Slots:
    """Pinned slots of ``width`` items, reused first in, first out. A slot
    goes back with what still reads it (callables that wait for it), and is
    taken again only after they have returned."""

    def __init__(self, host: np.ndarray, dtype: np.dtype, width: int, count: int) -> None:
        step = width * dtype.itemsize
        self.views = [host[i * step:(i + 1) * step].view(dtype) for i in range(count)]
        self.free: deque[int] = deque(range(count))
        self.pending: list[list[Callable[[], Any]]] = [[] for _ in range(count)]
        self.held: list[list[Callable[[], Any]]] = [[] for _ in range(count)]

    def take(self, what: str) -> int:
        if not self.free:
            raise RuntimeError(f"{what}: no free pinned slot (staging bookkeeping error)")
        i = self.free.popleft()
        for done in self.pending[i]:
            done()
        self.pending[i] = []
        return i

    def hold(self, i: int, wait: Callable[[], Any]) -> None:
        """Slot i, still taken, must also wait for ``wait`` once given back."""
        self.held[i].append(wait)

    def give(self, i: int, *waits: Callable[[], Any]) -> None:
        self.pending[i] = self.held[i] + list(waits)
        self.held[i] = []
        self.free.append(i)

    def drain(self) -> None:
        for i in range(len(self.views)):
            for done in self.pending[i]:
                done()
            self.pending[i] = []

    def ptr(self, i: int) -> int:
        return int(self.views[i].ctypes.data)


def ring(ctx: Ctx, lanes: Lanes, buf: Any, steps: int, reduce_steps: int,
         op: ReduceOp | None, shift: int = 0) -> None:
    """``steps`` ring steps over the flat contiguous device array ``buf``, the
    first ``reduce_steps`` reducing with ``op`` (on the up stream); the same
    (steps, reduce_steps, shift) as collectives.host.ring.ring. Returns with the
    device work still queued on the lanes: the caller syncs them."""
    n, r = ctx.g.size, ctx.g.rank
    if n == 1 or steps == 0 or buf.size == 0:
        return
    cp, item = lanes.cp, buf.itemsize
    lanes.down.wait_event(lanes.event(lanes.up))   # buf may just have been written on up
    left, right = (r - 1) % n, (r + 1) % n
    bounds = ring_chunks(buf.size, n)
    nseg = segment_count(bounds[0][1] - bounds[0][0], item, ctx.tuning.segment)
    width = max(1, -(-(bounds[0][1] - bounds[0][0]) // nseg))
    segs = [segments(lo, hi, nseg) for lo, hi in bounds]
    window = ctx.tuning.window
    order = message_order(steps, nseg, window)
    where = {sj: k for k, sj in enumerate(order)}
    nslots = slot_count(window)
    host = device.POOL.take(nslots * width * item)
    slots = _Slots(host, np.dtype(buf.dtype), width, nslots)
    scratch = [cp.empty(width, buf.dtype) for _ in range(2)] if reduce_steps else []
    ufunc = getattr(cp, op.ufunc_name) if op is not None else None
    base = int(buf.data.ptr)
    # Per message in link order: None (its data is not final yet), DEVICE
    # (final in buf, to be copied down), or (slot, event to wait for or None).
    ready: list[Any] = [_DEVICE if s == 0 else None for s, _ in order]
    sends: list[Any] = []
    next_send = 0
    adds = 0

    def region(k: int, which: int) -> tuple[int, int]:
        s, j = order[k]
        return segs[ring_chunk(r, s, n, shift)[which]][j]

    def down(k: int, after: Any = None) -> None:
        """Queue the copy of message k's region down into a fresh slot."""
        lo, hi = region(k, 0)
        if hi == lo:
            ready[k] = (-1, None)
            return
        i = slots.take(lanes.what)
        if after is not None:
            lanes.down.wait_event(after)
        lanes.copy(slots.ptr(i), base + lo * item, (hi - lo) * item, lanes.down)
        ready[k] = (i, lanes.event(lanes.down))

    def pump() -> None:
        """Send, in link order, every message whose data is final, copying
        the device-resident ones down a window ahead of the link."""
        nonlocal next_send
        while next_send < len(order):
            for k in range(next_send, min(next_send + window, len(order))):
                if ready[k] is _DEVICE:
                    down(k)
            if ready[next_send] is None:
                return
            i, ev = ready[next_send]
            if i >= 0:
                if ev is not None:
                    lanes.wait(ev)
                lo, hi = region(next_send, 0)
                req = ctx.isend(slots.views[i][:hi - lo], right)
                sends.append(req)
                slots.give(i, req.wait)
            next_send += 1

    def post(k: int) -> tuple[int, Any] | None:
        lo, hi = region(k, 1)
        if hi == lo:
            return None
        i = slots.take(lanes.what)
        return i, ctx.irecv(left, slots.views[i][:hi - lo])

    def land(k: int, i: int) -> None:
        """Message k arrived in slot i: reduce or store it on the up stream."""
        nonlocal adds
        s, j = order[k]
        lo, hi = region(k, 1)
        size = (hi - lo) * item
        nxt = where[(s + 1, j)] if s + 1 < steps else None
        if s < reduce_steps:
            assert ufunc is not None
            tmp = scratch[adds % 2][:hi - lo]
            adds += 1
            lanes.copy(int(tmp.data.ptr), slots.ptr(i), size, lanes.up)
            with lanes.up:
                ufunc(buf[lo:hi], tmp, out=buf[lo:hi])
            ev = lanes.event(lanes.up)
            slots.give(i, lambda: lanes.wait(ev))
            if nxt is not None:
                down(nxt, after=ev)
            return
        lanes.copy(base + lo * item, slots.ptr(i), size, lanes.up)
        ev = lanes.event(lanes.up)
        if nxt is None:
            slots.give(i, lambda: lanes.wait(ev))
        else:
            slots.hold(i, lambda: lanes.wait(ev))
            ready[nxt] = (i, None)     # sent on from the slot as received

    ahead = 2 * window
    posted = deque(post(k) for k in range(min(ahead, len(order))))
    pump()
    for k in range(len(order)):
        got = posted.popleft()
        if got is not None:
            i, req = got
            req.wait()
            land(k, i)
        else:       # an empty segment: the same one, sent on at the next step, is empty too
            s, j = order[k]
            if s + 1 < steps:
                ready[where[(s + 1, j)]] = (-1, None)
        if k + ahead < len(order):
            posted.append(post(k + ahead))
        pump()
    for req in sends:
        req.wait()
    slots.drain()
    # Only a ring that ran to the end returns its slots to the pool: after an
    # error, copies or sends may still read them.
    device.POOL.give(host)


_DEVICE = object()
