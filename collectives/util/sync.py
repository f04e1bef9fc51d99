"""mpi4py.util.sync over collectives.MPI's windows: ``Sequential``, ``Counter``,
``Mutex``, ``Condition``, ``Semaphore``, with mpi4py 4's calls and semantics
(``from collectives.util import sync``; the conformance shim's ``mpi4py.util.sync``).

Each object but Sequential is collective to make and to ``free`` over its
``comm`` (default COMM_SELF, as mpi4py's), and owns one MPI.Win:

    Counter    the value at rank ``root``; ``next`` a Fetch_and_op on it
    Mutex      a ticket lock at rank 0: [next ticket, ticket served]; acquire takes
               a ticket (Fetch_and_op) and polls the ticket served until it is its
               own (first come, first served); release serves the next ticket
    Condition  each rank's wake-up flag; rank 0's queue of waiting ranks, which
               wait and notify change while they hold the mutex
    Semaphore  a Counter and a Condition, as mpi4py's

A wait polls (a remote window read, or the rank's own flag, which the
notifier's put sets through the target's reading thread) with a backoff
from 1 us to 1 ms. ``Mutex.locked()`` and ``count()`` are the calling
process's (a mutex is held by a process, as mpi4py's)."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from .. import MPI

__all__ = ["Sequential", "Counter", "Mutex", "Condition", "Semaphore"]

_NEXT, _SERVED = 0, 1           # Mutex: rank 0's words
_FLAG, _WAITING = 0, 1          # Condition: each rank's flag; rank 0's count, then the queue


class _Backoff:
    """Sleeps between polls: 0 at first, then from 1 us doubling to 1 ms."""

    def __init__(self) -> None:
        self.delay = 0.0

    def __call__(self) -> None:
        time.sleep(self.delay)
        self.delay = min(1e-3, max(1e-6, self.delay * 2))


def _freed(what: str) -> RuntimeError:
    return RuntimeError(f"{what} already freed")


def _ints(comm: Any, count: int) -> Any:
    """A window of ``count`` C ints on this rank (zeros), collective over ``comm``."""
    return MPI.Win.Allocate(count * 4, 4, MPI.INFO_NULL, comm, datatype=MPI.INT)


def _rank(comm: Any, what: str) -> tuple[int, int]:
    if comm is None or comm == MPI.COMM_NULL:
        raise ValueError(f"collectives.util.sync.{what}: comm is COMM_NULL (an "
                         f"intracommunicator of the ranks that share it)")
    return comm.Get_rank(), comm.Get_size()


class Sequential:
    """Ranks run a block in rank order: ``with Sequential(comm): ...`` (rank r
    enters once rank r - 1 has left: an empty message of ``tag`` between them)."""

    def __init__(self, comm: Any, tag: int = 0) -> None:
        self.comm = comm
        self.tag = int(tag)

    def __enter__(self) -> "Sequential":
        self.begin()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.end()

    def begin(self) -> None:
        """Wait for the rank before this one to ``end``."""
        rank, size = _rank(self.comm, "Sequential")
        if size > 1 and rank > 0:
            self.comm.Recv([bytearray(0), 0, MPI.BYTE], rank - 1, self.tag)

    def end(self) -> None:
        """Let the rank after this one ``begin``."""
        rank, size = _rank(self.comm, "Sequential")
        if size > 1 and rank < size - 1:
            self.comm.Send([bytearray(0), 0, MPI.BYTE], rank + 1, self.tag)


class Counter:
    """A counter every rank of ``comm`` draws from: ``next()`` gives the value
    and adds ``step`` (or ``incr``) at once, so that the ranks' draws are each
    value once. ``typecode``: the array module's ("i", "l", "q", "d"...)."""

    def __init__(self, start: Any = 0, step: Any = 1, *, typecode: str = "i",
                 comm: Any = MPI.COMM_SELF, info: Any = MPI.INFO_NULL, root: int = 0) -> None:
        rank, size = _rank(comm, "Counter")
        if not 0 <= int(root) < size:
            raise ValueError(f"rank {rank}: collectives.util.sync.Counter: root {root} is "
                             f"not a rank of the communicator (size {size})")
        datatype = MPI.Datatype.fromcode(typecode)
        self._dtype = np.dtype(datatype.dtype)
        self._start, self._step = start, step
        self._root = int(root)
        self._comm = comm
        here = 1 if rank == self._root else 0
        self._window = MPI.Win.Allocate(here * self._dtype.itemsize, self._dtype.itemsize,
                                        info, comm, datatype=datatype)
        if here:
            self._window.tomemory()[0] = start
        comm.Barrier()

    def __iter__(self) -> "Counter":
        return self

    def __next__(self) -> Any:
        return self.next()

    def next(self, incr: Any = None) -> Any:
        """The counter's value, ``incr`` (default: ``step``) added to it."""
        if not self._window:
            raise _freed("counter")
        add = np.array([self._step if incr is None else incr], self._dtype)
        got = np.zeros(1, self._dtype)
        op = MPI.SUM if add[0] != 0 else MPI.NO_OP
        win = self._window
        win.Lock(self._root, MPI.LOCK_SHARED)
        win.Fetch_and_op(add, got, self._root, 0, op)
        win.Unlock(self._root)
        return got[0].item()

    def free(self) -> None:
        """Collective: the counter's window freed (again: nothing)."""
        if self._window:
            self._window.Free()
        self._window = MPI.WIN_NULL
        self._comm = MPI.COMM_NULL


