"""Collective timeouts: every collective takes ``timeout=`` (a deadline for
the whole call); a rank that never calls makes the others raise
MeshTimeoutError naming the collective, its number and group, and the
collective is aborted everywhere: nothing keeps running (no stall reports
after the raise), the late rank raises too, and the next collective works.
Also: error texts of sub-groups name both numberings, and a None
communicator (a non-member's ``world.group()``) is a clear error."""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from datetime import timedelta
from typing import Any

import numpy as np
import pytest

import collectives as C
import mesh

LATE = 2
QUIET = {"MESH_STALL_WARN": "0.1", "MESH_HEARTBEAT": "0.1"}


def _attempt(fn: Any) -> list:
    t = time.monotonic()
    try:
        fn()
        return ["ok", "", 0.0]
    except mesh.MeshError as e:
        return [type(e).__name__, str(e), time.monotonic() - t]


def _quiet_after(world: Any) -> int:
    """Stall reports logged in the half second (five MESH_STALL_WARN
    periods) after a collective raised: none, if nothing of it is still
    running."""
    before = world._t.live.stalls
    time.sleep(0.5)
    return world._t.live.stalls - before


def _told_of_aborts(world: Any, count: int) -> None:
    """Wait until ``count`` collective calls of the group were aborted here:
    a late rank then comes after the abort of the call it is late to, as a
    fixed sleep past the others' deadline only made likely under load."""
    deadline = time.monotonic() + 30
    while len(world._t.inbox.aborted) < count:
        assert time.monotonic() < deadline, f"rank {world.rank}: no abort of call {count} came"
        time.sleep(0.01)


def never_calls(world: Any, count: int) -> dict:
    """Rank 2 comes late to two all_reduces: once rank 0's abort of the
    call has reached it (a fixed 2 s sleep had to outlast rank 0's timeout
    and its abort's way under any load). First: rank 0 gives the blocking
    call a 0.5 s timeout, rank 1 none (so only rank 0's abort can stop it).
    Second: rank 0 waits for an async call's Work with a 0.5 s timeout,
    rank 1 makes the blocking call without one. Rank 2 arrives after the
    abort, as the others spend their quiet half second."""
    seen: dict = {}
    C.barrier(world)
    for i, case in enumerate(("blocking", "async")):
        a = np.ones(count, np.float32)
        seq = world.collective_channel().seq + 1
        stalls = world._t.live.stalls
        if world.rank == LATE:
            _told_of_aborts(world, i + 1)
            seen[case] = _attempt(lambda: C.all_reduce(world, a)) + [seq, 0, 0]
        else:
            if world.rank == 0 and case == "async":
                work = C.all_reduce(world, a, async_op=True)
                got = _attempt(lambda: work.wait(timeout=0.5))
                deadline = time.monotonic() + 1.0
                while not work.done() and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert work.done(), "the Work that timed out is still running"
            else:
                timeout = 0.5 if world.rank == 0 else None
                got = _attempt(lambda: C.all_reduce(world, a, timeout=timeout))
            waited = world._t.live.stalls - stalls
            seen[case] = got + [seq, waited, _quiet_after(world)]
        b = np.full(count, world.rank + 1.0, np.float32)
        C.all_reduce(world, b, timeout=30)
        assert b[0] == 6 and b[-1] == 6, "the collective after the aborted one is wrong"
    return seen


@pytest.mark.parametrize("count", [3, 1 << 17], ids=["small", "large"])
@pytest.mark.parametrize("env", [{"MESH_CMA": "0"}, {}], ids=["sockets", "same-host"])
def test_a_rank_that_never_calls_makes_every_member_raise_and_stop(env: dict,
                                                                    count: int) -> None:
    seen = mesh.spawn(never_calls, 3, count, timeout=60, env=dict(env, **QUIET))
    for case in ("blocking", "async"):
        for rank in range(3):
            kind, text, took, seq, waited, after = seen[rank][case]
            what = f"{case}, rank {rank}: {seen[rank][case]}"
            assert kind == "MeshTimeoutError", what
            assert f"all_reduce #{seq} on group world" in text, what
            assert took < 5, what
            assert after == 0, f"stall reports after the collective raised: {what}"
            if rank == 1:
                # rank 1 had no timeout of its own: rank 0's abort stopped it
                assert "rank 0 of group world" in text and "timed out" in text, what
                assert waited > 0, f"no stall report while waiting: the check is void: {what}"
            if rank == 0 and case == "blocking":
                assert text.startswith(f"rank 0: all_reduce #{seq} on group world timed out "
                                       f"after 0.5s"), what


