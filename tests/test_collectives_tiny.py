"""The tiny all_reduce's short way (collectives.shm.tiny) and the mapped
boards it runs on (collectives.shm.board): the same bits as the long way,
and the long way's guarantees when ranks are on different ways: a
mismatch raises on every rank, a bad argument aborts the others, a
timeout ends the call on every rank, a killed peer is named; boards that
cannot be mapped are polled with cross-memory reads instead. Large calls
through the boards' arenas, and waits that sleep on a peer's bell. The short
way's two waits (a spin where every rank has a core, yields where not)
are both taken, whatever the machine's cores."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import numpy as np

import collectives as C
import mesh
from collectives.shm import board, quick, tiny, waiting

N = 3


def _counting(names: tuple[str, ...], taken: list[str]) -> dict[str, Any]:
    """Wrap collectives.shm.tiny's calls ``names`` so that each call that
    took the short way (returned a result) appends its name to ``taken``;
    the real calls, to put back."""
    real = {name: getattr(tiny, name) for name in names}

    def counted(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            res = real[name](*args, **kwargs)
            if res is not None:
                taken.append(name)
            return res
        return call
    for name in real:
        setattr(tiny, name, counted(name))
    return real


def _caught(fn: Any) -> str:
    try:
        fn()
    except (mesh.MeshError, TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return "ok"


def _results(world: Any) -> list:
    """Repeated calls (the first settles the short way, the next take it)
    against numpy, over ops, dtypes and shapes; every other plan spins
    where the others yield."""
    rng = np.random.default_rng(7)
    wrong = []
    for k, (op, dtype, shape) in enumerate([("sum", np.float32, (2,)),
                                            ("avg", np.float64, (2, 3)),
                                            ("max", np.int16, ()), ("bxor", np.uint8, (5,)),
                                            ("prod", np.complex64, (3,)),
                                            ("avg", np.int64, ())]):    # (truncated)
        for i in range(4):
            plan = tiny._plans.get(world, {}).get((np.dtype(dtype), shape, op))
            if plan is not None:
                plan.quick.spin = board._BUSY_S if k % 2 == 0 else 0.0
            xs = [np.array(rng.integers(-3, 4, size=shape), dtype=dtype)
                  for _ in range(world.size)]
            if dtype == np.complex64:
                xs = [x + np.complex64(1j) * x[::-1] for x in xs]
            a = xs[world.rank].copy()
            C.all_reduce(world, a, op=op)
            want = xs[0].copy()
            for x in xs[1:]:
                want = {"sum": np.add, "avg": np.add, "max": np.maximum, "bxor": np.bitwise_xor,
                        "prod": np.multiply}[op](want, x)
            if op == "avg":
                want = want / world.size
            if a.shape != want.shape or not np.array_equal(a, want.astype(dtype)):
                wrong.append((op, i, a.tolist(), want.tolist()))
    return wrong


def on_both_ways(world: Any) -> dict:
    out: dict[str, Any] = {"wrong": _results(world), "mapped": board.mapped(world),
                           "plans": len(tiny._plans.get(world, {}))}
    ones = np.ones(4, np.float32)
    C.all_reduce(world, ones)        # settles (float32, (4,), sum): later calls are short
    # rank 1 takes the long way with another shape; the others the short way
    out["shape"] = _caught(lambda: C.all_reduce(world, np.ones(4 if world.rank != 1 else 5,
                                                               np.float32)))
    # rank 1 fails on its own argument and aborts the call the others make the short way
    out["bad op"] = _caught(lambda: C.all_reduce(world, np.ones(4, np.float32),
                                                 op="sum" if world.rank != 1 else "nope"))
    # rank 2 comes too late for rank 0's short call with a timeout: only once
    # rank 0 has timed out and said so (its abort goes first on the same
    # connection, so rank 2 has it when it calls), whatever the machine's speed
    if world.rank == 2:
        world.recv(0, tag=5, timeout=60.0)
    out["timeout"] = _caught(lambda: C.all_reduce(world, ones, timeout=0.3 if world.rank == 0
                                                  else None))
    if world.rank == 0:
        world.send("timed out", 2, tag=5)
    C.barrier(world)
    a = np.full(4, world.rank + 1, np.float32)
    C.all_reduce(world, a)
    out["after"] = a.tolist()
    # every rank on the short way, rank 1 with another op, then another dtype
    for x in (np.ones(4), np.ones(4, np.float32)):
        C.all_reduce(world, x, op="max")
    out["op"] = _caught(lambda: C.all_reduce(world, ones, op="max" if world.rank == 1 else "sum"))
    out["dtype"] = _caught(lambda: C.all_reduce(world, np.ones(4) if world.rank == 1 else ones,
                                                op="max"))
    # a peer late past the short wait: the others go on with a Round, same result
    if world.rank == 2:
        time.sleep(0.05)
    a = np.full(4, world.rank + 1, np.float32)
    C.all_reduce(world, a)
    out["late"] = a.tolist()
    out["plans"] = sum(not isinstance(k[0], str) for k in tiny._plans.get(world, {}))
    out.update(_scattered_and_gathered(world))
    return out


def _rooted(world: Any, x: np.ndarray) -> tuple[list, list]:
    """A broadcast from rank 1 and a max reduced into rank 2 of x[:2]."""
    b, c = x[:2].copy(), x[:2].copy()
    C.broadcast(world, b, root=1)
    C.reduce(world, c, root=2, op="max")
    return b.tolist(), c.tolist()


def _scattered_and_gathered(world: Any) -> dict:
    """reduce_scatter, all_gather, broadcast and reduce the short way (once
    a first call has settled it), with the same guarantees: a mismatch, a
    bad argument, a timeout on one rank raise on every rank; a late peer,
    the same result."""
    rank, out = world.rank, {}
    x = np.arange(2 * N, dtype=np.float32) + rank
    for _ in range(3):
        out["scattered"] = C.reduce_scatter(world, x).tolist()
        out["gathered"] = C.all_gather(world, x[:2]).tolist()
        out["rooted"] = _rooted(world, x)
    out["bc root"] = _caught(lambda: C.broadcast(world, x[:2].copy(), root=1 if rank else 2))
    out["reduce op"] = _caught(lambda: C.reduce(world, x[:2].copy(), root=2,
                                                op="max" if rank != 1 else "min"))
    out["rs shape"] = _caught(lambda: C.reduce_scatter(world, x if rank != 1 else x[:N]))
    out["rs op"] = _caught(lambda: C.reduce_scatter(world, x, op="max" if rank == 1 else "sum"))
    out["rs bad op"] = _caught(lambda: C.reduce_scatter(world, x, op="nope" if rank == 1
                                                        else "sum"))
    out["ag dtype"] = _caught(lambda: C.all_gather(world, x[:2] if rank != 1 else np.ones(2)))
    if rank == 2:       # (as all_reduce's above: rank 2 calls once rank 0 has timed out)
        world.recv(0, tag=6, timeout=60.0)
    out["rs timeout"] = _caught(lambda: C.reduce_scatter(world, x, timeout=0.3 if rank == 0
                                                         else None))
    if rank == 0:
        world.send("timed out", 2, tag=6)
    C.barrier(world)
    for _ in range(2):
        if rank == 2:
            time.sleep(0.05)
        out["rs late"] = C.reduce_scatter(world, x).tolist()
        out["ag late"] = C.all_gather(world, x[:2]).tolist()
        if rank == 0:
            time.sleep(0.05)
        out["rooted late"] = _rooted(world, x)
    out["short"] = sorted(k[0] for k in tiny._plans.get(world, {}) if isinstance(k[0], str))
    return out


def test_the_short_way_matches_numpy_and_keeps_the_guarantees() -> None:
    res = mesh.spawn(on_both_ways, N, timeout=90)
    total = float(sum(range(1, N + 1)))
    for rank, r in enumerate(res):
        assert r["wrong"] == [], f"rank {rank}: {r['wrong']}"
        assert r["mapped"] and r["plans"] == 9, r
        text = r["shape"]
        assert text.startswith("MismatchError") and "shape=[4]" in text and "shape=[5]" in text, \
            f"rank {rank}: {text}"
        text = r["bad op"]
        if rank == 1:
            assert text.startswith("ValueError: rank 1: all_reduce on group world: unknown "
                                   "reduction op"), text
        else:
            assert text.startswith("MeshError") and "rank 1" in text and "nope" in text, text
        text = r["timeout"]
        assert text.startswith("MeshTimeoutError") and "rank 0" in text, f"rank {rank}: {text}"
        assert r["after"] == [total] * 4 and r["late"] == [total] * 4, r
        text = r["op"]
        assert text.startswith("MismatchError") and "op=sum" in text and "op=max" in text, \
            f"rank {rank}: {text}"
        text = r["dtype"]
        assert text.startswith("MismatchError") and "float32" in text and "float64" in text, \
            f"rank {rank}: {text}"
        sums = (3 * np.arange(2 * N) + total - N).tolist()
        rows = [[float(j), j + 1.0] for j in range(N)]
        assert r["short"] == ["all_gather", "broadcast", "reduce", "reduce_scatter"], r
        assert r["scattered"] == r["rs late"] == sums[2 * rank:2 * rank + 2], r
        assert r["gathered"] == r["ag late"] == rows, r
        mine = [float(rank), rank + 1.0]
        assert r["rooted"] == r["rooted late"] == ([1.0, 2.0], rows[-1] if rank == 2 else mine), r
        for key, words in [("rs shape", ["shape=[6]", "shape=[3]"]),
                           ("rs op", ["op=sum", "op=max"]), ("ag dtype", ["float32", "float64"]),
                           ("bc root", ["root=1", "root=2"]), ("reduce op", ["op=max", "op=min"])]:
            assert r[key].startswith("MismatchError") and all(w in r[key] for w in words), \
                f"rank {rank} {key}: {r[key]}"
        text = r["rs bad op"]
        if rank == 1:
            assert text.startswith("ValueError: rank 1: reduce_scatter on group world: unknown "
                                   "reduction op"), text
        else:
            assert text.startswith("MeshError") and "rank 1" in text and "nope" in text, text
        text = r["rs timeout"]
        assert text.startswith("MeshTimeoutError") and "rank 0" in text, f"rank {rank}: {text}"


def _large(world: Any) -> list:
    """Large all_reduces, back to back, against numpy: through the arenas
    (collectives.shm.local; board.ARENA lowered to 256 KiB) and, above
    that, across processes. Rank 0 reads its peers' chunks late, so the
    others leave each call first and must not rewrite their arenas before
    it has read them; one call starts late on rank 1."""
    board.ARENA = 256 << 10
    read = board.Round.arena_of
    if world.rank == 0:
        def late(self: Any, peer: int, dtype: Any, lo: int, hi: int, out: Any) -> Any:
            time.sleep(0.002)
            return read(self, peer, dtype, lo, hi, out)
        board.Round.arena_of = late     # type: ignore[method-assign]
    wrong = []
    for i, (count, dtype) in enumerate([(40000, "float32"), (100000, "int16"), (3, "float32"),
                                        (32768, "float64"), (49152, "complex64"),
                                        (70001, "int64"), (50001, "float32")]):
        if world.rank == 1 and i == 2:
            time.sleep(0.3)
        xs = [((np.arange(count) * (r + 1) + i) % 7).astype(dtype) for r in range(world.size)]
        a = xs[world.rank].copy()
        C.all_reduce(world, a, algorithm="ring")
        if not np.array_equal(a, sum(xs[1:], xs[0])):
            wrong.append((count, dtype))
    board.Round.arena_of = read         # type: ignore[method-assign]
    return wrong


def crowded(world: Any) -> dict:
    """More ranks than cores (as the board sees it): a waiting rank sleeps
    on the late peer's bell, and the peer's ring ends the sleep (a sleep
    that ran out its long timeout would be a ring missed)."""
    board._CORES = quick._CORES = 1
    waiting._BELL_WAIT_S = 5.0
    sleeps: list[tuple[float, bool]] = []
    wait = board.bell.wait

    def counted(addr: int, value: int, timeout: float) -> bool:
        woken = wait(addr, value, timeout)
        sleeps.append((timeout, woken))
        return woken
    board.bell.wait = counted
    wrong = _large(world)
    return {"wrong": wrong, "long sleeps": [w for t, w in sleeps if t > 1]}


def test_large_calls_through_arenas_and_bells() -> None:
    res = mesh.spawn(crowded, N, timeout=90)
    for rank, r in enumerate(res):
        assert r["wrong"] == [], f"rank {rank}: {r}"
        assert all(r["long sleeps"]), f"rank {rank}: a sleep on a bell was not rung: {r}"
    assert any(r["long sleeps"] for r in res), res


def pieces(world: Any) -> list[str]:
    """The large same-host reductions (all_reduce across processes, reduce,
    reduce_scatter: collectives.shm.local_reduce._reduce_chunk) with its PIECE
    cut to a few KiB that divides no chunk, and at its default: the same
    bytes either way, on every rank, and numpy's sum. Returns what differed."""
    from collectives.shm import local_reduce
    board.ARENA = 64 << 10          # (all_reduce across processes, not through the arenas)
    rng = np.random.default_rng([7, world.rank])
    n, bad = world.size, []
    for count, dtype in [(300_001, "float32"), (70_001, "float64"), (90_000, "complex64")]:
        x = (1 + 0.1 * rng.standard_normal(count)).astype(dtype)
        xs = C.all_gather(world, x)
        want = sum(xs[1:], xs[0].copy())
        got = {}
        for piece in (local_reduce.PIECE, 4100):
            default, local_reduce.PIECE = local_reduce.PIECE, piece
            try:
                a = x.copy()
                C.all_reduce(world, a, algorithm="ring")
                m = count // n * n
                share = C.reduce_scatter(world, x[:m].copy())
                root = x.copy()
                C.reduce(world, root, root=1)
            finally:
                local_reduce.PIECE = default
            got[piece] = [a.tobytes(), share.tobytes(), root.tobytes() if world.rank == 1 else b""]
            everyone = C.all_gather(world, np.frombuffer(a.tobytes(), np.uint8))
            if any(e.tobytes() != everyone[0].tobytes() for e in everyone):
                bad.append(f"{dtype} piece {piece}: the ranks' all_reduce differ")
            if not np.allclose(a, want, rtol=1e-5):
                bad.append(f"{dtype} piece {piece}: all_reduce is not the sum")
        if len(set(map(tuple, got.values()))) != 1:
            bad.append(f"{dtype}: another piece size gave other bytes")
    return bad


