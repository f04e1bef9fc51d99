"""engine.partition: cutting unmodified models into stages, balanced by
layer count, parameters or simulated time; tied weights kept equal."""
import dataclasses
import functools
import importlib
import io
import time

import numpy as np
import pytest

from engine import Pipeline, partition, schedules
from engine import layers as L
from engine.partition import cut_points
from engine.partition_cuts import _best_simulated

P = importlib.import_module("engine.partition_cuts")    # (_best_simulated reads _EXHAUSTIVE there)

torch = pytest.importorskip("torch")
nn = torch.nn


class _Solo:
    rank, size = 0, 1


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 64), nn.Tanh(),
                         nn.Linear(64, 64), nn.Linear(64, 2)).double()


def test_counts_by_layers_parameters_and_list():
    model = _mlp()
    assert partition(model, 4).counts == (1, 2, 1, 2)
    # parameters 40, 0, 576, 0, 4160, 130: the big layer alone
    assert partition(model, 3, "parameters").counts == (4, 1, 1)
    assert str(partition(model, 3, "parameters")).splitlines() == [
        "3 stages of 6 layers", "  stage 0: layers 0-3  616 parameters  Linear, Tanh, Linear, Tanh",
        "  stage 1: layer 4  4,160 parameters  Linear", "  stage 2: layer 5  130 parameters  Linear"]
    stages = partition(model, 2, [5, 1])
    assert [len(s) for s in stages] == [5, 1] and stages[1][0] is model[5]
    assert cut_points([1, 1, 1, 1, 5, 1], 3) == [4, 1, 1]
    np_model = L.Sequential(*L.mlp_stages([3, 4, 5, 6, 2], 1)[0].layers)
    parts = partition(np_model, 2, "parameters")
    assert all(isinstance(s, L.Sequential) for s in parts) and sum(parts.counts) == 7


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else x          # control flow on a value: no trace


def test_errors_before_any_step_name_the_numbers():
    model = _mlp()
    with pytest.raises(ValueError, match="cannot cut 6 layers into 7 stages"):
        partition(model, 7)
    with pytest.raises(ValueError, match=r"balance \[1, 2\] must give 3 stages.*gives 2 stages, "
                                         r"3 layers"):
        partition(model, 3, [1, 2])
    with pytest.raises(ValueError, match="balance='time' measures each of the 6 layers.*sample="):
        partition(model, 3, "time")
    with pytest.raises(TypeError, match="torch.fx cannot trace Gate.forward.*nn.Sequential"):
        partition(Gate(), 1)
    with pytest.raises(ValueError, match="layer 1 has no parameter 'weight'"):
        partition(model, 2, tied=[("0.weight", "1.weight")])


def test_torch_stages_train_like_the_whole_model():
    """The Pipeline takes the partition's nn.Sequential stages as they are."""
    model = _mlp()
    whole = _mlp()
    sched = schedules.interleaved_1f1b(1, 3, 3)
    stages = partition(model, 3, "parameters")
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    loss_fn = lambda out, t: (float(((out - t) ** 2).mean()), 2 * (out - t) / out.numel())
    loss = Pipeline(_Solo(), list(stages), sched, loss_fn=loss_fn).step(x, y)
    ref = ((whole(x) - y) ** 2).mean()
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-12)
    for a, b in zip(model.parameters(), whole.parameters(), strict=True):
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_specs_build_only_the_stages_asked_for():
    built = []

    def counted(cls, *args):
        built.append(cls.__name__)
        return cls(*args)

    specs = [functools.partial(counted, nn.Linear, 4, 8), nn.Tanh,
             (counted, (nn.Linear, 8, 2), {}), lambda x: x * 2]
    parts = partition(specs, 2, "parameters", stages=[1])
    assert parts[0] is None and parts.counts == (1, 3)
    assert built == ["Linear"] * 3     # both counted (on the meta device), then one built
    assert parts[1][1].weight.device.type == "cpu"
    assert parts[1][2](torch.ones(1)).item() == 2.0   # the function became a module


class _TBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.tanh(self.a(x))


