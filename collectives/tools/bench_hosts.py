"""all_reduce across two "hosts" on one machine: meshrun against torchrun with gloo.

    sudo python -m collectives.tools.bench_hosts [--sizes 8:64M] [--passes 5]
                                                 [--per-host 1,2] [--slow 1gbit] [--p2p]
                                                 [--op all_reduce]

Makes two network namespaces joined by a veth pair (10.77.0.1 and
10.77.0.2; root needed), and for each ranks-per-host count runs one
``meshrun --nnodes 2`` per namespace and then one ``torchrun --nnodes 2``
with gloo per namespace (c10d rendezvous on 10.77.0.1), all_reduce of
float32 from 8 B to 64 MiB, then the same over a link slowed by a tbf rate
limit (``--slow RATE``; ``--slow 0`` skips it). The meshrun job times the
flat algorithms (forced, ``algorithm="rd"`` / ``"ring"``) and the
automatic choice (hierarchical at every size where there are 2 ranks per
host) in
interleaved passes; each figure is the median over passes of the slowest
rank's mean time per call. Prints per size: time and busbw of each, and
gloo's time over meshrun's (auto). The namespaces are deleted on the way
out, Ctrl-C included. With ``--p2p``, point-to-point instead: ping-pong
between rank 0 and the first rank of the other host (the array there, 8
bytes back; meshrun's ``send``/``recv`` against gloo's), the figure the
median round trip and the array's bytes over it. ``--op`` times another
collective instead (automatic choice only): all_gather, reduce_scatter or
broadcast (from the last rank), a size being the whole result's bytes as
nccl-tests counts them (all_gather: size / ranks from each rank); or
all_gather_v, reduce_scatter_v, rank j's part (j + 1) / (1 + ... + n) of
the size, the flat ring (MESH_COLL_ALGO=ring) against the automatic choice
(gloo: its reduce_scatter of unequal parts; its all_gather refuses them).

Internally the same module is the worker (``--worker mesh|gloo OUT``).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mesh.cliargs import positive, positive_float, positive_list, size_text

from .bench import bus_factor, parse_sizes

__all__ = ["main"]

ADDR = ["10.77.0.1", "10.77.0.2"]
NAME = ["node0", "node1"]
REPO = Path(__file__).resolve().parents[2]


def _timed(call: Callable[[], Any], slowest: Callable[[float], float], budget: float) -> float:
    """Mean seconds per call, the slowest rank's: one warm call sets how
    many calls fit in ``budget`` (the same count on every rank)."""
    call()
    t = time.perf_counter()
    call()
    iters = int(max(2, min(200, budget / max(slowest(time.perf_counter() - t), 1e-6))))
    t = time.perf_counter()
    for _ in range(iters):
        call()
    return slowest((time.perf_counter() - t) / iters)


def _pingpong(rank: int, peer: int, size: int, send: Callable, recv: Callable) -> Callable:
    """One round trip of ``size`` bytes from rank 0 to ``peer`` and 8 back
    (a no-op on the other ranks)."""
    a, ans = np.zeros(max(2, size // 4), np.float32), np.zeros(2, np.float32)
    if rank == 0:
        return lambda: (send(a, peer), recv(ans, peer))
    if rank == peer:
        return lambda: (recv(a, 0), send(ans, 0))
    return lambda: None


def _counts(count: int, n: int) -> list[int]:
    """An uneven call's parts of ``count`` items: rank j's (j + 1) shares."""
    parts = [count * 2 * (j + 1) // (n * (n + 1)) for j in range(n)]
    parts[-1] += count - sum(parts)
    return parts


def _op(op: str, n: int, size: int, lib: Any, call: Callable, rank: int = 0) -> Callable:
    """One call of ``op`` on ``size`` bytes (module docstring) at n ranks;
    ``lib`` makes the float32 arrays (numpy, or torch for gloo), ``call(op,
    array)`` runs it (the uneven ones': ``call(op, (array, counts))``)."""
    count = max(2, size // 4)
    if op.endswith("_v"):
        counts = _counts(count, n)
        a = lib.zeros(counts[rank] if op == "all_gather_v" else count, dtype=lib.float32)
        return lambda: call(op, (a, counts))
    if op == "all_reduce" or op == "broadcast":
        a = lib.zeros(count, dtype=lib.float32)
    elif op == "all_gather":
        a = lib.zeros(max(1, count // n), dtype=lib.float32)
    else:
        a = lib.zeros((n, max(1, count // n)), dtype=lib.float32)
    return lambda: call(op, a)


def _worker(kind: str, out: str, sizes: list[int], passes: int, budget: float,
            p2p: bool = False, op: str = "all_reduce") -> None:
    results: dict[str, list[list[float]]] = {}
    if kind == "mesh":
        import collectives as C
        import mesh
        world = mesh.init(timeout=300)

        def slowest(x: float) -> float:
            return float(C.all_reduce(world, np.array([x]), op="max")[0])
        algos = {"flat": lambda size: "rd" if size < (64 << 10) else "ring", "auto": lambda s: None}
        if op != "all_reduce" and not op.endswith("_v"):
            algos = {"auto": lambda s: None}
        rank = world.rank
        ops = {"all_gather": lambda a: C.all_gather(world, a),
               "reduce_scatter": lambda a: C.reduce_scatter(world, a),
               "broadcast": lambda a: C.broadcast(world, a, root=world.size - 1),
               "all_gather_v": lambda a: C.all_gather_v(world, *a),
               "reduce_scatter_v": lambda a: C.reduce_scatter_v(world, *a)}
        if p2p:
            peer = world.size // 2
            for p in range(passes):
                results.setdefault("p2p", []).append([_timed(_pingpong(
                    rank, peer, size, lambda a, r: world.send(a, r, tag=1),
                    lambda a, r: world.recv(r, tag=1, out=a)), slowest, budget)
                    for size in sizes])
            algos = {}
        for p in range(passes if algos else 0):
            for name, alg in algos.items():
                row = []
                if op.endswith("_v"):       # (its flat ring: MESH_COLL_ALGO, read per call)
                    os.environ.pop("MESH_COLL_ALGO", None)
                    os.environ.update({"MESH_COLL_ALGO": "ring"} if name == "flat" else {})
                for size in sizes:
                    run = ops.get(op, lambda a, s=size: C.all_reduce(world, a, algorithm=alg(s)))
                    row.append(_timed(_op(op, world.size, size, np, lambda _, a: run(a), rank),
                                      slowest, budget))
                results.setdefault(name, []).append(row)
        world.close()
    else:
        import torch
        import torch.distributed as dist
        dist.init_process_group("gloo")
        rank = dist.get_rank()

        def slowest(x: float) -> float:
            t = torch.tensor([x], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return float(t[0])
        if p2p:
            peer = dist.get_world_size() // 2
            for p in range(passes):
                results.setdefault("gloo", []).append([_timed(_pingpong(
                    rank, peer, size, lambda a, r: dist.send(torch.from_numpy(a), r),
                    lambda a, r: dist.recv(torch.from_numpy(a), r)), slowest, budget)
                    for size in sizes])
        for p in range(0 if p2p else passes):
            row = []
            n = dist.get_world_size()

            def gloo(op: str, t: Any) -> None:
                if op == "reduce_scatter_v":
                    a, counts = t
                    dist.reduce_scatter(torch.empty(counts[rank]), list(a.split(counts)))
                elif op == "all_gather":
                    dist.all_gather_into_tensor(torch.empty(n * t.numel()), t)
                elif op == "reduce_scatter":
                    dist.reduce_scatter_tensor(torch.empty(t.shape[1]), t.reshape(-1))
                elif op == "broadcast":
                    dist.broadcast(t, n - 1)
                else:
                    dist.all_reduce(t)
            for size in sizes:
                row.append(_timed(_op(op, n, size, torch, gloo, rank), slowest, budget))
            results.setdefault("gloo", []).append(row)
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def _ip(*args: str, check: bool = True) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Hosts:
    """Two namespaces joined by a veth pair (10.77.0.1 / .2), each with an
    /etc/hosts naming node0 and node1; all deleted on exit."""

    def __init__(self) -> None:
        tok = secrets.token_hex(3)
        self.ns = [f"meshb-{tok}-0", f"meshb-{tok}-1"]
        self.dev = [f"mb{tok}a", f"mb{tok}b"]

    def __enter__(self) -> "Hosts":
        try:
            _ip("netns", "add", self.ns[0])
            _ip("netns", "add", self.ns[1])
            _ip("link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
            for i in (0, 1):
                _ip("link", "set", self.dev[i], "netns", self.ns[i])
                _ip("-n", self.ns[i], "addr", "add", f"{ADDR[i]}/24", "dev", self.dev[i])
                _ip("-n", self.ns[i], "link", "set", self.dev[i], "up")
                _ip("-n", self.ns[i], "link", "set", "lo", "up")
                etc = Path("/etc/netns") / self.ns[i]
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "hosts").write_text(f"127.0.0.1 localhost\n{ADDR[i]} {NAME[i]} "
                                           f"{socket.gethostname()}\n"
                                           f"{ADDR[1 - i]} {NAME[1 - i]}\n")
        except BaseException:
            self.__exit__()
            raise
        return self

    def shape(self, rate: str | None) -> None:
        """A tbf rate limit both ways (None: remove it)."""
        for i in (0, 1):
            args = ["tc", "-n", self.ns[i], "qdisc", "del" if rate is None else "replace",
                    "dev", self.dev[i], "root"]
            if rate is not None:
                args += ["tbf", "rate", rate, "burst", "256kb", "latency", "200ms"]
            done = subprocess.run(args, capture_output=True, text=True, timeout=10)
            if done.returncode and rate is not None:
                raise RuntimeError(f"tc: {done.stderr.strip()}")

    def __exit__(self, *exc: object) -> None:
        for ns in self.ns:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
            subprocess.run(["rm", "-rf", f"/etc/netns/{ns}"], check=False)

    def exec(self, i: int, argv: list[str], env: dict[str, str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns[i], *argv], cwd=REPO, env=env,
                                **kw)


def _wait(procs: list[subprocess.Popen], what: str, logs: list[Path],
          timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() for p in procs):     # one failed: do not wait for the other
                break
            time.sleep(0.2)
        for p, log in zip(procs, logs):
            if p.poll() != 0:
                raise RuntimeError(f"{what} exited {p.returncode}: "
                                   f"{log.read_text(errors='replace')[-3000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _worker_args(kind: str, out: Path, args: argparse.Namespace, sizes: list[int]) -> list[str]:
    return ["-m", "collectives.tools.bench_hosts", "--worker", kind, str(out),
            "--sizes", ",".join(map(str, sizes)), "--passes", str(args.passes),
            "--budget", str(args.budget), "--op", args.op, *(["--p2p"] if args.p2p else [])]


def _run_mesh(hosts: Hosts, per: int, out: Path, args: argparse.Namespace,
              sizes: list[int]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), MESH_SECRET=secrets.token_hex(16))
    cmd = [sys.executable, "-m", "mesh.launch", "--nnodes", "2", "--master-addr", ADDR[0],
           "-n", str(per), "--timeout", "600"]
    worker = [sys.executable, *_worker_args("mesh", out, args, sizes)][1:]
    p0 = hosts.exec(0, [*cmd, "--node-rank", "0", "--master-port", "0", *worker], env,
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    procs = [p0]
    try:
        port = None
        deadline = time.monotonic() + 30
        assert p0.stderr is not None
        while port is None and time.monotonic() < deadline:
            line = p0.stderr.readline()
            if "serves the rendezvous on port" in line:
                port = line.rsplit(" ", 1)[1].strip()
            elif not line and p0.poll() is not None:
                break
        if port is None:
            raise RuntimeError("meshrun on node 0 never said its rendezvous port")
        log = out.with_suffix(".log")
        with open(log, "w") as f:
            procs.append(hosts.exec(1, [*cmd, "--node-rank", "1", "--master-port", port,
                                        *worker], env, stdout=f, stderr=subprocess.STDOUT))
        err0 = p0.stderr
        threading.Thread(target=lambda: log.with_suffix(".0.log").write_text(err0.read()),
                         daemon=True).start()
        _wait(procs, "meshrun", [log.with_suffix(".0.log"), log])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return json.loads(out.read_text())


def _run_gloo(hosts: Hosts, per: int, out: Path, args: argparse.Namespace,
              sizes: list[int]) -> dict:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("MESH_", "TORCHELASTIC_", "MASTER_"))}
    procs, logs = [], [out.with_suffix(f".{i}.log") for i in (0, 1)]
    for i in (0, 1):
        # (TMPDIR: torchrun leaves a torchelastic_* folder there; the run's folder goes)
        env = dict(base, PYTHONPATH=str(REPO), GLOO_SOCKET_IFNAME=hosts.dev[i],
                   OMP_NUM_THREADS="1", TMPDIR=str(out.parent))
        procs.append(hosts.exec(i, [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
            "--nproc-per-node", str(per), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{ADDR[0]}:29400", "--rdzv-id", "bench",
            "--local-addr", NAME[i], *(["--rdzv-conf", "is_host=1"] if i == 0 else []),
            *_worker_args("gloo", out, args, sizes)], env,
            stdout=open(logs[i], "w"), stderr=subprocess.STDOUT))
    _wait(procs, "torchrun", logs)
    return json.loads(out.read_text())


def _median(rows: list[list[float]]) -> list[float]:
    return [statistics.median(col) for col in zip(*rows)]


def _table(title: str, n: int, sizes: list[int], res: dict, op: str = "all_reduce") -> str:
    f = bus_factor(op.removesuffix("_v"), n)
    lines = [f"## {title}", "",
             "| size | flat time | flat busbw | auto time | auto busbw | gloo time | gloo busbw "
             "| auto/flat busbw | gloo/auto time |", "|" + "---|" * 9]
    sides = {k: _median(v) for k, v in res.items()}
    for i, size in enumerate(sizes):
        cells = [size_text(size)]
        for k in ("flat", "auto", "gloo"):
            t = sides[k][i] if k in sides else float("nan")
            cells += [f"{t * 1e6:.0f} us", f"{size * f / t / 1e9:.3f} GB/s"]
        gl = sides.get("gloo", [float("nan")] * len(sizes))[i]
        flat = sides.get("flat", [float("nan")] * len(sizes))[i]
        cells += [f"{flat / sides['auto'][i]:.2f}x", f"{gl / sides['auto'][i]:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _p2p_table(title: str, sizes: list[int], res: dict) -> str:
    lines = [f"## {title}, ping-pong rank 0 to the other host", "",
             "| size | meshrun round trip | meshrun GB/s | gloo round trip | gloo GB/s "
             "| gloo/meshrun time |", "|" + "---|" * 6]
    sides = {k: _median(v) for k, v in res.items()}
    for i, size in enumerate(sizes):
        m = sides["p2p"][i]
        g = sides.get("gloo", [float("nan")] * len(sizes))[i]
        lines.append(f"| {size_text(size)} | {m * 1e6:.0f} us | {size / m / 1e9:.3f} | "
                     f"{g * 1e6:.0f} us | {size / g / 1e9:.3f} | {g / m:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m collectives.tools.bench_hosts",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="8,512,32K,256K,1M,4M,16M,64M")
    ap.add_argument("--factor", type=positive, default=4, help="step between sizes of a range a:b")
    ap.add_argument("--slow-sizes", default="8,32K,1M,16M", help="sizes over the slowed link")
    ap.add_argument("--passes", type=positive, default=5)
    ap.add_argument("--budget", type=positive_float, default=0.25, help="seconds per timed row")
    ap.add_argument("--per-host", default=[1, 2], type=positive_list, help="ranks per host to run")
    ap.add_argument("--slow", default="1gbit", help="tbf rate of the slowed link; 0: skip")
    ap.add_argument("--no-gloo", action="store_true")
    ap.add_argument("--logs", default=None, help="keep the jobs' logs in this folder")
    ap.add_argument("--p2p", action="store_true",
                    help="point-to-point ping-pong across the hosts instead of all_reduce")
    ap.add_argument("--op", default="all_reduce",
                    choices=["all_reduce", "all_gather", "reduce_scatter", "broadcast",
                             "all_gather_v", "reduce_scatter_v"])
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker[0], args.worker[1], parse_sizes(args.sizes), args.passes,
                args.budget, args.p2p, args.op)
        return 0
    if os.geteuid() != 0:
        print("bench_hosts makes network namespaces: run it as root", file=sys.stderr)
        return 2
    try:
        links = [("link", None, parse_sizes(args.sizes, args.factor))]
        if args.slow != "0":
            links.append((f"link slowed by tbf {args.slow}", args.slow,
                          parse_sizes(args.slow_sizes, args.factor)))
    except ValueError as e:
        ap.error(str(e))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with Hosts() as hosts, tempfile.TemporaryDirectory() as tmp:
        if args.logs:
            os.makedirs(args.logs, exist_ok=True)
            tmp = args.logs
        for title, rate, sizes in links:
            hosts.shape(rate) if rate else None
            for per in args.per_host:
                res = _run_mesh(hosts, per, Path(tmp) / f"mesh{per}.json", args, sizes)
                if not args.no_gloo and args.op != "all_gather_v":
                    res.update(_run_gloo(hosts, per, Path(tmp) / f"gloo{per}.json", args, sizes))
                name = (f"{args.op}, 2 hosts x {per} rank{'s' if per > 1 else ''}, {title}")
                print(_p2p_table(name, sizes, res) if args.p2p else
                      _table(name, 2 * per, sizes, res, args.op), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
