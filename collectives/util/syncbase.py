"""collectives.util.sync's ground: ``Sequential`` and ``Counter``, and what
the waits of synclock's Mutex, Condition and Semaphore share (their backoff,
their windows of C ints)."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from .. import MPI

__all__ = ["Sequential", "Counter"]

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
