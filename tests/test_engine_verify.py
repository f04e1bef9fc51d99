"""The verifier rejects each kind of bad schedule and marks the bad action."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import schedules as S
from engine.ir import Schedule
from engine.lower import lower, with_optimizer_step
from engine.verify import ScheduleError, verify


def _sched(rows, m=1, stage_ranks=None):
    return Schedule.build(rows, m, stage_ranks or range(len(rows)))


def _marked(err: ScheduleError) -> list[str]:
    """The action strings above each caret run in the error's grid."""
    lines = err.grid.splitlines()
    found = []
    for above, line in zip(lines, lines[1:]):
        if "^" in line and set(line.strip()) <= {"^", " "}:
            i = 0
            while i < len(line):
                if line[i] == "^":
                    j = i
                    while j < len(line) and line[j] == "^":
                        j += 1
                    found.append(above[i:j])
                    i = j
                else:
                    i += 1
    return found


def _reject(sched, match):
    with pytest.raises(ScheduleError, match=match) as info:
        sched.validate()
    return info.value


def test_backward_before_forward():
    err = _reject(_sched([["0F0", "0B0"], ["1B0", "1F0"]]), "before its forward 1F0")
    assert _marked(err) == ["1B0"]
    assert err.rank == 1 and str(err.action) == "1B0"
    assert "schedule 'custom' is invalid" in str(err)


def test_w_before_i_and_b_with_i():
    err = _reject(_sched([["0F0", "0W0", "0I0"]]), "before its input gradient")
    assert _marked(err) == ["0W0"]
    _reject(_sched([["0F0", "0B0", "0I0", "0W0"]]), "both B and I")
    # B already made the weight gradient: named as such, not as a W before an I never written
    err = _reject(_sched([["0F0", "0B0", "0W0"]]), r"both B and W .* weight gradient too")
    assert _marked(err) == ["0W0"]


def test_missing_microbatch():
    err = _reject(_sched([["0F0", "0B0"], ["1F0", "1B0"]], m=2), "micro-batch 1 is missing")
    assert "<- missing 0F1" in err.grid
    _reject(_sched([["0F0", "0I0"]]), "never runs 0W0")


def test_duplicated_microbatch():
    err = _reject(_sched([["0F0", "0F0", "0B0"]]), "twice")
    assert _marked(err) == ["0F0", "0F0"]


def test_action_on_the_wrong_rank_or_out_of_range():
    _reject(_sched([["0F0", "1F0", "0B0"], ["1B0"]]), "stage 1 lives on rank 1")
    _reject(_sched([["0F0", "0F1", "0B0", "0B1"]]), "there are 1")
    _reject(_sched([["0F0", "3F0", "0B0"]]), "has 1 stages")
    # on two ranks, named and marked as written, in the list as written: it was the
    # receive lowering put before it, "1RECV_F3 names micro-batch 3", in the lowered list
    err = _reject(_sched([["0F0", "0B0"], ["1F0", "1B0", "1F3"]]), "^schedule 'custom' is "
                  "invalid: 1F3 names micro-batch 3, but there are 1\n")
    assert _marked(err) == ["1F3"] and "RECV" not in err.grid
    err = _reject(_sched([["0F0", "0B0"], ["1F0", "1F0", "1B0"]]), "rank 1 runs 1F0 twice")
    assert "  rank 1 | 1F0 1F0 1B0\n" in err.grid


def test_unmatched_send():
    rows = [["0F0", "0SEND_F0", "0RECV_B0", "0B0"], ["1F0", "1B0", "1SEND_B0"]]
    err = _reject(_sched(rows), "unmatched send: 0SEND_F0 has no 1RECV_F0 on rank 1")
    assert _marked(err) == ["0SEND_F0"]
    rows = [["0F0", "0SEND_F0", "0SEND_F0", "0RECV_B0", "0B0"],
            ["1RECV_F0", "1F0", "1B0", "1SEND_B0"]]
    assert _marked(_reject(_sched(rows), "unmatched send")) == ["0SEND_F0"]


def test_a_schedule_naming_some_messages_is_told_none_were_added():
    # one send placed by hand, the rest left to lowering: only "unmatched send" was said
    rows = [["0F0", "0SEND_F0", "0F1", "0B0", "0B1"], ["1F0", "1B0", "1F1", "1B1"]]
    err = _reject(_sched(rows, m=2), r"unmatched send: 0SEND_F0 has no 1RECV_F0 on rank 1 "
                  r"\(the schedule names its own sends and receives, 0SEND_F0 on rank 0 the "
                  r"first, so none are added for it: name every one, or none .*strip_comm")
    assert _marked(err) == ["0SEND_F0"]
    rows = [["0F0", "0SEND_F0", "0F1", "0SEND_F1", "0B0", "0B1"],
            ["1RECV_F0", "1F0", "1B0", "1RECV_F1", "1F1", "1B1"]]
    _reject(_sched(rows, m=2), r"0B0 before receiving its gradient \(0RECV_B0\) \(the "
            r"schedule names its own sends")
    # an error of the compute alone is not about them
    err = _reject(_sched([["0F0", "0SEND_F0", "0RECV_B0", "0B0"],
                          ["1RECV_F0", "1B0", "1F0", "1SEND_B0"]]),
                  "before its forward 1F0")
    assert "names its own" not in str(err)


def test_unmatched_receive():
    rows = [["0F0", "0SEND_F0", "0RECV_B0", "0B0"], ["1RECV_F0", "1F0", "1B0"]]
    err = _reject(_sched(rows), "unmatched receive: 0RECV_B0 has no 1SEND_B0")
    assert _marked(err) == ["0RECV_B0"]


