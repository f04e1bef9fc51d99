"""Every schedule trains exactly like sequential single-process training.

One spawn per topology runs all the schedules for a few SGD steps on a
tanh MLP (float64) and returns each rank's weights and losses; the parent
compares them with full-batch training of the same model on the same data
(the built-ins, and one schedule written by hand as a user would).
Batches are cut into micro-batches (and dp replicas) of unequal size on
purpose. The
two-rank spawn also trains a model with a weight tied between stages.
A per-token loss (a sum over the targets a mask counts, and their count:
engine.per_token) trains as one process's sum over every counted target
over their count, micro-batches and replicas counting different numbers;
its reports (Megatron-core's third item) are the step's sums on every rank.
"""
import functools

import numpy as np
import pytest

import mesh
from engine import Pipeline, partition, schedules
from engine.executor import split_microbatches, stages_for_rank
from engine.ir import Schedule
from engine import layers as L
from engine.layers import Sequential, mlp_stages, mse_loss, sgd

WIDTHS = [5, 8, 6, 7, 4, 6, 5, 3, 2]  # 8 Linear layers: splits into 2, 4 or 8 stages
ROWS, STEPS, LR, SEED = 22, 3, 0.1, 7
NAMES = ["gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zb-v", "hand"]


def _schedule(name, p, m):
    """A built-in, or "hand": one written as a user would, through Schedule.build,
    none of the built-ins' habits: stage s on rank p-1-s, backwards in reverse
    micro-batch order, B on odd stages and I then (all W's last) on even ones."""
    if name != "hand":
        return schedules.by_name(name, p, m, chunks=2)
    rows = [[] for _ in range(p)]
    for s in range(p):
        back = [f"{s}B{k}" for k in reversed(range(m))] if s % 2 else \
            [f"{s}I{k}" for k in reversed(range(m))] + [f"{s}W{k}" for k in range(m)]
        rows[p - 1 - s] = [f"{s}F{k}" for k in range(m)] + back
    return Schedule.build(rows, m, [p - 1 - s for s in range(p)], "hand")


def _data(step: int) -> tuple[np.ndarray, np.ndarray]:
    """A different batch size every step, odd: shapes are never negotiated,
    and two dp replicas get unequal halves (weighed by their rows)."""
    rng = np.random.default_rng(1000 + step)
    rows = ROWS + 1 + 2 * step
    return rng.standard_normal((rows, WIDTHS[0])), rng.standard_normal((rows, WIDTHS[-1]))


def _reference(steps: int) -> tuple[list[np.ndarray], list[float]]:
    model = Sequential(*mlp_stages(WIDTHS, 1, SEED)[0].layers)
    losses = []
    for step in range(steps):
        x, y = _data(step)
        out, ctx = model.forward(x)
        loss, gy = mse_loss(out, y)
        model.backward(ctx, gy)
        sgd([model], LR)
        losses.append(loss)
    return model.params(), losses


def _train(topo, pp, dp, dp_index, name, m, recompute=False, loss_fn=mse_loss, data=_data,
           reports=None):
    sched = _schedule(name, pp.size, m)
    stages = mlp_stages(WIDTHS, sched.num_stages, SEED)
    mine = stages_for_rank(stages, sched, pp.rank)
    pipe = Pipeline(topo, mine, sched, loss_fn=loss_fn, timeout=30, recompute=recompute)
    losses = []
    for step in range(STEPS):
        x, y = data(step)
        if dp is not None:
            x, y = split_microbatches(x, dp.size)[dp_index], split_microbatches(y, dp.size)[dp_index]
        if dp is not None:  # what grads() held before must survive the dp average
            for g in (g for stage in mine for g in stage.grads()):
                g[...] = dp_index + 1.0
        loss = pipe.step(x if pipe.first else None, y if pipe.last else None)
        if dp is not None:
            for g in (g for stage in mine for g in stage.grads()):
                g -= dp_index + 1.0
        sgd(mine, LR)
        losses.append(loss)
        if reports is not None:
            reports.append(pipe.reports)
    params = {s: [p.copy() for p in stage.params()] for s, stage in pipe.stages.items()}
    return params, losses, pipe.trace()


