"""A rank's pieces of the model and their state: the tp shards read from
the source model, the rest of its state (buffers, tied names), the state's
shapes, a model on the meta device made real (``_materialize``, ``_Temp``:
a layer made real only when timed), and a dp replica's own state (replica
0's given to the others when the job is built: ``_broadcast_replicas``).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable

import collectives
from mesh import AbortKind, Grid

from .torch_stage import TorchStage, _view
from .tp_layers import full_shapes
from .tp_plan import PlanError
from .given import _is_torch


def _replica_state(stage: Any) -> list[Any]:
    """What a dp replica takes from replica 0 when the job is built, as
    DDP's start does: a torch stage's parameters, frozen ones too, and its
    buffers (a BatchNorm's statistics, a random projection made in
    ``__init__``), as arrays sharing their memory; an engine.layers stage's
    ``params()``. Until the thirty-sixth session only the trainable
    parameters went: ranks seeded apart (for their data) kept frozen
    weights and buffers of their own, and trained another model than one
    process's, with nothing said."""
    module = getattr(stage, "module", None)
    if module is None or not hasattr(module, "buffers"):
        return list(stage.params())
    seen: set[int] = set()
    out = []
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(_view(t.detach()))
    return out


# what a shard tells as the whole tensor would (``x.to(self.wte.weight.dtype)``)
_LIKE_WHOLE = ("dtype", "device", "is_cuda", "requires_grad")


def _broadcast_replicas(grid: Grid, replicas: list[Any], timeout: float | None) -> None:
    """Replica 0's weights (``replicas``) to every dp replica, a broadcast
    each. A rank that fails (a KeyboardInterrupt between two broadcasts, or
    inside one: its peers learn of that one from it) abandons the broadcasts
    it has not started, so its dp peers raise in them at once naming it (they
    waited there until their timeout) and every replica numbers the group's
    calls alike; its own error is told in the word that follows."""
    dp = grid.group("dp")
    ch = dp.collective_channel()
    first = ch.seq
    try:
        for arr in replicas:
            collectives.broadcast(dp, arr, root=0, timeout=timeout)
    except BaseException as e:
        for _ in range(len(replicas) - (ch.seq - first)):
            collectives.abandon(dp, f"engine.distribute failed on rank {grid.comm.rank} (dp "
                                f"rank {dp.rank}): {type(e).__name__}: {e}"[:400],
                                AbortKind.of(e))
        raise


def _shards_read(grid: Grid, source: Any, pieces: list[Any]) -> None:
    """Refuse a traced forward that reads a parameter the plan sharded
    itself, not through its module (a head tied as ``F.linear(x,
    self.tok.weight)`` beside a ``vocab`` embedding): the piece would
    compute with this rank's shard as if it were the whole tensor (a part of
    the logits on each tp rank, taken for the whole: another loss on each,
    or an index error in the loss). Reading only its dtype or device is
    no such read. Every rank traced the same forward and raises alike,
    before any step."""
    for piece in pieces:
        for n in piece.graph.nodes:
            if n.op != "get_attr":
                continue
            path, _, attr = n.target.rpartition(".")
            try:
                owner = source.get_submodule(path)
            except AttributeError:
                continue
            meta = getattr(owner, "_tp", None)
            if meta is None or attr not in meta.dims or all(
                    u.op == "call_function" and u.target is getattr and len(u.args) > 1
                    and u.args[1] in _LIKE_WHOLE for u in n.users):
                continue
            shard = tuple(getattr(owner, attr).shape)
            raise PlanError(
                f"rank {grid.comm.rank}: engine.distribute: {type(source).__name__}.forward "
                f"reads {n.target} itself (not by calling {path}), but the plan shards {path} "
                f"({meta.style.style}): each tp rank would compute with its {shard} shard of "
                f"it as if it were the whole tensor, a wrong result; make the reader a module "
                f"the plan shards alike (an nn.Linear head tied to it, planned colwise), or "
                f"leave {path} unplanned")


def _aliases(model: Any) -> dict[str, str]:
    """A torch model's state keys whose tensor an earlier key holds too (a
    module or parameter held under two names), each with that first key:
    what ``Job.state_dict`` fills in where the stages name it once."""
    items = model if isinstance(model, (list, tuple)) else [model]
    prefix = isinstance(model, (list, tuple))
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for i, m in enumerate(items):
        if not _is_torch(m):
            continue
        for k, v in m.state_dict(keep_vars=True).items():
            key = f"{i}.{k}" if prefix else k
            if first.setdefault(id(v), key) != key:
                out[key] = first[id(v)]
    return out


def _rest(source: Any, pieces: Any, loss: Any, aliases: dict[str, str]
          ) -> OrderedDict[str, Any]:
    """A traced model's state entries that none of its pieces holds (a
    module its forward never calls, a pooler; a buffer only its loss reads,
    a criterion's class weights), each the tensor itself (the loss's own,
    where it holds it): no stage returns them, yet a single-process copy's
    ``load_state_dict`` needs every key, so ``Job.state_dict`` adds them as
    built (no gradient reaches them) and ``Job.load_state_dict`` loads them."""
    held = {k for piece in pieces for k in piece.state_dict()}    # (the model's own names)
    own = loss.state_dict(keep_vars=True) if _is_torch(loss) else {}
    return OrderedDict((k, own.get(k, v)) for k, v in source.state_dict(keep_vars=True).items()
                       if k not in held and k not in aliases)


