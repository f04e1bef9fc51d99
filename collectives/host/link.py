"""Kept plain TCP connections for the small messages between host leaders.

An 8-byte exchange between two ranks on different hosts through the mesh
takes its ZeroMQ socket, ZeroMQ's I/O thread on both sides and the mesh's
reading turn: measured across a veth pair on the 2-core machine (issue 13,
eighth session, BENCHMARKS.md), a mesh round trip of 8 B 300 us, raw pyzmq
110 us, a plain TCP socket 30 us; in the hierarchical all_reduce of 8 B at
2 hosts x 2 ranks the leaders' exchange held 600-900 us of a 1.3-1.5 ms call.
So a small all_reduce's recursive doubling (the columns' or the leaders'
of the hierarchical one, the flat one where a group's ranks cannot share
memory) runs over a TCP connection per pair of ranks on different hosts,
made once (the group's first such call) and kept, read by the calling
thread itself (no other thread): it sleeps in ``poll`` at once, or first
polls the socket for up to MESH_COLL_LINK_SPIN_US (0 unless set), adapted
to the waits seen as the mesh's receives are. A wait here is mostly the
peer's turn on a core, not the wire: on the 2-core machine at 2 hosts x 2
ranks, load 16, the 8 B all_reduce took 1094 us (median) / 1217 (mean)
and 286 us CPU per rank without the spin, 1238 / 1690 and 360 us with
MESH_SPIN_US's 200 us (BENCHMARKS.md, issue 13, ninth session).

Setting a pair up, in that first call, through the mesh (pairs a < b)::

    a -> b   [port, token]     a's listener (collectives.host.stream's)
    b        connects, sends the hello (token, group id, tag, b's world rank)
    b -> a   [True] (or [False]: b could not connect; the pair then talks
             over the mesh for good, on both sides)

A frame is ``tag, fingerprint length, payload length`` (struct ``<qII``),
the fingerprint (msgpack) and the payload: a receiver whose fingerprint
differs raises MismatchError (so does the sender, reading the other's
frame). A frame of an earlier call (one that failed here before reading
it) is dropped, one of a later call kept for it. While it waits a rank
looks every _SLICE_S at the call's tag (an abort), its deadline, and a
receive posted on the tag (a lost peer the mesh saw, a peer that talked
over the mesh instead); a closed connection is a lost peer, named. Off
with MESH_COLL_LINK=0 and under CurveZMQ (the link is not encrypted).
"""
from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
import weakref
from typing import Any

import msgpack
import numpy as np

from mesh import Comm, LostPeerError, MeshError, MismatchError
from mesh.peer import config_flag, config_float
from mesh.progress import adapt_spin

from ..runner import Ctx, caught, named
from . import stream

__all__ = ["Via", "via", "stats"]

_FRAME = struct.Struct("<qII")
_SLICE_S = 0.02
# a receive polls this long first
_SPIN_S = config_float("MESH_COLL_LINK_SPIN_US", 0.0, least=0) * 1e-6
_MAX = 1 << 20
stats = {"pairs": 0, "frames": 0, "dropped": 0}    # pairs set up, frames read, dropped (tests)


def _across(ctx: Ctx, peers: list[int]) -> list[int]:
    """Those of ``peers`` this rank would keep a link with: reached over
    tcp:// (another host, or MESH_FORCE_TCP). The same answer at both ends
    of a pair (job-wide settings, the rendezvous table)."""
    if not config_flag("MESH_COLL_LINK", True) or ctx.ch.encrypted:
        return []
    return [p for p in peers if ctx.ch.endpoint(p).startswith("tcp://")]


