"""Every collective on large CuPy arrays (several 1 MiB segments) against a
numpy reference, on both device paths (the overlapped staged ring with
MESH_CUDA_IPC=0, CUDA IPC with MESH_CUDA_IPC=1), ranks sharing one GPU and,
where there are several, on different GPUs; and a torch CUDA tensor through
DLPack. Skipped cleanly where CuPy or a CUDA device is missing
(tests/test_collectives_gpu_fake.py runs the same control flow on CPU). Small arrays,
every op and dtype, views, sub-groups: the battery of
tests/test_collectives.py, whose cupy cells run where a GPU is."""
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


def _run(world: mesh.Mesh, spread: bool, ipc: str) -> str:
    import cupy
    cupy.cuda.Device(world.rank % cupy.cuda.runtime.getDeviceCount() if spread else 0).use()
    n, r = world.size, world.rank
    for dt in (cupy.float32, cupy.float64, cupy.int64):
        for size in (100_003, 3 << 20):
            x = cupy.arange(size, dtype=dt) + r
            assert C.all_reduce(world, x) is x
            want = n * np.arange(size, dtype=dt) + sum(range(n))
            assert np.array_equal(cupy.asnumpy(x), want), (dt, size)
    y = cupy.full(1 << 20, float(r))
    C.all_reduce(world, y, op="avg", async_op=True).wait()
    assert np.allclose(cupy.asnumpy(y), (n - 1) / 2)
    m = (cupy.arange(1 << 18) * (r + 1)) % 1000
    C.all_reduce(world, m, op="max")
    assert np.array_equal(cupy.asnumpy(m), np.max([(np.arange(1 << 18) * (p + 1)) % 1000
                                                   for p in range(n)], axis=0))
    strided = cupy.arange(2 << 18, dtype=cupy.float64).reshape(-1, 2)[:, 1] + r
    C.all_reduce(world, strided)
    assert np.array_equal(cupy.asnumpy(strided),
                          n * (np.arange(1 << 18) * 2 + 1.0) + sum(range(n)))
    count = 1 << 18
    b = cupy.full(count, r, cupy.int32)
    C.broadcast(world, b, root=n - 1)
    assert int(b[0]) == n - 1 and int(b[-1]) == n - 1
    g = C.all_gather(world, cupy.full(count, r, cupy.int32))
    assert isinstance(g, cupy.ndarray)
    assert np.array_equal(cupy.asnumpy(g)[:, -1], np.arange(n))
    rs = C.reduce_scatter(world, cupy.ones((2 * n, count)) * (r + 1))
    assert isinstance(rs, cupy.ndarray) and rs.shape == (2, count)
    assert float(rs[0, 0]) == sum(range(1, n + 1))
    red = cupy.ones(count)
    C.reduce(world, red, root=0)
    assert float(red[0]) == (n if r == 0 else 1)
    got = C.gather(world, cupy.full(count, r), root=0)
    assert got is None if r else np.array_equal(cupy.asnumpy(got)[:, 0], np.arange(n))
    sc = C.scatter(world, cupy.arange(n * count).reshape(n, count) if r == 0 else None)
    assert int(sc[0]) == r * count
    a2a = C.all_to_all(world, cupy.arange(n * count) + 1000 * r)
    assert int(a2a[0]) == r * count
    from collectives.device import cuda_ipc
    assert (cuda_ipc.state(world) is not None) == (ipc == "1")
    return "ok"


@pytest.mark.parametrize("ipc", ["0", "1"])
@pytest.mark.parametrize("n", [2, 4])
def test_collectives_on_cupy_arrays_one_gpu(n: int, ipc: str) -> None:
    assert mesh.spawn(_run, n, False, ipc, timeout=300,
                      env={"MESH_CUDA_IPC": ipc}) == ["ok"] * n


@pytest.mark.skipif(_DEVICES < 2, reason="one CUDA device")
@pytest.mark.parametrize("ipc", ["0", "1"])
def test_collectives_on_cupy_arrays_several_gpus(ipc: str) -> None:
    n = min(4, _DEVICES)
    assert mesh.spawn(_run, n, True, ipc, timeout=300,
                      env={"MESH_CUDA_IPC": ipc}) == ["ok"] * n


