"""Point-to-point on CuPy arrays (staged through pinned host memory). Skipped
cleanly where CuPy or a CUDA device is missing."""
from __future__ import annotations

import numpy as np
import pytest

import mesh

cp = pytest.importorskip("cupy")
try:
    _DEVICES = cp.cuda.runtime.getDeviceCount()
except Exception:  # no driver
    _DEVICES = 0
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_DEVICES == 0, reason="no CUDA device")]


def _device_p2p(world: mesh.Mesh) -> str:
    import cupy
    cupy.cuda.Device(world.rank % cupy.cuda.runtime.getDeviceCount()).use()
    peer = 1 - world.rank
    if world.rank == 0:
        for dt in (cupy.float32, cupy.float64, cupy.int32, cupy.bool_, cupy.complex64):
            world.send(cupy.arange(7).astype(dt), peer, tag=1)
        world.send(cupy.arange(3 << 20, dtype=cupy.float32), peer, tag=2)   # multi-frame
        world.send(cupy.arange(12.0).reshape(3, 4)[:, ::2], peer, tag=3)    # strided
        world.send(np.arange(4.0), peer, tag=4)                             # host -> device out=
        return "sent"
    for dt in (cupy.float32, cupy.float64, cupy.int32, cupy.bool_, cupy.complex64):
        got = world.recv(0, tag=1)
        assert isinstance(got, cupy.ndarray) and got.dtype == dt
        assert cupy.array_equal(got, cupy.arange(7).astype(dt))
    out = cupy.zeros(3 << 20, cupy.float32)
    got = world.recv(0, tag=2, out=out)
    assert got is out and float(out[-1]) == (3 << 20) - 1
    got = world.recv(0, tag=3)
    assert cupy.array_equal(got, cupy.arange(12.0).reshape(3, 4)[:, ::2])
    out = cupy.zeros(4)
    world.recv(0, tag=4, out=out)
    assert cupy.array_equal(out, cupy.arange(4.0))
    return "ok"


def test_cupy_arrays_travel_and_stay_on_device() -> None:
    assert mesh.spawn(_device_p2p, 2, timeout=120) == ["sent", "ok"]


def _torch_dlpack(world: mesh.Mesh) -> str:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        return "skip"
    if world.rank == 0:
        world.send(torch.arange(6, device="cuda", dtype=torch.float32), 1)
        world.send(torch.arange(12.0, device="cuda")[::2], 1, tag=1)   # a strided view
        return "sent"
    got = world.recv(0)     # a torch tensor arrives as a torch tensor, on the GPU
    assert isinstance(got, torch.Tensor) and got.is_cuda, type(got)
    assert torch.equal(got, torch.arange(6, device="cuda", dtype=torch.float32))
    out = torch.zeros(6, device="cuda")
    assert world.recv(0, tag=1, out=out) is out
    assert out.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    return "ok"


def test_torch_cuda_tensor_through_dlpack() -> None:
    res = mesh.spawn(_torch_dlpack, 2, timeout=120)
    if "skip" in res:
        pytest.skip("torch without CUDA")
