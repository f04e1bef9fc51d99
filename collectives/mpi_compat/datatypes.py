"""mpi4py's Datatype: a predefined one names a numpy dtype (MPI.DOUBLE:
float64); a derived one (``Create_contiguous``, ``Create_vector``,
``Create_hvector``, ``Create_indexed``, ``Create_hindexed``,
``Create_indexed_block``, ``Create_hindexed_block``, ``Create_subarray``,
``Create_resized``, ``Create_struct``, ``Create_darray``) is a Typemap
over one such dtype: the byte offsets of its elements in one item, with
MPI's lower bound and extent. A Selection
reads a buffer's items by it into one contiguous array (a send's pack) and
writes such an array back into their places (a receive's unpack): a strided
numpy view where the typemap is regular (every constructor but the indexed
ones keeps it so), numpy fancy indexing where not. A struct of elements of several dtypes
is a Typemap over their bytes (MPI.BYTE's elements: its packed form is
its signature's bytes, as MPI_Pack's on one host). Each type keeps the constructor call that
made it, for mpi4py's ``Get_envelope``, ``Get_contents`` and ``decode``
(a program that walks a type back to its named one: a typemap cannot say
which calls made it)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from .attrs import Attributes

__all__ = ["Datatype", "Typemap", "Selection", "Blocks", "ORDER_C", "ORDER_FORTRAN",
           "ORDER_F", "COMBINERS", "DATATYPE_NULL", "DISTRIBUTES"]

ORDER_C, ORDER_FORTRAN = 0, 1       # (Open MPI's, as mpi4py has them)
ORDER_F = ORDER_FORTRAN
# MPI.DISTRIBUTE_*, Create_darray's (Open MPI's values, as mpi4py has them)
DISTRIBUTES = {"DISTRIBUTE_BLOCK": 0, "DISTRIBUTE_CYCLIC": 1, "DISTRIBUTE_NONE": 2,
               "DISTRIBUTE_DFLT_DARG": -1}
_BLOCK, _CYCLIC, _NONE, _DFLT = 0, 1, 2, -1
# MPI.COMBINER_*: Open MPI's values, as mpi4py has them (a program's decode() walk compares
# with them)
COMBINERS = {"COMBINER_NAMED": 0, "COMBINER_DUP": 1, "COMBINER_CONTIGUOUS": 2,
             "COMBINER_VECTOR": 3, "COMBINER_HVECTOR": 5, "COMBINER_INDEXED": 6,
             "COMBINER_HINDEXED": 8, "COMBINER_INDEXED_BLOCK": 9, "COMBINER_STRUCT": 11,
             "COMBINER_SUBARRAY": 12, "COMBINER_DARRAY": 13, "COMBINER_RESIZED": 17,
             "COMBINER_HINDEXED_BLOCK": 18, "COMBINER_F90_REAL": 14, "COMBINER_F90_COMPLEX": 15,
             "COMBINER_F90_INTEGER": 16, "COMBINER_VALUE_INDEX": 0}
"""(Open MPI 4.1's values, as mpi4py has them there: its COMBINER_VALUE_INDEX, MPI-4.1's,
is 0; the F90 ones name types collectives.MPI does not make, Create_f90_*)"""


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


def _live(dt: "Datatype") -> "Datatype":
    """A type a derived one was made of, as Get_contents and decode give it:
    itself, or, freed since (MPI keeps it for the types made of it), a new
    handle of it."""
    if not dt.freed:
        return dt
    again = Datatype(dt.name, dt.dtype, dt.typemap)
    again.committed, again.made = dt.committed, dt.made
    return again


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

    def __call__(cls, *args: Any, **kw: Any) -> Any:
        """mpi4py's constructor: ``MPI.Datatype()`` is DATATYPE_NULL,
        ``MPI.Datatype(dt)`` ``dt`` (a handle of the same type); the
        module's own calls name the type and its elements."""
        if cls is Datatype and not kw and len(args) <= 1:
            if not args:
                return DATATYPE_NULL
            if not isinstance(args[0], Datatype):
                raise TypeError(f"collectives.MPI.Datatype(): expected a Datatype, got "
                                f"{type(args[0]).__name__}")
            return args[0]
        return super().__call__(*args, **kw)


