"""The short way of a tiny all_reduce, reduce_scatter, all_gather, reduce,
broadcast, gather, scatter or all_to_all (a payload that fits the board's
inline room, ranks of one host whose boards are all mapped, a blocking
call): what the first call of a (collective, group, dtype, shape, op,
root) settles through collectives.host.paths (argument checks,
fingerprint, algorithm, the board) is kept, and later calls under the same
tuning go straight to the board (collectives.shm.board.Quick): one post,
one poll per peer, and the result read straight out of the peers' mapped
boards, with nothing made per call but a new result::

    all_reduce       the reduction in rank order, into the caller's array
    reduce_scatter   this rank's chunk: its own, then the peers' in ring
                     order from rank + 1 (collectives.shm.local.reduce_scatter's)
    all_gather       every rank's post copied into its row
    reduce           the root: the reduction in rank order; the others post
    broadcast        the others: the root's post copied into their array
    gather           the root: every rank's post copied into its row
    scatter          the root posts its rows, their dtype and shape after
                     them; the others copy their row where that meta is
                     the one they settled (off the root, the plan's key is
                     what the call says of the row: dtype=, shape=) and say
                     so, which the root waits for (local.scatter's small form)
    all_to_all       block ``rank`` of every rank's post copied into its block
    all_gather_v,    the uneven ones (collectives.host.paths; the plan's key
    gather_v,        holds the call's name and counts): all_gather's and
    reduce_scatter_v gather's with each rank's post of its own size,
    scatter_v,       reduce_scatter's with the counts' chunks, scatter's
    all_to_all_v     with each rank's block of the counts' rows; an
                     all_to_all_v's (its key this rank's send and receive
                     counts) with every rank's counts after its rows, each
                     peer's checked against those the plan settled before
                     its block is copied (local.all_to_all_v's small form)

It keeps the long way's guarantees: the fingerprint on the board is the
same (a rank on either way that called something else raises a
MismatchError on every rank), the call takes the group's next tag and its
deadline, and a failure aborts the tag on every member
(collectives.runner.now). A wait past board.Quick's (a spin where every
rank of the group has a core, then yields, 0.5 ms in all), a mismatch, or
a peer not done with the slot goes on as the long way does, with a Round,
from where the short way left off (collectives.shm.local's
all_reduce_small, reduce_scatter, all_gather, reduce, broadcast, gather,
scatter, all_to_all, all_to_all_v).
Anything the short way cannot take (async, an algorithm or a timeout that
is not a float; a non-contiguous or read-only array that the call writes;
an ``out`` that is not a C-contiguous writable array of the result's dtype
and size; a lane with work) takes the long way.

    tiny.py          the calls, and the plans each keeps per group
    tiny_reduce.py   the plans of all_reduce, reduce and reduce_scatter
                     (and reduce_scatter_v)
    tiny_move.py     the plans of broadcast, all_gather, gather, scatter
                     and all_to_all (and all_gather_v, gather_v, scatter_v,
                     all_to_all_v)
"""
from __future__ import annotations

import math
import threading
import weakref
from typing import Any

import msgpack
import numpy as np

from mesh import Comm
from mesh.tensors import dtype_name

from .. import debug
from ..ops import ReduceOp
from ..plan import Tuning, spans
from ..runner import NOT_NOW, Ctx, now
from . import board
from .local import scatter_meta
from .tiny_move import _Broadcast, _Collect, _Deal, _Exchange, _ExchangeV, _Gather, _GatherV
from .tiny_reduce import _Plan, _Reduce, _Scatter, _Short

__all__ = ["MAX_BYTES", "forget", "learn", "learn_scatter", "learn_v", "keep", "plan_key",
           "settled", "all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "gather",
           "scatter", "all_to_all", "all_gather_v", "gather_v", "reduce_scatter_v",
           "scatter_v", "all_to_all_v"]

MAX_BYTES = board.INLINE
"""The largest payload the short way takes: the board's inline room."""

