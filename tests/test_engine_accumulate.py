"""Gradient accumulation: ``step()`` twice before the optimizer (or no
``zero_grad()`` between steps) leaves each gradient holding the sum of the
two steps' gradients of the global batch, as torch's ``.grad +=`` does in
one process, at every layout: tied weights over pp (the copies' sum counts
what they held once), sequence-parallel norms over tp (their sum over the
group counts it once), dp averaging this step's gradients only. The second
step's loss is per-token (engine.per_token: each micro-batch's sum over the
targets it counts, -100 elsewhere, and their count), scaled at its end by
the step's count over every replica, which covers its own gradients only.

One spawn of four ranks runs dp=2 x pp=2 with the embedding and the head
tied, then dp=2 x tp=2 under sequence parallelism.
"""
import numpy as np
import pytest

import mesh

ROWS, STEPS = 8, 2


def _data(step):
    """Step 1's targets are -100 where not counted (each row's first, and
    others): a different number in each micro-batch (2 rows) of each
    replica (every other row)."""
    import tp_models
    x, y = tp_models.tokens(300 + step, ROWS)
    if step == 1:
        y[np.random.default_rng(7).random(y.shape) < 0.3] = -100
        y[:, 0] = -100
    return x, y


def _ce(y, t):
    """Step 0's loss: the mean (scaled after the call: not read as a cross
    entropy, engine.per_token_call); step 1's (t holds a -100): per-token,
    Megatron-core's (sum, count, reports)."""
    import torch

    import tp_models
    if not bool((t == -100).any()):
        return 1.0 * tp_models.cross_entropy(y, t)
    return (torch.nn.functional.cross_entropy(y.reshape(-1, y.shape[-1]), t.reshape(-1),
                                              reduction="sum"), (t != -100).sum(),
            {"tokens": (t != -100).sum()})


def _model(tied):
    import tp_models
    model = tp_models.model(3)
    if tied:                   # the head's weight is the embedding's (8 x 8)
        model[-1].head.weight = model[0].embed.weight
    return model


def _reference(tied):
    """One process: STEPS backward passes on the whole batches, no zero_grad."""
    import torch

    import tp_models
    model = _model(tied)
    for step in range(STEPS):
        x, y = (torch.from_numpy(a) for a in _data(step))
        tp_models.cross_entropy(model(x), y).backward()     # (the mean over the counted)
    return {k: v.grad.numpy() for k, v in model.state_dict(keep_vars=True).items()
            if v.grad is not None}


def _accumulated(job):
    """This rank's gradients, whole (gathered over tp), keyed as the model's."""
    from engine import gather_state_dict
    out = {}
    for s, st in zip(job.schedule.stages_of(job.pipeline.rank), job.stages):
        grads = (gather_state_dict(st.module, grads=True) if job.sharded else
                 {n: p.grad for n, p in st.module.named_parameters()})
        for n, g in grads.items():
            j, _, rest = n.partition(".")
            out[f"{job.names[job.first[s] + int(j)]}.{rest}"] = g.numpy().copy()
    return out


def _worker(world):
    import torch

    import engine
    import tp_models
    torch.set_num_threads(1)
    out = {}
    for name, axes, plan, tied in [("tied", {"dp": 2, "pp": 2}, None, True),
                                   ("sequence", {"dp": 2, "pp": 1, "tp": 2},
                                    tp_models.SEQUENCE, False)]:
        grid = mesh.grid(world, **axes)
        d = grid.coord("dp")
        job = engine.distribute(_model(tied), grid, plan=plan, schedule="1f1b",
                                microbatches=2, balance="uniform", loss_fn=_ce,
                                verbose=False, overhead=0.0, timeout=60)
        reports = []
        for step in range(STEPS):        # no zero_grad between them
            x, y = (a[d::2] for a in _data(step))
            job.step(x, y)
            reports.append(job.reports)
        out[name] = _accumulated(job)
        out[name + " reports"] = reports
    return out


@pytest.mark.timeout(200)
def test_accumulated_steps_equal_one_process_at_dp2():
    pytest.importorskip("torch")
    results = mesh.spawn(_worker, 4, timeout=180)
    counted = float((_data(1)[1] != -100).sum())
    for name, tied in [("tied", True), ("sequence", False)]:
        want = _reference(tied)
        seen = set()
        for r, res in enumerate(results):
            # job.reports: step 1's one-value report averaged over its micro-batches and dp
            # replicas (2 x 2) as Megatron's loop averages it, on every rank
            assert res[name + " reports"][0] == {}, res[name + " reports"]
            assert res[name + " reports"][1]["tokens"].item() == pytest.approx(counted / 4), \
                res[name + " reports"]
            for k, g in res[name].items():
                np.testing.assert_allclose(g, want[k], rtol=1e-4, atol=1e-6,
                                           err_msg=f"{name}: rank {r} {k}")
                seen.add(k)
        assert seen == set(want), (name, sorted(set(want) - seen))
