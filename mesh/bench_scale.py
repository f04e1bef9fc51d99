"""Scale benchmark: what joining, the first collective and each rank's
footprint cost as the world grows (``python -m mesh.bench --scale``).

Each world is started as a user starts one, with the launcher
(``python -m mesh.launch -n N -m mesh.bench_scale OUT``), and measured
inside the ranks:

    process start --> init entry --> init return --> 1st all_reduce --> 2nd
       (interpreter, imports)  (rendezvous, sockets)  (connections, boards)

then each rank's footprint after those collectives (resident memory,
threads, open fds and how many are sockets, ZeroMQ sockets, same-host board
bytes) and the CPU it burns while it waits: idle (sleeping in user code,
the progress thread beating) and blocked (in a barrier a late rank holds
up). Rank 0 writes every rank's record to OUT as JSON."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

__all__ = ["main", "rank_main", "footprint", "summarize"]

_IDLE_S = 2.0


def _process_start() -> float:
    """This process's start (wall clock), from /proc: 10 ms resolution."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        btime = next(int(ln.split()[1]) for ln in f if ln.startswith("btime"))
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def footprint(world: Any = None) -> dict[str, Any]:
    """This process's resident memory (MiB), threads, open fds and sockets;
    with ``world``, its ZeroMQ sockets and same-host board bytes too."""
    with open("/proc/self/status") as f:
        rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024
    fds = os.listdir("/proc/self/fd")
    socks = 0
    for fd in fds:
        try:
            socks += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    out: dict[str, Any] = {"rss_mib": rss, "threads": len(os.listdir("/proc/self/task")),
                           "fds": len(fds), "sockets": socks}
    if world is not None:
        out["zmq_sockets"] = len(getattr(world._ctx, "_sockets", ()))
        from collectives.shm import board
        out["board_kib"] = sum(b.mem.nbytes for b in list(board._boxes.values())) / 1024
    return out


def _cpu() -> float:
    return time.process_time()    # every thread of the process, to the nanosecond


def rank_main(out: str, idle: float = _IDLE_S) -> None:
    """One rank of the benchmark (run by the launcher)."""
    start = _process_start()
    import numpy as np

    import collectives as C
    import mesh
    rec: dict[str, Any] = {"start": start, "init0": time.time()}
    world = mesh.init()
    rec["init1"] = time.time()
    a = np.ones(8, np.float32)
    C.all_reduce(world, a)
    rec["ar1"] = time.time()
    C.all_reduce(world, a)
    rec["ar2"] = time.time()
    assert a[0] == world.size ** 2, a
    rec.update(footprint(world))
    c0 = time.perf_counter(), _cpu()
    time.sleep(idle)
    c1 = time.perf_counter(), _cpu()
    if world.rank == 0:
        time.sleep(idle)
    C.barrier(world)
    c2 = time.perf_counter(), _cpu()
    rec["idle_cpu"] = (c1[1] - c0[1]) / (c1[0] - c0[0])
    rec["blocked_cpu"] = (c2[1] - c1[1]) / (c2[0] - c1[0])
    everyone = C.all_gather_object(world, rec)
    if world.rank == 0:
        with open(out, "w") as f:
            json.dump(everyone, f)
    world.close()


def _one(n: int, env: dict[str, str], timeout: float, idle: float) -> list[dict[str, Any]]:
    fd, path = tempfile.mkstemp(prefix="meshscale-", suffix=".json")
    os.close(fd)
    try:
        t0 = time.time()
        cmd = [sys.executable, "-m", "mesh.launch", "-n", str(n), "--timeout", str(timeout),
               "-m", "mesh.bench_scale", path, str(idle)]
        done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=timeout + 30)
        if done.returncode != 0:
            raise RuntimeError(f"{n} ranks failed (exit {done.returncode}):\n"
                               f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
        with open(path) as f:
            recs: list[dict[str, Any]] = json.load(f)
        for r in recs:
            r["launch"] = t0
        return recs
    finally:
        os.unlink(path)


def summarize(recs: list[dict[str, Any]]) -> dict[str, float]:
    """One world's figures (seconds, MiB, counts): medians and maxima over ranks."""
    med = statistics.median
    return {
        "boot_med": med(r["init0"] - r["start"] for r in recs),
        "init_med": med(r["init1"] - r["init0"] for r in recs),
        "join": max(r["init1"] for r in recs) - max(r["init0"] for r in recs),
        "ready": max(r["init1"] for r in recs) - min(r["start"] for r in recs),
        "ar1_max": max(r["ar1"] - r["init1"] for r in recs),
        "ar2_max": max(r["ar2"] - r["ar1"] for r in recs),
        "rss": med(r["rss_mib"] for r in recs),
        "threads": max(r["threads"] for r in recs),
        "fds": max(r["fds"] for r in recs),
        "sockets": max(r["sockets"] for r in recs),
        "zmq": max(r["zmq_sockets"] for r in recs),
        "board": max(r["board_kib"] for r in recs),
        "idle": med(r["idle_cpu"] for r in recs),
        "blocked": med(r["blocked_cpu"] for r in recs),
    }


_COLUMNS = [
    ("ranks", "{:>5}", None),
    ("boot s", "{:>7.2f}", "boot_med"),
    ("init s", "{:>7.2f}", "init_med"),
    ("join s", "{:>6.2f}", "join"),
    ("ready s", "{:>7.2f}", "ready"),
    ("1st AR s", "{:>8.3f}", "ar1_max"),
    ("2nd AR ms", "{:>9.2f}", "ar2_max"),
    ("RSS MiB", "{:>7.1f}", "rss"),
    ("thr", "{:>4.0f}", "threads"),
    ("fds", "{:>4.0f}", "fds"),
    ("socks", "{:>5.0f}", "sockets"),
    ("zmq", "{:>4.0f}", "zmq"),
    ("board KiB", "{:>9.0f}", "board"),
    ("idle CPU%", "{:>9.1f}", "idle"),
    ("blocked CPU%", "{:>12.1f}", "blocked"),
]


def _row(n: int, s: dict[str, float]) -> str:
    scaled = {**s, "ar2_max": s["ar2_max"] * 1e3, "idle": s["idle"] * 100,
              "blocked": s["blocked"] * 100}
    cells = [fmt.format(n if key is None else scaled[key]) for _, fmt, key in _COLUMNS]
    return " ".join(cells)


def main(sizes: list[int], trials: int = 3, timeout: float = 300,
         env: dict[str, str] | None = None, idle: float = _IDLE_S) -> dict[int, dict[str, float]]:
    """Run every world size ``trials`` times, interleaved; print the medians."""
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
    for _ in range(trials):
        for n in sizes:
            runs[n].append(summarize(_one(n, env or {}, timeout, idle)))
    print(f"# meshrun scale benchmark: {os.cpu_count()} cores, median of {trials} interleaved "
          f"trials; times from the ranks' own clocks (boot: process start to mesh.init entry; "
          f"init: mesh.init; join: last init entry to last init return; ready: first process start to last init return; 1st/2nd AR: "
          f"all_reduce of 8 floats, slowest rank); footprint after them, per rank; CPU while "
          f"sleeping {idle:g}s (idle) and in a barrier held {idle:g}s (blocked)")
    print(" ".join(f"{name:>{len(fmt.format(0 if key is None else 0.0))}}"
                   for name, fmt, key in _COLUMNS))
    out = {}
    for n in sizes:
        med = {k: statistics.median(r[k] for r in runs[n]) for k in runs[n][0]}
        out[n] = med
        print(_row(n, med))
    return out


if __name__ == "__main__":
    rank_main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else _IDLE_S)
