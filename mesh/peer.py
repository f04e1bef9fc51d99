"""Per-peer state: what a rank knows of each peer (its socket, the credit it
has used, whether it is alive, what it last said it was doing) and the sends
in flight to it.

Credit, both ways: a peer may have at most ``window`` bytes in flight to us
and we to it (``admit``); what we received from it and let go is granted
back in steps of a quarter window (``consumed``), and its grants free our
window (``release``). Each message costs MSG_COST bytes beyond its payload."""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import Any, Sequence

import zmq

from .match import Flag, describe, named

__all__ = ["ALIVE", "CLOSED", "DEAD", "STATE_NAMES", "MSG_COST", "Outgoing", "Peer",
           "config_float", "config_flag", "config_bytes", "parse_size", "named", "on_host",
           "host_names"]

ALIVE, CLOSED, DEAD = 0, 1, 2
STATE_NAMES = ("alive", "closed", "dead")
# What one message costs the receiver beyond its payload (header, ZeroMQ's and
# our bookkeeping): charged against the credit window, so a flood of empty or
# tiny messages is bounded too, not only big payloads.
MSG_COST = 256


# The most a variable read by config_float may say: seconds (31 years) or microseconds.
# Past it a deadline (time.monotonic() + it) lost the time it started at (a stall report
# at once, "waited 18039s"), and inf or 1e300 made an OverflowError deep inside
# (torch's timedelta under torchrun, ZeroMQ's handshake interval) at mesh.init.
CONFIG_MOST = 1e9


def config_float(name: str, default: float, least: float | None = None,
                 above: float | None = None) -> float:
    """The number in environment variable ``name`` (``default`` when unset or
    empty); ValueError naming it when it is not a number, or is under
    ``least``, or not above ``above``, or over CONFIG_MOST (inf included)."""
    v = os.environ.get(name)
    if not v:
        return default
    try:
        x = float(v)
    except ValueError:
        raise ValueError(f"{name}={v!r}: not a number") from None
    if x != x or (least is not None and x < least) or (above is not None and x <= above):
        bound = (f" >= {least:g}" if least is not None else
                 f" > {above:g}" if above is not None else "")
        raise ValueError(f"{name}={v!r}: must be a number{bound}")
    if x > CONFIG_MOST:
        raise ValueError(f"{name}={v!r}: must be at most {CONFIG_MOST:g} (for a wait: 31 "
                         f"years; give that for one that never ends)")
    return x


_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def config_flag(name: str, default: bool, env: Any = None) -> bool:
    """The switch in environment variable ``name``: 1/0, true/false, yes/no,
    on/off (any case); ``default`` when unset or empty; ValueError naming
    it for anything else (a typo must not turn a switch the wrong way)."""
    v = (os.environ if env is None else env).get(name, "")
    low = v.strip().lower()
    if not low:
        return default
    if low in _ON:
        return True
    if low in _OFF:
        return False
    raise ValueError(f"{name}={v!r}: a switch, 1 or 0 (true/false, yes/no, on/off)")


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20,
          "MB": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_size(text: str) -> int:
    """'8' -> 8, '64K' -> 65536, '1M' / '1MiB' -> 1048576."""
    s = text.strip().upper()
    i = len(s)
    while i and not s[i - 1].isdigit():
        i -= 1
    if not s[:i].isdigit() or s[i:] not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 8, 64K, 1M)")
    return int(s[:i]) * _UNITS[s[i:]]


def config_bytes(name: str, default: int) -> int:
    """A size in bytes from the environment (``parse_size``: 65536, 64K, 4M, 4MiB)."""
    v = os.environ.get(name)
    if not v:
        return default
    try:
        return parse_size(v)
    except ValueError:
        raise ValueError(f"{name}={v!r}: not a size in bytes (examples: 65536, 64K, 4M)") from None


def on_host(mine: str, host: str, endpoint: str, pid: int) -> str:
    """Where a peer on another host than this rank's is, as ``named`` says it
    (``''`` for one on this host: same host ids, ``mine`` and ``host``, as
    the rendezvous table has them, mesh.env.host_id): ``on host node-b, pid
    4242``. The host by the name its rank reported (its host id's host name,
    or the id MESH_HOST_ID gave it); by the address it is reached at
    (``endpoint``) where that name is this host's own too (network
    namespaces, containers of one name), which would not tell them apart."""
    if host == mine:
        return ""
    name = host.split("|", 1)[0]
    if not name or name == mine.split("|", 1)[0]:
        name = _address(endpoint) or host
    return f"on host {name}, pid {pid}" if pid else f"on host {name}"


def host_names(hosts: Sequence[str], endpoints: Sequence[str]) -> list[str]:
    """Each rank's host as ``on_host`` names it, seen from no host of the
    job (what meshrun's table says of a rank: ``hosts``, each rank's host
    id, ``endpoints``, its tcp:// one, as the rendezvous table has them):
    the name its rank reported; its address where that name is another
    host's too (network namespaces, containers of one name)."""
    ids: dict[str, set[str]] = {}
    for host in hosts:
        ids.setdefault(host.split("|", 1)[0], set()).add(host)
    names = []
    for host, endpoint in zip(hosts, endpoints):
        name = host.split("|", 1)[0]
        names.append(name if name and len(ids[name]) == 1 else _address(endpoint) or host)
    return names


def _address(endpoint: str) -> str:
    """The host of a tcp:// endpoint ('' for none)."""
    return endpoint.split("://", 1)[-1].rsplit(":", 1)[0]