def test_deadlock_marks_every_stuck_rank():
    rows = [["0RECV_B0", "0F0", "0SEND_F0", "0B0"], ["1RECV_F0", "1F0", "1B0", "1SEND_B0"]]
    err = _reject(_sched(rows), "deadlock")
    assert _marked(err) == ["0RECV_B0", "1RECV_F0"]


def test_deadlock_from_waiting_too_early():
    gp = lower(S.gpipe(2, 2))
    early = ["0F0", "0SEND_F0", "0F1", "0RECV_B1", "0SEND_F1", "0RECV_B0", "0B0", "0B1"]
    err = _reject(gp.replace([early, gp.ranks[1]]), "deadlock")
    assert _marked(err) == ["0RECV_B1", "1RECV_F1"]


def test_a_rank_without_a_stage():
    # a Pipeline took it: that pp rank idled through every step, its step() None, no word
    err = _reject(_sched([["0F0", "1F0", "1B0", "0B0"], []], stage_ranks=[0, 0]),
                  r"pp rank 1 holds no stage: stage_ranks=\[0, 0\] puts the 2 stage\(s\) on "
                  r"rank\(s\) \[0\] of its 2; .*for 1 rank\(s\): pp=1\)")
    assert err.rank == 1 and "rank 1 |    <- holds no stage" in err.grid


def test_send_before_compute_and_bad_directions():
    _reject(_sched([["0SEND_F0", "0F0", "0RECV_B0", "0B0"],
                    ["1RECV_F0", "1F0", "1B0", "1SEND_B0"]]), "before computing it")
    _reject(_sched([["0F0", "0RECV_F0", "0B0"]]), "stage 0 has no previous")
    _reject(_sched([["0F0", "0SEND_F0", "0B0"]]), "last stage has no next")
    _reject(_sched([["0F0", "1RECV_F0", "1F0", "1B0", "0B0"]], stage_ranks=[0, 0]),
            "hand over locally")


def test_compute_before_its_input_arrives():
    _reject(_sched([["0F0", "0SEND_F0", "0RECV_B0", "0B0"],
                    ["1F0", "1RECV_F0", "1B0", "1SEND_B0"]]), "before receiving its input")
    _reject(_sched([["1F0", "0F0", "1B0", "0B0"]], stage_ranks=[0, 0]), "which feeds it")


def test_grad_sync_and_optimizer_order():
    _reject(_sched([["0F0", "0AR", "0B0"]]), "before all 1 gradients")
    _reject(_sched([["0F0", "0B0", "0OPT", "0AR"]]), "before 0AR")
    _sched([["0F0", "0B0", "0AR", "0OPT"]]).validate()
    # OPT for every stage or none: the executor steps at OPT actions only, and stage 1
    # trained with its first weights (0.14 off sequential training, nothing said)
    err = _reject(_sched([["0F0", "0B0", "0OPT"], ["1F0", "1B0"]]),
                  r"rank 1 never runs 1OPT, but stage\(s\) 0 have OPT .* stage 1's weights")
    assert err.rank == 1 and "1SEND_B0   <- missing 1OPT" in err.grid
    half = _sched([["0F0", "1F0", "1B0", "0B0", "1OPT"]], stage_ranks=[0, 0])
    _reject(half, "rank 0 never runs 0OPT")
    with_optimizer_step(half).validate()


def test_str_of_an_invalid_schedule_lists_the_programs():
    assert "rank 0 | 0B0 0F0" in str(_sched([["0B0", "0F0"]]))


def test_validate_returns_lowered_schedule():
    low = S.one_f_one_b(3, 3).validate()
    assert low == verify(low) == lower(S.one_f_one_b(3, 3))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["gpipe", "1f1b", "zb-h1", "interleaved"]), st.integers(1, 3),
       st.integers(1, 2), st.data())
def test_shuffled_programs_are_rejected_cleanly_or_valid(name, p, k, data):
    """Reordering one rank's program never crashes the verifier: the result is
    either valid (then it also simulates) or a ScheduleError."""
    low = lower(S.by_name(name, p, p * k, chunks=2))
    r = data.draw(st.integers(0, p - 1))
    row = data.draw(st.permutations(low.ranks[r]))
    sched = low.replace([row if i == r else low.ranks[i] for i in range(p)])
    try:
        sched.validate()
    except ScheduleError as e:
        assert e.reason and "^" in e.grid or "<-" in e.grid
    else:
        assert sched.simulate().makespan > 0


def test_what_a_rank_computes_is_checked_before_its_messages():
    """Lowering derives the messages from the compute: a duplicated or
    missing action, or both B and I, is named as such on two ranks too, not
    as a send or receive without its peer on another rank."""
    for rows, words in [
            ([["0F0", "0F0", "0B0"], ["1F0", "1B0"]], "rank 0 runs 0F0 twice"),
            ([["0F0", "0F1", "0B0", "0B1"], ["1F0", "1F1", "1B0"]],
             "micro-batch 1 is missing from stage 1: rank 1 never runs 1B1"),
            ([["0F0", "0B0", "0I0", "0W0"], ["1F0", "1B0"]],
             "rank 0 runs both B and I for stage 0 micro-batch 0")]:
        m = 1 + max(int(a[-1]) for row in rows for a in row)
        _reject(Schedule.build(rows, m, [0, 1]), words)


def test_costs_must_be_finite_numbers():
    sched = S.one_f_one_b(2, 2)
    for costs, words in [({"F": "1"}, "a number of seconds"), ({"F": float("nan")}, "finite"),
                         ({"B": [1.0, float("inf")]}, "finite"), ({"F": -1}, "negative")]:
        with pytest.raises(ValueError, match=words):
            sched.simulate(costs)
