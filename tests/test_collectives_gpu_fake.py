"""The device paths of the collectives, run on CPU through tests/fakecupy.py
(a stand-in for CuPy with lazy streams and /dev/shm-backed IPC handles):
the overlapped staged ring's segment and slot bookkeeping, the CUDA IPC
probe, handle exchange, caching, synchronization and cleanup, and the
choice between them. Every result is checked against numpy.

What this cannot show: that real CUDA streams, pinned copies and IPC
handles behave as the stand-in does (tests/test_collectives_gpu.py does,
on a machine with a GPU). Every collective on every dtype, on the sockets
(staged ring) and same-host (CUDA IPC) paths, world and sub-group, is in the
battery of tests/test_collectives.py, which runs on this stand-in and on
real CuPy alike; here are the other paths and the bookkeeping."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import collectives as C
import mesh

import fakecupy

SMALL_SEGMENTS = {"MESH_COLL_SEGMENT": "8K", "MESH_COLL_WINDOW": "2"}


def _check_all(world: mesh.Mesh, devices: int) -> dict[str, Any]:
    cp = fakecupy.install()
    cp.cuda.Device(world.rank % devices).use()
    from collectives.device import paths
    taken: set[str] = set()
    staged = paths._staged

    def spy(ctx: Any, mode: str) -> str:         # which staged way each call took
        way = staged(ctx, mode)
        taken.add(way)
        return way
    paths._staged = spy
    n, r = world.size, world.rank
    for dt in (np.float32, np.float64, np.int64):
        for size in (7, 20_000, 100_003):        # simple path, then the device paths
            x = cp.arange(size, dtype=dt) + r
            assert C.all_reduce(world, x) is x
            want = n * np.arange(size, dtype=dt) + sum(range(n))
            assert np.array_equal(cp.asnumpy(x), want), (dt, size)
    big = 50_001
    y = cp.asarray(np.full(big, float(r)))
    C.all_reduce(world, y, op="avg", async_op=True).wait()
    assert np.allclose(cp.asnumpy(y), (n - 1) / 2)
    m = cp.asarray((np.arange(big) * (r + 1)) % 1000)
    C.all_reduce(world, m, op="max")
    assert np.array_equal(cp.asnumpy(m), np.max([(np.arange(big) * (p + 1)) % 1000
                                                 for p in range(n)], axis=0))
    base = cp.asarray(np.arange(2 * big, dtype=np.float64).reshape(big, 2) + r)
    strided = base[:, 1]
    C.all_reduce(world, strided)
    assert np.array_equal(cp.asnumpy(strided), n * (np.arange(big) * 2 + 1.0) + sum(range(n)))
    assert np.array_equal(cp.asnumpy(base)[:, 0], np.arange(big) * 2.0 + r)

    rows = 4 * n
    rs_in = cp.asarray(np.arange(rows * 3000, dtype=np.float32).reshape(rows, 3000) * (r + 1))
    rs = C.reduce_scatter(world, rs_in)
    total = np.arange(rows * 3000, dtype=np.float32).reshape(rows, 3000) * sum(range(1, n + 1))
    assert isinstance(rs, cp.ndarray) and rs.shape == (4, 3000)
    assert np.array_equal(cp.asnumpy(rs), total[4 * r:4 * (r + 1)])

    ag = C.all_gather(world, cp.asarray(np.full(9000, r, np.int32)))
    assert isinstance(ag, cp.ndarray) and ag.shape == (n, 9000)
    assert np.array_equal(cp.asnumpy(ag), np.repeat(np.arange(n), 9000).reshape(n, 9000))

    b = cp.asarray(np.full(40_000, r, np.int16))
    assert C.broadcast(world, b, root=n - 1) is b
    assert np.array_equal(cp.asnumpy(b), np.full(40_000, n - 1))
    wide = cp.asarray(np.arange(2 * big, dtype=np.float64).reshape(big, 2) + r)
    column = wide[:, 1]                     # strided: the call copies it first (up stream)
    C.broadcast(world, column, root=0)
    assert np.array_equal(cp.asnumpy(column), np.arange(big) * 2 + 1.0)
    assert np.array_equal(cp.asnumpy(wide)[:, 0], np.arange(big) * 2.0 + r)

    red = cp.asarray(np.ones(30_000))
    C.reduce(world, red, root=0)
    assert cp.asnumpy(red)[0] == (n if r == 0 else 1)
    got = C.gather(world, cp.asarray(np.array([r])), root=0)
    assert np.array_equal(cp.asnumpy(got).ravel(), np.arange(n)) if r == 0 else got is None
    got = C.gather(world, cp.asarray(np.float32(r)), root=0)      # 0-d: stacked to (n,)
    assert got.shape == (n,) and np.array_equal(cp.asnumpy(got), np.arange(n)) if r == 0 \
        else got is None
    sc = C.scatter(world, cp.asarray(np.arange(n) * 10) if r == 0 else None, root=0)
    assert int(cp.asnumpy(sc)) == 10 * r
    a2a = C.all_to_all(world, cp.asarray(np.arange(n) * 10 + r))
    assert np.array_equal(cp.asnumpy(a2a), np.arange(n) + r * 10)

    from collectives.device import cuda_ipc
    st = cuda_ipc.state(world)
    out = {"ipc": st is not None, "opens": st.opens if st else 0,
           "gen": st.gen if st else 0, "pinned": cp.stats["pinned"], "staged": sorted(taken)}
    # The same sizes again: no new handle opened, no new pinned buffer.
    x = cp.arange(100_003, dtype=np.float32) + r
    C.all_reduce(world, x)
    out["opens_again"] = st.opens if st else 0
    out["pinned_again"] = cp.stats["pinned"]
    world.close()
    out.update(opened=cp.stats["opened"], closed=cp.stats["closed"])
    return out


@pytest.mark.parametrize("n,env,ipc,staged", [
    (2, {"MESH_CUDA_IPC": "0"}, False, "board"),        # staged whole, the host's board
    (2, {"MESH_CUDA_IPC": "0", "MESH_CUDA_OVERLAP": "1"}, False, "ring"),  # overlapped ring
    (3, {"MESH_CUDA_IPC": "1"}, True, ""),              # IPC, one GPU shared, board sync
    (2, {"MESH_CUDA_IPC": "1", "MESH_CMA": "0", "FAKECUPY_DEVICES": "2"}, True, ""),
    # IPC on two GPUs (peer copies), synchronized by messages
    (2, {}, True, ""),                                  # auto: IPC where it works
    (2, {"FAKECUPY_NO_IPC": "1"}, False, "board"),      # auto, handles cannot be opened
    (2, {"FAKECUPY_NO_IPC": "1", "MESH_CMA": "0"}, False, "ring"),    # no board: the ring
    (2, {"FAKECUPY_NO_IPC": "1", "MESH_CUDA_OVERLAP": "0", "MESH_CMA": "0"}, False, "whole"),
])
def test_device_collectives_on_fake_cupy(n: int, env: dict[str, str], ipc: bool,
                                         staged: str) -> None:
    devices = int(env.get("FAKECUPY_DEVICES", "1"))
    res = mesh.spawn(_check_all, n, devices, timeout=120, env={**SMALL_SEGMENTS, **env})
    for out in res:
        assert out["ipc"] == ipc
        assert out["staged"] == ([staged] if staged else []), out
        if out["ipc"]:
            # one open per peer per generation (the buffer grew once: 2 generations at most)
            assert out["opens"] == (n - 1) * out["gen"] and out["gen"] <= 2
            assert out["opens_again"] == out["opens"]
            assert out["opened"] == out["closed"] == out["opens"], out
        assert out["pinned_again"] == out["pinned"]


def _ring_windows(world: mesh.Mesh) -> str:
    """The ring's slot bookkeeping at several windows, segment sizes and
    lengths (empty chunks and segments included)."""
    import os

    from collectives.plan import Tuning
    cp = fakecupy.install()
    n, r = world.size, world.rank
    for window in (1, 2, 3):
        for seg in ("8", "64", "1K"):
            os.environ.update(MESH_COLL_WINDOW=str(window), MESH_COLL_SEGMENT=seg,
                              MESH_COLL_SMALL="0")
            assert Tuning.from_env().window == window
            for size in (0, 1, n - 1, 37, 300):
                x = cp.arange(size, dtype=np.float64) * (r + 1)
                C.all_reduce(world, x)
                assert np.array_equal(cp.asnumpy(x), np.arange(size) * sum(range(1, n + 1)))
                g = C.all_gather(world, cp.asarray(np.arange(size) + 100 * r))
                assert np.array_equal(cp.asnumpy(g), np.arange(size) + 100 * np.arange(n)[:, None])
                full = np.arange(n * size, dtype=np.float32).reshape(n, size)
                rs = C.reduce_scatter(world, cp.asarray(full * (r + 1)))
                assert np.array_equal(cp.asnumpy(rs), full[r:r + 1] * sum(range(1, n + 1)))
    return "ok"


@pytest.mark.parametrize("overlap", ["1", "auto"])     # the ring; whole through the board
def test_staged_ring_bookkeeping_at_every_window(overlap: str) -> None:
    env = {"MESH_CUDA_IPC": "0", "MESH_CUDA_OVERLAP": overlap}
    assert mesh.spawn(_ring_windows, 3, timeout=120, env=env) == ["ok"] * 3


def _modes_apart(world: mesh.Mesh) -> str:
    import os
    cp = fakecupy.install()
    os.environ["MESH_CUDA_OVERLAP"] = "1" if world.rank == 0 else "auto"
    try:
        C.all_reduce(world, cp.asarray(np.ones(50_000)))
    except mesh.MismatchError as e:
        return "mismatch" if "overlap" in str(e) else str(e)
    return "no error"


def test_staging_modes_set_apart_raise_mismatch_on_every_rank() -> None:
    """MESH_CUDA_OVERLAP=1 on one rank and auto on the other would take the
    overlapped ring on one and the board on the other: refused, named."""
    got = mesh.spawn(_modes_apart, 2, timeout=60, env={"MESH_CUDA_IPC": "0"})
    assert got == ["mismatch"] * 2


def test_an_unknown_staging_or_ipc_mode_is_refused() -> None:
    from collectives.device import cuda_ipc, paths
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MESH_CUDA_OVERLAP", "sometimes")
        with pytest.raises(ValueError, match="MESH_CUDA_OVERLAP='sometimes'"):
            paths.overlap_mode()
        # MESH_CUDA_IPC likewise (it was read as "auto": "off" or "false" left IPC on,
        # "true" or "yes" did not require it)
        for value in ("off", "true", "2"):
            mp.setenv("MESH_CUDA_IPC", value)
            with pytest.raises(ValueError, match=f"MESH_CUDA_IPC='{value}'"):
                cuda_ipc.mode()
        for value, want in (("", "auto"), (" Auto ", "auto"), ("0", "0"), ("1", "1")):
            mp.setenv("MESH_CUDA_IPC", value)
            assert cuda_ipc.mode() == want


def _mixed(world: mesh.Mesh) -> str:
    cp = fakecupy.install()
    a = cp.asarray(np.ones(50_000)) if world.rank == 0 else np.ones(50_000)
    try:
        C.all_reduce(world, a)
    except mesh.MismatchError as e:
        said = "mismatch" if "device" in str(e) else str(e)
    else:
        said = "no error"
    # a bad MESH_COLL_ALGO met by a large device array's all_reduce (device.large
    # reads the tuning before the call has a tag) is named as any other: rank, call
    import os
    os.environ["MESH_COLL_ALGO"] = "all_gather=rd"
    try:
        C.all_reduce(world, cp.asarray(np.ones(50_000)))
    except ValueError as e:
        head = f"rank {world.rank}: all_reduce on group world: MESH_COLL_ALGO='all_gather=rd'"
        return said if str(e).startswith(head) else str(e)
    finally:
        del os.environ["MESH_COLL_ALGO"]
    return "no error"


def test_device_and_host_arrays_in_one_call_raise_mismatch() -> None:
    """And a bad MESH_COLL_ALGO, met on the device paths, names the rank and the call."""
    assert mesh.spawn(_mixed, 2, timeout=60, env={"MESH_CUDA_IPC": "0"}) == ["mismatch"] * 2


def _half_average(world: mesh.Mesh) -> dict[str, list[float]]:
    """float16 averaged on a device array: small (staged whole) and large
    (the device paths), all_reduce, reduce and reduce_scatter."""
    cp = fakecupy.install()
    got: dict[str, list[float]] = {}
    for k in (4, 40_000):
        a = cp.asarray(np.full(k, 30000.0, np.float16))
        C.all_reduce(world, a, op="avg")
        got[f"all_reduce {k}"] = sorted(set(cp.asnumpy(a).tolist()))
        a = cp.asarray(np.full(k, 30000.0, np.float16))
        C.reduce(world, a, root=0, op="avg")
        got[f"reduce {k}"] = sorted(set(cp.asnumpy(a).tolist()))
        a = cp.asarray(np.full(k * world.size, 30000.0, np.float16))
        row = C.reduce_scatter(world, a, op="avg")
        got[f"reduce_scatter {k}"] = sorted(set(cp.asnumpy(row).tolist())) + [str(row.dtype)]
    _displaced(world, cp)
    _user_op(world, cp)
    return got


def _user_op(world: mesh.Mesh, cp: Any) -> None:
    """A user op (collectives.Op) on device arrays, small and large: staged
    whole (its function gets host arrays), in rank order, the results on
    the device."""
    n, r = world.size, world.rank
    seen = set()

    def mat(a: Any, b: Any) -> Any:
        seen.add(type(a))
        return (a.reshape(-1, 2, 2) @ b.reshape(-1, 2, 2)).reshape(a.shape)
    op = C.Op(mat, name="mat")
    for k in (2, 10_000):
        mats = [np.arange(4.0 * k).reshape(k, 4) % (p + 2) - p for p in range(n)]
        prods = [mats[0]]
        for p in range(1, n):
            prods.append(mat(prods[-1], mats[p]))
        a = cp.asarray(mats[r])
        assert C.all_reduce(world, a, op=op) is a
        assert np.array_equal(cp.asnumpy(a), prods[-1])
        got = C.scan(world, cp.asarray(mats[r]), op=op, async_op=True).wait()
        assert isinstance(got, cp.ndarray) and np.array_equal(cp.asnumpy(got), prods[r])
        counts = [k - 1, 0, 1]
        got = C.reduce_scatter_v(world, cp.asarray(mats[r]), counts, op=op)
        lo = sum(counts[:r])
        assert np.array_equal(cp.asnumpy(got), prods[-1][lo:lo + counts[r]])
    assert seen == {np.ndarray}, seen


def _displaced(world: mesh.Mesh, cp: Any) -> None:
    """The v-collectives' displacements on device arrays: blocks cut out of
    the root's and placed into out= (its other rows kept) or a new array."""
    r = world.rank
    counts, displs = [2, 1, 3], [1, 5, 8]
    A = np.arange(24.0).reshape(12, 2)
    got = C.scatter_v(world, cp.asarray(A) if r == 0 else None, counts, displs=displs)
    assert np.array_equal(cp.asnumpy(got), A[displs[r]:displs[r] + counts[r]]), got
    mine = cp.asarray(np.full((counts[r], 2), r, np.float64))
    want = np.full((12, 2), -1.0)
    for j in range(3):
        want[displs[j]:displs[j] + counts[j]] = j
    out = cp.asarray(np.full((12, 2), -1.0))
    assert C.all_gather_v(world, mine, counts, displs=displs, out=out) is out
    assert np.array_equal(cp.asnumpy(out), want)
    got = C.gather_v(world, mine, counts, displs=displs, async_op=True).wait()
    assert np.array_equal(cp.asnumpy(got), np.where(want < 0, 0, want)[:11]) if r == 0 \
        else got is None, got


