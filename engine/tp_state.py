"""A sharded module's state whole again (engine.tensor_parallel): gathered
over its tp group, or a whole state loaded, each rank cutting its own
shard; a parameter's cut, for an optimizer's tensors beside it.
"""
from __future__ import annotations

from typing import Any, Mapping

from . import tp_layers
from .torch_stage import _torch
from .tp_comm import _gather
from .tp_checks import _is_torch
from .tp_shard import _cut


def gather_state_dict(module: Any, root: int | None = None, grads: bool = False, *,
                      timeout: float | None = None) -> dict[str, Any] | None:
    """The full, unsharded ``state_dict`` of a module ``parallelize`` sharded
    (collective over each tp group): on every rank with ``root=None``, else
    on tp rank ``root`` only (None elsewhere). Keys are the original ones, so
    it loads into an unsharded copy of the model. ``grads=True``: the
    parameters' gradients instead, whole (zeros where a grad is None).
    ``timeout``: how long each gather waits for the group's other ranks
    (the group's default, MESH_TIMEOUT, if None).

    For an engine.layers model the keys are the positions in the unsharded
    model's ``params()`` (``"0"``, ``"1"``...; engine.tp_layers.full_params)."""
    if not _is_torch(module):
        whole = tp_layers.full_params(module, grads, timeout)
        group = tp_layers.group_of(module)
        if root is not None and group is not None and group.rank != root:
            return None
        return {str(i): p for i, p in enumerate(whole)}
    torch = _torch()
    if grads:
        state = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
                 for k, p in module.named_parameters()}
    else:
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    group = None
    gathered: dict[tuple[int, str], Any] = {}      # each shard gathered once
    # a module held under several names (a layer a traced stage calls twice) is in the
    # state under each: each gathered (until the forty-first session only its first
    # name was, and the state saved a shard under the others, the model's own name too)
    for name, sub in module.named_modules(remove_duplicate=False):
        meta = getattr(sub, "_tp", None)
        if meta is None:
            continue
        group = meta.group
        for pname, dim in meta.dims.items():
            key = f"{name}.{pname}" if name else pname
            if key not in state:
                continue
            if (id(sub), pname) not in gathered:
                full = _gather(torch, meta.group, state[key], dim, timeout)
                if meta.order is not None:
                    full = full.index_select(dim, torch.tensor(meta.order))
                gathered[id(sub), pname] = full
            state[key] = gathered[id(sub), pname]
    if root is not None and group is not None and group.rank != root:
        return None
    return state


def load_full_state_dict(module: Any, state: Mapping[str, Any], strict: bool = True) -> Any:
    """Load a whole, unsharded state (keyed as ``gather_state_dict`` gives
    it) into a torch module ``parallelize`` sharded: each rank takes its
    own shard of each sharded tensor, cut as parallelize cut it (no message
    sent). ``strict`` and the return value: torch's ``load_state_dict``'s."""
    torch = _torch()
    mine = dict(state)
    for name, sub in module.named_modules(remove_duplicate=False):     # every name's key
        meta = getattr(sub, "_tp", None)
        if meta is None:
            continue
        for pname, dim in meta.dims.items():
            key = f"{name}.{pname}" if name else pname
            if key in mine:
                mine[key] = _cut(torch, mine[key], dim, meta.style, meta.group)
    return module.load_state_dict(mine, strict=strict)


def param_shards(module: Any) -> dict[int, tuple[Any, int]]:
    """Each parameter of a torch module ``parallelize`` sharded, by ``id``,
    with its submodule's cut (what ``gather_like`` and ``cut_like`` take):
    a tensor of the shard's shape beside it (an optimizer's ``exp_avg``) is
    gathered and cut as the parameter is."""
    out: dict[int, tuple[Any, int]] = {}
    for sub in module.modules():
        meta = getattr(sub, "_tp", None)
        if meta is None:
            continue
        for pname, dim in meta.dims.items():
            p = getattr(sub, pname, None)
            if p is not None:
                out.setdefault(id(p), (meta, dim))
    return out


def gather_like(cut: tuple[Any, int], shard: Any) -> Any:
    """``shard``, of a parameter's shard's shape, whole as ``gather_state_dict``
    gathers that parameter (``cut``: ``param_shards``'); collective over its
    tp group."""
    torch = _torch()
    meta, dim = cut
    full = _gather(torch, meta.group, shard.detach(), dim)
    if meta.order is not None:
        full = full.index_select(dim, torch.tensor(meta.order))
    return full


def cut_like(cut: tuple[Any, int], full: Any) -> Any:
    """This rank's shard of ``full``, of a parameter's whole shape, as
    ``load_full_state_dict`` cuts that parameter (no message)."""
    meta, dim = cut
    return _cut(_torch(), full, dim, meta.style, meta.group)
