"""``job.eval_step``: the schedule's forwards only, the loss of one
process's ``model.eval()`` on the global batch, no gradient touched, the
modules back in their own modes after; ``outputs=True`` also hands back the
last stage's outputs, the model's own (its logits as ``model(x)`` shapes
them, not the flattened view its loss reads). Training goes on after it
(its tags are a step's), and after a step called under
``torch.no_grad()``, which fails on every rank naming grad mode (the last
stage blamed the loss function).

One spawn of four ranks, the model a plain module computing its own loss
(traced, no ``loss_fn=``): dp=2 x pp=2 under ZB-V (two stages a rank, the
embedding and the head tied, a dropout that eval mode turns off; the
forward returns ``(logits, loss)``), and pp=2 x tp=2 (sequence parallel;
the loss alone).
"""
import numpy as np
import pytest

import mesh

ROWS = 8


def _data(step):
    import tp_models
    return tp_models.tokens(900 + step, ROWS)


def _model(dropout):
    import torch

    import tp_models
    model = tp_models.model(11)
    model[-1].head.weight = model[0].embed.weight
    if dropout:
        model = torch.nn.Sequential(model[0], torch.nn.Dropout(0.5), *model[1:])
    return tp_models.OwnLoss(model, pair=dropout)


def _reference(dropout):
    """One process: the loss and outputs of step 0's batch in eval mode
    (``model(x, y)``'s logits, where it returns them, are ``model(x)``)."""
    import torch
    model = _model(dropout).eval()
    x, y = (torch.from_numpy(a) for a in _data(0))
    with torch.no_grad():
        out, both = model(x), model(x, y)
        if dropout:
            assert torch.equal(both[0], out)
        return float(both[1] if dropout else both), out.numpy()


def _worker(world):
    import torch

    import engine
    import tp_models
    torch.set_num_threads(1)
    res = {}
    for name, axes, plan, sched in [("dp2 x pp2", {"dp": 2, "pp": 2}, None, "zb-v"),
                                    ("pp2 x tp2", {"pp": 2, "tp": 2}, tp_models.SEQUENCE,
                                     "1f1b")]:
        grid = mesh.grid(world, **axes)
        d, dp = (grid.coord("dp"), 2) if "dp" in axes else (0, 1)
        job = engine.distribute(_model(plan is None), grid, plan=plan, schedule=sched,
                                microbatches=2, balance="uniform", verbose=False,
                                overhead=0.0, timeout=60)
        x, y = (a[d::dp] for a in _data(1))
        job.step(x, y)                                  # gradients to keep
        held = [p.grad.clone() for p in job.parameters()]
        x, y = (a[d::dp] for a in _data(0))
        loss = job.eval_step(x, y)
        again, out = job.eval_step(x, y, outputs=True)
        nothing, out2 = job.eval_step(x, None, outputs=True)     # inference: no targets
        kept = all(torch.equal(p.grad, h) for p, h in zip(job.parameters(), held))
        modes = all(m.training for st in job.stages for m in st.module.modules())
        mixed = ""
        if dp == 2:             # targets on one replica only: every rank raises at once
            try:
                job.eval_step(x, y if d == 0 else None)
            except (ValueError, mesh.MeshError) as e:
                mixed = str(e)
        try:                    # a step under no_grad (an evaluation loop's habit)
            with torch.no_grad():
                job.step(x, y)
            nograd = "no error"
        except Exception as e:      # (the last stage's own message; others name its rank)
            nograd = str(e)
        after = job.step(x, y)                          # a training step still lines up
        res[name] = {"loss": loss, "again": again, "nothing": nothing, "kept": kept,
                     "modes": modes, "after": after, "last": job.pipeline.last, "mixed": mixed,
                     "nograd": nograd,
                     "out": None if out is None else out.numpy(),
                     "same": out is None or torch.equal(out, out2)}
    return res


@pytest.mark.timeout(200)
def test_eval_step_is_one_process_forward_in_eval_mode():
    pytest.importorskip("torch")
    results = mesh.spawn(_worker, 4, timeout=180)
    for name, dropout in [("dp2 x pp2", True), ("pp2 x tp2", False)]:
        want, want_out = _reference(dropout)
        dp = 2 if name.startswith("dp2") else 1
        for r, res in enumerate(results):
            got = res[name]
            assert got["kept"] and got["modes"] and got["same"], (name, r, got)
            assert dp == 1 or "1 of 2 dp replicas gave targets" in got["mixed"], (name, r, got)
            assert got["nothing"] is None, (name, r)
            assert got["nograd"] != "no error", (name, r)
            assert not got["last"] or "step() ran with grad mode off" in got["nograd"], (name, r)
            # the loss on every rank, the same float (the last stage's, averaged over dp)
            assert got["loss"] == pytest.approx(want, rel=1e-5), (name, r)
            assert got["loss"] == results[0][name]["loss"], (name, r)
            assert got["again"] == got["loss"], (name, r)
            assert got["after"] == results[0][name]["after"], (name, r)
            assert got["after"] is not None and np.isfinite(got["after"]), (name, r)
            if not got["last"]:
                assert got["out"] is None, (name, r)
                continue
            d = r // 2 if dp == 2 else 0           # world rank = dp * 2 + pp (+ tp)
            assert got["out"].shape == want_out[d::dp].shape, (name, r, got["out"].shape)
            np.testing.assert_allclose(got["out"], want_out[d::dp], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name} rank {r}")
