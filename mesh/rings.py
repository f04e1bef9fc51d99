"""The same-host small-message path: a shared-memory ring per sender.

A message under MESH_RING_MAX bytes between two ranks of one host is not
put on the socket: the sender copies it into a ring in the receiver's
memory, and a receiver that is waiting sees it there within a microsecond
or two, where a socket costs a wake-up of ZeroMQ's I/O threads on each side
(an 8-byte round trip went from 238 to 84 us on the 2-core machine; what is
left is the Python of sending and delivering, BENCHMARKS.md).

Each rank owns one region, an anonymous memory file (memfd: nothing in
/dev/shm, gone with the last process that maps it, SIGKILL included):

    page 0     token (pid, random), WAKE, RING (its rings' size), BELL, AWAKE, RUNG
    CTL        per sender s: TAIL[s] (bytes it has written), OFF[s] (given up,
               full: the socket until the receiver reads again)
    HEADS      per sender s: HEAD[s] (bytes the receiver has read), HEARD[s]
               (its socket messages the receiver has read)
    DATA       per sender s: a ring of MESH_RING_BYTES

It tells each same-host peer where it is (RING x=[pid, fd, token]) over the
socket once, at start; the peer maps page 0 to the end of HEADS and its own
ring, by /proc/pid/fd/fd (allowed where the process may read the other's
memory: mesh.cma.allow_peers), and checks the token and RING: a region
whose rings are not the size of its own (MESH_RING_BYTES set otherwise on
that rank) has another layout, so it writes to that peer by socket instead
(its entries would land in another sender's ring), and says so.

An entry is [c, length] (two 64-bit words) and a one-frame message (wire's
inline form), 16-byte aligned; a length with WRAP set pads to the ring's end.
Above WRAP the length word may carry the sender's id for the entry's header
(``MARK`` times a number it never gives another header): a receiver that
took an entry with that word before knows the header without reading it
(mesh.reader.take); 0 there (the usual way's sends) says nothing.
The sender writes the entry, then TAIL, then BELL (a value never written
before: its tail and its rank), then reads AWAKE: a receiver spinning in a
receive sets AWAKE and sees BELL change; one that is not is woken by a byte
written to the region's wake pipe (WAKE is its descriptor, opened by the
sender through /proc like the region), unless one is there already (RUNG):
a pipe wakes a poll directly, where a message on the socket would wake
ZeroMQ's I/O thread on each side first. Only the thread holding the reading
turn (mesh.progress) polls that pipe, and it empties the pipe, clears RUNG
and then reads the rings (``woken``), so no wake-up is lost.

Order per (source, tag) across the two ways: the socket carries everything
the ring does not (large messages, the direct path's headers, control), and
both are one stream. Each sender counts the messages it put on the socket
to each peer (``Peer.sent``); an entry carries that count ``c``; the
receiver counts what it read from each peer's socket (``heard``) and takes
an entry only once ``heard >= c``, and before it takes a socket message it
takes the entries written before it.

The common case goes straight through, no generic machinery: a small
array is copied in by the sending thread, its header framed once per
(dtype, shape, group, tag) (``Transport.send_ring``: nothing to wait on),
and a blocking receive naming its source, with nothing posted or queued
before it, takes the entry out of the ring in its own thread
(``Transport.recv_ring``, ``peek``/``pop``: no posted receive, no
matching, no hand-off); whatever else comes first (a socket message,
another peer's entry, an unknown header) sends it the usual way.

A sender that finds the ring full (a stream outrunning its receiver)
waits for room as long as the receiver keeps reading (HEAD or HEARD
move): leaving for the socket a ring that is being drained would make the
next entries wait for socket messages, slower to read, and a stream would
fall into alternating the two. It spins while the receiver read in the
last 200 us and naps after that; once the receiver has read nothing for
10 ms (starved of CPU, stopped: a receiver that computes instead has its
progress thread drain its rings within a few milliseconds of its last
receive) the sender leaves the full ring (OFF) and sends by socket until
the receiver reads again, then waits for room as before, so the ring
never blocks a sender long on a receiver that is not reading; what it carries
is charged to the same credit window as the socket (mesh.peer), so flow
control is unchanged.

Ordering of plain loads and stores across the two processes: the x86
order (stores are seen in order) plus a full fence (``fence``, an atomic
read-modify-write in the lock) between a store and the load that must see
the other side's store (TAIL then AWAKE and RUNG; AWAKE or RUNG then TAIL);
a sender's fence is the release of its peer's lock, after ``put`` and
before ``bell``.
``MESH_SHM=0`` (on either side) turns the path off, with the direct path.
"""
from __future__ import annotations