class Mutex:
    """Mutual exclusion among the processes of ``comm``: one holds it at a
    time, the others' ``acquire`` waiting in the order they came
    (``recursive``: its holder may acquire it again, ``count()`` times)."""

    def __init__(self, *, recursive: bool = False, comm: Any = MPI.COMM_SELF,
                 info: Any = MPI.INFO_NULL) -> None:
        rank, _ = _rank(comm, "Mutex")
        self._recursive = bool(recursive)
        self._comm = comm
        self._held = 0
        self._window = _ints(comm, 2 if rank == 0 else 0)
        comm.Barrier()

    def _fetch(self, value: int, word: int, op: Any) -> int:
        add = np.array([value], np.intc)
        got = np.zeros(1, np.intc)
        self._window.Fetch_and_op(add, got, 0, word, op)
        return int(got[0])

    def _acquire(self, blocking: bool = True) -> bool:
        win = self._window
        win.Lock(0, MPI.LOCK_SHARED)
        try:
            if blocking:
                ticket = self._fetch(1, _NEXT, MPI.SUM)
                backoff = _Backoff()
                while self._fetch(0, _SERVED, MPI.NO_OP) != ticket:
                    backoff()
            else:       # a ticket only if it is served at once: next == served
                served = self._fetch(0, _SERVED, MPI.NO_OP)
                got = np.zeros(1, np.intc)
                win.Compare_and_swap(np.array([served + 1], np.intc),
                                     np.array([served], np.intc), got, 0, _NEXT)
                if int(got[0]) != served:
                    return False
        finally:
            win.Unlock(0)
        self._held = 1
        return True

    def _release(self) -> None:
        win = self._window
        win.Lock(0, MPI.LOCK_SHARED)
        try:
            self._fetch(1, _SERVED, MPI.SUM)
        finally:
            win.Unlock(0)
        self._held = 0

    def _release_save(self) -> int:
        state = self._held
        self._release()
        return state

    def _acquire_restore(self, state: int) -> None:
        self._acquire()
        self._held = state

    def __enter__(self) -> "Mutex":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self, blocking: bool = True) -> bool:
        """Hold the mutex (``blocking=False``: only if it is free now); True if held."""
        if not self._window:
            raise _freed("mutex")
        if self._held:
            if not self._recursive:
                raise RuntimeError("cannot acquire already held mutex")
            self._held += 1
            return True
        return self._acquire(blocking)

    def release(self) -> None:
        """Let the next waiter have it (a recursive one: once released as often as held)."""
        if not self._window:
            raise _freed("mutex")
        if not self._held:
            raise RuntimeError("cannot release unheld mutex")
        if self._held > 1:
            self._held -= 1
            return
        self._release()

    def locked(self) -> bool:
        """Whether this process holds it."""
        if not self._window:
            raise _freed("mutex")
        return self._held > 0

    def count(self) -> int:
        """How many times this process holds it (0: not held)."""
        if not self._window:
            raise _freed("mutex")
        return self._held

    def free(self) -> None:
        """Collective: released if held, then its window freed (again: nothing)."""
        if self._window:
            if self._held:
                self._release()
            self._window.Free()
        self._window = MPI.WIN_NULL
        self._comm = MPI.COMM_NULL


