"""engine.distribute trains like one process; engine.choose picks by simulation.

One spawn per kind of model (numpy, torch) runs distribute at dp=2 x pp=2
with the schedule chosen automatically, trains a few SGD steps, gathers the
state on rank 0 and checks the argument errors; the parent compares with
single-process training on the whole batch. Nothing here is timed: which
schedule wins may differ from run to run, the weights may not.
"""
import contextlib
import io
import json
import os
import re
import tempfile
from collections import OrderedDict
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

import collectives
import engine
import mesh
from engine import choose
from engine.choose import LayerCost
from engine.trace import summarize_trace
from engine.layers import Linear, Sequential, Tanh, mlp_stages, mse_loss, sgd

WIDTHS = [5, 8, 6, 7, 4, 3]          # 5 Linear layers, 9 layers with the Tanh between
TP_WIDTHS = [4, 8, 6, 8, 4]          # Linear 0, 4 colwise; 2, 6 rowwise
TP_PLAN = {"0": "colwise", "2": "rowwise", "4": "colwise", "6": "rowwise"}
ROWS, STEPS, LR, SEED = 24, 3, 0.1, 7
PATIENT = {"MESH_PEER_TIMEOUT": "60"}   # processes starve on 2 loaded cores: check training


def _data(step, widths=WIDTHS):
    rng = np.random.default_rng(2000 + step)
    return rng.standard_normal((ROWS, widths[0])), rng.standard_normal((ROWS, widths[-1]))


