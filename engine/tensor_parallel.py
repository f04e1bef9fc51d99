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
"""
from __future__ import annotations

import copy
import functools
import math
import sys
import threading
import types
import weakref
from typing import Any, Mapping

import collectives
from mesh import Comm

from . import layers, tp_layers
from .tp_plan import (Edge, PlanError, Style, agree, check_attrs, check_divisible, digest, edges,
                      fed_whole, joined_order, left, logged, match, planned, rewrite_attrs,
                      rowwise_fed_whole, same_on_every_rank, shard_rows, shard_said, style_said)
from .torch_stage import TorchStage, _torch, _view

__all__ = ["parallelize", "describe_plan", "gather_state_dict", "load_full_state_dict",
           "PlanError", "Style"]


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
    group = _as_comm(group)
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
    # a module on the meta device holds no values to compare or send: its
    # shards are cut as shapes, made real later (engine.distribute)
    hollow = any(t.is_meta for t in module.state_dict().values())
    # shards an earlier call cut (another part of the model planned apart) differ
    # across the ranks by design: neither compared nor broadcast again
    cut_before = _shard_ids(module)
    whole = {k: v for k, v in module.state_dict(keep_vars=True).items()
             if id(v) not in cut_before}
    try:
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
    agree(group, planned(local, {name: st for name, (_, st) in todo.items()}), "parallelize")
    if init == "broadcast" and not hollow:
        with torch.no_grad():
            for t in whole.values():
                collectives.broadcast(group, t.detach(), root=0)
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
    return module


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


def _cut(torch: Any, full: Any, dim: int, style: Style, group: Any) -> Any:
    """This rank's shard of ``full`` along ``dim``: its part of each block
    (``style.parts``), as parallelize keeps and load_full_state_dict loads."""
    rows = shard_rows(full.shape[dim], style.parts, group.size, group.rank)
    return full.index_select(dim, torch.tensor(rows, device=full.device))


def _as_comm(group: Any) -> Any:
    """A meshrun communicator, or the one under a torch.distributed group
    (or a one-dimensional DeviceMesh) on the "meshrun" backend."""
    if isinstance(group, Comm):
        return group
    import sys
    dist = sys.modules.get("torch.distributed")
    if group is None and (dist is None or not dist.is_initialized()):
        from mesh.world import current
        m = current()
        me = "" if m is None else f"rank {m.rank}: "
        raise TypeError(f"{me}parallelize: the tp group is None (what world.group(ranks) gives "
                        f"the ranks outside it) and torch.distributed has no default group to "
                        f"take instead: pass the tp communicator (a mesh.grid's group('tp'))")
    torchy = dist is not None and (
        group is None or isinstance(group, dist.ProcessGroup)
        or hasattr(group, "mesh_dim_names")               # a DeviceMesh
        or group is dist.GroupMember.NON_GROUP_MEMBER)    # (comm_of says what it is)
    if torchy:
        from collectives.torchdist import comm_of
        return comm_of(group)
    grid = " (a mesh.Grid: pass its group('tp'))" if hasattr(group, "axes") else ""
    raise TypeError(f"parallelize needs the tp group as a meshrun communicator (a "
                    f"mesh.grid's group('tp')) or a torch.distributed group on the "
                    f"'meshrun' backend, not a {type(group).__name__}{grid}")


def _is_torch(module: Any) -> bool:
    import sys
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(module, torch.nn.Module)


def tensor_bytes(torch: Any, t: Any) -> bytes:
    """A tensor's raw bytes, its dtype and shape after them (for digests)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy()) + str((t.dtype, tuple(t.shape))).encode()


_TYPES = {"colwise": "Linear", "rowwise": "Linear", "vocab": "Embedding"}
_DIMS = {"colwise": {"weight": 0, "bias": 0}, "rowwise": {"weight": 1}, "vocab": {"weight": 0}}
# a Conv1D holds its weight transposed, (in, out): colwise splits its columns
_CONV1D_DIMS = {"colwise": {"weight": 1, "bias": 0}, "rowwise": {"weight": 0}}


def is_conv1d(sub: Any) -> bool:
    """Whether ``sub`` is a Hugging Face ``Conv1D`` (transformers.pytorch_utils:
    GPT-2's c_attn, c_proj, c_fc), known by its duck type: a class named
    Conv1D whose ``weight`` is ``(nx, nf)``, in by out, a Linear's
    transposed, and whose forward is ``addmm(bias, x.view(-1, nx), weight)``
    (transformers is not imported). Its ``nx`` may be missing (older
    transformers kept ``nf`` alone)."""
    shape = tuple(getattr(getattr(sub, "weight", None), "shape", ()))
    nf = getattr(sub, "nf", None)
    return type(sub).__name__ == "Conv1D" and type(nf) is int and len(shape) == 2 and \
        shape[1] == nf and getattr(sub, "nx", shape[0]) == shape[0]


def _dims(sub: Any, style: str) -> dict[str, int]:
    """The axis ``style`` cuts each of ``sub``'s parameters along (a Linear's,
    an Embedding's, a Conv1D's transposed weight's)."""
    return (_CONV1D_DIMS if is_conv1d(sub) else _DIMS).get(style, {})


def _features(sub: Any, out: bool) -> int:
    """A Linear's or a Conv1D's output (``out``) or input features."""
    if is_conv1d(sub):
        return int(sub.nf if out else sub.weight.shape[0])
    return int(sub.out_features if out else sub.in_features)


def _check_ties(named: dict[str, Any], todo: dict[str, tuple[Any, Style]]) -> None:
    """A parameter held by several submodules (tied weights: nanoGPT's token
    embedding and output head) must be cut the same way by each holder's
    style, and every holder must be planned: it is sharded once and the
    holders share the shard, so their gradients add up in it."""
    holders: dict[int, list[str]] = {}
    for mname, sub in named.items():
        for pname, p in sub._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    cuts: dict[int, tuple[Any, set[str]]] = {}     # how each tied one is cut, and by whom
    for name, (sub, style) in todo.items():
        for pname, dim in _dims(sub, style.style).items():
            p = getattr(sub, pname, None)
            if p is None or len(holders.get(id(p), ())) < 2:
                continue
            how, key = (dim, style.parts), f"{name}.{pname}"
            first, keys = cuts.setdefault(id(p), (how, set()))
            if first != how:
                raise PlanError(f"{key} is tied to {min(keys)} (one parameter), but the plan "
                                f"cuts them differently (axis {dim} {style.style} vs axis "
                                f"{first[0]}): give the holders styles that cut it alike "
                                f"(vocab and colwise both split its rows)")
            keys.add(key)
    for pid, (_, keys) in cuts.items():
        for other in holders[pid]:
            if other not in keys:
                raise PlanError(f"{other} is tied to {min(keys)} (one parameter), which the "
                                f"plan shards, but {other.rpartition('.')[0] or 'the module'} "
                                f"is not sharded with it: plan it with a style that cuts the "
                                f"parameter alike (colwise for an output head tied to a "
                                f"vocab embedding)")


