"""The same-host collectives that reduce (collectives.shm.local):
all_reduce (small: payloads; large: through the arenas or read across),
reduce_scatter (and of n parts), reduce and scan; and ``_small``, the
payload's bound every small form keeps."""
from __future__ import annotations

import numpy as np

from mesh.cma import Pieces
from mesh.rings import fence

from .. import scratch
from ..ops import ReduceOp, apply
from ..plan import ring_chunks, segments
from ..runner import Ctx
from . import board
from .board import CAPACITY, Round
from .cma import failed_read, peer_read, pids

__all__ = ["all_reduce_small", "all_reduce_large", "reduce_scatter", "reduce_scatter_parts",
           "reduce", "scan"]


def _reduce_payloads(ctx: Ctx, buf: np.ndarray, op: ReduceOp, readers: range,
                     outs: list[np.ndarray | None] | None = None,
                     sig: tuple[bytes, int] | None = None, posted: bool = False) -> None:
    """Everyone posts ``buf``; the ranks in ``readers`` read all the others'
    (into ``outs[p]``, made here unless given; ``outs[rank]`` is None) and
    set ``buf`` to the reduction in rank order (the same bits on each).
    ``sig``: the board's signature of the call's fingerprint, if known;
    ``posted``: this rank's post is on the board already (board.Quick)."""
    n, rank = ctx.g.size, ctx.g.rank
    reads = rank in readers
    if reads and outs is None:
        outs = [None if p == rank else np.empty_like(buf) for p in range(n)]
    with Round(ctx, sig) as r:
        if not posted:
            r.post(payload=None if reads and len(readers) == 1 else buf)
        r.gather(outs if reads else None)
    if outs is not None and reads:
        acc = buf if rank == 0 else outs[0]
        assert acc is not None
        for p in range(1, n):
            op.combine(acc, buf if p == rank else outs[p])
        if acc is not buf:
            buf[...] = acc


def all_reduce_small(ctx: Ctx, buf: np.ndarray, op: ReduceOp,
                     outs: list[np.ndarray | None] | None = None,
                     sig: tuple[bytes, int] | None = None, posted: bool = False) -> None:
    """Every rank reads every contribution and reduces them in rank order
    (``outs``, ``sig``, ``posted``: as for _reduce_payloads, from
    collectives.shm.tiny)."""
    _reduce_payloads(ctx, buf, op, range(ctx.g.size), outs, sig, posted)


PIECE = 256 << 10
"""The most bytes ``_reduce_chunk`` reads from a peer at a time: the staging
piece and the output piece it is added into stay in a core's L2 cache (2
MiB here) between the read and the add, while DDP's backward on the same
cores streams its weights through it. A 25 MB all_reduce at 4 ranks on 2
cores spent 9-22% less CPU in its reduction than with the tuning's 1 MiB
segment, and more again below 128 KiB, where the system calls add up
(BENCHMARKS.md, thirty-seventh session)."""