class _Typed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(4096, 8)          # 32768 parameters, a block 72
        self.blocks = nn.ModuleList([_TBlock() for _ in range(4)])
        self.head = nn.Linear(8, 4)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_type_balance_spreads_the_layers_of_a_class_as_deepspeeds_does():
    """balance="type:REGEX" (DeepSpeed's partition_method="type:..."): the
    layers whose class matches (case ignored) spread evenly, whatever the
    others weigh (by parameters the embedding stands alone); specs go by
    the class they build, a traced forward's pieces by the modules they
    call, and engine.distribute cuts alike. A pattern that names no layer,
    or is no regex, raises naming the classes."""
    import engine
    import mesh
    torch.manual_seed(0)
    model = _Typed()
    layers = nn.Sequential(model.embed, *model.blocks, model.head)
    assert partition(layers, 2, "parameters").counts == (1, 5)
    assert partition(layers, 2, "type:block").counts == (3, 3)
    assert partition(layers, 3, "type:^_TBlock$").counts == (2, 2, 2)
    specs = [functools.partial(nn.Embedding, 4096, 8), _TBlock, _TBlock, _TBlock,
             (_TBlock, (), {}), (nn.Linear, (8, 4), {})]
    assert partition(specs, 2, "type:BLOCK", stages=[1]).counts == (3, 3)
    assert partition(model, 2, "type:block").counts == (3, 3)          # traced
    with mesh.init() as world:
        job = engine.distribute(_Typed(), mesh.grid(world, pp=1), schedule="zb-v",
                                microbatches=2, balance="type:block", verbose=False,
                                loss_fn=lambda o, y: torch.nn.functional.mse_loss(o, y))
        assert tuple(job.counts) == (3, 3)
    with pytest.raises(ValueError, match=r"balance='type:attn' matches no layer's class "
                                         r"\(the layers' classes: Embedding, Linear, _TBlock\)"):
        partition(layers, 2, "type:attn")
    with pytest.raises(ValueError, match="'\\(' is not a regular expression"):
        partition(layers, 2, "type:(")


def test_time_balance_is_chosen_by_simulation(monkeypatch):
    """With ZB-V's placement (rank r holds stages r and 3-r) the cut that
    minimises the largest stage is not the fastest step; the simulator's is."""
    f = [1, 1, 1, 1, 6, 1, 1, 1, 1, 1]
    costs = {"F": f, "I": f, "W": f}
    sched = schedules.zb_v(2, 4)
    best = _best_simulated(costs, sched)
    minmax = cut_points([3 * c for c in f], 4)

    def step(counts):
        per = {k: [sum(v[a:a + c]) for a, c in zip(np.cumsum([0] + counts), counts)]
               for k, v in costs.items()}
        return sched.simulate(per).makespan

    assert step(best) < step(minmax)
    monkeypatch.setattr(P, "_EXHAUSTIVE", 0)          # many layers: hill climbing from the DP cut
    assert step(best) <= step(_best_simulated(costs, sched)) < step(minmax)


def test_time_balance_measures_each_layer_on_the_sample():
    slow = lambda x: (time.sleep(0.02), x)[1]
    layers = [nn.Linear(4, 4), nn.Tanh(), slow, nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)]
    parts = partition(layers, 3, "time", sample=torch.randn(2, 4), reps=1)
    f = parts.layer_costs["F"]
    assert f[2] >= 0.02 and f.index(max(f)) == 2
    assert parts.counts[1] == 1 or parts.counts[0] == 3 or parts.counts[2] == 4
    assert parts.stage_costs()["F"] == pytest.approx(
        [sum(f[:parts.counts[0]]), sum(f[parts.counts[0]:-parts.counts[2]]),
         sum(f[-parts.counts[2]:])])


def _tied_torch():
    torch.manual_seed(1)
    first, head = nn.Linear(4, 4), nn.Linear(4, 4)
    head.weight = first.weight
    return nn.Sequential(first, nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), head).double()