class _Link:
    """One kept connection to group rank ``peer``: what was read and not yet
    taken (``buf``), frames of later calls (``later``)."""

    def __init__(self, sock: socket.socket, peer: int) -> None:
        self.sock, self.peer = sock, peer
        sock.setblocking(False)
        self.buf = bytearray()
        self.later: dict[int, tuple[bytes, bytes]] = {}
        self.poll = select.poll()
        self.poll.register(sock, select.POLLIN)
        self.spin = _SPIN_S

    def send(self, ctx: Ctx, packed_fp: bytes, payload: memoryview) -> None:
        data = b"".join((_FRAME.pack(ctx.tag, len(packed_fp), payload.nbytes), packed_fp,
                         payload))
        view = memoryview(data)
        while view.nbytes:
            try:
                view = view[self.sock.send(view):]
            except (BlockingIOError, InterruptedError):
                out = select.poll()
                out.register(self.sock, select.POLLOUT)
                out.poll(_SLICE_S * 1000)
                _Wait(ctx, self).check()
            except OSError as e:
                _Wait(ctx, self).lost(f"the link to it failed ({e.strerror or e})")

    def take(self, ctx: Ctx) -> tuple[bytes, bytes]:
        """This call's frame from the peer: (its fingerprint, its payload)."""
        got = self.later.pop(ctx.tag, None)
        wait: _Wait | None = None
        start = time.perf_counter()
        spin_until = start + self.spin
        try:
            while got is None:
                frame = self._frame()
                if frame is None:
                    if time.perf_counter() < spin_until:
                        os.sched_yield()
                        continue
                    wait = wait or _Wait(ctx, self)
                    wait.idle()
                    continue
                tag, fp, payload = frame
                stats["frames"] += 1
                if tag == ctx.tag:
                    got = fp, payload
                elif tag < ctx.tag:         # (tags count down) a later call's
                    self.later[tag] = fp, payload
                else:
                    stats["dropped"] += 1
        finally:
            if wait is not None:
                wait.close()
        self.spin = adapt_spin(self.spin, time.perf_counter() - start, _SPIN_S)
        return got

    def _frame(self) -> tuple[int, bytes, bytes] | None:
        """A whole frame out of ``buf``, reading what the socket has; None
        when none is whole yet; a closed connection raises _Closed."""
        buf = self.buf
        while True:
            if len(buf) >= _FRAME.size:
                tag, fplen, paylen = _FRAME.unpack_from(buf)
                end = _FRAME.size + fplen + paylen
                if len(buf) >= end:
                    fp = bytes(buf[_FRAME.size:_FRAME.size + fplen])
                    payload = bytes(buf[_FRAME.size + fplen:end])
                    del buf[:end]
                    return tag, fp, payload
            try:
                got = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as e:
                raise _Closed(f"the link from it failed ({e.strerror or e})") from None
            if not got:
                raise _Closed("the link from it closed")
            buf += got


class _Closed(Exception):
    pass


class _Wait:
    """A wait on a link: sleeping in poll, looking at the call between slices."""

    def __init__(self, ctx: Ctx, link: _Link) -> None:
        self.ctx, self.link = ctx, link
        self.watch: Any = None
        self.what = ""
        self.t0 = time.monotonic()
        self.told = False

    def idle(self) -> None:
        left = self.ctx.left()
        if self.link.poll.poll(max(0, int(min(left, _SLICE_S) * 1000)) or 1):
            return
        self.check()
        if self.watch is None:
            # the link's peer only: the call's other peers may send on its tag
            # over the mesh (recursive doubling's same-host partners), and a
            # watch from any rank took their message (a MeshError here, or a
            # partner that waited for it until the call timed out)
            self.watch = self.ctx.watch(self.link.peer)
        if not self.told:   # (the peers' stall reports, and a timeout's late ranks: in the call)
            self.told = True
            self.ctx.ch.waiting(f"{self.what}: waiting for {named(self.ctx.g, self.link.peer)} "
                                f"(link)", self.t0)

    def check(self) -> None:
        ctx = self.ctx
        if not self.what:
            self.what = ctx.where().split(": ", 1)[1]
        aborted = ctx.ch.aborted(ctx.tag, self.what)
        if aborted is not None:
            raise aborted
        watch = self.watch
        if watch is not None and watch.done():
            err = caught(watch, 0)
            raise err if err is not None else MeshError(
                f"{ctx.where()}: a peer sent a message where none was expected")
        if ctx.left() <= 0:
            raise ctx.timed_out(f" waiting for {named(ctx.g, self.link.peer)} (link)")

    def lost(self, why: str) -> None:
        """The connection broke: the mesh's own error when it has one (the
        peer's death, an abort), else a lost peer named here."""
        if self.watch is None:
            self.watch = self.ctx.watch(self.link.peer)
        err = caught(self.watch, 0.5)
        if err is not None:
            raise err
        self.close()
        world = self.ctx.g.ranks[self.link.peer]
        raise LostPeerError(f"{self.ctx.where()}: {named(self.ctx.g, self.link.peer)}: {why}",
                            world)

    def close(self) -> None:
        if self.told:
            self.told = False
            self.ctx.ch.waiting(None)
        if self.watch is not None and not self.watch.done():
            caught(self.watch, 0)


