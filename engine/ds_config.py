"""DeepSpeed's JSON config read for engine.deepspeed: the batch sizes, the
optimizer and scheduler, clipping, ZeRO, fp16's dynamic loss scale and bf16.

Pure functions and small classes (no message): ``parse`` checks every key
and names the one it refuses; the LR schedules and the loss scaler follow
DeepSpeed's ``lr_schedules.py`` and ``DynamicLossScaler`` step for step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any

__all__ = ["Config", "parse", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR",
           "DynamicLossScaler", "SCHEDULERS", "optimizer_class"]

# keys that change nothing a run computes (DeepSpeed's monitors and profilers): a warning
COSMETIC = {"tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "flops_profiler",
            "memory_breakdown", "dump_state", "wall_clock_breakdown", "timers"}
ZERO_KNOBS = {"stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
              "stage3_max_live_parameters"}
# ZeRO keys whose effect meshrun's ZeRO has anyway (overlap, whole checkpoints) or that tune
# DeepSpeed's own buffers: taken, changing nothing
ZERO_TAKEN = {"overlap_comm", "contiguous_gradients", "reduce_scatter", "allgather_partitions",
              "allgather_bucket_size", "reduce_bucket_size", "round_robin_gradients",
              "stage3_gather_16bit_weights_on_model_save", "load_from_fp32_weights"}
FP16_KEYS = {"enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window",
             "hysteresis", "consecutive_hysteresis", "min_loss_scale",
             "fp16_master_weights_and_grads"}
# top-level keys whose effect this engine has anyway or that tune what it does not make:
# taken, changing nothing (README's DeepSpeed table gives each one's reason)
TAKEN = {"prescale_gradients", "gradient_predivide_factor", "sparse_gradients",
         "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
         "activation_checkpointing"}
# deepspeed.checkpointing's settings: its checkpoint is torch's, so none changes a result
ACTIVATION_KEYS = {"partition_activations", "cpu_checkpointing", "contiguous_memory_optimization",
                   "number_checkpoints", "synchronize_checkpoint_boundary", "profile"}
OFFLOAD_KEYS = {"device", "pin_memory", "buffer_count", "buffer_size", "fast_init", "ratio",
                "max_in_cpu", "nvme_path", "pipeline", "pipeline_read", "pipeline_write"}
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu",
              "gradient_accumulation_steps")
OPTIMIZERS = ("Adam", "AdamW", "SGD")


@dataclasses.dataclass(frozen=True)
class Config:
    """A checked config: the three batch figures resolved as DeepSpeed's
    ``_set_batch_related_parameters`` resolves them at ``world_size``."""
    train_batch_size: int
    micro_batch: int
    gas: int
    optimizer: dict[str, Any] | None = None      # {"type": ..., "params": {...}}
    scheduler: dict[str, Any] | None = None
    gradient_clipping: float = 0.0
    zero_stage: int = 0
    zero_knobs: dict[str, Any] = dataclasses.field(default_factory=dict)
    fp16: dict[str, Any] | None = None           # FP16_KEYS with DeepSpeed's defaults
    bf16: bool = False
    steps_per_print: int | None = 10
    offload: tuple[str, ...] = ()       # the zero_optimization keys offloading to "cpu"
    comm_dtype: str | None = None       # communication_data_type "fp16" / "bf16" (None: fp32)


def _read(config: Any) -> dict[str, Any]:
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            config = json.load(f)
    if not isinstance(config, dict):
        raise TypeError(f"deepspeed config: a dict or the path of a JSON file, not "
                        f"{type(config).__name__}")
    return dict(config)


def _int(key: str, v: Any, least: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v) \
            or int(v) < least:
        raise ValueError(f"deepspeed config: {key}={v!r}: an integer >= {least}")
    return int(v)


def _enabled(key: str, v: Any) -> bool:
    if not isinstance(v, dict):
        raise ValueError(f"deepspeed config: {key}={v!r}: a dict such as {{\"enabled\": true}}")
    return bool(v.get("enabled", False))


def _on(v: Any) -> bool:
    """A monitor's setting asks for something: true, or a dict not disabled."""
    return bool(v.get("enabled", True)) if isinstance(v, dict) else bool(v)


