"""The gradient helper: bucket plans, GradReducer against numpy, and the
data-parallel example against single-process training."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

import collectives as C
import mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bucket_plan_follows_backward_order_and_dtypes() -> None:
    assert C.bucket_plan([4, 4, 4, 8], ["f4", "f4", "f4", "f8"], 8) == [[3], [2, 1], [0]]
    assert C.bucket_plan([100, 1, 1], ["f4"] * 3, 10) == [[2, 1, 0]]
    assert C.bucket_plan([1, 100, 1], ["f4"] * 3, 10) == [[2, 1], [0]]
    assert C.bucket_plan([], [], 10) == []
    sizes = [30] * 10
    plan = C.bucket_plan(sizes, ["f8"] * 10, C.DEFAULT_BUCKET_BYTES)
    assert plan == [list(range(9, -1, -1))]
    with pytest.raises(ValueError, match="bucket_bytes"):
        C.bucket_plan([1], ["f4"], 0)


def _grads(seed: int, rank: int) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, rank])
    shapes = [(7, 5), (5,), (), (300,), (2, 3, 4)]
    dtypes = ["float32", "float32", "float64", "float64", "float32"]
    return [rng.integers(-5, 5, size=s).astype(d) for s, d in zip(shapes, dtypes)]


def reducer_cases(world: Any) -> bool:
    n, r = world.size, world.rank
    want_sum = [sum(gs) for gs in zip(*(_grads(0, i) for i in range(n)))]
    grads = _grads(0, r)
    red = C.GradReducer(world, grads, bucket_bytes=64)
    assert len(red.buckets) >= 4
    for step in range(3):
        for i, g in enumerate(_grads(0, r)):
            grads[i][...] = g
        for i in reversed(range(len(grads))):
            red.ready(i)
            launched = [b.work is not None for b in red.buckets]
            assert launched == sorted(launched, reverse=True), "buckets launched out of order"
        red.wait()
        for g, w in zip(grads, want_sum):
            np.testing.assert_allclose(g, w / n, rtol=1e-6, err_msg=f"step {step}")
    # reordered (gradients made first to last): each bucket launches once full, same bits
    with pytest.raises(ValueError, match="once"):
        red.reorder([0, 0])
    red.reorder(list(reversed(range(len(red.buckets)))))
    before = [g.copy() for g in grads]
    for i, g in enumerate(_grads(0, r)):
        grads[i][...] = g
        red.ready(i)
        assert [b.work is not None for b in red.buckets] == [not b.pending
                                                             for b in red.buckets], i
        if i == 1:
            with pytest.raises(RuntimeError, match="launched"):
                red.reorder(range(len(red.buckets)))
    red.wait()
    assert all(np.array_equal(g, w) for g, w in zip(grads, before))
    fresh = _grads(1, r)
    red.ready(0, fresh[0])
    red.wait()
    np.testing.assert_allclose(fresh[0], sum(_grads(1, i)[0] for i in range(n)) / n, rtol=1e-6)
    summed = _grads(2, r)
    C.all_reduce_grads(world, summed, bucket_bytes=1 << 10, op="sum")
    for g, w in zip(summed, [sum(gs) for gs in zip(*(_grads(2, i) for i in range(n)))]):
        assert np.array_equal(g, w)
    # a user op (collectives.Op) takes each bucket flat, combined in rank order:
    # "first" (associative, not commutative) leaves rank 0's gradients everywhere
    mine = _grads(3, r)
    red = C.GradReducer(world, mine, bucket_bytes=64, op=C.Op(lambda a, b: a, name="first"))
    for i in reversed(range(len(mine))):
        red.ready(i)
    red.wait()
    assert all(np.array_equal(g, w) for g, w in zip(mine, _grads(3, 0)))
    added = _grads(4, r)
    C.all_reduce_grads(world, added, bucket_bytes=1 << 10, op=C.Op(np.add, commute=True))
    for g, w in zip(added, [sum(gs) for gs in zip(*(_grads(4, i) for i in range(n)))]):
        assert np.array_equal(g, w)
    return True


@pytest.mark.parametrize("n", [1, 3])
def test_grad_reducer_averages_in_place(n: int) -> None:
    assert mesh.spawn(reducer_cases, n, timeout=60) == [True] * n


def test_data_parallel_example_matches_single_process() -> None:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "mesh.launch", "-n", "3",
                        os.path.join(ROOT, "examples", "data_parallel.py")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "3 ranks: weights equal single-process full-batch training: True" in p.stdout


TORCH_STEPS, TORCH_ROWS = 4, 12


def _torch_mlp() -> Any:
    import torch
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 7),
                               torch.nn.Tanh(), torch.nn.Linear(7, 2)).double()


def _torch_batch(step: int) -> tuple[Any, Any]:
    import torch
    rng = np.random.default_rng(70 + step)
    return (torch.from_numpy(rng.standard_normal((TORCH_ROWS, 6))),
            torch.from_numpy(rng.standard_normal((TORCH_ROWS, 2))))


def torch_cases(world: Any) -> list[np.ndarray]:
    """Data-parallel torch training with the default zero_grad() (which sets
    .grad to None): the reducer, given the parameters, follows the new
    gradient tensors; torch gradient tensors themselves are refused."""
    import torch
    mse = torch.nn.functional.mse_loss
    n, r = world.size, world.rank
    model = _torch_mlp()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.2)
    red = C.GradReducer(world, params, bucket_bytes=256)
    assert len(red.buckets) >= 2
    hooks = [p.register_post_accumulate_grad_hook(lambda p, i=i: red.ready(i))
             for i, p in enumerate(params)]
    rows = TORCH_ROWS // n
    for step in range(TORCH_STEPS):
        x, y = (a[r * rows:(r + 1) * rows] for a in _torch_batch(step))
        opt.zero_grad()
        mse(model(x), y).backward()
        red.wait()
        opt.step()
    for h in hooks:
        h.remove()
    with pytest.raises(TypeError, match="gradient 0 is a torch tensor or a numpy view of one"):
        C.GradReducer(world, [p.grad.numpy() for p in params])
    with pytest.raises(TypeError, match="gradient 1 is a torch tensor"):
        C.GradReducer(world, [np.zeros(3), params[1].grad])
    with pytest.raises(RuntimeError, match="no gradient changed since the last wait()"):
        red.wait()          # (a second wait() in one step: refused, nothing launched)
    mse(model(x), y).backward()
    for i in reversed(range(len(params))):      # every bucket launched, then .grad replaced
        red.ready(i)
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="gradient 0 was replaced after its bucket took it"):
        red.wait()
    mse(model(x), y).backward()
    C.all_reduce_grads(world, [p.grad.numpy() for p in params], op="sum")   # current: fine
    before = [p.grad.clone() for p in params]
    C.all_reduce_grads(world, [p.grad for p in params], op="sum")   # the tensors themselves
    for p, b in zip(params, before):
        assert torch.equal(p.grad, C.all_reduce(world, b, op="sum"))
    _bfloat16_grads(world)
    return [p.detach().numpy().copy() for p in params]


def _bfloat16_grads(world: Any) -> None:
    """bfloat16 gradients share a float32 bucket with float32 ones: the
    average is taken in float32 and rounded to bfloat16 once."""
    import torch
    n = world.size
    shapes, dtypes = [(5,), (2, 3)], [torch.bfloat16, torch.float32]

    def grad(rank: int, k: int) -> Any:
        rng = np.random.default_rng([7, rank, k])
        return torch.from_numpy(rng.standard_normal(shapes[k]).astype(np.float32))
    params = [torch.nn.Parameter(torch.zeros(s, dtype=d)) for s, d in zip(shapes, dtypes)]
    for k, p in enumerate(params):
        p.grad = grad(world.rank, k).to(p.dtype)
    red = C.GradReducer(world, params)
    assert len(red.buckets) == 1
    red.wait()
    for k, p in enumerate(params):
        wide = sum(grad(i, k).to(dtypes[k]).float() for i in range(n)) / n
        assert p.grad.dtype == dtypes[k] and torch.equal(p.grad, wide.to(dtypes[k])), k
    grads = [p.grad for p in params]
    C.all_reduce_grads(world, grads, op="max")
    assert grads[0] is params[0].grad


def test_grad_reducer_follows_torch_zero_grad() -> None:
    torch = pytest.importorskip("torch")
    results = mesh.spawn(torch_cases, 2, timeout=100)
    model = _torch_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(TORCH_STEPS):
        x, y = _torch_batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    want = [p.detach().numpy() for p in model.parameters()]
    for rank, got in enumerate(results):
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12,
                                       err_msg=f"rank {rank} parameter {i}")


def _reducer_misuse(world: Any) -> list[str]:
    import torch
    seen = []
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 4)
    ps = list(m.parameters())
    red = C.GradReducer(world, ps[::-1] if world.rank == 1 else ps)    # another order
    m(torch.ones(1, 4)).sum().backward()
    with pytest.raises(ValueError, match=r"the ranks' gradients differ: gradient 0 is "
                                         r"float32\(4, 4\) on rank 0 and float32\(4,\) on rank 1"):
        red.wait()
    seen.append("order")
    red = C.GradReducer(world, ps)
    hooks = [p.register_post_accumulate_grad_hook(lambda p, i=i: red.ready(i))
             for i, p in enumerate(ps)]
    m.zero_grad()
    m(torch.ones(1, 4)).sum().backward()
    m(torch.ones(1, 4)).sum().backward()    # accumulates after the hooks launched the bucket
    with pytest.raises(RuntimeError, match=r"gradient 0 was written after its bucket took it"):
        red.wait()
    seen.append("accumulated")
    for h in hooks:
        h.remove()
    frozen = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    frozen[0].requires_grad_(False)
    with pytest.raises(TypeError, match=rf"rank {world.rank}: GradReducer on group world: "
                                        r"parameter 0 does not require grad"):
        C.GradReducer(world, list(frozen.parameters()))
    before = frozen[0].weight.detach().clone()
    with torch.no_grad():
        frozen[0].weight.add_(world.rank)       # (the replicas' frozen weights differ)
    for make in (C.GradReducer, C.all_reduce_grads):    # frozen ones alone: no gradients
        with pytest.raises(TypeError, match=r"parameter 0 does not require grad"):
            make(world, list(frozen[0].parameters()))
    assert torch.equal(frozen[0].weight.detach(), before + world.rank)
    seen.append("frozen")
    torch.manual_seed(0)
    emb, lin = torch.nn.Embedding(10, 3, sparse=True), torch.nn.Linear(3, 1)
    ps = list(emb.parameters()) + list(lin.parameters())
    red = C.GradReducer(world, ps, bucket_bytes=8, timeout=30)
    h = emb(torch.tensor([0, 5])) if world.rank == 0 else torch.ones(2, 3)  # rank 1: unused
    lin(h).sum().backward()
    t0 = time.monotonic()
    with pytest.raises((TypeError, mesh.MeshError)) as e:    # (rank 1 waited 30 s)
        red.wait()
    assert time.monotonic() - t0 < 15 and "rank 0: GradReducer on group world: gradient 0 " \
        "is a torch.sparse_coo tensor: a GradReducer reduces dense gradients" in str(e.value)
    assert C.all_reduce(world, torch.ones(2)).tolist() == [2.0, 2.0]    # the calls line up
    seen.append("sparse")
    t = torch.full((4,), float(world.rank + 1), dtype=torch.bfloat16)
    w = C.all_reduce(world, t, op="sum", async_op=True)
    while not w.done():
        time.sleep(0.001)
    seen.append(f"done {t[0].item()}")     # the result is in once done() says so
    w.wait()
    return seen


def _unused_params(world: Any) -> list[str]:
    """A parameter no rank uses keeps .grad None after wait() (an optimizer
    with weight decay leaves it alone, as under DDP); one that only rank 0
    uses gets the average, zeros counted for rank 1."""
    import torch
    torch.manual_seed(0)
    m = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 2), "partial": torch.nn.Linear(3, 2),
                             "unused": torch.nn.Linear(3, 2)})
    ps = list(m.parameters())
    opt = torch.optim.AdamW(ps, lr=0.1, weight_decay=0.5)
    before = m["unused"].weight.detach().clone()
    red = C.GradReducer(world, ps, bucket_bytes=40)     # a few buckets
    assert all(p.grad is None for p in ps)      # (making the reducer makes no gradient)
    seen = []
    for step in range(2):
        opt.zero_grad()
        x = torch.full((1, 3), float(world.rank + 1))
        out = m["used"](x).sum() + (m["partial"](x).sum() if world.rank == 0 else 0)
        out.backward()
        red.wait()
        assert m["unused"].weight.grad is None and m["unused"].bias.grad is None
        assert torch.equal(m["partial"].weight.grad, torch.full((2, 3), 0.5)), \
            m["partial"].weight.grad
        assert torch.equal(m["used"].weight.grad, torch.full((2, 3), 1.5))
        opt.step()
        seen.append(f"step {step}")
    assert torch.equal(m["unused"].weight.detach(), before)
    for op, vals in (("max", [-1.0, -2.0]), ("min", [1.0, 2.0]), ("prod", [2.0, 3.0])):
        p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
        if world.rank == 0:     # (rank 1 has none: counted as zeros, max was [0, 0])
            p.grad = torch.tensor(vals)
        C.GradReducer(world, [p, q], op=op).wait()
        assert p.grad.tolist() == vals and q.grad is None, (op, p.grad, q.grad)
        seen.append(op)
    p, q = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2, 3))
    p.grad = torch.tensor([world.rank + 1.0]).expand(4)     # stride 0: torch's copy_ refused
    q.grad = torch.arange(6.0).reshape(3, 2).t() * (world.rank + 1)    # not contiguous
    C.GradReducer(world, [p, q]).wait()
    assert p.grad.tolist() == [1.5] * 4 and p.grad.stride() == (0,), p.grad
    assert torch.equal(q.grad, torch.arange(6.0).reshape(3, 2).t() * 1.5), q.grad
    seen.append("expanded")
    # a user op: parameters' gradients in rank order ("last": rank 1's); a missing
    # .grad has no identity to stand for it: refused on its rank, the peer told
    last = C.Op(lambda a, b: b, name="last")
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    p.grad, q.grad = torch.full((2,), world.rank + 1.0), torch.full((3,), world.rank + 5.0)
    C.GradReducer(world, [p, q], op=last).wait()
    assert p.grad.tolist() == [2.0] * 2 and q.grad.tolist() == [6.0] * 3, (p.grad, q.grad)
    seen.append("user op")
    q.grad = None if world.rank == 1 else torch.ones(3)
    with pytest.raises((TypeError, mesh.MeshError), match=r"rank 1: GradReducer on group "
                       r"world: parameter 1 has no \.grad .* the user op Op\('last'\) has no "
                       r"identity") as err:
        C.GradReducer(world, [p, q], op=last).wait()
    seen.append(f"{type(err.value).__name__} refused")
    return seen


def test_grad_reducer_leaves_a_parameter_no_rank_used_without_a_gradient() -> None:
    """...and max, min and prod are over the ranks that have a gradient (a
    missing one counted as zeros gave a max of negatives 0); an expanded
    .grad (stride 0) is reduced in place (torch's "more than one element of
    the written-to tensor refers to a single memory location" was raised);
    a user op (collectives.Op) combines parameters' gradients in rank order,
    and refuses a missing .grad (no identity to stand for it) on its rank,
    its peer told (a GradReducer took builtin ops only)."""
    pytest.importorskip("torch")
    got = mesh.spawn(_unused_params, 2, timeout=100)
    seen = ["step 0", "step 1", "max", "min", "prod", "expanded", "user op"]
    assert got == [seen + ["MeshError refused"], seen + ["TypeError refused"]], got


def test_grad_reducer_refuses_what_would_train_the_replicas_apart() -> None:
    """Ranks that list the parameters in another order, a backward that
    accumulates into gradients whose bucket has gone, a frozen parameter:
    each raises naming rank and gradient, where the replicas silently went
    apart (or the message misled); frozen parameters alone are refused too
    (all_reduce_grads averaged the weights themselves, GradReducer said
    they were torch gradient tensors); a sparse .grad on rank 0 only
    (nn.Embedding(sparse=True), unused on rank 1) raises naming it on both
    ranks (rank 0 raised torch's "reshape is not implemented for sparse
    tensors", rank 1 waited for it to its timeout); and an async bfloat16
    collective's result is in the tensor once done() says so."""
    pytest.importorskip("torch")
    assert mesh.spawn(_reducer_misuse, 2, timeout=100) == [
        ["order", "accumulated", "frozen", "sparse", "done 3.0"]] * 2


def _reducer_arguments(world: Any) -> list[str]:
    said = []
    red = C.GradReducer(world, [np.ones(3), np.ones(5)])
    for call in (lambda: red.ready(2), lambda: red.ready(-1),
                 lambda: C.GradReducer(world, [np.ones(3)], op="mean"),
                 lambda: C.GradReducer(world, [np.ones(3)], bucket_bytes=0),
                 lambda: C.all_reduce_grads(world, [np.ones(3), [1.0]])):
        with pytest.raises((TypeError, ValueError)) as e:
            call()
        said.append(str(e.value))
    red.ready(0)
    red.ready(1)
    red.wait()
    return said


def test_grad_reducer_arguments_are_refused_naming_rank_and_call() -> None:
    """ready() of a gradient it does not hold raised a bare KeyError (ready(-1)
    too); a bad op, bucket size or gradient said nothing of rank or call."""
    for r, said in enumerate(mesh.spawn(_reducer_arguments, 2, timeout=60)):
        me = f"rank {r}: GradReducer on group world: "
        assert said[:2] == [me + f"ready({i}): the gradients are numbered 0..1, as given"
                            for i in (2, -1)], said
        assert said[2].startswith(me + "unknown reduction op 'mean'"), said
        assert said[3] == me + "bucket_bytes must be positive, got 0", said
        assert said[4] == f"rank {r}: all_reduce_grads on group world: gradient 1 is not a " \
                          f"writable numpy array (got list)", said


def _unused_gradient(world: Any) -> list[str]:
    import torch
    said = []
    ps = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
    ps[0].grad = torch.ones(3)      # ps[1] unused: its .grad is None
    with pytest.raises(TypeError) as e:
        C.all_reduce_grads(world, [p.grad for p in ps])
    said.append(str(e.value))
    C.all_reduce_grads(world, ps)   # as advised
    said.append(f"{ps[0].grad.tolist()} {ps[1].grad}")
    ps[1].grad = torch.ones(3) if world.rank == 0 else None     # unused on rank 1 only
    t0 = time.monotonic()
    with pytest.raises((TypeError, mesh.MeshError)) as e:   # (rank 0 waited to its timeout)
        # the layout agreed above, in two buckets: rank 1 gives up both of rank 0's calls
        C.all_reduce_grads(world, [p.grad for p in ps], bucket_bytes=8, timeout=30)
    said.append(str(e.value))
    said.append(f"{time.monotonic() - t0 < 15} {C.all_reduce(world, torch.ones(1)).tolist()}")
    return said


@pytest.mark.timeout(60)
def test_a_gradient_that_is_none_is_named_with_what_to_pass() -> None:
    """all_reduce_grads(g, [p.grad for p in params]) with a parameter unused
    this step (.grad None) said 'gradient 1 is a NoneType and gradient 0 a
    torch tensor: a GradReducer takes all torch, all host (numpy) or all
    device gradients', as if the kinds were mixed. None on rank 1 only:
    rank 0 raises naming it at once, where it waited in its call to its
    timeout (or met rank 1's next call there); with the layout agreed in an
    earlier call and several buckets, rank 1's next call met rank 0's second
    bucket (a MismatchError, or that bucket's data where they matched)."""
    pytest.importorskip("torch")
    for r, said in enumerate(mesh.spawn(_unused_gradient, 2, timeout=60)):
        assert said[0].startswith(f"rank {r}: all_reduce_grads on group world: gradient 1 is "
                                  f"None (a parameter without a .grad"), said
        assert "pass the parameters themselves" in said[0] and "NoneType" not in said[0], said
        assert said[1] == "[1.0, 1.0, 1.0] None", said
        assert "rank 1: all_reduce_grads on group world: gradient 1 is None" in said[2], said
        assert said[3] == "True [2.0]", said      # at once, and the next call lines up


def _half_averages(world: Any) -> list[float]:
    """float16 averaged in float32: n ranks' 30000 is 30000 (the float16 sum
    overflowed to inf), and a mean is rounded once (2048, 1, 1, 1: 513); an
    async one (and a bfloat16 sum) never waited is in the array once the call
    completes, as a float32 one is (it stayed in the widened copy)."""
    import torch
    n, r = world.size, world.rank
    seen = []
    for rows in (4, 1 << 16):       # the short way and the ring
        a = np.full(rows, 30000.0, np.float16)
        C.all_reduce(world, a, op="avg")
        t = torch.full((rows,), 30000.0, dtype=torch.float16)
        C.all_reduce(world, t, op="avg", async_op=True).wait()
        seen += [float(a[-1]), float(t[-1])]
    a = np.full(4, 1000.0 * (r + 1), np.float16)
    b = torch.full((4,), r + 1.0, dtype=torch.bfloat16)
    C.all_reduce(world, a, op="avg", async_op=True)     # never waited: each widened, the
    C.all_reduce(world, b, async_op=True)               # result was left in the copy
    C.barrier(world)            # (queued after them: the group's calls complete in order)
    seen += [float(a[0]), float(b[0])]
    t = torch.tensor([2048.0 if r == 0 else 1.0], dtype=torch.float16)
    C.all_reduce(world, t, op="avg")
    seen.append(float(t[0]))
    x = np.full(4, 30000.0, np.float16)
    assert C.reduce(world, x, root=0, op="avg") is x and x[0] == 30000.0     # (every rank)
    parts = C.reduce_scatter(world, np.full(2 * n, 30000.0, np.float16), op="avg")
    seen.append(float(parts[0]) if parts.dtype == np.float16 else -1.0)
    import torch.distributed as dist

    import collectives.torchdist  # noqa: F401  (registers "meshrun")
    dist.init_process_group("meshrun")
    for async_op in (False, True):      # (the backend's own short way for CPU tensors)
        t = torch.full((4,), 30000.0, dtype=torch.float16)
        w = dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=async_op)
        if w is not None:
            w.wait()
        seen.append(float(t[0]))
    dist.destroy_process_group()
    m = torch.nn.Linear(2, 1, bias=False).half()
    red = C.GradReducer(world, list(m.parameters()))
    (m(torch.full((1, 2), 100.0, dtype=torch.float16)) * 300.0).sum().backward()
    red.wait()
    seen.append(float(m.weight.grad[0, 0]))
    return seen


def test_float16_is_averaged_in_float32() -> None:
    pytest.importorskip("torch")
    for seen in mesh.spawn(_half_averages, 4, timeout=100):
        assert seen == [30000.0] * 4 + [2500.0, 10.0] + [513.0, 30000.0] + [30000.0] * 3, seen


def _big_endian_half_averages(world: Any) -> list[Any]:
    """float16 stored big-endian ('>f2', as a file may hold it) is float16
    too: averaged in float32, not summed to inf in float16 as it was, and
    given back in its own byte order."""
    n = world.size
    seen = []
    for rows in (4, 1 << 16):       # the short way and the ring
        a = np.full(rows, 30000.0, ">f2")
        C.all_reduce(world, a, op="avg")
        seen.append((a.dtype.str, float(a[-1])))
    x = np.full(4, 30000.0, ">f2")
    C.reduce(world, x, root=n - 1, op="avg")
    seen.append((x.dtype.str, float(x[0])))
    parts = C.reduce_scatter(world, np.full(2 * n, 30000.0, ">f2"), op="avg")
    seen.append((parts.dtype.str, float(parts[0])))
    return seen


def test_big_endian_float16_is_averaged_in_float32_too() -> None:
    assert mesh.spawn(_big_endian_half_averages, 3, timeout=60) == [[(">f2", 30000.0)] * 4] * 3


def _half_beside_single(world: Any) -> list[str]:
    """float16 averaged beside float32 on another rank: the float16 one is
    widened to float32 for the sum, and the two went through as alike."""
    import torch
    said = []
    for make in (np.full, lambda n, v, dt: torch.full((n,), v, dtype=getattr(torch, dt))):
        a = make(4, 1.0, "float16" if world.rank == 0 else "float32")
        try:
            C.all_reduce(world, a, op="avg", timeout=30)
        except mesh.MismatchError as e:
            said.append(str(e))
    return said


def test_float16_averaged_beside_float32_is_a_mismatch() -> None:
    pytest.importorskip("torch")
    for r, said in enumerate(mesh.spawn(_half_beside_single, 2, timeout=60)):
        assert len(said) == 2, (r, said)
        assert all("float16" in m and "float32" in m for m in said), said


def _after_a_timeout(world: Any) -> list[Any]:
    """A wait() that timed out (rank 1 came late to a 1 s deadline: once
    rank 0's wait had timed out, which rank 0 tells it) left its buckets'
    failed calls in place: every later wait() raised that error again,
    though the README promises the group's next collective works."""
    grads = [np.zeros(3), np.zeros(5)]
    red = C.GradReducer(world, grads, bucket_bytes=32, op="sum", timeout=1)
    seen = []
    for step in range(3):           # (the first agrees on the layout, in time)
        for g in grads:
            g[...] = world.rank + 1 + step
        if step == 1 and world.rank == 1:
            assert world.recv(0, tag=91, timeout=30) == "timed out"
        try:
            red.wait()
            seen.append([float(g[0]) for g in grads])
        except mesh.MeshTimeoutError:
            seen.append("timeout")
        if step == 1 and world.rank == 0:
            world.send("timed out", 1, tag=91)
        C.barrier(world, timeout=30)
    return seen


def test_a_reducer_whose_wait_timed_out_reduces_the_next_step() -> None:
    for seen in mesh.spawn(_after_a_timeout, 2, timeout=60):
        assert seen == [[3.0, 3.0], "timeout", [7.0, 7.0]], seen


def _state_sync(world: Any) -> list[Any]:
    """Horovod's broadcast_parameters and broadcast_optimizer_state: rank 0
    has trained a step (Adam's state made), the others have not; after
    broadcast_state every rank holds rank 0's model and optimizer, and the
    next step keeps them equal."""
    import torch
    torch.manual_seed(world.rank)          # every rank starts elsewhere
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    x = torch.ones(2, 3)
    if world.rank == 0:
        m(x).sum().backward()
        opt.step()
    m.load_state_dict(C.broadcast_state(world, m.state_dict()))
    opt.load_state_dict(C.broadcast_state(world, opt.state_dict()))
    mixed = {"a": np.arange(6.0).reshape(2, 3).T, "b": (1, "two", None), "c": np.float32(2.5),
             "d": torch.ones(2, dtype=torch.bfloat16) * (world.rank + 1)}
    got = C.broadcast_state(world, mixed if world.rank == 0 else None)
    with pytest.raises(TypeError, match=rf"rank {world.rank}: broadcast_state on group world: "
                                        r"the root's \(rank 0's\) state\['x'\]\[1\] is of type set"):
        C.broadcast_state(world, {"x": [1, {2}]} if world.rank == 0 else None)
    opt.zero_grad()
    m(x).sum().backward()
    opt.step()
    return [[p.detach().tolist() for p in m.parameters()], got["a"].tolist(), got["b"],
            got["c"], got["d"].tolist(), str(got["d"].dtype)]


def _states_swapped(world: Any) -> list[str]:
    """Rank 1 restores its scheduler and optimizer in the other order: each
    call checks the states passed against the root's."""
    import torch
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    first, second = (opt, sched) if world.rank != 1 else (sched, opt)
    said = []
    for obj in (first, second):
        try:
            C.broadcast_state(world, obj.state_dict())
            said.append("ok")
        except mesh.MismatchError as e:
            said.append(str(e))
    wrong = {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}
    try:
        C.broadcast_state(world, wrong if world.rank == 2 else m.state_dict())
        said.append("ok")
    except mesh.MismatchError as e:
        said.append(str(e))
    got = C.broadcast_state(world, m.state_dict() if world.rank == 0 else {})  # {}: fine
    said.append(str(sorted(got)))
    with pytest.raises(ValueError, match="root"):      # a bad root on one rank: every rank
        C.broadcast_state(world, m.state_dict(), root=7 if world.rank == 2 else 0)
    C.barrier(world)                    # (and the calls stay numbered alike)
    return said


def test_broadcast_state_refuses_a_state_unlike_the_roots_on_every_rank() -> None:
    pytest.importorskip("torch")
    for rank, said in enumerate(mesh.spawn(_states_swapped, 3, timeout=100)):
        assert said[0].startswith(f"rank {rank}: broadcast_state on group world: the state "
                                  f"passed differs from the root's (rank 0's): rank 1's "
                                  f"state has the key 'step_size', the root's has not "
                                  f"(its keys: 'state', 'param_groups')"), said[0]
        assert "rank 1's state has the key 'state'" in said[1], said[1]
        assert said[2].endswith("rank 2's state['weight'] has shape (3, 3), the root's "
                                "(2, 3)"), said[2]
        assert said[3] == "['bias', 'weight']", said


def test_broadcast_state_gives_every_rank_the_roots_model_and_optimizer() -> None:
    pytest.importorskip("torch")
    res = mesh.spawn(_state_sync, 3, timeout=100)
    assert res[1][0] == res[0][0] and res[2] == res[1], res     # (the root's own tuple stays)
    assert res[1][1:] == [[[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]], [1, "two", None], 2.5,
                          [1.0, 1.0], "torch.bfloat16"], res[1][1:]
