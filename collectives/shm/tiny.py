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

It keeps the long way's guarantees: the fingerprint on the board is the
same (a rank on either way that called something else raises a
MismatchError on every rank), the call takes the group's next tag and its
deadline, and a failure aborts the tag on every member
(collectives.runner.now). A wait past board.Quick's (a spin where every
rank of the group has a core, then yields, 0.5 ms in all), a mismatch, or
a peer not done with the slot goes on as the long way does, with a Round,
from where the short way left off (collectives.shm.local's
all_reduce_small, reduce_scatter, all_gather, reduce, broadcast, gather,
scatter, all_to_all).
Anything the short way cannot take (async, an algorithm or a timeout that
is not a float; a non-contiguous or read-only array that the call writes;
an ``out`` that is not a C-contiguous writable array of the result's dtype
and size; a lane with work) takes the long way.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

from mesh import Comm
from mesh.tensors import dtype_name

from .. import debug
from ..ops import FP_RAISED, ReduceOp
from ..plan import Tuning, ring_chunks
from ..runner import NOT_NOW, Body, Ctx, now
from . import board
from .local import all_gather as gather_small, all_reduce_small, reduce as reduce_small
from .local import all_to_all as exchange_small, gather as collect_small
from .local import broadcast as broadcast_small, reduce_scatter as scatter_small
from .local import scatter as deal_small, scatter_meta

__all__ = ["MAX_BYTES", "forget", "learn", "learn_scatter", "keep", "plan_key", "all_reduce",
           "reduce_scatter", "all_gather", "broadcast", "reduce", "gather", "scatter",
           "all_to_all"]

MAX_BYTES = board.INLINE
"""The largest payload the short way takes: the board's inline room."""


class _Short:
    """What every short way keeps of one (collective, group, dtype, shape,
    op): the tuning it was settled under, its fingerprint and board
    signature, the group's size and the board's Quick for the payload
    (``sizes``, ``tail``: Quick's, a scatter's)."""

    __slots__ = ("tuning", "fp", "sig", "n", "quick")

    def __init__(self, ctx: Ctx, arr: np.ndarray, sizes: list[int] | None = None,
                 tail: bytes = b"") -> None:
        self.tuning, self.fp = ctx.tuning, ctx.fp
        self.sig = board.signature(ctx.fp)
        self.n = ctx.g.size
        self.quick = board.Quick(ctx.g, arr, self.sig, sizes, tail)


class _Plan(_Short):
    """A tiny all_reduce: the op (its ufunc; ``avg``: whether the sum is
    divided) and the peers' receive buffers for a call that goes on with a
    Round."""

    __slots__ = ("rop", "outs", "ufunc", "later", "avg", "one")

    def __init__(self, ctx: Ctx, arr: np.ndarray, rop: ReduceOp) -> None:
        super().__init__(ctx, arr)
        self.rop, n = rop, self.n
        self.outs: list[np.ndarray | None] = [None if p == ctx.g.rank else np.empty_like(arr)
                                              for p in range(n)]
        self.ufunc = getattr(np, rop.ufunc_name)
        self.later = [tuple(views[2:]) for views in self.quick.views]
        self.avg = rop.name == "avg" and n > 1 and arr.size > 0    # (what rop.finish divides)
        # one element: each later combine through a buffer of its own, as
        # ReduceOp.combine's (numpy computes a one-element ufunc whose output
        # is its first operand another way: other bits than the ranks that
        # went on with a Round)
        self.one = np.empty_like(arr) if arr.size == 1 else None

    def step(self, tag: int, a: np.ndarray) -> Body | None:
        """runner.now's step: the call on the board's Quick; None once done,
        else the rest of it on a Round."""
        seq, quick = -tag, self.quick
        if not quick.post(seq, a):
            return self.rest(a, False)
        if not quick.arrived(seq):
            return self.rest(a, True)
        slot = seq & 1
        views, f = quick.views[slot], self.ufunc
        try:        # (collectives.ops.apply, inline: the short way's cost)
            f(views[0], views[1], out=a)    # in rank order, as _reduce_payloads combines
        except FP_RAISED:
            pass
        _combine(f, a, self.later[slot], self.one)
        quick.done(seq)
        if self.avg:
            self.rop.finish(a, self.n)
        return None

    def rest(self, buf: np.ndarray, posted: bool) -> Body:
        def run(ctx: Ctx) -> None:
            all_reduce_small(ctx, buf, self.rop, self.outs, self.sig, posted)
            self.rop.finish(buf, self.n)
        return run


