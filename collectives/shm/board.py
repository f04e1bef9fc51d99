"""Same-host synchronization without sockets: every rank of a group keeps a
small board in its own memory, an anonymous memory file (memfd) that each
peer maps read-only (by /proc/pid/fd, as mesh.rings does), so a poll is a
load, not a system call. A socket round trip between two processes on a
small machine costs 150-400 us; a poll through the mapping well under one.
Where a peer's board cannot be mapped, it is polled with cross-memory reads
(collectives.shm.cma), a couple of microseconds each.

    head = [cookie | ack | slot 0: seq stage fplen paylen addr addr2 fphash | slot 1: ...]
           [inline payload, slot 0 | slot 1]          (one 512-byte read polls all this)
    slot s body = [fingerprint (msgpack) | payload (small collectives)]
    arena = [a large all_reduce's buffer]             (ARENA bytes, page-aligned)

A collective (a ``Round``) posts into slot seq % 2: fingerprint, payload
or the address of its buffer, then (after a fence) ``seq``. A reader that
has seen ``seq`` uses the slot only after a fence (through the mapping) or
after reading it again in a second call (cross-memory: one copy may load
bytes out of order, two calls do not). Peers wait for every other
rank's ``seq``, compare fingerprints (so every rank sees a mismatch itself),
then read payloads or buffers (at ``addr``, ``addr2``) directly, and step
``stage`` up as they go (1: my part is final, 2: I am done reading you). ``ack`` is the last
collective a rank has finished with; a slot is rewritten only once every
peer's ack has reached what it holds, which in lockstep the heads already
seen show, so it costs no extra read. The arena, likewise, is written
again only once every peer's ack has reached the last call that used it
(``Round.arena``): a rank leaves a call without waiting for its readers.

A repeated tiny call (collectives.shm.tiny: all_reduce, reduce_scatter,
all_gather, broadcast, reduce, gather, scatter, all_to_all) posts and polls
the same words through ``Quick``, its views made once, and reads the peers'
payloads where they lie in their mapped boards.

A peer on a socket path instead (another collective) is caught by a receive
posted on the tag once a wait gets long; so is an abort; a dead peer fails
a cross-memory read of its board (made on every poll without a mapping, on
each slow poll with one); a freed board fails the cookie check.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import mmap
import os
import platform
import secrets
import threading
import time
import weakref
from typing import Any, Callable

import msgpack
import numpy as np

from mesh import Comm, LostPeerError, MeshError, MismatchError
from mesh.rings import fence

from ..host.exchange import all_gather_object_direct
from ..runner import Ctx, caught, named
from . import bell, cma

__all__ = ["CAPACITY", "INLINE", "ARENA", "available", "announce", "crowded", "ready", "forget",
           "mapped", "Round", "Quick", "signature", "Stray"]

CAPACITY = 64 << 10
_FP_ROOM = 1024
_HEAD = 128
_INLINE = 192
INLINE = _INLINE
"""Payloads up to this many bytes sit in the head, read with every poll."""
_PEEK = _HEAD + 2 * _INLINE
_BODY = _FP_ROOM + CAPACITY
_BELL = _PEEK + 2 * _BODY
"""Where a board's bell is (an int32 rung as its head changes, for peers
sleeping on it: collectives.shm.bell), and after it the word that says on
whose bell this rank sleeps (that rank + 1; 0: none)."""
_ASLEEP = _BELL + 64
_ARENA_AT = -(-(_ASLEEP + 64) // 4096) * 4096
ARENA = 8 << 20
"""Bytes of each board's arena (a page-aligned tail), where a large
all_reduce of at most that many bytes puts its buffer for the peers to
read through their mappings (collectives.shm.local); its pages are
touched only as far as calls reach. A process may lower it (tests), the
same on every rank; the board's size stays."""
_SIZE = _ARENA_AT + ARENA
_SPIN_S = 0.002
_BELL_WAIT_S = 0.005
"""The longest sleep on a peer's bell (its ring ends it sooner): an abort,
a lost peer and the deadline are looked at between."""
_BUSY_S = 0.00005
_CROWD_YIELD_S = 0.0003
"""How long a wait in a group with more ranks than cores yields before it
sleeps on the late peer's bell: a futex wake costs tens of microseconds, so
a short wait (a 1 KiB all_reduce's) is quicker yielding, a long one (a
bucket's) spends less CPU asleep (BENCHMARKS.md, eighth session)."""
_QUICK_SPIN_S = 0.0
_QUICK_YIELD_S = 0.0005
_FENCE = platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86")
"""Whether Quick fences: not on x86, whose stores are seen in program order
and loads are not passed by later loads or stores (all the board needs:
no rank acts on a store it has made before loading another's)."""
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
SEQ, STAGE, FPLEN, PAYLEN, ADDR, ADDR2, FPHASH = range(7)
_WITHDRAWN = -1
"""A post's FPHASH once its call failed here (a hash is never negative)."""
_SLOT_WORDS = 7
_WORDS = 1 + 2 * _SLOT_WORDS


def crowded(size: int) -> bool:
    """Whether a group of ``size`` ranks on this host has more ranks than
    this process may use cores (its waits then give their core away)."""
    return size > _CORES


