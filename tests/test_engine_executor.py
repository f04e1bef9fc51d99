"""The executor in one process: pipelines of one rank hand activations over
locally, so the whole step, its scaling, its checks and its trace run
without the mesh."""
import json

import numpy as np
import pytest

from engine import Pipeline, Schedule, schedules
from engine import trace as tr
from engine.executor import split_microbatches
from engine.layers import Linear, ReLU, Sequential, Tanh, mlp_stages, mse_loss, sgd
from engine.lower import with_grad_sync
from engine.show import main as show_main


class _Solo:
    """A one-rank group: all a single-rank pipeline ever asks of it."""
    rank, size = 0, 1


def _reference_grads(widths, seed, x, y):
    model = Sequential(*mlp_stages(widths, 1, seed)[0].layers)
    out, ctx = model.forward(x)
    loss, gy = mse_loss(out, y)
    model.backward(ctx, gy)
    return loss, model.grads()


@pytest.mark.parametrize("sched", [
    schedules.interleaved_1f1b(1, 4, 3),
    schedules.zero_bubble_h1(1, 5),
    schedules.zero_bubble_h2(1, 4),
    schedules.zb_v(1, 3),
    Schedule.build([["0F0", "1F0", "0F1", "1F1", "1B0", "0B0", "1B1", "0B1"]], 2, [0, 0]),
], ids=lambda s: s.name)
def test_local_stages_match_full_batch_gradients(sched):
    widths = [4, 6, 5, 3]
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((11, 4)), rng.standard_normal((11, 3))
    stages = mlp_stages(widths, sched.num_stages, seed=5)
    pipe = Pipeline(_Solo(), stages, sched, loss_fn=mse_loss)
    loss = pipe.step(x, y)
    ref_loss, ref_grads = _reference_grads(widths, 5, x, y)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    got = [g for s in stages for g in s.grads()]
    for a, b in zip(got, ref_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def _masked_mse(out, target):
    """A pair loss of a tuple of targets: values and a weight per row."""
    y, w = target
    d = out - y
    return float((d ** 2 * w).mean()), 2 * d * w / d.size


def test_tuple_targets_weigh_each_micro_batch_by_its_rows():
    """Targets given as a tuple (values and a mask) weigh micro-batches of
    2 and 3 rows by their rows, as one process's mean: they were weighed by
    their parts' count (len of the tuple), alike, the loss and every
    gradient off without a word."""
    widths = [4, 6, 3]
    rng = np.random.default_rng(2)
    x, y, w = rng.standard_normal((5, 4)), rng.standard_normal((5, 3)), rng.random((5, 1))
    model = Sequential(*mlp_stages(widths, 1, seed=5)[0].layers)
    out, ctx = model.forward(x)
    ref_loss, gy = _masked_mse(out, (y, w))
    model.backward(ctx, gy)
    for sched in (schedules.interleaved_1f1b(1, 2, 2), schedules.zb_v(1, 2)):
        stages = mlp_stages(widths, 2, seed=5)
        pipe = Pipeline(_Solo(), stages, sched, loss_fn=_masked_mse)
        assert pipe.step(x, (y, w)) == pytest.approx(ref_loss, rel=1e-12)
        got = [g for s in stages for g in s.grads()]
        for a, b in zip(got, model.grads(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14, err_msg=sched.name)
        assert pipe.eval_step(x, (y, w)) == pytest.approx(ref_loss, rel=1e-12)


def test_a_schedule_naming_its_all_reduces_runs_without_a_dp_axis():
    """A schedule with AR actions (a dp pipeline's ``.schedule``, or
    ``with_grad_sync``'s) on a group of one replica: an average over one
    is the gradient as it is. It failed on a bare AssertionError."""
    widths = [4, 6, 5, 3]
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((7, 4)), rng.standard_normal((7, 3))
    sched = with_grad_sync(schedules.zero_bubble_h1(1, 3))
    assert "0AR" in [str(a) for a in sched.ranks[0]]
    stages = mlp_stages(widths, 1, seed=5)
    pipe = Pipeline(_Solo(), stages, sched, loss_fn=mse_loss)
    ref_loss, ref_grads = _reference_grads(widths, 5, x, y)
    assert pipe.step(x, y) == pytest.approx(ref_loss, rel=1e-12)
    for a, b in zip(stages[0].grads(), ref_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_step_adds_to_existing_gradients_and_shapes_may_change():
    stages = mlp_stages([3, 4, 2], 2, seed=1)
    pipe = Pipeline(_Solo(), stages, Schedule.build([["0F0", "1F0", "1B0", "0B0"]], 1, [0, 0]),
                    loss_fn=mse_loss)
    for g in stages[0].grads():
        g[...] = 1.0
    x, y = np.ones((2, 3)), np.zeros((2, 2))
    pipe.step(x, y)
    first = [g.copy() for g in stages[0].grads()]
    sgd(stages, 0.0)
    pipe.step(x, y)
    for a, b in zip(first, stages[0].grads()):
        np.testing.assert_allclose(a - 1.0, b, rtol=1e-12)
    pipe.step(np.ones((5, 3)), np.zeros((5, 2)))


def test_optimizer_runs_at_opt_actions():
    seen = []
    sched = Schedule.build([["0F0", "0B0", "0OPT"]], 1, [0])
    stage = Sequential(Linear(2, 2), ReLU())
    Pipeline(_Solo(), stage, sched, loss_fn=mse_loss, optimizer=seen.append).step(
        np.ones((1, 2)), np.ones((1, 2)))
    assert seen == [stage]
    with pytest.raises(ValueError, match="optimizer="):
        Pipeline(_Solo(), stage, sched, loss_fn=mse_loss)


@pytest.mark.timeout(30)
def test_an_optimizer_for_a_schedule_without_opt_actions_is_refused():
    """``optimizer(stage)`` runs at OPT actions only: given with a schedule
    that has none (README's StepAt with a built-in schedule), it never ran
    and the weights never changed, without a word. Now refused, naming
    engine.with_optimizer_step."""
    seen = []
    stage = Sequential(Linear(2, 2), ReLU())
    with pytest.raises(ValueError, match=r"pp rank 0: .*'1f1b\(1,2\)' has no OPT actions.*"
                       r"with_optimizer_step"):
        Pipeline(_Solo(), stage, schedules.one_f_one_b(1, 2), loss_fn=mse_loss,
                 optimizer=seen.append)
    from engine import with_optimizer_step
    Pipeline(_Solo(), stage, with_optimizer_step(schedules.one_f_one_b(1, 2)),
             loss_fn=mse_loss, optimizer=seen.append).step(np.ones((2, 2)), np.ones((2, 2)))
    assert seen == [stage]


@pytest.mark.timeout(30)
def test_an_optimizer_stepping_every_stage_at_each_opt_action_is_refused():
    """OPT actions call ``optimizer(stage)`` once per stage: on a rank
    holding two (ZB-V, interleaved) an optimizer over all the rank's
    weights (README's StepAt once was: ``opt.step()`` at each call) stepped
    them twice a step, silently. Now refused, the weights rolled back; one
    that steps the stage it is given trains as one process."""
    from engine import with_optimizer_step
    sched = with_optimizer_step(schedules.zb_v(1, 2))      # stages 0 and 1 on the one rank
    widths = [3, 4, 5, 2]
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    stages = mlp_stages(widths, 2, seed=4)
    before = [p.copy() for st in stages for p in st.params()]
    pipe = Pipeline(_Solo(), stages, sched, loss_fn=mse_loss,
                    optimizer=lambda stage: sgd(stages, 0.1))
    with pytest.raises(ValueError, match=r"pp rank 0: pipeline step 0 \(zb_v\(1,2\)\), 0OPT: "
                       r"optimizer\(stage 0\) changed the weights of stage 1 too"):
        pipe.step(x, y)
    for a, b in zip((p for st in stages for p in st.params()), before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not any(g.any() for st in stages for g in st.grads())
    stages = mlp_stages(widths, 2, seed=4)
    Pipeline(_Solo(), stages, sched, loss_fn=mse_loss,
             optimizer=lambda stage: sgd([stage], 0.1)).step(x, y)
    model = Sequential(*mlp_stages(widths, 1, seed=4)[0].layers)
    out, ctx = model.forward(x)
    model.backward(ctx, mse_loss(out, y)[1])
    sgd([model], 0.1)
    for a, b in zip((p for st in stages for p in st.params()), model.params(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_construction_errors():
    one = schedules.one_f_one_b(1, 2)
    stage = Sequential(Linear(2, 2))
    with pytest.raises(ValueError, match=r"pp rank 0: schedule '1f1b\(2,2\)' has 2 ranks but "
                       r"the pipeline group has 1: make it for pp=1"):
        Pipeline(_Solo(), stage, schedules.one_f_one_b(2, 2), loss_fn=mse_loss)
    with pytest.raises(ValueError, match="stage object"):
        Pipeline(_Solo(), [stage, stage], one, loss_fn=mse_loss)
    with pytest.raises(ValueError, match="loss_fn"):
        Pipeline(_Solo(), stage, one)

    class ForwardBackwardOnly:
        def forward(self, x):
            return x, None

        def backward(self, ctx, gy):
            return gy

    with pytest.raises(TypeError, match="backward_input"):
        Pipeline(_Solo(), ForwardBackwardOnly(), schedules.zero_bubble_h1(1, 2), loss_fn=mse_loss)
    pipe = Pipeline(_Solo(), stage, one, loss_fn=mse_loss)
    with pytest.raises(ValueError, match="needs inputs"):
        pipe.step(None, np.ones((2, 2)))
    with pytest.raises(ValueError, match="cannot be cut"):
        pipe.step(np.ones((1, 2)), np.ones((1, 2)))


def test_split_microbatches():
    parts = split_microbatches(np.arange(10), 4)
    assert [len(p) for p in parts] == [2, 3, 2, 3]
    assert np.concatenate(parts).tolist() == list(range(10))


def test_layers_split_backward_equals_full_backward():
    rng = np.random.default_rng(0)
    a = Sequential(Linear(3, 4, np.random.default_rng(1)), Tanh(), Linear(4, 2, np.random.default_rng(2)))
    b = Sequential(Linear(3, 4, np.random.default_rng(1)), Tanh(), Linear(4, 2, np.random.default_rng(2)))
    x, gy = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    gx_full = a.backward(a.forward(x)[1], gy)
    gx_split, wctx = b.backward_input(b.forward(x)[1], gy)
    assert all(not g.any() for g in b.grads())
    b.backward_weight(wctx)
    np.testing.assert_allclose(gx_full, gx_split)
    for ga, gb in zip(a.grads(), b.grads()):
        np.testing.assert_allclose(ga, gb)


def test_linear_backward_against_finite_differences():
    rng = np.random.default_rng(4)
    layer = Sequential(Linear(3, 2, rng), Tanh())
    x, t = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    y, ctx = layer.forward(x)
    _, gy = mse_loss(y, t)
    gx = layer.backward(ctx, gy)
    eps = 1e-6
    num = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        num[idx] = (mse_loss(layer.forward(xp)[0], t)[0] - mse_loss(layer.forward(xm)[0], t)[0]) / (2 * eps)
    np.testing.assert_allclose(gx, num, rtol=1e-6, atol=1e-9)


def test_trace_of_a_local_step(tmp_path, capsys):
    stages = mlp_stages([3, 4, 2], 2, seed=1)
    sched = schedules.interleaved_1f1b(1, 2, 2)
    pipe = Pipeline(_Solo(), stages, sched, loss_fn=mse_loss)
    pipe.step(np.ones((4, 3)), np.zeros((4, 2)))
    data = pipe.trace(costs={"F": 1e-3, "B": 2e-3})
    slices = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert [e["name"] for e in slices] == [str(a) for a in pipe.program]
    assert all(e["dur"] >= 0 for e in slices)
    assert slices == sorted(slices, key=lambda e: e["ts"])
    assert data["otherData"]["predicted_makespan_ms"] == pytest.approx(12.0)
    path = pipe.write_trace(str(tmp_path / "t.trace.json"), costs={"F": 1e-3, "B": 2e-3})
    assert json.load(open(path))["traceEvents"]
    assert show_main([path]) == 0
    out = capsys.readouterr().out
    assert "measured bubble" in out and "measured/predicted" in out
    assert show_main([path, "--grid"]) == 0
    assert "dp0 pp0 | 0F0" in capsys.readouterr().out


def test_chrome_trace_flow_arrows_pair_up():
    ranks = [
        {"dp": 0, "pp": 0, "events": [["0F0", "F", 1000, 2000, "", 0],
                                      ["0SEND_F0", "SEND_F", 2000, 2100, "s", 7]]},
        {"dp": 0, "pp": 1, "events": [["1RECV_F0", "RECV_F", 1500, 2600, "f", 7],
                                      ["1F0", "F", 2600, 3600, "", 0]]},
    ]
    data = tr.chrome_trace(ranks)
    flows = [e for e in data["traceEvents"] if e["ph"] in ("s", "f")]
    assert [(e["ph"], e["id"], e["tid"]) for e in flows] == [("s", 7, 0), ("f", 7, 1)]
    assert flows[0]["ts"] == 1.0 and flows[1]["ts"] < 1.6
    span, bubble = tr.measured(data)
    assert span == pytest.approx(2.6)
    assert bubble == pytest.approx(1 - 2.0 / 5.2)
    assert tr.flow_id(1, "B", 2, 3, 4, 5) != tr.flow_id(0, "B", 2, 3, 4, 5)


def _simulated_rows(sched, costs_ms, dp, offset_ms):
    """Trace rows of a step that runs exactly as the simulator says, for one
    dp replica whose clock starts ``offset_ms`` late."""
    rep = sched.simulate(costs_ms)
    rows = {}
    for e in rep.events:
        rows.setdefault(e.rank, []).append(
            [str(e.action), e.action.kind, int((e.start + offset_ms) * 1e6),
             int((e.end + offset_ms) * 1e6), "", 0])
    return [{"dp": dp, "pp": r, "events": ev} for r, ev in sorted(rows.items())]


def test_measured_bubble_is_the_simulators_per_replica():
    """A step that runs as simulated measures the simulator's bubble, even
    with replicas out of step; the summary sets it beside the simulator's
    at the trace's own compute times."""
    sched = schedules.one_f_one_b(2, 4)
    costs = {"F": 1.0, "B": 2.0}
    lowered = sched.validate()
    ranks = _simulated_rows(sched, costs, 0, 0.0) + _simulated_rows(sched, costs, 1, 7.0)
    data = tr.chrome_trace(ranks, {"schedule": lowered.to_dict()})
    span, bubble = tr.measured(data)
    assert span == pytest.approx(15e3)
    assert bubble == pytest.approx(0.2)
    assert tr.compute_costs(data) == pytest.approx({"F": 1e3, "B": 2e3})
    sim = tr.simulated(data)
    assert sim is not None and sim.bubble == pytest.approx(0.2)
    out = tr.summarize_trace(data)
    assert "measured bubble 20.0%" in out and "bubble 20.0%; communication and overhead " \
        "make the step 1.0x longer" in out
