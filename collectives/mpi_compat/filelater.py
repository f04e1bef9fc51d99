"""mpi4py's MPI.File calls that complete later, and the shared file
pointer's independent calls (MPI.File's, file.py, takes them from Later):

- nonblocking: ``Iread``, ``Iwrite``, ``Iread_at``, ``Iwrite_at``, their
  ``_all`` forms, ``Iread_shared``, ``Iwrite_shared``, each returning a
  Request (``Wait``, ``Test``, ``Request.Waitall``...). A call does its
  own I/O at once, as ROMIO does on a POSIX file system without aio; a
  collective one then gathers the ranks' outcomes in the background
  (collectives.File.agree_later: a nonblocking all_gather, in call order),
  so no rank waits for another's call and its Wait raises, on every rank,
  an error any rank had;
- split collectives: ``Read_all_begin`` / ``Read_all_end`` and the
  ``Write_all``, ``Read_at_all``, ``Write_at_all``, ``Read_ordered``,
  ``Write_ordered`` pairs; a begin is the nonblocking call (the ordered
  ones': the blocking call, as MPI allows), its end the Wait; one at a
  time on a file, as MPI allows;
- the shared file pointer: ``Read_shared``, ``Write_shared``,
  ``Seek_shared``, ``Get_position_shared``, and the ordered calls, on one
  counter of rank 0's (SharedCounter: a cell of a one-sided window of the
  communicator's, kept from one file to the next, that every rank's
  fetch_and_op reaches through rank 0's reading thread, whatever rank 0 is
  doing; none waits for another rank's call).

Close refuses, on every rank, while a rank's request on the file is not
completed (MPI makes that erroneous), naming the rank and the calls."""
from __future__ import annotations

import weakref
from typing import Any, Callable

import numpy as np

import mesh

from .buffers import Buf
from .requests import Request, Status
from .types import ERR_OTHER, Exception

__all__ = ["Later", "SharedCounter"]

SEEK_SET, SEEK_CUR, SEEK_END = 600, 602, 604    # (Open MPI's, as file.py has them)


class _Cells:
    """A communicator's counters for its open files' shared pointers: int64
    cells of one-sided windows on rank 0 (none on the others), each rank
    taking a shared lock of rank 0 at its first use and holding it while
    the communicator lives. A file takes a cell at Open and gives it back
    at Close, both collective, so every rank's list of free cells is
    alike; a window is made (collectively) only when none is free."""

    PER_WINDOW = 64

    def __init__(self, g: mesh.Comm) -> None:
        self._g = g
        self._windows: list[Any] = []
        self._locked: set[int] = set()
        self._free: list[tuple[int, int]] = []

    def take(self) -> tuple[int, int]:
        if not self._free:
            w = len(self._windows)
            self._windows.append(self._g.window(np.zeros(self.PER_WINDOW if self._g.rank == 0
                                                         else 0, np.int64)))
            self._free = [(w, k) for k in reversed(range(self.PER_WINDOW))]
        return self._free.pop()

    def give_back(self, cell: tuple[int, int]) -> None:
        """(every rank, in the same order; rank 0 zeroes it first)"""
        if self._g.rank == 0:
            self.op(cell, 0, "replace")
        self._free.append(cell)

    def op(self, cell: tuple[int, int], value: int, op: str) -> int:
        w, k = cell
        if w not in self._locked:
            self._windows[w].lock(0, exclusive=False)
            self._locked.add(w)
        return int(self._windows[w].fetch_and_op(int(value), 0, k, op))


_CELLS: "weakref.WeakKeyDictionary[mesh.Comm, _Cells]" = weakref.WeakKeyDictionary()


class SharedCounter:
    """MPI's shared file pointer (in the view's elements) of a file opened
    on ``g``: ``start`` (the file's end in MODE_APPEND) plus a cell every
    rank reads, sets and adds to atomically (a fetch_and_op on rank 0's
    window, applied by rank 0's reading thread whatever rank 0 is doing)."""

    def __init__(self, g: mesh.Comm, start: int) -> None:
        cells = _CELLS.get(g)
        if cells is None:
            cells = _CELLS[g] = _Cells(g)
        self._cells: _Cells = cells
        self._cell = self._cells.take()
        self._base = int(start)

    def add(self, n: int) -> int:
        """Adds ``n``; returns the value before."""
        return self._base + self._cells.op(self._cell, n, "sum")

    def get(self) -> int:
        return self._base + self._cells.op(self._cell, 0, "no_op")

    def set(self, value: int) -> None:
        self._cells.op(self._cell, int(value) - self._base, "replace")

    def free(self) -> None:
        """(collective, between two of the file's agreements: Close's)"""
        self._cells.give_back(self._cell)