def test_tied_weights_on_one_rank():
    model, whole = _tied_torch(), _tied_torch()
    stages = partition(model, 2, [2, 3])
    (tie,) = stages.ties
    assert tie.name == "0.weight" and tie.stages == (0, 1)
    assert stages[1][2].weight is not stages[0][0].weight        # untied into a copy
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    loss_fn = lambda out, t: (float(((out - t) ** 2).mean()), 2 * (out - t) / out.numel())
    Pipeline(_Solo(), list(stages), schedules.interleaved_1f1b(1, 2, 2), loss_fn=loss_fn).step(x, y)
    ((whole(x) - y) ** 2).mean().backward()
    for copy in (stages[0][0].weight, stages[1][2].weight):
        np.testing.assert_allclose(copy.grad.numpy(), whole[0].weight.grad.numpy(), rtol=1e-10)


def test_every_rank_finds_a_tie_between_stages_it_does_not_all_hold():
    """Each rank builds only its stages (stages=, as engine.distribute asks),
    yet finds the tie with a stage another rank holds: the same Tie on both,
    the mark on its own copy. (It went unseen: the copies trained apart.)"""
    whole = partition(_tied_torch(), 2, [2, 3])
    for s in (0, 1):
        mine = partition(_tied_torch(), 2, [2, 3], stages=[s])
        assert mine.ties == whole.ties, (s, mine.ties)
        assert [tie for tie, _ in mine[s].tied] == list(whole.ties)
        assert mine[1 - s] is None


def _cut_apart(world, counts):
    """Each rank cuts by its own counts (a balance= that differs, or
    balance='time' timed on each rank alone) and builds its stage."""
    import mesh
    stages = partition(_mlp(), 2, counts[world.rank], stages=[world.rank])
    loss_fn = lambda out, t: (float(((out - t) ** 2).mean()), 2 * (out - t) / out.numel())
    try:
        Pipeline(world, stages[world.rank], schedules.gpipe(2, 2), loss_fn=loss_fn)
        return "built"
    except (ValueError, mesh.MeshError) as e:
        return f"{type(e).__name__}: {e}"


def test_ranks_that_cut_apart_are_refused_before_any_step():
    """Stages of different cuts skipped or repeated layers, silently (the
    loss simply wrong); every rank now raises, naming each rank's cut."""
    import mesh
    said = mesh.spawn(_cut_apart, 2, [[2, 4], [3, 3]], timeout=60)
    for text in said:
        assert text.startswith("ValueError: rank ") and ("Pipeline on group world: the pp "
                                                         "ranks' stages come from different "
                                                         "engine.partition cuts") in text, said
        assert "pp rank 0: [2, 4], pp rank 1: [3, 3]" in text, said
    assert mesh.spawn(_cut_apart, 2, [[3, 3], [3, 3]], timeout=60) == ["built"] * 2


def _one_rank_cut_apart(world):
    """pp rank 0's two stages (interleaved) come from two different cuts."""
    import collectives
    import mesh
    sched = schedules.interleaved_1f1b(2, 4, 2)
    mine = sched.stages_of(world.rank)
    a = partition(_mlp(), 4, [1, 1, 2, 2])
    b = partition(_mlp(), 4, [2, 1, 1, 2]) if world.rank == 0 else a
    loss_fn = lambda out, t: (float(((out - t) ** 2).mean()), 2 * (out - t) / out.numel())
    try:
        Pipeline(world, [a[mine[0]], b[mine[1]]], sched, loss_fn=loss_fn, timeout=30)
        said = "built"
    except (ValueError, mesh.MeshError) as e:
        said = f"{type(e).__name__}: {e}"
    collectives.barrier(world, timeout=30)      # (every rank stays, as a caller that goes on)
    return said


def test_a_rank_whose_own_stages_cut_apart_fails_every_rank():
    """It raised alone, before the Pipeline's gather, where the other ranks
    waited for it (their timeout; a LostPeerError once it exited)."""
    import mesh
    said = mesh.spawn(_one_rank_cut_apart, 2, timeout=60)
    for r, text in enumerate(said):
        assert text == (f"ValueError: rank {r}: Pipeline on group world: pp rank 0's stages "
                        f"[0, 2] come from different engine.partition cuts: [(1, 1, 2, 2), "
                        f"(2, 1, 1, 2)]"), said


