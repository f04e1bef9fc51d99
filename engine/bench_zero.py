"""``python -m engine.bench_zero``: ZeRO stages 1, 2 and 3 against the whole optimizer.

An MLP of ``--depth`` float32 Linear layers of ``--width`` (Tanh between)
is distributed over dp x pp (``schedule="1f1b"``, a uniform cut, no
profile) and trained with AdamW, either whole on every replica or under
``engine.ZeroRedundancyOptimizer`` at stage 1 (the state sharded), 2
(the gradients too) or 3 (the parameters too: "zero3" gathering each
module's as it runs, ``--prefetch`` modules' gathers posted ahead of the
one running, "zero3pf0" none ahead, ``stage3_prefetch=0``, "zero3whole"
a stage's whole weights for the step, ``stage3_per_layer=False``, "zero3ds"
"zero3" with DeepSpeed's ``--bucket`` (``stage3_prefetch_bucket_size``),
``--persistence`` (``stage3_param_persistence_threshold``) and
``--max-live`` (``stage3_max_live_parameters``)); ``--large K``
makes the middle Linear ``Linear(width, K * width)`` (its output's K slices
summed: one module K times the others' size), ``--norm`` a ``LayerNorm``
after each Linear but the last (two small parameters more a layer); the
seven (or the ``--ways`` named) alternate, each round one ``mesh.spawn`` of
each, so all see the machine's load of the moment. Each
rank reports the bytes of its optimizer state, of the gradients and of
the parameters' values it holds after the step (``opt.step()`` done, at
rest: under stage 2 its share's gradients, under stage 3 its share's
values too), the parameters' bytes it held at most during the step ("in
step": its own, and the most of the others' gathered at once,
``opt.peak_gathered_bytes()``), its RSS then ("rest RSS", once
malloc has handed its free memory back: the least and the most of the
ranks'),
its peak RSS (``ru_maxrss``) and how far that is above its RSS before the
first step ("grown": the gradients, the state, the step's buffers), and
the step times (a barrier before each step; ``zero_grad``, ``job.step``
and ``opt.step``, rank 0's clock, and its process's CPU time for them,
its mesh threads' included: less moved by other jobs' load than the
clock) and of its ``opt.step()`` alone (the
whole AdamW, or the share's and the broadcasts: none under stage 3, whose
step gathers the parameters instead, but its persistent ones'), and the
values of other replicas' parameters a rank received a step ("recv": the
step's gathers, ``opt.gathers_received()``, and ``opt.step()``'s
broadcasts; one message each at dp=2); the figures are the medians over
steps and rounds, with the rounds' spread; the bytes and counts are the
most any rank holds.

    python -m engine.bench_zero --dp 2 [--pp 1] [--width 1024] [--depth 8] [--rounds 3]
                                [--prefetch 2] [--ways zero3,zero3pf0] [--large 4] [--norm]
                                [--bucket N] [--persistence N] [--max-live N]
"""
from __future__ import annotations

import argparse
import ctypes
import resource
import statistics
import time
from typing import Any

import numpy as np

import collectives
import mesh

from mesh.cliargs import positive

from .zero_prefetch import BUCKET, MAX_LIVE, PREFETCH

__all__ = ["main", "run"]


