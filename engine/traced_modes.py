"""What torch.fx does not record of the forward's modes (engine.traced).

``self.training`` read by the forward (``_read_mode``: the pieces' own mode),
``torch.no_grad()`` (``_detach_no_grad``: read detached) and
``torch.autocast`` (``_autocast``, which engine.sequential warns of).
"""
from __future__ import annotations

from typing import Any

from .traced_pieces import _constant


_NO_GRAD = "meshrun_no_grad"


def _read_mode(graph: Any, other: Any, mode: bool, what: str) -> None:
    """fx bakes what the forward reads of ``self.training`` into the graph
    (``F.dropout(h, 0.1, self.training)``: ``training=True``), so that the
    pieces dropped out in ``eval_step`` too. ``other``, the forward traced
    in the other mode, tells which arguments are the mode: each becomes a
    read of the piece's own ``training``, which ``.eval()`` sets. A forward
    that branches on the mode keeps the traced mode's branch, and is told."""
    import warnings
    if other is None:
        return
    nodes, others = list(graph.nodes), list(other.nodes)
    if len(nodes) != len(others) or any(a.op != b.op or (a.target != b.target and not (
            _constant(a) and _constant(b))) for a, b in zip(nodes, others)):
        warnings.warn(f"engine.sequential: {what} branches on self.training: its pieces run "
                      f"the {'training' if mode else 'eval'} mode's branch in either mode "
                      f"(eval_step included)", stacklevel=3)
        return
    for a, b in zip(nodes, others):
        args = [i for i, (x, y) in enumerate(zip(a.args, b.args))
                if x is mode and isinstance(y, bool) and y is not mode]
        kwargs = [k for k, x in a.kwargs.items() if x is mode and b.kwargs.get(k) is not mode
                  and isinstance(b.kwargs.get(k), bool)]
        if not args and not kwargs:
            continue
        with graph.inserting_before(a):
            flag = graph.get_attr("training")
        a.args = tuple(flag if i in args else x for i, x in enumerate(a.args))
        a.kwargs = {k: flag if k in kwargs else x for k, x in a.kwargs.items()}


def _autocast(torch: Any) -> bool:
    """Whether torch.autocast is on, for the CPU or CUDA."""
    return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))


def _detached(value: Any) -> Any:
    """A value made under the forward's ``torch.no_grad()``, as its code
    saw it: a tensor without its autograd history (other values as they
    are)."""
    import torch
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value


def _detach_no_grad(graph: Any) -> None:
    """torch.fx records no grad mode: what a forward computes inside ``with
    torch.no_grad():`` (a norm used as a scale, a teacher's output) ran with
    gradients in the pieces, so the pipeline trained what one process does
    not. Each such value read where gradients are on is read detached."""
    for n in list(graph.nodes):
        users = [u for u in n.users if not u.meta.get(_NO_GRAD)]
        if n.meta.get(_NO_GRAD) and users:
            with graph.inserting_after(n):
                d = graph.call_function(_detached, (n,))
            for u in users:
                u.replace_input_with(n, d)
