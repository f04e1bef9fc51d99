"""The same-host small-message rings (mesh.rings): one ring of one page,
written and read in one process (a rank may map its own region), then
across real ranks: order per source across ring and socket, wrap-around, a
full ring falling back to the socket, and nothing left in /dev/shm."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

import mesh
from mesh import rings

pytestmark = pytest.mark.skipif(not rings.enabled(), reason="no memfd here, or MESH_SHM=0")


def test_a_ring_wraps_fills_and_keeps_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_RING_BYTES", "4096")
    receiver, sender = rings.Rings(0, 2, [1]), rings.Rings(1, 2, [0])
    try:
        assert sender.attach(0, receiver.announce())
        assert not sender.attach(0, (*receiver.announce()[:3], 12345))   # a wrong token
        out = sender.out[0]
        assert out is not None
        got: list[bytes] = []
        sent = 0
        for rnd in range(6):                  # fill, drain, again: the ring wraps
            while out.put(bytes([sent % 251]) * (1 + sent * 37 % 900), 1 + sent * 37 % 900, 0):
                sent += 1
            assert receiver.changed()
            receiver.drain_all([0, 0], lambda s, mv: got.append(bytes(mv)))
        assert sent > 30 and len(got) == sent
        assert all(g == bytes([i % 251]) * (1 + i * 37 % 900) for i, g in enumerate(got))
        # an entry written after socket message 3 waits until 3 have been read
        assert out.put(b"late", 4, 3)
        assert receiver.drain(1, 2, lambda s, mv: got.append(bytes(mv))) == 0
        assert receiver.drain(1, 3, lambda s, mv: got.append(bytes(mv))) == 1
        assert got[-1] == b"late"
    finally:
        sender.close()
        receiver.close()


def _message(src: int, i: int) -> object:
    k = i % 4
    if k == 0:
        return np.full(i % 50 + 1, src * 1000 + i, np.int64)      # the ring
    if k == 1:
        return {"src": src, "i": i}                               # an object, the ring
    if k == 2:
        return np.full(300, i, np.float32)                        # over MESH_RING_MAX: socket
    return np.arange(9000, dtype=np.float64) + i if i % 20 == 3 else np.arange(i % 7)


def _mixed(world: mesh.Mesh, n: int) -> bool:
    """Ranks 1 and 2 send n messages each to rank 0, which takes them late
    (unexpected: the one-page rings fill, the rest takes the socket) and
    from any source; each source's order must hold."""
    if world.rank:
        world.recv(0, tag=9)
        for i in range(n):
            world.send(_message(world.rank, i), 0, tag=1)
        ring = world._t.rings
        return ring is not None and ring.out[0] is not None
    for r in (1, 2):
        world.send(0, r, tag=9)
    time.sleep(0.3)
    seen = {1: 0, 2: 0}
    status = mesh.Status()
    for _ in range(2 * n):
        x = world.recv(mesh.ANY, tag=1, status=status)
        want = _message(status.source, seen[status.source])
        seen[status.source] += 1
        if isinstance(want, np.ndarray):
            assert isinstance(x, np.ndarray) and x.dtype == want.dtype and np.array_equal(x, want)
        else:
            assert x == want
    return True


def test_small_messages_take_the_rings_in_order_with_the_socket() -> None:
    before = set(os.listdir("/dev/shm"))
    got = mesh.spawn(_mixed, 3, 120, timeout=90,
                     env={"MESH_RING_BYTES": "4096", "MESH_RING_MAX": "1024"})
    assert got == [True, True, True]
    assert not set(os.listdir("/dev/shm")) - before
