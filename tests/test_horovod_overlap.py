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


class _Turned:
    """Layers declared last to first (their gradients come in the reverse
    of reverse parameter order), ``never`` used by no rank and ``gone`` at
    the first step only, both in the middle: in reverse parameter order
    each would hold back l1's and l0's buckets."""

    def __init__(self) -> None:
        import torch
        torch.manual_seed(1)
        L = torch.nn.Linear
        self.m = torch.nn.ModuleDict({"l2": L(6, 3), "never": L(6, 6), "gone": L(6, 6),
                                      "l1": L(6, 6), "l0": L(4, 6)}).double()

    def loss(self, x: Any, y: Any, step: int) -> Any:
        m = self.m
        h = m["l1"](m["l0"](x).relu()).tanh()
        if step == 0:
            h = m["gone"](h)
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
    # readiness order: after each used gradient is final, how many buckets are out
    net, ref = _Turned(), _Turned()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(net.m.parameters(), lr=LR, momentum=0.5),
                                   named_parameters=net.m.named_parameters())
    ref_opt = torch.optim.SGD(ref.m.parameters(), lr=LR, momentum=0.5)
    outs: list[int] = []
    for name in ("l2", "l1", "l0"):
        for p in net.m[name].parameters():
            p.register_post_accumulate_grad_hook(lambda p: outs.append(launched[0]))
    turned = []
    for step in range(4):
        launched[0] = 0
        outs.clear()
        opt.zero_grad()
        net.loss(*_batch(step, r), step).backward()
        turned.append(list(outs))
        opt.step()
        ref_opt.zero_grad()
        for q in range(n):
            (ref.loss(*_batch(step, q), step) / n).backward()
        for p in ref.m.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        ref_opt.step()
    res["turned"] = (turned, all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in
                                 zip(net.m.parameters(), ref.m.parameters())),
                     [n for n, p in net.m.named_parameters() if p.grad is None or p.grad.any()])
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
    only; from the second step the buckets launch in the order they were
    filled (layers declared last to first) and one with a gradient no rank
    makes, or that went missing, no longer holds back those after it;
    fp16 gives the unused-here gradient too; a gradient accumulated
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
        # the first step in reverse parameter order (l0's bias, backward's last, first);
        # then the order the hooks fired in, never's in the tail: each gradient's bucket out
        # as it comes; gone's, missed at step 1, holds back l1's and l0's there, then no more
        turned, same, made = o["turned"]
        assert turned[0][:4] == [0] * 4 and turned[1] == [1, 2, 2, 2, 2, 2], turned
        assert turned[2] == turned[3] == [1, 2, 3, 4, 5, 6] and same, o["turned"]
        assert made == ["l2.weight", "l2.bias", "l1.weight", "l1.bias", "l0.weight",
                        "l0.bias"], made      # (never's and gone's: zeros, Horovod's)
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


def test_launch_order_keeps_the_buckets_every_rank_filled_in_the_first_ones_order() -> None:
    """The buckets' next launch order: those every rank with a backward
    filled, in the first such rank's order; a tail of those a gradient of
    which some rank did not make (kept there, the new ones after it, in
    their order); a rank with no backward (a row of -2, joined) is not
    asked. A bucket is full at its last gradient's place."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("torch")
    from collectives.horovod.optimizer import _filled, _launch_order
    rows = np.array([[2, 0, -1, 1], [-2, -2, -2, -2], [0, 2, 3, 1]])
    assert _launch_order(rows, [0, 1, 2, 3], []) == ([1, 3, 0], [2])
    assert _launch_order(rows[1:], [0, 1, 3], [2]) == ([0, 3, 1], [2])
    assert _launch_order(np.array([[0, -1, 1, -1]]), [2, 0], [3, 1]) == ([0, 2], [3, 1])
    assert _launch_order(np.array([[0, 1, -1, -1]]), [3, 0, 2, 1], [9]) == ([0, 1], [9, 3, 2])
    assert _launch_order(rows[1:2], [3, 2, 1, 0], []) == ([3, 2, 1, 0], [])
    assert _filled(rows, [[3, 2], [1, 0], [1]]).tolist() == [[-1, 2, 0], [-2, -2, -2],
                                                             [3, 2, 2]]
