"""The host collectives of uneven parts, MPI's v-calls
(collectives.host.paths): all_gather_v, reduce_scatter_v, gather_v,
scatter_v and all_to_all_v, the even call's paths with parts of the
counts' sizes, the counts in the fingerprint; a tiny one, once a first
call has settled it, the short way (collectives.shm.tiny)."""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from mesh import Comm, MismatchError
from mesh.tensors import dtype_name

from .. import debug
from ..ops import resolve
from ..plan import Tuning, choose, layout, spans
from ..runner import Body, Ctx, agreed, named, start
from ..shm import board, local, tiny
from . import hier
from .paths_checks import (_apart, _array, _counts_fp, _fp, _into, _parts_into, _passes, _root,
                           _row_as_wanted, _uneven)
from .paths_route import _said, _skipped, _topology
from .ring import ring
from .rooted import gather_direct, scatter_direct

__all__ = ["all_gather_v", "reduce_scatter_v", "gather_v", "scatter_v", "all_to_all_v"]



def all_gather_v(g: Comm, a: Any, counts: list[int], async_op: bool = False,
                 timeout: float | None = None, name: str = "all_gather_v",
                 out: Any = None, check: Callable[[], Any] | None = None) -> Any:
    """MPI's Allgatherv: every rank's ``a`` (``counts[rank]`` rows; the rows'
    shape, a.shape[1:], and dtype alike on every rank) concatenated along
    axis 0 in rank order: sum(counts) rows. all_gather's paths with parts
    of the counts' sizes (the ring, the same-host board, across hosts its
    two levels, as MESH_COLL_ALGO's all_gather says); the counts are in
    the fingerprint (_counts_fp). ``name``: the caller's call (the torch
    backend's all_gather). ``out``: a list of g.size arrays that take the
    ranks' rows, as _into takes them (the torch backend's output tensors,
    filled straight on the board; None where they cannot be), returned
    in place of the result. ``check()``, run first under the call's tag,
    may raise for the caller's other arguments, failing the call on every
    rank. Tiny, once a first call has settled it: the short way
    (collectives.shm.tiny)."""
    n = g.size
    if not async_op and type(a) is np.ndarray and type(counts) is list and _passes(check):
        rows = None if out is None else _parts_into(out, a, counts, g)
        if (out is None or rows is not None) and (
                got := tiny.all_gather_v(g, a, counts, timeout, name, rows)) is not None:
            return got

    def prepare(t: Tuning) -> tuple[dict, Body]:
        if check is not None:
            check()
        arr, bounds = _uneven(name, a, counts, n, counts[g.rank] if len(counts) == n else None)
        rest, total = arr.shape[1:], sum(counts)
        lay = layout("all_gather", t)
        dest = None if out is None else _parts_into(out, arr, counts, g)

        def body(ctx: Ctx) -> Any:
            nbytes = bounds[-1][1] * arr.itemsize
            topo = _topology(ctx, "all_gather", lay, nbytes)
            if debug.ON:
                _said(ctx, name, topo, "ring", nbytes, lay, "all_gather")
            if topo is None and dest is not None and board.available(ctx):
                local.all_gather(ctx, arr.reshape(-1), dest)
                tiny.learn_v(ctx, arr, counts)
                return dest
            res = np.empty((total,) + rest, arr.dtype)
            flat = res.reshape(-1)
            if topo is not None:
                hier.all_gather(ctx, topo, arr, flat, nbytes >= t.small, bounds)
            elif board.available(ctx):
                local.all_gather(ctx, arr.reshape(-1), [flat[lo:hi] for lo, hi in bounds])
                tiny.learn_v(ctx, arr, counts)
            else:
                lo, hi = bounds[ctx.g.rank]
                flat[lo:hi] = arr.reshape(-1)
                ring(ctx, flat, None, n - 1, 0, bounds=bounds)
            if dest is None:
                return res
            for o, (lo, hi) in zip(dest, bounds):
                o.reshape(-1)[...] = flat[lo:hi]
            return dest
        return _fp(name, dtype=dtype_name(arr.dtype), row=list(rest) or None,
                   counts=_counts_fp(list(counts)), hier=lay), body
    return start(g, name, prepare, async_op, timeout, _skipped(
        g, "all_gather", a, 0, None,
        lambda: sum(map(int, counts)) * math.prod(a.shape[1:]) * a.itemsize))



