"""collectives.horovod: Horovod's torch API over meshrun (one import changed)."""
from __future__ import annotations

import argparse
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


def _sparse_net(sparse: bool = True) -> Any:
    import torch
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"emb": torch.nn.Embedding(8, 3, sparse=sparse),
                                "lin": torch.nn.Linear(3, 1)}).double()


def _sparse_train(hvd: Any, as_dense: bool = False, steps: int = 2) -> tuple[bool, bool]:
    """An embedding with sparse gradients and a linear layer (float64)
    trained with DistributedOptimizer and SGD: rank q looks up q + 2 rows
    (uneven), row 7 on rank 0 only, row 6 on none. (Weights equal one
    process's on the full batch, the embedding's .grad still sparse.)"""
    import torch
    n, r = hvd.size(), hvd.rank()
    model, ref = _sparse_net(), _sparse_net()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                                   named_parameters=model.named_parameters(),
                                   sparse_as_dense=as_dense)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)

    def loss(m: Any, x: Any, w: Any) -> Any:
        return (m["lin"](m["emb"](x)).squeeze(1) * w).sum()
    for step in range(steps):
        idx = [torch.tensor([(3 * q + k + step) % 6 for k in range(q + 2)] + [7] * (q == 0))
               for q in range(n)]
        w = [torch.linspace(-1.0, 1.0 + q + step, len(i), dtype=torch.float64) for q, i in
             enumerate(idx)]
        total = sum(len(i) for i in idx)
        opt.zero_grad()
        (loss(model, idx[r], w[r]) * n / total).backward()
        opt.step()
        ref_opt.zero_grad()
        (sum(loss(ref, i, v) for i, v in zip(idx, w)) / total).backward()
        ref_opt.step()
    return _close(model, ref, rtol=1e-12, atol=1e-14), model["emb"].weight.grad.is_sparse


def _rows(path: str) -> dict[str, list[str]]:
    """A Horovod timeline read as chrome reads it (closed with "]" where it
    is not): each row's events, "B:NAME", "X:NAME", "E" (args: "E:dtype
    shape"), "i:NAME" for the global markers."""
    import json
    text = open(path).read().rstrip()
    events = json.loads(text if text.endswith("]") else text.rstrip(",") + "]")
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e["name"] == "process_name" and "name" in e["args"]}
    rows: dict[str, list[str]] = {}
    for e in events:
        if e["ph"] in "BXE":
            said = e["ph"] + (":" + e["name"] if "name" in e else "")
            if "args" in e:
                said += f":{e['args']['dtype']} {e['args']['shape']}"
            rows.setdefault(names[e["pid"]], []).append(said)
        elif e["ph"] == "i":
            rows.setdefault("", []).append("i:" + e["name"])
    return rows


def _sparse_cases(hvd: Any, timeline: str | None) -> dict[str, Any]:
    """Sparse allreduce (direct, joined, in DistributedOptimizer) and its
    errors; with ``timeline``, Horovod's timeline of an allreduce, an
    allgather and two DistributedOptimizer steps written there, its rows
    read back on rank 0."""
    import torch
    n, r = hvd.size(), hvd.rank()
    out: dict[str, Any] = {}
    if timeline:
        hvd.start_timeline(timeline)
    hvd.barrier()       # (from the next round on, every rank's entry time is marked)
    hvd.allreduce(torch.ones(3), name="tl")
    hvd.allgather(torch.ones(r + 1, 2), name="ag")
    out["train"] = _sparse_train(hvd)
    if r == 0 and timeline:
        out["rows"] = _rows(timeline)       # (not stopped: parses as it is)
    if timeline:
        hvd.stop_timeline()
    out["as_dense"] = _sparse_train(hvd, as_dense=True, steps=1)
    s = _mine(r)
    dense = sum(_mine(q).to_dense() for q in range(n))
    got = hvd.allreduce(s, op=hvd.Sum)
    avg = hvd.sparse_allreduce_async(s, "sp", hvd.Average)()
    t = s.clone()
    hvd.synchronize(hvd.allreduce_async_(t, op=hvd.Sum, postscale_factor=0.5))
    out["direct"] = (got.is_sparse and got.is_coalesced(), torch.equal(got.to_dense(), dense),
                     torch.allclose(avg.to_dense(), dense / n), torch.equal(t.to_dense(),
                                                                            dense / 2),
                     s._nnz(), torch.equal(hvd.allreduce(s).to_dense(), avg.to_dense()))
    # a joined rank answers with an empty one
    if r == n - 1:
        hvd.join()
    else:
        out["joined"] = torch.equal(hvd.allreduce(s, op=hvd.Sum).to_dense(),
                                    dense - _mine(n - 1).to_dense())
        hvd.join()
    out["op_max"] = _raises(lambda: hvd.allreduce(s, op=hvd.Max), NotImplementedError)
    out["op_adasum"] = _raises(lambda: hvd.allreduce(s, op=hvd.Adasum), NotImplementedError)
    m = _sparse_net()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), op=hvd.Max)
    m["lin"](m["emb"](torch.tensor([1, 2]))).sum().backward()
    out["opt_max"] = _raises(opt.step, NotImplementedError)
    m = _sparse_net(sparse=r != 1)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                   named_parameters=m.named_parameters())
    m["lin"](m["emb"](torch.tensor([1, 2]))).sum().backward()
    out["opt_mixed"] = _raises(opt.step, hvd.HorovodInternalError)
    return out