def _half(a, d):
    return a[d * len(a) // 2:(d + 1) * len(a) // 2]


# ---- engine.choose, without processes


def test_cut_minimizes_the_heaviest_stage():
    assert choose.cut([1, 1, 1, 5], 2) == (3, 1)
    assert choose.cut([5, 1, 1, 1, 1, 1], 2) == (1, 5)
    assert choose.cut([1] * 6, 3) == (2, 2, 2)
    with pytest.raises(ValueError, match="cannot fill"):
        choose.cut([1, 2], 3)


def test_counts_for_each_balance():
    params = [10, 0, 10, 30, 80]
    times = [1.0, 1.0, 1.0, 1.0, 1.0]
    assert choose.counts_for("uniform", 2, None, params) == (2, 3)
    assert choose.counts_for("parameters", 2, None, params) == (4, 1)
    assert choose.counts_for("time", 2, times, params) in ((2, 3), (3, 2))
    assert choose.counts_for([1, 4], 2, None, params) == (1, 4)
    with pytest.raises(ValueError, match="positive layer counts"):
        choose.counts_for([1, 3], 2, None, params)
    with pytest.raises(ValueError, match="cannot fill 6"):
        choose.counts_for("uniform", 6, None, params)
    with pytest.raises(ValueError, match="sample="):
        choose.counts_for("time", 2, None, params)
    with pytest.raises(ValueError, match="unknown balance"):
        choose.counts_for("flops", 2, None, params)


def _profile(rows, ms, layers):
    """A made-up profile: each layer costs its weight per row, plus a little."""
    out = {}
    for m in ms:
        size = -(-rows // m)
        out[size] = {i: LayerCost(1e-4 + w * size * 1e-4, 2e-4 + 2 * w * size * 1e-4,
                                  1e-4 + w * size * 1e-4, 1e-4 + w * size * 1e-4, 100 * size)
                     for i, w in enumerate(layers)}
    return out


def test_candidates_best_first_under_the_memory_limit():
    layers, rows, p = [1, 1, 1, 1, 4, 4, 1, 1], 32, 2
    ms = choose.microbatch_counts(p, rows)
    assert ms == [2, 4, 8, 16, 32]
    scheds = choose.builtin(choose.SCHEDULES, p, ms)
    assert {s.name.split("(")[0] for s in scheds} >= {"gpipe", "1f1b", "interleaved_1f1b",
                                                       "zero_bubble_h1"}
    cands = choose.candidates(_profile(rows, ms, layers), [1] * 8, rows, scheds)
    assert [c.makespan for c in cands] == sorted(c.makespan for c in cands)
    best = cands[0]
    assert best.counts in ((5, 3), (4, 4)) or len(best.counts) == 4
    at32 = {c.schedule.name: c for c in cands if c.schedule.num_microbatches == 32}
    assert at32["gpipe(2,32)"].peak_bytes > at32["1f1b(2,32)"].peak_bytes
    limit = at32["1f1b(2,32)"].peak_bytes
    capped = choose.candidates(_profile(rows, ms, layers), [1] * 8, rows, scheds,
                               memory_limit=limit)
    assert all(c.fits == (c.peak_bytes <= limit) for c in capped)
    assert not [c for c in capped if c.schedule.name == "gpipe(2,32)"][0].fits
    assert capped[0].fits and capped[0].peak_bytes <= limit
    assert [c.fits for c in capped] == sorted((c.fits for c in capped), reverse=True)
    text = choose.table(capped, capped[0])
    assert "<- chosen" in text and "over the memory limit: " in text and "pred ms" in text
    # what the columns are and why the mark is there: a row under it may show less time
    said = choose.legend(capped)
    assert "bubble: the ranks' idle share of it; peak MB: the most activations" in said
    assert said.endswith("chosen: the fastest under the memory limit")
    assert choose.legend([replace(capped[0], measured=True)]).endswith(
        "the other rows' figures are from a 1F1B dry run, a lower bound")
    assert "chosen" not in choose.legend(capped, why=False)


# README's "1F1B with a deeper warm-up": rank 0 runs three forwards before its first backward
DEEP = engine.Schedule.build([["0F0", "0F1", "0F2", "0B0", "0F3", "0B1", "0B2", "0B3"],
                              ["1F0", "1B0", "1F1", "1B1", "1F2", "1B2", "1F3", "1B3"]],
                             num_microbatches=4, stage_ranks=[0, 1], name="deep")


def deeper(p, m):
    """README's family: DEEP at any m of at least 3 (2 ranks)."""
    if m < 3:
        raise ValueError(f"needs 3 micro-batches, got {m}")
    first = ["0F0", "0F1", "0F2"] + [a for i in range(m) for a in (
        [f"0B{i}", f"0F{i + 3}"] if i + 3 < m else [f"0B{i}"])]
    return engine.Schedule.build([first, [a for i in range(m) for a in (f"1F{i}", f"1B{i}")]],
                                 num_microbatches=m, stage_ranks=[0, 1], name="deeper")


def backwards_first(p, m):
    """A family that fails verification at m=4 only (its rank 1 runs 1B0 first)."""
    sched = engine.schedules.one_f_one_b(p, m)
    if m != 4:
        return sched
    return sched.replace([sched.ranks[0], [sched.ranks[1][1], sched.ranks[1][0],
                                           *sched.ranks[1][2:]]])


def test_your_own_schedules_are_ranked_beside_the_built_ins_and_no_row_is_left_out():
    """schedule=[...]: names at their micro-batch counts and Schedules as
    they are, ranked together; a candidate that cannot run is a row saying
    why (before, builtin() dropped interleaved at m % p and the cut dropped
    schedules of more stages than layers, unlisted), as is one over the
    memory limit, by how much."""
    from engine.distribute_schedules import _candidates, _candidates_said
    unnamed = DEEP.replace(DEEP.ranks, name="custom")
    scheds, unrun = _candidates(["gpipe", DEEP, "zb-v", "auto", "interleaved", "Zero_Bubble",
                                 unnamed], 2, [3], 2, 3, 12)
    assert [s.name for s in scheds] == ["gpipe(2,3)", "1f1b(2,3)", "zero_bubble_h1(2,3)",
                                        "zero_bubble_h2(2,3)", "deep", "yours #2"]
    assert scheds[4] is DEEP and scheds[5].ranks == DEEP.ranks
    assert unrun == [("interleaved(2,3)", 3, "interleaved 1F1B needs m % p == 0, got m=3, p=2"),
                     ("zb_v(2,3)", 3, "needs 4 stages, the model has 3 layers")]
    # a Schedule (or a name at a count) of more micro-batches than the sample has rows
    assert _candidates([DEEP, "1f1b"], 2, [2, 4], 2, 3, 3)[1] == [
        ("1f1b(2,4)", 4, "4 micro-batches need a batch of at least 4 rows; the sample has 3"),
        ("deep", 4, "4 micro-batches need a batch of at least 4 rows; the sample has 3")]
    layers, rows = [1, 1, 1], 12
    free = choose.candidates(_profile(rows, [3, 4], layers), [1] * 3, rows, scheds)
    deep = next(c for c in free if c.schedule is DEEP)
    assert deep.counts in ((1, 2), (2, 1)) and deep.makespan == pytest.approx(
        DEEP.simulate(deep.costs).makespan)
    gpipe = next(c for c in free if c.schedule.name == "gpipe(2,3)")
    assert gpipe.peak_bytes > deep.peak_bytes
    limit = (gpipe.peak_bytes + deep.peak_bytes) / 2
    capped = choose.candidates(_profile(rows, [3, 4], layers), [1] * 3, rows, scheds,
                               memory_limit=limit)
    text = choose.table(capped, capped[0], unrun).splitlines()
    assert len(text) == 1 + len(scheds) + len(unrun), text
    row = next(line for line in text if line.startswith("gpipe(2,3) "))
    assert row.endswith(f"  over the memory limit: {choose.in_bytes(gpipe.peak_bytes)} > "
                        f"{choose.in_bytes(limit)}"), row
    assert any(line.startswith("deep ") and line.split()[1] == "4" for line in text), text
    assert text[-2].split()[:2] == ["interleaved(2,3)", "3"] and text[-2].endswith(
        "cannot run: interleaved 1F1B needs m % p == 0, got m=3, p=2"), text
    assert text[-1].endswith("cannot run: needs 4 stages, the model has 3 layers"), text
    assert choose.in_bytes(1.3 * 2**30) == "1.3 GiB" and choose.in_bytes(512) == "512 B"
    # what each rank passed, set beside the others': a Schedule by its actions too
    said = _candidates_said(["1F1B", DEEP])
    assert said[0] == "'1f1b'" and said[1].startswith("Schedule 'deep' #")
    assert _candidates_said([engine.schedules.one_f_one_b(2, 4).replace(
        engine.schedules.one_f_one_b(2, 4).ranks, name="deep")])[0] != said[1]
    assert _candidates_said("auto") is None
    # a family, make(p, m), at each count as a name is: each made, checked and verified, its
    # row named by it; one that raises or fails verification a row saying why; a built-in
    # generator is its name; what each rank made of each said for the ranks to agree on
    made: list = []
    scheds, unrun = _candidates([deeper, "1f1b", backwards_first, engine.zb_v,
                                 lambda p, m: engine.schedules.gpipe(p, m + 1)], 2, [2, 4], 2,
                                3, 12, made)
    assert [s.name for s in scheds] == ["1f1b(2,2)", "1f1b(2,4)", "backwards_first(2,2)",
                                        "deeper(2,4)"]
    assert scheds[3].ranks == deeper(2, 4).ranks and scheds[2].ranks == scheds[0].ranks
    assert unrun[:4] == [
        ("deeper(2,2)", 2, "deeper(2, 2) raised ValueError: needs 3 micro-batches, got 2"),
        ("family #3(2,2)", 2, "family #3(2, 2) made a schedule of 2 ranks and 3 micro-batches"),
        ("backwards_first(2,4)", 4, "schedule 'backwards_first(2,4)' is invalid: rank 1 runs "
                                    "1B0 before its forward 1F0"),
        ("family #3(2,4)", 4, "family #3(2, 4) made a schedule of 2 ranks and 5 micro-batches")]
    assert [row[0] for row in unrun[4:]] == ["zb_v(2,2)", "zb_v(2,4)"]
    assert [e[0] for e in made] == ["deeper(2,2)", "backwards_first(2,2)", "family #3(2,2)",
                                    "deeper(2,4)", "backwards_first(2,4)", "family #3(2,4)"]
    assert made[0][1] == "failed: " + unrun[0][2] and made[3][1].startswith("#")
    assert _candidates_said(["1F1B", deeper, engine.schedules.zb_v]) == [
        "'1f1b'", "family 'deeper'", "'zb-v'"]
    assert _candidates([deeper], 2, [4], 2, 3, 12)[0][0].name == "deeper(2,4)"
    from engine.user_schedules import made_agreed
    other = [list(e) for e in made]
    other[3][1] = "failed: ValueError: rank 2's own"
    made_agreed(1, [made, None, made])      # (None: a rank that failed before making them)
    made_agreed(1, [made, other[1:]])       # (other lists: the lists' own error)
    with pytest.raises(ValueError, match="^" + re.escape(
            f"rank 1: engine.distribute: your schedule deeper(2,4) is not the same on every "
            f"rank: ranks [0, 1] made {made[3][1]}; ranks [2] failed: ValueError: rank 2's own; "
            f"make your schedules from code that does not depend on the rank") + "$"):
        made_agreed(1, [made, made, other, None])
    # a Schedule of other ranks, or broken: an error naming it, before anything is timed
    with pytest.raises(ValueError, match=re.escape(
            "schedule 'yours #2' (yours #2) has 3 ranks, the grid's pp axis 2")):
        choose.yours([DEEP, engine.schedules.one_f_one_b(3, 3).replace(
            engine.schedules.one_f_one_b(3, 3).ranks, name="custom")], 2)
    broken = engine.Schedule.build([["0F0", "0F1", "0B0", "0B1"], ["1B0", "1F0", "1F1", "1B1"]],
                                   num_microbatches=2, stage_ranks=[0, 1], name="mine")
    with pytest.raises(engine.ScheduleError, match=re.escape(
            "schedule 'mine' is invalid: rank 1 runs 1B0 before its forward 1F0")):
        choose.yours([broken], 2)
    model = Sequential(Linear(3, 4), Tanh(), Linear(4, 2))
    kw = {"loss_fn": mse_loss, "verbose": False}
    for given, kind, says in (
            ([], ValueError, "schedule=[]: a list of candidates needs at least one"),
            (["1f1b", "mine"], ValueError, "schedule= candidate 1: unknown schedule 'mine'"),
            ([DEEP, None], TypeError, "schedule= candidate 1: schedule= takes 'auto', a name"),
            ([["1f1b"]], TypeError, "schedule= candidate 0 is a list: a list of candidates "
                                    "holds names, engine.Schedule objects and families")):
        with pytest.raises(kind, match="^" + re.escape(says)):
            engine.distribute(model, None, schedule=given, **kw)


def test_recompute_keeps_a_stage_input_and_makes_its_activations_again():
    """peak_bytes with ``kept``: 1F1B(2,4) holds two micro-batches on rank 0,
    one on rank 1; recomputing, each holds their inputs, and one stage's
    activations during a backward (a split one's from I to W)."""
    sched = choose.builtin(["1f1b"], 2, [4])[0]
    assert choose.peak_bytes(sched, [100, 100]) == (200, 100)
    assert choose.peak_bytes(sched, [100, 100], kept=[0, 5]) == (100, 105)
    # (an engine.layers stage whose first layer keeps the input it recomputes
    # from: the kept array is among the activations, counted once)
    assert choose.peak_bytes(sched, [100, 100], [10, 5], shared=[10, 5]) == (110, 100)
    # the gradients a backward holds while it runs, on top
    assert choose.peak_bytes(sched, [100, 100], flowing=[30, 7]) == (230, 107)
    assert choose.peak_bytes(sched, [100, 100], [0, 5], flowing=[30, 7]) == (130, 112)
    zb = choose.builtin(["zb-h1"], 2, [4])[0]
    plain, again = choose.peak_bytes(zb, [100, 100]), choose.peak_bytes(zb, [100, 100], [0, 5])
    assert again[1] >= 105 and again[0] <= plain[0]
    rows, ms = 32, [4]
    layers = [1] * 8
    cands = {c.schedule.name: c for c in choose.candidates(
        _profile(rows, ms, layers), [1] * 8, rows, choose.builtin(["1f1b"], 2, ms),
        recompute=True)}
    # rank 0 keeps stage 0's input only (the batch: not given, not counted):
    # one stage's activations (4 layers x 800 B) during a backward; rank 1 its
    # input too, kept and copied again by the backward's forward; and the
    # gradients flowing (a layer's output's and input's, 2 x 800); the last
    # stage holds its loss's gradient (800) from its F to its B too
    assert cands["1f1b(2,4)"].peak_bytes == 4 * 800 + 800 + 800 + 2 * 800 + 800
    # "auto": every schedule both ways; recompute (a second forward in each
    # backward: slower) is chosen only where keeping the activations does
    # not fit the memory limit
    scheds = choose.builtin(["gpipe", "1f1b"], 2, ms)
    assert not any(c.recompute for c in choose.candidates(    # no limit: nothing to gain
        _profile(rows, ms, layers), [1] * 8, rows, scheds, recompute="auto"))
    both = choose.candidates(_profile(rows, ms, layers), [1] * 8, rows, scheds,
                             recompute="auto", memory_limit=1e9)
    assert len(both) == 4 and not both[0].recompute
    kept = {c.schedule.name: c for c in both if not c.recompute}
    again = {c.schedule.name: c for c in both if c.recompute}
    assert again["1f1b(2,4)"].costs["B"][0] == pytest.approx(
        kept["1f1b(2,4)"].costs["B"][0] + kept["1f1b(2,4)"].costs["F"][0])
    limit = again["1f1b(2,4)"].peak_bytes
    capped = choose.candidates(_profile(rows, ms, layers), [1] * 8, rows, scheds,
                               memory_limit=limit, recompute="auto")
    assert capped[0].recompute and capped[0].fits
    assert "recomputed" in choose.table(capped, capped[0])
    # only the ranks over the limit recompute: 1F1B's rank 0 holds two
    # micro-batches, rank 1 one; recomputing in stage 0 alone fits (3200 B
    # on rank 0, rank 1's 3200, its input 800 and its loss's gradient 800,
    # with 1600 flowing in a backward: less than recomputing in both) for
    # one forward less
    first = {c.schedule.name: c for c in capped if isinstance(c.recompute, frozenset)}
    assert list(first) == ["1f1b(2,4)"]       # gpipe: both ranks over, no partial way
    part = first["1f1b(2,4)"]
    assert part is capped[0] and part.recompute == frozenset({0}) and part.fits
    assert choose.peak_bytes(part.schedule, [3200, 4000], [0, None]) == (3200, 4000)
    assert part.peak_bytes == 4000 + 800 + 1600 < again["1f1b(2,4)"].peak_bytes
    assert part.costs["B"] == [again["1f1b(2,4)"].costs["B"][0], kept["1f1b(2,4)"].costs["B"][1]]
    assert part.makespan < again["1f1b(2,4)"].makespan
    assert "recomputed in stage 0" in choose.table(capped, capped[0])
    assert choose.as_run({0: choose.LayerCost(1, 2, 1, 1, 8), 1: choose.LayerCost(1, 2, 1, 1, 8)},
                         None, frozenset({1}), (1, 1))[0][1].B == 3


def test_the_partial_way_tries_the_fewest_stages_of_a_rank_of_several():
    """Interleaved 1F1B(2,4,2): rank 0 holds stages 0 and 2 and is over the
    limit; recomputing stage 0 alone brings it under, for a forward less
    than recomputing both of its stages."""
    rows, ms = 32, [4]
    scheds = choose.builtin(["interleaved"], 2, ms)
    cands = choose.candidates(_profile(rows, ms, [1] * 8), [1] * 8, rows, scheds,
                              memory_limit=9600, recompute="auto")
    part = {c.recompute: c for c in cands if isinstance(c.recompute, frozenset)}
    assert set(part) == {frozenset({0}), frozenset({0, 2})}
    one, both = part[frozenset({0})], part[frozenset({0, 2})]
    assert one.fits and both.fits and one.makespan < both.makespan
    assert "recomputed in stage 0" in choose.table(cands, one)
    sched = scheds[0]
    # (each stage two layers of 800 B and its input, the first's not counted)
    act, kept = [1600, 2400, 2400, 2400], [0, 800, 800, 800]
    assert choose.fewest(sched, act, kept, 7200) == frozenset({0})
    # (with the gradients a backward holds and the last stage's loss
    # gradient, 800: rank 0 11200 keeping, 8000 recomputing stage 0; rank 1 9600)
    act, kept, loss = [1600, 2400, 2400, 3200], [0, 800, 800, 1600], [0, 0, 0, 800]
    assert choose.fewest(sched, act, kept, 9600, loss, [1600] * 4) == frozenset({0})
    assert choose.fewest(sched, act, kept, 7200, loss, [1600] * 4) == frozenset({0, 1, 2})
    assert choose.fewest(sched, act, kept, 10**9) == frozenset()
    assert choose.fewest(sched, act, kept, 100) is None


def test_the_peak_counts_what_the_layers_hold_not_their_outputs():
    """A layer's ``saved_bytes`` (what it holds for its backward) is what
    the peak counts; its output's bytes stay the messages' and the input a
    recomputing stage keeps."""
    rows, ms = 8, [4]
    (sched,) = choose.builtin(["gpipe"], 2, ms)
    prof = _profile(rows, ms, [1, 1, 1, 1])
    plain, = choose.candidates(prof, [1] * 4, rows, [sched])
    # (beyond their output, which each keeps: 16 outputs' bytes in all)
    held = {size: {i: replace(lc, saved_bytes=15 * lc.act_bytes) for i, lc in row.items()}
            for size, row in prof.items()}
    big, = choose.candidates(held, [1] * 4, rows, [sched])
    # GPipe's last rank: four micro-batches of its two layers, its input and
    # its loss's gradient, and in a backward the gradients of a layer's
    # output and input (2 x 200)
    flowing = 2 * 200
    assert plain.peak_bytes == 4 * (2 * 200 + 200 + 200) + flowing
    assert big.peak_bytes == 4 * (2 * 16 * 200 + 200 + 200) + flowing
    again, = choose.candidates(held, [1] * 4, rows, [sched], recompute=True)
    # recomputing: each micro-batch's input (an output: 200 B) kept, and one
    # micro-batch's activations made again in its backward, its input copied
    assert again.peak_bytes == 4 * (200 + 200) + 200 + 2 * 16 * 200 + flowing
    # the first stage's input counts where given (a torch stage copies it)
    fed, = choose.candidates(held, [1] * 4, rows, [sched], inputs={2: 1000})
    assert fed.peak_bytes == 4 * (2 * 16 * 200 + 1000) + flowing
    # engine.layers stages (copies=False): a Linear keeps its input, the
    # message itself, which recomputing keeps and does not make again
    linear = {size: {i: replace(lc, saved_bytes=0, keeps=choose.KEEPS_INPUT)
                     for i, lc in row.items()} for size, row in prof.items()}
    kept, = choose.candidates(linear, [1] * 4, rows, [sched], copies=False)
    # its input, its first layer's output, its loss's gradient
    assert kept.peak_bytes == 4 * (200 + 200 + 200) + flowing
    again, = choose.candidates(linear, [1] * 4, rows, [sched], recompute=True, copies=False)
    assert again.peak_bytes == 4 * (200 + 200) + 200 + flowing


def test_blocks_recompute_layer_by_layer_where_that_holds_less():
    """A torch stage may checkpoint each layer on its own (``layers=``):
    each layer's input kept, one layer's activations made again at a time
    (a split backward: all of them from I to W). Blocks holding 16 times
    their output gain; layers that keep their inputs anyway do not."""
    rows, ms = 8, [4]
    prof = _profile(rows, ms, [1] * 8)
    blocks = {size: {i: replace(lc, saved_bytes=15 * lc.act_bytes, keeps=0)
                     for i, lc in row.items()} for size, row in prof.items()}
    (gpipe,) = choose.builtin(["gpipe"], 2, ms)
    whole, = choose.candidates(blocks, [1] * 8, rows, [gpipe], recompute=True)
    each, = choose.candidates(blocks, [1] * 8, rows, [gpipe], recompute=True, layers=True)
    assert not whole.layered and each.layered and each.makespan == whole.makespan
    # GPipe's rank 1: 4 micro-batches of its input, each later layer's and
    # its loss's gradient (5 x 200 B), then its first layer's 15 x 200,
    # output and input's copy, and the gradients flowing (2 x 200)
    assert each.peak_bytes == 4 * 5 * 200 + 17 * 200 + 2 * 200 < whole.peak_bytes
    assert choose.layer_by_layer(blocks[2], 0, 4, 0) == (600, 3200)
    assert choose.layer_by_layer(blocks[2], 0, 4, 0, split=True) == (600, 4 * 3200)
    mlp = {size: {i: replace(lc, saved_bytes=0, keeps=choose.KEEPS_INPUT)
                  for i, lc in row.items()} for size, row in prof.items()}
    plain, = choose.candidates(mlp, [1] * 8, rows, [gpipe], recompute=True, layers=True)
    assert not plain.layered
    capped = choose.candidates(blocks, [1] * 8, rows, [gpipe], recompute="auto",
                               memory_limit=each.peak_bytes, layers=True)
    assert capped[0].layered and capped[0].fits
    assert "recomputed by layer" in choose.table(capped, capped[0])
    # in runs of 2 layers (layered=2): each run's input kept, a run's activations made
    # again at once: between layer by layer and whole, both held and made again
    assert choose.layer_by_layer(blocks[2], 0, 4, 0, runs=2) == (200, 2 * 3200)
    assert choose.layer_by_layer(blocks[2], 0, 4, 0, split=True, runs=2) == (200, 4 * 3200)
    assert choose.layer_by_layer(blocks[2], 0, 5, 0, runs=2) == (400, 2 * 3200)  # 2 + 2 + 1
    two, = choose.candidates(blocks, [1] * 8, rows, [gpipe], recompute=True, layers=True,
                             runs=2)
    assert two.layered == 2 and two.makespan == whole.makespan
    # GPipe's rank 1: 4 micro-batches of its input, its third layer's and its loss's
    # gradient (3 x 200 B), then its first run's 2 x 16 x 200 and input's copy, flowing
    assert two.peak_bytes == 4 * 3 * 200 + 33 * 200 + 2 * 200
    assert each.peak_bytes < two.peak_bytes < whole.peak_bytes
    assert "recomputed by 2 layers" in choose.table([two], two)
    from engine.distribute import _layered_checked
    with pytest.raises(ValueError, match=r"layered=2 is how a stage that recomputes does: it "
                                         r"needs recompute=True or 'auto', not recompute=False"):
        _layered_checked(2, False)
    with pytest.raises(ValueError, match=r"layered=-1: None \(chosen\), False, True"):
        _layered_checked(-1, True)


def test_the_automatic_choice_costs_runs_of_n_layers_too():
    """With ``layers`` and no ``runs`` (distribute's ``layered=None``) a way
    that recomputes is costed whole, layer by layer and in runs of each N
    from 2 to one fewer than its longest recomputing stage's layers, and
    keeps the lowest peak: a later way only where it holds strictly less
    (so where runs do not, the choice is whole or layer by layer as
    before)."""
    rows, ms = 8, [4]

    def blocks(depth, saved):
        return {size: {i: replace(lc, saved_bytes=saved * lc.act_bytes, keeps=0)
                       for i, lc in row.items()}
                for size, row in _profile(rows, ms, [1] * depth).items()}

    def way(prof, name, **kw):
        (sched,) = choose.builtin([name], 2, ms)
        c, = choose.candidates(prof, [1] * len(prof[2]), rows, [sched], recompute=True, **kw)
        return c

    # 4 layers a stage holding 4 times their output, GPipe: runs of 2 hold less
    # than both. Its rank 1: 4 micro-batches of its input, its second run's and
    # its loss's gradient (3 x 200 B), then its first run's 2 x 4 x 200 and
    # input's copy, and the gradients flowing (2 x 200)
    prof = blocks(8, 3)
    auto, whole, each = way(prof, "gpipe", layers=True), way(prof, "gpipe"), way(
        prof, "gpipe", layers=True, runs=1)
    assert auto.layered == 2 and auto.makespan == whole.makespan
    assert auto.peak_bytes == 4 * 3 * 200 + 9 * 200 + 2 * 200
    assert auto.peak_bytes < whole.peak_bytes < each.peak_bytes
    assert auto.peak_bytes == way(prof, "gpipe", layers=True, runs=2).peak_bytes
    assert "recomputed by 2 layers" in choose.table([auto], auto)
    # 9 layers a stage holding twice their output, 1F1B: one N for both, runs of 3
    # the least (rank 1: one micro-batch of its input, two runs' and the loss's
    # gradient, then a run's 3 x 2 x 200 and the input's copy, flowing), runs of
    # 2 next. Each rank its own: rank 0 as low whole as in runs of 3, rank 1 in
    # runs of 2 as in runs of 3 (its 5 runs' inputs and the loss's gradient,
    # then a run's 2 x 2 x 200 and the input's copy, flowing): the earlier of each
    prof = blocks(18, 1)
    auto = way(prof, "1f1b", layers=True)
    assert way(prof, "1f1b", layers=True, runs=3).peak_bytes == 4 * 200 + 7 * 200 + 2 * 200
    assert auto.layered == (0, 2) and auto.peak_bytes == 6 * 200 + 5 * 200 + 2 * 200
    assert auto.peak_bytes < min(way(prof, "1f1b", layers=True, runs=n).peak_bytes
                                 for n in (1, 2, 4, 5, 6, 7, 8))
    assert auto.peak_bytes < way(prof, "1f1b").peak_bytes
    assert "recomputed by all,2 layers" in choose.table([auto], auto)
    # runs no lower than the choice before: it stands. A tie with layer by layer
    # (8 layers, 8 times the output, GPipe) stays layer by layer; a tie with
    # whole (6 a stage, 3 times, GPipe: runs of 3) and runs above both stay whole
    prof = blocks(8, 7)
    assert way(prof, "gpipe", layers=True, runs=2).peak_bytes == way(
        prof, "gpipe", layers=True, runs=1).peak_bytes
    assert way(prof, "gpipe", layers=True).layered is True
    prof = blocks(12, 2)
    assert way(prof, "gpipe", layers=True, runs=3).peak_bytes == way(prof, "gpipe").peak_bytes
    assert way(prof, "gpipe", layers=True).layered is False
    assert way(blocks(18, 0), "gpipe", layers=True).layered is False
    assert way(blocks(8, 15), "1f1b", layers=True).layered is True


def test_each_stage_recomputes_in_runs_of_its_own_n():
    """Each rank's stages take the N their own peak is lowest with (a
    rank's peak is its stages' alone): stages of 4 and 3 blocks holding
    3 times their output, 1F1B, go in runs of 2 and layer by layer, which
    holds less than any one N for both; asked per stage (``runs=(2, 1)``),
    the same; a tuple of another length leaves the schedule out."""
    rows, ms = 8, [4]
    prof = {size: {i: replace(lc, saved_bytes=2 * lc.act_bytes, keeps=0)
                   for i, lc in row.items()}
            for size, row in _profile(rows, ms, [1] * 7).items()}
    (sched,) = choose.builtin(["1f1b"], 2, ms)

    def way(**kw):
        c, = choose.candidates(prof, [1] * 7, rows, [sched], balance=[4, 3], recompute=True,
                               **kw)
        return c
    auto = way(layers=True)
    assert auto.layered == (2, 1) and auto.counts == (4, 3)
    # rank 0: 2 micro-batches' second run's input (2 x 200 B; the batch's not counted),
    # then a run's 2 x 3 x 200, and the gradients flowing (2 x 200); rank 1 as much:
    # one micro-batch's input, 2 later layers' and the loss's gradient, then a layer's
    # 3 x 200 and the input's copy, flowing
    assert auto.peak_bytes == 2 * 200 + 6 * 200 + 2 * 200 == 4 * 200 + 4 * 200 + 2 * 200
    assert auto.peak_bytes < min([way().peak_bytes] + [way(layers=True, runs=n).peak_bytes
                                                        for n in (1, 2, 3)])
    assert way(layers=True, runs=(2, 1)).peak_bytes == auto.peak_bytes
    assert way(layers=True, runs=(2, 1)).layered == (2, 1)
    assert way(layers=True, runs=(2, 2)).layered == 2
    assert "recomputed by 2,1 layers" in choose.table([auto], auto)
    assert choose.candidates(prof, [1] * 7, rows, [sched], recompute=True, layers=True,
                             runs=(2, 1, 1)) == []
    from engine.distribute import _cut_said, _layered_checked
    assert _cut_said(sched, "2 stages", True, (2, 1), ()).endswith(
        "(each stage recomputes, stage 0 in runs of 2 layers, stage 1 layer by layer: its "
        "forward again in its backward)")
    _layered_checked([2, True, None, False], True)
    with pytest.raises(ValueError, match=r"layered=\[2, -1\]: None \(chosen\), False"):
        _layered_checked([2, -1], True)
    with pytest.raises(ValueError, match=r"layered=\[0, 2\] is how a stage that recomputes"):
        _layered_checked([0, 2], "blocks.*")


def test_a_stage_holds_each_output_once_where_a_layer_keeps_it():
    """An output counts where its layer keeps it (a tanh's) or the next
    layer keeps it as its input (a Linear's, a GELU's), once; a torch stage
    copies its input and keeps its output, a numpy stage keeps the message
    where its first layer does."""
    IN, OUT = choose.KEEPS_INPUT, choose.KEEPS_OUTPUT

    def lc(keeps, saved=0):
        return choose.LayerCost(0, 0, 0, 0, 8, saved, keeps)

    unmeasured = {0: choose.LayerCost(0, 0, 0, 0, 8), 1: choose.LayerCost(0, 0, 0, 0, 8)}
    assert choose.stage_held(unmeasured, 0, 2, 5) == 5 + 8 + 8     # each output stands in
    assert choose.stage_held(unmeasured, 0, 2, 5, copies=False) == 8 + 8
    tanh_mlp = {0: lc(IN), 1: lc(OUT), 2: lc(IN), 3: lc(OUT, 3)}    # Linear, Tanh, ...
    assert choose.stage_held(tanh_mlp, 0, 4, 5, copies=False) == 5 + 8 + 8 + 3
    assert choose.stage_held(tanh_mlp, 0, 4, 5) == 5 + 8 + 8 + 3
    assert choose.stage_held(tanh_mlp, 1, 3, 5, copies=False) == 8 + 0   # (no input kept)
    gelu_mlp = {0: lc(IN), 1: lc(IN), 2: lc(IN), 3: lc(IN)}          # Linear, GELU, ...
    assert choose.stage_held(gelu_mlp, 0, 4, 5) == 5 + 3 * 8 + 8     # its last output: its own
    assert choose.stage_held(gelu_mlp, 0, 4, 5, copies=False) == 5 + 3 * 8


def test_time_layer_measures_what_a_torch_layer_holds():
    torch = pytest.importorskip("torch")
    from engine.torch_stage import TorchStage
    torch.manual_seed(0)
    x = torch.randn(4, 16, 32)
    block = torch.nn.TransformerEncoderLayer(32, 4, 128, dropout=0.0, batch_first=True)
    lc, y = choose.time_layer(TorchStage(block), x, reps=1, runs=1)
    assert lc.act_bytes == y.nbytes == x.nbytes
    assert lc.saved_bytes is not None and lc.saved_bytes > 8 * lc.act_bytes
    # a Linear holds its input (the layer before's output) and its weight,
    # as a GELU its input; a tanh and a ReLU hold their output
    for layer, keeps in ((torch.nn.Linear(32, 32), choose.KEEPS_INPUT),
                         (torch.nn.GELU(), choose.KEEPS_INPUT),
                         (torch.nn.Tanh(), choose.KEEPS_OUTPUT),
                         (torch.nn.ReLU(), choose.KEEPS_OUTPUT)):
        lc, _ = choose.time_layer(TorchStage(layer), x, reps=1, runs=1)
        assert (lc.saved_bytes, lc.keeps, lc.act_bytes) == (0, keeps, x.nbytes), layer
    # numpy layers: the arrays of the context their forward returns: a Tanh
    # keeps its output; a block its first Linear's input and inner outputs
    x = np.ones((4, 8))
    lc, _ = choose.time_layer(Tanh(), x, reps=1, runs=1)
    assert (lc.saved_bytes, lc.keeps) == (0, choose.KEEPS_OUTPUT)
    lc, _ = choose.time_layer(Linear(8, 8), x, reps=1, runs=1)
    assert (lc.saved_bytes, lc.keeps) == (0, choose.KEEPS_INPUT)
    block = Sequential(Linear(8, 32), Tanh(), Linear(32, 8))
    lc, _ = choose.time_layer(block, x, reps=1, runs=1)
    assert lc.act_bytes == x.nbytes and lc.saved_bytes == 4 * x.nbytes
    assert lc.keeps == choose.KEEPS_INPUT
    assert choose.held_by(object(), [1.0]) is None


def test_uneven_layers_balanced_by_time_beat_uniform():
    layers, rows, p = [1, 1, 1, 1, 1, 1, 6, 6], 16, 2
    ms = [4]
    scheds = choose.builtin(["1f1b"], p, ms)
    prof = _profile(rows, ms, layers)
    by_time = choose.candidates(prof, [1] * 8, rows, scheds, "time")[0]
    uniform = choose.candidates(prof, [1] * 8, rows, scheds, "uniform")[0]
    assert by_time.counts == (6, 2) and uniform.counts == (4, 4)
    assert by_time.makespan < uniform.makespan



def test_the_executors_costs_enter_the_prediction():
    """engine.calibrate's figures: a per-action cost and a message time,
    the latter found back from a dry step's length by bisection."""
    from engine.calibrate import _message_time
    rows, p = 16, 2
    (sched,) = choose.builtin(["1f1b"], p, [4])
    prof = _profile(rows, [4], [1, 1, 1, 1])
    bare, = choose.candidates(prof, [1] * 4, rows, [sched])
    paid, = choose.candidates(prof, [1] * 4, rows, [sched], overhead=0.5, send=0.25)
    assert paid.costs["send"] == [0.25, 0.25] and paid.costs["F"][0] == bare.costs["F"][0] + 0.5
    assert paid.makespan > bare.makespan
    span = sched.simulate({k: 1.0 for k in "FBIW"} | {"send": 0.3}).makespan
    assert _message_time(sched, 1.0, span) == pytest.approx(0.3)
    assert _message_time(sched, 1.0, 0.5 * span) == 0.0
    # measured per micro-batch count: each candidate pays its own m's figures
    two, four = choose.builtin(["1f1b"], p, [2, 4])
    prof = _profile(rows, [2, 4], [1, 1, 1, 1])
    by_m = {c.schedule.num_microbatches: c for c in choose.candidates(
        prof, [1] * 4, rows, [two, four], overhead={2: 0.5, 4: 0.0}, send={2: 0.25, 4: 0.0})}
    flat = {c.schedule.num_microbatches: c for c in choose.candidates(prof, [1] * 4, rows,
                                                                       [two, four])}
    assert by_m[2].costs["F"][0] == pytest.approx(flat[2].costs["F"][0] + 0.5)
    assert by_m[2].costs["send"] == [0.25, 0.25] and by_m[4].costs == flat[4].costs


def test_candidates_on_shared_cores():
    """Where the ranks share cores, a candidate is simulated so (its
    ``cores``), its per-action overhead an unshared ``fixed`` cost; with a
    core a rank, nothing changes."""
    rows, p = 16, 2
    (sched,) = choose.builtin(["1f1b"], p, [4])
    prof = _profile(rows, [4], [1, 1, 1, 1])
    own, = choose.candidates(prof, [1] * 4, rows, [sched], overhead=0.5)
    shared, = choose.candidates(prof, [1] * 4, rows, [sched], overhead=0.5, cores=1.0)
    assert own.cores is None and "fixed" not in own.costs
    assert shared.cores == 1.0 and shared.costs["fixed"] == [0.5, 0.5]
    assert shared.costs["F"][0] == pytest.approx(own.costs["F"][0] - 0.5)
    assert shared.makespan > own.makespan
    again = choose.recosted(shared, prof[4], overhead=0.5)
    assert again.makespan == pytest.approx(shared.makespan)
    spare, = choose.candidates(prof, [1] * 4, rows, [sched], overhead=0.5, cores=2.0)
    assert spare.makespan == pytest.approx(own.makespan)


def test_mesh_threads_cpu_charged_beside_each_message():
    """On a host with no spare core the mesh threads' CPU per message end
    (engine.calibrate) is added to the F, B and I of each stage once per
    neighbour stage on another rank; W pays none."""
    from engine.calibrate import crowded
    assert crowded([("a", 2), ("a", 2)]) and not crowded([("a", 4), ("a", 4)])
    assert not crowded([("a", 2), ("b", 2)]) and crowded([("a", 1)])
    by = {s.name: s for s in choose.builtin(["1f1b", "zb-v", "interleaved"], 2, [4])}
    assert choose.helper_charge(by["1f1b(2,4)"], 0.5) == [0.5, 0.5]
    assert choose.helper_charge(by["zb_v(2,4)"], 0.5) == [0.5, 0.5, 0.5, 0.5]  # V: 1-2 local
    assert choose.helper_charge(by["interleaved_1f1b(2,4,2)"], 0.5) == [0.5, 1.0, 1.0, 0.5]
    rows = 16
    prof = _profile(rows, [4], [1, 1, 1, 1])
    sched = by["zb_v(2,4)"]
    bare, = choose.candidates(prof, [1] * 4, rows, [sched])
    paid, = choose.candidates(prof, [1] * 4, rows, [sched], helper=0.25)
    for kind, extra in (("F", 0.25), ("B", 0.25), ("I", 0.25), ("W", 0.0)):
        assert paid.costs[kind] == pytest.approx([c + extra for c in bare.costs[kind]])
    assert paid.makespan > bare.makespan


def test_retimed_stages_replace_the_profile():
    """Job.retime's times (a stage timed whole again) take the place of the
    profiled ones, with the executor's cost and the mesh threads' charge."""
    rows = 16
    prof = _profile(rows, [4], [1, 1, 1, 1])
    (sched,) = choose.builtin(["1f1b"], 2, [4])
    cand, = choose.candidates(prof, [1] * 4, rows, [sched], overhead=0.1, helper=0.2)
    same = choose.retimed(cand, {s: LayerCost(*(cand.costs[k][s] - 0.1 - (0.2 if k != "W" else 0)
                                                for k in "FBIW"), 0) for s in (0, 1)},
                          overhead=0.1, helper=0.2)
    assert same.makespan == pytest.approx(cand.makespan) and same.summed == cand.summed
    slow = choose.retimed(cand, {1: LayerCost(1.0, 2.0, 1.0, 1.0, 0)}, overhead=0.1, helper=0.2)
    assert slow.costs["F"] == [cand.costs["F"][0], pytest.approx(1.3)]
    assert slow.costs["W"][1] == pytest.approx(1.1) and slow.makespan > cand.makespan
    # what distribute prints under its table: the re-timed figure (job.predicted) beside
    # the chosen row's (the profile's), and what moved it (the row's 6.61 ms was taken
    # for the prediction, 15.38 ms, of a step that measured 11.54)
    assert choose.busiest_compute(slow) == pytest.approx(4 * (1.0 + 2.0))   # 1F1B: F, B
    assert choose.busiest_compute(cand) == pytest.approx(
        4 * sum(cand.costs[k][0] - 0.1 - 0.2 for k in "FB"))
    ms = 1e3
    assert choose.retimed_said(cand, same) == (
        f"1f1b(2,4) re-timed as its steps will run: {cand.makespan * ms:.2f} ms a step "
        "(job.predicted: the figure to set a measured step against)")
    again = choose.retimed(cand, {1: LayerCost(1.0, 2.0, 1.0, 1.0, 0)}, overhead=0.3,
                           helper=0.2, send=0.5)
    assert again.overhead == 0.3 and cand.overhead == 0.1
    assert choose.retimed_said(cand, again) == (
        f"1f1b(2,4) re-timed as its steps will run: {again.makespan * ms:.2f} ms a step "
        f"(job.predicted: the figure to set a measured step against); the profile's "
        f"{cand.makespan * ms:.2f} ms before it:\n"
        f"  the busiest rank's compute {choose.busiest_compute(cand) * ms:.2f} -> 12000.00 ms "
        f"(its stages timed again, in its order), the executor's own 100.00 -> 300.00 ms an "
        f"action, a message 0.00 -> 500.00 ms (a dry run of the schedule itself)")


def test_steps_far_off_the_prediction_are_told():
    """far_off: the median of a job's steps (the first left out) over twice
    job.predicted or under half says so, with why it may be; nothing within."""
    from engine.distribute import far_off
    ms = 1e-3
    assert far_off([5 * ms, 6 * ms, 30 * ms], 4 * ms, "1f1b(2,8)") is None
    assert far_off([], 4 * ms, "1f1b(2,8)") is None and far_off([ms], None, "x") is None
    assert far_off([21.6 * ms, 27.99 * ms, 30 * ms, 28 * ms, 25 * ms], 5.15 * ms,
                   "zero_bubble_h1(2,4)") == (
        "zero_bubble_h1(2,4)'s steps took 27.99 ms (rank 0's median of 5, the first left out), "
        "5.4x job.predicted (5.15 ms): the machine may be loaded (others' processes on its "
        "cores since the re-time), or the batches are not the sample's size; job.retime() "
        "predicts again as the machine is now")
    assert "0.2x job.predicted (10.00 ms): the machine may have been loaded while distribute " \
        "timed it" in far_off([2 * ms], 10 * ms, "gpipe(2,2)")


def test_retimed_predicts_the_median_of_the_runs_steps():
    """With the re-time's runs, the prediction is the median over the runs
    of each run's simulated step (the ranks' runs paired, as they ran at
    once), not the step of the median times: here two runs of three have
    one slow stage, on a different rank each, and the median step pays it,
    while each stage's median time is the fast one."""
    rows = 16
    prof = _profile(rows, [2], [1, 1])
    (sched,) = choose.builtin(["1f1b"], 2, [2])
    cand, = choose.candidates(prof, [1, 1], rows, [sched])
    fast, slow = LayerCost(1.0, 1.0, 0.0, 0.0, 0), LayerCost(3.0, 3.0, 0.0, 0.0, 0)
    runs = [{0: slow, 1: fast}, {0: fast, 1: slow}, {0: fast, 1: fast}]
    of_medians = choose.retimed(cand, {0: fast, 1: fast})
    paired = choose.retimed(cand, {0: fast, 1: fast}, runs=runs)
    steps = sorted(choose.retimed(cand, r).makespan for r in runs)
    assert paired.makespan == pytest.approx(steps[1]) and paired.makespan > of_medians.makespan
    assert paired.costs == of_medians.costs


def test_retimed_takes_the_dry_runs_message_time():
    """Job.retime's dry run of the chosen schedule gives every message its
    own time; without one the candidate's is kept. The dry run's message
    time is found back against compute actions of per-stage costs."""
    from engine.calibrate import _message_time
    rows = 16
    prof = _profile(rows, [4], [1, 1, 1, 1])
    (sched,) = choose.builtin(["zb-v"], 2, [4])
    cand, = choose.candidates(prof, [1] * 4, rows, [sched], overhead=0.1, send=0.2)
    times = {s: LayerCost(1.0, 2.0, 1.0, 1.0, 0) for s in range(4)}
    kept = choose.retimed(cand, times, overhead=0.1)
    assert kept.costs["send"] == [0.2] * 4
    slow = choose.retimed(cand, times, overhead=0.1, send=0.7)
    assert slow.costs["send"] == [0.7] * 4 and slow.makespan > kept.makespan
    base = {k: slow.costs[k] for k in "FBIW"}
    assert _message_time(sched, base, slow.makespan) == pytest.approx(0.7)


def test_retime_stretches_each_stage_by_its_dry_run_wall_over_cpu():
    """Job.retime times the stages in thread CPU; the busy dry run burns that
    CPU per action, and each stage's actions' wall there over their CPU (at
    least 1; kinds the stage did not run left out) stretches its times."""
    from engine.measured_choice import _stretch, _stretched
    cpu = {"F": [1.0, 2.0], "B": [2.0, 2.0], "I": [0.0, 0.0], "W": [0.0, 0.0]}
    wall = {"F": [1.5, 2.0], "B": [3.0, 1.0], "I": [0.0, 0.0], "W": [0.0, 0.0]}
    assert _stretch(cpu, wall) == [pytest.approx(1.5), 1.0]
    assert _stretch(cpu, {}) == [1.0, 1.0]
    assert _stretched(LayerCost(1.0, 2.0, 0.5, 0.5, 7), 2.0) == LayerCost(2.0, 4.0, 1.0, 1.0, 7)


def test_shared_cores_counts_pp_ranks_worth_of_cores():
    """A simulated pp rank stands for its dp replicas and tp peers: pp=2 x
    tp=2 on two cores, one pp rank's worth; dp=2 x pp=2 x tp=2, a half; two
    ranks on two cores (or a host each), None: every rank has a core."""
    from engine.calibrate import shared_cores
    assert shared_cores([("a", 2)] * 4, 2) == 1.0
    assert shared_cores([("a", 2)] * 8, 2) == 0.5
    assert shared_cores([("a", 2)] * 2, 2) is None
    assert shared_cores([("a", 1), ("b", 1)], 2) is None
    assert shared_cores([("a", 2)] * 4 + [("b", 8)] * 4, 4) == 2.0


def test_fitted_load_makes_the_simulated_dry_run_as_long_as_the_measured():
    """Job.retime's load: others' processes on the cores, as many as make
    the simulator's compute walls of the dry run as long as the dry run's.
    Walls simulated with a known load give it back; walls within 10% of
    the simulator without load give none (a quiet machine predicts as
    before)."""
    from engine.calibrate import Calibration
    from engine.measured_choice import _shared_walls, fitted_load
    cal = Calibration(1e-4, 5e-5, receive=1e-5)
    for name, cores in (("1f1b", 2.0), ("1f1b", 1.0), ("zb-v", 2.0), ("interleaved", 0.5)):
        sched = engine.schedules.by_name(name, 2, 4, chunks=2)
        n = sched.num_stages
        spin = {"F": [1e-3 * (1 + s / 4) for s in range(n)], "B": [2e-3] * n,
                "I": [1e-3 if name == "zb-v" else 0.0] * n,
                "W": [1e-3 if name == "zb-v" else 0.0] * n}
        if name == "zb-v":
            spin["B"] = [0.0] * n
        for load in (0.75, 3.0, 10.0):
            wall = _shared_walls(sched, spin, replace(cal, cores=cores, load=load))
            assert fitted_load(sched, spin, cal, cores, wall) == pytest.approx(load, rel=1e-3)
        quiet = _shared_walls(sched, spin, replace(cal, cores=cores, load=0.0))
        for by in (1.0, 1.05, 0.8):
            wall = {k: [x * by for x in v] for k, v in quiet.items()}
            assert fitted_load(sched, spin, cal, cores, wall) == 0.0
        assert fitted_load(sched, spin, cal, cores, {}) == 0.0     # nothing measured


def test_retime_stretch_over_the_shared_cores_walls():
    """Where ranks outnumber cores, the stretch is the dry run's wall over
    what the simulator's sharing makes of the CPU, which can be under 1."""
    from engine.calibrate import Calibration
    from engine.measured_choice import _shared_walls, _stretch
    (sched,) = choose.builtin(["gpipe"], 2, [2])
    spin = {"F": [1.0, 1.0], "B": [2.0, 2.0], "I": [0.0, 0.0], "W": [0.0, 0.0]}
    walls = _shared_walls(sched, spin, Calibration(0.5, 0.0, cores=1.0))
    assert walls["F"] == [pytest.approx(1.5), pytest.approx(1.5)]    # one of two overlaps
    assert _stretch(walls, {"F": [1.2, 1.2], "B": [2.0, 2.0]}, floor=0.0)[0] < 1.0


def test_step_figures_charge_each_step_the_mean_of_its_actions():
    """A step pays the sum of its actions, so a stage's figure is per step
    the mean of its actions of a kind (one preempted action of two costs
    the step its whole length), then the median over the steps; the median
    action would leave the preemptions out. 1F1B(2,2) by hand, no messages
    timed: stage 0's F took 1+1, 1+5 and 1+3 in three steps, everything
    else 1. Simulated (messages free): rank 0 runs F F at 0-2, 2-4, rank 1
    F B F B at 2-6, rank 0 B B at 4-5 and 6-7: 7 (with the median, 6)."""
    from engine.calibrate import step_figures
    (sched,) = choose.builtin(["1f1b"], 2, [2])
    f0 = [(1.0, 1.0), (1.0, 5.0), (1.0, 3.0)]
    records = []
    for r in range(2):
        acts = [[(r, k, f0[n][mb] if (r, k) == (0, "F") else 1.0)
                 for k in "FB" for mb in range(2)] for n in range(3)]
        rows = [(0.0, 1.0, 0.0, 4)] * 3      # no time outside the actions
        records.append(([0, 1], rows, acts, "h"))
    fig = step_figures(sched, records)
    assert fig.compute["F"] == [pytest.approx(2.0), 1.0]        # the median action is 1.0
    assert fig.compute["B"] == [1.0, 1.0] and fig.compute["I"] == [0.0, 0.0]
    assert fig.action == 0.0 and fig.message == 0.0 and fig.simulated == pytest.approx(7.0)


def test_a_receive_pays_what_the_dry_run_saw_once_its_message_was_due():
    """A message sent while its receiver computes is not all read when the
    flight measured on waiting receivers says it is due: the receive pays
    the rest. message_times takes the flight from receives that waited
    before the send (less the per-action cost), and the receive's own time
    from those that began once their message was due; the simulator's
    receive then takes at least that long, and the re-time carries it."""
    from engine.calibrate import message_times
    waited = [(0.0, -1.0, 1.0), (10.0, 9.0, 11.2), (20.0, 19.5, 20.8)]   # flights 1.0 1.2 0.8
    due = [(30.0, 31.5, 33.5), (40.0, 42.0, 42.0)]       # began after the 1.0 flight
    early = [(50.0, 50.5, 51.0)]                          # began before it was due: not counted
    assert message_times(waited + due + early, 0.25) == (pytest.approx(0.75), pytest.approx(1.0))
    assert message_times(waited, 0.25) == (pytest.approx(0.75), 0.0)
    assert message_times(due + early, 0.25) is None
    rows = 16
    prof = _profile(rows, [4], [1, 1, 1, 1])
    (sched,) = choose.builtin(["1f1b"], 2, [4])
    base, = choose.candidates(prof, [1] * 4, rows, [sched], send={4: 0.1})
    paid, = choose.candidates(prof, [1] * 4, rows, [sched], send={4: 0.1}, recv={4: 2.0})
    assert base.costs["recv"] == [0.0, 0.0] and paid.costs["recv"] == [2.0, 2.0]
    assert paid.makespan > base.makespan
    again = choose.retimed(base, {}, recv=2.0)
    assert again.costs["recv"] == [2.0, 2.0] and again.makespan == pytest.approx(paid.makespan)
    assert choose.retimed(paid, {}).costs["recv"] == [2.0, 2.0]
    from engine.simulate import simulate
    one = {"F": 1.0, "B": 1.0, "send": 0.5}     # rank 1's first receive waits for the message
    first = [e for e in simulate(sched, one | {"recv": 0.2}).events if e.rank == 1][0]
    assert first.end - first.start == pytest.approx(1.5)
    later = [e for e in simulate(sched, one | {"recv": 3.0}).events if e.rank == 1][0]
    assert later.end - later.start == pytest.approx(3.0)     # the message was there at 1.5


def test_the_leader_is_costed_by_its_own_dry_run(monkeypatch):
    """distribute's choice costs the leading candidate again with the
    executor's costs measured on a dry run of its own schedule (its stages'
    times, its messages) until the leader is one so costed: a leader whose
    own run costs more falls behind the next, which is then measured."""
    import importlib
    from engine.calibrate import DryRun
    dist = importlib.import_module("engine.measured_choice")   # (dry_run read there)
    rows = 16
    prof = _profile(rows, [2, 4], [1, 1, 1, 1])
    scheds = choose.builtin(["1f1b", "zb-h1"], 2, [2, 4])
    cands = choose.candidates(prof, [1] * 4, rows, scheds, overhead={2: 0.01, 4: 0.01},
                              send={2: 0.01, 4: 0.01})
    lead, second = cands[0], cands[1]
    ran = []

    def fake_dry_run(world, pp, sched, nbytes, steps=5, tag_base=0, timeout=None, costs=None,
                     tensors=False, grid=None, grads=None, then=None):
        ran.append((sched.name, nbytes, costs))
        if sched.name == lead.schedule.name:
            d = DryRun(1.0, 0.03, 0.5, receive=0.04)
        else:
            d = DryRun(0.01, 0.01, 0.5)      # as its no-op figures said
        then(d)         # (the ranking on its figures, in its last word)
        return d

    class Grid:
        comm = None

        def group(self, axis):
            return None
    monkeypatch.setattr(dist, "dry_run", fake_dry_run)
    got = dist._measured_choice(Grid(), list(cands), prof, {}, rows, False, 0, None)
    assert [r[0] for r in ran] == [lead.schedule.name, second.schedule.name]
    assert got[0].schedule is second.schedule and got[0].measured
    assert got[0].makespan == pytest.approx(second.makespan)
    slow = next(c for c in got if c.schedule is lead.schedule)
    assert slow.measured and slow.makespan > lead.makespan
    assert slow.costs["send"] == [0.03, 0.03] and slow.costs["recv"] == [0.04, 0.04]
    assert slow.costs["W"][0] == pytest.approx(lead.costs["W"][0] - 0.01 + 1.0)
    size = rows // lead.schedule.num_microbatches
    spin = ran[0][2]        # the stages' own times, no executor's costs
    assert spin["F"][0] == pytest.approx(prof[size][0].F + prof[size][1].F)
    assert ran[0][1] == [(prof[size][1].act_bytes, 0), (prof[size][3].act_bytes,
                                                         prof[size][1].act_bytes)]
    assert sum(c.measured for c in got) == 2
    ran.clear()
    once = dist._measured_choice(Grid(), list(cands), prof, {}, rows, False, 0, None,
                                 tries=1)      # spent: the measured one leads, though slower
    assert once[0].schedule is lead.schedule and once[0].measured and len(ran) == 1
    assert once[1].schedule is second.schedule and not once[1].measured


def _two_ways():
    """1F1B(2,2) and ZB-H1(2,2) with the ranks sharing one core's worth:
    1F1B leads on a quiet host (each action's fixed cost, fewer actions),
    ZB-H1 under others' load (its ranks compute at once more often)."""
    rows = 16
    prof = _profile(rows, [2], [1, 1, 1, 1])
    scheds = choose.builtin(["1f1b", "zb-h1"], 2, [2])
    cands = choose.candidates(prof, [1] * 4, rows, scheds, overhead=0.002, cores=1.0)
    assert [c.schedule.name for c in cands] == ["1f1b(2,2)", "zero_bubble_h1(2,2)"]
    return rows, prof, cands


def test_the_table_follows_the_load_the_retime_fitted():
    """Where the ranks share the cores, the candidates are simulated again
    with others' processes on them (the load Job.retime fits): each row's
    figure is the simulator's with that load, the rows ranked by it, the
    chosen one marked with its loaded figure and the load said; a quiet
    host (no load), or a core a rank, changes nothing."""
    _, prof, cands = _two_ways()
    quiet, other = cands
    for c in cands:
        got = choose.loaded(c, 3.0)
        assert got.load == 3.0 and got.costs == c.costs and got.counts == c.counts
        rep = c.schedule.simulate(c.costs, 1.0, 3.0)
        assert got.makespan == pytest.approx(rep.makespan) and got.makespan > c.makespan
        assert got.bubble == pytest.approx(rep.bubble)
        assert choose.loaded(c, 0.0) is c
    own, = choose.candidates(prof, [1] * 4, 16, [quiet.schedule], overhead=0.002)
    assert choose.loaded(own, 3.0) is own       # a core a rank: no load is fitted there
    rows, mark = choose.under_load(cands, quiet, 3.0)
    assert [c.schedule.name for c in rows] == ["zero_bubble_h1(2,2)", "1f1b(2,2)"]
    assert mark is rows[1] and mark.load == 3.0
    text = choose.table(rows, mark).splitlines()
    assert text[1].startswith("zero_bubble_h1(2,2)") and "<- chosen" not in text[1]
    assert f"{rows[0].makespan * 1e3:>9.2f}" in text[1]
    assert text[2].endswith("<- chosen") and f"{mark.makespan * 1e3:>9.2f}" in text[2]
    assert f"{quiet.makespan * 1e3:>9.2f}" not in text[2]
    assert text[3] == ("(simulated with others' processes on the shared cores: 3.00 pp "
                       "ranks' worth, fitted to a dry run)")
    assert "others' processes" not in choose.table(cands, quiet)
    assert choose.under_load(cands, quiet, 0.0) == (cands, quiet)
    # the mesh threads' CPU charged to F, B and I on a crowded host is in a load
    # fitted to a dry run (its mesh threads ran on those cores): taken out, not
    # counted twice, whatever load was fitted (Job.retime charges none either)
    charged, = choose.candidates(prof, [1] * 4, 16, [quiet.schedule], overhead=0.002,
                                 cores=1.0, helper=0.001)
    assert charged.charge == (0.001, 0.001)
    assert charged.costs["F"] == pytest.approx([f + 0.001 for f in quiet.costs["F"]])
    for load in (3.0, 0.0):
        got = choose.loaded(charged, load)
        assert got.charge == () and got.load == load and got.costs.keys() == quiet.costs.keys()
        for k, v in quiet.costs.items():
            assert got.costs[k] == pytest.approx(v)
        assert got.makespan == pytest.approx(quiet.schedule.simulate(quiet.costs, 1.0,
                                                                     load).makespan)
    rows, mark = choose.under_load([charged], charged, 0.0)
    assert rows == [mark] and mark.makespan == pytest.approx(quiet.makespan)
    # a row costed by its own dry run leads one that was not (its figure a lower bound)
    led, mark = choose.under_load([replace(quiet, measured=True), other],
                                  None, 3.0)
    assert mark is None and led[0].schedule is quiet.schedule
    sure = replace(quiet, measured=True)
    led, mark = choose.under_load([sure, other], sure, 3.0)
    assert led[0] is mark and mark.measured and led[1].schedule is other.schedule


def test_every_row_is_simulated_with_what_the_retime_learned():
    """calibrated: the table's rows as the chosen one's re-time corrects it
    (distribute's rows read 1.5-2.4x under their steps, the re-timed chosen
    one close): each row's compute times the chosen busiest rank's re-timed
    over its profiled, the re-time's executor, message and receive costs,
    cores and load, then the rest to the re-time's prediction, which the
    chosen row then is; ranked again; the table says so."""
    _, _, cands = _two_ways()
    quiet, other = cands
    times = {s: LayerCost(*(2 * (quiet.costs[k][s]) for k in "FBIW"), 0) for s in (0, 1)}
    again = choose.retimed(quiet, times, overhead=0.004, send=0.001, recv=0.0005, cores=1.0)
    assert choose.busiest_compute(again) == pytest.approx(2 * choose.busiest_compute(quiet))
    rows, mark = choose.calibrated(cands, quiet, again)
    assert mark in rows and mark.makespan == again.makespan and mark.schedule is quiet.schedule
    assert [r.makespan for r in rows] == sorted(r.makespan for r in rows)

    def sim(c: choose.Candidate) -> float:
        costs = {k: [2 * v for v in c.costs[k]] for k in "FBIW"}
        costs.update(send=[0.001] * 2, recv=[0.0005] * 2, fixed=[0.004] * 2)
        return c.schedule.simulate(costs, 1.0).makespan
    row = next(r for r in rows if r.schedule is other.schedule)
    rest = again.makespan / sim(quiet)
    assert rest == pytest.approx(1.0) and row.retimed == (pytest.approx(2.0), rest)
    assert row.makespan == pytest.approx(sim(other) * rest) and row.makespan > other.makespan
    assert row.overhead == 0.004 and row.costs["send"] == [0.001] * 2 and row.cores == 1.0
    text = choose.table(rows, mark)
    assert text.splitlines()[-1] == (
        "(every row re-timed as the chosen schedule's re-time found the steps: compute "
        "x2.00, the executor's 4.00 ms an action, a message 1.00 ms, then x1.00 to its "
        "prediction)"), text
    assert "<- chosen" in next(t for t in text.splitlines() if t.startswith("1f1b(2,2)"))
    assert choose.legend(rows).endswith(      # (the choice was made on the profile's rows)
        "chosen: the fastest, before the rows were re-timed: each row now holds what the "
        "chosen schedule's re-time found, so another may show less time")
    assert "re-timed" not in choose.legend(cands)
    # nothing re-timed (no re-time, or the chosen row not among them): as they were
    assert choose.calibrated(cands, quiet, quiet) == (cands, quiet)
    assert choose.calibrated(cands, None, again) == (cands, None)
    assert "re-timed" not in choose.table(cands, quiet)


def test_the_choice_ranks_with_the_load_its_dry_runs_fit(monkeypatch):
    """distribute's choice fits others' load to each leader's dry run as
    Job.retime does (the ranks sharing the cores) and ranks every
    candidate with it: here the dry runs' compute walls are the
    simulator's with a load of 3, so the quiet leader, 1F1B, falls behind
    ZB-H1, which is then costed by its own dry run and leads. On a crowded
    host the mesh threads' CPU its dry run measured is in that load, not
    charged to the leader's actions besides."""
    import importlib
    from engine.calibrate import Calibration, DryRun
    dist = importlib.import_module("engine.measured_choice")   # (dry_run read there)
    rows, prof, cands = _two_ways()
    ran = []

    def fake_dry_run(world, pp, sched, nbytes, steps=5, tag_base=0, timeout=None, costs=None,
                     tensors=False, grid=None, grads=None, then=None):
        ran.append(sched.name)
        walls = dist._shared_walls(sched, {k: list(costs[k]) for k in "FBIW"},
                                   Calibration(0.002, 0.0, cores=1.0, load=3.0))
        d = DryRun(0.002, 0.0, 0.001, compute=walls)   # as the candidates' own figures
        then(d)         # (the ranking on its figures, in its last word)
        return d

    class Grid:
        comm = None

        def group(self, axis):
            return None

        def coord(self, axis):
            return 0
    monkeypatch.setattr(dist, "dry_run", fake_dry_run)
    got = dist._measured_choice(Grid(), list(cands), prof, {}, rows, True, 0, None)
    assert ran == ["1f1b(2,2)", "zero_bubble_h1(2,2)"]
    assert [c.schedule.name for c in got] == ["zero_bubble_h1(2,2)", "1f1b(2,2)"]
    for c, was in zip(got, cands[::-1]):
        assert c.measured and c.load == pytest.approx(3.0, rel=1e-3)
        assert c.makespan == pytest.approx(was.schedule.simulate(was.costs, 1.0, 3.0).makespan,
                                           rel=1e-3)


class _Recording:
    """A stage that records its calls and hands on what it got."""

    def __init__(self, s, log):
        self.s, self.log = s, log

    def forward(self, x):
        self.log.append((self.s, "F"))
        return x, ("ctx", self.s)

    def backward(self, ctx, gy):
        assert ctx == ("ctx", self.s)
        self.log.append((self.s, "B"))
        return gy

    def backward_input(self, ctx, gy):
        assert ctx == ("ctx", self.s)
        self.log.append((self.s, "I"))
        return gy, ("wctx", self.s)

    def backward_weight(self, wctx):
        assert wctx == ("wctx", self.s)
        self.log.append((self.s, "W"))


def test_the_dry_runs_stand_in_gradients_follow_the_cut():
    """With a dp axis the candidates' dry runs average stand-ins of each
    stage's gradients, as the steps will (the step's end in their figures):
    a stage holds its layers' gradients, by bytes, in order."""
    from engine.measured_choice import _grad_bytes, _stage_grads
    grads = [[4, 8], [16], [], [32, 64]]
    assert _stage_grads(grads, (1, 2, 1), [0, 1, 2]) == {0: [4, 8], 1: [16], 2: [32, 64]}
    assert _stage_grads(grads, (2, 2), [1]) == {1: [32, 64]}
    layer = Linear(3, 2, np.random.default_rng(0))
    assert _grad_bytes(layer) == [int(a.nbytes) for a in layer.params()]
    assert _grad_bytes(Tanh()) == []


def test_the_profile_takes_the_clock_it_is_given():
    """Where the ranks share cores distribute profiles in the thread's CPU
    (its wall held the sharing the simulator applies again): measure and
    measure_stages time with the clock they are given."""
    ticks = []

    def clock():
        ticks.append(1)
        return float(len(ticks))
    rng = np.random.default_rng(0)
    layers = [Linear(3, 3, rng), Tanh(), Linear(3, 2, rng)]
    got = choose.measure(layers, np.ones((4, 3)), [2], reps=1, runs=1, clock=clock)
    assert ticks and all(lc.F > 0 and lc.B > 0 for lc in got[2].values())
    n = len(ticks)
    whole = choose.measure_stages(layers, lambda a, b: Sequential(*layers[a:b]), np.ones((4, 3)),
                                  {2: [(0, 2)]}, reps=1, runs=1, clock=clock)
    assert len(ticks) > n and whole[2][(0, 2)].F > 0


def test_measurements_hold_the_collector_off_and_put_it_back():
    """engine.calibrate.collected: one collection, then none until the
    measurement is over (a full collection of a large heap inside a dry run
    made its steps 3-4x as long), and the collector as it was after,
    an error inside included."""
    import gc

    from engine.calibrate import collected
    assert gc.isenabled()
    with collected():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError):
        with collected():
            raise ValueError("inside")
    assert gc.isenabled()
    gc.disable()
    try:
        with collected():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_time_program_runs_the_ranks_actions_in_order():
    """Job.retime times the stages as the step runs them: the rank's
    compute actions in the lowered program's order (a split backward's W
    as late as the schedule puts it, two stages alternating), each kind's
    time per stage; kinds the program does not run cost 0."""
    from engine.schedules import by_name
    from engine.verify import verify
    sched = verify(by_name("zb-v", 2, 2))
    program = sched.ranks[0]
    log = []
    stages = {s: _Recording(s, log) for s in sched.stages_of(0)}
    ticks = iter(range(10 ** 6))
    got = choose.time_program(stages, {s: np.ones((2, 3)) for s in stages}, program, reps=2,
                              clock=lambda: float(next(ticks)))
    compute = [(a.stage, a.kind) for a in program if a.kind in "FBIW"]
    assert log == compute * (len(log) // len(compute)) and len(log) == 3 * len(compute)
    assert set(got) == set(stages)
    for lc in got.values():
        assert (lc.F, lc.B, lc.I, lc.W) == (1.0, 0.0, 1.0, 1.0) and lc.act_bytes == 48
    # the last stage's loss is timed in its F, as the executor runs it there
    late = [0.0]

    def loss(y):
        late[0] += 5.0
        return y * 2
    each = []       # and every run's own figures, for the median over the runs' steps
    got = choose.time_program(stages, {s: np.ones((2, 3)) for s in stages}, program, reps=2,
                              clock=lambda: float(next(ticks)) + late[0], loss=(3, loss),
                              each=each)
    assert (got[3].F, got[3].I, got[0].F) == (6.0, 1.0, 1.0)
    assert len(each) == 2 and all(run == got for run in each)



def test_time_program_feeds_a_stage_its_inputs_dtypes():
    """The re-time copies each stage's input for every F as a message
    brings it, of its own dtype: a bool mask crossing a cut beside the
    activation (an attention's padding mask) stays bool (``v * 1`` made it
    int64: masked_fill, and torch's TransformerEncoderLayer, refused it, so
    distribute failed on a model one process trains)."""
    torch = pytest.importorskip("torch")
    from engine.schedules import by_name
    from engine.torch_stage import TorchStage

    class MaskFill(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, xs):
            mask, h = xs
            return self.fc(h).masked_fill(mask, 0.0)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    got = choose.time_program({0: TorchStage(MaskFill())}, {0: (mask, torch.ones(2, 3))},
                              by_name("1f1b", 1, 2).ranks[0], reps=1)
    assert got[0].F > 0 and got[0].B > 0

def _dry_worker(world):
    from engine.calibrate import dry_run
    from engine.schedules import by_name
    sizes = [(64, 8), (128, 64), (256, 128), (32, 256)]      # per stage: forward, backward
    spin = {"F": [1e-4] * 4, "I": [2e-4] * 4, "W": [1e-4] * 4}
    return [dry_run(world, world, by_name(name, 2, 2), sizes, steps=2, timeout=30, costs=costs,
                    tensors=tensors)
            for name, costs, tensors in (("zb-v", None, False), ("zb-h1", None, False),
                                         ("1f1b", None, False), ("zb-v", spin, False),
                                         ("zb-v", spin, True))]


def test_dry_run_of_any_schedule():
    """engine.calibrate.dry_run runs the schedule being predicted (split
    backward, two stages a rank) with each stage's own message sizes, its
    stages computing nothing or keeping the core busy per stage and kind,
    and every rank gets the same executor costs; its messages torch
    tensors, as a torch job's are, too."""
    pytest.importorskip("torch")
    a, b = mesh.spawn(_dry_worker, 2, timeout=60, env=PATIENT)
    assert a == b and all(d.action > 0 and d.message >= 0 and d.helper >= 0 and d.receive >= 0
                          and d.span > 0 and d.simulated > 0 for d in a)


def test_stages_measured_whole_enter_the_prediction():
    """A stage of several layers costs more than its layers timed alone
    (their weights leave the core's cache between them): stage_spans lists
    the candidates' multi-layer stages, measure_stages times each whole on
    its real input, and candidates takes those times instead of the sums."""
    rows, p, widths = 16, 2, [3, 5, 4, 6, 2, 3, 4]
    ms = [2, 4]
    scheds = choose.builtin(["1f1b", "interleaved"], p, ms)
    prof = _profile(rows, ms, [1] * 6)
    cands = choose.candidates(prof, [1] * 6, rows, scheds)
    spans = choose.stage_spans(cands, rows)
    assert set(spans) == {8, 4}
    for c in cands:
        size = -(-rows // c.schedule.num_microbatches)
        bounds = [sum(c.counts[:s]) for s in range(len(c.counts) + 1)]
        mine = {(a, b) for a, b in zip(bounds, bounds[1:]) if b - a > 1}
        assert mine <= set(spans[size])
    assert all(b - a > 1 for ss in spans.values() for a, b in ss)

    whole = {size: {sp: LayerCost(1.0, 2.0, 1.0, 1.0, 0) for sp in ss}
             for size, ss in spans.items()}
    timed = choose.candidates(prof, [1] * 6, rows, scheds, overhead=0.5, stages=whole)
    for c in timed:
        size = -(-rows // c.schedule.num_microbatches)
        start = 0
        for s, n in enumerate(c.counts):
            want = 1.0 if n > 1 else prof[size][start].F
            assert c.costs["F"][s] == pytest.approx(want + 0.5)
            start += n
    assert min(c.makespan for c in timed) > max(c.makespan for c in cands)
    paid = {c.schedule.name: c.makespan
            for c in choose.candidates(prof, [1] * 6, rows, scheds, overhead=0.5)}
    assert all(c.summed == pytest.approx(paid[c.schedule.name]) for c in timed)

    layers = [Linear(a, b, np.random.default_rng(i)) for i, (a, b) in
              enumerate(zip(widths, widths[1:]))]
    batch = np.random.default_rng(9).standard_normal((rows, widths[0]))
    seen = {}

    class Probe(Sequential):
        def forward(self, x):
            seen.setdefault(self.span, x.copy())
            return super().forward(x)

    def join(first, stop):
        stage = Probe(*layers[first:stop])
        stage.span = (first, stop)
        return stage

    got = choose.measure_stages(layers, join, batch, {8: [(2, 5)], 4: [(0, 3), (3, 6)]},
                                reps=1, mine=[1, 2])
    todo = [(4, 3, 6), (8, 2, 5)]        # sorted (size, first, stop) minus position 0
    assert {(size, *sp) for size, row in got.items() for sp in row} == set(todo)
    for size, first, stop in todo:
        x = batch[:size]
        for layer in layers[:first]:
            x = layer.forward(x)[0]
        assert np.array_equal(seen[(first, stop)], x)
        assert got[size][(first, stop)].act_bytes == size * widths[stop] * 8


# ---- distribute on numpy layers: dp=2 x pp=2


def _numpy_model(widths=WIDTHS):
    return Sequential(*mlp_stages(widths, 1, SEED)[0].layers)


def _argument_errors(grid, d):
    """Each bad call raises on every rank, before anything collective."""
    model, errors = _numpy_model(), []
    for kwargs, match in [({"loss_fn": None}, "loss_fn"),
                          ({"sample": None}, "sample="),
                          ({"balance": "uniform", "schedule": "interleaved", "microbatches": 2,
                            "sample": None, "model": Sequential(Linear(2, 2), Tanh())},
                           "needs 4 pipeline stages on pp=2"),
                          ({"schedule": "zb-v", "model": Sequential(Linear(2, 2), Tanh())},
                           "schedule zb_v(2,"),        # named, measured: before any timing
                          ({"model": Sequential(Linear(2, 2))}, "pp=2"),
                          ({"plan": {"0": "colwise"}}, "tp axis"),
                          ({"grid": mesh.grid(grid.comm, dp=2, stage=2)}, "pp axis")]:
        args = dict(model=model, grid=grid, loss_fn=mse_loss, sample=_half(_data(0)[0], d))
        args.update(kwargs)
        try:
            engine.distribute(**args)
            errors.append(f"no error for {kwargs}")
        except ValueError as e:
            errors.append(match in str(e) or str(e))
    return errors


def _numpy_worker(world, axes, plan, widths):
    grid = mesh.grid(world, **axes)
    d = grid.coord("dp") if "dp" in axes else 0
    dp = axes.get("dp", 1)
    errors = _argument_errors(grid, d) if not plan else []
    model = _numpy_model(widths)

    def part(a):
        return a[d * len(a) // dp:(d + 1) * len(a) // dp]

    job = engine.distribute(model, grid, plan=plan, sample=part(_data(0, widths)[0]),
                            loss_fn=mse_loss, timeout=30, reps=1)
    losses = []
    for step in range(STEPS):
        x, y = (part(a) for a in _data(step, widths))
        losses.append(job.step(x, y))
        sgd(job.stages, LR)
    cal = job.calibration
    return {"errors": errors, "losses": losses, "state": job.state_dict(),
            "schedule": job.schedule.name, "table": job.table(), "last": job.pipeline.last,
            # (the mesh threads' CPU may be 0: messages through the same-host
            # rings leave them parked: 0 on some ranks in 4 of 6 quiet runs, on all in 1)
            "calibrated": (cal.helper_measured >= 0 and cal.helper == (cal.helper_measured
                                                                       if cal.crowded else 0.0)),
            "retimed": job.predicted != job.profiled.makespan,    # tp stages too, since 15
            "dry": (   # retime's executor costs: a dry run of the chosen
                cal is not job.profile_calibration
                and cal.crowded == job.profile_calibration.crowded
                and cal.helper == (cal.helper_measured if cal.crowded else 0.0)
                and job.chosen.costs["send"] == [cal.message] * job.schedule.num_stages
                and job.chosen.costs["recv"] == [cal.receive] * job.schedule.num_stages),
            # the re-time runs the loss where the last stage's F does
            "loss": (job._loss() is not None) == job.pipeline.last,
            "gc": __import__("gc").isenabled(),     # held off only while measuring
            "measured": job.profiled.measured,   # by its own dry run (tp stages too, since 15)
            # the re-time's CPU times stretched by the busy dry run's wall over CPU, per
            # stage (over what the simulator's sharing of the cores makes of it, where the
            # ranks outnumber them: then under 1 too), and simulated with that sharing
            "stretched": (job.stretch is not None and len(job.stretch) == job.schedule.num_stages
                          and min(job.stretch) >= (1.0 if cal.cores is None else 0.0) and
                          min(job.stretch) > 0 and job.chosen.cores == cal.cores),
            # the tp collectives of each action, which the dry run makes too: sharded only
            "calls": (bool(job.tp_calls) == (plan is not None) and all(
                n > 0 for sizes in job.tp_calls.values() for n in sizes)),
            "tp_calls": sum(len(sizes) for sizes in job.tp_calls.values())}


def _numpy_reference(widths=WIDTHS):
    model = _numpy_model(widths)
    losses = []
    for step in range(STEPS):
        x, y = _data(step, widths)
        out, ctx = model.forward(x)
        loss, gy = mse_loss(out, y)
        model.backward(ctx, gy)
        sgd([model], LR)
        losses.append(loss)
    return model, losses


@pytest.mark.parametrize("axes,plan", [
    ({"dp": 2, "pp": 2}, None),
    ({"pp": 2, "tp": 2}, TP_PLAN),
    pytest.param({"dp": 2, "pp": 2, "tp": 2}, TP_PLAN, marks=pytest.mark.slow),
], ids=["dp2xpp2", "pp2xtp2", "dp2xpp2xtp2"])
def test_numpy_distribute_matches_one_process(axes, plan):
    widths = TP_WIDTHS if plan else WIDTHS
    n = int(np.prod(list(axes.values())))
    results = mesh.spawn(_numpy_worker, n, axes, plan, widths, timeout=180, env=PATIENT)
    ref, ref_losses = _numpy_reference(widths)
    for res in results:
        assert all(e is True for e in res["errors"]), res["errors"]
        assert res["schedule"] == results[0]["schedule"] and "<- chosen" in res["table"]
        assert res["calibrated"] and res["retimed"] and res["dry"] and res["loss"]
        assert res["measured"] and res["stretched"] and res["calls"] and res["gc"]
        # the step's loss on every rank, the same float (the last stage's, averaged over dp)
        assert res["losses"] == results[0]["losses"]
        np.testing.assert_allclose(res["losses"], ref_losses, rtol=1e-10)
    assert sum(res["last"] for res in results) == n // 2
    assert (sum(res["tp_calls"] for res in results) > 0) == (plan is not None)
    state = results[0]["state"]
    assert all(res["state"] is None for res in results[1:])
    got = _numpy_model(widths)
    engine.load_state(got, state)
    for a, b in zip(got.params(), ref.params(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def _numpy_recompute_worker(world, widths):
    """pp=2 x tp=2: what a rank may hold set between what GPipe's stages
    hold kept and recomputing, so only recomputing fits."""
    from engine.layers import Recompute
    grid = mesh.grid(world, pp=2, tp=2)
    sample = _data(0, widths)[0]
    args = dict(grid=grid, plan=TP_PLAN, schedule="gpipe", microbatches=4, balance="uniform",
                sample=sample, loss_fn=mse_loss, timeout=30, reps=1, verbose=False)
    errors = []
    for kwargs, match in [({"recompute": "0"}, "(submodules by name) needs a torch model"),
                          ({"memory_limit": 1}, "memory_limit=1 bytes; recompute='auto' may fit")]:
        try:
            engine.distribute(_numpy_model(widths), **args, **kwargs)
            errors.append(f"no error for {kwargs}")
        except ValueError as e:
            errors.append(match in str(e) or str(e))
    both = engine.distribute(_numpy_model(widths), **args, recompute="auto", memory_limit=1e12)
    peaks = {c.recompute: c.peak_bytes for c in both.candidates}
    limit = (peaks[False] + peaks[True]) / 2
    job = engine.distribute(_numpy_model(widths), **args, recompute="auto", memory_limit=limit)
    losses = []
    for step in range(STEPS):
        losses.append(job.step(*_data(step, widths)))
        sgd(job.stages, LR)
    return {"errors": errors, "peaks": peaks, "limit": limit, "losses": losses,
            "chosen": job.chosen.recompute, "fits": job.chosen.fits,
            "wrapped": [isinstance(st, Recompute) for st in job.stages],
            "state": job.state_dict(), "last": job.pipeline.last, "pp": grid.coord("pp")}


@pytest.mark.timeout(240)
def test_numpy_distribute_recomputes_under_a_memory_limit():
    widths = [4, 32, 32, 32, 4]     # activations four times the input: recomputing pays
    results = mesh.spawn(_numpy_recompute_worker, 4, widths, timeout=200, env=PATIENT)
    ref, ref_losses = _numpy_reference(widths)
    for res in results:
        assert all(e is True for e in res["errors"]), res["errors"]
        assert res["peaks"][True] < res["peaks"][False], res["peaks"]
        # (every stage, or the stage of the rank over the limit only)
        again = res["chosen"]
        assert again and res["fits"] and again == results[0]["chosen"]
        assert res["wrapped"] == [again is True or res["pp"] in again]
        if res["last"]:
            np.testing.assert_allclose(res["losses"], ref_losses, rtol=1e-10)
    got = _numpy_model(widths)
    engine.load_state(got, results[0]["state"])
    for a, b in zip(got.params(), ref.params(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


# ---- distribute on a torch nn.Sequential: dp=2 x pp=2, torch's own SGD


def _torch_model(widths=WIDTHS):
    import torch
    torch.manual_seed(SEED)
    mods = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        last = i == len(widths) - 2
        mods += [torch.nn.Linear(a, b).double()] + ([] if last else [torch.nn.Tanh()])
    return torch.nn.Sequential(*mods)


# the other layout each case's checkpoint is resumed on, its plan and cut
ELSEWHERE = {"dp2xpp2": ({"pp": 2, "tp": 2}, {"0": "colwise", "2": "rowwise", "6": "colwise",
                                              "8": "rowwise"}, [4, 5]),
             "pp2xtp2": ({"dp": 2, "pp": 2}, None, [4, 3])}


def _adamw(named):
    """AdamW, weights decayed and biases not, as one process's model would group them."""
    import torch
    return torch.optim.AdamW([{"params": [p for n, p in named if "bias" not in n]},
                              {"params": [p for n, p in named if "bias" in n],
                               "weight_decay": 0.0}], lr=LR / 10)


def _torch_worker(world, axes, plan, widths, ckpt, elsewhere):
    import torch
    torch.set_num_threads(1)
    grid = mesh.grid(world, **axes)
    d, dp = (grid.coord("dp"), 2) if "dp" in axes else (0, 1)
    model = _torch_model(widths)
    if d == 1:                          # replica 1 starts elsewhere: distribute broadcasts
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)

    def part(a, d=d, dp=dp):
        return torch.from_numpy(a[d * len(a) // dp:(d + 1) * len(a) // dp])

    if not plan:      # a limit nothing meets: the table, and what might meet it
        with pytest.raises(ValueError, match=r"under memory_limit=1 bytes; recompute='auto', "
                                             r"or submodule names to recompute"):
            engine.distribute(_torch_model(widths), grid, sample=part(_data(0, widths)[0]),
                              loss_fn=torch.nn.functional.mse_loss, microbatches=2, reps=1,
                              timeout=60, verbose=False, memory_limit=1)
    job = engine.distribute(model, grid, plan=plan, sample=part(_data(0, widths)[0]),
                            loss_fn=torch.nn.functional.mse_loss, microbatches=2, reps=1,
                            timeout=60)
    named = job.named_parameters()      # groups by name, as one process's model would take
    opt = _adamw(named)
    losses = []
    for step in range(STEPS):
        x, y = (part(a) for a in _data(step, widths))
        opt.zero_grad()
        losses.append(job.step(x, y))
        opt.step()
    state = job.state_dict()
    state = None if state is None else {k: v.numpy().copy() for k, v in state.items()}
    # README's checkpoint recipe: the model and the optimizer's state whole on rank 0
    # (job.optimizer_state_dict), with the layout auto chose
    whole, optim = job.state_dict(), job.optimizer_state_dict(opt)
    if world.rank == 0:
        torch.save({"model": whole, "optim": optim, "schedule": job.schedule,
                    "balance": list(job.counts)}, f"{ckpt}/model.pt")
    collectives.barrier(world)
    ck = torch.load(f"{ckpt}/model.pt", weights_only=False)     # (a Schedule)
    again = engine.distribute(_torch_model(widths), grid, plan=plan, schedule=ck["schedule"],
                              balance=ck["balance"], loss_fn=torch.nn.functional.mse_loss,
                              timeout=60, verbose=False, tag_base=1 << 20)
    again.load_state_dict(ck["model"])
    resumed = _adamw(again.named_parameters())
    again.load_optimizer_state_dict(resumed, ck["optim"])
    # ... and on another layout: (dp=2 x) pp=2 (x tp=2), its own plan and cut
    there, plan_there, cut = elsewhere
    grid_there = mesh.grid(world, **there)
    other = engine.distribute(_torch_model(widths), grid_there, plan=plan_there,
                              schedule="1f1b", microbatches=2, balance=cut, timeout=60,
                              loss_fn=torch.nn.functional.mse_loss, verbose=False,
                              tag_base=1 << 21)
    other.load_state_dict(ck["model"])
    moved = _adamw(other.named_parameters())
    # a misshapen or unknown entry raises on every rank, before any loads
    first = next(iter(ck["optim"]["state"]))
    bad = {**ck["optim"], "state": {**ck["optim"]["state"],
                                    first: {**ck["optim"]["state"][first],
                                            "exp_avg": torch.zeros(3, 1)}}}
    refused = []
    with pytest.raises(ValueError) as e:
        other.load_optimizer_state_dict(moved, bad)
    refused.append(str(e.value))
    with pytest.raises(KeyError) as e:
        other.load_optimizer_state_dict(moved, {**ck["optim"], "state": {"9.weight": {}}})
    refused.append(str(e.value))
    refused.append(len(moved.state))
    # rank 1's optimizer grouped otherwise than the one that saved: every rank raises
    lone = _adamw(other.named_parameters()) if world.rank != 1 else \
        torch.optim.AdamW([p for _, p in other.named_parameters()], lr=LR / 10)
    with pytest.raises(ValueError) as e:
        other.load_optimizer_state_dict(lone, ck["optim"])
    refused += [str(e.value), len(lone.state)]
    # the state on rank 0 only, as job.optimizer_state_dict returned it: every rank raises
    # (rank 0 went on into the next collective, paired with the others' next call)
    with pytest.raises(TypeError) as e:
        other.load_optimizer_state_dict(moved, optim)
    refused += [str(e.value), len(moved.state)]
    with pytest.raises(TypeError) as e:     # torch's own, by index: not "another model's"
        other.load_optimizer_state_dict(moved, opt.state_dict())
    refused += [str(e.value), len(moved.state)]
    other.load_optimizer_state_dict(moved, ck["optim"])
    dt = grid_there.coord("dp") if "dp" in there else 0
    for j, o, at in ((job, opt, (d, dp)), (again, resumed, (d, dp)),
                     (other, moved, (dt, there.get("dp", 1)))):   # one more step each
        x, y = (part(a, *at) for a in _data(STEPS, widths))
        o.zero_grad()
        j.step(x, y)
        o.step()
    went, back, moved_state = job.state_dict(), again.state_dict(), other.state_dict()
    went_optim, moved_optim = job.optimizer_state_dict(opt), other.optimizer_state_dict(moved)
    return {"losses": losses, "schedule": job.schedule.name, "last": job.pipeline.last,
            "state": state, "resumed": went is None or all(
                torch.equal(went[k], back[k]) for k in went) and list(went) == list(back),
            "went": went, "moved": moved_state, "went_optim": went_optim,
            "moved_optim": moved_optim, "refused": refused,
            "named": [(n, tuple(p.shape)) for n, p in named], "tp": plan is not None,
            "same": [id(p) for _, p in named] == [id(p) for p in job.parameters()]}


def _optim_close(got: dict, want: dict, **tol) -> None:
    """Two whole optimizer states (DCP's format) alike: names, groups, values."""
    import torch
    assert list(got["state"]) == list(want["state"])
    assert got["param_groups"] == want["param_groups"]
    for n, own in want["state"].items():
        assert list(got["state"][n]) == list(own)
        for k, v in own.items():
            torch.testing.assert_close(got["state"][n][k], v, **tol, msg=lambda m: f"{n} {k}: {m}")


def trained_alike(results: list[dict], losses: list[float], want: dict) -> dict:
    """The workers' losses (the same on every rank) and gathered state (rank 0's,
    keyed as ``want``, the one-process model's state_dict) are one process's,
    to 1e-10; returns that state."""
    for res in results:     # (the step's loss on every rank, the same float)
        assert res["losses"] == results[0]["losses"]
        np.testing.assert_allclose(res["losses"], losses, rtol=1e-10)
    state = results[0]["state"]
    assert all(res["state"] is None for res in results[1:])
    assert list(state) == list(want)
    for k, v in want.items():
        np.testing.assert_allclose(state[k], v.numpy(), rtol=1e-10, atol=1e-13, err_msg=k)
    return state


def _halved(shape: tuple, whole: tuple) -> bool:
    """Whether ``shape`` is ``whole`` cut in two along one axis (a tp=2 shard)."""
    apart = [(a, b) for a, b in zip(shape, whole, strict=True) if a != b]
    return len(apart) == 1 and 2 * apart[0][0] == apart[0][1]


def assert_named_like(results: list[dict], model: Any) -> None:
    """Each rank's ``named`` (name, shape) pairs, its job's
    ``named_parameters()`` (``same``: in ``parameters()``' order), name the
    one-process ``model``'s parameters as its ``state_dict()`` does: all of
    them over the ranks, each whole, or with ``tp``, a shard cut along one
    axis into halves."""
    whole = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    seen, cut = set(), 0
    for res in results:
        assert res["same"], res["named"]
        for n, shape in res["named"]:
            assert n in whole, (n, sorted(whole))
            seen.add(n)
            assert shape == whole[n] or res["tp"] and _halved(shape, whole[n]), \
                (n, shape, whole[n])
            cut += shape != whole[n]
    assert seen == set(whole), (seen, whole)
    assert (cut > 0) == any(res["tp"] for res in results), cut


@pytest.mark.timeout(300)    # four processes importing torch on a loaded machine
@pytest.mark.parametrize("axes,plan", [
    ({"dp": 2, "pp": 2}, None),
    pytest.param({"pp": 2, "tp": 2}, TP_PLAN, marks=pytest.mark.slow),
], ids=["dp2xpp2", "pp2xtp2"])
def test_torch_distribute_matches_one_process(axes, plan, tmp_path):
    torch = pytest.importorskip("torch")
    widths = TP_WIDTHS if plan else WIDTHS
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    case = "pp2xtp2" if plan else "dp2xpp2"
    results = mesh.spawn(_torch_worker, 4, axes, plan, widths, str(tmp_path), ELSEWHERE[case],
                         timeout=280, env=PATIENT)
    # resumed from the whole state on the same layout: bit for bit the run that went on
    assert all(res["resumed"] for res in results)
    for r, res in enumerate(results):    # a misshapen entry, an unknown name: every rank
        assert res["refused"][0].startswith(f"rank {r}: load_optimizer_state_dict: 0.weight's "
                                            f"exp_avg is (3, 1) in the state given, but "
                                            f"0.weight is ({widths[1]}, {widths[0]}) in the "
                                            f"model"), res["refused"]
        assert f"rank {r}: load_optimizer_state_dict: 9.weight not a parameter of the " \
            f"model" in res["refused"][1], res["refused"]
        assert res["refused"][2] == 0          # nothing loaded
        lone = ("param group 0's parameters are in the state's groups [0, 1]" if r == 1
                else "not loaded, rank 1 could not: rank 1: load_optimizer_state_dict: ")
        assert res["refused"][3].startswith(f"rank {r}: load_optimizer_state_dict: ") and \
            lone in res["refused"][3] and res["refused"][4] == 0, res["refused"]
        given = ("not loaded, rank 1 could not: rank 1: load_optimizer_state_dict: takes"
                 if r == 0 else "not a NoneType: job.optimizer_state_dict(opt) returns it on "
                 "rank 0 only, None on the others; give every rank the whole state")
        assert res["refused"][5].startswith(f"rank {r}: load_optimizer_state_dict: ") and \
            given in res["refused"][5] and res["refused"][6] == 0, res["refused"]
        # (the indices: this rank's parameters', as many as the chosen cut gives it)
        assert re.match(rf"rank {r}: load_optimizer_state_dict: takes the state by parameter "
                        rf"name, not an optimizer's own opt\.state_dict\(\) \(by index: "
                        rf"\[0(, \d+)*\]\); ", res["refused"][7]) \
            and res["refused"][8] == 0, res["refused"]
    model = _torch_model(widths)
    opt = _adamw(list(model.named_parameters()))
    losses = []
    for step in range(STEPS + 1):
        x, y = (torch.from_numpy(a) for a in _data(step, widths))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if step == STEPS:   # torch DCP's full state of one process's AdamW is the job's
            whole = get_optimizer_state_dict(model, opt, options=StateDictOptions(
                full_state_dict=True))
            ck = torch.load(tmp_path / "model.pt", weights_only=False)
            _optim_close(ck["optim"], whole, rtol=1e-10, atol=1e-13)
            state = trained_alike(results, losses, model.state_dict())
            copy = _torch_model(widths)
            copy.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
            z = torch.from_numpy(_data(9, widths)[0])
            torch.testing.assert_close(copy(z), model(z), rtol=1e-12, atol=1e-12)
            # ... and one process resumes from the job's checkpoint: DCP loads it
            alone = _torch_model(widths)
            alone.load_state_dict(ck["model"])
            alone_opt = _adamw(list(alone.named_parameters()))
            set_optimizer_state_dict(alone, alone_opt, ck["optim"],
                                     options=StateDictOptions(full_state_dict=True))
            alone_opt.zero_grad()
            torch.nn.functional.mse_loss(alone(x), y).backward()
            alone_opt.step()
        opt.step()
        losses.append(loss.item())
    # every layout a step on from the checkpoint: the uninterrupted run to float64 rounding
    # (dp averages, tp's rowwise sums and the one process add in other orders)
    went = model.state_dict()
    for k, v in went.items():
        for got in (results[0]["went"][k], results[0]["moved"][k], alone.state_dict()[k]):
            torch.testing.assert_close(got, v, rtol=1e-10, atol=1e-13)
    whole = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    for got in (results[0]["went_optim"], results[0]["moved_optim"]):
        _optim_close(got, whole, rtol=1e-10, atol=1e-13)
    assert all(res["went_optim"] is None and res["moved_optim"] is None for res in results[1:])
    assert_named_like(results, model)


def _two_optimizers(named):
    """AdamW on the weights, last layer first, and SGD with momentum on the
    biases: an order other than the model's, in two optimizers."""
    import torch
    named = dict(named)
    weights = [named[k] for k in reversed(named) if k.endswith("weight")]
    return [torch.optim.AdamW(weights, lr=LR / 10),
            torch.optim.SGD([named[k] for k in named if k.endswith("bias")], lr=LR,
                            momentum=0.9)]


def _tied_model():
    """An embedding tied to the head."""
    import torch
    from torch import nn
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Embedding(8, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                          nn.Linear(4, 8, bias=False)).double()
    model[4].weight = model[0].weight
    return model


def _ids_loss(out, t):
    import torch
    return torch.nn.functional.cross_entropy(out.flatten(0, 1), t.flatten())


def test_several_optimizers_state_is_dcps_in_their_order(tmp_path):
    """job.optimizer_state_dict takes a list of optimizers, as DCP's
    get_optimizer_state_dict does, and lists each group's parameters in the
    optimizer's order: one process's job gives DCP's full state, keys,
    order and values (it took one optimizer only, and sorted the names in
    the model's order), and load_optimizer_state_dict gives each optimizer
    of a list its own state back. A tied embedding and head on the two
    stages of one rank (ZB-V) are one name, once (they were listed twice).
    One process, a one-rank gloo group."""
    torch = pytest.importorskip("torch")
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict)
    torch.set_num_threads(1)
    x, y = (torch.from_numpy(a) for a in _data(0))
    ids = [torch.from_numpy(np.random.default_rng(s).integers(0, 8, (4, 3))) for s in (1, 2)]
    wants = []
    for model, make, batch, loss in (
            (_torch_model(), _two_optimizers, (x, y), torch.nn.functional.mse_loss),
            (_tied_model(), lambda named: torch.optim.AdamW([p for _, p in named], lr=LR),
             ids, _ids_loss)):
        opts = make(model.named_parameters())
        loss(model(batch[0]), batch[1]).backward()
        for o in opts if isinstance(opts, list) else [opts]:
            o.step()
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg{len(wants)}",
                                rank=0, world_size=1)
        try:
            wants.append(get_optimizer_state_dict(model, opts, options=StateDictOptions(
                full_state_dict=True)))
        finally:
            dist.destroy_process_group()
    with mesh.init() as world:
        job = engine.distribute(_torch_model(), mesh.grid(world, pp=1), schedule="gpipe",
                                microbatches=1, balance="uniform", verbose=False,
                                loss_fn=torch.nn.functional.mse_loss)
        mine = _two_optimizers(job.named_parameters())
        job.step(x, y)
        for o in mine:
            o.step()
        got = job.optimizer_state_dict(mine)
        again = _two_optimizers(job.named_parameters())
        job.load_optimizer_state_dict(again, got)
        tied = engine.distribute(_tied_model(), mesh.grid(world, pp=1), schedule="zb-v",
                                 microbatches=2, balance=[2, 3], verbose=False,
                                 loss_fn=_ids_loss, tag_base=1 << 20)
        adam = torch.optim.AdamW(tied.parameters(), lr=LR)
        tied.step(*ids)
        adam.step()
        got_tied = tied.optimizer_state_dict(adam)
        # an optimizer made over model.parameters() before distribute steps stage 0's
        # copy only (stage 3 holds its own): the next step says so (it trained on, wrong)
        model = nn.Sequential(OrderedDict(zip(("embed", "a", "hidden", "b", "head"),
                                              _tied_model())))      # (the tie named as such)
        early = torch.optim.SGD(model.parameters(), lr=LR)
        drift = engine.distribute(model, mesh.grid(world, pp=1), schedule="zb-v",
                                  microbatches=2, balance=[2, 3], verbose=False,
                                  loss_fn=_ids_loss, tag_base=2 << 20)
        drift.step(*ids)
        early.step()
        with pytest.raises(ValueError, match=r"pp rank 0: tied parameter 'embed.weight' .*pp "
                           r"rank 0 holds copies that differ.*job.parameters\(\)"):
            drift.step(*ids)
    _optim_close(got, wants[0], rtol=1e-10, atol=1e-13)
    _optim_close(got_tied, wants[1], rtol=1e-10, atol=1e-13)
    for a, b in zip(mine, again, strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa["param_groups"] == sb["param_groups"]
        assert sa["state"].keys() == sb["state"].keys()
        for i, own in sa["state"].items():
            for k, v in own.items():
                assert torch.equal(v, sb["state"][i][k]), (i, k)


def test_torch_model_must_be_a_sequence_of_layers():
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else x          # control flow on a value

    with pytest.raises(TypeError, match=r"torch.fx cannot trace Net.forward .*, at "
                       r"test_engine_distribute.py:\d+: return self.a\(x\) if x.sum\(\) > 0 "
                       r"else x.*nn.Sequential"):
        engine.distribute(Net(), None, loss_fn=torch.nn.functional.mse_loss)
    with pytest.raises(TypeError, match=r"Linear.forward takes no target.*loss_fn="):
        engine.distribute(torch.nn.Linear(2, 2), None)


def _load_worker(world, tp):
    grid = mesh.grid(world, pp=2, tp=tp) if tp > 1 else mesh.grid(world, pp=2)
    widths = TP_WIDTHS if tp > 1 else WIDTHS
    job = engine.distribute(_numpy_model(widths), grid, plan=TP_PLAN if tp > 1 else None,
                            schedule="1f1b", microbatches=2, balance="uniform",
                            loss_fn=mse_loss, verbose=False, timeout=60)
    said = {}
    if tp == 1 and world.rank == 1:     # pp rank 1 alone: it sent its stage's state unasked
        try:                            # and returned None; rank 0's next call took it for
            job.state_dict(timeout=0.2)     # its own, these weights, not the ones loaded
        except mesh.MeshError as e:
            said["alone1"] = str(e)
    collectives.barrier(world)      # (rank 0 not called yet: then it would pair with it)
    other = Sequential(*mlp_stages(widths, 1, SEED + 1)[0].layers)   # other weights, whole
    state = {f"{i}.{j}": p for i, layer in enumerate(other.layers)
             for j, p in enumerate(layer.params())}
    job.load_state_dict(state)               # with tp, each rank its shards
    last = f"{len(other.layers) - 1}.1"
    moved = {k: v + 1 for k, v in state.items()}      # (a half-load would show)
    for what, bad in [("missing", {k: v for k, v in moved.items() if k != last}),
                      ("shape", {**moved, "0.1": state["0.1"][:1]})]:   # a (1,) bias
        try:
            job.load_state_dict(bad)
            said[what] = ""
        except (KeyError, ValueError) as e:
            said[what] = f"{type(e).__name__}: {e}"
    # as torch's: strict=False loads what is given, leaves the rest, and names both
    said["partial"] = job.load_state_dict({**{k: v for k, v in state.items() if k != last},
                                           "extra.0": state["0.0"]}, strict=False)
    def alone():        # the others do not call it: rank 0 is told so, in the job's timeout
        if world.rank == 0:
            try:
                job.state_dict(timeout=0.2)
            except mesh.MeshError as e:
                said["alone"] = str(e)
    if tp == 1:
        alone()
    collectives.barrier(world)      # (rank 1's state went to rank 0's wait, ended it)
    got = job.state_dict()
    same = None if got is None else all(np.array_equal(got[k], v) for k, v in state.items())
    named = job.named_parameters()      # state_dict()'s names, each rank its own shards
    if tp == 1:     # two lone calls in a row (rank 1, then rank 0), then rank 1 alone again:
        x, y = _data(0)    # it returned None, having taken rank 0's answer to its first word
        job.step(x, y)      # (rank 0 took it for its own call's), and sent its state unasked:
        for who in (1, 0, None, 1, None):    # the checkpoint after held stage 1 as it was then
            if who is None:
                for p in job.parameters():
                    p += 1
                job.step(x, y)
            elif world.rank == who:
                try:
                    said[f"lone{len(said)}"] = job.state_dict(timeout=0.2)
                except mesh.MeshError as e:
                    said[f"lone{len(said)}"] = str(e)
            collectives.barrier(world)
        whole = job.state_dict()
        said["now"] = {n: np.array(p) for n, p in job.named_parameters()}
        said["ckpt"] = None if whole is None else {k: np.array(v) for k, v in whole.items()}
    if tp > 1:      # its timed-out gather took a tp collective number its peers had not:
        alone()     # their next step failed, meeting it (that step made meanwhile here)
        x, y = _data(0, TP_WIDTHS)      # or its abort; now it makes none: the steps run
        said["losses"] = [job.step(x, y)]
        if world.rank == 3:     # a rank other than 0 alone: it times out waiting too
            try:
                job.state_dict(timeout=0.2)
            except mesh.MeshError as e:
                said["alone3"] = str(e)
        said["losses"].append(job.step(x, y))
        after = job.state_dict()        # and every rank's call, with the lone words unread
        said["after"] = after is None or all(np.array_equal(after[k], v)
                                             for k, v in state.items())
    return {"same": same, "named": [(n, p.shape) for n, p in named], "tp": tp > 1,
            "in_order": [id(p) for _, p in named] == [id(p) for p in job.parameters()],
            "whole": {k: v.shape for k, v in state.items()},
            **said, "first": job.pipeline.first, "rank": world.rank, "last_key": last,
            "bias": state["0.1"].shape}


@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "pp2xtp2"])
def test_load_state_dict_puts_a_whole_models_state_into_each_ranks_stages(tp):
    """A key missing raised on its stage's ranks only, the others loaded;
    a (1,) bias was broadcast into the whole bias, with nothing said (or,
    sharded, a numpy error), then raised on its stage's ranks only, the
    others loading theirs. Both now raise on every rank, naming the key,
    before anything is loaded (same: the state loaded before is still
    there). strict=False returns what torch's does; state_dict() called
    on rank 0 alone says every rank must call it."""
    out = mesh.spawn(_load_worker, 2 * tp, tp, timeout=120)
    assert out[0]["same"] is True and all(o["same"] is None for o in out[1:])
    cut = 0
    for o in out:       # named_parameters(): every key over the ranks, shards halved once
        assert o["in_order"] and {n for n, _ in o["named"]} <= set(o["whole"]), o["named"]
        for n, shape in o["named"]:
            want = o["whole"][n]
            cut += shape != want
            assert shape == want or tp > 1 and _halved(shape, want), (n, shape, want)
    assert {n for o in out for n, _ in o["named"]} == set(out[0]["whole"])
    assert (cut > 0) == (tp > 1)
    for o in out:
        assert o["missing"] == (f"KeyError: 'rank {o['rank']}: load_state_dict: "
                                f"{o['last_key']} of the model not in the state given "
                                f"(strict=False leaves it as it is)'"), o
        assert o["shape"] == (f"ValueError: rank {o['rank']}: load_state_dict: 0.1 is (1,) in "
                              f"the state given, but {o['bias']} in the model"), o
        assert o["partial"] == ([o["last_key"]], ["extra.0"]), o["partial"]
        assert o["partial"].missing_keys == [o["last_key"]], o["partial"]
    assert out[0]["alone"].startswith(
        "rank 0: job.state_dict() gathers every stage on rank 0, so every rank must call it"), \
        out[0]["alone"]
    assert "timed out after 0.2s" in out[0]["alone"], out[0]["alone"]
    if tp == 1:
        assert out[1]["alone1"].startswith("rank 1: job.state_dict() gathers every stage on "
                                           "rank 0, so every rank must call it"), out[1]
        for o in out:       # each lone call raised (rank 1's second returned None, no error)
            lone = [v for k, v in o.items() if k.startswith("lone")]
            assert len(lone) == 1 + o["rank"] and all(
                isinstance(v, str) and "every rank must call it" in v for v in lone), lone
        fresh = {**out[0]["now"], **out[1]["now"]}     # the checkpoint: the weights now
        assert fresh.keys() <= out[0]["ckpt"].keys()
        stale = [k for k, v in fresh.items() if not np.array_equal(out[0]["ckpt"][k], v)]
        assert not stale, stale
    if tp > 1:      # the steps after each lone call: the same loss (gradients only added)
        last = [o["losses"] for o in out]       # (the step's loss, on every rank)
        assert all(a == b == last[0][0] for a, b in last), last
        assert all(o["after"] for o in out)
        for o, who in ((out[0], "alone"), (out[3], "alone3")):
            assert o[who].startswith(f"rank {o['rank']}: job.state_dict() gathers every stage "
                                     "on rank 0, so every rank must call it"), o[who]
            assert "it made no tp collective, so the job's next step runs" in o[who], o[who]
    model = _numpy_model(WIDTHS)
    state = {f"{i}.{j}": p.copy() for i, layer in enumerate(model.layers)
             for j, p in enumerate(layer.params())}
    with pytest.raises(ValueError, match=re.escape(
            f"load_state: 0.1 is (1,) in the state given, but {state['0.1'].shape} in the "
            "model")):
        engine.load_state(model, {**state, "0.1": state["0.1"][:1]})


def _word_after_a_lone_one(world):
    """Rank 1 calls the handshake of job.state_dict() alone (it times out
    and withdraws its word), then both call it; rank 0 does not see the
    withdrawal yet (still on its way: iprobe finds nothing)."""
    from engine.agree import _all_called
    if world.rank == 1:
        with contextlib.suppress(mesh.MeshTimeoutError):
            _all_called(world, 0.2)
    collectives.barrier(world)
    if world.rank == 0:
        world.iprobe = lambda *args, **kwargs: None
    try:
        _all_called(world, 10)
        said = "passed"
    except mesh.MeshError as e:
        said = f"{type(e).__name__}: {e}"
    vars(world).pop("iprobe", None)
    return said


def test_a_lone_callers_word_withdrawn_late_is_not_taken_for_its_next_call():
    """Rank 0 took rank 1's withdrawn word (the withdrawal not come yet) for
    their joint call's and answered that: rank 1, waiting for the answer to
    its new word, timed out (a checkpoint after a lone call, under load)."""
    assert mesh.spawn(_word_after_a_lone_one, 2, timeout=60) == ["passed", "passed"]


def _differing_worker(world):
    """dp=2 x pp=2, each case a model some ranks build otherwise: every rank
    raises the same error before anything is measured; replicas over dp
    that differ from each other (each equal within) are no error."""
    grid = mesh.grid(world, dp=2, pp=2)
    me, d = world.rank, grid.coord("dp")
    sample = _half(_data(0)[0], d)
    cases = {
        "depth": Sequential(*mlp_stages(WIDTHS + ([3] if me == 3 else []), 1, SEED)[0].layers),
        "width": Sequential(*mlp_stages(WIDTHS if me != 2 else [5, 8, 6, 9, 4, 3], 1,
                                        SEED)[0].layers),
        "values": Sequential(*mlp_stages(WIDTHS, 1, SEED + (me == 1))[0].layers),
    }
    got = {}
    for case, model in cases.items():
        try:
            engine.distribute(model, grid, loss_fn=mse_loss, sample=sample, schedule="1f1b",
                              microbatches=2, timeout=30, reps=1, verbose=False)
            got[case] = "no error"
        except ValueError as e:
            got[case] = str(e)
    # each replica equal within, the two apart: replica 0's weights everywhere
    model = Sequential(*mlp_stages(WIDTHS, 1, SEED + d)[0].layers)
    job = engine.distribute(model, grid, loss_fn=mse_loss, schedule="1f1b", microbatches=2,
                            balance="uniform", timeout=30, verbose=False)
    want = mlp_stages(WIDTHS, 1, SEED)[0].layers
    first = job.first[job.schedule.stages_of(grid.coord("pp"))[0]]
    got["replicas"] = all(np.array_equal(a, b) for a, b in zip(
        job.parameters(), [p for layer in want[first:first + sum(
            job.counts[s] for s in job.schedule.stages_of(grid.coord("pp")))]
                           for p in layer.params()], strict=True))
    return got


def test_a_model_that_differs_across_ranks_is_refused_on_every_rank():
    results = mesh.spawn(_differing_worker, 4, timeout=120, env=PATIENT)
    for rank, got in enumerate(results):
        head = f"rank {rank}: engine.distribute: the model differs across ranks: "
        assert got["depth"] == (head + "ranks [0, 1, 2] built 9 layers, ranks [3] built 11 "
                                "layers; build the same model on every rank"), got["depth"]
        assert got["width"].startswith(head + "layer 4 ('4') is Linear((6, 7) float64, (7,) "
                                       "float64) on ranks [0, 1, 3]; Linear((6, 9) float64, "
                                       "(9,) float64) on ranks [2]"), got["width"]
        assert got["values"].startswith(head + "layer 0 ('0') holds different values on ranks "
                                        "[0] and [1] of dp replica 0"), got["values"]
        assert got["replicas"] is True


def _seeded_worker(world):
    """A model with dropout, measured and re-timed (its forwards drawing as
    often as the clock says): the random streams come back as they were."""
    import random

    import torch
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    model = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(8, 8),
                                                                   torch.nn.Dropout(0.5))])
    sample = torch.randn(16, 8)
    np.random.seed(SEED)
    random.seed(SEED)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    job = engine.distribute(model, mesh.grid(world, pp=2), sample=sample,
                            loss_fn=torch.nn.functional.mse_loss, timeout=30, reps=1,
                            verbose=False)
    after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    return (bool(torch.equal(before[0], after[0])) and np.array_equal(before[1], after[1])
            and before[2] == after[2] and job.predicted is not None)


def test_measuring_leaves_the_random_streams_as_they_were():
    pytest.importorskip("torch")
    assert mesh.spawn(_seeded_worker, 2, timeout=120, env=PATIENT) == [True, True]


def _batchnorm_worker(world):
    """A model with BatchNorms, measured (its forwards run in training mode
    as often as the clock says) and stepped once on one micro-batch: its
    running statistics and counts are one process's after one step."""
    import torch
    torch.set_num_threads(1)

    def build():
        torch.manual_seed(SEED)
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8),
                                   torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8),
                                   torch.nn.Linear(8, 2))
    gen = torch.Generator().manual_seed(SEED)
    x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 2, generator=gen)
    job = engine.distribute(build(), mesh.grid(world, pp=2), schedule="gpipe", microbatches=1,
                            sample=x, loss_fn=torch.nn.functional.mse_loss, timeout=30,
                            reps=1, verbose=False)
    first = job.state_dict()            # (collective: the whole model on rank 0)
    first = {k: v.clone() for k, v in first.items()} if first is not None else None
    job.step(x, y)
    after = job.state_dict()
    ref = build()
    torch.nn.functional.mse_loss(ref(x), y).backward()
    replicas = _batchnorm_replicas(world)      # (the next test's, on the same ranks)
    if world.rank != 0:
        return True, replicas
    before = {k: v.tolist() for k, v in first.items() if "running" in k or "num" in k}
    fresh = {k: v.tolist() for k, v in build().state_dict().items() if k in before}
    return before == fresh and all(torch.allclose(after[k].float(), v.float(), atol=1e-6)
                                   for k, v in ref.state_dict().items()), replicas


