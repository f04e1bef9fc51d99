"""Transport: one worker's sockets and the progress thread that owns reading.

Every worker binds one ROUTER (ipc:// and tcp://) for everything it receives
and connects one DEALER to each peer for everything it sends:

    rank a: DEALER(a->b) ===> ROUTER(b) :rank b      routing id = sender's rank
    rank a: ROUTER(a) <=== DEALER(b->a) :rank b      credits flow back this way

Senders write from the calling thread (zero-copy frames, under the peer's
lock); the progress thread reads, matches and delivers, grants credit, sends
heartbeats and notices dead peers. Credits bound what a peer may have in
flight to us, so a fast sender cannot make a receiver buffer unbounded memory.

Heartbeats carry a short status (what the sender is waiting in, or what it
last did), so a wait that passes MESH_STALL_WARN seconds logs a stall report
naming the peers it waits for and what they said they were doing.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

import msgpack
import numpy as np
import zmq

from . import auth, device, tensors, wire
from .errors import (AbortKind, BadMessageError, LostPeerError, MeshError, MeshTimeoutError,
                     MismatchError, OutMismatchError)
from .match import ANY, Arrived, Matcher, Pending, Probe, describe
from .liveness import Liveness
from .payload import delivered, encode_payload, fill, fmt_fp, out_problem
from .peer import ALIVE, CLOSED, DEAD, Outgoing, Peer, config_float

__all__ = ["Transport", "Outgoing", "config_float", "abort_error"]

_log = logging.getLogger("mesh.transport")
_COPY_BELOW = 64 * 1024
# What one message costs the receiver beyond its payload (header, ZeroMQ's and
# our bookkeeping): charged against the credit window, so a flood of empty or
# tiny messages is bounded too, not only big payloads.
_MSG_COST = 256
_SNDMORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_CACHE = 1024  # headers remembered, each way, per transport
_FAIL_WAIT = 1.0  # a failing rank's wait for its peers to answer its goodbye


class Transport(Liveness):
    """Sockets, matching and liveness for one rank. Built by ``mesh.init``."""

    def __init__(self, ctx: zmq.Context, router: zmq.Socket, rank: int, size: int,
                 endpoints: list[str], secret: str, timeout: float, curve: bool = False) -> None:
        self.rank, self.size, self.timeout = rank, size, timeout
        # A blocked receive polls (yielding the CPU) up to this long before it
        # sleeps: waking a sleeping (virtual) CPU for a socket costs tens of
        # microseconds, often more than the wait itself, so a short poll
        # catches a reply already on its way, as MPI libraries do. Adapted
        # to the waits seen (_adapt_spin), so long waits do not burn CPU.
        self.spin = config_float("MESH_SPIN_US", 200.0) * 1e-6
        self._spin_now = self.spin     # adapted to the waits seen (_adapt_spin)
        self.window = int(config_float("MESH_WINDOW_BYTES", 64 << 20))
        self.grant_step = max(self.window // 4, 1)
        self.heartbeat = config_float("MESH_HEARTBEAT", 0.5)
        self.peer_timeout = config_float("MESH_PEER_TIMEOUT", 10.0)
        self.stall_warn = config_float("MESH_STALL_WARN", 60.0)
        self.bad_messages = 0
        self.stalls = 0
        self._dead: set[int] = set()
        self._orphans: list[Any] = []   # buffers of sends to lost peers ZeroMQ may still hold
        self._doing: Pending | Outgoing | None = None
        self._doing_since = 0.0
        self._last: Pending | Outgoing | None = None
        self._last_end = 0.0
        self._ctx, self._router = ctx, router
        self._lock = threading.Lock()
        self._matcher = Matcher()
        self.keep_alive: list[Any] = []  # released by close(), after the peers' goodbyes
        self.on_close: list[Callable[[], None]] = []  # called then, before the release
        self._aborted: dict[tuple[int, int], tuple[AbortKind, str, int]] = {}
        self.groups: dict[int, tuple[str, list[int]]] = {0: ("world", list(range(size)))}
        self._peers: list[Peer] = []
        for r, ep in enumerate(endpoints):
            if r == rank:
                self._peers.append(Peer(r, None, None))
                continue
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IDENTITY, str(rank).encode())
            s.setsockopt(zmq.SNDHWM, 0)
            s.setsockopt(zmq.LINGER, 2000)
            auth.make_client(s, secret, curve)
            mon = s.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
                                       | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            s.connect(ep)
            self._peers.append(Peer(r, s, mon))
        self.handshake_failures = 0
        self._router_mon = router.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self._closing = False
        # Headers repeat (same peer, tag, dtype and shape, message after
        # message): encode each once, and decode each distinct byte string
        # once; both tables are bounded and start over when full.
        self._encoded: dict[tuple, bytes] = {}
        self._decoded: dict[bytes, wire.Header] = {}
        self._idents = [str(r).encode() for r in range(size)]
        self._rlock = threading.Lock()
        self._want_lock = threading.Lock()
        self._want = 0
        self._progress_reading = False
        self._aside_until = 0.0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._reader_items: list[Any] = [(self._router, zmq.POLLIN), (self._wake_r, zmq.POLLIN)]
        self._thread = threading.Thread(target=self._run, name=f"mesh-progress-{rank}", daemon=True)
        self._thread.start()

    # ---- sending -------------------------------------------------------------

    def isend(self, dst: int, group: int, tag: int, obj: Any, fp: Any, desc: Any) -> Outgoing:
        if type(obj) is np.ndarray and fp is None and dst != self.rank:
            n = obj.nbytes
            if n < _COPY_BELOW and obj.flags.c_contiguous:   # the common small case, lean
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
                msgpack.unpackb(payload[0], raw=False, strict_map_key=False)
            self._arrive(self.rank, group, tag, value, nbytes, fp, header_kw.get("device", False))
            self._nudge()
            out = Outgoing(dst, [], nbytes, desc, None)
            out.event.set()
            return out
        header = wire.encode(kind, self.rank, group, tag, nbytes=nbytes, fp=fp, **header_kw)
        out = Outgoing(dst, wire.frames(header, payload, nbytes), nbytes, desc, keep)
        self._submit(self._peers[dst], out)
        return out

    def _remember(self, key: tuple, header: bytes) -> bytes:
        if len(self._encoded) >= _CACHE:
            self._encoded.clear()
        self._encoded[key] = header
        return header

    def _submit(self, peer: Peer, out: Outgoing) -> None:
        with peer.lock:
            if peer.state != ALIVE:
                out.fail(self._gone(peer, out.desc))
            elif peer.queue or not self._credit_ok(peer, out.nbytes):
                peer.queue.append(out)
            else:
                self._transmit(peer, out)

    def _credit_ok(self, peer: Peer, n: int) -> bool:
        """Whether a message of ``n`` payload bytes fits the window now."""
        return peer.inflight + n + _MSG_COST <= self.window or peer.inflight < self.grant_step

    def _transmit(self, peer: Peer, out: Outgoing) -> None:
        """Hand frames to ZeroMQ; caller holds ``peer.lock``."""
        frames, out.frames = out.frames or [], None
        peer.inflight += out.nbytes + _MSG_COST
        try:
            if out.nbytes < _COPY_BELOW:
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
        peer.last_sent = time.monotonic()
        out.event.set()

    def _control(self, peer: Peer, header: bytes, upto: int = ALIVE) -> None:
        """Send a control message to ``peer`` if its state is ``upto`` or better
        (ALIVE < CLOSED < DEAD): one that left may never read it again."""
        with peer.lock:
            if peer.state <= upto:
                try:
                    peer.sock.send(header, zmq.NOBLOCK)
                    peer.last_sent = time.monotonic()
                except zmq.ZMQError:
                    pass

    def _consumed(self, src: int, nbytes: int) -> None:
        """A message from ``src`` left our buffers: grant its bytes back."""
        if src == self.rank:
            return
        peer = self._peers[src]
        with self._lock:
            peer.to_grant += nbytes + _MSG_COST
            grant = peer.to_grant if peer.to_grant >= self.grant_step or nbytes >= self.grant_step else 0
            if grant:
                peer.to_grant = 0
        if grant:
            self._control(peer, wire.encode(wire.CREDIT, self.rank, credit=grant))

    def _on_credit(self, peer: Peer, credit: int) -> None:
        with peer.lock:
            peer.inflight = max(0, peer.inflight - credit)
            while peer.queue and peer.state == ALIVE and self._credit_ok(peer, peer.queue[0].nbytes):
                self._transmit(peer, peer.queue.popleft())

    # ---- receiving -----------------------------------------------------------

    def irecv(self, group: int, src: int, tag: int, out: Any, fp: Any, desc: Any,
              probe: bool = False) -> Pending:
        """Post a receive: matched with a waiting message at once, or queued.
        A waiting message that does not fit ``out`` fails it and stays queued.
        A Probe when ``probe``: complete, ``got`` set, once a message it
        matches waits in the unexpected queue, which keeps the message.
        A torch tensor ``out`` is received into through a numpy (or CuPy)
        view of its memory; the tensor is the request's ``target``, which
        ``wait`` returns."""
        target = None
        if out is not None and type(out) is not np.ndarray and tensors.is_tensor(out):
            target, out = out, tensors.out_view(out, f"rank {self.rank}: {describe(desc)}")
        req = Probe(group, src, tag, out, fp, desc) if probe else \
            Pending(group, src, tag, out, fp, desc, target)
        msg = gone = None
        misfit = ""
        with self._lock:
            aborted = self._aborted.get((group, tag)) if self._aborted else None
            if aborted:
                pass
            elif out is None:
                msg = self._matcher.post(req, not probe)
            else:
                msg = self._matcher.post(req, False)
                if msg is None or (msg.fp == fp and (misfit := out_problem(out, msg.value))):
                    pass
                else:
                    self._matcher.take(group, msg)
                    req.state = 1
            if msg is None and not aborted:
                lost = src if src != ANY and self._peers[src].state != ALIVE else \
                    self._dead_member(group) if self._dead and (src == ANY or tag < 0) else None
                if lost is not None:
                    self._matcher.cancel(req)
                    gone = self._gone(self._peers[lost], req.desc, group)
        if msg is not None:
            if misfit:
                req.fail(self._misfit(req, msg.src, msg.tag, msg.value, misfit))
            elif probe:
                req.got = msg.got
                req.complete(None)
            else:
                self._finish(req, msg.src, msg.tag, msg.value, msg.nbytes, msg.fp, msg.device)
        elif aborted:
            req.fail(abort_error(aborted, f"rank {self.rank}: {req.desc} aborted: {aborted[1]}"))
        elif gone is not None:
            req.fail(gone)
        return req

    def iprobe(self, group: int, src: int, tag: int) -> tuple | None:
        """``got`` of the message a receive posted now would take, if any."""
        with self._lock:
            msg = self._matcher.waiting(group, src, tag)
        return None if msg is None else msg.got

    def cancel(self, req: Pending) -> bool:
        """Withdraw ``req`` if no message has matched it (Request.cancel). The
        error is in place before the request reads as complete, so a thread
        already waiting on it raises instead of returning None."""
        with self._lock:
            if req.state != 0:
                return False
            req.error = MeshError(f"rank {self.rank}: {req.desc} was cancelled")
            if not self._matcher.cancel(req):
                req.error = None
                return False
        req.event.set()
        self._nudge()
        return True

    def _complete(self, req: Pending, src: int, tag: int, value: Any, nbytes: int, fp: Any,
                  on_device: int = 0) -> bool:
        """Finish a matched receive with a value that is not yet in ``req.out``.
        False when the value does not fit ``req.out``: ``req`` fails and the
        message is still the caller's to deliver (see _arrive)."""
        out = req.out
        if out is not None and fp == req.fp:
            problem = out_problem(out, value)
            if problem:
                req.fail(self._misfit(req, src, tag, value, problem))
                return False
        self._finish(req, src, tag, value, nbytes, fp, on_device)
        return True

    def _finish(self, req: Pending, src: int, tag: int, value: Any, nbytes: int, fp: Any,
                on_device: int) -> None:
        """_complete once the value is known to fit ``req.out``; ``on_device``
        is the message's origin flags (mesh.wire's v)."""
        self._consumed(src, nbytes)
        if fp != req.fp:
            return self._mismatch(req, src, fp)
        req.device = on_device
        out = req.out
        if type(value) is np.ndarray:
            req.got = (src, tag, nbytes, value.dtype, value.shape)
            if out is not None and isinstance(out, np.ndarray):
                np.copyto(out, value.reshape(out.shape), casting="no")
                value = out
        else:
            req.got = (src, tag, nbytes, None, None)
        req.complete(value)

    def _misfit(self, req: Pending, src: int, tag: int, value: Any, problem: str) -> MeshError:
        ranks = self.groups.get(req.group, ("", []))[1]
        who = f"rank {ranks.index(src)}" if src in ranks else f"world rank {src}"
        return OutMismatchError(f"rank {self.rank}: {req.desc}: the message from {who} (tag "
                                f"{tag}) does not fit out=: {problem}; the message stays queued "
                                f"for the next receive")

    def _mismatch(self, req: Pending, src: int, fp: Any) -> None:
        text = (f"collective mismatch on group {self.groups.get(req.group, ('?',))[0]}: rank "
                f"{self.rank} called {fmt_fp(req.fp)} but rank {src} called {fmt_fp(fp)}")
        req.fail(MismatchError(f"rank {self.rank}: {text}"))
        self.abort(req.group, req.tag, text, AbortKind.MISMATCH)

    def wait(self, item: Pending | Outgoing, timeout: float | None) -> Any:
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        if isinstance(item, Pending):
            if item.state != 2 and not self._drive(item, deadline, limit):
                with self._lock:
                    cancelled = self._matcher.cancel(item)
                if cancelled or not item.event.wait(max(1.0, limit)):
                    raise MeshTimeoutError(f"rank {self.rank}: {item.desc} timed out after "
                                           f"{limit:g}s{self._peer_note(item)}")
            if item.error is not None:
                raise item.error
            out = item.out
            if out is None:     # flagged: a device array's or a tensor's message
                return delivered(_host_array(item), item.device) if item.device else item.value
            if type(out) is not np.ndarray and device.is_device(out):
                out = device.to_device(_host_array(item), out)
            return out if item.target is None else item.target   # a tensor out=: the tensor
        if not item.event.is_set() and not self._await_credit(item, limit):
            raise MeshTimeoutError(f"rank {self.rank}: {item.desc} timed out after {limit:g}s "
                                   f"waiting for credit from rank {item.dst} (it is not "
                                   f"receiving){self._peer_note(item)}")
        if item.error is not None:
            raise item.error
        if item.tracker is not None:
            self._await_release(item, deadline, limit)
            item.keep = None
        return None

    def _await_release(self, item: Outgoing, deadline: float, limit: float) -> None:
        """Wait until ZeroMQ has let go of a zero-copy send's frames. Frames
        bound for a peer that is gone are never released: fail then, and keep
        the buffer alive for as long as ZeroMQ may hold it (until close)."""
        peer = self._peers[item.dst]
        tracker = item.tracker
        assert tracker is not None
        start = time.monotonic()
        warn_at = start + self.stall_warn
        while True:
            now = time.monotonic()
            left = deadline - now
            if now >= warn_at:
                self._stalled(item, now - start, limit)
                warn_at = now + self.stall_warn
            try:
                tracker.wait(max(0.0, min(left, 0.1)))
                return
            except zmq.NotDone:
                pass
            if peer.state != ALIVE:
                self._orphans.append(item.keep)
                raise self._gone(peer, item.desc)
            if left <= 0.1:
                raise MeshTimeoutError(f"rank {self.rank}: {item.desc} timed out after {limit:g}s "
                                       f"while rank {item.dst} was not reading"
                                       f"{self._peer_note(item)}")

    def _drive(self, item: Pending, deadline: float, limit: float) -> bool:
        """Wait for ``item`` by reading the ROUTER in this thread: the progress
        thread steps aside while anyone waits, so a reply is read by the thread
        that wants it, with no hand-off between threads. False on timeout."""
        with self._want_lock:
            self._want += 1
            if self._progress_reading:
                os.write(self._wake_w, b"w")
        start = deadline - limit
        warn_at = start + self.stall_warn
        self._doing, self._doing_since = item, start
        held = False
        polled = 0.0
        try:
            while item.state != 2:     # complete (the flag is set just after)
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    return False
                if now >= warn_at:
                    self._stalled(item, now - start, deadline - start)
                    warn_at = now + self.stall_warn
                if not held:
                    held = self._rlock.acquire(timeout=min(left, 0.002))
                    if not held:       # another waiter reads; it completes us too
                        item.event.wait(min(left, 0.002))
                        continue
                ready = None
                if not polled:
                    polled = time.perf_counter()
                    if self._spin_now:    # poll a little before sleeping (see __init__)
                        spin_end = polled + self._spin_now
                        while True:
                            ready = zmq.zmq_poll(self._reader_items, 0)
                            if ready or time.perf_counter() >= spin_end:
                                break
                            os.sched_yield()
                if not ready:
                    ready = zmq.zmq_poll(self._reader_items, int(min(left, 0.05) * 1000))
                if ready:
                    if len(ready) > 1 or ready[0][0] is not self._router:
                        self._drain_wake()
                    for _ in range(1024):
                        if not self._read_one() or item.state == 2:
                            break
            if polled and self.spin:
                self._adapt_spin(time.perf_counter() - polled)
            return True
        finally:
            if held:
                self._rlock.release()
            end = time.monotonic()
            self._doing, self._last, self._last_end = None, item, end
            with self._want_lock:
                self._want -= 1
                if self._want == 0:
                    self._aside_until = end + 0.002

    def _adapt_spin(self, waited: float) -> None:
        """Like adaptive halt polling: a wait longer than the longest spin
        halves the spin (long waits, big messages: polling would only take
        CPU from the threads that move the data); a short wait that the spin
        missed doubles it, up to MESH_SPIN_US."""
        now = self._spin_now
        if waited > self.spin:
            self._spin_now = now / 2 if now > 5e-6 else 0.0
        elif waited > now:
            self._spin_now = min(self.spin, max(2 * now, 10e-6))

    def _await_credit(self, item: Outgoing, limit: float) -> bool:
        """Wait for a queued send to be handed to ZeroMQ; report stalls."""
        start = time.monotonic()
        end = start + limit
        self._doing, self._doing_since = item, start
        try:
            while True:
                left = end - time.monotonic()
                if left <= 0 or item.event.wait(min(left, self.stall_warn)):
                    return item.event.is_set()
                if time.monotonic() < end:
                    self._stalled(item, time.monotonic() - start, limit)
        finally:
            self._doing, self._last, self._last_end = None, item, time.monotonic()

    # ---- stall reports -------------------------------------------------------

    def _nudge(self) -> None:
        """Wake a thread blocked reading, after completing a request elsewhere."""
        if self._want:
            try:
                os.write(self._wake_w, b"n")
            except OSError:
                pass

    def _drain_wake(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except (BlockingIOError, OSError):
            pass

    def _arrive(self, src: int, group: int, tag: int, value: Any, nbytes: int, fp: Any,
                on_device: int = 0) -> None:
        """Deliver a fully received message that no posted receive had claimed:
        to the first posted receive it fits (those it does not fit fail), else
        to the unexpected queue, waking the probes it matches."""
        while True:
            with self._lock:
                if (group, tag) in self._aborted:
                    req = None
                else:
                    req = self._matcher.take_posted(group, src, tag)
                    if req is None:
                        probes = self._matcher.add_unexpected(
                            group, tag, Arrived(src, tag, value, nbytes, fp, on_device))
                        break
            if req is None:
                self._consumed(src, nbytes)
                return
            if self._complete(req, src, tag, value, nbytes, fp, on_device):
                return
        for p in probes:
            p.complete(None)

    def _read_one(self) -> bool:
        """Read and dispatch one message from the ROUTER; False when none is
        waiting. Frame by frame: the header says how big the payload is, so
        small payloads come as bytes and large ones as zero-copy frames."""
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
        if head.startswith(b"\xc1"):       # a small message in one frame
            try:
                head, body = wire.split_inline(head)
            except BadMessageError as e:
                return self._bad(str(e), more)
            if more:
                return self._bad("a one-frame message with more frames", more)
            payload.append(body)
        h = self._decoded.get(head)
        if h is None:
            try:
                h = wire.decode(head, self.size)
            except BadMessageError as e:
                return self._bad(str(e), more)
            # A collective's header carries its sequence number, so each is
            # seen once: only point-to-point headers are worth keeping.
            if h.kind <= wire.OBJ and h.fp is None:
                if len(self._decoded) >= _CACHE:
                    self._decoded.clear()
                self._decoded[head] = h
        if ident != self._idents[h.src] or h.src == self.rank:
            return self._bad(f"header says source {h.src} but the connection is {ident!r}", more)
        peer = self._peers[h.src]
        peer.last_heard = time.monotonic()
        if more:              # frames: small ones as bytes, large ones zero-copy
            copy = h.nbytes < _COPY_BELOW
            while more:
                frame = router.recv(0, copy=False)
                more = frame.more
                payload.append(frame.bytes if copy else frame.buffer)
        if h.kind == wire.DATA:
            self._read_array(h, payload)
        elif h.kind == wire.OBJ:
            if len(payload) != 1 or len(payload[0]) != h.nbytes:
                return self._bad(f"object payload of {sum(map(len, payload))} bytes in "
                                 f"{len(payload)} frames, header says {h.nbytes}")
            try:
                value = msgpack.unpackb(payload[0], raw=False, strict_map_key=False)
            except Exception as e:
                return self._bad(f"object payload is not msgpack ({type(e).__name__})")
            self._arrive(h.src, h.group, h.tag, value, h.nbytes, h.fp)
        elif payload:
            return self._bad(f"control message kind {h.kind} with a payload")
        elif h.kind == wire.CREDIT:
            self._on_credit(peer, h.credit)
        elif h.kind == wire.HEARTBEAT:
            self._on_heartbeat(peer, h.reason, h.peer)
        elif h.kind == wire.ABORT:
            # Pass it on, once: a member that fails because of this abort says
            # goodbye after it, on the same connection, so no member can hear
            # of that failure before it hears of the abort (a lost peer would
            # otherwise be reported where every rank should see a mismatch).
            if self._abort_local(h.group, h.tag, h.abort, h.reason, h.peer):
                self._send_abort(h.group, h.tag, h.reason, h.abort, h.peer, h.src)
        elif h.kind == wire.BYE:
            self._on_bye(peer, h.reason)
        return True

    def _read_array(self, h: wire.Header, parts: list) -> None:
        """Check the payload's length before anything else, so a malformed
        message never claims a receive nor touches a caller's ``out=``; then
        copy the frames once into the destination."""
        got = len(parts[0]) if len(parts) == 1 else sum(map(len, parts))
        if got != h.nbytes:
            self._bad(f"payload of {got} bytes from rank {h.src}, header says {h.nbytes}")
            return
        with self._lock:
            req = None if self._aborted and (h.group, h.tag) in self._aborted else \
                self._matcher.take_posted(h.group, h.src, h.tag)
        if req is not None:
            out = req.out
            if (type(out) is np.ndarray and out.dtype == h.dt and out.nbytes == got
                    and req.fp == h.fp and (f := out.flags).c_contiguous and f.writeable):
                fill(out, parts)            # straight into the caller's out=
                self._consumed(h.src, got)
                req.got = h
                req.complete(out)
                return
        dest = np.empty(h.shape or (), h.dt)
        fill(dest, parts)
        if req is None or not self._complete(req, h.src, h.tag, dest, h.nbytes, h.fp, h.device):
            self._arrive(h.src, h.group, h.tag, dest, h.nbytes, h.fp, h.device)

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

    # ---- aborts and lost peers --------------------------------------------------

    def abort(self, group: int, tag: int, reason: str, kind: AbortKind = AbortKind.OTHER,
              peer: int = -1) -> None:
        """Fail ``tag`` on every member of ``group``: pending and future ops raise.
        A lost-peer abort names ``peer`` (a world rank) when given; else, with
        a member of the group known dead, the error is a lost peer naming it."""
        if kind != AbortKind.LOST_PEER or peer < 0:
            lost = self._dead_member(group) if self._dead and kind != AbortKind.MISMATCH \
                else None
            if lost is not None:
                kind = AbortKind.LOST_PEER
            peer = -1 if lost is None else lost
        if self._abort_local(group, tag, kind, reason, peer):
            self._send_abort(group, tag, reason, kind, peer)

    def _send_abort(self, group: int, tag: int, reason: str, kind: AbortKind, peer: int,
                    heard_from: int = -1) -> None:
        header = wire.encode(wire.ABORT, self.rank, group, tag, reason=reason, abort=kind,
                             peer=peer)
        for r in self.groups.get(group, ("", []))[1]:
            if r != self.rank and r != heard_from:
                self._control(self._peers[r], header)

    def _abort_local(self, group: int, tag: int, kind: AbortKind, reason: str,
                     peer: int = -1) -> bool:
        with self._lock:
            if (group, tag) in self._aborted:
                return False
            if kind == AbortKind.LOST_PEER and peer < 0 and self._dead:
                lost = self._dead_member(group)
                peer = -1 if lost is None else lost
            record = self._aborted[(group, tag)] = (kind, reason, peer)
            reqs = self._matcher.remove_posted(lambda q: q.group == group and q.tag == tag)
            dropped = self._matcher.drop_unexpected(group, tag)
        for m in dropped:
            self._consumed(m.src, m.nbytes)
        for q in reqs:
            q.fail(abort_error(record, f"rank {self.rank}: {q.desc} aborted: {reason}"))
        self._nudge()
        return True

    def close(self, linger: float = 5.0, failure: str = "") -> None:
        """Flush queued sends (bounded), say goodbye, wait for the peers'
        goodbyes (bounded by MESH_CLOSE_WAIT), stop the thread, close sockets.

        ``failure``: the error this rank leaves with. Then nothing is flushed
        and the goodbye carries the error: whatever the peers wait for from
        this rank fails at once. Their answers, not their goodbyes, are
        waited for (_FAIL_WAIT at most): they may be blocked on this rank."""
        if not failure:
            deadline = time.monotonic() + linger
            for p in self._peers:
                while p.queue and p.state == ALIVE and time.monotonic() < deadline:
                    time.sleep(0.005)
        bye = wire.encode(wire.BYE, self.rank, reason=failure[:2000])
        for p in self._peers:     # a peer that said goodbye first waits for ours, unless gone
            if p.sock is not None and not (p.state == CLOSED and p.suspect_since):
                self._control(p, bye, upto=CLOSED)
        # Like MPI_Finalize: stay until every peer has said goodbye too (or is
        # gone), so no rank exits while a peer may still read from it, be it
        # a message in flight or memory shared by a same-host collective.
        wait = config_float("MESH_CLOSE_WAIT", 30.0)
        deadline = time.monotonic() + (min(wait, _FAIL_WAIT) if failure else wait)
        while (any(p.state == ALIVE for p in self._peers if p.sock is not None)
               and time.monotonic() < deadline):
            time.sleep(0.002)
        self._closing = True
        for fn in reversed(self.on_close):
            try:
                fn()
            except Exception:
                _log.exception("rank %d: a close hook failed", self.rank)
        self.on_close.clear()
        self.keep_alive.clear()
        self._thread.join(timeout=5)
        for p in self._peers:
            if p.sock is not None:
                p.sock.disable_monitor()
                if p.monitor is not None:
                    p.monitor.close(linger=0)
                # nothing queued for a dead peer will ever be read: do not let
                # it hold the context's term() for the linger period
                p.sock.close(linger=0 if p.state == DEAD else None)
        self._router.disable_monitor()
        self._router_mon.close(linger=0)
        self._router.close(linger=0)
        os.close(self._wake_r)
        os.close(self._wake_w)


def abort_error(record: tuple[AbortKind, str, int], text: str) -> MeshError:
    kind, _, peer = record
    if kind == AbortKind.LOST_PEER:
        return LostPeerError(text, peer if peer >= 0 else None)
    return kind.error(text)


def _host_array(item: Pending) -> np.ndarray:
    if not isinstance(item.value, np.ndarray):
        raise BadMessageError(f"{item.desc}: a device out= needs an array message, got a "
                              f"{type(item.value).__name__}")
    return item.value