def _mine(q: int) -> Any:
    """Rank q's sparse tensor of _sparse_cases: rows q and 4 (4 twice:
    uncoalesced), values q + 1."""
    import torch
    return torch.sparse_coo_tensor(torch.tensor([[q, 4, 4]]), torch.ones(3, 2) * (q + 1),
                                   (6, 2), check_invariants=True)


def _hvd_cases(world: Any, tmp: str) -> dict[str, Any]:
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
                      hvd.allgather_object(r * 2),      # tuples: tuples on every rank
                      hvd.broadcast_object({"shape": (2, 3 + r)}, root_rank=1),
                      hvd.allgather_object((r, [(r,)])),
                      _raises(lambda: hvd.broadcast_object(argparse.Namespace(lr=r)),
                              TypeError))
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
    out["sparse"] = _sparse_cases(hvd, os.path.join(tmp, "run.json"))
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
    if pair is not None:        # (HOROVOD_TIMELINE: rank 0 cannot write there, then can)
        os.environ["HOROVOD_TIMELINE"] = os.path.join(tmp, "missing", "pair.json")
        out["timeline_bad"] = _raises(lambda: hvd.init(comm=pair), ValueError)
        hvd.shutdown()
        os.environ.update(HOROVOD_TIMELINE=os.path.join(tmp, "pair.json"),
                          HOROVOD_TIMELINE_MARK_CYCLES="1")
        hvd.init(comm=pair)
        del os.environ["HOROVOD_TIMELINE"], os.environ["HOROVOD_TIMELINE_MARK_CYCLES"]
        out["two"] = _adasum_cases(hvd)
        out["two"]["sparse"] = _sparse_cases(hvd, None)
        hvd.shutdown()
        if world.rank == 0:
            rows = _rows(os.path.join(tmp, "pair.json"))
            out["two"]["timeline"] = (sorted({e for k, v in rows.items() for e in v
                                              if e.startswith(("B:", "i:"))}),
                                      rows.get("allreduce.tl"))
    # Horovod's hvd.init(comm=MPI.COMM_...) with the mpi4py import changed too
    from collectives import MPI
    hvd.init(comm=MPI.COMM_SELF)
    out["mpi_comm"] = (hvd.size(), hvd.rank(), hvd.allreduce(t, op=hvd.Sum).tolist())
    hvd.shutdown()
    return out