@pytest.fixture(scope="module")
def batchnorm_runs():
    pytest.importorskip("torch")
    return mesh.spawn(_batchnorm_worker, 2, timeout=120, env=PATIENT)


@pytest.mark.timeout(130)
def test_measuring_leaves_batchnorm_statistics_as_they_were(batchnorm_runs):
    """The profile's forwards updated every BatchNorm's statistics and
    count: 50-100 batches counted before the first step."""
    assert [ok for ok, _ in batchnorm_runs] == [True, True]


def _batchnorm_build():
    import torch
    torch.manual_seed(SEED)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8),
                               torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8),
                               torch.nn.Linear(8, 2)).double()


def _batchnorm_replicas(world):
    """dp=2, each replica stepping on its own half: its BatchNorms'
    statistics, and an evaluation of the whole batch."""
    import torch
    grid = mesh.grid(world, dp=2, pp=1)
    d = grid.coord("dp")
    gen = torch.Generator().manual_seed(SEED)
    x, y = (torch.randn(16, w, generator=gen, dtype=torch.float64) for w in (8, 2))
    job = engine.distribute(_batchnorm_build(), grid, schedule="1f1b", microbatches=2,
                            balance="uniform", verbose=False,
                            loss_fn=torch.nn.functional.mse_loss, timeout=60)
    for step in range(2):
        job.step((x + step)[d::2], y[d::2])
    held = {k: v.clone() for st in job.stages for k, v in st.module.state_dict().items()
            if "running" in k or "num" in k}
    loss = job.eval_step(x[d::2], y[d::2])
    return {"held": held, "eval": loss, "state": job.state_dict()}


