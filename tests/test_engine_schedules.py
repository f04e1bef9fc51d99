"""Schedule IR, generators, lowering, simulation and rendering: pure, no processes."""
import importlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engine
from engine import schedules as S
from engine.ir import KINDS, Action, Schedule
from engine.lower import lower, strip_comm, with_grad_sync, with_optimizer_step
from engine.show import main as show_main
from engine.show import parse_costs

CASES = {
    S.gpipe: (4, 4),
    S.one_f_one_b: (4, 6),
    S.interleaved_1f1b: (2, 4, 2),
    S.zero_bubble_h1: (4, 6),
    S.zero_bubble_h2: (4, 6),
    S.zb_v: (2, 3),
}


def _docstring_table(fn) -> str:
    lines = [ln.strip() for ln in fn.__doc__.splitlines()]
    return "\n".join(ln for ln in lines if ln[:1].isdigit() and " | " in ln)


@pytest.mark.parametrize("fn", list(CASES), ids=lambda f: f.__name__)
def test_generator_matches_its_docstring_table(fn):
    table = _docstring_table(fn)
    assert table, f"{fn.__name__} draws no table"
    assert fn(*CASES[fn]).render() == table


def test_one_f_one_b_exact_order():
    sched = S.one_f_one_b(3, 4)
    assert [[str(a) for a in row] for row in sched.ranks] == [
        ["0F0", "0F1", "0F2", "0B0", "0F3", "0B1", "0B2", "0B3"],
        ["1F0", "1F1", "1B0", "1F2", "1B1", "1F3", "1B2", "1B3"],
        ["2F0", "2B0", "2F1", "2B1", "2F2", "2B2", "2F3", "2B3"],
    ]


def test_zero_bubble_h1_exact_order():
    sched = S.zero_bubble_h1(2, 3)
    assert [[str(a) for a in row] for row in sched.ranks] == [
        ["0F0", "0F1", "0I0", "0W0", "0F2", "0I1", "0W1", "0I2", "0W2"],
        ["1F0", "1I0", "1F1", "1I1", "1W0", "1F2", "1I2", "1W1", "1W2"],
    ]


def _all_schedules():
    for p in range(1, 6):
        for m in range(1, 10):
            yield S.gpipe(p, m)
            yield S.one_f_one_b(p, m)
            yield S.zero_bubble_h1(p, m)
            yield S.zero_bubble_h2(p, m)
            yield S.zb_v(p, m)
            for chunks in (1, 2, 3):
                if m % p == 0:
                    yield S.interleaved_1f1b(p, m, chunks)


def test_every_generated_schedule_is_valid_and_covers_each_microbatch_once():
    for sched in _all_schedules():
        sched.validate()
        for stage in range(sched.num_stages):
            row = sched.ranks[sched.rank_of(stage)]
            fwd = sorted(a.mb for a in row if a.stage == stage and a.kind == "F")
            bwd = sorted(a.mb for a in row if a.stage == stage and a.kind in ("B", "I"))
            assert fwd == bwd == list(range(sched.num_microbatches)), sched.name


def test_interleaved_stage_to_rank_mapping():
    sched = S.interleaved_1f1b(4, 8, 3)
    assert sched.num_stages == 12
    assert sched.stage_ranks == tuple(s % 4 for s in range(12))
    assert sched.stages_of(1) == (1, 5, 9)
    for r, row in enumerate(sched.ranks):
        assert {a.stage for a in row} == set(sched.stages_of(r))


