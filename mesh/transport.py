"""Transport: one worker's sockets, wired to the parts that use them.

Every worker binds one ROUTER (ipc:// and tcp://) for everything it receives
and connects one DEALER to each peer for everything it sends:

    rank a: DEALER(a->b) ===> ROUTER(b) :rank b      routing id = sender's rank
    rank a: ROUTER(a) <=== DEALER(b->a) :rank b      credits flow back this way

Senders write from the calling thread (zero-copy frames, under the peer's
lock), within the credit the peer has granted (mesh.peer). What comes in is
read by mesh.reader, in the thread that holds the reading turn
(mesh.progress: a caller waiting for a reply, else the progress thread),
and matched, aborted or failed in mesh.inbox; mesh.liveness watches the
peers (heartbeats, lost peers, stall reports). This module wires them and
holds the send path, the waits and the shutdown.
"""
from __future__ import annotations

import logging
import os
import time
import weakref
from collections import deque
from typing import Any, Callable

import numpy as np
import zmq

from . import alloc, auth, device, rings, tensors, wire
from .direct import Ack, Direct
from .errors import BadMessageError, LostPeerError, MeshError, MeshTimeoutError
from .inbox import Inbox, abort_error
from .liveness import COUNTED, Liveness
from .match import DONE, Pending, Probe, Watched
from .payload import decode_object, delivered, encode_payload
from .peer import ALIVE, CLOSED, DEAD, MSG_COST, STATE_NAMES, Outgoing, Peer, config_bytes, config_float
from .progress import Progress
from .reader import COPY_BELOW, Reader
from .streams import Streams

__all__ = ["Transport", "Outgoing", "config_float", "abort_error"]

_log = logging.getLogger("mesh.transport")
_SNDMORE = int(zmq.SNDMORE)
_CACHE = 1024  # headers remembered per transport
_FAIL_WAIT = 1.0  # a failing rank's wait for its peers to answer its goodbye
_LEFT_LINGER_MS = 200  # for what is queued to a peer that left or answered (see close)
# A message in pieces (mesh.wire.CHUNK, across hosts) has at most this many bytes
# of them handed to ZeroMQ and not yet answered by the receiver: what its sender's
# heartbeats and other control messages may wait behind (each piece that arrives is
# word from the sender anyway). 16 MiB stalled 64 MiB streams over loopback tcp
# under load (0.8 against 2.2 GB/s), the sender waiting on answers the receiver's
# CPU was slow to send
_AHEAD = 64 << 20
# A socket send of fewer bytes is copied into ZeroMQ and done at once; larger
# ones go zero-copy and wait for ZeroMQ to let go (a tracker, through pyzmq's
# garbage thread: ~50 us). Across two namespaces a 64 KiB round trip took
# 146-164 us zero-copy against 117-121 copied, 256 KiB 203-217 against 179-184,
# and 512 KiB no better copied.
_COPY_SEND_BELOW = 512 << 10

SENT = Outgoing(-1, None, 0, "a send by ring", None)   # what send_ring's sends wait on: done
SENT.event.set()


def forked_error(rank: int, pid: int) -> MeshError:
    return MeshError(f"rank {rank}: this mesh belongs to process {pid}; a child forked from "
                     f"it (process {os.getpid()}) cannot use it (its sockets, rings and "
                     f"boards are the parent's): communicate from the parent, or start the "
                     f"child's own job")


_live: "weakref.WeakSet[Transport]" = weakref.WeakSet()


def _after_fork() -> None:
    for t in list(_live):
        t._forked()


os.register_at_fork(after_in_child=_after_fork)


_LAND_S = 5.0
"""How long an interrupted receive that a message had matched waits for its
bytes to land before the interrupt goes on (Transport._interrupted)."""