@pytest.mark.timeout(130)
def test_replicas_keep_replica_0s_batchnorm_statistics_as_ddp_does(batchnorm_runs):
    """Each replica's steps moved its own statistics: eval_step ran each
    replica's half with its own, and its loss was not that of the state
    job.state_dict() saved (replica 0's), with nothing said. After each
    step every replica takes replica 0's, as DDP's broadcast_buffers."""
    import torch
    results = [replicas for _, replicas in batchnorm_runs]
    assert results[1]["held"].keys() == results[0]["held"].keys() != set()
    for k, v in results[1]["held"].items():
        assert torch.equal(v, results[0]["held"][k]), k
    model = _batchnorm_build()
    model.load_state_dict(results[0]["state"], strict=True)
    gen = torch.Generator().manual_seed(SEED)
    x, y = (torch.randn(16, w, generator=gen, dtype=torch.float64) for w in (8, 2))
    with torch.no_grad():
        want = torch.nn.functional.mse_loss(model.eval()(x), y).item()
    for res in results:
        assert res["eval"] == pytest.approx(want, rel=1e-12)


def _seeded_apart_model():
    import torch
    nn = torch.nn

    class RandomFeatures(nn.Module):    # a fixed random projection: a buffer
        def __init__(self):
            super().__init__()
            self.register_buffer("proj", torch.randn(4, 8))

        def forward(self, x):
            return torch.cos(x @ self.proj)
    frozen = nn.Linear(8, 8)
    frozen.requires_grad_(False)
    return nn.Sequential(RandomFeatures(), frozen, nn.Tanh(), nn.Linear(8, 2))


