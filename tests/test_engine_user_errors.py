"""What a new user gets wrong is refused by name, on every rank, never a
raw error from deep inside nor silently wrong numbers: a torch loss
returned with its logits, too few sample rows or a bad micro-batch count
for engine.distribute, an engine.layers class as a partition spec, a
Pipeline given the wrong number of stage objects, a balance that is no
list of whole layer counts."""
import functools
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import engine
import mesh
from engine.layers import Linear, Sequential, Tanh, mlp_stages, mse_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Solo:
    rank, size = 0, 1


# ---- a torch Pipeline's loss_fn returning more than the loss


def _said_then_barrier(world, call, timeout=30):
    """What ``call()`` raised on this rank ("no error", or the float it
    returned), after which every rank stays for a barrier, as a caller that
    catches the error and goes on."""
    import collectives
    try:
        said = call()
        said = said if isinstance(said, float) else "no error"
    except (TypeError, ValueError, mesh.MeshError) as e:
        said = f"{type(e).__name__}: {e}"
    collectives.barrier(world, timeout=timeout)
    return said


def _losses():
    import torch.nn.functional as F
    return {
        "logits": lambda y, t: (F.mse_loss(y, t), y.detach()),     # HF-style (loss, logits)
        # (a count would be a per-token loss's (sum, count): engine.per_token; this is none)
        "one": lambda y, t: (F.mse_loss(y, t), y.new_ones(1)),
        # an engine-style pair written by hand: the loss a number, the output's gradient
        "pair": lambda y, t: (float(F.mse_loss(y, t)), 2 * (y - t).detach() / y.numel()),
        "plain": F.mse_loss,
    }


def _torch_loss_worker(world, names, catch=True):
    import torch
    from torch import nn
    out = {}
    for i, name in enumerate(names):
        torch.manual_seed(0)
        x, y = torch.randn(4, 4), torch.randn(4, 2)
        sched = engine.schedules.one_f_one_b(2, 2)
        grid = mesh.grid(world, pp=2)
        parts = engine.partition(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), 2)
        pipe = engine.Pipeline(grid, engine.stages_for_rank(parts, sched, grid.coord("pp")),
                               sched, loss_fn=_losses()[name], timeout=30, tag_base=i << 20)
        try:
            loss = pipe.step(x, y)
            grads = [np.array(g) for st in pipe.stages.values() for g in st.grads()]
            out[name] = (loss, grads)
        except Exception as e:
            if not catch:
                raise
            out[name] = f"{type(e).__name__}: {e}"
    return out


