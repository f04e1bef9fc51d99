"""A worker for tests/test_mesh_netns.py, run by torchrun inside a network
namespace ("host"): first the meshrun script, netns_job.py, unchanged (its
mesh.init() and its checks, its reports in OUTDIR/<rank>.json), then, in
the same process (one torchrun job for both: a torchrun and its ranks
cost a torch import each), plain torch.distributed code on the "meshrun"
backend, which makes a mesh of its own (all_reduce, broadcast,
all_gather, one DDP step checked against training on the whole batch);
then it records where it lives and what the backend's mesh connected to,
in OUTDIR/torch/<rank>.json.

    netns_torch_job.py OUTDIR
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import collectives.torchdist  # noqa: F401  registers the "meshrun" backend
import netns_job
from mesh import world as mesh_world
from mesh.env import host_id


def main(outdir: str) -> None:
    assert mesh_world.current() is None, "netns_job.py left its mesh open"
    dist.init_process_group("meshrun")
    r, n = dist.get_rank(), dist.get_world_size()
    checked = 0
    a = torch.arange(1000, dtype=torch.float32) + r
    dist.all_reduce(a)
    assert torch.equal(a, n * torch.arange(1000, dtype=torch.float32) + n * (n - 1) / 2)
    b = torch.full((300_000,), r, dtype=torch.int32)
    dist.broadcast(b, src=n - 1)
    assert bool((b == n - 1).all())
    got = [torch.empty(3, dtype=torch.int64) for _ in range(n)]
    dist.all_gather(got, torch.full((3,), r, dtype=torch.int64))
    assert [int(t[0]) for t in got] == list(range(n))
    checked += 3

    torch.manual_seed(0)
    net = nn.Linear(8, 1)
    ref = nn.Linear(8, 1)
    ref.load_state_dict(net.state_dict())
    x = torch.randn(4 * n, 8, generator=torch.Generator().manual_seed(1))
    y = x.sum(dim=1, keepdim=True)
    model = DDP(net)
    nn.functional.mse_loss(model(x[r::n]), y[r::n]).backward()
    nn.functional.mse_loss(ref(x), y).backward()     # the whole batch, one process
    assert torch.allclose(net.weight.grad, ref.weight.grad, atol=1e-5), "DDP gradient"
    checked += 1

    m = mesh_world.current()
    assert m is not None, "the backend's mesh is not open"
    out = {"rank": r, "host": host_id(), "endpoints": m.endpoints, "checked": checked,
           "netns": os.readlink("/proc/self/ns/net"), "curve": False}
    dist.destroy_process_group()
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, f"{r}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    netns_job.main(sys.argv[1])
    main(os.path.join(sys.argv[1], "torch"))
