"""A file view's filetype (MPI-IO's): where a view's data lies in a file.
A filetype is runs of data bytes in one tile, the file tiled with it from
the view's displacement every ``extent`` bytes; the view's data is the
runs' bytes one after another, tile after tile, and offsets into it count
the view's elements (its etype)::

    filetype: runs (0, 8) and (16, 8), extent 40; displacement 16
    file:     |-- 16 --|D0|  |D1|        |D2|  |D3|        |D4| ...
                       16    32          56    72          96
    data:     D0 D1 D2 D3 D4 ... (stream bytes 0, 8, 16, 24, 32)

Every mapping is a pure function of integers (numpy arrays of them), for
collectives.File's reads and writes: a stretch of the data is the file's
runs it covers, adjacent runs merged, so a contiguous view is one run."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Filetype", "runs_of"]


def runs_of(offsets: np.ndarray, item: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of elements of ``item`` bytes at byte ``offsets``
    (in their order), each element adjacent to the one before merged into
    its run."""
    at = np.asarray(offsets, np.int64).reshape(-1)
    if len(at) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    new = np.empty(len(at), bool)
    new[0] = True
    new[1:] = at[1:] != at[:-1] + item
    first = np.flatnonzero(new)
    lengths = np.diff(np.append(first, len(at))) * item
    return at[first], lengths.astype(np.int64)


def _merged(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs without empty ones, each adjacent to the one before merged."""
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    if len(starts) < 2:
        return starts, lengths
    new = np.empty(len(starts), bool)
    new[0] = True
    new[1:] = starts[1:] != starts[:-1] + lengths[:-1]
    first = np.flatnonzero(new)
    ends = np.append(first[1:], len(starts)) - 1
    return starts[first], starts[ends] + lengths[ends] - starts[first]


@dataclass(frozen=True, eq=False)
class Filetype:
    """One tile's data runs: ``starts[j]`` and ``lengths[j]`` in bytes from
    the tile's start (in the typemap's order), the tiles ``extent`` bytes
    apart."""

    starts: np.ndarray
    lengths: np.ndarray
    extent: int

    def __post_init__(self) -> None:
        s, n = _merged(np.asarray(self.starts, np.int64).reshape(-1),
                       np.asarray(self.lengths, np.int64).reshape(-1))
        object.__setattr__(self, "starts", s)
        object.__setattr__(self, "lengths", n)
        object.__setattr__(self, "_cum", np.concatenate([[0], np.cumsum(n)]).astype(np.int64))

    @classmethod
    def of(cls, offsets: np.ndarray, item: int, extent: int) -> "Filetype":
        """A typemap's: elements of ``item`` bytes at byte ``offsets``."""
        s, n = runs_of(offsets, item)
        return cls(s, n, int(extent))

    @property
    def size(self) -> int:
        """Data bytes in one tile."""
        return int(self._cum[-1])       # type: ignore[attr-defined]

    @property
    def contiguous(self) -> bool:
        """Whether the view's data is one run from its displacement on."""
        return len(self.starts) == 1 and self.starts[0] == 0 and self.lengths[0] == self.extent

    def problem(self, writing: bool) -> str | None:
        """What makes it no filetype (MPI's rules): a negative displacement,
        displacements that decrease, or (``writing``) overlap, within a
        tile or between two; None where it is one."""
        if self.size == 0:
            return "it holds no data (size 0)"
        if self.extent <= 0:
            return f"its extent is {self.extent}: the tiles would not advance"
        if self.starts[0] < 0:
            return f"a negative displacement ({int(self.starts[0])} bytes)"
        ends = self.starts + self.lengths
        if (self.starts[1:] < self.starts[:-1]).any():
            j = int(np.flatnonzero(self.starts[1:] < self.starts[:-1])[0])
            return (f"its displacements decrease (byte {int(self.starts[j + 1])} after byte "
                    f"{int(self.starts[j])}): MPI takes monotonically nondecreasing ones")
        if writing and (self.starts[1:] < ends[:-1]).any():
            j = int(np.flatnonzero(self.starts[1:] < ends[:-1])[0])
            return (f"its data overlaps itself (bytes {int(self.starts[j + 1])} to "
                    f"{int(ends[j])}), which a file opened for writing may not")
        if int(ends.max()) - int(self.starts[0]) > self.extent and writing:
            return (f"its data spans {int(ends.max()) - int(self.starts[0])} bytes, more than "
                    f"its extent ({self.extent}): the tiles overlap")
        return None

    def runs(self, pos: int, nbytes: int) -> tuple[np.ndarray, np.ndarray]:
        """The file's runs (byte starts from the view's displacement,
        lengths) holding data bytes ``pos`` to ``pos + nbytes``, in order."""
        if nbytes <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        size, cum = self.size, self._cum       # type: ignore[attr-defined]
        first, last = pos // size, (pos + nbytes - 1) // size
        tiles = np.arange(first, last + 1, dtype=np.int64)
        starts = (tiles[:, None] * self.extent + self.starts[None, :]).reshape(-1)
        lengths = np.tile(self.lengths, len(tiles))
        lo = (tiles[:, None] * size + cum[None, :-1]).reshape(-1)       # each run's data pos
        cut = np.clip(pos - lo, 0, None)                                 # bytes before pos
        over = np.clip(lo + lengths - (pos + nbytes), 0, None)         # bytes past the end
        starts, lengths = starts + cut, lengths - cut - over
        return _merged(starts, np.clip(lengths, 0, None))

    def byte_of(self, pos: int) -> int:
        """The file byte (from the displacement) of data byte ``pos``."""
        tile, q = divmod(int(pos), self.size)
        cum = self._cum                          # type: ignore[attr-defined]
        j = int(np.searchsorted(cum, q, side="right")) - 1
        return tile * self.extent + int(self.starts[j]) + q - int(cum[j])

    def data_before(self, byte: int) -> int:
        """Data bytes of the view that lie before file byte ``byte`` (from
        the displacement): where the file's end falls in the view."""
        if byte <= 0:
            return 0
        tile, rest = divmod(int(byte), self.extent)
        inside = np.clip(rest - self.starts, 0, self.lengths).sum()
        return tile * self.size + int(inside)