def test_a_torch_pipeline_refuses_a_loss_returned_with_something_else_on_every_rank():
    pytest.importorskip("torch")
    names = ["logits", "one", "pair", "plain"]
    first, last = mesh.spawn(_torch_loss_worker, 2, names, timeout=120)
    for name in ("logits", "one"):
        assert last[name].startswith("TypeError: pp rank 1: loss_fn(output, target) returned "
                                     "a tuple of 2, (a Tensor of shape (), "), last[name]
        assert "returns the loss alone, as a scalar tensor" in last[name], last[name]
        assert "a (loss, gradient) pair is an engine.layers model's loss" in last[name]
        # the first stage's rank fails too (the mesh's abort), naming the cause
        assert isinstance(first[name], str), first[name]
        assert "pp rank 1" in first[name] and "TypeError" in first[name], first[name]
    # a hand-written pair (the loss a number) and a plain torch loss: the same step
    for got in (first, last):
        assert not isinstance(got["pair"], str) and not isinstance(got["plain"], str), got
        for a, b in zip(got["pair"][1], got["plain"][1], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert last["pair"][0] == pytest.approx(last["plain"][0], rel=1e-6)


def _uncaught_worker(world):
    """As a script run by meshrun: nobody catches the error."""
    return _torch_loss_worker(world, ["logits"], catch=False)


def test_an_uncaught_loss_error_is_the_one_a_spawn_raises():
    pytest.importorskip("torch")
    with pytest.raises(mesh.WorkerError) as failed:
        mesh.spawn(_uncaught_worker, 2, timeout=120)
    assert failed.value.rank == 1, str(failed.value)
    assert ("TypeError: pp rank 1: loss_fn(output, target) returned a tuple of 2"
            in str(failed.value)), str(failed.value)


def test_a_torch_pipeline_refuses_a_pair_whose_gradient_is_not_the_outputs():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    sched = engine.schedules.one_f_one_b(1, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    for fn, words in [(lambda o, t: (F.mse_loss(o, t).item(), 1), "gradient is an int"),
                      (lambda o, t: (0.0, (o - t)[:, 0].detach()),
                       "gradient is a Tensor of shape (2,)")]:
        pipe = engine.Pipeline(_Solo(), torch.nn.Linear(3, 2), sched, loss_fn=fn)
        with pytest.raises(TypeError, match=re.escape(
                f"pp rank 0: loss_fn(output, target) returned a (loss, gradient) pair whose "
                f"{words}, not of the output's shape (2, 2)")):
            pipe.step(x, y)


class _OneFeatureGradient:
    """A stage object of a user's own whose backward sums its input
    gradient over the features (keepdims): shape (rows, 1), not (rows, 4)."""

    def __init__(self, inner):
        self.inner = inner

    def forward(self, x):
        return self.inner.forward(x)

    def backward(self, ctx, gy):
        return self.inner.backward(ctx, gy).sum(axis=1, keepdims=True)

    def params(self):
        return self.inner.params()

    def grads(self):
        return self.inner.grads()


def test_a_numpy_gradient_not_of_its_values_shape_is_refused_not_broadcast():
    """A loss gradient, or a stage's input gradient, of shape (rows, 1) went
    through the Tanh's backward before it by numpy's broadcasting: wrong
    gradients with nothing said (other shapes failed in the stage before,
    which was blamed). Now the step raises where it was made."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))

    def stages():
        r = np.random.default_rng(1)
        return [Sequential(Linear(3, 4, r), Tanh()), Sequential(Linear(4, 2, r), Tanh())]

    # both stages on one rank, by hand: the gradient goes between them locally
    sched = engine.Schedule.build([["0F0", "1F0", "0F1", "1F1", "1B0", "0B0", "1B1", "0B1"]],
                                  2, (0, 0), name="two on one")
    flat = lambda out, t: (mse_loss(out, t)[0], mse_loss(out, t)[1].sum(axis=1, keepdims=True))
    for fn, wrap, says in [
            (flat, False, "1F0: loss_fn(output, target) returned a gradient of shape (3, 1) for "
                          "an output of shape (3, 2) (micro-batch 0)"),
            (mse_loss, True, "1B0: stage 1's backward() returned an input gradient of shape "
                             "(3, 1) for micro-batch 0, whose input had shape (3, 4)")]:
        mine = stages()
        if wrap:
            mine[1] = _OneFeatureGradient(mine[1])
        pipe = engine.Pipeline(_Solo(), mine, sched, loss_fn=fn)
        with pytest.raises(ValueError, match=re.escape(
                f"pp rank 0: pipeline step 0 (two on one), {says}")):
            pipe.step(x, y)
        assert all(not g.any() for stage in mine for g in stage.grads())    # rolled back


def test_a_stages_own_error_is_noted_with_the_action_and_its_inputs_shape():
    """Stages cut apart wrongly (4 features out, 5 in): numpy's matmul error
    came out of step() alone, naming no stage, micro-batch or input (the
    frames inside engine left out of meshrun's report). Its class and
    message stay; a note says where it was raised."""
    if sys.version_info < (3, 11):
        pytest.skip("exception notes came with Python 3.11")
    r = np.random.default_rng(1)
    stages = [Sequential(Linear(3, 4, r), Tanh()), Sequential(Linear(5, 2, r))]
    sched = engine.Schedule.build([["0F0", "1F0", "1B0", "0B0"]], 1, (0, 0), name="cut apart")
    pipe = engine.Pipeline(_Solo(), stages, sched, loss_fn=mse_loss)
    with pytest.raises(ValueError, match="matmul") as raised:
        pipe.step(np.ones((2, 3)), np.ones((2, 2)))
    assert getattr(raised.value, "__notes__", None) == [
        "pp rank 0: raised in pipeline step 0 (cut apart), 1F0: stage 1's forward() of "
        "micro-batch 0, its input of shape (2, 4)"], raised.value


# ---- engine.distribute: sample rows, micro-batch counts


def _distribute_worker(world):
    grid = mesh.grid(world, pp=2)
    model = Sequential(*mlp_stages([5, 8, 6, 7, 3], 1, seed=0)[0].layers)     # 7 layers
    x = np.random.default_rng(0).standard_normal((16, 5))
    got = {}
    for name, kwargs in [("one row", {"sample": x[:1]}),
                         ("32 of 16", {"sample": x, "microbatches": 32})]:
        try:
            engine.distribute(model, grid, loss_fn=mse_loss, schedule="auto", reps=1,
                              verbose=False, timeout=30, **kwargs)
            got[name] = "no error"
        except Exception as e:
            got[name] = f"{type(e).__name__}: {e}"
    return got


def test_distribute_refuses_a_sample_with_fewer_rows_than_pipeline_ranks():
    for r, got in enumerate(mesh.spawn(_distribute_worker, 2, timeout=120)):
        assert got["one row"] == (f"ValueError: rank {r}: engine.distribute: 2 micro-batches "
                                  "(one a pipeline rank, the fewest tried at pp=2) need a batch "
                                  "of at least 2 rows; the sample has 1"), got
        assert got["32 of 16"] == (f"ValueError: rank {r}: engine.distribute: 32 micro-batches "
                                   "need a batch of at least 32 rows; the sample has 16"), got


@pytest.mark.parametrize("m", [0, -2, 2.5, True, "4"])
def test_distribute_refuses_a_microbatch_count_that_is_no_whole_number_above_0(m):
    model = Sequential(*mlp_stages([5, 8, 3], 1, seed=0)[0].layers)
    with pytest.raises(ValueError, match=re.escape(f"microbatches={m!r}: a whole number of "
                                                   "at least 1")):
        engine.distribute(model, None, loss_fn=mse_loss, microbatches=m,
                          sample=np.zeros((8, 5)), verbose=False)


def test_distribute_refuses_a_list_of_specs_or_functions_naming_the_way_to_build_them():
    """A DeepSpeed LayerSpec's port, a list of classes or partials (engine.partition
    takes them), or a function among torch modules, raised AttributeError: 'Embed'
    has no attribute 'params' (read as numpy layers)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    for layers, what in (([nn.Embedding, nn.Linear], "layer 0 of the list is the class "
                                                      "Embedding, not a layer"),
                         ([nn.Linear(4, 4), functools.partial(nn.Linear, 4, 2)],
                          "layer 1 of the list is a partial, not a layer"),
                         ([nn.Linear(4, 4), torch.tanh, nn.Linear(4, 2)],
                          "layer 1 of the list is a builtin_function_or_method (tanh)"),
                         ([Linear(4, 4), Tanh],
                          "layer 1 of the list is the class Tanh")):
        with pytest.raises(TypeError, match=re.escape(what) + ".*engine.partition"):
            engine.distribute(layers, None, loss_fn=mse_loss, schedule="1f1b",
                              microbatches=1, balance="uniform", verbose=False)


def _distribute_one_rank_wrong(world, what):
    model = Sequential(*mlp_stages([5, 8, 3], 1, seed=0)[0].layers)
    kw = {"schedule": "1f1b", "microbatches": 2, "balance": "uniform", "loss_fn": mse_loss}
    if world.rank == 1:
        kw[what] = {"microbatches": 0, "loss_fn": None, "schedule": "nosuch",
                    "balance": "nonsense", "plan": {"0": "colwise"}}[what]
    return _said_then_barrier(world, lambda: engine.distribute(
        model, mesh.grid(world, pp=2), **kw, verbose=False, overhead=0.0, timeout=20),
        timeout=20)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what, says", [
    ("microbatches", "microbatches=0: a whole number of at least 1"),
    ("loss_fn", "no loss_fn= given: pass loss_fn(output, target) -> loss"),
    ("schedule", "unknown schedule 'nosuch': use gpipe, 1f1b,"),
    ("balance", "unknown balance 'nonsense': use 'time', 'uniform', 'parameters'"),
    ("plan", "a tensor-parallel plan needs a grid with a tp axis, got {'pp': 2}")])
