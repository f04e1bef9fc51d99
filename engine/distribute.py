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
        loss = job.step(x, y)        # the global batch's mean loss, on every rank
        job.clip_grad_norm_(1.0)     # (optional) the whole model's norm, engine.clip
        opt.step()
    val = job.eval_step(x, y)        # forwards only, modules in eval mode for the call
    state = job.state_dict()         # the whole model on rank 0 (collective)
    optim = job.optimizer_state_dict(opt)    # opt's state, whole, by name (as DCP's full one)
    # ZeRO stage 1: opt = engine.ZeroRedundancyOptimizer(job.parameters(), torch.optim.AdamW,
    # job, lr=...): each dp replica keeps its share's state; the same calls (engine.zero)
    # another layout's job: job.load_state_dict(state); job.load_optimizer_state_dict(opt, optim)

A grid's ``sp`` axis splits axis 1 of every micro-batch's inputs and
targets (the sequence; evenly, or the step raises) over its ranks, and
``plan={"blocks.*.attn": "ulysses"}`` runs those modules'
``F.scaled_dot_product_attention`` over the whole sequence by Ulysses on
the sp group (engine.sp_axis, engine.ulysses); the sp ranks are dp
replicas to the rest (``SpGrid``: gradients averaged over dp x sp), which
with parts of equal length is one process's training on the whole batch.
sp runs beside dp and pp, not tp::

    grid = mesh.grid(world, dp=1, sp=2, pp=2)
    job = engine.distribute(model, grid, plan={"blocks.*.attn": "ulysses"}, sample=x,
                            loss_fn=F.mse_loss)
    loss = job.step(x, y)            # this dp replica's whole batch; each sp rank its part

A torch ``loss_fn(output, target)`` is an ordinary torch loss (the mean over
its micro-batch); a numpy one returns ``(loss, gradient)`` as
``engine.layers.mse_loss`` does. The executor weighs each micro-batch by its
rows, and dp averages, so a step's gradients are those of the mean loss over
the global batch: the same as one process training on all of it. A
per-token loss returns its sum and count instead (engine.per_token): the
step's loss is then every sum over every count. A mean cross entropy (the
traced model's own ``F.cross_entropy``, ``nn.CrossEntropyLoss()``) runs as
one (engine.per_token_loss).

This module is the call itself; its parts live beside it: engine.given (the
model, sample and grid checked), engine.distribute_schedules (``schedule=``
checked and resolved into candidates), engine.distribute_measure (the
measured phase: the layers timed, engine.layer_timing, and the schedule
chosen on those times, engine.measured_choice), engine.stage_state (a rank's
pieces' state), engine.job (the ``Job``) and engine.agree (what every rank
raises or says at once).
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

from mesh import Comm, Grid

from .calibrate import Calibration
from .choose import Candidate, LayerCost, counts_for, legend, recomputing, retimed_said
from .costs import by_type
from .executor import Pipeline
from .ir import Schedule
from .pipeline_args import _Rows
from .stagebuild import inputs_of, layer_classes, param_count
from .tensor_parallel import parallelize
from .partition import partition
from .traced import Reshaped, few, given_as_returned, sequential, traceable
from .torch_stage import patterns_of, torch_loss
from .tp_layers import refuse_fed_whole
from .agree import DistributeFailed, GatherFailed, _raised, _told
from .given import (_agreed_sample, _as_grid, _checkpoint_model, _held_before, _knobs,
                    _mark_held, _model_layers, _not_sharded, _recompute_names, _same_model,
                    _size, _takes_two, _valid_balance)
from .layer_timing import _exchange, _timing
from .measured_choice import _grad_bytes, _stage_messages
from .stage_state import (_aliases, _broadcast_replicas, _materialize, _on_meta, _real_rest,
                          _replica_state, _rest, _shards_read, _state_shapes, _unfilled)
from .job_retime import _own_inputs
from .job_state import load_state
from .job import IncompatibleKeys, Job, far_off
from .distribute_schedules import (_candidates_said, _microbatches_checked, _schedule_named,
                                   _schedules)
from .distribute_measure import _measured
from .sp_axis import SpGrid, seq_part, seq_parts, sp_group, sp_checked, split_plan

__all__ = ["distribute", "IncompatibleKeys", "Job", "load_state", "far_off", "DistributeFailed",
           "GatherFailed"]