PLANS = 512
"""The most plans a group keeps (``keep``)."""


_KINDS: dict[str, Any] = {"all_reduce": _Plan, "reduce_scatter": _Scatter,
                          "all_gather": _Gather, "reduce": _Reduce, "broadcast": _Broadcast,
                          "gather": _Collect, "all_to_all": _Exchange}

_plans: "weakref.WeakKeyDictionary[Comm, dict[tuple, _Short]]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_NO_LAST: tuple = (lambda: None, None, None, None, None, None)
_last: dict[str, tuple] = {}
"""Per collective, (group's weak reference, dtype, shape, op, root, plan)
of its last short call: a loop's next call finds its plan here for a third of
what the dictionaries cost (hashing a dtype alone costs about as much)."""


def plan_key(dtype: np.dtype, shape: tuple[int, ...], op: Any, coll: str = "all_reduce") -> tuple:
    """A plan's key: (dtype, shape, op), after the collective's name but
    for all_reduce's, and the dtype's name where it has metadata (bfloat16
    widened to float32, collectives.tensors), which numpy's dtype equality
    ignores: a bfloat16 call must not take a float32 call's plan, whose
    fingerprint would hide a mismatch between the two."""
    key = (dtype, shape, op) if coll == "all_reduce" else (coll, dtype, shape, op)
    return key if dtype.metadata is None else key + (dtype_name(dtype),)


def forget(g: Comm) -> None:
    """Drop ``g``'s short-way plans (their views are of boards that
    board.forget took out of use): its next calls take the long way."""
    with _lock:
        _plans.pop(g, None)
        _last.clear()


def learn(ctx: Ctx, arr: np.ndarray, op: Any, rop: ReduceOp | None,
          coll: str = "all_reduce") -> bool:
    """Keep what ``ctx``'s ``coll`` of ``arr`` settled, for the short way:
    called by the long way after a call on the board's payloads
    (all_reduce_small, a small reduce_scatter or all_gather) that any later
    blocking call with these arguments and this tuning would repeat. Whether
    it is kept (collectives.host.tiny's host step takes it)."""
    if arr.nbytes > MAX_BYTES or not board.mapped(ctx.g):
        return False
    if coll != "all_reduce" and (arr.nbytes > ctx.tuning.small or not arr.size):
        return False        # (the long way's large form, or nothing to gain)
    if keep(_plans, ctx, plan_key(arr.dtype, arr.shape, op, coll),
            lambda: _KINDS[coll](ctx, arr, rop)):
        _last.clear()
    return True


def _row_key(dtype: Any, shape: Any, root: Any, counts: Any = None) -> tuple:
    """A scatter's plan key off the root: what its call says of the row it
    wants (``dtype=``, ``shape=``; None where not given; a scatter_v's
    ``counts`` after them)."""
    want = None if dtype is None else np.dtype(dtype)
    key = ("scatter row", None if want is None else (want, dtype_name(want)),
           None if shape is None else tuple(shape), root)
    return key if counts is None else key + (tuple(counts),)


def learn_scatter(ctx: Ctx, src: np.ndarray | None, row: np.ndarray, root: int,
                  dtype: Any, shape: Any, check: Any, counts: list[int] | None = None) -> None:
    """learn's, for a scatter that local.scatter ran in its small form:
    the root keeps its rows' plan (``src``), the others theirs for what
    their call said of the row (``dtype``, ``shape``: _row_key), ``row``'s
    dtype and shape settled, ``check`` the call's own (what a Round that
    finds other rows runs). ``counts``: a scatter_v's (``row`` this rank's
    block of them, ``src`` the root's sum(counts) rows)."""
    if counts is None:
        if ctx.g.size * row.nbytes > MAX_BYTES or not row.size or not board.mapped(ctx.g):
            return
        rows = src if src is not None else np.empty((ctx.g.size,) + row.shape, row.dtype)
    else:
        rows = src if src is not None else np.empty((sum(counts),) + row.shape[1:], row.dtype)
        if rows.nbytes > MAX_BYTES or not rows.size or not board.mapped(ctx.g):
            return
    if rows.nbytes + len(scatter_meta(rows.dtype, rows.shape[1:])) > min(MAX_BYTES,
                                                                         ctx.tuning.small):
        return      # (local.scatter's large form)
    if src is None:
        key = _row_key(dtype, shape, root, counts)
    elif counts is None:
        key = plan_key(rows.dtype, rows.shape, (None, root), "scatter")
    else:
        key = plan_key(rows.dtype, rows.shape, (None, root, tuple(counts)), "scatter_v")
    if keep(_plans, ctx, key, lambda: _Deal(ctx, rows, check, counts)):
        _last.clear()


