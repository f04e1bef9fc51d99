"""ZeRO stage 1 of a model with MoE layers (engine.deepspeed at
``zero_optimization.stage`` 1): the non-expert parameter groups' state
sharded over the world, each expert group's over its expert-data-parallel
group (the ranks holding copies of the same experts; DeepSpeed's own
split), by one ``engine.ZeroRedundancyOptimizer`` each, stepped together.
The groups must each be all-expert or expert-free, as
``deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer``
makes them (DeepSpeed asks the same of ZeRO with MoE).
"""
from __future__ import annotations

from typing import Any

import torch

from .moe import expert_groups, is_moe_param

__all__ = ["MoEZeroOptimizer"]


class MoEZeroOptimizer(torch.optim.Optimizer):
    """``optimizer_class`` under ZeRO 1: the non-expert groups over
    ``world``, each expert group name's groups over its expert-data-parallel
    group (unsharded where that is one rank). ``param_groups`` are the given
    groups, in order (the parts' own dicts: a scheduler's lr reaches them).
    Collective over the world: building it and ``step()``."""

    def __init__(self, groups: Any, optimizer_class: type, world: Any, **defaults: Any) -> None:
        from .zero import ZeroRedundancyOptimizer
        given = [dict(g) if isinstance(g, dict) else {"params": [g]} for g in groups] \
            if isinstance(groups, list) and groups and isinstance(groups[0], dict) else \
            [{"params": list(groups)}]
        parts: dict[Any, list[dict[str, Any]]] = {}
        for i, g in enumerate(given):
            g["params"] = list(g["params"])
            names = {p.group_name if is_moe_param(p) else None for p in g["params"]}
            if len(names) > 1:
                raise ValueError(
                    f"rank {world.rank}: deepspeed.initialize: ZeRO stage 1 with MoE layers: "
                    f"parameter group {i} mixes expert and other parameters: split them with "
                    f"deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer "
                    f"(model_parameters=), as DeepSpeed asks")
            parts.setdefault(names.pop() if names else None, []).append(g)
        self.parts: list[Any] = []
        made: dict[int, dict[str, Any]] = {}
        for key in sorted(parts, key=lambda k: (k is not None, str(k))):     # (one order)
            group = world if key is None else expert_groups(
                world, int(str(key).rpartition("_")[2]))[1]
            own = ZeroRedundancyOptimizer(parts[key], optimizer_class, group, stage=1,
                                          **defaults) if group.size > 1 else \
                optimizer_class(parts[key], **defaults)
            self.parts.append(own)
            for g, mine in zip(parts[key], own.param_groups):
                made[id(g)] = mine
        super().__init__([{"params": [torch.zeros(1)]}], dict(defaults))
        self.param_groups = [made[id(g)] for g in given]    # (the parts' own dicts)
        self.optimizer_class = optimizer_class

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for own in self.parts:
            own.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for own in self.parts:
            own.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError("MoEZeroOptimizer.state_dict: a checkpoint of ZeRO 1 with "
                                  "MoE layers by index: the engine's save_checkpoint writes it by "
                                  "name (engine.moe_checkpoint)")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state_dict()
