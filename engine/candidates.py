"""The candidate schedules: each built-in schedule cut, simulated and ranked.

``builtin`` makes the named schedules (``SCHEDULES``) at each micro-batch
count (``microbatch_counts``), saying which it cannot make and why;
``yours`` names and verifies a user's own schedules; ``candidates`` cuts the layers for each,
simulates it with its per-stage costs (engine.costs) and its peak memory,
each way of holding activations (kept, recomputed, recomputed in the
stages over the limit: ``fewest``), and returns them ``best_first``:
under the memory limit, then by predicted step time. ``stage_spans``
lists the candidates' stages of several layers, for
engine.profiling.measure_stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .costs import (KEEPS_INPUT, LayerCost, Span, _starts, as_run, counts_for, helper_charge,
                    layer_by_layer, peak_bytes, stage_costs, stage_held)
from .ir import I, Schedule
from .schedules import by_name
from .user_schedules import verified

__all__ = ["SCHEDULES", "Candidate", "Unrun", "microbatch_counts", "builtin", "yours",
           "candidates", "fewest", "best_first", "stage_spans"]

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zb-v")


def microbatch_counts(p: int, rows: int) -> list[int]:
    """The micro-batch counts tried: p, 2p, 4p... (1, 2, 4... when p is 1),
    as long as each micro-batch keeps at least one row."""
    ms: list[int] = []
    m = p
    while m <= rows and len(ms) < 5:
        ms.append(m)
        m *= 2
    return ms


# a candidate that cannot run: its name, its micro-batches and why (a row of the table)
Unrun = tuple[str, int, str]


@dataclass(frozen=True)
class Candidate:
    """One schedule with its layer cut, and what the simulator predicts."""

    schedule: Schedule
    counts: tuple[int, ...]
    makespan: float
    bubble: float
    peak_bytes: int
    fits: bool
    costs: dict[str, list[float]]
    summed: float | None = None     # the makespan had every stage cost its layers' sum
    measured: bool = False          # the executor's costs from a dry run of its own (recosted)
    # its stages recompute their forward in the backward (all, or the stages of a set)
    recompute: bool | frozenset[int] = False
    cores: float | None = None      # simulated with the ranks sharing this many cores (retimed)
    load: float = 0.0               # and with others' processes wanting them, ranks' worth
    # the recomputing stages go layer by layer (each keeps its layers' inputs
    # and makes one layer's activations again at a time), not whole; N > 1 (an int):
    # in runs of N layers (each run's input kept, its activations made again at once)
    layered: bool | int | tuple[int, ...] = False
    # per stage, the mesh threads' CPU (helper_charge) its F, B and I costs hold
    charge: tuple[float, ...] = ()
    # the executor's own seconds per compute action its costs hold (in each F, B, I
    # and W, or its "fixed" cost where the ranks share cores): engine.calibrate's
    overhead: float = 0.0
    # simulated again with what the re-time learned (``calibrated``): the factor its
    # compute took, and the one the whole row took after to meet the re-time's prediction
    retimed: tuple[float, float] | None = None
    limit: float | None = None      # the memory limit ``fits`` was judged by (None: none)


def builtin(names: Sequence[str | Callable[[int, int], Schedule]], p: int, ms: Sequence[int],
            chunks: int = 2, refused: list[Unrun] | None = None) -> list[Schedule]:
    """Each named schedule for ``p`` ranks at each micro-batch count in ``ms``
    (a family of your own, engine.user_schedules' ``Family``, made there
    as a name is); those that do not take that p and m (interleaved at
    ``m % p``) left out, and added to ``refused`` with the reason where it
    is given."""
    out = []
    for m in ms:
        for name in names:
            try:
                out.append(by_name(name, p, m, chunks) if isinstance(name, str) else name(p, m))
            except ValueError as e:
                if refused is not None:
                    refused.append((f"{name}({p},{m})", m, str(e)))
    return out


def yours(scheds: Sequence[Schedule], p: int, said: list[list[str]] | None = None
          ) -> list[Schedule]:
    """A user's own schedules as candidates beside the built-ins: each
    verified (``validate``: a ``ScheduleError`` naming it) for ``p``
    pipeline ranks, and one left with Schedule's default name ("custom")
    named "yours #k" (k counting them from 1), so its row and its errors
    say which it is. ``said``: what became of each, appended
    (engine.user_schedules' ``made_entry``), the one that raises too."""
    out = []
    for k, sched in enumerate(scheds, 1):
        if not isinstance(sched, Schedule):
            raise TypeError(f"yours #{k} is {type(sched).__name__}, not an engine.Schedule")
        if sched.name in ("", "custom"):
            sched = sched.replace(sched.ranks, name=f"yours #{k}")
        out.append(verified(sched, p, said, f" (yours #{k})"))
    return out


def candidates(profile: dict[int, dict[int, LayerCost]], params: Sequence[int], rows: int,
               scheds: Sequence[Schedule], balance: Any = "time", scale: float = 1.0,
               memory_limit: float | None = None,
               overhead: float | Mapping[int, float] = 0.0,
               send: float | Mapping[int, float] = 0.0,
               stages: Mapping[int, Mapping[Span, LayerCost]] | None = None,
               helper: float = 0.0, recv: float | Mapping[int, float] = 0.0,
               cores: float | None = None, recompute: bool | str = False,
               inputs: Mapping[int, int] | None = None, copies: bool = True,
               layers: bool = False, runs: int | tuple[int, ...] = 0) -> list[Candidate]:
    """Each schedule of ``scheds`` with its layers cut by ``balance`` and
    simulated; best first. ``profile`` has a row for each micro-batch size
    ``ceil(rows / m)``; ``stages`` (``measure_stages``), where it has a
    stage, that stage's time measured whole; ``scale`` multiplies every
    measured time (1/tp for tensor-parallel stages); ``overhead`` is added
    to every compute action and ``send`` is each message's time of flight
    (see ``stage_costs``), each one figure or one per micro-batch count
    (``{m: seconds}``: the executor's costs depend on it, engine.calibrate),
    as is ``recv``, the least a receive takes;
    ``helper`` the mesh threads' CPU per message end
    charged to the computing ranks (``helper_charge``; 0 where a core is
    spare). ``cores``: the ranks share that many cores (engine.simulate's;
    ``overhead`` then an unshared ``"fixed"`` cost, see ``retimed``).
    ``recompute``: the stages recompute their forward in the backward
    (``as_run``: the profile measured stages that keep their activations),
    and the peak memory counts each stage's input kept and its
    activations made again (``peak_bytes``'s ``kept``); ``"auto"``: every
    schedule both ways where there is a ``memory_limit`` (without one,
    recomputing is only slower: keeping), and a third way where keeping
    puts some ranks but not all over the limit: only those ranks' stages
    recompute (``Candidate.recompute`` the set of them; the layers cut as
    when kept), and where that is more than one stage of a rank, the
    fewest stages that do (``fewest``) as a fourth. A stage holds for each
    micro-batch what its layers hold (``stage_held``) and its input (the
    output of the layer before; for the first stage ``inputs[size]``, the
    bytes of a micro-batch of the batch where the stage copies it, None:
    not counted): copied (``copies``, torch stages), or the message it got
    where its first layer keeps it (engine.layers); the last stage also
    its loss's gradient, from its F to its B; and a backward, while it
    runs, the gradients flowing (``peak_bytes``' ``flowing``: twice the
    stage's widest output). ``layers``: a way that
    recomputes is also costed with its stages recomputing layer by layer
    and in runs of each N from 2 to one fewer than its longest recomputing
    stage's layers (``layer_by_layer``: torch stages), and taken the way
    whose peak is lowest, a later way (whole, by layer, runs of 2, 3...)
    only where it is strictly lower (the same time: each layer's forward
    once more; ``Candidate.layered``: True, or N): blocks that hold many
    times their input gain, (Linear, GELU) pairs, which keep their inputs
    anyway, do not.
    The way is chosen for each rank's stages on their own (``_least``: a
    rank's peak is its own stages' alone), so stages of 4 and 3 layers may
    go in runs of 2 and 3 (``Candidate.layered`` then per stage, 0 where
    whole or kept: ``(2, 3)``).
    ``runs=N`` (with ``layers``): the stages that recompute go in runs of N
    layers (``TorchStage(..., layered=N)``), costed so (``layer_by_layer``'s
    ``runs``) whatever their peak whole; a tuple, one N per stage (0:
    whole), the schedules of another number of stages left out."""
    L = len(params)
    out = []
    for sched in scheds:
        if sched.num_stages > L or isinstance(runs, tuple) and len(runs) != sched.num_stages:
            continue
        size = -(-rows // sched.num_microbatches)
        m = sched.num_microbatches
        ov = overhead if isinstance(overhead, (int, float)) else overhead[m]
        msg = send if isinstance(send, (int, float)) else send[m]
        rc = recv if isinstance(recv, (int, float)) else recv[m]
        shared = cores is not None
        charge = helper_charge(sched, helper) if helper else None
        both = recompute == "auto" and memory_limit is not None  # (no limit: never faster)
        ways: list[bool | frozenset[int]] = [False, True] if both else [recompute is True]
        for again in ways:
            # a set of stages is cut as when kept, then costed as it runs
            row, whole = as_run(profile[size], (stages or {}).get(size), again is True)
            times = [row[i].F + row[i].B for i in range(L)]
            counts = counts_for(balance, sched.num_stages, times, params)
            if isinstance(again, frozenset):
                row, whole = as_run(row, whole, again, counts)
            costs = stage_costs(row, counts, scale, ov, msg, whole, charge, rc, shared)
            rep = sched.simulate(costs, cores)
            summed = (sched.simulate(stage_costs(row, counts, scale, ov, msg, None, charge, rc,
                                                 shared), cores).makespan
                      if whole else rep.makespan)
            act, kept, overlap, grads, start = [], [], [], [], 0
            for c in counts:
                given = row[start - 1].act_bytes if start else (inputs or {}).get(size, 0)
                act.append(stage_held(row, start, start + c, given, copies))
                kept.append(given)
                overlap.append(0 if copies or not row[start].keeps & KEEPS_INPUT else given)
                grads.append(2 * max(row[i].act_bytes for i in range(start, start + c)))
                start += c
            # the last stage holds each micro-batch's loss gradient from its F (where
            # the loss runs) to its B, recomputing or not (not made again)
            loss = row[L - 1].act_bytes
            act[-1] += loss
            hold = kept[:-1] + [kept[-1] + loss]
            overlap[-1] += loss
            held = None if not again else [k if again is True or s in again else None
                                           for s, k in enumerate(hold)]
            peaks = peak_bytes(sched, act, held, overlap, grads)
            layered: Layered = False
            if again and layers and held is not None:
                split = any(a.kind == I for r in sched.ranks for a in r)
                walk = _Walk(sched, row, counts, kept, held, act, grads, split, overlap)
                if runs:
                    each = runs if isinstance(runs, tuple) else (runs,) * len(counts)
                    peaks, layered = walk(each), _said(each, held)
                else:
                    peaks, layered = _least(walk, peaks, counts, held)
            peak = max(peaks)
            fits = memory_limit is None or peak <= memory_limit
            out.append(Candidate(sched, counts, rep.makespan, rep.bubble, peak, fits, costs,
                                 summed, cores=cores, recompute=again, layered=layered,
                                 charge=tuple(charge or ()), overhead=ov,
                                 limit=memory_limit))
            if both and again is False and not fits:    # only the ranks over the limit
                assert memory_limit is not None
                over = frozenset(s for r, pk in enumerate(peaks) if pk > memory_limit
                                 for s in sched.stages_of(r))
                if over and len(over) < sched.num_stages:
                    ways.insert(1, over)
                    few = fewest(sched, act, hold, memory_limit, overlap, grads)
                    if few is not None and few < over:      # (a rank of several stages)
                        ways.insert(1, few)
    return best_first(out)


# how a candidate's recomputing stages go: False whole, True layer by layer, N in runs
# of N layers, or per stage (0: whole, or not recomputing)
Layered = bool | int | tuple[int, ...]


class _Walk:
    """``__call__(ns)``: per rank, the peak of ``sched`` with each
    recomputing stage ``s`` (``held`` not None) in runs of ``ns[s]``
    layers (1: layer by layer; ``layer_by_layer``), or whole where it is 0,
    each stage's input as given (``kept``) and what it keeps besides, the
    loss's gradient, as in ``held``."""

    def __init__(self, sched: Schedule, row: Mapping[int, LayerCost], counts: Sequence[int],
                 kept: Sequence[int], held: Sequence[int | None], act: Sequence[int],
                 grads: Sequence[int], split: bool, shared: Sequence[int]) -> None:
        self.sched, self.row, self.counts, self.kept = sched, row, counts, kept
        self.held, self.act, self.grads, self.split = held, act, grads, split
        self.shared = shared

    def __call__(self, ns: Sequence[int]) -> tuple[int, ...]:
        by = [layer_by_layer(self.row, b, b + c, k, self.split, n) if h is not None and n
              else (k, a) for b, c, k, h, a, n in zip(_starts(self.counts), self.counts,
                                                      self.kept, self.held, self.act, ns)]
        return peak_bytes(self.sched, [x for _, x in by],
                          [h if h is None else k + h - g
                           for (k, _), h, g in zip(by, self.held, self.kept)],
                          [0 if n and h is not None else sh
                           for n, h, sh in zip(ns, self.held, self.shared)],
                          self.grads)


def _least(walk: _Walk, peaks: tuple[int, ...], counts: Sequence[int],
           held: Sequence[int | None]) -> tuple[tuple[int, ...], Layered]:
    """Each rank's recomputing stages (``held`` not None) whole (``peaks``),
    layer by layer or in runs of N, each N from 2 to one fewer than the
    stage's layers, the way that rank's peak is lowest with, a later way
    only where it is strictly lower: first one N for all of a rank's
    stages, then (a rank of several stages) each stage's own in turn,
    the others' as chosen. A rank's peak is its own stages' alone, so
    each stage of a rank of one has its own best N."""
    sched = walk.sched
    ns = [0] * len(counts)
    best = list(peaks)
    again = [h is not None for h in held]
    for n in [1, *range(2, max(c for c, a in zip(counts, again) if a))]:
        twin = walk([n if a and (n == 1 or n < c) else 0 for c, a in zip(counts, again)])
        for r, pk in enumerate(twin):
            if pk < best[r]:
                best[r] = pk
                for s in sched.stages_of(r):
                    ns[s] = n if again[s] and (n == 1 or n < counts[s]) else 0
    for r in range(sched.num_ranks):
        mine = [s for s in sched.stages_of(r) if again[s]]
        for s in mine if len(mine) > 1 else []:
            for n in [0, 1, *range(2, counts[s])]:
                twin = walk([n if t == s else m for t, m in enumerate(ns)])
                if twin[r] < best[r]:
                    best[r], ns[s] = twin[r], n
    return walk(ns), _said(tuple(ns), held)


def _said(ns: tuple[int, ...], held: Sequence[int | None]) -> Layered:
    """``Candidate.layered`` of stages in runs of ``ns[s]``: one N for every
    recomputing stage as before (1: True; 0: False), else ``ns`` (0 where a
    stage is whole or keeps)."""
    mine = {n for n, h in zip(ns, held) if h is not None}
    if len(mine) > 1:
        return tuple(n if h is not None else 0 for n, h in zip(ns, held))
    n = mine.pop() if mine else 0
    return True if n == 1 else n if n else False


def fewest(sched: Schedule, act: Sequence[int], kept: Sequence[int],
           limit: float, shared: Sequence[int] = (),
           flowing: Sequence[int] = ()) -> frozenset[int] | None:
    """A small set of stages whose recompute brings every rank of ``sched``
    under ``limit`` (``peak_bytes``' ``act``, ``kept``, ``shared`` and
    ``flowing``),
    chosen greedily:
    while a rank is over, the stage of an over rank whose recompute lowers
    the highest peak most; None when recomputing every such stage does not
    do. Where a rank holds several stages (interleaved, ZB-V) one of them
    may do where ``candidates``' partial way recomputes them all."""
    chosen: set[int] = set()
    while True:
        def peaks_with(extra: set[int]) -> tuple[int, ...]:
            held = [k if s in extra else None for s, k in enumerate(kept)]
            return peak_bytes(sched, act, held, shared, flowing)
        peaks = peaks_with(chosen)
        over = [r for r, pk in enumerate(peaks) if pk > limit]
        if not over:
            return frozenset(chosen)
        options = sorted(s for r in over for s in sched.stages_of(r) if s not in chosen)
        if not options:
            return None
        chosen.add(min(options, key=lambda s: (max(peaks_with(chosen | {s})), s)))


def best_first(cands: Sequence[Candidate]) -> list[Candidate]:
    """``cands`` best first: those under the memory limit, then by predicted
    step time, peak activation bytes and micro-batch count."""
    return sorted(cands, key=lambda c: (not c.fits, c.makespan, c.peak_bytes,
                                        c.schedule.num_microbatches))


def stage_spans(cands: Sequence[Candidate], rows: int) -> dict[int, list[Span]]:
    """``{micro-batch size: [(first, stop)...]}``: the stages of more than one
    layer that ``cands`` cut, for ``measure_stages``."""
    spans: dict[int, set[Span]] = {}
    for c in cands:
        size = -(-rows // c.schedule.num_microbatches)
        bounds = [sum(c.counts[:s]) for s in range(len(c.counts) + 1)]
        spans.setdefault(size, set()).update(
            (a, b) for a, b in zip(bounds, bounds[1:]) if b - a > 1)
    return {size: sorted(ss) for size, ss in spans.items() if ss}
