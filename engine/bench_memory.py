"""Activation memory against step time: ``python -m engine.bench_memory``.

Measurements, each in one process tree (``mesh.spawn``, two ranks,
pp=2 (``--pp``), one thread each), on a torch MLP of ``--depth`` x (Linear, GELU)
pairs per stage, ``--width`` wide, ``--rows`` rows cut into micro-batches
(``--model blocks``: ``--depth`` transformer encoder layers per stage
instead, four heads, over ``--rows`` sequences of ``--seq`` positions;
``--model numpy``: an engine.layers MLP of (Linear, Tanh) pairs in
float32, without torch, whose stages recompute as
``engine.layers.Recompute``; ``recompute``, ``limit``, ``stages`` and
``held``):

* ``recompute``: per schedule (``--schedules``), the stages keeping their
  activations against recomputing them (``engine.distribute(...,
  recompute=True)``, whole or layer by layer, whichever holds less; with
  ``--selective``, also recomputing only the
  submodules it names): the median step, the re-timed prediction
  (``job.predicted``), the candidates' predicted peak activation bytes,
  each rank's live heap's most over a step (glibc's ``mallinfo2``,
  sampled as ``held`` samples it; torch) and each rank's peak RSS
  (``ru_maxrss``, the profile's included);
* ``limit``: under ``--limit`` MB of activations a rank, the schedule
  ``schedule="auto"`` picks keeping them only (``recompute=False``) against
  ``recompute="auto"``, and their steps;
* ``stages``: per schedule, ``engine.Pipeline`` (stages cut uniformly)
  keeping, recomputing in stage 0 only (``recompute={0}``) and in both:
  the median step and each rank's peak RSS;
* ``held`` (not in the default ``--only``): in one process, the first
  half of the model, ``--microbatches`` forwards kept at once (GPipe's
  first rank), then their backwards: the live heap (glibc's
  ``mallinfo2``) after the forwards against the bytes the profile
  predicts the stage holds (``engine.choose.held_by`` of each layer,
  added up by ``stage_held``), keeping, recomputing whole, layer by layer
  and in runs of ``--runs`` layers (``layer_by_layer``), torch;
* ``tuples``: a cut carrying (mask, activation) against one carrying the
  activation alone (the blocks make the mask themselves): the same
  arithmetic, one message more per cut and micro-batch.

torch is imported only in the worker processes (never with ``--model numpy``).
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time
from typing import Any, Sequence

import mesh
from mesh.cliargs import names_in, positive, positive_float
from engine.choose import recomputing
from engine.schedules import by_name

__all__ = ["main"]


def _mlp(width: int, pairs: int) -> Any:
    import torch
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(pairs)
                           for m in (nn.Linear(width, width), nn.GELU())])


def _blocks(width: int, layers: int) -> Any:
    import torch
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(*[nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0,
                                                      batch_first=True, norm_first=True)
                           for _ in range(layers)])


def _numpy_mlp(a: argparse.Namespace) -> tuple[Any, Any, Any]:
    import numpy as np

    from engine.layers import Linear, Sequential, Tanh
    rng = np.random.default_rng(0)
    pairs = a.pp * a.depth
    model = Sequential(*[m for _ in range(pairs)
                         for m in (Linear(a.width, a.width, rng, np.float32), Tanh())])
    x, y = (rng.standard_normal((a.rows, a.width), dtype=np.float32) for _ in range(2))
    return model, x, y


def _loss(a: argparse.Namespace, wrapped: bool = False) -> Any:
    """The mean squared error: engine.layers' or torch's (``wrapped``: as
    a Pipeline's loss_fn, engine.torch_stage.torch_loss)."""
    if a.model == "numpy":
        from engine.layers import mse_loss
        return mse_loss
    from torch import nn

    from engine.torch_stage import torch_loss
    return torch_loss(nn.functional.mse_loss) if wrapped else nn.functional.mse_loss


def _threads(a: argparse.Namespace) -> None:
    if a.model != "numpy":
        import torch
        torch.set_num_threads(1)


def _model(a: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The model ``--model`` names, and an input batch and a target."""
    if a.model == "numpy":
        return _numpy_mlp(a)
    import torch
    g = torch.Generator().manual_seed(0)
    shape = (a.rows, a.width) if a.model == "mlp" else (a.rows, a.seq, a.width)
    x, y = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    return (_mlp if a.model == "mlp" else _blocks)(a.width, a.pp * a.depth), x, y


def _steps(world: Any, job: Any, x: Any, y: Any, n: int) -> float:
    """The median of ``n`` steps after one, each after a barrier (ms)."""
    import collectives
    job.step(x, y)
    took = []
    for _ in range(n):
        collectives.barrier(world)
        t0 = time.perf_counter()
        job.step(x, y)
        took.append(time.perf_counter() - t0)
    return statistics.median(took) * 1e3


def _memory_worker(world: Any, a: argparse.Namespace, schedule: str, recompute: Any,
                   limit: float | None) -> dict[str, Any]:
    import engine
    _threads(a)
    model, x, y = _model(a)
    try:
        job = engine.distribute(model, mesh.grid(world, pp=a.pp), schedule=schedule,
                                microbatches=a.microbatches if schedule != "auto" else None,
                                sample=x, loss_fn=_loss(a), recompute=recompute,
                                memory_limit=limit, verbose=False)
    except ValueError as e:         # (every rank alike) nothing fits the limit this way
        if limit is None or "memory_limit" not in str(e):
            raise
        return {"error": str(e).split(":\n")[0]}
    ms = _steps(world, job, x, y, a.steps)
    assert job.chosen is not None
    selective = bool(recompute) and recompute not in (True, "auto")
    return {"ms": ms, "pred": (job.predicted or 0.0) * 1e3, "name": job.schedule.name,
            "peak": job.chosen.peak_bytes / 2**20, "recompute": job.chosen.recompute,
            "layered": job.chosen.layered, "live": _live_in_step(world, job, x, y, selective),
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _live_in_step(world: Any, job: Any, x: Any, y: Any, selective: bool) -> float | None:
    """The live heap's most over a step of ``job``, over what it held
    before the step: sampled as ``_Sampler`` samples torch stages' modules
    (``selective``: checkpointed submodules, no saved-tensor hooks), and
    for engine.layers stages after each call of each layer's forward and
    backward (``_sampling``); the second of two steps, in MB. None without
    glibc."""
    import collectives
    if _live_bytes() is None:
        return None
    mods = [m for st in job.stages for m in getattr(getattr(st, "module", None), "modules",
                                                    list)()]
    most = 0
    with _Sampler(mods, unpacked=not selective) as live:
        undo = [] if mods else _sampling(job.stages, live.sample)
        try:
            for _ in range(2):
                for g in job.grads():   # zeroed, as a training loop's zero_grad() does
                    g[...] = 0          # (a step copies the gradients that hold anything)
                collectives.barrier(world)
                live.samples.clear()
                before = _live_bytes() or 0
                with live.reads():
                    job.step(x, y)
                most = max(live.samples, default=before) - before
        finally:
            for fn in undo:
                fn()
    return most / 2**20


def _sampling(stages: Sequence[Any], sample: Any) -> list[Any]:
    """Each engine.layers layer of ``stages`` (through Recompute and
    Sequential) made to call ``sample`` after its forward and backward
    calls, on the instance; returns what puts them back."""
    from engine.layers import Recompute, Sequential
    undo: list[Any] = []

    def wrap(layer: Any) -> None:
        if isinstance(layer, Recompute):
            return wrap(layer.inner)
        if isinstance(layer, Sequential):
            for inner in layer.layers:
                wrap(inner)
            return
        for name in ("forward", "backward", "backward_input", "backward_weight"):
            fn = getattr(layer, name, None)
            if fn is None:
                continue

            def sampled(*args: Any, _fn: Any = fn) -> Any:
                out = _fn(*args)
                sample()
                return out
            setattr(layer, name, sampled)
            undo.append(lambda layer=layer, name=name: delattr(layer, name))

    for st in stages:
        wrap(st)
    return undo


def _stages_worker(world: Any, a: argparse.Namespace, schedule: str,
                   recompute: Any) -> dict[str, float]:
    import engine
    from engine.executor import stages_for_rank
    _threads(a)
    model, x, y = _model(a)
    grid = mesh.grid(world, pp=a.pp)
    sched = engine.schedules.by_name(schedule, a.pp, a.microbatches)
    stages = engine.partition(model, a.pp)
    pipe = engine.Pipeline(grid, stages_for_rank(stages, sched, grid.group("pp").rank), sched,
                           loss_fn=_loss(a, wrapped=True), recompute=recompute)
    return {"ms": _steps(world, pipe, x, y, a.steps),
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _live_bytes() -> int | None:
    """The bytes glibc's malloc holds for the process's live blocks
    (``mallinfo2``: in use in the arenas plus mmapped), None elsewhere."""
    import ctypes

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Info
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _ways(a: argparse.Namespace, layered: bool = False) -> list[Any]:
    """Keeping, recomputing each stage (``layered``: and layer by layer,
    and in runs of ``--runs`` layers, torch), and the names of ``--selective``."""
    return ([False, True] + (["layered", "runs"] if layered and a.model != "numpy" else [])
            + ([a.selective.split(",")] if a.selective else []))


def _way(recompute: Any, runs: int = 2) -> str:
    if isinstance(recompute, str):
        return "by layer" if recompute == "layered" else f"by {runs} layers"
    return "recompute" if recompute is True else "keep" if not recompute else ",".join(recompute)


def _held_worker(world: Any, a: argparse.Namespace, recompute: Any) -> dict[str, Any]:
    """One process, the stage of the first rank: ``--microbatches``
    forwards of ``_model``'s first half kept at once (GPipe's first rank),
    then their backwards; the live heap after the forwards against what
    the profile predicts (``held_by`` of each layer, ``stage_held``)."""
    if a.model == "numpy":
        return _held_numpy(a, recompute)
    import torch

    from engine.choose import layer_by_layer, stage_held, time_layer
    from engine.torch_stage import TorchStage, checkpoint_modules
    torch.set_num_threads(1)
    model, x, _ = _model(a)
    half = torch.nn.Sequential(*list(model)[:len(model) // a.pp])     # the first stage
    # layer by layer (1), in runs of --runs layers, or not layered (0)
    runs = {"layered": 1, "runs": a.runs}.get(recompute, 0) if isinstance(recompute, str) else 0
    layered = bool(runs)
    if recompute and recompute is not True and not layered:     # selective: the model's names
        checkpoint_modules(half, recompute)
    size = -(-a.rows // a.microbatches)
    xs = list(torch.split(x, size))
    row, h = {}, xs[0]
    for i, m in enumerate(half):
        row[i], h = time_layer(TorchStage(m), h, reps=1, runs=1)
    stage = TorchStage(half, recompute is True or layered, layered=runs)
    selective = bool(recompute) and recompute is not True and not layered
    held, peak = _kept_at_once(stage, xs, torch.ones_like, list(half.modules()),
                               unpacked=not selective)
    # each micro-batch's input copied (the stage's leaf) beside its layers'
    # bytes; recomputing, the inputs only (each micro-batch's activations
    # are made again in its backward, after this figure: the peak's extra)
    n, given = len(row), xs[0].nbytes
    hold, extra = (layer_by_layer(row, 0, n, given, runs=runs) if layered else
                   (given, stage_held(row, 0, n, given)) if recompute is True else
                   (stage_held(row, 0, n, given), 0))
    grads = 2 * max(lc.act_bytes for lc in row.values())   # (choose.peak_bytes' flowing)
    return {"held": held, "predicted": len(xs) * hold, "peak": peak,
            "peak_predicted": len(xs) * hold + extra + grads,
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _held_numpy(a: argparse.Namespace, recompute: Any) -> dict[str, Any]:
    """``_held_worker`` for ``--model numpy``: engine.layers keep the
    arrays of their forward's context (the message they got, no copy);
    recomputing (engine.layers.Recompute), the input only."""
    import numpy as np

    from engine.choose import KEEPS_OUTPUT, stage_held, time_layer
    from engine.layers import Recompute, Sequential
    model, x, _ = _model(a)
    half = Sequential(*model.layers[:len(model.layers) // a.pp])
    size = -(-a.rows // a.microbatches)
    xs = [x[i:i + size] for i in range(0, len(x), size)]
    row, h = {}, xs[0]
    for i, layer in enumerate(half.layers):
        row[i], h = time_layer(layer, h, reps=1, runs=1)
    held, _ = _kept_at_once(Recompute(half) if recompute is True else half, xs, np.ones_like)
    # the inputs are views of the batch (nothing new: given 0); the list
    # keeps each forward's output beside the contexts (in them, when the
    # last layer keeps its output)
    out = 0 if recompute is not True and row[len(row) - 1].keeps & KEEPS_OUTPUT else h.nbytes
    predicted = len(xs) * (out + (0 if recompute is True
                                  else stage_held(row, 0, len(row), 0, copies=False)))
    return {"held": held, "predicted": predicted,
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class _Sampler:
    """The live heap sampled as work runs, while ``on``: after each forward
    of the torch modules ``probe`` (a recomputing backward's too), inside
    ``reads()`` as the backward reads each saved tensor (an identity
    ``saved_tensors_hooks`` pair: nothing else changes; not with
    ``unpacked`` False: torch.utils.checkpoint's recompute refuses hooks
    around it), and at each ``sample()``. A context manager: the hooks go
    at its end."""

    def __init__(self, probe: Sequence[Any] = (), unpacked: bool = True) -> None:
        self.samples: list[int] = []
        self.on = True
        self._probe, self._unpacked = probe, unpacked
        self._hooks = [m.register_forward_hook(self.sample) for m in probe]

    def sample(self, *_: Any) -> None:
        live = _live_bytes()
        if self.on and live is not None:
            self.samples.append(live)

    def _read(self, t: Any) -> Any:
        self.sample()
        return t

    def reads(self) -> Any:
        if not self._probe or not self._unpacked:
            return contextlib.nullcontext()
        import torch
        return torch.autograd.graph.saved_tensors_hooks(lambda t: t, self._read)

    def __enter__(self) -> "_Sampler":
        return self

    def __exit__(self, *_: Any) -> None:
        for hk in self._hooks:
            hk.remove()


def _kept_at_once(stage: Any, xs: list[Any], ones: Any, probe: Sequence[Any] = (),
                  unpacked: bool = True) -> tuple[int | None, int | None]:
    """The live heap's growth over ``stage``'s forwards of every ``xs``
    kept at once (their outputs and contexts), and its most through the
    backwards that follow, last first (``_Sampler`` of ``probe`` and
    ``unpacked``, and after each backward): the second of two passes (the
    allocator warm)."""
    held = peak = None
    with _Sampler(probe, unpacked) as live:
        for _ in range(2):
            live.samples.clear()
            live.on = False
            before = _live_bytes()
            with live.reads():
                ctxs = [stage.forward(xb) for xb in xs]
            after = _live_bytes()
            held = None if before is None or after is None else after - before
            live.on = True
            with live.reads():       # (the recomputing forwards' saved tensors too)
                for out, ctx in reversed(ctxs):
                    stage.backward(ctx, ones(out))
                    live.sample()
            del ctxs
            if held is not None and before is not None:
                peak = max([held] + [v - before for v in live.samples])
    return held, peak


def _tuple_worker(world: Any, a: argparse.Namespace) -> dict[str, float]:
    import torch
    from torch import nn

    import engine
    torch.set_num_threads(1)

    class Block(nn.Module):
        def __init__(self, own: bool) -> None:
            super().__init__()
            self.fc, self.own = nn.Linear(a.width, a.width), own

        def forward(self, x: Any, mask: Any = None) -> Any:
            if self.own:
                mask = torch.ones(x.shape[:-1], dtype=torch.bool)
            return x + torch.tanh(self.fc(x)) * mask.unsqueeze(-1)

    class Model(nn.Module):
        def __init__(self, own: bool) -> None:
            super().__init__()
            self.emb, self.own = nn.Embedding(50, a.width), own
            self.blocks = nn.ModuleList(Block(own) for _ in range(2 * a.depth))
            self.head = nn.Linear(a.width, 50)

        def forward(self, idx: Any) -> Any:
            x = self.emb(idx)
            mask = None if self.own else idx >= 0
            for block in self.blocks:
                x = block(x) if self.own else block(x, mask)
            return self.head(x).flatten(0, 1)

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50, (a.rows // 16, 16), generator=g)
    y = torch.randint(0, 50, (a.rows,), generator=g)

    def loss(out: Any, t: Any) -> Any:
        return nn.functional.cross_entropy(out, t.flatten())

    jobs = {}
    for own in (True, False):
        torch.manual_seed(0)
        jobs[own] = engine.distribute(Model(own), mesh.grid(world, pp=2), schedule="1f1b",
                                      microbatches=4, balance="uniform", loss_fn=loss,
                                      verbose=False)
    took: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(a.steps):       # alternated: each pair under the same load
        for own in (True, False):
            took[own].append(_steps(world, jobs[own], idx, y, 1))
    return {"one": statistics.median(took[True]), "tuple": statistics.median(took[False])}


def _rss(ranks: list[dict[str, Any]]) -> str:
    return " / ".join(f"{r['rss']:.0f}" for r in ranks)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m engine.bench_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=positive, default=2048)
    ap.add_argument("--width", type=positive, default=256)
    ap.add_argument("--depth", type=positive, default=12,
                    help="(Linear, GELU) pairs per stage (--model blocks: layers; "
                         "numpy: (Linear, Tanh) pairs)")
    ap.add_argument("--model", choices=("mlp", "blocks", "numpy"), default="mlp")
    ap.add_argument("--pp", type=positive, default=2,
                    help="pipeline ranks (recompute, limit, stages; the model has --depth "
                         "pairs or layers per rank)")
    ap.add_argument("--seq", type=positive, default=64, help="--model blocks: positions")
    ap.add_argument("--microbatches", type=positive, default=8)
    ap.add_argument("--steps", type=positive, default=5)
    ap.add_argument("--schedules", default="gpipe,1f1b")
    ap.add_argument("--limit", type=positive_float, default=5.0, help="MB of activations a rank")
    ap.add_argument("--only", default="recompute,limit,stages,tuples",
                    type=names_in(("recompute", "limit", "stages", "held", "tuples")))
    ap.add_argument("--runs", type=positive, default=2,
                    help="held: also recompute in runs of this many layers (layered=N)")
    ap.add_argument("--selective", default="",
                    help="recompute: also recompute the submodules these comma-separated "
                         "name patterns match (e.g. '*.self_attn' with --model blocks)")
    a = ap.parse_args(argv)
    for schedule in a.schedules.split(","):
        try:
            by_name(schedule, a.pp, a.microbatches)
        except ValueError as e:
            ap.error(str(e))
    if a.rows < a.microbatches:
        ap.error(f"--rows {a.rows} gives fewer rows than the {a.microbatches} micro-batches")
    only = a.only
    if a.model == "numpy":      # (whole stages recompute; the blocks' tuples are torch's)
        if a.selective:
            ap.error("--selective names torch submodules: not with --model numpy")
        only = [o for o in only if o != "tuples"]
    if "recompute" in only:
        print(f"recompute: pp={a.pp}, keeping the activations against recomputing them")
        for schedule in a.schedules.split(","):
            for recompute in _ways(a):
                r = mesh.spawn(_memory_worker, a.pp, a, schedule, recompute, None, timeout=900)
                n = r[0]["layered"]     # (per stage: "2,1", "all" where whole)
                n = ",".join(str(k or "all") for k in n) if isinstance(n, (list, tuple)) else n
                way = _way(recompute) + (" by layer" if n == 1 else f" by {n} layers" if n else "")
                live = ("" if r[0]["live"] is None else "  live heap's most in a step "
                        + " / ".join(f"{v['live']:.2f}" for v in r) + " MB")
                print(f"  {r[0]['name']:<22} {way:<9}  "
                      f"step {r[0]['ms']:7.1f} ms (predicted {r[0]['pred']:7.1f})  "
                      f"peak activations {r[0]['peak']:6.2f} MB a rank (predicted){live}  "
                      f"peak RSS {_rss(r)} MB", flush=True)
    if "limit" in only:
        print(f"limit: schedule='auto' under {a.limit:g} MB of activations a rank")
        for how in (False, "auto"):
            r = mesh.spawn(_memory_worker, a.pp, a, "auto", how, a.limit * 2**20,
                           timeout=900)[0]
            if "error" in r:
                print(f"  recompute={how!r:<7} {r['error']}", flush=True)
                continue
            print(f"  recompute={how!r:<7} chose {r['name']:<24} "
                  f"({recomputing(r['recompute'], r['layered'])}) "
                  f"step {r['ms']:7.1f} ms (predicted {r['pred']:7.1f})", flush=True)
    if "stages" in only:
        print("stages: engine.Pipeline keeping, recomputing in stage 0 only, in both")
        for schedule in a.schedules.split(","):
            ways: tuple[tuple[str, Any], ...] = (("keep", False), ("{0}", {0}), ("both", True))
            for name, how in ways:
                r = mesh.spawn(_stages_worker, a.pp, a, schedule, how, timeout=900)
                print(f"  {schedule}({a.pp},{a.microbatches}) recompute={name:<5} "
                      f"step {r[0]['ms']:7.1f} ms  peak RSS {_rss(r)} MB", flush=True)
    if "held" in only:
        print(f"held: the first half of the model, {a.microbatches} micro-batches' forwards "
              "kept at once in one process: the live heap after them, and predicted")
        for way in _ways(a, layered=True):
            r = mesh.spawn(_held_worker, 1, a, way, timeout=900)[0]
            live = "n/a" if r["held"] is None else f"{r['held'] / 2**20:7.2f} MB"
            most = ("" if r.get("peak") is None else
                    f"  through the backwards {r['peak'] / 2**20:7.2f} MB (predicted "
                    f"{r['peak_predicted'] / 2**20:7.2f})")
            said = _way(way, a.runs)
            print(f"  {said:<14} live heap {live}  predicted {r['predicted'] / 2**20:7.2f} MB"
                  f"{most}  peak RSS {r['rss']:.0f} MB", flush=True)
    if "tuples" in only:
        r = mesh.spawn(_tuple_worker, 2, a, timeout=900)[0]
        print(f"tuples: 1F1B(2,4), {2 * a.depth} blocks: one tensor a cut {r['one']:.2f} ms, "
              f"(mask, activation) {r['tuple']:.2f} ms: {r['tuple'] / r['one']:.3f}x", flush=True)


if __name__ == "__main__":
    main()
