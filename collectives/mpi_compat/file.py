"""mpi4py's MPI.File over collectives.File (POSIX pread and pwrite at each
rank's own offset): ``File.Open(comm, name, amode)`` with Open MPI's
``MODE_*`` flags, Set_view with any filetype (a derived datatype's typemap
as collectives.fileview's runs) and etype, the explicit-offset calls
(Write_at, Read_at and their ``_all`` forms), the individual file pointer
(Write, Read, their ``_all`` forms, Seek, Get_position), the ordered calls,
Get_size, Set_size, Preallocate, Sync, Close, Delete; memory of derived
datatypes, packed and unpacked as the point-to-point calls do. The
nonblocking, split collective and shared file pointer calls are
filelater.py's. An error is mpi4py's MPI.Exception with MPI's error class
(ERR_NO_SUCH_FILE, ERR_ACCESS, ERR_TYPE...), raised on every rank of a
collective call, its text naming the rank; what is not provided raises
NotImplementedError naming it."""
from __future__ import annotations

import errno
import os
import re
from typing import Any

import numpy as np

from ..file import File as _File, FileError
from ..fileview import Filetype, runs_of
from .buffers import Buf, spec
from .filelater import Later, SharedCounter
from .requests import Status
from .types import DATATYPES, ERR_OTHER, ERR_TYPE, Datatype, Exception, datatype_of

__all__ = ["File", "MODES", "SEEK_SET", "SEEK_CUR", "SEEK_END", "FILE_ERRORS"]

# Open MPI's values, as mpi4py has them
MODES = {"MODE_CREATE": 1, "MODE_RDONLY": 2, "MODE_WRONLY": 4, "MODE_RDWR": 8,
         "MODE_DELETE_ON_CLOSE": 16, "MODE_UNIQUE_OPEN": 32, "MODE_EXCL": 64,
         "MODE_APPEND": 128, "MODE_SEQUENTIAL": 256}
SEEK_SET, SEEK_CUR, SEEK_END = 600, 602, 604
FILE_ERRORS = {"ERR_ARG": 13, "ERR_ACCESS": 20, "ERR_AMODE": 21, "ERR_BAD_FILE": 23, "ERR_FILE": 30,
               "ERR_FILE_EXISTS": 28, "ERR_IO": 35, "ERR_NO_SPACE": 41,
               "ERR_NO_SUCH_FILE": 42, "ERR_UNSUPPORTED_OPERATION": 52, "ERR_PENDING": 19}
_CLASS = {errno.ENOENT: 42, errno.ENOTDIR: 42, errno.EEXIST: 28, errno.EACCES: 20,
          errno.EPERM: 20, errno.EROFS: 20, errno.EBADF: 20, errno.ENOSPC: 41,
          errno.EDQUOT: 41, errno.EISDIR: 23, errno.ENAMETOOLONG: 23, errno.EINVAL: 13}
_M = MODES


_NAMED = {**FILE_ERRORS, "ERR_TYPE": ERR_TYPE, "ERR_OTHER": ERR_OTHER}


def _mpi_error(e: FileError) -> Exception:
    """MPI's class: one the first failed rank's reason names ("(MPI_ERR_TYPE)"),
    else its errno's."""
    named = re.search(r"\(MPI_(ERR_[A-Z_]+)\)", e.errors[e.rank][1])
    if named and named.group(1) in _NAMED:
        cls = _NAMED[named.group(1)]
    else:
        cls = _CLASS.get(e.errno or 0, FILE_ERRORS["ERR_IO"] if e.errno
                         else FILE_ERRORS["ERR_FILE"])
    err = Exception(cls, f"collectives.MPI {e}")
    err.__cause__ = e
    return err


def _how(amode: int) -> tuple[int, bool, bool, bool, bool]:
    """collectives.File's opening of an MPI amode (ERR_AMODE where MPI says so)."""
    access = [m for m in ("MODE_RDONLY", "MODE_WRONLY", "MODE_RDWR") if amode & _M[m]]
    bad = None
    if len(access) != 1:
        bad = "one of MODE_RDONLY, MODE_WRONLY and MODE_RDWR"
    elif access[0] == "MODE_RDONLY" and amode & (_M["MODE_CREATE"] | _M["MODE_EXCL"]):
        bad = "MODE_RDONLY without MODE_CREATE or MODE_EXCL"
    elif access[0] == "MODE_RDWR" and amode & _M["MODE_SEQUENTIAL"]:
        bad = "MODE_SEQUENTIAL without MODE_RDWR"
    if bad is not None:
        raise Exception(FILE_ERRORS["ERR_AMODE"], f"collectives.MPI File.Open: amode {amode}: "
                        f"MPI takes {bad}")
    flags = {"MODE_RDONLY": os.O_RDONLY, "MODE_WRONLY": os.O_WRONLY,
             "MODE_RDWR": os.O_RDWR}[access[0]]
    create = bool(amode & _M["MODE_CREATE"])
    return flags, create, False, create and bool(amode & _M["MODE_EXCL"]), \
        bool(amode & _M["MODE_APPEND"])