def test_large_reductions_give_the_same_bytes_whatever_their_pieces() -> None:
    for rank, bad in enumerate(mesh.spawn(pieces, N, timeout=90)):
        assert bad == [], f"rank {rank}: {bad}"


def unmapped(world: Any) -> dict:
    board._attach = lambda *args: None      # as where /proc/pid/fd cannot be opened
    board._CORES = quick._CORES = 1         # (the arenas: only where ranks outnumber cores)
    wrong = _results(world)
    got = {"wrong": wrong, "mapped": board.mapped(world), "large": _large(world),
           "shape": _caught(lambda: C.all_reduce(world, np.ones(3 if world.rank else 2))),
           "all_to_all_v": _exchanged(world, False)}
    if world.rank == 1:     # the last call before close: rank 1 reads its peer's post late
        post = board.Round.post

        def late(self: Any, *args: Any, **kwargs: Any) -> None:
            post(self, *args, **kwargs)
            time.sleep(0.3)
        board.Round.post = late     # type: ignore[method-assign]
    got["last"] = _caught(lambda: C.all_reduce(world, np.ones(4)))
    world.close()
    return got


def test_boards_that_cannot_be_mapped_are_read_across_processes() -> None:
    """(The last call: rank 0 leaves it first and closes. Its close waited
    for rank 1's answer to its goodbye, not for rank 1 to finish reading
    its board: rank 1's read failed, "it closed its mesh".)"""
    for rank, r in enumerate(mesh.spawn(unmapped, 2, timeout=60)):
        assert r["wrong"] == [] and r["large"] == [] and r["all_to_all_v"] == [] \
            and not r["mapped"], r
        assert r["shape"].startswith("MismatchError") and "shape=[3]" in r["shape"], r
        assert r["last"] == "ok", (rank, r["last"])


