"""How one collective call runs: it takes the group's next tag in the calling
thread (so every member numbers its calls alike), tags every message with its
fingerprint, aborts the tag on every member if it fails, and runs either
inline or, with ``async_op=True``, on the group's lane: one background thread
per group that runs the group's collectives one after another, in call order.

A blocking call made while the lane still has work queues behind it, so
collectives on one group always complete in the order they were called.

A call's ``timeout`` bounds the whole call (a deadline set when it is made),
on every path: each wait inside it gets what is left. A call that runs out
of time raises MeshTimeoutError and aborts its tag on every member, so each
raises too (a MeshTimeoutError naming the rank that timed out) and nothing
is left running; ``Work.wait(timeout)`` running out does the same.
"""
from __future__ import annotations

import logging
import math
import numbers
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable

from mesh import ANY, AbortKind, Comm, LostPeerError, MeshError, MeshTimeoutError
from mesh.match import Flag

from .plan import Tuning

__all__ = ["Ctx", "Work", "Body", "start", "now", "NOT_NOW", "abandon", "agreed", "check_comm",
           "caught", "where", "named", "release", "blocking", "abort_kind", "abort_now",
           "run_by_waiter", "post", "Posted"]


Body = Callable[["Ctx"], Any]
_log = logging.getLogger("collectives")
_WATCH_S = 0.1
_LINGER_S = 0.5
_WATCH_MAX = 64


def check_comm(g: Comm | None, name: str) -> None:
    """A clear error for a communicator that is None: ``world.group(ranks)``
    returns None on the ranks that are not in ``ranks``."""
    if isinstance(g, Comm):
        return
    from mesh.world import rank_said        # (the process's mesh names the rank)
    who = rank_said()
    if g is None:
        raise TypeError(f"{who}{name}: the communicator is None; world.group(ranks) returns "
                        f"None on ranks that are not members of the group, and only members "
                        f"may call its collectives")
    kind = type(g).__name__
    if hasattr(g, "axes") and hasattr(g, "group"):
        hint = "a mesh.Grid: pass the group of one of its axes, grid.group('dp')"
    elif any("ProcessGroup" in c.__name__ for c in type(g).__mro__):
        hint = ("a torch.distributed group: collectives.torchdist.comm_of(group) is its "
                "meshrun communicator (on the 'meshrun' backend)")
    else:
        hint = f"{'an' if kind[:1] in 'aeiouAEIOU' else 'a'} {kind}"
    raise TypeError(f"{who}{name}: the communicator is {hint}; collectives take a meshrun "
                    f"communicator (mesh.init()'s world, world.group(ranks), grid.group(axis))")


def caught(req: Any, timeout: float) -> BaseException | None:
    """Wait up to ``timeout`` for a receive posted on a collective's tag
    only to catch an abort; the error that failed it, or None if it timed
    out (an abort for a timeout is a MeshTimeoutError too: ``done()`` tells
    them apart) or a message came."""
    try:
        req.wait(timeout)
    except MeshTimeoutError as e:
        return e if req.done() else None
    except BaseException as e:
        return e
    return None


def where(g: Comm, name: str, tag: int) -> str:
    """How errors name a collective: this rank (its world rank), the
    collective, its sequence number and its group."""
    return f"rank {g.ranks[g.rank]}: {name} #{-tag} on group {g.name}"


def named(g: Comm, r: int, word: str = "rank") -> str:
    """Group rank ``r`` as errors name it inside a message: ``rank 1`` (or
    ``root 1``: ``word``), with its world rank beside it where the two
    differ (``rank 1 (world rank 3)``, as mesh names a sub-group's peer), so
    that a reader of a sub-group's error never takes one numbering for the
    other; and with its host where that is not this rank's (``rank 1
    (world rank 3, on host node-b, pid 4242)``: mesh.peer.named)."""
    return g._t.named(g.ranks[r], word, r)


