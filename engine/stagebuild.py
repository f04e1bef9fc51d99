"""The layers of a model as stage objects: what ``engine.partition`` cuts.

A layer is a torch module, an engine.layers layer (the stage protocol), a
plain function of its input (made a parameter-free torch module), or a
spec: a constructor of one (a class, a zero-argument callable, a
``functools.partial``, a ``(cls, args, kwargs)`` tuple), built only when
its stage is. A stage is an ``nn.Sequential`` of the model's own modules
or an ``engine.layers.Sequential``. A module that layers of two stages
share (ALBERT's one block called by every layer) is given to each later
stage as a copy of its own (``unshare``); a parameter that layers of two
stages share is then untied here into one copy per later stage
(``untie``), or named by the user when specs built the layers apart
(``declared_tie``).

torch is never imported here: a model that has torch modules imported it.
"""
from __future__ import annotations

import copy
import functools
import inspect
import itertools
import sys
from typing import Any, Callable, Sequence

from . import layers as L
from .tied import Tie
from .traced import sequential, traceable

__all__ = ["torch_module", "is_module", "inputs_of", "layers_of", "kind_of", "build", "param_count",
           "as_module", "make_stage", "layer_params", "stage_params", "unshare", "untie",
           "declared_tie", "layer_names", "layer_classes", "model_key",
           "named_stage_parameters"]


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


def unshare(present: list[list[Any]], counts: Sequence[int]) -> None:
    """Give each stage after the first its own copy of every torch module
    that an earlier stage's layers hold too (a layer, or a submodule of
    one: ALBERT's block under every layer), in place in ``present`` (and
    in the modules holding it); within a stage the sharing stays. A copy
    holds the same parameters and buffers at first, so ``untie`` finds
    the parameters shared and ties them (kept equal); without it, untying
    the later stage's parameters replaced them in the one module every
    stage held, and the first stage lost its own (StopIteration). An
    engine.layers layer held by two stages is refused, naming both places:
    its gradients live in the object, which cannot be split."""
    first = list(itertools.accumulate(counts, initial=0))
    seen: dict[int, int] = {}           # a module's id -> the first stage holding it
    where: dict[int, int] = {}          # an engine.layers layer's id -> its model index
    for s, ls in enumerate(present):
        copies: dict[int, Any] = {}     # this stage's copies, by the original's id
        for j, layer in enumerate(ls):
            if is_module(layer):
                ls[j] = _own(layer, s, seen, copies)
            elif callable(getattr(layer, "backward", None)):
                at = where.setdefault(id(layer), first[s] + j)
                if at < first[s]:
                    raise ValueError(
                        f"layers {at} and {first[s] + j} are the same "
                        f"{type(layer).__name__} object, cut into different stages: an "
                        "engine.layers layer cannot be shared by two stages; build one per "
                        "place and name their ties, one per parameter (tied=[('"
                        f"{at}.0', '{first[s] + j}.0'), ...]), or cut both into one stage")


def _own(m: Any, s: int, seen: dict[int, int], copies: dict[int, Any]) -> Any:
    """``m`` for stage ``s``: itself, its submodules made stage s's own, or
    (held by an earlier stage) a copy of it (``_copied``)."""
    if seen.setdefault(id(m), s) != s:
        return _copied(m, copies)
    for name, child in m._modules.items():
        if child is not None:
            mine = _own(child, s, seen, copies)
            if mine is not child:
                m._modules[name] = mine
    return m


def _copied(m: Any, copies: dict[int, Any]) -> Any:
    """A shallow copy of module ``m`` and its submodules (one per module,
    as often as it is met): its own tables (parameters, buffers, hooks,
    submodules), holding the same parameter and buffer objects, and a
    forward wrapped on the instance (selective recompute's) wrapped around
    the copy's own. A module compiled in place, whose compiled code runs
    the original, is refused, naming it."""
    if id(m) not in copies:
        if getattr(m, "_compiled_call_impl", None) is not None or hasattr(m, "_orig_mod"):
            raise ValueError(f"a torch.compile'd {type(m).__name__} is held by layers of "
                             "several stages, whose copies would all run the one compiled "
                             "module: compile it after the cut (each stage its own), or "
                             "build one per place")
        c = copy.copy(m)
        copies[id(m)] = c
        for k, v in vars(m).items():
            c.__dict__[k] = copy.copy(v) if isinstance(v, (dict, set)) else _rebound(v, m, c)
        c._modules = {name: None if child is None else _copied(child, copies)
                      for name, child in m._modules.items()}
    return copies[id(m)]


