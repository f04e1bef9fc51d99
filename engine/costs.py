"""What layers and stages cost: ``LayerCost``, the cut, the simulator's costs, the peak.

``LayerCost`` is one layer's (or one stage's) measured seconds per action
kind and the bytes it hands on and holds (engine.profiling measures it);
``stage_held`` and ``layer_by_layer`` add up what a stage holds from its
forward to its backward, ``recomputed`` and ``as_run`` cost a stage that
recomputes; ``cut`` and ``counts_for`` split the layers into stages
(``balance=``); ``stage_costs`` and ``helper_charge`` make the simulator's
per-stage costs (``{"F": [...], ...}``) and ``peak_bytes`` each rank's most
activation bytes held at once under a schedule. Pure functions of numbers:
engine.candidates ranks the schedules with them.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from .ir import B, F, I, W, Schedule

__all__ = ["LayerCost", "KEEPS_INPUT", "KEEPS_OUTPUT", "Span", "stage_held", "layer_by_layer",
           "recomputed", "as_run", "cut", "whole_counts", "ByType", "by_type",
           "counts_for", "stage_costs", "helper_charge", "peak_bytes"]

Span = tuple[int, int]          # a stage's layers: first, stop (first..stop-1)


KEEPS_INPUT, KEEPS_OUTPUT = 1, 2       # LayerCost.keeps: what a layer keeps of its own


@dataclass(frozen=True)
class LayerCost:
    """Seconds one layer takes per micro-batch of some size, the bytes of
    its output (what it hands on: the messages between stages, the input a
    recomputing stage keeps) and what it holds from its forward to its
    backward (``held_by``: autograd's saved tensors of a torch layer, a
    numpy layer's context): ``saved_bytes`` beyond its input and its
    output (parameters aside), and ``keeps``, whether it holds its input
    (``KEEPS_INPUT``: a Linear, a GELU) and its output (``KEEPS_OUTPUT``:
    a tanh, a ReLU) too. None where not measured: its output stands in
    (``stage_held`` adds the layers up)."""

    F: float
    B: float
    I: float
    W: float
    act_bytes: int
    saved_bytes: int | None = None
    keeps: int = KEEPS_OUTPUT


def stage_held(row: Mapping[int, LayerCost], first: int, stop: int, given: int,
               copies: bool = True) -> int:
    """The bytes a stage of layers ``first..stop-1`` holds for each
    micro-batch from its forward to its backward, its input of ``given``
    bytes included: each layer's ``saved_bytes``, and each output that a
    layer keeps, its own or the next one's input, counted once. A torch
    stage (``copies``) copies its input and keeps its output (its
    context); an engine.layers stage keeps what its layers keep, its
    input (the message) where the first layer keeps it."""
    held = given if copies or row[first].keeps & KEEPS_INPUT else 0
    for i in range(first, stop):
        lc = row[i]
        held += lc.saved_bytes or 0
        if (lc.keeps & KEEPS_OUTPUT or (i + 1 < stop and row[i + 1].keeps & KEEPS_INPUT)
                or (copies and i == stop - 1)):
            held += lc.act_bytes
    return held


def layer_by_layer(row: Mapping[int, LayerCost], first: int, stop: int, given: int,
                   split: bool = False, runs: int = 1) -> tuple[int, int]:
    """A torch stage of layers ``first..stop-1`` that recomputes layer by
    layer (``TorchStage(..., layered=True)``; Candidate's ``layered``):
    what it holds for each micro-batch from its forward to its backward
    (its input as it came, each later layer's input), and what its
    backward makes again on top: one layer's activations and output at a
    time (the first's with a copy of the input, its leaf), or, a split
    backward (``split``: I then W), every layer's, from I to W.
    ``runs=N`` (``layered=N``): in runs of N layers from ``first``, each
    run keeping its input only and its backward making the run's
    activations and outputs at once."""
    starts = range(first, stop, max(1, runs))
    hold = given + sum(row[b - 1].act_bytes for b in starts if b > first)
    each = [sum((row[i].saved_bytes or 0) + row[i].act_bytes
                for i in range(b, min(b + max(1, runs), stop))) + (given if b == first else 0)
            for b in starts]
    return hold, (sum(each) if split else max(each))


def recomputed(lc: LayerCost) -> LayerCost:
    """A layer's (or a stage's) costs when it recomputes: its forward runs
    again in its backward (B, or I when split; the first forward, without
    a graph, costed as one with)."""
    return replace(lc, B=lc.B + lc.F, I=lc.I + lc.F)


def as_run(row: dict[int, LayerCost], whole: Mapping[Span, LayerCost] | None,
           recompute: bool | frozenset[int], counts: Sequence[int] = ()
           ) -> tuple[dict[int, LayerCost], Mapping[Span, LayerCost] | None]:
    """A profile's row (and its stages timed whole), as the stages run:
    ``recomputed`` where they recompute (every stage, or the stages of a
    set, cut by ``counts``)."""
    if not recompute:
        return row, whole
    if recompute is True:
        return ({i: recomputed(lc) for i, lc in row.items()},
                None if whole is None else {k: recomputed(lc) for k, lc in whole.items()})
    bounds = [sum(counts[:s]) for s in range(len(counts) + 1)]
    spans = {(bounds[s], bounds[s + 1]) for s in recompute}
    layers = {i for a, b in spans for i in range(a, b)}
    return ({i: recomputed(lc) if i in layers else lc for i, lc in row.items()},
            None if whole is None else {k: recomputed(lc) if k in spans else lc
                                        for k, lc in whole.items()})


def cut(weights: Sequence[float], n: int) -> tuple[int, ...]:
    """Layer counts of ``n`` contiguous, non-empty stages that minimize the
    heaviest stage's total weight (exact, by dynamic programming)."""
    L = len(weights)
    if not 1 <= n <= L:
        raise ValueError(f"{L} layers cannot fill {n} stages")
    pre = [0.0]
    for w in weights:
        pre.append(pre[-1] + float(w))
    inf = math.inf
    # best[k][j]: the lightest heaviest stage cutting the first j layers into k stages
    best = [[inf] * (L + 1) for _ in range(n + 1)]
    arg = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for k in range(1, n + 1):
        for j in range(k, L - (n - k) + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1][i], pre[j] - pre[i])
                if v < best[k][j] - 1e-15:
                    best[k][j], arg[k][j] = v, i
    counts, j = [], L
    for k in range(n, 0, -1):
        i = arg[k][j]
        counts.append(j - i)
        j = i
    return tuple(reversed(counts))


def whole_counts(balance: Any) -> list[int]:
    """``balance`` as given as layer counts (a list or tuple of whole
    numbers, one per stage), else TypeError naming what was passed and what
    is taken."""
    taken = ("'uniform', 'parameters', 'time' or a list of whole layer counts, "
             "one per stage")
    if hasattr(balance, "tolist") and not isinstance(balance, (str, bytes)):
        balance = balance.tolist()          # a numpy array of counts
    if isinstance(balance, (str, bytes)) or not isinstance(balance, (list, tuple)):
        raise TypeError(f"balance={balance!r} ({type(balance).__name__}): balance takes "
                        f"{taken}")
    wrong = [c for c in balance if isinstance(c, bool) or not isinstance(c, numbers.Integral)]
    if wrong:
        raise TypeError(f"balance={list(balance)!r}: {', '.join(map(repr, wrong))} "
                        f"{'is not a whole number' if len(wrong) == 1 else 'are not whole numbers'}"
                        f" of layers; balance takes {taken}")
    return [int(c) for c in balance]


@dataclass(frozen=True)
class ByType:
    """``balance="type:REGEX"`` read against a model's layers (DeepSpeed's
    ``partition_method="type:..."``): ``weights`` is 1 for each layer whose
    class matches, else 0, so the cut spreads the matching layers (the
    transformer blocks) evenly whatever their neighbours weigh."""
    balance: str
    weights: tuple[int, ...]

    def counts(self, n: int) -> tuple[int, ...]:
        # (a millionth a layer: among the cuts with the fewest blocks in the fullest
        # stage, the one with the fewest layers in it, the embedding and head aside)
        return cut([w + 1e-6 for w in self.weights], n)


def by_type(balance: str, classes: Sequence[Sequence[str]]) -> ByType:
    """``balance="type:REGEX"`` (``re.search``, case ignored, as DeepSpeed's)
    against each layer's class names (``classes``, one list a layer:
    engine.stagebuild.layer_classes); ValueError where the pattern is no
    regex or names no layer (the cut would be arbitrary)."""
    pattern = balance[len("type:"):]
    try:
        rx = re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"balance={balance!r}: {pattern!r} is not a regular expression "
                         f"({e})") from None
    weights = tuple(int(any(rx.search(c) for c in names)) for names in classes)
    if not any(weights):
        seen = sorted({c for names in classes for c in names})
        raise ValueError(f"balance={balance!r} matches no layer's class (the layers' "
                         f"classes: {', '.join(seen)})")
    return ByType(balance, weights)


def counts_for(balance: Any, n: int, times: Sequence[float] | None,
               params: Sequence[int]) -> tuple[int, ...]:
    """Layers per stage for ``balance``: "uniform" (layer count),
    "parameters", "time" (``times``, one per layer), a ``ByType`` or
    explicit counts."""
    L = len(params)
    if n > L:
        raise ValueError(f"the model has {L} layers: it cannot fill {n} pipeline stages")
    if isinstance(balance, ByType):
        return balance.counts(n)
    if not isinstance(balance, str):
        counts = tuple(whole_counts(balance))
        if len(counts) != n or sum(counts) != L or min(counts) < 1:
            raise ValueError(f"balance={list(counts)} must give {n} positive layer counts "
                             f"adding up to the model's {L} layers")
        return counts
    if balance == "uniform":
        return tuple((s + 1) * L // n - s * L // n for s in range(n))
    if balance == "parameters":
        return cut([float(p) for p in params], n)
    if balance == "time":
        if times is None:
            raise ValueError('balance="time" needs measured layer times: pass sample=')
        return cut(times, n)
    raise ValueError(f"unknown balance {balance!r}: use 'time', 'uniform', 'parameters' "
                     "or a list of layer counts")


def stage_costs(row: dict[int, LayerCost], counts: Sequence[int], scale: float = 1.0,
                overhead: float = 0.0, send: float = 0.0,
                whole: Mapping[Span, LayerCost] | None = None,
                helper: Sequence[float] | None = None, recv: float = 0.0,
                fixed: bool = False) -> dict[str, list[float]]:
    """The simulator's per-stage costs (``{"F": [stage 0, stage 1...], ...}``)
    of stages holding ``counts`` consecutive layers: a stage's time measured
    whole when ``whole`` has its span, else the sum of its layers'; each
    compute action also pays ``overhead`` (the executor's own cost per
    action), each message takes ``send`` seconds to arrive and each receive
    at least ``recv`` (engine.calibrate.message_times). ``helper``
    (per stage) is added to its F, B and I: the mesh threads' CPU for the
    messages those actions send and receive (``helper_charge``). With
    ``fixed`` (ranks sharing cores), ``overhead`` is the unshared
    ``"fixed"`` cost instead of a part of each action's."""
    costs: dict[str, list[float]] = {k: [] for k in ("F", "B", "I", "W")}
    start = 0
    for s, c in enumerate(counts):
        measured = (whole or {}).get((start, start + c))
        layers = [measured] if measured is not None else [row[i] for i in range(start, start + c)]
        start += c
        for kind in costs:
            extra = helper[s] if helper is not None and kind != "W" else 0.0
            costs[kind].append(sum(getattr(lc, kind) for lc in layers) * scale
                               + (0.0 if fixed else overhead) + extra)
    costs["send"] = [send] * len(counts)
    costs["recv"] = [recv] * len(counts)
    if fixed:
        costs["fixed"] = [overhead] * len(counts)
    return costs


def helper_charge(sched: Schedule, helper: float) -> list[float]:
    """Per stage of ``sched``, the mesh threads' CPU (``helper`` seconds per
    message end, engine.calibrate) that each of its F, B and I actions pays
    on a host with no spare core: per micro-batch a stage receives and sends
    one message to each neighbour stage on another rank, the forward message
    beside its F (received before, sent after), the gradient beside its B
    or I, so each of those pays ``helper`` per such neighbour."""
    n = sched.num_stages
    return [helper * sum(1 for t in (s - 1, s + 1)
                         if 0 <= t < n and sched.rank_of(t) != sched.rank_of(s))
            for s in range(n)]


def _starts(counts: Sequence[int]) -> list[int]:
    """Each stage's first layer, out of the layer counts per stage."""
    return [sum(counts[:s]) for s in range(len(counts))]


def peak_bytes(sched: Schedule, act: Sequence[int],
               kept: Sequence[int | None] | None = None,
               shared: Sequence[int] = (), flowing: Sequence[int] = ()) -> tuple[int, ...]:
    """Per rank, the most activation bytes held at once: a stage's ``act[s]``
    from its F to its B (or W, when the backward is split). With ``kept``
    (recompute: a stage keeps only its input, ``kept[s]``, from its F to
    its backward, which makes ``act[s]`` again): ``kept[s]`` from F to B
    (or W), and ``act[s]`` during B, or from I to W (the graph the W reads),
    but for ``shared[s]`` of it, the input kept that ``act[s]`` counts too
    (an engine.layers stage's first layer keeps the very array; a torch
    stage copies it: 0); a stage whose ``kept[s]`` is None keeps its
    activations. ``flowing[s]``: the gradients a backward of stage ``s``
    (B, or I) holds on top while it runs (``candidates``: the gradient of
    a layer's output and of its input, of its widest layer)."""
    each = list(kept) if kept is not None else [None] * len(act)
    again = [k is not None for k in each]
    held = [a if k is None else k for a, k in zip(act, each)]
    act = [a - (shared[s] if s < len(shared) else 0) for s, a in enumerate(act)]
    grads = [flowing[s] if s < len(flowing) else 0 for s in range(len(act))]
    peaks = []
    for row in sched.ranks:
        live = peak = 0
        for a in row:
            s = a.stage
            if a.kind == F:
                live += held[s]
                peak = max(peak, live)
            elif a.kind == B:
                peak = max(peak, live + (act[s] if again[s] else 0) + grads[s])
                live -= held[s]
            elif a.kind == I:
                live += act[s] if again[s] else 0
                peak = max(peak, live + grads[s])
            elif a.kind == W:
                live -= held[s] + (act[s] if again[s] else 0)
        peaks.append(peak)
    return tuple(peaks)