def _shard_ids(module: Any) -> set[int]:
    """The ids of the parameters of ``module`` that parallelize has cut to
    this rank's shard already."""
    return {id(getattr(sub, p)) for sub in module.modules()
            if getattr(sub, "_tp", None) is not None for p in sub._tp.dims}


def _check_rewrites(torch: Any, todo: dict[str, tuple[Any, Style]], cut_before: set[int],
                    tp: int) -> None:
    """A count the plan divides by tp (a callable ``attrs`` rewrite: a head
    count) on a module whose parameters all stay whole would run its whole
    weights with a part of its heads: a wrong result on every rank, and no
    error (nn.MultiheadAttention, whose in_proj no plan can shard; an
    attention whose q, k, v and output projections the plan forgot). A
    module with no parameters (an attention core fed sharded q, k, v) may."""
    cut = set(cut_before)
    for sub, style in todo.values():
        cut.update(id(getattr(sub, p)) for p in _dims(sub, style.style)
                   if getattr(sub, p, None) is not None)
    for name, (sub, style) in todo.items():
        counts = sorted(a for a, how in style.attrs.items() if callable(how))
        held = list(sub.named_parameters())
        if not counts or not held:
            continue
        if any(id(p) in cut for _, p in held):
            _check_whole_inside(todo, name, sub, counts)
            if not style.rng:
                _check_dropout_inside(torch, todo, name, sub, counts)
            continue
        params = [n for n, _ in held]
        what = ", ".join(f"{name}.{a}" for a in counts)
        if isinstance(sub, torch.nn.MultiheadAttention):
            raise PlanError(f"plan rewrites {what} for tp={tp}, but nn.MultiheadAttention "
                            f"keeps its projections whole (in_proj_weight is a parameter of "
                            f"its own, which no plan shards): it would attend with fewer "
                            f"heads on whole weights, a wrong result; plan {name} whole "
                            f"without attrs, or write it with nn.Linear projections to shard")
        raise PlanError(f"plan rewrites {what} for tp={tp}, but shards none of {name}'s "
                        f"parameters ({', '.join(params[:3])}{' ...' if len(params) > 3 else ''}"
                        f"): its whole weights would run with a part of the count, a wrong "
                        f"result; plan its projections too (colwise in, rowwise out)")


# the counts an attention cuts its projections' outputs into (q's heads, k's and v's)
HEAD_COUNTS = ("num_heads", "n_head", "n_heads", "nhead", "heads", "num_attention_heads",
               "num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head", "kv_heads")
# the width of one head, where a module keeps it
HEAD_SIZES = ("head_dim", "head_size", "attention_head_size", "d_head", "dim_head", "d_k")


