"""Large point-to-point arrays to a peer on another host, over a plain TCP
stream kept per pair of world ranks, beside ZeroMQ (as mesh.direct is the
same-host path beside it).

Through ZeroMQ a 64 MiB round trip between two hosts cost 58 ms of CPU on a
2-core machine (23 sending, 35 receiving: ZeroMQ's I/O thread reads into
frames it allocates, then they are copied into place; its send is ~128
non-blocking sendto and ~130 epoll_wait calls) against gloo's 31-34: on two
cores that is at least 29 ms of wall time, and gloo took 23 (BENCHMARKS.md,
issue 13). A plain socket, ``sendall`` from the array and ``recv_into`` its
destination (the reading thread woken per 256 KiB, not per few packets:
_LOW), costs what gloo does or less: 20-36 ms per 64 MiB round trip, gloo
34-39 in the same runs (load 3-5), and 29-38 ms of wall time against gloo's
37-47.

    rank a (sender)                                    rank b (receiver)
    STREAM x=[port, nonce] r=token      <-----         as its mesh starts, to
                                                       each tcp:// peer
    at its first large array to b (which, and those sent until the stream is
    open, take ZeroMQ), a thread connects to b's listener
    (mesh.listener, the ring's too: one per process, a stranger without the
    token or with a garbage hello is closed), hello (token, -1, b's nonce,
    a's world rank), then
    STREAM x=[1]                        ----->         takes the connection
    DATA header, m=2 (no payload)       ----->         claims the receive it
    its bytes, on the stream, in order                 goes to, reads the bytes
                                                       into its out= (or a fresh
                                                       array), then delivers

The header travels on the peer's socket in order with everything else, so
matching, flow control (the payload is charged to the credit window as if it
had travelled), aborts and mismatches are the socket path's; what comes
from that sender after the header (data, aborts, its goodbye) waits in the
reader until the bytes are in, so order per sender is kept. The bytes are
written by a thread per peer (two ranks sending each other large arrays at
once never wait on each other's reader) and read by a thread per peer (the
reader goes on with other peers' messages and heartbeats meanwhile; each
read counts as word from the sender). A receive is matched when the header
comes, as on the same-host direct path: a cancel then fails (MPI allows
that), and a wait whose timeout runs out meanwhile waits on for the bytes
(they come whole, or the sender is lost), so a cancelled or withdrawn receive
never holds part of a message, and no receive returns while its out= is
still being written.
A stream that ends early or fails loses its peer, named; a lost peer's
streams and every stream at close are closed; a sender whose stream failed
sends to that peer through ZeroMQ from then on (never on a half-written
stream).

``MESH_P2P_STREAM_MIN`` (default 2M: 2-3 MiB round trips took 10-20% less
time than through ZeroMQ, 1 MiB ones no less): the smallest array that takes a stream;
0 or off: none does. Off under CurveZMQ (the stream is not encrypted).
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from . import wire
from .direct import Ack
from .listener import HELLO, MAGIC, the_listener
from .listener import reset as _reset
from .peer import ALIVE, Outgoing, Peer, named, parse_size

__all__ = ["Streams", "Job", "min_bytes"]

_log = logging.getLogger("mesh.transport")
_POLL_S = 0.1           # a reading thread's look at its peer's state and the mesh's close
_CONNECT_S = 5.0
# A reading thread is woken once this much has come (SO_RCVLOWAT; the last of a
# message with 1): woken for every few packets, as by default, the receiver and
# the sender's softirqs (veth: the sender's CPU delivers) spent ~25% of their CPU
# on wake-ups. A 64 MiB round trip across two namespaces took 40-42 ms with 1,
# 29-30 with 256 KiB, 28-35 with 1 MiB, 31-32 with 4 MiB (gloo 37-40, same runs)
_LOW = 256 << 10
_GID = -1               # the hello's group id: no collective's (theirs are >= 0)


def min_bytes(curve: bool) -> int:
    """MESH_P2P_STREAM_MIN: the smallest array that takes a stream (0: off)."""
    v = os.environ.get("MESH_P2P_STREAM_MIN", "").strip()
    if curve:
        return 0
    if not v:
        return 2 << 20
    if v.lower() in ("off", "no", "false"):
        return 0
    try:
        return parse_size(v)
    except ValueError:
        raise ValueError(f"MESH_P2P_STREAM_MIN={v!r}: not a size in bytes (examples: 4M, "
                         f"16M; 0 or off: no stream)") from None


def _send_payload(sock: socket.socket, mv: memoryview) -> None:
    """Write one message's bytes (a function of its own: tests stop a
    sender midway by replacing it)."""
    sock.sendall(mv)


def _acked(out: Outgoing) -> None:
    """A stream send is done (written, or failed): its wait returns."""
    tracker = out.tracker
    assert isinstance(tracker, Ack)
    tracker.flag.set()


class Job:
    """One message's bytes to read: into ``dest`` (None: read and dropped)."""

    __slots__ = ("h", "req", "dest", "into", "error")

    def __init__(self, h: wire.Header, req: Any, dest: np.ndarray | None, into: bool) -> None:
        self.h, self.req, self.dest, self.into = h, req, dest, into
        self.error = ""


