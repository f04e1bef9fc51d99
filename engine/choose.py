"""Choose a schedule by simulating it: measured layer costs in, candidates out.

``time_layer`` and ``measure`` time each layer's forward, backward and split backward (I, W)
on micro-batches of the sizes a step may use; ``cut`` splits per-layer
weights into contiguous stages so that the heaviest stage is as light as it
can be; ``candidates`` cuts the layers for every built-in schedule and
micro-batch count, simulates each with its per-stage costs (``{"F": [...]}``),
and returns them best first: feasible under the memory limit, then by
predicted step time. A stage of several layers costs more than its layers
timed one by one (each timed alone keeps its weights in the core's cache; a
stage runs through all of its layers' weights, as the step does: mostly
1.05-1.35x the sum on the 2-core machine, BENCHMARKS.md), so ``stage_spans`` lists the
candidates' stages and ``measure_stages`` times each whole, and
``candidates`` takes those times where it has them. ``time_program`` times
a rank's stages as a step runs them (its actions in the schedule's order),
for the chosen schedule's re-time. ``table`` prints them::

    schedule                 m  layers/stage   pred ms  bubble   peak MB
    zero_bubble_h1(2,8)      8  3 3              41.2    7.9%      1.5  <- chosen
    1f1b(2,8)                8  3 3              44.0   13.6%      1.0
"""
from __future__ import annotations

import contextlib
import math
import numbers
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from mesh.tensors import is_tensor

from .ir import B, F, I, W, Action, Schedule
from .schedules import by_name

__all__ = ["LayerCost", "KEEPS_INPUT", "KEEPS_OUTPUT", "stage_held", "layer_by_layer",
           "held_by", "Candidate", "kept_random", "calibrated",
           "time_layer", "kept_buffers", "time_program", "measure", "measure_stages",
           "stage_spans", "cut", "counts_for", "stage_costs", "helper_charge", "peak_bytes",
           "microbatch_counts", "builtin", "candidates", "retimed", "recosted", "best_first",
           "table", "SCHEDULES", "Span"]

_SPAN, _MAX_RUNS = 0.05, 25     # time_layer's sampling of one layer: see there

Span = tuple[int, int]          # a stage's layers: first, stop (first..stop-1)

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zb-v")


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
                   split: bool = False) -> tuple[int, int]:
    """A torch stage of layers ``first..stop-1`` that recomputes layer by
    layer (``TorchStage(..., layered=True)``; Candidate's ``layered``):
    what it holds for each micro-batch from its forward to its backward
    (its input as it came, each later layer's input), and what its
    backward makes again on top: one layer's activations and output at a
    time (the first's with a copy of the input, its leaf), or, a split
    backward (``split``: I then W), every layer's, from I to W."""
    hold = given + sum(row[i].act_bytes for i in range(first, stop - 1))
    each = [(row[i].saved_bytes or 0) + row[i].act_bytes + (given if i == first else 0)
            for i in range(first, stop)]
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


def _nbytes(y: Any) -> int:
    if isinstance(y, tuple):        # a boundary carrying several tensors
        return sum(_nbytes(v) for v in y)
    if hasattr(y, "nbytes"):
        return int(y.nbytes)
    if hasattr(y, "element_size"):
        return int(y.element_size() * y.numel())
    return 0


def _each(fn: Callable[[Any], Any], v: Any) -> Any:
    """``fn(v)``, or a tuple of it on each part of a tuple (None kept)."""
    if isinstance(v, tuple):
        out = tuple(None if p is None else fn(p) for p in v)
        fixed = getattr(v, "fixed", None)      # (engine.torch_stage.Parts: kept)
        return out if fixed is None else type(v)(out, fixed)  # type: ignore[call-arg]
    return fn(v)


def _fresh(v: Any) -> Any:
    """A copy of array or tensor ``v`` of its own dtype (``v * 1`` made a
    bool mask int64, which ``masked_fill`` and torch's attention refuse)."""
    return v.clone() if is_tensor(v) else v.copy()


def _ones(y: Any) -> Any:
    """A gradient of ones for output ``y`` (a tuple: one per part)."""
    return _each(lambda v: v * 0 + 1, y)


def _another(n: int, reps: int, runs: int | None, begin: float,
             clock: Callable[[], float]) -> bool:
    """Whether to run once more after ``n`` runs (the first a warm-up, from
    ``begin``): exactly ``runs`` after it when given, else at least ``reps``
    and 50 ms of them, at most 25."""
    if runs is not None:
        return n <= runs
    return n <= max(1, reps) or (clock() - begin < _SPAN and n < _MAX_RUNS)