def test_a_float16_average_of_device_arrays_is_taken_in_float32() -> None:
    """A CuPy float16 array's average was summed in float16 (three ranks'
    30000: inf), where numpy arrays and torch tensors average in float32.
    (Its ranks go on with the v-collectives' displacements and a user op.)"""
    for got in mesh.spawn(_half_average, 3, timeout=90, env={"MESH_TIMEOUT": "30"}):
        for k in (4, 40_000):
            assert got[f"all_reduce {k}"] == [30000.0], got
            assert got[f"reduce {k}"] == [30000.0], got
            assert got[f"reduce_scatter {k}"] == [30000.0, "float16"], got


def _required(world: mesh.Mesh) -> str:
    import os
    cp = fakecupy.install()
    if world.rank == 1:
        os.environ["MESH_CUDA_IPC"] = "0"
    try:
        C.all_reduce(world, cp.asarray(np.ones(50_000)))
    except mesh.MeshError as e:
        return "refused" if "MESH_CUDA_IPC=1" in str(e) else str(e)
    return "no error"


def test_required_ipc_that_a_peer_refuses_fails_on_every_rank() -> None:
    assert mesh.spawn(_required, 2, timeout=60, env={"MESH_CUDA_IPC": "1"}) == ["refused"] * 2


def _own_handle(world: mesh.Mesh) -> str:
    cp = fakecupy.install()
    mem = cp.cuda.Memory(4096)
    with pytest.raises(RuntimeError):
        cp.cuda.runtime.ipcOpenMemHandle(cp.cuda.runtime.ipcGetMemHandle(mem.ptr))
    return "ok"