def _seeded_apart_data():
    import torch
    gen = torch.Generator().manual_seed(SEED)
    return torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)


def _seeded_apart_worker(world):
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(world.rank)         # each rank its own seed (for its data), then the model
    grid = mesh.grid(world, dp=2, pp=1)
    job = engine.distribute(_seeded_apart_model(), grid, schedule="1f1b", microbatches=1,
                            balance="uniform", loss_fn=torch.nn.functional.mse_loss,
                            timeout=30, verbose=False)
    opt = torch.optim.SGD(job.parameters(), lr=LR)
    x, y = (a[4 * grid.coord("dp"):4 * grid.coord("dp") + 4] for a in _seeded_apart_data())
    losses = []
    for _ in range(2):
        opt.zero_grad()
        losses.append(job.step(x, y))
        opt.step()
    return losses, job.state_dict()


@pytest.mark.timeout(120)
def test_replicas_start_from_replica_0s_frozen_weights_and_buffers_too():
    """Ranks seeded apart before building the model: distribute gave each
    dp replica replica 0's trainable weights only, so a frozen Linear and a
    random buffer stayed each replica's own (losses 0.909 and 0.875 where
    one process has 1.038 and 0.999, with nothing said)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)                  # replica 0's model, in one process
    model = _seeded_apart_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _seeded_apart_data()
    want = []
    for _ in range(2):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        want.append(loss.item())
    out = mesh.spawn(_seeded_apart_worker, 2, timeout=120, env=PATIENT)
    for losses, _ in out:
        assert np.allclose(losses, want, rtol=1e-6), (losses, want)
    state = out[0][1]
    for k, v in model.state_dict().items():
        assert torch.allclose(state[k], v, atol=1e-6), k


def _compiled_worker(world):
    """Blocks compiled in their places (torch.compile(block), aot_eager: no
    C++ to build) in a zero-bubble pipeline of 1-row micro-batches: the
    split backward's second pass through a compiled graph read reused
    buffers (wrong weight gradients) or was refused (donated buffers)."""
    import torch
    torch.set_num_threads(1)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.n = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), \
                torch.nn.LayerNorm(8)

        def forward(self, x):
            return x + self.b(torch.nn.functional.gelu(self.a(self.n(x))))

    def build(compiled):
        torch.manual_seed(SEED)
        blocks = [Block() for _ in range(4)]
        if compiled:
            blocks = [torch.compile(b, backend="aot_eager") for b in blocks]
        return torch.nn.Sequential(*blocks, torch.nn.Linear(8, 2))
    gen = torch.Generator().manual_seed(SEED)
    x, y = torch.randn(8, 8, generator=gen), torch.randn(8, 2, generator=gen)
    with pytest.raises(TypeError, match=r"torch.compile\(model\) gives an OptimizedModule"):
        engine.distribute(torch.compile(build(False), backend="aot_eager"),
                          mesh.grid(world, pp=2), sample=x, verbose=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        job = engine.distribute(build(True), mesh.grid(world, pp=2), schedule="zb-h1",
                                microbatches=8, balance="uniform", sample=x, reps=1,
                                loss_fn=torch.nn.functional.mse_loss, timeout=60)
    # a schedule picked by name prints its cut and its prediction too (it printed nothing)
    printed = out.getvalue()
    assert printed == "" if world.rank else (
        printed.startswith("engine.distribute: {'pp': 2}, 5 layers; the schedule given:\n"
                           f"{job.table()}\npred ms: the simulated step")
        and "zero_bubble_h1(2,8) cuts the model into 2 stages of 5 layers\n" in printed
        and "chosen: the fastest" not in printed
        and f"re-timed as its steps will run: {job.predicted * 1e3:.2f} ms" in printed
        # right under the table, with the row's own (profiled) figure and what moved it
        and f"pred ms: the simulated step (every micro-batch, all ranks); bubble: the ranks' " \
            f"idle share of it; peak MB: the most activations one rank holds\n" \
            f"engine.distribute: {choose.retimed_said(job.profiled, job.chosen)}\n" \
            f"engine.distribute: zero_bubble_h1(2,8) cuts" in printed), printed
    assert job.table().splitlines()[1].startswith("zero_bubble_h1(2,8)"), job.table()
    opt = torch.optim.SGD(job.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        job.step(x, y)
        opt.step()
    got = job.state_dict()
    # the last step's trace holds distribute's prediction: engine.show sets the step
    # beside it (the pipeline's trace held none: a job's prediction was never compared)
    with tempfile.TemporaryDirectory() as tmp:
        path = job.write_trace(os.path.join(tmp, "job.trace.json"))
        said = "" if path is None else summarize_trace(json.load(open(path)))
    if world.rank != 0:
        return 0.0
    assert (f"engine.distribute's re-time of zero_bubble_h1(2,8) (job.predicted) predicted "
            f"{job.predicted * 1e3:.3f} ms; measured/predicted") in said, said
    ref = build(False)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(3):
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
    mine = {k.replace("_orig_mod.", ""): v for k, v in got.items()}
    return max((mine[k] - v).abs().max().item() for k, v in ref.state_dict().items())


def test_compiled_blocks_in_a_zero_bubble_pipeline_train_as_one_process():
    pytest.importorskip("torch")
    assert max(mesh.spawn(_compiled_worker, 2, timeout=200, env=PATIENT)) < 1e-6


def _unequal_worker(world):
    """dp replicas given samples and batches of unequal rows (10 and 6):
    every rank profiles the fewest, chooses alike, and the step weighs the
    replicas by their rows. A sample given on some ranks only is refused on
    every rank."""
    grid = mesh.grid(world, dp=2, pp=2)
    d = grid.coord("dp")
    x, y = (a[:10] if d == 0 else a[10:16] for a in _data(0))
    errors = []
    try:
        engine.distribute(_numpy_model(), grid, schedule="1f1b", microbatches=2,
                          balance="uniform", sample=x if d == 0 else None, loss_fn=mse_loss,
                          verbose=False, overhead=0.0, timeout=30)
    except ValueError as e:
        errors.append(str(e))
    try:        # a tuple sample whose parts disagree, on one rank: every rank raises at once
        engine.distribute(_numpy_model(), grid, schedule="1f1b", microbatches=2,
                          balance="uniform", sample=(x, x[:3]) if world.rank == 3 else x,
                          loss_fn=mse_loss, verbose=False, overhead=0.0, timeout=30)
    except ValueError as e:
        errors.append(str(e))
    job = engine.distribute(_numpy_model(), grid, schedule="1f1b", microbatches=4,
                            balance="time", sample=x, loss_fn=mse_loss, verbose=False,
                            overhead=0.0, reps=1, timeout=30)
    job.step(x, y)
    return {"errors": errors, "counts": job.counts, "schedule": job.schedule.name,
            "grads": [g.copy() for g in job.grads()],
            "layers": [job.first[s] for s in job.schedule.stages_of(grid.coord("pp"))]}


def test_replicas_samples_of_unequal_rows_profile_alike():
    results = mesh.spawn(_unequal_worker, 4, timeout=120, env=PATIENT)
    for r, res in enumerate(results):
        assert len(res["errors"]) == 2 and "ranks [0, 1] were given sample=" in \
            res["errors"][0] and "ranks [2, 3] were not" in res["errors"][0], (r, res["errors"])
        assert "rank 3's sample: the parts of a tuple batch have [3, 6] rows" in \
            res["errors"][1], (r, res["errors"])
    assert len({(res["counts"], res["schedule"]) for res in results}) == 1, results
    model = _numpy_model()
    x, y = (a[:16] for a in _data(0))
    out, ctx = model.forward(x)
    model.backward(ctx, mse_loss(out, y)[1])
    counts = results[0]["counts"]
    for r, res in enumerate(results):
        (first,) = res["layers"]
        want = [g for layer in model.layers[first:first + counts[r % 2]] for g in layer.grads()]
        assert len(res["grads"]) == len(want)
        for a, b in zip(res["grads"], want):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13, err_msg=f"rank {r}")


def _shared_models():
    import torch
    from torch import nn

    class Albert(nn.Module):
        """One block called by every layer (ALBERT's), traced by engine.sequential."""

        def __init__(self):
            super().__init__()
            block = nn.Linear(4, 4)
            self.inp, self.layers, self.head = nn.Linear(4, 4), nn.ModuleList([block] * 3), \
                nn.Linear(4, 2)

        def forward(self, x):
            x = self.inp(x)
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return self.head(x)

    def seq():
        block = nn.Linear(4, 4)
        return nn.Sequential(nn.Linear(4, 4), block, nn.Tanh(), block, nn.Tanh(), nn.Linear(4, 2))
    return {"sequential": (seq, False), "traced": (Albert, False),
            "recomputed": (seq, ["1"])}     # (the block wrapped before the cut: its copy's own)


def _shared_worker(world):
    """A module held in several places, trained at pp=2 and gathered: each
    model's state_dict() keys, values of one process's training."""
    import torch
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(SEED)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
    out = {}
    for i, (kind, (make, recompute)) in enumerate(_shared_models().items()):
        torch.manual_seed(SEED)
        job = engine.distribute(make(), mesh.grid(world, pp=2), schedule="1f1b", microbatches=2,
                                balance="uniform", loss_fn=torch.nn.functional.mse_loss,
                                timeout=30, verbose=False, tag_base=i << 20,
                                recompute=recompute)
        opt = torch.optim.SGD(job.parameters(), lr=0.1)
        # parameters() with the names state_dict() gives them (a traced piece's own)
        named = job.named_parameters()
        assert len(named) == len(job.parameters()) and all(
            a is b for (_, a), b in zip(named, job.parameters())), kind
        assert named and {n for n, _ in named} <= set(make().state_dict()), (kind, named)
        for _ in range(2):
            opt.zero_grad()
            job.step(x, y)
            opt.step()
        got = job.state_dict()          # (the live tensors on rank 0, as torch's)
        got = got and {k: v.clone() for k, v in got.items()}
        # a state whose names of the shared module hold other values (an untied
        # checkpoint): every copy takes what torch's load leaves, the last name's
        other = {k: v + i for i, (k, v) in enumerate(make().state_dict().items())}
        try:
            job.load_state_dict({**other, "extra.weight": torch.zeros(1)})
            extra = "no error"
        except KeyError as e:
            extra = str(e)
        job.load_state_dict({**other, "extra.weight": torch.zeros(1)}, strict=False)
        loaded = job.state_dict()
        loaded = loaded and {k: v.clone() for k, v in loaded.items()}
        # a checkpoint naming the shared module once (Hugging Face's keep a tied weight
        # under one name) loads, each copy taking that name's value; a key truly missing
        # (the head's, on rank 1's stage) raises on every rank (rank 0 loaded its stage and
        # went on, to wait in its next step for rank 1, which had raised)
        seen: set = set()
        once = {k: other[k] for k, v in make().state_dict(keep_vars=True).items()
                if not (id(v) in seen or seen.add(id(v)))}
        job.load_state_dict(once)
        named_once = job.state_dict()
        named_once = named_once and {k: v.clone() for k, v in named_once.items()}
        last = list(other)[-1]
        try:
            job.load_state_dict({k: v for k, v in other.items() if k != last})
            missing = "no error"
        except KeyError as e:
            missing = str(e)
        assert f"rank {world.rank}: load_state_dict: {last} of the model not in the state " \
            f"given" in missing, missing
        # the head's weight misshapen (rank 1's stage): rank 1 raised torch's RuntimeError
        # (its bias loaded), rank 0 loaded its stage; now both raise, nothing loaded
        head, held = list(other)[-2], [p.detach().clone() for p in job.parameters()]
        try:
            job.load_state_dict({**other, head: other[head][:1]})
            shape = "no error"
        except ValueError as e:
            shape = str(e)
        assert shape == (f"rank {world.rank}: load_state_dict: {head} is "
                         f"{tuple(other[head][:1].shape)} in the state given, but "
                         f"{tuple(other[head].shape)} in the model"), shape
        assert all(torch.equal(a, b) for a, b in zip(held, job.parameters(), strict=True))
        assert job.load_state_dict({k: v for k, v in other.items() if k != last},
                                   strict=False) == ([last], []), kind
        assert torch.equal(dict(job.named_parameters()).get(last, held[-1]), held[-1]), kind
        if world.rank:
            assert f"rank {world.rank}: load_state_dict: extra.weight not in" in extra, extra
            continue
        assert "rank 0: load_state_dict: extra.weight not in the model" in extra, extra
        one = make()
        one.load_state_dict(other)
        out[f"{kind} loaded"] = max((loaded[k] - v).abs().max().item()
                                    for k, v in one.state_dict().items())
        one.load_state_dict(once, strict=False)
        out[f"{kind} named once"] = max((named_once[k] - v).abs().max().item()
                                        for k, v in one.state_dict().items())
        torch.manual_seed(SEED)
        ref = make()
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        for _ in range(2):
            ref_opt.zero_grad()
            torch.nn.functional.mse_loss(ref(x), y).backward()
            ref_opt.step()
        fresh = make()
        try:
            fresh.load_state_dict(got, strict=True)
        except RuntimeError as e:
            out[kind] = str(e)
            continue
        out[kind] = max((fresh.state_dict()[k] - v).abs().max().item()
                        for k, v in ref.state_dict().items())
    return out


@pytest.mark.timeout(120)
def test_a_shared_module_trains_and_saves_under_every_name_the_model_gives_it():
    """distribute named an nn.Sequential's layers by named_children(), which
    names a module held twice once: the layer's second call was left out of
    the pipeline (another model trained) and of state_dict(); a traced
    model's pieces name a shared block once, so the gathered state_dict
    missed its other names. Both now load strictly into the model class,
    with one process's values. A state whose names of the shared module
    differ loads as torch's load does (each copy took its own name's
    values, another model than one process's), and a key the model lacks
    raises on every rank (it was ignored). A state naming the shared module
    once loads as torch's does with strict=False (it raised on its later
    names' stages only), and a key missing raises on every rank."""
    pytest.importorskip("torch")
    got = mesh.spawn(_shared_worker, 2, timeout=100, env=PATIENT)[0]
    kinds = {"sequential", "traced", "recomputed"}
    assert set(got) == kinds | {f"{k} {w}" for k in kinds for w in ("loaded", "named once")}, got
    for kind, err in got.items():
        assert isinstance(err, float) and err < 1e-6, (kind, err)


def _yours_model():
    import torch
    torch.manual_seed(SEED)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3)).double()


