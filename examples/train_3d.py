"""Train a small transformer on 8 workers: dp=2 x pp=2 x tp=2, by one call.

    meshrun -n 8 examples/train_3d.py [--steps 20] [--rows 16] [--lr 0.05]
        [--out train_3d.pt] [--memory-limit MB] [--recompute auto|PATTERNS]   (the defaults)

Any number of workers runs, the grid shrinking to fit: tp=2 where the
number is even, pp=2 where it divides by 4, dp the rest (4: pp=2 x tp=2;
2: tp=2; 1 or 3: dp alone; 12: dp=3 x pp=2 x tp=2).

The model below is plain torch with no distribution code in it.
``engine.distribute`` traces its forward into layers (the embedding, each
block, the head), cuts them into pipeline stages, shards each block by
PLAN, measures the layers and picks the schedule by simulating them all.
Rank 0 prints the plan, the candidates and the chosen schedule's grid; the
loss is printed each step, then the steps' median time beside the
prediction; the gathered model is saved, reloaded into a single-process
copy and checked against the distributed forward.
"""
import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import engine
import mesh

PLAN = {                                                   # tensor parallelism, Megatron's
    "*.attn.qkv": "colwise",                               # heads split over tp
    "*.attn": ("replicate", {"heads": lambda n, tp: n // tp}),
    "*.attn.proj": "rowwise",                              # partial sums all-reduced
    "*.mlp.up": "colwise",
    "*.mlp.down": "rowwise",
}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)                 # per head: q, k, v
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, self.heads, 3, -1).permute(3, 0, 2, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln2, self.mlp = nn.LayerNorm(dim), MLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Embed(nn.Module):
    def __init__(self, vocab: int, dim: int, seq: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids) + self.pos(torch.arange(ids.shape[1]))


class Head(nn.Module):
    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.ln, self.out = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, blocks: int = 4,
                 seq: int = 16) -> None:
        super().__init__()
        self.embed = Embed(vocab, dim, seq)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(blocks)])
        self.head = Head(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def batch(step: int, rows: int, seq: int = 16, vocab: int = 64
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences that count up by a random stride: the next token is learnable."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, vocab, (rows, 1), generator=g)
    stride = torch.randint(1, 4, (rows, 1), generator=g)
    ids = (start + stride * torch.arange(seq + 1)) % vocab
    return ids[:, :-1], ids[:, 1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=int(os.environ.get("TRAIN_3D_STEPS", 20)))
    ap.add_argument("--rows", type=int, default=16, help="sequences per step, all replicas")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--out", default="train_3d.pt")
    ap.add_argument("--memory-limit", type=float, default=None,
                    help="MB of activations a rank may hold (the choice recomputes "
                         "activations where that lets a faster schedule fit)")
    ap.add_argument("--recompute", default="auto",
                    help="'auto' (the choice decides), or submodule name patterns, comma "
                         "separated, to recompute in their backward (e.g. 'blocks.*.attn')")
    args = ap.parse_args()
    recompute = args.recompute if args.recompute == "auto" else args.recompute.split(",")
    torch.set_num_threads(1)
    with mesh.init() as world:
        tp = 2 if world.size % 2 == 0 else 1
        pp = 2 if world.size % (2 * tp) == 0 else 1
        grid = mesh.grid(world, dp=world.size // (pp * tp), pp=pp, tp=tp)
        dp, d = grid.size("dp"), grid.coord("dp")

        def mine(step: int) -> tuple[torch.Tensor, torch.Tensor]:   # this replica's rows
            x, y = batch(step, args.rows)
            return x[d::dp], y[d::dp]

        if world.rank == 0:
            print(f"grid {grid.axes}; plan:\n" + "\n".join(
                f"  {k}: {v if isinstance(v, str) else v[0] + ', heads // tp'}"
                for k, v in PLAN.items()))
        torch.manual_seed(0)
        job = engine.distribute(TinyGPT(), grid, plan=PLAN if tp > 1 else None,
                                sample=mine(0)[0], loss_fn=loss_fn, recompute=recompute,
                                memory_limit=args.memory_limit and args.memory_limit * 2**20)
        if world.rank == 0:
            print(f"chosen: {job.schedule.name}\n{job.schedule.render()}", flush=True)
        opt = torch.optim.SGD(job.parameters(), lr=args.lr, momentum=0.9)
        took = []
        for step in range(args.steps):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = job.step(*mine(step))
            opt.step()
            took.append(time.perf_counter() - t0)
            if world.rank == 0:                     # (the step's loss, on every rank)
                print(f"step {step:3d}  loss {loss:.4f}", flush=True)
        if world.rank == 0 and job.predicted and len(took) > 1:
            print(f"steps took {statistics.median(took[1:]) * 1e3:.2f} ms (median; rank 0, "
                  f"with the optimizer); predicted {job.predicted * 1e3:.2f} ms", flush=True)

        opt.zero_grad()
        final = job.step(*mine(args.steps))           # the distributed forward, trained
        state = job.state_dict()                      # every rank; the whole model on rank 0
        if world.rank == 0:
            torch.save(state, args.out)
            copy = TinyGPT()
            copy.load_state_dict(torch.load(args.out))
            with torch.no_grad():
                again = float(loss_fn(copy(batch(args.steps, args.rows)[0]),
                                      batch(args.steps, args.rows)[1]))
            print(f"saved {args.out}; one process on the reloaded model: loss {again:.6f}, "
                  f"distributed: {final:.6f}")
            assert abs(again - final) < 1e-4 * max(1.0, abs(final)), (again, final)


if __name__ == "__main__":
    main()