import logging
import mmap
import os
import secrets
import threading
import time
from typing import Any, Callable

from .peer import config_bytes

__all__ = ["Rings", "LENGTH", "MARK", "MARKS", "WRAP", "enabled", "fence", "open_rings"]

_log = logging.getLogger("mesh.transport")
_PAGE = mmap.PAGESIZE
_WAKE, _RING, _BELL, _AWAKE, _RUNG = 2, 3, 8, 16, 24    # 64-bit word indices in page 0
_LINE = 8                      # words per cache line: one line per sender's counters
_OFF = 1                       # in that line after TAIL: the sender takes the socket for now
_WRAP = WRAP = 1 << 32        # (an entry's length word: padding to the ring's end)
LENGTH = WRAP - 1             # the length itself, in the word's low bits
MARK = 1 << 33                # the header's id, in units of MARK above them,
MARKS = 1 << 30               # from 1 to MARKS - 1 (0: no id)
_fence_lock = threading.Lock()
_SPIN = 200e-6     # a sender waiting for room spins while its receiver read this recently,
_NAP = 50e-6       # then sleeps this long between looks,
_WAIT = 10e-3      # and leaves the ring once the receiver has read nothing for this long
_HEARD = 1         # in a sender's HEADS line after HEAD: its socket messages read
_yield = os.sched_yield    # what a sender waiting for room does between looks


def fence() -> None:
    """A full memory fence: acquiring a lock is an atomic read-modify-write."""
    _fence_lock.acquire()
    _fence_lock.release()


def enabled() -> bool:
    from .direct import enabled as shm_on
    return shm_on() and hasattr(os, "memfd_create")


def open_rings(rank: int, size: int, same_host: list[int]) -> Rings | None:
    """Rank ``rank``'s rings, for the peers ``same_host``; None when there
    are none, the path is off, or this system will not make the region."""
    if not same_host or not enabled():
        return None
    try:
        return Rings(rank, size, same_host)
    except OSError as e:
        _log.info("rank %d: no same-host rings (%s); small messages take the socket", rank, e)
        return None


def default_ring(peers: int) -> int:
    """The ring's default size for ``peers`` same-host senders: 16 MiB of
    rings in all (pages are only touched by the bytes that pass), as a
    power of two between 256 KiB and 4 MiB, so that messages up to a
    quarter of it (1 MiB up to 5 ranks a host, 64 KiB from 64 on) are
    copied through it, eagerly, instead of read by the direct path after
    a socket message each way (BENCHMARKS.md, eleventh session)."""
    share = (16 << 20) // max(1, peers)
    return max(256 << 10, min(4 << 20, 1 << (share.bit_length() - 1)))


