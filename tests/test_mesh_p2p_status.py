"""Who sent what, as mpi4py tells it: Status (source, tag, size, dtype,
shape) from recv, Request and probe; any-tag receives; probe/iprobe; and
sendrecv. The matching rules are tested on the Matcher alone first."""
from __future__ import annotations

import time

import numpy as np
import pytest

import collectives as C
import mesh
from mesh.match import ANY, ANY_TAG, Arrived, Matcher, Pending, Probe


def _recv(src: int, tag: int, group: int = 0) -> Pending:
    return Pending(group, src, tag, None, None, ("recv from", src, tag, "world"))


def _msg(src: int, tag: int, value: object) -> Arrived:
    return Arrived(src, tag, value, 8, None)


def test_any_tag_takes_the_oldest_message_and_keeps_order_per_source_and_tag() -> None:
    m = Matcher()
    for src, tag, v in [(1, 5, "a"), (2, 3, "b"), (1, 5, "c"), (1, 4, "d"), (2, -1, "coll")]:
        m.add_unexpected(0, tag, _msg(src, tag, v))
    got = []
    for src in (1, ANY, ANY, 1):
        msg = m.post(_recv(src, ANY_TAG))
        assert msg is not None
        got.append(msg.value)
    assert got == ["a", "b", "c", "d"]
    assert m.post(_recv(ANY, ANY_TAG)) is None      # never a collective's (negative) tag
    assert m.waiting(0, 2, -1) is not None


def test_a_message_goes_to_the_earliest_posted_receive_that_matches() -> None:
    m = Matcher()
    wild, exact, any_src = _recv(1, ANY_TAG), _recv(1, 7), _recv(ANY, 7)
    for r in (wild, exact, any_src):
        assert m.post(r) is None
    assert m.take_posted(0, 1, 7) is wild
    assert m.take_posted(0, 1, 7) is exact
    assert m.take_posted(0, 2, 7) is any_src
    other = _recv(3, ANY_TAG)
    m.post(other)
    assert m.take_posted(0, 1, 2) is None            # from another source
    assert m.take_posted(0, 3, -4) is None           # a collective's tag
    assert m.take_posted(1, 3, 2) is None            # another group
    assert m.take_posted(0, 3, 2) is other
    assert list(m.posted()) == []


def test_probes_see_waiting_messages_and_leave_them() -> None:
    m = Matcher()
    probe = Probe(0, 2, ANY_TAG, None, None, "probe")
    assert m.post(probe) is None
    assert not m.add_unexpected(0, 4, _msg(1, 4, "x"))
    woken = m.add_unexpected(0, 6, _msg(2, 6, np.zeros((2, 3), np.float32)))
    assert list(woken) == [probe] and probe.got == (2, 6, 8, np.dtype(np.float32), (2, 3))
    later = Probe(0, ANY, 4, None, None, "probe")
    assert m.post(later, False) is not None and later.state == 0   # waiting: found at once
    assert m.post(_recv(ANY, ANY_TAG)).value == "x"              # both still queued
    assert m.post(_recv(2, 6)) is not None and list(m.posted()) == []
    p = Probe(0, 1, 9, None, None, "probe")
    m.post(p)
    assert m.cancel(p) and list(m.posted()) == []


