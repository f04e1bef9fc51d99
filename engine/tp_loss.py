"""Cross entropy on vocab-sharded logits (Megatron's
``vocab_parallel_cross_entropy``, torch's ``loss_parallel``): each tp rank
holds a contiguous part of the vocabulary's logits, as a head planned
``colwise`` leaves them (output ``"shard"``), and the loss is computed
there, never gathering the (rows, vocab) logits::

    rank r: x_r (rows, V/tp) -> per row: max m_r, sum exp(x_r - m_r) s_r,
            the target's logit where rank r holds the target (else 0),
            the sum of w_r x_r (label smoothing; w: the class weights)
    one all-gather of those (4, rows) (and each part's width, checked alike)
                                  -> logsumexp = M + log sum_r s_r e^(m_r - M)
    gradient, on the shard only: softmax_r - (1 - eps) onehot_r - eps / V

Every form is a row's ``A * logsumexp - B`` with ``A = sum_c a_c`` and
``B = sum_c a_c x_c``, of gradient ``A * softmax - a``: class indices
take ``a = (1 - eps) w_t onehot_t + eps / V * w``, probabilities ``p`` as
targets ``a = w * ((1 - eps) p + eps / V)`` (``w`` all ones without
``weight=``); a mean divides by the rows' ``w_t`` (indices) or by the rows
(probabilities), torch's rule.

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

from .tp_plan import as_comm, logged
from .torch_stage import _torch

__all__ = ["vocab_parallel_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


def vocab_parallel_cross_entropy(logits: Any, target: Any, group: Any, ignore_index: int = -100,
                                 reduction: str = "mean", label_smoothing: float = 0.0, *,
                                 weight: Any = None,
                                 name: str = "vocab_parallel_cross_entropy") -> Any:
    """``F.cross_entropy(whole_logits, target, ...)`` from this tp rank's
    part of the logits: ``logits`` is ``(..., V / tp)``, the vocabulary
    its last axis (``(rows, V / tp)``, ``(batch, T, V / tp)``, or
    ``(V / tp,)`` for one row), holding the columns ``rank * V / tp`` to
    ``(rank + 1) * V / tp`` of the whole vocabulary, every rank as many
    (else ValueError on every rank); ``target`` holds the whole
    vocabulary's class ids, of the logits' shape less their last axis, or
    probabilities over the whole vocabulary (a float target of the logits'
    shape with ``V`` on the last axis: each rank reads its columns; one
    already cut to this rank's part raises ValueError naming both shapes),
    the same on every tp rank of ``group`` (a meshrun communicator, or a
    torch.distributed group on the "meshrun" backend). ``weight``: torch's
    class weights, ``(V,)`` for the whole vocabulary (each rank reads its
    part; no gradient). Every tp rank gets the same loss (reduction
    "mean", "sum" or "none"; ``ignore_index``, ``label_smoothing`` and
    ``weight`` as torch's); the gradient (torch: through autograd, one
    backward; none for the target) is this rank's part of the whole one.
    One all-gather of ``4 * rows`` numbers (and the part's width); nothing
    of size vocab crosses the group. A target outside the vocabulary
    raises IndexError, as torch's. numpy: returns ``(loss, gradient of
    logits)``, reduction "mean" or "sum", as a pipeline's numpy
    ``loss_fn``. ``name`` names the call in errors (the head's module,
    where the watch calls it)."""
    group = as_comm(group, name)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: reduction is one of {_REDUCTIONS}, not {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{name}: label_smoothing is in [0, 1], not {label_smoothing!r}")
    eps = float(label_smoothing)
    torch = _torch() if _is_tensor(logits) else None
    if torch is None:
        x, t = np.asarray(logits), np.asarray(target)
        if reduction == "none":
            raise ValueError(f"{name}: numpy logits take reduction 'mean' or 'sum' (a loss "
                             f"and its gradient), not 'none'")
        w = None if weight is None else np.asarray(weight)
        loss, state = _forward(np, x, t, w, group, ignore_index, reduction, eps, name)
        grad = _gradient(np, state, state.scale)
        return float(loss), grad.astype(x.dtype, copy=False).reshape(x.shape)
    t = torch.as_tensor(target, device=logits.device)
    if t.is_floating_point() and t.requires_grad:
        raise ValueError(f"tp rank {group.rank}: {name}: probabilities as targets that need a "
                         f"gradient (a teacher's output not detached): the vocab-parallel loss "
                         f"takes none for them; detach the target")
    w = None if weight is None else torch.as_tensor(weight, device=logits.device).detach()
    return _function().apply(logits, t, w, group, ignore_index, reduction, eps, name,
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


def _floating(lib: Any, t: Any) -> bool:
    return bool(t.is_floating_point()) if lib is not np else bool(
        np.issubdtype(t.dtype, np.floating))


def _shapes(logits_shape: tuple[int, ...], target_shape: tuple[int, ...], soft: bool,
            vocab: int, group: Any, name: str) -> None:
    """Raise unless the shapes are cross entropy's: class indices of the
    logits' shape less their last axis (``(C,)`` and ``()``, ``(N, C)`` and
    ``(N,)``, the class axis moved last before); probabilities of it with
    the whole vocabulary last."""
    logits_shape, target_shape = tuple(logits_shape), tuple(target_shape)
    said = (f"tp rank {group.rank}: {name}: a target of shape {target_shape} for logits of "
            f"shape {logits_shape} (this rank's part of the vocabulary)")
    whole = logits_shape[:-1] + (vocab,)
    if soft and target_shape != whole:
        cut = " cut to this rank's part" if target_shape == logits_shape else ""
        raise ValueError(f"{said}: probabilities as targets{cut} are not taken; they are "
                         f"over the whole vocabulary, {whole}, the same on every tp rank "
                         f"(each reads its part)")
    if not soft and target_shape != logits_shape[:-1]:
        raise ValueError(f"{said}: it has the logits' shape without their class axis (class "
                         f"indices), or with the whole vocabulary, {whole}, on it "
                         f"(probabilities, floating point)")


def _class_weights(lib: Any, weight: Any, vocab: int, lo: int, part: int, work: Any,
                   group: Any, name: str) -> Any:
    """The whole vocabulary's class weights ``(V,)``, in ``work``."""
    if tuple(weight.shape) != (vocab,):
        raise ValueError(f"tp rank {group.rank}: {name}: a class weight of shape "
                         f"{tuple(weight.shape)}: it is the whole vocabulary's, ({vocab},), "
                         f"the same on every tp rank (each reads its part, the columns "
                         f"{lo} to {lo + part})")
    return weight.astype(work) if lib is np else weight.to(work)


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


