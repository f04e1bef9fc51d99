"""What ``engine.distribute`` is given, checked: the model's layers (a
torch ``nn.Sequential``, a traced module, a list, an ``engine.layers``
model), the same model on every rank (their fingerprints compared), the
sample agreed, ``balance`` and ``recompute`` valid, and the grid's axes.
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Callable, Sequence

import numpy as np

import collectives
from mesh import Comm, Grid
from mesh.tensors import is_tensor

from . import layers as _layers
from .agree import DistributeFailed, _raised
from .choose import whole_counts
from .executor import check_grid
from .pipeline_args import _retold, rows_of
from .tensor_parallel import tensor_bytes
from .traced import called_whole, traceable
from .torch_stage import checkpoint_modules
from .tp_layers import sharded_layers
from .tp_plan import digest, named_by
from .user_schedules import made_agreed


_AXES = ("dp", "sp", "pp", "tp")


def _is_torch(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _model_layers(model: Any) -> tuple[list[tuple[str, Any]], bool]:
    """The model's layers in order, each with its name in the model ("" for
    the pieces of a traced model, whose keys are the model's own), and
    whether they are torch modules."""
    if _is_torch(model):
        if traceable(model):
            raise TypeError(f"trace a {type(model).__name__} with engine.sequential first")
        if getattr(model, "traced_from", None):
            return [("", m) for m in model], True
        # (not named_children(), which names a module held twice once: a layer
        # called in two places, ALBERT's shared block, was left out of the pipeline)
        return [(n, m) for n, m in model._modules.items() if m is not None], True
    if isinstance(model, _layers.Sequential):
        return [(str(i), layer) for i, layer in enumerate(model.layers)], False
    if isinstance(model, (list, tuple)):
        items = list(model)
        for i, m in enumerate(items):   # (a spec, a function: engine.partition's, not built)
            if not _is_torch(m) and (isinstance(m, type) or not callable(
                    getattr(m, "forward", None)) or not callable(getattr(m, "backward", None))):
                what = (f"the class {m.__name__}" if isinstance(m, type) else
                        f"a {type(m).__name__}" + (f" ({m.__name__})" if hasattr(m, "__name__")
                                                   else ""))
                raise TypeError(
                    f"layer {i} of the list is {what}, not a layer: engine.distribute takes "
                    "built layers, torch modules (an nn.Sequential) or engine.layers ones. "
                    "Build specs first (nn.Sequential(*(spec() for spec in specs)), under "
                    "`with torch.device('meta'):` for a model too large: each rank then makes "
                    "its own stages real), or cut them with engine.partition(specs, n, "
                    "stages=...) into an engine.Pipeline; a function: an nn.Module around it")
        is_torch = bool(items) and all(_is_torch(m) for m in items)
        return [(str(i), m) for i, m in enumerate(items)], is_torch
    raise TypeError(f"engine.distribute takes an nn.Sequential, an engine.layers.Sequential "
                    f"or a list of layers, not a {type(model).__name__}")


def _fingerprint(layer: Any, is_torch: bool) -> tuple[str, str | None]:
    """A layer's make (its type, its tensors' names, shapes and dtypes) and
    a hash of its values (None on the meta device, which holds none)."""
    if is_torch:
        torch = sys.modules["torch"]
        state = layer.state_dict()
        make = ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
                         for k, v in state.items())
        if any(v.is_meta for v in state.values()):
            return f"{type(layer).__name__}({make})", None
        return f"{type(layer).__name__}({make})", digest(tensor_bytes(torch, v)
                                                          for v in state.values())
    params = getattr(layer, "params", None)
    arrays = [np.ascontiguousarray(a) for a in params()] if callable(params) else []
    make = ", ".join(f"{a.shape} {a.dtype}" for a in arrays)
    return f"{type(layer).__name__}({make})", digest(a.tobytes() for a in arrays)


_HELD = "_engine_held"
"""A model object's attribute, set by engine.distribute on each rank: its
layer count and the layers this rank's stages took, in its last job."""


def _holder(model: Any) -> Any:
    """Where a model's ``_HELD`` mark is: the model object, a list's first layer."""
    return (model[0] if model else None) if isinstance(model, (list, tuple)) else model


def _held_before(model: Any, n: int) -> tuple[int, ...] | None:
    """The layers this rank's stages took in the last engine.distribute of
    this model object (of ``n`` layers then too), or None."""
    mark = getattr(_holder(model), "__dict__", {}).get(_HELD)
    return tuple(mark[1]) if mark is not None and mark[0] == n else None


