"""engine.deepspeed's checkpoints of a model with MoE layers (engine.moe)
at ZeRO 0, 1 and 2: the one whole file of engine.ds_checkpoint, the model
under the names of one process holding every expert.

A rank holds ``num_experts / ep_size`` experts of each layer, local
expert ``i`` on place ``j`` of its expert-parallel group being expert
``j * num_local + i`` of the whole layer. ``whole_state`` gathers, to
rank 0 (one ``gather_object`` over the world), the module's entries under
those whole names (``moe.experts.5.weight``) from the ranks of rank 0's
expert-parallel group (as torch.save's bytes: object collectives carry
msgpack values), and the optimizer's state by whole name (a ZeRO 1 or 2
part consolidated on its group's rank 0 first, as engine.ds_checkpoint
does without MoE: those ranks are rank 0's expert-parallel group's), each
parameter group's hyperparameters in the given order. Keyed by name, not
by torch's index: the index order of an expert group depends on how many
experts a rank holds. ``load_whole`` takes each rank's own experts out of
it, so the file loads at any ep_size dividing the layer's experts and any
number of ranks (``load_state_dict`` of an ep_size 1 model takes the
module's entries as they are).
"""
from __future__ import annotations

import io
from typing import Any

import torch

import collectives

from .moe import MoE

__all__ = ["layers", "whole_name", "whole_state", "load_whole"]


def layers(model: Any) -> list[tuple[str, Any, int]]:
    """Each MoE layer of ``model``: (its name prefix, the layer, this rank's
    place in its expert-parallel group). Makes the groups (no message)."""
    out = []
    for pre, m in model.named_modules():
        if isinstance(m, MoE):
            out.append((f"{pre}." if pre else "", m, m._group().rank))
    return out


def whole_name(name: str, lay: list[tuple[str, Any, int]]) -> str:
    """A parameter's or buffer's name in the one-process model holding
    every expert (local expert i of place j: expert j * num_local + i)."""
    for pre, m, j in lay:
        head = f"{pre}experts."
        if name.startswith(head):
            i, _, rest = name[len(head):].partition(".")
            return f"{head}{j * m.num_local_experts + int(i)}.{rest}"
    return name


def _written_here(name: str, lay: list[tuple[str, Any, int]], rank: int) -> bool:
    """Whether this rank sends ``name``'s entries to rank 0: an expert's
    from rank 0's expert-parallel group, the others' from rank 0."""
    for pre, m, _ in lay:
        if name.startswith(f"{pre}experts."):
            return 0 in m.ep_group.ranks
    return rank == 0


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def _parts(opt: Any) -> list[Any]:
    """The torch optimizers under ``opt`` (engine.moe_zero's parts at ZeRO 1 and 2)."""
    return list(getattr(opt, "parts", [opt]))


def whole_state(eng: Any, optimizer: bool = True
                ) -> tuple[dict[str, Any], Any, dict[str, Any]] | None:
    """(module, optimizer, layout) of the whole model on rank 0, None on the
    others (``optimizer`` False: None for it). Collective over the world."""
    lay = layers(eng.module)
    rank = eng.global_rank
    module = {whole_name(k, lay): v.detach().clone()
              for k, v in eng.module.state_dict().items() if _written_here(k, lay, rank)}
    names = {id(p): n for n, p in eng.module.named_parameters()}
    opt = eng.optimizer if optimizer else None
    state: dict[str, Any] = {}
    groups: list[list[str]] = []
    if opt is not None:
        for o in _parts(opt):
            if hasattr(o, "consolidate_state_dict"):     # (ZeRO 1, 2: its group's rank 0)
                o.consolidate_state_dict(0)
                if o.group.rank != 0:
                    continue
            flat = [p for g in o.param_groups for p in g["params"]]
            for i, st in o.state_dict()["state"].items():
                n = names[id(flat[i])]
                if _written_here(n, lay, rank):
                    state[whole_name(n, lay)] = st
        groups = [[whole_name(names[id(p)], lay) for p in g["params"]
                   if _written_here(names[id(p)], lay, rank)] for g in opt.param_groups]
    # (object collectives carry msgpack values: the tensors as torch.save's bytes)
    buf = io.BytesIO()
    torch.save((module, state, groups), buf)
    sent = collectives.gather_object(eng.world, buf.getvalue(), root=0)
    if rank != 0:
        return None
    pieces = [torch.load(io.BytesIO(b), weights_only=True) for b in sent]
    layout = {pre.rstrip("."): {"num_experts": m.num_experts, "ep_size": m.ep_size}
              for pre, m, _ in lay}
    whole_module: dict[str, Any] = {}
    whole_opt: dict[str, Any] = {"state": {}, "param_groups": [], "by_name": True}
    for mod, st, _ in pieces:
        whole_module.update(mod)
        whole_opt["state"].update(st)
    if opt is None:
        return whole_module, None, layout
    for i, g in enumerate(opt.param_groups):
        held = [n for _, _, grps in pieces for n in grps[i]]
        whole_opt["param_groups"].append({**_hyper(g), "params": list(dict.fromkeys(held))})
    return whole_module, whole_opt, layout


