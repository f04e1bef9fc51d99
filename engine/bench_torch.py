"""The torch side of ``engine.bench``: torch.distributed.pipelining's
Schedule1F1B over gloo, on the same sleep workload, timed the same way
(a barrier before each step; latest end minus earliest start; median).

torch is imported only here and only in the worker processes.
"""
from __future__ import annotations

import statistics
import time
import traceback
from typing import Any

from collectives.tools.bench_gloo import run_workers

__all__ = ["available", "run"]


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


def run(p: int, m: int, f: float, b: float, steps: int, rows: int, width: int,
        timeout: float = 300) -> float:
    """Median step time in seconds of Schedule1F1B on ``p`` gloo processes."""
    results = run_workers(_worker, p, (m, f, b, steps, rows, width), "torch bench", timeout)
    per_step = [max(r[s][1] for r in results) - min(r[s][0] for r in results)
                for s in range(steps)]
    return statistics.median(per_step)
