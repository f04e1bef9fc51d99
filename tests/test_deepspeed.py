"""engine.deepspeed: DeepSpeed's training API over meshrun (one import changed),
against one process on the full batch."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from typing import Any

import pytest

import engine
import mesh

torch = pytest.importorskip("torch")

from engine import deepspeed  # noqa: E402
from engine.ds_config import (DynamicLossScaler, WarmupCosineLR, WarmupDecayLR,  # noqa: E402
                              WarmupLR, parse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GAS, STEPS = 2, 3


class _Net(torch.nn.Module):
    """A forward torch.fx cannot trace (a branch on a value), with a keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 16), torch.nn.Linear(16, 2)

    def forward(self, x: Any, *, scale: float = 1.0) -> Any:
        h = self.a(x)
        if bool(h.abs().sum() >= 0):
            h = h.tanh()
        return self.b(h) * scale


def _net() -> Any:
    torch.manual_seed(0)
    return _Net()


def _data(step: int, rows: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(rows, 4, generator=g), torch.randn(rows, 2, generator=g)


def _config(stage: int, rows: int, **more: Any) -> dict[str, Any]:
    cfg = {"train_batch_size": rows, "gradient_accumulation_steps": GAS,
           "gradient_clipping": 0.05, "steps_per_print": None,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
           "scheduler": {"type": "WarmupDecayLR", "params": {
               "warmup_min_lr": 1e-3, "warmup_max_lr": 1e-2, "warmup_num_steps": 2,
               "total_num_steps": 5, "warmup_type": "linear"}},
           "zero_optimization": {"stage": stage}}
    cfg.update(more)
    return cfg


def _train(eng: Any, rank: int, steps: range, rows: int) -> None:
    """DeepSpeed's loop: this rank's GAS micro-batches of the global batch."""
    mb = eng.train_micro_batch_size_per_gpu()
    for s in steps:
        x, y = _data(s, rows)
        for k in range(GAS):
            i = (rank * GAS + k) * mb
            loss = torch.nn.functional.mse_loss(eng(x[i:i + mb], scale=1.0), y[i:i + mb])
            eng.backward(loss)
            eng.step()


def _reference(steps: range, rows: int, dtype: Any = None, fp16: Any = None,
               model: Any = None) -> tuple[Any, int]:
    """One process, the whole batch a step: the same optimizer, schedule,
    clipping (and autocast, and fp16's loss scale ``fp16``: its skipped
    steps. A dp rank's backward, of its own rows' mean, runs at dp times one
    process's gradients, averaged after it: the same overflows at a scale dp
    times as high)."""
    m = model or _net()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    sch = WarmupDecayLR(opt, 5, 1e-3, 1e-2, 2, "linear")
    scaler = None if fp16 is None else DynamicLossScaler(fp16, 1000, 1.0, 1)
    skipped = 0
    for s in steps:
        x, y = _data(s, rows)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.mse_loss(m(x), y)
        scale = 1.0 if scaler is None else scaler.cur_scale
        (loss.float() * scale).backward()
        grads = [p.grad for p in m.parameters()]
        overflow = any(not bool(torch.isfinite(g).all()) for g in grads)
        if scaler is not None:
            scaler.update_scale(overflow)
        if overflow:
            skipped += 1
        else:
            for g in grads:
                g.div_(scale)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
            opt.step()
            sch.step()
        opt.zero_grad()
    return [p.detach().clone() for p in m.parameters()], skipped


def _weights(eng: Any) -> list[Any]:
    with eng._whole():
        return [p.detach().clone() for p in eng.module.parameters()]


def _gap(a: list[Any], b: list[Any]) -> float:
    return max(float((x.detach().float() - y.detach().float()).abs().max())
               for x, y in zip(a, b))


class _Sparse(torch.nn.Module):
    """A sparse embedding and a block run through deepspeed.checkpointing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(10, 4, sparse=True)
        self.block = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                         torch.nn.Linear(8, 2))

    def forward(self, ids: Any) -> Any:
        return deepspeed.checkpointing.checkpoint(self.block, self.embed(ids)).mean(1)


def _ids(step: int, rows: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(200 + step)
    return torch.randint(0, 10, (rows, 3), generator=g), torch.randn(rows, 2, generator=g)


REAL = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": GAS, "gradient_clipping": 0.05, "steps_per_print": None,
        "prescale_gradients": True, "gradient_predivide_factor": 2.0,
        "communication_data_type": "fp32", "sparse_gradients": True,
        "zero_allow_untested_optimizer": True, "wall_clock_breakdown": False,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu",
                                                                "pin_memory": True},
                              "reduce_bucket_size": "auto"},
        "activation_checkpointing": {"partition_activations": False, "cpu_checkpointing": True,
                                     "number_checkpoints": 2}}


def _real(world: Any) -> dict[str, Any]:
    """What real scripts carry: the config above (HF's "auto", keys that
    change nothing, CPU offload, a sparse embedding, activation
    checkpointing), ``args.local_rank``, ``engine.device``, the module's
    state_dict: one process's weights on the whole batch."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    args = deepspeed.add_config_arguments(parser).parse_args([])
    m = _Sparse()
    eng, _, _, _ = deepspeed.initialize(args=args, model=m, model_parameters=m.parameters(),
                                        config=REAL)
    mb = eng.train_micro_batch_size_per_gpu()
    for s in range(STEPS):
        x, y = _ids(s, 4 * world.size)
        for k in range(GAS):
            i = (world.rank * GAS + k) * mb
            eng.backward(torch.nn.functional.mse_loss(eng(x[i:i + mb].to(eng.device)),
                                                      y[i:i + mb]))
            eng.step()
    r = _Sparse()
    opt = torch.optim.SGD(r.parameters(), lr=0.1, momentum=0.9)
    for s in range(STEPS):
        x, y = _ids(s, 4 * world.size)
        torch.nn.functional.mse_loss(r(x), y).backward()
        for p in r.parameters():
            p.grad = p.grad.to_dense()
        torch.nn.utils.clip_grad_norm_(r.parameters(), 0.05)
        opt.step()
        opt.zero_grad()
    state, want = eng.module.state_dict(), r.state_dict()
    return {"gap": _gap([state[k] for k in want], list(want.values())),
            "local_rank": (args.local_rank, eng.local_rank, os.environ["LOCAL_RANK"]),
            "device": str(eng.device), "batch": eng.train_batch_size()}


def _held_peak(world: Any, stage: int) -> int:
    """The most bytes of parameter values and gradients (distinct storages)
    this rank held at once in two training steps of a 6-layer MLP, sampled
    before each module's forward, after it, and as each gradient is final
    (after the engine's own hooks): deterministic, the same every run (even,
    and one more where GatheredParameters between the first forward and its
    backward gave other than the initial weights)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(6)])
    eng, _, _, _ = deepspeed.initialize(model=m, config={
        "train_batch_size": 4 * world.size, "steps_per_print": None,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "zero_optimization": {"stage": stage, "stage3_prefetch_bucket_size": 0}})
    peak = [0]

    def sample(*_: Any) -> None:
        seen = {}
        for p in m.parameters():
            for t in (p.data, p.grad):
                if t is not None and t.numel() > 1 and t.stride() != (0,) * t.dim():
                    s = t.untyped_storage()
                    seen[s.data_ptr()] = s.nbytes()
        peak[0] = max(peak[0], sum(seen.values()))

    hooks = [h for mod in m for h in (mod.register_forward_pre_hook(sample),
                                      mod.register_forward_hook(sample))]
    hooks += [p.register_post_accumulate_grad_hook(sample) for p in m.parameters()]
    gap = 0.0
    for k in range(2):
        loss = eng(torch.randn(4, 32)).square().mean()
        if k == 0:      # mid-step (stage 3: modules gathered as they run): the whole weights
            with deepspeed.zero.GatheredParameters(list(m.parameters())):
                torch.manual_seed(0)
                gap = _gap(list(m.parameters()), list(torch.nn.Sequential(
                    *[torch.nn.Linear(32, 32) for _ in range(6)]).parameters()))
        eng.backward(loss)
        eng.step()
    for h in hooks:
        h.remove()
    return peak[0] + (gap != 0.0)     # (odd: the weights read were not the whole ones)


def _items(seen: list[int]) -> Any:
    """A context recording the item size of every host array the
    collectives move (after their own widening: bfloat16 summed in
    float32), in ``seen``."""
    import contextlib

    import collectives.api as api

    @contextlib.contextmanager
    def watching() -> Any:
        names = ["_staged_all_reduce", "_staged_reduce", "_staged_all_to_all",
                 "_staged_all_gather", "_staged_gather"]
        kept = {n: getattr(api, n) for n in names}

        def seeing(fn: Any) -> Any:
            return lambda g, a, *args, **kw: (seen.append(a.dtype.itemsize), fn(g, a, *args,
                                                                             **kw))[1]
        for n in names:
            setattr(api, n, seeing(kept[n]))
        try:
            yield
        finally:
            for n in names:
                setattr(api, n, kept[n])
    return watching()


def _wire(world: Any) -> dict[Any, Any]:
    """communication_data_type: each rank's gradients after the boundary's
    backward, against the same rounding by hand (DeepSpeed's
    allreduce_bucket: rounded to the type, summed in it, times 1 / ranks,
    back to float32; at stage 2 the owner's), and against the float32
    average (which they must not be); and the item sizes the collectives
    moved them in (16 bits: bfloat16 too)."""
    out = {}
    x, y = _data(7, 2 * world.size)
    local = []
    for q in range(world.size):
        r = _net()
        torch.nn.functional.mse_loss(r(x[2 * q:2 * q + 2]), y[2 * q:2 * q + 2]).backward()
        local.append([p.grad for p in r.parameters()])
    for stage, name, dt in ((0, "fp16", torch.float16), (2, "fp16", torch.float16),
                            (1, "bf16", torch.bfloat16), (2, "bf16", torch.bfloat16)):
        m = _net()
        eng, _, _, _ = deepspeed.initialize(model=m, config={
            "train_batch_size": 2 * world.size, "steps_per_print": None,
            "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
            "zero_optimization": {"stage": stage}, "communication_data_type": name})
        i = 2 * world.rank
        seen: list[int] = []
        with _items(seen):
            eng.backward(torch.nn.functional.mse_loss(eng(x[i:i + 2]), y[i:i + 2]))
        out["items", stage, name] = set(seen)
        got = [p.grad for p in m.parameters()]
        want = [(sum(gs[k].to(dt) for gs in local) * (1.0 / world.size)).float()
                for k in range(len(got))]
        full = [sum(gs[k] for gs in local) / world.size for k in range(len(got))]
        out[stage, name] = ([g is None and stage == 2 or g is not None and torch.equal(g, w)
                             for g, w in zip(got, want)],
                            [g is not None and torch.equal(g, f) for g, f in zip(got, full)])
    return out


def _cases(world: Any, ckpt: str) -> dict[str, Any]:
    rows = 4 * world.size
    out: dict[str, Any] = {"real": _real(world), "wire": _wire(world),
                           "resized": _resized(world)}
    said = []      # a config refused on rank 1 only, then one rank 1 has another of
    for more in ({"bogus_key": 1}, {"gradient_clipping": 2.0}):
        try:
            deepspeed.initialize(model=_net(), config=_config(
                0, rows, **(more if world.rank == 1 else {})))
        except ValueError as e:
            said.append(str(e))
    out["refused"] = said
    for stage in (0, 1, 2, 3):
        with deepspeed.zero.Init():     # (built whole; initialize shards it)
            m = _net()
        eng, opt, _, sch = deepspeed.initialize(model=m, model_parameters=m.parameters(),
                                                config=_config(stage, rows))
        assert eng.gradient_accumulation_steps() == GAS and eng.module is m
        _train(eng, world.rank, range(STEPS), rows)
        assert eng.global_steps == STEPS and eng.micro_steps == STEPS * GAS
        out[f"stage {stage}"] = _gap(_weights(eng), _reference(range(STEPS), rows)[0])
        if stage == 3:      # an evaluation's forward gathers, then drops the others' again
            r = _net()
            with torch.no_grad():
                for a, b in zip(r.parameters(), _weights(eng)):
                    a.copy_(b)
            x = _data(99, 3)[0]
            eng.eval()
            with torch.no_grad():
                out["eval"] = _gap([eng(x)], [r(x)])
            eng.train()
            out["emptied"] = sum(p.numel() == 0 for p in m.parameters())
            with deepspeed.zero.GatheredParameters(list(m.parameters())[:1]):
                out["gathered"] = sum(p.numel() == 0 for p in m.parameters())
            with deepspeed.zero.GatheredParameters(list(m.parameters()), enabled=False):
                out["disabled"] = sum(p.numel() == 0 for p in m.parameters())
            # rank 1 writes (HF's weight init under ZeRO 3): every rank's after the block
            before = _weights(eng)
            with deepspeed.zero.GatheredParameters(m.a.weight, modifier_rank=1, fwd_module=m):
                with torch.no_grad():
                    m.a.weight.fill_(0.5 + world.rank)
            after = _weights(eng)
            out["modified"] = (float(after[0].sub(1.5).abs().max()), _gap(after[1:], before[1:]),
                               sum(p.numel() == 0 for p in m.parameters()))
            plain = torch.nn.Linear(2, 2)   # (no ZeRO 3 parameter: DeepSpeed's no-op)
            with deepspeed.zero.GatheredParameters(plain.parameters(), modifier_rank=0):
                with torch.no_grad():
                    plain.weight.fill_(world.rank)
            out["plain"] = float(plain.weight.detach().sum())
        if stage == 1:      # a second engine on the same model: the first's hooks stay idle
            again, _, _, _ = deepspeed.initialize(model=m, config=_config(0, rows))
            _train(again, world.rank, range(1), rows)
            assert again.global_steps == 1
        if stage == 2:      # saved at dp=2, stage 2; the continuation for the load's test
            eng.save_checkpoint(ckpt, client_state={"epoch": 7})
            _train(eng, world.rank, range(STEPS, STEPS + 2), rows)
            out["continued"] = _weights(eng)
    # the user's own optimizer and torch scheduler, under ZeRO 1
    m = _net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    cfg = _config(1, rows, gradient_clipping=0.0)
    del cfg["optimizer"], cfg["scheduler"]
    eng, zopt, _, zsched = deepspeed.initialize(model=m, optimizer=opt, lr_scheduler=sched,
                                                config=cfg)
    _train(eng, world.rank, range(STEPS), rows)
    r = _net()
    ropt = torch.optim.SGD(r.parameters(), lr=0.1, momentum=0.9)
    rsched = torch.optim.lr_scheduler.StepLR(ropt, 1, gamma=0.5)
    for s in range(STEPS):
        x, y = _data(s, rows)
        torch.nn.functional.mse_loss(r(x), y).backward()
        ropt.step()
        rsched.step()
        ropt.zero_grad()
    out["client optimizer"] = _gap(_weights(eng), list(r.parameters()))
    out["client lr"] = (eng.get_lr(), rsched.get_last_lr())
    # the user's own AdamW under ZeRO 2: its defaults hold decoupled_weight_decay (torch 2.13),
    # which AdamW's constructor refuses: initialize raised TypeError making it ZeRO's
    m, r = _net(), _net()
    eng, _, _, _ = deepspeed.initialize(model=m, optimizer=torch.optim.AdamW(
        m.parameters(), lr=0.01), config=dict(cfg, zero_optimization={"stage": 2}))
    _train(eng, world.rank, range(STEPS), rows)
    ropt = torch.optim.AdamW(r.parameters(), lr=0.01)
    for s in range(STEPS):
        torch.nn.functional.mse_loss(r(_data(s, rows)[0]), _data(s, rows)[1]).backward()
        ropt.step()
        ropt.zero_grad()
    out["client adamw"] = _gap(_weights(eng), list(r.parameters()))
    # bf16 (autocast; float32 weights) and fp16 (its dynamic loss scale skips overflows)
    for name, more, dtype, scale in (("bf16", {"bf16": {"enabled": True}}, torch.bfloat16, None),
                                     ("fp16", {"fp16": {"enabled": True,
                                                        "initial_scale_power": 18,
                                                        "hysteresis": 1}},
                                      torch.float16, 2 ** 18 * world.size)):
        m = _net()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)     # (inf - inf in a sum)
            eng, _, _, _ = deepspeed.initialize(model=m, config=_config(
                2 if name == "fp16" else 1, rows, **more))   # (fp16: overflows told, ZeRO 2)
            _train(eng, world.rank, range(STEPS + 2), rows)
        want, skipped = _reference(range(STEPS + 2), rows, dtype, scale)
        out[name] = (_gap(_weights(eng), want), eng.skipped_steps, skipped)
        if name == "bf16":      # the whole module in the training's half type, rank 0 writes
            eng.save_16bit_model(os.path.join(ckpt, "16bit"), "model.bin")
            saved = torch.load(os.path.join(ckpt, "16bit", "model.bin"))
            out["16bit"] = ({str(v.dtype) for v in saved.values()}, _gap(
                list(saved.values()), [w.to(torch.bfloat16) for w in _weights(eng)]))
    c = deepspeed.comm
    t = torch.tensor([float(c.get_rank())])
    c.all_reduce(t)
    c.barrier()
    out["comm"] = (c.get_world_size(), float(t))
    out["held"] = [_held_peak(world, stage) for stage in (1, 2, 3)]
    return out


def _loaded(world: Any, ckpt: str, config: str) -> dict[str, Any]:
    """The saved run's global batch, at another dp size and stage 3 (its
    config a JSON file named on the command line, as DeepSpeed's scripts do)."""
    rows = 4 * 2
    m = _net()
    parser = deepspeed.add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", config])
    eng, _, _, _ = deepspeed.initialize(args=args, model=m)
    path, client = eng.load_checkpoint(ckpt)
    assert eng.train_micro_batch_size_per_gpu() == rows // (GAS * world.size)
    _train(eng, world.rank, range(STEPS, STEPS + 2), rows)
    return {"client": client, "steps": eng.global_steps, "weights": _weights(eng),
            "path": path}


def _layers() -> list[Any]:
    """An input layer tied to a later one (called there by its forward_fn,
    with the module's bias: on another stage, that stage's own copy's)."""
    torch.manual_seed(0)
    return [deepspeed.TiedLayerSpec("in", torch.nn.Linear, 4, 16), torch.nn.Tanh(),
            torch.nn.Linear(16, 16), lambda x: x.tanh(),
            deepspeed.TiedLayerSpec("in", torch.nn.Linear, 4, 16,
                                    forward_fn=lambda m, h: h @ m.weight + m.bias[:4]),
            deepspeed.LayerSpec(torch.nn.Linear, 4, 2)]


def _tied(eng: Any) -> list[Any]:
    """This rank's copies of the tied weight (4 x 16), one per place it holds."""
    return [p.detach().clone() for p in eng.job.parameters() if p.shape == (16, 4)]


def _pipe_step(eng: Any, s: int, rows: int) -> float:
    """``train_batch`` on this dp replica's GAS micro-batches of step ``s``."""
    x, y = _data(s, rows)
    mb, r = eng.train_micro_batch_size_per_gpu(), eng.grid.coord("dp")
    if not (eng.is_first_stage() or eng.is_last_stage()):     # (as DeepSpeed's: no data)
        return float(eng.train_batch(None))
    it = iter([(x[(r * GAS + k) * mb:(r * GAS + k + 1) * mb],
                y[(r * GAS + k) * mb:(r * GAS + k + 1) * mb]) for k in range(GAS)])
    return float(eng.train_batch(it))


def _pipeline(world: Any, ckpt: str) -> dict[str, Any]:
    """A PipelineModule at dp=2 x pp=2 under ZeRO 1, saved after two
    steps, loaded into a new engine: the same third step."""
    rows = 8
    cfg = _config(1, rows)
    net = deepspeed.PipelineModule(layers=_layers(), num_stages=2,
                                   loss_fn=torch.nn.MSELoss())     # (a module: no layer)
    eng, _, _, _ = deepspeed.initialize(model=net, config=cfg)
    losses = [_pipe_step(eng, s, rows) for s in range(2)]
    eng.save_checkpoint(ckpt, client_state={"epoch": 3})
    losses.append(_pipe_step(eng, 2, rows))
    whole = eng.job.state_dict()
    # (checkpointed in runs of 2 layers, DeepSpeed's activation_checkpoint_interval: the
    # same third step)
    net = deepspeed.PipelineModule(layers=_layers(), num_stages=2,
                                   loss_fn=torch.nn.functional.mse_loss,
                                   activation_checkpoint_interval=2)
    # the third step's batch as training_data: train_batch() reads this replica's share
    # (shuffled: the global batch's mean loss is the same)
    again, _, loader, _ = deepspeed.initialize(
        model=net, config=cfg, training_data=torch.utils.data.TensorDataset(*_data(2, rows)))
    _, client = again.load_checkpoint(ckpt)
    assert len(loader) == GAS
    resumed = float(again.train_batch())
    # the dp=2 x pp=2 checkpoint at dp=1 x pp=4, cut uniformly (the tied layers on stages
    # 0 and 2, a middle one), each layer recomputed: the same third step
    net = deepspeed.PipelineModule(layers=_layers(), num_stages=4, partition_method="uniform",
                                   loss_fn=torch.nn.functional.mse_loss,
                                   activation_checkpoint_interval=1)
    four, _, _, _ = deepspeed.initialize(model=net, config=cfg)
    four.load_checkpoint(ckpt)
    return {"wire": _pipe_wire(rows), "losses": losses, "resumed": resumed, "client": client,
            "tied": _tied(eng), "whole": whole, "again": again.job.state_dict(),
            "stage": again.stage_id,
            "runs": [(st.recompute, st.layered, len(st._runs)) for st in again.job.stages],
            "four": (_pipe_step(four, 2, rows), four.stage_id, _tied(four),
                     four.job.state_dict())}


class _Vocab(torch.nn.Module):
    """A language model's two ends: token embeddings and an output head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(6, 4)
        self.mid = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 6)

    def forward(self, ids: Any) -> Any:
        return self.head(self.mid(self.embed(ids)).tanh())


def _resize(model: Any, n: int) -> None:
    """Hugging Face's ``resize_token_embeddings(n)`` under ZeRO 3, as it
    goes: the embedding's weight replaced inside GatheredParameters (its
    rows copied there first), a new output head made under zero.Init, its
    rows copied inside GatheredParameters, then set in (set_output_embeddings)."""
    zero, old = deepspeed.zero, model.embed
    with zero.GatheredParameters(old.weight, modifier_rank=None):
        was, dim = old.weight.size()
    torch.manual_seed(5)
    with zero.Init():
        new = torch.nn.Embedding(n, dim)
        head = torch.nn.Linear(dim, n)
    k = min(was, n)
    with zero.GatheredParameters([old.weight, new.weight], modifier_rank=0):
        new.weight.data[:k, :] = old.weight.data[:k, :]
    with zero.GatheredParameters([old.weight, new.weight], modifier_rank=0):
        old.weight = new.weight
        old.num_embeddings = n
    was_head = model.head
    with zero.GatheredParameters([was_head.weight, was_head.bias, head.weight, head.bias],
                                 modifier_rank=0):
        head.weight.data[:k] = was_head.weight.data[:k]
        head.bias.data[:k] = was_head.bias.data[:k]
    model.head = head


def _resized(world: Any) -> tuple[float, str]:
    """ZeRO 3: the model resized after initialize (HF's sequence), one step
    on new tokens: the weights' gap to one process resizing, then stepping
    on the whole batch. ZeRO 0: a module set in after initialize refused at
    the next forward (its error)."""
    x = torch.randint(0, 9, (2 * world.size, 3), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 9, (2 * world.size, 3), generator=torch.Generator().manual_seed(2))
    eng, _, _, _ = deepspeed.initialize(model=_Vocab(), config={
        "train_batch_size": 2 * world.size, "steps_per_print": None,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": {"stage": 3}})
    _resize(eng.module, 9)
    i = 2 * world.rank
    loss = torch.nn.functional.cross_entropy(eng(x[i:i + 2]).reshape(-1, 9),
                                             y[i:i + 2].reshape(-1))
    eng.backward(loss)
    eng.step()
    one = _Vocab()
    _resize(one, 9)
    opt = torch.optim.AdamW(one.parameters(), lr=1e-2)
    torch.nn.functional.cross_entropy(one(x).reshape(-1, 9), y.reshape(-1)).backward()
    opt.step()
    gap = _gap(_weights(eng), [p.detach() for p in one.parameters()])
    plain, _, _, _ = deepspeed.initialize(model=_Vocab(), config={
        "train_batch_size": world.size, "steps_per_print": None,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    plain.module.head = torch.nn.Linear(4, 9)
    try:
        plain(x[:1])
    except ValueError as e:
        return gap, str(e)
    return gap, "nothing raised"


def _pipe_wire(rows: int) -> list[bool]:
    """communication_data_type "bf16" in a PipelineModule's engine (no tied
    layers: their sums over the stages come after): each of this rank's
    gradients after train_batch (no optimizer: the dp average
    kept) against its replicas' own, as backward left them (the last
    accumulation's hook), rounded to bfloat16, summed, times 1 / 2, by
    hand; the float32 average must differ somewhere."""
    import collectives
    torch.manual_seed(0)
    net = deepspeed.PipelineModule(layers=[torch.nn.Linear(4, 16), torch.nn.Tanh(),
                                           torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                           torch.nn.Linear(16, 2)], num_stages=2,
                                   loss_fn=torch.nn.functional.mse_loss)
    eng, _, _, _ = deepspeed.initialize(model=net, config={
        "train_batch_size": rows, "gradient_accumulation_steps": GAS, "steps_per_print": None,
        "communication_data_type": "bf16"})
    params = list(eng.job.parameters())
    local: dict[int, Any] = {}
    for i, p in enumerate(params):
        p.register_post_accumulate_grad_hook(
            lambda p, i=i: local.__setitem__(i, p.grad.detach().clone()))
    _pipe_step(eng, 2, rows)
    flat = torch.cat([local[i].reshape(-1) for i in range(len(params))])
    a, b = (torch.split(r, [p.numel() for p in params])
            for r in collectives.all_gather(eng.grid.group("dp"), flat))
    bf = torch.bfloat16
    want = [((x.to(bf) + y.to(bf)) * 0.5).float().view(p.shape)
            for x, y, p in zip(a, b, params)]
    full = [((x + y) / 2).view(p.shape) for x, y, p in zip(a, b, params)]
    return [torch.equal(p.grad, w) for p, w in zip(params, want)] + \
        [not all(torch.equal(p.grad, f) for p, f in zip(params, full))]


@pytest.mark.timeout(240)
def test_zero_stages_precision_and_checkpoint_match_one_process(tmp_path: Any) -> None:
    """ZeRO 0-3 with accumulation, clipping and a schedule; the client's own
    optimizer and scheduler; bf16 and fp16 (overflows skipped as one process
    skips them): one process's weights. A stage-2 checkpoint saved at 2 ranks
    loads at 4 under stage 3 and continues as the uninterrupted run."""
    ckpt = str(tmp_path / "ckpt")
    res = mesh.spawn(_cases, 2, ckpt, timeout=200)
    for r in res:
        for stage in range(4):
            assert r[f"stage {stage}"] < 1e-6, r
        assert r["client optimizer"] < 1e-6 and r["client lr"][0] == r["client lr"][1], r
        assert r["client adamw"] < 1e-6, r
        assert r["bf16"][0] < 2e-2, r
        gap, skipped, want = r["fp16"]
        assert skipped == want >= 1 and STEPS + 2 - skipped >= 2 and gap < 2e-3, r
        assert r["comm"] == (2, 1.0)
        assert r["eval"] == 0.0 and r["emptied"] > 0 and r["gathered"] == 0, r
        assert r["disabled"] == r["emptied"] and r["plain"] == 4.0 * res.index(r), r
        assert r["modified"] == (0.0, 0.0, r["emptied"]), r["modified"]
        for stage, dtype in ((0, "fp16"), (2, "fp16"), (1, "bf16"), (2, "bf16")):
            rounded, averaged = r["wire"][stage, dtype]
            assert all(rounded) and not any(averaged), (stage, dtype, r["wire"])
            assert r["wire"]["items", stage, dtype] == {2}, (stage, dtype, r["wire"])
        assert r["16bit"] == ({"torch.bfloat16"}, 0.0), r["16bit"]
        assert r["resized"][0] < 1e-6 and "parameter 'head.weight' replaced, put in or " \
            "reshaped after initialize: at ZeRO stage 0" in r["resized"][1], r["resized"]
        # ZeRO 2 keeps its share's gradients as backward makes them (each reduced to its
        # owner); ZeRO 3 gathers module by module: each peak below the stage before's
        one, two, three = r["held"]
        assert three < two < one and not (one | two | three) & 1, r["held"]
        real = r["real"]
        assert real["gap"] < 1e-6 and real["device"] == "cpu" and real["batch"] == 8, real
        assert real["local_rank"][0] == real["local_rank"][1] == int(real["local_rank"][2])
    refused, differs = res[0]["refused"]
    assert refused == "rank 0: deepspeed.initialize: rank 1 refused its config: ValueError: " \
        "deepspeed config: bogus_key: not supported", refused
    assert res[1]["refused"][0] == "rank 1: deepspeed config: bogus_key: not supported"
    for r in res:
        assert "deepspeed.initialize: rank 1's config differs" in r["refused"][1] or \
            "deepspeed.initialize: rank 0's config differs" in r["refused"][1], r["refused"]
    assert sorted(os.listdir(ckpt)) == ["16bit", "global_step3", "latest"]
    config = tmp_path / "ds_config.json"
    config.write_text(json.dumps(_config(3, 4 * 2)))
    back = mesh.spawn(_loaded, 4, ckpt, str(config), timeout=200)
    for b in back:
        assert b["client"] == {"epoch": 7} and b["steps"] == STEPS + 2, b
        assert _gap(b["weights"], res[0]["continued"]) < 1e-6


@pytest.mark.timeout(240)
def test_pipeline_module_train_batch_matches_one_process(tmp_path: Any) -> None:
    """PipelineModule and train_batch on engine.distribute: dp=2 x pp=2,
    accumulation, clipping, a schedule, ZeRO 1, a TiedLayerSpec on both
    stages (one by its forward_fn): one process's losses and weights, the
    tied weight equal on both stages; a checkpoint loaded into a new engine,
    and into one at dp=1 x pp=4 (middle stages given no data), takes the
    same step."""
    res = mesh.spawn(_pipeline, 4, str(tmp_path / "pipe"), timeout=200)
    one = deepspeed.PipelineModule(layers=_layers(), num_stages=2,
                                   loss_fn=torch.nn.functional.mse_loss)
    opt = torch.optim.AdamW(one.parameters(), lr=1e-2, weight_decay=0.1)
    sch = WarmupDecayLR(opt, 5, 1e-3, 1e-2, 2, "linear")
    losses = []
    for s in range(3):
        x, y = _data(s, 8)
        loss = torch.nn.functional.mse_loss(one(x), y)
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(one.parameters(), 0.05)
        opt.step()
        sch.step()
        opt.zero_grad()
    assert sorted(r["stage"] for r in res) == [0, 0, 1, 1]
    assert all(all(r["wire"]) for r in res), [r["wire"] for r in res]
    # activation_checkpoint_interval=2: each stage's layers in runs of 2 (cut 4 + 2)
    assert [r["runs"] for r in res] == [[(True, 2, 2 if r["stage"] == 0 else 1)]
                                        for r in res], [r["runs"] for r in res]
    assert sorted(r["four"][1] for r in res) == [0, 1, 2, 3]
    tied = one[0].weight.detach()
    for r in res:
        assert r["losses"] == pytest.approx(losses, abs=1e-6) and \
            r["resumed"] == pytest.approx(r["losses"][2], abs=1e-6) and \
            r["four"][0] == pytest.approx(r["losses"][2], abs=1e-6) and \
            r["client"] == {"epoch": 3}, (r, losses)
        # each stage holding a tied place has the weight, equal to one process's
        assert len(r["tied"]) == 1 and _gap(r["tied"], [tied]) < 1e-6, r["tied"]
        assert len(r["four"][2]) == (r["four"][1] in (0, 2)), r["four"]
        assert all(_gap([w], [tied]) < 1e-6 for w in r["four"][2]), r["four"]
    whole, again = res[0]["whole"], res[0]["again"]
    assert _gap([whole[k] for k in sorted(whole)],
                [one.state_dict()[k] for k in sorted(whole)]) < 1e-6
    assert sorted(whole) == sorted(one.state_dict())
    assert _gap([whole[k] for k in sorted(whole)], [again[k] for k in sorted(whole)]) < 1e-6
    four = res[0]["four"][3]
    assert _gap([four[k] for k in sorted(whole)], [whole[k] for k in sorted(whole)]) < 1e-6


def test_partition_methods_and_tied_layers_are_deepspeeds() -> None:
    """partition_method cuts as DeepSpeed's partition_uniform (the first
    stages the longer) and partition_balanced (the least spread between the
    heaviest and lightest stage; trainable parameters only, a tied layer's
    at each place; type:REGEX against a spec's typename, a function's
    name), where engine.distribute's own balance cuts otherwise; a
    TiedLayerSpec's places are one module."""
    def cut(layers: list[Any], n: int, method: str) -> list[int]:
        return deepspeed.PipelineModule(layers=layers, num_stages=n, partition_method=method,
                                        loss_fn=torch.nn.functional.mse_loss)._counts()

    assert cut(_layers(), 4, "uniform") == [2, 2, 1, 1]
    assert cut(_layers()[:5], 2, "uniform") == [3, 2]        # (distribute's: [2, 3])
    assert cut(_layers(), 2, "parameters") == [4, 2]         # 80 0 272 0 80 10 (distribute's 3 3)
    assert cut(_layers(), 2, "type:tanh|lambda") == [3, 3]
    assert cut(_layers(), 2, "type:LINEAR") == [4, 2]
    frozen = [torch.nn.Linear(4, 4) for _ in range(4)]
    assert cut(frozen, 2, "parameters") == [2, 2]
    for layer in frozen[:2]:
        layer.requires_grad_(False)
    assert cut(frozen, 2, "parameters") == [3, 1]
    one = deepspeed.PipelineModule(layers=_layers(), num_stages=1, loss_fn=torch.nn.MSELoss())
    assert one[4].module is one[0] and len(list(one.parameters())) == 6
    # on two stages, as DeepSpeed's: the later stage's own module, tied_weight_attr alone tied
    net = deepspeed.PipelineModule(layers=_layers(), num_stages=2, loss_fn=torch.nn.MSELoss())
    head = net[4].module
    assert head is not net[0] and head.weight is net[0].weight and \
        head.bias is not net[0].bias and len(list(net.parameters())) == 7
    x = torch.randn(3, 4)
    h = net[1](net[2](net[1](net[0](x))))
    assert torch.equal(net(x), net[5](h @ net[0].weight + head.bias[:4]))
    assert [deepspeed.PipelineModule(layers=_layers(), num_stages=2, loss_fn=torch.nn.MSELoss(),
                                     activation_checkpoint_interval=n).recompute
            for n in (0, 1, 3)] == [False, "*", True]
    assert [deepspeed.PipelineModule(layers=_layers(), num_stages=2, loss_fn=torch.nn.MSELoss(),
                                     activation_checkpoint_interval=n).layered
            for n in (0, 1, 3)] == [None, None, 3]
    with pytest.raises(ValueError, match=r"activation_checkpoint_interval=-1: the layers "):
        deepspeed.PipelineModule(layers=_layers(), num_stages=2, loss_fn=torch.nn.MSELoss(),
                                 activation_checkpoint_interval=-1)
    with pytest.raises(ValueError, match=r"TiedLayerSpec\('e', Tanh\): the module has no "
                                         r"parameter 'weight' \(tied_weight_attr\)"):
        deepspeed.PipelineModule(layers=[deepspeed.TiedLayerSpec("e", torch.nn.Tanh)],
                                 num_stages=1, loss_fn=torch.nn.MSELoss())