def _rebound(v: Any, old: Any, new: Any) -> Any:
    """``v`` with ``old`` made ``new`` where it is the object, a method's
    self or a ``functools.partial``'s argument (selective recompute's
    ``forward``: a partial of the module's own forward and of itself)."""
    if v is old:
        return new
    if inspect.ismethod(v) and v.__self__ is old:
        return v.__func__.__get__(new)
    if isinstance(v, functools.partial):
        return functools.partial(_rebound(v.func, old, new),
                                 *[_rebound(a, old, new) for a in v.args],
                                 **{k: _rebound(a, old, new) for k, a in v.keywords.items()})
    return v


def untie(built: list[list[Any] | None], counts: Sequence[int],
          present: list[list[Any] | None] | None = None) -> dict[Tie, list[tuple[int, Any]]]:
    """Find parameters shared between stages, give each later stage built
    here its own copy, and return each tie's (stage, its copy) for the
    stages built here. ``present``: the layers to look in, by stage (by
    default the built ones; a stage this rank does not build still shows
    its existing modules, so every rank finds the same ties).
    A copy is put in the model's own modules (a stage is made of them),
    on the ranks that build its stage only, and marked there as the copy
    of its parameter (``_UNTIED``): a later cut of the same model object
    (engine.distribute or partition called again) sees it as the parameter
    itself, so every rank finds the same ties again, and keeps it (a job
    still running trains it; one stage holding both is given the parameter
    back, tied as the model built it). Unmarked, rank 0 (the embedding's
    stage) found the tie, the head's rank its own copy and none: rank 0
    alone broadcast the tie's value, and both waited out their timeout."""
    first = list(itertools.accumulate(counts, initial=0))
    looked = built if present is None else present
    back = _untied_copies([layer for ls in looked for layer in ls or []])
    owners: dict[int, tuple[str, Any, list[int]]] = {}
    for s, ls in enumerate(looked):
        for j, layer in enumerate(ls or []):
            for name, p in layer_params(layer):
                p = back.get(id(p), p)          # (an earlier cut's copy: the parameter)
                entry = owners.setdefault(id(p), (f"{first[s] + j}.{name}", p, []))
                if s not in entry[2]:
                    entry[2].append(s)
    copied = {id(p) for p in back.values()}
    ties: dict[Tie, list[tuple[int, Any]]] = {}
    for name, p, stages in owners.values():
        if len(stages) > 1:
            ties[Tie(name, tuple(stages))] = [(s, _held(built[s] or [], p, back, s == stages[0]))
                                              for s in stages if built[s] is not None]
        elif id(p) in copied and built[stages[0]] is not None:   # one stage holds them all
            _held(built[stages[0]] or [], p, back, True)
    return ties


_UNTIED = "_engine_untied"
"""A module's (an engine.layers layer's) attribute: ``{name: (copy,
parameter)}`` for each copy of a tied parameter that ``untie`` put there."""


def _untied_copies(layers: list[Any]) -> dict[int, Any]:
    """The copies of tied parameters that an earlier ``untie`` put in these
    layers (their modules) and that they still hold, by id: each the
    parameter it copies."""
    back: dict[int, Any] = {}
    for layer in layers:
        for mod in layer.modules() if is_module(layer) else [layer]:
            marks = getattr(mod, "__dict__", {}).get(_UNTIED, {})
            for name, (c, p) in marks.items():
                if (mod._parameters if is_module(mod) else vars(mod)).get(name) is c:
                    back[id(c)] = p
    return back


