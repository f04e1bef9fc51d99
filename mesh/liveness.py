"""Liveness: the progress thread and its watch over the peers.

The thread reads the ROUTER when no caller is waiting (see Transport._drive),
and always watches the DEALER monitors (a peer's connection closing), sends
heartbeats carrying this rank's status, declares silent or vanished peers
lost (failing everything that involves them), and writes stall reports:
which peers an operation waits for and what they last said they were doing.

Leaving: a goodbye (BYE) makes the peer closed; heartbeats go on both ways
until it has left, so nobody finds a live rank silent. A rank leaving on an
error says so in its goodbye: its peers fail at once whatever waits on it,
naming its error, and answer, so that it need not wait for their goodbyes.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterable

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import wire
from .errors import LostPeerError
from .match import ANY, Matcher, Pending
from .peer import ALIVE, CLOSED, DEAD, Outgoing, Peer

__all__ = ["Liveness"]

_log = logging.getLogger("mesh.transport")


class Liveness:
    """The half of Transport that watches peers; Transport owns the state."""

    rank: int
    timeout: float
    heartbeat: float
    peer_timeout: float
    stalls: int
    handshake_failures: int
    groups: dict[int, tuple[str, list[int]]]
    _peers: list[Peer]
    _lock: threading.Lock
    _matcher: Matcher
    _dead: set[int]
    _doing: Pending | Outgoing | None
    _doing_since: float
    _last: Pending | Outgoing | None
    _last_end: float
    _router: Any
    _router_mon: Any
    _wake_r: int
    _closing: bool
    _want: int
    _want_lock: threading.Lock
    _rlock: threading.Lock
    _aside_until: float
    _progress_reading: bool

    def _read_one(self) -> bool:
        raise NotImplementedError

    def _drain_wake(self) -> None: ...

    def _nudge(self) -> None: ...

    def _control(self, peer: Peer, header: bytes, upto: int = ALIVE) -> None: ...

    def _what(self, item: Pending | Outgoing) -> str:
        return item.desc    # a collective's message names it (mesh.match.describe)

    def status(self) -> str:
        """What this rank is doing, as its heartbeats tell its peers."""
        now = time.monotonic()
        item, since = self._doing, self._doing_since
        if item is not None:
            return f"waiting {now - since:.1f}s in {self._what(item)}"
        last = self._last
        if last is not None:
            return f"not in a mesh call; last: {self._what(last)}, {now - self._last_end:.1f}s ago"
        return "not in a mesh call yet"

    def _stalled(self, item: Pending | Outgoing, waited: float, limit: float) -> None:
        if isinstance(item, Outgoing):
            peers = [item.dst]
        elif item.src != ANY:
            peers = [item.src]
        else:
            peers = self.groups.get(item.group, ("", []))[1]
        self.stalled(self._what(item), peers, waited, limit)

    def stalled(self, what: str, peers: Iterable[int], waited: float,
                limit: float | None = None) -> None:
        """Log that ``what`` has waited ``waited`` seconds for world ranks
        ``peers``, with what each of them last told us it was doing. Any wait
        loop may call it (collectives that wait outside the transport do)."""
        now = time.monotonic()
        notes = []
        for r in peers:
            if r == self.rank:
                continue
            p = self._peers[r]
            said = (f"{p.status} (said {now - p.status_at:.1f}s ago)" if p.status
                    else "no status heard yet")
            notes.append(f"rank {r} [{('alive', 'closed', 'dead')[p.state]}, heard from "
                         f"{now - p.last_heard:.1f}s ago]: {said}")
        self.stalls += 1
        _log.warning("rank %d: stalled: %s has waited %.1fs (times out after %.3gs) for %s",
                     self.rank, what, waited, self.timeout if limit is None else limit,
                     "; ".join(notes) or "no peer")

    def _peer_note(self, item: Pending | Outgoing) -> str:
        peer = item.dst if isinstance(item, Outgoing) else item.src
        if peer == ANY or peer == self.rank:
            return ""
        p = self._peers[peer]
        said = f"; it said: {p.status}" if p.status else ""
        return f" (rank {peer} last heard from {time.monotonic() - p.last_heard:.1f}s ago{said})"

    def _gone(self, peer: Peer, desc: str, group: int = 0) -> LostPeerError:
        """The error of an operation (of ``group``) that involves a lost
        peer; in a sub-group the peer is named by its world rank, as such."""
        who = f"world rank {peer.rank}" if group else f"rank {peer.rank}"
        return LostPeerError(f"rank {self.rank}: {desc} failed: peer {who} is gone "
                             f"({peer.why})", peer.rank)

    def _dead_member(self, group: int) -> int | None:
        """The lowest rank of ``group`` known dead, if any."""
        dead = [r for r in self.groups.get(group, ("", []))[1] if r in self._dead]
        return min(dead) if dead else None

    def _peer_gone(self, rank: int, why: str, state: int, told: bool = False) -> None:
        """Fail what involves ``rank``: receives from it and, when it died,
        receives from any rank and every collective's (negative tag) in its groups.
        A death is logged unless the peer ``told`` us (it reports its own error)."""
        peer = self._peers[rank]
        with self._lock:
            if peer.state != ALIVE:
                return
            peer.state, peer.why = state, why
            if state == DEAD:
                self._dead.add(rank)
            members = {g for g, (_, ranks) in self.groups.items() if rank in ranks}
            reqs = self._matcher.remove_posted(
                lambda q: q.src == rank or (state == DEAD and (q.src == ANY or q.tag < 0)
                                            and q.group in members))
        if state == DEAD and not told:
            _log.error("rank %d: lost peer rank %d: %s", self.rank, rank, why)
        for q in reqs:
            q.fail(self._gone(peer, q.desc, q.group))
        self._nudge()
        with peer.lock:
            while peer.queue:
                out = peer.queue.popleft()
                out.fail(self._gone(peer, out.desc))

    def _on_bye(self, peer: Peer, reason: str) -> None:
        """A peer leaves. After a clean close (no reason) it is closed, and
        waits in its close for our goodbye, hearing our heartbeats meanwhile.
        A peer that leaves failing (``reason``: its error) is dead at once:
        everything that involves it fails, naming its error; the answer tells
        it that we know, so it need not wait for our goodbye."""
        if not reason:
            self._peer_gone(peer.rank, "it closed its mesh", CLOSED)
            return
        self._peer_gone(peer.rank, f"it failed: {reason}", DEAD, told=True)
        self._control(peer, wire.encode(wire.HEARTBEAT, self.rank, reason=self.status()[:2000],
                                        peer=peer.rank), upto=DEAD)

    def _on_heartbeat(self, peer: Peer, status: str, answers: int) -> None:
        peer.status, peer.status_at = status, peer.last_heard
        if answers == self.rank:     # it knows this rank is failing: done with it
            self._peer_gone(peer.rank, "it heard that this rank failed", CLOSED)

    def peer_state(self, rank: int) -> str:
        return ("alive", "closed", "dead")[self._peers[rank].state]

    def _run(self) -> None:
        """Read when no caller is waiting; always watch monitors and timers."""
        monitors: dict[zmq.Socket, Peer | None] = {
            p.monitor: p for p in self._peers if p.monitor is not None}
        monitors[self._router_mon] = None
        reading, aside = zmq.Poller(), zmq.Poller()
        reading.register(self._router, zmq.POLLIN)
        for poller in (reading, aside):
            poller.register(self._wake_r, zmq.POLLIN)
            for m in monitors:
                poller.register(m, zmq.POLLIN)
        held = False
        next_tick = 0.0
        while not self._closing:
            try:
                if not held and not self._want and time.monotonic() >= self._aside_until:
                    held = self._rlock.acquire(timeout=0.05)
                with self._want_lock:
                    if held and self._want:
                        self._rlock.release()
                        held = False
                    self._progress_reading = held
                events = dict((reading if held else aside).poll(100 if held else 5))
                if self._wake_r in events:
                    self._drain_wake()
                if held and self._router in events:
                    for _ in range(1024):
                        if self._want or not self._read_one():
                            break
                for m in monitors:
                    if m in events:
                        self._on_monitor(monitors[m], m)
                now = time.monotonic()
                if now >= next_tick:
                    self._tick(now)
                    next_tick = now + min(self.heartbeat, 0.25)
            except zmq.ZMQError as e:
                if self._closing or e.errno == zmq.ETERM:
                    break
                _log.exception("rank %d: progress thread error", self.rank)
            except Exception:
                _log.exception("rank %d: progress thread error", self.rank)
        if held:
            self._rlock.release()

    def _on_monitor(self, peer: Peer | None, mon: zmq.Socket) -> None:
        while True:
            try:
                ev = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if peer is None:
                self.handshake_failures += 1
                n = self.handshake_failures
                if n & (n - 1) == 0:    # 1, 2, 4, 8...: a stranger retries every 100 ms
                    _log.warning("rank %d: refused a connection that failed the handshake (no "
                                 "or wrong job secret; %d so far)", self.rank, n)
            elif ev["event"] == zmq.EVENT_DISCONNECTED and peer.state != DEAD:
                peer.suspect_since = peer.suspect_since or time.monotonic()
            elif ev["event"] == zmq.EVENT_CONNECTED:
                peer.suspect_since = 0.0
            elif ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._peer_gone(peer.rank, "it refused our credentials: a different job secret?",
                                DEAD)

    def _tick(self, now: float) -> None:
        """Declare silent or vanished peers lost; beat to the others. A peer
        that said goodbye is not watched, but is still beaten to until its
        connection goes: it waits in its close for every peer's goodbye, and
        must not find a live peer silent meanwhile."""
        beat = None
        for p in self._peers:
            if p.sock is None or p.state == DEAD or (p.state == CLOSED and p.suspect_since):
                continue
            if p.state == ALIVE:
                if p.suspect_since and now - p.suspect_since > 0.5:
                    self._peer_gone(p.rank, "its connection closed: the process exited or "
                                    "crashed", DEAD)
                    continue
                if now - p.last_heard > self.peer_timeout:
                    self._peer_gone(p.rank, f"silent for {now - p.last_heard:.1f}s", DEAD)
                    continue
            if now - p.last_sent > self.heartbeat:
                if beat is None:
                    beat = wire.encode(wire.HEARTBEAT, self.rank, reason=self.status()[:2000])
                self._control(p, beat, upto=CLOSED)
