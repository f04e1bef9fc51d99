"""DeepSpeed's pipeline API (``PipelineModule``, ``engine.train_batch``) on
``engine.distribute``: the layers an ``nn.Sequential``, cut over
``num_stages`` pp ranks (``partition_method`` as ``balance``), the rest of
the ranks dp replicas, one ``job.step`` a batch of
``gradient_accumulation_steps`` micro-batches (1F1B, as DeepSpeed's
``TrainSchedule``)::

    net = deepspeed.PipelineModule(layers=layers, num_stages=2, loss_fn=loss_fn)
    engine, _, _, _ = deepspeed.initialize(model=net, config=cfg)
    loss = engine.train_batch(data_iter)     # each next(): (inputs, labels) of a micro-batch

As DeepSpeed's, only the first and last stages read the iterator (the
inputs, the labels); a ``TiedLayerSpec``'s places on one stage are one
module, a later stage's its own copy whose ``tied_weight_attr`` alone is
tied, kept equal across the stages holding it (engine.distribute's ties);
``partition_method`` cuts as DeepSpeed's ``partition_uniform`` and
``partition_balanced``, handed to ``distribute`` as layer counts.
ZeRO 0 and 1 only (DeepSpeed's pipeline refuses 2 and 3 too); bf16, not
fp16; ``communication_data_type`` as the plain engine's (engine.grad_wire).
Checkpoints: the job's whole model and optimizer state by name, one
file (engine.ds_checkpoint's layout), loadable on another grid.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterable

import torch

import mesh

from .ds_config import SCHEDULERS, Config, optimizer_class
from .ds_partition import balanced as _balanced
from .ds_partition import uniform as _uniform
from .grad_wire import dtype_of

__all__ = ["PipelineModule", "LayerSpec", "TiedLayerSpec", "PipelineEngine"]


class LayerSpec:
    """A layer to build: ``typename(*args, **kwargs)`` (built on every rank:
    ``engine.distribute`` keeps a rank's own stages' layers)."""

    def __init__(self, typename: type, *args: Any, **kwargs: Any) -> None:
        self.typename, self.args, self.kwargs = typename, args, kwargs

    def build(self) -> torch.nn.Module:
        return self.typename(*self.args, **self.kwargs)


class TiedLayerSpec(LayerSpec):
    """DeepSpeed's tied layer: the layers of one ``key`` on one stage are
    one module, built at the first (an embedding), called again at the
    others (an output head), there by ``forward_fn(module, x)`` where given
    (``lambda module, x: x @ module.weight.t()``). A later stage holding
    the key gets a copy of that module whose ``tied_weight_attr`` (a name,
    or a list of them) is the first's parameter, the rest its own (an
    output head's bias), as DeepSpeed ties that attribute alone across
    stages; ``engine.distribute`` keeps the tied parameter's copies equal,
    their gradients summed (README "Tied weights")."""

    def __init__(self, key: str, typename: type, *args: Any,
                 forward_fn: Callable[[Any, Any], Any] | None = None,
                 tied_weight_attr: str | list[str] = "weight", **kwargs: Any) -> None:
        super().__init__(typename, *args, **kwargs)
        self.key, self.forward_fn, self.tied_weight_attr = key, forward_fn, tied_weight_attr

    def attrs(self) -> list[str]:
        a = self.tied_weight_attr
        return [a] if isinstance(a, str) else list(a)


class _TiedCall(torch.nn.Module):
    """A tied layer called by its ``forward_fn`` (the module a submodule:
    its parameters this layer's, the tied ones)."""

    def __init__(self, module: torch.nn.Module, fn: Callable[[Any, Any], Any]) -> None:
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, x: Any) -> Any:
        return self.fn(self.module, x)


