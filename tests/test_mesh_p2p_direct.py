"""The same-host direct path (mesh.direct: large arrays read out of the
sender's memory) keeps every point-to-point guarantee of the socket path.
The semantics check runs over both paths (MESH_SHM=0: sockets only)."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mesh
import mesh.reader
from mesh import direct

BIG = (256 << 10) // 8           # float64 elements: 256 KiB, above MESH_SHM_MIN
PATHS = {"direct": {}, "sockets": {"MESH_SHM": "0"}}


@pytest.fixture(autouse=True)
def _small_rings(monkeypatch: pytest.MonkeyPatch) -> None:
    """BIG must take the direct path: by default two ranks' rings carry
    messages up to 1 MiB (mesh.rings.default_ring)."""
    monkeypatch.setenv("MESH_RING_MAX", str(16 << 10))


def _big(i: int, n: int = BIG) -> np.ndarray:
    return np.arange(n, dtype=np.float64) + i * 1000.0


def _semantics(world: mesh.Mesh) -> int:
    """Order with small and large messages mixed on one tag (posted and
    unexpected), out=, a misfit out= that leaves the message queued, ANY,
    cancel, a non-contiguous array, many sends in flight
    (credit), and a timeout: rank 1 sends, rank 0 checks."""
    mixed = [_big(0), np.arange(3), _big(1), {"obj": 1}, _big(2, 7), _big(3)]
    if world.rank == 1:
        world.recv(0, tag=99)                            # rank 0 has posted its receives
        for m in mixed:
            world.send(m, 0, tag=1)                      # to posted receives
        for m in mixed:
            world.send(m, 0, tag=2)                      # unexpected, read before they are asked
        world.send(_big(5), 0, tag=3)
        world.send(_big(6), 0, tag=4)
        world.send(np.arange(BIG * 2, dtype=np.int32).reshape(-1, 2)[:, 1], 0, tag=5)
        reqs = [world.isend(_big(10 + i), 0, tag=6) for i in range(40)]   # 10 MiB in flight
        for r in reqs:
            r.wait()
        world.send(_big(7), 0, tag=8)
        world.recv(0, tag=98)
        return direct.YES if world._t.direct.usable(0) else direct.NO
    outs = [np.zeros(BIG), None, np.zeros(BIG)]
    posted = [world.irecv(1, tag=1, out=outs[0]), world.irecv(1, tag=1),
              world.irecv(1, tag=1, out=outs[2])] + [world.irecv(1, tag=1) for _ in range(3)]
    cancelled = world.irecv(1, tag=8)
    assert cancelled.cancel()
    world.send(0, 1, tag=99)
    got = [r.wait() for r in posted]
    assert got[0] is outs[0] and got[2] is outs[2]
    time.sleep(0.3)                                       # tag 2 waits unexpected
    got2 = [world.recv(1, tag=2) for _ in mixed]
    for g in (got, got2):
        for m, x in zip(mixed, g):
            if isinstance(m, np.ndarray):
                assert x.dtype == m.dtype and np.array_equal(x, m)
            else:
                assert x == m
    with pytest.raises(mesh.OutMismatchError, match="does not fit out="):
        world.recv(1, tag=3, out=np.zeros(BIG, np.float32))
    assert np.array_equal(world.recv(1, tag=3), _big(5))  # still queued
    status = mesh.Status()
    assert np.array_equal(world.recv(mesh.ANY, tag=4, status=status), _big(6))
    assert status.source == 1
    assert np.array_equal(world.recv(1, tag=5), np.arange(1, BIG * 2, 2, dtype=np.int32))
    for i in range(40):
        assert np.array_equal(world.recv(1, tag=6), _big(10 + i))
    assert np.array_equal(world.recv(1, tag=8), _big(7))  # the cancelled receive took nothing
    with pytest.raises(mesh.MeshTimeoutError, match="recv from rank 1"):
        world.recv(1, tag=9, timeout=0.2)
    world.send(0, 1, tag=98)
    return 0


@pytest.mark.parametrize("path", PATHS)
def test_point_to_point_semantics_on_both_paths(path: str) -> None:
    before = set(os.listdir("/dev/shm"))
    used = mesh.spawn(_semantics, 2, timeout=90, env=PATHS[path])[1]
    assert used == (direct.YES if path == "direct" else direct.NO)
    assert not {f for f in set(os.listdir("/dev/shm")) - before if "mesh" in f or "mr-" in f}


def _refused(world: mesh.Mesh) -> tuple[int, bool]:
    """A receiver that may not read its sender answers the probe "no": the
    large messages take the socket, the first one and every later one."""
    if world.rank == 1:
        world._t.direct.on = False                        # as MESH_SHM=0, on this rank only
        world.send(0, 0)
        got = [world.recv(0) for _ in range(3)]
        world.send(1, 0)                                  # after its answer to the probe
        return 0, all(np.array_equal(g, _big(i)) for i, g in enumerate(got))
    world.recv(1)
    # the mesh asked as it started, maybe before rank 1 turned its side off:
    # once that answer is in, ask anew (the first large message then goes by
    # socket, as one sent before an answer does)
    deadline = time.monotonic() + 10
    while world._t.direct._state[1] == direct.ASKED and time.monotonic() < deadline:
        time.sleep(0.01)
    world._t.direct._state[1] = direct.UNKNOWN
    for i in range(3):
        world.send(_big(i), 1)
    world.recv(1)
    return world._t.direct._state[1], True


def test_a_peer_that_cannot_read_us_gets_the_socket() -> None:
    assert mesh.spawn(_refused, 2, timeout=60) == [(direct.NO, True), (0, True)]


def _asked_at_start(world: mesh.Mesh) -> int:
    """Each same-host peer is asked as the mesh starts whether it may read
    us, so the first large message is read from the sender, not sent by
    socket: the number of large reads the receiver made."""
    reads = [0]
    real = mesh.reader.cma.read_errno

    def counted(pid: int, addr: int, dst: np.ndarray) -> int:
        reads[0] += dst.nbytes >= 64 << 10
        return real(pid, addr, dst)
    mesh.reader.cma.read_errno = counted               # type: ignore[assignment]
    try:
        _answered(world, 1 - world.rank)                # no message sent yet
        if world.rank == 0:
            world.recv(1)
            world.send(_big(0), 1)
        else:
            world.send(0, 0)
            assert np.array_equal(world.recv(0), _big(0))
    finally:
        mesh.reader.cma.read_errno = real              # type: ignore[assignment]
    return reads[0]


def _answered(world: mesh.Mesh, peer: int) -> None:
    """Wait until ``peer`` said it may read us (asked as the mesh started)."""
    deadline = time.monotonic() + 10
    while world._t.direct._state[peer] != direct.YES:
        assert time.monotonic() < deadline, world._t.direct._state
        time.sleep(0.01)


def test_the_first_large_message_goes_direct() -> None:
    assert mesh.spawn(_asked_at_start, 2, timeout=60) == [0, 1]


def _dies_while_read(world: mesh.Mesh, path: str) -> None:
    """Rank 0 sends a large message and is SIGKILLed before rank 1 reads it."""
    if world.rank == 0:
        _answered(world, 1)
        world.recv(1)
        world.send(_big(0), 1, tag=1)                     # direct (probed at start)
        world.recv(1)
        world.isend(_big(1), 1, tag=2)                    # direct
        time.sleep(0.2)       # ZeroMQ's I/O thread puts the header on the wire first
        os.kill(os.getpid(), signal.SIGKILL)
    real = mesh.reader.cma.read_errno
    tried = []
    big = [0]

    def late_read(pid: int, addr: int, dst: np.ndarray) -> int:
        big[0] += dst.nbytes >= 64 << 10
        deadline = time.monotonic() + 20      # the second large read (tag 2's) waits
        while big[0] >= 2 and dst.nbytes >= 64 << 10 and time.monotonic() < deadline:
            try:
                if Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.01)
        err = real(pid, addr, dst)
        if big[0] >= 2 and dst.nbytes >= 64 << 10:      # tag 2's, not the probe's token
            tried.append(err)
        return err

    mesh.reader.cma.read_errno = late_read                # type: ignore[assignment]
    req = world.irecv(0, tag=2)
    world.send(0, 0)
    assert np.array_equal(world.recv(0, tag=1), _big(0))
    world.send(0, 0)
    try:
        req.wait(timeout=30)
        Path(path).write_text("no error")
    except mesh.LostPeerError as e:
        deadline = time.monotonic() + 0.7     # the header is read even if the death was seen first
        while not tried and time.monotonic() < deadline:
            time.sleep(0.01)
        Path(path).write_text(f"{e.peer}|{tried}|{e}")


def test_a_sender_killed_before_its_message_is_read_is_a_lost_peer(tmp_path: Path) -> None:
    out = tmp_path / "result"
    with pytest.raises(mesh.WorkerError, match="rank 0"):
        mesh.spawn(_dies_while_read, 2, str(out), timeout=60)
    peer, tried, text = out.read_text().split("|", 2)
    assert peer == "0", text
    assert tried not in ("[]", "[0]"), tried           # the direct read was tried, and failed
    assert "rank 1: recv from rank 0 (tag 2, group world) failed: peer rank 0 is gone" in text
    # the failed read says so, unless the closed connection was noticed first (under load)
    assert "out of its memory failed" in text or "connection closed" in text, text


def test_the_probe_token_is_drawn_once_when_two_threads_ask_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank's progress thread (answering a peer's probe) and its main
    thread (sending its own) may both ask for the token first: the values a
    probe carries must be what stays in memory, or the peer's read of them
    fails and it refuses the direct path (seen once in a fresh suite run)."""
    import random
    import secrets
    import threading

    from mesh import cma
    real = secrets.randbits

    def slow(k: int) -> int:     # widen the window between the check and the write
        time.sleep(0.05)
        return real(k)

    monkeypatch.setattr(secrets, "randbits", slow)
    monkeypatch.setattr(cma, "_token_pid", 0)
    seen: list[list[int]] = []

    def ask() -> None:
        time.sleep(random.random() * 0.01)
        tok = cma.token()
        seen.append([int(tok[0]), int(tok[1])])

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    now = [int(v) for v in cma.token()]
    assert all(s == now for s in seen), (seen, now)