def _yours_data(step):
    import torch
    gen = torch.Generator().manual_seed(SEED + step)
    return torch.randn(12, 5, generator=gen).double(), torch.randn(12, 3, generator=gen).double()


def _one_row_worker(world):
    """A model with a BatchNorm, 8 rows at pp=2: schedule='auto' tries 8
    micro-batches of one row, which BatchNorm refuses in training. Then a
    schedule of your own among the candidates (``DEEP``), chosen under a
    memory limit that gpipe's row is over, trains three SGD steps; a list
    that differs across ranks, and a broken schedule in it, are refused on
    every rank."""
    import torch
    torch.set_num_threads(1)
    mse = torch.nn.functional.mse_loss
    x, y = _yours_data(0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        mine = engine.distribute(_yours_model(), mesh.grid(world, pp=2), sample=x,
                                 schedule=["gpipe", DEEP, "zb-v", "interleaved"],
                                 microbatches=3, balance="uniform", memory_limit=2000, reps=1,
                                 loss_fn=mse, timeout=30, tag_base=3 << 20)
    opt = torch.optim.SGD(mine.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        x, y = _yours_data(step)
        opt.zero_grad()
        losses.append(mine.step(x, y))
        opt.step()
    state = mine.state_dict()
    yours = {"schedule": mine.schedule.name, "losses": losses, "table": mine.table(),
             "printed": out.getvalue(), "counts": list(mine.counts),
             "state": None if state is None else {k: v.numpy().copy() for k, v in state.items()}}
    broken = engine.Schedule.build([["0F0", "0F1", "0B0", "0B1"], ["1B0", "1F0", "1F1", "1B1"]],
                                   num_microbatches=2, stage_ranks=[0, 1], name="mine")
    other = engine.schedules.one_f_one_b(2, 4)

    def odd(p, m):      # a family of rank-dependent code: it raises on rank 1 at m=4 only
        if world.rank == 1 and m == 4:
            raise RuntimeError("rank 1's own")
        return engine.schedules.one_f_one_b(p, m)
    own = DEEP if world.rank == 0 else DEEP.replace(      # broken on rank 1 only
        [DEEP.ranks[0], [DEEP.ranks[1][1], DEEP.ranks[1][0], *DEEP.ranks[1][2:]]])
    for case, given in (("apart", ["1f1b", DEEP if world.rank == 0 else other.replace(
                            other.ranks, name="deep")]), ("broken", ["1f1b", broken]),
                        ("none", ["zb-v", "interleaved"]), ("odd", ["1f1b", odd]),
                        ("own", own), ("own apart", DEEP if world.rank == 0 else other.replace(
                            other.ranks, name="deep"))):
        try:
            engine.distribute(_yours_model(), mesh.grid(world, pp=2), sample=x, schedule=given,
                              loss_fn=mse, timeout=30, reps=1, verbose=False, tag_base=4 << 20)
            yours[case] = "no error"
        except ValueError as e:
            yours[case] = str(e)
    try:        # recompute in runs of another length on rank 1: it went on unnoticed
        engine.distribute(_yours_model(), mesh.grid(world, pp=2), sample=x, schedule="1f1b",
                          recompute=True, layered=2 if world.rank else True, loss_fn=mse,
                          timeout=30, reps=1, verbose=False, tag_base=4 << 20)
        yours["knobs"] = "no error"
    except ValueError as e:
        yours["knobs"] = str(e)
    fam = engine.distribute(_yours_model(), mesh.grid(world, pp=2), sample=x, balance="uniform",
                            schedule=[deeper, backwards_first], microbatches=4, reps=1,
                            overhead=0.0, loss_fn=mse, timeout=30, verbose=False,
                            tag_base=5 << 20)
    opt = torch.optim.SGD(fam.parameters(), lr=LR)
    yours["family"] = {"schedule": fam.schedule.name, "table": fam.table(), "losses": []}
    for step in range(STEPS):
        x, y = _yours_data(step)
        opt.zero_grad()
        yours["family"]["losses"].append(fam.step(x, y))
        opt.step()
    state = fam.state_dict()
    yours["family"]["state"] = None if state is None else {
        k: v.numpy().copy() for k, v in state.items()}

    def build():
        torch.manual_seed(SEED)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                   torch.nn.Tanh(), torch.nn.Linear(8, 2))
    gen = torch.Generator().manual_seed(SEED)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
    job = engine.distribute(build(), mesh.grid(world, pp=2), sample=x, overhead=0.0, reps=1,
                            loss_fn=torch.nn.functional.mse_loss, timeout=30, verbose=False)
    loss = job.step(x, y)
    try:
        engine.distribute(build(), mesh.grid(world, pp=2), schedule="1f1b", microbatches=8,
                          sample=x, overhead=0.0, reps=1, loss_fn=torch.nn.functional.mse_loss,
                          timeout=30, verbose=False, tag_base=1 << 20)
        error = "no error"
    except ValueError as e:
        error = str(e)
    import warnings
    with warnings.catch_warnings(record=True) as caught:      # a stage of no parameters
        warnings.simplefilter("always")
        bare = engine.distribute(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)),
                                 mesh.grid(world, pp=2), schedule="1f1b", microbatches=2,
                                 balance=[1, 1], sample=x, overhead=0.0, reps=1,
                                 loss_fn=torch.nn.functional.mse_loss, timeout=30,
                                 verbose=False, tag_base=2 << 20)
    try:
        torch.optim.SGD(bare.parameters(), lr=0.1)
        empty = "no error"
    except ValueError as e:
        empty = str(e)
    return {"m": job.schedule.num_microbatches, "table": job.table(), "error": error,
            "loss": loss, "last": job.pipeline.last, "empty": empty, "yours": yours,
            "warned": [str(w.message) for w in caught if "no parameters" in str(w.message)]}