def _status(world: mesh.Mesh) -> str:
    pair = world.group([2, 1])        # world rank 2 is rank 0 of the pair
    if world.rank != 0:
        world.send(np.arange(6, dtype=np.int16).reshape(2, 3), 0, tag=10 + world.rank)
        world.recv(0, tag=98)
        world.send({"from": world.rank}, 0, tag=20)
        if pair is not None and pair.rank == 0:
            pair.send(b"pair", 1, tag=3)
        if pair is not None and pair.rank == 1:
            st = mesh.Status()
            assert pair.recv(tag=mesh.ANY_TAG, status=st) == b"pair"
            assert (st.source, st.tag, st.dtype, st.shape) == (0, 3, None, None)
            assert st.nbytes == 6          # msgpack: a bin8 header and the 4 bytes
            assert st.count is None        # (an object has no element count)
        world.recv(0, tag=99)
        return "ok"
    seen = set()
    for _ in range(world.size - 1):
        st = mesh.Status()
        out = np.zeros(6, np.int16)
        got = world.recv(mesh.ANY_SOURCE, tag=mesh.ANY_TAG, out=out, status=st)
        assert got is out and np.array_equal(out, np.arange(6))
        assert st.tag == 10 + st.source and st.nbytes == 12
        assert st.dtype == np.int16 and st.shape == (2, 3)         # as sent, not as out=
        assert st.count == 6                # (mpi4py's Get_count(MPI.SHORT))
        seen.add(st.source)
    assert seen == set(range(1, world.size))
    for r in range(1, world.size):
        world.send(None, r, tag=98)
    reqs = [world.irecv(mesh.ANY, tag=20) for _ in range(world.size - 1)]
    assert reqs[0].status is None or reqs[0].done()
    st = mesh.Status()
    first = reqs[0].wait(timeout=20, status=st)
    assert first == {"from": st.source} and st.tag == 20 and st.dtype is None
    for r in reqs[1:]:
        r.wait(timeout=20)
        assert r.status is not None and r.wait() == {"from": r.status.source}
    assert world.isend(None, 0).status is None                 # sends have no status
    world.recv(0)
    for r in range(1, world.size):
        world.send(None, r, tag=99)
    return "ok"


def test_status_names_the_sender_tag_and_layout() -> None:
    assert mesh.spawn(_status, 3, timeout=60) == ["ok"] * 3


def _any_tag_never_takes_collectives(world: mesh.Mesh) -> str:
    if world.rank == 0:
        req = world.irecv(1, tag=mesh.ANY_TAG)
        a = np.full(3, 1.0)
        C.all_reduce(world, a)
        C.barrier(world)
        assert not req.done() and np.all(a == world.size)
        world.send(None, 1, tag=1)
        st = mesh.Status()
        assert req.wait(timeout=20, status=st) == "user" and (st.source, st.tag) == (1, 7)
    else:
        a = np.full(3, 1.0)
        C.all_reduce(world, a)
        C.barrier(world)
        if world.rank == 1:
            world.recv(0, tag=1)
            world.send("user", 0, tag=7)
    return "ok"


def test_any_tag_never_takes_a_collective_message() -> None:
    assert mesh.spawn(_any_tag_never_takes_collectives, 3, timeout=60) == ["ok"] * 3


