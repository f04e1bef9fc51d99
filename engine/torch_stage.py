"""Turn a torch ``nn.Module`` into a pipeline stage; torch autograd does the
backward. torch is imported only when a TorchStage is built, so meshrun
never depends on it.

Activations and their gradients cross the stage boundary as torch tensors
(point-to-point sends them as views of their memory, and the receiving
stage gets tensors); numpy arrays are taken too (the first stage's inputs).
A boundary may carry several tensors as a tuple (a block's input and the
attention mask every block reads, a U-Net's skips): a module returning a
tuple hands it to the next stage, whose module gets it as its one
argument; each part gets its own gradient back, None for one that has
none (an integer mask, or a float one computed from the input alone:
``Parts.fixed``, which the next stage takes as a constant).
Inputs go to the module's device (CPU or CUDA). A floating input is cast to
the module's dtype inside the graph, so a float32 module takes float64
activations and hands back gradients in the input's dtype. ``grads()``
returns views of the parameters' current ``.grad`` tensors (numpy for CPU,
CuPy for CUDA, the tensor itself for bfloat16, which neither has; a
bfloat16 stage's activations cross as tensors, its gradients are averaged
and summed in float32 and rounded once; zeros put in place of the None that torch's default
``optimizer.zero_grad()`` leaves), so the executor's in-place all-reduce
updates torch's gradients; call it again after ``zero_grad()``, as the
executor does every step: an older list may view tensors torch replaced.

    stage = TorchStage(nn.Sequential(nn.Linear(8, 8), nn.Tanh()))
    pipe = engine.Pipeline(grid, stage, schedule, loss_fn=loss_fn)

A torch loss as the Pipeline's ``loss_fn`` (``torch_loss``, ``first_loss``,
``as_pipeline_loss``, ``plain_torch_loss``) is engine.torch_loss's,
re-exported here.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Iterable

from mesh.tensors import is_tensor

from .torch_loss import (_detached, _target, _tensor, _torch, as_pipeline_loss, first_loss,
                         plain_torch_loss, torch_loss)
from .tp_plan import named_by

__all__ = ["TorchStage", "Parts", "torch_loss", "as_pipeline_loss", "first_loss",
           "plain_torch_loss",
           "checkpoint_modules", "copied", "widened", "torch_targets"]


def torch_targets(target: Any, device: Any) -> Any:
    """A loss's target (numpy arrays or tensors; a tuple of them, part by
    part) as tensors on ``device``: what a torch loss is given."""
    return _target(_torch(), target, device)


def patterns_of(recompute: Any) -> tuple[str, ...]:
    """The submodule name patterns in a ``recompute=`` value (a str, or a
    collection of str: selective recompute), else ()."""
    if isinstance(recompute, str):
        return (recompute,)
    if isinstance(recompute, (list, tuple, set, frozenset)) and recompute and all(
            isinstance(v, str) for v in recompute):
        return tuple(sorted(recompute)) if isinstance(recompute, (set, frozenset)) \
            else tuple(recompute)
    return ()


class _stats_kept:
    """A forward run again (a recompute) leaves the running statistics of
    ``module``'s norms (BatchNorm's running mean and variance, its count of
    batches) as the first forward left them: one micro-batch is counted
    once, as when the stage keeps its activations. The norms update
    copies, which the recompute's graph may keep (BatchNorm saves them for
    its backward: no in-place change to them after), and get their own
    buffers back. Entered again each time (a graph whose backward runs
    twice recomputes twice)."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.kept: list[tuple[Any, dict]] = []

    def __enter__(self) -> None:
        self.kept = [(m, m._buffers.copy()) for m in self.module.modules()
                     if m.training and getattr(m, "track_running_stats", False)]
        for m, bufs in self.kept:
            for k, b in bufs.items():
                if b is not None:
                    m._buffers[k] = b.clone()

    def __exit__(self, *exc: Any) -> None:
        for m, bufs in self.kept:
            m._buffers.update(bufs)
        self.kept = []


