"""``engine.distribute``'s measured phase, where a sample is given: every
layer timed at each candidate's micro-batch size (engine.layer_timing), the
executor's own costs measured on dry runs (engine.calibrate), the
candidates cut, simulated and ranked (engine.choose), each cut's stages
timed whole and the candidates ranked again on those times, the leaders
costed again by dry runs of their own schedules (engine.measured_choice);
the fastest under ``memory_limit`` is the choice. Every rank measures and
chooses alike; a rank's own error is told in the next exchange, so every
rank raises at once.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Callable, NamedTuple

from mesh import Grid

from .calibrate import Calibration, calibrate, collected, dry_run, hosts, shared_cores
from .choose import (Candidate, LayerCost, candidates, counts_for, kept_buffers, kept_random,
                     stage_spans, table)
from .ir import Schedule
from .schedules import one_f_one_b
from .stagebuild import make_stage
from .torch_stage import TorchStage
from .agree import _told
from .given import _copied, _cut
from .layer_timing import _median_act, _profile, _profile_stages
from .measured_choice import _measured_choice, _stage_grads
from .stage_state import _materialize, _Temp

_TP_RUNS = 10     # runs of each tensor-parallel layer's timing (its peers must run as many)


class _Measured(NamedTuple):
    """What the measured phase leaves: the candidates ranked, the one
    chosen, the executor's costs, the layers' times by micro-batch size,
    the layers as timed (``mlayers``) and the rows of the candidates that
    cannot run."""
    cands: list[Candidate]
    chosen: Candidate
    cal: Calibration
    profile: dict[int, dict[int, LayerCost]]
    mlayers: list[Any]
    skipped: list[tuple[str, int, str]]


def _measured(grid: Grid, named: list[tuple[str, Any]], sample: Any, scheds: list[Schedule],
              skipped: list[tuple[str, int, str]], early: BaseException | None, *,
              is_torch: bool, on_meta: bool, init: Callable[[Any], Any] | None, reps: int,
              tp_runs: bool, params: list[int], grads: list[Any] | None, balance: Any,
              memory_limit: float | None, overhead: float | None, way: bool | str,
              patterns: Any, auto: bool, tag_base: int, timeout: float | None,
              layered: Any = None) -> _Measured:
    """Time, simulate and choose (see the module docstring) among ``scheds``
    (``skipped``: the rows of those that cannot run so far); ``early``: this
    rank's own error before it, told in the first exchange. ``tp_runs``:
    tp peers time each layer together, ``_TP_RUNS`` runs. Collective over
    the grid."""
    p = grid.size("pp")
    L = len(named)
    skipped = list(skipped)
    # torch stages costed layer by layer too (None: kept where lower), or only in runs
    # (per stage: the schedules of as many stages)
    by_layer = is_torch and layered is not False
    in_runs: int | tuple[int, ...] = 0
    if not isinstance(layered, (list, tuple)):
        in_runs = int(layered or 0)
    else:
        in_runs = tuple(int(n or 0) for n in layered)
        skipped += [(sc.name, sc.num_microbatches, f"layered={list(layered)!r} gives runs for "
                     f"{len(in_runs)} stages, it has {sc.num_stages}")
                    for sc in scheds if sc.num_stages != len(in_runs)]
        scheds = [sc for sc in scheds if sc.num_stages == len(in_runs)]
        if not scheds:
            raise ValueError(f"rank {grid.comm.rank}: engine.distribute: layered="
                             f"{list(layered)!r} gives runs for {len(in_runs)} stages: no "
                             f"candidate schedule has as many")
    runs = _TP_RUNS if tp_runs else None
    cands: list[Candidate] = []
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
                               layers=by_layer, runs=in_runs)
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
                                   receive, cal.cores, way, ins, is_torch, by_layer, in_runs)
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
    return _Measured(cands, chosen, cal, profile, mlayers, skipped)
