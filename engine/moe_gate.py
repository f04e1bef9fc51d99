"""A mixture of experts' gate (engine.moe), DeepSpeed's TopKGate: a linear
map of each token to the experts' logits, softmax, top-1 or top-2, each
expert taking at most ``capacity`` tokens (the ones over it dropped: a zero
output), and the load-balancing loss ``l_aux``. The gating is this rank's
tokens' alone, as DeepSpeed's: capacity = ceil(tokens / experts *
capacity_factor) (top-2: twice the factor), at least ``min_capacity``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["TopKGate", "top1gating", "top2gating", "capacity"]

Gating = tuple[Any, Any, Any, Any]
"""(l_aux, combine_weights (tokens, experts, capacity), dispatch_mask (its
nonzeros), exp_counts (the tokens each expert was chosen by, before drops))."""


def capacity(tokens: int, experts: int, factor: float, least: int) -> int:
    """DeepSpeed's ``_capacity``: ceil(tokens / experts * factor), at least ``least``."""
    return max(int(math.ceil(tokens / experts * factor)), int(least))


def _kept(mask: Any, cap: int, first: Any = 0) -> Any:
    """``mask`` (tokens, experts) with each expert's tokens past ``cap`` (in
    token order, after ``first`` taken already) dropped; and their slots."""
    slots = torch.cumsum(mask, dim=0) - 1 + first
    return mask * torch.lt(slots, cap), slots


def _slot(slots: Any, mask: Any, cap: int, dtype: Any) -> Any:
    """(tokens, cap): each kept token's slot one-hot (a dropped one's: slot 0,
    its gate zero)."""
    where = torch.sum(slots * mask, dim=1)
    return torch.nn.functional.one_hot(where, num_classes=max(cap, 1)).to(dtype)[:, :cap]


def _priority(mask: Any) -> Any:
    """DeepSpeed's random token selection (``use_rts``): the tokens kept
    for an expert over capacity are those of the highest uniform draws
    (this rank's torch RNG), not the first."""
    return torch.argsort(-(mask * torch.rand(mask.shape, device=mask.device)), dim=0,
                         stable=True)


def top1gating(logits: Any, capacity_factor: float, min_capacity: int,
               used_token: Any = None, drop_tokens: bool = True, use_rts: bool = True,
               agree: Callable[[int], int] | None = None) -> Gating:
    """Top-1 (Switch) gating of ``logits`` (tokens, experts). ``agree``:
    without ``drop_tokens``, the capacity (this rank's busiest expert's
    tokens) made the ep group's largest."""
    gates = F.softmax(logits, dim=1)
    s, e = gates.shape
    cap = capacity(s, e, capacity_factor, min_capacity)
    mask = F.one_hot(torch.argmax(gates, dim=1), num_classes=e)
    if used_token is not None:
        mask = mask * used_token.reshape(-1, 1).to(mask.dtype)
    exp_counts = torch.sum(mask, dim=0).detach().cpu()
    if not drop_tokens:
        cap = int(exp_counts.max()) if s else 0
        cap = agree(cap) if agree is not None else cap
    l_aux = torch.sum(torch.mean(gates, dim=0) * torch.mean(mask.to(gates.dtype), dim=0)) * e
    if use_rts and drop_tokens:
        # the kept ones: each expert's tokens of the cap highest draws
        order = _priority(mask)
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(
            s, device=mask.device).reshape(-1, 1).expand(s, e).contiguous())
        mask = mask * torch.lt(rank, cap)
        slots = torch.cumsum(mask, dim=0) - 1
    else:
        mask, slots = _kept(mask, cap)
    gates = gates * mask.to(gates.dtype)
    combine = torch.einsum("se,sc->sec", gates, _slot(slots, mask, cap, gates.dtype))
    return l_aux, combine, combine.bool(), exp_counts


