"""Horovod's DistributedOptimizer over collectives.GradReducer: each
gradient goes to its fusion bucket as backward accumulates it (a
post-accumulate-grad hook), buckets launch as they fill, and ``step()``
(or ``synchronize()``) waits for them.

With ``compression=`` other than none, the reducer holds the compressed
gradients (fp16: float16 tensors, averaged in float32 and rounded once)
and the results are decompressed into ``.grad``.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any, Iterator

import torch

from ..buckets import GradReducer
from . import control
from .basics import OPS, Adasum, Average, Compression, _s, _world

__all__ = ["DistributedOptimizer"]


class _Compressed(GradReducer):
    """A GradReducer of the compressed gradients ``ready`` hands it."""
    _refuse_torch = False
    _called = "DistributedOptimizer"


class _DistributedOptimizer(torch.optim.Optimizer):
    """Its methods are copied into a subclass of the wrapped optimizer's
    class (as Horovod does), so that it is still, say, an SGD."""

    def __init__(self, params: Any, named_parameters: Any, compression: Any,
                 backward_passes_per_step: int, op: int, gradient_predivide_factor: float,
                 sparse_as_dense: bool) -> None:
        super(self.__class__, self).__init__(params)  # type: ignore[misc, call-arg]
        named = list(named_parameters) if named_parameters is not None else \
            [(f"allreduce.noname.{i}", v) for group in self.param_groups
             for i, v in enumerate(group["params"])]
        if any(not isinstance(p, tuple) for p in named):
            raise ValueError("named_parameters should be a sequence of tuples (name, "
                             "parameter), usually produced by model.named_parameters()")
        names = [k for k, _ in named]
        dups = sorted({k for k in names if names.count(k) > 1})
        if dups:
            raise ValueError(f"Parameter names in named_parameters must be unique. Found "
                             f"duplicates: {', '.join(dups)}")
        given = {id(v) for _, v in named}
        if any(id(p) not in given for group in self.param_groups for p in group["params"]):
            raise ValueError("named_parameters was specified, but one or more model "
                             "parameters were not named")
        g = _world("DistributedOptimizer")
        self._hvd_g = g
        self._hvd_compression = compression
        self._hvd_k = backward_passes_per_step
        self._hvd_f = gradient_predivide_factor
        self._hvd_dense = sparse_as_dense
        self._hvd_params = [p for group in self.param_groups for p in group["params"]
                            if p.requires_grad]
        self._hvd_delay = [backward_passes_per_step] * len(self._hvd_params)
        self._hvd_fed: dict[int, Any] = {}      # compressed: (tensor, ctx) given to ready()
        self._hvd_pending = False               # a bucket launched since the last wait
        self._hvd_fresh = False                 # a backward since the last synchronize
        self._hvd_synced = False
        self._hvd_sync = True
        self._hvd_reducer: GradReducer | None = None
        self._hvd_id = len(_s.optimizers)
        _s.optimizers.append(weakref.ref(self))
        if g.size == 1 or not self._hvd_params:
            return
        if compression is Compression.none:
            self._hvd_reducer = GradReducer(g, self._hvd_params, op=OPS[op])
        else:
            like = [compression.compress(torch.zeros_like(p))[0] for p in self._hvd_params]
            self._hvd_reducer = _Compressed(g, like, op=OPS[op])
        for i, p in enumerate(self._hvd_params):
            p.register_post_accumulate_grad_hook(self._hvd_hook(i))

    def _hvd_hook(self, i: int) -> Any:
        def hook(p: Any) -> None:
            if self._hvd_delay[i] <= 0:
                raise AssertionError("Gradients were computed more than "
                                     "backward_passes_per_step times before call to step(). "
                                     "Increase backward_passes_per_step to accumulate "
                                     "gradients locally.")
            self._hvd_delay[i] -= 1
            self._hvd_fresh = True
            if self._hvd_delay[i] == 0:
                self._hvd_feed(i, p)
        return hook

    def _hvd_feed(self, i: int, p: Any) -> None:
        """Gradient i is final on this rank: to its bucket."""
        assert self._hvd_reducer is not None
        if p.grad is not None and p.grad.is_sparse:
            if not self._hvd_dense:
                raise TypeError(f"rank {self._hvd_g.rank}: DistributedOptimizer: parameter "
                                f"{i} has a sparse gradient: pass sparse_as_dense=True")
            p.grad = p.grad.to_dense()
        if p.grad is not None and self._hvd_f != 1.0:
            p.grad.mul_(1.0 / self._hvd_f)
        self._hvd_pending = True
        if self._hvd_compression is Compression.none:
            self._hvd_reducer.ready(i)
            return
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        sent, ctx = self._hvd_compression.compress(grad.detach())
        self._hvd_fed[i] = (sent, ctx)
        self._hvd_reducer.ready(i, sent)

    def _hvd_wait(self) -> None:
        """Every gradient not yet fed (fewer backward passes, or none) goes
        now; then the buckets are waited for and the results written back."""
        assert self._hvd_reducer is not None
        for i, p in enumerate(self._hvd_params):
            if self._hvd_delay[i] != 0:
                self._hvd_feed(i, p)
        try:
            self._hvd_reducer.wait()
        finally:
            self._hvd_delay = [self._hvd_k] * len(self._hvd_params)
            self._hvd_pending = self._hvd_fresh = False
            fed, self._hvd_fed = self._hvd_fed, {}
        with torch.no_grad():
            for i, p in enumerate(self._hvd_params):
                if p.grad is None:
                    continue
                if i in fed:
                    p.grad.copy_(self._hvd_compression.decompress(*fed[i]))
                if self._hvd_f != 1.0:
                    p.grad.mul_(self._hvd_f)

    def _hvd_join_step(self) -> None:
        """On a rank that has joined: zeros for every gradient of the step
        the others reduce (their average counts them, as Horovod's)."""
        for p in self._hvd_params:
            p.grad = None
        if self._hvd_reducer is not None:
            self._hvd_wait()
        for p in self._hvd_params:
            p.grad = None

    def synchronize(self) -> None:
        """Wait for every gradient's reduction: ``.grad`` holds the average
        over the ranks (of ``backward_passes_per_step`` passes' sums)."""
        if self._hvd_reducer is None or self._hvd_synced and not self._hvd_fresh:
            self._hvd_synced = True
            return
        control.announce(self._hvd_g, control.OPTIMIZER, "DistributedOptimizer.synchronize",
                         op=self._hvd_id)
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
    if op == Adasum:
        raise NotImplementedError("hvd.DistributedOptimizer: op=hvd.Adasum is not supported "
                                  "on meshrun: use hvd.Average")
    if op not in OPS:
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
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,),
               {k: v for k, v in _DistributedOptimizer.__dict__.items()
                if k not in ("__dict__", "__weakref__")})
    return cls(optimizer.param_groups, named_parameters, compression,
               backward_passes_per_step, op, gradient_predivide_factor, sparse_as_dense)
