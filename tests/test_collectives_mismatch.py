"""Ranks that disagree: a different op, dtype, shape, collective or root, or
bad arguments on one rank. Every rank must raise a clear error (no hang, no
silent garbage), and the group must stay usable afterwards."""
from __future__ import annotations

import os
import re
from typing import Any, Callable

import numpy as np
import pytest

import collectives as C
import mesh

N = 4


def _odd(rank: int, a: Any, b: Any, who: int = 1) -> Any:
    return b if rank == who else a


BAD_ALGO = ("all_reduce", "broadcast", "all_gather", "reduce_scatter")


def _bad_algo(g: Any) -> None:
    """A bad MESH_COLL_ALGO (every rank's) met by each collective's first
    call: one ValueError of what each raised, joined by ' | '."""
    os.environ["MESH_COLL_ALGO"] = "reduce=hier"
    said = []
    try:
        for name in BAD_ALGO:
            try:
                getattr(C, name)(g, np.ones(2 * g.size))
            except ValueError as e:
                said.append(str(e))
    finally:
        del os.environ["MESH_COLL_ALGO"]
    raise ValueError(" | ".join(said))


def _fails_on_rank_1(g: Any, size: int = 3) -> Any:
    """A user op whose function raises on rank 1 only (after rank 1 has
    sent or posted its operand: the others could finish without it)."""
    def fn(a: Any, b: Any) -> Any:
        if g.rank == 1:
            raise ValueError("the op failed on purpose")
        return a + b
    return C.all_reduce(g, np.ones(size), op=C.Op(fn, name="fails on rank 1"))


CASES: dict[str, Callable[[Any], Any]] = {
    "op": lambda g: C.all_reduce(g, np.ones(4, np.float32), op=_odd(g.rank, "sum", "max")),
    "dtype": lambda g: C.all_reduce(g, np.ones(4, _odd(g.rank, np.float32, np.float64, 2))),
    "shape": lambda g: C.all_reduce(g, np.ones(_odd(g.rank, 4, 5, 0), np.float32)),
    "ring shape": lambda g: C.all_reduce(g, np.ones(_odd(g.rank, 300_000, 300_001), np.float32),
                                         algorithm="ring"),
    "size picks another algorithm": lambda g: C.all_reduce(
        g, np.ones(_odd(g.rank, 4, 1 << 20), np.float32)),
    "collective": lambda g: (C.broadcast(g, np.ones(4, np.float32)) if g.rank == 1
                             else C.all_reduce(g, np.ones(4, np.float32))),
    "root": lambda g: C.broadcast(g, np.ones(4), root=_odd(g.rank, 0, 1, 0)),
    "gather root": lambda g: C.gather(g, np.ones(2), root=_odd(g.rank, 0, 2)),
    "gather root seen late": lambda g: C.gather(g, np.ones(2), root=0 if g.rank == 0 else 3),
    "reduce_scatter vs all_gather": lambda g: (
        C.all_gather(g, np.ones(4)) if g.rank == 2 else C.reduce_scatter(g, np.ones(4))),
    "scan vs exscan": lambda g: (C.exscan(g, np.ones(3)) if g.rank == 2
                                 else C.scan(g, np.ones(3))),
    "scan size picks another path": lambda g: C.scan(g, np.ones(_odd(g.rank, 3, 20_000))),
    "scatter_object of a short list": lambda g: C.scatter_object(
        g, [1, 2] if g.rank == 1 else None, root=1),
    "all_to_all_object of a short list": lambda g: C.all_to_all_object(
        g, [1, 2] if g.rank == 1 else list(range(g.size))),
    "bad op on one rank": lambda g: C.all_reduce(g, np.ones(3, np.float32),
                                                 op=_odd(g.rank, "sum", "band")),
    "bad MESH_COLL_ALGO": _bad_algo,
    "user op vs sum": lambda g: C.all_reduce(g, np.ones(4, np.float32),
                                             op=_odd(g.rank, "sum", C.Op(np.add))),
    "user op vs sum, scan": lambda g: C.scan(g, np.ones(4), op=_odd(g.rank, C.Op(np.add), "sum")),
    "two user ops": lambda g: C.reduce_scatter(g, np.ones(8), op=C.Op(
        _odd(g.rank, lambda a, b: a + b, lambda a, b: a * b))),
    "user op raises on one rank": _fails_on_rank_1,
    "user op raises on one rank, large": lambda g: _fails_on_rank_1(g, 20_000),
    "user op returns the wrong shape": lambda g: C.all_reduce(
        g, np.ones(3), op=C.Op(lambda a, b: (a + b)[:2], name="short")),
    "persistent shape": lambda g: _started(C.all_reduce_init(
        g, np.ones(_odd(g.rank, 4, 5, 0), np.float32))),
    "persistent op": lambda g: _started(C.all_reduce_init(
        g, np.ones(4, np.float32), op=_odd(g.rank, "sum", "max"))),
    "persistent bad op on one rank": lambda g: _started(C.all_reduce_init(
        g, np.ones(3, np.float32), op=_odd(g.rank, "sum", "band"))),
}


