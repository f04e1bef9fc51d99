"""The send path of mesh.transport's Transport: a message encoded, handed to
ZeroMQ within the peer's credit (or queued for it, and drained as the grants
come), in pieces across hosts, and the control messages beside them.
"""
from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import zmq

from . import wire
from .direct import Ack
from .errors import LostPeerError
from .payload import decode_object, encode_payload
from .peer import ALIVE, Outgoing, Peer, named
from .reader import COPY_BELOW

if TYPE_CHECKING:
    from .direct import Direct
    from .inbox import Inbox
    from .progress import Progress
    from .rings import _Out
    from .streams import Streams


_SNDMORE = int(zmq.SNDMORE)
_CACHE = 1024  # headers remembered per transport
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


def _lost(rank: int, out: Outgoing, peers: list[Peer], why: str) -> LostPeerError:
    """A send of ``rank``'s whose socket failed (``why``), naming its peer
    with its host where that is not this rank's (``peers``: the transport's)."""
    return LostPeerError(f"rank {rank}: {out.described(peers)} failed: {why}", out.dst)


def _why(e: zmq.ZMQError) -> str:
    """What a send's socket error means: EAGAIN, that the peer's connection
    broke (a link is not made again, and nothing else makes a send wait:
    mesh.transport)."""
    if e.errno == zmq.EAGAIN:
        return ("this rank's connection to it closed or was reset (a link is not made "
                "again: what was in flight on it may be lost)")
    return f"{e}"


class _Sending:
    """Transport's sends (mesh.transport): ``isend`` and what hands its frames over."""

    # (Transport's, set in its __init__)
    _encoded: dict[tuple, bytes]
    _sync_ids: Iterator[int]
    _expect_sync: Callable[[Outgoing, int], None]
    unsync: Callable[[Outgoing], None]
    _peers: list[Peer]
    _pieced: list[bool]
    _ring: Callable[[Peer, Outgoing], bool]
    _ring_max: int
    _ring_out: list[_Out | None]
    direct: Direct
    inbox: Inbox
    progress: Progress
    rank: int
    streams: Streams

    def isend(self, dst: int, group: int, tag: int, obj: Any, fp: Any, desc: Any,
              sync: bool = False) -> Outgoing:
        """Send ``obj``; ``sync``: a synchronous send (Comm.ssend), its header
        carrying an id that the receiver answers (SYNCED) once a receive has
        taken it, and done only then (``Outgoing.sync``)."""
        if type(obj) is np.ndarray and fp is None and dst != self.rank \
                and obj.dtype.metadata is None and not sync:   # (bfloat16's bits: flagged)
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
        ident = -1
        if sync:
            ident = header_kw["sync"] = next(self._sync_ids)
        if dst == self.rank:
            out = Outgoing(dst, [], nbytes, desc, None)
            if self.inbox.closed:       # as a send to a peer does (``_submit``)
                out.fail(self.inbox.closed_error(out.described(self._peers), dst))
                return out
            value = np.array(keep, copy=True) if kind == wire.DATA else \
                decode_object(b"".join(payload))
            if sync:
                self._expect_sync(out, ident)
            self.inbox.arrive(self.rank, group, tag, value, nbytes, fp,
                              header_kw.get("device", False), ident)
            self.progress.nudge()
            out.event.set()
            return out
        direct = kind == wire.DATA and nbytes >= self.direct.min_bytes \
            and self.direct.usable(dst)
        if direct:
            out = Outgoing(dst, None, nbytes, desc, keep)    # read by dst out of our memory
            out.frames = [self.direct.header(out, group=group, tag=tag, nbytes=nbytes, fp=fp,
                                             **header_kw)]
        elif kind == wire.DATA and self._pieced[dst] and self.streams.usable(dst, nbytes):
            out = Outgoing(dst, [wire.encode(kind, self.rank, group, tag, nbytes=nbytes, fp=fp,
                                             more=wire.STREAMED, **header_kw)],
                           nbytes, desc, keep)      # its bytes by stream (mesh.streams)
            out.streamed = memoryview(keep.reshape(-1).view(np.uint8))
        else:
            pieced = nbytes > wire.CHUNK_BYTES and self._pieced[dst]   # (to another host)
            header = wire.encode(kind, self.rank, group, tag, nbytes=nbytes, fp=fp,
                                 more=pieced, **header_kw)
            if pieced:      # its header, then its payload in pieces (mesh.wire.CHUNK)
                out = Outgoing(dst, [header], nbytes, desc, keep)
                out.pieced = True
                k = wire.CHUNK_BYTES // wire.FRAME_BYTES     # (payload frames: FRAME_BYTES each)
                out.pieces = deque((sum(map(len, payload[i:i + k])), payload[i:i + k])
                                   for i in range(0, len(payload), k))
            else:
                out = Outgoing(dst, wire.frames(header, payload, nbytes), nbytes, desc, keep)
        if sync:
            self._expect_sync(out, ident)
        self._submit(self._peers[dst], out)
        if out.error is not None:
            if direct:
                self.direct.forget(out)
            if sync:
                self.unsync(out)
        return out

    def _remember(self, key: tuple, header: bytes) -> bytes:
        if len(self._encoded) >= _CACHE:
            self._encoded.clear()
        self._encoded[key] = header
        return header

    def _submit(self, peer: Peer, out: Outgoing) -> None:
        self.progress.unpark()
        ringed = None
        with peer.lock:
            if peer.state != ALIVE or self.inbox.closed:    # (closed: its own error)
                out.fail(self.inbox.gone(peer, out.described(self._peers)))
            elif peer.queue or not peer.admit(out.nbytes):
                peer.queue.append(out)
            elif out.nbytes <= self._ring_max and out.tracker is None and self._ring(peer, out):
                ringed = self._ring_out[peer.rank]
            else:
                self._transmit(peer, out)
        if ringed is not None:      # (the lock released: a full fence, see send_ring)
            ringed.bell()

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
                out.fail(_lost(self.rank, out, self._peers, _why(e)))
                return
            peer.sent += 1
            peer.last_sent = time.monotonic()
            if not streamed:            # in pieces, as ``_stream`` lets them go
                if not self._stream(peer, out):
                    peer.queue.appendleft(out)
            elif self.streams.push(peer.rank, out):
                out.event.set()
            else:                       # (it broke just now: reset, so the peer fails it)
                out.fail(LostPeerError(f"rank {self.rank}: {out.described(self._peers)} failed: "
                                       f"its stream to {named(peer.rank, peer.there)} broke",
                                       peer.rank))
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
                out.seq = peer.sent + 1     # (the message counted below)
        except zmq.ZMQError as e:
            out.fail(_lost(self.rank, out, self._peers, _why(e)))
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
                out.fail(_lost(self.rank, out, self._peers, _why(e)))
                return True
            peer.unanswered += n
            peer.sent += 1   # not last_sent: heartbeats (with status) go between the pieces
        if pieces:
            return False
        out.pieces = None
        out.seq = peer.sent
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
