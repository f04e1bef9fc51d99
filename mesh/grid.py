"""Named axes over a communicator: ``mesh.grid(world, dp=2, pp=2)``.

Ranks are laid out row-major over the axes in the order given, the last axis
varying fastest. For dp=2, pp=2:

    world rank   0    1    2    3
    dp           0    0    1    1
    pp           0    1    0    1

``grid.group("pp")`` is the pipeline this rank belongs to (ranks that share
every other coordinate); ``grid.group("dp")`` its data-parallel replicas.
The names are the caller's; engine.distribute reads ``dp``, ``sp`` (the
ranks that split each micro-batch's sequence, axis 1, running the planned
attentions by Ulysses: engine.sp_axis), ``pp`` and ``tp``."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .comm import PROC_NULL, Comm

__all__ = ["Grid", "grid", "compute_dims"]


class Grid:
    def __init__(self, comm: Comm, axes: dict[str, int]) -> None:
        if comm is None or isinstance(comm, Grid) or not all(
                hasattr(comm, a) for a in ("size", "rank", "group")):
            # (an AttributeError on 'NoneType' or 'Grid' said neither which rank nor why)
            from .world import rank_said
            who = rank_said()
            what = ("None, what world.group(ranks) returns on ranks that are not members: "
                    "only its members may make a grid over it" if comm is None else
                    "a mesh.Grid: pass the group of one of its axes, grid.group('dp')"
                    if isinstance(comm, Grid) else f"a {type(comm).__name__}")
            raise TypeError(f"{who}mesh.grid over {axes}: the communicator is {what}; a grid "
                            f"is made over a meshrun communicator (mesh.init()'s world, "
                            f"world.group(ranks), grid.group(axis))")
        if not axes:
            raise ValueError(f"rank {comm.rank}: grid needs at least one axis, e.g. "
                             f"grid(world, dp=2, pp=2)")
        bad = {k: v for k, v in axes.items()
               if not isinstance(v, int) or isinstance(v, bool) or v < 1}   # (True is 1)
        if bad:
            raise ValueError(f"rank {comm.rank}: grid axes must be positive integers, "
                             f"got {bad}")
        if math.prod(axes.values()) != comm.size:
            raise ValueError(f"rank {comm.rank}: grid {axes} has {math.prod(axes.values())} "
                             f"ranks but group {comm.name} has {comm.size}")
        self.comm = comm
        self.axes = dict(axes)
        self.names = list(axes)
        self._coords = self._unravel(comm.rank)
        self._groups: dict[str, Comm] = {}
        for name in self.names:
            # Every rank creates every line of this axis in the same order, so
            # group ids agree; each keeps the one it belongs to.
            for line in self._lines(name):
                g = comm.group(line)
                if g is not None:
                    self._groups[name] = g

    def _unravel(self, rank: int) -> dict[str, int]:
        coords = {}
        for name in reversed(self.names):
            coords[name] = rank % self.axes[name]
            rank //= self.axes[name]
        return {n: coords[n] for n in self.names}

    def _lines(self, axis: str) -> list[list[int]]:
        lines: dict[tuple, list[int]] = {}
        for r in range(self.comm.size):
            c = self._unravel(r)
            key = tuple(v for k, v in c.items() if k != axis)
            lines.setdefault(key, []).append(r)
        return list(lines.values())

    def coord(self, axis: str) -> int:
        """This rank's index along ``axis``."""
        self._check(axis)
        return self._coords[axis]

    def group(self, axis: str) -> Comm:
        """The communicator along ``axis`` through this rank (local rank = coord)."""
        self._check(axis)
        return self._groups[axis]

    def size(self, axis: str) -> int:
        self._check(axis)
        return self.axes[axis]

    def rank_of(self, **coords: Any) -> int:
        """The rank (in the grid's communicator) at the given coordinates,
        this rank's own for the axes not given. An axis the grid lacks, or
        a coordinate outside its axis, raises: row-major arithmetic would
        turn it into another rank's (dp=2, pp=2: pp=2 at dp=0 is dp=1's
        rank 2), and the message would go there."""
        for name, v in coords.items():
            self._check(name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)) \
                    or not 0 <= v < self.axes[name]:
                raise ValueError(f"rank {self.comm._t.rank}: {self!r}.rank_of({name}={v!r}): "
                                 f"axis {name!r} has coordinates 0..{self.axes[name] - 1}")
        rank = 0
        for name in self.names:
            rank = rank * self.axes[name] + int(coords.get(name, self._coords[name]))
        return rank

    def coords(self, rank: int | None = None) -> dict[str, int]:
        """MPI's Cart_coords: the coordinates of ``rank`` (in the grid's
        communicator; default this rank), by axis name."""
        if rank is None:
            return dict(self._coords)
        if not isinstance(rank, (int, np.integer)) or isinstance(rank, (bool, np.bool_)) \
                or not 0 <= rank < self.comm.size:
            raise ValueError(f"rank {self.comm._t.rank}: {self!r}.coords({rank!r}): the grid's "
                             f"communicator has ranks 0..{self.comm.size - 1}")
        return self._unravel(int(rank))

    def shift(self, axis: str, disp: int = 1, periodic: bool = False) -> tuple[int, int]:
        """MPI's Cart_shift: ``(source, dest)``, the ranks (in the grid's
        communicator) ``disp`` steps back and forward along ``axis`` from
        this rank, for a halo exchange's ``sendrecv(x, dest, source)``;
        ``periodic``: the axis wraps around, else a step past its edge is
        mesh.PROC_NULL (whose send and receive do nothing)."""
        self._check(axis)
        if not isinstance(disp, (int, np.integer)) or isinstance(disp, (bool, np.bool_)):
            raise ValueError(f"rank {self.comm._t.rank}: {self!r}.shift({axis!r}, "
                             f"disp={disp!r}): disp is an integer number of steps")
        n, at = self.axes[axis], self._coords[axis]

        def step(k: int) -> int:
            c = at + k
            if periodic:
                c %= n
            elif not 0 <= c < n:
                return PROC_NULL
            return self.rank_of(**{axis: c})
        return step(-int(disp)), step(int(disp))

    def _check(self, axis: str) -> None:
        if axis not in self.axes:
            raise KeyError(f"rank {self.comm._t.rank}: grid has axes {self.names}, not {axis!r}")

    def __repr__(self) -> str:
        return f"<Grid {self.axes} at {self._coords}>"


