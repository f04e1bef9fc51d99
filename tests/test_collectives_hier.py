"""Hierarchical collectives (collectives.host.hier) on one machine, hosts
faked by rewriting the world's host table (world.hosts, what the
rendezvous gave: the board then runs only within each fake host): 4 ranks,
ranks 0 and 3 on host "a", 1 and 2 on "b" (not contiguous, so the mapping
of rows to hosts is exercised); leaders are ranks 0 and 1. The same over
real namespaces: tests/test_mesh_netns.py."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import numpy as np
import pytest

import collectives as C
import mesh
from collectives import lane, plan
from collectives.host import columns, hier
from collectives.host.ring import final_regions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.timeout(120)
HOSTS = "abba"
VICTIM = 1     # the leader of host "b"


def _fake_host(world: Any, hosts: str = HOSTS) -> None:
    """Before the first collective: the one table every layout is read from
    (where the job's MESH_HOST_ID lists every rank's, the table must be it)."""
    want = ["fake-" + h for h in hosts]
    if "," in os.environ.get("MESH_HOST_ID", ""):
        assert world.hosts == want, world.hosts
        return
    world.hosts[:] = want


def every_op(world: Any) -> list[str] | None:
    """With MESH_COLL_DEBUG=1: the lines it wrote (which paths the calls took)."""
    said = io.StringIO() if os.environ.get("MESH_COLL_DEBUG") else None
    was, sys.stderr = sys.stderr, said or sys.stderr
    try:
        _every_op(world)
    finally:
        sys.stderr = was
    return None if said is None else [line for line in said.getvalue().splitlines()
                                      if line.startswith("meshrun rank ")]


def _every_op(world: Any) -> None:
    _fake_host(world)
    n, r = world.size, world.rank
    fresh = world.group(list(range(n)))   # its first large all_reduce: three phases, not pipelined
    big = np.arange(200_001, dtype=np.float32) % 100 * (r + 1)
    assert np.array_equal(C.all_reduce(fresh, big.copy()), big / (r + 1) * 10)
    assert hier.topology_of(fresh) is not None
    # small, not forced: two levels too (from the table: no message asked it);
    # the first call in three phases, the next ones in one board round
    assert C.all_reduce(world, np.ones(5))[0] == n
    assert hier.topology_of(world) is not None
    for count in (5, 1000, 200_000):    # rd between leaders (inline, body payload) / columns
        a = np.arange(count, dtype=np.float64) * (r + 1)
        want = np.arange(count, dtype=np.float64) * sum(range(1, n + 1))
        got = C.all_reduce(world, a.copy())
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(C.all_reduce(world, a.astype(np.int64), op="max"),
                                      (np.arange(count) * n).astype(np.int64))
        np.testing.assert_allclose(C.all_reduce(world, a.copy(), op="avg"), want / n)
        assert np.array_equal(C.all_reduce(world, a.copy(), algorithm="ring"), want)
        assert np.array_equal(C.all_reduce(world, a.copy(), algorithm="hier"), want)
        rows = np.tile(a, (n, 1)) + np.arange(n)[:, None]
        mine = C.reduce_scatter(world, rows)
        np.testing.assert_array_equal(mine[0], want + n * r)
        ag = C.all_gather(world, a.astype(np.int32))
        assert ag.shape == (n, count)
        for p in range(n):
            assert np.array_equal(ag[p], (np.arange(count) * (p + 1)).astype(np.int32))
        for root in range(n):
            b = a.copy() if r == root else np.zeros(count)
            C.broadcast(world, b, root=root)
            assert np.array_equal(b, np.arange(count) * (root + 1)), (count, root)
            b = a.copy() if r == root else np.zeros(count)
            C.broadcast(world, b, root=root, algorithm="hier")
            assert np.array_equal(b, np.arange(count) * (root + 1)), (count, root)
    # once the boards were up: large in one round, small over the columns
    assert hier.stats["one_round"] >= 4 and hier.stats["small_columns"] >= 4, hier.stats
    topo = hier.topology_of(world)
    assert topo is not None and topo.hosts == ((0, 3), (1, 2)), topo
    assert (topo.leaders is not None) == (r in (0, 1))
    # one rank calls another op: every rank raises MismatchError
    with pytest.raises(mesh.MismatchError):
        C.all_reduce(world, np.ones(20_000), op="max" if r == 2 else "sum")
    assert C.all_reduce(world, np.ones(20_000))[0] == n       # the group still works
    # a user op (collectives.Op) runs flat over sockets, across the hosts, in rank
    # order (a 2x2 matrix product a row); given on one rank where the others sum
    # (in two levels), it is a mismatch on every rank
    mat = C.Op(lambda x, y: (x.reshape(-1, 2, 2) @ y.reshape(-1, 2, 2)).reshape(x.shape),
               name="mat")
    mats = [np.arange(16.0).reshape(4, 4) % (p + 2) - p for p in range(n)]
    prods = [mats[0]]
    for p in range(1, n):
        prods.append((prods[-1].reshape(-1, 2, 2) @ mats[p].reshape(-1, 2, 2)).reshape(4, 4))
    assert np.array_equal(C.all_reduce(world, mats[r].copy(), op=mat), prods[-1])
    a = mats[r].copy()
    C.reduce(world, a, root=2, op=mat)
    assert np.array_equal(a, prods[-1] if r == 2 else mats[r])
    assert np.array_equal(C.reduce_scatter(world, mats[r], op=mat), prods[-1][r:r + 1])
    assert np.array_equal(C.scan(world, mats[r], op=mat), prods[r])
    for k in (20_000, 5):       # (the small sum: the two levels' short way, learned above)
        with pytest.raises(mesh.MismatchError, match=r"op=Op\('add'\)"):
            C.all_reduce(world, np.ones(k), op=C.Op(np.add, name="add") if r == 1 else "sum")
        assert C.all_reduce(world, np.ones(k))[0] == n
        # reduce_scatter likewise (its two levels take no short way: every phase
        # watches the call's abort)
        with pytest.raises(mesh.MismatchError, match=r"op=Op\('add'\)"):
            C.reduce_scatter(world, np.ones((n, k)),
                             op=C.Op(np.add, name="add") if r == 1 else "sum")
        assert C.reduce_scatter(world, np.ones((n, k)))[0, 0] == n
    # the same where rank 2's transport reads the aborts of world's calls late (as
    # under load): it sees rank 1 leave its host's board round (for its next call)
    # before the abort of the mismatch is in, and waits for it; and where the
    # small sum takes the short way (collectives.host.tiny: once the watch for a
    # late abort of the user op's reduce above is gone, as under load), which
    # watches none of the user op's messages: rank 1's fingerprint on its host's
    # board says it there (each waited for the other until the deadline); a
    # builtin op too
    time.sleep(2 * lane._WATCH_S)
    add = C.Op(np.add, name="add")
    for k, theirs in ((20_000, add), (5, add), (20_000, "max"), (5, "max")):
        with _aborts_read_late(world, 2, 1.0), pytest.raises(mesh.MismatchError):
            C.all_reduce(world, np.ones(k), op=theirs if r == 1 else "sum")
        assert C.all_reduce(world, np.ones(k))[0] == n
    # one rank's own arguments are wrong: it raises ValueError, the others
    # (waiting in the host and leaders' phases) raise too instead of waiting
    big = np.ones(20_000)
    bad = (lambda: C.all_reduce(world, big, op="nope" if r == 3 else "sum"),
           lambda: C.reduce_scatter(world, np.ones((5 if r == 2 else 8, 4000))),
           lambda: C.broadcast(world, big, root=7 if r == 1 else 2))
    for call in bad:
        with pytest.raises((ValueError, mesh.MeshError)) as err:
            call()
        assert not isinstance(err.value, mesh.MeshTimeoutError), err.value
    assert C.all_reduce(world, np.ones(20_000))[0] == n
    host = world.split_host()       # a small scan: on the board within a host, else sockets
    for g in (host, world):
        a = np.arange(3.0) + g.rank
        assert C.scan(g, a).tolist() == [sum(range(g.rank + 1)) + k * (g.rank + 1)
                                         for k in range(3)]
        got = C.exscan(g, a)
        assert got is None if g.rank == 0 else got.tolist() == [
            sum(range(g.rank)) + k * g.rank for k in range(3)]
    if os.environ.get("MESH_COLL_PIPELINE") == "0":     # (the uneven calls take no pipeline)
        _uneven_ops(world)


@contextlib.contextmanager
def _aborts_read_late(world: Any, rank: int, delay: float) -> Iterator[None]:
    """On world rank ``rank``: its transport's thread takes ``delay`` seconds
    before it records a peer's abort of a call of ``world`` (the first it
    reads; its next messages wait meanwhile), as a loaded machine may."""
    inbox = world._t.inbox
    real = inbox.abort_local

    def late(group: int, tag: int, *args: Any, **kw: Any) -> bool:
        if group == world.gid and (group, tag) not in inbox.aborted \
                and threading.current_thread() is not threading.main_thread():
            time.sleep(delay)
        return real(group, tag, *args, **kw)
    if world.rank == rank:
        inbox.abort_local = late
    try:
        yield
    finally:
        if world.rank == rank:
            del inbox.abort_local


_COUNTS = {4: ([3, 0, 5, 1], [0, 0, 7, 0], [0, 0, 0, 0], [9000, 1, 0, 7001]),
           3: ([2, 5, 0], [0, 3, 0], [6000, 0, 5001])}
"""Rows a rank (of 4: "abba"; of 3: ranks 0, 1, 3, hosts (0, 3), (1,)),
zero counts among them; the last large (two levels for all_gather_v too)."""


def _uneven_ops(world: Any) -> None:
    """all_gather_v and reduce_scatter_v across the fake hosts, over the
    columns ("abba") and through the leaders (a group of ranks 0, 1, 3:
    hosts of two and one): numpy's values, the flat ring's bits
    (MESH_COLL_ALGO=ring) where the order of the sums cannot tell (all but
    float sums, products and averages), reduce_scatter's bits where the
    counts are even; through torch.distributed's uneven all_gather and
    reduce_scatter too; counts that differ on one rank raise MismatchError
    on every rank, a rank's own bad rows a ValueError there and no
    timeout elsewhere; the group goes on."""
    took = {"all_gather": 0, "reduce_scatter": 0}       # the two-level forms' calls
    for name in took:
        def counted(*args: Any, _f: Any = getattr(hier, name), _n: str = name,
                    **kw: Any) -> Any:
            took[_n] += 1
            return _f(*args, **kw)
        setattr(hier, name, counted)

    def flat(call: Any, algo: str = "ring") -> Any:
        os.environ["MESH_COLL_ALGO"] = algo
        try:
            return call()
        finally:
            del os.environ["MESH_COLL_ALGO"]
    sub = world.group([0, 1, 3])
    for g in (world, sub):
        if g is None:
            continue
        m, q = g.size, g.rank
        for counts in _COUNTS[m]:
            total, off = sum(counts), int(np.sum(counts[:q]))
            before = dict(took)
            mine = np.arange(counts[q] * 2, dtype=np.float64).reshape(-1, 2) + 1000 * q
            want = np.concatenate([np.arange(k * 2.0).reshape(-1, 2) + 1000 * p
                                   for p, k in enumerate(counts)])
            got = C.all_gather_v(g, mine, counts)
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(flat(lambda: C.all_gather_v(g, mine, counts)), want)
            assert took["all_gather"] == before["all_gather"] + (total >= 8000), (counts, took)
            np.testing.assert_array_equal(       # (forced: two levels at any size)
                flat(lambda: C.all_gather_v(g, mine, counts), "all_gather=hier"), want)
            assert took["all_gather"] == before["all_gather"] + 1 + (total >= 8000), took
            x = np.arange(total * 3, dtype=np.int64).reshape(-1, 3) % 97 + q
            every = [np.arange(total * 3).reshape(-1, 3) % 97 + p for p in range(m)]
            for op, fold in (("sum", np.add), ("max", np.maximum), ("min", np.minimum),
                             ("bxor", np.bitwise_xor), ("bor", np.bitwise_or),
                             ("band", np.bitwise_and), ("prod", np.multiply)):
                want = every[0]
                for e in every[1:]:
                    want = fold(want, e)
                got = C.reduce_scatter_v(g, x, counts, op=op)
                np.testing.assert_array_equal(got, want[off:off + counts[q]])
                np.testing.assert_array_equal(
                    flat(lambda: C.reduce_scatter_v(g, x, counts, op=op)), got)
            f = np.sin(np.arange(total * 3, dtype=np.float32) + q).reshape(-1, 3)
            for op in ("sum", "avg"):
                np.testing.assert_allclose(
                    C.reduce_scatter_v(g, f, counts, op=op), sum(
                        np.sin(np.arange(total * 3, dtype=np.float32) + p).reshape(-1, 3)
                        for p in range(m))[off:off + counts[q]] / (m if op == "avg" else 1),
                    rtol=1e-5, atol=1e-5)
            assert took["reduce_scatter"] == before["reduce_scatter"] + 9, (counts, took)
        for k in (3, 5000):     # even counts: reduce_scatter's bits, small and over the columns
            f = np.sin(np.arange(m * k * 2, dtype=np.float32) * (q + 1)).reshape(-1, 2)
            assert C.reduce_scatter_v(g, f, [k] * m).tobytes() == \
                C.reduce_scatter(g, f).tobytes()
        # rank 1 has another count for rank 0: every rank raises, naming both lists
        counts = list(_COUNTS[m][0])
        if q == 1:
            counts[0] += 1
        for call in (lambda: C.all_gather_v(g, np.ones((counts[q], 2)), counts, timeout=10),
                     lambda: C.reduce_scatter_v(g, np.ones((sum(counts), 2)), counts,
                                                timeout=10)):
            with pytest.raises(mesh.MismatchError, match="counts="):
                call()
        # the last rank's rows are not its count: it raises ValueError, the others
        # (waiting in the phases) at once
        counts = list(_COUNTS[m][-1])
        for call in (lambda: C.all_gather_v(g, np.ones((counts[q] + (q == m - 1), 2)),
                                            counts, timeout=10),
                     lambda: C.reduce_scatter_v(g, np.ones((sum(counts) - (q == m - 1), 2)),
                                                counts, timeout=10)):
            with pytest.raises((ValueError, mesh.MeshError)) as err:
                call()
            assert isinstance(err.value, ValueError) == (q == m - 1), err.value
            assert not isinstance(err.value, mesh.MeshTimeoutError), err.value
        np.testing.assert_array_equal(C.all_gather_v(g, np.full((counts[q], 2), q), counts),
                                      np.repeat(np.arange(m), counts)[:, None] * [1, 1])
    # torch.distributed's uneven all_gather and reduce_scatter take them
    import torch
    import torch.distributed as dist

    import collectives.torchdist  # noqa: F401  (registers "meshrun")
    dist.init_process_group("meshrun")
    n, r = world.size, world.rank
    before = dict(took)
    for k in (3, 6000):
        outs = [torch.zeros(k * (p + 1)) for p in range(n)]
        dist.all_gather(outs, torch.full((k * (r + 1),), float(r)))
        assert all(bool((o == p).all()) for p, o in enumerate(outs))
        out = torch.zeros(k + r)
        dist.reduce_scatter(out, [torch.full((k + p,), r + 1.0) for p in range(n)])
        assert bool((out == sum(range(1, n + 1))).all()), out
    dist.destroy_process_group()
    assert took["all_gather"] == before["all_gather"] + 1, took
    assert took["reduce_scatter"] == before["reduce_scatter"] + 2, took


def first_call_mismatch(world: Any, small: bool) -> list[float]:
    """A group's first two-level call mismatches, before its hosts' boards
    are up everywhere (some ranks set theirs up, some fail first): the next
    calls take one layout on every rank (each forgot its boards) and work."""
    _fake_host(world)
    n, r = world.size, world.rank
    g = world.group(list(range(n)))
    count = 4 if small else 20_000
    with pytest.raises(mesh.MismatchError):
        C.all_reduce(g, np.ones(count), op="max" if r == 0 else "sum")
    return [float(C.all_reduce(g, np.ones(count), timeout=30)[0]) for _ in range(3)]


def host_phase_failing_after_its_post(world: Any, small: bool,
                                      late: bool = False) -> tuple[bool, list[float]]:
    """The race of a first call's mismatch made certain: rank 2's phase on
    host b (the call's first, which sets the host's boards up) fails once
    its board round is done (as when the abort from host a comes after its
    post, before it saw rank 1's), after rank 1's phase there ended well;
    rank 0 (host a) starts then, and its mismatch fails the calls' next
    phases. Rank 2 forgot host b's boards, rank 1 kept them (it cannot know
    that rank 2's part failed after its post): its next call sets them up
    again with rank 2 (not: polls its board where rank 2 sets them up again
    by messages, a Stray), and the next calls work. Large (``small``
    False): the first call's host reduce_scatter (three phases); rank 1's
    next one takes the three phases too, as rank 2's (not: one board round,
    its fingerprint's phase then not rank 2's, a MismatchError).
    ``late``: rank 2 writes its board's forgotten mark only once rank 1 has
    started its next call, and a moment later (rank 2 descheduled between
    its abort and the mark): rank 1 still takes rank 2's form (not: its
    own, read before the mark, a MismatchError or a Stray)."""
    _fake_host(world)
    n, r = world.size, world.rank
    g = world.group(list(range(n)))
    name = "all_reduce_small" if small else "reduce_scatter"
    real = getattr(hier.local, name)
    count = 4 if small else 100_000
    forget = hier.board.forget

    def late_forget(sub: Any) -> None:
        hier.board.forget = forget
        assert world.recv(1, tag=93, timeout=30) == "next"
        time.sleep(0.3)
        forget(sub)
    if late and r == 2:
        hier.board.forget = late_forget

    def host_b(*args: Any) -> None:
        real(*args)
        if r == 1:
            world.send("done", 2, tag=92)
            return
        assert world.recv(1, tag=92, timeout=30) == "done"
        world.send("go", 0, tag=92)
        raise mesh.MeshError(f"rank {r}: aborted after its post (the test)")
    if r in (1, 2):
        setattr(hier.local, name, host_b)
    elif r == 0:
        assert world.recv(2, tag=92, timeout=30) == "go"
    with pytest.raises(mesh.MeshError):
        C.all_reduce(g, np.ones(count), op="max" if r == 0 else "sum", timeout=30)
    setattr(hier.local, name, real)
    topo = hier.topology(g)
    assert topo is not None
    kept = hier.board.ready(topo.local)
    if late and r == 1:
        world.send("next", 2, tag=93)
    return kept, [float(C.all_reduce(g, np.ones(count), timeout=30)[0]) for _ in range(3)]


@pytest.mark.parametrize("small,late", [(True, False), (False, False), (True, True),
                                        (False, True)])
def test_a_host_phase_failing_after_its_post_leaves_the_next_calls_working(
        small: bool, late: bool) -> None:
    said = mesh.spawn(host_phase_failing_after_its_post, 4, small, late, timeout=90)
    assert [kept for kept, _ in said] == [False, True, False, False], said
    assert [got for _, got in said] == [[4.0] * 3] * 4, said


def flat_against_two_levels(world: Any) -> str:
    """One rank makes a flat collective (a small broadcast) where the others
    make a two-level one (an all_reduce): nobody receives on the other's
    tags, but the two-level ranks watch their call's own tag, where the
    flat one sends: every rank raises MismatchError, none waits it out."""
    _fake_host(world)
    g = world.group(list(range(world.size)))
    try:
        if world.rank == 0:
            C.broadcast(g, np.ones(4), timeout=30)
        else:
            C.all_reduce(g, np.ones(4), timeout=30)
        said = "no error"
    except mesh.MeshError as e:
        said = type(e).__name__
    C.barrier(world, timeout=30)   # none leaves before all have heard (a LostPeerError else)
    node = world.split_host()
    assert node.size == 2 and [world.hosts[w] for w in node.ranks] == [world.hosts[world.rank]] * 2
    return said


def test_a_flat_call_against_a_two_level_one_is_a_mismatch_everywhere() -> None:
    """The hosts faked by MESH_HOST_ID listing every rank's (one environment
    for all of mesh.spawn's ranks: each took the whole list as its id, one
    host for all)."""
    env = {"MESH_HOST_ID": ",".join("fake-" + h for h in HOSTS)}
    assert mesh.spawn(flat_against_two_levels, 4, timeout=90, env=env) == ["MismatchError"] * 4


def disjoint_two_levels(world: Any) -> tuple[str, float]:
    """Rank 2 (host b's leader in "aabb") broadcasts from rank 0 (host a)
    where the others all-reduce, both large: no phase of one meets a phase
    of the other (rank 2 goes straight to the leaders' group, rank 0 waits
    on column 0, rank 3 on host b's first phase), yet every rank raises
    MismatchError at once, not a timeout, and the group goes on."""
    _fake_host(world, "aabb")
    g = world.group(list(range(world.size)))
    a = np.ones(100_000)
    try:
        if world.rank == 2:
            C.broadcast(g, a, root=0, timeout=10.0)
        else:
            C.all_reduce(g, a, timeout=10.0)
        said = "no error"
    except mesh.MeshError as e:
        said = type(e).__name__     # (a timeout before: MeshTimeoutError)
    return said, float(C.all_reduce(g, np.ones(100_000), timeout=20.0)[0])


def test_two_level_calls_whose_phases_never_meet_are_a_mismatch() -> None:
    got = mesh.spawn(disjoint_two_levels, 4, timeout=90)
    assert got == [("MismatchError", 4.0)] * 4, got


@pytest.mark.parametrize("small", [True, False])
def test_a_groups_first_call_mismatching_leaves_it_usable(small: bool) -> None:
    assert mesh.spawn(first_call_mismatch, 4, small, timeout=90) == [[4.0] * 3] * 4


@pytest.mark.parametrize("pipeline", ["1", "0"], ids=["pipelined", "one-round"])
def test_every_hierarchical_op_matches_numpy(pipeline: str) -> None:
    """Columns in one board round (once the boards are up), pipelined
    (MESH_COLL_PIPELINE=1) or the levels one after the other, with small
    segments and window: many blocks, and the tail of a chunk shorter than
    a segment. A small scan takes the board within a host (one round, not
    log2(size) of messages), sockets across hosts."""
    got = mesh.spawn(every_op, 4, timeout=90, env={
        "MESH_TIMEOUT": "20", "MESH_COLL_SEGMENT": "64K", "MESH_COLL_WINDOW": "2",
        "MESH_COLL_PIPELINE": pipeline, "MESH_COLL_DEBUG": "1" if pipeline == "0" else ""})
    if pipeline == "1":
        return
    # MESH_COLL_DEBUG=1: one line per group, collective and path, the first time
    on = "on world (4 ranks, 2 hosts ((0,3),(1,2))): "
    want = [f"all_reduce {on}two levels, small, columns, 40 B",
            f"all_reduce {on}two levels, small, columns, the short way "
            f"(collectives.host.tiny), 40 B",
            f"all_reduce {on}flat, ring over sockets (forced: flat), 40 B",
            f"all_reduce {on}two levels, columns, one board round, 1.526 MiB",
            f"all_reduce {on}two levels, columns, one board round (forced: two levels), "
            f"1.526 MiB",
            f"reduce_scatter {on}two levels, columns, 6.104 MiB",
            f"all_gather {on}flat, ring over sockets, 80 B",
            f"all_gather {on}two levels, columns, 3.052 MiB",
            f"broadcast {on}flat, binomial tree over sockets, 40 B",
            f"broadcast {on}two levels, leaders (chain), 1.526 MiB",
            f"scan {on}flat, recursive doubling over sockets, 24 B",
            f"exscan {on}flat, recursive doubling over sockets, 24 B",
            "all_reduce on world/[0, 1, 2, 3] (4 ranks, 2 hosts ((0,3),(1,2))): two levels, "
            "columns, three phases, 781.3 KiB",
            f"all_gather_v {on}flat, ring over sockets, 144 B",
            f"all_gather_v {on}two levels, columns (forced: two levels), 144 B",
            f"all_gather_v {on}two levels, columns, 250 KiB",
            f"reduce_scatter_v {on}two levels, all_reduce then a cut, small, columns, 216 B",
            f"reduce_scatter_v {on}two levels, columns, 375 KiB"]
    for r, lines in enumerate(got):
        host = f"on world/split0:{int(r in (1, 2))} (2 ranks, 1 host): same-host board, 24 B"
        missing = [w for w in want + [f"scan {host}", f"exscan {host}"]
                   if f"meshrun rank {r}: {w}" not in lines]
        assert not missing, (missing, lines)
        paths = [line.rsplit(", ", 1)[0] for line in lines]
        assert len(set(paths)) == len(paths), lines         # (each once)


def three_hosts(world: Any) -> None:
    """Columns of three: the column ring's reduce steps and gather steps
    both more than one, so the segments the host reads back come from both."""
    _fake_host(world, "abccab")
    n, r = world.size, world.rank
    for count in (7, 100_003, 100_003):     # over the columns (boards set up), then one round
        a = np.arange(count, dtype=np.float32) % 64 * (r + 1)
        want = np.arange(count, dtype=np.float32) % 64 * sum(range(1, n + 1))
        assert np.array_equal(C.all_reduce(world, a), want), count
    assert hier.stats["one_round"] == 2, hier.stats
    topo = hier.topology_of(world)
    assert topo is not None and topo.hosts == ((0, 4), (1, 5), (2, 3)), topo
    # small over columns of three (recursive doubling with a fold), the
    # second call the short way: the same bits on every rank
    from collectives.host import tiny
    a = (np.arange(3) + 0.1 * r) ** 3
    got = [C.all_reduce(world, a.copy()) for _ in range(2)]
    every = C.all_gather(world, got[1])
    assert (every == every[0]).all() and (got[0] == got[1]).all(), every
    np.testing.assert_allclose(got[1], sum((np.arange(3) + 0.1 * p) ** 3 for p in range(n)))
    assert hier.stats["small_columns"] == 2 and tiny.stats["calls"] == 1, hier.stats


def test_columns_of_three_hosts() -> None:
    mesh.spawn(three_hosts, 6, timeout=90, env={"MESH_TIMEOUT": "20", "MESH_COLL_SEGMENT": "8K",
                                                "MESH_COLL_WINDOW": "3", "MESH_COLL_PIPELINE": "1"})


def leaders_form(world: Any) -> None:
    from collectives.host import tiny
    _fake_host(world)
    r, n = world.rank, world.size
    for _ in range(3):
        got = C.all_reduce(world, np.arange(4.0) * (r + 1))
        np.testing.assert_array_equal(got, np.arange(4.0) * sum(range(1, n + 1)))
    assert hier.stats["small_columns"] == 0 and tiny.stats["calls"] == 0, hier.stats
    assert hier.stats["one_round"] == 2, hier.stats
    # leader 0's own argument is wrong: it fails the leaders' phase (not a
    # column's), so the other leader raises at once and the group goes on
    with pytest.raises((ValueError, mesh.MeshError)) as err:
        C.all_reduce(world, np.ones(4), op="nope" if r == 0 else "sum")
    assert not isinstance(err.value, mesh.MeshTimeoutError), err.value
    assert C.all_reduce(world, np.ones(4))[0] == n


def test_small_all_reduce_through_the_leaders() -> None:
    """MESH_COLL_SMALL_COLUMNS=0: the leaders' form (no short way)."""
    mesh.spawn(leaders_form, 4, timeout=60, env={"MESH_COLL_SMALL_COLUMNS": "0",
                                                 "MESH_TIMEOUT": "10"})


@pytest.mark.parametrize("n,count,seg,window", [(2, 1000, 64, 2), (3, 10_001, 400, 3),
                                                (4, 5, 4, 8), (5, 3, 4, 1)])
def test_final_regions_cover_the_buffer_once(n: int, count: int, seg: int, window: int) -> None:
    """What the host reads back, in the order the column's ring makes it final."""
    for rank in range(n):
        regions = final_regions(n, rank, count, 4, seg, window)
        covered = np.zeros(count, int)
        for lo, hi in regions:
            covered[lo:hi] += 1
        assert (covered == 1).all(), (rank, regions)


def die_between_hosts(world: Any, outdir: str, count: int, uneven: bool = False) -> None:
    _fake_host(world)
    small = count <= 8
    forced = None if small else "hier"      # (small: the short way once learnt)
    try:
        for _ in range(2):                  # topology made, boards up; all alive
            C.all_reduce(world, np.ones(count), algorithm=forced)
        _then_die(world, count, small, forced, uneven)
        result = {"type": "ok"}
    except mesh.MeshError as e:
        # (the victim dies as soon as its second call returns: a survivor
        # whose second call still waits for its answer loses it there)
        result = {"type": type(e).__name__, "msg": str(e), "peer": getattr(e, "peer", None)}
    with open(os.path.join(outdir, f"{world.rank}.json"), "w") as f:
        json.dump(result, f)


def _then_die(world: Any, count: int, small: bool, forced: Any, uneven: bool) -> None:
    """The victim's hooks, then the call it dies in (small ones take the
    short way: tiny's count moves by one, unless the rank knew of the death
    before its call; ``uneven``: an all_gather_v over
    the columns, its host phase after the column's, where rank 2 waits)."""
    from collectives.host import stream
    from collectives.host import tiny
    from collectives.shm import local, tiny as shm_tiny
    if world.rank == VICTIM:
        def killed(*args: Any, **kw: Any) -> None:
            os.kill(os.getpid(), signal.SIGKILL)
        # small: dies as the call starts (the others take the short way)
        local.all_reduce_small = shm_tiny.all_reduce = killed
        if os.environ.get("MESH_FORCE_TCP"):    # or halfway through the columns' streams
            sends = [0]
            isend = stream.Links.isend

            def isend_then_die(self: Any, arr: Any) -> Any:
                sends[0] += 1
                if sends[0] > 2:
                    killed()
                return isend(self, arr)
            stream.Links.isend = isend_then_die     # type: ignore[method-assign]
        else:
            hier.ring = columns.ring = killed   # or as the columns' (large) starts
    calls = tiny.stats["calls"]
    try:
        if uneven:
            counts = [count, 0, 2 * count, 1]
            C.all_gather_v(world, np.ones(counts[world.rank]), counts)
        else:
            C.all_reduce(world, np.ones(count), algorithm=forced)
    finally:
        # the short way once (small), or not at all where this rank learnt of the
        # victim's death before its call began (held off its core under load: the
        # call then raised the lost peer at once, where this failed it)
        assert tiny.stats["calls"] - calls in ((0, 1) if small else (0,)), tiny.stats


@pytest.mark.parametrize("count,tcp,pipeline", [(8, False, "1"), (8, True, "1"),
                                                (100_000, False, "1"), (400_000, True, "1"),
                                                (100_000, False, "0"), (400_000, True, "0"),
                                                (100_000, False, "v")],
                         ids=["small", "small-link", "columns", "columns-stream",
                              "columns-one-round", "columns-one-round-stream", "all_gather_v"])
def test_a_rank_lost_between_hosts_fails_every_rank(tmp_path: Any, count: int,
                                                    tcp: bool, pipeline: str) -> None:
    """Small, the short way (collectives.host.tiny): rank 1 (host b) dies as
    the call starts: rank 2 waits for it on host b's board, rank 0 (column 0
    with rank 1) on the mesh or, over tcp://, their link
    (collectives.host.link), rank 3 on rank 2's column step, which rank 2
    abandons; large: the columns' (rank 1 is in column 0 with rank 0); over
    tcp://, halfway through the column's streams (collectives.host.stream);
    the columns' round pipelined or not; "v": an all_gather_v over the
    columns, rank 1 dying as its column's ring starts."""
    env = {"MESH_PEER_TIMEOUT": "1.5", "MESH_COLL_PIPELINE": "0" if pipeline == "v" else pipeline}
    if tcp:
        env.update(MESH_FORCE_TCP="1", MESH_COLL_STREAM_MIN="64K", MESH_COLL_SEGMENT="64K")
    with pytest.raises(mesh.WorkerError) as err:
        # (settle: on a loaded machine a survivor's error may take more than
        # the default second after the victim's death to be raised and written)
        mesh.spawn(die_between_hosts, 4, str(tmp_path), count, pipeline == "v", timeout=60,
                   env=env, settle=20)
    assert err.value.rank == VICTIM
    for r in (0, 2, 3):
        got = json.loads((tmp_path / f"{r}.json").read_text())
        assert got["type"] == "LostPeerError", (r, got)
        assert got["peer"] == VICTIM, (r, got)


def die_while_a_host_partner_is_away(world: Any, outdir: str) -> None:
    """Rank 1 (host b) dies while rank 3 is in a large all_reduce that the
    others are not in (they raised in an earlier call, which rank 3 had
    finished, and are busy elsewhere): rank 3 waits in host a's phase on
    rank 0, alive, and must fail on rank 1's death, not on rank 0's exit."""
    _fake_host(world)
    r = world.rank
    C.all_reduce(world, np.ones(200_000), algorithm="hier")     # topology made, boards up
    C.barrier(world)
    t = time.monotonic()
    if r == VICTIM:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    result: dict = {"type": "away"}
    if r in (0, 2):     # (until rank 3 has its error, 10 s at most)
        while not os.path.exists(os.path.join(outdir, "3.json")) and time.monotonic() - t < 10:
            time.sleep(0.05)
    else:
        try:
            C.all_reduce(world, np.ones(200_000), algorithm="hier", timeout=30)
            result = {"type": "ok"}
        except mesh.MeshError as e:
            result = {"type": type(e).__name__, "msg": str(e), "peer": getattr(e, "peer", None)}
    result["t"] = time.monotonic() - t
    with open(os.path.join(outdir, f"{r}.json"), "w") as f:
        json.dump(result, f)


def test_a_rank_lost_fails_a_phase_on_a_host_without_it(tmp_path: Any) -> None:
    """The lost rank is not a member of the sub-group whose phase rank 3
    waits in: the call's own group is, and its death fails the phase (it
    waited for rank 0 until rank 0 ended, 10 s, and named rank 0 lost)."""
    with pytest.raises(mesh.WorkerError) as err:
        mesh.spawn(die_while_a_host_partner_is_away, 4, str(tmp_path), timeout=60, settle=20)
    assert err.value.rank == VICTIM
    got = json.loads((tmp_path / "3.json").read_text())
    assert got["type"] == "LostPeerError" and got["peer"] == VICTIM, got
    assert got["t"] < 4.5, got


def late_rank(world: Any) -> list[str]:
    """Rank 2 (host b) calls a warm all_reduce 1.5 s after the others, whose
    timeout is 1 s: rank 0 waits in its column on rank 1, which waits on
    its host for rank 2. (A fixed sleep: waiting for the first abort to
    reach rank 2 let rank 1's, which names no late rank, be the one it
    raised, 1 run in 3.) Then the same on a group whose boards a small
    call set up (no post since: rank 1 waits for rank 2 to enter the call
    before it chooses the one board round, board.agree), and a small call
    that a call of its shape made before takes the short way
    (collectives.host.tiny: its phases time out outside hier's)."""
    from collectives.host import tiny
    _fake_host(world)
    a, small = np.ones(200_000, np.float32), np.ones(4)
    said = []
    for g, warm, late in ((world, a, a), (world.group(list(range(world.size))), small, a),
                          (world, small, small)):
        C.all_reduce(g, warm.copy(), timeout=30)       # the boards up
        if world.rank == 2:
            time.sleep(1.5)
        short = tiny.stats["calls"]
        with pytest.raises(mesh.MeshTimeoutError) as err:
            C.all_reduce(g, late.copy(), timeout=1.0)
        if world.rank != 2:     # (rank 2 finds the call aborted before its phases)
            assert (tiny.stats["calls"] > short) == (late is small), late.size
        C.barrier(world, timeout=30)
        said.append(str(err.value))
    return said


def test_a_two_level_timeout_names_the_rank_that_has_not_called() -> None:
    """Whichever rank times out first (and the abort every rank raises)
    names rank 2 from the heartbeats, not only through the chain of waits
    its status quotes, and no rank that called it (rank 1 waiting in
    board.agree: its heartbeats say so)."""
    for said in mesh.spawn(late_rank, 4, timeout=60):
        for one in said:
            assert "world rank 2 has not called it" in one, said
            for r in (0, 1, 3):
                assert f"world rank {r} has not called it" not in one, one


def late_on_a_link(world: Any) -> str:
    """Rank 3 (host b, beside rank 2) calls a small all_reduce 1.5 s after
    the others: ranks 0 and 1 wait in their columns on their kept TCP links
    (host.link) to ranks 2 and 3, rank 2 on its host for rank 3."""
    _fake_host(world, "aabb")
    C.all_reduce(world, np.ones(1), timeout=30)       # the boards and links up
    if world.rank == 3:
        time.sleep(1.5)
    # (rank 2's own timeout later than the columns': its abort, relayed first, would
    # otherwise stand in for both columns' own words under load, neither saying "(link)")
    with pytest.raises(mesh.MeshTimeoutError) as err:
        C.all_reduce(world, np.ones(4), timeout=1.2 if world.rank == 2 else 0.7)
    C.barrier(world, timeout=30)
    return str(err.value)


def test_a_rank_waiting_on_a_link_is_not_named_late() -> None:
    """A wait on a link tells the heartbeats, as a board's does: only the
    rank that has not called is named so."""
    env = {"MESH_HOST_ID": "fake-a,fake-a,fake-b,fake-b"}
    said = mesh.spawn(late_on_a_link, 4, timeout=60, env=env)
    assert any("(link)" in one for one in said), said
    for one in said:
        assert "world rank 3 has not called it" in one, one
        for r in (0, 1, 2):
            assert f"world rank {r} has not called it" not in one, one


def test_layout_forcing() -> None:
    t = plan.Tuning()
    assert plan.layout("all_reduce", t) is None
    assert plan.layout("all_reduce", t, "hier") is True
    assert plan.layout("all_reduce", t, "ring") is False
    assert plan.layout("all_reduce", t, "rd") is False
    assert plan.layout("gather", t) is False
    env = plan.Tuning.from_env({"MESH_COLL_ALGO": "hier"})
    assert plan.layout("broadcast", env) is True
    assert plan.choose("all_reduce", 8, env) == "rd"          # leaders' algorithm by size
    assert plan.choose("all_reduce", 1 << 20, env, "hier") == "ring"
    env = plan.Tuning.from_env({"MESH_COLL_ALGO": "ring"})
    assert plan.layout("all_gather", env) is False
    assert plan.layout("broadcast", env) is False
    env = plan.Tuning.from_env({"MESH_COLL_ALGO": "all_reduce=hier,broadcast=tree"})
    assert plan.layout("all_reduce", env) is True
    assert plan.layout("broadcast", env) is False
    assert plan.layout("all_gather", env) is None


def streams(world: Any) -> dict:
    """MESH_FORCE_TCP: every peer is reached over tcp://, so the ring's links
    between the fake hosts (and, with the flat ring forced, within them)
    carry their segments over plain TCP streams (collectives.host.stream)."""
    from collectives.host import stream
    _fake_host(world)
    n, r = world.size, world.rank
    count = 300_001                     # odd: uneven chunks and segments
    a = np.arange(count, dtype=np.float32) % 1000 * (r + 1)
    want = np.arange(count, dtype=np.float32) % 1000 * sum(range(1, n + 1))
    for alg in ("ring", "hier"):        # every link a stream / the columns' links
        assert np.array_equal(C.all_reduce(world, a.copy(), algorithm=alg), want), alg
    # over the columns, each rank's part crosses once, on its own link: of a
    # reduce_scatter, the host's sums of the other host's rank's rows (the
    # all_reduce sent twice that); of an all_gather, its row (the leaders
    # sent both rows of their host, the others none)
    rows = np.tile(a, (n, 1)) + np.arange(n)[:, None]
    sent = stream.stats["sent"]
    np.testing.assert_array_equal(C.reduce_scatter(world, rows)[0], want + n * r)
    assert stream.stats["sent"] - sent == rows.nbytes // n, (sent, stream.stats)
    sent = stream.stats["sent"]
    ag = C.all_gather(world, np.full(count, r, np.int64))
    assert all((ag[p] == p).all() for p in range(n))
    assert stream.stats["sent"] - sent == count * 8, (sent, stream.stats)
    used = stream.stats["links"]
    assert used >= 3, used
    # the streams are kept: the same calls again make no new connection
    made, reused = stream.stats["connects"], stream.stats["reused"]
    for alg in ("ring", "hier"):
        assert np.array_equal(C.all_reduce(world, a.copy(), algorithm=alg), want), alg
    assert stream.stats["connects"] == made, (made, stream.stats)
    assert stream.stats["reused"] >= reused + 2, (reused, stream.stats)
    # rank 0 alone drops its kept streams (as a failed call does): rank 1
    # sees the reset where it waits for the call's tag, rank 3 another id
    # in rank 0's message; both links are made anew, the others reused
    if r == 0:
        _drop_kept()
    made = stream.stats["connects"]
    assert np.array_equal(C.all_reduce(world, a.copy(), algorithm="ring"), want)
    assert stream.stats["connects"] - made == (r in (0, 3)), (r, made, stream.stats)
    from mesh.listener import listener
    lis = listener()
    assert lis is not None
    # a stranger on the listener (no token) is refused; the calls go on
    # (new connections: the kept ones dropped here, so the peers see them reset)
    _drop_kept()
    with socket.create_connection(("127.0.0.1", lis.port)) as s:
        s.sendall(b"MSTR" + bytes(44))
        assert np.array_equal(C.all_reduce(world, a.copy(), algorithm="ring"), want)
    assert lis.strangers == 1, lis.strangers
    # a mixed ring: streams across the fake hosts only, the mesh within
    real = stream.enabled
    stream.enabled = lambda ctx, peer, nbytes: (real(ctx, peer, nbytes) and
                                                HOSTS[ctx.g.ranks[peer]] != HOSTS[r])
    try:
        assert np.array_equal(C.all_reduce(world, a.copy(), algorithm="ring"), want)
    finally:
        stream.enabled = real
    # one rank's shape differs: every rank raises MismatchError, the group goes on
    with pytest.raises(mesh.MismatchError):
        C.all_reduce(world, np.ones(count + (r == 2)), algorithm="ring")
    assert np.array_equal(C.all_reduce(world, a.copy(), algorithm="ring"), want)
    # rank 0 cannot reach its right neighbour's stream (a firewall): that
    # link runs over the mesh, and rank 0 does not try again
    _drop_kept()
    tries = [0]
    connect = stream._connect

    def refused(*args: Any) -> None:
        tries[0] += 1
    if r == 0:
        stream._connect = refused       # type: ignore[assignment]
    try:
        for _ in range(2):
            assert np.array_equal(C.all_reduce(world, a.copy(), algorithm="ring"), want)
    finally:
        stream._connect = connect
    assert tries[0] == (1 if r == 0 else 0)
    out = {"links": stream.stats["links"] - used, **leaders_links(world)}
    # the mesh's close resets the streams kept for its groups (none is left
    # open, nor found by a later mesh's group of the same id)
    out["kept"] = len(stream._kept)
    world.close()
    assert not stream._kept, stream._kept
    return out


def _dropped_groups(world: Any) -> list[int]:
    """Groups across the fake hosts made and dropped in a loop, each with a
    small all_reduce (the group's links) and a large ring one (its kept
    streams): what they held goes with them, not at the mesh's close."""
    import gc

    from collectives.host import stream
    _fake_host(world)
    n = world.size
    big = np.ones(100_001, np.float32)

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))
    C.all_reduce(world, np.ones(4))
    seen = []
    for i in range(12):
        g = world.group(list(range(n)))
        assert C.all_reduce(g, np.ones(4))[0] == n
        assert C.all_reduce(g, big.copy(), algorithm="ring")[0] == n
        del g
        gc.collect()
        if i in (3, 11):
            C.barrier(world)        # (the next call forgets the dropped groups)
            seen += [fds(), len(world._t.groups), len(stream._kept)]
    return seen


