"""The same-host collectives that move data and reduce none
(collectives.shm.local): all_gather, broadcast, gather, scatter,
all_to_all and all_to_all_v."""
from __future__ import annotations

import math
from typing import Any, Callable

import msgpack
import numpy as np

from mesh import MismatchError
from mesh.tensors import BFLOAT16, dtype_name

from ..plan import spans
from ..runner import Ctx, named
from .board import CAPACITY, INLINE, Round
from .cma import peer_read
from .local_reduce import _small

__all__ = ["all_gather", "broadcast", "scatter_meta", "scatter", "gather", "all_to_all",
           "all_to_all_v"]


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


def all_to_all_v(ctx: Ctx, src: np.ndarray, blocks: list[np.ndarray], sends: list[int],
                 recvs: list[int], row: int, sizes: str, sig: tuple[bytes, int] | None = None,
                 posted: bool = False) -> list[bytes] | None:
    """Block p of ``blocks`` (flat, ``recvs[p]`` rows of ``row`` items
    each) = rank p's rows for this rank, out of its flat ``src``
    (``sends[p']`` rows for each p', in rank order). Every rank posts its
    counts, ``[sends, recvs]`` as msgpack (its meta), after its rows where
    they are small (_small, with the meta: its bytes in ``addr2``, ``addr``
    0), else alone with the buffer's address, which the peers read their
    rows from (the poster waits for them: stage 2); the form is each
    rank's own. Every rank checks the whole matrix of counts from the
    posts before it reads a row: a pair that disagrees raises
    MismatchError on every rank, naming both (``sizes``: which arguments
    disagree). ``sig``, ``posted``: as for _reduce_payloads, from
    collectives.shm.tiny. Returns every rank's meta where every rank posted
    its rows in the board's inline room (what the short way settles), else
    None."""
    n, rank = ctx.g.size, ctx.g.rank
    item = src.itemsize * row
    meta = msgpack.packb([sends, recvs])
    lo, hi = spans(sends)[rank]
    blocks[rank][...] = src[lo * row:hi * row]
    with Round(ctx, sig) as r:
        inline = src.nbytes + len(meta) <= min(ctx.tuning.small, CAPACITY)
        if not posted:
            if inline:
                whole = np.empty(src.nbytes + len(meta), np.uint8)
                whole[:src.nbytes] = src.view(np.uint8)
                whole[src.nbytes:] = np.frombuffer(meta, np.uint8)
                r.post(payload=whole, addr2=len(meta))
            else:
                r.post(payload=np.frombuffer(meta, np.uint8), addr=src.ctypes.data,
                       addr2=len(meta))
        addrs = r.gather()
        metas: list[bytes] = [b""] * n
        metas[rank] = meta
        posts = src.nbytes + len(meta)      # (the largest post)
        for p in r.peers:
            size, k = r.payload_size(p), r.addr2[p]
            metas[p] = bytes(r.payload_part(p, size - k, np.empty(k, np.uint8)))
            posts = max(posts, size)
        counts = [msgpack.unpackb(m) for m in metas]
        expected = list(zip(*(c[1] for c in counts)))   # (i: what each rank expects from i)
        for i in range(n):      # (every rank the same check, so the same error)
            if tuple(counts[i][0]) == expected[i]:
                continue
            j = next(j for j in range(n) if counts[i][0][j] != expected[i][j])
            raise MismatchError(
                f"{ctx.where()}: {named(ctx.g, j)} expects {expected[i][j]} rows from "
                f"{named(ctx.g, i)}, which sends {counts[i][0][j]} ({sizes})")
        for p in r.peers:
            out = blocks[p]
            if not out.size:
                continue
            at = sum(counts[p][0][:rank]) * item
            if addrs[p] == 0:
                got = r.payload_part(p, at, out)
                if got is not out:
                    out[...] = got
            else:
                peer_read(ctx, p, addrs[p] + at, out)
        if any(addrs) or not inline:
            r.stage(2)
            if not inline:
                r.wait_stage(r.peers, 2)
            return None
    return metas if posts <= INLINE else None
