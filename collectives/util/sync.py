"""mpi4py.util.sync over collectives.MPI's windows: ``Sequential``, ``Counter``,
``Mutex``, ``Condition``, ``Semaphore``, with mpi4py 4's calls and semantics
(``from collectives.util import sync``; the conformance shim's ``mpi4py.util.sync``).

Each object but Sequential is collective to make and to ``free`` over its
``comm`` (default COMM_SELF, as mpi4py's), and owns one MPI.Win:

    Counter    the value at rank ``root``; ``next`` a Fetch_and_op on it
    Mutex      a ticket lock at rank 0: [next ticket, ticket served, holder's rank,
               each rank's ticket]; acquire takes a ticket (Fetch_and_op; its rank's
               word says it takes one, then which) and polls the ticket served
               until it is its own (first come, first served), then writes its
               rank as the holder's; release clears it and serves the next ticket;
               a waiter lost before its turn came is passed over by the others
    Condition  each rank's wake-up flag; rank 0's queue of waiting ranks, which
               wait and notify change while they hold the mutex
    Semaphore  a Counter and a Condition, as mpi4py's

syncbase.py has Sequential and Counter and what the waits share; synclock.py
Mutex, Condition and Semaphore. A wait polls (a remote window read, or the
rank's own flag, which the notifier's put sets through the target's reading
thread) with a backoff from 1 us to 1 ms, past 20 ms of waiting up to a
twentieth of the time waited (10 ms at most); it has no timeout of its own
(as mpi4py's and threading's), but never outlives the peer it waits on: the
mutex's holder lost (died, or left on an error), or, for a Condition's
notifier (not known), any rank of the communicator, it raises LostPeerError
naming the lost rank and the call
(``Mutex.acquire``, ``Condition.wait``, ``Semaphore.acquire``...) once the
mesh learns of the loss (its connection closed, its process gone, heartbeats
missed); a waiter lost while queued for the mutex is passed over (its
ticket served by the waiters behind it), and so is one a Condition's
notify would wake; Sequential's ``begin`` raises for the rank before it.
``Mutex.locked()`` and ``count()`` are the calling process's (a mutex is held
by a process, as mpi4py's)."""
from __future__ import annotations

from .syncbase import Counter, Sequential
from .synclock import Condition, Mutex, Semaphore

__all__ = ["Sequential", "Counter", "Mutex", "Condition", "Semaphore"]