def _worker(world, dp_size, m):
    if dp_size == 1:
        topo, pp, dp, dp_index = world, world, None, 0
    else:
        topo = mesh.grid(world, dp=dp_size, pp=world.size // dp_size)
        pp, dp, dp_index = topo.group("pp"), topo.group("dp"), topo.coord("dp")
    legacy: list = []       # "hand" with Megatron's older reports (legacy_mse)
    out = {name: _train(topo, pp, dp, dp_index, name, m, reports=legacy if name == "hand"
                        else None, loss_fn=legacy_mse if name == "hand" else mse_loss)
           for name in NAMES}
    out["legacy reports"] = legacy
    out["counted"] = {}
    for name in COUNTED:
        reports: list = []
        out["counted"][name] = (*_train(topo, pp, dp, dp_index, name, m, data=_counted_data,
                                        loss_fn=reported_mse if name == "zb-v" else counted_mse,
                                        reports=reports)[:2], reports)
    if pp.size == 2:
        out["tied"] = _tied_worker(topo, pp, dp, dp_index)
        # recompute (engine.layers.Recompute): every stage, or stage 0 only
        out["recompute"] = {(name, str(way)): _train(topo, pp, dp, dp_index, name, m, way)[:2]
                            for name in ("1f1b", "interleaved", "zb-h1", "zb-v")
                            for way in (True, {0})}
    return out


def _check(results, pp_size, dp_size, m):
    ref_params, ref_losses = _reference(STEPS)
    for name in NAMES:
        sched = _schedule(name, pp_size, m)
        last = sched.rank_of(sched.num_stages - 1)
        for d in range(dp_size):
            got: dict[int, list[np.ndarray]] = {}
            for r in range(pp_size):
                params, losses, _ = results[d * pp_size + r][name]
                got.update(params)
                # every rank of every replica returns the step's loss, the same float
                # (the last stage's, averaged over dp: DeepSpeed's train_batch's)
                assert losses == results[last][name][1], (name, d, r)
                np.testing.assert_allclose(losses, ref_losses, rtol=1e-10,
                                           err_msg=f"{name}: loss")
            flat = [p for s in sorted(got) for p in got[s]]
            assert len(flat) == len(ref_params)
            for i, (a, b) in enumerate(zip(flat, ref_params)):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13,
                                           err_msg=f"{name}: parameter {i}, dp replica {d}")
        _check_trace(results, name, pp_size, dp_size)
    # "hand"'s reports (legacy_mse): averaged over every micro-batch of every replica, as
    # Megatron's training loop averages them, on every rank
    want = _legacy_reference(dp_size, m)
    for r, res in enumerate(results):
        assert [sorted(rep) for rep in res["legacy reports"]] == [["mse", "rows"]] * STEPS, r
        for step, (rep, (mse, rows)) in enumerate(zip(res["legacy reports"], want, strict=True)):
            assert type(rep["mse"]) is float and type(rep["rows"]) is float, rep
            np.testing.assert_allclose([rep["mse"], rep["rows"]], [mse, rows], rtol=1e-10,
                                       err_msg=f"rank {r}, step {step}")
    _check_counted(results, pp_size, dp_size, m)


def legacy_mse(y, target):
    """Megatron's older loss_func for numpy stages: the mean's (loss,
    gradient) and its reports after it, here the loss and the rows."""
    loss, gy = mse_loss(y, target)
    return loss, gy, {"mse": loss, "rows": len(y)}


