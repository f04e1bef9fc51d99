"""The executor: run this rank's list of a verified schedule over the mesh.

``Pipeline(grid_or_group, stage, schedule, loss_fn=...)`` checks the
schedule once; ``step(inputs, targets)`` then runs one training step:

* the batch is cut into ``m`` micro-batches along axis 0 (sizes differ by
  at most one row); inputs are needed on the rank holding stage 0, targets
  on the rank holding the last stage, None elsewhere;
* every receive of the step is posted before the first action runs, and
  every send is asynchronous: a RECV action only waits, a SEND only starts;
* an activation or gradient message is the array itself, which the mesh
  sends with its dtype and shape, so shapes may change from step to step;
  a stage may return a tuple of tensors (a block's input and a mask, a
  U-Net's skips): a small header then its parts go on the one tag, each as
  an array would (a part that is None, a mask's gradient, is not sent);
* loss and scaling, explicitly: ``loss_fn(y, target)`` returns the mean
  loss of micro-batch k and its gradient (on torch stages it may instead
  return the loss as a scalar tensor, an ordinary torch loss such as
  ``F.mse_loss`` or ``nn.MSELoss()``: it is then wrapped,
  engine.torch_stage.torch_loss, and its gradient taken by autograd);
  the executor multiplies that
  gradient by ``n_k / N`` (rows of k over rows of the local batch) before
  the backward pass, so the stage gradients add up to the gradient of the
  mean loss over the local batch (with a dp axis, of the global batch: the
  last stage's ranks sum the replicas' rows first, so replicas of unequal
  sizes weigh by their rows). With a dp axis each stage's gradients are
  then averaged over the dp group (``collectives.all_reduce(op="avg")``,
  started as soon as the stage's last backward is done), which makes them
  the gradient of the mean over the global batch (under ZeRO stage 2 a
  gradient one replica keeps is reduced to it alone, ``collectives.reduce``,
  and freed on the others after the step: engine.zero_grads). Whatever ``grads()`` held
  before the step is kept and the step's gradient added to it: it is set
  aside at the step's start and added back once at its end, after the dp
  average and the sums of tied copies and of sequence-parallel gradients,
  which so cover the step's own gradients only (accumulating over steps
  is then torch's ``.grad +=`` for every parameter, at every layout);
* a per-token loss (engine.per_token) returns instead the sum over the
  tokens its micro-batch counts and their count (``(loss_sum, count)`` on
  torch stages, ``(loss_sum, gradient, count)``): each sum's gradient goes
  back unscaled, the counts (the last stage's) meet in the step's closing
  all-reduce (``_Step.agree``), and every rank scales its gradients once,
  by dp / the count over every micro-batch and replica, before adding
  back what they held (``settle``): the step's loss and gradients are
  then one process's sum over every counted token over their count.

A step that fails (a stage, the loss function, a receive, a lost peer...)
raises on this rank after cleaning up: its receives still posted are
cancelled, and every message tag it had not finished with is aborted on the
pp group, so peers waiting for those messages raise at once instead of
hanging, and a late message of the failed step is dropped wherever it
arrives. Each step uses tags of its own (the step number is part of them,
and every rank counts its calls to ``step()``), so nothing of a failed step
can ever be taken by a later one; with a dp axis, the all-reduces the step
will no longer start are aborted on the dp group too, which keeps its
collectives in step; with a tp axis, the tp collective the failed rank will
not make is aborted on its tp peers (they raise at once, naming it, and the
group's collectives stay numbered alike: see ``_Step._abandon_tp``). The same Pipeline can then run the next step, as long
as every rank calls ``step()`` as many times as the others. A failure
spreads along what the ranks wait for, and then to every rank of the
pipeline: each step ends with the ranks agreeing on whether it succeeded
everywhere (``_Step.agree``, a small all-reduce over the grid), so a
rank whose own part had finished raises StepFailed; every rank then puts
its gradients back to what they held before the step, and (schedules with
OPT actions) the weights of a stage whose optimizer already ran back to
what they were before it, and the optimizer's state where it has
``state_dict()``/``load_state_dict()``, so no stage keeps an update the
others did not make. Whether to redo or skip the batch is the caller's call.

The Pipeline is here; engine.pipeline_args checks what it is given (the
batches, the stage objects, the arguments every rank shares),
engine.step runs a step's actions and engine.rollback ends a failed one.
"""
from __future__ import annotations

