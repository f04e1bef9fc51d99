"""A traced graph's nodes, and the ``fx.GraphModule`` pieces cut from it (engine.traced).

``_piece`` makes one piece of consecutive nodes (the model's own submodules
and parameters under their names in the model); its first piece checks its
input (``_given``, ``_alone``); ``_ancestors``, ``_has_params`` and
``_constant`` are what the cuts and the loss are found by.
"""
from __future__ import annotations

from typing import Any


def _inputs(n: Any) -> list[Any]:
    return list(n.all_input_nodes)


def _ancestors(roots: list[Any]) -> set[Any]:
    seen: set[Any] = set()
    todo = list(roots)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(_inputs(n))
    return seen


def _has_params(model: Any, nodes: list[Any]) -> bool:
    for n in nodes:
        if n.op == "call_module" and next(model.get_submodule(n.target).parameters(),
                                          None) is not None:
            return True
        if n.op == "get_attr":
            try:
                model.get_parameter(n.target)       # (a buffer or constant raises)
                return True
            except AttributeError:
                pass
    return False


def _piece(model: Any, nodes: list[Any], ins: list[Any], outs: list[Any], name: str,
           extra: tuple[Any, ...] = ()) -> Any:
    """A GraphModule of ``nodes`` (in order) from ``ins`` (one argument: a
    value, or a tuple of several; then ``extra``, more placeholders) to
    ``outs`` (returned alone, or as a tuple of several); get_attr nodes are
    copied where read."""
    import operator

    import torch.fx as fx
    g = fx.Graph()
    env: dict[Any, Any] = {}
    if len(ins) == 1:
        env[ins[0]] = g.placeholder(ins[0].name if ins[0].op == "placeholder" else "x")
        if ins[0].op == "placeholder" and not all(
                u.op == "call_function" and u.target is operator.getitem for u in ins[0].users):
            # the model's one input, read whole (not a tuple it indexes): checked
            env[ins[0]] = g.call_function(_alone, (env[ins[0]], ins[0].name))
    else:
        packed = g.placeholder("xs")
        if all(m.op == "placeholder" for m in ins):     # the model's own inputs: checked
            packed = g.call_function(_given, (packed, tuple(m.name for m in ins)))
        for i, m in enumerate(ins):
            env[m] = g.call_function(operator.getitem, (packed, i))
    for ph in extra:
        env[ph] = g.placeholder(ph.name)

    def value(m: Any) -> Any:
        if m not in env:
            if m.op != "get_attr":
                raise AssertionError(f"{m} is read across a cut")
            env[m] = g.node_copy(m)
        return env[m]

    for n in nodes:
        for m in _inputs(n):
            value(m)
        env[n] = g.node_copy(n, value)
    g.output(value(outs[0]) if len(outs) == 1 else tuple(value(m) for m in outs))
    gm = fx.GraphModule(model, g, class_name=name)
    for n in g.nodes:       # a buffer read here stays out of the state dict if it was
        path, _, attr = n.target.rpartition(".") if n.op == "get_attr" else ("", "", "")
        if attr in getattr(model.get_submodule(path), "_non_persistent_buffers_set", ()) or (
                _constant(n) and attr not in model._buffers):
            # (and a constant the forward makes, which fx put in as a buffer: the job's
            # state dict held a key the model's has not, which strict loading refused)
            gm.get_submodule(path)._non_persistent_buffers_set.add(attr)
    return gm


def _given(xs: Any, names: tuple[str, ...]) -> Any:
    """The first piece's input: a tuple of the inputs the forward was
    traced with (``names``), else a TypeError that says so (a tuple of
    more ran without the rest, position ids left out with no word; a
    tensor alone failed on an index)."""
    if isinstance(xs, (tuple, list)) and len(xs) == len(names):
        return xs
    got = (f"a tuple of {len(xs)}" if isinstance(xs, (tuple, list))
           else f"one {type(xs).__name__}")
    raise TypeError(f"the model's forward was traced with {len(names)} inputs "
                    f"({', '.join(names)}; sample= a tuple of them), which each step takes as "
                    f"one tuple of as many: got {got}")


def _alone(x: Any, name: str) -> Any:
    """The first piece's input where the forward was traced with one
    (``name``), read whole: a tuple or a list raises a TypeError that says
    so (``step((x, mask), y)`` with no sample= tuple given to distribute: the
    forward was traced with x alone, its mask at its default, and the tuple
    failed in the first layer, ``linear(): argument 'input' must be Tensor,
    not tuple``)."""
    if isinstance(x, (tuple, list)):
        raise TypeError(f"the model's forward was traced with 1 input ({name}), which each "
                        f"step takes alone: got a {type(x).__name__} of {len(x)}; to trace "
                        f"its forward with several inputs, give engine.distribute (or "
                        f"engine.sequential: inputs=) sample= a tuple of them, "
                        f"sample=({name}, ...), and each step the same tuple")
    return x


def _constant(n: Any) -> bool:
    """Whether fx Node ``n`` reads a tensor the forward made of constants
    (``torch.tensor(2.0)``), which fx sets aside on the model under a name
    of its own, another each trace (``_tensor_constant0``, then 1...)."""
    return n.op == "get_attr" and n.target.startswith("_tensor_constant")


def _with_attrs(nodes: list[Any]) -> list[Any]:
    """``nodes`` and the get_attr nodes they read."""
    return nodes + [m for n in nodes for m in _inputs(n) if m.op == "get_attr"]
