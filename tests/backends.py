"""The array backends the collective battery runs on, and one cell of its
matrix (tests/conftest.py declares the matrix).

A battery body is written once, on numpy arrays, against ``Backed(backend)``
in place of the ``collectives`` module: each call copies its numpy
arguments onto the backend with the same layout (a strided view stays a
view of its whole base, a Fortran array stays Fortran), runs the real
collective there, checks that an array result is the backend's own kind,
and brings everything back, in place collectives into the caller's numpy
array. On numpy nothing is copied: the body runs exactly as written.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import collectives

__all__ = ["Backend", "NumpyBackend", "CupyBackend", "FakeCupyBackend", "TorchBackend",
           "backend", "Backed", "Cell"]


class Backend:
    """numpy -> backend -> numpy, layout kept."""

    name = "numpy"
    host = True
    """Results of async calls are in the caller's arrays once ``done()``
    (device results are copied back at ``wait()``)."""

    def skip_reason(self) -> str | None:
        return None

    def setup(self, world: Any) -> None:
        """Called once in each worker before the body."""

    def is_native(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def asarray(self, a: np.ndarray) -> Any:
        """A C-contiguous copy of ``a`` on the backend."""
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        raise NotImplementedError

    def strided(self, buf: Any, a: np.ndarray, offset: int) -> Any:
        """A view of the backend byte buffer ``buf`` with ``a``'s shape, dtype
        and strides, ``offset`` bytes in."""
        raise NotImplementedError

    def mirror(self, a: np.ndarray) -> tuple[Any, Callable[[], None]]:
        """``a`` on the backend, and a function that copies it back into ``a``
        (into the whole base of a view, so untouched elements are checked too)."""
        if a.flags.c_contiguous:
            x = self.asarray(a)
            return x, lambda: a.__setitem__(..., self.to_numpy(x))
        root = a
        while isinstance(root.base, np.ndarray):
            root = root.base
        raw = root.reshape(-1, order="A").view(np.uint8)
        buf = self.asarray(raw)
        offset = a.__array_interface__["data"][0] - root.__array_interface__["data"][0]
        return self.strided(buf, a, offset), lambda: raw.__setitem__(..., self.to_numpy(buf))


class NumpyBackend(Backend):
    def mirror(self, a: np.ndarray) -> tuple[Any, Callable[[], None]]:
        return a, lambda: None

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)


class CupyBackend(Backend):
    """Real CuPy on the first CUDA device."""

    name = "cupy"
    host = False
    module_name = "cupy"

    @functools.cached_property
    def cp(self) -> Any:
        return importlib.import_module(self.module_name)

    def skip_reason(self) -> str | None:
        try:
            count = self.cp.cuda.runtime.getDeviceCount()
        except ImportError:
            return "CuPy is not installed"
        except Exception:  # no driver
            count = 0
        return None if count else "no CUDA device"

    def setup(self, world: Any) -> None:
        self.cp.cuda.Device(0).use()

    def is_native(self, x: Any) -> bool:
        return isinstance(x, self.cp.ndarray)

    def asarray(self, a: np.ndarray) -> Any:
        return self.cp.asarray(a)

    def to_numpy(self, x: Any) -> np.ndarray:
        return self.cp.asnumpy(x)

    def strided(self, buf: Any, a: np.ndarray, offset: int) -> Any:
        return self.cp.ndarray(a.shape, a.dtype, memptr=buf.data + offset, strides=a.strides)


class FakeCupyBackend(CupyBackend):
    """tests/fakecupy.py, installed as mesh's cupy (mesh.device.use)."""

    name = "fakecupy"
    module_name = "fakecupy"

    def skip_reason(self) -> str | None:
        return None

    def setup(self, world: Any) -> None:
        self.cp.install()

    def strided(self, buf: Any, a: np.ndarray, offset: int) -> Any:
        ptr = types.SimpleNamespace(ptr=buf.data.ptr + offset, owner=buf)
        return self.cp.ndarray(a.shape, a.dtype, memptr=ptr, strides=a.strides)


