"""Writing one file from every rank's slice, three ways, four ranks on one
host in one spawn, the ways alternating trial by trial:

    python tools/bench_file.py [TRIALS] [MiB] [DIR] [--sync]

- ``write_at_all``: collectives.File.open(g, path, "w"), each rank's
  slice by write_at_all at its offset, close;
- ``memmap``: the recipe before File: rank 0 makes the file at its full
  size, a barrier, each rank np.memmap-s its slice ("r+", its offset),
  copies into it and drops it, a barrier;
- ``gather``: C.gather to rank 0, which writes the whole file.

Each trial starts with the file gone and ends when every rank is done
(``--sync``: after an fsync of the file, every way alike). Prints each
way's median time and GB/s, its ratio to write_at_all's, and the best
trial's, from rank 0; the file's bytes are checked after each trial."""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

import numpy as np

import collectives as C
import mesh


def _write_at_all(g: Any, path: str, mine: np.ndarray, sync: bool) -> None:
    with C.File.open(g, path, "w") as f:
        f.write_at_all(g.rank * mine.nbytes, mine)
        if sync:
            f.sync()


def _memmap(g: Any, path: str, mine: np.ndarray, sync: bool) -> None:
    if g.rank == 0:
        with open(path, "wb") as fh:
            fh.truncate(mine.nbytes * g.size)
    C.barrier(g)
    mm = np.memmap(path, mine.dtype, "r+", offset=g.rank * mine.nbytes, shape=mine.shape)
    mm[:] = mine
    if sync:
        mm.flush()
    del mm
    C.barrier(g)


def _gather(g: Any, path: str, mine: np.ndarray, sync: bool) -> None:
    got = C.gather(g, mine, root=0)
    if g.rank == 0:
        with open(path, "wb") as fh:
            fh.write(memoryview(np.ascontiguousarray(got)).cast("B"))
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
    C.barrier(g)


WAYS = {"write_at_all": _write_at_all, "memmap": _memmap, "gather": _gather}


def _run(world: Any, trials: int, mib: float, d: str, sync: bool) -> Any:
    n = int(mib * (1 << 20)) // world.size // 8
    mine = np.arange(n, dtype=np.float64) + world.rank * n
    path = os.path.join(d, "bench_file.bin")
    times: dict[str, list[float]] = {w: [] for w in WAYS}
    for t in range(trials + 1):
        for name in (list(WAYS) if t % 2 == 0 else list(WAYS)[::-1]):
            if world.rank == 0 and os.path.exists(path):
                os.unlink(path)
            C.barrier(world)
            t0 = time.perf_counter()
            WAYS[name](world, path, mine, sync)
            C.barrier(world)
            took = time.perf_counter() - t0
            if t:               # (the first round warms up)
                times[name].append(took)
            if world.rank == 0:
                back = np.fromfile(path, np.float64)
                assert back.size == n * world.size and back[-1] == n * world.size - 1, name
    if world.rank == 0:
        os.unlink(path)
        return {w: (statistics.median(v), min(v)) for w, v in times.items()}
    return None


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--sync"]
    trials = int(args[0]) if args else 7
    mib = float(args[1]) if len(args) > 1 else 64.0
    d = args[2] if len(args) > 2 else "."
    sync = "--sync" in sys.argv
    med = mesh.spawn(_run, 4, trials, mib, d, sync, timeout=600)[0]
    base, low = med["write_at_all"]
    for w, (s, m) in med.items():
        print(f"{w:13s} {s * 1e3:8.2f} ms {mib * (1 << 20) / s / 1e9:6.2f} GB/s "
              f"{s / base:5.2f}x write_at_all's time (best: {m * 1e3:.2f} ms, "
              f"{m / low:.2f}x)")


if __name__ == "__main__":
    main()