class _Done:
    """A file call's request under mpi4py's Request: its count of the
    view's elements, at once or once the ranks' Agreement is in."""

    def __init__(self, count: int, itemsize: int, agreement: Any = None,
                 run: Callable[..., Any] | None = None) -> None:
        self.count, self.itemsize = count, itemsize
        self._agreement, self._run = agreement, run
        self.waited = False     # (a wait that raised completes it too)

    def done(self) -> bool:
        return self._agreement is None or bool(self._agreement.done())

    def wait(self, timeout: float | None = None) -> int:
        self.waited = True
        if self._agreement is not None and self._run is not None:
            self._run(self._agreement.wait, timeout)
        return self.count

    def status_into(self, status: Status) -> None:
        status.nbytes = self.count * self.itemsize
        status.source = status.tag = -1
        status.error = 0


class Later:
    """MPI.File's nonblocking, split collective and shared pointer calls
    (over file.py's ``file``, ``_pos``, ``_buf``, ``_run``, ``_status``)."""

    file: Any
    _pos: int
    _comm: Any

    def __init__(self) -> None:
        self._requests: list[tuple[str, Request]] = []  # (the call, its request)
        self._split: tuple[str, Request] | None = None     # (its begin, its request)

    def _buf(self, buf: Any, what: str) -> Buf:
        raise NotImplementedError

    def _run(self, fn: Any, *args: Any, **kw: Any) -> Any:
        raise NotImplementedError

    def _status(self, status: Status | None, count: int) -> None:
        raise NotImplementedError

    def _request(self, call: str, count: int, agreement: Any = None) -> Request:
        self._requests = self._active()
        req = Request(_Done(count, self.file.etype.itemsize, agreement, self._run))
        self._requests.append((call, req))
        return req

    def _active(self) -> list[tuple[str, Request]]:
        return [(c, r) for c, r in self._requests if r and not r._req.waited]

    def _unfinished(self) -> str | None:
        """Close's complaint: the requests on this file not completed here."""
        calls = [c for c, _ in self._active()]
        if self._split is not None:
            calls.append(self._split[0])
        if not calls:
            return None
        return (f"{len(calls)} call(s) on the file not completed "
                f"({', '.join(calls)}): Wait their requests (the split calls' _end) before "
                f"Close (MPI_ERR_PENDING)")

    # -- independent

    def _now(self, call: str, offset: int, buf: Any, write: bool) -> Request:
        b = self._buf(buf, call)
        if write:
            n = self._run(self.file.write_at, offset, b.view)
        else:
            n = self._run(self.file.read_at, offset, b.view, partial=True)
            b.done()
        return self._request(call, int(n))

    def Iwrite_at(self, offset: int, buf: Any) -> Request:
        return self._now("Iwrite_at", offset, buf, True)

    def Iread_at(self, offset: int, buf: Any) -> Request:
        return self._now("Iread_at", offset, buf, False)

    def Iwrite(self, buf: Any) -> Request:
        req = self._now("Iwrite", self._pos, buf, True)
        self._pos += req._req.count
        return req

    def Iread(self, buf: Any) -> Request:
        req = self._now("Iread", self._pos, buf, False)
        self._pos += req._req.count
        return req

    # -- collective

    def _all(self, call: str, offset: int, buf: Any, write: bool) -> Request:
        """(a bad buffer spec too is this rank's part: raised at every rank's Wait)"""
        def part() -> int:
            b = self._buf(buf, call)
            if write:
                return int(self.file.write_at(offset, b.view))
            n = int(self.file.read_at(offset, b.view, partial=True))
            b.done()
            return n
        ag = self.file.agree_later(call, part)
        return self._request(call, ag.count, ag)

    def Iwrite_at_all(self, offset: int, buf: Any) -> Request:
        return self._all("Iwrite_at_all", offset, buf, True)

    def Iread_at_all(self, offset: int, buf: Any) -> Request:
        return self._all("Iread_at_all", offset, buf, False)

    def Iwrite_all(self, buf: Any) -> Request:
        req = self._all("Iwrite_all", self._pos, buf, True)
        self._pos += req._req.count
        return req

    def Iread_all(self, buf: Any) -> Request:
        req = self._all("Iread_all", self._pos, buf, False)
        self._pos += req._req.count
        return req

    # -- split collectives

    def _begin(self, call: str, start: Callable[[], Request]) -> None:
        if self._split is not None:
            raise Exception(ERR_OTHER, f"collectives.MPI File.{call}_begin: rank "
                                       f"{self._comm.rank}: {self._split[0]} is not ended: "
                                       f"one split collective at a time on a file (MPI's "
                                       f"rule): call its _end first")
        req = start()
        self._requests = [(c, r) for c, r in self._requests if r is not req]
        self._split = (f"{call}_begin", req)    # (its end completes it, not a Wait)

    def _end(self, call: str, status: Status | None) -> None:
        if self._split is None or self._split[0] != f"{call}_begin":
            was = "none is" if self._split is None else f"{self._split[0]} is"
            raise Exception(ERR_OTHER, f"collectives.MPI File.{call}_end: rank "
                                       f"{self._comm.rank}: no {call}_begin to end ({was} "
                                       f"active)")
        req = self._split[1]
        self._split = None
        req.Wait(status)

    def Write_all_begin(self, buf: Any) -> None:
        self._begin("Write_all", lambda: self.Iwrite_all(buf))

    def Write_all_end(self, buf: Any, status: Status | None = None) -> None:
        self._end("Write_all", status)

    def Read_all_begin(self, buf: Any) -> None:
        self._begin("Read_all", lambda: self.Iread_all(buf))

    def Read_all_end(self, buf: Any, status: Status | None = None) -> None:
        self._end("Read_all", status)

    def Write_at_all_begin(self, offset: int, buf: Any) -> None:
        self._begin("Write_at_all", lambda: self.Iwrite_at_all(offset, buf))

    def Write_at_all_end(self, buf: Any, status: Status | None = None) -> None:
        self._end("Write_at_all", status)

    def Read_at_all_begin(self, offset: int, buf: Any) -> None:
        self._begin("Read_at_all", lambda: self.Iread_at_all(offset, buf))

    def Read_at_all_end(self, buf: Any, status: Status | None = None) -> None:
        self._end("Read_at_all", status)

    def _ordered(self, call: str, buf: Any) -> Request:
        st = Status()
        getattr(self, call)(buf, st)
        return self._request(call, st.nbytes // self.file.etype.itemsize)

    def Write_ordered_begin(self, buf: Any) -> None:
        self._begin("Write_ordered", lambda: self._ordered("Write_ordered", buf))

    def Write_ordered_end(self, buf: Any, status: Status | None = None) -> None:
        self._end("Write_ordered", status)

    def Read_ordered_begin(self, buf: Any) -> None:
        self._begin("Read_ordered", lambda: self._ordered("Read_ordered", buf))

    def Read_ordered_end(self, buf: Any, status: Status | None = None) -> None:
        self._end("Read_ordered", status)

    # -- the shared file pointer, independently

    def _counter(self) -> SharedCounter:
        counter = self.file.counter
        if counter is None:
            self.file._open("shared file pointer")      # (the file is closed: raises)
        return counter

    def _shared(self, call: str, buf: Any, write: bool) -> int:
        """``buf`` at the shared pointer, moved past it atomically first."""
        b = self._buf(buf, call)
        size = self.file.etype.itemsize
        if b.view.nbytes % size:
            raise ValueError(f"collectives.MPI File.{call}: rank {self._comm.rank}: "
                             f"{b.view.nbytes} bytes are no whole number of the view's "
                             f"{size}-byte etype")
        at = self._counter().add(b.view.nbytes // size)
        if write:
            return int(self._run(self.file.write_at, at, b.view))
        n = int(self._run(self.file.read_at, at, b.view, partial=True))
        b.done()
        return n

    def Write_shared(self, buf: Any, status: Status | None = None) -> None:
        self._status(status, self._shared("Write_shared", buf, True))

    def Read_shared(self, buf: Any, status: Status | None = None) -> None:
        self._status(status, self._shared("Read_shared", buf, False))

    def Iwrite_shared(self, buf: Any) -> Request:
        return self._request("Iwrite_shared", self._shared("Iwrite_shared", buf, True))

    def Iread_shared(self, buf: Any) -> Request:
        return self._request("Iread_shared", self._shared("Iread_shared", buf, False))

    def Get_position_shared(self) -> int:
        return self._counter().get()

    def Seek_shared(self, offset: int, whence: int = SEEK_SET) -> None:
        """(collective: every rank passes the same offset and whence; rank 0
        moves the pointer once every rank has called it, before any returns)"""
        problem = None
        counter = self._counter()
        self._run(self.file.check, "seek_shared", None, (int(offset), int(whence)))
        if self._comm.rank == 0:
            base = {SEEK_SET: 0, SEEK_CUR: -1, SEEK_END: -1}
            if whence == SEEK_CUR:
                base[SEEK_CUR] = counter.get()
            elif whence == SEEK_END:
                base[SEEK_END] = self.file.elements_before(self._run(lambda: self.file.size))
            if whence not in base or base[whence] + int(offset) < 0:
                problem = (f"offset {offset} from whence {whence} (SEEK_SET, SEEK_CUR, "
                           f"SEEK_END) is out of range (MPI_ERR_ARG)")
            else:
                counter.set(base[whence] + int(offset))
        self._run(self.file.check, "seek_shared", problem)
