"""``engine.distribute``: cut, shard and pipeline a model in one call.

The model stays a plain model: a torch ``nn.Sequential`` (or a list of
modules), any other torch ``nn.Module`` whose forward torch.fx can trace
(cut into layers by ``engine.sequential``; without ``loss_fn`` the
forward's own loss of its second argument is the pipeline's), or an
``engine.layers`` model, built the same way on every rank.
distribute cuts it into pipeline stages over the grid's ``pp`` axis, shards
the stages by ``plan`` over ``tp``, averages gradients over ``dp``, and, with
``schedule="auto"``, measures every layer on the sample batch, simulates
every built-in schedule at several micro-batch counts (engine.choose), with
each candidate's stages of several layers measured whole and the executor's
own costs (engine.calibrate: with, on a host with no spare core, the mesh
threads' CPU per message charged to the computing ranks; the leader costed
again by a busy dry run of its own schedule until the leader is one so
costed), and runs the fastest that fits ``memory_limit``; the chosen
stages are timed once more (the last one with its loss)
right before it returns, in the order the schedule runs them, and the
executor's costs measured on a dry run of that schedule (``Job.retime``:
``job.predicted``), so the prediction is of the machine as the steps will
find it. With a plan the model is sharded first and its layers are timed
sharded, the tp peers at once, so their collectives are in every figure::

    grid = mesh.grid(world, dp=2, pp=2)
    job = engine.distribute(model, grid, sample=x, loss_fn=F.mse_loss)
    opt = torch.optim.SGD(job.parameters(), lr=0.1)
    for x, y in batches:             # this dp replica's batch
        opt.zero_grad()
        loss = job.step(x, y)        # the mean loss on last-stage ranks, else None
        job.clip_grad_norm_(1.0)     # (optional) the whole model's norm, engine.clip
        opt.step()
    val = job.eval_step(x, y)        # forwards only, modules in eval mode for the call
    state = job.state_dict()         # the whole model on rank 0 (collective)
    optim = job.optimizer_state_dict(opt)    # opt's state, whole, by name (as DCP's full one)
    # ZeRO stage 1: opt = engine.ZeroRedundancyOptimizer(job.parameters(), torch.optim.AdamW,
    # job, lr=...): each dp replica keeps its share's state; the same calls (engine.zero)
    # another layout's job: job.load_state_dict(state); job.load_optimizer_state_dict(opt, optim)

A torch ``loss_fn(output, target)`` is an ordinary torch loss (the mean over
its micro-batch); a numpy one returns ``(loss, gradient)`` as
``engine.layers.mse_loss`` does. The executor weighs each micro-batch by its
rows, and dp averages, so a step's gradients are those of the mean loss over
the global batch: the same as one process training on all of it.
"""
from __future__ import annotations

import copy
import functools
import inspect
import itertools
import numbers
import sys
import time
from dataclasses import replace
from collections import OrderedDict
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

import collectives
from mesh import AbortKind, Comm, Grid, MeshError
from mesh.tensors import is_tensor

from . import layers as _layers
from .calibrate import Calibration, calibrate, collected, dry_run, hosts, shared_cores
from .choose import (SCHEDULES, Candidate, LayerCost, Span, as_run, best_first, builtin,
                     calibrated,
                     candidates, counts_for, kept_buffers, kept_random, loaded, measure,
                     measure_stages, microbatch_counts,
                     legend, recomputing, recosted, retimed, retimed_said, stage_costs,
                     stage_spans, table,
                     time_program, under_load, whole_counts)
from .executor import Pipeline
from .ir import Schedule
from .pipeline_args import _retold, rows_of
from .schedules import by_name, one_f_one_b
from .step import _in_action
from .stagebuild import (inputs_of, is_module, make_stage, model_key,
                         named_stage_parameters, param_count)
from .tensor_parallel import (cut_like, gather_like, gather_state_dict, load_full_state_dict,
                              param_shards, parallelize, tensor_bytes)
from .partition import partition
from .trace import write as _write_trace
from .traced import Reshaped, called_whole, few, given_as_returned, sequential, traceable
from .torch_stage import TorchStage, _view, checkpoint_modules, patterns_of, torch_loss
from .tp_layers import full_params, full_shapes, load_full_params, refuse_fed_whole
from .tp_plan import PlanError, digest, logging_calls, named_by
from .tp_sums import holders as tp_holders

__all__ = ["distribute", "IncompatibleKeys", "Job", "load_state", "far_off"]

_TP_RUNS = 10     # runs of each tensor-parallel layer's timing (its peers must run as many)

_AXES = ("dp", "pp", "tp")
# the steps after the first that rank 0 times against job.predicted (verbose jobs), and
# how far off their median must be to be told: once, the machine may be loaded
_WATCHED, _FAR_OFF = 5, 2.0
_STATE_TAG = 1 << 60      # state_dict()'s point-to-point messages, far above the pipeline's
_OPTIM_TAG = _STATE_TAG + (1 << 40)     # optimizer_state_dict()'s, above those
_HERE_TAG = _STATE_TAG - 1      # each rank's word that it called them too (_all_called)
_DONE_TAG = _STATE_TAG - 2      # each tp rank's word that its part ran or failed (_tp_agreed)


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
                fault: BaseException | None = None, timeout: float | None = None) -> None:
    """Raise on every rank, before anything is measured or cut, unless every
    rank built the same model: as many layers, each of the same make; and,
    within each dp replica (whose pp and tp ranks cut their stages and
    shards from their own copies), the same values. Replicas over dp may
    differ: they start from replica 0's weights. ``fault``: what is wrong
    with this rank's own arguments (a missing loss_fn, an unknown
    schedule...): raised here, and by every other rank naming it (alone,
    the others waited for this rank in their next collective)."""
    said = None if fault is None else [type(fault).__name__, str(fault)]
    mine = (_coord(grid, "dp"), [_fingerprint(layer, is_torch) for _, layer in named], said)
    everyone = collectives.all_gather_object(grid.comm, mine, timeout=timeout)
    if fault is not None:
        raise _retold(fault, f"rank {grid.comm.rank}: engine.distribute: {fault}") from fault
    failed = [(r, t[2]) for r, t in enumerate(everyone) if t[2] is not None]
    if failed:
        r, (kind, text) = failed[0]
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
    sizes = by(lambda r: len(everyone[r][1]), world)
    if len(sizes) > 1:
        raise ValueError(f"{who}: " + ", ".join(f"ranks {rs} built {n} layers"
                                                for n, rs in sizes) + f"; {fix}")
    for i in range(len(named)):
        makes = by(lambda r: everyone[r][1][i][0], world)
        if len(makes) > 1:
            raise ValueError(f"{who}: {label(i)} is " + "; ".join(
                f"{_cut(m)} on ranks {rs}" for m, rs in makes) + f"; {fix}")
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


def _agreed_sample(grid: Grid, sample: Any, timeout: float | None = None) -> Any:
    """``sample`` cut to the fewest rows any rank's has. dp replicas may be
    given samples of unequal rows (their own batches: ``step()`` weighs
    unequal replicas by their rows), but every rank must profile the same
    micro-batch sizes, each timing some of the layers for all of them, and
    choose alike; the times of the smallest replica's micro-batches stand
    for all. A sample given on some ranks only raises on every rank,
    naming them."""
    try:
        mine: Any = None if sample is None else rows_of(sample)
    except (TypeError, ValueError) as e:    # (told to every rank: none waits in the gather)
        mine = f"rank {grid.comm.rank}'s sample: {e}"
    told = collectives.all_gather_object(grid.comm, mine, timeout=timeout)
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
        if balance not in ("time", "uniform", "parameters"):
            raise ValueError(f"unknown balance {balance!r}: use 'time', 'uniform', "
                             "'parameters' or a list of layer counts")
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
    if not isinstance(grid, Grid):
        import mesh
        return mesh.grid(grid, pp=grid.size)
    extra = [a for a in grid.names if a not in _AXES]
    if extra or "pp" not in grid.names:
        raise ValueError(f"rank {grid.comm.rank}: engine.distribute needs a grid with a pp axis "
                         f"and at most dp and tp beside it (pp=1 for no pipeline), got "
                         f"{grid.axes}")
    return grid


def _size(grid: Grid, axis: str) -> int:
    return grid.size(axis) if axis in grid.names else 1


def _coord(grid: Grid, axis: str) -> int:
    return grid.coord(axis) if axis in grid.names else 0


