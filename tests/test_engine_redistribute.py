"""One model object distributed (partitioned, parallelized) twice.

A user distributes the same model again to change the plan or the
schedule, or re-runs a notebook cell: the second job is made from the
model as it now is, with the first job kept or dropped. A model whose
embedding and head share one weight (tied) hung there: the first cut
untied the head's copy in the model's own module on the head's rank
only, so the second cut found the tie on the embedding's rank alone,
which broadcast its value to a rank that never came (engine.stagebuild_ties's
``untie``). Short timeouts: a hang fails in seconds, not the 60 s default.
"""
import copy

import numpy as np
import pytest

import engine
import mesh
from engine.layers import Linear, Sequential, Tanh, mse_loss, sgd
from engine.torch_stage import torch_loss

LR, TIMEOUT = 0.1, 15
PATIENT = {"MESH_PEER_TIMEOUT": "60"}


def _torch_model(tied):
    import torch
    from torch import nn
    torch.manual_seed(7)
    model = nn.Sequential(nn.Embedding(8, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                          nn.Linear(4, 8, bias=False)).double()
    if tied:
        model[4].weight = model[0].weight
    return model


def _numpy_model(tied):
    rng = np.random.default_rng(7)
    model = Sequential(Linear(4, 4, rng), Tanh(), Linear(4, 4, rng), Tanh(), Linear(4, 4, rng))
    if tied:
        model.layers[4].weight = model.layers[0].weight
    return model


def _ids_loss(out, t):
    import torch
    return torch.nn.functional.cross_entropy(out.flatten(0, 1), t.flatten())


def _batch(kind):
    rng = np.random.default_rng(3)
    if kind == "torch":
        import torch
        return (torch.from_numpy(rng.integers(0, 8, (4, 3))),
                torch.from_numpy(rng.integers(0, 8, (4, 3))))
    return rng.standard_normal((4, 4)), rng.standard_normal((4, 4))


def _redistributed(world, kind, tied, keep):
    """Distribute one model twice over pp=2 (the first job kept or
    dropped), then one SGD step of the second; its loss and state (rank 0)."""
    if kind == "torch":
        import torch
        torch.set_num_threads(1)
    model = _torch_model(tied) if kind == "torch" else _numpy_model(tied)
    loss_fn = _ids_loss if kind == "torch" else mse_loss
    grid = mesh.grid(world, pp=2)
    first = engine.distribute(model, grid, schedule="1f1b", microbatches=2, balance=[2, 3],
                              loss_fn=loss_fn, verbose=False, timeout=TIMEOUT)
    if not keep:
        del first
    else:
        assert first.parameters()       # (alive until the second job is made)
    job = engine.distribute(model, grid, schedule="gpipe", microbatches=2, balance=[2, 3],
                            loss_fn=loss_fn, verbose=False, timeout=TIMEOUT, tag_base=1 << 20)
    loss = job.step(*_batch(kind))
    if kind == "torch":
        import torch
        torch.optim.SGD(job.parameters(), lr=LR).step()
    else:
        sgd(job.stages, LR)
    state = job.state_dict()
    if state is not None:
        state = {k: np.array(v.detach() if kind == "torch" else v) for k, v in state.items()}
    return loss, state


def _one_process(kind, tied):
    """The same step on one process, on a fresh model: its loss and state."""
    x, y = _batch(kind)
    if kind == "torch":
        import torch
        model = _torch_model(tied)
        loss = _ids_loss(model(x), y)
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=LR).step()
        return float(loss.detach()), {k: v.detach().numpy() for k, v in model.state_dict().items()}
    model = _numpy_model(tied)
    out, ctx = model.forward(x)
    loss, grad = mse_loss(out, y)
    model.backward(ctx, grad)
    for layer in model.layers:
        sgd([layer], LR)        # (a shared weight: each layer's gradient taken off in turn)
    return loss, {f"{i}.{j}": np.array(p) for i, layer in enumerate(model.layers)
                  for j, p in enumerate(layer.params())}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("tied,keep", [(True, False), (True, True), (False, False)])
def test_distributing_one_model_twice_trains_as_one_process(kind, tied, keep):
    """The second job of one model object, tied or not, the first job kept
    or dropped, trains as one process trains a fresh copy (the tied case
    hung in the second distribute's tie broadcast on the embedding's rank)."""
    if kind == "torch":
        pytest.importorskip("torch")
    want_loss, want = _one_process(kind, tied)
    got = mesh.spawn(_redistributed, 2, kind, tied, keep, timeout=120, env=PATIENT)
    losses = [loss for loss, _ in got if loss is not None]
    assert losses and all(abs(loss - want_loss) < 1e-10 for loss in losses), (losses, want_loss)
    state = got[0][1]
    assert sorted(state) == sorted(want)
    for k in want:
        np.testing.assert_allclose(state[k], want[k], rtol=1e-10, atol=1e-12, err_msg=k)


