"""mpi4py.util.pool over collectives.futures: multiprocessing.pool's interface
(``Pool``: MPIPoolExecutor's worker processes; ``ThreadPool``: threads),
with ``apply``, ``apply_async``, ``map``, ``map_async``, ``imap``,
``imap_unordered``, ``starmap``, ``starmap_async``, ``istarmap``,
``istarmap_unordered``, ``close``, ``terminate``, ``join``, and the results
``AsyncResult``, ``ApplyResult``, ``MapResult``, as mpi4py 4's. Its functions
go to the workers as collectives.futures sends them: by reference (a
module's function, or the main script's), arguments msgpack and arrays."""
from __future__ import annotations

import operator
import os
import threading
import warnings
from concurrent.futures import CancelledError, Future
from typing import Any, Callable, Iterable, Iterator

from .. import futures

__all__ = ["Pool", "ThreadPool", "AsyncResult", "ApplyResult", "MapResult"]


class AsyncResult:
    """multiprocessing's AsyncResult over a Future (``future``)."""

    def __init__(self, future: Future, callback: Callable[[Any], Any] | None = None,
                 error_callback: Callable[[BaseException], Any] | None = None) -> None:
        self.future = future
        self._event = threading.Event()

        def done(f: Future) -> None:
            try:
                try:
                    exc = f.exception()
                except CancelledError:
                    exc = TimeoutError()
                if exc is not None:
                    if error_callback is not None:
                        error_callback(exc)
                elif callback is not None:
                    callback(f.result())
            finally:
                self._event.set()
        future.add_done_callback(done)

    def get(self, timeout: float | None = None) -> Any:
        """The result (its exception raised), or TimeoutError past ``timeout``."""
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        try:
            return self.future.result()
        except CancelledError:
            raise TimeoutError from None

    def wait(self, timeout: float | None = None) -> None:
        """Until it is ready, or ``timeout`` seconds."""
        self._event.wait(timeout)

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        """Whether it completed without an exception (ValueError: not ready)."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        try:
            return self.future.exception() is None
        except CancelledError:
            return False


class ApplyResult(AsyncResult):
    """``apply_async``'s result."""


class MapResult(AsyncResult):
    """``map_async``'s and ``starmap_async``'s result."""


