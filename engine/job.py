"""``engine.distribute``'s ``Job``: the steps (``step``, ``eval_step``,
``clip_grad_norm_``), the parameters, the whole model's and an optimizer's
state gathered to rank 0 and loaded on another layout, and the re-time of
the chosen schedule (``Job.retime``, ``job.predicted``, ``far_off``).
"""
from __future__ import annotations

import copy
import functools
import time
from dataclasses import replace
from collections import OrderedDict
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

import collectives
from mesh import AbortKind, Comm, Grid, MeshError
from mesh.tensors import is_tensor

from .calibrate import Calibration, collected, dry_run
from .choose import Candidate, calibrated, kept_buffers, kept_random, retimed, table
from .executor import Pipeline
from .ir import Schedule
from .step import _in_action
from .stagebuild import model_key, named_stage_parameters
from .tensor_parallel import (cut_like, gather_like, gather_state_dict, load_full_state_dict,
                              param_shards)
from .trace import write as _write_trace
from .traced import Reshaped
from .tp_layers import full_params, load_full_params
from .agree import _OPTIM_TAG, _STATE_TAG, _all_called, _raised, _tp_agreed
from .given import _coord, _size
from .layer_timing import _retime
from .measured_choice import _shared_walls, _stretch, _stretched, fitted_load


# the steps after the first that rank 0 times against job.predicted (verbose jobs), and
# how far off their median must be to be told: once, the machine may be loaded
_WATCHED, _FAR_OFF = 5, 2.0


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

    def _agreed_part(self, make: Callable[[], Any], what: str,
                     timeout: float | None) -> tuple[Any, Comm] | None:
        """What both gathers begin with: every rank's word taken (tp, then
        pp), this rank's part made (``make``, with its tp peers' gathers),
        and this rank's own failure raised once the others are told. None
        where this rank's part goes no further (a dp replica but the first,
        a tp rank but the first); else ``(made, the pp group)``."""
        self._in_tp_gather = self._part_failed = False
        if _coord(self.grid, "dp"):
            return None
        if self.sharded:
            _all_called(self.grid.group("tp"), timeout)
        self._in_tp_gather = self.sharded
        made, failed = self._local_part(make, what, timeout)
        self._in_tp_gather, self._part_failed = False, failed is not None
        if _coord(self.grid, "tp"):
            _raised(failed)
            return None
        pp = self.grid.group("pp")
        _all_called(pp, timeout, failed, what)
        _raised(failed)
        return made, pp

    def _gathered_state(self, timeout: float | None) -> dict[str, Any] | None:
        agreed = self._agreed_part(lambda: self._local_state(timeout), "job.state_dict()",
                                   timeout)
        if agreed is None:
            return None
        local, pp = agreed
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
        agreed = self._agreed_part(lambda: self._local_optimizer(opt),
                                   "job.optimizer_state_dict(opt)", timeout)
        if agreed is None:
            return None
        (state, groups), pp = agreed
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
