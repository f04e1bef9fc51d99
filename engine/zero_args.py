"""ZeroRedundancyOptimizer's arguments (engine.zero): the process group
(a job or its mesh dp group), ``stage`` and stage 3's knobs checked, then
compared across the dp replicas in one all-gather (``_agreed``), so every
replica raises at once, naming the rank that passed something else.
Parameters' shapes here are whole ones, also where stage 3 keeps a
parameter's values on another replica (``_shape``).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import collectives
from mesh import Comm

def _dp_of(process_group: Any) -> tuple[Comm, float | None]:
    """The dp group and timeout of a Job, or a mesh group as it is."""
    grid = getattr(process_group, "grid", None)
    if grid is not None:
        if "dp" not in grid.axes:
            raise ValueError("ZeroRedundancyOptimizer: the job's grid has no dp axis, so "
                             "there is nothing to shard the optimizer's state over")
        return grid.group("dp"), getattr(process_group, "_timeout", None)
    if not hasattr(process_group, "ranks") or not hasattr(process_group, "size"):
        raise TypeError(f"ZeroRedundancyOptimizer: process_group is a job "
                        f"(engine.distribute's) or its mesh dp group "
                        f"(job.grid.group('dp')), not a {type(process_group).__name__}")
    return process_group, None


def _stage_checked(stage: Any, job: Any, g: Comm, where: str) -> None:
    """Raise ValueError unless ``stage`` is 1, or 2 or 3 over a torch job."""
    if isinstance(stage, bool) or stage not in (1, 2, 3):
        raise ValueError(f"{where}: stage={stage!r}: 1 (each replica keeps its share's "
                         f"optimizer state), 2 (its share's gradients too) or 3 (its share's "
                         f"parameters too)")
    if stage in (2, 3) and job is None:
        raise ValueError(f"{where}: stage={stage} needs process_group=job (engine."
                         f"distribute's), not the mesh group {g.name}: the job's step reduces "
                         f"each gradient to the replica that owns it and frees it on the "
                         f"others, so the job must know the shares (stage=1 takes a mesh group)")
    if stage == 3 and not getattr(job, "is_torch", False):
        raise ValueError(f"{where}: stage=3 shards a torch model's parameters; this job's "
                         f"stages are engine.layers' (numpy)")


_KNOBS = {      # stage 3's element counts, as DeepSpeed's config names them
    "stage3_prefetch_bucket_size": "the elements gathered ahead of the module running and not "
                                   "yet used, at most (0: none ahead; else the next module's "
                                   "gathered ahead whatever its size)",
    "stage3_param_persistence_threshold": "a parameter of at most this many elements kept "
                                          "whole on every replica (0: none)",
    "stage3_max_live_parameters": "the gathered elements live at once outside the module "
                                  "running, at most"}


def _elements(where: str, name: str, v: Any) -> int:
    """``v`` as an element count: an int >= 0, or a float that is one (DeepSpeed's
    JSON ``5e7``); else TypeError or ValueError naming ``name`` and what it means."""
    said = f"{where}: {name}={v!r}: {_KNOBS[name]}; an int >= 0"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(said)
    if isinstance(v, float) and not v.is_integer():
        raise ValueError(said)
    if v < 0:
        raise ValueError(said)
    return int(v)


def _shape(job: Any, p: Any) -> tuple[int, ...]:
    """``p``'s shape, whole where the job keeps it on another replica
    (ZeRO stage 3: empty here between steps)."""
    kept = getattr(getattr(job, "pipeline", None), "owned_params", None)
    return tuple(p.shape) if kept is None else kept.shape_of(p)


def _numel(job: Any, p: Any) -> int:
    return math.prod(_shape(job, p))


def _in_job(whole: Any, job: Any, where: str, stage: int) -> None:
    """Raise ValueError where ``whole`` (the optimizer over every
    parameter) holds a tensor that is not one of ``job``'s parameters."""
    known = {id(p) for p in job.parameters()}
    stray = next((p for grp in whole.param_groups for p in grp["params"]
                  if id(p) not in known), None)
    if stray is not None:
        raise ValueError(f"{where}: stage={stage}: the optimizer holds a {tuple(stray.shape)} "
                         f"tensor that is not in job.parameters(): the job reduces its own "
                         f"parameters' gradients only (make it of job.parameters() or "
                         f"job.named_parameters())")



def _agreed(g: Comm, where: str, job: Any, timeout: float | None, params: Iterable[Any],
            optimizer_class: type, stage: Any, stage3_per_layer: Any, stage3_prefetch: Any,
            knobs_given: tuple[Any, Any, Any], defaults: dict[str, Any]
            ) -> tuple[Any, list[Any], list[Any]]:
    """Check this replica's arguments, then compare them with the other
    replicas' (collective over ``g``: one all-gather, also where they are
    bad here). Returns the optimizer over every parameter (``whole``: its
    groups, defaults filled), the knobs (``stage3_per_layer``,
    ``stage3_prefetch``, then ``_KNOBS``' as ints) and every replica's
    parameters (dtypes and whole shapes, in order), to compare once the
    optimizer is made. Raises this rank's own TypeError or ValueError, or a
    ValueError naming the rank that could not make it or passed another
    stage (stage 3: other knobs)."""
    fault: Exception | None = None
    try:
        _stage_checked(stage, job, g, where)
        whole = optimizer_class(params, **defaults)    # (its groups, defaults filled)
        if stage in (2, 3):
            _in_job(whole, job, where, stage)
        if not isinstance(stage3_per_layer, bool):
            raise TypeError(f"{where}: stage3_per_layer={stage3_per_layer!r}: True "
                            f"(a step gathers each module's parameters as it runs) or "
                            f"False (a stage's whole weights for the step)")
        ahead = f"{where}: stage3_prefetch={stage3_prefetch!r}: the modules " \
                f"gathered ahead of the one running, an int >= 0 (0: none)"
        if isinstance(stage3_prefetch, bool) or not isinstance(stage3_prefetch, int):
            raise TypeError(ahead)
        if stage3_prefetch < 0:
            raise ValueError(ahead)
        knobs = [stage3_per_layer, stage3_prefetch] + [
            _elements(where, k, v) for k, v in zip(_KNOBS, knobs_given)]
        said: Any = [stage, [[str(p.dtype), list(_shape(job, p))]
                             for grp in whole.param_groups for p in grp["params"]], knobs]
    except (TypeError, ValueError) as e:    # (an empty list: every replica hears of it)
        fault, said = e, f"{type(e).__name__}: {e}"
    told = collectives.all_gather_object(g, said, timeout=timeout)
    if fault is not None:
        raise fault
    bad = next((r for r, t in enumerate(told) if isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"{where}: not made, rank {g.ranks[bad]} could not: {told[bad]}")
    other = next((r for r, t in enumerate(told) if t[0] != stage), None)
    if other is not None:
        raise ValueError(f"{where}: stage={stage} here but stage={told[other][0]} on "
                         f"rank {g.ranks[other]}: every replica passes the same")
    other = next((r for r, t in enumerate(told) if t[2] != knobs), None)
    if stage == 3 and other is not None:
        k = next(k for k, (a, b) in enumerate(zip(knobs, told[other][2])) if a != b)
        name = ["stage3_per_layer", "stage3_prefetch", *_KNOBS][k]
        raise ValueError(f"{where}: {name}={knobs[k]} here but {told[other][2][k]} on "
                         f"rank {g.ranks[other]}: every replica passes the same (the "
                         f"gathers pair up)")
    return whole, knobs, [t[1] for t in told]
