"""MESH_COLL_DEBUG=1: which path each collective took, one line to stderr.

Each rank writes a line the first time a group takes a (collective, path)
combination, e.g. ``meshrun rank 2: all_reduce on world (4 ranks, 2 hosts
((0,1),(2,3))): two levels, columns, 1 MiB`` (the size is the first such
call's). The path names the choice the call made: the same-host board, an
algorithm over sockets, the two levels across hosts and their form, the
short way of a tiny array, a device array's IPC or staging. The hosts are the
rendezvous table's (MESH_HOST_ID's where it fakes them).

Read with the tuning variables (collectives.plan.Tuning, at the first
collective and whenever they change); off, a call's cost is one test of the
module's ``ON``.
"""
from __future__ import annotations

import sys
import threading
from typing import Mapping

from mesh import Comm
from mesh.peer import config_flag

__all__ = ["ON", "read", "note"]

ON = False
_seen: set[tuple[int, str, str]] = set()
_lock = threading.Lock()


def read(env: Mapping[str, str]) -> None:
    """Set ``ON`` from MESH_COLL_DEBUG in ``env`` (a bad value raises naming it)."""
    global ON
    ON = config_flag("MESH_COLL_DEBUG", False, env)


def _size(nbytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.4g} {unit}"
    return f"{nbytes} B"


def hosts_of(g: Comm) -> tuple[tuple[int, ...], ...]:
    """``g``'s ranks by host (hosts in order of their first rank)."""
    ch = g.collective_channel()
    ids = [ch.host(r) for r in range(g.size)]
    return tuple(tuple(r for r in range(g.size) if ids[r] == h) for h in dict.fromkeys(ids))


def note(g: Comm, coll: str, path: str, nbytes: int | None = None) -> None:
    """Write the line for ``g``'s ``coll`` taking ``path`` if it is the
    first such (called only where ``ON``)."""
    key = (g.gid, coll, path)
    with _lock:
        if key in _seen:
            return
        _seen.add(key)
    hosts = hosts_of(g)
    where = f"{len(hosts)} host{'s' if len(hosts) > 1 else ''}"
    if len(hosts) > 1:
        where += " (" + ",".join("(" + ",".join(map(str, h)) + ")" for h in hosts) + ")"
    size = "" if nbytes is None else f", {_size(nbytes)}"
    try:
        sys.stderr.write(f"meshrun rank {g.ranks[g.rank]}: {coll} on {g.name} ({g.size} rank"
                         f"{'s' if g.size > 1 else ''}, {where}): {path}{size}\n")
        sys.stderr.flush()
    except (OSError, ValueError):       # (stderr closed: nothing to tell)
        pass


def forget() -> None:
    """Write every combination's line again (tests)."""
    with _lock:
        _seen.clear()
