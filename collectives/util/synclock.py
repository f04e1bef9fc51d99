"""collectives.util.sync's locks over collectives.MPI's windows: ``Mutex``,
``Condition``, ``Semaphore`` (mpi4py.util.sync's; see sync.py). A wait
polls with syncbase's backoff and watches the peers it waits on: the
mutex's holder, whose rank the window keeps beside the tickets, lost (died,
or left on an error), raises LostPeerError naming it and the call, as soon
as the mesh learns of the loss (what it guards may be half-written); where
no rank holds it (between a release and the next holder's taking it), the
ticket served's taker, whose ticket the window keeps too, lost before it
held the mutex, is passed over (the next ticket served); a notifier to
come is not known: any rank of the communicator lost ends the wait."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from mesh.errors import LostPeerError

from .. import MPI
from .syncbase import Counter, _Backoff, _freed, _ints, _rank, _Watch

__all__ = ["Mutex", "Condition", "Semaphore"]

# Mutex: rank 0's words (the holder's rank; -1: none known), then each rank's ticket
# (-1: none; _TAKING: about to take one)
_NEXT, _SERVED, _HOLDER, _TICKETS = 0, 1, 2, 3
_TAKING = -2
_FLAG, _WAITING = 0, 1          # Condition: each rank's flag; rank 0's count, then the queue
_HOLDS = "which holds the mutex and may have left what it guards half-written"


def _named(e: LostPeerError, rank: int, what: str) -> LostPeerError:
    """``e`` (a window call's, or a watch's) as the error of sync's call ``what``."""
    if ": collectives.util.sync." in str(e):
        return e
    return LostPeerError(f"rank {rank}: collectives.util.sync.{what} failed: {e}", e.peer)


