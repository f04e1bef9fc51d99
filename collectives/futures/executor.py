"""mpi4py.futures' executors: MPIPoolExecutor (workers started by
collectives.MPI's Spawn, or -m's shared pool) and MPICommExecutor (a
communicator's ranks: the root the master, the others its workers). Their
futures are concurrent.futures' Future; ``map`` and ``starmap`` take
mpi4py's ``chunksize``, ``timeout`` and ``unordered``."""
from __future__ import annotations

import collections
import itertools
import sys
import threading
import time
import weakref
from concurrent.futures import Executor, Future, as_completed
from typing import Any, Callable, Iterable, Iterator

from . import codec
from .pool import BrokenExecutor, Pool, spawn_workers
from .server import serve

__all__ = ["MPIPoolExecutor", "MPICommExecutor", "BrokenExecutor"]

_shared: dict[str, Any] = {"comm": None, "busy": False, "workers": None}
_live: "weakref.WeakSet[MPIPoolExecutor]" = weakref.WeakSet()


class MPIPoolExecutor(Executor):
    """concurrent.futures' Executor over ``max_workers`` worker processes
    (1 where None) that collectives.MPI's Spawn starts at the first
    ``submit``/``map``/``bootup`` and ``shutdown`` stops (under ``python -m
    collectives.futures``: the job's other ranks, and ``max_workers`` is
    not used). ``initializer(*initargs)`` runs on each worker first;
    ``python_exe`` names another Python for the workers."""

    def __init__(self, max_workers: int | None = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple = (),
                 **kwargs: Any) -> None:
        if max_workers is not None:
            max_workers = int(max_workers)
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        other = sorted(set(kwargs) - {"python_exe", "main", "path"})
        if other:
            raise TypeError(f"collectives.futures: MPIPoolExecutor options {other} are not "
                            f"provided (python_exe, main, path are)")
        init = None if initializer is None else [codec.ref(initializer), list(initargs)]
        codec.dumps(init, "initargs")
        self._workers = max_workers or 1
        self._setup = {"init": init, "main": codec.main_of() if kwargs.get("main", True)
                       else None, "path": list(kwargs.get("path") or sys.path)}
        self._python = kwargs.get("python_exe")
        self._comm: Any = None
        self._pool: Pool | None = None
        self._shutdown = False
        self._lock = threading.Lock()
        self._uses_shared = False

    def _bootstrap(self) -> Pool:
        if self._pool is None:
            codec.check_not_in_main()
            comm, spawned = self._comm, False
            if comm is None and _shared["comm"] is not None:
                if _shared["busy"]:
                    raise RuntimeError("collectives.futures: under python -m collectives."
                                       "futures one MPIPoolExecutor at a time uses the "
                                       "job's workers: shut the other down first")
                comm, _shared["busy"], self._uses_shared = _shared["comm"], True, True
            elif comm is None:
                comm, spawned = spawn_workers(self._workers, self._python), True
            self._pool = Pool(comm, spawned, self._setup, not self._uses_shared,
                              _free if self._uses_shared else None)
            weakref.finalize(self, self._pool.done)     # (dropped unshut: the workers stop)
            _live.add(self)
        return self._pool

    @property
    def num_workers(self) -> int:
        """The number of worker processes (0 after shutdown or once broken)."""
        with self._lock:
            if self._shutdown:
                return 0
            pool = self._bootstrap()
            return 0 if pool.broken else pool.size

    def bootup(self, wait: bool = True) -> "MPIPoolExecutor":
        """Start the workers now (``wait`` is always honoured: Spawn returns
        once they have joined)."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot bootup after shutdown")
            self._bootstrap()
        return self

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return self._submit(fn, codec.ref(fn), args, kwargs, False)

    def _submit(self, fn: Any, r: list[str], args: Any, kwargs: Any, chunked: bool) -> Future:
        name = ".".join(r)
        task = codec.dumps([r, args, kwargs, chunked], f"an argument of {name}")
        with self._lock:
            if self._pool is not None and self._pool.broken:
                raise BrokenExecutor(self._pool.broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            pool = self._bootstrap()
            future: Future = Future()
            pool.push(future, task)
        return future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, unordered: bool = False) -> Iterator[Any]:
        """``map(fn, *iterables)`` run on the workers, ``chunksize`` calls
        a task; ``unordered``: results as they complete."""
        return self.starmap(fn, zip(*iterables), timeout, chunksize, unordered)

    def starmap(self, fn: Callable[..., Any], iterable: Iterable[Any],
                timeout: float | None = None, chunksize: int = 1,
                unordered: bool = False) -> Iterator[Any]:
        """``itertools.starmap(fn, iterable)`` run on the workers."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        r = codec.ref(fn)
        if chunksize == 1:
            fs = [self._submit(fn, r, tuple(a), {}, False) for a in iterable]
            return _results(fs, timeout, unordered, False)
        it = iter(iterable)
        chunks = iter(lambda: [tuple(a) for a in itertools.islice(it, chunksize)], [])
        fs = [self._submit(fn, r, c, {}, True) for c in chunks]
        return _results(fs, timeout, unordered, True)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submits; ``cancel_futures``: pending ones cancelled;
        ``wait``: return once the workers are stopped (and reaped)."""
        with self._lock:
            pool, self._shutdown = self._pool, True
        if pool is None:
            return
        if cancel_futures:
            pool.cancel()
        pool.done()
        if wait:
            pool.join()


def _free() -> None:
    _shared["busy"] = False


def _results(fs: list[Future], timeout: float | None, unordered: bool,
             chunked: bool) -> Iterator[Any]:
    """The futures' results in order (or as completed), each within what is
    left of ``timeout``; those not taken cancelled when the iterator is
    dropped or raises."""
    end = None if timeout is None else time.monotonic() + timeout

    def left() -> float | None:
        return None if end is None else end - time.monotonic()

    def gen() -> Iterator[Any]:
        pending = collections.deque(fs)
        try:
            order = as_completed(fs, left()) if unordered else iter(fs)
            for f in order:
                pending.remove(f)
                value = f.result(left())
                if chunked:
                    yield from value
                else:
                    yield value
        finally:
            for f in pending:
                f.cancel()
    return gen()


class MPICommExecutor:
    """mpi4py.futures' MPICommExecutor: ``with MPICommExecutor(comm, root)
    as ex`` gives the root an MPIPoolExecutor whose workers are ``comm``'s
    other ranks, and None to those, which serve the root's tasks inside
    ``__enter__`` and leave it once the root's executor is shut down (so
    their ``if ex is not None:`` body is skipped). ``comm`` of one rank: one
    worker spawned."""

    def __init__(self, comm: Any = None, root: int = 0, **kwargs: Any) -> None:
        from .. import MPI
        comm = MPI.COMM_WORLD if comm is None else comm
        if comm.Is_inter():
            raise ValueError("expecting an intracommunicator")
        if not 0 <= root < comm.Get_size():
            raise ValueError("expecting root in range(comm.size)")
        self._comm, self._root, self._options = comm, root, kwargs
        self._executor: Any = None

    def __enter__(self) -> Any:
        comm, root = self._comm, self._root
        codec.check_not_in_main()   # (a worker's run of the main script: before any collective)
        if comm.Get_size() == 1:
            self._executor = MPIPoolExecutor(1, **self._options)
            return self._executor
        mine, inter, local = split(comm, root)
        if not mine:
            serve(inter, local)
            return None
        ex = MPIPoolExecutor(**self._options)
        ex._comm = inter
        ex._bootstrap()
        self._executor = ex
        return ex

    def __exit__(self, *exc: Any) -> bool:
        ex, self._executor = self._executor, None
        if ex is None:
            return True
        ex.shutdown(wait=True)
        return False


def split(comm: Any, root: int) -> tuple[bool, Any, Any]:
    """``comm`` (2 ranks or more) as the root and the others: whether this
    rank is the root, the intercommunicator between the two, and this
    rank's side (the workers' intracommunicator, on a worker)."""
    mine = comm.Get_rank() == root
    local = comm.Split(0 if mine else 1, comm.Get_rank())
    leader = (1 if root == 0 else 0) if mine else root
    return mine, local.Create_intercomm(0, comm, leader, tag=977), local


def shutdown_all() -> None:
    """Every live executor shut down (at interpreter exit)."""
    for ex in list(_live):
        ex.shutdown(wait=True)


if hasattr(threading, "_register_atexit"):
    threading._register_atexit(shutdown_all)
