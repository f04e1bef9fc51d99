"""Timings for the cost model (collectives.model): several collectives at
several sizes in one job, as collectives.tools.bench times them (same input
arrays, warm-up, barrier, the slowest rank's mean per call), repeated in
interleaved rounds and reduced to the median round, since the machine is
shared and a round can be hit by another job.

    python -m collectives.tools.sweep -n 8 --path socket

prints one JSON line per (op, size): ``{"path", "op", "n", "size", "bytes",
"t", "share", "ran"}`` with ``size`` as asked, ``bytes`` the nccl-tests size
run (the all_gather output, a multiple of n), ``t`` seconds, and ``share``
the compute share one rank got while it ran. Before
and after each row all ranks run the same small numpy loop at once; a
round's share is that loop's time on an idle core (the fastest of many short
runs in the parent) over the slowest rank's time, so 8 ranks on 2 cores get
at most 0.25, less when other jobs take CPU. ``t`` is the median round and
``share`` is such that ``t * share`` is the median of the rounds' time x
share (time normalized to a whole core, paired round by round). ``ran`` is
the same from the kernel's scheduler statistics over the timed calls (time
on a CPU / time on a CPU or runnable, all threads, mean over ranks): the
one the model uses (collectives.model.costs.row_share), since the probe
reads 0.6-0.8 for 2 ranks on 2 idle cores where ``ran`` reads 0.95.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Sequence

import numpy as np

from mesh.cliargs import checked, names_in, positive

from .bench import _make, input_count, parse_sizes

__all__ = ["PATH_ENV", "OPS", "SIZES", "plan", "probe", "probe_reference", "measure", "main"]

PATH_ENV = {"board": {"MESH_CMA": "1"}, "socket": {"MESH_CMA": "0"}}
"""The host paths a job can be put on: same-host memory (the default on one
host) or the sockets (what ranks on different hosts use)."""

OPS = ("all_reduce", "broadcast", "all_gather")
SIZES = (8, 1 << 10, 16 << 10, 256 << 10, 2 << 20, 16 << 20)


def plan(op: str, size: int, n: int, itemsize: int = 4) -> tuple[int, int, int, int]:
    """(input count, nccl-tests bytes, timed calls, warm-up calls) of one
    row: about 32 MiB moved per rank and round, 3 to 40 calls."""
    count = input_count(op, size, itemsize, n)
    nbytes = count * itemsize * (n if op == "all_gather" else 1)
    iters = max(3, min(40, (32 << 20) // max(nbytes, 1)))
    return count, nbytes, iters, 1 + iters // 8


_PROBE_REPS = 1000


def probe(reps: int = _PROBE_REPS) -> float:
    """Seconds of a fixed CPU-bound loop (numpy adds on a 64 KiB array)."""
    a = np.zeros(16384, np.float32)
    t0 = time.perf_counter()
    for _ in range(reps):
        np.add(a, a, out=a)
    return time.perf_counter() - t0


def probe_reference(pieces: int = 200) -> float:
    """``probe()``'s time on an idle core: the fastest of many short pieces,
    scaled up (a short piece is rarely interrupted by other jobs)."""
    per = max(1, _PROBE_REPS // 100)
    return min(probe(per) for _ in range(pieces)) * _PROBE_REPS / per


def cpu_wait() -> tuple[int, int]:
    """(nanoseconds on a CPU, nanoseconds runnable but waiting for one) of
    all this process's threads so far (Linux schedstat; zeros elsewhere)."""
    run = wait = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0, 0
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/schedstat") as f:
                a, b, _ = f.read().split()
        except (OSError, ValueError):
            continue
        run, wait = run + int(a), wait + int(b)
    return run, wait


def _worker(world: Any, rows: list[tuple[str, int, int, int]], rounds: int
            ) -> list[list[tuple[float, float, float]]]:
    """(seconds per call, probe seconds) of every row, per round (rows
    interleaved in each round)."""
    import collectives as C

    arrays = [_make(np, op, count, "float32", world.size, world.rank)
              for op, count, _, _ in rows]
    out: list[list[tuple[float, float, float]]] = [[] for _ in rows]
    for _ in range(rounds):
        for i, (op, _, iters, warmup) in enumerate(rows):
            fn, a = getattr(C, op), arrays[i]
            for _ in range(warmup):
                fn(world, a)
            C.barrier(world)
            busy = probe()
            C.barrier(world)
            r0, w0 = cpu_wait()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn(world, a)
            dt = (time.perf_counter() - t0) / iters
            r1, w1 = cpu_wait()
            ran = (r1 - r0) / max(1, (r1 - r0) + (w1 - w0))
            out[i].append((dt, (busy + probe()) / 2, ran))
    C.barrier(world)
    return out


def measure(path: str, n: int, ops: Sequence[str] = OPS, sizes: Sequence[int] = SIZES,
            rounds: int = 3, timeout: float = 1800) -> list[dict]:
    """One job of ``n`` ranks on ``path``: per (op, size) the median over
    ``rounds`` of the slowest rank's time per call, and of the share."""
    import mesh

    ref = probe_reference()
    rows, meta = [], []
    for op in ops:
        for size in sizes:
            count, nbytes, iters, warmup = plan(op, size, n)
            rows.append((op, count, iters, warmup))
            meta.append((op, size, nbytes))
    per_rank = mesh.spawn(_worker, n, rows, rounds, timeout=timeout, env=PATH_ENV[path])
    res = []
    for i, (op, size, nbytes) in enumerate(meta):
        slowest = [max(r[i][k][0] for r in per_rank) for k in range(rounds)]
        shares = [min(1.0, ref / max(r[i][k][1] for r in per_rank)) for k in range(rounds)]
        ran = [statistics.mean(r[i][k][2] for r in per_rank) for k in range(rounds)]
        t = statistics.median(slowest)
        whole_core = statistics.median(a * b for a, b in zip(slowest, shares))
        ran_core = statistics.median(a * b for a, b in zip(slowest, ran))
        res.append({"path": path, "op": op, "n": n, "size": size, "bytes": nbytes, "t": t,
                    "share": whole_core / t, "ran": ran_core / t})
    return res


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m collectives.tools.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--nprocs", type=positive, default=2)
    ap.add_argument("--path", choices=tuple(PATH_ENV), default="board")
    ap.add_argument("--rounds", type=positive, default=3)
    ap.add_argument("--ops", default=",".join(OPS), type=names_in(OPS))
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), type=checked(parse_sizes),
                    help="a,b,c or lo:hi")
    args = ap.parse_args(argv)
    for row in measure(args.path, args.nprocs, args.ops, args.sizes, args.rounds):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
