"""DeepSpeed's training API on meshrun: ``from engine import deepspeed`` in
place of ``import deepspeed`` runs a data-parallel DeepSpeed script
unchanged under ``meshrun -n N``, torchrun or ``mesh.spawn``::

    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config="ds_config.json")
    for x, y in loader:
        loss = loss_fn(engine(x), y)
        engine.backward(loss)       # gradients averaged over dp at the boundary
        engine.step()               # optimizer and scheduler at the boundary only
    engine.save_checkpoint(dir, tag); engine.load_checkpoint(dir, tag)

The process group is torch.distributed's on the "meshrun" backend
(collectives.torchdist). Gradients are averaged by a
``collectives.GradReducer`` as backward makes them final, on the
accumulation boundary's backward only (DDP's ``no_sync`` before it). ZeRO
is ``engine.ZeroRedundancyOptimizer``: stage 1 over the dp group, stages 2
and 3 over a pp=1 ``engine.distribute`` job of the model (its parameters
the model's own); under stage 3 the job's gathers run around the user's
forwards and backwards, each module's parameters gathered just before it
runs and dropped after, the next ones' posted ahead (engine.ds_zero). A
model with MoE layers: stages 1 and 2 over the world and each expert's
expert-data-parallel group (engine.moe_zero). A checkpoint is one
whole file (every parameter, the whole optimizer state by index), so it
loads at any dp size and ZeRO stage (engine.ds_checkpoint). Config:
engine.ds_config. A ``PipelineModule`` gets engine.ds_pipe's engine
(``train_batch`` on an ``engine.distribute`` job over dp x pp).
"""
from __future__ import annotations

import contextlib
import os
import weakref
from typing import Any, Iterable

import torch

import collectives

from .ds_checkpoint import load, save, save_16bit
from .ds_compat import (RepeatingLoader, accelerator, add_config_arguments, checkpointing,
                        comm, get_accelerator, init_distributed, runtime, set_random_seed,
                        utils)
from .ds_config import (SCHEDULERS, Config, DynamicLossScaler, WarmupCosineLR, WarmupDecayLR,
                        WarmupLR, parse)
from .ds_pipe import LayerSpec, PipelineEngine, PipelineModule, TiedLayerSpec
from .ds_zero import (ENGINES, Gathers, MoEOwnerReducer, OwnerReducer, layout, reshard,
                      unchanged, zero, zero_job, zero_optimizer)
from .grad_wire import dtype_of
from .moe import deepspeed_namespace as moe
from .ulysses import deepspeed_sequence

__all__ = ["initialize", "init_distributed", "DeepSpeedEngine", "comm", "DeepSpeedConfigError",
           "zero", "add_config_arguments",
           "WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "PipelineModule", "LayerSpec",
           "TiedLayerSpec", "PipelineEngine", "pipe", "checkpointing", "accelerator",
           "get_accelerator", "utils", "runtime", "RepeatingLoader", "set_random_seed", "sequence",
           "moe"]

DeepSpeedConfigError = ValueError
# DeepSpeed's parts with no counterpart here: named, with where to go instead
_ABSENT = {"ops": "DeepSpeed's fused kernels (torch's run here)",
           "inference": "init_inference", "init_inference": "inference engines",
           "compression": "model compression",
           "profiling": "the flops profiler", "module_inject": "kernel injection",
           "autotuning": "the autotuner"}


def __getattr__(name: str) -> Any:
    if name in _ABSENT:
        raise AttributeError(f"deepspeed.{name} ({_ABSENT[name]}): not in meshrun's "
                             f"engine.deepspeed, which takes data parallelism, ZeRO and "
                             f"PipelineModule; for tensor parallelism see engine.distribute")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ``from deepspeed.pipe import PipelineModule`` becomes ``deepspeed.pipe.PipelineModule``
# (and ``deepspeed.sequence.layer.DistributedAttention``: Ulysses, engine.ulysses)
sequence = deepspeed_sequence()
pipe = type(utils)(PipelineModule=PipelineModule, LayerSpec=LayerSpec,
                   TiedLayerSpec=TiedLayerSpec)