def test_generator_argument_errors():
    with pytest.raises(ValueError):
        S.gpipe(0, 4)
    with pytest.raises(ValueError):
        S.one_f_one_b(2, 0)
    with pytest.raises(ValueError, match="m % p"):
        S.interleaved_1f1b(4, 6, 2)
    with pytest.raises(ValueError):
        S.interleaved_1f1b(2, 4, 0)
    with pytest.raises(ValueError):
        S.by_name("nonesuch", 2, 2)
    # (None, a generator not called: "'NoneType' object has no attribute 'lower'")
    with pytest.raises(TypeError, match=r"a schedule name is a str \(gpipe, 1f1b, interleaved, "
                                        r"zb-h1, zb-h2 or zb-v\), not None"):
        S.by_name(None, 2, 2)
    assert S.is_name("ZB-H1") and S.is_name("one_f_one_b") and not S.is_name("mine")
    # a Schedule where p goes: named, not its repr of every action
    with pytest.raises(TypeError,
                       match=r"^p must be a whole number, got the Schedule '1f1b\(2,4\)'$"):
        S.one_f_one_b(S.one_f_one_b(2, 4), 4)
    for args in ((True, 4), (2.5, 4), (2, "4")):     # (True made "1f1b(True,4)" of one rank)
        with pytest.raises(TypeError, match="must be a whole number"):
            S.one_f_one_b(*args)
    with pytest.raises(TypeError, match="chunks must be a whole number, got 2.0"):
        S.interleaved_1f1b(2, 4, 2.0)
    assert S.by_name("ZB-H1", 2, 4) == S.zero_bubble_h1(2, 4)
    assert S.by_name("interleaved", 2, 4, 3) == S.interleaved_1f1b(2, 4, 3)
    assert S.by_name("zb-h2", 2, 4) == S.zero_bubble_h2(2, 4)
    assert S.by_name("ZB-V", 2, 4) == S.zb_v(2, 4)


@given(stage=st.integers(0, 99), kind=st.sampled_from(KINDS), mb=st.integers(0, 999))
def test_action_string_round_trip(stage, kind, mb):
    a = Action(stage, kind, None if kind in ("AR", "OPT") else mb)
    assert Action.parse(str(a)) == a


def test_action_forms_and_errors():
    assert str(Action(1, "F", 3)) == "1F3"
    assert Action.parse("12SEND_B7") == Action(12, "SEND_B", 7)
    assert str(Action(2, "AR")) == "2AR"
    for bad in ("F3", "1X3", "1AR3", "1F", "-1F2", ""):
        with pytest.raises(ValueError):
            Action.parse(bad)
    with pytest.raises(ValueError):
        Action(0, "F")
    with pytest.raises(ValueError):
        Action(0, "OPT", 1)
    # whole numbers only: 1.0 equals 1, so the verifier passed 0F1.0, whose message tag
    # (6.0) the wire then dropped, the receiver timing out; int() made rank 1.7 rank 1
    for stage, mb in ((0, 1.0), (True, 0), (0, True), ("0", 0)):
        with pytest.raises(TypeError, match="must be a whole number"):
            Action(stage, "F", mb)
    with pytest.raises(TypeError, match="stage 1 is mapped to 1.7"):
        Schedule.build([["0F0", "1F0", "1B0", "0B0"]], 1, [0, 1.7])
    with pytest.raises(TypeError, match="num_microbatches must be a whole number, got 1.9"):
        Schedule.from_json('{"ranks": [["0F0", "0B0"]], "num_microbatches": 1.9, '
                           '"stage_ranks": [0]}')
    numpy_made = Schedule.build([[Action(np.int64(0), "F", np.int64(0)), "0B0"]],
                                np.int64(1), np.zeros(1, dtype=int))
    assert numpy_made == Schedule.build([["0F0", "0B0"]], 1, [0])
    assert type(numpy_made.ranks[0][0].mb) is int
    json.loads(numpy_made.to_json())
    # a bad entry names its rank and place (a rank's list as one string was read letter by
    # letter: "not an action: '0'")
    with pytest.raises(TypeError, match=r"rank 0's list is the string '0F0 0B0'"):
        Schedule.build(["0F0 0B0"], 1, [0])
    with pytest.raises(ValueError, match=r"rank 1, action 2 \('1X0'\): not an action"):
        Schedule.build([["0F0", "0B0"], ["1F0", "1B0", "1X0"]], 1, [0, 1])


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["gpipe", "1f1b", "zb-h1", "interleaved"]),
       st.integers(1, 5), st.integers(1, 4), st.booleans())
