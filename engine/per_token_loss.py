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
Two losses qualify: a module ``nn.CrossEntropyLoss`` or ``nn.NLLLoss``
itself (its forward not overridden) with ``reduction="mean"``; and a traced
model's own loss (engine.traced's ``.loss``, an fx GraphModule) whose
returned value is exactly one such call (``F.cross_entropy``,
``F.nll_loss``, or a call of such a module of the model's own), read by
nothing else. Anything else (an MSE, a cross entropy plus an auxiliary
term, a loss the model scales, a function of the user's own) is left as
written. A graph is read at each call (engine.traced_reshaped swaps a
piece's graph for inputs of other shapes).
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Callable

__all__ = ["summed"]

_MEAN = "mean"


def summed(fn: Any) -> Callable[[Any, Any], Any] | None:
    """``fn``'s per-token form, ``(y, target) -> (loss_sum, count)``, where
    ``fn`` is a mean cross entropy (module docstring); else None. The form
    runs ``fn`` as written where, at a call, it no longer is one (its
    ``reduction`` changed, a graph traced anew otherwise)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(fn, torch.nn.Module):
        return None
    if _criterion(fn) is not None:
        def module_form(y: Any, target: Any) -> Any:
            kind = _criterion(fn)
            return fn(y, target) if kind is None else _sum_count(
                kind, y, target, fn.weight, fn.ignore_index, getattr(fn, "label_smoothing", 0.0))
        return module_form
    import torch.fx as fx
    if not isinstance(fn, fx.GraphModule) or _loss_node(fn) is None:
        return None

    def graph_form(y: Any, target: Any) -> Any:
        node = _loss_node(fn)
        return fn(y, target) if node is None else _run(fn, node, y, target)
    return graph_form


def _criterion(m: Any) -> str | None:
    """``"cross_entropy"`` or ``"nll_loss"`` for an ``nn.CrossEntropyLoss``
    or ``nn.NLLLoss`` (its forward torch's) reducing by the mean, else None."""
    nn = sys.modules["torch"].nn
    for cls, kind in ((nn.CrossEntropyLoss, "cross_entropy"), (nn.NLLLoss, "nll_loss")):
        if isinstance(m, cls) and type(m).forward is cls.forward:
            return kind if getattr(m, "reduction", None) == _MEAN else None
    return None


def _loss_node(gm: Any) -> Any:
    """The node of ``gm``'s graph whose value it returns, where that is a
    mean cross entropy or NLL loss (a call of the function, or of a
    criterion module of the model's) that nothing else reads; else None."""
    F = sys.modules["torch"].nn.functional
    node: Any = next((n.args[0] for n in gm.graph.nodes if n.op == "output"), None)
    if len(getattr(node, "users", ())) != 1:
        return None
    if node.op == "call_module":
        return node if _criterion(gm.get_submodule(node.target)) is not None else None
    if node.op != "call_function" or node.target not in (F.cross_entropy, F.nll_loss):
        return None
    try:
        given = inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments
    except TypeError:
        return None
    plain = given.get("size_average") is None and given.get("reduce") is None
    return node if plain and given.get("reduction", _MEAN) == _MEAN else None


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


def _run(gm: Any, node: Any, y: Any, target: Any) -> Any:
    """``gm(y, target)`` run node by node (torch.fx's Interpreter, reading
    its parameters and buffers as they are now), its loss ``node`` as
    ``_sum_count`` of the values it is given."""
    import torch.fx as fx
    F = sys.modules["torch"].nn.functional

    class Run(fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            if n is not node:
                return super().run_node(n)
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if n.op == "call_module":
                m = self.fetch_attr(n.target)
                kind, v = _criterion(m), inspect.signature(m.forward).bind(*args, **kwargs)
                assert kind is not None
                return _sum_count(kind, v.arguments["input"], v.arguments["target"], m.weight,
                                  m.ignore_index, getattr(m, "label_smoothing", 0.0))
            bound = inspect.signature(n.target).bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            return _sum_count("cross_entropy" if n.target is F.cross_entropy else "nll_loss",
                              a["input"], a["target"], a["weight"], a["ignore_index"],
                              a.get("label_smoothing", 0.0))

    return Run(gm).run(y, target)
