"""Plain TCP streams for the ring's data between ranks on different hosts.

Over a ZeroMQ socket a large message is read by ZeroMQ's I/O thread into a
buffer it allocates, then copied into its destination: two copies and a
thread hand-off per byte, where gloo has one copy. Measured on a 2-core
machine (BENCHMARKS.md, issue 13, sixth session), 64 MiB exchanged both ways
over loopback TCP cost 70-98 ms of CPU per process through pyzmq (zero-copy
send, copy into place) against 46-62 ms through plain sockets, and the ring
all_reduce 97 ms against gloo's 52-56. So a ring link that crosses hosts
carries its segments over a plain TCP connection instead, received with
``recv_into`` straight into the ring's slot or the buffer itself, and sent
from the buffer, both ways by a thread of the call's own while the caller
reduces (the sockets' calls let go of the interpreter).

Per call and per link (A sends to B), through the mesh, fingerprinted (so a
mismatch is seen as on any ring call)::

    B -> A   [port, token, kept]    B's listener (one per process, any address);
                                    kept: the id of the connection from A that
                                    B kept from an earlier call (0: none)
    A        holds the same kept connection: writes the call's tag on it,
             and the call's bytes follow (no more messages); else resets the
             one it holds, if any, connects to B's host (B's tcp:// endpoint)
             and sends a hello: token, group id, tag, A's world rank
    A -> B   (a new connection only) [True] (or [False]: it could not
             connect, and will not try again; the link then runs over the
             mesh's socket as before)
    B        kept one: reads the tag on it, or, when A reset it instead,
             waits for A's message; a new one: takes A's connection off its
             listener (by group, tag and rank; a stranger without the token
             is closed)

A connection is kept for the next call on the group (by both ends, its id
the tag of the call that made it) only when the call moved every byte of
it and nothing failed; any failure resets it, so a call never starts on a
stream with something half-read in it, and an end that dropped its side
makes the other end drop its own (the ids differ, or the reset is seen).
Kept, the next call saves a mesh message, the connection and the hello
(MESH_COLL_STREAM_KEEP=0: a new one every call, the receiver closing with
a reset once it has read everything, so neither side keeps a TIME_WAIT).
While it waits on a stream a rank watches the call's tag (an abort, a lost
peer or a mismatch seen elsewhere fails it there) and its deadline; a stream
that ends early is a lost peer, named. Off with MESH_COLL_STREAM=0, under
CurveZMQ (the stream is not encrypted), and below MESH_COLL_STREAM_MIN bytes
per link (8M; below, setting the stream up (two mesh messages, a
connection, a thread) costs more than it saves: 1 MiB all_reduce took 8 ms
with one against 3 without).
"""
from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
import weakref
from collections import deque
from typing import Any

import numpy as np

from mesh import LostPeerError, MeshError
from mesh.listener import HELLO as _HELLO, MAGIC as _MAGIC
from mesh.listener import reset as _reset, the_listener as _the_listener
from mesh.peer import config_bytes, config_flag

from ..runner import Ctx, caught, named

__all__ = ["Links", "open_links", "enabled", "stats"]

_CHUNK = 4 << 20                        # most bytes handed to one send / recv_into
_POLL_S = 0.05                          # between looks at the tag and the deadline
_CONNECT_S = 5.0
_HELLO_S = 2.0
_TAG = struct.Struct("<q")               # the call's tag, first on a kept connection
stats = {"links": 0, "connects": 0, "reused": 0, "sent": 0}   # ring calls that ran a stream,
#                     new connections, kept ones reused, bytes sent (tests, benchmarks)
_unreachable: set[int] = set()          # world ranks a connect failed to
_kept: dict[tuple[Any, int, str], tuple[socket.socket, int]] = {}
"""(group, peer's world rank, "out" / "in") -> (connection, id) kept from an
earlier call (taken out while a call uses it); the group dropped or its mesh
closing resets them. A group is (its mesh's transport's id, its id): a new
mesh's group, even one of the same id, keeps its own, and the table holds
no group alive."""
_kept_groups: set[Any] = set()           # groups whose drop (or mesh close) drops theirs
_kept_lock = threading.Lock()
_links: "weakref.WeakSet[Links]" = weakref.WeakSet()    # the calls' links under way


def _close_in_child() -> None:
    """In a child forked from this process: close its copies of the kept
    connections and of those of calls under way, never shut them down (the
    parent's stay open, in use). Kept, a copy held the connection up once
    the parent died: its peer, waiting on it for the next call's tag or a
    segment, saw no end and waited for the parent's silence to lose it (the
    peer timeout). The lock is a new one: a thread of the parent may have
    held it at the fork."""
    global _kept_lock
    _kept_lock = threading.Lock()
    socks = [conn for conn, _ in _kept.values()]
    socks += [s for links in list(_links) for s in (links.out, links.inp) if s is not None]
    _kept.clear()
    _kept_groups.clear()
    for sock in socks:
        sock.close()


