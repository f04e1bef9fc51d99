"""``Job``'s prediction and its re-time (engine.job): ``job.retime()``
times this rank's stages again as the step runs them and the chosen
schedule on a dry run, and predicts the step again as the machine is now
(``job.predicted``, ``job.costs``, the table's rows: ``job.table()``);
``job.write_trace()`` stores the prediction beside a step's trace. What
the re-time runs the stages on is made as the job is built
(``_own_inputs``: each own stage's input and the loss's target).
"""
from __future__ import annotations

import copy
import functools
import sys
import time
from dataclasses import replace
from typing import Any, Callable

from mesh import Comm, Grid
from mesh.tensors import is_tensor

from .calibrate import Calibration, DryRun, collected, dry_run
from .choose import (Candidate, calibrated, kept_buffers, kept_random, retimed, table,
                     under_load)
from .executor import Pipeline
from .ir import Schedule
from .trace import write as _write_trace
from .traced import Reshaped
from .agree import _raised, _told
from .layer_timing import _exchange, _retime, _timing
from .measured_choice import _shared_walls, _stretch, _stretched, fitted_load
from .stage_state import _Temp
from .sp_axis import sp_group


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


def _own_inputs(comm: Comm, tp_group: Comm | None, mlayers: list[Any], first: Any, upto: int,
                starts: dict[int, int], loss_fn: Callable[[Any, Any], Any] | None,
                failed: BaseException | None) -> tuple[dict[int, Any], Any]:
    """What Job.retime times this rank's stages on: the sample's first
    micro-batch ``first`` through the layers as they were timed
    (``mlayers``, up to layer ``upto``), each own stage's input (the input
    of its first layer, ``starts``), and with the last stage's ``loss_fn``
    a target for it (``_loss_target``). Run as the layers were timed, then
    exchanged (sharded: tp peers pass it through the same layers,
    collectives alike); ``failed``, this rank's own error so far, or one
    raised here, is told in that exchange, so every rank raises at once."""
    xs = [first]

    def own() -> tuple[dict[int, Any], Any]:
        with kept_random(), kept_buffers(*[None if isinstance(m, _Temp) else  # (copies)
                                           getattr(m, "module", None) for m in mlayers]):
            while len(xs) <= upto:
                xs.append(mlayers[len(xs) - 1].forward(xs[-1])[0])
            return ({s: xs[i] for s, i in starts.items()},
                    _loss_target(loss_fn, xs[-1]) if loss_fn is not None else None)
    made, failed = _timing(comm, tp_group, own if failed is None else
                           functools.partial(_raised, failed))
    _exchange(comm, [], failed, tp_group)
    return made