def checkpoint_modules(module: Any, patterns: str | Iterable[str],
                       where: str = "", missing: bool = False) -> list[str]:
    """Selective recompute (activation checkpointing inside a stage, as
    Megatron's ``--recompute-granularity selective`` or torch's
    ``apply_activation_checkpointing``): each submodule of ``module`` whose
    name matches one of ``patterns`` (fnmatch, ``*`` crossing dots, as a
    tensor-parallel plan's) runs its forward under
    ``torch.utils.checkpoint`` (non-reentrant, the random generators'
    state kept: dropout draws the same masks): it saves only its inputs
    for the backward and runs again there. Names and parameters stay as
    they were (its ``forward`` is wrapped on the instance, nothing is
    replaced), so state dicts and plans still apply. A module inside
    another that matches is left alone (``"blocks.*"``: each block, not
    also its submodules, which would run a third time). Returns the names
    wrapped; a pattern that matches nothing raises ValueError naming it
    and ``where`` (the stage), unless ``missing`` (a pipeline's stage
    need not hold every pattern's modules: engine.Pipeline checks the
    stages together)."""
    torch = _torch()
    from torch.utils.checkpoint import checkpoint
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    names = [n for n, _ in module.named_modules() if n]
    hit: set[str] = set()
    for pat in pats:
        hits = named_by(names, pat)
        if not hits and not missing:
            near = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"recompute={pat!r} matches no submodule of "
                             f"{where or type(module).__name__} (its submodules: {near})")
        for n in hits:
            sub = module.get_submodule(n)
            if isinstance(sub, (torch.nn.ModuleList, torch.nn.ModuleDict)):
                raise ValueError(f"recompute={pat!r} matches {n!r}, a "
                                 f"{type(sub).__name__}, which has no forward of its own")
        hit.update(hits)
    # the outermost only ("blocks.*" matches each block's submodules too): a
    # module inside one that recomputes would run a third time, for nothing
    wrapped = {n for n in names if getattr(module.get_submodule(n), "_meshrun_checkpointed",
                                           False)}
    done = sorted(n for n in hit if not any(n.startswith(o + ".") for o in hit | wrapped))
    for n in done:
        sub = module.get_submodule(n)
        if not getattr(sub, "_meshrun_checkpointed", False):
            sub.forward = functools.partial(
                checkpoint, sub.forward, use_reentrant=False,
                context_fn=functools.partial(_contexts, sub))
            sub._meshrun_checkpointed = True
    return done


def _contexts(module: Any) -> tuple[Any, Any]:
    """torch.utils.checkpoint's ``context_fn``: nothing around the forward,
    the norms' running statistics kept around its recompute."""
    return contextlib.nullcontext(), _stats_kept(module)


def _runs_compiled(module: Any) -> bool:
    """Whether ``module`` holds torch.compile'd code: a compiled submodule
    (``torch.compile(block)``) or one compiled in place (``block.compile()``)."""
    return any(hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None
               for m in module.modules())



