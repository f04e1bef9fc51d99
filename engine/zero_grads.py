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
gradient on the one replica that has it (``kept``).
"""
from __future__ import annotations

from typing import Any, Sequence

from .ir import OPT
from .torch_stage import TorchStage

__all__ = ["OwnedGrads"]


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
