"""A point-to-point send's object as host memory (mesh.comm): the bytes it
lies within (_span), the copy ``bsend`` sends (_copied), and whether
``sendrecv``'s ``out=`` overlaps it (_overlap)."""
from __future__ import annotations

from typing import Any

import numpy as np

from . import device, tensors


def _span(x: Any) -> tuple[int, int] | None:
    """The bytes [start, end) of host memory that ``x`` (a numpy array, a
    dense CPU tensor, views and lazy conjugates included) lies within; None
    for anything else (a device array goes as a copy made at once) or no
    elements."""
    try:
        if isinstance(x, np.ndarray):
            at, shape, strides, size = x.ctypes.data, x.shape, x.strides, x.itemsize
        elif tensors.is_tensor(x) and x.is_cpu:
            size = x.element_size()
            at, shape, strides = x.data_ptr(), x.shape, tuple(k * size for k in x.stride())
        else:
            return None
    except (RuntimeError, NotImplementedError):      # (a sparse tensor has no strides)
        return None
    if 0 in shape:
        return None
    return (at + sum((n - 1) * k for n, k in zip(shape, strides) if k < 0),
            at + sum((n - 1) * k for n, k in zip(shape, strides) if k > 0) + size)


def _copied(obj: Any) -> Any:
    """What ``bsend`` sends: a copy of ``obj``'s host memory (a numpy array's,
    a CPU tensor's, a DLPack object's), which the send may read after the
    call returns. A device array is copied to the host as its send starts,
    and an object encoded: they go as they are."""
    if isinstance(obj, np.ndarray):
        return obj.copy()       # (a subclass stays one: a masked array is refused as ever)
    if tensors.is_tensor(obj):
        return obj.detach().clone()
    if hasattr(obj, "__dlpack__") and not device.is_device(obj):
        try:
            return np.from_dlpack(obj).copy()
        except (RuntimeError, BufferError, TypeError):
            return obj          # (the send refuses it, saying why)
    return obj


def _overlap(obj: Any, out: Any) -> bool:
    """Whether a send of ``obj`` may read memory that a receive into ``out`` writes."""
    a, b = _span(obj), _span(out)
    return a is not None and b is not None and a[0] < b[1] and b[0] < a[1]
