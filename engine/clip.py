"""Global gradient-norm clipping over a pipeline's stages, tp shards and dp
replicas, as Megatron's ``clip_grad_norm`` (``Pipeline.clip_grad_norm_``).

The norm is the one-process model's: each parameter counted once. A rank
adds up the p-th powers of the gradients it alone stands for (float64):

* every tensor-parallel shard (sharded parameters: a colwise, rowwise or
  vocab weight) on every tp rank, whose parts make the whole; a parameter
  whole on every tp rank (a norm's, a rowwise bias, anything unplanned)
  only on tp rank 0;
* a tied parameter's first copy only (``Tie.stages[0]``): the others hold
  the same sum after the step;
* on dp replica 0 only: the replicas' gradients are averaged already, so
  equal. Under ZeRO stage 2 (engine.zero_grads) a gradient one replica
  keeps is counted there, and a small sum over dp gives replica 0 every
  part exactly as it would have had it (``_owned_parts``).

One all-gather of four float64 over the whole grid (each rank's sum, its
norm_type, its max_norm and whether they were valid: every rank sums them
in rank order, or takes the largest for the infinity norm, and raises
where any rank was given others) makes the total, the same on every
rank, and every
gradient on every rank is scaled by ``max_norm / (total + 1e-6)`` when that
is under 1 (torch's ``clip_grad_norm_``), copies of tied and replicated
parameters alike, so they stay equal. Torch models get the norm as torch's
``clip_grad_norm_`` returns it (``_as_torch``), a 0-d tensor, so code written
for torch runs unchanged; numpy models a float.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

import collectives
from mesh.tensors import is_tensor

from .layers import Recompute, Sequential
from .tp_layers import Sharded

__all__ = ["clip_grad_norm", "clip_grad_norm_", "sharded_flags"]


def _as_torch(total: float, params: list[Any]) -> Any:
    """``total`` as torch's ``clip_grad_norm_`` returns its norm: a 0-d
    tensor in the gradients' dtype (promoted where they differ: float32 for
    float32 and bfloat16 ones) on the first one's device, float32 on the
    CPU where this rank has none (torch's of no parameters). A float, as
    returned before, broke code written for torch (``norm.item()``,
    ``torch.isfinite(norm)``)."""
    import torch
    dtypes = {p.dtype for p in params}
    dtype = functools.reduce(torch.promote_types, dtypes) if dtypes else torch.float32
    return torch.tensor(total, dtype=dtype, device=params[0].device if params else "cpu")


def sharded_flags(stage: Any) -> list[bool]:
    """For each of ``stage.grads()``, whether its parameter is a tensor-
    parallel shard (a part of it on each tp rank) rather than whole."""
    module = getattr(stage, "module", None)
    if module is not None and hasattr(module, "named_modules"):       # a TorchStage
        return _module_flags(module)
    return _layer_flags(stage)


def _module_flags(module: Any) -> list[bool]:
    """``sharded_flags`` of a torch module's parameters that take gradients."""
    cut = {id(getattr(sub, name)) for _, sub in module.named_modules()
           if getattr(sub, "_tp", None) is not None for name in sub._tp.dims}
    return [id(p) in cut for p in module.parameters() if p.requires_grad]


def _layer_flags(layer: Any) -> list[bool]:
    """``sharded_flags`` of an engine.layers layer or Sequential, in the
    order of its ``grads()`` (engine.tp_layers.load_full_params' walk)."""
    if isinstance(layer, Recompute):
        return _layer_flags(layer.inner)
    if isinstance(layer, Sharded) and isinstance(layer.inner, Sequential):
        return _layer_flags(layer.inner)        # a region: its layers say
    if isinstance(layer, Sequential):
        return [f for sub in layer.layers for f in _layer_flags(sub)]
    if isinstance(layer, Sharded):
        return [d is not None for d in layer.dims]
    grads = getattr(layer, "grads", None)
    return [False] * len(grads()) if callable(grads) else []


def _power_sum(g: Any, p: float) -> float:
    """sum |g|^p in float64 (the largest |g| for p = inf) of an array or a
    tensor."""
    if is_tensor(g):
        v = g.detach().reshape(-1).double()
        if v.numel() == 0:
            return 0.0
        if math.isinf(p):
            return float(v.abs().max())
        return float(v.dot(v)) if p == 2 else float(v.abs().pow(p).sum())
    if g.size == 0:
        return 0.0
    xp = np if isinstance(g, np.ndarray) else _module(g)
    v = g.reshape(-1).astype(np.float64)
    if math.isinf(p):
        return float(xp.abs(v).max())
    return float(xp.dot(v, v)) if p == 2 else float((xp.abs(v) ** p).sum())


def _module(a: Any) -> Any:
    import importlib
    return importlib.import_module(type(a).__module__.split(".")[0])


def clip_grad_norm(pipe: Any, max_norm: float, norm_type: float = 2.0,
                   error_if_nonfinite: bool = False) -> Any:
    """Clip ``pipe``'s gradients (an engine.Pipeline, after its step) to a
    total norm of ``max_norm``; return the total norm before clipping, the
    same on every rank: a 0-d tensor where this rank's stages are torch's
    (``_as_torch``), else a float. Collective: every rank of the pipeline
    calls it."""
    where = f"rank {pipe.whole.rank} (pp rank {pipe.rank})"
    fault: BaseException | None = None
    try:        # this rank's own arguments: told to every rank in the gather below
        p, most = float(norm_type), float(max_norm)
        if not (p > 0 or math.isinf(p)) or math.isnan(p):
            raise ValueError(f"{where}: clip_grad_norm_(norm_type={norm_type!r}): a norm of "
                             "order above 0, or inf")
    except (TypeError, ValueError) as e:
        fault, p, most = e, 2.0, 0.0
    skip = {(s, i) for tie, members, _, _ in pipe.tied.ties for s, i in members
            if s != tie.stages[0]}
    whole_too = pipe.tp is None or pipe.tp_index == 0
    if pipe.owned and pipe.dp is not None:  # ZeRO stage 2: counted where kept
        parts, fault = _owned_parts(pipe, skip, whole_too, p, fault)
    else:
        mine = [] if pipe.dp_index or fault is not None else [
            g for s, stage in sorted(pipe.stages.items())
            for i, (g, cut) in enumerate(zip(stage.grads(), sharded_flags(stage)))
            if (s, i) not in skip and (cut or whole_too)]
        parts, fault = _parts(mine, p, fault)
    norm = _agreed_norm(pipe.whole, parts, p, most, fault, where, "rank", pipe.timeout,
                        norm_type, error_if_nonfinite)
    coef = most / (norm + 1e-6)
    if coef < 1.0:
        for s in pipe.stages:
            for g in pipe.owned.kept(s):
                if g is not None:       # (freed: another replica keeps it, and scales it)
                    g *= coef
    torch_stages = [st for st in pipe.stages.values() if hasattr(st, "grad_params")]
    if not torch_stages:
        return norm
    return _as_torch(norm, [p for st in torch_stages for p in st.grad_params()])


def _owned_parts(pipe: Any, skip: set[tuple[int, int]], whole_too: bool, p: float,
                 fault: BaseException | None) -> tuple[list[float], BaseException | None]:
    """``_parts`` of what dp replica 0 would count without ZeRO stage 2 (as
    ``clip_grad_norm`` lists them), under it: each gradient's on the replica
    that keeps it (its owner; replica 0 for one every replica keeps), 0 on
    the others, then a sum (the largest for the infinity norm) over dp,
    which adds each to zeros only: replica 0 gets every gradient's part
    exactly as it would have computed it, and sums them alike, so the norm
    is the same bit for bit. Every replica joins that sum, even one whose
    own part failed (its zeros; the fault is told after, by _agreed_norm)."""
    me = pipe.dp_index
    held: list[Any] = []
    for s, stage in sorted(pipe.stages.items()):
        kept = pipe.owned.kept(s)
        for i, (r, cut) in enumerate(zip(pipe.owned.owners(s), sharded_flags(stage))):
            if (s, i) not in skip and (cut or whole_too):
                held.append(kept[i] if (me == 0 if r is None else r == me) else None)
    parts, fault = _parts([g for g in held if g is not None] if fault is None else [], p,
                          fault)
    told = np.zeros(len(held), dtype=np.float64)
    if fault is None:
        told[[j for j, g in enumerate(held) if g is not None]] = parts
    collectives.all_reduce(pipe.dp, told, op="max" if math.isinf(p) else "sum",
                           timeout=pipe.timeout)
    return ([float(v) for v in told] if me == 0 and fault is None else []), fault


def clip_grad_norm_(model: Any, max_norm: float, group: Any, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> Any:
    """torch's ``clip_grad_norm_`` for a model that ``engine.parallelize``
    sharded over ``group`` (a training loop of one's own, no Pipeline):
    Megatron's ``clip_grad_norm`` over a tp group. torch's own, called on
    each rank's module, takes the norm of that rank's shards and whole
    parameters alone, which differs across the ranks (so replicated weights
    drift apart once it clips). Here the norm is the one-process model's:
    each shard counted on its rank, each whole parameter (a norm's, a
    rowwise bias, anything unplanned: equal on every tp rank) once; one
    small all-gather over ``group``; every gradient scaled by the same
    ``max_norm / (norm + 1e-6)`` when that is under 1. Returns the norm,
    the same on every rank: as torch's returns it for a torch module (a
    0-d tensor, ``_as_torch``; ``foreach`` is taken as torch takes it, its
    way of computing changing nothing here), a float for an engine.layers
    model. Collective over ``group``; with data parallelism
    too, call it once gradients are averaged over dp (the norm is then the
    same on every replica). Ranks given other ``max_norm`` or
    ``norm_type`` all raise ValueError naming them."""
    where = f"tp rank {group.rank}: clip_grad_norm_ on group {group.name}"
    fault: BaseException | None = None
    try:
        p, most = float(norm_type), float(max_norm)
        if not (p > 0 or math.isinf(p)) or math.isnan(p):
            raise ValueError("a norm of order above 0, or inf")
    except (TypeError, ValueError) as e:
        fault = ValueError(f"{where}: norm_type={norm_type!r}, max_norm={max_norm!r}: {e}")
        p, most = 2.0, 0.0
    if hasattr(model, "named_modules") and hasattr(model, "parameters"):      # torch
        grads = [q.grad for q in model.parameters() if q.requires_grad]
        flags = _module_flags(model)
    else:
        grads, flags = list(model.grads()), _layer_flags(model)
    mine = [] if fault is not None else [
        g for g, cut in zip(grads, flags) if g is not None and (cut or group.rank == 0)]
    parts, fault = _parts(mine, p, fault)
    total = _agreed_norm(group, parts, p, most, fault, f"tp rank {group.rank}", "tp rank",
                         None, norm_type, error_if_nonfinite)
    coef = most / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            if g is not None:
                g *= coef
    if hasattr(model, "named_modules") and hasattr(model, "parameters"):
        return _as_torch(total, [q for q in model.parameters() if q.grad is not None])
    return total


def _parts(grads: list[Any], p: float, fault: BaseException | None
           ) -> tuple[list[float], BaseException | None]:
    """Each gradient's ``_power_sum``, and the fault: this rank's error
    in them (a MemoryError of a float64 copy, a KeyboardInterrupt) too,
    raised after the gather that tells every rank (alone, it raised before
    it, and the others waited there for this rank until their timeout)."""
    try:
        return [_power_sum(g, p) for g in grads], fault
    except BaseException as e:
        e.clip_own = True   # type: ignore[attr-defined]  # (not an argument: _agreed_norm)
        return [], e


def _agreed_norm(group: Any, parts: list[float], p: float, most: float,
                 fault: BaseException | None, where: str, word: str, timeout: float | None,
                 norm_type: Any, error_if_nonfinite: bool) -> float:
    """The total norm of order ``p`` over ``group`` from each rank's
    ``parts`` (p-th powers, or largest entries for p = inf): one all-gather
    of each rank's part, norm_type and max_norm, summed (or the largest
    taken) alike in rank order, so that every rank sees a rank given other
    arguments (alone, it clipped by another norm, or waited for the rest
    until its timeout), or one whose own were not valid (``fault``, raised
    here on that rank). ``word``: what the group's ranks are called."""
    told = collectives.all_gather(group, np.array(
        [(max(parts) if parts else 0.0) if math.isinf(p) else sum(parts), p, most,
         0 if fault is None else 2 if getattr(fault, "clip_own", False) else 1],
        dtype=np.float64), timeout=timeout)
    if fault is not None:
        raise fault
    failed = [r for r in range(len(told)) if told[r, 3]]
    if failed:
        why = ("their norm_type or max_norm is not valid" if all(told[r, 3] == 1 for r in failed)
               else "their gradients' norm raised there")
        raise ValueError(f"{where}: clip_grad_norm_ failed on {word}(s) {failed} of group "
                         f"{group.name}: {why} (see their error)")
    # (by repr: a nan given on every rank is the same argument, though nan != nan)
    alike = [(repr(float(t[1])), repr(float(t[2]))) for t in told]
    given = {g: [r for r, a in enumerate(alike) if a == g] for g in alike}
    if len(given) > 1:
        said = "; ".join(f"{word}s {rs}: norm_type {float(g[0]):g}, max_norm {float(g[1]):g}"
                         for g, rs in given.items())
        raise ValueError(f"{where}: clip_grad_norm_ was given other arguments on other {word}s "
                         f"({said}): every rank passes the same norm_type and max_norm")
    total = float(told[:, 0].max()) if math.isinf(p) else float(told[:, 0].sum()) ** (1.0 / p)
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(f"{where}: the total norm of order {norm_type} of the gradients "
                           f"is {total}: clip_grad_norm_(error_if_nonfinite=True)")
    return total
