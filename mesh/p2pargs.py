"""The checks of the arguments every point-to-point call shares (mesh.comm,
mesh.request, mesh.mprobe, mesh.persistent): a tag, a timeout, a
``status=``; and the hint an error gives for a rank in the world's
numbering where a sub-group's was wanted."""
from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

import numpy as np

from .match import ANY_TAG
from .status import Status

if TYPE_CHECKING:
    from .comm import Comm

__all__ = ["group_rank_hint"]


def group_rank_hint(comm: "Comm", r: Any) -> str:
    """For a rank given outside a sub-group's numbering that is a world rank
    of one of its members: "a group numbers its own ranks: world rank 3 is
    its rank 1" (else ""), for errors of calls that take a rank."""
    if not (comm.gid and isinstance(r, (int, np.integer)) and r in comm.ranks):
        return ""
    return (f"a group numbers its own ranks: world rank {r} is its rank "
            f"{comm.ranks.index(int(r))}")


def _check_tag(tag: int, comm: Comm, op: str, any_tag: bool = False) -> int:
    """A user tag is 0..2**63-1 (int64 on the wire; negative ones are the
    collectives'); receives and probes may also ask for ANY_TAG. Returns it
    as a Python int (a numpy integer's value); True and False are no tags."""
    if type(tag) is int and 0 <= tag < ANY_TAG:
        return tag
    if isinstance(tag, (int, np.integer)) and not isinstance(tag, (bool, np.bool_)) and (
            0 <= tag < ANY_TAG or (any_tag and tag == ANY_TAG)):
        return int(tag)
    extra = " or mesh.ANY_TAG" if any_tag else ""
    raise ValueError(f"rank {comm._t.rank}: {op} on group {comm.name}: tag must be an integer "
                     f">= 0 (and < 2**63){extra}, got {tag!r}")


def _check_timeout(timeout: Any, comm: Comm, op: str) -> float:
    """A blocking call's ``timeout=``: seconds >= 0 (math.inf: no limit but
    the mesh's own), as a float; anything else is the caller's error."""
    if type(timeout) is float and timeout >= 0 or type(timeout) is int and timeout >= 0:
        return min(float(timeout), _FOREVER)
    if isinstance(timeout, numbers.Real) and not isinstance(timeout, bool) \
            and float(timeout) >= 0:
        return min(float(timeout), _FOREVER)
    raise ValueError(f"rank {comm._t.rank}: {op} on group {comm.name}: timeout must be a "
                     f"number of seconds >= 0 or None, got {timeout!r}")


def _check_status(status: Any, comm: Comm, op: str) -> None:
    """A ``status=`` that could not be filled in raises before anything is
    received (after, the message would be lost with the error)."""
    if not isinstance(status, Status):
        raise TypeError(f"rank {comm._t.rank}: {op} on group {comm.name}: status= takes a "
                        f"mesh.Status (or None), got {type(status).__name__}")


_FOREVER = 10.0 * 365 * 86400    # what an infinite timeout waits (the clocks' arithmetic)
