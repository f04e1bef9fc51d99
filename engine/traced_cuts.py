"""Where a traced graph may be cut, and where its layers end (engine.traced).

``_loop_steps``: the ends of the steps of a loop over an ``nn.ModuleList``;
``_tensor_valued``: the values surely tensors, which alone cross a cut;
``_output``: the value the layers end at, before the loss.
"""
from __future__ import annotations

from typing import Any

from .traced_inplace import _call_name
from .traced_pieces import _ancestors, _has_params, _inputs


_RESHAPES = {"view", "reshape", "flatten", "contiguous"}
"""Calls that keep every value of their first argument, in another shape."""


def _output(model: Any, nodes: list[Any], out: list[Any], end: Any, ins: list[Any]
            ) -> tuple[Any, set[Any]]:
    """The value the layers end at, and the nodes from it to ``end``, what
    the loss reads (given to the loss with it). The layers' output is what
    ``eval_step(outputs=True)`` hands back, so it is the model's output,
    not the loss's view of it (nanoGPT's ``logits.view(-1, V)``, rows times
    positions): a value the forward returns beside its loss, of which the
    loss reads a function computed without parameters or other values of
    the model (nanoGPT's logits, Hugging Face's, which it reads shifted by
    a position); else, a forward returning the loss alone, what ``end``
    reshapes (view, reshape, flatten, contiguous: the values the loss reads,
    in the shape they were made). ``end`` itself where there is neither."""
    ups = _ancestors([end])

    def between(c: Any) -> set[Any] | None:
        """The nodes from ``c`` to ``end``, where nothing else of the model
        is read on the way (no other value, no parameter or buffer: a
        scaling by one stays in the layers); else None."""
        if c in ins:
            return None
        way, todo = set(), list(c.users)       # what reads c, on the way to end
        while todo:
            n = todo.pop()
            if n in ups and n not in way:
                way.add(n)
                todo.extend(n.users)
        if any(m is not c and m not in way for n in way for m in _inputs(n)) or _has_params(
                model, list(way)):
            return None
        return way

    for c in reversed([n for n in nodes if n in out and n in ups]):
        way = between(c)
        if way is not None:
            return c, way
    way = set()
    while _call_name(end) in _RESHAPES and end.args and hasattr(end.args[0], "all_input_nodes"):
        more = between(end.args[0])
        if more is None:
            break
        end, way = end.args[0], more
    return end, way


def _loop_steps(model: Any, body: list[Any], pos: dict[Any, int]) -> set[Any]:
    """The calls of ``body`` that end a step of a loop over an
    ``nn.ModuleList``: a call of its member i whose next module call is
    member i + 1, or of its last member (where the values still live may
    cross a cut together). Not a member of an ``nn.Sequential`` called by
    a forward of the model's own (a residual around a few of them: a cut
    there would carry the branch and the residual both). A block returning
    a tuple that the loop takes apart (Hugging Face's ``layer_outputs =
    layer(hidden, mask); hidden = layer_outputs[0]``): its last item taken
    ends the step."""
    import operator

    from torch import nn
    calls = [n for n in body if n.op == "call_module"]
    steps = set()
    for n, after in zip(calls, [*calls[1:], None]):
        parent, _, name = n.target.rpartition(".")
        members = model.get_submodule(parent)
        if not isinstance(members, nn.ModuleList) or not name.isdigit():
            continue
        i = int(name)
        if i == len(members) - 1 or (after is not None and after.target == f"{parent}.{i + 1}"):
            items = [u for u in n.users if u in pos]
            if items and all(u.target is operator.getitem for u in items):
                steps.add(max(items, key=pos.__getitem__))
            else:
                steps.add(n)
    return steps


_NOT_TENSORS = {"size", "dim", "numel", "item", "tolist", "stride", "element_size",
                "is_contiguous", "is_floating_point", "data_ptr", "__len__"}


def _tensor_valued(nodes: list[Any]) -> set[Any]:
    """The nodes whose value is surely a tensor, found without running the
    graph: the input, a submodule's output (a tuple's items where it is
    taken apart by indexing), a parameter, an operation on a tensor
    other than those that read its size, shape, dtype or device (an int
    computed from a size is not one), and a tensor made from sizes alone
    (``torch.arange(t)``: Hugging Face's position ids where none are
    given, read by every layer; left out, no layers were cut apart)."""
    import builtins
    import operator

    import torch
    made = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.eye,
            torch.linspace, torch.logspace, torch.tril_indices, torch.triu_indices}
    out: set[Any] = set()
    tuples: set[Any] = set()    # modules returning a tuple, taken apart
    for n in nodes:
        if n.op == "call_module" and n.users and all(
                u.target is operator.getitem for u in n.users):
            tuples.add(n)
            continue
        if n.target is operator.getitem and n.args[0] in tuples:
            out.add(n)
            continue
        if n.op in ("placeholder", "call_module", "get_attr"):
            out.add(n)
        elif n.op in ("call_function", "call_method"):
            if n.target in _NOT_TENSORS or n.target in (builtins.getattr, builtins.len):
                continue
            args = _inputs(n)
            if n.target is operator.getitem:      # a tensor's item, not a size's
                args = args[:1]
            if any(m in out for m in args) or n.target in made:
                out.add(n)
    return out
