"""nanoGPT's model, its code as written, trained tensor-parallel by a plan.

    meshrun -n 4 examples/nanogpt_tp.py [--tp 2] [--steps 60] [--out nanogpt.pt]
    meshrun -n 8 examples/nanogpt_tp.py --pp 2        # dp=2 x pp=2 x tp=2

The model below is written the way Karpathy's nanoGPT (model.py, MIT
licence) writes its GPT, and has no distribution code in it: its attention
reads its width from its input (``B, T, C = x.size()``, ``C // self.n_head``,
``.view(B, T, C)``) and splits a fused ``c_attn`` by ``self.n_embd``; the
token embedding is the output head's weight (weight tying); ``forward(idx,
targets)`` returns ``(logits, loss)``. ``engine.parallelize`` shards it by
PLAN over the tp axis of a dp x tp grid: Megatron's layout on nanoGPT's
names, the attention shown its input as wide as its shard
(``"width": "shard"``), the tie kept (one shard, both holders). The dp
replicas average their gradients with ``collectives.all_reduce_grads``.
With ``--pp``, ``engine.distribute`` takes the GPT as it is: torch.fx
traces its forward into layers (the embeddings' sum, each block, the final
norm, the head; ``engine.sequential``), the part of it that reads the
targets becomes the pipeline's loss, and the layers are cut into pipeline
stages and sharded by the same plan; the embedding on the first stage and
the head on the last stay one tied weight. It learns this file's own text,
character by character; rank 0 prints the loss, gathers the whole model,
saves it, reloads it into a single-process GPT and checks its loss against
the distributed one.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 16
    vocab_size: int = 32
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 16
    dropout: float = 0.0
    bias: bool = False


class LayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, flash=True):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.flash = flash
        if not flash:
            self.register_buffer("bias", torch.tril(torch.ones(config.block_size, config.block_size))
                                 .view(1, 1, config.block_size, config.block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, flash=True):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, flash)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config, flash=True):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, flash) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight      # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        b, t = idx.size()
        assert t <= self.config.block_size, (f"Cannot forward sequence of length {t}, block "
                                             f"size is only {self.config.block_size}")
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                               ignore_index=-1)
        return logits, loss


def _per_rank(n, tp):
    return n // tp


# The whole plan: Megatron's layout on nanoGPT's names. The attention reads
# its width from its input, so it sees its input as wide as its shard.
# The names are the GPT's own ("transformer.h.0.attn"), pipelined or not.
PLAN = {
    "*wte": "vocab",
    "*.attn": {"style": "replicate", "width": "shard", "rng": "rank",    # its heads' dropout
               "attrs": {"n_head": _per_rank, "n_embd": _per_rank}},
    "*.attn.resid_dropout": {"style": "replicate", "rng": "shared"},     # its output's
    "*.attn.c_attn": {"style": "colwise", "parts": 3},
    "*.attn.c_proj": "rowwise",
    "*.mlp.c_fc": "colwise",
    "*.mlp.c_proj": "rowwise",
    "*lm_head": {"style": "colwise", "output": "replicate"},
}


def batch(text: torch.Tensor, step: int, rows: int, seq: int, replica: int):
    """``rows`` windows of the text (a replica's own), and the next characters."""
    g = torch.Generator().manual_seed(step * 1000 + replica)
    at = torch.randint(0, len(text) - seq - 1, (rows, 1), generator=g) + torch.arange(seq + 1)
    ids = text[at]
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def main() -> None:
    import argparse

    import collectives
    import engine
    import mesh
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages (engine.distribute)")
    ap.add_argument("--schedule", default="auto", help="with --pp: a schedule's name, or auto")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rows", type=int, default=8, help="sequences per step and replica")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default="nanogpt.pt")
    args = ap.parse_args()
    cfg = GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=4, n_embd=64)
    with open(__file__, encoding="utf-8") as f:
        text = torch.tensor([min(ord(c), 127) for c in f.read()])
    with mesh.init() as world:
        if args.pp > 1:
            return pipelined(world, args, cfg, text)
        grid = mesh.grid(world, dp=world.size // args.tp, tp=args.tp)
        dp, d = grid.group("dp"), grid.coord("dp")
        torch.manual_seed(0)                              # the same full model on every rank
        model = engine.parallelize(GPT(cfg), grid.group("tp"), PLAN)
        if world.rank == 0:
            show(grid)
            attn = model.transformer.h[0].attn
            print(f"tp rank 0 holds {attn.n_head} of {cfg.n_head} heads, "
                  f"lm_head/wte {tuple(model.lm_head.weight.shape)} of "
                  f"{(cfg.vocab_size, cfg.n_embd)}", flush=True)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        for step in range(args.steps):
            x, y = batch(text, step, args.rows, cfg.block_size, d)
            opt.zero_grad()
            _, loss = model(x, y)
            loss.backward()
            if dp.size > 1:
                collectives.all_reduce_grads(dp, [p for p in model.parameters()], op="avg")
            opt.step()
            if world.rank == 0 and (step % 10 == 0 or step == args.steps - 1):
                print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
        x, y = batch(text, args.steps, args.rows, cfg.block_size, 0)
        with torch.no_grad():
            final = model(x, y)[1].item()                 # the distributed forward, trained
        state = engine.gather_state_dict(model, root=0)   # the whole model, on rank 0
        if world.rank == 0:
            torch.save(state, args.out)
            copy = GPT(cfg)
            copy.load_state_dict(torch.load(args.out))
            with torch.no_grad():
                again = copy(x, y)[1].item()
            print(f"saved {args.out}; one process on the reloaded model: loss {again:.6f}, "
                  f"distributed: {final:.6f}")
            assert abs(again - final) < 1e-4 * max(1.0, abs(final)), (again, final)



def show(grid) -> None:
    print(f"grid {grid.axes}; plan:")
    for k, v in PLAN.items():                       # the rewrites shown as what they do
        shown = {f: ({a: "n // tp" for a in x} if f == "attrs" else x)
                 for f, x in v.items()} if isinstance(v, dict) else v
        print(f"  {k}: {shown}")


def pipelined(world, args, cfg, text) -> None:
    """dp x pp x tp by one engine.distribute call on the GPT itself: its
    forward is traced into layers (engine.sequential), and the loss it
    computes from its targets is the pipeline's."""
    import engine
    import mesh
    grid = mesh.grid(world, dp=world.size // (args.pp * args.tp), pp=args.pp, tp=args.tp)
    d = grid.coord("dp")
    if world.rank == 0:
        show(grid)
    torch.manual_seed(0)
    x0, _ = batch(text, 0, args.rows, cfg.block_size, d)
    job = engine.distribute(GPT(cfg), grid, plan=PLAN if args.tp > 1 else None,
                            schedule=args.schedule, sample=x0)
    if world.rank == 0:
        print(f"chosen: {job.schedule.name}\n{job.schedule.render()}", flush=True)
    opt = torch.optim.AdamW(job.parameters(), lr=args.lr)
    for step in range(args.steps + 1):                # the last: the trained model's loss
        x, y = batch(text, step, args.rows, cfg.block_size, d if step < args.steps else 0)
        opt.zero_grad()
        loss = job.step(x, y)
        if step < args.steps:
            opt.step()
        if world.rank == 0 and step < args.steps and (  # (the step's loss, on every rank)
                step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss:.4f}", flush=True)
    final = loss                                      # (the global batch's, on every rank)
    state = job.state_dict()                          # the whole model, on rank 0
    if world.rank == 0:
        torch.save(state, args.out)
        copy = GPT(cfg)
        copy.load_state_dict(torch.load(args.out))     # the GPT's own keys
        x, y = batch(text, args.steps, args.rows, cfg.block_size, 0)
        with torch.no_grad():
            again = copy(x, y)[1].item()
        print(f"saved {args.out}; one process on the reloaded model: loss {again:.6f}, "
              f"distributed: {final:.6f}")
        assert abs(again - final) < 1e-4 * max(1.0, abs(final)), (again, final)


if __name__ == "__main__":
    main()
