"""Device arrays in collectives: the staged path.

A CuPy array (or any CUDA-array-interface or DLPack device array) is copied
to host memory through the mesh's reused pinned buffers, after the work
queued on the current stream; the host collective runs (reductions on the
CPU); the result is copied back on the current stream: into the caller's
array for in-place collectives, as a new device array for the others. When
the call returns (or its ``Work.wait()`` does) the device result is complete.

This path is correct on any pair of processes and hosts, but it does not yet
overlap the copies with the transfers segment by segment, reduce on the GPU,
or use CUDA IPC between processes of one host.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from mesh import device

__all__ = ["staged", "DeviceWork"]


class DeviceWork:
    """An async collective on a device array: ``wait()`` copies the result back."""

    __slots__ = ("_work", "_finish", "_done", "_value")

    def __init__(self, work: Any, finish: Callable[[Any], Any]) -> None:
        self._work, self._finish = work, finish
        self._done = False
        self._value: Any = None

    def done(self) -> bool:
        return bool(self._work.done())

    def wait(self, timeout: float | None = None) -> Any:
        if not self._done:
            self._value = self._finish(self._work.wait(timeout))
            self._done = True
        return self._value


def staged(fn: Callable[..., Any], in_place: bool) -> Callable[..., Any]:
    """Wrap a host collective ``fn(g, a, ...)`` so that ``a`` may live on a device."""
    @functools.wraps(fn)
    def run(g: Any, a: Any = None, *args: Any, async_op: bool = False, **kw: Any) -> Any:
        if a is None or not device.is_device(a):
            return fn(g, a, *args, async_op=async_op, **kw)
        host = device.to_host(a)

        def finish(result: Any) -> Any:
            if in_place:
                device.to_device(host, out=a)
                return a
            return None if result is None else device.to_device(result)

        result = fn(g, host, *args, async_op=async_op, **kw)
        return DeviceWork(result, finish) if async_op else finish(result)
    return run