class _State:
    """What the gradient is made of (``_gradient``): the softmax of the
    shard (its buffer becomes the gradient), each row's ``A``, and the
    terms of ``a``: the target's column (indices) or the target's part
    (probabilities), the class weights' part."""
    soft: Any
    big_a: Any
    rows: Any           # indices: the rows whose target this rank holds, its column there
    cols: Any
    picked: Any         # (1 - eps) w_t of those rows
    q: Any              # probabilities: this rank's part of the target (rows, part)
    w: Any              # this rank's part of the class weights (None: none)
    eps: float
    vocab: int
    valid: Any          # the rows counted (not ignore_index)
    scale: Any          # each row's factor for reductions "mean" and "sum"


def _forward(lib: Any, x: Any, target: Any, weight: Any, group: Any, ignore_index: int,
             reduction: str, eps: float, name: str) -> tuple[Any, _State]:
    """The loss (a scalar, or per row for "none") and what its gradient
    needs (``lib``: numpy or torch; x: this rank's logits, never changed)."""
    part = x.shape[-1]
    vocab, lo = part * group.size, part * group.rank
    soft = target.ndim == x.ndim and _floating(lib, target)
    _shapes(tuple(x.shape), tuple(target.shape), soft, vocab, group, name)
    if lib is np:
        work = np.float64 if x.dtype == np.float64 else np.float32
        xs = x.reshape(-1, part).astype(work, copy=False)
    else:
        work = x.dtype if x.dtype in (lib.float32, lib.float64) else lib.float32
        xs = x.detach().reshape(-1, part).to(work)
    w = None if weight is None else _class_weights(lib, weight, vocab, lo, part, work, group,
                                                   name)
    wl = None if w is None else w[lo:lo + part]
    st = _State()
    st.eps, st.vocab, st.w, st.q = eps, vocab, wl, None
    m = lib.amax(xs, -1)
    e = xs - m[:, None]
    if lib is np:
        np.exp(e, out=e)
    else:
        e.exp_()              # (one buffer of the shard's size: the softmax)
    rows = xs.shape[0]
    if soft:
        if ignore_index != -100:
            raise ValueError(f"tp rank {group.rank}: {name}: ignore_index={ignore_index} with "
                             f"probabilities as targets (torch's raises: it is for class "
                             f"indices)")
        q = target.reshape(-1, vocab)[:, lo:lo + part]
        q = q.astype(work, copy=False) if lib is np else q.detach().to(work)
        st.q = q
        a = _soft_coefficients(st)
        stats = lib.stack([m, e.sum(-1), a.sum(-1), (a * xs).sum(-1)])
        valid = lib.ones(rows, dtype=bool) if lib is np else lib.ones(
            rows, dtype=lib.bool, device=xs.device)
    else:
        ts = target.reshape(-1).astype(np.int64) if lib is np else target.reshape(-1).long()
        valid = ts != ignore_index
        local = ts - lo
        mine = valid & (local >= 0) & (local < part)
        idx = lib.clip(local, 0, part - 1)[:, None]
        picked = (np.take_along_axis(xs, idx, 1) if lib is np else xs.gather(1, idx))[:, 0]
        smooth = ((xs * wl).sum(-1) if wl is not None else xs.sum(-1)) if eps else 0 * m
        stats = lib.stack([m, e.sum(-1), lib.where(mine, picked, 0.0), smooth])
    every = _exchanged(group, stats.astype(work) if lib is np else stats, part, name, lib)
    top, total, s2, s3 = _combined(every, lib)
    lse = top + lib.log(total)
    if soft:
        st.big_a = s2
        per_row = s2 * lse - s3
        denominator: Any = rows
    else:
        _out_of_range(ts, valid, vocab, group, name)
        rows_mine = np.nonzero(mine)[0] if lib is np else mine.nonzero().squeeze(1)
        st.rows, st.cols = rows_mine, local[rows_mine]
        if w is None:
            st.big_a, st.picked = 1.0, 1 - eps
            per_row = lib.where(valid, lse - (1 - eps) * s2 - eps / vocab * s3, 0.0)
            denominator = valid.sum()
        else:
            wt = lib.where(valid, w[lib.clip(ts, 0, vocab - 1)], 0.0)
            big_w = w.sum()
            st.big_a = (1 - eps) * wt + eps / vocab * big_w
            per_row = lib.where(valid, (1 - eps) * wt * (lse - s2) + eps / vocab * (
                big_w * lse - s3), 0.0)
            st.picked = (1 - eps) * wt[rows_mine]
            denominator = wt.sum()
    e *= (lib.exp(m - top) / total)[:, None]           # the softmax, in place
    st.soft, st.valid = e, valid
    if reduction == "none":
        return per_row.reshape(target.shape[:-1] if soft else target.shape), st
    one = valid.astype(work) if lib is np else valid.to(work)
    loss = per_row.sum()
    if reduction == "sum":
        st.scale = one
    elif lib is not np:
        loss, st.scale = loss / denominator, one / denominator
    elif denominator:
        loss, st.scale = loss / denominator, one / denominator
    else:                   # (no row counted: torch's nan, and no gradient)
        loss, st.scale = np.float64("nan"), one
    return loss, st


