"""Collectives on CuPy arrays against a numpy reference (staged path).
Skipped cleanly where CuPy or a CUDA device is missing."""
from __future__ import annotations

import numpy as np
import pytest

import collectives as C
import mesh

cp = pytest.importorskip("cupy")
try:
    _DEVICES = cp.cuda.runtime.getDeviceCount()
except Exception:  # no driver
    _DEVICES = 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_DEVICES == 0, reason="no CUDA device")]


def _run(world: mesh.Mesh) -> str:
    import cupy
    cupy.cuda.Device(world.rank % cupy.cuda.runtime.getDeviceCount()).use()
    n, r = world.size, world.rank
    for dt in (cupy.float32, cupy.float64, cupy.int64):
        for size in (1, 7, 3 << 20):
            x = cupy.arange(size, dtype=dt) + r
            assert C.all_reduce(world, x) is x
            want = n * np.arange(size, dtype=dt) + sum(range(n))
            assert np.array_equal(cupy.asnumpy(x), want)
    y = cupy.full(5, float(r))
    C.all_reduce(world, y, op="avg", async_op=True).wait()
    assert np.allclose(cupy.asnumpy(y), (n - 1) / 2)
    b = cupy.full(4, r, cupy.int32)
    C.broadcast(world, b, root=n - 1)
    assert int(b[0]) == n - 1
    g = C.all_gather(world, cupy.array([r]))
    assert isinstance(g, cupy.ndarray) and cupy.asnumpy(g).ravel().tolist() == list(range(n))
    rs = C.reduce_scatter(world, cupy.ones((2 * n, 3)))
    assert isinstance(rs, cupy.ndarray) and float(rs[0, 0]) == n
    return "ok"


@pytest.mark.parametrize("n", [2, 4])
def test_collectives_on_cupy_arrays(n: int) -> None:
    assert mesh.spawn(_run, n, timeout=180) == ["ok"] * n
