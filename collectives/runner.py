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

The lane itself, and ``Work``, are collectives.lane's (re-exported here).
"""
from __future__ import annotations

import numbers
import threading
import time
from typing import Any, Callable

from mesh import ANY, AbortKind, Comm, LostPeerError, MeshError, MeshTimeoutError
from mesh.match import Flag

from .lane import Work, _Group, _groups, _lanes, _state, blocking, looked_again, release
from .plan import Tuning

__all__ = ["Ctx", "Work", "Body", "start", "now", "NOT_NOW", "abandon", "agreed", "check_comm",
           "caught", "where", "named", "release", "blocking", "abort_kind", "abort_now",
           "run_by_waiter", "post", "Posted", "looked_again"]


Body = Callable[["Ctx"], Any]


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
