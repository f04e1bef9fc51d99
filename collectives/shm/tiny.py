"""The short way of a tiny all_reduce (a payload that fits the board's
inline room, ranks of one host whose boards are all mapped, a blocking
call): what the first call of a (group, dtype, shape, op) settles through
collectives.host.paths (argument checks, fingerprint, algorithm, the
board) is kept, and later calls under the same tuning go straight to the
board (collectives.shm.board.Quick): one post, one poll per peer, and the
reduction in rank order read straight out of the peers' mapped boards
into the caller's array, with no copy and nothing made per call.

It keeps the long way's guarantees: the fingerprint on the board is the
same (a rank on either way that called something else raises a
MismatchError on every rank), the call takes the group's next tag and its
deadline, and a failure aborts the tag on every member
(collectives.runner.now). A wait past board.Quick's (a spin where every
rank of the group has a core, then yields, 0.5 ms in all), a mismatch, or
a peer not done with the slot goes on as the long way does, with a Round,
from where the short way left off (collectives.shm.local.all_reduce_small).
Anything the short way cannot take (async, an algorithm or a timeout that
is not a float, a non-contiguous or read-only array, a lane with work)
takes the long way.
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
from ..plan import Tuning
from ..runner import NOT_NOW, Body, Ctx, now
from . import board
from .local import all_reduce_small

__all__ = ["MAX_BYTES", "forget", "learn", "keep", "plan_key", "all_reduce"]

MAX_BYTES = board.INLINE
"""The largest payload the short way takes: the board's inline room."""


class _Plan:
    """One (group, dtype, shape, op): the tuning it was settled under, its
    fingerprint and board signature, the op (its ufunc; ``avg``: whether
    the sum is divided), the board's Quick, and the peers' receive buffers
    for a call that goes on with a Round."""

    __slots__ = ("tuning", "fp", "sig", "rop", "outs", "n", "quick", "ufunc", "later", "avg",
                 "one")

    def __init__(self, ctx: Ctx, arr: np.ndarray, rop: ReduceOp) -> None:
        self.tuning, self.fp, self.rop = ctx.tuning, ctx.fp, rop
        self.sig = board.signature(ctx.fp)
        self.n = n = ctx.g.size
        self.outs: list[np.ndarray | None] = [None if p == ctx.g.rank else np.empty_like(arr)
                                              for p in range(n)]
        self.quick = board.Quick(ctx.g, arr, self.sig)
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
        one = self.one
        for v in self.later[slot]:
            try:
                if one is None:
                    f(a, v, out=a)
                else:
                    f(a, v, out=one)
            except FP_RAISED:
                pass
            if one is not None:
                a[...] = one
        quick.done(seq)
        if self.avg:
            self.rop.finish(a, self.n)
        return None

    def rest(self, buf: np.ndarray, posted: bool) -> Body:
        def run(ctx: Ctx) -> None:
            all_reduce_small(ctx, buf, self.rop, self.outs, self.sig, posted)
            self.rop.finish(buf, self.n)
        return run


_plans: "weakref.WeakKeyDictionary[Comm, dict[tuple, _Plan]]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_NO_LAST: tuple = (lambda: None, None, None, None, None)
_last = _NO_LAST
"""(group's weak reference, dtype, shape, op, plan) of the last short call:
a loop's next call finds its plan here for a third of what the
dictionaries cost (hashing a dtype alone costs about as much)."""


def plan_key(dtype: np.dtype, shape: tuple[int, ...], op: Any) -> tuple:
    """A plan's key: (dtype, shape, op), and the dtype's name where it has
    metadata (bfloat16 widened to float32, collectives.tensors), which numpy's
    dtype equality ignores: a bfloat16 call must not take a float32 call's
    plan, whose fingerprint would hide a mismatch between the two."""
    if dtype.metadata is None:
        return (dtype, shape, op)
    return (dtype, shape, op, dtype_name(dtype))


def forget(g: Comm) -> None:
    """Drop ``g``'s short-way plans (their views are of boards that
    board.forget took out of use): its next calls take the long way."""
    global _last
    with _lock:
        _plans.pop(g, None)
        _last = _NO_LAST


def learn(ctx: Ctx, arr: np.ndarray, op: str, rop: ReduceOp) -> bool:
    """Keep what ``ctx``'s all_reduce of ``arr`` settled, for the short way:
    called by the long way after a board all_reduce_small that any later
    blocking call with these arguments and this tuning would repeat. Whether
    it is kept (collectives.host.tiny's host step takes it)."""
    if arr.nbytes > MAX_BYTES or not board.mapped(ctx.g):
        return False
    if keep(_plans, ctx, plan_key(arr.dtype, arr.shape, op), lambda: _Plan(ctx, arr, rop)):
        global _last
        _last = _NO_LAST
    return True


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


def all_reduce(g: Comm, a: np.ndarray, op: Any, timeout: Any) -> np.ndarray | None:
    """``a`` all-reduced the short way, or None (nothing done, no tag taken)
    where the call must take the long way."""
    global _last
    ref, dtype, shape, last_op, plan = _last
    if ref() is not g or dtype is not a.dtype or last_op is not op or shape != a.shape:
        try:
            plan = _plans[g][plan_key(a.dtype, a.shape, op)]
        except (KeyError, TypeError):
            return None
        _last = (weakref.ref(g), a.dtype, a.shape, op, plan)
    flags = a.flags
    try:
        tuning = Tuning.from_env()
    except ValueError:      # (a bad MESH_COLL_*: the long way raises it, naming the call)
        return None
    if (plan.tuning is not tuning or not flags.c_contiguous or not flags.writeable
            or not (timeout is None or type(timeout) is float and timeout >= 0)):
        return None
    if now(g, "all_reduce", plan.fp, plan.tuning, plan.step, a, timeout) is NOT_NOW:
        return None
    if debug.ON:
        debug.note(g, "all_reduce", SHORT_PATH, a.nbytes)
    return a


SHORT_PATH = "same-host board, the short way (collectives.shm.tiny)"
"""MESH_COLL_DEBUG's line for a tiny all_reduce that took this way."""