def test_dropped_groups_across_hosts_close_their_links_and_streams() -> None:
    """Each group's links and kept streams were closed only when the mesh
    closed: a job making groups in its loop ran out of descriptors."""
    env = {"MESH_FORCE_TCP": "1", "MESH_COLL_STREAM_MIN": "64K", "MESH_TIMEOUT": "30"}
    for r, seen in enumerate(mesh.spawn(_dropped_groups, 4, timeout=100, env=env)):
        assert seen[3] <= seen[0] + 2 and seen[4] == seen[1] and seen[5] <= seen[2], (r, seen)


def _drop_kept() -> None:
    """Reset this rank's kept streams (collectives.host.stream), as a failed
    call does: the next call makes new connections."""
    from collectives.host import stream
    with stream._kept_lock:
        kept, stream._kept = list(stream._kept.values()), {}
    for conn, _ in kept:
        stream._reset(conn)


def leaders_links(world: Any) -> dict:
    """The small exchange between hosts over the columns' kept TCP links
    (collectives.host.link; every rank, each with its counterpart on the
    other host): right, mismatches seen there, and a frame left by a call
    that failed before reading it dropped by the next; then the flat
    recursive doubling over links."""
    from collectives.host import link, tiny
    r = world.rank
    small = np.arange(5, dtype=np.float64) * (r + 1)
    want = np.arange(5, dtype=np.float64) * 10
    for _ in range(3):
        np.testing.assert_array_equal(C.all_reduce(world, small.copy()), want)
    frames = link.stats["frames"]
    assert frames == 3, link.stats      # every rank: columns (0, 1) and (3, 2)
    # each host agrees, the hosts do not: the columns see it on their links
    with pytest.raises(mesh.MismatchError):
        C.all_reduce(world, small.copy(), op="max" if HOSTS[r] == "b" else "sum")
    np.testing.assert_array_equal(C.all_reduce(world, small.copy()), want)
    # host a disagrees within: its ranks never read host b's frames (whose
    # sums would be wrong for the next call)
    with pytest.raises(mesh.MismatchError):
        C.all_reduce(world, small * 7, op="max" if r == 3 else "sum")
    np.testing.assert_array_equal(C.all_reduce(world, small.copy()), want)
    # rank 0's own argument is wrong; the others, on the short way, find the
    # call aborted before its phases: they fail those too, so the group goes on
    if r != 0:
        time.sleep(0.3)
    with pytest.raises((ValueError, mesh.MeshError)):
        C.all_reduce(world, small.copy(), op="nope" if r == 0 else "sum")
    np.testing.assert_array_equal(C.all_reduce(world, small.copy()), want)
    # (a failed call leaves every rank's boards and short-way plans as they were: the
    # next calls take the short way, whatever way each rank's failed call took)
    for _ in range(3):
        np.testing.assert_array_equal(C.all_reduce(world, small.copy()), want)
    assert tiny.stats["calls"] >= 4, tiny.stats     # (collectives.host.tiny)
    # the flat recursive doubling: every pair (tcp:// here) over a link
    for _ in range(2):
        np.testing.assert_array_equal(C.all_reduce(world, small.copy(), algorithm="rd"), want)
    return {"pairs": link.stats["pairs"]}