@pytest.mark.skipif(sys.platform != "linux", reason="cross-memory attach is Linux's")
def test_pieces_read_any_range_into_any_address_and_name_a_bad_one() -> None:
    """mesh.cma.Pieces: one set-up, then reads of several ranges (a
    collective's 256 KiB pieces) into several places; an unmapped range
    gives its errno, as read_errno does."""
    import errno
    import mmap

    from mesh import cma
    src = np.arange(1000, dtype=np.float32)
    dst = np.zeros(1000, np.float32)
    read = cma.Pieces(os.getpid())
    for lo, hi in [(0, 10), (10, 700), (700, 1000)]:
        assert read(src.ctypes.data + lo * 4, dst.ctypes.data + lo * 4, (hi - lo) * 4) == 0
    assert np.array_equal(dst, src)
    assert read(src.ctypes.data, dst.ctypes.data, 0) == 0
    gone = mmap.mmap(-1, 4096)
    addr = np.frombuffer(gone, np.uint8).ctypes.data
    gone.close()
    assert read(addr, dst.ctypes.data, 16) == errno.EFAULT == cma.read_errno(
        os.getpid(), addr, dst[:4])


class _NoRoomForBig:
    """numpy for mesh.reader on a rank that has no memory for a large array
    (``least`` bytes or more)."""

    def __init__(self, least: int = BIG * 8) -> None:
        self.least = least

    def __getattr__(self, name: str) -> object:
        return getattr(np, name)

    def empty(self, shape: object, dtype: object = float) -> np.ndarray:
        if np.prod(shape) * np.dtype(dtype).itemsize >= self.least:  # type: ignore[call-overload]
            raise MemoryError("Unable to allocate (a test's)")
        return np.empty(shape, dtype)    # type: ignore[call-overload]


