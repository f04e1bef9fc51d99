"""dp x pp x tp: a pipeline whose stages are tensor-parallel over the grid's
tp axis, gradients averaged over dp only, trains to the weights of
single-process training. One spawn per configuration runs every plan and
schedule; numpy to 1e-10, torch to float32 tolerance.

The tp collectives of a stage run on the grid's tp group, the pipeline's
sends on its pp group and the gradient average on its dp group: traffic of
different groups never mixes, so none of them needs tags of the others.
"""
import types

import numpy as np
import pytest

import engine
import mesh
from mesh import MeshError
from engine import Pipeline, parallelize, schedules
from engine.executor import split_microbatches, stages_for_rank
from engine.layers import Embedding, Linear, Sequential, Tanh, mse_loss, sgd
from engine.tp_layers import full_params
from test_engine_distribute import assert_named_like

B, T, D, H, V, OUT = 8, 4, 4, 6, 8, 4
STEPS, LR, M = 3, 0.1, 4
# Eight processes on a loaded 2-core machine can each go unscheduled for
# seconds: the 8-rank runs check training, not liveness.
PATIENT = {"MESH_PEER_TIMEOUT": "60"}


def _np_model():
    """Two stages of a numpy model on (batch, sequence, features) activations."""
    rng = np.random.default_rng(11)
    return [Sequential(Embedding(V, D, rng), Linear(D, D, rng), Tanh(), Linear(D, H, rng), Tanh(),
                       Linear(H, D, rng)),
            Sequential(Tanh(), Linear(D, H, rng), Tanh(), Linear(H, D, rng), Tanh(),
                       Linear(D, OUT, rng))]


NP_PLANS = {
    "plain": [{"0": "vocab", "3": "colwise", "5": "rowwise"},
              {"1": "colwise", "3": "rowwise", "5": {"style": "colwise", "output": "replicate"}}],
    # the activations between the stages are split along the sequence
    "sequence": [{"0": {"style": "vocab", "output": "sequence"}, "1": "sequence",
                  "2": "sequence", "3": {"style": "colwise", "input": "sequence"},
                  "5": {"style": "rowwise", "output": "sequence"}},
                 {"0": "sequence", "1": {"style": "colwise", "input": "sequence"},
                  "3": "rowwise", "5": {"style": "colwise", "output": "replicate"}}],
}


def _np_data(step):
    rng = np.random.default_rng(100 + step)
    return rng.integers(0, V, (B, T)), rng.standard_normal((B, T, OUT))


def _np_reference():
    model = Sequential(*[layer for stage in _np_model() for layer in stage.layers])
    for step in range(STEPS):
        x, y = _np_data(step)
        out, ctx = model.forward(x)
        model.backward(ctx, mse_loss(out, y)[1])
        sgd([model], LR)
    return model.params()


def _axes(world, dp):
    grid = mesh.grid(world, dp=dp, pp=2, tp=2)
    tp, pp = grid.group("tp"), grid.group("pp")
    assert (tp.rank, pp.rank) == (grid.coord("tp"), grid.coord("pp"))
    assert grid.rank_of(tp=0) == world.rank - tp.rank     # tp is the fastest axis
    return grid, tp, grid.coord("dp")


def _np_worker(world, dp):
    grid, tp, d = _axes(world, dp)
    out = {}
    for plan_name, plans in NP_PLANS.items():
        for sched_name in ("1f1b", "zb-h1"):
            sched = schedules.by_name(sched_name, 2, M)
            stages = _np_model()
            mine = stages_for_rank(stages, sched, grid.coord("pp"))
            for s, stage in zip(sched.stages_of(grid.coord("pp")), mine):
                parallelize(stage, tp, plans[s])
            pipe = Pipeline(grid, mine, sched, loss_fn=mse_loss, timeout=60)
            for step in range(STEPS):
                x, y = (split_microbatches(a, dp)[d] for a in _np_data(step))
                pipe.step(x if pipe.first else None, y if pipe.last else None)
                sgd(mine, LR)
            out[plan_name, sched_name] = {s: [p.tolist() for p in full_params(st)]
                                          for s, st in pipe.stages.items()}
    trace = pipe.trace()        # one trace, on world rank 0, not one per tp index
    assert (trace is not None) == (world.rank == 0), world.rank
    out["vocab head"] = _np_vocab_head(grid, tp, d, dp)
    return out


def _np_vocab_model():
    """_np_model with a head over the vocabulary: logits (batch, sequence, V)."""
    stages = _np_model()
    stages[1].layers[-1] = Linear(D, V, np.random.default_rng(12))
    return stages


CLASS_WEIGHT, SMOOTHING = np.linspace(0.5, 2.0, V), 0.1


def _np_vocab_data(step):
    rng = np.random.default_rng(300 + step)
    t = rng.integers(0, V, (B, T))
    t[step % B, :step + 1] = -100                 # (tokens not counted)
    return rng.integers(0, V, (B, T)), t


def _np_cross_entropy(y, t):
    """One process's F.cross_entropy(weight=CLASS_WEIGHT, label_smoothing=
    SMOOTHING) over every token (its mean by the counted tokens' weights),
    and its gradient: per row ``A logsumexp - a . x``, ``a`` the weights of
    the smoothed one-hot target."""
    x, t = y.reshape(-1, V), t.reshape(-1)
    a = np.zeros_like(x)
    counted = t != -100
    a[counted] = SMOOTHING / V * CLASS_WEIGHT
    a[counted, t[counted]] += (1 - SMOOTHING) * CLASS_WEIGHT[t[counted]]
    top = x.max(-1, keepdims=True)
    lse = top + np.log(np.exp(x - top).sum(-1, keepdims=True))
    big_a = a.sum(-1, keepdims=True)
    total = CLASS_WEIGHT[t[counted]].sum()
    loss = float((big_a * lse - (a * x).sum(-1, keepdims=True)).sum() / total)
    return loss, ((big_a * np.exp(x - lse) - a) / total).reshape(y.shape)


def _np_vocab_loss(tp):
    """The Pipeline's loss_fn: the vocab-parallel sum and the count it is
    over (a per-token loss: the step's mean is the whole batch's)."""
    def loss_fn(y, t):
        loss_sum, grad = engine.vocab_parallel_cross_entropy(
            y, t, tp, reduction="sum", weight=CLASS_WEIGHT, label_smoothing=SMOOTHING)
        return loss_sum, grad, CLASS_WEIGHT[t[t != -100]].sum()
    return loss_fn


def _np_vocab_head(grid, tp, d, dp):
    """The head planned colwise (its logits left split over the vocabulary)
    and engine.vocab_parallel_cross_entropy, class weights, label smoothing
    and ignored tokens, as the Pipeline's loss_fn: (the steps' losses, the
    stages' whole weights), as one process's."""
    sched = schedules.by_name("1f1b", 2, M)
    stages = _np_vocab_model()
    mine = stages_for_rank(stages, sched, grid.coord("pp"))
    plans = [NP_PLANS["plain"][0], {"1": "colwise", "3": "rowwise", "5": "colwise"}]
    for s, stage in zip(sched.stages_of(grid.coord("pp")), mine):
        parallelize(stage, tp, plans[s])
    pipe = Pipeline(grid, mine, sched, loss_fn=_np_vocab_loss(tp), timeout=60)
    losses = []
    for step in range(STEPS):
        x, y = (split_microbatches(a, dp)[d] for a in _np_vocab_data(step))
        losses.append(pipe.step(x if pipe.first else None, y if pipe.last else None))
        sgd(mine, LR)
    x, y = (split_microbatches(a, dp)[d] for a in _np_vocab_data(STEPS))
    loss, out = pipe.eval_step(x if pipe.first else None, y if pipe.last else None,
                               outputs=True)       # (its logits whole: they were the part)
    losses.append(loss)
    return losses, out, {s: [p.tolist() for p in full_params(st)]
                         for s, st in pipe.stages.items()}


