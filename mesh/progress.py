"""Progress: which thread reads the socket, and how it waits.

One thread at a time reads the ROUTER, the one holding the reading turn
(``_rlock``). A caller blocked in a receive takes the turn itself (``drive``),
so a reply is read by the thread that wants it, with no hand-off between
threads; the progress thread (``_run``) reads only while nobody waits, and
steps aside as soon as someone does: a waiter raises ``_want`` and writes
to the wake pipe, which the progress thread also polls. Whoever reads
completes other threads' requests too; ``nudge`` wakes a reader after a
request was completed elsewhere (a cancel, an abort, a lost peer).

A blocking receive that only a same-host ring can answer (mesh.rings)
first takes the turn for a look of its own (``enter``, ``await_ring``,
``leave``): it watches that ring and takes its message straight out, and
leaves the rest (the socket, other rings) to ``drive``.

A blocked receive polls (yielding the CPU) up to MESH_SPIN_US before it
sleeps: waking a sleeping (virtual) CPU for a socket costs tens of
microseconds, often more than the wait itself, so a short poll catches a
reply already on its way, as MPI libraries do. The spin adapts to the waits
seen (``_adapt_spin``), so long waits do not burn CPU.

While a caller drives, the progress thread naps (``_NAP``), and naps
longer and longer (up to ``_PARK``) while that caller keeps driving and
nothing waits on background reading (``busy``): each wake takes the GIL
from the caller. Posting a receive or a send that goes the socket's way
wakes it (``unpark``); a caller that stops driving is noticed within a nap.

The progress thread also runs liveness: its timer tick, which first reads
the monitors (one per peer, so they are not polled on every wake: a wake
costs the same in any world; a closed connection is seen within a tick).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from functools import partial
from typing import Any, Callable, Protocol

import zmq

from .liveness import Liveness
from .match import DONE, Flag, Several
from .peer import config_float
from .reader import Reader

__all__ = ["ASIDE", "Progress", "adapt_spin"]

# A spin gives the CPU away (sched_yield) only after this long: on a busy
# machine each yield can cost a time slice to another process
_BUSY = 30e-6
# A receive spinning on one ring (``await_ring``) looks at the socket and the
# other rings this often: a poll costs microseconds, a look at the ring a load
_POLL = 20e-6
# How long the progress thread stays aside after a caller gave back the
# reading turn (it would take the turn, and the next receive wait for it)
ASIDE = 0.002
# The progress thread's nap while a caller holds the reading turn (or held
# it a moment ago), and the longest it grows to while that caller keeps
# driving and nothing waits on the background (``_run``): each wake takes
# the GIL from the caller, a few microseconds of its round trip
_NAP = 0.005
_PARK = 0.05

_log = logging.getLogger("mesh.transport")


class Settles(Protocol):
    """What ``Progress.drive`` may wait on besides a Flag."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float) -> bool: ...


def adapt_spin(now: float, waited: float, most: float) -> float:
    """The next spin of a waiter that spun ``now`` seconds and waited
    ``waited``, like adaptive halt polling: a wait longer than the longest
    spin ``most`` halves it (long waits, big messages, a loaded machine:
    polling would only take CPU from the threads that move the data or the
    peer waited for); a short wait that the spin missed doubles it, up to
    ``most``."""
    if waited > most:
        return now / 2 if now > 5e-6 else 0.0
    if waited > now:
        return min(most, max(2 * now, 10e-6))
    return now


