"""The pipelined ring: the bandwidth-optimal all_reduce, all_gather and
reduce_scatter.

The flat buffer is cut into n chunks (one per rank) and every chunk into the
same number of segments (about ``tuning.segment`` bytes). At each step a rank
sends one chunk to its right neighbour and receives another from its left,
reducing it into its own copy (reduce-scatter steps) or storing it (all-gather
steps); what it receives at one step is what it sends at the next::

    rank r:  send chunk r-s  --->  right        left  --->  recv chunk r-s-1
             (step s)                                       reduce or store

Segments travel in blocks of ``window``: the link carries block b's segments
for step 0, then for step 1, ... and then block b+1, so a segment is sent on
as soon as it is reduced while the next ones are still arriving (send,
receive and reduce overlap), and a rank never has more than ``2 * window``
receives posted, whose reduce-step scratch is reused call after call.
Sends are zero-copy views of the buffer; a region is overwritten only once
the send that read it is done. An empty chunk (an uneven call's zero count)
still sends its first segment, empty, at each step: every link carries the
call's fingerprint at every step, so a rank whose counts differ is seen
and every rank's result waits on it (no message at all left some ranks
returning and the others waiting out their timeout). A link to a rank on another host carries its
segments over a plain TCP stream, received straight into the slot or the
buffer (collectives.host.stream); the rest over the mesh.

An all_reduce may take ``hooks`` (first, final): ``first(lo, hi)`` is called
before this rank's own data in buf[lo:hi] is first sent or reduced into
(step-0 sends a block ahead, in link order), ``final(lo, hi)`` once
buf[lo:hi] holds the result, in ``final_regions`` order. The hierarchical
all_reduce (collectives.host.columns) reduces a region over the host in
``first`` and lets the host read it back after ``final``, so the three
levels overlap segment by segment.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

import numpy as np

from .. import scratch
from ..ops import ReduceOp
from ..plan import ring_chunk, ring_chunks, segment_count, segments
from ..runner import Ctx
from . import stream

__all__ = ["ring", "message_order", "final_regions", "Hooks"]

Hooks = tuple[Callable[[int, int], None], Callable[[int, int], None]]


def message_order(steps: int, nseg: int, window: int) -> list[tuple[int, int]]:
    """The (step, segment) pairs in the order one link carries them: blocks
    of ``window`` segments, each block through every step."""
    order: list[tuple[int, int]] = []
    for b in range(0, nseg, window):
        for s in range(steps):
            order.extend((s, j) for j in range(b, min(b + window, nseg)))
    return order


def _geometry(n: int, count: int, itemsize: int, segment: int, window: int,
              steps: int, bounds: list[tuple[int, int]] | None = None
              ) -> tuple[list[tuple[int, int]], list[list[tuple[int, int]]],
                         list[tuple[int, int]]]:
    """A ring's chunks (``bounds`` where given: the uneven collectives'),
    their segments (as many in each, sized by the largest) and the link's
    message order."""
    bounds = ring_chunks(count, n) if bounds is None else bounds
    nseg = segment_count(max(hi - lo for lo, hi in bounds), itemsize, segment)
    return bounds, [segments(lo, hi, nseg) for lo, hi in bounds], \
        message_order(steps, nseg, window)


def final_regions(n: int, rank: int, count: int, itemsize: int, segment: int,
                  window: int) -> list[tuple[int, int]]:
    """The regions of a ``count``-long all_reduce buffer in the order rank
    ``rank`` of ``n`` calls ``final`` on them (empty ones included): each
    received on the last reduce step or a gather step, in link order."""
    steps = 2 * (n - 1)
    _, segs, order = _geometry(n, count, itemsize, segment, window, steps)
    return [segs[ring_chunk(rank, s, n)[1]][j] for s, j in order if s >= n - 2]


def ring(ctx: Ctx, buf: np.ndarray, op: ReduceOp | None, steps: int, reduce_steps: int,
         shift: int = 0, hooks: Hooks | None = None,
         bounds: list[tuple[int, int]] | None = None) -> None:
    """Run ``steps`` ring steps over the flat contiguous ``buf``, the first
    ``reduce_steps`` of them reducing with ``op``. all_reduce is
    (2(n-1), n-1, shift 0), all_gather (n-1, 0, 0), reduce_scatter
    (n-1, n-1, shift -1, so rank r ends owning chunk r). ``hooks``: an
    all_reduce's (first, final), module docstring. ``bounds``: the n
    chunks, [lo, hi) of ``buf`` in rank order, where they are uneven
    (all_gather_v, reduce_scatter_v: the same on every rank; a chunk may
    be empty), else ``buf`` cut evenly."""
    n, r = ctx.g.size, ctx.g.rank
    if n == 1 or steps == 0:
        return
    left, right = (r - 1) % n, (r + 1) % n
    bounds, segs, order = _geometry(n, buf.size, buf.itemsize, ctx.tuning.segment,
                                    ctx.tuning.window, steps, bounds)
    seg_elems = max(1, ctx.tuning.segment // buf.itemsize)
    links = stream.open_links(ctx, left, right, steps * max(hi - lo for lo, hi in bounds)
                              * buf.itemsize)
    try:
        _run(ctx, buf, op, steps, reduce_steps, shift, seg_elems, segs, order, links, hooks)
    except BaseException:
        if links is not None:
            links.failed = True
        raise
    finally:
        if links is not None:
            links.close()


def _run(ctx: Ctx, buf: np.ndarray, op: ReduceOp | None, steps: int, reduce_steps: int,
         shift: int, seg_elems: int, segs: list[list[tuple[int, int]]],
         order: list[tuple[int, int]], links: "stream.Links | None",
         hooks: Hooks | None) -> None:
    n, r = ctx.g.size, ctx.g.rank
    left, right = (r - 1) % n, (r + 1) % n
    out_stream = links if links is not None and links.out is not None else None
    in_stream = links if links is not None and links.inp is not None else None

    def isend(a: np.ndarray) -> Any:
        return out_stream.isend(a) if out_stream is not None else ctx.isend(a, right)

    def irecv(a: np.ndarray) -> Any:
        return in_stream.irecv(a) if in_stream is not None else ctx.irecv(left, a)
    where = {sj: k for k, sj in enumerate(order)}
    slots = 2 * ctx.tuning.window
    bufs = scratch.take(buf.dtype, seg_elems, slots) if reduce_steps else []
    sending: dict[tuple[int, int], Any] = {}
    sends: list[Any] = []
    first, final = hooks if hooks is not None else (None, None)
    ready = [s == 0 and first is None for s, _ in order]
    next_send = prepared = 0

    def region(k: int, which: int) -> tuple[int, int, tuple[int, int]]:
        s, j = order[k]
        c = ring_chunk(r, s, n, shift)[which]
        lo, hi = segs[c][j]
        return lo, hi, (c, j)

    def pump() -> None:
        """Send, in link order, every message whose data is final."""
        nonlocal next_send
        while next_send < len(order) and ready[next_send]:
            lo, hi, key = region(next_send, 0)
            if hi > lo or key[1] == 0:
                sending[key] = req = isend(buf[lo:hi])
                sends.append(req)
            next_send += 1

    def prepare(upto: int) -> None:
        """first() on this rank's step-0 sends before index ``upto``, each
        sent as soon as it is ready."""
        nonlocal prepared
        assert first is not None
        while prepared < min(upto, len(order)):
            if order[prepared][0] == 0:
                lo, hi, _ = region(prepared, 0)
                first(lo, hi)
                ready[prepared] = True
                pump()
            prepared += 1

    def post(k: int) -> Any:
        lo, hi, key = region(k, 1)
        if hi == lo and key[1]:
            return None
        if order[k][0] < reduce_steps:
            return irecv(bufs[k % slots][:hi - lo])
        prior = sending.pop(key, None)
        if prior is not None:
            prior.wait()
        return irecv(buf[lo:hi])

    posted = deque(post(k) for k in range(min(slots, len(order))))
    if first is not None:
        prepare(slots)
    pump()
    for k, (s, j) in enumerate(order):
        req = posted.popleft()
        lo, hi, _ = region(k, 1)
        if first is not None and s < reduce_steps:
            first(lo, hi)       # while the segment travels
        if req is not None:
            got = req.wait()
            if s < reduce_steps:
                assert op is not None
                op.combine(buf[lo:hi], got)
        if final is not None and s >= reduce_steps - 1:
            final(lo, hi)
        if k + slots < len(order):
            posted.append(post(k + slots))
        if s + 1 < steps:
            ready[where[(s + 1, j)]] = True
            pump()
        if first is not None:
            prepare(k + 1 + slots)
    if links is not None:
        links.arm()
    for req in sends:
        req.wait()
    scratch.give(bufs)
