"""How collectives.File's ranks agree on a collective call's outcome: an
error on any rank raised on every rank as a FileError naming each failed
rank, its reason and errno. ``agree`` blocks (a tiny all_reduce of a flag
and a checksum of what the ranks must pass alike; the reasons gathered only
where one failed); an ``Agreement`` gathers the outcomes in the background
(a nonblocking all_gather of a fixed record a rank), for the nonblocking
calls: no rank waits for another's call, and its ``wait`` raises alike on
every rank."""
from __future__ import annotations

import errno as _errno
import zlib
from typing import Any

import numpy as np

from mesh import Comm

from .api import all_gather, all_reduce
from .host.paths import all_gather_object

__all__ = ["FileError", "Agreement", "agree", "said"]


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


def said(e: BaseException) -> tuple[int, str]:
    """A rank's failure as the others hear it: its errno (EINVAL for a bad
    argument) and text."""
    code = getattr(e, "errno", 0) or 0
    return (code or (_errno.EINVAL if isinstance(e, (ValueError, TypeError)) else 0), str(e))


class Agreement:
    """A collective call whose ranks' outcomes are on their way
    (collectives.File.agree_later): ``done()``, ``wait()`` (the count, or
    the FileError naming every failed rank)."""

    _SAID = 240     # (bytes of a rank's reason that travel)

    def __init__(self, f: Any, call: str, count: int, err: tuple[int, str] | None) -> None:
        self.call, self.path, self.count = call, f.path, count
        rec = np.zeros(8 + self._SAID, np.uint8)
        if err is not None:
            rec[:8] = np.frombuffer(np.array([1, err[0]], np.int32).tobytes(), np.uint8)
            said = err[1].encode()[:self._SAID]
            rec[8:8 + len(said)] = np.frombuffer(said, np.uint8)
        self._work = all_gather(f.group, rec, async_op=True, timeout=f._timeout)

    def done(self) -> bool:
        return bool(self._work.done())

    def wait(self, timeout: float | None = None) -> int:
        rows = np.asarray(self._work.wait(timeout)).reshape(-1, 8 + self._SAID)
        errors = {}
        for r, row in enumerate(rows):
            failed, code = np.frombuffer(row[:8].tobytes(), np.int32)
            if failed:
                said = row[8:].tobytes().rstrip(b"\0").decode(errors="replace")
                errors[r] = (int(code), said)
        if errors:
            raise FileError(self.call, self.path, errors)
        return self.count


def agree(g: Comm, call: str, path: str, err: tuple[int, str] | None,
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
