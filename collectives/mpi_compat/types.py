"""mpi4py's constants, datatypes and reduction ops, as collectives.MPI has
them: a Datatype names a numpy dtype (datatypes.py; the derived ones
too), an Op names a collective's op
(``"sum"``...), a collectives.Op for ``Op.Create``, and the Python function
mpi4py's lowercase calls fold objects with."""
from __future__ import annotations

import operator
from typing import Any, Callable

import numpy as np

import mesh

from ..userop import Op as _UserOp
from .datatypes import DATATYPE_NULL, Datatype

__all__ = ["ANY_SOURCE", "ANY_TAG", "PROC_NULL", "UNDEFINED", "ROOT", "IN_PLACE", "BOTTOM",
           "THREAD_SINGLE", "THREAD_FUNNELED", "THREAD_SERIALIZED", "THREAD_MULTIPLE",
           "IDENT", "CONGRUENT", "SIMILAR", "UNEQUAL", "CART", "GRAPH", "DIST_GRAPH",
           "SUCCESS", "ERR_TRUNCATE", "ERR_OTHER", "ERR_TYPE", "ERR_COMM", "ERR_RANK",
           "ERR_ROOT", "ERRORS", "TAG_UB", "mesh_tag", "mpi_tag",
           "Datatype", "Op", "Exception", "DATATYPES", "OPS", "datatype_of", "PACKED_BY"]

ANY_SOURCE: int = mesh.ANY_SOURCE
ANY_TAG = -1                # (Open MPI's, as mpi4py has it; meshrun's is mesh.ANY_TAG)
PROC_NULL: int = mesh.PROC_NULL
UNDEFINED = -32766          # (Open MPI's, as mpi4py has it there)
ROOT = -4
THREAD_SINGLE, THREAD_FUNNELED, THREAD_SERIALIZED, THREAD_MULTIPLE = 0, 1, 2, 3
IDENT, CONGRUENT, SIMILAR, UNEQUAL = 0, 1, 2, 3
CART, GRAPH, DIST_GRAPH = 1, 2, 3
SUCCESS, ERR_TYPE, ERR_TRUNCATE, ERR_OTHER = 0, 3, 15, 16
ERR_COMM, ERR_RANK, ERR_ROOT = 5, 6, 8
ERRORS = {"ERR_BUFFER": 1, "ERR_COUNT": 2, "ERR_TAG": 4, "ERR_COMM": ERR_COMM,
          "ERR_RANK": ERR_RANK, "ERR_REQUEST": 7, "ERR_ROOT": ERR_ROOT, "ERR_GROUP": 9,
          "ERR_OP": 10, "ERR_TOPOLOGY": 11, "ERR_DIMS": 12, "ERR_UNKNOWN": 14, "ERR_INTERN": 17,
          "ERR_IN_STATUS": 18, "ERR_KEYVAL": 36, "ERR_NO_MEM": 39, "ERR_WIN": 53,
          "ERR_RMA_SYNC": 47, "ERR_RMA_RANGE": 68, "ERR_DISP": 26, "ERR_INFO": 34,
          "ERR_LASTCODE": 92}
"""MPI's error classes that collectives.MPI has beside ERR_TYPE... (Open MPI's values,
as mpi4py has them there)."""
TAG_UB = 0                  # (a keyval: comm.Get_attr(MPI.TAG_UB), the largest tag)


def mesh_tag(tag: int) -> int:
    """A receive's tag as meshrun takes it (MPI.ANY_TAG: mesh.ANY_TAG)."""
    return mesh.ANY_TAG if tag == ANY_TAG else tag


def mpi_tag(tag: int) -> int:
    """A Status's tag as mpi4py gives it."""
    return ANY_TAG if tag == mesh.ANY_TAG else tag


class _InPlace:
    """MPI.IN_PLACE: the receive buffer is the send buffer too."""

    def __repr__(self) -> str:
        return "MPI.IN_PLACE"


class _Bottom:
    def __repr__(self) -> str:
        return "MPI.BOTTOM"


IN_PLACE: Any = _InPlace()
BOTTOM: Any = _Bottom()