def _yours_trained_alike(results: list[dict]) -> None:
    """Your own schedule, chosen: its row, the rows that cannot run, and
    training one process's (torch's own SGD on the whole batch)."""
    import torch
    model = _yours_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        x, y = _yours_data(step)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for r, got in enumerate(res["yours"] for res in results):
        assert got["schedule"] == "deep" and got["counts"] == [1, 2], got
        rows = {line.split()[0]: line for line in got["table"].splitlines()[1:]}
        assert rows["deep"].split()[1] == "4" and rows["deep"].endswith("<- chosen"), rows
        assert "  over the memory limit: " in rows["gpipe(2,3)"] and \
            rows["gpipe(2,3)"].endswith(" > 1.95 KiB"), rows
        assert rows["interleaved(2,3)"].endswith("cannot run: interleaved 1F1B needs m % p == 0, "
                                                 "got m=3, p=2"), rows
        assert rows["zb_v(2,3)"].endswith("cannot run: needs 4 stages, the model has 3 "
                                          "layers"), rows
        assert (got["table"] in got["printed"]) == (r == 0), got["printed"]
        if r == 0:
            assert "engine.distribute: deep cuts the model into 2 stages" in got["printed"]
        np.testing.assert_allclose(got["losses"], losses, rtol=1e-10)
        assert got["apart"].startswith(
            f"rank {r}: engine.distribute: the schedule candidates differ across ranks: ranks "
            f"[0] passed ['1f1b', Schedule 'deep' #"), got["apart"]
        assert "]; ranks [1] passed ['1f1b', Schedule 'deep' #" in got["apart"] and \
            got["apart"].endswith("]; pass the same schedule=[...] on every rank"), got["apart"]
        assert got["knobs"] == f"rank {r}: engine.distribute: layered= differs across ranks: " \
            f"layered=True on ranks [0]; layered=2 on ranks [1]; pass the same on every rank " \
            f"(a collective call)", got["knobs"]
        assert got["broken"].startswith(
            f"rank {r}: engine.distribute: schedule 'mine' is invalid: rank 1 runs 1B0 before "
            f"its forward 1F0"), got["broken"]
        # (the sample's 12 rows: 2, 4 and 8 micro-batches tried)
        none = got["none"].splitlines()
        assert none[0] == f"rank {r}: engine.distribute: no candidate schedule can run:", none
        assert [line.split()[:2] for line in none[2:]] == [
            [name, f"{m}"] for m in (2, 4, 8)
            for name in (f"zb_v(2,{m})", f"interleaved_1f1b(2,{m},2)")] and all(
            line.endswith("cannot run: needs 4 stages, the model has 3 layers")
            for line in none[2:]), none
        # a family of yours, made only at microbatches=4 (a row where it fails verification),
        # chosen, trains as one process
        fam = got["family"]
        assert fam["schedule"] == "deeper(2,4)", fam
        rows = [line.split()[0] for line in fam["table"].splitlines()[1:]
                if not line.startswith("(")]
        assert rows == ["deeper(2,4)", "backwards_first(2,4)"], fam["table"]
        assert fam["table"].splitlines()[2].endswith(
            "cannot run: schedule 'backwards_first(2,4)' is invalid: rank 1 runs 1B0 before "
            "its forward 1F0"), fam["table"]
        np.testing.assert_allclose(fam["losses"], losses, rtol=1e-10)
        # a family, or a Schedule, that rank-dependent code makes otherwise on some rank:
        # the same error on every rank, before anything is timed, naming them and why
        said = "engine.distribute: your schedule "
        fix = "; make your schedules from code that does not depend on the rank"
        assert re.fullmatch(re.escape(f"rank {r}: {said}odd(2,4) is not the same on every "
                                      f"rank: ranks [0] made #") + "[0-9a-f]{8}" + re.escape(
            "; ranks [1] failed: odd(2, 4) raised RuntimeError: rank 1's own" + fix),
            got["odd"]), got["odd"]
        assert re.fullmatch(re.escape(f"rank {r}: {said}'deep' is not the same on every rank: "
                                      f"ranks [0] made #") + "[0-9a-f]{8}" + re.escape(
            "; ranks [1] failed: ScheduleError: schedule 'deep' is invalid: rank 1 runs 1B0 "
            "before its forward 1F0" + fix), got["own"]), got["own"]
        assert re.fullmatch(re.escape(f"rank {r}: {said}'deep' is not the same on every rank: "
                                      f"ranks [0] made #") + "[0-9a-f]{8}; ranks \\[1\\] made #"
                            "[0-9a-f]{8}" + re.escape(fix), got["own apart"]), got["own apart"]
    for trained in (results[0]["yours"]["state"], results[0]["yours"]["family"]["state"]):
        for k, v in model.state_dict().items():
            np.testing.assert_allclose(trained[k], v.numpy(), rtol=1e-10, atol=1e-13, err_msg=k)
    assert results[1]["yours"]["state"] is None and results[1]["yours"]["family"]["state"] is None


