"""Horovod's Adasum reduction (``op=hvd.Adasum``) as one meshrun
collective, in Horovod's order (horovod/common/ops/adasum/adasum.h).

Two ranks' vectors a and b combine into

    (1 - a.b / (2 |a|^2)) a  +  (1 - a.b / (2 |b|^2)) b

(a coefficient stays 1 where its norm squared is below sqrt(DBL_MIN)): the
sum where a and b are orthogonal, their average where they are equal. Each
tensor of the call gets its own dot product and norms, as Horovod's fusion
buffer does. On 2^k ranks it runs vector-halving, distance-doubling::

    down, level 1, 2, 4...: exchange half of the segment held with rank ^ level
                            (the lower rank keeps the first half); each
                            tensor's slice dot and norms are summed over the
                            2 * level ranks of the block (recursive doubling),
                            then each rank combines its own half
    up,   level ... 4, 2, 1: exchange the combined segments back

so the result is the pairwise tree: ranks (0, 1) and (2, 3) first, then
the two pairs... Every element is computed on one rank, and every rank
ends with the same bits.
"""
from __future__ import annotations

import sys
import zlib
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..runner import Ctx, start

__all__ = ["adasum_all_reduce", "adasum_vhdd", "DTYPES"]

DTYPES = (torch.float16, torch.float32, torch.float64)       # Horovod's (others: an error)
_TINY = float(np.sqrt(sys.float_info.min))                   # horovod's sqrt(DBL_MIN)


def _sum_over_block(ctx: Ctx, vals: np.ndarray, level: int) -> np.ndarray:
    """``vals`` summed over the 2 * level ranks of this rank's block
    (recursive doubling: partners at distance 1, 2 ... level)."""
    d = 1
    while d <= level:
        peer = ctx.g.rank ^ d
        req = ctx.isend(vals, peer)
        got = ctx.recv(peer, out=np.empty_like(vals))
        req.wait()
        vals = vals + got       # (IEEE addition commutes: both partners get the same bits)
        d <<= 1
    return vals


def _combine(ctx: Ctx, buf: np.ndarray, other: np.ndarray, ends: Sequence[int], lo: int,
             hi: int, left: bool, level: int) -> None:
    """``buf[lo:hi]`` (this rank's part of the block's vector) combined with
    ``other[lo:hi]`` (the partner's), tensor by tensor."""
    parts = [(max(s, lo), min(e, hi)) for s, e in zip(ends[:-1], ends[1:])]
    vals = np.zeros(3 * len(parts))
    for i, (s, e) in enumerate(parts):
        if s >= e:
            continue
        a, b = buf[s:e].astype(np.float64), other[s:e].astype(np.float64)
        aa, bb = float(a @ a), float(b @ b)
        vals[3 * i] = a @ b
        vals[3 * i + 1], vals[3 * i + 2] = (aa, bb) if left else (bb, aa)
    vals = _sum_over_block(ctx, vals, level)
    wide = np.dtype(np.float32 if buf.dtype == np.float16 else np.float64)
    for i, (s, e) in enumerate(parts):
        dot = vals[3 * i]
        lnorm, rnorm = vals[3 * i + 1], vals[3 * i + 2]
        anorm, bnorm = (lnorm, rnorm) if left else (rnorm, lnorm)
        ac = 1.0 - dot / anorm * 0.5 if anorm >= _TINY else 1.0
        bc = 1.0 - dot / bnorm * 0.5 if bnorm >= _TINY else 1.0
        if s < e:
            a, b = buf[s:e].astype(wide), other[s:e].astype(wide)
            buf[s:e] = np.asarray(ac, wide) * a + np.asarray(bc, wide) * b


def adasum_vhdd(ctx: Ctx, buf: np.ndarray, counts: Sequence[int]) -> None:
    """Adasum of the flat ``buf`` over the call's group (2^k ranks), in
    place; ``counts``: its tensors' sizes, in order."""
    n, rank = ctx.g.size, ctx.g.rank
    ends = [0, *np.cumsum(counts, dtype=np.int64).tolist()]
    other = np.empty_like(buf)
    lo, hi = 0, buf.size
    held: list[tuple[int, int]] = []
    level = 1
    while level < n:
        peer, left = rank ^ level, not rank & level
        mid = lo + (hi - lo) // 2
        mine, theirs = ((lo, mid), (mid, hi)) if left else ((mid, hi), (lo, mid))
        req = ctx.isend(buf[theirs[0]:theirs[1]], peer)
        ctx.recv(peer, out=other[mine[0]:mine[1]])
        req.wait()
        held.append((lo, hi))
        lo, hi = mine
        _combine(ctx, buf, other, ends, lo, hi, left, level)
        level <<= 1
    while held:
        level >>= 1
        peer, left = rank ^ level, not rank & level
        plo, phi = held.pop()
        s, e = (hi, phi) if left else (plo, lo)     # the partner's part of the segment
        req = ctx.isend(buf[lo:hi], peer)
        ctx.recv(peer, out=buf[s:e])
        req.wait()
        lo, hi = plo, phi


def adasum_all_reduce(g: Any, tensors: Sequence[torch.Tensor], async_op: bool = False,
                      timeout: float | None = None) -> Any:
    """Each of ``tensors`` (one floating dtype: float16, float32 or float64)
    replaced in place by its Adasum over ``g`` (a power-of-two number of
    ranks); returns the tensors, or a meshrun Work for them."""
    def prepare(_: Any) -> tuple[dict, Callable[[Ctx], Any]]:
        if g.size & (g.size - 1):
            raise NotImplementedError(f"Adasum runs on a power-of-two number of ranks, not "
                                      f"{g.size} (as Horovod's)")
        dtypes = sorted({str(t.dtype)[6:] for t in tensors})
        if len(dtypes) > 1 or any(t.dtype not in DTYPES for t in tensors):
            raise TypeError(f"Adasum takes float16, float32 or float64 tensors of one dtype "
                            f"a call, not {', '.join(dtypes)}")
        counts = [t.numel() for t in tensors]
        flat = [t.detach().reshape(-1).cpu().numpy() for t in tensors]
        buf = np.concatenate(flat) if flat else np.zeros(0, np.float32)

        def body(ctx: Ctx) -> Any:
            if ctx.g.size > 1 and buf.size:
                adasum_vhdd(ctx, buf, counts)
            with torch.no_grad():
                off = 0
                for t, k in zip(tensors, counts):
                    t.copy_(torch.from_numpy(buf[off:off + k]).view(t.shape))
                    off += k
            return tensors
        sizes = zlib.crc32(np.asarray(counts, np.int64).tobytes())     # (in every message)
        return {"coll": "adasum", "dtype": dtypes[0] if dtypes else "", "tensors": len(counts),
                "numel": int(buf.size), "sizes": sizes}, body
    return start(g, "adasum", prepare, async_op, timeout)
