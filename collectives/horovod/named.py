"""What both DistributedOptimizers check: Horovod's named_parameters and
its count of backward passes before ``step()``."""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["check_named", "one_more_pass"]


def one_more_pass(delay: list[int], i: int) -> None:
    """Count a backward pass into parameter i's gradient; Horovod's error
    where more came than ``backward_passes_per_step`` before ``step()``."""
    if delay[i] <= 0:
        raise AssertionError("Gradients were computed more than "
                             "backward_passes_per_step times before call to step(). "
                             "Increase backward_passes_per_step to accumulate "
                             "gradients locally.")
    delay[i] -= 1


def check_named(opt: torch.optim.Optimizer, named_parameters: Any) -> dict[int, str]:
    """Horovod's checks of ``named_parameters``: (name, parameter) pairs,
    names unique, every parameter of the optimizer named. Returns each
    parameter's name (by id; Horovod's ``allreduce.noname.<group>.<i>``
    where none are given)."""
    named = list(named_parameters) if named_parameters is not None else \
        [(f"allreduce.noname.{i}.{j}", v) for i, group in enumerate(opt.param_groups)
         for j, v in enumerate(group["params"])]
    if any(not isinstance(p, tuple) for p in named):
        raise ValueError("named_parameters should be a sequence of tuples (name, "
                         "parameter), usually produced by model.named_parameters()")
    names = [k for k, _ in named]
    dups = sorted({k for k in names if names.count(k) > 1})
    if dups:
        raise ValueError(f"Parameter names in named_parameters must be unique. Found "
                         f"duplicates: {', '.join(dups)}")
    given = {id(v) for _, v in named}
    if any(id(p) not in given for group in opt.param_groups for p in group["params"]):
        raise ValueError("named_parameters was specified, but one or more model "
                         "parameters were not named")
    return {id(v): str(k) for k, v in named}