def _batches(cfg: dict[str, Any], world_size: int) -> tuple[int, int, int]:
    """DeepSpeed's resolution of the three figures, then its consistency check."""
    tb = cfg.get("train_batch_size")
    mb = cfg.get("train_micro_batch_size_per_gpu")
    ga = cfg.get("gradient_accumulation_steps")
    tb, mb, ga = [None if v is None else _int(k, v) for k, v in (
        ("train_batch_size", tb), ("train_micro_batch_size_per_gpu", mb),
        ("gradient_accumulation_steps", ga))]
    if tb is not None and mb is not None and ga is not None:
        pass
    elif tb is not None and mb is not None:
        ga = tb // mb // world_size
    elif tb is not None and ga is not None:
        mb = tb // world_size // ga
    elif mb is not None and ga is not None:
        tb = mb * ga * world_size
    elif tb is not None:
        ga, mb = 1, tb // world_size
    elif mb is not None:
        tb, ga = mb * world_size, 1
    else:
        raise ValueError("deepspeed config: Either train_batch_size or "
                         "train_micro_batch_size_per_gpu needs to be provided")
    assert tb is not None and mb is not None and ga is not None
    if tb != mb * ga * world_size or mb < 1 or ga < 1:
        raise ValueError(f"deepspeed config: Check batch related parameters. train_batch_size "
                         f"is not equal to micro_batch_per_gpu * gradient_acc_step * "
                         f"world_size {tb} != {mb} * {ga} * {world_size}")
    return tb, mb, ga


def _zero(z: Any) -> tuple[int, dict[str, Any]]:
    if not isinstance(z, dict):
        raise ValueError(f"deepspeed config: zero_optimization={z!r}: a dict with \"stage\"")
    stage = z.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed config: zero_optimization.stage={stage!r}: 0, 1, 2 or 3")
    for k in z:
        if k not in ZERO_KNOBS | ZERO_TAKEN | {"stage", "offload_optimizer", "offload_param",
                                               "cpu_offload"}:
            raise ValueError(f"deepspeed config: zero_optimization.{k}: not supported")
    return stage, {k: z[k] for k in ZERO_KNOBS if k in z}


def _offload(z: dict[str, Any]) -> tuple[str, ...]:
    """The ``zero_optimization`` keys that offload to the CPU: a CPU model's
    state is there already (the engine refuses them for a model elsewhere);
    ``"nvme"`` is refused here, naming the key."""
    out = []
    if z.get("cpu_offload", False):     # (DeepSpeed's older spelling of offload_optimizer)
        out.append("cpu_offload")
    for k in ("offload_optimizer", "offload_param"):
        v = z.get(k)
        if v is None:
            continue
        if not isinstance(v, dict) or set(v) - OFFLOAD_KEYS:
            raise ValueError(f"deepspeed config: zero_optimization.{k}={v!r}: a dict such as "
                             f"{{\"device\": \"cpu\"}}")
        device = v.get("device", "none")
        if device == "cpu":
            out.append(k)
        elif device not in ("none", None):
            raise ValueError(f"deepspeed config: zero_optimization.{k}.device={device!r}: "
                             f"not supported on meshrun (\"cpu\", where a CPU model's state "
                             f"is anyway, or \"none\")")
    return tuple(out)


def _activation(a: Any) -> None:
    """``activation_checkpointing``: deepspeed.checkpointing's settings,
    checked; none changes a result (its checkpoint is torch's)."""
    if not isinstance(a, dict):
        raise ValueError(f"deepspeed config: activation_checkpointing={a!r}: a dict")
    for k, v in a.items():
        if k not in ACTIVATION_KEYS:
            raise ValueError(f"deepspeed config: activation_checkpointing.{k}: not supported")
        if k == "number_checkpoints":
            if v is not None:
                _int(f"activation_checkpointing.{k}", v)
        elif not isinstance(v, bool):
            raise ValueError(f"deepspeed config: activation_checkpointing.{k}={v!r}: "
                             f"true or false")


