"""ZeRO stage 3 in a Pipeline: each parameter's values kept by one dp replica between steps.

``engine.ZeroRedundancyOptimizer(..., process_group=job, stage=3)`` tells
the job which dp replica owns each parameter (``ShardedParams.take``, the
shares stage 2 reduces the gradients to). Between steps the other
replicas hold none of its values: its ``.data`` is an empty tensor of its
dtype (``numel() == 0``; torch's own ``Parameter`` object stays, so an
optimizer, the job's names and ``job.parameters()`` still hold it), as
DeepSpeed's stage 3 leaves a parameter. A step (or an evaluation) first
gives every replica the parameters it lacks, each broadcast from its owner
into fresh storage, all in flight at once, started as the step starts;
each stage waits for its own before its first action that computes
(``wait``), so the broadcasts overlap the step's start (cutting the batch,
posting the receives, the loss's row count, a later stage's wait for its
first activation). Once the step is done (the gradients reduced to their
owners and freed elsewhere, engine.zero_grads) the others' storage is
dropped again (``free``), on failure too:

    dp rank:          0                1
    owns:         [w0, b1]         [w1, b0]
    at rest:      w0, b1 (w1, b0 empty)   w1, b0 (w0, b1 empty)
    step:         broadcast each from its owner, run, reduce each grad to it, free

``opt.step()`` then steps each replica's share alone and sends nothing:
the next step's gathers give the others the new values. Outside a step,
``whole`` gives the parameters their values for a while (the job's state
gathers and loads, its re-time, ``job.gathered()``) and frees them after.
That is a step with ``per_layer`` False; with it (the default) a torch
stage's step gathers each module's parameters just before the module
runs and drops them after (engine.zero_layers: ``begin``, the module
hooks ``_guard`` sets, ``computing`` around each forward and backward
action; the next modules' gathers posted ahead, engine.zero_prefetch,
in the order the last step ran them once every rank ``agreed`` it
succeeded), so a step holds a module or two of the others' weights at a
time (and the ones posted ahead), not the stage's; a compiled stage, and
a traced model traced again at its inputs' shapes, are gathered whole.
"""
from __future__ import annotations

import contextlib
import math
import sys
import weakref
from typing import Any, Iterator, Sequence

import collectives

from .torch_stage import TorchStage
from .zero_layers import LayerGathers
from .zero_prefetch import BUCKET, MAX_LIVE

__all__ = ["ShardedParams"]

_NOTHING = contextlib.nullcontext()


