"""What a GPU host costs the device paths, measured apart from them:

    python3 tools/gpu_probe.py costs          one process: event, sync, copy, sleep
    python3 tools/gpu_probe.py contend N      N processes on GPU 0 at once: 8 B copies
    python3 tools/gpu_probe.py profile PATH SIZE N   cProfile of rank 0 in all_reduce
"""
from __future__ import annotations

import cProfile
import io
import multiprocessing as mp
import pstats
import sys
import time
from typing import Any

import numpy as np


def _per(fn: Any, reps: int = 2000) -> float:
    for _ in range(20):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e6


def costs() -> None:
    import cupy as cp
    s = cp.cuda.Stream(non_blocking=True)
    a = cp.zeros(2, cp.float32)
    pinned = cp.cuda.alloc_pinned_memory(4096)
    host = np.frombuffer(pinned, np.float32, 2)

    def ev_done() -> None:
        e = cp.cuda.Event(disable_timing=True)
        e.record(s)
        while not e.done:
            pass

    def d2h() -> None:
        cp.cuda.runtime.memcpyAsync(host.ctypes.data, a.data.ptr, 8, 4, s.ptr)
        s.synchronize()

    def kern() -> None:
        with s:
            cp.add(a, a, out=a)
        s.synchronize()
    rows = {"event record + poll done": ev_done, "8 B D2H + stream sync": d2h,
            "tiny kernel + stream sync": kern,
            "time.sleep(0)": lambda: time.sleep(0),
            "time.sleep(20e-6)": lambda: time.sleep(20e-6)}
    for name, fn in rows.items():
        print(f"costs  {name:28s} {_per(fn, 500):9.1f} us")


def _contender(q: Any, start: Any) -> None:
    import cupy as cp
    s = cp.cuda.Stream(non_blocking=True)
    a = cp.zeros(2, cp.float32)
    pinned = cp.cuda.alloc_pinned_memory(4096)
    host = np.frombuffer(pinned, np.float32, 2)

    def d2h() -> None:
        cp.cuda.runtime.memcpyAsync(host.ctypes.data, a.data.ptr, 8, 4, s.ptr)
        s.synchronize()
    d2h()
    start.wait()
    q.put(_per(d2h, 300))


def contend(n: int) -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start = ctx.Event()
    ps = [ctx.Process(target=_contender, args=(q, start)) for _ in range(n)]
    for p in ps:
        p.start()
    time.sleep(3)
    start.set()
    got = sorted(q.get(timeout=60) for _ in ps)
    for p in ps:
        p.join()
    print(f"contend {n} processes, 8 B D2H + sync each: " + " ".join(f"{g:.0f}" for g in got)
          + " us")


def _profiled(world: Any, size: int) -> str:
    import cupy as cp

    import collectives as C
    a = cp.zeros(max(1, size // 4), cp.float32)
    for _ in range(20):
        C.all_reduce(world, a)
    reps = 200
    prof = cProfile.Profile() if world.rank == 0 else None
    C.barrier(world)
    t = time.perf_counter()
    if prof:
        prof.enable()
    for _ in range(reps):
        C.all_reduce(world, a)
    if prof:
        prof.disable()
    dt = (time.perf_counter() - t) / reps * 1e6
    if not prof:
        return ""
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
    return f"{dt:.1f} us per call (profiled)\n" + "\n".join(
        line[:150] for line in out.getvalue().splitlines() if line.strip())


def profile(path: str, size: int, n: int) -> None:
    import mesh
    from collectives.tools.bench import path_env
    res = mesh.spawn(_profiled, n, size, timeout=120, env=path_env(path))
    print(f"profile {path} {size} B {n} ranks, rank 0: {res[0]}")


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "costs":
        costs()
    elif what == "contend":
        contend(int(sys.argv[2]))
    elif what == "profile":
        profile(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
