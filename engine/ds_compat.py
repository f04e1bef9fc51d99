"""The small DeepSpeed names its scripts import beside ``initialize``, for
engine.deepspeed: ``deepspeed.checkpointing`` (activation checkpointing:
torch's), ``deepspeed.accelerator.get_accelerator()`` (the parameters'
device, here the CPU), ``deepspeed.utils.RepeatingLoader``,
``deepspeed.runtime.utils.set_random_seed``, ``deepspeed.comm`` (torch.
distributed's basics on the "meshrun" backend), ``init_distributed`` and
``add_config_arguments``.

A script's ``from deepspeed.X import Y`` becomes ``Y = deepspeed.X.Y`` (or
``from engine.deepspeed import Y``): ``engine.deepspeed`` is one module, so
these are attributes, as ``deepspeed.comm`` is.
"""
from __future__ import annotations

import argparse
import os
import random
import types
from typing import Any

import torch
import torch.distributed as dist
import torch.utils.checkpoint

__all__ = ["checkpointing", "accelerator", "utils", "runtime", "RepeatingLoader",
           "set_random_seed", "get_accelerator", "comm", "init_distributed",
           "add_config_arguments"]


class RepeatingLoader:
    """DeepSpeed's: iterate ``loader`` forever, starting it again at its end."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.data_iter = iter(loader)

    def __iter__(self) -> "RepeatingLoader":
        return self

    def __next__(self) -> Any:
        try:
            return next(self.data_iter)
        except StopIteration:
            self.data_iter = iter(self.loader)
            return next(self.data_iter)


def set_random_seed(seed: int) -> None:
    """DeepSpeed's ``runtime.utils.set_random_seed``: Python's, numpy's and torch's."""
    random.seed(seed)
    try:
        import numpy
        numpy.random.seed(seed)
    except ImportError:
        pass
    torch.manual_seed(seed)


class _Checkpointing:
    """``deepspeed.checkpointing``: ``checkpoint(function, *args)`` is torch's
    activation checkpointing (non-reentrant: the parameters inside get their
    gradients whatever the inputs; the RNG state kept, so dropout recomputes
    alike); ``configure(...)`` takes the config section's settings, which
    change memory use in DeepSpeed, never a result, so here nothing."""
    _configured = False

    def checkpoint(self, function: Any, *args: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)

    non_reentrant_checkpoint = checkpoint

    def configure(self, mpu_: Any = None, deepspeed_config: Any = None,
                  partition_activations: bool | None = None,
                  contiguous_checkpointing: bool | None = None,
                  num_checkpoints: int | None = None, checkpoint_in_cpu: bool | None = None,
                  synchronize: bool | None = None, profile: bool | None = None) -> None:
        if mpu_ is not None:
            raise ValueError("deepspeed.checkpointing.configure(mpu_=...): model parallelism "
                             "is not in this engine (engine.distribute takes it)")
        if deepspeed_config is not None:
            from .ds_config import _activation, _read
            _activation(_read(deepspeed_config).get("activation_checkpointing", {}))
        type(self)._configured = True

    def is_configured(self) -> bool:
        return self._configured

    def reset(self) -> None:
        """(DeepSpeed frees its partitioned-activation buffers: there are none)"""


checkpointing = _Checkpointing()


class _Accelerator:
    """``get_accelerator()``'s answers for a model on the CPU (DeepSpeed's
    CPU accelerator): one device, ``"cpu"``."""

    def device_name(self, device_index: int | None = None) -> str:
        return "cpu"

    def device(self, device_index: int | None = None) -> torch.device:
        return torch.device("cpu")

    def current_device(self) -> int:
        return 0

    def current_device_name(self) -> str:
        return "cpu"

    def set_device(self, device_index: int) -> None:
        """(one CPU device: nothing to set)"""

    def device_count(self) -> int:
        return 1

    def is_available(self) -> bool:
        return True

    def communication_backend_name(self) -> str:
        return "meshrun"

    def is_fp16_supported(self) -> bool:
        return True

    def is_bf16_supported(self) -> bool:
        return True

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def synchronize(self, device_index: int | None = None) -> None:
        """(the CPU runs in order)"""

    def empty_cache(self) -> None:
        """(no cache)"""


_CPU = _Accelerator()


def get_accelerator() -> _Accelerator:
    return _CPU


def _namespace(name: str, **attrs: Any) -> types.SimpleNamespace:
    ns = types.SimpleNamespace(**attrs)
    ns.__name__ = name      # type: ignore[attr-defined]
    return ns


accelerator = _namespace("deepspeed.accelerator", get_accelerator=get_accelerator)
utils = _namespace("deepspeed.utils", RepeatingLoader=RepeatingLoader)
runtime = _namespace("deepspeed.runtime",
                     utils=_namespace("deepspeed.runtime.utils", RepeatingLoader=RepeatingLoader,
                                      set_random_seed=set_random_seed))


def init_distributed(dist_backend: str | None = None, timeout: Any = None,
                     **_ignored: Any) -> None:
    """Join the job on torch.distributed's "meshrun" backend (whatever
    ``dist_backend`` names: "nccl", "gloo" and "ccl" run on meshrun too);
    nothing where a process group exists."""
    from collectives import torchdist
    if not dist.is_initialized():       # (torchdist registered the "meshrun" backend)
        kw = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(torchdist.BACKEND, **kw)


class _Comm:
    """``deepspeed.comm``'s basics, torch.distributed's on the meshrun group."""
    get_rank = staticmethod(lambda group=None: dist.get_rank(group))
    get_world_size = staticmethod(lambda group=None: dist.get_world_size(group))
    get_local_rank = staticmethod(lambda: int(os.environ.get("LOCAL_RANK", "0")))
    all_reduce = staticmethod(dist.all_reduce)
    broadcast = staticmethod(dist.broadcast)
    all_gather = staticmethod(dist.all_gather)
    barrier = staticmethod(dist.barrier)
    is_initialized = staticmethod(dist.is_initialized)
    ReduceOp = dist.ReduceOp
    init_distributed = staticmethod(init_distributed)


comm = _Comm()


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """DeepSpeed's ``--deepspeed``, ``--deepspeed_config`` (read by
    ``initialize(args=...)``) and ``--local_rank`` on an argparse parser."""
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="Enable DeepSpeed (meshrun's engine.deepspeed)")
    group.add_argument("--deepspeed_config", default=None, type=str,
                       help="DeepSpeed json configuration file.")
    if not any("--local_rank" in a.option_strings for a in parser._actions):
        group.add_argument("--local_rank", "--local-rank", type=int,
                           default=int(os.environ.get("LOCAL_RANK", "0")))
    return parser