def every_collective_takes_a_timeout(world: Any) -> list:
    n, r = world.size, world.rank
    a = np.arange(2 * n, dtype=np.float64)
    t = {"timeout": 30}
    C.all_reduce(world, a.copy(), **t)
    C.broadcast(world, a.copy(), root=0, **t)
    C.reduce(world, a.copy(), root=0, **t)
    C.all_gather(world, a, **t)
    C.reduce_scatter(world, a, **t)
    C.gather(world, a, root=0, **t)
    C.scatter(world, np.zeros((n, 2)) if r == 0 else None, root=0, **t)
    C.all_to_all(world, a, **t)
    C.barrier(world, **t)
    C.broadcast_object(world, "x", root=0, **t)
    C.all_gather_object(world, r, **t)
    C.all_reduce(world, a.copy(), async_op=True, **t).wait()
    # Work.wait's own timeout is checked as the calls' are, the call left running
    # (-1 aborted it on every member, "timed out after -1s"; math.inf raised
    # OverflowError, a timedelta a TypeError naming nothing)
    work = C.all_reduce(world, np.ones(2), async_op=True, **t)
    for bad in (-1, float("nan"), True, "5", timedelta(seconds=5)):
        with pytest.raises(ValueError, match=rf"^rank {r}: all_reduce #\d+ on group world: "
                                             r"Work.wait: timeout must be a number of seconds"):
            work.wait(bad)
    assert work.wait(math.inf).tolist() == [n, n]
    C.all_reduce_grads(world, [a.copy()], timeout=30)
    with pytest.raises(ValueError, match="timeout must be a number of seconds"):
        C.all_reduce(world, a.copy(), timeout=-1)
    # the bad timeout aborted that all_reduce on the peers too; this one works
    b = np.ones(3)
    C.all_reduce(world, b, timeout=30)
    return b.tolist()


def test_every_collective_takes_a_timeout() -> None:
    got = mesh.spawn(every_collective_takes_a_timeout, 2, timeout=60)
    assert got == [[2.0, 2.0, 2.0]] * 2


def lost_in_a_subgroup(world: Any, count: int, out: str) -> None:
    """World rank 2 (rank 1 of group [1, 2]) stops; world rank 1's error
    names the collective, the group and the lost rank in both numberings."""
    pids = C.all_gather_object(world, os.getpid())
    g = world.group([1, 2])
    if g is None:
        with open(out, "w") as f:
            f.write(world.recv(1))
        os.kill(pids[2], signal.SIGKILL)
        return
    a = np.ones(count, np.float32)
    C.all_reduce(g, a)
    if world.rank == 2:
        threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGSTOP)).start()
        time.sleep(60)
    try:
        while True:
            C.all_reduce(g, a, timeout=20)
    except mesh.MeshError as e:
        world.send(f"{type(e).__name__}: {e}", 0)


@pytest.mark.parametrize("env", [{"MESH_CMA": "0"}, {}], ids=["sockets", "same-host"])
def test_a_lost_peer_in_a_subgroup_is_named_in_both_numberings(tmp_path: Any,
                                                               env: dict) -> None:
    env = dict(env, MESH_PEER_TIMEOUT="1.5", MESH_HEARTBEAT="0.1")
    out = tmp_path / "error.txt"
    with pytest.raises(mesh.WorkerError) as err:
        mesh.spawn(lost_in_a_subgroup, 3, 1 << 16, str(out), timeout=60, env=env)
    assert err.value.rank == 2
    text = out.read_text()
    assert text.startswith("LostPeerError: rank 1: all_reduce #"), text
    assert "on group world/[1, 2]" in text, text
    assert "rank 1 (world rank 2)" in text or "peer world rank 2 is gone" in text, text


def none_communicator(world: Any) -> list[str]:
    g = world.group([0])
    texts = []
    if g is None:
        for call in (lambda: C.all_reduce(g, np.ones(2)), lambda: C.barrier(g),
                     lambda: C.all_gather(g, np.ones(2)), lambda: C.GradReducer(g, [np.ones(2)])):
            with pytest.raises(TypeError) as info:
                call()
            texts.append(str(info.value))
    return texts