import time
import weakref
from typing import Any, Callable, Collection, Sequence

from mesh import Comm, Grid

from . import trace as _trace
from .buffers import ReplicaBuffers
from .clip import clip_grad_norm
from .ir import AR, OPT, B, F, I, W, RECV_F, SEND_F, Action, Schedule, message_key
from .lower import with_grad_sync
from .pipeline_args import (_as_stage, _checkpointed, _given_alike, _in_place, _joined,
                            _recomputing, split_microbatches, stages_for_rank)
from .reports import Layout
from .schedules import given_schedule
from .rollback import StepFailed, _Step
from .simulate import simulate
from .tied import TiedGrads
from .tp_sums import TpSums
from .traced import Reshaped, given_as_returned
from .torch_stage import TorchStage, patterns_of, plain_torch_loss, torch_loss
from .tp_layers import cut_edges, group_of, refuse_cut_fed_whole, whole_output
from .verify import verify
from .zero_grads import OwnedGrads
from .zero_params import ShardedParams

__all__ = ["Pipeline", "StepFailed", "split_microbatches", "stages_for_rank"]

_STEP_SHIFT = 32      # step n's tags are tag_base + i + (n << 32)
# steps made so far on each group (by transport, then group id) by every Pipeline: a new
# Pipeline numbers its steps on from there, so its tags are never those of an earlier
# Pipeline's failed step, whose aborted tags the transport keeps (it failed at once)
_GROUP_STEPS: "weakref.WeakKeyDictionary[Any, dict[int, int]]" = weakref.WeakKeyDictionary()


def _steps_on(pp: Any, upto: int | None = None) -> int:
    """How many step numbers Pipelines have taken on group ``pp`` (0 for a
    stand-in group without a transport); with ``upto``, note that many first."""
    t, gid = getattr(pp, "_t", None), getattr(pp, "gid", None)
    if t is None or gid is None:
        return upto or 0
    used = _GROUP_STEPS.setdefault(t, {})
    if upto is not None:
        used[gid] = max(used.get(gid, 0), upto)
    return used.get(gid, 0)


def check_grid(grid: Any, call: str) -> None:
    """TypeError naming the rank and ``call`` for a ``grid`` that is neither
    a mesh.Grid nor a communicator (None, what world.group gives a
    non-member; the mesh module): it was "AttributeError: 'NoneType'
    object has no attribute 'size'"."""
    if isinstance(grid, Grid) or (hasattr(grid, "rank") and hasattr(grid, "size")):
        return      # (a Comm, or a stand-in for one)
    from mesh.world import rank_said
    who = rank_said()
    what = ("None (what world.group(ranks) returns on ranks that are not members)"
            if grid is None else f"a {type(grid).__name__}")
    raise TypeError(f"{who}{call}: the grid is {what}: pass a mesh.Grid (mesh.grid(world, "
                    f"dp=..., pp=...)) or a meshrun communicator (mesh.init()'s world)")


def _axes(grid_or_group: Grid | Comm) -> tuple[Comm, Comm | None, int]:
    """(pp communicator, dp communicator or None, dp index) of a grid or group."""
    check_grid(grid_or_group, "engine.Pipeline")
    if isinstance(grid_or_group, Grid):
        pp = grid_or_group.group("pp")
        try:
            dp = grid_or_group.group("dp")
            index = grid_or_group.coord("dp")
        except (KeyError, ValueError):
            dp, index = None, 0
        return pp, dp, int(index)
    return grid_or_group, None, 0


