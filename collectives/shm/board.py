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
all_gather, broadcast, reduce, gather, scatter, all_to_all, and the
uneven ones) posts and polls
the same words through ``Quick``, its views made once, and reads the peers'
payloads where they lie in their mapped boards.

A peer on a socket path instead (another collective) is caught by a receive
posted on the tag once a wait gets long; so is an abort; a dead peer fails
a cross-memory read of its board (made on every poll without a mapping, on
each slow poll with one); a freed board fails the cookie check.

    board.py      the board: its layout, mapping a peer's, a group's boards
                  (available, ready, forget, kept, mapped), fingerprints (signature)
    waiting.py    a wait on peers' boards: spins, yields, bells, an abort, the deadline;
                  agree (the peers have entered a call, or forgot the boards)
    round.py      Round: one collective on the board (and announce)
    quick.py      Quick: the board side of a repeated tiny call (collectives.shm.tiny)

Round, Quick, Stray, announce and agree are importable from here too.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import mmap
import os
import platform
import secrets
import threading
import weakref
from typing import Any

import msgpack
import numpy as np

from mesh import Comm
from mesh.rings import fence

from ..host.exchange import all_gather_object_direct
from ..runner import Ctx
from . import bell, cma

__all__ = ["CAPACITY", "INLINE", "ARENA", "available", "announce", "crowded", "ready", "forget",
           "kept", "forgettable", "agree", "mapped", "Round", "Quick", "signature", "Stray"]

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
_ENTERED = _BELL + 8
"""The word (int64) where a rank says the first round of which call it has
entered while its peers may not all keep the boards (agree)."""
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
_FORGOTTEN = -1
"""A board's cookie once its rank took it out of use (forget; a cookie is
never negative): a peer that still uses it sets its own up again."""
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
        self.since = -ctx.tag       # the round that set the boards up (agree)
        self.pids, self.ranks = pids, ctx.g.ranks
        self.entered = self.mem[_ENTERED:_ENTERED + 8].view(np.int64)
        with _lock:     # (agree: at once where no member forgets them, else once every
            self.confirmed = ctx.g not in _forgettable    # peer has posted after that round)

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
_forgettable: "weakref.WeakSet[Comm]" = weakref.WeakSet()
_lock = threading.Lock()


def forgettable(g: Comm) -> None:
    """Say that ``g``'s boards may be forgotten by some members only (the
    host groups of collectives.host.hier, after a failed call that set them
    up): a choice that rests on whether its peers kept them waits for them
    to enter the call first (agree)."""
    with _lock:
        _forgettable.add(g)


def available(ctx: Ctx, payload: int = 0) -> bool:
    """Whether this group syncs through boards (a same-host group whose
    members may read each other) with room for ``payload`` bytes; sets the
    boards up on the first ask (messages under this collective's tag)."""
    if payload > CAPACITY or ctx.g.size == 1:
        return False
    with _lock:
        box = _boxes.get(ctx.g)
    if box is not None and not box.confirmed:
        agree(ctx, ctx.g, -ctx.tag)     # (so that every member reads the cookies below alike)
    if box is not None and any(box.seen_cookie[p][0] == _FORGOTTEN for p in box.peers):
        # a peer forgot them (its part of the call that set them up failed, after
        # this rank's ended well: collectives.host.hier.unsettle) and sets them up
        # again on this call, by messages (a probe first): so does this rank
        from . import tiny
        forget(ctx.g)
        tiny.forget(ctx.g)
        cma.forget(ctx.g)
        box = None
    if not cma.usable(ctx):
        return False
    if box is None:
        box = _Box(ctx)
        if not box.shared:  # a peer may read it across processes after this rank drops
            # the group: it stays until the mesh closes, and that waits for the peers
            # still reading it (reading their board, as they poll ours)
            ctx.ch.keep_alive(box, box.reading)
        with _lock:
            _boxes[ctx.g] = box
    return True


def forget(g: Comm) -> None:
    """Take ``g``'s boards out of use here (their memory stays for peers:
    in their mappings, or kept alive until the mesh closes): its next
    collective sets them up again, with the peers, as on its first. The
    cookie of this rank's board says so to a peer that still uses the
    boards: its next collective on ``g`` sets them up again too (available;
    what this rank posted there still holds for a peer's current call)."""
    with _lock:
        box = _boxes.pop(g, None)
    if box is not None:
        box.mem[:8].view(np.int64)[0] = _FORGOTTEN


def ready(g: Comm) -> bool:
    """Whether ``g``'s boards are set up (an earlier collective found them
    available): then a collective may use them without asking (no message)."""
    with _lock:
        return g in _boxes


def kept(g: Comm) -> bool:
    """Whether ``g``'s boards are set up here and no peer forgot them (its
    part of the call that set them up failed after this rank's ended well:
    collectives.host.hier.unsettle): a call whose form depends on the boards
    being up (one board round or three phases) takes the peer's, which sets
    them up again (available)."""
    with _lock:
        box = _boxes.get(g)
    return box is not None and all(box.seen_cookie[p][0] != _FORGOTTEN for p in box.peers)


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


# (Round and Quick read this module's names: imported once they are all defined)
from .quick import Quick  # noqa: E402
from .round import Round, announce  # noqa: E402
from .waiting import Stray, agree  # noqa: E402
