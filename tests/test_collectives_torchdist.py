"""The "meshrun" torch.distributed backend (collectives.torchdist): torch's
own calls, checked against the values they must give; DDP against
single-process training; mismatches; every way torch initializes."""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import mesh  # noqa: E402
from proctools import free_port, rank_env, run_ranks  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = dist.ReduceOp
PREMUL = hasattr(dist._make_nccl_premul_sum(2.0), "factor")
"""torch shows PREMUL_SUM's factor to Python from 2.13 (2.8-2.12 keep it in C++)."""


def _init() -> None:
    import collectives.torchdist  # noqa: F401
    dist.init_process_group("meshrun")


def _said(call: Any) -> str:
    """What ``call()`` raised (a ValueError or a MeshError), or "ok"."""
    try:
        call()
    except (ValueError, mesh.MeshError) as e:
        return str(e)
    return "ok"


def _eq(got: Any, want: Any, what: str) -> None:
    want = torch.as_tensor(want, dtype=got.dtype)
    assert torch.equal(got, want), f"rank {dist.get_rank()}: {what}: got {got}, want {want}"


def _reductions(r: int, n: int) -> None:
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    for op, want in [(R.SUM, ranks.sum()), (R.AVG, ranks.mean()), (R.PRODUCT, ranks.prod()),
                     (R.MIN, 1.0), (R.MAX, float(n))]:
        t = torch.full((5,), r + 1.0, dtype=torch.float64)
        dist.all_reduce(t, op=op)
        _eq(t, torch.full((5,), float(want), dtype=torch.float64), f"all_reduce {op}")
    bits = [1 << r | 8 for r in range(n)]
    for op, fold in [(R.BAND, lambda a, b: a & b), (R.BOR, lambda a, b: a | b),
                     (R.BXOR, lambda a, b: a ^ b)]:
        want = bits[0]
        for b in bits[1:]:
            want = fold(want, b)
        t = torch.tensor([bits[r]] * 3, dtype=torch.int32)
        dist.all_reduce(t, op=op)
        _eq(t, [want] * 3, f"all_reduce {op}")
    if PREMUL:
        t = torch.full((4,), r + 1.0)
        dist.all_reduce(t, op=dist._make_nccl_premul_sum(2.0))
        _eq(t, torch.full((4,), 2.0 * float(ranks.sum())), "all_reduce PREMUL_SUM")
    t = torch.full((3,), r + 1.0, dtype=torch.bfloat16)
    dist.all_reduce(t)
    _eq(t, torch.full((3,), float(ranks.sum()), dtype=torch.bfloat16), "all_reduce bfloat16")
    base = torch.arange(12.0).reshape(3, 4) * (r + 1)
    t = base.t()                        # not contiguous
    dist.all_reduce(t)
    _eq(t, (torch.arange(12.0).reshape(3, 4) * float(ranks.sum())).t(), "strided all_reduce")
    t = torch.full((6,), r + 1.0)
    w = dist.all_reduce(t, async_op=True)
    fut = w.get_future()
    w.wait()
    _eq(fut.wait()[0], torch.full((6,), float(ranks.sum())), "async all_reduce future")
    # a repeated tiny dist.all_reduce takes collectives.shm.tiny's short way
    # once the first call has settled it, as collectives.all_reduce does
    # (after the watch a rooted call of init_process_group left may be
    # withdrawn: collectives.lane keeps it _WATCH_S, and until then a call
    # takes the long way, which reports what the watch caught)
    from collectives import lane, torchexchange, torchgather, torchpg
    time.sleep(lane._WATCH_S * 1.5)
    # (and reduce_scatter_tensor, all_gather_into_tensor, gather, scatter and
    # all_to_all_single: the short ways of theirs)
    where = {"_tiny_all_reduce": torchpg, "_tiny_reduce_scatter": torchexchange,
             "_tiny_all_gather": torchgather, "_tiny_gather": torchgather,
             "_tiny_scatter": torchgather, "_tiny_all_to_all": torchexchange}
    names = tuple(where)
    short: dict[str, list] = {k: [] for k in names}
    tiny = {k: getattr(where[k], k) for k in names}
    for k in names:
        setattr(where[k], k, lambda *a, k=k: short[k].append(tiny[k](*a)) or short[k][-1])
    try:
        for i in range(4):
            t = torch.full((2,), r + 1.0 + i)
            dist.all_reduce(t)
            _eq(t, torch.full((2,), float(ranks.sum()) + n * i), f"repeated all_reduce {i}")
            out = torch.zeros(2)
            dist.reduce_scatter_tensor(out, torch.arange(2.0 * n) * (r + 1) + i)
            _eq(out, (torch.arange(2.0 * r, 2.0 * r + 2) * float(ranks.sum()) + n * i),
                f"repeated reduce_scatter_tensor {i}")
            out = torch.zeros(2 * n)
            dist.all_gather_into_tensor(out, torch.tensor([r, i], dtype=torch.float32))
            _eq(out, torch.tensor([[j, i] for j in range(n)], dtype=torch.float32).reshape(-1),
                f"repeated all_gather_into_tensor {i}")
            rows = [torch.zeros(2) for _ in range(n)] if r == 0 else None
            dist.gather(torch.tensor([r, i], dtype=torch.float32), rows, dst=0)
            for j, row in enumerate(rows or []):
                _eq(row, [j, i], f"repeated gather {i}")
            out = torch.zeros(2)
            dist.scatter(out, [torch.tensor([j, i], dtype=torch.float32) for j in range(n)]
                         if r == 1 else None, src=1)
            _eq(out, [r, i], f"repeated scatter {i}")
            out = torch.zeros(n)
            dist.all_to_all_single(out, torch.arange(n, dtype=torch.float32) + 10 * r + i)
            _eq(out, [10 * j + r + i for j in range(n)], f"repeated all_to_all_single {i}")
        # all_gather into a list of tensors apart from each other: the same short way
        short["all_gather_into_tensor"] = short.pop("_tiny_all_gather")
        short["_tiny_all_gather"] = []
        for i in range(4):
            outs = [torch.zeros(2) for _ in range(n)]
            dist.all_gather(outs, torch.tensor([r, i], dtype=torch.float32))
            _eq(torch.stack(outs), [[j, i] for j in range(n)], f"repeated all_gather {i}")
    finally:
        for k in names:
            setattr(where[k], k, tiny[k])
    assert all(sum(x is not None for x in v) >= 3 for v in short.values()), \
        f"short way taken {short}"
    _sparse(r, n)


def _sparse(r: int, n: int) -> None:
    """Sparse COO all_reduce (SUM, as on gloo): rank j holds rows 0..j of an
    (n + 1, 2) tensor, each j + 1; the coalesced sum lands in place."""
    def mine(j: int, dtype: Any = torch.float32) -> Any:
        return torch.sparse_coo_tensor(torch.arange(j + 1)[None], torch.full((j + 1, 2), j + 1.0),
                                       (n + 1, 2), dtype=dtype)
    for dtype, async_op in ((torch.float32, False), (torch.float64, True)):
        s = mine(r, dtype)
        w = dist.all_reduce(s, async_op=async_op)
        if async_op:
            w.wait()
        want = sum(mine(j, dtype).to_dense() for j in range(n))
        assert s.is_sparse and s.is_coalesced() and s._nnz() == n, s
        _eq(s.to_dense(), want, f"sparse all_reduce {dtype} async_op={async_op}")
    with pytest.raises(ValueError, match="SUM only"):
        dist.all_reduce(mine(r), op=R.MAX)


def _rooted(r: int, n: int) -> None:
    root = n - 1
    t = torch.full((4,), float(r))
    dist.broadcast(t, src=root)
    _eq(t, torch.full((4,), float(root)), "broadcast")
    t = torch.full((4,), r + 1.0, dtype=torch.bfloat16)
    dist.broadcast(t, src=0)
    _eq(t, torch.ones(4, dtype=torch.bfloat16), "broadcast bfloat16")
    t = torch.full((2,), r + 1.0)
    dist.reduce(t, dst=root, op=R.MAX)
    _eq(t, torch.full((2,), float(n if r == root else r + 1)), "reduce")
    outs = [torch.zeros(2) for _ in range(n)] if r == root else None
    dist.gather(torch.full((2,), float(r)), outs, dst=root)
    if r == root:
        for j, o in enumerate(outs):
            _eq(o, torch.full((2,), float(j)), "gather")
    out = torch.zeros(3)
    dist.scatter(out, [torch.full((3,), 10.0 + j) for j in range(n)] if r == 0 else None, src=0)
    _eq(out, torch.full((3,), 10.0 + r), "scatter")


