"""engine.moe: a mixture of experts spread over expert-parallel ranks
(all_to_all dispatch and combine over meshrun's collectives), against one
process holding every expert.

The gating is each rank's own tokens' (DeepSpeed's: a rank's capacity is
ceil(its tokens / experts * capacity_factor), the tokens over it dropped),
so the one-process reference gates each rank's rows in a forward of their
own, and its loss is the mean of those forwards' losses: the whole batch's
mean, as the ranks' averaged gradients make it. The two dispatches (each
expert's tokens alone, and DeepSpeed's padded capacity) against each other:
the same bits."""
from __future__ import annotations

from typing import Any

import pytest

import collectives
import mesh

torch = pytest.importorskip("torch")

from engine import moe  # noqa: E402

H, E, ROWS, STEPS, LR, AUX = 6, 4, 8, 3, 0.1, 0.05
# (k, capacity_factor, drop_tokens, use_residual): the first drops tokens at top-1 (a
# capacity of 1 of a rank's 8 tokens over 4 experts), the third at top-2
CASES = [(1, 0.5, True, False), (1, 1.0, False, True), (2, 0.5, True, False),
         (2, 1.0, False, False)]


class _Net(torch.nn.Module):
    def __init__(self, ep: int, k: int, factor: float, drop: bool, residual: bool,
                 world: Any = None, first: int = 0, experts: int = E) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(3, H)
        self.moe = moe.MoE(H, torch.nn.Linear(H, H), num_experts=experts, ep_size=ep, k=k,
                           capacity_factor=factor, min_capacity=0, drop_tokens=drop,
                           use_residual=residual, use_rts=False,
                           top2_2nd_expert_sampling=False, world=world)
        self.out = torch.nn.Linear(H, 2)
        for i, ex in enumerate(self.moe.experts):      # (each expert its own weights)
            g = torch.Generator().manual_seed(10 + first + i)
            for p in ex.parameters():
                p.data = torch.randn(p.shape, generator=g) * 0.5
        self.double()

    def forward(self, x: Any) -> tuple[Any, Any]:
        h, l_aux, _ = self.moe(torch.tanh(self.inp(x)))
        return self.out(h), l_aux


def _data(step: int, ranks: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(ranks * ROWS, 3, generator=g, dtype=torch.float64),
            torch.randn(ranks * ROWS, 2, generator=g, dtype=torch.float64))


def _loss(net: Any, x: Any, y: Any) -> Any:
    out, l_aux = net(x)
    return torch.nn.functional.mse_loss(out, y) + AUX * l_aux


def _sgd(net: Any) -> None:
    """SGD's step (torch.optim's first use imports torch._dynamo: seconds)."""
    with torch.no_grad():
        for p in net.parameters():
            p -= LR * p.grad


def _reference(world: Any, case: tuple[Any, ...], ranks: int, clip: float = 0.0,
               adamw: bool = False) -> tuple[dict[str, Any], int]:
    """One process, every expert (ep_size 1 on a group of this rank alone),
    each rank's rows gated in a forward of their own (``clip``: the whole
    model's gradient norm clipped; ``adamw``: torch's AdamW, else SGD):
    its weights, and the bytes of its optimizer's state."""
    # (every rank makes every rank's group alone, in one order)
    alone = [world.group([r]) for r in range(world.size)][world.rank]
    net = _Net(1, *case, world=alone)
    opt = torch.optim.AdamW(net.parameters(), lr=LR) if adamw else None
    for s in range(STEPS):
        x, y = _data(s, ranks)
        loss = sum(_loss(net, x[r * ROWS:(r + 1) * ROWS], y[r * ROWS:(r + 1) * ROWS])
                   for r in range(ranks)) / ranks
        net.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(list(net.parameters()), clip)
        opt.step() if opt is not None else _sgd(net)
    held = 0 if opt is None else sum(v.numel() * v.element_size() for st in opt.state.values()
                                     for v in st.values())
    return {n: p.detach().clone() for n, p in net.named_parameters()}, held


