"""The runtime at the largest worlds one small machine holds: every
collective and point-to-point at 16 and 32 ranks, one spawn per size (32
only with MESH_TEST_SCALE=1: over a minute of CPU on two cores), and the
limits and rates that grow with the world (open files, ZeroMQ sockets,
heartbeats).

Each rank checks every result against numpy (inputs are small integers
derived from the rank, so every rank knows every input and sums are exact).
The world runs the same-host path (board and cross-memory attach); a
full-size group made after turning MESH_CMA off on every rank runs the socket
algorithms in the same processes (whether a group reads its peers' memory is
settled on its first collective), and two sub-groups in another order run
beside it.
"""
from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
from typing import Any, Iterator

import numpy as np
import pytest

import collectives as C
import mesh
from mesh import bench_scale
from mesh.limits import context, open_files, rank_fds
from mesh.liveness import Liveness, heartbeat_for
from mesh.peer import Peer


def _x(rank: int, shape: tuple, dtype: str = "int64", salt: int = 0) -> np.ndarray:
    """Rank ``rank``'s input: small integers, different per rank and element."""
    n = int(np.prod(shape))
    v = (np.arange(n, dtype=np.int64) * (rank + 3) + 7 * rank + salt) % 11 - 5
    return v.astype(dtype).reshape(shape)


def _sum(ranks: Any, shape: tuple, dtype: str = "int64", salt: int = 0) -> np.ndarray:
    return np.sum([_x(r, shape, dtype, salt) for r in ranks], axis=0).astype(dtype)


def _same(got: Any, want: np.ndarray, what: str, n: int) -> None:
    got = np.asarray(got)
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{what} (n={n}): got {got.dtype}{got.shape}, want {want.dtype}{want.shape}"
    assert np.array_equal(got, want), f"{what} (n={n}): wrong values"


def _point_to_point(world: Any) -> None:
    n, r = world.size, world.rank
    right, left = (r + 1) % n, (r - 1) % n
    for shape in [(5,), (300_000,)]:      # one frame; several 1 MiB frames
        req = world.isend(_x(r, shape, salt=1), right, tag=3)
        got = world.recv(left, tag=3)
        req.wait()
        _same(got, _x(left, shape, salt=1), f"ring send {shape}", n)
    got = world.sendrecv(_x(r, (4,), "float32"), right, src=left, sendtag=4, recvtag=4)
    _same(got, _x(left, (4,), "float32"), "ring sendrecv", n)
    # everyone to one rank, from any source and with any tag, then back
    sink = n - 1
    if r == sink:
        seen = set()
        for _ in range(n - 1):
            st = mesh.Status()
            got = world.recv(mesh.ANY, mesh.ANY_TAG, status=st)
            assert st.tag == 100 + st.source and st.source not in seen, (st.source, st.tag)
            seen.add(st.source)
            _same(got, _x(st.source, (3,), salt=2), f"ANY-source recv from {st.source}", n)
        assert seen == set(range(n - 1))
        reqs = [world.isend({"to": p}, p, tag=5) for p in range(n - 1)]
        for q in reqs:
            q.wait()
    else:
        world.send(_x(r, (3,), salt=2), sink, tag=100 + r)
        assert world.recv(sink, tag=5) == {"to": r}