class Ctx:
    """One collective call: its group, the group's channel to the mesh, tag,
    fingerprint, tuning and deadline. The point-to-point helpers stamp every
    message with the fingerprint, and their requests wait at most until the
    deadline."""

    __slots__ = ("g", "ch", "tag", "fp", "tuning", "name", "timeout", "deadline")

    def __init__(self, g: Comm, tag: int, fp: dict, tuning: Tuning, name: str = "collective",
                 timeout: float | None = None, deadline: float | None = None) -> None:
        self.g, self.tag, self.fp, self.tuning, self.name = g, tag, fp, tuning, name
        self.ch = g.collective_channel()
        self.timeout = float(g.timeout) if timeout is None else float(timeout)
        self.deadline = time.monotonic() + self.timeout if deadline is None else deadline

    def where(self) -> str:
        """``rank 2: all_reduce #5 on group world/[1, 2]`` (see ``where``)."""
        return where(self.g, self.name, self.tag)

    def left(self) -> float:
        """Seconds left before the call's deadline (0 once past)."""
        return max(0.0, self.deadline - time.monotonic())

    def timed_out(self, waiting: str) -> MeshTimeoutError:
        return MeshTimeoutError(f"{self.where()} timed out after {self.timeout:g}s{waiting}")

    def isend(self, obj: Any, dst: int, fp: dict | None = None) -> "Req":
        """Send ``obj`` to ``dst`` on the call's tag; ``fp``: the call's
        fingerprint as this message carries it, when it differs by peer
        (the receiver's irecv passes what it expects of this one)."""
        return Req(self, self.ch.isend(obj, dst, self.tag, self.fp if fp is None else fp,
                                       self.name))

    def irecv(self, src: int, out: Any = None, fp: dict | None = None) -> "Req":
        return Req(self, self.ch.irecv(src, self.tag, self.fp if fp is None else fp,
                                       self.name, out))

    def watch(self, src: int = ANY) -> Any:
        """A receive from any rank (or rank ``src``) on the call's tag,
        posted only to catch an abort (no member sends one there)."""
        return self.ch.watch(self.tag, self.fp, self.name, src)

    def send(self, obj: Any, dst: int) -> None:
        self.isend(obj, dst).wait()

    def recv(self, src: int, out: Any = None) -> Any:
        return self.irecv(src, out).wait()


class Req:
    """A collective's point-to-point request: ``wait()`` is bounded by the
    call's deadline, and its timeout names the call."""

    __slots__ = ("ctx", "req")

    def __init__(self, ctx: Ctx, req: Any) -> None:
        self.ctx, self.req = ctx, req

    def done(self) -> bool:
        return bool(self.req.done())

    def wait(self) -> Any:
        try:
            return self.req.wait(self.ctx.left())
        except MeshTimeoutError as e:
            if self.req.done():      # failed, not timed out: a peer's timeout aborted the call
                raise
            text, here = str(e), self.ctx.where()
            inner = text[len(here) + 2:] if text.startswith(here + ": ") else text
            raise self.ctx.timed_out(f"; last wait: {inner}") from None


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


def agreed(body: Body) -> Body:
    """``body`` wrapped for a collective with a root, where some ranks only
    send (a broadcast root, a gather leaf) and a rank given another root
    could wait forever for a message nobody sends. Each rank first sends
    its fingerprint to its right neighbour and expects its left one's, so
    any disagreement is seen by some rank, which aborts the others; and a
    rank that finished before that abort reached it raises it at the
    group's next collective (a receive stays posted on the tag a while)."""
    def run(ctx: Ctx) -> Any:
        n = ctx.g.size
        if n == 1:
            return body(ctx)
        hello = ctx.irecv((ctx.g.rank - 1) % n)
        sent = ctx.isend(None, (ctx.g.rank + 1) % n)
        value = body(ctx)
        hello.wait()
        sent.wait()
        _state(ctx.g).watch(ctx)
        return value
    return run


