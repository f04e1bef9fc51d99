"""The host collectives of msgpack-able objects (collectives.host.paths):
broadcast_object, all_gather_object, gather_object, all_to_all_object and
scatter_object, over point-to-point (collectives.host.exchange)."""
from __future__ import annotations

from typing import Any

from mesh import Comm

from ..plan import Tuning
from ..runner import Body, Ctx, agreed, start
from .exchange import (all_gather_object_direct, all_to_all_object_direct, as_received,
                       broadcast_object_tree)
from .paths_checks import _fp, _root

__all__ = ["broadcast_object", "all_gather_object", "gather_object", "all_to_all_object",
           "scatter_object"]



def broadcast_object(g: Comm, obj: Any = None, root: int = 0, async_op: bool = False,
                     timeout: float | None = None) -> Any:
    """The root's msgpack-able ``obj`` on every rank (as msgpack returns it:
    tuples become lists)."""
    def prepare(t: Tuning) -> tuple[dict, Body]:
        r = _root(g, root)
        value = as_received(obj) if g.rank == r else None
        return _fp("broadcast_object", root=r), agreed(
            lambda ctx: broadcast_object_tree(ctx, value, r))
    return start(g, "broadcast_object", prepare, async_op, timeout)


def all_gather_object(g: Comm, obj: Any, async_op: bool = False,
                      timeout: float | None = None) -> Any:
    """The list of every rank's msgpack-able ``obj``, in rank order."""
    def prepare(t: Tuning) -> tuple[dict, Body]:
        value = as_received(obj)
        return _fp("all_gather_object"), lambda ctx: all_gather_object_direct(ctx, value)
    return start(g, "all_gather_object", prepare, async_op, timeout)


def gather_object(g: Comm, obj: Any, root: int = 0, async_op: bool = False,
                  timeout: float | None = None) -> Any:
    """The list of every rank's msgpack-able ``obj``, in rank order, on the
    root (mpi4py's ``gather``); None on the other ranks."""
    def prepare(t: Tuning) -> tuple[dict, Body]:
        r = _root(g, root)
        value = as_received(obj)

        def body(ctx: Ctx) -> Any:
            if ctx.g.rank != r:
                ctx.send(value, r)
                return None
            recvs = {p: ctx.irecv(p) for p in range(ctx.g.size) if p != r}
            return [value if i == r else recvs[i].wait() for i in range(ctx.g.size)]
        return _fp("gather_object", root=r), agreed(body)
    return start(g, "gather_object", prepare, async_op, timeout)



def all_to_all_object(g: Comm, objs: Any, async_op: bool = False,
                      timeout: float | None = None) -> Any:
    """Item j of this rank's list (or tuple) of g.size msgpack-able objects
    to rank j (mpi4py's ``alltoall``); returns the list of what every rank
    sent this one, in rank order (its own item at its own place)."""
    def prepare(t: Tuning) -> tuple[dict, Body]:
        values = _one_per_rank(g, objs, "all_to_all_object", "")
        return _fp("all_to_all_object"), lambda ctx: all_to_all_object_direct(ctx, values)
    return start(g, "all_to_all_object", prepare, async_op, timeout)



def _one_per_rank(g: Comm, objs: Any, coll: str, where: str) -> list[Any]:
    """``objs`` as sent, one a rank of ``g``; ValueError unless a list (or
    tuple) of g.size."""
    if not isinstance(objs, (list, tuple)) or len(objs) != g.size:
        got = (f"a {type(objs).__name__} of {len(objs)}"
               if isinstance(objs, (list, tuple)) else type(objs).__name__)
        raise ValueError(f"{coll} needs a list of {g.size} objects (one a rank){where}, "
                         f"got {got}")
    return [as_received(o) for o in objs]



def scatter_object(g: Comm, objs: Any = None, root: int = 0, async_op: bool = False,
                   timeout: float | None = None) -> Any:
    """Item i of the root's list (or tuple) of g.size msgpack-able objects
    on rank i (mpi4py's ``scatter``); ``objs`` is ignored (may be None) on
    the other ranks."""
    def prepare(t: Tuning) -> tuple[dict, Body]:
        r = _root(g, root)
        values = _one_per_rank(g, objs, "scatter_object", " on the root") if g.rank == r else []

        def body(ctx: Ctx) -> Any:
            if ctx.g.rank != r:
                return ctx.recv(r)
            sends = [ctx.isend(v, i) for i, v in enumerate(values) if i != r]
            for req in sends:
                req.wait()
            return values[r]
        return _fp("scatter_object", root=r), agreed(body)
    return start(g, "scatter_object", prepare, async_op, timeout)
