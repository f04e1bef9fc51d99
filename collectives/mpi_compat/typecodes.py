"""mpi4py's type codes of a datatype: ``Datatype.typechar`` (the struct
module's character: "d", "i", "c"...; "V" for a derived or pair type),
``Datatype.typestr`` (numpy's: "f8", "i4", "S1", "b1"...; "V<extent>" for
a derived or pair type; "" for DATATYPE_NULL), and mpi4py's private
``MPI._typecode(datatype)`` (the predefined type's code, None else) and
``MPI._typealign(datatype)`` (its alignment in bytes, a pair type's too;
None for a derived type), which mpi4py.util.dtlib and its tests use."""
from __future__ import annotations

import numpy as np

from .datatypes import Datatype
from .types import _CODES

__all__ = ["typechar", "typestr", "typecode", "typealign"]

_CHAR_OF = {name: code for code, name in reversed(list(_CODES.items())) if len(code) == 1}
_CHAR_OF.update({"BYTE": "B", "PACKED": "B", "AINT": "p", "COUNT": "n", "OFFSET": "q",
                 "WCHAR": "U", "C_BOOL": "?"})
_CODE_OF = dict(_CHAR_OF, C_BOOL="b1", WCHAR="U1")
_STR_OF = {"CHAR": "S1", "C_BOOL": "b1", "WCHAR": "U1"}


def _named(dt: Datatype) -> Datatype | None:
    """The predefined type ``dt`` is (through Dups), None for a derived one."""
    while not dt._null():
        base, how, _ = dt.made
        if how == "NAMED":
            return dt if dt.typemap is None else None
        if how != "DUP":
            return None
        dt = base
    return None


def _pair(dt: Datatype) -> bool:
    return np.dtype(dt.dtype).names is not None


def typecode(dt: Datatype) -> str | None:
    """mpi4py's ``MPI._typecode``: a predefined type's code (numpy's dtype takes it)."""
    named = _named(dt)
    if named is None or _pair(named):
        return None
    code = _CODE_OF.get(named.name)
    return code if code is not None else np.dtype(named.dtype).char


def typechar(dt: Datatype) -> str:
    if dt._null():
        return ""
    code = typecode(dt)
    return "V" if code is None else ("?" if code == "b1" else code[0])


def typestr(dt: Datatype) -> str:
    if dt._null():
        return ""
    named = _named(dt)
    if named is None or _pair(named):
        return f"V{dt.Get_extent()[1]}"
    if named.name in _STR_OF:
        return _STR_OF[named.name]
    d = np.dtype(named.dtype)
    return f"{d.kind}{d.itemsize}"


def typealign(dt: Datatype) -> int | None:
    """mpi4py's ``MPI._typealign``: a predefined (or pair) type's alignment."""
    named = _named(dt)
    return None if named is None else int(np.dtype(named.dtype).alignment)


Datatype.typechar = property(typechar)  # type: ignore[attr-defined]
Datatype.typestr = property(typestr)  # type: ignore[attr-defined]
