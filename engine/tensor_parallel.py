"""Tensor parallelism by plan: ``engine.parallelize(module, group, plan)``.

Shards a torch module in place over the tp communicator ``group`` without
touching its code: each planned submodule keeps its class and parameter
names, its parameters become this rank's shard, and its ``forward`` is
wrapped with the collectives its style needs (styles and layouts: see
engine.tp_plan). The collectives run inside one autograd Function, as in
Megatron: ``f`` is the identity forward and an all-reduce backward at a
colwise input, ``g`` the reverse at a rowwise output; all-gather and
reduce-scatter (each the other's backward) at the edges of a sequence
region::

    replicated x --f--> colwise (W rows split) -> local act -> rowwise (W cols) --g--> y
    seq-split x --all-gather--> colwise ... rowwise --reduce-scatter--> seq-split y

Parameters that stay whole but see a part of the sequence (a "sequence"
style module: norms) get their gradients summed over the group by a hook,
as each backward makes them; a Pipeline defers those sums to one bucketed
all-reduce after the step's backward passes (engine.tp_sums).
The same call takes an ``engine.layers`` model (engine.tp_layers). torch is
imported only when a torch module is parallelized.

This module is the calls themselves (``parallelize``, ``describe_plan``);
their parts live beside it, one concept a module: engine.tp_checks (the plan
checked against the module), engine.tp_shard (a submodule cut to its shard),
engine.tp_record (what that leaves on it, ``sub._tp``), engine.tp_forward
(its wrapped forward), engine.tp_comm (the collectives at its edges),
engine.tp_rng (a tp rank's own random stream), engine.tp_watch and
engine.tp_axes (a colwise output's cuts and mixes watched) and
engine.tp_state (the state whole again). The names other modules read are
importable from here.
"""
from __future__ import annotations

from typing import Any, Mapping

import collectives

from . import layers, tp_layers
from .tp_plan import (PlanError, Style, abandoned, agree, as_comm, digest, match, planned,
                      shard_said, style_said)
from .torch_stage import TorchStage, _torch
from .tp_rng import _Stream
from .tp_checks import (HEAD_COUNTS, HEAD_SIZES, _TYPES, _check_heads, _check_rewrites,
                        _check_ties, _dims, _is_torch, _shard_ids, _validate, is_conv1d)
from .tp_record import _Meta, own_records
from .tp_watch import _NAMES, rewatched, watch_of
from .tp_forward import _forward
from .tp_shard import _shard
from .tp_state import (cut_like, gather_like, gather_state_dict, load_full_state_dict,
                       param_shards)

__all__ = ["parallelize", "describe_plan", "gather_state_dict", "load_full_state_dict",
           "PlanError", "Style"]

_READ_HERE = (own_records, watch_of, rewatched, param_shards, gather_like, cut_like, is_conv1d,
              HEAD_COUNTS, HEAD_SIZES, _Meta, _Stream, _forward)
"""Names other modules and the docs read as engine.tensor_parallel's, where they were
before they moved (what engine.partition, engine.step and engine.job import; a
sharded module's record, stream and forward, for anything that names them here):
kept importable from here."""


def parallelize(module: Any, group: Any, plan: Mapping[str, Any], *, init: str = "check",
                strict: bool = True) -> Any:
    """Shard ``module`` (a torch module, a TorchStage or an engine.layers
    model) in place by ``plan`` over the tp communicator ``group`` (or a
    torch.distributed group or one-dimensional DeviceMesh on the "meshrun"
    backend: collectives.torchdist.comm_of); return it.

    ``init="check"``: every rank must have built the same full module (a hash
    of every parameter and buffer is all-gathered; a difference raises on
    every rank, naming the tensor and the ranks); ``init="broadcast"``: group
    rank 0's values are taken; a module on the meta device (no values) is
    neither checked nor broadcast: its shards are cut as shapes, to be made
    real and filled later (engine.distribute). ``strict``: a pattern that
    matches nothing raises (pass False when applying one model's plan to
    each of its pipeline stages). Every error is raised on every rank
    before any step."""
    if init not in ("check", "broadcast"):
        raise ValueError(f"init is 'check' or 'broadcast', not {init!r}")
    group = as_comm(group, "parallelize")
    if isinstance(module, TorchStage):        # shard its module, then see the shards
        parallelize(module.module, group, plan, init=init, strict=strict)
        module._params = [p for p in module.module.parameters() if p.requires_grad]
        for p in module._params:
            module._grad(p)
        return module
    torch = _torch() if _is_torch(module) else None
    if torch is None:
        return tp_layers.parallelize(module, group, plan, init=init, strict=strict)
    todo: dict[str, tuple[Any, Style]] = {}
    own: BaseException | None = None    # this rank's own error, not the plan's: told in agree
    hollow, whole = False, {}
    try:
        # a module on the meta device holds no values to compare or send: its
        # shards are cut as shapes, made real later (engine.distribute)
        hollow = any(t.is_meta for t in module.state_dict().values())
        # shards an earlier call cut (another part of the model planned apart) differ
        # across the ranks by design: neither compared nor broadcast again
        cut_before = _shard_ids(module)
        whole = {k: v for k, v in module.state_dict(keep_vars=True).items()
                 if id(v) not in cut_before}
        named = dict(module.named_modules())
        for name, style in match(plan, named, strict).items():
            _validate(torch, name, named[name], style, group.size)
            if isinstance(named[name.rpartition(".")[0]], torch.nn.MultiheadAttention):
                raise PlanError(f"{name}: nn.MultiheadAttention reads its {name.rpartition('.')[2]}"
                                "'s weight itself (F.multi_head_attention_forward), never "
                                "calling it: plan the attention whole, or write it with "
                                "nn.Linear projections to shard")
            todo[name] = (named[name], style)
        _check_ties(named, todo)
        _check_rewrites(torch, todo, cut_before, group.size)
        _check_heads(named, todo, group.size)
        local: dict[str, str] | str = {} if init == "broadcast" or hollow else {
            k: digest([tensor_bytes(torch, t)]) for k, t in whole.items()}
    except PlanError as e:
        local = str(e)
    except BaseException as e:      # (a KeyboardInterrupt, a state_dict() of its own)
        own, local = e, f"{type(e).__name__}: {e}"[:400]
    agree(group, planned(local, {name: st for name, (_, st) in todo.items()}), "parallelize",
          own)
    if init == "broadcast" and not hollow:
        with torch.no_grad():
            for t in whole.values():
                collectives.broadcast(group, t.detach(), root=0)
    try:
        _cut_all(torch, module, todo, group)
    except BaseException as e:
        abandoned(group, e)
        raise
    return module