@pytest.mark.timeout(200)
def test_horovod_script_trains_as_one_process_and_collectives_match_horovod(
        tmp_path: Any) -> None:
    """At 3 ranks, as Horovod's: the mnist loop's weights equal single-process
    training on the full batch (backward_passes_per_step=2 and gradient
    clipping between synchronize and step too; fp16 compression to its
    rounding), join's zeros, and each collective's results."""
    torch = pytest.importorskip("torch")
    n = 3
    res = mesh.spawn(_hvd_cases, n, str(tmp_path), timeout=150)
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
        assert o["objects"][:4] == ({"epoch": 6}, [0, 2, 4], {"shape": (2, 4)},
                                    [(q, [(q,)]) for q in range(n)]), o["objects"]
        assert o["objects"][4].startswith(f"TypeError: hvd.broadcast_object: rank {r}: ") and \
            "type Namespace" in o["objects"][4] and "vars(obj)" in o["objects"][4]
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
        _check_sparse(o["sparse"], r, n)
        if r == 0:
            _check_timeline(o["sparse"]["rows"], n)
        if r < 2:
            assert (o["timeline_bad"] == "no error") == (r == 1), o["timeline_bad"]
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
            _check_sparse(two["sparse"], r, 2)
    bad = os.path.join(str(tmp_path), "missing", "pair.json")
    assert res[0]["timeline_bad"] == (f"ValueError: rank 0: hvd.init: cannot write the timeline "
                                      f"to {bad!r} (HOROVOD_TIMELINE): No such file or "
                                      f"directory"), res[0]["timeline_bad"]
    phases, row = res[0]["two"]["timeline"]     # HOROVOD_TIMELINE, _MARK_CYCLES=1, 2 ranks
    assert {"B:NEGOTIATE_ADASUM", "B:ADASUM", "B:MESHRUN_ADASUM_ALLREDUCE", "i:CYCLE_START",
            "B:MEMCPY_IN_FUSION_BUFFER", "B:NEGOTIATE_ALLGATHER"} <= set(phases), phases
    assert row[0] == "B:NEGOTIATE_ALLREDUCE" and sorted(row[1:3]) == ["X:0", "X:1"], row


def _check_sparse(sp: dict[str, Any], r: int, n: int) -> None:
    """_sparse_cases' results on rank r of n."""
    assert sp["train"] == (True, True), sp["train"]
    assert sp["as_dense"] == (True, False), sp["as_dense"]
    assert sp["direct"] == (True, True, True, True, 3, True), sp["direct"]
    assert sp.get("joined") == (True if r < n - 1 else None)
    for op in ("max", "adasum"):
        said = sp["op_" + op]
        assert said.startswith(f"NotImplementedError: rank {r}: hvd.allreduce: a sparse tensor "
                               f"is reduced with op=hvd.Sum or hvd.Average only") and \
            f"not op=hvd.{op.title()}" in said, said
    assert sp["opt_max"].startswith("NotImplementedError") and \
        "'allreduce.noname.0.0' has sparse gradients" in sp["opt_max"] and \
        "sparse_as_dense=True" in sp["opt_max"], sp["opt_max"]
    assert sp["opt_mixed"] == (f"MismatchError: rank {r}: DistributedOptimizer: parameter "
                               f"'emb.weight' has a dense gradient on rank 1 and a sparse one on "
                               f"rank 0: a parameter's gradients are sparse on every rank or on "
                               f"none (sparse_as_dense=True reduces them dense)"), sp["opt_mixed"]


def _check_timeline(rows: dict[str, list[str]], n: int) -> None:
    """Horovod's rows and phases: an allreduce and an allgather (negotiated:
    each rank's ready mark), two DistributedOptimizer steps (a dense
    gradient through its fusion bucket, the embedding's sparse one)."""
    def negotiated(events: list[str], kind: str) -> list[str]:
        assert events[0] == f"B:NEGOTIATE_{kind}" and events[n + 1] == "E", events
        assert sorted(events[1:n + 1]) == [f"X:{q}" for q in range(n)], events
        return events[n + 2:]
    assert negotiated(rows["allreduce.tl"], "ALLREDUCE") == [
        "B:ALLREDUCE", "B:MESHRUN_ALLREDUCE", "E", "E:float32 [3]"]
    assert negotiated(rows["allgather.ag"], "ALLGATHER") == [
        "B:ALLGATHER", "B:MESHRUN_ALLGATHER", "E", f"E:float32 [{n * (n + 1) // 2}, 2]"]
    step = [k for k in rows if k.startswith("DistributedOptimizer.")]
    assert len(step) == 1, rows.keys()
    assert negotiated(negotiated(rows[step[0]], "ALLREDUCE"), "ALLREDUCE") == []   # 2 steps
    for name, shape in (("lin.weight", "[1, 3]"), ("lin.bias", "[1]")):
        assert rows["allreduce." + name] == 2 * [
            "B:ALLREDUCE", "B:WAIT_FOR_OTHER_TENSOR_DATA", "E", "B:MEMCPY_IN_FUSION_BUFFER", "E",
            "B:MESHRUN_ALLREDUCE", "E", "B:MEMCPY_OUT_FUSION_BUFFER", "E",
            f"E:float64 {shape}"], rows["allreduce." + name]
    emb = rows["allreduce.emb.weight"]
    assert emb == 2 * ["B:ALLREDUCE", "B:MESHRUN_ALLGATHER", "E", "E:float64 [8, 3]"], emb