def distribute(model: Any, grid: Grid | Comm, plan: dict[str, str] | None = None,
               schedule: str | Schedule | Sequence[str | Schedule | Callable[..., Any]] = "auto",
               microbatches: int | None = None,
               balance: Any = "time", sample: Any = None,
               loss_fn: Callable[[Any, Any], Any] | None = None,
               memory_limit: float | None = None, *, chunks: int = 2,
               timeout: float | None = None, reps: int = 3, verbose: bool = True,
               overhead: float | None = None, tag_base: int = 0,
               init: Callable[[Any], Any] | None = None,
               recompute: bool | str | Sequence[str] = False,
               layered: bool | int | Sequence[bool | int | None] | None = None) -> Job:
    """Partition ``model`` over the grid's pp axis, shard it by ``plan``
    over tp, and build the pipeline (gradients averaged over dp; an sp
    axis splits the sequence, the plan's ``"ulysses"`` entries naming the
    attentions that see all of it: the module docstring).

    ``schedule``: "auto" (simulate ``engine.choose.SCHEDULES`` at the
    micro-batch counts ``microbatches`` or p, 2p, 4p...; print the
    candidates on rank 0 when ``verbose``), a name ("1f1b"...), a Schedule,
    or a list of candidates ranked as "auto" ranks the built-ins: names
    (at those counts; "auto" in it: every built-in), Schedules of your
    own (each as it is, its own micro-batches; verified first) and
    families of your own (``make(p, m) -> Schedule``, made and verified at
    those counts), the same list on every rank. A candidate that cannot run (more stages than the
    model has layers, interleaved at ``microbatches % pp``) is a row of
    the table saying why.
    ``balance``: "time" (measured on ``sample``, this replica's batch;
    replicas' samples of unequal rows are all cut to the fewest, so every
    rank profiles and chooses alike),
    "uniform", "parameters", "type:REGEX" (DeepSpeed's: the layers whose class
    matches spread evenly, engine.costs.by_type) or layer counts per
    stage. A plain module
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
    ``layered``: how a torch stage that recomputes does (Pipeline's
    ``layered``): None (the default) whole, layer by layer or in runs of
    N layers (each N from 2 to one fewer than the stage's layers),
    whichever its rank's peak is lowest with (ties: the first of those),
    chosen for each rank's stages on their own (the table then says
    ``recomputed by 2,3 layers`` where they differ); False whole; True
    layer by layer; an int N in runs of N layers (Megatron's
    ``--recompute-num-layers``); a list of those, one per stage (None:
    whole), the candidates of another number of stages left out: each
    costed and counted so (engine.choose.layer_by_layer).
    A torch model built on the meta device (``with torch.device("meta"):``)
    holds no memory: each rank makes only its own stages (with a plan, its
    own shards of them) real, on the CPU, as zeros that ``init(stage)``
    fills (default: every submodule's ``reset_parameters()``), or load a
    trained state with ``job.load_state_dict`` (on any job; with tp each
    rank cuts its own shards); its layers (and candidate stages) are timed
    on real copies, one at a time.
    Collective: every rank of the grid calls it with the same arguments."""
    plan, ulysses = split_plan(plan)      # ("ulysses" entries: the sp axis's, engine.sp_axis)
    sample, sp_fault = _sp_sample(grid, sample)
    given = _given_alone(model, grid, schedule, microbatches, recompute, sample, loss_fn)
    given.fault = given.fault or sp_fault
    _layered_checked(layered, recompute)
    # the stages' recompute (Pipeline's, costed by candidates): none when selective
    way: bool | str = (recompute if isinstance(recompute, (bool, str)) and not given.patterns
                       else False)
    grid = _as_grid(grid)
    if "sp" in grid.names:      # the sp ranks: dp replicas to the pipeline (engine.sp_axis)
        grid = SpGrid(grid)
    sample = _agreed_sample(grid, sample, timeout)
    asked = _checked_together(given, grid, plan, schedule, balance, sample, recompute, chunks,
                              ulysses)
    _same_model(grid, given.named, given.is_torch, given.fault, timeout,
                None if given.fault is not None else _held_before(given.source, len(given.named)),
                given.listed, given.mades,
                _knobs(microbatches=microbatches, recompute=recompute, layered=layered,
                       chunks=chunks, memory_limit=memory_limit, overhead=overhead, reps=reps,
                       tag_base=tag_base, balance=balance,
                       schedule=schedule.lower().replace("_", "-") if isinstance(schedule, str)
                       else None))
    assert asked is not None and given.loss_fn is not None
    ready = _prepared(given, grid, plan, asked.sample, ulysses)
    found = _found(grid, given, asked, ready, way, plan=plan, init=init, reps=reps,
                   memory_limit=memory_limit, overhead=overhead, tag_base=tag_base,
                   timeout=timeout, layered=layered)
    sched = found.sched
    counts, mine, cut, made = _cut_own(grid, given, found, asked, ready, init, timeout)
    # (a later distribute of this object refuses layers trained on other ranks only; over
    # several pp ranks its own forward refuses to run)
    _mark_held(given.source, asked.layers, _own_layers(counts, mine),
               f"rank {grid.comm.rank} (pp rank {grid.coord('pp')})")
    unfilled = _unfilled(made) if given.on_meta else None
    if unfilled:
        import warnings
        warnings.warn(unfilled, stacklevel=2)
    again = found.chosen.recompute if found.chosen is not None else bool(way)
    layered = found.chosen.layered if found.chosen is not None else bool(way) and (
        layered or False)
    said = _cut_said(sched, cut, again, layered, given.patterns)     # (printed by _retimed)
    wrapped = torch_loss(given.loss_fn) if given.is_torch else given.loss_fn
    pipe, stages, replicas, failed = _pipeline(grid, cut, mine, sched, wrapped, again, layered,
                                               timeout, tag_base)
    # (the peers that time their layers together: tp's, or sp's)
    tp_group = grid.group("tp") if _size(grid, "tp") > 1 else sp_group(grid)
    inputs, target, messages = _retime_inputs(grid, tp_group, found, counts, mine, asked,
                                              wrapped, pipe, failed, overhead, timeout)
    job, failed = _made_job(grid, given, found, asked, ready, counts, mine, pipe, stages,
                            replicas, inputs, target, messages, plan=plan, reps=reps,
                            timeout=timeout, tag_base=tag_base)
    _retimed(grid, job, failed, found, tp_group, plan=plan, verbose=verbose, auto=asked.auto,
             layers=asked.layers, said=said, timeout=timeout)
    assert job is not None
    return job


