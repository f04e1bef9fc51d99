"""A CPU stand-in for the part of CuPy that meshrun's device paths use, so
their control flow runs in CI without a GPU: install it in a worker with
``fakecupy.install()`` (mesh.device.use).

Faithful where it matters for bookkeeping:
- Device memory lives at fake addresses (far above host ones); copies
  between any two pointers go through ``runtime.memcpyAsync``.
- Streams are lazy: work queued on a stream runs only when something waits
  for it (an event's ``done``/``synchronize`` flushes its stream up to the
  event, ``wait_event`` runs the other stream up to the event first, ``get``
  and ``asnumpy`` flush the current stream only). Code that forgets to wait
  reads stale data and the tests see wrong numbers.
- ``cuda.Memory`` is a file in /dev/shm: its IPC handle names the file, and a
  peer process maps it with ``ipcOpenMemHandle`` (refused in the process that
  made it, as CUDA refuses); ``stats`` counts opens, closes and pinned
  allocations, so tests check caching and cleanup; FAKECUPY_NO_IPC=1 makes
  every open fail, as between GPUs without peer access.
"""
from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import threading
import types
import weakref
from typing import Any, Callable

import numpy as np

_BASE = 1 << 52
_SPAN = 1 << 36
_lock = threading.RLock()
_heap: dict[int, tuple[np.ndarray, int, Any]] = {}    # base -> (bytes, device, keep)
_ids = itertools.count(1)
_local = threading.local()
stats = {"opened": 0, "closed": 0, "pinned": 0, "memory": 0}


def _devices() -> int:
    return int(os.environ.get("FAKECUPY_DEVICES", "1"))


def _current_device() -> int:
    return getattr(_local, "device", 0)


def _new_base() -> int:
    return _BASE + next(_ids) * _SPAN


def _register(data: np.ndarray, dev: int, keep: Any = None) -> int:
    base = _new_base()
    with _lock:
        _heap[base] = (data, dev, keep)
    return base


def _forget(base: int) -> None:
    with _lock:
        _heap.pop(base, None)


def _bytes_at(ptr: int, n: int) -> np.ndarray:
    """A writable uint8 view of n bytes at ``ptr`` (fake device or real host)."""
    if ptr >= _BASE:
        base = _BASE + (ptr - _BASE) // _SPAN * _SPAN
        with _lock:
            entry = _heap.get(base)
        if entry is None:
            raise RuntimeError(f"fakecupy: invalid device pointer {ptr:#x} (freed or never made)")
        data, off = entry[0], ptr - base
        if off + n > data.size:
            raise RuntimeError(f"fakecupy: {n} bytes at offset {off} overrun a "
                               f"{data.size}-byte allocation")
        return data[off:off + n]
    if n == 0:
        return np.zeros(0, np.uint8)
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(ptr))


class _Alloc:
    """Owns one fake device allocation; freed when the last array goes."""

    def __init__(self, nbytes: int, dev: int) -> None:
        self.ptr = _register(np.zeros(max(1, nbytes), np.uint8), dev)
        self.size = nbytes
        weakref.finalize(self, _forget, self.ptr)


# -- streams and events ---------------------------------------------------------

class Stream:
    _registry: dict[int, "Stream"] = {}

    def __init__(self, null: bool = False, non_blocking: bool = False, ptr: int = 0) -> None:
        self.ptr = 0 if null else next(_ids)
        self.queue: list[Callable[[], None]] = []
        self.queued = self.ran = 0
        self.lock = threading.RLock()
        Stream._registry[self.ptr] = self

    def enqueue(self, fn: Callable[[], None]) -> None:
        with self.lock:
            self.queue.append(fn)
            self.queued += 1

    def flush(self, upto: int | None = None) -> None:
        with self.lock:
            stop = self.queued if upto is None else upto
            while self.ran < stop:
                fn = self.queue.pop(0)
                self.ran += 1
                fn()

    def synchronize(self) -> None:
        self.flush()

    @property
    def done(self) -> bool:
        self.flush()
        return True

    def wait_event(self, event: "Event") -> None:
        event.synchronize()

    def record(self, event: "Event | None" = None) -> "Event":
        event = event or Event()
        event.record(self)
        return event

    def __enter__(self) -> "Stream":
        stack = getattr(_local, "streams", None)
        if stack is None:
            stack = _local.streams = []
        stack.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _local.streams.pop()


