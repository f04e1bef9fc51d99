"""The short way's plans (collectives.shm.tiny) of the collectives that
reduce: all_reduce, reduce and reduce_scatter, and what every plan keeps
(``_Short``). Each plan's ``step`` is a call on the board's Quick, and
its ``rest`` the call going on with a Round (collectives.shm.local)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..ops import FP_RAISED, ReduceOp
from ..plan import ring_chunks
from ..runner import Body, Ctx
from . import board
from .local import all_reduce_small, reduce as reduce_small
from .local import reduce_scatter as scatter_small


class _Short:
    """What every short way keeps of one (collective, group, dtype, shape,
    op): the tuning it was settled under, its fingerprint and board
    signature, the group's size and the board's Quick for the payload
    (``sizes``, ``tail``: Quick's, a scatter's; ``items``: Quick's, an
    uneven call's)."""

    __slots__ = ("tuning", "fp", "sig", "n", "quick")

    def __init__(self, ctx: Ctx, arr: np.ndarray, sizes: list[int] | None = None,
                 tail: bytes = b"", items: list[int] | None = None) -> None:
        self.tuning, self.fp = ctx.tuning, ctx.fp
        self.sig = board.signature(ctx.fp)
        self.n = ctx.g.size
        self.quick = board.Quick(ctx.g, arr, self.sig, sizes, tail, items)


class _Plan(_Short):
    """A tiny all_reduce: the op (its ufunc; ``avg``: whether the sum is
    divided) and the peers' receive buffers for a call that goes on with a
    Round."""

    __slots__ = ("rop", "outs", "ufunc", "later", "avg", "one")

    def __init__(self, ctx: Ctx, arr: np.ndarray, rop: ReduceOp) -> None:
        super().__init__(ctx, arr)
        self.rop, n = rop, self.n
        self.outs: list[np.ndarray | None] = [None if p == ctx.g.rank else np.empty_like(arr)
                                              for p in range(n)]
        self.ufunc = getattr(np, rop.ufunc_name)
        self.later = [tuple(views[2:]) for views in self.quick.views]
        self.avg = rop.name == "avg" and n > 1 and arr.size > 0    # (what rop.finish divides)
        # one element: each later combine through a buffer of its own, as
        # ReduceOp.combine's (numpy computes a one-element ufunc whose output
        # is its first operand another way: other bits than the ranks that
        # went on with a Round)
        self.one = np.empty_like(arr) if arr.size == 1 else None

    def step(self, tag: int, a: np.ndarray) -> Body | None:
        """runner.now's step: the call on the board's Quick; None once done,
        else the rest of it on a Round."""
        return self.after(tag, a, self.quick.post(-tag, a))

    def after(self, tag: int, a: np.ndarray, posted: bool) -> Body | None:
        """``step`` once ``a`` is posted (``posted``; else the Round posts
        it): the peers' posts combined, None once done, else the rest of it
        on a Round (runner.post's finish: a persistent start posts, its
        wait finishes)."""
        seq, quick = -tag, self.quick
        if not posted:
            return self.rest(a, False)
        if not quick.arrived(seq):
            return self.rest(a, True)
        slot = seq & 1
        views, f = quick.views[slot], self.ufunc
        try:        # (collectives.ops.apply, inline: the short way's cost)
            f(views[0], views[1], out=a)    # in rank order, as _reduce_payloads combines
        except FP_RAISED:
            pass
        _combine(f, a, self.later[slot], self.one)
        quick.done(seq)
        if self.avg:
            self.rop.finish(a, self.n)
        return None

    def rest(self, buf: np.ndarray, posted: bool) -> Body:
        def run(ctx: Ctx) -> None:
            all_reduce_small(ctx, buf, self.rop, self.outs, self.sig, posted)
            self.rop.finish(buf, self.n)
        return run


class _Reduce(_Plan):
    """A tiny reduce: every rank posts, as the long way's non-roots do
    (its root posts nothing there: a root on the long way beside ranks on
    the short way goes on with a Round, whose gather does not weigh it);
    the root reduces all in rank order, as a tiny all_reduce does."""

    __slots__ = ("root", "rank")

    def __init__(self, ctx: Ctx, arr: np.ndarray, rop: ReduceOp) -> None:
        super().__init__(ctx, arr, rop)
        self.root, self.rank = ctx.fp["root"], ctx.g.rank

    def step(self, tag: int, a: np.ndarray) -> Body | None:
        if self.rank == self.root:
            return super().step(tag, a)
        seq, quick = -tag, self.quick
        if not quick.post(seq, a):
            return self.rest(a, False)
        if not quick.arrived(seq):
            return self.rest(a, True)
        quick.done(seq)
        return None

    def rest(self, buf: np.ndarray, posted: bool) -> Body:
        def run(ctx: Ctx) -> None:
            root = self.rank == self.root
            reduce_small(ctx, buf if root else np.ascontiguousarray(buf), self.rop, self.root,
                         self.outs, self.sig, posted)
            if root:
                self.rop.finish(buf, self.n)
        return run


def _combine(f: Any, acc: np.ndarray, later: tuple[np.ndarray, ...],
             one: np.ndarray | None) -> None:
    """``acc = acc (f) v`` for each of ``later`` in turn, as
    ReduceOp.combine does it (``one``: the buffer of a one-element ``acc``)."""
    for v in later:
        try:
            if one is None:
                f(acc, v, out=acc)
            else:
                f(acc, v, out=one)
        except FP_RAISED:
            pass
        if one is not None:
            acc[...] = one


class _Scatter(_Short):
    """A tiny reduce_scatter (or reduce_scatter_v, its ``bounds`` given):
    the whole array posted, as the long way's small one posts it; this
    rank's chunk of its own post and of the peers' (per slot, ring order
    from rank + 1) as flat views, the shape of its result, the op."""

    __slots__ = ("rop", "ufunc", "avg", "one", "own", "later", "shape", "size", "bounds")

    def __init__(self, ctx: Ctx, arr: np.ndarray, rop: ReduceOp,
                 bounds: list[tuple[int, int]] | None = None) -> None:
        super().__init__(ctx, arr)
        n, rank = self.n, ctx.g.rank
        self.rop, self.ufunc = rop, getattr(np, rop.ufunc_name)
        self.avg = rop.name == "avg"
        self.bounds = ring_chunks(arr.size, n) if bounds is None else bounds
        lo, hi = self.bounds[rank]
        flat = [[v.reshape(-1)[lo:hi] for v in views] for views in self.quick.views]
        self.own = [views[rank] for views in flat]
        self.later = [tuple(views[(rank + k) % n] for k in range(1, n)) for views in flat]
        row = math.prod(arr.shape[1:])      # (reduce_scatter_v's ``bounds``: its parts, flat)
        self.shape = ((hi - lo) // row if bounds is not None else arr.shape[0] // n,) \
            + arr.shape[1:]
        self.size = hi - lo
        self.one = np.empty(1, arr.dtype) if hi - lo == 1 else None

    def step(self, tag: int, arg: tuple[np.ndarray, np.ndarray]) -> Body | None:
        a, out = arg
        seq, quick = -tag, self.quick
        if not quick.post(seq, a):
            return self.rest(a, out, False)
        if not quick.arrived(seq):
            return self.rest(a, out, True)
        slot = seq & 1
        mine = out.reshape(-1)
        mine[...] = self.own[slot]
        _combine(self.ufunc, mine, self.later[slot], self.one)
        quick.done(seq)
        if self.avg:
            self.rop.finish(out, self.n)
        return None

    def rest(self, a: np.ndarray, out: np.ndarray, posted: bool) -> Body:
        def run(ctx: Ctx) -> None:
            scatter_small(ctx, np.ascontiguousarray(a).reshape(-1), out.reshape(-1), self.rop,
                          self.bounds, self.sig, posted)
            self.rop.finish(out, self.n)
        return run
