"""Where a watched colwise output's features axis goes (engine.tp_watch):
what an index, a split, a view or a move does to it, and whether a call
cuts it into pieces, mixes its values or contracts it. Pure functions of
the call and the shapes.
"""
from __future__ import annotations

import math
from typing import Any


_CUTS = {"split": 2, "split_with_sizes": 2, "unsafe_split": 2, "chunk": 2, "unsafe_chunk": 2,
         "tensor_split": 2, "unbind": 1, "narrow": 1, "glu": 1}   # name: where its dim is
# views of a tensor: where an axis goes is read from the shapes (reshapes), or
# from the same call on a probe whose one axis of size 2 is the features' (moves)
_VIEWS = frozenset(("view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"))
_MOVES = frozenset(("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"))


def _index_at(torch: Any, index: Any, ndim: int, a: int) -> tuple[Any, int | None]:
    """What an index (``x[index]``) takes of axis ``a`` of an ``ndim``-axis
    tensor (a full slice where it leaves it whole, or cannot tell: a boolean
    mask), and where that axis is in the result (None: gone, or past an
    index tensor, whose placement is torch's rule)."""
    index = index if isinstance(index, tuple) else (index,)

    def takes(i: Any) -> int:         # the axes an index element uses (-1: not known)
        if i is None or i is ...:
            return 0
        bool_tensor = isinstance(i, torch.Tensor) and i.dtype == torch.bool
        return -1 if isinstance(i, bool) or bool_tensor else 1
    used = [takes(i) for i in index]
    if -1 in used or sum(i is ... for i in index) > 1:
        return slice(None), None
    at, pos, i_in, i_out, advanced = slice(None), None, 0, 0, False
    for i in index:
        if i is None:
            i_out += 1
            continue
        if i is ...:
            k = ndim - sum(used)
            if i_in <= a < i_in + k:
                pos = i_out + a - i_in
            i_in, i_out = i_in + k, i_out + k
            continue
        if i_in == a:
            at = i
            pos = i_out if isinstance(i, slice) else None
        if isinstance(i, slice):
            i_out += 1
        elif not isinstance(i, int):
            advanced = True
        i_in += 1
    if a >= i_in:
        pos = i_out + a - i_in
    return at, None if advanced else pos


