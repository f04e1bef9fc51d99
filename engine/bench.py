"""``python -m engine.bench``: measured pipeline steps beside the simulator.

Stages sleep for known F/B (or I/W) times, so two cores do not distort
the picture: what is measured is the schedule and the runtime's overhead.
Each schedule runs in one ``mesh.spawn`` job; a barrier precedes every
step; a step's time is the latest end minus the earliest start over all
ranks, and the figure is the median over the timed steps. The measured
bubble comes from the merged trace of the last step. With torch
installed, torch.distributed.pipelining's Schedule1F1B (gloo) runs the
same sleep workload in the same run (see engine.bench_torch).

    python -m engine.bench                      # p=4, m=16, F=10ms, B=20ms
    python -m engine.bench -p 4 -m 16 --F 0.01 --B 0.02 --steps 5 --trace /tmp
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Sequence

import numpy as np

from mesh.cliargs import nonnegative_float, positive

from .executor import Pipeline, stages_for_rank
from .schedules import by_name
from .trace import measured

__all__ = ["SleepStage", "main", "run_meshrun"]


class SleepStage:
    """A stage that computes nothing: it sleeps ``costs[kind]`` seconds per
    action and passes its input through, so its output has the input's shape."""

    def __init__(self, costs: dict[str, float]) -> None:
        self.costs = costs

    def forward(self, x: Any) -> tuple[Any, Any]:
        time.sleep(self.costs["F"])
        return x, None

    def backward(self, ctx: Any, gy: Any) -> Any:
        time.sleep(self.costs["B"])
        return gy

    def backward_input(self, ctx: Any, gy: Any) -> tuple[Any, Any]:
        time.sleep(self.costs["I"])
        return gy, None

    def backward_weight(self, wctx: Any) -> None:
        time.sleep(self.costs["W"])

    def grads(self) -> list[Any]:
        return []


def _costs(name: str, f: float, b: float, chunks: int) -> dict[str, float]:
    """Per-action costs: an interleaved stage is 1/chunks of a rank's work."""
    k = chunks if name.startswith("interleaved") else 1
    return {"F": f / k, "B": b / k, "I": b / (2 * k), "W": b / (2 * k), "send": 0.0}


def _mesh_worker(world: Any, configs: list[tuple], steps: int, rows: int, width: int
                 ) -> list[dict[str, Any]]:
    import collectives
    out = []
    for name, p, m, chunks, costs in configs:
        sched = by_name(name, p, m, chunks)
        stages = [SleepStage(costs) for _ in range(sched.num_stages)]
        pipe = Pipeline(world, stages_for_rank(stages, sched, world.rank), sched,
                        loss_fn=lambda y, t: (0.0, y), timeout=120)
        batch = np.ones((rows, width), dtype=np.float32)
        spans = []
        for _ in range(steps + 1):
            collectives.barrier(world)
            t0 = time.time()
            pipe.step(batch if pipe.first else None, batch if pipe.last else None)
            spans.append((t0, time.time()))
        out.append({"spans": spans[1:], "trace": pipe.trace(costs)})
    return out


def run_meshrun(names: Sequence[str], p: int, m: int, f: float, b: float, chunks: int,
                steps: int, rows: int, width: int) -> list[dict[str, Any]]:
    """Measure each schedule; return rows of predicted and measured figures."""
    import mesh
    configs = [(n, p, m, chunks, _costs(n, f, b, chunks)) for n in names]
    results = mesh.spawn(_mesh_worker, p, configs, steps, rows, width,
                         timeout=120 + 3 * steps * len(names) * (m + p) * (f + b))
    report = []
    for i, (name, _, _, _, costs) in enumerate(configs):
        per_step = [max(r[i]["spans"][s][1] for r in results) -
                    min(r[i]["spans"][s][0] for r in results) for s in range(steps)]
        sim = by_name(name, p, m, chunks).simulate(costs)
        trace = results[0][i]["trace"]
        _, bubble = measured(trace)
        report.append({"schedule": by_name(name, p, m, chunks).name,
                       "predicted_ms": sim.makespan * 1e3, "predicted_bubble": sim.bubble,
                       "measured_ms": statistics.median(per_step) * 1e3,
                       "measured_bubble": bubble, "trace": trace})
    return report


