"""The short way of a tiny all_reduce across hosts (as many ranks on every
host, collectives.host.hier's small form over the columns): what the first
checked call of a (group, dtype, shape, op) settled is kept, and later
blocking calls under the same tuning skip the preparation (argument checks,
fingerprint, plan, nested ``runner.start``), which on 4 ranks sharing 2
cores was most of an 8-byte call's CPU (issue 13, ninth session)::

    the group's tag      runner.now (its deadline, its abort on failure)
    host all_reduce      the host's short way, collectives.shm.tiny
                         (one post, one poll, one ufunc), else its long way
    column all_reduce    runner.now on the column: recursive doubling of
                         the host's sum over the column's kept links

Every step takes the same tags and fingerprints as the long way
(hier._all_reduce_small_columns), so a rank on either way meets the others:
a mismatch is seen on the board or on a link, a lost peer is named, and a
host step that fails abandons the column step, so the other hosts' ranks
raise instead of waiting. Anything the short way cannot take (async, an
algorithm, a timeout that is not a float, ``avg``, a non-contiguous or
read-only array, a lane with work) takes the long way.
"""
from __future__ import annotations

import time
import weakref
from typing import Any

import numpy as np

from mesh import Comm, MeshTimeoutError

from .. import debug
from ..ops import ReduceOp
from ..plan import Tuning
from ..runner import NOT_NOW, Body, Ctx, abandon, abort_kind, now, start
from ..shm import local as shm_local, tiny as shm_tiny
from .hier import (ACROSS, FIRST, SMALL_COLUMN, SMALL_HOST, Topology, late_named, numbered,
                   rd_across, refuse, unsettle)

__all__ = ["learn", "all_reduce", "stats"]

stats = {"calls": 0}    # calls that took the short way (tests)


class _Plan:
    """One (group, dtype, shape, op): the tuning, the call's fingerprint and
    its phases', the host's and the column's groups."""

    __slots__ = ("tuning", "fp", "rop", "op", "local", "column", "lfp", "cfp", "lname",
                 "cname", "stepped")

    def __init__(self, ctx: Ctx, topo: Topology, op: Any, rop: ReduceOp) -> None:
        assert topo.column is not None
        self.tuning, self.fp, self.rop, self.op = ctx.tuning, ctx.fp, rop, op
        self.local, self.column = topo.local, topo.column
        self.lfp = dict(ctx.fp, phase=SMALL_HOST)
        self.cfp = dict(ctx.fp, phase=SMALL_COLUMN)
        self.lname = f"{ctx.name} ({SMALL_HOST})"
        self.cname = f"{ctx.name} ({SMALL_COLUMN})"
        self.stepped = False        # (whether this call's step began: its phases' tags taken)

    def step(self, tag: int, arg: tuple[np.ndarray, float, Comm]) -> None:
        """runner.now's step: the whole call on ``arg``'s group (its phases
        bring their own Ctx and deadline, from what is left of the call's);
        a phase's timeout names the members that have not called it, as the
        long way's does (hier.late_named)."""
        a, deadline, g = arg
        self.stepped = True
        stats["calls"] += 1
        flat = a.reshape(-1)
        try:
            left = max(0.0, deadline - time.monotonic())
            if shm_tiny.all_reduce(numbered(self.local, tag, FIRST), a, self.op, left) is None:
                rop = self.rop
                start(numbered(self.local, tag, FIRST), self.lname,
                      lambda t: (self.lfp, lambda c: shm_local.all_reduce_small(c, flat, rop)),
                      False, left)
        except BaseException as e:
            err = late_named(g, tag, e)
            abandon(numbered(self.column, tag, ACROSS), f"rank {self.local.ranks[self.local.rank]}"
                    f": {self.lname} failed: {err}", *abort_kind(self.local, err))
            unsettle(self.local, True, e)       # (a plan is made once the boards are up)
            if err is not e:
                raise err from e
            raise
        left = max(0.0, deadline - time.monotonic())
        column = numbered(self.column, tag, ACROSS)
        try:
            if now(column, self.cname, self.cfp, self.tuning, self._across, flat,
                   left) is NOT_NOW:
                start(column, self.cname, lambda t: (self.cfp, self._across(0, flat)), False,
                      left)
        except MeshTimeoutError as e:
            err = late_named(g, tag, e)
            if err is not e:
                raise err from e
            raise

    def _across(self, tag: int, flat: np.ndarray) -> Body:
        rop = self.rop
        return lambda c: rd_across(c, flat, rop)


_plans: "weakref.WeakKeyDictionary[Comm, dict[tuple, _Plan]]" = weakref.WeakKeyDictionary()


def learn(ctx: Ctx, topo: Topology, arr: np.ndarray, op: Any, rop: ReduceOp) -> None:
    """Keep what ``ctx``'s all_reduce of ``arr`` settled, for the short way:
    called by the long way after a small all_reduce over the columns, once
    the host's short way has its own plan too."""
    if rop.name == "avg" or topo.column is None or arr.nbytes > shm_tiny.MAX_BYTES:
        return
    host = Ctx(topo.local, ctx.tag, dict(ctx.fp, phase=SMALL_HOST), ctx.tuning,
               f"{ctx.name} ({SMALL_HOST})", ctx.timeout, ctx.deadline)
    if not shm_tiny.learn(host, arr, op, rop):
        return
    shm_tiny.keep(_plans, ctx, shm_tiny.plan_key(arr.dtype, arr.shape, op),
                  lambda: _Plan(ctx, topo, op, rop))


def all_reduce(g: Comm, a: np.ndarray, op: Any, timeout: Any) -> np.ndarray | None:
    """``a`` all-reduced the short way, or None (nothing done, no tag taken)
    where the call must take the long way."""
    try:
        plan = _plans[g][shm_tiny.plan_key(a.dtype, a.shape, op)]
    except (KeyError, TypeError):
        return None
    flags = a.flags
    try:
        tuning = Tuning.from_env()
    except ValueError:      # (a bad MESH_COLL_*: the long way raises it, naming the call)
        return None
    if (plan.tuning is not tuning or not flags.c_contiguous or not flags.writeable
            or not (timeout is None or type(timeout) is float and timeout >= 0)):
        return None
    limit = float(g.timeout) if timeout is None else timeout
    plan.stepped = False
    try:
        if now(g, "all_reduce", plan.fp, plan.tuning, plan.step, (a, time.monotonic() + limit, g),
               timeout) is NOT_NOW:
            return None
    except BaseException as e:
        if not plan.stepped:    # the tag was aborted before the phases: fail them too
            refuse(g, -g.collective_channel().seq, "all_reduce", 0, False, a.nbytes, e)
        raise
    if debug.ON:
        debug.note(g, "all_reduce", SHORT_PATH, a.nbytes)
    return a


SHORT_PATH = "two levels, small, columns, the short way (collectives.host.tiny)"
"""MESH_COLL_DEBUG's line for a tiny all_reduce that took this way."""
