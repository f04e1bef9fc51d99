"""collectives.MPI's lowercase send/recv round trip of small objects, the
tuple-keeping layer (collectives.mpi_compat.tuples) against the calls
without it (its wrap and unwrap swapped for identities: the calls as they
were), alternating round by round in one spawn of two ranks:

    python tools/bench_mpi_tuples.py [ROUNDS] [ROUND_TRIPS]

Prints, from rank 0, each object's median round trip both ways and the
ratio (a tuple's "base" figure is the old behaviour: it arrived a list)."""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import mesh
from collectives import MPI
import collectives.mpi_compat.p2p as p2p

NEW = (p2p.wrap, p2p.unwrap)
BASE = (lambda o: o, lambda v: v)
OBJECTS = {"int 8 B": 12345678, "bytes 8 B": b"12345678", "list of 3": [1, 2, 3],
           "dict": {"a": 1, "b": [2.5, "x"]}, "tuple of 2": (1, 2)}


def work(world: Any, rounds: int, n: int) -> str:
    comm = MPI.COMM_WORLD
    r = comm.rank
    res: dict[tuple[str, str], list[float]] = {}
    for name, obj in OBJECTS.items():
        for rnd in range(rounds):
            ways = [("base", BASE), ("new", NEW)]
            for way, (w, u) in ways if rnd % 2 else ways[::-1]:
                p2p.wrap, p2p.unwrap = w, u      # type: ignore[assignment]
                comm.Barrier()
                t = time.perf_counter()
                for _ in range(n):
                    if r == 0:
                        comm.send(obj, 1, 1)
                        comm.recv(source=1, tag=1)
                    else:
                        comm.send(comm.recv(source=0, tag=1), 0, 1)
                res.setdefault((name, way), []).append((time.perf_counter() - t) / n)
    p2p.wrap, p2p.unwrap = NEW      # type: ignore[assignment]
    if r == 0:
        for name in OBJECTS:
            b = statistics.median(res[(name, "base")]) * 1e6
            w = statistics.median(res[(name, "new")]) * 1e6
            print(f"{name:11s} base {b:7.1f} us  new {w:7.1f} us  new/base {w / b:.3f}",
                  flush=True)
    return "ok"


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 400
    mesh.spawn(work, 2, rounds, n, timeout=600)
