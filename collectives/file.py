"""Parallel file I/O over a group (MPI-IO's MPI.File) on plain POSIX calls:
every rank reads and writes its own part of one file at its own offset,
by os.pwrite and os.preadv, no copy through another rank::

    with C.File.open(world, "ckpt.bin", "w") as f:    # collective: rank 0 creates
        f.set_view(0, np.float32)                     # offsets in float32 elements
        f.write_at_all(world.rank * n, shard)         # every rank its slice
        f.write_ordered(rows)                         # each rank's after the ranks before

The collective calls (open, close, the ``_all`` and ``_ordered`` calls,
set_view, set_size, preallocate, sync) agree on their outcome: an error
on any rank is raised on every rank as a FileError naming the rank, the
call and the errno. The independent ones (write_at, read_at, size) raise
on the rank that made them. A view is a displacement and an element type
(MPI's etype, as its filetype too); MPI's strided filetypes are not
provided."""
from __future__ import annotations

import errno as _errno
import os
import zlib
from typing import Any

import numpy as np

from mesh import Comm
from mesh.tensors import cpu_numpy, is_tensor

from .api import all_reduce
from .host.paths import all_gather_object

__all__ = ["File", "FileError", "MODES"]

_ANY = os.O_RDWR
# mode: (flags every rank opens with, rank 0 creates, truncates, fails where it exists, at end)
MODES: dict[str, tuple[int, bool, bool, bool, bool]] = {
    "r": (os.O_RDONLY, False, False, False, False),
    "r+": (_ANY, False, False, False, False),
    "w": (_ANY, True, True, False, False),
    "x": (_ANY, True, False, True, False),
    "a": (_ANY, True, False, False, True),
}
_MAX = 2 ** 63 - 1


class FileError(OSError):
    """A File call that failed on one or more ranks, raised on every rank of
    a collective call: ``errors`` maps each failed rank to its (errno,
    message); ``errno`` and ``rank`` are the first failed rank's."""

    def __init__(self, call: str, path: str, errors: dict[int, tuple[int, str]]) -> None:
        first = min(errors)
        code = errors[first][0]
        said = "; ".join(("" if len(errors) == 1 else f"rank {r}: ") + m
                         + (f" [errno {e} {_errno.errorcode.get(e, '?')}]" if e else "")
                         for r, (e, m) in errors.items())
        super().__init__(code or None, f"File.{call} of {path} failed on rank"
                         f"{'s' if len(errors) > 1 else ''} {', '.join(map(str, errors))}: "
                         f"{said}")
        self.rank = first
        self.errors = errors
        self.call = call
        self.filename = path

    def __str__(self) -> str:
        return str(self.args[-1])

    def __reduce__(self) -> Any:
        return FileError, (self.call, self.filename, self.errors)


def _bytes_of(data: Any, what: str, writable: bool) -> np.ndarray:
    """``data``'s memory as a flat uint8 array: a numpy array, a CPU torch
    tensor, or anything with the buffer protocol; a read's must be
    contiguous and writable (it is filled), a write's is copied if not
    contiguous."""
    a: Any = data
    if is_tensor(data):
        if not data.is_cpu:
            raise TypeError(f"{what}: a {data.device} tensor: File reads and writes CPU "
                            f"tensors (.cpu() it, and copy a read back)")
        a = cpu_numpy(data.detach())
        if a is None:
            raise TypeError(f"{what}: a {data.dtype} tensor numpy cannot view (its bits: "
                            f".view(torch.int16) for bfloat16)")
    elif not isinstance(data, np.ndarray):
        try:
            a = np.frombuffer(memoryview(data), np.uint8) if writable is False \
                else np.asarray(memoryview(data))
        except TypeError:
            raise TypeError(f"{what}: {type(data).__name__} is no array (a numpy array, CPU "
                            f"tensor, bytes or bytearray)") from None
    if not a.flags.c_contiguous:
        if writable:
            raise ValueError(f"{what}: the buffer read into is not contiguous: read into "
                             f"np.empty_like(a) and copy, or pass a contiguous one")
        a = np.ascontiguousarray(a)
    if writable and not a.flags.writeable:
        raise ValueError(f"{what}: the buffer read into is read-only")
    return a.reshape(-1).view(np.uint8)