def _sp_sample(grid: Any, sample: Any) -> tuple[Any, ValueError | None]:
    """The sample cut to this sp rank's part of its sequence (engine.sp_axis),
    and the error where it cannot be (told by every rank, ``_same_model``)."""
    if sample is None or not isinstance(grid, Grid) or "sp" not in grid.names \
            or grid.size("sp") < 2:
        return sample, None
    try:
        return seq_part(sample, grid.group("sp"), "sample="), None
    except ValueError as e:
        return sample, e


@dataclass
class _Given:
    """The model as distribute cuts it and what this rank's own arguments
    said, from ``_given_alone`` (updated where a plan traces the sharded
    model again, ``_prepared``). ``fault``: this rank's own error in its
    arguments, told to every rank in ``_same_model``."""
    source: Any                 # the model as given
    model: Any                  # what is cut: source, or its forward's pieces (engine.traced)
    loss_fn: Callable[[Any, Any], Any] | None
    microbatches: int | None
    fault: BaseException | None = None
    listed: list[str] | None = None     # schedule=[...]: what this rank passed (_same_model)
    mades: list[list[str]] | None = None    # what became of its own schedules (_same_model)
    patterns: tuple[str, ...] = ()      # selective recompute's submodule name patterns
    named: list[tuple[str, Any]] = field(default_factory=list)
    is_torch: bool = False
    own_loss: Any = None        # the traced model's own loss, where it is the pipeline's
    on_meta: bool = False
    n_inputs: int = 1


