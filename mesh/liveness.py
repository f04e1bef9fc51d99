"""Liveness: the watch over the peers, as an object of its own.

It watches the DEALER monitors (a peer's connection closing) and the
ROUTER's (strangers failing the handshake), sends heartbeats carrying this
rank's status, declares silent or vanished peers lost (the inbox fails what
involves them), and writes stall reports: which peers an operation waits
for and what they last said they were doing. The progress thread (see
mesh.progress) calls ``on_monitor`` and ``tick``; the reader hands it
heartbeats and goodbyes.

Leaving: a goodbye (BYE) makes the peer closed; heartbeats go on both ways
until it has left, so nobody finds a live rank silent. A rank leaving on an
error says so in its goodbye: its peers fail at once whatever waits on it,
naming its error, and answer, so that it need not wait for their goodbyes.
A clean goodbye is answered too, by the reader, whatever the main thread
does: all the leaving rank sent before it has arrived, so it need not wait
for the goodbye of a peer busy elsewhere (mesh.transport's close).
"""
from __future__ import annotations

import logging
import math
import os
import socket
import struct
import time
from typing import Callable, Iterable

import zmq

from . import wire
from .errors import AbortKind
from .inbox import Inbox
from .match import ANY, Pending, Several, describe
from .peer import ALIVE, CLOSED, DEAD, STATE_NAMES, Outgoing, Peer, config_float, named

__all__ = ["Liveness", "close_watched", "heartbeat_for", "monitor_event", "refuses",
           "watch_router"]

_log = logging.getLogger("mesh.transport")
_BEATS_PER_S = 64
_BLIND = 1.0        # a tick this late (they come every 0.25 s at most): this rank was starved
_LOOK = 1.0         # a silent same-host peer's CPU time is compared over windows this long
# a peer's connection closed, or a connect to it failed (no retry: mesh.transport)
_BROKE = (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED)


def _threads(pid: int) -> tuple[str, int]:
    """The states of process ``pid``'s threads (one letter each, as in
    /proc) and its CPU time in clock ticks (all its threads'); OSError
    once it is gone."""
    states, cpu = "", 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        states += fields[0].decode()
        cpu += int(fields[11]) + int(fields[12])
    return states, cpu


def monitor_event(frames: list[bytes]) -> int:
    """The event number of a ZeroMQ monitor message (its first frame starts
    with it, a native uint16). zmq.utils.monitor would parse it too, but it
    imports asyncio: a tenth of every rank's start-up."""
    return int(struct.unpack_from("=H", frames[0])[0])


def close_watched(sock: zmq.Socket, monitor: zmq.Socket, linger: int = 0) -> None:
    """Close ``sock`` and the ``monitor`` its ``get_monitor_socket`` made,
    the monitoring stopped first (libzmq sends it no more events): one
    helper for every owner of a watched socket."""
    sock.disable_monitor()
    monitor.close(linger=0)
    sock.close(linger=linger)


def refuses(addr: str, port: int, timeout: float) -> bool:
    """Whether ``addr``'s TCP ``port`` refuses a connection now: nothing
    listens there, its host up (a listener's process ended), not a link
    down, a host unreachable or a connect unanswered in ``timeout`` s (the
    network). Asked only after ZeroMQ's own connect there failed (the
    rendezvous' service, mesh.rendezvous; a peer's first link,
    mesh.transport.links): one that reaches a listener after all is
    counted among its refused handshakes (and logged as one)."""
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:         # (unreachable, timed out, not resolved: the network)
        return False


