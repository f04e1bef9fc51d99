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
call and the errno (fileagree.py); ``agree_later`` does a call's own
part at once and agrees in the background (MPI's nonblocking collectives).
The independent ones (write_at, read_at, size) raise on the rank that
made them. A view is a displacement, an element type
(MPI's etype) and, for a strided or interleaved view, a filetype
(collectives.fileview.Filetype: runs of data tiled over the file from the
displacement); a read or write through one moves each run the stretch of
data covers by one pread or pwrite, adjacent runs merged, holes untouched."""
from __future__ import annotations

import errno as _errno
import os
from typing import Any

import numpy as np

from mesh import Comm
from mesh.tensors import cpu_numpy, is_tensor

from .fileagree import Agreement, FileError, agree as _agree, said as _said
from .fileview import Filetype
from .host.paths import all_gather_object, broadcast_object

__all__ = ["File", "FileError", "MODES", "Agreement"]

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
        self.filetype: Filetype | None = None
        self._shared = 0            # the ordered calls' place, in elements of the view
        # (or a counter every rank adds to atomically, held by rank 0: add(n), get(), set(v))
        self.counter: Any = None
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

    def set_view(self, disp: int = 0, etype: Any = np.uint8,
                 filetype: Filetype | None = None) -> None:
        """Collective: offsets from now on count ``etype`` elements of the
        view's data from byte ``disp`` (MPI's Set_view): the bytes from
        there on, or with a ``filetype`` its runs, the file tiled with it
        from ``disp`` (each rank may have its own, its data a whole number
        of ``etype`` elements, monotone, without overlap where the file is
        written); the ordered calls start again at its start."""
        err = None
        try:
            dt = np.dtype(etype)
            if int(disp) < 0 or int(disp) > _MAX:
                raise ValueError(f"displacement {disp} out of range (MPI_ERR_ARG)")
            if dt.itemsize == 0:
                raise ValueError(f"element type {dt} has no size")
            if filetype is not None:
                _fits(filetype, dt, not self._readonly)
                if filetype.contiguous:
                    filetype = None
            if self.counter is not None and self.group.rank == 0:
                self.counter.set(0)
        except (TypeError, ValueError) as e:
            err = (_errno.EINVAL, str(e))
        except OSError as e:
            err = (e.errno or 0, str(e))
        self._agree("set_view", err, extra=None if err else dt.itemsize)
        self.disp, self.etype, self._shared = int(disp), dt, 0
        self.filetype = filetype

    def byte_offset(self, offset: int) -> int:
        """The file byte of element ``offset`` of the view (MPI's
        Get_byte_offset)."""
        pos = int(offset) * self.etype.itemsize
        return self.disp + (pos if self.filetype is None else self.filetype.byte_of(pos))

    def elements_before(self, nbytes: int) -> int:
        """The view's elements that lie before file byte ``nbytes`` (where
        the file's end falls in the view: MPI's SEEK_END)."""
        rel = int(nbytes) - self.disp
        data = rel if self.filetype is None else self.filetype.data_before(rel)
        return max(0, data) // self.etype.itemsize

    def check(self, call: str, problem: str | None, extra: Any = None) -> None:
        """Collective: a caller's own check of its arguments, agreed: a
        ``problem`` any rank has, or an ``extra`` that differs between
        ranks, raised on every rank as a FileError naming it."""
        self._agree(call, None if problem is None else (0, problem), extra)

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

    def _runs(self, offset: Any, nbytes: int, call: str) -> tuple[np.ndarray, np.ndarray]:
        """The file's runs (byte starts, lengths) that ``nbytes`` of the
        view's data from element ``offset`` lie in, in order."""
        pos = int(offset) * self.etype.itemsize
        if self.filetype is None:
            starts, lengths = np.array([self.disp + pos]), np.array([nbytes])
        else:
            starts, lengths = self.filetype.runs(pos, nbytes)
            starts = starts + self.disp
        if int(offset) < 0 or (len(starts) and int(starts[-1] + lengths[-1]) > _MAX):
            raise ValueError(f"File.{call} of {self.path}: rank {self.group.rank}: offset "
                             f"{offset} (in {self.etype} elements from byte {self.disp}) is "
                             f"out of range")
        return starts, lengths

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
        starts, lengths = self._runs(offset, raw.nbytes, call)
        view, mem = raw.data, 0
        try:
            for at, n in zip(starts.tolist(), lengths.tolist()):
                done = 0
                while done < n:
                    done += os.pwrite(fd, view[mem + done:mem + n], at + done)
                mem += n
        except OSError as e:
            raise self._alone(call, e) from None
        return count

    def _read(self, offset: int, out: Any, call: str, partial: bool) -> int:
        fd = self._open(call)
        raw = _bytes_of(out, f"File.{call}", writable=True)
        self._elements(raw, call)
        starts, lengths = self._runs(offset, raw.nbytes, call)
        view, mem, at, short = raw.data, 0, 0, False
        try:
            for at, n in zip(starts.tolist(), lengths.tolist()):
                done = 0
                while done < n:
                    got = os.preadv(fd, [view[mem + done:mem + n]], at + done)
                    if got == 0:
                        break
                    done += got
                mem += done
                if done < n:
                    short, at = True, at + done
                    break
        except OSError as e:
            raise self._alone(call, e) from None
        if short and not partial:
            first = int(starts[0]) if len(starts) else self.disp
            raise FileError(call, self.path, {self.group.rank: (0, (
                f"short read: {raw.nbytes} bytes wanted from byte {first}, the file ends "
                f"after {mem} of them (size {at}; partial=True takes what there is)"))})
        return mem // self.etype.itemsize

    def _own(self, body: Any) -> tuple[int, Any]:
        """A collective call's own part, ``body()``: (its count, None) or
        (0, this rank's error as the ranks' agreement takes it)."""
        try:
            return body(), None
        except FileError as e:
            return 0, e.errors[self.group.rank]
        except (OSError, ValueError, TypeError) as e:
            return 0, _said(e)

    def _all(self, call: str, body: Any) -> int:
        n, err = self._own(body)
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
        if self.counter is None:
            base = self._shared
            self._shared += sum(counts)
        else:
            base = broadcast_object(self.group, self.counter.add(sum(counts))
                                    if self.group.rank == 0 else None, timeout=self._timeout)
        start = base + sum(counts[:self.group.rank])
        self._all(call, lambda: body(start))
        return start

    def agree_later(self, call: str, body: Any) -> "Agreement":
        """A collective call's own part, ``body()`` (its count), done now;
        the ranks' outcomes gathered in the background (a nonblocking
        all_gather, in call order among the group's collectives): the
        Agreement's ``wait()`` returns the count or raises the FileError
        every rank raises (MPI's nonblocking collective I/O)."""
        return Agreement(self, call, *self._own(body))

    def _try(self, fn: Any, doing: str) -> tuple[int, str] | None:
        try:
            fn()
        except OSError as e:
            return (e.errno or 0, f"{doing}: {e.strerror or e}")
        return None

    def _agree(self, call: str, err: tuple[int, str] | None, extra: Any = None) -> None:
        _agree(self.group, call, self.path, err, self._timeout, extra)


def _fits(ft: Filetype, dt: np.dtype, writing: bool) -> None:
    """MPI's rules for a filetype under etype ``dt`` (ValueError: which)."""
    bad = ft.problem(writing)
    if bad is not None:
        raise ValueError(f"filetype: {bad} (MPI_ERR_TYPE)")
    odd = ft.lengths[ft.lengths % dt.itemsize != 0]
    if ft.size % dt.itemsize or len(odd):
        raise ValueError(f"filetype: its data ({ft.size} bytes a tile, in runs of "
                         f"{sorted(set(ft.lengths.tolist()))[:4]} bytes) is no whole number of "
                         f"the view's {dt.itemsize}-byte etype (MPI_ERR_ARG)")
