"""The host collectives that move data without reducing it
(collectives.host.paths): broadcast, all_gather, gather, scatter and
all_to_all, each choosing its path: two levels across hosts
(collectives.host.hier), the same-host board (collectives.shm), or an
algorithm over sockets."""
from __future__ import annotations

from typing import Any

import numpy as np

from mesh import Comm

from .. import debug
from ..plan import Tuning, choose, layout
from ..runner import Body, Ctx, agreed, start
from ..shm import board, local, tiny
from . import hier
from .exchange import all_to_all_direct
from .paths_checks import _array, _fp, _into, _root, _row_as_wanted, _rows
from .paths_route import _in_place, _said, _skipped, _topology
from .ring import ring
from .rooted import broadcast_chain, broadcast_tree, gather_direct, scatter_direct

__all__ = ["broadcast", "all_gather", "gather", "scatter", "all_to_all"]



def broadcast(g: Comm, a: np.ndarray, root: int = 0, async_op: bool = False,
              algorithm: str | None = None, timeout: float | None = None) -> Any:
    """Copy the root's ``a`` into ``a`` on every rank; returns ``a``.
    ``algorithm``: "tree" (binomial) or "chain" (pipelined); default by size;
    "hier" (or across hosts with more than one rank on some host): in two
    levels (collectives.host.hier). The root's ``a`` is only read, so it may
    be read-only (as MPI_Bcast's): no path writes the root's buffer."""
    def prepare(t: Tuning) -> tuple[dict, Body]:
        arr = _array("broadcast", a, writable=g.rank != root)
        r = _root(g, root)
        alg = choose("broadcast", arr.nbytes, t, algorithm)
        lay = layout("broadcast", t, algorithm)

        fn = broadcast_tree if alg == "tree" else broadcast_chain

        def body(ctx: Ctx, buf: np.ndarray) -> None:
            topo = _topology(ctx, "broadcast", lay, buf.nbytes)
            if debug.ON:
                _said(ctx, "broadcast", topo, alg, buf.nbytes, lay)
            if topo is not None:
                hier.broadcast(ctx, topo, buf, r, alg == "chain")
            elif board.available(ctx):
                local.broadcast(ctx, buf, r)
                if algorithm is None:
                    tiny.learn(ctx, arr, (None, r), None, "broadcast")
            else:
                agreed(lambda c: fn(c, buf, r))(ctx)
        return _fp("broadcast", arr, root=r, alg=alg, hier=lay), _in_place(arr, body,
                                                                         g.rank != r)
    return start(g, "broadcast", prepare, async_op, timeout,
                 _skipped(g, "broadcast", a, root, algorithm))



def all_gather(g: Comm, a: Any, async_op: bool = False, timeout: float | None = None,
               out: np.ndarray | None = None) -> Any:
    """Every rank's ``a`` stacked in rank order: shape (g.size, *a.shape);
    into ``out`` when given (see _into: the torch backend's output, or its
    list of g.size tensors, which the same-host board fills row by row)."""
    def prepare(t: Tuning) -> tuple[dict, Body]:
        arr = _array("all_gather", a)
        lay = layout("all_gather", t)
        dest = _into(out, arr, (g.size,) + arr.shape, mine=g.rank)

        def body(ctx: Ctx) -> Any:
            n = ctx.g.size
            topo = _topology(ctx, "all_gather", lay, n * arr.nbytes)
            if debug.ON:
                _said(ctx, "all_gather", topo, "ring", n * arr.nbytes, lay)
            if topo is None and board.available(ctx):
                out = np.empty((n,) + arr.shape, arr.dtype) if dest is None else dest
                local.all_gather(ctx, np.ascontiguousarray(arr).reshape(-1), out)
                tiny.learn(ctx, arr, None, None, "all_gather")
                return out
            out = dest if type(dest) is np.ndarray else np.empty((n,) + arr.shape, arr.dtype)
            if topo is not None:
                hier.all_gather(ctx, topo, arr, out.reshape(-1), out.nbytes >= t.small)
            else:
                out[ctx.g.rank] = arr
                ring(ctx, out.reshape(-1), None, n - 1, 0)
            for row, o in zip(out, dest if isinstance(dest, list) else []):
                o[...] = row    # (rows of the caller's: these paths write one array)
            return out if dest is None else dest
        return _fp("all_gather", arr, hier=lay), body
    return start(g, "all_gather", prepare, async_op, timeout,
                 _skipped(g, "all_gather", a, 0, None))



