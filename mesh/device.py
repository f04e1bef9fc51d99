"""Device arrays: CuPy arrays and anything with ``__cuda_array_interface__``
or DLPack (a torch CUDA tensor) travel through pinned host buffers.

CuPy is imported only when a device array is first seen, so the mesh runs
without it. Stream semantics: a send first waits for the work queued on the
current CUDA stream (it copies on that stream, then synchronizes it); a
received device array is written on the current stream, so later work on
that stream sees it, and it is complete when ``recv``/``wait`` returns.
Pinned buffers are kept in a small pool keyed by size and reused.

``use(module)`` puts a stand-in for the cupy module in place (the tests run
the device code paths on CPU with a fake whose streams and IPC handles are
simulated); ``use(None)`` goes back to importing CuPy."""
from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

__all__ = ["is_device", "to_host", "to_device", "cupy", "use", "as_cupy", "nbytes_of", "layout",
           "wait_event", "view", "MEMCPY_DEFAULT", "PinnedPool", "POOL"]

MEMCPY_DEFAULT = 4
"""cudaMemcpyDefault: the direction is inferred from the pointers (unified
addressing), for host, device and peer-device pointers alike."""

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


def use(module: Any) -> None:
    """Use ``module`` in place of cupy from now on (None: import CuPy again).
    For tests: a stand-in with the same names runs the device paths on CPU."""
    global _cupy
    _cupy = module
    POOL.clear()


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


def nbytes_of(obj: Any) -> int:
    """Bytes of a device array, read from its CUDA array interface when it
    has one (no CuPy import), else through a CuPy view."""
    cai = getattr(obj, "__cuda_array_interface__", None)
    if isinstance(cai, dict) and "shape" in cai and "typestr" in cai:
        count = 1
        for d in cai["shape"]:
            count *= int(d)
        return count * np.dtype(cai["typestr"]).itemsize
    return int(as_cupy(obj).nbytes)


def layout(obj: Any) -> tuple[np.dtype, tuple[int, ...], bool, bool]:
    """(dtype, shape, C-contiguous, writable) of a device array, from its CUDA
    array interface when it has one (no CuPy import), else a CuPy view's
    (DLPack does not say whether memory is read-only: taken as writable)."""
    cai = getattr(obj, "__cuda_array_interface__", None)
    if isinstance(cai, dict) and "shape" in cai and "typestr" in cai:
        dt = np.dtype(cai["typestr"])
        shape = tuple(int(d) for d in cai["shape"])
        strides = cai.get("strides")
        contiguous = strides is None or _c_contiguous(shape, tuple(strides), dt.itemsize)
        data = cai.get("data")
        writable = not (isinstance(data, tuple) and len(data) > 1 and data[1])
        return dt, shape, contiguous, writable
    arr = as_cupy(obj)
    return np.dtype(arr.dtype), tuple(arr.shape), bool(arr.flags.c_contiguous), True


def _c_contiguous(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> bool:
    """As numpy decides it: extents of 1 may have any stride, empty is contiguous."""
    if 0 in shape:
        return True
    step = itemsize
    for d, s in zip(reversed(shape), reversed(strides)):
        if d != 1 and s != step:
            return False
        step *= d
    return True


def wait_event(event: Any, timeout: float, what: str) -> None:
    """Block until the CUDA ``event`` has completed, polling, so that the wait
    is bounded: after ``timeout`` seconds raise MeshTimeoutError naming ``what``."""
    if event.done:
        return
    deadline = time.monotonic() + timeout
    pause = 0.0
    while not event.done:
        if time.monotonic() > deadline:
            from .errors import MeshTimeoutError
            raise MeshTimeoutError(f"{what}: GPU work did not complete within {timeout:g}s")
        time.sleep(pause)
        pause = min(0.001, pause + 0.00002)


def view(ptr: int, count: int, dtype: Any, owner: Any, device_id: int) -> Any:
    """A 1-D CuPy array of ``count`` items over device memory at ``ptr`` that
    CuPy does not own (a buffer opened from a peer); ``owner`` is kept alive."""
    cp = cupy()
    dt = np.dtype(dtype)
    mem = cp.cuda.UnownedMemory(ptr, max(1, count * dt.itemsize), owner, device_id)
    return cp.ndarray((count,), dt, cp.cuda.MemoryPointer(mem, 0))


_MIB = 1 << 20


class PinnedPool:
    """Page-locked host buffers reused across calls: allocation is costly."""

    def __init__(self, keep: int = 8) -> None:
        self._free: dict[int, list[Any]] = {}
        self._keep = keep
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        size = 1 << max(12, (max(nbytes, 1) - 1).bit_length())
        if size > _MIB:   # past 1 MiB, whole MiBs: the ring's slot sets are not powers of two
            size = -(-nbytes // _MIB) * _MIB
        with self._lock:
            free = self._free.get(size)
            mem = free.pop() if free else None
        if mem is None:
            mem = cupy().cuda.alloc_pinned_memory(size)
        buf = np.frombuffer(mem, np.uint8, size)
        return buf

    def clear(self) -> None:
        with self._lock:
            self._free.clear()

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
    if dst.flags.c_contiguous:
        dst.reshape(-1).set(host.reshape(-1), stream=stream)
    else:   # reshape would copy: fill a contiguous array, then the strided one from it
        tmp = cp.empty(dst.shape, dst.dtype)
        tmp.set(host.reshape(dst.shape), stream=stream)
        dst[...] = tmp
    stream.synchronize()
    return out