class _Reduce(_Plan):
    """A tiny reduce: every rank posts, as the long way's non-roots do
    (its root posts nothing there: a root on the long way beside ranks on
    the short way goes on with a Round, whose gather does not weigh it);
    the root reduces all in rank order, as a tiny all_reduce does."""

    __slots__ = ("root", "rank")

    def __init__(self, ctx: Ctx, arr: np.ndarray, rop: ReduceOp) -> None:
        super().__init__(ctx, arr, rop)
        self.root, self.rank = ctx.fp["root"], ctx.g.rank

    def step(self, tag: int, a: np.ndarray) -> Body | None:
        if self.rank == self.root:
            return super().step(tag, a)
        seq, quick = -tag, self.quick
        if not quick.post(seq, a):
            return self.rest(a, False)
        if not quick.arrived(seq):
            return self.rest(a, True)
        quick.done(seq)
        return None

    def rest(self, buf: np.ndarray, posted: bool) -> Body:
        def run(ctx: Ctx) -> None:
            root = self.rank == self.root
            reduce_small(ctx, buf if root else np.ascontiguousarray(buf), self.rop, self.root,
                         self.outs, self.sig, posted)
            if root:
                self.rop.finish(buf, self.n)
        return run


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


def _combine(f: Any, acc: np.ndarray, later: tuple[np.ndarray, ...],
             one: np.ndarray | None) -> None:
    """``acc = acc (f) v`` for each of ``later`` in turn, as
    ReduceOp.combine does it (``one``: the buffer of a one-element ``acc``)."""
    for v in later:
        try:
            if one is None:
                f(acc, v, out=acc)
            else:
                f(acc, v, out=one)
        except FP_RAISED:
            pass
        if one is not None:
            acc[...] = one


class _Scatter(_Short):
    """A tiny reduce_scatter: the whole array posted, as the long way's
    small one posts it; this rank's chunk of its own post and of the
    peers' (per slot, ring order from rank + 1) as flat views, the shape
    of its result, the op."""

    __slots__ = ("rop", "ufunc", "avg", "one", "own", "later", "shape", "size", "bounds")

    def __init__(self, ctx: Ctx, arr: np.ndarray, rop: ReduceOp) -> None:
        super().__init__(ctx, arr)
        n, rank = self.n, ctx.g.rank
        self.rop, self.ufunc = rop, getattr(np, rop.ufunc_name)
        self.avg = rop.name == "avg"
        self.bounds = ring_chunks(arr.size, n)
        lo, hi = self.bounds[rank]
        flat = [[v.reshape(-1)[lo:hi] for v in views] for views in self.quick.views]
        self.own = [views[rank] for views in flat]
        self.later = [tuple(views[(rank + k) % n] for k in range(1, n)) for views in flat]
        self.shape = (arr.shape[0] // n,) + arr.shape[1:]
        self.size = hi - lo
        self.one = np.empty(1, arr.dtype) if hi - lo == 1 else None

    def step(self, tag: int, arg: tuple[np.ndarray, np.ndarray]) -> Body | None:
        a, out = arg
        seq, quick = -tag, self.quick
        if not quick.post(seq, a):
            return self.rest(a, out, False)
        if not quick.arrived(seq):
            return self.rest(a, out, True)
        slot = seq & 1
        mine = out.reshape(-1)
        mine[...] = self.own[slot]
        _combine(self.ufunc, mine, self.later[slot], self.one)
        quick.done(seq)
        if self.avg:
            self.rop.finish(out, self.n)
        return None

    def rest(self, a: np.ndarray, out: np.ndarray, posted: bool) -> Body:
        def run(ctx: Ctx) -> None:
            scatter_small(ctx, np.ascontiguousarray(a).reshape(-1), out.reshape(-1), self.rop,
                          self.bounds, self.sig, posted)
            self.rop.finish(out, self.n)
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


class _Collect(_Short):
    """A tiny gather: every rank posts, the root too (the long way's root
    posts nothing: as _Reduce's); the root copies each post into its row."""

    __slots__ = ("root", "rank", "shape", "size")

    def __init__(self, ctx: Ctx, arr: np.ndarray, rop: Any = None) -> None:
        super().__init__(ctx, arr)
        self.root, self.rank = ctx.fp["root"], ctx.g.rank
        self.shape = (self.n,) + arr.shape
        self.size = self.n * arr.size

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
                          sig=self.sig, posted=posted)
        return run