def _legacy_reference(dp_size, m):
    """Each step's ``legacy_mse`` reports by Megatron's training loop: each
    micro-batch's values (``_data``'s, cut over dp, then into ``m``) averaged
    over the dp replicas and the micro-batches, each one alike, on one
    process trained as ``_reference``."""
    model = Sequential(*mlp_stages(WIDTHS, 1, SEED)[0].layers)
    out = []
    for step in range(STEPS):
        x, y = _data(step)
        seen = [(mse_loss(model.forward(a)[0], b)[0], len(a))
                for xd, yd in zip(split_microbatches(x, dp_size), split_microbatches(y, dp_size))
                for a, b in zip(split_microbatches(xd, m), split_microbatches(yd, m))]
        out.append(np.mean(seen, axis=0).tolist())
        pred, ctx = model.forward(x)
        model.backward(ctx, mse_loss(pred, y)[1])
        sgd([model], LR)
    return out


# -- a per-token loss (engine.per_token): sums over counted targets, and their counts --

COUNTED = ["gpipe", "zb-h2", "zb-v"]


def _counted_data(step):
    """``_data``'s batch, its targets with a mask of the elements counted,
    so each micro-batch and each dp replica counts another number of them
    (the first three rows none)."""
    x, y = _data(step)
    mask = (np.random.default_rng(2000 + step).random(y.shape) < 0.4).astype(float)
    mask[:3] = 0.0
    return x, (y, mask)


def counted_mse(y, target):
    """The squared error summed over the elements the mask counts, its
    gradient, and their count: a numpy per-token loss."""
    t, mask = target
    diff = (y - t) * mask
    return float((diff * diff).sum()), 2.0 * diff, float(mask.sum())


def reported_mse(y, target):
    """``counted_mse`` and its reports after the count (Megatron-core's
    third item): its sum and count, and minus its rows."""
    total, gy, count = counted_mse(y, target)
    return total, gy, count, {"sse": np.array([total, count]), "minus": -len(y)}


def _counted_reference():
    """One process: the sum over every counted element of the batch over
    their count; and each step's sum and count."""
    model = Sequential(*mlp_stages(WIDTHS, 1, SEED)[0].layers)
    losses, sums = [], []
    for step in range(STEPS):
        x, target = _counted_data(step)
        out, ctx = model.forward(x)
        total, gy, count = counted_mse(out, target)
        model.backward(ctx, gy / count)
        sgd([model], LR)
        losses.append(total / count)
        sums.append([total, count])
    return model.params(), losses, sums


def _check_counted(results, pp_size, dp_size, m):
    ref_params, ref_losses, ref_sums = _counted_reference()
    for name in COUNTED:
        last = _schedule(name, pp_size, m).rank_of(_schedule(name, pp_size, m).num_stages - 1)
        for d in range(dp_size):
            got: dict[int, list[np.ndarray]] = {}
            for r in range(pp_size):
                params, losses, reports = results[d * pp_size + r]["counted"][name]
                # zb-v's reports (reported_mse) as Megatron's loop logs them, on every rank
                # (the first step's laid out in the closing all-gather): [sum, count] summed
                # over micro-batches and replicas, then divided; one value averaged over them
                for step, rep in enumerate(reports):
                    if name != "zb-v":
                        assert rep == {}, rep
                        continue
                    assert rep.keys() == {"sse", "minus"}, rep
                    assert type(rep["sse"]) is float and type(rep["minus"]) is float, rep
                    np.testing.assert_allclose(rep["sse"], ref_losses[step], rtol=1e-10)
                    rows = len(_data(step)[0])
                    np.testing.assert_allclose(rep["minus"], -rows / (m * dp_size), rtol=1e-12)
                got.update(params)
                assert losses == results[last]["counted"][name][1], (name, d, r)
                np.testing.assert_allclose(losses, ref_losses, rtol=1e-10,
                                           err_msg=f"per-token {name}: loss")
            flat = [p for s in sorted(got) for p in got[s]]
            for i, (a, b) in enumerate(zip(flat, ref_params, strict=True)):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13,
                                           err_msg=f"per-token {name}: parameter {i}, "
                                                   f"dp replica {d}")


