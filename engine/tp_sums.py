"""Whole parameters fed a part of the activations, summed once a step.

Under sequence parallelism a parameter that stays whole on every tp rank
(a norm's weight and bias; a rowwise bias added to a sequence-split
output) sees only this rank's part of the sequence, so its gradient is
the sum of the tp ranks' gradients. ``engine.parallelize`` sums each such
gradient as it is made (a hook: a collective per parameter per backward),
which a plain training loop needs. A Pipeline sums them once a step
instead (``TpSums``), as Megatron's ``finalize_model_grads`` does: while a
step runs, the holders (a sharded torch submodule's ``_tp`` record, an
``engine.tp_layers.Sharded`` layer) are switched to ``defer``, the
gradients add up locally over the micro-batches, and after the step's
backward passes one all-reduce per tp group and dtype sums them all (the
dp all-reduces run first: a sum of averages is the average of the sums).
The sum is of this step's gradients only: the executor sets aside what
they held before the step and adds it back once, after the sum, so
accumulating over steps adds each step's sum once, as torch does.
A schedule with OPT actions steps its optimizer inside the step, before
that sum: its pipeline keeps the per-backward sums.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

import collectives
from mesh.tensors import is_tensor

from .tp_layers import sharded_layers

__all__ = ["TpSums", "holders"]


def holders(stage: Any) -> list[Any]:
    """The tp-summed gradients' holders in a stage object: each has
    ``group``, ``defer`` and ``summed_grads()`` (arrays sharing the
    gradients' memory)."""
    module = getattr(stage, "module", None)
    if module is not None and hasattr(module, "modules"):       # a TorchStage
        return [m._tp for m in module.modules() if getattr(m, "_tp", None) is not None
                and m._tp.summed]
    return [layer for layer in sharded_layers(stage) if layer.summed_grads()]


class TpSums:
    """The deferred tp sums of one pp rank's stages (empty: nothing to do)."""

    def __init__(self, stages: Mapping[int, Any], enabled: bool = True) -> None:
        self.holders = [h for _, st in sorted(stages.items()) for h in holders(st)] \
            if enabled else []

    def __bool__(self) -> bool:
        return bool(self.holders)

    def _grads(self) -> list[tuple[Any, Any]]:
        return [(h.group, g) for h in self.holders for g in h.summed_grads()]

    def start(self) -> None:
        """Defer the sums. What the gradients held before the step (summed
        already) the executor sets aside and adds back after ``settle``
        (``_Step.prior``), so the step's sum covers this step's parts only."""
        for h in self.holders:
            h.defer = True

    def settle(self, timeout: float | None = None) -> None:
        """Sum the step's gradients over each tp group (one all-reduce per
        group and dtype; bfloat16 summed in float32, rounded once)."""
        grads = self._grads()
        buckets: dict[tuple[int, str], list[int]] = {}
        for i, (group, g) in enumerate(grads):
            buckets.setdefault((id(group), str(g.dtype)), []).append(i)
        for idx in buckets.values():
            group, parts = grads[idx[0]][0], [grads[i][1] for i in idx]
            xp = _xp(parts[0])
            flat = xp.concatenate([p.reshape(-1) for p in parts])
            collectives.all_reduce(group, flat, timeout=timeout)
            at = 0
            for p in parts:
                n = _count(p)
                p[...] = flat[at:at + n].reshape(p.shape)
                at += n
        self.abandon()

    def abandon(self) -> None:
        """After the step, failed or not: later backward passes sum as they
        go until the next step. (A failed step's gradients are rolled back
        by the executor; the tp peers' sum is failed by it, _abandon_tp.)"""
        for h in self.holders:
            h.defer = False


def _count(a: Any) -> int:
    """The elements of an array or a tensor (whose ``size`` is a method)."""
    return int(a.numel()) if is_tensor(a) else int(a.size)


def _xp(a: Any) -> Any:
    """numpy, or the array module of a device array (CuPy), or torch for a
    tensor (a bfloat16 gradient, which numpy cannot view)."""
    if isinstance(a, np.ndarray):
        return np
    import importlib
    return importlib.import_module(type(a).__module__.split(".")[0])