def test_config_is_checked_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"train_batch_size is not equal to micro_batch_per_gpu"
                                         r" \* gradient_acc_step \* world_size 8 != 2 \* 2 \* 4"):
        parse({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
               "gradient_accumulation_steps": 2}, 4)
    assert parse({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2}, 4).gas == 2
    assert parse({"train_batch_size": 16, "gradient_accumulation_steps": 2}, 4).micro_batch == 2
    assert parse({"train_micro_batch_size_per_gpu": 3}, 2).train_batch_size == 6
    with pytest.raises(ValueError, match="Either train_batch_size or"):
        parse({"gradient_accumulation_steps": 2}, 2)
    base = {"train_batch_size": 4}
    for bad, key in (({"activation_checkpointing": {"partition": 1}},
                      "activation_checkpointing.partition"),
                     ({"activation_checkpointing": {"cpu_checkpointing": 1}},
                      "activation_checkpointing.cpu_checkpointing=1"),
                     ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage"),
                     ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
                      "zero_optimization.offload_param.device='nvme'"),
                     ({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}},
                      "optimizer.params.lr=\"auto\": only the HF Trainer"),
                     ({"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}},
                      "fp16.enabled=\"auto\""),
                     ({"communication_data_type": "int8"}, "communication_data_type"),
                     ({"gradient_predivide_factor": 0}, "gradient_predivide_factor"),
                     ({"sparse_gradients": "yes"}, "sparse_gradients"),
                     ({"fp16": {"enabled": True, "fp16_master_weights_and_grads": True}},
                      "fp16.fp16_master_weights_and_grads"),
                     ({"optimizer": {"type": "Lamb"}}, "optimizer"),
                     ({"scheduler": {"type": "OneCycle"}}, "scheduler"),
                     ({"gradient_clipping": -1}, "gradient_clipping"),
                     ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16 and bf16")):
        with pytest.raises(ValueError, match=f"deepspeed config: {key}"):
            parse({**base, **bad}, 2)
    with pytest.warns(UserWarning, match="wall_clock_breakdown: ignored"):
        cfg = parse({**base, "wall_clock_breakdown": True, "fp16": {"enabled": True}}, 2)
    assert cfg.fp16 is not None and cfg.fp16["hysteresis"] == 2 and cfg.zero_stage == 0
    # DeepSpeedExamples' cifar10_deepspeed.py config, as written: taken, no warning
    cifar = {"train_batch_size": 16, "steps_per_print": 2000, "gradient_clipping": 1.0,
             "prescale_gradients": False, "bf16": {"enabled": False}, "fp16": {
                 "enabled": True, "fp16_master_weights_and_grads": False, "loss_scale": 0,
                 "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1,
                 "initial_scale_power": 15, "auto_cast": False},
             "wall_clock_breakdown": False, "tensorboard": {"enabled": False},
             "zero_optimization": {"stage": 2, "allgather_partitions": True,
                                   "reduce_scatter": True, "allgather_bucket_size": 50000000,
                                   "reduce_bucket_size": 50000000, "overlap_comm": True,
                                   "contiguous_gradients": True, "cpu_offload": False}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = parse(cifar, 2)
    assert cfg.micro_batch == 8 and cfg.fp16 is not None and cfg.offload == ()
    # HF's "auto": batch figures resolved from the others, ZeRO knobs at their defaults
    cfg = parse({**REAL, "zero_optimization": {
        "stage": 3, "offload_param": {"device": "cpu"}, "cpu_offload": True,
        "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": 10}}, 2)
    assert (cfg.train_batch_size, cfg.zero_knobs) == (8, {
        "stage3_param_persistence_threshold": 10})
    assert cfg.offload == ("cpu_offload", "offload_param")
    with pytest.raises(ValueError, match="fp16.fp16_master_weights_and_grads: not supported"):
        parse({**base, "fp16": {"enabled": True, "fp16_master_weights_and_grads": True}}, 2)


def test_offload_of_a_model_elsewhere_and_what_scripts_import_beside_initialize() -> None:
    """Offloading to the CPU is where a CPU model's state is already; a model
    on another device (meta here: no accelerator on CI) is refused naming
    the key. ``deepspeed.checkpointing.checkpoint`` is torch's; the other
    names scripts import from DeepSpeed's submodules are attributes."""
    cfg = parse({"train_batch_size": 2, "zero_optimization": {
        "stage": 0, "offload_optimizer": {"device": "cpu"}}}, 1)

    class _World:
        rank, size = 0, 1
    with pytest.raises(ValueError, match="rank 0: deepspeed config: zero_optimization."
                                         "offload_optimizer: offload to the CPU of a model "
                                         "on meta"):
        deepspeed.DeepSpeedEngine(torch.nn.Linear(2, 2, device="meta"), cfg, _World(), None,
                                  None, None)
    lin = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    deepspeed.checkpointing.checkpoint(lin, x).sum().backward()
    assert lin.weight.grad is not None and x.grad is not None
    deepspeed.checkpointing.configure(None, deepspeed_config={
        "train_batch_size": 1, "activation_checkpointing": {"partition_activations": True}})
    assert deepspeed.checkpointing.is_configured()
    assert deepspeed.pipe.PipelineModule is deepspeed.PipelineModule
    assert deepspeed.accelerator.get_accelerator().device_name(0) == "cpu"
    assert list(zip(range(5), deepspeed.utils.RepeatingLoader([1, 2]))) == [
        (0, 1), (1, 2), (2, 1), (3, 2), (4, 1)]
    # (cifar10_deepspeed.py --moe: engine.moe's; tests/test_moe.py trains it)
    assert deepspeed.moe.layer.MoE is engine.MoE and callable(
        deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer)
    with pytest.raises(AttributeError, match=r"deepspeed.ops \(DeepSpeed's fused kernels "):
        deepspeed.ops
    deepspeed.runtime.utils.set_random_seed(3)
    a = torch.rand(1)
    deepspeed.runtime.utils.set_random_seed(3)
    assert torch.equal(a, torch.rand(1))


def test_schedules_and_loss_scale_are_deepspeeds() -> None:
    def lrs(sch: Any, n: int) -> list[float]:
        out = [sch.optimizer.param_groups[0]["lr"]]
        for _ in range(n):
            sch.step()
            out.append(sch.optimizer.param_groups[0]["lr"])
        return out

    def opt() -> Any:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    assert lrs(WarmupLR(opt(), 0.0, 1.0, 4, "linear"), 6) == [0, 0, .25, .5, .75, 1, 1]
    log = lrs(WarmupLR(opt(), 0.0, 1.0, 4), 2)
    assert log[2] == pytest.approx(0.5)      # log(2) / log(4)
    assert lrs(WarmupDecayLR(opt(), 6, 0.0, 1.0, 2, "linear"), 7) == pytest.approx(
        [0, 0, .5, 1, .75, .5, .25, 0])
    cos = lrs(WarmupCosineLR(opt(), 4, 0.0, 2, 0.0, "linear"), 4)
    assert cos == pytest.approx([0, 0, .25, .25, 0])     # (the cosine from the warmup's end)
    s = DynamicLossScaler(2 ** 4, 2, 2.0, 2)
    seen = []
    for overflow in (True, True, False, False, False, True, True, True, True):
        if overflow and s.cur_scale == 2.0 and s.cur_hysteresis == 1:
            with pytest.raises(FloatingPointError):
                s.update_scale(overflow)
            break
        s.update_scale(overflow)
        seen.append((s.cur_scale, s.cur_hysteresis))
    assert seen == [(16, 1), (8, 1), (8, 1), (8, 1), (16, 2), (16, 1), (8, 1), (4, 1),
                    (2, 1)], seen


@pytest.mark.timeout(120)
def test_deepspeed_example_runs_under_meshrun() -> None:
    """examples/deepspeed_train.py, a DeepSpeed script with its import changed,
    under ``meshrun -n 2``: initialize joins the job itself."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "mesh.launch", "-n", "2",
                        os.path.join(ROOT, "examples", "deepspeed_train.py")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 ranks, ZeRO 2: weights equal single-process full-batch training: True" \
        in p.stdout, p.stdout
    assert "[Rank 0] step=10, skipped=0, lr=[0.003], mom=[0.9]" in p.stdout, p.stdout