def reduce_scatter_v(g: Comm, a: Any, counts: list[int], op: str = "sum",
                     async_op: bool = False, timeout: float | None = None,
                     name: str = "reduce_scatter_v", out: Any = None,
                     check: Callable[[], Any] | None = None,
                     parts: list[np.ndarray] | None = None) -> Any:
    """MPI's Reduce_scatter: ``a`` (sum(counts) rows on every rank) reduced
    over the group; rank r gets rows [off_r, off_r + counts[r]) of the
    result (off_r: the sum of the counts before r), a new array (``a`` is
    only read). reduce_scatter's paths with parts of the counts' sizes
    (the ring, the same-host board, across hosts its two levels, as
    MESH_COLL_ALGO's reduce_scatter says; even counts give reduce_scatter's
    bits); the counts are in the fingerprint. ``out``: where this rank's
    rows go (_into); ``name``, ``check``: as all_gather_v's. ``parts``: in
    place of ``a`` (None), the array as its g.size flat parts of counts[j]
    items, one dtype (the torch backend's input list): on the same-host
    board not joined (each rank reduces its part straight out of the
    peers', local.reduce_scatter_parts), nor across hosts over the columns
    (hier.reduce_scatter copies them into its own order); else joined into
    one copy, which the ring works in. Tiny (``a``, not parts), once a
    first call has settled it: the short way (collectives.shm.tiny)."""
    n = g.size
    if not async_op and parts is None and type(a) is np.ndarray and type(counts) is list \
            and len(counts) == n and _passes(check):
        mine = None if out is None else _into(out, a, (counts[g.rank],) + a.shape[1:])
        if (out is None or mine is not None) and (got := tiny.reduce_scatter_v(
                g, a, counts, op, timeout, name, mine)) is not None:
            return got

    def prepare(t: Tuning) -> tuple[dict, Body]:
        if check is not None:
            check()
        flat: list[np.ndarray] = []
        if parts is not None:
            flat = [np.ascontiguousarray(_array(name, p)).reshape(-1) for p in parts]
            if [p.size for p in flat] != list(counts) or len({p.dtype for p in flat}) > 1:
                raise ValueError(f"{name}: parts of sizes {[p.size for p in flat]} and dtypes "
                                 f"{sorted({str(p.dtype) for p in flat})} where counts "
                                 f"{_counts_fp(list(counts))} and one dtype are needed")
            arr = flat[0][:0]       # (its dtype: the fingerprint's)
            bounds = _uneven(name, arr, counts, n)[1]
        else:
            arr, bounds = _uneven(name, a, counts, n, sum(counts) if len(counts) == n else None)
        rop = resolve(op, arr.dtype)
        rest = arr.shape[1:]
        lay = layout("reduce_scatter", t)
        nbytes = bounds[-1][1] * arr.itemsize
        dest = _into(out, arr, (counts[g.rank],) + rest)
        if dest is not None and any(np.may_share_memory(dest, p) for p in flat):
            dest = None     # (a peer may read the parts while this rank writes out)

        def body(ctx: Ctx) -> np.ndarray:
            rank = ctx.g.rank
            mine = np.empty((counts[rank],) + rest, arr.dtype) if dest is None else dest
            topo = _topology(ctx, "reduce_scatter", lay, nbytes)
            alg = choose("all_reduce", nbytes, t, "hier")
            if debug.ON:
                _said(ctx, name, topo, alg, nbytes, lay, "reduce_scatter")
            if topo is not None:
                whole = arr.reshape(-1)
                hier.reduce_scatter(ctx, topo, flat if parts is not None else
                                    [whole[lo:hi] for lo, hi in bounds], mine.reshape(-1), rop,
                                    alg)
            elif board.available(ctx) and parts is not None:
                local.reduce_scatter_parts(ctx, flat, mine.reshape(-1), rop)
            elif board.available(ctx):     # (small: as payloads, local.reduce_scatter)
                local.reduce_scatter(ctx, arr.reshape(-1), mine.reshape(-1), rop, bounds)
                tiny.learn_v(ctx, arr, counts, op=op, rop=rop)
            else:
                work = np.concatenate(flat) if parts is not None else \
                    np.array(arr, order="C").reshape(-1)
                ring(ctx, work, rop, n - 1, n - 1, shift=-1, bounds=bounds)
                lo, hi = bounds[rank]
                mine.reshape(-1)[...] = work[lo:hi]
            rop.finish(mine, n)
            return mine
        return _fp(name, dtype=dtype_name(arr.dtype), row=list(rest) or None,
                   counts=_counts_fp(list(counts)), op=op, hier=lay), body
    return start(g, name, prepare, async_op, timeout, _skipped(
        g, "reduce_scatter", a, 0, None,
        lambda: sum(p.nbytes for p in parts) if parts is not None else a.nbytes))



