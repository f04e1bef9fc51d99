"""torch tensors at the boundary of the collectives, for collectives.torchpg.

A CPU tensor travels as a numpy view of its own memory (any strides: the
collectives copy a non-contiguous array and write it back); bfloat16, which
numpy lacks, moves as int16 and is reduced in float32 (every rank rounds the
same float32 result, so the results stay bitwise equal). A CUDA tensor goes
as it is: the device paths read its ``__cuda_array_interface__``.

These helpers shrink to nothing once collectives.api takes torch tensors.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["movable", "reducible", "write", "stack"]


def _raw(t: torch.Tensor) -> Any:
    """``t`` (detached) as the collectives take it, numpy on the CPU."""
    t = t.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    return t.numpy() if t.device.type == "cpu" else t


def movable(t: torch.Tensor) -> Any:
    """An array sharing ``t``'s memory, for collectives that only move data."""
    if t.dtype == torch.bfloat16:
        return _raw(t.view(torch.int16))
    return _raw(t)


def reducible(t: torch.Tensor) -> tuple[Any, Callable[[], None] | None]:
    """An array to reduce in place, and what writes it back into ``t`` after
    (None when the array is ``t``'s own memory)."""
    if t.dtype != torch.bfloat16:
        return _raw(t), None
    up = t.detach().float()

    def back() -> None:
        t.detach().copy_(up)
    return _raw(up), back


def write(t: torch.Tensor, value: Any) -> None:
    """Copy a collective's result (numpy, CuPy or tensor; the int16 of a
    moved bfloat16 tensor, or its float32 reduction) into ``t``."""
    v = value if isinstance(value, torch.Tensor) else torch.as_tensor(value, device=t.device)
    if t.dtype == torch.bfloat16 and v.dtype == torch.int16:
        v = v.view(torch.bfloat16)
    t.detach().copy_(v.reshape(t.shape))


def stack(ts: list[torch.Tensor], reduce: bool = False) -> Any:
    """The tensors of a list as one array (a copy), rows in list order."""
    if not ts:
        raise ValueError("an empty list of tensors")
    s = torch.stack([x.detach() for x in ts])
    return reducible(s)[0] if reduce else movable(s)