@functools.cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _map(fd: int, writable: bool) -> np.ndarray:
    """The board file ``fd`` mapped shared, as numpy bytes, holding no file
    descriptor (Python's mmap keeps a duplicate of each: three a group on
    two ranks, never freed while the mesh lives, ran a process that made
    groups by the hundred out of descriptors). Unmapped once nothing views
    it (the finalizer of the ctypes array every view's base leads to), never
    at interpreter exit: weakref's exit hook runs every finalizer left
    before the mesh's own (mesh.world._close_at_exit), and a collective still
    running on a lane (an async call never waited for) would touch the
    unmapped board and crash the process (SIGSEGV); the exit unmaps it."""
    libc = _libc()
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    addr = libc.mmap(None, _SIZE, prot, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        raise OSError(ctypes.get_errno(), "mmap of a board failed")
    raw = (ctypes.c_uint8 * _SIZE).from_address(addr)
    weakref.finalize(raw, libc.munmap, addr, _SIZE).atexit = False
    view = np.frombuffer(memoryview(raw).cast("B"), np.uint8)
    if not writable:
        view.flags.writeable = False
    return view


def _region() -> tuple[np.ndarray, int]:
    """This rank's board: a memfd mapping peers can map too (and its
    descriptor, to close once they have), or private memory (-1) where
    memfd is missing."""
    if hasattr(os, "memfd_create"):
        try:
            fd = os.memfd_create("meshrun-board", os.MFD_CLOEXEC)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                os.ftruncate(fd, _SIZE)
                return _map(fd, True), fd
            except (OSError, ValueError):
                os.close(fd)
    return np.zeros(_SIZE, np.uint8), -1


def _raw(a: np.ndarray) -> Any:
    """The bytes of ``a`` as a writable flat buffer (a memoryview where
    numpy can give one: a third of the cost of reshape and view)."""
    try:
        return a.data.cast("B")
    except (TypeError, ValueError):
        return a.reshape(-1).view(np.uint8)


def _attach(pid: int, fd: int, cookie: int) -> np.ndarray | None:
    """A peer's whole board, mapped read-only from /proc/pid/fd/fd, or None
    where it cannot be (then it is polled with cross-memory reads)."""
    if fd < 0:
        return None
    try:
        f = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        view = _map(f, False)
    except (OSError, ValueError):
        return None
    finally:
        os.close(f)
    return view if int(view[:8].view(np.int64)[0]) == cookie else None


class _Box:
    """One group's board: ours, and per peer its board's head as this rank
    sees it (``rows``: the mapping itself, or the copy the last read left;
    ``heads``: its words, ``heads[p][0]`` the ack), the mapping of its
    whole board (``boards``) or None, and a cross-memory read of it
    (``readers``: the poll without a mapping, a liveness probe with one)."""

    def __init__(self, ctx: Ctx) -> None:
        self.mem, fd = _region()
        words = self.mem[:_HEAD].view(np.int64)
        words[0] = cookie = secrets.randbits(63)
        self.head = words[1:1 + _WORDS].data
        self.slot_fp = [b"", b""]        # the fingerprint each slot's body holds
        self.slot_words: list[Any] = [None, None]  # the Quick whose words a slot's head holds
        n, rank = ctx.g.size, ctx.g.rank
        self.world = {w: p for p, w in enumerate(ctx.g.ranks)}    # world rank -> group rank
        where = all_gather_object_direct(ctx, [self.mem.ctypes.data, cookie, fd])
        self.addrs = [a for a, _, _ in where]
        self.cookies = [c for _, c, _ in where]
        pids = cma.pids(ctx)
        self.peers = [(rank + k) % n for k in range(1, n)]
        self.boards: list[np.ndarray | None] = [None] * n
        self.rows: list[np.ndarray] = [self.mem[:_PEEK]] * n
        self.readers: list[Any] = [None] * n
        self.probes = np.zeros((n, 8), np.uint8)    # (a Reader holds only their address)
        for p in self.peers:
            board = self.boards[p] = _attach(pids[p], where[p][2], self.cookies[p])
            row = board[:_PEEK] if board is not None else np.zeros(_PEEK, np.uint8)
            self.rows[p] = row
            self.readers[p] = cma.Reader(pids[p], self.addrs[p],
                                         row if board is None else self.probes[p])
        self.mapped = all(self.boards[p] is not None for p in self.peers)
        # every peer has mapped this board (or will read it by cross-memory reads):
        # its descriptor is no longer needed, and a group holds none. Where every
        # member maps every board, a peer reads this one through its own mapping,
        # which keeps the memory: it goes when this rank drops the group.
        self.shared = all(all_gather_object_direct(ctx, self.mapped))
        if fd >= 0:
            os.close(fd)
        self.heads = [r[8:8 + 8 * _WORDS].view(np.int64).data for r in self.rows]
        self.inline = [r.data[_HEAD:_PEEK] for r in self.rows]
        self.mv = self.mem.data
        self.arena_seq = 0      # the last call that put data in this rank's arena
        self.bell = self.mem[_BELL:_BELL + 4].view(np.int32)
        self.asleep = self.mem[_ASLEEP:_ASLEEP + 4].view(np.int32)
        self.me = rank + 1
        self.rung = 0
        # per peer: its bell's address and word (mapped boards only), and its
        # word saying whose bell it sleeps on
        self.bells: list[tuple[int, np.ndarray] | None] = [None] * n
        self.sleepers: list[Any] = []      # (memoryviews: an item read is a plain int)
        if bell.available():
            for p in self.peers:
                board = self.boards[p]
                if board is not None:
                    word = board[_BELL:_BELL + 4].view(np.int32)
                    self.bells[p] = (word.ctypes.data, word)
                    self.sleepers.append(board[_ASLEEP:_ASLEEP + 4].view(np.int32).data)
        self.own_bell = self.bell.ctypes.data
        self.seen_cookie = [r[:8].view(np.int64).data for r in self.rows]

    def ring(self) -> None:
        """After a change of this rank's head: bump the bell, and wake the
        peers that said they sleep on it."""
        self.rung = (self.rung + 1) & 0x7FFFFFFF
        self.bell[0] = self.rung
        if self.sleepers:
            fence()     # (the bump before the look at their words)
            me = self.me
            for word in self.sleepers:
                if word[0] == me:
                    bell.wake(self.own_bell)
                    return

    def ring_asleep(self) -> None:
        """``ring`` where a peer says it sleeps on this bell (Quick: a look
        at the peers' words, no fence, where a tiny call's microsecond
        counts; a ring missed in the race costs the sleeper _BELL_WAIT_S)."""
        me = self.me
        for word in self.sleepers:
            if word[0] == me:
                self.ring()
                return

    def reading(self, world: int) -> bool:
        """Whether world rank ``world`` may still read this board: it has not
        finished the last call posted here (its ack is short of it), and its
        board can still be read (a peer whose cannot is gone: it reads
        nothing more). close() waits for such a peer where this board is
        kept alive: one read across processes goes with the process."""
        p = self.world.get(world)
        if p is None or p == self.me - 1:
            return False
        posted = max(self.head[1 + SEQ], self.head[1 + _SLOT_WORDS + SEQ])
        if posted <= self.heads[p][0]:
            return False
        if self.readers[p]() or self.seen_cookie[p][0] != self.cookies[p]:
            return False
        return bool(posted > self.heads[p][0])

    def read_body(self, ctx: Ctx, peer: int, offset: int, dst: np.ndarray) -> None:
        """``dst.nbytes`` bytes at ``offset`` of ``peer``'s board into ``dst``."""
        board = self.boards[peer]
        if board is not None:
            dst.reshape(-1).view(np.uint8)[...] = board[offset:offset + dst.nbytes]
        else:
            cma.peer_read(ctx, peer, self.addrs[peer] + offset, dst)


_boxes: "weakref.WeakKeyDictionary[Comm, _Box]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def available(ctx: Ctx, payload: int = 0) -> bool:
    """Whether this group syncs through boards (a same-host group whose
    members may read each other) with room for ``payload`` bytes; sets the
    boards up on the first ask (messages under this collective's tag)."""
    if payload > CAPACITY or ctx.g.size == 1 or not cma.usable(ctx):
        return False
    with _lock:
        box = _boxes.get(ctx.g)
    if box is None:
        box = _Box(ctx)
        if not box.shared:  # a peer may read it across processes after this rank drops
            # the group: it stays until the mesh closes, and that waits for the peers
            # still reading it (reading their board, as they poll ours)
            ctx.ch.keep_alive(box, box.reading)
        with _lock:
            _boxes[ctx.g] = box
    return True


def announce(ctx: Ctx) -> None:
    """Post this call's fingerprint on this rank's board, no payload, and
    go: for a rank whose part runs over sockets where, by their own sizes,
    its peers' may run on their boards (a forced recursive doubling across
    the board's payload). A peer on the board that waits for this rank then
    sees the mismatch, as a MismatchError, and its abort reaches this rank's
    receives (one that only receives first, a fold at 3 ranks, sends nothing
    a board's watch could catch: every rank waited for the timeout)."""
    with Round(ctx) as r:
        r.post()


def forget(g: Comm) -> None:
    """Take ``g``'s boards out of use here (their memory stays for peers:
    in their mappings, or kept alive until the mesh closes): its next
    collective sets them up again, with the peers, as on its first."""
    with _lock:
        _boxes.pop(g, None)


def ready(g: Comm) -> bool:
    """Whether ``g``'s boards are set up (an earlier collective found them
    available): then a collective may use them without asking (no message)."""
    with _lock:
        return g in _boxes


def mapped(g: Comm) -> bool:
    """Whether every peer's board in group ``g`` is mapped here (polls are loads)."""
    box = _boxes.get(g)
    return box is not None and box.mapped


def signature(fp: dict) -> tuple[bytes, int]:
    """A fingerprint as a board holds it: msgpack bytes, and their 63-bit hash."""
    packed = msgpack.packb(fp)
    if len(packed) > _FP_ROOM:
        raise ValueError(f"fingerprint of {len(packed)} bytes does not fit a board")
    return packed, int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


class Stray(MeshError):
    """A peer sent a message on the call's tag where it should have posted
    on its board: it is not on the boards (it is setting them up, after a
    call that failed here while it set them up: collectives.host.hier)."""


class _Waiting:
    """Waits on peers: since when the current one runs (each wait spins
    before it sleeps), the time limit, and the receive posted on the tag
    once a wait gets long."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.t0 = time.monotonic()
        self.watch: Any = None
        self.error: BaseException | None = None
        self.crowded = crowded(ctx.g.size)
        self.busy = 0.0 if self.crowded else _BUSY_S
        self.patient = False    # sleep at once: a long wait, others need the cores
        self.reports = 0
        self.what: str | None = None
        self.told = False       # this rank's status says it waits here (Channel.waiting)

    def where(self) -> str:
        return self.ctx.where()

    def posted(self) -> Any:
        if self.watch is None:
            self.watch = self.ctx.watch()
        return self.watch

    def idle(self, waiting_for: list[int], box: "_Box | None" = None,
             seen: int = 0) -> BaseException | None:
        """Between polls: poll on (when every rank has a core); then, for
        _SPIN_S, look for an abort of the call (a lookup, no message) and at
        the deadline, and give the core away: a yield, or where the group
        has more ranks than cores (past _CROWD_YIELD_S) and the first late
        peer's board is mapped, a sleep on its bell (``seen``: the bell's value before its head was
        looked at) until it rings: polling would take a core from a rank
        with work; a patient wait (one on work across hosts) sleeps on
        the bell from the start. After that, post the receive (a peer on a socket path
        would talk to us there, an abort or a lost peer fails it) and sleep:
        on the bell where the board is mapped, else a nap. Returns the error
        found."""
        now = time.monotonic()
        waited = now - self.t0
        if waited < self.busy and not self.patient:
            return None
        ctx = self.ctx
        peer = waiting_for[0]
        rung = None if box is None else box.bells[peer]
        if waited < _SPIN_S and (not self.patient or rung is not None):
            if self.what is None:
                self.what = ctx.where().split(": ", 1)[1]
            aborted = ctx.ch.aborted(ctx.tag, self.what)
            if aborted is not None:
                return aborted
            if now <= ctx.deadline:
                if (self.patient or (self.crowded and waited >= _CROWD_YIELD_S)) \
                        and box is not None and rung is not None:
                    self._sleep(box, peer, rung[0], seen, _SPIN_S - waited)
                else:
                    os.sched_yield()
                return None
        watch = self.posted()
        if watch.done():
            try:
                watch.wait()
            except MeshError as e:
                return e
            return Stray(f"{self.where()}: a peer sent a message where none was expected")
        if time.monotonic() > ctx.deadline:
            raise ctx.timed_out(f" waiting for {_ranks(ctx, waiting_for)} (same-host board)")
        if not self.told:       # a long wait: the peers' stall reports say where we are
            self.told = True
            ctx.ch.waiting(f"{self.where().split(': ', 1)[1]}: waiting for "
                           f"{_ranks(ctx, waiting_for)} (same-host board)", self.t0)
        self._report(waited, waiting_for)
        if box is None or rung is None:
            time.sleep(min(0.001, max(waited / 20, 0.00002)))
        else:
            self._sleep(box, peer, rung[0], seen,
                        min(_BELL_WAIT_S, max(0.0, ctx.deadline - time.monotonic())))
        return None

    @staticmethod
    def _sleep(box: "_Box", peer: int, addr: int, seen: int, timeout: float) -> None:
        """Sleep on ``peer``'s bell (at ``addr``) while it says ``seen``, at
        most ``timeout``; this rank's word says so meanwhile, for its ring."""
        box.asleep[0] = peer + 1
        fence()     # (the word before the look at the bell: the peer's ring sees one or the other)
        bell.wait(addr, seen, timeout)
        box.asleep[0] = 0

    def _report(self, waited: float, waiting_for: list[int]) -> None:
        """Every MESH_STALL_WARN seconds of one wait, log what the late peers
        last said they were doing (the mesh's stall report)."""
        ch = self.ctx.ch
        every = ch.stall_warn
        if not every or waited < every * (self.reports + 1):
            return
        self.reports += 1
        ch.stalled(self.where(), waiting_for, waited, self.ctx.timeout)

    def gone(self, peer: int, what: str) -> None:
        """``peer`` finished this collective without ``what``: it failed, and
        whoever failed first aborted the tag; raise that."""
        err = caught(self.posted(), 0.2)
        if err is not None:
            raise err
        raise MeshError(f"{self.where()}: {_ranks(self.ctx, [peer])} left it without {what} "
                        f"(it called another collective or failed)")

    def close(self) -> None:
        if self.watch is not None and not self.watch.done():
            caught(self.watch, 0)


