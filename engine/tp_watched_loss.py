"""The user's torch loss of a watched colwise output (engine.tp_watch):
``F.cross_entropy`` (or ``nn.CrossEntropyLoss``) of a head's logits left
sharded over the vocabulary runs vocab-parallel there (engine.tp_loss);
any other loss of them is refused, as it would reduce over this rank's part
of the logits alone.
"""
from __future__ import annotations

from typing import Any

from .tp_plan import PlanError
from .torch_stage import _torch
from .tp_loss import vocab_parallel_cross_entropy

__all__ = ["LOSSES", "watched_loss"]


# torch.nn.functional's losses other than cross entropy: on a colwise shard
# each would reduce over this rank's part of the logits alone
_OTHER_LOSSES = frozenset((
    "nll_loss", "kl_div", "binary_cross_entropy", "binary_cross_entropy_with_logits",
    "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "soft_margin_loss",
    "multilabel_soft_margin_loss", "multi_margin_loss", "multilabel_margin_loss",
    "poisson_nll_loss", "gaussian_nll_loss", "ctc_loss"))
LOSSES = _OTHER_LOSSES | {"cross_entropy"}


def watched_loss(func: Any, args: Any, kwargs: Any, x: Any) -> Any:
    """``func`` (one of ``LOSSES``, by name) called on ``x``, a watched
    colwise output (engine.tp_watch): cross entropy over its features
    (its class axis holding this rank's part of them, one feature a step)
    runs vocab-parallel on the shard (class weights and probabilities as
    targets too, over the whole vocabulary); any other loss, or a cross
    entropy that cannot (the features on another axis, the output as the
    target), raises PlanError naming the module and the fix."""
    torch = _torch()
    import inspect
    meta, name = x._tp_meta, getattr(func, "__name__", str(func))
    group = meta.group
    head = (f"tp rank {group.rank}: {meta.name}: the code calling it takes {name}() of its "
            f"output, which is sharded colwise (this rank's {x._tp_width} of "
            f"{x._tp_width * group.size} features)")
    fix = (f"give {meta.name} output 'replicate' ({{'style': 'colwise', 'output': "
           f"'replicate'}}: its output gathered whole)")
    if name != "cross_entropy":
        raise PlanError(f"{head}: {name} of this rank's part alone, another on each rank, "
                        f"with no error; {fix}, or take F.cross_entropy of the logits, "
                        f"which runs on the shards (vocab-parallel)")
    bound = inspect.signature(torch.nn.functional.cross_entropy).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    logits, target = a["input"], a["target"]
    why = ""
    if logits is not x:
        why = "as the target"
    else:
        c = 0 if x.dim() == 1 else 1
        if x._tp_axis % x.dim() != c or x._tp_unit != 1 or x.shape[c] != x._tp_width:
            why = (f"over axis {c} of a {tuple(x.shape)} tensor made of it, where this rank's "
                   f"part of its features is not (one feature a step)")
    if why:
        raise PlanError(f"{head} {why}; {fix}")
    reduction = a["reduction"]
    if a["size_average"] is not None or a["reduce"] is not None:
        reduction = torch.nn._reduction.legacy_get_string(a["size_average"], a["reduce"])
    plain = x.as_subclass(torch.Tensor)
    if plain.dim() > 2:         # (N, V, d...): the class axis last
        plain = plain.movedim(1, -1)
        if isinstance(target, torch.Tensor) and target.dim() == x.dim():
            target = target.movedim(1, -1)          # (probabilities: alike)
    return vocab_parallel_cross_entropy(plain, target, group, a["ignore_index"], reduction,
                                        a["label_smoothing"], weight=a["weight"],
                                        name=meta.name)