@pytest.mark.timeout(160)
def test_auto_skips_the_candidates_whose_layers_fail_and_says_why():
    """... and ranks a schedule of your own beside the built-ins
    (``_yours_trained_alike``)."""
    pytest.importorskip("torch")
    said = "ValueError: Expected more than 1 value per channel when training"
    results = mesh.spawn(_one_row_worker, 2, timeout=140, env=PATIENT)
    _yours_trained_alike(results)
    for r, got in enumerate(results):
        assert got["m"] in (2, 4), got
        assert isinstance(got["loss"], float), got      # (the step's loss, on every rank)
        skipped = [line for line in got["table"].splitlines() if "cannot run" in line]
        assert len(skipped) >= 2 and all(line.split()[1] == "8" for line in skipped), got
        assert all("cannot run: micro-batches of 1 row: rank " in line and said in line
                   for line in skipped), got["table"]
        assert got["error"].startswith(f"rank {r}: engine.distribute: no candidate schedule can "
                                       f"run, its layers fail on micro-batches of every size "
                                       f"tried: 1 row: rank "), got["error"]
        assert said in got["error"], got["error"]
        # a rank whose stages hold no parameters (balance= put a Flatten alone there):
        # torch's optimizer refuses its empty job.parameters(), and distribute said why
        assert (got["empty"] == "optimizer got an empty parameter list") == (r == 0), got
        assert got["warned"] == ([] if r else [
            "engine.distribute: rank 0's stages hold no parameters (stage 0: 0 (Flatten)), so "
            "job.parameters() is empty there, which torch's optimizers refuse ('optimizer got "
            "an empty parameter list'): cut the model elsewhere (balance=[1, 1] now), or make "
            "the optimizer only where job.parameters() holds some"]), got["warned"]


def _loaded_worker(world):
    """A numpy job whose two ranks are made to share one core (``_cores``)
    and whose re-time (and choice) fit others' load of 2.5 pp ranks' worth
    (``fitted_load``, made constant): distribute's table, printed and
    ``job.table()``, is simulated with it."""
    import contextlib
    import importlib
    import io
    importlib.import_module("engine.calibrate")._cores = lambda: 1
    for where in ("engine.job_retime", "engine.measured_choice"):   # (the re-time's, the choice's)
        importlib.import_module(where).fitted_load = lambda *args, **kwargs: 2.5
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        job = engine.distribute(_numpy_model(), mesh.grid(world, pp=2), sample=_data(0)[0],
                                loss_fn=mse_loss, reps=1, timeout=60)
    c = job.profiled
    # steps far over the prediction are told, once, by rank 0 (a step took 5.4x its
    # prediction on a loaded host and nothing said so): here a prediction made tiny
    x, y = _data(0)
    retimed = engine.choose.retimed_said(c, job.chosen)
    # the table's rows: every one as the re-time corrects the chosen row
    calibrated = (job.candidates, job.row) == engine.choose.calibrated(
        job.profiled_candidates, c, job.chosen, 0.0)
    mark, shown = job.row.makespan, job.table()
    predicted = job.predicted
    # a re-time called again re-times the rows too: the chosen one its new prediction
    job.retime()
    again = (job.row.makespan == job.predicted and any(x is job.row for x in job.candidates)
             and job.profiled_candidates[0] is c)
    job.chosen = replace(job.chosen, makespan=1e-7)
    steps = io.StringIO()
    with contextlib.redirect_stdout(steps):
        for _ in range(8):
            job.step(x, y)
    return {"load": job.calibration.load, "cores": job.calibration.cores,
            "told": steps.getvalue(), "watched": job.watched,
            "loads": sorted({x.load for x in job.candidates}),
            "first": job.profiled_candidates[0] is c,
            "among": any(x is c for x in job.profiled_candidates),
            "calibrated": calibrated, "mark": mark, "predicted": predicted, "again": again,
            "row": c.makespan, "sim": c.schedule.simulate(c.costs, c.cores, 2.5).makespan,
            "quiet": c.schedule.simulate(c.costs, c.cores).makespan,
            "schedule": job.schedule.name, "name": c.schedule.name,
            "m": c.schedule.num_microbatches,
            "printed": out.getvalue(), "table": shown,
            "retimed": retimed}


@pytest.mark.timeout(120)
def test_distribute_prints_its_candidates_with_the_retimes_load():
    for r, got in enumerate(mesh.spawn(_loaded_worker, 2, timeout=100, env=PATIENT)):
        assert got["cores"] == 1.0 and got["load"] == 2.5 and got["loads"] == [2.5], got
        assert got["among"] and got["first"] and got["schedule"] == got["name"], got
        assert got["row"] == pytest.approx(got["sim"]) and got["row"] > got["quiet"], got
        # the printed rows are re-timed: the chosen one is job.predicted, the others
        # simulated with what its re-time learned (they read 1.5-2.4x low before)
        assert got["calibrated"] and got["mark"] == got["predicted"] and got["again"], got
        row = next(line for line in got["table"].splitlines() if line.endswith("<- chosen"))
        assert row.split()[:2] == [got["name"], str(got["m"])], row
        assert f"{got['predicted'] * 1e3:>9.2f}" in row, (row, got["predicted"])
        assert "\n(every row re-timed as the chosen schedule's re-time found the steps: " \
            "compute x" in got["table"], got["table"]
        assert got["table"].endswith("on the shared cores: 2.50 pp ranks' worth, fitted to "
                                     "a dry run)"), got["table"]
        assert got["watched"] is None, got
        told = got["told"].splitlines()
        assert told == [] if r else (
            len(told) == 1 and told[0].startswith(f"engine.distribute: {got['name']}'s steps took ")
            and "(rank 0's median of 5, the first left out)" in told[0]
            and "x job.predicted (0.00 ms): the machine may be loaded" in told[0]), told
        if r == 0:
            printed = got["printed"]
            assert got["table"] in printed, printed
            assert printed.index(got["table"]) < printed.index("re-timed as its steps"), printed
            # the chosen row's figure is the re-time's: what moved it from the profile's
            # said under it
            said = (f"\nengine.distribute: {got['retimed']}\n"
                    f"engine.distribute: {got['name']} cuts")
            assert said in printed, printed
            assert printed.index("\nchosen: the fastest") < printed.index(said), printed
        else:
            assert got["printed"] == "", got["printed"]
