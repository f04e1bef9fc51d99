"""Synchronous sends' answers, for mesh.transport's Transport (Comm.ssend,
issend, ssend_init): a message whose header carries an id (mesh.wire's y)
is answered by its receiver with a SYNCED word once a receive took it, or
once it was dropped unread (its group dropped there, its mesh closed with
it unread, no memory for it: the send fails at once naming why), and a
cancel (Request.cancel) asks the receiver to withdraw it from its queue.
The words go through the same-host ring where there is one, else the
socket, after what was sent before them either way.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Callable

from . import wire
from .errors import LostPeerError, MeshError, MeshTimeoutError
from .match import Flag
from .peer import ALIVE, Outgoing, Peer

if TYPE_CHECKING:
    from .inbox import Inbox
    from .rings import _Out


class _Syncing:
    """Transport's synchronous sends' answers and cancels (mesh.transport)."""

    # (Transport's, set in its __init__)
    _syncing: dict[int, Outgoing]       # synchronous sends awaiting SYNCED, by id
    _sync_lock: threading.Lock
    # synchronous sends whose cancel awaits its answer: [set once it came, its SYNC_ word]
    _asking: dict[int, list]
    _control: Callable[..., None]
    _drive: Callable[..., bool]
    _peers: list[Peer]
    _ring_out: list[_Out | None]
    _unqueue: Callable[[Outgoing], bool]
    inbox: Inbox
    named: Callable[..., str]
    rank: int
    timeout: float

    def _expect_sync(self, out: Outgoing, ident: int) -> None:
        """Register the synchronous send ``out`` under ``ident`` (before its
        header can go: the answer may come at once)."""
        out.sync = Flag()
        with self._sync_lock:
            self._syncing[ident] = out

    def on_synced(self, src: int, ident: int, word: int = 0) -> None:
        """A SYNCED word from world rank ``src`` (mesh.wire): of our
        synchronous send ``ident``, that a receive took it (``word`` 0),
        that it was dropped unread (the send fails saying why), withdrawn
        by its cancel (it fails as cancelled) or kept (the cancel found it
        no longer there: it completes as it would have); or, SYNC_CANCEL,
        that ``src`` cancels its send ``ident`` to us: withdrawn if it
        waits unmatched, answered either way."""
        if word == wire.SYNC_CANCEL:
            kept = not self.inbox.withdraw_synced(src, ident)
            self.ack(src, ident, wire.SYNC_KEPT if kept else wire.SYNC_WITHDRAWN)
            return
        with self._sync_lock:
            out = self._syncing.get(ident)
            if out is None or out.dst != src:
                return
            asking = self._asking.pop(ident, None)
            if word != wire.SYNC_KEPT:
                del self._syncing[ident]
        if word and word != wire.SYNC_KEPT:      # (in place before the flag reads set)
            out.error = self._unsynced_error(out, word)
        if word != wire.SYNC_KEPT and out.sync is not None:
            out.sync.set()
        if asking is not None:
            asking[1] = word
            asking[0].set()

    def _unsynced_error(self, out: Outgoing, word: int) -> MeshError:
        """The error of synchronous send ``out`` whose receiver answered
        ``word`` (mesh.wire's SYNC_ words), naming it and its group and tag
        (``out``'s description) and why."""
        d = out._desc
        sub = type(d) is tuple and len(d) > 4 and d[4] is not None    # (a sub-group's)
        who = self.named(out.dst, "world rank" if sub else "rank")
        text = f"rank {self.rank}: {out.described(self._peers)}"
        if word == wire.SYNC_WITHDRAWN:
            return MeshError(f"{text} was cancelled (withdrawn unread from {who}'s queue)")
        why = ("dropped the group (its communicator there was garbage-collected or "
               "freed) before a receive took it" if word == wire.SYNC_GROUP
               else "closed its mesh with it unread" if word == wire.SYNC_CLOSED
               else "had no memory for it")
        text = f"{text} failed: dropped unread: {who} {why}"
        return LostPeerError(text, out.dst) if word == wire.SYNC_CLOSED else MeshError(text)

    def unsync(self, out: Outgoing) -> None:
        """Forget a synchronous send whose answer is no longer awaited (it
        failed: withdrawn, its peer lost, the mesh closed)."""
        with self._sync_lock:
            for k in [k for k, v in self._syncing.items() if v is out]:
                del self._syncing[k]
                self._asking.pop(k, None)

    def ack(self, src: int, ident: int, word: int = 0) -> None:
        """Tell world rank ``src`` that a receive here took its synchronous
        send ``ident`` (Inbox.ack), or (``word``, mesh.wire's SYNC_ words)
        what else became of it, or that we cancel our send ``ident`` to it:
        a SYNCED control message, put in its same-host ring where it has
        one with room (mesh.rings: read in a microsecond or two where a
        socket's message takes tens), else on its socket, after what this
        rank sent it before either way; to this rank itself, handed on here."""
        if src == self.rank:
            self.on_synced(src, ident, word)
            return
        peer = self._peers[src]
        header = wire.encode(wire.SYNCED, self.rank, direct=(ident, word) if word else (ident,))
        ring = self._ring_out[src]
        if ring is not None and not (ring.full and ring.off()):
            frame = wire.inline(header)
            with peer.lock:
                put = peer.state == ALIVE and ring.put(frame, len(frame), peer.sent)
            if put:
                ring.bell()     # (the lock released: a full fence, see send_ring)
                return
        self._control(peer, header)

    def cancel_send(self, out: Outgoing) -> bool:
        """Request.cancel of a send (MPI's Cancel): a synchronous send's
        message (issend, an ssend_init's start) not yet taken by a receive
        is withdrawn: one still queued for credit here, nothing of it gone;
        one handed over, out of its receiver's queue if it waits there
        unmatched (its answer awaited, reading the socket in this thread,
        for the mesh's timeout at most). True then: its wait raises
        MeshError ("... was cancelled") and the receiver never sees it.
        False where it was taken (or is in pieces under way, or failed):
        it completes as it would have. A standard send's message carries
        no id its receiver could find it by: False, always."""
        sync = out.sync
        if sync is None or sync.is_set() or out.error is not None:
            return False
        with self._sync_lock:
            ident = next((k for k, v in self._syncing.items() if v is out), -1)
            if ident < 0:
                return False
            asking = self._asking.get(ident)
            fresh = asking is None      # (else another thread's cancel asks: its answer)
            if asking is None:
                asking = self._asking[ident] = [Flag(), -1]
        asked = asking[0]
        if self._unqueue(out):      # nothing of it went
            self.unsync(out)
            out.fail(MeshError(f"rank {self.rank}: {out.described(self._peers)} was cancelled "
                               f"(withdrawn before any of it went)"))
            sync.set()
            asking[1] = wire.SYNC_WITHDRAWN
            asked.set()
            return True
        if not out.event.is_set():      # (in pieces, under way: its receiver has half)
            with self._sync_lock:
                self._asking.pop(ident, None)
            asking[1] = wire.SYNC_KEPT
            asked.set()
            return False
        if fresh:
            self.ack(out.dst, ident, wire.SYNC_CANCEL)
        peer = self._peers[out.dst]
        limit = self.timeout
        deadline = time.monotonic() + limit
        while not asked.is_set():
            now = time.monotonic()
            if peer.state != ALIVE or self.inbox.closed:   # (its wait raises the loss)
                break
            if now >= deadline:
                raise MeshTimeoutError(
                    f"rank {self.rank}: cancel of {out.described(self._peers)} timed out "
                    f"after {limit:g}s waiting for rank {out.dst}'s answer (it may still "
                    f"come: the wait then raises \"was cancelled\" if it was withdrawn)")
            step = min(deadline - now, 0.1)
            self._drive(out, now + step, step, asked)
        return asking[1] == wire.SYNC_WITHDRAWN