def learn_v(ctx: Ctx, arr: np.ndarray, counts: list[int], root: int | None = None,
            op: Any = None, rop: ReduceOp | None = None, recvs: list[int] | None = None,
            metas: list[bytes] | None = None, sizes: str = "") -> None:
    """learn's, for an uneven call that its long way ran on the board's
    payloads (collectives.host.paths: all_gather_v, gather_v, and
    reduce_scatter_v where ``rop`` is given; ``arr`` this rank's rows, or
    the whole array a reduce_scatter_v posts, ``counts`` the rows of each
    rank, ``root`` a gather_v's; all_to_all_v where ``recvs`` is given:
    ``counts`` the rows this rank sends each rank, ``recvs`` those it
    receives, ``metas`` every rank's counts as posted, ``sizes`` the call's
    word for them): the plan's key holds the call's name (the
    fingerprint's: the torch backend's all_gather) and the counts."""
    rows, n = math.prod(arr.shape[1:]), ctx.g.size
    if metas is not None:       # (each rank's post: its rows and its counts)
        items = [sum(msgpack.unpackb(m)[0]) * rows for m in metas]
        if max(k * arr.itemsize + len(m) for k, m in zip(items, metas)) > min(
                MAX_BYTES, ctx.tuning.small) or not any(items) or not board.mapped(ctx.g):
            return      # (a post past the board's inline room, or nothing to gain)
        key = (ctx.fp["coll"], tuple(counts), tuple(recvs or ()), sizes)
        keep(_plans, ctx, plan_key(arr.dtype, arr.shape, key, "v"),
             lambda: _ExchangeV(ctx, arr, counts, recvs or [], metas, sizes))
        return
    items = [arr.size] * n if rop is not None else [k * rows for k in counts]
    if max(items) * arr.itemsize > min(MAX_BYTES, ctx.tuning.small) or not any(items) \
            or not board.mapped(ctx.g):
        return      # (the long way's large form, or nothing to gain)
    name = ctx.fp["coll"]
    if rop is not None:
        bounds = spans([k * rows for k in counts])
        keep(_plans, ctx, plan_key(arr.dtype, arr.shape, (name, tuple(counts), op), "v"),
             lambda: _Scatter(ctx, arr, rop, bounds))
    elif root is None:
        keep(_plans, ctx, plan_key(arr.dtype, arr.shape, (name, tuple(counts)), "v"),
             lambda: _GatherV(ctx, arr, items))
    else:
        keep(_plans, ctx, plan_key(arr.dtype, arr.shape, (name, tuple(counts), root), "v"),
             lambda: _Collect(ctx, arr, None, items))


def keep(plans_of: "weakref.WeakKeyDictionary[Comm, dict[tuple, Any]]", ctx: Ctx, key: tuple,
         make: Any) -> bool:
    """Keep ``make()`` as ``ctx``'s group's plan for ``key`` in ``plans_of``
    unless one made under the same tuning is there (the short ways' plans:
    here and collectives.host.tiny); whether a new one was kept. A group
    keeps at most PLANS of them, the oldest made dropped first (a program
    whose tiny calls change shape or counts call after call: each kept its
    plan for good; a call whose plan went takes the long way once again)."""
    with _lock:
        plans = plans_of.get(ctx.g)
        if plans is None:
            plans = plans_of[ctx.g] = {}
        plan = plans.get(key)
        if plan is not None and plan.tuning is ctx.tuning:
            return False
        plans.pop(key, None)
        while len(plans) >= PLANS:
            del plans[next(iter(plans))]
        plans[key] = make()
        return True


