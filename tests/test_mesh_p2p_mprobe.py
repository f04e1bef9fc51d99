"""Matched probes (mpi4py's mprobe, improbe, Message.recv/irecv): a probe
that takes its message out of matching, so that threads probing one
(source, tag) each receive the message they probed; all in one spawn."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import mesh

_N = 150        # messages each sender sends the two receiving threads


def _senders(world: mesh.Mesh) -> str:
    r = world.rank
    for i in range(_N):       # each sized differently: a receive sized for another fails
        world.send(np.full(i % 7 + 1, i, np.int64), 0, tag=4 + r)
    for _ in range(2):          # each thread's end
        world.send(np.full(3, -1, np.int64), 0, tag=4 + r)
    world.recv(0, tag=98)
    if r == 1:
        world.send(np.arange(6, dtype=np.int16).reshape(2, 3), 0, tag=8)
        world.send({"dict": 1}, 0, tag=8)
        world.send(np.arange(4.0), 0, tag=9)
        try:
            import torch
        except ImportError:
            world.send(None, 0, tag=11)
        else:
            world.send(torch.arange(5), 0, tag=11)
            world.send(torch.arange(5) * 2, 0, tag=11)
        world.recv(0, tag=99)
    else:
        world.send("last words", 0, tag=10)      # then this rank leaves
    return "ok"


def _threads(world: mesh.Mesh) -> list[list[tuple[int, int]]]:
    got: list[list[tuple[int, int]]] = [[], []]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:            # rank 1's messages (tag 5) by source and tag, rank 2's (6) from any
            for src, tag in ((1, 5), (mesh.ANY_SOURCE, 6)):
                while True:
                    m = world.mprobe(src, tag, timeout=60)
                    out = np.empty(m.count, m.dtype)        # sized from its own message
                    assert m.recv(out=out) is out and m.received
                    if out[0] < 0:
                        break
                    got[k].append((m.source, int(out[0])))
        except BaseException as e:      # (raised in the test's thread below)
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    return got


def _mprobe(world: mesh.Mesh) -> str:
    if world.rank:
        return _senders(world)
    got = _threads(world)
    every = sorted(got[0] + got[1])
    assert every == sorted((s, i) for s in (1, 2) for i in range(_N)), "each message once"
    for mine in got:                   # matched in order: each thread's, per source, rising
        for s in (1, 2):
            seq = [i for src, i in mine if src == s]
            assert seq == sorted(seq)
    assert world.improbe(1, 8) is None      # nothing sent yet
    for r in (1, 2):
        world.send(None, r, tag=98)
    st = mesh.Status()
    m = world.mprobe(1, 8, timeout=30, status=st)
    assert (m.source, m.tag, m.count, m.shape, m.dtype, m.nbytes) == \
        (1, 8, 6, (2, 3), np.dtype(np.int16), 12) and st == m.status
    assert world.probe(1, 8, timeout=30).dtype is None    # taken out of matching: the dict
    with pytest.raises(mesh.OutMismatchError, match=r"rank 0: recv \(matched\) from rank 1 "
                       r"\(tag 8, group world\): the message from rank 1 \(tag 8\) does not fit "
                       r"out=: the message is int16\[2, 3\], out= is float64\[6\]; it stays"):
        m.recv(out=np.empty(6))
    req = m.irecv(out=np.empty(5, np.int16))
    with pytest.raises(mesh.OutMismatchError):
        req.wait()
    assert not m.received
    out = np.empty(6, np.int16)
    st2 = mesh.Status()
    assert m.irecv(out=out).wait(status=st2) is out and st2.shape == (2, 3)
    assert np.array_equal(out, np.arange(6))
    with pytest.raises(mesh.MeshError, match="was received already"):
        m.recv()
    m = world.mprobe(1, mesh.ANY_TAG, timeout=30)
    assert m.count is None and m.dtype is None and m.recv() == {"dict": 1}
    deadline = time.monotonic() + 30
    while (m := world.improbe(mesh.ANY_SOURCE, 9)) is None:   # (polling reads what came)
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert m.source == 1 and np.array_equal(m.recv(), np.arange(4.0))
    assert world.improbe(1, 9) is None and world.improbe(mesh.ANY_SOURCE, 123) is None
    m = world.mprobe(1, 11, timeout=30)
    if m.dtype is not None:             # torch: a tensor, or written into one
        import torch
        assert torch.equal(m.recv(), torch.arange(5))
        into = torch.empty(5, dtype=torch.int64)
        assert world.mprobe(1, 11, timeout=30).recv(out=into) is into
        assert torch.equal(into, torch.arange(5) * 2)
    null = world.mprobe(mesh.PROC_NULL, 3)       # MPI's MESSAGE_NO_PROC
    buf = np.zeros(3)
    assert (null.source, null.tag, null.count) == (mesh.PROC_NULL, mesh.ANY_TAG, 0)
    assert null.recv() is None and null.recv(out=buf) is buf and null.irecv().wait() is None
    assert world.improbe(mesh.PROC_NULL).source == mesh.PROC_NULL
    # a message whose sender left after it came is still received
    deadline = time.monotonic() + 30
    while world._t.peer_state(2) == "alive":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert world.mprobe(2, 10, timeout=5).recv() == "last words"
    with pytest.raises(mesh.LostPeerError):
        world.mprobe(2, 10, timeout=5)
    world.send(None, 1, tag=99)
    return "ok"


def test_mprobe_takes_its_message_threads_each_get_their_own() -> None:
    assert mesh.spawn(_mprobe, 3, timeout=120) == ["ok"] * 3