def _no_memory(world: mesh.Mesh, path: str) -> str:
    """A receive whose message no array can be made for fails naming the
    sender and the size, and frees the sender's send; later ones go on;
    and synchronous sends (``_ssend_no_memory``)."""
    if world.rank == 0:
        if path == "direct":
            _answered(world, 1)
        world.recv(1, timeout=20)                     # rank 1 has no memory now
        for i in range(2):
            world.send(_big(i), 1, timeout=20)
        _ssend_no_memory(world, path)
        return "sent"
    mesh.reader.np = _NoRoomForBig()                   # type: ignore[assignment]
    try:
        req = world.irecv(0)
        world.send(0, 0)
        with pytest.raises(mesh.MeshError, match=rf"rank 1: recv from rank 0 \(tag 0, group "
                           rf"world\) failed: no memory for the message of {BIG * 8} bytes "
                           rf"from world rank 0 \(tag 0\), dropped: Unable to allocate"):
            req.wait(timeout=20)
    finally:
        mesh.reader.np = np
    ok = np.array_equal(world.recv(0, timeout=20), _big(1))
    mesh.reader.np = _NoRoomForBig(_SMALL * 8)        # type: ignore[assignment]
    try:
        _ssend_no_memory(world, path)
    finally:
        mesh.reader.np = np
    return "ok" if ok else "wrong"


