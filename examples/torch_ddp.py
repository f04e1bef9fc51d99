"""Plain DistributedDataParallel on the "meshrun" torch.distributed backend.

    meshrun -n 4 examples/torch_ddp.py
    torchrun --nproc-per-node 4 examples/torch_ddp.py

Each rank trains on its shard of one batch; DDP averages the gradients, so
every replica takes the steps single-process training on the whole batch
would. Rank 0 prints the loss (averaged over the ranks).
"""
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import collectives.torchdist  # noqa: F401  registers the "meshrun" backend


def main() -> None:
    dist.init_process_group("meshrun")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=data)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    mine = slice(rank, None, size)
    for step in range(30):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x[mine]), y[mine])
        loss.backward()
        opt.step()
        dist.all_reduce(loss.detach(), op=dist.ReduceOp.AVG)
        if rank == 0 and step % 5 == 0:
            print(f"step {step:2d}  loss {loss.item():.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
