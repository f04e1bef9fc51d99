"""collectives.horovod: Horovod's torch API over meshrun (one import changed)."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from typing import Any, Callable

import pytest

import mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, STEPS, LR = 4, 3, 0.1      # each rank's rows a step


def _model(seed: int) -> Any:
    import torch
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(3 * 4 * 4, 4), torch.nn.LogSoftmax(dim=1))


def _batch(step: int, rank: int, micro: int = 0) -> tuple[Any, Any]:
    import torch
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randn(ROWS, 1, 6, 6, generator=g), torch.randint(0, 4, (ROWS,), generator=g)


def _full(step: int, n: int, micro: int = 0) -> tuple[Any, Any]:
    import torch
    xs, ys = zip(*(_batch(step, r, micro) for r in range(n)))
    return torch.cat(xs), torch.cat(ys)


def _train(hvd: Any, n: int, k: int = 1, compression: Any = None, clip: float = 0.0,
           ranks_steps: Callable[[int], int] = lambda r: STEPS) -> Any:
    """Horovod's pytorch_mnist.py shape: rank 0's weights broadcast, the
    optimizer wrapped, ``k`` backward passes a step; returns this rank's
    model, its single-process reference (the full batch each step), and
    (join's result, how many ranks had a batch each step)."""
    import torch
    import torch.nn.functional as F
    model = _model(seed=hvd.rank())            # broadcast_parameters makes them rank 0's
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   backward_passes_per_step=k,
                                   compression=compression or hvd.Compression.none)
    mine, counted = ranks_steps(hvd.rank()), []
    for step in range(mine):
        counted.append(hvd.allreduce(torch.ones(1), op=hvd.Sum).item())   # joined: zeros
        opt.zero_grad()
        for m in range(k):
            x, y = _batch(step, hvd.rank(), m)
            F.nll_loss(model(x), y).backward()
        if clip:
            opt.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            with opt.skip_synchronize():
                opt.step()
        else:
            opt.step()
    last = hvd.join() if ranks_steps(0) != STEPS else -1
    ref = _model(seed=0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.5)
    for step in range(mine):
        ref_opt.zero_grad()
        for m in range(k):
            active = [r for r in range(n) if step < ranks_steps(r)]
            for r in active:     # each rank's mean loss, their gradients averaged over n
                x, y = _batch(step, r, m)
                (F.nll_loss(ref(x), y) / n).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        ref_opt.step()
    return model, ref, (last, counted)


def _close(a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    import torch
    return all(torch.allclose(p, q, rtol=rtol, atol=atol)
               for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def _raises(fn: Callable[[], Any], kind: type = Exception) -> str:
    try:
        fn()
    except kind as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _adasum_ref(vectors: list[Any]) -> Any:
    """Horovod's Adasum of one tensor's per-rank values (numpy float64):
    pairs (0, 1), (2, 3)... combined, then the pairs' results, and so on."""
    import numpy as np
    tiny = np.sqrt(sys.float_info.min)
    vs = [np.asarray(v, np.float64).reshape(-1) for v in vectors]
    while len(vs) > 1:
        nxt = []
        for a, b in zip(vs[::2], vs[1::2]):
            d, aa, bb = a @ b, a @ a, b @ b
            nxt.append((1 - d / aa / 2 if aa >= tiny else 1.0) * a
                       + (1 - d / bb / 2 if bb >= tiny else 1.0) * b)
        vs = nxt
    return vs[0].reshape(np.shape(vectors[0]))


def _sync_bn(hvd: Any, steps: int = 2) -> tuple[bool, bool]:
    """hvd.SyncBatchNorm (after a Conv2d, and a 1d one with momentum=None)
    on uneven float64 batches (rank r: r + 2 rows), trained with
    DistributedOptimizer: (weights and running statistics, eval outputs)
    equal to torch's BatchNorm on the full batch in one process."""
    import torch
    n, r = hvd.size(), hvd.rank()

    def net(bn2: Any, bn1: Any) -> Any:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), bn2(2), torch.nn.ReLU(),
                                   torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3),
                                   bn1(3, momentum=None)).double()
    model = net(hvd.SyncBatchNorm, hvd.SyncBatchNorm)
    ref = net(torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                                   named_parameters=model.named_parameters())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    rows = [q + 2 for q in range(n)]
    total, mine = sum(rows), slice(sum(rows[:r]), sum(rows[:r + 1]))
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(total, 1, 6, 6, generator=g, dtype=torch.float64)
        w = torch.randn(total, 3, generator=g, dtype=torch.float64)
        opt.zero_grad()     # (averaged over the n ranks: the full batch's mean)
        ((model(x[mine]) * w[mine]).sum() * n / total).backward()
        opt.step()
        ref_opt.zero_grad()
        ((ref(x) * w).sum() / total).backward()
        ref_opt.step()
    model.eval()
    ref.eval()
    x = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    return _close(model, ref, rtol=1e-10, atol=1e-12), \
        torch.allclose(model(x), ref(x), rtol=1e-10, atol=1e-12)


