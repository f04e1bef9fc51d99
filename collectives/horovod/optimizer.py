"""Horovod's DistributedOptimizer over collectives.GradReducer: each
gradient goes to its fusion bucket as backward accumulates it (a
post-accumulate-grad hook), buckets launch as they fill, and ``step()``
(or ``synchronize()``) waits for them.

With ``compression=`` other than none, the reducer holds the compressed
gradients (fp16: float16 tensors, averaged in float32 and rounded once)
and the results are decompressed into ``.grad``.

Sparse gradients (``nn.Embedding(sparse=True)``) are reduced sparse, as
Horovod's: every rank's indices and values (collectives.torchsparse), the
result coalesced. Which parameters have them is read off the first step's
gradients on every rank (one small all_gather on the control group, so
that it does not come between the buckets). Until then every parameter
has its place in a bucket: the first step's dense gradients launch
during backward too, and a sparse one stands aside, its place reduced as
zeros (its bucket, and those after it, launch in ``step()``); from the
second step on the buckets hold the dense ones only, and the sparse ones
are reduced in ``step()``, in parameter order (every rank alike).
``sparse_as_dense=True`` reduces them dense.

The buckets are filled in reverse parameter order (DDP's) and launch, at
the first step, in that order; then in the order they became full, which
the ranks agree on in the first step's all_gather (where each gradient
came in each rank's backward: rank 0's order, as DDP's rebuilt buckets).
A bucket holding a gradient that some rank did not make in a step's
backward (a parameter unused there: a branch not taken, a frozen part of
the graph) moves, with the ranks' agreement, to the tail: it launches
after the others (in ``step()`` where the gradient is still missing), so
it no longer holds back the buckets after it. Whether a rank missed one
rides on ``synchronize()``'s round on the control group (join's); only
then do the ranks gather where each gradient came (one small all_gather,
at most once per bucket moved). The buckets hold the same gradients at the
same offsets whatever their order: the results are the same bits.

A parameter that had no gradient (unused in the forward) is reduced as
zeros, and ``.grad`` is then the average of the ranks that had one, zeros
where none had (Horovod's; the wrapped optimizer steps it: momentum and
weight decay apply). ``HOROVOD_FUSION_THRESHOLD`` (bytes; 0: no fusion)
sizes the buckets, as Horovod's fusion buffer (default 25 MiB, DDP's).
"""
from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from typing import Any, Iterator

import numpy as np
import torch

from mesh import MismatchError

from .. import api as C
from ..buckets import DEFAULT_BUCKET_BYTES, GradReducer, _agreed
from ..torchsparse import sparse_all_reduce
from . import control
from .adasum_optimizer import _DistributedAdasumOptimizer
from .basics import OPS, Adasum, Average, Compression, Sum, _s, _world, global_process_set
from .mpi_ops import _scaled, adasum_checks
from .named import check_named, one_more_pass
from .timeline import now

__all__ = ["DistributedOptimizer"]


def _launch_order(table: np.ndarray, front: list[int],
                  tail: list[int]) -> tuple[list[int], list[int]]:
    """The buckets' next launch order, from ``table``: a row a rank, when
    each bucket was full in this step's backward (0 first; -1: a gradient
    of it not made there; a row of -2: no backward there, a joined rank).
    The buckets of ``front`` (the current launch order) full on every rank
    with a backward, in the order the first such rank filled them; then
    ``tail`` and, after it, the others of ``front`` (in front's order).
    Unchanged where no rank had a backward.

    >>> _launch_order(np.array([[1, -1, 0], [0, 1, 2]]), [0, 1, 2], [])
    ([2, 0], [1])
    """
    rows = [row for row in np.asarray(table) if not (row == -2).all()]
    if not rows:
        return list(front), list(tail)
    missing = [k for k in front if any(row[k] < 0 for row in rows)]
    first = rows[0]
    full = sorted((k for k in front if k not in missing), key=lambda k: int(first[k]))
    return full, list(tail) + missing