def _started(p: Any) -> Any:
    """A persistent collective's first start, and its wait."""
    p.start()
    return p.wait()


LATE = {"root", "gather root", "gather root seen late", "scan vs exscan",
        "scan size picks another path", "user op vs sum", "user op vs sum, scan", "two user ops"}


def _heard_from_all(world: Any) -> None:
    """A message to and from every other rank (not a collective: the group's
    calls stay as they were). A rank's abort of a call is sent before it
    leaves the call, so it is ahead of that rank's message here on the same
    connection: every rank holds every abort of the case once this returns,
    however slow the machine (where a pause only gives the news time)."""
    sent = [world.isend(None, r, tag=11) for r in range(world.size) if r != world.rank]
    for r in range(world.size):
        if r != world.rank:
            world.recv(r, tag=11, timeout=60.0)
    for req in sent:
        req.wait()


def run_cases(world: Any) -> dict[str, list[str]]:
    """Per case, per rank: what the call raised, then what the next calls
    raised (a rank that finished before hearing of the mismatch raises it in
    one of the group's next calls: once it has heard from every rank, the
    first of them)."""
    out: dict[str, list[str]] = {}
    for name, fn in CASES.items():
        texts = []
        for call in [fn] + [C.barrier] * 3:
            try:
                call(world)
                texts.append("ok")
            except (mesh.MeshError, TypeError, ValueError) as e:
                texts.append(f"{type(e).__name__}: {e}")
            if call is fn and name in LATE:
                _heard_from_all(world)
        out[name] = texts
        a = np.full(3, world.rank, np.int64)
        C.all_reduce(world, a)
        assert (a == sum(range(world.size))).all(), f"group unusable after case {name!r}"
    return out


@pytest.fixture(scope="module", params=["0", "1"], ids=["sockets", "same-host"])
def outcomes(request: Any) -> list[dict[str, list[str]]]:
    return mesh.spawn(run_cases, N, timeout=100, env={"MESH_CMA": request.param})


def _texts(outcomes: list[dict[str, list[str]]], case: str) -> list[str]:
    """What each rank's call raised."""
    return [o[case][0] for o in outcomes]


@pytest.mark.parametrize("case,needles", [
    ("op", ["op=sum", "op=max"]),
    ("dtype", ["dtype=float32", "dtype=float64"]),
    ("shape", ["shape=[4]", "shape=[5]"]),
    ("ring shape", ["shape=[300000]", "shape=[300001]"]),
    ("size picks another algorithm", ["alg=rd", "alg=ring"]),
    ("collective", ["broadcast(", "all_reduce("]),
    ("reduce_scatter vs all_gather", ["all_gather(", "reduce_scatter("]),
    ("persistent shape", ["shape=[4]", "shape=[5]"]),      # (an all_reduce_init's start)
    ("persistent op", ["op=sum", "op=max"]),
])
def test_every_rank_raises_a_mismatch_naming_both_calls(outcomes: list, case: str,
                                                       needles: list[str]) -> None:
    for rank, text in enumerate(_texts(outcomes, case)):
        assert text.startswith("MismatchError"), f"rank {rank}: {text}"
        assert re.search(r"collective mismatch on group world at call #\d+: ", text), \
            f"rank {rank}: {text}"
        assert all(s in text for s in needles), f"rank {rank}: {text}"
        assert "rank" in text and "called" in text


