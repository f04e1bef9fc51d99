"""What parallelize (engine.tensor_parallel) leaves on a sharded submodule
(``sub._tp``: its style, group, cut, random stream, the whole parameters
whose gradients it sums over tp) and those sums.
"""
from __future__ import annotations

import copy
import functools
from typing import Any

from .tp_plan import Style
from .torch_stage import TorchStage, _view
from .tp_comm import _comm
from .tp_rng import _Stream


class _Meta:
    """What parallelize left on a submodule (``sub._tp``): how to cut and
    re-join its parameters and which collectives wrap its forward."""

    def __init__(self, name: str, style: Style, group: Any, dims: dict[str, int]) -> None:
        self.name, self.style, self.group, self.dims = name, style, group, dims
        self.lo = 0
        self.order: list[int] | None = None  # a fused module's rows, from the shards laid end to end
        self.stream: _Stream | None = None   # rng="rank": the tp rank's own random stream
        self.summed: list[Any] = []    # whole parameters fed a part: gradients summed over tp
        self.summed_names: list[str] = []   # their names in the module (own_records)
        self.defer = False             # True: a Pipeline sums them after its step (tp_sums)
        # input "sequence": whether its first input was checked for whole rows
        self.seen = style.input != "sequence" or style.alike or group.size == 1

    def __deepcopy__(self, memo: dict[int, Any]) -> "_Meta":
        """A copy of the module is sharded over the same group (a Comm is not
        copied); its copies of the summed parameters get the hook (torch's
        deepcopy of a tensor leaves its hooks behind)."""
        new = _Meta(self.name, self.style, self.group, dict(self.dims))
        new.lo, new.order, new.stream = self.lo, self.order, self.stream
        new.seen = self.seen
        new.summed = [copy.deepcopy(p, memo) for p in self.summed]
        new.summed_names = list(self.summed_names)
        for p in new.summed:
            p.register_hook(functools.partial(_summed, new))
        return new

    def summed_grads(self) -> list[Any]:
        """The summed parameters' gradients (made zeros where None), as
        arrays sharing their memory (engine.tp_sums)."""
        return [_view(TorchStage._grad(p)) for p in self.summed]


def own_records(module: Any) -> None:
    """Give each sharded submodule of ``module`` whose summed parameters
    (a "sequence" module's, a rowwise bias before a split output) are no
    longer those its record lists a record of its own, listing its own and
    hooking them. engine.partition makes such modules: a module that layers
    of two stages share (ALBERT's one block) is copied for the later stage
    (a shallow copy, its ``_tp`` record the original's) and its parameters
    untied into new ones. Left so, the copy's gradients were never summed
    over tp (the hooks and a Pipeline's TpSums saw the original's
    parameters only): each tp rank kept its own part of the sequence's
    gradient, a wrong result with nothing said."""
    for sub in module.modules():
        meta = getattr(sub, "_tp", None)
        if meta is None or not meta.summed:
            continue
        mine = [sub.get_parameter(n) for n in meta.summed_names]
        if len(mine) == len(meta.summed) and all(p is q for p, q in zip(mine, meta.summed)):
            continue
        new = copy.copy(meta)       # the same group, style, shards' layout, random stream
        new.summed, new.defer = mine, False
        for param in mine:
            param.register_hook(functools.partial(_summed, new))
        sub._tp = new


def _summed(meta: _Meta, grad: Any) -> Any:
    if meta.defer:       # a Pipeline's step: summed once after its backward passes
        return grad
    return _comm(meta.group, grad, "ar", f"{meta.name} gradient", 0)