class TorchStage:
    """A stage running ``module`` (on CPU or one GPU) on torch tensors.
    ``recompute=True``: the whole forward runs again in the backward (only
    the input kept); a str or a list of str: the submodules whose names
    match do (``checkpoint_modules``), the rest keeps its activations.
    ``layered`` (with ``recompute=True``, ``module`` an ``nn.Sequential``,
    as engine.distribute's stages are): layer by layer instead, each layer
    keeping its input and running again on its own just before its
    backward (the random draws kept per layer), so the backward holds one
    layer's activations at a time, not the stage's; ``layered=N`` (an int:
    ``True`` is 1) in runs of N consecutive layers instead, from the first
    (the last run shorter: Megatron's ``--recompute-method uniform
    --recompute-num-layers N``, DeepSpeed's ``activation_checkpoint_interval``),
    each run keeping its input and running again whole before its backward; without
    ``torch.utils.checkpoint``'s hooks, which cost more than the recompute
    itself on small layers (BENCHMARKS.md, twenty-third session). The
    gradients are those of keeping, to rounding where one parameter serves
    two layers of the stage."""

    def __init__(self, module: Any, recompute: bool | str | Iterable[str] = False,
                 layered: bool | int = False) -> None:
        torch = _torch()
        self.module = module
        pats = patterns_of(recompute)
        self.checkpointed: list[str] = []     # selective: the submodules that recompute
        if pats:        # (the stage keeps the rest)
            self.checkpointed = checkpoint_modules(module, pats)
            recompute = False
        self.recompute = bool(recompute)
        if not isinstance(layered, int) or layered < 0:
            raise ValueError(f"TorchStage(layered={layered!r}): True (layer by layer), an int "
                             f"N >= 1 (runs of N layers) or False/0 (the stage whole)")
        if layered and not (self.recompute and isinstance(module, torch.nn.Sequential)):
            how = "one by one" if layered == 1 else f"in runs of {layered}"
            raise TypeError(f"TorchStage(layered={layered!r}) recomputes an nn.Sequential's "
                            f"layers {how}: it needs recompute=True and an nn.Sequential, not "
                            f"recompute={recompute!r} and a {type(module).__name__}")
        # layered: how many layers a run holds (1: layer by layer; 0: not layered), and the
        # runs, each a module the recompute runs again whole (a layer, or an nn.Sequential
        # over the run's layers, sharing them)
        self.layered = int(layered)
        self._runs: list[Any] = _runs_of(module, self.layered) if layered else []
        self._fixed: tuple[int, ...] | None = None   # a tuple output's parts needing no grad
        self._learned = False       # whether a forward with a graph has set _fixed
        # layered: each layer's input parts needing no gradient (a mask, ids), and the
        # layers whose input is changed in place (by the layer, or a later one it hands
        # it to), which keep a copy of it; both learned by the first forward
        self._layer_fixed: dict[int, tuple[int, ...]] = {}
        self._changed: set[int] = set()
        self._params = [p for p in module.parameters() if p.requires_grad]
        self.compiled = _runs_compiled(module)
        # Floating inputs are cast to the dtype of the module's first floating
        # parameter or buffer (a module without any takes them as they come).
        floats = [t.dtype for t in (*module.parameters(), *module.buffers())
                  if t.is_floating_point()]
        self.dtype = floats[0] if floats else None
        self._copies_input = _changes_input(module)
        where = [t.device for t in (*module.parameters(), *module.buffers())]
        self.device = where[0] if where else None
        for p in self._params:
            self._grad(p)

    @staticmethod
    def _grad(p: Any) -> Any:
        """``p.grad``, made zeros when None (torch's default zero_grad())."""
        if p.grad is None:
            p.grad = _torch().zeros_like(p)
        return p.grad

    def _input(self, x: Any) -> tuple[Any, Any]:
        """The leaf tensor whose .grad is the input gradient, and what the
        module gets: the leaf cast to the module's dtype (inside the graph).
        A tuple (a boundary carrying several tensors): tuples of both."""
        if isinstance(x, tuple):
            fixed = getattr(x, "fixed", ())
            pairs = [self._part(v, i in fixed) for i, v in enumerate(x)]
            return tuple(t for t, _ in pairs), tuple(f for _, f in pairs)
        return self._part(x)

    def _part(self, x: Any, fixed: bool = False) -> tuple[Any, Any]:
        torch = _torch()
        if x is None:           # a tuple's part that is None ((h, None)): handed on as it is
            return None, None
        t = _tensor(torch, x, self.device)
        if not t.is_floating_point():
            return t, t
        if not fixed:           # (a part no gradient goes back to: no leaf to fill)
            t = _detached(t).clone().requires_grad_(True)
        fed = t if self.dtype is None else t.to(self.dtype)
        if self._copies_input and fed is t and t.requires_grad:
            fed = t.clone()     # (an in-place change to a leaf is refused; to a copy, taken)
        return t, fed

    def forward(self, x: Any) -> tuple[Any, Any]:
        if self.layered:
            return self._forward_layers(x)
        if self.recompute:
            return self._forward_kept(x)
        t, fed = self._input(x)
        out = self.module(fed)
        self._learn(out)
        return self._handed(out), (t, out)

    def forward_only(self, x: Any) -> Any:
        """The output alone, computed without autograd's graph (an
        evaluation: nothing is kept for a backward, and a recomputing or
        layered stage runs whole, once). What it learned of a tuple
        output's parts needing no gradient stays as its training forwards
        learned it."""
        torch = _torch()
        with torch.no_grad():
            _, fed = self._input(x)
            return self._handed(self.module(fed))

    def _learn(self, out: Any) -> None:
        """Note which parts of a tuple ``out``, computed with autograd
        recording, need no gradient (what a recomputing forward, without a
        graph, cannot tell)."""
        _flat(out)
        if isinstance(out, tuple):
            self._fixed = tuple(i for i, o in enumerate(out) if not _needs_grad(o))
        self._learned = True

    def _handed(self, out: Any) -> Any:
        """What the next stage gets: ``out`` detached (a tuple as Parts, its
        parts that need no gradient as last learned, else the non-floating
        ones)."""
        if not isinstance(_flat(out), tuple):
            return _detached(out)
        fixed = self._fixed if self._fixed is not None else [
            i for i, o in enumerate(out) if o is None or not o.is_floating_point()]
        return Parts((None if o is None else _detached(o) for o in out), fixed)

    def _forward_kept(self, x: Any) -> tuple[Any, Any]:
        """Recompute: the forward without a graph, keeping only its input
        and the random number generators' state; the backward runs it again
        (``_replay``) with the same random draws (dropout's masks)."""
        torch = _torch()
        state = self._state()
        kept = _uncopied(x)
        learn = not self._learned     # (its first: with a graph, then dropped, _learn_first)
        with torch.set_grad_enabled(learn and torch.is_grad_enabled()):
            _, fed = self._input(x)
            out = self.module(fed)
        self._learn_first(out, learn)
        return self._handed(out), _Kept(kept, state)

    def _learn_first(self, out: Any, learn: bool) -> None:
        """A recomputing stage's first forward runs with a graph, dropped
        after, to learn which parts of a tuple output need no gradient
        (``_learn``; a forward without a graph cannot tell): its first step
        handed them on as needing one, so the next stage made each a leaf
        (an in-place change to it there raised on that step only) and sent
        its gradient back, a message as large as the part, for nothing."""
        if learn and _torch().is_grad_enabled():
            self._learn(out)

    def _state(self) -> tuple[Any, Any]:
        """The random number generators' state: the CPU's, and the stage's GPU's."""
        torch = _torch()
        cuda = self.device is not None and self.device.type == "cuda"
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None

    def _set_state(self, state: tuple[Any, Any]) -> None:
        torch = _torch()
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    def _forward_layers(self, x: Any) -> tuple[Any, Any]:
        """Layered recompute: the layers run without a graph, each one's
        input and the generators' state before it kept (the first's input
        as the message came: ``_input`` makes its leaf again)."""
        torch = _torch()
        ins: list[Any] = [_uncopied(x)]
        states: list[tuple[Any, Any]] = []
        seen: list[tuple[int, ...]] = [()]
        learn = not self._learned     # (its first: with a graph, then dropped, _learn_first)
        with torch.set_grad_enabled(learn and torch.is_grad_enabled()):
            graph = torch.is_grad_enabled()
            _, h = self._input(x)
            for j, layer in enumerate(self._runs):
                if j:
                    kept, versions = self._keep(j, h, learn, graph)
                    ins.append(kept)
                    seen.append(versions)
                states.append(self._state())
                h = layer(h)
        if learn:       # the inputs changed in place since kept: copied from now on
            self._changed |= {j for j in range(1, len(ins)) if isinstance(ins[j], _Given)
                              and _versions(ins[j].given) != ins[j].versions}
            ins = [v.kept if isinstance(v, _Given) else v for v in ins]
            seen = [()] * len(ins)       # (copies: nothing else changes them)
        self._learn_first(h, learn)
        return self._handed(h), _Layers(ins, states, seen)

    def _keep(self, j: int, h: Any, learn: bool, graph: bool
              ) -> tuple[Any, tuple[int, ...]]:
        """Layer ``j``'s input as a layered recompute keeps it, and the
        version counters of the parts kept as they are (checked before the
        recompute). A layer may change its input in place (a mask, ids, an
        ``nn.ReLU(inplace=True)``'s), or a later layer a part handed on to
        it: such an input kept as it came was the changed one when the layer
        ran again, a wrong gradient with nothing said (or, made a leaf, the
        in-place change raised). Its parts needing no gradient stay so
        (learned by the first forward, with a graph; a float mask made a
        leaf raised at its in-place change), and the layers whose input the
        first forward saw changed keep a copy (the first forward copies
        every layer's, and reads the counters after)."""
        parts = h if isinstance(h, tuple) else (h,)
        if learn and graph:     # (what needs a gradient, told by the graph)
            self._layer_fixed[j] = tuple(i for i, v in enumerate(parts) if not _needs_grad(v))
        fixed = self._layer_fixed.get(j, ())
        if learn or j in self._changed:
            copies = tuple(v if v is None else v.detach().clone() for v in parts)
            kept = Parts(copies, fixed) if isinstance(h, tuple) else copies[0]
            return (_Given(kept, parts, _versions(parts)) if learn else kept), ()
        kept = Parts(parts, fixed) if isinstance(h, tuple) else h
        return kept, _versions(parts)

    def _backward_layers(self, ctx: "_Layers", gy: Any, split: bool) -> tuple[Any, Any]:
        """Each layer again, last first, from its input kept and its random
        draws, then its backward: the input gradient, and (``split``: the
        weights' gradients left for backward_weight) every layer's outputs
        and output gradients."""
        layers = self._runs
        outs_all: list[Any] = []
        gys_all: list[Any] = []
        g = gy
        before = self._state()      # put back after (fork_rng's cost, once a backward)
        try:
            for j in reversed(range(len(layers))):
                g = self._layer_back(layers[j], j, ctx, g, split, outs_all, gys_all)
        finally:
            self._set_state(before)
        return g, (outs_all, gys_all)

    def _layer_back(self, layer: Any, j: int, ctx: "_Layers", g: Any, split: bool,
                    outs_all: list[Any], gys_all: list[Any]) -> Any:
        """Layer ``j`` of a layered recompute again, then its backward from
        the gradient ``g`` of its output; its input's gradient."""
        torch = _torch()
        self._set_state(ctx.states[j])
        if j and ctx.seen[j] and _versions(ctx.ins[j]) != ctx.seen[j]:
            n = self.layered
            which = (f"layer {j} ({type(layer).__name__}) of a stage recomputing layer by layer"
                     if n == 1 else f"layers {j * n}..{min(j * n + n, len(self.module)) - 1} "
                     f"of a stage recomputing in runs of {n}")
            raise RuntimeError(
                f"{which}: its input, kept for its recompute, was changed in place after the first "
                f"step (which saw no such change, so it kept no copy of it): the recompute "
                f"would run on the changed values, a wrong gradient; change a copy of it, "
                f"or recompute the stage whole (layered=False)")
        t, fed = self._input(ctx.ins[0]) if j == 0 else _leaves(ctx.ins[j],
                                                                j in self._changed)
        with _stats_kept(layer):
            out = layer(fed)
        if j == len(self._runs) - 1:
            self._learn(out)
        outs, gys = _flowing(out, g)
        if not split:
            if outs:
                torch.autograd.backward(outs, gys)
            return _grads_of(t, lambda leaf: leaf.grad)
        leaves = [v for v in (t if isinstance(t, tuple) else (t,)) if _needs_grad(v)]
        got: dict[int, Any] = {}
        if leaves and outs:
            grads = torch.autograd.grad(outs, leaves, gys, retain_graph=True, allow_unused=True)
            got = {id(v): gv for v, gv in zip(leaves, grads)}
        outs_all += outs
        gys_all += gys
        return _grads_of(t, lambda leaf: got.get(id(leaf)))

    def _replay(self, ctx: Any) -> tuple[Any, Any]:
        """A context of ``forward``: kept as it is, or run again (recompute)."""
        if not isinstance(ctx, _Kept):
            return ctx
        before = self._state()          # put back after: later draws as if kept
        try:
            self._set_state(ctx.state)
            t, fed = self._input(ctx.x)
            with _stats_kept(self.module):
                out = self.module(fed)
        finally:
            self._set_state(before)
        self._learn(out)
        return t, out

    def backward(self, ctx: Any, gy: Any) -> Any:
        if isinstance(ctx, _Layers):
            return self._backward_layers(ctx, gy, split=False)[0]
        t, out = self._replay(ctx)
        outs, gys = _flowing(out, gy)
        if outs:
            _torch().autograd.backward(outs, gys)
        return _grads_of(t, lambda leaf: leaf.grad)

    def backward_input(self, ctx: Any, gy: Any) -> tuple[Any, Any]:
        """Gradient of the input only; the graph is kept for backward_weight.
        A stage running torch.compile'd code takes its whole backward here
        (the weights' gradients too; backward_weight then has nothing to
        do): a compiled backward is one graph, and a second pass through it
        (``retain_graph=True``) read buffers the first had reused (wrong
        weight gradients) or refused its donated buffers."""
        torch = _torch()
        if self.compiled:
            return self.backward(ctx, gy), ((), ())
        if isinstance(ctx, _Layers):
            return self._backward_layers(ctx, gy, split=True)
        t, out = self._replay(ctx)
        outs, gys = _flowing(out, gy)
        leaves = [v for v in (t if isinstance(t, tuple) else (t,)) if _needs_grad(v)]
        if not leaves or not outs:
            return _grads_of(t, lambda leaf: None), (outs, gys)
        grads = torch.autograd.grad(outs, leaves, gys, retain_graph=True, allow_unused=True)
        got = {id(v): g for v, g in zip(leaves, grads)}
        return _grads_of(t, lambda leaf: got.get(id(leaf))), (outs, gys)

    def backward_weight(self, wctx: Any) -> None:
        torch = _torch()
        outs, gys = wctx
        if not self._params or not outs:
            return
        grads = torch.autograd.grad(outs, self._params, gys, allow_unused=True)
        with torch.no_grad():
            for p, gp in zip(self._params, grads):
                if gp is not None:
                    self._grad(p).add_(gp)

    def params(self) -> list[Any]:
        return [_view(p.detach()) for p in self._params]

    def grads(self) -> list[Any]:
        return [_view(self._grad(p)) for p in self._params]

    def grad_params(self) -> list[Any]:
        """The parameters whose gradients ``grads()`` gives, in its order."""
        return list(self._params)

    def kept_grads(self) -> list[Any]:
        """``grads()``, but None where ``.grad`` is None (not made zeros)."""
        return [None if p.grad is None else _view(p.grad) for p in self._params]

    def free_grads(self, which: Iterable[int]) -> None:
        """The gradients of ``which`` (indices into ``grads()``) freed: None
        (engine.zero_grads: another dp replica keeps them)."""
        for i in which:
            self._params[i].grad = None

    def held_grads(self) -> list[Any]:
        """A copy of each gradient that holds anything, None for the rest
        (a None ``.grad`` stays None): what a failed step puts back."""
        return [None if p.grad is None or not bool(p.grad.any()) else copied(_view(p.grad))
                for p in self._params]

    def put_grads(self, held: list[Any]) -> None:
        """Back to what ``held_grads()`` saw: its copies, and None where the
        gradient held nothing (None or zeros)."""
        torch = _torch()
        for p, h in zip(self._params, held):
            if h is None:
                p.grad = None
            else:
                self._grad(p).copy_(torch.as_tensor(h, device=p.device))