_BYTE = DATATYPES["BYTE"]


def _committed(dt: Any, what: str) -> str | None:
    """Why a derived datatype cannot make a view (None: it can)."""
    if isinstance(dt, Datatype) and dt.typemap is not None and (dt.freed or not dt.committed):
        return f"{what}: {dt!r} is {'freed' if dt.freed else 'not committed'} (MPI_ERR_TYPE)"
    return None


def _etype(dt: Any, what: str) -> tuple[np.dtype, str | None]:
    """The view's element as collectives.File counts it (a derived etype:
    its size in bytes), and why it cannot be one."""
    if not (isinstance(dt, Datatype) and dt.typemap is not None):
        got = datatype_of(dt, what)
        return (np.dtype(np.uint8) if got is None else got), None
    bad = _committed(dt, what)
    if bad is None:
        tm = dt.typemap
        starts, _ = runs_of(tm.flat(), tm.item)
        if len(starts) > 1:
            bad = (f"{what}: etype {dt!r} has holes in its data: an etype with holes is not "
                   f"provided (its elements, or a contiguous type of them) (MPI_ERR_ARG)")
    return np.dtype(f"V{max(1, dt.Get_size())}"), bad


def _tiling(ft: Any, what: str) -> tuple[Filetype | None, str | None]:
    """A filetype's runs (collectives.fileview), and why it cannot be one."""
    if not (isinstance(ft, Datatype) and ft.typemap is not None):
        size = np.dtype(datatype_of(ft, what) or np.uint8).itemsize
        return Filetype(np.zeros(1, np.int64), np.array([size]), size), None
    bad = _committed(ft, what)
    if bad is not None:
        return None, bad
    tm = ft.typemap
    return Filetype.of(tm.flat(), tm.item, tm.extent), None