def _trained(world: Any, ep: int) -> list[Any]:
    out = []
    for case in CASES:
        j = world.rank % ep                 # (this rank's place in its ep group)
        net = _Net(ep, *case, world=world, first=j * (E // ep))
        red = moe.MoEGradReducer(world, net.parameters())
        for s in range(STEPS):
            x, y = _data(s, world.size)
            me = slice(world.rank * ROWS, (world.rank + 1) * ROWS)
            net.zero_grad()
            _loss(net, x[me], y[me]).backward()
            red.reduce()
            _sgd(net)
        want = _reference(world, case, world.size)[0]
        gap = max(float((p - want[n]).abs().max()) for n, p in _renamed(net, j, ep).items())
        dropped = [int(c) for c in net.moe.exp_counts]
        out.append((case, gap, dropped, [getattr(p, "allreduce", True)
                                         for p in net.moe.experts.parameters()]))
    return out


def _renamed(net: Any, j: int, ep: int) -> dict[str, Any]:
    """``net``'s parameters by the one-process model's names (local expert
    i is expert j * E/ep + i there)."""
    out = {}
    for n, p in net.named_parameters():
        if ".experts." in n:
            head, rest = n.split(".experts.")
            i, rest = rest.split(".", 1)
            n = f"{head}.experts.{j * (E // ep) + int(i)}.{rest}"
        out[n] = p.detach().clone()
    return out


def _engine(world: Any, ep: int, stage: int, optimizer: dict[str, Any],
            experts: int = E, **more: Any) -> tuple[Any, Any]:
    """A model with a deepspeed.moe.layer.MoE at ``ep`` through
    deepspeed.initialize, clipping on, its parameter groups split as
    DeepSpeedExamples' cifar10 does (``more``: config keys)."""
    from engine import deepspeed
    net = _Net(ep, *CASES[2], first=(world.rank % ep) * (E // ep), experts=experts)
    groups = deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer(
        {"params": list(net.parameters()), "name": "parameters"})
    cfg = {"train_batch_size": ROWS * world.size, "steps_per_print": None,
           "gradient_clipping": 0.3, "optimizer": optimizer,
           "zero_optimization": {"stage": stage}, **more}
    return net, deepspeed.initialize(model=net, model_parameters=groups, config=cfg)[0]


def _ds_step(world: Any, eng: Any, s: int, step: bool = True) -> None:
    x, y = _data(s, world.size)
    me = slice(world.rank * ROWS, (world.rank + 1) * ROWS)
    y_hat, l_aux = eng(x[me])
    eng.backward(torch.nn.functional.mse_loss(y_hat, y[me]) + AUX * l_aux)
    if step:
        eng.step()


def _deepspeed(world: Any, where: str) -> dict[str, Any]:
    """deepspeed.initialize of a model with a deepspeed.moe.layer.MoE at
    ep_size 2, clipping on, AdamW (at 4 ranks SGD too, and under ZeRO 0)
    under ZeRO 1 and 2: one process's weights (and ZeRO 2's ZeRO 1's); under
    ZeRO 2 the gradients held after the last backward and the optimizer
    state (the bytes, and whether all of it is this rank's share's); ZeRO 1
    of unsplit groups and ZeRO 3 refused, naming them; at 4 ranks a
    checkpoint resumed (``_resumed``, in ``where``)."""
    from engine import deepspeed
    gaps, out, weights = [], {}, {}
    for opt in ("SGD", "AdamW") if world.size == 4 else ("AdamW",):
        want, whole = _reference(world, CASES[2], world.size, clip=0.3, adamw=opt == "AdamW")
        for stage in (0, 1, 2) if opt == "SGD" and world.size == 4 else (1, 2):
            net, eng = _engine(world, 2, stage, {"type": opt, "params": {"lr": LR}})
            for s in range(STEPS):
                _ds_step(world, eng, s, step=False)
                if stage == 2 and s == STEPS - 1:
                    out[f"grads {opt}"] = sum(p.grad.numel() for p in net.parameters()
                                              if p.grad is not None)
                eng.step()
            weights[opt, stage] = _renamed(net, world.rank % 2, 2)
            gaps.append(max(float((p - want[n]).abs().max())
                            for n, p in weights[opt, stage].items()))
            out["groups"] = [(g.get("name"), g.get("moe", False), len(g["params"]))
                             for g in eng.optimizer.param_groups]
            if stage == 2:
                o = eng.optimizer
                out[f"state {opt}"] = (o.state_bytes(), whole, all(
                    o.holds(p) for own in o.parts for p in getattr(own, "optim", own).state))
        gaps.append(max(float((p - weights[opt, 1][n]).abs().max())
                        for n, p in weights[opt, 2].items()))
    out.update(norm=eng.get_global_grad_norm(), layer=type(net.moe) is deepspeed.moe.layer.MoE,
               whole=sum(p.numel() for p in want.values()))
    refused = []
    for stage, params in ((1, _Net(2, *CASES[2]).parameters()), (3, None)):
        try:
            deepspeed.initialize(model=_Net(2, *CASES[2]), model_parameters=params, config={
                "train_batch_size": ROWS * world.size, "zero_optimization": {"stage": stage},
                "optimizer": {"type": "SGD", "params": {"lr": LR}}})
        except ValueError as e:
            refused.append(str(e))
    return dict(out, gaps=gaps, refused=refused, wire=_wire(world) if world.size == 2 else [],
                resumed=[_resumed(world, stage, where) for stage in (0, 1, 2)]
                if world.size == 4 else [])


def _wire(world: Any) -> list[tuple[Any, ...]]:
    """communication_data_type at ZeRO 1 and 2, "fp16" and "bf16", ep_size
    1 (the experts over their expert-data-parallel group, the world) and 2
    (a group of one: this rank's, divided by 2): whether each gradient
    after the backward (at ZeRO 2 those kept) is that rounding by hand
    (every rank's own rounded, summed in the type, times 1 / ranks, then
    divided by ep_size), whether all are the float64 average (not), and
    whether one was dropped here (ZeRO 2's)."""
    out = []
    for stage, name, dt, ep in ((1, "fp16", torch.float16, 1), (1, "bf16", torch.bfloat16, 2),
                                (2, "bf16", torch.bfloat16, 1), (2, "fp16", torch.float16, 2)):
        net, eng = _engine(world, ep, stage, {"type": "SGD", "params": {"lr": LR}},
                           communication_data_type=name)
        mine = _Net(ep, *CASES[2], first=(world.rank % ep) * (E // ep))
        _ds_step(world, eng, 0, step=False)
        x, y = _data(0, world.size)
        me = slice(world.rank * ROWS, (world.rank + 1) * ROWS)
        _loss(mine, x[me], y[me]).backward()
        local = [p.grad for p in mine.parameters()]
        every = collectives.all_gather_object(world, [g.tolist() for g in local])
        same, full = [], []
        for k, (n, p) in enumerate(net.named_parameters()):
            div = ep if ".experts." in n else 1
            if div == world.size:       # (an expert-data-parallel group of one: not sent)
                want = fully = local[k] / div
            else:
                gs = [torch.tensor(e[k], dtype=torch.float64) for e in every]
                want = (sum(g.to(dt) for g in gs) * (1.0 / world.size)).double() / div
                fully = sum(gs) / world.size / div
            same.append(p.grad is None and stage == 2 or p.grad is not None and
                        torch.equal(p.grad, want))
            full.append(p.grad is not None and torch.equal(p.grad, fully))
        out.append((stage, name, ep, all(same), all(full),
                    any(p.grad is None for p in net.parameters())))
    return out


def _resumed(world: Any, stage: int, where: str) -> tuple[list[float], str]:
    """ep_size 2, SGD with momentum under ZeRO ``stage``: saved after 2
    steps, loaded into a fresh engine at ep_size 2 and at 4 (the experts
    re-split): the third step's weights against the uninterrupted run's
    (the largest gap; every expert's, gathered by whole name); and what a
    load into a layer of 8 experts raises."""
    sgd = {"type": "SGD", "params": {"lr": LR, "momentum": 0.9}}
    net, eng = _engine(world, 2, stage, sgd)
    _ds_step(world, eng, 0)
    _ds_step(world, eng, 1)
    eng.save_checkpoint(where, tag=f"zero{stage}")
    _ds_step(world, eng, 2)
    want: dict[str, Any] = {}
    for part in collectives.all_gather_object(world, {     # (msgpack values: lists)
            n: p.flatten().tolist() for n, p in _renamed(net, world.rank % 2, 2).items()}):
        want.update(part)
    gaps = []
    for ep in (2, 4):
        net, eng = _engine(world, ep, stage, sgd)
        eng.load_checkpoint(where, tag=f"zero{stage}")
        assert eng.global_steps == 2, eng.global_steps
        _ds_step(world, eng, 2)
        gaps.append(max(float((p.flatten() - torch.tensor(want[n], dtype=p.dtype)).abs().max())
                        for n, p in _renamed(net, world.rank % ep, ep).items()))
    try:
        _engine(world, 2, stage, sgd, experts=8)[1].load_checkpoint(where, tag=f"zero{stage}")
        return gaps, "no error"
    except ValueError as e:
        return gaps, str(e)


def _mismatches(world: Any) -> list[str]:
    """A rank whose layer's hidden size, ep_size (1: it would run alone), k
    or num_experts (or tokens) differs: both raise, naming the rank, the
    setting and the peer (the tokens: the dispatch); a peer lost in the
    backward's all_to_all, or a timeout in the first forward's check,
    named with the layer; num_experts and ep_size checked."""
    said = []
    for bad in ("hidden", "ep_size", "k", "num_experts", "tokens", "tokens by tokens"):
        h = H + (world.rank if bad == "hidden" else 0)
        kw = {"num_experts": E, "ep_size": 2, "k": 1}
        if bad in kw:
            kw[bad] = {"num_experts": E * 2, "ep_size": 1, "k": 2}[bad] if world.rank else \
                kw[bad]
        layer = moe.MoE(h, torch.nn.Linear(h, h), world=world, min_capacity=0,
                        dispatch="tokens" if bad == "tokens by tokens" else "capacity", **kw)
        rows = ROWS + (world.rank if bad.startswith("tokens") else 0)
        try:
            layer(torch.randn(rows, h))
            said.append("no error")
        except Exception as e:
            said.append(f"{type(e).__name__}: {e}")
    layer = moe.MoE(H, torch.nn.Linear(H, H), num_experts=E, ep_size=2, world=world)
    calls = []

    def lost(group: Any, x: Any) -> Any:     # (the backward's first exchange: a peer lost)
        calls.append(x)
        if len(calls) > 2:
            raise mesh.LostPeerError(f"rank {world.rank}: all_to_all #9 on group {group.name}: "
                                     f"recv from rank {1 - world.rank} failed: peer rank "
                                     f"{1 - world.rank} is gone", 1 - world.rank)
        return moe.meshrun_exchange(group, x)
    layer.exchange = lost
    try:
        layer(torch.randn(ROWS, H))[0].sum().backward()
        said.append("no error")
    except mesh.LostPeerError as e:
        said.append(f"{type(e).__name__} {e.peer}: {e}")
    gather = collectives.all_gather_object

    def silent(group: Any, obj: Any) -> Any:     # (a peer that never runs the layer)
        raise mesh.MeshTimeoutError(f"rank {world.rank}: all_gather_object #7 on group "
                                    f"{group.name} timed out after 5s")
    collectives.all_gather_object = silent
    try:
        moe.MoE(H, torch.nn.Linear(H, H), num_experts=E, ep_size=2, world=world)(
            torch.randn(ROWS, H))
        said.append("no error")
    except mesh.MeshTimeoutError as e:
        said.append(str(e))
    finally:
        collectives.all_gather_object = gather
    for kw in ({"num_experts": 3, "ep_size": 2}, {"num_experts": 3, "ep_size": 3}):
        try:
            moe.MoE(H, torch.nn.Linear(H, H), world=world, **kw)(torch.randn(2, H))
            said.append("no error")
        except ValueError as e:
            said.append(str(e))
    return said


def _dispatches(world: Any) -> list[tuple[Any, ...]]:
    """The same layer at ep_size 2 by each dispatch, top-1 and top-2,
    dropping tokens and not, random token selection and second-expert
    sampling on (the RNG seeded alike): whether the outputs, l_aux and
    every gradient (input's, gate's, experts') are equal bit for bit
    (float64), and the rows the tokens way sent against the padded way's."""
    out = []
    x0 = torch.randn(16, H, generator=torch.Generator().manual_seed(world.rank),
                     dtype=torch.float64)
    for k in (1, 2):
        for drop in (True, False):
            got = []
            for way in ("capacity", "tokens"):
                torch.manual_seed(7)
                layer = moe.MoE(H, torch.nn.Linear(H, H), num_experts=E, ep_size=2, k=k,
                                capacity_factor=0.5 * k, min_capacity=0, drop_tokens=drop,
                                world=world, dispatch=way).double()
                sent = [0]          # (the float rows every exchange sends)
                plain, plain_v = layer.exchange, layer.exchange_v
                layer.exchange = lambda g, t: (sent.__setitem__(0, sent[0] + (
                    t.shape[0] * t.shape[1] if t.is_floating_point() else 0)), plain(g, t))[1]
                layer.exchange_v = lambda g, t, sc, rc: (sent.__setitem__(0, sent[0] + len(
                    t)), plain_v(g, t, sc, rc))[1]
                x = x0.clone().requires_grad_()
                torch.manual_seed(8 + world.rank)
                y, l_aux, _ = layer(x)
                (y.pow(2).sum() + l_aux).backward()
                got.append([y, l_aux, x.grad] + [p.grad for p in layer.parameters()] +
                           [sent[0]])
            cap, tok = got
            same = all(torch.equal(a, b) for a, b in zip(cap[:-1], tok[:-1]))
            out.append((k, drop, same, len(cap) - 1, cap[-1], tok[-1]))
    return out


def _cases(world: Any, where: str) -> dict[str, Any]:
    res: dict[str, Any] = {"trained": _trained(world, 2), "deepspeed": _deepspeed(world, where),
                           "dispatches": _dispatches(world)}
    if world.size == 2:
        res["mismatch"] = _mismatches(world)
    return res


@pytest.mark.timeout(200)
@pytest.mark.parametrize("ranks", [2, 4])
def test_expert_parallel_training_matches_one_process(ranks: int, tmp_path: Any) -> None:
    """ep=2 on 2 ranks, and ep=2 x expert-dp=2 on 4: top-1 and top-2, with
    capacity dropping tokens and without, the residual MoE: a few SGD steps
    to one process's weights (float64); through deepspeed.initialize under
    ZeRO 1 and 2, AdamW (at 4 ranks SGD too, and ZeRO 0), ZeRO 2 holding its
    share of the gradients and optimizer state alone; at 4 its checkpoint
    saved after 2 steps resumed at ep_size 2 and 4 under ZeRO 0, 1 and 2:
    the third step the uninterrupted run's. At both, the tokens dispatch
    against the padded one: the same bits, fewer rows."""
    res = mesh.spawn(_cases, ranks, str(tmp_path), timeout=150)
    for r in res:
        for case, gap, counts, marks in r["trained"]:
            assert gap < 1e-10, (case, gap)
            assert sum(counts) == ROWS * case[0] and marks == [False] * len(marks), (case, counts)
        # (output, l_aux, the input's gradient, the gate's and the experts' parameters')
        assert [d[:4] for d in r["dispatches"]] == [
            (k, drop, True, 8) for k in (1, 2) for drop in (True, False)], r["dispatches"]
    for i, (k, drop, *_) in enumerate(res[0]["dispatches"]):
        padded, tokens = (sum(r["dispatches"][i][j] for r in res) for j in (4, 5))
        # (without drops every token's row goes out and back, forward and backward)
        assert tokens <= padded and (drop or padded > tokens == 4 * ranks * 16 * k), \
            (k, drop, padded, tokens)
    for rank, r in enumerate(res):
        ds = r["deepspeed"]
        assert max(ds["gaps"]) < 1e-10 and ds["norm"] > 0.3 and ds["layer"], ds
        assert ds["groups"] == [("parameters", False, 5), ("ep_size_2", True, 4)], ds
        # (communication_data_type: DeepSpeed's rounding, not the float64 average)
        assert ds["wire"] == ([
            (1, "fp16", 1, True, False, False), (1, "bf16", 2, True, False, False),
            (2, "bf16", 1, True, False, True), (2, "fp16", 2, True, False, True)]
            if ranks == 2 else []), ds["wire"]
        mine, whole, only = ds["state AdamW"]       # (ZeRO 2: this rank's share alone)
        assert only and 0 < mine < whole, ds["state AdamW"]
        mixed, zero3 = ds["refused"]
        for gaps, other in ds["resumed"]:
            assert max(gaps) < 1e-10, ds["resumed"]
            assert other.startswith(f"rank {rank}: load_checkpoint: the MoE layers' experts "
                                    f"differ (saved {{'moe': {{'num_experts': 4, 'ep_size': "
                                    f"2}}}}, this model's {{'moe': {{'num_experts': 8, "), other
        assert mixed.startswith(f"rank {rank}: deepspeed.initialize: ZeRO stage 1 with MoE "
                                f"layers: parameter group 0 mixes expert and other "
                                f"parameters: split them with deepspeed.moe.utils."), mixed
        assert zero3.startswith(f"rank {rank}: deepspeed.initialize: zero_optimization."
                                f"stage 3 with MoE layers: not supported on meshrun; use "
                                f"stage 2"), zero3
    # (each gradient and each state on one rank: the one process's, dealt out)
    for opt in ("SGD", "AdamW") if ranks == 4 else ("AdamW",):
        assert sum(r["deepspeed"][f"grads {opt}"] for r in res) == res[0]["deepspeed"]["whole"]
    assert sum(r["deepspeed"]["state AdamW"][0] for r in res) == \
        res[0]["deepspeed"]["state AdamW"][1]
    assert len(res[0]["deepspeed"]["resumed"]) == (3 if ranks == 4 else 0)
    if ranks == 2:
        for rank, r in enumerate(res):
            hidden, ep, k, experts, tokens, by_tokens, lost, silent, three, world = \
                r["mismatch"]
            other = 1 - rank
            for got, name, here, there in ((hidden, "hidden_size", H + rank, H + other),
                                           (ep, "ep_size", 1 + (rank == 0), 1 + (other == 0)),
                                           (k, "k", 1 + rank, 1 + other),
                                           (experts, "num_experts", E * (1 + rank),
                                            E * (1 + other))):
                assert got.startswith(f"MismatchError: rank {rank}: MoE layer (") and \
                    f" forward: its {name} is {here} here but {there} on rank {other} (group " \
                    f"world, checked at the layer's first forward)" in got, got
            assert tokens.startswith("MismatchError: ") and "dispatch" in tokens, tokens
            assert by_tokens.startswith("MismatchError: ") and "dispatch" in by_tokens and \
                f"rank {other}'s capacity is {2 + other} and hidden size 6, this rank's " \
                f"{2 + rank} and 6" in by_tokens, by_tokens
            assert lost.startswith(f"LostPeerError {other}: rank {rank}: MoE layer (4 experts, "
                                   f"ep_size 2) combine (backward): its all_to_all over the "
                                   f"expert-parallel group world/[0, 1]: all_to_all #9 on "
                                   f"group world/[0, 1]: recv from rank {other} failed"), lost
            assert silent == f"rank {rank}: MoE layer (4 experts, ep_size 2) forward: the " \
                             f"all-gather of its settings over group world, at its first " \
                             f"forward: all_gather_object #7 on group world timed out after " \
                             f"5s", silent
            assert "num_experts=3 is not divisible by ep_size=2" in three, three
            assert f"rank {rank}: MoE: ep_size=3 must be a whole number >= 1 dividing the " \
                f"world's 2 ranks" in world, world


def test_dispatch_argument() -> None:
    """``dispatch``: DeepSpeed's padded capacity by default, the tokens way
    for ``use_tutel=True`` (DeepSpeed's faster dispatch), anything else
    refused naming the two."""
    def made(**kw: Any) -> Any:
        return moe.MoE(H, torch.nn.Linear(H, H), num_experts=E, ep_size=2, **kw).dispatch
    assert [made(), made(use_tutel=True), made(dispatch="tokens"),
            made(use_tutel=True, dispatch="capacity")] == ["capacity", "tokens", "tokens",
                                                          "capacity"]
    with pytest.raises(ValueError, match="dispatch='padded': one of capacity, tokens"):
        made(dispatch="padded")