class Mutex:
    """Mutual exclusion among the processes of ``comm``: one holds it at a
    time, the others' ``acquire`` waiting in the order they came
    (``recursive``: its holder may acquire it again, ``count()`` times); a
    waiter lost is passed over, a holder lost makes the waiters raise."""

    def __init__(self, *, recursive: bool = False, comm: Any = MPI.COMM_SELF,
                 info: Any = MPI.INFO_NULL) -> None:
        rank, size = _rank(comm, "Mutex")
        self._recursive = bool(recursive)
        self._comm = comm
        self._rank = rank
        self._size = size
        self._held = 0
        self._window = _ints(comm, _TICKETS + size if rank == 0 else 0)
        if rank == 0:
            self._window.tomemory()[_HOLDER:] = -1
        self._watch = _Watch(comm)
        comm.Barrier()

    def _fetch(self, value: int, word: int, op: Any) -> int:
        add = np.array([value], np.intc)
        got = np.zeros(1, np.intc)
        self._window.Fetch_and_op(add, got, 0, word, op)
        return int(got[0])

    def _acquire(self, blocking: bool = True, what: str = "Mutex.acquire") -> bool:
        """Take a ticket (this rank's word says it takes one, then which) and
        wait for its turn, watching the holder (its rank at _HOLDER) or,
        none known, the ticket served's taker (``_looked``); then write this
        rank there."""
        win = self._window
        mine = _TICKETS + self._rank
        try:
            win.Lock(0, MPI.LOCK_SHARED)
            try:
                self._fetch(_TAKING, mine, MPI.REPLACE)
                if blocking:
                    ticket = self._fetch(1, _NEXT, MPI.SUM)
                    self._fetch(ticket, mine, MPI.REPLACE)
                    backoff = _Backoff()
                    while self._fetch(0, _SERVED, MPI.NO_OP) != ticket:
                        if self._watch.due():
                            self._looked(what)
                        backoff()
                else:       # a ticket only if it is served at once: next == served
                    ticket = self._fetch(0, _SERVED, MPI.NO_OP)
                    got = np.zeros(1, np.intc)
                    win.Compare_and_swap(np.array([ticket + 1], np.intc),
                                         np.array([ticket], np.intc), got, 0, _NEXT)
                    if int(got[0]) != ticket:
                        self._fetch(-1, mine, MPI.REPLACE)
                        return False
                    self._fetch(ticket, mine, MPI.REPLACE)
                self._fetch(self._rank, _HOLDER, MPI.REPLACE)
            finally:
                win.Unlock(0)
        except LostPeerError as e:
            raise _named(e, self._rank, what) from e
        self._held = 1
        return True

    def _looked(self, what: str) -> None:
        """A waiter's look at what it waits on: the holder, lost, raises
        (what it guards may be half-written); none known, the ticket
        served's taker (the rank whose word is that ticket, else those
        about to take one), lost before it held the mutex, is passed over
        (the ticket served is the next, unless another waiter passed it
        first); none found, any lost rank raises."""
        holder = self._fetch(0, _HOLDER, MPI.NO_OP)
        if holder >= 0:
            self._watch.check(what, holder, _HOLDS)
            return
        served = self._fetch(0, _SERVED, MPI.NO_OP)
        words = np.zeros(self._size, np.intc)
        self._window.Get(words, 0, (_TICKETS, self._size))
        self._window.Flush(0)
        takers = [r for r, t in enumerate(words) if t == served] or [
            r for r, t in enumerate(words) if t == _TAKING]
        if not takers:
            self._watch.check(what)
        elif all(self._watch.lost(r) for r in takers) and \
                self._fetch(0, _HOLDER, MPI.NO_OP) < 0:     # (it took it and died: raised next)
            got = np.zeros(1, np.intc)
            self._window.Compare_and_swap(np.array([served + 1], np.intc),
                                          np.array([served], np.intc), got, 0, _SERVED)

    def _release(self, what: str = "Mutex.release") -> None:
        """No holder known, then the next ticket served (this rank's word
        left as it is: a ticket before the one served names no taker)."""
        win = self._window
        try:
            win.Lock(0, MPI.LOCK_SHARED)
            try:
                self._fetch(-1, _HOLDER, MPI.REPLACE)
                self._fetch(1, _SERVED, MPI.SUM)
            finally:
                win.Unlock(0)
        except LostPeerError as e:
            raise _named(e, self._rank, what) from e
        self._held = 0

    def _release_save(self, what: str) -> int:
        state = self._held
        self._release(what)
        return state

    def _acquire_restore(self, state: int, what: str) -> None:
        self._acquire(True, what)
        self._held = state

    def __enter__(self) -> "Mutex":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self, blocking: bool = True) -> bool:
        """Hold the mutex (``blocking=False``: only if it is free now); True if
        held. Its holder lost (or, none known, any rank): LostPeerError."""
        return self._take(blocking, "Mutex.acquire")

    def _take(self, blocking: bool, what: str) -> bool:
        if not self._window:
            raise _freed("mutex")
        if self._held:
            if not self._recursive:
                raise RuntimeError("cannot acquire already held mutex")
            self._held += 1
            return True
        return self._acquire(blocking, what)

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
            self._watch.free()
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
        self._watch = mutex._watch
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
        if exc[0] is None or self._mutex.locked():     # (a wait that failed holds nothing)
            self.release()

    def acquire(self, blocking: bool = True) -> bool:
        """Acquire the mutex."""
        if not self._window:
            raise _freed("condition")
        return self._mutex._take(blocking, "Condition.acquire")

    def release(self) -> None:
        """Release the mutex."""
        if not self._window:
            raise _freed("condition")
        self._mutex.release()

    def locked(self) -> bool:
        """Whether this process holds the mutex."""
        return self._mutex.locked()

    def wait(self) -> bool:
        """Release the mutex until notified, then hold it again (as often as
        before). A rank of the communicator lost meanwhile (the notifier to
        come is not known): LostPeerError naming it."""
        return self._wait("Condition.wait")

    def _wait(self, what: str) -> bool:
        try:
            return self._waiting(what)
        except LostPeerError as e:
            raise _named(e, self._comm.Get_rank(), what) from e

    def _waiting(self, what: str) -> bool:
        self._check("wait")
        win = self._window
        me = self._comm.Get_rank()
        win.Lock(0, MPI.LOCK_SHARED)
        try:
            queue = self._queue()
            n = int(queue[0])
            queue[1 + n] = me
            queue[0] = n + 1
            self._set_queue(queue)
        finally:
            win.Unlock(0)
        state = self._mutex._release_save(what)
        flag = win.tomemory()
        backoff = _Backoff()
        while True:
            win.Sync()
            if flag[_FLAG]:
                break
            if self._watch.due():
                self._watch.check(what)
            backoff()
        flag[_FLAG] = 0
        self._mutex._acquire_restore(state, what)
        return True

    def wait_for(self, predicate: Callable[[], Any]) -> Any:
        """``wait`` until ``predicate()`` is true; its value."""
        result = predicate()
        while not result:
            self.wait()
            result = predicate()
        return result

    def notify(self, n: int = 1) -> int:
        """Wake up to ``n`` waiters, the longest waiting first; how many (a
        waiter lost is passed over, out of the queue)."""
        try:
            return self._notify(n)
        except LostPeerError as e:
            raise _named(e, self._comm.Get_rank(), "Condition.notify") from e

    def _notify(self, n: int) -> int:
        self._check("notify")
        win = self._window
        win.Lock(0, MPI.LOCK_SHARED)
        try:
            queue = self._queue()
        finally:
            win.Unlock(0)
        waiting = int(queue[0])
        woken: list[int] = []
        taken = 0
        one = np.ones(1, np.intc)
        for rank in (int(r) for r in queue[1:1 + waiting]):
            if len(woken) >= n:
                break
            taken += 1
            try:        # (each waiter's flag in an epoch of its own: a lost one passed over)
                win.Lock(rank, MPI.LOCK_SHARED)
                try:
                    win.Accumulate(one, rank, _FLAG, MPI.REPLACE)
                finally:
                    win.Unlock(rank)
                woken.append(rank)
            except LostPeerError:
                pass
        if taken:
            queue[1:1 + waiting - taken] = queue[1 + taken:1 + waiting].copy()
            queue[0] = waiting - taken
            win.Lock(0, MPI.LOCK_SHARED)
            try:
                self._set_queue(queue)
            finally:
                win.Unlock(0)
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
        """Take one (``blocking=False``: only if one is left now); True if
        taken. A rank lost while it waits: LostPeerError naming it."""
        what = "Semaphore.acquire"
        mutex = self._condvar._mutex
        mutex._take(True, what)
        try:
            while self._counter.next(0) == 0:
                if not blocking:
                    return False
                self._condvar._wait(what)
            self._counter.next(-1)
            return True
        finally:
            if mutex._held:     # (a wait that failed holds nothing)
                mutex._release(what)

    def release(self, n: int = 1) -> None:
        """Give ``n`` back, waking up to ``n`` waiters."""
        if n < 1:
            raise ValueError("increment must be one or more")
        mutex = self._condvar._mutex
        mutex._take(True, "Semaphore.release")
        try:
            if self._bounded and self._counter.next(0) + n > self._counter._start:
                raise ValueError("semaphore released too many times")
            self._counter.next(n)
            self._condvar.notify(n)
        finally:
            mutex._release("Semaphore.release")

    def free(self) -> None:
        """Collective: its counter and condition freed."""
        self._counter.free()
        self._condvar.free()
        self._comm = MPI.COMM_NULL
