"""The torch side of ``engine.bench``: torch.distributed.pipelining's
Schedule1F1B over gloo, on the same sleep workload, timed the same way
(a barrier before each step; latest end minus earliest start; median).

torch is imported only here and only in the worker processes.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import tempfile
import time
import traceback
from typing import Any

__all__ = ["available", "run", "run_workers"]


def available() -> bool:
    """Whether torch with gloo and torch.distributed.pipelining imports here."""
    try:
        import torch.distributed as dist
        import torch.distributed.pipelining  # noqa: F401
    except ImportError:
        return False
    return bool(dist.is_available() and dist.is_gloo_available())


def _worker(rank: int, p: int, init_file: str, m: int, f: float, b: float, steps: int,
            rows: int, width: int, conn: Any) -> None:
    try:
        import torch
        import torch.distributed as dist
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=p)

        class Sleep(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, x: Any) -> Any:
                time.sleep(f)
                return x.clone()

            @staticmethod
            def backward(ctx: Any, g: Any) -> Any:
                time.sleep(b)
                return g.clone()

        class SleepModule(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.w = torch.nn.Parameter(torch.ones(1))

            def forward(self, x: Any) -> Any:
                return Sleep.apply(x * self.w)

        stage = PipelineStage(SleepModule(), rank, p, torch.device("cpu"))
        sched = Schedule1F1B(stage, m, loss_fn=lambda y, t: ((y - t) ** 2).mean())
        batch = torch.ones(rows // m * m, width)
        spans = []
        for _ in range(steps + 1):
            dist.barrier()
            t0 = time.time()
            if rank == 0:
                sched.step(batch)
            elif rank == p - 1:
                sched.step(target=batch, losses=[])
            else:
                sched.step()
            spans.append((t0, time.time()))
        dist.barrier()
        dist.destroy_process_group()
        conn.send((True, spans[1:]))
    except BaseException:
        conn.send((False, traceback.format_exc()))
    finally:
        conn.close()


def run_workers(target: Any, n: int, args: tuple, what: str, timeout: float = 300) -> list[Any]:
    """Run ``target(rank, n, init_file, *args, conn)`` on ``n`` fresh processes
    (a gloo group meets at ``file://init_file``); each sends ``(ok, payload)``.
    Payloads by rank; a failure or a rank late past ``timeout`` raises, naming
    it, and every process is ended."""
    ctx = mp.get_context("spawn")
    fd, init_file = tempfile.mkstemp(prefix="meshrun-bench-gloo-")
    os.close(fd)
    os.unlink(init_file)
    procs, conns = [], []
    try:
        for r in range(n):
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=target, daemon=True, args=(r, n, init_file, *args, child))
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)
        results = []
        deadline = time.monotonic() + timeout
        for r, conn in enumerate(conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"{what} rank {r} did not finish in {timeout:g}s")
            ok, payload = conn.recv()
            if not ok:
                raise RuntimeError(f"{what} rank {r} failed:\n{payload}")
            results.append(payload)
        return results
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        if os.path.exists(init_file):
            os.unlink(init_file)


def run(p: int, m: int, f: float, b: float, steps: int, rows: int, width: int,
        timeout: float = 300) -> float:
    """Median step time in seconds of Schedule1F1B on ``p`` gloo processes."""
    results = run_workers(_worker, p, (m, f, b, steps, rows, width), "torch bench", timeout)
    per_step = [max(r[s][1] for r in results) - min(r[s][0] for r in results)
                for s in range(steps)]
    return statistics.median(per_step)