def _runs_of(module: Any, n: int) -> list[Any]:
    """An ``nn.Sequential``'s layers in runs of ``n`` from the first (the
    last shorter): each layer itself where ``n`` is 1, else an
    ``nn.Sequential`` over each run's layers (the same modules)."""
    layers = list(module)
    if n == 1:
        return layers
    torch = _torch()
    return [layers[i] if len(layers[i:i + n]) == 1 else torch.nn.Sequential(*layers[i:i + n])
            for i in range(0, len(layers), n)]


class _Kept:
    """A recomputing stage's forward context: its input and the state of
    the random number generators (CPU, and its GPU's) before it ran."""

    __slots__ = ("x", "state")

    def __init__(self, x: Any, state: tuple[Any, Any]) -> None:
        self.x, self.state = x, state


class _Layers:
    """A layered recompute's forward context: each layer's input (the
    first's the message as it came), the generators' state before it, and
    the version counters of its tensors kept uncopied (() where copied)."""

    __slots__ = ("ins", "states", "seen")

    def __init__(self, ins: list[Any], states: list[tuple[Any, Any]],
                 seen: list[tuple[int, ...]]) -> None:
        self.ins, self.states, self.seen = ins, states, seen


class _Given:
    """A layer's input kept by the first layered forward: its copy, and the
    parts as given, whose version counters tell whether anything changed
    them in place (TorchStage._keep)."""

    __slots__ = ("kept", "given", "versions")

    def __init__(self, kept: Any, given: tuple[Any, ...], versions: tuple[int, ...]) -> None:
        self.kept, self.given, self.versions = kept, given, versions