def compute_dims(n: int, ndims: int) -> list[int]:
    """MPI's Dims_create (mpi4py's ``MPI.Compute_dims(n, ndims)``): ``ndims``
    sizes whose product is ``n``, as close to each other as they can be
    (the least largest, then the least next...), largest first; for
    ``mesh.grid(world, **dict(zip(names, compute_dims(world.size, 2))))``."""
    for name, v in (("n", n), ("ndims", ndims)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)) or v < 1:
            raise ValueError(f"compute_dims({n!r}, {ndims!r}): {name} must be an integer >= 1")
    dims = _balanced(int(n), int(ndims), int(n))
    assert dims is not None     # (n itself, then ones, always fits)
    return dims


def _balanced(n: int, k: int, cap: int) -> list[int] | None:
    """The non-increasing ``k`` factors of ``n``, none above ``cap``, that
    are least in order (smallest first factor, then second...), or None."""
    if k == 1:
        return [n] if n <= cap else None
    for d in range(1, min(cap, n) + 1):
        if d ** k >= n and n % d == 0:
            rest = _balanced(n // d, k - 1, d)
            if rest is not None:
                return [d] + rest
    return None


def grid(comm: Comm, **axes: int) -> Grid:
    """Named axes over ``comm``; every rank of ``comm`` must call it."""
    return Grid(comm, axes)