class Pool:
    """multiprocessing.Pool over an MPIPoolExecutor of ``processes`` workers
    (the other keywords are its own); ``maxtasksperchild`` and ``context``
    are not used (a UserWarning, as mpi4py's)."""

    Executor: Any = futures.MPIPoolExecutor

    def __init__(self, processes: int | None = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple = (),
                 **kwargs: Any) -> None:
        if processes is not None and processes < 1:
            raise ValueError("number of processes must be at least 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        for name in ("maxtasksperchild", "context"):
            if kwargs.pop(name, None) is not None:
                warnings.warn(f"argument {name!r} is not supported", stacklevel=2)
        self.executor = self.Executor(processes, initializer=initializer, initargs=initargs,
                                      **kwargs)
        self._helper: Any = None
        self._helper_lock = threading.Lock()

    def _workers(self) -> int:
        return int(getattr(self.executor, "_max_workers", 0) or
                   getattr(self.executor, "_workers", 0) or 0)

    def _chunks(self, iterable: Iterable[Any], chunksize: int | None) -> tuple[Any, int]:
        """multiprocessing's default chunksize: about 4 chunks a worker."""
        if chunksize is not None:
            return iterable, chunksize
        workers = self._workers()
        if workers <= 0:
            return iterable, 1
        n = operator.length_hint(iterable)
        if n == 0:
            iterable = list(iterable)
            n = len(iterable)
        return iterable, max(1, -(-n // (4 * workers)))

    def _async(self) -> Any:
        """The threads that drain an ``*_async`` map's iterator."""
        with self._helper_lock:
            if self._helper is None:
                self._helper = futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1))
            return self._helper

    def apply(self, func: Callable[..., Any], args: tuple = (), kwds: dict | None = None) -> Any:
        """``func(*args, **kwds)`` on a worker; its result."""
        return self.executor.submit(func, *args, **(kwds or {})).result()

    def apply_async(self, func: Callable[..., Any], args: tuple = (), kwds: dict | None = None,
                    callback: Callable[[Any], Any] | None = None,
                    error_callback: Callable[[BaseException], Any] | None = None
                    ) -> ApplyResult:
        return ApplyResult(self.executor.submit(func, *args, **(kwds or {})), callback,
                           error_callback)

    def map(self, func: Callable[..., Any], iterable: Iterable[Any],
            chunksize: int | None = None) -> list[Any]:
        """``list(map(func, iterable))`` on the workers."""
        iterable, chunksize = self._chunks(iterable, chunksize)
        return list(self.imap(func, iterable, chunksize))

    def map_async(self, func: Callable[..., Any], iterable: Iterable[Any],
                  chunksize: int | None = None, callback: Callable[[Any], Any] | None = None,
                  error_callback: Callable[[BaseException], Any] | None = None) -> MapResult:
        iterable, chunksize = self._chunks(iterable, chunksize)
        results = self.imap(func, iterable, chunksize)
        return MapResult(self._async().submit(list, results), callback, error_callback)

    def imap(self, func: Callable[..., Any], iterable: Iterable[Any],
             chunksize: int = 1) -> Iterator[Any]:
        return self.executor.map(func, iterable, chunksize=chunksize)

    def imap_unordered(self, func: Callable[..., Any], iterable: Iterable[Any],
                       chunksize: int = 1) -> Iterator[Any]:
        return self._map(func, iterable, chunksize, unordered=True)

    def _map(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int,
             unordered: bool = False, star: bool = False) -> Iterator[Any]:
        if isinstance(self.executor, futures.MPIPoolExecutor):
            call = self.executor.starmap if star else self.executor.map
            return call(func, iterable, chunksize=chunksize, unordered=unordered)
        fs = [self.executor.submit(func, *(a if star else (a,))) for a in iterable]
        order = futures.as_completed(fs) if unordered else iter(fs)
        return (f.result() for f in order)

    def starmap(self, func: Callable[..., Any], iterable: Iterable[Any],
                chunksize: int | None = None) -> list[Any]:
        """``list(itertools.starmap(func, iterable))`` on the workers."""
        iterable, chunksize = self._chunks(iterable, chunksize)
        return list(self.istarmap(func, iterable, chunksize))

    def starmap_async(self, func: Callable[..., Any], iterable: Iterable[Any],
                      chunksize: int | None = None,
                      callback: Callable[[Any], Any] | None = None,
                      error_callback: Callable[[BaseException], Any] | None = None
                      ) -> MapResult:
        iterable, chunksize = self._chunks(iterable, chunksize)
        results = self.istarmap(func, iterable, chunksize)
        return MapResult(self._async().submit(list, results), callback, error_callback)

    def istarmap(self, func: Callable[..., Any], iterable: Iterable[Any],
                 chunksize: int = 1) -> Iterator[Any]:
        return self._map(func, iterable, chunksize, star=True)

    def istarmap_unordered(self, func: Callable[..., Any], iterable: Iterable[Any],
                           chunksize: int = 1) -> Iterator[Any]:
        return self._map(func, iterable, chunksize, unordered=True, star=True)

    def close(self) -> None:
        """No more tasks (those submitted run)."""
        self.executor.shutdown(wait=False)

    def terminate(self) -> None:
        """No more tasks, the pending ones cancelled."""
        self.executor.shutdown(wait=False, cancel_futures=True)

    def join(self) -> None:
        """Wait for the workers to finish and stop."""
        self.executor.shutdown(wait=True)
        with self._helper_lock:
            helper, self._helper = self._helper, None
        if helper is not None:
            helper.shutdown(wait=True)

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ThreadPool(Pool):
    """Pool of threads of this process (concurrent.futures' ThreadPoolExecutor)."""

    Executor = futures.ThreadPoolExecutor
