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
model, sample and grid checked), engine.layer_timing (the layers timed),
engine.measured_choice (the schedule chosen on those times), engine.stage_state
(a rank's pieces' state), engine.job (the ``Job``) and engine.agree (what every
rank raises or says at once).
"""
from __future__ import annotations

import copy
import functools
import hashlib
import numbers
import sys
import time
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np

import collectives
from mesh import AbortKind, Comm, Grid
from mesh.tensors import is_tensor

from .calibrate import Calibration, calibrate, collected, dry_run, hosts, shared_cores
from .choose import (SCHEDULES, Candidate, builtin, candidates, counts_for,
                     kept_buffers, kept_random, microbatch_counts, legend, recomputing,
                     retimed_said, stage_spans, table, under_load, yours)
from .costs import by_type
from .executor import Pipeline
from .ir import Schedule
from .pipeline_args import rows_of
from .schedules import _NAMES, by_name, is_name, one_f_one_b
from .stagebuild import inputs_of, layer_classes, make_stage, param_count
from .tensor_parallel import parallelize
from .partition import partition
from .traced import Reshaped, few, given_as_returned, sequential, traceable
from .torch_stage import TorchStage, patterns_of, torch_loss
from .tp_layers import refuse_fed_whole
from .agree import DistributeFailed, GatherFailed, _raised, _told
from .given import (_agreed_sample, _as_grid, _checkpoint_model, _copied, _cut, _held_before,
                    _is_torch, _mark_held, _model_layers, _not_sharded, _recompute_names,
                    _same_model, _size, _takes_two, _valid_balance)
from .layer_timing import _exchange, _median_act, _profile, _profile_stages, _timing
from .measured_choice import _grad_bytes, _measured_choice, _stage_grads, _stage_messages
from .stage_state import (_Temp, _aliases, _materialize, _on_meta, _real_rest, _replica_state,
                          _rest, _shards_read, _state_shapes)
from .job import IncompatibleKeys, Job, far_off

__all__ = ["distribute", "IncompatibleKeys", "Job", "load_state", "far_off", "DistributeFailed",
           "GatherFailed"]

_TP_RUNS = 10     # runs of each tensor-parallel layer's timing (its peers must run as many)


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


def _broadcast_replicas(grid: Grid, replicas: list[Any], timeout: float | None) -> None:
    """Replica 0's weights (``replicas``) to every dp replica, a broadcast
    each. A rank that fails (a KeyboardInterrupt between two broadcasts, or
    inside one: its peers learn of that one from it) abandons the broadcasts
    it has not started, so its dp peers raise in them at once naming it (they
    waited there until their timeout) and every replica numbers the group's
    calls alike; its own error is told in the word that follows."""
    dp = grid.group("dp")
    ch = dp.collective_channel()
    first = ch.seq
    try:
        for arr in replicas:
            collectives.broadcast(dp, arr, root=0, timeout=timeout)
    except BaseException as e:
        for _ in range(len(replicas) - (ch.seq - first)):
            collectives.abandon(dp, f"engine.distribute failed on rank {grid.comm.rank} (dp "
                                f"rank {dp.rank}): {type(e).__name__}: {e}"[:400],
                                AbortKind.of(e))
        raise


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


def _schedule_named(schedule: Any, microbatches: int | None) -> None:
    """Refuse a ``schedule=`` that is neither "auto", a built-in's name, a
    Schedule nor a list of candidates (names, "auto", Schedules: see
    ``_candidates``) (None, a generator not called: "'NoneType' object has no
    attribute 'lower'"), and ``microbatches=`` other than a Schedule's own
    (which ran with its own count, the one given left unsaid)."""
    if isinstance(schedule, (list, tuple)):
        if not schedule:
            raise ValueError("schedule=[]: a list of candidates needs at least one (a name, "
                             "'auto' for every built-in, or an engine.Schedule)")
        for k, item in enumerate(schedule):
            if isinstance(item, (list, tuple)):
                raise TypeError(f"schedule= candidate {k} is a {type(item).__name__}: a list "
                                f"of candidates holds names and engine.Schedule objects")
            try:
                _schedule_named(item, None)
            except (TypeError, ValueError) as e:
                raise type(e)(f"schedule= candidate {k}: {e}") from None
    elif isinstance(schedule, Schedule):
        if microbatches is not None and microbatches != schedule.num_microbatches:
            raise ValueError(f"microbatches={microbatches}, but schedule {schedule.name!r} "
                             f"runs {schedule.num_microbatches}: a Schedule's micro-batches "
                             f"are its own (leave microbatches= out, or make it for "
                             f"{microbatches})")
    elif not isinstance(schedule, str):
        name = getattr(schedule, "__name__", None) if callable(schedule) else None
        text = repr(schedule)
        raise TypeError(f"schedule= takes 'auto', a name ({_NAMES}), an engine.Schedule or a "
                        f"list of them, "
                        + (f"not the function {name}: call it, {name}(p, m)" if name else
                           f"not {text if len(text) <= 60 else type(schedule).__name__}"))
    elif schedule != "auto" and not is_name(schedule):
        text = schedule if len(schedule) <= 40 else schedule[:37] + "..."
        raise ValueError(f"unknown schedule {text!r}: use {_NAMES}, or 'auto'; a schedule "
                         f"of your own is passed as the Schedule itself (engine.Schedule."
                         f"build(...); one saved as JSON: engine.Schedule.from_json(text))")


def _candidates_said(schedule: Any) -> list[str] | None:
    """What a rank's list of candidates is, to set beside the other ranks'
    (``_same_model``): each name as by_name reads it, each Schedule by its
    name and a digest of its JSON; None for a schedule= that is no list."""
    if not isinstance(schedule, (list, tuple)):
        return None
    said = []
    for item in schedule:
        if isinstance(item, Schedule):
            digest = hashlib.sha1(item.to_json().encode()).hexdigest()[:8]
            said.append(f"Schedule {item.name!r} #{digest}")
        else:
            said.append(repr(str(item).lower().replace("_", "-")))
    return said


def _candidates(given: Sequence[Any], p: int, ms: Sequence[int], chunks: int, L: int,
                rows: int) -> tuple[list[Schedule], list[tuple[str, int, str]]]:
    """``schedule=[...]``'s candidates (``["auto"]``: "auto"'s) and the rows
    of those that cannot run: each name (``"auto"``: every built-in) at
    each count of ``ms``,
    each Schedule as it is (its own pp, stages, placement and
    micro-batches: verified, ``yours``); a schedule of more stages than
    ``L`` layers, a name that does not take that p and m, or a Schedule
    of more micro-batches than the sample's ``rows``, is a row saying why."""
    names: list[str] = []
    kinds: set[str] = set()         # (a built-in named twice, or by "auto" too: once)
    for item in given:
        for name in (SCHEDULES if item == "auto" else [item]) if isinstance(item, str) else []:
            kind = by_name(name, 1, 1).name.split("(")[0]
            if kind not in kinds:
                kinds.add(kind)
                names.append(name)
    unrun: list[tuple[str, int, str]] = []
    scheds = []
    for sched in builtin(names, p, ms, chunks, unrun) + yours(
            [s for s in given if isinstance(s, Schedule)], p):
        m = sched.num_microbatches
        if m > rows:
            unrun.append((sched.name, m, f"{m} micro-batches need a batch of at least {m} "
                                         f"rows; the sample has {rows}"))
        else:
            scheds.append(sched)
    for sched in scheds:
        if sched.num_stages > L:
            unrun.append((sched.name, sched.num_microbatches,
                          f"needs {sched.num_stages} stages, the model has {L} layers"))
    return [s for s in scheds if s.num_stages <= L], unrun


