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
gradients on every rank (one small all_gather), so that step's buckets
launch in ``step()``; from then on the dense ones launch during backward
and the sparse ones in ``step()``, in parameter order (every rank alike).
``sparse_as_dense=True`` reduces them dense, from the first step.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any, Iterator

import numpy as np
import torch

from mesh import MismatchError

from .. import api as C
from ..buckets import GradReducer
from ..torchsparse import sparse_all_reduce
from . import control
from .adasum import adasum_all_reduce
from .basics import OPS, Adasum, Average, Compression, Sum, _s, _world, global_process_set
from .mpi_ops import _scaled, adasum_checks
from .timeline import now

__all__ = ["DistributedOptimizer"]



def _one_more_pass(delay: list[int], i: int) -> None:
    """Count a backward pass into parameter i's gradient; Horovod's error
    where more came than ``backward_passes_per_step`` before ``step()``."""
    if delay[i] <= 0:
        raise AssertionError("Gradients were computed more than "
                             "backward_passes_per_step times before call to step(). "
                             "Increase backward_passes_per_step to accumulate "
                             "gradients locally.")
    delay[i] -= 1

class _Compressed(GradReducer):
    """A GradReducer of the compressed gradients ``ready`` hands it."""
    _refuse_torch = False
    _called = "DistributedOptimizer"


def _check_named(opt: torch.optim.Optimizer, named_parameters: Any) -> dict[int, str]:
    """Horovod's checks of ``named_parameters``: (name, parameter) pairs,
    names unique, every parameter of the optimizer named. Returns each
    parameter's name (by id; Horovod's ``allreduce.noname.<group>.<i>``
    where none are given)."""
    named = list(named_parameters) if named_parameters is not None else \
        [(f"allreduce.noname.{i}.{j}", v) for i, group in enumerate(opt.param_groups)
         for j, v in enumerate(group["params"])]
    if any(not isinstance(p, tuple) for p in named):
        raise ValueError("named_parameters should be a sequence of tuples (name, "
                         "parameter), usually produced by model.named_parameters()")
    names = [k for k, _ in named]
    dups = sorted({k for k in names if names.count(k) > 1})
    if dups:
        raise ValueError(f"Parameter names in named_parameters must be unique. Found "
                         f"duplicates: {', '.join(dups)}")
    given = {id(v) for _, v in named}
    if any(id(p) not in given for group in opt.param_groups for p in group["params"]):
        raise ValueError("named_parameters was specified, but one or more model "
                         "parameters were not named")
    return {id(v): str(k) for k, v in named}