def test_a_distribute_argument_wrong_on_one_rank_fails_every_rank(what, says):
    """They raised on that rank alone: the others waited for it in their next
    collective (until the timeout), or met its next call (a MismatchError
    naming barrier and all_gather_object, not what was wrong)."""
    said = mesh.spawn(_distribute_one_rank_wrong, 2, what, timeout=50)
    assert said[1].startswith(f"ValueError: rank 1: engine.distribute: {says}"), said
    assert said[0].startswith(f"ValueError: rank 0: engine.distribute failed on rank 1: "
                              f"{says}"), said


def _clip_one_rank_wrong(world, norm_type):
    sched = engine.schedules.by_name("1f1b", world.size, 2)
    mine = engine.stages_for_rank(mlp_stages([3, 4, 2], sched.num_stages, 0), sched, world.rank)
    pipe = engine.Pipeline(world, mine, sched, loss_fn=mse_loss, timeout=20)
    rng = np.random.default_rng(0)
    pipe.step(rng.standard_normal((4, 3)), rng.standard_normal((4, 2)))
    return _said_then_barrier(world, lambda: pipe.clip_grad_norm_(
        1e-3, norm_type=norm_type if world.rank == 1 else 2.0), timeout=20)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("norm_type, says", [
    (-1, ["ValueError: rank 0 (pp rank 0): clip_grad_norm_ failed on rank(s) [1] of group "
          "world: their norm_type or max_norm is not valid (see their error)",
          "ValueError: rank 1 (pp rank 1): clip_grad_norm_(norm_type=-1): a norm of order "
          "above 0, or inf"]),
    (3.0, [f"ValueError: rank {r} (pp rank {r}): clip_grad_norm_ was given other arguments "
           "on other ranks (ranks [0]: norm_type 2, max_norm 0.001; ranks [1]: norm_type 3, "
           "max_norm 0.001): every rank passes the same norm_type and max_norm"
           for r in range(2)])])
def test_clip_grad_norm_given_another_norm_type_on_one_rank_fails_every_rank(norm_type, says):
    """A norm_type refused on one rank raised there alone (the others waited
    in the all-reduce, or met its next call as a MismatchError); another
    order of norm on one rank returned another norm there and clipped each
    rank by its own, silently (the copies of tied parameters drifting)."""
    assert mesh.spawn(_clip_one_rank_wrong, 2, norm_type, timeout=50) == says


def _clip_norm_fails(world):
    from engine import clip
    sched = engine.schedules.by_name("1f1b", world.size, 2)
    mine = engine.stages_for_rank(mlp_stages([3, 4, 2], sched.num_stages, 0), sched, world.rank)
    pipe = engine.Pipeline(world, mine, sched, loss_fn=mse_loss, timeout=20)
    rng = np.random.default_rng(0)
    pipe.step(rng.standard_normal((4, 3)), rng.standard_normal((4, 2)))
    if world.rank == 1:
        real = clip._power_sum

        def out_of_memory(g, p):
            clip._power_sum = real          # (this call only)
            raise MemoryError("no memory for the float64 copy, on purpose")
        clip._power_sum = out_of_memory
    said = []
    for _ in range(2):
        try:
            said.append(pipe.clip_grad_norm_(1e9))
        except (MemoryError, ValueError) as e:
            said.append(f"{type(e).__name__}: {e}")
    return said