def _probe(world: mesh.Mesh) -> str:
    if world.rank == 1:
        world.recv(0, tag=9)
        world.send(np.arange(5.0), 0, tag=4)
        world.send("second", 0, tag=4)
        world.send(b"x", 0, tag=6)
        world.recv(0, tag=9)
        return "ok"
    assert world.iprobe() is None
    t0 = time.monotonic()
    with pytest.raises(mesh.MeshTimeoutError, match=r"rank 0: probe rank 1 \(any tag, group "
                                                    r"world\) timed out"):
        world.probe(1, timeout=0.3)
    assert time.monotonic() - t0 < 5 and list(world._t.inbox.matcher.posted()) == []
    with pytest.raises(ValueError, match="tag must be an integer >= 0"):
        world.probe(tag=-1)
    with pytest.raises(ValueError, match="tag must be an integer >= 0"):
        world.send(0, 1, tag=mesh.ANY_TAG)
    world.send(None, 1, tag=9)
    st = world.probe(mesh.ANY, tag=4, timeout=20)             # blocks until it is there
    assert (st.source, st.tag, st.nbytes, st.dtype, st.shape) == (1, 4, 40, np.float64, (5,))
    out = np.empty(st.count, st.dtype)                        # sized from the probe
    assert world.recv(st.source, st.tag, out=out) is out and np.array_equal(out, np.arange(5.0))
    st = world.probe(1, timeout=20)
    assert st.tag == 4 and world.recv(1, tag=4) == "second"
    deadline = time.monotonic() + 20
    while (st := world.iprobe(tag=6)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert (st.source, st.nbytes) == (1, 3) and world.iprobe(1, tag=6) == st
    assert world.recv(1, tag=mesh.ANY_TAG) == b"x" and world.iprobe() is None
    world.send(None, 1, tag=9)
    return "ok"


def test_probe_and_iprobe_see_a_message_without_taking_it() -> None:
    assert mesh.spawn(_probe, 2, timeout=60) == ["ok", "ok"]


def _poll_zero(world: mesh.Mesh) -> list[str]:
    """Poll recv, probe and wait with timeout=0 (1 ms apart) for a message
    sent 0.1 s later: each answers within a second."""
    seen = []
    for i, op in enumerate(("recv", "probe", "wait")):
        for n in (8, 3_000_000):        # by ring (socket), read from the sender's memory (frames)
            tag = 10 * i + (n > 8)
            if world.rank == 1:
                time.sleep(0.1)
                world.send(np.zeros(n // 8), 0, tag=tag)
                world.recv(0, tag=99)
                continue
            t0, saw = time.monotonic(), True
            while time.monotonic() - t0 < 5:
                try:
                    if op == "recv":
                        world.recv(1, tag=tag, timeout=0)
                    elif op == "probe":
                        world.probe(1, tag=tag, timeout=0)
                        world.recv(1, tag=tag)
                    else:
                        world.irecv(1, tag=tag).wait(timeout=0)
                    break
                except mesh.MeshTimeoutError:
                    time.sleep(0.001)   # (under the 2 ms the progress thread stays aside)
            else:       # (5 s of polling: never seen)
                saw = False
                world.recv(1, tag=tag, timeout=20)
            seen.append(f"{op} {n}: " + ("ok" if saw else "missed"))
            world.send(None, 1, tag=99)
    return seen


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shm", ["1", "0"])
def test_a_loop_polling_with_timeout_0_sees_the_message(shm: str) -> None:
    # a wait of timeout 0 returned before it read anything, and the progress
    # thread stays aside while callers drive: such a loop never saw the message
    got = mesh.spawn(_poll_zero, 2, timeout=90, env={"MESH_SHM": shm})[0]
    assert got == [f"{op} {n}: ok" for op in ("recv", "probe", "wait") for n in (8, 3_000_000)]


def _sendrecv(world: mesh.Mesh) -> str:
    n, r = world.size, world.rank
    big = np.full(3 << 20, r, np.float32)            # 12 MiB: sends wait for the peer to read
    for _ in range(3):                               # everyone sends first: no deadlock
        st = mesh.Status()
        got = world.sendrecv(big, (r + 1) % n, src=(r - 1) % n, sendtag=5, status=st)
        assert got[0] == (r - 1) % n and (st.source, st.tag) == ((r - 1) % n, 5)
    out = np.zeros(2)
    assert world.sendrecv(np.full(2, r * 1.0), r, recvtag=1, sendtag=1, out=out) is out
    assert np.all(out == r)
    # (its error says the call's timeout: it said what its send had left of it, 0.499s)
    with pytest.raises(mesh.MeshTimeoutError, match=r"sendrecv from rank .* timed out after "
                       r"0\.5s \("):
        world.sendrecv(None, (r + 1) % n, src=(r + 1) % n, recvtag=77, timeout=0.5)
    world.recv((r - 1) % n, tag=0)                   # the timed-out exchange's message
    assert list(world._t.inbox.matcher.posted()) == []
    C.barrier(world)                                 # no rank leaves while one still waits
    return "ok"


def test_sendrecv_exchanges_in_a_ring_without_deadlock() -> None:
    assert mesh.spawn(_sendrecv, 3, timeout=90) == ["ok"] * 3
