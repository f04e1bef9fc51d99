"""A small plain transformer (no distribution code in it) and its
tensor-parallel plans, for the tensor-parallel tests."""
import torch
from torch import nn

VOCAB, DIM, HIDDEN, HEADS, SEQ = 8, 8, 12, 2, 4


def tokens(seed: int, rows: int) -> tuple:
    """A batch for the model: (inputs, targets), ``rows`` sequences of
    random tokens each (numpy int64), the same for a seed on every rank."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return (rng.integers(0, VOCAB, (rows, SEQ)), rng.integers(0, VOCAB, (rows, SEQ)))


def cross_entropy(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model's loss: the mean over every position of the batch."""
    return nn.functional.cross_entropy(y.reshape(-1, y.shape[-1]), t.reshape(-1))


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape

        def heads(z):
            return z.view(b, t, self.num_heads, -1).transpose(1, 2)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.o((a @ v).transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn, self.mlp = Attention(DIM, HEADS), MLP(DIM, HIDDEN)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)

    def forward(self, ids):
        return self.embed(ids)


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_f, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, VOCAB)

    def forward(self, x):
        return self.head(self.ln_f(x))


def model(seed: int = 0, blocks: int = 2, dtype=torch.float32) -> nn.Sequential:
    """Embed, blocks, Head: an nn.Sequential, so its stages are slices of it."""
    torch.manual_seed(seed)
    return nn.Sequential(Embed(), *(Block() for _ in range(blocks)), Head()).to(dtype)


class OwnLoss(nn.Module):
    """``layers`` as a plain module computing its own loss, nanoGPT's way
    (traced, no loss_fn=): given targets, ``(logits, loss)``, or the loss
    alone (``pair=False``); without, the logits. The loss reads them
    flattened, ``(rows * positions, vocab)``."""

    def __init__(self, layers: nn.Sequential, pair: bool = True) -> None:
        super().__init__()
        self.layers, self.pair = layers, pair

    def forward(self, ids, targets=None):
        logits = self.layers(ids)
        if targets is None:
            return logits
        loss = nn.functional.cross_entropy(logits.view(-1, logits.size(-1)),
                                           targets.reshape(-1))   # (a dp slice: strided)
        return (logits, loss) if self.pair else loss


def _heads(n, tp):
    return n // tp


PLAIN = {
    "*embed": "vocab",
    "*.attn": ("replicate", {"num_heads": _heads}),
    "*.attn.[qkv]": "colwise",
    "*.attn.o": "rowwise",
    "*.mlp.up": "colwise",
    "*.mlp.down": "rowwise",
    "*.head": {"style": "colwise", "output": "replicate"},
}

# Megatron's sequence parallelism: norms on a part of the sequence, the
# residual stream (and what crosses pipeline stages) split along it. The
# attention reads the sequence length from its input: it takes the whole
# sequence (one all-gather for q, k and v) and reduce-scatters its output.
SEQUENCE = {
    "*embed": {"style": "vocab", "output": "sequence"},
    "*.ln?": "sequence",
    "*.ln_f": "sequence",
    "*.attn": {"style": "replicate", "input": "sequence", "output": "sequence",
               "attrs": {"num_heads": _heads}},
    "*.attn.[qkv]": {"style": "colwise", "input": "partial"},
    "*.attn.o": {"style": "rowwise", "output": "partial"},
    "*.mlp.up": {"style": "colwise", "input": "sequence"},
    "*.mlp.down": {"style": "rowwise", "output": "sequence"},
    "*.head": {"style": "colwise", "input": "sequence", "output": "replicate"},
}


