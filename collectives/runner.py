"""How one collective call runs: it takes the group's next tag in the calling
thread (so every member numbers its calls alike), tags every message with its
fingerprint, aborts the tag on every member if it fails, and runs either
inline or, with ``async_op=True``, on the group's lane: one background thread
per group that runs the group's collectives one after another, in call order.

A blocking call made while the lane still has work queues behind it, so
collectives on one group always complete in the order they were called.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from typing import Any, Callable

from mesh import ANY

from .plan import Tuning

__all__ = ["Ctx", "Work", "Body", "start", "agreed"]


Body = Callable[["Ctx"], Any]
_WATCH_S = 0.1
_WATCH_MAX = 64


class Ctx:
    """One collective call: its group, tag, fingerprint and tuning. The
    point-to-point helpers stamp every message with the fingerprint."""

    __slots__ = ("g", "tag", "fp", "tuning")

    def __init__(self, g: Any, tag: int, fp: dict, tuning: Tuning) -> None:
        self.g, self.tag, self.fp, self.tuning = g, tag, fp, tuning

    def isend(self, obj: Any, dst: int) -> Any:
        return self.g._isend(obj, dst, self.tag, fp=self.fp)

    def irecv(self, src: int, out: Any = None) -> Any:
        return self.g._irecv(src, self.tag, out, fp=self.fp)

    def send(self, obj: Any, dst: int) -> None:
        self.g._isend(obj, dst, self.tag, fp=self.fp).wait()

    def recv(self, src: int, out: Any = None) -> Any:
        return self.g._irecv(src, self.tag, out, fp=self.fp).wait()


class Work:
    """A collective in flight (``async_op=True``): ``wait()`` returns what the
    blocking call would have returned, or raises its error."""

    __slots__ = ("_event", "_value", "_error", "desc")

    def __init__(self, desc: str) -> None:
        self._event = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self.desc = desc

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> Any:
        if not self._event.wait(timeout):
            from mesh import MeshTimeoutError
            raise MeshTimeoutError(f"{self.desc} did not complete within {timeout:g}s")
        if self._error is not None:
            raise self._error
        return self._value

    def __repr__(self) -> str:
        return f"<Work {self.desc} {'done' if self.done() else 'pending'}>"

    def _finish(self, value: Any, error: BaseException | None) -> None:
        self._value, self._error = value, error
        self._event.set()


class _Group:
    """Per group: the lane (background executor; its thread lives while work
    is queued) and the watches of recent collectives with a root."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queue: deque[tuple[Callable[[], Any], Work]] = deque()
        self.busy = False
        self.watches: deque[tuple[int, float, Any]] = deque()
        self.calls = 0

    def submit(self, fn: Callable[[], Any], work: Work) -> None:
        with self.lock:
            self.queue.append((fn, work))
            if self.busy:
                return
            self.busy = True
        threading.Thread(target=self._drain, name="collectives-lane", daemon=True).start()

    def idle(self) -> bool:
        with self.lock:
            return not self.busy

    def _drain(self) -> None:
        while True:
            with self.lock:
                if not self.queue:
                    self.busy = False
                    return
                fn, work = self.queue.popleft()
            try:
                value, error = fn(), None
            except BaseException as e:
                value, error = None, e
            work._finish(value, error)

    def watch(self, ctx: Ctx) -> None:
        req = ctx.g._irecv(ANY, ctx.tag, fp=ctx.fp)
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
                    except BaseException as e:
                        found = found or e
                elif self.calls - call > 2 and now - t > _WATCH_S:
                    _withdraw(req)
                else:
                    keep.append((call, t, req))
            while len(keep) > _WATCH_MAX:
                _withdraw(keep.popleft()[2])
            self.watches = keep
        return found


def _withdraw(req: Any) -> None:
    try:
        req.wait(timeout=0)
    except BaseException:
        pass


_groups: "weakref.WeakKeyDictionary[Any, _Group]" = weakref.WeakKeyDictionary()
_groups_lock = threading.Lock()


def _state(g: Any) -> _Group:
    with _groups_lock:
        st = _groups.get(g)
        if st is None:
            st = _groups[g] = _Group()
        return st


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


def _abort(g: Any, tag: int, name: str, e: BaseException) -> None:
    """Fail the tag on every member; peers raise the same error class where
    the mesh carries it (mismatch, lost peer), else MeshError with the text."""
    g._abort(tag, f"{name} (collective #{-tag}) failed: {type(e).__name__}: {e}", error=type(e))


def start(g: Any, name: str, prepare: Callable[[Tuning], tuple[dict, Body]],
          async_op: bool) -> Any:
    """Run the group's next collective. ``prepare(tuning)`` checks the
    arguments and returns (fingerprint, body); ``body(ctx)`` moves the data.
    Both run under the collective's tag, so a rank that fails, even on its
    own arguments, aborts the collective on every member instead of leaving
    them waiting. Returns body's value, or a Work with ``async_op``."""
    tag = g._coll_tag()
    st = _state(g)
    try:
        late = st.check()
        if late is not None:
            raise type(late)(f"an earlier collective failed on a peer after it had finished "
                             f"here: {late}")
        tuning = Tuning.from_env()
        fp, body = prepare(tuning)
    except BaseException as e:
        _abort(g, tag, name, e)
        raise
    ctx = Ctx(g, tag, fp, tuning)

    def run() -> Any:
        try:
            return body(ctx)
        except BaseException as e:
            _abort(g, tag, name, e)
            raise

    if not async_op and st.idle():
        return run()
    work = Work(f"rank {g.rank}: {name} #{-tag} on group {getattr(g, 'name', '?')}")
    st.submit(run, work)
    return work if async_op else work.wait()
