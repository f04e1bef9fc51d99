"""A failed Pipeline.step: every rank that waits on the failure raises (no
hang), no receive of the step is left posted, and the same Pipeline then
trains exactly like sequential training, with and without a dp axis, and
with a tied weight."""
import numpy as np
import pytest

import mesh
from engine import Pipeline, partition, schedules
from engine.executor import split_microbatches, stages_for_rank
from engine.layers import mlp_stages, mse_loss, sgd
from test_engine_pipeline import (LR, SEED, STEPS, WIDTHS, _data, _reference, _tied_data,
                                  _tied_numpy, _tied_reference)


class _Boom(Exception):
    pass


class _Flaky:
    """A stage that raises in its ``fail_at``-th forward call while armed."""

    def __init__(self, stage, fail_at):
        self.stage, self.fail_at, self.calls = stage, fail_at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise _Boom("stage failed on purpose")
        return self.stage.forward(x)

    def __getattr__(self, name):
        return getattr(self.stage, name)


def _flaky_loss(state):
    def loss_fn(y, target):
        state["calls"] += 1
        if state["calls"] == state["fail_at"]:
            raise _Boom("loss failed on purpose")
        return mse_loss(y, target)
    return loss_fn


def _worker(world, dp_size, name, m, fail_rank, where):
    if dp_size == 1:
        topo, pp, dp, dp_index = world, world, None, 0
    else:
        topo = mesh.grid(world, dp=dp_size, pp=world.size // dp_size)
        pp, dp, dp_index = topo.group("pp"), topo.group("dp"), topo.coord("dp")
    sched = schedules.by_name(name, pp.size, m, chunks=2)
    mine = stages_for_rank(mlp_stages(WIDTHS, sched.num_stages, SEED), sched, pp.rank)
    fail = world.rank == fail_rank
    loss_state = {"calls": 0, "fail_at": 2 if fail and where == "loss" else 0}
    stages = [_Flaky(s, 2 if fail and where == "stage" and i == 0 else 0)
              for i, s in enumerate(mine)]
    pipe = Pipeline(topo, stages, sched, loss_fn=_flaky_loss(loss_state), timeout=30)

    def batch(step):
        x, y = _data(step)
        if dp is not None:
            x, y = split_microbatches(x, dp.size)[dp_index], split_microbatches(y, dp.size)[dp_index]
        return (x if pipe.first else None), (y if pipe.last else None)

    error = None
    try:
        pipe.step(*batch(0))
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    left = [r.desc for r in world._t.inbox.matcher.posted()]
    for g in (g for stage in mine for g in stage.grads()):
        g[...] = 0                        # the failed step's partial gradients
    losses = []
    for step in range(STEPS):
        losses.append(pipe.step(*batch(step)))
        sgd(mine, LR)
    params = {s: [p.copy() for p in stage.params()] for s, stage in pipe.stages.items()}
    return error, left, params, losses


@pytest.mark.parametrize("dp_size,name,fail_rank,where", [
    (1, "1f1b", 3, "stage"),          # the last stage fails: everyone waits for its gradients
    (1, "interleaved", 0, "stage"),   # the first rank fails: the rest wait for activations
    (2, "1f1b", 1, "loss"),           # dp replica 0 fails; replica 1 learns it in the all-reduce
])
def test_failed_step_raises_everywhere_and_the_pipeline_recovers(dp_size, name, fail_rank, where):
    world, m = 4, 4
    results = mesh.spawn(_worker, world, dp_size, name, m, fail_rank, where, timeout=90)
    pp_size = world // dp_size
    for r, (error, left, _, _) in enumerate(results):
        assert error is not None, f"rank {r}: the failed step did not raise"
        if r == fail_rank:
            assert error.startswith("_Boom"), error
        else:
            assert "aborted" in error and "step 0 failed on pp rank" in error, error
        assert left == [], f"rank {r}: receives left posted: {left}"
    ref_params, ref_losses = _reference(STEPS)
    for d in range(dp_size):
        got = {}
        for r in range(pp_size):
            _, _, params, losses = results[d * pp_size + r]
            got.update(params)
            if r == pp_size - 1:
                np.testing.assert_allclose(losses, ref_losses, rtol=1e-10)
        flat = [p for s in sorted(got) for p in got[s]]
        for a, b in zip(flat, ref_params, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


class _FlakyWeight(_Flaky):
    """Raises in its ``fail_at``-th backward_weight: after its last send."""

    def forward(self, x):
        return self.stage.forward(x)

    def backward_weight(self, wctx):
        self.calls += 1
        if self.calls == self.fail_at:
            raise _Boom("weight gradient failed on purpose")
        return self.stage.backward_weight(wctx)


def _tied_failure_worker(world):
    """ZB-H1 on 2 ranks, a weight tied between stage 0 and stage 1: rank 1
    fails in its last W, when rank 0 is already summing the tied gradient."""
    sched, m = schedules.zero_bubble_h1(2, 4), 4
    parts = partition(_tied_numpy(), 2, [3, 4])
    (mine,) = stages_for_rank(parts, sched, world.rank)
    stage = _FlakyWeight(mine, m if world.rank == 1 else 0)
    stage.tied = mine.tied
    pipe = Pipeline(world, stage, sched, loss_fn=mse_loss, timeout=30)
    error = None
    try:
        x, y = _tied_data(0)
        pipe.step(x if pipe.first else None, y if pipe.last else None)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    for g in mine.grads():
        g[...] = 0
    for step in range(STEPS):
        x, y = _tied_data(step)
        pipe.step(x if pipe.first else None, y if pipe.last else None)
        sgd([mine], LR)
    return error, mine.params()[0 if world.rank == 0 else -2]


def test_failed_step_aborts_the_tied_gradient_sum():
    results = mesh.spawn(_tied_failure_worker, 2, timeout=90)
    assert results[1][0].startswith("_Boom"), results[1][0]
    assert "aborted" in results[0][0] and "step 0 failed on pp rank 1" in results[0][0], \
        results[0][0]
    want = _tied_reference()
    for _, weight in results:
        np.testing.assert_allclose(weight, want, rtol=1e-10)