class File(Later):
    """mpi4py's MPI.File: ``MPI.File.Open(comm, name, amode)`` (collective),
    and ``f.file``, the collectives.File under it."""

    def __init__(self, f: _File, comm: Any, amode: int) -> None:
        super().__init__()
        self.file = f
        self._comm = comm
        self._amode = amode
        self._pos = 0       # the individual file pointer, in elements of the view
        self._view: tuple[int, Any, Any] = (0, _BYTE, _BYTE)

    def __bool__(self) -> bool:
        """(MPI.FILE_NULL, whose file is None: False)"""
        return self.file is not None

    @classmethod
    def Open(cls, comm: Any, filename: Any, amode: int = MODES["MODE_RDONLY"],
             info: Any = None) -> "File":
        """(collective: the file opened by every rank, and the shared file
        pointer's counter made on rank 0)"""
        how = _how(int(amode))
        try:
            f = _File.opened(comm.mesh, filename, how, f"amode {int(amode)}",
                             delete_on_close=bool(amode & _M["MODE_DELETE_ON_CLOSE"]))
        except FileError as e:
            raise _mpi_error(e) from None
        out = cls(f, comm, int(amode))
        out._pos = f._shared        # (MODE_APPEND: both pointers at the end)
        f.counter = SharedCounter(comm.mesh, f._shared)
        return out

    @staticmethod
    def Delete(filename: Any, info: Any = None) -> None:
        try:
            _File.delete(filename)
        except FileError as e:
            raise _mpi_error(e) from None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name[:1].islower():
            raise AttributeError(f"collectives.MPI.File has no attribute {name!r}")
        raise NotImplementedError(f"collectives.MPI: File.{name}: not provided (README, "
                                  f"\"Coming from mpi4py\", lists what is)")

    def _run(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except FileError as e:
            raise _mpi_error(e) from None

    def Close(self) -> None:
        """(collective; refused on every rank, the file left open, while a
        rank's nonblocking or split call on it is not completed)"""
        if self.file.counter is not None:
            self._run(self.file.check, "close", self._unfinished())
            self.file.counter.free()
            self.file.counter = None
        self._run(self.file.close)

    def Get_amode(self) -> int:
        return self._amode

    amode = property(Get_amode)

    def Get_group(self) -> Any:
        raise NotImplementedError("collectives.MPI: File.Get_group: process groups are not "
                                  "provided: the communicator it was opened on")

    def Get_size(self) -> int:
        return int(self._run(lambda: self.file.size))

    size = property(Get_size)

    def Set_size(self, size: int) -> None:
        self._run(self.file.set_size, size)

    def Preallocate(self, size: int) -> None:
        self._run(self.file.preallocate, size)

    def Sync(self) -> None:
        self._run(self.file.sync)

    # -- the view

    def Set_view(self, disp: int = 0, etype: Any = None, filetype: Any = None,
                 datarep: str | None = "native", info: Any = None) -> None:
        """(collective) Offsets and both file pointers count ``etype``s of
        the view's data: the file from byte ``disp`` tiled with
        ``filetype`` (a derived datatype: its typemap's data, in order; by
        default the etype, a contiguous view)."""
        if datarep not in (None, "native"):
            raise NotImplementedError(f"collectives.MPI: File.Set_view: datarep {datarep!r}: "
                                      f"only 'native' is provided")
        etype = _BYTE if etype is None else etype
        filetype = etype if filetype is None else filetype
        what = "File.Set_view"
        e, bad = _etype(etype, what)
        tiling, bad_ft = _tiling(filetype, what)
        self._run(self.file.check, "set_view", bad or bad_ft)
        self._run(self.file.set_view, disp, e, tiling)
        self._pos = 0
        self._view = (int(disp), etype, filetype)

    def Get_view(self) -> tuple[int, Any, Any, str]:
        return (*self._view, "native")

    def Get_byte_offset(self, offset: int) -> int:
        return self.file.byte_offset(offset)

    def Get_type_extent(self, datatype: Any) -> int:
        """(a datatype's extent in the file: "native", its extent in memory)"""
        if isinstance(datatype, Datatype):
            return int(datatype.Get_extent()[1])
        return np.dtype(datatype_of(datatype, "File.Get_type_extent") or np.uint8).itemsize

    def _status(self, status: Status | None, count: int) -> None:
        if status is not None:
            status.nbytes = count * self.file.etype.itemsize
            status.source = status.tag = -1
            status.error = 0

    def _buf(self, buf: Any, what: str) -> Buf:
        """A buffer spec (a derived datatype's elements packed)."""
        return spec(buf, f"File.{what}", packs=True)

    def _io(self, call: Any, offset: int, buf: Any, status: Status | None, what: str,
            **kw: Any) -> int:
        """A read or write at ``offset`` (elements of the view) of ``buf``'s
        elements (a read's unpacked into a derived datatype's places);
        returns the elements moved."""
        b = self._buf(buf, what)
        n = self._run(call, offset, b.view, **kw)
        if "partial" in kw:
            b.done()
        self._status(status, n)
        return int(n)

    # -- explicit offsets

    def Write_at(self, offset: int, buf: Any, status: Status | None = None) -> None:
        self._io(self.file.write_at, offset, buf, status, "Write_at")

    def Write_at_all(self, offset: int, buf: Any, status: Status | None = None) -> None:
        self._io(self.file.write_at_all, offset, buf, status, "Write_at_all")

    def Read_at(self, offset: int, buf: Any, status: Status | None = None) -> None:
        self._io(self.file.read_at, offset, buf, status, "Read_at", partial=True)

    def Read_at_all(self, offset: int, buf: Any, status: Status | None = None) -> None:
        self._io(self.file.read_at_all, offset, buf, status, "Read_at_all", partial=True)

    # -- the individual file pointer

    def Seek(self, offset: int, whence: int = SEEK_SET) -> None:
        base = {SEEK_SET: 0, SEEK_CUR: self._pos, SEEK_END: -1}
        if whence == SEEK_END:
            base[SEEK_END] = self.file.elements_before(self.Get_size())
        if whence not in base or base[whence] + int(offset) < 0:
            raise Exception(FILE_ERRORS["ERR_ARG"],
                            f"collectives.MPI File.Seek: rank {self._comm.rank}: offset "
                            f"{offset} from whence {whence} (SEEK_SET, SEEK_CUR, SEEK_END) is "
                            f"out of range")
        self._pos = base[whence] + int(offset)

    def Get_position(self) -> int:
        return self._pos

    def _moved(self, call: Any, buf: Any, status: Status | None, what: str, **kw: Any) -> None:
        self._pos += self._io(call, self._pos, buf, status, what, **kw)

    def Write(self, buf: Any, status: Status | None = None) -> None:
        self._moved(self.file.write_at, buf, status, "Write")

    def Write_all(self, buf: Any, status: Status | None = None) -> None:
        self._moved(self.file.write_at_all, buf, status, "Write_all")

    def Read(self, buf: Any, status: Status | None = None) -> None:
        self._moved(self.file.read_at, buf, status, "Read", partial=True)

    def Read_all(self, buf: Any, status: Status | None = None) -> None:
        self._moved(self.file.read_at_all, buf, status, "Read_all", partial=True)

    # -- the shared file pointer, collectively

    def Write_ordered(self, buf: Any, status: Status | None = None) -> None:
        b = self._buf(buf, "Write_ordered")
        self._run(self.file.write_ordered, b.view)
        self._status(status, b.view.nbytes // self.file.etype.itemsize)

    def Read_ordered(self, buf: Any, status: Status | None = None) -> None:
        b = self._buf(buf, "Read_ordered")
        self._run(self.file.read_ordered, b.view, partial=True)
        b.done()
        self._status(status, b.view.nbytes // self.file.etype.itemsize)

    def Get_atomicity(self) -> bool:
        return False

    def Set_atomicity(self, flag: bool) -> None:
        if flag:
            raise NotImplementedError("collectives.MPI: File.Set_atomicity(True): atomic mode "
                                      "is not provided: Sync and a Barrier between a write "
                                      "and another rank's read of it")

    def __repr__(self) -> str:
        return f"<MPI.File {self.file.path!r} rank {self._comm.rank}>"
