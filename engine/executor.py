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
  the gradient of the mean over the global batch. Whatever ``grads()`` held
  before the step is kept and the step's gradient added to it: it is set
  aside at the step's start and added back once at its end, after the dp
  average and the sums of tied copies and of sequence-parallel gradients,
  which so cover the step's own gradients only (accumulating over steps
  is then torch's ``.grad +=`` for every parameter, at every layout).

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
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import numbers
import sys
import time
import weakref
from typing import Any, Callable, Collection, Iterable, Sequence

import numpy as np

import collectives
from mesh import AbortKind, Comm, Grid, LostPeerError, MeshError

from . import trace as _trace
from .buffers import ReplicaBuffers
from .clip import clip_grad_norm
from .ir import (AR, OPT, B, F, I, W, RECV_B, RECV_F, SEND_B, SEND_F, Action, Schedule,
                 message_key)
from .layers import Recompute, deterministic
from .lower import with_grad_sync
from .simulate import simulate
from .tied import TiedGrads
from .tp_sums import TpSums
from .traced import given_as_returned
from .torch_stage import (Parts, TorchStage, as_pipeline_loss, checkpoint_modules, copied,
                          patterns_of, plain_torch_loss, torch_loss, torch_targets)
from .tensor_parallel import rewatched, watch_of
from .tp_layers import cut_edges, group_of, refuse_cut_fed_whole
from .tp_plan import PlanError, forget_exits, named_by, split_by
from .verify import verify

__all__ = ["Pipeline", "StepFailed", "split_microbatches", "stages_for_rank"]

_STEP_SHIFT = 32      # step n's tags are tag_base + i + (n << 32)
_REASON_MAX = 400     # abort reasons cross the wire in a header
_PARTS = "meshrun.parts"  # a tuple's header: its length; its parts follow on the same tag
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


class StepFailed(MeshError):
    """A pipeline step failed on another rank after this rank's part of it
    finished; its gradients are rolled back, as the failed ranks' are.
    Never the root cause (``from_abort``: mesh.spawn and meshrun report the
    rank that failed)."""

    from_abort = True


def rows_of(batch: Any) -> int:
    """The rows of a batch; of a tuple (a model of several inputs), those
    every part has (else ValueError). A dict raises a TypeError saying what
    a batch is (its len() was taken for its rows: distribute's sample=
    {"x": x, "mask": m} then failed in its layers' timing on "unhashable
    type: 'slice'")."""
    _no_dict(batch)
    if not isinstance(batch, tuple):
        return len(batch)
    rows = {len(part) for part in batch}
    if len(rows) != 1:
        raise ValueError(f"the parts of a tuple batch have {sorted(rows)} rows: "
                         "each part is cut into the same micro-batches")
    return rows.pop()


_PAIRED = ("each of the {m} micro-batches of the targets holds those of the inputs' "
           "micro-batch: as many rows, or c times as many (per-token targets, flattened)")