def _find(coll: str, g: Comm, a: np.ndarray, op: Any, timeout: Any, root: Any = None) -> Any:
    """``coll``'s plan for ``a`` on ``g`` (and ``op``, ``root``: a rooted
    call's plan key holds both) where the call may take the short way (the
    tuning it was settled under, a timeout it takes), else None."""
    ref, dtype, shape, last_op, last_root, plan = _last.get(coll, _NO_LAST)
    if (ref() is not g or dtype is not a.dtype or last_op is not op or last_root is not root
            or shape != a.shape):
        if root is not None and type(root) is not int:
            return None     # (the long way checks it)
        try:
            plan = _plans[g][plan_key(a.dtype, a.shape, op if root is None else (op, root),
                                      coll)]
        except (KeyError, TypeError):
            return None
        _last[coll] = (weakref.ref(g), a.dtype, a.shape, op, root, plan)
    return _tuned(plan, timeout)


def settled(g: Comm, tuning: Tuning, a: np.ndarray, op: Any) -> Any:
    """The all_reduce plan of ``a`` and ``op`` on ``g``, settled under
    ``tuning``, else None: for a persistent all_reduce's start
    (collectives.persistent), which posts with the plan (runner.post) or,
    its tag taken already, takes its ``step`` as runner.now does (its
    ``rest`` run with the call's Ctx where it gives one)."""
    try:
        plan = _plans[g][plan_key(a.dtype, a.shape, op)]
    except (KeyError, TypeError):
        return None
    return plan if plan.tuning is tuning else None


def _tuned(plan: Any, timeout: Any) -> Any:
    """``plan`` where the call may take it (the tuning it was settled
    under, a timeout it takes), else None."""
    try:
        tuning = Tuning.from_env()
    except ValueError:      # (a bad MESH_COLL_*: the long way raises it, naming the call)
        return None
    if plan.tuning is not tuning or not (timeout is None or type(timeout) is float
                                         and timeout >= 0):
        return None
    return plan


def all_reduce(g: Comm, a: np.ndarray, op: Any, timeout: Any) -> np.ndarray | None:
    """``a`` all-reduced the short way, or None (nothing done, no tag taken)
    where the call must take the long way."""
    plan = _find("all_reduce", g, a, op, timeout)
    if plan is None:
        return None
    flags = a.flags
    if not flags.c_contiguous or not flags.writeable:
        return None
    if now(g, "all_reduce", plan.fp, plan.tuning, plan.step, a, timeout) is NOT_NOW:
        return None
    if debug.ON:
        debug.note(g, "all_reduce", SHORT_PATH, a.nbytes)
    return a


def _result(plan: Any, a: np.ndarray, out: Any) -> np.ndarray | None:
    """Where a call's result goes: ``out`` (the torch backend's output, as
    collectives.host.paths._into takes it) as the result's shape, where it
    is a C-contiguous writable array of the result's dtype and size; a new
    array where none is given; else None (the long way). ``out`` may
    overlap ``a``: the short way reads ``a`` only to post it, before it
    writes ``out``."""
    if out is None:
        return np.empty(plan.shape, a.dtype)
    if (type(out) is not np.ndarray or out.size != plan.size or out.dtype != a.dtype
            or dtype_name(out.dtype) != dtype_name(a.dtype) or not out.flags.c_contiguous
            or not out.flags.writeable):
        return None
    return out if out.shape == plan.shape else out.reshape(plan.shape)