def killed(world: Any, out: str) -> None:
    """Rank 2 is killed between two short calls; the others, waiting for it
    in the next, write what they raised and how long it took them (a rank
    still finishing the call rank 2 left may raise in that one). The calls
    go round all_reduce, reduce_scatter and all_gather, a reduce_scatter
    first after the kill."""
    a = np.ones(2 * N, np.float32)
    calls = [lambda: C.all_reduce(world, a), lambda: C.reduce_scatter(world, a),
             lambda: C.all_gather(world, a[:2])]
    _killed_between(world, out, lambda i: calls[i % 3](), 49)


def _killed_between(world: Any, out: str, call: Callable[[int], Any], before: int) -> None:
    """Make ``call(i)`` for i up from 0, rank 2 killed after ``before`` of
    them; the others write what they raised and how long it took them."""
    t0 = time.monotonic()
    try:
        for i in range(before):
            call(i)
        if world.rank == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.monotonic()
        for i in range(before, 1000):
            call(i)
        text = "no error"
    except mesh.MeshError as e:
        text = f"{type(e).__name__}: {e}"
    Path(out, str(world.rank)).write_text(f"{time.monotonic() - t0:.2f} {text}")


def _survivors_name_rank_2(worker: Callable[[Any, str], None], tmp_path: Path) -> None:
    """``worker`` (as _killed_between) on N ranks: the survivors raised
    LostPeerError naming rank 2, soon after its death."""
    env = {"MESH_PEER_TIMEOUT": "1.5", "MESH_HEARTBEAT": "0.1"}
    with pytest.raises(mesh.WorkerError) as err:
        # settle: the survivors write after rank 2's death, slowly when loaded
        mesh.spawn(worker, N, str(tmp_path), timeout=60, env=env, settle=20)
    assert err.value.rank == 2
    for rank in (0, 1):
        took, text = Path(tmp_path, str(rank)).read_text().split(" ", 1)
        assert text.startswith("LostPeerError") and "2" in text, f"rank {rank}: {text}"
        assert float(took) < 15, f"rank {rank} took {took}s: {text}"


@pytest.mark.timeout(90)
def test_a_peer_killed_between_short_calls_is_named(tmp_path: Path) -> None:
    _survivors_name_rank_2(killed, tmp_path)


def _many_groups(world: Any) -> tuple[int, int]:
    import gc
    import os
    C.all_reduce(world, np.ones(1))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(40):
        g = world.group([0, 1])
        a = np.full(1000, float(g.rank + 1))
        C.all_reduce(g, a, timeout=30)
        assert a[0] == 3.0
        del g
    gc.collect()
    return before, len(os.listdir("/proc/self/fd"))


def test_short_lived_groups_hold_no_file_descriptor() -> None:
    """A group's same-host board holds no descriptor once set up (Python's
    mmap kept a duplicate of each mapping: three a group, never freed while
    the mesh lived, so a process making groups by the hundred ran out)."""
    for before, after in mesh.spawn(_many_groups, 2, timeout=120):
        assert after <= before + 2, (before, after)


def _forgotten(world: Any) -> list[int]:
    """A dropped group is forgotten (its name, its aborts); a message for it
    that comes later is dropped; aborts are kept for the latest calls only."""
    import gc

    import mesh.inbox
    mesh.inbox._KEEP_ABORTED = 8        # (4096: for 20 calls, 8)
    inbox = world._t.inbox
    for _ in range(20):
        with pytest.raises(mesh.MismatchError):
            C.all_reduce(world, np.ones(2 + world.rank))
    kept = len(inbox.aborted)
    g = world.group([0, 1])
    gid = g.gid
    with pytest.raises(mesh.MismatchError):
        C.all_reduce(g, np.ones(2 + world.rank))
    if world.rank == 0:
        del g
        gc.collect()
    C.barrier(world)                    # rank 0 forgets the group here
    if world.rank == 1:
        g.send(np.ones(3), 0, tag=5)    # too late: rank 0 drops it
    C.barrier(world)
    time.sleep(0.2)
    late = sum(1 for k in inbox.matcher._unexpected if k[0] == gid)
    return [kept, gid in world._t.groups, late, sum(k[0] == gid for k in inbox.aborted)]