def test_a_link_takes_its_own_calls_frame() -> None:
    """Frames of a call that failed before reading them are dropped, those
    of a later call kept for it, whatever the pieces the socket gives."""
    from collectives.host import link
    a, b = socket.socketpair()
    try:
        got = link._Link(a, 1)
        fp = b"fp"

        def frame(tag: int, value: float) -> bytes:
            data = np.array([value]).tobytes()
            return link._FRAME.pack(tag, len(fp), len(data)) + fp + data
        wire = frame(-7, 7.0) + frame(-9, 9.0) + frame(-8, 8.0)
        for i in range(len(wire)):      # one byte at a time: frames cut anywhere
            b.send(wire[i:i + 1])
        dropped = link.stats["dropped"]

        class Call:
            tag = -8
        assert got.take(Call()) == (fp, np.array([8.0]).tobytes())   # type: ignore[arg-type]
        assert link.stats["dropped"] == dropped + 1
        Call.tag = -9
        assert got.take(Call()) == (fp, np.array([9.0]).tobytes())   # type: ignore[arg-type]
        assert not got.buf and not got.later
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(30)
def test_strangers_on_the_stream_listener_do_not_hold_up_a_peers_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The listener (any address, any port scan finds it) read each hello
    in turn, waiting up to 2 s per read: a stranger that connected and said
    nothing, or its hello a byte a second, kept the peer's connection queued
    behind it past the call's deadline, and the call failed: 'rank 0 said
    it connected its stream but none came'. Hellos are now read side by
    side; one not whole within 2 s of its accept is refused."""
    from mesh import listener
    # 1 s, not 2, for a hello (the wait for the refusals below): read in turn, the slow
    # stranger alone still held the peer's connection twice the 0.5 s allowed it
    monkeypatch.setattr(listener, "_HELLO_S", 1.0)
    lis = listener.Listener()
    strangers = [socket.create_connection(("127.0.0.1", lis.port)) for _ in range(3)]
    try:
        strangers[0].sendall(b"M")              # a slow hello; the others say nothing
        time.sleep(0.05)
        peer = socket.create_connection(("127.0.0.1", lis.port))
        peer.sendall(listener.HELLO.pack(listener.MAGIC, lis.token, 5, -3, 1))
        t0 = time.monotonic()
        conn = lis.take((5, -3, 1), t0 + 1.0)
        assert conn is not None and time.monotonic() - t0 < 0.5, time.monotonic() - t0
        conn.close()
        peer.close()
        assert lis.take((5, -4, 1), time.monotonic() + listener._HELLO_S + 0.5) is None
        assert lis.strangers == 3 and not lis.shaking, (lis.strangers, lis.shaking)
        for s in strangers:        # closed: no greeting of ours, the end
            s.settimeout(1)
            assert s.recv(10) == b""
    finally:
        for s in strangers:
            s.close()
        lis.sock.close()


def test_ring_links_across_hosts_run_over_streams() -> None:
    got = mesh.spawn(streams, 4, timeout=90, env={
        "MESH_TIMEOUT": "20", "MESH_FORCE_TCP": "1", "MESH_COLL_STREAM_MIN": "64K"})
    assert all(g["links"] >= 2 for g in got), got
    assert all(g["kept"] >= 1 for g in got), got          # (reset by the mesh's close)
    # column's + world's (a small all_reduce goes over the columns, boards up or not,
    # before and after a failed call: never through the leaders)
    assert [g["pairs"] for g in got] == [1 + 2] * 4, got


def _kept_across_a_fork(world: Any) -> list[Any]:
    from collectives.host import stream
    _fake_host(world, "ab")
    a = np.ones(300_001, dtype=np.float32)
    assert (C.all_reduce(world, a.copy(), algorithm="ring") == 2).all()
    kept = [conn for conn, _ in stream._kept.values()]
    child = os.fork()
    if child == 0:      # the child's copies closed; the parent's (the same objects) open
        os._exit(0 if kept and not stream._kept and all(c.fileno() == -1 for c in kept)
                 else 1)
    _, status = os.waitpid(child, 0)
    made, reused = stream.stats["connects"], stream.stats["reused"]
    ok = bool((C.all_reduce(world, a.copy(), algorithm="ring") == 2).all())
    return [len(kept), os.waitstatus_to_exitcode(status), ok, stream.stats["connects"] - made,
            stream.stats["reused"] - reused]


@pytest.mark.timeout(60)
def test_a_forked_child_closes_its_copies_of_the_kept_ring_streams() -> None:
    """A forked child (a DataLoader worker, multiprocessing's) kept copies of
    the ring's streams kept between calls: once the parent died, the copy
    held the connection up, and the peer, waiting on it for the next call's
    tag, saw no end to it and waited for the parent's silence (the peer
    timeout). The child closes its copies at the fork, never shutting them
    down: the parent's next call reuses both."""
    got = mesh.spawn(_kept_across_a_fork, 2, timeout=50, env={
        "MESH_TIMEOUT": "20", "MESH_FORCE_TCP": "1", "MESH_COLL_STREAM_MIN": "64K"})
    assert got == [[2, 0, True, 0, 1]] * 2, got