@contextlib.contextmanager
def kept_random() -> Iterator[None]:
    """Put the global random streams back as they were when the block
    began: torch's (the CPU's, and each CUDA device's where CUDA is up),
    numpy's and Python's. Timing runs a layer's forward a number of times
    that depends on the clock, each dropout drawing from torch's stream,
    so without this a seeded run would not repeat itself after
    ``engine.distribute`` or ``engine.partition`` measured it."""
    torch: Any = sys.modules.get("torch")
    py, npy = random.getstate(), np.random.get_state()
    cpu = gpus = None
    if torch is not None:
        cpu = torch.get_rng_state()
        gpus = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        if cpu is not None:
            torch.set_rng_state(cpu)
        if gpus is not None:
            torch.cuda.set_rng_state_all(gpus)


@contextlib.contextmanager
def kept_buffers(*modules: Any) -> Iterator[None]:
    """Put the buffers of the torch ``modules`` (None and others skipped)
    back as they were when the block began: timing runs forwards in
    training mode, each updating a BatchNorm's running statistics and its
    count, so without this a model came out of ``engine.distribute`` with
    them moved before its first step."""
    torch: Any = sys.modules.get("torch")
    saved: list[tuple[Any, Any]] = []
    if torch is not None:
        for m in modules:
            if isinstance(m, torch.nn.Module):
                saved += [(b, b.clone()) for b in m.buffers() if not b.is_meta]
    try:
        yield
    finally:
        if saved:
            with torch.no_grad():
                for b, old in saved:
                    b.copy_(old)


def time_layer(layer: Any, x: Any, reps: int = 3,
               clock: Callable[[], float] = time.perf_counter,
               runs: int | None = None) -> tuple[LayerCost, Any]:
    """The costs of one layer (a stage object: forward, backward,
    backward_input, backward_weight) on ``x``, and its output. Each time is
    the median of at least ``reps`` runs after one more to warm up, as the
    executor runs the layer: the same calls on a micro-batch of the same
    size. Short layers run more times, for 50 ms of runs or 25 runs: on a
    loaded machine a run of a millisecond is a quiet slice or a preempted
    one (3-5x longer), so the fastest of three is too low and the median of
    three a coin toss; the mean of many follows the bursts of others' load
    at profiling time, which the step, seconds later, does not meet. What its gradients held before
    is put back. ``clock``: ``time.thread_time`` counts this thread's CPU
    only (what a comparison on a loaded machine wants), not the wall.
    ``runs``: exactly that many after the warm-up (a tensor-parallel layer,
    whose collectives its peers must make as often). Its buffers (a
    BatchNorm's statistics) are put back too."""
    with kept_buffers(getattr(layer, "module", None)):
        return _time_layer(layer, x, reps, clock, runs)


def _time_layer(layer: Any, x: Any, reps: int, clock: Callable[[], float],
                runs: int | None) -> tuple[LayerCost, Any]:
    saved = ([(g, g.clone() if is_tensor(g) else g.copy()) for g in layer.grads()]
             if hasattr(layer, "grads") else [])      # (a bfloat16 stage's: tensors)
    times: dict[str, list[float]] = {k: [] for k in ("F", "B", "I", "W")}
    y = x
    begin, n = clock(), 0
    try:        # (put back also where the layer fails: distribute skips that size and goes on)
        while _another(n, reps, runs, begin, clock):
            n += 1
            t0 = clock()
            y, ctx = layer.forward(x)
            t1 = clock()
            gy = _ones(y)
            t2 = clock()
            layer.backward(ctx, gy)
            t3 = clock()
            _, ctx = layer.forward(x)
            t4 = clock()
            _, wctx = layer.backward_input(ctx, gy)
            t5 = clock()
            layer.backward_weight(wctx)
            t6 = clock()
            for k, v in zip(times, (t1 - t0, t3 - t2, t5 - t4, t6 - t5)):
                times[k].append(v)
    finally:
        for g, old in saved:
            g[...] = old
    f, b, gi, gw = (statistics.median(v[1:]) for v in times.values())
    held = held_by(layer, x)
    return LayerCost(f, b, gi, gw, _nbytes(y), *(held or (None, KEEPS_OUTPUT))), y


def held_by(layer: Any, x: Any) -> tuple[int, int] | None:
    """What a stage object holds from its forward on ``x`` to its backward
    (``LayerCost.saved_bytes`` and ``keeps``): the bytes beyond its input,
    its output and its parameters, and whether it holds its input and its
    output. A torch stage (engine.TorchStage): the distinct storages
    autograd saves for the backward (one more forward, under
    ``torch.autograd.graph.saved_tensors_hooks``); a transformer block of
    width C over T positions holds about 16 times its output (the
    attention's scores, the MLP's 4C hidden, the norms' inputs), where its
    output's bytes stood in until the twenty-second session. A numpy stage
    (engine.layers): the distinct arrays of the context its forward
    returns (a Linear keeps its input, a Tanh its output: what a tanh MLP
    holds is half the outputs that the twenty-second session counted).
    None for a stage that is neither (its output's bytes stand in)."""
    module = getattr(layer, "module", None)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(module, torch.nn.Module):
        return _saved_by_autograd(torch, layer, module, x)
    if not isinstance(x, np.ndarray):
        return None
    y, ctx = layer.forward(x)
    if not isinstance(y, np.ndarray):
        return None
    own = [p for p in getattr(layer, "params", list)() if isinstance(p, np.ndarray)]
    seen: dict[tuple[int, int], int] = {}
    keeps = 0
    todo = [ctx]
    while todo:
        v = todo.pop()
        if isinstance(v, (tuple, list)):
            todo.extend(v)
        elif isinstance(v, dict):
            todo.extend(v.values())
        elif not isinstance(v, np.ndarray) or any(np.may_share_memory(v, o) for o in own):
            continue
        elif np.may_share_memory(v, x):
            keeps |= KEEPS_INPUT
        elif np.may_share_memory(v, y):
            keeps |= KEEPS_OUTPUT
        else:
            seen[(v.__array_interface__["data"][0], v.nbytes)] = v.nbytes
    return sum(seen.values()), keeps