def _time_cut_without_a_sample(world, who):
    import collectives
    import mesh
    x = torch.randn(8, 4)
    try:
        cut = partition(_mlp(), 2, "time", sample=None if world.rank == who else x,
                        group=world)
        said = f"cut {[len(s) for s in cut]}"
    except (ValueError, mesh.MeshError) as e:
        said = f"{type(e).__name__}: {e}"
    collectives.barrier(world, timeout=30)      # (every rank stays, as a caller that goes on)
    return said


def test_a_time_cut_whose_timing_rank_has_no_sample_fails_every_rank():
    """With group=, the first rank times the layers: without a sample it
    raised alone, the others waiting in its broadcast (their timeout; a
    LostPeerError once it exited). Another rank needs none."""
    import mesh
    said = mesh.spawn(_time_cut_without_a_sample, 2, 0, timeout=60)
    assert said[0].startswith("ValueError: rank 0: engine.partition: balance='time' measures "
                              "each of the "), said
    assert said[1].startswith("ValueError: rank 1: engine.partition(balance='time') failed on "
                              "the first rank of its group, which times the layers: "
                              "ValueError: balance='time' measures each"), said
    said = mesh.spawn(_time_cut_without_a_sample, 2, 1, timeout=60)
    assert said[0] == said[1] and said[0].startswith("cut "), said


class _Wrap(nn.Module):
    """A layer around a block it shares with other layers (ALBERT's)."""

    def __init__(self, block):
        super().__init__()
        self.block, self.out = block, nn.Linear(4, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.block(x)))


def _shared_module(kind):
    torch.manual_seed(3)
    block = nn.Linear(4, 4)
    if kind == "sequential":        # the same module in three places of the Sequential
        layers = [nn.Linear(4, 4), block, nn.Tanh(), block, nn.Tanh(), block, nn.Linear(4, 2)]
    else:                           # the same block inside three layers
        layers = [_Wrap(block), _Wrap(block), _Wrap(block), nn.Linear(4, 2)]
    return nn.Sequential(*layers).double()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["sequential", "submodule"])
def test_a_module_called_in_several_stages_trains_as_one_tied_module(kind):
    """A module held by layers of several stages (the same object: ALBERT's
    one block) raised StopIteration: untying the later stage's parameters
    replaced them in the one module every stage held. Each later stage now
    gets a copy, tied to the first's: the gradients are the whole model's."""
    model, whole = _shared_module(kind), _shared_module(kind)
    parts = partition(model, 3)
    assert len(parts.ties) == 2 and all(t.stages == (0, 1, 2) for t in parts.ties), parts.ties
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    loss_fn = lambda out, t: (float(((out - t) ** 2).mean()), 2 * (out - t) / out.numel())
    loss = Pipeline(_Solo(), list(parts), schedules.interleaved_1f1b(1, 3, 3),
                    loss_fn=loss_fn).step(x, y)
    ref = ((whole(x) - y) ** 2).mean()
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-12)
    first = 0
    for stage, count in zip(parts, parts.counts):
        for j, layer in enumerate(stage):
            want = dict(whole[first + j].named_parameters())
            for name, p in layer.named_parameters():    # each copy: the shared one's gradient
                np.testing.assert_allclose(p.grad.numpy(), want[name].grad.numpy(),
                                           rtol=1e-10, atol=1e-14, err_msg=f"{first + j}.{name}")
        first += count


def test_an_engine_layers_layer_in_two_stages_is_refused_by_name():
    shared = L.Linear(3, 3)
    model = L.Sequential(L.Linear(3, 3), shared, L.Tanh(), shared, L.Linear(3, 2))
    with pytest.raises(ValueError, match=r"layers 1 and 3 are the same Linear object, cut into "
                                         r"different stages.*tied=\[\('1\.0', '3\.0'\), \.\.\.\]"):
        partition(model, 2, [2, 3])
    assert partition(model, 2, [4, 1]).counts == (4, 1)      # one stage holds both: no copy