def reduce_scatter(g: Comm, a: np.ndarray, op: Any, timeout: Any,
                   out: Any = None) -> np.ndarray | None:
    """This rank's rows of ``a`` reduce-scattered the short way (into
    ``out`` where given), or None (nothing done, no tag taken) where the
    call must take the long way."""
    plan = _find("reduce_scatter", g, a, op, timeout)
    if plan is None or (mine := _result(plan, a, out)) is None:
        return None
    if now(g, "reduce_scatter", plan.fp, plan.tuning, plan.step, (a, mine),
           timeout) is NOT_NOW:
        return None
    if debug.ON:
        debug.note(g, "reduce_scatter", SHORT_PATH, a.nbytes)
    return mine


def all_gather(g: Comm, a: np.ndarray, timeout: Any, out: Any = None) -> np.ndarray | None:
    """Every rank's ``a`` gathered the short way (into ``out`` where
    given), or None (nothing done, no tag taken) where the call must take
    the long way."""
    plan = _find("all_gather", g, a, None, timeout)
    if plan is None or (rows := _result(plan, a, out)) is None:
        return None
    if now(g, "all_gather", plan.fp, plan.tuning, plan.step, (a, rows), timeout) is NOT_NOW:
        return None
    if debug.ON:
        debug.note(g, "all_gather", SHORT_PATH, a.nbytes * plan.n)
    return rows


def reduce(g: Comm, a: np.ndarray, root: Any, op: Any, timeout: Any) -> np.ndarray | None:
    """``a`` reduced into the root's the short way, or None (nothing done,
    no tag taken) where the call must take the long way."""
    plan = _find("reduce", g, a, op, timeout, root)
    if plan is None or plan.rank == plan.root and not (a.flags.c_contiguous
                                                       and a.flags.writeable):
        return None
    if now(g, "reduce", plan.fp, plan.tuning, plan.step, a, timeout) is NOT_NOW:
        return None
    if debug.ON:
        debug.note(g, "reduce", SHORT_PATH, a.nbytes)
    return a


def broadcast(g: Comm, a: np.ndarray, root: Any, timeout: Any) -> np.ndarray | None:
    """The root's ``a`` copied into ``a`` the short way, or None (nothing
    done, no tag taken) where the call must take the long way."""
    plan = _find("broadcast", g, a, None, timeout, root)
    if plan is None or plan.rank != plan.root and not (a.flags.c_contiguous
                                                       and a.flags.writeable):
        return None
    if now(g, "broadcast", plan.fp, plan.tuning, plan.step, a, timeout) is NOT_NOW:
        return None
    if debug.ON:
        debug.note(g, "broadcast", SHORT_PATH, a.nbytes)
    return a


def gather(g: Comm, a: np.ndarray, root: Any, timeout: Any,
           out: Any = None) -> tuple[Any] | None:
    """Every rank's ``a`` gathered into the root's rows the short way (into
    ``out`` where given: an array, or a list of g.size rows, as
    collectives.host.paths._into makes them), as a 1-tuple of the rows (of
    None off the root), or None (nothing done, no tag taken) where the
    call must take the long way."""
    plan = _find("gather", g, a, None, timeout, root)
    if plan is None:
        return None
    rows: Any = None
    if plan.rank == plan.root:
        if isinstance(out, list):
            if len(out) != plan.n or any(type(o) is not np.ndarray or o.shape != a.shape
                                         or o.dtype != a.dtype for o in out):
                return None     # (host.paths._into's rows, where the torch backend's are)
            rows = out
        elif (rows := _result(plan, a, out)) is None:
            return None
    if now(g, "gather", plan.fp, plan.tuning, plan.step, (a, rows), timeout) is NOT_NOW:
        return None
    if debug.ON:
        debug.note(g, "gather", SHORT_PATH, a.nbytes)
    return (rows,)