def test_dropped_groups_are_forgotten_and_aborts_kept_for_the_latest_calls() -> None:
    """Every group ever made kept its entry in the transport, and every
    aborted call its record, for the mesh's life (a job making groups or
    catching mismatches in its loop grew by 0.3-1 KiB each)."""
    got = mesh.spawn(_forgotten, 2, timeout=60)
    assert got[0] == [8, False, 0, 0], got
    assert got[1][0] == 8 and got[1][1], got


def _dropped_rooted_groups(world: Any) -> tuple[int, int]:
    import gc
    import weakref
    C.all_reduce(world, np.ones(1))
    refs = []
    for i in range(20):
        g = world.group([0, 1])
        a = np.full(10, float(g.rank + i))
        C.broadcast(g, a, root=i % 2)      # a call with a root leaves a watch on its tag
        C.reduce(g, a, root=0)
        refs.append(weakref.ref(g))
        del g
    gc.collect()
    C.all_reduce(world, np.ones(1))        # the next call withdraws the dropped groups' watches
    inbox = world._t.inbox
    others = sum(1 for p in inbox.matcher.posted() if p.group != 0)
    return sum(r() is not None for r in refs), others


def _mapped_groups(world: Any) -> tuple[int, int]:
    import gc

    def maps() -> int:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    C.all_reduce(world, np.ones(1))
    before = maps()
    for i in range(100):
        g = world.group(list(range(world.size)))
        a = np.full(8, float(g.rank + i))
        C.all_reduce(g, a)          # sets the group's boards up
        C.broadcast(g, a, root=i % world.size)
        del g
    gc.collect()
    C.all_reduce(world, np.ones(1))
    return before, maps()


def test_dropped_groups_unmap_their_boards() -> None:
    """Every dropped group's same-host board (this rank's, and its mapping
    of each peer's) stayed mapped until the mesh closed: a process making
    groups by the thousand ran out of mappings (MemoryError at 16,000
    four-rank groups). Peers read a board through mappings of their own,
    so it goes with the group."""
    for before, after in mesh.spawn(_mapped_groups, 3, timeout=120):
        assert after <= before + 20, (before, after)


def test_dropped_groups_are_freed_with_their_watches() -> None:
    """A group whose collectives had a root (their watches kept posted
    receives that held it) stayed alive, its state and receives with it,
    until the mesh closed: a process making groups by the thousand grew."""
    env = {"MESH_CMA": "0"}     # the socket paths: same-host ones post no watch
    for alive, posted in mesh.spawn(_dropped_rooted_groups, 2, timeout=120, env=env):
        assert (alive, posted) == (0, 0)


def _twins(world: Any) -> list[float]:
    """Two communicators made with one group id (collectives.host.hier makes
    its sub-groups so); one dropped, the other goes on working."""
    import gc

    from collectives.host import hier
    g = world.group(list(range(world.size)))
    members = tuple(range(world.size))
    a, b = hier._sub(g, members, "twin"), hier._sub(g, members, "twin")
    assert a.gid == b.gid and a is not b
    C.all_reduce(a, np.ones(2))
    del b
    gc.collect()
    world.group([0, 1])         # a group made: the dropped ones are swept
    return C.all_reduce(a, np.full(3, 1.0 + world.rank), timeout=20).tolist()


def test_a_group_id_is_forgotten_when_its_last_communicator_goes() -> None:
    """The group's id was forgotten when either of two communicators made
    with it was dropped: the other's messages were then thrown away as
    late ones, and its collectives timed out blaming peers that had sent."""
    for env in ({}, {"MESH_CMA": "0", "MESH_SHM": "0"}):     # (boards; every byte by socket)
        assert mesh.spawn(_twins, 2, timeout=60, env=env) == [[3.0] * 3] * 2, env


def _callback_waits(world: Any) -> list[Any]:
    """A done-callback of one async call waits for a call queued after it
    (before the callback ran, or by another thread while it runs)."""
    import threading
    out: list[Any] = []
    for later_by_thread in (False, True):
        done = threading.Event()
        a, b = np.ones(4), np.ones(4)
        w1 = C.all_reduce(world, a, async_op=True)
        box: list[Any] = []
        if not later_by_thread:
            box.append(C.all_reduce(world, b, async_op=True))

        def cb(_: Any, box: list = box, done: threading.Event = done) -> None:
            if not box:         # another thread makes the call while this callback runs
                th = threading.Thread(target=lambda: box.append(
                    C.all_reduce(world, b, async_op=True)))
                th.start()
                th.join()
            out.append(box[0].wait(20).tolist())
            done.set()
        w1.add_done_callback(cb)
        assert done.wait(30)
    return out


def test_a_done_callback_may_wait_for_a_call_queued_behind_it() -> None:
    """It waited for ever (the queued call behind the callback on the lane)
    or until its timeout; the lane now goes on in a new thread first."""
    assert mesh.spawn(_callback_waits, 2, timeout=90) == [[[2.0] * 4] * 2] * 2


def _bfloat16_beside_float32(world: Any, hosts: str) -> list:
    """Short calls of float32 (3,) settle its plan; then bfloat16 on rank 0
    only (widened to float32 whose dtype carries bfloat16's name), then on
    every rank."""
    import torch
    if hosts:
        world.hosts[:] = ["fake-" + h for h in hosts]
    said = []
    for _ in range(3):
        t = torch.ones(3)
        C.all_reduce(world, t)
        said.append(t.tolist())
    t = torch.ones(3, dtype=torch.bfloat16 if world.rank == 0 else torch.float32)
    said.append(_caught(lambda: C.all_reduce(world, t)))
    for _ in range(3):      # bfloat16 everywhere: its own plan, and the right sums
        t = torch.full((3,), 1.5, dtype=torch.bfloat16)
        C.all_reduce(world, t)
        said.append(t.tolist())
    # a bad MESH_COLL_ALGO met by a settled short call (its tuning read first) is
    # named as the long way names it: the rank and the call
    os.environ["MESH_COLL_ALGO"] = "bogus"
    try:
        said.append(_caught(lambda: C.all_reduce(world, np.ones(3, np.float32))))
    finally:
        del os.environ["MESH_COLL_ALGO"]
    return said


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hosts", ["", "abab"], ids=["one-host", "two-hosts"])
def test_a_bfloat16_call_is_not_taken_for_a_float32_one(hosts: str) -> None:
    """numpy's dtype equality ignores metadata, so a bfloat16 all_reduce
    (float32 named bfloat16) found the plan a float32 call of its shape had
    settled and went the short way under the float32 fingerprint: a rank
    calling bfloat16 where the others call float32 got no MismatchError."""
    n = len(hosts) or N
    for rank, said in enumerate(mesh.spawn(_bfloat16_beside_float32, n, hosts, timeout=60)):
        assert said[:3] == [[float(n)] * 3] * 3, said
        assert said[3].startswith("MismatchError") and "dtype=bfloat16" in said[3] \
            and "dtype=float32" in said[3], f"rank {rank}: {said[3]}"
        assert said[4:7] == [[1.5 * n] * 3] * 3, said
        assert said[7].startswith(f"ValueError: rank {rank}: all_reduce on group world: "
                                  f"MESH_COLL_ALGO='bogus'"), said[7]