os.register_at_fork(after_in_child=_close_in_child)


def _group_key(g: Any) -> tuple[int, int]:
    return id(g._t), g.gid


def _keeping() -> bool:
    return config_flag("MESH_COLL_STREAM_KEEP", True)


def _take_kept(key: tuple[Any, int, str]) -> tuple[socket.socket, int] | None:
    with _kept_lock:
        return _kept.pop(key, None)


def _keep(ctx: Ctx, key: tuple[Any, int, str], conn: socket.socket, cid: int) -> None:
    with _kept_lock:
        old = _kept.pop(key, None)
        _kept[key] = (conn, cid)
        first = key[0] not in _kept_groups
        _kept_groups.add(key[0])
    if first:
        ctx.ch.on_drop(lambda: _drop_kept(key[0]))
    if old is not None:
        _reset(old[0])


def _drop_kept(group: Any) -> None:
    """Close the connections kept for ``group`` (dropped, or its mesh
    closing): an incoming one by a reset (all it carried was read), an
    outgoing one gracefully, as a call that keeps none does (the peer may
    still be reading the last segment sent: a reset would drop it)."""
    with _kept_lock:
        mine = [k for k in _kept if k[0] == group]
        gone = [(k[2], _kept.pop(k)[0]) for k in mine]
        _kept_groups.discard(group)
    for way, conn in gone:
        if way == "in":
            _reset(conn)
        else:
            conn.close()


def enabled(ctx: Ctx, peer: int, nbytes: int) -> bool:
    """Whether the link to group rank ``peer`` carries ``nbytes`` over a
    stream: another host (a tcp:// endpoint), no CurveZMQ, big enough. The
    same answer on both ends of a link (job-wide settings, the same sizes)."""
    env = os.environ
    if not config_flag("MESH_COLL_STREAM", True, env) or nbytes < config_bytes(
            "MESH_COLL_STREAM_MIN", 8 << 20):
        return False
    return ctx.ch.endpoint(peer).startswith("tcp://") and not ctx.ch.encrypted