def scatter(g: Comm, a: Any, root: Any, timeout: Any, dtype: Any = None, shape: Any = None,
            out: Any = None) -> np.ndarray | None:
    """This rank's row of the root's ``a`` the short way (into ``out``
    where given; off the root, ``a`` is ignored and ``dtype``, ``shape``
    are what the call says of the row, as collectives.host.paths.scatter
    takes them), or None (nothing done, no tag taken) where the call must
    take the long way."""
    try:
        plans = _plans[g]   # (before g's attributes: not a Comm, the long way says so)
    except (KeyError, TypeError):
        return None
    if type(root) is not int:
        return None
    if root == g.rank:
        if type(a) is not np.ndarray:
            return None
        plan = _find("scatter", g, a, None, timeout, root)
    else:
        try:
            plan = _tuned(plans[_row_key(dtype, shape, root)], timeout)
        except (KeyError, TypeError):
            return None
        a = None
    if plan is None:
        return None
    dt = plan.dtype
    if out is None:
        row = np.empty(plan.shape, dt)
    elif (type(out) is not np.ndarray or out.size != plan.size or out.dtype != dt
          or dtype_name(out.dtype) != dtype_name(dt) or not out.flags.c_contiguous
          or not out.flags.writeable):
        return None
    else:
        row = out.reshape(plan.shape)
    got = now(g, "scatter", plan.fp, plan.tuning, plan.step, (a, row, out is not None),
              timeout)
    if got is NOT_NOW:
        return None
    if debug.ON:
        debug.note(g, "scatter", SHORT_PATH, row.nbytes * plan.n)
    return row if got is None else got


def all_to_all(g: Comm, a: np.ndarray, timeout: Any, out: Any = None) -> np.ndarray | None:
    """``a``'s blocks exchanged the short way (into ``out`` where given),
    or None (nothing done, no tag taken) where the call must take the
    long way."""
    plan = _find("all_to_all", g, a, None, timeout)
    if plan is None or (mine := _result(plan, a, out)) is None:
        return None
    if now(g, "all_to_all", plan.fp, plan.tuning, plan.step, (a, mine), timeout) is NOT_NOW:
        return None
    if debug.ON:
        debug.note(g, "all_to_all", SHORT_PATH, a.nbytes)
    return mine


def _find_v(g: Comm, a: Any, op: tuple, timeout: Any) -> Any:
    """An uneven call's plan (learn_v's; ``op``: its key's name, counts and
    op or root) where the call may take the short way, else None: counts
    of plain ints (a bool is not the count its value is)."""
    if type(a) is not np.ndarray or any(type(k) is not int for k in op[1]):
        return None
    try:
        plan = _plans[g][plan_key(a.dtype, a.shape, op, "v")]
    except (KeyError, TypeError):
        return None
    return _tuned(plan, timeout)


def all_gather_v(g: Comm, a: Any, counts: list[int], timeout: Any, name: str = "all_gather_v",
                 out: list[np.ndarray] | None = None) -> Any:
    """Every rank's rows of ``a`` concatenated the short way (into ``out``
    where given: collectives.host.paths' rows of the caller's arrays, one
    a rank, returned), or None (nothing done, no tag taken) where the call
    must take the long way."""
    plan = _find_v(g, a, (name, tuple(counts)), timeout)
    if plan is None:
        return None
    return _into_parts(g, name, plan, a, out, timeout, plan.size * a.itemsize)


def _into_parts(g: Comm, name: str, plan: Any, a: np.ndarray, out: list[np.ndarray] | None,
                timeout: Any, nbytes: int) -> Any:
    """``plan``'s call on ``a`` into a new array of ``plan.shape`` (its
    parts ``plan.bounds``) or the caller's ``out`` (one array a part), which
    it returns; None where the call must take the long way (nothing done)."""
    if out is None:
        res: Any = np.empty(plan.shape, a.dtype)
        flat = res.reshape(-1)
        parts = [flat[lo:hi] for lo, hi in plan.bounds]
    else:
        res, parts = out, [o.reshape(-1) for o in out]
    if now(g, name, plan.fp, plan.tuning, plan.step, (a.reshape(-1), parts),
           timeout) is NOT_NOW:
        return None
    if debug.ON:
        debug.note(g, name, SHORT_PATH, nbytes)
    return res