def _late_complex_products(world: Any, hosts: str) -> list:
    """Tiny complex products, the last rank late for each (the others wait
    past the short way's spin and go on with a Round): each call's bits
    on every rank (as integers)."""
    if hosts:
        world.hosts[:] = ["fake-" + h for h in hosts]
    rng = np.random.default_rng(3)
    seen = []
    for shape in [(), (1,)]:
        for _ in range(12):
            x = rng.standard_normal((world.size, 2))
            a = np.array(x[world.rank, 0] + 1j * x[world.rank, 1], np.complex64).reshape(shape)
            if world.rank == world.size - 1:
                time.sleep(0.005)
            C.all_reduce(world, a, op="prod")
            seen.append(a.reshape(-1).view(np.uint64).tolist())
    return seen


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hosts", ["", "abab"], ids=["one-host", "two-hosts"])
def test_a_late_rank_gets_the_bits_of_the_ranks_that_waited(hosts: str) -> None:
    """numpy computes a one-element ufunc whose output is its first operand
    another way (a complex product rounded otherwise): the short way's later
    combines, and a Round's, wrote into their first operand, the short
    way's first one into the caller's array, so a rank that waited past the
    spin (a Round) and one that came late (the short way) returned other
    bits of the same all_reduce, a third of the calls (two hosts: the
    columns then kept them apart)."""
    seen = mesh.spawn(_late_complex_products, len(hosts) or 2, hosts, timeout=60)
    for rank, bits in enumerate(seen[1:], 1):
        assert bits == seen[0], f"rank {rank} differs from rank 0 in calls " \
            f"{[i for i, (a, b) in enumerate(zip(bits, seen[0])) if a != b]}"


