"""Point-to-point over real processes and sockets: payload kinds, ordering,
tags, ANY, out=, groups, timeouts, background progress, flow control, and
peers that misbehave."""
from __future__ import annotations

import gc
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

import collectives as C
import mesh
from mesh import auth, wire
from mesh import world as world_module
from late_release import hold_releases

DTYPES = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
          np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128]
SHAPES = [(), (0,), (1,), (7,), (3, 0, 2), (4, 5), (2, 3, 4)]
OBJECTS = [None, 0, -5, 2**40, 3.5, "text", b"\x00bytes", [1, "a", [2.5, None]],
           {"k": [1, 2], "nested": {"x": b"y"}}, True,
           {(1, (2, "b")): [3], "k": {(4,): None}}]   # tuple keys: they were dropped as bad


SAME_SHAPE_DTYPES = [np.float64, np.int64, np.float64, np.int32, np.int32]


def _payload(dtype: type, shape: tuple, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 100, size=shape)
    if np.dtype(dtype).kind == "c":
        return (a + 1j * a).astype(dtype)
    return a.astype(dtype)


def _kinds(world: mesh.Mesh) -> str:
    cases = [(d, s) for d in DTYPES for s in SHAPES]
    big = np.arange((3 << 20) // 8 + 3, dtype=np.float64)          # four frames, odd tail
    strided = np.arange(60, dtype=np.int32).reshape(6, 10)[::2, ::3]  # non-contiguous
    fortran = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    if world.rank == 0:
        for i, (d, s) in enumerate(cases):
            world.send(_payload(d, s, i), 1, tag=i)
        for obj in OBJECTS:
            world.send(obj, 1, tag=1000)
        for a in (big, strided, fortran, np.float32(2.5)):
            world.send(a, 1, tag=2000)
        for d in SAME_SHAPE_DTYPES:    # one shape and tag, the dtype changing: no stale header
            world.send(np.arange(4, dtype=d), 1, tag=3000)
        world.send(OBJECTS[-1], 0, tag=4000)        # to itself (raised an unnamed TypeError)
        assert world.recv(0, tag=4000) == OBJECTS[-1]
        return "sent"
    for i, (d, s) in enumerate(cases):
        got = world.recv(0, tag=i)
        want = _payload(d, s, i)
        assert got.dtype == want.dtype and got.shape == want.shape, (d, s, got.dtype, got.shape)
        assert np.array_equal(got, want), (d, s)
    for obj in OBJECTS:
        assert world.recv(0, tag=1000) == obj
    for want in (big, strided, fortran, np.asarray(np.float32(2.5))):
        got = world.recv(0, tag=2000)
        assert got.shape == want.shape and np.array_equal(got, want)
    for d in SAME_SHAPE_DTYPES:
        got = world.recv(0, tag=3000)
        assert got.dtype == d and np.array_equal(got, np.arange(4)), (d, got)
    return "ok"


def test_every_payload_kind_arrives_intact() -> None:
    assert mesh.spawn(_kinds, 2, timeout=90) == ["sent", "ok"]


def _order(world: mesh.Mesh) -> list:
    if world.rank > 0:
        for i in range(20):
            world.send(i, 0, tag=i % 2)
        world.send(np.full(3, world.rank), 0, tag=9)
        return []
    # tag 1 first although tag 0 messages were sent first: they wait, in order
    odd = [world.recv(1, tag=1) for _ in range(10)]
    even = [world.recv(1, tag=0) for _ in range(10)]
    assert odd == list(range(1, 20, 2)) and even == list(range(0, 20, 2))
    other = [world.recv(2, tag=t) for t in (1, 0) for _ in range(10)]
    assert other[:10] == list(range(1, 20, 2))
    srcs = sorted(int(world.recv(mesh.ANY, tag=9)[0]) for _ in range(world.size - 1))
    assert srcs == list(range(1, world.size))
    return srcs


def test_order_per_source_and_tag_and_any_source() -> None:
    assert mesh.spawn(_order, 3, timeout=60)[0] == [1, 2]


def _out_and_errors(world: mesh.Mesh) -> str:
    if world.rank == 1:
        world.send(np.arange(6.0), 0)
        world.send(np.arange(6.0), 0, tag=1)
        world.send({"not": "an array"}, 0, tag=2)
        world.recv(0, tag=3)
        assert world.recv(0, tag=np.int64(5)).tolist() == [0, 1]
        assert world.recv(0, tag=6).tolist() == [2, 3]
        return "ok"
    out = np.zeros((2, 3))
    got = world.recv(1, out=out)
    assert got is out and np.array_equal(out.ravel(), np.arange(6.0))
    with pytest.raises(mesh.BadMessageError, match=r"rank 0: recv from rank 1 \(tag 1.*float32"):
        world.recv(1, tag=1, out=np.zeros(6, np.float32))
    with pytest.raises(mesh.BadMessageError, match="dict, not an array"):
        world.recv(1, tag=2, out=np.zeros(6))
    assert np.array_equal(world.recv(1, tag=1), np.arange(6.0))     # both still there
    assert world.recv(1, tag=2) == {"not": "an array"}
    t0 = time.monotonic()
    with pytest.raises(mesh.MeshTimeoutError,
                       match=r"rank 0: recv from rank 1 \(tag 7, group world\) timed out"):
        world.recv(1, tag=7, timeout=0.3)
    assert time.monotonic() - t0 < 5
    with pytest.raises(ValueError, match="tag must be an integer >= 0"):
        world.send(1, 1, tag=-3)
    with pytest.raises(ValueError, match="rank 0: send to rank 5: group world has ranks 0..1"):
        world.send(1, 5)
    with pytest.raises(ValueError, match="rank 0: recv from rank -5: group world has ranks"):
        world.recv(-5)
    with pytest.raises(TypeError, match=r"rank 0: send to rank 1 \(tag 0, group world\): object is "
                                        "neither an array nor msgpack-able"):
        world.send(object(), 1)
    # where in the object, and what goes instead (it said "can not serialize
    # 'numpy.ndarray' object" alone: a parameter server's dict of arrays, a job
    # number from np.arange)
    with pytest.raises(TypeError, match=r"\(tag 0, group world\): dict is neither an array "
                       r"nor msgpack-able \(.*\); its \['grad'\] is a numpy.ndarray: an array "
                       r"travels as a message of its own"):
        world.send({"step": 3, "grad": np.ones(2)}, 1)
    with pytest.raises(TypeError, match=r"; its \[1\]\['job'\] is a numpy.int64: x.item\(\)"):
        world.isend([{"job": 0}, {"job": np.arange(3)[1]}], 1)
    with pytest.raises(TypeError, match=r"rank 0: send to rank 1 \(tag 4, group world\): dtype "
                                        "object cannot be sent"):
        world.isend(np.array(["a"], dtype=object), 1, tag=4)
    for bad in (True, np.bool_(False)):      # an int to Python, no tag to the wire
        with pytest.raises(ValueError, match=r"rank 0: send on group world: tag must be an"):
            world.send(1, 1, tag=bad)
    with pytest.raises(ValueError, match=r"rank 0: send to rank 1\.0: a rank is an int"):
        world.send(1, 1.0)
    for bad_limit in (float("nan"), "1", -1, True):
        with pytest.raises(ValueError, match="rank 0: recv on group world: timeout must be a "
                                             "number of seconds >= 0 or None"):
            world.recv(1, tag=9, timeout=bad_limit)
    with pytest.raises(mesh.MeshTimeoutError) as probed:
        world.probe(1, tag=9, timeout=0.1)
    assert "withdrawn" not in str(probed.value)      # a probe posts no receive
    world.send(np.arange(2), 1, tag=np.int64(5))      # a numpy integer is a tag
    sent = world.isend(np.arange(2, 4), 1, tag=6)     # by ring: done already, but a bad
    with pytest.raises(ValueError, match="rank 0: wait on group world: timeout must be"):
        sent.wait(timeout=-1)                         # timeout raises as on any other wait
    sent.wait()
    world.send(0, 1, tag=3)
    return "ok"


def test_out_receive_and_clear_errors() -> None:
    assert mesh.spawn(_out_and_errors, 2, timeout=60) == ["ok", "ok"]


def _out_misfits(world: mesh.Mesh) -> str:
    """An out= no message fits raises when posted; a message that does not
    fit out= fails that receive and stays queued for the next one, in order."""
    big = np.arange(300_000, dtype=np.float64)          # multi-frame, not copied inline
    if world.rank == 1:
        world.recv(0, tag=9)                           # rank 0 checked its out= at post time
        for i in range(3):
            world.send(np.full((2, 3), i, np.float64), 0, tag=1)
        world.send({"k": 1}, 0, tag=2)
        world.recv(0, tag=9)                           # rank 0 posted the receives for tag 3
        world.send(np.arange(4, dtype=np.int32), 0, tag=3)
        world.send(big, 0, tag=3)
        world.send(np.arange(2.0), 0, tag=4)
        world.recv(0, tag=9)
        return "ok"
    ro = np.zeros(6)
    ro.flags.writeable = False
    cases = [(ro, "out= is read-only"), (np.zeros((6, 2))[:, 0], "out= is not C-contiguous"),
             ([0.0] * 6, "out= is a list, not a numpy or device array")]
    for out, why in cases:
        with pytest.raises(ValueError, match=rf"rank 0: recv from rank 1 \(tag 1, group world\): "
                                             rf"{why}"):
            world.recv(1, tag=1, out=out)
        with pytest.raises(ValueError, match=why):
            world.irecv(1, tag=1, out=out)
        with pytest.raises(ValueError, match=why):
            world.sendrecv(None, 1, 1, recvtag=1, out=out)    # posted before anything is sent
    world.send(None, 1, tag=9)
    # waiting messages: a misfit raises and the message stays at the head, order kept
    deadline = time.monotonic() + 20
    while world.iprobe(1, tag=2) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(mesh.OutMismatchError,
                       match=r"rank 0: recv from rank 1 \(tag 1, group world\): the message from "
                             r"rank 1 \(tag 1\) does not fit out=: the message is float64\[2, 3\], "
                             r"out= is float32\[6\]; the message stays queued"):
        world.recv(1, tag=1, out=np.zeros(6, np.float32))
    with pytest.raises(mesh.MismatchError, match=r"float64\[2, 3\], out= is float64\[5\]"):
        world.recv(mesh.ANY, tag=mesh.ANY_TAG, out=np.zeros(5))
    out = np.zeros(6)
    assert world.recv(1, tag=1, out=out) is out and np.all(out == 0)
    assert np.array_equal(world.recv(1, tag=1), np.full((2, 3), 1.0))
    with pytest.raises(mesh.OutMismatchError, match="the message is a dict, not an array"):
        world.irecv(1, tag=2, out=np.zeros(1)).wait(timeout=20)
    assert world.recv(1, tag=2) == {"k": 1}
    # posted receives: a misfit fails that one, the message goes to the next
    bad = world.irecv(1, tag=3, out=np.zeros(4, np.int64))
    good = world.irecv(1, tag=3, out=np.zeros(4, np.int32))
    bad_big = world.irecv(1, tag=3, out=np.zeros(7))
    rest = world.irecv(1, tag=3)
    later = world.irecv(1, tag=4, out=np.zeros(3))
    world.send(None, 1, tag=9)
    with pytest.raises(mesh.OutMismatchError, match=r"int32\[4\], out= is int64\[4\]"):
        bad.wait(timeout=20)
    assert np.array_equal(good.wait(timeout=20), np.arange(4))
    with pytest.raises(mesh.OutMismatchError, match=r"float64\[300000\], out= is float64\[7\]"):
        bad_big.wait(timeout=20)
    assert np.array_equal(rest.wait(timeout=20), big)
    with pytest.raises(mesh.OutMismatchError, match=r"float64\[2\], out= is float64\[3\]"):
        later.wait(timeout=20)
    assert np.array_equal(world.recv(1, tag=4, out=np.zeros(2)), np.arange(2.0))
    assert np.array_equal(world.recv(1, tag=1), np.full((2, 3), 2.0))
    world.send(None, 1, tag=9)
    return "ok"


def test_out_that_does_not_fit_leaves_the_message_queued() -> None:
    assert mesh.spawn(_out_misfits, 2, timeout=90) == ["ok", "ok"]


def _sendrecv_in_place(world: mesh.Mesh) -> list[str]:
    """sendrecv(a, ..., out=a), MPI's Sendrecv_replace: the peer's array
    must come in, not a mix of it and this rank's own (the message came into
    out= while the send still read the same memory: the ring, the direct
    read and the socket's zero-copy frames alike)."""
    import torch
    peer, bad = 1 - world.rank, []
    for n in (1000, 100_000, 300_000, 2_000_000):
        for it in range(3):
            a = np.arange(n, dtype=np.float64) + 1e7 * world.rank
            got = world.sendrecv(a, peer, peer, sendtag=it, recvtag=it, out=a, timeout=30)
            if got is not a or not np.array_equal(a, np.arange(n) + 1e7 * peer):
                bad.append(f"numpy n={n} #{it}: {int((a != np.arange(n) + 1e7 * peer).sum())} "
                           f"wrong")
        both = np.arange(2 * n, dtype=np.float32) + 1e7 * world.rank    # out= overlaps half
        world.sendrecv(both[:n], peer, peer, sendtag=5, recvtag=5, out=both[n // 2:n // 2 + n],
                       timeout=30)
        if not np.array_equal(both[n // 2:n // 2 + n], np.arange(n) + np.float32(1e7 * peer)):
            bad.append(f"numpy n={n}: overlapping halves wrong")
        t = torch.arange(n, dtype=torch.bfloat16) + world.rank    # (bfloat16: numpy lacks it)
        want = torch.arange(n, dtype=torch.bfloat16) + peer
        if world.sendrecv(t, peer, peer, sendtag=6, recvtag=6, out=t, timeout=30) is not t \
                or not torch.equal(t, want):
            bad.append(f"torch bfloat16 n={n}: wrong")
        c = torch.full((n,), complex(world.rank, 1), dtype=torch.complex64)
        world.sendrecv(c.conj(), peer, peer, sendtag=7, recvtag=7, out=c, timeout=30)
        if not torch.equal(c, torch.full((n,), complex(peer, -1), dtype=torch.complex64)):
            bad.append(f"torch conjugate n={n}: wrong")
    return bad


def _synchronous(world: mesh.Mesh, folder: str) -> list[str]:
    """ssend and issend (MPI's Ssend, Issend) complete only once a receive
    of the peer took the message: rank 1 writes a flag file just before
    each receive (after a receive whose out= it did not fit and a probe:
    they took nothing), and rank 0's issend must not test done before the
    flag is there; by ring, direct read and socket, an object, a receive
    from ANY_SOURCE, a matched probe and one taken out of the ring. Then
    MPI's classic deadlock (both ssend first) times out on both, each
    naming itself and its peer; a dead end to self, PROC_NULL, and bsend's
    copy."""
    r, peer, said = world.rank, 1 - world.rank, []
    flag = Path(folder, "posted")
    for i, msg in enumerate([np.arange(1.0), np.arange(40_000.0), {"an": "object"},
                             np.arange(3.0)]):
        if r == 1:
            if i < 3:
                with pytest.raises(mesh.OutMismatchError):      # (takes nothing, nor probe)
                    world.recv(0, tag=20 + i, out=np.empty(7))
                assert world.probe(0, tag=20 + i).source == 0
            time.sleep(0.1)
            flag.write_text(str(i))
            got = world.recv(mesh.ANY_SOURCE, tag=20 + i) if i in (0, 2) else \
                world.mprobe(0, 20 + i).recv() if i == 1 else \
                world.recv(0, tag=20 + i)       # (taken out of the ring by this thread)
            assert np.array_equal(got, msg) if i != 2 else got == msg
            if i in (0, 2):
                assert str(world.recv(0, tag=30 + i)) == str(msg)
            continue
        req = world.issend(msg, 1, tag=20 + i)
        while not req.test()[0]:
            time.sleep(0.002)
        if not flag.exists() or flag.read_text() != str(i):
            said.append(f"issend #{i} done before the receive was posted")
        if i in (0, 2):
            world.ssend(msg, 1, tag=30 + i)         # blocking, as rank 1 receives it
    with pytest.raises(mesh.MeshTimeoutError, match=rf"^rank {r}: ssend to rank {peer} \(tag 40, "
                       rf"group world\) timed out after 0.3s before a receive of rank {peer}'s "
                       rf"took it \(a synchronous send completes once"):
        world.ssend(np.ones(2), peer, tag=40, timeout=0.3)      # each sends first: deadlock
    C.barrier(world)    # (both timed out): their messages are there for a receive
    assert world.recv(peer, tag=40).size == 2
    mine = world.issend("to self", r, tag=41)
    assert not mine.test()[0] and world.recv(r, tag=41) == "to self"
    assert mine.wait(timeout=10) is None
    with pytest.raises(mesh.MeshTimeoutError, match=rf"rank {r}: ssend to rank {r} "):
        world.ssend(1, r, tag=42, timeout=0.1)
    world.ssend(1, mesh.PROC_NULL)
    assert world.issend(1, mesh.PROC_NULL).test() == (True, None)
    a = np.arange(300_000.0)                    # large: an isend would read it later
    world.bsend(a, peer, tag=43)
    a[:] = -1
    assert world.recv(peer, tag=43)[5] == 5.0
    world.rsend(2, peer, tag=44)
    assert world.recv(peer, tag=44) == 2
    late = world.issend(np.ones(3), peer, tag=45)       # errors name the call made
    with pytest.raises(mesh.MeshTimeoutError, match=rf"^rank {r}: issend to rank {peer} \(tag "):
        late.wait(timeout=0.1)
    for call in ("bsend", "ibsend", "issend", "ssend"):
        with pytest.raises(ValueError, match=rf"^rank {r}: {call} to rank 5: group world has"):
            getattr(world, call)(a, 5)
        with pytest.raises(ValueError, match=rf"^rank {r}: {call} on group world: tag must be"):
            getattr(world, call)(a, peer, tag=-1)
    C.barrier(world)
    assert world.recv(peer, tag=45).size == 3 and late.wait(timeout=10) is None
    C.barrier(world)
    return said + _dropped_unread(world)


def _dropped_unread(world: mesh.Mesh) -> list[str]:
    """A synchronous send whose receiver drops its message unread (its group
    dropped there: garbage) fails at once naming why, where it timed out:
    queued unreceived when rank 1 drops the group, or coming after (a small
    array by ring or socket, a large one read out of rank 0's memory or by
    socket, an object)."""
    g = world.group([0, 1])
    if world.rank == 1:
        assert world.recv(0, tag=52) == "sent"      # rank 0's first two wait here, unreceived
        del g
        gc.collect()
        C.barrier(world)        # (its start forgets the groups dropped: g)
        C.barrier(world)
        return []
    assert g is not None
    big = np.arange(300_000.0)
    reqs = [g.issend(np.ones(2), 1, tag=50), g.issend(big, 1, tag=51)]
    world.send("sent", 1, tag=52)
    C.barrier(world)
    reqs += [g.issend(np.ones(2), 1, tag=53), g.issend(big, 1, tag=54),
             g.issend({"an": "object"}, 1, tag=55)]
    said = []
    for tag, req in zip((50, 51, 53, 54, 55), reqs):
        try:
            req.wait(timeout=10)
            said.append(f"tag {tag}: its wait returned")
        except mesh.MeshError as e:
            if not re.match(rf"rank 0: issend to rank 1 of group world/\[0, 1\] \(world rank "
                            rf"1\), tag {tag} failed: dropped unread: world rank 1 dropped the "
                            rf"group \(", str(e)):
                said.append(f"tag {tag}: {type(e).__name__}: {e}")
    C.barrier(world)
    return said


@pytest.mark.parametrize("env", [{}, {"MESH_SHM": "0"}], ids=["same-host", "sockets"])
def test_sendrecv_into_its_own_send_buffer_replaces_it_and_ssend_waits_for_the_receive(
        env: dict, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    assert mesh.spawn(_exchanges, 2, str(tmp_path), timeout=90, env=env) == [[], []]


def _exchanges(world: mesh.Mesh, folder: str) -> list[str]:
    return _sendrecv_in_place(world) + _synchronous(world, folder)


def _device_out_misfits(world: mesh.Mesh) -> str:
    import fakecupy
    cp = fakecupy.install()
    if world.rank == 1:
        world.send(np.arange(4.0), 0)
        return "ok"
    with pytest.raises(ValueError, match=r"rank 0: recv from rank 1 \(tag 0, group world\): "
                                         r"out= is not C-contiguous"):
        world.recv(1, out=cp.zeros((4, 2))[:, 0])
    with pytest.raises(mesh.OutMismatchError, match=r"float64\[4\], out= is float32\[4\]"):
        world.recv(1, out=cp.zeros(4, np.float32), timeout=20)
    out = cp.zeros((2, 2))
    assert world.recv(1, out=out) is out
    assert np.array_equal(cp.asnumpy(out).ravel(), np.arange(4.0))
    return "ok"


def test_device_out_is_checked_too() -> None:
    assert mesh.spawn(_device_out_misfits, 2, timeout=60) == ["ok", "ok"]


class _DeviceView:
    """Just a CUDA array interface: what a device out= is judged by."""

    def __init__(self, shape: tuple, strides: tuple | None, readonly: bool) -> None:
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "<f4", "version": 3,
                                         "strides": strides, "data": (1 << 20, readonly)}


def test_out_usable_is_judged_without_a_message() -> None:
    from mesh.payload import out_unusable
    assert out_unusable(np.zeros((2, 3))) == "" and out_unusable(np.zeros((3, 1))[:, :1]) == ""
    assert out_unusable(_DeviceView((2, 3), None, False)) == ""
    assert out_unusable(_DeviceView((2, 1), (4, 40), False)) == ""     # extent 1: any stride
    assert out_unusable(_DeviceView((2, 3), None, True)) == "out= is read-only"
    assert out_unusable(_DeviceView((2, 3), (4, 8), False)) == "out= is not C-contiguous"
    assert out_unusable(b"abc") == "out= is a bytes, not a numpy or device array"


def _groups(world: mesh.Mesh) -> list:
    evens = world.group([r for r in range(world.size) if r % 2 == 0])
    pair = world.group([3, 1])
    dup, again = world.dup(), world.dup()
    assert (dup.rank, dup.size, again.ranks) == (world.rank, world.size, list(range(4)))
    if world.rank % 2 == 1:
        assert evens is None
    if world.rank in (1, 3):
        assert pair.size == 2 and pair.rank == (0 if world.rank == 3 else 1)
        # same tag on the world, on the group and on its dups: never confused
        if world.rank == 3:
            world.send("world", 1, tag=4)
            pair.send("group", 1, tag=4)
            dup.send("dup", 1, tag=4)
            again.send("again", 1, tag=4)
        else:
            assert again.recv(3, tag=4) == "again"
            assert dup.recv(mesh.ANY, tag=mesh.ANY_TAG) == "dup"
            assert pair.recv(0, tag=4) == "group"
            assert world.recv(3, tag=4) == "world"
    if evens is not None:
        if evens.rank == 0:
            for r in range(1, evens.size):
                evens.send(r * 10, r)
        else:
            assert evens.recv(0) == evens.rank * 10
    grid = mesh.grid(world, dp=2, pp=2)
    with pytest.raises(ValueError) as e:
        grid.coords(4)
    return [grid.coord("dp"), grid.coord("pp"), grid.group("pp").ranks, grid.group("dp").ranks,
            _proc_null(world, grid), grid.coords(), [grid.coords(r) for r in range(4)],
            str(e.value)]


def _proc_null(world: mesh.Mesh, grid: mesh.Grid) -> list:
    """MPI's PROC_NULL: a send to it and a receive or probe from it complete
    at once doing nothing (the status: source PROC_NULL, tag ANY_TAG, 0
    bytes); Grid.shift gives it at an edge that does not wrap (a halo
    exchange's sendrecv, as mpi4py's Cart_shift gives it)."""
    null, st = mesh.PROC_NULL, mesh.Status()
    world.send(np.ones(3), null, tag=5)
    world.isend({"x": 1}, null).wait()
    out = np.full(3, 7.0)
    assert world.recv(null, out=out, status=st, timeout=0) is out and (out == 7).all()
    assert (st.source, st.tag, st.nbytes, st.shape, st.count) == (null, mesh.ANY_TAG, 0, None,
                                                                   0), st
    assert world.recv(np.int64(null), tag=mesh.ANY_TAG) is None
    req = world.irecv(null)
    assert req.done() and req.test() == (True, None) and req.status.source == null
    assert not req.cancel()
    assert mesh.waitany([world.irecv(null, out=out)]) == (0, out)
    assert world.probe(null, timeout=0).source == null == world.iprobe(null).source
    with pytest.raises(ValueError, match="tag must be"):
        world.send(1, null, tag=-3)         # (the arguments checked all the same)
    edges = {}
    for periodic in (False, True):
        src, dst = grid.shift("pp", 1, periodic)
        got = world.sendrecv(np.array([world.rank]), dst, src, out=np.array([-1]), status=st,
                             timeout=30)
        edges[periodic] = [src, dst, int(got[0]), st.source]
    (src, dst), (back, on) = grid.shift("dp", 0), grid.shift("dp", -1)
    assert (src, dst) == (world.rank, world.rank) and (back, on) == grid.shift("dp", 1)[::-1]
    return [edges[False], edges[True]]


def test_groups_are_isolated_and_grid_axes() -> None:
    """Groups, and dups of the world (MPI's Comm_dup), keep their traffic
    apart whatever the tags; grid axes are row-major; PROC_NULL (_proc_null)."""
    res = mesh.spawn(_groups, 4, timeout=60)
    n = mesh.PROC_NULL     # (the edges and the wrapped ones as mpi4py's Cart_shift gives them)
    assert [r[:4] for r in res] == [[0, 0, [0, 1], [0, 2]], [0, 1, [0, 1], [1, 3]],
                                    [1, 0, [2, 3], [0, 2]], [1, 1, [2, 3], [1, 3]]]
    assert [r[4] for r in res] == [[[n, 1, -1, n], [1, 1, 1, 1]], [[0, n, 0, 0], [0, 0, 0, 0]],
                                   [[n, 3, -1, n], [3, 3, 3, 3]], [[2, n, 2, 2], [2, 2, 2, 2]]]
    every = [{"dp": 0, "pp": 0}, {"dp": 0, "pp": 1}, {"dp": 1, "pp": 0}, {"dp": 1, "pp": 1}]
    for r, got in enumerate(res):       # (MPI's Cart_coords, of this rank and any other)
        assert got[5] == every[r] and got[6] == every, got
        assert got[7] == f"rank {r}: <Grid {{'dp': 2, 'pp': 2}} at {every[r]}>.coords(4): " \
                         f"the grid's communicator has ranks 0..3", got[7]


def test_compute_dims_is_mpi_dims_create() -> None:
    """As balanced as can be, largest first: Open MPI's answers (its greedy
    gives [12, 6] for 72 in two, where [9, 8] is closer)."""
    mpi = {(12, 2): [4, 3], (12, 3): [3, 2, 2], (16, 3): [4, 2, 2], (24, 3): [4, 3, 2],
           (7, 2): [7, 1], (1, 3): [1, 1, 1], (8, 3): [2, 2, 2], (36, 3): [4, 3, 3],
           (96, 3): [6, 4, 4], (100, 4): [5, 5, 2, 2], (1000, 2): [40, 25],
           (1000, 4): [8, 5, 5, 5], (128, 2): [16, 8], (6, 1): [6], (72, 2): [9, 8]}
    for (n, k), want in mpi.items():
        assert mesh.compute_dims(n, k) == want, (n, k)
    for bad in ((0, 2), (4, 0), (4.0, 2), (True, 1)):
        with pytest.raises(ValueError, match="compute_dims"):
            mesh.compute_dims(*bad)


def _group_args(world: mesh.Mesh) -> list:
    said = []
    for ranks in ([0.7, 1.2], ["0", "1"], None, [True], 1):
        with pytest.raises(TypeError) as e:
            world.group(ranks)
        said.append(str(e.value))
    return said + [world.group(np.arange(2)).ranks]


def test_group_refuses_ranks_that_are_no_ints_naming_the_rank() -> None:
    """A float is not truncated into a rank (0.7 made rank 0), nor a string
    read as one; None is no list: each says so, naming the rank and call."""
    for r, said in enumerate(mesh.spawn(_group_args, 2, timeout=60)):
        assert said[0] == f"rank {r}: group([0.7, 1.2]) of group world: ranks is a list of " \
                          f"ints in 0..1", said
        assert said[1].startswith(f"rank {r}: group(['0', '1']) of group world"), said
        assert said[2].startswith(f"rank {r}: group(None) of group world"), said
        assert said[3].startswith(f"rank {r}: group([True]) of group world"), said
        assert said[4].startswith(f"rank {r}: group(1) of group world"), said
        assert said[5] == [0, 1], said


def _sub_group_arguments(world: mesh.Mesh) -> list:
    g = world.group([2, 1])
    if g is None:
        return []
    said = []
    for call in (lambda: g.send(1, dst=2), lambda: g.recv(src=1, tag=-1),
                 lambda: g.recv(src=0, timeout=-1)):
        with pytest.raises(ValueError) as e:
            call()
        said.append(str(e.value))
    return said


def test_a_sub_groups_argument_errors_start_with_the_world_rank() -> None:
    """They started with the rank in the group (world rank 2 said "rank 0"),
    where every other error starts with the world rank; a world rank given
    for a group's own says which rank it is there."""
    said = mesh.spawn(_sub_group_arguments, 3, timeout=60)
    assert said[0] == []
    for r in (1, 2):
        assert said[r][0] == f"rank {r}: send to rank 2: group world/[2, 1] has ranks 0..1 (a " \
                             f"group numbers its own ranks: world rank 2 is its rank 0)", said
        assert said[r][1].startswith(f"rank {r}: recv on group world/[2, 1]: tag must"), said
        assert said[r][2].startswith(f"rank {r}: recv on group world/[2, 1]: timeout must"), said


def _bad_status(world: mesh.Mesh) -> list:
    if world.rank == 0:
        world.send(np.arange(4.0), 1)                      # by ring
        world.send(np.arange(300_000.0), 1, tag=1)         # too big for a ring
        world.send("x", 1, tag=2)
        world.recv(1, tag=3)
        return []
    said = []
    req = world.irecv(0, tag=2)
    for call in (lambda: world.recv(0, status={}), lambda: world.recv(0, tag=1, status=[]),
                 lambda: req.wait(status="st")):
        with pytest.raises(TypeError) as e:
            call()
        said.append(str(e.value))
    got = [world.recv(0, timeout=10).sum(), world.recv(0, tag=1, timeout=10).size,
           req.wait(timeout=10)]
    world.send(None, 0, tag=3)
    return said + got


def test_a_status_that_is_no_status_raises_before_the_message_is_taken() -> None:
    """status={} (or an mpi4py Status) failed with a bare AttributeError
    once the receive had taken the message, which was lost with it."""
    said = mesh.spawn(_bad_status, 2, timeout=60)[1]
    assert said[0] == "rank 1: recv on group world: status= takes a mesh.Status (or None), " \
                      "got dict", said
    assert said[1].endswith("got list") and said[2].startswith("rank 1: wait on group world: "
                                                               "status= takes"), said
    assert said[3:] == [6.0, 300_000, "x"], said


def _disagreeing(world: mesh.Mesh) -> str:
    """Ranks that disagree on a tag, or on a group's order: the receive's
    timeout names what waits unmatched from its peer, and the collective's
    says the message came on a group this rank has not made."""
    import collectives as C
    g = world.group([0, 1] if world.rank == 0 else [1, 0])
    if world.rank == 0:
        world.send(np.ones(2), 1, tag=6)
        with pytest.raises(mesh.MeshTimeoutError, match=r"all_reduce #1 on group world/\[0, 1\]"
                           r".*unmatched here from world rank 1: collective call #1 on a group "
                           r"this rank has not made .*same ranks in the same order\)"):
            C.all_reduce(g, np.ones(2), timeout=2)
        world.send("raised", 1, tag=7)
    else:
        with pytest.raises(mesh.MeshTimeoutError, match=r"rank 1: recv from rank 0 \(tag 5, "
                           r"group world\) timed out after .*unmatched here from rank 0: "
                           r"tag 6 \(16 bytes\); collective call #1 on a group this rank has not "
                           r"made \(\d+ bytes\) \(its members .*; the receive was withdrawn"):
            world.recv(0, tag=5, timeout=0.5)
        assert world.recv(0, tag=6).tolist() == [1, 1]
        # rank 0's call times out first; this one waits until it has (it waited
        # out a fixed 6 s), then times out too
        work = C.all_reduce(g, np.ones(2), async_op=True)
        assert world.recv(0, tag=7, timeout=30) == "raised"
        with pytest.raises(mesh.MeshError):
            work.wait(timeout=0.5)
    C.barrier(world)
    return "ok"


def _bfloat16_bits(world: mesh.Mesh) -> str:
    """A uint16 message is no bfloat16 one (the same bits to numpy): out=
    of the other kind refuses it, as any other dtype, naming both."""
    import torch
    from mesh.tensors import BFLOAT16, dtype_name
    if world.rank == 0:
        world.send(torch.tensor([16320, 16384], dtype=torch.uint16), 1)
        world.send(torch.tensor([1.5, 2.0], dtype=torch.bfloat16), 1, tag=1)
        for n in (8, 20000, 1 << 20):   # numpy's bfloat16 bits: the ring, a socket, the direct way
            world.send(np.arange(n, dtype=np.uint16).view(BFLOAT16), 1, tag=2)
            world.send(np.arange(n, dtype=np.uint16).view(BFLOAT16), 1, tag=3)
        return "sent"
    for n in (8, 20000, 1 << 20):
        got = world.recv(0, tag=2, out=np.empty(n, BFLOAT16))
        assert dtype_name(world.recv(0, tag=3).dtype) == "bfloat16" and got[-1] == (n - 1) % 65536
    with pytest.raises(mesh.OutMismatchError, match=r"the message is uint16\[2\], out= is "
                                                    r"bfloat16\[2\]"):
        world.recv(0, out=torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(mesh.OutMismatchError, match=r"the message is bfloat16\[2\], out= is "
                                                    r"uint16\[2\]"):
        world.recv(0, tag=1, out=torch.zeros(2, dtype=torch.uint16))
    got = world.recv(0, tag=1, out=torch.zeros(2, dtype=torch.bfloat16))
    assert got.tolist() == [1.5, 2.0] and world.recv(0).tolist() == [16320, 16384]
    return "ok"


def test_bfloat16_and_uint16_messages_are_told_apart() -> None:
    pytest.importorskip("torch")
    assert mesh.spawn(_bfloat16_bits, 2, timeout=60) == ["sent", "ok"]


def _many_dims(world: mesh.Mesh) -> str:
    shapes = [(1,) * 39 + (2,), (1,) * 63 + (3 << 17,)]     # by ring, and not
    if world.rank == 0:
        for i, shape in enumerate(shapes):
            world.send(np.arange(np.prod(shape), dtype=np.float32).reshape(shape), 1, tag=i)
        return "sent"
    for i, shape in enumerate(shapes):
        got = world.recv(0, tag=i, timeout=20)
        assert got.shape == shape and np.array_equal(got.reshape(-1), np.arange(np.prod(shape)))
    return "ok"


@pytest.mark.parametrize("shm", ["1", "0"])
def test_arrays_of_up_to_64_dimensions_arrive(shm: str) -> None:
    """numpy 2 makes arrays of up to 64 dimensions: a receiver that took at
    most 32 dropped the message as bad, and its receive waited on."""
    try:
        np.empty((1,) * 64)
    except ValueError:
        pytest.skip("this numpy makes arrays of at most 32 dimensions")
    assert mesh.spawn(_many_dims, 2, timeout=60, env={"MESH_SHM": shm}) == ["sent", "ok"]


def test_a_timeout_names_what_waits_unmatched_from_the_peer() -> None:
    assert mesh.spawn(_disagreeing, 2, timeout=60) == ["ok", "ok"]


def _splits(world: mesh.Mesh) -> list:
    import collectives as C
    r = world.rank
    for bad in (-1, 1.5, True, "a"):
        with pytest.raises(ValueError, match=rf"rank {r}: split on group world: color must be "
                                             r"an int >= 0 or None, got"):
            world.split(bad)
    with pytest.raises(ValueError, match=rf"rank {r}: split on group world: key must be an int"):
        world.split(0, key=None)    # type: ignore[arg-type]
    odd = world.split(r % 2, key=-r)             # ranked by key: the highest world rank first
    got = [odd.ranks, odd.rank, int(C.all_reduce(odd, np.array([r]))[0])]
    # a group's traffic stays its own: the same tag on the world and on the split
    peer = odd.size - 1 - odd.rank
    if peer != odd.rank:
        world.send(("world", r), odd.ranks[peer], tag=3)
        odd.send(("split", r), peer, tag=3)
        got.append(odd.recv(peer, tag=3))
        got.append(world.recv(odd.ranks[peer], tag=3))
    alone = world.split(None if r == 0 else 7)   # rank 0 joins none
    got.append(None if alone is None else alone.ranks)
    again = world.split(r % 2, key=-r)           # the same colors again: another communicator
    assert again is not None and again.gid != odd.gid and again.ranks == odd.ranks
    world.hosts[:] = ["a", "b", "a", "a", "b"]   # (the rendezvous table's host ids)
    host = world.split_host()
    got.append(host.ranks)
    got.append(odd.split(0, key=odd.size - odd.rank).ranks)    # a split of a split
    # a rank that never joins: the others' split times out, naming it (it
    # stays until they have seen that, so they time out rather than lose it)
    if r == 4:
        for _ in range(4):
            world.recv(mesh.ANY, tag=9)
    else:
        with pytest.raises(mesh.MeshTimeoutError, match="rank 4"):
            world.split(0, timeout=0.5)
        world.send("timed out", 4, tag=9)
    return got


def _one_bad_split(world: mesh.Mesh) -> list:
    import collectives as C
    said = []
    for bad in (-1, "a"):
        with pytest.raises(ValueError) as e:
            world.split(bad if world.rank == 1 else 0, timeout=30)
        said.append(str(e.value))
    C.barrier(world, timeout=30)          # the group's collectives are still in step
    return said + [world.split(0).ranks]


def test_a_split_one_rank_gives_a_bad_color_raises_on_every_rank() -> None:
    """The bad color was refused before the all_gather, where the other
    ranks waited: for the rank's next collective (a MismatchError against a
    barrier) or their timeout."""
    said = mesh.spawn(_one_bad_split, 3, timeout=60)
    assert said[1][:2] == ["rank 1: split on group world: color must be an int >= 0 or None, "
                           "got " + v for v in ("-1", "'a'")], said
    for r in (0, 2):
        assert said[r][:2] == [f"rank {r}: split on group world: the color or key of rank(s) "
                               f"[1] is not valid (see their error)"] * 2, said
    assert [s[2] for s in said] == [[0, 1, 2]] * 3, said


def _bad_split_in_a_sub_group(world: mesh.Mesh) -> str:
    g = world.group([1, 2])
    if g is None:
        return ""
    with pytest.raises(ValueError) as e:
        g.split(-1 if world.rank == 2 else 0, timeout=30)
    return str(e.value)


def test_a_bad_split_in_a_sub_group_names_the_world_rank() -> None:
    """As every error there, the message starts with the world rank and
    names the rank at fault by its world rank (it said group rank 1, which
    is world rank 2: rank 1 read that it was itself at fault)."""
    said = mesh.spawn(_bad_split_in_a_sub_group, 3, timeout=60)
    assert said[1] == "rank 1: split on group world/[1, 2]: the color or key of rank(s) [2] " \
                      "is not valid (see their error)", said
    assert said[2].startswith("rank 2: split on group world/[1, 2]: color must be"), said


def test_split_makes_groups_by_color_key_and_host() -> None:
    """MPI's Comm_split and Comm_split_type(COMM_TYPE_SHARED): a collective,
    so groups come out the same on every member whatever each made before."""
    res = mesh.spawn(_splits, 5, timeout=90)
    evens, odds = [4, 2, 0], [3, 1]
    assert res[0] == [evens, 2, 6, ["split", 4], ["world", 4], None, [0, 2, 3], [0, 2, 4]]
    assert res[1] == [odds, 1, 4, ["split", 3], ["world", 3], [1, 2, 3, 4], [1, 4], [1, 3]]
    assert res[2] == [evens, 1, 6, [1, 2, 3, 4], [0, 2, 3], [0, 2, 4]]
    assert res[3] == [odds, 0, 4, ["split", 1], ["world", 1], [1, 2, 3, 4], [0, 2, 3], [1, 3]]
    assert res[4] == [evens, 0, 6, ["split", 0], ["world", 0], [1, 2, 3, 4], [1, 4], [0, 2, 4]]


def _progress(world: mesh.Mesh) -> bool:
    if world.rank == 1:
        world.send(np.ones(4 << 20, np.uint8), 0)
        return True
    req = world.irecv(1)
    end = time.monotonic() + 30
    while not req.done() and time.monotonic() < end:
        time.sleep(0.01)      # no mesh call: the progress thread must receive meanwhile
    done = req.done()
    assert req.wait().sum() == 4 << 20
    return done


def test_irecv_completes_in_the_background() -> None:
    assert mesh.spawn(_progress, 2, timeout=60)[0] is True


def _flow(world: mesh.Mesh, flag: str) -> list:
    n, size = 24, 4 << 20
    if world.rank == 1:
        return _handed([world.isend(np.full(size, i % 251, np.uint8), 0) for i in range(n)],
                       flag)
    _wait_for(flag)      # not receiving: the sender must be held back by credit
    for i in range(n):
        a = world.recv(1)
        assert a[0] == i % 251 and a[-1] == i % 251
    return []


def _handed(reqs: list, flag: str) -> list:
    """The sender's side: how many sends were handed over a second after
    posting them, told to the receiver by ``flag`` (not a message: credit
    would hold it back); then every send completes."""
    time.sleep(1.0)
    handed = sum(r._item.event.is_set() for r in reqs)
    open(flag, "w").close()
    for r in reqs:
        r.wait()
    return [handed]


def _wait_for(flag: str) -> None:
    """Until the sender has counted what it handed over (bounded)."""
    deadline = time.monotonic() + 60
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_credit_bounds_what_a_fast_sender_buffers(tmp_path) -> None:
    window = 16 << 20
    handed = mesh.spawn(_flow, 2, str(tmp_path / "counted"), timeout=60,
                        env={"MESH_WINDOW_BYTES": str(window)})[1][0]
    # at most a window's worth (plus one message) is in flight before the receiver reads
    assert handed <= window // (4 << 20) + 1


def _flood(world: mesh.Mesh, flag: str) -> list:
    """Empty messages carry no payload, but each still costs the receiver:
    credit charges every message, so a flood of them is held back too."""
    n = 20_000
    if world.rank == 1:
        return _handed([world.isend(np.empty(0), 0) for _ in range(n)], flag)
    _wait_for(flag)      # rank 0 reads only once rank 1 has counted
    for _ in range(n):
        assert world.recv(1).shape == (0,)
    return []


def test_credit_bounds_a_flood_of_empty_messages(tmp_path) -> None:
    window = 1 << 20
    handed = mesh.spawn(_flood, 2, str(tmp_path / "counted"), timeout=90,
                        env={"MESH_WINDOW_BYTES": str(window)})[1][0]
    assert 0 < handed <= window // 256 + 1


def _send_timed_out_for_credit(world: mesh.Mesh, flag: str) -> Any:
    """A blocking send that times out waiting for credit is withdrawn: its
    caller has its buffer back and may write it (or send again). It stayed
    queued and went once credit came, the caller's new contents in it. An
    issend queued behind it is cancelled there: none of it goes."""
    n = (1 << 20) // 8
    if world.rank == 0:
        world.send(np.zeros(2 * n), 1)           # alone, past the 1 MiB window
        a = np.ones(n)
        with pytest.raises(mesh.MeshTimeoutError) as e:
            world.send(a, 1, timeout=0.3)
        a.fill(-1.0)
        req = world.isend(np.full(4, 2.0), 1)    # waits for credit, and goes
        with pytest.raises(mesh.MeshTimeoutError, match="stays queued"):
            req.wait(timeout=0.1)
        synced = world.issend(np.full(3, 7.0), 1, tag=4)
        assert synced.cancel() is True and synced.done()
        with pytest.raises(mesh.MeshError, match=r"^rank 0: issend to rank 1 \(tag 4, group "
                           r"world\) was cancelled \(withdrawn before any of it went\)"):
            synced.wait(timeout=5)
        open(flag, "w").close()                  # (a message would wait for credit too)
        req.wait(timeout=30)
        world.send("last", 1, tag=5)
        return str(e.value)
    _wait_for(flag)
    first = world.recv(0, timeout=30)
    got = [first.size, world.recv(0, timeout=30).tolist()]
    assert world.recv(0, tag=5, timeout=30) == "last" and world.iprobe(0, tag=4) is None
    return got


def test_a_blocking_send_that_times_out_for_credit_is_withdrawn(tmp_path) -> None:
    got = mesh.spawn(_send_timed_out_for_credit, 2, str(tmp_path / "flag"), timeout=60,
                     env={"MESH_WINDOW_BYTES": str(1 << 20)})
    assert got[1] == [(2 << 20) // 8, [2.0] * 4], str(got[1])[:200]    # not -1.0s
    assert "waiting for credit from rank 1" in got[0] and "withdrawn" in got[0], got[0]


def _credit_by_the_waiter(world: mesh.Mesh) -> list:
    """A send queued for credit is handed over by the thread waiting for
    it, which reads the receiver's grant itself (as a blocked receive reads
    its message): here rank 1's progress thread reads nothing, so a send
    left to it would time out. Sockets only, a 1 MiB window, six sends of
    512 KiB."""
    n = (512 << 10) // 8
    if world.rank == 0:
        world.send(0, 1)
        return [bool(np.array_equal(world.recv(1), np.full(n, float(i)))) for i in range(6)]
    world.recv(0)
    progress = world._t.progress
    real = progress._read_one

    def not_by_the_progress_thread() -> bool:
        return not threading.current_thread().name.startswith("mesh-progress") and real()
    progress._read_one = not_by_the_progress_thread
    try:
        for i in range(6):
            world.send(np.full(n, float(i)), 0, timeout=10)
    finally:
        progress._read_one = real
    return []


def test_a_send_waiting_for_credit_reads_the_grant_itself() -> None:
    got = mesh.spawn(_credit_by_the_waiter, 2, timeout=60,
                     env={"MESH_SHM": "0", "MESH_WINDOW_BYTES": "1M"})
    assert got == [[True] * 6, []]


def _self_and_single(world: mesh.Mesh) -> str:
    world.send(np.arange(3), world.rank, tag=2)
    assert np.array_equal(world.recv(world.rank, tag=2), np.arange(3))
    return "ok"


def test_send_to_self_and_world_of_one() -> None:
    assert mesh.spawn(_self_and_single, 1, timeout=30) == ["ok"]
    assert mesh.spawn(_self_and_single, 2, timeout=30) == ["ok", "ok"]


def _misbehave(world: mesh.Mesh) -> list:
    import msgpack
    if world.rank == 1:
        # a stranger without the job secret connects to rank 0 and sends junk;
        # not blocking: once rank 0 has refused the handshake, ZeroMQ drops the
        # connection for good and a DEALER left without one blocks a send
        # forever (a stranger descheduled between connect and send, seen on
        # a loaded machine)
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(world.endpoints[0])
        _try_send(s, [[b"junk", b"\x00" * 10]] * 20)
        w = ctx.socket(zmq.DEALER)          # ...and one with a wrong secret
        w.setsockopt(zmq.LINGER, 0)
        w.setsockopt(zmq.PLAIN_USERNAME, b"meshrun")
        w.setsockopt(zmq.PLAIN_PASSWORD, b"guess")
        w.connect(world.endpoints[0])
        _try_send(w, [[b"junk"]])
        # an authenticated peer's socket sends malformed frames
        sock = world._t._peers[0].sock
        bad = [[b"\xc1not msgpack"], [wire.encode(wire.DATA, 1, 0, 0, dtype="<f8", shape=(4,),
                                                   nbytes=32), b"short"],
               [b"\x81\xa1k\xa5hello"], [wire.encode(wire.DATA, 1, 0, 0, dtype="|O", shape=(1,),
                                                     nbytes=8), b"12345678"],
               [wire.encode(wire.OBJ, 0, 0, 0, nbytes=1), b"x"],
               # a bad header followed by frames that would pass for a message
               # of their own: the whole multipart message must go
               [b"\xc1bad", wire.encode(wire.DATA, 1, 0, 0, dtype="<f8", shape=(1,), nbytes=8),
                b"\x00" * 8],
               # goodbyes whose count of rank 0's messages read is no count: dropped, the
               # peer not taken for gone (the receive below comes)
               [msgpack.packb({"k": wire.BYE, "s": 1, "h": "all"})],
               [msgpack.packb({"k": wire.BYE, "s": 1, "h": -5})]]
        # under the peer's lock: a ZeroMQ socket is not thread-safe, and the
        # progress thread sends on it too (credits, control), so sending on it
        # bare raced with that now and then and hung both ranks. Counted as
        # sent, as the transport counts what it puts on a socket: the array
        # below may go by ring (mesh.rings), which the receiver orders after
        # the socket messages counted before it; uncounted, it could overtake
        # them, and rank 0 returned before reading them all (seen on a loaded
        # machine: 1 of 6 counted)
        peer = world._t._peers[0]
        with peer.lock:
            for frames in bad:
                sock.send_multipart(frames)
                peer.sent += 1
        world.send(np.arange(4.0), 0)
        # keep the strangers connected until rank 0 has counted them: ZeroMQ
        # connects in the background, and a socket closed early may never
        # have reached the handshake (seen on a loaded machine)
        world.recv(0)
        s.close()
        w.close()
        ctx.term()
        return []
    got = world.recv(1)
    assert np.array_equal(got, np.arange(4.0))
    deadline = time.monotonic() + 20
    while world.refused < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    world.send("done", 1)
    return [world.refused, world.bad_messages]


def _try_send(sock: zmq.Socket, messages: list[list[bytes]]) -> None:
    for frames in messages:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return


def test_strangers_refused_and_garbage_dropped() -> None:
    refused, bad = mesh.spawn(_misbehave, 2, timeout=60)[0]
    assert refused >= 2
    assert bad == 8


def test_strangers_before_a_ranks_transport_is_built_are_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Strangers that connect to a rank between its rendezvous and its
    transport are counted: here rank 0 builds its transport only once its ZAP
    handler has refused the one with a wrong secret, as a loaded machine had it
    when rank 1 ran its job first. Its router's monitor was attached with the
    transport then, and never heard of connections made before (0 counted)."""
    handlers: list[auth.Authenticator] = []
    real_transport = world_module.Transport

    class Handler(auth.Authenticator):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            handlers.append(self)

    def late(*args: Any, **kwargs: Any) -> Any:
        if os.environ["RANK"] == "0":
            deadline = time.monotonic() + 20
            while not handlers[-1].refused and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)         # (and the other stranger's retry, 0.1 s later)
        return real_transport(*args, **kwargs)

    def strangers(world: mesh.Mesh) -> int:
        if world.rank == 1:
            ctx = zmq.Context()
            socks = [ctx.socket(zmq.DEALER) for _ in range(2)]
            socks[1].setsockopt(zmq.PLAIN_USERNAME, b"meshrun")
            socks[1].setsockopt(zmq.PLAIN_PASSWORD, b"guess")
            for s in socks:
                s.setsockopt(zmq.LINGER, 0)
                s.connect(world.endpoints[0])
            world.recv(0)           # (connected until rank 0 has counted them)
            for s in socks:
                s.close()
            ctx.term()
            return 0
        deadline = time.monotonic() + 20
        while world.refused < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        world.send("done", 1)
        return world.refused

    # (a closure: the ranks are forks of this process, patched)
    monkeypatch.setattr(auth, "Authenticator", Handler)
    monkeypatch.setattr(world_module, "Transport", late)
    assert mesh.spawn(strangers, 2, timeout=60)[0] >= 2


def _raises(world: mesh.Mesh) -> None:
    if world.rank == 1:
        raise ValueError("boom on purpose")
    world.recv(1, timeout=30)


def test_spawn_forwards_the_failing_rank_and_its_traceback() -> None:
    with pytest.raises(mesh.WorkerError) as info:
        mesh.spawn(_raises, 2, timeout=60)
    assert info.value.rank == 1
    assert "ValueError: boom on purpose" in str(info.value)
    assert "_raises" in info.value.traceback


def _threads(world: mesh.Mesh) -> int:
    """Several threads blocked in recv at once, each completed by its own message."""
    peer = 1 - world.rank
    results = [None] * 4

    def worker(i: int) -> None:
        results[i] = world.recv(peer, tag=i)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for i in reversed(range(4)):
        world.send(i * 3, peer, tag=i)
    for t in ts:
        t.join(30)
    return sum(results)


def test_several_threads_waiting_at_once() -> None:
    assert mesh.spawn(_threads, 2, timeout=60) == [18, 18]


class _DLPackOnly:
    """An array known only through DLPack (as a torch CPU tensor would be)."""

    def __init__(self, a: np.ndarray) -> None:
        self._a = a

    def __dlpack__(self, **kw: object) -> object:
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self) -> tuple:
        return self._a.__dlpack_device__()


class _DLPackRefused(_DLPackOnly):
    """One whose export fails, as a torch tensor that requires grad does."""

    def __dlpack__(self, **kw: object) -> object:
        raise BufferError("Can't export tensors that require gradient, use tensor.detach()")


class _FakeCuda:
    __cuda_array_interface__ = {"shape": (2,), "typestr": "<f4", "data": (0, False),
                                "version": 3}


def _dlpack(world: mesh.Mesh) -> str:
    if world.rank == 0:
        world.send(_DLPackOnly(np.arange(5, dtype=np.int16)), 1)
        with pytest.raises(TypeError, match=r"rank 0: send to rank 1 \(tag 0, group world\): "
                           r"_DLPackRefused cannot be read through DLPack \(BufferError"):
            world.send(_DLPackRefused(np.arange(2)), 1)     # (the bare BufferError before)
        try:
            import cupy  # noqa: F401
        except ImportError:
            with pytest.raises(ImportError, match=r"meshrun\[gpu\]"):
                world.send(_FakeCuda(), 1)
        return "ok"
    got = world.recv(0)
    assert got.dtype == np.int16 and np.array_equal(got, np.arange(5))
    return "ok"


def test_dlpack_objects_and_a_clear_error_without_cupy() -> None:
    assert mesh.spawn(_dlpack, 2, timeout=60) == ["ok", "ok"]


def _nested(torch: Any) -> Any:
    """A nested tensor (its strided layout hides it; prototype: torch warns)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor([torch.ones(1), torch.ones(2)])


def _tensors(world: mesh.Mesh) -> str:
    """torch tensors both ways: a torch tensor arrives as one (bfloat16 from
    its bits), out= tensors are written in place, views and tensors that
    require grad go as their values, and other dtypes raise naming them. out=
    tensors are checked when posted (contiguous, a dtype meshrun carries);
    one that does not fit leaves the message queued, as a numpy out= does;
    a bfloat16 message's Status and errors name bfloat16."""
    import torch

    from mesh.tensors import dtype_name
    peer = 1 - world.rank
    bf = torch.tensor([1.5, -2.25, 3e38, float("nan")], dtype=torch.bfloat16)
    big = torch.arange(3 << 18, dtype=torch.float32)         # several frames
    if world.rank == 0:
        world.send(torch.arange(6, dtype=torch.int64).reshape(2, 3), peer)
        world.send(bf, peer)
        world.isend(torch.arange(12.0).reshape(3, 4).t(), peer).wait()
        world.send(torch.ones(3, requires_grad=True), peer, tag=1)
        world.send(big, peer, tag=2)
        world.send(bf, peer, tag=3)
        world.send(torch.tensor(7, dtype=torch.uint8), peer, tag=4)
        world.send(np.arange(3.0), peer, tag=5)
        for bad in (torch.ones(2, dtype=torch.complex32),
                    torch.quantize_per_tensor(torch.ones(2), 0.5, 0, torch.quint8)):
            with pytest.raises(TypeError) as err:
                world.isend(bad, peer)
            assert str(bad.dtype) in str(err.value) and "send to rank 1" in str(err.value)
        for bad in (torch.eye(2).to_sparse_csr(), _nested(torch)):  # (torch's bare RuntimeError)
            with pytest.raises(TypeError, match=r"rank 0: send to rank 1 \(tag 0, group world\): "
                               r"(torch.sparse_csr|nested) tensors cannot be sent"):
                world.send(bad, peer)
        world.send(torch.zeros(2), peer, tag=6)
        world.send(bf, peer, tag=7)
        return "ok"
    a = world.recv(peer)
    assert isinstance(a, torch.Tensor) and a.dtype == torch.int64
    assert a.tolist() == [[0, 1, 2], [3, 4, 5]]
    b = world.recv(peer)
    assert b.dtype == torch.bfloat16 and torch.equal(b.view(torch.int16), bf.view(torch.int16))
    assert torch.equal(world.recv(peer), torch.arange(12.0).reshape(3, 4).t())
    g = world.recv(peer, tag=1)
    assert not g.requires_grad and g.tolist() == [1.0] * 3
    out = torch.empty(3 << 18)
    assert world.irecv(peer, tag=2, out=out).wait() is out and torch.equal(out, big)
    out16 = torch.zeros(4, dtype=torch.bfloat16)
    assert world.recv(peer, tag=3, out=out16) is out16
    assert torch.equal(out16.view(torch.int16), bf.view(torch.int16))
    u = world.recv(peer, tag=4)
    assert u.shape == () and u.dtype == torch.uint8 and int(u) == 7
    assert isinstance(world.recv(peer, tag=5), np.ndarray)   # numpy stays numpy
    with pytest.raises(ValueError, match=r"rank 1: recv from rank 0 \(tag 6, group world\): "
                       r"out= is a non-contiguous torch.float32 tensor \(shape \(2, 2\), "
                       r"strides \(1, 2\)\)"):
        world.recv(peer, tag=6, out=torch.zeros(2, 2).t())
    with pytest.raises(TypeError, match=r"rank 1: recv from rank 0 .*torch.complex32"):
        world.irecv(peer, tag=6, out=torch.zeros(2, dtype=torch.complex32))
    with pytest.raises(ValueError, match=r"rank 1: recv from rank 0 \(tag 6, group world\): "
                       r"out= is a nested torch.float32 tensor"):
        world.irecv(peer, tag=6, out=_nested(torch))
    with pytest.raises(mesh.OutMismatchError, match=r"the message is float32\[2\], out= is "
                       r"float64\[2\]; the message stays queued"):
        world.recv(peer, tag=6, out=torch.zeros(2, dtype=torch.float64))
    out2 = torch.ones(1, 2)
    assert world.recv(peer, tag=6, out=out2) is out2 and out2.tolist() == [[0.0, 0.0]]
    st = world.probe(peer, tag=7)
    assert st.dtype == np.uint16 and dtype_name(st.dtype) == "bfloat16"
    with pytest.raises(mesh.OutMismatchError, match=r"the message is bfloat16\[4\], out= is "
                       r"bfloat16\[3\]"):
        world.recv(peer, tag=7, out=torch.zeros(3, dtype=torch.bfloat16))
    status = mesh.Status()
    b2 = world.recv(peer, tag=7, status=status)
    assert torch.equal(b2.view(torch.int16), bf.view(torch.int16))
    assert dtype_name(status.dtype) == "bfloat16" and status.shape == (4,)
    return "ok"


def _negative_views(world: mesh.Mesh) -> list:
    """A real tensor with torch's negative bit (``c.conj().imag``, as public
    as it gets) went as its memory, without the minus: -2 arrived as 2."""
    import torch
    c = torch.tensor([1 + 2j, 3 - 4j, 5j])
    if world.rank == 0:
        for k, t in enumerate((c.conj().imag, c.conj().imag[::2], c.conj()[:2].imag)):
            assert t.is_neg()
            world.send(t, 1, tag=k)
        world.isend(c.conj().imag, 1, tag=3).wait()
        return []
    return [world.recv(0, tag=k).tolist() for k in range(4)]


def test_a_tensor_with_the_negative_bit_arrives_as_its_values() -> None:
    pytest.importorskip("torch")
    assert mesh.spawn(_negative_views, 2, timeout=60)[1] == [[-2.0, 4.0, -5.0], [-2.0, -5.0],
                                                             [-2.0, 4.0], [-2.0, 4.0, -5.0]]


def test_dtype_names_keep_bfloat16_apart_from_its_bits() -> None:
    """dtype_name caches plain dtypes' names; bfloat16's bits (uint16 with
    metadata) compare equal to uint16 and must not take or give its name."""
    from mesh.tensors import BFLOAT16, BFLOAT16_WIDE, dtype_name
    for _ in range(2):
        assert [dtype_name(d) for d in (np.dtype(np.uint16), BFLOAT16, np.dtype(np.float32),
                                        BFLOAT16_WIDE)] == ["uint16", "bfloat16", "float32",
                                                            "bfloat16"]
    assert dtype_name(BFLOAT16) == "bfloat16" and dtype_name(np.dtype(">f8")) == ">f8"


def test_torch_tensors_point_to_point() -> None:
    pytest.importorskip("torch")
    assert mesh.spawn(_tensors, 2, timeout=90) == ["ok", "ok"]


def _staggered_close(world: mesh.Mesh) -> list:
    import logging
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logging.getLogger("mesh").addHandler(Keep(logging.WARNING))
    time.sleep(0.2 * world.rank)      # ranks leave one after another
    world.close()
    states = [world._t.peer_state(r) for r in range(world.size) if r != world.rank]
    return [states, [r.getMessage() for r in records]]


def test_a_clean_shutdown_is_quiet_whoever_leaves_first() -> None:
    """(A rank leaves once its peers have answered its goodbye, not waiting
    for theirs: a peer that leaves later may still be alive to it.)"""
    for states, logged in mesh.spawn(_staggered_close, 4, timeout=60):
        assert set(states) <= {"closed", "alive"} and logged == [], (states, logged)


def _after_close(world: mesh.Mesh) -> list[str]:
    """Receives from a peer that has closed its mesh fail at once, naming the
    operation: one posted before the goodbye arrives, and one posted after."""
    if world.rank == 1:
        return []
    errors = []
    for _ in range(2):
        with pytest.raises(mesh.LostPeerError) as info:
            world.recv(1, tag=5, timeout=20)
        errors.append(str(info.value))
    return errors


def test_receives_from_a_closed_peer_name_the_operation() -> None:
    errors = mesh.spawn(_after_close, 2, timeout=60)[0]
    for e in errors:
        assert e.startswith("rank 0: recv from rank 1 (tag 5, group world) failed: peer rank 1 "
                            "is gone (it closed its mesh)"), e


def test_receive_spin_adapts_to_the_waits_it_sees() -> None:
    """Short waits the spin missed grow it (up to MESH_SPIN_US); waits longer
    than that shrink it to nothing, so long waits and big transfers do not
    burn CPU that the threads moving the data need."""
    from types import SimpleNamespace

    from mesh.progress import Progress

    t = SimpleNamespace(spin=200e-6, _spin_now=200e-6)
    for _ in range(12):
        Progress._adapt_spin(t, 5e-3)           # a pipeline stage computing
    assert t._spin_now == 0.0
    seen = []
    for _ in range(8):
        Progress._adapt_spin(t, 80e-6)          # a ping-pong's replies
        seen.append(t._spin_now)
    assert seen == sorted(seen) and t._spin_now >= 80e-6 and t._spin_now <= 200e-6
    before = t._spin_now
    Progress._adapt_spin(t, 50e-6)              # caught by the spin: no change
    assert t._spin_now == before


def test_a_tensor_reaches_a_rank_that_never_imported_torch() -> None:
    """Rank 1, the receiver, is a fresh interpreter; rank 0, the sender, a
    fork of mesh.spawn's fork server, which has imported torch
    (tests/proctools.run_ranks), the two joining as another launcher's
    ranks do. Under ``meshrun -n 2`` rank 0 imported torch before its send
    and rank 1 after its receive, one after the other: 12 s of the suite at
    load 20; the receiver's import is the one under test."""
    pytest.importorskip("torch")
    import subprocess
    import sys

    from proctools import free_port, rank_env, run_ranks
    repo = Path(__file__).resolve().parents[1]
    script = str(repo / "tests" / "scripts" / "tensor_to_torchless.py")
    env = rank_env({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(free_port()), "MESH_SECRET": "s3cret"})
    receiver = subprocess.Popen([sys.executable, script], env={**env, "RANK": "1"}, cwd=repo,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        procs, outs = run_ranks(script, [[]], {**env, "RANK": "0"}, [90])
        out, _ = receiver.communicate(timeout=90)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.communicate()
    assert procs[0].returncode == 0, outs[0]
    assert receiver.returncode == 0, out
    assert "Tensor torch.bfloat16 [0.0, 1.0, 2.0, 3.0]" in out, out


def test_the_point_to_point_benchmark_says_how_each_stream_went(
        capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m mesh.bench`` (BENCHMARKS.md's command) runs, and says for
    each stream the rings carry how many of its sends took the socket: the
    count that showed streams longer than their credit window falling off
    the ring."""
    from mesh import bench
    bench.main(["--trials", "1", "--sizes", "64K:64K", "--iters", "50"])
    out = capsys.readouterr().out
    assert "stream 64K (GB/s)" in out and "by ssend (us)" in out, out
    assert re.search(r"mesh trial 1, streams on the rings: 64K \d+ by socket", out), out



def _closed_under_a_wait(world: mesh.Mesh) -> list[str]:
    import threading
    seen: list[str] = []

    def wait(call: Any) -> None:
        try:
            call()
        except Exception as e:      # (what a raw ZeroMQ or memoryview error would be too)
            seen.append(f"{type(e).__name__}: {e}")
    calls = [lambda: world.recv(mesh.ANY, 5, timeout=30),
             lambda: world.probe(mesh.ANY, 6, timeout=30),
             lambda: world.irecv(mesh.ANY, 7).wait(30)]
    threads = [threading.Thread(target=wait, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    time.sleep(0.5)
    world.close()
    for t in threads:
        t.join(40)
    return seen


def test_waits_in_other_threads_end_with_a_mesh_error_when_the_mesh_closes() -> None:
    """Receives and probes from any source that other threads wait in end,
    as the mesh closes, with the closed-mesh error naming rank and call,
    not with ZeroMQ's or a released memoryview's (or, where the peer closed
    first, its goodbye leaving none to answer them: naming it)."""
    for rank, seen in enumerate(mesh.spawn(_closed_under_a_wait, 2, timeout=90)):
        assert len(seen) == 3, seen
        for text in seen:
            assert text.startswith(f"LostPeerError: rank {rank}: ") and (
                "this rank's mesh is closed" in text or "every rank that could send it is "
                f"gone: rank {1 - rank} (it closed its mesh)" in text), seen


def _closes_before_its_peer(world: mesh.Mesh, marker: str) -> bool:
    """Rank 0 closes while a thread of its own waits in a receive from rank
    1; rank 1 closes only once that wait has failed (``marker`` written),
    or after 30 s: whether it saw the wait fail first."""
    import threading
    if world.rank == 0:
        def wait() -> None:
            try:
                world.recv(1, 5, timeout=60)
            except mesh.LostPeerError as e:
                if "this rank's mesh is closed" in str(e):
                    Path(marker).write_text("failed")
        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.3)
        world.close()
        t.join(60)
        return True
    deadline = time.monotonic() + 30
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = os.path.exists(marker)
    world.close()
    return seen


def test_a_wait_in_another_thread_ends_when_close_starts_not_when_the_peers_leave(
        tmp_path: Path) -> None:
    """close() waits for the peers' goodbyes (MESH_CLOSE_WAIT); a receive
    another thread of the closing rank waits in fails when close starts,
    not after that wait (it held the thread up to 30 s)."""
    assert mesh.spawn(_closes_before_its_peer, 2, str(tmp_path / "failed"),
                      timeout=90) == [True, True]


def _closes_while_its_peer_is_busy(world: mesh.Mesh, marker: str) -> Any:
    """Rank 0 sends a small message and a large one (the same-host direct
    path: rank 1 reads it out of rank 0's memory) and closes while rank 1
    is busy elsewhere (a hang, a save: it never calls close); rank 1, once
    rank 0's close has returned, receives both, then hears that rank 0 left.
    Rank 1's issend, which rank 0 leaves unread, fails saying so."""
    big = np.arange(1 << 17, dtype=np.float64)     # 1 MiB: direct, where the peer may read us
    if world.rank == 0:
        world.probe(1, tag=9, timeout=20)
        world.send("small", 1)
        world.send(big, 1)
        t0 = time.monotonic()
        world.close()
        took = time.monotonic() - t0
        Path(marker).write_text(f"{took}")
        return took
    synced = world.issend(np.ones(2), 0, tag=9)
    _wait_for(marker)
    got = [world.recv(0, timeout=10) == "small", bool(np.array_equal(world.recv(0), big))]
    for req in (None, synced):
        try:
            world.recv(0, timeout=10) if req is None else req.wait(timeout=10)
        except mesh.LostPeerError as e:
            got.append(str(e))
    t0 = time.monotonic()
    world.close()
    return got + [time.monotonic() - t0]


def test_close_does_not_wait_for_a_busy_peers_goodbye(tmp_path: Path) -> None:
    """close() waited MESH_CLOSE_WAIT (30 s) for the goodbye of a peer whose
    main thread was busy elsewhere (torch's destroy_process_group after a
    rank hung in a save, too): the peer's reader now answers the goodbye once
    all sent before it is in, and the close returns then. What was sent is
    still received, and the next receive names the rank that left."""
    took, (small, big, error, unread, closed) = mesh.spawn(
        _closes_while_its_peer_is_busy, 2, str(tmp_path / "closed"), timeout=90)
    assert took < 10 and closed < 10, (took, closed)       # (a hang guard: it was 30 s)
    assert small and big, (small, big)
    assert "peer rank 0 is gone (it closed its mesh)" in error, error
    assert unread == ("rank 1: issend to rank 0 (tag 9, group world) failed: dropped unread: "
                      "rank 0 closed its mesh with it unread"), unread


def _large_sends_then_close(world: mesh.Mesh) -> list[str]:
    import threading
    x = np.ones(20000, np.int64)        # 160 KB: sent without a copy (pyzmq's gc thread)
    for _ in range(3):
        if world.rank == 0:
            world.send(x, 1)
        else:
            world.recv(0)
    world.close()
    time.sleep(0.3)
    return sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())


def test_no_thread_outlives_the_mesh() -> None:
    """pyzmq's zero-copy garbage thread, which large sends start, goes
    with the process's last mesh (destroy_process_group promises no
    thread left)."""
    assert mesh.spawn(_large_sends_then_close, 2, timeout=60) == [[], []]


def _taken_then_closed(world: mesh.Mesh, how: str, handed: str) -> list:
    """Rank 0 sends rank 1 a 2 MiB array twice, zero-copy in one ZeroMQ
    message each (MESH_SHM=0: no same-host direct path), by isend, then by
    a blocking send, whose release by ZeroMQ is told rank 0 only once a
    wait has seen rank 1 leave (pyzmq's garbage thread, late under load).
    Rank 1 receives them and closes its mesh (``how`` "closes"), or leaves
    on an error ("fails"); or ("unread") stops reading its socket, tells
    rank 0 to send, and closes once the arrays are handed to ZeroMQ. Once
    the blocking send is over, rank 0 polls the isend's ``test()`` (10 s at
    most): done as the blocking send's wait was, or what it raised."""
    big = np.arange((2 << 20) // 8, dtype=np.float64)
    if world.rank == 1:
        if how != "unread":
            got = [bool(np.array_equal(world.recv(0, tag=1), big)) for _ in range(2)]
            world._close(RuntimeError("boom") if how == "fails" else None)
            return got
        reader, progress = world._t.reader, world._t.progress
        reader.read_one = progress._read_one = lambda: False    # nothing read from now on
        world.send("go", 0, tag=2)
        _wait_for(handed)
        world.close()       # (its peer's answer unread: MESH_CLOSE_WAIT, 1 s here)
        return []
    if how == "unread":
        world.recv(1, tag=2)
    hold_releases(world, 1, handed)
    req = world.isend(big, 1, tag=1)
    try:
        world.send(big, 1, tag=1, timeout=30)
        got = ["sent", world._t.peer_state(1)]
    except mesh.MeshError as e:
        got = [type(e).__name__, str(e), getattr(e, "peer", None)]
    deadline = time.monotonic() + 10    # (it waited for a release that never came)
    try:
        while not req.test()[0]:
            if time.monotonic() > deadline:
                return got + ["test() still False after 10 s"]
        return got + ["test() done"]
    except mesh.MeshError as e:
        return got + [type(e).__name__, str(e), getattr(e, "peer", None)]


@pytest.mark.parametrize("how", ["closes", "fails"])
def test_a_send_its_receiver_took_does_not_fail_as_the_receiver_leaves(
        tmp_path: Path, how: str) -> None:
    """The receiver took the array and left (closed its mesh, or on an
    error) before ZeroMQ let go of the sender's frames: the send raised
    LostPeerError ("it closed its mesh", "it failed: ...") for a message
    that had arrived. The goodbye says how many of the sender's messages
    the receiver had read: the send returns."""
    got = mesh.spawn(_taken_then_closed, 2, how, str(tmp_path / "handed"), timeout=60,
                     env={"MESH_SHM": "0"})
    assert got == [["sent", "closed" if how == "closes" else "dead", "test() done"],
                   [True, True]], got


def test_a_send_its_receiver_never_read_fails_as_the_receiver_leaves(tmp_path: Path) -> None:
    """The receiver closed without reading the messages: its goodbye says so,
    and the send raises LostPeerError naming it and the send; so does the
    isend's test() (it waited for ZeroMQ's release: a loop polling it spun)."""
    got = mesh.spawn(_taken_then_closed, 2, "unread", str(tmp_path / "handed"), timeout=60,
                     env={"MESH_SHM": "0", "MESH_CLOSE_WAIT": "1"})
    assert got[1] == [] and got[0][0] == "LostPeerError" and got[0][2] == 1, got
    assert got[0][3:] == ["LostPeerError", got[0][4], 1], got
    for said in got[0][1], got[0][4]:
        assert said.startswith("rank 0: send to rank 1 (tag 1, group world) failed: peer "
                               "rank 1 is gone (it closed its mesh)"), got


def _isends_then_close(world: mesh.Mesh) -> list:
    """Rank 0 posts sends past its 1 MiB window and closes; rank 1 computes
    for 1 s, past MESH_CLOSE_LINGER (0.3 s here, 5 s by default), before it
    receives. The sends queued for credit were given the linger, then
    dropped, though close() waits for rank 1's goodbye anyway: the credit
    that came later sent them after the goodbye, and rank 1's receives
    failed ("it closed its mesh")."""
    n = (1 << 20) // 8
    if world.rank == 0:
        reqs = [world.isend(np.full(n, float(i)), 1) for i in range(3)]
        world.close()
        return [r.done() for r in reqs]
    time.sleep(1.0)
    return [bool((world.recv(0, timeout=30) == i).all()) for i in range(3)]


def test_close_sends_what_isend_queued_to_a_late_receiver() -> None:
    """(The linger made short, the receiver need not wait out 5 s: 5.5 s a run.)"""
    got = mesh.spawn(_isends_then_close, 2, timeout=60,
                     env={"MESH_WINDOW_BYTES": str(1 << 20), "MESH_CLOSE_LINGER": "0.3"})
    assert got == [[True] * 3, [True] * 3], got


def _isends_to_a_stuck_peer(world: mesh.Mesh, marker: str) -> list:
    """Rank 0 posts sends past its 2 MiB window and closes; rank 1 never
    receives (busy elsewhere until rank 0's close has returned). Rank 0's
    close logs which sends it waits for rank 1 to take, then which it
    dropped; each dropped send's wait names it; a send that went (the
    first: read out of rank 0's memory) still waits after the close."""
    import logging
    if world.rank == 1:
        _wait_for(marker)
        return []
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logging.getLogger("mesh").addHandler(Keep(logging.WARNING))
    deadline = time.monotonic() + 30     # (rank 1 has answered the direct path's probe)
    while not world._t.direct.usable(1) and time.monotonic() < deadline:
        time.sleep(0.01)
    n = (2 << 20) // 8      # (over the ring's largest entry: direct, read by rank 1's reader)
    reqs = [world.isend(np.full(n, float(i)), 1, tag=i) for i in range(3)]
    world.close()
    Path(marker).write_text("closed")
    waits = []
    for r in reqs:
        try:
            r.wait(5)
            waits.append("ok")
        except mesh.MeshError as e:
            waits.append(str(e))
    return [r.getMessage() for r in records] + waits


def test_close_names_the_isends_a_stuck_peer_never_takes(tmp_path: Path) -> None:
    """close() cannot tell a stuck peer from a slow reader (both answer
    heartbeats): it waits MESH_CLOSE_WAIT for either, and says which sends
    it waits for and which it dropped. (The wait of a send read out of this
    rank's memory raised OSError after the close: its wake pipe was closed;
    and the sends dropped, registered for the direct path, held the close
    for a second MESH_CLOSE_WAIT: 6 s at MESH_CLOSE_WAIT=3.)"""
    env = {"MESH_WINDOW_BYTES": str(2 << 20), "MESH_CLOSE_WAIT": "1",
           "MESH_CLOSE_LINGER": "0.3", "MESH_STALL_WARN": "0.2"}
    said, _ = mesh.spawn(_isends_to_a_stuck_peer, 2, str(tmp_path / "closed"), timeout=60,
                         env=env)
    waits = said[-3:]
    assert waits[0] == "ok", waits
    for tag, text in zip((1, 2), waits[1:]):
        assert text.startswith(f"rank 0: send to rank 1 (tag {tag}, group world) (2097152 "
                               f"bytes) was not sent"), text
        assert "close() waited: MESH_CLOSE_WAIT) (rank 1 last heard from" in text, text
    told = [line for line in said[:-3] if "close() waits up to 1s" in line]
    assert told and told[0].startswith(
        "rank 0: close() waits up to 1s (MESH_CLOSE_WAIT) for rank 1 to receive 2 send(s): "
        "send to rank 1 (tag 1, group world), 2097152 bytes, queued for credit; send to "
        "rank 1 (tag 2, group world), 2097152 bytes, queued for credit (rank 1 last heard"), said
    assert any(line.startswith("rank 0: closing with 2 send(s) to rank 1 dropped")
               for line in said[:-3]), said


def _pieces(world: mesh.Mesh) -> str:
    n = (wire.CHUNK_BYTES * 3) // 8 + 5       # pieces, the last one short (an odd tail)
    big = np.arange(n, dtype=np.float64)
    blob = bytes(range(256)) * ((wire.CHUNK_BYTES + 12345) // 256)    # an object in pieces
    if world.rank in (0, 2):
        assert world._t._pieced[1], world._t.endpoints
        first = world.isend(big + world.rank, 1, tag=1)
        world.send(np.float64(world.rank), 1, tag=1)    # after the big one, on its tag
        world.send(blob, 1, tag=2)
        first.wait()
        return "sent"
    if world.rank != 1:
        return "idle"
    out = np.empty_like(big)
    a = world.recv(0, tag=1, out=out)
    assert a is out and np.array_equal(a, big), a[:4]
    assert world.recv(0, tag=1) == 0.0
    st = mesh.Status()
    b = world.recv(mesh.ANY, tag=1, status=st)
    assert st.source == 2 and np.array_equal(b, big + 2), (st.source, b[:4])
    assert world.recv(2, tag=1) == 2.0
    assert world.recv(0, tag=2) == blob and world.recv(2, tag=2) == blob
    assert world._t.reader.bad_messages == 0
    return "ok"


def test_a_large_message_to_another_host_goes_in_pieces_intact() -> None:
    """Across hosts (tcp://, forced here) a message of more than
    mesh.wire.CHUNK_BYTES goes in pieces: arrays (into out= and fresh) and
    objects arrive whole, in order per source and tag, ANY source too.
    (Arrays take a stream instead, where one is open: mesh.streams, off here.)"""
    got = mesh.spawn(_pieces, 3, timeout=90, env={"MESH_FORCE_TCP": "1",
                                                  "MESH_P2P_STREAM_MIN": "0"})
    assert got == ["sent", "ok", "sent"]


def _dies_mid_message(world: mesh.Mesh, flag: str, result: str) -> None:
    if world.rank == 1:
        world.isend(np.ones(32 << 20), 0, tag=1)    # 256 MiB: 64 MiB ahead, then answers
        Path(result).write_text(str(os.getpid()))
        _wait_for(flag)
        os.kill(os.getpid(), signal.SIGSTOP)      # lost (stopped), until rank 0 kills it
    pieces = world._t.reader._pieces
    deadline = time.monotonic() + 30
    while 1 not in pieces and time.monotonic() < deadline:
        time.sleep(0.01)
    had = 1 in pieces
    open(flag, "w").close()
    while world._t.peer_state(1) == "alive" and time.monotonic() < deadline:
        time.sleep(0.05)
    while pieces and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = int(Path(result).read_text())
    Path(result).write_text(f"{had} {world._t.peer_state(1)} {sorted(pieces)}")
    os.kill(victim, signal.SIGKILL)


def test_a_sender_lost_mid_message_leaves_no_pieces_behind(tmp_path: Path) -> None:
    """A sender lost (stopped) with its message in pieces part-way across:
    once it is lost, the receiver lets go of the pieces it had, not at close."""
    result = tmp_path / "result"
    with pytest.raises(mesh.WorkerError):
        mesh.spawn(_dies_mid_message, 2, str(tmp_path / "flag"), str(result), timeout=60,
                   env={"MESH_FORCE_TCP": "1", "MESH_PEER_TIMEOUT": "2",
                        "MESH_P2P_STREAM_MIN": "0"})
    assert result.read_text() == "True dead []"


def _wait_some(world: mesh.Mesh) -> list:
    if world.rank == 1:
        world.recv(0, tag=9)
        world.send("two", 0, tag=2)
        time.sleep(0.2)
        world.send("one", 0, tag=1)
        sent = mesh.waitall([world.isend(np.arange(3), 0, tag=4), world.isend("x", 0, tag=5)])
        world.recv(0, tag=10)
        world.send("p", 0, tag=20)
        world.send("q", 0, tag=21)
        world.recv(0, tag=17)
        for tag, x in ((11, "a"), (12, "b"), (14, "sync")):
            world.send(x, 0, tag=tag)
        world.recv(0, tag=18)
        world.send("c", 0, tag=13)
        world.recv(0, tag=19)
        return sent
    reqs = [world.irecv(1, tag=1), world.irecv(1, tag=2)]
    early = reqs[0].test()
    none_yet = mesh.testall(reqs)
    world.send("go", 1, tag=9)
    first = mesh.waitany(reqs, timeout=30)
    rest = mesh.waitall(reqs, timeout=30)
    late = reqs[0].test()
    every = mesh.testall(reqs)
    never = world.irecv(1, tag=3)
    try:
        mesh.waitany([never], timeout=0.1)
        timed_out = ""
    except mesh.MeshTimeoutError as e:
        timed_out = str(e)
    assert never.cancel()
    got = mesh.waitall([world.irecv(1, tag=4), world.irecv(1, tag=5)])
    # a waitall that times out gives up none of its requests: tried again, it gets
    # their messages (it withdrew the first receive, and raised that stale timeout
    # again at once, its message gone to the next receive)
    pair = [world.irecv(1, tag=20), world.irecv(1, tag=21)]
    for _ in range(2):
        with pytest.raises(mesh.MeshTimeoutError) as stale:
            mesh.waitall(pair, timeout=0.1)
    world.send("done", 1, tag=10)
    pair_got = [mesh.waitall(pair, timeout=30), str(stale.value)]
    with pytest.raises(ValueError) as e:
        mesh.waitany([])
    empty = [str(e.value), mesh.waitall([]), mesh.waitall([], timeout=1), mesh.testall([])]
    trio = [world.irecv(1, tag=t) for t in (11, 12, 13)]
    idle = [mesh.testany(trio), mesh.testsome(trio)]
    world.send("go", 1, tag=17)
    world.recv(1, tag=14)           # (after 11 and 12, from the same rank)
    some = mesh.waitsome(trio, timeout=30)
    idle += [mesh.testany(trio), mesh.testsome(trio)]
    world.send("go", 1, tag=18)
    last: tuple = (None, False, None)
    while not last[1]:
        last = mesh.testany(trio)
    off, mine = world.irecv(1, tag=15), world.irecv(0, tag=16)
    assert off.cancel()
    world.send("self", 0, tag=16)
    mixed: list = [mine, off]
    mixed.append(mesh.waitsome(mixed, timeout=30))
    errors = []
    for _ in range(2):
        with pytest.raises((mesh.MeshError, ValueError)) as e:
            mesh.waitsome(mixed[:2], timeout=30)
        errors.append(str(e.value))
    with pytest.raises(ValueError) as e:
        mesh.testsome(trio)
    errors.append(str(e.value))
    world.send("done", 1, tag=19)
    return [early, first, rest, late, "timed out" in timed_out, got[0].tolist(), got[1],
            none_yet, every, empty, idle, some, last, mixed[2:], errors, pair_got]


def _not_a_list(world: mesh.Mesh) -> list:
    sent, got = world.isend(np.arange(3), 0, tag=1), world.irecv(0, tag=1)
    said = []
    for call in (mesh.waitall, mesh.waitany, mesh.waitsome, mesh.testall, mesh.testany,
                 mesh.testsome):
        for given in (got, [got, np.arange(2)], sent, 3):
            with pytest.raises(TypeError) as e:
                call(given)
            said.append(str(e.value))
    return [said, mesh.waitall([sent, got])[1].tolist()]


def test_the_wait_and_test_calls_given_no_list_of_requests_say_so() -> None:
    """A newcomer's mesh.waitall(req) raised "'_Sent' object is not iterable",
    and a list holding an array "'numpy.ndarray' object has no attribute
    'wait'": neither named the rank nor the call. The requests are left as
    they were: a list of them is waited for after."""
    said, got = mesh.spawn(_not_a_list, 1, timeout=60)[0]
    assert got == [0, 1, 2]
    for i, call in enumerate(("waitall", "waitany", "waitsome", "testall", "testany",
                              "testsome")):
        one, mixed, sent, number = said[4 * i:4 * i + 4]
        assert one == sent == (f"rank 0: {call} takes a list of requests (those isend and "
                               f"irecv return), not one request: give [req], or wait for one "
                               f"alone with req.wait()"), (one, sent)
        assert number == (f"rank 0: {call} takes a list of requests (those isend and irecv "
                          f"return), not an int: give [req], or wait for one alone with "
                          f"req.wait()"), number
        assert mixed == (f"rank 0: {call}: requests[1] is a ndarray, not a request (what "
                         f"isend and irecv return)"), mixed


def test_test_waitany_and_waitall_as_mpi4py_has_them() -> None:
    """Request.test() answers at once; waitany returns the first request
    done (index and result); waitall the results in order, bounded by one
    timeout; waitany times out with MeshTimeoutError; testall answers at
    once, every result once all are done. An empty list: waitall and
    testall give mpi4py's [] and (True, []), waitany raises naming the rank
    (its ValueError named none). waitsome gives every request done by then,
    testany and testsome answer at once (mpi4py's; there were none), a
    request done with an error is left to the next call, which raises it."""
    res = mesh.spawn(_wait_some, 2, timeout=60)
    assert res[0][:10] == [(False, None), (1, "two"), ["one", "two"], (True, "one"), True,
                           [0, 1, 2], "x", (False, None), (True, ["one", "two"]), [
                               "rank 0: waitany: no requests (an empty list; mpi4py's waitany "
                               "returns (MPI.UNDEFINED, None) for one, meshrun raises, as once "
                               "every request was waited for)", [], [], (True, [])]]
    idle, some, last, mixed, errors, (pair, said) = res[0][10:]
    assert pair == ["p", "q"]
    assert said.startswith("rank 0: waitall on 2 requests timed out after 0.1s, 0 done; not "
                           "done: recv from rank 1 (tag 20, group world) (rank 1 last heard "
                           "from "), said
    assert said.endswith("(none given up: a later waitall, wait or test completes them)"), said
    assert idle == [(None, False, None), ([], [])] * 2
    assert some == ([0, 1], ["a", "b"]) and last == (2, True, "c")
    assert mixed == [([0], ["self"])]
    assert errors == ["rank 0: recv from rank 1 (tag 15, group world) was cancelled",
                      "rank 0: waitsome: each of the 2 requests was waited for already (its "
                      "result given by wait, test or waitany)",
                      "rank 0: testsome: each of the 3 requests was waited for already (its "
                      "result given by wait, test or waitany)"]
    assert res[1] == [None, None]


def _alloc_tuned(world: mesh.Mesh) -> bool:
    from mesh import alloc
    return alloc.tuned


@pytest.mark.parametrize("env,want", [({"MESH_FORCE_TCP": "1"}, True), ({}, False),
                                      ({"MESH_FORCE_TCP": "1", "MESH_MALLOC_TUNE": "0"}, False),
                                      ({"MESH_FORCE_TCP": "1", "MALLOC_TRIM_THRESHOLD_": "1"},
                                       False)],
                         ids=["tcp", "same-host", "off", "user-set"])
def test_malloc_thresholds_set_for_peers_on_other_hosts(env: dict, want: bool) -> None:
    """mesh.alloc: a rank with a tcp:// peer keeps ZeroMQ's receive buffers
    off fresh pages (glibc's thresholds), unless told not to or the user
    set glibc's own; a mesh of one host leaves malloc alone."""
    import sys
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc thresholds: Linux only")
    assert mesh.spawn(_alloc_tuned, 2, timeout=60, env=env) == [want, want]


def _waitany_loop(world: mesh.Mesh) -> list:
    if world.rank == 0:
        for tag in (2, 0, 1):
            world.send(f"m{tag}", 1, tag=tag)
        world.recv(1, tag=9)
        for k in range(8):          # one at a time, to threads waiting in waitany
            world.send(k, 1, tag=6)
            time.sleep(0.01)
        world.recv(1, tag=9)
        return []
    reqs = [world.irecv(0, tag=t) for t in range(3)]
    reqs += [world.isend(np.arange(2), 0, tag=5), world.isend(np.arange(2), 0, tag=5)]
    got = [mesh.waitany(reqs, timeout=30) for _ in reqs]
    try:
        mesh.waitany(reqs, timeout=1)
        spent = ""
    except ValueError as e:
        spent = str(e)
    left = world.irecv(0, tag=3)
    try:
        mesh.waitany([reqs[0], left], timeout=0.1)
        timed_out = ""
    except mesh.MeshTimeoutError as e:
        timed_out = str(e)
    assert left.cancel()
    world.send("done", 0, tag=9)
    # two threads in waitany on one list: each message given once (both saw the
    # request done, and both gave it)
    reqs = [world.irecv(0, tag=6) for _ in range(8)]
    shared: list = []

    def drain() -> None:
        while True:
            try:
                shared.append(mesh.waitany(reqs, timeout=30))
            except ValueError:
                return
    threads = [threading.Thread(target=drain) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    world.send("done", 0, tag=9)
    return [sorted(got, key=str), spent, timed_out, sorted(shared)]


@pytest.mark.timeout(60)
def test_waitany_called_again_gives_the_next_request_never_the_same_twice() -> None:
    """mpi4py's loop, ``for _ in reqs: i, x = waitany(reqs)``: a request
    whose result a wait gave is spent (mpi4py nulls it), so each message is
    handled once (waitany gave request 0 and its message every time), sends
    done at once by ring included; once all are spent waitany says so, and
    its timeout names what it waited for. Threads calling waitany on one
    list each get a message of their own (two got the same one)."""
    got, spent, timed_out, shared = mesh.spawn(_waitany_loop, 2, timeout=60)[1]
    assert shared == [(k, k) for k in range(8)]
    assert got == [(0, "m0"), (1, "m1"), (2, "m2"), (3, None), (4, None)]
    assert spent == "rank 1: waitany: each of the 5 requests was waited for already (its " \
                    "result given by wait, test or waitany)"
    # (with what its peer last said, as a receive's timeout says it)
    assert timed_out.startswith("rank 1: waitany on 1 request timed out after 0.1s, none "
                                "done: recv from rank 0 (tag 3, group world) (rank 0 last "
                                "heard from "), timed_out


def _polled_beside_a_blocked_receive(world: mesh.Mesh) -> list:
    """Rank 1 polls (test, iprobe) while a thread of its own waits in a
    blocking receive: both read the socket in turns, and every message is
    taken once."""
    import threading
    if world.rank == 0:
        world.recv(1, tag=9)
        for i in range(50):
            world.send(np.full(3, i), 1, tag=2)
            world.send(i, 1, tag=3)
        world.send("last", 1, tag=1)
        world.recv(1, tag=8)
        world.send("late", 1, tag=4)
        return []
    got: list = []
    blocked = threading.Thread(target=lambda: got.append(world.recv(0, tag=1, timeout=30)))
    blocked.start()
    world.send("go", 0, tag=9)
    polled, probed = [], 0
    for _ in range(50):
        req = world.irecv(0, tag=2)
        while not (done := req.test())[0]:
            pass
        polled.append(int(done[1][0]))
        while world.iprobe(0, tag=3) is None:
            pass
        probed += world.recv(0, tag=3, timeout=30) == len(polled) - 1
    blocked.join(30)
    late = world.irecv(0, tag=4)
    before = late.get_status()
    world.send("more", 0, tag=8)
    st = mesh.Status()
    while not late.get_status(st):      # done: its result is left for waitany
        pass
    return [polled == list(range(50)), probed, got, before, st.tag,
            mesh.waitany([late], timeout=10)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("env", [{}, {"MESH_SHM": "0"}], ids=["same-host", "socket"])
def test_polling_test_and_iprobe_read_beside_a_blocked_receive(env: dict) -> None:
    """Request.test, get_status and iprobe read what has come in the
    caller's thread (as MPI_Test and MPI_Iprobe drive MPI's progress) when
    the reading turn is free, and ask for it as a receive does when it is
    not: beside a thread blocked in a receive, nothing is lost or taken
    twice; get_status leaves the result for a wait."""
    assert mesh.spawn(_polled_beside_a_blocked_receive, 2, timeout=60, env=env)[1] == \
        [True, 50, ["last"], False, 4, (0, "late")]


def _iprobe_after_close(world: mesh.Mesh) -> list:
    """iprobe on a closed mesh: what came before the close is still seen,
    and a look for more reads nothing (it read the closed rings: a
    ValueError about a released memoryview, naming no rank)."""
    if world.rank == 0:
        world.send("early", 1, tag=4)
        world.close()
        return []
    world.probe(0, tag=4, timeout=20)
    world.close()
    st = world.iprobe(0, tag=4)
    return [st is not None and st.tag, world.iprobe(0, tag=5), world.iprobe(mesh.ANY, 6)]


@pytest.mark.timeout(60)
def test_iprobe_after_close_reads_nothing_more() -> None:
    assert mesh.spawn(_iprobe_after_close, 2, timeout=60)[1] == [4, None, None]


def _send_after_close(world: mesh.Mesh) -> list:
    """A send after close, to a peer and to this rank itself, one way each."""
    world.close()
    said = []
    for dst in (1 - world.rank, world.rank):
        for how in ("send", "isend"):
            try:
                if how == "send":
                    world.send(np.arange(3), dst, tag=2)
                else:
                    world.isend({"x": 1}, dst, tag=2).wait()
                said.append(f"{how} to {dst}: sent")
            except mesh.LostPeerError as e:
                said.append(f"{how} to {dst}: {e}")
    return said


@pytest.mark.timeout(60)
def test_a_send_to_this_rank_itself_after_close_fails_as_one_to_a_peer() -> None:
    """Once closed, a send to this rank itself went on working (into its
    own inbox) where one to a peer raised: it raises the same error now."""
    for rank, said in enumerate(mesh.spawn(_send_after_close, 2, timeout=60)):
        assert len(said) == 4, said
        for line, dst in zip(said, (1 - rank, 1 - rank, rank, rank)):
            assert line.split(":")[0] in (f"send to {dst}", f"isend to {dst}"), said
            assert f"rank {rank}: " in line and "this rank's mesh is closed" in line, said


def _waitany_zero_loop(world: mesh.Mesh) -> list:
    """A loop polling waitany(timeout=0) while the progress thread cannot
    run (a switch interval of 1 s: a busy caller keeps the interpreter)."""
    import sys
    if world.rank == 0:
        for i in range(3):
            world.recv(1, tag=9, timeout=30)
            world.send(np.full(2, i), 1, tag=2)
        return []
    took = []
    for i in range(3):
        req = world.irecv(0, tag=2)
        before = sys.getswitchinterval()
        sys.setswitchinterval(1.0)
        start = time.monotonic()
        try:
            world.send(None, 0, tag=9)
            while True:
                try:
                    got = mesh.waitany([req], timeout=0)
                    break
                except mesh.MeshTimeoutError:
                    if time.monotonic() - start > 10:
                        raise
        finally:
            sys.setswitchinterval(before)
        took.append(time.monotonic() - start)
        assert got[0] == 0 and got[1].tolist() == [i, i]
    return took


@pytest.mark.timeout(60)
@pytest.mark.parametrize("env", [{}, {"MESH_SHM": "0"}], ids=["same-host", "socket"])
def test_waitany_with_timeout_0_reads_what_has_come(env: dict) -> None:
    """waitany(timeout=0) looks at what has come before it times out, as
    recv(timeout=0) does: a loop polling it saw a message only once the
    progress thread had the interpreter (a switch interval later)."""
    took = mesh.spawn(_waitany_zero_loop, 2, timeout=60, env=env)[1]
    assert max(took) < 0.5, took


def _any_after_goodbyes(world: mesh.Mesh) -> str:
    if world.rank != 1:
        return ""
    start = time.monotonic()
    try:
        world.recv(mesh.ANY, tag=3, timeout=10)
    except mesh.LostPeerError as e:
        return f"{time.monotonic() - start < 5} {e}"
    return "received"


@pytest.mark.timeout(60)
def test_a_receive_from_any_rank_ends_when_every_peer_has_closed() -> None:
    """The peers closing cleanly without sending: a receive from any rank
    fails as soon as the last has said goodbye, naming them, not at its
    timeout (it waited MESH_TIMEOUT, 300 s by default)."""
    said = mesh.spawn(_any_after_goodbyes, 3, timeout=60)[1]
    assert said == "True rank 1: recv from any rank (tag 3, group world) failed: every rank " \
                   "that could send it is gone: rank 0 (it closed its mesh), rank 2 (it closed " \
                   "its mesh)"


def test_grid_rank_of_refuses_coordinates_outside_the_grid() -> None:
    """rank_of(pp=2) on a dp=2 x pp=2 grid was rank 2 (dp=1, pp=0), and an
    axis the grid lacks (a typo) was ignored: this rank's own. Both raise,
    naming the rank, the axis and its range."""
    from types import SimpleNamespace
    comm = SimpleNamespace(size=4, rank=1, name="world", _t=SimpleNamespace(rank=1),
                           group=lambda ranks: None)
    grid = mesh.Grid(comm, {"dp": 2, "pp": 2})      # type: ignore[arg-type]
    assert [grid.rank_of(dp=1), grid.rank_of(pp=0), grid.rank_of(dp=np.int64(1), pp=1)] == \
        [3, 0, 3]
    for coords in ({"pp": 2}, {"dp": -1}, {"pp": 1.0}, {"dp": True}):
        with pytest.raises(ValueError) as e:
            grid.rank_of(**coords)
        name, v = next(iter(coords.items()))
        assert str(e.value) == (f"rank 1: <Grid {{'dp': 2, 'pp': 2}} at {{'dp': 0, 'pp': 1}}>"
                                f".rank_of({name}={v!r}): axis {name!r} has coordinates 0..1")
    with pytest.raises(KeyError, match=r"rank 1: grid has axes \['dp', 'pp'\], not 'tp'"):
        grid.rank_of(tp=0)
    for axes in ({"dp": True, "pp": 4}, {"dp": 2.0, "pp": 2}, {"dp": 0, "pp": 4}):
        with pytest.raises(ValueError, match="grid axes must be positive integers"):
            mesh.Grid(comm, axes)       # type: ignore[arg-type]  (True was taken for 1)


def _grid_over(world: mesh.Mesh, what: str) -> str:
    comm = world.group([0]) if what == "non-member" else mesh.grid(world, dp=2)
    try:
        mesh.grid(comm, dp=1)
    except TypeError as e:
        return str(e)
    return "made"


@pytest.mark.timeout(60)
def test_a_grid_over_none_or_a_grid_says_which_rank_and_what_to_pass() -> None:
    """mesh.grid(world.group([0]), ...) on a rank outside the group (None)
    raised AttributeError: 'NoneType' object has no attribute 'size', and a
    Grid given for its communicator: 'Grid' object has no attribute 'rank'."""
    said = mesh.spawn(_grid_over, 2, "non-member", timeout=50)
    assert said[0] == "made"
    assert said[1].startswith("rank 1: mesh.grid over {'dp': 1}: the communicator is None, "
                              "what world.group(ranks) returns on ranks that are not members"), \
        said[1]
    said = mesh.spawn(_grid_over, 2, "grid", timeout=50)
    assert said[0].startswith("rank 0: mesh.grid over {'dp': 1}: the communicator is a "
                              "mesh.Grid: pass the group of one of its axes"), said[0]


def _out_of_order(world: mesh.Mesh) -> list:
    n = (768 << 10) // 8         # two of them overflow the 1 MiB window
    if world.rank == 0:
        reqs = [world.isend(np.full(n, float(t)), 1, tag=t) for t in (0, 1, 2)]
        mesh.waitall(reqs, timeout=20)
        return []
    return [float(world.recv(0, tag=t, timeout=10)[0]) for t in (2, 0, 1)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("env", [{}, {"MESH_SHM": "0"}], ids=["same-host", "socket"])
def test_isends_received_in_another_order_than_sent_do_not_deadlock_on_credit(env: dict) -> None:
    """Legal MPI: isends that fill the window, received in another order.
    The message a receive waited for was queued behind credit that only its
    predecessors' receives would give back: it timed out. Now the credit of
    messages waiting unreceived goes back once a receive waits."""
    env = {"MESH_WINDOW_BYTES": "1M", **env}
    assert mesh.spawn(_out_of_order, 2, timeout=60, env=env) == [[], [2.0, 0.0, 1.0]]


def _iprobe_out_of_order(world: mesh.Mesh, src: int) -> list:
    n = (768 << 10) // 8         # two of them overflow the 1 MiB window
    if world.rank == 0:
        reqs = [world.isend(np.full(n, float(t)), 1, tag=t) for t in (0, 1, 2)]
        mesh.waitall(reqs, timeout=20)
        return []
    start = time.monotonic()
    while (st := world.iprobe(src, tag=2)) is None:      # mpi4py's loop
        assert time.monotonic() - start < 10, "iprobe never saw tag 2"
    return [st.tag] + [float(world.recv(0, tag=t, timeout=10)[0]) for t in (2, 0, 1)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("src", [0, mesh.ANY], ids=["named", "any"])
@pytest.mark.parametrize("env", [{}, {"MESH_SHM": "0"}], ids=["same-host", "socket"])
def test_an_iprobe_loop_sees_a_message_queued_behind_the_window(env: dict, src: int) -> None:
    """As above, waiting by iprobe: the credit of the messages waiting
    unreceived went back only to a posted receive or probe, and iprobe
    posts none: the loop never saw the message queued behind them."""
    env = {"MESH_WINDOW_BYTES": "1M", **env}
    assert mesh.spawn(_iprobe_out_of_order, 2, src, timeout=60, env=env) == \
        [[], [2, 2.0, 0.0, 1.0]]


def _sub_group_timeout(world: mesh.Mesh) -> str:
    pair = world.group([2, 0])
    if world.rank == 2:
        world.recv(0, tag=1)         # (there till rank 0 is done)
    if world.rank != 0:
        return ""
    with pytest.raises(mesh.MeshTimeoutError) as e:
        pair.recv(0, tag=4, timeout=0.3)
    world.send("done", 2, tag=1)
    return str(e.value)


@pytest.mark.timeout(60)
def test_a_timeout_in_a_sub_group_names_its_peer_by_its_world_rank() -> None:
    """The note on the peer a timed-out receive waited for gave its world
    rank as "rank 2", in a group of two ranks (0 and 1)."""
    said = mesh.spawn(_sub_group_timeout, 3, timeout=60)[0]
    assert said.startswith("rank 0: recv from rank 0 of group world/[2, 0] (world rank 2), tag "
                           "4 timed out after 0.3s (world rank 2 last heard from "), said