def _rss() -> int:
    """This process's resident bytes now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _trimmed_rss() -> int:
    """``_rss()`` once glibc's malloc has handed its free memory back to
    the system (``malloc_trim(0)``; as it is elsewhere): what the process
    holds, not what its allocator keeps for reuse (stage 3's freed values)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return _rss()


_WAYS = {"whole": (0, True, False), "zero1": (1, True, False), "zero2": (2, True, False),
         "zero3": (3, True, True), "zero3pf0": (3, True, False), "zero3whole": (3, False, False),
         "zero3ds": (3, True, True)}


def _worker(world: Any, zero: int, per_layer: bool, ahead: int, dp: int, pp: int, width: int,
            depth: int, rows: int, steps: int, model: tuple[int, bool] = (1, False),
            knobs: dict[str, int] | None = None) -> dict[str, Any]:
    """One way's run on this rank: ``zero`` 0 (the whole AdamW), 1, 2 or 3
    (engine.ZeroRedundancyOptimizer's stage; 3 gathering module by module
    with ``per_layer``, ``ahead`` modules' gathers posted ahead of the one
    running, else a stage's whole weights for the step; ``knobs`` its
    DeepSpeed ones); ``model``: the middle Linear's width factor, and
    whether a LayerNorm follows each Linear but the last."""
    import torch

    import engine

    class Fold(torch.nn.Module):
        """(rows, k * width) -> (rows, width): the k slices summed."""

        def __init__(self, k: int) -> None:
            super().__init__()
            self.k = k

        def forward(self, x: Any) -> Any:
            return x.view(x.shape[0], self.k, -1).sum(1)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    large, norm = model
    mods: list[Any] = []
    for i in range(depth):
        k = large if i == depth // 2 else 1
        mods += [torch.nn.Linear(width, k * width)] + ([Fold(k)] if k > 1 else [])
        if i < depth - 1:
            mods += ([torch.nn.LayerNorm(width)] if norm else []) + [torch.nn.Tanh()]
    grid = mesh.grid(world, dp=dp, pp=pp)
    rng = np.random.default_rng(grid.coord("dp"))
    x = torch.from_numpy(rng.standard_normal((rows, width)).astype(np.float32))
    y = torch.from_numpy(rng.standard_normal((rows, width)).astype(np.float32))
    job = engine.distribute(torch.nn.Sequential(*mods), grid, schedule="1f1b", microbatches=2,
                            balance="uniform", sample=x, loss_fn=torch.nn.functional.mse_loss,
                            overhead=0.0, verbose=False, timeout=120)
    params = job.parameters()
    opt: Any = (engine.ZeroRedundancyOptimizer(params, torch.optim.AdamW, job, stage=zero,
                                               stage3_per_layer=per_layer,
                                               stage3_prefetch=ahead, lr=1e-4,
                                               **(knobs or {}))
                if zero else torch.optim.AdamW(params, lr=1e-4))
    before = _rss()
    times, stepping, cpu = [], [], []
    for _ in range(steps + 1):
        collectives.barrier(world)
        began, cpu0 = time.perf_counter(), time.process_time()
        opt.zero_grad()
        job.step(x, y)
        stepped = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - began)
        cpu.append(time.process_time() - cpu0)
        stepping.append(time.perf_counter() - stepped)
    state = opt.optim.state if zero else opt.state
    held = sum(v.numel() * v.element_size() for own in state.values() for v in own.values()
               if torch.is_tensor(v))
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    values = sum(p.numel() * p.element_size() for p in params)      # (at rest)
    # a step's parameters: those held at rest, and the most of the others' gathered at once
    in_step = values + (opt.peak_gathered_bytes() if zero == 3 else 0)
    # the values received a step: its gathers, and opt.step()'s broadcasts (stage 3: of the
    # persistent parameters only)
    recv = 0
    if zero:
        recv = sum(r != opt.group.rank and (zero < 3 or opt.persists(p))
                   for p, r in zip(opt.params, opt.owner)) + opt.gathers_received()
    return {"held": held, "grads": grads, "peak": peak, "grown": peak - before,
            "recv": recv,
            "in_step": in_step,
            "times": times[1:], "rest": _trimmed_rss(), "cpu": cpu[1:],
            "stepping": stepping[1:],
            "weights": values}


