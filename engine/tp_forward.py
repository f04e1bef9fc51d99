"""The forward parallelize (engine.tensor_parallel) wraps a sharded
submodule's with: its input's collective, the computation on the shard (a
rowwise partial product, a vocab shard's rows, the module's own forward
on its stream, its input's width read as a part), its output's collective.
"""
from __future__ import annotations

import functools
from typing import Any

from .tp_plan import PlanError, edges, left, rowwise_fed_whole, same_on_every_rank
from .torch_stage import _torch
from .tp_comm import _edge
from .tp_rng import _on_shared
from .tp_checks import is_conv1d
from .tp_record import _Meta
from .tp_watch import watched


def _forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The wrapped forward of a sharded submodule: its input's collective,
    the computation on the shard, its output's collective (and a rowwise
    bias, added once). Its input is its first positional argument, or its
    first keyword argument when it is called with keywords only
    (``attn(hidden_states=h, mask=m)``)."""
    torch = _torch()
    meta: _Meta = self._tp
    st, g = meta.style, meta.group
    enter, leave = edges(st)
    if args:
        x, rest, key = args[0], args[1:], None
    elif kwargs:
        key = next(iter(kwargs))
        x, rest = kwargs.pop(key), ()
    else:
        raise PlanError(f"{meta.name} was called without arguments: its plan entry "
                        f"({st.style}) needs an input")
    if not meta.seen:
        _check_parts(torch, meta, x)
    if enter:
        x = _edge(g, x, enter, st.seq_dim, meta.name)
    if st.width:
        x = _shard_width(x, g, meta.name)
    if st.style == "rowwise":
        conv1d = is_conv1d(self)            # (a Conv1D's weight is (in, out))
        part = self.weight.shape[0 if conv1d else 1]
        if isinstance(x, torch.Tensor) and x.dim() and x.shape[-1] != part:
            # (torch's shape error named neither the layer nor the plan; every tp rank
            # has the same shapes, so all raise here, before the output's all-reduce)
            raise PlanError(rowwise_fed_whole(g.rank, meta.name, part, g.size, x.shape[-1]))
        y = torch.nn.functional.linear(x, self.weight.t() if conv1d else self.weight)
    elif st.style == "vocab":
        y = _embed(torch, self, meta, x)
    else:
        forward = functools.partial(type(self).forward, self)
        y = _module_forward(meta, (lambda v: forward(v, *rest, **kwargs)) if key is None else
                            (lambda v: forward(**{key: v}, **kwargs)), x)
    if leave:
        y = _edge(g, y, leave, st.seq_dim, meta.name)
    if st.style == "colwise" and st.output == "shard" and st.watched and not st.parts \
            and g.size > 1 and isinstance(y, torch.Tensor):
        y = watched(torch, y, meta)         # (under torch.compile too: a graph break)
    if st.style == "rowwise" and self.bias is not None:
        # a partial output takes the bias on tp rank 0 only (times 1, times 0
        # elsewhere): every rank has the same graph, so the bias's gradient
        # hook (a collective) runs on all of them at the same point
        once = self.bias if st.output != "partial" else self.bias * float(g.rank == 0)
        y = y + once
    left(meta.name, st, g.size)
    return y


def _check_parts(torch: Any, meta: _Meta, x: Any) -> None:
    """At a module's first call, for input "sequence": refuse the same
    input on every tp rank (tp_plan.same_on_every_rank). Not under
    torch.compile, nor for a meta tensor (no values), which stay unchecked."""
    if not isinstance(x, torch.Tensor) or x.is_meta or torch.compiler.is_compiling():
        return
    meta.seen = True
    a = x.detach()
    constant = a.numel() == 0 or bool((a == a.reshape(-1)[0]).all())
    data = a.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    same_on_every_rank(meta.group, meta.name, meta.style, data, a.shape, constant)


def _module_forward(meta: _Meta, forward: Any, x: Any) -> Any:
    """The module's own forward on its input ``x`` (rng="rank": on this tp
    rank's own stream). A view that no longer fits after an attribute
    rewrite is most often a width read from the input: the error says so."""
    try:
        if meta.stream is not None:
            return meta.stream.run(forward, x)
        if meta.style.rng == "shared":
            return _on_shared(_torch(), forward, x)
        return forward(x)
    except RuntimeError as e:
        st = meta.style
        if not st.attrs or st.width or "is invalid for input of size" not in str(e):
            raise
        raise PlanError(f"tp rank {meta.group.rank}: {meta.name}: {e} after the plan rewrote "
                        f"{', '.join(sorted(st.attrs))}: if its code reads its width from "
                        f"its input (B, T, C = x.size()), add \"width\": \"shard\" to its "
                        f"plan entry") from e


def _shard_width(x: Any, group: Any, name: str) -> Any:
    """``x`` as its module's code reads it under width="shard": its last axis
    looks ``1/tp`` as long (``size()`` and ``shape``); the data, its autograd
    history and every operation on it are the whole tensor's."""
    if x.ndim == 0 or x.shape[-1] % group.size:
        raise PlanError(f"tp rank {group.rank}: {name}: width='shard' reads the input's last "
                        f"axis as this rank's part, but the input is {tuple(x.shape)}, its "
                        f"last axis not divisible by the tp size {group.size}")
    narrow = x.as_subclass(_width_class())
    narrow._tp_parts = group.size
    return narrow