def abort_kind(g: Comm, e: BaseException) -> tuple[AbortKind, int | None]:
    """The kind of abort ``e`` makes (the error class its peers raise) and
    the lost peer it names (a world rank). A KeyboardInterrupt or SystemExit
    (Ctrl-C, a signal handler's exit) is this rank leaving the call, and
    mostly the job: its peers raise LostPeerError naming it, as they do
    once its process is gone, not a plain MeshError (the interrupted rank
    itself raises the interrupt as it is)."""
    if not isinstance(e, Exception):
        return AbortKind.LOST_PEER, g.ranks[g.rank]
    return AbortKind.of(e), getattr(e, "peer", None)


def _abort(g: Comm, tag: int, name: str, e: BaseException) -> None:
    """Fail the tag on every member; peers raise the same error class where
    the mesh carries it (mismatch, lost peer, timeout), else MeshError with
    the text."""
    text, here = str(e), where(g, name, tag)
    if text.startswith(here):    # it names this collective: drop "rank N: ", the abort says it
        text = text[here.index(": ") + 2:]
    else:
        text = f"{name} #{-tag} failed: {type(e).__name__}" + (f": {text}" if text else "")
    g.collective_channel().abort(tag, text, *abort_kind(g, e))


def abort_now(ctx: Ctx, e: BaseException) -> None:
    """Abort ``ctx``'s call on every member for ``e`` now, which this rank
    is about to raise from a step its peers watch on the board (a user op's
    ``fn``: collectives.shm.local_fold): their waits then find the abort
    itself, not only that this rank has left the round. The abort the
    call's failure makes (``_failed``) finds it made, and sends nothing."""
    _abort(ctx.g, ctx.tag, ctx.name, e)


def _failed(g: Comm, tag: int, name: str, e: BaseException) -> BaseException:
    """What a call that failed with ``e`` raises, once its tag is aborted on
    every member: ``e``, but for a peer lost to it (its goodbye, its error)
    after a member had aborted the call: then that abort (a mismatch naming
    both calls, a timeout, another peer lost). The lost peer passed the abort
    on before its goodbye, on the same connection, so it is in by now; a peer
    that closed its mesh without one is still gone. (An abort for the loss
    of that same peer: this rank's own error says it, first hand.)"""
    if isinstance(e, LostPeerError) and not getattr(e, "from_abort", False):
        err = g.collective_channel().aborted(tag, where(g, name, tag).split(": ", 1)[1])
        if err is not None and getattr(err, "from_abort", False) and not (
                isinstance(err, LostPeerError) and err.peer in (None, e.peer)):
            return err
    _abort(g, tag, name, e)
    return e


def abandon(g: Comm, reason: str, kind: AbortKind = AbortKind.OTHER,
            peer: int | None = None) -> None:
    """Fail the group's next collective on every member without making it:
    for a rank that will not make a call its peers make (a failed pipeline
    step's all-reduces), so the peers raise instead of waiting, with
    ``kind``'s error (a lost peer naming world rank ``peer``), and the
    group's calls stay numbered alike on every rank."""
    check_comm(g, "abandon")
    ch = g.collective_channel()
    ch.abort(ch.next_tag(), reason, kind, peer)


def _limit(g: Comm, name: str, timeout: Any) -> float:
    if timeout is None:
        return float(g.timeout)
    if type(timeout) is float and timeout >= 0:     # (numbers.Real's check costs a microsecond)
        return timeout
    limit = float(timeout) if isinstance(timeout, numbers.Real) else -1.0
    if isinstance(timeout, bool) or not limit >= 0:
        raise ValueError(f"{name}: timeout must be a number of seconds >= 0 or None, "
                         f"got {timeout!r}")
    return limit


def _name_the_call(e: BaseException, g: Comm, name: str) -> None:
    """Put the rank, the call and the group in front of a local check's
    message (a ValueError or TypeError of the caller's arguments)."""
    if type(e) not in (ValueError, TypeError) or not e.args or not isinstance(e.args[0], str):
        return
    said: str = e.args[0]
    if said.startswith("rank "):
        return
    head = f"rank {g.ranks[g.rank]}: {name} on group {g.name}"    # (the world rank)
    said = head + said[len(name):] if said.startswith((name + ": ", name + " ")) else \
        f"{head}: {said}"
    e.args = (said, *e.args[1:])


