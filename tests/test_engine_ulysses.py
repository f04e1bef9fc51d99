"""Ulysses sequence parallelism (engine.ulysses): a causal transformer block
with its sequence split over 2 and 4 ranks gives one process's outputs,
gradients and SGD weights on the whole sequence, by
``engine.ulysses_attention`` on its unchanged code, by
``engine.DistributedAttention`` and by DeepSpeed's
``deepspeed.sequence.layer.DistributedAttention`` under
``deepspeed.initialize``; bad head counts and parts of unequal lengths
raise naming the rank and the tensor. In the same spawns, ``engine.distribute``
over a grid with an sp axis (``plan={"*.attn": "ulysses"}``): sp=2 at 2 ranks
(its layers timed with the sp peers at once; ZeRO stage 2; the Ulysses
attentions recomputed) and dp=1 x sp=2 x pp=2 at 4 (ZeRO stage 3; every block
recomputed, layered=1) give one process's float64 weights, momentum
(``optimizer_state_dict``), clipped norms, losses and eval outputs after
three SGD steps on the whole batch, ZeRO's shares over dp x sp; what it
refuses names the rank."""
from __future__ import annotations

import copy
from typing import Any

import pytest

import collectives
import mesh

torch = pytest.importorskip("torch")
F = torch.nn.functional