def _autos(cfg: dict[str, Any]) -> dict[str, Any]:
    """``"auto"`` values (the HF Trainer's, which fills them in before
    DeepSpeed reads the config): a batch figure's is left for DeepSpeed's
    resolution from the others, a ZeRO tuning knob's is its default; any
    other raises naming the key, as nothing here can know the value."""
    out = {k: v for k, v in cfg.items() if not (k in BATCH_KEYS and v == "auto")}
    z = out.get("zero_optimization")
    if isinstance(z, dict):
        out["zero_optimization"] = {k: v for k, v in z.items() if not (
            v == "auto" and k in ZERO_KNOBS | ZERO_TAKEN)}

    def walk(v: Any, path: str) -> None:
        if isinstance(v, dict):
            for k, w in v.items():
                walk(w, f"{path}.{k}" if path else str(k))
        elif isinstance(v, str) and v == "auto":
            raise ValueError(f"deepspeed config: {path}=\"auto\": only the HF Trainer "
                             f"fills \"auto\" in (from its own arguments); give the value")
    walk(out, "")
    return out


def _typed(cfg: dict[str, Any], key: str, types: Any) -> Any:
    """``cfg[key]`` (the optimizer's or the scheduler's), None or checked:
    ``{"type": one of types, "params": {...}}``."""
    v = cfg.get(key)
    if v is not None and (not isinstance(v, dict) or v.get("type") not in types
                          or set(v) - {"type", "params"}):
        raise ValueError(f"deepspeed config: {key}={v!r}: {{\"type\": one of "
                         f"{', '.join(types)}, \"params\": {{...}}}}")
    return v


def _fp16(f: dict[str, Any]) -> dict[str, Any]:
    bad = sorted(set(f) - FP16_KEYS)
    if bad:
        raise ValueError(f"deepspeed config: fp16.{bad[0]}: not supported")
    if f.get("fp16_master_weights_and_grads", False):
        raise ValueError("deepspeed config: fp16.fp16_master_weights_and_grads: not supported "
                         "(the weights and gradients stay float32 here: leave it false)")
    out = {"loss_scale": 0.0, "initial_scale_power": 16, "loss_scale_window": 1000,
           "hysteresis": 2, "consecutive_hysteresis": False, "min_loss_scale": 1.0}
    out.update({k: v for k, v in f.items() if k not in (
        "enabled", "auto_cast", "fp16_master_weights_and_grads")})
    return out


def parse(config: Any, world_size: int) -> Config:
    """``config`` (a dict, or a JSON file's path) checked at ``world_size``
    dp ranks: ValueError naming the first key refused (unknown, or a value
    out of range); a warning for the cosmetic ones (monitors, profilers)."""
    cfg = _autos(_read(config))
    tb, mb, ga = _batches(cfg, world_size)
    known = {"train_batch_size", "train_micro_batch_size_per_gpu",
             "gradient_accumulation_steps", "optimizer", "scheduler", "gradient_clipping",
             "zero_optimization", "fp16", "bf16", "bfloat16", "steps_per_print",
             "communication_data_type"} | TAKEN
    for k in cfg:
        if k in COSMETIC and _on(cfg[k]):      # (one turned off: nothing to say)
            warnings.warn(f"deepspeed config: {k}: ignored on meshrun (it changes nothing "
                          f"a run computes)", stacklevel=3)
        elif k not in known | COSMETIC:
            raise ValueError(f"deepspeed config: {k}: not supported")
    opt = _typed(cfg, "optimizer", OPTIMIZERS)
    sch = _typed(cfg, "scheduler", SCHEDULERS)
    clip = cfg.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise ValueError(f"deepspeed config: gradient_clipping={clip!r}: a number >= 0")
    stage, knobs = _zero(cfg.get("zero_optimization", {"stage": 0}))
    offload = _offload(cfg.get("zero_optimization", {}))
    _activation(cfg.get("activation_checkpointing", {}))
    _taken(cfg)
    fp16 = _fp16(cfg["fp16"]) if _enabled("fp16", cfg.get("fp16", {})) else None
    bf16 = _enabled("bf16", cfg.get("bf16", cfg.get("bfloat16", {})))
    if fp16 is not None and bf16:
        raise ValueError("deepspeed config: fp16 and bf16: enable one of them, not both")
    spp = cfg.get("steps_per_print", 10)
    comm = {"fp16": "fp16", "bf16": "bf16", "bfp16": "bf16"}.get(
        cfg.get("communication_data_type") or "")
    return Config(tb, mb, ga, opt, sch, float(clip), stage, knobs, fp16, bf16,
                  None if spp is None else _int("steps_per_print", spp), offload, comm)


