"""Ulysses sequence parallelism (engine.ulysses): a causal transformer block
with its sequence split over 2 and 4 ranks gives one process's outputs,
gradients and SGD weights on the whole sequence, by
``engine.ulysses_attention`` on its unchanged code, by
``engine.DistributedAttention`` and by DeepSpeed's
``deepspeed.sequence.layer.DistributedAttention`` under
``deepspeed.initialize``; bad head counts and parts of unequal lengths
raise naming the rank and the tensor."""
from __future__ import annotations

import copy
from typing import Any

import pytest

import collectives
import mesh

torch = pytest.importorskip("torch")
F = torch.nn.functional

B, S, C, HEADS, STEPS, LR = 2, 8, 16, 4, 3, 0.1


def _local(q: Any, k: Any, v: Any) -> Any:
    """Causal attention on ``[B, S, H, D]`` (DeepSpeed-Ulysses' local attention)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                         v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


class _Attn(torch.nn.Module):
    """nanoGPT's causal self-attention: its width and length read from its
    input, F.scaled_dot_product_attention on ``[B, H, T, D]``; or, given
    ``core``, that function of ``[B, T, H, D]`` (``layout="sbhd"``:
    Megatron's ``[T, B, H, D]``)."""

    def __init__(self, core: Any = None, layout: str = "bshd") -> None:
        super().__init__()
        self.n_head, self.core, self.layout = HEADS, core, layout
        self.c_attn, self.c_proj = torch.nn.Linear(C, 3 * C), torch.nn.Linear(C, C)

    def forward(self, x: Any) -> Any:
        b, t, c = x.size()
        q, k, v = (a.view(b, t, self.n_head, c // self.n_head)
                   for a in self.c_attn(x).split(c, dim=2))
        if self.core is None:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=True)
            y = y.transpose(1, 2)
        elif self.layout == "sbhd":
            y = self.core(*(a.transpose(0, 1) for a in (q, k, v))).transpose(0, 1)
        else:
            y = self.core(q, k, v)
        return self.c_proj(y.reshape(b, t, c))


class _Block(torch.nn.Module):
    def __init__(self, core: Any = None, layout: str = "bshd") -> None:
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(C), torch.nn.LayerNorm(C)
        self.attn = _Attn(core, layout)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(C, 2 * C), torch.nn.GELU(),
                                       torch.nn.Linear(2 * C, C))

    def forward(self, x: Any) -> Any:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def _block(core: Any = None, layout: str = "bshd") -> Any:
    torch.manual_seed(0)
    return _Block(core, layout)


def _batch(step: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(10 + step)
    return torch.randn(B, S, C, generator=g), torch.randn(B, S, C, generator=g)


def _reference() -> tuple[Any, list[Any], Any, list[Any]]:
    """One process on the whole sequence: the first step's output, the
    parameters' and input's gradients; the weights after STEPS of SGD."""
    m = _block(_local)
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    first: Any = None
    for step in range(STEPS):
        x, y = _batch(step)
        x.requires_grad_(True)
        out = m(x)
        F.mse_loss(out, y).backward()
        if first is None:
            first = (out.detach(), [p.grad.clone() for p in m.parameters()], x.grad)
        opt.step()
        opt.zero_grad()
    return first[0], first[1], first[2], [p.detach() for p in m.parameters()]


def _gap(a: list[Any], b: list[Any]) -> float:
    return max(float((u - w).detach().abs().max()) for u, w in zip(a, b))


def _train(m: Any, world: Any, mine: slice) -> dict[str, float]:
    """STEPS of SGD on this rank's part of the sequence, gradients summed
    over the ranks (the loss: the whole sequence's mean); the first step's
    gaps to one process's, and the last weights'."""
    out0, grads, xgrad, weights = _reference()
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    said: dict[str, float] = {}
    for step in range(STEPS):
        x, y = _batch(step)
        x = x[:, mine].clone().requires_grad_(True)
        out = m(x)
        (F.mse_loss(out, y[:, mine], reduction="sum") / y.numel()).backward()
        for p in m.parameters():
            collectives.all_reduce(world, p.grad)
        if step == 0:
            said.update(out=_gap([out], [out0[:, mine]]), x_grad=_gap([x.grad], [xgrad[:, mine]]),
                        grads=_gap([p.grad for p in m.parameters()], grads))
        opt.step()
        opt.zero_grad()
    said["weights"] = _gap(list(m.parameters()), weights)
    return said


def _deepspeed(world: Any, mine: slice) -> float:
    """DeepSpeed-Ulysses' usage: DistributedAttention on torch.distributed's
    group, Megatron's layout, trained by deepspeed.initialize's engine (its
    dp average over the sequence ranks the whole sequence's mean)."""
    from engine import deepspeed
    from torch import distributed as dist
    deepspeed.init_distributed()
    attn = deepspeed.sequence.layer.DistributedAttention(_local_sbhd, dist.group.WORLD)
    m = _block(attn, "sbhd")
    eng, _, _, _ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config={
        "train_micro_batch_size_per_gpu": B, "steps_per_print": None,
        "optimizer": {"type": "SGD", "params": {"lr": LR}}})
    for step in range(STEPS):
        x, y = _batch(step)
        eng.backward(F.mse_loss(eng(x[:, mine]), y[:, mine]))
        eng.step()
    return _gap(list(m.parameters()), _reference()[3])


