"""Latency-bound collectives: recursive-doubling all_reduce and the
dissemination barrier, each ceil(log2 n) rounds of one message per rank.

Recursive doubling on n = p + r ranks (p a power of two)::

    fold:      rank 2i -> rank 2i+1      for i < r   (odd one combines)
    rounds:    exchange with partner at distance 1, 2, 4 ... among the p
    unfold:    rank 2i+1 -> rank 2i      the result goes back

Both partners of an exchange combine the lower rank's operand first, so
they compute the same bits (operand order matters to rounding: a complex
product a*b and b*a can differ in the last place) and every rank ends with
an identical result.
"""
from __future__ import annotations

import numpy as np

from ..ops import Combines
from ..plan import rd_plan
from ..runner import Ctx

__all__ = ["all_reduce_rd", "barrier_dissemination"]


def all_reduce_rd(ctx: Ctx, buf: np.ndarray, op: Combines) -> None:
    """All-reduce the flat contiguous ``buf`` in place by recursive doubling."""
    n, rank = ctx.g.size, ctx.g.rank
    plan = rd_plan(rank, n)
    if plan.fold_to is not None:
        ctx.send(buf, plan.fold_to)
        ctx.recv(plan.fold_to, out=buf)
        return
    tmp = np.empty_like(buf)
    if plan.fold_from is not None:
        op.combine(buf, ctx.recv(plan.fold_from, out=tmp), src_first=True)
    for peer in plan.partners:
        req = ctx.isend(buf, peer)
        got = ctx.recv(peer, out=tmp)
        req.wait()
        op.combine(buf, got, src_first=peer < rank)
    if plan.fold_from is not None:
        ctx.send(buf, plan.fold_from)


def barrier_dissemination(ctx: Ctx) -> None:
    """Round k: tell rank + 2^k, hear from rank - 2^k. After ceil(log2 n)
    rounds every rank has heard, transitively, from every other."""
    n, rank = ctx.g.size, ctx.g.rank
    d = 1
    while d < n:
        req = ctx.isend(None, (rank + d) % n)
        ctx.recv((rank - d) % n)
        req.wait()
        d <<= 1
