"""DeepSpeed's ``communication_data_type`` for one gradient: rounded to a
16-bit type, summed in it over the dp group, multiplied there by 1 /
replicas and copied back into the gradient's own dtype (DeepSpeed's
``allreduce_bucket``); posted as backward makes the gradient final, waited
for at the step: engine.ds_zero.OwnerReducer's (the plain engine; with MoE
layers, each of MoEOwnerReducer's, over its group) and
engine.step's dp all-reduce where ``Pipeline.grad_wire`` is set (a
PipelineModule's engine sets it).

float16 goes by the collectives' float16 sum, as 16 bits. bfloat16, which
the collectives widen to float32 wherever they combine values, goes as its
raw 16 bits through two collectives that only move data: an all_to_all
gives each replica its chunk of every replica's copy, which it sums in
float32 and rounds to bfloat16 once (in the group's lane, as the
all_to_all ends: ``Work.settle_with``), then an all_gather (a gather to the
owner, for a gradient one replica keeps) hands the sums round::

    replica r:  [c0 | c1]  --all_to_all-->  c_r of each replica, summed: s_r
                           --all_gather-->  [s0 | s1]   (every replica the same)

Each replica sends 2 (n-1)/n of the gradient's 16-bit copy, where a ring
all-reduce of the widened copy sends 2 (n-1)/n of 32 bits a value: half
the bytes, the same sum (rounded once from float32) on every replica.
"""
from __future__ import annotations

from typing import Any

import collectives

__all__ = ["dtype_of", "wired", "calls", "post", "Wired"]


def dtype_of(name: str | None) -> Any:
    """A config's ``communication_data_type`` as the torch dtype the
    gradients go in ("fp16", "bf16"), or None ("fp32", unset: their own)."""
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name or "")


def wired(grad: Any, wire: Any) -> bool:
    """Whether ``grad`` (a torch tensor) goes in ``wire`` (torch.float16 or
    torch.bfloat16; None: in its own dtype, not here)."""
    if wire is None:
        return False
    if not hasattr(grad, "is_floating_point"):     # (a stage's numpy or CuPy view)
        dt = getattr(grad, "dtype", None)
        return getattr(dt, "kind", "") == "f" and str(wire) != f"torch.{dt}"
    return grad.is_floating_point() and grad.dtype != wire


def _tensor(grad: Any) -> Any:
    """``grad`` as a torch tensor sharing its memory (a TorchStage's
    ``grads()`` are numpy views of CPU tensors, CuPy ones of CUDA's)."""
    import torch
    if isinstance(grad, torch.Tensor):
        return grad
    if hasattr(grad, "__array_interface__"):
        return torch.from_numpy(grad)
    return torch.from_dlpack(grad)


def calls(grad: Any, wire: Any) -> int:
    """The collectives ``post`` makes on the group for ``grad`` (a step that
    fails before posting it abandons as many: engine.rollback)."""
    return 2 if _raw(_tensor(grad), wire) else 1


def _raw(grad: Any, wire: Any) -> bool:
    """bfloat16 as its raw bits: a host tensor's (a device one's is widened
    by the collectives, as before)."""
    import torch
    return wire == torch.bfloat16 and grad.device.type == "cpu"


class Wired:
    """``grad`` averaged over ``g`` in ``wire`` (see the module docstring),
    in flight: ``wait()`` copies the average into ``grad`` on every
    replica, or on ``root`` alone where given (the others' ``grad`` is left
    as it was: the caller drops it)."""

    def __init__(self, g: Any, grad: Any, wire: Any, root: int | None = None) -> None:
        import torch
        grad = _tensor(grad)
        self.g, self.grad, self.root = g, grad, root
        self.keeps = root is None or root == g.rank
        if not _raw(grad, wire):
            self.sent = grad.detach().to(wire)
            self.work = collectives.all_reduce(g, self.sent, op="sum", async_op=True) \
                if root is None else \
                collectives.reduce(g, self.sent, root=root, op="sum", async_op=True)
            self.rows = None
            return
        n, flat = g.size, grad.detach().reshape(-1)
        c = -(-flat.numel() // n)
        padded = torch.empty(n * c, dtype=torch.bfloat16)
        padded[:flat.numel()].copy_(flat)
        padded[flat.numel():].zero_()
        mine = torch.empty(c, dtype=torch.bfloat16)

        def summed(got: Any) -> None:       # (rows: this chunk of each replica's copy)
            mine.copy_(torch.from_numpy(got).view(torch.bfloat16).sum(0, dtype=torch.float32))
        first = collectives.all_to_all(g, padded.view(torch.int16).numpy().reshape(n, c),
                                       async_op=True)
        if not first.settle_with(summed):   # (done already: summed here, before the next)
            summed(first.wait())
        self.first = first
        part = mine.view(torch.int16).numpy()
        self.work = collectives.all_gather(g, part, async_op=True) if root is None else \
            collectives.gather(g, part, root=root, async_op=True)
        self.rows = flat.numel()

    def wait(self, timeout: float | None = None) -> None:
        import torch
        got = self.work.wait(timeout)
        if self.rows is not None:
            self.first.wait(timeout)
        if not self.keeps:
            return
        if self.rows is None:
            total = self.sent
        else:
            total = torch.from_numpy(got).view(torch.bfloat16).reshape(-1)[:self.rows] \
                .view(self.grad.shape)
        # (DeepSpeed's: the sum scaled in the wire dtype, then the gradient's own)
        with torch.no_grad():
            self.grad.copy_(total.mul_(1.0 / self.g.size))


def post(g: Any, grad: Any, wire: Any, root: int | None = None) -> Wired:
    """``grad``'s average over ``g`` in ``wire`` posted (``root``: to that
    replica alone): a ``Wired`` to wait for."""
    return Wired(g, grad, wire, root)