class _DistributedOptimizer(torch.optim.Optimizer):
    """Its methods are copied into a subclass of the wrapped optimizer's
    class (as Horovod does), so that it is still, say, an SGD."""

    def __init__(self, params: Any, named_parameters: Any, compression: Any,
                 backward_passes_per_step: int, op: int, gradient_predivide_factor: float,
                 sparse_as_dense: bool) -> None:
        super(self.__class__, self).__init__(params)  # type: ignore[misc, call-arg]
        names = _check_named(self, named_parameters)
        g = _world("DistributedOptimizer")
        self._hvd_g = g
        self._hvd_compression = compression
        self._hvd_k = backward_passes_per_step
        self._hvd_f = gradient_predivide_factor
        self._hvd_op = op
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
        # None until the first step's gradients say (sparse_as_dense: all in buckets)
        self._hvd_plan: list[int] | None = None
        self._hvd_dense: list[int] = []         # the reducer's gradients (parameter indices)
        self._hvd_slot: dict[int, int] = {}     # parameter index -> the reducer's
        self._hvd_reducer: GradReducer | None = None
        self._hvd_ready: dict[int, int] = {}    # timeline: when each gradient was final
        self._hvd_times: dict[int, dict[str, int]] = {}     # timeline: each bucket's phases
        self._hvd_id = len(_s.optimizers)
        _s.optimizers.append(weakref.ref(self))
        self._hvd_on = g.size > 1 and bool(self._hvd_params)
        if not self._hvd_on:
            return
        if sparse_as_dense:
            self._hvd_make([0] * len(self._hvd_params))
        for i, p in enumerate(self._hvd_params):
            p.register_post_accumulate_grad_hook(self._hvd_hook(i))

    def _hvd_make(self, plan: list[int]) -> None:
        """The reducer of the gradients ``plan`` puts in buckets."""
        self._hvd_plan = plan
        self._hvd_dense = [i for i, sd in enumerate(plan) if sd == 0]
        self._hvd_slot = {i: j for j, i in enumerate(self._hvd_dense)}
        if not self._hvd_dense:
            return
        dense = [self._hvd_params[i] for i in self._hvd_dense]
        if self._hvd_compression is Compression.none:
            self._hvd_reducer = GradReducer(self._hvd_g, dense, op=OPS[self._hvd_op])
        else:
            like = [self._hvd_compression.compress(torch.zeros_like(p))[0] for p in dense]
            self._hvd_reducer = _Compressed(self._hvd_g, like, op=OPS[self._hvd_op])
        self._hvd_reducer._trace = self._hvd_trace

    def _hvd_decide(self) -> None:
        """The first step: a parameter whose gradient is sparse on a rank is
        reduced sparse (from then on: a rank without one sends none), the
        others in buckets. One dense on a rank and sparse on another raises
        on every rank, naming both."""
        g, params = self._hvd_g, self._hvd_params
        codes = np.array([-1 if p.grad is None else p.grad.sparse_dim() if p.grad.is_sparse
                          else 0 for p in params], np.int64)
        table = np.asarray(C.all_gather(g, codes)).reshape(g.size, len(params))
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
        self._hvd_make(plan)

    def _hvd_hook(self, i: int) -> Any:
        def hook(p: Any) -> None:
            _one_more_pass(self._hvd_delay, i)
            self._hvd_fresh = True
            if self._hvd_delay[i] == 0:
                self._hvd_feed(i, p)
        return hook

    def _hvd_feed(self, i: int, p: Any) -> None:
        """Gradient i is final on this rank: to its bucket (a sparse one
        waits for ``step()``; all do until the first step's plan)."""
        self._hvd_pending = True
        if _s.timeline is not None:
            self._hvd_ready.setdefault(i, now())
        if self._hvd_plan is None or self._hvd_plan[i]:
            return
        assert self._hvd_reducer is not None
        if p.grad is not None and p.grad.is_sparse:     # (none at the first step: dense)
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

    def _hvd_sparse(self) -> list[tuple[int, Any]]:
        """The sparse gradients' calls, in parameter order (a rank without
        one sends an empty one)."""
        assert self._hvd_plan is not None
        works = []
        tl = _s.timeline
        for i, sd in enumerate(self._hvd_plan):
            if not sd:
                continue
            p = self._hvd_params[i]
            grad = p.grad
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

    def _hvd_wait(self) -> None:
        """Every gradient not yet fed (fewer backward passes, or none) goes
        now, then the sparse ones; then the calls are waited for and the
        results written back."""
        first = self._hvd_plan is None
        if first:
            self._hvd_decide()
        for i, p in enumerate(self._hvd_params):
            if first or self._hvd_delay[i] != 0:
                self._hvd_feed(i, p)
        works: list[tuple[int, Any]] = []
        try:
            works = self._hvd_sparse()
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
            fed, self._hvd_fed = self._hvd_fed, {}
            self._hvd_ready.clear()
            if _s.timeline is not None:
                _s.timeline.settle()
        n = self._hvd_g.size if self._hvd_op == Average else 1
        with torch.no_grad():
            for i, out in got:
                self._hvd_params[i].grad = _scaled(out, 1.0, n)
            for i in self._hvd_dense:
                p = self._hvd_params[i]
                if p.grad is None:
                    continue
                if i in fed:
                    p.grad.copy_(self._hvd_compression.decompress(*fed[i]))
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
            ready = min(self._hvd_ready.pop(i, launch), launch)
            tl.op("allreduce." + self._hvd_names[i], "ALLREDUCE", ready,
                  [("WAIT_FOR_OTHER_TENSOR_DATA", ready, launch),
                   ("MEMCPY_IN_FUSION_BUFFER", launch, copied),
                   ("MESHRUN_ALLREDUCE", copied, done),
                   ("MEMCPY_OUT_FUSION_BUFFER", out, t)], t, self._hvd_params[i])

    def _hvd_join_step(self) -> None:
        """On a rank that has joined: zeros for every gradient of the step
        the others reduce (their average counts them, as Horovod's)."""
        for p in self._hvd_params:
            p.grad = None
        if self._hvd_on:
            self._hvd_wait()
        for p in self._hvd_params:
            p.grad = None

    def synchronize(self) -> None:
        """Wait for every gradient's reduction: ``.grad`` holds the average
        over the ranks (of ``backward_passes_per_step`` passes' sums)."""
        if not self._hvd_on or self._hvd_synced and not self._hvd_fresh:
            self._hvd_synced = True
            return
        row = None if _s.timeline is None else f"DistributedOptimizer.{self._hvd_id}"
        control.announce(self._hvd_g, control.OPTIMIZER, "DistributedOptimizer.synchronize",
                         op=self._hvd_id, row=row)
        self._hvd_wait()
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


