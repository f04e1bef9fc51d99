"""bfloat16 stages (``model.to(torch.bfloat16)``): numpy has no bfloat16, so
a TorchStage hands out the gradient tensors themselves (``grads()``), which
the executor's arithmetic and meshrun's collectives take as they take
arrays; the dp average and the tied copies' sum run in float32 and are
rounded once.

One spawn of four ranks: ``engine.distribute`` (its layers timed on the
sample: balance="time") at dp=2 x pp=2 with the embedding and the head tied,
two steps without ``zero_grad()`` (the second copies what the gradients
held), against one process's bfloat16 gradients, and the same at dp=2 x
tp=2 under sequence parallelism; and a bare ``Pipeline``,
its gradients zeroed in place, then kept for a second step. In it too,
float16 autocast with torch's ``GradScaler`` (``job.step(x, y,
scaler=scaler)``, engine.scaled) at dp=2 x pp=2, AdamW and ZeRO stages 2
and 3: an inf put in one rank's stage-1 gradient makes every rank skip that
step and halve its scale, and the scales, norms and weights follow one
process's.
"""
import numpy as np
import pytest

import mesh

ROWS, STEPS = 8, 2
FP16_STEPS, BAD = 4, 1      # the float16 steps, and the one whose stage-1 gradient is inf


def _data(step):
    import tp_models
    rng = np.random.default_rng(500 + step)
    return (rng.integers(0, tp_models.VOCAB, (ROWS, tp_models.SEQ)),
            rng.integers(0, tp_models.VOCAB, (ROWS, tp_models.SEQ)))


def _ce(y, t):
    import torch
    return torch.nn.functional.cross_entropy(y.reshape(-1, y.shape[-1]).float(), t.reshape(-1))


def _model():
    import torch

    import tp_models
    model = tp_models.model(5, dtype=torch.bfloat16)
    model[-1].head.weight = model[0].embed.weight
    return model


def _reference():
    import torch
    model = _model()
    for step in range(STEPS):
        x, y = (torch.from_numpy(a) for a in _data(step))
        _ce(model(x), y).backward()
    return {k: v.grad.float().numpy() for k, v in model.state_dict(keep_vars=True).items()
            if v.grad is not None}


def _mlp():
    import torch
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 16),
                               torch.nn.GELU(), torch.nn.Linear(16, 5))


def _fp16_batch(step):
    import torch
    g = torch.Generator().manual_seed(70 + step)
    return torch.randn(16, 6, generator=g) * 4, torch.randint(0, 5, (16,), generator=g)


def _fp16_loop(params, opt, scaler, step_fn, clip, bad, autocast=True):
    """One process's GradScaler loop, its backward ``step_fn``'s; ``bad``: a
    parameter whose gradient is made inf at step BAD. Each step's scale
    after it, whether any weight moved, and the norm (and with ``autocast``
    off, the loss ``step_fn`` returned)."""
    import torch
    out = []
    for step in range(FP16_STEPS):
        hook = bad.register_hook(lambda g: g * float("inf")) if step == BAD and bad is not None \
            else None
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            loss = step_fn(step)
        if hook is not None:
            hook.remove()
        scaler.unscale_(opt)
        norm = float(clip(1.0))
        before = [p.detach().clone() for p in params]
        scaler.step(opt)
        scaler.update()
        out.append((scaler.get_scale(), any(not torch.equal(b, p) for b, p in zip(before, params)),
                    norm) + (() if autocast else (loss,)))
    return out


