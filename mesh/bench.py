"""Point-to-point benchmark: mesh beside raw pyzmq on the same transport.

    python -m mesh.bench [--sizes 1K:64M] [--iters 2000] [--transport ipc|tcp] [--curve]
                         [--compare mpi]
    python -m mesh.bench --scale [--ranks 8,16,32,64] [--trials 3]

Round trip of 8 bytes (DEALER->ROUTER both ways, as the mesh wires it;
again with the receive waited for by waitany, answered once a loop
polling iprobe sees it, and sent by ssend both ways, mesh and MPI only),
one-way stream bandwidth (raw: PUSH/PULL with copy=False; mesh: isend/recv
with out=) and, from 1 MiB up, ping-pong bandwidth (2 x bytes / time of a
round trip), run alternately in one process tree so that all see the same
machine; the median of the trials is shown. The mesh runs twice per trial:
with its same-host direct path (the default) and without (MESH_SHM=0,
column "mesh shm=0"). For each trial, a line says how each stream of
messages the same-host rings carry (mesh.rings: up to MESH_RING_MAX, 1 MiB
for two ranks) went on them: how many of its messages the sender put on
the socket (a full ring left, or a credit window that stayed full), how
many times it left a full ring, how many receives did not take the ring
directly. With --curve, the mesh also runs encrypted
(MESH_CURVE=1) in the same alternation, and the last column is what
CurveZMQ costs: curve/mesh. With --compare mpi, mpi4py on the local MPI
(``mpirun -np 2``) runs the same measures in the same alternation; it is
skipped, saying why, when mpi4py or mpirun is missing.
With --scale: rendezvous, first-collective time and each rank's footprint as
the world grows, launched with meshrun (mesh.bench_scale)."""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import zmq

from .cliargs import checked, positive, positive_list, size_text
from .comm import waitany
from .peer import parse_size
from .spawn import spawn

__all__ = ["main", "mpi_missing", "mpirun"]


def _sizes(spec: str) -> list[int]:
    """'1K:64M' -> 1 KiB, 4 KiB, ... 64 MiB (x4 steps); '1M' alone is one size;
    'a,b,c' lists sizes."""
    if "," in spec:
        return [parse_size(s) for s in spec.split(",") if s.strip()]
    lo, _, hi = spec.partition(":")
    a, b = parse_size(lo), parse_size(hi or lo)
    if a < 1 or b < a:
        raise ValueError("LO:HI with 1 <= LO <= HI, e.g. 1K:64M")
    out = []
    while a <= b:
        out.append(a)
        a *= 4
    return out


