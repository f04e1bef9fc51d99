"""One planned submodule cut to this rank's shard in place
(engine.tensor_parallel): its parameters, the sizes its code reads, its
record, the hooks that sum its whole parameters' gradients, its wrapped
forward.
"""
from __future__ import annotations

import functools
import types
from typing import Any

from .tp_plan import Style, joined_order, rewrite_attrs, shard_rows
from .tp_rng import _Stream, draws_nothing
from .tp_checks import _dims, is_conv1d
from .tp_record import _Meta, _summed
from .tp_forward import _forward


def _cut(torch: Any, full: Any, dim: int, style: Style, group: Any) -> Any:
    """This rank's shard of ``full`` along ``dim``: its part of each block
    (``style.parts``), as parallelize keeps and load_full_state_dict loads."""
    rows = shard_rows(full.shape[dim], style.parts, group.size, group.rank)
    return full.index_select(dim, torch.tensor(rows, device=full.device))


def _sequence_params(sub: Any, styles: dict[int, Style]) -> list[tuple[str, Any]]:
    """The parameters of a "sequence" module ``sub`` whose gradients it sums
    over tp: its own and its submodules', but not those under a planned
    submodule (in this call, ``styles``, or an earlier one) of a style of
    its own, which shards them, sums them itself or gathers the whole
    sequence for them (a ``replicate`` one with input ``any`` sees the part
    ``sub`` sees: its parameters are summed here). They were summed here
    too: a nested "sequence" module's twice, a colwise one's shards over
    the ranks."""
    theirs: set[int] = set()
    for m in sub.modules():
        meta = getattr(m, "_tp", None)
        st = styles.get(id(m)) or (meta.style if meta is not None else None)
        if m is not sub and st is not None and (st.style, st.input) != ("replicate", "any"):
            theirs.update(id(p) for p in m.parameters())
    return [(n, p) for n, p in sub.named_parameters() if id(p) not in theirs]


def _shard(torch: Any, name: str, sub: Any, style: Style, group: Any,
           cut: dict[int, Any], styles: dict[int, Style]) -> None:
    tp, r = group.size, group.rank
    conv1d = is_conv1d(sub)     # (read before its weight is cut, while nx and nf fit it)
    meta = _Meta(name, style, group, {p: d for p, d in _dims(sub, style.style).items()
                                      if getattr(sub, p, None) is not None})
    with torch.no_grad():
        for p, d in meta.dims.items():
            full = getattr(sub, p)       # this rank's part (of each block, when fused)
            if id(full) not in cut:
                # cut in place, the parameter kept: an optimizer made on the model before
                # it was sharded steps the shards (a new Parameter left such an optimizer
                # holding the whole ones, which no gradient reached: it stepped nothing,
                # silently); one whose state has the whole shapes fails loudly instead
                cut[id(full)] = full
                shard = _cut(torch, full, d, style, group)
                if isinstance(full, torch.nn.Parameter):
                    full.data, full.grad = shard, None
                else:
                    cut[id(full)] = torch.nn.Parameter(shard, requires_grad=full.requires_grad)
            setattr(sub, p, cut[id(full)])
    if style.style == "colwise":
        meta.order = joined_order(sub.nf if conv1d else sub.out_features, style.parts, tp)
        if conv1d:
            sub.nf //= tp          # (its forward shapes its output by it)
        else:
            sub.out_features //= tp
    elif style.style == "rowwise":
        if not conv1d:
            sub.in_features //= tp
        elif hasattr(sub, "nx"):
            sub.nx //= tp
    elif style.style == "vocab":
        sub.num_embeddings //= tp
        meta.lo = r * sub.num_embeddings
        if sub.padding_idx is not None:
            # the shard's too, as num_embeddings: the padding row's index here, or None
            # (what reset_parameters() zeroes: the whole table's index zeroed a token's
            # row in the other shards, or was past their rows)
            pad = sub.padding_idx - meta.lo
            sub.padding_idx = pad if 0 <= pad < sub.num_embeddings else None
    seen_part = style.style == "sequence" or (style.style, style.input) == ("replicate", "shard")
    summed = (_sequence_params(sub, styles) if seen_part else
              [("bias", sub.bias)] if style.style == "rowwise" and style.output != "replicate"
              else [])
    summed = [(n, p) for n, p in summed if p is not None and p.requires_grad]
    meta.summed_names, meta.summed = [n for n, _ in summed], [p for _, p in summed]
    for param in meta.summed:      # whole, but fed a part of the sequence: sum the parts
        param.register_hook(functools.partial(_summed, meta))
    rewrite_attrs(sub, style, tp)
    sub._tp = meta
    if style.rng == "rank":
        meta.stream = _Stream(torch, r, draws_nothing(sub))
    if style.style != "replicate" or (style.input, style.output) != ("any", "any") or \
            meta.stream is not None or style.width or style.attrs or style.rng == "shared":
        sub.forward = types.MethodType(_forward, sub)