def _table(report: list[dict[str, Any]]) -> str:
    lines = [f"{'schedule':<26} {'predicted ms':>12} {'measured ms':>12} {'meas/pred':>9} "
             f"{'pred bubble':>11} {'meas bubble':>11}"]
    for r in report:
        lines.append(f"{r['schedule']:<26} {r['predicted_ms']:>12.1f} {r['measured_ms']:>12.1f} "
                     f"{r['measured_ms'] / r['predicted_ms']:>9.3f} "
                     f"{r['predicted_bubble']:>11.1%} {r['measured_bubble']:>11.1%}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-p", type=positive, default=4, help="pipeline ranks (processes)")
    ap.add_argument("-m", type=positive, default=16, help="micro-batches per step")
    ap.add_argument("--F", type=nonnegative_float, default=0.010, help="forward seconds per stage")
    ap.add_argument("--B", type=nonnegative_float, default=0.020,
                    help="backward seconds (I = W = B/2)")
    ap.add_argument("--chunks", type=positive, default=2,
                    help="virtual stages per rank (interleaved)")
    ap.add_argument("--steps", type=positive, default=3, help="timed steps (after one warm-up)")
    ap.add_argument("--rows", type=positive, default=64, help="rows per batch")
    ap.add_argument("--width", type=positive, default=256, help="float32 columns per activation")
    ap.add_argument("--schedules", default="gpipe,1f1b,interleaved,zb-h1")
    ap.add_argument("--no-torch", action="store_true", help="skip torch.distributed.pipelining")
    ap.add_argument("--trace", metavar="DIR", help="write each schedule's last step trace here")
    ap.add_argument("--balance", action="store_true",
                    help="engine.distribute on uneven layers: balance time/uniform/parameters")
    ap.add_argument("--rounds", type=positive, default=3,
                    help="--balance: rounds of re-time, then the timed steps (split over them)")
    ap.add_argument("--tp-predict", metavar="SCHEDULES",
                    help="pp=2 x tp=2: measured step over Job.retime's prediction for these "
                         "schedules (e.g. 1f1b,interleaved,zb-h1,zb-v,gpipe), the MLP and "
                         "train_3d's TinyGPT; --rounds rounds")
    ap.add_argument("--stages", action="store_true",
                    help="the uneven model's stages timed whole over their layers' sum (CPU)")
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.schedules.split(",") if n.strip()]
    checks = [(n, a.p, a.m) for n in names]
    if a.tp_predict:
        checks = [(n.strip(), 2, 8) for n in a.tp_predict.split(",")]
    for name, p, m in checks:
        try:
            by_name(name, p, m, a.chunks)
        except ValueError as e:
            ap.error(str(e))
    if a.rows < a.m:
        ap.error(f"--rows {a.rows} gives fewer rows than the {a.m} micro-batches (-m)")
    if a.trace:
        os.makedirs(a.trace, exist_ok=True)
    if a.stages:
        from .bench_distribute import stage_overrun
        print("uneven model's stages (layers first..stop-1), 32 rows: timed whole / sum of "
              "the layers timed alone, thread CPU, median of 9 rotated rounds")
        for (first, stop), ratios in stage_overrun():
            print(f"  layers {first}..{stop - 1}: "
                  + "  ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
        return 0
    if a.tp_predict:
        from .bench_distribute import run_tp_predicted, train_3d_example
        models = ["gpt", "mlp"] if train_3d_example() is not None else ["mlp"]
        print(f"pp=2 x tp=2 (4 ranks): median step over Job.retime's prediction, "
              f"{max(1, a.rounds)} rounds (each round's), and over the profile alone")
        for sched in (n.strip() for n in a.tp_predict.split(",")):
            for model in models:
                r = run_tp_predicted(steps=5 * max(1, a.rounds), rounds=max(1, a.rounds),
                                     schedule=sched, model=model)
                by = [m / p for m, p in zip(r["measured"], r["predicted"]) if p]
                print(f"  {model:4s} {r['schedule']:26s} meas/pred "
                      f"{statistics.median(by):.3f} ({' '.join(f'{x:.2f}' for x in by)})  "
                      f"over profile {statistics.median(r['measured']) / r['profiled']:.2f}",
                      flush=True)
        return 0
    if a.balance:
        from .bench_distribute import balance_table, run_balance
        print("engine.distribute, pp=2, numpy layers costing 4 4 6 1 1 1 1 matmuls "
              f"(parameters 4 4 0 1 1 1 1); {a.rounds} rounds of re-time and steps, medians")
        print(balance_table(run_balance(steps=max(a.steps, 3), rounds=max(1, a.rounds))))
        from . import bench_torch
        if a.no_torch or not bench_torch.available():
            return 0
        from .bench_distribute import run_tp
        tp = run_tp(steps=max(a.steps, 3))
        print(f"tp=2, 4-Linear MLP (256 wide, 64 rows), SGD step: engine.distribute plan on "
              f"meshrun {tp['meshrun_ms']:.1f} ms; torch parallelize_module (gloo, "
              f"DeviceMesh cpu) {tp['torch_ms']:.1f} ms; meshrun/torch = "
              f"{tp['meshrun_ms'] / tp['torch_ms']:.3f}")
        from .bench_distribute import run_tp_predicted
        tpp = run_tp_predicted(steps=max(a.steps, 3), rounds=max(1, a.rounds))
        tp_ratios = [m / p for m, p in zip(tpp["measured"], tpp["predicted"]) if p]
        print(f"pp=2 x tp=2, the same MLP, schedule auto: {tpp['schedule']}; measured ms by "
              f"round {' '.join(f'{m * 1e3:.1f}' for m in tpp['measured'])}; predicted (re-time, "
              f"tp collectives in) {' '.join(f'{p * 1e3:.1f}' for p in tpp['predicted'])}, "
              f"meas/pred {' '.join(f'{r:.3f}' for r in tp_ratios)}; from the profile alone "
              f"(collectives out) {tpp['profiled'] * 1e3:.1f}, meas/pred "
              f"{statistics.median(tpp['measured']) / tpp['profiled']:.3f}; rank 0's tp "
              f"collectives per action {tpp['calls']}, stretch "
              f"{' '.join(f'{x:.2f}' for x in tpp['stretch'])}")
        from .bench_distribute import run_tp_sums
        sums = run_tp_sums(steps=max(a.steps, 3))
        print(f"pp=2 x tp=2, four sequence-parallel MLP blocks, 1f1b(2,8): the norms' gradient "
              f"sums once a step {sums['once'] * 1e3:.1f} ms, once per backward "
              f"{sums['hooks'] * 1e3:.1f} ms: {sums['once'] / sums['hooks']:.3f}")
        return 0
    print(f"meshrun engine: p={a.p} m={a.m} F={a.F * 1e3:g}ms B={a.B * 1e3:g}ms "
          f"(I=W={a.B * 500:g}ms), activations {a.rows // a.m}x{a.width} float32 per micro-batch")
    report = run_meshrun(names, a.p, a.m, a.F, a.B, a.chunks, a.steps, a.rows, a.width)
    print(_table(report))
    if a.trace:
        from .trace import write
        for r in report:
            path = os.path.join(a.trace, r["schedule"].replace(",", "_") + ".trace.json")
            print(f"trace: {write(path, r['trace'])}")
    from . import bench_torch
    if a.no_torch or not bench_torch.available():
        print("torch.distributed.pipelining: skipped" + ("" if a.no_torch else " (no torch)"))
        return 0
    ours = next((r for r in report if r["schedule"].startswith("1f1b")), None)
    if ours is None:
        ours = run_meshrun(["1f1b"], a.p, a.m, a.F, a.B, 1, a.steps, a.rows, a.width)[0]
    theirs = bench_torch.run(a.p, a.m, a.F, a.B, a.steps, a.rows, a.width)
    print(f"torch.distributed.pipelining Schedule1F1B (gloo): {theirs * 1e3:.1f} ms/step; "
          f"meshrun 1F1B {ours['measured_ms']:.1f} ms/step; "
          f"meshrun/torch = {ours['measured_ms'] / (theirs * 1e3):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