def _collectives(g: Any, ranks: list[int], what: str) -> None:
    """Every collective on ``g``, whose rank i is world rank ranks[i]
    (inputs are made from world ranks), small and large arrays."""
    n, r, me = g.size, g.rank, ranks[g.rank]
    where = f"{what}"
    for k, shape in enumerate([(7,), (40_000,)]):       # under and over MESH_COLL_SMALL
        a = _x(me, shape, salt=k)
        C.all_reduce(g, a)
        _same(a, _sum(ranks, shape, salt=k), f"all_reduce sum {shape} on {where}", n)
        b = _x(me, shape, "int32", salt=k)
        C.all_reduce(g, b, op="max")
        want = np.max([_x(p, shape, "int32", salt=k) for p in ranks], axis=0)
        _same(b, want, f"all_reduce max {shape} on {where}", n)
        root = (n - 1, n // 2)[k]
        c = _x(me, shape, salt=k)
        C.broadcast(g, c, root=root)
        _same(c, _x(ranks[root], shape, salt=k), f"broadcast {shape} on {where}", n)
        d = _x(me, shape, salt=k)
        C.reduce(g, d, root=root)
        if r == root:
            _same(d, _sum(ranks, shape, salt=k), f"reduce {shape} on {where}", n)
        rows = (1, 1000)[k]
        _same(C.all_gather(g, _x(me, (rows,), salt=k)),
              np.stack([_x(p, (rows,), salt=k) for p in ranks]),
              f"all_gather {rows} on {where}", n)
        full = _sum(ranks, (n * rows, 2), salt=k)
        _same(C.reduce_scatter(g, _x(me, (n * rows, 2), salt=k)),
              full[r * rows:(r + 1) * rows], f"reduce_scatter {rows} on {where}", n)
        got = C.gather(g, _x(me, (rows,), salt=k), root=root)
        if r == root:
            _same(got, np.stack([_x(p, (rows,), salt=k) for p in ranks]),
                  f"gather {rows} on {where}", n)
        else:
            assert got is None
        src = _x(ranks[root], (n, rows), salt=k) if r == root else None
        _same(C.scatter(g, src, root=root), _x(ranks[root], (n, rows), salt=k)[r],
              f"scatter {rows} on {where}", n)
        blocks = (1, 300)[k]
        got = C.all_to_all(g, _x(me, (n * blocks,), salt=k))
        want = np.concatenate([_x(p, (n * blocks,), salt=k)[r * blocks:(r + 1) * blocks]
                               for p in ranks])
        _same(got, want, f"all_to_all {blocks} on {where}", n)
    C.barrier(g)
    assert C.all_gather_object(g, {"rank": me}) == [{"rank": p} for p in ranks]
    assert C.broadcast_object(g, [ranks[0], "x"], root=0) == [ranks[0], "x"]


def scale_battery(world: Any) -> int:
    n = world.size
    _point_to_point(world)
    _collectives(world, list(range(n)), "world (same-host)")
    evens = list(range(0, n, 2))[::-1]
    odds = list(range(1, n, 2))
    half = world.group(evens)
    other = world.group(odds)
    mine = half if half is not None else other
    _collectives(mine, evens if half is not None else odds, "a half group, reordered")
    os.environ["MESH_CMA"] = "0"    # groups made from here on take the socket algorithms
    order = [(3 * i + 1) % n for i in range(n)] if n % 3 else list(range(n))[::-1]
    sockets = world.group(order)
    _collectives(sockets, order, "a reordered full group (sockets)")
    C.barrier(world)
    return n


@contextlib.contextmanager
def _soft_fd_limit(soft: int) -> Iterator[None]:
    """This process (and what it starts) under a soft limit of ``soft`` open files."""
    was = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, was[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, was)


_AT_32 = pytest.mark.skipif(
    os.environ.get("MESH_TEST_SCALE", "") in ("", "0"),
    reason="32 ranks take over a minute of CPU on two cores: run with MESH_TEST_SCALE=1 "
           "(result in BENCHMARKS.md)")


@pytest.mark.slow
@pytest.mark.timeout(280)
@pytest.mark.parametrize("n", [16, pytest.param(32, marks=_AT_32)])
def test_every_collective_and_point_to_point_at_scale(n: int) -> None:
    """Under a soft limit on open files the world would outgrow (about five
    per peer in each rank, a few per rank in the parent): mesh.spawn and
    mesh.init raise it as far as they need. 16 ranks run in CI; 32 with
    MESH_TEST_SCALE=1."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < rank_fds(n):
        pytest.skip(f"the hard limit on open files ({hard}) is below what {n} ranks need")
    with _soft_fd_limit(3 * n + 32):
        assert mesh.spawn(scale_battery, n, timeout=250) == [n] * n


def test_open_files_raises_the_soft_limit_within_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 512:
        pytest.skip(f"hard limit on open files {hard}")
    with _soft_fd_limit(100):
        assert open_files(400, "test") == 400
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (400, hard)
        assert open_files(200, "test") == 400     # never lowered
    if hard != resource.RLIM_INFINITY:
        with _soft_fd_limit(100):
            assert open_files(hard + 1, "test") == hard


def test_a_context_holds_the_sockets_of_a_world_of_400() -> None:
    """Three ZeroMQ sockets per peer: past libzmq's default of 1023 from
    about 340 ranks on."""
    import zmq
    was = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_files(rank_fds(400), "test")    # as mesh.init does: a mailbox fd per socket
    ctx = context(400)
    socks = []
    try:
        for _ in range(3 * 399):
            socks.append(ctx.socket(zmq.DEALER))
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()
        resource.setrlimit(resource.RLIMIT_NOFILE, was)


def test_importing_the_runtime_leaves_asyncio_out() -> None:
    """Every rank of every world pays its imports: asyncio (and ssl, which it
    pulls in) were a tenth of them, through pyzmq's monitor parser."""
    code = ("import sys, mesh, collectives; "
            "print(sorted(m for m in ('asyncio', 'ssl', 'zmq.asyncio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_heartbeats_slow_down_in_large_worlds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank beats to every peer: at 0.5 s, 64 ranks idle sent 8,000 beats a
    second between them. A rank now beats to about 64 peers a second at
    most, and still four times per peer timeout."""
    assert [heartbeat_for(n, 10.0) for n in (2, 33, 65, 129, 1024)] == [0.5, 0.5, 1.0, 2.0, 2.5]
    assert heartbeat_for(1024, 1.0) == 0.5
    peers = [Peer(r, None, None) for r in range(129)]
    monkeypatch.delenv("MESH_HEARTBEAT", raising=False)
    monkeypatch.delenv("MESH_PEER_TIMEOUT", raising=False)
    assert Liveness(0, 1.0, peers, {}, None, None, None).heartbeat == 2.0  # type: ignore
    monkeypatch.setenv("MESH_HEARTBEAT", "0.3")
    assert Liveness(0, 1.0, peers, {}, None, None, None).heartbeat == 0.3  # type: ignore


def test_scale_bench_runs_a_small_world(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m mesh.bench --scale``'s machinery, on 2 ranks."""
    got = bench_scale.main([2], trials=1, idle=0.1)[2]
    assert got["threads"] >= 2 and got["fds"] > 0 and got["zmq"] >= 2 and got["board"] > 0
    assert 0 < got["init_med"] < got["ready"]
    assert capsys.readouterr().out.splitlines()[-1].split()[0] == "2"
