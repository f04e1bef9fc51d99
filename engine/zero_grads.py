"""ZeRO stage 2 in a Pipeline's step: each gradient kept by one dp replica.

``engine.ZeroRedundancyOptimizer(..., process_group=job, stage=2)`` tells
the job which dp replica steps each parameter (its owner, ``OwnedGrads.
take``). The step then reduces that parameter's gradient to its owner
(``collectives.reduce(dp, g, root=owner, op="avg")``, started where the
gradient's all-reduce was: one collective per gradient, in flight
together, at the stage's AR action) instead of averaging it on every
replica, and frees it (``.grad`` None) on the others once the step is
done, so between steps a replica holds its share's gradients only:

    dp rank:        0              1
    owns:       [w0, b1]       [w1, b0]
    step:       reduce w0, b1 to 0, w1, b0 to 1 (op="avg")
    after it:   w0, b1's .grad  w1, b0's .grad   (the others None)

A tied parameter's copies (engine.tied: summed over pp after the dp
average) and a sequence-parallel whole parameter (engine.tp_sums: summed
over tp after it) need the average on every replica for those sums: they
are all-reduced as before, then freed on the replicas that do not own
them. Parameters no such optimizer holds are averaged on every replica
and kept, as without ZeRO. ``clip_grad_norm_`` (engine.clip) counts each
gradient on the one replica that has it (``kept``). Any other optimizer's
``step()`` over such a parameter (a plain one, or one made before the newest
stage-2 one) raises on every replica, nothing stepped (``_checked_step``):
it would skip the freed gradients, and the replicas' weights would part.
"""
from __future__ import annotations

import weakref
from typing import Any, Sequence

from .ir import OPT
from .torch_stage import TorchStage

__all__ = ["OwnedGrads"]

# the Pipelines' OwnedGrads that free gradients, which the optimizers' steps are checked
# against (_checked_step: torch's global step pre-hook, registered with the first)
_OWNING: "weakref.WeakSet[OwnedGrads]" = weakref.WeakSet()
_hooked: list[Any] = []


def _checked_step(opt: Any, args: Any, kwargs: Any) -> None:
    """Before any torch optimizer's ``step()`` in this process: raise
    RuntimeError where it steps a parameter whose gradient a job keeps on
    one dp replica alone (``OwnedGrads``) and it is not the stage-2
    ``engine.ZeroRedundancyOptimizer`` that dealt it so (its share's own
    optimizer is stepped from it): a plain optimizer, a stage-1 one, or a
    stage-2 one made before another took the parameter, would skip the
    gradients freed on the other replicas (or step with none), and the
    replicas' weights would part with nothing said. Every replica holds
    the same optimizer, so every one raises, before anything is stepped."""
    if not _OWNING or getattr(opt, "_zero_share", False):
        return
    dealt: dict[int, int] = {}
    if getattr(opt, "stage", None) in (2, 3) and hasattr(opt, "owner"):
        dealt = {id(p): r for p, r in zip(opt.params, opt.owner)}
    for owned in list(_OWNING):
        for grp in opt.param_groups:
            for p in grp["params"]:
                r = owned.owner.get(id(p))
                if r is not None and dealt.get(id(p)) != r:
                    raise RuntimeError(
                        f"rank {owned.pipe.pp.ranks[owned.pipe.pp.rank]}: "
                        f"{type(opt).__name__}.step(): the gradient of its "
                        f"{owned.pipe.owned_params.shape_of(p)} "
                        f"parameter is kept by dp replica {r} alone (ZeRO stage 2 or 3: the "
                        f"newest engine.ZeroRedundancyOptimizer(..., stage=2 or 3) over it; the "
                        f"other replicas' .grad is None), so this step would skip it there and "
                        f"the replicas' weights would part; nothing stepped: step that "
                        f"optimizer, "
                        f"or make engine.ZeroRedundancyOptimizer(..., stage=1) over these "
                        f"parameters (the job then averages their gradients on every replica "
                        f"and keeps them) and step again")


class OwnedGrads:
    """A Pipeline's parameters (by id) whose gradients one dp replica
    keeps, and that replica's dp index (empty: every gradient averaged on
    every replica)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.owner: dict[int, int] = {}

    def __bool__(self) -> bool:
        return bool(self.owner)

    def params(self) -> list[Any]:
        """This rank's torch parameters that take gradients, in the order of
        its stages' ``grads()``."""
        return [p for _, st in sorted(self.pipe.stages.items()) if isinstance(st, TorchStage)
                for p in st.grad_params()]

    def take(self, params: Sequence[Any], owners: Sequence[int] | None) -> None:
        """From the next step on, each of ``params``' gradients kept by the
        replica ``owners`` names (None: by every replica again, as without
        ZeRO stage 2). Raises ValueError where the pipeline's own optimizer
        steps inside the step (OPT actions: before the gradients are whole)."""
        if owners is not None and any(a.kind == OPT for a in self.pipe.program):
            raise ValueError(f"pp rank {self.pipe.rank}: ZeRO stage 2 frees the gradients of "
                             f"the other replicas' shares after the step, but schedule "
                             f"{self.pipe.schedule.name!r} steps its optimizer inside it (OPT "
                             f"actions): use stage=1")
        for i, p in enumerate(params):
            if owners is None:
                self.owner.pop(id(p), None)
            else:
                self.owner[id(p)] = int(owners[i])
        if self.owner:
            _OWNING.add(self)
            if not _hooked:     # (once a process; it returns at once where no job frees)
                from torch.optim.optimizer import register_optimizer_step_pre_hook
                _hooked.append(register_optimizer_step_pre_hook(_checked_step))
        else:
            _OWNING.discard(self)

    def owners(self, s: int) -> list[int | None]:
        """Each of stage ``s``'s gradients' owner (its dp index), None where
        every replica keeps it."""
        stage = self.pipe.stages[s]
        if not isinstance(stage, TorchStage):
            return [None] * len(stage.grads())
        return [self.owner.get(id(p)) for p in stage.grad_params()]

    def roots(self, s: int) -> list[int | None]:
        """Where the step reduces each of stage ``s``'s gradients: its
        owner, or None for an average on every replica (a gradient no
        replica owns alone, a tied copy's, a sequence-parallel sum's)."""
        out = self.owners(s)
        if not self.owner:
            return out
        for _, members, _, _ in self.pipe.tied.ties:
            for t, i in members:
                if t == s:
                    out[i] = None
        summed = {id(p) for h in self.pipe.tp_sums.holders for p in getattr(h, "summed", ())}
        stage = self.pipe.stages[s]
        if summed and isinstance(stage, TorchStage):
            out = [None if id(p) in summed else r for p, r in zip(stage.grad_params(), out)]
        return out

    def free(self) -> None:
        """After the step: the gradients this replica does not own, None."""
        if not self.owner:
            return
        me = self.pipe.dp_index
        for s, stage in self.pipe.stages.items():
            if isinstance(stage, TorchStage):
                stage.free_grads([i for i, r in enumerate(self.owners(s))
                                  if r is not None and r != me])

    def kept(self, s: int) -> list[Any]:
        """Stage ``s``'s gradients as ``grads()`` gives them, None where this
        replica freed one (not made zeros again: ``grads()`` would)."""
        stage = self.pipe.stages[s]
        if self.owner and isinstance(stage, TorchStage):
            return stage.kept_grads()
        return list(stage.grads())