def _paired(inputs: int, targets: int, m: int) -> bool:
    """Whether ``targets`` rows cut into ``m`` micro-batches pair with
    ``inputs`` rows so cut: as many, or c times as many in every
    micro-batch (a language model's targets flattened over its tokens
    beside inputs of (batch, tokens)). Fewer rows, or a multiple whose
    cuts fall elsewhere, pair micro-batch k's outputs with other rows'
    targets, silently where the loss broadcasts."""
    if targets == inputs:
        return True
    if inputs <= 0 or targets % inputs:
        return False
    c = targets // inputs
    return all(k * targets // m == c * (k * inputs // m) for k in range(m + 1))


def _no_dict(batch: Any) -> None:
    """Raise where ``batch`` is a dict (keyword inputs), saying what a batch is."""
    if isinstance(batch, dict):
        raise TypeError(f"a batch is an array, a tensor or a tuple of them (a model of "
                        f"several inputs takes them as a tuple, in its forward's order), not "
                        f"a dict ({', '.join(map(str, list(batch)[:4]))})")


def split_microbatches(batch: Any, m: int) -> list[Any]:
    """``m`` slices of ``batch`` along axis 0, sizes differing by at most
    one; of a tuple (a model of several inputs), tuples of its parts' slices."""
    if isinstance(batch, tuple):
        rows_of(batch)
        return list(zip(*(split_microbatches(part, m) for part in batch)))
    _no_dict(batch)                 # (sliced as a dict: "unhashable type: 'slice'")
    n = len(batch)
    if n < m:
        raise ValueError(f"a batch of {n} rows cannot be cut into {m} micro-batches")
    bounds = [k * n // m for k in range(m + 1)]
    return [batch[bounds[k]:bounds[k + 1]] for k in range(m)]


def _axes(grid_or_group: Grid | Comm) -> tuple[Comm, Comm | None, int]:
    """(pp communicator, dp communicator or None, dp index) of a grid or group."""
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
    just before its own backward); other stages recompute whole. Step n's messages use tags
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
                 layered: bool = False) -> None:
        self.pp, self.dp, self.dp_index = _axes(grid_or_group)
        # every rank of the pipeline: where the step's outcome is agreed on
        self.whole = grid_or_group.comm if isinstance(grid_or_group, Grid) else grid_or_group
        self.tp_index, self.tp = 0, None      # tp: the stage's peers, when it has any
        if isinstance(grid_or_group, Grid) and "tp" in grid_or_group.axes:
            self.tp_index = grid_or_group.coord("tp")
            tp = grid_or_group.group("tp")
            self.tp = tp if tp.size > 1 else None
        if schedule.num_ranks != self.pp.size:
            raise ValueError(f"pp rank {self.pp.rank}: schedule {schedule.name!r} has "
                             f"{schedule.num_ranks} ranks but the pipeline group has "
                             f"{self.pp.size}: make it for pp={self.pp.size}")
        lowered = verify(schedule)
        if self.dp is not None and self.dp.size > 1:
            lowered = with_grad_sync(lowered)
        elif any(a.kind == AR for row in lowered.ranks for a in row):
            # a schedule that names its all-reduces (one a dp pipeline ran, its
            # .schedule) on one replica: an average over one is the gradient as it is
            lowered = lowered.replace([a for a in row if a.kind != AR] for row in lowered.ranks)
        self.schedule = lowered
        self.rank = self.pp.rank
        self.program: tuple[Action, ...] = lowered.ranks[self.rank]
        # eval_step's: the forwards and their messages, in the schedule's order
        self.forward_program = tuple(a for a in self.program if a.kind in (F, SEND_F, RECV_F))
        mine = lowered.stages_of(self.rank)
        given = stage if isinstance(stage, (list, tuple)) else [stage]
        patterns = patterns_of(recompute)
        try:        # this rank's own arguments: every rank raises (_given_alike)
            self._take(given, mine, recompute, patterns, loss_fn, optimizer, tag_base, layered)
            fault = None
        except (TypeError, ValueError) as e:
            fault = e
        # engine.layers stages sharded by hand: what each cut's two sides hold
        edges = {s: cut_edges(obj) for s, obj in zip(mine, given)} if fault is None else {}
        _given_alike(self.pp, schedule, tag_base, given, mine, timeout, fault, edges)
        if edges:       # (every pp rank's, gathered by _given_alike: all raise alike)
            ours = next((g for g in map(group_of, given) if g is not None), None)
            refuse_cut_fed_whole(edges, self.tp_index if ours is None else ours.rank)
        # selective recompute: the submodules named, in every stage that holds them
        self.checkpointed = (_checkpointed(self.pp, self.stages, patterns, timeout)
                             if patterns else {})
        self.tied = TiedGrads(self.pp, lowered, self.stages)
        if self.tied and any(a.kind == OPT for a in self.program):
            raise ValueError(f"pp rank {self.rank} holds tied parameters, whose gradients are "
                             f"summed after the step: schedule {schedule.name!r} cannot have "
                             "OPT actions")
        self.tied.broadcast(timeout)
        # sequence-parallel sums of whole parameters' gradients, once a step
        # (not with OPT actions: the optimizer would step before the sums)
        self.tp_sums = TpSums(self.stages, enabled=not any(a.kind == OPT for a in self.program))
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
        self.loss_checked = False      # what it returns: seen on its first call
        self.optimizer = optimizer
        self.timeout = timeout
        self.tag_base = tag_base
        self._steps = 0
        # the first step's number in the tags: after every step an earlier
        # Pipeline made on the group (every pp rank made as many: step() and
        # the Pipelines are made alike on each)
        self._step0 = _steps_on(self.pp)
        self.events: list[list[Any]] = []

    def _take(self, given: Sequence[Any], mine: Sequence[int], recompute: Any,
              patterns: Sequence[str], loss_fn: Any, optimizer: Any, tag_base: int,
              layered: bool) -> None:
        """Check this rank's own arguments and wrap its stages (raises
        TypeError or ValueError, which __init__ has every rank raise)."""
        lowered, schedule = self.schedule, self.schedule
        if recompute == "auto":
            raise TypeError("recompute='auto' is engine.distribute's (it chooses); a Pipeline "
                            "takes True, False, stage indices or submodule name patterns")
        again = frozenset() if patterns else _recomputing(recompute,  # type: ignore[arg-type]
                                                          lowered.num_stages)
        if len(given) != len(mine):     # what the caller passed, counted before any pairing
            raise ValueError(f"pp rank {self.rank} holds stages {list(mine)} of "
                             f"{schedule.name!r} but was given {len(given)} stage object(s)")
        stages = [_as_stage(obj, s in again, s, recompute, layered)
                  for s, obj in zip(mine, given)]
        self.stages = dict(zip(mine, stages))
        self.first = 0 in self.stages
        self.last = lowered.num_stages - 1 in self.stages
        if self.last and loss_fn is None:
            raise ValueError(f"pp rank {self.rank} holds the last stage: it needs a loss_fn")
        if any(a.kind == OPT for a in self.program) and optimizer is None:
            raise ValueError(f"schedule {schedule.name!r} has OPT actions: pass optimizer=")
        # optimizer(stage) runs at OPT actions only: with none anywhere it never ran (the
        # weights never changed, without a word)
        if optimizer is not None and not any(a.kind == OPT for r in lowered.ranks for a in r):
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

    def step(self, inputs: Any = None, targets: Any = None) -> float | None:
        """Run one step; return the mean loss on last-stage ranks, else None.
        On failure, clean up (see the class docstring) and raise."""
        st = _Step(self, self._steps)
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
        the trace); its mean loss on last-stage ranks. On failure: clean
        up, agree with the others that it failed, raise."""
        at = 0
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
            mean = self._mean_loss(st)
        except BaseException as e:
            st.abandon(at, e)
            st.agree(e)
            raise
        st.agree(None)
        return mean

    def eval_step(self, inputs: Any = None, targets: Any = None, *,
                  outputs: bool = False) -> Any:
        """Evaluate: the schedule's forwards only, in its order (its
        backwards, gradient averages and sums left out), no gradient
        touched and no autograd graph kept (torch's ``no_grad``). Every
        torch stage's modules are in eval mode for the call (dropout off,
        as ``model.eval()`` in one process) and get back their own modes
        after. Returns the mean loss over the global batch on last-stage
        ranks (the micro-batches and dp replicas weighed by their rows, as
        ``step()``'s: one process's ``loss_fn(model(x), y)``), None
        elsewhere (and where ``targets`` is None: no loss, inference, every
        replica alike); with ``outputs``, ``(loss, out)``: the last stage's
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
        return mean, (_joined([st.outs_last[k] for k in range(len(st.outs_last))])
                      if self.last else None)

    def _mean_loss(self, st: "_Step") -> float | None:
        """The step's mean loss on last-stage ranks (averaged over dp,
        where the replicas' rows weighed it), else None."""
        if not self.last or not st.weights:
            return None
        mean = st.mean_loss()
        if st.loss_sync:
            assert self.dp is not None
            st.loss_sync = False
            buf = np.array([mean], dtype=np.float64)
            collectives.all_reduce(self.dp, buf, op="avg")
            mean = float(buf[0])
        return mean

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> float:
        """Clip the gradients to a total norm of ``max_norm``, as torch's
        ``clip_grad_norm_`` on the one-process model (Megatron's
        ``clip_grad_norm``), and return the total norm before clipping (a
        float, the same on every rank): over every stage and tp shard, each
        tied and each tp-replicated parameter counted once, dp replicas
        not multiplying it (their gradients are averaged already; see
        engine.clip). Every gradient on every rank is scaled by the same
        factor, so tied copies and replicas stay equal. Call it after
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


def _recomputing(recompute: bool | Collection[int], num_stages: int) -> frozenset[int]:
    """The stages that recompute, out of ``Pipeline``'s ``recompute``: all
    of them, none, or the stage indices given (each checked)."""
    if isinstance(recompute, bool):
        return frozenset(range(num_stages)) if recompute else frozenset()
    if isinstance(recompute, (str, bytes)) or not isinstance(recompute, Iterable):
        raise TypeError(f"recompute= takes True, False, a collection of stage indices or "
                        f"submodule name patterns, not {type(recompute).__name__}")
    chosen = frozenset(recompute)
    wrong = sorted((s for s in chosen
                    if isinstance(s, bool) or not isinstance(s, int)
                    or not 0 <= s < num_stages), key=repr)
    if wrong:
        raise ValueError(f"recompute={sorted(chosen, key=repr)!r}: {wrong!r} are not stage "
                         f"indices of a {num_stages}-stage schedule (0..{num_stages - 1})")
    return chosen


def _given_alike(pp: Comm, schedule: Schedule, tag_base: int, given: Sequence[Any],
                 mine: Sequence[int], timeout: float | None,
                 fault: BaseException | None = None,
                 edges: dict[int, Any] | None = None) -> None:
    """Every pp rank was given the same schedule and tag_base, and stages
    of the same engine.partition cut (its stages carry it: layers per
    stage), checked in one small all_gather on the pp group before anything
    else is sent, all ranks raising alike. Ranks given other schedules
    waited for each other's messages until the timeout, or paired
    micro-batches of other sizes; stages of other cuts (another balance=,
    or balance="time" timed on each rank alone) skipped or repeated
    layers without a word. ``fault``: what is wrong with this rank's own
    arguments (a tag_base out of range, a missing loss_fn...): raised here,
    and by every other rank as a ValueError naming it (alone, they waited
    for this rank in their next collective). ``edges``: this rank's stages'
    ``cut_edges``, to which every pp rank's are added."""
    ranks = getattr(pp, "ranks", range(pp.size))       # (a stand-in group of one rank)
    me = f"rank {ranks[pp.rank]}: Pipeline on group {getattr(pp, 'name', '?')}"
    cuts = {tuple(c) for c in (getattr(o, "partition_cut", None) for o in given) if c}
    apart = (f"pp rank {pp.rank}'s stages {list(mine)} come from different engine.partition "
             f"cuts: {sorted(cuts)}" if len(cuts) > 1 else None if fault is None else str(fault))
    if not apart and cuts and len(next(iter(cuts))) != schedule.num_stages:
        apart = (f"schedule {schedule.name!r} runs {schedule.num_stages} stages, but pp rank "
                 f"{pp.rank}'s come from an engine.partition cut into "
                 f"{len(next(iter(cuts)))}: cut the model into schedule.num_stages")
    if pp.size == 1:
        if fault is not None:
            raise _retold(fault, f"{me}: {fault}")
        if apart:
            raise ValueError(f"{me}: {apart}")
        return
    said = hashlib.blake2b(schedule.to_json().encode(), digest_size=8).hexdigest()
    cut = None if apart else next(iter(cuts), None)
    ends = [[s, *e] for s, e in (edges or {}).items() if any(e)]
    told = collectives.all_gather_object(pp, [schedule.name, said, tag_base, cut, apart, ends],
                                         timeout=timeout)     # (apart: raised by every rank)
    if edges is not None:
        edges.update((s, (end, top)) for t in told for s, end, top in t[5])
    faults = [t[4] for t in told if t[4]]
    if fault is not None:
        raise _retold(fault, f"{me}: {fault}")
    if faults:
        raise ValueError(f"{me}: {apart or faults[0]}")
    told = [t[:4] for t in told]
    kinds: dict[tuple, list[int]] = {}
    for r, (name, digest, base, _) in enumerate(told):
        kinds.setdefault((name, digest, base), []).append(r)
    if len(kinds) > 1:
        raise ValueError(f"{me}: its pp ranks were given different schedules or tag_bases ("
                         + "; ".join(f"pp ranks {rs}: schedule {name!r} ({digest}), tag_base "
                                     f"{base}" for (name, digest, base), rs in kinds.items())
                         + "): every rank passes the same ones")
    if len({tuple(c) for *_, c in told if c is not None}) > 1:
        raise ValueError(f"{me}: the pp ranks' stages come from different engine.partition "
                         "cuts (layers per stage): " + ", ".join(
                             f"pp rank {r}: {list(c)}" for r, (*_, c) in enumerate(told)
                             if c is not None)
                         + "; every rank must cut alike (the same balance=; for "
                           "balance='time', pass group= so that one timing decides)")


