"""Everyone-to-everyone collectives: all_to_all on arrays, and the object
collectives (msgpack values, never pickle), whose payloads are small.

all_to_all posts every receive first, straight into its row of the output,
then sends in a staggered order (rank r starts with r+1) so that no rank is
the first target of everyone at once.
"""
from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from ..plan import tree_children, tree_parent
from ..runner import Ctx

__all__ = ["all_to_all_direct", "as_received", "broadcast_object_tree",
           "all_gather_object_direct", "all_to_all_object_direct"]


def all_to_all_direct(ctx: Ctx, src: np.ndarray, out: np.ndarray) -> None:
    """Block i of ``src`` (shape (n, ...)) goes to rank i; block j of ``out``
    comes from rank j."""
    n, rank = ctx.g.size, ctx.g.rank
    peers = [(rank + k) % n for k in range(1, n)]
    recvs = [ctx.irecv(p, out[p]) for p in reversed(peers)]
    sends = [ctx.isend(src[p], p) for p in peers]
    out[rank] = src[rank]
    for req in recvs + sends:
        req.wait()


def _scalar(x: Any) -> Any:
    """A numpy scalar (a step counter, a loss) as the Python number it holds."""
    if isinstance(x, np.generic) and x.dtype.kind in "biuf":
        return x.item()
    raise TypeError(f"can not serialize {type(x).__name__!r} object")


def as_received(obj: Any) -> Any:
    """``obj`` as a peer will see it after msgpack (tuples become lists,
    numpy scalars Python numbers), so that every rank returns the same
    value; TypeError if it is not msgpack-able."""
    try:
        return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True, default=_scalar),
                               raw=False, strict_map_key=False)
    except Exception as e:
        hint = ""
        if "'ndarray'" in str(e) or "'Tensor'" in str(e):   # (mpi4py's bcast pickles them)
            hint = ("; arrays go by the array collectives (broadcast, gather, all_gather_v), "
                    "or nested in dicts and lists, from a root to every rank, by "
                    "C.broadcast_state")
        raise TypeError(f"{type(obj).__name__} is not msgpack-able ({e}); object "
                        f"collectives take msgpack values (no pickle){hint}") from None


def broadcast_object_tree(ctx: Ctx, obj: Any, root: int) -> Any:
    n, rank = ctx.g.size, ctx.g.rank
    parent = tree_parent(rank, n, root)
    if parent is not None:
        obj = ctx.recv(parent)
    reqs = [ctx.isend(obj, c) for c in tree_children(rank, n, root)]
    for req in reqs:
        req.wait()
    return obj


def all_gather_object_direct(ctx: Ctx, obj: Any) -> list[Any]:
    n, rank = ctx.g.size, ctx.g.rank
    peers = [(rank + k) % n for k in range(1, n)]
    recvs = {p: ctx.irecv(p) for p in peers}
    sends = [ctx.isend(obj, p) for p in peers]
    out = [obj if i == rank else recvs[i].wait() for i in range(n)]
    for req in sends:
        req.wait()
    return out


def all_to_all_object_direct(ctx: Ctx, objs: list[Any]) -> list[Any]:
    """``objs[p]`` to each peer p, one message each; what each sent here, in rank order."""
    n, rank = ctx.g.size, ctx.g.rank
    peers = [(rank + k) % n for k in range(1, n)]
    recvs = {p: ctx.irecv(p) for p in peers}
    sends = [ctx.isend(objs[p], p) for p in peers]
    out = [objs[rank] if i == rank else recvs[i].wait() for i in range(n)]
    for req in sends:
        req.wait()
    return out
