"""The host collectives that reduce (collectives.host.paths): all_reduce,
reduce, reduce_scatter and scan (exscan), each choosing its path: two
levels across hosts (collectives.host.hier), the same-host board
(collectives.shm), or an algorithm over sockets."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from mesh import Comm

from .. import debug
from ..ops import OPS, resolve
from ..plan import Tuning, choose, layout, rd_peers
from ..runner import Body, Ctx, agreed, start
from ..shm import board, local, tiny
from . import hier, link
from . import tiny as hier_tiny
from .paths_checks import _array, _fp, _into, _root, _rows
from .paths_route import _SOCKETS, _in_place, _said, _skipped, _topology
from .ring import ring
from .rooted import reduce_chain, reduce_tree
from .small import all_reduce_rd

__all__ = ["all_reduce", "all_reduce_plan", "reduce", "reduce_scatter", "scan"]



def all_reduce(g: Comm, a: np.ndarray, op: str = "sum", async_op: bool = False,
               algorithm: str | None = None, timeout: float | None = None,
               check: Callable[[], Any] | None = None) -> Any:
    """Reduce ``a`` over the group, in place on every rank; returns ``a``.
    ``algorithm``: "rd" (recursive doubling) or "ring" (reduce-scatter then
    all-gather); default by size. Between processes of one host both run
    over the board and cross-memory attach (collectives.shm) unless
    MESH_CMA=0. Across hosts with more than one rank on some host, or with
    "hier", it runs in two levels (collectives.host.hier; "rd" / "ring"
    force the flat algorithm). ``check``: as all_gather_v's."""
    return start(g, "all_reduce", all_reduce_plan(g, a, op, algorithm, check), async_op,
                 timeout, _skipped(g, "all_reduce", a, 0, algorithm))


def all_reduce_plan(g: Comm, a: np.ndarray, op: str = "sum", algorithm: str | None = None,
                    check: Callable[[], Any] | None = None
                    ) -> Callable[[Tuning], tuple[dict, Body]]:
    """all_reduce's preparation (runner.start's ``prepare``): the
    arguments checked, the op, algorithm and layout chosen, and the
    fingerprint and body made, for one tuning (collectives.persistent
    makes it once, for every start)."""
    def prepare(t: Tuning) -> tuple[dict, Body]:
        if check is not None:
            check()
        arr = _array("all_reduce", a, writable=True)
        rop = resolve(op, arr.dtype)
        alg = choose("all_reduce", arr.nbytes, t, algorithm)
        lay = layout("all_reduce", t, algorithm)

        def body(ctx: Ctx, buf: np.ndarray) -> None:
            if ctx.g.size > 1:
                topo = _topology(ctx, "all_reduce", lay, buf.nbytes)
                if debug.ON:
                    _said(ctx, "all_reduce", topo, alg, buf.nbytes, lay)
                if topo is not None:
                    hier.all_reduce(ctx, topo, buf, rop, alg)
                    if alg == "rd" and algorithm is None and lay is None \
                            and hier.small_columns(topo, buf.nbytes):
                        hier_tiny.learn(ctx, topo, arr, op, rop)
                elif alg == "rd":
                    if board.available(ctx, buf.nbytes):
                        local.all_reduce_small(ctx, buf, rop)
                        if algorithm is None and lay is None:
                            tiny.learn(ctx, arr, op, rop)
                    else:
                        if board.available(ctx):    # (peers of smaller sizes: the board)
                            board.announce(ctx)
                        all_reduce_rd(link.via(ctx, rd_peers(ctx.g.rank, ctx.g.size),
                                               buf.nbytes), buf, rop)
                elif board.available(ctx):
                    local.all_reduce_large(ctx, buf, rop)
                else:
                    ring(ctx, buf, rop, 2 * (ctx.g.size - 1), ctx.g.size - 1)
            rop.finish(buf, ctx.g.size)
        return _fp("all_reduce", arr, op=op, alg=alg, hier=lay), _in_place(arr, body)
    return prepare



def reduce(g: Comm, a: np.ndarray, root: int = 0, op: str = "sum", async_op: bool = False,
           algorithm: str | None = None, timeout: float | None = None) -> Any:
    """Reduce ``a`` over the group into the root's ``a`` (the others' arrays
    are left as they were); returns ``a``."""
    def prepare(t: Tuning) -> tuple[dict, Body]:
        arr = _array("reduce", a, writable=g.rank == root)
        rop = resolve(op, arr.dtype)
        r = _root(g, root)
        alg = choose("reduce", arr.nbytes, t, algorithm)
        fn = reduce_chain if alg == "chain" else reduce_tree

        def body(ctx: Ctx, buf: np.ndarray) -> None:
            if ctx.g.size > 1:
                if debug.ON:
                    _said(ctx, "reduce", None, alg, buf.nbytes)
                if board.available(ctx):
                    local.reduce(ctx, buf, rop, r)
                    if algorithm is None:
                        tiny.learn(ctx, arr, (op, r), rop, "reduce")
                else:
                    agreed(lambda c: fn(c, buf, rop, r))(ctx)
            if ctx.g.rank == r:
                rop.finish(buf, ctx.g.size)
        return _fp("reduce", arr, op=op, root=r, alg=alg), _in_place(arr, body, g.rank == r)
    return start(g, "reduce", prepare, async_op, timeout)



