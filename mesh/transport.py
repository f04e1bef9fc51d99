"""Transport: one worker's sockets, wired to the parts that use them.

Every worker binds one ROUTER (ipc:// and tcp://) for everything it receives
and connects one DEALER to each peer for everything it sends:

    rank a: DEALER(a->b) ===> ROUTER(b) :rank b      routing id = sender's rank
    rank a: ROUTER(a) <=== DEALER(b->a) :rank b      credits flow back this way

Senders write from the calling thread (zero-copy frames, under the peer's
lock), within the credit the peer has granted (mesh.peer). What comes in is
read by mesh.reader, in the thread that holds the reading turn
(mesh.progress: a caller waiting for a reply, else the progress thread),
and matched, aborted or failed in mesh.inbox; mesh.liveness watches the
peers (heartbeats, lost peers, stall reports). This module wires them;
Transport's methods are kept by theme in its mixins:

    mesh.sendpath   isend, and frames handed to ZeroMQ within credit, queued, pieced
    mesh.ringpath   send_ring / recv_ring: small arrays through same-host rings
    mesh.syncpath   synchronous sends' answers (taken, dropped unread) and cancels
    mesh.waits      wait: until done, timed out, withdrawn or interrupted
    mesh.closing    close: flush, goodbyes, sends still owed dropped, sockets closed
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable

import zmq

from . import alloc, auth, rings, wire
from .closing import _Closing
from .direct import Direct
from .errors import LostPeerError, MeshError
from .inbox import Inbox, abort_error
from .liveness import Liveness, close_watched, monitor_event, refuses
from .liveness import config as liveness_config
from .peer import ALIVE, STATE_NAMES, Outgoing, Peer, config_bytes, named, on_host
from .progress import Progress
from .reader import Reader
from .ringpath import SENT, _RingPaths
from .sendpath import _Sending
from .streams import Streams
from .syncpath import _Syncing
from .waits import _Waiting

__all__ = ["Transport", "Outgoing", "abort_error", "SENT", "waits", "link"]

_log = logging.getLogger("mesh.transport")
_PROBE_S = 0.5      # how long a failed first connect's peer port is asked whether it refuses


def forked_error(rank: int, pid: int) -> MeshError:
    return MeshError(f"rank {rank}: this mesh belongs to process {pid}; a child forked from "
                     f"it (process {os.getpid()}) cannot use it (its sockets, rings and "
                     f"boards are the parent's): communicate from the parent, or start the "
                     f"child's own job")


_live: "weakref.WeakSet[Transport]" = weakref.WeakSet()


def waits() -> list[tuple[str, float]]:
    """The operations this process's ranks wait in now, each with how many
    seconds it has waited (``Liveness.waiting_in``): what a rank that
    meshrun or mesh.spawn stops says it was doing (mesh.launch._bootstrap's
    ``where``)."""
    return [w for t in list(_live) if (w := t.live.waiting_in()) is not None]


def _after_fork() -> None:
    for t in list(_live):
        t._forked()


os.register_at_fork(after_in_child=_after_fork)


# A link's monitor events: its close, or a connect that failed (liveness),
# its handshake refused (liveness), its first connection made (``links``)
_WATCHED = (zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_SUCCEEDED)


def link(ctx: zmq.Context, rank: int, ep: str, secret: str,
         curve: bool) -> tuple[zmq.Socket, zmq.Socket]:
    """Rank ``rank``'s DEALER connected to a peer's endpoint ``ep``, and its
    monitor (mesh.liveness reads it). A link is made once: ZeroMQ made a
    dropped connection again within 100 ms and went on with the messages
    after those the drop lost (a reset: the kernels' buffers gone), so the
    peer took the next one in a lost one's place, with no error. Not made
    again, the link stays broken: liveness declares the peer lost (its
    close, or a connect that failed), and a send finds no connection at
    once (SNDTIMEO 0: with no send limit, nothing else makes one wait)
    where it waited for ever. (A first connect that fails is tried again
    on a new link, before anything is sent: ``links``.)"""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, str(rank).encode())
    s.setsockopt(zmq.SNDHWM, 0)
    s.setsockopt(zmq.LINGER, 2000)
    s.setsockopt(zmq.RECONNECT_IVL, -1)
    s.setsockopt(zmq.SNDTIMEO, 0)
    auth.make_client(s, secret, curve)
    mon = s.get_monitor_socket(_WATCHED)
    s.connect(ep)
    return s, mon


def links(ctx: zmq.Context, rank: int, endpoints: list[str], secret: str, curve: bool,
          pids: list[int], limit: float) -> tuple[list[Any], dict[int, int]]:
    """Rank ``rank``'s links to each peer (``link``; None for itself), each
    returned once its first connection is made (its handshake done: no
    message of ours has crossed before it, so none can have been lost). A
    first connect that fails (the peer's listener not accepting yet, a SYN
    lost or unreachable while its host starts, a full ipc:// backlog) is tried
    again on a new link, 50 ms later, then after twice as long each time (at
    most 0.5 s), until ``limit`` seconds have passed or the peer is known
    gone (``_gone``: on this host, its process, ``pids``; on another, its
    port refusing connections). Also returned: the
    links handed over without a first connection, each with the event its
    last try ended with, for liveness (``Liveness.on_link``: the peer is
    lost half a second later, or at once where it refused our credentials).
    A connection still being made at ``limit`` is handed over as it is."""
    made: list[Any] = [None] * len(endpoints)
    trying: dict[zmq.Socket, int] = {}      # monitor -> its peer
    again: dict[int, float] = {}            # peer -> when its next try starts
    tries: dict[int, int] = {}
    failed: dict[int, int] = {}
    poller = zmq.Poller()

    def start(r: int) -> None:
        made[r] = link(ctx, rank, endpoints[r], secret, curve)
        trying[made[r][1]] = r
        poller.register(made[r][1], zmq.POLLIN)

    for r in range(len(endpoints)):
        if r != rank:
            start(r)
    end = time.monotonic() + limit
    while trying or again:
        now = time.monotonic()
        for r in [r for r, at in again.items() if at <= now]:
            del again[r]
            close_watched(*made[r])     # (nothing was sent on it)
            start(r)
        if now >= end:
            failed.update((r, zmq.EVENT_CLOSED) for r in again)
            break
        wake = min([end, *again.values()])
        for mon, _ in poller.poll(max(1, int((wake - now) * 1000))):
            r = trying[mon]
            event = _first(mon)
            if event < 0:
                continue
            poller.unregister(mon)
            del trying[mon]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                continue
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH or _gone(endpoints[r], pids[r]):
                failed[r] = event
                continue
            n = tries[r] = tries.get(r, 0) + 1
            again[r] = time.monotonic() + min(0.05 * 2 ** (n - 1), 0.5)
            _log.debug("rank %d: a connect to rank %d failed (event %d): try %d", rank, r,
                       event, n + 1)
    return made, failed


def _first(mon: zmq.Socket) -> int:
    """The next event on a link's monitor ``mon`` (-1: none yet); those after
    it are left to liveness (``Liveness.on_monitor``)."""
    try:
        return monitor_event(mon.recv_multipart(zmq.NOBLOCK))
    except zmq.Again:
        return -1


def _gone(ep: str, pid: int) -> bool:
    """Whether a peer reached at ``ep``, whose connect failed, is known gone:
    on this host (ipc://), no process ``pid`` runs; over tcp://, its port
    refuses connections (mesh.liveness.refuses): the peer bound it before
    it joined the rendezvous (mesh.world), so after the table a refusal is
    its process ended (or its mesh closed), where a host that starts or a
    link that is down leaves the connect unreachable or unanswered (tried
    again). Without it, a peer on another host that died as the mesh
    started was tried for MESH_PEER_TIMEOUT."""
    if ep.startswith("tcp://"):
        addr, _, port = ep[len("tcp://"):].rpartition(":")
        return port.isdigit() and refuses(addr.strip("[]"), int(port), _PROBE_S)
    if not pid or not ep.startswith("ipc://"):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass
    return False


class Transport(_Sending, _Syncing, _RingPaths, _Waiting, _Closing):
    """Sockets, matching and liveness for one rank. Built by ``mesh.init``."""

    def __init__(self, ctx: zmq.Context, router: zmq.Socket, router_mon: zmq.Socket,
                 rank: int, size: int, endpoints: list[str], secret: str, timeout: float,
                 curve: bool = False, hosts: list[str] | None = None,
                 pids: list[int] | None = None, windows: list[int | None] | None = None) -> None:
        self.rank, self.size, self.timeout = rank, size, timeout
        self.endpoints, self.curve = list(endpoints), curve   # how each peer is reached
        # each rank's host id (mesh.env.host_id) as the rendezvous table has it
        self.hosts = hosts if hosts is not None else [""] * size
        window = int(config_bytes("MESH_WINDOW_BYTES", 64 << 20))
        # Each pair of ranks uses the smaller of their two MESH_WINDOW_BYTES
        # (``windows``: each rank's, from the rendezvous table): a receiver
        # grants credit back in steps of a quarter of its window, and a
        # sender whose own window is under that step would wait for ever.
        pair = [window if w is None else min(window, w) for w in (windows or [None] * size)]
        self._orphans: list[Any] = []   # buffers of sends to lost peers ZeroMQ may still hold
        self._ctx, self._router = ctx, router
        self.keep_alive: list[Any] = []  # released by close(), after the peers' goodbyes
        # per kept object that says so: whether a world rank may still read it (close
        # waits for that peer as for one that has not answered its goodbye)
        self.reading: list[Callable[[int], bool]] = []
        self.on_close: list[Callable[[], None]] = []  # called then, before the release
        self.groups: dict[int, tuple[str, list[int]]] = {0: ("world", list(range(size)))}
        # groups dropped (garbage) here, forgotten by the next sweep(); per group id,
        # what to call then or when the mesh closes, whichever first (their sockets)
        self.dropped: deque[int] = deque()
        self.drop_hooks: dict[int, list[Callable[[], None]]] = {}
        # per group id, the communicators alive with it (two made with one id:
        # the group is forgotten when the last goes)
        self.comms: dict[int, weakref.WeakSet[Any]] = {}
        self._peers: list[Peer] = []
        # peers on other hosts: a large message goes to them in pieces (mesh.wire.CHUNK)
        self._pieced = [ep.startswith("tcp://") for ep in endpoints]
        if any(self._pieced):
            alloc.tune()    # ZeroMQ's receive buffers: no page faults per message
        made, unmade = links(ctx, rank, endpoints, secret, curve, pids or [0] * size,
                             liveness_config(size)[0])
        for r, sm in enumerate(made):
            self._peers.append(Peer(r, None, None, pair[r]) if sm is None
                               else Peer(r, sm[0], sm[1], pair[r]))
        for r, p in enumerate(self._peers):    # where each peer on another host is
            p.there = on_host(self.hosts[rank], self.hosts[r], endpoints[r],
                              (pids or [0] * size)[r]) if r != rank else ""
        self._router_mon = router_mon       # (mesh.liveness.watch_router, before it bound)
        # Headers repeat (same peer, tag, dtype and shape, message after
        # message): encode each once; bounded, starts over when full.
        self._encoded: dict[tuple, bytes] = {}
        # synchronous sends (Comm.ssend) awaiting their receiver's SYNCED, by id
        self._syncing: dict[int, Outgoing] = {}
        self._sync_ids = itertools.count()
        self._sync_lock = threading.Lock()
        self._asking: dict[int, list] = {}     # their cancels awaiting the answer, by id
        self.progress = Progress(router, rank)
        self.inbox = Inbox(rank, self._peers, self.groups, self._control, self.progress.nudge)
        self.inbox.ack = self.ack
        # same-host peers' pids (ipc://: one filesystem, one machine): their silence is
        # weighed against what their process does (mesh.liveness.Liveness.tick)
        local = {r: pid for r, (pid, ep) in enumerate(zip(pids or [0] * size, endpoints))
                 if pid and r != rank and ep.startswith("ipc://")}
        self.live = Liveness(rank, timeout, self._peers, self.groups, self.inbox, self._control,
                             self._router_mon, local)
        for r, event in unmade.items():     # (their first connect failed for good: lost)
            self.live.on_link(self._peers[r], event)
        self.direct = Direct(rank, self._peers, endpoints, self._control)
        # large arrays to peers on other hosts: a plain TCP stream (mesh.streams)
        self.streams = Streams(rank, self._peers, endpoints, curve, self._control,
                               LostPeerError)
        same_host = [r for r, ep in enumerate(endpoints) if r != rank and ep.startswith("ipc://")]
        self.rings = rings.open_rings(rank, size, same_host)
        self._ring_max = self.rings.max if self.rings is not None else -1
        self._ring_out = self.rings.out if self.rings is not None else [None] * size
        self._ringed = [self.rings is not None and r in same_host for r in range(size)]
        self._awake_rung = self.rings.awake_rung if self.rings is not None else None
        self._prefixes: dict[tuple, tuple] = {}     # send_ring's headers, inline-framed,
        self._marks: dict[bytes, int] = {}     # and their ids (mesh.rings.MARK),
        self._marked = 0                       # how many were given so far
        self.reader = Reader(router, rank, self._peers, self.inbox, self.live, self._on_credit,
                             self.direct, self.rings, self._on_answer, self._control,
                             self.streams, self.on_synced)
        self.stall_warn = self.live.stall_warn
        # what recv_ring calls and reads, bound once
        self._take, self._quiet = self.reader.take, self.inbox.matcher.quiet
        # what ``quiet`` reads: while all four are empty, it is not called
        self._posted, self._posted_any, self._wild, self._unexpected = \
            self.inbox.matcher.quiet_tables()
        self._aborted = self.inbox.aborted
        # what communicators call of the inbox and of liveness
        self.irecv, self.iprobe = self.inbox.post, self.inbox.iprobe
        self.cancel, self.abort = self.inbox.cancel, self.inbox.abort
        self.pid = os.getpid()
        self.forked = False     # (set in a forked child: the sockets are the parent's)
        _live.add(self)
        self.stalled, self.status = self.live.stalled, self.live.status
        self._drive = self.progress.drive
        self.progress.start(self.reader, self.live, self._busy)
        self.inbox.unpark = self.progress.unpark
        if self.rings is not None:     # where each same-host peer writes to us (mesh.rings)
            there = wire.encode(wire.RING, rank, direct=self.rings.announce())
            for r in same_host:
                self._control(self._peers[r], there)
        for r in same_host:     # ask each same-host peer now whether it may read us
            self.direct.usable(r)   # (mesh.direct): no large message waits for the answer
        self.streams.announce()     # where the peers on other hosts connect their streams

    def poke(self) -> bool:
        """A look at what has come, for a caller that polls instead of
        waiting (iprobe, Request.test), as MPI's progress engine takes one
        in MPI_Iprobe and MPI_Test: the rings and the socket are read in
        this thread, without waiting for anything, if it gets the reading
        turn (as a receive's first look does: ``Progress.enter``). Left to
        the progress thread, which a polling loop keeps off the interpreter
        between switch intervals, a round trip answered by an iprobe loop
        took 16 ms (a blocking receive's: 5 us). Whether this thread read
        (False: another thread has the turn, and reads what has come)."""
        progress = self.progress
        if progress.reading_here() or progress.closing:
            # (a callback run by the thread that reads: it would wait on itself; a closed
            # mesh's rings and sockets are gone: iprobe raised a released memoryview's error)
            return False
        entered = progress.enter(behind_callers=False)
        if entered < 0:     # another caller reads for all: let it have the interpreter
            time.sleep(0)
            return False
        try:
            if entered > 0:
                reader = self.reader
                reader.read_rings()
                read_one = reader.read_one
                for _ in range(256):
                    if not read_one():
                        break
                reader.settle()
        except (zmq.ZMQError, OSError, ValueError):
            pass        # (the mesh closed under it: the caller's request says how it ended)
        finally:
            progress.leave(entered)
        return entered > 0

    def lost_to(self, out: Outgoing) -> bool:
        """Whether ``out``, handed over, went to a peer that has left (closed
        its mesh, died, or was found silent): its ``wait`` ends at once
        (``_await_release``), returning if the peer's goodbye said it had
        read it (``read_before_leaving``), else raising LostPeerError,
        where what it waits for may never come, or comes late (Request.done:
        a direct send's answer, ZeroMQ's release of frames for a stopped
        peer, pyzmq's release of those it sent, late under load)."""
        return out.event.is_set() and out.error is None and out.dst >= 0 \
            and self._peers[out.dst].state != ALIVE

    def _busy(self) -> bool:
        """Whether a posted receive or a send in flight (queued, read out of
        our memory, or synchronous: its answer comes by socket) waits on
        background reading (mesh.progress parks while nothing does)."""
        return (self.inbox.matcher.posted_some() or self.direct.sending()
                or bool(self._syncing) or any(p.queue for p in self._peers))

    def sweep(self) -> None:
        """Forget the groups dropped since the last sweep: their name, what
        the inbox keeps of them (aborts, receives posted only to catch one,
        messages that came late) and their drop hooks, run now. Called where
        no lock of the transport is held (a group made, a collective's start),
        not by the finalizer that queued them, which may run anywhere."""
        while self.dropped:
            try:
                gid = self.dropped.popleft()
            except IndexError:      # (another thread took the last)
                return
            if self.comms.get(gid):     # another communicator with this id lives on
                continue
            self.comms.pop(gid, None)
            self.groups.pop(gid, None)
            self.inbox.forget(gid)
            for fn in self.drop_hooks.pop(gid, ()):
                try:
                    fn()
                except Exception:
                    _log.exception("rank %d: a dropped group's hook failed", self.rank)

    def _forked(self) -> None:
        """In a child forked from this process: its sockets, rings and boards
        are the parent's (a send from here would write into the parent's
        rings, and the peers would read garbage): every way in raises."""
        self.forked = True

        def refuse(*args: Any, **kw: Any) -> Any:
            raise forked_error(self.rank, self.pid)     # (a new one each time: its own frames)
        for name in ("isend", "send_ring", "recv_ring", "irecv", "iprobe", "wait", "sweep",
                     "cancel", "cancel_send", "abort", "poke", "_drive"):
            setattr(self, name, refuse)
        self.streams.close_in_child()

    def named(self, world: int, word: str = "rank", rank: int | None = None) -> str:
        """World rank ``world`` as errors name it (mesh.peer.named: with its
        host where that is not this rank's); ``rank``: its rank in a group,
        named so, with its world rank beside it where the two differ."""
        there = self._peers[world].there if 0 <= world < self.size else ""
        return named(world if rank is None else rank, there, word, world)

    def peer_state(self, rank: int) -> str:
        return STATE_NAMES[self._peers[rank].state]