def test_a_compiled_module_in_two_stages_is_refused_by_name():
    """Its copy would run the original's compiled code (the first stage's
    parameters): refused, naming it, before anything runs."""
    block = torch.compile(nn.Linear(4, 4), backend="eager")
    with pytest.raises(ValueError, match=r"a torch.compile'd OptimizedModule is held by layers "
                                         r"of several stages"):
        partition(nn.Sequential(block, nn.Tanh(), block), 2, [1, 2])
    inplace = nn.Linear(4, 4)
    inplace.compile(backend="eager")
    with pytest.raises(ValueError, match=r"a torch.compile'd Linear is held"):
        partition(nn.Sequential(inplace, nn.Tanh(), inplace), 2, [1, 2])


def test_a_tp_plan_prints_what_it_shards_before_anything_runs():
    """engine.describe_plan: each planned submodule's style and each
    parameter's whole and shard shapes, the unplanned tensors, at a tp size,
    with no group and nothing changed; a pattern matching nothing says so."""
    from engine import PlanError, describe_plan
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(32, 16), nn.LayerNorm(16), nn.Linear(16, 64),
                          nn.ReLU(), nn.Linear(64, 16))
    before = [p.shape for p in model.parameters()]
    text = describe_plan(model, {"0": "vocab", "2": "colwise", "4": "rowwise"}, 2)
    assert text.splitlines() == [
        "tensor-parallel plan over 2 ranks: 3 of 5 submodules planned",
        "  0 (Embedding): vocab, input replicate, output replicate",
        "    0.weight: [32, 16] -> [16, 16] a rank (axis 0 split)",
        "  2 (Linear): colwise, input replicate, output shard",
        "    2.weight: [64, 16] -> [32, 16] a rank (axis 0 split)",
        "    2.bias: [64] -> [32] a rank (axis 0 split)",
        "  4 (Linear): rowwise, input shard, output replicate",
        "    4.weight: [16, 64] -> [16, 32] a rank (axis 1 split)",
        "    4.bias: [16] whole on every rank",
        "  not planned, whole on every tp rank (2 tensors): 1.weight, 1.bias"]
    assert [p.shape for p in model.parameters()] == before and not hasattr(model[2], "_tp")
    with pytest.raises(PlanError, match=r"plan pattern '\*.up' matches no submodule \(names: "
                       r"0, 1, 2, 3, 4\)"):
        describe_plan(model, {"*.up": "colwise"}, 2)
    with pytest.raises(PlanError, match="2: out_features .* is 64, not divisible by the tp size 3"):
        describe_plan(model, {"2": "colwise"}, 3)


