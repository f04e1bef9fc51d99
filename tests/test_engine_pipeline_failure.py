"""A failed Pipeline.step: every rank raises (no hang; a rank whose part
had finished raises StepFailed), no receive of the step is left posted,
every gradient is back to what it held before the step, and the same
Pipeline then trains exactly like sequential training, with and without a
dp axis, and with a tied weight."""
import types

import numpy as np
import pytest

import mesh
from engine import Pipeline, partition, schedules, with_optimizer_step
from engine.executor import split_microbatches, stages_for_rank
from engine.layers import mlp_stages, mse_loss, sgd
from engine.torch_stage import TorchStage, torch_loss
from test_engine_pipeline import (LR, SEED, STEPS, WIDTHS, _data, _reference, _tied_data,
                                  _tied_numpy, _tied_reference)


class _Boom(Exception):
    pass


class _Flaky:
    """A stage that raises in its ``fail_at``-th forward call while armed
    (its ``fail_at``-th backward with ``backward=True``)."""

    def __init__(self, stage, fail_at, backward=False):
        self.stage, self.fail_at, self.calls, self.on_backward = stage, fail_at, 0, backward

    def _count(self, backward):
        if backward == self.on_backward:
            self.calls += 1
            if self.calls == self.fail_at:
                raise _Boom("stage failed on purpose")

    def forward(self, x):
        self._count(False)
        return self.stage.forward(x)

    def backward(self, ctx, gy):
        self._count(True)
        return self.stage.backward(ctx, gy)

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
    at = {"stage": 2, "backward": m}.get(where, 0)      # backward: its last one
    stages = [_Flaky(s, at if fail and i == 0 else 0, where == "backward")
              for i, s in enumerate(mine)]
    pipe = Pipeline(topo, stages, sched, loss_fn=_flaky_loss(loss_state), timeout=30)

    def batch(step):
        x, y = _data(step)
        if dp is not None:
            x, y = split_microbatches(x, dp.size)[dp_index], split_microbatches(y, dp.size)[dp_index]
        return (x if pipe.first else None), (y if pipe.last else None)

    grads = [g for stage in mine for g in stage.grads()]
    for g in grads:
        g[...] = 0.25                     # held before the step: what it puts back
    error = None
    try:
        pipe.step(*batch(0))
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    left = [r.desc for r in world._t.inbox.matcher.posted()]
    assert all((g == 0.25).all() for g in grads), f"rank {world.rank}: not rolled back"
    for g in grads:
        g[...] = 0
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
    (1, "1f1b", 0, "backward"),       # the last action of the step: the rest had finished
])
def test_failed_step_raises_everywhere_and_the_pipeline_recovers(dp_size, name, fail_rank, where):
    world, m = 4, 4
    results = mesh.spawn(_worker, world, dp_size, name, m, fail_rank, where, timeout=90)
    pp_size = world // dp_size
    for r, (error, left, _, _) in enumerate(results):
        assert error is not None, f"rank {r}: the failed step did not raise"
        if r == fail_rank:
            assert error.startswith("_Boom"), error
        elif where == "backward":
            assert error.startswith("StepFailed") and "rolled back on every rank" in error \
                and f"rank {fail_rank} of" in error and "_Boom" in error, error
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
    assert not any(g.any() for g in mine.grads()), "the failed step was not rolled back"
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


def _torch_rollback_worker(world):
    """pp=2, torch stages, 1F1B: rank 0 fails in its last backward, after
    rank 1 finished. Rank 0's gradients held 0.25 before the step, rank 1's
    were None: both come back so; the batch redone gives the sequential
    gradients (added to rank 0's 0.25)."""
    import torch
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 4) for _ in range(2)]
    whole = torch.nn.Sequential(*[torch.nn.Sequential(lin, torch.nn.Tanh()) for lin in layers])
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    ref = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
                                for _ in range(2)])
    ref.load_state_dict(whole.state_dict())
    torch.nn.functional.mse_loss(ref(x), y).backward()
    mine = whole[world.rank]
    for p in mine.parameters():
        p.grad = torch.full_like(p, 0.25) if world.rank == 0 else None
    stage = TorchStage(mine)
    if world.rank == 0:
        stage.backward = _Flaky(types.SimpleNamespace(backward=stage.backward), 4,
                                backward=True).backward
    else:
        for p in mine.parameters():
            p.grad = None           # TorchStage made zeros; a zero_grad() would undo that
    pipe = Pipeline(world, stage, schedules.by_name("1f1b", 2, 4),
                    loss_fn=torch_loss(torch.nn.functional.mse_loss), timeout=30)
    error = None
    try:
        pipe.step(x if pipe.first else None, y if pipe.last else None)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    held = [None if p.grad is None else float(p.grad.unique().item())
            if p.grad.unique().numel() == 1 else "other" for p in mine.parameters()]
    stage.backward = TorchStage.backward.__get__(stage)
    pipe.step(x if pipe.first else None, y if pipe.last else None)
    want = [p.grad + (0.25 if world.rank == 0 else 0) for p in ref[world.rank].parameters()]
    ok = all(torch.allclose(p.grad, w, atol=1e-6) for p, w in zip(mine.parameters(), want))
    return error, held, ok


def test_a_failed_torch_step_puts_the_gradients_back():
    pytest.importorskip("torch")
    (e0, held0, ok0), (e1, held1, ok1) = mesh.spawn(_torch_rollback_worker, 2, timeout=90)
    assert e0.startswith("_Boom"), e0
    assert e1.startswith("StepFailed") and "rank 0 of" in e1 and "_Boom" in e1, e1
    assert held0 == [0.25, 0.25] and held1 == [None, None], (held0, held1)
    assert ok0 and ok1