def _partitioned_twice(world):
    """engine.partition of one tied model twice, a Pipeline of each."""
    import torch
    torch.set_num_threads(1)
    model = _torch_model(True)
    sched = engine.schedules.gpipe(2, 2)
    pp = world.group(list(range(world.size)))
    out = []
    for tag in (0, 1 << 20):
        parts = engine.partition(model, 2, balance=[2, 3], stages=[world.rank])
        pipe = engine.Pipeline(pp, parts[world.rank], sched, loss_fn=torch_loss(_ids_loss),
                               timeout=TIMEOUT, tag_base=tag)
        out.append((parts.ties, pipe.step(*_batch("torch"))))
    return out


@pytest.mark.timeout(120)
def test_partitioning_one_tied_model_twice_finds_the_same_ties():
    """engine.partition of the same tied model again (its Pipeline built):
    every rank finds the tie again, and the second Pipeline runs as the
    first (it hung in the tie's broadcast, which rank 0 alone made)."""
    pytest.importorskip("torch")
    got = mesh.spawn(_partitioned_twice, 2, timeout=100, env=PATIENT)
    for ties, _ in got[0] + got[1]:
        assert [(t.name, t.stages) for t in ties] == [("0.weight", (0, 1))]
    losses = [loss for _, loss in got[1]]
    assert losses[0] is not None and abs(losses[0] - losses[1]) < 1e-12


def test_untie_twice_keeps_the_copy_and_reties_one_stage():
    """Without processes: a second cut of one model keeps the first's copy
    of the head's weight (a job of the first cut trains it), and a cut
    that puts embedding and head in one stage makes them one parameter
    again, as the model was built."""
    pytest.importorskip("torch")
    model = _torch_model(True)
    shared = model[0].weight
    parts = engine.partition(model, 2, balance=[2, 3])
    assert model[4].weight is not shared and model[0].weight is shared
    copied = model[4].weight
    again = engine.partition(model, 2, balance=[3, 2])
    assert [(t.name, t.stages) for t in again.ties] == [("0.weight", (0, 1))]
    assert model[4].weight is copied and parts.ties == again.ties
    whole = engine.partition(model, 1)
    assert model[4].weight is shared and not whole.ties
    split = engine.partition(copy.deepcopy(model), 2, balance=[2, 3])      # (a copy: as made)
    assert [(t.name, t.stages) for t in split.ties] == [("0.weight", (0, 1))]


def _tied_on_rank_0_only(world):
    """A model whose head shares the embedding's weight on rank 0 only (the
    same values elsewhere, so the models' fingerprints agree)."""
    import torch
    torch.set_num_threads(1)
    model = _torch_model(world.rank == 0)
    if world.rank:
        model[4].weight = torch.nn.Parameter(model[0].weight.detach().clone())
    try:
        engine.distribute(model, mesh.grid(world, pp=2), schedule="1f1b", microbatches=2,
                          balance=[2, 3], loss_fn=_ids_loss, verbose=False, timeout=TIMEOUT)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.timeout(120)
def test_a_weight_shared_on_some_ranks_only_is_refused_on_every_rank():
    """The pp ranks' ties are compared where the Pipeline checks their cut:
    a tie that one rank marks and the other does not is refused on both at
    once, naming it (rank 0 broadcast the tie's value alone, and both
    waited out their timeout)."""
    pytest.importorskip("torch")
    got = mesh.spawn(_tied_on_rank_0_only, 2, timeout=100, env=PATIENT)
    for rank, said in enumerate(got):
        assert said is not None and said.startswith(f"rank {rank}: Pipeline on group"), said
        assert ("pp ranks [0] mark tied parameter '0.weight' (stages [0, 1]) on their stages, "
                "pp ranks [1], which hold stages of it too, do not") in said


