"""Device arrays: CuPy arrays and anything with ``__cuda_array_interface__``
or DLPack (a torch CUDA tensor) travel through pinned host buffers.

CuPy is imported only when a device array is first seen, so the mesh runs
without it. Stream semantics: a send first waits for the work queued on the
current CUDA stream (it copies on that stream, then synchronizes it); a
received device array is written on the current stream, so later work on
that stream sees it, and it is complete when ``recv``/``wait`` returns.
Pinned buffers are kept in a small pool keyed by size and reused."""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = ["is_device", "to_host", "to_device", "cupy", "PinnedPool"]

_cupy: Any = None


def cupy() -> Any:
    """The cupy module, imported on first use (ImportError names the extra)."""
    global _cupy
    if _cupy is None:
        try:
            import cupy as cp
        except ImportError as e:
            raise ImportError("device arrays need CuPy: pip install 'meshrun[gpu]'") from e
        _cupy = cp
    return _cupy


def is_device(obj: Any) -> bool:
    """True for CUDA arrays: CuPy, or any object exposing the CUDA array
    interface, or a DLPack producer whose device is CUDA (torch tensors)."""
    if isinstance(obj, np.ndarray):
        return False
    if hasattr(obj, "__cuda_array_interface__"):
        return True
    dev = getattr(obj, "__dlpack_device__", None)
    if dev is None:
        return False
    try:
        return int(dev()[0]) in (2, 3)  # kDLCUDA, kDLCUDAHost
    except Exception:
        return False


def as_cupy(obj: Any) -> Any:
    """A CuPy view of a device array, without copying it on the device."""
    cp = cupy()
    if isinstance(obj, cp.ndarray):
        return obj
    if hasattr(obj, "__cuda_array_interface__"):
        return cp.asarray(obj)
    return cp.from_dlpack(obj)


class PinnedPool:
    """Page-locked host buffers reused across calls: allocation is costly."""

    def __init__(self, keep: int = 8) -> None:
        self._free: dict[int, list[Any]] = {}
        self._keep = keep
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        size = 1 << max(12, (max(nbytes, 1) - 1).bit_length())
        with self._lock:
            free = self._free.get(size)
            mem = free.pop() if free else None
        if mem is None:
            mem = cupy().cuda.alloc_pinned_memory(size)
        buf = np.frombuffer(mem, np.uint8, size)
        return buf

    def give(self, buf: np.ndarray) -> None:
        mem = buf.base
        size = buf.nbytes
        with self._lock:
            free = self._free.setdefault(size, [])
            if len(free) < self._keep:
                free.append(mem)


POOL = PinnedPool()


def to_host(obj: Any) -> np.ndarray:
    """Copy a device array into a fresh host array (through pinned memory),
    after the work queued on the current stream."""
    arr = as_cupy(obj)
    cp = cupy()
    if not arr.flags.c_contiguous:
        arr = cp.ascontiguousarray(arr)
    stream = cp.cuda.get_current_stream()
    staging = POOL.take(arr.nbytes)
    try:
        host = staging[:arr.nbytes].view(arr.dtype).reshape(arr.shape)
        arr.get(out=host, stream=stream)
        stream.synchronize()
        return host.copy()
    finally:
        POOL.give(staging)


def to_device(host: np.ndarray, out: Any = None) -> Any:
    """Copy a host array to the current device (or into ``out``), on the
    current stream, and wait for it."""
    cp = cupy()
    stream = cp.cuda.get_current_stream()
    if out is None:
        out = cp.empty(host.shape, host.dtype)
    dst = as_cupy(out)
    if dst.dtype != host.dtype or dst.size != host.size:
        raise ValueError(f"device out= is {dst.dtype}[{dst.size}], message is "
                         f"{host.dtype}[{host.size}]")
    dst.reshape(-1).set(host.reshape(-1), stream=stream)
    stream.synchronize()
    return out
