"""MPI's attribute caching on a communicator, a datatype and a window
(MPI_Comm_create_keyval, MPI_Type_..., MPI_Win_...: Create_keyval,
Set_attr, Get_attr, Delete_attr, Free_keyval), as mpi4py has it: a keyval
is this process's, its value any Python object; ``copy_fn(obj, keyval,
value)`` runs at a communicator's or a datatype's Dup (None or False: the
attribute is not copied; True: the same value; its NotImplemented: not
copied), ``delete_fn(obj, keyval, value)`` at Delete_attr, at a Set_attr over a value and at Free.
An exception in either is printed to stderr and raised as MPI.Exception
(ERR_OTHER), as mpi4py's. Nothing crosses processes: each rank keeps its
own, as MPI's."""
from __future__ import annotations

import itertools
import sys
import traceback
from typing import Any, Callable

__all__ = ["Attributes", "KEYVAL_INVALID"]

KEYVAL_INVALID = -1
TAG_UB = 0      # (types.TAG_UB; types is imported at a call: datatypes, which it imports, use
                # this module)


def _error(code: str, text: str) -> Exception:
    from . import types
    return types.Exception(types.ERR_OTHER if code == "ERR_OTHER" else types.ERRORS[code],
                           text)

Fn = Callable[[Any, int, Any], Any]
_keyvals: dict[int, tuple[Fn | bool | None, Fn | None]] = {}
_next = itertools.count(1000)      # (past the predefined ones: MPI.TAG_UB's 0)


def _called(fn: Fn, obj: Any, keyval: int, value: Any, what: str) -> Any:
    try:
        return fn(obj, keyval, value)
    except Exception as e:      # (mpi4py's: printed, then MPI's error class)
        traceback.print_exc(file=sys.stderr)
        raise _error("ERR_OTHER", f"collectives.MPI {what} of keyval {keyval}: "
                                  f"{type(e).__name__}: {e}") from e


class Attributes:
    """The attribute calls of Comm, Datatype and Win: the values in
    ``_attrs``, shared by every handle of one object (``MPI.Intracomm(comm)``
    and ``MPI.Win(win)`` take its dict)."""

    @property
    def _attrs(self) -> dict[int, Any]:
        got: dict[int, Any] | None = self.__dict__.get("_attr_values")
        if got is None:
            got = self.__dict__["_attr_values"] = {}
        return got

    @classmethod
    def Create_keyval(cls, copy_fn: Fn | bool | None = None, delete_fn: Fn | None = None,
                      nopython: bool = False) -> int:
        """A new keyval (``nopython`` taken: every value is a Python object here)."""
        k = next(_next)
        _keyvals[k] = (copy_fn, delete_fn)
        return k

    @classmethod
    def Free_keyval(cls, keyval: int) -> int:
        """The keyval freed (values set with it stay until deleted): KEYVAL_INVALID."""
        _keyvals.pop(_known(keyval, "Free_keyval"), None)
        return KEYVAL_INVALID

    def Set_attr(self, keyval: int, attrval: Any) -> None:
        _known(keyval, "Set_attr")
        if keyval in self._attrs:
            self.Delete_attr(keyval)
        self._attrs[keyval] = attrval

    def Get_attr(self, keyval: int) -> Any:
        """A value set (None where none is); MPI.TAG_UB's: the largest tag
        (meshrun's, 2**63 - 1)."""
        return 2 ** 63 - 1 if keyval == TAG_UB else self._attrs.get(keyval)

    def Delete_attr(self, keyval: int) -> None:
        if keyval not in self._attrs:
            return
        value = self._attrs.pop(keyval)
        delete = _keyvals.get(keyval, (None, None))[1]
        if delete is not None:
            _called(delete, self, keyval, value, "Delete_attr's delete_fn")

    def _copy_attrs(self, dup: "Attributes") -> None:
        """Dup's: each value through its keyval's copy_fn into ``dup``."""
        for k, value in list(self._attrs.items()):
            copy = _keyvals.get(k, (None, None))[0]
            if copy is None or copy is False:
                continue
            got = value if copy is True else _called(copy, self, k, value, "Dup's copy_fn")
            if got is not NotImplemented:
                dup._attrs[k] = got

    def _delete_attrs(self) -> None:
        """Free's: every value's delete_fn."""
        for k in list(self._attrs):
            self.Delete_attr(k)


def _known(keyval: int, what: str) -> int:
    if keyval not in _keyvals:
        raise _error("ERR_KEYVAL", f"collectives.MPI {what}: keyval {keyval!r} is none "
                                   f"Create_keyval made (MPI_ERR_KEYVAL)")
    return keyval