def start(g: Comm, name: str, prepare: Callable[[Tuning], tuple[dict, Body]],
          async_op: bool, timeout: float | None = None,
          skipped: Callable[[BaseException, int], None] | None = None) -> Any:
    """Run the group's next collective. ``prepare(tuning)`` checks the
    arguments and returns (fingerprint, body); ``body(ctx)`` moves the data.
    Both run under the collective's tag, so a rank that fails, even on its
    own arguments, aborts the collective on every member instead of leaving
    them waiting. ``timeout`` (default: the group's) bounds the whole call,
    from now. ``skipped(error, tag)`` is called when the call (its ``tag``)
    fails on this rank before its body runs (its own arguments, a peer's abort or the deadline
    came first): a body that would have run collectives on sub-groups
    (collectives.host.hier) fails them there too. Returns body's value, or
    a Work with ``async_op``."""
    check_comm(g, name)
    t0 = time.monotonic()
    ch = g.collective_channel()
    st = _state(g)
    me = threading.get_ident()
    if me in _lanes:
        return _start(g, name, prepare, async_op, timeout, skipped, t0, ch, st, None)
    other = st.enter(me)
    try:
        return _start(g, name, prepare, async_op, timeout, skipped, t0, ch, st, other)
    finally:
        st.leave(me)


def _two_threads(g: Comm, name: str, other: int) -> MeshError:
    them = next((t.name for t in threading.enumerate() if t.ident == other), str(other))
    return MeshError(
        f"rank {g.ranks[g.rank]}: {name} on group {g.name} called from thread "
        f"{threading.current_thread().name!r} while thread {them!r} is in a collective "
        f"on this group: one group's collectives must come from one thread at a time, in "
        f"the same order on every rank (give each thread a group of its own: world.group "
        f"or world.split)")


def _start(g: Comm, name: str, prepare: Callable[[Tuning], tuple[dict, Body]],
           async_op: bool, timeout: float | None,
           skipped: Callable[[BaseException, int], None] | None, t0: float, ch: Any, st: _Group,
           other: int | None) -> Any:
    if st.posted is not None:
        st.posted.to_lane()     # (ahead of this call, as it was made before it)
    tag = ch.next_tag()
    try:
        if other is not None:
            raise _two_threads(g, name, other)
        limit = _limit(g, name, timeout)
        late = st.check()
        if late is not None:
            raise type(late)(f"an earlier collective failed on a peer after it had finished "
                             f"here: {late}")
        tuning = Tuning.from_env()
        fp, body = prepare(tuning)
    except BaseException as e:
        _name_the_call(e, g, name)
        _abort(g, tag, name, e)
        if skipped is not None:
            if st.idle():
                skipped(e, tag)
            else:   # after the calls queued before this one: they take the sub-groups' tags first
                later, err = skipped, e
                st.submit(lambda: later(err, tag), Work(f"{name}: failing its sub-groups' phases"))
        raise
    deadline = t0 + limit
    ctx = Ctx(g, tag, fp, tuning, name, limit, deadline)

    def run() -> Any:
        try:
            aborted = ch.aborted(tag, ctx.where().split(": ", 1)[1])
            if aborted is None and time.monotonic() > deadline:
                aborted = ctx.timed_out(" before it started (" + (
                    "timeout=0" if limit == 0 else
                    "queued behind the group's earlier collectives") + ")")
            if aborted is not None:     # a peer gave up on it before this rank got here
                if skipped is not None:
                    skipped(aborted, tag)
                raise aborted
            return body(ctx)
        except BaseException as e:
            err = _failed(g, tag, name, e)
            if err is e:
                raise
            raise err from None

    if not async_op and st.idle():
        return run()
    work = Work(ctx.where(), lambda e: _abort(g, tag, name, e))
    if async_op and _waiter.on:
        work._lane = st
    st.submit(run, work)
    if async_op:
        return work
    try:
        return work.wait(max(0.0, deadline - time.monotonic()))
    except BaseException as e:
        if not isinstance(e, Exception) and not work._event.is_set():
            # A blocking call queued behind the lane, its wait interrupted (Ctrl-C's
            # KeyboardInterrupt, a signal handler's SystemExit): aborted, as one run
            # here is, so the lane skips it (or its waits there fail) and the peers
            # raise LostPeerError naming this rank. Left queued, it ran after the
            # caller had the interrupt: the peers' results took this rank's tensors,
            # written into them after the call had raised
            _abort(g, tag, name, e)
        raise


