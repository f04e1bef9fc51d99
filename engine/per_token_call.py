"""A loss function whose value is one mean cross entropy, run per token (engine.per_token).

engine.per_token_loss reads a criterion module and a traced graph; a
function it cannot read (``lambda out, y: ce(out["logits"], y)`` for a
model returning a dict, a dataclass or a tuple; ``F.cross_entropy`` itself;
``lambda o, y: F.cross_entropy(o.flatten(0, 1), y.flatten())``) may still
return the very tensor of one mean ``F.cross_entropy`` or ``F.nll_loss``
call (made directly, or by an ``nn.CrossEntropyLoss`` / ``nn.NLLLoss``,
whose forward makes it). Each call of the function is watched (a torch
function mode over the call): where the value it returns is such a call's,
the micro-batch's loss is that call's sum and count (per_token_loss's
``_sum_count`` of the same arguments), so micro-batches counting different
tokens weigh by them, as in one process; anything else (the call plus
another term, a scaled one, a sum, an MSE) stays as written.

A function seen returning such a call has its calls made as sums from then
on (each handing the function ``sum / count``, its mean), so its steps cost
what the pair written by hand costs; one seen returning anything else runs
as written, watched only. Each micro-batch calls the function once: a call
that goes the other way than the last (made as sums, it returned
something else this time: ``ce + aux``) keeps the value it made, whose
cross entropies are those sums over their counts (the same means, to
rounding), and the watch follows it; a step whose micro-batches so return
both kinds fails as mixed kinds do (engine.per_token's ``Counts``).
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Callable

from .per_token_loss import _sum_count

__all__ = ["watched"]


def watched(fn: Any) -> Callable[[Any, Any], Any] | None:
    """``fn``'s per-token form, ``(y, target) -> (loss_sum, count)`` where
    its call returns one mean cross entropy's value, else what it returns
    (module docstring); None where torch is not loaded or ``fn`` cannot be
    called."""
    torch = sys.modules.get("torch")
    if torch is None or not callable(fn):
        return None
    sums = [False]      # whether the last call returned such a value

    def form(y: Any, target: Any) -> Any:
        # (one call each micro-batch: a function called again would draw its random
        # numbers or move its state twice, and cost two forwards of the loss)
        with _Watch(summed=sums[0]) as w:
            out = fn(y, target)
        pair = w.pair_of(out)
        sums[0] = pair is not None
        return out if pair is None else pair
    return form


_SIGNATURES: dict[Any, inspect.Signature] = {}


def _mean_call(func: Any, args: Any, kwargs: Any) -> tuple[str, dict[str, Any]] | None:
    """(kind, arguments) of a call of ``F.cross_entropy`` or ``F.nll_loss``
    reducing by the mean (no ``size_average`` or ``reduce`` either), else None."""
    F = sys.modules["torch"].nn.functional
    if func is not F.cross_entropy and func is not F.nll_loss:
        return None
    kind = "cross_entropy" if func is F.cross_entropy else "nll_loss"
    sig = _SIGNATURES.get(func) or _SIGNATURES.setdefault(func, inspect.signature(func))
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    a = bound.arguments
    plain = a.get("size_average") is None and a.get("reduce") is None
    return (kind, a) if plain and a.get("reduction") == "mean" else None


def _watch_class() -> type:
    from torch.overrides import TorchFunctionMode

    class Watch(TorchFunctionMode):
        """The mean cross entropies a call makes: each made as written, or
        (``summed``) as its sum and count, handing back ``sum / count``."""

        def __init__(self, summed: bool) -> None:
            super().__init__()
            self.summed = summed
            self.made: list[tuple[Any, Any]] = []     # (the value handed back, its pair)

        def __torch_function__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            call = _mean_call(func, args, kwargs)
            if call is None:
                return func(*args, **kwargs)
            kind, a = call
            pair = None
            if self.summed:
                pair = _sum_count(kind, a["input"], a["target"], a["weight"],
                                  a["ignore_index"], a.get("label_smoothing", 0.0))
                out = pair[0] / pair[1]
            else:
                out = func(*args, **kwargs)
            self.made.append((out, (kind, a) if pair is None else pair))
            return out

        def pair_of(self, out: Any) -> Any:
            """``(loss_sum, count)`` where ``out`` is the value of a mean
            cross entropy this call made, else None."""
            for value, made in self.made:
                if value is out:
                    if not self.summed:
                        kind, a = made
                        return _sum_count(kind, a["input"], a["target"], a["weight"],
                                          a["ignore_index"], a.get("label_smoothing", 0.0))
                    return made
            return None

    return Watch


_WATCH: list[type] = []


def _Watch(summed: bool) -> Any:
    if not _WATCH:
        _WATCH.append(_watch_class())
    return _WATCH[0](summed)
