"""mpi4py's MPI.File over collectives.File (POSIX pread and pwrite at each
rank's own offset): ``File.Open(comm, name, amode)`` with Open MPI's
``MODE_*`` flags, the explicit-offset calls (Write_at, Read_at and their
``_all`` forms), the individual file pointer (Write, Read, their ``_all``
forms, Seek, Get_position), the ordered calls, Set_view with a filetype
equal to its etype, Get_size, Set_size, Preallocate, Sync, Close, Delete.
An error is mpi4py's MPI.Exception with MPI's error class (ERR_NO_SUCH_FILE,
ERR_ACCESS...), raised on every rank of a collective call, its text naming
the rank; what is not provided raises NotImplementedError naming it."""
from __future__ import annotations

import errno
import os
from typing import Any

import numpy as np

from ..file import File as _File, FileError
from .buffers import spec
from .requests import Status
from .types import Datatype, Exception, datatype_of

__all__ = ["File", "MODES", "SEEK_SET", "SEEK_CUR", "SEEK_END", "FILE_ERRORS"]

# Open MPI's values, as mpi4py has them
MODES = {"MODE_CREATE": 1, "MODE_RDONLY": 2, "MODE_WRONLY": 4, "MODE_RDWR": 8,
         "MODE_DELETE_ON_CLOSE": 16, "MODE_UNIQUE_OPEN": 32, "MODE_EXCL": 64,
         "MODE_APPEND": 128, "MODE_SEQUENTIAL": 256}
SEEK_SET, SEEK_CUR, SEEK_END = 600, 602, 604
FILE_ERRORS = {"ERR_ARG": 13, "ERR_ACCESS": 20, "ERR_AMODE": 21, "ERR_BAD_FILE": 23, "ERR_FILE": 30,
               "ERR_FILE_EXISTS": 28, "ERR_IO": 35, "ERR_NO_SPACE": 41,
               "ERR_NO_SUCH_FILE": 42, "ERR_UNSUPPORTED_OPERATION": 52}
_CLASS = {errno.ENOENT: 42, errno.ENOTDIR: 42, errno.EEXIST: 28, errno.EACCES: 20,
          errno.EPERM: 20, errno.EROFS: 20, errno.EBADF: 20, errno.ENOSPC: 41,
          errno.EDQUOT: 41, errno.EISDIR: 23, errno.ENAMETOOLONG: 23}
_M = MODES


def _mpi_error(e: FileError) -> Exception:
    err = Exception(_CLASS.get(e.errno or 0, FILE_ERRORS["ERR_IO"] if e.errno
                               else FILE_ERRORS["ERR_FILE"]), f"collectives.MPI {e}")
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


def _etype(dt: Any, what: str) -> np.dtype:
    got = datatype_of(dt, what)
    return np.dtype(np.uint8) if got is None else got