@pytest.mark.timeout(60)
def test_clip_grad_norm_failing_on_one_rank_fails_every_rank_at_once():
    """An error of the rank's own in its gradients' norm (a MemoryError of
    its float64 copy, a KeyboardInterrupt) raised there alone, before the
    gather: the others waited in it until their timeout, then met that
    rank's next call as their own. Now it is told in the gather: every rank
    raises at once, and the next call is the same on every rank."""
    (first, again0), (own, again1) = mesh.spawn(_clip_norm_fails, 2, timeout=50)
    assert own == "MemoryError: no memory for the float64 copy, on purpose", own
    assert first == ("ValueError: rank 0 (pp rank 0): clip_grad_norm_ failed on rank(s) [1] of "
                     "group world: their gradients' norm raised there (see their error)"), first
    assert isinstance(again0, float) and again0 == again1, (again0, again1)


# ---- engine.partition: classes as specs, balance


def test_partition_builds_an_engine_layers_class_as_a_constructor():
    specs = [functools.partial(Linear, 6, 8), Tanh, functools.partial(Linear, 8, 3)]
    parts = engine.partition(specs, 2)
    assert parts.counts == (1, 2)
    assert all(isinstance(s, Sequential) for s in parts)
    assert isinstance(parts[1].layers[0], Tanh)
    assert engine.partition(specs, 2, stages=[0])[1] is None       # built only where asked
    sched = engine.schedules.one_f_one_b(1, 2)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 6)), rng.standard_normal((4, 3))
    loss = engine.Pipeline(_Solo(), list(parts), engine.schedules.interleaved_1f1b(1, 2, 2),
                           loss_fn=mse_loss).step(x, y)
    whole = Sequential(Linear(6, 8), Tanh(), Linear(8, 3))
    assert loss == pytest.approx(engine.Pipeline(_Solo(), whole, sched,
                                                 loss_fn=mse_loss).step(x, y), rel=1e-12)


def test_partition_refuses_a_balance_that_is_no_list_of_whole_counts():
    layers = [Linear(4, 4), Tanh(), Linear(4, 4), Tanh()]
    taken = ("balance takes 'uniform', 'parameters', 'time' or a list of whole layer counts, "
             "one per stage")
    with pytest.raises(TypeError, match=re.escape(f"balance=8 (int): {taken}")):
        engine.partition(layers, 2, balance=8)
    with pytest.raises(TypeError, match=re.escape(
            f"balance=[2.5, 2.5]: 2.5, 2.5 are not whole numbers of layers; {taken}")):
        engine.partition(layers, 2, balance=[2.5, 2.5])
    with pytest.raises(TypeError, match=re.escape(
            f"balance=[3, 1.0]: 1.0 is not a whole number of layers; {taken}")):
        engine.partition(layers, 2, balance=[3, 1.0])
    assert engine.partition(layers, 2, balance=(3, np.int64(1))).counts == (3, 1)
    with pytest.raises(ValueError, match=r"balance \[3, 2\] must give 2 stages"):
        engine.partition(layers, 2, balance=[3, 2])


# ---- Pipeline: stage objects counted as given


def test_pipeline_counts_the_stage_objects_it_was_given():
    stage = Sequential(Linear(2, 2))
    with pytest.raises(ValueError, match=re.escape(
            "pp rank 0 holds stages [0] of '1f1b(1,2)' but was given 2 stage object(s)")):
        engine.Pipeline(_Solo(), [stage, stage], engine.schedules.one_f_one_b(1, 2),
                        loss_fn=mse_loss)


def _no_grid(world):
    import torch
    said = []
    for grid in (None, mesh):
        for call in (lambda: engine.Pipeline(grid, Sequential(Linear(2, 2)),
                                             engine.schedules.one_f_one_b(1, 2), loss_fn=mse_loss),
                     lambda: engine.distribute(torch.nn.Linear(2, 2), grid,
                                               sample=torch.ones(2, 2), loss_fn=mse_loss)):
            with pytest.raises(TypeError) as e:
                call()
            said.append(str(e.value))
    return said


def test_pipeline_and_distribute_given_no_grid_say_so():
    """A grid that is None (world.group's on a non-member) or no grid at all
    (the mesh module) raised "AttributeError: 'NoneType' object has no
    attribute 'size'" from inside, naming neither the rank nor the call."""
    said = mesh.spawn(_no_grid, 1, timeout=60)[0]
    tail = ": pass a mesh.Grid (mesh.grid(world, dp=..., pp=...)) or a meshrun communicator " \
           "(mesh.init()'s world)"
    none = "None (what world.group(ranks) returns on ranks that are not members)"
    assert said == [f"rank 0: engine.{call}: the grid is {what}{tail}"
                    for what in (none, "a module") for call in ("Pipeline", "distribute")], said


def _cut_wrong(world):
    import torch
    model = Sequential(Linear(2, 2), Tanh(), Linear(2, 2))
    said = []
    for kw in ({"num_stages": 4}, {"num_stages": 2, "balance": "x"},
               {"num_stages": 2, "balance": [1, 1]}):
        with pytest.raises(ValueError) as e:
            engine.partition(model, **kw)
        said.append(str(e.value))
    with pytest.raises(TypeError) as e:
        engine.parallelize(torch.nn.Linear(2, 2), mesh.grid(world, tp=1), {"": "colwise"})
    return said + [str(e.value)]