def _gathers(r: int, n: int) -> None:
    outs = [torch.zeros(2, dtype=torch.int64) for _ in range(n)]
    dist.all_gather(outs, torch.tensor([r, 2 * r]))
    for j, o in enumerate(outs):
        _eq(o, [j, 2 * j], "all_gather")
    out = torch.zeros(n * 2)
    dist.all_gather_into_tensor(out, torch.tensor([r, r + 0.5]))
    _eq(out, [v for j in range(n) for v in (j, j + 0.5)], "all_gather_into_tensor")
    out = torch.zeros(2)
    dist.reduce_scatter(out, [torch.full((2,), float(j + r)) for j in range(n)])
    _eq(out, torch.full((2,), float(n * r + n * (n - 1) / 2)), "reduce_scatter")
    out = torch.zeros(3)
    dist.reduce_scatter_tensor(out, torch.arange(3.0 * n) + r, op=R.SUM)
    _eq(out, (torch.arange(3.0) + 3 * r) * n + n * (n - 1) / 2, "reduce_scatter_tensor")
    outs = [torch.zeros(1) for _ in range(n)]
    dist.all_to_all(outs, [torch.tensor([10.0 * r + j]) for j in range(n)])
    _eq(torch.cat(outs), [10.0 * j + r for j in range(n)], "all_to_all")
    out = torch.zeros(n)
    dist.all_to_all_single(out, torch.arange(float(n)) + 10 * r)
    _eq(out, [10.0 * j + r for j in range(n)], "all_to_all_single")
    # uneven: rank r sends j+1 rows to rank j, each holding 100*r + j
    ins = [j + 1 for j in range(n)]
    src = torch.cat([torch.full((j + 1,), 100.0 * r + j) for j in range(n)])
    out = torch.zeros(n * (r + 1))
    w = dist.all_to_all_single(out, src, [r + 1] * n, ins, async_op=True)
    w.wait()
    _eq(out, torch.cat([torch.full((r + 1,), 100.0 * j + r) for j in range(n)]),
        "all_to_all_single uneven")
    # unequal sizes in one call: rank j's part has j + 1 elements (gloo takes
    # them in reduce_scatter, not in all_gather; meshrun in both)
    outs = [torch.zeros(j + 1) for j in range(n)]
    dist.all_gather(outs, torch.full((r + 1,), float(r)))
    for j, o in enumerate(outs):
        _eq(o, [float(j)] * (j + 1), "all_gather uneven")
    for op, want in [(R.SUM, sum(range(1, n + 1))), (R.MAX, n), (R.AVG, (n + 1) / 2)]:
        out = torch.zeros(r + 1)
        w = dist.reduce_scatter(out, [torch.full((j + 1,), r + 1.0) for j in range(n)], op=op,
                                async_op=op == R.MAX)
        if op == R.MAX:
            w.wait()
        _eq(out, [float(want)] * (r + 1), f"reduce_scatter uneven {op}")
    out = torch.zeros(r + 1, dtype=torch.bfloat16)
    dist.reduce_scatter(out, [torch.full((j + 1,), 1.0 + 2 ** -7, dtype=torch.bfloat16)
                              for j in range(n)])          # summed in float32, rounded once
    _eq(out, torch.full((r + 1,), n * (1 + 2 ** -7)).bfloat16(), "reduce_scatter uneven bf16")
    out = torch.zeros(r + 1, dtype=torch.int64)     # avg of integers: truncated, as NCCL's
    dist.reduce_scatter(out, [torch.full((j + 1,), -1 - r, dtype=torch.int64)
                              for j in range(n)], op=R.AVG)
    _eq(out, [-((n + 1) // 2)] * (r + 1), "reduce_scatter uneven int64 avg")
    for async_op in (False, True):      # (Lightning's sync_dist averages 0-d int64 counts)
        for shape in ((), (3,)):
            t = torch.full(shape, -1 - r, dtype=torch.int64)
            w = dist.all_reduce(t, op=R.AVG, async_op=async_op)
            if async_op:
                w.wait()
            _eq(t, torch.full(shape, -((n + 1) // 2)), f"all_reduce int64 avg {shape}")
    try:            # an op the dtype cannot take: every rank raises, none waits
        dist.reduce_scatter(torch.zeros(r + 1), [torch.ones(j + 1) for j in range(n)],
                            op=R.BAND)
        raise AssertionError(f"rank {r}: band of float32 went unseen")
    except (TypeError, mesh.MeshError) as e:
        assert "op 'band' needs an integer or bool dtype" in str(e), e
    # rank 1's output one element too long: every rank raises, naming it (a rank
    # whose own parts came right, at its next call, as for every meshrun collective)
    said = []
    for call in (lambda: dist.reduce_scatter(torch.zeros(r + 1 + (r == 1)),
                                             [torch.ones(j + 1) for j in range(n)]),
                 dist.barrier):
        try:
            call()
        except mesh.MismatchError as e:
            said.append(str(e))
    assert any("rank 1 expects 3 rows from rank 1 (itself), which sends 2" in e
               for e in said), said
    # uneven all_to_all_single whose splits disagree between ranks 0 and 1 (rank 0
    # sends rank 1 two rows, rank 1 expects one): on the same-host board every rank
    # raises, naming the pair and its rows (over sockets, the pair)
    ins = [1] * n
    outs_ = [1] * n
    if r == 0:
        ins = [1, 2] + [1] * (n - 2)
    try:
        dist.all_to_all_single(torch.zeros(sum(outs_)), torch.ones(sum(ins)), outs_, ins)
        seen = "ok"
    except mesh.MismatchError as e:
        seen = str(e)
    assert "all_to_all_single #" in seen and "rank 1 expects 1 rows from rank 0, which " \
        "sends 2 (output_split_sizes vs input_split_sizes)" in seen, seen
    try:
        dist.barrier()
    except mesh.MismatchError:
        pass
    # a row scattered as float32 into an int32 tensor, or a bfloat16 one's bits taken
    # for uint16 (an uneven all_gather): MismatchError, not values cast or bits misread
    for call in ("scatter", "all_gather"):
        try:
            if call == "scatter":
                dist.scatter(torch.zeros(2, dtype=torch.int32 if r == 1 else torch.float32),
                             [torch.ones(2)] * n if r == 0 else None, src=0)
            else:
                dt = torch.uint16 if r == 1 else torch.bfloat16
                dist.all_gather([torch.zeros(j + 1, dtype=dt) for j in range(n)],
                                torch.ones(r + 1, dtype=dt))
            seen = "ok"
        except mesh.MismatchError as e:
            seen = str(e)
        if call == "scatter" and r == 1:
            assert "rank 1 wants its row as int32 (its tensor's dtype, or dtype=) but root 0 " \
                   "scatters float32" in seen, seen
        if call == "all_gather" and r in (0, 1):
            assert "dtype=uint16" in seen and "dtype=bfloat16" in seen, seen
        try:
            dist.barrier()
        except mesh.MismatchError:
            pass
    # rank 1's output one element too long, or an int tensor PREMUL_SUM'd: every rank
    # raises, naming rank 1 and the sizes, before anything moves (not torch's reshape error)
    one = int(r == 1)
    for call, what in (
            (lambda: dist.all_gather_into_tensor(torch.zeros(2 * n + (r == 1)), torch.ones(2)),
             f"all_gather_into_tensor on group world: its output holds {2 * n + 1} elements"),
            (lambda: dist.reduce_scatter_tensor(torch.zeros(2), torch.ones(2 * n + (r == 1))),
             f"reduce_scatter_tensor on group world: its input holds {2 * n + 1} elements"),
            (lambda: dist.all_reduce(torch.ones(2, dtype=torch.int32 if r == 1 else torch.float),
                                     op=dist._make_nccl_premul_sum(2.0)),
             "PREMUL_SUM scales by a float: it needs floating tensors, not torch.int32"),
            # lists of the wrong length, or an output of the wrong size, on rank 1 only
            # (a list one short dropped a rank's part silently)
            (lambda: dist.all_gather([torch.zeros(2) for _ in range(n - one)], torch.ones(2)),
             f"all_gather on group world: its output list holds {n - 1} tensors"),
            (lambda: dist.all_to_all([torch.zeros(2) for _ in range(n - one)],
                                     [torch.ones(2)] * n),
             f"all_to_all on group world: its lists hold {n - 1} output"),
            (lambda: dist.reduce_scatter(torch.zeros(2 + one), [torch.ones(2)] * n),
             "rank 1 expects 3 rows from rank 1 (itself), which sends 2")):
        if not PREMUL and "PREMUL_SUM" in what:     # (torch 2.8-2.12)
            continue
        seen = _said(call)
        assert "rank 1" in seen and what in seen, seen
    # a coalesced call (one collective a tensor) refused on rank 1: every rank spends as
    # many calls, and the next one lines up (it matched the others' second all_gather)
    pg = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    try:
        pg.allgather_into_tensor_coalesced([torch.zeros(2 * n + one), torch.zeros(2 * n)],
                                           [torch.ones(2), torch.ones(2)]).wait()
    except (ValueError, mesh.MeshError) as e:
        assert "rank 1: all_gather_into_tensor" in str(e), e
    x = torch.ones(1)
    dist.all_reduce(x)
    assert x.item() == n, x
    try:        # a scatter row of another shape than rank 1's output: rank 1 raises
        out = torch.zeros(2 + one)
        dist.scatter(out, [torch.ones(2)] * n if r == 0 else None, src=0)
        seen = "ok"
    except mesh.MeshError as e:
        seen = str(e)
    assert r != 1 or "rank 1 wants its row shaped [3] but root 0 scatters rows shaped [2]" \
        in seen, seen
    try:
        dist.barrier()
    except mesh.MeshError:
        pass
    got: list[Any] = [None] * n
    dist.all_gather_object(got, {"rank": r})
    assert got == [{"rank": j} for j in range(n)], got
    box = [{"k": [1, 2]}, "x"] if r == 0 else [None, None]
    dist.broadcast_object_list(box, src=0)
    assert box == [{"k": [1, 2]}, "x"], box
    gathered = [None] * n if r == 0 else None
    dist.gather_object(("t", r), gathered, dst=0)
    assert r != 0 or gathered == [("t", j) for j in range(n)], gathered
    mine: list[Any] = [None]
    dist.scatter_object_list(mine, [j * 3 for j in range(n)] if r == 0 else None, src=0)
    assert mine == [r * 3], mine
    dist.barrier()


def _p2p(r: int, n: int) -> None:
    right, left = (r + 1) % n, (r - 1) % n
    got = torch.zeros(3)
    if r % 2 == 0:
        dist.send(torch.full((3,), float(r)), dst=right)
        dist.recv(got, src=left)
    else:
        dist.recv(got, src=left)
        dist.send(torch.full((3,), float(r)), dst=right)
    _eq(got, torch.full((3,), float(left)), "send/recv")
    reqs = [dist.isend(torch.full((2,), r + 0.5), dst=right, tag=5)]
    got = torch.zeros(2)
    reqs.append(dist.irecv(got, src=left, tag=5))
    for q in reqs:
        q.wait()
    _eq(got, torch.full((2,), left + 0.5), "isend/irecv")
    # a send's Work has no source rank (gloo's words too); it said "the receive has
    # not matched a message yet", of a send
    assert reqs[1]._source_rank() == left
    with pytest.raises(RuntimeError, match=re.escape(f"rank {r}: send to rank {right} (tag 5")
                       + ".*only the Work of a recv"):
        reqs[0]._source_rank()
    got = torch.zeros(2, dtype=torch.int64)
    ops = [dist.P2POp(dist.isend, torch.tensor([r, r]), right),
           dist.P2POp(dist.irecv, got, left)]
    for q in dist.batch_isend_irecv(ops):
        q.wait()
    _eq(got, [left, left], "batch_isend_irecv")
    if r == 0:                                  # from any source
        seen = set()
        for _ in range(n - 1):
            t = torch.zeros(1)
            src = dist.recv(t, tag=9)
            _eq(t, [float(src)], "recv from any source")
            seen.add(src)
        assert seen == set(range(1, n)), seen
    else:
        dist.send(torch.tensor([float(r)]), dst=0, tag=9)
    if r == 0:      # a receive that timed out is done and failed, exception() its error
        w = dist.irecv(torch.zeros(1), src=1, tag=99)
        with pytest.raises(mesh.MeshTimeoutError):
            w.wait(timeout=timedelta(seconds=0.05))
        assert w.is_completed() and not w.is_success()
        assert isinstance(w.exception(), mesh.MeshTimeoutError), w.exception()
    strided = torch.zeros(2, 3).t()
    if r == 0:
        dist.send(torch.arange(6.0).reshape(3, 2), dst=n - 1)
        dist.send(torch.tensor([1.5, 2.5]), dst=n - 1, tag=7)
    elif r == n - 1:
        w = dist.irecv(strided, src=0)
        while not w.is_completed():     # (the copy into it was made at wait() only)
            time.sleep(0.001)
        _eq(strided, torch.arange(6.0).reshape(3, 2), "irecv into a strided tensor")
        w.wait()
        # a strided tensor is held to what a contiguous one is: a message of another
        # dtype or size raises naming the peer and the tag, and stays queued (it was
        # cast, 1.5 received as 1 into int32, or failed in torch's reshape naming no one)
        for wrong, why in ((torch.zeros(2, 2, dtype=torch.int32)[:, 0], "out= is int32[2]"),
                           (torch.zeros(3, 2)[:, 0], "out= is float32[3]")):
            with pytest.raises(mesh.OutMismatchError, match=re.escape(
                    f"rank {r}: recv from rank 0") + r".*tag 7.*float32\[2\], " + re.escape(why)):
                dist.recv(wrong, src=0, tag=7)
        col = torch.zeros(2, 2)[:, 1]
        dist.recv(col, src=0, tag=7)
        _eq(col, [1.5, 2.5], "recv into a strided tensor after a mismatch")


def _groups(r: int, n: int) -> None:
    evens = list(range(0, n, 2))
    g = dist.new_group(evens)
    if r in evens:
        t = torch.ones(2)
        dist.all_reduce(t, group=g)
        _eq(t, torch.full((2,), float(len(evens))), "all_reduce on new_group")
        t = torch.full((1,), float(r))
        dist.broadcast(t, src=evens[-1], group=g)
        _eq(t, [float(evens[-1])], "broadcast on new_group (global src)")
    else:
        from collectives.torchdist import comm_of
        try:
            comm_of(g)
            raise AssertionError("comm_of a group this rank is not in gave a communicator")
        except ValueError as e:
            assert f"rank {r} is not a member of the group" in str(e), e
    sub, subs = dist.new_subgroups(group_size=1 if n % 2 else 2)
    t = torch.ones(1)
    dist.all_reduce(t, group=sub)
    _eq(t, [float(dist.get_world_size(sub))], "all_reduce on new_subgroups")
    assert len(subs) == n // dist.get_world_size(sub)
    # dist.barrier(timeout=...) and a ProcessGroup call's opts.timeout wait that
    # long, as gloo's (they waited the group's timeout, rank 0 returning once rank 1
    # came): rank 1 late, both raise
    late = dist.new_group([0, 1])
    if r < 2:
        if r == 1:
            time.sleep(1.0)
        opts = dist.AllreduceOptions()
        opts.timeout = timedelta(seconds=0.2)
        for call in (lambda: dist.barrier(group=late, timeout=timedelta(seconds=0.2)),
                     lambda: late.allreduce([torch.ones(1)], opts).wait()):
            with pytest.raises(mesh.MeshTimeoutError, match=re.escape(
                    "the call's own timeout of 0.2s") if r == 0 else "aborted"):
                call()


def _futures_and_buffers(r: int, n: int) -> None:
    """What torch's own comm hooks lean on: a ``then`` callback that makes
    another async collective and waits for it (PowerSGD: it hung, queued
    behind the callback on the group's one lane), futures holding what
    gloo's hold, buffers that stay resizable (batched PowerSGD resizes
    DDP's bucket), the group's device types (dcp.async_save)."""
    t, t2 = torch.ones(4), torch.full((4,), float(r + 1))

    t3 = torch.ones(2)

    def then(_: Any) -> Any:
        got = dist.all_reduce(t2, async_op=True).get_future().wait()[0]
        dist.all_reduce(t3)     # blocking, after the lane was handed on: queued to it
        return got
    got = dist.all_reduce(t, async_op=True).get_future().then(then).wait()
    _eq(got, [n * (n + 1) / 2] * 4, "an async all_reduce waited for in a then callback")
    _eq(t3, [float(n)] * 2, "a blocking all_reduce in a then callback")
    outs = [torch.zeros(2) for _ in range(n)]
    value = dist.all_gather(outs, torch.full((2,), float(r)), async_op=True).get_future().wait()
    assert len(value) == n and all(torch.is_tensor(v) for v in value), value
    _eq(value[n - 1], [float(n - 1)] * 2, "all_gather's future")
    for name, call in [("all_reduce", lambda b: dist.all_reduce(b)),
                       ("broadcast", lambda b: dist.broadcast(b, 0)),
                       ("all_gather_into_tensor",
                        lambda b: dist.all_gather_into_tensor(torch.empty(4 * n), b))]:
        b = torch.ones(4)
        call(b)
        assert b.untyped_storage().resizable(), f"{name} left its tensor not resizable"
        b.resize_(8)
    pg = dist.distributed_c10d._get_default_group()
    assert torch.device("cpu") in pg._device_types, pg._device_types
    assert pg._get_sequence_number_for_group() > 0


def _battery(world: Any) -> None:
    """Every torch collective and point-to-point call on the backend."""
    r, n = dist.get_rank(), dist.get_world_size()
    assert (r, n) == (world.rank, world.size) and dist.get_backend() == "meshrun"
    _reductions(r, n)
    _rooted(r, n)
    _gathers(r, n)
    _p2p(r, n)
    _groups(r, n)
    _futures_and_buffers(r, n)


def battery(world: Any) -> str:
    _init()
    _battery(world)
    dist.destroy_process_group()
    return "ok"


def test_every_torch_collective_and_p2p_gives_the_expected_values_3_ranks() -> None:
    """(2 ranks: in the DDP test's spawn, to start torch fewer times.)"""
    assert mesh.spawn(battery, 3, timeout=90) == ["ok"] * 3


def refused_on_rank_1(world: Any) -> list[list[str]]:
    """Calls that cannot go on rank 1 alone: what each rank raised, and
    whether the group's next call lined up after it (an all_reduce)."""
    import threading
    _init()
    r, n = dist.get_rank(), dist.get_world_size()
    one, lock = int(r == 1), threading.Lock()
    sub = dist.new_group([1, 2])

    def said(call: Any) -> str:
        try:
            call()
        except Exception as e:  # noqa: BLE001 - rank 1's own TypeError included
            return f"{type(e).__name__}: {e}"
        return "ok"
    calls = [
        # rank 1's all_to_all_single output too long: it failed there alone, after the
        # transfer, in torch's reshape ("shape '[6]' is invalid for input of size 3")
        lambda: dist.all_to_all_single(torch.zeros(n + n * one), torch.ones(n)),
        lambda: dist.all_to_all_single(torch.zeros(n + one), torch.ones(n), [1] * n, [1] * n,
                                       async_op=True).wait(),
        lambda: dist.all_to_all_single(torch.zeros(n + one), torch.ones(n), None, [1] * n),
        # an output of another dtype than the input on rank 1: cast there (gloo and
        # NCCL refuse it), 1.5 written as 1 into an int64 output
        lambda: dist.all_gather_into_tensor(
            torch.zeros(2 * n, dtype=torch.int64 if r == 1 else torch.float), torch.ones(2)),
        lambda: dist.reduce_scatter_tensor(
            torch.zeros(2, dtype=torch.float64 if r == 1 else torch.float), torch.ones(2 * n)),
        # an object rank 1 cannot pickle: it raised before the group's first call, the
        # others waited in theirs, and its next call met their first (out of step)
        lambda: dist.all_gather_object([None] * n, lock if r == 1 else r),
        lambda: dist.broadcast_object_list([lock] if r == 1 else [None], src=1),
        lambda: r != 0 and dist.gather_object(lock if r == 1 else r, [None] * 2 if r == 2
                                              else None, group_dst=1, group=sub)]
    out = []
    for call in calls:
        got = [said(call)]
        t = torch.ones(1)
        got.append(said(lambda: dist.all_reduce(t)) + f" {t.item():g}")
        out.append(got)
    dist.destroy_process_group()
    return out


@pytest.mark.timeout(60)
def test_a_call_that_cannot_go_on_one_rank_raises_on_every_rank_naming_it() -> None:
    outs = mesh.spawn(refused_on_rank_1, 3, timeout=45)
    wants = ["all_to_all_single on group world: its output holds 6 elements, where an even "
             "all_to_all_single returns as many as its input holds, 3",
             "all_to_all_single on group world: its output holds 4 elements, where the 3 rows "
             "of 1 it receives (output_split_sizes [1, 1, 1]) take 3",
             "all_to_all_single on group world: its output holds 4 elements, where the 3 rows "
             "of 1 it receives (its output's dim 0 split evenly, [1, 1, 1]) take 3",
             "all_gather_into_tensor on group world: its output is torch.int64 but its input "
             "torch.float32",
             "reduce_scatter_tensor on group world: its output is torch.float64 but its input "
             "torch.float32",
             "all_gather_object on group world: its object cannot be pickled: TypeError: "
             "cannot pickle '_thread.lock' object",
             "broadcast_object_list on group world: its object cannot be pickled",
             # (on a group, rank 1 is its rank 0: the abort says "(world rank 1)")
             "gather_object on group world/[1, 2]: its object cannot be pickled"]
    for r, out in enumerate(outs):
        for (first, after), want in zip(out, wants):
            assert after == "ok 3", (r, want, after)     # the group's next call lined up
            if r == 1 and "pickle" in want:              # the error as torch raises it
                assert first == "TypeError: cannot pickle '_thread.lock' object", first
            elif "world/[1, 2]" in want:     # (its group rank 0, and world rank 1 as torch says)
                assert r == 0 and first == "ok" or f"rank 0 (world rank 1): {want}" in first, \
                    (r, first)
            else:
                assert f"rank 1: {want}" in first, (r, first)


def _vm(key: str) -> float:
    """This process's /proc/self/status ``key`` (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def _peak_extra(call: Any) -> float:
    """MiB this process's peak RSS grew by during ``call()`` (its operands
    allocated and touched before: the growth is what the call made); the
    high-water mark reset first, so that calls measured one after another
    each count only their own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _vm("VmRSS")
    call()
    return _vm("VmHWM") - base


def outputs_in_place(world: Any, mib: int) -> dict[str, Any]:
    """all_gather_into_tensor and all_to_all_single of CPU tensors write
    straight into the caller's output: no temporary of the output's size
    (the group's size times the input for all_gather_into_tensor)."""
    _init()
    r, n = dist.get_rank(), dist.get_world_size()
    k = (mib << 20) // 4
    x = torch.full((k,), float(r + 1))
    out = torch.zeros(n * k)
    dist.all_gather_into_tensor(out[:n * 4], x[:4])     # (the first call's set-up)
    extra = {"all_gather_into_tensor": _peak_extra(lambda: dist.all_gather_into_tensor(out, x))}
    ok = all(bool((out[j * k:(j + 1) * k] == j + 1).all()) for j in range(n))
    x2 = torch.arange(float(k)) + r * k
    got = torch.zeros(k)
    extra["all_to_all_single"] = _peak_extra(lambda: dist.all_to_all_single(got, x2))
    m = k // n
    ok = ok and all(torch.equal(got[j * m:(j + 1) * m], torch.arange(float(m)) + j * k + r * m)
                    for j in range(n))
    got.zero_()
    dist.all_to_all_single(got, x2, async_op=True).wait()
    ok = ok and torch.equal(got[r * m:(r + 1) * m], x2[r * m:(r + 1) * m])
    out.zero_()
    dist.all_gather_into_tensor(out, x, async_op=True).wait()
    ok = ok and bool((out[-k:] == n).all())
    dist.destroy_process_group()
    return {"extra": extra, "ok": ok}


def test_all_gather_into_tensor_and_all_to_all_single_need_no_output_sized_temporary() -> None:
    got = mesh.spawn(outputs_in_place, 2, 32, timeout=90)
    for o in got:
        assert o["ok"], got
        # 32 MiB inputs: a temporary output is 64 MiB (all_gather) and 32 MiB (all_to_all)
        assert max(o["extra"].values()) < 12, f"peak MiB beyond the operands, per rank: {got}"


def written_outputs_tell_autograd(world: Any) -> list[str]:
    """An output written straight through its memory (all_gather_into_tensor,
    all_to_all_single; all_reduce's tensor, which dist.all_reduce hands the
    host collective as its numpy view, the short way or not, blocking or
    not) is an in-place write to autograd, as copy_ and torch's in-place ops
    are: a backward that saved the output raises, rather than computing with
    the values the collective wrote over."""
    _init()
    r, n = dist.get_rank(), dist.get_world_size()
    said = []
    x2, xn = torch.full((2,), r + 1.0), torch.full((2 * n,), r + 1.0)
    rows = [torch.full((2,), j + 1.0) for j in range(n)]
    calls = {   # each writes into out (a list: its first), as the direct paths do
        "all_reduce": lambda out, a: dist.all_reduce(out, async_op=a),
        "broadcast": lambda out, a: dist.broadcast(out, 0, async_op=a),
        "reduce": lambda out, a: dist.reduce(out, 0, async_op=a),
        "all_gather_into_tensor": lambda out, a: dist.all_gather_into_tensor(out, x2, async_op=a),
        "all_to_all_single": lambda out, a: dist.all_to_all_single(out, xn, async_op=a),
        "reduce_scatter_tensor": lambda out, a: dist.reduce_scatter_tensor(out[:2], xn,
                                                                           async_op=a),
        "all_gather": lambda out, a: dist.all_gather(list(out.split(2)), x2, async_op=a),
        "gather": lambda out, a: dist.gather(x2, list(out.split(2)) if r == 0 else None,
                                             dst=0, async_op=a),
        "scatter": lambda out, a: dist.scatter(out[:2], rows if r == 0 else None, src=0,
                                               async_op=a),
        "all_to_all": lambda out, a: dist.all_to_all(list(out.split(2)), list(xn.split(2)),
                                                     async_op=a),
    }
    # (the blocking calls after the first of a tiny one: the short way, collectives.shm.tiny)
    for (name, call), async_op in itertools.product(calls.items(), (False, True, False, False)):
        w = torch.ones(2 * n, requires_grad=True)
        out = torch.zeros(2 * n)
        y = (out * w).sum()                 # saves out, for w's gradient
        work = call(out, async_op)
        if async_op:
            work.wait()
        if name in ("gather", "reduce") and r:
            continue                            # (only the root's output is written)
        try:
            y.backward()
            said.append(f"{name} async_op={async_op}: backward used the overwritten output")
        except RuntimeError as e:
            assert "modified by an inplace operation" in str(e), e
    dist.destroy_process_group()
    return said


def test_outputs_written_in_place_are_seen_by_autograd() -> None:
    assert mesh.spawn(written_outputs_tell_autograd, 2, timeout=60) == [[], []]


def lists_in_place(world: Any, mib: int) -> dict[str, Any]:
    """all_gather's and gather's output lists, reduce_scatter_tensor's,
    reduce_scatter's (even and uneven parts: the uneven input list is not
    joined either) and scatter's output and all_to_all's output list, of
    CPU tensors, take the results straight: no temporary of the outputs'
    size; so do the all_gathers in place (the input this rank's row of the
    output, as FSDP passes it). Each call's values are checked, made
    synchronously and with async_op=True; the peak memory each call adds
    (its operands allocated and touched before) in MiB, per op."""
    _init()
    r, n = dist.get_rank(), dist.get_world_size()
    k = (mib << 20) // 4
    x = torch.full((k,), float(r + 1))
    outs = [torch.zeros(k) for _ in range(n)]
    one = torch.zeros(k)
    rows = [torch.full((k,), float(j + 1)) for j in range(n)]
    blocks = [torch.full((k,), float(10 * r + j)) for j in range(n)]
    whole = torch.full((n * k,), float(r + 1))
    flat = torch.zeros(n * k)
    own = flat[r * k:(r + 1) * k]
    gathered = lambda: all(bool((o == j + 1).all()) for j, o in enumerate(outs))  # noqa: E731
    uneven = [torch.zeros(k + j) for j in range(n)]      # rank j's: k + j elements
    mine = torch.full((k + r,), float(r + 1))
    # uneven reduce_scatter's parts: rank r's part j is pattern + 1000 (r + 1)(j + 1)
    pattern = lambda m: (torch.arange(m) % 997).float()     # noqa: E731
    parts = [pattern(k + j) + 1000 * (r + 1) * (j + 1) for j in range(n)]
    calls = {   # op: (call(async_op), the values it must give)
        "all_gather": (lambda a: dist.all_gather(outs, x, async_op=a), gathered),
        "all_gather in place": (lambda a: dist.all_gather(outs, outs[r].fill_(r + 1),
                                                          async_op=a), gathered),
        "all_gather uneven": (
            lambda a: dist.all_gather(uneven, mine, async_op=a),
            lambda: all(bool((o == j + 1).all()) for j, o in enumerate(uneven))),
        "all_gather_into_tensor in place": (
            lambda a: dist.all_gather_into_tensor(flat, own.fill_(r + 1), async_op=a),
            lambda: all(bool((flat[j * k:(j + 1) * k] == j + 1).all()) for j in range(n))),
        "gather": (lambda a: dist.gather(x, outs if r == 0 else None, dst=0, async_op=a),
                   lambda: r or all(bool((o == j + 1).all()) for j, o in enumerate(outs))),
        "scatter": (lambda a: dist.scatter(one, rows if r == 0 else None, src=0, async_op=a),
                    lambda: bool((one == r + 1).all())),
        "reduce_scatter_tensor": (
            lambda a: dist.reduce_scatter_tensor(one, whole, async_op=a),
            lambda: bool((one == n * (n + 1) // 2).all())),
        "reduce_scatter": (lambda a: dist.reduce_scatter(one, rows, async_op=a),
                           lambda: bool((one == (r + 1) * n).all())),
        "reduce_scatter uneven": (
            lambda a: dist.reduce_scatter(uneven[r], parts, async_op=a),
            lambda: bool((uneven[r] == n * pattern(k + r)
                          + 1000 * (r + 1) * n * (n + 1) // 2).all())),
        "all_to_all": (lambda a: dist.all_to_all(outs, blocks, async_op=a),
                       lambda: all(bool((o == 10 * j + r).all()) for j, o in enumerate(outs))),
    }
    extra, ok = {}, {}
    for op, (call, check) in calls.items():
        for t in outs + uneven + [one, flat]:
            t.zero_()
        extra[op] = _peak_extra(lambda: call(False))
        ok[op] = check()
        for t in outs + uneven + [one, flat]:
            t.zero_()
        call(True).wait()
        ok[op + " async"] = check()
    dist.destroy_process_group()
    return {"extra": extra, "ok": ok}


def test_list_collectives_and_reduce_scatter_need_no_output_sized_temporary() -> None:
    mib = 32
    got = mesh.spawn(lists_in_place, 2, mib, timeout=120)
    for r, o in enumerate(got):
        assert all(o["ok"].values()), got
        e = o["extra"]
        # before: all_gather's (in place too) and the root's gather's 64 MiB, scatter's
        # 32 MiB row, the 32 MiB output of reduce_scatter_tensor, reduce_scatter, all_to_all;
        # an uneven all_gather's 128 (a copy of the input per rank, the blocks received);
        # an uneven reduce_scatter's 64 (its input list joined)
        for op in ("all_gather", "all_gather in place", "all_gather uneven",
                   "all_gather_into_tensor in place", "gather", "reduce_scatter_tensor",
                   "reduce_scatter uneven"):
            assert e[op] < 12, f"{op}: peak MiB beyond the operands, per rank: {got}"
        # what stays: the root's stack of scatter's and reduce_scatter's inputs, all_to_all's
        # joined input and the blocks it receives
        assert e["scatter"] < (2 * mib if r == 0 else 0) + 12, got
        assert e["reduce_scatter"] < 2 * mib + 12, got
        assert e["all_to_all"] < 3 * mib + 12, got


def _model() -> Any:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"body": torch.nn.Sequential(torch.nn.Linear(5, 8),
                                                            torch.nn.Tanh()),
                                "head": torch.nn.Linear(8, 2),
                                "unused": torch.nn.Linear(8, 2)})


def _forward(m: Any, x: Any) -> Any:
    return m["head"](m["body"](x))


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.m = _model()

    def forward(self, x: Any) -> Any:
        return _forward(self.m, x)


def _train(net: Any, steps: list, r: int, device: str = "cpu") -> float:
    """Train ``net`` (DDP) on this rank's quarter rows and a reference on
    all of them, step 1 accumulated under no_sync; the largest difference."""
    ref = _Net().to(device)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for i, (x, y) in enumerate(steps):
        x, y = x.to(device), y.to(device)
        mine = slice(r * 4, (r + 1) * 4)
        if i == 1:                     # accumulate this step into the next one
            with net.no_sync():
                torch.nn.functional.mse_loss(net(x[mine]), y[mine]).backward()
            torch.nn.functional.mse_loss(ref(x), y).backward()
            continue
        torch.nn.functional.mse_loss(net(x[mine]), y[mine]).backward()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    return max((a - b).abs().max().item()
               for a, b in zip(net.module.parameters(), ref.parameters()))


def _powersgd_against_gloo(steps: list, r: int) -> float:
    """torch's PowerSGD comm hook (its callbacks make collectives and wait
    for them: it hung) on meshrun's group and on a gloo group over the same
    ranks, from the same start: the largest difference of their weights."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    from torch.nn.parallel import DistributedDataParallel as DDP
    nets = []
    for group in (None, dist.new_group(backend="gloo")):
        torch.manual_seed(1)
        net = DDP(torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Linear(16, 2)),
                  process_group=group)
        net.register_comm_hook(psgd.PowerSGDState(process_group=group, start_powerSGD_iter=2,
                                                  min_compression_rate=0.5), psgd.powerSGD_hook)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for x, y in steps:
            mine = slice(r * 4, (r + 1) * 4)
            torch.nn.functional.mse_loss(net(x[mine]), y[mine]).backward()
            opt.step()
            opt.zero_grad()
        nets.append(net)
    return max((a - b).abs().max().item()
               for a, b in zip(nets[0].parameters(), nets[1].parameters()))


def ddp_and_mismatch(world: Any) -> dict:
    """DDP (no_sync, find_unused_parameters, small buckets) against
    single-process training on the full batch; then a shape mismatch and
    a barrier that times out."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    _init()
    _battery(world)
    r, n = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(3)
    steps = [(torch.randn(4 * n, 5, generator=gen), torch.randn(4 * n, 2, generator=gen))
             for _ in range(4)]
    diffs = []
    for kw in ({"find_unused_parameters": True, "bucket_cap_mb": 0.0002},
               {"static_graph": True}):
        diffs.append(_train(DDP(_Net(), **kw), steps, r))
    diff = max(diffs)
    powersgd = _powersgd_against_gloo(steps, r)
    errors = []
    for async_op in (False, True):
        t = torch.zeros(3 if r == 0 else 4)
        try:
            w = dist.all_reduce(t, async_op=async_op)
            if async_op:
                w.wait()
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
    g = dist.new_group([0, 1], timeout=timedelta(seconds=1))
    timed_out = ""
    if r == 0:                         # rank 1 never comes: torch's words for a timeout
        try:
            dist.barrier(group=g)
        except Exception as e:
            timed_out = str(e)
        try:                           # a receive waits the group's timeout, as gloo's
            dist.recv(torch.empty(1), src=1, group=g)
        except Exception as e:
            timed_out += f"\n{type(e).__name__}: {e}"
    late = torch.ones(1)               # Work.wait(timeout) times out, the call goes on
    if r == 0:
        w = dist.all_reduce(late, async_op=True)
        try:
            w.wait(timeout=timedelta(seconds=0.1))
        except Exception as e:
            timed_out += f"\n{type(e).__name__}: {e}"
        dist.send(torch.ones(1), dst=1)
        w.wait()
    else:
        dist.recv(torch.empty(1), src=0)
        dist.all_reduce(late)
    g2 = dist.new_group([0, 1])
    if r == 0:                         # torch's test_monitored_barrier_gloo_rank_0_timeout
        try:
            g2.monitored_barrier(timedelta(seconds=0))
        except RuntimeError as e:
            timed_out += f"\n{e}"
    t = torch.ones(2)
    dist.all_reduce(t)                 # the group's next collective works
    threads = {th.name for th in threading.enumerate()}
    dist.destroy_process_group()
    return {"diff": diff, "powersgd": powersgd, "errors": errors, "after": t.tolist(),
            "threads": sorted(threads),
            "timed_out": timed_out, "late": late.tolist()}


def test_2_ranks_every_call_then_ddp_trains_like_one_process_and_mismatches_raise() -> None:
    out = mesh.spawn(ddp_and_mismatch, 2, timeout=90)
    for r, o in enumerate(out):
        assert o["diff"] < 1e-6, (r, o)
        assert o["powersgd"] < 1e-6, (r, o)
        assert len(o["errors"]) == 2, (r, o)
        for e in o["errors"]:
            assert "mismatch" in e and "rank 0" in e and "rank 1" in e, e
            assert "[3]" in e and "[4]" in e, e       # the two shapes
        assert o["errors"][0].startswith("MismatchError"), o["errors"]
        assert o["after"] == [2.0, 2.0]
    # the regex torch's suite (test_barrier_timeout_*) matches a timed-out barrier with
    assert re.search(" (Timed out|closed|timeout) ", out[0]["timed_out"]), out[0]
    assert "barrier" in out[0]["timed_out"] and "rank 1" in out[0]["timed_out"], out[0]
    assert "Rank 0 timed out in monitoredBarrier" in out[0]["timed_out"], out[0]
    assert re.search(r"MeshTimeoutError: rank 0: recv from rank 1 .* timed out after 1s.*"
                     r"\(process group timeout of 1s\)", out[0]["timed_out"]), out[0]
    assert re.search(r"MeshTimeoutError: rank 0: all_reduce #\d+ on group world: Work.wait: "
                     r"the operation did not complete within 0.1s", out[0]["timed_out"]), out[0]
    assert out[0]["late"] == out[1]["late"] == [2.0]


def monitored(world: Any) -> dict[str, str]:
    """dist.monitored_barrier as torch's suite calls it (gloo's words)."""
    _init()
    r = dist.get_rank()
    sec = timedelta(seconds=1)
    dist.monitored_barrier(timeout=timedelta(seconds=30))
    dist.monitored_barrier(timeout=timedelta(seconds=30), wait_all_ranks=True)
    one, two = dist.new_group([0, 1, 2]), dist.new_group([0, 1, 2])
    sub = dist.new_group([0, 1])
    out: dict[str, str] = {}
    for key, group, absent, every in (("one", one, {1}, False), ("two", two, {1, 2}, True)):
        if r in absent:
            continue
        try:
            dist.monitored_barrier(group, timeout=sec, wait_all_ranks=every)
            out[key] = "passed"
        except RuntimeError as e:
            out[key] = f"{type(e).__name__}: {e}"
    dist.monitored_barrier(sub, timedelta(seconds=30))       # rank 2: not a member, returns
    three = dist.new_group([0, 1, 2])
    t = torch.ones(1)
    dist.all_reduce(t, group=three)                           # (its same-host board set up)
    if r != 1:          # rank 1 skips it: the timeout names rank 1, not rank 2 (in it, waiting)
        opts = dist.AllreduceOptions()
        opts.timeout = sec
        try:
            three.allreduce([t], opts).wait()
        except Exception as e:
            out["skipped"] = f"{type(e).__name__}: {e}"
    dist.all_reduce(t)                                        # the world's calls go on
    out["after"] = str(t.item())
    dist.destroy_process_group()
    return out


def test_monitored_barrier_names_who_did_not_come_in_gloos_words() -> None:
    """torch's own dist.monitored_barrier refuses every backend but "gloo" by
    its name; importing the backend lets it reach meshrun's."""
    out = mesh.spawn(monitored, 3, timeout=90)
    assert all(o["after"] == "9.0" for o in out), out
    for r in (0, 2):
        assert out[r]["skipped"].startswith(f"MeshTimeoutError: rank {r}: all_reduce #"), out[r]
        assert "world rank 1 has not called it" in out[r]["skipped"], out[r]
        assert "world rank 2 has not" not in out[r]["skipped"], out[r]
    assert out[0]["one"].startswith("MeshTimeoutError: Rank 1 failed to pass monitoredBarrier "
                                    "in 1000 ms"), out[0]
    assert out[2]["one"].startswith("MeshTimeoutError: Rank 2 successfully reached "
                                    "monitoredBarrier, but received errors while waiting for "
                                    "send/recv from rank 0: "), out[2]
    assert "rank 0" in out[2]["one"] and "Rank 1 failed" in out[2]["one"], out[2]
    assert out[0]["two"].startswith("MeshTimeoutError: Ranks 1, 2 failed to pass "
                                    "monitoredBarrier in 1000 ms"), out[0]
    assert "one" not in out[1] and "two" not in out[1] and "two" not in out[2]


def monitored_dead(world: Any, out: str) -> None:
    _init()
    r = dist.get_rank()
    dist.barrier()
    if r == 2:
        os._exit(3)
    t0 = time.monotonic()
    try:
        dist.monitored_barrier(timeout=timedelta(seconds=60))
        said = "passed"
    except Exception as e:          # (any: the test's assertions show what it was)
        said = f"{type(e).__name__}: {e}"
    with open(f"{out}.{r}", "w") as f:
        f.write(f"{time.monotonic() - t0:.1f} {said}")


def test_monitored_barrier_names_a_dead_rank_at_once(tmp_path: Path) -> None:
    with pytest.raises(mesh.WorkerError, match="rank 2 failed"):
        # settle: the survivors write what they saw after rank 2 is gone; on a
        # loaded machine that may take them more than spawn's second
        mesh.spawn(monitored_dead, 3, str(tmp_path / "said"), timeout=90, settle=20)
    said = [(tmp_path / f"said.{r}").read_text().split(" ", 1) for r in (0, 1)]
    assert all(float(t) < 15 for t, _ in said), said          # not the 60 s timeout
    assert said[0][1].startswith("LostPeerError: Rank 2 failed to pass monitoredBarrier: "), said
    assert said[1][1].startswith("LostPeerError: Rank 1 successfully reached monitoredBarrier"
                                 ), said



def monitored_by_device(world: Any, backend: str) -> list[str]:
    """monitored_barrier on groups whose backend names meshrun for cpu only."""
    import collectives.torchdist  # noqa: F401
    dist.init_process_group(backend)
    sub = dist.new_group([0, 1], backend=backend)
    said = []
    for group in (None, sub):
        dist.monitored_barrier(group, timeout=timedelta(seconds=30), wait_all_ranks=True)
        said.append(dist.get_backend(group))
    if dist.get_rank() == 0:       # rank 1 never comes: named in gloo's words
        try:
            dist.monitored_barrier(sub, timeout=timedelta(seconds=1))
        except RuntimeError as e:
            said.append(f"{type(e).__name__}: {e}")
    dist.barrier()
    dist.destroy_process_group()
    return said


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["cpu:meshrun", "cpu:meshrun,cuda:nccl"])
def test_monitored_barrier_on_a_backend_named_by_device(backend: str) -> None:
    """The wrapper looks at the group's CPU backend, not the backend's name
    (torch's own refused these: "only implemented for GLOO backend")."""
    out = mesh.spawn(monitored_by_device, 2, backend, timeout=60)
    assert out[0][:2] == out[1][:2] == [backend, backend], out
    assert out[0][2].startswith("MeshTimeoutError: Rank 1 failed to pass monitoredBarrier in "
                                "1000 ms"), out[0]


def unreceived(world: Any) -> list[str]:
    """An isend with no irecv to match it in batch_isend_irecv: on a group of
    its own (dropped at destroy, named), then on the default group over
    mesh.spawn's mesh, the caller's own (kept there for the caller, named)."""
    import warnings
    _init()
    said = []
    for rnd in range(2):
        if rnd:
            dist.init_process_group("meshrun")
        g = dist.new_group([0, 1]) if not rnd else None
        if dist.get_rank() == 0:
            ops = [dist.P2POp(dist.isend, torch.full((4,), 1.0), 1, tag=0, group=g),
                   dist.P2POp(dist.isend, torch.full((4,), 99.0 + rnd), 1, tag=7, group=g)]
        else:
            ops = [dist.P2POp(dist.irecv, torch.zeros(4), 0, tag=0, group=g)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        if dist.get_rank() == 0:
            dist.send(torch.full((4,), 5.0), 1, tag=8, group=g)
        else:
            got = torch.zeros(4)
            dist.recv(got, 0, tag=8, group=g)
            said.append(str(got.tolist()))
        dist.barrier()      # (the message has come by now)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dist.destroy_process_group()
        said += [str(w.message) for w in caught]
    if world.rank == 1:     # the one left on the caller's mesh is the caller's
        said.append(str(world.recv(0, 7).tolist()))
    return said


@pytest.mark.timeout(60)
def test_a_message_never_received_is_named_and_dropped_at_destroy() -> None:
    """gloo drops it unsaid; on a mesh that outlives the group, the next
    group's recv of that peer and tag took it. A group's own are dropped;
    on the caller's own mesh they are the caller's, kept and named."""
    out = mesh.spawn(unreceived, 2, timeout=45)
    assert out[0] == [], out
    assert out[1][:2] == ["[5.0, 5.0, 5.0, 5.0]",
                          "rank 1: destroy_process_group: group world/[0, 1] dropped 1 "
                          "message(s) sent to this rank and never received (a send with no "
                          "matching recv): from rank 0 tag 7 (16 bytes)"], out
    assert out[1][2] == "[5.0, 5.0, 5.0, 5.0]", out
    assert out[1][3].startswith("rank 1: destroy_process_group: group world has a message sent "
                                "to this rank and not received, from rank 0 tag 7 (16 bytes) "
                                "(maybe more): the mesh outlives the group"), out
    assert out[1][4:] == ["[100.0, 100.0, 100.0, 100.0]"], out

INIT = textwrap.dedent("""
    import os, sys, threading, time
    from datetime import timedelta
    import torch, torch.distributed as dist
    import collectives.torchdist
    rank, size, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[4]
    if rank < 2:    # ranks 0 and 1 first init again at once after destroy, 3 times a method
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        for method in ("env://", f"tcp://127.0.0.1:{port}"):
            for i in range(3):
                dist.init_process_group("meshrun", init_method=method, rank=rank, world_size=2,
                                        timeout=timedelta(seconds=30))
                t = torch.full((2,), rank + 1.0)
                dist.all_reduce(t)
                assert t.tolist() == [3.0, 3.0], t
                # rank 0 drops its store half a second after destroy_process_group, as a
                # rank 0 slower than rank 1 there would: rank 1 joins on it meanwhile
                keep = rank == 0 and i < 2
                store = dist.distributed_c10d._get_default_store() if keep else None
                dist.destroy_process_group()
                if store is not None:
                    time.sleep(0.5)
                    del store
            print(f"rank {rank} again {method.split(':')[0]} ok", flush=True)
        del os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    before = {t.name for t in threading.enumerate()}
    store = None
    for method in sys.argv[5:]:
        if method.startswith("tcp@"):
            # tcp://: rank 0 serves torch's store on a port the OS picks (its
            # init_process_group then finds that server, torch's stores being
            # multi-tenant) and passes the port on in a file
            path = method[4:]
            if rank == 0:
                store = dist.TCPStore("127.0.0.1", 0, size, True, multi_tenant=True,
                                      wait_for_workers=False)
                with open(path + ".tmp", "w") as f:
                    f.write(str(store.port))
                os.replace(path + ".tmp", path)
            deadline = time.monotonic() + 60
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.05)
            with open(path) as f:
                method = f"tcp://127.0.0.1:{int(f.read())}"
        dist.init_process_group("meshrun", init_method=method, rank=rank, world_size=size)
        t = torch.full((2,), rank + 1.0)
        dist.all_reduce(t)
        assert t.tolist() == [size * (size + 1) / 2] * 2, t
        dist.all_reduce(t, async_op=True).wait()     # a lane thread, which destroy ends
        g = dist.new_group([0, size - 1])
        dist.barrier(group=g)
        last = method.startswith("file:")
        marks = [f"{sys.argv[3][len('file://'):]}.destroyed.{r}" for r in range(size - 1)]
        if last and rank == size - 1:
            # busy outside the group's calls (a save, a hang) while the others destroy
            # it: their destroy_process_group waited 30 s (MESH_CLOSE_WAIT) for its goodbye
            deadline = time.monotonic() + 60
            while not all(map(os.path.exists, marks)) and time.monotonic() < deadline:
                time.sleep(0.05)
        t0 = time.monotonic()
        dist.destroy_process_group()
        if last and rank < size - 1:
            print(f"rank {rank} destroyed in {time.monotonic() - t0:.1f}s", flush=True)
            open(marks[rank], "w").close()
        left = {t.name for t in threading.enumerate()} - before
        assert not left, f"threads left behind: {left}"
        print(f"rank {rank} {method.split(':')[0]} ok", flush=True)
    # the last rank dies during DDP's backward: the others' raises, naming it
    dist.init_process_group("meshrun", init_method=sys.argv[3], rank=rank, world_size=size)
    net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    dist.barrier()     # every rank is past DDP's start-up broadcast (a rank that
    loss = net(torch.ones(2, 4)).sum()   # died in it would fail that, not backward)
    if rank == size - 1:
        time.sleep(1)  # the others wait in backward's all-reduce by now
        os._exit(3)
    t0 = time.monotonic()
    try:
        loss.backward()
        print("backward returned", flush=True)
    except Exception as e:
        print(f"rank {rank} raised after {time.monotonic() - t0:.0f}s: {e}", flush=True)
""")


@pytest.mark.timeout(120)
def test_init_again_at_once_then_tcp_and_file_init_no_thread_left_and_a_dead_rank_fails_ddp(
        tmp_path: Path) -> None:
    """Three torch processes (forks of mesh.spawn's fork server, torch
    imported there: proctools.run_ranks) for all of it:

    destroy_process_group is no collective: rank 1 inits again (env://,
    tcp://, at world size 2) while rank 0 still holds (and serves) the store
    of the group just destroyed, and counts its join there; rank 0 then
    drops it. Without a second chance every such round failed: rank 1 "did
    not publish the rendezvous address under key 'meshrun/rendezvous/2/1'"
    (the old store's next generation, its connection closed), rank 0 "Timed
    out ... waiting for clients".

    Then all three init over tcp:// and file://, leaving no thread behind
    (after file://, ranks 0 and 1 destroy the group while rank 2 is busy
    elsewhere: not waiting 30 s for its goodbye), and the last dies in DDP's
    backward: the others raise, naming it."""
    script = tmp_path / "init.py"
    script.write_text(INIT)
    # (not a port found free here: another process could take it before rank 0 binds it)
    methods = [f"tcp@{tmp_path}/port", f"file://{tmp_path}/store"]
    port = str(free_port())         # (env:// and tcp:// of the inits again take a number)
    procs, outs = run_ranks(str(script), [[str(r), "3", f"file://{tmp_path}/s2", port, *methods]
                                          for r in range(3)], rank_env(), [90, 30])
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == (3 if r == 2 else 0), out
        assert f"rank {r} tcp ok" in out and f"rank {r} file ok" in out, out
        if r < 2:
            assert f"rank {r} again env ok" in out and f"rank {r} again tcp ok" in out, out
            line = next(x for x in out.splitlines() if x.startswith(f"rank {r} raised after"))
            assert int(line.split()[4].rstrip("s:")) < 15 and "rank 2" in line, line
            line = next(x for x in out.splitlines() if x.startswith(f"rank {r} destroyed in"))
            assert float(line.split()[-1].rstrip("s")) < 10, line     # (it was 30 s)


@pytest.mark.timeout(60)
def test_a_store_client_whose_connection_closes_while_it_connects_connects_again(
        monkeypatch: Any) -> None:
    """env:// and tcp:// make their store in rendezvous._create_c10d_store: a
    rank that inits again at once after destroy_process_group may connect to
    rank 0's old store just as rank 0 drops it (torch raised DistNetworkError
    from init_process_group)."""
    import importlib
    import collectives.torchdist  # noqa: F401
    rdv = importlib.import_module("torch.distributed.rendezvous")
    real = rdv.TCPStore
    made: list[bool] = []       # is_master of each TCPStore made
    fail: list[bool] = []       # the next server's (True) or client's (False) connection closes

    def closing(*args: Any, **kwargs: Any) -> Any:
        made.append(bool(kwargs.get("is_master")))
        if fail and fail[0] == made[-1]:
            fail.pop()
            raise dist.DistNetworkError("Failed to recv, got 0 bytes. Connection was likely "
                                        "closed. Did the remote server shutdown or crash?")
        return real(*args, **kwargs)
    monkeypatch.setattr(rdv, "TCPStore", closing)
    port, sec = free_port(), timedelta(seconds=10)
    fail.append(False)      # rank 1's first connection closes under it
    servers: list[Any] = []      # rank 0's waits for rank 1 to connect: a thread
    server = threading.Thread(target=lambda: servers.append(rdv._create_c10d_store(
        "127.0.0.1", port, 0, 2, sec)))
    server.start()
    client = rdv._create_c10d_store("127.0.0.1", port, 1, 2, sec)
    server.join(20)
    client.set("k", "v")
    assert servers and servers[0].get("k") == b"v" and sorted(made) == [False, False, True]
    fail.append(True)
    with pytest.raises(dist.DistNetworkError):   # a server's error (its port taken) stays
        rdv._create_c10d_store("127.0.0.1", port, 0, 2, timedelta(seconds=10))


def test_a_restarted_job_makes_its_process_group_anew_then_the_ddp_example_and_gloo_run(
        tmp_path: Path) -> None:
    """meshrun --max-restarts 1: rank 1 fails on the first try;
    init_process_group("meshrun") works in the ranks started again (a fresh
    rendezvous) and the job resumes from its checkpoint. Then, in the same
    ranks (a job less: torch imported by 2 processes fewer),
    examples/torch_ddp.py runs unchanged (under torchrun:
    test_mesh_torchrun.py's --standalone job runs it after its own checks,
    in the same ranks), and then the same ranks make a gloo group: the mesh
    meshrun's env:// made for its store stayed open after
    destroy_process_group (its threads mesh-zap and mesh-progress-r, its
    heartbeats), where torchrun's leaves nothing."""
    script = os.path.join(ROOT, "tests", "scripts", "launch_restart.py")
    then = os.path.join(ROOT, "tests", "scripts", "torch_ddp_then_gloo.py")
    cmd = [sys.executable, "-m", "mesh.launch", "-n", "2", "--max-restarts", "1", script,
           str(tmp_path), "torch", "1", then]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=rank_env(), cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "RuntimeError: rank 1 fails at step 2 of try 0" in out.stderr
    assert "starting every rank again (restart 1 of 1" in out.stderr
    ends = sorted(line for line in out.stdout.splitlines() if '"restart": 1' in line)
    assert len(ends) == 2 and all('"resumed_at": 3, "total": 8.0' in e for e in ends), \
        f"the restarted job did not resume from its checkpoint:\n{out.stdout}"
    losses = [float(line.rsplit(" ", 1)[1]) for line in out.stdout.splitlines()
              if "loss" in line]
    assert len(losses) == 6 and losses[-1] < losses[0], \
        f"the DDP example did not train after the restart:\n{out.stdout}"
    gloo = [line for line in out.stdout.splitlines() if "gloo: threads" in line]
    assert len(gloo) == 2, out.stdout
    for line in gloo:
        assert "before ['MainThread'] during ['MainThread'] after ['MainThread'], mesh open " \
               "False" in line, f"a gloo group after the meshrun ones: {line}"


def ddp_on_one_gpu(world: Any) -> float:
    from torch.nn.parallel import DistributedDataParallel as DDP
    _init()
    gen = torch.Generator().manual_seed(3)
    steps = [(torch.randn(4 * world.size, 5, generator=gen),
              torch.randn(4 * world.size, 2, generator=gen)) for _ in range(4)]
    diffs = [_train(DDP(_Net().cuda(0), **kw), steps, world.rank, "cuda:0")
             for kw in ({"find_unused_parameters": True, "bucket_cap_mb": 0.0002},
                        {"static_graph": True})]
    dist.destroy_process_group()
    return max(diffs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_ddp_with_ranks_sharing_one_gpu() -> None:
    """NCCL refuses two ranks on one GPU; meshrun's CUDA IPC path takes them."""
    for diff in mesh.spawn(ddp_on_one_gpu, 2, timeout=120):
        assert diff < 1e-5


def test_one_rank_here_tensors_go_to_the_collectives_as_they_are(monkeypatch: Any) -> None:
    """In this process, one rank: dist.all_reduce of a CPU tensor numpy can
    view goes straight to the host collective with that view of its memory
    (no tensor dispatch), synchronous or not (DDP's buckets); other tensors
    (bfloat16, one that requires grad) go to collectives.* as they are (their
    torch support, no conversion of its own); a synchronous call returns a
    finished Work without making a torch Future (an asynchronous one still
    completes its future)."""
    import collectives.torchdist  # noqa: F401
    from collectives import api, torchpg, torchwork
    seen: list[Any] = []
    views: list[Any] = []
    direct: list[Any] = []
    made: list[int] = []

    def spy(g: Any, a: Any, **kw: Any) -> Any:
        # collectives.tensors calls back with its numpy view: the tensor's memory, no copy
        (seen if isinstance(a, torch.Tensor) else views).append(a)
        return real(g, a, **kw)

    def spy_host(g: Any, a: Any, *args: Any) -> Any:
        direct.append(a)
        return real_host(g, a, *args)
    real_host = torchpg._host_all_reduce
    monkeypatch.setattr(torchpg, "_host_all_reduce", spy_host)

    class Counted(torch.futures.Future):
        def __init__(self) -> None:
            made.append(1)
            super().__init__()
    real = api.all_reduce
    monkeypatch.setattr(api, "all_reduce", spy)
    monkeypatch.setattr(torchwork, "Future", Counted)
    # the store on a port the OS picks, which init_process_group's tcp:// then finds
    store = dist.TCPStore("127.0.0.1", 0, 1, True, multi_tenant=True)
    dist.init_process_group("meshrun", init_method=f"tcp://127.0.0.1:{store.port}", rank=0,
                            world_size=1)
    try:
        t = torch.full((3,), 2.0)
        dist.all_reduce(t, op=R.AVG)
        assert seen == [] and len(direct) == 1 and made == []
        assert direct[0].__array_interface__["data"][0] == t.data_ptr()
        opts = dist.AllreduceOptions()
        opts.asyncOp = False
        w = dist.group.WORLD.allreduce([t], opts)
        assert w.wait() and w.is_completed() and w.is_success() and w.exception() is None
        assert w.result()[0] is t and w.get_future().value()[0] is t
        w = dist.all_reduce(t, async_op=True)     # DDP's bucket: the view too, on the lane
        w.wait()
        assert w.get_future().wait()[0] is t and t.tolist() == [2.0] * 3
        assert seen == [] and len(direct) == 3 and len(made) == 2     # (the future and its then)
        assert direct[2].__array_interface__["data"][0] == t.data_ptr()
        w = dist.all_reduce(t, op=R.MAX, async_op=True)
        assert w.get_future().wait()[0] is t and len(direct) == 4
        g = torch.full((2,), 3.0, requires_grad=True)     # no numpy view: the tensor path
        dist.all_reduce(g)
        assert seen[-1] is g and len(direct) == 4 and g.tolist() == [3.0, 3.0]
        assert views[0].__array_interface__["data"][0] == g.data_ptr()
        seen.clear()
        u = torch.ones(2, dtype=torch.bfloat16)
        dist.all_reduce(u)
        assert seen[0] is u and u.tolist() == [1.0, 1.0]
    finally:
        dist.destroy_process_group()
        del store


def test_register_is_idempotent_and_autoload_never_raises(monkeypatch: Any) -> None:
    import collectives.torchdist as td
    td.register()
    td.register()
    assert dist.Backend.backend_list.count("meshrun") == 1
    monkeypatch.setattr(td, "register", lambda: 1 / 0)
    with pytest.warns(UserWarning, match="could not register"):
        td.autoload()


@pytest.mark.timeout(120)
def test_importing_any_torch_module_before_torch_registers_the_backend() -> None:
    """A collectives.torch* module as a script's first line: its own
    ``import torch`` runs torch's
    ``torch.backends`` entry point. torchdist found itself half loaded (it
    raised: no attribute 'autoload'); every other module failed ``import
    torch`` (a circular import: the entry point's torchdist imported torchpg,
    which imported the module half made)."""
    from importlib.metadata import entry_points
    if not any(e.value == "collectives.torchdist:autoload"
               for e in entry_points(group="torch.backends")):
        pytest.skip("meshrun's torch.backends entry point is not installed")
    check = ("import torch.distributed as dist, collectives.torchdist as td, collectives.torchpg\n"
             "assert td._registered and 'meshrun' in dist.Backend.backend_list\n"
             "assert td.ProcessGroupMeshrun is collectives.torchpg.ProcessGroupMeshrun\n"
             "print('registered')")
    # three interpreters, not one a module (each imports torch): torchdist first,
    # torchwork first (it failed), and torch first, after which the entry point must have
    # loaded torchdist alone, so that no other module is found half made, whichever is first
    alone = ("import sys, torch\n"
             "made = sorted(m for m in sys.modules if m.startswith('collectives.torch'))\n"
             "assert made == ['collectives.torchdist'], made\n")
    procs = {name: subprocess.Popen([sys.executable, "-c", f"{first}\n{check}"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=rank_env(), cwd=ROOT)
             for name, first in (("torchdist", "import collectives.torchdist"),
                                 ("torchwork", "import collectives.torchwork"),
                                 ("torch", alone))}
    failed = {}
    try:
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=100)
            if proc.returncode != 0 or "registered" not in out:
                failed[name] = out[-2000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not failed, failed


def rank0_refused(world: Any) -> str:
    import collectives.torchdist  # noqa: F401
    if world.rank == 0:
        torch.__version__ = "2.7.1"            # (this rank's torch only)
    try:
        dist.init_process_group("meshrun")
    except RuntimeError as e:
        return "refused" if "needs torch >= 2.8" in str(e) else str(e)
    try:
        dist.barrier()
    except mesh.MeshError as e:
        return "lost rank 0" if "rank 0" in str(e) else str(e)
    return "no error"


def test_a_rank_failing_in_init_after_the_rendezvous_leaves_none_waiting() -> None:
    """Rank 0 raised in init_process_group after starting the store and
    dropped it; rank 1, still connecting, retried for the whole timeout (30
    minutes). Now every rank connects before any goes on, and rank 1's
    first collective names rank 0."""
    assert mesh.spawn(rank0_refused, 2, timeout=60) == ["refused", "lost rank 0"]


def test_premul_sum_on_a_torch_that_hides_its_factor_says_what_it_needs() -> None:
    from types import SimpleNamespace

    from collectives.torchpg import _op
    assert _op(R.SUM) == ("sum", None)
    with pytest.raises(ValueError, match=r"PREMUL_SUM needs torch >= 2\.13"):
        _op(SimpleNamespace(op=R.RedOpType.PREMUL_SUM))       # torch 2.8-2.12's ReduceOp



def premul_reduce(world: Any) -> list[float]:
    """dist.reduce with PREMUL_SUM: the root's tensor, then every rank's own."""
    _init()
    r = dist.get_rank()
    t = torch.full((2,), r + 1.0)
    dist.reduce(t, dst=1, op=dist._make_nccl_premul_sum(0.5))
    w = torch.full((3,), r + 1.0)
    dist.reduce(w, dst=0, op=dist._make_nccl_premul_sum(torch.tensor([2.0])),
                async_op=True).wait()
    dist.destroy_process_group()
    return t.tolist() + w.tolist()


@pytest.mark.skipif(not PREMUL, reason="torch < 2.13 keeps PREMUL_SUM's factor in C++")
@pytest.mark.timeout(60)
def test_premul_sum_reduce_leaves_the_other_ranks_tensors_as_they_were() -> None:
    """The factor scaled every rank's tensor in place, so a rank other than
    the root had its input halved, where every other op (and NCCL's
    PREMUL_SUM) leaves it as it was."""
    got = mesh.spawn(premul_reduce, 3, timeout=45)
    assert got[0] == [1.0, 1.0, 12.0, 12.0, 12.0], got       # root of the second
    assert got[1] == [3.0, 3.0, 2.0, 2.0, 2.0], got          # root of the first
    assert got[2] == [3.0, 3.0, 3.0, 3.0, 3.0], got

def late_to_init(world: Any) -> str:
    import collectives.torchdist  # noqa: F401
    if world.rank == 1:
        time.sleep(2)                          # past MESH_TIMEOUT, within init's timeout
    dist.init_process_group("meshrun", timeout=timedelta(seconds=60))
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return str(int(t.item()))


def test_a_rank_late_to_init_waits_by_inits_timeout_not_the_meshs() -> None:
    """The rendezvous's own collectives wait as long as init_process_group's
    timeout says (a rank may load data for minutes first), not MESH_TIMEOUT."""
    assert mesh.spawn(late_to_init, 2, timeout=60, env={"MESH_TIMEOUT": "1"}) == ["2", "2"]


def test_a_torch_older_than_the_backend_needs_is_refused_by_name() -> None:
    """torch before 2.8 lacks asyncOp on its collective options, and before
    2.7 loses a Python Work handed to its C++ (DDP hung): init_process_group
    says so rather than failing inside the first collective, or hanging."""
    import collectives.torchdist as td
    for old in ("2.7.1", "2.1.2+cu121"):
        with pytest.raises(RuntimeError, match=re.escape(f"needs torch >= 2.8 (this is torch "
                                                         f"{old})")):
            td._check_torch(old)
    for ok in ("2.8.0", "2.13.0+cpu", "2.14.1", "3.0.0a0+git1234", "nightly"):
        td._check_torch(ok)


def torch_group_for_meshrun(world: Any) -> str:
    import numpy as np

    import collectives as C
    _init()
    try:
        C.all_reduce(dist.new_group([0, 1]), np.ones(2))
        return "no error"
    except TypeError as e:
        return str(e)
    finally:
        dist.destroy_process_group()


def test_a_torch_group_given_to_meshruns_collectives_says_what_to_pass() -> None:
    """A torch group where meshrun's own API wants its communicator: the
    error names it and the call that gives the communicator (it was a
    bare AttributeError)."""
    for r, said in enumerate(mesh.spawn(torch_group_for_meshrun, 2, timeout=60)):
        assert said.startswith(f"rank {r}: all_reduce: the communicator is a torch.distributed "
                               "group: collectives.torchdist.comm_of(group)"), said


@pytest.mark.timeout(30)
def test_a_works_future_is_complete_once_wait_returns(monkeypatch: Any) -> None:
    """``work.wait(); work.get_future().value()`` (gloo's future is complete
    then): wait() returned once the plain future was set, before its
    ``then`` (the future torch hands out) had run, and ``value()`` raised
    torch's "completed() INTERNAL ASSERT FAILED" (a slow ``then`` here
    makes the race certain; in real runs a few calls in a hundred)."""
    from collectives import torchpg, torchwork
    unwrap = torchwork._unwrap

    def slow(fut: Any) -> Any:
        time.sleep(0.3)
        return unwrap(fut)
    monkeypatch.setattr(torchwork, "_unwrap", slow)
    work = torchpg._FutureWork()
    threading.Thread(target=work.finish, args=([torch.ones(2)], None)).start()
    assert work.wait() and work.is_completed()
    assert torch.equal(work.get_future().value()[0], torch.ones(2))
    # a callback of the future's own that waits for its Work returns (the future is
    # done before its callbacks run)
    seen: list[Any] = []
    work = torchpg._FutureWork()
    work.get_future().then(lambda _: seen.append(work.wait()))
    done = threading.Thread(target=work.finish, args=([torch.ones(2)], None), daemon=True)
    done.start()
    done.join(10)
    assert seen == [True]


def p2p_future_after_wait(world: Any) -> str:
    _init()
    r = dist.get_rank()
    w = dist.isend(torch.full((2,), 7.0), 1) if r == 0 else dist.irecv(torch.zeros(2), 0)
    w.wait()
    got = w.get_future().value()
    dist.destroy_process_group()
    return str(got[0].tolist())


@pytest.mark.timeout(60)
def test_a_point_to_point_works_future_is_complete_once_wait_returns() -> None:
    """An isend's or irecv's ``get_future()`` after ``wait()``: its future
    was completed by a thread started then, so ``value()`` at once raised
    torch's "completed() INTERNAL ASSERT FAILED"."""
    assert mesh.spawn(p2p_future_after_wait, 2, timeout=45) == ["[7.0, 7.0]"] * 2


def gathered_future(world: Any) -> list[Any]:
    _init()
    r = dist.get_rank()
    out = torch.zeros(4, 3)
    w = dist.all_gather_into_tensor(out, torch.full((2, 3), r + 1.0), async_op=True)
    w.wait()
    rows = w.get_future().value()
    flat = torch.zeros(4)
    w = dist.all_gather_into_tensor(flat.view(2, 2), torch.full((1, 2), r + 1.0), async_op=True)
    w.wait()
    # a blocking call's Work (the group's own, as a caller of ProcessGroup gets it) too,
    # its rows made once they are asked for
    pg = dist.distributed_c10d._get_default_group()
    done = pg._allgather_base(out, torch.full((2, 3), r + 2.0))
    same = [done.result()[1].data_ptr() == out[2].data_ptr(), done.result() is done.result(),
            [tuple(t.shape) for t in done.get_future().value()], out[3].tolist()]
    dist.destroy_process_group()
    return [[tuple(t.shape) for t in rows], rows[1].data_ptr() == out[2].data_ptr(),
            [tuple(t.shape) for t in w.get_future().value()], same]


@pytest.mark.timeout(60)
def test_all_gather_into_tensors_future_holds_its_rows_as_gloos() -> None:
    """``dist.all_gather_into_tensor(..., async_op=True).get_future().value()``
    is gloo's: the output's rows, one view of each rank's part (it was
    ``[output]``, where gloo's is ``output.chunk(world_size)``)."""
    want = [[(2, 3), (2, 3)], True, [(1, 2), (1, 2)],
            [True, True, [(2, 3), (2, 3)], [3.0, 3.0, 3.0]]]
    assert mesh.spawn(gathered_future, 2, timeout=45) == [want] * 2


def short_forms(world: Any) -> list[Any]:
    """ProcessGroup's short forms, called on the group itself (DDP's join
    hook calls ``process_group.allreduce(tensor)``), then DDP with
    find_unused_parameters=True under ``join()`` with uneven inputs."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    _init()
    r, n = dist.get_rank(), dist.get_world_size()
    pg = dist.distributed_c10d._get_default_group()
    got: list[Any] = []
    outs = [torch.zeros(n) for _ in range(n)]
    pg.allgather(outs, torch.arange(float(n)) + 10 * r).wait()  # (came back transposed)
    got.append([o.tolist() for o in outs])
    t = torch.tensor([r + 1.0, 5.0 - r])
    pg.allreduce(t).wait()
    pg.allreduce(t, R.MAX).wait()
    pg.allreduce([t], R.MIN).wait()
    got.append(t.tolist())
    t = torch.tensor([float(r), -1.0])
    pg.broadcast(t, 1).wait()
    got.append(t.tolist())
    t = torch.tensor([r + 2.0, 1.0])
    pg.reduce(t, 0, R.PRODUCT).wait()
    got.append(t.tolist() if r == 0 else None)
    outs = [torch.zeros(2) for _ in range(n)] if r == 1 else []
    pg.gather(outs, torch.tensor([float(r), 1.0]), 1).wait()
    got.append([o.tolist() for o in outs])
    out = torch.zeros(2)
    pg.scatter(out, [torch.full((2,), j + 0.5) for j in range(n)] if r == 0 else [], 0).wait()
    got.append(out.tolist())
    out = torch.zeros(2)
    pg.reduce_scatter(out, [torch.full((2,), float(j + r)) for j in range(n)], R.SUM).wait()
    got.append(out.tolist())
    outs = [torch.zeros(1) for _ in range(n)]
    pg.alltoall(outs, [torch.tensor([10.0 * r + j]) for j in range(n)],
                timedelta(seconds=30)).wait()
    got.append([o.item() for o in outs])
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)),
                find_unused_parameters=True)
    with model.join():          # rank 0 joins first: its hook all-reduces the used-map
        for i in range(1 + r):
            model(torch.full((1, 3), i + 1.0)).sum().backward()
    got.append(sorted(p.grad.shape for p in model.parameters()) != [])
    dist.destroy_process_group()
    return got


@pytest.mark.timeout(60)
def test_process_groups_short_forms_as_gloos_and_ddp_join_with_unused_parameters() -> None:
    """``pg.allgather(outs, t)``, ``pg.allreduce(t[, op])``, ``pg.broadcast(t,
    root)`` and the other short forms torch's C++ ProcessGroup takes as
    overloads reached the Python group as they were: a bare tensor taken as
    the list of tensors (iterated by rows), the root or op as the options.
    ``pg.allgather`` of n-element tensors at n ranks came back transposed
    ([[0, 10], [1, 11]]); the others raised on every rank, and so did DDP's
    join with find_unused_parameters=True (RuntimeError "Boolean value of
    Tensor with more than one value is ambiguous" on the rank that joined,
    MismatchError on the others). Values are gloo's."""
    want = [[[0.0, 1.0], [10.0, 11.0]], [3.0, 9.0], [1.0, -1.0], [6.0, 1.0],
            [[0.0, 1.0], [1.0, 1.0]], None, [1.0, 1.0], None, True]
    got = mesh.spawn(short_forms, 2, timeout=45)
    for r, g in enumerate(got):
        w = list(want)
        w[3] = want[3] if r == 0 else None
        w[4] = want[4] if r == 1 else []
        w[5] = [r + 0.5] * 2
        w[6] = [2.0 * r + 1] * 2
        w[7] = [float(r), 10.0 + r]
        assert g == w, (r, g, w)


def coalesced_counts(world: Any) -> list[Any]:
    _init()
    r, n = dist.get_rank(), dist.get_world_size()
    pg = dist.distributed_c10d._get_default_group()
    ts = [torch.full((2,), r + 1.0), torch.arange(6.0).reshape(2, 3).t() + r]
    dist.all_reduce_coalesced(ts)
    got: list[Any] = [[t.tolist() for t in ts]]
    outs = [torch.zeros(2 * n), torch.zeros(2 * n, 3)]
    pg.allgather_into_tensor_coalesced(outs, [torch.tensor([r, 0.5]),
                                              torch.arange(6.0).reshape(2, 3) + 10 * r]).wait()
    got.append([o.tolist() for o in outs])
    outs = [torch.zeros(2), torch.zeros(1, 3)]
    pg.reduce_scatter_tensor_coalesced(outs, [torch.arange(2.0 * n) + r,
                                              torch.arange(3.0 * n).reshape(n, 3)]).wait()
    got.append([o.tolist() for o in outs])
    five = [torch.full((2,), 5.0)] if r == 1 else []      # one tensor more on rank 1
    ts = [torch.ones(2), torch.ones(2)] + five
    got.append(_said(lambda: dist.all_reduce_coalesced(ts)))
    c = torch.ones(2)
    dist.all_reduce(c)          # (rank 0's took rank 1's third tensor: [6, 6])
    got.append(c.tolist())
    got.append(_said(lambda: pg.allgather_into_tensor_coalesced(
        [torch.zeros(2 * n)] * (2 + len(five)), [torch.ones(2)] * 2 + five).wait()))
    c = torch.zeros(2 * n)
    dist.all_gather_into_tensor(c, torch.ones(2))    # (rank 0's: [1, 1, 5, 5])
    got.append(c.tolist())
    got.append(_said(lambda: pg.reduce_scatter_tensor_coalesced(
        [torch.zeros(2)] * (2 + len(five)), [torch.ones(2 * n)] * 2 + [5 * torch.ones(2 * n)]
        * len(five)).wait()))
    c = torch.zeros(2)
    dist.reduce_scatter_tensor(c, torch.ones(2 * n))
    got.append(c.tolist())
    dist.destroy_process_group()
    return got


@pytest.mark.timeout(60)
def test_a_coalesced_call_with_one_tensor_more_on_a_rank_raises_on_every_rank() -> None:
    """``dist.all_reduce_coalesced``, ``all_gather_into_tensor_coalesced`` and
    ``reduce_scatter_tensor_coalesced`` (functional collectives' and
    ``_coalescing_manager``'s) made one collective a tensor: a rank with one
    tensor more than the others matched its last with their next call of
    that signature, which took it in and returned ([6, 6] from an
    all_reduce of ones at 2 ranks), and that rank's own next call waited
    for theirs. Tensors of one dtype are one call now, as on gloo: every
    rank raises MismatchError naming both sizes, and the next call lines up."""
    got = mesh.spawn(coalesced_counts, 2, timeout=45)
    for r, g in enumerate(got):
        assert g[0] == [[3.0, 3.0], [[1.0, 7.0], [3.0, 9.0], [5.0, 11.0]]], g
        assert g[1] == [[0.0, 0.5, 1.0, 0.5], [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0],
                                               [10.0, 11.0, 12.0], [13.0, 14.0, 15.0]]], g
        assert g[2] == [[4.0 * r + 1, 4.0 * r + 3], [[6.0 * r, 6.0 * r + 2, 6.0 * r + 4]]], g
        for said, size in ((g[3], "shape=[4]"), (g[5], "shape=[4]"), (g[7], "shape=[2, 4]")):
            assert "MismatchError" not in said and f"rank {r}:" in said and size in said, said
        assert g[4] == [2.0, 2.0] and g[6] == [1.0] * 4 and g[8] == [2.0, 2.0], g


def coalesced_mixed_dtypes(world: Any) -> list[Any]:
    import torch.distributed._functional_collectives as fc
    _init()
    r, n = dist.get_rank(), dist.get_world_size()
    pg = dist.distributed_c10d._get_default_group()
    i64 = torch.int64
    ts = [torch.ones(2), torch.full((3,), r + 1, dtype=i64)]        # agreed: their sums
    pg.allreduce_coalesced(ts).wait()
    got: list[Any] = [[t.tolist() for t in ts]]
    more = [torch.full((2,), 5, dtype=i64)] if r == n - 1 else []   # one tensor more there
    calls = [
        lambda: pg.allreduce_coalesced([torch.ones(2), torch.ones(2, dtype=i64)] + more),
        lambda: pg.allreduce_coalesced([torch.ones(2), torch.ones(2)] if r == 0 else
                                       [torch.ones(2), torch.ones(2, dtype=i64)]),
        lambda: pg.allgather_into_tensor_coalesced(
            [torch.zeros(2 * n, dtype=x.dtype) for x in [torch.ones(2)] + more * 2],
            [torch.ones(2)] + more * 2),
        lambda: pg.reduce_scatter_tensor_coalesced(
            [torch.zeros(2), torch.zeros(2, dtype=i64)][:1 + len(more)],
            [torch.ones(2 * n), torch.ones(2 * n, dtype=i64)][:1 + len(more)]),
        lambda: fc.all_reduce_coalesced([torch.ones(2), torch.ones(2, dtype=i64)] + more,
                                        "sum", dist.group.WORLD)[0].tolist(),
    ]
    for call in calls:
        got.append(_said(lambda: getattr(w := call(), "wait", lambda: w)()))
        c = torch.ones(2, dtype=i64)
        dist.all_reduce(c)          # (the group's next call lines up: n everywhere)
        got.append(c.tolist())
    dist.destroy_process_group()
    return got


@pytest.mark.timeout(60)
def test_a_coalesced_call_of_mixed_dtypes_unlike_across_ranks_raises_on_every_rank() -> None:
    """A coalesced call whose tensors are of several dtypes is one collective a
    tensor: a rank with one tensor more (``pg.allreduce_coalesced``,
    ``_coalescing_manager``'s, functional collectives') took the others' next
    call in (an all_reduce of ones gave [6, 6] at 2 ranks, that rank's next
    call waiting until rank 0 left), and a rank whose tensors were one dtype
    (one joined call) raised where the others went on out of step. Now the
    members agree on the tensors first: every rank raises MismatchError
    naming both calls, and the group's next call lines up."""
    n = 3
    got = mesh.spawn(coalesced_mixed_dtypes, n, timeout=45)
    for r, g in enumerate(got):
        assert g[0] == [[3.0, 3.0], [6, 6, 6]], g
        for said in g[1:-1:2]:
            assert said.startswith(f"rank {r}:") and "collective mismatch" in said, (r, said)
            assert "_coalesced(tensors=[" in said, (r, said)
        assert g[2::2] == [[n, n]] * 5, g


def interrupted_in_a_collective(world: Any) -> list[Any]:
    import signal
    _init()
    r = dist.get_rank()
    if r == 1:      # Ctrl-C (SIGINT) 0.5 s into its all_reduce: rank 2 is not there yet
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    elif r == 2:
        time.sleep(1.5)
    t0, got = time.monotonic(), []
    try:
        dist.all_reduce(torch.ones(2))
        got.append("ok")
    except KeyboardInterrupt:
        got.append("interrupted")       # (and goes on, as in a notebook)
    except mesh.MeshError as e:
        got.append([type(e).__name__, getattr(e, "peer", None), str(e)])
    got.append(time.monotonic() - t0 < 10)
    c = torch.ones(2)
    dist.all_reduce(c)          # the group's next call lines up
    got.append(c.tolist())
    dist.destroy_process_group()
    return got


@pytest.mark.timeout(60)
def test_a_rank_interrupted_in_a_collective_is_a_lost_peer_to_the_others() -> None:
    """A rank interrupted inside a collective (KeyboardInterrupt from Ctrl-C's
    SIGINT, mostly on its way out) aborted the call with a plain MeshError
    ("... all_reduce #3 failed: KeyboardInterrupt"), and a rank that came to
    the call after it raised "an earlier collective failed on a peer after it
    had finished here: ... broadcast_object #1 ..." (init's, which had not
    failed) with no peer. Both now raise LostPeerError naming rank 1 and the
    interrupt, as when its process is gone; a rank that goes on after the
    interrupt finds the group's next call lined up."""
    got = mesh.spawn(interrupted_in_a_collective, 3, timeout=45)
    assert got[1] == ["interrupted", True, [3.0, 3.0]], got[1]
    for r in (0, 2):
        (kind, peer, said), quick, nxt = got[r]
        assert (kind, peer, quick, nxt) == ("LostPeerError", 1, True, [3.0, 3.0]), got[r]
        assert said.startswith(f"rank {r}: all_reduce #") and "rank 1 " in said, said
        assert "KeyboardInterrupt" in said and "earlier collective" not in said, said


def coalesced_of_no_tensors(world: Any) -> list[Any]:
    _init()
    r, n = dist.get_rank(), dist.get_world_size()
    pg = dist.distributed_c10d._get_default_group()
    dist.all_reduce_coalesced([])           # none anywhere: a no-op
    got: list[Any] = []
    ins = [] if r == 0 else [torch.ones(2)]          # none on rank 0, one tensor elsewhere
    calls = [
        lambda: dist.all_reduce_coalesced(ins),
        lambda: dist.all_reduce_coalesced([] if r == 0 else [torch.ones(2), torch.ones(2)]),
        lambda: pg.allgather_into_tensor_coalesced([torch.zeros(2 * n) for _ in ins],
                                                   ins).wait(),
        lambda: pg.reduce_scatter_tensor_coalesced(
            [torch.zeros(2) for _ in ins], [torch.ones(2 * n) for _ in ins]).wait(),
        lambda: pg.allreduce_coalesced(list(ins), _coalesced_options(True)).wait(),
    ]
    for call in calls:
        t = time.monotonic()
        got.append(_said(call))
        got.append(time.monotonic() - t < 10)
        c = torch.ones(2)
        dist.all_reduce(c)          # (rank 0's took the others' tensor in: [2, 2])
        got.append(c.tolist())
    dist.destroy_process_group()
    return got


def _coalesced_options(async_op: bool) -> Any:
    opts = dist.AllreduceCoalescedOptions()
    opts.asyncOp = async_op
    return opts


@pytest.mark.timeout(60)
def test_a_coalesced_call_of_no_tensors_on_one_rank_raises_on_every_rank() -> None:
    """A rank whose coalesced call has no tensors (``all_reduce_coalesced([])``,
    ``all_gather_into_tensor_coalesced`` or ``reduce_scatter_tensor_coalesced``
    of empty lists) started nothing and returned: its next call met the
    others' coalesced call (an all_reduce took their tensor in, silently) or
    they waited to their timeout. Every rank raises MismatchError naming the
    empty call now, and the group's next call lines up; a call of none on
    every rank is a no-op."""
    got = mesh.spawn(coalesced_of_no_tensors, 2, timeout=45)
    for r, g in enumerate(got):
        for said in g[0::3]:
            assert said.startswith(f"rank {r}:") and "collective mismatch" in said, (r, said)
            assert "_coalesced(tensors=[])" in said, (r, said)
        assert g[1::3] == [True] * 5 and g[2::3] == [[2.0, 2.0]] * 5, g


def coalescing_manager_left_empty(world: Any) -> list[Any]:
    _init()
    r, n = dist.get_rank(), dist.get_world_size()
    with dist._coalescing_manager():        # empty on every rank: a no-op
        pass
    got: list[Any] = []
    blocks = [          # what the ranks but rank 0 call in the block
        lambda: dist.all_reduce(torch.ones(2)),
        lambda: [dist.all_reduce(torch.ones(2)) for _ in range(2)],     # (joined: one call)
        lambda: dist.all_gather_into_tensor(torch.zeros(2 * n), torch.ones(2)),
        lambda: [dist.reduce_scatter_tensor(torch.zeros(2), torch.ones(2 * n))
                 for _ in range(2)],
    ]
    for async_ops, block in itertools.product((False, True), blocks):
        def run() -> None:
            with dist._coalescing_manager(async_ops=async_ops) as cm:
                if r != 0:
                    block()
            cm.wait()
        t = time.monotonic()
        got.append(_said(run))
        got.append(time.monotonic() - t < 10)
        c = torch.full((2,), 10.0)
        dist.all_reduce(c)          # (rank 0's met the others' block: [11, 11] at 2 ranks)
        got.append(c.tolist())
    dist.destroy_process_group()
    return got


@pytest.mark.timeout(60)
def test_a_coalescing_manager_with_no_call_on_one_rank_raises_on_every_rank() -> None:
    """``dist._coalescing_manager`` hands the backend one coalesced call of
    what its block recorded, and none at all for an empty block: a rank
    whose block made no call went on, its next call met the others'
    coalesced one and took their tensor in (silently, on every rank), and
    its own call after that waited to its timeout. Every rank raises
    MismatchError naming the empty block now (blocking or ``async_ops``,
    from ``cm.wait()``), and the group's next call lines up; a block empty
    on every rank is a no-op."""
    n = 3
    got = mesh.spawn(coalescing_manager_left_empty, n, timeout=45)
    for r, g in enumerate(got):
        for said in g[0::3]:
            assert said.startswith(f"rank {r}:") and "collective mismatch" in said, (r, said)
            assert "_coalescing_manager(calls=0)" in said, (r, said)
        assert g[1::3] == [True] * 8 and g[2::3] == [[10.0 * n] * 2] * 8, (r, g)


def coalescing_manager_raising(world: Any) -> list[Any]:
    _init()
    r = dist.get_rank()
    got: list[Any] = []
    for raises in (True, r == 0):           # in every rank's block, then in rank 0's alone
        def run() -> None:
            with dist._coalescing_manager():
                dist.all_reduce(torch.ones(2))
                if raises:
                    raise ValueError("the block's own error")
        got.append(_said(run))
        for _ in range(2):
            c = torch.full((2,), 10.0)
            dist.all_reduce(c)      # (was recorded in the block's record left behind: [10, 10])
            got.append(c.tolist())
    try:        # torch's start of per-call coalescing failed after making its record
        with dist._coalescing_manager(device=torch.device("cpu")):
            dist.all_reduce(torch.ones(2))
        got.append("ok")
    except RuntimeError as e:
        got.append(str(e))
    c = torch.full((2,), 10.0)
    dist.all_reduce(c)
    got.append(c.tolist())
    dist.destroy_process_group()
    return got


@pytest.mark.timeout(60)
def test_a_coalescing_manager_block_that_raises_leaves_the_group_usable() -> None:
    """torch's ``_coalescing_manager`` left its record of a block that raised
    behind: every later ``dist.all_reduce`` on the group was recorded there
    and never made (None returned, the tensor as it was; gloo's too), and
    where only rank 0's block raised the others waited in their coalesced
    call. The record goes now, and the raising rank tells the others: they
    raise MismatchError naming its failed block, it its own error, and the
    group's next calls line up. ``device=`` (torch's per-call coalescing,
    which failed after making its record) is refused before it starts."""
    n = 2
    got = mesh.spawn(coalescing_manager_raising, n, timeout=45)
    for r, g in enumerate(got):
        assert g[0] == "the block's own error", g
        if r == 0:
            assert g[3] == "the block's own error", g
        else:
            assert g[3].startswith(f"rank {r}:") and "collective mismatch" in g[3], g
            assert "_coalescing_manager(failed=ValueError)" in g[3], g
        assert g[1:3] == g[4:6] == [[10.0 * n] * 2] * 2, (r, g)
        assert g[6].startswith(f"rank {r}: _coalescing_manager(device=cpu)"), g
        assert g[7] == [10.0 * n] * 2, g


def recv_interrupted_once_matched(world: Any) -> list[Any]:
    from mesh.match import POSTED
    _init()
    r, n = dist.get_rank(), 1 << 22         # 16 MiB: its bytes come after its header
    got: list[Any] = []
    if r == 0:
        dist.recv(torch.zeros(1), src=1, tag=9)
        dist.send(torch.full((n,), 1.0), 1)
        dist.send(torch.full((n,), 2.0), 1)
        got.append("sent")
    else:
        drive, seen = world._t._drive, []

        def interrupt_once_matched(item: Any, deadline: float, limit: float,
                                   flag: Any = None) -> bool:
            if flag is not None or item.fp is not None:
                return drive(item, deadline, limit, flag)
            while item.state is POSTED:         # Ctrl-C once the message has matched it
                drive(item, min(deadline, time.monotonic() + 0.001), 0.001)
            seen.append(item.state.name)
            raise KeyboardInterrupt
        world._t._drive = interrupt_once_matched
        a = torch.zeros(n)
        try:
            dist.send(torch.zeros(1), 0, tag=9)
            dist.recv(a, src=0)
        except KeyboardInterrupt as e:
            got.append(getattr(e, "__notes__", []))
            got.append([a.min().item(), a.max().item()])    # (when the interrupt went on)
        finally:
            world._t._drive = drive
        x = torch.zeros(n)
        dist.recv(x, src=0)
        got.append([x.min().item(), x.max().item()])
        got.append(seen)
    dist.barrier()
    dist.destroy_process_group()
    return got


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes: Python 3.11")
@pytest.mark.timeout(60)
def test_a_recv_interrupted_once_its_message_matched_says_it_took_it() -> None:
    """A receive interrupted (Ctrl-C) once a message had matched it cannot be
    withdrawn (as one still waiting is: its message goes to the next
    receive): its bytes went on into the tensor after ``dist.recv`` had
    raised, and nothing said the message was taken, so a receive made
    again took the next message for this one's. The interrupt now goes on
    once the bytes have landed (the tensor holds the whole message), with a
    note naming the receive and saying the next receive takes the message
    after it."""
    got = mesh.spawn(recv_interrupted_once_matched, 2, timeout=45)
    assert got[0] == ["sent"], got[0]
    notes, a, x, seen = got[1]
    assert seen in (["MATCHED"], ["DONE"]), seen      # (its bytes coming, or landed)
    assert len(notes) == 1 and notes[0].startswith("rank 1: recv from rank 0 (tag 0"), notes
    assert "had matched its message" in notes[0] and "received whole" in notes[0], notes
    assert a == [1.0, 1.0] and x == [2.0, 2.0], got[1]


def interrupted_behind_the_lane(world: Any, told: str) -> list[Any]:
    import signal
    _init()
    r = dist.get_rank()
    dist.barrier()
    got: list[Any] = []
    if r == 1:
        first = dist.all_reduce(torch.ones(2), async_op=True)     # on the lane: rank 0 is late
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            dist.all_reduce(torch.ones(3))      # blocking, queued behind it; Ctrl-C at 1 s
            got.append("ok")
        except KeyboardInterrupt:
            got.append("interrupted")           # (and goes on, as in a notebook)
        Path(told).touch()
        first.wait()
    else:
        deadline = time.monotonic() + 30        # late: rank 1 has been interrupted
        while not os.path.exists(told) and time.monotonic() < deadline:
            time.sleep(0.01)
        a, b = torch.ones(2), torch.ones(3)
        dist.all_reduce(a)
        got.append(a.tolist())
        try:
            dist.all_reduce(b)                  # (took rank 1's interrupted call: [2, 2, 2])
            got.append(b.tolist())
        except mesh.MeshError as e:
            got.append([type(e).__name__, getattr(e, "peer", None), str(e)])
    c = torch.ones(2)
    dist.all_reduce(c)          # the group's next call lines up
    got.append(c.tolist())
    dist.destroy_process_group()
    return got


@pytest.mark.timeout(60)
def test_a_blocking_call_interrupted_behind_the_lane_is_a_lost_peer_to_the_others(
        tmp_path: Path) -> None:
    """A blocking collective made while an async one still runs waits behind
    it on the group's lane; Ctrl-C in that wait raised KeyboardInterrupt,
    but the call stayed queued and ran later: rank 0's all_reduce took rank
    1's tensor in after rank 1 had been told it was interrupted. It is
    aborted now, as a call interrupted in the calling thread is: rank 0
    raises LostPeerError naming rank 1 and the interrupt."""
    got = mesh.spawn(interrupted_behind_the_lane, 2, str(tmp_path / "told"), timeout=45)
    assert got[1] == ["interrupted", [2.0, 2.0]], got[1]
    first, (kind, peer, said), nxt = got[0]
    assert first == [2.0, 2.0] and nxt == [2.0, 2.0], got[0]
    assert (kind, peer) == ("LostPeerError", 1), got[0]
    assert "rank 1 of group world: all_reduce #" in said and "KeyboardInterrupt" in said, said


def half_average_of_unequal_parts(world: Any) -> dict:
    """dist.reduce_scatter of float16 with AVG, parts of equal sizes and of
    unequal ones (rank j's part has j + 1 elements: the uneven path)."""
    _init()
    r, n = dist.get_rank(), dist.get_world_size()
    got = {}
    for kind, sizes in (("even", [2] * n), ("uneven", [j + 1 for j in range(n)])):
        for value in (30000.0, 1.0 + 2 ** -10 * (r + 1)):
            out = torch.zeros(sizes[r], dtype=torch.float16)
            dist.reduce_scatter(out, [torch.full((k,), value, dtype=torch.float16)
                                      for k in sizes], op=R.AVG)
            got[f"{kind} {value > 2}"] = out.tolist()
    dist.destroy_process_group()
    return got


@pytest.mark.timeout(60)
def test_a_float16_average_of_unequal_parts_is_taken_in_float32() -> None:
    """The uneven reduce_scatter summed float16 parts in float16: three
    ranks' 30000 gave inf (even parts: 30000), and 1 + k/1024 (k = 1, 2, 3)
    averaged to 1 + 3/1024, one float16 step off the mean that even parts
    give, 1 + 2/1024. Now both average in float32 and round once."""
    for r, got in enumerate(mesh.spawn(half_average_of_unequal_parts, 3, timeout=45)):
        assert got["even True"] == [30000.0] * 2 and got["uneven True"] == [30000.0] * (r + 1), \
            (r, got)
        mean = 1 + 2 / 1024
        assert got["even False"] == [mean] * 2 and got["uneven False"] == [mean] * (r + 1), \
            (r, got)
