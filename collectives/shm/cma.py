"""Linux cross-memory attach: one process reads another's memory with
``process_vm_readv``, one kernel copy per byte (about 10 GB/s on a small
VM, against about 1 GB/s per direction for two busy ipc:// sockets).

When every member of a group runs on this host (the same host id in the
mesh's rendezvous table, mesh.env.host_id) and may read the others'
memory (same user; where Yama restricts ptrace to ancestors, each process
opts out with prctl(PR_SET_PTRACER_ANY) first), the group uses it: the board
(collectives.shm.board) for synchronization and collectives.shm.local for the
data. Whether it may is settled once, on the group's first collective that
asks, by every member reading a token out of every other one and all
agreeing; MESH_CMA=0 turns it off. Otherwise the socket algorithms run.
"""
from __future__ import annotations

import errno
import os
import sys
import threading
import weakref

import numpy as np

from mesh import Comm, LostPeerError, MeshError
from mesh.cma import Reader, allow_peers, read, token
from mesh.peer import config_flag

from ..host.exchange import all_gather_object_direct
from ..runner import Ctx, caught, named

__all__ = ["read", "Reader", "failed_read", "peer_read", "usable", "probed", "pids", "forget"]

_LEFT_WAIT_S = 2.0
_groups: "weakref.WeakKeyDictionary[Comm, list[int] | None]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def failed_read(ctx: Ctx, peer: int, err: int, what: str) -> MeshError:
    """The error for a read of group rank ``peer`` that failed with ``err``.
    ESRCH: the process is gone, LostPeerError; or, when it said why before
    it left (a failing rank leaves once its peers have heard its goodbye,
    which follows any abort it sent), the abort or its failure. Anything
    else (EFAULT): the peer is alive but has left this collective after an
    error of its own and its buffer went with it; whoever failed first
    aborted the tag, so wait a moment for that abort and raise it."""
    where, world, who = ctx.where(), ctx.g.ranks[peer], named(ctx.g, peer)
    wait = 0.0 if err == errno.ESRCH else min(_LEFT_WAIT_S, ctx.left())
    aborted = caught(ctx.watch(), wait)
    if isinstance(aborted, MeshError):
        return aborted
    if err == errno.ESRCH:
        # one that said goodbye first (its peers' readers answered it, so its close
        # did not wait for them): that is why, as the transport's waits say
        left = ctx.ch.left(peer, where.split(": ", 1)[-1])
        if left is not None:
            return left
        return LostPeerError(f"{where}: cannot read {what} of {who} (no such process): "
                             f"it is gone", world)
    return MeshError(f"{where}: {what} of {who} is gone ({os.strerror(err)}): it left "
                     f"the collective")


def peer_read(ctx: Ctx, peer: int, addr: int, dst: np.ndarray) -> None:
    """``read`` from group rank ``peer`` of this collective; a failure raises
    what ``failed_read`` says."""
    try:
        read(pids(ctx)[peer], addr, dst)
    except OSError as e:
        raise failed_read(ctx, peer, e.errno or errno.EFAULT, "the memory") from None


def _probe(ctx: Ctx) -> list[int] | None:
    """The members' pids, or None where the group may not read each other
    (another host says the mesh's table: known on every rank, no message)."""
    host = ctx.ch.host
    if any(host(p) != host(ctx.g.rank) for p in range(ctx.g.size)):
        return None
    willing = sys.platform == "linux" and config_flag("MESH_CMA", True)
    if willing:
        allow_peers()
    tok = token()
    me = {"pid": os.getpid(), "addr": tok.ctypes.data, "token": [int(t) for t in tok],
          "on": willing}
    everyone = all_gather_object_direct(ctx, me)
    ok = all(p["on"] for p in everyone)
    if ok:
        got = np.zeros(2, np.uint64)
        for i, p in enumerate(everyone):
            if i == ctx.g.rank:
                continue
            try:
                read(p["pid"], p["addr"], got)
            except (OSError, AttributeError):
                ok = False
                break
            ok = ok and [int(t) for t in got] == p["token"]
    agreed = all(all_gather_object_direct(ctx, ok))
    return [p["pid"] for p in everyone] if agreed else None


def forget(g: Comm) -> None:
    """Probe ``g`` again on its next ask (collectives.host.hier.unsettle: a
    failed call may have left it probed on some ranks only)."""
    with _lock:
        _groups.pop(g, None)


def probed(g: Comm) -> bool | None:
    """What ``usable`` found for ``g``, or None before its probe (no message)."""
    with _lock:
        return _groups[g] is not None if g in _groups else None


def usable(ctx: Ctx) -> bool:
    """Whether this group reads its peers' memory directly; probed (with
    messages under this collective's tag) on the group's first ask."""
    with _lock:
        known = ctx.g in _groups
    if not known:
        pids = _probe(ctx)
        with _lock:
            _groups[ctx.g] = pids
    return _groups[ctx.g] is not None


def pids(ctx: Ctx) -> list[int]:
    with _lock:
        pids = _groups.get(ctx.g)
    if pids is None:    # (forgotten meanwhile: hier.unsettle runs in the lane's order)
        raise MeshError(f"{ctx.where()}: the group's cross-memory attach was forgotten "
                        f"during the call")
    return pids
