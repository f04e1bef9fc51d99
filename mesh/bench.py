"""Point-to-point benchmark: mesh beside raw pyzmq on the same transport.

    python -m mesh.bench [--sizes 1K:64M] [--iters 2000] [--transport ipc|tcp] [--curve]
    python -m mesh.bench --scale [--ranks 8,16,32,64] [--trials 3]

Round trip of 8 bytes (DEALER->ROUTER both ways, as the mesh wires it) and
one-way bandwidth (raw: PUSH/PULL with copy=False; mesh: send/recv with out=),
run alternately in one process tree so that both see the same machine.
With --curve, the mesh also runs encrypted (MESH_CURVE=1) in the same
alternation, and the last column is what CurveZMQ costs: curve/mesh.
With --scale: rendezvous, first-collective time and each rank's footprint as
the world grows, launched with meshrun (mesh.bench_scale)."""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from typing import Any

import numpy as np
import zmq

from .spawn import spawn

__all__ = ["main", "parse_size"]


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("B")
    num = text.rstrip("KMG")
    return int(float(num) * units[text[len(num):]])


def _sizes(spec: str) -> list[int]:
    lo, _, hi = spec.partition(":")
    a, b = parse_size(lo), parse_size(hi or lo)
    out = []
    while a <= b:
        out.append(a)
        a *= 4
    return out