class File:
    """One file opened by every rank of a group (``File.open``). Offsets
    are in the view's elements from its displacement (``set_view``; bytes
    from 0 until then)."""

    def __init__(self, g: Comm, path: str, mode: str, fd: int, delete_on_close: bool,
                 timeout: float | None) -> None:
        self.group = g
        self.path = path
        self.mode = mode
        self._fd: int | None = fd
        self._delete = delete_on_close
        self._timeout = timeout
        self.disp = 0
        self.etype = np.dtype(np.uint8)
        self._shared = 0            # the ordered calls' place, in elements of the view
        self._readonly = False

    # -- opening and closing ---------------------------------------------------------------

    @classmethod
    def open(cls, g: Comm, path: Any, mode: str = "r", *, delete_on_close: bool = False,
             perm: int = 0o666, timeout: float | None = None) -> "File":
        """Collective: ``mode`` "r" (it must exist), "r+" (read and write, it
        must exist), "w" (made or emptied), "x" (made; fails where it exists),
        "a" (made where missing; the ordered calls start at its end). Rank 0
        makes or empties it, then every rank opens it; a failure on any rank
        (a file one host does not see, a permission) fails every rank's,
        naming the rank and the errno. ``path`` may differ between ranks
        (another mount of the same file)."""
        if mode not in MODES:
            raise ValueError(f"File.open: mode {mode!r}: one of {', '.join(MODES)}")
        return cls.opened(g, path, MODES[mode], mode, delete_on_close=delete_on_close,
                          perm=perm, timeout=timeout)

    @classmethod
    def opened(cls, g: Comm, path: Any, how: tuple[int, bool, bool, bool, bool], label: str,
               *, delete_on_close: bool = False, perm: int = 0o666,
               timeout: float | None = None) -> "File":
        """``open`` by its parts (a MODES row: the flags every rank opens with,
        whether rank 0 makes it, empties it, fails where it exists, and the
        ordered calls start at its end); ``label`` names the mode in errors
        and must be alike on every rank."""
        flags, create, trunc, excl, at_end = how
        path = os.fspath(path)
        made: tuple[int, str] | None = None
        if g.rank == 0 and create:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if trunc else 0)
                                 | (os.O_EXCL if excl else 0), perm))
            except OSError as e:
                made = (e.errno or 0, f"making it: {e.strerror}")
        _agree(g, "open", path, made, timeout, extra=label)
        fd = None
        err = None
        try:
            fd = os.open(path, flags)
        except OSError as e:
            err = (e.errno or 0, f"opening it ({label}): {e.strerror}")
        try:
            _agree(g, "open", path, err, timeout)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        assert fd is not None
        f = cls(g, path, label, fd, delete_on_close, timeout)
        f._readonly = flags & os.O_ACCMODE == os.O_RDONLY
        if at_end:
            f._shared = os.fstat(fd).st_size
        return f

    def close(self) -> None:
        """Collective: closes every rank's; the file is deleted after, where
        opened with ``delete_on_close``. Closing a closed File does nothing."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        err = self._try(lambda: os.close(fd), "closing it")
        if self._delete:
            self._agree("close", err)
            err = None
            if self.group.rank == 0:
                err = self._try(lambda: os.unlink(self.path), "deleting it")
        self._agree("close", err)

    def __enter__(self) -> "File":
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        if kind is None:
            self.close()
        elif self._fd is not None:      # (an error on this rank: the others may not close)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)      # type: ignore[arg-type]
            except OSError:
                pass

    @staticmethod
    def delete(path: Any) -> None:
        """Remove a file (MPI's File.Delete; not collective: one rank calls it)."""
        p = os.fspath(path)
        try:
            os.unlink(p)
        except OSError as e:
            raise FileError("delete", p, {0: (e.errno or 0, e.strerror or str(e))}) from None

    # -- views and sizes -------------------------------------------------------------------

    def set_view(self, disp: int = 0, etype: Any = np.uint8) -> None:
        """Collective: offsets from now on count ``etype`` elements from byte
        ``disp`` (MPI's Set_view with filetype = etype); the ordered calls
        start again at its start."""
        err = None
        try:
            dt = np.dtype(etype)
            if int(disp) < 0 or int(disp) > _MAX:
                raise ValueError(f"displacement {disp} out of range")
            if dt.itemsize == 0:
                raise ValueError(f"element type {dt} has no size")
        except (TypeError, ValueError) as e:
            err = (0, str(e))
        self._agree("set_view", err, extra=None if err else (int(disp), dt.str))
        self.disp, self.etype, self._shared = int(disp), dt, 0

    @property
    def size(self) -> int:
        """The file's size in bytes (MPI's Get_size; not collective)."""
        try:
            return os.fstat(self._open("size")).st_size
        except OSError as e:
            raise self._alone("size", e) from None

    def set_size(self, nbytes: int) -> None:
        """Collective: the file cut or grown (zeros) to ``nbytes`` by rank 0."""
        n = self._count(nbytes, "set_size")
        fd = self._open("set_size")
        err = self._try(lambda: os.ftruncate(fd, n), "truncating it") \
            if self.group.rank == 0 else None
        self._agree("set_size", err)

    def preallocate(self, nbytes: int) -> None:
        """Collective: space for ``nbytes`` reserved by rank 0 (posix_fallocate:
        the file grows to it where smaller, never shrinks)."""
        n = self._count(nbytes, "preallocate")
        fd = self._open("preallocate")
        err = None
        if self.group.rank == 0 and n > 0:
            err = self._try(lambda: os.posix_fallocate(fd, 0, n), "reserving space")
        self._agree("preallocate", err)

    def sync(self) -> None:
        """Collective: every rank's writes on the disk (fsync) before any returns."""
        fd = self._open("sync")
        self._agree("sync", self._try(lambda: os.fsync(fd), "fsync"))

    # -- independent reads and writes ------------------------------------------------------

    def write_at(self, offset: int, data: Any) -> int:
        """``data`` (a numpy array, CPU tensor or bytes) at ``offset`` elements
        of the view; returns the elements written."""
        return self._write(offset, data, "write_at")

    def read_at(self, offset: int, out: Any, *, partial: bool = False) -> int:
        """``out`` filled from ``offset`` elements of the view; returns the
        elements read. Past the end of the file: a FileError naming the
        offset and the bytes there, or with ``partial=True`` what there was
        (the rest of ``out`` left as it was)."""
        return self._read(offset, out, "read_at", partial)

    # -- collective reads and writes -------------------------------------------------------

    def write_at_all(self, offset: int, data: Any) -> int:
        """Collective write_at: every rank its own ``data`` at its own offset;
        an error on any rank is raised on every rank."""
        return self._all("write_at_all", lambda: self._write(offset, data, "write_at_all"))

    def read_at_all(self, offset: int, out: Any, *, partial: bool = False) -> int:
        """Collective read_at (a short read, unless ``partial``, fails every rank)."""
        return self._all("read_at_all",
                         lambda: self._read(offset, out, "read_at_all", partial))

    def write_ordered(self, data: Any) -> int:
        """Collective: each rank's ``data`` right after the ranks before it's,
        from where the last ordered call ended (the view's start, or the
        file's end in mode "a"); returns this rank's offset in elements."""
        return self._ordered("write_ordered", data, lambda off: self._write(off, data,
                                                                            "write_ordered"))

    def read_ordered(self, out: Any, *, partial: bool = False) -> int:
        """Collective: each rank's ``out`` filled from right after the ranks
        before it's (as write_ordered wrote them); returns its offset."""
        return self._ordered("read_ordered", out,
                             lambda off: self._read(off, out, "read_ordered", partial))

    # -- the parts -------------------------------------------------------------------------

    def __repr__(self) -> str:
        return (f"<collectives.File {self.path!r} {self.mode!r} rank {self.group.rank} of "
                f"{self.group.size}{'' if self._fd is not None else ' closed'}>")

    def _open(self, call: str) -> int:
        if self._fd is None:
            raise ValueError(f"File.{call} of {self.path}: rank {self.group.rank}: the file "
                             f"is closed")
        return self._fd

    def _alone(self, call: str, e: OSError) -> FileError:
        return FileError(call, self.path, {self.group.rank: (e.errno or 0,
                                                             e.strerror or str(e))})

    def _count(self, n: Any, call: str) -> int:
        if int(n) < 0 or int(n) > _MAX:
            raise ValueError(f"File.{call} of {self.path}: rank {self.group.rank}: "
                             f"{n} bytes is out of range")
        return int(n)

    def _at(self, offset: Any, nbytes: int, call: str) -> int:
        """The byte offset of element ``offset`` of the view."""
        off = self.disp + int(offset) * self.etype.itemsize
        if int(offset) < 0 or off + nbytes > _MAX:
            raise ValueError(f"File.{call} of {self.path}: rank {self.group.rank}: offset "
                             f"{offset} (in {self.etype} elements from byte {self.disp}) is "
                             f"out of range")
        return off

    def _elements(self, raw: np.ndarray, call: str) -> int:
        if raw.nbytes % self.etype.itemsize:
            raise ValueError(f"File.{call} of {self.path}: rank {self.group.rank}: "
                             f"{raw.nbytes} bytes are no whole number of the view's "
                             f"{self.etype} elements")
        return raw.nbytes // self.etype.itemsize

    def _write(self, offset: int, data: Any, call: str) -> int:
        fd = self._open(call)
        if self._readonly:
            raise ValueError(f"File.{call} of {self.path}: rank {self.group.rank}: opened "
                             f"read-only ({self.mode})")
        raw = _bytes_of(data, f"File.{call}", writable=False)
        count = self._elements(raw, call)
        at = self._at(offset, raw.nbytes, call)
        done, view = 0, raw.data
        try:
            while done < raw.nbytes:
                done += os.pwrite(fd, view[done:], at + done)
        except OSError as e:
            raise self._alone(call, e) from None
        return count

    def _read(self, offset: int, out: Any, call: str, partial: bool) -> int:
        fd = self._open(call)
        raw = _bytes_of(out, f"File.{call}", writable=True)
        self._elements(raw, call)
        at = self._at(offset, raw.nbytes, call)
        done, view = 0, raw.data
        try:
            while done < raw.nbytes:
                got = os.preadv(fd, [view[done:]], at + done)
                if got == 0:
                    break
                done += got
        except OSError as e:
            raise self._alone(call, e) from None
        if done < raw.nbytes and not partial:
            raise FileError(call, self.path, {self.group.rank: (0, (
                f"short read: {raw.nbytes} bytes wanted at byte {at}, the file ends "
                f"{done} bytes after it (size {at + done}; partial=True takes what there is)"
            ))})
        return done // self.etype.itemsize

    def _all(self, call: str, body: Any) -> int:
        err, n = None, 0
        try:
            n = body()
        except FileError as e:
            err = e.errors[self.group.rank]
        except (OSError, ValueError, TypeError) as e:
            err = (getattr(e, "errno", 0) or 0, str(e))
        self._agree(call, err)
        return n

    def _ordered(self, call: str, buf: Any, body: Any) -> int:
        mine: int | str
        try:
            raw = _bytes_of(buf, f"File.{call}", writable=call.startswith("read"))
            mine = self._elements(raw, call)
        except (ValueError, TypeError) as e:
            mine = str(e)
        counts = all_gather_object(self.group, mine, timeout=self._timeout)
        bad = {r: (0, c) for r, c in enumerate(counts) if isinstance(c, str)}
        if bad:
            raise FileError(call, self.path, bad)
        start = self._shared + sum(counts[:self.group.rank])
        self._shared += sum(counts)
        self._all(call, lambda: body(start))
        return start

    def _try(self, fn: Any, doing: str) -> tuple[int, str] | None:
        try:
            fn()
        except OSError as e:
            return (e.errno or 0, f"{doing}: {e.strerror or e}")
        return None

    def _agree(self, call: str, err: tuple[int, str] | None, extra: Any = None) -> None:
        _agree(self.group, call, self.path, err, self._timeout, extra)


def _agree(g: Comm, call: str, path: str, err: tuple[int, str] | None,
           timeout: float | None, extra: Any = None) -> None:
    """Every rank's outcome of ``call`` to every rank: a FileError naming
    each rank that failed, on all of them (``extra``: what the ranks must
    pass alike, the mode or the view: a difference fails them all). A tiny
    all_reduce of a flag and the extra's crc says whether all went well;
    the reasons are gathered only where one did not."""
    code = zlib.crc32(repr(extra).encode())
    flags = all_reduce(g, np.array([err is not None, code, -code], np.int64), op="max",
                       timeout=timeout)
    if not flags[0] and flags[1] == -flags[2]:
        return
    said = all_gather_object(g, [list(err) if err else None, extra], timeout=timeout)
    errors = {r: (int(e[0]), str(e[1])) for r, (e, _) in enumerate(said) if e}
    if not errors and any(x != said[0][1] for _, x in said):
        errors = {r: (0, f"passed {x!r} where rank 0 passed {said[0][1]!r}")
                  for r, (_, x) in enumerate(said) if x != said[0][1]}
    if errors:
        raise FileError(call, path, errors)