class _Deal(_Short):
    """A tiny scatter (local.scatter's small form): the root posts its rows
    with their meta after them, the others copy their row out of the
    root's post where its meta is the one they settled (else they go on
    with a Round, which reads any) and say so (stage 2), which the root
    waits for: a rank that refuses the rows (dtype=, shape=) fails the
    root's call too. ``arr``: the root's rows, or off the root an array
    like them."""

    __slots__ = ("root", "rank", "shape", "size", "dtype", "meta", "others", "check", "mine")

    def __init__(self, ctx: Ctx, arr: np.ndarray, check: Any) -> None:
        n, root = ctx.g.size, ctx.fp["root"]
        self.meta = scatter_meta(arr.dtype, arr.shape[1:])
        sizes = [0] * n
        sizes[root] = arr.nbytes + len(self.meta)
        super().__init__(ctx, arr, sizes, self.meta if ctx.g.rank == root else b"")
        self.root, self.rank, self.check = root, ctx.g.rank, check
        self.shape, self.size, self.dtype = arr.shape[1:], arr[0].size, arr.dtype
        self.others = [p for p in range(n) if p != root]
        self.mine = [views[root][self.rank] for views in self.quick.views]

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
                              out if given or a is not None else None, sig=self.sig,
                              posted=posted)
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


def _row_key(dtype: Any, shape: Any, root: Any) -> tuple:
    """A scatter's plan key off the root: what its call says of the row it
    wants (``dtype=``, ``shape=``; None where not given)."""
    want = None if dtype is None else np.dtype(dtype)
    return ("scatter row", None if want is None else (want, dtype_name(want)),
            None if shape is None else tuple(shape), root)


def learn_scatter(ctx: Ctx, src: np.ndarray | None, row: np.ndarray, root: int,
                  dtype: Any, shape: Any, check: Any) -> None:
    """learn's, for a scatter that local.scatter ran in its small form:
    the root keeps its rows' plan (``src``), the others theirs for what
    their call said of the row (``dtype``, ``shape``: _row_key), ``row``'s
    dtype and shape settled, ``check`` the call's own (what a Round that
    finds other rows runs)."""
    if ctx.g.size * row.nbytes > MAX_BYTES or not row.size or not board.mapped(ctx.g):
        return
    rows = src if src is not None else np.empty((ctx.g.size,) + row.shape, row.dtype)
    if rows.nbytes + len(scatter_meta(rows.dtype, rows.shape[1:])) > min(MAX_BYTES,
                                                                         ctx.tuning.small):
        return      # (local.scatter's large form)
    key = plan_key(rows.dtype, rows.shape, (None, root), "scatter") if src is not None \
        else _row_key(dtype, shape, root)
    if keep(_plans, ctx, key, lambda: _Deal(ctx, rows, check)):
        _last.clear()


def keep(plans_of: "weakref.WeakKeyDictionary[Comm, dict[tuple, Any]]", ctx: Ctx, key: tuple,
         make: Any) -> bool:
    """Keep ``make()`` as ``ctx``'s group's plan for ``key`` in ``plans_of``
    unless one made under the same tuning is there (the short ways' plans:
    here and collectives.host.tiny); whether a new one was kept."""
    with _lock:
        plans = plans_of.get(ctx.g)
        if plans is None:
            plans = plans_of[ctx.g] = {}
        plan = plans.get(key)
        if plan is not None and plan.tuning is ctx.tuning:
            return False
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


SHORT_PATH = "same-host board, the short way (collectives.shm.tiny)"
"""MESH_COLL_DEBUG's line for a tiny call that took this way."""
