"""Persistent requests (mpi4py's Send_init, Recv_init, Prequest.Start and
Startall): a 1-D halo exchange run with them and with isend/irecv gives the
same values; restarts, MPI's rules for inactive and active ones, cancel,
PROC_NULL; the send modes' forms (Ssend_init, Bsend_init, Rsend_init); all
in one spawn."""
from __future__ import annotations

import time

import numpy as np
import pytest

import mesh

_N, _ITERS = 4, 5        # interior points a rank, iterations


def _start(world: mesh.Mesh) -> np.ndarray:
    u = np.zeros(_N + 2)
    u[1:-1] = np.arange(_N) + 10.0 * world.rank
    return u


def _halo_isend(world: mesh.Mesh, left: int, right: int) -> list[np.ndarray]:
    u, seen = _start(world), []
    for _ in range(_ITERS):
        reqs = [world.irecv(left, 1, out=u[:1]), world.irecv(right, 2, out=u[-1:]),
                world.isend(u[1:2].copy(), left, 2), world.isend(u[-2:-1].copy(), right, 1)]
        mesh.waitall(reqs)
        u[1:-1] = (u[:-2] + u[2:]) / 2 + u[1:-1] * 0.25
        seen.append(u.copy())
    return seen


def _halo_persistent(world: mesh.Mesh, left: int, right: int) -> list[np.ndarray]:
    u, seen = _start(world), []
    edges = np.empty(2)         # what the sends read at each start: set before it
    outs = [u[:1], u[-1:]]      # (views of u: each receive writes its halo cell)
    reqs = [world.recv_init(left, 1, out=outs[0]), world.recv_init(right, 2, out=outs[1]),
            world.send_init(edges[:1], left, 2), world.send_init(edges[1:], right, 1)]
    for it in range(_ITERS):
        edges[:] = u[1], u[-2]
        if it % 2:
            mesh.startall(reqs)
        else:
            for r in reqs:
                r.start()
        got = mesh.waitall(reqs) if it < 3 else [r.wait() for r in reqs]
        assert got[0] is outs[0] and got[1] is outs[1]
        assert got[2:] == [None, None] and not any(r.active for r in reqs)
        u[1:-1] = (u[:-2] + u[2:]) / 2 + u[1:-1] * 0.25
        seen.append(u.copy())
    return seen


def _rules(world: mesh.Mesh) -> None:
    """Rank 0's checks, rank 1 the peer (rank 2 waits for the end)."""
    buf = np.zeros(3)
    p = world.send_init(buf, 1, tag=5)
    q = world.recv_init(1, tag=6, out=np.zeros(3))
    assert isinstance(p, mesh.Prequest) and isinstance(p, mesh.Request)
    assert repr(q) == "<Prequest recv from rank 1 (tag 6, group world)>"
    st = mesh.Status(source=1, tag=3, nbytes=8)
    assert q.wait(status=st) is None and (st.source, st.tag, st.nbytes) == \
        (mesh.ANY_SOURCE, mesh.ANY_TAG, 0)              # inactive: at once, empty status
    assert p.test() == (True, None) and q.done() and q.status is None and not q.cancel()
    for k in range(3):          # the send reads buf's contents at each start
        buf[:] = k
        p.start()
        with pytest.raises(mesh.MeshError, match=r"rank 0: start of the persistent send to "
                           r"rank 1 \(tag 5, group world\): it is active"):
            p.start()
        assert p.active and not p.cancel()      # (a send is never cancelled)
        p.wait()
        assert not p.active and p.wait() is None
    q.start()
    with pytest.raises(mesh.MeshError, match=r"rank 0: startall \(requests\[1\]\) of the "
                       r"persistent recv from rank 1 \(tag 6, group world\): it is active"):
        mesh.startall([p, q])
    assert not p.active, "startall starts none when one is active"
    with pytest.raises(mesh.MeshError, match="listed twice"):
        mesh.startall([p, p])
    with pytest.raises(TypeError, match=r"requests\[1\] is a _Sent, not a persistent request"):
        mesh.startall([p, world.isend(1, mesh.PROC_NULL)])
    assert q.test() == (False, None) and q.active
    world.send("go", 1, tag=7)
    i, got = mesh.waitany([p, q], timeout=30)      # p inactive: skipped
    assert i == 1 and np.array_equal(got, [7, 7, 7]) and q.status.source == 1
    assert not q.active and q.wait() is None
    # cancel of an active receive: its wait raises, then it starts again
    q.start()
    assert q.cancel() and q.done()
    with pytest.raises(mesh.MeshError, match="cancelled"):
        q.wait()
    assert not q.active
    q.start()
    world.send("again", 1, tag=7)
    assert np.array_equal(q.wait(timeout=30), [8, 8, 8])
    # a receive's wait that times out withdraws it: inactive, started again
    q.start()
    with pytest.raises(mesh.MeshTimeoutError):
        q.wait(timeout=0.05)
    assert not q.active
    # no out=: a new value each time; ANY_SOURCE and ANY_TAG; objects
    a = world.recv_init(mesh.ANY_SOURCE, mesh.ANY_TAG)
    a.start()
    world.send("objects", 1, tag=7)
    assert a.wait(timeout=30) == [1, "x"] and a.status.tag == 11
    a.start()
    st = mesh.Status()
    assert np.array_equal(a.wait(timeout=30, status=st), [9, 9, 9]) and st.tag == 6
    # PROC_NULL: done at once, out= untouched, PROC_NULL's status
    out = np.full(2, 4.0)
    n = world.recv_init(mesh.PROC_NULL, 3, out=out)
    s = world.send_init(buf, mesh.PROC_NULL, 3)
    for _ in range(2):
        mesh.startall([n, s])
        assert mesh.testall([n, s]) == (True, [out, None]) and np.all(out == 4.0)
    n.start()
    assert n.wait(status=st) is out and st.source == mesh.PROC_NULL
    # arguments are checked when the request is made
    with pytest.raises(ValueError, match=r"rank 0: recv_init from rank 7: group world has "
                       r"ranks 0\.\.2"):
        world.recv_init(7, 1)
    with pytest.raises(ValueError, match="rank 0: send_init on group world: tag"):
        world.send_init(buf, 1, tag=-3)
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"rank 0: recv from rank 1 \(tag 6, group world\)"):
        world.recv_init(1, 6, out=ro)
    world.send("done", 1, tag=7)
    _modes(world)