def _arguments(combiner: str, p: dict[str, Any]) -> tuple[list[int], list[int]]:
    """The integers and addresses of MPI_Type_get_contents for a type made
    by MPI.COMBINER_<combiner> with decode()'s arguments ``p``: counts and
    item strides are integers, byte strides and displacements addresses."""
    if combiner == "DUP":
        return [], []
    if combiner == "CONTIGUOUS":
        return [p["count"]], []
    if combiner == "VECTOR":
        return [p["count"], p["blocklength"], p["stride"]], []
    if combiner == "HVECTOR":
        return [p["count"], p["blocklength"]], [p["stride"]]
    if combiner in ("INDEXED", "HINDEXED"):
        ints = [len(p["displacements"]), *p["blocklengths"]]
        return (ints + p["displacements"], []) if combiner == "INDEXED" else \
            (ints, list(p["displacements"]))
    if combiner == "DARRAY":
        return [p["size"], p["rank"], len(p["gsizes"]), *p["gsizes"], *p["distribs"],
                *p["dargs"], *p["psizes"], p["order"]], []
    if combiner == "STRUCT":
        return [len(p["displacements"]), *p["blocklengths"]], list(p["displacements"])
    if combiner in ("INDEXED_BLOCK", "HINDEXED_BLOCK"):
        ints = [len(p["displacements"]), p["blocklength"]]
        return (ints + p["displacements"], []) if combiner == "INDEXED_BLOCK" else \
            (ints, list(p["displacements"]))
    if combiner == "SUBARRAY":
        return [len(p["sizes"]), *p["sizes"], *p["subsizes"], *p["starts"], p["order"]], []
    assert combiner == "RESIZED", combiner
    return [], [p["lb"], p["extent"]]


def _absent(owner: str, name: str) -> NotImplementedError:
    return NotImplementedError(
        f"collectives.MPI: {owner}.{name} is not provided: of the derived datatypes, "
        f"Create_contiguous, Create_vector, Create_hvector, Create_indexed, Create_hindexed, "
        f"Create_indexed_block, Create_hindexed_block, Create_subarray, Create_resized and "
        f"Create_struct and Create_darray are")


