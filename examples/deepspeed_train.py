"""A DeepSpeed data-parallel script with one line changed: ``import deepspeed``
became ``from engine import deepspeed``. Run: meshrun -n 2 examples/deepspeed_train.py
(or torchrun --nproc-per-node 2 ...). It checks its weights against one process
training on the whole batch."""
import torch

from engine import deepspeed

CONFIG = {
    "train_batch_size": 16, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 4,
                                                  "warmup_type": "linear"}},
    "zero_optimization": {"stage": 2}, "steps_per_print": 5,
}


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def main() -> None:
    deepspeed.init_distributed()
    net = model()
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=net, model_parameters=net.parameters(), config=CONFIG)
    rank, size = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
    mb, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    for step in range(10):
        x, y = batch(step)
        for k in range(gas):        # this rank's micro-batches of the global batch
            rows = slice((rank * gas + k) * mb, (rank * gas + k + 1) * mb)
            loss = torch.nn.functional.mse_loss(engine(x[rows]), y[rows])
            engine.backward(loss)
            engine.step()
    one = model()                   # one process, the whole batch a step
    opt = torch.optim.AdamW(one.parameters(), lr=3e-3, weight_decay=0.01)
    sched = deepspeed.WarmupLR(opt, warmup_num_steps=4, warmup_type="linear")
    for step in range(10):
        x, y = batch(step)
        torch.nn.functional.mse_loss(one(x), y).backward()
        torch.nn.utils.clip_grad_norm_(one.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    same = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(net.parameters(), one.parameters()))
    if rank == 0:
        print(f"{size} ranks, ZeRO 2: weights equal single-process full-batch training: {same}")


if __name__ == "__main__":
    main()
