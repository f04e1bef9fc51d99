"""Ulysses sequence parallelism (DeepSpeed-Ulysses) on meshrun's
collectives: attention run parallel over the sequence axis of q, k and v.

Each rank of the sequence-parallel group holds its part of the sequence,
``[B, S/P, H, D]``. An all_to_all trades it for every token of ``H/P`` of
the heads, ``[B, S, H/P, D]``; any local attention runs on those (torch's
``scaled_dot_product_attention``, causal or not: every rank sees the whole
sequence of its heads); the reverse all_to_all gives each rank its tokens
of every head back::

    rank 0: q[:, 0:S/P, :, :]   --all_to_all-->   q[:, :, 0:H/P, :]   -> attention
    rank 1: q[:, S/P:S, :, :]   (heads scattered,  q[:, :, H/P:H, :]   -> attention
                                 sequence gathered)            <-- the reverse back

``DistributedAttention(local_attention, group)`` wraps an attention
function of ``(q, k, v, ...)`` (DeepSpeed's ``deepspeed.sequence.layer``
class); ``ulysses_attention(model, group, names)`` runs the
``F.scaled_dot_product_attention`` calls inside a model's named attention
modules that way, without changing their code. Each all_to_all is an
autograd Function whose backward is the reverse all_to_all. A wrapped
module's deepcopy runs its own weights, the group shared.
"""
from __future__ import annotations

import fnmatch
import threading
import types
from typing import Any, Callable

import torch

import collectives
from mesh import Comm, MeshError, MismatchError

from .step import _in_action
from .tp_plan import PlanError

__all__ = ["DistributedAttention", "ulysses_attention", "seq_all_to_all", "sp_comm"]

Exchange = Callable[[torch.Tensor], torch.Tensor]


def sp_comm(group: Any, call: str) -> Comm:
    """The meshrun communicator of a sequence-parallel group: a meshrun
    communicator itself, or a torch.distributed group on the "meshrun"
    backend (None: torch.distributed's default group); else a TypeError
    naming the rank and ``call``."""
    if isinstance(group, Comm):
        return group
    import sys
    from mesh.world import rank_said
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_initialized() and (
            group is None or isinstance(group, dist.ProcessGroup)
            or hasattr(group, "mesh_dim_names")):
        from collectives.torchdist import comm_of
        try:
            return comm_of(group)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{rank_said()}{call}: {e}") from None
    raise TypeError(f"{rank_said()}{call}: the sequence-parallel group must be a meshrun "
                    f"communicator (world, world.group(ranks), a mesh.grid's group('sp')) or "
                    f"a torch.distributed group on the 'meshrun' backend, not "
                    f"{type(group).__name__}")