def _connect(ctx: Ctx, peer: int, port: int, token: bytes) -> socket.socket | None:
    host = ctx.ch.endpoint(peer)[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    try:
        conn = socket.create_connection((host, port), timeout=min(_CONNECT_S, ctx.left() or 0.1))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(min(_CONNECT_S, ctx.left() or 0.1))
        conn.sendall(_HELLO.pack(_MAGIC, token, ctx.g.gid, ctx.tag, ctx.g.ranks[ctx.g.rank]))
        conn.setblocking(False)
        stats["connects"] += 1
        return conn
    except OSError:
        return None


class _Req:
    """A stream send or receive: ``wait()`` returns once it is done (a
    receive returns its destination)."""

    __slots__ = ("links", "arr", "mv", "off", "done_")

    def __init__(self, links: "Links", arr: np.ndarray) -> None:
        self.links, self.arr = links, arr
        self.mv = memoryview(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        self.off = 0
        self.done_ = self.mv.nbytes == 0

    def done(self) -> bool:
        return self.done_

    def wait(self) -> np.ndarray:
        if not self.done_:
            self.links.until(self)
        return self.arr


class Links:
    """One ring call's streams: ``out`` to the right neighbour, ``inp`` from
    the left one (either None: that link runs over the mesh). A thread of
    their own moves both ways (the sockets' calls let go of the interpreter,
    so it copies while the caller reduces, and a send moves whatever the
    caller waits for); the caller sleeps on a condition until its request
    is done, watching the call."""

    def __init__(self, ctx: Ctx, left: int, right: int, out: socket.socket | None,
                 inp: socket.socket | None, ids: tuple[int, int] = (0, 0)) -> None:
        self.ctx, self.left, self.right, self.out, self.inp = ctx, left, right, out, inp
        self.ids = ids      # (out's, inp's) connection id: kept after a clean call
        self.sends: deque[_Req] = deque()
        self.recvs: deque[_Req] = deque()
        self.watch: Any = ctx.watch() if inp is not None else None
        self.cond = threading.Condition()
        self.error: tuple[int, str] | None = None     # (peer, why) the thread hit
        self.failed = self.stop = False
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.thread = threading.Thread(target=self._loop, daemon=True,
                                       name=f"mesh-stream-{ctx.where()}")
        self.thread.start()
        _links.add(self)

    def isend(self, arr: np.ndarray) -> _Req:
        return self._post(self.sends, _Req(self, arr))

    def irecv(self, arr: np.ndarray) -> _Req:
        return self._post(self.recvs, _Req(self, arr))

    def _post(self, queue: deque, req: _Req) -> _Req:
        if not req.done_:
            with self.cond:
                idle = not queue
                queue.append(req)
            if idle:
                self._wake()
        return req

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"w")
        except BlockingIOError:     # full: the thread has words enough
            pass

    def until(self, req: _Req) -> None:
        """Sleep until ``req`` is done, raising what failed the call."""
        cond = self.cond
        while True:
            with cond:
                if req.done_:
                    return
                if self.error is None:
                    cond.wait(_POLL_S)
                    if req.done_:
                        return
                err = self.error
            if err is not None:
                self._lost(*err)
            self.check(self.right if req in self.sends else self.left)

    def _loop(self) -> None:
        """The thread: send and read what the sockets take, sleep in poll."""
        poll = select.poll()
        out, inp, sends, recvs, cond = self.out, self.inp, self.sends, self.recvs, self.cond
        poll.register(self.wake_r, select.POLLIN)
        watching = 0
        try:
            while not self.stop:
                want = (select.POLLOUT if sends and out is not None else 0,
                        select.POLLIN if recvs and inp is not None else 0)
                for sock, ev, bit in ((out, want[0], 1), (inp, want[1], 2)):
                    if sock is not None and bool(ev) != bool(watching & bit):
                        if ev:
                            poll.register(sock, ev)
                        else:
                            poll.unregister(sock)
                        watching ^= bit
                for fd, _ in poll.poll(1000):
                    if fd == self.wake_r:
                        try:
                            os.read(self.wake_r, 4096)
                        except BlockingIOError:
                            pass
                done = self._move()
                if done:
                    with cond:
                        cond.notify_all()
        except _Broken as e:
            with cond:
                self.error = (e.peer, e.why)
                cond.notify_all()

    def _move(self) -> int:
        """Send and read what the sockets take now; how many requests ended."""
        done = 0
        sends, out = self.sends, self.out
        while sends and out is not None:
            head = sends[0]
            try:
                n = out.send(head.mv[head.off:head.off + _CHUNK])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                raise _Broken(self.right, f"the stream to it failed ({e.strerror or e})")
            stats["sent"] += n
            done += self._advance(sends, head, n)
        recvs, inp = self.recvs, self.inp
        while recvs and inp is not None:
            head = recvs[0]
            try:
                n = inp.recv_into(head.mv[head.off:], min(_CHUNK, head.mv.nbytes - head.off))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                raise _Broken(self.left, f"the stream from it failed ({e.strerror or e})")
            if n == 0:
                raise _Broken(self.left, "the stream from it ended early")
            done += self._advance(recvs, head, n)
        return done

    def _advance(self, queue: "deque[_Req]", head: "_Req", n: int) -> int:
        """``n`` more bytes of ``head`` (the first of ``queue``) moved: 1 when
        that ends it (marked done, taken off the queue), else 0."""
        head.off += n
        if head.off < head.mv.nbytes:
            return 0
        with self.cond:
            head.done_ = True
            queue.popleft()
        return 1

    def check(self, peer: int) -> None:
        """Raise what failed the call elsewhere (the watch), or a timeout."""
        watch = self.watch
        if watch is not None and watch.done():
            err = caught(watch, 0)
            raise err if err is not None else MeshError(
                f"{self.ctx.where()}: a peer sent a message where none was expected")
        if self.ctx.left() <= 0:
            raise self.ctx.timed_out(f" waiting for {named(self.ctx.g, peer)} (stream)")

    def _lost(self, peer: int, why: str) -> None:
        """The stream with ``peer`` broke: the mesh's own error when it has
        one (the peer's death, an abort), else a lost peer named here."""
        self.failed = True
        if self.watch is not None:
            err = caught(self.watch, 0.5)
            if err is not None:
                raise err
        world = self.ctx.g.ranks[peer]
        raise LostPeerError(f"{self.ctx.where()}: {named(self.ctx.g, peer)}: {why}", world)

    def arm(self) -> None:
        """Watch the tag from now on even without an incoming stream (every
        receive over the mesh is done: none can be taken for the watch)."""
        if self.watch is None:
            self.watch = self.ctx.watch()

    def close(self) -> None:
        """Stop the thread; then every byte was read, and both streams are
        kept for the next call (or the incoming one reset: safe) unless it
        failed, when both are reset."""
        broken = self.failed or bool(self.sends) or bool(self.recvs) or self.error is not None
        self.stop = True
        if broken:
            for sock in (self.out, self.inp):
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        self._wake()
        self.thread.join(_HELLO_S)
        broken = broken or self.thread.is_alive()
        keep = not broken and _keeping()
        g = self.ctx.g
        for sock, peer, way, cid in ((self.out, self.right, "out", self.ids[0]),
                                     (self.inp, self.left, "in", self.ids[1])):
            if sock is None:
                continue
            if keep:
                _keep(self.ctx, (_group_key(g), g.ranks[peer], way), sock, cid)
            elif way == "in" or broken:
                _reset(sock)
            else:
                sock.close()
        if not self.thread.is_alive():
            os.close(self.wake_r)
            os.close(self.wake_w)
        if self.watch is not None and not self.watch.done():
            caught(self.watch, 0)


class _Broken(Exception):
    def __init__(self, peer: int, why: str) -> None:
        super().__init__(why)
        self.peer, self.why = peer, why


def open_links(ctx: Ctx, left: int, right: int, nbytes: int) -> Links | None:
    """Set up this call's streams (module docstring) for a ring moving
    ``nbytes`` over each link; None when neither link takes one."""
    use_in, use_out = enabled(ctx, left, nbytes), enabled(ctx, right, nbytes)
    if not (use_in or use_out):
        return None
    gid, lw, rw = ctx.g.gid, ctx.g.ranks[left], ctx.g.ranks[right]
    kin = _take_kept((_group_key(ctx.g), lw, "in")) if use_in else None
    kout = _take_kept((_group_key(ctx.g), rw, "out")) if use_out else None
    lis = _the_listener() if use_in else None
    out = inp = None
    ids = [0, 0]
    try:
        told = ctx.isend([lis.port, lis.token, kin[1] if kin else 0], left) \
            if lis is not None else None
        if use_out:
            port, token, cid = ctx.recv(right)
            if kout is not None and cid == kout[1] and _tell(kout[0], ctx.tag):
                out, ids[0] = kout[0], cid
                stats["reused"] += 1
            else:
                if kout is not None:
                    _reset(kout[0])
                if rw not in _unreachable:      # once refused (a firewall), not tried again
                    out = _connect(ctx, right, int(port), bytes(token))
                    if out is None:
                        _unreachable.add(rw)
                ids[0] = ctx.tag
                ctx.send([out is not None], right)
            kout = None
        if lis is not None:
            assert told is not None
            told.wait()
            said = None
            if kin is not None:
                inp, said = _told(ctx, left, kin[0])
                ids[1] = kin[1]
                kin = None
            if inp is None:
                (ok,) = said if said is not None else ctx.recv(left)
                ids[1] = ctx.tag
                if ok:
                    key = (gid, ctx.tag, lw)
                    inp = lis.take(key, time.monotonic() + min(ctx.left(), _CONNECT_S))
                    if inp is None:
                        raise LostPeerError(f"{ctx.where()}: {named(ctx.g, left)} said it "
                                            f"connected its stream but none came", lw)
                    inp.setblocking(False)
    except BaseException:
        for sock in (out, inp, kin[0] if kin else None, kout[0] if kout else None):
            if sock is not None:
                _reset(sock)
        raise
    if inp is None and out is None:
        return None
    stats["links"] += 1
    return Links(ctx, left, right, out, inp, (ids[0], ids[1]))


def _tell(conn: socket.socket, tag: int) -> bool:
    """Write the call's tag on a kept connection (its receiver waits for it);
    False if that failed (the other end reset it)."""
    try:
        conn.settimeout(_HELLO_S)
        conn.sendall(_TAG.pack(tag))
        conn.setblocking(False)
        return True
    except OSError:
        return False


def _told(ctx: Ctx, left: int, conn: socket.socket) -> tuple[socket.socket | None, Any]:
    """(the kept connection from ``left``, None) once the call's tag came on
    it; (None, the sender's message) when that came instead: the sender
    reset the kept one (so it is reset here) and made a new one, or could
    not. Aborts and the deadline raise."""
    req = ctx.irecv(left)
    poll = select.poll()
    poll.register(conn, select.POLLIN)
    got = b""
    try:
        while not req.done():
            if ctx.left() <= 0:
                raise ctx.timed_out(f" waiting for {named(ctx.g, left)} (kept stream)")
            if not poll.poll(int(_POLL_S * 1000)):
                continue
            try:
                more = conn.recv(_TAG.size - len(got))
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                more = b""
            if not more:            # reset by the sender: its message follows
                break
            got += more
            if len(got) == _TAG.size:
                (tag,) = _TAG.unpack(got)
                if tag != ctx.tag:
                    raise MeshError(f"{ctx.where()}: the stream from rank "
                                    f"{ctx.g.ranks[left]} carried call {tag}'s bytes, "
                                    f"not this call's")
                err = caught(req.req, 0)
                if err is not None:
                    raise err
                return conn, None
    except BaseException:
        caught(req.req, 0)
        raise
    _reset(conn)
    return None, req.wait()
