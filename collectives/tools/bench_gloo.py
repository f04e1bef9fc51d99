"""The torch.distributed (gloo) side of ``collectives.tools.bench``: the same
collectives, sizes and timing loop, so each row can be compared in one run.

torch is imported only inside the worker processes; it is never a
dependency of meshrun.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
import traceback
import warnings
from typing import Any, Callable

__all__ = ["available", "run_gloo", "run_workers"]


def available() -> bool:
    """Whether torch with the gloo backend can be imported here."""
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return bool(dist.is_available() and dist.is_gloo_available())


def _op_fn(op: str, t: Any, n: int, rank: int, poll: bool = False) -> Callable[[], Any]:
    import torch
    import torch.distributed as dist

    if op == "all_reduce" and poll:
        from .bench import polled
        return lambda: polled(dist.all_reduce(t, async_op=True), "is_completed")
    if op == "all_reduce":
        return lambda: dist.all_reduce(t)
    if op == "broadcast":
        return lambda: dist.broadcast(t, 0)
    if op == "reduce":
        return lambda: dist.reduce(t, 0)
    if op == "all_gather":
        out = torch.empty((n * t.numel(),), dtype=t.dtype, device=t.device)
        return lambda: dist.all_gather_into_tensor(out, t)
    if op == "reduce_scatter":
        out = torch.empty((t.numel() // n,), dtype=t.dtype, device=t.device)
        return lambda: dist.reduce_scatter_tensor(out, t)
    if op == "all_to_all":
        out = torch.empty_like(t)
        return lambda: dist.all_to_all_single(out, t)
    if op == "gather":
        lst = [torch.empty_like(t) for _ in range(n)] if rank == 0 else None
        return lambda: dist.gather(t, lst, dst=0)
    if op == "scatter":
        out = torch.empty((t.numel() // n,), dtype=t.dtype, device=t.device)
        lst = list(t.chunk(n)) if rank == 0 else None
        return lambda: dist.scatter(out, lst, src=0)
    if op == "barrier":
        return lambda: dist.barrier()
    raise ValueError(f"no gloo equivalent for {op!r}")


def _worker(rank: int, n: int, init_file: str, op: str, rows: list[tuple[int, int, int]],
            dtype: str, device: str, poll: bool, conn: Any) -> None:
    try:
        import torch
        import torch.distributed as dist

        warnings.filterwarnings("ignore", category=FutureWarning)
        dev = "cpu"
        if device == "cuda":
            dev = f"cuda:{rank % torch.cuda.device_count()}"
            torch.cuda.set_device(dev)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=n)
        times: list[float | str] = []
        for count, iters, warmup in rows:
            t = torch.ones((count,), dtype=getattr(torch, dtype), device=dev)
            try:
                fn = _op_fn(op, t, n, rank, poll)
                for _ in range(warmup):
                    fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) / iters)
            except RuntimeError as e:
                times.append(f"{type(e).__name__}: {str(e).splitlines()[0]}")
        dist.barrier()
        dist.destroy_process_group()
        conn.send((True, times))
    except BaseException:
        conn.send((False, traceback.format_exc()))


def run_gloo(op: str, n: int, rows: list[tuple[int, int, int]], dtype: str = "float32",
             device: str = "cpu", timeout: float = 900.0,
             poll: bool = False) -> list[list[float | str]]:
    """Run ``op`` on n gloo ranks for each (input count, iters, warmup) row;
    return, per rank, the seconds per call of every row (or the error text
    of a row gloo cannot do). ``poll``: all_reduce waited for by polling
    its Work's is_completed()."""
    return run_workers(_worker, n, (op, rows, dtype, device, poll), "gloo", timeout)


def _context() -> Any:
    """Fresh interpreters, as a torch job's own ranks start; with
    MESH_BENCH_START=server, forks of mesh.spawn's fork server, where torch
    is imported once if MESH_SPAWN_PRELOAD names it (the test suite's smoke
    runs: a fresh rank imported pytest and torch anew, 4-5 s of CPU)."""
    how = os.environ.get("MESH_BENCH_START", "spawn")
    if how == "server":
        from mesh.spawn import _fresh_context
        return _fresh_context()
    if how != "spawn":
        raise ValueError(f"MESH_BENCH_START={how!r}: expected 'spawn' or 'server'")
    return mp.get_context("spawn")


def run_workers(target: Any, n: int, args: tuple, what: str, timeout: float = 300) -> list[Any]:
    """Run ``target(rank, n, init_file, *args, conn)`` on ``n`` fresh processes
    (a gloo group meets at ``file://init_file``); each sends ``(ok, payload)``.
    Payloads by rank; a failure or a rank late past ``timeout`` raises, naming
    it, and every process is ended. (Also engine.bench_torch's and
    engine.bench_distribute's torch side.)"""
    ctx = _context()
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