def test_fake_refuses_to_open_its_own_handle_as_cuda_does() -> None:
    assert mesh.spawn(_own_handle, 1, timeout=30) == ["ok"]


def test_bench_paths_map_to_the_environment() -> None:
    from collectives.tools.bench import path_env
    assert path_env("auto") == {}
    assert path_env("ipc") == {"MESH_CUDA_IPC": "1"}
    assert path_env("staged") == {"MESH_CUDA_IPC": "0"}
    assert path_env("ring") == {"MESH_CUDA_IPC": "0", "MESH_CUDA_OVERLAP": "1"}
    assert path_env("simple") == {"MESH_CUDA_IPC": "0", "MESH_CUDA_OVERLAP": "0"}
    with pytest.raises(ValueError):
        path_env("nccl")


def _grad_reducer(world: mesh.Mesh) -> str:
    """GradReducer on device gradients: buckets on the GPU, two steps (the
    fusion buffers reused), ready() in backward order, every result against
    numpy; mixing host and device gradients is refused."""
    cp = fakecupy.install()
    n, r = world.size, world.rank
    shapes = [(30_000,), (300,), (40, 25), (7,), (2000,), (3, 3)]   # the first: a device ring
    dtypes = [np.float32, np.float32, np.float32, np.float64, np.float64, np.float32]
    grads = [cp.zeros(s, d) for s, d in zip(shapes, dtypes)]
    reducer = C.GradReducer(world, grads, bucket_bytes=4096)
    assert reducer.on_device and len(reducer.buckets) > 2
    for step in range(2):
        local = [np.arange(np.prod(s), dtype=d).reshape(s) * (r + 1) + step
                 for s, d in zip(shapes, dtypes)]
        for i in reversed(range(len(grads))):
            if i == 0 and step == 1:       # a new array for a gradient, as ready() allows
                grads[0] = cp.asarray(local[0])
                reducer.ready(0, grads[0])
                continue
            grads[i][...] = cp.asarray(local[i])
            reducer.ready(i)
        reducer.wait()
        for i, (s, d) in enumerate(zip(shapes, dtypes)):
            want = np.mean([np.arange(np.prod(s), dtype=d).reshape(s) * (p + 1) + step
                            for p in range(n)], axis=0).astype(d)
            assert np.allclose(cp.asnumpy(grads[i]), want), (step, i)
    with pytest.raises(TypeError, match="all host \\(numpy\\) or all device"):
        C.GradReducer(world, [cp.zeros(3), np.zeros(3)])
    return "ok"