def _adasum_cases(hvd: Any) -> dict[str, Any]:
    """Adasum on 2 ranks: values against _adasum_ref, and Horovod's delta
    optimizer against n optimizers stepped in one process."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    n, r = hvd.size(), hvd.rank()
    out: dict[str, Any] = {}
    out["orth_same"] = (hvd.allreduce(torch.tensor([2.0, 0.0] if r == 0 else [0.0, 2.0]),
                                      op=hvd.Adasum).tolist(),
                        hvd.allreduce(torch.tensor([3.0, 4.0]), op=hvd.Adasum).tolist())
    mine = [torch.randn(5, 3, generator=torch.Generator().manual_seed(10 * q),
                        dtype=torch.float64) for q in range(n)]
    small = [torch.randn(2, generator=torch.Generator().manual_seed(10 * q + 1))
             for q in range(n)]
    got = hvd.allreduce(mine[r], op=hvd.Adasum, prescale_factor=2.0)
    out["values"] = (np.allclose(got.numpy(), _adasum_ref([2 * m.numpy() for m in mine]),
                                 rtol=1e-13, atol=0), got.tolist())
    grouped = hvd.grouped_allreduce([mine[r], small[r]], op=hvd.Adasum)
    u = small[r].half()
    hvd.synchronize(hvd.allreduce_async_(u, op=hvd.Adasum))
    out["grouped"] = (torch.equal(grouped[0], hvd.allreduce(mine[r], op=hvd.Adasum)),
                      np.allclose(grouped[1].numpy(), _adasum_ref([s.numpy() for s in small]),
                                  rtol=1e-6), u.dtype,
                      np.allclose(u.float().numpy(), _adasum_ref([s.numpy() for s in small]),
                                  rtol=2e-3, atol=2e-3))
    # Horovod's Adasum optimizer: each rank's own SGD (momentum) step, the changes combined
    model = _model(seed=0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5),
                                   named_parameters=model.named_parameters(), op=hvd.Adasum)
    out["adasum_skip"] = _raises(lambda: opt.skip_synchronize().__enter__(), AssertionError)
    refs = [_model(seed=0) for _ in range(n)]
    ref_opts = [torch.optim.SGD(m.parameters(), lr=LR, momentum=0.5) for m in refs]
    for step in range(STEPS):
        opt.zero_grad()
        x, y = _batch(step, r)
        F.nll_loss(model(x), y).backward()
        opt.step()
        starts = [[p.detach().clone() for p in m.parameters()] for m in refs]
        for q, (m, o) in enumerate(zip(refs, ref_opts)):
            o.zero_grad()
            F.nll_loss(m(_batch(step, q)[0]), _batch(step, q)[1]).backward()
            o.step()
        with torch.no_grad():
            for i, ps in enumerate(zip(*(m.parameters() for m in refs))):
                delta = _adasum_ref([(p - s[i]).numpy() for p, s in zip(ps, starts)])
                for p, s in zip(ps, starts):
                    p.copy_(s[i] + torch.from_numpy(delta))
    out["adasum_opt"] = (_close(model, refs[0], rtol=1e-5, atol=1e-6),
                         _close(model, _model(seed=0)))
    # a joined rank gives zeros: the other's Adasum is its own tensor
    out["adasum_join"] = hvd.allreduce(torch.tensor([3.0, 4.0]), op=hvd.Adasum).tolist() \
        if r == 0 else None
    hvd.join()
    out["sync_bn"] = _sync_bn(hvd)
    out["mismatch"] = _raises(lambda: hvd.allreduce(torch.zeros(3 + r), op=hvd.Adasum),
                              hvd.HorovodInternalError)
    return out


def _hvd_cases(world: Any) -> dict[str, Any]:
    import torch
    import collectives.horovod as hvd
    hvd.init()
    n, r = hvd.size(), hvd.rank()
    out: dict[str, Any] = {"ranks": (r, n, hvd.local_rank(), hvd.local_size(),
                                     hvd.cross_rank(), hvd.cross_size(), hvd.is_initialized())}
    # training: the canonical loop, backward_passes_per_step=2, fp16, clipping
    model, ref, _ = _train(hvd, n)
    out["train"] = _close(model, ref)
    model, ref, _ = _train(hvd, n, k=2)
    out["passes2"] = _close(model, ref)
    model, ref, _ = _train(hvd, n, compression=hvd.Compression.fp16)
    out["fp16"] = (_close(model, ref, rtol=1e-2, atol=1e-3), _close(model, ref))
    model, ref, _ = _train(hvd, n, clip=0.05)
    out["clip"] = _close(model, ref)
    # join: rank r has r + 1 batches; the joined ranks count zeros
    model, ref, (last, active) = _train(hvd, n, ranks_steps=lambda q: q + 1)
    out["join"] = (_close(model, ref), last, active)
    # the collectives
    t = torch.arange(3.0) + r
    out["avg"] = hvd.allreduce(t).tolist()
    out["sum_scaled"] = hvd.allreduce(t, op=hvd.Sum, prescale_factor=2.0,
                                      postscale_factor=0.5).tolist()
    out["old_average"] = hvd.allreduce(t, average=False).tolist()
    out["minmaxprod"] = [hvd.allreduce(t + 1, op=o).tolist()
                         for o in (hvd.Min, hvd.Max, hvd.Product)]
    out["input_kept"] = t.tolist()
    u = t.clone()
    h = hvd.allreduce_async_(u, op=hvd.Sum, name="u")
    while not hvd.poll(h):
        pass
    out["async_"] = (hvd.synchronize(h) is u, u.tolist())
    out["grouped"] = [x.tolist() for x in hvd.grouped_allreduce([t, t[:1] * 10], op=hvd.Sum)]
    out["fp16_allreduce"] = hvd.allreduce(torch.full((2,), 1000.0 * (r + 1)),
                                          compression=hvd.Compression.fp16).dtype
    out["allgather"] = hvd.allgather(torch.full((r + 1, 2), float(r))).tolist()
    out["allgather_async"] = hvd.synchronize(hvd.allgather_async(t[:1])).tolist()
    rows = torch.arange(float(sum(range(1, n + 1)))) + 100 * r   # rows j+1 to rank j
    got, splits = hvd.alltoall(rows, splits=[j + 1 for j in range(n)])
    out["alltoall"] = (got.tolist(), splits.tolist(), splits.dtype)
    out["alltoall_even"] = hvd.alltoall(torch.arange(float(n)) + 10 * r).tolist()
    b = torch.full((2,), float(r))
    out["broadcast"] = (hvd.broadcast(b, root_rank=1).tolist(), b.tolist())
    hvd.broadcast_(b, root_rank=n - 1)
    out["broadcast_"] = b.tolist()
    out["reducescatter"] = hvd.reducescatter(torch.ones(7, 2) * (r + 1), op=hvd.Sum).tolist()
    out["objects"] = (hvd.broadcast_object({"epoch": 5 + r}, root_rank=1),
                      hvd.allgather_object(r * 2))
    x = torch.tensor([r + 1.0], requires_grad=True)
    (hvd.allreduce(x, op=hvd.Sum) * (r + 1)).sum().backward()
    out["autograd"] = x.grad.tolist()
    ps = hvd.add_process_set([0, n - 1])
    out["process_set"] = (ps.included(), ps.rank(), ps.size(),
                          hvd.allreduce(t, op=hvd.Sum, process_set=ps).tolist()
                          if ps.included() else None)
    hvd.barrier()
    out["adasum"] = (_raises(lambda: hvd.allreduce(t, op=hvd.Adasum), NotImplementedError),
                     _raises(lambda: hvd.DistributedOptimizer(
                         torch.optim.SGD(_model(0).parameters(), lr=0.1), op=hvd.Adasum),
                         NotImplementedError),
                     _raises(lambda: hvd.reducescatter(t, op=hvd.Adasum), NotImplementedError))
    out["sync_bn"] = _sync_bn(hvd)
    out["bn_channels"] = _raises(lambda: hvd.SyncBatchNorm(3)(torch.zeros(4, 2)), ValueError)
    # a collective join does not cover: every rank raises, naming the joined one
    if r == 0:
        out["join_allgather"] = _raises(hvd.join, RuntimeError)
    else:
        out["join_allgather"] = _raises(lambda: hvd.allgather(t), RuntimeError)
    # Horovod's guards: zero_grad between backward and step; step after synchronize warns
    m = _model(0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1))
    m(torch.ones(1, 1, 6, 6)).sum().backward()
    out["zero_grad"] = _raises(opt.zero_grad, AssertionError)
    opt.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    out["warned"] = any("skip_synchronize" in str(w.message) for w in caught)
    # meshrun's errors come through naming ranks (shapes that differ)
    out["mismatch"] = _raises(lambda: hvd.allreduce(torch.zeros(3 + (r == 1))),
                              hvd.HorovodInternalError)
    hvd.shutdown()
    out["after"] = hvd.is_initialized()
    # Adasum (power-of-two ranks) and SyncBatchNorm at 2 ranks: hvd over a group of the world
    pair = world.group([0, 1])
    if pair is not None:
        hvd.init(comm=pair)
        out["two"] = _adasum_cases(hvd)
        hvd.shutdown()
    # Horovod's hvd.init(comm=MPI.COMM_...) with the mpi4py import changed too
    from collectives import MPI
    hvd.init(comm=MPI.COMM_SELF)
    out["mpi_comm"] = (hvd.size(), hvd.rank(), hvd.allreduce(t, op=hvd.Sum).tolist())
    hvd.shutdown()
    return out


@pytest.mark.timeout(200)
def test_horovod_script_trains_as_one_process_and_collectives_match_horovod() -> None:
    """At 3 ranks, as Horovod's: the mnist loop's weights equal single-process
    training on the full batch (backward_passes_per_step=2 and gradient
    clipping between synchronize and step too; fp16 compression to its
    rounding), join's zeros, and each collective's results."""
    torch = pytest.importorskip("torch")
    n = 3
    res = mesh.spawn(_hvd_cases, n, timeout=150)
    for r, o in enumerate(res):
        assert o["ranks"] == (r, n, r, n, 0, 1, True)
        assert o["train"] and o["passes2"] and o["clip"], (r, o)
        assert o["fp16"] == (True, False), (r, o["fp16"])     # rounded: close, not equal
        assert o["autograd"] == [6.0]
        sets = {0: (True, 0, 2, [n - 1.0, n + 1.0, n + 3.0]), n - 1: (True, 1, 2,
                [n - 1.0, n + 1.0, n + 3.0])}
        assert o["process_set"] == sets.get(r, (False, -1, 2, None)), o["process_set"]
        assert o["join"] == (True, n - 1, [3.0, 2.0, 1.0][:r + 1]), (r, o["join"])
        assert o["avg"] == [1.0, 2.0, 3.0]
        assert o["sum_scaled"] == o["old_average"] == [3.0, 6.0, 9.0]
        assert o["minmaxprod"] == [[1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [6.0, 24.0, 60.0]]
        assert o["input_kept"] == [r, r + 1.0, r + 2.0]
        assert o["async_"] == (True, [3.0, 6.0, 9.0])
        assert o["grouped"] == [[3.0, 6.0, 9.0], [30.0]]
        assert o["fp16_allreduce"] == torch.float32
        assert o["allgather"] == [[float(q), float(q)] for q in range(n) for _ in range(q + 1)]
        assert o["allgather_async"] == [float(q) for q in range(n)]
        start = sum(range(1, r + 1))
        assert o["alltoall"] == ([100.0 * q + start + i for q in range(n) for i in range(r + 1)],
                                 [r + 1] * n, torch.int32)
        assert o["alltoall_even"] == [10.0 * q + r for q in range(n)]
        assert o["broadcast"] == ([1.0, 1.0], [float(r)] * 2)
        assert o["broadcast_"] == [n - 1.0] * 2
        share = [3, 2, 2][r]
        assert o["reducescatter"] == [[6.0, 6.0]] * share
        assert o["objects"] == ({"epoch": 6}, [0, 2, 4])
        assert all(e.startswith("NotImplementedError") and "Adasum" in e for e in o["adasum"])
        assert "non-power of 2" in o["adasum"][0] and "non-power of 2" in o["adasum"][1]
        assert o["sync_bn"] == (True, True)
        assert o["bn_channels"] == (f"ValueError: rank {r}: hvd.SyncBatchNorm(3): expected input "
                                    f"of 3 channels (its dimension 1), got size [4, 2]")
        assert "RuntimeError" in o["join_allgather"] and "join" in o["join_allgather"]
        if r:
            assert "rank 0 has called hvd.join()" in o["join_allgather"], o["join_allgather"]
        assert o["zero_grad"].startswith("AssertionError") and o["warned"]
        assert "Mismatch" in o["mismatch"] and "rank 1" in o["mismatch"], o["mismatch"]
        assert o["after"] is False
        assert o["mpi_comm"] == (1, 0, [r, r + 1.0, r + 2.0]), o["mpi_comm"]
        if r < 2:
            two = o["two"]
            assert two["orth_same"] == ([2.0, 2.0], [3.0, 4.0]), two["orth_same"]
            assert two["values"][0] and two["values"][1] == res[0]["two"]["values"][1]
            assert two["grouped"] == (True, True, torch.float16, True), two["grouped"]
            assert two["adasum_opt"] == (True, False), two["adasum_opt"]
            assert two["adasum_skip"].startswith("AssertionError")
            assert two["adasum_join"] == ([3.0, 4.0] if r == 0 else None)
            assert two["sync_bn"] == (True, True)
            assert "Mismatch" in two["mismatch"] and "adasum" in two["mismatch"], two["mismatch"]


@pytest.mark.timeout(120)
def test_horovod_mnist_example_runs_under_meshrun() -> None:
    """examples/horovod_mnist.py, Horovod's script with its import changed,
    under ``meshrun -n 2``: hvd.init() joins the job itself."""
    pytest.importorskip("torch")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "mesh.launch", "-n", "2",
                        os.path.join(ROOT, "examples", "horovod_mnist.py")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 ranks: weights equal single-process full-batch training: True" in p.stdout


class _FakeCtx:
    """One rank of an in-process group for adasum_vhdd: messages through
    queues (threads as ranks), no mesh."""

    class _G:
        def __init__(self, rank: int, size: int) -> None:
            self.rank, self.size = rank, size

    class _Sent:
        def wait(self) -> None:
            return None

    def __init__(self, rank: int, size: int, boxes: dict[tuple[int, int], Any]) -> None:
        self.g, self.boxes = self._G(rank, size), boxes

    def isend(self, obj: Any, dst: int) -> Any:
        import numpy as np
        self.boxes[(self.g.rank, dst)].put(np.array(obj, copy=True))
        return self._Sent()

    def recv(self, src: int, out: Any) -> Any:
        out[...] = self.boxes[(src, self.g.rank)].get(timeout=30)
        return out


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_adasum_vector_halving_distance_doubling_equals_the_pairwise_tree(n: int) -> None:
    """adasum_vhdd (Horovod's order: halves exchanged, each tensor's dot
    and norms summed over the block) gives the pairwise tree's values on
    every rank, the same bits on each; tensors cut anywhere by the halving,
    an empty one, and a zero one (its coefficient stays 1)."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("torch")
    import queue
    import threading
    from collectives.horovod.adasum import adasum_vhdd
    counts = [5, 0, 1, 13, 2]
    rng = np.random.default_rng(n)
    data = [rng.standard_normal(sum(counts)) for _ in range(n)]
    data[-1][5:6] = 0.0
    boxes = {(i, j): queue.Queue() for i in range(n) for j in range(n)}
    bufs = [d.copy() for d in data]
    threads = [threading.Thread(target=adasum_vhdd, args=(_FakeCtx(q, n, boxes), bufs[q],
                                                          counts)) for q in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ends = np.cumsum([0] + counts)
    want = np.concatenate([_adasum_ref([d[s:e] for d in data])
                           for s, e in zip(ends[:-1], ends[1:])])
    assert all(np.array_equal(b, bufs[0]) for b in bufs)
    np.testing.assert_allclose(bufs[0], want, rtol=1e-13, atol=1e-15)