def _layouts(saved: dict[str, Any], lay: list[tuple[str, Any, int]]) -> str:
    now = {pre.rstrip("."): {"num_experts": m.num_experts, "ep_size": m.ep_size}
           for pre, m, _ in lay}
    return f"saved {saved}, this model's {now}"


def load_whole(eng: Any, ck: dict[str, Any], strict: bool, optimizer_states: bool,
               module_only: bool) -> None:
    """This rank's part of a whole checkpoint (its own experts, and its
    share of the optimizer's state): no message."""
    lay = layers(eng.module)
    rank = eng.global_rank
    saved = ck.get("moe_layout", {})
    whole = ck["module"]
    if saved and {k: v["num_experts"] for k, v in saved.items()} != \
            {pre.rstrip("."): m.num_experts for pre, m, _ in lay}:
        raise ValueError(f"rank {rank}: load_checkpoint: the MoE layers' experts differ "
                         f"({_layouts(saved, lay)}); another ep_size is taken, not another "
                         f"num_experts")
    own = {k: whole_name(k, lay) for k in eng.module.state_dict()}
    missing = [w for w in own.values() if w not in whole]
    if missing and strict:
        raise RuntimeError(f"rank {rank}: load_checkpoint: the checkpoint lacks {missing[:4]} "
                           f"of this model with MoE layers ({_layouts(saved, lay)})")
    eng.module.load_state_dict({k: whole[w] for k, w in own.items() if w in whole},
                               strict=strict)
    opt = eng.optimizer
    given = ck.get("optimizer")
    if module_only or not optimizer_states or opt is None or not given:
        return
    if not given.get("by_name"):
        raise ValueError(f"rank {rank}: load_checkpoint: its optimizer state is by index "
                         f"(saved without MoE layers); this model has MoE layers "
                         f"({_layouts(saved, lay)})")
    if len(given["param_groups"]) != len(opt.param_groups):
        raise ValueError(f"rank {rank}: load_checkpoint: {len(given['param_groups'])} "
                         f"optimizer param groups saved, this optimizer has "
                         f"{len(opt.param_groups)} ({_layouts(saved, lay)})")
    for g, s in zip(opt.param_groups, given["param_groups"]):
        g.update(_hyper(s))
    names = {id(p): whole_name(n, lay) for n, p in eng.module.named_parameters()}
    for o in _parts(opt):
        flat = [p for g in o.param_groups for p in g["params"]]
        sd: dict[str, Any] = {"state": {}, "param_groups": []}
        for i, p in enumerate(flat):
            if names[id(p)] in given["state"]:
                sd["state"][i] = given["state"][names[id(p)]]
        j = 0
        for g in o.param_groups:
            sd["param_groups"].append({**_hyper(g), "params": list(range(j, j + len(g["params"])))})
            j += len(g["params"])
        kept = o.param_groups
        o.load_state_dict(sd)
        if o.param_groups is not kept:      # (torch's makes new dicts: keep the shared ones)
            for a, b in zip(kept, o.param_groups):
                a.update(b)
            o.param_groups = kept
