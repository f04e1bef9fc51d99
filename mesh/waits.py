"""The waits of mesh.transport's Transport: a receive's or a send's ``wait``
until done, timed out, withdrawn or interrupted, with what its errors say.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import zmq

from . import device, tensors
from .direct import Ack
from .errors import BadMessageError, MeshError, MeshTimeoutError
from .match import DONE, Flag, Pending, Probe
from .payload import delivered
from .peer import ALIVE, Outgoing, Peer

if TYPE_CHECKING:
    from .inbox import Inbox
    from .liveness import Liveness
    from .reader import Reader
    from .streams import Streams


_LAND_S = 5.0
"""How long an interrupted receive that a message had matched waits for its
bytes to land before the interrupt goes on (Transport._interrupted)."""


class _Waiting:
    """Transport's waits (mesh.transport)."""

    # (Transport's, set in its __init__)
    _drive: Callable[..., bool]
    _orphans: list[Any]
    _peers: list[Peer]
    _unqueue: Callable[[Outgoing], bool]
    unsync: Callable[[Outgoing], None]
    inbox: Inbox
    live: Liveness
    poke: Callable[[], bool]
    rank: int
    reader: Reader
    stall_warn: float
    streams: Streams
    timeout: float

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
            item.error = MeshError(f"rank {self.rank}: {item.described(self._peers)} was "
                                   f"interrupted; the receive was withdrawn (a message that "
                                   f"comes later goes to the next receive that matches)")
            item.event.set()
            return
        note = getattr(error, "add_note", None)     # (Python 3.11)
        if note is None or isinstance(item, Probe):     # (a probe takes nothing)
            return
        done = item.event.wait(max(0.0, min(deadline - time.monotonic(), _LAND_S)))
        got = ("received whole (out= holds it, or a later wait() returns it)"
               if done and item.error is None else f"it did not complete: {item.error}"
               if done else f"not landed within {_LAND_S:g}s, it goes on into out=")
        note(f"rank {self.rank}: {item.described(self._peers)} had matched its message when "
             f"interrupted (not withdrawn): {got}; the next receive takes the message after it")

    def wait(self, item: Pending | Outgoing, timeout: float | None,
             withdraw: bool = False, start: float | None = None) -> Any:
        """``item``'s value (None for a send) once done. ``withdraw``: a
        send still queued for credit when ``timeout`` runs out is taken off
        the queue (a blocking send: its caller has the buffer back).
        ``start``: when the call began, where this wait is its last part
        (sendrecv's receive, after its send): ``timeout`` counts from then,
        and its error says the call's own (``timed out after 1s``, not what
        was left of it for the receive, ``0.99908s``)."""
        limit = self.timeout if timeout is None else timeout
        deadline = (time.monotonic() if start is None else start) + limit
        if isinstance(item, Pending):
            try:
                driven = item.state == DONE or self._drive(item, deadline, limit)
            except (zmq.ZMQError, ValueError, OSError):
                if not self.inbox.closed:
                    self._interrupted(item)
                    raise
                driven = True   # another thread closed the mesh under this wait
                if item.error is None:
                    item.error = self.inbox.closed_error(item.described(self._peers))
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
                    text = (f"rank {self.rank}: {item.described(self._peers)} timed out after "
                            f"{limit:g}s{self.live.peer_note(item)}"
                            f"{self.inbox.unmatched_note(item)}")
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
                    raise MeshTimeoutError(f"rank {self.rank}: {item.described(self._peers)} "
                                           f"timed out after {limit:g}s"
                                           f"{self.live.peer_note(item)}")
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
                raise MeshTimeoutError(f"rank {self.rank}: {item.described(self._peers)} timed "
                                       f"out after {limit:g}s with {item.nbytes - left} of its "
                                       f"{item.nbytes} bytes handed over (the rest still "
                                       f"goes){self.live.peer_note(item)}")
            text = (f"rank {self.rank}: {item.described(self._peers)} timed out after "
                    f"{limit:g}s waiting for credit from rank {item.dst} (it is not receiving)")
            if withdraw and self._unqueue(item):
                error = MeshTimeoutError(f"{text}; the send was withdrawn: nothing of it "
                                         f"went{self.live.peer_note(item)}")
                item.fail(error)
                if item.sync is not None:
                    self.unsync(item)
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
        if item.sync is not None:
            if not item.sync.is_set():
                self._await_match(item, item.sync, deadline, limit)
            if item.error is not None:      # (dropped unread, or cancelled: its receiver said)
                raise item.error
        return None

    def _await_match(self, item: Outgoing, sync: Flag, deadline: float, limit: float) -> None:
        """Wait until the receiver of synchronous send ``item`` says a
        receive took it (mesh.wire's SYNCED), reading the socket in this
        thread. Its peer lost (died, or left without taking it) raises
        LostPeerError naming it; this mesh closed, its error; the timeout,
        MeshTimeoutError naming the peer and the send (heartbeats meanwhile
        say this rank waits in it: the peer's own timeout names both)."""
        peer = self._peers[item.dst]
        while not sync.is_set():
            now = time.monotonic()
            if peer.state != ALIVE or self.inbox.closed:
                if sync.is_set():       # (its answer came before its goodbye)
                    return
                self.unsync(item)
                item.error = self.inbox.gone(peer, item.described(self._peers))
                raise item.error
            if now >= deadline:
                raise MeshTimeoutError(
                    f"rank {self.rank}: {item.described(self._peers)} timed out after "
                    f"{limit:g}s before a receive of rank {item.dst}'s took it (a synchronous "
                    f"send completes once the matching receive is posted; the message stays "
                    f"there for one){self.live.peer_note(item)}")
            step = min(deadline - now, 0.1)
            self._drive(item, now + step, step, sync)

    def _await_credit(self, item: Outgoing, limit: float) -> bool:
        """Wait for a queued send to be handed to ZeroMQ, reading the socket
        in this thread for the grant that hands it over (as a blocked
        receive does: ``Progress.drive``, which reports stalls): left to the
        progress thread, the grant waited for its nap (up to 5 ms, so a
        stream of 64 MiB sends lost 8 ms of every 14)."""
        return self._drive(item, time.monotonic() + limit, limit, item.event) \
            or item.event.is_set()

    def read_before_leaving(self, item: Outgoing) -> bool:
        """Whether the peer that send ``item`` went to said, as it left, that
        it had read it: its goodbye's count of our messages (wire's BYE h)
        reaches ``item.seq``, or, a message in pieces, it answered every
        piece."""
        if item.sync is not None:       # synchronous: only a receive's taking it counts
            return item.sync.is_set()
        peer = self._peers[item.dst]
        return 0 < item.seq <= peer.read_ours or (item.pieced and peer.unanswered == 0)

    def _await_release(self, item: Outgoing, deadline: float, limit: float) -> None:
        """Wait until ZeroMQ has let go of a zero-copy send's frames. Frames
        bound for a peer that is gone are never released: fail then, and keep
        the buffer alive for as long as ZeroMQ may hold it (until close).
        A direct send (mesh.direct) waits instead for the peer's answer
        that it has read the buffer, reading the socket in this thread.
        A message the peer's goodbye says it had read (wire's BYE h, against
        ``item.seq``) is with the peer, whose leaving then ends the wait: the
        send is done (its frames' release, by pyzmq's garbage thread, late
        under load, is on its way; ZeroMQ holds them meanwhile). So is a
        message in pieces whose every piece the peer answered (read before
        its goodbye, on its one connection): the send does not fail on the
        peer's leaving since (``read_before_leaving``)."""
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
                    if self.read_before_leaving(item):     # it read the message, then left
                        return
                    self._orphans.append(item.keep)
                    raise self.inbox.gone(peer, item.described(self._peers))
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
                    raise MeshTimeoutError(f"rank {self.rank}: {item.described(self._peers)} "
                                           f"timed out after {limit:g}s {why}"
                                           f"{live.peer_note(item)}")
        finally:
            if live.doing is item:
                live.doing, live.last, live.last_end = None, item._desc, time.monotonic()


def _host_array(item: Pending) -> np.ndarray:
    if not isinstance(item.value, np.ndarray):
        raise BadMessageError(f"{item.desc}: a device out= needs an array message, got a "
                              f"{type(item.value).__name__}")
    return item.value