def gather_v(g: Comm, a: Any, counts: list[int], root: int = 0, async_op: bool = False,
             timeout: float | None = None, check: Callable[[], Any] | None = None) -> Any:
    """MPI's Gatherv: every rank's ``a`` (``counts[rank]`` rows; the rows'
    shape, a.shape[1:], and dtype alike on every rank) concatenated along
    axis 0 in rank order on the root (sum(counts) rows); None on the other
    ranks. gather's paths (the same-host board, sockets) with rows of the
    counts' sizes; the counts are in the fingerprint (_counts_fp).
    ``check``: as all_gather_v's. Tiny, once a first call has settled it:
    the short way (collectives.shm.tiny)."""
    n = g.size
    if not async_op and type(a) is np.ndarray and type(counts) is list and _passes(check) and (
            got := tiny.gather_v(g, a, counts, root, timeout)) is not None:
        return got[0]

    def prepare(t: Tuning) -> tuple[dict, Body]:
        if check is not None:
            check()
        r = _root(g, root)
        arr, bounds = _uneven("gather_v", a, counts, n,
                              counts[g.rank] if len(counts) == n else None)
        rest = arr.shape[1:]
        flat = arr.reshape(-1)

        def body(ctx: Ctx) -> Any:
            if debug.ON:
                _said(ctx, "gather_v", None, "direct", arr.nbytes)
            res = None if ctx.g.rank != r else np.empty((sum(counts),) + rest, arr.dtype)
            rows = None if res is None else [res.reshape(-1)[lo:hi] for lo, hi in bounds]
            if board.available(ctx):    # (the largest row's bytes: every rank chooses alike)
                local.gather(ctx, flat, rows, r,
                             max(hi - lo for lo, hi in bounds) * arr.itemsize)
                tiny.learn_v(ctx, arr, counts, r)
            else:
                agreed(lambda c: gather_direct(c, flat, rows, r))(ctx)
            return res
        return _fp("gather_v", dtype=dtype_name(arr.dtype), row=list(rest) or None,
                   counts=_counts_fp(list(counts)), root=r), body
    return start(g, "gather_v", prepare, async_op, timeout)