def test_json_round_trip(name, p, k, lowered):
    sched = S.by_name(name, p, p * k, chunks=2)
    if lowered:
        sched = with_optimizer_step(with_grad_sync(lower(sched)))
    back = Schedule.from_json(sched.to_json())
    assert back == sched
    assert back.name == sched.name
    assert json.loads(sched.to_json())["ranks"][0][0] == str(sched.ranks[0][0])


def test_from_json_reports_missing_field():
    with pytest.raises(ValueError, match="stage_ranks"):
        Schedule.from_json('{"ranks": [["0F0", "0B0"]], "num_microbatches": 1}')


def test_user_schedule_is_just_data():
    sched = Schedule.build([["0F0", "0F1", "0B0", "0B1"], ["1F0", "1B0", "1F1", "1B1"]],
                           2, [0, 1], name="mine")
    assert sched.validate().is_lowered
    assert sched.render() == ("0 | 0F0 0F1  .  0B0  .  0B1\n"
                              "1 |  .  1F0 1B0 1F1 1B1  .")


def test_lowering_inserts_matching_sends_and_receives():
    low = lower(S.one_f_one_b(2, 2))
    assert [str(a) for a in low.ranks[0]] == [
        "0F0", "0SEND_F0", "0F1", "0SEND_F1", "0RECV_B0", "0B0", "0RECV_B1", "0B1"]
    assert [str(a) for a in low.ranks[1]] == [
        "1RECV_F0", "1F0", "1B0", "1SEND_B0", "1RECV_F1", "1F1", "1B1", "1SEND_B1"]
    assert lower(low) is low
    assert strip_comm(low) == S.one_f_one_b(2, 2)


def test_lowering_skips_stages_on_the_same_rank():
    sched = Schedule.build([["0F0", "1F0", "1B0", "0B0"]], 1, [0, 0])
    assert not lower(sched).is_lowered
    sched.validate()


def test_lowering_interleaved_wraps_from_last_rank_to_first():
    low = lower(S.interleaved_1f1b(2, 2, 2))
    r0 = [str(a) for a in low.ranks[0]]
    assert r0.index("2RECV_F0") < r0.index("2F0")
    r1 = [str(a) for a in low.ranks[1]]
    assert r1.index("1F0") < r1.index("1SEND_F0")


def test_grad_sync_after_last_gradient_and_its_send():
    sched = with_grad_sync(lower(S.interleaved_1f1b(2, 2, 2)))
    r0 = [str(a) for a in sched.ranks[0]]
    assert r0.index("2AR") == r0.index("2SEND_B1") + 1
    assert r0[-1] == "0AR"
    zb = [str(a) for a in with_grad_sync(S.zero_bubble_h1(2, 2)).ranks[1]]
    assert zb[-2:] == ["1W1", "1AR"]
    assert with_grad_sync(sched) == sched
    full = with_optimizer_step(sched)
    assert [str(a) for a in full.ranks[1][-2:]] == ["1OPT", "3OPT"]
    full.validate()


def test_grad_sync_and_optimizer_step_add_what_each_stage_lacks():
    """A rank whose list names the AR (or OPT) of one of its stages gets
    the others' too: rank 0 of interleaved 1F1B holds stages 0 and 2, and
    one AR kept stage 2 from its average over dp (the replicas drifting
    apart), one OPT from its update."""
    sched = lower(S.interleaved_1f1b(2, 2, 2))
    r0 = list(sched.ranks[0])
    last = max(i for i, a in enumerate(r0) if str(a) in ("0B0", "0B1"))
    r0.insert(last + 1, Action(0, "AR"))
    half = sched.replace([r0, sched.ranks[1]])
    synced = with_grad_sync(half)
    assert [str(a) for a in synced.ranks[0]].count("0AR") == 1
    assert synced == with_grad_sync(sched)
    stepped = with_optimizer_step(half.replace([r0 + [Action(2, "OPT")], half.ranks[1]]))
    assert [str(a) for a in stepped.ranks[0][-2:]] == ["2OPT", "0OPT"]
    assert [str(a) for a in stepped.ranks[1][-2:]] == ["1OPT", "3OPT"]
    with_grad_sync(stepped).validate()


