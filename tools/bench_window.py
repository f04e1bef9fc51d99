"""What a one-sided window's operations cost beside point-to-point, two
ranks on one host (mesh.window), in one spawn, trials alternating:

    python tools/bench_window.py [TRIALS]

Rank 1 is the target: for the point-to-point rows it answers (a ping-pong
of 8 B, and a stream of 8 B sends it receives); for the window's it waits
in a receive of its own, so its requests are applied by that waiting
thread. Rank 0, under a shared lock on rank 1: a stream of 8 B puts and
of accumulates (then one flush), gets and flushes one at a time. Then
large puts, each trial either with the target's put claimed into place
(head) or applied once whole, as before (base: ``Target.claim`` answering
None). Prints each row's median in microseconds, or GB/s."""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import numpy as np

import mesh

N = 2000            # operations a trial
BIG = (1 << 14, 1 << 17, 1 << 21)     # large puts: float64 elements (128 KiB to 16 MiB)


def _target(world: mesh.Mesh, win: Any) -> None:
    """Rank 1: answer each trial's point-to-point, then wait (or switch the claim)."""
    while True:
        what = world.recv(0, tag=8, timeout=300)
        if what == "end":
            return
        if what == "p2p":
            for _ in range(N + 100):
                world.send(world.recv(0, tag=1), 0, tag=2)
            for _ in range(N + 100):
                world.recv(0, tag=3)
            world.send(None, 0, tag=4)
        elif what == "base":    # (the window's target side, mesh.rma.Target)
            win._target_side.claim = lambda src, tag, nbytes: None
        elif what == "head":
            win._target_side.__dict__.pop("claim", None)
        world.send(None, 0, tag=7)


def _timed(op: Any, count: int, after: Any) -> float:
    for _ in range(min(count, 100)):
        op()
    after()
    t = time.perf_counter()
    for _ in range(count):
        op()
    after()
    return (time.perf_counter() - t) / count


def _origin(world: mesh.Mesh, win: Any, trials: int) -> dict[str, list[float]]:
    x = np.ones(1)
    rows: dict[str, list[float]] = {}

    def ask(what: str) -> None:
        world.send(what, 1, tag=8)
        if what in ("base", "head"):
            world.recv(1, tag=7)

    def row(name: str, v: float) -> None:
        rows.setdefault(name, []).append(v)

    for _ in range(trials):
        ask("p2p")
        row("p2p round trip 8 B (us)", _timed(
            lambda: (world.send(x, 1, tag=1), world.recv(1, tag=2)), N, lambda: None) * 1e6)
        t = time.perf_counter()
        for _ in range(N + 100):
            world.send(x, 1, tag=3)
        world.recv(1, tag=4)
        row("p2p send 8 B, a stream (us)", (time.perf_counter() - t) / (N + 100) * 1e6)
        world.recv(1, tag=7)
        win.lock(1)
        flush = lambda: win.flush(1)    # noqa: E731
        row("put 8 B, a stream (us)", _timed(lambda: win.put(x, 1), N, flush) * 1e6)
        row("accumulate 8 B, a stream (us)",
            _timed(lambda: win.accumulate(x, 1), N, flush) * 1e6)
        row("get 8 B (us)", _timed(lambda: win.get(1, count=1), N, flush) * 1e6)
        row("flush (us)", _timed(flush, N, flush) * 1e6)
        for n in BIG:
            big = np.ones(n)
            for variant in ("base", "head"):
                win.unlock(1)
                ask(variant)
                win.lock(1)
                dt = _timed(lambda: win.put(big, 1), 20, flush)
                row(f"put {n * 8 >> 10} KiB, {variant} (GB/s)", big.nbytes / dt / 1e9)
        win.unlock(1)
    ask("end")
    return rows


def _bench(world: mesh.Mesh, trials: int) -> dict[str, list[float]] | None:
    with world.window(np.zeros(max(BIG))) as win:
        if world.rank == 1:
            _target(world, win)
            return None
        return _origin(world, win, trials)


def main() -> None:
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    rows = mesh.spawn(_bench, 2, trials, timeout=600)[0]
    for name, vs in rows.items():
        print(f"{name:36s} {statistics.median(vs):9.2f}   (median of {len(vs)})")
    for n in BIG:
        kib = n * 8 >> 10
        base = statistics.median(rows[f"put {kib} KiB, base (GB/s)"])
        head = statistics.median(rows[f"put {kib} KiB, head (GB/s)"])
        print(f"put {kib} KiB: head/base {head / base:.2f}")


if __name__ == "__main__":
    main()