def config(peers: int) -> tuple[int, int]:
    """The ring's bytes (MESH_RING_BYTES, by default ``default_ring``) and
    the largest entry (MESH_RING_MAX); ValueError naming the variable for a
    bad one. Also called by mesh.world.check_config before the rendezvous:
    read only here, after it, a bad value failed one rank while its peers
    went on into the job."""
    ring = int(config_bytes("MESH_RING_BYTES", default_ring(peers)))
    if ring <= 0:     # (it made a one-page ring: no way to turn the rings off)
        raise ValueError(f"MESH_RING_BYTES={os.environ['MESH_RING_BYTES']!r}: must be at "
                         f"least 1 (MESH_SHM=0 turns the rings off)")
    ring = max(_PAGE, 1 << (ring - 1).bit_length())          # a power of two
    most = min(int(config_bytes("MESH_RING_MAX", ring // 4)), ring // 4,
               LENGTH)      # (an entry's length word holds no more)
    return ring, most


def _round(n: int) -> int:
    return -(-n // _PAGE) * _PAGE


class _Layout:
    def __init__(self, size: int, ring: int) -> None:
        self.ring = ring
        self.ctl = _PAGE                                  # TAIL[s]
        self.heads = self.ctl + _round(64 * size)         # HEAD[s]
        self.data = self.heads + _round(64 * size)        # the rings
        self.total = self.data + size * ring

    def slot(self, s: int) -> int:
        return self.data + s * self.ring


class _Out:
    """This rank's ring in one peer's region (the writing side)."""

    __slots__ = ("ctl", "q", "buf", "qd", "tail", "limit", "ti", "hi", "ring", "mask", "src",
                 "wake", "full", "left", "waits", "gave_up", "rung", "awake_rung", "starved")

    def __init__(self, fd: int, lay: _Layout, src: int) -> None:
        self.ctl = mmap.mmap(fd, lay.data)
        self.buf = mmap.mmap(fd, lay.ring, offset=lay.slot(src))
        self.q = memoryview(self.ctl).cast("Q")
        self.qd = memoryview(self.buf).cast("Q")
        self.awake_rung = self.q[_AWAKE:_RUNG + 1:_RUNG - _AWAKE]    # the receiver's two words
        self.ring, self.mask, self.src = lay.ring, lay.ring - 1, src
        self.ti = (lay.ctl >> 3) + _LINE * src
        self.hi = (lay.heads >> 3) + _LINE * src
        self.tail = self.q[self.ti]
        # entries may end up to here without a look at HEAD (the receiver's line,
        # written by it): the room seen at the last look, and the end of the ring's
        # lap; -1 while the ring is left full (``put``'s other way decides)
        self.limit = self.tail
        self.wake = -1             # the receiver's wake pipe, opened by Rings.attach
        self.full = False          # left full: the socket until the receiver reads again
        self.left = 0              # HEAD + HEARD when it was left
        self.waits = 0             # times a put found the ring full and waited for room
        self.gave_up = 0           # ... and left it for the socket (OFF)
        self.rung = 0              # doorbells written to the wake pipe
        self.starved = -1          # ``reads()`` when a sender last gave up waiting for
        #                            credit (mesh.transport._grants): not again until it moves

    def put(self, frame: Any, n: int, c: int, body: Any = None, nb: int = 0,
            word: int = 0) -> bool:
        """Write a one-frame message of ``n`` bytes (and ``nb`` more from
        ``body``: a header written once and an array's bytes, unjoined;
        ``word``: its length word with its header's id, MARK, when it has
        one); the caller then rings (``bell``) once its lock is released,
        a full fence. False when it does not
        fit: a full ring is waited on while the receiver keeps reading (a
        stream outruns its receiver), and left, once it has not for _WAIT,
        until the receiver reads again. The common case (room before the
        ring's end) is found here; the rest is ``_put_hard``'s, which says
        where to write (or -1: not now). A ``body`` whose buffer is not
        C-contiguous (numpy) raises ValueError before anything is published."""
        size = 16 + ((n + nb + 15) & ~15)
        tail = self.tail
        end = tail + size
        if end > self.limit:     # past the room seen, or the ring's end, or left full
            tail = self._put_hard(size)
            if tail < 0:
                return False
            end = tail + size
        off = tail & self.mask
        q = self.q
        qd, buf = self.qd, self.buf
        w = off >> 3
        qd[w] = c
        qd[w + 1] = word or n + nb
        off += 16
        buf[off:off + n] = frame
        if nb:
            try:
                buf[off + n:off + n + nb] = body
            except ValueError:      # (not C-contiguous) nothing published; ``limit`` may be
                self.limit = -1     # past a wrap ``tail`` has not made: looked at again
                raise
        self.tail = end       # published: TAIL, then BELL (the receiver woken by ``bell``)
        q[self.ti] = end
        q[_BELL] = end << 16 | self.src
        return True

    def bell(self) -> None:
        """After ``put`` and a full fence (the sender's lock released: an
        atomic read-modify-write), wake the receiver if it is not watching
        (AWAKE) and not rung already (RUNG): the fence orders our TAIL
        before these loads, as the receiver's orders AWAKE before TAIL."""
        awake_rung = self.awake_rung
        if not (awake_rung[0] or awake_rung[1]):
            self._ring_bell()

    def _put_hard(self, size: int) -> int:
        """``put`` past ``limit``: HEAD read again, then the tail at which
        to write an entry of ``size`` bytes (the ring full, left full, or
        wrapping: ``_room``, ``_wait``), and the new ``limit``; or -1."""
        tail = self.tail
        room = self.q[self.hi] + self.ring
        if not self.full and (tail & self.mask) + size <= self.ring and tail + size <= room:
            self.limit = min(room, tail - (tail & self.mask) + self.ring)
            return tail
        self.limit = -1
        was_full = self.full       # left full before (``_wait``)
        tail = self._room(size)
        if tail < 0:
            if was_full:
                if self.off():
                    return -1          # nothing read since: the socket
                self.full = False      # it reads again: back to the ring, waiting for room
                self.q[self.ti + _OFF] = 0
            tail = self._wait(size)
            if tail < 0:
                return -1
        # (room: HEAD as _room or _wait saw it; read again, it can only have grown)
        self.limit = min(self.q[self.hi] + self.ring, tail - (tail & self.mask) + self.ring)
        return tail

    def reads(self) -> int:
        """HEAD + HEARD: moves while the receiver reads from this sender."""
        q = self.q
        return q[self.hi] + q[self.hi + _HEARD]

    def off(self) -> bool:
        """Whether this ring was left full (``_wait``) and the receiver has
        read nothing since."""
        return self.full and self.reads() == self.left

    def _wait(self, size: int) -> int:
        """Wait for room as long as the receiver reads, this ring (HEAD) or
        this sender's socket messages that its entries wait for (HEARD):
        leaving a ring the receiver drains for the socket makes the next
        entries wait for socket messages, which are slower to read, so the
        stream falls into alternating the two (``await_reader``). One that
        has read nothing for _WAIT (computing, stopped, gone) is left
        alone: OFF, the socket until it reads again (``put``)."""
        self.waits += 1

        def room() -> int:
            self.full = False
            return self._room(size) + 1      # 0 while there is none
        tail, seen = self.await_reader(room)
        if tail:
            return tail - 1
        self.gave_up += 1
        self.left = seen
        self.q[self.ti + _OFF] = 1      # the receiver need not watch this ring for now
        return -1

    def await_reader(self, ready: Callable[[], Any]) -> tuple[Any, int]:
        """Call ``ready()`` until it gives a true value, for as long as the
        receiver keeps reading from this sender (HEAD or HEARD move): spin
        while it read within _SPIN, then nap (a receiver descheduled on a
        busy machine needs the CPU); once it has read nothing for _WAIT,
        stop. ``(ready()'s last value, HEAD + HEARD as last seen)``."""
        reads = self.reads
        seen = reads()
        clock = time.perf_counter
        now = moved = clock()
        while True:
            if now - moved < _SPIN:
                _yield()
            else:
                time.sleep(_NAP)
            got = ready()
            if got:
                return got, seen
            now = clock()
            read = reads()
            if read != seen:
                seen, moved = read, now
            elif now - moved >= _WAIT:
                return got, seen

    def _room(self, size: int) -> int:
        """Where an entry of ``size`` bytes goes (its tail, past the padding
        to the ring's end where it would wrap), or -1 (full: ``full`` set)."""
        tail, ring, q = self.tail, self.ring, self.q
        used = tail - q[self.hi]
        if self.full:       # left (``_wait``): ``put`` says when to come back to a
            if used:        # ring not empty yet; an empty one, at once
                return -1
            self.full = False
            q[self.ti + _OFF] = 0
        off = tail & self.mask
        if off + size > ring:               # pad to the end, start over at 0
            if ring - used < ring - off + size:
                self.full = True
                return -1
            self.qd[(off >> 3) + 1] = _WRAP
            tail += ring - off
        elif ring - used < size:
            self.full = True
            return -1
        return tail

    def _ring_bell(self) -> None:
        """Wake a receiver that is not watching (``put``, module docstring)."""
        self.q[_RUNG] = 1
        self.rung += 1
        try:
            os.write(self.wake, b"r")
        except OSError:      # full: it is awake already; gone: so is the peer
            pass

    def close(self) -> None:
        if self.wake >= 0:
            os.close(self.wake)
        self.awake_rung.release()
        self.q.release()
        self.qd.release()
        self.ctl.close()
        self.buf.close()


class Rings:
    """Rank ``rank``'s region (the receiving side) and its rings in the
    regions of the peers that told it theirs (the sending side)."""

    def __init__(self, rank: int, size: int, same_host: list[int]) -> None:
        self.rank = rank
        ring, self.max = config(len(same_host))
        self.lay = _Layout(size, ring)
        self.peers = same_host            # the slots that may be written
        self.out: list[_Out | None] = [None] * size
        self.fd = os.memfd_create(f"meshrun-rank{rank}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.lay.total)
        self._map = mmap.mmap(self.fd, self.lay.total)
        self._mv = memoryview(self._map)
        self.q = self._mv.cast("Q")
        self.token = (os.getpid(), secrets.randbits(62))
        self.q[0], self.q[1] = self.token
        self.q[_RING] = ring          # what a sender checks its own layout against (attach)
        self.awake_rung = self.q[_AWAKE:_RUNG + 1:_RUNG - _AWAKE]    # the two words, in place
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_w = wake_w
        self.q[_WAKE] = wake_w
        self.heads = self._heads = [0] * size      # per sender: what we have read
        self._last_bell = 0
        lay = self.lay       # per sender: its TAIL's and HEAD's words, its ring's offset
        self._tail_w = [(lay.ctl >> 3) + _LINE * s for s in range(size)]
        self._head_w = [(lay.heads >> 3) + _LINE * s for s in range(size)]
        self._base = [lay.slot(s) for s in range(size)]
        # the same, together, for a reader that peeks and pops inline (mesh.reader.take)
        self.where = list(zip(self._tail_w, self._head_w, self._base))
        self.ring, self.mask = lay.ring, lay.ring - 1
        self.end = lay.ring - 16      # no entry's bytes go past this offset of its ring
        self.next = 0        # the head after the entry ``peek`` gave
        self.at = 0          # where that entry's bytes are in ``map``
        self.map, self.mv = self._map, self._mv

    # ---- the sending side ----------------------------------------------------

    def attach(self, src: int, x: tuple[int, ...]) -> bool:
        """Map our ring in rank ``src``'s region, from its RING x=[pid, fd,
        token]; False (and the socket stays the way) when that fails, or when
        its rings are not the size of ours (unequal MESH_RING_BYTES: its
        layout is not ours, so our entries would land in another sender's
        ring there; it refuses ours alike)."""
        pid, fd, t0, t1 = x
        try:
            f = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            _log.debug("rank %d: rank %d's ring cannot be opened: %s", self.rank, src, e)
            return False
        try:
            head = os.pread(f, 8 * (_RING + 1), 0)
            if len(head) < 8 * (_RING + 1):
                raise ValueError(f"a region of {len(head)} bytes")
            token0, token1, _, theirs = memoryview(head).cast("Q")
            if (token0, token1) != (t0, t1):
                return False
            if theirs != self.lay.ring:
                _log.warning("rank %d: rank %d's same-host rings are MESH_RING_BYTES=%d there, "
                             "%d here (set unequally; rounded up to a power of two): messages "
                             "from rank %d to rank %d take the socket (set the same value on "
                             "every rank of a host)", self.rank, src, theirs, self.lay.ring,
                             self.rank, src)
                return False
            out = _Out(f, self.lay, self.rank)
        except (OSError, ValueError) as e:
            _log.debug("rank %d: rank %d's ring cannot be mapped: %s", self.rank, src, e)
            return False
        finally:
            os.close(f)
        try:
            out.wake = os.open(f"/proc/{pid}/fd/{out.q[_WAKE]}",
                               os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            _log.debug("rank %d: rank %d's wake pipe cannot be opened: %s", self.rank, src, e)
            out.close()
            return False
        self.out[src] = out
        return True

    # ---- the receiving side --------------------------------------------------

    def announce(self) -> tuple[int, int, int, int]:
        return (os.getpid(), self.fd, *self.token)

    def awake(self, on: bool) -> None:
        """Say whether a receive is watching the rings (no doorbells needed);
        after turning it off, ``fence`` and look once more before sleeping.
        Turning it on empties the wake pipe if a sender rang it: a byte left
        there would end the next spin at once, and the spin sets AWAKE."""
        q = self.q
        if on:
            q[_AWAKE] = 1
            if q[_RUNG]:
                self.woken()
        else:
            q[_AWAKE] = 0
            fence()

    def changed(self) -> bool:
        """Whether a sender wrote since the last ``drain_all``."""
        return self.q[_BELL] != self._last_bell

    def woken(self) -> None:
        """The wake pipe was readable: empty it and say so (RUNG), before
        the rings are read (``drain_all``), so a later sender writes again."""
        try:
            while os.read(self.wake_r, 4096):
                pass
        except OSError:
            pass
        self.q[_RUNG] = 0
        fence()

    def drain_all(self, heard: list[int], deliver: Callable[[int, memoryview], None],
                  until: Callable[[], bool] | None = None) -> int:
        """Deliver what every same-host peer's ring holds that may go now
        (until ``until()`` is true: then what is left reads as new, ``changed``)."""
        self._last_bell = self.q[_BELL]
        n = 0
        for s in self.peers:
            n += self.drain(s, heard[s], deliver, until)
            if until is not None and until():
                self._last_bell = -1
                break
        return n

    def drain(self, s: int, upto: int, deliver: Callable[[int, memoryview], None],
              until: Callable[[], bool] | None = None) -> int:
        """Deliver sender ``s``'s entries written before its socket message
        ``upto`` + 1 (until ``until()`` is true); the count delivered."""
        lay, q = self.lay, self.q
        head = self._heads[s]
        tail = q[(lay.ctl >> 3) + _LINE * s]
        if head == tail:
            return 0
        base, mask, ring = lay.slot(s), lay.ring - 1, lay.ring
        hi = (lay.heads >> 3) + _LINE * s
        mv = self._mv
        n = 0
        try:
            while head != tail:
                off = head & mask
                w = (base + off) >> 3
                length = q[w + 1]
                if length & _WRAP:
                    head += ring - off
                    continue
                length &= LENGTH
                if q[w] > upto:
                    break
                if length > ring - off - 16:
                    _log.warning("rank %d: rank %d's ring holds an entry of %d bytes at %d; "
                                 "dropped what is left", self.rank, s, length, off)
                    head = tail
                    break
                deliver(s, mv[base + off + 16:base + off + 16 + length])
                head += 16 + ((length + 15) & ~15)
                n += 1
                q[hi] = head
                if until is not None and until():
                    break
        finally:
            self._heads[s] = head
            q[hi] = head
        return n

    def peek(self, s: int, upto: int) -> int:
        """The length of sender ``s``'s next entry if it may be taken now
        (written before its socket message ``upto`` + 1), left in the ring
        until ``pop``; its bytes are ``map[at:at + length]``. 0 when there
        is none; -1 when the next must wait for the socket (or is
        malformed: ``drain`` says so)."""
        q = self.q
        head = self._heads[s]
        if head == q[self._tail_w[s]]:
            return 0
        ring = self.lay.ring
        off = head & (ring - 1)
        base = self._base[s]
        w = (base + off) >> 3
        length = q[w + 1]
        if length & _WRAP:
            head += ring - off
            self._heads[s] = q[self._head_w[s]] = head
            if head == q[self._tail_w[s]]:
                return 0
            off, w = 0, base >> 3
            length = q[w + 1]
        length &= LENGTH
        if q[w] > upto or length > ring - off - 16 or not length:
            return -1
        self.next = head + 16 + ((length + 15) & ~15)
        self.at = base + off + 16
        return length

    def watch(self, s: int) -> tuple[memoryview, int, list[int]]:
        """``(q, w, heads)``: sender ``s``'s ring holds an entry not read
        yet once ``q[w] != heads[s]`` (a load, for a spinning receive)."""
        return self.q, self._tail_w[s], self._heads

    def view(self, at: int, n: int) -> memoryview:
        """``n`` bytes of the region from ``at`` (an entry ``peek`` gave), in
        place: valid until ``pop``."""
        return self._mv[at:at + n]

    def heard(self, s: int, n: int) -> None:
        """Say (HEARD) that ``n`` of sender ``s``'s socket messages were read:
        a sender waiting for room in a full ring waits on while this moves."""
        self.q[self._head_w[s] + _HEARD] = n

    def off(self, s: int) -> bool:
        """Whether sender ``s`` left its full ring for the socket for now."""
        return bool(self.q[self._tail_w[s] + _OFF])

    def pop(self, s: int) -> None:
        """Move past the entry ``peek`` gave of sender ``s``."""
        self._heads[s] = self.q[self._head_w[s]] = self.next

    def holding(self, but: int) -> bool:
        """Whether a same-host peer other than ``but`` has entries not read yet."""
        q, heads, tails = self.q, self._heads, self._tail_w
        for s in self.peers:
            if s != but and q[tails[s]] != heads[s]:
                return True
        return False

    def close(self) -> None:
        for i, o in enumerate(self.out):
            if o is not None:
                o.close()
                self.out[i] = None
        self.awake_rung.release()
        self.q.release()
        self._mv.release()
        try:
            self._map.close()
        except BufferError:      # a view of a message still held: the mapping goes with it
            pass
        for fd in (self.fd, self.wake_r, self._wake_w):
            os.close(fd)
