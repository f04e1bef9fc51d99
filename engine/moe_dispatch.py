"""A mixture of experts' exchanges (engine.moe): each rank's tokens sent to
their experts' ranks over the expert-parallel group, the experts run there
and their outputs sent back, in autograd Functions whose backward is the
transposed exchange. Two ways, alike in every output, gradient and l_aux
bit for bit::

    capacity (DeepSpeed's)            tokens
    (experts, capacity, hidden)       each expert's kept rows only, by
    by one all_to_all each way,       all_to_all_v, after one small all_to_all
    padding included                  of the counts (and capacity, hidden size)

The receiver of the tokens lays them at their slots in zeros shaped as the
padded way's, so the experts, and the combine on the sender, compute on the
same tensors as there: only what moves differs.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

import collectives
from mesh.errors import MeshError, MismatchError

from .step import _in_action

__all__ = ["meshrun_exchange", "meshrun_exchange_v", "by_capacity", "by_tokens", "DISPATCHES"]

DISPATCHES = ("capacity", "tokens")


def meshrun_exchange(group: Any, x: Any) -> Any:
    """The all_to_all of ``x``'s first axis (``group.size`` equal blocks)
    over ``group``: meshrun's."""
    return collectives.all_to_all(group, x)


def meshrun_exchange_v(group: Any, x: Any, sends: list[int], recvs: list[int]) -> Any:
    """The all_to_all_v of ``x``'s rows (``sends[j]`` to rank j, ``recvs[j]``
    from it) over ``group``: meshrun's."""
    return collectives.all_to_all_v(group, x, sends, recvs)


class _AllToAll(torch.autograd.Function):
    """An exchange as an autograd Function: the backward is the reverse
    all_to_all (of the gradient, the same exchange)."""

    @staticmethod
    def forward(ctx: Any, exchange: Any, group: Any, what: str, t: Any) -> Any:
        ctx.exchange, ctx.group, ctx.what = exchange, group, what
        return _exchanged(exchange, group, t.contiguous(), what)

    @staticmethod
    def backward(ctx: Any, g: Any) -> Any:
        return None, None, None, _exchanged(ctx.exchange, ctx.group, g.contiguous(),
                                            ctx.what + " (backward)")


class _AllToAllV(torch.autograd.Function):
    """An uneven exchange as an autograd Function: the backward sends the
    gradient's rows back the way they came (the counts swapped)."""

    @staticmethod
    def forward(ctx: Any, exchange_v: Any, group: Any, what: str, sends: list[int],
                recvs: list[int], t: Any) -> Any:
        ctx.exchange_v, ctx.group, ctx.what, ctx.counts = exchange_v, group, what, (sends, recvs)
        return _exchanged(lambda g, x: exchange_v(g, x, sends, recvs), group, t.contiguous(),
                          what)

    @staticmethod
    def backward(ctx: Any, g: Any) -> Any:
        sends, recvs = ctx.counts
        return None, None, None, None, None, _exchanged(
            lambda grp, x: ctx.exchange_v(grp, x, recvs, sends), ctx.group, g.contiguous(),
            ctx.what + " (backward)")


def _exchanged(exchange: Callable[[Any, Any], Any], group: Any, x: Any, what: str) -> Any:
    """``exchange(group, x)``; an error (another rank's hidden size,
    capacity or dtype: collectives' MismatchError) names the layer and the
    step; a lost peer or a timeout keeps its class and peer, named with both."""
    try:
        return exchange(group, x)
    except MismatchError as e:
        raise MismatchError(
            f"{what}: all_to_all of a {tuple(x.shape)} {x.dtype} block over the "
            f"expert-parallel group {group.name} (every rank's tokens, hidden size, experts "
            f"and capacity must agree): {e}") from e
    except MeshError as e:      # (a peer lost, a timeout: its class and peer kept)
        raise _in_action(e, f"{what.partition(': ')[2]}: its all_to_all over the "
                            f"expert-parallel group {group.name}") from None