def _given_alone(model: Any, grid: Grid | Comm, schedule: Any, microbatches: Any,
                 recompute: Any, sample: Any, loss_fn: Callable[[Any, Any], Any] | None
                 ) -> _Given:
    """This rank's own arguments checked, before any rank speaks to another
    (the grid and sample are not agreed yet), and a plain torch module
    traced into layers. A TypeError or ValueError is kept as the result's
    ``fault``, for every rank raises it at once (``_same_model``); without a
    grid to tell it is raised here."""
    given = _Given(model, model, loss_fn, microbatches)
    try:        # this rank's own arguments: raised by every rank (_same_model)
        given.microbatches = _microbatches_checked(microbatches)
        _schedule_named(schedule, given.microbatches)
        given.listed = _candidates_said(schedule)
        given.patterns = () if recompute == "auto" else patterns_of(recompute)
        if not given.patterns and recompute not in (False, True, "auto"):
            raise ValueError(f"recompute={recompute!r}: True, False, 'auto' or submodule name "
                             "patterns (a str or a list of them)")
        _not_sharded(model)         # (an earlier distribute's plan= cut it in place)
        given.on_meta = _on_meta(model)
        given.n_inputs = inputs_of(sample)
        if loss_fn is not None:
            _takes_two(loss_fn)
        if traceable(model):        # a plain nn.Module: its forward's pieces (engine.traced)
            given.model = sequential(model, target=loss_fn is None, inputs=given.n_inputs,
                                     sample=sample)
            given.own_loss = given.model.loss
            if loss_fn is not None and given.model.returned is not None:
                given.loss_fn = given_as_returned(loss_fn, given.model.returned)
            given.loss_fn = given.loss_fn or given.own_loss
        given.named, given.is_torch = _model_layers(given.model)
    except (TypeError, ValueError) as e:
        if not isinstance(grid, (Grid, Comm)):
            raise                   # (no grid to tell)
        given.fault, given.patterns, given.named, given.is_torch, given.own_loss = \
            e, (), [], False, None
    return given


@dataclass
class _Asked:
    """What the arguments ask for, checked against the grid and the model
    (``_checked_together``): the candidate schedules (``unrun``: the rows of
    those that cannot run, and why), ``balance`` resolved, the sample (its
    several inputs as one ``_Rows``), the model's layer count, the tp size,
    and whether the schedule is chosen among candidates (``auto``)."""
    auto: bool
    sample: Any
    layers: int
    tp: int
    scheds: list[Schedule]
    unrun: list[tuple[str, int, str]]
    balance: Any


def _checked_together(given: _Given, grid: Grid, plan: dict[str, str] | None, schedule: Any,
                      balance: Any, sample: Any, recompute: Any, chunks: int,
                      ulysses: Sequence[str] = ()) -> _Asked | None:
    """The checks that need the grid or the agreed sample: alike on every
    rank, so a TypeError or ValueError here becomes ``given.fault`` (None
    returned), told with the rest in ``_same_model``; the schedules to
    choose among made."""
    try:        # (checked alike on every rank, the sample agreed; told in _same_model)
        if given.fault is not None:
            raise given.fault       # (no more to check)
        if given.patterns and not given.is_torch:
            raise ValueError(f"recompute={recompute!r} (submodules by name) needs a torch "
                             "model: an engine.layers model recomputes whole stages "
                             "(recompute=True or 'auto')")
        if given.loss_fn is None:
            raise ValueError("no loss_fn= given: pass loss_fn(output, target) -> loss")
        sp_checked(getattr(grid, "outer", grid), list(ulysses), given.source,
                   given.source is not given.model, given.is_torch)
        if plan and "tp" not in grid.names:
            raise ValueError(f"a tensor-parallel plan needs a grid with a tp axis, got "
                             f"{grid.axes}")
        p = grid.size("pp")
        L = len(given.named)
        if p > L:
            raise ValueError(f"the model has {L} layers"
                             f"{few(getattr(given.model, 'traced_from', None), L)}: it cannot "
                             f"fill pp={p} pipeline stages")
        auto = isinstance(schedule, (list, tuple)) or isinstance(schedule, str) and \
            schedule == "auto"
        if (auto or balance == "time" or recompute == "auto") and sample is None:
            what = ("schedule=auto" if auto else "balance=time" if balance == "time"
                    else "recompute=auto")
            raise ValueError(f"{what} measures the layers: "
                             "pass sample= (a batch of inputs as step() will get)")
        if isinstance(sample, tuple):     # several inputs: sliced together, by rows
            sample = _Rows(sample)
        tp = _size(grid, "tp")

        given.mades = []
        scheds, unrun = _schedules(schedule, p, L, len(sample) if sample is not None else 0,
                                   given.microbatches, chunks, given.mades)
        _valid_balance(balance, L)
        if isinstance(balance, str) and balance.startswith("type:"):    # (layers' classes)
            balance = by_type(balance, [layer_classes(layer, "module" if given.is_torch
                                                      else "layer")
                                        for _, layer in given.named])
        if given.patterns:
            _recompute_names(given.source, given.patterns, traced=given.source is not given.model)
    except (TypeError, ValueError) as e:
        given.fault = e
        return None
    return _Asked(auto, sample, L, tp, scheds, unrun, balance)


