"""FSDP2 (``fully_shard``, bfloat16 mixed precision included), DeviceMesh,
DTensor and functional collectives on the "meshrun" torch.distributed
backend, CPU tensors: unchanged torch code, checked against single-process
values."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import mesh  # noqa: E402

pytestmark = pytest.mark.slow     # 11-13 s each quiet; 30-60 s loaded

F = torch.nn.functional


def _mlp() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8),
                               torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _fsdp(r: int, n: int, reshard_after_forward: bool) -> float:
    """FSDP2 (each Linear, then the root) on this rank's 4 rows against one
    process on all 4n, SGD, step 1 accumulated without gradient sync (and
    buffers from the process group when not resharding after forward); the
    largest difference of the gathered weights (``full_tensor()`` and the
    full state dict) from the reference's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    dm = init_device_mesh("cpu", (n,), mesh_dim_names=("dp",))
    net, ref = _mlp(), _mlp()
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=dm, reshard_after_forward=reshard_after_forward)
            # torch asks the group's Backend whether it allocates (no: torch.empty)
            layer.set_allocate_memory_from_process_group_for_comm(not reshard_after_forward)
    fully_shard(net, mesh=dm, reshard_after_forward=reshard_after_forward)
    w = net[0].weight
    assert isinstance(w, DTensor) and w.to_local().shape[0] == 8 // n, w
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (net, ref))
    gen = torch.Generator().manual_seed(3)
    mine = slice(4 * r, 4 * r + 4)
    for i in range(4):
        x, y = torch.randn(4 * n, 6, generator=gen), torch.randn(4 * n, 3, generator=gen)
        net.set_requires_gradient_sync(i != 1)
        F.mse_loss(net(x[mine]), y[mine]).backward()
        F.mse_loss(ref(x), y).backward()
        if i == 1:                     # accumulated into step 2
            continue
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True))
    want = ref.state_dict()
    assert full.keys() == want.keys(), (full.keys(), want.keys())
    return max([(full[k] - want[k]).abs().max().item() for k in want] +
               [(p.full_tensor() - q).abs().max().item()
                for p, q in zip(net.parameters(), ref.parameters())])


def _fsdp_mp(r: int, n: int, reduce_dtype: Any) -> list[float]:
    """FSDP2 with bfloat16 parameters (forward and backward in bfloat16),
    gradients reduced in ``reduce_dtype``, two SGD steps on this rank's 2
    rows, against one process that runs the same bfloat16 forward and
    backward on all 2n rows and steps float32 weights: the largest
    difference of the gradients and of the weights."""
    import copy

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    net, ref = _mlp(), _mlp()
    # the root alone: one all-gather and one reduce-scatter a step
    fully_shard(net, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                    reduce_dtype=reduce_dtype))
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (net, ref))
    gen = torch.Generator().manual_seed(4)
    grads, weights = 0.0, 0.0
    for _ in range(2):
        x, y = torch.randn(2 * n, 6, generator=gen), torch.randn(2 * n, 3, generator=gen)
        F.mse_loss(net(x[2 * r:2 * r + 2]).float(), y[2 * r:2 * r + 2]).backward()
        low = copy.deepcopy(ref).to(torch.bfloat16)
        F.mse_loss(low(x.bfloat16()).float(), y).backward()
        for p, q, g in zip(net.parameters(), ref.parameters(), low.parameters()):
            q.grad = g.grad.float()
            grads = max(grads, (p.grad.full_tensor() - q.grad).abs().max().item())
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    for p, q in zip(net.parameters(), ref.parameters()):
        weights = max(weights, (p.full_tensor() - q).abs().max().item())
    return [grads, weights]


