"""A window's memory that every rank of one host maps: ``Comm.shared_window``
(MPI's Win_allocate_shared).

The communicator's rank 0 makes one anonymous memory file (memfd, as the
same-host rings: nothing in /dev/shm, gone with the last process that maps
it, SIGKILL included) holding every rank's part, one after the other (MPI's
contiguous default):

    | rank 0's count | rank 1's count | ... |     elements of one dtype

and tells the others where it is ([pid, fd]); each maps the whole of it
through /proc/pid/fd (allowed as for the rings: mesh.cma.allow_peers), so
that a numpy view of any rank's part (``Segment.views``) loads and stores
that memory itself. A window (mesh.window) over this rank's part adds the
one-sided operations and their synchronization.
"""
from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from . import wire
from .errors import MeshError, MismatchError

if TYPE_CHECKING:
    from .comm import Comm

__all__ = ["Segment", "allocate"]


class Segment:
    """The mapping of a shared window's memory, and each rank's part of it."""

    def __init__(self, mem: mmap.mmap, dtype: np.dtype, counts: list[int]) -> None:
        self.mem = mem
        starts = np.cumsum([0] + counts[:-1]).tolist()
        self.views = [np.frombuffer(mem, dtype, c, s * dtype.itemsize)
                      for s, c in zip(starts, counts)]


def allocate(comm: "Comm", count: int, dtype: Any, timeout: float | None) -> Segment:
    """Map ``count`` elements of ``dtype`` on each rank of ``comm``, which must
    all be on this rank's host (else MeshError on every rank, before any
    message: each reads the same table); collective."""
    import collectives      # (mesh does not import it at import time: Comm.split)
    t = comm._t
    where = f"rank {t.rank}: shared window on group {comm.name}"
    hosts = [t.hosts[w] for w in comm.ranks]
    if len(set(hosts)) > 1:
        apart = ", ".join(f"rank {r}" for r, h in enumerate(hosts) if h != hosts[0])
        raise MeshError(f"{where}: its ranks are not all on one host ({apart} not on rank 0's): "
                        f"a shared window maps one host's memory (comm.split_host() gives "
                        f"this host's ranks; comm.window(array) works across hosts)")
    bad: Exception | None = None
    try:
        kind = np.dtype(dtype)
        if not wire.dtype_ok(kind) or kind.hasobject:
            raise TypeError(f"{where}: a window's dtype is numeric, not {kind}")
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"{where}: count {count!r}: a number of elements, 0 or more")
    except (TypeError, ValueError) as e:     # (said to the others too: none waits for it)
        kind, bad = np.dtype(np.uint8), e
    table = collectives.all_gather_object(comm, [-1 if bad else int(count), kind.str],
                                          timeout=timeout)
    wrong = [r for r, (c, _) in enumerate(table) if c < 0]
    if bad is not None or wrong:
        raise bad or ValueError(f"{where}: rank(s) {wrong} asked for no valid memory (see "
                                f"their error)")
    if len({k for _, k in table}) > 1:
        raise MismatchError(f"{where}: the ranks' dtypes differ ("
                            + ", ".join(f"rank {r}: {np.dtype(k)}" for r, (_, k) in
                                        enumerate(table))
                            + "); a window has one dtype (counts may differ)")
    counts = [int(c) for c, _ in table]
    nbytes = max(1, sum(counts) * kind.itemsize)
    fd, there = -1, ""
    if comm.rank == 0:
        from .cma import allow_peers
        allow_peers()       # (Yama's ptrace_scope 1: the others may open our memory file)
        try:
            fd = os.memfd_create(f"meshrun-window-{comm.name}", os.MFD_CLOEXEC)
            os.ftruncate(fd, nbytes)
        except (OSError, AttributeError) as e:
            there = f"rank {t.rank}: no memory file for a shared window ({e})"
    try:
        pid, at, said = collectives.broadcast_object(comm, [os.getpid(), fd, there],
                                                     timeout=timeout)
        mem: mmap.mmap | None = None
        err = said if comm.rank == 0 else ""     # (rank 0's failure, said once)
        if not said:
            try:
                mem = _map(fd if comm.rank == 0 else -1, pid, at, nbytes)
            except OSError as e:
                err = f"rank {t.rank}: the shared window's memory (rank 0's, pid {pid}) " \
                      f"cannot be mapped: {e}"
        errors = collectives.all_gather_object(comm, err, timeout=timeout)
    finally:
        if fd >= 0:
            os.close(fd)        # (the mappings keep the memory)
    if any(errors):
        raise MeshError(f"{where}: " + "; ".join(e for e in errors if e))
    assert mem is not None
    return Segment(mem, kind, counts)


def _map(fd: int, pid: int, at: int, nbytes: int) -> mmap.mmap:
    """Map the memory file: ours (``fd``), else process ``pid``'s descriptor ``at``."""
    if fd >= 0:
        return mmap.mmap(fd, nbytes)
    f = os.open(f"/proc/{pid}/fd/{at}", os.O_RDWR | os.O_CLOEXEC)
    try:
        return mmap.mmap(f, nbytes)
    finally:
        os.close(f)
