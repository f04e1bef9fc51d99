"""``python -m engine.bench --balance``: how the cut changes a real step.

A numpy model with uneven layers (two wide Linear layers, a parameter-free
layer that costs as much as several matmuls, then narrow Linear layers) is
distributed on pp=2 three times, by ``balance="time"``, ``"uniform"`` and
``"parameters"``, with the same schedule; then once with ``schedule="auto"``.
In each of three rounds every job in turn has its stages timed again
(``Job.retime``) and runs a step to warm up and its timed steps (a barrier
before each step; latest end minus earliest start); the median of its
steps is set beside the median of its rounds' predictions ("predicted"),
each round's steps beside that round's prediction ("by round"), and beside
the predictions from distribute's profile
("profile": a stage of several layers timed whole) and, for comparison,
had each stage cost the sum of its layers timed one by one ("summed"); the
last line gives the mesh threads' CPU per message end (engine.calibrate)
and whether it was charged. With torch, ``run_tp`` then times
one SGD step of a 4-Linear MLP at tp=2 sharded by engine.distribute's plan
on meshrun and by torch's ``parallelize_module`` (DeviceMesh on CPU, gloo).

    python -m engine.bench --balance [--steps 7] [--rounds 3]
"""
from __future__ import annotations

import os
import socket
import statistics
import time
from typing import Any

import numpy as np

from collectives.tools.bench_gloo import run_workers

from .calibrate import step_figures, step_record
from .choose import time_layer
from .distribute import distribute
from .layers import Linear, Sequential, _Activation, mse_loss

__all__ = ["Burn", "uneven_model", "run_balance", "balance_table", "run_tp", "run_tp_predicted",
           "run_tp_sums", "stage_overrun", "train_3d_example"]


class Burn(_Activation):
    """A parameter-free layer that passes its input through and costs
    ``reps`` matmuls of it (forward and backward alike): a stand-in for work
    whose cost is not in its parameters (attention, convolutions)."""

    def __init__(self, width: int, reps: int) -> None:
        self.m = np.random.default_rng(9).standard_normal((width, width)) / width
        self.reps = reps

    def _burn(self, x: Any) -> None:
        for _ in range(self.reps):
            x @ self.m

    def forward(self, x: Any) -> tuple[Any, Any]:
        self._burn(x)
        return x.copy(), None

    def backward(self, ctx: Any, gy: Any) -> Any:
        self._burn(gy)
        return gy.copy()


def uneven_model(width: int) -> Sequential:
    """Costs (in matmuls of width x width) 4, 4, 6, 1, 1, 1, 1; parameters
    4, 4, 0, 1, 1, 1, 1: uniform, parameters and time cut it differently."""
    rng = np.random.default_rng(0)
    w = width
    return Sequential(Linear(w, 4 * w, rng), Linear(4 * w, w, rng), Burn(w, 6),
                      *[Linear(w, w, rng) for _ in range(4)])