def _mesh_2x2(r: int, dm: Any) -> dict:
    """Ranks laid out [[0, 1], [2, 3]]: "dp" groups are the columns, "tp" the rows."""
    import torch.distributed._functional_collectives as fc
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    out: dict = {}
    for d in ("dp", "tp"):
        g = dm[d].get_group()
        t = torch.full((2,), float(r))
        dist.all_reduce(t, group=g)
        out[d] = (dist.get_process_group_ranks(g), t.tolist())
    full = torch.arange(16.0).reshape(4, 4)
    d = distribute_tensor(full, dm, [Shard(0), Shard(1)])
    out["local"] = d.to_local().tolist()
    out["shard_to_replicate"] = torch.equal(
        d.redistribute(dm, [Replicate(), Replicate()]).to_local(), full)
    p = DTensor.from_local(torch.full((2,), r + 1.0), dm, [Partial(), Partial()])
    out["partial_to_replicate"] = p.redistribute(dm, [Replicate(), Replicate()]).to_local().tolist()
    p = DTensor.from_local(torch.arange(4.0) * (r + 1), dm, [Partial(), Replicate()])
    out["partial_to_shard"] = p.redistribute(dm, [Shard(0), Replicate()]).to_local().tolist()
    tp = dm["tp"]
    out["coalesced"] = [
        [t.tolist() for t in fc.all_reduce_coalesced([torch.ones(2) * r, torch.ones(1)], "sum",
                                                     tp)],
        [t.tolist() for t in fc.all_gather_into_tensor_coalesced(
            [torch.full((1,), float(r)), torch.full((2,), -1.0 * r)], tp)],
        [t.tolist() for t in fc.reduce_scatter_tensor_coalesced(
            [torch.arange(2.0) + r, torch.arange(4.0)], "sum", [0, 0], tp)],
        fc.all_to_all_single(torch.arange(2.0) + 10 * r, None, None, tp).tolist()]
    return out