@pytest.mark.parametrize("case", ["root", "gather root", "gather root seen late"])
def test_a_root_mismatch_never_hangs_and_every_rank_hears_of_it(outcomes: list,
                                                               case: str) -> None:
    """Ranks given different roots may all wait for a message nobody sends;
    the fingerprint ring wakes them. A gather leaf that sent its row and
    finished hears of it in one of the group's next calls."""
    for rank, o in enumerate(outcomes):
        texts = o[case]
        assert any("MismatchError" in t and "root=" in t for t in texts), f"rank {rank}: {texts}"
        assert texts[-1] == "ok", f"rank {rank}: the group did not recover: {texts}"


@pytest.mark.parametrize("case,needles", [("scan vs exscan", ["exscan(", " scan("]),
                                          ("scan size picks another path",
                                           ["shape=[3]", "shape=[20000]"])])
def test_scan_beside_exscan_is_a_mismatch_every_rank_hears_of(outcomes: list, case: str,
                                                              needles: list[str]) -> None:
    """A rank of a scan that only sends (rank 0, and rank 1 here) may finish
    before the ranks that receive see the mismatch; it hears of it in the
    group's next calls, as a gather leaf does. A rank whose array is too
    large for the board's small scan (the others' are not) goes over
    sockets: the board's ranks see its fingerprint, none waits it out."""
    for rank, o in enumerate(outcomes):
        texts = o[case]
        assert any("MismatchError" in t and all(s in t for s in needles) for t in texts), \
            f"rank {rank}: {texts}"
        assert texts[-1] == "ok", f"rank {rank}: the group did not recover: {texts}"


@pytest.mark.parametrize("case,needles", [
    ("user op vs sum", ["op=sum", "op=Op('numpy.add')"]),
    ("user op vs sum, scan", ["op=sum", "op=Op('numpy.add')"]),
    ("two user ops", ["reduce_scatter(", "<lambda>' code "]),
])
def test_a_user_op_beside_another_op_is_a_mismatch_every_rank_hears_of(
        outcomes: list, case: str, needles: list[str]) -> None:
    """A user op (collectives.Op) goes over sockets where its peers' builtin
    op may take the board: its fingerprint is posted there too. Two
    lambdas differ by their code's digest. (A sum scan's rank 0 over
    sockets needs nothing from the others: it hears of it in a next call.)"""
    for rank, o in enumerate(outcomes):
        texts = o[case]
        assert any("MismatchError" in t and all(s in t for s in needles) for t in texts), \
            f"rank {rank}: {texts}"
        assert texts[-1] == "ok", f"rank {rank}: the group did not recover: {texts}"


def test_a_user_op_failing_on_one_rank_fails_the_call_on_every_rank(outcomes: list) -> None:
    """Rank 1's function raises after rank 1 has sent its operand: the
    others, whose results no longer need it, raise too (the call ends in
    a barrier), naming rank 1 and its error; rank 1 raises its own."""
    for case in ("user op raises on one rank", "user op raises on one rank, large"):
        texts = _texts(outcomes, case)      # (large: past the board's payload, read across)
        assert texts[1] == "ValueError: the op failed on purpose", texts[1]
        for rank in (0, 2, 3):
            assert texts[rank].startswith("MeshError") and "rank 1 of group world: " \
                "all_reduce #" in texts[rank] and "ValueError: the op failed on purpose" \
                in texts[rank], texts[rank]
    for rank, text in enumerate(_texts(outcomes, "user op returns the wrong shape")):
        # (its own, or a peer's first: every rank's function gives the wrong shape)
        assert re.match(r"(TypeError|MeshError): rank \d: all_reduce #\d+ on group world", text) \
            and "the user op Op('short') returned float64 of shape (2,) for operands of " \
                "float64 of shape (3,)" in text, text