class _Sender:
    """The stream to one peer: connected by its own thread, which then writes
    the queued messages' bytes in order."""

    def __init__(self, owner: "Streams", peer: Peer, host: str, port: int, token: bytes,
                 nonce: int) -> None:
        self.owner, self.peer = owner, peer
        self.addr, self.hello = (host, port), owner.hello(token, nonce)
        self.sock: socket.socket | None = None
        self.ready = False      # connected and announced: messages may take it
        self.stop = False
        self.queue: deque[Outgoing] = deque()
        self.pending = 0        # bytes queued, not written yet
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"mesh-stream-to-{peer.rank}")
        self.thread.start()

    def push(self, out: Outgoing) -> bool:
        with self.cond:
            if not self.ready:
                return False
            self.queue.append(out)
            self.pending += out.nbytes
            self.cond.notify()
        return True

    def _run(self) -> None:
        o = self.owner
        try:
            sock = socket.create_connection(self.addr, timeout=_CONNECT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(self.hello)
            sock.settimeout(None)
        except OSError as e:
            _log.warning("rank %d: no stream to rank %d at %s:%d (%s): its large messages "
                         "go through ZeroMQ", o.rank, self.peer.rank, *self.addr, e)
            return
        with self.cond:
            if self.stop:
                _reset(sock)
                return
            self.sock = sock
        # before any header that says its bytes come by stream (one socket: in order)
        o.control(self.peer, wire.encode(wire.STREAM, o.rank, direct=(1,)))
        with self.cond:
            self.ready = not self.stop
        while True:
            with self.cond:
                while not self.queue and not self.stop:
                    self.cond.wait()
                if not self.queue:      # (closing: what was written still goes, then FIN)
                    sock.close()
                    return
                out = self.queue[0]
            mv, out.streamed = out.streamed, None
            assert mv is not None       # (set with its header: mesh.transport)
            err = None
            try:
                _send_payload(sock, mv)
            except OSError as e:
                err = e
            with self.cond:
                self.queue.popleft()
                self.pending -= out.nbytes
                if err is not None:
                    self.ready = False
                    failed = [out, *self.queue]
                    self.queue.clear()
                    self.pending = 0
            if err is None:
                o.sent += 1
                _acked(out)
                o.wake()
                continue
            _reset(sock)
            why = ("its mesh closed" if self.stop else
                   f"peer rank {self.peer.rank} is gone ({self.peer.why})"
                   if self.peer.state != ALIVE else f"{err}")
            for f in failed:
                f.error = o.lost(f"rank {o.rank}: {f.described(o.peers)} failed: its stream to "
                                 f"{named(self.peer.rank, self.peer.there)} broke: {why}",
                                 self.peer.rank)
                f.streamed = None
                _acked(f)
            o.wake()
            return

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.ready = False
            self.cond.notify()
            sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(1.0)


class _Receiver:
    """The stream from one peer, read by its own thread, a message at a time
    as the reader hands them over (``start``)."""

    def __init__(self, owner: "Streams", peer: Peer, conn: socket.socket) -> None:
        self.owner, self.peer, self.conn = owner, peer, conn
        conn.settimeout(None)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", 0, int(_POLL_S * 1e6)))
        self.job: Job | None = None
        self.stop = self.broken = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"mesh-stream-from-{peer.rank}")
        self.thread.start()

    def start(self, job: Job) -> bool:
        with self.cond:
            if self.broken or self.job is not None:
                return False
            self.job = job
            self.cond.notify()
        return True

    def _run(self) -> None:
        conn, peer, o = self.conn, self.peer, self.owner
        scratch = memoryview(bytearray())
        while True:
            with self.cond:
                while self.job is None and not self.stop:
                    self.cond.wait()
                job = self.job
            if job is None:
                return
            n = job.h.nbytes
            if job.dest is not None:
                mv = memoryview(job.dest.reshape(-1).view(np.uint8))   # type: ignore[arg-type]
            else:       # (no memory for it: read and dropped, the stream kept in step)
                scratch = scratch or memoryview(bytearray(1 << 20))
            got = 0
            lowat = -1
            while got < n:
                if job.dest is None:
                    view, want = scratch, min(n - got, len(scratch))
                else:
                    # the rest in one call (the interpreter lock taken back once, not per
                    # piece): it returns what came once _POLL_S has passed (SO_RCVTIMEO
                    # counts the whole call), which is word from the sender
                    view, want = mv[got:], n - got
                    low = _LOW if want > 2 * _LOW else 1   # (the last _LOW bytes: 1)
                    if low != lowat:
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, low)
                        lowat = low
                    if low > 1:
                        want -= low
                try:
                    k = conn.recv_into(view, want, socket.MSG_WAITALL)
                except (BlockingIOError, InterruptedError):
                    k = -1
                except OSError as e:
                    job.error = f"its stream failed mid-message ({got} of {n} bytes read): {e}"
                    break
                if k == 0:
                    job.error = (f"its stream ended mid-message ({got} of {n} bytes read): "
                                 f"the process exited or crashed")
                    break
                if k > 0:
                    got += k
                    peer.last_heard = time.monotonic()
                    continue
                if self.stop:
                    job.error = "this rank's mesh closed"
                    break
                if peer.state != ALIVE:
                    job.error = f"it was lost mid-message ({got} of {n} bytes read): {peer.why}"
                    break
            with self.cond:
                self.job = None
                if job.error:
                    self.broken = True
            o.finished.append(job)
            o.wake()
            if job.error:
                _reset(conn)
                return

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify()
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(1.0)
        if not self.thread.is_alive():
            _reset(self.conn)