class File:
    """mpi4py's MPI.File: ``MPI.File.Open(comm, name, amode)`` (collective),
    and ``f.file``, the collectives.File under it."""

    def __init__(self, f: _File, comm: Any, amode: int) -> None:
        self.file = f
        self._comm = comm
        self._amode = amode
        self._pos = 0       # the individual file pointer, in elements of the view
        self._etype_dt: Any = None

    @classmethod
    def Open(cls, comm: Any, filename: Any, amode: int = MODES["MODE_RDONLY"],
             info: Any = None) -> "File":
        how = _how(int(amode))
        try:
            f = _File.opened(comm.mesh, filename, how, f"amode {int(amode)}",
                             delete_on_close=bool(amode & _M["MODE_DELETE_ON_CLOSE"]))
        except FileError as e:
            raise _mpi_error(e) from None
        out = cls(f, comm, int(amode))
        out._pos = f._shared        # (MODE_APPEND: both pointers at the end)
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
        if name.startswith("I") or name.endswith(("_begin", "_end")):
            base = name[1:].capitalize() if name.startswith("I") else name.rsplit("_", 1)[0]
            why = f"nonblocking and split collective file calls are not provided: call " \
                  f"{base} (blocking)"
        elif name.endswith("_shared"):
            why = "the shared file pointer's independent calls are not provided: " \
                  "Write_ordered and Read_ordered (collective), or Write_at at an offset"
        else:
            why = "not provided (README, \"Coming from mpi4py\", lists what is)"
        raise NotImplementedError(f"collectives.MPI: File.{name}: {why}")

    def _run(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except FileError as e:
            raise _mpi_error(e) from None

    def Close(self) -> None:
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

    def Set_view(self, disp: int = 0, etype: Any = None, filetype: Any = None,
                 datarep: str = "native", info: Any = None) -> None:
        e = _etype(etype, "File.Set_view")
        if filetype is not None and _etype(filetype, "File.Set_view") != e:
            raise NotImplementedError(
                "collectives.MPI: File.Set_view: a filetype other than the etype (MPI's "
                "strided or derived file views) is not provided: write each block at its "
                "own offset (Write_at_all)")
        if datarep != "native":
            raise NotImplementedError(f"collectives.MPI: File.Set_view: datarep {datarep!r}: "
                                      f"only 'native' is provided")
        self._run(self.file.set_view, disp, e)
        self._pos = 0
        self._etype_dt = etype

    def Get_view(self) -> tuple[int, Any, Any]:
        dt = self._etype_dt if isinstance(self._etype_dt, Datatype) else \
            Datatype("BYTE", "B") if self._etype_dt is None else self._etype_dt
        return self.file.disp, dt, dt

    def Get_byte_offset(self, offset: int) -> int:
        return self.file.disp + int(offset) * self.file.etype.itemsize

    def _status(self, status: Status | None, count: int) -> None:
        if status is not None:
            status.nbytes = count * self.file.etype.itemsize
            status.source = status.tag = -1
            status.error = 0

    # -- explicit offsets

    def Write_at(self, offset: int, buf: Any, status: Status | None = None) -> None:
        self._status(status, self._run(self.file.write_at, offset,
                                       spec(buf, "File.Write_at").view))

    def Write_at_all(self, offset: int, buf: Any, status: Status | None = None) -> None:
        self._status(status, self._run(self.file.write_at_all, offset,
                                       spec(buf, "File.Write_at_all").view))

    def Read_at(self, offset: int, buf: Any, status: Status | None = None) -> None:
        self._status(status, self._run(self.file.read_at, offset,
                                       spec(buf, "File.Read_at").view, partial=True))

    def Read_at_all(self, offset: int, buf: Any, status: Status | None = None) -> None:
        self._status(status, self._run(self.file.read_at_all, offset,
                                       spec(buf, "File.Read_at_all").view, partial=True))

    # -- the individual file pointer

    def Seek(self, offset: int, whence: int = SEEK_SET) -> None:
        base = {SEEK_SET: 0, SEEK_CUR: self._pos,
                SEEK_END: (self.Get_size() - self.file.disp) // self.file.etype.itemsize}
        if whence not in base or base[whence] + int(offset) < 0:
            raise Exception(FILE_ERRORS["ERR_ARG"],
                            f"collectives.MPI File.Seek: offset {offset} from whence "
                            f"{whence} (SEEK_SET, SEEK_CUR, SEEK_END) is out of range")
        self._pos = base[whence] + int(offset)

    def Get_position(self) -> int:
        return self._pos

    def _moved(self, call: Any, buf: Any, status: Status | None, what: str, **kw: Any) -> None:
        n = self._run(call, self._pos, spec(buf, what).view, **kw)
        self._pos += n
        self._status(status, n)

    def Write(self, buf: Any, status: Status | None = None) -> None:
        self._moved(self.file.write_at, buf, status, "File.Write")

    def Write_all(self, buf: Any, status: Status | None = None) -> None:
        self._moved(self.file.write_at_all, buf, status, "File.Write_all")

    def Read(self, buf: Any, status: Status | None = None) -> None:
        self._moved(self.file.read_at, buf, status, "File.Read", partial=True)

    def Read_all(self, buf: Any, status: Status | None = None) -> None:
        self._moved(self.file.read_at_all, buf, status, "File.Read_all", partial=True)

    # -- the shared file pointer, collectively

    def Write_ordered(self, buf: Any, status: Status | None = None) -> None:
        v = spec(buf, "File.Write_ordered").view
        self._run(self.file.write_ordered, v)
        self._status(status, v.nbytes // self.file.etype.itemsize)

    def Read_ordered(self, buf: Any, status: Status | None = None) -> None:
        v = spec(buf, "File.Read_ordered").view
        self._run(self.file.read_ordered, v, partial=True)
        self._status(status, v.nbytes // self.file.etype.itemsize)

    def Get_position_shared(self) -> int:
        return self.file._shared

    def Get_atomicity(self) -> bool:
        return False

    def Set_atomicity(self, flag: bool) -> None:
        if flag:
            raise NotImplementedError("collectives.MPI: File.Set_atomicity(True): atomic mode "
                                      "is not provided: Sync and a Barrier between a write "
                                      "and another rank's read of it")

    def __repr__(self) -> str:
        return f"<MPI.File {self.file.path!r} rank {self._comm.rank}>"