def _trained_then_again(world, as_list, regrid):
    """A job trains a step; the same model object distributed again (the
    error each rank raises), on the same grid or over dp; then the way out:
    a copy made before the first distribute, distributed, the trained state
    loaded (rank 0's, sent)."""
    import torch
    import collectives
    torch.set_num_threads(1)
    model = _torch_model(False)
    model = list(model) if as_list else model
    fresh = copy.deepcopy(model)
    grid = mesh.grid(world, pp=2)
    kw = dict(schedule="1f1b", microbatches=2, balance=[2, 3], loss_fn=_ids_loss,
              verbose=False, timeout=TIMEOUT)
    job = engine.distribute(model, grid, **kw)
    job.step(*_batch("torch"))
    torch.optim.SGD(job.parameters(), lr=LR).step()
    x = _batch("torch")[0]
    refused = None
    if not as_list:     # (its own forward: each rank's copy is part trained, part stale)
        try:
            model.eval()(x)
        except RuntimeError as e:
            refused = str(e)
    try:
        if regrid:      # (replicas are not compared: each rank's stale layers went unseen)
            engine.distribute(model, mesh.grid(world, dp=2, pp=1), schedule="gpipe",
                              microbatches=1, balance="uniform", loss_fn=_ids_loss,
                              verbose=False, timeout=TIMEOUT, tag_base=1 << 20)
        else:
            engine.distribute(model, grid, tag_base=1 << 20, **kw)
        said = None
    except ValueError as e:
        said = str(e)
    state = job.state_dict()
    whole = collectives.broadcast_state(world, state, root=0)
    again = engine.distribute(fresh, grid, tag_base=2 << 20, **kw)
    again.load_state_dict(whole)
    loaded = again.state_dict()
    same = None if state is None else all(torch.equal(state[k], loaded[k]) for k in state)
    if as_list:
        return said, same, None, None
    built = _torch_model(False)     # the whole state loaded into the object: it runs again
    built.load_state_dict(whole)
    model.load_state_dict(whole)
    return said, same, refused, torch.equal(model(x), built(x))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("as_list,regrid", [(False, False), (True, False), (False, True)])
def test_a_trained_model_distributed_again_is_refused_saying_why(as_list, regrid):
    """After a job trained, each rank's copy of the model holds its own
    stages' training only: distributing that object (an nn.Sequential, a
    list of layers) again is refused on every rank at once, naming the
    layer, the ranks and the way out (it was refused as a model "built"
    differently on the ranks, seeded apart; over dp, whose replicas are not
    compared, it took rank 0's stale layers without a word), and the way
    out (a copy, the state loaded) holds the trained weights."""
    pytest.importorskip("torch")
    got = mesh.spawn(_trained_then_again, 2, as_list, regrid, timeout=100, env=PATIENT)
    for rank, (said, _, refused, runs) in enumerate(got):
        assert said is not None and said.startswith(f"rank {rank}: engine.distribute: this "
                                                    "model object was distributed before")
        assert "layer 0 ('0') holds other values on ranks [1] than on ranks [0]" in said
        assert "copy.deepcopy(model)" in said and "load_state_dict" in said
        if not as_list:     # its own forward refused (it ran, wrong), until a whole state
            assert refused is not None and refused.startswith(
                f"rank {rank} (pp rank {rank}): this model object was cut into pipeline "
                "stages by engine.distribute"), refused
            assert f"(its layers {['0-1', '2-4'][rank]} of 5;" in refused
            assert "job.eval_step(x, y, outputs=True)" in refused
            assert "job.state_dict()" in refused and runs is True
    assert got[0][1] is True


def _sharded_then_again(world, kind, plan_again):
    if kind == "torch":
        import torch
        from torch import nn
        torch.set_num_threads(1)
        torch.manual_seed(7)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)).double()
        loss_fn = torch.nn.functional.mse_loss
    else:
        rng = np.random.default_rng(7)
        model = Sequential(Linear(4, 8, rng), Tanh(), Linear(8, 4, rng))
        loss_fn = mse_loss
    grid = mesh.grid(world, pp=1, tp=2)
    plan = {"0": "colwise", "2": "rowwise"}
    kw = dict(schedule="gpipe", microbatches=1, balance="uniform", loss_fn=loss_fn,
              verbose=False, timeout=TIMEOUT)
    engine.distribute(model, grid, plan=plan, **kw)
    if kind == "torch":     # pp=1: each rank holds every layer (its shards): its forward runs
        model(torch.ones(3, 4, dtype=torch.float64))
    try:
        engine.distribute(model, grid, plan=plan if plan_again else None, tag_base=1 << 20, **kw)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_a_model_sharded_by_a_plan_distributed_again_is_refused(kind):
    """A plan shards the model in place (each rank keeps its part):
    distributing it again, with a plan or without, is refused on every
    rank at once, naming the sharded layers and the way out (it was refused
    as a model "built" differently on the ranks, seeded apart)."""
    if kind == "torch":
        pytest.importorskip("torch")
    for plan_again in (True, False):
        got = mesh.spawn(_sharded_then_again, 2, kind, plan_again, timeout=100, env=PATIENT)
        for rank, said in enumerate(got):
            assert said is not None and said.startswith(
                f"rank {rank}: engine.distribute: the model's '0', '2' are tensor-parallel "
                "shards already"), said
            assert "copy.deepcopy(model)" in said