@functools.cache
def _width_class() -> Any:
    torch = _torch()
    shape = torch.Tensor.shape.__get__

    class ShardWidth(torch.Tensor):  # type: ignore[name-defined,misc]
        """A whole tensor whose last axis reads as one tp rank's part of it."""

        @classmethod
        def __torch_function__(cls, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
                if func is not torch.Tensor.size and func != shape:
                    return out       # a plain tensor: the narrowing stays on the input
                parts, ndim = args[0]._tp_parts, args[0].ndim
            if isinstance(out, torch.Size):
                return torch.Size((*out[:-1], out[-1] // parts))
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            return out // parts if dim % ndim == ndim - 1 else out

    return ShardWidth


def _embed(torch: Any, sub: Any, meta: _Meta, ids: Any) -> Any:
    """This rank's rows of the embedding; ids outside them give zeros.
    An id outside every rank's rows raises, as nn.Embedding does (each rank
    would give it zeros: a silent zero vector)."""
    total = sub.num_embeddings * meta.group.size
    bad = (ids < 0) | (ids >= total)
    if torch.compiler.is_compiling():
        # in the graph (a check of the ids' values there cut it: Tensor.item()); it
        # cannot say which id
        torch._assert_async(~bad.any(), f"tp rank {meta.group.rank}: {meta.name}: a token "
                            f"id is out of range for the embedding's {total} rows "
                            f"(vocab-sharded over tp={meta.group.size})")
    elif bool(bad.any()):
        raise IndexError(f"tp rank {meta.group.rank}: {meta.name}: token id "
                         f"{int(ids[bad].reshape(-1)[0])} is out of range for the embedding's "
                         f"{total} rows (vocab-sharded over tp={meta.group.size})")
    local = ids - meta.lo
    outside = (local < 0) | (local >= sub.num_embeddings)
    local = local.masked_fill(outside, 0)
    y = torch.nn.functional.embedding(local, sub.weight, sub.padding_idx, None, 2.0, False,
                                      sub.sparse)       # (padding_idx: this shard's row)
    if sub.scale_grad_by_freq and y.requires_grad:
        # torch divides a row's gradient by how often its id occurs in the batch;
        # here every id of the other ranks reads local row 0, and would count as
        # its: each position's gradient is divided by its own id's count instead
        _, where, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        scale = (1.0 / counts.to(torch.float64))[where].to(y.dtype).unsqueeze(-1)
        y.register_hook(lambda g: g * scale)
    return y.masked_fill(outside.unsqueeze(-1), 0.0)
