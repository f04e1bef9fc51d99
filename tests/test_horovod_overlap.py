"""collectives.horovod: DistributedOptimizer's reductions overlap backward
from the first step, as Horovod's hooks do, and its edge cases as Horovod's."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import mesh

LR, STEPS = 0.1, 3


class _Net:
    """Three linear layers, the middle one applied twice (its gradient
    produced twice in one backward, accumulated once), ``spare`` used by no
    rank and ``some`` by rank 0 only (float64). (Those two first: the
    buckets launch in reverse parameter order, and one holding a gradient
    that is not made waits for step(), as do the buckets after it.)"""

    def __init__(self) -> None:
        import torch
        torch.manual_seed(0)
        L = torch.nn.Linear
        self.m = torch.nn.ModuleDict({"spare": L(2, 2), "some": L(6, 6), "l0": L(4, 6),
                                      "l1": L(6, 6), "l2": L(6, 3)}).double()

    def loss(self, x: Any, y: Any, some: bool) -> Any:
        m = self.m
        h = m["l0"](x).relu()
        h = m["l1"](m["l1"](h).tanh())
        if some:
            h = m["some"](h)
        return ((m["l2"](h) - y) ** 2).mean()


def _batch(step: int, r: int) -> tuple[Any, Any]:
    import torch
    g = torch.Generator().manual_seed(100 * step + r)
    return (torch.randn(3, 4, generator=g, dtype=torch.float64),
            torch.randn(3, 3, generator=g, dtype=torch.float64))


def _cases(world: Any, out: str) -> None:
    """Rank r's results written to out/r.json; at the end rank 1 dies
    in a backward and rank 0 writes what its step raised."""
    import time

    import torch
    from torch.utils.checkpoint import checkpoint

    import collectives.buckets as B
    import collectives.horovod as hvd
    hvd.init()
    n, r = hvd.size(), hvd.rank()
    res: dict[str, Any] = {}
    launched = [0]
    real = B.all_reduce

    def counted(*a: Any, **k: Any) -> Any:      # every bucket's call
        launched[0] += 1
        return real(*a, **k)
    B.all_reduce = counted
    os.environ["HOROVOD_FUSION_THRESHOLD"] = "0"        # a bucket a gradient
    for k in (1, 2):
        net, ref = _Net(), _Net()
        opt = hvd.DistributedOptimizer(
            torch.optim.SGD(net.m.parameters(), lr=LR, momentum=0.5, weight_decay=0.1),
            named_parameters=net.m.named_parameters(), backward_passes_per_step=k)
        seen: list[int] = []
        # the first layer's weight: the last gradient backward makes (this hook runs
        # after the optimizer's, registered first: how many buckets are out by then)
        net.m["l0"].weight.register_post_accumulate_grad_hook(
            lambda p: seen.append(launched[0]))
        ref_opt = torch.optim.SGD(ref.m.parameters(), lr=LR, momentum=0.5, weight_decay=0.1)
        for step in range(STEPS):
            launched[0] = 0
            opt.zero_grad()
            for _ in range(k):
                net.loss(*_batch(step, r), some=r == 0).backward()
            opt.step()
            ref_opt.zero_grad()
            for _ in range(k):
                for q in range(n):
                    (ref.loss(*_batch(step, q), some=q == 0) / n).backward()
            for p in ref.m.parameters():        # Horovod's: none had one, zeros
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            ref_opt.step()
        res[f"k{k}"] = (seen, all(torch.allclose(a, b, rtol=1e-12, atol=1e-14)
                                  for a, b in zip(net.m.parameters(), ref.m.parameters())),
                        net.m["spare"].weight.grad is not None and
                        not net.m["spare"].weight.grad.any().item())
    # fp16: a gradient this rank did not make still gets the others' average
    net = _Net()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(net.m.parameters(), lr=LR),
                                   compression=hvd.Compression.fp16)
    for step in range(2):
        opt.zero_grad()
        net.loss(*_batch(step, r), some=r == 0).backward()
        opt.step()
    got = net.m["some"].weight.grad
    res["fp16_unused_here"] = None if got is None else \
        hvd.allreduce(got, op=hvd.Max).equal(hvd.allreduce(got, op=hvd.Min))
    # a gradient accumulated twice in one backward (reentrant checkpoint): Horovod's error
    net = _Net()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(net.m.parameters(), lr=LR))
    x, y = _batch(0, r)
    x.requires_grad_()     # (else the checkpoint's output needs no gradient)
    h = checkpoint(net.m["l0"], x, use_reentrant=True)
    try:
        ((net.m["l2"](net.m["l1"](net.m["l0"](h[:, :4]))) - y) ** 2).mean().backward()
        res["twice"] = "no error"
    except AssertionError as e:
        res["twice"] = str(e)
    hvd.barrier()
    # the ranks' parameters differ (rank 1: one more layer): every rank raises, naming both
    net = _Net()
    params = list(net.m.parameters()) + ([torch.nn.Parameter(torch.ones(2))] if r else [])
    try:
        opt = hvd.DistributedOptimizer(torch.optim.SGD(params, lr=LR))
        net.loss(*_batch(0, r), some=True).backward()
        opt.step()
        res["differ"] = "no error"
    except Exception as e:
        res["differ"] = f"{type(e).__name__}: {e}"
    os.environ["HOROVOD_FUSION_THRESHOLD"] = str(1000 * r)     # buckets that would differ
    try:
        hvd.DistributedOptimizer(torch.optim.SGD(_Net().m.parameters(), lr=LR))
        res["buckets"] = "no error"
    except ValueError as e:
        res["buckets"] = str(e)
    os.environ.pop("HOROVOD_FUSION_THRESHOLD")
    # rank 1 dies in a backward; rank 0's buckets are out: its step raises, naming it
    net = _Net()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(net.m.parameters(), lr=LR))
    Path(out, f"{r}.json").write_text(json.dumps(res))
    hvd.barrier()
    if r == 1:
        net.m["l0"].weight.register_post_accumulate_grad_hook(lambda p: os._exit(3))
    t0 = time.monotonic()
    try:
        net.loss(*_batch(0, r), some=True).backward()
        opt.step()
        said = "step returned"
    except Exception as e:
        said = f"raised after {time.monotonic() - t0:.0f}s: {type(e).__name__}: {e}"
    Path(out, f"{r}.raised").write_text(said)


@pytest.mark.timeout(120)
def test_distributed_optimizer_launches_buckets_during_the_first_backward(
        tmp_path: Path) -> None:
    """2 ranks, a bucket a gradient (HOROVOD_FUSION_THRESHOLD=0): when the
    first layer's weight gradient (backward's last) is final, the other
    layers' buckets have been launched, at every step from the first (and
    at the last of backward_passes_per_step=2 passes only); weights equal
    one process on the full batch, with a layer applied twice, one used by
    no rank (Horovod's zeros: weight decay moves it) and one by rank 0
    only; fp16 gives the unused-here gradient too; a gradient accumulated
    twice in one backward raises Horovod's error; parameters that differ
    between ranks raise on both, naming them, as does a
    HOROVOD_FUSION_THRESHOLD that differs; a rank dying in backward
    makes the other's step raise LostPeerError naming it, not hang."""
    pytest.importorskip("torch")
    with pytest.raises(mesh.WorkerError) as failed:
        mesh.spawn(_cases, 2, str(tmp_path), timeout=100, settle=30)
    assert (failed.value.rank, failed.value.exitcode) == (1, 3), str(failed.value)
    for r in range(2):
        o = json.loads((tmp_path / f"{r}.json").read_text())
        seen, same, zeros = o["k1"]
        # l2's and the twice-used l1's (2 each) are out before l0's weight is final
        assert len(seen) == STEPS and all(c >= 4 for c in seen), seen
        assert same and zeros, o["k1"]
        seen2, same2, zeros2 = o["k2"]
        assert len(seen2) == 2 * STEPS and seen2[0::2] == [0] * STEPS, seen2
        assert all(c >= 4 for c in seen2[1::2]) and same2 and zeros2, o["k2"]
        assert o["fp16_unused_here"] is True, o
        assert "more than backward_passes_per_step" in o["twice"], o["twice"]
        assert o["differ"].startswith(f"ValueError: rank {r}: DistributedOptimizer") and \
            "differ" in o["differ"] and "rank 1" in o["differ"], o["differ"]
        assert o["buckets"] == (f"rank {r}: DistributedOptimizer: the ranks' buckets differ: "
                                f"1 bytes on rank 0 and 1000 on rank 1 (HOROVOD_FUSION_"
                                f"THRESHOLD: set it alike on every rank)"), o["buckets"]
    line = (tmp_path / "0.raised").read_text()
    assert "LostPeerError" in line and "rank 1" in line, line
    assert int(line.split()[2].rstrip("s:")) < 20, line
