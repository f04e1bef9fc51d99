"""The reader: one message off the ROUTER, decoded, checked and handed on.

Frame by frame: the header says how big the payload is, so small payloads
come as bytes and large ones as zero-copy frames; an array is copied once,
straight into the caller's ``out=`` when a posted receive has one that fits.
Data goes to the inbox, credit to the send path, heartbeats and goodbyes to
liveness, aborts to the inbox. A message that comes in pieces (mesh.wire.CHUNK,
across hosts) is kept, its pieces' frames as they are, and answered piece by
piece; once whole it goes on as if it had come in one. An array whose bytes
come on the sender's stream (mesh.streams) is read by that stream's thread;
what comes from that sender meanwhile (but its credit, answers and
heartbeats) is held, and dispatched once the bytes are in. A malformed message
is dropped whole (every frame of it) and counted in ``bad_messages``.
Whoever holds the reading turn calls ``read_one`` (see mesh.progress).
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any, Callable

import numpy as np
import zmq

from . import cma, wire
from .direct import Direct
from .errors import BadMessageError, MeshError
from .inbox import Inbox, abort_error
from .liveness import Liveness
from .payload import decode_object, fill
from .peer import ALIVE, DEAD, MSG_COST, Peer
from .rings import MARK, Rings
from .streams import Job, Streams

__all__ = ["Reader", "COPY_BELOW"]

_log = logging.getLogger("mesh.transport")
COPY_BELOW = 64 * 1024   # payloads smaller than this are copied, not zero-copy
_NOBLOCK = int(zmq.NOBLOCK)
_CACHE = 1024  # headers remembered
_MARKED = MARK.bit_length() - 1     # a length word's header id, shifted down by this
_OWE = 256 << 10   # ``take`` grants credit back once this much is owed to a peer (at most)


def _fits(out: Any, req: Any, h: wire.Header) -> bool:
    """Whether a message described by ``h`` can land straight in the claiming
    receive's ``out=`` (a writable C-contiguous numpy array of its dtype and
    size, posted for the same fingerprint)."""
    return (type(out) is np.ndarray and out.dtype == h.dt and out.nbytes == h.nbytes
            and req.fp == h.fp and (f := out.flags).c_contiguous and f.writeable
            and (out.dtype.char != "H"      # uint16: bfloat16's bits on one side only?
                 or (out.dtype.metadata is None) is (h.dt.metadata is None)))


class Reader:
    """Reads rank ``rank``'s ROUTER; ``on_credit(peer, bytes)`` takes grants."""

    def __init__(self, router: zmq.Socket, rank: int, peers: list[Peer], inbox: Inbox,
                 live: Liveness, on_credit: Callable[[Peer, int], None],
                 direct: Direct, rings: Rings | None = None,
                 on_answer: Callable[[Peer, int], None] | None = None,
                 control: Callable[..., None] | None = None,
                 streams: Streams | None = None,
                 on_synced: Callable[[int, int, int], None] | None = None) -> None:
        self.rank, self.size = rank, len(peers)
        self.bad_messages = 0
        self._router, self._peers, self._inbox, self._live = router, peers, inbox, live
        self._on_credit, self._direct, self._on_answer = on_credit, direct, on_answer
        self._control = control     # what answers a piece (mesh.wire.GOT)
        # a synchronous send of ours was taken, or dropped, or one of a peer's is to be
        # withdrawn (SYNCED: the peer, the send's id, what of it)
        self._on_synced = on_synced
        # by peer, its message in pieces under way: [header, the frames so far, bytes]
        self._pieces: dict[int, list] = {}
        # mesh.streams: by peer whose message's bytes its stream thread reads now,
        # what came from it since (header, payload), held; the reads done
        self._streams = streams
        self._streaming: dict[int, list] = live.streaming     # (liveness reads it too)
        self.finished: deque[Job] = streams.finished if streams is not None else deque()
        # mesh.direct: the receive whose bytes are being read out of its sender's
        # memory now (a wait that times out meanwhile waits for them)
        self.direct_reading: Any = None
        self.streams_fd = streams.wake_r if streams is not None else -1
        self._idents = [str(r).encode() for r in range(len(peers))]
        self._rank_of = {ident: r for r, ident in enumerate(self._idents)}
        # messages read off each peer's socket: mesh.rings orders its ring by them,
        # and this rank's goodbye tells each peer its count (close, in mesh.closing)
        self.rings = rings
        self.heard = [0] * len(peers)
        self._ringed = [False] * len(peers)
        if rings is not None:
            for r in rings.peers:
                self._ringed[r] = True
        # Headers repeat (same peer, tag, dtype and shape, message after
        # message): decode each distinct byte string once; bounded, starts
        # over when full.
        self._decoded: dict[bytes, wire.Header] = {}
        # those of plain arrays, unpacked for ``take``: (header, (src, group, tag, the
        # length of its ring entry), nbytes, dtype, the credit a message frees, the
        # bytes its entry takes in the ring)
        self._plain: dict[bytes, tuple] = {}
        self._owed = [0] * len(peers)   # credit ``take`` freed, per peer, not granted yet
        self._owe = min([_OWE] + [p.grant_step // 4 for p in peers])   # ... up to this
        self._owing = False             # whether any is
        # per peer, the entry ``take`` took last, known by its length word (the
        # header's id, mesh.rings.MARK): (the word, group, tag, header, where its
        # payload starts, nbytes, dtype, the credit it frees, the bytes it takes in
        # the ring, the last offset it may start at); the next is most often the same
        self._known: list[tuple] = [(-1, 0, 0, None, 0, 0, None, 0, 0, 0)] * len(peers)
        self._claim, self._arrive = inbox.claim, inbox.arrive
        self._consumed, self._complete = inbox.consumed, inbox.complete
        self._ack = inbox.ack_of

    def read_one(self) -> bool:
        """Read and dispatch one message from the ROUTER; False when none is
        waiting."""
        if self.finished:
            self.finish_streams()
        router = self._router
        try:
            ident = router.recv(_NOBLOCK)
        except zmq.Again:
            return False
        # A ROUTER puts the sender's identity before >= 1 frame. Frame.more
        # is read off the message; Socket.get(RCVMORE) costs several times more.
        frame = router.recv(0, copy=False)
        more = frame.more
        head = frame.bytes
        payload: list = []
        del frame
        src = self._rank_of.get(ident)
        if src is None:
            return self._dispatch(ident, head, payload, more)
        if self._ringed[src]:   # what its ring holds from before, first
            rings = self.rings
            assert rings is not None
            rings.drain(src, self.heard[src], self._from_ring)
            self.heard[src] += 1
            rings.heard(src, self.heard[src])
            try:
                return self._dispatch(ident, head, payload, more)
            finally:
                rings.drain(src, self.heard[src], self._from_ring)
        self.heard[src] += 1
        return self._dispatch(ident, head, payload, more)

    def read_rings(self, force: bool = False, until: Callable[[], bool] | None = None) -> int:
        """Deliver what the same-host peers' rings hold (mesh.rings), if a
        sender wrote since the last look (always, with ``force``); with
        ``until``, stop once it is true (a waiting receive is complete:
        what follows stays in the ring for ``take``, the cheaper way)."""
        rings = self.rings
        if rings is None or not (force or rings.changed()):
            return 0
        return rings.drain_all(self.heard, self._from_ring, until)

    def take(self, src: int, group: int, tag: int, out: np.ndarray | None) -> Any:
        """The head of rank ``src``'s ring for a receive of the calling
        thread that asks for it alone (mesh.progress.await_ring): ``(array,
        header)`` when it is an array of ``group`` and ``tag`` that fits
        ``out`` (None: a new array) and its header was seen before, copied
        out and taken; None when the ring is empty; False when what is
        there is for the usual way (``_from_ring``), waits for the socket,
        or does not fit ``out`` (read-only, not C-contiguous: the usual way
        says so), or no array can be made for it (no memory: the usual way
        drops it, saying so to the receive and to a synchronous sender,
        where the receive raised a bare MemoryError and the entry stayed at
        the ring's head, its ssend waiting to its timeout). The ring's
        ``peek`` and ``pop``, inline (``Rings.where``) for an entry whose
        length word (the header's id: mesh.rings.MARK) is that of the last
        one taken from ``src`` (``_known``), the rest by ``_take_other``;
        the credit it frees is granted back in batches (``_owe``), and what
        is left when the reading turn's holder goes to sleep (``settle``)."""
        rings: Rings = self.rings     # type: ignore[assignment]  # (not None: no assert here)
        q = rings.q
        tail_w, head_w, base = rings.where[src]
        head = rings.heads[src]
        if head == q[tail_w]:
            return None
        off = head & rings.mask
        w = (base + off) >> 3
        word, g, t, h, skip, nbytes, dt, cost, step, last = self._known[src]
        if q[w + 1] != word or t != tag or g != group or q[w] > self.heard[src] or off > last:
            return self._take_other(src, group, tag, out)
        if out is None:
            try:
                out = np.empty(h.shape or (), dt)
            except MemoryError:     # the usual way drops it, failing the receive and a
                return False        # synchronous send's sender (``_fresh``)
        elif out.dtype is not dt and (out.dtype != dt or (out.dtype.metadata is None)
                                      is not (dt.metadata is None)):
            # another dtype, or bfloat16's bits on one side only (uint16 == bfloat16's
            # dtype: its bits went into a uint16 out=, where the usual way says so)
            return False
        if nbytes:     # copied once, out of the map into ``out`` (out.data: cheaper)
            at = base + off + skip
            try:
                out.data.cast("B")[:] = rings.mv[at:at + nbytes]
            except (TypeError, ValueError):     # read-only, not C-contiguous, another size
                return False
        elif out.nbytes or not out.flags.writeable:
            return False
        rings.heads[src] = q[head_w] = head + step
        owed = self._owed[src] + cost
        if owed >= self._owe:
            self._owed[src] = 0
            self._consumed(src, owed - MSG_COST)
            self._peers[src].last_heard = time.monotonic()
        else:
            self._owed[src] = owed
            self._owing = True
        return out, h

    def _take_other(self, src: int, group: int, tag: int, out: np.ndarray | None) -> Any:
        """``take`` for an entry it does not know by its length word: past
        a wrap, waiting for the socket, another header (looked up by its
        bytes: ``_plain``), or none seen before. A header with an id is
        known from then on (``_known``); either way the entry is taken by
        ``take``, as one it knows."""
        rings: Rings = self.rings     # type: ignore[assignment]
        n = rings.peek(src, self.heard[src])
        if n <= 0:
            return None if n == 0 else False
        m, at = rings.map, rings.at
        word = rings.q[(at >> 3) - 1]
        if m[at] != wire.INLINE_MARK:
            return False
        plen = 3 + (m[at + 1] | m[at + 2] << 8)
        found = self._plain.get(m[at + 3:at + plen]) if plen <= n else None
        if found is None:
            found = self._synced_entry(bytes(m[at + 3:at + plen])) if plen <= n else None
            if found is None:
                return False
        h, fields, nbytes, dt, cost, step = found
        if fields != (src, group, tag, n):     # fields: (src, group, tag, the entry's length)
            return False
        known = self._known[src]
        self._known[src] = (word, group, tag, h, 16 + plen, nbytes, dt, cost, step,
                            rings.end - n)
        try:
            got = self.take(src, group, tag, out)
        finally:
            if not word >> _MARKED:      # no id: known for this entry only
                self._known[src] = known
        if got and h.sync >= 0:         # a synchronous send's, taken: its sender told
            self._ack(h)
        return got

    def _synced_entry(self, head: bytes) -> tuple | None:
        """``_plain``'s entry for the header ``head`` of a synchronous send's
        plain array (mesh.wire's y: its id makes each header new, never
        kept), so that ``take`` takes it as it takes another; None for any
        other header (the usual way reads it)."""
        try:
            h = wire.decode(head, self.size)
        except BadMessageError:
            return None
        if h.kind != wire.DATA or h.sync < 0 or h.device & 1 or h.direct or h.fp is not None:
            return None
        n = 3 + len(head) + h.nbytes
        return (h, (h.src, h.group, h.tag, n), h.nbytes, h.dt, h.nbytes + MSG_COST,
                16 + ((n + 15) & ~15))

    def forget_lost(self) -> None:
        """Drop what came of a message in pieces whose sender is gone (the
        progress thread, holding the reading turn, every tick)."""
        if self._pieces:
            for src in [r for r in self._pieces if self._peers[r].state != ALIVE]:
                del self._pieces[src]
        if self._streams is not None:   # (their threads: a read under way fails, delivered)
            self._streams.forget_lost()

    def settle(self) -> None:
        """Grant back the credit ``take`` owes (mesh.progress, before the
        reading turn's holder sleeps): a sender must not wait on it."""
        if not self._owing:
            return
        self._owing = False
        owed = self._owed
        for src, n in enumerate(owed):
            if n:
                owed[src] = 0
                self._consumed(src, n - MSG_COST)

    def _from_ring(self, src: int, frame: memoryview) -> None:
        """One message out of rank ``src``'s ring: an array or an object,
        delivered as from the socket (the bytes are copied before the ring
        moves on), or the answer to a synchronous send of ours (SYNCED)."""
        try:
            head, body = wire.split_inline(frame)
            h = self._header(head)
        except BadMessageError as e:
            self._bad(f"from rank {src}'s ring: {e}")
            return
        if h.kind == wire.SYNCED and h.src == src and not body:
            self._synced(h)     # (a receive of its took our ssend, or...)
            return
        if h.src != src or h.kind > wire.OBJ or h.direct:
            self._bad(f"rank {src}'s ring holds a message of kind {h.kind} from rank {h.src}")
            return
        self._peers[src].last_heard = time.monotonic()
        self._deliver(h, [body])

    def _header(self, head: bytes) -> wire.Header:
        """``head`` decoded, each distinct point-to-point header once (a
        collective's carries its sequence number, so each is seen once)."""
        h = self._decoded.get(head)
        if h is None:
            h = wire.decode(head, self.size)
            if h.kind <= wire.OBJ and h.fp is None and h.sync < 0:   # (a sync id: once)
                if len(self._decoded) >= _CACHE:
                    self._decoded.clear()
                    self._plain.clear()
                self._decoded[head] = h
                # (a CPU torch tensor's too: mesh.comm.recv makes the tensor)
                if h.kind == wire.DATA and not h.device & 1 and not h.direct:
                    n = 3 + len(head) + h.nbytes      # its ring entry's length
                    self._plain[head] = (h, (h.src, h.group, h.tag, n), h.nbytes, h.dt,
                                         h.nbytes + MSG_COST, 16 + ((n + 15) & ~15))
        return h

    def _dispatch(self, ident: bytes, head: bytes, payload: list, more: Any) -> bool:
        """The rest of ``read_one``: the message whose first frame was ``head``."""
        router = self._router
        if head.startswith(b"\xc1"):       # a small message in one frame
            try:
                head, body = wire.split_inline(head)
            except BadMessageError as e:
                return self._bad(str(e), more)
            if more:
                return self._bad("a one-frame message with more frames", more)
            payload.append(body)
        try:
            h = self._header(head)
        except BadMessageError as e:
            return self._bad(str(e), more)
        if ident != self._idents[h.src] or h.src == self.rank:
            return self._bad(f"header says source {h.src} but the connection is {ident!r}", more)
        peer = self._peers[h.src]
        peer.last_heard = time.monotonic()
        if more:              # frames: small ones as bytes, large ones zero-copy
            copy = h.nbytes < COPY_BELOW
            while more:
                frame = router.recv(0, copy=False)
                more = frame.more
                payload.append(frame.bytes if copy else frame.buffer)
        return self._handle(h, peer, payload)

    def _handle(self, h: wire.Header, peer: Peer, payload: list) -> bool:
        """A message whose frames are all read: handed on by its kind."""
        if self._streaming and h.kind not in (wire.CREDIT, wire.GOT, wire.HEARTBEAT):
            held = self._streaming.get(h.src)
            if held is not None:
                held.append((h, payload))     # after the message its stream brings
                return True
        if h.kind == wire.CHUNK:
            self._piece(h, peer, payload)
        elif h.more == wire.STREAMED:
            if payload:
                return self._bad("a message whose payload follows on a stream, with payload "
                                 "frames")
            self._read_stream(h, peer)
        elif h.more:
            if payload:
                return self._bad("a message whose payload follows in pieces, with payload "
                                 "frames")
            if h.src in self._pieces:
                self._drop_pieces(h.src, "a message began before the last one's pieces ended")
            self._pieces[h.src] = [h, [], 0]
        elif h.kind == wire.DATA and h.direct:
            if payload:
                return self._bad("a direct-path message with payload frames")
            self._read_direct(h, peer)
        elif h.kind <= wire.OBJ:
            self._deliver(h, payload)
        elif payload:
            return self._bad(f"control message kind {h.kind} with a payload")
        elif h.kind == wire.CREDIT:
            self._on_credit(peer, h.credit)
        elif h.kind == wire.GOT and self._on_answer is not None:
            self._on_answer(peer, h.credit)
        elif h.kind == wire.HEARTBEAT:
            self._live.on_heartbeat(peer, h.reason, h.peer)
        elif h.kind == wire.ABORT:
            # Pass it on, once: a member that fails because of this abort says
            # goodbye after it, on the same connection, so no member can hear
            # of that failure before it hears of the abort (a lost peer would
            # otherwise be reported where every rank should see a mismatch).
            # (Sent before the waiters on the tag wake: see Inbox.abort_local.)
            inbox = self._inbox
            inbox.abort_local(h.group, h.tag, h.abort, inbox.relayed(h.reason, h.abort, h.peer),
                              h.peer,
                              tell=lambda: inbox.send_abort(h.group, h.tag, h.reason, h.abort,
                                                            h.peer, h.src))
        elif h.kind == wire.BYE:
            self._live.on_bye(peer, h.reason, h.peer, h.heard)
        elif h.kind == wire.DONE:
            self._direct.on_done(h.direct[0])
        elif h.kind == wire.SYNCED:
            self._synced(h)
        elif h.kind == wire.PROBE:
            if not self._live.leaving:    # else nobody sends to us again, and an answer
                self._direct.on_probe(peer, h.direct)   # would wait for a peer that left
        elif h.kind == wire.RING and len(h.direct) == 4 and self.rings is not None:
            self.rings.attach(h.src, h.direct)
        elif h.kind == wire.STREAM and self._streams is not None:
            why = self._streams.on_message(peer, h)
            if why:
                return self._bad(why)
        return True

    def _synced(self, h: wire.Header) -> None:
        """A SYNCED word from rank ``h.src`` (mesh.wire): what became of a
        synchronous send of ours, or its cancel of one of its own."""
        if self._on_synced is not None:
            x = h.direct
            self._on_synced(h.src, x[0], x[1] if len(x) > 1 else 0)

    def _read_stream(self, h: wire.Header, peer: Peer) -> None:
        """An array whose bytes follow on rank ``h.src``'s stream
        (mesh.streams): the receive it goes to is claimed now (as on the
        direct path), and its stream's thread reads the bytes into its
        ``out=`` when that fits, else into a fresh array; ``finish_streams``
        delivers it. Until then what comes from that rank is held."""
        req = self._claim(h.group, h.src, h.tag, h.nbytes)
        dest = req.out if req is not None and _fits(req.out, req, h) else None
        into = dest is not None
        if dest is None:
            dest = self._fresh(h, req)      # (None: read and dropped; the receive failed)
            if dest is None:
                req = None
        job = Job(h, req, dest, into)
        if self._streams is None or not self._streams.read(job):
            job.error = "it sent an array by a stream that was never opened to this rank"
            self.finished.append(job)
        self._streaming[h.src] = []

    def finish_streams(self) -> None:
        """Deliver the arrays the streams' threads have read, then what came
        from their senders meanwhile, in order; a stream that failed loses
        its sender (what came after it is dropped, but for its aborts and a
        failing goodbye: it is gone)."""
        finished = self.finished
        while finished:
            job = finished.popleft()
            h, req, dest = job.h, job.req, job.dest
            src = h.src
            held = self._streaming.pop(src, [])
            peer = self._peers[src]
            if job.error:
                if not self._inbox.closed:
                    # what its sender said after the array first: a failing goodbye names
                    # its error (the stream its close cut only says it ended) and is
                    # answered; an abort it passed on is heard before its loss (_handle)
                    for h2, payload in held:
                        if h2.kind == wire.ABORT or (h2.kind == wire.BYE and h2.reason):
                            self._handle(h2, peer, payload)
                    self._inbox.peer_gone(src, f"reading its message (tag {h.tag}, {h.nbytes} "
                                               f"bytes) from its stream failed: {job.error}",
                                          DEAD)
                if req is not None:     # (its call aborted by one of those: the abort's error)
                    record = self._inbox.aborted.get((req.group, req.tag))
                    what = req.described(self._peers)
                    req.fail(self._inbox.gone(peer, what, req.group) if record is None
                             else abort_error(record, f"rank {self.rank}: {what} aborted: "
                                                      f"{record[1]}"))
                continue
            if self._streams is not None:
                self._streams.got += 1
            if dest is None:
                pass                            # dropped (no memory): said so then
            elif job.into:
                self._consumed(src, h.nbytes)
                req.got = h
                req.complete(dest)
                if h.sync >= 0:     # (a synchronous send's: its sender told)
                    self._ack(h)
            elif req is None or not self._complete(req, src, h.tag, dest, h.nbytes, h.fp,
                                                   h.device, h.sync):
                self._arrive(src, h.group, h.tag, dest, h.nbytes, h.fp, h.device, h.sync)
            for i, (h2, payload) in enumerate(held):
                self._handle(h2, peer, payload)
                if src in self._streaming:     # another array by stream: the rest after it
                    self._streaming[src].extend(held[i + 1:])
                    break

    def _piece(self, h: wire.Header, peer: Peer, payload: list) -> None:
        """A piece of rank ``h.src``'s message under way: kept and answered
        (the sender hands over more); the message delivered once whole."""
        src = h.src
        part = self._pieces.get(src)
        got = len(payload[0]) if len(payload) == 1 else sum(map(len, payload))
        if part is None:
            self._bad(f"a piece of {got} bytes from rank {src}, of no message")
            return
        first, frames, have = part
        have += got
        if got != h.nbytes or have > first.nbytes:
            self._drop_pieces(src, f"a piece of {got} bytes (its header says {h.nbytes}) "
                                   f"past {part[2]} of {first.nbytes} bytes")
            return
        frames += payload
        part[2] = have
        if self._control is not None:
            self._control(peer, wire.encode(wire.GOT, self.rank, credit=got), ALIVE, False)
        if have == first.nbytes:
            del self._pieces[src]
            self._deliver(first, frames)

    def _drop_pieces(self, src: int, why: str) -> None:
        """Drop rank ``src``'s message under way, as a bad message (its credit
        granted back)."""
        first = self._pieces.pop(src, None)
        if first is not None:
            self._consumed(src, first[0].nbytes)
        self._bad(f"from rank {src}: {why}")

    def _deliver(self, h: wire.Header, payload: list) -> bool:
        """An array or an object message, its payload in ``payload``."""
        if h.kind == wire.DATA:
            self._read_array(h, payload)
            return True
        packed = payload[0] if len(payload) == 1 else b"".join(payload)
        if not payload or len(packed) != h.nbytes:
            return self._bad(f"object payload of {sum(map(len, payload))} bytes in "
                             f"{len(payload)} frames, header says {h.nbytes}")
        try:
            value = decode_object(packed)
        except Exception as e:
            return self._bad(f"object payload is not msgpack ({type(e).__name__})")
        self._arrive(h.src, h.group, h.tag, value, h.nbytes, h.fp, 0, h.sync)
        return True

    def _read_array(self, h: wire.Header, parts: list) -> None:
        """Check the payload's length before anything else, so a malformed
        message never claims a receive nor touches a caller's ``out=``; then
        copy the frames once into the destination."""
        got = len(parts[0]) if len(parts) == 1 else sum(map(len, parts))
        if got != h.nbytes:
            self._bad(f"payload of {got} bytes from rank {h.src}, header says {h.nbytes}")
            return
        req = self._claim(h.group, h.src, h.tag, h.nbytes)
        if req is not None:
            out = req.out
            if _fits(out, req, h):
                fill(out, parts)            # straight into the caller's out=
                self._consumed(h.src, got)
                req.got = h
                req.complete(out)
                if h.sync >= 0:
                    self._ack(h)
                return
        dest = self._fresh(h, req)
        if dest is None:
            return
        fill(dest, parts)
        if req is None or not self._complete(req, h.src, h.tag, dest, h.nbytes, h.fp, h.device,
                                             h.sync):
            self._arrive(h.src, h.group, h.tag, dest, h.nbytes, h.fp, h.device, h.sync)

    def _read_direct(self, h: wire.Header, peer: Peer) -> None:
        """An array to read out of the sender's memory (mesh.direct): into
        the claiming receive's ``out=`` when it fits, else a fresh array;
        then tell the sender. A failed read (the sender is gone) loses the
        peer; the claiming receive, if any, raises LostPeerError. One whose
        call was aborted here is not read: ``Inbox.arrive`` would drop it."""
        pid = self._direct.pids[h.src]
        if not pid:
            self._bad(f"a direct-path message from rank {h.src}, which was never probed")
            return
        req = self._claim(h.group, h.src, h.tag, h.nbytes)
        if req is None and self._inbox.drops(h.group, h.tag):
            # Its call was aborted here (or its group dropped): it would be read only to be
            # dropped, maybe after its sender heard our goodbye and exited, the read then
            # failing as a lost peer (logged as an error). Freed unread, credit and all.
            self._direct.read_done(peer, h.direct[1])
            self._consumed(h.src, h.nbytes)
            if h.sync >= 0:     # (a synchronous send's, of a user tag: its group dropped)
                self._inbox.ack(h.src, h.sync, wire.SYNC_GROUP)
            return
        # Matched now, read for a while (seconds for GiBs under load): a wait whose
        # timeout runs out meanwhile waits for the end, as on a stream, so it never
        # raises while its out= is still being written (it did, 1 s past its timeout)
        self.direct_reading = req
        try:
            self._read_direct_into(h, peer, pid, req)
        finally:
            self.direct_reading = None

    def _read_direct_into(self, h: wire.Header, peer: Peer, pid: int, req: Any) -> None:
        """_read_direct, its receive (if any) claimed."""
        dest = req.out if req is not None and _fits(req.out, req, h) else None
        into_out = dest is not None
        if dest is None:
            dest = self._fresh(h, req)
            if dest is None:    # (dropped: the sender's buffer is free)
                self._direct.read_done(peer, h.direct[1])
                return
        err = cma.read_errno(pid, h.direct[0], dest) if h.nbytes else 0
        if err:
            self._inbox.peer_gone(h.src, f"reading its message (tag {h.tag}, {h.nbytes} bytes) "
                                  f"out of its memory failed: {os.strerror(err)}", DEAD)
            if req is not None:
                req.fail(self._inbox.gone(peer, req.described(self._peers), req.group))
            return
        self._direct.read_done(peer, h.direct[1])
        if into_out:
            assert req is not None
            self._consumed(h.src, h.nbytes)
            req.got = h
            req.complete(dest)
            if h.sync >= 0:     # (a synchronous send's: its sender told)
                self._ack(h)
        elif req is None or not self._complete(req, h.src, h.tag, dest, h.nbytes, h.fp,
                                               h.device, h.sync):
            self._arrive(h.src, h.group, h.tag, dest, h.nbytes, h.fp, h.device, h.sync)

    def _fresh(self, h: wire.Header, req: Any) -> np.ndarray | None:
        """A new array for the array message ``h``; None where there is no
        memory for it: the message is dropped (its credit granted back) and
        the receive that took it (``req``) fails saying so, naming the
        sender; else, the receive it was for waits on, the log says why."""
        try:
            return np.empty(h.shape or (), h.dt)
        except MemoryError as e:
            why = (f"no memory for the message of {h.nbytes} bytes from world rank {h.src} "
                   f"(tag {h.tag}), dropped: {e}")
            self._consumed(h.src, h.nbytes)
            if h.sync >= 0:     # (a synchronous send's: its sender told)
                self._inbox.ack(h.src, h.sync, wire.SYNC_NO_MEMORY)
        if req is not None:
            req.fail(MeshError(f"rank {self.rank}: {req.described(self._peers)} failed: {why}"))
        else:
            _log.error("rank %d: %s", self.rank, why)
        return None

    def _bad(self, why: str, more: Any = 0) -> bool:
        """Drop a message (the rest of its frames too) and count it. Logged
        at the 1st, 2nd, 4th, 8th... so a flood cannot flood the log."""
        while more:
            more = self._router.recv(0, copy=False).more
        self.bad_messages += 1
        n = self.bad_messages
        if n & (n - 1) == 0:
            _log.warning("rank %d: dropped a bad message: %s (%d so far)", self.rank, why, n)
        return True
