"""engine.deepspeed's ZeRO: the optimizer set-up (stage 1 over the dp
group, stages 2 and 3 over a pp=1 ``engine.distribute`` job whose one
layer is the model; a model with MoE layers at stages 1 and 2:
engine.moe_zero's, its stage 2 gradients ``MoEOwnerReducer``'s),
``deepspeed.zero`` (``Init``, ``GatheredParameters``) and stage 3's
gathers around the user's own forward and backward.

Under stage 3 a DeepSpeed script calls ``engine(x)`` and
``engine.backward(loss)``, never the job's ``step()``; the gathers are
still the job's (engine.zero_params, engine.zero_layers,
engine.zero_prefetch): ``Gathers`` opens a window at a step's first
forward (``ShardedParams.begin``, under a tag of the window's own), runs
each forward and backward inside ``computing`` (the module hooks gather a
module's parameters just before its forward and drop them after; its
backward gathers them again, a module or two at a time, through the saved
tensors' hooks), and closes it at the accumulation boundary's step, once
the gradients' all-reduce has completed on every rank (``agreed``: the
order the next window's gathers are posted ahead by, ``stage3_prefetch_
bucket_size`` and ``stage3_max_live_parameters`` bounding them), dropping
the others' values (``free``)::

    forward, backward (x gas):  each module's gathered as it runs, dropped after
    step():                     the window closed; each replica steps its share

An evaluation's forward outside a window opens one of its own (its own
gather order) and closes it after. A parameter the model holds that the
engine has not sharded (a module set in after ``initialize``, a parameter
replaced or reshaped inside ``GatheredParameters``: Hugging Face's
``resize_token_embeddings``) is sharded at its shape on leaving that block
or at the next forward, the ZeRO optimizer made again over the model's
parameters (``reshard``).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator

import torch

import collectives
import mesh

from .grad_wire import post, wired
from .moe import PartsReducer, expert_parts, is_moe_param
from .moe_zero import MoEZeroOptimizer

__all__ = ["zero", "Gathers", "OwnerReducer", "MoEOwnerReducer", "zero_job", "zero_optimizer",
           "ENGINES"]

ENGINES: "weakref.WeakSet[Any]" = weakref.WeakSet()   # initialize's data-parallel engines


def zero_job(model: torch.nn.Module, world: Any, stage: int) -> Any:
    """ZeRO 2 and 3's job: one layer, the model (its parameters the
    model's own; never traced, so any forward runs; it runs no step).
    None for stages 0 and 1, and for a model with MoE layers (ZeRO 2's
    shares are engine.moe_zero's, over the world and the experts' groups)."""
    if stage < 2 or any(is_moe_param(p) for p in model.parameters()):
        return None
    import engine
    job = engine.distribute(torch.nn.Sequential(model), mesh.grid(world, dp=world.size, pp=1),
                            schedule="1f1b", microbatches=1, balance="parameters",
                            loss_fn=lambda y, t: y, verbose=False)
    for p in model.parameters():    # (its stage made them zeros: a whole model's more)
        p.grad = None
    return job


def zero_optimizer(cfg: Any, world: Any, job: Any, given: Any, params: Any,
                   trained: list[Any]) -> Any:
    """The engine's optimizer: the user's (``given``) or the config's, made
    ZeRO's at stages 1-3 (its class and groups the given one's); None where
    neither names one."""
    from .ds_config import optimizer_class
    if given is not None and cfg.optimizer is not None:
        raise ValueError("deepspeed config: optimizer: given in the config and as "
                         "optimizer= too; pass one")
    if given is None and cfg.optimizer is None:
        return None
    if given is not None and cfg.zero_stage == 0:
        return given
    if given is not None:
        cls, hyper = type(given), _taken(type(given), given.defaults)
        groups: Any = [dict(g) for g in given.param_groups]
    else:
        cls, hyper = optimizer_class(cfg.optimizer or {})
        groups = trained if params is None else list(params)
        if cfg.zero_stage == 0:
            try:
                return cls(groups, **hyper)
            except TypeError as e:
                raise ValueError(f"deepspeed config: optimizer.params: {e}") from None
    if cfg.zero_stage == 0:
        return cls(groups, **hyper)
    import engine
    flat = [q for g in groups for q in (g["params"] if isinstance(g, dict) else [g])]
    if any(is_moe_param(q) for q in flat + trained):     # (MoE layers: engine.moe_zero)
        return MoEZeroOptimizer(groups, cls, world, stage=cfg.zero_stage, **hyper)
    if cfg.zero_stage == 1:
        return engine.ZeroRedundancyOptimizer(groups, cls, world, stage=1, **hyper)
    # (stage 3: each module's gathered as it runs, DeepSpeed's stage 3: Gathers)
    return engine.ZeroRedundancyOptimizer(groups, cls, job, stage=cfg.zero_stage,
                                          stage3_per_layer=True, **cfg.zero_knobs, **hyper)


class Gathers:
    """Stage 3's window of gathers over the user's forwards and backwards
    (see the module docstring): ``job``'s ShardedParams driven as its
    step drives them."""

    def __init__(self, job: Any) -> None:
        self.kept = job.pipeline.owned_params
        self.stage = next(iter(job.pipeline.stages))
        self.n = 0          # the windows opened so far (each one's tags its own)
        self.kind: bool | None = None   # the window open (an evaluation's: True), or None

    def open(self, kind: bool = False) -> bool:
        """Open a window (``kind`` True: an evaluation's) where none is;
        whether this call opened it."""
        if self.kind is not None:
            return False
        self.kept.begin(self.n, kind)
        self.n += 1
        self.kind = kind
        return True

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        """A forward or backward in the window: each module's parameters
        gathered as it runs (or, gathered whole, waited for)."""
        if self.kind is None:
            yield
            return
        with self.kept.computing(self.stage):
            yield

    def close(self, ok: bool = True) -> None:
        """Close the window (``ok``: it succeeded on every rank, its order
        the next's to post ahead by): the others' values dropped."""
        if self.kind is None:
            return
        try:
            if ok:
                self.kept.agreed()
        finally:
            self.kind = None
            self.kept.free()

    @contextlib.contextmanager
    def whole(self, job: Any, fill: bool = True) -> Iterator[None]:
        """Every parameter's values for the block: inside a window each
        module's gathered at once (one event of the window's), else the
        job's ``gathered()``. Collective over dp."""
        layers = self.kept.layers
        if self.kind is None or not layers.active:
            with job.gathered(fill):
                yield
            return
        params = list(layers.params)
        layers.acquire(params)
        try:
            yield
        finally:
            layers.release(params)


class OwnerReducer:
    """ZeRO 2 and 3's gradient reduction, engine.zero_grads' in a job's
    step: each of ``params``' gradients reduced to the dp replica that
    owns it (``collectives.reduce``, op="avg", in flight together) as the
    boundary's backward makes it final, and dropped on the other replicas
    at once (the reduce holds it until sent), so no rank holds more than
    its share's gradients and those in flight, not all of them, as an
    all-reduce would (stage 1's, collectives.GradReducer). Posted in the
    parameters' reverse order on every rank (the collectives pair up in
    order): one made final early waits for those before it; ``wait()``
    posts the rest (a parameter without a gradient here sends zeros, as
    DeepSpeed's flat buffers do) and waits. A parameter of no owner
    (``owner`` None) is averaged on every replica.

    ``wire`` (DeepSpeed's ``communication_data_type``, torch.float16 or
    torch.bfloat16): each gradient rounded to it, summed in it over the
    replicas, multiplied there by 1 / replicas, then copied back into the
    gradient's own dtype, as DeepSpeed's ``allreduce_bucket`` does, 16 bits
    a value on the wire (engine.grad_wire)."""

    def __init__(self, g: Any, params: list[Any], owner: list[int | None],
                 wire: Any = None) -> None:
        self.g, self.params, self.owner, self.wire = g, params, owner, wire
        self.back: list[Any] = []   # the wired gradients' averages in flight (grad_wire)
        self.order = list(reversed(range(len(params))))
        self.made = [False] * len(params)
        self.next = 0       # the first of ``order`` not posted
        self.works: list[Any] = []

    def ready(self, i: int) -> None:
        """Parameter ``i``'s gradient is final: posted with those before it."""
        self.made[i] = True
        while self.next < len(self.order) and self.made[self.order[self.next]]:
            self._post(self.order[self.next])
            self.next += 1

    def _post(self, i: int) -> None:
        p, r = self.params[i], self.owner[i]
        grad = p.grad if p.grad is not None else torch.zeros(p.shape, dtype=p.dtype,
                                                             device=p.device)
        self.works = [w for w in self.works if not w.done()]
        if wired(grad, self.wire):
            self.back.append(post(self.g, grad, self.wire, r))
            p.grad = grad if r is None or r == self.g.rank else None
            return
        if r is None:
            self.works.append(collectives.all_reduce(self.g, grad, op="avg", async_op=True))
            p.grad = grad
            return
        self.works.append(collectives.reduce(self.g, grad, root=r, op="avg", async_op=True))
        p.grad = grad if r == self.g.rank else None

    def summed(self, x: float) -> float:
        """``x`` summed over the dp replicas (each holds its share's
        gradients: what one finds in them, told to all)."""
        t = torch.tensor([x], dtype=torch.float64)
        collectives.all_reduce(self.g, t, op="sum")
        return float(t[0])

    def clip(self, held: list[Any], max_norm: float) -> float:
        """torch's ``clip_grad_norm_`` over the whole model's gradients (the
        dp average) where each replica holds its share's (``held``, the
        parameters with a gradient here): their squares summed over dp,
        each counted once (on its owner; one of no owner on replica 0),
        then ``held``'s scaled alike. The norm."""
        owner = {id(p): r for p, r in zip(self.params, self.owner)}
        me = self.g.rank
        sq = 0.0
        for p in held:
            r = owner.get(id(p))
            if (r == me or r is None and me == 0) and p.grad is not None:
                sq += float(p.grad.detach().double().square().sum())
        return _scaled(held, self.summed(sq) ** 0.5, max_norm)

    def wait(self) -> None:
        """Post what is left, then wait for every reduce."""
        try:
            while self.next < len(self.order):
                self._post(self.order[self.next])
                self.next += 1
            for w in self.works + self.back:
                w.wait()
        finally:
            self.works, self.next, self.back = [], 0, []
            self.made = [False] * len(self.params)


def _taken(cls: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` less the keys ``cls(params, **...)`` does not take:
    torch 2.13's AdamW keeps ``decoupled_weight_decay`` in its defaults
    (Adam's) but its constructor refuses it."""
    import inspect
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return dict(defaults)
    if any(q.kind is q.VAR_KEYWORD for q in sig.parameters.values()):
        return dict(defaults)
    return {k: v for k, v in defaults.items() if k in sig.parameters}


def _scaled(held: list[Any], norm: float, max_norm: float) -> float:
    """``held``'s gradients scaled as torch's ``clip_grad_norm_`` does for a
    total ``norm``; the norm."""
    coef = min(1.0, max_norm / (norm + 1e-6))
    for p in held:
        if p.grad is not None:
            p.grad.detach().mul_(coef)
    return norm


class MoEOwnerReducer(PartsReducer):
    """ZeRO 2's gradients of a model with MoE layers: an ``OwnerReducer``
    per expert group name (and one for the others), each
    gradient reduced to its owner in ``opt``'s (a ``MoEZeroOptimizer``)
    share over that part's group and dropped on the other ranks: the
    non-expert ones averaged over the world, an expert's averaged over its
    expert-data-parallel group and divided by ``ep_size`` (the sum over the
    world divided by its size, as ``engine.MoEGradReducer``'s). A
    parameter of no optimizer group is reduced to every rank of its group
    (``opt`` None: every parameter, ZeRO 0 and 1's with ``wire``). ``wire``:
    each part's ``OwnerReducer``'s (DeepSpeed's ``communication_data_type``).
    ``ready(i)`` (``params``' order), ``wait()``, ``clip`` and ``summed``
    as the engine calls them."""

    def __init__(self, world: Any, params: list[Any], opt: Any, wire: Any = None) -> None:
        self.world = world
        owner = opt.owners() if opt is not None else {}
        parts, self._where = expert_parts(world, params)
        self.parts: list[tuple[Any, list[Any], list[int | None]]] = []
        self._run = []
        for group, ps, ep in parts:
            own = [owner.get(id(p)) for p in ps]
            reducer = OwnerReducer(group, ps, own, wire) if ps and group.size > 1 else None
            self.parts.append((group, ps, own))
            self._run.append((reducer, ps, ep))

    def summed(self, x: float) -> float:
        """``x`` summed over the world (fp16's overflow flag: each rank holds
        its share's gradients)."""
        return float(collectives.all_reduce(self.world, torch.tensor([float(x)],
                                                                     dtype=torch.float64))[0])

    def clip(self, held: list[Any], max_norm: float) -> float:
        """torch's ``clip_grad_norm_`` over the whole model's gradients where
        each rank holds its share's (``held``): every gradient's squares
        counted once, on its owner (one of no owner on its group's rank 0),
        summed over the world, then ``held``'s scaled alike. The norm."""
        ids = {id(p) for p in held}
        sq = 0.0
        for group, ps, own in self.parts:
            for p, r in zip(ps, own):
                if id(p) in ids and p.grad is not None and \
                        (r == group.rank or r is None and group.rank == 0):
                    sq += float(p.grad.detach().double().square().sum())
        return _scaled(held, self.summed(sq) ** 0.5, max_norm)


class _GatheredParameters:
    """``deepspeed.zero.GatheredParameters(params, modifier_rank=None,
    fwd_module=None, enabled=True)``, as DeepSpeed's: under ZeRO 3 the
    engine's parameters whole on every rank for the block (collective over
    dp); on leaving it, with ``modifier_rank`` r, rank r's values of
    ``params`` broadcast to every rank (what r wrote in the block, an
    initialisation or a load, is every rank's; the others' writes are
    lost), then each rank keeps its share again (a parameter replaced in
    the block, or given another shape there, as Hugging Face's
    ``resize_token_embeddings`` does, sharded at its shape: ``reshard``);
    without one, nothing
    written is kept but on each parameter's owner. Outside ZeRO 3, or
    with ``enabled=False``, nothing (DeepSpeed's no-op for parameters
    that are not ZeRO 3's: each rank keeps what it writes). ``fwd_module``
    (DeepSpeed registers ``params`` as external parameters of that module's
    forward) is taken: a module here gathers what its forward reads through
    another's attributes as it reads them (engine.zero_layers' stray reads)."""

    def __init__(self, params: Any, modifier_rank: int | None = None,
                 fwd_module: Any = None, enabled: bool = True) -> None:
        ps = [params] if isinstance(params, torch.Tensor) else list(params)
        ids = {id(p) for p in ps}
        self._held: Any = contextlib.nullcontext()
        self._eng: Any = None
        self._params = ps
        self._src = modifier_rank
        for eng in list(ENGINES) if enabled else []:
            if eng._gathers is not None and any(id(p) in ids for p in eng.module.parameters()):
                self._held, self._eng = eng._whole(), eng
                break
        if self._eng is not None and modifier_rank is not None and not (
                isinstance(modifier_rank, int) and 0 <= modifier_rank < self._eng.world.size):
            raise ValueError(f"rank {self._eng.world.rank}: deepspeed.zero.GatheredParameters("
                             f"modifier_rank={modifier_rank!r}): a rank of the "
                             f"{self._eng.world.size} the engine's parameters are sharded over")

    def __enter__(self) -> None:
        self._held.__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._src is not None and self._eng is not None and exc[0] is None:
                g = self._eng.world
                works = [collectives.broadcast(g, p.data, root=self._src, async_op=True)
                         for p in self._params if p.numel()]
                for w in works:
                    w.wait()
                if self._eng._gathers.kind is None:     # (a new parameter or shape: sharded)
                    reshard(self._eng)
        finally:
            self._held.__exit__(*exc)


class _Zero:
    """``deepspeed.zero``: ``Init`` (a context that does nothing: a model
    built whole is sharded by ``initialize``, a module made after it once
    the engine's model holds it, at its next forward: ``reshard``) and
    ``GatheredParameters``."""
    GatheredParameters = _GatheredParameters

    @staticmethod
    @contextlib.contextmanager
    def Init(*args: Any, **kwargs: Any) -> Iterator[None]:
        yield


zero = _Zero()


def layout(eng: Any) -> list[tuple[str, Any, tuple[int, ...]]]:
    """The engine's model's parameters as stage 3 shards them: each one's
    name, the parameter and its whole shape."""
    kept = eng.job.pipeline.owned_params if eng._gathers is not None else None
    return [(n, p, kept.shape_of(p) if kept is not None and id(p) in kept.owner
             else tuple(p.shape)) for n, p in eng.module.named_parameters()]


def unchanged(eng: Any) -> None:
    """ZeRO 0 to 2: ValueError where the model's parameters are no longer
    the ones ``initialize`` set the gradient reduction and optimizer up
    over (one replaced, put in or reshaped since)."""
    now = layout(eng)
    if len(now) == len(eng._layout) and all(
            a[0] == b[0] and a[1] is b[1] and a[2] == b[2] for a, b in zip(now, eng._layout)):
        return
    was = {n: (p, s) for n, p, s in eng._layout}
    name = next((n for n, p, s in now if n not in was or was[n][0] is not p or
                 was[n][1] != s), now[-1][0] if now else "?")
    raise ValueError(f"rank {eng.global_rank}: deepspeed: parameter {name!r} replaced, put in "
                     f"or reshaped after initialize: at ZeRO stage {eng.cfg.zero_stage} the "
                     f"gradient reduction and optimizer hold the parameters initialize was "
                     f"given; change the model before initialize (ZeRO 3 shards a new one)")


def reshard(eng: Any) -> None:
    """Stage 3: where the model holds a parameter the engine has not
    sharded (a module put in since ``initialize``, a parameter replaced:
    Hugging Face's ``resize_token_embeddings``) or a parameter of another
    shape (``p.data`` replaced inside ``GatheredParameters``, whole there),
    its ZeRO optimizer made again over the model's parameters, each in its
    place in the groups (a new name in the first group), which deals the
    shares out again and shards each at its shape (``take``: the
    others' values broadcast from their owners first), and its gradient
    reduction and hooks over them. Collective over dp: every rank's model
    changed alike (the same code ran on each). Where the optimizer has
    stepped already, ValueError (its state would be another shape's)."""
    kept = eng.job.pipeline.owned_params
    now = [(n, p, tuple(p.shape) if kept.held or id(p) not in kept.owner
            else kept.shape_of(p)) for n, p in eng.module.named_parameters()]
    before = {n: (p, s) for n, p, s in eng._layout}
    changed = [n for n, p, s in now if n not in before or before[n][0] is not p or
               before[n][1] != s]
    if not changed and len(now) == len(before):
        return
    opt = eng.optimizer
    if opt is not None and any(opt.optim.state.values()):
        raise ValueError(f"rank {eng.global_rank}: deepspeed: parameter {changed[0]!r} put "
                         f"in or reshaped after the optimizer stepped (its state is of the "
                         f"old one); under ZeRO 3 replace or resize parameters before the "
                         f"first step (as Hugging Face's Trainer resizes before initialize)")
    # (ids of parameters and modules gone: another object may be given one of them)
    ids = {id(p) for _, p, _ in now}
    resized = {id(p) for n, p, s in now if n in before and before[n][0] is p and
               before[n][1] != s}
    owned = eng.job.pipeline.owned
    for k in [k for k in kept.owner if k not in ids or k in resized]:
        kept.owner.pop(k)
        kept.shape.pop(k, None)
    for k in [k for k in owned.owner if k not in ids]:
        owned.owner.pop(k)
    modules = {id(m) for st in eng.job.pipeline.stages.values() for m in st.module.modules()}
    kept._hooked &= modules
    for st in eng.job.pipeline.stages.values():
        st._params = [p for p in st.module.parameters() if p.requires_grad]
    trained = [p for p in eng.module.parameters() if p.requires_grad]
    if opt is not None:
        place = {n: p for n, p, _ in now}
        old = {id(p): n for n, (p, _) in before.items()}
        groups = [dict(g, params=[place[old[id(p)]] for p in g["params"]
                                  if old.get(id(p)) in place]) for g in opt.param_groups]
        held = {id(p) for g in groups for p in g["params"]}
        groups[0]["params"] += [p for p in trained if id(p) not in held]
        import engine
        eng.optimizer = engine.ZeroRedundancyOptimizer(
            groups, opt.optimizer_class, eng.job, stage=3, stage3_per_layer=True,
            **eng.cfg.zero_knobs, **_taken(opt.optimizer_class, opt.defaults))
        if getattr(eng.lr_scheduler, "optimizer", None) is opt:
            eng.lr_scheduler.optimizer = eng.optimizer
        owner = {id(p): r for p, r in zip(eng.optimizer.params, eng.optimizer.owner)}
        eng.reducer = OwnerReducer(eng.job.grid.group("dp"), trained,
                                   [owner.get(id(p)) for p in trained], eng.reducer.wire)
    else:       # (no optimizer: nothing sharded, every gradient averaged)
        eng.reducer = collectives.GradReducer(eng.world, trained) \
            if not isinstance(eng.reducer, OwnerReducer) else \
            OwnerReducer(eng.world, trained, [None] * len(trained), eng.reducer.wire)
    eng._hook(trained)
    eng._layout = layout(eng)
