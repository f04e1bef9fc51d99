"""``dist.all_reduce`` of a sparse COO tensor on the "meshrun" backend, as
gloo does it: each rank coalesces its tensor (the sum of its tensors, when
given several), every rank gets every rank's indices and values, and sums
them locally (concatenated in rank order, then coalesced). SUM only, as on
gloo: a sum of sparse tensors is sparse, a product or a maximum is not.

One collective: each rank sends its peers one message, its nnz, indices and
values as bytes; its fingerprint holds the dtype, the full shape and the
sparse dimensions, so a rank that differs raises MismatchError on every
member naming both (gloo: "Sparse dimensions do not match").
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .host.exchange import all_gather_object_direct
from .runner import Ctx, start

__all__ = ["sparse_all_reduce"]

_I64 = 8


def sparse_all_reduce(g: Any, tensors: list[torch.Tensor], op: str, async_op: bool,
                      timeout: float | None) -> Any:
    """The sum over ``g`` of the sparse COO ``tensors`` (every rank's, all
    of this rank's), coalesced, on the first tensor's device; or a
    meshrun Work for it with ``async_op``. The tensors are left as they are.
    ``op`` (meshrun's name) other than "sum" raises ValueError on every member."""
    def prepare(_: Any) -> tuple[dict, Callable[[Ctx], torch.Tensor]]:
        if op != "sum":
            raise ValueError(f"all_reduce of sparse tensors takes ReduceOp.SUM only (as on "
                             f"gloo), not {op}")
        x = tensors[0].detach()
        for t in tensors[1:]:
            x = x + t.detach()
        x = x.coalesce().cpu()
        shape, sd, dtype, device = tuple(x.shape), x.sparse_dim(), x.dtype, tensors[0].device
        payload = torch.cat([torch.tensor([x._nnz()], dtype=torch.int64).view(torch.uint8),
                             x.indices().contiguous().reshape(-1).view(torch.uint8),
                             x.values().contiguous().reshape(-1).view(torch.uint8)]).numpy()

        def body(ctx: Ctx) -> torch.Tensor:
            parts = [_decode(p, sd, shape[sd:], dtype)
                     for p in all_gather_object_direct(ctx, payload)]
            out = torch.sparse_coo_tensor(torch.cat([i for i, _ in parts], 1),
                                          torch.cat([v for _, v in parts], 0), shape,
                                          check_invariants=True)
            return out.coalesce().to(device)
        return {"coll": "sparse_all_reduce", "op": op, "dtype": str(dtype)[6:],
                "shape": list(shape), "sparse_dim": sd}, body
    return start(g, "sparse_all_reduce", prepare, async_op, timeout)


def _decode(part: np.ndarray, sd: int, dense: tuple[int, ...],
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A peer's (indices, values) out of its message's bytes."""
    b = torch.from_numpy(part if part.flags.writeable else part.copy())
    nnz = int(b[:_I64].view(torch.int64).item())
    end = _I64 + _I64 * sd * nnz
    indices = b[_I64:end].view(torch.int64).reshape(sd, nnz)
    raw = b[end:]
    size = torch.empty((), dtype=dtype).element_size()
    if end % size:                   # a view to a wider dtype must start on its alignment
        raw = raw.clone()
    return indices, raw.view(dtype).reshape((nnz,) + dense)
