"""``engine.distribute``'s measurements: each layer (or each candidate's
stage of several layers) timed on the sample, the tp peers at once so their
collectives are in every figure, the figures exchanged so every rank holds
the same, and the chosen stages timed again in the order the schedule runs
them (``_retime``: ``Job.retime``).
"""
from __future__ import annotations

import copy
import functools
import time
from typing import Any, Callable

import collectives
from mesh import AbortKind, Comm, Grid, MeshError

from .choose import LayerCost, Span, measure, measure_stages, time_program
from .tp_plan import PlanError, logging_calls
from .tp_sums import holders as tp_holders
from .agree import _raised, _verdict
from .given import _size
from .sp_axis import replica, sp_group


def _median_act(row: dict[int, LayerCost]) -> int:
    """The median of a profile row's activation bytes."""
    return sorted(lc.act_bytes for lc in row.values())[len(row) // 2]


def _shared(grid: Grid, n: int, timed: Callable[[list[int]], list[tuple[Any, LayerCost]]],
            failed: BaseException | None = None) -> list[tuple[list[int], LayerCost]]:
    """Items ``0..n-1`` shared out over the ranks, each timing its own
    (``timed(mine)``: ``(key, cost)`` pairs, a key a tuple of ints), and
    every rank's results exchanged, so all of them decide alike. With a tp
    axis, over the tp groups: a group's ranks time the same items at once
    (sharded layers, whose collectives they make together). ``failed``:
    this rank's error in its own work before (engine.distribute's), told in
    the exchange in place of its share, which it does not time."""
    index, count = 0, 1
    for name in grid.names:             # this rank's tp group, among all of them
        if name != "tp":                # (an sp group's ranks, one dp replica, time alike)
            at, k = replica(grid) if name == "dp" else (grid.coord(name), grid.size(name))
            index, count = index * k + at, count * k
    tp = grid.group("tp") if _size(grid, "tp") > 1 else sp_group(grid)
    ours = [j for j in range(n) if j % count == index]
    mine, failed = _timing(grid.comm, tp, (lambda: timed(ours)) if failed is None else
                           functools.partial(_raised, failed))
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
    _verdict(world, failed, told)
    return [([int(k) for k in key], LayerCost(f, b, gi, gw, int(nb), None if sb < 0 else int(sb),
                                              int(keeps)))
            for _, part, _ in parts for *key, f, b, gi, gw, nb, sb, keeps in part]


def _profile(grid: Grid, mlayers: list[Any], sample: Any, sizes: list[int], reps: int,
             runs: int | None = None, clock: Callable[[], float] = time.perf_counter,
             early: BaseException | None = None
             ) -> tuple[dict[int, dict[int, LayerCost]], dict[int, str]]:
    """Every layer measured at every size (``_shared`` over the layers;
    ``runs``: a fixed count, for tensor-parallel layers; ``clock``: wall
    time, or the thread's CPU where the ranks share cores); and the sizes
    where a layer failed on some rank, each with its error (a BatchNorm
    refuses a 1-row micro-batch in training), told to every rank: those
    sizes' candidates are left out, not the whole call failed. ``early``:
    as ``_shared``'s ``failed`` (engine.distribute's own work before: the plan applied)."""
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

    got = _shared(grid, len(mlayers), timed, early)
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
                    clock: Callable[[], float] = time.perf_counter,
                    failed: BaseException | None = None) -> dict[int, dict[Span, LayerCost]]:
    """Every stage of ``spans`` measured whole (engine.choose.measure_stages;
    ``_shared`` over the stages; ``runs`` and ``clock`` as ``_profile``'s;
    ``failed`` as ``_shared``'s: its exchange is a word every rank makes,
    with no stage to time too)."""
    def timed(mine: list[int]) -> list[tuple[Any, LayerCost]]:
        local = measure_stages(mlayers, join, sample, spans, reps, mine, runs, clock)
        return [((size, a, b), lc) for size, row in local.items() for (a, b), lc in row.items()]

    merged: dict[int, dict[Span, LayerCost]] = {s: {} for s in spans}
    n = sum(len(ss) for ss in spans.values())
    for (size, a, b), lc in _shared(grid, n, timed, failed):
        merged[size][(a, b)] = lc
    return merged


def _retime(world: Comm, stages: dict[int, Any], inputs: dict[int, Any], program: Any,
            reps: int, loss: tuple[int, Callable[[Any], Any]] | None = None,
            clock: Callable[[], float] = time.perf_counter,
            calls: dict[tuple[int, str], list[int]] | None = None, tp: Comm | None = None,
            before: Callable[[], Any] | None = None, fixed: bool = False
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
    ``fixed``: that fixed number of runs without ``calls`` (sp peers, whose
    all_to_alls pair up; ``tp``: their group then).
    An error there on one rank (``before()`` too, what the copies need
    first: a traced model's pieces at the sample's shapes) fails every rank
    at once (``_timing``)."""
    each: list[dict[int, LayerCost]] = []

    def timed(log: Any) -> dict[int, LayerCost]:
        if before is not None:
            before()
        copies = {s: copy.deepcopy(st) for s, st in stages.items()}
        for st in copies.values() if calls is not None else ():
            for h in tp_holders(st):
                h.defer = True
        return time_program(copies, inputs, program, max(reps, 5), clock=clock, loss=loss,
                            each=each,
                            runs=None if calls is None and not fixed else 2 * max(reps, 5),
                            calls=None if calls is None else (log, calls))
    with logging_calls() as log:
        median, failed = _timing(world, tp, functools.partial(timed, log))
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
