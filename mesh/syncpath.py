"""Synchronous sends' answers, for mesh.transport's Transport (Comm.ssend,
issend, ssend_init): a message whose header carries an id (mesh.wire's y)
is answered by its receiver with a SYNCED word once a receive took it, or
once it was dropped unread (its group dropped there, its mesh closed with
it unread, no memory for it: the send fails at once naming why). The
words go through the same-host ring where there is one, else the
socket, after what was sent before them either way.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable

from . import wire
from .errors import LostPeerError, MeshError
from .match import Flag
from .peer import ALIVE, Outgoing, Peer

if TYPE_CHECKING:
    from .inbox import Inbox
    from .rings import _Out


class _Syncing:
    """Transport's synchronous sends' answers (mesh.transport)."""

    # (Transport's, set in its __init__)
    _syncing: dict[int, Outgoing]       # synchronous sends awaiting SYNCED, by id
    _sync_lock: threading.Lock
    _control: Callable[..., None]
    _peers: list[Peer]
    _ring_out: list[_Out | None]
    inbox: Inbox
    named: Callable[..., str]
    rank: int

    def _expect_sync(self, out: Outgoing, ident: int) -> None:
        """Register the synchronous send ``out`` under ``ident`` (before its
        header can go: the answer may come at once)."""
        out.sync = Flag()
        with self._sync_lock:
            self._syncing[ident] = out

    def on_synced(self, src: int, ident: int, word: int = 0) -> None:
        """A SYNCED word from world rank ``src`` (mesh.wire) of our
        synchronous send ``ident``: a receive took it (``word`` 0), or it
        was dropped unread (the send fails saying why)."""
        with self._sync_lock:
            out = self._syncing.get(ident)
            if out is None or out.dst != src:
                return
            del self._syncing[ident]
        if word:        # (in place before the flag reads set)
            out.error = self._unsynced_error(out, word)
        if out.sync is not None:
            out.sync.set()

    def _unsynced_error(self, out: Outgoing, word: int) -> MeshError:
        """The error of synchronous send ``out`` whose receiver answered
        ``word`` (mesh.wire's SYNC_ words), naming it and its group and tag
        (``out``'s description) and why."""
        d = out._desc
        sub = type(d) is tuple and len(d) > 4 and d[4] is not None    # (a sub-group's)
        who = self.named(out.dst, "world rank" if sub else "rank")
        text = f"rank {self.rank}: {out.described(self._peers)}"
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

    def ack(self, src: int, ident: int, word: int = 0) -> None:
        """Tell world rank ``src`` that a receive here took its synchronous
        send ``ident`` (Inbox.ack), or (``word``, mesh.wire's SYNC_ words)
        that it was dropped unread: a SYNCED control message, put in its
        same-host ring where it has one with room (mesh.rings: read in a
        microsecond or two where a socket's message takes tens), else on
        its socket, after what this rank sent it before either way; to this
        rank itself, handed on here."""
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
