"""The verifier: reject a schedule before anything runs.

It lowers the schedule, then checks, in this order: every rank holds a
stage; every action is on the rank that holds its stage and names a real
micro-batch; every send has its receive; each rank's list respects the
data dependencies (no backward before its forward, no compute before its
input has been received);
every micro-batch passes every stage exactly once; every stage has an
OPT action or none does; and a replay of all ranks (engine.replay)
finishes (no deadlock). The first failure raises
ScheduleError, whose text shows every rank's list with the offending
action marked::

    schedule 'custom' is invalid: rank 1 runs 1B0 before its forward 1F0
      rank 0 | 0F0 0SEND_F0 0RECV_B0 0B0
      rank 1 | 1RECV_F0 1B0 1SEND_B0 1F0
                        ^^^
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

from .ir import (AR, OPT, B, F, I, W, RECV_B, RECV_F, SEND_B, SEND_F, Action, Schedule,
                 format_program, message_key)
from .lower import lower
from .replay import Cost, Replay, replay

__all__ = ["ScheduleError", "verify", "verified_replay"]


class ScheduleError(ValueError):
    """An invalid schedule: the reason, and the grid with the bad action marked."""

    def __init__(self, sched: Schedule, reason: str,
                 marks: Sequence[tuple[int, int]] = (),
                 notes: Mapping[int, str] | None = None) -> None:
        self.schedule = sched
        self.reason = reason
        self.marks = tuple(marks)
        self.rank = marks[0][0] if marks else (next(iter(notes)) if notes else None)
        self.action = sched.ranks[marks[0][0]][marks[0][1]] if marks else None
        self.grid = format_program(sched, marks, notes)
        super().__init__(f"schedule {sched.name!r} is invalid: {reason}\n{self.grid}")


def _check_placement(s: Schedule) -> None:
    last = s.num_stages - 1
    idle = [r for r in range(s.num_ranks) if not s.stages_of(r)]
    if idle:    # (a rank without a stage idled through every step, its process wasted,
        # and its pipeline returned None there: accepted without a word)
        held = sorted(set(s.stage_ranks))
        raise ScheduleError(s, f"pp rank {idle[0]} holds no stage: stage_ranks="
                            f"{list(s.stage_ranks)} puts the {s.num_stages} stage(s) on "
                            f"rank(s) {held} of its {s.num_ranks}; every pipeline rank must "
                            f"hold one (map a stage to it, or make the schedule for "
                            f"{len(held)} rank(s): pp={len(held)})",
                            notes={r: "holds no stage" for r in idle})
    for r, row in enumerate(s.ranks):
        for i, a in enumerate(row):
            bad = None
            if a.stage > last:
                bad = f"{a} names stage {a.stage}, but the schedule has {s.num_stages} stages"
            elif s.rank_of(a.stage) != r:
                bad = f"{a} is on rank {r}, but stage {a.stage} lives on rank {s.rank_of(a.stage)}"
            elif a.mb is not None and a.mb >= s.num_microbatches:
                bad = f"{a} names micro-batch {a.mb}, but there are {s.num_microbatches}"
            elif (a.kind == SEND_F and a.stage == last) or (a.kind == RECV_B and a.stage == last):
                bad = f"{a}: the last stage has no next stage"
            elif (a.kind == RECV_F and a.stage == 0) or (a.kind == SEND_B and a.stage == 0):
                bad = f"{a}: stage 0 has no previous stage"
            elif a.is_comm:
                _, src, dst, _ = message_key(a)
                if s.rank_of(src) == s.rank_of(dst):
                    bad = f"{a}: stages {src} and {dst} share rank {r}; they hand over locally"
            if bad:
                raise ScheduleError(s, bad, [(r, i)])


def _dependency(s: Schedule, r: int, a: Action, done: set[Action]) -> str | None:
    """Why ``a`` cannot run yet on rank r given the actions done before it."""
    last = s.num_stages - 1
    st, k = a.stage, a.mb

    def has(stage: int, *kinds: str) -> bool:
        return any(Action(stage, kd, k) in done for kd in kinds)

    if a.kind == F and st > 0:
        if s.rank_of(st - 1) == r and not has(st - 1, F):
            return f"rank {r} runs {a} before {Action(st - 1, F, k)}, which feeds it"
        if s.rank_of(st - 1) != r and not has(st, RECV_F):
            return f"rank {r} runs {a} before receiving its input ({Action(st, RECV_F, k)})"
    if a.kind in (B, I):
        if not has(st, F):
            return f"rank {r} runs {a} before its forward {Action(st, F, k)}"
        if st < last and s.rank_of(st + 1) == r and not has(st + 1, B, I):
            return f"rank {r} runs {a} before the backward of stage {st + 1}, which feeds it"
        if st < last and s.rank_of(st + 1) != r and not has(st, RECV_B):
            return f"rank {r} runs {a} before receiving its gradient ({Action(st, RECV_B, k)})"
    if a.kind == W and not has(st, I):
        return f"rank {r} runs {a} before its input gradient {Action(st, I, k)}"
    if a.kind == SEND_F and not has(st, F):
        return f"rank {r} runs {a} before computing it ({Action(st, F, k)})"
    if a.kind == SEND_B and not has(st, B, I):
        return f"rank {r} runs {a} before computing it ({Action(st, I if has(st, W) else B, k)})"
    if a.kind in (AR, OPT):
        m = s.num_microbatches
        grads = sum(Action(st, kd, j) in done for j in range(m) for kd in (B, W))
        if grads < m:
            return f"rank {r} runs {a} before all {m} gradients of stage {st} are in ({grads} are)"
        if a.kind == OPT and any(x == Action(st, AR) for x in s.ranks[r]) \
                and Action(st, AR) not in done:
            return f"rank {r} runs {a} before {Action(st, AR)}"
    return None


def _check_computes(s: Schedule) -> None:
    """No rank computes an action twice, or both B and I of one micro-batch."""
    _check_order(s, computes=True)


def _check_order(s: Schedule, computes: bool = False) -> None:
    for r, row in enumerate(s.ranks):
        done: set[Action] = set()
        for i, a in enumerate(row):
            if computes and a.kind not in (F, B, I, W):
                continue
            if a in done:
                what = "micro-batch" if a.mb is not None else "action"
                raise ScheduleError(s, f"rank {r} runs {a} twice (duplicated {what})",
                                    [(r, row.index(a)), (r, i)])
            if a.kind == B and Action(a.stage, I, a.mb) in done or \
                    a.kind == I and Action(a.stage, B, a.mb) in done:
                raise ScheduleError(s, f"rank {r} runs both B and I for stage {a.stage} "
                                    f"micro-batch {a.mb}", [(r, i)])
            if a.kind == B and Action(a.stage, W, a.mb) in done or \
                    a.kind == W and Action(a.stage, B, a.mb) in done:
                # (was "0W0 before its input gradient 0I0", naming an action never written)
                raise ScheduleError(s, f"rank {r} runs both B and W for stage {a.stage} "
                                    f"micro-batch {a.mb} (B computes the weight gradient too)",
                                    [(r, i)])
            if computes:
                done.add(a)
                continue
            why = _dependency(s, r, a, done)
            if why:
                raise ScheduleError(s, why, [(r, i)])
            done.add(a)


def _check_coverage(s: Schedule) -> None:
    seen = {a for row in s.ranks for a in row}
    for st in range(s.num_stages):
        r = s.rank_of(st)
        for k in range(s.num_microbatches):
            missing = None
            if Action(st, F, k) not in seen:
                missing = Action(st, F, k)
            elif Action(st, B, k) not in seen and Action(st, I, k) not in seen:
                missing = Action(st, B, k)
            elif Action(st, I, k) in seen and Action(st, W, k) not in seen:
                missing = Action(st, W, k)
            if missing is not None:
                raise ScheduleError(s, f"micro-batch {k} is missing from stage {st}: "
                                    f"rank {r} never runs {missing}",
                                    notes={r: f"missing {missing}"})


def _check_steps(s: Schedule) -> None:
    """OPT for every stage or for none: the executor runs ``optimizer(stage)``
    at OPT actions only, so a stage without one never had its weights stepped
    (its gradients left for nobody), trained wrong without a word."""
    stepped = {a.stage for row in s.ranks for a in row if a.kind == OPT}
    for st in range(s.num_stages):
        if stepped and st not in stepped:
            r, have = s.rank_of(st), ", ".join(map(str, sorted(stepped)))
            raise ScheduleError(s, f"rank {r} never runs {Action(st, OPT)}, but stage(s) "
                                f"{have} have OPT actions: stage {st}'s weights would never "
                                f"be stepped (engine.with_optimizer_step adds one per stage)",
                                notes={r: f"missing {Action(st, OPT)}"})


def _check_matching(s: Schedule) -> None:
    sends: Counter = Counter()
    recvs: Counter = Counter()
    where: dict[tuple, tuple[int, int]] = {}
    for r, row in enumerate(s.ranks):
        for i, a in enumerate(row):
            if a.kind in (SEND_F, SEND_B):
                sends[message_key(a)] += 1
                where[("s",) + message_key(a)] = (r, i)
            elif a.kind in (RECV_F, RECV_B):
                recvs[message_key(a)] += 1
                where[("r",) + message_key(a)] = (r, i)
    for key in sorted(set(sends) | set(recvs)):
        kind, src, dst, k = key
        if sends[key] > recvs[key]:
            pos = where[("s",) + key]
            peer = Action(dst, RECV_F if kind == F else RECV_B, k)
            raise ScheduleError(s, f"unmatched send: {s.ranks[pos[0]][pos[1]]} has no "
                                f"{peer} on rank {s.rank_of(dst)}", [pos])
        if recvs[key] > sends[key]:
            pos = where[("r",) + key]
            peer = Action(src, SEND_F if kind == F else SEND_B, k)
            raise ScheduleError(s, f"unmatched receive: {s.ranks[pos[0]][pos[1]]} has no "
                                f"{peer} on rank {s.rank_of(src)}", [pos])


def _check_deadlock(run: Replay) -> None:
    s = run.schedule
    if run.stuck:
        waits = ", ".join(f"rank {r} at {s.ranks[r][i]}" for r, i in sorted(run.stuck.items()))
        raise ScheduleError(s, f"deadlock: every unfinished rank waits on a receive "
                            f"that can never arrive ({waits})", sorted(run.stuck.items()))


def verified_replay(sched: Schedule, costs: Mapping[str, Cost] | None = None,
                    cores: float | None = None, load: float = 0.0) -> Replay:
    """Check ``sched`` as ``verify`` does and return the replay of the lowered
    schedule with ``costs``: the one walk that proves no rank deadlocks also
    times every action, so the simulator walks the table only once."""
    if not sched.is_lowered:
        # on the actions as written: checked lowered, a stage 1 forward of a micro-batch
        # out of range was blamed on the receive lowering put before it ("1RECV_F7")
        _check_placement(sched)
        _check_computes(sched)
    s = lower(sched)
    _check_placement(s)
    # what a rank computes (twice, both B and I, never) before whether its messages pair
    # up: lowering derives the messages from the compute, so a duplicated or missing
    # action would show first as a send or receive without its peer, on another rank
    _check_computes(s)
    _check_coverage(s)
    try:
        _check_matching(s)
        _check_order(s)
        _check_steps(s)
        run = replay(s, costs, cores, load)
        _check_deadlock(run)
    except ScheduleError as e:
        if sched.is_lowered and any(w in e.reason for w in _MESSAGES):
            raise ScheduleError(s, e.reason + _by_hand(sched), e.marks) from None
        raise
    return run


_MESSAGES = ("unmatched send", "unmatched receive", "before receiving", "deadlock")
"""What a ScheduleError says of a message its author may have left to lowering."""


def _by_hand(sched: Schedule) -> str:
    """Why a schedule that names a send or receive has no others: lowering
    adds them only to one that names none (an author who placed one send
    earlier got "unmatched send" alone, the others never added, no word why)."""
    r, a = next((r, a) for r, row in enumerate(sched.ranks) for a in row if a.is_comm)
    return (f" (the schedule names its own sends and receives, {a} on rank {r} the first, "
            f"so none are added for it: name every one, or none and engine.lower() places "
            f"them all; engine.strip_comm(schedule) drops them)")


def verify(sched: Schedule) -> Schedule:
    """Check ``sched`` (lowered first when compute-only); return the lowered
    schedule, or raise ScheduleError naming and marking the first problem."""
    return verified_replay(sched).schedule