def _checkpointed(pp: Comm, stages: dict[int, Any], patterns: Sequence[str],
                  timeout: float | None) -> dict[int, list[str]]:
    """``checkpoint_modules`` of ``patterns`` on each of this rank's torch
    stages: ``{stage: names wrapped}``; a pattern no stage of the pipeline
    holds (the pp ranks' hits gathered) raises on every rank, naming it."""
    wrong = [f"stage {s}, a {type(stage).__name__}, is not a torch module"
             for s, stage in stages.items() if not isinstance(stage, TorchStage)]
    done = {} if wrong else {
        s: checkpoint_modules(stage.module, patterns, f"stage {s}", missing=True)
        for s, stage in stages.items()}
    names = [[n for n, _ in stages[s].module.named_modules() if n] for s in done]
    mine = [p for p in patterns if any(named_by(v, p) for v in names)]
    # every rank learns every rank's hits and refusals, so all raise alike
    held = collectives.all_gather_object(pp, [mine, wrong], timeout=timeout)
    refused = [f"pp rank {r}: {w}" for r, (_, ws) in enumerate(held) for w in ws]
    if refused:
        raise TypeError(f"recompute={list(patterns)!r} (submodules by name): "
                        + "; ".join(refused))
    nowhere = [p for p in patterns if not any(p in h for h, _ in held)]
    if nowhere:
        raise ValueError(f"recompute={list(patterns)!r}: {nowhere!r} match no submodule of "
                         f"any stage of the pipeline (names as in each stage's module: "
                         f"pp rank {pp.rank}'s stages {sorted(stages)})")
    return done