class DeepSpeedEngine(torch.nn.Module):
    """The model wrapped for data-parallel training (DeepSpeed's engine:
    ``module``, ``optimizer``, ``lr_scheduler``, ``global_steps``)."""

    def __init__(self, model: torch.nn.Module, cfg: Config, world: Any,
                 optimizer: Any, params: Any, lr_scheduler: Any) -> None:
        super().__init__()
        self.module = model
        self.cfg, self.world = cfg, world
        self.global_rank, self.world_size = world.rank, world.size
        self.dp_world_size = world.size
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.global_steps = self.global_samples = self.skipped_steps = self.micro_steps = 0
        self._norm: float | None = None
        self.job: Any = None
        trained = [p for p in model.parameters() if p.requires_grad]
        elsewhere = next((p.device for p in model.parameters() if p.device.type != "cpu"),
                         None)
        if cfg.offload and elsewhere is not None:
            raise ValueError(f"rank {world.rank}: deepspeed config: zero_optimization."
                             f"{cfg.offload[0]}: offload to the CPU of a model on {elsewhere}: "
                             f"not supported on meshrun (move the model to the CPU, or drop "
                             f"the offload)")
        experts = moe.deepspeed_checks(model, world.rank, cfg.zero_stage)
        self.job = zero_job(model, world, cfg.zero_stage)
        # made before stage 3 empties the others' shares: its buckets' shapes are whole
        # (ZeRO 2 and 3 with an optimizer: engine.ds_zero.OwnerReducer, below; MoE layers:
        # each expert's gradients over its expert-data-parallel group, engine.moe, at ZeRO 2
        # to its owner there, engine.ds_zero.MoEOwnerReducer)
        # (communication_data_type "fp16" / "bf16": each gradient rounded to it on the wire,
        # engine.ds_zero.OwnerReducer's ``wire``; MoE's: MoEOwnerReducer's, of no owner below
        # ZeRO 2)
        wire = dtype_of(cfg.comm_dtype)
        owned = cfg.zero_stage >= 2 and (optimizer is not None or cfg.optimizer is not None)
        self.reducer: Any = None if owned else \
            (moe.MoEGradReducer(world, trained) if wire is None else
             MoEOwnerReducer(world, trained, None, wire)) if experts else \
            collectives.GradReducer(world, trained) if wire is None else \
            OwnerReducer(world, trained, [None] * len(trained), wire)
        self._boundary = [False]
        self._index: dict[int, int] = {}    # each trained parameter's place (by id)
        self._hooked: dict[int, Any] = {}      # the parameters hooked (weak, by id)
        self._hook(trained)
        self.optimizer = zero_optimizer(cfg, world, self.job, optimizer, params, trained)
        if owned and experts:   # (ZeRO 2: each over its own part's group, engine.ds_zero)
            self.reducer = MoEOwnerReducer(world, trained, self.optimizer, wire)
        elif owned:
            # ZeRO 2 and 3: each gradient reduced to its owner alone, dropped on the others
            owner = {id(p): r for p, r in zip(self.optimizer.params, self.optimizer.owner)}
            self.reducer = OwnerReducer(self.job.grid.group("dp"), trained,
                                        [owner.get(id(p)) for p in trained], wire)
        # stage 3: each module's parameters gathered as it runs (engine.ds_zero), and the
        # model's parameters by name, as sharded (a new one, or a new shape, resharded:
        # engine.ds_zero.reshard)
        self._gathers = Gathers(self.job) if cfg.zero_stage == 3 else None
        self._layout = layout(self)
        if callable(lr_scheduler) and not hasattr(lr_scheduler, "step"):
            lr_scheduler = lr_scheduler(self.optimizer)     # (DeepSpeed's: a factory)
        # the user's optimizer, where ZeRO's wraps it: its scheduler sets its groups' lr,
        # handed on to ZeRO's after each step (_handed)
        self._client = optimizer if optimizer is not self.optimizer else None
        self.lr_scheduler = lr_scheduler
        if cfg.scheduler is not None:
            if self.optimizer is None:
                raise ValueError("deepspeed config: scheduler: needs an optimizer")
            self.lr_scheduler = SCHEDULERS[cfg.scheduler["type"]](
                self.optimizer, **cfg.scheduler.get("params", {}))
        f = cfg.fp16
        self.loss_scaler = None if f is None or f["loss_scale"] else DynamicLossScaler(
            2.0 ** f["initial_scale_power"], f["loss_scale_window"], f["min_loss_scale"],
            f["hysteresis"], f["consecutive_hysteresis"])
        self.dtype = torch.float16 if f is not None else \
            torch.bfloat16 if cfg.bf16 else None

    def _hook(self, trained: list[Any]) -> None:
        """``trained``'s places (the reducer's indices); each parameter's
        post-accumulate hook, once, reading its place when it fires."""
        self._index = {id(p): i for i, p in enumerate(trained)}
        for p in trained:
            if self._hooked.get(id(p), lambda: None)() is not p:
                self._hooked[id(p)] = weakref.ref(p)
                p.register_post_accumulate_grad_hook(
                    lambda p: self._ready(p, self._index[id(p)])
                    if self._boundary[0] and id(p) in self._index else None)

    def _ready(self, p: torch.Tensor, i: int) -> None:
        """A gradient made final in the boundary's backward: averaged over dp.
        A sparse one (``nn.Embedding(sparse=True)``, DeepSpeed's
        ``sparse_gradients``) is made dense first: the same average, and
        the optimizers here take dense gradients."""
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.to_dense()
        self.reducer.ready(i)

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are (DeepSpeed's: the rank's accelerator)."""
        return next(self.module.parameters()).device

    # ---- DeepSpeed's figures

    def train_batch_size(self) -> int:
        return self.cfg.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.cfg.micro_batch

    def gradient_accumulation_steps(self) -> int:
        return self.cfg.gas

    def zero_optimization_stage(self) -> int:
        return self.cfg.zero_stage

    def fp16_enabled(self) -> bool:
        return self.cfg.fp16 is not None

    def bfloat16_enabled(self) -> bool:
        return self.cfg.bf16

    @property
    def cur_scale(self) -> float:
        f = self.cfg.fp16
        if f is None:
            return 1.0
        return self.loss_scaler.cur_scale if self.loss_scaler else float(f["loss_scale"])

    loss_scale = cur_scale

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups] if self.optimizer else []

    def get_global_grad_norm(self) -> float | None:
        return self._norm

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.cfg.gas == 0

    # ---- the step

    def _computing(self) -> Any:
        """Stage 3: a forward's or backward's gathers (engine.ds_zero)."""
        return self._gathers.computing() if self._gathers is not None else \
            contextlib.nullcontext()

    def _release(self, ok: bool = True) -> None:
        """Stage 3: the step's window closed, the others' values dropped."""
        if self._gathers is not None:
            self._gathers.close(ok)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        training = self.training and torch.is_grad_enabled()
        if self._gathers is None:
            unchanged(self)
        elif self._gathers.kind is None:
            reshard(self)       # (a module or parameter put in since: sharded first)
        # (stage 3: a step's window opened by its first forward; an evaluation's forward
        # outside one opens and closes its own)
        opened = self._gathers is not None and self._gathers.open(kind=not training)
        cast = torch.autocast(next(self.module.parameters()).device.type, dtype=self.dtype) \
            if self.dtype is not None else contextlib.nullcontext()
        ok = False
        try:
            with cast, self._computing():
                out = self.module(*args, **kwargs)
            ok = True
            return out
        finally:
            if opened and not training or not ok:
                self._release(ok)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False,
                 scale_wrt_gas: bool = True) -> torch.Tensor:
        """``loss`` (this micro-batch's mean) divided by the accumulation
        steps and scaled (fp16), backward; on the boundary's micro-batch each
        gradient is averaged over dp as backward makes it final, all waited
        for here."""
        self._boundary[0] = self.is_gradient_accumulation_boundary()
        scaled = loss / self.cfg.gas if scale_wrt_gas and self.cfg.gas > 1 else loss
        if self.cfg.fp16 is not None:
            scaled = scaled.float() * self.cur_scale
        ok = False
        try:
            with self._computing():
                scaled.backward(retain_graph=retain_graph)
            if self._boundary[0]:
                self.reducer.wait()
            ok = True
        finally:    # (the hooks idle outside this engine's backward: another's on the model)
            if not ok:
                self._release(False)
            self._boundary[0] = False
        return loss

    def step(self) -> None:
        """At the boundary: (fp16) skip on an overflow, unscale; clip; step
        the optimizer and scheduler; zero the gradients. Else nothing but
        counting the micro-batch."""
        if self.is_gradient_accumulation_boundary():
            ok = False
            try:
                self._boundary_step()
                ok = True
            finally:
                self._release(ok)
            self.global_steps += 1
            self.global_samples += self.cfg.train_batch_size
            spp = self.cfg.steps_per_print
            if spp and self.global_steps % spp == 0 and self.global_rank == 0:
                mom = [g.get("betas", (g.get("momentum", 0.0),))[0]
                       for g in self.optimizer.param_groups] if self.optimizer else []
                print(f"[Rank 0] step={self.global_steps}, skipped={self.skipped_steps}, "
                      f"lr={self.get_lr()}, mom={mom}", flush=True)
        self.micro_steps += 1

    def _boundary_step(self) -> None:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if self.cfg.fp16 is not None:
            # (the gradients are the dp average: every rank finds the same; under ZeRO 2
            # and 3 each holds its share's: told to every rank)
            overflow = any(not bool(torch.isfinite(g).all()) for g in grads)
            if hasattr(self.reducer, "summed"):
                overflow = bool(self.reducer.summed(float(overflow)))
            if self.loss_scaler is not None:
                scale = self.loss_scaler.cur_scale
                self.loss_scaler.update_scale(overflow)
            else:
                scale = float(self.cfg.fp16["loss_scale"])
            if overflow:
                self.skipped_steps += 1
                self.zero_grad()
                if self.global_rank == 0:       # (DeepSpeed's words)
                    print(f"[deepspeed] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: "
                          f"{int(scale)}, reducing to {int(self.cur_scale)}", flush=True)
                return
            for g in grads:
                g.div_(scale)
        if self.cfg.gradient_clipping > 0:
            held = [p for p in self.module.parameters() if p.grad is not None]
            self._norm = self.reducer.clip(held, self.cfg.gradient_clipping) \
                if hasattr(self.reducer, "clip") else \
                float(torch.nn.utils.clip_grad_norm_(held, self.cfg.gradient_clipping))
        opt = self.optimizer
        if self.cfg.zero_stage >= 2 and opt is not None:     # (each keeps its share's)
            for p in self.module.parameters():
                if not opt.holds(p):
                    p.grad = None
        self._release()
        if opt is not None:
            opt.step()
        if self._client is not None:
            self._client._opt_called = True     # (torch's schedulers check it was stepped)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self._handed()
        self.zero_grad()

    def _handed(self, back: bool = False) -> None:
        """The user's optimizer's hyperparameters (its scheduler's lr) on the
        ZeRO optimizer that wraps it (``back``: the other way, after a load)."""
        if self._client is None:
            return
        pairs = zip(self._client.param_groups, self.optimizer.param_groups)
        for a, b in pairs:
            src, dst = (b, a) if back else (a, b)
            dst.update({k: v for k, v in src.items() if k != "params"})

    def zero_grad(self, set_to_none: bool = True) -> None:  # type: ignore[override]
        for p in self.module.parameters():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    # ---- checkpoints: one whole file, written by rank 0 (engine.ds_checkpoint)

    def _whole(self, fill: bool = True) -> Any:
        """Stage 3: every parameter's values for a while (collective); else nothing."""
        return self._gathers.whole(self.job, fill) if self._gathers is not None else \
            contextlib.nullcontext()

    def save_checkpoint(self, save_dir: str, tag: Any = None, client_state: Any = None,
                        save_latest: bool = True) -> bool:
        """``save_dir/tag/mp_rank_00_model_states.pt`` (tag default
        ``global_step<N>``): the whole model, optimizer, scheduler, loss
        scale, counters and ``client_state``; ``save_dir/latest`` names the
        tag. Collective: rank 0 writes."""
        return save(self, save_dir, tag, client_state, save_latest)

    def save_16bit_model(self, save_dir: str, save_filename: str = "pytorch_model.bin",
                         exclude_frozen_parameters: bool = False) -> bool:
        """``save_dir/save_filename``: the whole module's state_dict (gathered
        under ZeRO 3), its floating tensors in float16 under fp16, bfloat16
        under bf16 (DeepSpeed's module dtype), else as they are; rank 0
        writes. Collective."""
        return save_16bit(self, save_dir, save_filename, exclude_frozen_parameters)

    save_fp16_model = save_16bit_model

    def load_checkpoint(self, load_dir: str, tag: Any = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False) -> tuple[str | None, Any]:
        """Load what ``save_checkpoint`` wrote (any dp size, any ZeRO stage):
        ``(path, client_state)``; ``(None, None)`` where ``tag`` is None and
        ``load_dir/latest`` is missing, as DeepSpeed's. Every rank reads the file."""
        return load(self, load_dir, tag, load_module_strict, load_optimizer_states,
                    load_lr_scheduler_states, load_module_only)


def _dataloader(data: Any, cfg: Config, replicas: int, replica: int, collate_fn: Any) -> Any:
    sampler: Any = torch.utils.data.DistributedSampler(data, num_replicas=replicas,
                                                       rank=replica)
    return torch.utils.data.DataLoader(data, batch_size=cfg.micro_batch, sampler=sampler,
                                       collate_fn=collate_fn)


def _agreed(world: Any, config: Any, dp: int) -> Config:
    """``config`` parsed here and compared with every rank's (one
    all-gather): a rank's error, or another config, raises on every rank
    naming it (the others went on into collectives it never made)."""
    fault: Exception | None = None
    said: Any = None
    try:
        cfg = parse(config, dp)
        said = repr(cfg)
    except (TypeError, ValueError, OSError) as e:
        fault, said = e, None
    told = collectives.all_gather_object(world, [said, None if fault is None else
                                                 f"{type(fault).__name__}: {fault}"])
    if fault is not None:
        raise type(fault)(f"rank {world.rank}: {fault}") from fault
    bad = next((r for r, (_, e) in enumerate(told) if e is not None), None)
    if bad is not None:
        raise ValueError(f"rank {world.rank}: deepspeed.initialize: rank {bad} refused its "
                         f"config: {told[bad][1]}")
    other = next((r for r, (c, _) in enumerate(told) if c != said), None)
    if other is not None:
        raise ValueError(f"rank {world.rank}: deepspeed.initialize: rank {other}'s config "
                         f"differs from this rank's: {told[other][0]} and {said}")
    return cfg


def initialize(args: Any = None, model: torch.nn.Module | None = None, optimizer: Any = None,
               model_parameters: Iterable[Any] | None = None, training_data: Any = None,
               lr_scheduler: Any = None, mpu: Any = None, dist_init_required: Any = None,
               collate_fn: Any = None, config: Any = None, config_params: Any = None
               ) -> tuple[Any, Any, Any, Any]:
    """DeepSpeed's ``initialize``: ``(engine, optimizer, training_dataloader,
    lr_scheduler)``. ``config`` (or ``config_params``, or
    ``args.deepspeed_config``): a dict or a JSON file's path. Collective."""
    if model is None:
        raise ValueError("deepspeed.initialize: model= is required")
    if mpu is not None:
        raise ValueError("deepspeed.initialize: mpu= (model parallelism): not supported; "
                         "engine.distribute takes tensor and pipeline parallelism")
    config = config if config is not None else config_params
    if config is None:
        config = getattr(args, "deepspeed_config", None)
    if config is None:
        raise ValueError("deepspeed.initialize: no config (config=, config_params= or "
                         "args.deepspeed_config)")
    init_distributed()
    if args is not None and hasattr(args, "local_rank") and "LOCAL_RANK" in os.environ:
        args.local_rank = int(os.environ["LOCAL_RANK"])     # (as DeepSpeed's initialize)
    from collectives.torchdist import comm_of
    world = comm_of()
    pipe = isinstance(model, PipelineModule)
    cfg = _agreed(world, config, max(1, world.size // model.num_stages) if pipe else world.size)
    if lr_scheduler is not None and cfg.scheduler is not None:
        raise ValueError("deepspeed config: scheduler: given in the config and as "
                         "lr_scheduler= too; pass one")
    if isinstance(model, PipelineModule):
        peng = PipelineEngine(model, cfg, world, optimizer, lr_scheduler)
        if training_data is not None:       # this dp replica's share, read by train_batch()
            peng.training_dataloader = _dataloader(training_data, cfg, peng.dp_world_size,
                                                   peng.grid.coord("dp"), collate_fn)
        return peng, peng.optimizer, peng.training_dataloader, peng.lr_scheduler
    eng = DeepSpeedEngine(model, cfg, world, optimizer, model_parameters, lr_scheduler)
    ENGINES.add(eng)
    loader = None if training_data is None else _dataloader(
        training_data, cfg, world.size, world.rank, collate_fn)
    return eng, eng.optimizer, loader, eng.lr_scheduler