def _tp_fsdp(r: int, dm: Any) -> float:
    """2-D: tensor parallel on "tp" (column- then row-wise Linear), FSDP2 on
    "dp", one step against one process; the largest difference in output,
    gradients and the gathered state dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    ref = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    ref.load_state_dict(net.state_dict())
    parallelize_module(net, dm["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(net, mesh=dm["dp"])
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(5))
    mine = x[2 * (r // 2):2 * (r // 2) + 2]          # a dp group's rows
    y = net(mine)
    y.sum().backward()
    ref(x).sum().backward()
    sd = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True))
    diffs = [(y - ref(mine)).abs().max().item()]
    diffs += [(sd[k] - v).abs().max().item() for k, v in ref.state_dict().items()]
    # FSDP averages over dp: half the full batch's sum of gradients
    diffs += [(p.grad.full_tensor() - q.grad / 2).abs().max().item()
              for p, q in zip(net.parameters(), ref.parameters())]
    return max(diffs)


def _dcp(r: int, n: int, dm: Any, ckpt: str) -> dict:
    """torch.distributed.checkpoint: an FSDP2 model and its AdamW state,
    sharded over the 4 ranks, saved by ``dcp.async_save`` on a group of its
    own, loaded by ``dcp.load`` into FSDP2 over "dp" (2 shards, replicated
    over "tp": resharded on load) and stepped on: the full state dicts
    (model and optimizer, ``get_state_dict``) the same as the saved ones,
    and the next step's the same on both."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def built(m: Any) -> tuple[Any, Any]:
        net = _mlp()
        fully_shard(net, mesh=m)
        return net, torch.optim.AdamW(net.parameters(), lr=0.01)

    def stepped(net: Any, opt: Any, seed: int) -> dict:
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        m, o = get_state_dict(net, opt, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
        return {"model": m, "optim": o}

    net, opt = built(init_device_mesh("cpu", (n,), mesh_dim_names=("shard",)))
    saved = stepped(net, opt, r)
    m, o = get_state_dict(net, opt)
    dcp.async_save({"model": m, "optim": o}, checkpoint_id=ckpt,
                   process_group=dist.new_group()).result()
    net2, opt2 = built(dm["dp"])
    m, o = get_state_dict(net2, opt2)
    sd = {"model": m, "optim": o}
    dcp.load(sd, checkpoint_id=ckpt)
    set_state_dict(net2, opt2, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    loaded = get_state_dict(net2, opt2, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    x = [stepped(a, b, 9)["model"] for a, b in ((net, opt), (net2, opt2))]
    if r != 0:          # (rank 0 alone holds the full state dicts)
        return {"same": True, "next": True}
    flat = [torch.cat([t.flatten().float() for t in d.values()
                       if isinstance(t, torch.Tensor)] +
                      [v.flatten() for s in d.get("state", {}).values() for v in s.values()])
            for d in (saved["model"], saved["optim"], loaded[0], loaded[1])]
    return {"same": torch.equal(flat[0], flat[2]) and torch.equal(flat[1], flat[3])
            and len(saved["optim"]["state"]) == 6,
            "next": all(torch.equal(x[0][k], x[1][k]) for k in x[0])}


def fsdp_and_device_mesh(world: Any, ckpt: str) -> dict:
    import torch.distributed._functional_collectives as fc
    from torch.distributed.device_mesh import init_device_mesh

    import collectives.torchdist  # noqa: F401
    before = {t.name for t in threading.enumerate()}
    dist.init_process_group("meshrun")
    r, n = dist.get_rank(), dist.get_world_size()
    dm = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    out = {"fsdp": max(_fsdp(r, n, raf) for raf in (True, False)),
           "mp": [_fsdp_mp(r, n, d) for d in (torch.float32, torch.bfloat16)],
           "mesh": _mesh_2x2(r, dm),
           "tp_fsdp": _tp_fsdp(r, dm),
           "dcp": _dcp(r, n, dm, ckpt)}
    dp = dm["dp"]
    try:                               # only rank 0 differs: group [0, 2] raises, [1, 3] not
        fc.all_reduce(torch.zeros(3 if r == 0 else 4), "sum", dp).wait()
        out["mismatch"] = ""
    except Exception as e:
        out["mismatch"] = f"{type(e).__name__}: {e}"
    out["after"] = fc.all_reduce(torch.ones(2), "sum", dp).tolist()
    dist.destroy_process_group()
    out["threads_left"] = sorted({t.name for t in threading.enumerate()} - before)
    return out


def test_fsdp2_and_a_2x2_device_mesh_on_4_ranks(tmp_path: Path) -> None:
    outs = mesh.spawn(fsdp_and_device_mesh, 4, str(tmp_path / "ckpt"), timeout=150)
    for r, o in enumerate(outs):
        assert o["fsdp"] < 1e-6 and o["tp_fsdp"] < 1e-6, (r, o)
        assert o["dcp"] == {"same": True, "next": True}, (r, o["dcp"])
        # bfloat16 compute, float32 / bfloat16 reduction: within a few bf16
        # ulps of gradients up to ~0.33 (a wrong reduction is off by ~0.1)
        assert all(g < 8e-3 and w < 2e-3 for g, w in o["mp"]), (r, o["mp"])
        m = o["mesh"]
        col, row = [r % 2, r % 2 + 2], [r - r % 2, r - r % 2 + 1]
        assert m["dp"] == (col, [float(sum(col))] * 2), (r, m)
        assert m["tp"] == (row, [float(sum(row))] * 2), (r, m)
        i, j = divmod(r, 2)
        assert m["local"] == [[4.0 * a + b for b in (2 * j, 2 * j + 1)]
                              for a in (2 * i, 2 * i + 1)], (r, m)
        assert m["shard_to_replicate"], (r, m)
        assert m["partial_to_replicate"] == [10.0, 10.0], (r, m)       # 1 + 2 + 3 + 4
        s = sum(c + 1 for c in col)                                     # Partial over dp
        assert m["partial_to_shard"] == [2.0 * i * s, (2.0 * i + 1) * s], (r, m)
        assert m["coalesced"] == [
            [[float(sum(row))] * 2, [2.0]],
            [[float(row[0]), float(row[1])], [-row[0]] * 2 + [-row[1]] * 2],
            [[2.0 * (r % 2) + sum(row)], [2.0 * (2 * (r % 2)), 2.0 * (2 * (r % 2) + 1)]],
            [10.0 * row[0] + r % 2, 10.0 * row[1] + r % 2]], (r, m)
        if r in (0, 2):                # every member of group [0, 2] raises, naming both calls
            e = o["mismatch"]
            assert e.startswith("MismatchError") and "world/[0, 2]" in e, e
            assert "rank 0" in e and "rank 2" in e and "[3]" in e and "[4]" in e, e   # (world)
        else:
            assert o["mismatch"] == "", o
        assert o["after"] == [2.0, 2.0] and o["threads_left"] == [], (r, o)


def compiled_then_dying(world: Any, out: str, backend: str) -> None:
    """torch.compile of functional collectives, its values and eager's
    written to out/RANK.json; then the last rank dies in an FSDP2 step and
    the others write what their step raised to out/RANK.raised."""
    import json
    import time

    import torch.distributed._functional_collectives as fc
    from torch.distributed.fsdp import fully_shard

    import collectives.torchdist  # noqa: F401
    dist.init_process_group("meshrun")
    rank, size, g = dist.get_rank(), dist.get_world_size(), dist.group.WORLD

    def f(x: Any) -> Any:
        y = fc.all_reduce(x * 2, "sum", g)
        z = fc.all_gather_tensor(y + 1, 0, g)
        a2a = fc.all_to_all_single(x, None, None, g)
        return fc.reduce_scatter_tensor(z * z, "sum", 0, g) + a2a
    x = torch.arange(4.0) + 10 * rank
    got = torch.compile(f, fullgraph=True, backend=backend)(x).tolist()
    Path(out, f"{rank}.json").write_text(json.dumps([got, f(x).tolist()]))
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
    for layer in net:
        fully_shard(layer)
    fully_shard(net)
    net(torch.ones(2, 4)).sum().backward()
    dist.barrier()
    if rank == size - 1:
        time.sleep(1)      # the others wait in the next forward's all-gather by now
        os._exit(3)
    t0 = time.monotonic()
    try:
        net(torch.ones(2, 4)).sum().backward()
        said = "step returned"
    except Exception as e:
        said = f"raised after {time.monotonic() - t0:.0f}s: {type(e).__name__}: {e}"
    Path(out, f"{rank}.raised").write_text(said)


@pytest.mark.timeout(400)
def test_torch_compile_of_functional_collectives_then_a_rank_dies_in_fsdp2(
        tmp_path: Path) -> None:
    """2 ranks: torch.compile (one graph: dynamo and AOT autograd, the
    aot_eager backend; inductor with MESH_TEST_INDUCTOR=1, which compiles
    C++ for 30-60 s with a cold cache, too long for the suite) of a function
    calling functional collectives gives eager's values; then rank 1 dies
    during an FSDP2 step and rank 0 raises LostPeerError naming it. (Ranks
    of mesh.spawn: torch and torch._dynamo preloaded, not imported by each.)"""
    import json
    backend = os.environ.get("MESH_TEST_INDUCTOR") and "inductor" or "aot_eager"
    with pytest.raises(mesh.WorkerError) as failed:    # settle: rank 0's step sees it go
        mesh.spawn(compiled_then_dying, 2, str(tmp_path), backend, timeout=360, settle=30)
    assert (failed.value.rank, failed.value.exitcode) == (1, 3), str(failed.value)
    for r in range(2):
        got, want = json.loads((tmp_path / f"{r}.json").read_text())
        assert got == want, (r, got, want)
        # y = 2 (x0 + x1) = 4i + 20, z = [y + 1, y + 1]: each rank's half of 2 z^2
        # is 2 (4i + 21)^2; all_to_all brings rank r elements 2r, 2r + 1 of each x_j
        a2a = [2.0 * r + k + 10 * j for j in range(2) for k in range(2)]
        assert got == [2 * (4 * i + 21) ** 2 + a2a[i] for i in range(4)], (r, got)
    line = (tmp_path / "0.raised").read_text()
    assert "LostPeerError" in line and "rank 1" in line, line
    assert int(line.split()[2].rstrip("s:")) < 15, line
