"""Horovod's examples/pytorch/pytorch_mnist.py, shortened, on a synthetic
dataset, with one line changed: ``import collectives.horovod as hvd``.

    meshrun -n 2 examples/horovod_mnist.py

At the end rank 0 checks that the weights equal single-process training on
the full batch (every rank's batch together) each step.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import collectives.horovod as hvd        # was: import horovod.torch as hvd

EPOCHS, BATCH, LR = 2, 8, 0.01


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, kernel_size=5)
        self.conv2 = nn.Conv2d(4, 8, kernel_size=5)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


def train(model: nn.Module, opt: torch.optim.Optimizer, loaders: list[DataLoader]) -> None:
    """Each step: every loader's next batch (one: this rank's; all: the full batch)."""
    for epoch in range(EPOCHS):
        for batches in zip(*loaders):
            x = torch.cat([b[0] for b in batches])
            y = torch.cat([b[1] for b in batches])
            opt.zero_grad()
            F.nll_loss(model(x), y).backward()
            opt.step()


def main() -> None:
    hvd.init()
    torch.manual_seed(42)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(96, 1, 28, 28, generator=g),
                         torch.randint(0, 10, (96,), generator=g))

    def loader(rank: int) -> DataLoader:
        sampler = DistributedSampler(data, num_replicas=hvd.size(), rank=rank, shuffle=False)
        return DataLoader(data, batch_size=BATCH, sampler=sampler)

    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR * hvd.size(), momentum=0.5)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=hvd.Compression.none)
    train(model, optimizer, [loader(hvd.rank())])
    loss = F.nll_loss(model(data.tensors[0]), data.tensors[1])
    avg = hvd.allreduce(loss.detach(), name="avg_loss")     # metric_average
    if hvd.rank() == 0:
        print(f"average loss {avg.item():.4f}")
        torch.manual_seed(42)
        ref = Net()
        train(ref, torch.optim.SGD(ref.parameters(), lr=LR * hvd.size(), momentum=0.5),
              [loader(r) for r in range(hvd.size())])
        same = all(torch.allclose(p, q, rtol=1e-5, atol=1e-6)
                   for p, q in zip(model.parameters(), ref.parameters()))
        print(f"{hvd.size()} ranks: weights equal single-process full-batch training: {same}")


if __name__ == "__main__":
    main()