def _check_trace(results, name, pp_size, dp_size):
    """Rank 0 holds the merged trace; other ranks None. Every send has its
    arrow to a receive on the next or previous pp rank of the same replica."""
    assert all(results[r][name][2] is None for r in range(1, pp_size * dp_size))
    events = results[0][name][2]["traceEvents"]
    threads = {(e["pid"], e["tid"]) for e in events if e["ph"] == "X"}
    assert threads == {(d, r) for d in range(dp_size) for r in range(pp_size)}
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    assert starts and starts.keys() == ends.keys()
    for fid, s in starts.items():
        f = ends[fid]
        assert s["pid"] == f["pid"] and s["tid"] != f["tid"]


@pytest.mark.parametrize("pp_size,m", [(2, 4), (4, 8)])
def test_schedules_match_sequential_training(pp_size, m):
    results = mesh.spawn(_worker, pp_size, 1, m, timeout=90)
    _check(results, pp_size, 1, m)
    if pp_size == 2:
        _check_tied([r["tied"] for r in results])
        _check_recompute(results)


def test_dp2_pp2_matches_sequential_training():
    results = mesh.spawn(_worker, 4, 2, 4, timeout=90)
    _check(results, 2, 2, 4)
    _check_recompute(results)
    for d in range(2):
        _check_tied([r["tied"] for r in results[2 * d:2 * d + 2]])


def _check_recompute(results):
    """Stages that recompute their forward in the backward train bit for
    bit as stages that keep their activations (I/W split included)."""
    for r in results:
        assert len(r["recompute"]) == 8
        for (name, way), (params, losses) in r["recompute"].items():
            kept_params, kept_losses, _ = r[name]
            assert losses == kept_losses, (name, way)
            assert params.keys() == kept_params.keys()
            for s in params:
                for a, b in zip(params[s], kept_params[s]):
                    np.testing.assert_array_equal(a, b, err_msg=f"{name}, {way}: stage {s}")


# -- a weight tied between stages (partition unties it, the Pipeline keeps it) --

TIED = 3    # the tied model's width


def _tied_numpy():
    rng = np.random.default_rng(4)
    first, head = L.Linear(TIED, TIED, rng), L.Linear(TIED, TIED, rng)
    head.weight = first.weight
    return [first, L.Tanh(), L.Linear(TIED, TIED, rng), L.Tanh(), L.Linear(TIED, TIED, rng),
            L.Tanh(), head]


def _tied_data(step):
    rng = np.random.default_rng(70 + step)
    return rng.standard_normal((8, TIED)), rng.standard_normal((8, TIED))


def _tied_reference():
    """Sequential training; SGD subtracts each use's gradient from the one array."""
    model = L.Sequential(*_tied_numpy())
    for step in range(STEPS):
        x, y = _tied_data(step)
        out, ctx = model.forward(x)
        model.backward(ctx, L.mse_loss(out, y)[1])
        L.sgd([model], LR)
    return model.layers[0].weight