def test_grad_reducer_on_device_gradients() -> None:
    assert mesh.spawn(_grad_reducer, 2, timeout=90, env=SMALL_SEGMENTS) == ["ok", "ok"]


def test_staging_returns_its_pinned_buffer_when_the_host_step_fails() -> None:
    """A collective that fails half-way (a lost peer, an abort) must not
    keep the pooled pinned buffer it staged through; but one whose wait for
    a copy ran out of time must not give it back (the late copy would write
    into a later call's data)."""
    from collectives.device import paths as staged
    from mesh import device

    cp = fakecupy.install()
    device.POOL.clear()
    flat = cp.arange(1000, dtype=np.float32)

    class Lanes:                               # copies and syncs only, on one stream
        down = up = cp.cuda.get_current_stream()

        def event(self, stream: Any) -> Any:
            return stream.record()

        def copy(self, dst: int, src: int, n: int, stream: Any) -> None:
            cp.cuda.runtime.memcpyAsync(dst, src, n, 4, stream.ptr)

        def sync(self) -> None:
            self.down.synchronize()

    lanes = Lanes()

    def boom(buf: Any) -> None:
        assert np.array_equal(buf, np.arange(1000, dtype=np.float32))
        raise RuntimeError("peer lost")

    class Late(Lanes):
        def sync(self) -> None:
            raise mesh.MeshTimeoutError("GPU work did not complete within 0s")

    try:
        with pytest.raises(RuntimeError, match="peer lost"):
            staged._via_host(lanes, flat, boom)
        assert sum(len(v) for v in device.POOL._free.values()) == 1
        device.POOL.clear()
        with pytest.raises(mesh.MeshTimeoutError):
            staged._via_host(Late(), flat, boom)
        assert sum(len(v) for v in device.POOL._free.values()) == 0
    finally:
        device.use(None)                       # later tests in this process see no stand-in