def _held(layers: list[Any], p: Any, back: dict[int, Any], first: bool) -> Any:
    """What stage ``layers`` hold of tied parameter ``p`` (itself or an
    earlier cut's copies of it), made one object: ``p`` in the tie's first
    stage (or where it is held itself), else a copy (an earlier cut's kept:
    a job of that cut trains it; a new one where the stage holds ``p``)."""
    objs = list({id(q): q for layer in layers for _, q in layer_params(layer)
                 if back.get(id(q), q) is p}.values())
    if not objs:
        return p
    if first or any(q is p for q in objs):
        keep = p
    else:
        keep = objs[0]
    for q in objs:
        if q is not keep:
            _copy_into(layers, q, keep, of=p)
    return keep if keep is not p or first else _copy_into(layers, p, of=p)


def declared_tie(built: list[list[Any] | None], counts: Sequence[int], names: list[str],
              found: dict[Tie, list[tuple[int, Any]]]) -> dict[Tie, list[tuple[int, Any]]]:
    """The tie named by ``names`` ("layer.parameter": "0.weight" in torch,
    "0.0" for the first of an engine.layers layer's params()): each built
    stage's copies become one object; nothing new when they already are
    one (found by ``_untie``)."""
    first = list(itertools.accumulate(counts, initial=0))
    where: list[tuple[int, int, str]] = []
    for name in names:
        layer, _, pname = name.partition(".")
        if not layer.isdigit() or not pname or int(layer) >= first[-1]:
            raise ValueError(f"tied name {name!r}: use 'layer.parameter' with a layer index "
                             f"below {first[-1]}")
        i = int(layer)
        s = next(k for k in range(len(counts)) if first[k] <= i < first[k + 1])
        where.append((s, i - first[s], pname))
    known = {id(p) for members in found.values() for _, p in members}
    stages = tuple(sorted({s for s, _, _ in where}))
    members: list[tuple[int, Any]] = []
    for s in stages:
        ls = built[s]
        if ls is None:
            continue
        params = []
        for ss, j, pname in where:
            if ss == s:
                named = dict(layer_params(ls[j]))
                if pname not in named:
                    raise ValueError(f"tied name {first[s] + j}.{pname}: layer {first[s] + j} "
                                     f"has no parameter {pname!r} (it has {sorted(named)})")
                params.append(named[pname])
        if all(id(p) in known for p in params):
            return {}
        for p in params[1:]:
            _copy_into(ls, p, params[0])
        members.append((s, params[0]))
    return {Tie(names[0], stages): members} if len(stages) > 1 else {}


def _copy_into(layers: list[Any], p: Any, copy: Any = None, of: Any = None) -> Any:
    """Replace ``p`` by ``copy`` (default: a new copy of p) wherever
    ``layers`` hold it; return what replaced it. ``of``: the tied
    parameter that ``copy`` stands for (``untie``'s), marked on each module
    where it now sits (``_UNTIED``; the mark taken off where ``copy`` is
    that parameter)."""
    torch = torch_module()
    if torch is not None and isinstance(p, torch.nn.Parameter):
        if copy is None:
            copy = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for layer in layers:
            for mod in layer.modules() if is_module(layer) else ():
                for name, q in list(mod._parameters.items()):
                    if q is p:
                        setattr(mod, name, copy)
                        _mark(mod, name, copy, of)
        return copy
    copy = p.copy() if copy is None else copy
    for layer in layers:
        for name, q in list(vars(layer).items()):
            if q is p:
                setattr(layer, name, copy)
                _mark(layer, name, copy, of)
    return copy


def _mark(holder: Any, name: str, copy: Any, of: Any) -> None:
    """Note on ``holder`` that its ``name`` is a copy of tied parameter
    ``of`` (``untie``), or, where it is that parameter, no more."""
    if of is None:
        return
    marks = holder.__dict__.setdefault(_UNTIED, {})
    if copy is of:
        marks.pop(name, None)
    else:
        marks[name] = (copy, of)