class Condition:
    """A condition variable over a Mutex (``mutex``, or one of its own over
    ``comm``): ``wait`` releases the mutex until another process's ``notify``,
    which wakes the waiters in the order they began to wait."""

    def __init__(self, mutex: Mutex | None = None, *, recursive: bool = True,
                 comm: Any = MPI.COMM_SELF, info: Any = MPI.INFO_NULL) -> None:
        self._own = mutex is None
        if mutex is None:
            mutex = Mutex(recursive=recursive, comm=comm, info=info)
        else:
            comm = mutex._comm
        self._mutex = mutex
        rank, size = _rank(comm, "Condition")
        self._size = size
        self._comm = comm
        self._window = _ints(comm, 1 + (1 + size if rank == 0 else 0))
        comm.Barrier()

    def _check(self, what: str) -> None:
        if not self._window:
            raise _freed("condition")
        if not self._mutex.locked():
            raise RuntimeError(f"cannot {what} on unheld mutex")

    def _queue(self) -> np.ndarray:
        """Rank 0's count of waiters and its queue (the mutex held: no one changes it)."""
        got = np.zeros(1 + self._size, np.intc)
        self._window.Get(got, 0, (_WAITING, 1 + self._size))
        self._window.Flush(0)
        return got

    def _set_queue(self, queue: np.ndarray) -> None:
        self._window.Put(queue, 0, (_WAITING, len(queue)))
        self._window.Flush(0)

    def __enter__(self) -> "Condition":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self, blocking: bool = True) -> bool:
        """Acquire the mutex."""
        if not self._window:
            raise _freed("condition")
        return self._mutex.acquire(blocking)

    def release(self) -> None:
        """Release the mutex."""
        if not self._window:
            raise _freed("condition")
        self._mutex.release()

    def locked(self) -> bool:
        """Whether this process holds the mutex."""
        return self._mutex.locked()

    def wait(self) -> bool:
        """Release the mutex until notified, then hold it again (as often as before)."""
        self._check("wait")
        win = self._window
        me = self._comm.Get_rank()
        win.Lock_all()
        try:
            queue = self._queue()
            n = int(queue[0])
            queue[1 + n] = me
            queue[0] = n + 1
            self._set_queue(queue)
        finally:
            win.Unlock_all()
        state = self._mutex._release_save()
        flag = win.tomemory()
        backoff = _Backoff()
        while True:
            win.Sync()
            if flag[_FLAG]:
                break
            backoff()
        flag[_FLAG] = 0
        self._mutex._acquire_restore(state)
        return True

    def wait_for(self, predicate: Callable[[], Any]) -> Any:
        """``wait`` until ``predicate()`` is true; its value."""
        result = predicate()
        while not result:
            self.wait()
            result = predicate()
        return result

    def notify(self, n: int = 1) -> int:
        """Wake up to ``n`` waiters, the longest waiting first; how many."""
        self._check("notify")
        win = self._window
        win.Lock_all()
        try:
            queue = self._queue()
            waiting = int(queue[0])
            woken = [int(r) for r in queue[1:1 + min(max(int(n), 0), waiting)]]
            if woken:
                rest = queue[1 + len(woken):1 + waiting].copy()
                queue[1:1 + len(rest)] = rest
                queue[0] = len(rest)
                self._set_queue(queue)
                one = np.ones(1, np.intc)
                for rank in woken:
                    win.Accumulate(one, rank, _FLAG, MPI.REPLACE)
                win.Flush_all()
        finally:
            win.Unlock_all()
        return len(woken)

    def notify_all(self) -> int:
        """Wake every waiter; how many."""
        return self.notify(self._size)

    def free(self) -> None:
        """Collective: the mutex released if this process holds it (and freed
        if the condition made it), then the condition's window (again: nothing)."""
        if self._window:
            if self._mutex._window and self._mutex.locked():
                self._mutex._release()
            if self._own:
                self._mutex.free()
            self._window.Free()
        self._window = MPI.WIN_NULL
        self._comm = MPI.COMM_NULL


class Semaphore:
    """A counting semaphore over ``comm``: ``acquire`` takes one of ``value``
    (waiting while none is left), ``release(n)`` gives ``n`` back
    (``bounded``: never past ``value``, ValueError)."""

    def __init__(self, value: int = 1, *, bounded: bool = True, comm: Any = MPI.COMM_SELF,
                 info: Any = MPI.INFO_NULL) -> None:
        if value < 0:
            raise ValueError("initial value must be non-negative")
        self._bounded = bool(bounded)
        self._counter = Counter(value, comm=comm, info=info)
        self._condvar = Condition(recursive=False, comm=comm, info=info)
        self._comm = comm

    def __enter__(self) -> "Semaphore":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self, blocking: bool = True) -> bool:
        """Take one (``blocking=False``: only if one is left now); True if taken."""
        with self._condvar:
            while self._counter.next(0) == 0:
                if not blocking:
                    return False
                self._condvar.wait()
            self._counter.next(-1)
            return True

    def release(self, n: int = 1) -> None:
        """Give ``n`` back, waking up to ``n`` waiters."""
        if n < 1:
            raise ValueError("increment must be one or more")
        with self._condvar:
            if self._bounded and self._counter.next(0) + n > self._counter._start:
                raise ValueError("semaphore released too many times")
            self._counter.next(n)
            self._condvar.notify(n)

    def free(self) -> None:
        """Collective: its counter and condition freed."""
        self._counter.free()
        self._condvar.free()
        self._comm = MPI.COMM_NULL