def gather(g: Comm, a: Any, root: int = 0, async_op: bool = False,
           timeout: float | None = None, out: Any = None) -> Any:
    """Every rank's ``a`` stacked on the root (shape (g.size, *a.shape));
    None on the other ranks; on the root into ``out`` when given (_into:
    an array, or a list of g.size rows)."""
    def prepare(t: Tuning) -> tuple[dict, Body]:
        arr = np.asarray(_array("gather", a), order="C")   # ascontiguousarray makes 0-d 1-d
        r = _root(g, root)
        dest = _into(out, arr, (g.size,) + arr.shape, mine=r)

        def body(ctx: Ctx) -> Any:
            out = None if ctx.g.rank != r else np.empty(
                (ctx.g.size,) + arr.shape, arr.dtype) if dest is None else dest
            if debug.ON:
                _said(ctx, "gather", None, "direct", arr.nbytes)
            if board.available(ctx):
                local.gather(ctx, arr.reshape(-1), out, r)
                tiny.learn(ctx, arr, (None, r), None, "gather")
            else:
                agreed(lambda c: gather_direct(c, arr, out, r))(ctx)
            return out
        return _fp("gather", arr, root=r), body
    return start(g, "gather", prepare, async_op, timeout)



def scatter(g: Comm, a: Any, root: int = 0, async_op: bool = False,
            timeout: float | None = None, dtype: Any = None,
            shape: tuple[int, ...] | None = None, out: np.ndarray | None = None) -> Any:
    """Row i of the root's ``a`` (shape (g.size, ...)) to rank i; returns this
    rank's row. ``a`` is ignored (may be None) on the other ranks; there
    ``dtype`` (a tensor's, given to get the row back as one like it) and
    ``shape`` are what the row must have: another raises MismatchError
    naming both (on every rank where the same-host board carries the
    call). ``out``: where the row goes (_into; given with ``dtype`` and
    ``shape`` off the root)."""
    def prepare(t: Tuning) -> tuple[dict, Body]:
        r = _root(g, root)
        src = dest = None
        if g.rank == r:
            src = np.asarray(_array("scatter", a), order="C")
            if src.ndim == 0 or src.shape[0] != g.size:
                raise ValueError(f"scatter needs the root's array shaped (group size "
                                 f"{g.size}, ...), got shape {src.shape}")
            dest = _into(out, src, src.shape[1:])
        elif dtype is not None and shape is not None:
            dest = _into(out, None, tuple(shape), dtype)
        want = None if dtype is None or g.rank == r else np.dtype(dtype)
        form = None if shape is None or g.rank == r else tuple(shape)

        def sockets(ctx: Ctx) -> np.ndarray:
            if src is None:
                row = ctx.recv(r)
                _row_as_wanted(ctx, want, form, row.dtype, row.shape, r)
                if dest is None:
                    return row
                dest[...] = row
                return dest
            row = np.empty(src.shape[1:], src.dtype) if dest is None else dest
            scatter_direct(ctx, src, row, r)
            return row

        def body(ctx: Ctx) -> np.ndarray:
            if debug.ON:
                _said(ctx, "scatter", None, "direct", None if src is None else src[0].nbytes)
            if board.available(ctx):
                row = local.scatter(ctx, src, r, lambda dt, sh: check(ctx, dt, sh), dest)
                tiny.learn_scatter(ctx, src, row, r, dtype, shape, check)
                return row
            return agreed(sockets)(ctx)

        def check(ctx: Ctx, dt: np.dtype, sh: tuple[int, ...]) -> None:
            _row_as_wanted(ctx, want, form, dt, sh, r)
        return _fp("scatter", root=r), body
    return start(g, "scatter", prepare, async_op, timeout)



def all_to_all(g: Comm, a: Any, async_op: bool = False, timeout: float | None = None,
               out: np.ndarray | None = None) -> Any:
    """Split ``a`` (a.shape[0] divisible by g.size) into g.size blocks of rows;
    block i goes to rank i. Returns the blocks received, in rank order,
    concatenated: the same shape as ``a``; into ``out`` when given (_into)."""
    def prepare(t: Tuning) -> tuple[dict, Body]:
        arr = np.asarray(_array("all_to_all", a), order="C")
        _rows("all_to_all", arr, g.size)
        dest = _into(out, arr, arr.shape)

        def body(ctx: Ctx) -> np.ndarray:
            out = np.empty_like(arr) if dest is None else dest
            blocks = (ctx.g.size, -1)
            if debug.ON:
                _said(ctx, "all_to_all", None, "direct", arr.nbytes)
            if board.available(ctx):
                local.all_to_all(ctx, arr.reshape(blocks), out.reshape(blocks))
                tiny.learn(ctx, arr, None, None, "all_to_all")
            else:
                all_to_all_direct(ctx, arr.reshape(blocks), out.reshape(blocks))
            return out
        return _fp("all_to_all", arr), body
    return start(g, "all_to_all", prepare, async_op, timeout)