class Datatype(Attributes, metaclass=_DatatypeMeta):
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
        # the call that made it, as decode() gives it: (its base type, its combiner's name,
        # its arguments); a named type is its own base
        self.made: tuple[Datatype, str, dict[str, Any]] = (self, "NAMED", {})

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

    def Get_envelope(self) -> tuple[int, int, int, int, int]:
        """mpi4py's (num_integers, num_addresses, num_large_counts,
        num_datatypes, combiner): the lengths of Get_contents' lists (no
        large counts here) and how the type was made, an MPI.COMBINER_*."""
        self._map()
        name = self.made[1]
        if name == "NAMED":
            return 0, 0, 0, 0, COMBINERS["COMBINER_NAMED"]
        ints, addrs = _arguments(name, self.made[2])
        return len(ints), len(addrs), 0, len(self._parts()), COMBINERS[f"COMBINER_{name}"]

    def _parts(self) -> list["Datatype"]:
        """The types this one was made of (a struct's, several)."""
        base, name, params = self.made
        return [_live(t) for t in (params["datatypes"] if name == "STRUCT" else [base])]

    def Get_contents(self) -> tuple[list[int], list[int], list[int], list["Datatype"]]:
        """mpi4py's (integers, addresses, large counts, datatypes): the
        arguments of the call that made this type, in MPI_Type_get_contents'
        order (Create_indexed([1, 2], [0, 5]): [2, 1, 2, 0, 5]), and the type
        it was made of."""
        self._map()
        base, name, params = self.made
        if name == "NAMED":
            raise ValueError(f"collectives.MPI Datatype.Get_contents: {self!r} is a named "
                             f"type, which has no contents (MPI makes it an error): its "
                             f"Get_envelope() combiner is MPI.COMBINER_NAMED")
        ints, addrs = _arguments(name, params)
        return ints, addrs, [], self._parts()

    def decode(self) -> tuple["Datatype", str, dict[str, Any]]:
        """mpi4py's (base type, combiner name, arguments): (MPI.DOUBLE,
        'VECTOR', {'count': 2, 'blocklength': 3, 'stride': 4}); a named
        type's is (itself, 'NAMED', {}); a struct's base MPI.DATATYPE_NULL
        (of one field, its type), its types in its arguments' 'datatypes',
        as mpi4py's."""
        self._map()
        base, name, params = self.made
        args = {k: list(v) if isinstance(v, list) else v for k, v in params.items()}
        if name == "STRUCT":
            args["datatypes"] = [_live(t) for t in args["datatypes"]]
        return _live(base), name, args

    combiner = property(lambda self: self.Get_envelope()[4])
    envelope = property(Get_envelope)
    contents = property(Get_contents)
    is_named = property(lambda self: self.made[1] == "NAMED")

    def Commit(self) -> "Datatype":
        self._map()
        self.committed = True
        return self

    def Free(self) -> None:
        """(a derived type's or a Dup's: its attributes' delete_fn run, it may
        not be used again and equals DATATYPE_NULL; a predefined one's: nothing)"""
        if (self.typemap is not None or not self.is_named) and not self.freed:
            self._delete_attrs()
            self.freed = True

    def __eq__(self, other: object) -> bool:
        """(the same type; a freed one equals DATATYPE_NULL, as mpi4py's handle)"""
        if isinstance(other, Datatype):
            return self is other or self._null() and other._null()
        return NotImplemented

    __hash__ = object.__hash__

    def _null(self) -> bool:
        return self.freed or self.name == "DATATYPE_NULL"

    def Dup(self) -> "Datatype":
        """(as MPI_Type_dup: the same committed state; each attribute through
        its keyval's copy_fn)"""
        dup = Datatype(self.name, self.dtype, self.typemap)
        dup.committed = self.committed
        dup.made = (self, "DUP", {})
        self._copy_attrs(dup)
        return dup

    def _derive(self, call: str, tm: Typemap, combiner: str,
                **params: Any) -> "Datatype":
        """A type made of this one by ``call`` (MPI.COMBINER_<combiner>,
        with ``params``, as decode() names them)."""
        made = Datatype(f"{self.name}.{call}", self.dtype, tm)
        made.made = (self, combiner, params)
        return made

    def Create_contiguous(self, count: int) -> "Datatype":
        _not_negative("Create_contiguous", count=count)
        tm = self._map()
        return self._derive(f"Create_contiguous({count})", tm.grid([(int(count), tm.extent)]),
                            "CONTIGUOUS", count=int(count))

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
                            tm.grid([(count, stride * unit), (blocklength, tm.extent)]),
                            call.removeprefix("Create_").upper(), count=count,
                            blocklength=blocklength, stride=stride)

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
                             self._map().extent, blocklength=int(blocklength))

    def Create_hindexed_block(self, blocklength: int,
                              displacements: Sequence[int]) -> "Datatype":
        d = _ints(displacements, "Create_hindexed_block")
        return self._indexed("Create_hindexed_block", [int(blocklength)] * len(d), d, 1,
                             blocklength=int(blocklength))

    def _indexed(self, call: str, blocklengths: Sequence[int], displacements: Sequence[int],
                 unit: int, **blocklength: int) -> "Datatype":
        """(``blocklength``: the _block calls', their one blocklength)"""
        bls, ds = _ints(blocklengths, call), _ints(displacements, call)
        if len(bls) != len(ds):
            raise ValueError(f"collectives.MPI Datatype.{call}: {len(bls)} blocklengths for "
                             f"{len(ds)} displacements")
        _not_negative(call, blocklengths=bls)
        tm = self._map()
        places = [d * unit + j * tm.extent for b, d in zip(bls, ds) for j in range(b)]
        lengths: dict[str, Any] = dict(blocklength) if blocklength else {"blocklengths": bls}
        return self._derive(f"{call}({bls}, {ds})", tm.at(np.array(places, np.int64)),
                            call.removeprefix("Create_").upper(), **lengths, displacements=ds)

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
        axes, step = _strides(sz, order, tm.extent)
        base = sum(st[k] * step[k] for k in axes)
        block = tm.grid([(sub[k], step[k]) for k in axes], base)
        whole = replace(block, lb=0, ub=math.prod(sz) * tm.extent, sticky=True)
        return self._derive(f"{call}({sz}, {sub}, {st})", whole, "SUBARRAY", sizes=sz,
                            subsizes=sub, starts=st, order=order)

    @classmethod
    def Create_struct(cls, blocklengths: Sequence[int], displacements: Sequence[int],
                      datatypes: Sequence["Datatype"]) -> "Datatype":
        """``blocklengths[k]`` items of ``datatypes[k]`` from byte
        ``displacements[k]`` (a C struct's fields: ``offsetof``); its bounds
        as Open MPI's (the fields' span padded to their widest alignment, or
        the resized fields' explicit bounds). Of one element type, a typemap
        over it (reductions take it); of several, over their bytes."""
        call = "Create_struct"
        bls, ds = _ints(blocklengths, call), _ints(displacements, call)
        types = list(datatypes)
        if not len(bls) == len(ds) == len(types) or not all(isinstance(t, Datatype)
                                                          for t in types):
            raise ValueError(f"collectives.MPI Datatype.{call}: {len(bls)} blocklengths, "
                             f"{len(ds)} displacements and {len(types)} datatypes (MPI.Datatype"
                             f"s): as many of each")
        _not_negative(call, blocklengths=bls)
        maps = [t._map() for t in types]
        one = len({t.dtype for t in types}) == 1
        dtype = types[0].dtype if one and types else np.dtype(np.uint8)
        parts: list[np.ndarray] = []
        bounds: list[tuple[int, int]] = []      # (the fields' spans; the resized ones')
        marked: list[tuple[int, int]] = []
        for b, d, tm in zip(bls, ds, maps):
            if b == 0:
                continue
            at = (d + np.arange(b, dtype=np.int64)[:, None] * tm.extent
                  + tm.flat()[None, :]).reshape(-1)
            if not one:     # (each element's bytes)
                at = (at[:, None] + np.arange(tm.item, dtype=np.int64)[None, :]).reshape(-1)
            parts.append(at)
            span = (d + tm.lb + min(0, (b - 1) * tm.extent),
                    d + tm.ub + max(0, (b - 1) * tm.extent))
            (marked if tm.sticky else bounds).append(span)
        chosen = marked or bounds or [(0, 0)]
        lb, ub = min(lo for lo, _ in chosen), max(hi for _, hi in chosen)
        align = max([tm.align for tm in maps] + [1])
        if not marked:
            ub += -(ub - lb) % align
        offsets = np.concatenate(parts + [np.empty(0, np.int64)])
        tm = Typemap(dtype.itemsize if one else 1, align, 0, (), (), offsets, lb, ub,
                     bool(marked))
        made = Datatype(f"Datatype.{call}({bls}, {ds}, {types})", dtype, tm)
        made.made = (types[0] if len(types) == 1 else DATATYPE_NULL, "STRUCT",
                     {"blocklengths": bls, "displacements": ds, "datatypes": types})
        return made

    def Create_darray(self, size: int, rank: int, gsizes: Sequence[int],
                      distribs: Sequence[int], dargs: Sequence[int], psizes: Sequence[int],
                      order: int = ORDER_C) -> "Datatype":
        """Rank ``rank``'s elements of a ``gsizes`` array of this type
        distributed over a ``psizes`` grid of ``size`` ranks (row-major,
        as MPI's), by dimension DISTRIBUTE_BLOCK (blocks of ``dargs[k]``,
        DISTRIBUTE_DFLT_DARG: ceil(gsize / psize)), DISTRIBUTE_CYCLIC
        (round-robin blocks of ``dargs[k]``, default 1) or DISTRIBUTE_NONE
        (the whole dimension, a psize of 1); in the array's order
        (``order``), its extent the whole array's, as MPI's."""
        call = "Create_darray"
        g, ds, da, ps = (_ints(x, call) for x in (gsizes, distribs, dargs, psizes))
        size, rank = int(size), int(rank)
        if not len(g) == len(ds) == len(da) == len(ps) or not g or math.prod(ps) != size \
                or not 0 <= rank < size or order not in (ORDER_C, ORDER_F):
            raise ValueError(f"collectives.MPI Datatype.{call}: size {size}, rank {rank}, "
                             f"gsizes {g}, distribs {ds}, dargs {da}, psizes {ps}, order "
                             f"{order}: as many of each, psizes' product the size, the rank "
                             f"below it, ORDER_C or ORDER_FORTRAN")
        coords, left = [], rank
        for p in reversed(ps):      # (the process grid row-major, whatever the order)
            coords.append(left % p)
            left //= p
        coords.reverse()
        owned = [self._owned(call, *k) for k in zip(g, ds, da, ps, coords)]
        tm = self._map()
        axes, step = _strides(g, order, tm.extent)
        at = np.zeros(1, np.int64)
        for k in axes:
            at = (at[:, None] + owned[k][None, :] * step[k]).reshape(-1)
        mine = tm.at(at) if at.size else replace(tm, start=0, shape=(0,), strides=(0,),
                                                  offsets=None, lb=0, ub=0)
        whole = replace(mine, lb=0, ub=math.prod(g) * tm.extent, sticky=True)
        return self._derive(f"{call}({size}, {rank}, {g}, {ds}, {da}, {ps})", whole, "DARRAY",
                            size=size, rank=rank, gsizes=g, distribs=ds, dargs=da, psizes=ps,
                            order=order)

    @staticmethod
    def _owned(call: str, n: int, how: int, arg: int, p: int, c: int) -> np.ndarray:
        """The indices of a dimension of ``n`` that grid coordinate ``c`` of
        ``p`` owns, distributed by ``how`` (blocks of ``arg``)."""
        i = np.arange(n, dtype=np.int64)
        if how == _NONE and p == 1:
            return i
        if how == _BLOCK and (arg == _DFLT or arg * p >= n > 0 and arg > 0):
            b = -(-n // p) if arg == _DFLT else arg
            return i[c * b:(c + 1) * b]
        if how == _CYCLIC and (arg == _DFLT or arg > 0):
            b = 1 if arg == _DFLT else arg
            return i[(i // b) % p == c]
        raise ValueError(f"collectives.MPI Datatype.{call}: a dimension of {n} over {p} ranks "
                         f"by distrib {how} with darg {arg}: DISTRIBUTE_BLOCK (darg x psize at "
                         f"least the size), DISTRIBUTE_CYCLIC (darg positive) or "
                         f"DISTRIBUTE_NONE (psize 1), darg DISTRIBUTE_DFLT_DARG or positive")

    def Create_resized(self, lb: int, extent: int) -> "Datatype":
        tm = replace(self._map(), lb=int(lb), ub=int(lb) + int(extent), sticky=True)
        return self._derive(f"Create_resized({lb}, {extent})", tm, "RESIZED", lb=int(lb),
                            extent=int(extent))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("Create_"):
            raise _absent(self.name, name)
        raise AttributeError(f"collectives.MPI.Datatype has no {name}")


DATATYPE_NULL = Datatype("DATATYPE_NULL", "V0")


def _strides(sizes: Sequence[int], order: int,
             extent: int) -> tuple[list[int], dict[int, int]]:
    """An array of ``sizes`` elements of ``extent`` bytes, ``order``
    (ORDER_C row-major, ORDER_FORTRAN): its axes slowest first, and each
    axis' step in bytes (Create_subarray's and Create_darray's layout)."""
    axes = list(range(len(sizes)))
    if order == ORDER_F:
        axes.reverse()      # (the first index fastest)
    return axes, {k: math.prod(sizes[j] for j in axes[i + 1:]) * extent
                  for i, k in enumerate(axes)}