B, S, C, HEADS, STEPS, LR = 2, 8, 16, 4, 3, 0.1
CLIP = 0.5     # (below the gradients' norm: the clip changes every step)


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
    calls = []

    def lost(blocks: Any) -> Any:        # (the backward's first all_to_all: a peer lost)
        calls.append(blocks)
        if len(calls) > 4:
            raise mesh.LostPeerError(f"rank {world.rank}: all_to_all #9 on group world: recv "
                                     f"from rank 0 failed: peer rank 0 is gone", 0)
        return collectives.all_to_all(world, blocks)
    q = torch.zeros(B, S // world.size, HEADS, 2, requires_grad=True)
    try:
        DistributedAttention(_local, world, exchange=lost)(q, q, q).sum().backward()
    except mesh.LostPeerError as e:
        said.append(f"{e.peer}: {e}")
    return said


def _stack() -> Any:
    """Two causal transformer blocks, float64: what engine.distribute cuts."""
    torch.manual_seed(0)
    return torch.nn.Sequential(_Block(), _Block()).double()


def _batch64(step: int) -> tuple[Any, Any]:
    return tuple(t.double() for t in _batch(step))


VOCAB = 11


class _LM(torch.nn.Module):
    """The blocks in a plain module (engine.sequential traces it), ids in,
    logits out."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, C)
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])
        self.head = torch.nn.Linear(C, VOCAB)

    def forward(self, ids: Any) -> Any:
        h = self.emb(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _lm() -> Any:
    torch.manual_seed(0)
    return _LM().double()


def _lm_loss(logits: Any, y: Any) -> Any:
    """A mean cross entropy whose ignored tokens differ by sp rank."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=0)


def _ids(step: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(10 + step)
    return tuple(torch.randint(0, VOCAB, (B, S), generator=g) for _ in range(2))


def _sp_job(world: Any, axes: dict[str, int], model: Any = None, **kw: Any) -> Any:
    import engine
    kw = {"plan": {"*.attn": "ulysses"}, "schedule": "1f1b", "microbatches": 2,
          "balance": "uniform", "loss_fn": F.mse_loss, **kw}
    return engine.distribute(_stack() if model is None else model, mesh.grid(world, **axes),
                             verbose=False, timeout=60, **kw)


def _distributed(world: Any) -> dict[str, Any]:
    """engine.distribute with an sp axis: STEPS of SGD with momentum on the
    whole batch (each sp rank its part of the sequence) against one
    process's, under ZeRO (its shares over dp x sp) and recompute, the
    gradients' norm clipped; then what it refuses, each message. 2 ranks:
    sp=2, a traced model, a cross entropy ignoring some tokens (unequal
    counts on the sp ranks), the layers timed on the sample (the sp peers at
    once), ZeRO stage 2, the Ulysses attentions alone recomputed (their
    all_to_alls run again in the backward); 4: dp=1 x sp=2 x pp=2, an
    nn.Sequential, mse, ZeRO stage 3, every block recomputed layer by layer."""
    import engine
    if world.size == 2:
        make, data, loss_fn = _lm, _ids, _lm_loss
        job = _sp_job(world, {"sp": 2, "pp": 1}, make(), sample=_ids(0)[0], balance="time",
                      overhead=0.0, reps=1, loss_fn=loss_fn, plan={"blocks.*.attn": "ulysses"},
                      recompute=["blocks.*.attn"])
    else:
        make, data, loss_fn = _stack, _batch64, F.mse_loss
        job = _sp_job(world, {"dp": 1, "sp": 2, "pp": 2}, recompute=True, layered=1)
    opt = engine.ZeroRedundancyOptimizer(job.parameters(), torch.optim.SGD, job,
                                         stage=world.size // 2 + 1, lr=LR, momentum=0.9)
    losses, norms = [], []
    for step in range(STEPS):
        opt.zero_grad()
        losses.append(job.step(*data(step)))
        norms.append(float(job.clip_grad_norm_(CLIP)))
        opt.step()
    shares = sum(v["momentum_buffer"].numel() for v in opt.optim.state.values())
    state, optim = job.state_dict(), job.optimizer_state_dict(opt)
    loss0, outs = job.eval_step(*data(0), outputs=True)
    said: dict[str, Any] = {"losses": losses, "eval": loss0, "shares": shares,
                            "whole": sum(v.numel() for v in make().parameters())}
    m = make()
    sgd = torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9)
    want, wnorms = [], []
    for step in range(STEPS):
        x, y = data(step)
        sgd.zero_grad()
        loss = loss_fn(m(x), y)
        loss.backward()
        wnorms.append(float(torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP)))
        sgd.step()
        want.append(loss.item())
    said["norm_gap"] = max(abs(a - b) for a, b in zip(norms, wnorms))
    with torch.no_grad():
        whole = m(data(0)[0])
        said["eval_gap"] = abs(said["eval"] - float(loss_fn(whole, data(0)[1])))
    if outs is not None:    # (the last stage's: this sp rank's part of the outputs)
        part = S // 2
        sp = job.grid.coord("sp")
        said["outs_gap"] = float((outs - whole[:, sp * part:(sp + 1) * part]).abs().max())
    said["loss_gap"] = max(abs(a - b) for a, b in zip(losses, want))
    if world.rank == 0:
        said["gap"] = max(float((state[k] - v).abs().max()) for k, v in m.state_dict().items())
        moms = sgd.state_dict()["state"]
        said["optim_gap"] = max(
            float((optim["state"][n]["momentum_buffer"] - moms[i]["momentum_buffer"]).abs().max())
            for i, (n, _) in enumerate(m.named_parameters()))
    errors = []
    x, y = data(0)
    try:
        job.step(x[:, :S - 1], y[:, :S - 1])
    except ValueError as e:
        errors.append(str(e))
    if world.size == 2:
        odd = _stack()
        odd[0].attn.n_head = 1
        cases: list[tuple[Any, dict[str, Any]]] = [
            ({"sp": 2, "pp": 1}, {"plan": None}),
            ({"sp": 2, "pp": 1}, {"plan": {"nothing.*": "ulysses"}}),
            ({"pp": 2}, {}),
            ({"sp": 2, "pp": 1}, {"model": odd, "sample": _batch64(0)[0], "balance": "time",
                                  "overhead": 0.0, "reps": 1})]
    else:
        cases = [({"sp": 2, "tp": 2, "pp": 1}, {})]
    for axes, kw in cases:
        try:
            _sp_job(world, axes, **kw)
        except ValueError as e:
            errors.append(str(e))
    said["errors"] = errors
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
    out["distribute"] = _distributed(world)
    return out


@pytest.mark.parametrize("ranks", [2, 4])
def test_ulysses_matches_one_process(ranks: int) -> None:
    for r, got in enumerate(mesh.spawn(_cases, ranks, timeout=120)):
        for how in ("native", "wrapped"):
            assert max(got[how].values()) < 1e-5, (r, how, got[how])
        assert got["deepspeed"] < 1e-5, (r, got["deepspeed"])
        assert all(got["copy"]), got["copy"]      # a deepcopy's gradients its own
        heads, nomatch, nosdpa, mismatch, lost = got["errors"]
        assert heads.startswith(f"rank {r}: Ulysses attention's query forward: axis 2 of a "
                                f"(2, {S // ranks}, 3, 2) tensor is 3, not divisible by the "
                                f"sequence-parallel group size {ranks}"), heads
        assert nomatch == f"rank {r}: ulysses_attention: 'blocks.*' matches no submodule " \
                          f"of the _Block", nomatch
        assert nosdpa.startswith(f"rank {r}: ulysses_attention: mlp's forward called no "
                                 f"torch.nn.functional.scaled_dot_product_attention"), nosdpa
        part = S // ranks + (r == 0)
        assert mismatch.startswith(f"rank {r}: Ulysses attention's query forward: the "
                                   f"all_to_all of this rank's (2, {part}, {HEADS}, 2) float32 "
                                   f"part over the sequence-parallel group world (every rank's "
                                   f"part of the sequence, heads, head size and dtype must "
                                   f"agree): "), mismatch
        assert "mismatch" in mismatch and "all_to_all" in mismatch, mismatch
        assert lost == f"0: rank {r}: Ulysses attention's output backward: the all_to_all of " \
                       f"this rank's (2, {S // ranks}, {HEADS}, 2) float32 part: all_to_all #9 " \
                       f"on group world: recv from rank 0 failed: peer rank 0 is gone", lost
        _check_distributed(r, ranks, got["distribute"])


def _check_distributed(r: int, ranks: int, got: dict[str, Any]) -> None:
    """engine.distribute with an sp axis: one process's weights and losses
    (float64, 1e-10), and each refusal's message."""
    if r == 0:
        assert got["gap"] < 1e-10 and got["optim_gap"] < 1e-10, got
    assert got["loss_gap"] < 1e-10 and got["eval_gap"] < 1e-10 and got["norm_gap"] < 1e-10, got
    assert got.get("outs_gap", 0.0) < 1e-10, got
    assert ("outs_gap" in got) == (ranks == 2 or r % 2 == 1), got    # (the last stage's)
    # (ZeRO's shares over dp x sp: each sp rank keeps the momentum of about half the weights)
    assert 0 < got["shares"] < got["whole"] * (0.75 if ranks == 2 else 0.5), got
    errors = got["errors"]
    # (sp=2: rank r is sp rank r; dp=1 x sp=2 x pp=2: sp rank r // 2, pp rank r % 2, whose
    # first stage is given the inputs, its last the targets)
    sp, what = (r, "inputs") if ranks == 2 else (r // 2, ("inputs", "targets")[r % 2])
    shape = (B, S - 1) if ranks == 2 else (B, S - 1, C)
    assert errors[0].startswith(f"rank {r} (sp rank {sp} of 2): step()'s {what}: axis 1 (the "
                                f"sequence) of a {shape} batch is {S - 1}, not "
                                f"divisible by sp=2"), errors[0]
    said = f"rank {r}: engine.distribute: "
    if ranks == 4:
        assert errors[1] == said + "the grid {'sp': 2, 'tp': 2, 'pp': 1}: sp=2 with tp=2 is " \
                                   "not supported; an sp axis runs beside dp and pp only", errors
        return
    nosp, nomatch, noaxis, heads = errors[1:]
    assert nosp.startswith(said + "the grid's sp axis (sp=2) splits each micro-batch's "
                                  "sequence (axis 1) over 2 ranks: the plan names"), nosp
    assert nomatch == said + "plan entry 'nothing.*': 'ulysses' matches no submodule of the " \
                             "Sequential", nomatch
    assert noaxis.startswith(said + "plan entries ['*.attn']: 'ulysses' runs attention over "
                                    "the grid's sp axis, and the grid {'pp': 2} has none"), noaxis
    assert heads.startswith(said + "measuring the layers on the sample, rank "), heads
    assert "Ulysses attention in 0.attn, its query forward: axis 1 of a " in heads and \
           ", 1, 4, 16) tensor is 1, not divisible by the sequence-parallel group size 2" \
           in heads, heads



def test_ulysses_refuses_a_group_of_another_kind() -> None:
    from engine import DistributedAttention
    q = torch.zeros(B, S, HEADS, 2)
    with pytest.raises(TypeError, match="the sequence-parallel group must be a meshrun "
                                        "communicator .* not list"):
        DistributedAttention(_local, [0, 1])(q, q, q)


def test_a_tensor_parallel_plan_points_ulysses_to_distribute() -> None:
    from engine import PlanError, Style
    with pytest.raises(PlanError, match="'ulysses' is a plan entry of engine.distribute over a "
                                        "grid with an sp axis"):
        Style("ulysses")