class _Retiming:
    """Job's re-time and what it predicts (engine.job)."""

    # (Job's, set in its __init__)
    _inputs: dict[int, Any]
    _messages: list[tuple[int, int]] | None
    _reps: int
    _tag_base: int
    _target: Any
    _timeout: float | None
    calibration: Calibration | None
    candidates: list[Candidate]
    chosen: Candidate | None
    grid: Grid
    is_torch: bool
    pipeline: Pipeline
    profiled: Candidate | None
    profiled_candidates: list[Candidate]
    reshaped: Reshaped | None
    row: Candidate | None
    schedule: Schedule
    sharded: bool
    skipped: list[tuple[str, int, str]]
    stages: list[Any]
    stretch: list[float] | None
    tp_calls: dict[tuple[int, str], list[int]]

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
        # no collection of a large heap inside the figures; the random streams and
        # buffers as they were (its stages' copies draw dropout masks and count
        # their BatchNorms as often as timed)
        with collected(), kept_random(), kept_buffers(*[getattr(st, "module", None)
                                                        for st in self.stages]), \
                self.pipeline.owned_params.whole():     # (ZeRO stage 3: timed whole)
            again, table = self._timed_again()
        if table is not None:       # (distribute's table re-timed: again)
            self.candidates, self.row = table
        return again

    def _table_loaded(self, cands: list[Candidate], chosen: Candidate) -> None:
        """distribute's table (``cands``, its ``chosen`` row) simulated with
        the load the job's first re-time fitted (others' processes on the
        shared cores; none where it fitted none): its figures and ranking
        those of the host the steps will find, as ``predicted``'s are; then
        every row as the re-time corrects the chosen one (``_calibrate``: its
        compute, the executor's own costs, the messages, then the rest to
        ``predicted``): rows compared by figures 1.5-2.4x low otherwise
        (BENCHMARKS.md, forty-third session)."""
        assert self.calibration is not None
        self.candidates, self.profiled = under_load(cands, chosen, self.calibration.load)
        self.profiled_candidates = self.candidates
        self._calibrate()

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

    def _timed_again(self) -> tuple[float, tuple[list[Candidate], Candidate | None] | None]:
        """The re-time itself: the new prediction, and the table's rows
        simulated again with it (``_calibrate``'s; None where distribute's
        table is not re-timed). What follows the timing (with a dry run, the
        new figures; the prediction, the table) is worked out before a last
        word where its error is told (the dry run's, ``then``; without one,
        the costs given, one after the times' exchange), and kept only once
        every rank's part is told to have run, so every rank holds the same
        prediction: alone (a KeyboardInterrupt on one rank after a user's
        ``job.retime()`` timing) the others returned, and their next call
        waited for that rank, which kept the prediction before."""
        assert self.chosen is not None
        own = dict(zip(self.schedule.stages_of(self.pipeline.rank), self.stages))
        measured = self._messages is not None        # (not a given overhead)
        tp = self.pipeline.tp if self.sharded else None
        sp = sp_group(self.grid)        # (sp peers: their all_to_alls made together)
        calls: dict[tuple[int, str], list[int]] = {}
        times, runs = _retime(self.grid.comm, own, self._inputs, self.pipeline.program,
                              self._reps, self._loss(),
                              time.thread_time if measured else time.perf_counter,
                              calls if tp is not None else None, tp or sp,
                              # (its inputs are the sample's: its error told as the times)
                              self.reshaped.sample if self.reshaped is not None else None,
                              fixed=sp is not None)
        self.tp_calls = calls
        cal = self.calibration or Calibration(0.0, 0.0)
        if measured:
            assert self._messages is not None
            spin = {k: [getattr(times[s], k) for s in range(self.schedule.num_stages)]
                    for k in ("F", "B", "I", "W")}
            dp = self.pipeline.dp is not None and self.pipeline.dp.size > 1
            sched = self.chosen.schedule
            got: list[tuple[Any, ...]] = []

            def figured(dry: DryRun) -> None:      # (in the dry run's last word: its error told)
                c = replace(cal, action=dry.action, message=dry.message,
                            helper=dry.helper if cal.crowded else 0.0,
                            helper_measured=dry.helper, receive=dry.receive)
                # where the ranks share the cores: others' processes on them too, as many
                # as make the simulated dry run as long as the measured one (none where it
                # is within 10%: as before)
                if c.cores is not None:
                    c = replace(c, load=fitted_load(sched, spin, c, c.cores, dry.compute or {}))
                shared = None if c.cores is None else _shared_walls(sched, spin, c)
                stretch = _stretch(spin if shared is None else shared, dry.compute or {},
                                   floor=1.0 if shared is None else 0.0)
                assert self.chosen is not None
                chosen = retimed(self.chosen, {s: _stretched(lc, stretch[s])
                                               for s, lc in times.items()},
                                 c.action, 0.0, c.message, c.receive,
                                 [{s: _stretched(lc, stretch[s]) for s, lc in run.items()}
                                  for run in runs], cores=c.cores, load=c.load)
                # (the stretch holds the mesh threads' share where they take one: no helper)
                got.append((c, stretch, chosen, None if self.row is self.profiled else
                            calibrated(self.profiled_candidates, self.profiled, chosen, 0.0)))
            dry_run(self.grid.comm, self.grid.group("pp"), sched,
                    self._messages, steps=5, tag_base=self._tag_base,
                    timeout=self._timeout, costs=spin,
                    tp=(tp, calls) if tp is not None else None,
                    grid=self.grid if dp else None,
                    grads={s: _grad_sizes(st) for s, st in own.items()} if dp else None,
                    tensors=self.is_torch, then=figured)
            self.calibration, self.stretch, self.chosen, table = got[0]
            return self.chosen.makespan, table
        failed: BaseException | None = None
        try:
            chosen = retimed(self.chosen, times, cal.action, cal.helper, cal.message,
                             cal.receive, runs)
            table = None if self.row is self.profiled or self.calibration is None else \
                calibrated(self.profiled_candidates, self.profiled, chosen,
                           0.0 if self.stretch is not None else self.calibration.helper)
        except BaseException as e:
            failed = e
        _told(self.grid.comm, failed, self._timeout)
        self.chosen = chosen
        return chosen.makespan, table

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


def _grad_sizes(stage: Any) -> list[int]:
    """The bytes of each of ``stage``'s gradients, read off its parameters
    where it has them: ``grads()`` makes a None ``.grad`` zeros, so reading
    it made the gradients ZeRO stage 2 freed (engine.zero_grads) whole again
    on every replica, held until the next step's end."""
    if hasattr(stage, "grad_params"):
        return [p.numel() * p.element_size() for p in stage.grad_params()]
    return [g.nbytes for g in stage.grads()]