def _mark_held(model: Any, n: int, held: Sequence[int], who: str = "") -> None:
    """Note on the model object (a list's first layer) the layers this
    rank's stages took (``_held_before``); where they are some of the
    ``n`` only (pp > 1) and the model is a torch module, its forward
    refuses to run (``_PART``), and a job holding them all (pp = 1, every
    stage on this rank) lets it run again. ``who``: this rank, as the
    refusal names it."""
    if hasattr(_holder(model), "__dict__"):
        _holder(model).__dict__[_HELD] = (n, tuple(held))
    if not _is_torch(model):        # (a list has no forward; engine.layers' run no hooks)
        return
    if len(set(held)) == n:
        _made_whole(model)
        return
    took = ", ".join(f"{i}" if i == j else f"{i}-{j}" for i, j in _spans(sorted(set(held))))
    model.__dict__[_PART] = (
        f"{who}: this model object was cut into pipeline stages by engine.distribute, and "
        f"this rank's copy holds its own stages' training only (its layers {took} of "
        f"{n}; the others keep the values they had then, or none on the meta "
        "device): its forward would return a wrong value. Evaluate through the job: "
        "job.eval_step(x, y, outputs=True) on every rank (the outputs on the last stage; y "
        "None: no loss); or load the trained weights into a fresh copy of the model "
        "(copy.deepcopy(model) before distribute, or the model built again): "
        "fresh.load_state_dict(state), state being job.state_dict() (called on every rank, "
        "whole on rank 0: collectives.broadcast_state sends it), which loaded into this "
        "object itself (where no plan= sharded it) lets its forward run again")
    if _refuse_part not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_refuse_part)
    if _loaded_whole not in model._load_state_dict_post_hooks.values():
        model.register_load_state_dict_post_hook(_loaded_whole)


_PART = "_engine_part"
"""A torch model object's attribute, set by engine.distribute where this
rank's stages took some of its layers only (``_mark_held``): what its
forward says as it refuses to run. Each rank's copy then holds its own
stages' training only (the others' layers untrained, untied copies of a
tied weight, meta tensors), and ``model.eval(); model(x)`` returned a
wrong value on every rank without a word. The engine never calls the
model object itself (its stages call its modules; torch.fx traces its
forward unhooked), so the hook stops the user's calls only."""