def _check_heads(named: dict[str, Any], todo: dict[str, tuple[Any, Style]], tp: int) -> None:
    """A module whose own projections the plan shards colwise (their outputs
    split: each rank holds a part of the heads) must have its head counts
    (``num_heads``, ``n_head``...) rewritten by the plan too. Left whole, a
    forward that takes the head size from the tensor (``q.view(b, t,
    self.num_heads, -1)``) cut this rank's part into that many heads of
    1/tp the width: another attention on every rank, no error. Where the
    module keeps its head size too (``head_dim``), a count that already
    fits this rank's projections (divided by hand before parallelize, as
    torchtitan does) passes, as does one that fits none of them."""
    if tp == 1:
        return
    for name, sub in named.items():
        cut = {child: _features(m, True) for child, (m, st) in todo.items()
               if st.style == "colwise" and st.output == "shard"
               and child.rpartition(".")[0] == name and child != name}
        if not cut:
            continue
        own = todo.get(name)
        meta = getattr(sub, "_tp", None)
        rewritten = set(own[1].attrs if own else ()) | set(meta.style.attrs if meta else ())
        size = next((vars(sub)[a] for a in HEAD_SIZES if type(vars(sub).get(a)) is int), None)
        # counts divided by hand are all divided so; where the plan rewrites one, the
        # others are not (grouped-query attention at tp = heads / kv_heads: the whole
        # kv_heads * head_dim is q's shard width, and passed for a divided count)
        by_hand = not rewritten & set(HEAD_COUNTS)
        for attr in HEAD_COUNTS:
            count = vars(sub).get(attr)
            if type(count) is not int or attr in rewritten:
                continue
            shard = count * size in {w // tp for w in cut.values()} if size else False
            if size is not None and ((by_hand and shard) or count * size not in cut.values()):
                continue        # this rank's count already, or no projection's
            names = list(cut)
            entry = (f"\"{name}\": (\"replicate\", {{\"{attr}\": lambda n, tp: n // tp}})"
                     if name else f"wrap the module in nn.Sequential and rewrite \"0\"'s {attr}")
            raise PlanError(
                f"{', '.join(names[:3])} {'is' if len(names) == 1 else 'are'} sharded colwise "
                f"(output split: each of the {tp} ranks holds a part of the heads), but the plan "
                f"leaves {name or 'the module'}.{attr} = {count}: its code would cut this "
                f"rank's part into {count} heads of 1/{tp} the width (a view(..., "
                f"self.{attr}, -1)), another attention with no error; rewrite it in the same "
                f"plan: {entry} (a count that is no head count: set it to itself there)")


def _check_whole_inside(todo: dict[str, tuple[Any, Style]], name: str, sub: Any,
                        counts: list[str]) -> None:
    """Refuse an unplanned submodule with trainable parameters inside
    ``sub``, whose head count (``counts``) the plan divides by tp: run on
    this rank's heads (Qwen3's per-head ``q_norm``, ``k_norm``), its whole
    parameters got the gradient of those heads only, another on each tp
    rank, and the ranks' copies drifted apart with nothing said. Whether it
    sees the rank's part or whole activations is the plan's to say:
    ``replicate`` with input ``shard`` sums its gradients over tp, plain
    ``replicate`` keeps them."""
    styles = {id(m): st for m, st in todo.values()}
    theirs: set[int] = set()         # under a planned submodule: its style decides
    for m in sub.modules():
        if m is not sub and (id(m) in styles or getattr(m, "_tp", None) is not None):
            theirs.update(id(p) for p in m.parameters())
    for rel, m in sub.named_modules():
        own = [n for n, p in m.named_parameters(recurse=False)
               if p.requires_grad and id(p) not in theirs]
        if not rel or not own:
            continue
        raise PlanError(
            f"{name}.{rel} ({type(m).__name__}) holds whole parameters ({', '.join(own)}) "
            f"inside {name}, whose {', '.join(counts)} the plan divides by tp, and the plan "
            f"does not say what it sees: on this rank's part of the heads (a per-head q/k "
            f"norm) its gradient would be those heads' only, another on each tp rank, a "
            f"wrong result; plan it: '{name}.{rel}': {{'style': 'replicate', 'input': "
            f"'shard'}} (its gradients summed over tp), or 'replicate' where it sees whole "
            f"activations")


def _check_dropout_inside(torch: Any, todo: dict[str, tuple[Any, Style]], name: str,
                          sub: Any, counts: list[str]) -> None:
    """Refuse an unplanned dropout inside ``sub``, whose head count the plan
    divides and whose entry sets no ``rng``: it draws torch's default
    stream, in step on every tp rank, so where it sees this rank's heads
    (the attention probabilities' dropout) head h got head h + heads/tp's
    mask on the other rank, with nothing said. The plan says which stream:
    the rank's own for the heads, the shared one for the whole output."""
    planned = {id(m) for m, _ in todo.values()}
    under: set[int] = set()         # inside a planned submodule: its style decides
    for m in sub.modules():
        if m is not sub and (id(m) in planned or getattr(m, "_tp", None) is not None):
            under.update(id(d) for d in m.modules())
    for rel, m in sub.named_modules():
        if not rel or id(m) in under or not isinstance(m, torch.nn.modules.dropout._DropoutNd) \
                or not m.p:
            continue
        raise PlanError(
            f"{name}.{rel} ({type(m).__name__}, p={m.p}) inside {name}, whose "
            f"{', '.join(counts)} the plan divides by tp, draws torch's default stream, the "
            f"same on every tp rank: on this rank's part of the heads (the attention "
            f"probabilities) each rank's heads would get the other's masks, not one "
            f"process's independent ones; plan it: '{name}.{rel}': {{'style': 'replicate', "
            f"'rng': 'rank'}}, or 'rng': 'shared' where it sees the whole output (or give "
            f"{name} an 'rng')")


def _validate(torch: Any, name: str, sub: Any, style: Style, tp: int) -> None:
    if hasattr(sub, "_tp"):
        raise PlanError(f"{name} is sharded already (parallelize ran on it before)")
    kind = _TYPES.get(style.style)
    conv1d = kind == "Linear" and is_conv1d(sub)
    if kind and not conv1d and not isinstance(sub, getattr(torch.nn, kind)):
        also = " or a Hugging Face Conv1D" if kind == "Linear" else ""
        odd = "" if type(sub).__name__ != "Conv1D" else (
            f" whose weight ({tuple(getattr(getattr(sub, 'weight', None), 'shape', ()))}) is "
            f"not (nx, nf) = ({getattr(sub, 'nx', '?')}, {getattr(sub, 'nf', '?')}), as Hugging "
            f"Face's is (in by out)")
        raise PlanError(f"style {style.style!r} fits an nn.{kind}{also}, but {name} is a "
                        f"{type(sub).__name__}{odd}")
    base: Any = getattr(torch.nn, kind) if kind else None
    if style.style in ("rowwise", "vocab") and not conv1d and \
            type(sub).forward is not base.forward:
        # these run the base class's computation on the shards (a partial product,
        # masked ids) and sum it: a forward of the subclass's own would be skipped
        raise PlanError(f"style {style.style!r} computes nn.{kind}'s forward on the shards, "
                        f"but {name} is a {type(sub).__name__} with a forward of its own "
                        f"(it would not run): leave it whole ('replicate')"
                        + (", or plan it colwise" if style.style == "rowwise" else ""))
    if style.style == "colwise":
        what = "nf (weight columns)" if conv1d else "out_features (weight rows)"
        check_divisible(name, what, _features(sub, True), tp, style.parts)
    elif style.style == "rowwise":
        what = "nx (weight rows)" if conv1d else "in_features (weight columns)"
        check_divisible(name, what, _features(sub, False), tp)
    elif style.style == "vocab":
        check_divisible(name, "num_embeddings (weight rows)", sub.num_embeddings, tp)
        if sub.max_norm is not None:
            raise PlanError(f"{name}: a vocab-sharded Embedding cannot renormalize (max_norm)")
    check_attrs(sub, name, style, tp)


class _Meta:
    """What parallelize left on a submodule (``sub._tp``): how to cut and
    re-join its parameters and which collectives wrap its forward."""

    def __init__(self, name: str, style: Style, group: Any, dims: dict[str, int]) -> None:
        self.name, self.style, self.group, self.dims = name, style, group, dims
        self.lo = 0
        self.order: list[int] | None = None  # a fused module's rows, from the shards laid end to end
        self.stream: _Stream | None = None   # rng="rank": the tp rank's own random stream
        self.summed: list[Any] = []    # whole parameters fed a part: gradients summed over tp
        self.summed_names: list[str] = []   # their names in the module (own_records)
        self.defer = False             # True: a Pipeline sums them after its step (tp_sums)
        # input "sequence": whether its first input was checked for whole rows
        self.seen = style.input != "sequence" or style.alike or group.size == 1

    def __deepcopy__(self, memo: dict[int, Any]) -> "_Meta":
        """A copy of the module is sharded over the same group (a Comm is not
        copied); its copies of the summed parameters get the hook (torch's
        deepcopy of a tensor leaves its hooks behind)."""
        new = _Meta(self.name, self.style, self.group, dict(self.dims))
        new.lo, new.order, new.stream = self.lo, self.order, self.stream
        new.seen = self.seen
        new.summed = [copy.deepcopy(p, memo) for p in self.summed]
        new.summed_names = list(self.summed_names)
        for p in new.summed:
            p.register_hook(functools.partial(_summed, new))
        return new

    def summed_grads(self) -> list[Any]:
        """The summed parameters' gradients (made zeros where None), as
        arrays sharing their memory (engine.tp_sums)."""
        return [_view(TorchStage._grad(p)) for p in self.summed]


_shared = threading.local()    # .states: the shared stream's, while a rank's own runs


def _generators(torch: Any, x: Any) -> list[Any]:
    """The default generators a forward on ``x`` draws from: the CPU's, and
    its CUDA device's."""
    if not getattr(x, "is_cuda", False):
        return [torch.random.default_generator]
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return [torch.random.default_generator, torch.cuda.default_generators[idx]]


class _Stream:
    """This tp rank's own random numbers (rng="rank") for one forward at a
    time: the forward runs on a generator seeded from the next number of
    torch's default stream (drawn alike on every tp rank, whose programs
    are the same) and the tp rank, Megatron's ``+ 2718 + rank`` offset, and
    the default generator's state is put back after it but for that one
    draw. So the default stream, which replicated activations draw from,
    stays in step on every rank, each rank's masks differ, and a
    recomputation (``torch.utils.checkpoint`` around the module restores the
    default state first) draws the same seed and the same masks again.
    Inside, a submodule planned ``rng="shared"`` (a dropout on the module's
    replicated output) draws from the default stream as it was outside
    (``_on_shared``), and the draws it made count there after."""

    def __init__(self, torch: Any, rank: int) -> None:
        self.torch, self.rank = torch, rank

    def run(self, fn: Any, x: Any) -> Any:
        torch = self.torch
        draw = int(torch.randint(0, 2**62, (1,)).item())
        seed = (draw + 2718 + self.rank) % 2**63
        gens = _generators(torch, x)
        outermost = getattr(_shared, "states", None) is None
        states = [g.get_state() for g in gens]
        try:
            if outermost:
                _shared.states = states
            for g in gens:
                g.manual_seed(seed)
            return fn(x)
        finally:
            after = _shared.states if outermost else states
            if outermost:
                _shared.states = None
            for g, state in zip(gens, after):
                g.set_state(state)


def _on_shared(torch: Any, fn: Any, x: Any) -> Any:
    """``fn(x)`` on the shared stream (rng="shared" given in the plan): the
    default one, or inside a module on a rank's own stream, the default
    stream as it stood outside, moved on by what ``fn`` draws."""
    shared = getattr(_shared, "states", None)
    if shared is None:
        return fn(x)
    gens = _generators(torch, x)
    own = [g.get_state() for g in gens]
    for g, state in zip(gens, shared):
        g.set_state(state)
    try:
        return fn(x)
    finally:
        _shared.states = [g.get_state() for g in gens]
        for g, state in zip(gens, own):
            g.set_state(state)


def _sequence_params(sub: Any, styles: dict[int, Style]) -> list[tuple[str, Any]]:
    """The parameters of a "sequence" module ``sub`` whose gradients it sums
    over tp: its own and its submodules', but not those under a planned
    submodule (in this call, ``styles``, or an earlier one) of a style of
    its own, which shards them, sums them itself or gathers the whole
    sequence for them (a ``replicate`` one with input ``any`` sees the part
    ``sub`` sees: its parameters are summed here). They were summed here
    too: a nested "sequence" module's twice, a colwise one's shards over
    the ranks."""
    theirs: set[int] = set()
    for m in sub.modules():
        meta = getattr(m, "_tp", None)
        st = styles.get(id(m)) or (meta.style if meta is not None else None)
        if m is not sub and st is not None and (st.style, st.input) != ("replicate", "any"):
            theirs.update(id(p) for p in m.parameters())
    return [(n, p) for n, p in sub.named_parameters() if id(p) not in theirs]


def _shard(torch: Any, name: str, sub: Any, style: Style, group: Any,
           cut: dict[int, Any], styles: dict[int, Style]) -> None:
    tp, r = group.size, group.rank
    conv1d = is_conv1d(sub)     # (read before its weight is cut, while nx and nf fit it)
    meta = _Meta(name, style, group, {p: d for p, d in _dims(sub, style.style).items()
                                      if getattr(sub, p, None) is not None})
    with torch.no_grad():
        for p, d in meta.dims.items():
            full = getattr(sub, p)       # this rank's part (of each block, when fused)
            if id(full) not in cut:
                # cut in place, the parameter kept: an optimizer made on the model before
                # it was sharded steps the shards (a new Parameter left such an optimizer
                # holding the whole ones, which no gradient reached: it stepped nothing,
                # silently); one whose state has the whole shapes fails loudly instead
                cut[id(full)] = full
                shard = _cut(torch, full, d, style, group)
                if isinstance(full, torch.nn.Parameter):
                    full.data, full.grad = shard, None
                else:
                    cut[id(full)] = torch.nn.Parameter(shard, requires_grad=full.requires_grad)
            setattr(sub, p, cut[id(full)])
    if style.style == "colwise":
        meta.order = joined_order(sub.nf if conv1d else sub.out_features, style.parts, tp)
        if conv1d:
            sub.nf //= tp          # (its forward shapes its output by it)
        else:
            sub.out_features //= tp
    elif style.style == "rowwise":
        if not conv1d:
            sub.in_features //= tp
        elif hasattr(sub, "nx"):
            sub.nx //= tp
    elif style.style == "vocab":
        sub.num_embeddings //= tp
        meta.lo = r * sub.num_embeddings
        if sub.padding_idx is not None:
            # the shard's too, as num_embeddings: the padding row's index here, or None
            # (what reset_parameters() zeroes: the whole table's index zeroed a token's
            # row in the other shards, or was past their rows)
            pad = sub.padding_idx - meta.lo
            sub.padding_idx = pad if 0 <= pad < sub.num_embeddings else None
    seen_part = style.style == "sequence" or (style.style, style.input) == ("replicate", "shard")
    summed = (_sequence_params(sub, styles) if seen_part else
              [("bias", sub.bias)] if style.style == "rowwise" and style.output != "replicate"
              else [])
    summed = [(n, p) for n, p in summed if p is not None and p.requires_grad]
    meta.summed_names, meta.summed = [n for n, _ in summed], [p for _, p in summed]
    for param in meta.summed:      # whole, but fed a part of the sequence: sum the parts
        param.register_hook(functools.partial(_summed, meta))
    rewrite_attrs(sub, name, style, tp)
    sub._tp = meta
    if style.rng == "rank":
        meta.stream = _Stream(torch, r)
    if style.style != "replicate" or (style.input, style.output) != ("any", "any") or \
            meta.stream is not None or style.width or style.attrs or style.rng == "shared":
        sub.forward = types.MethodType(_forward, sub)


def own_records(module: Any) -> None:
    """Give each sharded submodule of ``module`` whose summed parameters
    (a "sequence" module's, a rowwise bias before a split output) are no
    longer those its record lists a record of its own, listing its own and
    hooking them. engine.partition makes such modules: a module that layers
    of two stages share (ALBERT's one block) is copied for the later stage
    (a shallow copy, its ``_tp`` record the original's) and its parameters
    untied into new ones. Left so, the copy's gradients were never summed
    over tp (the hooks and a Pipeline's TpSums saw the original's
    parameters only): each tp rank kept its own part of the sequence's
    gradient, a wrong result with nothing said."""
    for sub in module.modules():
        meta = getattr(sub, "_tp", None)
        if meta is None or not meta.summed:
            continue
        mine = [sub.get_parameter(n) for n in meta.summed_names]
        if len(mine) == len(meta.summed) and all(p is q for p, q in zip(mine, meta.summed)):
            continue
        new = copy.copy(meta)       # the same group, style, shards' layout, random stream
        new.summed, new.defer = mine, False
        for param in mine:
            param.register_hook(functools.partial(_summed, new))
        sub._tp = new


def _summed(meta: _Meta, grad: Any) -> Any:
    if meta.defer:       # a Pipeline's step: summed once after its backward passes
        return grad
    return _comm(meta.group, grad, "ar", f"{meta.name} gradient", 0)


def _forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The wrapped forward of a sharded submodule: its input's collective,
    the computation on the shard, its output's collective (and a rowwise
    bias, added once). Its input is its first positional argument, or its
    first keyword argument when it is called with keywords only
    (``attn(hidden_states=h, mask=m)``)."""
    torch = _torch()
    meta: _Meta = self._tp
    st, g = meta.style, meta.group
    enter, leave = edges(st)
    if args:
        x, rest, key = args[0], args[1:], None
    elif kwargs:
        key = next(iter(kwargs))
        x, rest = kwargs.pop(key), ()
    else:
        raise PlanError(f"{meta.name} was called without arguments: its plan entry "
                        f"({st.style}) needs an input")
    if not meta.seen:
        _check_parts(torch, meta, x)
    if enter:
        x = _edge(g, x, enter, st.seq_dim, meta.name)
    if st.width:
        x = _shard_width(torch, x, g, meta.name)
    if st.style == "rowwise":
        conv1d = is_conv1d(self)            # (a Conv1D's weight is (in, out))
        part = self.weight.shape[0 if conv1d else 1]
        if isinstance(x, torch.Tensor) and x.dim() and x.shape[-1] != part:
            # (torch's shape error named neither the layer nor the plan; every tp rank
            # has the same shapes, so all raise here, before the output's all-reduce)
            raise PlanError(rowwise_fed_whole(g.rank, meta.name, part, g.size, x.shape[-1]))
        y = torch.nn.functional.linear(x, self.weight.t() if conv1d else self.weight)
    elif st.style == "vocab":
        y = _embed(torch, self, meta, x)
    else:
        forward = functools.partial(type(self).forward, self)
        y = _module_forward(meta, (lambda v: forward(v, *rest, **kwargs)) if key is None else
                            (lambda v: forward(**{key: v}, **kwargs)), x)
    if leave:
        y = _edge(g, y, leave, st.seq_dim, meta.name)
    if st.style == "colwise" and st.output == "shard" and st.watched and not st.parts \
            and g.size > 1 and isinstance(y, torch.Tensor) \
            and not torch.compiler.is_compiling():
        y = _watch_blocks(y, meta)
    if st.style == "rowwise" and self.bias is not None:
        # a partial output takes the bias on tp rank 0 only (times 1, times 0
        # elsewhere): every rank has the same graph, so the bias's gradient
        # hook (a collective) runs on all of them at the same point
        once = self.bias if st.output != "partial" else self.bias * float(g.rank == 0)
        y = y + once
    left(meta.name, st, g.size)
    return y


def _check_parts(torch: Any, meta: _Meta, x: Any) -> None:
    """At a module's first call, for input "sequence": refuse the same
    input on every tp rank (tp_plan.same_on_every_rank). Not under
    torch.compile, nor for a meta tensor (no values), which stay unchecked."""
    if not isinstance(x, torch.Tensor) or x.is_meta or torch.compiler.is_compiling():
        return
    meta.seen = True
    a = x.detach()
    constant = a.numel() == 0 or bool((a == a.reshape(-1)[0]).all())
    data = a.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    same_on_every_rank(meta.group, meta.name, meta.style, data, a.shape, constant)


def _module_forward(meta: _Meta, forward: Any, x: Any) -> Any:
    """The module's own forward on its input ``x`` (rng="rank": on this tp
    rank's own stream). A view that no longer fits after an attribute
    rewrite is most often a width read from the input: the error says so."""
    try:
        if meta.stream is not None:
            return meta.stream.run(forward, x)
        if meta.style.rng == "shared":
            return _on_shared(_torch(), forward, x)
        return forward(x)
    except RuntimeError as e:
        st = meta.style
        if not st.attrs or st.width or "is invalid for input of size" not in str(e):
            raise
        raise PlanError(f"tp rank {meta.group.rank}: {meta.name}: {e} after the plan rewrote "
                        f"{', '.join(sorted(st.attrs))}: if its code reads its width from "
                        f"its input (B, T, C = x.size()), add \"width\": \"shard\" to its "
                        f"plan entry") from e


def _shard_width(torch: Any, x: Any, group: Any, name: str) -> Any:
    """``x`` as its module's code reads it under width="shard": its last axis
    looks ``1/tp`` as long (``size()`` and ``shape``); the data, its autograd
    history and every operation on it are the whole tensor's."""
    if x.ndim == 0 or x.shape[-1] % group.size:
        raise PlanError(f"tp rank {group.rank}: {name}: width='shard' reads the input's last "
                        f"axis as this rank's part, but the input is {tuple(x.shape)}, its "
                        f"last axis not divisible by the tp size {group.size}")
    narrow = x.as_subclass(_width_class())
    narrow._tp_parts = group.size
    return narrow