def run(dp: int, pp: int, width: int, depth: int, rows: int, steps: int,
        rounds: int, prefetch: int = PREFETCH,
        ways: list[str] | None = None, model: tuple[int, bool] = (1, False),
        knobs: dict[str, int] | None = None) -> dict[str, Any]:
    """The ways (``ways``: these; default all seven), alternating,
    ``rounds`` times: per way the medians; "zero3" gathers ``prefetch``
    modules ahead; ``model``: ``_worker``'s, ``knobs`` "zero3ds"'s."""
    got: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in ways or _WAYS}
    for _ in range(rounds):
        for name in got:
            zero, per_layer, ahead = _WAYS[name]
            got[name].append(mesh.spawn(_worker, dp * pp, zero, per_layer,
                                        prefetch if ahead else 0, dp, pp, width, depth, rows,
                                        steps, model, knobs if name == "zero3ds" else None,
                                        timeout=600))
    out: dict[str, Any] = {}
    for name, runs in got.items():
        steps_ms = [statistics.median(r[0]["times"]) * 1e3 for r in runs]
        opt_ms = [statistics.median(r[0]["stepping"]) * 1e3 for r in runs]
        cpu_ms = [statistics.median(r[0]["cpu"]) * 1e3 for r in runs]
        out[name] = {
            "opt_ms": statistics.median(opt_ms),
            "step_ms": statistics.median(steps_ms), "spread_ms": (min(steps_ms), max(steps_ms)),
            "cpu_ms": statistics.median(cpu_ms),
            "held_mb": max(res["held"] for res in runs[0]) / 2**20,
            "grads_mb": max(res["grads"] for res in runs[0]) / 2**20,
            "weights_mb": max(res["weights"] for res in runs[0]) / 2**20,
            "in_step_mb": max(res["in_step"] for res in runs[0]) / 2**20,
            "recv": max(res["recv"] for res in runs[0]),
            "peak_mb": statistics.median(max(res["peak"] for res in r) for r in runs) / 2**20,
            "rest_mb": [statistics.median(f(res["rest"] for res in r) for r in runs) / 2**20
                        for f in (min, max)],
            "grown_mb": statistics.median(max(res["grown"] for res in r) for r in runs) / 2**20}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m engine.bench_zero", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", type=positive, default=2)
    ap.add_argument("--pp", type=positive, default=1)
    ap.add_argument("--width", type=positive, default=1024)
    ap.add_argument("--depth", type=positive, default=8)
    ap.add_argument("--rows", type=positive, default=64, help="rows per replica's batch")
    ap.add_argument("--steps", type=positive, default=10, help="timed steps (after one)")
    ap.add_argument("--rounds", type=positive, default=3)
    ap.add_argument("--prefetch", type=int, default=PREFETCH,
                    help="zero3's stage3_prefetch (modules gathered ahead)")
    ap.add_argument("--ways", type=lambda t: t.split(","), default=None,
                    help=f"comma-separated, of {','.join(_WAYS)} (default all)")
    ap.add_argument("--large", type=positive, default=1,
                    help="the middle Linear's output this many times the width")
    ap.add_argument("--norm", action="store_true", help="a LayerNorm after each Linear")
    ap.add_argument("--bucket", type=int, default=BUCKET,
                    help="zero3ds's stage3_prefetch_bucket_size (elements)")
    ap.add_argument("--persistence", type=int, default=0,
                    help="zero3ds's stage3_param_persistence_threshold (elements)")
    ap.add_argument("--max-live", type=int, default=MAX_LIVE,
                    help="zero3ds's stage3_max_live_parameters (elements)")
    a = ap.parse_args(argv)
    bad = [w for w in a.ways or [] if w not in _WAYS]
    if bad:
        ap.error(f"--ways: {','.join(bad)} not of {','.join(_WAYS)}")
    knobs = {"stage3_prefetch_bucket_size": a.bucket,
             "stage3_param_persistence_threshold": a.persistence,
             "stage3_max_live_parameters": a.max_live}
    res = run(a.dp, a.pp, a.width, a.depth, a.rows, a.steps, a.rounds, a.prefetch, a.ways,
              (a.large, a.norm), knobs)
    print(f"dp={a.dp} pp={a.pp}: {a.depth} Linear({a.width}, {a.width})"
          f"{f', the middle one {a.large}x wide' if a.large > 1 else ''}"
          f"{', LayerNorm between' if a.norm else ''}, {a.rows} rows a "
          f"replica, AdamW, {a.rounds} rounds of {a.steps} steps (medians; rounds' spread); "
          f"zero3ds: {', '.join(f'{k}={v}' for k, v in knobs.items())}")
    print(f"{'optimizer':<11}{'weights MB':>11}{'in step MB':>11}{'state MB':>10}"
          f"{'grads MB':>10}{'rest RSS MB':>13}{'peak RSS MB':>13}{'grown MB':>10}"
          f"{'opt.step ms':>13}{'step ms':>9}{'CPU ms':>8}{'recv':>6}  spread")
    for name, r in res.items():
        lo, hi = r["spread_ms"]
        print(f"{name:<11}{r['weights_mb']:>11.1f}{r['in_step_mb']:>11.1f}{r['held_mb']:>10.1f}"
              f"{r['grads_mb']:>10.1f}"
              f"{'%.0f-%.0f' % tuple(r['rest_mb']):>13}{r['peak_mb']:>13.1f}"
              f"{r['grown_mb']:>10.1f}"
              f"{r['opt_ms']:>13.1f}{r['step_ms']:>9.1f}{r['cpu_ms']:>8.1f}{r['recv']:>6}"
              f"  {lo:.1f}-{hi:.1f}")


if __name__ == "__main__":
    main()