def _torch(world: mesh.Mesh) -> str:
    """torch CUDA tensors: every collective (large ones on the device paths,
    small ones staged), bfloat16, strided views, results as CUDA tensors of
    the caller's dtype; point-to-point; GradReducer and all_reduce_grads."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        return "skip"
    n, r = world.size, world.rank
    cuda = torch.device("cuda", 0)
    t = torch.full((1 << 20,), float(r + 1), device=cuda)
    assert C.all_reduce(world, t) is t
    assert float(t[0]) == sum(range(1, n + 1))
    for count in (1 << 20, 100):
        for dt in (torch.bfloat16, torch.float32):
            h = torch.full((count,), 1.0 + r, dtype=dt, device=cuda)
            C.all_reduce(world, h, op="avg")
            assert h.dtype == dt and h.is_cuda and float(h[-1]) == (n + 1) / 2
        base = torch.zeros((count, 4), device=cuda) + r
        C.all_reduce(world, base[:, 1])
        assert float(base[0, 1]) == sum(range(n)) and float(base[0, 0]) == r
        g = C.all_gather(world, torch.full((count,), r, dtype=torch.bfloat16, device=cuda))
        assert g.is_cuda and g.dtype == torch.bfloat16 and g[:, 0].tolist() == list(range(n))
        rs = C.reduce_scatter(world, torch.ones((2 * n, count), dtype=torch.bfloat16,
                                                device=cuda))
        assert rs.is_cuda and rs.dtype == torch.bfloat16 and float(rs[0, 0]) == n
        b = torch.full((count,), r, dtype=torch.int64, device=cuda)
        C.broadcast(world, b, root=n - 1)
        assert int(b[0]) == n - 1
        sc = C.scatter(world, torch.arange(n * count, device=cuda).reshape(n, count)
                       if r == 0 else torch.empty(0, dtype=torch.int64, device=cuda))
        assert sc.is_cuda and int(sc[0]) == r * count
    peer = 1 - r if r < 2 else None
    if peer is not None:
        x = torch.arange(1 << 19, dtype=torch.bfloat16, device=cuda)
        if r == 0:
            world.send(x, peer)
            world.send(x, peer, tag=1)
        else:
            got = world.recv(peer)
            assert got.is_cuda and got.dtype == torch.bfloat16 and torch.equal(got, x)
            out = torch.empty_like(x)
            assert world.recv(peer, tag=1, out=out) is out and torch.equal(out, x)
    model = torch.nn.Linear(64, 64).to(cuda)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.full_like(p, float(r))
    C.GradReducer(world, params, bucket_bytes=4096).wait()
    assert all(float(p.grad.flatten()[0]) == (n - 1) / 2 for p in params)
    grads = [p.grad for p in params]
    C.all_reduce_grads(world, grads, op="sum")
    assert all(float(p.grad.flatten()[0]) == n * (n - 1) / 2 for p in params)
    torch.cuda.synchronize()
    return "ok"


@pytest.mark.parametrize("ipc", ["0", "1"])
def test_torch_cuda_tensors(ipc: str) -> None:
    res = mesh.spawn(_torch, 2, timeout=240, env={"MESH_CUDA_IPC": ipc})
    if "skip" in res:
        pytest.skip("torch without CUDA")
    assert res == ["ok", "ok"]


def _grad_reducer(world: mesh.Mesh) -> str:
    import cupy
    r, n = world.rank, world.size
    grads = [cupy.full((1 << 20,), float(r), cupy.float32), cupy.full((1000,), float(r))]
    reducer = C.GradReducer(world, grads, bucket_bytes=1 << 20)
    for i in reversed(range(len(grads))):
        reducer.ready(i)
    reducer.wait()
    for g in grads:
        assert np.allclose(cupy.asnumpy(g), (n - 1) / 2)
    return "ok"


@pytest.mark.parametrize("ipc", ["0", "1"])
def test_grad_reducer_on_cupy_gradients(ipc: str) -> None:
    assert mesh.spawn(_grad_reducer, 2, timeout=120, env={"MESH_CUDA_IPC": ipc}) == ["ok", "ok"]