# The ROUTER's events that count its strangers: accepted, then through
# the handshake, failing it, or closed in it.
COUNTED = (zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def watch_router(ctx: zmq.Context, router: zmq.Socket) -> zmq.Socket:
    """The monitor of this rank's ROUTER (its ``COUNTED`` events), attached
    before it binds (mesh.world): libzmq tells a connection's events only to a
    monitor attached when they happen. Attached with the transport, after the
    rendezvous, it missed the strangers that connected in between (seen: those
    of a peer that had the table, and ran its job, before this rank built its
    transport: never counted), and the acceptance of peers' connections, whose
    handshakes, ending later, each took a stranger's count. Its queue has no
    limit: it is read only once the transport is built (mesh.progress), and
    libzmq, finding a monitor's queue full, stalls the I/O thread (which the
    rendezvous needs) until it is read, rather than drop an event."""
    addr = f"inproc://mesh.router-monitor.{router.FD}"
    router.monitor(addr, COUNTED)
    mon = ctx.socket(zmq.PAIR)
    mon.setsockopt(zmq.RCVHWM, 0)       # (its pipe's limit: libzmq's side's and this one's)
    mon.connect(addr)
    return mon


def heartbeat_for(size: int, peer_timeout: float) -> float:
    """The default heartbeat interval of a world of ``size``: 0.5 s, longer
    in large worlds, so that a rank beats to at most about 64 peers a second
    (each beat costs the sender and the receiver some Python), but at least
    four times per peer timeout; and twice at least where that timeout is
    short (under 1 s: a MESH_PEER_TIMEOUT of 0.3 with beats every 0.5 s had
    live, idle peers on other hosts declared lost)."""
    return min(max(0.5, min((size - 1) / _BEATS_PER_S, peer_timeout / 4)), peer_timeout / 2)


def config(size: int) -> tuple[float, float, float]:
    """MESH_PEER_TIMEOUT, MESH_HEARTBEAT (by default ``heartbeat_for`` a
    world of ``size``) and MESH_STALL_WARN (0: never, math.inf); ValueError
    naming the variable for a bad one. Also called by mesh.world.check_config
    before the rendezvous: read only here, after it, a bad value failed one
    rank while its peers went on into the job."""
    peer_timeout = config_float("MESH_PEER_TIMEOUT", 10.0, above=0)
    heartbeat = config_float("MESH_HEARTBEAT", heartbeat_for(size, peer_timeout), above=0)
    if heartbeat >= peer_timeout and os.environ.get("MESH_HEARTBEAT"):
        raise ValueError(f"MESH_HEARTBEAT={heartbeat:g} is not under "
                         f"MESH_PEER_TIMEOUT={peer_timeout:g}: every peer would "
                         f"look silent between two heartbeats")
    # (0: never; a report every 0 s would flood the log)
    return peer_timeout, heartbeat, config_float("MESH_STALL_WARN", 60.0, least=0) or math.inf


class Liveness:
    """Heartbeats, monitors and stall reports for rank ``rank`` of ``peers``.

    ``doing``/``doing_since`` is the operation a caller waits in now, and
    ``last``/``last_end`` the one it waited in last: whoever waits sets
    them (mesh.progress, the transport's send waits); heartbeats tell them."""

    def __init__(self, rank: int, timeout: float, peers: list[Peer],
                 groups: dict[int, tuple[str, list[int]]], inbox: Inbox,
                 control: Callable[..., None], router_mon: zmq.Socket,
                 local: dict[int, int] | None = None) -> None:
        self.rank, self.timeout, self.peers, self.groups = rank, timeout, peers, groups
        self.peer_timeout, self.heartbeat, self.stall_warn = config(len(peers))
        self.leaving = False    # this rank said goodbye: no peer watches it or sends to it
        self.clean_bye = False  # it says (or said) a clean goodbye: an answer to it releases
        # Silence is no proof on an oversubscribed machine: a same-host peer
        # (rank -> pid) whose process still runs is only slow, and a rank whose own
        # watch was starved has heard nothing meanwhile (``tick``).
        self.local = dict(local or {})
        # a same-host peer silent this long is looked up in the process table: one
        # whose process has exited is lost then, not after the peer timeout, where its
        # connection's close was never seen (``tick``)
        self._exit_look = max(_LOOK, 2 * self.heartbeat)
        self._cpu: dict[int, tuple[float, int]] = {}    # rank -> (since, its CPU time then)
        self._ticked = 0.0
        self._awake_since = 0.0
        self.stalls = 0
        self.handshake_failures = 0
        self._shaking = 0     # connections accepted whose handshake has not ended (as far as seen)
        # when each connection that closed while handshakes were under way did
        # (``on_monitor``): a stranger's, or a peer's established one, undecided
        self._suspects: list[float] = []
        # (its value was checked as the ROUTER was made: mesh.auth.make_server)
        self._shake_limit = config_float("MESH_HANDSHAKE_TIMEOUT", 10.0)
        self.doing: Pending | Outgoing | Several | str | None = None
        self.doing_since = 0.0
        self.last: str | tuple | None = None     # (an item's description)
        self.last_end = 0.0
        self._inbox, self._control = inbox, control
        # by peer, what came from it after an array whose bytes its stream still
        # reads (mesh.reader, whose table it is): such a peer is not lost to its
        # closed connection meanwhile (a send returns once its bytes are in the
        # socket; over a slow link they still cross after the sender is gone, its
        # goodbye held behind them): its stream's end, or silence, decides
        self.streaming: dict[int, list] = {}
        self._broke: dict[int, int] = {}    # by peer, the event its connection broke with
        # monitor socket -> its peer (None: the ROUTER's, for strangers)
        self.monitors: dict[zmq.Socket, Peer | None] = {
            p.monitor: p for p in peers if p.monitor is not None}
        self.monitors[router_mon] = None

    def _what(self, item: Pending | Outgoing | Several | str | tuple) -> str:
        # a collective's message names it (mesh.match.describe), its peer with its
        # host where that is not this rank's; a wait outside the transport
        # (collectives.shm.board) says itself what it is
        if type(item) is str or type(item) is tuple:
            return describe(item, self.peers)
        return item.described(self.peers)     # type: ignore[union-attr]

    def status(self) -> str:
        """What this rank is doing, as its heartbeats tell its peers."""
        now = time.monotonic()
        item, since = self.doing, self.doing_since
        if item is not None:
            return f"waiting {now - since:.1f}s in {self._what(item)}"
        last = self.last
        if last is not None:
            return f"not in a mesh call; last: {self._what(last)}, {now - self.last_end:.1f}s ago"
        return "not in a mesh call yet"

    def waiting_in(self) -> tuple[str, float] | None:
        """The operation a caller waits in now and for how many seconds, as
        ``status`` says it (what a rank meshrun stops tells it: ``waits``);
        None when none."""
        item, since = self.doing, self.doing_since
        return None if item is None else (self._what(item), time.monotonic() - since)

    def stalled_on(self, item: Pending | Outgoing | Several, waited: float,
                   limit: float) -> None:
        """The stall report of a wait for ``item``: it names the peers it needs."""
        if isinstance(item, Several):
            peers = list(dict.fromkeys(p for it in item.items() for p in self._peers_of(it)))
        elif isinstance(item, Outgoing):
            peers = [item.dst]
        elif item.src != ANY:
            peers = [item.src]
        else:
            peers = self.groups.get(item.group, ("", []))[1]
        self.stalled(self._what(item), peers, waited, limit)

    def _peers_of(self, item: Pending | Outgoing) -> list[int]:
        """The world ranks that could complete ``item``: its peer; from
        ANY, its group's ranks."""
        if isinstance(item, Outgoing):
            return [item.dst] if item.dst >= 0 else []     # (a send by ring: done)
        return [item.src] if item.src != ANY else self.groups.get(item.group, ("", []))[1]

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
            p = self.peers[r]
            said = ("it closed its mesh (it sends nothing more)" if p.state == CLOSED
                    else f"{p.status} (said {now - p.status_at:.1f}s ago)" if p.status
                    else "no status heard yet")
            notes.append(f"{named(r, p.there)} [{STATE_NAMES[p.state]}, heard from "
                         f"{now - p.last_heard:.1f}s ago]: {said}")
        self.stalls += 1
        _log.warning("rank %d: stalled: %s has waited %.1fs (times out after %.3gs) for %s",
                     self.rank, what, waited, self.timeout if limit is None else limit,
                     "; ".join(notes) or "no peer")

    def peer_note(self, item: Pending | Outgoing) -> str:
        """What a timeout's error says of the peer it waited for; of a
        receive or probe from ``ANY``, of the group's ranks that could send
        it (``any_note``)."""
        peer = item.dst if isinstance(item, Outgoing) else item.src
        if peer == ANY and isinstance(item, Pending):
            return self.any_note(item)
        if peer == ANY or peer == self.rank:
            return ""
        p = self.peers[peer]
        said = f"; it said: {p.status}" if p.status else ""
        # (``peer`` is a world rank: in a sub-group, whose description gives the peer's
        # world rank, so named, not taken for the group's rank of that number)
        d = item._desc
        who = "world rank" if type(d) is tuple and len(d) > 4 and d[4] is not None else "rank"
        return (f" ({named(peer, p.there, who)} last heard from "
                f"{time.monotonic() - p.last_heard:.1f}s ago{said})")

    def any_note(self, item: Pending, shown: int = 3) -> str:
        """What a timeout's error says of the ranks a receive or probe from
        ``ANY`` waited for: those of its group that may still send, with
        what each last said (the first ``shown``), and those that closed
        their mesh: ``(rank 1 last heard from 0.2s ago; it said: not in a
        mesh call; last: ...; rank 2 closed its mesh)``. A timeout that named
        no peer left a coordinator whose workers hang, or wait on another
        tag, with no clue which one."""
        ranks = self.groups.get(item.group, ("", []))[1]
        who = "world rank" if item.group else "rank"
        now = time.monotonic()
        notes: list[str] = []
        left: dict[int, list[str]] = {CLOSED: [], DEAD: []}
        others = 0
        for r in ranks:
            if r == self.rank or not 0 <= r < len(self.peers):
                continue
            p = self.peers[r]
            if p.state != ALIVE:
                left[p.state].append(named(r, p.there, who))
            elif len(notes) < shown:
                said = f"; it said: {p.status}" if p.status else ""
                notes.append(f"{named(r, p.there, who)} last heard from "
                             f"{now - p.last_heard:.1f}s ago{said}")
            else:
                others += 1
        if others:
            notes.append(f"{others} other rank{'s' if others > 1 else ''} alive")
        for state, gone in left.items():
            if gone:
                these = ", ".join(gone[:shown]) + (f" and {len(gone) - shown} more"
                                                   if len(gone) > shown else "")
                one = len(gone) == 1
                notes.append(f"{these} closed {'its' if one else 'their'} mesh"
                             if state == CLOSED else f"{these} {'is' if one else 'are'} gone")
        return f" ({'; '.join(notes)})" if notes else ""

    def on_bye(self, peer: Peer, reason: str, lost: int = -1, heard: int = -1) -> None:
        """A peer leaves. After a clean close (no reason) it is closed, and
        waits in its close for our goodbye, hearing our heartbeats meanwhile;
        ``lost``: the first peer it had lost (world rank; -1: none), which
        the errors of what waited on it name as their lost peer: it closed
        on catching that loss, perhaps before this rank saw the loss itself
        (the dead rank's connection is read on the progress thread's tick).
        A peer that leaves failing (``reason``: its error) is dead at once:
        everything that involves it fails, naming its error (``lost`` named
        in it with its host where that is not this rank's); the answer tells
        it that we know, so it need not wait for our goodbye. ``heard``: how
        many of the messages we put on its socket it had read (-1: not
        said), kept before its leaving wakes the sends that wait on it."""
        peer.read_ours = heard
        if not reason:
            lost = lost if 0 <= lost < len(self.peers) and lost not in (self.rank,
                                                                        peer.rank) else -1
            self._inbox.peer_gone(peer.rank, "it closed its mesh" + (
                f" after it lost {named(lost, self.peers[lost].there, 'world rank')}"
                if lost >= 0 else ""), CLOSED, cause=lost)
            # The answer tells it that all it sent before its goodbye is here (read
            # in order; direct-path reads done, their DONE sent before): it need
            # not wait for our own goodbye, which a main thread busy elsewhere
            # (a long save, a hang) would send only when it closes. Not once our
            # own goodbye is out: that one serves.
            if peer.state == CLOSED and not self.leaving and not peer.answered_bye:
                peer.answered_bye = True
                self._control(peer, wire.encode(wire.HEARTBEAT, self.rank,
                                                reason=self.status()[:2000], peer=peer.rank),
                              upto=CLOSED)
            return
        # Not alive: it answered our own failing goodbye (or is gone), so it
        # waits for nothing from us and may have left; an answer would only
        # stay queued, holding up our context's term().
        waits = peer.state == ALIVE
        reason = self._inbox.relayed(reason, AbortKind.LOST_PEER, lost)
        self._inbox.peer_gone(peer.rank, f"it failed: {reason}", DEAD, told=True)
        if waits:
            self._control(peer, wire.encode(wire.HEARTBEAT, self.rank,
                                            reason=self.status()[:2000], peer=peer.rank),
                          upto=DEAD)

    def on_heartbeat(self, peer: Peer, status: str, answers: int) -> None:
        peer.status, peer.status_at = status, peer.last_heard
        if answers != self.rank:
            return
        if self.clean_bye:          # it has read our clean goodbye (see on_bye)
            peer.read_bye = True
        else:                       # it knows this rank is failing: done with it
            self._inbox.peer_gone(peer.rank, "it heard that this rank failed", CLOSED)

    def on_monitor(self, mon: zmq.Socket) -> None:
        """Read the events waiting on monitor socket ``mon``. A peer's
        connection closing (or this rank's connect to it failing) makes it
        suspect: ``tick`` declares it lost half a second later unless its
        goodbye came. The connection is not made again (mesh.transport): a
        drop loses what was in flight on it, and a new connection carried
        the messages after those lost, taken in their place."""
        peer = self.monitors[mon]
        while True:
            try:
                frames = mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = monitor_event(frames)
            if peer is None:
                self._on_router_event(event)
            else:
                self.on_link(peer, event)

    def on_link(self, peer: Peer, event: int) -> None:
        """Peer ``peer``'s link's monitor said ``event`` (``on_monitor``; or
        mesh.transport.links, for a link whose first connect failed for good)."""
        if event in _BROKE and peer.state != DEAD:
            # (ZeroMQ does not make it again: mesh.transport; its goodbye, read
            # after this, still makes it closed, not lost: ``tick``'s grace)
            peer.suspect_since = peer.suspect_since or time.monotonic()
            self._broke.setdefault(peer.rank, event)
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self._inbox.peer_gone(peer.rank, "it refused our credentials: a different job "
                                  "secret?", DEAD)

    def _broken(self, rank: int) -> str:
        """Why peer ``rank``, whose connection broke (``on_monitor``), is lost."""
        if self._broke.get(rank) == zmq.EVENT_CLOSED:
            return ("this rank's connection to it could not be made (its process "
                    "ended, or the network between them failed)")
        if rank in self.local:
            return "its connection closed: the process exited or crashed"
        return ("its connection closed or was reset: its process exited or crashed, or the "
                "network dropped the connection, and what was in flight on it may be lost "
                "(a link is not made again)")

    def _on_router_event(self, event: int) -> None:
        """Count the strangers in the ROUTER's monitor events. A connection
        is accepted, then its handshake succeeds, or fails (ZeroMQ's failure
        event, then its close), or it closes with none: one that never spoke
        ZeroMQ (an HTTP request). Handshake events name no connection, so
        this counts handshakes begun and not ended (``_shaking``). A close
        while some are under way is a stranger's only if a handshake did not
        end after all: it may be a peer's established connection (a clean
        job, a peer leaving as another's handshake still ran, was warned of
        a stranger) or a failed one's. It is held (``_suspects``) until
        more handshakes end than can then be under way (a peer's it was), or
        MESH_HANDSHAKE_TIMEOUT after it, by which every handshake begun
        before it has ended (``expire``: a stranger's it was)."""
        if event == zmq.EVENT_ACCEPTED:
            self._shaking += 1
            return
        if not self._shaking:           # (a peer's, or one failed and counted, closing)
            return
        if event == zmq.EVENT_DISCONNECTED:
            self._suspects.append(time.monotonic())
        else:
            self._shaking -= 1
            if event != zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._refused(event)
        # each suspect a stranger's leaves one handshake that will never end:
        # more of them than handshakes left, and the extra were peers'
        del self._suspects[self._shaking:]

    def expire(self, now: float) -> None:
        """Count as strangers the closes held (``_on_router_event``) that no
        handshake has ended after within MESH_HANDSHAKE_TIMEOUT (and a tick)."""
        while self._suspects and now - self._suspects[0] > self._shake_limit + 0.5:
            self._suspects.pop(0)
            self._shaking -= 1
            self._refused(zmq.EVENT_DISCONNECTED)

    def _refused(self, event: int) -> None:
        self.handshake_failures += 1
        n = self.handshake_failures
        # 1, 2, 4, 8...: a stranger retries every 100 ms; the ZAP handler (mesh.auth)
        # logs those refused for their credentials, with their address
        if event != zmq.EVENT_HANDSHAKE_FAILED_AUTH and n & (n - 1) == 0:
            _log.warning("rank %d: refused a connection that failed the handshake "
                         "(not ZeroMQ, another mechanism, too slow, or a peer that "
                         "exited while connecting; %d so far)", self.rank, n)

    def exited(self, rank: int) -> str | None:
        """What became of same-host peer ``rank``'s process when it has
        exited (gone, or a zombie its parent has not reaped); None while it
        runs, or on another host. (A pid reused since reads as running: the
        peer is then judged as before, by its connection and its silence.)"""
        pid = self.local.get(rank)
        if not pid:
            return None
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:     # its main thread's state
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return f"its process {pid} is gone"
        # (its main thread's alone: a killed process's is a zombie while its other
        # threads still wind down, and a Python process's main thread ends last)
        return f"its process {pid} has exited (a zombie)" if state in (b"Z", b"X") else None

    def reap(self, quiet: bool = False) -> None:
        """Declare lost at once the live same-host peers whose process has
        exited, without the grace a closed connection gets (see ``tick``):
        a rank leaving waits for no goodbye from them (mesh.transport's
        close), nor sends them one. ``quiet``: not logged (once this rank's
        goodbye is out, a peer's exit is expected, its own goodbye perhaps
        not yet read)."""
        for p in self.peers:
            if p.sock is not None and p.state == ALIVE and p.rank in self.local:
                why = self.exited(p.rank)
                if why is not None:
                    self._inbox.peer_gone(p.rank, why, DEAD, told=quiet)

    def _stopped(self, rank: int, now: float) -> str | None:
        """None while silent peer ``rank``'s process, on this host, still
        runs: a thread of it is runnable (waiting for a core), or it took CPU
        time over the last ``_LOOK`` seconds. Else what its process is, for
        the error ('' on another host, where silence decides): gone, a
        zombie, stopped (SIGSTOP, a debugger), or asleep taking nothing (a
        deadlock); those are lost."""
        pid = self.local.get(rank)
        if not pid:
            return ""
        try:
            states, cpu = _threads(pid)
        except (OSError, ValueError, IndexError):
            return f"; its process {pid} is gone"
        if not states or all(s in "ZX" for s in states):
            return f"; its process {pid} has exited (a zombie)"
        if all(s in "ZXTt" for s in states):
            return (f"; its process {pid} is stopped: SIGSTOP, Ctrl-Z or a debugger; "
                    f"lost to this job even if resumed")
        since, then = self._cpu.setdefault(rank, (now, cpu))
        if "R" in states or now - since < _LOOK:
            return None
        self._cpu[rank] = (now, cpu)
        return None if cpu > then else (f"; its process {pid} runs but takes no CPU "
                                        f"(blocked: a deadlock, or waiting on something else)")

    def tick(self, now: float) -> None:
        """Declare silent or vanished peers lost; beat to the others. A
        same-host peer silent for two heartbeats (a second at least) whose
        process has exited is lost then: its connection's close is not always
        seen (a connection ZeroMQ had not made yet when it died, under load,
        tells nothing), and silence alone took the peer timeout (once this
        rank has said goodbye, its close looks: ``reap``). A peer
        that said goodbye is not watched, but is still beaten to until its
        connection goes: it waits in its close for every peer's goodbye, and
        must not find a live peer silent meanwhile. Once this rank has said
        goodbye, no peer watches it: beats then would only be left queued for
        peers that have gone, holding up the context's term()."""
        beat = None
        self.expire(now)
        if self._ticked and now - self._ticked > _BLIND:
            self._awake_since = now     # blind till now: what it missed may still be unread
        self._ticked = now
        for p in self.peers:
            if p.sock is None or p.state == DEAD or (p.state == CLOSED and p.suspect_since):
                continue
            if p.state == ALIVE:
                if p.suspect_since and now - p.suspect_since > 0.5 \
                        and p.rank not in self.streaming:
                    self._inbox.peer_gone(p.rank, self._broken(p.rank), DEAD)
                    continue
                silent = now - max(p.last_heard, self._awake_since)
                if silent > self._exit_look and not self.leaving \
                        and (why := self.exited(p.rank)) is not None:
                    self._inbox.peer_gone(p.rank, why, DEAD)
                    continue
                if silent <= self.peer_timeout:
                    self._cpu.pop(p.rank, None)
                elif (state := self._stopped(p.rank, now)) is not None:
                    self._inbox.peer_gone(p.rank, f"silent for {now - p.last_heard:.1f}s{state}",
                                          DEAD)
                    continue
            if now - p.last_sent > self.heartbeat and not self.leaving:
                if beat is None:
                    beat = wire.encode(wire.HEARTBEAT, self.rank, reason=self.status()[:2000])
                self._control(p, beat, upto=CLOSED)

