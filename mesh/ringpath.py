"""The same-host ring paths of mesh.transport's Transport: a small array
sent into a peer's shared-memory ring (mesh.rings) and received from one by
the calling thread, with no socket, no queue and no wait for the progress
thread.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from . import rings, tensors, wire
from .peer import MSG_COST, Outgoing, Peer
from .sendpath import _CACHE

if TYPE_CHECKING:
    from .errors import AbortKind
    from .progress import Progress
    from .reader import Reader
    from .rings import Rings, _Out


SENT = Outgoing(-1, None, 0, "a send by ring", None)   # what send_ring's sends wait on: done
SENT.event.set()


class _RingPaths:
    """Transport's short ways through the same-host rings (mesh.transport)."""

    # (Transport's, set in its __init__)
    _expect_sync: Callable[[Outgoing, int], None]
    _sync_ids: Iterator[int]
    unsync: Callable[[Outgoing], None]
    _aborted: dict[tuple[int, int], tuple[AbortKind, str, int]]
    _awake_rung: memoryview | None
    _marked: int
    _marks: dict[bytes, int]
    _peers: list[Peer]
    _posted: dict
    _posted_any: dict
    _prefixes: dict[tuple, tuple]
    _quiet: Callable[[int, int, int], bool]
    _ring_max: int
    _ring_out: list[_Out | None]
    _ringed: list[bool]
    _take: Callable[[int, int, int, np.ndarray | None], Any]
    _unexpected: dict
    _wild: dict
    progress: Progress
    rank: int
    reader: Reader
    rings: Rings | None

    def send_ring(self, dst: int, group: int, tag: int, obj: np.ndarray,
                  bits: int = 0, sync: int = -1) -> Outgoing | None:
        """Send a small array to a same-host peer by its ring (mesh.rings),
        header and bytes copied in and nothing else: SENT, done already;
        None when it must go the usual way (``isend``: no ring, too big,
        not C-contiguous, no credit or room, sends queued before it).
        ``bits``: the header's flags (mesh.tensors.TORCH: a torch tensor's
        memory, so the receiver gets one); ``sync``: a synchronous send's
        id (``ssend_ring``), in a header made for it alone."""
        ring = self._ring_out[dst]
        if ring is None or (ring.full and ring.off()):
            return None
        dt = obj.dtype       # a dtype hashes slowly: not in the key, known by identity
        # (another dtype there replaces the entry)
        key = (obj.shape, group, tag) if not bits else (obj.shape, group, tag, bits)
        known = self._prefixes.get(key) if sync < 0 else None
        if known is None or known[0] is not dt:     # (not C-contiguous: ``put`` raises ValueError)
            n = obj.nbytes
            if n > self._ring_max or not wire.dtype_ok(dt):
                return None
            flags = bits | (tensors.BF16 if dt.metadata is not None    # numpy's bfloat16
                            and tensors.dtype_name(dt) == "bfloat16" else 0)
            pre = wire.inline(wire.encode(wire.DATA, self.rank, group, tag, dtype=dt.str,
                                          shape=obj.shape, nbytes=n, device=flags, sync=sync))
            if sync >= 0:       # (its id: seen once, neither kept nor marked)
                known = (dt, pre, len(pre), n, n + MSG_COST, len(pre) + n)
            else:
                if len(self._prefixes) >= _CACHE:
                    self._prefixes.clear()
                    self._marks.clear()
                mark = self._marks.get(pre, 0)   # its header's id: one no other header had
                if not mark and self._marked < rings.MARKS - 1:   # (once all are given: none)
                    self._marked += 1
                    mark = self._marks[pre] = rings.MARK * self._marked
                known = self._prefixes[key] = (dt, pre, len(pre), n, n + MSG_COST,
                                               len(pre) + n + mark)    # n: bytes; length word
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

    def ssend_ring(self, dst: int, group: int, tag: int, obj: np.ndarray,
                   desc: Any) -> Outgoing | None:
        """A synchronous send (Comm.ssend) of a small array by ``send_ring``:
        handed over, done once the receiver answers that a receive took it
        (mesh.wire's SYNCED); None when it must go the usual way (``isend``).
        Through ``isend``, the progress thread was woken for each, and its
        reading turn, taken from the caller waiting for the answer, made an
        8-byte ssend round trip take 180-300 us."""
        ident = next(self._sync_ids)
        out = Outgoing(dst, None, obj.nbytes, desc, None)
        self._expect_sync(out, ident)
        if self.send_ring(dst, group, tag, obj, 0, ident) is None:
            self.unsync(out)
            return None
        out.event.set()
        return out

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
