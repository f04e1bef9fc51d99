"""The collectives on host (numpy) arrays: argument checks, fingerprints,
and the path each call takes. Between processes of one host that may read
each other's memory: the board and cross-memory attach (collectives.shm);
otherwise an algorithm over sockets (ring, small, rooted, exchange, beside
this module), chosen by size or by ``algorithm=`` / MESH_COLL_ALGO
(collectives.plan.choose).

collectives.api runs these on host arrays, and on device arrays staged
whole through host memory.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from mesh import Comm, MeshError, MeshTimeoutError, MismatchError, device
from mesh.comm import group_rank_hint
from mesh.payload import MASKED, is_masked
from mesh.tensors import dtype_name, is_tensor

from .. import debug
from ..ops import OPS, resolve
from ..plan import TOPOLOGY_AWARE as plan_TOPOLOGY_AWARE
from ..plan import Tuning, choose, layout, rd_peers, spans
from ..runner import Body, Ctx, agreed, named, start
from ..shm import board, local, tiny
from . import hier, link
from . import tiny as hier_tiny
from .exchange import (all_gather_object_direct, all_to_all_direct, all_to_all_object_direct,
                       as_received, broadcast_object_tree)
from .ring import ring
from .rooted import (broadcast_chain, broadcast_tree, gather_direct, reduce_chain,
                     reduce_tree, scatter_direct)
from .small import all_reduce_rd, barrier_dissemination

__all__ = ["all_reduce", "broadcast", "reduce", "all_gather", "reduce_scatter", "gather",
           "scatter", "all_to_all", "all_to_all_v", "all_gather_v", "reduce_scatter_v", "gather_v",
           "scatter_v", "scan", "barrier", "broadcast_object", "all_gather_object",
           "all_to_all_object", "gather_object", "scatter_object"]


_ONE_ARRAY = {      # what to do with a list of arrays, by collective ("": the others)
    "": "call it once per array, or stack them into one (np.stack, torch.stack)",
    "all_reduce": "call it once per array, or stack them into one (np.stack, torch.stack; "
                  "collectives.all_reduce_grads(g, grads) reduces a list of gradients)",
    "scatter": "stack the rows for the ranks into one, shaped (group size, ...) (np.stack, "
               "torch.stack)",
    "all_to_all": "stack them into one (np.stack, torch.stack; all_to_all sends its rows in "
                  "rank order), or for blocks of unequal sizes use "
                  "collectives.all_to_all_v(g, rows, send_counts)",
    "all_to_all_v": "concatenate the blocks for the ranks into one, in rank order "
                    "(np.concatenate, torch.cat), with send_counts their numbers of rows",
}


def _array(name: str, a: Any, writable: bool = False) -> np.ndarray:
    if is_masked(a):
        raise TypeError(f"{name}: {MASKED}")
    if not isinstance(a, np.ndarray):
        kind = f"{type(a).__module__}.{type(a).__name__}"
        if is_tensor(a) or device.is_device(a):     # collectives.host.paths called directly
            raise TypeError(f"{name}: collectives.host.paths takes numpy arrays; torch tensors "
                            f"and device arrays ({kind}) go through collectives.{name}")
        if hasattr(a, "__dlpack_device__"):
            raise TypeError(f"{name}: a {kind} is neither a numpy array, a torch tensor nor "
                            f"a CUDA array; np.from_dlpack(a) gives a numpy array of it")
        if isinstance(a, (list, tuple)) and any(isinstance(x, np.ndarray) or is_tensor(x)
                                                or device.is_device(x) for x in a):
            raise TypeError(f"{name} takes one array (or tensor), got a {type(a).__name__} "
                            f"of {len(a)}: {_ONE_ARRAY.get(name, _ONE_ARRAY[''])}")
        if writable:
            raise TypeError(f"{name} works in place: it needs an array it can write (a "
                            f"numpy array, a torch tensor or a device array), got "
                            f"{type(a).__name__}")
        given, a = a, np.asarray(a)
        if a.dtype.kind not in "biufc" or a.dtype.fields is not None:
            raise TypeError(f"{name}: takes a numeric or bool array, got "
                            f"{kind.removeprefix('builtins.')} "
                            f"{given!r:.60}")
    if a.dtype.kind not in "biufc" or a.dtype.fields is not None:
        raise TypeError(f"{name}: dtype {a.dtype} cannot be sent; numeric and bool arrays only")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} works in place but the array is read-only")
    return a


def _into(out: Any, arr: np.ndarray | None, shape: tuple[int, ...],
          dtype: Any = None, mine: int | None = None) -> Any:
    """``out`` (a result's memory given by the caller: the torch backend's
    output tensor, so that no second result of its size is made) as the
    result's ``shape``, or None where it cannot be written straight: not a
    C-contiguous writable array of ``arr``'s dtype (``dtype`` where there is
    no ``arr``) and size, or one that overlaps ``arr`` (the call then makes
    its own and the caller copies). A list (of shape[0] such arrays apart
    from each other, one per row) is returned as the list of its rows, each
    shaped shape[1:]. ``arr`` may be row ``mine`` of ``out`` exactly (a
    gather's own row, in place as FSDP passes it: the paths write there
    only the values it holds)."""
    if isinstance(out, list):
        return _apart([_into(o, arr, shape[1:], dtype, 0 if j == mine else None)
                       for j, o in enumerate(out)], shape[0])
    want = np.dtype(dtype) if arr is None else arr.dtype
    if (out is None or type(out) is not np.ndarray or out.dtype != want
            or dtype_name(out.dtype) != dtype_name(want)
            or out.size != math.prod(shape) or not out.flags.c_contiguous
            or not out.flags.writeable):
        return None
    if arr is not None and np.may_share_memory(out, arr) and (
            mine is None or not arr.flags.c_contiguous
            or arr.ctypes.data != out.ctypes.data + mine * arr.nbytes):
        return None
    return out.reshape(shape)


def _apart(rows: list[Any], n: int) -> list[Any] | None:
    """``rows`` (_into's of a list), or None where they are not ``n``, one
    is None or two overlap."""
    if len(rows) != n or any(o is None for o in rows):
        return None
    spans = sorted((o.ctypes.data, o.nbytes) for o in rows)
    return None if any(a + k > b for (a, k), (b, _) in zip(spans, spans[1:])) else rows


def _fp(coll: str, a: np.ndarray | None = None, **kw: Any) -> dict:
    fp: dict[str, Any] = {"coll": coll}
    if a is not None:
        fp["dtype"] = dtype_name(a.dtype)
        fp["shape"] = list(a.shape)
    fp.update((k, v) for k, v in kw.items() if v is not None)
    return fp


def _root(g: Comm, root: int) -> int:
    if not isinstance(root, (int, np.integer)) or not 0 <= root < g.size:
        hint = group_rank_hint(g, root)
        raise ValueError(f"root {root!r} is not a rank of group {g.name} "
                         f"(0..{g.size - 1}{f'; {hint}' if hint else ''})")
    return int(root)


def _rows(name: str, a: np.ndarray, n: int) -> None:
    if a.ndim == 0 or a.shape[0] % n:
        raise ValueError(f"{name} needs a.shape[0] divisible by the group size {n}, "
                         f"got shape {a.shape}")


def _skipped(g: Comm, coll: str, a: Any, root: Any, algorithm: str | None,
             size: Callable[[], int] | None = None) -> Callable[[BaseException, int], None]:
    """For runner.start: when this rank's call fails before its body runs
    and the call runs in two levels, the phases its peers run fail too
    (hier.refuse), so they raise instead of waiting and every sub-group's
    calls stay numbered alike. ``size()``: the bytes the call's layout is
    chosen by, where ``a``'s do not say them (the uneven calls' counts)."""
    def fail(e: BaseException, tag: int) -> None:
        try:
            t = Tuning.from_env()
        except ValueError:  # (the call's own error, e, says so, named: a bare one replaced it)
            t = Tuning()
        try:
            lay = layout(coll, t, algorithm)
        except Exception:
            lay = None
        nbytes = getattr(a, "nbytes", 0) * (g.size if coll == "all_gather" else 1)
        if size is not None:
            try:
                nbytes = size()
            except Exception:   # (counts that fail the call: a's bytes, as said above)
                pass
        if _hierarchical(g.size, coll, lay, nbytes, t):
            try:        # the size rule of the body: the leaders' (columns') algorithm
                large = choose("all_reduce", nbytes, t,
                               algorithm if coll == "all_reduce" else "hier") == "ring"
            except ValueError:
                large = nbytes >= t.small
            hier.refuse(g, tag, coll, root, large, nbytes, e)
    return fail


def _hierarchical(size: int, coll: str, lay: bool | None, nbytes: int, t: Tuning) -> bool:
    """Whether a call may run hierarchically (if its group's layout over
    hosts says so): ``lay`` (collectives.plan.layout) True forces it, False
    forbids it; None chooses it for all_reduce (and reduce_scatter, which
    runs it) at every size (small: one board round on the host around one
    exchange between the leaders), for all_gather and broadcast from
    MESH_COLL_SMALL up (below, the flat tree and ring are quicker)."""
    if lay is False or size < 3:
        return False
    return bool(lay) or nbytes >= t.small or coll in ("all_reduce", "reduce_scatter")


def _topology(ctx: Ctx, coll: str, lay: bool | None, nbytes: int) -> hier.Topology | None:
    """The group's layout over hosts when the call runs hierarchically, else
    None: the flat algorithms (_hierarchical)."""
    if not _hierarchical(ctx.g.size, coll, lay, nbytes, ctx.tuning):
        return None
    return hier.topology(ctx.g)


_SOCKETS = {"rd": "recursive doubling", "ring": "ring", "tree": "binomial tree",
            "chain": "chain", "direct": "direct", "dissemination": "dissemination"}
"""What an algorithm's name is in MESH_COLL_DEBUG's line."""


def _said(ctx: Ctx, coll: str, topo: hier.Topology | None, alg: str,
          nbytes: int | None = None, lay: bool | None = False, kind: str = "") -> None:
    """MESH_COLL_DEBUG's line for this call (collectives.debug): the path
    the body below takes (the two levels' form; the same-host board; else
    ``alg`` over sockets), and why, where forced (``lay``: the layout
    MESH_COLL_ALGO or ``algorithm=`` forced, else None). ``kind``: the
    collective whose paths ``coll`` takes (an uneven call's even one)."""
    kind = kind or coll
    if topo is not None:
        path = hier.form(topo, kind, alg in ("ring", "chain"), nbytes or 0)
    elif ctx.g.size > 1 and board.available(ctx, (nbytes or 0) if coll == "all_reduce"
                                            and alg == "rd" else 0):     # (the body's ask)
        path = f"same-host board ({'small' if alg == 'rd' else 'large'})" \
            if coll == "all_reduce" else "same-host board"
    else:
        path = f"flat, {_SOCKETS.get(alg, alg)} over sockets"
    if lay is not None and kind in plan_TOPOLOGY_AWARE:
        path += " (forced: two levels)" if lay else " (forced: flat)"
    debug.note(ctx.g, coll, path, nbytes)


def _in_place(a: np.ndarray, body: Callable[[Ctx, np.ndarray], None],
              written: bool = True) -> Body:
    """Run ``body`` on a flat contiguous view of ``a`` (a contiguous copy
    written back when ``a`` is not C-contiguous and ``written``: not off a
    reduce's root, whose array is only read and may be read-only); return
    ``a``. A numpy subclass goes as a plain view of its memory: an
    np.matrix stays 2-d when reshaped, and the paths that cut it in chunks
    cut its rows."""
    def run(ctx: Ctx) -> np.ndarray:
        plain = a if type(a) is np.ndarray else a.view(np.ndarray)
        work = plain if plain.flags.c_contiguous else np.ascontiguousarray(plain)
        body(ctx, work.reshape(-1))
        if work is not plain and written:
            plain[...] = work
        return a
    return run


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
    return start(g, "all_reduce", prepare, async_op, timeout,
                 _skipped(g, "all_reduce", a, 0, algorithm))


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


def _counts_fp(counts: list[int]) -> Any:
    """Row counts as an uneven call's fingerprint holds them: the list, so
    that a rank given other counts raises MismatchError naming both lists
    (on every rank: the fingerprint travels with every message and every
    board post); in a large group one that packs short (its first counts,
    their number, sum and a digest), which still tells the lists apart."""
    if len(counts) <= 64:
        return list(counts)
    import hashlib
    digest = hashlib.blake2b(np.asarray(counts, np.int64).tobytes(), digest_size=6).hexdigest()
    return f"{str(list(counts[:6]))[:-1]}, ...] ({len(counts)} counts, sum {sum(counts)}, " \
           f"digest {digest})"


def _passes(check: Callable[[], Any] | None) -> bool:
    """Whether an uneven call's ``check`` passes, run before the call (the
    short way's, collectives.shm.tiny: a call whose check raises takes the
    long way, which raises it under the call's tag, on every rank)."""
    if check is not None:
        try:
            check()
        except Exception:
            return False
    return True


def _parts_into(out: Any, arr: np.ndarray, counts: list[int], g: Comm) -> list[Any] | None:
    """An uneven all_gather's ``out`` (a list of g.size arrays, one a rank:
    counts[j] rows of arr.shape[1:]) as _into takes each, or None."""
    return _apart([_into(o, arr, (k,) + arr.shape[1:], mine=0 if j == g.rank else None)
                   for j, (o, k) in enumerate(zip(out, counts))], g.size)


def _uneven(name: str, a: Any, counts: list[int], n: int, want: int | None = None
            ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """An uneven call's array (C-contiguous, with rows) and its chunks: the
    flat [lo, hi) of each rank's ``counts`` rows, in rank order, in an
    array of sum(counts) rows of a.shape[1:]. ``want``: the rows ``a`` must
    have (else ValueError, naming the rows and the counts)."""
    arr = np.asarray(_array(name, a), order="C")
    if arr.ndim == 0:
        raise ValueError(f"{name}: needs an array of rows, got a 0-d array")
    if len(counts) != n or any(not isinstance(k, (int, np.integer)) or isinstance(k, bool)
                               or k < 0 for k in counts):
        raise ValueError(f"{name}: counts must be {n} integers >= 0 (one a rank), got "
                         f"{list(counts)!r:.200}")
    if want is not None and arr.shape[0] != want:
        raise ValueError(f"{name}: the array has {arr.shape[0]} rows where counts "
                         f"{_counts_fp(list(counts))} give it {want}")
    row = math.prod(arr.shape[1:])     # (plain ints: numpy's cumsum cost a small call 10 us more)
    return arr, spans([int(k) * row for k in counts])


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


def _row_as_wanted(ctx: Ctx, want: np.dtype | None, form: tuple[int, ...] | None,
                   got: np.dtype, shape: tuple[int, ...], root: int, row: str = "row") -> None:
    """A scatter's row of dtype ``got`` and ``shape`` is what this rank
    wants (``want``, ``form``: None, anything), or MismatchError, inside
    the call (which aborts it)."""
    if want is not None and (want != got or dtype_name(want) != dtype_name(got)):
        raise MismatchError(f"{ctx.where()}: {named(ctx.g, ctx.g.rank)} wants its {row} as "
                            f"{dtype_name(want)} (its tensor's dtype, or dtype=) but "
                            f"{named(ctx.g, root, 'root')} scatters {dtype_name(got)}")
    if form is not None and tuple(form) != tuple(shape):
        raise MismatchError(f"{ctx.where()}: {named(ctx.g, ctx.g.rank)} wants its row shaped "
                            f"{list(form)} but {named(ctx.g, root, 'root')} scatters rows "
                            f"shaped {list(shape)}")


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
                    if before is None:
                        before = lower.copy()
                    else:
                        rop.combine(before, lower, src_first=True)
                    rop.combine(held, lower, src_first=True)
                d *= 2
            return before if exclusive else held
        return _fp(name, arr, op=op), body
    return start(g, name, prepare, async_op, timeout)


def barrier(g: Comm, async_op: bool = False, timeout: float | None = None) -> Any:
    """Return once every member of ``g`` has entered the barrier."""
    def body(ctx: Ctx) -> None:
        if debug.ON:
            _said(ctx, "barrier", None, "dissemination")
        if board.available(ctx):
            local.barrier(ctx)
        else:
            barrier_dissemination(ctx)
    return start(g, "barrier", lambda t: (_fp("barrier"), body), async_op, timeout)


def _like(cause: MeshError, text: str) -> MeshError:
    """An error of ``cause``'s class (a lost peer's names the peer) saying ``text``."""
    e = type(cause)(text)
    if hasattr(cause, "peer"):
        e.peer = cause.peer      # type: ignore[attr-defined]
    return e


def monitored_barrier(g: Comm, timeout: float | None = None,
                      wait_all_ranks: bool = False) -> None:
    """torch's monitored barrier, in gloo's words: every member reports to
    rank 0, which waits for each until ``timeout`` (default: the group's)
    and then releases them all. Rank 0 raises naming the first member (with
    ``wait_all_ranks``, every member) that did not come or died ("Rank 1
    failed to pass monitoredBarrier in 2000 ms: ..."); the others raise
    saying they came but were not released ("Rank 2 successfully reached
    monitoredBarrier, but received errors while waiting for send/recv from
    rank 0: ...", by rank 0's abort; they wait up to a second longer than
    rank 0 for it). Ranks are the group's."""
    secs = float(g.timeout) if timeout is None else float(timeout)

    def body(ctx: Ctx) -> None:
        if g.rank:
            ctx.send(None, 0)
            ctx.recv(0)
            return
        came = [(r, ctx.irecv(r)) for r in range(1, g.size)]
        failed: list[tuple[int, MeshError]] = []
        for r, req in came:
            if failed and not wait_all_ranks:
                break
            try:
                req.wait()
            except MeshError as e:
                failed.append((r, e))
        if failed:
            for _, req in came:
                if not req.done():
                    req.req.cancel()
            who, cause = [r for r, _ in failed], failed[0][1]
            late = f" in {secs * 1e3:g} ms" if isinstance(cause, MeshTimeoutError) else ""
            raise _like(cause, f"Rank{'s' if len(who) > 1 else ''} {', '.join(map(str, who))} "
                               f"failed to pass monitoredBarrier{late}: {cause}") from cause
        for req in [ctx.isend(None, r) for r in range(1, g.size)]:
            req.wait()

    def prepare(t: Tuning) -> tuple[dict, Body]:
        if secs <= 0:
            raise MeshTimeoutError(f"Rank {g.rank} timed out in monitoredBarrier after 0 ms")
        return _fp("monitored_barrier"), body
    try:    # the others wait a little longer, so that rank 0's verdict reaches them first
        start(g, "monitored_barrier", prepare, False,
              max(secs, 0.0) + (min(secs, 1.0) if g.rank and secs > 0 else 0.0))
    except MeshError as e:
        if g.rank and secs > 0:     # (rank 0's abort may come before this rank starts)
            raise _like(e, f"Rank {g.rank} successfully reached monitoredBarrier, but "
                           f"received errors while waiting for send/recv from rank 0: "
                           f"{e}") from e
        if isinstance(e, MeshTimeoutError) and "monitoredBarrier" not in str(e):
            raise _like(e, f"Rank {g.rank} timed out in monitoredBarrier after "
                           f"{secs * 1e3:g} ms: {e}") from e     # (queued behind others)
        raise


def broadcast_object(g: Comm, obj: Any = None, root: int = 0, async_op: bool = False,
                     timeout: float | None = None) -> Any:
    """The root's msgpack-able ``obj`` on every rank (as msgpack returns it:
    tuples become lists)."""
    def prepare(t: Tuning) -> tuple[dict, Body]:
        r = _root(g, root)
        value = as_received(obj) if g.rank == r else None
        return _fp("broadcast_object", root=r), agreed(
            lambda ctx: broadcast_object_tree(ctx, value, r))
    return start(g, "broadcast_object", prepare, async_op, timeout)


def all_gather_object(g: Comm, obj: Any, async_op: bool = False,
                      timeout: float | None = None) -> Any:
    """The list of every rank's msgpack-able ``obj``, in rank order."""
    def prepare(t: Tuning) -> tuple[dict, Body]:
        value = as_received(obj)
        return _fp("all_gather_object"), lambda ctx: all_gather_object_direct(ctx, value)
    return start(g, "all_gather_object", prepare, async_op, timeout)


def gather_object(g: Comm, obj: Any, root: int = 0, async_op: bool = False,
                  timeout: float | None = None) -> Any:
    """The list of every rank's msgpack-able ``obj``, in rank order, on the
    root (mpi4py's ``gather``); None on the other ranks."""
    def prepare(t: Tuning) -> tuple[dict, Body]:
        r = _root(g, root)
        value = as_received(obj)

        def body(ctx: Ctx) -> Any:
            if ctx.g.rank != r:
                ctx.send(value, r)
                return None
            recvs = {p: ctx.irecv(p) for p in range(ctx.g.size) if p != r}
            return [value if i == r else recvs[i].wait() for i in range(ctx.g.size)]
        return _fp("gather_object", root=r), agreed(body)
    return start(g, "gather_object", prepare, async_op, timeout)


def all_to_all_object(g: Comm, objs: Any, async_op: bool = False,
                      timeout: float | None = None) -> Any:
    """Item j of this rank's list (or tuple) of g.size msgpack-able objects
    to rank j (mpi4py's ``alltoall``); returns the list of what every rank
    sent this one, in rank order (its own item at its own place)."""
    def prepare(t: Tuning) -> tuple[dict, Body]:
        values = _one_per_rank(g, objs, "all_to_all_object", "")
        return _fp("all_to_all_object"), lambda ctx: all_to_all_object_direct(ctx, values)
    return start(g, "all_to_all_object", prepare, async_op, timeout)


def _one_per_rank(g: Comm, objs: Any, coll: str, where: str) -> list[Any]:
    """``objs`` as sent, one a rank of ``g``; ValueError unless a list (or
    tuple) of g.size."""
    if not isinstance(objs, (list, tuple)) or len(objs) != g.size:
        got = (f"a {type(objs).__name__} of {len(objs)}"
               if isinstance(objs, (list, tuple)) else type(objs).__name__)
        raise ValueError(f"{coll} needs a list of {g.size} objects (one a rank){where}, "
                         f"got {got}")
    return [as_received(o) for o in objs]


def scatter_object(g: Comm, objs: Any = None, root: int = 0, async_op: bool = False,
                   timeout: float | None = None) -> Any:
    """Item i of the root's list (or tuple) of g.size msgpack-able objects
    on rank i (mpi4py's ``scatter``); ``objs`` is ignored (may be None) on
    the other ranks."""
    def prepare(t: Tuning) -> tuple[dict, Body]:
        r = _root(g, root)
        values = _one_per_rank(g, objs, "scatter_object", " on the root") if g.rank == r else []

        def body(ctx: Ctx) -> Any:
            if ctx.g.rank != r:
                return ctx.recv(r)
            sends = [ctx.isend(v, i) for i, v in enumerate(values) if i != r]
            for req in sends:
                req.wait()
            return values[r]
        return _fp("scatter_object", root=r), agreed(body)
    return start(g, "scatter_object", prepare, async_op, timeout)