def _valid_then_bad(world: Any) -> list[str]:
    """An async two-level call, then a call that fails on its own arguments
    on every rank: the failing call's sub-group phases are failed after the
    queued call's, which completes."""
    _fake_host(world, "aabb")
    out = []
    for i in range(6):
        g = world.group(list(range(world.size)))
        w = C.all_reduce(g, np.ones(200_001, np.float32), async_op=True, timeout=30)
        with pytest.raises(ValueError):
            C.all_reduce(g, np.ones(3), op="bogus", timeout=30)
        try:
            out.append(str(w.wait()[0]))
        except mesh.MeshError as e:
            out.append(f"{type(e).__name__}: {e}"[:300])
    return out


def test_a_failing_call_does_not_abort_the_async_call_queued_before_it() -> None:
    """The failing call failed the sub-groups' next phases at once, in the
    caller's thread: the phases of the async call still queued before it."""
    for got in mesh.spawn(_valid_then_bad, 4, timeout=120):
        assert got == ["4.0"] * 6, got


def _every_op_after(g: Any) -> list[bool]:
    """The group's next well-formed calls, each kind, small and large: right
    on every rank (no call waits out its timeout: 10 s each)."""
    n, r = g.size, g.rank
    got = []
    for count in (4, 20_000):
        a = np.arange(count, dtype=np.float64) * (r + 1)
        want = np.arange(count, dtype=np.float64) * sum(range(1, n + 1))
        got.append(bool((C.all_reduce(g, a.copy(), timeout=10) == want).all()))
        b = a.copy() if r == 2 else np.zeros(count)
        got.append(bool((C.broadcast(g, b, root=2, timeout=10) == np.arange(count) * 3).all()))
        ag = C.all_gather(g, a, timeout=10)
        got.append(bool((ag == np.arange(count) * (np.arange(n)[:, None] + 1)).all()))
        rows = np.tile(a, (n, 1)) + np.arange(n)[:, None]
        got.append(bool((C.reduce_scatter(g, rows, timeout=10)[0] == want + n * r).all()))
    return got