def _saved_by_autograd(torch: Any, layer: Any, module: Any, x: Any) -> tuple[int, int]:
    """``held_by`` of a torch stage."""
    def ptr(t: Any) -> int:
        return int(t.untyped_storage().data_ptr())

    def ptrs(v: Any) -> set[int]:
        return {ptr(t) for t in (v if isinstance(v, tuple) else (v,))
                if isinstance(t, torch.Tensor)}

    seen: dict[int, int] = {}

    def pack(t: Any) -> Any:
        seen[ptr(t)] = int(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, ctx = layer.forward(x)
    leaf = ctx[0] if isinstance(ctx, tuple) and ctx else ()
    ins, outs = ptrs(leaf), ptrs(y)
    own = {ptr(t) for t in (*module.parameters(), *module.buffers())} | ins | outs
    keeps = ((KEEPS_INPUT if ins & seen.keys() else 0)
             | (KEEPS_OUTPUT if outs & seen.keys() else 0))
    beyond = sum(n for p, n in seen.items() if p not in own)
    del ctx, y
    return beyond, keeps


def time_program(stages: Mapping[int, Any], inputs: Mapping[int, Any],
                 program: Sequence[Action], reps: int = 3,
                 clock: Callable[[], float] = time.perf_counter,
                 loss: tuple[int, Callable[[Any], Any]] | None = None,
                 each: list[dict[int, LayerCost]] | None = None,
                 runs: int | None = None,
                 calls: tuple[list[int], dict[tuple[int, str], list[int]]] | None = None
                 ) -> dict[int, LayerCost]:
    """Each stage's F, B, I and W as a step runs them: this rank's compute
    actions of ``program`` (a lowered rank program; its messages skipped)
    in their order, each micro-batch's F on a fresh copy of its stage's
    input (``inputs[s]``: a micro-batch, as the step receives it), its
    context kept until its B or I, its weight context until its W, as the
    executor keeps them; so a split backward's W runs as late as it will
    (the activations it reads evicted by the actions between), every
    micro-batch in flight writes its own buffers, and a rank holding two
    stages alternates between them. Runs: one to warm up, then at least
    ``reps`` and 50 ms of them (at most 25; exactly ``runs`` when given:
    tensor-parallel stages, whose collectives their peers must make as
    often); per run, the mean of each stage's actions of a kind;
    returned, the median over the runs (kinds the program does not run:
    0). ``loss``: ``(stage, fn)``, the last
    stage and ``fn(output) -> its gradient`` (the loss and the executor's
    scaling), timed in that stage's F as the executor runs it. ``each``,
    when given, gets every run's own figures (a dict like the one returned)
    appended, in the order run. ``calls``: ``(log, out)``, a list that
    grows as the stages make collectives (engine.tp_plan's
    ``logging_calls``): ``out[(stage, kind)]`` gets the entries an action
    of that kind added, in the warm-up run. The stages' gradients are
    changed: pass copies. Their buffers (a BatchNorm's statistics) are
    put back."""
    with kept_buffers(*[getattr(st, "module", None) for st in stages.values()]):
        return _time_program(stages, inputs, program, reps, clock, loss, each, runs, calls)


def _time_program(stages: Mapping[int, Any], inputs: Mapping[int, Any],
                  program: Sequence[Action], reps: int, clock: Callable[[], float],
                  loss: tuple[int, Callable[[Any], Any]] | None,
                  each: list[dict[int, LayerCost]] | None, runs: int | None,
                  calls: tuple[list[int], dict[tuple[int, str], list[int]]] | None
                  ) -> dict[int, LayerCost]:
    acts = [a for a in program if a.kind in (F, B, I, W)]
    timed: dict[tuple[int, str], list[float]] = {}
    nbytes: dict[int, int] = {}
    begin, n = clock(), 0
    while _another(n, reps, runs, begin, clock):
        n += 1
        ctxs: dict[tuple[int, Any], Any] = {}
        gys: dict[tuple[int, Any], Any] = {}
        took: dict[tuple[int, str], list[float]] = {}
        for a in acts:
            st, key = stages[a.stage], (a.stage, a.mb)
            c0 = len(calls[0]) if calls is not None else 0
            if a.kind == F:
                x = _each(_fresh, inputs[a.stage])   # as a message is: a copy, its dtype
                fn = loss[1] if loss is not None and a.stage == loss[0] else None
                t0 = clock()
                y, ctxs[key] = st.forward(x)
                gy = fn(y) if fn is not None else None       # the loss, in the F's time
                t1 = clock()
                gys[key] = _ones(y) if gy is None else gy
                nbytes[a.stage] = _nbytes(y)
            elif a.kind == W:
                t0 = clock()
                st.backward_weight(ctxs.pop(key))
                t1 = clock()
            else:
                ctx, gy = ctxs.pop(key), gys.pop(key)
                t0 = clock()
                if a.kind == B:
                    st.backward(ctx, gy)
                else:
                    _, ctxs[key] = st.backward_input(ctx, gy)
                t1 = clock()
            took.setdefault((a.stage, a.kind), []).append(t1 - t0)
            if calls is not None and n == 1:
                calls[1][(a.stage, a.kind)] = calls[0][c0:]
        if n > 1:
            for k, v in took.items():
                timed.setdefault(k, []).append(sum(v) / len(v))
            if each is not None:
                each.append(_by_stage({k: sum(v) / len(v) for k, v in took.items()}, nbytes))
    return _by_stage({k: statistics.median(v) for k, v in timed.items()}, nbytes)


def _by_stage(times: Mapping[tuple[int, str], float], nbytes: Mapping[int, int]
              ) -> dict[int, LayerCost]:
    """``{(stage, kind): seconds}`` as a LayerCost per stage (kinds absent: 0)."""
    return {s: LayerCost(times.get((s, "F"), 0.0), times.get((s, "B"), 0.0),
                         times.get((s, "I"), 0.0), times.get((s, "W"), 0.0), nbytes.get(s, 0))
            for s in sorted({s for s, _ in times})}


def measure(layers: Sequence[Any], batch: Any, sizes: Sequence[int], reps: int = 3,
            mine: Sequence[int] | None = None, runs: int | None = None,
            clock: Callable[[], float] = time.perf_counter
            ) -> dict[int, dict[int, LayerCost]]:
    """``{size: {layer index: LayerCost}}``: ``time_layer`` of each layer
    (a stage object) on the first ``size`` rows of ``batch``, passed through
    the layers before it. Only the layers in ``mine`` are timed (all by
    default), so ranks can share the work; ``runs`` and ``clock``: as
    time_layer's."""
    timed = set(range(len(layers)) if mine is None else mine)
    out: dict[int, dict[int, LayerCost]] = {}
    for size in sizes:
        x = batch[:size]
        row: dict[int, LayerCost] = {}
        for i, layer in enumerate(layers):
            if i not in timed:
                x = layer.forward(x)[0]
                continue
            row[i], x = time_layer(layer, x, reps, clock, runs)
        out[size] = row
    return out


def measure_stages(layers: Sequence[Any], join: Callable[[int, int], Any], batch: Any,
                   spans: Mapping[int, Sequence[Span]], reps: int = 3,
                   mine: Sequence[int] | None = None, runs: int | None = None,
                   clock: Callable[[], float] = time.perf_counter
                   ) -> dict[int, dict[Span, LayerCost]]:
    """``{size: {(first, stop): LayerCost}}``: ``time_layer`` of the stage
    ``join(first, stop)`` (one stage object of layers first..stop-1, as the
    pipeline runs it) on the first ``size`` rows of ``batch`` passed through
    ``layers`` (the layers' stage objects, as ``measure`` takes them) up to
    ``first``, for every span of ``spans[size]``. Only the spans whose
    positions in ``sorted((size, first, stop))`` are in ``mine`` (all by
    default) are timed, so ranks can share the work; ``runs`` and
    ``clock``: as time_layer's."""
    todo = sorted((size, first, stop) for size, ss in spans.items() for first, stop in ss)
    timed = set(range(len(todo)) if mine is None else mine)
    out: dict[int, dict[Span, LayerCost]] = {size: {} for size in spans}
    inputs: dict[int, list[Any]] = {}
    for j, (size, first, stop) in enumerate(todo):
        if j not in timed:
            continue
        xs = inputs.setdefault(size, [batch[:size]])
        while len(xs) <= first:
            xs.append(layers[len(xs) - 1].forward(xs[-1])[0])
        out[size][(first, stop)] = time_layer(join(first, stop), xs[first], reps, clock,
                                              runs)[0]
    return out


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


def counts_for(balance: Any, n: int, times: Sequence[float] | None,
               params: Sequence[int]) -> tuple[int, ...]:
    """Layers per stage for ``balance``: "uniform" (layer count),
    "parameters", "time" (``times``, one per layer) or explicit counts."""
    L = len(params)
    if n > L:
        raise ValueError(f"the model has {L} layers: it cannot fill {n} pipeline stages")
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


def microbatch_counts(p: int, rows: int) -> list[int]:
    """The micro-batch counts tried: p, 2p, 4p... (1, 2, 4... when p is 1),
    as long as each micro-batch keeps at least one row."""
    ms: list[int] = []
    m = p
    while m <= rows and len(ms) < 5:
        ms.append(m)
        m *= 2
    return ms


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
    # and makes one layer's activations again at a time), not whole
    layered: bool = False
    # per stage, the mesh threads' CPU (helper_charge) its F, B and I costs hold
    charge: tuple[float, ...] = ()
    # the executor's own seconds per compute action its costs hold (in each F, B, I
    # and W, or its "fixed" cost where the ranks share cores): engine.calibrate's
    overhead: float = 0.0
    # simulated again with what the re-time learned (``calibrated``): the factor its
    # compute took, and the one the whole row took after to meet the re-time's prediction
    retimed: tuple[float, float] | None = None


def builtin(names: Sequence[str], p: int, ms: Sequence[int], chunks: int = 2
            ) -> list[Schedule]:
    """Each named schedule for ``p`` ranks at each micro-batch count in ``ms``
    (those this build lacks, or that do not take that p and m, left out)."""
    out = []
    for m in ms:
        for name in names:
            try:
                out.append(by_name(name, p, m, chunks))
            except ValueError:
                continue
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
               layers: bool = False) -> list[Candidate]:
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
    (``layer_by_layer``: torch stages), and taken so where that lowers its
    peak (the same time: each layer's forward once more;
    ``Candidate.layered``): blocks that hold many times their input gain,
    (Linear, GELU) pairs, which keep their inputs anyway, do not."""
    L = len(params)
    out = []
    for sched in scheds:
        if sched.num_stages > L:
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
            layered = False
            if again and layers and held is not None:
                split = any(a.kind == I for r in sched.ranks for a in r)
                # (each stage's input as given; what it keeps besides, the loss's
                # gradient, as in ``hold``)
                by = [layer_by_layer(row, b, b + c, k, split) if h is not None else (0, a)
                      for b, c, k, h, a in zip(_starts(counts), counts, kept, held, act)]
                twin = peak_bytes(sched, [x for _, x in by],
                                  [h if h is None else k + h - g
                                   for (k, _), h, g in zip(by, held, kept)],
                                  flowing=grads)
                if max(twin) < max(peaks):
                    peaks, layered = twin, True
            peak = max(peaks)
            fits = memory_limit is None or peak <= memory_limit
            out.append(Candidate(sched, counts, rep.makespan, rep.bubble, peak, fits, costs,
                                 summed, cores=cores, recompute=again, layered=layered,
                                 charge=tuple(charge or ()), overhead=ov))
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


def loaded(cand: Candidate, load: float) -> Candidate:
    """``cand`` simulated again with others' processes wanting the cores
    its ranks share (``load``, pp ranks' worth: engine.simulate's; what
    ``Job.retime`` fits to a dry run, engine.distribute's ``fitted_load``).
    Where the ranks outnumber the cores a quiet host lends an idle rank's
    core to the others, so a bubble costs little; a loaded one gives it to
    the other processes, so the load slows a schedule whose ranks take
    turns more than one whose ranks compute at once, and the ranking can
    change. Its costs as they are, less the mesh threads' CPU charged to
    its F, B and I (``charge``): the load is fitted to a dry run whose
    mesh threads ran on those cores beside the stages, so it holds that
    CPU already, as ``Job.retime``'s prediction (which charges none) does;
    charged again, the chosen row at eight ranks on two cores was up to
    1.5x the re-time's prediction (1.24x in the median), 2.3-4.2 ms charged
    to actions of 4-9 ms (BENCHMARKS.md, thirty-ninth session). A candidate with a core a rank
    (``cores`` None), where no load is fitted, is as it was."""
    if cand.cores is None or (load == cand.load and not any(cand.charge)):
        return cand
    costs = cand.costs
    if any(cand.charge):
        costs = {k: [c - cand.charge[s] for s, c in enumerate(v)] if k in ("F", "B", "I")
                 else v for k, v in cand.costs.items()}
    rep = cand.schedule.simulate(costs, cand.cores, load)
    return replace(cand, makespan=rep.makespan, bubble=rep.bubble, load=load, costs=costs,
                   charge=())


def under_load(cands: Sequence[Candidate], chosen: Candidate | None, load: float
               ) -> tuple[list[Candidate], Candidate | None]:
    """``cands`` each ``loaded`` with ``load``, best first, and ``chosen``
    (one of them, or None) as loaded: the table's rows and its mark. As
    in engine.distribute's choice, where some rows were costed by their
    own dry run (``measured``) and the best is not, those lead: the
    others' figures are a lower bound. Nothing changes where ``chosen``
    was simulated with ``load`` already."""
    if chosen is None or loaded(chosen, load) is chosen:
        return list(cands), chosen
    again = [loaded(c, load) for c in cands]
    mark = next((a for c, a in zip(cands, again) if c is chosen), None)
    ranked = best_first(again)
    if ranked[0].measured or not any(c.measured for c in ranked):
        return ranked, mark
    return [c for c in ranked if c.measured] + [c for c in ranked if not c.measured], mark


def _compute(cand: Candidate, kind: str, stage: int) -> float:
    """The compute seconds ``cand``'s costs hold for a ``kind`` action of
    ``stage``: its cost less the executor's own time per action
    (``overhead``, unless the ranks share cores: then it is the
    ``"fixed"`` cost) and the mesh threads' CPU (``charge``, but for W)."""
    fixed = "fixed" in cand.costs
    return (cand.costs[kind][stage] - (0.0 if fixed else cand.overhead)
            - (cand.charge[stage] if cand.charge and kind != "W" else 0.0))


def calibrated(cands: Sequence[Candidate], row: Candidate | None, again: Candidate | None,
               helper: float = 0.0) -> tuple[list[Candidate], Candidate | None]:
    """The table's rows as the re-time (``again``: engine.distribute's
    ``job.chosen``, the chosen schedule re-timed as its steps will run)
    corrects the chosen one's (``row``, one of ``cands``, simulated from
    the profile), every row simulated again with what the re-time learned
    (BENCHMARKS.md, forty-third session): each compute action's cost times
    the chosen schedule's busiest rank's re-timed compute over its
    profiled (``busiest_compute``: the stages timed again in the
    schedule's order, stretched by the share of a core the steps get); the
    executor's own time per action, each message's and each receive's
    from the re-time's dry run of the chosen schedule (``overhead``,
    ``send``, ``recv``), the mesh threads' CPU per message end ``helper``
    (``helper_charge``; none where the re-time's stretch holds it); the
    re-time's cores and load; then every row times the re-time's
    prediction over the chosen row so simulated (what the terms leave out:
    its median over runs, a schedule's own overheads), so the chosen row
    is ``job.predicted``. Ranked again as ``under_load`` ranks (rows
    costed by their own dry run first where the best is not).
    ``(list(cands), row)`` where nothing was re-timed."""
    if row is None or again is None or row is again or not any(c is row for c in cands):
        return list(cands), row
    base = busiest_compute(row)
    factor = busiest_compute(again) / base if base > 0 else 1.0
    fixed = again.cores is not None
    send = max(again.costs.get("send") or [0.0])
    recv = max(again.costs.get("recv") or [0.0])

    def simulated(c: Candidate) -> Candidate:
        charge = helper_charge(c.schedule, helper) if helper else [0.0] * len(c.counts)
        costs: dict[str, list[float]] = {
            kind: [_compute(c, kind, s) * factor + (0.0 if fixed else again.overhead)
                   + (charge[s] if kind != "W" else 0.0) for s in range(len(c.costs[kind]))]
            for kind in ("F", "B", "I", "W")}
        n = len(costs["F"])
        costs.update(send=[send] * n, recv=[recv] * n)
        if fixed:
            costs["fixed"] = [again.overhead] * n
        rep = c.schedule.simulate(costs, again.cores, again.load)
        return replace(c, makespan=rep.makespan, bubble=rep.bubble, costs=costs,
                       cores=again.cores, load=again.load, charge=tuple(charge),
                       overhead=again.overhead)

    at = next(i for i, c in enumerate(cands) if c is row)
    rows = [simulated(c) for c in cands]
    rest = again.makespan / rows[at].makespan if rows[at].makespan > 0 else 1.0
    rows = [replace(r, makespan=r.makespan * rest, retimed=(factor, rest)) for r in rows]
    rows[at] = mark = replace(rows[at], makespan=again.makespan)   # (job.predicted, exactly)
    ranked = best_first(rows)
    if not ranked[0].measured and any(c.measured for c in ranked):
        ranked = [c for c in ranked if c.measured] + [c for c in ranked if not c.measured]
    return ranked, mark


def retimed(cand: Candidate, times: Mapping[int, LayerCost], overhead: float = 0.0,
            helper: float = 0.0, send: float | None = None,
            recv: float | None = None,
            runs: Sequence[Mapping[int, LayerCost]] = (),
            cores: float | None = None, load: float = 0.0) -> Candidate:
    """``cand`` simulated again with the stages of ``times`` (stage index:
    its F, B, I and W, timed whole again, e.g. right before the steps) in
    place of their profiled costs, plus ``overhead`` per action and the
    ``helper_charge``; ``send`` and ``recv``, when given, the time of every
    message and the least every receive takes (else the candidate's own);
    the other costs and ``summed`` are kept. With ``runs`` (the stages'
    times of each run of the re-time, every rank's runs paired in order:
    they ran at once), the makespan is the median over the runs of each
    run's simulated step, not the step of the median times: a step waits
    for the slower side at each message, so where the ranks hand work back
    and forth often (two micro-batches, zero-bubble schedules) the median
    step is longer than the step of median actions (quiet ZB-V(2,2): 4-5%,
    each step simulated from its own actions; 1F1B(2,8): none). With
    ``cores`` (fewer than the ranks: engine.simulate's), the ranks share
    that many cores, and ``overhead`` is each action's unshared
    ``"fixed"`` cost instead of a part of its own; ``load``, others'
    processes sharing them too (engine.simulate's)."""
    charge = helper_charge(cand.schedule, helper)
    costs = _with_times(cand.costs, times, overhead, charge, cores is not None)
    if send is not None:
        costs["send"] = [send] * len(costs["send"])
    if recv is not None:
        costs["recv"] = [recv] * len(costs["send"])
    rep = cand.schedule.simulate(costs, cores, load)
    makespan = rep.makespan
    if runs:
        makespan = statistics.median([
            cand.schedule.simulate(_with_times(costs, run, overhead, charge, cores is not None),
                                   cores, load).makespan
            for run in runs])
    return replace(cand, makespan=makespan, bubble=rep.bubble, costs=costs, cores=cores,
                   load=load, charge=tuple(charge), overhead=overhead)


def _with_times(costs: Mapping[str, list[float]], times: Mapping[int, LayerCost],
                overhead: float, charge: Sequence[float], fixed: bool = False
                ) -> dict[str, list[float]]:
    """``costs`` with the stages of ``times`` in place (their F, B, I, W plus
    ``overhead`` and, but for W, the stage's ``charge``; with ``fixed``,
    ``overhead`` goes to the ``"fixed"`` cost instead)."""
    out = {k: list(v) for k, v in costs.items()}
    if fixed:
        out["fixed"] = [overhead] * len(out["F"])
    for st, lc in times.items():
        for kind in ("F", "B", "I", "W"):
            out[kind][st] = (getattr(lc, kind) + (0.0 if fixed else overhead)
                             + (charge[st] if kind != "W" else 0.0))
    return out


def recosted(cand: Candidate, row: dict[int, LayerCost], scale: float = 1.0,
             whole: Mapping[Span, LayerCost] | None = None, overhead: float = 0.0,
             send: float = 0.0, helper: float = 0.0, recv: float = 0.0) -> Candidate:
    """``cand`` simulated again with the executor's costs measured on a dry
    run of its own schedule (``overhead`` per action, ``send`` per message,
    ``recv`` per receive, ``helper`` per message end: engine.calibrate) in
    place of those its micro-batch count's 1F1B dry run gave; its stages
    as ``candidates`` cost them (``row``, ``whole``, ``scale``); marked
    ``measured``."""
    charge = helper_charge(cand.schedule, helper) if helper else None
    run_row, run_whole = as_run(row, whole, cand.recompute, cand.counts)
    costs = stage_costs(run_row, cand.counts, scale, overhead, send, run_whole, charge, recv,
                        cand.cores is not None)
    rep = cand.schedule.simulate(costs, cand.cores, cand.load)
    return replace(cand, makespan=rep.makespan, bubble=rep.bubble, costs=costs, measured=True,
                   charge=tuple(charge or ()), overhead=overhead)


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


def recomputing(recompute: bool | frozenset[int], layered: bool = False) -> str:
    """How a candidate's stages hold their activations, in words."""
    how = " by layer" if layered else ""
    if isinstance(recompute, frozenset):
        return f"recomputed{how} in stage" + ("s " if len(recompute) > 1 else " ") + ",".join(
            map(str, sorted(recompute)))
    return f"recomputed{how}" if recompute else "kept"


def legend(cands: Sequence[Candidate], why: bool = True) -> str:
    """What ``table``'s columns are and, with ``why``, why its mark is where
    it is (a row under the chosen one may show less time: its figure is a
    lower bound); without, for a schedule given by name."""
    own = any(c.measured for c in cands)
    limit = "" if all(c.fits for c in cands) else " under the memory limit"
    columns = ("pred ms: the simulated step (every micro-batch, all ranks); bubble: the "
               "ranks' idle share of it; peak MB: the most activations one rank holds")
    if not why:
        return columns
    if any(c.retimed is not None for c in cands):     # (``calibrated``)
        return (columns + "\n"
                f"chosen: the fastest{limit}" + (
                    ", once costed by a dry run of its own schedule (its own dry run)"
                    if own else "") + ", before the rows were re-timed: each row now holds "
                "what the chosen schedule's re-time found, so another may show less time")
    return (columns + "\n"
            f"chosen: the fastest{limit}" + (
                ", once costed by a dry run of its own schedule (its own dry run); the "
                "other rows' figures are from a 1F1B dry run, a lower bound" if own else ""))


def busiest_compute(cand: Candidate) -> float:
    """Seconds of compute a step on ``cand``'s busiest rank, as its costs
    hold it: its F, B, I and W actions' costs less the executor's own time
    per action (``overhead``) and the mesh threads' CPU (``charge``)."""
    fixed = "fixed" in cand.costs
    most = 0.0
    for program in cand.schedule.ranks:
        most = max(most, sum(cand.costs[a.kind][a.stage] - (0.0 if fixed else cand.overhead)
                             - (cand.charge[a.stage] if cand.charge and a.kind != "W" else 0.0)
                             for a in program if a.kind in ("F", "B", "I", "W")))
    return most


def retimed_said(row: Candidate, again: Candidate) -> str:
    """The re-timed prediction (``again``: engine.distribute's
    ``job.predicted``) of the chosen schedule whose profiled row is ``row``
    (``job.profiled``; the table prints every row re-timed: ``calibrated``),
    beside the row's figure, and what moved it: the row was simulated from
    the profile (each layer, or stage, timed on its own; the executor's
    costs from the choice's dry run), the re-time from its stages timed
    again in the schedule's order and a dry run of the schedule itself
    (its messages at their sizes, the dp step's end)."""
    ms = 1e3
    said = (f"{again.schedule.name} re-timed as its steps will run: {again.makespan * ms:.2f} "
            f"ms a step (job.predicted: the figure to set a measured step against)")
    if f"{again.makespan * ms:.2f}" == f"{row.makespan * ms:.2f}":
        return said
    moved = [f"the busiest rank's compute {busiest_compute(row) * ms:.2f} -> "
             f"{busiest_compute(again) * ms:.2f} ms (its stages timed again, in its order)"]
    if f"{row.overhead * ms:.2f}" != f"{again.overhead * ms:.2f}":
        moved.append(f"the executor's own {row.overhead * ms:.2f} -> {again.overhead * ms:.2f} "
                     f"ms an action")
    send = (max(row.costs["send"], default=0.0), max(again.costs["send"], default=0.0))
    if f"{send[0] * ms:.2f}" != f"{send[1] * ms:.2f}":
        moved.append(f"a message {send[0] * ms:.2f} -> {send[1] * ms:.2f} ms")
    return (said + f"; the profile's {row.makespan * ms:.2f} ms before it:\n  "
            + ", ".join(moved) + (" (a dry run of the schedule itself)" if len(moved) > 1
                                  else ""))


def table(cands: Sequence[Candidate], chosen: Candidate | None = None,
          skipped: Sequence[tuple[Schedule, str]] = ()) -> str:
    """The candidates as a text table, the chosen one marked; then those
    ``skipped`` (a schedule that cannot run, and why: its layers failed on
    its micro-batches, a BatchNorm given one row)."""
    again = any(c.recompute for c in cands)     # a column saying which recompute
    lines = [f"{'schedule':<28} {'m':>3}  {'layers/stage':<14} {'pred ms':>9} {'bubble':>7} "
             f"{'peak MB':>8}" + ("  activations" if again else "")]
    for c in cands:
        note = "  <- chosen" if c is chosen else ("" if c.fits else "  over memory limit")
        note = ("  (its own dry run)" if c.measured else "") + note
        counts = " ".join(str(n) for n in c.counts)
        if len(counts) > 14:
            counts = counts[:11] + "..."
        lines.append(f"{c.schedule.name:<28} {c.schedule.num_microbatches:>3}  {counts:<14} "
                     f"{c.makespan * 1e3:>9.2f} {c.bubble:>7.1%} {c.peak_bytes / 2**20:>8.2f}"
                     + (f"  {recomputing(c.recompute, c.layered):<11}" if again else "")
                     + note)
    for sched, why in skipped:
        why = why if len(why) <= 120 else why[:117] + "..."
        lines.append(f"{sched.name:<28} {sched.num_microbatches:>3}  {'-':<14} {'-':>9} "
                     f"{'-':>7} {'-':>8}  cannot run: {why}")
    timed = next((c for c in cands if c.retimed is not None), None)
    if timed is not None and timed.retimed is not None:
        # (``calibrated``: every row as the chosen one's re-time corrects it)
        by, rest = timed.retimed
        lines.append(f"(every row re-timed as the chosen schedule's re-time found the steps: "
                     f"compute x{by:.2f}, the executor's {timed.overhead * 1e3:.2f} ms an "
                     f"action, a message {max(timed.costs['send'], default=0.0) * 1e3:.2f} "
                     f"ms, then x{rest:.2f} to its prediction)")
    loads = sorted({c.load for c in cands if c.load})
    if loads:       # (the simulator's figures then hold others' processes: ``loaded``)
        lines.append("(simulated with others' processes on the shared cores: "
                     + ", ".join(f"{x:.2f}" for x in loads) + " pp ranks' worth, fitted to a "
                     "dry run)")
    return "\n".join(lines)