@functools.cache
def _width_class() -> Any:
    torch = _torch()
    shape = torch.Tensor.shape.__get__

    class ShardWidth(torch.Tensor):  # type: ignore[name-defined,misc]
        """A whole tensor whose last axis reads as one tp rank's part of it."""

        @classmethod
        def __torch_function__(cls, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
                if func is not torch.Tensor.size and func != shape:
                    return out       # a plain tensor: the narrowing stays on the input
                parts, ndim = args[0]._tp_parts, args[0].ndim
            if isinstance(out, torch.Size):
                return torch.Size((*out[:-1], out[-1] // parts))
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            return out // parts if dim % ndim == ndim - 1 else out

    return ShardWidth


def _watch_blocks(y: Any, meta: _Meta, axis: int = -1, unit: int | None = 1,
                  width: int | None = None) -> Any:
    """A colwise output cut in one piece (no ``parts``), which raises where
    the code that called the module cuts its features apart (``split``,
    ``chunk``, ``unbind``, ``narrow``, ``glu``, a slice ``y[..., :n]``): that
    is a fused projection (nanoGPT's ``c_attn`` split into q, k and v, a
    SwiGLU's ``w12`` chunked into gate and up), whose contiguous shard holds
    all of q and half of k on one rank, the rest on the other; each rank
    then attended (or gated) with the wrong blocks, and no error was raised.
    So does a function that mixes the values along that axis (a softmax or
    a sum over it, ``q @ k.transpose(-1, -2)`` or an ``einsum`` contracting
    it on a single head): on the shard, it gave each rank a result of its
    own part of the features.

    The watch follows the features through views of the output: a reshape
    that splits their axis leaves this rank's part on the first new axis,
    the others whole (``view(B, T, heads, hd)``: this rank's heads, each
    head's ``hd`` features all there); a permute or a transpose moves that
    axis, a merge (``reshape(B, T, -1)``) joins it again. A cut or a mix
    of the axis holding this rank's part raises as on the output itself:
    timm's ``qkv(x).reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)``,
    then ``unbind(0)``, cuts the axis of size 3, which on a rank holds
    [q; k; v]'s part of that rank (at tp=2, all of q, then half of k), not
    q, k and v: the same silent wrong result until the thirty-eighth
    session. One over another axis passes (a rotary half of ``hd``, the
    per-head ``[q, k, v]`` of ``view(B, T, heads, 3, hd)``, the heads of
    ``q @ k.transpose(-1, -2)``), and is watched on. ``axis`` is where
    the features are, from the end; ``unit``, how many of them one step
    along it holds (None: not known); ``width``, the output's own.

    A function of each value alone (an activation) passes the watch on to
    its result; a dropout there (T5's between ``wi`` and ``wo``) draws from
    this tp rank's own stream (rng="rank"), as Megatron's does in a tp
    region."""
    narrow = y.as_subclass(_blocks_class())
    narrow._tp_meta, narrow._tp_axis, narrow._tp_unit = meta, axis, unit
    narrow._tp_width = y.shape[-1] if width is None else width
    return narrow


def watch_of(v: Any) -> dict[str, Any] | None:
    """What a pipeline sends beside a watched colwise output (_watch_blocks)
    so that the next stage's rank watches it too: its module's name and
    where its features are; None for any other value."""
    meta = getattr(v, "_tp_meta", None)
    if meta is None:
        return None
    return {"name": meta.name, "axis": v._tp_axis, "unit": v._tp_unit, "width": v._tp_width}


def rewatched(v: Any, watch: dict[str, Any], group: Any) -> Any:
    """``v``, received from the previous stage, watched again as the colwise
    output ``watch`` (watch_of) told of, over this rank's tp ``group`` (the
    sender's peers' equal): a layer the plan leaves whole at the top of this
    stage raises the PlanError naming both layers and the fix, as it does
    in one stage (it was torch's shape error alone), and a cut or a dropout
    there is watched as it is there."""
    meta = _Meta(watch["name"], Style("colwise"), group, {})
    return _watch_blocks(v, meta, watch["axis"], watch["unit"], watch["width"])


_CUTS = {"split": 2, "split_with_sizes": 2, "unsafe_split": 2, "chunk": 2, "unsafe_chunk": 2,
         "tensor_split": 2, "unbind": 1, "narrow": 1, "glu": 1}   # name: where its dim is
# views of a tensor: where an axis goes is read from the shapes (reshapes), or
# from the same call on a probe whose one axis of size 2 is the features' (moves)
_VIEWS = frozenset(("view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"))
_MOVES = frozenset(("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"))


def _index_at(torch: Any, index: Any, ndim: int, a: int) -> tuple[Any, int | None]:
    """What an index (``x[index]``) takes of axis ``a`` of an ``ndim``-axis
    tensor (a full slice where it leaves it whole, or cannot tell: a boolean
    mask), and where that axis is in the result (None: gone, or past an
    index tensor, whose placement is torch's rule)."""
    index = index if isinstance(index, tuple) else (index,)

    def takes(i: Any) -> int:         # the axes an index element uses (-1: not known)
        if i is None or i is ...:
            return 0
        bool_tensor = isinstance(i, torch.Tensor) and i.dtype == torch.bool
        return -1 if isinstance(i, bool) or bool_tensor else 1
    used = [takes(i) for i in index]
    if -1 in used or sum(i is ... for i in index) > 1:
        return slice(None), None
    at, pos, i_in, i_out, advanced = slice(None), None, 0, 0, False
    for i in index:
        if i is None:
            i_out += 1
            continue
        if i is ...:
            k = ndim - sum(used)
            if i_in <= a < i_in + k:
                pos = i_out + a - i_in
            i_in, i_out = i_in + k, i_out + k
            continue
        if i_in == a:
            at = i
            pos = i_out if isinstance(i, slice) else None
        if isinstance(i, slice):
            i_out += 1
        elif not isinstance(i, int):
            advanced = True
        i_in += 1
    if a >= i_in:
        pos = i_out + a - i_in
    return at, None if advanced else pos


def _cut_at(torch: Any, func: Any, args: Any, kwargs: Any, out: Any) -> list[int] | None:
    """The sizes of the pieces ``func`` cut the features' axis of
    ``args[0]`` into, or None where it cut no other axis or none."""
    name, x = getattr(func, "__name__", ""), args[0]
    a = x._tp_axis % x.dim()
    n = x.shape[a]
    if name == "__getitem__":
        at, _ = _index_at(torch, args[1], x.dim(), a)
        if isinstance(at, slice):
            kept = len(range(*at.indices(n)))
            if kept == n and at.indices(n)[2] == 1:
                return None
        else:
            kept = (int(at.numel()) if isinstance(at, torch.Tensor) else
                    len(at) if isinstance(at, (list, tuple)) else 1)
        sizes = [kept, n - kept]
    elif name == "__iter__":
        sizes = [1] * n if a == 0 else []
    elif name in _CUTS:
        dim = kwargs.get("dim", args[_CUTS[name]] if len(args) > _CUTS[name] else
                         (-1 if name == "glu" else 0))
        if not isinstance(dim, int) or dim % x.dim() != a:
            return None
        if name == "glu":
            sizes = [n // 2] * 2
        elif name == "narrow":
            sizes = [out.shape[a], n - out.shape[a]]
        else:
            sizes = [1] * len(out) if name == "unbind" else [o.shape[a] for o in out]
    else:
        return None
    sizes = [s for s in sizes if s]
    return sizes if len(sizes) > 1 else None


def _regroup(before: tuple[int, ...], after: tuple[int, ...], a: int,
             unit: int | None) -> tuple[int, int | None] | None:
    """Where axis ``a`` of a tensor shaped ``before`` holds its features once
    viewed as ``after``, and how many features one step along it holds then;
    None where they are no longer on one axis in order (a merge with an
    outer axis: ``(T, heads, hd)`` into ``T * heads * hd``). The axes are
    matched in groups of equal size; a group's features go to its first axis
    (a split: the heads of ``(heads, hd)``, which hold this rank's part)."""
    if 0 in before or 0 in after:
        return None
    i = j = 0
    while i < len(before):
        i0, j0 = i, j
        p, q = before[i], after[j] if j < len(after) else 1
        i, j = i + 1, j + 1
        while p != q:
            if p < q:
                if i == len(before):
                    return None
                p, i = p * before[i], i + 1
            else:
                if j >= len(after):
                    return None
                q, j = q * after[j], j + 1
        if i0 <= a < i:
            if j0 >= len(after) or any(s != 1 for s in before[i0:a]):
                return None            # an outer axis of size > 1 merged with it
            inner_before = math.prod(before[a + 1:i])
            inner_after = math.prod(after[j0 + 1:j])
            if unit is not None and unit * inner_after % inner_before == 0:
                unit = unit * inner_after // inner_before
            else:
                unit = None
            return j0, unit
    return None


def _followed(torch: Any, func: Any, args: Any, kwargs: Any, out: Any) -> Any:
    """``out`` (a view of ``args[0]``, a piece of it cut along another
    axis than its features') watched where ``args[0]``'s features went in
    it; ``out`` as it is where that cannot be told (the watch stops)."""
    name, x = getattr(func, "__name__", ""), args[0]
    a, unit, ndim = x._tp_axis % x.dim(), x._tp_unit, x.dim()
    where: int | None = None
    if isinstance(out, (tuple, list)) and name in _CUTS:       # split, chunk, unbind
        if name == "unbind":
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0) % ndim
            a -= dim < a
        return type(out)(_watch_blocks(o, x._tp_meta, a - o.dim(), unit, x._tp_width)
                         for o in out)
    if name == "__iter__":                                     # q, k, v = t: unbind(0)
        if a == 0:
            return out
        return iter([_watch_blocks(o, x._tp_meta, a - 1 - o.dim(), unit, x._tp_width)
                     for o in out])
    if not isinstance(out, torch.Tensor):
        return out
    if name in _VIEWS and out.numel() == x.numel():
        got = _regroup(tuple(x.shape), tuple(out.shape), a, unit)
        if got is not None:
            where, unit = got
    elif name in _MOVES and out.dim() == ndim:
        probe = torch.empty([2 if d == a else 1 for d in range(ndim)])
        where = list(func(probe, *args[1:], **kwargs).shape).index(2)
    elif name == "unsqueeze":
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0) % out.dim()
        where = a + (dim <= a)
    elif name == "squeeze":
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        dims = range(ndim) if dim is None else dim if isinstance(dim, (tuple, list)) else (dim,)
        gone = {d % ndim for d in dims if x.shape[d] == 1}
        where = None if a in gone else a - sum(d < a for d in gone)
    elif name == "__getitem__":
        where = _index_at(torch, args[1], ndim, a)[1]
    elif name in ("narrow", "glu"):
        where = a
    if where is None:
        return out
    return _watch_blocks(out, x._tp_meta, where - out.dim(), unit, x._tp_width)


# functions over an axis that mix its values (name: where its dim is, and
# its default: None, all of them or none, is not looked at)
_MIXES = {"softmax": (1, None), "log_softmax": (1, None), "logsumexp": (1, None),
          "sum": (1, None), "mean": (1, None), "amax": (1, None), "amin": (1, None),
          "max": (1, None), "min": (1, None), "argmax": (1, None), "argmin": (1, None),
          "topk": (2, -1), "sort": (1, -1), "argsort": (1, -1), "cumsum": (1, None),
          "std": (1, None), "var": (1, None), "norm": (2, None), "normalize": (2, 1)}
_CONTRACTS = ("matmul", "__matmul__", "mm", "bmm", "scaled_dot_product_attention")


def _mixed_at(func: Any, args: Any, kwargs: Any) -> bool:
    """Whether ``func`` mixes the values along the features' axis of
    ``args[0]`` (a softmax or a sum over it): on a colwise shard, this
    rank's part of them only."""
    name, x = getattr(func, "__name__", ""), args[0]
    if name not in _MIXES or x.dim() == 0:
        return False
    at, default = _MIXES[name]
    dim = kwargs.get("dim", args[at] if len(args) > at else default)
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return any(isinstance(d, int) and d % x.dim() == x._tp_axis % x.dim() for d in dims)


def _contracted(cls: Any, func: Any, args: Any) -> Any:
    """The first watched operand of a product (``matmul``, scaled dot
    product attention's q and k, ``einsum``) whose features' axis it
    contracts, or None."""
    name = getattr(func, "__name__", "")
    if name == "einsum" and isinstance(args[0], str):
        lhs, arrow, rhs = args[0].replace(" ", "").partition("->")
        if not arrow:              # implicit: the letters used once, and the ellipsis
            rhs = "".join(c for c in lhs if c.isalpha() and lhs.count(c) == 1) + "..."
        for term, op in zip(lhs.split(","), args[1:]):
            if type(op) is not cls:
                continue
            a = op._tp_axis % op.dim()
            pre, ell, post = term.partition("...")
            outer = op.dim() - len(post)       # where the letters after "..." start
            if a < len(pre) or (not ell and a < len(term)):
                letter = term[a]
            elif a >= outer:
                letter = post[a - outer]
            else:
                letter = "..."                 # one of the axes the ellipsis stands for
            if letter not in rhs:
                return op
        return None
    if name not in _CONTRACTS:
        return None
    for k, op in enumerate(args[:2]):
        if type(op) is not cls or op.dim() == 0:
            continue
        inner = op.dim() - 1 if k == 0 or op.dim() == 1 or name.startswith("scaled") else \
            op.dim() - 2
        if op._tp_axis % op.dim() == inner:
            return op
    return None


# functions of each value alone, whose result is the same rank's part of the
# features (watched further: an activation, then a dropout or a cut)
_ELEMENTWISE = frozenset((
    "gelu", "relu", "relu_", "silu", "tanh", "sigmoid", "mish", "softplus", "leaky_relu",
    "elu", "selu", "hardswish", "hardsigmoid", "hardtanh", "relu6", "exp", "neg", "__neg__",
    "abs", "square", "pow", "__pow__", "sqrt", "rsqrt", "mul", "__mul__", "__rmul__", "add",
    "__add__", "__radd__", "sub", "__sub__", "__rsub__", "div", "__truediv__",
    "__rtruediv__", "dropout", "alpha_dropout", "contiguous", "clone", "float", "to",
    "type_as"))


# those of them with two operands, either of which may be the watched one
_ARITHMETIC = frozenset(("mul", "__mul__", "__rmul__", "add", "__add__", "__radd__", "sub",
                         "__sub__", "__rsub__", "div", "__truediv__", "__rtruediv__"))


def _drops(args: Any, kwargs: Any) -> bool:
    """Whether a dropout call (F.dropout's keywords, or torch.dropout's
    positions) drops anything, outside a module on a tp rank's own stream."""
    p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
    train = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else True))
    return bool(train) and p > 0 and getattr(_shared, "states", None) is None