class Outgoing:
    """A send in progress: queued (no credit yet), handed to ZeroMQ, then done
    once ZeroMQ has released the caller's buffer. A large message to another
    host goes in pieces (mesh.wire.CHUNK): ``pieces``, those not handed over
    yet, (payload bytes, frames) each, and ``held``, the trackers of those
    that were; under way once its header went (``frames`` None), it stays
    first in its peer's queue until its last piece is handed over
    (``pieced`` says it went so). ``seq``, for one ZeroMQ sends zero-copy:
    how many messages its peer's socket had carried once its last frame
    was on it (``Peer.sent``; 0: not yet, or another kind of send), which
    the peer's goodbye may say it had read (mesh.wire's BYE, field h).
    ``sync``, for a synchronous send (Comm.ssend): set once the receiver
    said a receive took the message (mesh.wire's SYNCED); done waits for it
    too."""

    __slots__ = ("dst", "frames", "nbytes", "_desc", "event", "tracker", "error", "keep",
                 "pieces", "held", "streamed", "pieced", "seq", "sync")

    def __init__(self, dst: int, frames: list | None, nbytes: int, desc: Any, keep: Any) -> None:
        self.frames: list | None
        self.dst, self.frames, self.nbytes, self._desc, self.keep = dst, frames, nbytes, desc, keep
        self.event = Flag()
        self.tracker: zmq.MessageTracker | None = None
        self.error: BaseException | None = None
        self.pieces: deque[tuple[int, list]] | None = None
        self.held: list = []
        self.streamed: memoryview | None = None     # its bytes, to write on a stream
        self.pieced = False
        self.seq = 0
        self.sync: Flag | None = None

    def under_way(self) -> bool:
        """Whether this is a message in pieces whose header went already."""
        return self.pieces is not None and self.frames is None

    @property
    def desc(self) -> str:
        return describe(self._desc)

    def described(self, peers: Sequence[Any]) -> str:
        """``desc``, its peer named with its host where that is not this
        rank's (``peers``: the transport's): what errors and reports say."""
        return describe(self._desc, peers)

    def done(self) -> bool:
        return self.event.is_set() and (self.tracker is None or self.tracker.done) and (
            self.sync is None or self.sync.is_set())

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.frames = self.pieces = None
        self.event.set()


class Peer:
    """One peer: its socket (None for this rank itself), the sends queued
    for credit, and the credit both ways (see the module docstring)."""

    __slots__ = ("rank", "sock", "monitor", "lock", "inflight", "queue", "state", "why",
                 "last_heard", "last_sent", "to_grant", "suspect_since", "status", "status_at",
                 "window", "grant_step", "_grant_lock", "sent", "unanswered", "cause",
                 "read_bye", "answered_bye", "read_ours", "there")

    def __init__(self, rank: int, sock: zmq.Socket | None, monitor: zmq.Socket | None,
                 window: int = 64 << 20) -> None:
        self.rank, self.monitor = rank, monitor
        self.sock: Any = sock
        self.lock = threading.Lock()       # held while sending to it
        self.window = window
        self.grant_step = max(window // 4, 1)
        self._grant_lock = threading.Lock()
        self.inflight = 0
        self.queue: deque[Outgoing] = deque()
        self.state = ALIVE
        self.why = ""
        # the world rank whose loss this peer's clean goodbye said it had seen (-1: none):
        # what an error naming this peer's leaving names as its lost peer (the root cause)
        self.cause = -1
        self.last_heard = self.last_sent = time.monotonic()
        self.to_grant = 0
        self.suspect_since = 0.0
        self.status = ""
        self.status_at = 0.0
        self.sent = 0          # messages put on its socket (order with mesh.rings)
        self.unanswered = 0    # bytes of pieces (mesh.wire.CHUNK) it has not answered yet
        # leaving cleanly: it answered our goodbye (it has read all we sent before it);
        # and whether we answered its own (mesh.liveness's on_bye)
        self.read_bye = self.answered_bye = False
        # how many of the messages we put on its socket (``sent``) its goodbye said it
        # had read (-1: no goodbye heard, or it did not say)
        self.read_ours = -1
        # where it is when on another host than this rank's ('' on this one): what
        # errors naming it say beside its rank (``named``, ``on_host``)
        self.there = ""

    def fits(self, cost: int) -> bool:
        """Whether a message costing ``cost`` bytes (payload and MSG_COST)
        fits the window now (a message larger than the window goes alone)."""
        inflight = self.inflight
        return inflight + cost <= self.window or inflight < self.grant_step

    def admit(self, n: int) -> bool:
        """Charge a message of ``n`` payload bytes to the window if it
        ``fits`` now; caller holds ``lock``."""
        if self.fits(n + MSG_COST):
            self.inflight += n + MSG_COST
            return True
        return False

    def release(self, credit: int) -> None:
        """The peer granted ``credit`` bytes back; caller holds ``lock``."""
        self.inflight = max(0, self.inflight - credit)

    def flush(self, extra: int) -> int:
        """Everything owed to this peer, ``extra`` bytes more: the credit
        to grant back now, whatever the step (Inbox.held)."""
        with self._grant_lock:
            grant, self.to_grant = self.to_grant + extra, 0
        return grant

    def consumed(self, n: int) -> int:
        """A message of ``n`` payload bytes from this peer left our buffers:
        the credit to grant back now (0 until a step's worth has gathered)."""
        lock = self._grant_lock     # acquire/release: cheaper than ``with``, once a message
        lock.acquire()
        try:
            self.to_grant += n + MSG_COST
            grant = self.to_grant if self.to_grant >= self.grant_step or n >= self.grant_step \
                else 0
            if grant:
                self.to_grant = 0
        finally:
            lock.release()
        return grant
