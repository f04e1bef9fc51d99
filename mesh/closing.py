"""The goodbye of mesh.transport's Transport: ``close()`` flushes what is
queued, says goodbye, waits for the peers' goodbyes (``_settled``), drops and
reports the sends still owed (``_Owing``), and closes the sockets.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

import zmq

from . import wire
from .errors import MeshError
from .liveness import close_watched
from .match import Watched
from .peer import ALIVE, CLOSED, DEAD, Outgoing, Peer, config_float

if TYPE_CHECKING:
    from .direct import Direct
    from .inbox import Inbox
    from .liveness import Liveness
    from .progress import Progress
    from .reader import Reader
    from .rings import Rings, _Out
    from .streams import Streams

_log = logging.getLogger("mesh.transport")

_FAIL_WAIT = 1.0  # a failing rank's wait for its peers to answer its goodbye
_LEFT_LINGER_MS = 200  # for what is queued to a peer that left or answered (see close)


class _Closing:
    """Transport's ``close`` (mesh.transport)."""

    # (Transport's, set in its __init__)
    _control: Callable[..., None]
    _peers: list[Peer]
    _ring_out: list[_Out | None]
    _ringed: list[bool]
    _router: zmq.Socket
    _router_mon: zmq.Socket
    direct: Direct
    drop_hooks: dict[int, list[Callable[[], None]]]
    inbox: Inbox
    keep_alive: list[Any]
    live: Liveness
    on_close: list[Callable[[], None]]
    progress: Progress
    rank: int
    reader: Reader
    reading: list[Callable[[int], bool]]
    rings: Rings | None
    stall_warn: float
    streams: Streams

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
        # a goodbye names the first peer this rank lost: after a clean close, what waits
        # on this rank fails naming that root cause (its peers may not have seen that
        # loss yet); a failing one's error is what they quote, naming it (with its host,
        # where that is not theirs: Inbox.relayed); each
        # says how many of its addressee's messages this rank read: a send of the peer's
        # that waits for ZeroMQ to let go of its frames arrived if it was among them
        reason, lost = failure[:2000], self.inbox.first_lost
        heard = self.reader.heard
        if not failure:     # synchronous sends left unread: their senders told, before it
            self.inbox.close_unread()
        self.live.clean_bye = not failure   # (before it goes: the answers may come at once)
        for p in self._peers:     # a peer that said goodbye first waits for ours, unless gone
            if p.sock is not None and not (p.state == CLOSED and p.suspect_since):
                self._control(p, wire.encode(wire.BYE, self.rank, reason=reason, peer=lost,
                                             heard=heard[p.rank]), upto=CLOSED)
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
        close_watched(self._router, self._router_mon)
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

    def __init__(self, t: _Closing, limit: float) -> None:
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
                         len(owed), _listed(owed, t._peers), t.live.peer_note(owed[0][0]))

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
            out.fail(MeshError(f"rank {t.rank}: {out.described(t._peers)} ({out.nbytes} bytes) "
                               f"{why}{note}"))
        if not quiet:
            note = t.live.peer_note(sends[0])
            _log.warning("rank %d: closing with %d send(s) to rank %d dropped, not received in "
                         "the %.1fs close() waited (MESH_CLOSE_WAIT): %s%s", t.rank,
                         len(sends), p.rank, waited,
                         _listed([(o, "") for o in sends], t._peers), note)


def _listed(owed: list[tuple[Outgoing, str]], peers: list[Peer]) -> str:
    """The first _OWED_LISTED of ``owed`` as close()'s lines name them."""
    text = "; ".join(f"{o.described(peers)}, {o.nbytes} bytes{how and ', ' + how}"
                     for o, how in owed[:_OWED_LISTED])
    more = len(owed) - _OWED_LISTED
    return text + (f"; and {more} more" if more > 0 else "")