def _median_act(row: dict[int, LayerCost]) -> int:
    """The median of a profile row's activation bytes."""
    return sorted(lc.act_bytes for lc in row.values())[len(row) // 2]


def _shared(grid: Grid, n: int, timed: Callable[[list[int]], list[tuple[Any, LayerCost]]]
            ) -> list[tuple[list[int], LayerCost]]:
    """Items ``0..n-1`` shared out over the ranks, each timing its own
    (``timed(mine)``: ``(key, cost)`` pairs, a key a tuple of ints), and
    every rank's results exchanged, so all of them decide alike. With a tp
    axis, over the tp groups: a group's ranks time the same items at once
    (sharded layers, whose collectives they make together)."""
    index, count = 0, 1
    for name in grid.names:             # this rank's tp group, among all of them
        if name != "tp":
            index, count = index * grid.size(name) + grid.coord(name), count * grid.size(name)
    tp = grid.group("tp") if _size(grid, "tp") > 1 else None
    ours = [j for j in range(n) if j % count == index]
    mine, failed = _timing(grid.comm, tp, lambda: timed(ours))
    return _exchange(grid.comm, mine or [], failed, tp)


def _timing(world: Comm, tp: Comm | None, work: Callable[[], Any]
            ) -> tuple[Any, BaseException | None]:
    """``work()`` (this rank's timing of its share, which calls ``loss_fn``)
    and the error it raised (None: none), returned for ``_exchange`` to tell
    every rank. Where it is this rank's own (a KeyboardInterrupt in
    ``loss_fn``), its tp peers' next collective, which it will not make,
    fails on them at once naming it (they waited in it until their timeout)."""
    try:
        return work(), None
    except BaseException as e:
        if tp is not None and not isinstance(e, MeshError):
            collectives.abandon(tp, f"engine.distribute failed on rank {world.rank} (tp rank "
                                f"{tp.rank}): {type(e).__name__}: {e}"[:400], AbortKind.of(e))
        return None, e


def _exchange(world: Comm, pairs: list[tuple[Any, LayerCost]],
              failed: BaseException | None = None, tp: Comm | None = None
              ) -> list[tuple[list[int], LayerCost]]:
    """Every rank's ``(key, cost)`` pairs (a key a tuple of ints), to every
    rank; and whether its timing ``failed`` (``_timing``): then every rank
    raises, this one its own error, the others DistributeFailed naming it
    (the first rank whose error was its own, not a peer's abort); it raised
    alone, and the others waited for it here until their timeout. The ranks
    of each ``tp`` group then number their collectives alike (the highest:
    a peer that made no more skips the one a failed rank abandoned)."""
    rows = [[*key, lc.F, lc.B, lc.I, lc.W, lc.act_bytes,
             -1 if lc.saved_bytes is None else lc.saved_bytes, lc.keeps] for key, lc in pairs]
    said = None if failed is None else [f"{type(failed).__name__}: {failed}"[:400],
                                        bool(getattr(failed, "from_abort", False))]
    ch = None if tp is None else tp.collective_channel()
    line = None if ch is None or tp is None else [list(tp.ranks), ch.seq]
    parts = collectives.all_gather_object(world, [said, rows, line])
    told = [(r, t) for r, (t, _, _) in enumerate(parts) if t is not None]
    if told and ch is not None and tp is not None:
        ch.seq = max(int(q) for _, _, (rs, q) in parts if list(rs) == list(tp.ranks))
    if failed is not None:
        raise failed
    if told:
        r, (text, _) = next(((r, t) for r, t in told if not t[1]), told[0])
        raise DistributeFailed(f"rank {world.rank}: engine.distribute failed on rank {r}: "
                               f"{text}")
    return [([int(k) for k in key], LayerCost(f, b, gi, gw, int(nb), None if sb < 0 else int(sb),
                                              int(keeps)))
            for _, part, _ in parts for *key, f, b, gi, gw, nb, sb, keeps in part]


def _profile(grid: Grid, mlayers: list[Any], sample: Any, sizes: list[int], reps: int,
             runs: int | None = None, clock: Callable[[], float] = time.perf_counter
             ) -> tuple[dict[int, dict[int, LayerCost]], dict[int, str]]:
    """Every layer measured at every size (``_shared`` over the layers;
    ``runs``: a fixed count, for tensor-parallel layers; ``clock``: wall
    time, or the thread's CPU where the ranks share cores); and the sizes
    where a layer failed on some rank, each with its error (a BatchNorm
    refuses a 1-row micro-batch in training), told to every rank: those
    sizes' candidates are left out, not the whole call failed."""
    failed: dict[int, str] = {}

    def timed(mine: list[int]) -> list[tuple[Any, LayerCost]]:
        pairs: list[tuple[Any, LayerCost]] = []
        for size in sizes:
            try:
                local = measure(mlayers, sample, [size], reps, mine, runs, clock)
            except MeshError:
                raise
            except Exception as e:
                failed[size] = f"{type(e).__name__}: {e}"
                continue
            pairs += [((size, i), lc) for i, lc in local[size].items()]
        return pairs

    got = _shared(grid, len(mlayers), timed)
    broken: dict[int, str] = {}
    for r, theirs in enumerate(collectives.all_gather_object(grid.comm, failed)):
        for size, why in sorted(theirs.items()):
            if why.startswith("PlanError: "):     # the plan's, at every size: said whole
                raise PlanError(f"rank {grid.comm.rank}: engine.distribute: measuring the "
                                f"layers on the sample, rank {r}: {why[len('PlanError: '):]}")
            broken.setdefault(size, f"rank {r}: {why}")
    merged: dict[int, dict[int, LayerCost]] = {s: {} for s in sizes if s not in broken}
    for (size, i), lc in got:
        if size in merged:
            merged[size][i] = lc
    return merged, broken


def _profile_stages(grid: Grid, mlayers: list[Any], join: Callable[[int, int], Any], sample: Any,
                    spans: dict[int, list[Span]], reps: int, runs: int | None = None,
                    clock: Callable[[], float] = time.perf_counter
                    ) -> dict[int, dict[Span, LayerCost]]:
    """Every stage of ``spans`` measured whole (engine.choose.measure_stages;
    ``_shared`` over the stages; ``runs`` and ``clock`` as ``_profile``'s)."""
    def timed(mine: list[int]) -> list[tuple[Any, LayerCost]]:
        local = measure_stages(mlayers, join, sample, spans, reps, mine, runs, clock)
        return [((size, a, b), lc) for size, row in local.items() for (a, b), lc in row.items()]

    merged: dict[int, dict[Span, LayerCost]] = {s: {} for s in spans}
    n = sum(len(ss) for ss in spans.values())
    for (size, a, b), lc in _shared(grid, n, timed):
        merged[size][(a, b)] = lc
    return merged


def _retime(world: Comm, stages: dict[int, Any], inputs: dict[int, Any], program: Any,
            reps: int, loss: tuple[int, Callable[[Any], Any]] | None = None,
            clock: Callable[[], float] = time.perf_counter,
            calls: dict[tuple[int, str], list[int]] | None = None, tp: Comm | None = None
            ) -> tuple[dict[int, LayerCost], list[dict[int, LayerCost]]]:
    """Each rank times copies of its stages running its own program's
    compute actions in order (engine.choose.time_program: every rank at
    once, as the steps run them; at least 5 runs, each a step's compute,
    so that a burst of others' load over two of them does not move the
    median; ``loss``, the last stage's loss in its F, as the step runs it);
    the times of every stage, averaged over the ranks that hold it (dp
    replicas, tp peers), exchanged; and the same for each run, the ranks'
    runs paired in order (as many as the rank with the fewest ran).

    ``calls``, for tensor-parallel stages (whose tp peers time theirs at
    once, making the same collectives: a fixed number of runs, and the
    whole parameters' gradient sums left to the step's end, as a Pipeline
    leaves them): gets the bytes of each tp collective an action of each
    (stage, kind) makes (engine.tp_plan.logging_calls); ``tp``: their group.
    An error there on one rank fails every rank at once (``_timing``)."""
    copies = {s: copy.deepcopy(st) for s, st in stages.items()}
    for st in copies.values() if calls is not None else ():
        for h in tp_holders(st):
            h.defer = True
    each: list[dict[int, LayerCost]] = []
    with logging_calls() as log:
        median, failed = _timing(world, tp, lambda: time_program(
            copies, inputs, program, max(reps, 5), clock=clock, loss=loss, each=each,
            runs=None if calls is None else 2 * max(reps, 5),
            calls=None if calls is None else (log, calls)))
    mine = [((s, -1), lc) for s, lc in (median or {}).items()]
    mine += [((s, i), lc) for i, run in enumerate(each) for s, lc in run.items()]
    got: dict[tuple[int, int], list[LayerCost]] = {}
    for (s, i), lc in _exchange(world, mine, failed, tp):
        got.setdefault((s, i), []).append(lc)

    def mean(lcs: list[LayerCost]) -> LayerCost:
        f, b, gi, gw = (sum(getattr(lc, k) for lc in lcs) / len(lcs) for k in "FBIW")
        return LayerCost(f, b, gi, gw, lcs[0].act_bytes, lcs[0].saved_bytes, lcs[0].keeps)
    held = {s: len(lcs) for (s, i), lcs in got.items() if i == -1}     # by how many ranks
    runs = 0
    while held and all(len(got.get((s, runs), [])) == n for s, n in held.items()):
        runs += 1
    return ({s: mean(got[(s, -1)]) for s in held},
            [{s: mean(got[(s, i)]) for s in held} for i in range(runs)])


def _stretch(cpu: dict[str, list[float]], wall: dict[str, list[float]],
             floor: float = 1.0) -> list[float]:
    """Per stage, the wall its compute actions took in the busy dry run
    (``wall``: engine.calibrate.DryRun.compute) over the CPU they burnt
    there (``cpu``: their re-timed thread CPU, which ``_Spin`` burns), at
    least ``floor``: the share of a core the schedule's actions get as its
    steps run them (the mesh threads' reading of messages, others' load; a
    rank that waits for messages is woken ahead of a process that computes
    without pause, so a stage timed back to back on a loaded host takes a
    smaller share than the steps get, and one timed on a quiet host none of
    the mesh threads'). Where the ranks outnumber the cores, ``cpu`` is
    instead what the simulator's sharing of the cores makes of that CPU
    (``_shared_walls``), and the stretch what the sharing leaves out
    (``floor`` 0: it can be under 1 too)."""
    out = []
    for s in range(len(cpu["F"])):
        c = sum(cpu[k][s] for k in cpu if wall.get(k) and wall[k][s] > 0)
        w = sum(wall[k][s] for k in cpu if wall.get(k) and wall[k][s] > 0)
        out.append(max(floor, w / c) if c > 0 else 1.0)
    return out


def _shared_walls(sched: Schedule, spin: dict[str, list[float]], cal: Calibration
                  ) -> dict[str, list[float]]:
    """Per kind and stage, the mean wall of a compute action of the dry run
    as the simulator predicts it with the ranks sharing ``cal.cores`` (and
    others' processes, ``cal.load``)
    (``spin``: each action's CPU; the executor's own time per action, its
    messages and receives as the dry run measured them), without the
    executor's own time: what ``_stretch`` compares the dry run's with."""
    n = sched.num_stages
    costs = {**spin, "send": [cal.message] * n, "recv": [cal.receive] * n,
             "fixed": [cal.action] * n}
    sums: dict[tuple[str, int], list[float]] = {}
    for e in sched.simulate(costs, cal.cores, cal.load).events:
        if e.action.kind in ("F", "B", "I", "W"):
            sums.setdefault((e.action.kind, e.action.stage), []).append(
                e.end - e.start - cal.action)
    return {k: [sum(v) / len(v) if (v := sums.get((k, s))) else 0.0 for s in range(n)]
            for k in ("F", "B", "I", "W")}


# The dry run's compute walls over the simulator's, past which the rest is
# taken for others' processes on the cores (fitted_load)
_LOADED = 1.1


def fitted_load(sched: Schedule, spin: dict[str, list[float]], cal: Calibration,
                cores: float, wall: dict[str, list[float]]) -> float:
    """Others' processes on the host's cores, in pp ranks' worth
    (engine.simulate's ``load``), that make the simulator's compute walls
    of the dry run of ``sched`` (its actions' CPU ``spin``, the ranks
    sharing ``cores`` pp ranks' worth, ``cal``'s executor costs) as long,
    summed over the stages and kinds it ran, as the dry run's (``wall``:
    DryRun.compute): what the share of the cores the dry run got says of
    the others, with the steps' own pattern of waits (a rank that waited
    for a message is woken ahead of processes that compute without
    pause). 0 where the dry run is within 10% of the simulator without
    any: a quiet machine predicts as before."""
    pairs = [(k, s) for k in ("F", "B", "I", "W") for s in range(sched.num_stages)
             if wall.get(k) and wall[k][s] > 0 and spin[k][s] > 0]
    measured = sum(wall[k][s] for k, s in pairs)

    def simulated(load: float) -> float:
        walls = _shared_walls(sched, spin, replace(cal, cores=cores, load=load))
        return sum(walls[k][s] for k, s in pairs)

    if not pairs or measured <= _LOADED * simulated(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while simulated(hi) < measured and hi < 1024:
        lo, hi = hi, 2 * hi
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if simulated(mid) < measured else (lo, mid)
    return hi


def _stretched(lc: LayerCost, by: float) -> LayerCost:
    return replace(lc, F=lc.F * by, B=lc.B * by, I=lc.I * by, W=lc.W * by)


def _grad_bytes(layer: Any) -> list[int]:
    """The bytes of each gradient of a layer's parameters (its shards',
    where tensor-parallel), in the order its stage lists them."""
    if is_module(layer):
        return [p.numel() * p.element_size() for p in layer.parameters() if p.requires_grad]
    params = getattr(layer, "params", None)
    return [int(a.nbytes) for a in params()] if callable(params) else []


def _stage_grads(grads: list[list[int]], counts: tuple[int, ...], stages: Any
                 ) -> dict[int, list[int]]:
    """Per stage in ``stages`` of a cut (``counts`` layers a stage), the
    bytes of each of its layers' gradients (``grads``, per layer), for a
    dry run's stand-ins: with a dp axis the step's end averages them."""
    bounds = [sum(counts[:s]) for s in range(len(counts))]
    return {s: [n for layer in grads[bounds[s]:bounds[s] + counts[s]] for n in layer]
            for s in stages}


def _stage_messages(row: dict[int, LayerCost], counts: tuple[int, ...]) -> list[tuple[int, int]]:
    """Per stage of a cut, the bytes it sends forward (its output) and
    backward (its input's gradient), from a profile row."""
    bounds = [sum(counts[:s]) for s in range(len(counts))]
    out = [row[b + c - 1].act_bytes for b, c in zip(bounds, counts)]
    return [(o, out[s - 1] if s else 0) for s, o in enumerate(out)]


def _measured_choice(grid: Grid, cands: list[Candidate], profile: dict[int, dict[int, LayerCost]],
                     whole: dict[int, dict[Span, LayerCost]], rows: int,
                     crowded: bool, tag_base: int, timeout: float | None, tries: int = 4,
                     tensors: bool = False,
                     grads: list[list[int]] | None = None) -> list[Candidate]:
    """``cands`` ranked again, the leader costed with the executor's costs
    measured on a busy dry run of its own schedule (engine.calibrate's
    ``dry_run``: its stages' profiled times, its messages' sizes) until the
    leader is one so costed, or ``tries`` dry runs are spent: the
    candidates' figures come from a no-op 1F1B dry run at their micro-batch
    count, which a zero-bubble schedule with its split backward and two
    micro-batches pays several times over (175-400 us per action against
    30-150, quiet), so a leader whose own run costs more drops behind the
    next, which is then measured in turn; when the tries are spent first,
    the best of the measured leads. Every rank gets the same dry-run
    figures, so all rank alike. ``tensors``: a torch job's (its dry runs'
    messages torch tensors); ``grads``, with a dp axis: each layer's
    gradients' bytes, which the leader's dry run averages over dp as its
    steps will (the step's end in its figures). Where the ranks share the
    cores (the candidates' ``cores``), each leader's dry run also fits
    others' processes on them (``fitted_load``, as ``Job.retime`` does on
    the chosen one's), and every candidate is ranked ``loaded`` with the
    latest such load."""
    for _ in range(tries):
        lead = cands[0]
        if lead.measured or not lead.fits:
            break
        size = -(-rows // lead.schedule.num_microbatches)
        row, w = profile[size], whole.get(size)
        run_row, run_whole = as_run(row, w, lead.recompute, lead.counts)
        spin = stage_costs(run_row, lead.counts, whole=run_whole)
        stand_ins = None if grads is None else _stage_grads(
            grads, lead.counts, lead.schedule.stages_of(grid.coord("pp")))
        d = dry_run(grid.comm, grid.group("pp"), lead.schedule, _stage_messages(row, lead.counts),
                    steps=3, tag_base=tag_base, timeout=timeout,
                    costs={k: spin[k] for k in "FBIW"}, tensors=tensors,
                    grid=None if grads is None else grid, grads=stand_ins)
        # where the ranks share the cores: others' processes on them too, fitted to
        # this dry run as Job.retime fits them to its own (none within 10%), and
        # every candidate simulated with them: a loaded host ranks them otherwise;
        # the mesh threads' CPU is then in the load (they ran in the dry run), not
        # charged to the actions besides (``loaded``)
        load, helper = lead.load, d.helper if crowded else 0.0
        if lead.cores is not None:
            load = fitted_load(lead.schedule, {k: spin[k] for k in "FBIW"},
                               Calibration(d.action, d.message, receive=d.receive),
                               lead.cores, d.compute or {})
            helper = 0.0
        cands = best_first([recosted(replace(lead, load=load), row, 1.0, w, d.action,
                                     d.message, helper, d.receive)]
                           + [loaded(c, load) for c in cands[1:]])
    if cands[0].measured or not any(c.measured for c in cands):
        return cands
    # the tries spent: the best of those measured leads (the others' figures are a lower bound)
    return [c for c in cands if c.measured] + [c for c in cands if not c.measured]


class _Optimizers:
    """Several torch optimizers as one (a list, as DCP's
    ``get_optimizer_state_dict`` takes it): their param groups one after
    another, in the list's order, and their states; ``load_state_dict``
    gives each its own groups and their parameters' states."""

    def __init__(self, opts: Sequence[Any]) -> None:
        self.opts = list(opts)
        self.param_groups = [g for o in self.opts for g in o.param_groups]
        self.state: dict[Any, Any] = {}
        for o in self.opts:
            self.state.update(o.state)
        self._of = {id(p): o for o in self.opts for g in o.param_groups for p in g["params"]}

    def holds(self, p: Any) -> bool:
        """Whether the optimizer of ``p`` keeps its state here (all but a
        ZeRO optimizer's other shares)."""
        holds = getattr(self._of.get(id(p)), "holds", None)
        return holds is None or bool(holds(p))

    def load_state_dict(self, local: dict[str, Any]) -> None:
        at = first = 0
        for o in self.opts:
            groups = local["param_groups"][at:at + len(o.param_groups)]
            count = sum(len(g["params"]) for g in groups)
            o.load_state_dict({
                "state": {i - first: v for i, v in local["state"].items()
                          if first <= i < first + count},
                "param_groups": [{**g, "params": [i - first for i in g["params"]]}
                                 for g in groups]})
            at, first = at + len(o.param_groups), first + count


def _one_optimizer(opt: Any) -> Any:
    """``opt``, or a list (tuple) of optimizers as one (_Optimizers)."""
    return _Optimizers(opt) if isinstance(opt, (list, tuple)) else opt


class IncompatibleKeys(NamedTuple):
    """What ``Job.load_state_dict`` left out, as torch's ``load_state_dict``
    returns it: the model's keys not given, the keys given it lacks."""
    missing_keys: list[str]
    unexpected_keys: list[str]


class Job:
    """One rank's part of a distributed model: see the module docstring."""

    def __init__(self, grid: Grid, pipeline: Pipeline, stages: list[Any], counts: tuple[int, ...],
                 names: list[str], is_torch: bool, chosen: Candidate | None,
                 cands: list[Candidate], sharded: bool = False,
                 calibration: Calibration | None = None, inputs: dict[int, Any] | None = None,
                 reps: int = 3, messages: list[tuple[int, int]] | None = None,
                 timeout: float | None = None, tag_base: int = 0,
                 target: Any = None, keys: list[str] | None = None,
                 aliases: dict[str, str] | None = None,
                 skipped: Sequence[tuple[Schedule, str]] = (),
                 rest: dict[str, Any] | None = None,
                 expected: dict[str, tuple[int, ...]] | None = None) -> None:
        self.grid = grid
        self._keys = keys          # a traced model's state_dict() keys, in its order
        self._expected = expected or {}     # the whole model's state keys, every name: shapes
        self._rest = rest or {}    # its tensors no stage holds, by key (_rest), on every rank
        self._aliases = aliases or {}     # a shared tensor's other keys: its first key
        self.calibration = calibration
        self.profile_calibration = calibration     # what distribute's choice was made with
        self._messages, self._timeout, self._tag_base = messages, timeout, tag_base
        self.profiled = chosen        # the prediction from distribute's profile
        self.row = chosen             # the chosen row of the table (re-timed: ``calibrated``)
        self.stretch: list[float] | None = None     # per stage, retime's wall over CPU
        self.tp_calls: dict[tuple[int, str], list[int]] = {}   # retime's tp collectives' bytes
        self._inputs, self._reps, self._target = inputs or {}, reps, target
        self.sharded = sharded
        self._in_tp_gather = False      # a state gather's tp collectives under way (_tp_after)
        self._part_failed = False       # its own part failed, every rank told (_local_part)
        self.pipeline = pipeline
        self.stages = stages
        self.counts = counts
        self.names = names
        self.first = [sum(counts[:s]) for s in range(len(counts))]
        self.is_torch = is_torch
        self.chosen = chosen
        self.candidates = cands
        self.profiled_candidates = cands    # the rows as the profile simulated them
        self.skipped = list(skipped)    # candidates that cannot run (their layers failed), why
        self.schedule: Schedule = pipeline.schedule
        # step() times its steps here against predicted (rank 0 of a verbose job), else None
        self.watched: list[float] | None = None
        # a traced model's pieces at each step's input shapes (None: at any, as traced)
        self.reshaped: Reshaped | None = None

    @property
    def costs(self) -> dict[str, list[float]] | None:
        """The chosen schedule's per-stage costs in seconds (when measured)."""
        return None if self.chosen is None else self.chosen.costs

    @property
    def predicted(self) -> float | None:
        """The simulator's step time in seconds for the chosen schedule."""
        return None if self.chosen is None else self.chosen.makespan

    def retime(self) -> float | None:
        """Time this rank's stages again, whole, as the step runs them
        (copies, on a micro-batch of the sample, this rank's compute actions
        in the schedule's order: engine.choose.time_program), every rank at
        once, in thread CPU (with the executor's own costs measured, else
        in wall time); then measure the executor's own costs and the mesh
        threads' CPU per message end on a dry run of the chosen schedule
        itself (engine.calibrate's ``dry_run``: its micro-batch count, its
        mix of F, B, I and W, its messages at their real sizes, stages that
        burn those times' CPU, so messages come and go while the ranks
        compute, as in the step), and stretch each stage's times by its
        dry-run actions' wall over their CPU (``stretch``: the share of a
        core its actions get as the steps run, the mesh threads' reading
        of messages and others' load included; a stage timed back to back
        gets a smaller share of a loaded core than steps that wait on
        messages, BENCHMARKS.md, tenth session); then predict the step
        again from those times and those costs:
        ``predicted`` then reflects the machine as it is now, right before
        the steps, and ``calibration`` holds the dry run's figures
        (``profile_calibration`` and ``profiled`` keep the choice's own),
        and, where the ranks share the cores and the dry run ran more than
        10% longer than the simulator makes it, others' processes on them
        (``calibration.load``: ``fitted_load``), which the simulator then
        shares the cores with too.
        distribute does it once before returning, and the table's rows are
        simulated again with what it learned (``table()``, engine.choose's
        ``calibrated``), as they are after each call. Collective over the grid;
        returns the new prediction, or None (nothing timed) when the costs
        were not measured. Tensor-parallel stages are timed with their
        collectives (the tp peers time theirs at once), in CPU as the rest,
        and the dry run's stages make collectives of the same sizes on the
        tp group between parts of their CPU (``tp_calls``), so the stretch
        holds the tp peers' waits for each other as the steps' contention
        makes them (the re-time's own waits are left out: with every rank
        timing at once, a peer kept off its core would count twice, as a
        wait and in the stretch; BENCHMARKS.md, fifteenth session). Python's
        garbage collector runs first and is held off meanwhile
        (engine.calibrate.collected), as through distribute's profile and
        choice. Nothing is fitted to a step: no step runs."""
        if self.chosen is None or not self._inputs:
            return None
        if self.reshaped is not None:      # (its inputs are the sample's)
            self.reshaped.sample()
        # no collection of a large heap inside the figures; the random streams and
        # buffers as they were (its stages' copies draw dropout masks and count
        # their BatchNorms as often as timed)
        with collected(), kept_random(), kept_buffers(*[getattr(st, "module", None)
                                                        for st in self.stages]):
            again = self._timed_again()
        if self.row is not self.profiled:       # (distribute's table re-timed: again)
            self._calibrate()
        return again

    def _calibrate(self) -> None:
        """The table's rows (``candidates``, its chosen one ``row``) simulated
        again with what the last re-time learned (engine.choose's
        ``calibrated``) from the profile's (``profiled_candidates``,
        ``profiled``): its chosen row is then ``predicted``."""
        if self.calibration is None:
            return
        self.candidates, self.row = calibrated(
            self.profiled_candidates, self.profiled, self.chosen,
            0.0 if self.stretch is not None else self.calibration.helper)

    def _timed_again(self) -> float:
        assert self.chosen is not None
        own = dict(zip(self.schedule.stages_of(self.pipeline.rank), self.stages))
        calibrated = self._messages is not None        # (not a given overhead)
        tp = self.pipeline.tp if self.sharded else None
        calls: dict[tuple[int, str], list[int]] = {}
        times, runs = _retime(self.grid.comm, own, self._inputs, self.pipeline.program,
                              self._reps, self._loss(),
                              time.thread_time if calibrated else time.perf_counter,
                              calls if tp is not None else None, tp)
        self.tp_calls = calls
        cal = self.calibration or Calibration(0.0, 0.0)
        helper = cal.helper
        if calibrated:
            assert self._messages is not None
            spin = {k: [getattr(times[s], k) for s in range(self.schedule.num_stages)]
                    for k in ("F", "B", "I", "W")}
            dp = self.pipeline.dp is not None and self.pipeline.dp.size > 1
            dry = dry_run(self.grid.comm, self.grid.group("pp"), self.chosen.schedule,
                          self._messages, steps=5, tag_base=self._tag_base,
                          timeout=self._timeout, costs=spin,
                          tp=(tp, calls) if tp is not None else None,
                          grid=self.grid if dp else None,
                          grads={s: [g.nbytes for g in st.grads()] for s, st in own.items()}
                          if dp else None, tensors=self.is_torch)
            cal = replace(cal, action=dry.action, message=dry.message,
                          helper=dry.helper if cal.crowded else 0.0, helper_measured=dry.helper,
                          receive=dry.receive)
            # where the ranks share the cores: others' processes on them too, as many
            # as make the simulated dry run as long as the measured one (none where it
            # is within 10%: as before)
            if cal.cores is not None:
                cal = replace(cal, load=fitted_load(self.chosen.schedule, spin, cal,
                                                    cal.cores, dry.compute or {}))
            self.calibration = cal
            shared = None if cal.cores is None else _shared_walls(self.chosen.schedule, spin,
                                                                  cal)
            stretch = _stretch(spin if shared is None else shared, dry.compute or {},
                               floor=1.0 if shared is None else 0.0)
            times = {s: _stretched(lc, stretch[s]) for s, lc in times.items()}
            runs = [{s: _stretched(lc, stretch[s]) for s, lc in run.items()} for run in runs]
            self.stretch = stretch
            helper = 0.0         # the stretch holds the mesh threads' share where they take one
        self.chosen = retimed(self.chosen, times, cal.action, helper, cal.message,
                              cal.receive, runs, cores=cal.cores if calibrated else None,
                              load=cal.load if calibrated else 0.0)
        return self.chosen.makespan

    def _loss(self) -> tuple[int, Callable[[Any], Any]] | None:
        """The last stage and its loss as the executor runs it after the
        stage's F (the loss function and the gradient's scaling by the
        micro-batch's share), on ``target``; None where this rank does not
        hold the last stage or there is no target."""
        pipe, target = self.pipeline, self._target
        if not pipe.last or target is None or pipe.loss_fn is None:
            return None
        fn, share = pipe.loss_fn, 1.0 / self.schedule.num_microbatches

        def loss(y: Any) -> Any:
            return fn(y, target)[1] * share
        return self.schedule.num_stages - 1, loss

    def write_trace(self, path: str) -> str | None:
        """The last step's Chrome trace (``Pipeline.write_trace``) with
        ``job.predicted`` stored beside it, so ``python -m engine.show path``
        prints the measured step over distribute's prediction (the
        pipeline's own trace holds none). Collective: every rank calls it;
        written on world rank 0, whose path it returns (None elsewhere)."""
        data = self.pipeline.trace()
        if data is None:
            return None
        if self.predicted is not None:
            data["otherData"]["predicted_makespan_ms"] = self.predicted * 1e3
            data["otherData"]["predicted_by"] = (f"engine.distribute's re-time of "
                                                 f"{self.schedule.name} (job.predicted)")
        return _write_trace(path, data)

    def table(self) -> str:
        """The candidates the choice was made from (and those that cannot run),
        simulated with the load distribute's re-time fitted (``loaded``) and
        what the last re-time learned (engine.choose's ``calibrated``: the
        chosen row is ``predicted``)."""
        return table(self.candidates, self.row, self.skipped)

    def step(self, inputs: Any = None, targets: Any = None) -> float | None:
        """One step on this dp replica's batch; the mean loss where the last
        stage runs, None elsewhere. Ranks that need neither may pass them.
        A verbose job's rank 0 times its steps after the first, and once it
        has five, says so if their median is over twice ``predicted`` or
        under half of it (``far_off``): once, and nothing where it is not."""
        pipe = self.pipeline
        if self.watched is None:
            return self._stepped(pipe.step, inputs, targets)
        began = time.perf_counter()
        out = self._stepped(pipe.step, inputs, targets)
        self.watched.append(time.perf_counter() - began)
        if len(self.watched) > _WATCHED:
            said = far_off(self.watched[1:], self.predicted, self.schedule.name)
            self.watched = None
            if said:
                print(f"engine.distribute: {said}", flush=True)
        return out

    def eval_step(self, inputs: Any = None, targets: Any = None, *,
                  outputs: bool = False) -> Any:
        """Evaluate this dp replica's batch: the schedule's forwards only,
        no gradient touched, torch modules in eval mode for the call
        (``Pipeline.eval_step``). The mean loss over the global batch where
        the last stage runs (one process's ``loss_fn(model(x), y)``), None
        elsewhere; with ``outputs``, ``(loss, the last stage's outputs)``.
        Ranks that need neither may pass them; every rank calls it."""
        return self._stepped(functools.partial(self.pipeline.eval_step, outputs=outputs),
                             inputs, targets)

    def _stepped(self, step: Callable[..., Any], inputs: Any, targets: Any) -> Any:
        """``step`` (the pipeline's step or eval_step) on this rank's part of
        ``inputs`` and ``targets``, a traced model's pieces made to run at the
        inputs' shapes first, inside the step (``before_step``): an error
        there (a KeyboardInterrupt as it traces) fails the step on every
        rank. (Before, it raised on this rank alone, before the step, which
        its peers then ran without it: their collectives met this rank's next
        step's, and every step after failed.)"""
        pipe = self.pipeline
        if self.reshaped is not None:
            pipe.before_step = functools.partial(self.reshaped.step, inputs)
        try:
            return step(inputs if pipe.first else None, targets if pipe.last else None)
        finally:
            pipe.before_step = None

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> float:
        """Clip every rank's gradients to a total norm of ``max_norm`` and
        return the total norm before clipping, the same on every rank: the
        one-process model's (torch's ``clip_grad_norm_`` on it), over all
        stages and tp shards, each tied and each replicated parameter
        counted once (``Pipeline.clip_grad_norm_``). Collective: between
        ``step()`` and ``opt.step()`` on every rank."""
        return self.pipeline.clip_grad_norm_(max_norm, norm_type, error_if_nonfinite)

    def parameters(self) -> list[Any]:
        """This rank's parameters (its stages, its shards), for an optimizer."""
        if self.is_torch:
            return [p for st in self.stages for p in st.module.parameters()]
        return [p for st in self.stages for p in st.params()]

    def named_parameters(self) -> list[tuple[str, Any]]:
        """``parameters()``, in its order, each with its name in the whole
        model: the key ``state_dict()`` gives it (a shard keeps its whole
        parameter's name; a tied tensor is named as its own stage holds it),
        so the usual selections by name work on a rank's part, as torch's
        ``named_parameters()`` on one process's model
        (``[p for n, p in job.named_parameters() if "bias" not in n]``)."""
        out: list[tuple[str, Any]] = []
        for s, st in zip(self.schedule.stages_of(self.pipeline.rank), self.stages):
            mine = self.names[self.first[s]:self.first[s] + self.counts[s]]
            out += named_stage_parameters(st.module if self.is_torch else st, mine)
        return out

    def grads(self) -> list[Any]:
        """The gradients, in the order of ``parameters()`` (numpy models)."""
        return [g for st in self.stages for g in st.grads()]

    def _local_state(self, timeout: float | None = None) -> OrderedDict[str, Any]:
        """This rank's stages, unsharded (collective over the tp group, each
        gather waiting ``timeout``), keyed by the model's names: a stage's
        layer j is the model's layer ``first[s] + j``."""
        out: OrderedDict[str, Any] = OrderedDict()
        for s, st in zip(self.schedule.stages_of(self.pipeline.rank), self.stages):
            mine = self.names[self.first[s]:self.first[s] + self.counts[s]]
            if self.is_torch:
                state = (gather_state_dict(st.module, timeout=timeout) if self.sharded
                         else st.module.state_dict())
                assert state is not None        # root=None: on every tp rank
                for k, v in state.items():
                    out[model_key(mine, k)] = v.detach().contiguous()
            else:
                for name, layer in zip(mine, st.layers):
                    for j, p in enumerate(full_params(layer, timeout=timeout)):
                        out[f"{name}.{j}"] = p
        return out

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> IncompatibleKeys:
        """Load the whole model's state (keyed as ``state_dict()`` gives it,
        the model's own keys, unsharded) into this rank's stages: each takes
        its own entries, and with tp its own shards of them (no message).
        As torch's ``load_state_dict``: keys the model lacks, and keys of the
        model not given, raise ``KeyError`` (``strict=False``: ignored, a
        key not given leaves its tensor as it is; the return value names
        both, ``missing_keys`` and ``unexpected_keys``), and an entry not of
        its tensor's whole shape raises ``ValueError`` naming both shapes.
        Every rank knows every key's whole shape, so each error is raised
        on every rank, before any rank loads anything. A tensor the model
        holds under several names (tied weights) takes, on every stage
        holding a copy, the value of its last name given in the model's
        order, the one torch's load leaves in one process; one of its names
        is enough. Values are cast to the tensor's dtype, as torch's are."""
        rank = self.grid.comm.rank
        unexpected = [k for k in state if k not in self._expected]
        if strict and self._expected and unexpected:
            raise KeyError(f"rank {rank}: load_state_dict: "
                           f"{', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}"
                           f" not in the model (a checkpoint of another model?); "
                           f"strict=False ignores them")
        # every rank knows every key and its whole shape: a missing or misshapen one raises
        # on all before any loads (until the forty-second session a misshapen one raised
        # on its stage's ranks only, torch's half-loaded stage, after the other stages'
        # ranks had loaded theirs; those then waited in their next step)
        for k, v in state.items():
            want = self._expected.get(k)
            got = np.shape(v) if hasattr(v, "shape") or not self.is_torch else None
            if want is not None and got is not None and tuple(got) != want:
                raise ValueError(f"rank {rank}: load_state_dict: {k} is {tuple(got)} in the "
                                 f"state given, but {want} in the model")
        state = self._named_once(state)
        missing = [k for k in self._expected if k not in state]
        if strict and missing:
            raise KeyError(f"rank {rank}: load_state_dict: "
                           f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                           f"of the model not in the state given (strict=False leaves "
                           f"{'them' if len(missing) > 1 else 'it'} as it is)")
        for s, st in zip(self.schedule.stages_of(self.pipeline.rank), self.stages):
            mine = self.names[self.first[s]:self.first[s] + self.counts[s]]
            if not self.is_torch:      # None: not given, left as it is
                for name, layer in zip(mine, st.layers):
                    load_full_params(layer, [state.get(f"{name}.{j}")
                                             for j in range(len(layer.params()))])
                continue
            keys = {k: model_key(mine, k) for k in st.module.state_dict()}
            given = {k: state[m] for k, m in keys.items() if m in state}
            if self.sharded:
                load_full_state_dict(st.module, given, strict=strict)
            else:
                st.module.load_state_dict(given, strict=strict)
        if self._rest:      # (every rank: the last stage's loss may read them)
            import torch
            with torch.no_grad():
                for k, v in self._rest.items():
                    if k in state:
                        v.copy_(state[k])
        return IncompatibleKeys(missing, unexpected)

    def _named_once(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with each tensor the model holds under several names
        (an embedding tied to its head) under every one of them, each the
        value of its last name given in the model's order (what torch's load
        leaves in one process; Hugging Face's checkpoints name a tied weight
        once)."""
        if not self._aliases:
            return state
        names: dict[str, list[str]] = {}        # first key -> every key of its tensor
        for k, first in self._aliases.items():
            names.setdefault(first, [first]).append(k)
        out = dict(state)
        for keys in names.values():
            given = [k for k in keys if k in state]
            for k in keys:
                if given:
                    out[k] = state[given[-1]]
        return out

    def state_dict(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The whole model's state on world rank 0 (None elsewhere), keyed
        as the model's own ``state_dict()`` (torch: a module or parameter
        the model holds under several names is under each, as torch lists
        it, though a traced model's pieces name it once) or
        ``"layer.index"`` (numpy: see ``load_state``). Every rank must
        call it (a collective, as torch's full state dict of FSDP): a rank
        waiting for the others raises after ``timeout`` (default the
        job's), saying so, having made no tp collective and sent no state
        (``_all_called``), so the job's next step runs."""
        timeout = self._timeout if timeout is None else timeout
        try:
            return self._gathered_state(timeout)
        except MeshError as e:    # (it said "recv ... tag 1152921504606846976 timed out")
            if getattr(e, "from_abort", False):     # (another rank's error, told: as it is)
                raise
            if self._part_failed:       # (every rank called it: its own gather's error)
                raise _in_action(e, "job.state_dict(), gathering its tp shards") from None
            raise _in_action(e, "job.state_dict() gathers every stage on rank 0, so every "
                             "rank must call it (sd = job.state_dict(), then if rank == 0: "
                             "torch.save(sd, path))" + self._tp_after() + "; it waited "
                             "here") from None

    def _local_part(self, make: Callable[[], Any], what: str, timeout: float | None
                    ) -> tuple[Any, BaseException | None]:
        """``make()``: this rank's part of a state gather (its tp gathers),
        and the error it raised (None: none). Where it raises this rank's own
        error (not a collective's, which its peers learn of from the
        collective), the tp peers' next gather, which this rank will not
        make, fails on them at once naming it (they waited in it until their
        timeout, then were a collective apart: the job's steps after failed
        on every rank). Then the tp ranks tell each other whether their part
        failed (``_tp_agreed``): a rank whose part ran is given GatherFailed
        where a peer's failed, and all take the same collective number. Its
        error is returned, never raised: the pp ranks are told it first."""
        tp = self.grid.group("tp") if self.sharded and _size(self.grid, "tp") > 1 else None
        out, failed = None, None
        try:
            out = make()
        except BaseException as e:
            failed = e
            if tp is not None and not isinstance(e, MeshError):
                collectives.abandon(tp, f"{what} failed on tp rank {tp.rank}: "
                                    f"{type(e).__name__}: {e}"[:400], AbortKind.of(e))
        if tp is not None:
            try:
                failed = _tp_agreed(tp, timeout, failed, what) or failed
            except MeshError as e:      # (a peer lost: the pp ranks are told it, or this)
                failed = failed or e
        return out, failed

    def _tp_after(self) -> str:
        """What a gather's failure leaves of the job, with tp (its error's)."""
        if not self.sharded or _size(self.grid, "tp") < 1 + 1:
            return ""
        if self._in_tp_gather:      # (the words came, one a lone call's left unread)
            return ("; its tp peers' next tp collective fails at once, naming this (a step "
                    "then fails on every rank, rolled back, and the steps after it run)")
        return ("; it made no tp collective, so the job's next step runs (its tp peers "
                "number theirs as this rank does)")

    def _gathered_state(self, timeout: float | None) -> dict[str, Any] | None:
        self._in_tp_gather = self._part_failed = False
        if _coord(self.grid, "dp"):
            return None
        if self.sharded:
            _all_called(self.grid.group("tp"), timeout)
        self._in_tp_gather = self.sharded
        # (tp: its peers' gathers, in the same time)
        local, failed = self._local_part(lambda: self._local_state(timeout),
                                         "job.state_dict()", timeout)
        self._in_tp_gather, self._part_failed = False, failed is not None
        if _coord(self.grid, "tp"):
            _raised(failed)
            return None
        pp = self.grid.group("pp")
        _all_called(pp, timeout, failed, "job.state_dict()")
        _raised(failed)
        if pp.rank:
            pp.send(list(local), 0, tag=_STATE_TAG, timeout=timeout)
            for i, v in enumerate(local.values()):
                pp.send(v, 0, tag=_STATE_TAG + 1 + i, timeout=timeout)
            return None
        state = dict(local)
        for src in range(1, pp.size):
            keys = pp.recv(src, tag=_STATE_TAG, timeout=timeout)
            for i, k in enumerate(keys):
                state[k] = pp.recv(src, tag=_STATE_TAG + 1 + i, timeout=timeout)
        for k, v in self._rest.items():     # what no stage holds: this rank's own copy
            state.setdefault(k, v.detach().clone())
        for k, first in self._aliases.items():    # a shared module's other names, as torch's
            if k not in state and first in state:
                state[k] = state[first]
        if self._keys is not None:            # a traced model: its own keys, in its order
            at = {k: i for i, k in enumerate(self._keys)}
            return dict(sorted(state.items(), key=lambda kv: at.get(kv[0], len(at))))
        order = {n: i for i, n in enumerate(self.names)}
        return dict(sorted(state.items(), key=lambda kv: order[kv[0].split(".")[0]]))

    # ---- the optimizer's state, whole, by the model's parameter names (torch DCP's
    # full optimizer state dict: get_optimizer_state_dict(..., full_state_dict=True))

    def _canonical(self) -> list[tuple[str, Any]]:
        """``named_parameters()``, each named as one process's model's
        ``named_parameters()`` names it: a tied tensor by its first name."""
        return [(self._aliases.get(n, n), p) for n, p in self.named_parameters()]

    def _torch_only(self, what: str) -> None:
        if not self.is_torch:
            raise TypeError(f"rank {self.grid.comm.rank}: {what}: an engine.layers model's "
                            f"SGD keeps no state; it takes a torch optimizer's")

    def optimizer_state_dict(self, opt: Any, timeout: float | None = None
                             ) -> dict[str, Any] | None:
        """The whole state of ``opt`` (a torch optimizer made on this rank's
        ``job.parameters()``, as on every rank, or a list of several, as
        DCP's ``get_optimizer_state_dict`` takes it: their groups one after
        another) on world rank 0, None
        elsewhere, as ``state_dict()`` returns the model, keyed by the
        parameters' names in the one-process model (its ``named_parameters()``:
        a tied tensor under its first name), in torch DCP's format
        (``get_optimizer_state_dict(model, opt, options=StateDictOptions(
        full_state_dict=True))``): ``{"state": {name: {"exp_avg": ...,
        "step": ...}}, "param_groups": [{"lr": ..., "params": [name, ...]}]}``,
        each group's parameters in the optimizer's order, as DCP lists them
        (over several pp ranks: stage by stage, each stage's in its rank's
        optimizer's order), and the states in the groups' order. A tensor
        of a tp shard's shape (Adam's ``exp_avg``) is gathered as
        its parameter is, whole; each stage gives its own parameters'; dp
        replicas hold the same, replica 0's is taken; a scalar (``step``) or
        any other value as it is. ``load_optimizer_state_dict`` loads it
        into any layout's job (another dp, pp or tp), or DCP's
        ``set_optimizer_state_dict`` into one process's model and optimizer.
        An ``engine.ZeroRedundancyOptimizer`` (ZeRO stage 1: each dp replica
        holds its share's state) gives the same dict: its shares are
        gathered on dp replica 0 first (engine.zero).
        Every rank must call it (a collective); rank 0 waiting for the others'
        stages raises after ``timeout`` (default the job's), saying so."""
        self._torch_only("optimizer_state_dict")
        timeout = self._timeout if timeout is None else timeout
        zeros = self._zeros(opt, "optimizer_state_dict")
        self._part_failed = False
        try:
            for z in zeros:      # (each replica's share on dp rank 0, whose state is then whole)
                z.consolidate_state_dict(0, timeout)
            return self._gathered_optimizer(_one_optimizer(opt), timeout)
        except MeshError as e:
            if getattr(e, "from_abort", False):     # (another rank's error, told: as it is)
                raise
            if self._part_failed:       # (every rank called it: its own gather's error)
                raise _in_action(e, "job.optimizer_state_dict(opt), gathering its tp "
                                 "shards") from None
            raise _in_action(e, "job.optimizer_state_dict(opt) gathers every stage's optimizer "
                             "state on rank 0, so every rank must call it" + self._tp_after()
                             + "; it waited here") from None
        finally:
            for z in zeros:
                z.state.clear()
                z.consolidated = False

    def _zeros(self, opt: Any, what: str) -> list[Any]:
        """The engine.ZeroRedundancyOptimizers among ``opt`` (one or a list),
        each checked to shard over this job's dp group; torch's own
        ZeroRedundancyOptimizer, whose shares this cannot see, refused."""
        out = []
        dp = self.grid.group("dp").ranks if "dp" in self.grid.axes else None
        for o in (opt if isinstance(opt, (list, tuple)) else [opt]):
            if type(o).__name__ == "ZeroRedundancyOptimizer" and \
                    type(o).__module__.startswith("torch.distributed"):
                raise TypeError(f"rank {self.grid.comm.rank}: {what}: torch's "
                                f"ZeroRedundancyOptimizer keeps each rank's share of the state "
                                f"in its .optim, out of this job's sight (its .state is empty): "
                                f"use engine.ZeroRedundancyOptimizer(job.parameters(), "
                                f"torch.optim.AdamW, job, lr=...), which the job gathers")
            if hasattr(o, "consolidate_state_dict") and hasattr(o, "consolidated"):
                if dp is None or list(o.group.ranks) != list(dp):
                    raise ValueError(f"rank {self.grid.comm.rank}: {what}: the "
                                     f"ZeroRedundancyOptimizer shards over ranks "
                                     f"{list(o.group.ranks)}, not this job's dp group "
                                     f"{dp}: make it with process_group=job")
                out.append(o)
        return out

    def _named_groups(self, opt: Any, where: str) -> tuple[list[list[str]],
                                                           dict[int, tuple[Any, int]]]:
        """Each of ``opt``'s param groups as its parameters' names (one
        process's model's: ``_canonical``), and the tp cut of each sharded
        parameter, by id (``param_shards``)."""
        names = {id(p): n for n, p in self._canonical()}
        cuts: dict[int, tuple[Any, int]] = {}
        if self.sharded:
            for st in self.stages:
                cuts.update(param_shards(st.module))
        groups = []
        for g in opt.param_groups:
            stray = next((p for p in g["params"] if id(p) not in names), None)
            if stray is not None:
                raise ValueError(f"{where}: the optimizer holds a {tuple(stray.shape)} tensor "
                                 f"that is not in job.parameters() (make the optimizer of "
                                 f"job.parameters() or job.named_parameters())")
            groups.append([names[id(p)] for p in g["params"]])
        return groups, cuts

    def _local_optimizer(self, opt: Any) -> tuple[dict[str, dict[str, Any]],
                                                  list[tuple[dict[str, Any], list[str]]]]:
        """This rank's part of ``opt``'s state by parameter name, tp shards
        gathered whole (collective over the tp group), and its groups'
        hyperparameters, each with its parameters' names."""
        where = f"rank {self.grid.comm.rank}: optimizer_state_dict"
        named, cuts = self._named_groups(opt, where)
        state: dict[str, dict[str, Any]] = {}
        groups = [({k: v for k, v in g.items() if k != "params"}, held)
                  for g, held in zip(opt.param_groups, named)]
        names = {id(p): n for g, held in zip(opt.param_groups, named)
                 for p, n in zip(g["params"], held)}
        for g in opt.param_groups:     # (every tp rank in the same order: the gathers pair)
            for p in g["params"]:
                own = opt.state.get(p)
                if not own:
                    continue
                cut = cuts.get(id(p))
                mine: dict[str, Any] = {}
                for k, v in own.items():
                    if not is_tensor(v) or v.dim() == 0 or cut is None:
                        mine[k] = v.detach().clone() if is_tensor(v) else copy.deepcopy(v)
                    elif v.shape != p.shape:
                        raise ValueError(f"{where}: {names[id(p)]}'s {k} is {tuple(v.shape)}, "
                                         f"not its tp shard's shape {tuple(p.shape)}: this "
                                         f"optimizer's state cannot be gathered as the "
                                         f"parameter is")
                    else:
                        mine[k] = gather_like(cut, v)
                state[names[id(p)]] = mine
        return state, groups

    def _gathered_optimizer(self, opt: Any, timeout: float | None) -> dict[str, Any] | None:
        self._in_tp_gather = self._part_failed = False
        if _coord(self.grid, "dp"):
            return None
        if self.sharded:
            _all_called(self.grid.group("tp"), timeout)
        self._in_tp_gather = self.sharded
        made, failed = self._local_part(lambda: self._local_optimizer(opt),
                                        "job.optimizer_state_dict(opt)", timeout)
        state, groups = made if failed is None else ({}, [])
        self._in_tp_gather, self._part_failed = False, failed is not None
        if _coord(self.grid, "tp"):
            _raised(failed)
            return None
        pp = self.grid.group("pp")
        _all_called(pp, timeout, failed, "job.optimizer_state_dict(opt)")
        _raised(failed)
        tensors = [(n, k) for n, own in state.items() for k, v in own.items() if is_tensor(v)]
        stage = self._stage_of()
        staged = [(h, [(n, stage[n]) for n in ns]) for h, ns in groups]
        if pp.rank:      # (msgpack, no pickle: rank 0 compares the groups' values by repr)
            plain = {n: {k: None if is_tensor(v) else v for k, v in own.items()}
                     for n, own in state.items()}
            told = [({k: repr(v) for k, v in h.items()}, ns) for h, ns in staged]
            pp.send([plain, told, tensors], 0, tag=_OPTIM_TAG, timeout=timeout)
            for i, (n, k) in enumerate(tensors):
                pp.send(state[n][k], 0, tag=_OPTIM_TAG + 1 + i, timeout=timeout)
            return None
        whole = dict(state)
        hyper = [h for h, _ in groups]
        held: list[list[tuple[str, int]]] = [[] for _ in staged]
        seen: list[set[str]] = [set() for _ in staged]

        def add(j: int, ns: Any) -> None:
            for n, st in ns:    # (a tied tensor's copies, on two stages: one name, the first)
                if n not in seen[j]:
                    seen[j].add(n)
                    held[j].append((n, st))
        for j, (_, ns) in enumerate(staged):
            add(j, ns)
        for src in range(1, pp.size):
            plain, theirs, tensors = pp.recv(src, tag=_OPTIM_TAG, timeout=timeout)
            for i, (n, k) in enumerate(tensors):
                plain[n][k] = pp.recv(src, tag=_OPTIM_TAG + 1 + i, timeout=timeout)
            for n, own in plain.items():     # (a tied tensor's copies hold the same)
                whole.setdefault(n, own)
            if len(theirs) != len(groups):
                raise ValueError(f"rank 0: optimizer_state_dict: the optimizer has "
                                 f"{len(groups)} param groups on rank 0 but {len(theirs)} on "
                                 f"{self._pp_peer(src)}: make it alike on every rank (a "
                                 f"group may be empty)")
            for j, ((h, ns), mine) in enumerate(zip(theirs, hyper)):
                said = {k: repr(v) for k, v in mine.items()}
                differ = [k for k in {*h, *said} if h.get(k) != said.get(k)]
                if differ:
                    k = sorted(differ)[0]
                    raise ValueError(f"rank 0: optimizer_state_dict: param group {j}'s {k} is "
                                     f"{said.get(k)} on rank 0 but {h.get(k)} on "
                                     f"{self._pp_peer(src)}: one process's optimizer has "
                                     f"one value per group")
                add(j, ns)
        # each group's in the optimizer's order, as DCP's (over pp ranks, the stages' in
        # the model's: a stage's parameters are its rank's, in its optimizer's order); the
        # state in the groups' order, as DCP's
        names = [[n for n, _ in (sorted(ns, key=lambda e: e[1]) if pp.size > 1 else ns)]
                 for ns in held]
        return {"state": {n: whole[n] for ns in names for n in ns if n in whole},
                "param_groups": [{**h, "params": ns} for h, ns in zip(hyper, names)]}

    def _stage_of(self) -> dict[str, int]:
        """The stage of each of this rank's parameters, by name
        (``_canonical``'s)."""
        out: dict[str, int] = {}
        for s, st in zip(self.schedule.stages_of(self.pipeline.rank), self.stages):
            ids = {id(p) for p in st.module.parameters()}
            out.update((n, s) for n, p in self._canonical() if id(p) in ids and n not in out)
        return out

    def _pp_peer(self, src: int) -> str:
        """pp rank ``src`` of this rank's pp group, as a world rank."""
        return f"rank {self.grid.group('pp').ranks[src]} (pp stage rank {src})"

    def load_optimizer_state_dict(self, opt: Any, state: dict[str, Any]) -> None:
        """Load a whole optimizer state (``optimizer_state_dict``'s, of any
        layout, or torch DCP's full one) into ``opt``, this rank's optimizer
        (made on ``job.parameters()``, its groups as the saved one's; or a
        list of optimizers, their groups one after another): each
        parameter's state, cut to this rank's shard where tp shards it, and
        each group's hyperparameters (a group is matched by its parameters'
        names). Every rank checks every name and every tensor's shape
        against the whole model before any rank loads anything, and raises
        alike (a name the model lacks: ``KeyError``; a tensor neither a
        scalar nor of its parameter's whole shape: ``ValueError`` naming
        both shapes). A parameter with no state given keeps none, as
        torch's. Every rank must call it: before any loads, the ranks tell
        each other whether each could cut its part (a rank whose optimizer
        groups its parameters otherwise than the state, or that was given
        None, the state on rank 0 only, makes every rank raise, naming it).
        An ``engine.ZeroRedundancyOptimizer`` keeps its share's state."""
        self._torch_only("load_optimizer_state_dict")
        where = f"rank {self.grid.comm.rank}: load_optimizer_state_dict"
        fault: Exception | None = None
        opt = _one_optimizer(opt)
        try:
            local = self._checked_cut(opt, state, where)
        except (TypeError, KeyError, ValueError) as e:
            fault = e
        # (every rank hears of any rank's fault before one loads: nothing half-loaded; a
        # state given on rank 0 only, None on the others, left rank 0 waiting here)
        said = None if fault is None else [type(fault).__name__, str(fault)]
        told = collectives.all_gather_object(self.grid.comm, said, timeout=self._timeout)
        if fault is not None:
            raise fault
        bad = next(((r, t) for r, t in enumerate(told) if t is not None), None)
        if bad is not None:
            r, (kind, text) = bad
            raise {"KeyError": KeyError, "TypeError": TypeError}.get(kind, ValueError)(
                f"{where}: not loaded, rank {r} could not: {text}")
        opt.load_state_dict(local)

    def _checked_cut(self, opt: Any, state: Any, where: str) -> dict[str, Any]:
        """``state`` checked against the whole model, then cut as this rank's
        ``opt.state_dict()`` (``_cut_optimizer``)."""
        if not isinstance(state, dict) or not isinstance(state.get("state"), dict) or \
                not isinstance(state.get("param_groups"), list):
            rank0 = (": job.optimizer_state_dict(opt) returns it on rank 0 only, None on the "
                     "others; give every rank the whole state (torch.load it on each)"
                     if state is None else "")
            raise TypeError(f"{where}: takes {{'state': {{name: {{...}}}}, 'param_groups': "
                            f"[...]}}, what job.optimizer_state_dict(opt) returns (or DCP's "
                            f"get_optimizer_state_dict with full_state_dict=True), not a "
                            f"{type(state).__name__}"
                            f"{f' of {list(state)[:4]}' if isinstance(state, dict) else ''}"
                            f"{rank0}")
        named = [*state["state"], *(n for g in state["param_groups"] for n in g.get("params", ()))]
        if any(not isinstance(n, str) for n in named):
            raise TypeError(f"{where}: takes the state by parameter name, not an optimizer's "
                            f"own opt.state_dict() (by index: {named[:4]}); on one process "
                            f"DCP's get_optimizer_state_dict(model, opt, options="
                            f"StateDictOptions(full_state_dict=True)) gives it by name")
        unknown = [n for n in named if n not in self._expected]
        if unknown:
            more = " ..." if len(unknown) > 4 else ""
            raise KeyError(f"{where}: {', '.join(unknown[:4])}{more} not a parameter of the "
                           f"model (the state of another model?)")
        for n, own in state["state"].items():
            want = self._expected[n]
            for k, v in own.items():
                got = tuple(v.shape) if hasattr(v, "shape") else ()
                if got != () and got != want:
                    raise ValueError(f"{where}: {n}'s {k} is {got} in the state given, but {n} "
                                     f"is {want} in the model")
        # by the one-process model's names (a tied tensor given under another of its names)
        given: dict[str, dict[str, Any]] = {}
        for n, own in state["state"].items():
            given.setdefault(self._aliases.get(n, n), own)
        homes = [{self._aliases.get(n, n) for n in g.get("params", ())}
                 for g in state["param_groups"]]
        return self._cut_optimizer(opt, state, given, homes, where)

    def _cut_optimizer(self, opt: Any, state: dict[str, Any], given: dict[str, Any],
                       homes: list[set[str]], where: str) -> dict[str, Any]:
        """This rank's ``opt.state_dict()`` of the whole ``state``: each
        parameter's state cut to its shard, each group's hyperparameters."""
        named, cuts = self._named_groups(opt, where)
        holds = getattr(opt, "holds", None)     # ZeRO: its share's state only, not cut for all
        local: dict[str, Any] = {"state": {}, "param_groups": []}
        i = 0
        for j, (g, ns) in enumerate(zip(opt.param_groups, named)):
            at = sorted({h for n in ns for h, home in enumerate(homes) if n in home})
            lost = [n for n in ns if not any(n in home for home in homes)]
            if lost:
                raise KeyError(f"{where}: {', '.join(lost[:4])} in param group {j} of the "
                               f"optimizer but in no param group of the state given")
            if len(at) > 1:
                raise ValueError(f"{where}: param group {j}'s parameters are in the state's "
                                 f"groups {at}: group the optimizer as the one that saved it")
            src = state["param_groups"][at[0]] if at else (
                state["param_groups"][j] if j < len(state["param_groups"]) else g)
            local["param_groups"].append({**{k: v for k, v in src.items() if k != "params"},
                                          "params": list(range(i, i + len(ns)))})
            for p, n in zip(g["params"], ns):
                own = given.get(n)
                if own is not None and (holds is None or holds(p)):
                    cut = cuts.get(id(p))
                    local["state"][i] = {
                        k: (cut_like(cut, v) if cut is not None and is_tensor(v) and v.dim()
                            else v.detach().clone() if is_tensor(v) else copy.deepcopy(v))
                        for k, v in own.items()}
                i += 1
        return local


def far_off(steps: Sequence[float], predicted: float | None, name: str,
            by: float = _FAR_OFF) -> str | None:
    """What to tell a user whose steps (seconds, rank 0's, the first left
    out) took a median over ``by`` times the prediction, or under its
    ``1/by``: the machine loaded by others since distribute's re-time (a
    step took 5.4x its prediction on a loaded host, and nothing said so),
    or quieter, or batches of other sizes than the sample; None where the
    median is within that."""
    if not steps or not predicted:
        return None
    median = sorted(steps)[(len(steps) - 1) // 2]
    ratio = median / predicted
    if 1 / by <= ratio <= by:
        return None
    why = ("the machine may be loaded (others' processes on its cores since the re-time)"
           if ratio > by else "the machine may have been loaded while distribute timed it")
    return (f"{name}'s steps took {median * 1e3:.2f} ms (rank 0's median of {len(steps)}, "
            f"the first left out), {ratio:.1f}x job.predicted ({predicted * 1e3:.2f} ms): "
            f"{why}, or the batches are not the sample's size; job.retime() predicts again "
            f"as the machine is now")


def _replica_state(stage: Any) -> list[Any]:
    """What a dp replica takes from replica 0 when the job is built, as
    DDP's start does: a torch stage's parameters, frozen ones too, and its
    buffers (a BatchNorm's statistics, a random projection made in
    ``__init__``), as arrays sharing their memory; an engine.layers stage's
    ``params()``. Until the thirty-sixth session only the trainable
    parameters went: ranks seeded apart (for their data) kept frozen
    weights and buffers of their own, and trained another model than one
    process's, with nothing said."""
    module = getattr(stage, "module", None)
    if module is None or not hasattr(module, "buffers"):
        return list(stage.params())
    seen: set[int] = set()
    out = []
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(_view(t.detach()))
    return out


# what a shard tells as the whole tensor would (``x.to(self.wte.weight.dtype)``)
_LIKE_WHOLE = ("dtype", "device", "is_cuda", "requires_grad")


def _shards_read(grid: Grid, source: Any, pieces: list[Any]) -> None:
    """Refuse a traced forward that reads a parameter the plan sharded
    itself, not through its module (a head tied as ``F.linear(x,
    self.tok.weight)`` beside a ``vocab`` embedding): the piece would
    compute with this rank's shard as if it were the whole tensor (a part of
    the logits on each tp rank, taken for the whole: another loss on each,
    or an index error in the loss). Reading only its dtype or device is
    no such read. Every rank traced the same forward and raises alike,
    before any step."""
    for piece in pieces:
        for n in piece.graph.nodes:
            if n.op != "get_attr":
                continue
            path, _, attr = n.target.rpartition(".")
            try:
                owner = source.get_submodule(path)
            except AttributeError:
                continue
            meta = getattr(owner, "_tp", None)
            if meta is None or attr not in meta.dims or all(
                    u.op == "call_function" and u.target is getattr and len(u.args) > 1
                    and u.args[1] in _LIKE_WHOLE for u in n.users):
                continue
            shard = tuple(getattr(owner, attr).shape)
            raise PlanError(
                f"rank {grid.comm.rank}: engine.distribute: {type(source).__name__}.forward "
                f"reads {n.target} itself (not by calling {path}), but the plan shards {path} "
                f"({meta.style.style}): each tp rank would compute with its {shard} shard of "
                f"it as if it were the whole tensor, a wrong result; make the reader a module "
                f"the plan shards alike (an nn.Linear head tied to it, planned colwise), or "
                f"leave {path} unplanned")


def _aliases(model: Any) -> dict[str, str]:
    """A torch model's state keys whose tensor an earlier key holds too (a
    module or parameter held under two names), each with that first key:
    what ``Job.state_dict`` fills in where the stages name it once."""
    items = model if isinstance(model, (list, tuple)) else [model]
    prefix = isinstance(model, (list, tuple))
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for i, m in enumerate(items):
        if not _is_torch(m):
            continue
        for k, v in m.state_dict(keep_vars=True).items():
            key = f"{i}.{k}" if prefix else k
            if first.setdefault(id(v), key) != key:
                out[key] = first[id(v)]
    return out


def _rest(source: Any, pieces: Any, loss: Any, aliases: dict[str, str]
          ) -> OrderedDict[str, Any]:
    """A traced model's state entries that none of its pieces holds (a
    module its forward never calls, a pooler; a buffer only its loss reads,
    a criterion's class weights), each the tensor itself (the loss's own,
    where it holds it): no stage returns them, yet a single-process copy's
    ``load_state_dict`` needs every key, so ``Job.state_dict`` adds them as
    built (no gradient reaches them) and ``Job.load_state_dict`` loads them."""
    held = {k for piece in pieces for k in piece.state_dict()}    # (the model's own names)
    own = loss.state_dict(keep_vars=True) if _is_torch(loss) else {}
    return OrderedDict((k, own.get(k, v)) for k, v in source.state_dict(keep_vars=True).items()
                       if k not in held and k not in aliases)


def _real_rest(source: Any, loss: Any, rest: dict[str, Any]) -> OrderedDict[str, Any]:
    """``rest`` (``_rest``) of a model on the meta device made real on the
    CPU, in the model and its loss alike: zeros, then each module holding
    only such tensors reset (``reset_parameters()``); a warning names those
    left zeros until ``job.load_state_dict`` fills them (a criterion's class
    weights: the loss reads zeros until then)."""
    import warnings

    import torch
    real: OrderedDict[str, Any] = OrderedDict()
    for k, v in rest.items():
        if v.is_meta:
            new = torch.zeros(v.shape, dtype=v.dtype)
            if isinstance(v, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=v.requires_grad)
            path, _, attr = k.rpartition(".")
            for holder in (source, loss) if _is_torch(loss) else (source,):
                try:
                    m = holder.get_submodule(path)
                except AttributeError:
                    continue
                for held in (m._parameters, m._buffers):
                    if held.get(attr) is v:
                        held[attr] = new
            v = new
        real[k] = v
    bare = []
    for name, m in source.named_modules():
        mine = [f"{name}.{n}".lstrip(".") for n, _ in
                [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]]
        mine = [k for k in mine if k in real]
        if not mine or not rest[mine[0]].is_meta:
            continue
        if callable(getattr(m, "reset_parameters", None)) and len(mine) == len(
                m._parameters) + len(m._buffers) - len(m._non_persistent_buffers_set):
            m.reset_parameters()
        else:
            bare += mine
    if bare:
        warnings.warn(f"engine.distribute: made from the meta device, "
                      f"{', '.join(bare[:4])}{' ...' if len(bare) > 4 else ''} (in no stage: "
                      f"the loss's, or never read by the forward) are zeros until "
                      f"job.load_state_dict() fills them", stacklevel=3)
    return real


def _state_shapes(named: list[tuple[str, Any]], is_torch: bool) -> dict[str, tuple[int, ...]]:
    """The whole model's state keys (``Job.state_dict``'s), every name of a
    module held under several, from its layers as ``_model_layers`` names
    them, each with its unsharded shape."""
    if is_torch:
        return {f"{n}.{k}": tuple(v.shape) for n, m in named for k, v in m.state_dict().items()}
    return {f"{n}.{j}": shape for n, layer in named for j, shape in enumerate(full_shapes(layer))}


def _on_meta(model: Any) -> bool:
    """Whether a torch model (or list of modules) has its parameters on the
    meta device."""
    mods = model if isinstance(model, (list, tuple)) else [model]
    return any(p.is_meta for m in mods if _is_torch(m) for p in m.parameters())


def _materialize(stage: Any, init: Callable[[Any], Any] | None
                 ) -> tuple[list[str], list[str]]:
    """A stage of meta modules made real on the CPU, zeros (``to_empty``
    leaves whatever the memory held), then filled: ``init(stage)``, or
    every submodule's ``reset_parameters()``; returns the names of those
    with tensors and no ``reset_parameters`` (left zeros), and of their
    buffers out of the state dict (``persistent=False``: a causal mask,
    position ids), which no ``load_state_dict`` fills."""
    import torch
    stage.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*stage.parameters(), *stage.buffers()]:
            t.zero_()
    if init is not None:
        init(stage)
        return [], []
    bare, unsaved = [], []
    for name, m in stage.named_modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
        elif [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            bare.append(name)
            unsaved += [f"{name}.{b}".lstrip(".") for b in sorted(m._non_persistent_buffers_set)
                        if m._buffers.get(b) is not None]
    return bare, unsaved


class DistributeFailed(MeshError):
    """engine.distribute's own timing of the model (its profile, a job's
    ``retime()``, which call ``loss_fn``) failed on another rank, whose own
    error (a KeyboardInterrupt there) is the root cause."""

    from_abort = True
    __module__ = "engine"     # its public home: reports and pickles name it there


class GatherFailed(MeshError):
    """A job's state gather (``state_dict()``, ``optimizer_state_dict()``)
    failed on another rank, whose own error is the root cause."""

    from_abort = True
    __module__ = "engine"     # its public home: reports and pickles name it there


def _tp_agreed(tp: Comm, timeout: float | None, failed: BaseException | None,
               what: str) -> MeshError | None:
    """After a state gather's tp part (``what``: the call), each tp rank's
    word to tp rank 0 (its part's error, ``failed``, and its collective
    number), and rank 0's answer, point to point: GatherFailed naming the
    ranks that failed, for a rank whose own part ran, where any failed (None
    elsewhere); and every rank takes the highest number, as a failed
    step's (a peer whose part had made no more gathers skips the one its
    failed peer abandoned, which failed its next step)."""
    ch = tp.collective_channel()
    me = tp.ranks[tp.rank]
    said = None if failed is None else f"rank {me}: {type(failed).__name__}: {failed}"[:400]
    if tp.rank:
        tp.send([said, ch.seq], 0, tag=_DONE_TAG, timeout=timeout)
        told, top = tp.recv(0, tag=_DONE_TAG, timeout=timeout)
    else:
        words = [tp.recv(r, tag=_DONE_TAG, timeout=timeout) for r in range(1, tp.size)]
        bad = [w for w in [said] + [w for w, _ in words] if w is not None]
        told, top = ("; ".join(bad) if bad else None), max([ch.seq] + [q for _, q in words])
        for r in range(1, tp.size):
            tp.send([told, top], r, tag=_DONE_TAG, timeout=timeout)
    if told is None:
        return None
    ch.seq = max(ch.seq, int(top))
    return None if failed is not None else GatherFailed(
        f"rank {me}: {what} failed on {told}; nothing was gathered")


def _raised(failed: BaseException | None) -> None:
    """Raise ``failed`` (this rank's own error, once the others are told)."""
    if failed is not None:
        raise failed


def _all_called(g: Comm, timeout: float | None, failed: BaseException | None = None,
                what: str = "") -> None:
    """Wait until every rank of ``g`` called this too (a job's gather of its
    state or its optimizer's, over tp or pp): each tells group rank 0, which
    answers them all once it has every word, point to point. A rank that
    calls it alone times out here having sent nothing else: no tp collective
    taken (its peers' next ones, a step's, numbered as its own: a timed-out
    gather took a number they had not, and their next step failed), and no
    stage's state left for rank 0's next call to take as its own (a pp rank
    alone sent its state unasked, and returned None: the next checkpoint
    held that stage as it was then). It withdraws its word (``_word``), so
    rank 0's next call waits for its next one.
    A rank whose own part ``failed`` (``what``: the call) says so in its
    word, and group rank 0 in its answers: every rank of the group then
    raises at once (GatherFailed naming it; the failed rank its own error,
    which the caller raises), having sent no state, so no answer or state
    is left unread for the next call."""
    if g.size < 2:
        return
    me = g.ranks[g.rank]
    said = None if failed is None else f"rank {me}: {type(failed).__name__}: {failed}"[:400]
    if g.rank:
        n = next(_CALLS)
        g.send([n, said, False], 0, tag=_HERE_TAG, timeout=timeout)
        if failed is not None:
            return
        try:
            told = _answer(g, n, timeout)
        except MeshError:
            try:    # (withdrawn: rank 0's next call takes this rank's next word, not this)
                g.send([n, None, True], 0, tag=_HERE_TAG, timeout=timeout)
            except MeshError:
                pass
            raise
        if told is not None:
            raise GatherFailed(f"rank {me}: {what} failed on {told}; nothing was gathered")
        return
    words: dict[int, Any] = {}
    for r in range(1, g.size):
        try:
            words[r] = _word(g, r, timeout)
        except MeshError:
            if failed is None:
                raise
            break            # (this rank's own error is raised)
    bad = [w for _, w in words.values() if w is not None]
    told = said if said is not None else "; ".join(bad) if bad else None
    for r, (n, w) in words.items():
        if w is None:
            g.send([n, told], r, tag=_HERE_TAG, timeout=timeout)
    if failed is None and bad:
        raise GatherFailed(f"rank {me}: {what} failed on {told}; nothing was gathered")


_CALLS = itertools.count()      # this rank's words' numbers (_all_called), each call its own


def _word(g: Comm, r: int, timeout: float | None) -> tuple[int, str | None]:
    """Rank ``r``'s word for this call (``_all_called``, on group rank 0):
    its number and what it said. A word that rank withdrew (its lone call
    timed out) does not count: each is followed by its withdrawal, so the
    last word there, not withdrawn, is this call's (a lone call's word,
    taken for the next call's, made rank 0 answer it: that rank's next lone
    call took the answer for its own and sent its stage's state unasked,
    returning None, and the checkpoint after held that stage as it was)."""
    word = None
    while word is None or g.iprobe(r, _HERE_TAG) is not None:
        n, said, gone = g.recv(r, tag=_HERE_TAG, timeout=timeout)
        word = None if gone else (int(n), said)
    return word


def _answer(g: Comm, n: int, timeout: float | None) -> str | None:
    """Group rank 0's answer to this rank's word ``n`` (``_all_called``): an
    answer to an earlier word (rank 0 took it as this rank withdrew it) is
    skipped."""
    end = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if end is None else max(end - time.monotonic(), 0.0)
        m, told = g.recv(0, tag=_HERE_TAG, timeout=left)
        if m == n:
            return told


class _Rows:
    """A batch of several inputs (a tuple: ``(input_ids, attention_mask)``)
    as one: its length is its rows, a slice of it the tuple of its parts'
    slices (what the first stage takes)."""

    def __init__(self, parts: tuple[Any, ...]) -> None:
        self.rows = rows_of(parts)
        self.parts = parts

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, rows: slice) -> tuple[Any, ...]:
        return tuple(p[rows] for p in self.parts)


class _Temp:
    """A layer of a meta model, as a stage to time: a real copy of it
    (``_materialize``d, timing needs no trained weights) made when first
    used and dropped when another layer makes its own, so timing holds one
    layer's memory at a time."""

    def __init__(self, layer: Any, init: Callable[[Any], Any] | None,
                 current: list[Any]) -> None:
        self._layer, self._init, self._current = layer, init, current   # current: [the one]
        self._stage: Any = None

    def _real(self) -> Any:
        if self._stage is None:
            if self._current[0] is not None:
                self._current[0]._stage = None
            real = copy.deepcopy(self._layer)
            _materialize(real, self._init)
            self._stage = TorchStage(real)
            self._current[0] = self
        return self._stage

    def __getattr__(self, name: str) -> Any:     # forward, backward..., grads
        return getattr(self._real(), name)


def _loss_target(loss_fn: Callable[[Any, Any], Any], y: Any) -> Any:
    """A target to time the loss on (Job.retime): the model's output on the
    sample micro-batch itself, a copy, when the loss takes it (a regression
    loss, a soft-label cross entropy); else, for a torch output, class
    indices of its leading axes (a cross entropy over the last axis: a
    language model's); else None (the loss is left out of the prediction)."""
    tries = [lambda: copy.deepcopy(y)]
    if is_tensor(y) and y.dim() >= 2:
        tries.append(lambda: y.new_zeros(y.shape[:-1], dtype=sys.modules["torch"].long))
    for make in tries:
        target = make()
        try:
            loss_fn(y, target)
        except Exception:
            continue
        return target
    return None


def load_state(model: Any, state: dict[str, Any]) -> None:
    """Load ``Job.state_dict()`` into a single-process copy of the model:
    torch's ``load_state_dict``, or the numpy layers' arrays in place."""
    if _is_torch(model):
        model.load_state_dict(state)
        return
    named, _ = _model_layers(model)
    for name, layer in named:   # all checked first: numpy would broadcast a (1,) bias
        for j, p in enumerate(layer.params()):
            if f"{name}.{j}" not in state:
                raise KeyError(f"load_state: {name}.{j} of the model not in the state given")
            if tuple(np.shape(state[f"{name}.{j}"])) != p.shape:
                raise ValueError(f"load_state: {name}.{j} is "
                                 f"{tuple(np.shape(state[f'{name}.{j}']))} in the state "
                                 f"given, but {p.shape} in the model")
    for name, layer in named:
        for j, p in enumerate(layer.params()):
            p[...] = state[f"{name}.{j}"]


def distribute(model: Any, grid: Grid | Comm, plan: dict[str, str] | None = None,
               schedule: str | Schedule = "auto", microbatches: int | None = None,
               balance: Any = "time", sample: Any = None,
               loss_fn: Callable[[Any, Any], Any] | None = None,
               memory_limit: float | None = None, *, chunks: int = 2,
               timeout: float | None = None, reps: int = 3, verbose: bool = True,
               overhead: float | None = None, tag_base: int = 0,
               init: Callable[[Any], Any] | None = None,
               recompute: bool | str | Sequence[str] = False) -> Job:
    """Partition ``model`` over the grid's pp axis, shard it by ``plan``
    over tp, and build the pipeline (gradients averaged over dp).

    ``schedule``: "auto" (simulate ``engine.choose.SCHEDULES`` at the
    micro-batch counts ``microbatches`` or p, 2p, 4p...; print the
    candidates on rank 0 when ``verbose``), a name ("1f1b"...) or a Schedule.
    ``balance``: "time" (measured on ``sample``, this replica's batch;
    replicas' samples of unequal rows are all cut to the fewest, so every
    rank profiles and chooses alike),
    "uniform", "parameters" or layer counts per stage. A plain module
    whose forward takes several inputs (``forward(input_ids,
    attention_mask, labels)``) is given its sample as a tuple of them,
    and each step's inputs the same way: ``step((ids, mask), labels)``.
    ``memory_limit``: bytes of activations a rank may hold (for torch
    layers what autograd saves for their backward, measured on the sample
    by the profile; for numpy layers the arrays their forward's context
    holds: engine.choose.held_by, stage_held).
    ``overhead``: the executor's own seconds per compute action, and no
    message time, in the prediction; None (the default) measures both on a
    dry pipeline (engine.calibrate) when the layers are measured.
    ``tag_base``: as Pipeline's, for several jobs on one grid.
    ``recompute``: activation checkpointing (Pipeline's ``recompute``):
    each stage keeps only its input between a micro-batch's forward and
    backward and runs its forward again there; the candidates cost it (a
    second forward in each backward) and count its peak memory, so a
    ``memory_limit`` that no schedule met may be met so. ``"auto"``: each
    schedule is simulated both ways (and, where keeping puts some of its
    ranks over ``memory_limit``, recomputing in those ranks' stages only),
    and recompute runs only where the fastest candidate under
    ``memory_limit`` needs it (no limit: never). A str other than
    ``"auto"``, or a list of them: selective recompute, the submodules
    whose names match (fnmatch patterns over the model's own names, as a
    plan's: ``"blocks.*.attn"``) recompute and the rest keep
    (engine.torch_stage.checkpoint_modules, applied before the layers are
    timed, so the profile's times and held bytes are the recomputing
    ones): torch models only. An engine.layers model recomputes whole
    stages (engine.layers.Recompute).
    A torch model built on the meta device (``with torch.device("meta"):``)
    holds no memory: each rank makes only its own stages (with a plan, its
    own shards of them) real, on the CPU, as zeros that ``init(stage)``
    fills (default: every submodule's ``reset_parameters()``), or load a
    trained state with ``job.load_state_dict`` (on any job; with tp each
    rank cuts its own shards); its layers (and candidate stages) are timed
    on real copies, one at a time.
    Collective: every rank of the grid calls it with the same arguments."""
    fault: BaseException | None = None
    try:        # this rank's own arguments: raised by every rank (_same_model)
        if microbatches is not None and (isinstance(microbatches, bool) or not isinstance(
                microbatches, numbers.Integral) or microbatches < 1):
            raise ValueError(f"microbatches={microbatches!r}: a whole number of at least 1 "
                             "(or None: schedule='auto' tries p, 2p, 4p...)")
        microbatches = None if microbatches is None else int(microbatches)
        patterns = () if recompute == "auto" else patterns_of(recompute)
        if not patterns and recompute not in (False, True, "auto"):
            raise ValueError(f"recompute={recompute!r}: True, False, 'auto' or submodule name "
                             "patterns (a str or a list of them)")
        on_meta = _on_meta(model)
        source = model
        own_loss: Any = None        # the traced model's own loss, where it is the pipeline's
        n_inputs = inputs_of(sample)
        if loss_fn is not None:
            _takes_two(loss_fn)
        if traceable(model):        # a plain nn.Module: its forward's pieces (engine.traced)
            model = sequential(source, target=loss_fn is None, inputs=n_inputs, sample=sample)
            own_loss = model.loss
            if loss_fn is not None and model.returned is not None:
                loss_fn = given_as_returned(loss_fn, model.returned)
            loss_fn = loss_fn or own_loss
        named, is_torch = _model_layers(model)
    except (TypeError, ValueError) as e:
        if not isinstance(grid, (Grid, Comm)):
            raise                   # (no grid to tell)
        fault, patterns, named, is_torch, own_loss = e, (), [], False, None
    # the stages' recompute (Pipeline's, costed by candidates): none when selective
    way: bool | str = recompute if isinstance(recompute, (bool, str)) and not patterns else False
    grid = _as_grid(grid)
    sample = _agreed_sample(grid, sample, timeout)
    try:        # (checked alike on every rank, the sample agreed; told in _same_model)
        if fault is not None:
            raise fault             # (no more to check)
        if patterns and not is_torch:
            raise ValueError(f"recompute={recompute!r} (submodules by name) needs a torch "
                             "model: an engine.layers model recomputes whole stages "
                             "(recompute=True or 'auto')")
        if loss_fn is None:
            raise ValueError("no loss_fn= given: pass loss_fn(output, target) -> loss")
        if plan and "tp" not in grid.names:
            raise ValueError(f"a tensor-parallel plan needs a grid with a tp axis, got "
                             f"{grid.axes}")
        p = grid.size("pp")
        L = len(named)
        if p > L:
            raise ValueError(f"the model has {L} layers"
                             f"{few(getattr(model, 'traced_from', None), L)}: it cannot fill "
                             f"pp={p} pipeline stages")
        auto = isinstance(schedule, str) and schedule == "auto"
        if (auto or balance == "time" or recompute == "auto") and sample is None:
            what = ("schedule=auto" if auto else "balance=time" if balance == "time"
                    else "recompute=auto")
            raise ValueError(f"{what} measures the layers: "
                             "pass sample= (a batch of inputs as step() will get)")
        if isinstance(sample, tuple):     # several inputs: sliced together, by rows
            sample = _Rows(sample)
        tp = _size(grid, "tp")

        if isinstance(schedule, Schedule):
            if schedule.num_ranks != p:
                raise ValueError(f"schedule {schedule.name!r} has {schedule.num_ranks} ranks, "
                                 f"the grid's pp axis {p}")
            schedule.validate()     # (a ScheduleError: before any layer is timed)
            scheds = [schedule]
        else:
            rows = len(sample) if sample is not None else 0
            if microbatches is not None:
                ms = [microbatches]
            else:
                ms = microbatch_counts(p, rows) if rows else [2 * p]
            if not ms:      # fewer rows than pipeline ranks: not even one micro-batch a rank
                raise ValueError(f"{p} micro-batches (one a pipeline rank, the fewest tried at "
                                 f"pp={p}) need a batch of at least {p} rows; the sample has "
                                 f"{rows}")
            if rows and ms[0] > rows:
                raise ValueError(f"{ms[0]} micro-batches need a batch of at least {ms[0]} "
                                 f"rows; the sample has {rows}")
            if not auto:
                by_name(schedule, p, ms[0], chunks)       # an unknown name raises here
            scheds = builtin(SCHEDULES if auto else [schedule], p, ms, chunks)
            if not scheds:
                raise ValueError(f"no schedule {schedule!r} for pp={p} at micro-batch counts "
                                 f"{ms}")
        fit = [s for s in scheds if s.num_stages <= L]      # before any layer is timed
        if not fit:
            what = "every candidate schedule needs at least" if auto else \
                f"schedule {scheds[0].name} needs"
            raise ValueError(f"the model has {L} layers: {what} "
                             f"{min(s.num_stages for s in scheds)} pipeline stages on pp={p}, "
                             f"a layer each at least")
        scheds = fit
        _valid_balance(balance, L)
        if patterns:
            _recompute_names(source, patterns, traced=source is not model)
    except (TypeError, ValueError) as e:
        fault = e
    _same_model(grid, named, is_torch, fault, timeout)
    assert loss_fn is not None
    aliases = _aliases(source) if is_torch else {}    # (before a plan shards the model)
    shapes = (_state_shapes(named, is_torch) if source is model    # (and whole shapes)
              else {k: tuple(v.shape) for k, v in source.state_dict().items()})
    if plan:        # the whole model, so the plan's names are the model's own; then every
        parallelize(source, grid.group("tp"), plan)   # layer is timed sharded, collectives in
        if not is_torch:    # (a colwise output into a Linear left whole: known now, on every rank)
            refuse_fed_whole(source)
        if source is not model:       # traced again: the pieces hold the sharded modules
            model = sequential(source, target=model.loss is not None, inputs=n_inputs,
                               sample=sample.parts if isinstance(sample, _Rows) else sample)
            _shards_read(grid, source, [*model, *([model.loss] if model.loss else [])])
        named, _ = _model_layers(model)
    if patterns:    # selective recompute, before any layer is timed: the profile sees it
        _checkpoint_model(source, patterns, traced=source is not model)
    params = [param_count(layer, "module" if is_torch else "layer") for _, layer in named]
    # with a dp axis, the dry runs average stand-ins of the gradients as the steps
    # will: the step's end (those averages, the loss's and the outcome's
    # all-reduces) is then in the candidates' figures, not only in the re-time's
    grads = [_grad_bytes(layer) for _, layer in named] if _size(grid, "dp") > 1 else None
    runs = _TP_RUNS if plan and tp > 1 else None      # tp peers time a layer together
    cands: list[Candidate] = []
    skipped: list[tuple[Schedule, str]] = []    # candidates whose layers failed, and why
    chosen: Candidate | None = None
    sched = scheds[0]
    cal: Calibration | None = None
    if sample is not None:         # measured: the cut by time, the choice, the prediction
        # no collection of a large heap inside the figures; the random streams and
        # the layers' buffers put back after (the layers' dropouts draw, and their
        # BatchNorms count, as often as they are timed)
        with collected(), kept_random(), kept_buffers(*[layer for _, layer in named]):
            rows = len(sample)
            sizes = sorted({-(-rows // s.num_microbatches) for s in scheds})
            # (a meta model's layers are timed on real copies, one layer at a time)
            current: list[Any] = [None]
            mlayers = [(_Temp(layer, init, current) if on_meta else TorchStage(layer))
                       if is_torch else layer for _, layer in named]
            # where the ranks outnumber a host's cores the simulator shares them, so
            # each layer is timed in its thread's CPU: its wall, every rank timing at
            # once, held that sharing already (the table ran long twice over)
            clock = time.thread_time if shared_cores(hosts(grid.comm), p) else time.perf_counter
            profile, broken = _profile(grid, mlayers, sample, sizes, reps, runs, clock)
            if broken:      # (alike on every rank) those micro-batch sizes' candidates cannot run
                skipped = [(sc, f"micro-batches of {size} row{'s' if size > 1 else ''}: "
                                f"{broken[size]}") for sc in scheds
                           for size in [-(-rows // sc.num_microbatches)] if size in broken]
                scheds = [sc for sc in scheds if -(-rows // sc.num_microbatches) not in broken]
                sizes = [size for size in sizes if size not in broken]
                if not scheds:
                    raise ValueError(
                        f"rank {grid.comm.rank}: engine.distribute: no candidate schedule can "
                        f"run, its layers fail on micro-batches of every size tried: " + "; ".join(
                            f"{size} row{'s' if size > 1 else ''}: {_cut(why)}"
                            for size, why in sorted(broken.items())))
            cal = Calibration(overhead or 0.0, 0.0)
            action: float | dict[int, float] = cal.action
            message: float | dict[int, float] = cal.message
            receive: float | dict[int, float] = cal.receive
            if overhead is None:
                m = max(sc.num_microbatches for sc in scheds)
                mid = profile[sizes[len(sizes) // 2]]       # a middle candidate's actions
                spin = sum(lc.F + lc.B for lc in mid.values()) / (2 * p)
                even = (_stage_grads(grads, counts_for("uniform", p, None, params),
                                     [grid.coord("pp")]) if grads is not None else None)
                on = grid if grads is not None else None
                cal = calibrate(grid.comm, grid.group("pp"), m,
                                _median_act(profile[-(-rows // m)]),
                                tag_base=tag_base, timeout=timeout, spin=min(spin, 0.01),
                                busy_nbytes=_median_act(mid), tensors=is_torch,
                                grid=on, grads=even)
                action, message, receive = {m: cal.action}, {m: cal.message}, {m: cal.receive}
                for k in sorted({sc.num_microbatches for sc in scheds} - {m}):
                    # the executor's costs at each micro-batch count tried (engine.calibrate)
                    d = dry_run(grid.comm, grid.group("pp"), one_f_one_b(p, k),
                                _median_act(profile[-(-rows // k)]), tag_base=tag_base,
                                timeout=timeout, tensors=is_torch, grid=on, grads=even)
                    action[k], message[k], receive[k] = d.action, d.message, d.receive
            # (a torch stage copies its floating input: the first stage's, a micro-batch's)
            ins = {size: _copied(sample[:size]) for size in sizes} if is_torch else None
            cands = candidates(profile, params, rows, scheds, balance, 1.0, memory_limit,
                               action, message, helper=cal.helper, recv=receive, cores=cal.cores,
                               recompute=way, inputs=ins, copies=is_torch, layers=is_torch)
            spans = stage_spans(cands, rows)
            whole: dict[int, dict[Span, LayerCost]] = {}
            if spans:          # the cuts' stages, timed whole: what the steps will pay
                def join(first: int, stop: int) -> Any:
                    stage = make_stage([layer for _, layer in named[first:stop]], first)
                    if on_meta:             # a real copy, for as long as it is timed
                        stage = copy.deepcopy(stage)
                        _materialize(stage, init)
                    return TorchStage(stage) if is_torch else stage
                whole = _profile_stages(grid, mlayers, join, sample, spans, reps, runs, clock)
                cands = candidates(profile, params, rows, scheds, balance, 1.0, memory_limit,
                                   action, message, whole, cal.helper, receive, cal.cores,
                                   way, ins, is_torch, is_torch)
            if not cands:
                raise ValueError(f"the model has {L} layers: too few for any schedule's stages")
            if auto and overhead is None:     # the leaders' own dry runs
                cands = _measured_choice(grid, cands, profile, whole, rows, cal.crowded,
                                         tag_base, timeout, tensors=is_torch, grads=grads)
            chosen = cands[0]
            if not chosen.fits:
                hint = ("" if way == "auto" or patterns else
                        "; recompute='auto', or submodule names to recompute "
                        "(recompute='blocks.*.attn'), may fit" if is_torch else
                        "; recompute='auto' may fit")
                raise ValueError(f"no schedule keeps its activations under memory_limit="
                                 f"{memory_limit:g} bytes{hint}:\n{table(cands, None, skipped)}")
            sched = chosen.schedule
    counts = chosen.counts if chosen else counts_for(balance, sched.num_stages, None, params)

    mine = sched.stages_of(grid.coord("pp"))
    cut = partition([layer for _, layer in named], sched.num_stages, balance=list(counts),
                    stages=mine, names=[n for n, _ in named])
    if on_meta:                  # this rank's stages only: the others stay without memory
        made = {s: _materialize(cut[s], init) for s in mine}
        bare = [f"stage {s}: {name}" for s in mine for name in made[s][0]]
        unsaved = [f"stage {s}: {name}" for s in mine for name in made[s][1]]
        if bare:
            import warnings
            warnings.warn(f"engine.distribute: made from the meta device, "
                          f"{', '.join(bare[:4])}{' ...' if len(bare) > 4 else ''} have no "
                          f"reset_parameters(): their tensors are zeros until init= or "
                          f"job.load_state_dict() fills them"
                          + (f"; but {', '.join(unsaved[:4])}{' ...' if len(unsaved) > 4 else ''}"
                             " (buffers with persistent=False) are in no state dict: only init= "
                             "fills them" if unsaved else ""), stacklevel=2)
    again = chosen.recompute if chosen is not None else bool(way)
    layered = chosen is not None and chosen.layered
    said = (f"engine.distribute: {sched.name} cuts the model into {cut}"      # (printed below)
            + (f"\n  ({'each stage recomputes' if again is True else recomputing(again)}"
               f"{', layer by layer' if layered else ''}: "
               "its forward again in its backward)" if again else "")
            + (f"\n  (recomputed in their backward: {', '.join(patterns)})"
               if patterns else ""))
    wrapped = torch_loss(loss_fn) if is_torch else loss_fn
    pipe = Pipeline(grid, [cut[s] for s in mine], sched, loss_fn=wrapped, timeout=timeout,
                    tag_base=tag_base, recompute=again, layered=layered)
    stages = [pipe.stages[s] for s in mine]
    if is_torch and not any(True for st in stages for _ in st.module.parameters()):
        import warnings
        names = [f"{n} ({type(layer).__name__})" for n, layer in named]
        held = "; ".join(f"stage {s}: {', '.join(names[sum(counts[:s]):sum(counts[:s + 1])])}"
                         for s in mine)
        warnings.warn(f"engine.distribute: rank {grid.comm.rank}'s stages hold no parameters "
                      f"({held}), so job.parameters() is empty there, which torch's "
                      f"optimizers refuse ('optimizer got an empty parameter list'): cut the "
                      f"model elsewhere (balance={list(counts)} now), or make the optimizer "
                      f"only where job.parameters() holds some", stacklevel=2)
    if _size(grid, "dp") > 1:        # every replica starts from replica 0's weights
        dp = grid.group("dp")
        for st in stages:
            for arr in _replica_state(st):
                collectives.broadcast(dp, arr, root=0)
    inputs: dict[int, Any] = {}
    target: Any = None
    messages: list[tuple[int, int]] | None = None
    if chosen is not None:       # for Job.retime: each own stage's input
        bounds = [sum(counts[:s]) for s in range(len(counts))]
        size = -(-len(sample) // sched.num_microbatches)
        xs = [sample[:size]]

        def own_inputs() -> tuple[dict[int, Any], Any]:
            with kept_random(), kept_buffers(*[None if isinstance(m, _Temp) else  # (copies)
                                               getattr(m, "module", None) for m in mlayers]):
                # (sharded: tp peers pass it through the same layers, collectives alike)
                while len(xs) <= (L if pipe.last else max(bounds[s] for s in mine)):
                    xs.append(mlayers[len(xs) - 1].forward(xs[-1])[0])
                return ({s: xs[bounds[s]] for s in mine},
                        _loss_target(wrapped, xs[-1]) if pipe.last else None)
        tp_group = grid.group("tp") if _size(grid, "tp") > 1 else None
        made, failed = _timing(grid.comm, tp_group, own_inputs)    # (loss_fn: a KeyboardInterrupt)
        _exchange(grid.comm, [], failed, tp_group)
        inputs, target = made
        if overhead is None:          # each stage's messages: its output, its input's gradient
            messages = _stage_messages(profile[size], tuple(counts))
    rest = _rest(source, model, own_loss, aliases) if source is not model else OrderedDict()
    if on_meta and rest:
        rest = _real_rest(source, own_loss, rest)
    keys = list(source.state_dict()) if source is not model else None
    job = Job(grid, pipe, stages, tuple(counts), [n for n, _ in named], is_torch, chosen, cands,
              bool(plan), cal, inputs, reps, messages, timeout, tag_base, target, keys, aliases,
              skipped, rest, shapes)
    if source is not model and getattr(model, "shaped", False) and sample is not None:
        # the pieces hold what the sample's shapes decided: traced again at other shapes
        own = [i for s in mine for i in range(sum(counts[:s]), sum(counts[:s + 1]))]
        entries = {sum(counts[:s]): inputs[s] for s in mine if s > 0 and s in inputs}
        job.reshaped = Reshaped(source, model, own, own_loss if pipe.last else None,
                                model.loss is not None, n_inputs, sample[:1], entries,
                                f"rank {grid.comm.rank} (pp rank {grid.coord('pp')})")
        pipe.reshaped = job.reshaped
    job.retime()
    if verbose and grid.comm.rank == 0 and job.predicted is not None:
        job.watched = []        # step() tells a median step far off the prediction, once
    if job.calibration is not None and chosen is not None:
        # the table simulated with the load the re-time fitted (others' processes
        # on the shared cores; none where it fitted none): its figures and ranking
        # those of the host the steps will find, as job.predicted's are
        job.candidates, job.profiled = under_load(cands, chosen, job.calibration.load)
        # every row as the re-time corrects the chosen one (its compute, the executor's
        # own costs, the messages, then the rest to job.predicted): rows compared by
        # figures 1.5-2.4x low otherwise (BENCHMARKS.md, forty-third session)
        job.profiled_candidates = job.candidates
        job._calibrate()
    if verbose and grid.comm.rank == 0:
        # a schedule named too: its row, cut and prediction (it printed nothing, and the
        # user who picked a row by name saw none of them)
        # the chosen row's figure is the profile's; the re-timed one, job.predicted, is
        # said right under the table with what moved it (a user took the row's 6.61 ms
        # for the prediction, 15.38 ms, of a step that measured 11.54)
        predicted = ("" if job.profiled is None or job.chosen is None else
                     "\nengine.distribute: " + retimed_said(job.profiled, job.chosen))
        if auto or job.candidates:
            print(f"engine.distribute: {dict(grid.axes)}, {L} layers; "
                  f"{'candidates' if auto else 'the schedule given'}:\n{job.table()}\n"
                  f"{legend(job.candidates, why=auto)}{predicted}\n{said}", flush=True)
        else:
            print(said + predicted, flush=True)
    return job