@dataclass
class _Prepared:
    """The model made ready to be timed (``_prepared``), and what is read
    off it first. ``early``: this rank's own error there (a
    KeyboardInterrupt as the plan shards it), told in the first exchange
    that follows (the profile's, or, with nothing measured, the cut's)."""
    early: BaseException | None = None
    aliases: dict[str, Any] = field(default_factory=dict)
    shapes: dict[str, Any] = field(default_factory=dict)
    params: list[int] = field(default_factory=list)
    grads: list[Any] | None = None


def _prepared(given: _Given, grid: Grid, plan: dict[str, str] | None, sample: Any,
              ulysses: Sequence[str] = ()) -> _Prepared:
    """The whole model's state names and shapes read (before a plan shards
    it), the plan applied (a traced model traced again, so its pieces hold
    the shards), selective recompute set, and each layer's parameter count
    and, with a dp axis, its gradients' stand-ins for the dry runs."""
    ready = _Prepared()
    source, is_torch = given.source, given.is_torch
    try:
        ready.aliases = _aliases(source) if is_torch else {}   # (before a plan shards the model)
        ready.shapes = (_state_shapes(given.named, is_torch) if source is given.model
                        else {k: tuple(v.shape) for k, v in source.state_dict().items()})
        if ulysses:     # the named attentions over the whole sequence, on the sp group
            from .ulysses import ulysses_attention      # (torch: imported on first use)
            ulysses_attention(source, grid.group("sp"), list(ulysses))
        if plan:        # the whole model, so the plan's names are the model's own; then every
            parallelize(source, grid.group("tp"), plan)   # layer timed sharded, collectives in
            if not is_torch:    # (a colwise output into a Linear left whole: known on every rank)
                refuse_fed_whole(source)
            if source is not given.model:     # traced again: the pieces hold the sharded modules
                model = given.model = sequential(
                    source, target=given.model.loss is not None, inputs=given.n_inputs,
                    sample=sample.parts if isinstance(sample, _Rows) else sample)
                _shards_read(grid, source, [*model, *([model.loss] if model.loss else [])])
            given.named, _ = _model_layers(given.model)
        if given.patterns:  # selective recompute, before any layer is timed: the profile sees it
            _checkpoint_model(source, given.patterns, traced=source is not given.model)
        ready.params = [param_count(layer, "module" if is_torch else "layer")
                        for _, layer in given.named]
        # with a dp axis, the dry runs average stand-ins of the gradients as the steps
        # will: the step's end (those averages, the loss's and the outcome's
        # all-reduces) is then in the candidates' figures, not only in the re-time's
        ready.grads = ([_grad_bytes(layer) for _, layer in given.named]
                       if _size(grid, "dp") > 1 else None)
    except BaseException as e:
        ready.early = e
    return ready


class _Found(NamedTuple):
    """The schedule to run (``sched``) and what choosing it left
    (engine.distribute_measure's ``_Measured``): without a sample, nothing
    measured, and the first candidate."""
    cands: list[Candidate]
    chosen: Candidate | None
    cal: Calibration | None
    profile: dict[int, dict[int, LayerCost]]
    mlayers: list[Any]          # the layers as timed (a meta model's: real copies)
    skipped: list[tuple[str, int, str]]   # candidates that cannot run, and why
    sched: Schedule


def _layered_checked(layered: Any, recompute: Any) -> None:
    """``distribute``'s ``layered``: None, a bool or an int >= 1, or a list
    or tuple, one per stage, of bools and ints (None: False), with a
    ``recompute`` of whole stages (True or "auto") where it asks for any."""
    each = list(layered) if isinstance(layered, (list, tuple)) else [layered]
    if not each or any(n is not None and (not isinstance(n, int) or n < 0) for n in each):
        raise ValueError(f"layered={layered!r}: None (chosen), False, True (layer by layer), "
                         f"an int N >= 1 (runs of N layers), or a list of those, one per "
                         f"stage (None: whole)")
    if any(each) and recompute not in (True, "auto"):
        raise ValueError(f"layered={layered!r} is how a stage that recomputes does: it needs "
                         f"recompute=True or 'auto', not recompute={recompute!r}")