def test_partition_and_parallelize_errors_start_with_the_rank():
    """As every other error does: engine.partition's (each rank cuts its
    model alone) named neither the rank nor the call, and parallelize given a
    Grid for its tp group named no rank."""
    said = mesh.spawn(_cut_wrong, 1, timeout=60)[0]
    assert [s.split(": ")[:2] for s in said[:3]] == [["rank 0", "engine.partition"]] * 3, said
    assert said[0].endswith("cannot cut 3 layers into 4 stages: each stage needs at least "
                            "one layer"), said
    assert said[3].startswith("rank 0: parallelize: the tp group must be a meshrun "
                              "communicator"), said
    assert said[3].endswith("not a Grid (a mesh.Grid: pass its group('tp'))"), said
    # without a mesh, no rank to name: the call still
    with pytest.raises(ValueError, match="^engine.partition: unknown balance 'x'"):
        engine.partition(Sequential(Linear(2, 2), Tanh()), 2, balance="x")


def test_stages_for_rank_refuses_a_cut_of_another_stage_count():
    """A model cut into other than the schedule's stage count raised a bare
    IndexError (fewer) or silently left the last stages out (more: the
    loss taken on a middle stage's output)."""
    model = Sequential(Linear(3, 4), Tanh(), Linear(4, 4), Tanh(), Linear(4, 2))
    for stages, sched in ((2, engine.schedules.zb_v(2, 4)),
                          (3, engine.schedules.one_f_one_b(2, 4))):
        parts = engine.partition(model, stages)
        with pytest.raises(ValueError, match=re.escape(
                f"schedule {sched.name!r} runs {sched.num_stages} stages, but the model was "
                f"cut into {stages}: cut it into schedule.num_stages")):
            engine.stages_for_rank(parts, sched, 0)


def test_stages_for_rank_refuses_a_rank_the_schedule_lacks():
    """A rank past the schedule's (the world's rank given for the pp
    coordinate) raised a bare KeyError."""
    sched = engine.schedules.one_f_one_b(2, 4)
    parts = mlp_stages([3, 4, 2], sched.num_stages, 0)
    for rank in (2, -1):
        with pytest.raises(ValueError, match=re.escape(
                f"pp rank {rank} is not a rank of schedule '1f1b(2,4)', whose ranks are 0..1: "
                f"pass this rank's coordinate on the pp axis (grid.coord('pp'))")):
            engine.stages_for_rank(parts, sched, rank)
    assert engine.stages_for_rank(parts, sched, np.int64(1)) == [parts[1]]


def test_a_schedule_is_asked_for_by_name_where_it_is_given_otherwise():
    """A name ("1f1b", as distribute takes one) given to Pipeline,
    stages_for_rank or partition(schedule=) raised "'str' object has no
    attribute 'num_ranks'" (partition's only under balance='time', else it
    was ignored, as was a schedule of another stage count); a Schedule
    given as partition's stage count "'<' not supported between instances
    of 'Schedule' and 'int'"; distribute's schedule=None or a generator not
    called "'NoneType' object has no attribute 'lower'"; a Schedule given
    with other microbatches= ran its own count without a word; and
    mlp_stages given a Schedule or 0 stages raised from inside."""
    sched = engine.schedules.one_f_one_b(2, 4)
    model = Sequential(Linear(3, 4), Tanh(), Linear(4, 2))
    parts = engine.partition(model, 2)
    made = ("the schedule is an engine.Schedule (engine.schedules.one_f_one_b(p, m), "
            "engine.Schedule.build(ranks, ...)), not the str '1f1b': a name is "
            "engine.distribute's schedule= alone; make the Schedule, "
            "engine.schedules.by_name('1f1b', p, m)")
    for call, where in (
            (lambda: engine.Pipeline(_Solo(), parts[0], "1f1b", loss_fn=mse_loss),
             "pp rank 0: Pipeline"),
            (lambda: engine.stages_for_rank(parts, "1f1b", 0), "stages_for_rank"),
            (lambda: engine.partition(model, 2, schedule="1f1b"),
             "engine.partition(schedule=...)")):
        with pytest.raises(TypeError, match="^" + re.escape(f"{where}: {made}") + "$"):
            call()
    with pytest.raises(TypeError, match=re.escape(
            "engine.partition: num_stages=the Schedule '1f1b(2,4)': a whole number of stages "
            "(pass sched.num_stages, 2 for '1f1b(2,4)'; the schedule itself goes in "
            "schedule=)")):
        engine.partition(model, sched)
    with pytest.raises(ValueError, match=re.escape(
            "engine.partition: schedule 'zb_v(2,4)' has 4 stages, not 2")):
        engine.partition(model, 2, schedule=engine.schedules.zb_v(2, 4))
    with pytest.raises(TypeError, match=re.escape(          # (README's numpy model)
            "mlp_stages: num_stages=the Schedule '1f1b(2,4)': a whole number of stages (the "
            "schedule's: sched.num_stages)")):
        mlp_stages([3, 4, 2], sched)
    with pytest.raises(ValueError, match=re.escape("mlp_stages: num_stages=0: at least 1")):
        mlp_stages([3, 4, 2], 0)                            # (a bare IndexError)
    with pytest.raises(ValueError, match=re.escape(
            "mlp_stages: widths [3, 4, 2] make 2 Linear layers, too few for 4 stages")):
        mlp_stages([3, 4, 2], engine.schedules.zb_v(2, 4).num_stages)
    kw = {"loss_fn": mse_loss, "balance": "uniform", "verbose": False}
    for schedule, says in ((None, "not None"),
                           (engine.schedules.zb_v, "not the function zb_v: call it, zb_v(p, m)")):
        with pytest.raises(TypeError, match=re.escape(
                "schedule= takes 'auto', a name (gpipe, 1f1b, interleaved, zb-h1, zb-h2 or "
                f"zb-v), an engine.Schedule or a list of them, {says}")):
            engine.distribute(model, None, schedule=schedule, microbatches=4, **kw)
    with pytest.raises(ValueError, match=re.escape(
            "microbatches=8, but schedule '1f1b(2,4)' runs 4: a Schedule's micro-batches are "
            "its own (leave microbatches= out, or make it for 8)")):
        engine.distribute(model, None, schedule=sched, microbatches=8, **kw)
    with pytest.raises(ValueError, match=re.escape(
            "unknown schedule 'mine': use gpipe, 1f1b, interleaved, zb-h1, zb-h2 or zb-v, or "
            "'auto'; a schedule of your own is passed as the Schedule itself")):
        engine.distribute(model, None, schedule="mine", **kw)


