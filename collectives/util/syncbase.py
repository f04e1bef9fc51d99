"""collectives.util.sync's ground: ``Sequential`` and ``Counter``, and what
the waits of synclock's Mutex, Condition and Semaphore share (their backoff,
their watch for lost peers, their windows of C ints)."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from mesh.errors import LostPeerError

from .. import MPI

__all__ = ["Sequential", "Counter"]


class _Backoff:
    """Sleeps between polls: 0 at first, then from 1 us doubling to 1 ms, and
    past 20 ms of waiting to a twentieth of the time waited (10 ms at most):
    a long wait costs a core little, a hand-off after it 5% of the wait."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.start = time.monotonic()

    def __call__(self) -> None:
        time.sleep(self.delay)
        cap = min(1e-2, max(1e-3, (time.monotonic() - self.start) / 20))
        self.delay = min(cap, max(1e-6, self.delay * 2))


class _Watch:
    """A wait's look at the peers it may wait on: ``check`` raises
    LostPeerError once the given rank of ``comm`` (None: any of them) is
    lost (died, or left on an error), as the mesh learns it (a heartbeat
    missed, its connection closed, its process gone). It probes a private
    duplicate of ``comm`` (collective to make), where no message ever comes:
    a probe from a failed source there can only raise. Every ``every``
    seconds at most (the first look at once)."""

    def __init__(self, comm: Any, every: float = 0.05) -> None:
        self._size = comm.Get_size()
        self._dup = comm.Dup() if self._size > 1 else None
        self._members: list[int] = comm.Get_group().Translate_ranks() if self._dup else []
        self._every = every
        self._next = 0.0

    def due(self) -> bool:
        """Whether a look is due (a poll's cheap test before reading what to name)."""
        return self._dup is not None and time.monotonic() >= self._next

    def check(self, what: str, holder: int | None = None, role: str = "") -> None:
        """LostPeerError naming ``what`` (the call) and the lost rank if
        ``holder`` (``role``: what it is to the wait) or, where None, any
        rank of the communicator is lost."""
        if self._dup is None:
            return
        self._next = time.monotonic() + self._every
        try:
            self._dup.Iprobe(MPI.ANY_SOURCE if holder is None else holder, 0)
        except LostPeerError as e:
            me = self._dup.Get_rank()
            if holder is None:
                lost = self._members.index(e.peer) if e.peer in self._members else None
                who = (f"rank {lost}" if lost is not None else f"world rank {e.peer}") + \
                    " of the communicator is lost (the holder is not known: any lost rank " \
                    "may be the one it waits on)"
            else:
                who = f"rank {holder}, {role}, is lost"
            raise LostPeerError(f"rank {me}: collectives.util.sync.{what} failed: {who}: {e}",
                                e.peer) from e

    def lost(self, rank: int) -> bool:
        """Whether rank ``rank`` of the communicator is lost, as the mesh knows now."""
        if self._dup is None:
            return False
        self._next = time.monotonic() + self._every
        try:
            self._dup.Iprobe(rank, 0)
        except LostPeerError:
            return True
        return False

    def free(self) -> None:
        if self._dup is not None:
            self._dup.Free()
            self._dup = None


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
            try:
                self.comm.Recv([bytearray(0), 0, MPI.BYTE], rank - 1, self.tag)
            except LostPeerError as e:
                raise LostPeerError(f"rank {rank}: collectives.util.sync.Sequential.begin "
                                    f"failed: rank {rank - 1}, whose turn comes before, is "
                                    f"lost: {e}", e.peer) from e

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
        try:
            win.Lock(self._root, MPI.LOCK_SHARED)
            win.Fetch_and_op(add, got, self._root, 0, op)
            win.Unlock(self._root)
        except LostPeerError as e:
            raise LostPeerError(f"rank {self._comm.Get_rank()}: collectives.util.sync.Counter."
                                f"next failed: rank {self._root}, which holds the counter's "
                                f"value, is lost: {e}", e.peer) from e
        return got[0].item()

    def free(self) -> None:
        """Collective: the counter's window freed (again: nothing)."""
        if self._window:
            self._window.Free()
        self._window = MPI.WIN_NULL
        self._comm = MPI.COMM_NULL