def test_simulated_makespans_match_the_closed_forms():
    F, B = 1.0, 2.0
    for p, m in [(2, 4), (4, 8), (4, 16), (3, 5)]:
        costs = {"F": F, "B": B, "I": 1.0, "W": 1.0}
        assert S.gpipe(p, m).simulate(costs).makespan == (m + p - 1) * (F + B)
        assert S.one_f_one_b(p, m).simulate(costs).makespan == (m + p - 1) * (F + B)
        zb = S.zero_bubble_h1(p, m).simulate(costs)
        assert zb.makespan == m * 3 + (p - 1) * 1
    assert S.gpipe(2, 1).simulate({"F": 1, "B": 2, "send": 0.5}).makespan == 7.0
    assert S.one_f_one_b(4, 8).simulate({"F": 1, "B": 2, "send": 0.5}).makespan > 33


def test_bubble_and_peak_activations():
    costs = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0, "send": 0.0}
    one = S.one_f_one_b(4, 16).simulate(costs)
    gp = S.gpipe(4, 16).simulate(costs)
    zb = S.zero_bubble_h1(4, 16).simulate(costs)
    assert one.bubble == pytest.approx(3 * 3 / (19 * 3))
    assert zb.bubble < one.bubble
    assert one.peak_activations == (4, 3, 2, 1)
    assert gp.peak_activations == (16,) * 4
    assert max(zb.peak_activations) == max(one.peak_activations)
    half = {"F": 0.5, "B": 1.0}
    assert S.interleaved_1f1b(4, 16, 2).simulate(half).makespan < one.makespan
    assert one.rank_bubble(0) == pytest.approx(one.bubble)
    assert "bubble 15.8% (within each rank's span 8.6%)" in str(one)


def test_zero_bubble_figures_of_the_paper():
    """With F = I = W (B = 2): ZB-H1 idles a third of 1F1B; ZB-H2 and ZB-V
    keep every rank busy (almost) all its span, at 2p-1 and 2p activations
    (ZB-V's stages are half as large: 1F1B's memory)."""
    unit = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}
    for p, m in [(4, 8), (3, 6)]:
        one, h1 = S.one_f_one_b(p, m).simulate(unit), S.zero_bubble_h1(p, m).simulate(unit)
        h2, v = S.zero_bubble_h2(p, m).simulate(unit), S.zb_v(p, m).simulate(unit)
        assert (h1.makespan - 3 * m) * 3 == one.makespan - 3 * m == 3 * (p - 1)
        assert h2.span_bubble == 0.0 and h2.peak_activations == (2 * p - 1,) * p
        assert h2.makespan == h1.makespan        # the least a p-rank pipeline can take
        assert v.span_bubble < 0.04 and max(v.peak_activations) == 2 * p
        assert v.makespan - 6 * m < (p - 1) * 2
        assert one.span_bubble > 0.14 and h1.span_bubble > 0.05
    assert S.zb_v(4, 16).simulate(unit).span_bubble < 0.02
    assert S.zb_v(4, 4).stage_ranks == (0, 1, 2, 3, 3, 2, 1, 0)


def test_per_stage_costs():
    sched = S.one_f_one_b(2, 2)
    even = sched.simulate({"F": [1, 1], "B": [2, 2]})
    slow_last = sched.simulate({"F": [1, 3], "B": [2, 6]})
    assert even.makespan == 9 and slow_last.makespan == 1 + 2 * 9 + 2
    assert sched.render({"F": [1, 2], "B": [1, 2]}).splitlines()[1] == \
        "1 |  .  1F0 --- 1B0 --- 1F1 --- 1B1 ---  ."
    with pytest.raises(ValueError, match="3 per-stage values for 2 stages"):
        sched.simulate({"F": [1, 2, 3]})


