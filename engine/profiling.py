"""Measure the layers: each layer's (or stage's) F, B, I and W as the executor runs them.

``time_layer`` times one stage object on a micro-batch (the median of
enough runs for a loaded machine) and ``held_by`` what it holds from its
forward to its backward; ``measure`` times every layer at each
micro-batch size, ``measure_stages`` the candidates' stages whole, and
``time_program`` a rank's stages in a schedule's order (the chosen
schedule's re-time). ``kept_random`` and ``kept_buffers`` put the random
streams and a model's buffers back after, so timing changes nothing a
seeded run would see. Each returns engine.costs' ``LayerCost``.
"""
from __future__ import annotations

import contextlib
import random
import statistics
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from mesh.tensors import is_tensor

from .costs import KEEPS_INPUT, KEEPS_OUTPUT, LayerCost, Span
from .ir import B, F, I, W, Action

__all__ = ["kept_random", "kept_buffers", "time_layer", "held_by", "time_program", "measure",
           "measure_stages"]

_SPAN, _MAX_RUNS = 0.05, 25     # time_layer's sampling of one layer: see there


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
