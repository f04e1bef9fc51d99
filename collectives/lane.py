"""A group's lane: the one background thread per group that runs its
``async_op=True`` collectives one after another, in call order (``_Group``;
its thread lingers ``_LINGER_S`` for the next call), a call in flight as the
caller holds it (``Work``), and the watches of recent collectives with a
root, whose late aborts the group's next call raises. collectives.runner,
which takes a call's tag and runs it inline or here, re-exports ``Work``,
``release``, ``blocking`` and ``looked_again``.
"""
from __future__ import annotations

import logging
import math
import numbers
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from mesh import Comm, LostPeerError, MeshTimeoutError

if TYPE_CHECKING:
    from .runner import Ctx, Posted

__all__ = ["Work", "release", "blocking", "looked_again"]

_log = logging.getLogger("collectives")
_WATCH_S = 0.1
_LINGER_S = 0.5
_WATCH_MAX = 64


class Work:
    """A collective in flight (``async_op=True``): ``wait()`` returns what the
    blocking call would have returned, or raises its error. A ``wait`` that
    runs out of time aborts the collective on every member."""

    __slots__ = ("_event", "_value", "_error", "desc", "_abort", "_callbacks", "_then",
                 "_lane")

    def __init__(self, desc: str, abort: Callable[[BaseException], None] | None = None) -> None:
        self._event = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self.desc = desc
        self._abort = abort
        self._callbacks: list[Callable[["Work"], None]] = []
        self._then: Any = None      # settle_with's fn; _SETTLED once the lane is past it
        self._lane: _Group | None = None    # the lane whose queue its waiter may take it from

    def settle_with(self, fn: Callable[[Any], None]) -> bool:
        """Make ``fn(value)`` the last step of the call, in the lane before
        the call is done (a float16 average's result copied back into the
        caller's array: written as the call completes, before the group's
        next call can start, as a call on the caller's own memory writes it;
        an error it raises is the call's). False, ``fn`` not taken, once
        the call is past that point: the caller then runs it after
        ``wait()``."""
        with _callbacks_lock:
            if self._then is _SETTLED:
                return False
            self._then = fn
            return True

    def _settle(self, value: Any) -> None:
        """(the lane, right after the body) ``settle_with``'s fn, if given."""
        with _callbacks_lock:
            fn, self._then = self._then, _SETTLED
        if fn is not None:
            fn(value)

    def add_done_callback(self, fn: Callable[["Work"], None]) -> None:
        """Call ``fn(self)`` once the collective has finished, in the thread
        that finishes it (the group's lane), or at once here if it has
        (collectives.torchdist completes torch futures this way). An
        exception ``fn`` raises is logged, never raised."""
        with _callbacks_lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        _call(fn, self)

    def done(self) -> bool:
        """Whether it has finished. A caller polling this in a loop of its
        own held the interpreter from the group's lane, which runs the
        collective, between switch intervals (an 8-byte all_reduce polled so
        took 27 ms, waited for 0.17): each look that finds it running lets
        the other threads have the interpreter first."""
        return looked_again(self._event.is_set)

    def wait(self, timeout: float | None = None) -> Any:
        if timeout is not None:
            timeout = _wait_limit(self.desc, timeout)
        if not self._event.is_set():
            blocking()
            if self._lane is not None and timeout is None:
                self._lane.run_here(self)
        if not self._event.wait(timeout) and not self._event.is_set():
            e = MeshTimeoutError(f"{self.desc} timed out after {timeout:g}s (in Work.wait); "
                                 f"aborted on every member")
            if self._abort is not None:
                self._abort(e)
            raise e
        if self._error is not None:
            raise self._error
        return self._value

    def __repr__(self) -> str:
        return f"<Work {self.desc} {'done' if self._event.is_set() else 'pending'}>"

    def _finish(self, value: Any, error: BaseException | None) -> None:
        self._value, self._error = value, error
        self._lane = None
        with _callbacks_lock:
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            _call(fn, self)


_callbacks_lock = threading.Lock()
_SETTLED = object()


def _wait_limit(desc: str, timeout: Any) -> float | None:
    """``Work.wait``'s ``timeout``: seconds >= 0 (math.inf: no limit), as
    the calls' own ``timeout=``; anything else raises ValueError before the
    wait, the call left running (-1 or NaN ran out at once and aborted the
    call on every member, "timed out after -1s"; math.inf raised
    OverflowError, a timedelta or a string a TypeError naming nothing)."""
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) \
            or not float(timeout) >= 0:
        raise ValueError(f"{desc}: Work.wait: timeout must be a number of seconds >= 0 or "
                         f"None, got {timeout!r}")
    return None if math.isinf(timeout) else float(timeout)