class FusedAttention(nn.Module):
    """q, k and v from one Linear whose output is the blocks [q; k; v], as
    nanoGPT's c_attn and Phi-3's qkv_proj; grouped-query (fewer k and v
    heads), causal. Written without distribution code: the sizes it splits
    by are attributes, which a plan rewrites."""

    def __init__(self, d: int = DIM, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.qkv = nn.Linear(d, (heads + 2 * kv_heads) * self.head_dim)
        self.proj = nn.Linear(heads * self.head_dim, d)

    def forward(self, x):
        b, t, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.heads * hd, self.kv_heads * hd,
                                     self.kv_heads * hd], dim=-1)
        q = q.view(b, t, self.heads, hd).transpose(1, 2)
        k, v = (z.view(b, t, self.kv_heads, hd).transpose(1, 2)
                .repeat_interleave(self.heads // self.kv_heads, dim=1) for z in (k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.heads * hd))


FUSED = {
    "attn": ("replicate", {"heads": _heads, "kv_heads": _heads}),
    "attn.qkv": {"style": "colwise", "parts": (4 * 2, 2 * 2, 2 * 2)},   # q, k, v rows
    "attn.proj": "rowwise",
}


class QKNormAttention(Attention):
    """Attention with a norm over each head's queries (Qwen3's q_norm): a
    whole module that runs on this rank's heads once tp shards them."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__(d, heads)
        self.q_norm = nn.LayerNorm(d // heads)
        with torch.no_grad():
            self.q_norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, self.num_heads, -1).transpose(1, 2)
                   for z in (self.q(x), self.k(x), self.v(x)))
        a = torch.softmax(self.q_norm(q) @ k.transpose(-1, -2), dim=-1)
        return self.o((a @ v).transpose(1, 2).reshape(b, t, -1))


def qk_norm_model(seed: int = 0) -> nn.Sequential:
    """model(), its blocks' attentions with a per-head q norm."""
    m = model(seed)
    for block in list(m)[1:-1]:
        block.attn = QKNormAttention(DIM, HEADS)
    return m


# the per-head norm's gradients summed over tp: it sees this rank's heads
QK_NORM = {**PLAIN, "*.attn.q_norm": {"style": "replicate", "input": "shard"}}


class Conv1D(nn.Module):
    """Hugging Face's Conv1D (transformers.pytorch_utils), as GPT-2 has it:
    a Linear whose weight is held transposed, ``(nx, nf)``, in by out."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.3)
        nn.init.normal_(self.bias, std=0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2Attention(nn.Module):
    """GPT-2's attention as Hugging Face writes it: a fused [q; k; v]
    ``c_attn`` split by ``split_size``, heads by ``num_heads``, causal."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = d, heads, d // heads
        self.split_size = d
        self.c_attn, self.c_proj = Conv1D(3 * d, d), Conv1D(d, d)

    def _split_heads(self, t):
        return t.view(t.size()[:-1] + (self.num_heads, self.head_dim)).permute(0, 2, 1, 3)

    def forward(self, h):
        q, k, v = self.c_attn(h).split(self.split_size, dim=2)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = a.permute(0, 2, 1, 3).contiguous()
        return self.c_proj(a.view(a.size()[:-2] + (self.num_heads * self.head_dim,)))


class GPT2MLP(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(h, d), Conv1D(d, h)

    def forward(self, x):
        return self.c_proj(nn.functional.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn, self.mlp = GPT2Attention(DIM, HEADS), GPT2MLP(DIM, HIDDEN)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def gpt2_model(seed: int = 0, blocks: int = 2) -> nn.Sequential:
    """model(), its blocks GPT-2's, every projection a Conv1D."""
    torch.manual_seed(seed)
    return nn.Sequential(Embed(), *(GPT2Block() for _ in range(blocks)), Head())


GPT2 = {
    "*embed": "vocab",
    "*.attn": ("replicate", {"num_heads": _heads, "split_size": _heads}),
    "*.attn.c_attn": {"style": "colwise", "parts": 3},
    "*.attn.c_proj": "rowwise",
    "*.mlp.c_fc": "colwise",
    "*.mlp.c_proj": "rowwise",
    "*.head": {"style": "colwise", "output": "replicate"},
}

# GPT2 with Megatron's sequence parallelism around the Conv1Ds (SEQUENCE's layout)
GPT2_SEQUENCE = {
    "*embed": {"style": "vocab", "output": "sequence"},
    "*.ln_[12]": "sequence",
    "*.ln_f": "sequence",
    "*.attn": {"style": "replicate", "input": "sequence", "output": "sequence",
               "attrs": {"num_heads": _heads, "split_size": _heads}},
    "*.attn.c_attn": {"style": "colwise", "input": "partial", "parts": 3},
    "*.attn.c_proj": {"style": "rowwise", "output": "partial"},
    "*.mlp.c_fc": {"style": "colwise", "input": "sequence"},
    "*.mlp.c_proj": {"style": "rowwise", "output": "sequence"},
    "*.head": {"style": "colwise", "input": "sequence", "output": "replicate"},
}