def _ranks(ctx: Ctx, peers: list[int]) -> str:
    """Group ranks as errors name them (runner.named: with their world ranks where
    those differ)."""
    return ", ".join(named(ctx.g, p) for p in peers)


def mismatch_text(g: Comm, tag: int, peer: int, mine: str, other: str) -> str:
    """A mismatch found on a board or a link, worded as the inbox words
    those it finds: world ranks (group ranks beside them in a sub-group)."""
    me, them = g.ranks[g.rank], g.ranks[peer]
    local = "" if (me, them) == (g.rank, peer) else \
        f" (ranks {g.rank} and {peer} of the group)"
    return (f"rank {me}: collective mismatch on group {g.name} at call #{-tag}: rank {me} "
            f"called {mine} but rank {them} called {other}{local}")


def _fmt(fp: bytes) -> str:
    try:
        d = msgpack.unpackb(fp, raw=False)
        return f"{d.pop('coll', '?')}({', '.join(f'{k}={v}' for k, v in d.items())})"
    except Exception:
        return repr(fp)


class Round:
    """One collective on the board; use as a context manager::

        with Round(ctx) as r:
            r.post(payload=a)            # or addr=buf.ctypes.data
            r.gather(outs)               # peers' payloads; fingerprints checked
            ...; r.stage(1); r.wait_stage(peers, 1) ...

    ``sig``: ``signature(ctx.fp)``, when the caller keeps it between calls.
    """

    def __init__(self, ctx: Ctx, sig: tuple[bytes, int] | None = None) -> None:
        self.ctx, self.box = ctx, _boxes[ctx.g]
        self.seq = -ctx.tag
        self.slot = self.seq % 2
        self.base = _SLOT_WORDS * self.slot
        self.fp, self.hash = signature(ctx.fp) if sig is None else sig
        self.wait = _Waiting(ctx)
        self.addr2: list[int] = []
        self.peers = self.box.peers

    def __enter__(self) -> "Round":
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        box = self.box
        head, b = box.head, 1 + self.base
        if kind is not None and head[b + SEQ] == self.seq and not issubclass(kind,
                                                                             MismatchError):
            # failed (not on what the posts say, which every rank sees for itself):
            # the post is withdrawn, so that a peer that comes to the call later
            # raises its abort (gather) instead of finishing on what was posted (a
            # rank stopped past its peers' timeout: resumed, its main thread may
            # run before its transport reads their aborts)
            head[b + FPHASH] = _WITHDRAWN
            box.slot_words[self.slot] = None
        head[0] = max(head[0], self.seq)
        self.box.ring()
        self.wait.close()

    def _peek(self, peer: int) -> Any:
        box = self.box
        if box.boards[peer] is None:
            err = box.readers[peer]()
            if err:
                raise cma.failed_read(self.ctx, peer, err, "the board")
        if box.seen_cookie[peer][0] != box.cookies[peer]:
            raise LostPeerError(f"{self.wait.where()}: {_ranks(self.ctx, [peer])}'s board was "
                                f"freed (its group was closed)", self.ctx.g.ranks[peer])
        return box.heads[peer]

    def _alive(self, peer: int) -> None:
        """A mapped board outlives its process: read it across processes to
        learn that the peer is gone (ESRCH). Another failure (EFAULT) only
        says that the peer has let its own mapping go (it dropped the group
        after its part): this rank's mapping still holds the board."""
        box = self.box
        if box.boards[peer] is not None:
            err = box.readers[peer]()
            if err == errno.ESRCH:
                raise cma.failed_read(self.ctx, peer, err, "the board")

    def _left(self, peers: list[int]) -> MeshError | None:
        """LostPeerError if one of ``peers`` has closed its mesh (a goodbye
        reaches the transport's waits, not this poll of memory) or died."""
        ch, what = self.ctx.ch, self.wait.what or self.wait.where().split(": ", 1)[1]
        for p in peers:
            err = ch.left(p, what)
            if err is not None:     # one that aborted this call and then left: its abort says why
                return ch.aborted(self.ctx.tag, what) or err
        return None

    def _until(self, peers: list[int], ready: Callable[[Any], bool]) -> None:
        """Poll peers' heads until ``ready`` holds for all (one at a time:
        all must get there). If the tag is aborted meanwhile, or the mesh
        loses a peer, and a peer never gets there, raise why; if they all
        get there, carry on (each rank then sees a mismatch itself, as a
        MismatchError; a peer that left after doing its part is no error)
        and raise an abort at the end."""
        box = self.box
        heads, bells = box.heads, box.bells
        todo = [p for p in peers if not ready(heads[p])]
        if not todo:
            return
        wait = self.wait
        wait.t0, wait.reports = time.monotonic(), 0
        try:
            self._until_all(todo, ready, heads, bells)
        finally:
            if wait.told:
                wait.told = False
                self.ctx.ch.waiting(None)

    def _until_all(self, todo: list[int], ready: Callable[[Any], bool], heads: Any,
                   bells: Any) -> None:
        """_until's loop, once some peer is not there yet."""
        wait, box = self.wait, self.box
        seen = 0
        while todo:
            while todo:
                rung = bells[todo[0]]
                if rung is not None:
                    seen = int(rung[1][0])    # (before the look: a ring after it wakes us)
                if not ready(self._peek(todo[0])):
                    break
                todo.pop(0)
            if not todo:
                break
            err = wait.idle(todo, box, seen)
            if err is None and wait.watch is not None:
                self._alive(todo[0])
                err = self._left(todo)
            if err is not None:
                todo = [p for p in todo if not ready(self._peek(p))]
                if todo:
                    raise err
                if not isinstance(err, LostPeerError):
                    wait.error = err

    def post(self, payload: np.ndarray | None = None, addr: int = 0, addr2: int = 0) -> None:
        """Publish this rank's fingerprint and payload (or buffer addresses)."""
        box = self.box
        head, b, slot = box.head, 1 + self.base, self.slot
        held = head[b + SEQ]
        self._until(self.peers, lambda h: h[0] >= held)
        body = _PEEK + slot * _BODY
        if box.slot_fp[slot] != self.fp:
            box.mv[body:body + len(self.fp)] = self.fp
            box.slot_fp[slot] = self.fp
        size = 0
        if payload is not None:
            raw = _raw(payload)
            size = raw.nbytes
            at = _HEAD + slot * _INLINE if size <= _INLINE else body + _FP_ROOM
            box.mv[at:at + size] = raw
        box.slot_words[slot] = None
        head[b + STAGE], head[b + FPLEN], head[b + PAYLEN] = 0, len(self.fp), size
        head[b + ADDR], head[b + ADDR2], head[b + FPHASH] = addr, addr2, self.hash
        fence()
        head[b + SEQ] = self.seq
        head[0] = max(head[0], self.seq - 1)
        box.ring()

    def gather(self, outs: list[np.ndarray | None] | None = None) -> list[int]:
        """Wait for every peer's post; check fingerprints; copy the payload of
        each peer p with an ``outs[p]`` (contiguous, its exact size) there.
        Returns the peers' ``addr`` by rank (``addr2`` in ``self.addr2``)."""
        seq, b, slot = self.seq, 1 + self.base, self.slot
        self._until(self.peers, lambda h: h[b + SEQ] == seq or h[0] >= seq)
        fence()      # what the posts hold is read after their seq (mapped boards)
        box = self.box
        n = self.ctx.g.size
        addrs, self.addr2 = [0] * n, [0] * n
        inline = slot * _INLINE
        for p in self.peers:
            h = self._peek(p)       # (the second read, where the board is not mapped)
            if h[b + SEQ] != seq or h[b + FPHASH] == _WITHDRAWN:
                self.wait.gone(p, "taking part")
            out = None if outs is None else outs[p]
            size = h[b + PAYLEN]
            if h[b + FPHASH] != self.hash or (out is not None and size != out.nbytes):
                self._mismatch(p, h, None if out is None else out.nbytes)
            if out is not None and size:
                if size <= _INLINE:
                    _raw(out)[:] = box.inline[p][inline:inline + size]
                else:
                    box.read_body(self.ctx, p, _PEEK + slot * _BODY + _FP_ROOM, out)
            addrs[p], self.addr2[p] = h[b + ADDR], h[b + ADDR2]
        if self.wait.error is not None:
            raise self.wait.error
        return addrs

    def arena(self, dtype: np.dtype) -> np.ndarray:
        """This rank's arena as ``dtype`` items (all of it), once no
        peer may still read what an earlier call left there: each peer's ack
        has reached that call (it has left it). Before ``post``."""
        box = self.box
        held = box.arena_seq
        self._until(self.peers, lambda h: h[0] >= held)
        box.arena_seq = self.seq
        return box.mem[_ARENA_AT:_SIZE].view(dtype)

    def arena_of(self, peer: int, dtype: np.dtype, lo: int, hi: int,
                 out: np.ndarray | None) -> np.ndarray:
        """Items [lo, hi) of ``peer``'s arena as ``dtype``: a view of its
        mapped board (no copy), else read across processes into ``out``
        (that many items), which is returned. After a wait for the stage
        at which the peer wrote them."""
        size = dtype.itemsize
        board = self.box.boards[peer]
        if board is not None:
            return board[_ARENA_AT + lo * size:_ARENA_AT + hi * size].view(dtype)
        assert out is not None
        self.box.read_body(self.ctx, peer, _ARENA_AT + lo * size, out)
        return out

    def publish(self, payload: np.ndarray, k: int) -> None:
        """Put ``payload`` (at most CAPACITY bytes) in this rank's slot, in
        place of what it posted (which no peer may still read: it posted
        none that peers gather), then reach stage ``k``: peers that waited
        for it take it with ``payload_into``."""
        box, b, slot = self.box, 1 + self.base, self.slot
        raw = _raw(payload)
        size = raw.nbytes
        at = _HEAD + slot * _INLINE if size <= _INLINE else _PEEK + slot * _BODY + _FP_ROOM
        box.mv[at:at + size] = raw
        box.head[b + PAYLEN] = size
        fence()
        box.head[b + STAGE] = k
        box.ring()

    def payload_into(self, peer: int, out: np.ndarray) -> None:
        """``peer``'s payload into ``out`` (contiguous, its exact size), after
        a wait for the stage it published it at."""
        b = 1 + self.base
        h = self._peek(peer)        # (the second read, where the board is not mapped)
        size = h[b + PAYLEN]
        if size != out.nbytes:
            self._mismatch(peer, h, out.nbytes)
        if size <= _INLINE:
            at = self.slot * _INLINE
            _raw(out)[:] = self.box.inline[peer][at:at + size]
        else:
            self.box.read_body(self.ctx, peer, _PEEK + self.slot * _BODY + _FP_ROOM, out)

    def payload_part(self, peer: int, start: int, out: np.ndarray) -> np.ndarray:
        """Bytes [start, start + out.nbytes) of ``peer``'s payload (after
        ``gather``) as ``out``'s dtype: a view of its inline room as gather
        saw it or of its mapped board (no copy), else read across processes
        into ``out``, which is returned."""
        size, slot, end = self.box.heads[peer][1 + self.base + PAYLEN], self.slot, \
            start + out.nbytes
        if size <= _INLINE:
            at = _HEAD + slot * _INLINE
            return self.box.rows[peer][at + start:at + end].view(out.dtype)
        at = _PEEK + slot * _BODY + _FP_ROOM + start
        board = self.box.boards[peer]
        if board is not None:
            return board[at:at + out.nbytes].view(out.dtype)
        self.box.read_body(self.ctx, peer, at, out)
        return out

    def payload_of(self, peer: int) -> np.ndarray:
        """A copy of ``peer``'s payload, whatever its size (after ``gather``)."""
        h, slot = self.box.heads[peer], self.slot
        size = h[1 + self.base + PAYLEN]
        if size <= _INLINE:
            at = _HEAD + slot * _INLINE
            return self.box.rows[peer][at:at + size].copy()
        out = np.empty(size, np.uint8)
        self.box.read_body(self.ctx, peer, _PEEK + slot * _BODY + _FP_ROOM, out)
        return out

    def _mismatch(self, peer: int, h: Any, want: int | None) -> None:
        b = 1 + self.base
        theirs = np.zeros(min(max(h[b + FPLEN], 0), _FP_ROOM), np.uint8)
        try:
            self.box.read_body(self.ctx, peer, _PEEK + self.slot * _BODY, theirs)
        except MeshError:
            pass
        mine, other = _fmt(self.fp), _fmt(theirs.tobytes())
        if mine == other:
            other += (f" with a {h[b + PAYLEN]}-byte payload, {want} expected"
                      if h[b + FPHASH] == self.hash else
                      f" (fingerprint hash {h[b + FPHASH]:x}, ours {self.hash:x})")
        raise MismatchError(mismatch_text(self.ctx.g, self.ctx.tag, peer, mine, other))

    def stage(self, k: int) -> None:
        """Tell peers this rank has reached stage ``k`` of the collective."""
        self.box.slot_words[self.slot] = None
        self.box.head[1 + self.base + STAGE] = k
        self.box.ring()

    def stage_of(self, peer: int) -> int:
        """``peer``'s stage in this collective now, without waiting (0 before
        it has posted); what it wrote before that stage may be read then."""
        b = 1 + self.base
        h = self._peek(peer)
        if h[b + SEQ] != self.seq:
            return 0
        stage = int(h[b + STAGE])
        fence()
        return stage

    def wait_stage(self, peers: list[int], k: int, patient: bool = False) -> None:
        """Wait until each of ``peers`` has reached stage ``k``; ``patient``:
        sleeping between polls from the start (a wait on work across hosts)."""
        seq, b = self.seq, 1 + self.base
        self.wait.patient = patient
        try:
            self._until(peers, lambda h: (h[b + SEQ] == seq and h[b + STAGE] >= k)
                        or h[0] >= seq)
        finally:
            self.wait.patient = False
        fence()
        for p in peers:
            h = self.box.heads[p]
            if h[b + SEQ] != seq or h[b + STAGE] < k:
                self.wait.gone(p, f"reaching stage {k}")
        if self.wait.error is not None:
            raise self.wait.error


