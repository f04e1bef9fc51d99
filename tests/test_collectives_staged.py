"""The staged device path of collectives, checked without a GPU: a stand-in
"device array" type, with mesh.device's copies replaced by numpy copies, goes
through every wrapped collective; results must come back as device arrays
(in place for in-place collectives) and equal the host results."""
from __future__ import annotations

import numpy as np

import collectives as C
import mesh


class FakeDev:
    """Looks like a CUDA array to mesh.device.is_device."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = np.array(a)
        self.__cuda_array_interface__ = {"shape": self.a.shape, "typestr": self.a.dtype.str,
                                         "data": (0, False), "version": 3}


def _patch() -> None:
    from mesh import device

    def to_host(obj: FakeDev) -> np.ndarray:
        return obj.a.copy()

    def to_device(host: np.ndarray, out: FakeDev | None = None) -> FakeDev:
        if out is None:
            return FakeDev(host)
        out.a[...] = host
        return out

    device.to_host = to_host
    device.to_device = to_device


def _run(world: mesh.Mesh) -> str:
    _patch()
    n, r = world.size, world.rank
    x = FakeDev(np.arange(8.0) + r)
    assert C.all_reduce(world, x) is x
    assert np.array_equal(x.a, n * np.arange(8.0) + sum(range(n)))
    w = C.all_reduce(world, x, op="max", async_op=True)
    assert w.wait() is x and np.array_equal(x.a, n * np.arange(8.0) + sum(range(n)))
    b = FakeDev(np.full(3, r, np.int32))
    C.broadcast(world, b, root=1)
    assert np.array_equal(b.a, np.full(3, 1))
    g = C.all_gather(world, FakeDev(np.array([r, r])))
    assert isinstance(g, FakeDev) and np.array_equal(g.a[:, 0], np.arange(n))
    rs = C.reduce_scatter(world, FakeDev(np.ones((2 * n, 2))))
    assert isinstance(rs, FakeDev) and np.array_equal(rs.a, np.full((2, 2), n))
    got = C.gather(world, FakeDev(np.array([r])), root=0)
    assert (isinstance(got, FakeDev) and np.array_equal(got.a.ravel(), np.arange(n))) \
        if r == 0 else got is None
    a2a = C.all_to_all(world, FakeDev(np.arange(n) * 10 + r))
    assert isinstance(a2a, FakeDev) and np.array_equal(a2a.a, np.arange(n) + r * 10)
    plain = np.ones(2)
    assert C.all_reduce(world, plain) is plain and plain[0] == n   # host arrays untouched path
    return "ok"


def test_device_arrays_are_staged_through_host_and_come_back() -> None:
    assert mesh.spawn(_run, 3, timeout=90) == ["ok"] * 3
