"""Loss scaling for float16 training (``job.step(x, y, scaler=scaler)``,
torch's ``torch.amp.GradScaler``, DeepSpeed's ``"fp16"`` loss scaler).

In one process the loop is ``scaler.scale(loss).backward()``,
``scaler.unscale_(opt)``, ``clip_grad_norm_``, ``scaler.step(opt)``,
``scaler.update()``. A job's step runs the backward itself, so the scaler
is handed to it: each micro-batch's loss gradient is seeded with the
scaler's scale times the micro-batch's weight in the global batch (its
backward from the loss, in float32, then starts at one process's value,
before the cast to the output's float16: scaling the float16 gradient
afterwards would keep its underflow). torch's scaler then finds inf or nan
in the gradients it unscales per rank: a stage whose gradients overflowed
while another rank's did not would skip ``opt.step()`` there alone, and
the weights part from one process's with nothing said. So every rank
tells whether its gradients are finite in the step's closing all-reduce
(engine.rollback's ``agree``, four more float64 slots: no collective of
its own), and where any rank's were not, every rank whose own were
finite gets an inf in each gradient's first entry: every rank's
``unscale_`` finds it, ``scaler.step`` skips on every rank and
``scaler.update`` halves every rank's scale alike, as one process's
scaler does. The same slots carry each rank's scale (and its negation:
the all-reduce takes the largest): a rank given no scaler, or another
scale, fails the step on every rank, rolled back.

A per-token loss (engine.per_token) divides by a count known only once
the step's backwards are done, so its sums cannot start theirs from one
process's ``scale / count``. Each starts from ``scale / elements``, the
targets' elements over the global batch (known on the last stage's ranks
as the step starts: summed over dp with the rows), at most the count's
``scale / count`` where a target counts once at most, so the float16
backward overflows only where one process's would; the last slot tells
every rank the elements, and the step's end multiplies the gradients by
them besides the count's ``dp / count`` (engine.step's ``settle``,
after the inf check: a finite float32 gradient times it is one
process's scaled one, finite too).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["LossScale", "UNSCALED"]


class LossScale:
    """One step's loss scale on one rank (``scale`` None: no scaler), and
    whether its gradients, then any rank's, were finite; a per-token loss's
    divisor (``per_token``)."""

    def __init__(self, scale: float | None = None) -> None:
        self.scale = scale
        self.finite = True           # this rank's gradients after the step (``slots``)
        self.found = False           # a rank's were not (``agreed``)
        self.divisor = 0.0           # a per-token sum's seed is scale / it (0: not known here)

    @classmethod
    def of(cls, scaler: Any, pipe: Any) -> LossScale:
        """The scale of ``scaler`` (a ``torch.amp.GradScaler``; None, or a
        disabled one: no scaling) for a step of ``pipe``, its scale tensor
        made on the stages' device as ``scaler.scale(loss)`` makes it, so
        that ``unscale_``, ``step`` and ``update`` work on every rank, the
        last stage's or not. Refused (ValueError naming the rank) on numpy
        stages and where the schedule steps the optimizer inside the step
        (OPT actions: before any unscale_)."""
        if scaler is None:
            return UNSCALED
        where = f"pp rank {pipe.rank}: step(scaler=)"
        if not (callable(getattr(scaler, "scale", None)) and hasattr(scaler, "unscale_")):
            raise TypeError(f"{where}: a torch.amp.GradScaler, not {type(scaler).__name__!r}")
        if not scaler.is_enabled():
            return UNSCALED
        params = [p for st in pipe.stages.values() if hasattr(st, "grad_params")
                  for p in st.grad_params()]
        if len(params) == 0 and any(not hasattr(st, "grad_params")
                                    for st in pipe.stages.values()):
            raise ValueError(f"{where}: loss scaling needs torch stages (a GradScaler unscales "
                             f"a torch optimizer's .grad); this rank's are numpy layers")
        if pipe.has_opt:
            raise ValueError(f"{where}: schedule {pipe.schedule.name!r} steps its optimizer "
                             "inside the step (OPT actions), before scaler.unscale_ could")
        import torch
        one = torch.ones((), device=params[0].device if params else "cpu")
        return cls(float(scaler.scale(one)))

    def per_token(self, elements: float) -> None:
        """Set the divisor of a per-token loss's seed (the last stage's
        ranks, before the step's first backward): ``elements``, the targets'
        elements over the global batch (at least 1), which bounds a count
        of tokens from above: its backward then starts from ``scale /
        elements`` for every micro-batch's sum, never above one process's
        ``scale / count``, and ``factor`` makes the gradients one
        process's at the step's end, once the count is known."""
        if self.scale is not None:
            self.divisor = max(float(elements), 1.0)

    def seed(self, weight: float) -> float | None:
        """A micro-batch's loss gradient seed: the scale times its weight."""
        return None if self.scale is None else self.scale * weight

    def sum_seed(self) -> float | None:
        """A per-token loss's sum's seed: the scale over the divisor."""
        return None if self.scale is None else self.scale / self.divisor

    def seeded(self, gy: Any, seed: float, counted: bool, loss_fn: Any) -> Any:
        """A micro-batch's loss gradient under the scale: seeded already by
        a torch loss (``seeded``: engine.torch_stage's ``torch_loss``), else
        (a (loss, gradient) pair) scaled by the seed, or a per-token (sum,
        gradient, count) loss's by ``sum_seed``."""
        if getattr(loss_fn, "seeded", False):
            return gy
        return gy * (self.sum_seed() if counted else seed)

    def factor(self) -> float:
        """What a per-token step's gradients are multiplied by besides
        the count's scale (engine.per_token): the divisor their seed was
        scaled down by (1 without a scaler)."""
        return 1.0 if self.scale is None else self.divisor

    def slots(self, pipe: Any) -> tuple[float, float, float, float]:
        """This rank's four slots of the closing all-reduce (its maximum):
        its scale, its negation (0 without a scaler), 1 where this rank's
        gradients hold an inf or a nan (checked with a scaler only) and
        the divisor of a per-token loss's seed (the last stage's ranks';
        0 elsewhere)."""
        if self.scale is None:
            return 0.0, 0.0, 0.0, 0.0
        self.finite = all(_finite(g) for st in pipe.stages.values()
                          for g in _held(st) if g is not None)
        return self.scale, -self.scale, 0.0 if self.finite else 1.0, self.divisor

    def agreed(self, told: Any, where: str) -> None:
        """Read the all-reduced slots: whether any rank's gradients were
        not finite; a ValueError where the ranks' scales differ (a rank
        given none: 0), raised on every rank (the step is rolled back)."""
        most, least = float(told[0]), -float(told[1])
        if most != least:
            mine = "no scaler" if self.scale is None else f"a scale of {self.scale:g}"
            raise ValueError(f"{where}: step(scaler=) was given {mine} here, while the "
                             f"ranks' scales range from {_said(least)} to {_said(most)}: every "
                             "rank passes a GradScaler of the same scale (each its own, built "
                             "alike, each updated by scaler.update()), or none; rolled back on "
                             "every rank")
        self.found = bool(told[2])
        self.divisor = float(told[3])

    def settle(self, pipe: Any) -> None:
        """After a step some rank's gradients overflowed in: this rank's,
        where its own were finite, get an inf in each first entry, so its
        ``scaler.unscale_`` finds an inf as one process's would."""
        if not (self.found and self.finite):
            return
        for st in pipe.stages.values():
            for p in st.grad_params():
                if p.grad is not None and p.grad.numel():
                    p.grad[(0,) * p.grad.dim()] = math.inf


UNSCALED = LossScale()


def _held(stage: Any) -> list[Any]:
    return stage.kept_grads() if hasattr(stage, "kept_grads") else list(stage.grads())


def _finite(g: Any) -> bool:
    if isinstance(g, np.ndarray):
        return bool(np.isfinite(g).all())
    import torch
    return bool(torch.isfinite(g).all())


def _said(scale: float) -> str:
    return "none" if scale == 0 else f"{scale:g}"