def gather_v(g: Comm, a: Any, counts: list[int], root: Any, timeout: Any) -> Any:
    """Every rank's rows of ``a`` concatenated on the root the short way,
    as a 1-tuple of them (of None off the root), or None (nothing done, no
    tag taken) where the call must take the long way."""
    if type(root) is not int:
        return None     # (the long way checks it)
    plan = _find_v(g, a, ("gather_v", tuple(counts), root), timeout)
    if plan is None:
        return None
    res = rows = None
    if plan.rank == plan.root:
        res = np.empty((sum(counts),) + a.shape[1:], a.dtype)
        flat = res.reshape(-1)
        rows = [flat[lo:hi] for lo, hi in plan.bounds]
    if now(g, "gather_v", plan.fp, plan.tuning, plan.step, (a.reshape(-1), rows),
           timeout) is NOT_NOW:
        return None
    if debug.ON:
        debug.note(g, "gather_v", SHORT_PATH, a.nbytes)
    return (res,)


def reduce_scatter_v(g: Comm, a: Any, counts: list[int], op: Any, timeout: Any,
                     name: str = "reduce_scatter_v", out: np.ndarray | None = None) -> Any:
    """This rank's rows of ``a`` reduce-scattered the short way (into
    ``out`` where given: collectives.host.paths' array of the caller's,
    returned), or None (nothing done, no tag taken) where the call must
    take the long way."""
    plan = _find_v(g, a, (name, tuple(counts), op), timeout)
    if plan is None:
        return None
    mine = np.empty(plan.shape, a.dtype) if out is None else out
    if now(g, name, plan.fp, plan.tuning, plan.step, (a, mine), timeout) is NOT_NOW:
        return None
    if debug.ON:
        debug.note(g, name, SHORT_PATH, a.nbytes)
    return mine


def scatter_v(g: Comm, a: Any, counts: list[int], root: Any, timeout: Any,
              dtype: Any = None) -> np.ndarray | None:
    """This rank's block of the root's rows of ``a`` the short way (off
    the root, ``a`` is ignored and ``dtype`` is what the call says of the
    rows, as collectives.host.paths.scatter_v takes it), or None (nothing
    done, no tag taken) where the call must take the long way."""
    try:
        plans = _plans[g]
        if type(root) is not int or any(type(k) is not int for k in counts):
            return None
        if root == g.rank:
            if type(a) is not np.ndarray:
                return None
            plan = plans[plan_key(a.dtype, a.shape, (None, root, tuple(counts)), "scatter_v")]
        else:
            plan, a = plans[_row_key(dtype, None, root, counts)], None
    except (KeyError, TypeError):
        return None
    if (plan := _tuned(plan, timeout)) is None:
        return None
    row = np.empty(plan.shape, plan.dtype)
    got = now(g, "scatter_v", plan.fp, plan.tuning, plan.step, (a, row, False), timeout)
    if got is NOT_NOW:
        return None
    if debug.ON:
        debug.note(g, "scatter_v", SHORT_PATH, row.nbytes)
    return row if got is None else got


def all_to_all_v(g: Comm, a: Any, sends: list[int], recvs: list[int], timeout: Any,
                 sizes: str = "recv_counts vs send_counts", name: str = "all_to_all_v",
                 out: list[np.ndarray] | None = None) -> Any:
    """``a``'s uneven blocks exchanged the short way: ``sends[p]`` rows of
    ``a`` to rank p, ``recvs[p]`` rows from it (into ``out`` where given:
    collectives.host.paths' blocks of the caller's arrays, one a rank,
    returned), or None (nothing done, no tag taken) where the call must
    take the long way."""
    if type(recvs) is not list or any(type(k) is not int for k in recvs):
        return None
    plan = _find_v(g, a, (name, tuple(sends), tuple(recvs), sizes), timeout)
    if plan is None:
        return None
    return _into_parts(g, name, plan, a, out, timeout, a.nbytes)


SHORT_PATH = "same-host board, the short way (collectives.shm.tiny)"
"""MESH_COLL_DEBUG's line for a tiny call that took this way."""