def top2gating(logits: Any, capacity_factor: float, min_capacity: int,
               drop_tokens: bool = True, second_sampling: bool = True,
               agree: Callable[[int], int] | None = None) -> Gating:
    """Top-2 (GShard) gating: the second expert the best of the others
    (``second_sampling``: after Gumbel noise on the logits, DeepSpeed's
    ``top2_2nd_expert_sampling``), the two gates renormalised to sum to 1;
    the first choices take their slots before the second ones."""
    gates = F.softmax(logits, dim=1)
    s, e = gates.shape
    mask1 = F.one_hot(torch.argmax(gates, dim=1), num_classes=e)
    if second_sampling:
        u = torch.rand(logits.shape, device=logits.device, dtype=logits.dtype)
        logits = logits - torch.log(-torch.log(u.clamp_min(1e-20)).clamp_min(1e-20))
    mask2 = F.one_hot(torch.argmax(logits.masked_fill(mask1.bool(), float("-inf")), dim=1),
                      num_classes=e)
    l_aux = torch.mean(torch.mean(gates, dim=0) * torch.mean(mask1.to(gates.dtype), dim=0)) \
        * e * e
    exp_counts = torch.sum(mask1 + mask2, dim=0).detach().cpu()
    if drop_tokens:
        cap = capacity(s, e, capacity_factor * 2, min_capacity)
    else:
        cap = int(exp_counts.max()) if s else 0
        cap = agree(cap) if agree is not None else cap
    # (the second choices' slots after every first choice, the dropped ones too)
    first = torch.sum(mask1, dim=0, keepdim=True)
    mask1, slots1 = _kept(mask1, cap)
    mask2, slots2 = _kept(mask2, cap, first)
    g1 = torch.einsum("se,se->s", gates, mask1.to(gates.dtype))
    g2 = torch.einsum("se,se->s", gates, mask2.to(gates.dtype))
    denom = torch.clamp(g1 + g2, min=torch.finfo(gates.dtype).eps)
    combine: Any = 0
    for g, mask, slots in ((g1 / denom, mask1, slots1), (g2 / denom, mask2, slots2)):
        combine = combine + torch.einsum("se,sc->sec", g.reshape(-1, 1) * mask.to(gates.dtype),
                                         _slot(slots, mask, cap, gates.dtype))
    return l_aux, combine, combine.bool(), exp_counts


class TopKGate(torch.nn.Module):
    """DeepSpeed's TopKGate: ``wg``, a bias-free Linear of ``model_dim`` to
    ``num_experts`` in float32 (float64 where the model is made so);
    ``gate(x, used_token, agree)`` -> (l_aux, combine_weights,
    dispatch_mask, exp_counts)."""

    def __init__(self, model_dim: int, num_experts: int, k: int = 1,
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0,
                 min_capacity: int = 8, noisy_gate_policy: str | None = None,
                 drop_tokens: bool = True, use_rts: bool = True,
                 top2_2nd_expert_sampling: bool = True) -> None:
        super().__init__()
        if k not in (1, 2):
            raise ValueError(f"MoE gate: k={k!r}: only top-1 and top-2 gating are supported")
        if noisy_gate_policy not in (None, "None"):
            raise ValueError(f"MoE gate: noisy_gate_policy={noisy_gate_policy!r} (a noisy "
                             f"gate): not supported on meshrun (pass None)")
        self.wg = torch.nn.Linear(model_dim, num_experts, bias=False).float()
        self.k, self.min_capacity = k, min_capacity
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.drop_tokens, self.use_rts = drop_tokens, use_rts
        self.top2_2nd_expert_sampling = top2_2nd_expert_sampling

    def forward(self, x: Any, used_token: Any = None,
                agree: Callable[[int], int] | None = None) -> Gating:
        w = self.wg.weight
        logits = F.linear(x.to(w.dtype), w)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.k == 1:
            return top1gating(logits, factor, self.min_capacity, used_token,
                              self.drop_tokens, self.use_rts, agree)
        return top2gating(logits, factor, self.min_capacity, self.drop_tokens,
                          self.top2_2nd_expert_sampling, agree)