# ---- Pipeline.step: targets of as many rows as the inputs


def _pairing_loss(y, t):
    """A hand-written loss that broadcasts, as many do: a target of fewer
    rows is paired with the output without a word."""
    d = y - t
    return float((d * d).mean()), 2 * (y - t.mean(axis=0)) / y.size


def _rows_apart(world, rows):
    """A step given targets of ``rows`` (8 inputs), then one given 8."""
    import collectives
    sched = engine.schedules.one_f_one_b(world.size, 4)
    mine = engine.stages_for_rank(mlp_stages([3, 4, 1], world.size, 0), sched, world.rank)
    pipe = engine.Pipeline(world, mine, sched, loss_fn=_pairing_loss, timeout=30)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 3)), rng.standard_normal((8, 1))
    try:
        pipe.step(x, y[:rows])
        said = "no error"
    except ValueError as e:
        said = str(e)
    grads = [float(np.abs(g).sum()) for st in pipe.stages.values() for g in st.grads()]
    loss = pipe.step(x, y)          # the pipeline goes on
    if world.size > 1:
        collectives.barrier(world, timeout=30)
    return said, grads, loss


@pytest.mark.timeout(60)
def test_a_step_refuses_targets_of_other_rows_than_its_inputs():
    """Targets of fewer rows than the inputs were cut into micro-batches of
    their own and paired with the inputs' by index: a loss (and gradients)
    of mispaired rows, without a word where the loss broadcasts."""
    said, grads, _ = _rows_apart(_Solo(), 4)
    pairing = ("each of the 4 micro-batches of the targets holds those of the inputs' "
               "micro-batch: as many rows, or c times as many (per-token targets, flattened)")
    assert said == f"pp rank 0: step(): its inputs have 8 rows but its targets 4: {pairing}", said
    assert not any(grads)
    for rows in (4, 7):             # across ranks: found at the step's end, rolled back
        got = mesh.spawn(_rows_apart, 2, rows, timeout=50)
        for r, (text, grads, loss) in enumerate(got):
            assert text == (f"rank {r} of world: pipeline step 0 (1f1b(2,4)): the inputs (pp "
                            f"rank 0) have 8 rows but the targets (pp rank 1) {rows}: "
                            f"{pairing}; rolled back on every rank"), text
            assert not any(grads), grads
        assert got[1][2] == pytest.approx(_rows_apart(_Solo(), 8)[2], rel=1e-12)
    # per-token targets flattened (c rows an input's, cut alike) pair: no error
    assert engine.pipeline_args._paired(4, 64, 4) and engine.pipeline_args._paired(8, 16, 4)
    assert not engine.pipeline_args._paired(5, 80, 2)        # (cut at 40 rows, not 2 * 16)


def _cut_by_hand(world):
    model = Sequential(Linear(3, 4), Tanh(), Linear(4, 4), Tanh(), Linear(4, 2))
    parts = engine.partition(model, 3)
    said = [_said_then_barrier(world, lambda: engine.Pipeline(
        world, [parts[world.rank]], engine.schedules.one_f_one_b(2, 2), loss_fn=mse_loss,
        timeout=30))]
    # a 4-stage V cut: stage r and 3 - r on rank r, picked as parts[r], parts[r + 2]
    sched = engine.Schedule.build([["0F0", "3F0", "3B0", "0B0"], ["1F0", "2F0", "2B0", "1B0"]],
                                  1, [0, 1, 1, 0], name="vee")
    parts = engine.partition(model, 4)
    return said + [_said_then_barrier(world, lambda: engine.Pipeline(
        world, [parts[world.rank], parts[world.rank + 2]], sched, loss_fn=mse_loss,
        timeout=30))]


