"""mpi4py.util.dtlib over collectives.MPI: ``from_numpy_dtype(dtype)`` gives the
MPI datatype of a numpy dtype (a basic one: the predefined type's ``Dup``; a
record: ``Create_struct`` of its fields, resized to its itemsize; a subarray:
``Create_contiguous`` or ``Create_subarray``), ``to_numpy_dtype(datatype)``
the numpy dtype of a collectives.MPI datatype: a predefined one's elements (a
MAXLOC pair: the aligned record of its value and its int, as mpi4py's), and
one that ``Dup``, ``Create_contiguous``, ``Create_vector``,
``Create_hvector``, ``Create_indexed``, ``Create_hindexed``,
``Create_indexed_block``, ``Create_hindexed_block``, ``Create_subarray`` (of
the whole array), ``Create_struct`` or ``Create_resized`` made, as mpi4py's:
records of fields ``f0``, ``f1``... at the type's displacements. A
``Create_darray`` or a part-array subarray has no numpy dtype (ValueError).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import MPI
from ..mpi_compat.typecodes import typecode

__all__ = ["from_numpy_dtype", "to_numpy_dtype"]

_BY_KIND = {"b": "?", "i": "i", "u": "u", "f": "f", "c": "c"}


def _basic(dtype: np.dtype) -> Any:
    """The predefined datatype of a numpy scalar dtype."""
    for code in (dtype.char, f"{_BY_KIND.get(dtype.kind, '?')}{dtype.itemsize}"):
        try:
            return MPI.Datatype.fromcode(code)
        except ValueError:
            pass
    if dtype.kind == "S" and dtype.itemsize == 1:
        return MPI.CHAR
    raise ValueError(f"collectives.util.dtlib: numpy dtype {dtype} has no predefined MPI "
                     f"datatype here")


def from_numpy_dtype(dtype: Any) -> Any:
    """The MPI datatype of numpy ``dtype`` (a new one: ``Free`` it)."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise ValueError("NumPy datatype with object entries")
    if not dtype.isnative:
        raise ValueError("NumPy datatype with non-native byteorder")
    if dtype.fields:
        parts = [(from_numpy_dtype(f[0]), f[1]) for f in
                 (dtype.fields[name] for name in dtype.names or ())]
        struct = MPI.Datatype.Create_struct([1] * len(parts), [d for _, d in parts],
                                            [t for t, _ in parts])
        return struct.Create_resized(0, dtype.itemsize)
    if dtype.subdtype:
        base, shape = dtype.subdtype
        elem = from_numpy_dtype(base)
        if len(shape) == 1:
            return elem.Create_contiguous(shape[0])
        return elem.Create_subarray(list(shape), list(shape), [0] * len(shape))
    return _basic(dtype).Dup()


def _aligned(datatype: Any, offset: int = 0) -> bool:
    """Whether ``datatype`` at byte ``offset`` has each element on its alignment."""
    if datatype.is_predefined:
        return offset % max(1, int(np.dtype(datatype.dtype).alignment)) == 0
    base, combiner, info = datatype.decode()
    if combiner == "STRUCT":
        return all(_aligned(t, offset + d) for t, d in
                   zip(info["datatypes"], info["displacements"]))
    if combiner == "RESIZED":
        return _aligned(base, offset) and _aligned(base, offset + info["extent"])
    if combiner == "HVECTOR":
        return _aligned(base, offset + (info["stride"] if info["count"] > 1 else 0))
    if combiner in ("HINDEXED", "HINDEXED_BLOCK"):
        return all(_aligned(base, offset + d) for d in info["displacements"])
    return _aligned(base, offset)


def _record(formats: list[Any], offsets: list[int], itemsize: int | None,
            aligned: bool) -> np.dtype:
    spec: Any = {"names": [f"f{i}" for i in range(len(formats))],
                 "formats": formats, "offsets": [int(o) for o in offsets]}
    if itemsize is not None:
        spec["itemsize"] = int(itemsize)
    try:
        return np.dtype(spec, align=aligned)
    except ValueError:
        if not aligned:
            raise
        return np.dtype(spec)


def _of(dtype: np.dtype, count: int) -> Any:
    return dtype if count == 1 else (dtype, (int(count),))


def to_numpy_dtype(datatype: Any) -> np.dtype:
    """The numpy dtype of collectives.MPI ``datatype``."""
    if not isinstance(datatype, MPI.Datatype):
        raise TypeError(f"collectives.util.dtlib.to_numpy_dtype: expecting an MPI.Datatype, "
                        f"got {type(datatype).__name__}")
    if datatype == MPI.DATATYPE_NULL:
        raise ValueError("cannot convert null MPI datatype to NumPy")
    base, combiner, info = datatype.decode()
    if combiner == "NAMED":
        code = typecode(datatype)
        if code is not None:
            return np.dtype(code)
        dt = np.dtype(datatype.dtype)
        if dt.names == ("v", "i"):      # a MAXLOC/MINLOC pair
            return np.dtype([("f0", dt.fields["v"][0]), ("f1", dt.fields["i"][0])], align=True)
        return dt
    if combiner == "DUP":
        return to_numpy_dtype(base)
    if combiner == "CONTIGUOUS":
        return np.dtype((to_numpy_dtype(base), (int(info["count"]),)))
    if combiner == "SUBARRAY":
        sizes, order = list(info["sizes"]), info["order"]
        if list(info["subsizes"]) != sizes or any(info["starts"]):
            raise ValueError("cannot convert subarray MPI datatype to NumPy")
        if order == MPI.ORDER_FORTRAN:
            sizes = sizes[::-1]
        return np.dtype((to_numpy_dtype(base), tuple(sizes)))
    aligned = True
    if combiner == "RESIZED" and not base.is_predefined and base.decode()[1] == "STRUCT":
        aligned = _aligned(base, info["extent"])
        base, combiner, info = base.decode()
    if combiner == "STRUCT":
        types = info["datatypes"]
        offsets = list(info["displacements"])
        aligned = aligned and all(map(_aligned, types, offsets))
        formats = [_of(to_numpy_dtype(t), n) for t, n in zip(types, info["blocklengths"])]
        return _record(formats, offsets, datatype.extent, aligned)
    if combiner in ("VECTOR", "HVECTOR"):
        elem = to_numpy_dtype(base)
        count, stride = int(info["count"]), int(info["stride"])
        if combiner == "VECTOR":
            stride *= base.extent
            aligned = _aligned(base)
        else:
            stride = stride if count > 1 else 0
            aligned = _aligned(base, stride)
        formats = [(elem, (int(info["blocklength"]),))] * count
        return _record(formats, [stride * i for i in range(count)], datatype.extent, aligned)
    if combiner in ("INDEXED", "HINDEXED", "INDEXED_BLOCK", "HINDEXED_BLOCK"):
        elem = to_numpy_dtype(base)
        disps = list(info["displacements"])
        lengths = info["blocklengths"] if "blocklengths" in info else \
            [info["blocklength"]] * len(disps)
        unit, aligned = 1, _aligned(base)
        if combiner.startswith("H"):
            aligned = aligned and all(_aligned(base, d) for d in disps)
        else:
            unit = base.extent
        return _record([(elem, (int(n),)) for n in lengths], [d * unit for d in disps],
                       None, aligned)
    raise ValueError(f"cannot convert MPI datatype to NumPy ({combiner} type {datatype!r})")