def _cut_at(torch: Any, func: Any, args: Any, kwargs: Any, out: Any) -> list[int] | None:
    """The sizes of the pieces ``func`` cut the features' axis of
    ``args[0]`` into, or None where it cut no other axis or none."""
    name, x = getattr(func, "__name__", ""), args[0]
    a = x._tp_axis % x.dim()
    n = x.shape[a]
    if name == "__getitem__":
        at, _ = _index_at(torch, args[1], x.dim(), a)
        if isinstance(at, slice):
            kept = len(range(*at.indices(n)))
            if kept == n and at.indices(n)[2] == 1:
                return None
        else:
            kept = (int(at.numel()) if isinstance(at, torch.Tensor) else
                    len(at) if isinstance(at, (list, tuple)) else 1)
        sizes = [kept, n - kept]
    elif name == "__iter__":
        sizes = [1] * n if a == 0 else []
    elif name in _CUTS:
        dim = kwargs.get("dim", args[_CUTS[name]] if len(args) > _CUTS[name] else
                         (-1 if name == "glu" else 0))
        if not isinstance(dim, int) or dim % x.dim() != a:
            return None
        if name == "glu":
            sizes = [n // 2] * 2
        elif name == "narrow":
            sizes = [out.shape[a], n - out.shape[a]]
        else:
            sizes = [1] * len(out) if name == "unbind" else [o.shape[a] for o in out]
    else:
        return None
    sizes = [s for s in sizes if s]
    return sizes if len(sizes) > 1 else None


def _regroup(before: tuple[int, ...], after: tuple[int, ...], a: int,
             unit: int | None) -> tuple[int, int | None] | None:
    """Where axis ``a`` of a tensor shaped ``before`` holds its features once
    viewed as ``after``, and how many features one step along it holds then;
    None where they are no longer on one axis in order (a merge with an
    outer axis: ``(T, heads, hd)`` into ``T * heads * hd``). The axes are
    matched in groups of equal size; a group's features go to its first axis
    (a split: the heads of ``(heads, hd)``, which hold this rank's part)."""
    if 0 in before or 0 in after:
        return None
    i = j = 0
    while i < len(before):
        i0, j0 = i, j
        p, q = before[i], after[j] if j < len(after) else 1
        i, j = i + 1, j + 1
        while p != q:
            if p < q:
                if i == len(before):
                    return None
                p, i = p * before[i], i + 1
            else:
                if j >= len(after):
                    return None
                q, j = q * after[j], j + 1
        if i0 <= a < i:
            if j0 >= len(after) or any(s != 1 for s in before[i0:a]):
                return None            # an outer axis of size > 1 merged with it
            inner_before = math.prod(before[a + 1:i])
            inner_after = math.prod(after[j0 + 1:j])
            if unit is not None and unit * inner_after % inner_before == 0:
                unit = unit * inner_after // inner_before
            else:
                unit = None
            return j0, unit
    return None


# functions over an axis that mix its values (name: where its dim is, and
# its default: None, all of them or none, is not looked at)
_MIXES = {"softmax": (1, None), "log_softmax": (1, None), "logsumexp": (1, None),
          "sum": (1, None), "mean": (1, None), "amax": (1, None), "amin": (1, None),
          "max": (1, None), "min": (1, None), "argmax": (1, None), "argmin": (1, None),
          "topk": (2, -1), "sort": (1, -1), "argsort": (1, -1), "cumsum": (1, None),
          "std": (1, None), "var": (1, None), "norm": (2, None), "normalize": (2, 1)}
_CONTRACTS = ("matmul", "__matmul__", "mm", "bmm", "scaled_dot_product_attention")


def _mixed_at(func: Any, args: Any, kwargs: Any) -> bool:
    """Whether ``func`` mixes the values along the features' axis of
    ``args[0]`` (a softmax or a sum over it): on a colwise shard, this
    rank's part of them only."""
    name, x = getattr(func, "__name__", ""), args[0]
    if name not in _MIXES or x.dim() == 0:
        return False
    if _over_all(func, args, kwargs):       # over every axis (logits.argmax(), .sum())
        return True
    at, default = _MIXES[name]
    dim = kwargs.get("dim", args[at] if len(args) > at else default)
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return any(isinstance(d, int) and d % x.dim() == x._tp_axis % x.dim() for d in dims)


def _over_all(func: Any, args: Any, kwargs: Any) -> bool:
    """Whether ``func`` (one of ``_MIXES``) reduces over every axis of
    ``args[0]``, given no axis (``logits.argmax()``, ``y.sum()``)."""
    name = getattr(func, "__name__", "")
    if name not in _MIXES or _MIXES[name][1] is not None:
        return False
    at = _MIXES[name][0]
    return kwargs.get("dim", args[at] if len(args) > at else None) is None


def _contracted(cls: Any, func: Any, args: Any) -> Any:
    """The first watched operand of a product (``matmul``, scaled dot
    product attention's q and k, ``einsum``) whose features' axis it
    contracts, or None."""
    name = getattr(func, "__name__", "")
    if name == "einsum" and isinstance(args[0], str):
        lhs, arrow, rhs = args[0].replace(" ", "").partition("->")
        if not arrow:              # implicit: the letters used once, and the ellipsis
            rhs = "".join(c for c in lhs if c.isalpha() and lhs.count(c) == 1) + "..."
        for term, op in zip(lhs.split(","), args[1:]):
            if type(op) is not cls:
                continue
            a = op._tp_axis % op.dim()
            pre, ell, post = term.partition("...")
            outer = op.dim() - len(post)       # where the letters after "..." start
            if a < len(pre) or (not ell and a < len(term)):
                letter = term[a]
            elif a >= outer:
                letter = post[a - outer]
            else:
                letter = "..."                 # one of the axes the ellipsis stands for
            if letter not in rhs:
                return op
        return None
    if name not in _CONTRACTS:
        return None
    for k, op in enumerate(args[:2]):
        if type(op) is not cls or op.dim() == 0:
            continue
        # (name compared whole: dynamo traced no str method of a function's name)
        sdpa = name == "scaled_dot_product_attention"
        inner = op.dim() - 1 if k == 0 or op.dim() == 1 or sdpa else op.dim() - 2
        if op._tp_axis % op.dim() == inner:
            return op
    return None