def _filled(at: np.ndarray, buckets: list[list[int]]) -> np.ndarray:
    """When each bucket was full, from where each of its gradients came
    (``at``, a row a rank, as ``_launch_order``'s table; ``buckets``: each
    one's gradients): its last one's place, -1 where one did not come.

    >>> _filled(np.array([[0, 2, -1], [-2, -2, -2]]), [[1, 0], [2]]).tolist()
    [[2, -1], [-2, -2]]
    """
    out = np.empty((len(at), len(buckets)), np.int64)
    for k, members in enumerate(buckets):
        came = at[:, members]
        out[:, k] = np.where((came < 0).any(axis=1), came.min(axis=1), came.max(axis=1))
    return out


class _Reducer(GradReducer):
    """A GradReducer of the parameters (its errors name the optimizer)."""
    _called = "DistributedOptimizer"


class _Compressed(GradReducer):
    """A GradReducer of the compressed gradients ``ready`` hands it."""
    _refuse_torch = False
    _called = "DistributedOptimizer"


def _fusion_bytes() -> int:
    """The buckets' size: ``HOROVOD_FUSION_THRESHOLD`` (bytes; 0: each
    gradient alone), else GradReducer's default."""
    said = os.environ.get("HOROVOD_FUSION_THRESHOLD", "").strip()
    if not said:
        return DEFAULT_BUCKET_BYTES
    try:
        n = int(said)
    except ValueError:
        raise ValueError(f"HOROVOD_FUSION_THRESHOLD={said!r}: a number of bytes (0: no "
                         f"fusion)") from None
    if n < 0:
        raise ValueError(f"HOROVOD_FUSION_THRESHOLD={said!r}: a number of bytes (0: no "
                         f"fusion)")
    return max(n, 1)


