"""mpi4py's Datatype: a predefined one names a numpy dtype (MPI.DOUBLE:
float64); a derived one (``Create_contiguous``, ``Create_vector``,
``Create_hvector``, ``Create_indexed``, ``Create_hindexed``,
``Create_indexed_block``, ``Create_hindexed_block``, ``Create_subarray``,
``Create_resized``) is a Typemap over one such dtype: the byte offsets of
its elements in one item, with MPI's lower bound and extent. A Selection
reads a buffer's items by it into one contiguous array (a send's pack) and
writes such an array back into their places (a receive's unpack): a strided
numpy view where the typemap is regular (every constructor but the indexed
ones keeps it so), numpy fancy indexing where not. Structs (elements of
several dtypes) are not provided."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

__all__ = ["Datatype", "Typemap", "Selection", "Blocks", "ORDER_C", "ORDER_FORTRAN",
           "ORDER_F"]

ORDER_C, ORDER_FORTRAN = 0, 1       # (Open MPI's, as mpi4py has them)
ORDER_F = ORDER_FORTRAN


@dataclass(frozen=True, eq=False)
class Typemap:
    """One item of a derived datatype over elements of ``item`` bytes: the
    element at grid index (i_0, i_1, ...) of ``shape`` sits at byte
    ``start + sum(i_k * strides_k)`` (typemap order: the last index
    fastest), or, where irregular, at ``offsets[j]``; ``lb`` and ``ub``
    bound the item (its extent the step between items). ``sticky``: bounds
    set by Create_resized or Create_subarray (MPI's explicit markers, kept
    by the types built on it), else the extent is padded up to the
    element's alignment as Open MPI pads it."""

    item: int
    align: int
    start: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offsets: np.ndarray | None
    lb: int
    ub: int
    sticky: bool = False

    @classmethod
    def of(cls, dtype: np.dtype) -> "Typemap":
        """A predefined datatype's: one element at byte 0."""
        return cls(dtype.itemsize, dtype.alignment, 0, (), (), None, 0, dtype.itemsize)

    @property
    def n(self) -> int:
        return math.prod(self.shape) if self.offsets is None else len(self.offsets)

    @property
    def extent(self) -> int:
        return self.ub - self.lb

    def flat(self) -> np.ndarray:
        """Every element's byte offset, in typemap order."""
        if self.offsets is not None:
            return self.offsets
        at = np.array([self.start], np.int64)
        for n, s in zip(self.shape, self.strides):
            at = (at[:, None] + np.arange(n, dtype=np.int64) * s).reshape(-1)
        return at

    def span(self) -> tuple[int, int]:
        """(true lb, true ub): the first element's byte, one past the last's."""
        if self.n == 0:
            return 0, 0
        if self.offsets is not None:
            return int(self.offsets.min()), int(self.offsets.max()) + self.item
        lo = self.start + sum(min(0, (n - 1) * s) for n, s in zip(self.shape, self.strides))
        hi = self.start + sum(max(0, (n - 1) * s) for n, s in zip(self.shape, self.strides))
        return lo, hi + self.item

    def _bounded(self, lo: int, hi: int, **kw: Any) -> "Typemap":
        """This item's copies placed at byte displacements from ``lo`` to
        ``hi``: MPI's bounds, padded where not sticky."""
        lb, ub = lo + self.lb, hi + self.ub
        if not self.sticky:
            ub += -(ub - lb) % self.align
        return replace(self, lb=lb, ub=ub, **kw)

    def grid(self, dims: Sequence[tuple[int, int]], base: int = 0) -> "Typemap":
        """Copies of this item at ``base + sum(i_k * step_k)`` over the grid
        of ``dims``, (count, step in bytes) pairs, the outermost first."""
        if any(n == 0 for n, _ in dims):
            return replace(self, start=0, shape=(0,), strides=(0,), offsets=None, lb=0, ub=0)
        lo = base + sum(min(0, (n - 1) * s) for n, s in dims)
        hi = base + sum(max(0, (n - 1) * s) for n, s in dims)
        if self.offsets is None:
            return self._bounded(lo, hi, start=self.start + base,
                                 shape=tuple(n for n, _ in dims) + self.shape,
                                 strides=tuple(s for _, s in dims) + self.strides)
        at = np.array([base], np.int64)
        for n, s in dims:
            at = (at[:, None] + np.arange(n, dtype=np.int64) * s).reshape(-1)
        return self.at(at)

    def at(self, places: np.ndarray) -> "Typemap":
        """Copies of this item at the byte displacements ``places``, in order."""
        places = np.asarray(places, np.int64).reshape(-1)
        if len(places) == 0:
            return replace(self, start=0, shape=(0,), strides=(0,), offsets=None, lb=0, ub=0)
        offsets = (places[:, None] + self.flat()[None, :]).reshape(-1)
        return self._bounded(int(places.min()), int(places.max()), offsets=offsets)