def flat_against_warm_two_levels(world: Any) -> tuple[str, list[bool]]:
    """As flat_against_two_levels, on a group whose boards and short way are
    up: every rank raises MismatchError, and the group's next calls work
    (the ranks' phases numbered from the group's calls, not counted per
    sub-group: rank 0 made none in the failed call, the others some)."""
    _fake_host(world)
    n, r = world.size, world.rank
    g = world.group(list(range(n)))
    for _ in range(3):
        assert C.all_reduce(g, np.ones(4))[0] == n
        assert C.all_reduce(g, np.ones(20_000))[0] == n
    try:
        if r == 0:
            C.broadcast(g, np.ones(4), timeout=10)
        else:
            C.all_reduce(g, np.full(4, 100.0), timeout=10)
        said = "no error"
    except mesh.MeshError as e:
        said = type(e).__name__
    return said, _every_op_after(g)


def failed_on_some_ranks(world: Any, warm: bool) -> tuple[str, list[bool]]:
    """A broadcast from rank 3 (host a) fails on some ranks only: rank 3 is
    done after its host's phase, rank 1 (host b's leader) comes too late and
    rank 0 times out between the hosts; the group's next calls work on every
    rank (``warm``: its boards were up before; else that broadcast is its
    first two-level call and sets host a's boards up, host b's never).
    Rank 1 comes once ranks 0 and 2 have timed out (each tells it so), not
    after a fixed 2.5 s."""
    _fake_host(world)
    n, r = world.size, world.rank
    g = world.group(list(range(n)))
    if warm:
        for _ in range(3):
            assert C.all_reduce(g, np.ones(4))[0] == n
            assert C.all_reduce(g, np.ones(20_000))[0] == n
    if r == 1:
        assert sorted(world.recv(mesh.ANY, tag=91, timeout=30) for _ in (0, 2)) == [0, 2]
    try:
        C.broadcast(g, np.full(100_000, float(r)), root=3, timeout=1.0)
        said = "no error"
    except mesh.MeshError as e:
        said = type(e).__name__
    if r in (0, 2):
        world.send(r, 1, tag=91)
    C.barrier(world, timeout=30)
    return said, _every_op_after(g)