class _DistributedOptimizer(torch.optim.Optimizer):
    """Its methods are copied into a subclass of the wrapped optimizer's
    class (as Horovod does), so that it is still, say, an SGD."""

    def __init__(self, params: Any, named_parameters: Any, compression: Any,
                 backward_passes_per_step: int, op: int, gradient_predivide_factor: float,
                 sparse_as_dense: bool) -> None:
        super(self.__class__, self).__init__(params)  # type: ignore[misc, call-arg]
        names = check_named(self, named_parameters)
        g = _world("DistributedOptimizer")
        self._hvd_g = g
        self._hvd_compression = compression
        self._hvd_k = backward_passes_per_step
        self._hvd_f = gradient_predivide_factor
        self._hvd_op = op
        self._hvd_bytes = _fusion_bytes()
        self._hvd_params = [p for group in self.param_groups for p in group["params"]
                            if p.requires_grad]
        self._hvd_names = [names[id(p)] for p in self._hvd_params]
        self._hvd_delay = [backward_passes_per_step] * len(self._hvd_params)
        self._hvd_fed: dict[int, Any] = {}      # compressed: (tensor, ctx) given to ready()
        self._hvd_pending = False               # a gradient final since the last wait
        self._hvd_fresh = False                 # a backward since the last synchronize
        self._hvd_synced = False
        self._hvd_sync = True
        # each parameter's reduction: 0 in a bucket, k > 0 sparse (k sparse dimensions);
        # None until the first step's gradients say (sparse_as_dense: all in buckets),
        # every one in a bucket until then
        self._hvd_plan: list[int] | None = None
        self._hvd_aside: set[int] = set()       # the first step's sparse ones (no trace)
        self._hvd_dense: list[int] = []         # the reducer's gradients (parameter indices)
        # the buckets' launch order (the reducer's plan's numbering): the front, then the
        # tail (those holding a gradient a rank once did not make)
        self._hvd_front: list[int] = []
        self._hvd_tail: list[int] = []
        self._hvd_fired: list[int] = []         # this step's gradients final by hooks, in order
        self._hvd_slot: dict[int, int] = {}     # parameter index -> the reducer's
        self._hvd_reducer: GradReducer | None = None
        self._hvd_ready: dict[int, int] = {}    # timeline: when each gradient was final
        self._hvd_times: dict[int, dict[str, int]] = {}     # timeline: each bucket's phases
        self._hvd_id = len(_s.optimizers)
        _s.optimizers.append(weakref.ref(self))
        self._hvd_on = g.size > 1 and bool(self._hvd_params)
        if not self._hvd_on:
            return
        self._hvd_make([0] * len(self._hvd_params))
        if sparse_as_dense:
            self._hvd_plan = [0] * len(self._hvd_params)
        for i, p in enumerate(self._hvd_params):
            p.register_post_accumulate_grad_hook(self._hvd_hook(i))

    def _hvd_make(self, plan: list[int]) -> None:
        """The reducer of the gradients ``plan`` puts in buckets (launched
        in plan order until the ranks agree on another)."""
        self._hvd_reducer = None
        self._hvd_dense = [i for i, sd in enumerate(plan) if sd == 0]
        self._hvd_slot = {i: j for j, i in enumerate(self._hvd_dense)}
        self._hvd_front, self._hvd_tail = [], []
        if not self._hvd_dense:
            return
        dense = [self._hvd_params[i] for i in self._hvd_dense]
        if self._hvd_compression is Compression.none:
            self._hvd_reducer = _Reducer(self._hvd_g, dense, self._hvd_bytes,
                                         op=OPS[self._hvd_op])
        else:
            like = [self._hvd_compression.compress(torch.zeros_like(p))[0] for p in dense]
            self._hvd_reducer = _Compressed(self._hvd_g, like, self._hvd_bytes,
                                            op=OPS[self._hvd_op])
        self._hvd_reducer._trace = self._hvd_trace
        self._hvd_front = list(range(len(self._hvd_reducer.buckets)))
        self._hvd_agree(self._hvd_reducer)

    def _hvd_positions(self) -> np.ndarray:
        """Where each gradient came in this step's backward (0 first; -1:
        not made); all -2 where there was no backward (a joined rank)."""
        at = np.full(len(self._hvd_params), -1 if self._hvd_fired else -2, np.int64)
        at[self._hvd_fired] = np.arange(len(self._hvd_fired))
        return at

    def _hvd_members(self) -> list[list[int]]:
        """Each of the reducer's buckets' gradients (parameter indices), in
        its plan's order."""
        red = self._hvd_reducer
        return [] if red is None else \
            [[self._hvd_dense[j] for j in b.members] for b in red._planned]

    def _hvd_regroup(self, table: np.ndarray) -> None:
        """The buckets launched from now on in the order the ranks' places
        ``table`` (``_hvd_positions``, a row a rank) give them
        (``_launch_order``), where it differs."""
        if self._hvd_reducer is None:
            return
        front, tail = _launch_order(_filled(table, self._hvd_members()), self._hvd_front,
                                    self._hvd_tail)
        if (front, tail) != (self._hvd_front, self._hvd_tail):
            self._hvd_reducer.reorder(front + tail)
            self._hvd_front, self._hvd_tail = front, tail

    def _hvd_missed(self) -> bool:
        """A gradient the front buckets wait for did not come in this
        step's backward (which there was), past the first step."""
        if self._hvd_plan is None or not self._hvd_fired:
            return False
        members = self._hvd_members()
        return not {i for k in self._hvd_front for i in members[k]} <= set(self._hvd_fired)

    def _hvd_agree(self, red: GradReducer) -> None:
        """The ranks' parameters agree (shapes and dtypes, in order), and so
        do their buckets' size, else a ValueError on every rank naming the
        first that differs: checked
        here (one small all_gather on the control group, every time), not
        at the first bucket's launch, which comes in the middle of backward
        and is checked once per layout (a rank that had seen its layout
        before would not meet the others' check)."""
        g = self._hvd_g
        ctl = _s.ctl if _s.ctl is not None and _s.ctl.size == g.size else g
        mine = np.append(np.frombuffer(red._layout, np.uint64), np.uint64(self._hvd_bytes))
        table = np.asarray(C.all_gather(ctl, mine)).reshape(g.size, -1)
        if (table == table[0]).all():
            _agreed.setdefault(g, {})[red._layout] = red._plan_from
            return
        if (table[:, :-1] == table[0, :-1]).all():
            other = next(r for r in range(g.size) if table[r, -1] != table[0, -1])
            raise ValueError(f"rank {g.rank}: DistributedOptimizer: the ranks' buckets differ: "
                             f"{table[0, -1]} bytes on rank 0 and {table[other, -1]} on rank "
                             f"{other} (HOROVOD_FUSION_THRESHOLD: set it alike on every rank)")
        specs = C.all_gather_object(ctl, red._plan_from[0])
        other = next(r for r in range(g.size) if specs[r] != specs[0])
        a, b = specs[0], specs[other]
        i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
        said = (lambda s, k: f"{s[k][1]}{tuple(s[k][0])}" if k < len(s) else "none")
        here = self._hvd_dense[i] if i < len(self._hvd_dense) else None
        name = "" if here is None else f" ({self._hvd_names[here]!r} on rank {g.rank})"
        raise ValueError(f"rank {g.rank}: DistributedOptimizer: the ranks' parameters differ: "
                         f"parameter {i}{name} is {said(a, i)} on rank 0 and {said(b, i)} on "
                         f"rank {other} ({len(a)} and {len(b)} parameters with gradients): "
                         f"every rank wraps an optimizer of the same model's parameters, in "
                         f"the same order")

    def _hvd_decide(self, at: np.ndarray) -> tuple[list[int], np.ndarray]:
        """The first step: a parameter whose gradient is sparse on a rank is
        reduced sparse (from then on: a rank without one sends none), the
        others in buckets. One dense on a rank and sparse on another raises
        on every rank, naming both. (On the control group: the buckets
        launched during backward may differ between ranks until step()'s
        feed, and nothing may come between them on the world.) The same
        all_gather brings every rank's positions ``at`` (``_hvd_positions``),
        returned as a table, a row a rank."""
        g, params = self._hvd_g, self._hvd_params
        codes = np.array([-1 if p.grad is None else p.grad.sparse_dim() if p.grad.is_sparse
                          else 0 for p in params], np.int64)
        ctl = _s.ctl if _s.ctl is not None and _s.ctl.size == g.size else g
        both = np.asarray(C.all_gather(ctl, np.concatenate([codes, at]))).reshape(g.size, -1)
        table = both[:, :len(params)]
        plan = []
        for i, col in enumerate(table.T):
            dense = [r for r in range(g.size) if col[r] == 0]
            sparse = [r for r in range(g.size) if col[r] > 0]
            name = self._hvd_names[i]
            if dense and sparse:
                raise MismatchError(f"rank {g.rank}: DistributedOptimizer: parameter {name!r} "
                                    f"has a dense gradient on rank {dense[0]} and a sparse one "
                                    f"on rank {sparse[0]}: a parameter's gradients are sparse "
                                    f"on every rank or on none (sparse_as_dense=True reduces "
                                    f"them dense)")
            if len({int(col[r]) for r in sparse}) > 1:
                raise MismatchError(f"rank {g.rank}: DistributedOptimizer: parameter {name!r}'s "
                                    f"sparse gradients have {col[sparse[0]]} sparse dimensions "
                                    f"on rank {sparse[0]} and {col[sparse[-1]]} on rank "
                                    f"{sparse[-1]}")
            plan.append(int(col[sparse[0]]) if sparse else 0)
        if any(plan) and self._hvd_op not in (Average, Sum):
            name = self._hvd_names[next(i for i, sd in enumerate(plan) if sd)]
            raise NotImplementedError(f"rank {g.rank}: DistributedOptimizer: parameter {name!r} "
                                      f"has sparse gradients, reduced with op=hvd.Average or "
                                      f"hvd.Sum only (as Horovod's sparse allreduce: indices and "
                                      f"values gathered and summed); pass sparse_as_dense=True")
        return plan, both[:, len(params):]

    def _hvd_hook(self, i: int) -> Any:
        def hook(p: Any) -> None:
            one_more_pass(self._hvd_delay, i)
            self._hvd_fresh = True
            if self._hvd_delay[i] == 0:
                self._hvd_fired.append(i)
                self._hvd_feed(i, p)
        return hook

    def _hvd_feed(self, i: int, p: Any) -> None:
        """Gradient i is final on this rank: to its bucket (a sparse one
        waits for ``step()``; at the first step, before the plan, one stands
        aside: ``step()`` reduces zeros in its place)."""
        self._hvd_pending = True
        if _s.timeline is not None:
            self._hvd_ready.setdefault(i, now())
        if i not in self._hvd_slot:
            return
        assert self._hvd_reducer is not None
        if p.grad is not None and p.grad.is_sparse:
            if self._hvd_plan is None:
                return
            p.grad = p.grad.to_dense()
        if p.grad is not None and self._hvd_f != 1.0:
            p.grad.mul_(1.0 / self._hvd_f)
        j = self._hvd_slot[i]
        if self._hvd_compression is Compression.none:
            self._hvd_reducer.ready(j)
            return
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        sent, ctx = self._hvd_compression.compress(grad.detach())
        self._hvd_fed[i] = (sent, ctx)
        self._hvd_reducer.ready(j, sent)

    def _hvd_sparse(self, plan: list[int], aside: dict[int, Any]) -> list[tuple[int, Any]]:
        """The sparse gradients' calls, in parameter order (a rank without
        one sends an empty one); ``aside``: the first step's, set aside."""
        works = []
        tl = _s.timeline
        for i, sd in enumerate(plan):
            if not sd:
                continue
            p = self._hvd_params[i]
            grad = aside.get(i, p.grad)
            if grad is None:
                grad = torch.sparse_coo_tensor(
                    torch.zeros(sd, 0, dtype=torch.int64), p.new_zeros((0,) + p.shape[sd:]),
                    p.shape, check_invariants=True)
            elif not grad.is_sparse:
                grad = grad.to_sparse(sd)
            begin = now() if tl is not None else 0
            work = sparse_all_reduce(self._hvd_g, [grad.detach()], "sum", True, None)
            works.append((i, work))
            if tl is not None:
                tl.watch("allreduce." + self._hvd_names[i], "ALLREDUCE", "MESHRUN_ALLGATHER",
                         self._hvd_ready.pop(i, begin), work, start=begin)
        return works

    def _hvd_wait(self, regroup: bool = False) -> None:
        """Every gradient not yet fed (fewer backward passes, or none) goes
        now, then the sparse ones; then the calls are waited for and the
        results written back. The first step learns the plan first; its
        sparse gradients stand aside (None) while the buckets reduce zeros
        in their place, and the buckets are finished alike on every rank
        before the plan's error is raised. The first step, and one where
        the ranks said ``regroup`` (a rank missed a gradient), then reorder
        the buckets as they were filled."""
        params, plan = self._hvd_params, self._hvd_plan
        err: BaseException | None = None
        aside: dict[int, Any] = {}
        at = self._hvd_positions()
        table = None
        if plan is None:
            try:
                plan, table = self._hvd_decide(at)
            except (MismatchError, NotImplementedError) as e:
                err = e
            aside = {i: p.grad for i, p in enumerate(params)
                     if p.grad is not None and p.grad.is_sparse}
            for i in aside:
                params[i].grad = None
            self._hvd_aside = set(aside) if plan is None else \
                {i for i, sd in enumerate(plan) if sd}
        for i, p in enumerate(params):
            if self._hvd_delay[i] != 0 or i in aside:
                self._hvd_feed(i, p)
        works: list[tuple[int, Any]] = []
        dense = [i for i in self._hvd_dense if i not in self._hvd_aside]
        try:
            works = self._hvd_sparse(plan, aside) if plan is not None and err is None else []
            if self._hvd_reducer is not None:
                self._hvd_reducer.wait()
            got = [(i, w.wait()) for i, w in works]
        except BaseException:
            for _, w in works:      # (waited out: the group goes on to the next step)
                try:
                    w.wait()
                except Exception:
                    pass
            raise
        finally:
            self._hvd_delay = [self._hvd_k] * len(self._hvd_params)
            self._hvd_pending = self._hvd_fresh = False
            self._hvd_fired = []
            fed, self._hvd_fed = self._hvd_fed, {}
            self._hvd_ready.clear()
            self._hvd_aside = set()
            for i, grad in aside.items():
                params[i].grad = grad
            if _s.timeline is not None:
                _s.timeline.settle()
        if err is not None:
            raise err
        if self._hvd_plan is None and plan is not None:
            self._hvd_plan = plan
            if any(plan):       # from now on: the dense ones alone in buckets
                self._hvd_make(plan)
            assert table is not None
            self._hvd_regroup(table)
        elif regroup:
            g = self._hvd_g
            ctl = _s.ctl if _s.ctl is not None and _s.ctl.size == g.size else g
            self._hvd_regroup(np.asarray(C.all_gather(ctl, at)).reshape(g.size, -1))
        n = self._hvd_g.size if self._hvd_op == Average else 1
        with torch.no_grad():
            for i, out in got:
                params[i].grad = _scaled(out, 1.0, n)
            for i in dense:     # (none had one: zeros, as Horovod's)
                p = params[i]
                if i in fed:
                    back = self._hvd_compression.decompress(*fed[i])
                    if p.grad is None:
                        p.grad = back.to(p.dtype).clone()
                    else:
                        p.grad.copy_(back)
                elif p.grad is None:
                    p.grad = torch.zeros_like(p)
                if self._hvd_f != 1.0:
                    p.grad.mul_(self._hvd_f)

    def _hvd_trace(self, phase: str, b: Any) -> None:
        """The reducer's bucket ``b`` is at ``phase``: its time noted; once
        copied back, each of its gradients' timeline events (Horovod's
        ALLREDUCE of ``allreduce.<name>`` and its activities)."""
        tl = _s.timeline
        if tl is None:
            self._hvd_times.clear()
            return
        times = self._hvd_times.setdefault(id(b), {})
        t = times[phase] = now()
        if phase == "sent":
            b.work.add_done_callback(lambda w: times.setdefault("done", now()))
        if phase != "back":
            return
        del self._hvd_times[id(b)]
        if "launch" not in times:       # (the timeline started in between)
            return
        launch, copied = times["launch"], times["copied"]
        out = times["out"]
        done = min(times.get("done", out), out)
        for j in b.members:
            i = self._hvd_dense[j]
            if i in self._hvd_aside:     # (the first step's sparse ones: their own events)
                continue
            ready = min(self._hvd_ready.pop(i, launch), launch)
            tl.op("allreduce." + self._hvd_names[i], "ALLREDUCE", ready,
                  [("WAIT_FOR_OTHER_TENSOR_DATA", ready, launch),
                   ("MEMCPY_IN_FUSION_BUFFER", launch, copied),
                   ("MESHRUN_ALLREDUCE", copied, done),
                   ("MEMCPY_OUT_FUSION_BUFFER", out, t)], t, self._hvd_params[i])

    def _hvd_join_step(self, regroup: bool = False) -> None:
        """On a rank that has joined: zeros for every gradient of the step
        the others reduce (their average counts them, as Horovod's); it
        regroups the buckets with them (``regroup``: their round said so)."""
        for p in self._hvd_params:
            p.grad = None
        if self._hvd_on:
            self._hvd_wait(regroup)
        for p in self._hvd_params:
            p.grad = None

    def synchronize(self) -> None:
        """Wait for every gradient's reduction: ``.grad`` holds the average
        over the ranks (of ``backward_passes_per_step`` passes' sums)."""
        if not self._hvd_on or self._hvd_synced and not self._hvd_fresh:
            self._hvd_synced = True
            return
        row = None if _s.timeline is None else f"DistributedOptimizer.{self._hvd_id}"
        regroup = control.announce(self._hvd_g, control.OPTIMIZER,
                                   "DistributedOptimizer.synchronize", op=self._hvd_id, row=row,
                                   regroup=self._hvd_missed())
        self._hvd_wait(regroup)
        self._hvd_synced = True

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """``step()`` inside it does not synchronize (after an explicit
        ``synchronize()``, gradient clipping in between)."""
        self._hvd_sync = False
        try:
            yield
        finally:
            self._hvd_sync = True

    def step(self, closure: Any = None) -> Any:
        if self._hvd_sync:
            if self._hvd_synced:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() "
                              "context after optimizer.synchronize(). This can cause "
                              "training slowdown. You may want to consider using "
                              "optimizer.skip_synchronize() context if you use "
                              "optimizer.synchronize() in your code.")
            self.synchronize()
        self._hvd_synced = False
        return super(self.__class__, self).step(closure)    # type: ignore[misc]

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        if self._hvd_pending:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but "
                                 "before optimizer.step() or optimizer.synchronize(). This is "
                                 "prohibited as it can cause a race condition.")
        super(self.__class__, self).zero_grad(*args, **kwargs)   # type: ignore[misc]

    def load_state_dict(self, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "_hvd_params", None) is not None:
            self._hvd_delay = [self._hvd_k] * len(self._hvd_params)
            self._hvd_synced = False
        super(self.__class__, self).load_state_dict(*args, **kwargs)   # type: ignore[misc]

    def set_backward_passes_per_step(self, passes: int) -> None:
        self._hvd_k = passes
        self._hvd_delay = [passes] * len(self._hvd_params)