class Quick:
    """The board side of a repeated tiny call (collectives.shm.tiny), for one
    group with every peer's board mapped and one payload (``like``'s dtype
    and shape, inline) under one fingerprint: the plain case of Round's
    ``post`` and ``gather``, with every view made once. The payload is
    posted inline as Round posts it, and the peers' payloads are read
    where they lie, in their mapped boards (``views``: per slot, rank
    order, this rank's own post in its place), until ``done`` acks them.
    Anything else (a peer not done with the slot, a wait past a short
    spin or a few yields, a mismatch) tells the caller to go on with a
    Round, which picks up where this left off."""

    def __init__(self, g: Comm, like: np.ndarray, sig: tuple[bytes, int],
                 sizes: list[int] | None = None, tail: bytes = b"") -> None:
        box = _boxes[g]
        self.box, self.head, self.heads, self.peers = box, box.head, box.heads, box.peers
        self.fp, self.hash = sig
        size = like.nbytes
        # (per rank, the payload it posts: like's bytes and this rank's ``tail`` after
        # them, or as ``sizes`` says, 0 where a rank posts none: a scatter's)
        self.sizes = [size] * g.size if sizes is None else sizes
        self.size = self.sizes[g.rank]
        self.tail, self.like = tail, size
        self.meta = np.array([0, len(self.fp), self.size, 0, len(tail), self.hash],
                             np.int64).data
        # (the words after seq, as Round.post writes them: stage fplen paylen addr addr2 fphash;
        # addr2, a scatter's: the bytes of the tail, collectives.shm.local.scatter's)

        def payload(row: np.ndarray, slot: int) -> np.ndarray:
            at = _HEAD + slot * _INLINE
            return row[at:at + size].view(like.dtype).reshape(like.shape)

        rank = g.rank
        self.views = [[payload(box.mem if p == rank else box.rows[p], s) for p in range(g.size)]
                      for s in (0, 1)]
        self.mine = [self.views[0][rank], self.views[1][rank]]
        self.spin = _BUSY_S if g.size <= _CORES else _QUICK_SPIN_S

    def post(self, seq: int, a: np.ndarray | None) -> bool:
        """Round.post of ``a`` (None: no payload) for call ``seq``; False,
        with nothing written, where a peer has not acked this slot's last
        call yet."""
        head, heads, slot = self.head, self.heads, seq & 1
        b = 1 + _SLOT_WORDS * slot
        held = head[b]
        for p in self.peers:
            if heads[p][0] < held:
                return False
        box = self.box
        if box.slot_fp[slot] is not self.fp:
            body = _PEEK + slot * _BODY
            box.mv[body:body + len(self.fp)] = self.fp
            box.slot_fp[slot] = self.fp
        if a is not None:
            self.mine[slot][...] = a
            if self.tail:
                at = _HEAD + slot * _INLINE + a.nbytes
                box.mv[at:at + len(self.tail)] = self.tail
        if box.slot_words[slot] is not self:     # (a Round or another Quick wrote them)
            head[b + 1:b + 1 + 6] = self.meta
            box.slot_words[slot] = self
        if _FENCE:
            fence()
        head[b] = seq
        if head[0] < seq - 1:
            head[0] = seq - 1
        box.ring_asleep()
        return True

    def arrived(self, seq: int) -> bool:
        """Whether every peer has posted call ``seq`` with this fingerprint
        and payload size, after a short wait (``_wait``). False: go on with
        Round.gather (a longer wait, an abort, a lost peer, a mismatch)."""
        heads, b, sizes = self.heads, 1 + _SLOT_WORDS * (seq & 1), self.sizes
        hash_at, size_at = b + FPHASH, b + PAYLEN
        for p in self.peers:
            h = heads[p]
            if h[b] != seq and not self._wait(h, b, seq):
                return False
            if _FENCE:
                fence()     # what the post holds is read after its seq
            if h[hash_at] != self.hash or h[size_at] != sizes[p]:
                return False
        return True

    def staged(self, seq: int, peers: list[int], k: int) -> bool:
        """Whether each of ``peers`` (all there: ``arrived``) has reached
        stage ``k`` of call ``seq`` (Round.wait_stage's), after a short wait
        as ``arrived``'s."""
        at = 1 + _SLOT_WORDS * (seq & 1) + STAGE
        for p in peers:
            h = self.heads[p]
            if h[at] < k and not self._wait_stage(h, at, k):
                return False
        if _FENCE:
            fence()
        return True

    def tails(self, seq: int, peer: int, tail: bytes) -> bool:
        """Whether ``peer``'s post of call ``seq`` (arrived) holds ``tail``
        after like's bytes, as its addr2 says (and addr 0: a scatter's small
        form, its meta after the rows)."""
        h, b = self.heads[peer], 1 + _SLOT_WORDS * (seq & 1)
        if h[b + ADDR] != 0 or h[b + ADDR2] != len(tail):
            return False
        at = _HEAD + (seq & 1) * _INLINE + self.like
        return bytes(self.box.rows[peer].data[at:at + len(tail)]) == tail

    def _wait_stage(self, h: Any, at: int, k: int) -> bool:
        """_wait's, until the stage word at ``at`` reaches ``k``."""
        clock = time.perf_counter
        start = clock()
        end = start + self.spin
        while h[at] < k:
            if clock() > end:
                break
        else:
            return True
        end = start + _QUICK_YIELD_S
        while h[at] < k:
            if clock() > end:
                return False
            os.sched_yield()
        return True

    def stage(self, seq: int, k: int) -> None:
        """Round.stage's: this rank has reached stage ``k`` of call ``seq``."""
        b = 1 + _SLOT_WORDS * (seq & 1)
        self.box.slot_words[seq & 1] = None     # (post writes stage 0 again)
        self.head[b + STAGE] = k
        self.box.ring_asleep()

    def _wait(self, h: Any, b: int, seq: int) -> bool:
        """Until ``h``'s slot word at ``b`` says ``seq``: spin (_BUSY_S where
        every rank of the group has a core, else _QUICK_SPIN_S), then yield
        (the rank waited for may need this core) up to _QUICK_YIELD_S.
        False once that is over."""
        clock = time.perf_counter
        start = clock()
        end = start + self.spin
        while h[b] != seq:
            if clock() > end:
                break
        else:
            return True
        end = start + _QUICK_YIELD_S
        while h[b] != seq:
            if clock() > end:
                return False
            os.sched_yield()
        return True

    def done(self, seq: int) -> None:
        """This rank is done reading the peers' posts of call ``seq`` (Round's exit)."""
        if _FENCE:
            fence()     # (the reads above come before the ack)
        head = self.head
        if head[0] < seq:
            head[0] = seq
        self.box.ring_asleep()
