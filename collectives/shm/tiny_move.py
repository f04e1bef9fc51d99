"""The short way's plans (collectives.shm.tiny) of the collectives that
move data and reduce none: broadcast, all_gather, gather, scatter and
all_to_all, and the uneven all_gather_v, gather_v, scatter_v and
all_to_all_v. Each plan's
``step`` is a call on the board's Quick, and its ``rest`` the call going
on with a Round (collectives.shm.local)."""
from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from ..plan import spans
from ..runner import Body, Ctx
from .local import all_gather as gather_small, all_to_all as exchange_small
from .local import all_to_all_v as exchange_v_small
from .local import broadcast as broadcast_small, gather as collect_small
from .local import scatter as deal_small, scatter_meta
from .tiny_reduce import _Short


class _Broadcast(_Short):
    """A tiny broadcast: every rank posts its array (the long way's
    non-roots post nothing: as _Reduce's root), the others copy the root's
    post into theirs."""

    __slots__ = ("root", "rank")

    def __init__(self, ctx: Ctx, arr: np.ndarray, rop: Any = None) -> None:
        super().__init__(ctx, arr)
        self.root, self.rank = ctx.fp["root"], ctx.g.rank

    def step(self, tag: int, a: np.ndarray) -> Body | None:
        seq, quick = -tag, self.quick
        if not quick.post(seq, a):
            return self.rest(a, False)
        if not quick.arrived(seq):
            return self.rest(a, True)
        if self.rank != self.root:
            a[...] = quick.views[seq & 1][self.root]
        quick.done(seq)
        return None

    def rest(self, a: np.ndarray, posted: bool) -> Body:
        def run(ctx: Ctx) -> None:
            buf = a if self.rank != self.root else np.ascontiguousarray(a)
            broadcast_small(ctx, buf.reshape(-1), self.root, self.sig, posted)
        return run


class _Gather(_Short):
    """A tiny all_gather: each rank's post is its row of the result."""

    __slots__ = ("shape", "size")

    def __init__(self, ctx: Ctx, arr: np.ndarray, rop: Any = None) -> None:
        super().__init__(ctx, arr)
        self.shape = (self.n,) + arr.shape
        self.size = self.n * arr.size

    def step(self, tag: int, arg: tuple[np.ndarray, np.ndarray]) -> Body | None:
        a, out = arg
        seq, quick = -tag, self.quick
        if not quick.post(seq, a):
            return self.rest(a, out, False)
        if not quick.arrived(seq):
            return self.rest(a, out, True)
        for p, v in enumerate(quick.views[seq & 1]):
            out[p] = v
        quick.done(seq)
        return None

    def rest(self, a: np.ndarray, out: np.ndarray, posted: bool) -> Body:
        def run(ctx: Ctx) -> None:
            gather_small(ctx, np.ascontiguousarray(a).reshape(-1), out, self.sig, posted)
        return run