def _exchange(group: Comm, where: str) -> Exchange:
    """meshrun's all_to_all of ``[P, ...]`` blocks (block j to rank j) over
    ``group`` (its errors named by ``_trade``: ``where`` is in the text)."""
    def run(blocks: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = collectives.all_to_all(group, blocks)
        return out
    run.group = group       # type: ignore[attr-defined]
    return run


def _trade(x: torch.Tensor, n: int, rank: int, scatter: int, gather: int,
           exchange: Exchange, where: str) -> torch.Tensor:
    """``x`` cut in ``n`` along ``scatter``, part j sent to rank j, the
    parts received laid end to end along ``gather`` in rank order."""
    if x.shape[scatter] % n:
        raise PlanError(f"rank {rank}: {where}: axis {scatter} of a {tuple(x.shape)} tensor is "
                        f"{x.shape[scatter]}, not divisible by the sequence-parallel group "
                        f"size {n} (Ulysses splits the heads over the group: a head count "
                        f"that the group size divides)")
    if n == 1:
        return x.detach().clone()
    blocks = x.detach().unflatten(scatter, (n, x.shape[scatter] // n)).movedim(scatter, 0)
    try:
        got = exchange(blocks.contiguous())
    except MeshError as e:      # (a mismatch, a peer lost, a timeout: its class and peer kept)
        group = getattr(exchange, "group", None)
        over = f" over the sequence-parallel group {group.name}" if group is not None else ""
        agree = " (every rank's part of the sequence, heads, head size and dtype must " \
            "agree)" if isinstance(e, MismatchError) else ""
        raise _in_action(e, f"{where}: the all_to_all of this rank's {tuple(x.shape)} "
                            f"{str(x.dtype).replace('torch.', '')} part{over}{agree}") from None
    return got.movedim(0, gather).flatten(gather, gather + 1)


class _SeqAllToAll(torch.autograd.Function):
    """The all_to_all forward (scatter, gather), the reverse backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, n: int, rank: int, scatter: int, gather: int,
                exchange: Exchange, where: str) -> torch.Tensor:
        ctx.args = (n, rank, gather, scatter, exchange, where)
        return _trade(x, n, rank, scatter, gather, exchange, f"{where} forward")

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        n, rank, scatter, gather, exchange, where = ctx.args
        back = _trade(g, n, rank, scatter, gather, exchange, f"{where} backward")
        return back, None, None, None, None, None, None


def seq_all_to_all(x: torch.Tensor, group: Any, scatter_idx: int, gather_idx: int,
                   where: str = "Ulysses all_to_all",
                   exchange: Exchange | None = None) -> torch.Tensor:
    """``x``'s axis ``scatter_idx`` split over ``group``, its axis
    ``gather_idx`` gathered (rank order), by one all_to_all; the gradient
    by the reverse one. ``exchange``: another all_to_all of ``[P, ...]``
    blocks (a benchmark's anchor), meshrun's by default."""
    comm = sp_comm(group, where)
    nd = x.dim()
    scatter, gather = scatter_idx % nd, gather_idx % nd
    if scatter == gather:
        raise ValueError(f"rank {comm.rank}: {where}: scatter_idx and gather_idx name the "
                         f"same axis {scatter} of a {nd}-d tensor")
    out: torch.Tensor = _SeqAllToAll.apply(x, comm.size, comm.rank, scatter, gather,
                                           exchange or _exchange(comm, where), where)
    return out


class DistributedAttention(torch.nn.Module):
    """``local_attention(q, k, v, *args, **kwargs)`` over the whole
    sequence, each rank of ``group`` given and returning its part of it:
    q, k and v ``[.., S/P, .., H, ..]``, the heads on axis ``scatter_idx``
    and the sequence on ``gather_idx`` (``[B, S/P, H, D]``: 2 and 1;
    Megatron's ``[S/P, B, H, D]``: 2 and 0, DeepSpeed's defaults). The
    local attention sees ``[B, S, H/P, D]``; its output, laid out alike, is
    traded back. Heads not divisible by the group size raise PlanError
    naming the rank, the tensor and the axis; ranks whose parts differ in
    shape raise MismatchError naming both."""

    def __init__(self, local_attention: Callable[..., Any], group: Any,
                 scatter_idx: int = 2, gather_idx: int = 1,
                 exchange: Exchange | None = None) -> None:
        super().__init__()
        self.local_attn = local_attention
        self.spg = group
        self.scatter_idx, self.gather_idx = scatter_idx, gather_idx
        self.exchange = exchange

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                *args: Any, **kwargs: Any) -> Any:
        s, g, ex = self.scatter_idx, self.gather_idx, self.exchange
        q, k, v = (seq_all_to_all(t, self.spg, s, g, f"Ulysses attention's {name}", ex)
                   for t, name in ((query, "query"), (key, "key"), (value, "value")))
        out = self.local_attn(q, k, v, *args, **kwargs)
        return seq_all_to_all(out, self.spg, g, s, "Ulysses attention's output", ex)


# ---- F.scaled_dot_product_attention inside named modules, run the Ulysses way

_ACTIVE = threading.local()
_ORIGINAL: list[Callable[..., Any]] = []


def _sdpa(query: Any, key: Any, value: Any, attn_mask: Any = None, *args: Any,
          **kwargs: Any) -> Any:
    """torch's scaled_dot_product_attention, or, inside a module given to
    ulysses_attention, the same over the whole sequence by Ulysses
    (``[B, H, S/P, D]``: the heads on axis -3, the sequence on -2)."""
    state = getattr(_ACTIVE, "stack", None)
    if not state:
        return _ORIGINAL[0](query, key, value, attn_mask, *args, **kwargs)
    group, name, seen = state[-1]
    seen[0] += 1
    n = group.size
    if attn_mask is not None:
        whole = query.shape[-2] * n
        if tuple(attn_mask.shape[-2:]) != (whole, whole) or (
                attn_mask.dim() > 2 and attn_mask.shape[-3] != 1):
            raise PlanError(f"rank {group.rank}: Ulysses attention in {name}: an attn_mask "
                            f"of shape {tuple(attn_mask.shape)}; under Ulysses it must be the "
                            f"whole sequence's ({whole}, {whole}), alike for every head "
                            f"(or use is_causal=True)")
    where = f"Ulysses attention in {name}"
    q, k, v = (seq_all_to_all(t, group, -3, -2, f"{where}, its {label}")
               for t, label in ((query, "query"), (key, "key"), (value, "value")))
    out = _ORIGINAL[0](q, k, v, attn_mask, *args, **kwargs)
    return seq_all_to_all(out, group, -2, -3, f"{where}, its output")


class _Held:
    """What ulysses_attention leaves on a wrapped module (``_ulysses``): the
    group and the module's name; a ``copy.deepcopy`` of the module (a
    timing's copy) shares it, never copying the communicator."""

    def __init__(self, group: Comm, name: str) -> None:
        self.group, self.name = group, name

    def __deepcopy__(self, memo: dict[int, Any]) -> "_Held":
        return self


def _ulysses_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """A wrapped module's forward (bound to it: a deepcopy of the module
    runs its own weights, its forward before bound to the copy too)."""
    held: _Held = self.__dict__["_ulysses"]
    group, name = held.group, held.name
    stack = _ACTIVE.__dict__.setdefault("stack", [])
    seen = [0]
    stack.append((group, name, seen))
    try:
        out = self.__dict__["_ulysses_inner"](*args, **kwargs)
    finally:
        stack.pop()
    if not seen[0]:
        raise PlanError(f"rank {group.rank}: ulysses_attention: {name}'s forward called no "
                        f"torch.nn.functional.scaled_dot_product_attention (a kernel "
                        f"imported by name, or another attention: wrap it in "
                        f"engine.DistributedAttention instead); its attention ran on this "
                        f"rank's part of the sequence alone")
    return out


def _wrap(module: torch.nn.Module, group: Comm, name: str) -> None:
    """``module``'s forward run the Ulysses way over ``group``; a module
    wrapped before takes the new group (a second distribute of the model)."""
    if "_ulysses" not in module.__dict__:
        module.__dict__["_ulysses_inner"] = module.forward
        module.__dict__["forward"] = types.MethodType(_ulysses_forward, module)
    module.__dict__["_ulysses"] = _Held(group, name)


def ulysses_attention(model: torch.nn.Module, group: Any, names: str | list[str]) -> list[str]:
    """Run every ``F.scaled_dot_product_attention`` call inside the
    submodules of ``model`` named by ``names`` (fnmatch patterns,
    ``"blocks.*.attn"``) over the whole sequence by Ulysses, each rank of
    ``group`` holding its part of the sequence; the modules' code
    unchanged. Returns the names wrapped. A pattern that matches nothing,
    a module whose forward calls no such function, or an ``attn_mask``
    not of the whole sequence raise PlanError naming the rank."""
    comm = sp_comm(group, "ulysses_attention")
    if not _ORIGINAL:
        _ORIGINAL.append(torch.nn.functional.scaled_dot_product_attention)
        torch.nn.functional.scaled_dot_product_attention = _sdpa
    patterns = [names] if isinstance(names, str) else list(names)
    mods = dict(model.named_modules())
    done: list[str] = []
    for pat in patterns:
        hits = [n for n in mods if n and fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise PlanError(f"rank {comm.rank}: ulysses_attention: {pat!r} matches no "
                            f"submodule of the {type(model).__name__}")
        for n in hits:
            if n not in done:
                _wrap(mods[n], comm, n)
                done.append(n)
    return done


class _DeepSpeedAttention(DistributedAttention):
    """``deepspeed.sequence.layer.DistributedAttention``: DeepSpeed's
    arguments and defaults (Megatron's ``[S/P, B, H, D]``: scatter_idx 2,
    gather_idx 0); ``sp_stream``, a CUDA stream DeepSpeed overlaps the
    all_to_all on, is taken and changes nothing (each all_to_all runs in
    turn)."""

    def __init__(self, local_attention: Callable[..., Any], sequence_process_group: Any,
                 scatter_idx: int = 2, gather_idx: int = 0, sp_stream: Any = None) -> None:
        super().__init__(local_attention, sequence_process_group, scatter_idx, gather_idx)
        self.sp_stream = sp_stream


def deepspeed_sequence() -> Any:
    """The ``deepspeed.sequence`` namespace of engine.deepspeed
    (``deepspeed.sequence.layer.DistributedAttention``)."""
    from types import SimpleNamespace
    layer = SimpleNamespace(DistributedAttention=_DeepSpeedAttention,
                            _SeqAllToAll=_SeqAllToAll)
    return SimpleNamespace(layer=layer)