def _as_stage(obj: Any, recompute: bool = False, index: int = 0, given: Any = True,
              layered: bool = False) -> Any:
    """``obj`` (stage ``index``), or a TorchStage of it when it is a torch
    module (keeping the partition's marks of tied parameters; ``layered``:
    an ``nn.Sequential`` recomputing layer by layer); ``given``: Pipeline's
    ``recompute``, for the error."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(obj, torch.nn.Module):
        if not recompute or getattr(obj, "recompute", False):
            return obj
        if deterministic(obj):          # engine.layers' own: recomputes exactly
            return Recompute(obj)
        asked = given if isinstance(given, bool) else sorted(given, key=repr)
        raise TypeError(f"recompute={asked!r}: stage {index}, a {type(obj).__name__}, is not "
                        "made of engine.layers' own layers, so its forward may not give the "
                        "same result twice: wrap it as engine.layers.Recompute(stage) where it "
                        "does (torch modules recompute with their random draws kept)")
    by_layer = layered and recompute and isinstance(obj, torch.nn.Sequential)
    stage: Any = TorchStage(obj, recompute, layered=by_layer)
    stage.tied = getattr(obj, "tied", ())
    return stage


def _forward_only(stage: Any, x: Any) -> Any:
    """A stage's output for ``x`` with nothing kept for a backward: a
    TorchStage's without autograd's graph, another's forward's output."""
    if isinstance(stage, TorchStage):
        return stage.forward_only(x)
    return stage.forward(x)[0]


def _noted(e: BaseException, note: str) -> None:
    """Add ``note`` to ``e`` (Python 3.11's notes, shown under its
    traceback; its class and message stay the user's), unless its message
    says where it was raised already."""
    if hasattr(e, "add_note") and not isinstance(e, MeshError) and \
            note.split(":")[0] not in str(e):
        e.add_note(note)


def _shapes(v: Any) -> Any:
    """``v``'s shape; a list of its parts' where it is a tuple of tensors
    (None for a part without one); None where it has none."""
    if isinstance(v, tuple):
        return [_shapes(part) for part in v]
    shape = getattr(v, "shape", None)
    return None if shape is None else tuple(shape)


def _fits(got: Any, want: Any) -> bool:
    """Whether a gradient's shapes (``_shapes``) are those of the value it
    is the gradient of; a part without a gradient (a mask's) fits."""
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(g is None or _fits(g, w)
                                             for g, w in zip(got, want))
    return got == want


def _joined(parts: list[Any]) -> Any:
    """The micro-batches' outputs joined along axis 0 (tensors or arrays);
    a list of them where they are tuples (several tensors)."""
    if not parts or isinstance(parts[0], tuple):
        return parts
    torch = sys.modules.get("torch")
    if torch is not None and all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    return np.concatenate([np.asarray(p) for p in parts])


def _retold(fault: BaseException, text: str) -> BaseException:
    """``fault`` again with message ``text``, its traceback kept: of its own
    class where that takes a message alone, else a TypeError or ValueError
    (as ``fault`` is one) caused by it."""
    try:
        new = type(fault)(text)
    except Exception:                        # a class with its own arguments
        new = (TypeError if isinstance(fault, TypeError) else ValueError)(text)
        new.__cause__ = fault
    return new.with_traceback(fault.__traceback__)


def _in_action(e: MeshError, where: str) -> MeshError:
    """``e`` again (its class, its peer, its traceback), its message saying
    ``where`` after the rank that raised it: a receive's own message names
    only its tag."""
    msg = str(e)
    head, sep, rest = msg.partition(": ")
    if not (sep and head.startswith("rank ")):
        head, rest = "", msg
    text = f"{head}: {where}: {rest}" if head else f"{where}: {rest}"
    try:
        new = type(e)(text, e.peer) if isinstance(e, LostPeerError) else type(e)(text)
    except Exception:                        # a class with its own arguments: as it was
        return e
    new.__dict__.update(e.__dict__)          # (from_abort: another rank's failure)
    return new.with_traceback(e.__traceback__)


def stages_for_rank(all_stages: Sequence[Any], schedule: Schedule, pp_rank: int) -> list[Any]:
    """This rank's stage objects, in stage order, out of the whole model's
    (as many as the schedule's stages: another count raises, naming both;
    a rank the schedule lacks raises, naming its ranks)."""
    if isinstance(pp_rank, bool) or not isinstance(pp_rank, numbers.Integral) or not (
            0 <= pp_rank < schedule.num_ranks):
        raise ValueError(f"pp rank {pp_rank!r} is not a rank of schedule {schedule.name!r}, "
                         f"whose ranks are 0..{schedule.num_ranks - 1}: pass this rank's "
                         f"coordinate on the pp axis (grid.coord('pp'))")
    if len(all_stages) != schedule.num_stages:
        raise ValueError(f"schedule {schedule.name!r} runs {schedule.num_stages} stages, but "
                         f"the model was cut into {len(all_stages)}: cut it into "
                         f"schedule.num_stages (engine.partition(model, sched.num_stages))")
    return [all_stages[s] for s in schedule.stages_of(int(pp_rank))]


_Key = tuple[int, int]


def _key(a: Action) -> _Key:
    assert a.mb is not None
    return (a.stage, a.mb)


class _Step:
    """The state of one step on one rank: what each action leaves for a later
    one, keyed by (stage, micro-batch), and the requests still in flight."""

    def __init__(self, pipe: Pipeline, n: int, forward_only: bool = False) -> None:
        self.pipe, self.n = pipe, n
        self.forward_only = forward_only     # eval_step's: no backward, no gradient touched
        self.program = pipe.forward_program if forward_only else pipe.program
        self.outs_last: dict[int, Any] = {}  # eval_step's: the last stage's outputs
        self.xs: dict[_Key, Any] = {}
        self.gys: dict[_Key, Any] = {}
        self.outs: dict[_Key, Any] = {}
        self.ctxs: dict[_Key, Any] = {}
        self.in_shapes: dict[_Key, Any] = {}   # each forward's input's (_shapes)
        self.wctxs: dict[_Key, Any] = {}
        self.targets: list[Any] = []
        self.weights: list[float] = []
        self.losses = [0.0] * pipe.schedule.num_microbatches
        self.prior: dict[int, list[Any]] = {}
        self.before: dict[int, list[Any]] = {}
        self.stepped: dict[int, list[Any]] = {}   # weights before this step's first OPT
        self.opted: set[int] = set()              # the stages whose OPT ran
        self.opt_state: Any = None                # the optimizer's, before its first
        self.recvs: dict[Action, Any] = {}
        self.sends: list[Any] = []
        self.syncs: dict[int, list[Any]] = {}
        self.loss_sync = pipe.last and pipe.dp is not None and pipe.dp.size > 1
        self.rows_pending = self.loss_sync     # the sum of the replicas' rows, not yet made
        self.tp_seq = pipe.tp.collective_channel().seq if pipe.tp is not None else 0
        # this replica's rows of inputs (stage 0's ranks) and of targets (the last
        # stage's), -1 where this rank was given none: compared at the step's end
        self.in_rows = self.target_rows = -1

    def start(self, inputs: Any, targets: Any) -> None:
        """Split the batch and post every receive of the step."""
        pipe = self.pipe
        m = pipe.schedule.num_microbatches
        call = "eval_step()" if self.forward_only else "step()"
        if not self.forward_only:
            self.before = self._snapshot()
            pipe.tied.start()
            pipe.tp_sums.start()
        if pipe.first:
            if inputs is None:
                raise ValueError(f"pp rank {pipe.rank} holds stage 0: {call} needs inputs")
            try:
                xs = split_microbatches(inputs, m)
            except ValueError as e:
                raise ValueError(f"pp rank {pipe.rank}: {call}'s inputs: {e}") from None
            self.xs.update({(0, k): x for k, x in enumerate(xs)})
            self.in_rows = rows_of(inputs)
        if pipe.last and targets is None and self.forward_only and not self.rows_pending:
            self.loss_sync = False      # outputs only: no loss
        elif pipe.last:
            if targets is None and not self.forward_only:
                raise ValueError(f"pp rank {pipe.rank} holds the last stage: {call} needs targets")
            if targets is not None:
                try:
                    self.target_rows = rows_of(targets)
                except ValueError as e:
                    raise ValueError(f"pp rank {pipe.rank}: {call}'s targets: {e}") from None
            if pipe.first and targets is not None and not _paired(self.in_rows,
                                                                  self.target_rows, m):
                # (across ranks, agree() compares them: the step fails on every rank)
                raise ValueError(f"pp rank {pipe.rank}: {call}: its inputs have {self.in_rows} "
                                 f"rows but its targets {self.target_rows}: {_PAIRED.format(m=m)}")
            try:
                self.targets = [] if targets is None else split_microbatches(targets, m)
            except ValueError as e:
                raise ValueError(f"pp rank {pipe.rank}: {call}'s targets: {e}") from None
            # rows, not len(): a tuple of targets (labels and a mask) has its parts' rows
            total = sum(rows_of(t) for t in self.targets)
            share = 1.0     # this replica's rows over the mean replica's (dp replicas may differ)
            if self.rows_pending:
                assert pipe.dp is not None
                self.rows_pending = False
                # (with them, how many replicas have targets: eval_step's may be None, on all)
                rows = np.array([total, targets is not None], dtype=np.float64)
                collectives.all_reduce(pipe.dp, rows, op="sum")
                having = int(rows[1])
                if having not in (0, pipe.dp.size):
                    raise ValueError(f"pp rank {pipe.rank}: {call}: {having} of {pipe.dp.size} "
                                     f"dp replicas gave targets, the others None: all do, or "
                                     f"none (outputs only)")
                if not having:
                    self.loss_sync = False
                    return self._post_receives()
                share = total * pipe.dp.size / float(rows[0])
            # each micro-batch's loss gradient weighed by its share of the global batch
            # (times dp, which the average over dp divides out): every stage's gradients,
            # linear in it, are then the global mean loss's
            self.weights = [rows_of(t) / total * share for t in self.targets]
        if not self.forward_only:
            self.prior = self._save_prior()
        self._post_receives()

    def _post_receives(self) -> None:
        """Post every receive of the step's program."""
        pipe = self.pipe
        for a in self.program:
            if a.kind in (RECV_F, RECV_B):
                self.recvs[a] = pipe.pp.irecv(pipe.schedule.rank_of(message_key(a)[1]),
                                              tag=pipe._tag(a, self.n))

    def run(self, a: Action) -> str:
        """Execute one action; return its flow direction for the trace."""
        pipe, sched = self.pipe, self.pipe.schedule
        if a.kind in (F, B, I, W):
            try:
                if a.kind == F:
                    self._forward(a)
                elif a.kind == W:
                    pipe.stages[a.stage].backward_weight(self.wctxs.pop(_key(a)))
                else:
                    self._backward(a)
            except Exception as e:
                _noted(e, self._computing(a, self.in_shapes.get(_key(a)) if a.kind == F
                                          else None))
                raise
        elif a.kind in (SEND_F, SEND_B):
            dst, tag = sched.rank_of(message_key(a)[2]), pipe._tag(a, self.n)
            value = self.outs.pop(_key(a))
            parts = [value]
            # a colwise output cut off by the stage's end (its layer the stage's last) is
            # told as one, so the next stage's rank watches it too: a layer the plan leaves
            # whole there raised torch's shape error alone, naming neither (tensor_parallel)
            watched = [(i, w) for i, v in enumerate(value if isinstance(value, tuple)
                                                    else (value,))
                       for w in [watch_of(v)] if w is not None]
            if isinstance(value, tuple) or watched:   # a header, then each part
                many = value if isinstance(value, tuple) else (value,)
                self.sends.append(pipe.pp.isend(
                    {_PARTS: len(many), "none": [i for i, v in enumerate(many) if v is None],
                     "fixed": list(getattr(value, "fixed", ())), "watched": watched,
                     "one": not isinstance(value, tuple)}, dst, tag=tag))
                parts = [v for v in many if v is not None]
            for v in parts:
                if getattr(v, "_tp_meta", None) is not None:   # (a watched colwise output:
                    v = v.as_subclass(sys.modules["torch"].Tensor)  # its data alone)
                self.sends.append(pipe.pp.isend(v, dst, tag=tag))
            return "s"
        elif a.kind in (RECV_F, RECV_B):
            try:
                value = self.recvs.pop(a).wait(pipe.timeout)
                if isinstance(value, dict) and _PARTS in value:
                    value = self._parts(a, value)
            except MeshError as e:
                raise _in_action(e, self._receiving(a)) from None
            (self.xs if a.kind == RECV_F else self.gys)[_key(a)] = value
            return "f"
        elif a.kind == AR:
            assert pipe.dp is not None       # the lowering adds ARs only with a dp axis
            works = self.syncs.setdefault(a.stage, [])
            for g in pipe.stages[a.stage].grads():
                works.append(collectives.all_reduce(pipe.dp, g, op="avg", async_op=True))
        elif a.kind == OPT:
            self._finish_sync(a.stage)
            self._add_prior(a.stage)
            assert pipe.optimizer is not None
            if not self.opted:      # the step's first OPT: every stage's weights before it
                self.stepped = {s: [copied(p) for p in st.params()]
                                for s, st in pipe.stages.items()}
                if hasattr(pipe.optimizer, "state_dict"):
                    self.opt_state = copy.deepcopy(pipe.optimizer.state_dict())
            self.opted.add(a.stage)
            pipe.optimizer(pipe.stages[a.stage])
            self._stepped_alone(a)
        return ""

    def _stepped_alone(self, a: Action) -> None:
        """Raise where ``optimizer(stage)`` at OPT action ``a`` changed the
        weights of another stage of this rank whose own OPT comes later (one
        torch optimizer over all the rank's parameters, ``opt.step()`` at
        each call): a rank holding several stages (interleaved, ZB-V) would
        step them once per stage a step, silently."""
        pipe = self.pipe
        later = {b.stage for b in pipe.program if b.kind == OPT} - self.opted
        for s in sorted(later):
            if any(not bool(((p == o) | (o != o)).all())          # (a NaN is no change)
                   for p, o in zip(pipe.stages[s].params(), self.stepped[s])):
                raise ValueError(
                    f"pp rank {pipe.rank}: pipeline step {self.n} ({pipe.schedule.name}), "
                    f"{a}: optimizer(stage {a.stage}) changed the weights of stage {s} too, "
                    f"whose own OPT action comes later in the step, so they would be stepped "
                    f"once per stage of this rank: an optimizer= steps the parameters of the "
                    f"stage it is given only (a torch optimizer per stage)")

    def _computing(self, a: Action, given: Any) -> str:
        """What compute action ``a`` was doing, in the user's terms: a
        note on an error raised in it (a stage's own numpy error, a shape
        mismatch, named neither the stage nor where its input came from)."""
        pipe, sched = self.pipe, self.pipe.schedule
        call = {F: "forward", B: "backward", I: "backward_input", W: "backward_weight"}[a.kind]
        text = (f"pp rank {pipe.rank}: raised in pipeline step {self.n} ({sched.name}), {a}: "
                f"stage {a.stage}'s {call}() of micro-batch {a.mb}")
        if given is not None:
            text += f", its input of shape {given}"
            if a.stage > 0 and sched.rank_of(a.stage - 1) != pipe.rank:
                text += (f" from stage {a.stage - 1} on pp rank "
                         f"{sched.rank_of(a.stage - 1)}")
        return text

    def _receiving(self, a: Action) -> str:
        """What receive ``a`` waits for, in the user's terms (for errors)."""
        sched = self.pipe.schedule
        _, src, dst, mb = message_key(a)
        what = "activation" if a.kind == RECV_F else "gradient"
        return (f"pipeline step {self.n} ({sched.name}), {a}: stage {dst} waits for stage "
                f"{src}'s {what} of micro-batch {mb} from pp rank {sched.rank_of(src)}")

    def _parts(self, a: Action, header: dict[str, Any]) -> tuple[Any, ...]:
        """The tuple a header announced: its parts follow it on the same
        tag (in order: one source, one tag), None where the sender had none;
        its colwise outputs watched again (``watched``), and a tensor sent
        alone beside its watch returned alone (``one``)."""
        pipe = self.pipe
        src, tag = pipe.schedule.rank_of(message_key(a)[1]), pipe._tag(a, self.n)
        none = set(header["none"])
        reqs = {i: pipe.pp.irecv(src, tag=tag) for i in range(header[_PARTS]) if i not in none}
        parts: list[Any] = [None] * header[_PARTS]
        try:
            for i, req in reqs.items():
                parts[i] = req.wait(pipe.timeout)
        except BaseException:
            for req in reqs.values():
                req.cancel()
            raise
        for i, watch in header.get("watched", ()):
            if pipe.tp is not None:        # (the sender's tp peers are this rank's own)
                parts[i] = rewatched(parts[i], watch, pipe.tp)
        if header.get("one"):
            return parts[0]
        return Parts(parts, header.get("fixed", ()))

    def _forward(self, a: Action) -> None:
        pipe, (s, k) = self.pipe, _key(a)
        last = s == pipe.schedule.num_stages - 1
        if last:
            forget_exits()
        x = self.xs.pop((s, k))
        # (taken once: what its input gradient must be, checked in _backward, and what
        # an error in the forward notes)
        self.in_shapes[(s, k)] = _shapes(x)
        if self.forward_only:
            y = _forward_only(pipe.stages[s], x)
        else:
            y, self.ctxs[(s, k)] = pipe.stages[s].forward(x)
        split = split_by() if last else None
        if split is not None:
            self._split_output(a, *split)
        if last and self.forward_only:
            self.outs_last[k] = y
            if self.targets:
                self.losses[k] = self._value(y, self.targets[k])
        elif last:
            loss, gy = self._loss(y, self.targets[k])
            if _shapes(y) is not None and not _fits(_shapes(gy), _shapes(y)):
                # (numpy broadcasts a (rows, 1) one through a Tanh's backward: wrong
                # gradients with nothing said; other shapes failed far off, in a stage)
                raise ValueError(f"pp rank {pipe.rank}: pipeline step {self.n} "
                                 f"({pipe.schedule.name}), {a}: loss_fn(output, target) "
                                 f"returned a gradient of shape {_shapes(gy)} for an output of "
                                 f"shape {_shapes(y)} (micro-batch {k}): the gradient of the "
                                 "loss with respect to the output has the output's shape")
            self.losses[k] = float(loss)
            self.gys[(s, k)] = gy * self.weights[k]
        elif pipe.schedule.rank_of(s + 1) == pipe.rank:
            self.xs[(s + 1, k)] = y
        else:
            self.outs[(s, k)] = y

    def _split_output(self, a: Action, name: str, style: str) -> None:
        """Refuse a last stage whose output a tensor-parallel plan left split
        along the sequence: the loss would take each tp rank's part of the
        sequence against the whole target (a shape error, or, a loss pooling
        over the sequence, another loss on each rank and replicated weights
        drifting apart with nothing said). The step fails on every rank."""
        pipe = self.pipe
        where = f" (tp rank {pipe.tp.rank})" if pipe.tp is not None else ""
        # (a "replicate" module's output is whole only when its input was gathered)
        whole = ("" if style == "replicate" else
                 f"give {name!r} output 'replicate' in the plan, or ")
        raise PlanError(f"pp rank {pipe.rank}{where}: the last stage's output is split along "
                        f"the sequence over the tp group by {name!r} (output 'sequence' in the "
                        f"plan; pipeline step {self.n} ({pipe.schedule.name}), {a}), so the "
                        f"loss would see this tp rank's part of the sequence: {whole}plan a "
                        f"colwise module after it with input 'sequence' and output "
                        f"'replicate' (the head)")

    def _loss(self, y: Any, target: Any) -> tuple[Any, Any]:
        """``loss_fn(y, target)``: (loss, gradient of ``y``); on its first
        call, a torch loss is wrapped or a wrong return refused. A tensor
        output's loss gets its targets as tensors on the output's device
        (each part of a tuple), on its first call too: a torch loss of the
        user's own (``F.cross_entropy(logits, y)``) given numpy targets
        failed there, in torch, before it could be wrapped."""
        pipe = self.pipe
        assert pipe.loss_fn is not None
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(y, torch.Tensor):
            target = torch_targets(target, y.device)
        out = pipe.loss_fn(y, target)
        if not pipe.loss_checked:   # its first call: a torch loss wrapped, or a clear error
            fn = as_pipeline_loss(pipe.loss_fn, out, f"pp rank {pipe.rank}", y)
            if fn is not pipe.loss_fn:
                pipe.loss_fn = fn
                out = fn(y, target)
            pipe.loss_checked = True
        return out

    def _value(self, y: Any, target: Any) -> float:
        """The loss alone (eval_step): a torch loss computed without its
        gradient where the loss is one (``torch_loss``'s ``value``), else
        the pair's loss (autograd on, for its gradient's sake)."""
        value = getattr(self.pipe.loss_fn, "value", None)
        if value is not None:
            return float(value(y, target))
        torch = sys.modules.get("torch")
        with torch.enable_grad() if torch is not None else contextlib.nullcontext():
            loss, _ = self._loss(y, target)
        return float(loss)

    def _backward(self, a: Action) -> None:
        pipe, (s, k) = self.pipe, _key(a)
        stage, ctx, gy = pipe.stages[s], self.ctxs.pop((s, k)), self.gys.pop((s, k))
        if a.kind == B:
            gx = stage.backward(ctx, gy)
        else:
            gx, self.wctxs[(s, k)] = stage.backward_input(ctx, gy)
        want = self.in_shapes.pop((s, k), None)
        if s > 0 and want is not None and gx is not None and not _fits(_shapes(gx), want):
            # (else numpy broadcast it through the stage before: a (rows, 1) one into a
            # Tanh's backward gave wrong gradients with nothing said; others failed
            # there, the stage before blamed)
            raise ValueError(f"pp rank {pipe.rank}: pipeline step {self.n} "
                             f"({pipe.schedule.name}), {a}: stage {s}'s "
                             f"{'backward' if a.kind == B else 'backward_input'}() returned an "
                             f"input gradient of shape {_shapes(gx)} for micro-batch {k}, whose "
                             f"input had shape {want}: a stage's input gradient has its "
                             "input's shape")
        if s > 0 and pipe.schedule.rank_of(s - 1) == pipe.rank:
            self.gys[(s - 1, k)] = gx
        elif s > 0:
            self.outs[(s, k)] = gx

    def _snapshot(self) -> dict[int, list[Any]]:
        """What each gradient held before the step: a copy, or None for
        zeros (what a failed step's gradients are put back to)."""
        return {s: stage.held_grads() if hasattr(stage, "held_grads") else
                [copied(g) if bool(g.any()) else None for g in stage.grads()]
                for s, stage in self.pipe.stages.items()}

    def _save_prior(self) -> dict[int, list[Any]]:
        """Set aside what the gradients held before the step (when anything:
        accumulation, or no ``zero_grad()``) and zero them, so everything
        the step does to them (the average over dp, the sum of a tied
        parameter's copies, the sequence-parallel sum over tp) covers this
        step's gradients only; ``_add_prior`` adds it back once, after.
        (Each of those, done over gradients that held the old ones, would
        count them again: a tied copy's twice, a sequence-parallel norm's
        tp + 1 times.)"""
        prior = {s: old for s, old in self.before.items() if any(o is not None for o in old)}
        for s in prior:
            for g in self.pipe.stages[s].grads():
                g[...] = 0
        return prior

    def _finish_sync(self, s: int) -> None:
        for req in self.syncs.get(s, []):    # kept until all are done: see abandon()
            req.wait()
        self.syncs.pop(s, None)

    def _add_prior(self, s: int) -> None:
        """Stage ``s``'s gradients: what they held before the step plus the
        step's, as torch's ``.grad +=`` makes them."""
        for g, old in zip(self.pipe.stages[s].grads(), self.prior.pop(s, [])):
            if old is not None:
                g += old

    def finish(self) -> None:
        """Wait for every all-reduce and every send of the step, then sum
        the gradients of tied parameters over their copies, and those of
        whole parameters fed a part of the sequence over the tp group; then
        add back what the gradients held before the step."""
        for s in list(self.syncs):
            self._finish_sync(s)
        for req in self.sends:
            req.wait(self.pipe.timeout)
        if self.forward_only:
            return
        self.pipe.tied.reduce(self.pipe.timeout)
        self.pipe.tp_sums.settle(self.pipe.timeout)
        for s in list(self.prior):
            self._add_prior(s)

    def mean_loss(self) -> float:
        return sum(w * v for w, v in zip(self.weights, self.losses))

    def abandon(self, at: int, error: BaseException) -> None:
        """Clean up after ``error`` in action ``at`` (len(program): after the
        last one). Cancel the receives still posted; abort, on every pp rank,
        the tags of the messages from ``at`` on (peers waiting for one raise,
        a late one is dropped), and on the dp group the all-reduces this step
        will not start, so the group's collective sequence stays the same on
        every rank. Then let the started all-reduces finish and put back what
        the gradients held before the step."""
        pipe = self.pipe
        for req in self.recvs.values():
            req.cancel()
        self.recvs.clear()
        where = f" (tp rank {pipe.tp.rank})" if pipe.tp is not None else ""
        reason = (f"pipeline step {self.n} failed on pp rank {pipe.rank}{where}: "
                  f"{type(error).__name__}: {error}")[:_REASON_MAX]
        kind = AbortKind.of(error)  # peers raise the same kind: a lost peer stays one
        lost = error.peer if isinstance(error, LostPeerError) else None
        skipped = (1 if self.loss_sync else 0) + (1 if self.rows_pending else 0)
        for a in self.program[at:]:
            if a.kind in (SEND_F, SEND_B, RECV_F, RECV_B):
                pipe.pp.collective_channel().abort(pipe._tag(a, self.n), reason, kind, lost)
            elif a.kind == AR:
                skipped += len(pipe.stages[a.stage].grads()) - len(self.syncs.get(a.stage, []))
        if not self.forward_only:       # (eval_step makes no tied sums)
            pipe.tied.abandon(reason, kind, lost)
        self._abandon_tp(reason, kind, lost, own=not getattr(error, "from_abort", False)
                         and not isinstance(error, LostPeerError))
        dp = pipe.dp
        for _ in range(skipped):
            assert dp is not None
            collectives.abandon(dp, reason, kind, lost)
        limit = pipe.timeout if pipe.timeout is not None or dp is None else dp.timeout
        for s in list(self.syncs):
            for work in self.syncs.pop(s):
                try:
                    work.wait(limit)
                except Exception:
                    pass
        self.prior.clear()
        if not self.forward_only:
            pipe.tp_sums.abandon()
        self.roll_back()

    def roll_back(self) -> None:
        """Put every gradient back to what it held before the step, and
        the weights of this rank's stages, once an OPT action ran, to what
        they were before the step's first (copied there), and an optimizer with ``state_dict()`` and
        ``load_state_dict()`` (momentum, Adam's moments, a step count) to
        its state before the step's first OPT action (a deep copy taken
        there); another optimizer's own state saw one more call."""
        for s, old in self.stepped.items():
            for p, o in zip(self.pipe.stages[s].params(), old):
                p[...] = o
        if self.opt_state is not None:
            self.pipe.optimizer.load_state_dict(self.opt_state)     # type: ignore[union-attr]
        for s, old in self.before.items():
            stage = self.pipe.stages[s]
            if hasattr(stage, "put_grads"):
                stage.put_grads(old)
                continue
            for g, o in zip(stage.grads(), old):
                if o is None:
                    g[...] = 0
                else:
                    g[...] = o

    def agree(self, error: BaseException | None) -> None:
        """Every rank of the pipeline learns whether the step failed anywhere
        (a small all-reduce over the grid): a rank whose part finished
        while another's failed rolls its gradients back too, and raises
        StepFailed naming the ranks that failed (or the all-reduce's own
        error: a LostPeerError naming a rank that died). Called with this
        rank's own error (already cleaned up and rolled back), it only tells
        the rest; the caller re-raises it. Targets whose rows do not pair
        with the inputs' (``_paired``; known on other ranks) fail the step
        on every rank, rolled back, with a ValueError naming both counts; so
        does a step that some ranks ran as ``eval_step()`` and others as
        ``step()`` (their messages pair up: the training ranks' gradients
        took the evaluating ranks' forwards, whose stages learned nothing),
        naming which ranks called which."""
        pipe, whole = self.pipe, self.pipe.whole
        if whole.size == 1:
            return
        # with it, each dp replica's rows of inputs and of targets (+1; 0: not
        # known here), which only ranks of the first and the last stage know:
        # targets of other rows than the inputs pair rows wrongly (the loss of
        # micro-batch k taken against another one's targets) without a word
        replicas = pipe.dp.size if pipe.dp is not None else 1
        # and last, whether some rank evaluates (eval_step) and some trains (step)
        failed = np.zeros(3 + 2 * replicas, dtype=np.int64)
        failed[0] = 0 if error is None else 1
        failed[1 + 2 * pipe.dp_index:3 + 2 * pipe.dp_index] = (self.in_rows + 1,
                                                               self.target_rows + 1)
        failed[-2:] = (1, 0) if self.forward_only else (0, 1)
        wrong: list[tuple[int, int, int]] = []
        evals: list[int] = []
        try:
            collectives.all_reduce(whole, failed, op="max", timeout=pipe.timeout)
            rows = failed[1:-2].reshape(replicas, 2) - 1
            m = pipe.schedule.num_microbatches
            wrong = [(d, int(a), int(b)) for d, (a, b) in enumerate(rows)
                     if a >= 0 and b >= 0 and not _paired(int(a), int(b), m)]
            mixed = bool(failed[-2] and failed[-1])
            if not failed[0] and not wrong and not mixed:
                return
            if not failed[0] and not mixed:
                reasons: list[str | None] = []
            else:
                mine = None if error is None else f"{type(error).__name__}: {error}"
                tp_seq = pipe.tp.collective_channel().seq if pipe.tp is not None else 0
                told = collectives.all_gather_object(
                    whole, [mine, tp_seq, self.forward_only], timeout=pipe.timeout)
                reasons = [why for why, _, _ in told]
                evals = [r for r, (*_, only) in enumerate(told) if only] if mixed else []
                self.realign_tp([seq for _, seq, _ in told])
        except Exception:
            if error is not None:
                return                       # this rank's own error is raised
            self.roll_back()                 # a lost peer, a timeout: raised as it is
            raise
        if evals:
            if error is None:
                self.roll_back()
            steps = [r for r in range(whole.size) if r not in evals]
            raise ValueError(
                f"rank {whole.rank} of {whole.name}: pipeline step {self.n} "
                f"({pipe.schedule.name}): ranks {evals} of {whole.name} called eval_step() "
                f"where ranks {steps} called step(): every rank calls the same, as often "
                "(an evaluation takes a step's tags); rolled back on every rank") from error
        if wrong:
            if error is None:
                self.roll_back()
            sched = pipe.schedule
            raise ValueError(
                f"rank {whole.rank} of {whole.name}: pipeline step {self.n} ({sched.name}): "
                + "; ".join(f"{f'dp replica {d}: ' if replicas > 1 else ''}the inputs (pp rank "
                            f"{sched.rank_of(0)}) have {a} rows but the targets (pp rank "
                            f"{sched.rank_of(sched.num_stages - 1)}) {b}" for d, a, b in wrong)
                + f": {_PAIRED.format(m=m)}; rolled back on every rank") from error
        if error is not None:
            return
        self.roll_back()
        where = "; ".join(f"rank {r} of {whole.name}: {why}"[:_REASON_MAX]
                          for r, why in enumerate(reasons) if why is not None)
        raise StepFailed(f"pipeline step {self.n} failed elsewhere after rank {whole.rank} "
                         f"finished its part; rolled back on every rank ({where})")

    def realign_tp(self, seqs: list[int]) -> None:
        """After a failed step: every rank of this rank's tp group takes the
        highest collective number any of them reached (``seqs``, by rank of
        the pipeline's grid), so their next collectives number alike; the
        numbers skipped were aborted (late messages on them are dropped)."""
        tp, whole = self.pipe.tp, self.pipe.whole
        if tp is None:
            return
        ch = tp.collective_channel()
        ch.seq = max(seqs[whole.ranks.index(w)] for w in tp.ranks)

    def _abandon_tp(self, reason: str, kind: AbortKind, lost: int | None,
                    own: bool = True) -> None:
        """Fail the tp peers' next collective, which this rank will not make
        (they run the same stage and would wait in it until its timeout),
        unless this rank's last tp collective of the step was aborted by a
        peer (``own`` False: the group knows) that made the step's earlier
        ones with it, or that is lost. A peer that aborted the step's first
        one may have done so outside any step (``job.state_dict()`` called on
        it alone, its tp gather timed out): it is a collective ahead, waiting
        in the step's first one, for the timeout, step after step, unless
        that is failed too. tp peers make their
        collectives in lockstep, so a peer is at most one collective ahead,
        waiting in it; when this rank failed in a collective by its own
        error, a peer may have finished that one and wait in the next, so
        that one is failed too. The ranks may then end the step one
        collective apart: ``agree`` lines them up (``realign_tp``)."""
        tp = self.pipe.tp
        if tp is None:
            return
        ch = tp.collective_channel()
        if not own and (ch.seq > self.tp_seq + 1 or lost is not None) \
                and ch.aborted(-ch.seq, "tp collective") is not None:
            return
        collectives.abandon(tp, reason, kind, lost)
