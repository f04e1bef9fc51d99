"""``engine.distribute``'s ``Job``: the steps (``step``, ``eval_step``,
``clip_grad_norm_``), the parameters, the whole model's and an optimizer's
state gathered to rank 0 and loaded on another layout, and the re-time of
the chosen schedule (``Job.retime``, ``job.predicted``, ``far_off``).

This module holds the steps and the parameters; Job's other methods are
kept by theme in its mixins, one concept a module:

    engine.job_retime  retime, predicted, costs, table, write_trace
    engine.job_state   state_dict, load_state_dict (IncompatibleKeys)
    engine.job_optim   optimizer_state_dict, load_optimizer_state_dict
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, Sequence

from mesh import Grid

from .calibrate import Calibration
from .choose import Candidate
from .executor import Pipeline
from .ir import Schedule
from .stagebuild import named_stage_parameters
from .traced import Reshaped
from .job_retime import _Retiming
from .job_state import IncompatibleKeys, _ModelState
from .job_optim import _OptimizerState

__all__ = ["Job", "IncompatibleKeys", "far_off"]


# the steps after the first that rank 0 times against job.predicted (verbose jobs), and
# how far off their median must be to be told: once, the machine may be loaded
_WATCHED, _FAR_OFF = 5, 2.0


class Job(_ModelState, _OptimizerState, _Retiming):
    """One rank's part of a distributed model: see the module docstring."""

    def __init__(self, grid: Grid, pipeline: Pipeline, stages: list[Any], counts: tuple[int, ...],
                 names: list[str], is_torch: bool, chosen: Candidate | None,
                 cands: list[Candidate], sharded: bool = False,
                 calibration: Calibration | None = None, inputs: dict[int, Any] | None = None,
                 reps: int = 3, messages: list[tuple[int, int]] | None = None,
                 timeout: float | None = None, tag_base: int = 0,
                 target: Any = None, keys: list[str] | None = None,
                 aliases: dict[str, str] | None = None,
                 skipped: Sequence[tuple[str, int, str]] = (),
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
        self.skipped = list(skipped)    # candidates that cannot run: (name, m, why)
        self.schedule: Schedule = pipeline.schedule
        # step() times its steps here against predicted (rank 0 of a verbose job), else None
        self.watched: list[float] | None = None
        # a traced model's pieces at each step's input shapes (None: at any, as traced)
        self.reshaped: Reshaped | None = None

    def step(self, inputs: Any = None, targets: Any = None, *,
             scaler: Any = None) -> float | None:
        """One step on this dp replica's batch; the global batch's mean
        loss, the same float on every rank (DeepSpeed's ``train_batch``'s;
        ``Pipeline.step``). Ranks that need neither may pass them.
        ``scaler``: a ``torch.amp.GradScaler``, in place of one process's
        ``scaler.scale(loss).backward()``, its inf check alike on every rank
        (engine.scaled); then ``scaler.unscale_(opt)``, ``scaler.step(opt)``
        and ``scaler.update()`` as in one process.
        A verbose job's rank 0 times its steps after the first, and once it
        has five, says so if their median is over twice ``predicted`` or
        under half of it (``far_off``): once, and nothing where it is not."""
        step = functools.partial(self.pipeline.step, scaler=scaler)
        if self.watched is None:
            return self._stepped(step, inputs, targets)
        began = time.perf_counter()
        out = self._stepped(step, inputs, targets)
        self.watched.append(time.perf_counter() - began)
        if len(self.watched) > _WATCHED:
            said = far_off(self.watched[1:], self.predicted, self.schedule.name)
            self.watched = None
            if said:
                print(f"engine.distribute: {said}", flush=True)
        return out

    @property
    def reports(self) -> dict[str, Any]:
        """The last ``step()``'s or ``eval_step()``'s reports, on every rank:
        a loss's reports (Megatron-core's ``{"lm loss": [sum, count]}``,
        or its older ``{"lm loss": mean}``) over its micro-batches and dp
        replicas as Megatron's training loop logs them: a [sum, count] the
        sum over the count, one value its mean over the micro-batches
        (engine.reports); {} where its loss reported nothing, or it failed."""
        return self.pipeline.reports

    def eval_step(self, inputs: Any = None, targets: Any = None, *,
                  outputs: bool = False) -> Any:
        """Evaluate this dp replica's batch: the schedule's forwards only,
        no gradient touched, torch modules in eval mode for the call
        (``Pipeline.eval_step``). The mean loss over the global batch on
        every rank (one process's ``loss_fn(model(x), y)``; None where
        ``targets`` is None on every replica); with ``outputs``, ``(loss,
        the last stage's outputs)`` (None off the last stage).
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
            reshaped, split = self.reshaped, pipe.seq_split
            pipe.before_step = (functools.partial(reshaped.step, inputs) if split is None else
                                lambda: reshaped.step(split(inputs, None, "step()")[0]))
        try:
            return step(inputs if pipe.first else None, targets if pipe.last else None)
        finally:
            pipe.before_step = None

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False, foreach: bool | None = None) -> Any:
        """Clip every rank's gradients to a total norm of ``max_norm`` and
        return the total norm before clipping, the same on every rank: the
        one-process model's (torch's ``clip_grad_norm_`` on it, and as it
        returns it: a 0-d tensor for a torch model, a float for a numpy
        one), over all stages and tp shards, each tied and each replicated
        parameter counted once (``Pipeline.clip_grad_norm_``). Collective:
        between ``step()`` and ``opt.step()`` on every rank."""
        return self.pipeline.clip_grad_norm_(max_norm, norm_type, error_if_nonfinite, foreach)

    def _grads_kept_by(self, params: Sequence[Any], owners: Sequence[int] | None) -> None:
        """ZeRO stage 2 (engine.ZeroRedundancyOptimizer(stage=2) calls it):
        from the next step on, each of ``params``' gradients reduced to the
        dp replica ``owners`` names and freed on the others; None: averaged
        on every replica and kept, as without (engine.zero_grads)."""
        self.pipeline.owned.take(params, owners)

    def _params_kept_by(self, params: Sequence[Any], owners: Sequence[int | None] | None,
                        per_layer: bool = True, prefetch: int = 0,
                        bucket: int = 50_000_000, max_live: int = 1_000_000_000) -> None:
        """ZeRO stage 3 (engine.ZeroRedundancyOptimizer(stage=3) calls it):
        each of ``params``' values kept by the dp replica ``owners`` names
        alone between steps, the others' dropped now, a step gathering them
        module by module (``per_layer``, ``prefetch`` modules ahead of the
        one running, their elements not yet used ``bucket`` at most, the
        elements live outside the module running ``max_live`` at most) or
        whole; None (an owner, or ``owners``): on every replica again
        (collective over dp: engine.zero_params)."""
        self.pipeline.owned_params.take(params, owners, per_layer, prefetch, bucket, max_live)

    def gathered(self, fill: bool = True) -> Any:
        """A context manager: under ZeRO stage 3, every parameter of this
        rank with its values for the ``with`` block (each broadcast from the
        dp replica that owns it; collective over dp), dropped again after
        it on the replicas that do not own it (what they wrote into it then
        is lost; the owner's writes are kept). ``fill=False``: the storage
        only, no message. Without stage 3 it does nothing."""
        return self.pipeline.owned_params.whole(fill)

    def parameters(self) -> list[Any]:
        """This rank's parameters (its stages, its shards), for an optimizer.
        Under ZeRO stage 3 those another dp replica owns are empty between
        steps (``numel() == 0``): read them inside ``job.gathered()``."""
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