class Streams:
    """Rank ``rank``'s streams to and from its peers on other hosts.
    ``control(peer, header)`` sends on a peer's socket; ``lost(text, rank)``
    makes the error of an operation that lost that peer. ``wake_r``: a pipe
    the reading turn polls (mesh.progress), written when a thread is done."""

    def __init__(self, rank: int, peers: list[Peer], endpoints: list[str], curve: bool,
                 control: Callable[[Peer, bytes], None],
                 lost: Callable[[str, int], BaseException]) -> None:
        self.rank, self.peers, self.control, self.lost = rank, peers, control, lost
        self.min = min_bytes(curve)
        self._hosts = {r: ep[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
                       for r, ep in enumerate(endpoints)
                       if r != rank and ep.startswith("tcp://")}
        self.on = self.min > 0 and bool(self._hosts)
        self._where: dict[int, tuple[int, bytes, int]] = {}   # peers' listeners, announced
        self._lock = threading.Lock()
        self._out: dict[int, _Sender] = {}
        self._in: dict[int, _Receiver] = {}
        self.finished: deque[Job] = deque()     # read (or failed), for the reader to deliver
        self.sent = self.got = 0                # arrays written and read whole (tests)
        self.closed = False
        self._threads: list[threading.Thread] = []     # those of closed streams
        self._readers: list[_Receiver] = []     # every one (a closed one may still read)
        self._lis: Any = None
        self.nonce = secrets.randbits(62)      # which mesh of this process a hello is for
        self.wake_r = self._wake_w = -1
        if self.on:
            self._lis = the_listener()
            self.wake_r, self._wake_w = os.pipe()
            os.set_blocking(self.wake_r, False)
            os.set_blocking(self._wake_w, False)

    def wake(self) -> None:
        """Wake whoever holds the reading turn: a stream's thread is done."""
        if self._wake_w >= 0 and not self.closed:
            try:
                os.write(self._wake_w, b"s")
            except OSError:     # (full: woken already)
                pass

    def hello(self, token: bytes, nonce: int) -> bytes:
        return HELLO.pack(MAGIC, token, _GID, nonce, self.rank)

    def announce(self) -> None:
        """Tell each peer on another host where to connect (as the mesh starts)."""
        if not self.on:
            return
        lis = self._lis
        for r in self._hosts:
            self.control(self.peers[r], wire.encode(
                wire.STREAM, self.rank, direct=(lis.port, self.nonce), reason=lis.token.hex()))

    def on_message(self, peer: Peer, h: wire.Header) -> str:
        """A STREAM message from ``peer`` (the reader): its listener, or its
        stream to us opened. A non-empty answer: why it was malformed."""
        r = peer.rank
        if len(h.direct) == 2:
            if not self.on or r not in self._hosts:
                return ""
            try:
                token = bytes.fromhex(h.reason)
            except ValueError:
                return "a stream's token that is not hex"
            if len(token) != 16:
                return "a stream's token not of 16 bytes"
            self._where[r] = (h.direct[0], token, h.direct[1])
            return ""
        if not self.on or r not in self._hosts or r in self._in or self.closed:
            return ""
        conn = self._lis.take((_GID, self.nonce, r), time.monotonic() + _CONNECT_S)
        if conn is None:
            _log.warning("rank %d: rank %d said its stream to us is open, but none came",
                         self.rank, r)
            return ""
        self._in[r] = _Receiver(self, peer, conn)
        self._readers.append(self._in[r])
        return ""

    def usable(self, dst: int, nbytes: int) -> bool:
        """Whether an array of ``nbytes`` to ``dst`` goes by stream now; the
        first time, the stream is opened (by its thread: the array takes
        ZeroMQ meanwhile), so a job that sends no large array has none."""
        if nbytes < self.min or not self.on:
            return False
        s = self._out.get(dst)
        if s is None:
            where = self._where.get(dst)
            if where is None:       # (its listener not announced yet)
                return False
            with self._lock:
                if dst not in self._out and not self.closed and self.peers[dst].state == ALIVE:
                    self._out[dst] = _Sender(self, self.peers[dst], self._hosts[dst], *where)
            return False
        return s.ready

    def push(self, dst: int, out: Outgoing) -> bool:
        """Queue ``out``'s bytes (its header handed over; caller holds the
        peer's lock, so the bytes go in the headers' order)."""
        s = self._out.get(dst)
        return s is not None and s.push(out)

    def pending(self, dst: int) -> int:
        """Bytes queued to ``dst``'s stream, not written yet."""
        s = self._out.get(dst)
        return s.pending if s is not None else 0

    def read(self, job: Job) -> bool:
        """Start reading ``job``'s bytes; False if no stream from its sender."""
        r = self._in.get(job.h.src)
        return r is not None and r.start(job)

    def reading(self, req: Any) -> bool:
        """Whether receive ``req`` was matched by an array whose bytes a
        stream still reads (or has read, not delivered yet)."""
        return (any(j is not None and j.req is req for j in [r.job for r in self._readers])
                or any(j.req is req for j in list(self.finished)))

    def forget_lost(self) -> None:
        """Close the streams of peers that are gone (the progress thread)."""
        for table in (self._out, self._in):
            for r in [r for r in list(table) if self.peers[r].state != ALIVE]:
                s = table.pop(r, None)      # (None: the mesh's close took it)
                if s is not None:
                    s.close()
                    self._threads.append(s.thread)

    def close(self) -> None:
        """Close every stream (their threads stopped)."""
        self.closed = True
        for table in (self._out, self._in):
            for r in list(table):
                s = table.pop(r, None)      # (None: forget_lost took it)
                if s is not None:
                    s.close()
                    self._threads.append(s.thread)

    def close_in_child(self) -> None:
        """In a child forked from this process: close its copies of the
        streams' sockets, never shut them down (the parent's stay open, in
        use). Kept, a copy held the connection up once the parent died: a
        peer reading a message from it saw no end to the stream and waited
        for the parent's silence to lose it (the peer timeout: 10 s, against
        0.2). No lock: a thread of the parent may have held one at the fork."""
        for s in list(self._out.values()):
            if s.sock is not None:
                s.sock.close()
        for r in list(self._readers):      # (closed ones too: one may still read)
            r.conn.close()

    def release(self) -> None:
        """Close the pipe (once nobody polls it: the progress thread stopped)."""
        if self._wake_w >= 0 and not any(t.is_alive() for t in self._threads):
            os.close(self._wake_w)      # (a thread still running may write it: left open)
            os.close(self.wake_r)
            self._wake_w = self.wake_r = -1
