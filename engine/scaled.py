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
(engine.rollback's ``agree``, three more float64 slots: no collective of
its own), and where any rank's were not, every rank whose own were
finite gets an inf in each gradient's first entry: every rank's
``unscale_`` finds it, ``scaler.step`` skips on every rank and
``scaler.update`` halves every rank's scale alike, as one process's
scaler does. The same slots carry each rank's scale (and its negation:
the all-reduce takes the largest): a rank given no scaler, or another
scale, fails the step on every rank, rolled back.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["LossScale", "UNSCALED"]


class LossScale:
    """One step's loss scale on one rank (``scale`` None: no scaler), and
    whether its gradients, then any rank's, were finite."""

    def __init__(self, scale: float | None = None) -> None:
        self.scale = scale
        self.finite = True           # this rank's gradients after the step (``slots``)
        self.found = False           # a rank's were not (``agreed``)

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

    def seed(self, weight: float) -> float | None:
        """A micro-batch's loss gradient seed: the scale times its weight."""
        return None if self.scale is None else self.scale * weight

    def seeded(self, gy: Any, seed: float, counted: bool, loss_fn: Any, where: str) -> Any:
        """A micro-batch's loss gradient under the scale: seeded already by
        a torch loss (``seeded``: engine.torch_stage's ``torch_loss``), else
        (a (loss, gradient) pair) scaled by the seed. A per-token (sum,
        count) loss of the user's own is refused: its gradients are scaled
        by the count at the step's end, too late to seed by."""
        if counted:
            raise ValueError(f"{where}: step(scaler=) takes a mean loss: a per-token (sum, "
                             "count) loss's gradients are scaled by the count at the step's "
                             "end, too late to seed its float16 backward by; return the mean "
                             "over the micro-batch")
        fn = getattr(loss_fn, "as_written", loss_fn)
        return gy if getattr(fn, "seeded", False) else gy * seed

    def slots(self, pipe: Any) -> tuple[float, float, float]:
        """This rank's three slots of the closing all-reduce (its maximum):
        its scale, its negation (0 without a scaler) and 1 where this
        rank's gradients hold an inf or a nan (checked with a scaler only)."""
        if self.scale is None:
            return 0.0, 0.0, 0.0
        self.finite = all(_finite(g) for st in pipe.stages.values()
                          for g in _held(st) if g is not None)
        return self.scale, -self.scale, 0.0 if self.finite else 1.0

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