class ShardedParams:
    """A Pipeline's parameters (by id) whose values one dp replica keeps
    between steps, that replica's dp index, and their shapes."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.owner: dict[int, int] = {}
        self.shape: dict[int, Any] = {}     # each one's whole shape (a tp shard's: the shard's)
        self.pending: dict[int, list[Any]] = {}     # each stage's broadcasts in flight
        self.held = False      # whether the others' parameters hold their values now
        self._hooked: set[int] = set()      # the modules _guard watches, by id
        self.per_layer = True       # a step gathers module by module (engine.zero_layers)
        self.layers = LayerGathers(self)
        self.whole_bytes = 0        # the others' bytes the last step gathered whole
        self.whole_count = 0        # and their parameters

    def __bool__(self) -> bool:
        return bool(self.owner)

    def _stage_params(self) -> list[tuple[int, list[Any]]]:
        """Each torch stage's parameters this rank shards, in the stages'
        order (the same on every replica: the broadcasts' order)."""
        out = []
        for s, stage in sorted(self.pipe.stages.items()):
            if isinstance(stage, TorchStage):
                # (module.parameters() names a shared one once)
                out.append((s, [p for p in stage.module.parameters() if id(p) in self.owner]))
        return out

    def elsewhere(self, s: int, i: int) -> bool:
        """Whether stage ``s``'s parameter ``i`` (in ``params()``' order) is
        kept by another replica: between its gathers a step holds no values
        of it here (a placeholder), which engine.tied's check of equal
        copies leaves out."""
        stage = self.pipe.stages[s]
        if not self.owner or not isinstance(stage, TorchStage):
            return False
        me = self.pipe.dp_index
        return self.owner.get(id(stage.grad_params()[i]), me) != me

    def shape_of(self, p: Any) -> tuple[int, ...]:
        """``p``'s shape, whole (where this replica holds it empty)."""
        return tuple(self.shape.get(id(p), p.shape))

    def take(self, params: Sequence[Any], owners: Sequence[int | None] | None,
             per_layer: bool = True, prefetch: int = 0, bucket: int = BUCKET,
             max_live: int = MAX_LIVE) -> None:
        """From now on, each of ``params``' values kept by the replica
        ``owners`` names alone between steps (None: by every replica again,
        as without stage 3; ``owners`` None: each so), a step gathering them
        module by module (``per_layer``; the gathers of ``prefetch`` modules
        ahead of the one running posted, while their elements not yet used
        stay within ``bucket``, and the elements live outside the module
        running within ``max_live``: engine.zero_prefetch) or whole.
        Collective over dp where a parameter sharded so far is given back
        its values (the replicas make the same call: building the optimizer
        is)."""
        whole = [None] * len(params) if owners is None else list(owners)
        back = [p for p, r in zip(params, whole) if r is None and id(p) in self.owner]
        if back:
            with self.whole(params=back):
                for p in back:
                    self.owner.pop(id(p), None)
                    self.shape.pop(id(p), None)
        kept = [(p, int(r)) for p, r in zip(params, whole) if r is not None]
        if not kept:
            return
        shapes = [self.shape_of(p) for p, _ in kept]
        self.gather()       # (the shares may change: every value here first)
        self.wait()
        for (p, r), shape in zip(kept, shapes):
            self.owner[id(p)] = r
            self.shape[id(p)] = shape
            if r != self.pipe.dp_index:
                p.grad = None       # (the owner keeps it, as stage 2 after a step)
        self.per_layer = bool(per_layer)
        ahead = self.layers.ahead
        ahead.window, ahead.bucket, self.layers.max_live = int(prefetch), bucket, max_live
        self._guard()
        self.held = True
        self.free()

    def _guard(self) -> None:
        """A forward pre-hook and hook on each module of this rank's stages
        that holds a sharded parameter itself. In a step run layer by layer
        they gather its parameters before its forward and drop them after
        (engine.zero_layers). Called between steps (a user's own
        ``job.stages[0].module(x)``) while one is empty here, the pre-hook
        raises naming the fix, where torch's matmul said only that "mat1 and
        mat2 shapes cannot be multiplied". (Closures over a weak reference:
        a deep copy of the module, the re-time's, copies no pipeline.)"""
        me = weakref.ref(self)
        where = f"pp rank {self.pipe.rank} (dp replica {self.pipe.dp_index})"

        def hook(module: Any, args: Any) -> None:
            kept = me()
            if kept is None:
                return
            if kept.layers.active:
                own = kept.layers.units.get(id(module))
                if own:
                    kept.layers.acquire(own)
                return
            if kept.held or not kept.owner:
                return
            mine = kept.owner
            if any(id(p) in mine and mine[id(p)] != kept.pipe.dp_index
                   for p in module.parameters(recurse=False)):
                raise RuntimeError(
                    f"{where}: {type(module).__name__} called outside job.step() and "
                    f"eval_step(): under ZeRO stage 3 the parameters other dp replicas own "
                    f"are empty here between steps; call it inside `with job.gathered():` "
                    f"(collective over dp)")

        def after(module: Any, args: Any, out: Any) -> None:
            kept = me()
            if kept is not None and kept.layers.active:
                own = kept.layers.units.get(id(module))
                if own:
                    kept.layers.release(own)
        modules = []
        for _, stage in sorted(self.pipe.stages.items()):
            if not isinstance(stage, TorchStage):
                continue
            for m in stage.module.modules():
                if any(id(p) in self.owner for p in m.parameters(recurse=False)):
                    if not stage.compiled:      # (a compiled stage is gathered whole)
                        modules.append(m)
                    if id(m) not in self._hooked:
                        self._hooked.add(id(m))
                        # (first and last: the module's other hooks read its weights)
                        m.register_forward_pre_hook(hook, prepend=True)
                        m.register_forward_hook(after)
        self.layers.watch([p for _, ps in self._stage_params() for p in ps], modules)

    def begin(self, n: int, kind: bool = False) -> None:
        """Step (or evaluation: ``kind`` True) ``n`` starts: the torch stages that run
        layer by layer (``per_layer``; not a compiled stage, nor a traced
        model traced again at its inputs' shapes, which reads every weight)
        gather each module's parameters as it runs (engine.zero_layers,
        under the step's tags); the others' are gathered whole now (in
        flight: each stage ``wait``s for its own)."""
        if self.held or not self.owner:
            return
        pipe = self.pipe
        layered: set[int] = set()
        if self.per_layer and pipe.before_step is None and pipe.reshaped is None and \
                pipe.dp is not None and pipe.dp.size > 1:
            layered = {s for s, st in pipe.stages.items()
                       if isinstance(st, TorchStage) and not st.compiled}
        staged = self._stage_params()
        if layered:     # (the tags of step n: engine.executor's, above its messages')
            self.layers.begin(layered, pipe.tag_base + ((pipe._step0 + n) << 32),
                              [p for s, ps in staged if s in layered for p in ps], kind)
        else:           # (this step's figures, none layer by layer)
            self.layers.peak_bytes = self.layers.received = 0
        rest = [p for s, ps in staged if s not in layered for p in ps]
        self.gather(params=rest)
        me = pipe.dp_index
        others = [p for p in rest if self.owner[id(p)] != me]
        self.whole_bytes = sum(math.prod(self.shape[id(p)]) * p.element_size() for p in others)
        self.whole_count = len(others)

    def computing(self, s: int) -> Any:
        """A context manager for stage ``s``'s forward or backward action in
        a step: its parameters gathered whole waited for first, or gathered
        module by module (engine.zero_layers); nothing without stage 3."""
        if self.pending:
            self.wait(s)
        return self.layers.computing(s) if self.layers.active else _NOTHING

    def agreed(self) -> None:
        """Every rank of the pipeline agreed that the step succeeded: its
        modules' order is the next one's to prefetch by (engine.zero_prefetch)."""
        self.layers.agreed()

    def abandon(self, reason: str, kind: Any, lost: int | None) -> None:
        """This rank's step failed: the replicas waiting for its parameters
        (layer by layer) raise now (engine.zero_layers)."""
        self.layers.abandon(reason, kind, lost)

    def peak_bytes(self) -> int:
        """The most bytes of other replicas' parameters this rank held at
        once during its last step: the whole stages' where gathered whole,
        else the modules' gathered at one time."""
        return self.whole_bytes + self.layers.peak_bytes

    def received(self) -> int:
        """The values of other replicas' parameters this rank received in
        its last step (one message each, layer by layer; a broadcast each,
        gathered whole)."""
        return self.whole_count + self.layers.received

    def gather(self, fill: bool = True, params: Sequence[Any] | None = None) -> None:
        """Give every parameter this replica does not own its storage again,
        and (``fill``) its owner's values, each broadcast from it, all in
        flight at once (``wait`` for them); ``params``: these alone."""
        if self.held or not self.owner:
            return
        torch = sys.modules["torch"]
        dp, me, timeout = self.pipe.dp, self.pipe.dp_index, self.pipe.timeout
        only = None if params is None else {id(p) for p in params}
        self.held = True
        for s, ps in self._stage_params():
            works = self.pending.setdefault(s, [])
            for p in ps:
                if only is not None and id(p) not in only:
                    continue
                r = self.owner[id(p)]
                if r != me:
                    p.data = torch.empty(self.shape[id(p)], dtype=p.dtype, device=p.device)
                if fill and dp is not None and dp.size > 1:
                    works.append(collectives.broadcast(dp, p.detach(), root=r, async_op=True,
                                                       timeout=timeout))

    def wait(self, s: int | None = None) -> None:
        """Wait for stage ``s``'s broadcasts (None: every stage's)."""
        for k in ([s] if s is not None else list(self.pending)):
            works = self.pending.pop(k, None) or []
            for w in works:
                w.wait()

    def free(self) -> None:
        """Drop the values of the parameters this replica does not own (an
        empty tensor of its dtype each), their broadcasts waited for first
        (a failed one's error dropped: the step's own is raised)."""
        if not self.held:
            return
        self.layers.end()
        for works in self.pending.values():
            for w in works:
                try:
                    w.wait()
                except Exception:
                    pass
        self.pending.clear()
        torch = sys.modules["torch"]
        me = self.pipe.dp_index
        for _, ps in self._stage_params():
            for p in ps:
                if self.owner[id(p)] != me:
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.held = False

    @contextlib.contextmanager
    def whole(self, fill: bool = True, params: Sequence[Any] | None = None) -> Iterator[None]:
        """Every parameter with its values (``fill``; else its storage
        only: what is written then on a replica that does not own it is
        dropped after) for the ``with`` block, freed after it. Collective
        over dp with ``fill``; nothing where they are held already."""
        if self.held or not self.owner:
            yield
            return
        try:
            self.gather(fill, params)
            self.wait()
            yield
        finally:
            self.free()