def _soft_coefficients(st: _State) -> Any:
    """``a`` of probabilities as targets: ``w * ((1 - eps) p + eps / V)``."""
    a = st.q * (1 - st.eps) + st.eps / st.vocab if st.eps else st.q
    return a if st.w is None else a * st.w


def _gradient(lib: Any, st: _State, scale: Any) -> Any:
    """The gradient of this rank's logits, ``(A * softmax - a) * scale``
    per row, made in the softmax's buffer."""
    grad = st.soft
    if not isinstance(st.big_a, float):
        grad *= st.big_a[:, None]
    elif st.big_a != 1.0:
        grad *= st.big_a
    if st.q is not None:
        grad -= _soft_coefficients(st)
    else:
        grad[st.rows, st.cols] -= st.picked
        if st.eps:
            grad -= st.eps / st.vocab * (1.0 if st.w is None else st.w)
    grad *= scale[:, None]
    return grad


def _combined(every: Any, lib: Any) -> tuple[Any, Any, Any, Any]:
    """From every rank's (max, sum of exp less that max, and two sums): the
    whole rows' max, sum of exp less it, and the two sums summed
    (``lib``: numpy or torch)."""
    m, s, tl, sx = every[:, 0], every[:, 1], every[:, 2], every[:, 3]
    top = lib.amax(m, 0)
    total = (s * lib.exp(m - top)).sum(0)
    return top, total, tl.sum(0), sx.sum(0)


@functools.cache
def _function() -> Any:
    torch = _torch()

    class VocabParallelCrossEntropy(torch.autograd.Function):  # type: ignore[misc,name-defined]
        """Cross entropy of vocab-sharded logits (``vocab_parallel_cross_entropy``):
        the forward's one all-gather of per-row statistics; the backward on
        the shard alone, from the softmax kept."""

        @staticmethod
        def forward(ctx: Any, logits: Any, target: Any, weight: Any, group: Any,
                    ignore_index: int, reduction: str, eps: float, name: str,
                    loss_dtype: Any) -> Any:
            loss, st = _forward(torch, logits, target, weight, group, ignore_index, reduction,
                                eps, name)
            # (kept on ctx, not saved: the backward makes the gradient in place in it)
            ctx.st, ctx.shape, ctx.dtype, ctx.reduction = st, logits.shape, logits.dtype, reduction
            ctx.used, ctx.name, ctx.rank = False, name, group.rank
            return loss.to(loss_dtype)

        @staticmethod
        def backward(ctx: Any, g: Any) -> Any:
            st = ctx.st
            if ctx.used:
                raise RuntimeError(f"tp rank {ctx.rank}: {ctx.name}: a second backward "
                                   f"through the vocab-parallel cross entropy (retain_graph="
                                   f"True): its first made the gradient in place in the "
                                   f"softmax it kept")
            ctx.used = True
            if ctx.reduction == "none":
                scale = g.reshape(-1).to(st.soft.dtype) * st.valid
            else:
                scale = g.to(st.soft.dtype) * st.scale
            grad = _gradient(torch, st, scale)
            return (grad.to(ctx.dtype).reshape(ctx.shape), None, None, None, None, None, None,
                    None, None)

    return VocabParallelCrossEntropy