def _iters_for(size: int, base: int) -> int:
    return max(3, min(base, (256 << 20) // max(size, 1)))


PINGPONG_FROM = 1 << 20    # ping-pong bandwidth for sizes from here up


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
    try:
        for p in procs:
            p.start()
        res = q.get(timeout=600)
        for p in procs:
            p.join(timeout=30)
        return res
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _round_trips(rank: int, iters: int, send: Any, ways: Any,
                 before: Any = None) -> dict[str, float]:
    """Seconds per 8-byte round trip between ranks 0 and 1 (mesh and MPI
    alike), for each (key, rank 0's receive, rank 1's receive[, the send
    instead of ``send``]) of ``ways``: 200 trips, then ``iters`` timed
    (``before`` each run: MPI's barrier)."""
    out = {}
    for key, first, second, *other in ways:
        receive = first if rank == 0 else second
        send_one = other[0] if other else send
        for n in (200, iters):
            if before is not None:
                before()
            start = time.perf_counter()
            for _ in range(n):
                if rank == 0:
                    send_one()
                    receive()
                else:
                    receive()
                    send_one()
            out[key] = (time.perf_counter() - start) / n
    return out


# ---- mesh ----------------------------------------------------------------------

def _mesh_peer(world: Any, sizes: list[int], iters: int) -> dict[str, float]:
    small = np.zeros(1)
    results: dict[str, float] = {}
    peer = 1 - world.rank
    t = world._t

    def plain() -> None:
        world.recv(peer, out=small)

    def probed() -> None:       # rank 1 answers once a loop polling iprobe sees each
        while world.iprobe(peer) is None:
            pass
        world.recv(peer, out=small)

    def send() -> None:
        world.send(small, peer)

    def trips(*ways: tuple[Any, ...]) -> None:
        results.update(_round_trips(world.rank, iters, send, ways))
    trips(("rtt", plain, plain))
    missed = [0]       # receives a same-host ring did not answer directly (mesh.rings):
    post = t.irecv     # counted where they go the usual way, off the short way's path

    def counted(*a: Any) -> Any:
        missed[0] += 1
        return post(*a)
    if t.rings is not None:
        t.irecv = counted
    results["ringmax"] = t.rings.max if t.rings is not None else 0   # streams it carries
    for size in sizes:
        buf = np.ones(size, np.uint8)
        k = _iters_for(size, iters)
        ring = t.rings.out[peer] if t.rings is not None else None
        sent, left, missed[0] = t._peers[peer].sent, getattr(ring, "gave_up", 0), 0
        if world.rank == 0:
            start = time.perf_counter()
            reqs = [world.isend(buf, 1) for _ in range(k)]
            for r in reqs:
                r.wait()
            world.recv(1)
            results[f"bw{size}"] = k * size / (time.perf_counter() - start)
            results[f"sock{size}"] = t._peers[peer].sent - sent     # the stream's by socket
            results[f"left{size}"] = getattr(ring, "gave_up", 0) - left   # full rings left
        else:
            for _ in range(k):
                world.recv(0, out=buf)
            results[f"miss{size}"] = missed[0]
            world.send(b"ack", 0)
    for size in sizes:
        if size < PINGPONG_FROM:
            continue
        buf = np.ones(size, np.uint8)
        k = max(3, _iters_for(size, iters) // 2)
        world.send(0, peer)
        world.recv(peer)
        start = time.perf_counter()
        for _ in range(k):
            if world.rank == 0:
                world.send(buf, 1)
                world.recv(1, out=buf)
            else:
                world.recv(0, out=buf)
                world.send(buf, 0)
        results[f"pp{size}"] = 2 * k * size / (time.perf_counter() - start)
    # last, so that the rows before are measured as they were before these came
    # (a receive's spin adapts to the waits before it)
    trips(("rttany", lambda: waitany([world.irecv(peer, out=small)]), plain),
          ("rttprobe", plain, probed), ("rttsync", plain, plain, lambda: world.ssend(small, peer)))
    return results


def _mesh(sizes: list[int], iters: int, transport: str, curve: bool = False,
          shm: bool = True) -> dict[str, float]:
    env = {"MESH_FORCE_TCP": "1"} if transport == "tcp" else {}
    env["MESH_CURVE"] = "1" if curve else "0"
    env["MESH_SHM"] = "1" if shm else "0"
    res = spawn(_mesh_peer, 2, sizes, iters, timeout=600, env=env)
    return {**res[1], **res[0]}      # the receiver's counts beside the sender's figures


# ---- mpi4py on the local MPI -------------------------------------------------------

def mpi_missing() -> str:
    """Why MPI cannot be compared here ("" when it can). (Also
    collectives.tools.bench_memory's.)"""
    try:
        import mpi4py  # noqa: F401  # pyflakes: ignore
        del mpi4py
    except ImportError:
        return "mpi4py is not installed"
    if shutil.which("mpirun") is None:
        return "mpirun is not on PATH"
    return ""


def _mpi_worker(sizes: list[int], iters: int) -> None:
    """One rank of the MPI reference (run under mpirun); rank 0 prints JSON."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, peer = comm.Get_rank(), 1 - comm.Get_rank()
    small = np.zeros(1)
    results: dict[str, float] = {}

    def plain() -> None:
        comm.Recv(small, peer)

    def probed() -> None:
        while not comm.Iprobe(source=peer):
            pass
        comm.Recv(small, peer)
    results.update(_round_trips(
        rank, iters, lambda: comm.Send(small, peer),
        (("rtt", plain, plain),
         ("rttany", lambda: MPI.Request.Waitany([comm.Irecv(small, peer)]), plain),
         ("rttprobe", plain, probed), ("rttsync", plain, plain, lambda: comm.Ssend(small, peer))),
        comm.Barrier))
    for size in sizes:
        buf = np.ones(size, np.uint8)
        k = _iters_for(size, iters)
        comm.Barrier()
        if rank == 0:
            t = time.perf_counter()
            MPI.Request.Waitall([comm.Isend(buf, 1) for _ in range(k)])
            comm.Recv(small, 1)
            results[f"bw{size}"] = k * size / (time.perf_counter() - t)
        else:
            for _ in range(k):
                comm.Recv(buf, 0)
            comm.Send(small, 0)
    for size in sizes:
        if size < PINGPONG_FROM:
            continue
        buf = np.ones(size, np.uint8)
        k = max(3, _iters_for(size, iters) // 2)
        comm.Barrier()
        t = time.perf_counter()
        for _ in range(k):
            if rank == 0:
                comm.Send(buf, 1)
                comm.Recv(buf, 1)
            else:
                comm.Recv(buf, 0)
                comm.Send(buf, 0)
        results[f"pp{size}"] = 2 * k * size / (time.perf_counter() - t)
    if rank == 0:
        print("MESHBENCH " + json.dumps(results), flush=True)


def mpirun(nprocs: int, module: str, args: list[str], timeout: float = 600) -> Any:
    """Run ``python -m module args`` on ``nprocs`` ranks of the local MPI
    (as root too, oversubscribed); return the JSON its line starting with
    "MESHBENCH " carries. (Also collectives.tools.bench_memory's.)"""
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}
    cmd = ["mpirun", "-np", str(nprocs), sys.executable, "-m", module, *args]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    for line in run.stdout.splitlines():
        if line.startswith("MESHBENCH "):
            return json.loads(line[len("MESHBENCH "):])
    raise RuntimeError(f"mpirun failed ({run.returncode}): {run.stderr[-2000:]}")


def _mpi(sizes: list[int], iters: int) -> dict[str, float]:
    return mpirun(2, "mesh.bench", ["--mpi-worker", "--sizes", ",".join(map(str, sizes)),
                                    "--iters", str(iters)])



def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mesh.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1K:64M", type=checked(_sizes),
                    help="bandwidth sizes, LO:HI, x4 steps")
    ap.add_argument("--iters", type=positive, default=2000, help="round trips per trial")
    ap.add_argument("--trials", type=positive, default=3, help="alternating trials (median shown)")
    ap.add_argument("--transport", choices=["ipc", "tcp"], default="ipc")
    ap.add_argument("--curve", action="store_true",
                    help="also run the mesh encrypted (CurveZMQ) and report its cost")
    ap.add_argument("--compare", choices=["mpi"], action="append", default=[],
                    help="also run mpi4py on the local MPI (skipped when missing)")
    ap.add_argument("--mpi-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scale", action="store_true",
                    help="time joining and the first collectives, and measure each rank's "
                         "footprint, at growing world sizes (see --ranks)")
    ap.add_argument("--ranks", default="8,16,32,64", type=positive_list,
                    help="world sizes for --scale")
    args = ap.parse_args(argv)
    if args.mpi_worker:
        _mpi_worker(args.sizes, args.iters)
        return
    if args.scale:
        from . import bench_scale
        bench_scale.main(args.ranks, trials=args.trials)
        return
    sizes = args.sizes
    mpi_why = mpi_missing() if "mpi" in args.compare else "not asked"
    runs: dict[str, list[dict[str, float]]] = {"raw pyzmq": [], "mesh shm=0": [], "mesh": []}
    if args.curve:
        runs["curve"] = []
    if not mpi_why:
        runs["mpi4py"] = []
    for _ in range(args.trials):
        runs["raw pyzmq"].append(_raw(sizes, args.iters, args.transport))
        runs["mesh shm=0"].append(_mesh(sizes, args.iters, args.transport, shm=False))
        runs["mesh"].append(_mesh(sizes, args.iters, args.transport))
        if args.curve:
            runs["curve"].append(_mesh(sizes, args.iters, args.transport, curve=True))
        if not mpi_why:
            runs["mpi4py"].append(_mpi(sizes, args.iters))
    print(f"# meshrun p2p benchmark, transport {args.transport}, median of {args.trials} "
          f"alternating trials, {os.cpu_count()} cores")
    if "mpi" in args.compare and mpi_why:
        print(f"# MPI skipped: {mpi_why}")
    names = list(runs)
    ratios = [("mesh/raw", "mesh", "raw pyzmq"), ("mesh/shm=0", "mesh", "mesh shm=0")]
    if "curve" in runs:
        ratios.append(("curve/mesh", "curve", "mesh"))
    if "mpi4py" in runs:
        ratios.append(("mesh/mpi", "mesh", "mpi4py"))
    print(f"{'measure':>24} " + " ".join(f"{n:>11}" for n in names) + " "
          + " ".join(f"{r:>10}" for r, _, _ in ratios))
    keys = [("rtt", "round trip 8 B (us)"), ("rttany", "  through waitany (us)"),
            ("rttprobe", "  iprobe loop (us)"), ("rttsync", "  by ssend (us)")]
    keys += [(f"bw{n}", f"stream {size_text(n)} (GB/s)") for n in sizes]
    keys += [(f"pp{n}", f"ping-pong {size_text(n)} (GB/s)") for n in sizes if n >= PINGPONG_FROM]
    for key, label in keys:
        scale = 1e6 if key.startswith("rtt") else 1e-9
        med = {n: statistics.median(x[key] for x in runs[n]) * scale
               for n in names if all(key in x for x in runs[n])}
        cells = " ".join(f"{med[n]:11.3f}" if n in med else f"{'-':>11}" for n in names)
        rs = []
        for _, a, b in ratios:
            if a in med and b in med:
                # a ratio above 1 is better for the first named, both for times and rates
                ratio = med[b] / med[a] if key.startswith("rtt") else med[a] / med[b]
                rs.append(f"{ratio:10.2f}")
            else:
                rs.append(f"{'-':>10}")
        print(f"{label:>24} {cells} " + " ".join(rs))
    print("# ratios: > 1 means the first named is faster (for round trips too)")
    for i, r in enumerate(runs["mesh"]):     # which way each stream went (mesh.rings)
        print(f"# mesh trial {i + 1}, streams on the rings: " + "; ".join(
            f"{size_text(n)} {r[f'sock{n}']:.0f} by socket, {r[f'left{n}']:.0f} full rings left, "
            f"{r[f'miss{n}']:.0f} receives off the ring" for n in sizes
            if n <= r.get("ringmax", 0)))


if __name__ == "__main__":
    main()