class _GatherV(_Short):
    """A tiny all_gather_v: each rank posts its flat rows (``items``: per
    rank, the elements its counts give it), which the others copy into
    that rank's part of the result (``a`` and the parts flat)."""

    __slots__ = ("shape", "size", "bounds")

    def __init__(self, ctx: Ctx, arr: np.ndarray, items: list[int]) -> None:
        super().__init__(ctx, arr, items=items)
        self.size, self.bounds = sum(items), spans(items)
        self.shape = (self.size // math.prod(arr.shape[1:]),) + arr.shape[1:]

    def step(self, tag: int, arg: tuple[np.ndarray, list[np.ndarray]]) -> Body | None:
        a, rows = arg
        seq, quick = -tag, self.quick
        if not quick.post(seq, a):
            return self.rest(a, rows, False)
        if not quick.arrived(seq):
            return self.rest(a, rows, True)
        for row, v in zip(rows, quick.views[seq & 1]):
            row[...] = v
        quick.done(seq)
        return None

    def rest(self, a: np.ndarray, out: Any, posted: bool) -> Body:
        def run(ctx: Ctx) -> None:
            gather_small(ctx, a, out, self.sig, posted)
        return run


class _Collect(_Short):
    """A tiny gather: every rank posts, the root too (the long way's root
    posts nothing: as _Reduce's); the root copies each post into its row."""

    __slots__ = ("root", "rank", "shape", "size", "largest", "bounds")

    def __init__(self, ctx: Ctx, arr: np.ndarray, rop: Any = None,
                 items: list[int] | None = None) -> None:
        super().__init__(ctx, arr, items=items)
        self.root, self.rank = ctx.fp["root"], ctx.g.rank
        self.shape = (self.n,) + arr.shape
        self.size = self.n * arr.size
        # (gather_v's, ``items`` given: the bytes of its largest row, which its
        # Round chooses by; ``a`` and ``out``'s rows flat)
        self.largest = None if items is None else max(items) * arr.itemsize
        self.bounds = None if items is None else spans(items)

    def step(self, tag: int, arg: tuple[np.ndarray, Any]) -> Body | None:
        a, out = arg
        seq, quick = -tag, self.quick
        if not quick.post(seq, a):
            return self.rest(a, out, False)
        if not quick.arrived(seq):
            return self.rest(a, out, True)
        if out is not None:
            for p, v in enumerate(quick.views[seq & 1]):
                out[p][...] = v
        quick.done(seq)
        return None

    def rest(self, a: np.ndarray, out: Any, posted: bool) -> Body:
        def run(ctx: Ctx) -> None:
            collect_small(ctx, np.ascontiguousarray(a).reshape(-1), out, self.root,
                          self.largest, self.sig, posted)
        return run


class _Deal(_Short):
    """A tiny scatter (local.scatter's small form): the root posts its rows
    with their meta after them, the others copy their row out of the
    root's post where its meta is the one they settled (else they go on
    with a Round, which reads any) and say so (stage 2), which the root
    waits for: a rank that refuses the rows (dtype=, shape=) fails the
    root's call too. ``arr``: the root's rows, or off the root an array
    like them. ``counts`` (scatter_v's): rank p's block is counts[p] rows
    of ``arr`` from the sum of the counts before p, in place of row p."""

    __slots__ = ("root", "rank", "shape", "size", "dtype", "meta", "others", "check", "mine",
                 "counts")

    def __init__(self, ctx: Ctx, arr: np.ndarray, check: Any,
                 counts: list[int] | None = None) -> None:
        n, root, rank = ctx.g.size, ctx.fp["root"], ctx.g.rank
        self.meta = scatter_meta(arr.dtype, arr.shape[1:])
        sizes = [0] * n
        sizes[root] = arr.nbytes + len(self.meta)
        super().__init__(ctx, arr, sizes, self.meta if rank == root else b"")
        self.root, self.rank, self.check, self.counts = root, rank, check, counts
        self.others = [p for p in range(n) if p != root]
        if counts is None:
            self.mine = [views[root][rank] for views in self.quick.views]
        else:
            at = sum(counts[:rank])
            self.mine = [views[root][at:at + counts[rank]] for views in self.quick.views]
        self.shape, self.size, self.dtype = self.mine[0].shape, self.mine[0].size, arr.dtype

    def step(self, tag: int, arg: tuple[np.ndarray | None, np.ndarray, bool]) -> Body | None:
        a, out, given = arg
        seq, quick, root = -tag, self.quick, self.root
        if not quick.post(seq, a):
            return self.rest(a, out, given, False)
        if not quick.arrived(seq):
            return self.rest(a, out, given, True)
        if a is not None:
            if not quick.staged(seq, self.others, 2):
                return self.rest(a, out, given, True)
        elif not quick.tails(seq, root, self.meta):
            return self.rest(a, out, given, True)
        else:
            quick.stage(seq, 2)
        out[...] = self.mine[seq & 1]
        quick.done(seq)
        return None

    def rest(self, a: np.ndarray | None, out: np.ndarray, given: bool, posted: bool) -> Body:
        """The call on a Round: off the root, into ``out`` only where the
        caller ``given`` it (the call's check ensures the rows fit it), else
        into an array of the rows the root posted, whatever they are."""
        def run(ctx: Ctx) -> np.ndarray:
            src = None if a is None else np.ascontiguousarray(a)
            return deal_small(ctx, src, self.root, lambda dt, sh: self.check(ctx, dt, sh),
                              out if given or a is not None else None, self.counts,
                              self.sig, posted)
        return run


class _Exchange(_Short):
    """A tiny all_to_all: every rank posts its blocks, and copies block
    ``rank`` of each post into its block of the result."""

    __slots__ = ("rank", "shape", "size", "blocks")

    def __init__(self, ctx: Ctx, arr: np.ndarray, rop: Any = None) -> None:
        super().__init__(ctx, arr)
        n, rank = self.n, ctx.g.rank
        self.rank, self.shape, self.size = rank, arr.shape, arr.size
        m = arr.shape[0] // n
        self.blocks = [[v[rank * m:(rank + 1) * m] for v in views] for views in self.quick.views]

    def step(self, tag: int, arg: tuple[np.ndarray, np.ndarray]) -> Body | None:
        a, out = arg
        seq, quick = -tag, self.quick
        if not quick.post(seq, a):
            return self.rest(a, out, False)
        if not quick.arrived(seq):
            return self.rest(a, out, True)
        mine = out.reshape((self.n, -1) + self.shape[1:])
        for p, v in enumerate(self.blocks[seq & 1]):
            mine[p] = v
        quick.done(seq)
        return None

    def rest(self, a: np.ndarray, out: np.ndarray, posted: bool) -> Body:
        def run(ctx: Ctx) -> None:
            blocks = (self.n, -1)
            exchange_small(ctx, np.ascontiguousarray(a).reshape(blocks), out.reshape(blocks),
                           sig=self.sig, posted=posted)
        return run


class _ExchangeV(_Short):
    """A tiny all_to_all_v (local.all_to_all_v's small form): every rank
    posts its flat rows with its counts after them (its meta), and copies
    its block of each peer's post into its block of the result, once every
    peer's meta is the one this plan settled (``metas``: every rank's, as
    the first call saw them); where one is not (a peer's counts changed, or
    it posted its rows' address), the call goes on with a Round, which
    checks every rank's counts. ``bounds``: the flat [lo, hi) of each
    rank's block in the result (the result's rows: ``shape``)."""

    __slots__ = ("rank", "sends", "recvs", "row", "sizes", "metas", "peers", "blocks", "mine",
                 "bounds", "shape")

    def __init__(self, ctx: Ctx, arr: np.ndarray, sends: list[int], recvs: list[int],
                 metas: list[bytes], sizes: str) -> None:
        row, itemsize = math.prod(arr.shape[1:]), arr.itemsize
        items = [sum(msgpack.unpackb(m)[0]) * row for m in metas]
        super().__init__(ctx, arr, [k * itemsize + len(m) for k, m in zip(items, metas)],
                         metas[ctx.g.rank], items)
        self.rank, rank = ctx.g.rank, ctx.g.rank
        self.sends, self.recvs, self.row, self.sizes, self.metas = sends, recvs, row, sizes, metas
        self.peers = [p for p in range(self.n) if p != rank]
        self.blocks = []       # per slot, (peer, its block for this rank in its post)
        for views in self.quick.views:
            got = []
            for p in self.peers:
                at = sum(msgpack.unpackb(metas[p])[0][:rank]) * row
                got.append((p, views[p][at:at + recvs[p] * row]))
            self.blocks.append(got)
        lo, hi = spans(sends)[rank]
        self.mine = (lo * row, hi * row)
        self.bounds = spans([k * row for k in recvs])
        self.shape = (sum(recvs),) + arr.shape[1:]

    def step(self, tag: int, arg: tuple[np.ndarray, list[np.ndarray]]) -> Body | None:
        a, out = arg
        seq, quick = -tag, self.quick
        if not quick.post(seq, a):
            return self.rest(a, out, False)
        if not quick.arrived(seq):
            return self.rest(a, out, True)
        metas = self.metas
        for p in self.peers:
            if not quick.tails(seq, p, metas[p]):
                return self.rest(a, out, True)
        for p, v in self.blocks[seq & 1]:
            out[p][...] = v
        lo, hi = self.mine
        out[self.rank][...] = a[lo:hi]
        quick.done(seq)
        return None

    def rest(self, a: np.ndarray, out: list[np.ndarray], posted: bool) -> Body:
        def run(ctx: Ctx) -> None:
            exchange_v_small(ctx, a, out, self.sends, self.recvs, self.row, self.sizes,
                             self.sig, posted)
        return run
