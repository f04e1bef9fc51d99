"""A user-defined op (collectives.Op) on one host: its same-host board path
against its socket path (the one it takes across hosts or with MESH_CMA=0,
and took on one host before the board's) and the builtin "sum", in one
process tree, the three alternating trial by trial:

    python tools/bench_userop.py [--op all_reduce] [-n 2] [--sizes 8,64K,1M]
                                 [--trials 5] [--calls 200] [--round]

The op computes the sum (``Op(np.add, commute=True)``, float32). For the
socket path ``collectives.userop._on_board`` is replaced, in every rank
alike, by one that posts the call's fingerprint on the board and returns
None (what the calls did before the board took them). ``--round`` (an
all_reduce up to 64 KiB) adds the sum through one board round
(``algorithm="rd"``: not the tiny short way). Prints per size the
slowest rank's us a call, best of the trials, and the ratios."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import collectives as C  # noqa: E402
import mesh  # noqa: E402
from collectives import userop  # noqa: E402
from collectives.plan import parse_size  # noqa: E402

VARIANTS = ("sum", "user sockets", "user board")
ROUND = "sum round"


def _sockets(ctx: Any, name: str, path: str, nbytes: int) -> None:
    from collectives.shm import board
    if board.available(ctx):
        board.announce(ctx)
    return None


def _call(op: str, g: Any, a: np.ndarray, how: Any) -> None:
    if how == ROUND:
        C.all_reduce(g, a, algorithm="rd")
    elif op == "all_reduce":
        C.all_reduce(g, a, op=how)
    elif op == "reduce":
        C.reduce(g, a, op=how)
    elif op == "reduce_scatter":
        C.reduce_scatter(g, a, op=how)
    else:
        C.scan(g, a, op=how)


def _worker(world: Any, op: str, sizes: list[int], trials: int, calls: int,
            variants: tuple[str, ...] = VARIANTS) -> dict:
    user = C.Op(np.add, commute=True, name="user sum")
    board_way = userop._on_board
    best: dict = {}
    for size in sizes:
        count = max(world.size, size // 4) // world.size * world.size
        a = np.zeros(count, np.float32)
        k = max(5, min(calls, (calls * 65536) // max(size, 1)))
        for _ in range(trials):
            for v in variants:
                userop._on_board = _sockets if v == "user sockets" else board_way
                how = v if v in ("sum", ROUND) else user
                for _ in range(3):
                    _call(op, world, a, how)
                C.barrier(world)
                t0 = time.perf_counter()
                for _ in range(k):
                    _call(op, world, a, how)
                us = np.array([(time.perf_counter() - t0) / k * 1e6])
                C.all_reduce(world, us, op="max")
                key = (size, v)
                best[key] = min(best.get(key, float("inf")), float(us[0]))
    userop._on_board = board_way
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", default="all_reduce",
                    choices=("all_reduce", "reduce", "reduce_scatter", "scan"))
    ap.add_argument("-n", type=int, default=2)
    ap.add_argument("--sizes", default="8,64K,1M")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--round", action="store_true",
                    help="also the sum through one board round (all_reduce up to 64 KiB)")
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if args.round and (args.op != "all_reduce" or max(sizes) > 64 << 10):
        ap.error("--round: an all_reduce of at most 64 KiB (one board round)")
    variants = VARIANTS + ((ROUND,) if args.round else ())
    best = mesh.spawn(_worker, args.n, args.op, sizes, args.trials, args.calls, variants,
                      timeout=3600)[0]
    print(f"# {args.op}, {args.n} ranks, us a call (slowest rank, best of {args.trials})")
    print(f"# {'size':>8} {'sum':>9} {'sockets':>9} {'board':>9} {'sock/board':>10} "
          f"{'board/sum':>9}" + (f" {'sum round':>9}" if args.round else ""))
    for size in sizes:
        s, u, b = (best[(size, v)] for v in VARIANTS)
        print(f"  {size:>8} {s:>9.1f} {u:>9.1f} {b:>9.1f} {u / b:>10.2f} {b / s:>9.2f}"
              + (f" {best[(size, ROUND)]:>9.1f}" if args.round else ""))


if __name__ == "__main__":
    main()