def _flat(x: Any) -> bool:
    """Whether a watched tensor's features are on its last axis, one a step."""
    return x._tp_axis % x.dim() == x.dim() - 1 and x._tp_unit == 1


def _where(x: Any) -> str:
    """The axis holding a watched tensor's features, as an error names it."""
    a = x._tp_axis % x.dim()
    if _flat(x):
        return "its output's last axis"
    return (f"axis {a} (where its output's features went) of the {tuple(x.shape)} tensor "
            f"its code made of that output (a view, a reshape or a permute of it)")


@functools.cache
def _blocks_class() -> Any:
    torch = _torch()

    class ColwiseOutput(torch.Tensor):  # type: ignore[name-defined,misc]
        """A colwise module's output, a contiguous part of its features,
        whose features may not be cut into blocks nor mixed, and whose
        dropout draws this rank's own masks (_watch_blocks)."""

        @classmethod
        def __torch_function__(cls, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            first = bool(args) and type(args[0]) is cls
            name = getattr(func, "__name__", "")
            with torch._C.DisableTorchFunctionSubclass():
                if first and name in ("dropout", "alpha_dropout") and _drops(args, kwargs):
                    # this rank's features: masks of its own (Megatron's tp region
                    # dropout); on the default stream every rank drew the same mask
                    # for its part, feature j dropped with feature j + n/tp
                    stream = _Stream(torch, args[0]._tp_meta.group.rank)
                    out = stream.run(lambda v: func(v, *args[1:], **kwargs), args[0])
                else:
                    try:
                        out = func(*args, **kwargs)  # a plain tensor: the watch stays here
                    except RuntimeError as e:
                        _unplanned_consumer(cls, func, args, e)
                        raise
                x = args[0] if first else args[1] if len(args) > 1 and type(
                    args[1]) is cls and name in _ARITHMETIC else None
                if x is not None and name in _ELEMENTWISE:   # still this rank's part
                    ax = x._tp_axis
                    if isinstance(out, torch.Tensor) and out.dim() >= x.dim() and \
                            out.shape[ax] == x.shape[ax]:
                        return _watch_blocks(out, x._tp_meta, ax, x._tp_unit, x._tp_width)
                    return out
                sizes, mixed = None, _contracted(cls, func, args)
                if mixed is None and first:
                    x = args[0]
                    sizes = _cut_at(torch, func, args, kwargs, out)
                    if sizes is None and _mixed_at(func, args, kwargs):
                        mixed = x
                    elif sizes is None:
                        return _followed(torch, func, args, kwargs, out)
                elif mixed is None:
                    return out
                x = mixed if mixed is not None else x
                assert x is not None        # (a mix, or a cut of args[0]'s features)
                meta, full, flat = x._tp_meta, x.shape[x._tp_axis], _flat(x)
            tp, fname = meta.group.size, getattr(func, "__name__", func)
            if mixed is not None:
                held = f"{full} of {full * tp}{' features' if flat else ''} (colwise)"
                fix = "cut that axis into heads first (a view)" if flat else \
                    "leave that axis out of it (a batch axis, as the heads' to an attention)"
                raise PlanError(
                    f"tp rank {meta.group.rank}: {meta.name}: the code calling it takes "
                    f"{fname}() over {_where(x)}, of which this rank holds {held}: a result "
                    f"of this rank's part only, another on each rank, with no error; give "
                    f"{meta.name} output 'replicate' ({{'style': 'colwise', 'output': "
                    f"'replicate'}}: its output whole), or {fix}")
            assert sizes is not None
            width, unit = x._tp_width, x._tp_unit
            guess = len(sizes) if len(set(sizes)) == 1 else \
                tuple(n * unit * tp for n in sizes) if unit else len(sizes)
            blocks = "" if flat else (
                " (its blocks made an axis of their own, as timm's qkv(x).reshape(B, N, 3, "
                "heads, hd) then unbind(0) after a permute: here that axis holds this rank's "
                "part of them all, not a block a step)")
            raise PlanError(
                f"tp rank {meta.group.rank}: {meta.name}: the code calling it cuts "
                f"{_where(x)} into {len(sizes)} pieces ({fname}: "
                f"{sizes} of this rank's {full}{' features' if flat else ''}), but its plan "
                f"entry (colwise) shards that axis in one piece over tp={tp}: a fused "
                f"projection ([q; k; v], a SwiGLU's gate and up){blocks} would mix its "
                f"blocks across the ranks, a wrong result; plan it {{'style': 'colwise', "
                f"'parts': {guess!r}}} (the count of equal blocks, or their sizes in its "
                f"{width * tp} output features) and rewrite the sizes its caller cuts by "
                f"for tp (attrs)" + ("" if flat else "; or, if that axis holds heads that "
                "the code takes one by one (right on the shard), plan it {'style': "
                "'colwise', 'parts': 1}: one block, its cuts not watched"))

    return ColwiseOutput


_NAMES: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
"""Each submodule of a module parallelize sharded, and its name there."""


def _consumer(torch: Any) -> Any:
    """The innermost module whose forward is running (a frame of its
    ``forward``, or of a sharded one's wrapped ``_forward``), or None."""
    f: Any = sys._getframe(2)
    while f is not None:
        if f.f_code.co_name in ("forward", "_forward"):
            m = f.f_locals.get("self")
            if isinstance(m, torch.nn.Module):
                return m
        f = f.f_back
    return None


def _unplanned_consumer(cls: Any, func: Any, args: Any, e: RuntimeError) -> None:
    """Raise a PlanError where ``func`` failed on a colwise output in a module
    the plan left whole (a Linear or a LayerNorm after a colwise Linear, its
    "rowwise" forgotten): its whole weights met this rank's part of the
    features, and torch's shape error named neither (``mat1 and mat2 shapes
    cannot be multiplied (2x4 and 8x2)``). Return where it is not that."""
    torch = _torch()
    x = next((a for a in args if type(a) is cls), None)
    if x is None:
        return
    meta: _Meta = x._tp_meta
    m = _consumer(torch)
    if m is None or hasattr(m, "_tp"):     # a planned module's own error: as it is
        return
    name = _NAMES.get(m)
    what = f"{name} ({type(m).__name__})" if name else f"a {type(m).__name__}'s forward"
    tp, full = meta.group.size, x.shape[x._tp_axis]
    raise PlanError(fed_whole(
        meta.group.rank, meta.name, full, tp, what,
        f"{getattr(func, '__name__', func)}() raised {type(e).__name__}: {e}",
        name if name and (isinstance(m, torch.nn.Linear) or is_conv1d(m)) else "")) from e


def _embed(torch: Any, sub: Any, meta: _Meta, ids: Any) -> Any:
    """This rank's rows of the embedding; ids outside them give zeros.
    An id outside every rank's rows raises, as nn.Embedding does (each rank
    would give it zeros: a silent zero vector)."""
    total = sub.num_embeddings * meta.group.size
    bad = (ids < 0) | (ids >= total)
    if bool(bad.any()):
        raise IndexError(f"tp rank {meta.group.rank}: {meta.name}: token id "
                         f"{int(ids[bad].reshape(-1)[0])} is out of range for the embedding's "
                         f"{total} rows (vocab-sharded over tp={meta.group.size})")
    local = ids - meta.lo
    outside = (local < 0) | (local >= sub.num_embeddings)
    local = local.masked_fill(outside, 0)
    y = torch.nn.functional.embedding(local, sub.weight, sub.padding_idx, None, 2.0, False,
                                      sub.sparse)       # (padding_idx: this shard's row)
    if sub.scale_grad_by_freq and y.requires_grad:
        # torch divides a row's gradient by how often its id occurs in the batch;
        # here every id of the other ranks reads local row 0, and would count as
        # its: each position's gradient is divided by its own id's count instead
        _, where, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        scale = (1.0 / counts.to(torch.float64))[where].to(y.dtype).unsqueeze(-1)
        y.register_hook(lambda g: g * scale)
    return y.masked_fill(outside.unsqueeze(-1), 0.0)


def _edge(group: Any, x: Any, spec: Edge, seq_dim: int, name: str) -> Any:
    """``x`` through the Comm function at an edge of submodule ``name``:
    (forward, backward, axis; None: the sequence axis)."""
    fwd, bwd, axis = spec
    return _function().apply(x, group, fwd, bwd, seq_dim if axis is None else axis, name)


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