class Pipeline:
    """One rank's part of a pipeline-parallel (and data-parallel) model.

    ``stage`` is this rank's stage object, or the list of its virtual stages
    in stage order (interleaved schedules); a torch ``nn.Module`` is a stage
    (wrapped in a TorchStage, ``pipe.stages`` holds the wrapper). Stages
    marked by ``engine.partition`` as holding copies of a tied parameter are
    kept equal (see engine.tied). See the module docstring for what ``step``
    computes. ``optimizer(stage)``, when given, runs at each
    OPT action of the schedule (``engine.with_optimizer_step`` appends them;
    one given with a schedule that has none is refused); one with ``state_dict()`` and
    ``load_state_dict()`` (a callable object around a torch optimizer) has
    its state put back when a step fails after it ran. ``timeout`` bounds every wait (None: the
    mesh's default). ``recompute``: each stage keeps only its input
    from a forward to its backward, and runs the forward again there (a
    torch stage with the same random draws: dropout's masks; a stage of
    engine.layers' own layers as ``engine.layers.Recompute``, which a stage
    of your own may be wrapped in), as activation checkpointing does:
    a stage's activations are held for one micro-batch at a time, for
    the cost of a second forward; a collection of stage indices
    (``recompute={0, 1}``): only those stages do (the first stages of
    1F1B hold the most micro-batches at once); a str or a list of str
    (``recompute="*.attn"``): selective recompute, only the submodules of
    each torch stage whose names match (engine.torch_stage.
    checkpoint_modules; a pattern no stage of the pipeline holds raises on
    every rank). ``layered``: the torch stages that recompute and are
    ``nn.Sequential``s (as engine.partition's are) go layer by layer
    (TorchStage's ``layered``: each layer keeps its input and runs again
    just before its own backward); ``layered=N`` (an int) in runs of N
    layers (each run keeps its input and runs again whole before its
    backward); a list or tuple, one entry per stage of the schedule (the
    same on every rank; True, an int N, False or None: whole), each stage
    its own way (Megatron's ``--recompute-num-layers`` per stage); other
    stages recompute whole. Step n's messages use tags
    ``tag_base + i + (n << 32)`` for ``i <= 2 * micro-batches * stages`` (n
    counting on from the steps earlier Pipelines made on the group)
    (the last one is the trace's): two pipelines on one group need
    tag_bases that far apart, below 2**32.

    A failed ``step()`` cancels its receives and aborts the rest of its
    messages on every pp rank, raises on every rank of the pipeline and
    rolls its gradients (and weights an OPT action changed, and such an
    optimizer's state) back (see the
    module docstring); the pipeline
    stays usable for the next step."""

    def __init__(self, grid_or_group: Grid | Comm, stage: Any, schedule: Schedule,
                 loss_fn: Callable[[Any, Any], tuple[Any, Any]] | None = None, *,
                 optimizer: Callable[[Any], None] | None = None,
                 timeout: float | None = None, tag_base: int = 0,
                 recompute: bool | Collection[int] | str | Collection[str] = False,
                 layered: bool | int | Sequence[bool | int | None] = False) -> None:
        self.pp, self.dp, self.dp_index = _axes(grid_or_group)
        # every rank of the pipeline: where the step's outcome is agreed on
        self.whole = grid_or_group.comm if isinstance(grid_or_group, Grid) else grid_or_group
        self.tp_index, self.tp = 0, None      # tp: the stage's peers, when it has any
        if isinstance(grid_or_group, Grid) and "tp" in grid_or_group.axes:
            self.tp_index = grid_or_group.coord("tp")
            tp = grid_or_group.group("tp")
            self.tp = tp if tp.size > 1 else None
        given_schedule(schedule, f"pp rank {self.pp.rank}: Pipeline")
        if schedule.num_ranks != self.pp.size:
            raise ValueError(f"pp rank {self.pp.rank}: schedule {schedule.name!r} has "
                             f"{schedule.num_ranks} ranks but the pipeline group has "
                             f"{self.pp.size}: make it for pp={self.pp.size}")
        given = stage if isinstance(stage, (list, tuple)) else [stage]
        mine: Sequence[int] = ()
        fault: BaseException | None = None      # this rank's own arguments
        failed: BaseException | None = None     # its own error else (a KeyboardInterrupt)
        edges: dict[int, Any] = {}
        # either raised by every rank in _given_alike's exchange (failed alone: its
        # peers waited for it there until their timeout); so is what is made of the
        # stages before it (their ties read, tp sums, buffers' replicas and loss: failed
        # after it, alone, its peers' first step waited for it)
        try:
            lowered = verify(schedule)
            if self.dp is not None and self.dp.size > 1:
                lowered = with_grad_sync(lowered)
            elif any(a.kind == AR for row in lowered.ranks for a in row):
                # a schedule that names its all-reduces (one a dp pipeline ran, its
                # .schedule) on one replica: an average over one is the gradient as it is
                lowered = lowered.replace([a for a in row if a.kind != AR]
                                          for row in lowered.ranks)
            self.schedule = lowered
            self.rank = self.pp.rank
            self.program: tuple[Action, ...] = lowered.ranks[self.rank]
            # whether some rank's optimizer steps inside the step (OPT actions)
            self.has_opt = any(a.kind == OPT for row in lowered.ranks for a in row)
            # eval_step's: the forwards and their messages, in the schedule's order
            self.forward_program = tuple(a for a in self.program
                                         if a.kind in (F, SEND_F, RECV_F))
            mine = lowered.stages_of(self.rank)
            patterns = patterns_of(recompute)
            try:
                self._take(given, mine, recompute, patterns, loss_fn, optimizer, tag_base,
                           layered)
                # its ties' marks checked (their groups made once every rank's passed)
                self.tied = TiedGrads(lowered, self.stages)
                if self.tied and any(a.kind == OPT for a in self.program):
                    raise ValueError(f"pp rank {self.rank} holds tied parameters, whose "
                                     f"gradients are summed after the step: schedule "
                                     f"{schedule.name!r} cannot have OPT actions")
            except (TypeError, ValueError) as e:
                fault = e
            # engine.layers stages sharded by hand: what each cut's two sides hold
            edges = {s: cut_edges(obj) for s, obj in zip(mine, given)} if fault is None else {}
            if fault is None:
                self._made(lowered, loss_fn)
        except BaseException as e:
            failed = e
        _given_alike(self.pp, schedule, tag_base, given, mine, timeout, fault, edges, failed)
        if edges:       # (every pp rank's, gathered by _given_alike: all raise alike)
            ours = next((g for g in map(group_of, given) if g is not None), None)
            refuse_cut_fed_whole(edges, self.tp_index if ours is None else ours.rank)
        # selective recompute: the submodules named, in every stage that holds them
        self.checkpointed = (_checkpointed(self.pp, self.stages, patterns, timeout)
                             if patterns else {})
        self.tied.join(self.pp)
        self.tied.broadcast(timeout)
        self.optimizer = optimizer
        self.timeout = timeout
        self.tag_base = tag_base
        self._steps = 0
        # the first step's number in the tags: after every step an earlier
        # Pipeline made on the group (every pp rank made as many: step() and
        # the Pipelines are made alike on each)
        self._step0 = _steps_on(self.pp)
        self.events: list[list[Any]] = []
        # a loss's reports (Megatron's last item, engine.reports): the last step's, over its
        # micro-batches and dp replicas as Megatron's loop logs them, on every rank; and their
        # layout, as the ranks last agreed on it (it sizes the step's closing all-reduce)
        self.reports: dict[str, Any] = {}
        self.report_layout: Layout = ()
        # run first in each step (engine.distribute's job: its model traced again at the
        # step's input shapes), so that its error fails the step on every rank as a stage's
        self.before_step: Callable[[], None] | None = None
        # first in each step: its inputs and targets cut to this rank's part of their
        # sequence (engine.distribute's sp axis: engine.sp_axis), its error the step's
        self.seq_split: Callable[[Any, Any, str], tuple[Any, Any]] | None = None
        # the dp average of torch stages' gradients in a 16-bit dtype (torch.float16 or
        # torch.bfloat16: DeepSpeed's communication_data_type, engine.grad_wire), or None
        self.grad_wire: Any = None

    def _made(self, lowered: Schedule, loss_fn: Any) -> None:
        """The rest this rank's stages need (tp sums, buffers' replicas, the
        loss), made before __init__'s exchange: an error here (a
        KeyboardInterrupt) is told in it."""
        # sequence-parallel sums of whole parameters' gradients, once a step
        # (not with OPT actions: the optimizer would step before the sums)
        self.tp_sums = TpSums(self.stages, enabled=not any(a.kind == OPT for a in self.program))
        # ZeRO stage 2: the gradients one dp replica keeps, reduced to it (engine.zero_grads)
        self.owned = OwnedGrads(self)
        # ZeRO stage 3: the parameters one dp replica keeps between steps (engine.zero_params)
        self.owned_params = ShardedParams(self)
        # what a training forward changes in a buffer: replica 0's on every replica after it
        self.buffers = ReplicaBuffers(self.dp, [st.module for st in self.stages.values()
                                                if isinstance(st, TorchStage)])
        # the last stage of an engine.partition of a plain module carries what the forward
        # returns around its output (a dict, a dataclass...): loss_fn is given that, as
        # engine.distribute's is (it got the bare tensor)
        last = getattr(self.stages.get(lowered.num_stages - 1), "module", None)
        returned = getattr(last, "returned", None)
        if loss_fn is not None and callable(returned):
            loss_fn = given_as_returned(loss_fn, returned)
        # torch's own losses (F.mse_loss, nn.MSELoss()) return the loss only: wrapped
        self.loss_fn = torch_loss(loss_fn) if loss_fn is not None and plain_torch_loss(
            loss_fn) else loss_fn
        if self.has_opt:
            # (a mean cross entropy run per token: its optimizer would step before the count)
            self.loss_fn = getattr(self.loss_fn, "as_written", self.loss_fn)
        self.loss_checked = False      # what it returns: seen on its first call

    def _take(self, given: Sequence[Any], mine: Sequence[int], recompute: Any,
              patterns: Sequence[str], loss_fn: Any, optimizer: Any, tag_base: int,
              layered: Any) -> None:
        """Check this rank's own arguments and wrap its stages (raises
        TypeError or ValueError, which __init__ has every rank raise)."""
        lowered, schedule = self.schedule, self.schedule
        each = (list(layered) if isinstance(layered, (list, tuple)) else
                [layered] * lowered.num_stages)
        if len(each) != lowered.num_stages or any(
                n is not None and (not isinstance(n, int) or n < 0) for n in each):
            raise ValueError(f"pp rank {self.rank}: layered={layered!r}: True (layer by "
                             f"layer), an int N >= 1 (runs of N layers), False, or a list "
                             f"of those, one per stage of {schedule.name!r} "
                             f"({lowered.num_stages}; None: whole)")
        if recompute == "auto":
            raise TypeError("recompute='auto' is engine.distribute's (it chooses); a Pipeline "
                            "takes True, False, stage indices or submodule name patterns")
        again = frozenset() if patterns else _recomputing(recompute,  # type: ignore[arg-type]
                                                          lowered.num_stages)
        if len(given) != len(mine):     # what the caller passed, counted before any pairing
            raise ValueError(f"pp rank {self.rank} holds stages {list(mine)} of "
                             f"{schedule.name!r} but was given {len(given)} stage object(s)")
        _in_place(given, mine, self.rank, schedule)
        stages = [_as_stage(obj, s in again, s, recompute, each[s] or 0)
                  for s, obj in zip(mine, given)]
        self.stages = dict(zip(mine, stages))
        # a traced model's pieces at each step's input shapes (engine.traced.Reshaped: of
        # engine.partition's stages here, else set by engine.distribute): the first
        # micro-batch's activations tell the next stage them
        self.reshaped: Any = Reshaped.of([getattr(st, "module", st) for st in stages],
                                         f"pp rank {self.rank}")
        self.first = 0 in self.stages
        self.last = lowered.num_stages - 1 in self.stages
        if self.last and loss_fn is None:
            raise ValueError(f"pp rank {self.rank} holds the last stage: it needs a loss_fn")
        if any(a.kind == OPT for a in self.program) and optimizer is None:
            raise ValueError(f"schedule {schedule.name!r} has OPT actions: pass optimizer=")
        # optimizer(stage) runs at OPT actions only: with none anywhere it never ran (the
        # weights never changed, without a word)
        if optimizer is not None and not self.has_opt:
            raise ValueError(f"pp rank {self.rank}: Pipeline(optimizer=...): schedule "
                             f"{schedule.name!r} has no OPT actions, so the optimizer would "
                             f"never run: add them with engine.with_optimizer_step(schedule), "
                             f"or leave optimizer= out and step it after step()")
        self._check_protocol()
        self._span = 2 * lowered.num_microbatches * lowered.num_stages
        if not 0 <= tag_base <= (1 << _STEP_SHIFT) - 1 - self._span:
            raise ValueError(f"pp rank {self.rank}'s tag_base {tag_base} is out of range: this "
                             f"pipeline's tags need 0 <= tag_base <= 2**{_STEP_SHIFT} - 1 - "
                             f"{self._span}")

    def _check_protocol(self) -> None:
        need = {F: "forward", B: "backward", I: "backward_input", W: "backward_weight",
                AR: "grads", OPT: "grads"}
        for a in self.program:
            method = need.get(a.kind)
            if method and not callable(getattr(self.stages[a.stage], method, None)):
                raise TypeError(f"schedule {self.schedule.name!r} runs {a} on pp rank "
                                f"{self.rank}, but its stage object has no {method}()")

    def _tag(self, a: Action, step: int) -> int:
        """The tag of ``a``'s message in step ``step``: unique to the step,
        so a message of a failed step can never be taken by a later one."""
        kind, _, dst, k = message_key(a)
        return (self.tag_base + ((self._step0 + step) << _STEP_SHIFT)
                + ((k * self.schedule.num_stages + dst) * 2 + (kind == B)))

    def _flow(self, a: Action) -> int:
        kind, _, dst, k = message_key(a)
        return _trace.flow_id(self.dp_index, kind, dst, k, self.schedule.num_stages,
                              self.schedule.num_microbatches)

    def step(self, inputs: Any = None, targets: Any = None, *,
             scaler: Any = None) -> float | None:
        """Run one step; return its mean loss over the global batch (a
        per-token loss's: the sums over the count) on every rank, the same
        float (DeepSpeed's ``train_batch``'s: the last stage's ranks' loss,
        each replica's, met in the step's closing all-reduce, ``_Step.agree``,
        and averaged over dp there); a per-token loss's reports
        (Megatron-core's third item) are then ``reports`` on every rank,
        reduced over the micro-batches and dp replicas as Megatron's
        training loop reduces them ({} without; engine.reports), and a
        mean's (Megatron's older ``(loss, reports)``) alike. On
        failure, clean up (see the class docstring) and raise.
        ``scaler``: a ``torch.amp.GradScaler`` whose scale seeds the losses'
        backward, its inf check agreed by every rank (engine.scaled)."""
        st = _Step(self, self._steps, scaler=scaler)
        self._steps += 1
        _steps_on(self.pp, self._step0 + self._steps)
        events: list[list[Any]] = []
        self.buffers.mark()
        mean = self._drive(st, inputs, targets, events)
        self.buffers.sync(self.timeout)
        self.events = events
        return mean

    def _drive(self, st: "_Step", inputs: Any, targets: Any,
               events: list[list[Any]] | None = None) -> float | None:
        """Run step ``st``'s program (``events``: each action's, timed, for
        the trace); its mean loss, on every rank. On failure: clean
        up, agree with the others that it failed, raise."""
        try:
            return self._driven(st, inputs, targets, events)
        finally:        # (ZeRO stage 3: the others' parameters dropped again, on failure too)
            self.owned_params.free()

    def _driven(self, st: "_Step", inputs: Any, targets: Any,
                events: list[list[Any]] | None) -> float | None:
        at = 0
        self.reports = {}
        try:
            st.start(inputs, targets)
            for at, a in enumerate(st.program):
                if events is None:
                    st.run(a)
                    continue
                t0 = time.time_ns()
                flow = st.run(a)
                events.append([str(a), a.kind, t0, time.time_ns(), flow,
                               self._flow(a) if flow else 0])
            at = len(st.program)
            st.finish()
            if self.last and st.weights:    # (the mean over dp: agree's, on every rank)
                st.share = st.mean_loss()
        except BaseException as e:
            st.abandon(at, e)
            st.agree(e)
            raise
        st.agree(None)
        self.owned_params.agreed()      # (ZeRO stage 3: the order the next step prefetches by)
        mean = st.settle(st.loss)
        self.reports = st.counts.reports.total
        return mean

    def eval_step(self, inputs: Any = None, targets: Any = None, *,
                  outputs: bool = False) -> Any:
        """Evaluate: the schedule's forwards only, in its order (its
        backwards, gradient averages and sums left out), no gradient
        touched and no autograd graph kept (torch's ``no_grad``). Every
        torch stage's modules are in eval mode for the call (dropout off,
        as ``model.eval()`` in one process) and get back their own modes
        after. Returns the mean loss over the global batch on every rank
        (the micro-batches and dp replicas weighed by their rows, as
        ``step()``'s: one process's ``loss_fn(model(x), y)``; a per-token
        loss's sums over the count), None where ``targets`` is None (no
        loss, inference, every replica alike); with ``outputs``, ``(loss,
        out)``: the last stage's
        outputs for this replica's batch, its micro-batches' joined in
        order (a tensor or an array; None elsewhere). It uses a
        step's tags (every rank calls it as often, as ``step()``); a
        failure raises on every rank as a step's does, with nothing to
        roll back."""
        st = _Step(self, self._steps, forward_only=True)
        self._steps += 1
        _steps_on(self.pp, self._step0 + self._steps)
        modes = [(m, m.training) for stage in self.stages.values()
                 if isinstance(stage, TorchStage) for m in stage.module.modules()]
        try:
            for m, _ in modes:
                m.training = False
            mean = self._drive(st, inputs, targets)
        finally:
            for m, mode in modes:
                m.training = mode
        if not outputs:
            return mean
        if not self.last:
            return mean, None
        out = _joined([st.outs_last[k] for k in range(len(st.outs_last))])
        return mean, whole_output(self.stages[max(self.stages)], out)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False, foreach: bool | None = None) -> Any:
        """Clip the gradients to a total norm of ``max_norm``, as torch's
        ``clip_grad_norm_`` on the one-process model (Megatron's
        ``clip_grad_norm``), and return the total norm before clipping, the
        same on every rank: as torch returns it on torch stages (a 0-d
        tensor in the gradients' dtype, on their device), a float on numpy
        stages; over every stage and tp shard, each
        tied and each tp-replicated parameter counted once, dp replicas
        not multiplying it (their gradients are averaged already; under
        ZeRO stage 2 each is counted on the replica that keeps it; see
        engine.clip). Every gradient on every rank is scaled by the same
        factor, so tied copies and replicas stay equal. ``foreach`` is
        taken as torch takes it (how torch computes; nothing changes here).
        Call it after
        ``step()`` and before the optimizer; collective: every rank of the
        pipeline calls it. A schedule with OPT actions steps its optimizer
        inside the step, too early for it: refused."""
        if any(a.kind == OPT for a in self.program):
            raise ValueError(f"pp rank {self.rank}: clip_grad_norm_ runs after step(), but "
                             f"schedule {self.schedule.name!r} has OPT actions (its optimizer "
                             "steps inside the step, before any clipping)")
        return clip_grad_norm(self, max_norm, norm_type, error_if_nonfinite)

    def trace(self, costs: dict[str, float] | None = None) -> dict[str, Any] | None:
        """The last step's Chrome trace, merged from all ranks (collective:
        every rank of the grid or group calls it); on world rank 0 only. With
        a tp axis, the ranks of tp index 0 stand for their tensor-parallel peers,
        which run the same schedule.

        With ``costs`` (seconds per action) the simulator's prediction is
        stored beside it, and ``python -m engine.show`` reports the ratio."""
        if self.tp_index:
            return None
        rows = {"dp": self.dp_index, "pp": self.rank, "events": self.events}
        # (the pipeline's own count: its dp replicas, on pp groups of their own, agree on it)
        tag = self.tag_base + self._span + (self._steps << _STEP_SHIFT)
        gathered = _trace.gather(self.pp, self.dp, rows, tag)
        if gathered is None:
            return None
        meta: dict[str, Any] = {"schedule": self.schedule.to_dict()}
        if costs:
            meta["predicted_makespan_ms"] = simulate(self.schedule, costs).makespan * 1e3
        return _trace.chrome_trace(gathered, meta)

    def write_trace(self, path: str, costs: dict[str, float] | None = None) -> str | None:
        """``trace()`` written to ``path`` on world rank 0; returns the path there."""
        data = self.trace(costs)
        return _trace.write(path, data) if data is not None else None
