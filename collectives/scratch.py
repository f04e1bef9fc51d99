"""Scratch buffers kept from call to call. Warm memory is several times
faster to receive or copy into than fresh pages (a fresh 1 MiB buffer costs
256 page faults), so the ring's receive slots and the same-host reduction's
staging buffer come from here and go back after a successful call."""
from __future__ import annotations

import threading

import numpy as np

__all__ = ["take", "give"]

_KEEP = 4
_lock = threading.Lock()
_free: list[tuple[tuple[str, int, int], list[np.ndarray]]] = []


def take(dtype: np.dtype, count: int, slots: int) -> list[np.ndarray]:
    """``slots`` buffers of ``count`` items: kept ones when a set fits."""
    key = (dtype.str, count, slots)
    with _lock:
        for i, (k, bufs) in enumerate(_free):
            if k == key:
                del _free[i]
                return bufs
    return [np.empty(count, dtype) for _ in range(slots)]


def give(bufs: list[np.ndarray]) -> None:
    """Keep ``bufs`` for a later call (the most recent few sets)."""
    if bufs:
        key = (bufs[0].dtype.str, bufs[0].size, len(bufs))
        with _lock:
            _free.insert(0, (key, bufs))
            del _free[_KEEP:]