def reduce_scatter(g: Comm, a: Any, op: str = "sum", async_op: bool = False,
                   timeout: float | None = None, out: np.ndarray | None = None) -> Any:
    """Reduce ``a`` (a.shape[0] divisible by g.size) over the group and return
    this rank's share: rows [rank*m, (rank+1)*m) of the result, m = shape[0]/size;
    into ``out`` when given (_into)."""
    def prepare(t: Tuning) -> tuple[dict, Body]:
        arr = _array("reduce_scatter", a)
        _rows("reduce_scatter", arr, g.size)
        rop = resolve(op, arr.dtype)
        lay = layout("reduce_scatter", t)
        dest = _into(out, arr, (arr.shape[0] // g.size,) + arr.shape[1:])

        def body(ctx: Ctx) -> np.ndarray:
            n, m, rank = ctx.g.size, arr.shape[0] // ctx.g.size, ctx.g.rank
            mine = np.empty((m,) + arr.shape[1:], arr.dtype) if dest is None else dest
            topo = _topology(ctx, "reduce_scatter", lay, arr.nbytes)
            if debug.ON:
                _said(ctx, "reduce_scatter", topo, choose("all_reduce", arr.nbytes, t, "hier"),
                      arr.nbytes, lay)
            if topo is not None:
                hier.reduce_scatter(ctx, topo, list(np.ascontiguousarray(arr).reshape(n, -1)),
                                    mine.reshape(-1), rop,
                                    choose("all_reduce", arr.nbytes, t, "hier"))
            elif board.available(ctx):
                local.reduce_scatter(ctx, np.ascontiguousarray(arr).reshape(-1),
                                     mine.reshape(-1), rop)
                tiny.learn(ctx, arr, op, rop, "reduce_scatter")
            else:
                work = np.array(arr, order="C")
                ring(ctx, work.reshape(-1), rop, n - 1, n - 1, shift=-1)
                mine[...] = work[rank * m:(rank + 1) * m]
            rop.finish(mine, n)
            return mine
        return _fp("reduce_scatter", arr, op=op, hier=lay), body
    return start(g, "reduce_scatter", prepare, async_op, timeout,
                 _skipped(g, "reduce_scatter", a, 0, None))



def scan_doubling(ctx: Ctx, arr: Any, below: Callable[[Any, Any], Any],
                  exclusive: bool) -> Any:
    """Recursive doubling of a scan (``scan``'s; collectives.userop's): in
    round k this rank sends what it holds to rank + 2**k and combines what
    rank - 2**k sends before its own, ``below(lower, acc)`` returning
    ``lower (op) acc`` (into ``acc`` where it may: ``arr`` is the call's
    copy). Its result: ranks 0..r combined, or with ``exclusive`` 0..r-1
    (None on rank 0)."""
    n, r = ctx.g.size, ctx.g.rank
    held, before = arr, None        # ranks r-d+1..r, and r-d+1..r-1 (None: none)
    d = 1
    while d < n:
        got = ctx.irecv(r - d, np.empty_like(held)) if r >= d else None
        sent = ctx.isend(held, r + d) if r + d < n else None
        lower = got.wait() if got is not None else None
        if sent is not None:
            sent.wait()             # (held is combined into next)
        if lower is not None:
            before = lower.copy() if before is None else below(lower, before)
            held = below(lower, held)
        d *= 2
    return before if exclusive else held


def scan(g: Comm, a: Any, op: str = "sum", async_op: bool = False,
         timeout: float | None = None, exclusive: bool = False) -> Any:
    """MPI's Scan: rank r gets ``a`` of ranks 0..r reduced, a new array
    (``a`` is only read); ``exclusive``: MPI's Exscan, ranks 0..r-1, and
    None on rank 0. Recursive doubling: log2(size) rounds, in round k each
    rank sends what it holds to rank + 2**k and combines what rank - 2**k
    sends before its own (the lower ranks' operand first, so every order
    of combination is fixed). A small array of a same-host group goes on the
    board instead, one round, combined there in the same order
    (local.scan). No avg (MPI's scans have none)."""
    name = "exscan" if exclusive else "scan"

    def prepare(t: Tuning) -> tuple[dict, Body]:
        arr = np.array(_array(name, a), order="C")      # (a copy: combined into)
        if op == "avg":
            ops = " ".join(o for o in OPS if o != "avg")
            raise ValueError(f"{name} takes {ops}, not 'avg' (divide a sum scan by rank + 1 for "
                             f"a running mean)")
        rop = resolve(op, arr.dtype)

        def body(ctx: Ctx) -> Any:
            small = arr.nbytes <= t.small and board.available(ctx, arr.nbytes)
            if debug.ON:
                debug.note(ctx.g, name, "same-host board" if small else
                           f"flat, {_SOCKETS['rd']} over sockets", arr.nbytes)
            if small:
                out = local.scan(ctx, arr.reshape(-1), rop, exclusive)
                return None if out is None else out.reshape(arr.shape)
            if board.available(ctx):    # (peers of smaller sizes: the board)
                board.announce(ctx)
            return agreed(doubling)(ctx)

        def doubling(ctx: Ctx) -> Any:
            def below(lower: Any, acc: Any) -> Any:
                rop.combine(acc, lower, src_first=True)
                return acc
            return scan_doubling(ctx, arr, below, exclusive)
        return _fp(name, arr, op=op), body
    return start(g, name, prepare, async_op, timeout)
