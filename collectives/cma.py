"""Same-host single-copy path: Linux cross-memory attach.

When every member of a group runs on this host and may read the others'
memory (``process_vm_readv``: same user, no ptrace restriction), large
collectives stop pushing bytes through sockets. Ranks exchange the address
of their buffer, and each one copies what it needs straight out of its
peers' buffers: one kernel copy per byte instead of three through ZeroMQ
and ipc://, and no fresh pages. ZeroMQ carries only small control messages,
still stamped with the collective's fingerprint.

    all_reduce, rank r of n:
      1. tell every peer where my buffer is              (entry)
      2. chunk r: read it from each peer, reduce into mine, 1 MiB at a time
      3. tell every peer "chunk r is final"
      4. for each peer p that said so: read its chunk p into mine
      5. tell every peer "done with your buffer", wait for theirs (exit)

Whether a group can use it is settled once, on its first large collective,
by every member reading a token out of every other one; MESH_CMA=0 turns it
off. Otherwise the ring over ZeroMQ runs.
"""
from __future__ import annotations

import ctypes
import os
import secrets
import sys
import threading
import weakref
from typing import Any

import numpy as np

from mesh import LostPeerError

from .ops import ReduceOp
from .plan import ring_chunks, segments
from .runner import Ctx

__all__ = ["usable", "all_reduce", "all_gather", "reduce_scatter", "broadcast"]


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc: Any = None
_token = np.zeros(2, np.uint64)
_token_pid = 0
_groups: "weakref.WeakKeyDictionary[Any, list[int] | None]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _syscall() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.process_vm_readv
        fn.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                       ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]
        fn.restype = ctypes.c_ssize_t
        _libc = fn
    return _libc


