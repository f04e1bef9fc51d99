"""The torch Works the "meshrun" ProcessGroup (collectives.torchpg) returns:
a finished one (a synchronous call), one meshrun completes from its lane
(an asynchronous collective, its torch Future), and one over a mesh
point-to-point request.
"""
from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any, Callable

import torch.distributed as dist
from torch.futures import Future

from mesh import MeshTimeoutError

from .runner import blocking, looked_again

# torch's stubs overload these methods; the C++ trampoline calls ours by name
_Work: Any = dist.Work


class _Later:
    """A Work's result made only when it is asked for (_resolved):
    all_gather_into_tensor's, the output's rows as views, cost as much to
    make as the rest of a tiny call's own Python, and few callers read it."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


def _resolved(result: Any) -> Any:
    """``result``, made now where it is a _Later."""
    return result.make() if type(result) is _Later else result


class _Done(_Work):
    """The Work of a call that ran synchronously and succeeded (its errors
    raised from the call): nothing to wait for; a future only when asked.
    Made as ``_Done()`` then ``._result = value``: with no ``__init__`` of its
    own, torch's (C++) is the only one that runs (dist.all_reduce's 8 B path)."""

    _result: Any = None

    def wait(self, timeout: timedelta | None = None) -> bool:
        return True

    def get_future(self) -> Future:
        fut: Future = Future()
        fut.set_result(self.result())
        return fut

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True

    def exception(self) -> BaseException | None:
        return None

    def result(self) -> Any:
        if type(self._result) is _Later:
            self._result = self._result.make()
        return self._result


def _done(result: Any) -> _Done:
    w = _Done()
    w._result = result
    return w


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _unwrap(fut: Future) -> Any:
    value = fut.value()
    if isinstance(value, _Failed):
        raise value.error
    return value


class _FutureWork(_Work):
    """A torch Work that meshrun completes with ``finish``. Its future is a
    ``then`` of a plain one, so that an error is a real error to torch's
    C++ (DDP's reducer): ``Future.set_exception`` only stores the exception
    as the value, and torch's own future-wrapping Work returns from
    ``wait()`` even then. ``wait()`` raises the collective's own error."""

    def __init__(self) -> None:
        super().__init__()
        self._base: Future = Future()
        self._fut = self._base.then(_unwrap)
        self._error: BaseException | None = None
        self._finished = threading.Event()
        self.what = "Work.wait"     # the call, for a timeout ("rank 0: all_reduce #3 on ...")

    def finish(self, result: Any, error: BaseException | None) -> None:
        self._error = error
        self._base.set_result(result if error is None else _Failed(error))
        self._finished.set()

    def wait(self, timeout: timedelta | None = None) -> bool:
        """Until the operation is done (it carries the process group's
        timeout), or ``timeout``: then MeshTimeoutError, the operation
        going on (a later wait may still see it through), as gloo's."""
        secs = timeout.total_seconds() if timeout else 0.0
        if not self._finished.is_set():
            blocking()      # (in a done-callback of the lane: the lane goes on first)
        if secs > 0 and not self._finished.wait(secs):
            raise MeshTimeoutError(f"{self.what}: Work.wait: the operation did not complete "
                                   f"within {secs:g}s (the timeout given; it goes on)")
        try:
            # the future handed out (the base's ``then``), not the base alone: the base's
            # wait returns before its callbacks run, and ``work.wait();
            # work.get_future().value()`` raised torch's INTERNAL ASSERT (it is done
            # before callbacks of its own run, which may wait for this Work)
            self._fut.wait()
        except Exception:  # noqa: BLE001 - the collective's own error raises below
            pass
        if self._error is not None:
            raise self._error
        return True

    def get_future(self) -> Future:
        return self._fut

    def is_completed(self) -> bool:
        return looked_again(self._fut.done)     # (its lane may need the interpreter)

    def is_success(self) -> bool:
        return bool(self._fut.done()) and self._error is None

    def exception(self) -> BaseException | None:
        return self._error

    def result(self) -> Any:
        self.wait()
        return self._base.value()