def _found(grid: Grid, given: _Given, asked: _Asked, ready: _Prepared, way: bool | str, *,
           plan: dict[str, str] | None, init: Callable[[Any], Any] | None, reps: int,
           memory_limit: float | None, overhead: float | None, tag_base: int,
           timeout: float | None, layered: Any = None) -> _Found:
    """The schedule: measured (the cut by time, the choice, the prediction:
    engine.distribute_measure) where there is a sample, else the one given.
    ``ready.early`` is told in the measured phase's first exchange."""
    if asked.sample is None:
        return _Found([], None, None, {}, [], list(asked.unrun), asked.scheds[0])
    m = _measured(
        grid, given.named, asked.sample, asked.scheds, list(asked.unrun), ready.early,
        is_torch=given.is_torch, on_meta=given.on_meta, init=init, reps=reps,
        tp_runs=bool(plan) and asked.tp > 1 or sp_group(grid) is not None,  # (sp: alike)
        params=ready.params, grads=ready.grads,
        balance=asked.balance, memory_limit=memory_limit, overhead=overhead, way=way,
        patterns=given.patterns, auto=asked.auto, tag_base=tag_base, timeout=timeout,
        layered=layered)
    return _Found(m.cands, m.chosen, m.cal, m.profile, m.mlayers, m.skipped, m.chosen.schedule)


def _cut_own(grid: Grid, given: _Given, found: _Found, asked: _Asked, ready: _Prepared,
             init: Callable[[Any], Any] | None, timeout: float | None
             ) -> tuple[tuple[int, ...], tuple[int, ...], Any, dict[int, Any]]:
    """The layers per stage (the chosen candidate's, else by ``balance``),
    this rank's stages, the cut, and (a meta model) this rank's stages
    made real, the others left without memory. Every rank's error here (or
    ``ready.early``, where nothing was measured to tell it) is told before
    any returns, so all raise at once."""
    failed = None
    sched = found.sched
    try:        # (this rank's own error told before the Pipeline's exchanges)
        _raised(ready.early if asked.sample is None else None)      # (not told in a profile)
        counts = (found.chosen.counts if found.chosen else
                  counts_for(asked.balance, sched.num_stages, None, ready.params))
        mine = sched.stages_of(grid.coord("pp"))
        cut = partition([layer for _, layer in given.named], sched.num_stages,
                        balance=list(counts), stages=mine, names=[n for n, _ in given.named])
        # this rank's stages only: the others stay without memory
        made = {s: _materialize(cut[s], init) for s in mine} if given.on_meta else {}
    except BaseException as e:
        failed = e
    _told(grid.comm, failed, timeout)
    return counts, mine, cut, made


def _span(counts: Sequence[int], s: int) -> range:
    """The layers of stage ``s`` when stages hold ``counts`` layers each."""
    return range(sum(counts[:s]), sum(counts[:s + 1]))


def _own_layers(counts: Sequence[int], mine: Sequence[int]) -> list[int]:
    """The layers of this rank's stages ``mine``, in order."""
    return [i for s in mine for i in _span(counts, s)]


def _cut_said(sched: Schedule, cut: Any, again: bool | frozenset[int], layered: Any,
              patterns: tuple[str, ...]) -> str:
    """The line rank 0 prints under the table: the schedule, the cut and
    what recomputes."""
    return (f"engine.distribute: {sched.name} cuts the model into {cut}"
            + (f"\n  ({'each stage recomputes' if again is True else recomputing(again)}"
               f"{_runs_said(sched, again, layered)}: "
               "its forward again in its backward)" if again else "")
            + (f"\n  (recomputed in their backward: {', '.join(patterns)})"
               if patterns else ""))


def _runs_said(sched: Schedule, again: bool | frozenset[int], layered: Any) -> str:
    """How ``_cut_said``'s recomputing stages go: whole (nothing said),
    layer by layer, in runs of N layers, or each stage its own way."""
    if isinstance(layered, (list, tuple)):
        stages = range(sched.num_stages) if again is True else sorted(again or ())
        return "".join(f", stage {s} " + ("layer by layer" if layered[s] == 1 else
                                          f"in runs of {layered[s]} layers" if layered[s]
                                          else "whole") for s in stages)
    return ("" if not layered else ", layer by layer" if layered == 1 else
            f", in runs of {layered} layers")