def _uncaught_worker(world):
    """Rank 0 fails in its last backward, after the others finished; nobody
    catches: the others' StepFailed must not pass for the root cause."""
    sched = schedules.by_name("1f1b", world.size, 4)
    (mine,) = stages_for_rank(mlp_stages(WIDTHS, sched.num_stages, SEED), sched, world.rank)
    stage = _Flaky(mine, 4 if world.rank == 0 else 0, backward=True)
    pipe = Pipeline(world, stage, sched, loss_fn=mse_loss, timeout=30)
    x, y = _data(0)
    pipe.step(x if pipe.first else None, y if pipe.last else None)


def test_the_rank_that_failed_is_the_root_cause():
    with pytest.raises(mesh.WorkerError) as failed:
        mesh.spawn(_uncaught_worker, 4, timeout=60)
    assert failed.value.rank == 0 and "_Boom" in str(failed.value), str(failed.value)


def _opt_worker(world):
    """1F1B with an OPT action per stage (the optimizer steps inside the
    step): rank 0 fails in its last backward, after rank 1's optimizer ran.
    Rank 1's weights come back to what they were before the step, so the
    two stages stay one model, and training then matches sequential."""
    sched = with_optimizer_step(schedules.by_name("1f1b", world.size, 4))
    (mine,) = stages_for_rank(mlp_stages(WIDTHS, sched.num_stages, SEED), sched, world.rank)
    stage = _Flaky(mine, 4 if world.rank == 0 else 0, backward=True)
    ran = []

    class Optimizer:
        """SGD with a state of its own (its step count), put back too."""
        calls = 0

        def __call__(self, s):
            ran.append(1)
            self.calls += 1
            sgd([s], LR)

        def state_dict(self):
            return {"calls": [self.calls]}

        def load_state_dict(self, state):
            self.calls = state["calls"][0]
    optimizer = Optimizer()
    pipe = Pipeline(world, stage, sched, loss_fn=mse_loss, optimizer=optimizer, timeout=30)
    before = [p.copy() for p in mine.params()]
    x, y = _data(0)
    error = None
    try:
        pipe.step(x if pipe.first else None, y if pipe.last else None)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    kept = all((p == b).all() for p, b in zip(mine.params(), before))
    zero = all(not g.any() for g in mine.grads())
    stepped = (len(ran), optimizer.calls)
    losses = []
    for step in range(STEPS):
        x, y = _data(step)
        losses.append(pipe.step(x if pipe.first else None, y if pipe.last else None))
    assert optimizer.calls == STEPS
    return error, stepped, kept, zero, [p.copy() for p in mine.params()], losses


def test_a_failed_step_undoes_an_optimizer_that_ran():
    results = mesh.spawn(_opt_worker, 2, timeout=90)
    (e0, stepped0, kept0, zero0, p0, _), (e1, stepped1, kept1, zero1, p1, losses) = results
    assert e0.startswith("_Boom"), e0
    assert e1.startswith("StepFailed") and "rank 0 of" in e1, e1
    # rank 1's optimizer ran in the failed step, and its state came back
    assert (stepped0, stepped1) == ((0, 0), (1, 0)), (stepped0, stepped1)
    assert kept0 and kept1 and zero0 and zero1
    ref_params, ref_losses = _reference(STEPS)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-10)
    for a, b in zip(p0 + p1, ref_params, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def _extra_step_worker(world):
    sched = schedules.one_f_one_b(2, 2)
    mine = stages_for_rank(mlp_stages([3, 4, 2], sched.num_stages, 0), sched, world.rank)
    pipe = Pipeline(world, mine, sched, loss_fn=mse_loss, timeout=3)
    x, y = np.ones((4, 3)), np.ones((4, 2))
    for _ in range(3 if world.rank == 0 else 2):   # rank 0 runs one step more
        try:
            pipe.step(x if pipe.first else None, y if pipe.last else None)
        except mesh.MeshError as e:
            return type(e).__name__, str(e)
    return None


def test_a_step_left_waiting_names_the_step_and_the_stage_not_only_a_tag():
    """A rank that runs a step its peer never runs fails (its peer leaves:
    a lost peer) naming the step, the action and the stage it waited for,
    not only an internal tag; the error keeps its class."""
    kind, text = mesh.spawn(_extra_step_worker, 2, timeout=60)[0]
    assert kind in ("LostPeerError", "MeshTimeoutError"), text
    assert text.startswith("rank 0: pipeline step 2 (1f1b"), text
    assert "0RECV_B0: stage 0 waits for stage 1's gradient of micro-batch 0 from pp rank 1" in text


def _aborted_receive_worker(world):
    sched = schedules.one_f_one_b(2, 2)
    mine = stages_for_rank(mlp_stages([3, 4, 2], sched.num_stages, 0), sched, world.rank)
    pipe = Pipeline(world, mine, sched, loss_fn=_flaky_loss({"calls": 0, "fail_at": 1})
                    if world.rank == 1 else mse_loss, timeout=30)
    x, y = np.ones((4, 3)), np.ones((4, 2))
    try:
        pipe.step(x if pipe.first else None, y if pipe.last else None)
    except Exception as e:
        return type(e).__name__, getattr(e, "from_abort", False), str(e)
    return None


def test_a_receive_aborted_by_the_rank_that_failed_still_says_it_is_not_the_cause():
    """Its error, told again naming the step and the stage it waited for,
    lost from_abort (another rank's failure, not this one's own)."""
    (kind, secondary, text), (own, _, _) = mesh.spawn(_aborted_receive_worker, 2, timeout=60)
    assert own == "_Boom" and kind == "MeshError" and secondary, (kind, secondary, text)
    assert text.startswith("rank 0: pipeline step 0 (1f1b"), text