def _check_np_vocab_head(results, dp):
    model = Sequential(*[layer for stage in _np_vocab_model() for layer in stage.layers])
    want = []
    for step in range(STEPS):
        x, y = _np_vocab_data(step)
        out, ctx = model.forward(x)
        loss, grad = _np_cross_entropy(out, y)
        want.append(loss)
        model.backward(ctx, grad)
        sgd([model], LR)
    x, y = _np_vocab_data(STEPS)
    out = model.forward(x)[0]
    want.append(_np_cross_entropy(out, y)[0])
    whole = model.params()
    n0 = len(_np_model()[0].params())
    for r, res in enumerate(results):
        losses, outs, params = res.pop("vocab head")
        if (r // 2) % 2 == 1:        # the last stage's ranks: world rank = (dp*2 + pp)*2 + tp
            np.testing.assert_allclose(losses, want, rtol=1e-10, err_msg=f"rank {r}")
            np.testing.assert_allclose(outs, split_microbatches(out, dp)[r // 4], rtol=1e-10,
                                       atol=1e-13, err_msg=f"rank {r}")
        got = [np.array(p) for s in sorted(params) for p in params[s]]
        ref = whole[:n0] if (r // 2) % 2 == 0 else whole[n0:]
        assert len(got) == len(ref), r
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13, err_msg=f"rank {r}")


def _check_np(results, dp):
    _check_np_vocab_head(results, dp)
    want = _np_reference()
    for key in results[0]:
        for r, res in enumerate(results):
            got = [np.array(p) for s in sorted(res[key]) for p in res[key][s]]
            stage_of = (r // 2) % 2          # world rank = (dp * 2 + pp) * 2 + tp
            n0 = len(_np_model()[0].params())
            ref = want[:n0] if stage_of == 0 else want[n0:]
            assert len(got) == len(ref), key
            for a, b in zip(got, ref):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13, err_msg=f"{key} rank {r}")


def test_numpy_pp2_tp2_trains_like_one_process():
    _check_np(mesh.spawn(_np_worker, 4, 1, timeout=120), 1)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_numpy_dp2_pp2_tp2_trains_like_one_process():
    _check_np(mesh.spawn(_np_worker, 8, 2, timeout=180, env=PATIENT), 2)


# --- torch ------------------------------------------------------------------------

TB = 4


def _torch_data(step):
    import tp_models
    rng = np.random.default_rng(200 + step)
    return (rng.integers(0, tp_models.VOCAB, (TB, tp_models.SEQ)),
            rng.integers(0, tp_models.VOCAB, (TB, tp_models.SEQ)))


def _ce(y, t):
    import torch
    return torch.nn.functional.cross_entropy(y.reshape(-1, y.shape[-1]), t.reshape(-1))


def _torch_reference():
    import torch

    import tp_models
    model = tp_models.model(7)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        x, y = (torch.from_numpy(a) for a in _torch_data(step))
        opt.zero_grad()
        _ce(model(x), y).backward()
        opt.step()
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _torch_worker(world, dp, runs):
    import torch

    import tp_models
    from engine import gather_state_dict
    from engine.torch_stage import TorchStage, torch_loss
    torch.set_num_threads(1)
    grid, tp, d = _axes(world, dp)
    out = {}
    for plan_name, sched_name in runs:
        sched = schedules.by_name(sched_name, 2, 2)
        model = tp_models.model(7)
        pp = grid.coord("pp")
        module = model[2 * pp:2 * pp + 2]             # stage pp: two of the four parts
        parallelize(module, tp, getattr(tp_models, plan_name), strict=False)
        stage = TorchStage(module)
        opt = torch.optim.SGD(module.parameters(), lr=LR)
        pipe = Pipeline(grid, stage, sched, loss_fn=torch_loss(_ce), timeout=60)
        for step in range(STEPS):
            x, y = (split_microbatches(a, dp)[d] for a in _torch_data(step))
            opt.zero_grad()
            pipe.step(x if pipe.first else None, y if pipe.last else None)
            opt.step()
        full = gather_state_dict(module)            # a slice keeps the model's keys
        out[plan_name, sched_name] = {k: v.numpy() for k, v in full.items()}
    return out


def _check_torch(results, runs):
    want = _torch_reference()
    for run in runs:
        seen = set()
        for r, res in enumerate(results):
            for k, v in res[run].items():
                np.testing.assert_allclose(v, want[k], rtol=2e-4, atol=2e-5,
                                           err_msg=f"{run} rank {r} {k}")
                seen.add(k)
        assert seen == set(want), run


TORCH_RUNS = [("PLAIN", "1f1b"), ("SEQUENCE", "zb-h1")]


@pytest.mark.timeout(300)
def test_torch_pp2_tp2_trains_like_one_process():
    pytest.importorskip("torch")
    _check_torch(mesh.spawn(_torch_worker, 4, 1, TORCH_RUNS, timeout=280), TORCH_RUNS)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_torch_dp2_pp2_tp2_trains_like_one_process():
    pytest.importorskip("torch")
    runs = [("SEQUENCE", "1f1b")]
    _check_torch(mesh.spawn(_torch_worker, 8, 2, runs, timeout=480, env=PATIENT), runs)


class _Boom(Exception):
    pass


class _FailOnce:
    """A stage whose second forward raises (the one tp rank that fails)."""

    def __init__(self, stage):
        self.stage, self.calls = stage, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise _Boom("stage failed on purpose")
        return self.stage.forward(x)

    def __getattr__(self, name):
        return getattr(self.stage, name)


def _fail_then_train(pipe, stage):
    """Step 0 fails somewhere; its gradients must be rolled back and the tp
    collectives line up for the steps after. (error, the trained weights)."""
    error = None
    try:
        pipe.step(*_np_data(0))
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    assert not any(g.any() for g in stage.grads()), "the failed step was not rolled back"
    for step in range(STEPS):
        pipe.step(*_np_data(step))
        sgd([stage], LR)
    return error, [p.tolist() for p in full_params(stage)]


def _tp_failure_worker(world):
    """pp=1 x tp=2, the whole model one stage: tp rank 1 fails in step 0
    before the collectives of its second micro-batch, where tp rank 0 waits."""
    grid = mesh.grid(world, pp=1, tp=2)
    stage, plan = _whole_np_model("plain")
    parallelize(stage, grid.group("tp"), plan)
    sched = schedules.by_name("1f1b", 1, M)
    pipe = Pipeline(grid, _FailOnce(stage) if world.rank == 1 else stage, sched,
                    loss_fn=mse_loss, timeout=60)
    return _fail_then_train(pipe, stage)


def test_tp_peer_of_a_failed_stage_raises_and_the_pipeline_recovers():
    # a short collective timeout: without the tp abort, rank 0 would time out
    results = mesh.spawn(_tp_failure_worker, 2, timeout=60, env={"MESH_TIMEOUT": "20"})
    assert results[1][0].startswith("_Boom"), results[1][0]
    error = results[0][0]
    assert error is not None and "aborted" in error, error
    assert "step 0 failed on pp rank 0 (tp rank 1)" in error, error
    for _, params in results:
        for a, b in zip([np.array(p) for p in params], _np_reference(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def _whole_np_model(plan_name):
    """The two stages' layers as one stage, and their plans as one plan."""
    stage = Sequential(*[layer for st in _np_model() for layer in st.layers])
    first, second = NP_PLANS[plan_name]
    return stage, {**first, **{str(int(k) + 6): v for k, v in second.items()}}


def _sums_worker(world):
    """pp=1 x tp=2, a sequence plan: the whole norms' gradient sums run once
    a step (TpSums), against once per micro-batch (the hooks); a step keeps
    what the gradients held; a failed step leaves the sums in line."""
    from engine.tp_sums import TpSums
    grid = mesh.grid(world, pp=1, tp=2)
    tp = grid.group("tp")
    sched = schedules.by_name("1f1b", 1, M)
    x, y = _np_data(0)
    out = {}
    for defer in (True, False):
        stage, plan = _whole_np_model("sequence")
        parallelize(stage, tp, plan)
        pipe = Pipeline(grid, stage, sched, loss_fn=mse_loss, timeout=60)
        summed = sum(len(h.summed_grads()) for h in pipe.tp_sums.holders)
        if not defer:
            pipe.tp_sums = TpSums(pipe.stages, enabled=False)
        seqs = [tp.collective_channel().seq]
        for _ in range(2):              # no zeroing between: the second adds to the first
            pipe.step(x, y)
            seqs.append(tp.collective_channel().seq)
        out[defer] = (summed, [b - a for a, b in zip(seqs, seqs[1:])],
                      [g.tolist() for g in full_params(stage, grads=True)])
    # a failed step (tp rank 1's second forward) on the deferring pipeline
    stage, plan = _whole_np_model("sequence")
    parallelize(stage, tp, plan)
    if world.rank == 1:         # the stage itself, so its summed layers are seen
        stage.forward = _FailOnce(types.SimpleNamespace(forward=stage.forward)).forward
    pipe = Pipeline(grid, stage, sched, loss_fn=mse_loss, timeout=60)
    error = None
    try:
        pipe.step(*_np_data(0))
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    deferring = [h.defer for h in pipe.tp_sums.holders]
    assert not any(g.any() for g in stage.grads()), "the failed step was not rolled back"
    for step in range(STEPS):
        pipe.step(*_np_data(step))
        sgd([stage], LR)
    return out, error, deferring, [p.tolist() for p in full_params(stage)]


def test_a_pipeline_sums_the_sequence_gradients_once_a_step():
    results = mesh.spawn(_sums_worker, 2, timeout=90, env={"MESH_TIMEOUT": "20"})
    want = _np_reference()
    for r, (out, error, deferring, params) in enumerate(results):
        summed, steps, grads = out[True]
        assert summed == 3, summed     # layer 1 (a sequence Linear) and layer 5 (a rowwise bias)
        hooks = out[False][1]
        # per step: the hooks' all-reduce per gradient per micro-batch, or one
        assert [h - d for h, d in zip(hooks, steps)] == [summed * M - 1] * 2, (steps, hooks)
        for a, b in zip(grads, out[False][2], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13, err_msg=f"rank {r}")
        assert deferring and not any(deferring), deferring      # switched back after a failure
        for a, b in zip([np.array(p) for p in params], want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13, err_msg=f"rank {r}")
    assert results[1][1].startswith("_Boom"), results[1][1]
    assert results[0][1] is not None and "aborted" in results[0][1], results[0][1]


def _tied_model(gpt2=False):
    """tp_models' transformer with its head tied to its embedding, as GPTs do
    (``gpt2``: its blocks GPT-2's, their projections Conv1Ds)."""
    import tp_models
    model = (tp_models.gpt2_model if gpt2 else tp_models.model)(seed=0, blocks=2)
    model[-1].head.weight = model[0].embed.weight       # (vocab, dim) both
    return model


def _tied_batch(step):
    import torch

    import tp_models
    g = torch.Generator().manual_seed(step)
    return tuple(torch.randint(0, tp_models.VOCAB, (8, tp_models.SEQ), generator=g)
                 for _ in range(2))


def _tied_loss(y, t):
    import torch
    return torch.nn.functional.cross_entropy(y.reshape(-1, y.shape[-1]), t.reshape(-1))


def _tied_job(world, schedule, microbatches, loss_fn, gpt2=False):
    """The tied model through engine.distribute on pp=2 x tp=2, and an SGD
    optimizer over this rank's part (``gpt2``: GPT-2's blocks, sequence
    parallel; ``"vocab"``: the head's logits left sharded over the
    vocabulary, the loss's cross entropy taken on the shards)."""
    import torch

    import engine
    import tp_models
    torch.set_num_threads(1)
    plan = tp_models.GPT2_SEQUENCE if gpt2 is True else tp_models.PLAIN
    if gpt2 == "vocab":
        plan = {**plan, "*.head": "colwise"}
        gpt2 = False
    job = engine.distribute(_tied_model(gpt2), mesh.grid(world, pp=2, tp=2), plan=plan,
                            schedule=schedule, microbatches=microbatches, balance="uniform",
                            loss_fn=loss_fn, verbose=False)
    return job, torch.optim.SGD(job.parameters(), lr=0.5)


def _tied_distribute_worker(world):
    import torch
    out = {}
    for gpt2 in (False, True, "vocab"):
        job, opt = _tied_job(world, "1f1b", 2, _tied_loss, gpt2)
        losses = []
        for step in range(STEPS):
            opt.zero_grad()
            losses.append(job.step(*_tied_batch(step)))
            opt.step()
        state = job.state_dict()
        named = job.named_parameters()
        out[gpt2] = {
            "state": None if state is None else {k: v.tolist() for k, v in state.items()},
            "named": [(n, tuple(p.shape)) for n, p in named], "tp": True,
            "same": [id(p) for _, p in named] == [id(p) for p in job.parameters()],
            "losses": losses}
        if gpt2 == "vocab":     # eval_step's outputs: the logits gathered whole
            loss, logits = job.eval_step(*_tied_batch(STEPS), outputs=True)
            out[gpt2]["eval"] = (loss, None if logits is None else logits.tolist())
            # stage 0's copy changed alone, as an optimizer made over model.parameters()
            # before distribute steps it (stage 1 holds a copy of its own): the next step
            # raises on every rank, naming the tie and the fix (it trained on, wrong)
            with torch.no_grad():
                for n, p in named:
                    if n.endswith("embed.weight"):
                        p += 1
            try:
                job.step(*_tied_batch(0))
            except ValueError as e:
                out["drift"] = str(e)
    return out


def _trained_alone(ref, losses=None):
    """``ref`` trained STEPS steps in this process on the whole batches
    (each step's loss appended to ``losses``)."""
    import torch
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(STEPS):
        x, y = _tied_batch(step)
        opt.zero_grad()
        loss = _tied_loss(ref(x), y)
        loss.backward()
        opt.step()
        if losses is not None:
            losses.append(loss.item())
    return ref




@pytest.mark.timeout(150)
def test_a_tie_across_stages_and_tp_trains_like_one_process():
    """The embedding (stage 0, vocab-sharded) and the head (stage 1,
    colwise) share one weight: each rank holds one copy's shard, the copies
    stay equal and train like the single tied parameter."""
    torch = pytest.importorskip("torch")
    results = mesh.spawn(_tied_distribute_worker, 4, timeout=130)
    # GPT-2's blocks: Conv1Ds (weights (in, out)) sharded; "vocab": the head's logits
    # left sharded, the user's F.cross_entropy taken on the shards
    for gpt2 in (False, True, "vocab"):
        losses = []
        ref = _trained_alone(_tied_model(gpt2 is True), losses)
        for r in range(4):      # (the last stage's ranks' loss, on every rank alike)
            assert results[r][gpt2]["losses"] == results[3][gpt2]["losses"], (gpt2, r)
            np.testing.assert_allclose(results[r][gpt2]["losses"], losses, rtol=1e-5)
        # each rank's named_parameters(): its shards under the whole model's names (the
        # tied weight under the name its stage holds it by)
        assert_named_like([res[gpt2] for res in results], ref)
        state = results[0][gpt2]["state"]
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(torch.tensor(state[k]), v, rtol=1e-4, atol=1e-5,
                                       msg=f"{k} (gpt2={gpt2})")
    x, y = _tied_batch(STEPS)
    with torch.no_grad():
        logits = ref(x)
    for r in range(4):
        loss, got = results[r]["vocab"]["eval"]
        assert (got is None) == (r < 2), r      # (the outputs: on the last stage's ranks)
        if got is not None:
            torch.testing.assert_close(torch.tensor(got), logits, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(loss, float(_tied_loss(logits, y)), rtol=1e-5)
    for r in range(4):
        said = results[r].get("drift", "")
        assert said.startswith(f"rank {r}: tied parameter ") and "differ" in said, (r, said)
        assert "job.parameters()" in said, said


def _shared_block_model():
    """tp_models' transformer whose one block is called twice (ALBERT's
    sharing): a cut between the calls gives the later stage a copy of it."""
    import torch

    import tp_models
    torch.manual_seed(0)
    block = tp_models.Block()
    return torch.nn.Sequential(tp_models.Embed(), block, block, tp_models.Head())


def _shared_block_worker(world):
    import torch

    import engine
    import tp_models
    torch.set_num_threads(1)
    out = {}
    for schedule in ("1f1b", "zb-v"):     # zb-v: rank 1 holds the block and its copy
        job = engine.distribute(_shared_block_model(), mesh.grid(world, pp=2, tp=2),
                                plan=tp_models.SEQUENCE, schedule=schedule, microbatches=4,
                                balance="uniform", loss_fn=_tied_loss, verbose=False)
        opt = torch.optim.SGD(job.parameters(), lr=0.5)
        for step in range(STEPS):
            opt.zero_grad()
            job.step(*_tied_batch(step))
            opt.step()
        state = job.state_dict()
        out[schedule] = None if state is None else {k: v.tolist() for k, v in state.items()}
    return out


@pytest.mark.timeout(150)
def test_a_block_shared_by_two_stages_sums_its_sequence_gradients():
    """The stage holding the shared block's copy summed its norms' (and its
    rowwise biases') gradients over tp on the original's parameters, not
    the copy's: each tp rank kept its part of the sequence's gradient, and
    the weights drifted from one process's with no error."""
    torch = pytest.importorskip("torch")
    ref = _trained_alone(_shared_block_model())
    out = mesh.spawn(_shared_block_worker, 4, timeout=130)[0]
    for schedule, state in out.items():
        assert set(state) == set(ref.state_dict()), schedule
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(torch.tensor(state[k]), v, rtol=1e-4, atol=1e-5,
                                       msg=f"{schedule} {k}")


_FAIL = {"calls": 0, "at": -1}


def _flaky_tied_loss(y, t):
    _FAIL["calls"] += 1
    if _FAIL["calls"] == _FAIL["at"]:
        raise _Boom("loss failed on purpose")
    return _tied_loss(y, t)


def _accumulating_worker(world):
    """Gradients accumulated over steps 0 and 2 (no zero_grad between), step
    1 failing in its last micro-batch's loss on the last pp rank: its
    partial gradients (and the tie's, and every tp shard's) are rolled back
    on every rank, so the accumulation holds steps 0 and 2 only."""
    job, opt = _tied_job(world, "zb-h1", 4, _flaky_tied_loss)
    errors = []
    opt.zero_grad()
    for step in (0, 1, 2):
        if step == 1:
            _FAIL["at"] = _FAIL["calls"] + 4
        try:
            job.step(*_tied_batch(step))
        except Exception as e:
            errors.append(type(e).__name__)
    opt.step()
    opt.zero_grad()
    job.step(*_tied_batch(3))
    opt.step()
    state = job.state_dict()
    return errors, None if state is None else {k: v.tolist() for k, v in state.items()}


@pytest.mark.timeout(150)
def test_a_failed_step_between_accumulated_ones_leaves_no_gradient():
    torch = pytest.importorskip("torch")
    ref = _tied_model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    (_tied_loss(ref(_tied_batch(0)[0]), _tied_batch(0)[1])
     + _tied_loss(ref(_tied_batch(2)[0]), _tied_batch(2)[1])).backward()
    opt.step()
    opt.zero_grad()
    _tied_loss(ref(_tied_batch(3)[0]), _tied_batch(3)[1]).backward()
    opt.step()
    results = mesh.spawn(_accumulating_worker, 4, timeout=130)
    assert [len(errors) for errors, _ in results] == [1] * 4, results
    state = results[0][1]
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(torch.tensor(state[k]), v, rtol=1e-4, atol=1e-5, msg=k)


def _half_done_worker(world):
    """pp=1 x tp=2: tp rank 1 fails in a tp collective that tp rank 0 has
    finished (it makes the collective, then aborts it and raises, as a rank
    whose own error came at the end of one would), so rank 0 goes on into
    the next collective and waits there. It must raise at once, and the two
    ranks' collectives must line up again for the steps after."""
    from engine import tp_layers
    grid = mesh.grid(world, pp=1, tp=2)
    tp = grid.group("tp")
    stage, plan = _whole_np_model("plain")
    parallelize(stage, tp, plan)
    if world.rank == 1:
        real, calls = tp_layers._comm, [0]

        def half_done(group, x, op, *args, **kwargs):
            out = real(group, x, op, *args, **kwargs)
            if op in ("ar", "ag", "rs"):
                calls[0] += 1
                if calls[0] == 1:
                    ch = group.collective_channel()
                    ch.abort(-ch.seq, "failed at the end of it, on purpose")
                    raise _Boom("tp collective failed on purpose")
            return out
        tp_layers._comm = half_done
    pipe = Pipeline(grid, stage, schedules.by_name("1f1b", 1, M), loss_fn=mse_loss,
                    timeout=60)
    return _fail_then_train(pipe, stage)


def test_a_tp_collective_done_on_one_rank_and_failed_on_its_peer():
    # without the fix rank 0 waits out MESH_TIMEOUT in the next collective,
    # then the ranks stay one collective apart and the next step fails
    results = mesh.spawn(_half_done_worker, 2, timeout=60, env={"MESH_TIMEOUT": "20"})
    assert results[1][0].startswith("_Boom"), results[1][0]
    assert "aborted" in results[0][0] and "tp rank 1" in results[0][0], results[0][0]
    for _, params in results:
        for a, b in zip([np.array(p) for p in params], _np_reference(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def _pooled_loss(y, t):
    """A sequence classifier's loss: the logits averaged over the tokens."""
    import torch
    return torch.nn.functional.cross_entropy(y.mean(1), t[:, 0])


def _split_output_worker(world):
    """pp=2 x tp=2, plans that leave the last stage's output split along the
    sequence: the torch model through engine.distribute (its last planned
    module the "sequence" norm ln_f, the head unplanned) and the numpy
    stages through a Pipeline (the second stage's last planned layer a
    rowwise Linear with output "sequence"). What each rank raised."""
    import torch

    import engine
    import tp_models
    torch.set_num_threads(1)
    grid = mesh.grid(world, pp=2, tp=2)
    plan = {k: v for k, v in tp_models.SEQUENCE.items() if k != "*.head"}
    out = []
    job = engine.distribute(tp_models.model(0), grid, plan=plan, schedule="1f1b",
                            microbatches=2, balance="uniform", loss_fn=_pooled_loss,
                            verbose=False)
    try:
        job.step(*_tied_batch(0))
        out.append(None)
    except Exception as e:
        out.append(f"{type(e).__name__}: {e}")
    sched = schedules.by_name("1f1b", 2, 2)
    stage = _np_model()[grid.coord("pp")]
    parallelize(stage, grid.group("tp"), [
        NP_PLANS["sequence"][0],
        {"0": "sequence", "1": {"style": "colwise", "input": "sequence"},
         "3": {"style": "rowwise", "output": "sequence"}}][grid.coord("pp")])
    pipe = Pipeline(grid, stage, sched, loss_fn=mse_loss, timeout=60)
    try:
        pipe.step(*_np_data(0))
        out.append(None)
    except Exception as e:
        out.append(f"{type(e).__name__}: {e}")
    # a cut right after a colwise Linear, no sample=: the next stage's unplanned Linear
    # raised torch's shape error alone on its ranks; its rowwise one trains as one process
    nn = torch.nn
    x, y = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), torch.zeros(4, 2)
    for plan in ({"0": "colwise"}, {"0": "colwise", "2": "rowwise"}):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 2))
        ref = float(torch.nn.functional.mse_loss(model(x), y))
        job = engine.distribute(model, grid, plan=plan, schedule="1f1b", microbatches=2,
                                balance=[1, 2], loss_fn=torch.nn.functional.mse_loss,
                                verbose=False)
        try:
            loss = job.step(x, y)
            out.append(None if loss is None else abs(loss - ref) < 1e-6)
        except Exception as e:
            out.append(f"{type(e).__name__}: {e}")
    # the same numpy model (engine.layers), pp=2 then pp=1 (dp=2): numpy's matmul error
    # naming nothing, in the first step; now the PlanError, in distribute, on every rank
    xs, ys = x.numpy().astype(np.float64), y.numpy().astype(np.float64)
    for pp, balance in ((2, [1, 2]), (1, "uniform")):
        model = Sequential(Linear(8, 6, np.random.default_rng(1)), Tanh(),
                           Linear(6, 2, np.random.default_rng(2)))
        try:
            job = engine.distribute(model, mesh.grid(world, dp=2 // pp, pp=pp, tp=2),
                                    plan={"0": "colwise"}, schedule="1f1b", microbatches=2,
                                    balance=balance, loss_fn=mse_loss, verbose=False)
            out.append(f"distributed; step: {job.step(xs, ys)}")
        except Exception as e:
            out.append(f"{type(e).__name__}: {e}")
    # the same numpy model planned stage by stage by hand, a Pipeline of its stages:
    # numpy's matmul error on pp rank 1 alone in the first step; the PlanError on every
    # rank as the Pipeline is made
    hand = [Sequential(Linear(8, 6, np.random.default_rng(1))),
            Sequential(Tanh(), Linear(6, 2, np.random.default_rng(2)))][grid.coord("pp")]
    if grid.coord("pp") == 0:
        parallelize(hand, grid.group("tp"), {"0": "colwise"})
    try:
        pipe = Pipeline(grid, hand, schedules.by_name("1f1b", 2, 2), loss_fn=mse_loss,
                        timeout=60)
        out.append(f"made; step: {pipe.step(xs, ys)}")
    except Exception as e:
        out.append(f"{type(e).__name__}: {e}")
    # a colwise layer taking the sequence's part fed the whole batch: the step's loss
    # raised "a target of shape (4, 2) for an output of shape (8, 2)"
    seq = {"style": "colwise", "input": "sequence", "seq_dim": 0}
    try:
        job = engine.distribute(Sequential(Linear(8, 6), Tanh(), Linear(6, 2)),
                                mesh.grid(world, dp=2, pp=1, tp=2), schedule="gpipe",
                                plan={"0": seq, "2": "rowwise"}, microbatches=1,
                                balance="uniform", loss_fn=mse_loss, verbose=False)
        out.append(f"distributed; step: {job.step(xs, ys)}")
    except Exception as e:
        out.append(f"{type(e).__name__}: {e}")
    # job.state_dict() on rank 0 alone, its tp peer in no collective until it timed out:
    # every step after failed, the peers a tp collective apart, each waiting the timeout;
    # then the first (its gather's abort met in the step); now it makes none: all run
    job = engine.distribute(Sequential(Linear(8, 6), Tanh(), Linear(6, 2)),
                            mesh.grid(world, dp=2, pp=1, tp=2), plan={"0": "colwise",
                                                                      "2": "rowwise"},
                            schedule="gpipe", microbatches=1, balance="uniform",
                            loss_fn=mse_loss, verbose=False, timeout=30)
    half = [a[2 * (world.rank // 2):][:2] for a in (xs, ys)]
    if world.rank == 0:
        try:
            job.state_dict(timeout=0.5)
        except MeshError as e:
            out.append(str(e))
        world.send(None, 1, tag=7)
    elif world.rank == 1:
        world.recv(0, tag=7)
    steps = []
    for _ in range(3):
        try:
            steps.append(job.step(*half))
        except Exception as e:
            steps.append(type(e).__name__)
    out.append(steps)
    return out


@pytest.mark.timeout(90)
def test_a_last_stage_output_split_along_the_sequence_is_refused():
    """The loss took each tp rank's part of the sequence against the whole
    target: a pooled loss trained another model than one process's with no
    error, a per-token one raised a shape mismatch naming nothing."""
    pytest.importorskip("torch")
    results = mesh.spawn(_split_output_worker, 4, timeout=80)
    # state_dict() on rank 0 alone: it made no tp collective, and the steps after it run
    said = results[0].pop(-2)
    assert said.startswith("rank 0: job.state_dict() gathers every stage on rank 0, so every "
                           "rank must call it") and "it made no tp collective, so the job's " \
        "next step runs" in said, said
    for r, result in enumerate(results):
        steps = result.pop()
        assert all(isinstance(v, float) or v is None for v in steps), (r, steps)
    for r, (torch_error, np_error, _, right, *_) in enumerate(results):
        # (a cut after a colwise Linear: the next stage's unplanned layer is named, below)
        assert right is True, (r, right)      # (the loss on every rank)
        for error, name in ((torch_error, "3.ln_f"), (np_error, "3")):
            assert error is not None, (r, name)
            assert f"split along the sequence over the tp group by {name!r} " in error, error
    for r in (2, 3):     # the last stage's ranks raise it themselves
        assert results[r][0].startswith("PlanError: pp rank 1 (tp rank"), results[r][0]
        assert "give '3.ln_f' output 'replicate'" in results[r][0], results[r][0]
    for r, result in enumerate(results):   # every rank, its own or pp rank 1's
        error = result[2]
        assert error is not None and error.startswith(
            "PlanError: " if r >= 2 else f"MeshError: rank {r}: pipeline step 0"), error
        assert f"tp rank {r % 2}: 0 is sharded colwise, its output this rank's 3 of 6 " \
               "features, and 2 (Linear), which the plan leaves whole, takes that output as " \
               "if whole: linear() raised RuntimeError: mat1 and mat2 shapes" in error, error
        assert "plan 2 'rowwise'" in error, error
        assert result[-1] == (
            f"PlanError: tp rank {r % 2}: 0 (colwise) takes this rank's part of the sequence "
            "(input 'sequence'), but the model's input (the batch, whole on every tp rank) "
            "gives it whole rows: its all-gather joins 2 copies of the whole rows; give the "
            "layer before it output 'sequence' (a rowwise or vocab one), or give 0 input "
            "'replicate' (it then takes its part itself)"), result[-1]
        assert result[-2] == (
            f"PlanError: tp rank {r % 2}: stage 0's 0 is sharded colwise, its output this "
            "rank's 3 of 6 features, and stage 1's 1 (Linear), which the plan leaves whole, "
            "takes that output as if whole: its weight is (6, 2), for 6 input features; plan "
            "stage 1's 1 'rowwise' (it takes the features' parts and sums them), or give "
            "stage 0's 0 output 'replicate' ({'style': 'colwise', 'output': 'replicate'}: "
            "its output gathered whole)"), result[-2]
        for np_error in result[-4:-2]:     # numpy, pp=2 and pp=1: in distribute, every rank
            assert np_error == (
                f"PlanError: tp rank {r % 2}: 0 is sharded colwise, its output this rank's 3 "
                "of 6 features, and 2 (Linear), which the plan leaves whole, takes that output "
                "as if whole: its weight is (6, 2), for 6 input features; plan 2 'rowwise' (it "
                "takes the features' parts and sums them), or give 0 output 'replicate' "
                "({'style': 'colwise', 'output': 'replicate'}: its output gathered whole)"), \
                np_error


def _qk_norm_worker(world):
    """tp_models' transformer with a per-head q norm, 2 steps through
    engine.distribute at tp=2 (its norms' gradients summed once a step)."""
    import torch

    import engine
    import tp_models
    torch.set_num_threads(1)
    job = engine.distribute(tp_models.qk_norm_model(), mesh.grid(world, pp=1, tp=2),
                            plan=tp_models.QK_NORM, schedule="1f1b", microbatches=2,
                            balance="uniform", loss_fn=tp_models.cross_entropy,
                            verbose=False, timeout=60)
    opt = torch.optim.SGD(job.parameters(), lr=0.5)
    for step in range(2):
        opt.zero_grad()
        job.step(*tp_models.tokens(step, 4))
        opt.step()
    state = job.state_dict()
    return None if state is None else {k: v.tolist() for k, v in state.items()}


@pytest.mark.timeout(120)
def test_a_per_head_norm_on_sharded_heads_trains_like_one_process():
    """A whole norm run on each tp rank's heads (Qwen3's q_norm), planned
    replicate with input "shard": its gradients are summed over tp, and
    the model trains to one process's weights (left whole, each rank's
    copy took its own heads' gradient: another model, no error)."""
    torch = pytest.importorskip("torch")
    import tp_models
    ref = tp_models.qk_norm_model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(2):
        x, y = (torch.from_numpy(a) for a in tp_models.tokens(step, 4))
        opt.zero_grad()
        tp_models.cross_entropy(ref(x), y).backward()
        opt.step()
    state = mesh.spawn(_qk_norm_worker, 2, timeout=100, env=PATIENT)[0]
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(torch.tensor(state[k]), v, rtol=1e-4, atol=1e-5, msg=k)


def _fused_distribute_worker(world):
    """A SwiGLU's w12 planned colwise without parts=, through
    engine.distribute with a sample: what each rank raised."""
    import torch
    from torch import nn

    import engine

    class SwiGLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.w12, self.w3 = nn.Linear(8, 24), nn.Linear(12, 8)

        def forward(self, x):
            a, b = self.w12(x).chunk(2, dim=-1)
            return self.w3(nn.functional.silu(a) * b)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(8, 8)
    try:
        engine.distribute(nn.Sequential(nn.Linear(8, 8), SwiGLU(), nn.Linear(8, 2)),
                          mesh.grid(world, pp=1, tp=2), plan={"1.w12": "colwise",
                                                              "1.w3": "rowwise"},
                          schedule="1f1b", microbatches=2, sample=x, reps=1,
                          loss_fn=nn.functional.mse_loss, verbose=False, timeout=60)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


@pytest.mark.timeout(120)
def test_distribute_says_a_plan_error_of_its_measuring_whole():
    """A plan error raised as distribute measured the layers on the sample
    (a fused projection sharded in one piece) was taken for a micro-batch
    size the layers cannot run: every size failed, and the error came back
    cut to 300 characters inside 'no candidate schedule can run', the
    entry to write cut off."""
    pytest.importorskip("torch")
    for r, error in enumerate(mesh.spawn(_fused_distribute_worker, 2, timeout=100,
                                         env=PATIENT)):
        assert error.startswith(f"PlanError: rank {r}: engine.distribute: measuring the "
                                "layers on the sample, rank 0: tp rank 0: 1.w12: "), error
        assert "plan it {'style': 'colwise', 'parts': 2}" in error, error


_STATE_PLAN = {"0": "colwise", "2": "rowwise", "3": "colwise", "5": "rowwise"}


def _state_model():
    return Sequential(Linear(8, 6, np.random.default_rng(1)), Tanh(),
                      Linear(6, 4, np.random.default_rng(2)),
                      Linear(4, 6, np.random.default_rng(3)), Tanh(),
                      Linear(6, 2, np.random.default_rng(4)))


def _state_job(world):
    return engine.distribute(_state_model(), mesh.grid(world, pp=2, tp=2), schedule="1f1b",
                             plan=_STATE_PLAN, microbatches=2, balance=[3, 3],
                             loss_fn=mse_loss, verbose=False, timeout=20)


def _measuring_fails_worker(world):
    """pp=2 x tp=2: a KeyboardInterrupt in world rank 3's loss_fn at its
    first call (distribute tries it on the last stage's output), then as it
    re-times the stages (job.retime(), inside distribute, a tp collective
    after); then a job built clean on the same grid."""
    import sys
    ed = sys.modules["engine.job_retime"]       # (Job.retime reads _retime there)
    x = np.random.default_rng(5).standard_normal((4, 8))
    y = np.random.default_rng(6).standard_normal((4, 2))
    armed = [False]

    def loss(out, target):
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt("stopped on purpose")
        return mse_loss(out, target)
    real = ed._retime

    def retime(*args, **kwargs):
        armed[0] = world.rank == 3
        return real(*args, **kwargs)
    ed._retime = retime
    said = []
    grid = mesh.grid(world, pp=2, tp=2)
    for when in ("first", "retime", None):
        armed[0] = world.rank == 3 and when == "first"
        try:
            job = engine.distribute(_state_model(), grid,
                                    schedule="1f1b", plan=_STATE_PLAN, microbatches=2,
                                    balance=[3, 3], loss_fn=loss, verbose=False, timeout=20,
                                    sample=x, reps=1)
            said.append(job.step(x, y))
        except BaseException as e:
            said.append(f"{type(e).__name__}: {e}")
        if when == "retime":
            ed._retime = real
    return said


@pytest.mark.timeout(120)
def test_a_keyboard_interrupt_in_distributes_own_timing_fails_every_rank_at_once():
    """A KeyboardInterrupt in loss_fn on one rank as distribute times the
    model ended that rank's call alone: the others waited in its exchange
    of the times (or its tp peer in a collective) until their timeout (20
    s here; the test's spawn would time out). Now every rank raises at once,
    naming it (its tp peer too, which raised its tp collective's abort
    before), and a job built after runs."""
    results = mesh.spawn(_measuring_fails_worker, 4, timeout=100)
    for at in (0, 1):
        assert results[3][at] == "KeyboardInterrupt: stopped on purpose", results[3]
        for r in (0, 1, 2):     # (its tp peer too, whose tp collective it aborted)
            assert results[r][at].startswith(f"DistributeFailed: rank {r}: engine.distribute "
                                             "failed on rank 3: KeyboardInterrupt"), results[r]
    for r, said in enumerate(results):      # (the step's loss, on every rank alike)
        assert isinstance(said[2], float) and said[2] == results[0][2], (r, said)


def _state_killed_worker(world, folder):
    """World rank 3 is killed (SIGKILL) in job.state_dict(); each other rank
    writes what its call raised."""
    import os
    import signal
    job = _state_job(world)
    if world.rank == 3:
        job._local_state = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    try:
        said = f"returned {type(job.state_dict()).__name__}"
    except Exception as e:
        said = f"{type(e).__name__}: {e}"
    with open(os.path.join(folder, f"rank{world.rank}"), "w") as f:
        f.write(said)


@pytest.mark.timeout(90)
def test_a_rank_killed_in_state_dict_fails_rank_0_at_once(tmp_path):
    """Its tp peer lost it in the gather, and then, telling its tp peer, raised
    that loss before it told rank 0, which waited for stage 1's state until
    its timeout (20 s here). Now rank 0 is told, and raises at once."""
    with pytest.raises(mesh.WorkerError, match="rank 3 failed"):
        mesh.spawn(_state_killed_worker, 4, str(tmp_path), timeout=60, settle=5)
    said = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert said.get("rank2", "").startswith("LostPeerError: rank 2: job.state_dict(), "
                                            "gathering its tp shards: all_gather"), said
    assert said.get("rank0", "").startswith("GatherFailed: rank 0: job.state_dict() failed on "
                                            "rank 2: LostPeerError: rank 2"), said
    assert said.get("rank1") == "returned NoneType", said


def _state_fails_worker(world):
    """pp=2 x tp=2, a numpy model: job.state_dict() raises on one rank (its
    own error, before its tp gathers: world rank 3, then world rank 0; then
    rank 3 after its gathers), then the job steps and gathers its state
    again."""
    job = _state_job(world)
    x = np.random.default_rng(5).standard_normal((4, 8))
    y = np.random.default_rng(6).standard_normal((4, 2))
    said = []
    for bad, late in ((3, False), (0, False), (3, True)):
        if world.rank == bad:
            def broken(*args, late=late, **kwargs):
                del job._local_state        # (this call only)
                if late:
                    job._local_state(*args, **kwargs)
                raise _Boom("state failed on purpose")
            job._local_state = broken
        try:
            said.append(f"returned {type(job.state_dict()).__name__}")
        except Exception as e:
            said.append(f"{type(e).__name__}: {e}")
        said.append(job.step(x, y))
        said.append(sorted(job.state_dict() or {}))
    return said


@pytest.mark.timeout(90)
def test_a_state_dict_failing_on_one_rank_fails_its_peers_at_once_and_the_job_goes_on():
    """A rank's own error in job.state_dict() (a KeyboardInterrupt, a
    MemoryError as it gathers its shards) left its tp peer waiting in the
    gather, and rank 0 for that stage's state, each until the timeout; the
    peers were then a tp collective apart, and every step after failed.
    Now its tp peers' gather fails at once naming it, rank 0 too (nothing
    gathered, nothing left unread), and the job steps and saves on."""
    results = mesh.spawn(_state_fails_worker, 4, timeout=80)
    keys = results[0][2]
    assert len(keys) == 8, keys
    # rank 3 failed: its tp peer (rank 2) in the gather, rank 0 waiting for stage 1
    assert results[3][0] == "_Boom: state failed on purpose", results[3][0]
    assert results[2][0].startswith("MeshError: rank 2: all_gather") \
        and "job.state_dict() failed on tp rank 1: _Boom" in results[2][0], results[2][0]
    assert results[0][0].startswith("GatherFailed: rank 0: job.state_dict() failed on rank 2: "
                                    "MeshError: rank 2: all_gather"), results[0][0]
    assert results[1][0] == "returned NoneType", results[1][0]    # (its part was done)
    # rank 0 failed: its tp peer in the gather; stage 1's tp rank 0 told, sending nothing
    assert results[0][3] == "_Boom: state failed on purpose", results[0][3]
    assert "job.state_dict() failed on tp rank 0: _Boom" in results[1][3], results[1][3]
    assert results[2][3].startswith("GatherFailed: rank 2: job.state_dict() failed on rank 0: "
                                    "_Boom"), results[2][3]
    assert results[3][3] == "returned NoneType", results[3][3]
    # rank 3 failed after its gathers: its tp peer's part ran, and is told; its abandoned
    # gather, which that peer never made, failed the job's next step on every rank
    assert results[3][6] == "_Boom: state failed on purpose", results[3][6]
    assert results[2][6] == ("GatherFailed: rank 2: job.state_dict() failed on rank 3: _Boom: "
                             "state failed on purpose; nothing was gathered"), results[2][6]
    assert results[0][6].startswith("GatherFailed: rank 0: job.state_dict() failed on rank 2: "
                                    "GatherFailed: rank 2: "), results[0][6]
    for r, said in enumerate(results):
        for at in (1, 4, 7):    # the steps after each ran (the loss, on every rank alike)
            assert isinstance(said[at], float) and said[at] == results[0][at], (r, said)
        assert said[5] == said[8] == (keys if r == 0 else []), (r, said)


def _lone_failed_worker(world):
    """pp=2: rank 1 calls job.state_dict() alone and its part fails; then
    every rank calls it (rank 1 a moment late, so rank 0 reads what is
    there first), steps, and calls it again."""
    import time
    import collectives
    job = engine.distribute(_state_model(), mesh.grid(world, pp=2), schedule="1f1b",
                            microbatches=2, balance=[3, 3], loss_fn=mse_loss, verbose=False,
                            timeout=20)
    x = np.random.default_rng(5).standard_normal((4, 8))
    y = np.random.default_rng(6).standard_normal((4, 2))
    said = []
    if world.rank == 1:
        def broken(*args, **kwargs):
            del job._local_state        # (this call only)
            raise _Boom("state failed on purpose")
        job._local_state = broken
        try:
            said.append(f"returned {type(job.state_dict(timeout=0.5)).__name__}")
        except Exception as e:
            said.append(f"{type(e).__name__}: {e}")
    collectives.barrier(world)
    if world.rank == 1:
        time.sleep(0.5)
    for _ in range(2):
        try:
            said.append(sorted(job.state_dict(timeout=5) or {}))
        except Exception as e:
            said.append(f"{type(e).__name__}: {e}")
        said.append(job.step(x, y))
    return said


@pytest.mark.timeout(60)
def test_a_lone_call_whose_part_failed_leaves_no_word_for_the_next_call():
    """A rank whose part failed in a call it made alone told rank 0 so and
    raised at once: its word stayed there, and rank 0's next call took it
    for that call's, raising GatherFailed naming an error of the call
    before (and the rank's next word waited for an answer until its
    timeout). Now it waits for rank 0's answer as any word does, withdraws
    its word when none comes, and the next call gathers the whole state."""
    results = mesh.spawn(_lone_failed_worker, 2, timeout=50)
    assert results[1][0] == "_Boom: state failed on purpose", results[1]
    keys = results[0][0]
    assert isinstance(keys, list) and len(keys) == 8, results[0]
    assert results[0][2] == keys and results[1][1] == results[1][3] == [], results
    # the steps after each call ran, alike (no optimizer: the same weights, the same loss,
    # on every rank)
    assert isinstance(results[1][2], float) and results[1][2] == results[1][4], results[1]
    assert results[0][1] == results[0][3] == results[1][2], results


def _checks_fail_worker(world):
    """pp=2: a KeyboardInterrupt on world rank 1 as distribute fingerprints
    its model, as it counts its sample's rows, as a dry run's step starts
    and as it is recorded (engine.calibrate), and as the dry run's figures
    are worked out after its last exchange; then a job built clean on the
    same grid."""
    import sys
    given, cal = sys.modules["engine.given"], sys.modules["engine.calibrate"]
    x = np.random.default_rng(5).standard_normal((4, 8))
    y = np.random.default_rng(6).standard_normal((4, 2))
    said = []
    for where, name in ((given, "_fingerprint"), (given, "rows_of"),
                        (cal, "_helpers"), (cal, "step_record"), (cal, "step_figures"),
                        (None, None)):
        if world.rank == 1 and where is not None:
            real = getattr(where, name)

            def interrupted(*args, where=where, name=name, real=real, **kwargs):
                setattr(where, name, real)      # (this call only)
                raise KeyboardInterrupt("stopped on purpose")
            setattr(where, name, interrupted)
        try:
            job = engine.distribute(_state_model(), mesh.grid(world, pp=2), schedule="1f1b",
                                    microbatches=2, balance="time", loss_fn=mse_loss,
                                    verbose=False, timeout=20, sample=x, reps=1)
            said.append(job.step(x, y))
        except BaseException as e:
            said.append(f"{type(e).__name__}: {e}")
    return said


@pytest.mark.timeout(120)
def test_a_keyboard_interrupt_in_distributes_checks_and_dry_runs_fails_every_rank_at_once():
    """A KeyboardInterrupt on one rank as distribute compared the models,
    agreed the sample's rows or ran its dry pipeline ended that rank's call
    alone: the others waited for it in the exchange (or the dry run's next
    step) until their timeout (20 s here). Now every rank raises at once,
    naming it (a dry step's failure too, whose MeshError they raised
    before), and a job built after runs."""
    results = mesh.spawn(_checks_fail_worker, 2, timeout=100)
    for at in range(5):     # (a dry step's failure too: not the step's MeshError there)
        assert results[1][at] == "KeyboardInterrupt: stopped on purpose", results[1]
        assert results[0][at] == ("DistributeFailed: rank 0: engine.distribute failed on "
                                  "rank 1: KeyboardInterrupt: stopped on purpose"), results[0]
    assert isinstance(results[1][5], float) and results[0][5] == results[1][5], results


def interrupt_call(module, name, call, text):
    """The ``call``-th call of ``module.name`` (its import name) raises
    KeyboardInterrupt(``text``), on this rank only; a negative ``call``:
    once the real call returned. Later calls are the real one's."""
    import importlib
    where = importlib.import_module(module)
    real, calls = getattr(where, name), [0]

    def interrupted(*a, **k):
        calls[0] += 1
        if calls[0] < abs(call):
            return real(*a, **k)
        setattr(where, name, real)      # (this call only)
        if call < 0:
            real(*a, **k)
        raise KeyboardInterrupt(text)
    setattr(where, name, interrupted)


def _between_fail_worker(world, cases):
    """pp=2 (world rank 1 holds the last stage): for each case ``(module,
    name, call, args)``, distribute with the ``call``-th call of
    ``module.name`` on world rank 1 raising a KeyboardInterrupt (``after``:
    once the real call returned), then a step of the job."""
    x = np.random.default_rng(5).standard_normal((4, 8))
    y = np.random.default_rng(6).standard_normal((4, 2))
    said = []
    for module, name, call, args in cases:
        if world.rank == 1 and module:
            interrupt_call(module, name, call, "stopped on purpose")
        kw = dict(schedule="1f1b", microbatches=2, balance="time", sample=x, reps=1)
        kw.update(args)
        try:
            job = engine.distribute(_state_model(), mesh.grid(world, pp=2), loss_fn=mse_loss,
                                    verbose=False, timeout=20, **kw)
            said.append(job.step(x, y))
        except BaseException as e:
            said.append(f"{type(e).__name__}: {e}")
    return said


# where distribute's own work between its exchanges runs (a negative call: once it returned)
_BETWEEN = [("engine.distribute_measure", "candidates", 1, {}),  # the candidates' simulation
            ("engine.distribute_measure", "candidates", 2, {}),  # again, the stages timed whole
            ("engine.distribute", "partition", 1, {}),       # the chosen cut
            ("engine.distribute", "Pipeline", -1, {}),       # the job's Pipeline, made
            ("engine.distribute", "Pipeline", -1,            # so, with nothing measured
             dict(balance=[3, 3], sample=None)),
            ("engine.job_retime", "_stretch", 1, {}),        # the re-time's, after its dry run
            ("engine.measured_choice", "best_first", 1,      # the choice's, after its dry run
             dict(schedule="auto", microbatches=None)),
            ("engine.distribute", "param_count", 1, {}),     # after the models compared
            ("engine.distribute", "param_count", 1,          # so, with nothing measured
             dict(balance=[3, 3], sample=None)),
            ("engine.distribute_measure", "_median_act", 1, {}),  # profiled, before calibrate
            ("engine.job_retime", "under_load", 1, {}),      # after the job's re-time
            ("engine.executor", "verify", 1, {}),            # a dry run's Pipeline, made
            ("engine.executor", "verify", 1,                 # the job's, with nothing measured
             dict(balance=[3, 3], sample=None)),
            (None, None, 0, {})]


@pytest.mark.timeout(120)
def test_a_keyboard_interrupt_between_distributes_exchanges_fails_every_rank_at_once():
    """A KeyboardInterrupt on one rank in distribute's own work between two
    of its exchanges (the candidates' simulation, the cut, the Pipeline
    made, the ranking or the stretch worked out after a dry run; the plan
    applied before the profile, the figures worked out before calibrate,
    the table simulated again after the job's re-time; a Pipeline's own
    work before its first exchange) ended its call alone: the others waited
    for it in their next collective until their timeout (20 s here), or
    went on to return a job whose first step waited. Now every rank raises
    at once, the others DistributeFailed naming it, and a job built after
    trains."""
    results = mesh.spawn(_between_fail_worker, 2, _BETWEEN, timeout=100)
    for at in range(len(_BETWEEN) - 1):
        assert results[1][at] == "KeyboardInterrupt: stopped on purpose", (at, results[1])
        assert results[0][at] == ("DistributeFailed: rank 0: engine.distribute failed on "
                                  "rank 1: KeyboardInterrupt: stopped on purpose"), (at, results[0])
    assert isinstance(results[1][-1], float) and results[0][-1] == results[1][-1], results