class _Waiter(threading.local):
    on = False


_waiter = _Waiter()
"""``.on``: this thread's async calls now are a persistent collective's
start (run_by_waiter)."""


def run_by_waiter(call: Callable[[], Any]) -> Any:
    """``call()``: a persistent collective's start (collectives.persistent),
    an ``async_op=True`` call whose Work its ``wait()`` (with no timeout)
    runs in the waiting thread where the lane has not begun it yet
    (_Group.run_here). The lane is handed the call all the same, so that
    it completes without a wait (a rank that starts it and then blocks in
    a receive its peers send only once theirs is done)."""
    _waiter.on = True
    try:
        return call()
    finally:
        _waiter.on = False


NOT_NOW = object()
"""What ``now`` returns when the call must take ``start`` (no tag was taken)."""


def now(g: Comm, name: str, fp: dict, tuning: Tuning, step: Callable[[int, Any], Body | None],
        arg: Any, timeout: float | None = None) -> Any:
    """``start`` for a blocking call whose arguments an earlier call with the
    same fingerprint has checked (collectives.shm.tiny): the group's next
    tag, the deadline, and on failure the abort on every member, as
    ``start`` does, without its preparation. ``step(tag, arg)`` runs the
    call as far as it can without a Ctx (no long wait): None once it is
    done, else the Body that finishes it, run with the call's Ctx (its
    deadline counted from this call). NOT_NOW, with no tag taken, while
    the group's lane has work or watches (the call then takes ``start``,
    which orders it behind them and reports what they caught)."""
    st = _groups.get(g)     # (made by the first call, which took ``start``)
    if st is None or st.watches or st.running or st.queue or st.former or st.user is not None \
            or st.posted is not None:
        return NOT_NOW      # (another thread in a call: start says so)
    me = threading.get_ident()
    mine = me not in _lanes
    if mine:
        st.user = me    # (as _Group.enter, without its check: done just above)
    t0 = time.monotonic()
    ch = g.collective_channel()
    tag = ch.next_tag()
    st.calls += 1
    try:
        if ch.aborted(tag, "") is not None:      # (the text made only when it is)
            raise ch.aborted(tag, f"{name} #{-tag} on group {g.name}")  # type: ignore[misc]
        rest = step(tag, arg)
        if rest is None:
            return None
        limit = float(g.timeout) if timeout is None else timeout
        return rest(Ctx(g, tag, fp, tuning, name, limit, t0 + limit))
    except BaseException as e:
        err = _failed(g, tag, name, e)
        if err is e:
            raise
        raise err from None
    finally:
        if mine and st.user == me:      # (_Group.leave, inline: the short path's cost)
            st.user = None