def _moved(world: Any) -> list:
    """gather, scatter and all_to_all of every dtype, from no element to
    the largest post the board holds inline (and one past it: the long
    way), each call made three times (the first settles the short way, the
    next take it) against numpy and against the long way
    (collectives.host.paths) byte for byte; and the uneven calls' counts
    exchanges. Returns what differed."""
    import msgpack
    from collectives.host import paths
    from mesh.tensors import BFLOAT16, dtype_name
    n, rank, bad = world.size, world.rank, []
    room = tiny.MAX_BYTES
    for dt in [np.bool_, np.int8, np.uint16, np.int32, np.int64, np.float16, np.float32,
               np.float64, np.complex64, np.complex128, BFLOAT16]:
        item = np.dtype(dt).itemsize

        def make(count: int, seed: int) -> np.ndarray:
            return ((np.arange(count) * 7 + seed) % 5).astype(dt)
        meta = len(msgpack.packb([np.dtype(dt).str, [1], dt is BFLOAT16]))   # (the rows')
        for what, most in [("gather", room // item), ("all_to_all", room // (n * item)),
                           ("scatter", (room - meta) // (n * item))]:
            for k in sorted({0, 1, 3 % (most + 1), most, most + 1}):
                for i in range(3):
                    if what == "gather":
                        xs = [make(k, 11 * p + i) for p in range(n)]
                        got = C.gather(world, xs[rank], root=n - 1)
                        long = paths.gather(world, xs[rank], root=n - 1)
                        want = np.stack(xs) if rank == n - 1 else None
                    elif what == "all_to_all":
                        xs = [make(n * k, 11 * p + i).reshape(n, k) for p in range(n)]
                        got = C.all_to_all(world, xs[rank])
                        long = paths.all_to_all(world, xs[rank])
                        want = np.stack([x[rank] for x in xs])
                    else:
                        rows = make(n * k, i).reshape(n, k)
                        said = {} if rank == 0 else {"dtype": dt, "shape": (k,)}
                        got = C.scatter(world, rows if rank == 0 else None, root=0, **said)
                        long = paths.scatter(world, rows if rank == 0 else None, root=0,
                                             **said)
                        want = rows[rank]
                    for way, res in (("short", got), ("long", long)):
                        if (want is None) != (res is None) or want is not None and (
                                res.dtype != want.dtype or res.shape != want.shape
                                or res.tobytes() != want.tobytes()):
                            bad.append((what, str(np.dtype(dt)), k, i, way))
                key = tiny.plan_key(np.dtype(dt), (n, k) if what != "gather" else (k,),
                                    (None, n - 1) if what == "gather" else (None, 0)
                                    if what == "scatter" else None, what)
                if what == "scatter" and rank:
                    key = ("scatter row", (np.dtype(dt), dtype_name(np.dtype(dt))), (k,), 0)
                plan = tiny._plans.get(world, {}).get(key)
                if (plan is not None) != (0 < k <= most):
                    bad.append((what, str(np.dtype(dt)), k, "short way", plan is not None))
    taken: list[str] = []
    real = _counting(("all_to_all", "all_gather"), taken)
    try:
        for i in range(3):      # (a loop's counts exchanges: the short way from the second)
            sends = [(rank + j) % 3 for j in range(n)]
            got = C.all_to_all_v(world, np.arange(sum(sends)) + 100 * rank, sends)
            want = np.concatenate([(np.arange(sum((p + j) % 3 for j in range(n))) + 100 * p)[
                sum((p + j) % 3 for j in range(rank)):][:(p + rank) % 3] for p in range(n)])
            if not np.array_equal(got, want):
                bad.append(("all_to_all_v", i, got.tolist(), want.tolist()))
            got = C.all_gather_v(world, np.full(rank % 2 + 1, rank))
            if got.tolist() != [p for p in range(n) for _ in range(p % 2 + 1)]:
                bad.append(("all_gather_v", i, got.tolist()))
    finally:
        for name, call in real.items():
            setattr(tiny, name, call)
    if taken.count("all_gather") < 2 or taken.count("all_to_all") < 2:
        bad.append(("counts exchanges: the short way not taken twice each", taken))
    return bad


@pytest.mark.parametrize("n", [2, 4])
def test_gather_scatter_and_all_to_all_take_the_short_way_with_the_long_ways_bits(
        n: int) -> None:
    for rank, bad in enumerate(mesh.spawn(_moved, n, timeout=120)):
        assert bad == [], f"rank {rank}: {bad}"


def _moved_mismatches(world: Any) -> dict:
    """gather, scatter and all_to_all the short way beside ranks that call
    something else: a mismatch raises on every rank (a scatter's root too
    where the others refuse its rows, dtype=), and so does a root's
    timeout; a root that scatters other rows than the others settled, or
    a late rank, the right result."""
    rank, n, out = world.rank, world.size, {}
    x = np.arange(2, dtype=np.float32) + rank
    rows = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
    for _ in range(2):
        for root in (0, 1):
            C.gather(world, x, root=root)
            C.scatter(world, rows if rank == root else None, root=root)
        C.all_to_all(world, rows)
        C.scatter(world, rows.astype(np.int32) if rank == 0 else None, root=0,
                  dtype=np.int32 if rank else None)
    out["g dtype"] = _caught(lambda: C.gather(world, x if rank != 1 else x.astype(np.float64)))
    out["g root"] = _caught(lambda: C.gather(world, x, root=1 if rank == 1 else 0))
    out["a2a shape"] = _caught(lambda: C.all_to_all(world, rows if rank != 1 else rows[:, :1]))
    out["s root"] = _caught(lambda: C.scatter(world, rows, root=1 if rank == 1 else 0))
    # the others want int32 rows (their calls say so, as the last call's did): the root
    # sends float32
    out["s want"] = _caught(lambda: C.scatter(world, rows if rank == 0 else None, root=0,
                                              dtype=np.int32 if rank else None))
    # the others said nothing of the rows: whatever the root scatters comes back
    got = [C.scatter(world, r if rank == 0 else None, root=0) for r in
           (rows, rows.astype(np.float64), rows[:, :1].copy(), rows)]
    out["s other rows"] = [(str(g.dtype), g.tolist()) for g in got]
    # the root times out waiting for rank 2, which calls only once it has (as
    # all_reduce's above): every rank raises its timeout
    if rank == 2:
        world.recv(0, tag=7, timeout=60.0)
    out["s timeout"] = _caught(lambda: C.scatter(world, rows if rank == 0 else None, root=0,
                                                 timeout=0.3 if rank == 0 else None))
    if rank == 0:
        world.send("timed out", 2, tag=7)
    C.barrier(world)
    for late in (n - 1, 0):
        if rank == late:
            time.sleep(0.05)
        out[f"late {late}"] = (C.gather(world, x, root=1), C.scatter(
            world, rows if rank == 1 else None, root=1).tolist(), C.all_to_all(world, rows))
    return out


def test_gather_scatter_and_all_to_all_keep_the_guarantees_on_the_short_way() -> None:
    res = mesh.spawn(_moved_mismatches, N, timeout=90)
    for rank, r in enumerate(res):
        for key, words in [("g dtype", ["float32", "float64"]), ("g root", ["root=0", "root=1"]),
                           ("a2a shape", ["shape=[3, 2]", "shape=[3, 1]"]),
                           ("s root", ["root=0", "root=1"])]:
            assert r[key].startswith("MismatchError") and all(w in r[key] for w in words), \
                f"rank {rank} {key}: {r[key]}"
        text = r["s want"]
        if rank:
            assert text.startswith("MismatchError") and "int32" in text and "float32" in text, \
                text
        else:
            assert text.startswith(("MismatchError", "MeshError")) and "wants its row" in text, \
                text
        text = r["s timeout"]
        assert text.startswith("MeshTimeoutError") and "rank 0" in text, f"rank {rank}: {text}"
        row = [2.0 * rank, 2.0 * rank + 1]
        assert r["s other rows"] == [("float32", row), ("float64", row), ("float32", row[:1]),
                                     ("float32", row)], r["s other rows"]
        for late in (N - 1, 0):
            g, s, a = r[f"late {late}"]
            want = np.stack([np.arange(2, dtype=np.float32) + p for p in range(N)])
            assert (g is None) == (rank != 1) and (g is None or np.array_equal(g, want)), g
            assert s == row and np.array_equal(a, np.full((N, 2), 2 * rank) + [0, 1]), (s, a)


def _uneven_moved(world: Any) -> list:
    """all_gather_v, gather_v, reduce_scatter_v and scatter_v of several
    dtypes and uneven counts (zeros among them; the largest post the board
    holds inline, and one past it: the long way), each call made three times
    (the first settles the short way, the next take it) against numpy and
    the long way (async: it never takes the short way) byte for byte; the
    short way taken where the whole exchange fits. Returns what differed."""
    import msgpack
    from collectives.host import paths
    from mesh.tensors import BFLOAT16
    n, rank, bad = world.size, world.rank, []
    room = tiny.MAX_BYTES
    taken: list[str] = []
    real = _counting(("all_gather_v", "gather_v", "reduce_scatter_v", "scatter_v"), taken)
    try:
        for dt in [np.int8, np.float16, np.float32, np.float64, np.complex64, BFLOAT16]:
            item = np.dtype(dt).itemsize

            def make(count: int, seed: int) -> np.ndarray:
                return ((np.arange(count * 2) * 7 + seed) % 5).astype(dt).reshape(count, 2)
            most = room // (2 * item)       # (rows of 2 in the largest post)
            for counts in ([(p * 2) % 3 for p in range(n)], [0] * (n - 1) + [1],
                           [most if p == n - 1 else p % 2 for p in range(n)],
                           [most + 1] + [0] * (n - 1)):
                fits = max(counts) <= most
                for i in range(3):
                    xs = [make(k, 11 * p + i) for p, k in enumerate(counts)]
                    whole = np.concatenate(xs).view(dt)     # (bfloat16 kept)
                    before = len(taken)
                    got = C.all_gather_v(world, xs[rank], counts)
                    long = paths.all_gather_v(world, xs[rank], counts, async_op=True).wait()
                    calls = [("all_gather_v", got, long, whole)]
                    root = n - 1
                    got = C.gather_v(world, xs[rank], counts, root=root)
                    long = paths.gather_v(world, xs[rank], counts, root=root,
                                          async_op=True).wait()
                    calls.append(("gather_v", got, long, whole if rank == root else None))
                    said = {} if rank == 0 else {"dtype": dt}
                    got = C.scatter_v(world, whole if rank == 0 else None, counts, **said)
                    long = paths.scatter_v(world, whole if rank == 0 else None, counts,
                                           async_op=True, **said).wait()
                    calls.append(("scatter_v", got, long, xs[rank]))
                    meta = len(msgpack.packb([np.dtype(dt).str, [2], dt is BFLOAT16]))
                    fits_sv = whole.nbytes + meta <= room
                    fits_rs = sum(counts) <= most and dt is not BFLOAT16
                    if dt is not BFLOAT16:
                        ys = [make(sum(counts), 3 * p + i) for p in range(n)]
                        got = C.reduce_scatter_v(world, ys[rank], counts)
                        long = paths.reduce_scatter_v(world, ys[rank], counts,
                                                      async_op=True).wait()
                        lo = sum(counts[:rank])
                        total = ys[0].copy()
                        for y in ys[1:]:
                            total += y
                        want = total[lo:lo + counts[rank]]
                        calls.append(("reduce_scatter_v", got, long, want))
                    for what, res_short, res_long, want in calls:
                        for way, res in (("short", res_short), ("long", res_long)):
                            if (want is None) != (res is None) or want is not None and (
                                    res.dtype != want.dtype or res.shape != want.shape
                                    or res.tobytes() != want.tobytes()):
                                bad.append((what, str(np.dtype(dt)), counts, i, way))
                    short = taken[before:]
                    expect = [] if i == 0 else ["all_gather_v", "gather_v"] * fits + \
                        ["reduce_scatter_v"] * fits_rs + ["scatter_v"] * fits_sv
                    if sorted(short) != sorted(expect):
                        bad.append(("short way", str(np.dtype(dt)), counts, i, short, expect))
    finally:
        for name, call in real.items():
            setattr(tiny, name, call)
    return bad


@pytest.mark.parametrize("n", [2, 3, 4])
def test_uneven_calls_take_the_short_way_with_the_long_ways_bits(n: int) -> None:
    for rank, bad in enumerate(mesh.spawn(_uneven_moved, n, timeout=120)):
        assert bad == [], f"rank {rank}: {bad}"


def _uneven_mismatches(world: Any) -> dict:
    """all_gather_v, gather_v, reduce_scatter_v and scatter_v the short way
    beside a rank that calls them with other counts, dtype or op (the long way):
    every rank raises; a late rank gets the right result."""
    rank, out = world.rank, {}
    counts, other = [1, 0, 2], [1, 0, 3]
    x = np.arange(2 * counts[rank], dtype=np.float32).reshape(-1, 2) + rank
    y = np.arange(2 * sum(counts), dtype=np.float32).reshape(-1, 2) + rank
    for _ in range(2):
        C.all_gather_v(world, x, counts)
        C.gather_v(world, x, counts, root=2)
        C.reduce_scatter_v(world, y, counts)
        C.scatter_v(world, y if rank == 0 else None, counts)
    out["agv counts"] = _caught(lambda: C.all_gather_v(world, x, other if rank == 1 else counts))
    out["agv dtype"] = _caught(lambda: C.all_gather_v(
        world, x.astype(np.float64) if rank == 1 else x, counts))
    out["gv counts"] = _caught(lambda: C.gather_v(world, x, other if rank == 1 else counts,
                                                  root=2))
    out["rsv counts"] = _caught(lambda: C.reduce_scatter_v(
        world, np.concatenate([y, y[:1]]) if rank == 1 else y, other if rank == 1 else counts))
    out["sv counts"] = _caught(lambda: C.scatter_v(world, y if rank == 0 else None,
                                                   other if rank == 1 else counts))
    out["rsv op"] = _caught(lambda: C.reduce_scatter_v(world, y, counts,
                                                       op="max" if rank == 1 else "sum"))
    C.barrier(world)
    for late in (2, 0):
        if rank == late:
            time.sleep(0.05)
        out[f"late {late}"] = (C.all_gather_v(world, x, counts).tolist(),
                               C.reduce_scatter_v(world, y, counts).tolist(),
                               C.scatter_v(world, y if rank == 0 else None, counts).tolist())
    return out


def test_uneven_calls_keep_the_guarantees_on_the_short_way() -> None:
    res = mesh.spawn(_uneven_mismatches, N, timeout=90)
    for rank, r in enumerate(res):
        for key, words in [("agv counts", ["[1, 0, 2]", "[1, 0, 3]"]),
                           ("agv dtype", ["float32", "float64"]),
                           ("gv counts", ["[1, 0, 2]", "[1, 0, 3]"]),
                           ("rsv counts", ["[1, 0, 2]", "[1, 0, 3]"]),
                           ("sv counts", ["[1, 0, 2]", "[1, 0, 3]"]),
                           ("rsv op", ["sum", "max"])]:
            assert r[key].startswith("MismatchError") and all(w in r[key] for w in words) \
                and "rank 1" in r[key], f"rank {rank} {key}: {r[key]}"
        for late in (2, 0):
            got, mine, dealt = r[f"late {late}"]
            assert dealt == [[[0.0, 1.0]], [], [[2.0, 3.0], [4.0, 5.0]]][rank], dealt
            assert got == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], got
            assert mine == [[[3.0, 6.0]], [], [[9.0, 12.0], [15.0, 18.0]]][rank], mine


def _exchange_counts(n: int, case: int) -> list[list[int]]:
    """all_to_all_v's rows, rank p to rank q (M[p][q]), in ``case``: 0, 1
    uneven with zeros; 2 rank 0 sends nothing; 3 rank n - 1 receives
    nothing; 4, 5 rank 0's counts alike, the others' not (at 3 ranks and
    up: a plan of rank 0's finds other peers' counts); 6, 7, 8: case 0's,
    which _exchanged makes its own of (rank 0's post as large as the
    board holds inline, one row past it, large blocks)."""
    m = [[(2 * p + q + case) % 3 for q in range(n)] for p in range(n)]
    if case == 2:
        m[0] = [0] * n
    elif case == 3:
        for p in range(n):
            m[p][n - 1] = 0
    elif case in (4, 5) and n > 2:
        m[1][2], m[2][1] = (1, 2) if case == 4 else (2, 1)
    return m


def _exchanged(world: Any, short: bool) -> list:
    """all_to_all_v of several dtypes and count matrices (_exchange_counts),
    each called three times (the first settles the short way, the next take
    it), then some matrices again, against numpy and the long way (async:
    it never takes the short way) byte for byte; the short way taken once
    a call with this rank's counts has settled it, where every rank's post
    (its rows and counts) fit the board's inline room, and never where
    ``short`` is False (no boards, or unmapped ones)."""
    import msgpack
    from collectives.host import paths
    from mesh.tensors import BFLOAT16
    n, rank, bad = world.size, world.rank, []
    taken: list[str] = []
    real = _counting(("all_to_all_v",), taken)
    try:
        for dt in [np.int8, np.float32, np.float64, BFLOAT16]:
            item, settled = np.dtype(dt).itemsize, set()

            def make(count: int, p: int, q: int, i: int) -> np.ndarray:
                return ((np.arange(count * 2) + 7 * p + 3 * q + i) % 11).astype(dt).reshape(
                    count, 2)

            def meta(m: list[list[int]], p: int) -> int:
                return len(msgpack.packb([m[p], [m[q][p] for q in range(n)]]))
            for case in list(range(8)) + [4, 5, 0] + [8] * (dt is np.float64):
                m = _exchange_counts(n, case)
                if case == 8:       # (past the board's small form: read at the posts' address)
                    m[0][1], m[n - 1][0] = 5000, 3000
                elif case >= 6:     # (rank 0's post fills the inline room: one row more)
                    m = [[1] * n for _ in range(n)]
                    m[0][1] = (tiny.MAX_BYTES - meta(m, 0)) // (2 * item) - (n - 1)
                    m[0][1] += case - 6
                fits = all(sum(m[p]) * 2 * item + meta(m, p) <= tiny.MAX_BYTES
                           for p in range(n)) and any(map(any, m))
                sends, recvs = m[rank], [m[q][rank] for q in range(n)]
                for i in range(3):
                    a = np.concatenate([make(k, rank, q, i) for q, k in enumerate(sends)])
                    if i == 2:
                        a = np.asfortranarray(a)    # (not C-contiguous: read as it is)
                    want = np.concatenate([make(m[p][rank], p, rank, i) for p in range(n)])
                    before = len(taken)
                    got = C.all_to_all_v(world, a, sends, recvs)
                    long = paths.all_to_all_v(world, a, sends, recvs, async_op=True).wait()
                    for way, res in (("short", got), ("long", long)):
                        if res.dtype != want.dtype or res.shape != want.shape \
                                or res.tobytes() != want.tobytes():
                            bad.append((str(np.dtype(dt)), case, i, way))
                    key = (tuple(sends), tuple(recvs), a.shape)
                    if len(taken) - before != (key in settled and short):
                        bad.append(("short way", str(np.dtype(dt)), case, i, taken[before:]))
                    if fits:
                        settled.add(key)
    finally:
        for name, call in real.items():
            setattr(tiny, name, call)
    return bad


@pytest.mark.timeout(150)
@pytest.mark.parametrize("n,env", [(2, {}), (3, {}), (4, {}),
                                   (3, {"MESH_CMA": "0", "MESH_SHM": "0"})],
                         ids=["2", "3", "4", "3-sockets"])
def test_all_to_all_v_takes_the_short_way_with_the_long_ways_bits(n: int, env: dict) -> None:
    """Tiny uneven all_to_all_v: the same bytes as numpy and the long way,
    zero counts, a rank that sends nothing, one that receives nothing,
    counts that change between calls; the short way from the second call
    where the posts fit, never where the boards are off."""
    for rank, bad in enumerate(mesh.spawn(_exchanged, n, not env, timeout=120, env=env)):
        assert bad == [], f"rank {rank}: {bad}"


def _exchange_mismatches(world: Any) -> dict:
    """all_to_all_v the short way beside a rank whose counts disagree with
    another's (its receive counts, or its send counts), or whose dtype
    differs: every rank raises MismatchError naming both ranks of the pair;
    a late rank gets the right result."""
    rank, out = world.rank, {}
    m = [[1, 0, 2], [1, 1, 0], [0, 2, 1]]
    sends, recvs = m[rank], [m[q][rank] for q in range(3)]
    x = np.arange(2 * sum(sends), dtype=np.float32).reshape(-1, 2) + 10 * rank
    for _ in range(2):
        C.all_to_all_v(world, x, sends, recvs)
    # rank 1 expects a row from rank 0, which sends it none
    out["recvs"] = _caught(lambda: C.all_to_all_v(world, x, sends,
                                                  [1, 1, 2] if rank == 1 else recvs))
    # rank 2 sends rank 0 a row it does not expect (its rows as many)
    out["sends"] = _caught(lambda: C.all_to_all_v(world, x, [1, 1, 1] if rank == 2 else sends,
                                                  recvs))
    out["dtype"] = _caught(lambda: C.all_to_all_v(
        world, x.astype(np.float64) if rank == 1 else x, sends, recvs))
    C.barrier(world)
    for late in (2, 0):
        if rank == late:
            time.sleep(0.05)
        out[f"late {late}"] = C.all_to_all_v(world, x, sends, recvs).tolist()
    return out


@pytest.mark.timeout(90)
def test_all_to_all_v_keeps_the_guarantees_on_the_short_way() -> None:
    res = mesh.spawn(_exchange_mismatches, N, timeout=60)
    for rank, r in enumerate(res):
        for key, words in [("recvs", ["rank 1 expects 1 rows from rank 0, which sends 0",
                                      "recv_counts vs send_counts"]),
                           ("sends", ["rank 0 expects 0 rows from rank 2, which sends 1"]),
                           ("dtype", ["float32", "float64", "rank 1"])]:
            assert r[key].startswith("MismatchError") and all(w in r[key] for w in words), \
                f"rank {rank} {key}: {r[key]}"
        want = {0: [[0.0, 1.0], [10.0, 11.0]], 1: [[12.0, 13.0], [20.0, 21.0], [22.0, 23.0]],
                2: [[2.0, 3.0], [4.0, 5.0], [24.0, 25.0]]}[rank]
        for late in (2, 0):
            assert r[f"late {late}"] == want, (rank, late, r[f"late {late}"])


def _killed_exchanging(world: Any, out: str) -> None:
    """Rank 2 is killed between two short all_to_all_v calls; the others,
    waiting for it in the next, write what they raised and how long it
    took them."""
    n = world.size
    sends = [(world.rank + q) % 2 + 1 for q in range(n)]
    recvs = [(p + world.rank) % 2 + 1 for p in range(n)]
    x = np.ones((sum(sends), 2), np.float32)
    _killed_between(world, out, lambda i: C.all_to_all_v(world, x, sends, recvs), 20)


@pytest.mark.timeout(90)
def test_a_peer_killed_between_short_all_to_all_v_calls_is_named(tmp_path: Path) -> None:
    _survivors_name_rank_2(_killed_exchanging, tmp_path)


def _many_shapes(world: Any) -> list[int]:
    """Tiny all_reduces of 20 shapes and all_to_all_vs of 20 counts, each
    twice (the second the short way), with a group's plans capped at 8:
    results right, plans kept at most 8."""
    tiny.PLANS = 8
    kept = []
    for rnd in range(2):
        for n in range(1, 21):
            for _ in range(2):
                a = np.full(n, world.rank + 1.0)
                C.all_reduce(world, a)
                assert (a == 3.0).all(), (n, a)
            kept.append(len(tiny._plans[world]))
            counts = [n % 5, n // 5] if world.rank == 0 else [n // 5, 1]    # (sent, got)
            for _ in range(2):
                got = C.all_to_all_v(world, np.full(sum(counts), world.rank), counts, counts)
                assert got.tolist() == [0] * counts[0] + [1] * counts[1], (n, got)
            kept.append(len(tiny._plans[world]))
    return kept


@pytest.mark.timeout(60)
def test_a_group_keeps_a_bounded_number_of_short_way_plans() -> None:
    """A program whose tiny calls change shape call after call kept a plan
    for each shape for good (unbounded); a group keeps at most PLANS, the
    oldest dropped, and a call whose plan went takes the long way again."""
    for kept in mesh.spawn(_many_shapes, 2, timeout=40):
        assert max(kept) <= 8 and kept[-1] == 8, kept