def test_a_none_communicator_is_a_clear_error() -> None:
    _, texts = mesh.spawn(none_communicator, 2, timeout=60)
    assert [t.split(": ")[1] for t in texts] == ["all_reduce", "barrier", "all_gather",
                                                 "GradReducer"]
    assert all(t.startswith("rank 1: ") for t in texts), texts     # (the process's mesh)
    assert all("communicator is None" in t and "not members of the group" in t
               for t in texts), texts


def abandons_one(world: Any) -> list:
    """Rank 0 will not make the group's next call (a failed pipeline step's
    all-reduce) and abandons it: the others raise its kind at once, and the
    call after it is numbered alike everywhere and works."""
    if world.rank == 0:
        C.abandon(world, "step 4 failed here", mesh.AbortKind.TIMEOUT)
        got = ["abandoned", ""]
    else:
        got = _attempt(lambda: C.all_reduce(world, np.ones(4), timeout=30))[:2]
    b = np.ones(3)
    C.all_reduce(world, b, timeout=30)
    return got + [b.tolist()]


def test_abandon_fails_the_call_on_the_peers_and_keeps_the_numbering() -> None:
    got = mesh.spawn(abandons_one, 3, timeout=60)
    assert got[0] == ["abandoned", "", [3.0] * 3]
    for kind, text, b in got[1:]:
        assert kind == "MeshTimeoutError", text
        assert "all_reduce #1 on group world" in text and "rank 0" in text, text
        assert "step 4 failed here" in text, text
        assert b == [3.0] * 3


def _a_broadcast_times_out_on_the_others(world: Any) -> list:
    C.barrier(world)
    if world.rank == world.size - 1:
        _told_of_aborts(world, 1)   # (past the root's deadline: rank 1 has its row by
    #                                 then, the 2 s timeout's time to spare under load)
    got = [_attempt(lambda: C.broadcast(world, np.ones(3), root=0, timeout=2.0))[0]]
    for _ in range(3):
        b = np.ones(2)
        got.append(_attempt(lambda: C.all_reduce(world, b, timeout=30))[0])
        time.sleep(0.2)       # (the root's abort reaches rank 1 meanwhile)
    return got


def test_a_timeout_in_a_call_a_rank_finished_fails_none_of_its_next_calls() -> None:
    """On the sockets a broadcast's rank may have its data before the root
    times out waiting for a late one; the abort it gets later is not raised
    at whichever call it arrives before (every rank's, through its abort):
    the group's next collectives work, as the module says."""
    got = mesh.spawn(_a_broadcast_times_out_on_the_others, 3, timeout=60,
                     env={"MESH_CMA": "0"})
    assert got[1] == ["ok", "ok", "ok", "ok"], got
    for r in (0, 2):
        assert got[r] == ["MeshTimeoutError", "ok", "ok", "ok"], got


def _stopped_past_the_timeout(world: Any) -> list:
    """Rank 2 stops (SIGSTOP) before an all_reduce the others give a 0.3 s
    timeout, and rank 0 resumes it once it has timed out: rank 2's main
    thread may run before its transport reads the aborts, and the others'
    posts are still on their boards. First the short way (a repeated
    call), then the long way (the call's first), then a call that works."""
    pids = C.all_gather_object(world, os.getpid())
    got = []
    for shape in [(4,), (3,)]:
        a = np.ones(shape, np.float32)
        for _ in range(3 if shape == (4,) else 0):
            C.all_reduce(world, a)
        if world.rank == 2:
            os.kill(os.getpid(), signal.SIGSTOP)
            got.append(_attempt(lambda: C.all_reduce(world, a))[:2])
        else:
            got.append(_attempt(lambda: C.all_reduce(world, a, timeout=0.3))[:2])
            if world.rank == 0:
                os.kill(pids[2], signal.SIGCONT)
    b = np.full(2, world.rank + 1.0)
    C.all_reduce(world, b)
    return got + [b.tolist()]


def test_a_rank_stopped_past_the_timeout_raises_the_aborted_call_on_resume() -> None:
    """The stopped rank finished the aborted call out of its peers' posts
    (its result, and none of the others') until a failed call withdrew its
    post from the board (collectives.shm.round.Round.__exit__)."""
    got = mesh.spawn(_stopped_past_the_timeout, 3, timeout=60,
                     env={"MESH_PEER_TIMEOUT": "30"})
    for rank, res in enumerate(got):
        assert res[2] == [6.0, 6.0], (rank, res)
        for (kind, text), num in zip(res[:2], (5, 6)):
            assert kind == "MeshTimeoutError", (rank, res)
            assert f"all_reduce #{num} on group world" in text and "timed out" in text, \
                (rank, text)