def _local_sbhd(q: Any, k: Any, v: Any) -> Any:
    return _local(*(a.transpose(0, 1) for a in (q, k, v))).transpose(0, 1)


def _errors(world: Any) -> list[str]:
    from engine import DistributedAttention, PlanError, ulysses_attention
    said = []
    odd = torch.zeros(B, S // world.size, HEADS - 1, 2)
    try:
        DistributedAttention(_local, world)(odd, odd, odd)
    except PlanError as e:
        said.append(str(e))
    m = _block()
    for names in ("blocks.*", "mlp"):
        try:
            ulysses_attention(m, world, names)
            m(torch.zeros(B, 2, C))
        except PlanError as e:
            said.append(str(e))
    part = S // world.size + (world.rank == 0)        # rank 0's part one token longer
    q = torch.zeros(B, part, HEADS, 2)
    try:
        DistributedAttention(_local, world)(q, q, q)
    except mesh.MismatchError as e:
        said.append(str(e))
    return said


def _cases(world: Any) -> dict[str, Any]:
    from engine import DistributedAttention, ulysses_attention
    n = S // world.size
    mine = slice(world.rank * n, (world.rank + 1) * n)
    m = _block()
    assert ulysses_attention(m, world, "attn") == ["attn"]
    twin = copy.deepcopy(m)      # (a timing's copy: its own weights, the group shared)
    twin(_batch(0)[0][:, mine]).sum().backward()
    out: dict[str, Any] = {"copy": [p.grad is None for p in m.parameters()]
                           + [p.grad is not None for p in twin.parameters()]}
    out.update({"native": _train(m, world, mine),
           "wrapped": _train(_block(DistributedAttention(_local, world)), world, mine),
           "deepspeed": _deepspeed(world, mine)})
    out["errors"] = _errors(world)
    return out


@pytest.mark.parametrize("ranks", [2, 4])
def test_ulysses_matches_one_process(ranks: int) -> None:
    for r, got in enumerate(mesh.spawn(_cases, ranks, timeout=120)):
        for how in ("native", "wrapped"):
            assert max(got[how].values()) < 1e-5, (r, how, got[how])
        assert got["deepspeed"] < 1e-5, (r, got["deepspeed"])
        assert all(got["copy"]), got["copy"]      # a deepcopy's gradients its own
        heads, nomatch, nosdpa, mismatch = got["errors"]
        assert heads.startswith(f"rank {r}: Ulysses attention's query forward: axis 2 of a "
                                f"(2, {S // ranks}, 3, 2) tensor is 3, not divisible by the "
                                f"sequence-parallel group size {ranks}"), heads
        assert nomatch == f"rank {r}: ulysses_attention: 'blocks.*' matches no submodule " \
                          f"of the _Block", nomatch
        assert nosdpa.startswith(f"rank {r}: ulysses_attention: mlp's forward called no "
                                 f"torch.nn.functional.scaled_dot_product_attention"), nosdpa
        assert mismatch.startswith(f"rank {r}: Ulysses attention's query: "), mismatch
        assert "mismatch" in mismatch and "all_to_all" in mismatch, mismatch



def test_ulysses_refuses_a_group_of_another_kind() -> None:
    from engine import DistributedAttention
    q = torch.zeros(B, S, HEADS, 2)
    with pytest.raises(TypeError, match="the sequence-parallel group must be a meshrun "
                                        "communicator .* not list"):
        DistributedAttention(_local, [0, 1])(q, q, q)