_SMALL = 1024       # float64 elements: 8 KiB, by ring (MESH_RING_MAX 16K: _small_rings)


def _ssend_no_memory(world: mesh.Mesh, path: str) -> None:
    """A synchronous send whose receiver has no memory for its message
    fails at once saying so (SYNCED's no-memory word), where it waited to
    its timeout: (rings: "direct") one taken out of the ring by the
    receiving thread itself, which raised a bare MemoryError and left the
    entry at the ring's head, its sender waiting (rank 1 holds its reading
    turn, so that the progress thread reads nothing, until the entry is
    there, then asks for it as a blocking receive does: mesh.reader.take);
    then a large one a receive was posted for, and one that came with none
    (dropped as it came, logged)."""
    tags = ((13,) if path == "direct" else ()) + (10, 11)
    if world.rank == 0:
        if path == "direct":
            assert world.recv(1, tag=12, timeout=20) == "holding"
        for tag in tags:
            if tag == 10:
                assert world.recv(1, tag=15, timeout=20) == "posted"
            req = world.issend(_big(tag, _SMALL if tag == 13 else BIG), 1, tag=tag)
            with pytest.raises(mesh.MeshError, match=rf"^rank 0: issend to rank 1 \(tag {tag}, "
                               rf"group world\) failed: dropped unread: rank 1 had no memory "
                               rf"for it$"):
                req.wait(timeout=20)
        world.send("done", 1, tag=14)     # (rank 1's mesh open till then: tag 11 not closed)
        return
    t = world._t
    if path == "direct":
        assert t.rings is not None
        t.progress.turn.acquire()
        try:
            world.send("holding", 0, tag=12)
            q, tail, heads = t.rings.watch(0)
            deadline = time.monotonic() + 20
            while q[tail] == heads[0]:
                assert time.monotonic() < deadline, "rank 0's issend never came"
                time.sleep(0.001)
            assert t._take(0, world.gid, 13, None) is False     # (no memory: the usual way)
        finally:
            t.progress.turn.release()
        with pytest.raises(mesh.MeshError, match=rf"^rank 1: recv from rank 0 \(tag 13, group "
                           rf"world\) failed: no memory for the message of {_SMALL * 8} bytes"):
            world.recv(0, tag=13, timeout=20)
    req = world.irecv(0, tag=10)
    world.send("posted", 0, tag=15)
    with pytest.raises(mesh.MeshError, match=r"failed: no memory for the message of "):
        req.wait(timeout=20)
    assert world.recv(0, tag=14, timeout=20) == "done"


@pytest.mark.parametrize("path", PATHS)
def test_a_message_with_no_memory_to_receive_it_fails_its_receive(path: str) -> None:
    assert mesh.spawn(_no_memory, 2, path, timeout=60, env=PATHS[path]) == ["sent", "ok"]