class Posted:
    """A persistent collective's start that took its tag and posted this
    rank's part where its peers read it (collectives.shm.tiny's board:
    ``post``), its rest (``finish``: reading theirs) left to its wait, as
    MPI's start may leave it; made by ``post``. The peers need nothing
    more of it to finish theirs (only a later call's post into its slot
    waits for its ack), so the rest runs in the waiting thread (``run``,
    as runner.now's step), unless the group's next call comes first,
    which hands it to the lane ahead of itself (``to_lane``: a Work, as an
    async call's)."""

    __slots__ = ("g", "st", "tag", "name", "fp", "tuning", "finish", "arg", "posted", "t0",
                 "limit", "work", "done_with", "ended", "error")

    def __init__(self, g: Comm, st: _Group, tag: int, name: str, fp: dict, tuning: Tuning,
                 finish: Callable[[int, Any, bool], Body | None], arg: Any, posted: bool,
                 t0: float, limit: float,
                 done_with: Callable[[BaseException | None], None]) -> None:
        self.g, self.st, self.tag, self.name, self.fp = g, st, tag, name, fp
        self.tuning, self.finish, self.arg, self.posted = tuning, finish, arg, posted
        self.t0, self.limit = t0, limit
        self.work: Work | None = None
        self.done_with = done_with      # (told once the call is done: its error or None)
        self.ended = Flag()     # (set once a wait has run the rest: run)
        self.error: BaseException | None = None

    def _claim(self, here: bool = False) -> bool:
        """Whether this thread takes the rest (the group holds it still);
        ``here``: to run it, the lane kept aside meanwhile (as run_here's)."""
        st = self.st
        with st.lock:
            if st.posted is not self:
                return False
            st.posted = None
            st.running = here
            return True

    def run(self) -> Any:
        """The rest, here: its value (raised: its error, the call aborted on
        every member); where the lane has it, its Work's wait (another
        thread's wait running it: that one's end)."""
        if not self._claim(True):
            if self.work is not None:
                return self.work.wait()
            self.ended.wait()
            if self.error is not None:
                raise self.error
            return self.arg
        st = self.st
        try:
            value = self._rest()
        except BaseException as e:
            self.error = e
            raise
        finally:
            with st.lock:
                st.running = False
                st.wake.notify()    # (the lane, for the calls queued meanwhile)
            self.ended.set()
            self.done_with(self.error)
        return value

    def _rest(self) -> Any:
        g, tag, name = self.g, self.tag, self.name
        try:
            rest = self.finish(tag, self.arg, self.posted)
            if rest is not None:
                rest(Ctx(g, tag, self.fp, self.tuning, name, self.limit, self.t0 + self.limit))
            return self.arg
        except BaseException as e:
            err = _failed(g, tag, name, e)
            if err is e:
                raise
            raise err from None

    def to_lane(self) -> Work | None:
        """Hand the rest to the group's lane (the group's next call comes,
        a test or waitany asks): the Work that runs it, or None where a
        wait runs it already."""
        if self._claim():
            work = self.work = Work(where(self.g, self.name, self.tag),
                                    lambda e: _abort(self.g, self.tag, self.name, e))
            work.add_done_callback(lambda w: self.done_with(w._error))
            self.st.submit(self._rest, work)
        return self.work


def post(g: Comm, name: str, fp: dict, tuning: Tuning, step: Callable[[int, Any], bool],
         finish: Callable[[int, Any, bool], Body | None], arg: Any, timeout: float | None,
         done_with: Callable[[BaseException | None], None]) -> Any:
    """``now``'s, for a persistent collective's start (collectives.persistent)
    whose plan posts without waiting: the group's next tag, ``step(tag,
    arg)`` (False: nothing posted, and the rest goes to the lane at once,
    for the peers wait for this rank's post), and a Posted whose ``run``
    (the wait's) finishes it: ``finish(tag, arg, posted)``, None once
    done, else the Body that finishes it with the call's Ctx. NOT_NOW, with no tag
    taken, where ``now`` gives it (the start then takes ``start``)."""
    st = _groups.get(g)
    if st is None or st.watches or st.running or st.queue or st.former or st.user is not None \
            or st.posted is not None:
        return NOT_NOW
    me = threading.get_ident()
    if me in _lanes:
        return NOT_NOW
    st.user = me
    try:
        t0 = time.monotonic()
        ch = g.collective_channel()
        tag = ch.next_tag()
        st.calls += 1
        limit = float(g.timeout) if timeout is None else timeout
        try:
            if ch.aborted(tag, "") is not None:
                raise ch.aborted(tag, f"{name} #{-tag} on group {g.name}")  # type: ignore[misc]
            posted = step(tag, arg)
        except BaseException as e:
            err = _failed(g, tag, name, e)
            if err is e:
                raise
            raise err from None
        p = Posted(g, st, tag, name, fp, tuning, finish, arg, posted, t0, limit, done_with)
        st.posted = p
        if not posted:
            p.to_lane()
        return p
    finally:
        if st.user == me:
            st.user = None