def read(pid: int, addr: int, dst: np.ndarray) -> None:
    """Copy ``dst.nbytes`` bytes at ``addr`` in process ``pid`` into ``dst``."""
    fn = _syscall()
    base, total, done = dst.ctypes.data, dst.nbytes, 0
    while done < total:
        local = _IoVec(base + done, total - done)
        remote = _IoVec(addr + done, total - done)
        got = fn(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got <= 0:
            err = ctypes.get_errno()
            raise OSError(err, f"process_vm_readv from pid {pid}: {os.strerror(err)}")
        done += got


def peer_read(ctx: Ctx, peer: int, addr: int, dst: np.ndarray) -> None:
    """``read`` from group rank ``peer`` of this collective; a peer that is
    gone raises LostPeerError naming it (by world rank, as the mesh does)."""
    try:
        read(_pids(ctx)[peer], addr, dst)
    except OSError as e:
        world = ctx.g.ranks[peer] if hasattr(ctx.g, "ranks") else peer
        raise LostPeerError(f"rank {ctx.g.rank}: collective #{-ctx.tag} on group "
                            f"{getattr(ctx.g, 'name', '?')}: cannot read the memory of rank "
                            f"{peer} ({e.strerror}): it is gone", world) from None


def _my_token() -> np.ndarray:
    global _token_pid
    if _token_pid != os.getpid():
        _token[:] = [os.getpid(), secrets.randbits(64)]
        _token_pid = os.getpid()
    return _token


def _exchange(ctx: Ctx, obj: Any) -> list[Any]:
    """Every rank's ``obj``, by rank (one message to and from each peer)."""
    n, rank = ctx.g.size, ctx.g.rank
    peers = [(rank + k) % n for k in range(1, n)]
    recvs = {p: ctx.irecv(p) for p in peers}
    sends = [ctx.isend(obj, p) for p in peers]
    out = [obj if p == rank else recvs[p].wait() for p in range(n)]
    for s in sends:
        s.wait()
    return out


def _probe(ctx: Ctx) -> list[int] | None:
    from mesh.env import host_id

    willing = sys.platform == "linux" and os.environ.get("MESH_CMA", "1") != "0"
    tok = _my_token()
    me = {"host": host_id(), "pid": os.getpid(), "addr": tok.ctypes.data,
          "token": [int(t) for t in tok], "on": willing}
    everyone = _exchange(ctx, me)
    ok = all(p["on"] and p["host"] == me["host"] for p in everyone)
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
    agreed = all(_exchange(ctx, ok))
    return [p["pid"] for p in everyone] if agreed else None


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


def _pids(ctx: Ctx) -> list[int]:
    pids = _groups[ctx.g]
    assert pids is not None
    return pids


def _signal_all(ctx: Ctx, obj: Any = None) -> list[Any]:
    peers = [(ctx.g.rank + k) % ctx.g.size for k in range(1, ctx.g.size)]
    return [ctx.isend(obj, p) for p in peers]


def _wait_all(ctx: Ctx, sends: list[Any]) -> None:
    """Hear once from every peer, and finish our own sends."""
    peers = [(ctx.g.rank + k) % ctx.g.size for k in range(1, ctx.g.size)]
    for req in [ctx.irecv(p) for p in peers]:
        req.wait()
    for s in sends:
        s.wait()


def _reduce_chunk(ctx: Ctx, addrs: list[int], src: np.ndarray, lo: int, hi: int,
                  dst: np.ndarray, op: ReduceOp) -> None:
    """dst = src[lo:hi] (op) every peer's [lo:hi], segment by segment through
    one warm scratch buffer, peers in ring order from rank + 1. ``dst`` may
    be ``src[lo:hi]`` itself."""
    n, rank, item = ctx.g.size, ctx.g.rank, src.itemsize
    per = max(1, ctx.tuning.segment // item)
    scratch = np.empty(min(per, hi - lo), src.dtype)
    in_place = np.may_share_memory(dst, src)
    for a, b in segments(lo, hi, max(1, -(-(hi - lo) // per))):
        out = dst[a - lo:b - lo]
        if not in_place:
            out[...] = src[a:b]
        tmp = scratch[:b - a]
        for k in range(1, n):
            p = (rank + k) % n
            peer_read(ctx, p, addrs[p] + a * item, tmp)
            op.combine(out, tmp)


def all_reduce(ctx: Ctx, buf: np.ndarray, op: ReduceOp) -> None:
    n, rank, item = ctx.g.size, ctx.g.rank, buf.itemsize
    addrs = _exchange(ctx, buf.ctypes.data)
    bounds = ring_chunks(buf.size, n)
    lo, hi = bounds[rank]
    _reduce_chunk(ctx, addrs, buf, lo, hi, buf[lo:hi], op)
    final = _signal_all(ctx)
    peers = [(rank + k) % n for k in range(1, n)]
    for p, req in [(p, ctx.irecv(p)) for p in peers]:
        req.wait()
        a, b = bounds[p]
        if b > a:
            peer_read(ctx, p, addrs[p] + a * item, buf[a:b])
    _wait_all(ctx, final + _signal_all(ctx))


def reduce_scatter(ctx: Ctx, buf: np.ndarray, out: np.ndarray, op: ReduceOp) -> None:
    """``out`` = this rank's share (chunk ``rank`` of the flat ``buf``),
    reduced over the group; ``buf`` is left as it was."""
    addrs = _exchange(ctx, buf.ctypes.data)
    lo, hi = ring_chunks(buf.size, ctx.g.size)[ctx.g.rank]
    _reduce_chunk(ctx, addrs, buf, lo, hi, out, op)
    _wait_all(ctx, _signal_all(ctx))


def all_gather(ctx: Ctx, buf: np.ndarray, out: np.ndarray) -> None:
    """Row p of ``out`` (flat rows of buf.size) = rank p's ``buf``."""
    n, rank = ctx.g.size, ctx.g.rank
    addrs = _exchange(ctx, buf.ctypes.data)
    rows = out.reshape(n, -1)
    rows[rank] = buf
    for k in range(1, n):
        p = (rank + k) % n
        if buf.size:
            peer_read(ctx, p, addrs[p], rows[p])
    _wait_all(ctx, _signal_all(ctx))


def broadcast(ctx: Ctx, buf: np.ndarray, root: int) -> None:
    """Every rank copies the root's buffer; the root waits until all have."""
    if ctx.g.rank == root:
        sends = _signal_all(ctx, buf.ctypes.data)
        _wait_all(ctx, sends)
        return
    addr = ctx.recv(root)
    if buf.size:
        peer_read(ctx, root, addr, buf)
    ctx.send(None, root)