def _taken(cfg: dict[str, Any]) -> None:
    """The values of the keys taken that change nothing, checked as DeepSpeed's."""
    for k in ("prescale_gradients", "sparse_gradients", "zero_allow_untested_optimizer",
              "zero_force_ds_cpu_optimizer"):
        if k in cfg and not isinstance(cfg[k], bool):
            raise ValueError(f"deepspeed config: {k}={cfg[k]!r}: true or false")
    f = cfg.get("gradient_predivide_factor", 1.0)
    if isinstance(f, bool) or not isinstance(f, (int, float)) or f <= 0:
        raise ValueError(f"deepspeed config: gradient_predivide_factor={f!r}: a number > 0")
    c = cfg.get("communication_data_type")
    if c not in (None, "fp32", "fp16", "bf16", "bfp16"):
        raise ValueError(f"deepspeed config: communication_data_type={c!r}: \"fp32\", "
                         f"\"fp16\" or \"bf16\"")


def optimizer_class(spec: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    """The torch optimizer for the config's: DeepSpeed's "Adam" is AdamW
    unless ``adam_w_mode`` is false (its FusedAdam's default)."""
    import torch
    params = dict(spec.get("params", {}))
    params.pop("torch_adam", None)
    w_mode = params.pop("adam_w_mode", True)
    cls = {"Adam": torch.optim.AdamW if w_mode else torch.optim.Adam,
           "AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD}[spec["type"]]
    return cls, params


# ---- DeepSpeed's LR schedules (deepspeed/runtime/lr_schedules.py), on torch param groups

class _Warmup:
    """The warmup's gamma: log(step + 1) / log(n) or step / n over ``n`` steps."""

    def __init__(self, optimizer: Any, warmup_num_steps: int, warmup_type: str) -> None:
        if isinstance(warmup_num_steps, bool) or not isinstance(warmup_num_steps, int) or \
                warmup_num_steps <= 0:
            raise ValueError(f"scheduler.params.warmup_num_steps={warmup_num_steps!r}: a "
                             f"positive integer")
        if warmup_type not in ("log", "linear"):
            raise ValueError(f"scheduler.params.warmup_type={warmup_type!r}: 'log' or 'linear'")
        self.optimizer = optimizer
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.warmup_type = warmup_type
        self.last_batch_iteration = -1

    def _warm(self) -> float:
        n = self.last_batch_iteration
        if self.warmup_type == "log":
            return math.log(n + 1) / math.log(self.warmup_num_steps)
        return n / self.warmup_num_steps

    def get_lr(self) -> list[float]:
        raise NotImplementedError

    def step(self, last_batch_iteration: int | None = None) -> None:
        self.last_batch_iteration = self.last_batch_iteration + 1 \
            if last_batch_iteration is None else last_batch_iteration
        for grp, lr in zip(self.optimizer.param_groups, self.get_lr()):
            grp["lr"] = lr

    def get_last_lr(self) -> list[float]:
        return [grp["lr"] for grp in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.last_batch_iteration = sd["last_batch_iteration"]


class WarmupLR(_Warmup):
    """min_lr to max_lr over ``warmup_num_steps`` (log or linear), then max_lr."""

    def __init__(self, optimizer: Any, warmup_min_lr: float = 0.0,
                 warmup_max_lr: float | None = None, warmup_num_steps: int = 1000,
                 warmup_type: str = "log") -> None:
        super().__init__(optimizer, warmup_num_steps, warmup_type)
        groups = optimizer.param_groups
        self.min_lrs = [float(warmup_min_lr)] * len(groups)
        self.max_lrs = [g["lr"] for g in groups] if warmup_max_lr is None else \
            [float(warmup_max_lr)] * len(groups)
        for grp, lr in zip(groups, self.min_lrs):
            grp["lr"] = lr

    def _gamma(self) -> float:
        return self._warm() if self.last_batch_iteration < self.warmup_num_steps else 1.0

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < 0:
            return list(self.min_lrs)
        g = self._gamma()
        return [lo + (hi - lo) * g for lo, hi in zip(self.min_lrs, self.max_lrs)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linearly down to 0 at ``total_num_steps``."""

    def __init__(self, optimizer: Any, total_num_steps: int, warmup_min_lr: float = 0.0,
                 warmup_max_lr: float = 0.001, warmup_num_steps: int = 1000,
                 warmup_type: str = "log") -> None:
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type)
        self.total_num_steps = total_num_steps

    def _gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warm()
        return max(0.0, (self.total_num_steps - self.last_batch_iteration) /
                   max(1.0, self.total_num_steps - self.warmup_num_steps))


class WarmupCosineLR(_Warmup):
    """The optimizer's lr times a ratio: warmup_min_ratio to 1 over the
    warmup, then a cosine down to cos_min_ratio at ``total_num_steps``."""

    def __init__(self, optimizer: Any, total_num_steps: int, warmup_min_ratio: float = 0.0,
                 warmup_num_steps: int = 1000, cos_min_ratio: float = 0.0001,
                 warmup_type: str = "log") -> None:
        super().__init__(optimizer, warmup_num_steps, warmup_type)
        self.total_num_steps = total_num_steps
        self.warmup_min_ratio = warmup_min_ratio
        self.cos_min_ratio = cos_min_ratio
        self.org_lrs = [g["lr"] for g in optimizer.param_groups]
        for grp in optimizer.param_groups:
            grp["lr"] = 0.0

    def _ratio(self) -> float:
        n = self.last_batch_iteration
        if n < 0:
            return 0.0
        if n < self.warmup_num_steps:
            return self.warmup_min_ratio + self._warm() * (1.0 - self.warmup_min_ratio)
        done = min(1.0, (n - self.warmup_num_steps + 1) /
                   max(1, self.total_num_steps - self.warmup_num_steps))
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) *
                   (1 + math.cos(math.pi * done)) / 2)

    def get_lr(self) -> list[float]:
        r = self._ratio()
        return [lr * r for lr in self.org_lrs]


SCHEDULERS: dict[str, type] = {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR,
                               "WarmupCosineLR": WarmupCosineLR}


class DynamicLossScaler:
    """fp16's loss scale, as DeepSpeed's: halved (not below ``min_scale``) at
    an overflow once ``hysteresis`` overflows have used up their delay,
    doubled after ``scale_window`` steps without one; an overflow at the
    minimum raises, as DeepSpeed's does."""

    def __init__(self, init_scale: float, scale_window: int, min_scale: float,
                 delayed_shift: int, consecutive_hysteresis: bool = False) -> None:
        self.cur_scale = float(init_scale)
        self.scale_window = scale_window
        self.min_scale = float(min_scale)
        self.delayed_shift = self.cur_hysteresis = delayed_shift
        self.consecutive_hysteresis = consecutive_hysteresis
        self.cur_iter = 0
        self.last_overflow_iter = -1

    def update_scale(self, overflow: bool) -> None:
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale:
                    raise FloatingPointError("Current loss scale already at minimum - cannot "
                                             "decrease scale anymore. Exiting run.")
                self.cur_scale = max(self.cur_scale / 2.0, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            stable = self.cur_iter - self.last_overflow_iter - 1
            if stable > 0 and stable % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= 2.0
        self.cur_iter += 1

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("cur_scale", "cur_hysteresis", "cur_iter",
                                              "last_overflow_iter")}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for k, v in sd.items():
            setattr(self, k, v)