@pytest.mark.timeout(60)
def test_a_pipeline_refuses_stages_of_a_cut_into_another_count_on_every_rank():
    """Stages picked by hand from a 3-stage cut for a 2-stage schedule ran,
    the last stage never run and the loss taken on stage 1's output; picked
    from a cut of the schedule's count but for other stages than theirs (a
    V's as parts[rank]), they ran another stage's layers, failing on a shape
    in a layer, or not at all where widths agree."""
    said = mesh.spawn(_cut_by_hand, 2, timeout=50)
    for r, (count, order) in enumerate(said):
        assert count.startswith(f"ValueError: rank {r}: Pipeline on group world: schedule "
                                f"'1f1b(2,2)' runs 2 stages, but pp rank {r}'s come from an "
                                f"engine.partition cut into 3"), said
        mine, given = [(0, 3), (1, 2)][r], 2 + r      # (each rank's own fault)
        assert order == (f"ValueError: rank {r}: Pipeline on group world: pp rank {r} holds "
                         f"stages {list(mine)} of 'vee' but was given engine.partition's stage "
                         f"{given} for stage {mine[1]}: pass engine.stages_for_rank(parts, "
                         f"schedule, grid.coord('pp')), this rank's stages in stage order"), said


# ---- Pipeline: every pp rank given the same schedule


def _other_schedules(world, names):
    sched = engine.schedules.by_name(names[world.rank], world.size, 4 if world.rank else 2)
    mine = engine.stages_for_rank(mlp_stages([3, 4, 2], sched.num_stages, 0), sched, world.rank)
    try:
        engine.Pipeline(world, mine, sched, loss_fn=mse_loss, timeout=60)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("names", [("1f1b", "1f1b"), ("1f1b", "gpipe")])
def test_pipeline_ranks_given_other_schedules_all_raise_at_once(names):
    """pp ranks given other schedules (micro-batch counts) waited for each
    other's messages until the timeout (300 s by default), or paired
    micro-batches of other sizes into a raw numpy error in the loss."""
    said = mesh.spawn(_other_schedules, 2, names, timeout=50)
    for r, text in enumerate(said):
        assert text.startswith(f"rank {r}: Pipeline on group world: its pp ranks were "
                               f"given different schedules or tag_bases (pp ranks [0]: schedule "
                               f"'1f1b(2,2)' ("), said
        assert f"pp ranks [1]: schedule '{names[1]}(2,4)' (" in text, said


def _one_rank_wrong(world, what):
    sched = engine.schedules.by_name("1f1b", world.size, 2)
    mine = engine.stages_for_rank(mlp_stages([3, 4, 2], sched.num_stages, 0), sched, world.rank)
    kw = {"tag_base": (1 << 40) if world.rank == 0 else 0} if what == "tag_base" else \
        {"loss_fn": None if world.rank == 1 else mse_loss}
    return _said_then_barrier(world, lambda: engine.Pipeline(
        world, mine, sched, **{"loss_fn": mse_loss, **kw}, timeout=30))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what, says", [
    ("tag_base", f"pp rank 0's tag_base {1 << 40} is out of range: this pipeline's tags need "
                 f"0 <= tag_base <= 2**32 - 1 - 8"),
    ("loss_fn", "pp rank 1 holds the last stage: it needs a loss_fn")])
def test_a_pipeline_argument_wrong_on_one_rank_fails_every_rank(what, says):
    """It raised alone, before the Pipeline's gather: the other ranks waited
    there for it (their timeout), or met its next call (a MismatchError
    naming barrier and all_gather_object, not what was wrong)."""
    said = mesh.spawn(_one_rank_wrong, 2, what, timeout=50)
    for r, text in enumerate(said):
        assert text == f"ValueError: rank {r}: Pipeline on group world: {says}", said


def test_mse_loss_refuses_a_target_it_would_broadcast():
    """A target of (n, 1) for an output of (n, 2) was broadcast over it: a
    loss and gradients of the wrong problem, without a word."""
    y = np.ones((4, 2))
    with pytest.raises(ValueError, match=r"mse_loss: a target of shape \(4, 1\) for an output "
                                         r"of shape \(4, 2\): they must match"):
        mse_loss(y, np.ones((4, 1)))
    assert mse_loss(y, np.zeros((4, 2)))[0] == 1.0


class _ShapeError(ValueError):
    """A user's error whose constructor takes other arguments than a message."""

    def __init__(self, want, got):
        super().__init__(f"wanted {want} features, got {got}")


class _Proxy:
    """A stage wrapper that fails when asked for its forward."""

    def __init__(self, stage):
        self.stage = stage

    def __getattr__(self, name):
        if name == "forward":
            raise _ShapeError(4, 5)
        return getattr(self.stage, name)


def _own_error_class_on_one_rank(world):
    import collectives
    sched = engine.schedules.by_name("1f1b", world.size, 2)
    mine = engine.stages_for_rank(mlp_stages([3, 4, 2], sched.num_stages, 0), sched, world.rank)
    if world.rank == 1:
        mine = [_Proxy(s) for s in mine]
    try:
        engine.Pipeline(world, mine, sched, loss_fn=mse_loss, timeout=30)
        said = "no error"
    except Exception as e:
        import traceback
        frames = [f.name for f in traceback.extract_tb(e.__traceback__)]
        said = f"{type(e).__name__}: {e}", "__getattr__" in frames
    collectives.barrier(world, timeout=30)      # (every rank stays, as a caller that goes on)
    return said