def _real_rest(source: Any, loss: Any, rest: dict[str, Any]) -> OrderedDict[str, Any]:
    """``rest`` (``_rest``) of a model on the meta device made real on the
    CPU, in the model and its loss alike: zeros, then each module holding
    only such tensors reset (``reset_parameters()``); a warning names those
    left zeros until ``job.load_state_dict`` fills them (a criterion's class
    weights: the loss reads zeros until then), at distribute's caller."""
    import warnings

    import torch
    real: OrderedDict[str, Any] = OrderedDict()
    for k, v in rest.items():
        if v.is_meta:
            new = torch.zeros(v.shape, dtype=v.dtype)
            if isinstance(v, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=v.requires_grad)
            path, _, attr = k.rpartition(".")
            for holder in (source, loss) if _is_torch(loss) else (source,):
                try:
                    m = holder.get_submodule(path)
                except AttributeError:
                    continue
                for held in (m._parameters, m._buffers):
                    if held.get(attr) is v:
                        held[attr] = new
            v = new
        real[k] = v
    bare = []
    for name, m in source.named_modules():
        mine = [f"{name}.{n}".lstrip(".") for n, _ in
                [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]]
        mine = [k for k in mine if k in real]
        if not mine or not rest[mine[0]].is_meta:
            continue
        if callable(getattr(m, "reset_parameters", None)) and len(mine) == len(
                m._parameters) + len(m._buffers) - len(m._non_persistent_buffers_set):
            m.reset_parameters()
        else:
            bare += mine
    if bare:
        warnings.warn(f"engine.distribute: made from the meta device, "
                      f"{', '.join(bare[:4])}{' ...' if len(bare) > 4 else ''} (in no stage: "
                      f"the loss's, or never read by the forward) are zeros until "
                      f"job.load_state_dict() fills them", stacklevel=4)
    return real


def _state_shapes(named: list[tuple[str, Any]], is_torch: bool) -> dict[str, tuple[int, ...]]:
    """The whole model's state keys (``Job.state_dict``'s), every name of a
    module held under several, from its layers as ``_model_layers`` names
    them, each with its unsharded shape."""
    if is_torch:
        return {f"{n}.{k}": tuple(v.shape) for n, m in named for k, v in m.state_dict().items()}
    return {f"{n}.{j}": shape for n, layer in named for j, shape in enumerate(full_shapes(layer))}


def _on_meta(model: Any) -> bool:
    """Whether a torch model (or list of modules) has its parameters on the
    meta device."""
    mods = model if isinstance(model, (list, tuple)) else [model]
    return any(p.is_meta for m in mods if _is_torch(m) for p in m.parameters())


def _materialize(stage: Any, init: Callable[[Any], Any] | None
                 ) -> tuple[list[str], list[str]]:
    """A stage of meta modules made real on the CPU, zeros (``to_empty``
    leaves whatever the memory held), then filled: ``init(stage)``, or
    every submodule's ``reset_parameters()``; returns the names of those
    with tensors and no ``reset_parameters`` (left zeros), and of their
    buffers out of the state dict (``persistent=False``: a causal mask,
    position ids), which no ``load_state_dict`` fills."""
    import torch
    stage.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*stage.parameters(), *stage.buffers()]:
            t.zero_()
    if init is not None:
        init(stage)
        return [], []
    bare, unsaved = [], []
    for name, m in stage.named_modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
        elif [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            bare.append(name)
            unsaved += [f"{name}.{b}".lstrip(".") for b in sorted(m._non_persistent_buffers_set)
                        if m._buffers.get(b) is not None]
    return bare, unsaved



def _unfilled(made: dict[int, tuple[list[str], list[str]]]) -> str | None:
    """What engine.distribute warns of where it made this rank's stages
    (``made``: each stage's ``_materialize`` names) from the meta device:
    the modules left zeros, and the buffers no state dict fills; None where
    none was left zeros."""
    bare = [f"stage {s}: {name}" for s in made for name in made[s][0]]
    unsaved = [f"stage {s}: {name}" for s in made for name in made[s][1]]
    if not bare:
        return None
    return (f"engine.distribute: made from the meta device, "
            f"{', '.join(bare[:4])}{' ...' if len(bare) > 4 else ''} have no "
            f"reset_parameters(): their tensors are zeros until init= or "
            f"job.load_state_dict() fills them"
            + (f"; but {', '.join(unsaved[:4])}{' ...' if len(unsaved) > 4 else ''}"
               " (buffers with persistent=False) are in no state dict: only init= "
               "fills them" if unsaved else ""))

class _Temp:
    """A layer of a meta model, as a stage to time: a real copy of it
    (``_materialize``d, timing needs no trained weights) made when first
    used and dropped when another layer makes its own, so timing holds one
    layer's memory at a time."""

    def __init__(self, layer: Any, init: Callable[[Any], Any] | None,
                 current: list[Any]) -> None:
        self._layer, self._init, self._current = layer, init, current   # current: [the one]
        self._stage: Any = None

    def _real(self) -> Any:
        if self._stage is None:
            if self._current[0] is not None:
                self._current[0]._stage = None
            real = copy.deepcopy(self._layer)
            _materialize(real, self._init)
            self._stage = TorchStage(real)
            self._current[0] = self
        return self._stage

    def __getattr__(self, name: str) -> Any:     # forward, backward..., grads
        return getattr(self._real(), name)