def _spans(held: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted layer indices as runs of consecutive ones, (first, last)."""
    spans: list[tuple[int, int]] = []
    for i in held:
        if spans and spans[-1][1] == i - 1:
            spans[-1] = (spans[-1][0], i)
        else:
            spans.append((i, i))
    return spans


def _refuse_part(module: Any, args: Any) -> None:
    """The forward pre-hook of a model object cut over pp ranks (``_PART``)."""
    said = module.__dict__.get(_PART)
    if said is not None:
        raise RuntimeError(said)


def _loaded_whole(module: Any, incompatible: Any) -> None:
    """The load_state_dict post-hook of a model object cut over pp ranks:
    a state loaded with every key (real tensors, not onto the meta device)
    makes it whole again, so its forward runs (as ``model.load_state_dict(
    state)``, ``state`` job.state_dict()'s, lets a later distribute of it
    through ``_same_model``'s check too)."""
    if not incompatible.missing_keys and not any(
            t.is_meta for t in module.state_dict().values()):
        _made_whole(module)


def _made_whole(model: Any) -> None:
    """Take ``_PART`` and its hooks off a torch model object."""
    model.__dict__.pop(_PART, None)
    for hooks, hook in ((model._forward_pre_hooks, _refuse_part),
                        (model._load_state_dict_post_hooks, _loaded_whole)):
        for key in [k for k, h in hooks.items() if h is hook]:
            del hooks[key]


def _not_sharded(model: Any) -> None:
    """Refuse a model whose layers a tensor-parallel plan sharded already
    (engine.parallelize, in place: an earlier engine.distribute's plan):
    each rank holds its own part of them, which distribute cannot cut
    again (it refused them as a model that differs across the ranks)."""
    if _is_torch(model):
        cut = [n or type(model).__name__ for n, m in model.named_modules() if hasattr(m, "_tp")]
    elif isinstance(model, _layers.Sequential):
        cut = [str(i) for i, layer in enumerate(model.layers) if sharded_layers(layer)]
    elif isinstance(model, (list, tuple)):
        cut = [f"{i}.{n}" if n else str(i) for i, m in enumerate(model)
               for n, sub in (m.named_modules() if _is_torch(m) else [("", m)])
               if hasattr(sub, "_tp") or (not _is_torch(m) and sharded_layers(m))]
    else:
        return
    if cut:
        raise ValueError(
            f"the model's {', '.join(repr(n) for n in cut[:4])}{' ...' if len(cut) > 4 else ''}"
            " are tensor-parallel shards already: engine.parallelize cut them in place (a "
            "plan= of an earlier engine.distribute of this model object), and each rank holds "
            "its own part; distribute shards the whole model itself: give it a fresh copy "
            "(copy.deepcopy(model) before the first distribute, or the model built again; "
            "a trained job's weights: new_job.load_state_dict(state), state being "
            "job.state_dict())")


def _takes_two(loss_fn: Callable[..., Any]) -> None:
    """Raise unless ``loss_fn`` can be called as ``loss_fn(output, target)``
    (where Python can tell: a builtin may not say)."""
    try:
        sig = inspect.signature(loss_fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(None, None)
    except TypeError as e:
        raise ValueError(f"loss_fn={getattr(loss_fn, '__name__', loss_fn)!r} is called as "
                         f"loss_fn(output, target), but it takes {sig}: {e}") from None


def _cut(text: str, most: int = 300) -> str:
    return text if len(text) <= most else text[:most - 3] + "..."


def _same_model(grid: Grid, named: list[tuple[str, Any]], is_torch: bool,
                fault: BaseException | None = None, timeout: float | None = None,
                held: Sequence[int] | None = None, listed: Sequence[str] | None = None,
                made: Sequence[Sequence[str]] | None = None,
                knobs: dict[str, str] | None = None) -> None:
    """Raise on every rank, before anything is measured or cut, unless every
    rank built the same model: as many layers, each of the same make; and,
    within each dp replica (whose pp and tp ranks cut their stages and
    shards from their own copies), the same values. Replicas over dp may
    differ: they start from replica 0's weights. ``fault``: what is wrong
    with this rank's own arguments (a missing loss_fn, an unknown
    schedule...): raised here, and by every other rank naming it (alone,
    the others waited for this rank in their next collective). An error
    as this rank takes its model's fingerprint (a KeyboardInterrupt as it
    hashes the weights) is told so too: raised here, DistributeFailed on
    the others. ``held``: the layers this rank's stages took in an earlier
    distribute of this model object (``_held_before``): a layer whose
    values there differ from those of a rank that did not take it (trained
    by that job) is refused, naming both (each rank's copy holds its own
    stages' training only). ``listed``: this rank's ``schedule=[...]`` (each
    candidate in words, engine.distribute's ``_candidates_said``): a list
    that differs across ranks is refused on every rank, naming them (each
    would rank, and run, its own). ``made``: what became of this rank's own
    schedules and families (engine.distribute_schedules' ``_schedules``;
    None where it failed before them): where ranks made one otherwise
    (code that depends on the rank), every rank raises the same error
    naming them, whatever each raised of it (``made_agreed``). ``knobs``:
    this rank's arguments that must be alike (``layered``, ``recompute``,
    ``microbatches``...: ``_knobs``), each in words: one that differs is
    refused on every rank, naming the ranks and their values."""
    said: Any = None if fault is None else [type(fault).__name__, str(fault)]
    own: BaseException | None = None
    try:
        prints = [_fingerprint(layer, is_torch) for _, layer in named]
    except BaseException as e:
        own, prints, said = e, [], [type(e).__name__, str(e), True]
    mine = (_coord(grid, "dp"), prints, said, None if held is None else list(held),
            None if listed is None else list(listed),
            None if made is None else [list(e) for e in made], knobs or {})
    everyone = collectives.all_gather_object(grid.comm, mine, timeout=timeout)
    _raised(own)
    if len({repr(t[4]) for t in everyone}) == 1 or any(t[2] is not None for t in everyone):
        # (other lists, none failing: the lists' error below)
        made_agreed(grid.comm.rank, [t[5] for t in everyone])
    if fault is not None:
        raise _retold(fault, f"rank {grid.comm.rank}: engine.distribute: {fault}") from fault
    failed = [(r, t[2]) for r, t in enumerate(everyone) if t[2] is not None]
    if failed:
        r, (kind, text, *interrupted) = failed[0]
        if interrupted:
            raise DistributeFailed(f"rank {grid.comm.rank}: engine.distribute failed on rank "
                                   f"{r}: {kind}: {text}"[:600])
        raise (TypeError if kind == "TypeError" else ValueError)(
            f"rank {grid.comm.rank}: engine.distribute failed on rank {r}: {text}")
    who = f"rank {grid.comm.rank}: engine.distribute: the model differs across ranks"
    fix = "build the same model on every rank"

    def by(key: Callable[[int], Any], ranks: Sequence[int]) -> list[tuple[Any, list[int]]]:
        groups: dict[Any, list[int]] = {}
        for r in ranks:
            groups.setdefault(key(r), []).append(r)
        return list(groups.items())

    def label(i: int) -> str:
        name, layer = named[i]
        if name:
            return f"layer {i} ({name!r})"
        keys = list(layer.state_dict()) if is_torch else []    # a traced piece: the model's
        return f"layer {i}" + (f" (with {keys[0]!r})" if keys else "")
    world = range(len(everyone))
    lists = by(lambda r: repr(everyone[r][4]), world)
    if len(lists) > 1:
        raise ValueError(f"rank {grid.comm.rank}: engine.distribute: the schedule candidates "
                         f"differ across ranks: " + "; ".join(
                             f"ranks {rs} passed " + (_cut(f"[{', '.join(everyone[rs[0]][4])}]")
                                                      if everyone[rs[0]][4] is not None
                                                      else "no list")
                             for _, rs in lists) + "; pass the same schedule=[...] on every rank")
    for key in sorted({k for t in everyone for k in t[6]}):
        said = by(lambda r: everyone[r][6].get(key), world)
        if len(said) > 1:
            raise ValueError(f"rank {grid.comm.rank}: engine.distribute: {key}= differs across "
                             f"ranks: " + "; ".join(f"{key}={_cut(str(v))} on ranks {rs}"
                                                    for v, rs in said)
                             + "; pass the same on every rank (a collective call)")
    sizes = by(lambda r: len(everyone[r][1]), world)
    if len(sizes) > 1:
        raise ValueError(f"{who}: " + ", ".join(f"ranks {rs} built {n} layers"
                                                for n, rs in sizes) + f"; {fix}")
    for i in range(len(named)):
        makes = by(lambda r: everyone[r][1][i][0], world)
        if len(makes) > 1:
            raise ValueError(f"{who}: {label(i)} is " + "; ".join(
                f"{_cut(m)} on ranks {rs}" for m, rs in makes) + f"; {fix}")
    marked = [r for r in world if everyone[r][3] is not None]
    for i in range(len(named)):
        holders = [r for r in marked if i in everyone[r][3]]
        trained = {everyone[r][1][i][1] for r in holders}
        stale = [r for r in marked if r not in holders and everyone[r][1][i][1] not in trained]
        if len(trained) == 1 and None not in trained and stale:
            raise ValueError(
                f"rank {grid.comm.rank}: engine.distribute: this model object was distributed "
                f"before, and {label(i)} holds other values on ranks {stale} than on ranks "
                f"{holders}, whose stages took it then (and trained it, or took dp replica 0's "
                "values): each rank's copy of the model holds its own stages' training only. "
                "Distribute a fresh copy (copy.deepcopy(model) before the first distribute, or "
                "the model built again) and load the trained weights into the new job "
                "(new_job.load_state_dict(state) on every rank, state being job.state_dict())")
    for dp, replica in by(lambda r: everyone[r][0], world):
        for i in range(len(named)):
            values = by(lambda r: everyone[r][1][i][1], replica)
            if len(values) > 1 and all(v is not None for v, _ in values):
                where = f" of dp replica {dp}" if _size(grid, "dp") > 1 else ""
                raise ValueError(
                    f"{who}: {label(i)} holds different values on ranks "
                    + " and ".join(str(rs) for _, rs in values) + f"{where}, whose pipeline "
                    "stages (and tensor-parallel shards) are cut from each rank's own copy: "
                    f"{fix}, seeded alike (torch.manual_seed(0) before building it), "
                    "or load the same weights into each")


def _knobs(**given: Any) -> dict[str, str]:
    """distribute's arguments that every rank must pass alike, each in
    words (a callable or an object by its type's name: set beside the
    others' by ``_same_model``)."""
    def said(v: Any) -> str:
        if v is None or isinstance(v, (bool, int, float, str)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(said(x) for x in v) + "]"
        return type(v).__name__
    return {k: said(v) for k, v in given.items()}


def _agreed_sample(grid: Grid, sample: Any, timeout: float | None = None) -> Any:
    """``sample`` cut to the fewest rows any rank's has. dp replicas may be
    given samples of unequal rows (their own batches: ``step()`` weighs
    unequal replicas by their rows), but every rank must profile the same
    micro-batch sizes, each timing some of the layers for all of them, and
    choose alike; the times of the smallest replica's micro-batches stand
    for all. A sample given on some ranks only raises on every rank,
    naming them; so does an error as a rank counts its rows (its own
    there, DistributeFailed on the others: a KeyboardInterrupt)."""
    own: BaseException | None = None
    try:
        mine: Any = None if sample is None else rows_of(sample)
    except (TypeError, ValueError) as e:    # (told to every rank: none waits in the gather)
        mine = f"rank {grid.comm.rank}'s sample: {e}"
    except BaseException as e:
        own, mine = e, [f"{type(e).__name__}: {e}"[:400]]
    told = collectives.all_gather_object(grid.comm, mine, timeout=timeout)
    _raised(own)
    stopped = next(((r, t[0]) for r, t in enumerate(told) if isinstance(t, list)), None)
    if stopped is not None:
        raise DistributeFailed(f"rank {grid.comm.rank}: engine.distribute failed on rank "
                               f"{stopped[0]}: {stopped[1]}")
    bad = next((t for t in told if isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"rank {grid.comm.rank}: engine.distribute: {bad}")
    given = [r for r, rows in enumerate(told) if rows is not None]
    if not given:
        return sample
    if len(given) < len(told):
        missing = [r for r, rows in enumerate(told) if rows is None]
        raise ValueError(f"rank {grid.comm.rank}: engine.distribute: ranks {given} were given "
                         f"sample= and ranks {missing} were not: give every rank its "
                         "replica's sample (a batch of inputs as step() will get)")
    fewest = min(int(rows) for rows in told if rows is not None)
    if mine == fewest:
        return sample
    if isinstance(sample, tuple):
        return tuple(part[:fewest] for part in sample)
    return sample[:fewest]


def _valid_balance(balance: Any, layers: int) -> None:
    """Raise unless ``balance`` is a way to cut ``layers`` layers (the
    count of stages is the schedule's, checked when the cut is made)."""
    if isinstance(balance, str):
        if balance not in ("time", "uniform", "parameters") and not balance.startswith("type:"):
            raise ValueError(f"unknown balance {balance!r}: use 'time', 'uniform', "
                             "'parameters', 'type:REGEX' or a list of layer counts")
        return
    counts = whole_counts(balance)
    if sum(counts) != layers or min(counts, default=0) < 1:
        raise ValueError(f"balance={counts} must give positive layer counts adding up to the "
                         f"model's {layers} layers")


def _recompute_names(model: Any, patterns: Sequence[str], traced: bool) -> None:
    """Raise unless each of ``patterns`` names a submodule of ``model``
    (selective recompute; _checkpoint_model's checks, before any collective)."""
    names = [n for n, _ in model.named_modules() if n]
    for pat in patterns:
        if not named_by(names, pat):
            near = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"recompute={pat!r} matches no submodule of "
                             f"{type(model).__name__} (its submodules: {near})")
    if traced:
        hits = [n for p in patterns for n in named_by(names, p)]
        through = [n for n in hits if not called_whole(model, n)]
        if through:
            raise ValueError(f"recompute={list(patterns)!r}: {through!r} hold the model's list "
                             "of layers, which its trace runs through (it is cut there): name "
                             "the layers or modules inside them")


def _checkpoint_model(model: Any, patterns: Sequence[str], traced: bool) -> None:
    """Selective recompute of ``model``'s submodules named by ``patterns``
    (checkpoint_modules); with ``traced``, each must be called as a module
    when the traced pieces run (called_whole), else it would not recompute:
    refused, before anything is wrapped (_recompute_names)."""
    _recompute_names(model, patterns, traced)
    checkpoint_modules(model, patterns, type(model).__name__)


def _copied(batch: Any) -> int:
    """The bytes of ``batch``'s floating parts: what a TorchStage copies
    of its input (integer ids it takes as they are)."""
    parts = batch if isinstance(batch, tuple) else (batch,)
    return sum(int(p.nbytes) for p in parts
               if (p.is_floating_point() if is_tensor(p) else
                   getattr(getattr(p, "dtype", None), "kind", "") == "f"))


def _as_grid(grid: Grid | Comm) -> Grid:
    check_grid(grid, "engine.distribute")
    if not isinstance(grid, Grid):
        import mesh
        return mesh.grid(grid, pp=grid.size)
    extra = [a for a in grid.names if a not in _AXES]
    if extra or "pp" not in grid.names:
        raise ValueError(f"rank {grid.comm.rank}: engine.distribute needs a grid with a pp axis "
                         f"and at most dp, sp and tp beside it (pp=1 for no pipeline), got "
                         f"{grid.axes}")
    return grid


def _size(grid: Grid, axis: str) -> int:
    return grid.size(axis) if axis in grid.names else 1


def _coord(grid: Grid, axis: str) -> int:
    return grid.coord(axis) if axis in grid.names else 0