class Exception(RuntimeError):      # noqa: A001 (mpi4py's name: MPI.Exception)
    """mpi4py's MPI.Exception, for what MPI itself reports as an error class
    (a message longer than its receive buffer: ERR_TRUNCATE); meshrun's own
    errors (MismatchError, MeshTimeoutError, LostPeerError) come through as
    they are."""

    def __init__(self, error_class: int, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class

    def Get_error_class(self) -> int:
        return self.error_class

    Get_error_code = Get_error_class

    def Get_error_string(self) -> str:
        return str(self)


def _pair(value: Any, index: Any) -> np.dtype:
    """A C struct {value; int}, padded as C pads it (MPI.DOUBLE_INT: 16 bytes)."""
    return np.dtype([("v", value), ("i", index)], align=True)


_NAMES = {
    "CHAR": np.int8, "WCHAR": np.int32,     # (C's char and Linux's wchar_t: their bytes)
    "SIGNED_CHAR": np.int8, "UNSIGNED_CHAR": np.uint8,
    "BYTE": np.uint8, "PACKED": np.uint8, "SHORT": np.int16, "UNSIGNED_SHORT": np.uint16,
    "INT": np.intc, "UNSIGNED": np.uintc, "UNSIGNED_INT": np.uintc, "LONG": np.int_,
    "UNSIGNED_LONG": np.uint, "LONG_LONG": np.longlong, "LONG_LONG_INT": np.longlong,
    "UNSIGNED_LONG_LONG": np.ulonglong, "FLOAT": np.float32, "DOUBLE": np.float64,
    "LONG_DOUBLE": np.longdouble, "C_BOOL": np.bool_, "BOOL": np.bool_, "CXX_BOOL": np.bool_,
    "INT8_T": np.int8, "INT16_T": np.int16, "INT32_T": np.int32, "INT64_T": np.int64,
    "UINT8_T": np.uint8, "UINT16_T": np.uint16, "UINT32_T": np.uint32, "UINT64_T": np.uint64,
    "AINT": np.int64, "OFFSET": np.int64, "COUNT": np.int64,
    "C_COMPLEX": np.complex64, "C_FLOAT_COMPLEX": np.complex64, "COMPLEX": np.complex64,
    "C_DOUBLE_COMPLEX": np.complex128, "DOUBLE_COMPLEX": np.complex128,
    "CXX_FLOAT_COMPLEX": np.complex64, "CXX_DOUBLE_COMPLEX": np.complex128,
    "C_LONG_DOUBLE_COMPLEX": np.clongdouble, "REAL": np.float32, "DOUBLE_PRECISION": np.float64,
    "INTEGER": np.int32, "LOGICAL": np.int32, "REAL4": np.float32, "REAL8": np.float64,
    "INTEGER4": np.int32, "INTEGER8": np.int64,
    "FLOAT16_T": np.float16, "FLOAT32_T": np.float32, "FLOAT64_T": np.float64,
    "SIGNED_SHORT": np.int16, "SIGNED_INT": np.intc, "SIGNED_LONG": np.int_,
    "SIGNED_LONG_LONG": np.longlong, "SINT8_T": np.int8, "SINT16_T": np.int16,
    "SINT32_T": np.int32, "SINT64_T": np.int64, "CXX_LONG_DOUBLE_COMPLEX": np.clongdouble,
    "CHARACTER": np.uint8, "LOGICAL1": np.int8, "LOGICAL2": np.int16, "LOGICAL4": np.int32,
    "LOGICAL8": np.int64, "INTEGER1": np.int8, "INTEGER2": np.int16, "REAL16": np.longdouble,
    "COMPLEX8": np.complex64, "COMPLEX16": np.complex128, "COMPLEX32": np.clongdouble,
    "F_BOOL": np.int32, "F_INT": np.int32, "F_FLOAT": np.float32, "F_DOUBLE": np.float64,
    "F_COMPLEX": np.complex64, "F_FLOAT_COMPLEX": np.complex64,
    "F_DOUBLE_COMPLEX": np.complex128,
    "FLOAT_INT": _pair(np.float32, np.intc), "DOUBLE_INT": _pair(np.float64, np.intc),
    "LONG_INT": _pair(np.int_, np.intc), "SHORT_INT": _pair(np.int16, np.intc),
    "TWOINT": _pair(np.intc, np.intc), "INT_INT": _pair(np.intc, np.intc),
    "LONG_DOUBLE_INT": _pair(np.longdouble, np.intc),
}
DATATYPES: dict[str, Datatype] = {k: Datatype(k, v) for k, v in _NAMES.items()}
DATATYPES.update(dict.fromkeys(("BFLOAT16_T", "COMPLEX4", "INTEGER16", "LOGICAL16", "REAL2"),
                               DATATYPE_NULL))     # (none in Open MPI 4.1: mpi4py's there)

_CODES = {"c": "CHAR", "b": "SIGNED_CHAR", "h": "SHORT", "i": "INT", "l": "LONG",
          "q": "LONG_LONG", "B": "UNSIGNED_CHAR", "H": "UNSIGNED_SHORT", "I": "UNSIGNED",
          "L": "UNSIGNED_LONG", "Q": "UNSIGNED_LONG_LONG", "f": "FLOAT", "d": "DOUBLE",
          "g": "LONG_DOUBLE", "?": "C_BOOL", "F": "C_FLOAT_COMPLEX", "D": "C_DOUBLE_COMPLEX",
          "G": "C_LONG_DOUBLE_COMPLEX", "i1": "INT8_T", "i2": "INT16_T", "i4": "INT32_T",
          "i8": "INT64_T", "u1": "UINT8_T", "u2": "UINT16_T", "u4": "UINT32_T", "u8": "UINT64_T",
          "f4": "FLOAT", "f8": "DOUBLE", "c8": "C_FLOAT_COMPLEX", "c16": "C_DOUBLE_COMPLEX",
          "p": "AINT", "n": "AINT", "P": "UNSIGNED_LONG", "N": "UNSIGNED_LONG", "b1": "C_BOOL",
          "e": "FLOAT16_T", "f2": "FLOAT16_T"}
"""mpi4py's typecodes (its Datatype.fromcode's), each predefined datatype's name."""


def _fromcode(code: str) -> Datatype:
    """mpi4py's ``MPI.Datatype.fromcode("d")``: the predefined datatype of a
    typecode (a struct or numpy one: "i", "f8"...); ValueError for another."""
    name = _CODES.get(str(code).lstrip("=<>|"))
    if name is None:
        raise ValueError(f"collectives.MPI Datatype.fromcode: cannot map typecode {code!r} "
                         f"to a datatype")
    return DATATYPES[name]


Datatype.fromcode = staticmethod(_fromcode)  # type: ignore[attr-defined]


PACKED_BY = ("the point-to-point calls (Send, Recv, their I, S, B and R forms, Sendrecv, "
             "Sendrecv_replace, the persistent Send_init and Recv_init, Message.Recv), "
             "Bcast, Ibcast, Gather, Igather, Scatter, Iscatter, Allgather, Iallgather, "
             "Alltoall, Ialltoall, Gatherv, Scatterv, Allgatherv, Alltoallv, "
             "Neighbor_alltoallw, the reductions (Reduce, Allreduce, Reduce_scatter_block, "
             "Reduce_scatter, Scan, Exscan, Ireduce, Iallreduce), the persistent collectives "
             "(Bcast_init... Alltoallv_init) and the windows' Put, Get, Accumulate, "
             "Get_accumulate and their R-forms")


def datatype_of(x: Any, what: str) -> np.dtype | None:
    """The numpy dtype a buffer spec's datatype names: an MPI.Datatype, a
    typecode ("d", "i"), a numpy dtype; None: the buffer's own."""
    if x is None:
        return None
    if isinstance(x, Datatype):
        if x.typemap is not None:
            raise NotImplementedError(f"collectives.MPI {what}: {x!r} is a derived datatype: "
                                      f"those are taken by {PACKED_BY}, not by {what}: pack "
                                      f"the elements into a contiguous array (numpy: a[idx])")
        return x.dtype
    try:
        return np.dtype(x)
    except TypeError:
        raise TypeError(f"collectives.MPI {what}: {x!r} is not a datatype (MPI.DOUBLE, "
                        f"a typecode 'd', a numpy dtype)") from None


def _land(x: Any, y: Any) -> Any:
    return x and y


def _lor(x: Any, y: Any) -> Any:
    return x or y


def _lxor(x: Any, y: Any) -> Any:
    return (not x) != (not y)


def _max(x: Any, y: Any) -> Any:
    return y if y > x else x


def _min(x: Any, y: Any) -> Any:
    return y if y < x else x


def _maxloc(x: Any, y: Any) -> Any:
    """(the pair itself that wins, a tie the lower index's, as mpi4py's: its objects kept)"""
    (u, i), (v, j) = x, y
    return (v, j) if v > u or (v == u and j < i) else (u, i)


def _minloc(x: Any, y: Any) -> Any:
    (u, i), (v, j) = x, y
    return (v, j) if v < u or (v == u and j < i) else (u, i)


class Op:
    """A reduction op: a predefined one's collective name (``"sum"``) and
    Python function (mpi4py's lowercase calls fold objects with it), or
    ``Op.Create(fn, commute)``'s collectives.Op."""

    def __init__(self, name: "str | Op" = "OP_NULL",
                 fold: Callable[[Any, Any], Any] | None = None, coll: Any = "op_null") -> None:
        """(mpi4py's ``MPI.Op()``: OP_NULL; ``MPI.Op(op)``: a handle of ``op``)"""
        if isinstance(name, Op):
            fold, coll, name = name.fold, name.coll, name.name
        if not isinstance(name, str):
            raise TypeError(f"collectives.MPI.Op(): expected an Op, got {type(name).__name__}")
        self.name: str = name
        self.fold: Callable[[Any, Any], Any] = fold or (lambda x, y: x)
        self.coll: Any = coll

    def __repr__(self) -> str:
        return f"MPI.{self.name}"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Op):
            return self.name == other.name and (self.coll is other.coll or
                                                isinstance(self.coll, str) and
                                                self.coll == other.coll)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.name)

    def __bool__(self) -> bool:
        return self.name != "OP_NULL"

    def __call__(self, x: Any, y: Any) -> Any:
        if self.name == "OP_NULL":
            raise ValueError("collectives.MPI: MPI.OP_NULL has no function to call")
        return self.fold(x, y)

    @classmethod
    def Create(cls, function: Callable[..., Any], commute: bool = False) -> "Op":
        """mpi4py's ``Op.Create(fn, commute)``: ``fn(inbuf, inoutbuf, datatype)``
        over arrays (collectives.Op); lowercase calls fold objects with
        ``fn(x, y, None)`` (its result), as mpi4py's do."""
        user = _UserOp(function, commute=bool(commute))
        three = getattr(user, "_dtype_arg", False)
        return cls("Op.Create", (lambda x, y: function(x, y, None)) if three else function,
                   user)

    def Free(self) -> None:
        pass

    def Reduce_local(self, inbuf: Any, inoutbuf: Any) -> None:
        """``inoutbuf = inbuf (op) inoutbuf``, elementwise, in this process
        (MPI_Reduce_local; coll.reduce_local)."""
        from .coll import reduce_local      # (coll.py imports this module)
        reduce_local(self, inbuf, inoutbuf)

    def Is_commutative(self) -> bool:
        return self.coll.commute if isinstance(self.coll, _UserOp) else True

    is_commutative = property(Is_commutative)

    def Is_predefined(self) -> bool:
        return not isinstance(self.coll, _UserOp)

    is_predefined = property(Is_predefined)


OPS: dict[str, Op] = {
    "SUM": Op("SUM", operator.add, "sum"), "PROD": Op("PROD", operator.mul, "prod"),
    "MAX": Op("MAX", _max, "max"), "MIN": Op("MIN", _min, "min"),
    "LAND": Op("LAND", _land, "land"), "LOR": Op("LOR", _lor, "lor"),
    "LXOR": Op("LXOR", _lxor, "lxor"), "BAND": Op("BAND", operator.and_, "band"),
    "BOR": Op("BOR", operator.or_, "bor"), "BXOR": Op("BXOR", operator.xor, "bxor"),
    "MAXLOC": Op("MAXLOC", _maxloc, "maxloc"), "MINLOC": Op("MINLOC", _minloc, "minloc"),
    "REPLACE": Op("REPLACE", lambda x, y: y, "replace"),
    "NO_OP": Op("NO_OP", lambda x, y: x, "no_op"),
}
