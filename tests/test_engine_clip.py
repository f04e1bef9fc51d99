"""``job.clip_grad_norm_``: the global gradient norm of the one-process
model (torch's ``clip_grad_norm_`` on it), the same on every rank, over
pipeline stages and tensor-parallel shards, each tied parameter and each
tp-replicated one (a sequence-parallel norm's) counted once, dp replicas
not multiplying it; every gradient scaled alike, so tied copies stay equal.

One spawn of four ranks: dp=2 x pp=2 and pp=2 x tp=2 (sequence parallel),
both with the embedding and the head tied.
"""
import math

import numpy as np
import pytest

import mesh

ROWS = 8
MAX_NORM = 0.05          # well under the gradients' norm: they are clipped


def _data():
    import tp_models
    rng = np.random.default_rng(700)
    return (rng.integers(0, tp_models.VOCAB, (ROWS, tp_models.SEQ)),
            rng.integers(0, tp_models.VOCAB, (ROWS, tp_models.SEQ)))


def _ce(y, t):
    import torch
    return torch.nn.functional.cross_entropy(y.reshape(-1, y.shape[-1]), t.reshape(-1))


def _model():
    import tp_models
    model = tp_models.model(9)
    model[-1].head.weight = model[0].embed.weight
    return model


def _reference():
    import torch
    model = _model()
    x, y = (torch.from_numpy(a) for a in _data())
    _ce(model(x), y).backward()
    params = list(model.parameters())
    inf = torch.nn.utils.clip_grad_norm_(params, 1e9, math.inf).item()
    two = torch.nn.utils.clip_grad_norm_(params, MAX_NORM).item()
    grads = {k: v.grad.numpy() for k, v in model.state_dict(keep_vars=True).items()
             if v.grad is not None}
    return inf, two, grads


def _worker(world):
    import torch

    import engine
    import tp_models
    from engine import gather_state_dict
    torch.set_num_threads(1)
    out = {}
    for name, axes, plan in [("dp2 x pp2", {"dp": 2, "pp": 2}, None),
                             ("pp2 x tp2", {"pp": 2, "tp": 2}, tp_models.SEQUENCE)]:
        grid = mesh.grid(world, **axes)
        d, dp = (grid.coord("dp"), 2) if "dp" in axes else (0, 1)
        job = engine.distribute(_model(), grid, plan=plan, schedule="1f1b", microbatches=2,
                                balance="uniform", loss_fn=_ce, verbose=False, overhead=0.0,
                                timeout=60)
        x, y = (a[d::dp] for a in _data())
        job.step(x, y)
        inf = job.clip_grad_norm_(1e9, norm_type=math.inf)     # measured, nothing clipped
        two = job.clip_grad_norm_(MAX_NORM, error_if_nonfinite=True, foreach=True)
        # as torch's clip_grad_norm_ returns it: a 0-dim float32 tensor (norm.item() works)
        assert all(isinstance(n, torch.Tensor) and n.dim() == 0 and n.dtype == torch.float32
                   and bool(torch.isfinite(n)) for n in (inf, two)), (inf, two)
        inf, two = inf.item(), two.item()
        grads = {}
        for s, st in zip(job.schedule.stages_of(job.pipeline.rank), job.stages):
            whole = (gather_state_dict(st.module, grads=True) if job.sharded else
                     {n: p.grad for n, p in st.module.named_parameters()})
            for n, g in whole.items():
                j, _, rest = n.partition(".")
                grads[f"{job.names[job.first[s] + int(j)]}.{rest}"] = g.numpy().copy()
        out[name] = (inf, two, grads)
    return out


@pytest.mark.timeout(200)
def test_clip_grad_norm_is_the_one_process_models():
    pytest.importorskip("torch")
    results = mesh.spawn(_worker, 4, timeout=180)
    inf, two, want = _reference()
    for name in results[0]:
        # one all-reduce over the grid: bit for bit the same on every rank
        assert len({res[name][:2] for res in results}) == 1, (name, [r[name][:2] for r in results])
        got_inf, got_two, _ = results[0][name]
        assert got_inf == pytest.approx(inf, rel=1e-5), name
        assert got_two == pytest.approx(two, rel=1e-5), name
        assert two > MAX_NORM
        seen = set()
        for r, res in enumerate(results):
            for k, g in res[name][2].items():
                np.testing.assert_allclose(g, want[k], rtol=1e-4, atol=1e-7,
                                           err_msg=f"{name}: rank {r} {k}")
                seen.add(k)
        assert seen == set(want), (name, sorted(set(want) - seen))


NP_WIDTHS = [4, 8, 6, 8, 4]              # Linear 0, 4 colwise; 2, 6 rowwise (their bias whole)
NP_PLAN = {"0": "colwise", "2": "rowwise", "4": "colwise", "6": "rowwise"}


def _np_model():
    from engine.layers import Sequential, mlp_stages
    return Sequential(*mlp_stages(NP_WIDTHS, 1, 5)[0].layers)


def _np_data():
    rng = np.random.default_rng(710)
    return rng.standard_normal((ROWS, NP_WIDTHS[0])), rng.standard_normal((ROWS, NP_WIDTHS[-1]))


def _np_worker(world):
    import engine
    from engine.layers import mse_loss
    from engine.tp_layers import full_params
    grid = mesh.grid(world, pp=2, tp=2)
    job = engine.distribute(_np_model(), grid, plan=NP_PLAN, schedule="1f1b", microbatches=2,
                            balance="uniform", loss_fn=mse_loss, verbose=False, overhead=0.0,
                            timeout=60)
    job.step(*_np_data())
    norm = job.clip_grad_norm_(MAX_NORM / 10)
    assert type(norm) is float, norm        # (numpy stages: a float, as before)
    return norm, [g.tolist() for st in job.stages for g in full_params(st, grads=True)]


def test_clip_grad_norm_of_numpy_stages_counts_whole_biases_once():
    from engine.layers import mse_loss
    results = mesh.spawn(_np_worker, 4, timeout=120)
    model = _np_model()
    x, y = _np_data()
    out, ctx = model.forward(x)
    model.backward(ctx, mse_loss(out, y)[1])
    grads = model.grads()
    norm = float(np.sqrt(sum(float((g * g).sum()) for g in grads)))
    assert len({r[0] for r in results}) == 1, [r[0] for r in results]
    assert results[0][0] == pytest.approx(norm, rel=1e-12)
    scale = MAX_NORM / 10 / (norm + 1e-6)
    got = [np.array(g) for g in results[0][1] + results[2][1]]     # stage 0, then stage 1
    assert len(got) == len(grads)
    for a, b in zip(got, grads):
        np.testing.assert_allclose(a, b * scale, rtol=1e-10, atol=1e-14)