def _cut_all(torch: Any, module: Any, todo: dict[str, tuple[Any, Style]], group: Any) -> None:
    """parallelize's planned submodules cut to this rank's shards."""
    cut: dict[int, Any] = {}       # a tied parameter is cut once, its shard shared
    styles = {id(sub): style for sub, style in todo.values()}
    for name, (sub, style) in todo.items():
        _shard(torch, name, sub, style, group, cut, styles)
    for name, sub in module.named_modules():     # (what a PlanError calls them)
        _NAMES.setdefault(sub, name)
    nn = torch.nn
    for sub in module.modules():    # torch's fused inference path would read the shards
        if not isinstance(sub, (nn.TransformerEncoderLayer, nn.TransformerEncoder)) or not any(
                hasattr(m, "_tp") for m in sub.modules()):  # as whole weights, and the
            continue                                        # collectives take no nested tensor
        if isinstance(sub, nn.TransformerEncoderLayer):
            sub.activation_relu_or_gelu = 0     # (what turns that path off, and only that)
        else:
            sub.use_nested_tensor = False


def describe_plan(module: Any, plan: Mapping[str, Any], tp: int, *,
                  strict: bool = True) -> str:
    """What ``parallelize(module, group, plan)`` does at tp size ``tp``, as
    text, before anything runs (no group, nothing changed): each planned
    submodule's style and layouts, each of its parameters' whole shape and a
    tp rank's shard, the tensors no pattern names (whole on every tp rank).
    Raises PlanError where parallelize would on one rank: a pattern that
    matches nothing (when ``strict``), a dimension not divisible by ``tp``,
    a style that does not fit its module. An engine.layers model
    (engine.tp_layers.describe) calls its parameters by their keys
    (``"layer.index"``, as ``Job.named_parameters()`` does), with their
    attributes."""
    if not _is_torch(module):
        if isinstance(module, layers.Sequential):
            return tp_layers.describe(module, plan, tp, strict)
        raise TypeError(f"describe_plan takes a torch module or an engine.layers.Sequential, "
                        f"not a {type(module).__name__}")
    torch = _torch()
    named = dict(module.named_modules())
    styles = match(plan, named, strict)
    lines = [f"tensor-parallel plan over {tp} ranks: {len(styles)} of "
             f"{len(named) - 1} submodules planned"]
    planned_ids: set[int] = set()
    for name, style in styles.items():
        sub = named[name]
        _validate(torch, name, sub, style, tp)
        lines.append(style_said(name, type(sub).__name__, style, style.width))
        dims = _dims(sub, style.style)
        for pname, p in sub.named_parameters(recurse=style.style not in _TYPES):
            planned_ids.add(id(p))
            cut = pname in dims and style.style in _TYPES
            how = shard_said(tuple(p.shape), dims[pname] if cut else None, tp, style.style)
            lines.append(f"    {name}.{pname}: {how}")
    rest = [(n, p) for n, p in module.named_parameters() if id(p) not in planned_ids]
    if rest:
        shown = ", ".join(n for n, _ in rest[:8]) + (" ..." if len(rest) > 8 else "")
        lines.append(f"  not planned, whole on every tp rank ({len(rest)} tensors): {shown}")
    return "\n".join(lines)


def tensor_bytes(torch: Any, t: Any) -> bytes:
    """A tensor's raw bytes, its dtype and shape after them (for digests)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy()) + str((t.dtype, tuple(t.shape))).encode()