def _times_out_mid_read(world: mesh.Mesh) -> tuple:
    """A receive whose bytes are still being read out of its sender's memory
    (by the progress thread: a large array under load) when its wait's
    timeout runs out waits for them: it raised MeshTimeoutError 1 s past its
    timeout with half of its out= written, and the next wait returned it.
    The rest is read 1 s after that wait began (0.9 s past its timeout),
    not after a fixed 2 s."""
    if world.rank == 1:
        _answered(world, 0)
        world.recv(0, tag=99)
        world.send(_big(1), 0, tag=1)                    # direct (probed at start)
        world.recv(0, tag=98)
        return ()
    real = mesh.reader.cma.read_errno
    halfway: list[int] = []
    waiting: list[float] = []                            # when the wait below began

    def slow(pid: int, addr: int, dst: np.ndarray) -> int:
        if dst.nbytes < 64 << 10:                        # (the probe's token)
            return real(pid, addr, dst)
        err = real(pid, addr, dst.reshape(-1).view(np.uint8)[: dst.nbytes // 2])
        halfway.append(err)
        deadline = time.monotonic() + 10                 # half now, the rest once the
        while (not waiting or time.monotonic() < waiting[0] + 1.0) \
                and time.monotonic() < deadline:         # wait's timeout is well past
            time.sleep(0.01)
        return err or real(pid, addr, dst)

    mesh.reader.cma.read_errno = slow                    # type: ignore[assignment]
    out = np.zeros(BIG)
    req = world.irecv(1, tag=1, out=out)
    world.send(0, 1, tag=99)
    deadline = time.monotonic() + 10
    while not halfway and time.monotonic() < deadline:
        time.sleep(0.01)                                 # the progress thread reads it
    try:
        waiting.append(time.monotonic())
        got = req.wait(timeout=0.1)
    finally:
        mesh.reader.cma.read_errno = real                # type: ignore[assignment]
    world.send(0, 1, tag=98)
    return got is out, bool(np.array_equal(out, _big(1))), req.cancel()


@pytest.mark.timeout(60)
def test_a_wait_timing_out_mid_read_waits_for_the_whole_array() -> None:
    assert mesh.spawn(_times_out_mid_read, 2, timeout=40)[0] == (True, True, False)


def _send_times_out_unread(world: mesh.Mesh, flag: str) -> str:
    """A direct send that times out before its receiver read it says so: it
    blamed ZeroMQ holding its buffer, which holds nothing on this path. The
    receiver reads once the sender's send has timed out (``flag``), not
    after a fixed 1.5 s."""
    if world.rank == 1:
        real = mesh.reader.cma.read_errno

        def slow(pid: int, addr: int, dst: np.ndarray) -> int:
            deadline = time.monotonic() + 20
            while (dst.nbytes >= 64 << 10 and not os.path.exists(flag)
                   and time.monotonic() < deadline):
                time.sleep(0.01)                         # a receiver not reading yet
            return real(pid, addr, dst)

        mesh.reader.cma.read_errno = slow                # type: ignore[assignment]
        try:
            world.send(0, 0, tag=99)
            got = world.recv(0, tag=1, timeout=20)
        finally:
            mesh.reader.cma.read_errno = real            # type: ignore[assignment]
        return "whole" if np.array_equal(got, _big(1)) else "wrong"
    _answered(world, 1)
    world.recv(1, tag=99)
    with pytest.raises(mesh.MeshTimeoutError) as e:
        world.send(_big(1), 1, tag=1, timeout=0.3)       # direct (probed at start)
    Path(flag).touch()
    return str(e.value)


@pytest.mark.timeout(60)
def test_a_direct_send_timing_out_unread_names_the_reader_not_zeromq(tmp_path: Path) -> None:
    text, got = mesh.spawn(_send_times_out_unread, 2, str(tmp_path / "timed-out"), timeout=40)
    assert got == "whole"
    assert text.startswith("rank 0: send to rank 1 (tag 1, group world) timed out after 0.3s "
                           "before rank 1 read it out of this rank's memory"), text
    assert "ZeroMQ" not in text, text


def _aborted_unread(world: mesh.Mesh) -> tuple:
    """Large messages on a tag the receiver aborted are freed unread: they
    were read out of the sender's memory only to be dropped, and where the
    sender had exited meanwhile (it heard the receiver's goodbye) the read
    failed and logged a lost peer at ERROR. Here every large read fails as
    from an exited sender, and six messages past the 1 MiB window must go."""
    if world.rank == 0:
        _answered(world, 1)
        world.recv(1, tag=99)                           # after rank 1's abort of tag 5
        for i in range(6):
            world.send(_big(i), 1, tag=5, timeout=10)   # direct (probed at start)
        world.send(1, 1, tag=98)
        return ()
    import errno
    import logging
    real = mesh.reader.cma.read_errno
    reads: list[int] = []
    errors: list[str] = []

    def gone(pid: int, addr: int, dst: np.ndarray) -> int:
        if dst.nbytes < 64 << 10:                        # (the probe's token)
            return real(pid, addr, dst)
        reads.append(dst.nbytes)
        return errno.ESRCH

    class Errors(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            errors.append(record.getMessage())

    handler = Errors(logging.ERROR)
    logging.getLogger("mesh.transport").addHandler(handler)
    mesh.reader.cma.read_errno = gone                    # type: ignore[assignment]
    try:
        world.collective_channel().abort(5, "a test's abort")
        world.send(0, 0, tag=99)
        try:
            last = world.recv(0, tag=98, timeout=20)
        except mesh.MeshError as e:
            last = str(e)
    finally:
        mesh.reader.cma.read_errno = real                # type: ignore[assignment]
        logging.getLogger("mesh.transport").removeHandler(handler)
    return last, reads, errors


@pytest.mark.timeout(60)
def test_a_message_on_an_aborted_tag_is_not_read() -> None:
    got = mesh.spawn(_aborted_unread, 2, timeout=40, env={"MESH_WINDOW_BYTES": "1M"})[1]
    assert got == (1, [], []), got