class _DistributedAdasumOptimizer(torch.optim.Optimizer):
    """Horovod's Adasum optimizer (op=hvd.Adasum on more than one rank):
    each rank steps the wrapped optimizer on its own gradients, and what
    the step changed (not the gradient) is combined by Adasum over the
    ranks, each parameter on its own; every rank then holds start + that.
    The wrapped optimizer's state (momentum, Adam's moments) stays each
    rank's own, as Horovod's. A parameter is stepped alone as its gradient
    is final (after ``backward_passes_per_step`` passes; in ``step()`` for
    one that had none), as Horovod's hook does; the changes are combined in
    ``step()``, together (one call per dtype, in parameter order)."""

    def __init__(self, params: Any, named_parameters: Any, compression: Any,
                 backward_passes_per_step: int) -> None:
        super(self.__class__, self).__init__(params)  # type: ignore[misc, call-arg]
        _check_named(self, named_parameters)
        self._hvd_g = _world("DistributedOptimizer")
        self._hvd_compression = compression
        self._hvd_k = backward_passes_per_step
        self._hvd_params = [p for group in self.param_groups for p in group["params"]
                            if p.requires_grad]
        self._hvd_delay = [backward_passes_per_step] * len(self._hvd_params)
        self._hvd_start = [torch.zeros_like(p, requires_grad=False) for p in self._hvd_params]
        self._hvd_stepped: set[int] = set()     # parameters holding their step's change
        self._hvd_id = len(_s.optimizers)
        _s.optimizers.append(weakref.ref(self))
        for i, p in enumerate(self._hvd_params):
            p.grad = torch.zeros_like(p)        # (as Horovod's)
            p.register_post_accumulate_grad_hook(self._hvd_hook(i))

    def _hvd_hook(self, i: int) -> Any:
        def hook(p: Any) -> None:
            _one_more_pass(self._hvd_delay, i)
            if self._hvd_delay[i] == 0:
                self._hvd_local_step(i)
        return hook

    def _hvd_local_step(self, i: int) -> None:
        """The wrapped optimizer's step on parameter i alone; the parameter
        then holds what the step changed, its start kept aside."""
        p, start = self._hvd_params[i], self._hvd_start[i]
        kept = [group["params"] for group in self.param_groups]
        for group in self.param_groups:
            group["params"] = [p] if any(p is v for v in group["params"]) else []
        try:
            with torch.no_grad():
                start.copy_(p)
            super(self.__class__, self).step()     # type: ignore[misc]
            with torch.no_grad():
                p.sub_(start)
        finally:
            for group, params in zip(self.param_groups, kept):
                group["params"] = params
        self._hvd_stepped.add(i)

    def _hvd_combine(self, joined: bool = False) -> None:
        """Every parameter's change combined by Adasum over the ranks (a
        rank that has joined gives zeros and keeps its parameters)."""
        sent = [self._hvd_compression.compress(torch.zeros_like(p) if joined else p.detach())
                for p in self._hvd_params]
        for dtype in dict.fromkeys(t.dtype for t, _ in sent):
            adasum_all_reduce(self._hvd_g, [t for t, _ in sent if t.dtype == dtype])
        if joined:
            return
        with torch.no_grad():
            for p, start, (t, ctx) in zip(self._hvd_params, self._hvd_start, sent):
                start.add_(self._hvd_compression.decompress(t, ctx))
                p.copy_(start)

    def _hvd_join_step(self) -> None:
        self._hvd_combine(joined=True)

    def synchronize(self) -> None:
        """Nothing to wait for before ``step()`` (as Horovod's Adasum)."""

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        raise AssertionError("Skipping synchronization is not supported when using Adasum "
                             "optimizer.")
        yield       # (a generator, for contextmanager)

    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        control.announce(self._hvd_g, control.OPTIMIZER, "DistributedOptimizer.step",
                         op=self._hvd_id)
        for i in range(len(self._hvd_params)):
            if i not in self._hvd_stepped:
                self._hvd_local_step(i)
        try:
            self._hvd_combine()
        finally:
            self._hvd_stepped.clear()
            self._hvd_delay = [self._hvd_k] * len(self._hvd_params)
        return loss

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        if self._hvd_stepped:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but "
                                 "before optimizer.step() or optimizer.synchronize(). This is "
                                 "prohibited as it can cause a race condition.")
        super(self.__class__, self).zero_grad(*args, **kwargs)   # type: ignore[misc]

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
