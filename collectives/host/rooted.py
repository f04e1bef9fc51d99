"""Collectives with a root: broadcast and reduce (binomial tree for small
buffers, pipelined chain for large ones), gather and scatter (the root talks
to every rank at once: its own link is the bound either way).

Pipelined chain, root = 0, segments s0 s1 s2 ...::

    0 --s0--> 1 --s0--> 2 --s0--> 3        broadcast: each segment is passed on
      --s1-->   --s1-->   ...              as soon as it lands, so the time is
                                           about size/bandwidth + (n-2) segments

reduce runs the chain backwards: the last rank sends, each rank combines its
own segment with the incoming one and passes it on, the root combines last.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..ops import ReduceOp
from ..plan import chain, segments, tree_children, tree_parent
from ..runner import Ctx

__all__ = ["broadcast_tree", "broadcast_chain", "reduce_tree", "reduce_chain",
           "gather_direct", "scatter_direct"]


def _segments(ctx: Ctx, buf: np.ndarray) -> list[tuple[int, int]]:
    per = max(1, ctx.tuning.segment // buf.itemsize)
    return segments(0, buf.size, max(1, -(-buf.size // per)))


def broadcast_tree(ctx: Ctx, buf: np.ndarray, root: int) -> None:
    n, rank = ctx.g.size, ctx.g.rank
    parent = tree_parent(rank, n, root)
    if parent is not None:
        ctx.recv(parent, out=buf)
    reqs = [ctx.isend(buf, c) for c in tree_children(rank, n, root)]
    for req in reqs:
        req.wait()


def broadcast_chain(ctx: Ctx, buf: np.ndarray, root: int) -> None:
    prev, nxt = chain(ctx.g.rank, ctx.g.size, root)
    segs = _segments(ctx, buf)
    recvs = [ctx.irecv(prev, buf[lo:hi]) for lo, hi in segs] if prev is not None else []
    sends = []
    for i, (lo, hi) in enumerate(segs):
        if recvs:
            recvs[i].wait()
        if nxt is not None:
            sends.append(ctx.isend(buf[lo:hi], nxt))
    for req in sends:
        req.wait()


def reduce_tree(ctx: Ctx, buf: np.ndarray, op: ReduceOp, root: int) -> None:
    """Binomial-tree reduce; only the root's ``buf`` changes."""
    n, rank = ctx.g.size, ctx.g.rank
    parent = tree_parent(rank, n, root)
    kids = tree_children(rank, n, root)
    acc = buf if parent is None or not kids else buf.copy()
    tmp = np.empty_like(buf) if kids else None
    for c in reversed(kids):
        op.combine(acc, ctx.recv(c, out=tmp))
    if parent is not None:
        ctx.send(acc, parent)


def reduce_chain(ctx: Ctx, buf: np.ndarray, op: ReduceOp, root: int) -> None:
    """Pipelined chain reduce towards the root; only the root's ``buf``
    changes (the others combine into reused segment buffers)."""
    towards, upstream = chain(ctx.g.rank, ctx.g.size, root)
    segs = _segments(ctx, buf)
    if upstream is None:
        assert towards is not None
        reqs = [ctx.isend(buf[lo:hi], towards) for lo, hi in segs]
        for req in reqs:
            req.wait()
        return
    slots = 2 * ctx.tuning.window
    width = segs[0][1] - segs[0][0]
    scratch = [np.empty(width, buf.dtype) for _ in range(min(slots, len(segs)))]
    busy: list[Any] = [None] * len(scratch)

    def post(i: int) -> Any:
        k = i % len(scratch)
        if busy[k] is not None:
            busy[k].wait()
            busy[k] = None
        lo, hi = segs[i]
        return ctx.irecv(upstream, scratch[k][:hi - lo])

    posted = [post(i) for i in range(len(scratch))]
    for i, (lo, hi) in enumerate(segs):
        got = posted[i % len(scratch)].wait()
        if towards is None:
            op.combine(buf[lo:hi], got)
        else:
            op.combine(got, buf[lo:hi])
            busy[i % len(scratch)] = ctx.isend(got, towards)
        if i + len(scratch) < len(segs):
            posted[i % len(scratch)] = post(i + len(scratch))
    for req in busy:
        if req is not None:
            req.wait()


def gather_direct(ctx: Ctx, buf: np.ndarray, out: np.ndarray | list[np.ndarray] | None,
                  root: int) -> None:
    """Every rank sends its ``buf`` to the root, straight into row i of
    ``out`` (or a list of rows shaped as ``buf``)."""
    n, rank = ctx.g.size, ctx.g.rank
    if rank != root:
        ctx.send(buf, root)
        return
    assert out is not None
    rows = out if isinstance(out, list) else [out[i, ...] for i in range(n)]  # 0-d rows too
    reqs = [ctx.irecv(i, rows[i]) for i in range(n) if i != rank]
    rows[rank][...] = buf.reshape(rows[rank].shape)
    for req in reqs:
        req.wait()


def scatter_direct(ctx: Ctx, src: np.ndarray | list[np.ndarray] | None, out: np.ndarray,
                   root: int) -> None:
    """The root sends row i of ``src`` (or block i of a list: scatter_v's)
    to rank i, received straight into ``out``."""
    n, rank = ctx.g.size, ctx.g.rank
    if rank != root:
        ctx.recv(root, out=out)
        return
    assert src is not None
    order = [(rank + k) % n for k in range(1, n)]
    # (src[i, ...]: a 0-d row stays an array; src[i] would be a numpy scalar,
    # whose dtype drops the metadata naming bfloat16)
    rows = src if isinstance(src, list) else [src[i, ...] for i in range(n)]
    reqs = [ctx.isend(rows[i], i) for i in order]
    out[...] = rows[rank]
    for req in reqs:
        req.wait()

