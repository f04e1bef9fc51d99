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
its gradients zeroed in place, then kept for a second step.
"""
import numpy as np
import pytest

import mesh

ROWS, STEPS = 8, 2


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
    return grads, losses, sequence


@pytest.mark.timeout(200)
def test_bfloat16_stages_train_and_accumulate():
    pytest.importorskip("torch")
    results = mesh.spawn(_worker, 4, timeout=180)
    want = _reference()
    # bfloat16 keeps 8 bits: sums in another order round differently, and a
    # gradient that is rounding noise (an attention's key bias: 0 exactly) by as much
    atol = 1e-2 * max(float(np.abs(g).max()) for g in want.values())
    seen = set()
    for r, (grads, losses, sequence) in enumerate(results):
        for k, g in grads.items():
            np.testing.assert_allclose(g, want[k], rtol=5e-2, atol=atol,
                                       err_msg=f"rank {r} {k}")
            seen.add(k)
        assert set(sequence) == set(want) - {"3.head.weight"}, r     # (one stage: tied)
        for k, g in sequence.items():
            np.testing.assert_allclose(g, want[k], rtol=5e-2, atol=atol,
                                       err_msg=f"sequence parallel: rank {r} {k}")
        last = r % 2 == 1            # world rank = dp * 2 + pp
        assert all((v is not None) == last for v in losses), (r, losses)
        assert all(v is None or np.isfinite(v) for v in losses), (r, losses)
    assert seen == set(want), sorted(set(want) - seen)
    # the tied copies (stage 0's embedding, stage 1's head) hold the same sum
    np.testing.assert_array_equal(results[0][0]["0.embed.weight"],
                                  results[1][0]["3.head.weight"])