class Progress:
    """The reading turn over ``router``, the wake pipe and the progress thread."""

    def __init__(self, router: zmq.Socket, rank: int) -> None:
        self.rank = rank
        self.spin = config_float("MESH_SPIN_US", 200.0, least=0) * 1e-6
        self._spin_now = self.spin     # adapted to the waits seen (_adapt_spin)
        self._router = router
        self._rlock = self.turn = threading.Lock()    # the reading turn
        self._want_lock = threading.Lock()
        self._want = 0                        # callers waiting in drive
        self._progress_reading = False        # the progress thread holds the turn
        self.aside_until = 0.0
        self.took = 0      # receives that gave the turn back (``Transport.recv_ring``): each
        # keeps the progress thread aside for ASIDE from when it sees the count move
        self._parked = False                  # napping past _NAP: ``unpark`` wakes it
        self.closing = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._reader_items: list[Any] = [(router, zmq.POLLIN), (self._wake_r, zmq.POLLIN)]
        self._thread: threading.Thread | None = None

    def start(self, reader: Reader, live: Liveness, busy: Callable[[], bool]) -> None:
        """Start the progress thread, reading with ``reader``, watching with
        ``live``; ``busy()``: whether anything posted or in flight waits on
        its reading (then it naps no longer than _NAP while callers drive)."""
        self._read_one, self._live, self._busy = reader.read_one, live, busy
        self._read_rings, self._rings = reader.read_rings, reader.rings
        self._settle = reader.settle       # credit owed, granted before sleeping
        self._forget_lost = reader.forget_lost
        # mesh.streams: reads done, to deliver; their pipe, polled by the reading turn
        # only (one the progress thread emptied while aside woke no reader)
        self._finished, self._streams_r = reader.finished, reader.streams_fd
        if self._streams_r >= 0:
            self._reader_items.append((self._streams_r, zmq.POLLIN))
        # while spinning, the rings are looked at directly, not through their pipe
        self._spin_items = list(self._reader_items)
        if self._rings is not None:     # its wake pipe: polled by the reading turn only
            self._reader_items.append((self._rings.wake_r, zmq.POLLIN))
        self._thread = threading.Thread(target=self._run, name=f"mesh-progress-{self.rank}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> bool:
        """Stop the progress thread, take the reading turn from the callers
        still reading (their waits failed: Inbox.fail_posted; a second at
        most) and close the wake pipe. True: the turn is held, for the
        caller to give back once it has closed the sockets those callers
        polled (libzmq aborted the process when a socket was closed under
        another thread's poll)."""
        self.closing = True
        if self._thread is not None:
            try:
                os.write(self._wake_w, b"c")    # not a poll interval later
            except OSError:
                pass
            self._thread.join(timeout=5)
        held = self._rlock.acquire(timeout=1.0)
        os.close(self._wake_r)
        os.close(self._wake_w)
        return held

    def drive(self, item: Any, deadline: float, limit: float,
              flag: Flag | Settles | None = None, doing: Several | None = None) -> bool:
        """Wait for ``item`` (a Pending; or until ``flag`` is set: an
        Outgoing's, or mesh.completion.waitany's, set once any of its requests
        is) by reading the ROUTER in this thread (see the module
        docstring); stall reports every MESH_STALL_WARN. False on timeout.
        ``doing``: what the wait is, where it is more than ``item`` (waitany's
        requests, all of them): what heartbeats, stall reports and a stopped
        rank's word of where it waits say."""
        with self._want_lock:
            self._want += 1
            if self._progress_reading:
                os.write(self._wake_w, b"w")
        live = self._live
        start = deadline - limit
        warn_at = start + live.stall_warn
        what = item if doing is None else doing
        live.doing, live.doing_since = what, start
        held = False
        polled = 0.0
        rings = self._rings
        until = partial(self._done, item, flag)   # what the rings deliver past that stays there
        try:
            while (item.state != DONE) if flag is None else not flag.is_set():
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    return False
                if now >= warn_at:
                    live.stalled_on(what, now - start, deadline - start)
                    warn_at = now + live.stall_warn
                if not held:
                    held = self._rlock.acquire(timeout=min(left, 0.002))
                    if not held:       # another waiter reads; it completes us too
                        (item.event if flag is None else flag).wait(min(left, 0.002))
                        continue
                ready = None
                if not polled:
                    polled = time.perf_counter()
                    if rings is not None:   # the rings too (mesh.rings): watched while spinning
                        rings.awake(True)
                        if self._read_rings(False, until) and until():
                            continue
                    if self._spin_now:    # poll a little before sleeping (module docstring)
                        spin_end = polled + self._spin_now
                        yield_at = polled + _BUSY
                        while True:
                            ready = zmq.zmq_poll(self._spin_items, 0)
                            now = time.perf_counter()
                            if ready or now >= spin_end:
                                break
                            if rings is not None:   # a ring costs a load to look at,
                                for _ in range(32):  # the socket a system call
                                    if rings.changed():
                                        break
                                if rings.changed():
                                    self._read_rings(False, until)
                                    if until():
                                        break
                            if now >= yield_at:
                                os.sched_yield()
                    if rings is not None:     # asleep from here: senders ring the doorbell
                        rings.awake(False)
                        if self._read_rings(False, until) and until():
                            continue
                    if not ready and until():
                        continue
                elif rings is not None and self._read_rings(False, until) and until():
                    continue
                if not ready:
                    self._settle()
                    ready = zmq.zmq_poll(self._reader_items, int(min(left, 0.05) * 1000))
                if ready:
                    if len(ready) > 1 or ready[0][0] is not self._router:
                        if self._woken(ready, until) and until():
                            continue
                    for _ in range(1024):
                        if not self._read_one() or (item.state == DONE if flag is None
                                                    else flag.is_set()):
                            break
            if polled and self.spin:
                self._adapt_spin(time.perf_counter() - polled)
            return True
        finally:
            # AWAKE stays set: the next receive, or the progress thread when it
            # takes the turn (within aside_until), clears it before sleeping
            if held:
                self._rlock.release()
            end = time.monotonic()
            # (its description only: the item would hold its data, or its error's frames)
            live.doing, live.last, live.last_end = None, item._desc, end
            with self._want_lock:
                self._want -= 1
                if self._want == 0:
                    self.aside_until = end + ASIDE

    def reading_here(self) -> bool:
        """Whether the calling thread is the progress thread."""
        return self._thread is threading.current_thread()

    def enter(self, behind_callers: bool = True) -> int:
        """Take the reading turn for a receive's first look (``await_ring``):
        at once when free (1), else the way ``drive`` does (2); 0 when
        another waiter keeps it (then ``drive``). ``leave`` with the answer.
        ``behind_callers`` false (a poll: Transport.poke): -1 at once when
        a caller, not the progress thread, holds the turn (it reads for
        every thread, and keeps the turn until its own wait ends)."""
        rings = self._rings     # (none: Transport.poke on a mesh without same-host peers)
        if self._rlock.acquire(False):
            if rings is not None:
                rings.awake(True)
            return 1
        with self._want_lock:
            if not (behind_callers or self._progress_reading):
                return -1
            self._want += 1
            if self._progress_reading:
                os.write(self._wake_w, b"w")
        if not self._rlock.acquire(timeout=0.002):
            return 0
        if rings is not None:
            rings.awake(True)
        return 2

    def leave(self, entered: int) -> None:
        """Give back the turn ``enter`` took; AWAKE stays set (see ``drive``),
        and the progress thread stays aside a while, as after ``drive``."""
        if entered == 1:
            self._rlock.release()
            self.aside_until = time.monotonic() + ASIDE
            return
        if entered < 0:
            return
        if entered:
            self._rlock.release()
        with self._want_lock:
            self._want -= 1
            if self._want == 0:
                self.aside_until = time.monotonic() + ASIDE

    def await_ring(self, take: Callable[[int, int, int, Any], Any], src: int, group: int,
                   tag: int, out: Any) -> Any:
        """Between ``enter`` and ``leave``, once ``take(src, group, tag, out)``
        (mesh.reader.take) found rank ``src``'s ring empty: wait up to the
        adapted spin for the message only that ring can bring, taken by this
        thread with nothing posted nor handed over; None when the spin ran
        out, or something else came first (the socket, another peer's ring,
        a message for the usual way): the caller then posts its receive and
        ``drive``s."""
        if not self._spin_now:
            return None
        rings = self._rings
        assert rings is not None
        q, tail, heads = rings.watch(src)     # that ring has an entry once q[tail] != heads[src]
        head = heads[src]     # (moved only by a take that succeeds, which returns)
        items = self._spin_items
        clock = time.perf_counter
        start = clock()
        end, yield_at, poll_at = start + self._spin_now, start + _BUSY, start
        while True:
            for _ in range(64):
                if q[tail] != head:
                    r = take(src, group, tag, out)    # (no *args: a call the loop inlines)
                    if r is not None:
                        return r or None
            now = clock()
            if now >= end:
                return None
            if now >= poll_at:      # a system call, where the ring is a load: now and then
                if zmq.zmq_poll(items, 0) or rings.holding(src):
                    return None
                poll_at = now + _POLL
            if now >= yield_at:
                os.sched_yield()

    def _woken(self, ready: list, until: Callable[[], bool] | None = None) -> int:
        """Empty the wake pipes that woke a poll (``ready``); when the rings'
        did, read the rings (mesh.rings; until ``until()``, for a waiting
        receive): the count of messages delivered."""
        n = 0
        for fd, _ in ready:
            if fd == self._wake_r:
                self._drain_wake()
            elif fd == self._streams_r:
                self._drain_wake(fd)
            elif self._rings is not None and fd == self._rings.wake_r:
                self._rings.woken()
                n += self._read_rings(True, until)
        return n

    @staticmethod
    def _done(item: Any, flag: Flag | Settles | None) -> bool:
        return item.state == DONE if flag is None else flag.is_set()

    def _adapt_spin(self, waited: float) -> None:
        self._spin_now = adapt_spin(self._spin_now, waited, self.spin)

    def nudge(self) -> None:
        """Wake a thread blocked reading, after completing a request elsewhere."""
        if self._want:
            try:
                os.write(self._wake_w, b"n")
            except OSError:
                pass

    def unpark(self) -> None:
        """Something now waits on background reading (a receive posted, a
        send in flight): wake the progress thread if it naps long."""
        if self._parked:
            self._parked = False
            try:
                os.write(self._wake_w, b"u")
            except OSError:
                pass

    def _drain_wake(self, fd: int = -1) -> None:
        try:
            os.read(self._wake_r if fd < 0 else fd, 4096)
        except (BlockingIOError, OSError):
            pass

    def _run(self) -> None:
        """Read when no caller is waiting; always watch monitors and timers."""
        live = self._live
        reading, aside, watch = zmq.Poller(), zmq.Poller(), zmq.Poller()
        reading.register(self._router, zmq.POLLIN)
        if self._rings is not None:
            reading.register(self._rings.wake_r, zmq.POLLIN)
        if self._streams_r >= 0:
            reading.register(self._streams_r, zmq.POLLIN)
        for poller in (reading, aside):
            poller.register(self._wake_r, zmq.POLLIN)
        for m in live.monitors:     # one per peer: read on the timer, not on every wake
            watch.register(m, zmq.POLLIN)
        held = False
        next_tick = 0.0
        nap = _NAP
        took = self.took
        while not self.closing:
            try:
                if not held and not self._want:
                    now = time.monotonic()
                    if self.took != took:     # a receive gave the turn back since the last look
                        took = self.took
                        self.aside_until = max(self.aside_until, now + ASIDE)
                    if now >= self.aside_until:
                        held = self._rlock.acquire(timeout=0.05)
                with self._want_lock:
                    if held and self._want:
                        self._rlock.release()
                        held = False
                    self._progress_reading = held
                if held and self._rings is not None:    # asleep in poll: wake me (mesh.rings)
                    self._rings.awake(False)
                    self._read_rings()
                    self._settle()
                if held:
                    events = dict(reading.poll(100))
                    nap = _NAP
                else:   # a caller drives: park while it keeps driving (``unpark``)
                    self._parked = True     # before asking: a post after it unparks
                    if self._busy():
                        self._parked, nap = False, _NAP
                    else:
                        nap = min(2 * nap, _PARK)
                    until_tick = next_tick - time.monotonic()     # liveness's timer: on time
                    events = dict(aside.poll(max(0, int(min(nap, until_tick) * 1000)) + 1))
                    self._parked = False
                if self._wake_r in events:
                    self._drain_wake()
                    nap = _NAP
                if held and self._rings is not None and self._rings.wake_r in events:
                    self._rings.woken()
                    self._read_rings(True)
                if held and self._streams_r in events:
                    self._drain_wake(self._streams_r)
                if held and (self._router in events or self._finished):
                    for _ in range(1024):
                        if self._want or not self._read_one():
                            break
                now = time.monotonic()
                if now >= next_tick:
                    for m, _ in watch.poll(0):
                        live.on_monitor(m)
                    live.tick(now)
                    if held:
                        self._forget_lost()
                    next_tick = now + min(live.heartbeat, 0.25)
            except zmq.ZMQError as e:
                if self.closing or e.errno == zmq.ETERM:
                    break
                _log.exception("rank %d: progress thread error", self.rank)
            except Exception:
                _log.exception("rank %d: progress thread error", self.rank)
        if held:
            self._rlock.release()