def scatter_v(g: Comm, a: Any, counts: list[int], root: int = 0, async_op: bool = False,
              timeout: float | None = None, dtype: Any = None,
              check: Callable[[], Any] | None = None) -> Any:
    """MPI's Scatterv: rows [off_r, off_r + counts[r]) of the root's ``a``
    (sum(counts) rows; off_r the sum of the counts before r) to rank r, as
    a new array. ``a`` is ignored (may be None) on the other ranks; there
    ``dtype`` (a tensor's) is the dtype the rows must have (MismatchError
    naming both). scatter's paths (the same-host board, sockets) with
    blocks of the counts' sizes; the counts are in the fingerprint.
    ``check``: as all_gather_v's. Tiny, once a first call has settled it:
    the short way (collectives.shm.tiny)."""
    n = g.size
    if not async_op and (a is None or type(a) is np.ndarray) and type(counts) is list \
            and _passes(check) and (
                got := tiny.scatter_v(g, a, counts, root, timeout, dtype)) is not None:
        return got

    def prepare(t: Tuning) -> tuple[dict, Body]:
        if check is not None:
            check()
        r = _root(g, root)
        src: np.ndarray | None = None
        bounds: list[tuple[int, int]] = []
        if g.rank == r:
            src, bounds = _uneven("scatter_v", a, counts, n,
                                  sum(counts) if len(counts) == n else None)
        elif len(counts) != n:      # (the root's _uneven says so on the root)
            raise ValueError(f"scatter_v: counts must be {n} integers >= 0 (one a rank), got "
                             f"{list(counts)!r:.200}")
        want = None if dtype is None or g.rank == r else np.dtype(dtype)

        def rows_as_wanted(ctx: Ctx, dt: np.dtype, shape: tuple[int, ...]) -> None:
            _row_as_wanted(ctx, want, None, dt, shape, r, "rows")

        def sockets(ctx: Ctx) -> np.ndarray:
            if src is None:
                got = ctx.recv(r)
                rows_as_wanted(ctx, got.dtype, got.shape)
                return got
            flat = src.reshape(-1)
            blocks = [flat[lo:hi].reshape((counts[j],) + src.shape[1:])
                      for j, (lo, hi) in enumerate(bounds)]
            mine = np.empty_like(blocks[r])
            scatter_direct(ctx, blocks, mine, r)
            return mine

        def body(ctx: Ctx) -> np.ndarray:
            if debug.ON:
                _said(ctx, "scatter_v", None, "direct", None if src is None else src.nbytes)
            if board.available(ctx):
                row = local.scatter(ctx, src, r, lambda dt, sh: rows_as_wanted(ctx, dt, sh),
                                    counts=list(counts))
                tiny.learn_scatter(ctx, src, row, r, dtype, None, rows_as_wanted, list(counts))
                return row
            return agreed(sockets)(ctx)
        return _fp("scatter_v", counts=_counts_fp(list(counts)), root=r), body
    return start(g, "scatter_v", prepare, async_op, timeout)