class _Blocks(nn.Module):       # a plain module: its forward traced into pieces
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(2))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_a_partition_names_its_layers_and_parameters_as_the_model_does():
    """print(partition) names a layer by its name in the model, or its class
    with a container's children's (nested blocks all read "Sequential"), and
    ``named_parameters(s)`` gives a stage's parameters the model's own keys
    (each stage an nn.Sequential numbered from 0: stage 1's "0.0.weight" is
    the model's "2.0.weight"), as Job.named_parameters() does."""
    from collections import OrderedDict
    torch.manual_seed(0)
    nested = nn.Sequential(*[nn.Sequential(nn.Linear(4 if i == 0 else 8, 8), nn.GELU())
                             for i in range(3)], nn.Linear(8, 2))
    named = nn.Sequential(OrderedDict(embed=nn.Linear(4, 8), block=nn.Sequential(
        nn.Linear(8, 8), nn.Tanh()), head=nn.Linear(8, 2)))
    for model, cut, lines in [
            (nested, [2, 2], ["  stage 0: layers 0-1  112 parameters  Sequential(Linear, GELU), "
                              "Sequential(Linear, GELU)",
                              "  stage 1: layers 2-3  90 parameters  Sequential(Linear, GELU), "
                              "Linear"]),
            (named, [1, 2], ["  stage 0: layer 0  40 parameters  embed",
                             "  stage 1: layers 1-2  90 parameters  block, head"]),
            (_Blocks(), [2, 2], ["  stage 0: layers 0-1  112 parameters  embed, blocks.0",
                                 "  stage 1: layers 2-3  90 parameters  blocks.1, head"])]:
        parts = partition(model, 2, cut, sample=torch.randn(3, 4))
        assert str(parts).splitlines()[1:] == lines, str(parts)
        got = [(k, p) for s in range(2) for k, p in parts.named_parameters(s)]
        want = list(model.named_parameters())
        assert [k for k, _ in got] == [k for k, _ in want], got
        assert all(p is q for (_, p), (_, q) in zip(got, want))
    assert [k for k, _ in partition(nested, 2, [2, 2]).named_parameters(1)] == [
        "2.0.weight", "2.0.bias", "3.weight", "3.bias"]
    with pytest.raises(ValueError, match="stage 0 was not built here"):
        partition(nested, 2, [2, 2], stages=[1]).named_parameters(0)
    # engine.layers: "layer.index", the keys Job.named_parameters and state_dict() give
    np_model = L.Sequential(*L.mlp_stages([3, 4, 5], 1)[0].layers)
    parts = partition(np_model, 2, [1, len(np_model.layers) - 1])
    assert [k for k, _ in parts.named_parameters(1)] == [
        f"{i}.{j}" for i in range(1, len(np_model.layers))
        for j in range(len(np_model.layers[i].params()))]
    # a tie named by tied= leaves the layers' names as they were (not the tied pair's)
    specs = [functools.partial(nn.Linear, 4, 4), nn.Tanh, functools.partial(nn.Linear, 4, 4)]
    parts = partition(specs, 2, [2, 1], tied=[("0.weight", "2.weight")])
    assert parts.names == ("0", "1", "2"), parts.names
    assert str(parts).splitlines()[1:] == ["  stage 0: layers 0-1  Linear(), Tanh()",
                                           "  stage 1: layer 2  Linear()",
                                           "  tied: 0.weight on stages 0, 1 (kept equal)"]
    assert [k for k, _ in parts.named_parameters(1)] == ["2.weight", "2.bias"]