def _versions(h: Any) -> tuple[int, ...]:
    """The version counters of ``h``'s tensors (a tensor, or a tuple's parts):
    each in-place change moves its tensor's on."""
    parts = h if isinstance(h, tuple) else (h,)
    return tuple(-1 if v is None else v._version for v in parts)


def _uncopied(x: Any) -> Any:
    """A recomputing stage's input as it keeps it for its backward: the
    parts its forward takes as they came (``_part``: no gradient goes back
    to them, a mask's bias, or not floating, ids), copied; the others it
    copies itself. Its module, or a later stage's on this rank, may change
    such a part in place (``bias.mul_(2)``), which the kept input then was
    too: the recompute ran on the changed values, and the weights' gradients
    were another function's, with nothing said (one process, and a stage
    keeping its activations, compute them from the values the forward
    read)."""
    torch = _torch()

    def kept(v: Any, fixed: bool = False) -> Any:
        if not isinstance(v, torch.Tensor) or (v.is_floating_point() and not fixed):
            return v        # (None; an array, made a tensor apart; a part it copies)
        return v.clone()
    if not isinstance(x, tuple):
        return kept(x)
    fixed = getattr(x, "fixed", ())
    parts = tuple(kept(v, i in fixed) for i, v in enumerate(x))
    return Parts(parts, fixed) if isinstance(x, Parts) else parts