class TorchBackend(Backend):
    """torch CPU tensors (collectives.tensors: numpy views of their memory)."""

    name = "torch"
    host = True

    def skip_reason(self) -> str | None:
        return None if importlib.util.find_spec("torch") else "torch is not installed"

    @functools.cached_property
    def torch(self) -> Any:
        return importlib.import_module("torch")

    def is_native(self, x: Any) -> bool:
        return isinstance(x, self.torch.Tensor)

    def asarray(self, a: np.ndarray) -> Any:
        return self.torch.from_numpy(a.copy())

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.numpy() if self.is_native(x) else np.asarray(x)   # scatter's non-roots: numpy

    def mirror(self, a: np.ndarray) -> tuple[Any, Callable[[], None]]:
        """A tensor sharing ``a``'s memory (views stay views), so in-place
        results are in ``a`` as soon as the call is done; torch has no
        negative strides, so such a view goes as a copy, written back."""
        if all(s >= 0 for s in a.strides):
            return self.torch.from_numpy(a), lambda: None
        x = self.asarray(np.ascontiguousarray(a))
        return x, lambda: a.__setitem__(..., self.to_numpy(x))


_BACKENDS = {b.name: b for b in (NumpyBackend(), FakeCupyBackend(), CupyBackend(),
                                 TorchBackend())}


def backend(name: str) -> Backend:
    return _BACKENDS[name]


class _Work:
    """A collective's Work whose result comes back to numpy at ``wait()``."""

    def __init__(self, work: Any, finish: Callable[[Any], Any]) -> None:
        self._work, self._finish = work, finish

    def done(self) -> bool:
        return bool(self._work.done())

    def wait(self, timeout: float | None = None) -> Any:
        return self._finish(self._work.wait(timeout))


IN_PLACE = ("all_reduce", "broadcast", "reduce")
RETURNS = ("all_gather", "reduce_scatter", "gather", "scatter", "all_to_all", "scan",
           "exscan", "all_gather_v", "reduce_scatter_v", "gather_v", "scatter_v")


class Backed:
    """The ``collectives`` module, with array arguments and results moved
    through ``backend`` (see the module docstring)."""

    def __init__(self, b: Backend) -> None:
        self.backend = b

    def __getattr__(self, name: str) -> Any:
        fn = getattr(collectives, name)
        if name in IN_PLACE or name in RETURNS:
            return functools.partial(self._call, fn, name in IN_PLACE)
        return fn

    def _call(self, fn: Callable[..., Any], in_place: bool, g: Any, a: Any, *args: Any,
              async_op: bool = False, **kw: Any) -> Any:
        x, back = (None, None) if a is None else self.backend.mirror(a)

        def finish(result: Any) -> Any:
            if in_place:
                assert back is not None
                back()
                return a if result is x else result
            if result is None:
                return None
            # scatter's non-roots pass None: nothing says where their row should live
            assert x is None or self.backend.is_native(result), \
                f"{fn.__name__} on {self.backend.name} returned a {type(result)}"
            return self.backend.to_numpy(result)

        res = fn(g, x, *args, async_op=async_op, **kw)
        return _Work(res, finish) if async_op else finish(res)


@dataclass(frozen=True)
class Cell:
    """One cell of the battery's matrix: a transport path, an array backend
    and a communicator (the world, or ``ranks`` of it in that order), on
    ``size`` processes with ``env``."""

    path: str
    backend: str
    comm: str
    size: int
    ranks: tuple[int, ...] | None = None
    env: dict[str, str] = field(default_factory=dict, hash=False)

    def communicator(self, world: Any) -> Any:
        """The cell's communicator; None on a rank outside it."""
        return world if self.ranks is None else world.group(list(self.ranks))

    def collectives(self, world: Any) -> Backed:
        b = backend(self.backend)
        b.setup(world)
        return Backed(b)