def _built(layers: Iterable[Any]) -> tuple[list[torch.nn.Module], list[str], list[Any]]:
    """The layers as modules (a ``TiedLayerSpec``'s key's module built once),
    the class name DeepSpeed's ``type:REGEX`` matches each by (a spec's
    ``typename``, a module's class, a function's ``__name__``) and each
    layer's ``TiedLayerSpec`` (None for the others)."""
    tied: dict[str, torch.nn.Module] = {}
    out: list[torch.nn.Module] = []
    names: list[str] = []
    specs: list[Any] = []
    for x in layers:
        if isinstance(x, TiedLayerSpec):
            if x.key not in tied:
                tied[x.key] = x.build()
                miss = [a for a in x.attrs() if not isinstance(
                    _attr(tied[x.key], a), torch.nn.Parameter)]
                if miss or not x.attrs():
                    raise ValueError(f"TiedLayerSpec({x.key!r}, {x.typename.__name__}): "
                                     f"the module has no parameter {(miss or [''])[0]!r} "
                                     f"(tied_weight_attr)")
            m = tied[x.key]
            out.append(m if x.forward_fn is None else _TiedCall(m, x.forward_fn))
        else:
            out.append(x.build() if isinstance(x, LayerSpec) else
                       x if isinstance(x, torch.nn.Module) else _Call(x))
        names.append(x.typename.__name__ if isinstance(x, LayerSpec) else
                     type(x).__name__ if isinstance(x, torch.nn.Module) else
                     getattr(x, "__name__", type(x).__name__))
        specs.append(x if isinstance(x, TiedLayerSpec) else None)
    return out, names, specs


def _attr(m: Any, name: str) -> Any:
    """``m``'s attribute by a dotted name (None where missing)."""
    for part in name.split("."):
        m = getattr(m, part, None)
    return m


