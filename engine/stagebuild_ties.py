"""What layers of two stages share, made each stage's own or tied.

``engine.partition`` cuts a model whose layers may share objects across
the cut. A module that layers of two stages share (ALBERT's one block
called by every layer) is given to each later stage as a copy of its own
(``unshare``); a parameter that layers of two stages share (an embedding
and an output head) is then untied into one copy per later stage
(``untie``), or named by the user when specs built the layers apart
(``declared_tie``). Each returns the ties the Pipeline keeps equal
(engine.tied). Apart from engine.stagebuild, which makes the layers and
stages these work on.

torch is never imported here: a model that has torch modules imported it.
"""
from __future__ import annotations

import copy
import functools
import inspect
import itertools
from typing import Any, Sequence

from .stagebuild import is_module, layer_params, torch_module
from .tied import Tie

__all__ = ["unshare", "untie", "declared_tie"]


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
    one (found by ``untie``)."""
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
