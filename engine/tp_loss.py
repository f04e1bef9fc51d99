"""Cross entropy on vocab-sharded logits (Megatron's
``vocab_parallel_cross_entropy``, torch's ``loss_parallel``): each tp rank
holds a contiguous part of the vocabulary's logits, as a head planned
``colwise`` leaves them (output ``"shard"``), and the loss is computed
there, never gathering the (rows, vocab) logits::

    rank r: x_r (rows, V/tp) -> per row: max m_r, sum exp(x_r - m_r) s_r,
            the target's logit where rank r holds the target (else 0),
            the sum of x_r (label smoothing)
    one all-gather of those (4, rows) (and each part's width, checked alike)
                                  -> logsumexp = M + log sum_r s_r e^(m_r - M)
    gradient, on the shard only: softmax_r - (1 - eps) onehot_r - eps / V

A watched colwise output (engine.tp_watch) takes this path when the user's
``F.cross_entropy`` (or ``nn.CrossEntropyLoss``) is called on it; torch
tensors go through an autograd Function, numpy arrays return ``(loss,
gradient)`` as ``engine.layers``' losses do.
"""
from __future__ import annotations

import functools
import sys
from typing import Any

import numpy as np

import collectives

from .tp_plan import PlanError, as_comm, logged
from .torch_stage import _torch