def _changes_input(module: Any) -> bool:
    """Whether the first layer a stage runs changes its input in place (an
    ``nn.ReLU(inplace=True)`` where a cut fell, as in torchvision's AlexNet
    cut by parameters): the stage then feeds it a copy of the input's leaf,
    as DeepSpeed's pipeline feeds a clone of the received buffer."""
    first = next((m for m in module.modules() if not any(True for _ in m.children())), None) \
        if hasattr(module, "modules") else None
    return bool(getattr(first, "inplace", False))


def _leaves(h: Any, changed: bool = False) -> tuple[Any, Any]:
    """A layer's kept input (computed without a graph) as the leaf its
    gradient collects in, and what the layer gets (``TorchStage._input``'s
    pair): its floating tensors detached and made to require grad, no copy;
    ``changed`` (the layer changes its input in place, an
    ``nn.ReLU(inplace=True)``): the layer gets a copy of each leaf, which
    an in-place change to a leaf refuses."""
    parts = h if isinstance(h, tuple) else (h,)
    fixed = getattr(h, "fixed", ())
    t = tuple(v.detach().requires_grad_(True)
              if v is not None and v.is_floating_point() and i not in fixed
              else v for i, v in enumerate(parts))
    fed = tuple(v.clone() if changed and v is not None and v.requires_grad else v for v in t)
    return (t, fed) if isinstance(h, tuple) else (t[0], fed[0])


