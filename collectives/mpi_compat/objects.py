"""mpi4py's lowercase collectives: objects by collectives' object calls
(msgpack, never pickle: tuples come back as tuples, by mpi_compat.tuples,
and what msgpack cannot encode -- a set, a class instance, a complex, an
array inside an object -- is refused, saying so); ``bcast`` by
broadcast_state (arrays and nested lists and dicts of them too; a tuple
holding an array comes back a list). ``reduce``, ``allreduce``, ``scan`` and
``exscan`` of a numpy array (or numpy scalar) run collectives' call with the
op; of any other object (numbers, lists, MAXLOC's ``(value, index)``) every
value is gathered and folded with the op's Python function in the order
mpi4py's own tree folds them (fold, scan_fold: pure), so a float sum's bits
are mpi4py's."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

import mesh

from .. import api as C
from .coll import coll_op
from .tuples import unwrap, unwrap_state, wrap, wrap_state
from .types import OPS, Op

__all__ = ["ObjectCollectives", "fold", "scan_fold"]

_SUM = OPS["SUM"]


def fold(items: list[Any], op: Callable[[Any, Any], Any]) -> Any:
    """``items`` reduced as mpi4py's reduce does (msgpickle's binomial tree
    to rank 0: at step m, rank r takes r + m's partial result, for r a
    multiple of 2m)."""
    vals = list(items)
    n, m = len(vals), 1
    while m < n:
        for r in range(0, n - m, 2 * m):
            vals[r] = op(vals[r], vals[r + m])
        m *= 2
    return vals[0]


def scan_fold(items: list[Any], op: Callable[[Any, Any], Any],
              exclusive: bool = False) -> list[Any]:
    """Every rank's result of mpi4py's scan (or exscan: None on rank 0), in
    the order its recursive doubling combines them."""
    n = len(items)
    partial = list(items)
    result: list[Any] = list(items) if not exclusive else [None] * n
    has = [not exclusive] * n
    m = 1
    while m < n:
        sent = list(partial)
        for r in range(n):
            t = r ^ m
            if t >= n:
                continue
            if r > t:
                partial[r] = op(sent[t], sent[r])
                result[r] = op(sent[t], result[r]) if has[r] else sent[t]
                has[r] = True
            else:
                partial[r] = op(sent[r], sent[t])
        m *= 2
    return result


def _py(op: Any, what: str) -> tuple[Callable[[Any, Any], Any], bool]:
    if not isinstance(op, Op):
        raise TypeError(f"collectives.MPI {what}: op must be an MPI.Op, got {op!r:.60}")
    return op.fold, op.name in ("MAXLOC", "MINLOC")


def _pairs(items: list[Any], loc: bool) -> list[Any]:
    """MAXLOC's pairs as tuples (a ``[value, index]`` list too, as mpi4py's op takes)."""
    return [tuple(x) if loc and isinstance(x, list) else x for x in items]


def _array(x: Any) -> np.ndarray | None:
    """A copy of x to reduce by collectives (None: an object to fold)."""
    if isinstance(x, np.ndarray):
        return x.copy()
    if isinstance(x, np.generic):
        return np.array(x)
    return None


def _each(objs: Any) -> Any:
    """The root's scatter list (or alltoall's), each item wrapped (not a
    list: as it is, for the object call to refuse)."""
    return [wrap(x) for x in objs] if isinstance(objs, (list, tuple)) else objs


def _all(items: Any) -> Any:
    """Gathered items with their tuples back (None, off the root: None)."""
    return None if items is None else [unwrap(x) for x in items]


def _back(x: Any, a: Any) -> Any:
    return a[()] if isinstance(x, np.generic) and a is not None else a


class ObjectCollectives:
    """The object half of collectives.MPI's Comm's collectives."""

    _g: mesh.Comm

    def bcast(self, obj: Any, root: int = 0) -> Any:
        g = self._g
        if g.rank == root:
            C.broadcast_state(g, wrap_state(obj), root)
            return obj
        return unwrap_state(C.broadcast_state(g, None, root))

    def gather(self, sendobj: Any, root: int = 0) -> Any:
        return _all(C.gather_object(self._g, wrap(sendobj), root))

    def scatter(self, sendobj: Any, root: int = 0) -> Any:
        mine = _each(sendobj) if self._g.rank == root else None
        return unwrap(C.scatter_object(self._g, mine, root))

    def allgather(self, sendobj: Any) -> list[Any]:
        return _all(C.all_gather_object(self._g, wrap(sendobj)))

    def alltoall(self, sendobj: Any) -> list[Any]:
        return _all(C.all_to_all_object(self._g, _each(sendobj)))

    def reduce(self, sendobj: Any, op: Op = _SUM, root: int = 0) -> Any:
        g = self._g
        a = _array(sendobj)
        if a is not None:
            C.reduce(g, a, root, coll_op(op, "reduce"))
            return _back(sendobj, a) if g.rank == root else None
        fn, loc = _py(op, "reduce")
        items = _all(C.gather_object(g, wrap(sendobj), root))
        return None if items is None else fold(_pairs(items, loc), fn)

    def allreduce(self, sendobj: Any, op: Op = _SUM) -> Any:
        a = _array(sendobj)
        if a is not None:
            return _back(sendobj, C.all_reduce(self._g, a, coll_op(op, "allreduce")))
        fn, loc = _py(op, "allreduce")
        return fold(_pairs(_all(C.all_gather_object(self._g, wrap(sendobj))), loc), fn)

    def scan(self, sendobj: Any, op: Op = _SUM) -> Any:
        a = _array(sendobj)
        if a is not None:
            return _back(sendobj, C.scan(self._g, a, coll_op(op, "scan")))
        fn, loc = _py(op, "scan")
        items = _pairs(_all(C.all_gather_object(self._g, wrap(sendobj))), loc)
        return scan_fold(items, fn)[self._g.rank]

    def exscan(self, sendobj: Any, op: Op = _SUM) -> Any:
        a = _array(sendobj)
        if a is not None:
            return _back(sendobj, C.exscan(self._g, a, coll_op(op, "exscan")))
        fn, loc = _py(op, "exscan")
        items = _pairs(_all(C.all_gather_object(self._g, wrap(sendobj))), loc)
        return scan_fold(items, fn, exclusive=True)[self._g.rank]