_null = Stream(null=True)


def get_current_stream() -> Stream:
    stack = getattr(_local, "streams", None)
    return stack[-1] if stack else _null


class Event:
    def __init__(self, block: bool = False, disable_timing: bool = False,
                 interprocess: bool = False) -> None:
        self.stream: Stream | None = None
        self.pos = 0

    def record(self, stream: Stream | None = None) -> None:
        self.stream = stream or get_current_stream()
        self.pos = self.stream.queued

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.flush(self.pos)

    @property
    def done(self) -> bool:
        self.synchronize()
        return True


def _later(fn: Callable[[], None]) -> None:
    get_current_stream().enqueue(fn)


# -- devices and memory --------------------------------------------------------------

class Device:
    def __init__(self, device: int | None = None) -> None:
        self.id = _current_device() if device is None else int(device)
        if not 0 <= self.id < _devices():
            raise RuntimeError(f"fakecupy: no device {self.id}")

    @property
    def pci_bus_id(self) -> str:
        return f"0000:{self.id + 1:02x}:00.0"

    def use(self) -> None:
        _local.device = self.id

    def __enter__(self) -> "Device":
        self._prev = _current_device()
        _local.device = self.id
        return self

    def __exit__(self, *exc: Any) -> None:
        _local.device = self._prev


class Memory:
    """Raw device memory, shareable with other processes (a /dev/shm file)."""

    def __init__(self, size: int) -> None:
        self.path = f"/dev/shm/fakecupy-{os.getpid()}-{next(_ids)}"
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size
        self.ptr = _register(np.frombuffer(self.map, np.uint8), _current_device(), self)
        stats["memory"] += 1
        weakref.finalize(self, Memory._free, self.ptr, self.path)

    @staticmethod
    def _free(ptr: int, path: str) -> None:
        _forget(ptr)
        try:
            os.unlink(path)
        except OSError:
            pass


class UnownedMemory:
    def __init__(self, ptr: int, size: int, owner: Any, device_id: int = -1) -> None:
        self.ptr, self.size, self.owner, self.device_id = ptr, size, owner, device_id


class MemoryPointer:
    def __init__(self, mem: Any, offset: int) -> None:
        self.mem, self.ptr = mem, mem.ptr + offset


def alloc_pinned_memory(size: int) -> bytearray:
    stats["pinned"] += 1
    return bytearray(size)


class _Runtime:
    @staticmethod
    def getDeviceCount() -> int:
        return _devices()

    @staticmethod
    def memcpy(dst: int, src: int, size: int, kind: int) -> None:
        _bytes_at(dst, size)[...] = _bytes_at(src, size)

    @staticmethod
    def memcpyAsync(dst: int, src: int, size: int, kind: int, stream: int) -> None:
        Stream._registry[stream].enqueue(lambda: _Runtime.memcpy(dst, src, size, kind))

    @staticmethod
    def ipcGetMemHandle(ptr: int) -> bytes:
        with _lock:
            entry = _heap.get(ptr)
        if entry is None or not isinstance(entry[2], Memory):
            raise RuntimeError("fakecupy: ipcGetMemHandle needs the base of a cuda.Memory")
        return entry[2].path.encode().ljust(64, b"\0")

    @staticmethod
    def ipcOpenMemHandle(handle: bytes, flags: int = 1) -> int:
        if os.environ.get("FAKECUPY_NO_IPC") == "1":
            raise RuntimeError("fakecupy: cudaErrorPeerAccessUnsupported (FAKECUPY_NO_IPC=1)")
        path = bytes(handle).rstrip(b"\0").decode()
        if path.startswith(f"/dev/shm/fakecupy-{os.getpid()}-"):
            raise RuntimeError("fakecupy: cudaErrorInvalidContext (a process cannot open "
                               "its own IPC handle)")
        fd = os.open(path, os.O_RDWR)
        try:
            m = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        stats["opened"] += 1
        return _register(np.frombuffer(m, np.uint8), _current_device(), m)

    @staticmethod
    def ipcCloseMemHandle(ptr: int) -> None:
        with _lock:
            entry = _heap.pop(ptr, None)
        if entry is None:
            raise RuntimeError(f"fakecupy: ipcCloseMemHandle of {ptr:#x}: not open")
        stats["closed"] += 1