def test_simulate_walks_the_table_once(monkeypatch):
    verify_module = importlib.import_module("engine.verify")   # engine.verify is the function
    walks = []
    real = verify_module.replay
    monkeypatch.setattr(verify_module, "replay",
                        lambda s, c=None, k=None, n=0.0: walks.append(s) or real(s, c, k, n))
    report = S.one_f_one_b(4, 8).simulate({"F": 1, "B": 2})
    assert len(walks) == 1 and report.makespan == 33
    assert report.events == real(walks[0], {"F": 1, "B": 2, "send": 0}).events


def test_simulate_rejects_unknown_or_negative_costs():
    with pytest.raises(ValueError, match="unknown cost"):
        S.gpipe(2, 2).simulate({"X": 1.0})
    with pytest.raises(ValueError, match="negative"):
        S.gpipe(2, 2).simulate({"F": -1.0})


def test_render_shows_long_actions_and_bubbles():
    grid = S.one_f_one_b(2, 2).render({"F": 1, "B": 2})
    assert grid == ("0 | 0F0 0F1  .   .  0B0 ---  .  0B1 ---\n"
                    "1 |  .  1F0 1B0 --- 1F1 1B1 ---  .   .")
    # starts off the shortest action's multiples (a message's flight of half an F):
    # a cell of half an F, every action shown where the simulator has it
    assert S.gpipe(2, 3).render({"send": 0.5}).splitlines()[1] == (
        "1 |  .   .   .  1F0 --- 1F1 --- 1F2 --- 1B0 --- 1B1 --- 1B2 ---  .   .   .")
    for costs in ({"F": 1, "B": 1.5}, {"F": 1, "B": 2, "send": 0.3}, {"F": 0.7, "B": 1.1}):
        grid = S.one_f_one_b(2, 3).render(costs)
        for r in (0, 1):
            row = grid.splitlines()[r]
            assert [f"{r}{k}{i}" in row for k in "FB" for i in range(3)] == [True] * 6, grid
    assert str(S.gpipe(2, 1)) == ("gpipe(2,1): 2 ranks, 2 stages, 1 micro-batches\n"
                                  "  rank 0 | 0F0 0B0\n"
                                  "  rank 1 | 1F0 1B0")