def test_a_flat_call_against_a_warm_two_level_one_leaves_the_group_usable() -> None:
    got = mesh.spawn(flat_against_warm_two_levels, 4, timeout=90, env={"MESH_TIMEOUT": "20"})
    assert got == [("MismatchError", [True] * 8)] * 4, got


@pytest.mark.parametrize("warm", [True, False])
def test_a_two_level_call_failing_on_some_ranks_leaves_the_group_usable(warm: bool) -> None:
    got = mesh.spawn(failed_on_some_ranks, 4, warm, timeout=90, env={"MESH_TIMEOUT": "20"})
    assert [said for said, _ in got] == ["MeshTimeoutError"] * 3 + ["no error"], got
    assert [after for _, after in got] == [[True] * 8] * 4, got


_LATE_LINK = """
import os, sys, time
rank = int(os.environ["RANK"])
os.environ["MESH_HOST_ID"] = "host-" + "abab"[rank]   # ranks 0, 2 on one host, 1, 3 on another
import numpy as np
import mesh
import collectives as C
with mesh.init() as world:
    for i in range(3):
        if rank == 1:
            time.sleep(0.2)     # rank 0 waits on its link to rank 1 past a poll slice
        a = np.full(1, rank + 10.0 * i)
        C.all_reduce(world, a, algorithm="rd")
        print(f"rank {rank} call {i}: {a[0]}", flush=True)
"""


@pytest.mark.timeout(90)
def test_a_link_wait_leaves_the_same_host_partners_message(tmp_path: Any) -> None:
    """Recursive doubling across hosts (MESH_HOST_ID: ranks 0, 2 on host a,
    1, 3 on b): step 1 over the kept links (0-1, 2-3), step 2 over the mesh
    (0-2, 1-3). Rank 0, waiting on its link to a late rank 1, posted a
    watch for any rank on the call's tag, and rank 2's step-2 message
    (sent on that tag) fell into it: the call failed ("a peer sent a
    message where none was expected") or rank 0 waited for the message
    until the call timed out."""
    script = tmp_path / "late_link.py"
    script.write_text(_LATE_LINK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), MESH_TIMEOUT="10")
    got = subprocess.run([sys.executable, "-m", "mesh.launch", "-n", "4", str(script)],
                         capture_output=True, text=True, timeout=80, env=env, cwd=ROOT)
    want = [f"rank {r} call {i}: {4 * 10.0 * i + 6.0}" for r in range(4) for i in range(3)]
    out = got.stdout + got.stderr
    assert got.returncode == 0 and all(w in out for w in want), out[-3000:]