class _Done:
    __slots__ = ()

    def wait(self) -> None:
        return None

    def done(self) -> bool:
        return True


_DONE = _Done()


class Via(Ctx):
    """``ctx`` whose messages to the peers in ``links`` go over their link
    (what all_reduce_rd uses: ``send``, ``isend``, ``recv``); the others over
    the mesh as before."""

    __slots__ = ("links", "packed")

    def __init__(self, ctx: Ctx, links: dict[int, _Link]) -> None:
        self.g, self.ch, self.tag, self.fp = ctx.g, ctx.ch, ctx.tag, ctx.fp
        self.tuning, self.name, self.timeout, self.deadline = (ctx.tuning, ctx.name,
                                                               ctx.timeout, ctx.deadline)
        self.links = links
        self.packed = msgpack.packb(ctx.fp)

    def isend(self, obj: Any, dst: int, fp: dict | None = None) -> Any:
        link = self.links.get(dst)
        if link is None or fp is not None:     # (its own fingerprint: over the mesh)
            return super().isend(obj, dst, fp)
        raw = np.ascontiguousarray(obj).reshape(-1).view(np.uint8).data
        link.send(self, self.packed, raw)
        return _DONE

    def send(self, obj: Any, dst: int) -> None:
        self.isend(obj, dst).wait()

    def recv(self, src: int, out: Any = None) -> Any:
        link = self.links.get(src)
        if link is None:
            return super().recv(src, out)
        try:
            fp, payload = link.take(self)
        except _Closed as e:
            _Wait(self, link).lost(str(e))
            raise
        if fp != self.packed or len(payload) != out.nbytes:
            self._mismatch(src, fp, len(payload), out.nbytes)
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(payload, np.uint8)
        return out

    def _mismatch(self, peer: int, fp: bytes, size: int, want: int) -> None:
        from ..shm.round import _fmt, mismatch_text
        mine, other = _fmt(self.packed), _fmt(fp)
        if mine == other:
            other += f" with a {size}-byte payload, {want} expected"
        raise MismatchError(mismatch_text(self.g, self.tag, peer, mine, other))


_groups: "weakref.WeakKeyDictionary[Comm, dict[int, _Link]]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def via(ctx: Ctx, peers: list[int], nbytes: int) -> Ctx:
    """``ctx`` for a small exchange with ``peers`` (group ranks) over the
    group's links, set up on the group's first call that asks (messages on
    this call's tag, the same on every member); ``ctx`` itself where the
    links are off or too small a share of the call."""
    if nbytes > _MAX:
        return ctx
    with _lock:
        links = _groups.get(ctx.g)
    if links is None:
        far = _across(ctx, peers)
        links = _setup(ctx, far) if far else {}
        with _lock:
            _groups[ctx.g] = links
    return Via(ctx, links) if links else ctx


def _setup(ctx: Ctx, peers: list[int]) -> dict[int, _Link]:
    """A link to each of ``peers`` (module docstring); a pair whose connect
    failed talks over the mesh."""
    me, lis = ctx.g.rank, stream._the_listener()
    told = [ctx.isend([lis.port, lis.token], p) for p in peers if me < p]
    links: dict[int, _Link] = {}
    for p in sorted(q for q in peers if q < me):
        port, token = ctx.recv(p)
        conn = stream._connect(ctx, p, int(port), bytes(token))
        ctx.send([conn is not None], p)
        if conn is not None:
            links[p] = _Link(conn, p)
    for req in told:
        req.wait()
    for p in sorted(q for q in peers if q > me):
        (ok,) = ctx.recv(p)
        if not ok:
            continue
        key = (ctx.g.gid, ctx.tag, ctx.g.ranks[p])
        conn = lis.take(key, time.monotonic() + min(ctx.left(), stream._CONNECT_S))
        if conn is None:
            raise LostPeerError(f"{ctx.where()}: {named(ctx.g, p)} said it connected its link "
                                f"but none came", key[2])
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        links[p] = _Link(conn, p)
    for link in links.values():     # (after the peer's goodbye, or with the group)
        ctx.ch.on_drop(link.sock.close)
    stats["pairs"] += len(links)
    return links
