"""torch's mean cross entropy run as its per-token (sum, count) (engine.per_token).

A micro-batch's ``F.cross_entropy(logits, y, ignore_index=-1)`` is its own
mean: weighed by rows, micro-batches counting different tokens make a step
that is no process's. Where a pipeline's torch loss is exactly such a mean
(``torch_loss`` asks ``summed``), it runs instead as the same call with
``reduction="sum"`` and the count torch's mean divides by::

    counted = y != ignore_index
    count   = counted.sum()                 (no class weight)
            = weight[y[counted]].sum()      (weight=: torch's own denominator)
            = rows                          (probabilities as targets)

label_smoothing keeps torch's meaning: its mean is (its sum) / that count.
A module ``nn.CrossEntropyLoss`` or ``nn.NLLLoss`` itself (its forward not
overridden) with ``reduction="mean"`` qualifies. Anything else (an MSE, a
function of the user's own) is left as written.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

__all__ = ["summed"]

_MEAN = "mean"


def summed(fn: Any) -> Callable[[Any, Any], Any] | None:
    """``fn``'s per-token form, ``(y, target) -> (loss_sum, count)``, where
    ``fn`` is a mean cross entropy (module docstring); else None. The form
    runs ``fn`` as written where, at a call, it no longer is one (its
    ``reduction`` changed)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(fn, torch.nn.Module):
        return None
    if _criterion(fn) is not None:
        def module_form(y: Any, target: Any) -> Any:
            kind = _criterion(fn)
            return fn(y, target) if kind is None else _sum_count(
                kind, y, target, fn.weight, fn.ignore_index, getattr(fn, "label_smoothing", 0.0))
        return module_form
    return None


def _criterion(m: Any) -> str | None:
    """``"cross_entropy"`` or ``"nll_loss"`` for an ``nn.CrossEntropyLoss``
    or ``nn.NLLLoss`` (its forward torch's) reducing by the mean, else None."""
    nn = sys.modules["torch"].nn
    for cls, kind in ((nn.CrossEntropyLoss, "cross_entropy"), (nn.NLLLoss, "nll_loss")):
        if isinstance(m, cls) and type(m).forward is cls.forward:
            return kind if getattr(m, "reduction", None) == _MEAN else None
    return None


def _sum_count(kind: str, y: Any, target: Any, weight: Any, ignore_index: int,
               label_smoothing: float) -> tuple[Any, Any]:
    """``(F.<kind>(..., reduction="sum"), the count torch's mean divides by)``."""
    torch = sys.modules["torch"]
    F = torch.nn.functional
    if kind == "cross_entropy":
        loss = F.cross_entropy(y, target, weight=weight, ignore_index=ignore_index,
                               reduction="sum", label_smoothing=label_smoothing)
    else:
        loss = F.nll_loss(y, target, weight=weight, ignore_index=ignore_index, reduction="sum")
    with torch.no_grad():
        if target.is_floating_point():      # probabilities: the mean is over rows
            count = torch.tensor(y.numel() // y.shape[0 if y.dim() == 1 else 1])
        else:
            counted = target != ignore_index
            count = (counted.sum() if weight is None
                     else weight[target[counted]].sum())
    return loss, count
