"""ZeRO stages 1 and 2 of a model with MoE layers (engine.deepspeed at
``zero_optimization.stage`` 1 or 2): the non-expert parameter groups'
state sharded over the world, each expert group's over its
expert-data-parallel group (the ranks holding copies of the same experts;
DeepSpeed's own split), by one ``engine.ZeroRedundancyOptimizer`` each,
stepped together. At stage 2 each gradient is reduced to the rank whose
share holds it, over that same group, and dropped on the others
(engine.ds_zero's ``MoEOwnerReducer``)::

    4 ranks, ep_size 2:   dense params       experts 0,1 (ranks 0, 2)   experts 2,3 (1, 3)
    state and grads       over [0,1,2,3]     over [0, 2]                over [1, 3]

The groups must each be all-expert or expert-free, as
``deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer``
makes them (DeepSpeed asks the same of ZeRO with MoE).
"""
from __future__ import annotations

from typing import Any

import torch

from mesh.tensors import is_tensor

from .moe import expert_groups, is_moe_param

__all__ = ["MoEZeroOptimizer", "shared_over"]


def shared_over(world: Any, key: Any) -> Any:
    """The group an expert group name's (``key``; None: the others') gradients
    and state are shared over: its expert-data-parallel group, or ``world``."""
    return world if key is None else expert_groups(world, int(str(key).rpartition("_")[2]))[1]


class MoEZeroOptimizer(torch.optim.Optimizer):
    """``optimizer_class`` under ZeRO ``stage`` 1 or 2: the non-expert
    groups over ``world``, each expert group name's groups over its
    expert-data-parallel group (unsharded where that is one rank).
    ``param_groups`` are the given groups, in order (the parts' own dicts:
    a scheduler's lr reaches them). Stage 2's gradients are the engine's
    (``MoEOwnerReducer``); the optimizer is the same. Collective over the
    world: building it and ``step()``."""

    def __init__(self, groups: Any, optimizer_class: type, world: Any, stage: int = 1,
                 **defaults: Any) -> None:
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
                    f"rank {world.rank}: deepspeed.initialize: ZeRO stage {stage} with MoE "
                    f"layers: parameter group {i} mixes expert and other parameters: split them "
                    f"with deepspeed.moe.utils.split_params_into_different_moe_groups_for_"
                    f"optimizer (model_parameters=), as DeepSpeed asks")
            parts.setdefault(names.pop() if names else None, []).append(g)
        self.parts: list[Any] = []
        made: dict[int, dict[str, Any]] = {}
        for key in sorted(parts, key=lambda k: (k is not None, str(k))):     # (one order)
            group = shared_over(world, key)
            own = ZeroRedundancyOptimizer(parts[key], optimizer_class, group, stage=1,
                                          **defaults) if group.size > 1 else \
                optimizer_class(parts[key], **defaults)
            self.parts.append(own)
            for g, mine in zip(parts[key], own.param_groups):
                made[id(g)] = mine
        super().__init__([{"params": [torch.zeros(1)]}], dict(defaults))
        self.param_groups = [made[id(g)] for g in given]    # (the parts' own dicts)
        self.optimizer_class = optimizer_class
        self.stage = stage
        # (this rank's share: a ZeRO part's own, an unsharded part's every parameter)
        self._mine = {id(p) for own in self.parts for g in own.param_groups
                      for p in g["params"] if not hasattr(own, "holds") or own.holds(p)}

    def owners(self) -> dict[int, int]:
        """Each parameter's (by id) owner: its rank in its part's group."""
        out: dict[int, int] = {}
        for own in self.parts:
            flat = [p for g in own.param_groups for p in g["params"]]
            for p, r in zip(flat, getattr(own, "owner", [0] * len(flat))):
                out[id(p)] = r
        return out

    def holds(self, p: Any) -> bool:
        """Whether ``p`` is in this rank's share (its state kept here)."""
        return id(p) in self._mine

    def state_bytes(self) -> int:
        """The bytes of this rank's optimizer state (its shares')."""
        return sum(v.numel() * v.element_size() for own in self.parts
                   for st in getattr(own, "optim", own).state.values()
                   for v in st.values() if is_tensor(v))

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
        raise NotImplementedError(f"MoEZeroOptimizer.state_dict: a checkpoint of ZeRO "
                                  f"{self.stage} with MoE layers by index: the engine's "
                                  f"save_checkpoint writes it by name (engine.moe_checkpoint)")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state_dict()
