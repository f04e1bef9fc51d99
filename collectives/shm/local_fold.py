"""The same-host collectives of a user-defined op (collectives.userop): on
the board (collectives.shm.board), each rank reads the operands it needs
out of its peers' memory and combines them itself, whole, in rank order,
in Python; one form for all_reduce, reduce, reduce_scatter(_v), scan and
exscan (which ranks' operands a rank folds, and which of their items)::

    post payload or address | read ranks' items [lo, hi) one by one, folding
    x(first) (op) ... (op) x(last) | stage 1 | wait for every peer's stage 1

The last wait is the call's barrier: no rank returns (nor writes an
all_reduce's result into its buffer, which its peers read) before every
rank has read what it needs and every ``fn`` has returned; a rank whose
``fn`` raises fails the call on every rank (``combine`` aborts it before
this rank leaves the round: its peers' waits find the abort)."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .. import scratch
from ..runner import Ctx
from .board import CAPACITY, Round
from .cma import peer_read

__all__ = ["fold"]


def fold(ctx: Ctx, mine: np.ndarray, ranks: Sequence[int], lo: int, hi: int,
         combine: Callable[[np.ndarray, np.ndarray], np.ndarray],
         sig: tuple[bytes, int] | None = None, out: np.ndarray | None = None
         ) -> np.ndarray | None:
    """Post ``mine`` (flat, C-contiguous: this rank's operands, read by its
    peers; a payload up to the tuning's small and CAPACITY, else read
    across processes at its address), and return items [lo, hi) of every
    rank in ``ranks`` (rank order; this one's own among them or not)
    folded left to right, ``combine(a, b)`` leaving ``a (op) b`` in ``b``
    (None where ``ranks`` is empty). ``out``: where the result goes once
    every peer is done (``mine`` itself: an all_reduce's), the operands
    then staged in warm scratch buffers past the payload; else it is a new
    array. ``sig``:
    the board's signature of the call's fingerprint."""
    rank, item = ctx.g.rank, mine.itemsize
    small = mine.nbytes <= min(ctx.tuning.small, CAPACITY)
    bufs = [] if out is None or small or not ranks else scratch.take(mine.dtype, hi - lo, 2)
    free = list(bufs)
    acc: np.ndarray | None = None
    borrowed = False        # acc is this rank's own operand, a view of ``mine``
    with Round(ctx, sig) as r:
        if small:
            r.post(payload=mine)
        else:
            r.post(addr=mine.ctypes.data)
        addrs = r.gather()
        for p in ranks:
            if p == rank and acc is None:
                acc, borrowed = mine[lo:hi], True   # (only read: combine's first operand)
                continue
            got = free.pop() if free else np.empty(hi - lo, mine.dtype)
            if p == rank:
                got[...] = mine[lo:hi]
            elif small:
                part = r.payload_part(p, lo * item, got)
                if part is not got:
                    got[...] = part
            elif hi > lo:
                peer_read(ctx, p, addrs[p] + lo * item, got)
            if acc is None:
                acc = got
                continue
            if not borrowed:
                free.append(acc)
            acc, borrowed = combine(acc, got), False
        r.stage(1)
        r.wait_stage(r.peers, 1)
    if acc is None or out is None:
        return acc.copy() if borrowed and acc is not None else acc
    out[...] = acc
    scratch.give(bufs)
    return out