def test_hvd_elastic_commit_refuses_what_msgpack_cannot_write() -> None:
    """A commit holding a value msgpack cannot write (a tensor outside a
    model or optimizer) raises on rank 0, naming the state's values
    (meshrun never pickles); before, hvd.elastic.* raised NotImplementedError."""
    torch = pytest.importorskip("torch")
    import collectives.horovod as hvd
    state = hvd.elastic.ObjectState(epoch=0, weights=torch.ones(2))
    with pytest.raises(TypeError, match=r"\['epoch', 'weights'\] are written in msgpack"):
        state._kept()
    state.epoch, state.weights = 3, [1, (2, 3)]
    state.save()
    got = hvd.elastic.ObjectState(epoch=0, weights=None)
    got._take(state._kept())
    got.restore()
    assert (got.epoch, got.weights) == (3, [1, (2, 3)])    # (tuples kept)
    assert hvd.elastic.HostsUpdatedInterrupt(True).skip_sync


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


def test_timeline_file_is_a_json_array_after_every_event(tmp_path: Any) -> None:
    """The timeline writer (no processes): the file parses after each
    write, as a job that dies leaves it; a row name with quotes, a
    backslash and a newline comes back as it was; a global marker."""
    pytest.importorskip("torch")
    import json
    from collectives.horovod.timeline import Timeline, now
    path = str(tmp_path / "t.json")
    tl = Timeline(path, mark_cycles=True)
    odd = 'allreduce.a "b"\\\n{c}]'
    seen = []
    for k in range(3):
        t = now()
        tl.negotiated(odd, "ALLREDUCE", {1: t, 0: t + 5}, t + 10)
        tl.op(odd, "ALLREDUCE", now(), [("MESHRUN_ALLREDUCE", now(), now())], now())
        tl.marker()
        seen.append(len(json.load(open(path))))
    tl.close()
    events = json.load(open(path))
    assert seen == [2 + 2 + 9 * k for k in (1, 2, 3)], seen     # (header, row, events)
    assert [e["args"]["name"] for e in events if e.get("args", {}).get("name")] == [odd]
    assert _rows(path)[odd][:5] == ["B:NEGOTIATE_ALLREDUCE", "X:1", "X:0", "E",   # (by entry)
                                    "B:ALLREDUCE"]
    assert _rows(path)[""] == ["i:CYCLE_START"] * 3
    assert all(e["ts"] >= 0 for e in events if "ts" in e)
    # settle() (synchronize, step()) returns with every finished call written: also one
    # whose done-callback, in the lane's thread, has claimed it and not yet written it
    import threading
    tl = Timeline(path, mark_cycles=False)
    claimed, go = threading.Event(), threading.Event()

    class Finished:     # (a meshrun Work that has finished; its lane slow to write it)
        def done(self) -> bool:
            return True

        def wait(self) -> Any:
            claimed.set()
            assert go.wait(60)
            return None

        def add_done_callback(self, fn: Any) -> None:
            threading.Thread(target=fn, args=(self,), daemon=True).start()
    tl.watch("allreduce.late", "ALLREDUCE", "MESHRUN_ALLREDUCE", now(), Finished())
    assert claimed.wait(60)
    threading.Timer(0.2, go.set).start()    # (the lane goes on; settle must wait for it)
    tl.settle()
    assert _rows(path)["allreduce.late"] == ["B:ALLREDUCE", "B:MESHRUN_ALLREDUCE", "E", "E"]
    tl.close()
