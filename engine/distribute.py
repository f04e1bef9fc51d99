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
from typing import Any, Callable, Sequence

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
from .given import (_agreed_sample, _as_grid, _checkpoint_model, _held_before, _mark_held,
                    _model_layers, _not_sharded, _recompute_names, _same_model, _size,
                    _takes_two, _valid_balance)
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
               recompute: bool | str | Sequence[str] = False) -> Job:
    """Partition ``model`` over the grid's pp axis, shard it by ``plan``
    over tp, and build the pipeline (gradients averaged over dp).

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
    mades: list[list[str]] | None = None    # what became of its own schedules (_same_model)
    unrun: list[tuple[str, int, str]] = []     # candidates that cannot run, and why
    try:        # this rank's own arguments: raised by every rank (_same_model)
        microbatches = _microbatches_checked(microbatches)
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

        mades = []
        scheds, unrun = _schedules(schedule, p, L, len(sample) if sample is not None else 0,
                                   microbatches, chunks, mades)
        _valid_balance(balance, L)
        if isinstance(balance, str) and balance.startswith("type:"):    # (layers' classes)
            balance = by_type(balance, [layer_classes(layer, "module" if is_torch else "layer")
                                        for _, layer in named])
        if patterns:
            _recompute_names(source, patterns, traced=source is not model)
    except (TypeError, ValueError) as e:
        fault = e
    _same_model(grid, named, is_torch, fault, timeout,
                None if fault is not None else _held_before(source, len(named)), listed, mades)
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
    cands: list[Candidate] = []
    # candidates that cannot run, and why: the unmade, and those whose layers failed
    skipped: list[tuple[str, int, str]] = list(unrun)
    chosen: Candidate | None = None
    sched = scheds[0]
    cal: Calibration | None = None
    profile: dict[int, dict[int, LayerCost]] = {}
    mlayers: list[Any] = []     # the layers as timed (a meta model's: real copies)
    if sample is not None:         # measured: the cut by time, the choice, the prediction
        cands, chosen, cal, profile, mlayers, skipped = _measured(
            grid, named, sample, scheds, skipped, early, is_torch=is_torch, on_meta=on_meta,
            init=init, reps=reps, tp_runs=bool(plan) and tp > 1, params=params, grads=grads,
            balance=balance, memory_limit=memory_limit, overhead=overhead, way=way,
            patterns=patterns, auto=auto, tag_base=tag_base, timeout=timeout)
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
    unfilled = _unfilled(made) if on_meta else None
    if unfilled:
        import warnings
        warnings.warn(unfilled, stacklevel=2)
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
        # (loss_fn: a KeyboardInterrupt; or the Pipeline's, above, told here)
        last = failed is None and pipe.last     # (no Pipeline where it failed)
        inputs, target = _own_inputs(grid.comm, tp_group, mlayers, sample[:size],
                                     L if last else max(bounds[s] for s in mine),
                                     {s: bounds[s] for s in mine},
                                     wrapped if last else None, failed)
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
            job._table_loaded(cands, chosen)    # the table as the host the steps will find
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
