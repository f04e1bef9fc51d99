"""The layers of a model as stage objects: what ``engine.partition`` cuts.

A layer is a torch module, an engine.layers layer (the stage protocol), a
plain function of its input (made a parameter-free torch module), or a
spec: a constructor of one (a class, a zero-argument callable, a
``functools.partial``, a ``(cls, args, kwargs)`` tuple), built only when
its stage is. A stage is an ``nn.Sequential`` of the model's own modules
or an ``engine.layers.Sequential``. What layers of two stages share
(a module, a parameter) is made each stage's own or tied in
engine.stagebuild_ties (``unshare``, ``untie``, ``declared_tie``).

torch is never imported here: a model that has torch modules imported it.
"""
from __future__ import annotations

import functools
import inspect
import sys
from typing import Any, Callable, Sequence

from . import layers as L
from .traced import sequential, traceable

__all__ = ["torch_module", "is_module", "inputs_of", "layers_of", "kind_of", "build", "param_count",
           "as_module", "make_stage", "layer_params", "stage_params", "layer_names",
           "layer_classes", "model_key", "named_stage_parameters"]


def torch_module() -> Any:
    return sys.modules.get("torch")


def is_module(x: Any) -> bool:
    torch = torch_module()
    return torch is not None and isinstance(x, torch.nn.Module)


def inputs_of(sample: Any) -> int:
    """How many inputs a model's forward takes, as its sample tells: a
    tuple's length (``(input_ids, attention_mask)``), else one."""
    return len(sample) if isinstance(sample, tuple) else 1


def layers_of(model: Any, inputs: int = 1) -> list[Any]:
    if is_module(model):
        if traceable(model):                # a plain module: its traced forward's pieces
            return list(sequential(model, inputs=inputs))
        return list(model)
    if isinstance(model, L.Sequential):
        return list(model.layers)
    if isinstance(model, (list, tuple)):
        return list(model)
    raise TypeError(f"cannot cut a {type(model).__name__}: pass an nn.Sequential, an "
                    "engine.layers.Sequential or a list of layers or specs")


def layer_names(model: Any, n: int) -> list[str]:
    """Each of the ``n`` layers ``layers_of(model)`` gives its name in the
    model: a torch container's child's key (``"0"``, ``"head"``), a list's
    or an engine.layers.Sequential's index, ``""`` for a traced forward's
    pieces (their parameters' keys are the model's own already:
    ``model_key``)."""
    if is_module(model):
        if traceable(model) or getattr(model, "traced_from", None):
            return [""] * n
        return list(model._modules)
    return [str(i) for i in range(n)]


def layer_classes(x: Any, kind: str) -> list[str]:
    """The class names ``balance="type:REGEX"`` matches a layer by: its
    class (a spec's, the class it builds), or a function's name; for a
    traced forward's piece, the classes of the modules it calls whole (a
    block's ``Block``), not the piece's own (``GPT[blocks.0]``)."""
    torch = torch_module()
    if torch is not None and isinstance(x, torch.fx.GraphModule):
        return [type(x.get_submodule(str(n.target))).__name__ for n in x.graph.nodes
                if n.op == "call_module"]
    if kind == "spec":      # a class, a (cls, args, kwargs) tuple, a functools.partial
        x = x[0] if isinstance(x, tuple) else getattr(x, "func", x)
    if kind in ("spec", "fn"):
        return [getattr(x, "__name__", type(x).__name__)]
    return [type(x).__name__]


def model_key(names: Sequence[str], key: str) -> str:
    """A stage module's parameter or state key ("j.rest": its layer j) as the
    model's own: that layer's name in the model before it (``names``, the
    stage's layers' ``layer_names``; "" for a traced piece, whose keys are
    the model's already). Each stage is an ``nn.Sequential`` numbered from 0,
    so stage 1's ``0.0.weight`` is the model's ``2.0.weight``."""
    j, _, rest = key.partition(".")
    return f"{names[int(j)]}.{rest}" if names[int(j)] else rest


def named_stage_parameters(stage: Any, names: Sequence[str]) -> list[tuple[str, Any]]:
    """A stage's parameters (an ``nn.Sequential``'s ``named_parameters()``,
    an engine.layers.Sequential's layers' ``params()``), in its order, each
    with its name in the whole model (``names``: the stage's layers'):
    ``model_key`` of a torch key, ``"layer.index"`` for engine.layers."""
    if is_module(stage):
        return [(model_key(names, k), p) for k, p in stage.named_parameters()]
    return [(f"{name}.{j}", p) for name, layer in zip(names, stage.layers)
            for j, p in enumerate(layer.params())]


def kind_of(i: int, x: Any) -> str:
    """'module' (torch), 'layer' (engine.layers protocol), 'fn' (a function
    of its input) or 'spec' (a constructor of one of those)."""
    if is_module(x):
        return "module"
    if isinstance(x, type):     # a class (engine.layers.Tanh, nn.Tanh): built like any spec
        return "spec"
    if callable(getattr(x, "forward", None)) and callable(getattr(x, "backward", None)):
        return "layer"
    if isinstance(x, tuple) and len(x) == 3 and callable(x[0]):
        return "spec"
    if callable(x):
        try:
            params = inspect.signature(x).parameters.values()
        except (TypeError, ValueError):
            return "fn"
        required = [q for q in params if q.default is q.empty
                    and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)]
        return "fn" if required else "spec"
    raise TypeError(f"layer {i}: a {type(x).__name__} is neither a layer, a function of its "
                    "input nor a constructor of a layer")


def build(x: Any, kind: str) -> Any:
    if kind != "spec":
        return x
    if isinstance(x, tuple):
        cls, args, kwargs = x
        return cls(*args, **kwargs)
    return x()


def param_count(x: Any, kind: str) -> int:
    torch = torch_module()
    if kind == "spec" and torch is not None:
        with torch.device("meta"):
            x = build(x, kind)
    else:
        x = build(x, kind)
    if is_module(x):
        return sum(p.numel() for p in x.parameters() if p.requires_grad)
    params = getattr(x, "params", None)
    return sum(int(p.size) for p in params()) if callable(params) else 0


@functools.lru_cache(maxsize=1)
def _fn_class() -> Any:
    torch = torch_module()
    if torch is None:
        raise TypeError("a plain function is a layer only in a torch model: import torch")

    class Fn(torch.nn.Module):  # type: ignore[name-defined]
        """A function of the input as a parameter-free module."""

        def __init__(self, fn: Callable[..., Any]) -> None:
            super().__init__()
            self.fn = fn

        def forward(self, x: Any) -> Any:
            return self.fn(x)

    return Fn


def as_module(x: Any) -> Any:
    return x if is_module(x) else _fn_class()(x)


def make_stage(layers: list[Any], s: int) -> Any:
    if all(not is_module(x) and callable(getattr(x, "backward", None)) for x in layers):
        return L.Sequential(*layers)
    if any(callable(getattr(x, "backward", None)) and not is_module(x) for x in layers):
        raise TypeError(f"stage {s} mixes engine.layers layers with torch modules")
    return torch_module().nn.Sequential(*[as_module(x) for x in layers])


def layer_params(layer: Any) -> list[tuple[str, Any]]:
    if is_module(layer):
        return [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    params = getattr(layer, "params", None)
    return [(str(k), p) for k, p in enumerate(params())] if callable(params) else []


def stage_params(stage: Any) -> list[Any]:
    """What the stage's (or its TorchStage's) params() lists, as objects."""
    if is_module(stage):
        return [p for p in stage.parameters() if p.requires_grad]
    return list(stage.params())