@pytest.mark.parametrize("case", ["bad op on one rank", "persistent bad op on one rank"])
def test_bad_arguments_fail_the_caller_and_abort_the_others(outcomes: list, case: str) -> None:
    """(An all_reduce_init's: at its first start, on every rank.)"""
    texts = _texts(outcomes, case)
    assert texts[1].startswith("TypeError: rank 1: all_reduce on group world: op 'band' needs "
                               "an integer"), texts[1]
    for rank in (0, 2):
        assert texts[rank].startswith("MeshError"), texts[rank]
        assert "rank 1" in texts[rank] and "all_reduce" in texts[rank]
        assert "op 'band' needs an integer" in texts[rank]


def test_a_bad_mesh_coll_algo_names_the_rank_and_the_call(outcomes: list) -> None:
    """all_reduce, broadcast, all_gather and reduce_scatter (the calls that
    fail their two-level phases too) raised it bare, no rank, no call."""
    for rank, o in enumerate(outcomes):
        text = o["bad MESH_COLL_ALGO"][0]
        said = text.removeprefix("ValueError: ").split(" | ")
        assert len(said) == len(BAD_ALGO), text
        for name, one in zip(BAD_ALGO, said):
            assert one.startswith(f"rank {rank}: {name} on group world: MESH_COLL_ALGO="
                                  f"'reduce=hier': 'reduce=hier': reduce has no algorithm "
                                  f"'hier'"), one
        assert o["bad MESH_COLL_ALGO"][1:] == ["ok"] * 3, o


def test_a_scatter_objects_short_list_fails_the_root_and_aborts_the_others(
        outcomes: list) -> None:
    texts = _texts(outcomes, "scatter_object of a short list")
    assert texts[1] == ("ValueError: rank 1: scatter_object on group world needs a list of 4 "
                        "objects (one a rank) on the root, got a list of 2"), texts[1]
    for rank in (0, 2, 3):
        assert texts[rank].startswith("MeshError") and "rank 1" in texts[rank] and \
            "needs a list of 4 objects" in texts[rank], texts[rank]


def test_an_all_to_all_objects_short_list_fails_its_rank_and_aborts_the_others(
        outcomes: list) -> None:
    texts = _texts(outcomes, "all_to_all_object of a short list")
    assert texts[1] == ("ValueError: rank 1: all_to_all_object on group world needs a list of 4 "
                        "objects (one a rank), got a list of 2"), texts[1]
    for rank in (0, 2, 3):
        assert texts[rank].startswith("MeshError") and "rank 1" in texts[rank] and \
            "needs a list of 4 objects" in texts[rank], texts[rank]
    for o in outcomes:
        assert o["all_to_all_object of a short list"][1:] == ["ok"] * 3, o


def _sub_group_mismatch(world: Any) -> list[str]:
    g = world.group([1, 2])
    if g is None:
        return []
    C.all_reduce(g, np.ones(8), timeout=10)     # (the boards are set up: the next call's way)
    seen = []
    try:
        C.all_reduce(g, np.ones(7 if world.rank == 1 else 8), timeout=10)
    except mesh.MismatchError as e:
        seen.append(str(e))
    for root in (3, 2):
        with pytest.raises(ValueError) as bad:
            C.broadcast(g, np.ones(2), root=root)
        seen.append(str(bad.value))
    # the ranks named inside a message: group ranks, their world ranks beside them
    calls = [lambda: C.scatter(g, np.ones((2, 3)) if g.rank == 0 else None, dtype=np.int32),
             lambda: C.all_to_all_v(g, np.ones((2, 1)), [1, 1], [2, 0] if g.rank == 0
                                    else [1, 1]),
             lambda: C.all_to_all_v(g, np.ones((2, 1)), [1, -1] if g.rank == 1 else [1, 1]),
             lambda: C.broadcast_state(g, {"w": np.ones(2 + g.rank)}),
             lambda: C.all_reduce_grads(g, [np.ones((2, 2)) if g.rank == 0 else np.ones(4)])]
    for call in calls:
        try:
            call()
            seen.append("ok")
        except (mesh.MeshError, ValueError) as e:
            seen.append(str(e))
    return seen