def _reduce_chunk(ctx: Ctx, addrs: list[int], src: np.ndarray, lo: int, hi: int,
                  dst: np.ndarray, op: ReduceOp) -> None:
    """dst = src[lo:hi] (op) every peer's [lo:hi], piece by piece (at most
    the tuning's segment and PIECE) through one warm scratch buffer, peers
    in ring order from rank + 1; the pieces only cut the loop, every item
    is reduced in the same order whatever their size. ``dst`` may be
    ``src[lo:hi]`` itself. Each peer's reads go through one set-up
    ``mesh.cma.Pieces`` and the ufunc is looked up once: the interpreter
    took a fifth of a DDP lane's CPU (25 MB buckets, 4 ranks on 2 cores),
    much of it some 14 calls a piece here (BENCHMARKS.md, forty-eighth
    session)."""
    n, rank, item = ctx.g.size, ctx.g.rank, src.itemsize
    per = max(1, min(ctx.tuning.segment, PIECE) // item)
    bufs = scratch.take(src.dtype, per, 1)
    in_place = np.may_share_memory(dst, src)
    peers = [(rank + k) % n for k in range(1, n)]
    reads = [(p, Pieces(pids(ctx)[p]), addrs[p]) for p in peers]
    ufunc, at = getattr(np, op.ufunc_name), bufs[0].ctypes.data
    for a, b in segments(lo, hi, max(1, -(-(hi - lo) // per))):
        out = dst[a - lo:b - lo]
        if not in_place:
            out[...] = src[a:b]
        tmp = bufs[0][:b - a]
        for p, read, addr in reads:
            err = read(addr + a * item, at, tmp.nbytes)
            if err:
                raise failed_read(ctx, p, err, "the memory") from None
            if out.size == 1:
                op.combine(out, tmp)    # (its one-element form: ReduceOp.combine)
            else:
                apply(ufunc, out, tmp, out)
    scratch.give(bufs)


def all_reduce_large(ctx: Ctx, buf: np.ndarray, op: ReduceOp) -> None:
    """Up to board.ARENA bytes, in a group with more ranks than cores,
    through the arenas (``_through_arenas``), else straight out of the
    peers' buffers (``_read_across``): the arenas' extra copy in pays where
    the buffers sit in the cache (DDP's bucket of a small model, just
    filled) and the CPU a call takes is the others' time, and costs more
    than reading across processes where the buffers do not, or where each
    rank has its core (2 ranks, 4 MiB: 1.2 against 1.0 ms, BENCHMARKS.md,
    branches ddp4 and the eighth session's quiet run)."""
    if buf.nbytes <= board.ARENA and board.crowded(ctx.g.size):
        _through_arenas(ctx, buf, op)
    else:
        _read_across(ctx, buf, op)


def _through_arenas(ctx: Ctx, buf: np.ndarray, op: ReduceOp) -> None:
    """Each rank copies ``buf`` into its arena (collectives.shm.board; all
    but its own chunk, which it reads where it is), reduces chunk ``rank``
    out of every arena into its own (the peers in ring order from rank + 1,
    so each chunk is reduced once: the same bits everywhere), then copies
    every rank's reduced chunk out of its arena::

        copy in | post | reduce chunk r | stage 1 | copy the chunks out | leave

    The peers' arenas are read through their mapped boards with plain
    loads (across processes where a board is not mapped). A rank leaves as
    soon as it has copied: its arena is written again only once the peers
    have left this call (Round.arena), and no peer reads its buffer."""
    n, rank, dt = ctx.g.size, ctx.g.rank, buf.dtype
    ufunc = getattr(np, op.ufunc_name)
    bounds = ring_chunks(buf.size, n)
    lo, hi = bounds[rank]
    with Round(ctx) as r:
        mine = r.arena(dt)
        mine[:lo] = buf[:lo]
        mine[hi:buf.size] = buf[hi:]
        r.post()
        r.gather()
        out = mine[lo:hi]
        tmp = None if board.mapped(ctx.g) else scratch.take(dt, hi - lo, 1)
        part = None if tmp is None else tmp[0]
        first: np.ndarray | None = buf[lo:hi]
        for p in r.peers:
            theirs = r.arena_of(p, dt, lo, hi, part)
            if first is not None:       # out = own (op) the first peer's, as combine orders
                apply(ufunc, first, theirs, out)
                first = None
            else:
                op.combine(out, theirs)
        fence()
        r.stage(1)
        for p in r.peers:
            r.wait_stage([p], 1)
            a, b = bounds[p]
            dst = buf[a:b]
            got = r.arena_of(p, dt, a, b, dst)
            if got is not dst:
                dst[...] = got
        buf[lo:hi] = out
        if tmp is not None:
            scratch.give(tmp)


def _read_across(ctx: Ctx, buf: np.ndarray, op: ReduceOp) -> None:
    """Each rank reduces chunk ``rank`` out of the peers' buffers (read
    across processes), then reads each peer's final chunk::

        post address | reduce chunk r | stage 1 | read the chunks | stage 2 | exit"""
    n, rank, item = ctx.g.size, ctx.g.rank, buf.itemsize
    bounds = ring_chunks(buf.size, n)
    with Round(ctx) as r:
        r.post(addr=buf.ctypes.data)
        addrs = r.gather()
        lo, hi = bounds[rank]
        _reduce_chunk(ctx, addrs, buf, lo, hi, buf[lo:hi], op)
        r.stage(1)
        for p in r.peers:
            r.wait_stage([p], 1)
            a, b = bounds[p]
            if b > a:
                peer_read(ctx, p, addrs[p] + a * item, buf[a:b])
        r.stage(2)
        r.wait_stage(r.peers, 2)


def reduce_scatter(ctx: Ctx, buf: np.ndarray, out: np.ndarray, op: ReduceOp,
                   bounds: list[tuple[int, int]] | None = None,
                   sig: tuple[bytes, int] | None = None, posted: bool = False) -> None:
    """``out`` = this rank's share (chunk ``rank`` of the flat ``buf``; of
    ``bounds``, the n chunks in rank order, where they are uneven:
    reduce_scatter_v) reduced over the group; ``buf`` is left as it was.
    Small (_small): everyone posts ``buf`` as payload and reduces its own
    share out of the peers' (one sync, no reads across processes until
    the payloads are read, no exit wait: 1.9x an all_reduce's time at 4 KiB
    and 4 ranks as the large way, BENCHMARKS.md; ``sig``, ``posted``: as
    for _reduce_payloads, from collectives.shm.tiny). Either way the peers
    in ring order from rank + 1, as _reduce_chunk: the same bits."""
    n, rank = ctx.g.size, ctx.g.rank
    lo, hi = (ring_chunks(buf.size, n) if bounds is None else bounds)[rank]
    if _small(ctx, buf):
        tmp = np.empty(hi - lo, buf.dtype)      # (read into where a board is not mapped)
        with Round(ctx, sig) as r:
            if not posted:
                r.post(payload=buf)
            r.gather()
            out[...] = buf[lo:hi]
            for k in range(1, n):
                op.combine(out, r.payload_part((rank + k) % n, lo * buf.itemsize, tmp))
        return
    with Round(ctx) as r:
        r.post(addr=buf.ctypes.data)
        addrs = r.gather()
        _reduce_chunk(ctx, addrs, buf, lo, hi, out, op)
        r.stage(2)
        r.wait_stage(r.peers, 2)


def reduce_scatter_parts(ctx: Ctx, parts: list[np.ndarray], out: np.ndarray,
                         op: ReduceOp) -> None:
    """reduce_scatter of an array given as its n parts (flat, C-contiguous,
    one dtype; part j is rank j's share, of any size) without joining
    them: each rank posts its parts' addresses as payload and reduces part
    ``rank`` straight out of the peers' (as reduce_scatter reduces chunk
    ``rank``: the same bits). Small (_small, of the parts together):
    joined, then reduce_scatter's payloads."""
    n, rank = ctx.g.size, ctx.g.rank
    whole = sum(p.nbytes for p in parts)
    if whole <= min(ctx.tuning.small, CAPACITY):
        at = np.cumsum([0] + [p.size for p in parts]).tolist()
        reduce_scatter(ctx, np.concatenate(parts), out, op,
                       [(at[j], at[j + 1]) for j in range(n)])
        return
    where = np.array([p.ctypes.data for p in parts], np.int64)
    slot = np.empty(1, np.int64)
    with Round(ctx) as r:
        r.post(payload=where)
        r.gather()
        addrs = [0 if p == rank else int(r.payload_part(p, 8 * rank, slot)[0])
                 for p in range(n)]
        _reduce_chunk(ctx, addrs, parts[rank], 0, parts[rank].size, out, op)
        r.stage(2)
        r.wait_stage(r.peers, 2)



def _small(ctx: Ctx, buf: np.ndarray) -> bool:
    return buf.nbytes <= min(ctx.tuning.small, CAPACITY)


def reduce(ctx: Ctx, buf: np.ndarray, op: ReduceOp, root: int,
           outs: list[np.ndarray | None] | None = None,
           sig: tuple[bytes, int] | None = None, posted: bool = False) -> None:
    """Small: the root reduces the others' payloads (_reduce_payloads;
    ``outs``, ``sig``, ``posted`` its, from collectives.shm.tiny). Large:
    rank c reduces chunk c of everyone's buffer (the root in place, the
    others into a chunk of their own), then the root reads the chunks::

        post (buffer, chunk) | reduce chunk r | stage 1 | root: read chunks, stage 2
    """
    n, rank = ctx.g.size, ctx.g.rank
    if _small(ctx, buf):
        _reduce_payloads(ctx, buf, op, range(root, root + 1), outs, sig, posted)
        return
    bounds = ring_chunks(buf.size, n)
    lo, hi = bounds[rank]
    mine = buf[lo:hi] if rank == root else np.empty(hi - lo, buf.dtype)
    with Round(ctx) as r:
        r.post(addr=buf.ctypes.data, addr2=mine.ctypes.data)
        addrs = r.gather()
        _reduce_chunk(ctx, addrs, buf, lo, hi, mine, op)
        r.stage(1)
        if rank != root:
            r.wait_stage(r.peers, 1)
            r.wait_stage([root], 2)
            return
        for p in r.peers:
            r.wait_stage([p], 1)
            a, b = bounds[p]
            if b > a:
                peer_read(ctx, p, r.addr2[p], buf[a:b])
        r.stage(2)


def scan(ctx: Ctx, buf: np.ndarray, op: ReduceOp, exclusive: bool) -> np.ndarray | None:
    """MPI's Scan of a small ``buf`` (the board's payload): every rank posts
    it, rank r reads ranks 0..r-1's and returns their reduction with its own
    (``exclusive``: without; None on rank 0), a new array. Each element is
    combined as the recursive doubling over sockets combines it (paths.scan:
    the same operands in the same order, so the same bits), from the rows
    at once instead of in log2(size) rounds of messages."""
    n, rank = ctx.g.size, ctx.g.rank
    rows: list[np.ndarray | None] = [np.empty_like(buf) if p < rank else None
                                     for p in range(n)]
    with Round(ctx) as r:
        r.post(payload=buf)
        r.gather(rows)
    rows[rank] = buf
    rounds = max(0, n - 1).bit_length()     # (paths.scan's: while d < n, d doubling from 1)

    def held(k: int, j: int) -> np.ndarray:
        """What rank j holds after k rounds (ranks j-2**k+1..j), a new array."""
        if k == 0:
            row = rows[j]
            assert row is not None
            return row.copy()
        d = 1 << (k - 1)
        mine = held(k - 1, j)
        if j >= d:
            op.combine(mine, held(k - 1, j - d), src_first=True)
        return mine
    if not exclusive:
        return held(rounds, rank)
    before = None
    for k in range(1, rounds + 1):
        d = 1 << (k - 1)
        if rank >= d:
            lower = held(k - 1, rank - d)
            if before is None:
                before = lower
            else:
                op.combine(before, lower, src_first=True)
    return before
