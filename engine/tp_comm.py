"""The collectives at a sharded module's edges (engine.tensor_parallel), in
one autograd Function: ``f`` (identity forward, all-reduce backward) at a
colwise input, ``g`` (the reverse) at a rowwise output, all-gather and
reduce-scatter (each the other's backward) at the edges of a sequence
region; and the all-gather that makes a shard whole again.
"""
from __future__ import annotations

import functools
from typing import Any

import collectives

from .tp_plan import Edge, PlanError, logged
from .torch_stage import _torch


def _edge(group: Any, x: Any, spec: Edge, seq_dim: int, name: str) -> Any:
    """``x`` through the Comm function at an edge of submodule ``name``:
    (forward, backward, axis; None: the sequence axis)."""
    fwd, bwd, axis = spec
    args = (x, group, fwd, bwd, seq_dim if axis is None else axis, name)
    torch = _torch()
    if not torch.compiler.is_compiling():
        return _apply(*args)
    if not _EAGER:
        _EAGER.append(torch.compiler.disable(_apply))
    return _EAGER[0](*args)


_EAGER: list[Any] = []
"""_apply, as torch.compile runs it: eagerly, a graph break at each edge.
Traced, dynamo followed the collective into the transport (a rowwise
layer's all-reduce) and failed where it set up its group's board ("Guard
failed on the same frame it was created"), and compiled the function
again for each submodule's name (past its recompile limit, a warning)."""


def _apply(*args: Any) -> Any:
    """The Comm function applied: (x, group, fwd, bwd, dim, name)."""
    return _function().apply(*args)


@functools.cache
def _function() -> Any:
    torch = _torch()

    class Comm(torch.autograd.Function):  # type: ignore[name-defined,misc]
        """``fwd`` forward, ``bwd`` backward (id, ar: all-reduce, ag:
        all-gather along dim, rs: reduce-scatter along dim, split: this
        rank's part along dim)."""

        @staticmethod
        def forward(ctx: Any, x: Any, group: Any, fwd: str, bwd: str, dim: int,
                    name: str) -> Any:
            ctx.group, ctx.bwd, ctx.dim, ctx.name = group, bwd, dim, name
            return _comm(group, x, fwd, f"{name} forward", dim)

        @staticmethod
        def backward(ctx: Any, gy: Any) -> Any:
            gx = _comm(ctx.group, gy, ctx.bwd, f"{ctx.name} backward", ctx.dim)
            return gx, None, None, None, None, None

    return Comm


@logged
def _comm(group: Any, x: Any, op: str, where: str, dim: int) -> Any:
    """One collective of the Comm function on a tensor; a fresh tensor."""
    torch = _torch()
    if op == "id":
        return x.view_as(x) if where.endswith("forward") else x
    n = group.size
    if op == "ar":
        out = x.detach().contiguous().clone()
        collectives.all_reduce(group, out)
        return out
    if op == "ag":
        return _gather(torch, group, x.detach(), dim)
    if x.shape[dim] % n:
        raise PlanError(f"tp rank {group.rank}: {where}: axis {dim} of a {tuple(x.shape)} "
                        f"activation is {x.shape[dim]}, not divisible by the tp size {n} "
                        f"(group {group.name})")
    if op == "split":
        return x.detach().chunk(n, dim)[group.rank].contiguous()
    moved = x.detach().movedim(dim, 0).contiguous()
    return collectives.reduce_scatter(group, moved).movedim(0, dim).contiguous()


def _gather(torch: Any, group: Any, x: Any, dim: int, timeout: float | None = None) -> Any:
    parts = collectives.all_gather(group, x.contiguous(), timeout=timeout)
    return torch.cat(list(parts.unbind(0)), dim=dim)