class Transport:
    """Sockets, matching and liveness for one rank. Built by ``mesh.init``."""

    def __init__(self, ctx: zmq.Context, router: zmq.Socket, rank: int, size: int,
                 endpoints: list[str], secret: str, timeout: float, curve: bool = False,
                 hosts: list[str] | None = None, pids: list[int] | None = None,
                 windows: list[int | None] | None = None) -> None:
        self.rank, self.size, self.timeout = rank, size, timeout
        self.endpoints, self.curve = list(endpoints), curve   # how each peer is reached
        # each rank's host id (mesh.env.host_id) as the rendezvous table has it
        self.hosts = hosts if hosts is not None else [""] * size
        window = int(config_bytes("MESH_WINDOW_BYTES", 64 << 20))
        # Each pair of ranks uses the smaller of their two MESH_WINDOW_BYTES
        # (``windows``: each rank's, from the rendezvous table): a receiver
        # grants credit back in steps of a quarter of its window, and a
        # sender whose own window is under that step would wait for ever.
        pair = [window if w is None else min(window, w) for w in (windows or [None] * size)]
        self._orphans: list[Any] = []   # buffers of sends to lost peers ZeroMQ may still hold
        self._ctx, self._router = ctx, router
        self.keep_alive: list[Any] = []  # released by close(), after the peers' goodbyes
        # per kept object that says so: whether a world rank may still read it (close
        # waits for that peer as for one that has not answered its goodbye)
        self.reading: list[Callable[[int], bool]] = []
        self.on_close: list[Callable[[], None]] = []  # called then, before the release
        self.groups: dict[int, tuple[str, list[int]]] = {0: ("world", list(range(size)))}
        # groups dropped (garbage) here, forgotten by the next sweep(); per group id,
        # what to call then or when the mesh closes, whichever first (their sockets)
        self.dropped: deque[int] = deque()
        self.drop_hooks: dict[int, list[Callable[[], None]]] = {}
        # per group id, the communicators alive with it (two made with one id:
        # the group is forgotten when the last goes)
        self.comms: dict[int, weakref.WeakSet[Any]] = {}
        self._peers: list[Peer] = []
        # peers on other hosts: a large message goes to them in pieces (mesh.wire.CHUNK)
        self._pieced = [ep.startswith("tcp://") for ep in endpoints]
        if any(self._pieced):
            alloc.tune()    # ZeroMQ's receive buffers: no page faults per message
        for r, ep in enumerate(endpoints):
            if r == rank:
                self._peers.append(Peer(r, None, None, pair[r]))
                continue
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IDENTITY, str(rank).encode())
            s.setsockopt(zmq.SNDHWM, 0)
            s.setsockopt(zmq.LINGER, 2000)
            auth.make_client(s, secret, curve)
            mon = s.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
                                       | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            s.connect(ep)
            self._peers.append(Peer(r, s, mon, pair[r]))
        self._router_mon = router.get_monitor_socket(COUNTED)
        # Headers repeat (same peer, tag, dtype and shape, message after
        # message): encode each once; bounded, starts over when full.
        self._encoded: dict[tuple, bytes] = {}
        self.progress = Progress(router, rank)
        self.inbox = Inbox(rank, self._peers, self.groups, self._control, self.progress.nudge)
        # same-host peers' pids (ipc://: one filesystem, one machine): their silence is
        # weighed against what their process does (mesh.liveness.Liveness.tick)
        local = {r: pid for r, (pid, ep) in enumerate(zip(pids or [0] * size, endpoints))
                 if pid and r != rank and ep.startswith("ipc://")}
        self.live = Liveness(rank, timeout, self._peers, self.groups, self.inbox, self._control,
                             self._router_mon, local)
        self.direct = Direct(rank, self._peers, endpoints, self._control)
        # large arrays to peers on other hosts: a plain TCP stream (mesh.streams)
        self.streams = Streams(rank, self._peers, endpoints, curve, self._control,
                               LostPeerError)
        same_host = [r for r, ep in enumerate(endpoints) if r != rank and ep.startswith("ipc://")]
        self.rings = rings.open_rings(rank, size, same_host)
        self._ring_max = self.rings.max if self.rings is not None else -1
        self._ring_out = self.rings.out if self.rings is not None else [None] * size
        self._ringed = [self.rings is not None and r in same_host for r in range(size)]
        self._awake_rung = self.rings.awake_rung if self.rings is not None else None
        self._prefixes: dict[tuple, tuple] = {}     # send_ring's headers, inline-framed,
        self._marks: dict[bytes, int] = {}     # and their ids (mesh.rings.MARK),
        self._marked = 0                       # how many were given so far
        self.reader = Reader(router, rank, self._peers, self.inbox, self.live, self._on_credit,
                             self.direct, self.rings, self._on_answer, self._control,
                             self.streams)
        self.stall_warn = self.live.stall_warn
        # what recv_ring calls and reads, bound once
        self._take, self._quiet = self.reader.take, self.inbox.matcher.quiet
        # what ``quiet`` reads: while all four are empty, it is not called
        self._posted, self._posted_any, self._wild, self._unexpected = \
            self.inbox.matcher.quiet_tables()
        self._aborted = self.inbox.aborted
        # what communicators call of the inbox and of liveness
        self.irecv, self.iprobe = self.inbox.post, self.inbox.iprobe
        self.cancel, self.abort = self.inbox.cancel, self.inbox.abort
        self.pid = os.getpid()
        self.forked = False     # (set in a forked child: the sockets are the parent's)
        _live.add(self)
        self.stalled, self.status = self.live.stalled, self.live.status
        self._drive = self.progress.drive
        self.progress.start(self.reader, self.live, self._busy)
        self.inbox.unpark = self.progress.unpark
        if self.rings is not None:     # where each same-host peer writes to us (mesh.rings)
            there = wire.encode(wire.RING, rank, direct=self.rings.announce())
            for r in same_host:
                self._control(self._peers[r], there)
        for r in same_host:     # ask each same-host peer now whether it may read us
            self.direct.usable(r)   # (mesh.direct): no large message waits for the answer
        self.streams.announce()     # where the peers on other hosts connect their streams

    # ---- sending -------------------------------------------------------------

    def isend(self, dst: int, group: int, tag: int, obj: Any, fp: Any, desc: Any) -> Outgoing:
        if type(obj) is np.ndarray and fp is None and dst != self.rank \
                and obj.dtype.metadata is None:     # (bfloat16's bits: flagged, below)
            n = obj.nbytes
            if n < COPY_BELOW and obj.flags.c_contiguous:   # the common small case, lean
                key = (obj.dtype, obj.shape, group, tag)
                header = self._encoded.get(key)
                if header is None and wire.dtype_ok(obj.dtype):
                    header = self._remember(key, wire.encode(
                        wire.DATA, self.rank, group, tag, dtype=obj.dtype.str, shape=obj.shape,
                        nbytes=n))
                if header is not None:
                    out = Outgoing(dst, wire.frames(header, [obj], n), n, desc, None)
                    self._submit(self._peers[dst], out)
                    return out
        kind, header_kw, payload, keep = encode_payload(obj, desc, self.rank)
        nbytes = sum(len(p) for p in payload)
        if dst == self.rank:
            value = np.array(keep, copy=True) if kind == wire.DATA else \
                decode_object(b"".join(payload))
            self.inbox.arrive(self.rank, group, tag, value, nbytes, fp,
                              header_kw.get("device", False))
            self.progress.nudge()
            out = Outgoing(dst, [], nbytes, desc, None)
            out.event.set()
            return out
        if kind == wire.DATA and nbytes >= self.direct.min_bytes and self.direct.usable(dst):
            out = Outgoing(dst, None, nbytes, desc, keep)    # read by dst out of our memory
            out.frames = [self.direct.header(out, group=group, tag=tag, nbytes=nbytes, fp=fp,
                                             **header_kw)]
            self._submit(self._peers[dst], out)
            if out.error is not None:
                self.direct.forget(out)
            return out
        if kind == wire.DATA and self._pieced[dst] and self.streams.usable(dst, nbytes):
            out = Outgoing(dst, [wire.encode(kind, self.rank, group, tag, nbytes=nbytes, fp=fp,
                                             more=wire.STREAMED, **header_kw)],
                           nbytes, desc, keep)      # its bytes by stream (mesh.streams)
            out.streamed = memoryview(keep.reshape(-1).view(np.uint8))
            self._submit(self._peers[dst], out)
            return out
        pieced = nbytes > wire.CHUNK_BYTES and self._pieced[dst]   # (to another host)
        header = wire.encode(kind, self.rank, group, tag, nbytes=nbytes, fp=fp, more=pieced,
                             **header_kw)
        if pieced:      # its header, then its payload in pieces (mesh.wire.CHUNK)
            out = Outgoing(dst, [header], nbytes, desc, keep)
            k = wire.CHUNK_BYTES // wire.FRAME_BYTES     # (payload frames: FRAME_BYTES each)
            out.pieces = deque((sum(map(len, payload[i:i + k])), payload[i:i + k])
                               for i in range(0, len(payload), k))
        else:
            out = Outgoing(dst, wire.frames(header, payload, nbytes), nbytes, desc, keep)
        self._submit(self._peers[dst], out)
        return out

    def send_ring(self, dst: int, group: int, tag: int, obj: np.ndarray,
                  bits: int = 0) -> Outgoing | None:
        """Send a small array to a same-host peer by its ring (mesh.rings),
        header and bytes copied in and nothing else: SENT, done already;
        None when it must go the usual way (``isend``: no ring, too big,
        not C-contiguous, no credit or room, sends queued before it).
        ``bits``: the header's flags (mesh.tensors.TORCH: a torch tensor's
        memory, so the receiver gets one)."""
        ring = self._ring_out[dst]
        if ring is None or (ring.full and ring.off()):
            return None
        dt = obj.dtype       # a dtype hashes slowly: not in the key, known by identity
        # (another dtype there replaces the entry)
        key = (obj.shape, group, tag) if not bits else (obj.shape, group, tag, bits)
        known = self._prefixes.get(key)
        if known is None or known[0] is not dt:     # (not C-contiguous: ``put`` raises ValueError)
            n = obj.nbytes
            if n > self._ring_max or not wire.dtype_ok(dt):
                return None
            flags = bits | (tensors.BF16 if dt.metadata is not None    # numpy's bfloat16
                            and tensors.dtype_name(dt) == "bfloat16" else 0)
            pre = wire.inline(wire.encode(wire.DATA, self.rank, group, tag, dtype=dt.str,
                                          shape=obj.shape, nbytes=n, device=flags))
            if len(self._prefixes) >= _CACHE:
                self._prefixes.clear()
                self._marks.clear()
            mark = self._marks.get(pre, 0)   # its header's id: one no other header had
            if not mark and self._marked < rings.MARKS - 1:   # (once all are given: none)
                self._marked += 1
                mark = self._marks[pre] = rings.MARK * self._marked
            known = self._prefixes[key] = (dt, pre, len(pre), n, n + MSG_COST,
                                           len(pre) + n + mark)    # n: bytes; its length word
        _, pre, plen, n, cost, word = known
        peer = self._peers[dst]
        lock = peer.lock         # acquire/release: cheaper than ``with``, once a message
        lock.acquire()
        try:
            inflight = peer.inflight     # peer.admit(n), inline (peer.fits)
            if peer.state or peer.queue or not (       # (ALIVE is 0)
                    inflight + cost <= peer.window or inflight < peer.grant_step):
                if peer.state or not self._grants(peer, cost):
                    return None
                inflight = peer.inflight
            peer.inflight = inflight + cost
            try:
                put = ring.put(pre, plen, peer.sent, obj, n, word)
            except ValueError:       # not C-contiguous (numpy's buffer), nothing published
                put = False
            if not put:
                peer.release(cost)       # the usual way charges it again
                return None
        finally:
            lock.release()       # (a full fence: ``bell`` may read the receiver's words now)
        awake_rung = ring.awake_rung     # ring.bell(), inline: wake it if not watching
        if not (awake_rung[0] or awake_rung[1]):
            ring.bell()
        return SENT

    def _grants(self, peer: Peer, cost: int) -> bool:
        """``send_ring`` found ``peer``'s window full, or sends queued for
        credit before it (its lock held, and held again on return): read the
        socket in this thread, as a blocked receive does (mesh.progress),
        for the receiver's grants (which send what was queued), as long as
        it keeps reading (as for room in its ring: mesh.rings); then say
        whether ``cost`` fits now, with nothing queued before it (once it
        gave up, a receiver that read nothing since is not waited on again:
        the usual way at once, as for a ring left full). A sender
        streaming into a ring holds the interpreter lock, so the progress
        thread read those grants late (up to a switch interval, 5 ms: tens
        of MiB at ring speed); the stream fell back to the usual way, queued
        behind its credit, and stayed there while the queue lasted (64 KiB
        messages, 1 MiB window: 289-385 of 400 went by socket)."""
        ring = self._ring_out[peer.rank]
        assert ring is not None
        if ring.reads() == ring.starved:     # gave up before, and it has read nothing since:
            return False                     # the usual way at once (a send must not block)
        progress, read_one = self.progress, self.reader.read_one

        def granted() -> bool:
            entered = progress.enter()
            try:
                if entered:
                    for _ in range(256):
                        if not read_one():
                            break
            finally:
                progress.leave(entered)
            return bool(peer.state or not peer.queue and peer.fits(cost))

        peer.lock.release()
        try:
            if not granted():
                got, seen = ring.await_reader(granted)
                if not got:
                    ring.starved = seen
        finally:
            peer.lock.acquire()
        return not (peer.state or peer.queue) and peer.fits(cost)

    def recv_ring(self, group: int, src: int, tag: int, out: np.ndarray | None,
                  timeout: float | None) -> tuple[np.ndarray, wire.Header] | None:
        """A blocking receive of an array that only rank ``src``'s ring can
        bring now (nothing of ``src`` and ``tag`` queued or posted before
        it), taken by this thread if it is there or comes within the spin
        (mesh.progress.await_ring): (array, header); None when it must be
        posted and waited for the usual way. The uncontended turn (the usual
        case) is taken and given back here, as ``Progress.enter`` and
        ``leave`` would; AWAKE (mesh.rings) is set only to wait."""
        if not self._ringed[src]:     # (no rings: none is)
            return None
        progress = self.progress
        turn = progress.turn
        if turn.acquire(False):
            entered = 1
        elif ((out is not None and out.nbytes > self._ring_max)      # comes by socket, or
              or (timeout is not None and timeout < progress.spin)):   # may not wait: not
            return None                                         # worth waiting for the turn
        else:
            entered = progress.enter()
        try:
            if (not entered or self._peers[src].state or progress.closing    # (ALIVE is 0)
                    or (self._aborted and (group, tag) in self._aborted)
                    or ((self._posted or self._posted_any or self._wild or self._unexpected)
                        and not self._quiet(group, src, tag))):    # queued or posted before
                return None
            got = self._take(src, group, tag, out)
            if got is None:       # nothing there yet: wait for it, unless it comes by socket
                if ((out is not None and out.nbytes > self._ring_max)
                        or (timeout is not None and timeout < progress.spin)):
                    return None
                flags = self._awake_rung        # Rings.awake(True), when it has anything to do
                if not flags[0] or flags[1]:    # type: ignore[index]
                    self.rings.awake(True)     # type: ignore[union-attr]
                got = progress.await_ring(self._take, src, group, tag, out)
            return got or None
        finally:
            if entered == 1:
                turn.release()
                progress.took += 1      # (the progress thread stays aside: cheaper than a clock)
            else:
                progress.leave(entered)

    def poke(self) -> None:
        """A look at what has come, for a caller that polls instead of
        waiting (iprobe, Request.test), as MPI's progress engine takes one
        in MPI_Iprobe and MPI_Test: the rings and the socket are read in
        this thread, without waiting for anything, if it gets the reading
        turn (as a receive's first look does: ``Progress.enter``). Left to
        the progress thread, which a polling loop keeps off the interpreter
        between switch intervals, a round trip answered by an iprobe loop
        took 16 ms (a blocking receive's: 5 us)."""
        progress = self.progress
        if progress.reading_here() or progress.closing:
            # (a callback run by the thread that reads: it would wait on itself; a closed
            # mesh's rings and sockets are gone: iprobe raised a released memoryview's error)
            return
        entered = progress.enter(behind_callers=False)
        if entered < 0:     # another caller reads for all: let it have the interpreter
            time.sleep(0)
            return
        try:
            if entered > 0:
                reader = self.reader
                reader.read_rings()
                read_one = reader.read_one
                for _ in range(256):
                    if not read_one():
                        break
                reader.settle()
        except (zmq.ZMQError, OSError, ValueError):
            pass        # (the mesh closed under it: the caller's request says how it ended)
        finally:
            progress.leave(entered)

    def lost_to(self, out: Outgoing) -> bool:
        """Whether ``out``, handed over and not done, went to a peer that
        died (or was found silent): its ``wait`` raises LostPeerError
        (``_await_release``), where what it waits for may never come
        (Request.done). A peer that closed cleanly read what it was sent."""
        return out.event.is_set() and out.error is None and out.dst >= 0 \
            and self._peers[out.dst].state == DEAD

    def _remember(self, key: tuple, header: bytes) -> bytes:
        if len(self._encoded) >= _CACHE:
            self._encoded.clear()
        self._encoded[key] = header
        return header

    def _busy(self) -> bool:
        """Whether a posted receive or a send in flight (queued, or read out
        of our memory) waits on background reading (mesh.progress parks
        while nothing does)."""
        return (self.inbox.matcher.posted_some() or self.direct.sending()
                or any(p.queue for p in self._peers))

    def _submit(self, peer: Peer, out: Outgoing) -> None:
        self.progress.unpark()
        ringed = None
        with peer.lock:
            if peer.state != ALIVE or self.inbox.closed:    # (closed: its own error)
                out.fail(self.inbox.gone(peer, out.desc))
            elif peer.queue or not peer.admit(out.nbytes):
                peer.queue.append(out)
            elif out.nbytes <= self._ring_max and out.tracker is None and self._ring(peer, out):
                ringed = self._ring_out[peer.rank]
            else:
                self._transmit(peer, out)
        if ringed is not None:      # (the lock released: a full fence, see send_ring)
            ringed.bell()

    def _ring(self, peer: Peer, out: Outgoing) -> bool:
        """Put a small message in ``peer``'s ring (mesh.rings), if it has told
        us where that is and it has room; caller holds ``peer.lock``."""
        assert self.rings is not None
        ring = self.rings.out[peer.rank]
        frames = out.frames
        if ring is None or not frames:
            return False
        frame = frames[0] if len(frames) == 1 else wire.inline(*frames)
        if not ring.put(frame, len(frame), peer.sent):
            return False
        out.frames = None
        out.event.set()
        return True

    def _transmit(self, peer: Peer, out: Outgoing) -> None:
        """Hand frames to ZeroMQ; caller holds ``peer.lock``, ``out`` is admitted.
        A message in pieces: its header, then what ``_stream`` lets go now;
        until the rest goes, it waits first in the queue."""
        frames, out.frames = out.frames or [], None
        streamed = out.streamed is not None
        if streamed or out.pieces is not None:  # its header alone; its bytes after it
            if streamed:                # (by its peer's stream thread: done once written)
                out.tracker = Ack()
            try:
                peer.sock.send(frames[0], 0)
            except zmq.ZMQError as e:
                out.fail(LostPeerError(f"rank {self.rank}: {out.desc} failed: {e}", peer.rank))
                return
            peer.sent += 1
            peer.last_sent = time.monotonic()
            if not streamed:            # in pieces, as ``_stream`` lets them go
                if not self._stream(peer, out):
                    peer.queue.appendleft(out)
            elif self.streams.push(peer.rank, out):
                out.event.set()
            else:                       # (it broke just now: reset, so the peer fails it)
                out.fail(LostPeerError(f"rank {self.rank}: {out.desc} failed: its stream to "
                                       f"rank {peer.rank} broke", peer.rank))
            return
        try:
            if out.nbytes < _COPY_SEND_BELOW or out.tracker is not None:  # small, or direct
                send = peer.sock.send
                last = len(frames) - 1
                for i in range(last):
                    send(frames[i], _SNDMORE)
                send(frames[last], 0)
            else:
                trackers = []
                for i, f in enumerate(frames):
                    flags = zmq.SNDMORE if i < len(frames) - 1 else 0
                    t = peer.sock.send(f, flags, copy=False, track=True)
                    if t is not None:
                        trackers.append(t)
                out.tracker = zmq.MessageTracker(*trackers)
        except zmq.ZMQError as e:
            out.fail(LostPeerError(f"rank {self.rank}: {out.desc} failed: {e}", peer.rank))
            return
        peer.sent += 1
        peer.last_sent = time.monotonic()
        out.event.set()

    def _control(self, peer: Peer, header: bytes, upto: int = ALIVE, beat: bool = True) -> None:
        """Send a control message to ``peer`` if its state is ``upto`` or better
        (ALIVE < CLOSED < DEAD): one that left may never read it again. With
        ``beat`` false (the answer to a piece) it does not stand in for a
        heartbeat: those carry what this rank is doing (Liveness.status)."""
        with peer.lock:
            if peer.state <= upto:
                try:
                    peer.sock.send(header, zmq.NOBLOCK)
                    peer.sent += 1
                    if beat:
                        peer.last_sent = time.monotonic()
                except zmq.ZMQError:
                    pass

    def _stream(self, peer: Peer, out: Outgoing) -> bool:
        """Hand ZeroMQ the next pieces of message ``out`` (mesh.wire.CHUNK)
        while the receiver has answered all but _AHEAD bytes of them; True
        once the last is handed over (or the send failed), with ``out``
        done then as ``_transmit`` leaves a send. Caller holds ``peer.lock``."""
        pieces = out.pieces
        sock = peer.sock
        while pieces and peer.unanswered < _AHEAD:
            n, frames = pieces.popleft()
            try:
                sock.send(wire.encode(wire.CHUNK, self.rank, nbytes=n), _SNDMORE)
                last = len(frames) - 1
                for i, f in enumerate(frames):
                    out.held.append(sock.send(f, _SNDMORE if i < last else 0, copy=False,
                                              track=True))
            except zmq.ZMQError as e:
                out.fail(LostPeerError(f"rank {self.rank}: {out.desc} failed: {e}", peer.rank))
                return True
            peer.unanswered += n
            peer.sent += 1   # not last_sent: heartbeats (with status) go between the pieces
        if pieces:
            return False
        out.pieces = None
        out.tracker = zmq.MessageTracker(*[t for t in out.held if t is not None])
        out.held = []
        out.event.set()
        return True

    def _drain(self, peer: Peer) -> None:
        """Hand ZeroMQ what waits in ``peer``'s queue, as far as its credit
        (and the answers to a message in pieces under way) allow; caller
        holds ``peer.lock``."""
        queue = peer.queue
        while queue and peer.state == ALIVE:
            out = queue[0]
            if out.under_way():
                if not self._stream(peer, out):
                    return
                queue.popleft()
            elif peer.admit(out.nbytes):
                self._transmit(peer, queue.popleft())
            else:
                return

    def _on_credit(self, peer: Peer, credit: int) -> None:
        with peer.lock:
            peer.release(credit)
            self._drain(peer)

    def _on_answer(self, peer: Peer, nbytes: int) -> None:
        """``peer`` has ``nbytes`` more of a message in pieces (mesh.wire.GOT)."""
        with peer.lock:
            peer.unanswered = max(0, peer.unanswered - nbytes)
            self._drain(peer)

    # ---- waiting -------------------------------------------------------------

    def sweep(self) -> None:
        """Forget the groups dropped since the last sweep: their name, what
        the inbox keeps of them (aborts, receives posted only to catch one,
        messages that came late) and their drop hooks, run now. Called where
        no lock of the transport is held (a group made, a collective's start),
        not by the finalizer that queued them, which may run anywhere."""
        while self.dropped:
            try:
                gid = self.dropped.popleft()
            except IndexError:      # (another thread took the last)
                return
            if self.comms.get(gid):     # another communicator with this id lives on
                continue
            self.comms.pop(gid, None)
            self.groups.pop(gid, None)
            self.inbox.forget(gid)
            for fn in self.drop_hooks.pop(gid, ()):
                try:
                    fn()
                except Exception:
                    _log.exception("rank %d: a dropped group's hook failed", self.rank)

    def _forked(self) -> None:
        """In a child forked from this process: its sockets, rings and boards
        are the parent's (a send from here would write into the parent's
        rings, and the peers would read garbage): every way in raises."""
        self.forked = True

        def refuse(*args: Any, **kw: Any) -> Any:
            raise forked_error(self.rank, self.pid)     # (a new one each time: its own frames)
        for name in ("isend", "send_ring", "recv_ring", "irecv", "iprobe", "wait", "sweep",
                     "cancel", "abort", "poke", "_drive"):
            setattr(self, name, refuse)
        self.streams.close_in_child()

    def _interrupted(self, item: Pending, error: BaseException | None = None,
                     deadline: float = 0.0) -> None:
        """A user's receive whose wait raised (KeyboardInterrupt, a signal
        handler's exception): withdrawn, as a timeout withdraws it, so that
        the message it would have taken goes to the next receive instead of
        into a request nobody waits for. One a message had matched already
        (a large array still coming, or one that came as the interrupt did)
        cannot be: its bytes land first (until ``deadline``, _LAND_S at most:
        a Ctrl-C is not held up for long; a second interrupt ends the wait),
        and ``error`` says in a note that the receive took its message.
        They were written into out= after the call had raised, and nothing
        said so: the caller, told the receive was interrupted, took the next
        message for this one's."""
        if item.fp is not None:
            return
        if self.inbox.withdraw(item):
            item.error = MeshError(f"rank {self.rank}: {item.desc} was interrupted; the "
                                   f"receive was withdrawn (a message that comes later goes "
                                   f"to the next receive that matches)")
            item.event.set()
            return
        note = getattr(error, "add_note", None)     # (Python 3.11)
        if note is None or isinstance(item, Probe):     # (a probe takes nothing)
            return
        done = item.event.wait(max(0.0, min(deadline - time.monotonic(), _LAND_S)))
        got = ("received whole (out= holds it, or a later wait() returns it)"
               if done and item.error is None else f"it did not complete: {item.error}"
               if done else f"not landed within {_LAND_S:g}s, it goes on into out=")
        note(f"rank {self.rank}: {item.desc} had matched its message when interrupted "
             f"(not withdrawn): {got}; the next receive takes the message after it")

    def wait(self, item: Pending | Outgoing, timeout: float | None,
             withdraw: bool = False) -> Any:
        """``item``'s value (None for a send) once done. ``withdraw``: a
        send still queued for credit when ``timeout`` runs out is taken off
        the queue (a blocking send: its caller has the buffer back)."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        if isinstance(item, Pending):
            try:
                driven = item.state == DONE or self._drive(item, deadline, limit)
            except (zmq.ZMQError, ValueError, OSError):
                if not self.inbox.closed:
                    self._interrupted(item)
                    raise
                driven = True   # another thread closed the mesh under this wait
                if item.error is None:
                    item.error = self.inbox.closed_error(item.desc)
            except BaseException as e:  # (KeyboardInterrupt, a signal handler's exception)
                self._interrupted(item, e, deadline)
                raise
            if not driven and item.fp is None:
                # a user's receive or probe that ran out before it read anything
                # (timeout=0): one look at what has come first, as MPI_Iprobe and
                # MPI_Test take; the progress thread stays aside while callers drive,
                # so a loop polling recv(timeout=0) never saw a message sent to it
                self.poke()
                driven = item.state == DONE
            if not driven:
                if self.inbox.withdraw(item):
                    text = (f"rank {self.rank}: {item.desc} timed out after {limit:g}s"
                            f"{self.live.peer_note(item)}{self.inbox.unmatched_note(item)}")
                    if item.fp is not None:     # a collective's: it looks again, or gives up
                        raise MeshTimeoutError(text)
                    # a user's receive, withdrawn: a message arriving later goes to the next
                    # receive, and this request stays failed (a second wait raises, done())
                    item.error = MeshTimeoutError(text if isinstance(item, Probe) else
                        f"{text}; the receive was withdrawn (a message that comes later "
                        f"goes to the next receive that matches)")
                    item.event.set()
                    raise item.error
                done = item.event.wait(max(1.0, limit))
                # matched by an array whose bytes its sender's stream still brings
                # (mesh.streams), or that is read out of its sender's memory (mesh.direct):
                # they come whole, or the sender is lost; never a timeout while they are
                # still written into its out=
                while not done and (self.streams.reading(item)
                                    or self.reader.direct_reading is item):
                    done = item.event.wait(0.1)
                if not done:
                    raise MeshTimeoutError(f"rank {self.rank}: {item.desc} timed out after "
                                           f"{limit:g}s{self.live.peer_note(item)}")
            if item.error is not None:
                raise item.error
            out = item.out
            if out is None:     # flagged: a device array's or a tensor's message
                return delivered(_host_array(item), item.device) if item.device else item.value
            if type(out) is not np.ndarray and device.is_device(out):
                out = device.to_device(_host_array(item), out)
            # a tensor out=: the tensor, written (its autograd version counts it)
            return out if item.target is None else tensors.written(item.target)
        if not item.event.is_set() and not self._await_credit(item, limit):
            with self._peers[item.dst].lock:    # (a message in pieces, going: how far)
                pieces = item.pieces
                left = sum(n for n, _ in pieces) if item.under_way() and pieces else -1
            if left >= 0:
                raise MeshTimeoutError(f"rank {self.rank}: {item.desc} timed out after "
                                       f"{limit:g}s with {item.nbytes - left} of its "
                                       f"{item.nbytes} bytes handed over (the rest still "
                                       f"goes){self.live.peer_note(item)}")
            text = (f"rank {self.rank}: {item.desc} timed out after {limit:g}s waiting for "
                    f"credit from rank {item.dst} (it is not receiving)")
            if withdraw and self._unqueue(item):
                error = MeshTimeoutError(f"{text}; the send was withdrawn: nothing of it "
                                         f"went{self.live.peer_note(item)}")
                item.fail(error)
                raise error
            raise MeshTimeoutError(f"{text}; it stays queued and goes once rank {item.dst} "
                                   f"grants credit (its buffer is in use until a wait returns)"
                                   f"{self.live.peer_note(item)}")
        if item.error is not None:
            raise item.error
        if item.tracker is not None and not item.tracker.done:
            self._await_release(item, deadline, limit)
            item.keep = None
            if item.error is not None:      # (a stream that broke: mesh.streams)
                raise item.error
        return None

    def _unqueue(self, out: Outgoing) -> bool:
        """Take ``out``, a send queued for credit with nothing of it handed
        to ZeroMQ, off its peer's queue (what waits behind it may go now);
        False when it is not there (handed over, or under way)."""
        peer = self._peers[out.dst]
        with peer.lock:
            if out.event.is_set() or out.under_way() or out not in peer.queue:
                return False
            peer.queue.remove(out)
            self._drain(peer)
        return True

    def _await_release(self, item: Outgoing, deadline: float, limit: float) -> None:
        """Wait until ZeroMQ has let go of a zero-copy send's frames. Frames
        bound for a peer that is gone are never released: fail then, and keep
        the buffer alive for as long as ZeroMQ may hold it (until close).
        A direct send (mesh.direct) waits instead for the peer's answer
        that it has read the buffer, reading the socket in this thread."""
        peer = self._peers[item.dst]
        tracker = item.tracker
        assert tracker is not None
        start = time.monotonic()
        warn_at = start + self.stall_warn
        live = self.live
        try:
            while True:
                now = time.monotonic()
                left = deadline - now
                if now >= warn_at:
                    live.stalled_on(item, now - start, limit)
                    warn_at = now + self.stall_warn
                if isinstance(tracker, Ack):    # read by the peer: its answer, read here
                    step = max(0.0, min(left, 0.1))
                    if self._drive(item, now + step, step, tracker.flag):
                        return
                else:
                    live.doing, live.doing_since = item, start    # (what heartbeats say)
                    try:
                        tracker.wait(max(0.0, min(left, 0.1)))
                        return
                    except zmq.NotDone:
                        pass
                if peer.state != ALIVE:
                    self._orphans.append(item.keep)
                    raise self.inbox.gone(peer, item.desc)
                if left <= 0.1:
                    # (a message in pieces: not answered yet; by stream: not written yet)
                    crossing = peer.unanswered + self.streams.pending(item.dst)
                    why = (f"with {crossing} bytes on their way to rank {item.dst} (handed "
                           f"over, not arrived yet: they still go)" if crossing
                           # (mesh.direct: ZeroMQ holds nothing, blaming it misled)
                           else f"before rank {item.dst} read it out of this rank's memory "
                           f"(the same-host direct path: rank {item.dst} not reading, or "
                           f"stopped; the buffer stays in use until it is read)"
                           if isinstance(tracker, Ack)
                           else f"while ZeroMQ still held its buffer (rank {item.dst} not "
                           f"reading it, or the link slow)")
                    raise MeshTimeoutError(f"rank {self.rank}: {item.desc} timed out after "
                                           f"{limit:g}s {why}{live.peer_note(item)}")
        finally:
            if live.doing is item:
                live.doing, live.last, live.last_end = None, item._desc, time.monotonic()

    def _await_credit(self, item: Outgoing, limit: float) -> bool:
        """Wait for a queued send to be handed to ZeroMQ, reading the socket
        in this thread for the grant that hands it over (as a blocked
        receive does: ``Progress.drive``, which reports stalls): left to the
        progress thread, the grant waited for its nap (up to 5 ms, so a
        stream of 64 MiB sends lost 8 ms of every 14)."""
        return self._drive(item, time.monotonic() + limit, limit, item.event) \
            or item.event.is_set()

    # ---- leaving -------------------------------------------------------------

    def peer_state(self, rank: int) -> str:
        return STATE_NAMES[self._peers[rank].state]

    def _settled(self, peer: Peer) -> bool:
        """Whether nothing of this rank's may still need ``peer`` to read
        it, once it has answered our goodbye: no collective's receive still
        posted here (an async one never waited for may yet finish, for its
        peers' sake; a watch, kept to catch an abort, does not count), no
        direct send unread, no bytes left for its stream, nothing kept alive
        that it may still read (a same-host board it reads across processes,
        where it has not finished the last collective this rank posted there:
        its reader answers the goodbye whatever its main thread does)."""
        with self.inbox.lock:
            posted = any(type(q) is not Watched for q in self.inbox.matcher.posted())
        return not (posted or self.direct.sending() or self.streams.pending(peer.rank)
                    or any(reads(peer.rank) for reads in self.reading))

    def close(self, failure: str = "") -> None:
        """Flush queued sends (for as long as the goodbyes are waited for, and
        MESH_CLOSE_LINGER at least), say goodbye, wait for the peers'
        goodbyes (bounded by MESH_CLOSE_WAIT), stop the thread, close sockets.

        ``failure``: the error this rank leaves with. Then nothing is flushed
        and the goodbye carries the error: whatever the peers wait for from
        this rank fails at once. Their answers, not their goodbyes, are
        waited for (_FAIL_WAIT at most): they may be blocked on this rank."""
        wait = config_float("MESH_CLOSE_WAIT", 30.0, least=0)
        linger = config_float("MESH_CLOSE_LINGER", 5.0, least=0)
        # a same-host peer whose process has exited gets nothing more: no flush,
        # no goodbye, no wait for its own (its closed connection's grace is moot)
        self.live.reap()
        owing = _Owing(self, wait if failure else max(linger, wait))
        if not failure:
            # sends queued for credit go first, as long as the goodbyes are waited for (a
            # peer that computes before it receives grants late); a goodbye between a
            # message's pieces would fail its receive
            most = time.monotonic() + max(linger, wait)
            for p in self._peers:
                while ((p.queue or self.streams.pending(p.rank)) and p.state == ALIVE
                       and time.monotonic() < most):
                    time.sleep(0.005)
                    owing.tell()
        for p in self._peers:       # what is still queued would go after the goodbye: fails
            with p.lock:
                unsent = list(p.queue)
                p.queue.clear()
            owing.drop(p, unsent, "was not sent: this rank closed its mesh before rank "
                       f"{p.rank} granted it credit", quiet=bool(failure))
        # a clean goodbye names the first peer this rank lost: what waits on this rank
        # fails naming that root cause (its peers may not have seen that loss yet)
        bye = wire.encode(wire.BYE, self.rank, reason=failure[:2000],
                          peer=-1 if failure else self.inbox.first_lost)
        self.live.clean_bye = not failure   # (before it goes: the answers may come at once)
        for p in self._peers:     # a peer that said goodbye first waits for ours, unless gone
            if p.sock is not None and not (p.state == CLOSED and p.suspect_since):
                self._control(p, bye, upto=CLOSED)
        self.live.leaving = True
        self.inbox.closed = True
        # A receive another thread still waits in can never be answered to
        # it now: it fails at once, not when the peers' goodbyes are in. A
        # collective still under way (an async one never waited for) may
        # yet finish while they come, for its peers' sake.
        self.inbox.fail_posted(p2p_only=True)
        # Like MPI_Finalize: stay until every peer has said goodbye too (or is
        # gone), so no rank exits while a peer may still read from it, be it
        # a message in flight or memory shared by a same-host collective. A
        # peer that answered our goodbye has read everything we sent before it
        # (its reader answers, whatever its main thread does: one stuck in a
        # save or a hang no longer holds us for MESH_CLOSE_WAIT): it is waited
        # for no longer, unless this rank still has something under way (a
        # collective's receive, a direct send not read, bytes for its stream).
        deadline = time.monotonic() + (min(wait, _FAIL_WAIT) if failure else wait)
        reaped = time.monotonic()
        while (any(p.state == ALIVE and not (p.read_bye and self._settled(p))
                   for p in self._peers if p.sock is not None)
               and time.monotonic() < deadline):
            time.sleep(0.002)
            if time.monotonic() - reaped > 0.02:    # (a peer that dies or leaves meanwhile)
                self.live.reap(quiet=True)
                reaped = time.monotonic()
                owing.tell()
        for p in self._peers:   # direct sends unread: their memory is no longer offered
            owing.drop(p, self.direct.unread(p.rank), "was not read: this rank closed its "
                       f"mesh before rank {p.rank} read it out of this rank's memory",
                       quiet=bool(failure) or p.state != ALIVE)
        self.inbox.fail_posted()    # other threads' waits end now, not in torn-down sockets
        self.progress.closing = True
        hooks = [fn for fns in list(self.drop_hooks.values()) for fn in fns]
        self.drop_hooks.clear()
        for fn in reversed(self.on_close + hooks):
            try:
                fn()
            except Exception:
                _log.exception("rank %d: a close hook failed", self.rank)
        self.on_close.clear()
        self.reading.clear()
        self.keep_alive.clear()
        self.direct.close()
        self.streams.close()
        turn = self.progress.stop()     # (held until the sockets are closed)
        self.reader.finish_streams()    # (receives by stream that were under way: fail)
        self.streams.release()
        if self.rings is not None:      # (a later send or receive: the usual way, which says
            self._ringed = [False] * len(self._ringed)      # this rank's mesh is closed)
            self._ring_out = [None] * len(self._ring_out)
            self.rings.close()
        for p in self._peers:
            if p.sock is not None:
                p.sock.disable_monitor()
                if p.monitor is not None:
                    p.monitor.close(linger=0)
                # A dead peer (crashed, or failed and told us) reads at most
                # our answer to its failing goodbye, which it waits for
                # (_FAIL_WAIT at most); one that said goodbye or answered ours
                # while we leave on an error, at most our goodbye. Give that a
                # moment, not the socket's whole linger, which holds up the
                # context's term() when the peer has gone. Leaving cleanly, a
                # peer that said goodbye waits for ours: that keeps the linger.
                # One whose process has exited reads nothing: no linger at all.
                # (A peer whose goodbye we answered waits for ours no longer, once
                # it has what it needs: it may have left, its socket gone.)
                left = p.state == DEAD or (p.state == CLOSED and (failure or p.answered_bye))
                exited = p.state == DEAD and self.live.exited(p.rank) is not None
                p.sock.close(linger=0 if exited else _LEFT_LINGER_MS if left else None)
        self._router.disable_monitor()
        self._router_mon.close(linger=0)
        self._router.close(linger=0)
        if turn:
            self.progress.turn.release()


_OWED_TELL_S = 1.0
"""How long close() waits for a peer to take sends it owes before it logs
which (at most MESH_STALL_WARN; never where that is 0)."""
_OWED_LISTED = 4


class _Owing:
    """What close() says of the sends it waits for a peer to take (isends
    queued for credit, direct sends not read): once the wait has lasted
    _OWED_TELL_S, one line per peer naming them (description, tag, bytes)
    and what the peer last said it was doing; and of those that fail when
    it ends. A slow receiver and a stuck one look alike from here (both
    answer heartbeats): the wait goes on to MESH_CLOSE_WAIT either way, so
    a slow receiver's data is never dropped before then."""

    def __init__(self, t: "Transport", limit: float) -> None:
        self._t, self._limit = t, limit     # (MESH_CLOSE_WAIT, or MESH_CLOSE_LINGER if longer)
        self._start = time.monotonic()
        quiet = t.stall_warn == float("inf")     # (MESH_STALL_WARN=0: no stall reports)
        self._at = float("inf") if quiet else self._start + min(t.stall_warn, _OWED_TELL_S)
        self._told: set[int] = set()

    def owed(self, p: Peer) -> list[tuple[Outgoing, str]]:
        with p.lock:
            queued = [(o, "queued for credit") for o in p.queue]
        unread = [(o, "handed over, not read out of this rank's memory yet")
                  for o in self._t.direct.unread(p.rank)]
        return unread + queued

    def tell(self) -> None:
        """Log, once per peer, the sends close() waits for it to take."""
        if time.monotonic() < self._at:
            return
        t = self._t
        for p in t._peers:
            if p.rank in self._told or p.sock is None or p.state != ALIVE:
                continue
            owed = self.owed(p)
            if not owed:
                continue
            self._told.add(p.rank)
            _log.warning("rank %d: close() waits up to %gs (MESH_CLOSE_WAIT) for rank %d to "
                         "receive %d send(s): %s%s; they fail if it has not by then (a stuck "
                         "peer and a slow one look alike)", t.rank, self._limit, p.rank,
                         len(owed), _listed(owed), t.live.peer_note(owed[0][0]))

    def drop(self, p: Peer, sends: list[Outgoing], why: str, quiet: bool) -> None:
        """Fail ``sends`` to ``p`` (``why``: what befell each), and, unless
        ``quiet`` (closing on an error, or a peer gone: they say so), say
        how long close() waited for them and log them."""
        if not sends:
            return
        t = self._t
        waited = time.monotonic() - self._start
        note = "" if quiet else (f" (it did not receive it in the {waited:.1f}s close() waited: "
                                 f"MESH_CLOSE_WAIT){t.live.peer_note(sends[0])}")
        for out in sends:
            t.direct.forget(out)    # (a direct send queued: registered, never offered)
            out.fail(MeshError(f"rank {t.rank}: {out.desc} ({out.nbytes} bytes) {why}{note}"))
        if not quiet:
            note = t.live.peer_note(sends[0])
            _log.warning("rank %d: closing with %d send(s) to rank %d dropped, not received in "
                         "the %.1fs close() waited (MESH_CLOSE_WAIT): %s%s", t.rank,
                         len(sends), p.rank, waited,
                         _listed([(o, "") for o in sends]), note)


def _listed(owed: list[tuple[Outgoing, str]]) -> str:
    """The first _OWED_LISTED of ``owed`` as close()'s lines name them."""
    text = "; ".join(f"{o.desc}, {o.nbytes} bytes{how and ', ' + how}"
                     for o, how in owed[:_OWED_LISTED])
    more = len(owed) - _OWED_LISTED
    return text + (f"; and {more} more" if more > 0 else "")


def _host_array(item: Pending) -> np.ndarray:
    if not isinstance(item.value, np.ndarray):
        raise BadMessageError(f"{item.desc}: a device out= needs an array message, got a "
                              f"{type(item.value).__name__}")
    return item.value