def _tied_worker(topo, pp, dp, dp_index):
    """Also: balance="time" with a group cuts alike on every rank (the first
    rank's measurements are broadcast)."""
    timed = partition(_tied_numpy(), 3, "time", sample=_tied_data(0)[0], group=pp, reps=1)
    out = {"time": (timed.counts, timed.layer_costs)}
    specs = [functools.partial(lambda i: _tied_numpy()[i], i) for i in range(7)]
    for name, sched, counts in [("1f1b", schedules.one_f_one_b(2, 4), [3, 4]),
                                ("zb-v", schedules.zb_v(2, 4), [2, 2, 1, 2]),
                                ("zb-v recomputed", schedules.zb_v(2, 4), [2, 2, 1, 2]),
                                ("specs", schedules.one_f_one_b(2, 4), [3, 4])]:
        if name == "specs":    # each rank builds its stage; the tie is named
            parts = partition(specs, 2, counts, stages=sched.stages_of(pp.rank),
                              tied=[("0.0", "6.0")])
            assert parts[1 - pp.rank] is None
        else:
            parts = partition(_tied_numpy(), sched.num_stages, counts)
        mine = stages_for_rank(parts, sched, pp.rank)
        for s, stage in zip(sched.stages_of(pp.rank), mine):
            for tie, index in getattr(stage, "tied", ()):
                if s != tie.stages[0]:    # the Pipeline makes the copies equal again
                    stage.params()[index][...] += 1.0
        pipe = Pipeline(topo, mine, sched, loss_fn=L.mse_loss, timeout=30,
                        recompute=name.endswith("recomputed"))   # (the tie marks pass through)
        for step in range(STEPS):
            x, y = _tied_data(step)
            if dp is not None:
                x, y = (split_microbatches(x, dp.size)[dp_index],
                        split_microbatches(y, dp.size)[dp_index])
            pipe.step(x if pipe.first else None, y if pipe.last else None)
            L.sgd(mine, LR)
        out[name] = {s: [p.copy() for p in st.params()] for s, st in pipe.stages.items()}
    return out


def _check_tied(results):
    """The first stage's weight and the head's copy both equal the reference's
    one array; across ranks (1F1B) and on one rank (ZB-V: stages 0 and 3)."""
    assert results[0]["time"] == results[1]["time"]
    want = _tied_reference()
    for name, first, last in [("1f1b", 0, 1), ("zb-v", 0, 3), ("zb-v recomputed", 0, 3),
                              ("specs", 0, 1)]:
        got = {}
        for r in results:
            got.update(r[name])
        np.testing.assert_allclose(got[first][0], want, rtol=1e-10, err_msg=name)
        np.testing.assert_allclose(got[last][-2], want, rtol=1e-10, err_msg=name)


# -- a Pipeline made after another's step failed on the same group --

def _retry_worker(world):
    """A batch of 3 rows cannot be cut into 4 micro-batches: the step fails
    on every rank; a Pipeline of 2 micro-batches made on the same group then
    trains. Its steps' tags were those of the failed step, whose aborts the
    transport keeps: its good step failed with the old error."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3, WIDTHS[0])), rng.standard_normal((3, WIDTHS[-1]))
    out = []
    for m in (4, 2):
        sched = schedules.zb_v(2, m)
        mine = stages_for_rank(mlp_stages(WIDTHS, sched.num_stages, SEED), sched, world.rank)
        pipe = Pipeline(world, mine, sched, loss_fn=mse_loss, timeout=30)
        try:
            out.append(pipe.step(x if pipe.first else None, y if pipe.last else None))
        except Exception as e:
            out.append(f"{type(e).__name__}: {e}")
    return out, [g.copy() for stage in mine for g in stage.grads()]


@pytest.mark.timeout(120)
def test_a_pipeline_made_after_a_failed_step_trains():
    results = mesh.spawn(_retry_worker, 2, timeout=90)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3, WIDTHS[0])), rng.standard_normal((3, WIDTHS[-1]))
    model = Sequential(*mlp_stages(WIDTHS, 1, SEED)[0].layers)
    out, ctx = model.forward(x)
    loss, gy = mse_loss(out, y)
    model.backward(ctx, gy)
    for r, (said, _) in enumerate(results):
        assert "cannot be cut into 4 micro-batches: give each step at least 4 rows" \
            in said[0], (r, said)
        assert not isinstance(said[1], str), (r, said)
    np.testing.assert_allclose(results[0][0][1], loss, rtol=1e-12)   # ZB-V: stage 3 on rank 0
    (_, g0), (_, g1) = results
    # ZB-V: rank 0 holds stages 0 and 3, rank 1 stages 1 and 2
    n = [len(s.grads()) for s in mlp_stages(WIDTHS, 4, SEED)]
    got = g0[:n[0]] + g1 + g0[n[0]:]
    for a, b in zip(got, model.grads(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