def _worker(world: Any, width: int, rows: int, m: int, steps: int, rounds: int
            ) -> list[dict[str, Any]]:
    import collectives
    x = np.random.default_rng(1).standard_normal((rows, width))
    y = np.zeros((rows, width))
    jobs = []
    for i, (balance, sched) in enumerate([("time", "1f1b"), ("uniform", "1f1b"),
                                          ("parameters", "1f1b"), ("time", "auto")]):
        job = distribute(uneven_model(width), world, schedule=sched, balance=balance,
                         microbatches=None if sched == "auto" else m, sample=x,
                         loss_fn=mse_loss, verbose=False, timeout=120, tag_base=i << 20)
        jobs.append((balance, sched, job))
    per = max(1, -(-steps // rounds))
    preds: list[list[float]] = [[] for _ in jobs]
    stretch: list[list[list[float]]] = [[] for _ in jobs]
    spans: list[list[tuple[float, float, int]]] = [[] for _ in jobs]
    records: list[tuple[list[Any], list[Any]]] = [([], []) for _ in jobs]
    for r in range(rounds):
        for k, (_, _, job) in enumerate(jobs):
            job.retime()                     # its stages timed again, right before its steps
            preds[k].append(job.predicted or 0.0)
            stretch[k].append(job.stretch or [])
            for i in range(per + 1):         # the first step warms up (the re-time ran copies)
                collectives.barrier(world)
                t0 = time.time()
                job.step(x, y)
                t1 = time.time()
                if i:
                    spans[k].append((t0, t1, r))
                    row, acts = step_record(job.pipeline, t0, t1)
                    records[k][0].append(row)
                    records[k][1].append(acts)
                for g in job.grads():
                    g[...] = 0
    in_step = [_in_step(world, job, *records[k]) for k, (_, _, job) in enumerate(jobs)]
    return [{"balance": b, "schedule": job.schedule.name, "counts": job.counts,
             "predicted": statistics.median(preds[k]), "rounds": preds[k],
             "in_step": {**in_step[k], "stretch": stretch[k]},
             "summed": job.chosen.summed if job.chosen else None,
             "profiled": job.profiled.makespan if job.profiled else None,
             "helper": job.calibration.helper_measured if job.calibration else 0.0,
             "charged": bool(job.calibration and job.calibration.crowded),
             "executor": ((job.calibration.action, job.calibration.message,
                           job.calibration.receive) if job.calibration else (0.0, 0.0, 0.0)),
             "spans": spans[k]}
            for k, (b, _, job) in enumerate(jobs)]


def _in_step(world: Any, job: Any, rows: list[Any], acts: list[Any]) -> dict[str, Any]:
    """The job's steps taken apart as the simulator's figures
    (engine.calibrate.step_figures over every rank's step records) beside
    those of its prediction: the step the simulator gives from the steps'
    own figures, the steps' compute over the predicted compute (the
    prediction's per-stage costs less its per-action cost and mesh-thread
    charge, summed over the kinds the schedule runs), and the steps'
    per-action, message and receive times."""
    import collectives
    fig = step_figures(job.chosen.schedule, [
        (ranks, r, a, host) for ranks, r, a, host in collectives.all_gather_object(
            world, (job.grid.group("pp").ranks, rows, acts, socket.gethostname()))])
    cal = job.calibration
    # (the charge the prediction holds: none once Job.retime measured the
    # executor's costs, whatever helper its calibration says)
    charge = job.chosen.charge or [0.0] * job.chosen.schedule.num_stages
    pred = sum(job.chosen.costs[k][s] - cal.action - (charge[s] if k != "W" else 0.0)
               for k in "FBIW" for s, c in enumerate(fig.compute[k]) if c)
    # (None where the prediction's compute less its per-action cost and charge
    # is not positive: layers of a few microseconds on a loaded host, no ratio)
    return {"simulated": fig.simulated, "compute": sum(sum(v) for v in fig.compute.values())
            / pred if pred > 0 else None, "action": fig.action, "message": fig.message,
            "receive": fig.receive}


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _one_thread() -> dict[str, str]:
    """The ranks' environment: single-threaded BLAS unless the caller set
    otherwise (given to mesh.spawn: the caller's own environment is left as
    it was, for what it runs next)."""
    return {k: os.environ.get(k, "1") for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def run_balance(width: int = 256, rows: int = 256, m: int = 8, steps: int = 7,
                rounds: int = 3) -> list[dict[str, Any]]:
    """Measure each job on 2 processes; rows of predicted and measured ms.
    In each of ``rounds`` rounds every job in turn is re-timed
    (``Job.retime``), then runs one step to warm up and ``ceil(steps /
    rounds)`` timed steps; ``predicted_ms`` is the median of its rounds'
    predictions, ``measured_ms`` the median of all its timed steps, and
    ``rounds`` each round's median step over that round's prediction: the
    load on a shared host moves from one second to the next (a dry run's
    actions got 50% of a core while the steps a few seconds later got 85%,
    BENCHMARKS.md, eleventh session), so a prediction is set beside the
    steps that ran at its moment."""
    import mesh
    results = mesh.spawn(_worker, 2, width, rows, m, steps, rounds, timeout=600,
                         env=_one_thread())
    report = []
    for k, row in enumerate(results[0]):
        n = len(row["spans"])
        per_step = [(max(r[k]["spans"][s][1] for r in results) -
                     min(r[k]["spans"][s][0] for r in results), row["spans"][s][2])
                    for s in range(n)]
        by_round = [statistics.median(t for t, rr in per_step if rr == i) / p
                    for i, p in enumerate(row["rounds"])]
        report.append({"balance": row["balance"], "schedule": row["schedule"],
                       "counts": row["counts"], "predicted_ms": row["predicted"] * 1e3,
                       "rounds": by_round, "in_step": row["in_step"],
                       "profiled_ms": (row["profiled"] or row["predicted"]) * 1e3,
                       "summed_ms": (row["summed"] or row["predicted"]) * 1e3,
                       "helper_us": row["helper"] * 1e6, "charged": row["charged"],
                       "action_us": row["executor"][0] * 1e6,
                       "message_us": row["executor"][1] * 1e6,
                       "receive_us": row["executor"][2] * 1e6,
                       "measured_ms": statistics.median(t for t, _ in per_step) * 1e3})
    return report


def balance_table(report: list[dict[str, Any]]) -> str:
    """``predicted``: the median of the rounds' predictions (stages timed
    again right before each round's steps: Job.retime); ``by round``: each
    round's median step over its prediction; ``profile``: distribute's
    prediction; ``summed``: its layers' sums; ``action/msg/recv``: the
    executor's cost per compute action, per message and the least per
    receive of the last round (Job.retime's dry run of the job's
    schedule)."""
    lines = [f"{'balance':<11} {'schedule':<22} {'layers/stage':<13} {'predicted ms':>12} "
             f"{'measured ms':>12} {'meas/pred':>9} {'by round':<17} {'profile ms':>10} "
             f"{'meas/prof':>9} {'summed ms':>9} {'meas/summed':>11} {'action/msg/recv us':>18}"]
    for r in report:
        counts = " ".join(str(c) for c in r["counts"])
        rounds = " ".join(f"{x:.2f}" for x in r.get("rounds", []))
        lines.append(f"{r['balance']:<11} {r['schedule']:<22} {counts:<13} "
                     f"{r['predicted_ms']:>12.1f} {r['measured_ms']:>12.1f} "
                     f"{r['measured_ms'] / r['predicted_ms']:>9.3f} {rounds:<17} "
                     f"{r['profiled_ms']:>10.1f} "
                     f"{r['measured_ms'] / r['profiled_ms']:>9.3f} {r['summed_ms']:>9.1f} "
                     f"{r['measured_ms'] / r['summed_ms']:>11.3f} "
                     f"{r.get('action_us', 0):>6.0f}/{r.get('message_us', 0):.0f}/"
                     f"{r.get('receive_us', 0):.0f}")
    lines.append("the steps taken apart (engine.calibrate.step_figures): the step simulated from "
                 "their own figures; their compute over the last round's predicted; "
                 "action/msg/recv us in them; each round's stretch per stage")
    lines.append(f"{'balance':<11} {'schedule':<22} {'sim ms':>8} {'meas/sim':>8} "
                 f"{'compute s/p':>11} {'action/msg/recv us':>18}  stretch by round")
    for r in report:
        st = r.get("in_step")
        if not st:
            continue
        stretch = " | ".join(" ".join(f"{x:.2f}" for x in each)
                             for each in st.get("stretch", []))
        lines.append(f"{r['balance']:<11} {r['schedule']:<22} {st['simulated'] * 1e3:>8.1f} "
                     f"{r['measured_ms'] / (st['simulated'] * 1e3):>8.3f} "
                     f"{_ratio(st['compute']):>11} "
                     f"{st['action'] * 1e6:>6.0f}/{st['message'] * 1e6:.0f}/"
                     f"{st['receive'] * 1e6:.0f}  {stretch}")
    h = report[0] if report else None
    if h is not None:
        lines.append(f"mesh threads' CPU per message end {h['helper_us']:.0f} us, "
                     + ("charged to the computing ranks in the choice (no spare core)"
                        if h["charged"] else "not charged (a spare core)")
                     + "; in predicted, each stage's stretch holds it")
    return "\n".join(lines)


def _overrun_worker(world: Any, width: int, rows: int, rounds: int,
                    spans: tuple[tuple[int, int], ...]) -> list[Any]:
    layers = uneven_model(width).layers
    xs = [np.random.default_rng(1).standard_normal((rows, width))]
    for layer in layers:
        xs.append(layer.forward(xs[-1])[0])
    out = []
    for first, stop in spans:
        items = [(Sequential(*layers[first:stop]), xs[first])] + \
            [(layers[i], xs[i]) for i in range(first, stop)]
        times: list[list[Any]] = [[] for _ in items]
        for r in range(rounds):
            for j in range(len(items)):
                stage, x = items[(j + r) % len(items)]
                times[(j + r) % len(items)].append(time_layer(stage, x, clock=time.thread_time)[0])
        med = [{k: statistics.median(getattr(c, k) for c in t) for k in "FBIW"} for t in times]
        out.append([[first, stop], {k: med[0][k] / sum(m[k] for m in med[1:]) for k in "FBIW"}])
    return out


def stage_overrun(width: int = 256, rows: int = 32, rounds: int = 9,
                  spans: tuple[tuple[int, int], ...] = ((0, 2), (2, 7), (1, 7), (0, 3), (3, 7))
                  ) -> list[tuple[tuple[int, int], dict[str, float]]]:
    """Per stage of ``uneven_model`` (layers first..stop-1), its F, B, I and W
    timed whole over the sum of its layers timed one by one: the median of
    ``rounds`` rounds, each timing the stage and its layers in a rotated
    order, in thread CPU time (others' load preempts the wall, not this), in
    one child process with single-threaded BLAS (else the BLAS threads'
    CPU would be missed)."""
    import mesh
    rows_out = mesh.spawn(_overrun_worker, 1, width, rows, rounds, spans, timeout=600,
                          env=_one_thread())[0]
    return [((int(a), int(b)), ratios) for (a, b), ratios in rows_out]


PLAN = {"0": "colwise", "2": "rowwise", "4": "colwise", "6": "rowwise"}


def _mlp(width: int) -> Any:
    import torch
    torch.manual_seed(0)
    w, nn = width, torch.nn
    return nn.Sequential(nn.Linear(w, 4 * w), nn.GELU(), nn.Linear(4 * w, w), nn.GELU(),
                         nn.Linear(w, 4 * w), nn.GELU(), nn.Linear(4 * w, w))


def _mesh_tp_worker(world: Any, width: int, rows: int, steps: int) -> list[tuple[float, float]]:
    import torch

    import collectives
    import mesh
    torch.set_num_threads(1)
    grid = mesh.grid(world, pp=1, tp=world.size)
    job = distribute(_mlp(width), grid, plan=PLAN, schedule="1f1b", microbatches=1,
                     balance="uniform", loss_fn=torch.nn.functional.mse_loss, verbose=False)
    opt = torch.optim.SGD(job.parameters(), lr=1e-3)
    x, y = torch.ones(rows, width), torch.zeros(rows, width)
    spans = []
    for _ in range(steps + 1):
        collectives.barrier(world)
        t0 = time.time()
        opt.zero_grad()
        job.step(x, y)
        opt.step()
        spans.append((t0, time.time()))
    return spans[1:]


def _torch_tp_worker(rank: int, n: int, init_file: str, width: int, rows: int, steps: int,
                     conn: Any) -> None:
    import traceback
    try:
        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                       parallelize_module)
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=n)
        model = _mlp(width)
        styles: dict[str, Any] = {k: ColwiseParallel() if v == "colwise" else RowwiseParallel()
                                  for k, v in PLAN.items()}
        parallelize_module(model, init_device_mesh("cpu", (n,)), styles)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x, y = torch.ones(rows, width), torch.zeros(rows, width)
        spans = []
        for _ in range(steps + 1):
            dist.barrier()
            t0 = time.time()
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            spans.append((t0, time.time()))
        dist.destroy_process_group()
        conn.send((True, spans[1:]))
    except BaseException:
        conn.send((False, traceback.format_exc()))


def run_tp(n: int = 2, width: int = 256, rows: int = 64, steps: int = 7) -> dict[str, float]:
    """The same 4-Linear MLP at tp=n: engine.distribute's plan on meshrun, and
    torch's parallelize_module over gloo; median ms per SGD step of each."""
    import mesh

    def median(spans: list[list[tuple[float, float]]]) -> float:
        return statistics.median(max(r[s][1] for r in spans) - min(r[s][0] for r in spans)
                                 for s in range(steps)) * 1e3

    ours = median(mesh.spawn(_mesh_tp_worker, n, width, rows, steps, timeout=300))
    theirs = median(run_workers(_torch_tp_worker, n, (width, rows, steps), "torch tp"))
    return {"meshrun_ms": ours, "torch_ms": theirs}


def train_3d_example() -> Any:
    """examples/train_3d.py of a source checkout, as a module (its TinyGPT,
    PLAN, batch and loss_fn), or None where the package runs without it."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_3d.py"
    spec = importlib.util.spec_from_file_location("train_3d", path) if path.exists() else None
    if spec is None or spec.loader is None:
        return None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tp_predicted_worker(world: Any, width: int, rows: int, steps: int, rounds: int,
                         schedule: str, model: str) -> dict[str, Any]:
    import torch

    import collectives
    import mesh
    torch.set_num_threads(1)
    grid = mesh.grid(world, pp=2, tp=2)
    if model == "gpt":
        t3 = train_3d_example()
        torch.manual_seed(0)
        x, y = t3.batch(0, 16)
        job = distribute(t3.TinyGPT(), grid, plan=t3.PLAN, sample=x, loss_fn=t3.loss_fn,
                         schedule=schedule, verbose=False)
    else:
        x, y = torch.randn(rows, width, generator=torch.Generator().manual_seed(1)), \
            torch.zeros(rows, width)
        job = distribute(_mlp(width), grid, plan=PLAN, sample=x, schedule=schedule,
                         loss_fn=torch.nn.functional.mse_loss, verbose=False)
    opt = torch.optim.SGD(job.parameters(), lr=1e-3)
    per = max(1, -(-steps // rounds))
    preds, meas = [], []
    for _ in range(rounds):
        job.retime()                  # its stages timed again, right before its steps
        preds.append(job.predicted or 0.0)
        spans = []
        for i in range(per + 1):      # the first step warms up (the re-time ran copies)
            opt.zero_grad()
            collectives.barrier(world)
            t0 = time.time()
            job.step(x, y)
            if i:
                spans.append((t0, time.time()))
            opt.step()
        every = collectives.all_gather_object(world, spans)
        meas.append(statistics.median(max(r[k][1] for r in every) - min(r[k][0] for r in every)
                                      for k in range(per)))
    return {"schedule": job.schedule.name, "profiled": job.profiled.makespan if job.profiled
            else 0.0, "predicted": preds, "measured": meas,
            "calls": {f"{k}{s}": len(v) for (s, k), v in sorted(job.tp_calls.items())},
            "stretch": job.stretch or []}


def run_tp_predicted(width: int = 256, rows: int = 64, steps: int = 9, rounds: int = 3,
                     schedule: str = "auto", model: str = "mlp") -> dict[str, Any]:
    """pp=2 x tp=2 (4 ranks): ``engine.distribute(plan=..., schedule=...)``
    of the 4-Linear MLP with PLAN (``model="mlp"``) or train_3d's TinyGPT
    with its plan (``"gpt"``: a source checkout's example); per round, the
    prediction after ``Job.retime`` (the sharded stages timed with their tp
    collectives) and the median measured step; beside them the prediction
    from the unsharded profile alone (its times over tp: the tp collectives
    left out); the tp collectives of each (stage, kind) of action on rank
    0, and its stretch."""
    import mesh
    out: dict[str, Any] = mesh.spawn(_tp_predicted_worker, 4, width, rows, steps, rounds,
                                     schedule, model, timeout=600)[0]
    return out


def _seq_model(width: int, blocks: int) -> Any:
    """Pre-norm MLP blocks (torch): x + down(tanh(up(norm(x))))."""
    import torch
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(width)
            self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

        def forward(self, x: Any) -> Any:
            return x + self.down(torch.tanh(self.up(self.ln(x))))
    torch.manual_seed(0)
    return nn.Sequential(*[Block() for _ in range(blocks)])


SEQ_PLAN = {"*.ln": "sequence", "*.up": {"style": "colwise", "input": "sequence"},
            "*.down": {"style": "rowwise", "output": "sequence"}}


def _tp_sums_worker(world: Any, width: int, m: int, steps: int) -> dict[str, float]:
    import torch

    import collectives
    import mesh

    from . import schedules
    from .executor import Pipeline
    from .tensor_parallel import parallelize
    from .torch_stage import TorchStage, torch_loss
    from .tp_sums import TpSums
    torch.set_num_threads(1)
    grid = mesh.grid(world, pp=2, tp=2)
    blocks = 4
    model = _seq_model(width, blocks)
    half = blocks // 2
    module = model[grid.coord("pp") * half:(grid.coord("pp") + 1) * half]
    parallelize(module, grid.group("tp"), SEQ_PLAN, strict=False)
    pipe = Pipeline(grid, TorchStage(module), schedules.by_name("1f1b", 2, m),
                    loss_fn=torch_loss(torch.nn.functional.mse_loss), timeout=120)
    once, hooks = pipe.tp_sums, TpSums(pipe.stages, enabled=False)
    x = torch.randn(2 * m, 8, width, generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {"once": [], "hooks": []}
    for i in range(2 * steps + 2):        # alternated; the first of each warms up
        key = "once" if i % 2 == 0 else "hooks"
        pipe.tp_sums = once if key == "once" else hooks
        collectives.barrier(world)
        t0 = time.perf_counter()
        pipe.step(x if pipe.first else None, x if pipe.last else None)
        collectives.barrier(world)
        if i >= 2:
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run_tp_sums(width: int = 64, m: int = 8, steps: int = 9) -> dict[str, float]:
    """pp=2 x tp=2 (4 ranks), four pre-norm MLP blocks sequence-parallel
    (SEQ_PLAN), 1F1B over ``m`` micro-batches: the median step (barrier to
    barrier) with the norms' gradient sums once a step (TpSums) and once
    per backward (the hooks), alternated in one run."""
    import mesh
    out: dict[str, float] = mesh.spawn(_tp_sums_worker, 4, width, m, steps, timeout=600)[0]
    return out