def _iters_for(size: int, base: int) -> int:
    return max(3, min(base, (256 << 20) // max(size, 1)))


# ---- raw pyzmq -----------------------------------------------------------------

def _raw_peer(eps: list[str], role: int, sizes: list[int], iters: int, q: Any) -> None:
    """One side of the raw pyzmq reference, wired as the mesh wires itself."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(eps[role])
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, str(role).encode())
    dealer.connect(eps[1 - role])
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 0)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    if role == 0:
        push.bind(eps[2])
    else:
        pull.connect(eps[2])
    time.sleep(0.3)
    small: Any = np.zeros(1)
    results: dict[str, float] = {}
    for n in (200, iters):
        t = time.perf_counter()
        for _ in range(n):
            if role == 0:
                dealer.send_multipart([b"h", small])
                router.recv_multipart()
            else:
                router.recv_multipart()
                dealer.send_multipart([b"h", small])
        results["rtt"] = (time.perf_counter() - t) / n
    for size in sizes:
        buf: Any = np.ones(size, np.uint8)
        k = _iters_for(size, iters)
        if role == 0:
            t = time.perf_counter()
            for _ in range(k):
                push.send(buf, copy=False)
            router.recv_multipart()
            results[f"bw{size}"] = k * size / (time.perf_counter() - t)
        else:
            for _ in range(k):
                pull.recv(copy=False)
            dealer.send(b"ack")
    if role == 0:
        q.put(results)
    for s in (router, dealer, pull, push):
        s.close(linger=0)
    ctx.term()


def _raw(sizes: list[int], iters: int, transport: str) -> dict[str, float]:
    tmp = tempfile.mkdtemp(prefix="meshbench-")
    if transport == "ipc":
        eps = [f"ipc://{tmp}/a", f"ipc://{tmp}/b", f"ipc://{tmp}/c"]
    else:
        import socket
        ports = []
        for _ in range(3):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        eps = [f"tcp://127.0.0.1:{p}" for p in ports]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_raw_peer, args=(eps, r, sizes, iters, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    res = q.get(timeout=600)
    for p in procs:
        p.join(timeout=30)
    return res


# ---- mesh ----------------------------------------------------------------------

def _mesh_peer(world: Any, sizes: list[int], iters: int) -> dict[str, float]:
    small = np.zeros(1)
    results: dict[str, float] = {}
    peer = 1 - world.rank
    for n in (200, iters):
        t = time.perf_counter()
        for _ in range(n):
            if world.rank == 0:
                world.send(small, peer)
                world.recv(peer, out=small)
            else:
                world.recv(peer, out=small)
                world.send(small, peer)
        results["rtt"] = (time.perf_counter() - t) / n
    for size in sizes:
        buf = np.ones(size, np.uint8)
        k = _iters_for(size, iters)
        if world.rank == 0:
            t = time.perf_counter()
            reqs = [world.isend(buf, 1) for _ in range(k)]
            for r in reqs:
                r.wait()
            world.recv(1)
            results[f"bw{size}"] = k * size / (time.perf_counter() - t)
        else:
            for _ in range(k):
                world.recv(0, out=buf)
            world.send(b"ack", 0)
    return results


def _mesh(sizes: list[int], iters: int, transport: str, curve: bool = False) -> dict[str, float]:
    env = {"MESH_FORCE_TCP": "1"} if transport == "tcp" else {}
    env["MESH_CURVE"] = "1" if curve else "0"
    return spawn(_mesh_peer, 2, sizes, iters, timeout=600, env=env)[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mesh.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1K:64M", help="bandwidth sizes, LO:HI, x4 steps")
    ap.add_argument("--iters", type=int, default=2000, help="round trips per trial")
    ap.add_argument("--trials", type=int, default=3, help="alternating raw/mesh trials")
    ap.add_argument("--transport", choices=["ipc", "tcp"], default="ipc")
    ap.add_argument("--curve", action="store_true",
                    help="also run the mesh encrypted (CurveZMQ) and report its cost")
    ap.add_argument("--scale", action="store_true",
                    help="time joining and the first collectives, and measure each rank's "
                         "footprint, at growing world sizes (see --ranks)")
    ap.add_argument("--ranks", default="8,16,32,64", help="world sizes for --scale")
    args = ap.parse_args(argv)
    if args.scale:
        from . import bench_scale
        bench_scale.main([int(n) for n in args.ranks.split(",")], trials=args.trials)
        return
    sizes = _sizes(args.sizes)
    raw: list[dict[str, float]] = []
    ours: list[dict[str, float]] = []
    curve: list[dict[str, float]] = []
    for _ in range(args.trials):
        raw.append(_raw(sizes, args.iters, args.transport))
        ours.append(_mesh(sizes, args.iters, args.transport))
        if args.curve:
            curve.append(_mesh(sizes, args.iters, args.transport, curve=True))
    best_rtt_raw = min(r["rtt"] for r in raw)
    best_rtt_mesh = min(r["rtt"] for r in ours)
    extra = f" {'curve':>12} {'curve/mesh':>10}" if curve else ""
    print(f"# meshrun p2p benchmark, transport {args.transport}, best of {args.trials} "
          f"alternating trials, {os.cpu_count()} cores")
    print(f"{'measure':>22} {'raw pyzmq':>12} {'mesh':>12} {'mesh/raw':>9}{extra}")
    rtt_curve = ""
    if curve:
        c = min(r["rtt"] for r in curve)
        rtt_curve = f" {c * 1e6:12.1f} {c / best_rtt_mesh:10.2f}"
    print(f"{'round trip 8 B (us)':>22} {best_rtt_raw * 1e6:12.1f} {best_rtt_mesh * 1e6:12.1f} "
          f"{best_rtt_mesh / best_rtt_raw:9.2f}{rtt_curve}")
    for size in sizes:
        key = f"bw{size}"
        r = max(x[key] for x in raw) / 1e9
        m = max(x[key] for x in ours) / 1e9
        label = f"bandwidth {_fmt(size)} (GB/s)"
        bw_curve = ""
        if curve:
            c = max(x[key] for x in curve) / 1e9
            bw_curve = f" {c:12.3f} {c / m:10.2f}"
        print(f"{label:>22} {r:12.3f} {m:12.3f} {m / r:9.2f}{bw_curve}")


def _fmt(n: int) -> str:
    for unit, k in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k}{unit}"
    return str(n)


if __name__ == "__main__":
    main()