def _fp16_reference():
    import torch
    import torch.nn.functional as F
    model = _mlp()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", growth_interval=2)

    def backward(step):
        x, y = _fp16_batch(step)
        scaler.scale(F.cross_entropy(model(x), y)).backward()
    steps = _fp16_loop(params, opt, scaler, backward,
                       lambda m: torch.nn.utils.clip_grad_norm_(params, m), model[4].weight)
    return steps, {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _counted_batch(step):
    """``_fp16_batch``'s, some labels -100 (not counted): each micro-batch
    and dp replica counts another number of them."""
    import torch
    x, y = _fp16_batch(step)
    y[torch.rand(16, generator=torch.Generator().manual_seed(90 + step)) < 0.4] = -100
    return x, y


def _counted_sum(out, t):
    """A per-token loss of the user's own: the sum and the count."""
    import torch.nn.functional as F
    return F.cross_entropy(out, t, ignore_index=-100, reduction="sum"), (t != -100).sum()


def _per_token_reference():
    """One process's float32 GradScaler loop (no autocast, SGD) on the
    counted batches: ``scaler.scale(mean over the counted labels)``."""
    import torch
    import torch.nn.functional as F
    model = _mlp()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", growth_interval=2)

    def backward(step):
        x, y = _counted_batch(step)
        loss = F.cross_entropy(model(x), y, ignore_index=-100)
        scaler.scale(loss).backward()
        return loss.item()
    steps = _fp16_loop(params, opt, scaler, backward,
                       lambda m: torch.nn.utils.clip_grad_norm_(params, m), model[4].weight,
                       autocast=False)
    return steps, {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _fp16_per_token(grid):
    """A per-token loss under a GradScaler at dp=2 x pp=2, float32 (no
    autocast), SGD: a mean cross entropy module (run per token) and a
    ``(loss_sum, count)`` of the user's own; the inf on dp replica 0's
    stage 1 at step BAD."""
    import torch

    import engine
    d, out = grid.coord("dp"), []
    for loss_fn in (torch.nn.CrossEntropyLoss(ignore_index=-100), _counted_sum):
        job = engine.distribute(_mlp(), grid, schedule="1f1b", microbatches=2, balance=[3, 2],
                                loss_fn=loss_fn, verbose=False, timeout=60)
        params = job.parameters()
        opt = torch.optim.SGD(params, lr=0.1)
        scaler = torch.amp.GradScaler("cpu", growth_interval=2)

        def backward(step):
            x, y = _counted_batch(step)
            return job.step(x[d::2], y[d::2], scaler=scaler)
        steps = _fp16_loop(params, opt, scaler, backward, job.clip_grad_norm_,
                           dict(job.named_parameters()).get("4.weight") if d == 0 else None,
                           autocast=False)
        state = job.state_dict()
        out.append((steps, state and {k: v.numpy() for k, v in state.items()}))
    return out


def _fp16(grid):
    """The float16 loop at dp=2 x pp=2 (AdamW, then ZeRO stages 2 and 3), the inf
    on dp replica 0's stage 1 only (the dp average spreads it to replica 1's,
    stage 0's ranks see none); then a step given a scaler on rank 0 alone,
    and one given something else than a GradScaler."""
    import torch
    import torch.nn.functional as F

    import engine
    d, out = grid.coord("dp"), []
    for zero in (0, 2, 3):
        job = engine.distribute(_mlp(), grid, schedule="1f1b", microbatches=2, balance=[3, 2],
                                loss_fn=F.cross_entropy, verbose=False, timeout=60)
        params = job.parameters()
        opt = (torch.optim.AdamW(params, lr=1e-2) if not zero else engine.ZeroRedundancyOptimizer(
            params, torch.optim.AdamW, process_group=job, stage=zero, lr=1e-2))
        scaler = torch.amp.GradScaler("cpu", growth_interval=2)

        def backward(step):
            x, y = _fp16_batch(step)
            job.step(x[d::2], y[d::2], scaler=scaler)
        steps = _fp16_loop(params, opt, scaler, backward, job.clip_grad_norm_,
                           dict(job.named_parameters()).get("4.weight") if d == 0 else None)
        state = job.state_dict()
        out.append((steps, state and {k: v.numpy() for k, v in state.items()}))
    x, y = _fp16_batch(0)
    for given in (scaler if grid.comm.rank == 0 else None, object()):
        try:
            job.step(x[d::2], y[d::2], scaler=given)
            out.append(None)
        except (TypeError, ValueError) as e:
            out.append(f"{type(e).__name__}: {e}")
    return out


def _worker(world):
    import torch
    import torch.nn.functional as F

    import engine
    import tp_models
    from engine import gather_state_dict
    torch.set_num_threads(1)
    grid = mesh.grid(world, dp=2, pp=2)
    d = grid.coord("dp")
    job = engine.distribute(_model(), grid, schedule="1f1b", microbatches=2, balance="time",
                            sample=torch.from_numpy(_data(0)[0][d::2]), loss_fn=_ce,
                            verbose=False, overhead=0.0, timeout=60)
    for step in range(STEPS):          # no zero_grad: the second step keeps the first's
        x, y = (torch.from_numpy(a[d::2]) for a in _data(step))
        job.step(x, y)
    grads = {}
    for s, st in zip(job.schedule.stages_of(job.pipeline.rank), job.stages):
        for n, p in st.module.named_parameters():
            assert p.grad.dtype == torch.bfloat16, n
            j, _, rest = n.partition(".")
            grads[f"{job.names[job.first[s] + int(j)]}.{rest}"] = p.grad.float().numpy()
    # dp=2 x tp=2, sequence parallel: the norms' sums over tp in float32 too
    sp = mesh.grid(world, dp=2, pp=1, tp=2)
    job = engine.distribute(_model(), sp, plan=tp_models.SEQUENCE, schedule="1f1b",
                            microbatches=2, balance="uniform", loss_fn=_ce, verbose=False,
                            overhead=0.0, timeout=60)
    for step in range(STEPS):
        x, y = (torch.from_numpy(a[sp.coord("dp")::2]) for a in _data(step))
        job.step(x, y)
    sequence = {k: g.float().numpy() for k, g in
                gather_state_dict(job.stages[0].module, grads=True).items()}
    # a bare Pipeline over pp, its gradients zeroed in place, then kept
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(),
                                torch.nn.Linear(8, 3)).to(torch.bfloat16)
    sched = engine.schedules.one_f_one_b(2, 2)
    parts = engine.partition(model, 2, balance=[2, 1])
    pipe = engine.Pipeline(grid, engine.stages_for_rank(parts, sched, grid.coord("pp")), sched,
                           loss_fn=F.mse_loss, timeout=60)
    opt = torch.optim.SGD([p for st in pipe.stages.values() for p in st.module.parameters()],
                          lr=0.1)
    losses = []
    for step in range(2):
        if step == 0:
            opt.zero_grad(set_to_none=False)      # zeros: step 1 then copies what they hold
        x, y = torch.randn(8, 6), torch.randn(8, 3)
        losses.append(pipe.step(x if pipe.first else None, y if pipe.last else None))
        opt.step()
    return grads, losses, sequence, _fp16(grid), _fp16_per_token(grid)


@pytest.mark.timeout(200)
def test_bfloat16_stages_train_and_accumulate():
    pytest.importorskip("torch")
    results = mesh.spawn(_worker, 4, timeout=180)
    want = _reference()
    # bfloat16 keeps 8 bits: sums in another order round differently, and a
    # gradient that is rounding noise (an attention's key bias: 0 exactly) by as much
    atol = 1e-2 * max(float(np.abs(g).max()) for g in want.values())
    seen = set()
    for r, (grads, losses, sequence, *_) in enumerate(results):
        for k, g in grads.items():
            np.testing.assert_allclose(g, want[k], rtol=5e-2, atol=atol,
                                       err_msg=f"rank {r} {k}")
            seen.add(k)
        assert set(sequence) == set(want) - {"3.head.weight"}, r     # (one stage: tied)
        for k, g in sequence.items():
            np.testing.assert_allclose(g, want[k], rtol=5e-2, atol=atol,
                                       err_msg=f"sequence parallel: rank {r} {k}")
        # the step's loss on every rank (the last stage's, averaged over dp), the same float
        assert losses == results[0][1] and all(np.isfinite(v) for v in losses), (r, losses)
    assert seen == set(want), sorted(set(want) - seen)
    # the tied copies (stage 0's embedding, stage 1's head) hold the same sum
    np.testing.assert_array_equal(results[0][0]["0.embed.weight"],
                                  results[1][0]["3.head.weight"])
    # float16 with a GradScaler: every rank skips step BAD and halves its scale, as one
    # process does; the scales (grown back after 2 good steps), norms and weights are its
    steps, weights = _fp16_reference()
    assert [s[:2] for s in steps] == [(65536.0, True), (32768.0, False), (32768.0, True),
                                      (65536.0, True)], steps
    for r, (*_, fp16, _) in enumerate(results):
        for zero, (got, state) in zip((0, 2, 3), fp16[:3]):
            assert [g[:2] for g in got] == [s[:2] for s in steps], (r, zero, got)
            # (step BAD's norm: inf in one process; here its two micro-batches' infs of
            # either sign may add up to a nan)
            assert not np.isfinite(got[BAD][2]) and not np.isfinite(steps[BAD][2]), (r, got)
            np.testing.assert_allclose([g[2] for i, g in enumerate(got) if i != BAD],
                                       [s[2] for i, s in enumerate(steps) if i != BAD],
                                       rtol=1e-3, err_msg=f"rank {r} zero {zero}")
            if r == 0:
                assert set(state) == set(weights)
                for k, v in state.items():
                    np.testing.assert_allclose(v, weights[k], atol=2e-4,
                                               err_msg=f"zero {zero} {k}")
        assert fp16[3].startswith("ValueError") and "step(scaler=) was given" in fp16[3] \
            and "rolled back" in fp16[3], (r, fp16[3])
        assert fp16[4] == f"TypeError: pp rank {r % 2}: step(scaler=): a torch.amp.GradScaler, " \
            "not 'object'", (r, fp16[4])
    # a per-token loss under the scaler (float32): its sums' backward seeded by the scale
    # over the targets' elements, the gradients made the count's at the step's end: the
    # scales, skips, norms, losses (every rank's the same) and weights are one process's
    steps, weights = _per_token_reference()
    assert [s[:2] for s in steps] == [(65536.0, True), (32768.0, False), (32768.0, True),
                                      (65536.0, True)], steps
    for r, (*_, per_token) in enumerate(results):
        for way, (got, state) in zip(("module", "pair"), per_token):
            assert [g[:2] for g in got] == [s[:2] for s in steps], (r, way, got)
            assert [g[3] for g in got] == [g[3] for g in results[0][-1][0][0]], (r, way)
            np.testing.assert_allclose([g[3] for g in got], [s[3] for s in steps], rtol=1e-6,
                                       err_msg=f"rank {r} {way}: losses")
            np.testing.assert_allclose([g[2] for i, g in enumerate(got) if i != BAD],
                                       [s[2] for i, s in enumerate(steps) if i != BAD],
                                       rtol=1e-5, err_msg=f"rank {r} {way}: norms")
            if r == 0:
                assert set(state) == set(weights)
                for k, v in state.items():
                    np.testing.assert_allclose(v, weights[k], rtol=1e-5, atol=1e-7,
                                               err_msg=f"{way} {k}")