def _run(experts: Any, laid: Any) -> Any:
    """The local experts on ``laid`` (ranks, local experts, capacity, hidden)."""
    outs = [e(c) for e, c in zip(experts, laid.chunk(len(experts), dim=1))]
    return torch.cat(outs, dim=1)


def by_capacity(experts: Any, group: Any, flat: Any, combine: Any, dispatch: Any, me: str,
                exchange: Callable[[Any, Any], Any]) -> Any:
    """DeepSpeed's dispatch: (experts, capacity, hidden) to every rank,
    padding included; -> the tokens' outputs (tokens, out)."""
    e, local = dispatch.shape[1], len(experts)
    sent = torch.einsum("sec,sm->ecm", dispatch.to(flat.dtype), flat)
    got = _AllToAll.apply(exchange, group, f"{me} dispatch", sent)
    cap = got.shape[1]
    done = _run(experts, got.reshape(e // local, local, cap, flat.shape[1]))
    back = _AllToAll.apply(exchange, group, f"{me} combine", done.reshape(e, cap, -1))
    return torch.einsum("sec,ecm->sm", combine.to(flat.dtype), back)


def by_tokens(experts: Any, group: Any, flat: Any, combine: Any, dispatch: Any, me: str,
              exchange: Callable[[Any, Any], Any], exchange_v: Callable[..., Any]) -> Any:
    """Each expert's kept tokens alone, by ``exchange_v``, after the counts by
    ``exchange`` (with each rank's capacity and hidden size: a rank whose
    differ fails every rank's dispatch, naming it); -> the tokens' outputs."""
    s, e, cap = dispatch.shape
    local, h = len(experts), flat.shape[1]
    ep = e // local
    token, slot = dispatch.reshape(s, e * cap).nonzero().unbind(1)
    order = torch.argsort(slot)                 # (each kept slot's token, slot by slot)
    token, slot = token[order], slot[order]
    held = torch.zeros(e * cap, dtype=torch.bool).index_fill_(0, slot, True).reshape(e, cap)
    kept = held.sum(dim=1)
    if len(slot) != int(kept.sum()) or \
            not torch.equal(held, torch.arange(cap) < kept.reshape(-1, 1)):
        raise RuntimeError(f"{me} dispatch: the gate's slots are not each expert's first "
                           f"ones, one token each (engine.moe_gate): cannot send tokens alone")
    mine = kept.reshape(ep, local)
    head = torch.cat([mine, torch.tensor([[cap, h]]).expand(ep, 2)], dim=1).contiguous()
    theirs = _exchanged(exchange, group, head, f"{me} dispatch (counts)")
    for j in range(ep):
        if theirs[j, local:].tolist() != [cap, h]:
            c, w = theirs[j, local:].tolist()
            raise MismatchError(
                f"{me} dispatch: all_to_all of the token counts over the expert-parallel "
                f"group {group.name}: rank {group.ranks[j]}'s capacity is {c} and hidden size "
                f"{w}, this rank's {cap} and {h} (every rank's tokens, hidden size, experts "
                f"and capacity must agree)")
    counts = theirs[:, :local]                  # (ep, local): rank j's tokens for expert i
    sends, recvs = mine.sum(dim=1).tolist(), counts.sum(dim=1).tolist()
    got = _AllToAllV.apply(exchange_v, group, f"{me} dispatch", sends, recvs,
                           flat.index_select(0, token))
    slots = torch.arange(cap) < counts.unsqueeze(-1)        # (ep, local, cap)
    laid = flat.new_zeros(ep, local, cap, h).index_put((slots,), got)
    done = _run(experts, laid)
    rows = _AllToAllV.apply(exchange_v, group, f"{me} combine", recvs, sends, done[slots])
    back = rows.new_zeros(e, cap, rows.shape[1]).index_put((held,), rows)
    return torch.einsum("sec,ecm->sm", combine.to(flat.dtype), back)
