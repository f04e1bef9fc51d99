"""Lowering passes: pure rewrites of a Schedule.

``lower`` adds the communication a compute-only schedule implies. A send
goes right after the action that produces the data (the executor sends
asynchronously, so it costs the sender nothing); a receive goes right
before the action that consumes it (the executor posts every receive at
the start of the step and waits for it there)::

    rank 0:  0F0 0SEND_F0 0F1 0SEND_F1 ...          0RECV_B0 0B0
    rank 1:  1RECV_F0 1F0 1B0 1SEND_B0 ...

``with_grad_sync`` adds one ``sAR`` per stage after the last action that
adds to that stage's gradients, so the all-reduce of a late stage overlaps
the backward passes of the earlier stages on the same rank.
``with_optimizer_step`` appends ``sOPT`` for every stage of every rank.
Both leave a stage that has its own as it is.
"""
from __future__ import annotations

from .ir import AR, OPT, B, F, I, W, RECV_B, RECV_F, SEND_B, SEND_F, Action, Schedule

__all__ = ["lower", "with_grad_sync", "with_optimizer_step", "strip_comm"]


def strip_comm(sched: Schedule) -> Schedule:
    """The schedule without its sends and receives."""
    return sched.replace([a for a in row if not a.is_comm] for row in sched.ranks)


def lower(sched: Schedule) -> Schedule:
    """Insert SEND/RECV around every action whose data crosses ranks.

    A schedule that already names any send or receive is returned as is:
    its author placed the communication and the verifier will judge it."""
    if sched.is_lowered:
        return sched
    last = sched.num_stages - 1
    out = []
    for r, row in enumerate(sched.ranks):
        prog: list[Action] = []
        for a in row:
            s = a.stage
            if a.kind == F and s > 0 and s <= last and sched.rank_of(s - 1) != r:
                prog.append(Action(s, RECV_F, a.mb))
            if a.kind in (B, I) and s < last and sched.rank_of(s + 1) != r:
                prog.append(Action(s, RECV_B, a.mb))
            prog.append(a)
            if a.kind == F and s < last and sched.rank_of(s + 1) != r:
                prog.append(Action(s, SEND_F, a.mb))
            if a.kind in (B, I) and 0 < s <= last and sched.rank_of(s - 1) != r:
                prog.append(Action(s, SEND_B, a.mb))
        out.append(prog)
    return sched.replace(out)


def with_grad_sync(sched: Schedule) -> Schedule:
    """Add ``sAR`` after the last B or W of each stage that has none
    (idempotent). Per stage, not per rank: a rank whose list names the AR
    of one of its stages only would leave the others' gradients unaveraged,
    the dp replicas drifting apart without a word."""
    out = []
    for row in sched.ranks:
        synced = {a.stage for a in row if a.kind == AR}
        last_grad = {a.stage: i for i, a in enumerate(row)
                     if a.kind in (B, W) and a.stage not in synced}
        after: dict[int, list[Action]] = {}
        for stage, i in last_grad.items():
            while i + 1 < len(row) and row[i + 1].kind == SEND_B:
                i += 1
            after.setdefault(i, []).append(Action(stage, AR))
        prog: list[Action] = []
        for i, a in enumerate(row):
            prog.append(a)
            prog.extend(after.get(i, []))
        out.append(prog)
    return sched.replace(out)


def with_optimizer_step(sched: Schedule) -> Schedule:
    """Append ``sOPT`` for each stage of each rank that has none
    (idempotent; per stage, as ``with_grad_sync``)."""
    out = []
    for r, row in enumerate(sched.ranks):
        stepped = {a.stage for a in row if a.kind == OPT}
        out.append(list(row) + [Action(s, OPT) for s in sched.stages_of(r)
                                if s not in stepped])
    return sched.replace(out)