def DistributedOptimizer(optimizer: Any, named_parameters: Any = None,
                         compression: Any = Compression.none,
                         backward_passes_per_step: int = 1, op: int = Average,
                         gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                         groups: Any = None, sparse_as_dense: bool = False,
                         process_set: Any = None) -> Any:
    """``optimizer`` whose ``step()`` first averages (op=hvd.Average) the
    gradients over the ranks, as Horovod's: reduced in fusion buckets while
    backward runs; ``synchronize()``, ``skip_synchronize()``. ``num_groups``
    and ``groups`` are taken and left to the buckets' own fusion."""
    if op not in OPS and op != Adasum:
        raise ValueError(f"hvd.DistributedOptimizer: op={op!r}: hvd.Average, Sum, Min, Max "
                         f"or Product")
    if gradient_predivide_factor != 1.0 and op != Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if process_set is not None and getattr(process_set, "process_set_id", 0) != 0:
        raise NotImplementedError("hvd.DistributedOptimizer: process_set= other than the "
                                  "global one is not supported on meshrun")
    if backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step must be at least 1, got "
                         f"{backward_passes_per_step}")
    adasum = op == Adasum and _world("DistributedOptimizer").size > 1
    if adasum:
        adasum_checks(global_process_set, _world("DistributedOptimizer"),
                      "DistributedOptimizer")
    base = _DistributedAdasumOptimizer if adasum else _DistributedOptimizer
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,),
               {k: v for k, v in base.__dict__.items() if k not in ("__dict__", "__weakref__")})
    if adasum:
        return cls(optimizer.param_groups, named_parameters, compression,
                   backward_passes_per_step)
    return cls(optimizer.param_groups, named_parameters, compression,
               backward_passes_per_step, op, gradient_predivide_factor, sparse_as_dense)
