"""Tensor parallelism by plan: every style's forward and backward equal the
unsharded module's, numpy and torch, at tp=2 (one spawn each, every style
and every error in it); plans are checked before anything runs."""
import numpy as np
import pytest

import mesh
from engine import PlanError, Style, parallelize
from engine.layers import Embedding, Linear, Sequential, Tanh
from engine.tp_layers import full_params
from engine.tp_plan import match, parse

# --- plans, without processes -------------------------------------------------


def test_plan_values_parse_to_styles():
    assert parse("colwise") == Style("colwise", input="replicate", output="shard")
    s = parse(("replicate", {"num_heads": 3}))
    assert s.style == "replicate" and s.attrs == {"num_heads": 3}
    s = parse({"style": "rowwise", "output": "sequence", "seq_dim": 2})
    assert (s.input, s.output, s.seq_dim) == ("shard", "sequence", 2)
    assert parse("sequence").input == "sequence"
    with pytest.raises(PlanError, match="unknown tensor-parallel style 'colwize'"):
        parse("colwize")
    with pytest.raises(PlanError, match="takes input in"):
        parse({"style": "rowwise", "input": "sequence"})
    with pytest.raises(PlanError, match="unknown plan keys"):
        parse({"style": "rowwise", "outptu": "sequence"})


def test_plan_patterns_match_names():
    names = ["", "blocks", "blocks.0", "blocks.0.up", "blocks.0.down", "blocks.1.up", "head"]
    got = match({"blocks.*.up": "colwise", "head": "rowwise"}, names)
    assert list(got) == ["blocks.0.up", "blocks.1.up", "head"]
    with pytest.raises(PlanError, match="'blocks.*.mlp' matches no submodule"):
        match({"blocks.*.mlp": "colwise"}, names)
    assert match({"blocks.*.mlp": "colwise"}, names, strict=False) == {}
    with pytest.raises(PlanError, match="'blocks.0.up' is matched by plan patterns"):
        match({"blocks.*": "replicate", "*.up": "colwise"}, names)


# --- numpy: engine.layers -----------------------------------------------------

B, T, D, H, V = 2, 4, 4, 6, 8


def _np_case(name):
    """(model builder, plan, input, whether input / output are sequence-split)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((B, T, D))
    ids = rng.integers(0, V, (B, T))
    mlp = (lambda: Sequential(Linear(D, H, np.random.default_rng(1)), Tanh(),
                              Linear(H, D, np.random.default_rng(2))))
    cases = {
        "colwise+rowwise": (mlp, {"0": "colwise", "2": "rowwise"}, x, False, False),
        "colwise gathered": (mlp, {"0": {"style": "colwise", "output": "replicate"}}, x,
                             False, False),
        "sequence parallel": (
            lambda: Sequential(Linear(D, D, np.random.default_rng(3)), Tanh(), *mlp().layers),
            {"0": "sequence", "1": "sequence", "2": {"style": "colwise", "input": "sequence"},
             "4": {"style": "rowwise", "output": "sequence"}}, x, True, True),
        "sequence replicated edges": (
            lambda: Sequential(Linear(D, D, np.random.default_rng(3)), Tanh()),
            {"0": {"style": "sequence", "input": "replicate", "output": "replicate"}}, x,
            False, False),
        "vocab": (lambda: Sequential(Embedding(V, D, np.random.default_rng(4)),
                                     Linear(D, 3, np.random.default_rng(6))),
                  {"0": "vocab", "1": "replicate"}, ids, False, False),
        "vocab to sequence": (lambda: Sequential(Embedding(V, D, np.random.default_rng(4))),
                              {"0": {"style": "vocab", "output": "sequence"}}, ids, False, True),
    }
    return cases[name]


NP_CASES = ["colwise+rowwise", "colwise gathered", "sequence parallel",
            "sequence replicated edges", "vocab", "vocab to sequence"]


def _part(a, world, on):
    return np.split(a, world.size, axis=1)[world.rank] if on else a


def _np_worker(world):
    out = {}
    for name in NP_CASES:
        build, plan, x, seq_in, seq_out = _np_case(name)
        ref, tp = build(), parallelize(build(), world, plan)
        y, ctx = ref.forward(x)
        gy = np.random.default_rng(9).standard_normal(y.shape)
        gx = ref.backward(ctx, gy)
        ty, tctx = tp.forward(_part(x, world, seq_in))
        tgx, wctx = tp.backward_input(tctx, _part(gy, world, seq_out))
        tp.backward_weight(wctx)
        np.testing.assert_allclose(ty, _part(y, world, seq_out), rtol=1e-12, err_msg=name)
        if gx is not None:
            np.testing.assert_allclose(tgx, _part(gx, world, seq_in), rtol=1e-12, err_msg=name)
        for a, b in zip(full_params(tp, grads=True), ref.grads(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=name)
        for a, b in zip(full_params(tp), ref.params(), strict=True):
            np.testing.assert_array_equal(a, b)
        out[name] = [type(layer).__name__ for layer in tp.layers]
    errors = {}
    for key, model, plan in [
            ("type", Sequential(Linear(D, H), Tanh()), {"1": "colwise"}),
            ("divisible", Sequential(Linear(D, 5)), {"0": "colwise"}),
            ("nothing", Sequential(Linear(D, H)), {"3": "colwise"}),
            ("differs", Sequential(Linear(D, H, np.random.default_rng(world.rank))),
             {"0": "colwise"}),
            ("one rank", Sequential(Linear(D, H if world.rank == 0 else 5)), {"0": "colwise"})]:
        try:
            parallelize(model, world, plan)
        except PlanError as e:
            errors[key] = str(e)
    shared = Sequential(Linear(D, H, np.random.default_rng(world.rank)), Tanh())
    parallelize(shared, world, {"0": "colwise"}, init="broadcast")
    errors["broadcast"] = [a.tolist() for a in full_params(shared)]
    return out, errors


def test_numpy_styles_match_the_unsharded_layers():
    results = mesh.spawn(_np_worker, 2, timeout=60)
    kinds, errors = results[1]
    assert kinds["colwise+rowwise"] == ["Sharded", "Tanh", "Sharded"]
    assert kinds["vocab"] == ["Sharded", "Linear"]
    assert "style 'colwise' fits an engine.layers.Linear, but 1 is a Tanh" in errors["type"]
    assert "0: fan_out (weight columns) is 5, not divisible by the tp size 2" in \
        errors["divisible"]
    assert "plan pattern '3' matches no submodule" in errors["nothing"]
    assert "0 param 0 differs across the tp group" in errors["differs"]
    assert "ranks [0] vs [1]" in errors["differs"]
    assert errors["one rank"].startswith("rank 1: parallelize failed on tp rank 1") or \
        "not divisible" in errors["one rank"]
    assert "failed on tp rank 1" in results[0][1]["one rank"]
    want = Sequential(Linear(D, H, np.random.default_rng(0)), Tanh()).params()
    for a, b in zip(errors["broadcast"], want):
        np.testing.assert_array_equal(a, b)
