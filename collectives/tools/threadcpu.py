"""Where a process's CPU goes, thread by thread: each live thread's time on
a core and its time runnable but waiting for one (Linux's
``/proc/self/task/<tid>/schedstat``), grouped by what the thread does::

    main       the main thread (torch's forward, backward and DDP's bucket copies)
    lane       meshrun's collective lanes (collectives.runner: async collectives)
    progress   the mesh's progress thread (sockets, heartbeats)
    gloo       gloo's threads (its tcp loop and run loop)
    other      every other live thread (ZeroMQ's, torch's store)
    ended      threads that ended between the two looks (the process's total
               says how much they took: ``resource.getrusage``); mostly
               meshrun's lanes, which end after half a second with nothing
               queued: a step longer than that under load ends its lane

A figure of CPU holds under load where a wall-clock one does not: other
jobs on the cores lengthen a step's wall, and show as the wait for a core,
not as the step's CPU. Where schedstat is not there (not Linux), only the
process's total is given, as ``ended``.
"""
from __future__ import annotations

import os
import resource
import threading
from dataclasses import dataclass

__all__ = ["KINDS", "Snapshot", "snapshot", "spent"]

KINDS = ("main", "lane", "progress", "gloo", "other", "ended")


@dataclass(frozen=True)
class Snapshot:
    """Per live thread id: (its kind, ns on a core, ns waiting for one);
    and the process's CPU (seconds, every thread that ever ran)."""

    threads: dict[int, tuple[str, int, int]]
    total: float


def _kind(tid: int, names: dict[int, str], main: int | None) -> str:
    if tid == main:
        return "main"
    name = names.get(tid)
    if name is None:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            return "other"
    if name.startswith("collectives-lane"):
        return "lane"
    if name.startswith("mesh-progress"):
        return "progress"
    if "gloo" in name:
        return "gloo"
    return "other"


def snapshot() -> Snapshot:
    """Every live thread's CPU now, and the process's."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    total = use.ru_utime + use.ru_stime
    threads: dict[int, tuple[str, int, int]] = {}
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return Snapshot(threads, total)
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    main = threading.main_thread().native_id
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                run, wait = (int(x) for x in f.read().split()[:2])
        except (OSError, ValueError):
            continue        # (ended meanwhile; or no schedstat: the total alone)
        threads[tid] = (_kind(tid, names, main), run, wait)
    return Snapshot(threads, total)


def spent(before: Snapshot, after: Snapshot, calls: int = 1) -> dict[str, float]:
    """Seconds of CPU per call between two snapshots, per kind (KINDS), with
    ``"waited"``: the live threads' time runnable but off a core. What the
    process took beyond its live threads' (threads that ended meanwhile)
    counts as ``ended``."""
    out = dict.fromkeys(KINDS, 0.0)
    waited, live = 0.0, 0.0
    for tid, (kind, run, wait) in after.threads.items():
        _, run0, wait0 = before.threads.get(tid, (kind, 0, 0))
        out[kind] += (run - run0) * 1e-9
        live += (run - run0) * 1e-9
        waited += (wait - wait0) * 1e-9
    out["ended"] = max(0.0, after.total - before.total - live)
    out["waited"] = waited
    return {k: v / max(1, calls) for k, v in out.items()}