def test_show_prints_grid_and_figures(capsys, tmp_path):
    assert show_main(["1f1b", "2", "2"]) == 0
    out = capsys.readouterr().out
    assert "0 | 0F0 0F1" in out and "makespan" in out
    # the grid is the simulation its figures come from (it was drawn with B one cell while
    # the figures took B=2: 6 cells over "makespan 9"), and a legend says what it shows
    assert "makespan 9 " in out and "costs: F=1 B=2 send=0" in out
    assert "1 |  .  1F0 1B0 --- 1F1 1B1 ---" in out
    assert "1F3 = stage 1's forward of micro-batch 3; B its backward" in out
    assert show_main(["zb-h1", "2", "3"]) == 0
    assert "I its input gradient, W its weight gradient" in capsys.readouterr().out
    assert show_main(["zb-h1", "2", "3", "--json"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "s.json"
    path.write_text(text)
    assert show_main([str(path), "--lowered", "--costs", "F=1,I=1,W=1"]) == 0
    out = capsys.readouterr().out
    assert "1SEND_B0" in out and "makespan 10" in out
    with pytest.raises(SystemExit):         # (said "unknown schedule 's.json'")
        show_main([str(path), "2", "3"])
    assert (f"{path} is a file: a saved schedule or trace holds its own ranks and "
            f"micro-batches, so give no p and m: python -m engine.show {path}"
            in capsys.readouterr().err)
    bad = Schedule.build([["0B0", "0F0"]], 1, [0])
    path.write_text(bad.to_json())
    assert show_main([str(path)]) == 1
    assert "^^^" in capsys.readouterr().err
    assert parse_costs("F=1, B=2.5") == {"F": 1.0, "B": 2.5}


def test_public_names_reexported():
    for name in ("Schedule", "Action", "ScheduleError", "gpipe", "one_f_one_b",
                 "interleaved_1f1b", "zero_bubble_h1", "zero_bubble_h2", "zb_v", "schedules",
                 "partition"):
        assert name in engine.__all__ and hasattr(engine, name)


def test_ranks_sharing_cores_slow_only_what_overlaps():
    """With ``cores`` the ranks share them (processor sharing): GPipe(2,1),
    F=1, B=2 by hand with one core for two ranks: nothing ever overlaps, so
    the step is the plain one; GPipe(2,2): rank 0's second F overlaps rank
    1's first F, each at half speed. With as many cores as ranks, every
    schedule simulates as without; ``fixed`` adds unshared time to each
    F/B/I/W, AR an unshared wait."""
    costs = {"F": 1.0, "B": 2.0}
    assert S.gpipe(2, 1).simulate(costs, cores=1).makespan == pytest.approx(6.0)
    # rank 0: F0 0-1, F1 1-3 (shared with rank 1's F0 1-3), B... ; rank 1: F0 1-3, F1 3-4,
    # B1 4-6, B0 6-8 (rank 0's B1 6-... shares: rank 0 B1 starts at 6 with rank 1 B0)
    shared = S.gpipe(2, 2).simulate(costs, cores=1)
    plain = S.gpipe(2, 2).simulate(costs)
    assert shared.makespan > plain.makespan
    f1 = [e for e in shared.events if e.rank == 0 and str(e.action) == "0F1"][0]
    assert (f1.start, f1.end) == (pytest.approx(1.0), pytest.approx(3.0))
    for name in ("1f1b", "interleaved", "zb-h2", "zb-v"):
        sched = S.by_name(name, 2, 4, chunks=2)
        c = {"F": [1.0, 1.5, 1.2, 0.8][:sched.num_stages], "B": 2.0, "I": 1.0, "W": 1.0,
             "send": 0.1, "recv": 0.01}
        assert sched.simulate(c, cores=2).makespan == pytest.approx(sched.simulate(c).makespan)
        slow = sched.simulate(c, cores=1).makespan
        assert sched.simulate(c).makespan < slow <= 2 * sched.simulate(c).makespan + 1e-9
    one = S.gpipe(1, 1)
    assert one.simulate({"F": 1.0, "B": 2.0, "fixed": 0.5}).makespan == pytest.approx(4.0)
    synced = with_grad_sync(S.one_f_one_b(2, 2))
    base = synced.simulate({"F": 1.0, "B": 1.0}, cores=1).makespan
    assert synced.simulate({"F": 1.0, "B": 1.0, "AR": 3.0}, cores=1).makespan == \
        pytest.approx(base + 3.0)       # the last AR waits its 3 at full length
    with pytest.raises(ValueError, match="cores"):
        S.gpipe(2, 1).simulate(costs, cores=0)


def test_others_load_shares_the_cores_too():
    """``load``: others' processes on the cores, in ranks' worth. With as
    many cores as ranks and no load every schedule simulates as without
    ``cores`` (an uncontended machine predicts as before); with load each of
    k computing ranks gets ``cores / (k + load)``, so a rank computing alone
    is slowed as well, and less than twice as much as one that overlaps."""
    costs = {"F": 1.0, "B": 2.0}
    for name in ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zb-v"):
        sched = S.by_name(name, 2, 4, chunks=2)
        c = {"F": [1.0, 1.5, 1.2, 0.8][:sched.num_stages], "B": 2.0, "I": 1.0, "W": 1.0,
             "send": 0.1, "recv": 0.01, "fixed": 0.05}
        plain = sched.simulate(c)
        for cores in (2, 2.0, 3.5):
            for load in (0, 0.0):
                got = sched.simulate(c, cores=cores, load=load)
                assert got.makespan == plain.makespan and got.events == plain.events
        # load 0 is the sharing as it was; more load, longer steps
        assert sched.simulate(c, cores=1, load=0).makespan == pytest.approx(
            sched.simulate(c, cores=1).makespan)
        steps = [sched.simulate(c, cores=2, load=x).makespan for x in (0.5, 1.0, 4.0)]
        assert plain.makespan < steps[0] < steps[1] < steps[2]
    # GPipe(2,1) never overlaps: one core and one other process's worth, every action
    # at half speed (F=1, B=2: 2 x 6)
    assert S.gpipe(2, 1).simulate(costs, cores=1, load=1).makespan == pytest.approx(12.0)
    # two cores, two ranks, two others: alone 2/3 speed, overlapped 1/2
    shared = S.gpipe(2, 2).simulate(costs, cores=2, load=2)
    f0 = [e for e in shared.events if e.rank == 0 and str(e.action) == "0F0"][0]
    f1 = [e for e in shared.events if e.rank == 0 and str(e.action) == "0F1"][0]
    assert f0.end - f0.start == pytest.approx(1.5)      # alone: 2 / (1 + 2)
    assert f1.end - f1.start == pytest.approx(2.0)      # beside rank 1's F0: 2 / (2 + 2)
    # unshared parts stay unshared under load: fixed and AR add their own length
    synced = with_grad_sync(S.one_f_one_b(2, 2))
    base = synced.simulate({"F": 1.0, "B": 1.0}, cores=1, load=3).makespan
    assert synced.simulate({"F": 1.0, "B": 1.0, "AR": 3.0}, cores=1, load=3).makespan == \
        pytest.approx(base + 3.0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="load"):
            S.gpipe(2, 1).simulate(costs, cores=1, load=bad)
    # without cores every rank has a core of its own: load is not used
    assert S.gpipe(2, 2).simulate(costs, load=5).makespan == pytest.approx(
        S.gpipe(2, 2).simulate(costs).makespan)


def test_show_simulates_ranks_sharing_cores(capsys):
    assert show_main(["1f1b", "2", "3", "--costs", "F=1,B=2", "--cores", "1"]) == 0
    out = capsys.readouterr().out
    assert "makespan 18" in out and "0F1 ---" in out     # F1 beside rank 1's F0: twice as long
    assert show_main(["1f1b", "2", "3", "--costs", "F=1,B=2"]) == 0
    assert "makespan 12" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        show_main(["1f1b", "2", "3", "--cores", "0"])
    assert "argument --cores: '0': a number above 0" in capsys.readouterr().err
    # two ranks on two cores beside one other process's worth: one computing alone at full
    # speed (two processes, two cores), both at 2/3: longer than the plain 12, under 1.5 x 12
    assert show_main(["1f1b", "2", "3", "--costs", "F=1,B=2", "--cores", "2", "--load", "1"]) == 0
    span = float(capsys.readouterr().out.split("makespan ")[1].split()[0])
    assert 12 < span < 18
    assert show_main(["1f1b", "2", "3", "--load", "1"]) == 2
    assert "--load needs --cores" in capsys.readouterr().err


def test_a_measured_grid_says_its_cell_and_stays_readable(capsys, tmp_path):
    """engine.show trace.json --grid: a cell was the shortest action's time,
    so a W of 10 us among forwards of 10 ms made rows of 2,000+ cells; now
    at most about 120, the cell's time said, every action shown in order."""
    from engine.trace import chrome_trace, write
    us = 1000       # the events' times are in ns
    ranks = [{"dp": 0, "pp": 0, "events": [
        ["0F0", "F", 0, 10_000 * us, "", 0], ["0I0", "I", 10_000 * us, 20_000 * us, "", 0],
        ["0W0", "W", 20_000 * us, 20_010 * us, "", 0]]}]
    path = write(str(tmp_path / "t.json"), chrome_trace(ranks, {}))
    assert show_main([path, "--grid"]) == 0
    head, row = capsys.readouterr().out.splitlines()
    assert head == "one cell = 0.167 ms (measured; '.' idle or waiting)"
    cells = row.split(" | ")[1].split()
    assert len(cells) <= 121 and [c for c in cells if c != "---"] == ["0F0", "0I0", "0W0"]