def _flat(out: Any) -> Any:
    """``out``, a stage's output: a tensor, or a tuple of tensors (None
    allowed) that crosses to the next stage part by part. Anything else
    (a tuple inside it) raises, saying so, where it failed later on an
    attribute of a tensor ("'tuple' object has no attribute 'detach'")."""
    torch = _torch()
    parts = out if isinstance(out, tuple) else (out,)
    for i, o in enumerate(parts):
        if o is not None and not isinstance(o, torch.Tensor):
            where = f"part {i} of its output (a tuple)" if isinstance(out, tuple) else \
                "its output"
            raise TypeError(f"a stage's {where} is a {type(o).__name__}: a stage hands the "
                            f"next one a tensor or a flat tuple of tensors; return the "
                            f"tensors in the tuple itself")
    return out


class Parts(tuple):
    """The tensors a stage hands the next one (a tuple), and ``fixed``: the
    indices of those no gradient goes back to (computed from nothing that
    needs one: a mask made from the input), which the next stage takes as
    constants and sends no gradient of."""

    fixed: tuple[int, ...]

    def __new__(cls, parts: Any, fixed: Any = ()) -> "Parts":
        self = super().__new__(cls, parts)
        self.fixed = tuple(fixed)
        return self


def _flowing(out: Any, gy: Any) -> tuple[list[Any], list[Any]]:
    """The outputs a gradient flows back through, and their gradients (as
    tensors on their devices): of a tuple output (a boundary carrying
    several tensors), those that require grad and got a gradient (a mask's
    part gets None)."""
    torch = _torch()
    pairs = zip(out, gy) if isinstance(out, tuple) else [(out, gy)]
    picked = [(o, _tensor(torch, g, o.device)) for o, g in pairs
              if g is not None and _needs_grad(o)]
    return [o for o, _ in picked], [g for _, g in picked]