def _tied_across(layers: list[torch.nn.Module], specs: list[Any],
                 counts: list[int]) -> list[torch.nn.Module]:
    """``layers`` with each tied key's places on a later stage than its
    first given that stage's own copy of the module, whose
    ``tied_weight_attr`` parameters are the first's (DeepSpeed's: each
    stage builds the module, the attribute alone tied across stages)."""
    stage = [s for s, n in enumerate(counts) for _ in range(n)]
    first: dict[str, int] = {}
    copies: dict[tuple[str, int], torch.nn.Module] = {}
    out = list(layers)
    for i, spec in enumerate(specs):
        if spec is None:
            continue
        j = first.setdefault(spec.key, i)
        if stage[i] == stage[j]:
            continue
        base: Any = layers[j].module if isinstance(layers[j], _TiedCall) else layers[j]
        if (spec.key, stage[i]) not in copies:
            import copy
            made = copy.deepcopy(base)
            for a in spec.attrs():
                owner, _, leaf = a.rpartition(".")
                setattr(_attr(made, owner) if owner else made, leaf, _attr(base, a))
            copies[spec.key, stage[i]] = made
        c = copies[spec.key, stage[i]]
        out[i] = c if spec.forward_fn is None else _TiedCall(c, spec.forward_fn)
    return out


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
    ``partition_method`` ("parameters", "uniform", "type:REGEX": cut as
    DeepSpeed cuts), ``activation_checkpoint_interval`` (1: each layer
    recomputes, ``recompute="*"``; N more: ``recompute=True, layered=N``,
    each stage's layers recomputed in runs of N from its first, the last
    shorter, as DeepSpeed's checkpoints them)."""
    loss_fn: Callable[[Any, Any], Any]

    def __init__(self, layers: Iterable[Any], num_stages: int | None = None,
                 topology: Any = None, loss_fn: Callable[[Any, Any], Any] | None = None,
                 partition_method: str = "parameters",
                 activation_checkpoint_interval: int = 0, **ignored: Any) -> None:
        built, classes, specs = _built(layers)
        super().__init__(*built)
        self._classes = classes
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
        n = activation_checkpoint_interval
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"PipelineModule: activation_checkpoint_interval={n!r}: the "
                             f"layers recomputed together, an int >= 0 (0: none)")
        # 1: each layer recomputes on its own (DeepSpeed's every layer checkpointed);
        # N more: each stage's layers in runs of N (distribute's layered=N)
        self.recompute: bool | str = "*" if n == 1 else n > 1
        self.layered: int | None = n if n > 1 else None
        if any(specs):      # (the cut known: a later stage's tied places get their copy)
            for i, layer in enumerate(_tied_across(built, specs, self._counts())):
                self[i] = layer

    def _counts(self) -> list[int]:
        """Layers per stage by ``partition_method``, as DeepSpeed cuts: "uniform"
        its ``partition_uniform``; "parameters" its ``partition_balanced`` of
        each layer's trainable parameters (a tied layer's at each place);
        "type:REGEX" the same of 1 for each layer whose class matches."""
        n, method = len(self), self.partition_method
        if method == "uniform":
            return _uniform(n, self.num_stages)
        if method == "parameters":
            return _balanced([float(sum(p.numel() for p in layer.parameters()
                                        if p.requires_grad)) for layer in self],
                             self.num_stages)
        from .costs import by_type
        weights = by_type(method, [[c] for c in self._classes]).weights
        return _balanced([float(w) for w in weights], self.num_stages)


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
                                     balance=model._counts(), loss_fn=model.loss_fn,
                                     recompute=model.recompute, layered=model.layered,
                                     verbose=False)
        self.stage_id = self.grid.coord("pp")
        # communication_data_type "fp16" / "bf16": the dp average in it, as the plain
        # engine's (engine.grad_wire)
        self.job.pipeline.grad_wire = dtype_of(cfg.comm_dtype)
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

    def _batch(self, data_iter: Any, loader: bool = True) -> tuple[Any, Any]:
        """This replica's ``gradient_accumulation_steps`` micro-batches, joined,
        read where DeepSpeed reads them: the first stage's inputs, the last
        stage's labels (None for the other); a middle stage reads nothing,
        its ``data_iter`` may be None (``engine.distribute``'s job follows
        the first stage's inputs there)."""
        first, last = self.is_first_stage(), self.is_last_stage()
        if not (first or last):
            return None, None
        if data_iter is None:
            if self.training_dataloader is None or not loader:
                what = "train_batch" if loader else "eval_batch"
                raise ValueError(f"rank {self.world.rank}: {what}(): no data_iter on pp "
                                 f"stage {self.stage_id} of {self.module.num_stages} (the "
                                 f"first stage reads the inputs, the last the labels)"
                                 + (", and initialize had no training_data" if loader else ""))
            if self._data is None:
                from .ds_compat import RepeatingLoader
                self._data = RepeatingLoader(self.training_dataloader)
            data_iter = self._data
        xs, ys = zip(*[next(data_iter) for _ in range(self.cfg.gas)])
        return (torch.cat(list(xs)) if first else None), (torch.cat(list(ys)) if last else None)

    def _cast(self) -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.cfg.bf16 else \
            contextlib.nullcontext()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def train_batch(self, data_iter: Any = None) -> torch.Tensor:
        """One step over the global batch: its mean loss on every rank (as
        DeepSpeed's, there on the last stage's ranks). Read on the first and
        last stages only (a middle stage's ``data_iter`` may be None); there,
        without ``data_iter``, ``initialize(training_data=...)``'s loader,
        repeated (DeepSpeed's)."""
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

    def eval_batch(self, data_iter: Any = None, return_logits: bool = False, **_: Any) -> Any:
        """The global batch's mean loss (and with ``return_logits`` the last
        stage's outputs: ``(loss, logits)``), no gradient; ``data_iter`` read
        as ``train_batch`` reads it (None on a middle stage)."""
        x, y = self._batch(data_iter, loader=False)
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
        from .ds_checkpoint import _OWN_KEYS, read
        path, ck = read(self, load_dir, tag)
        if path is None:
            return None, None
        self.job.load_state_dict(ck["module"])
        if self.optimizer is not None and ck["optimizer"] is not None:
            self.job.load_optimizer_state_dict(self.optimizer, ck["optimizer"])
        if self.lr_scheduler is not None and ck["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(ck["lr_scheduler"])
        self.global_steps, self.global_samples = ck["global_steps"], ck["global_samples"]
        return path, {k: v for k, v in ck.items() if k not in _OWN_KEYS}