def distribute(model: Any, grid: Grid | Comm, plan: dict[str, str] | None = None,
               schedule: str | Schedule | Sequence[str | Schedule] = "auto",
               microbatches: int | None = None,
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
    candidates on rank 0 when ``verbose``), a name ("1f1b"...), a Schedule,
    or a list of candidates ranked as "auto" ranks the built-ins: names
    (at those counts; "auto" in it: every built-in) and Schedules of your
    own (each as it is, its own micro-batches; verified first), the same
    list on every rank. A candidate that cannot run (more stages than the
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
    A torch model built on the meta device (``with torch.device("meta"):``)
    holds no memory: each rank makes only its own stages (with a plan, its
    own shards of them) real, on the CPU, as zeros that ``init(stage)``
    fills (default: every submodule's ``reset_parameters()``), or load a
    trained state with ``job.load_state_dict`` (on any job; with tp each
    rank cuts its own shards); its layers (and candidate stages) are timed
    on real copies, one at a time.
    Collective: every rank of the grid calls it with the same arguments."""
    fault: BaseException | None = None
    listed: list[str] | None = None     # schedule=[...]: what this rank passed (_same_model)
    unrun: list[tuple[str, int, str]] = []     # candidates that cannot run, and why
    try:        # this rank's own arguments: raised by every rank (_same_model)
        if microbatches is not None and (isinstance(microbatches, bool) or not isinstance(
                microbatches, numbers.Integral) or microbatches < 1):
            raise ValueError(f"microbatches={microbatches!r}: a whole number of at least 1 "
                             "(or None: schedule='auto' tries p, 2p, 4p...)")
        microbatches = None if microbatches is None else int(microbatches)
        _schedule_named(schedule, microbatches)
        listed = _candidates_said(schedule)
        patterns = () if recompute == "auto" else patterns_of(recompute)
        if not patterns and recompute not in (False, True, "auto"):
            raise ValueError(f"recompute={recompute!r}: True, False, 'auto' or submodule name "
                             "patterns (a str or a list of them)")
        _not_sharded(model)         # (an earlier distribute's plan= cut it in place)
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
        given = list(schedule) if isinstance(schedule, (list, tuple)) else None
        auto = given is not None or isinstance(schedule, str) and schedule == "auto"
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
            if rows and ms[0] > rows and given is None:
                raise ValueError(f"{ms[0]} micro-batches need a batch of at least {ms[0]} "
                                 f"rows; the sample has {rows}")
            if auto:    # each candidate, or the row saying why it cannot run (none timed yet)
                scheds, unrun = _candidates(given or ["auto"], p, ms, chunks, L, rows)
                if not scheds:
                    raise ValueError("no candidate schedule can run:\n" + table([], None, unrun))
            else:
                assert isinstance(schedule, str)
                by_name(schedule, p, ms[0], chunks)       # an unknown name raises here
                scheds = builtin([schedule], p, ms, chunks)
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
        if isinstance(balance, str) and balance.startswith("type:"):    # (layers' classes)
            balance = by_type(balance, [layer_classes(layer, "module" if is_torch else "layer")
                                        for _, layer in named])
        if patterns:
            _recompute_names(source, patterns, traced=source is not model)
    except (TypeError, ValueError) as e:
        fault = e
    _same_model(grid, named, is_torch, fault, timeout,
                None if fault is not None else _held_before(source, len(named)), listed)
    assert loss_fn is not None
    # this rank's own error in the work up to the profile (the plan applied: a
    # KeyboardInterrupt), told in its first exchange (or, with nothing measured, the cut's)
    early: BaseException | None = None
    aliases: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    params: list[int] = []
    grads: list[Any] | None = None
    try:
        aliases = _aliases(source) if is_torch else {}    # (before a plan shards the model)
        shapes = (_state_shapes(named, is_torch) if source is model    # (and whole shapes)
                  else {k: tuple(v.shape) for k, v in source.state_dict().items()})
        if plan:        # the whole model, so the plan's names are the model's own; then every
            parallelize(source, grid.group("tp"), plan)   # layer timed sharded, collectives in
            if not is_torch:    # (a colwise output into a Linear left whole: known on every rank)
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
    except BaseException as e:
        early = e
    runs = _TP_RUNS if plan and tp > 1 else None      # tp peers time a layer together
    cands: list[Candidate] = []
    # candidates that cannot run, and why: the unmade, and those whose layers failed
    skipped: list[tuple[str, int, str]] = list(unrun)
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
            mlayers: list[Any] = []
            try:
                mlayers = [(_Temp(layer, init, current) if on_meta else TorchStage(layer))
                           if is_torch else layer for _, layer in named] if early is None else []
            except BaseException as e:
                early = e
            # where the ranks outnumber a host's cores the simulator shares them, so
            # each layer is timed in its thread's CPU: its wall, every rank timing at
            # once, held that sharing already (the table ran long twice over)
            clock = time.thread_time if shared_cores(hosts(grid.comm), p) else time.perf_counter
            profile, broken = _profile(grid, mlayers, sample, sizes, reps, runs, clock, early)
            if broken:      # (alike on every rank) those micro-batch sizes' candidates cannot run
                skipped += [(sc.name, sc.num_microbatches,
                             f"micro-batches of {size} row{'s' if size > 1 else ''}: "
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
            # this rank's own error in the work between the exchanges (the dry runs'
            # figures, the candidates' simulation, the cut: a KeyboardInterrupt), told in
            # the next one (every rank then raises at once, the others DistributeFailed
            # naming it)
            failed: BaseException | None = None
            cal = Calibration(overhead or 0.0, 0.0)
            action: float | dict[int, float] = cal.action
            message: float | dict[int, float] = cal.message
            receive: float | dict[int, float] = cal.receive
            if overhead is None:
                try:
                    m = max(sc.num_microbatches for sc in scheds)
                    mid = profile[sizes[len(sizes) // 2]]       # a middle candidate's actions
                    spin = sum(lc.F + lc.B for lc in mid.values()) / (2 * p)
                    even = (_stage_grads(grads, counts_for("uniform", p, None, params),
                                         [grid.coord("pp")]) if grads is not None else None)
                    on = grid if grads is not None else None
                    # the executor's costs at each micro-batch count tried (engine.calibrate)
                    dries = [(k, one_f_one_b(p, k), _median_act(profile[-(-rows // k)]))
                             for k in sorted({sc.num_microbatches for sc in scheds} - {m})]
                    first, busy = _median_act(profile[-(-rows // m)]), _median_act(mid)
                except BaseException as e:
                    failed = e
                _told(grid.comm, failed, timeout)     # (no word before the dry runs' first)
                cal = calibrate(grid.comm, grid.group("pp"), m, first,
                                tag_base=tag_base, timeout=timeout, spin=min(spin, 0.01),
                                busy_nbytes=busy, tensors=is_torch, grid=on, grads=even)
                action, message, receive = {m: cal.action}, {m: cal.message}, {m: cal.receive}
                for k, dry, nbytes in dries:
                    d = dry_run(grid.comm, grid.group("pp"), dry, nbytes, tag_base=tag_base,
                                timeout=timeout, tensors=is_torch, grid=on, grads=even)
                    action[k], message[k], receive[k] = d.action, d.message, d.receive
            try:
                # (a torch stage copies its floating input: the first stage's, a micro-batch's)
                ins = {size: _copied(sample[:size]) for size in sizes} if is_torch else None
                cands = candidates(profile, params, rows, scheds, balance, 1.0, memory_limit,
                                   action, message, helper=cal.helper, recv=receive,
                                   cores=cal.cores, recompute=way, inputs=ins, copies=is_torch,
                                   layers=is_torch)
                spans = stage_spans(cands, rows)
            except BaseException as e:
                failed, spans = e, {}

            def join(first: int, stop: int) -> Any:
                stage = make_stage([layer for _, layer in named[first:stop]], first)
                if on_meta:             # a real copy, for as long as it is timed
                    stage = copy.deepcopy(stage)
                    _materialize(stage, init)
                return TorchStage(stage) if is_torch else stage
            # the cuts' stages, timed whole: what the steps will pay (an exchange every
            # rank makes, with no stage to time too: the failure above told there)
            whole = _profile_stages(grid, mlayers, join, sample, spans, reps, runs, clock,
                                    failed)
            if spans:
                try:
                    cands = candidates(profile, params, rows, scheds, balance, 1.0,
                                       memory_limit, action, message, whole, cal.helper,
                                       receive, cal.cores, way, ins, is_torch, is_torch)
                except BaseException as e:
                    failed = e
                _told(grid.comm, failed, timeout)     # (the choice below rests on them)
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
    failed = None
    try:        # (this rank's own error told before the Pipeline's exchanges)
        _raised(early if sample is None else None)      # (not told in a profile)
        counts = (chosen.counts if chosen else
                  counts_for(balance, sched.num_stages, None, params))
        mine = sched.stages_of(grid.coord("pp"))
        cut = partition([layer for _, layer in named], sched.num_stages, balance=list(counts),
                        stages=mine, names=[n for n, _ in named])
        # this rank's stages only: the others stay without memory
        made = {s: _materialize(cut[s], init) for s in mine} if on_meta else {}
    except BaseException as e:
        failed = e
    _told(grid.comm, failed, timeout)
    # (a later distribute of this object refuses layers trained on other ranks only; over
    # several pp ranks its own forward refuses to run)
    _mark_held(source, L, [i for s in mine for i in range(sum(counts[:s]), sum(counts[:s + 1]))],
               f"rank {grid.comm.rank} (pp rank {grid.coord('pp')})")
    if on_meta:
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
    replicas: list[Any] = []        # what replica 0 sends the others (_replica_state)
    try:        # (this rank's own error told in the exchange below, before the dp broadcast)
        pipe = Pipeline(grid, [cut[s] for s in mine], sched, loss_fn=wrapped, timeout=timeout,
                        tag_base=tag_base, recompute=again, layered=layered)
        stages = [pipe.stages[s] for s in mine]
        if _size(grid, "dp") > 1:
            replicas = [arr for st in stages for arr in _replica_state(st)]
    except BaseException as e:
        failed = e
    inputs: dict[int, Any] = {}
    target: Any = None
    messages: list[tuple[int, int]] | None = None
    tp_group = grid.group("tp") if _size(grid, "tp") > 1 else None
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
        # (loss_fn: a KeyboardInterrupt; or the Pipeline's, above, told here)
        made, failed = _timing(grid.comm, tp_group, own_inputs if failed is None else
                               functools.partial(_raised, failed))
        _exchange(grid.comm, [], failed, tp_group)
        inputs, target = made
        if overhead is None:          # each stage's messages: its output, its input's gradient
            messages = _stage_messages(profile[size], tuple(counts))
    else:
        _told(grid.comm, failed, timeout)
    # this rank's own error in the last stretch (the dp broadcast, the Job made: a
    # KeyboardInterrupt), told where the others' re-time makes its word (its exchange; the
    # last word where nothing is re-timed): alone, they waited there until their timeout
    # (its dp peers in the broadcasts: those it will not make are abandoned, failing on them)
    job: Job | None = None
    try:
        if replicas:        # every replica starts from replica 0's weights
            _broadcast_replicas(grid, replicas, timeout)
        if is_torch and not any(True for st in stages for _ in st.module.parameters()):
            import warnings
            names = [f"{n} ({type(layer).__name__})" for n, layer in named]
            held = "; ".join(f"stage {s}: "
                             f"{', '.join(names[sum(counts[:s]):sum(counts[:s + 1])])}"
                             for s in mine)
            warnings.warn(f"engine.distribute: rank {grid.comm.rank}'s stages hold no "
                          f"parameters ({held}), so job.parameters() is empty there, which "
                          f"torch's optimizers refuse ('optimizer got an empty parameter "
                          f"list'): cut the model elsewhere (balance={list(counts)} now), or "
                          f"make the optimizer only where job.parameters() holds some",
                          stacklevel=2)
        rest = _rest(source, model, own_loss, aliases) if source is not model else OrderedDict()
        if on_meta and rest:
            rest = _real_rest(source, own_loss, rest)
        keys = list(source.state_dict()) if source is not model else None
        job = Job(grid, pipe, stages, tuple(counts), [n for n, _ in named], is_torch, chosen,
                  cands, bool(plan), cal, inputs, reps, messages, timeout, tag_base, target,
                  keys, aliases, skipped, rest, shapes)
        if source is not model and getattr(model, "shaped", False) and sample is not None:
            # the pieces hold what the sample's shapes decided: traced again at other shapes
            own = [i for s in mine for i in range(sum(counts[:s]), sum(counts[:s + 1]))]
            entries = {sum(counts[:s]): inputs[s] for s in mine if s > 0 and s in inputs}
            job.reshaped = Reshaped(source, model, own, own_loss if pipe.last else None,
                                    model.loss is not None, n_inputs, sample[:1], entries,
                                    f"rank {grid.comm.rank} (pp rank {grid.coord('pp')})")
            pipe.reshaped = job.reshaped
    except BaseException as e:
        failed = e
    # this rank's own error in what is left (the re-time after its word, the table simulated
    # again, the print), told in a last word: alone, it left the others with jobs whose
    # first step waited for it
    try:
        if job is None:     # (the others' re-time: its exchange, where it times anything)
            if chosen is not None:
                peers = tp_group if plan else None      # (the re-time's: a sharded job's)
                _exchange(grid.comm, [], _timing(grid.comm, peers, functools.partial(
                    _raised, failed))[1], peers)
            _raised(failed)
        assert job is not None
        job.retime()
        failed = None
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
    except BaseException as e:
        failed = e
    _told(grid.comm, failed, timeout)
    assert job is not None
    return job
