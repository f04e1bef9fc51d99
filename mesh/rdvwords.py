"""The rendezvous' words, checked where they arrive: a join at the service
(``join_fault``), the table at a rank (``table_fault``). Each rank holds
every rank's join in the table, so each field has a type and a size: a
holder of the job secret could put 64 KiB a rank there, and a malformed
table raised a bare TypeError or KeyError inside mesh.world.
"""
from __future__ import annotations

from typing import Any

__all__ = ["MAX_FIELD", "join_fault", "table_fault", "kind", "text"]

MAX_FIELD = 255     # bytes of a join's host id, and of each endpoint


def join_fault(req: dict[str, Any]) -> str:
    """What is wrong with join ``req`` ('' if nothing): each rank receives
    every rank's host, endpoints, pid and window in the table, so each has
    its type and a size (a holder of the secret could put 64 KiB a rank
    there, for every rank to hold); its call (the service compares it, to
    know the same join sent again) is an integer, where it has one."""
    for field in ("rank", "size"):
        if type(req.get(field)) is not int:
            return f"its {field} is {kind(req.get(field))}, not an integer"
    if type(req.get("pid", 0)) is not int:
        return f"its pid is {kind(req['pid'])}, not an integer"
    for field in ("window", "call"):        # (optional)
        if req.get(field) is not None and type(req[field]) is not int:
            return f"its {field} is {kind(req[field])}, not an integer"
    host = req.get("host", "")
    if not isinstance(host, str):
        return f"its host is {kind(host)}, not a string"
    if len(host.encode()) > MAX_FIELD:
        return (f"its host id is {len(host.encode())} bytes, more than {MAX_FIELD} "
                f"(MESH_HOST_ID, or the host name)")
    eps = req.get("endpoints")
    if not (isinstance(eps, dict) and set(eps) == {"ipc", "tcp"}):
        return "its endpoints are not {'ipc': 'ipc://...', 'tcp': 'tcp://...'}"
    for k in ("ipc", "tcp"):
        if not (isinstance(eps[k], str) and eps[k].startswith(f"{k}://")):
            return f"its {k} endpoint is not a string '{k}://...'"
        if len(eps[k].encode()) > MAX_FIELD:
            return f"its {k} endpoint is {len(eps[k].encode())} bytes, more than {MAX_FIELD}"
    return ""


def kind(value: Any) -> str:
    """A value's type, as a refusal names it (never the value: it may be large)."""
    return "missing" if value is None else f"of type {type(value).__name__}"


def table_fault(peers: Any, size: int) -> str:
    """What is wrong with the table ``peers`` the service sent, for a job of
    ``size`` ranks ('' if nothing): mesh.world reads each rank's host,
    endpoints, pid and window, where a malformed one raised a TypeError or
    KeyError naming nothing."""
    if not isinstance(peers, list) or len(peers) != size:
        return (f"{len(peers)} peers for a world of {size}" if isinstance(peers, list)
                else f"its peers are of type {type(peers).__name__}, not a list")
    for r, p in enumerate(peers):
        eps = p.get("endpoints") if isinstance(p, dict) else None
        if not (isinstance(p, dict) and p.get("rank") == r and type(p["rank"]) is int
                and isinstance(p.get("host"), str) and isinstance(eps, dict)
                and all(isinstance(eps.get(k), str) for k in ("ipc", "tcp"))
                and all(p.get(k) is None or type(p[k]) is int for k in ("pid", "window"))):
            return f"its entry for rank {r} is not {{rank, host, endpoints, pid, window}}"
    return ""


def text(value: Any) -> str:
    """A string a message said, as an error quotes it: at most 1000
    characters; what is no string is not quoted (its repr may be large, or
    nested too deep to make one)."""
    if isinstance(value, str):
        return value if len(value) <= 1000 else value[:1000] + "..."
    return f"(not a string: {type(value).__name__})"