@pytest.mark.timeout(60)
def test_a_pipeline_error_of_a_class_taking_other_arguments_keeps_its_message_and_traceback():
    """Told again with the rank, it was re-made as type(e)(message): a
    TypeError about its class's __init__ on the rank that failed, its own
    error and traceback lost."""
    said = mesh.spawn(_own_error_class_on_one_rank, 2, timeout=50)
    for r, (text, _) in enumerate(said):
        assert text == (f"ValueError: rank {r}: Pipeline on group world: wanted 4 features, "
                        "got 5"), said
    assert said[1][1], said      # its traceback goes down to where it was raised


def _distribute_sample_of_no_rows(world):
    model = Sequential(*mlp_stages([5, 8, 3], 1, seed=0)[0].layers)
    said = []
    # a float on rank 1; a dict (a Hugging Face batch, model(**batch)) on every rank: its
    # len() was taken for its rows, and the layers' timing failed on "unhashable type:
    # 'slice'", naming neither the sample nor what a batch is
    for sample in (np.zeros((8, 5)) if world.rank == 0 else 5.0, {"x": np.zeros((8, 5))}):
        said.append(_said_then_barrier(world, lambda: engine.distribute(
            model, mesh.grid(world, pp=2), schedule="1f1b", microbatches=2, balance="uniform",
            loss_fn=mse_loss, sample=sample, verbose=False, overhead=0.0, timeout=20),
            timeout=20))
    return said


@pytest.mark.timeout(60)
def test_a_distribute_sample_without_rows_on_one_rank_fails_every_rank():
    """len() of it raised a bare TypeError on that rank alone, before the
    sample's gather: the others waited there until their timeout."""
    said = mesh.spawn(_distribute_sample_of_no_rows, 2, timeout=50)
    for r, (text, keyed) in enumerate(said):
        assert text == (f"ValueError: rank {r}: engine.distribute: rank 1's sample: object of "
                        "type 'float' has no len()"), said
        assert keyed == (f"ValueError: rank {r}: engine.distribute: rank 0's sample: a batch "
                         "is an array, a tensor or a tuple of them (a model of several inputs "
                         "takes them as a tuple, in its forward's order), not a dict (x)"), said


def _clip_nan(world):
    sched = engine.schedules.by_name("1f1b", world.size, 2)
    mine = engine.stages_for_rank(mlp_stages([3, 4, 2], sched.num_stages, 0), sched, world.rank)
    pipe = engine.Pipeline(world, mine, sched, loss_fn=mse_loss, timeout=20)
    rng = np.random.default_rng(0)
    pipe.step(rng.standard_normal((4, 3)), rng.standard_normal((4, 2)))
    before = [g.copy() for st in pipe.stages.values() for g in st.grads()]
    norm = pipe.clip_grad_norm_(float("nan"))
    after = [g for st in pipe.stages.values() for g in st.grads()]
    return norm, all((a == b).all() for a, b in zip(before, after))


@pytest.mark.timeout(60)
def test_clip_grad_norm_given_the_same_nan_max_norm_everywhere_is_no_mismatch():
    """nan != nan: every rank raised that the ranks were given other
    arguments ("ranks []: ... max_norm nan; ranks []: ... max_norm nan");
    as before, nothing is clipped and the norm is returned."""
    said = mesh.spawn(_clip_nan, 2, timeout=50)
    assert said[0] == said[1] and said[0][1] and np.isfinite(said[0][0]), said


# ---- examples/train_pipeline.py --help


def test_train_pipeline_help_names_every_schedule_it_runs():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_pipeline.py"),
                          "--help"], capture_output=True, text=True, timeout=60, check=True,
                         env={**os.environ, "PYTHONPATH": ROOT}).stdout
    for name in ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zb-v"):
        assert name in out, out


# ---- Pipeline: ranks mixing eval_step() and step()


def _eval_beside_step(world, evaluating):
    """Rank ``evaluating`` calls eval_step() where the other calls step(),
    then both step() alike."""
    import collectives
    sched = engine.schedules.one_f_one_b(2, 2)
    mine = engine.stages_for_rank(mlp_stages([3, 4, 1], 2, 0), sched, world.rank)
    pipe = engine.Pipeline(world, mine, sched, loss_fn=mse_loss, timeout=30)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 1))
    call = pipe.eval_step if world.rank == evaluating else pipe.step
    try:
        call(x, y)
        said = "no error"
    except ValueError as e:
        said = str(e)
    grads = [float(np.abs(g).sum()) for g in mine[0].grads()]
    loss = pipe.step(x, y)          # the pipeline goes on
    collectives.barrier(world, timeout=30)
    return said, grads, loss


@pytest.mark.timeout(60)
def test_ranks_mixing_eval_step_and_step_all_raise():
    """The first stage's rank evaluating while the last stage's trains:
    the messages pair up, so the step ended without a word, the last
    stage's gradients taken and the first's left out (the stages drifting
    apart). Every rank now raises, naming who called which, the step is
    rolled back, and the next step runs."""
    got = mesh.spawn(_eval_beside_step, 2, 0, timeout=50)
    for r, (said, grads, loss) in enumerate(got):
        assert said == (f"rank {r} of world: pipeline step 0 (1f1b(2,2)): ranks [0] of world "
                        "called eval_step() where ranks [1] called step(): every rank calls "
                        "the same, as often (an evaluation takes a step's tags); rolled back "
                        "on every rank"), said
        assert not any(grads)
        assert isinstance(loss, float) and loss == got[1][2], (r, loss)   # (on every rank)
