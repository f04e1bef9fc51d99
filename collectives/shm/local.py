"""Collectives between processes of one host: synchronized on the board
(collectives.shm.board), data copied once, straight out of the peers' memory
(collectives.shm.cma). No socket carries data or waits here.

    small all_reduce, all_gather,  post payload | read the peers' | reduce in rank order
      broadcast, gather, reduce    (tiny ones: collectives.shm.tiny's short way, then
                                   these; scatter and all_to_all's too)
    large all_reduce               post address | reduce chunk r from every peer's buffer |
                                   stage 1 | read each peer's final chunk | stage 2 | exit;
                                   up to 8 MiB where ranks outnumber cores: copy into the
                                   arena | post | reduce chunk r
                                   from every arena | stage 1 | copy each arena's final chunk
    large reduce                   post addresses | reduce chunk r | stage 1 | root reads chunks
    small reduce_scatter           post payload | reduce chunk r of the peers' payloads
    small scan, exscan             post payload | read ranks 0..r-1's | combine them as
                                   recursive doubling over sockets would
    reduce_scatter                 post address | reduce chunk r | stage 2 | exit
    reduce_scatter of n parts      post the parts' addresses | reduce part r | stage 2 | exit
    small scatter                  root: post rows and meta | the others copy their row | stage 2
    small all_to_all               post payload | copy block r of each peer's
    large broadcast, gather,       post address | read what this rank needs | stage 2 | exit
      all_gather, scatter, all_to_all

"Exit" waits until every peer that reads this rank's buffer has said stage 2,
so a buffer is never changed or freed under a reader (an arena is written
again only once the peers have left the call that read it). Every reduction
runs in a fixed order (rank order, or ring order from the chunk's owner for the
owner alone), so all ranks get the same bits.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import msgpack
import numpy as np

from mesh.rings import fence
from mesh.tensors import BFLOAT16, dtype_name

from .. import scratch
from ..ops import ReduceOp, apply
from ..plan import ring_chunks, segments
from ..runner import Ctx
from . import board
from .board import CAPACITY, Round
from .cma import peer_read

__all__ = ["all_reduce_small", "all_reduce_large", "barrier", "all_gather", "reduce_scatter",
           "reduce_scatter_parts", "broadcast", "reduce", "scatter", "gather", "all_to_all",
           "scan"]


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


def barrier(ctx: Ctx) -> None:
    with Round(ctx) as r:
        r.post()
        r.gather()


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
    ``src[lo:hi]`` itself."""
    n, rank, item = ctx.g.size, ctx.g.rank, src.itemsize
    per = max(1, min(ctx.tuning.segment, PIECE) // item)
    bufs = scratch.take(src.dtype, per, 1)
    in_place = np.may_share_memory(dst, src)
    for a, b in segments(lo, hi, max(1, -(-(hi - lo) // per))):
        out = dst[a - lo:b - lo]
        if not in_place:
            out[...] = src[a:b]
        tmp = bufs[0][:b - a]
        for k in range(1, n):
            p = (rank + k) % n
            peer_read(ctx, p, addrs[p] + a * item, tmp)
            op.combine(out, tmp)
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


def _flat_rows(out: np.ndarray | list[np.ndarray], n: int) -> list[Any]:
    """``out``'s n rows (an array's, or a list of contiguous arrays), flat."""
    return [o.reshape(-1) for o in out] if isinstance(out, list) else list(out.reshape(n, -1))


def all_gather(ctx: Ctx, buf: np.ndarray, out: np.ndarray | list[np.ndarray],
               sig: tuple[bytes, int] | None = None, posted: bool = False) -> None:
    """Row p of ``out`` (rows of buf.size; or a list of them, which may
    differ in size: all_gather_v's, each rank's ``buf`` the size of its
    own) = rank p's flat ``buf``. As payloads where the largest row is
    small (the same choice on every rank; ``sig``, ``posted``: as for
    _reduce_payloads, from collectives.shm.tiny), else read across."""
    rows = _flat_rows(out, ctx.g.size)
    rows[ctx.g.rank][...] = buf
    with Round(ctx, sig) as r:
        if _small(ctx, max(rows, key=lambda row: row.nbytes)):
            if not posted:
                r.post(payload=buf)
            r.gather(rows)
            return
        r.post(addr=buf.ctypes.data)
        addrs = r.gather()
        for p in r.peers:
            if rows[p].size:
                peer_read(ctx, p, addrs[p], rows[p])
        r.stage(2)
        r.wait_stage(r.peers, 2)


def _small(ctx: Ctx, buf: np.ndarray) -> bool:
    return buf.nbytes <= min(ctx.tuning.small, CAPACITY)


def broadcast(ctx: Ctx, buf: np.ndarray, root: int, sig: tuple[bytes, int] | None = None,
              posted: bool = False) -> None:
    """Small: the root posts its buffer as payload, the others copy it (one
    sync; the acks keep the slot until all have; ``sig``, ``posted``: as
    for _reduce_payloads, from collectives.shm.tiny). Large: the others
    read the root's buffer, which the root holds until they say so."""
    is_root = ctx.g.rank == root
    with Round(ctx, sig) as r:
        if _small(ctx, buf):
            if not posted:
                r.post(payload=buf if is_root else None)
            r.gather(None if is_root else [buf if p == root else None
                                           for p in range(ctx.g.size)])
            return
        r.post(addr=buf.ctypes.data)
        addrs = r.gather()
        if is_root:
            r.wait_stage(r.peers, 2)
            return
        if buf.size:
            peer_read(ctx, root, addrs[root], buf)
        r.stage(2)


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


def scatter_meta(dtype: np.dtype, row: tuple[int, ...]) -> bytes:
    """What a scatter's root posts of its rows: their dtype (bfloat16's
    named) and shape past the first axis, as msgpack."""
    return msgpack.packb([dtype.str, list(row), dtype_name(dtype) == "bfloat16"])


def scatter(ctx: Ctx, src: np.ndarray | None, root: int,
            check: Callable[[np.dtype, tuple[int, ...]], None] | None = None,
            out: np.ndarray | None = None, counts: list[int] | None = None,
            sig: tuple[bytes, int] | None = None, posted: bool = False) -> np.ndarray:
    """Rank p gets row p of the root's ``src`` (shaped (n, ...)) into
    ``out`` (given: the row's dtype and shape, which ``check`` ensures) or a
    new array; the root posts the rows' dtype and shape (scatter_meta).
    Small (_small, with the meta): the rows as payload, the meta after them
    (its bytes in ``addr2``, ``addr`` 0), which each rank copies its row
    out of (``sig``, ``posted``: as for _reduce_payloads, from
    collectives.shm.tiny); else the meta as payload with the buffer's
    address, which each rank reads its row from. ``check(dtype, shape)``
    may refuse the rows before a byte is read; the root waits for every
    reader (stage 2), so its raise fails the root's call too. ``counts``
    (scatter_v's): rank p gets counts[p] rows of ``src`` (C-contiguous,
    sum(counts) rows) from the sum of the counts before p."""
    rank = ctx.g.rank
    before = 0 if counts is None else sum(counts[:rank])
    with Round(ctx, sig) as r:
        if src is not None:
            meta = scatter_meta(src.dtype, src.shape[1:])
            if not posted:
                if src.nbytes + len(meta) <= min(ctx.tuning.small, CAPACITY):
                    whole = np.empty(src.nbytes + len(meta), np.uint8)
                    whole[:src.nbytes] = src.reshape(-1).view(np.uint8)
                    whole[src.nbytes:] = np.frombuffer(meta, np.uint8)
                    r.post(payload=whole, addr2=len(meta))
                else:
                    r.post(payload=np.frombuffer(meta, np.uint8), addr=src.ctypes.data)
            r.gather()
            r.wait_stage(r.peers, 2)
            mine = src[rank, ...] if counts is None else src[before:before + counts[rank]]
            if out is None:
                return mine.copy()     # a 0-d array for 1-d src, not a numpy scalar
            out[...] = mine
            return out
        if not posted:
            r.post()
        addrs = r.gather()
        whole = r.payload_of(root)
        inline = addrs[root] == 0
        tail = len(whole) - r.addr2[root] if inline else 0     # (where the meta starts)
        dtype, shape, bf16 = msgpack.unpackb(whole[tail:].tobytes())
        dt = BFLOAT16 if bf16 else np.dtype(dtype)
        if counts is not None:      # (shape: a row's; this rank's block has counts[rank])
            shape = [counts[rank]] + list(shape)
        if check is not None:
            check(dt, tuple(shape))
        if out is None:
            out = np.empty(shape, dt)
        at = rank * out.nbytes if counts is None else \
            before * dt.itemsize * math.prod(shape[1:])
        if inline:
            out.reshape(-1).view(np.uint8)[...] = whole[at:at + out.nbytes]
        elif out.size:
            peer_read(ctx, root, addrs[root] + at, out.reshape(-1))
        r.stage(2)
        return out


def gather(ctx: Ctx, buf: np.ndarray, out: np.ndarray | list[np.ndarray] | None,
           root: int, largest: int | None = None, sig: tuple[bytes, int] | None = None,
           posted: bool = False) -> None:
    """The root collects every rank's flat ``buf`` into row p of ``out`` (or
    a list of rows, which may differ in size: each rank's ``buf`` the size
    of its own, ``largest`` the bytes of the largest, so that every rank
    chooses alike): as payloads when small (``sig``, ``posted``: as for
    _reduce_payloads, from collectives.shm.tiny), else straight from the
    ranks' buffers."""
    is_root = ctx.g.rank == root
    rows = None if out is None else _flat_rows(out, ctx.g.size)
    with Round(ctx, sig) as r:
        if (buf.nbytes if largest is None else largest) <= min(ctx.tuning.small, CAPACITY):
            if not posted:
                r.post(payload=None if is_root else buf)
            r.gather(None if rows is None else [None if p == root else rows[p]
                                                for p in range(ctx.g.size)])
        else:
            r.post(addr=buf.ctypes.data)
            addrs = r.gather()
            if not is_root:
                r.wait_stage([root], 2)
                return
            assert rows is not None
            for p in r.peers:
                if rows[p].size:
                    peer_read(ctx, p, addrs[p], rows[p])
            r.stage(2)
    if rows is not None:
        rows[root][...] = buf


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


def all_to_all(ctx: Ctx, src: np.ndarray, out: np.ndarray,
               sig: tuple[bytes, int] | None = None, posted: bool = False) -> None:
    """Block p of ``out`` = block ``rank`` of rank p's ``src`` (both shaped
    (n, ...)): small (_small), out of the peers' payloads (``sig``,
    ``posted``: as for _reduce_payloads, from collectives.shm.tiny), else
    read from their buffers."""
    rank, block = ctx.g.rank, src[0].nbytes
    out[rank] = src[rank]
    with Round(ctx, sig) as r:
        if _small(ctx, src):
            if not posted:
                r.post(payload=src)
            r.gather()
            for p in r.peers:
                if block:
                    row = out[p]
                    got = r.payload_part(p, rank * block, row)
                    if got is not row:
                        row[...] = got.reshape(row.shape)
            return
        r.post(addr=src.ctypes.data)
        addrs = r.gather()
        for p in r.peers:
            if block:
                peer_read(ctx, p, addrs[p] + rank * block, out[p])
        r.stage(2)
        r.wait_stage(r.peers, 2)