@pytest.mark.timeout(90)
def test_a_sub_groups_errors_start_with_the_world_rank() -> None:
    """On the board (a group's calls after its first) as through the inbox,
    and in the argument checks: 'rank <world rank>: ...', the group's own
    numbers beside the world's; a group rank inside the message has its
    world rank beside it (the scatter's row, all_to_all_v's counts,
    broadcast_state's root and the gradients' check named the group's ranks
    alone)."""
    out = mesh.spawn(_sub_group_mismatch, 3, timeout=60)
    assert out[0] == []
    for r in (1, 2):
        mismatch, bad_root, world_root, row, own, counts, state, grads = out[r]
        other = 3 - r
        assert mismatch.startswith(f"rank {r}: collective mismatch on group world/[1, 2]"), \
            mismatch
        assert f"but rank {other} called" in mismatch and "of the group)" in mismatch
        assert bad_root.startswith(f"rank {r}: broadcast on group world/[1, 2]: root 3"), bad_root
        assert world_root.endswith("(0..1; a group numbers its own ranks: world rank 2 is its "
                                   "rank 1)"), world_root
        assert "rank 1 (world rank 2) wants its row as int32 (its tensor's dtype, or dtype=) " \
               "but root 0 (world rank 1) scatters float64" in row, row
        assert "rank 0 (world rank 1) expects 2 rows from rank 0 (itself), which sends 1" \
            in own, own
        if r == 1:
            assert counts.endswith("the send_counts of rank 1 (world rank 2) are not valid "
                                   "(see their error)"), counts
        assert state.endswith("the state passed differs from the root's (rank 0 (world rank "
                              "1)'s): rank 1 (world rank 2)'s state['w'] has shape (3,), the "
                              "root's (2,)"), state
        assert "gradient 0 is float64(2, 2) on rank 0 (world rank 1) and float64(4,) on rank 1 " \
               "(world rank 2)" in grads, grads


def _rd_across_the_board_limit(world: Any, big: int) -> str:
    C.all_reduce(world, np.ones(4, np.float32))     # (the boards are set up: the next call's way)
    n = 1 << 20 if world.rank == big else 4         # 4 MiB: past the board, over sockets
    try:
        C.all_reduce(world, np.ones(n, np.float32), algorithm="rd", timeout=10)
        return "ok"
    except mesh.MeshError as e:
        return f"{type(e).__name__}: {e}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("big", [0, 1, 2])
def test_rd_with_one_rank_past_the_board_raises_a_mismatch_at_once(big: int) -> None:
    """A forced recursive-doubling all_reduce takes the board up to its
    payload (64 KiB) and sockets past it, chosen by each rank's own size: a
    rank whose array is past it talks over sockets while the others wait on
    their boards. At 3 ranks rank 1 first receives (rank 0's fold) and sends
    nothing: nobody heard a fingerprint and all waited for the timeout, each
    blaming rank 1 (or rank 0), not the mismatch. Its fingerprint goes on its
    board too, so every rank raises the mismatch at once, and returns at
    once: rank 0, still sending to rank 1 as rank 1 closes its mesh, raises
    rank 1's abort, the mismatch, not that rank 1 is gone."""
    out = mesh.spawn(_rd_across_the_board_limit, 3, big, timeout=50)
    for rank, text in enumerate(out):
        assert text.startswith("MismatchError") and "shape=[1048576]" in text, \
            f"rank {rank}: {text}"