def _pipeline(grid: Grid, cut: Any, mine: Sequence[int], sched: Schedule, wrapped: Any,
              again: bool | frozenset[int], layered: Any, timeout: float | None,
              tag_base: int
              ) -> tuple[Pipeline | None, list[Any], list[Any], BaseException | None]:
    """This rank's Pipeline over its stages, and, with a dp axis, what
    replica 0 sends the others (``_replica_state``). This rank's error here
    is returned, to be told in the next exchange (``_retime_inputs``),
    before the dp broadcast."""
    pipe: Pipeline | None = None
    stages: list[Any] = []
    replicas: list[Any] = []
    try:
        pipe = Pipeline(grid, [cut[s] for s in mine], sched, loss_fn=wrapped, timeout=timeout,
                        tag_base=tag_base, recompute=again, layered=layered)
        sp = sp_group(grid)
        if sp is not None:      # each step's inputs and targets: this sp rank's part of them
            pipe.seq_split = seq_parts(sp, grid.comm.rank)
        stages = [pipe.stages[s] for s in mine]
        if _size(grid, "dp") > 1:
            replicas = [arr for st in stages for arr in _replica_state(st)]
    except BaseException as e:
        return pipe, stages, replicas, e
    return pipe, stages, replicas, None


def _retime_inputs(grid: Grid, tp_group: Comm | None, found: _Found, counts: tuple[int, ...],
                   mine: Sequence[int], asked: _Asked, wrapped: Any, pipe: Pipeline | None,
                   failed: BaseException | None, overhead: float | None, timeout: float | None
                   ) -> tuple[dict[int, Any], Any, list[tuple[int, int]] | None]:
    """For Job.retime, where a schedule was chosen: each own stage's input
    (the sample's first micro-batch through the layers before it), the last
    stage's target, and, where the executor's costs are measured, each
    stage's messages. ``failed`` (the Pipeline's) is told here either way."""
    inputs: dict[int, Any] = {}
    target: Any = None
    messages: list[tuple[int, int]] | None = None
    if found.chosen is not None:       # for Job.retime: each own stage's input
        sched, sample = found.sched, asked.sample
        bounds = [sum(counts[:s]) for s in range(len(counts))]
        size = -(-len(sample) // sched.num_microbatches)
        # (loss_fn: a KeyboardInterrupt; or the Pipeline's, above, told here)
        last = failed is None and pipe is not None and pipe.last   # (none where it failed)
        inputs, target = _own_inputs(grid.comm, tp_group, found.mlayers, sample[:size],
                                     asked.layers if last else max(bounds[s] for s in mine),
                                     {s: bounds[s] for s in mine},
                                     wrapped if last else None, failed)
        if overhead is None:          # each stage's messages: its output, its input's gradient
            messages = _stage_messages(found.profile[size], tuple(counts))
    else:
        _told(grid.comm, failed, timeout)
    return inputs, target, messages


def _made_job(grid: Grid, given: _Given, found: _Found, asked: _Asked, ready: _Prepared,
              counts: tuple[int, ...], mine: Sequence[int], pipe: Pipeline | None,
              stages: list[Any], replicas: list[Any], inputs: dict[int, Any], target: Any,
              messages: list[tuple[int, int]] | None, *, plan: dict[str, str] | None,
              reps: int, timeout: float | None, tag_base: int
              ) -> tuple[Job | None, BaseException | None]:
    """Every replica given replica 0's weights, and the Job made (a traced
    model's state beyond its layers, ``_rest``; with shapes the sample
    decided, what traces it again at a step's, ``Reshaped``). This rank's
    error here (a KeyboardInterrupt) is returned (with the Job, where it
    was made before it: half made, never returned), told where the others'
    re-time makes its word (``_retimed``): alone, they waited there until
    their timeout (its dp peers in the broadcasts: those it will not make
    are abandoned, failing on them)."""
    source, model, named = given.source, given.model, given.named
    job: Job | None = None
    try:
        assert pipe is not None     # (its failure was told in _retime_inputs)
        if replicas:        # every replica starts from replica 0's weights
            _broadcast_replicas(grid, replicas, timeout)
        if given.is_torch and not any(True for st in stages for _ in st.module.parameters()):
            import warnings
            names = [f"{n} ({type(layer).__name__})" for n, layer in named]
            held = "; ".join(f"stage {s}: "
                             f"{', '.join(names[i] for i in _span(counts, s))}"
                             for s in mine)
            warnings.warn(f"engine.distribute: rank {grid.comm.rank}'s stages hold no "
                          f"parameters ({held}), so job.parameters() is empty there, which "
                          f"torch's optimizers refuse ('optimizer got an empty parameter "
                          f"list'): cut the model elsewhere (balance={list(counts)} now), or "
                          f"make the optimizer only where job.parameters() holds some",
                          stacklevel=3)     # (distribute's caller)
        rest = (_rest(source, model, given.own_loss, ready.aliases) if source is not model
                else OrderedDict())
        if given.on_meta and rest:
            rest = _real_rest(source, given.own_loss, rest)
        keys = list(source.state_dict()) if source is not model else None
        job = Job(grid, pipe, stages, tuple(counts), [n for n, _ in named], given.is_torch,
                  found.chosen, found.cands, bool(plan), found.cal, inputs, reps, messages,
                  timeout, tag_base, target, keys, ready.aliases, found.skipped, rest,
                  ready.shapes)
        if source is not model and getattr(model, "shaped", False) and asked.sample is not None:
            # the pieces hold what the sample's shapes decided: traced again at other shapes
            entries = {sum(counts[:s]): inputs[s] for s in mine if s > 0 and s in inputs}
            job.reshaped = Reshaped(source, model, _own_layers(counts, mine),
                                    given.own_loss if pipe.last else None,
                                    model.loss is not None, given.n_inputs, asked.sample[:1],
                                    entries, f"rank {grid.comm.rank} (pp rank "
                                    f"{grid.coord('pp')})")
            pipe.reshaped = job.reshaped
    except BaseException as e:
        return job, e
    return job, None


def _retimed(grid: Grid, job: Job | None, failed: BaseException | None, found: _Found,
             tp_group: Comm | None, *, plan: dict[str, str] | None, verbose: bool, auto: bool,
             layers: int, said: str, timeout: float | None) -> None:
    """The job re-timed (``job.predicted``: the machine as the steps will
    find it), the table simulated again on what that measured, and, on rank
    0 when ``verbose``, the table, the cut and the prediction printed. Where
    the Job's making ``failed`` (no Job, or one made before the error: its
    ``Reshaped``), this rank makes the re-time's word in its place, telling
    its error: re-timed, that Job went back half made and the error was
    lost. Every rank's error here is told in a last word: alone, it left
    the others with jobs whose first step waited for it."""
    chosen = found.chosen
    try:
        if failed is not None:  # (the others' re-time: its exchange, where it times anything)
            if chosen is not None:
                # (the re-time's: a sharded job's, or the sp peers')
                peers = tp_group if plan or sp_group(grid) is not None else None
                _exchange(grid.comm, [], _timing(grid.comm, peers, functools.partial(
                    _raised, failed))[1], peers)
            _raised(failed)
        assert job is not None
        job.retime()
        if verbose and grid.comm.rank == 0 and job.predicted is not None:
            job.watched = []        # step() tells a median step far off the prediction, once
        if job.calibration is not None and chosen is not None:
            job._table_loaded(found.cands, chosen)  # the table as the host the steps will find
        if verbose and grid.comm.rank == 0:
            # a schedule named too: its row, cut and prediction (it printed nothing, and the
            # user who picked a row by name saw none of them)
            # the chosen row's figure is the profile's; the re-timed one, job.predicted, is
            # said right under the table with what moved it (a user took the row's 6.61 ms
            # for the prediction, 15.38 ms, of a step that measured 11.54)
            predicted = ("" if job.profiled is None or job.chosen is None else
                         "\nengine.distribute: " + retimed_said(job.profiled, job.chosen))
            if auto or job.candidates:
                print(f"engine.distribute: {dict(getattr(grid, 'outer', grid).axes)}, "
                      f"{layers} layers; "
                      f"{'candidates' if auto else 'the schedule given'}:\n{job.table()}\n"
                      f"{legend(job.candidates, why=auto)}{predicted}\n{said}", flush=True)
            else:
                print(said + predicted, flush=True)
    except BaseException as e:
        failed = e
    _told(grid.comm, failed, timeout)
