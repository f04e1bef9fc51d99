"""DeepSpeed's pipeline API (``PipelineModule``, ``engine.train_batch``) on
``engine.distribute``: the layers an ``nn.Sequential``, cut over
``num_stages`` pp ranks (``partition_method`` as ``balance``), the rest of
the ranks dp replicas, one ``job.step`` a batch of
``gradient_accumulation_steps`` micro-batches (1F1B, as DeepSpeed's
``TrainSchedule``)::

    net = deepspeed.PipelineModule(layers=layers, num_stages=2, loss_fn=loss_fn)
    engine, _, _, _ = deepspeed.initialize(model=net, config=cfg)
    loss = engine.train_batch(data_iter)     # each next(): (inputs, labels) of a micro-batch

ZeRO 0 and 1 only (DeepSpeed's pipeline refuses 2 and 3 too); bf16, not
fp16. Checkpoints: the job's whole model and optimizer state by name, one
file (engine.ds_checkpoint's layout), loadable on another grid.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Iterable

import torch

import mesh

from .ds_config import SCHEDULERS, Config, optimizer_class

__all__ = ["PipelineModule", "LayerSpec", "TiedLayerSpec", "PipelineEngine"]


class LayerSpec:
    """A layer to build: ``typename(*args, **kwargs)`` (built on every rank:
    ``engine.distribute`` keeps a rank's own stages' layers)."""

    def __init__(self, typename: type, *args: Any, **kwargs: Any) -> None:
        self.typename, self.args, self.kwargs = typename, args, kwargs

    def build(self) -> torch.nn.Module:
        return self.typename(*self.args, **self.kwargs)


class TiedLayerSpec(LayerSpec):
    """Refused: a weight shared between stages is one parameter in both
    layers here (``head.weight = embed.weight``), README's DeepSpeed table."""

    def __init__(self, key: str, typename: type, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("deepspeed.TiedLayerSpec: not supported; tie the weight "
                                  "in the layers (one Parameter in both) and pass them built")


class _Call(torch.nn.Module):
    """A plain callable among the layers (DeepSpeed takes ``lambda x: ...``)."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Any) -> Any:
        return self.fn(x)


class PipelineModule(torch.nn.Sequential):
    """DeepSpeed's ``PipelineModule``: its layers (modules, ``LayerSpec``s,
    callables) in order, ``num_stages``, ``loss_fn(outputs, labels)``,
    ``partition_method`` ("parameters", "uniform", "type:REGEX"),
    ``activation_checkpoint_interval`` (> 0: each stage recomputes)."""
    loss_fn: Callable[[Any, Any], Any]

    def __init__(self, layers: Iterable[Any], num_stages: int | None = None,
                 topology: Any = None, loss_fn: Callable[[Any, Any], Any] | None = None,
                 partition_method: str = "parameters",
                 activation_checkpoint_interval: int = 0, **ignored: Any) -> None:
        built = [x.build() if isinstance(x, LayerSpec) else
                 x if isinstance(x, torch.nn.Module) else _Call(x) for x in layers]
        super().__init__(*built)
        if topology is not None:
            raise ValueError("PipelineModule(topology=...): not supported; give num_stages")
        if num_stages is None or num_stages < 1:
            raise ValueError(f"PipelineModule: num_stages={num_stages!r}: the pipeline's "
                             f"stages, an int >= 1")
        if loss_fn is None:
            raise ValueError("PipelineModule: loss_fn= is required for train_batch")
        method = partition_method.lower()
        if method not in ("parameters", "uniform") and not method.startswith("type:"):
            raise ValueError(f"PipelineModule: partition_method={partition_method!r}: "
                             f"'parameters', 'uniform' or 'type:REGEX'")
        self.num_stages = num_stages
        # (not registered: a loss module, torch.nn.CrossEntropyLoss(), is no layer of the
        # Sequential)
        self.__dict__["loss_fn"] = loss_fn
        self.partition_method = method if not method.startswith("type:") else partition_method
        self.recompute = activation_checkpoint_interval > 0


class PipelineEngine:
    """``initialize``'s engine for a ``PipelineModule``: ``train_batch``,
    ``eval_batch``, the job (``engine.job``), its grid (``engine.grid``:
    ``grid.coord("dp")`` picks a replica's data), ``is_first_stage()``..."""

    def __init__(self, model: PipelineModule, cfg: Config, world: Any, optimizer: Any,
                 lr_scheduler: Any) -> None:
        pp = model.num_stages
        if world.size % pp:
            raise ValueError(f"rank {world.rank}: PipelineModule(num_stages={pp}) on "
                             f"{world.size} ranks: the ranks must be a multiple of it")
        if cfg.zero_stage > 1:
            raise ValueError(f"deepspeed config: zero_optimization.stage={cfg.zero_stage}: "
                             f"a PipelineModule takes ZeRO 0 or 1 (as DeepSpeed's)")
        if cfg.fp16 is not None:
            raise ValueError("deepspeed config: fp16: not supported with a PipelineModule "
                             "(bf16 is)")
        import engine
        self.cfg, self.world, self.module = cfg, world, model
        self.grid = mesh.grid(world, dp=world.size // pp, pp=pp)
        self.dp_world_size = world.size // pp
        self.job = engine.distribute(model, self.grid, schedule="1f1b", microbatches=cfg.gas,
                                     balance=model.partition_method, loss_fn=model.loss_fn,
                                     recompute=model.recompute, verbose=False)
        self.stage_id = self.grid.coord("pp")
        params = self.job.parameters()
        if optimizer is not None and cfg.optimizer is not None:
            raise ValueError("deepspeed config: optimizer: given in the config and as "
                             "optimizer= too; pass one")
        if optimizer is not None:
            cls, hyper = type(optimizer), dict(optimizer.defaults)
        elif cfg.optimizer is not None:
            cls, hyper = optimizer_class(cfg.optimizer)
        if optimizer is None and cfg.optimizer is None:
            self.optimizer: Any = None
        elif cfg.zero_stage == 1:
            self.optimizer = engine.ZeroRedundancyOptimizer(params, cls, self.job, **hyper)
        else:       # (this rank's stages' parameters, not the whole model's)
            self.optimizer = cls(params, **hyper)
        self.lr_scheduler = lr_scheduler(self.optimizer) if callable(lr_scheduler) and \
            not hasattr(lr_scheduler, "step") else lr_scheduler
        if cfg.scheduler is not None:
            self.lr_scheduler = SCHEDULERS[cfg.scheduler["type"]](
                self.optimizer, **cfg.scheduler.get("params", {}))
        self.global_steps = self.global_samples = 0
        self.training_dataloader: Any = None    # initialize(training_data=...)'s
        self._data: Any = None
        self._since = time.perf_counter()   # (steps_per_print's iter time, DeepSpeed's line)
        self.loss_scaler = None
        self.skipped_steps = 0

    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    def is_last_stage(self) -> bool:
        return self.stage_id == self.module.num_stages - 1

    def train_batch_size(self) -> int:
        return self.cfg.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.cfg.micro_batch

    def gradient_accumulation_steps(self) -> int:
        return self.cfg.gas

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups] if self.optimizer else []

    def _batch(self, data_iter: Any) -> tuple[Any, Any]:
        """This replica's ``gradient_accumulation_steps`` micro-batches, joined."""
        xs, ys = zip(*[next(data_iter) for _ in range(self.cfg.gas)])
        return torch.cat(list(xs)), torch.cat(list(ys))

    def _cast(self) -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.cfg.bf16 else \
            contextlib.nullcontext()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def train_batch(self, data_iter: Any = None) -> torch.Tensor:
        """One step over the global batch: its mean loss on every rank (as
        DeepSpeed's, there on the last stage's ranks). Without ``data_iter``,
        ``initialize(training_data=...)``'s loader, repeated (DeepSpeed's)."""
        if data_iter is None:
            if self.training_dataloader is None:
                raise ValueError(f"rank {self.world.rank}: train_batch(): no data_iter, and "
                                 f"initialize had no training_data")
            if self._data is None:
                from .ds_compat import RepeatingLoader
                self._data = RepeatingLoader(self.training_dataloader)
            data_iter = self._data
        x, y = self._batch(data_iter)
        if self.optimizer is not None:
            self.optimizer.zero_grad()
        with self._cast():
            loss = self.job.step(x, y)
        if self.cfg.gradient_clipping > 0:
            self.job.clip_grad_norm_(self.cfg.gradient_clipping)
        if self.optimizer is not None:
            self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_steps += 1
        self.global_samples += self.cfg.train_batch_size
        spp = self.cfg.steps_per_print
        if spp and self.global_steps % spp == 0 and self.world.rank == 0:
            took = (time.perf_counter() - self._since) / spp
            self._since = time.perf_counter()
            print(f"steps: {self.global_steps} loss: {loss:0.4f} iter time (s): {took:0.3f} "
                  f"samples/sec: {self.cfg.train_batch_size / took:0.3f}", flush=True)
        return torch.tensor(loss)

    def eval_batch(self, data_iter: Any, return_logits: bool = False, **_: Any) -> Any:
        """The global batch's mean loss (and with ``return_logits`` the last
        stage's outputs: ``(loss, logits)``), no gradient."""
        x, y = self._batch(data_iter)
        with self._cast():
            out = self.job.eval_step(x, y, outputs=return_logits)
        if return_logits:
            return torch.tensor(out[0]), out[1]
        return torch.tensor(out)

    # ---- checkpoints: the job's whole model and optimizer, by name, rank 0 writes

    def save_checkpoint(self, save_dir: str, tag: Any = None, client_state: Any = None,
                        save_latest: bool = True) -> bool:
        from .ds_checkpoint import written
        tag = f"global_step{self.global_steps}" if tag is None else str(tag)
        module = self.job.state_dict()
        optim = None if self.optimizer is None else \
            self.job.optimizer_state_dict(self.optimizer)
        return written(self, save_dir, tag, save_latest, lambda: dict(
            client_state or {}, module=module, optimizer=optim, global_steps=self.global_steps,
            global_samples=self.global_samples, lr_scheduler=None if self.lr_scheduler is None
            else self.lr_scheduler.state_dict(), ds_version="meshrun"))

    @property
    def global_rank(self) -> int:
        return int(self.world.rank)

    def load_checkpoint(self, load_dir: str, tag: Any = None, **_: Any
                        ) -> tuple[str | None, Any]:
        from .ds_checkpoint import _OWN_KEYS, FILE, _told
        if tag is None:
            latest = os.path.join(load_dir, "latest")
            if not os.path.isfile(latest):
                return None, None
            with open(latest) as f:
                tag = f.read().strip()
        path = os.path.join(load_dir, str(tag), FILE)
        ck: dict[str, Any] = {}
        error: BaseException | None = None
        try:
            ck = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            error = e
        _told(self, error, f"load_checkpoint({path!r})")
        self.job.load_state_dict(ck["module"])
        if self.optimizer is not None and ck["optimizer"] is not None:
            self.job.load_optimizer_state_dict(self.optimizer, ck["optimizer"])
        if self.lr_scheduler is not None and ck["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(ck["lr_scheduler"])
        self.global_steps, self.global_samples = ck["global_steps"], ck["global_samples"]
        return path, {k: v for k, v in ck.items() if k not in _OWN_KEYS}