def _modes(world: mesh.Mesh) -> None:
    """Rank 0's ssend_init, bsend_init and rsend_init: each start the
    mode's send of its buffer as it is then (rank 1 receives, _modes_peer)."""
    sb, bb, rb = np.zeros(3), np.zeros(3), np.zeros(3)
    s, b = world.ssend_init(sb, 1, tag=12), world.bsend_init(bb, 1, tag=13)
    r = world.rsend_init(rb, np.int64(1), tag=14)
    assert repr(s) == "<Prequest ssend_init to rank 1 (tag 12, group world)>"
    for k in range(2):
        sb[:], bb[:], rb[:] = 20 + k, 30 + k, 40 + k
        mesh.startall([s, b, r])
        bb[:] = -1          # (bsend_init sent a copy made at the start)
        with pytest.raises(mesh.MeshError, match=r"rank 0: start of the persistent bsend_init "
                           r"to rank 1 \(tag 13, group world\): it is active"):
            b.start()
        # synchronous: not done until rank 1's receive took it; its timeout names the call
        with pytest.raises(mesh.MeshTimeoutError, match=r"^rank 0: ssend_init to rank 1 \(tag "
                           r"12, group world\)"):
            s.wait(timeout=0.05)
        assert s.active and not s.done()
        if not k:   # cancelled (MPI's Cancel): rank 1 never sees it; started again
            assert s.cancel() and s.done()
            with pytest.raises(mesh.MeshError, match=r"^rank 0: ssend_init to rank 1 \(tag 12, "
                               r"group world\) was cancelled \(withdrawn unread from rank 1's"):
                s.wait(timeout=5)
            assert not s.active and not s.cancel()
            s.start()
        world.send("take", 1, tag=7)
        assert mesh.waitall([s, b, r], timeout=30) == [None] * 3
        assert not any(p.active for p in (s, b, r))
    n = world.ssend_init(sb, mesh.PROC_NULL, 3)     # PROC_NULL: done at once
    n.start()
    assert n.test() == (True, None)
    for call in ("ssend_init", "bsend_init", "rsend_init"):     # checked when made
        with pytest.raises(ValueError, match=rf"^rank 0: {call} to rank 7: group world has"):
            getattr(world, call)(sb, 7)
        with pytest.raises(ValueError, match=rf"^rank 0: {call} on group world: tag must be"):
            getattr(world, call)(sb, 1, tag=-1)


def _peer(world: mesh.Mesh) -> None:
    for k in range(3):
        assert np.array_equal(world.recv(0, tag=5, timeout=30), [k] * 3)
    for value in (7, 8):
        world.recv(0, tag=7, timeout=30)
        world.send(np.full(3, float(value)), 0, tag=6)
    world.recv(0, tag=7, timeout=30)
    world.send([1, "x"], 0, tag=11)
    time.sleep(0.05)
    world.send(np.full(3, 9.0), 0, tag=6)
    world.recv(0, tag=7, timeout=30)
    for k in range(2):      # _modes: the ssend_init's receive only once told
        world.recv(0, tag=7, timeout=30)
        for tag, value in ((12, 20), (13, 30), (14, 40)):
            assert np.array_equal(world.recv(0, tag=tag, timeout=30), [value + k] * 3)


def _persistent(world: mesh.Mesh) -> str:
    left, right = mesh.grid(world, x=world.size).shift("x", 1)
    want = _halo_isend(world, left, right)
    got = _halo_persistent(world, left, right)
    assert all(np.array_equal(a, b) for a, b in zip(got, want)) and len(got) == _ITERS
    if world.rank == 0:
        _rules(world)
    elif world.rank == 1:
        _peer(world)
    return "ok"


def test_persistent_requests_halo_exchange_restarts_and_mpi_rules() -> None:
    assert mesh.spawn(_persistent, 3, timeout=120) == ["ok"] * 3
