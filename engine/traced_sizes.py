"""Values the sample's shapes decide, computed on the sample (engine.traced).

``_evaluate`` runs a node on the sample; ``_bake_sizes`` puts in the graph as
constants the sizes read across the layers, checked as each step runs.
"""
from __future__ import annotations

from typing import Any

from .traced_cuts import _tensor_valued


_AGAIN = (" (an engine.distribute job traces its model again at the shapes of the inputs "
          "each step gives: pass them to step() on every rank)")
"""Said where a step's shapes differ from those a trace was made for."""


def _inputs_at(graph: Any, tgt_param: Any, shaped: list[Any]) -> dict[Any, Any]:
    """The graph's input placeholders (the target's aside) -> the sample's."""
    names = [n for n in graph.nodes if n.op == "placeholder"
             and n.target != getattr(tgt_param, "name", None)]
    return dict(zip(names, shaped))


_MISSING = object()


def _evaluate(model: Any, node: Any, inputs_at: dict[Any, Any],
              env: dict[Any, Any] | None = None) -> Any:
    """``node``'s value run on the sample (``inputs_at``), where it reads
    nothing but the inputs, the model's attributes and its modules without
    buffers (a BatchNorm's statistics would move), and no ``.item()``, no
    ``int()`` of a tensor's values, and runs; else _MISSING. Without
    gradients, the random numbers put back after; ``env``: the values run
    so far, kept between calls on one sample."""
    import operator

    import torch
    import torch.fx as fx
    env = {} if env is None else env
    order: list[Any] = []
    seen: set[Any] = set()

    def visit(n: Any) -> bool:
        if n in seen or n in env:
            return env.get(n, None) is not _MISSING
        seen.add(n)
        if n.op == "placeholder" and n not in inputs_at or n.op == "output" or (
                n.op == "call_method" and n.target in ("item", "tolist")) or (
                n.op == "call_function" and n.target in (int, float, bool)) or (
                n.op == "call_module" and any(
                    True for _ in model.get_submodule(n.target).buffers())):
            return False
        if not all(visit(a) for a in n.all_input_nodes):
            return False
        order.append(n)
        return True
    if not visit(node):
        return _MISSING
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for n in order:
            try:
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
                if n.op == "placeholder":
                    env[n] = inputs_at[n]
                elif n.op == "get_attr":
                    env[n] = operator.attrgetter(n.target)(model)
                elif n.op == "call_module":
                    env[n] = model.get_submodule(n.target)(*args, **kwargs)
                elif n.op == "call_method":
                    env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
                else:
                    env[n] = n.target(*args, **kwargs)
            except Exception:
                env[n] = _MISSING
                return _MISSING
    return env[node]


def _bake_sizes(model: Any, graph: Any, tgt_param: Any, shaped: list[Any]) -> int:
    """Put in the graph as constants the values made of sizes (ints,
    tuples of them) read across a call of a member of an ``nn.ModuleList``
    (Hugging Face's GPT-2: ``output_shape = (-1,) + input_shape[1:] +
    (hidden.size(-1),)``, read after the last layer) that the sample and
    its first row alone give alike, so the same for every micro-batch of
    inputs shaped as the sample: such a value, not a tensor, could not
    cross a cut between two layers (the model was not cut apart). Where
    made, it is checked against the constant as each step runs. Returns
    how many were put in."""
    import operator

    import torch
    from torch import nn
    nodes = list(graph.nodes)
    tensors = _tensor_valued(nodes)
    full = _inputs_at(graph, tgt_param, shaped)
    if not full or not all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in full.values()):
        return 0
    one = {n: x[:1] for n, x in full.items()}
    envs: tuple[dict[Any, Any], dict[Any, Any]] = ({}, {})
    pos = {n: i for i, n in enumerate(nodes)}
    steps = [pos[n] for n in nodes if n.op == "call_module" and isinstance(
        model.get_submodule(n.target.rpartition(".")[0]), nn.ModuleList)]

    def sizes(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) or (
            isinstance(v, tuple) and all(sizes(i) for i in v))
    baked = 0
    for n in nodes:
        if n in tensors or n.op not in ("call_function", "call_method") or not n.users or (
                n.target is torch._assert) or not any(
                pos[n] < s < max(pos[u] for u in n.users) for s in steps):
            continue
        value = _evaluate(model, n, full, envs[0])
        if value is _MISSING or not sizes(value) or _evaluate(model, n, one, envs[1]) != value:
            continue
        value = tuple(value) if isinstance(value, tuple) else value
        users = list(n.users)
        with graph.inserting_after(n):
            same = graph.call_function(operator.eq, (n, value))
        with graph.inserting_after(same):
            graph.call_function(torch._assert, (same, (
                f"engine.sequential took {value} for a size the forward computes (as the "
                f"sample's shapes gave it) and this step's inputs give another: give "
                f"engine.distribute a sample of their shapes{_AGAIN}")))
        for u in users:
            u.replace_input_with(n, value)
        baked += 1
    return baked
