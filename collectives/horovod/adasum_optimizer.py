"""Horovod's Adasum DistributedOptimizer (op=hvd.Adasum on more than one
rank): each rank steps on its own gradients and the steps' changes are
combined by Adasum."""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator

import torch

from . import control
from .adasum import adasum_all_reduce
from .basics import _s, _world
from .named import check_named, one_more_pass

__all__: list[str] = []


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
        check_named(self, named_parameters)
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
            one_more_pass(self._hvd_delay, i)
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

    def _hvd_join_step(self, regroup: bool = False) -> None:
        self._hvd_combine(joined=True)      # (no buckets: never asked to regroup)

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