cuda = types.SimpleNamespace(
    Stream=Stream, Event=Event, Device=Device, Memory=Memory, UnownedMemory=UnownedMemory,
    MemoryPointer=MemoryPointer, alloc_pinned_memory=alloc_pinned_memory,
    get_current_stream=get_current_stream, runtime=_Runtime)


# -- arrays -------------------------------------------------------------------------

class _Flags:
    def __init__(self, c: bool) -> None:
        self.c_contiguous = c


class ndarray:
    """A device array: a pointer, a dtype, a shape and strides."""

    def __init__(self, shape: Any, dtype: Any = float, memptr: Any = None,
                 strides: Any = None) -> None:
        self._shape = tuple(int(d) for d in (shape if isinstance(shape, (tuple, list))
                                             else (shape,)))
        self._dtype = np.dtype(dtype)
        nbytes = int(np.prod(self._shape, dtype=np.int64)) * self._dtype.itemsize
        if memptr is None:
            self._keep: Any = _Alloc(nbytes, _current_device())
            self._ptr = self._keep.ptr
        else:
            self._keep, self._ptr = memptr, int(memptr.ptr)
        self._strides = (tuple(int(x) for x in strides) if strides is not None
                         else _c_strides(self._shape, self._dtype.itemsize))

    def _np(self) -> np.ndarray:
        """A numpy view of the device memory (no waiting)."""
        if self.size == 0:
            return np.empty(self._shape, self._dtype)
        steps = [(d - 1) * s for d, s in zip(self._shape, self._strides)]
        low = sum(x for x in steps if x < 0)       # negative strides reach below the pointer
        raw = _bytes_at(self._ptr + low, sum(map(abs, steps)) + self._dtype.itemsize)
        return np.ndarray(self._shape, self._dtype, buffer=raw, offset=-low,
                          strides=self._strides)

    shape = property(lambda self: self._shape)
    dtype = property(lambda self: self._dtype)
    ndim = property(lambda self: len(self._shape))
    size = property(lambda self: int(np.prod(self._shape, dtype=np.int64)))
    itemsize = property(lambda self: self._dtype.itemsize)
    nbytes = property(lambda self: self.size * self._dtype.itemsize)
    flags = property(lambda self: _Flags(self._strides == _c_strides(self._shape,
                                                                    self._dtype.itemsize)))
    data = property(lambda self: types.SimpleNamespace(ptr=self._ptr))

    @property
    def device(self) -> Device:
        with _lock:
            return Device(_heap[_BASE + (self._ptr - _BASE) // _SPAN * _SPAN][1])

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self._shape, "typestr": self._dtype.str, "data": (self._ptr, False),
                "version": 3, "strides": self._strides}

    def __len__(self) -> int:
        return self._shape[0]

    def _view_of(self, sub: np.ndarray, whole: np.ndarray) -> "ndarray":
        off = sub.__array_interface__["data"][0] - whole.__array_interface__["data"][0]
        return ndarray(sub.shape, sub.dtype, MemoryPointer(self._keep_ptr(), off), sub.strides)

    def _keep_ptr(self) -> Any:
        return types.SimpleNamespace(ptr=self._ptr, owner=self._keep)

    def __getitem__(self, key: Any) -> "ndarray":
        whole = self._np()
        sub = whole[key]
        if not isinstance(sub, np.ndarray) or not np.shares_memory(sub, whole):
            raise TypeError("fakecupy: only basic indexing (views) is supported")
        return self._view_of(sub, whole)

    def __setitem__(self, key: Any, value: Any) -> None:
        src = value._np if isinstance(value, ndarray) else (lambda: value)
        _later(lambda: self._np().__setitem__(key, src()))

    def reshape(self, *shape: Any) -> "ndarray":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if not self.flags.c_contiguous:
            return ascontiguousarray(self).reshape(*shape)
        whole = self._np()
        return self._view_of(whole.reshape(shape), whole)

    def copy(self) -> "ndarray":
        return ascontiguousarray(self, force=True)

    def astype(self, dtype: Any) -> "ndarray":
        out = ndarray(self._shape, dtype)
        _later(lambda: out._np().__setitem__(..., self._np().astype(dtype)))
        return out

    def fill(self, value: Any) -> None:
        _later(lambda: self._np().fill(value))

    def get(self, stream: Any = None, out: np.ndarray | None = None) -> np.ndarray:
        (stream or get_current_stream()).flush()
        host = self._np().copy()
        if out is not None:
            out[...] = host
            return out
        return host

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        host = np.array(arr)
        (stream or get_current_stream()).enqueue(lambda: self._np().__setitem__(..., host))

    def _binary(self, other: Any, fn: Any) -> "ndarray":
        b = other._np if isinstance(other, ndarray) else (lambda: other)
        dt = self._dtype
        out = ndarray(self._shape, dt)
        _later(lambda: fn(self._np(), b(), out=out._np(), casting="unsafe"))
        return out

    def __add__(self, other: Any) -> "ndarray":
        return self._binary(other, np.add)

    __radd__ = __add__

    def __mul__(self, other: Any) -> "ndarray":
        return self._binary(other, np.multiply)

    __rmul__ = __mul__

    def __itruediv__(self, other: Any) -> "ndarray":
        _later(lambda: np.true_divide(self._np(), other, out=self._np(), casting="unsafe"))
        return self

    def __repr__(self) -> str:
        return f"fakecupy.ndarray(shape={self._shape}, dtype={self._dtype})"


def _c_strides(shape: tuple[int, ...], item: int) -> tuple[int, ...]:
    out, step = [], item
    for d in reversed(shape):
        out.append(step)
        step *= max(d, 1)
    return tuple(reversed(out))


def asarray(a: Any, dtype: Any = None) -> ndarray:
    if isinstance(a, ndarray) and dtype is None:
        return a
    host = np.asarray(a, dtype, order="C")
    out = ndarray(host.shape, host.dtype)
    out._np()[...] = host
    return out


array = asarray


def ascontiguousarray(a: ndarray, force: bool = False) -> ndarray:
    if a.flags.c_contiguous and not force:
        return a
    out = ndarray(a.shape, a.dtype)
    _later(lambda: out._np().__setitem__(..., a._np()))
    return out


def empty(shape: Any, dtype: Any = float) -> ndarray:
    return ndarray(shape, dtype)


def zeros(shape: Any, dtype: Any = float) -> ndarray:
    return ndarray(shape, dtype)


def ones(shape: Any, dtype: Any = float) -> ndarray:
    return asarray(np.ones(shape, dtype))


def full(shape: Any, value: Any, dtype: Any = None) -> ndarray:
    return asarray(np.full(shape, value, dtype))


def arange(*args: Any, dtype: Any = None) -> ndarray:
    return asarray(np.arange(*args, dtype=dtype))


def asnumpy(a: Any) -> np.ndarray:
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def from_dlpack(obj: Any) -> ndarray:
    raise TypeError("fakecupy: no DLPack")


def _ufunc(fn: Any) -> Callable[..., ndarray]:
    def run(a: ndarray, b: Any, out: ndarray | None = None) -> ndarray:
        dst = out if out is not None else ndarray(a.shape, a.dtype)
        src = b._np if isinstance(b, ndarray) else (lambda: b)
        _later(lambda: fn(a._np(), src(), out=dst._np()))
        return dst
    return run


add = _ufunc(np.add)
multiply = _ufunc(np.multiply)
minimum = _ufunc(np.minimum)
maximum = _ufunc(np.maximum)
bitwise_and = _ufunc(np.bitwise_and)
bitwise_or = _ufunc(np.bitwise_or)
bitwise_xor = _ufunc(np.bitwise_xor)
logical_and = _ufunc(np.logical_and)
logical_or = _ufunc(np.logical_or)
logical_xor = _ufunc(np.logical_xor)
floor_divide = _ufunc(np.floor_divide)
remainder = _ufunc(np.remainder)


def install() -> Any:
    """Make this module mesh's cupy (in this process) and return it."""
    import sys

    from mesh import device
    module = sys.modules[__name__]
    device.use(module)
    return module