def _grads_of(t: Any, grad: Any) -> Any:
    """The input gradient(s): ``grad(leaf)`` of the input leaf, or a tuple
    of them for a tuple input (None for a part with no gradient, an
    integer one)."""
    if isinstance(t, tuple):
        return tuple(grad(v) if _needs_grad(v) else None for v in t)
    return grad(t) if t.requires_grad else None


def _needs_grad(v: Any) -> bool:
    """Whether a tuple's part takes a gradient: not an integer one, nor one
    computed from nothing that needs one, nor a part that is None."""
    return v is not None and v.requires_grad


def _view(t: Any) -> Any:
    """An array sharing ``t``'s memory: numpy for CPU, CuPy for CUDA; a
    bfloat16 tensor itself, which neither has (the executor's in-place
    arithmetic and meshrun's collectives take tensors as they take arrays:
    ``copied``, ``widened``)."""
    if t.dtype == _torch().bfloat16:
        return t
    if t.is_cuda:
        from mesh import device
        return device.as_cupy(t)
    from mesh.tensors import numpy_view
    return numpy_view(t)


def copied(a: Any) -> Any:
    """A copy of an array, or of a tensor (a bfloat16 stage's gradient)."""
    return a.clone() if is_tensor(a) else a.copy()


def widened(a: Any) -> Any:
    """A copy of ``a`` to sum into: float32 for a bfloat16 tensor (summed
    wide, rounded once when written back), else of its own dtype."""
    if is_tensor(a) and a.dtype == sys.modules["torch"].bfloat16:
        return a.float()
    return copied(a)