def looked_again(finished: Callable[[], bool]) -> bool:
    """``finished()``, asked again once the other threads have had the
    interpreter where it says no (``Work.done``, torch's ``is_completed``):
    a loop polling a collective keeps its lane from running otherwise."""
    if finished():
        return True
    time.sleep(0)
    return finished()


def _call(fn: Callable[[Work], None], work: Work) -> None:
    try:
        fn(work)
    except BaseException:       # (a SystemExit too: the lane must go on)
        _log.exception("a done-callback of %s failed", work.desc)


_lane = threading.local()
"""``.group``: the _Group whose done-callbacks this lane thread is running."""
_lanes: set[int] = set()
"""The idents of the lane threads alive (their calls are not a user's)."""


def blocking() -> None:
    """Called before waiting for a collective (Work.wait, torch's Work): in
    a done-callback the lane runs, the lane goes on in a new thread first,
    so that a call queued on it (before the callback, or by another thread
    meanwhile) does not wait behind the callback that waits for it."""
    st = getattr(_lane, "group", None)
    if st is not None:
        st.hand_on()


class _Group:
    """Per group: the lane (background executor; its thread stays _LINGER_S
    after its queue empties, for the next async call, e.g. DDP's next
    bucket: starting a thread per call costs more than the call at small
    sizes) and the watches of recent collectives with a root."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.queue: deque[tuple[Callable[[], Any], Work]] = deque()
        self.busy = False       # a lane thread exists
        self.running = False    # it runs a collective
        self.stop = False       # it should exit once the queue is empty
        self.thread: threading.Thread | None = None
        self.watches: deque[tuple[int, float, Any]] = deque()
        self.calls = 0
        # lane threads that handed the lane on and still run a done-callback: a
        # blocking call they make queues (run inline it could meet the new lane's)
        self.former: set[threading.Thread] = set()
        # the thread (not a lane's) in a call on this group: a second thread's
        # call would take the group's tags in an order the other ranks need
        # not share (their data crossed, or a hang)
        self.user: int | None = None     # (a thread's ident)
        # a persistent start that has posted on the board and is finished by its wait
        # (Posted): the group's next call hands it to the lane first, ahead of itself
        self.posted: Posted | None = None

    def enter(self, me: int) -> int | None:
        """Thread ``me`` (not a lane's: bodies and done-callbacks are not
        counted) starts a call: None, or the other thread already in a call
        on this group. No lock: two threads that come at once may both go
        on (a later call catches them), and ``user`` is cleared only by the
        thread it names, so it never names one that has left."""
        user = self.user
        if user is not None and user != me:
            return user
        self.user = me
        return None

    def leave(self, me: int) -> None:
        if self.user == me:
            self.user = None

    def submit(self, fn: Callable[[], Any], work: Work) -> None:
        with self.lock:
            self.queue.append((fn, work))
            self.stop = False
            if self.busy and (self.running or self.thread is not threading.current_thread()):
                self.wake.notify()
                return
            # A call made by a done-callback this lane runs (a torch future's
            # ``then``) would wait behind that callback for ever: the lane goes
            # on in a new thread, and this one ends when the callback returns.
            self._new_lane()

    def hand_on(self) -> None:
        """The lane thread, in a done-callback, is about to wait (blocking):
        the lane goes on in a new thread; this one ends when the callback
        returns."""
        with self.lock:
            if self.thread is threading.current_thread():
                self._new_lane()

    def _new_lane(self) -> None:
        """A new lane thread (the lock held); the one it replaces, running a
        done-callback, joins ``former`` until that returns."""
        if self.busy and self.thread is not None:
            self.former.add(self.thread)
        self.busy = True
        self.thread = threading.Thread(target=self._drain, name="collectives-lane",
                                       daemon=True)
        self.thread.start()

    def idle(self) -> bool:
        """No collective queued or running on the lane (a blocking call may run inline)."""
        with self.lock:
            return not self.queue and not self.running and not self.former

    def run_here(self, work: Work) -> None:
        """(``work.wait()``, a persistent collective's start: run_by_waiter)
        Run ``work`` in the waiting thread, as a blocking call runs, where
        the lane has not begun it and it is next in the queue (what was
        queued before it runs first): the lane's hand-off (its thread woken,
        the waiter woken back) cost a tiny call more than the call itself.
        The lane, woken for it, lingers on (_serve)."""
        if threading.get_ident() in _lanes:
            return
        with self.lock:
            if self.running or self.former or not self.queue or self.queue[0][1] is not work:
                return
            fn = self.queue.popleft()[0]
            self.running = True
        try:
            value, error = fn(), None
            work._settle(value)
        except BaseException as e:      # (the call's error, or an interrupt: wait raises it)
            value, error = None, e
        with self.lock:
            self.running = False
            self.wake.notify()      # (the lane, for what was queued behind it)
        work._finish(value, error)

    def forget(self) -> None:
        """The group is dropped or its mesh closed: no watch is kept (the
        inbox has withdrawn or failed their receives), the lane ends."""
        with self.lock:
            self.watches.clear()
        self.release(0)

    def release(self, timeout: float = 5.0) -> None:
        """Let the lane thread exit as soon as its queue is empty, and wait for it."""
        with self.lock:
            self.stop = True
            self.wake.notify()
            thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _drain(self) -> None:
        me = threading.current_thread()
        _lanes.add(threading.get_ident())
        try:
            self._serve(me)
        finally:
            _lanes.discard(threading.get_ident())

    def _serve(self, me: threading.Thread) -> None:
        while True:
            with self.lock:
                if self.thread is not me:       # handed on (submit)
                    self.former.discard(me)
                    return
                until = time.monotonic() + _LINGER_S
                while True:
                    if self.running:    # a waiter runs the queue's next call (run_here)
                        self.wake.wait()
                        continue
                    left = until - time.monotonic()
                    if self.queue or self.stop or left <= 0:
                        break
                    self.wake.wait(left)    # (woken for a call its waiter took: lingers on)
                if not self.queue:
                    self.busy = self.running = False
                    self.thread = None
                    return
                fn, work = self.queue.popleft()
                self.running = True
            try:
                value, error = fn(), None
                work._settle(value)
            except BaseException as e:
                value, error = None, e
            with self.lock:
                self.running = False
            _lane.group = self
            try:
                work._finish(value, error)
            finally:
                _lane.group = None
            del fn, work, value, error      # a lingering lane keeps no call's arrays alive

    def watch(self, ctx: Ctx) -> None:
        req = ctx.watch()
        with self.lock:
            self.watches.append((self.calls, time.monotonic(), req))

    def check(self) -> BaseException | None:
        """Called as each collective starts: the error a watch caught, if any.
        A watch is withdrawn once two more collectives have started and an
        abort would have had time to arrive (_WATCH_S), or when too many
        are kept."""
        with self.lock:
            self.calls += 1
            now = time.monotonic()
            found: BaseException | None = None
            keep: deque[tuple[int, float, Any]] = deque()
            for call, t, req in self.watches:
                if req.done():
                    try:
                        req.wait()
                    except MeshTimeoutError:
                        # (a peer timed out in a call this rank finished, its result
                        # whole: the others raised it there; raised here it would
                        # fail whichever later call it arrived before, everywhere)
                        pass
                    except LostPeerError as e:
                        # a peer lost here since (not a peer's abort of that call): the
                        # call that starts now names it (Channel.aborted), where this
                        # said "an earlier collective failed on a peer" of one that
                        # had not, and its error lost the peer
                        if getattr(e, "from_abort", False):
                            found = found or e
                    except BaseException as e:
                        found = found or e
                elif self.calls - call > 2 and now - t > _WATCH_S:
                    req.withdraw()
                else:
                    keep.append((call, t, req))
            while len(keep) > _WATCH_MAX:
                keep.popleft()[2].withdraw()
            self.watches = keep
        return found


_groups: "weakref.WeakKeyDictionary[Comm, _Group]" = weakref.WeakKeyDictionary()
_groups_lock = threading.Lock()


def _state(g: Comm) -> _Group:
    ch = g.collective_channel()
    ch.sweep()      # groups dropped since: their watches withdrawn, their lanes ended
    with _groups_lock:
        st = _groups.get(g)
        if st is None:
            st = _groups[g] = _Group()
            # (a dropped group's entry goes with it.) Its watches hold the mesh's
            # transport: when the group is dropped, or the mesh closes first (the
            # world lives as long as the mesh object), they go and the lane ends.
            ch.on_drop(st.forget)
        return st


def release(g: Comm, timeout: float = 5.0) -> None:
    """Let the group's lane thread exit once its queued collectives are done
    (instead of lingering for the next), and wait up to ``timeout`` for it:
    for an owner that is done with the group (torch's destroy_process_group)."""
    with _groups_lock:
        st = _groups.get(g)
    if st is not None:
        st.release(timeout)
