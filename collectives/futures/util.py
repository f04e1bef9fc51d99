"""mpi4py.futures' future helpers: ``collect(fs)``, one future of a list of
futures' results, and ``compose(future, resulthook, excepthook)``, a future
of a future's outcome passed through hooks. They take any concurrent.futures
Future (an executor's, or one made by hand), as mpi4py's."""
from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, Callable, Iterable

__all__ = ["collect", "compose"]


def collect(fs: Iterable[Future]) -> Future:
    """A future whose result is the list of ``fs``' results, in their order
    (a future named twice: its result twice), once all are done; the first
    exception among them is its exception, a cancelled one cancels it, and
    cancelling it cancels those of ``fs`` not done."""
    items = list(fs)
    if not items:
        out: Future = Future()
        out.set_result([])
        return out
    out = type(items[0])()
    places: dict[Future, list[int]] = {}
    for i, f in enumerate(items):
        places.setdefault(f, []).append(i)
    results: list[Any] = [None] * len(items)
    lock = threading.RLock()
    state = {"open": True}

    def settle(ok: bool, value: Any) -> None:
        """(the lock held) ``out`` given its outcome, once."""
        state["open"] = False
        if out.set_running_or_notify_cancel():
            if ok:
                out.set_result(value)
            else:
                out.set_exception(value)

    def one_done(f: Future) -> None:
        with lock:
            if not state["open"]:
                return
            if f.cancelled():
                state["open"] = False
                out.cancel()
                return
            exc = f.exception()
            if exc is not None:
                settle(False, exc)
                return
            for i in places.pop(f):
                results[i] = f.result()
            if not places:
                settle(True, results)

    def out_done(o: Future) -> None:
        with lock:
            state["open"] = False
            left = list(places)
        for f in left:
            f.cancel()
        if o.cancelled():
            o.set_running_or_notify_cancel()

    out.add_done_callback(out_done)
    for f in list(places):
        f.add_done_callback(one_done)
    return out


def compose(future: Future, resulthook: Callable[[Any], Any] | None = None,
            excepthook: Callable[[BaseException], Any] | None = None) -> Future:
    """A future done once ``future`` is: its result ``resulthook(result)``
    (or the result itself); if ``future`` failed, ``excepthook(exception)``,
    which is the new future's exception if it is one and else its result
    (no hook: the exception); a hook's own exception is the new future's.
    Cancelling either future cancels the other."""
    out = type(future)()

    def out_done(o: Future) -> None:
        if o.cancelled():
            o.set_running_or_notify_cancel()
            future.cancel()

    def in_done(f: Future) -> None:
        if f.cancelled():
            out.cancel()
            return
        try:
            exc = f.exception()
            if exc is None:
                value = f.result()
                out.set_result(resulthook(value) if resulthook else value)
                return
            why = excepthook(exc) if excepthook else exc
            if isinstance(why, BaseException):
                out.set_exception(why)
            else:
                out.set_result(why)
        except BaseException as e:
            out.set_exception(e)

    out.add_done_callback(out_done)
    future.add_done_callback(in_done)
    return out