__all__ = ["vocab_parallel_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


def vocab_parallel_cross_entropy(logits: Any, target: Any, group: Any, ignore_index: int = -100,
                                 reduction: str = "mean", label_smoothing: float = 0.0, *,
                                 name: str = "vocab_parallel_cross_entropy") -> Any:
    """``F.cross_entropy(whole_logits, target, ...)`` from this tp rank's
    part of the logits: ``logits`` is ``(..., V / tp)``, the vocabulary
    its last axis (``(rows, V / tp)``, ``(batch, T, V / tp)``, or
    ``(V / tp,)`` for one row), holding the columns ``rank * V / tp`` to
    ``(rank + 1) * V / tp`` of the whole vocabulary, every rank as many
    (else ValueError on every rank); ``target`` holds the whole
    vocabulary's class ids, of the logits' shape less their last axis, the
    same on every tp rank of ``group`` (a meshrun communicator, or a
    torch.distributed group on the "meshrun" backend). Every tp rank gets
    the same loss (reduction "mean", "sum" or "none"; ``ignore_index`` and
    ``label_smoothing`` as torch's); the gradient (torch: through autograd,
    one backward) is this rank's part of the whole one. One all-gather of
    ``4 * rows`` numbers (and the part's width); nothing of size vocab
    crosses the group. Class indices only (no ``weight``, no probabilities
    as targets); a target outside the vocabulary raises IndexError, as
    torch's. numpy: returns ``(loss, gradient of logits)``, reduction
    "mean" or "sum", as a pipeline's numpy ``loss_fn``. ``name`` names the
    call in errors (the head's module, where the watch calls it)."""
    group = as_comm(group, name)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: reduction is one of {_REDUCTIONS}, not {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{name}: label_smoothing is in [0, 1], not {label_smoothing!r}")
    torch = _torch() if _is_tensor(logits) else None
    if torch is None:
        return _numpy(np.asarray(logits), np.asarray(target), group, ignore_index, reduction,
                      float(label_smoothing), name)
    return _function().apply(logits, torch.as_tensor(target, device=logits.device), group,
                             ignore_index, reduction, float(label_smoothing), name,
                             _loss_dtype(torch, logits))


def _loss_dtype(torch: Any, logits: Any) -> Any:
    """The loss's dtype, as F.cross_entropy's: float32 for bfloat16 or
    float16 logits under torch.autocast (which runs cross entropy in
    float32), else the logits' own. (The loss is worked in float32 either
    way; a per-token sum rounded to bfloat16 would lose its third digit.)"""
    low = logits.dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if low and torch.is_autocast_enabled(logits.device.type) else \
        logits.dtype


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _rows(logits_shape: tuple[int, ...], target_shape: tuple[int, ...], group: Any,
          name: str) -> None:
    """Raise unless the shapes are cross entropy's: ``(C,)`` and ``()``, or
    ``(N, C)`` and ``(N,)`` (the class axis moved last before)."""
    want = logits_shape[:-1]
    if tuple(target_shape) != tuple(want):
        raise ValueError(f"tp rank {group.rank}: {name}: a target of shape "
                         f"{tuple(target_shape)} for logits of shape {tuple(logits_shape)} "
                         f"(this rank's part of the vocabulary): it has the logits' shape "
                         f"without their class axis (class indices; probabilities as targets "
                         f"are not taken on vocab-sharded logits)")


def _out_of_range(t: Any, valid: Any, vocab: int, group: Any, name: str) -> None:
    """Raise IndexError for a target id outside the whole vocabulary (as
    torch does), alike on every tp rank (the targets are, and the parts'
    widths, checked in the exchange before)."""
    bad = valid & ((t < 0) | (t >= vocab))
    if bool(bad.any()):
        raise IndexError(f"tp rank {group.rank}: {name}: target {int(t[bad].reshape(-1)[0])} "
                         f"is out of bounds for {vocab} classes (the vocabulary, sharded "
                         f"over tp={group.size})")


def _exchanged(group: Any, stats: Any, part: int, name: str, lib: Any) -> Any:
    """Every tp rank's ``(4, rows)`` statistics: ``(tp, 4, rows)``. Each
    rank's part of the vocabulary rides as a last column: parts unlike
    (the offsets ``rank * part`` assume them alike) raise on every rank."""
    width = lib.full((4, 1), float(part), dtype=stats.dtype)
    if lib is not np:
        width = width.to(stats.device)
    every = _gathered(group, lib.cat([stats, width], 1) if lib is not np
                      else np.concatenate([stats, width], 1), "ag", name)
    parts = [int(w) for w in every[:, 0, -1].tolist()]
    if len(set(parts)) > 1:
        raise ValueError(f"tp rank {group.rank}: {name}: the ranks hold parts of the "
                         f"vocabulary of unlike widths {parts} (by tp rank): each holds "
                         f"V / tp columns, rank r the columns from r * V / tp (a head "
                         f"planned colwise splits them so)")
    return every[:, :, :-1]


@logged
def _gathered(group: Any, stats: Any, op: str, name: str) -> Any:
    return collectives.all_gather(group, stats)


def _combined(every: Any, lib: Any) -> tuple[Any, Any, Any, Any]:
    """From every rank's (max, sum of exp less that max, target logit, sum
    of logits): the whole rows' max, sum of exp less it, target logit and
    sum of logits (``lib``: numpy or torch)."""
    m, s, tl, sx = every[:, 0], every[:, 1], every[:, 2], every[:, 3]
    top = lib.amax(m, 0)
    total = (s * lib.exp(m - top)).sum(0)
    return top, total, tl.sum(0), sx.sum(0)


def _numpy(x: Any, t: Any, group: Any, ignore_index: int, reduction: str, eps: float,
           name: str) -> tuple[float, Any]:
    if reduction == "none":
        raise ValueError(f"{name}: numpy logits take reduction 'mean' or 'sum' (a loss and "
                         f"its gradient), not 'none'")
    _rows(x.shape, t.shape, group, name)
    shape, part = x.shape, x.shape[-1]
    work = np.float64 if x.dtype == np.float64 else np.float32
    xs, ts = x.reshape(-1, part).astype(work, copy=False), t.reshape(-1).astype(np.int64)
    vocab, lo = part * group.size, part * group.rank
    valid = ts != ignore_index
    local = ts - lo
    mine = valid & (local >= 0) & (local < part)
    rows = np.arange(len(ts))
    m = xs.max(-1)
    e = xs - m[:, None]
    np.exp(e, out=e)
    stats = np.stack([m, e.sum(-1), np.where(mine, xs[rows, np.clip(local, 0, part - 1)], 0),
                      xs.sum(-1) if eps else np.zeros(len(ts), work)]).astype(work)
    every = _exchanged(group, stats, part, name, np)
    _out_of_range(ts, valid, vocab, group, name)
    top, total, tl, sx = _combined(every, np)
    per_row = np.where(valid, top + np.log(total) - (1 - eps) * tl - eps / vocab * sx, 0.0)
    count = int(valid.sum())
    scale = 1.0 / max(count, 1) if reduction == "mean" else 1.0
    loss = float(per_row.sum()) * scale if count or reduction == "sum" else float("nan")
    grad = e        # (the softmax, in place)
    grad *= (np.exp(m - top) / total)[:, None]
    grad[rows[mine], local[mine]] -= 1 - eps
    grad -= eps / vocab
    grad *= (valid * scale)[:, None]
    return loss, grad.astype(x.dtype, copy=False).reshape(shape)


@functools.cache
def _function() -> Any:
    torch = _torch()

    class VocabParallelCrossEntropy(torch.autograd.Function):  # type: ignore[misc,name-defined]
        """Cross entropy of vocab-sharded logits (``vocab_parallel_cross_entropy``):
        the forward's one all-gather of per-row statistics; the backward on
        the shard alone, from the softmax kept."""

        @staticmethod
        def forward(ctx: Any, logits: Any, target: Any, group: Any, ignore_index: int,
                    reduction: str, eps: float, name: str, loss_dtype: Any) -> Any:
            _rows(tuple(logits.shape), tuple(target.shape), group, name)
            part = logits.shape[-1]
            work = logits.dtype if logits.dtype in (torch.float32, torch.float64) else \
                torch.float32
            xs = logits.detach().reshape(-1, part).to(work)
            ts = target.reshape(-1).long()
            vocab, lo = part * group.size, part * group.rank
            valid = ts != ignore_index
            local = ts - lo
            mine = valid & (local >= 0) & (local < part)
            m = xs.amax(-1)
            e = (xs - m[:, None]).exp_()      # (one buffer of the shard's size: the softmax)
            picked = xs.gather(1, local.clamp(0, part - 1)[:, None]).squeeze(1)
            stats = torch.stack([m, e.sum(-1), torch.where(mine, picked, 0.0),
                                 xs.sum(-1) if eps else torch.zeros_like(m)])
            every = _exchanged(group, stats, part, name, torch)
            _out_of_range(ts, valid, vocab, group, name)
            top, total, tl, sx = _combined(every, torch)
            per_row = torch.where(valid, top + torch.log(total) - (1 - eps) * tl
                                  - eps / vocab * sx, 0.0)
            count = valid.sum()
            if reduction == "mean":
                loss = per_row.sum() / count
            elif reduction == "sum":
                loss = per_row.sum()
            else:
                loss = per_row.reshape(target.shape)
            e.mul_((torch.exp(m - top) / total)[:, None])      # the softmax, in place
            # (kept on ctx, not saved: the backward makes the gradient in place in it)
            ctx.soft, ctx.local, ctx.mine, ctx.valid = e, local, mine, valid
            ctx.shape, ctx.dtype, ctx.eps, ctx.vocab = logits.shape, logits.dtype, eps, vocab
            ctx.reduction, ctx.count, ctx.used, ctx.name = reduction, count, False, name
            ctx.rank = group.rank
            return loss.to(loss_dtype)

        @staticmethod
        def backward(ctx: Any, g: Any) -> Any:
            local, mine, valid = ctx.local, ctx.mine, ctx.valid
            if ctx.used:
                raise RuntimeError(f"tp rank {ctx.rank}: {ctx.name}: a second backward "
                                   f"through the vocab-parallel cross entropy (retain_graph="
                                   f"True): its first made the gradient in place in the "
                                   f"softmax it kept")
            grad, ctx.used = ctx.soft, True
            rows = mine.nonzero().squeeze(1)
            grad[rows, local[rows]] -= 1 - ctx.eps
            if ctx.eps:
                grad.sub_(ctx.eps / ctx.vocab)
            if ctx.reduction == "none":
                scale = g.reshape(-1).to(grad.dtype) * valid
            else:
                scale = (g.to(grad.dtype) / (ctx.count if ctx.reduction == "mean" else 1)) * valid
            grad.mul_(scale[:, None])
            return (grad.to(ctx.dtype).reshape(ctx.shape), None, None, None, None, None, None,
                    None)

    return VocabParallelCrossEntropy


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
    runs vocab-parallel on the shard; any other loss, or a cross entropy
    that cannot (class weights, probabilities as targets, the features on
    another axis), raises PlanError naming the module and the fix."""
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
    elif a["weight"] is not None:
        why = "with class weights (weight=), which the vocab-parallel loss does not take"
    elif target.is_floating_point():
        why = ("with probabilities as targets, which the vocab-parallel loss does not take "
               "(class indices)")
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
    if plain.dim() > 2:
        plain = plain.movedim(1, -1)
    return vocab_parallel_cross_entropy(plain, target, group, a["ignore_index"], reduction,
                                        a["label_smoothing"], name=meta.name)