class Selection:
    """``count`` items of a typemap in a buffer's bytes ``raw`` from byte
    ``first``, as elements of ``dtype``: ``get()`` them packed into one
    contiguous array, ``put(a)`` such an array back into their places (the
    buffer's other bytes untouched)."""

    def __init__(self, tm: Typemap, dtype: np.dtype, raw: np.ndarray, count: int, first: int,
                 what: str) -> None:
        lo, hi = tm.span()
        if count and tm.n:
            lo += first + min(0, (count - 1) * tm.extent)
            hi += first + max(0, (count - 1) * tm.extent)
            if lo < 0 or hi > len(raw):
                raise ValueError(f"collectives.MPI {what}: {count} items of the datatype from "
                                 f"byte {first} reach bytes {lo} to {hi}, outside a buffer of "
                                 f"{len(raw)} bytes")
        self.dtype, self._view, self._idx = dtype, None, None
        self.n = count * tm.n       # (elements)
        if tm.offsets is None:
            self._view = np.ndarray((count,) + tm.shape, dtype, buffer=raw,  # type: ignore
                                    offset=first + tm.start if count and tm.n else 0,
                                    strides=(tm.extent,) + tm.strides)
            return
        at = (first + np.arange(count, dtype=np.int64)[:, None] * tm.extent
              + tm.offsets[None, :]).reshape(-1)
        if not (at % tm.item).any():        # (on whole elements: index them, not bytes)
            self._elems = raw[:len(raw) // tm.item * tm.item].view(dtype)
            self._idx = at // tm.item
        else:
            self._elems = raw
            self._idx = (at[:, None] + np.arange(tm.item)).reshape(-1)

    def get(self) -> np.ndarray:
        if self._view is not None:
            return np.ascontiguousarray(self._view).reshape(-1)
        got = self._elems[self._idx]
        return got if got.dtype == self.dtype else got.view(self.dtype)

    def put(self, a: np.ndarray) -> None:
        if self._view is not None:
            if not np.shares_memory(self._view, a):     # (a view of it already: in place)
                self._view[...] = a.reshape(self._view.shape)
            return
        self._elems[self._idx] = a if self._elems.dtype == a.dtype else a.view(np.uint8)


class Blocks:
    """A v-call's blocks, a Selection each, packed one after another."""

    def __init__(self, sels: list[Selection], dtype: np.dtype) -> None:
        self.sels, self.dtype = sels, dtype
        self.starts = np.cumsum([0] + [s.n for s in sels]).tolist()

    def get(self) -> np.ndarray:
        return np.concatenate([s.get() for s in self.sels] + [np.empty(0, self.dtype)])

    def put(self, a: np.ndarray) -> None:
        for s, i in zip(self.sels, self.starts):
            s.put(a[i:i + s.n])


def _ints(x: Any, what: str) -> list[int]:
    try:
        return [int(k) for k in x]
    except (TypeError, ValueError):
        raise TypeError(f"collectives.MPI Datatype.{what}: expecting a sequence of ints, got "
                        f"{x!r:.60}") from None


def _not_negative(what: str, **values: Any) -> None:
    for name, v in values.items():
        if any(k < 0 for k in (v if isinstance(v, list) else [v])):
            raise ValueError(f"collectives.MPI Datatype.{what}: {name} must not be negative, "
                             f"got {v}")


class _DatatypeMeta(type):
    """``MPI.Datatype.Create_struct(...)`` (a class's call in mpi4py) names
    itself as the instances' missing ``Create_*`` do."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("Create_"):
            raise _absent("Datatype", name)
        raise AttributeError(f"collectives.MPI.Datatype has no {name}")


def _absent(owner: str, name: str) -> NotImplementedError:
    return NotImplementedError(
        f"collectives.MPI: {owner}.{name} is not provided: of the derived datatypes, those "
        f"of one element type are (Create_contiguous, Create_vector, Create_hvector, "
        f"Create_indexed, Create_hindexed, Create_indexed_block, Create_hindexed_block, "
        f"Create_subarray, Create_resized); for a struct send each field, or a structured "
        f"array's bytes")


class Datatype(metaclass=_DatatypeMeta):
    """An MPI datatype. A predefined one is the numpy ``dtype`` of its
    elements (MPI.DOUBLE: float64; the pair types, MPI.DOUBLE_INT..., a
    structured dtype of a value ``v`` and an index ``i``, for MAXLOC and
    MINLOC); a derived one has a ``typemap`` over elements of ``dtype``,
    and must be committed before it is communicated, as MPI's."""

    def __init__(self, name: str, dtype: Any, typemap: Typemap | None = None) -> None:
        self.name = name
        self.dtype = np.dtype(dtype)
        self.typemap = typemap
        self.committed = typemap is None
        self.freed = False

    def __repr__(self) -> str:
        return f"MPI.{self.name}"

    @property
    def is_predefined(self) -> bool:
        return self.typemap is None

    def _map(self) -> Typemap:
        if self.freed:
            raise ValueError(f"collectives.MPI: {self!r} was freed (MPI.DATATYPE_NULL)")
        return self.typemap or Typemap.of(self.dtype)

    def Get_size(self) -> int:
        return self._map().n * self.dtype.itemsize

    size = property(Get_size)

    def Get_extent(self) -> tuple[int, int]:
        tm = self._map()
        return tm.lb, tm.extent

    extent = property(lambda self: self.Get_extent()[1])
    lb = property(lambda self: self.Get_extent()[0])
    ub = property(lambda self: sum(self.Get_extent()))

    def Get_true_extent(self) -> tuple[int, int]:
        lo, hi = self._map().span()
        return lo, hi - lo

    true_extent = property(lambda self: self.Get_true_extent()[1])
    true_lb = property(lambda self: self.Get_true_extent()[0])
    true_ub = property(lambda self: sum(self.Get_true_extent()))

    def Get_name(self) -> str:
        return f"MPI_{self.name}" if self.typemap is None else ""

    def Commit(self) -> "Datatype":
        self._map()
        self.committed = True
        return self

    def Free(self) -> None:
        """(a derived type's: it may not be used again; a predefined one's:
        nothing)"""
        if self.typemap is not None:
            self.freed = True

    def Dup(self) -> "Datatype":
        """(as MPI_Type_dup: the same committed state)"""
        dup = Datatype(self.name, self.dtype, self.typemap)
        dup.committed = self.committed
        return dup

    def _derive(self, call: str, tm: Typemap) -> "Datatype":
        return Datatype(f"{self.name}.{call}", self.dtype, tm)

    def Create_contiguous(self, count: int) -> "Datatype":
        _not_negative("Create_contiguous", count=count)
        tm = self._map()
        return self._derive(f"Create_contiguous({count})", tm.grid([(int(count), tm.extent)]))

    def Create_vector(self, count: int, blocklength: int, stride: int) -> "Datatype":
        """``count`` blocks of ``blocklength`` items, ``stride`` items apart."""
        return self._vector("Create_vector", count, blocklength, stride, self._map().extent)

    def Create_hvector(self, count: int, blocklength: int, stride: int) -> "Datatype":
        """As Create_vector, ``stride`` in bytes."""
        return self._vector("Create_hvector", count, blocklength, stride, 1)

    def _vector(self, call: str, count: int, blocklength: int, stride: int,
                unit: int) -> "Datatype":
        count, blocklength, stride = int(count), int(blocklength), int(stride)
        _not_negative(call, count=count, blocklength=blocklength)
        tm = self._map()
        return self._derive(f"{call}({count}, {blocklength}, {stride})",
                            tm.grid([(count, stride * unit), (blocklength, tm.extent)]))

    def Create_indexed(self, blocklengths: Sequence[int],
                       displacements: Sequence[int]) -> "Datatype":
        """Blocks of ``blocklengths[k]`` items from item ``displacements[k]``."""
        return self._indexed("Create_indexed", blocklengths, displacements,
                             self._map().extent)

    def Create_hindexed(self, blocklengths: Sequence[int],
                        displacements: Sequence[int]) -> "Datatype":
        """As Create_indexed, ``displacements`` in bytes."""
        return self._indexed("Create_hindexed", blocklengths, displacements, 1)

    def Create_indexed_block(self, blocklength: int,
                             displacements: Sequence[int]) -> "Datatype":
        d = _ints(displacements, "Create_indexed_block")
        return self._indexed("Create_indexed_block", [int(blocklength)] * len(d), d,
                             self._map().extent)

    def Create_hindexed_block(self, blocklength: int,
                              displacements: Sequence[int]) -> "Datatype":
        d = _ints(displacements, "Create_hindexed_block")
        return self._indexed("Create_hindexed_block", [int(blocklength)] * len(d), d, 1)

    def _indexed(self, call: str, blocklengths: Sequence[int], displacements: Sequence[int],
                 unit: int) -> "Datatype":
        bls, ds = _ints(blocklengths, call), _ints(displacements, call)
        if len(bls) != len(ds):
            raise ValueError(f"collectives.MPI Datatype.{call}: {len(bls)} blocklengths for "
                             f"{len(ds)} displacements")
        _not_negative(call, blocklengths=bls)
        tm = self._map()
        places = [d * unit + j * tm.extent for b, d in zip(bls, ds) for j in range(b)]
        return self._derive(f"{call}({bls}, {ds})", tm.at(np.array(places, np.int64)))

    def Create_subarray(self, sizes: Sequence[int], subsizes: Sequence[int],
                        starts: Sequence[int], order: int = ORDER_C) -> "Datatype":
        """The ``subsizes`` block from ``starts`` of a ``sizes`` array of this
        type (``order``: ORDER_C, row-major; ORDER_FORTRAN); its extent the
        whole array's, as MPI's."""
        call = "Create_subarray"
        sz, sub, st = _ints(sizes, call), _ints(subsizes, call), _ints(starts, call)
        if not len(sz) == len(sub) == len(st) or not sz or order not in (ORDER_C, ORDER_F):
            raise ValueError(f"collectives.MPI Datatype.{call}: sizes {sz}, subsizes {sub}, "
                             f"starts {st}, order {order}: as many of each, and ORDER_C or "
                             f"ORDER_FORTRAN")
        if any(not (0 < b <= n and 0 <= s <= n - b) for n, b, s in zip(sz, sub, st)):
            raise ValueError(f"collectives.MPI Datatype.{call}: subsizes {sub} from starts "
                             f"{st} do not fit sizes {sz}")
        tm = self._map()
        axes = list(range(len(sz)))
        if order == ORDER_F:
            axes.reverse()      # (the first index fastest)
        step = {k: math.prod(sz[j] for j in axes[i + 1:]) * tm.extent
                for i, k in enumerate(axes)}
        base = sum(st[k] * step[k] for k in axes)
        block = tm.grid([(sub[k], step[k]) for k in axes], base)
        whole = replace(block, lb=0, ub=math.prod(sz) * tm.extent, sticky=True)
        return self._derive(f"{call}({sz}, {sub}, {st})", whole)

    def Create_resized(self, lb: int, extent: int) -> "Datatype":
        tm = replace(self._map(), lb=int(lb), ub=int(lb) + int(extent), sticky=True)
        return self._derive(f"Create_resized({lb}, {extent})", tm)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("Create_"):
            raise _absent(self.name, name)
        raise AttributeError(f"collectives.MPI.Datatype has no {name}")
