"""The collectives at a sharded module's edges (engine.tensor_parallel), in
one autograd Function: ``f`` (identity forward, all-reduce backward) at a
colwise input, ``g`` (the reverse) at a rowwise output, all-gather and
reduce-scatter (each the other's backward) at the edges of a sequence
region; and the all-gather that makes a shard whole again. Under
torch.compile the same collectives are torch's functional ones, traced
into the graph, over a meshrun ProcessGroup of the tp group registered
with torch's c10d.
"""
from __future__ import annotations

import functools
import weakref
from typing import Any

import collectives

from .tp_plan import Edge, PlanError, logged
from .torch_stage import _torch


def _edge(group: Any, x: Any, spec: Edge, seq_dim: int, name: str) -> Any:
    """``x`` through the Comm function at an edge of submodule ``name``:
    (forward, backward, axis; None: the sequence axis). Under torch.compile,
    the same collectives as torch's functional ones, in the graph
    (_functional_edge)."""
    fwd, bwd, axis = spec
    args = (x, group, fwd, bwd, seq_dim if axis is None else axis, name)
    torch = _torch()
    if not torch.compiler.is_compiling():
        return _apply(*args)
    key = _functional_key(group)
    if key is None:
        if not _EAGER:
            _EAGER.append(torch.compiler.disable(_apply))
        return _EAGER[0](*args)
    return _functional_edge(torch, x, key, spec, args[4], name, group.rank, group.size)


_EAGER: list[Any] = []
"""_apply, as torch.compile runs it where torch's functional collectives
cannot take the group (_register): eagerly, a graph break at each edge."""


def _functional_key(group: Any) -> str | None:
    """_register(group), as dynamo calls it while it traces an edge: not
    traced (it makes a ProcessGroup), its result a constant of the trace
    (torch.compiler.assume_constant_result's mark, set here without the
    second it takes to import dynamo where nothing is compiled)."""
    return _register(group)


setattr(_functional_key, "_dynamo_marked_constant", True)


_KEYS: "weakref.WeakKeyDictionary[Any, str | None]" = weakref.WeakKeyDictionary()


def _register(group: Any) -> str | None:
    """The name under which torch's functional collectives find ``group``
    (a meshrun ProcessGroup over it, registered with torch's c10d on first
    use); None where torch has no functional collectives."""
    if group in _KEYS:
        return _KEYS[group]
    if not hasattr(group, "collective_channel"):      # (not a meshrun communicator)
        return None
    try:
        from torch import distributed
        from collectives.torchdist import keep_registered
        from collectives.torchpg import ProcessGroupMeshrun
        c10d: Any = distributed.distributed_c10d
        unregister = c10d._unregister_process_group
        _torch().ops._c10d_functional.all_reduce      # (torch >= 2.3)
    except (ImportError, AttributeError, RuntimeError):
        _KEYS[group] = None
        return None
    key = f"meshrun-tp:{group.name}:{id(group):x}"
    pg = ProcessGroupMeshrun(group, float(group.timeout))
    pg._set_group_name(key)
    # (torch's registry holds it weakly: the group holds it; registered again after
    # destroy_process_group, which drops every name: a compiled model's next call failed)
    keep_registered(key, pg)
    group._tp_process_group = pg
    weakref.finalize(group, unregister, key).atexit = False
    _KEYS[group] = key
    return key


def _functional_edge(torch: Any, x: Any, key: str, spec: Edge, dim: int, name: str,
                     rank: int, n: int) -> Any:
    """The Comm function's forward and backward at an edge, as torch.compile
    traces them: torch's functional collectives, without an autograd
    Function (dynamo makes one its autograd_function_apply, which the eager
    backend runs through fx's Interpreter at each call: compiled steps 1.4x
    slower than with the edges as graph breaks). A backward collective is a
    hook on the gradient of a view of the input, a forward one is taken on
    the detached input, and the gradient passes through ``v - v.detach()``
    (zeros where ``v`` is finite) of the input or its part."""
    fwd, bwd, _ = spec
    grad = x.requires_grad
    if fwd == "id":                             # f: an all-reduce backward
        y = x.view_as(x)
        if grad:
            y.register_hook(lambda g: _functional(torch, g, key, "ar", 0, n))
        return y
    if fwd in ("split", "rs"):                  # this rank's part; an all-gather backward
        if x.shape[dim] % n:
            raise PlanError(f"tp rank {rank}: {name} forward: axis {dim} of a "
                            f"{tuple(x.shape)} activation is {x.shape[dim]}, not divisible by "
                            f"the tp size {n}")
        size = x.shape[dim] // n
        whole = x.view_as(x)
        if grad:                # (its gradient: this rank's part, zeros elsewhere)
            whole.register_hook(lambda g: _functional(
                torch, g.narrow(dim, rank * size, size), key, "ag", dim, n))
        mine = whole.narrow(dim, rank * size, size)
        if fwd == "split":
            return mine.contiguous()
        part = _functional(torch, x.detach(), key, "rs", dim, n)
        return part + (mine - mine.detach()) if grad else part
    out = _functional(torch, x.detach(), key, fwd, dim, n)     # ar, ag
    if not grad:
        return out
    if fwd == "ar":                             # g: the gradient as it is
        return out + (x - x.detach())
    laid = torch.cat([x if i == rank else torch.zeros_like(x) for i in range(n)], dim)
    if bwd == "rs":             # (its gradient's part here, summed over the ranks)
        laid.register_hook(lambda g: torch.cat(
            [_functional(torch, g, key, "rs", dim, n)] * n, dim))
    return out + (laid - laid.detach())         # (split backward: this rank's part)


def _functional(torch: Any, x: Any, key: str, op: str, dim: int, n: int) -> Any:
    """_comm's collective ``op`` (ar, ag, rs) on ``x`` along ``dim``,
    through torch's functional collectives."""
    ops = torch.ops._c10d_functional
    if op == "ar":
        return ops.wait_tensor(ops.all_reduce(x.contiguous(), "sum", key))
    if op == "ag":
        whole = ops.wait_tensor(ops.all_gather_into_tensor(x.contiguous(), n, key))
        return whole if dim % x.dim() == 0 else torch.cat(whole.chunk(n), dim=dim)
    moved = x.movedim(dim, 0).contiguous()
    part = ops.wait_tensor(ops.reduce_scatter_tensor(moved, "sum", n, key))
    return part.movedim(0, dim).contiguous()


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