def test_a_tp_plan_of_an_engine_layers_model_prints_too():
    """engine.describe_plan on an engine.layers model (torch modules only
    before): each planned layer's style, each parameter's whole and shard
    shapes as the numpy parallelize cuts them (a Linear's weight is (fan_in,
    fan_out): colwise splits axis 1) and its key as Job.named_parameters()
    gives it; parallelize's own PlanErrors; the model unchanged."""
    import copy
    from engine import PlanError, describe_plan, tp_layers
    from engine.tp_plan import match
    rng = np.random.default_rng(0)
    model = L.Sequential(L.Embedding(32, 16, rng), L.Linear(16, 64, rng), L.Tanh(),
                         L.Sequential(L.Linear(64, 16, rng), L.Tanh()), L.Linear(16, 4, rng))
    before = [p.shape for p in model.params()]
    plan = {"0": "vocab", "1": "colwise", "3.0": "rowwise", "4": "sequence"}
    assert describe_plan(model, plan, 2).splitlines() == [
        "tensor-parallel plan over 2 ranks: 4 of 7 layers planned (engine.layers)",
        "  0 (Embedding): vocab, input replicate, output replicate",
        "    0.weight (key 0.0): [32, 16] -> [16, 16] a rank (axis 0 split)",
        "  1 (Linear): colwise, input replicate, output shard",
        "    1.weight (key 1.0): [16, 64] -> [16, 32] a rank (axis 1 split)",
        "    1.bias (key 1.1): [64] -> [32] a rank (axis 0 split)",
        "  3.0 (Linear): rowwise, input shard, output replicate",
        "    3.0.weight (key 3.0): [64, 16] -> [32, 16] a rank (axis 0 split)",
        "    3.0.bias (key 3.1): [16] whole on every rank",
        "  4 (Linear): sequence, input sequence, output sequence rng=rank",
        "    4.weight (key 4.0): [16, 4] whole on every rank, gradients summed over tp",
        "    4.bias (key 4.1): [4] whole on every rank, gradients summed over tp"]
    assert [p.shape for p in model.params()] == before
    assert not tp_layers.sharded_layers(model)

    class Group:        # what parallelize's cut reads of the group
        size, rank = 2, 0
    layers = {n: lay for n, lay, _, _ in tp_layers.named_layers(model)}
    for name, style in match(plan, layers).items():      # the shapes parallelize makes
        cut = tp_layers._shard(copy.deepcopy(layers[name]), name, style, Group())
        shapes = [list(p.shape) for p in cut.params()]
        said = describe_plan(model, {name: style.style}, 2).splitlines()[2:]
        assert [line.split(": ")[1].split(" -> ")[-1].split(" a rank")[0].split(" whole")[0]
                for line in said if line.startswith("    ")] == [str(s) for s in shapes], said
    assert describe_plan(model, {"4": "sequence"}, 2).endswith(
        "\n  not planned, whole on every tp rank (5 tensors): 0.weight, 1.weight, 1.bias, "
        "3.0.weight, 3.0.bias")
    with pytest.raises(PlanError, match=r"plan pattern '\*.up' matches no submodule \(names: "
                       r"0, 1, 2, 3, 3.0, 3.1, 4\)"):
        describe_plan(model, {"*.up": "colwise"}, 2)
    with pytest.raises(PlanError, match=r"1: fan_out \(weight columns\) is 64, not divisible "
                                         r"by the tp size 3"):
        describe_plan(model, {"1": "colwise"}, 3)
    with pytest.raises(PlanError, match="style 'vocab' fits an engine.layers.Embedding, but 2 "
                                        "is a Tanh"):
        describe_plan(model, {"2": "vocab"}, 2)
    with pytest.raises(TypeError, match="a torch module or an engine.layers.Sequential, not a "
                                        "list"):
        describe_plan([L.Tanh()], {}, 2)


class _Returns(_Blocks):
    """_Blocks whose forward returns its output inside a dict, a dataclass or a
    tuple, as Hugging Face's models do."""

    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x):
        y = super().forward(x)
        return {"logits": y} if self.how == "dict" else _Out(logits=y) if self.how == "dataclass" \
            else (y, None)


@dataclasses.dataclass
class _Out:
    logits: object = None
    loss: object = None


@pytest.mark.parametrize("how", ["dict", "dataclass", "tuple"])
def test_a_partitions_pipeline_gives_loss_fn_the_output_as_the_model_returns_it(how):
    """engine.partition of a plain module, then the user's own Pipeline: the
    loss_fn written for the model (``o["logits"]``, ``o.logits``, ``o[0]``)
    gets the last stage's output as the forward returns it, as
    engine.distribute's does (it got the bare tensor: ``o["logits"]`` raised,
    ``o[0]`` took its first row)."""
    torch.manual_seed(0)
    model, whole = _Returns(how), _Returns(how)
    whole.load_state_dict(model.state_dict())
    read = {"dict": lambda o: o["logits"], "dataclass": lambda o: o.logits,
            "tuple": lambda o: o[0]}[how]
    loss_fn = lambda o, t: nn.functional.mse_loss(read(o), t)
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    parts = partition(model, 2, [2, 2], sample=x[:3])
    loss = Pipeline(_Solo(), list(parts), schedules.interleaved_1f1b(1, 2, 2),
                    loss_fn=loss_fn).step(x, y)
    ref = loss_fn(whole(x), y)
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-6)
    for (k, a), b in zip(model.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=k)
    # the last stage saves, what it carries too (not the trace's nodes)
    buf = io.BytesIO()
    torch.save(parts[1], buf)
    buf.seek(0)
    t = torch.ones(1)
    assert read(torch.load(buf, weights_only=False).returned(t)) is t
    # stages of a list of layers (engine.distribute's), or built elsewhere, carry none
    assert getattr(partition(list(parts[0]) + list(parts[1]), 2)[1], "returned", None) is None
