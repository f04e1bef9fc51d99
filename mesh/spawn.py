"""``mesh.spawn``: run ``fn(world, *args)`` on N fresh local processes joined
into one mesh; return results by rank, or raise the first failure with that
rank's own traceback. Every path is bounded: on failure or timeout all
processes are killed."""
from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import time
import traceback
from typing import Any, Callable

from .auth import curve_wanted
from .errors import WorkerError
from .rendezvous import RendezvousServer

__all__ = ["spawn"]


def _child(fn: Callable[..., Any], rank: int, size: int, port: int, secret: str,
           args: tuple, extra_env: dict[str, str], conn: Any) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "MESH_SECRET": secret, "MESH_LAUNCHER": "1"})
    os.environ.update(extra_env)
    from .errors import LostPeerError, MeshError
    from .world import init
    world = None
    try:
        world = init()
        result = fn(world, *args)
        world.close()
        conn.send((True, result, 0.0, False))
    except BaseException as e:
        # a lost peer or an abort is the consequence of another rank's failure
        secondary = isinstance(e, LostPeerError) or (isinstance(e, MeshError) and "aborted" in str(e))
        conn.send((False, traceback.format_exc(), time.time(), secondary))
        if world is not None:
            world.close()  # report first: closing waits for the peers
    finally:
        conn.close()


def spawn(fn: Callable[..., Any], nprocs: int, *args: Any, timeout: float = 60,
          env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(world, *args)`` on ``nprocs`` local processes (fn must be a
    top-level, picklable function); return its results ordered by rank."""
    if nprocs < 1:
        raise ValueError(f"spawn needs nprocs >= 1, got {nprocs}")
    secret = secrets.token_hex(16)
    curve = curve_wanted({**os.environ, **(env or {})})
    server = RendezvousServer(nprocs, secret, curve=curve).start() if nprocs > 1 else None
    port = server.port if server is not None else 0
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    try:
        for r in range(nprocs):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, name=f"mesh-rank-{r}", daemon=True,
                            args=(fn, r, nprocs, port, secret, args, env or {}, child))
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        return _collect(procs, conns, timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)
        if server is not None:
            server.close()


def _collect(procs: list, conns: list, timeout: float) -> list[Any]:
    """Results by rank; on failure the root cause: a rank's own error before
    the lost-peer errors it caused elsewhere, the earliest first."""
    results: list[Any] = [None] * len(procs)
    failures: list[tuple[bool, float, int, WorkerError]] = []
    pending = set(range(len(procs)))
    deadline = time.monotonic() + timeout
    settle = None
    while pending and (settle is None or time.monotonic() < settle):
        if time.monotonic() > deadline:
            raise WorkerError(min(pending), f"timed out after {timeout:g}s; ranks still running: "
                                            f"{sorted(pending)}")
        for r in sorted(pending):
            if conns[r].poll():
                try:
                    ok, payload, when, secondary = conns[r].recv()
                except (EOFError, OSError):
                    procs[r].join(timeout=1)
                    failures.append((False, time.time(), r, WorkerError(
                        r, "no result: the process died", procs[r].exitcode)))
                    pending.discard(r)
                    continue
                pending.discard(r)
                if ok:
                    results[r] = payload
                else:
                    failures.append((secondary, when, r, WorkerError(r, payload)))
            elif not procs[r].is_alive() and not conns[r].poll():
                code = procs[r].exitcode
                why = f"killed by signal {-code}" if code is not None and code < 0 else "exited"
                failures.append((False, time.time(), r,
                                 WorkerError(r, f"no result: the process {why}", code)))
                pending.discard(r)
        if failures and settle is None:
            settle = time.monotonic() + 1.0
        time.sleep(0.002)
    if failures:
        raise min(failures, key=lambda f: (f[0], f[1], f[2]))[3]
    return results