def all_to_all_v(g: Comm, a: Any, in_splits: list[int], out_splits: list[int],
                 async_op: bool = False, timeout: float | None = None,
                 sizes: str = "recv_counts vs send_counts",
                 check: Callable[[], Any] | None = None, name: str = "all_to_all_v",
                 out: list[np.ndarray] | None = None) -> Any:
    """all_to_all with uneven blocks: rows [off_i, off_i + in_splits[i]) of
    ``a`` go to rank i; the result holds rank j's block at out_splits'
    offset j. On the same-host board (local.all_to_all_v) every rank posts
    its counts beside its rows and checks every rank's: a pair that
    disagrees raises MismatchError on every rank, naming both (``sizes``
    says which arguments disagree). Over sockets each block carries, in its
    fingerprint, the rows it holds and the rows its sender expects back,
    so that both ranks of such a pair raise MismatchError naming both; the
    other members' blocks are right, and they may return them before the
    abort reaches them. ``check()``, run first under the call's tag, may
    raise for the caller's other arguments, failing it on every rank.
    ``name``: the caller's call (the torch backend's: in errors and
    fingerprints, an uneven all_gather meeting an even one names both).
    ``out``: a list of g.size arrays that take the blocks received, as
    _into takes them (the torch backend's tensors). Tiny, once a first call
    has settled it: the short way (collectives.shm.tiny)."""
    n = g.size
    if not async_op and type(a) is np.ndarray and type(in_splits) is list \
            and type(out_splits) is list and len(out_splits) == n and _passes(check):
        rows = None if out is None or any(type(k) is not int for k in out_splits) else \
            _apart([_into(o, a, (k,) + a.shape[1:]) for o, k in zip(out, out_splits)], n)
        if (out is None or rows is not None) and (got := tiny.all_to_all_v(
                g, a, in_splits, out_splits, timeout, sizes, name, rows)) is not None:
            return got

    def prepare(_: Any) -> tuple[dict, Callable[[Ctx], Any]]:
        if check is not None:
            check()
        arr = np.asarray(_array(name, a), order="C")
        if arr.ndim == 0:
            raise ValueError(f"{name}: needs an array of rows, got a 0-d array")
        for what, splits in (("send", in_splits), ("recv", out_splits)):
            if any(not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0
                   for k in splits):
                raise ValueError(f"{name}: {what} counts must be integers >= 0, got "
                                 f"{list(splits)!r:.200}")
        if len(in_splits) != n or len(out_splits) != n or sum(in_splits) != arr.shape[0]:
            raise ValueError(f"split sizes {list(in_splits)} / {list(out_splits)} ({sizes}) "
                             f"do not fit {n} ranks and {arr.shape[0]} input rows")
        me = g.rank
        if in_splits[me] != out_splits[me]:
            raise MismatchError(
                f"rank {g.ranks[me]}: {name} on group {g.name}: {named(g, me)} expects "
                f"{out_splits[me]} rows from rank {me} (itself), which sends {in_splits[me]} "
                f"({sizes})")
        rest = arr.shape[1:]
        sends, recvs = [int(k) for k in in_splits], [int(k) for k in out_splits]
        isp, osp = spans(sends), spans(recvs)
        dest = None if out is None else _apart([_into(o, arr, (k,) + rest)
                                                for o, k in zip(out, recvs)], n)

        def pair(src: int, dst: int, there: int, back: int) -> dict:
            """The fingerprint of a block from ``src`` to ``dst`` of ``there``
            rows, whose sender expects ``back`` rows from ``dst``."""
            if src > dst:       # the lower rank first: both ranks write it alike
                src, dst, there, back = dst, src, back, there
            return {**ctx_fp, "rows": f"{src}->{dst} {there}, {dst}->{src} {back}"}

        def body(ctx: Ctx) -> Any:
            me = ctx.g.rank
            out: Any = np.empty((osp[-1][1],) + rest, arr.dtype) if dest is None else dest
            blocks = dest or [out[lo:hi] for lo, hi in osp]
            if debug.ON:
                _said(ctx, name, None, "direct", arr.nbytes)
            if board.available(ctx):
                metas = local.all_to_all_v(ctx, arr.reshape(-1), [b.reshape(-1) for b in blocks],
                                           sends, recvs, math.prod(rest), sizes)
                if metas is not None:
                    tiny.learn_v(ctx, arr, sends, recvs=recvs, metas=metas, sizes=sizes)
                return out
            recvd = [(j, ctx.irecv(j, fp=pair(j, me, recvs[j], sends[j])))
                     for j in range(n) if j != me]
            sent = [ctx.isend(arr[isp[i][0]:isp[i][1]], i, fp=pair(me, i, sends[i], recvs[i]))
                    for i in range(n) if i != me]
            blocks[me][...] = arr[isp[me][0]:isp[me][1]]
            for j, r in recvd:
                got = r.wait()
                if got.shape[0] != recvs[j]:
                    raise MismatchError(
                        f"{ctx.where()}: {named(ctx.g, me)} expects {recvs[j]} rows from "
                        f"{named(ctx.g, j)}, which sent {got.shape[0]} ({sizes})")
                blocks[j][...] = got
            for s in sent:
                s.wait()
            return out
        ctx_fp = {"coll": name, "dtype": dtype_name(arr.dtype),
                  "row": list(rest) or None}     # (a row's shape past the first dimension)
        return ctx_fp, body
    return start(g, name, prepare, async_op, timeout)
