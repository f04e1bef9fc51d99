"""Large point-to-point arrays to peers on other hosts over plain TCP streams
(mesh.streams): across hosts (tcp://, forced here on one machine) an array
of MESH_P2P_STREAM_MIN bytes or more goes by its sender's stream, its header
through ZeroMQ in order. Intact, in order per source and tag with ANY
source; two ranks sending each other large arrays at once; a sender killed
mid-stream named as lost, one failing named with its error; strangers on the
listener refused; a forked job's own listeners; the path off."""
from __future__ import annotations

import gc
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest

import collectives as C
import mesh
from mesh import streams as mstreams
from late_release import hold_releases

pytestmark = pytest.mark.timeout(60)
TCP = {"MESH_FORCE_TCP": "1"}
N = (16 << 20) // 8 + 5        # float64: a little over 16 MiB (an odd tail)


def _ready(world: mesh.Mesh, *peers: int) -> None:
    """Until this rank's streams to ``peers`` are open (the first large
    array to a peer opens its stream, and goes through ZeroMQ itself, as do
    those sent until it is open; asking whether one may go opens it too)."""
    deadline = time.monotonic() + 20
    while not all(world._t.streams.usable(p, 1 << 40) for p in peers):
        assert time.monotonic() < deadline, "streams never opened"
        time.sleep(0.01)


def _in_order(world: mesh.Mesh) -> list:
    big = np.arange(N, dtype=np.float64)
    if world.rank in (0, 2):
        _ready(world, 1)
        world.recv(1, tag=9)         # rank 1's streams from both are open too
        # rank 0's synchronous (issend): done only once rank 1's receive took it, after
        # rank 1 said it receives now (tag 8, which comes first, on one connection)
        send = world.issend if world.rank == 0 else world.isend
        first = send(big + world.rank, 1, tag=1)
        world.send(np.float64(world.rank), 1, tag=1)    # after the big one, on its tag
        world.send({"after": world.rank}, 1, tag=2)
        while not first.test()[0]:
            time.sleep(0.001)
        if world.rank == 0:
            assert world.iprobe(1, tag=8) is not None, "issend done before its receive"
            world.recv(1, tag=8)
        return [world._t.streams.sent]
    deadline = time.monotonic() + 20
    while len(world._t.streams._in) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    world.send("go", 0, tag=9)
    out = np.empty_like(big)
    time.sleep(0.2)
    world.send("receiving", 0, tag=8)
    a = world.recv(0, tag=1, out=out)                       # into out=
    assert a is out and np.array_equal(a, big), a[:4]
    st = mesh.Status()
    assert world.recv(mesh.ANY, tag=1, status=st) == 0.0 and st.source == 0
    world.send("go", 2, tag=9)      # (only now: ANY has no order across senders)
    b = world.recv(mesh.ANY, tag=1, status=st)              # a fresh array, ANY source
    assert st.source == 2 and np.array_equal(b, big + 2), (st.source, b[:4])
    assert world.recv(mesh.ANY, tag=1) == 2.0               # the small one after it
    assert world.recv(0, tag=2) == {"after": 0} and world.recv(2, tag=2) == {"after": 2}
    assert world._t.reader.bad_messages == 0
    return [world._t.streams.got]


def test_a_large_array_across_hosts_comes_by_stream_intact_and_in_order() -> None:
    """Arrays into out= and fresh arrive whole; a small message sent after a
    large one on the same tag comes after it, ANY source included; an
    issend by stream completes once its receive took it."""
    got = mesh.spawn(_in_order, 3, timeout=50, env=TCP)
    assert got == [[1], [2], [1]], got


def _both_ways(world: mesh.Mesh, nbytes: int) -> list:
    peer = 1 - world.rank
    _ready(world, peer)
    world.recv(peer, tag=9) if world.rank else world.send("ready", peer, tag=9)
    mine = np.full(nbytes // 4, world.rank + 1, dtype=np.float32)
    t = time.monotonic()
    world.send(mine, peer, tag=1, timeout=20)   # both block in a send at once
    got = world.recv(peer, tag=1, timeout=20)
    assert np.all(got == peer + 1) and got.size == mine.size
    counts = [world._t.streams.sent, world._t.streams.got, time.monotonic() - t < 15]
    # rank 0's issend by stream on a group rank 1 has dropped: read there and dropped
    # unread, it fails at once saying so (it timed out)
    g = world.group([0, 1])
    if world.rank:
        del g
        gc.collect()
    C.barrier(world)        # (rank 1's start forgets the groups dropped: g)
    if not world.rank:
        assert g is not None
        with pytest.raises(mesh.MeshError, match=r"^rank 0: issend to rank 1 of group "
                           r"world/\[0, 1\] \(world rank 1\), tag 3 failed: dropped unread: "
                           r"world rank 1 dropped the group \("):
            g.issend(mine, 1, tag=3).wait(timeout=10)
        assert world._t.streams.sent == counts[0] + 1       # (it went by stream)
    C.barrier(world)
    return counts


def test_two_ranks_sending_each_other_64_mib_at_once_do_not_wait_on_each_other() -> None:
    got = mesh.spawn(_both_ways, 2, 64 << 20, timeout=50, env=TCP)
    assert got == [[1, 1, True], [1, 1, True]], got


def _killed_mid_stream(world: mesh.Mesh, result: str) -> None:
    if world.rank == 1:
        def half_then_die(sock: socket.socket, mv: memoryview) -> None:
            sock.sendall(mv[:len(mv) // 2])
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGKILL)
        mstreams._send_payload = half_then_die
        _ready(world, 0)
        world.send(np.ones(N), 0, tag=1)
        time.sleep(30)
        return
    out = np.zeros(N)
    t = time.monotonic()
    try:
        world.recv(1, tag=1, out=out, timeout=30)
        what = "received"
    except mesh.LostPeerError as e:
        what = f"{type(e).__name__} {e.peer} {time.monotonic() - t < 10} {e}"
    Path(result).write_text(what)


def test_a_sender_killed_mid_stream_is_named_lost(tmp_path: Path) -> None:
    """Half of a 16 MiB array written, the sender dies: the receive raises
    LostPeerError naming it within seconds (the stream ended), not at its
    timeout."""
    result = tmp_path / "result"
    with pytest.raises(mesh.WorkerError):
        mesh.spawn(_killed_mid_stream, 2, str(result), timeout=50, env=TCP)
    text = result.read_text()
    assert text.startswith("LostPeerError 1 True"), text
    assert "peer rank 1 is gone" in text, text


def _killed_mid_stream_with_a_child(world: mesh.Mesh, result: str) -> None:
    if world.rank == 1:
        _ready(world, 0)
        world.recv(0, tag=5)        # rank 0's stream from this rank is open too
        child = os.fork()           # long-lived (a DataLoader worker's, multiprocessing's)
        if child == 0:
            time.sleep(20)
            os._exit(0)
        Path(result + ".child").write_text(str(child))
        world.send(np.ones(N), 0, tag=1)     # the parent's stream still works

        def half_then_die(sock: socket.socket, mv: memoryview) -> None:
            sock.sendall(mv[:len(mv) // 2])
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGKILL)
        mstreams._send_payload = half_then_die
        world.send(np.ones(N), 0, tag=1)
        time.sleep(30)
        return
    deadline = time.monotonic() + 20
    while 1 not in world._t.streams._in:
        assert time.monotonic() < deadline, "no stream from rank 1"
        time.sleep(0.01)
    world.send("go", 1, tag=5)
    first = world.recv(1, tag=1, timeout=30)
    t = time.monotonic()
    try:
        world.recv(1, tag=1, out=np.zeros(N), timeout=30)
        what = "received"
    except mesh.LostPeerError as e:
        what = f"{type(e).__name__} {e.peer} {time.monotonic() - t:.1f} {e}"
    Path(result).write_text(f"{world._t.streams.got} {bool(np.all(first == 1))} {what}")


def _fails_leaving_no_child(result: Path, fn, *args, env: dict) -> None:
    """Spawn ``fn`` on 2 ranks, which fails the job (WorkerError), then kill
    the child a rank forked and wrote the pid of (``result``.child), if any:
    nothing outlives the test."""
    try:
        with pytest.raises(mesh.WorkerError):
            mesh.spawn(fn, 2, str(result), *args, timeout=50, settle=30, env=env)
    finally:
        child = result.with_name(result.name + ".child")
        if child.exists():
            try:
                os.kill(int(child.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_sender_killed_mid_stream_with_a_forked_child_is_named_lost(tmp_path: Path) -> None:
    """A rank forks a long-lived child, then dies mid-stream: the child's copy
    of the stream's socket held the connection up, so the receiver saw no
    end to it and waited for the sender's silence to lose it (the peer
    timeout: 20 s here). The child's copies are closed at the fork (the
    parent's stream goes on): the receive raises within seconds."""
    result = tmp_path / "result"
    _fails_leaving_no_child(result, _killed_mid_stream_with_a_child,
                            env={**TCP, "MESH_PEER_TIMEOUT": "20"})
    got, whole, kind, peer, secs, said = result.read_text().split(" ", 5)
    assert (got, whole, kind, peer) == ("1", "True", "LostPeerError", "1"), result.read_text()
    assert float(secs) < 10 and "stream ended mid-message" in said, result.read_text()


def _stopped_mid_stream(world: mesh.Mesh, result: str) -> None:
    if world.rank == 1:
        def half_then_stop(sock: socket.socket, mv: memoryview) -> None:
            sock.sendall(mv[:len(mv) // 2])
            os.kill(os.getpid(), signal.SIGSTOP)    # silent (until rank 0 kills it)
        mstreams._send_payload = half_then_stop
        Path(result).write_text(str(os.getpid()))
        _ready(world, 0)
        world.send(np.ones(N), 0, tag=1)
        return
    t = time.monotonic()
    try:
        world.recv(1, tag=1, out=np.zeros(N), timeout=30)
        what = "received"
    except mesh.LostPeerError as e:
        what = f"{type(e).__name__} {e.peer} {time.monotonic() - t < 12} {e}"
    victim = int(Path(result).read_text())
    Path(result).write_text(what)
    os.kill(victim, signal.SIGKILL)


def test_a_sender_stopped_mid_stream_is_named_lost(tmp_path: Path) -> None:
    """Half of the array written, the sender stops (SIGSTOP: its stream stays
    open, nothing more comes, nor its heartbeats): the receive raises
    LostPeerError naming it once it has been silent for MESH_PEER_TIMEOUT,
    not at the receive's timeout, and never hangs."""
    result = tmp_path / "result"
    with pytest.raises(mesh.WorkerError):
        mesh.spawn(_stopped_mid_stream, 2, str(result), timeout=50,
                   env={**TCP, "MESH_PEER_TIMEOUT": "2"})
    text = result.read_text()
    assert text.startswith("LostPeerError 1 True"), text
    assert "peer rank 1 is gone" in text, text


def _dribble(sock: socket.socket, mv: memoryview) -> None:
    step = len(mv) // 8 + 1
    for i in range(0, len(mv), step):
        sock.sendall(mv[i:i + step])
        time.sleep(0.125)       # the array in 1 s


def _fails_mid_stream(world: mesh.Mesh, result: str, how: str) -> None:
    import collectives as C
    if world.rank == 1:
        def crawl(sock: socket.socket, mv: memoryview) -> None:
            step = len(mv) // 32 + 1
            for i in range(0, len(mv), step):
                sock.sendall(mv[i:i + step])
                time.sleep(0.25)        # the array in 8 s: its close cuts it
        mstreams._send_payload = crawl
        _ready(world, 0)
        world.recv(0, tag=9)
        if how == "own":        # its own message on the stream as it sees the mismatch,
            time.sleep(0.5)     # rank 0's receive for it posted (claimed by its header)
            C.all_reduce(world, np.ones(N, np.int64), algorithm="rd", timeout=20)
        world.isend(np.ones(N), 0, tag=1)
        if how == "mismatch":   # its abort and its goodbye come after the array
            C.all_reduce(world, np.ones(9), timeout=20)
        time.sleep(0.3)
        raise ValueError("boom in rank 1")
    world.send("go", 1, tag=9)
    try:
        if how == "own":
            C.all_reduce(world, np.ones(N), algorithm="rd", timeout=20)
        elif how == "mismatch":
            C.all_reduce(world, np.ones(8), timeout=20)
        else:
            world.recv(1, tag=1, timeout=30)
        what = "received"
    except mesh.MeshError as e:
        what = f"{type(e).__name__} {e}"
    Path(result).write_text(what)


@pytest.mark.parametrize("how, error, says", [
    ("raise", "LostPeerError", "peer rank 1 is gone (it failed: ValueError: boom in rank 1)"),
    ("mismatch", "MismatchError", "rank 1 called all_reduce(dtype=float64, shape=[9]"),
    ("own", "MismatchError", "rank 1 called all_reduce(dtype=int64")],
    ids=["raise", "mismatch", "own"])
def test_a_sender_failing_mid_stream_is_named_with_its_error(tmp_path: Path, how: str,
                                                             error: str, says: str) -> None:
    """The sender fails while its array's bytes still flow: its failing
    goodbye (and an abort it sent), held behind the array, are read once its
    close cuts the stream, so the receive names its error, and a collective
    its mismatch, the one whose own message it was included (all said only
    "the process exited or crashed")."""
    result = tmp_path / "result"
    with pytest.raises(mesh.WorkerError):
        mesh.spawn(_fails_mid_stream, 2, str(result), how, timeout=50, env=TCP)
    text = result.read_text()
    assert text.startswith(error) and says in text, text


def _matched_mid_stream(world: mesh.Mesh) -> list:
    big = np.arange(N, dtype=np.float64)
    if world.rank == 1:
        mstreams._send_payload = _dribble
        _ready(world, 0)
        for tag in (1, 2):
            world.recv(0, tag=9)
            world.send(big + tag, 0, tag=tag)
        world.send("after", 0, tag=3)
        return []
    def matched(tag: int, out: np.ndarray | None = None) -> mesh.Request:
        req = world.irecv(1, tag=tag, out=out)
        world.send("go", 1, tag=9)
        deadline = time.monotonic() + 20
        while not world._t.streams.reading(req._item):      # its header came: matched
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return req

    out = np.zeros(N)
    req = matched(1, out)
    cancelled = req.cancel()
    whole = req.wait(timeout=20) is out and np.array_equal(out, big + 1)
    req = matched(2)
    t = time.monotonic()
    second = req.wait(timeout=0.2)      # runs out while its bytes still come (1 s)
    late = time.monotonic() - t > 0.6
    return [cancelled, whole, np.array_equal(second, big + 2), late, world.recv(1, tag=3)]


def test_a_receive_matched_mid_stream_gets_the_whole_array() -> None:
    """A receive is matched when the array's header comes (as on the
    same-host direct path): a cancel then fails, and a wait whose timeout
    runs out while the bytes still come waits for them: it returns the
    whole array, never a part, nor a timeout with its out= still written."""
    got = mesh.spawn(_matched_mid_stream, 2, timeout=50, env=TCP)
    assert got[0] == [False, True, True, True, "after"], got


def _strangers(world: mesh.Mesh) -> list:
    from mesh import listener
    big = np.arange(N, dtype=np.float64)
    if world.rank == 0:
        _ready(world, 1)
        world.recv(1, tag=9)
        world.send(big, 1, tag=1)
        return [world._t.streams.sent]
    deadline = time.monotonic() + 20
    while 0 not in world._t.streams._in:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    lis, nonce = listener.listener(), world._t.streams.nonce
    before = lis.strangers
    peers = []
    for hello in (listener.HELLO.pack(listener.MAGIC, b"x" * 16, -1, nonce, 0),   # wrong token
                  b"GET / HTTP/1.0\r\n\r\n" + b"\0" * 40):                     # garbage
        s = socket.create_connection(("127.0.0.1", lis.port))
        s.sendall(hello)
        peers.append(s)
    # (what the listener accepts is read when a stream is next taken: look now)
    assert lis.take((-1, nonce, 0), time.monotonic() + 1.0) is None
    refused = lis.strangers - before
    for s in peers:
        s.close()
    world.send("go", 0, tag=9)
    assert np.array_equal(world.recv(0, tag=1), big)        # the real stream still works
    return [refused, world._t.streams.got]


def test_strangers_on_the_stream_listener_are_refused() -> None:
    """A hello with a wrong token (naming a real sender) and garbage are
    closed by the listener; the sender's stream carries on."""
    got = mesh.spawn(_strangers, 2, timeout=50, env=TCP)
    assert got == [[1], [2, 1]], got


def _plain(world: mesh.Mesh) -> list:
    big = np.arange(N, dtype=np.float64)
    if world.rank == 0:
        world.send(big + 1, 1, tag=1)
    else:
        assert np.array_equal(world.recv(0, tag=1), big + 1)
    return [world._t.streams.on, world._t.streams.sent + world._t.streams.got]


@pytest.mark.parametrize("env", [{"MESH_P2P_STREAM_MIN": "0"}, {"MESH_P2P_STREAM_MIN": "off"},
                                 {"MESH_P2P_STREAM_MIN": "64M"}], ids=["0", "off", "above"])
def test_the_stream_path_off_or_above_the_size_goes_through_zeromq(env: dict) -> None:
    got = mesh.spawn(_plain, 2, timeout=50, env={**TCP, **env})
    on = env["MESH_P2P_STREAM_MIN"] == "64M"
    assert got == [[on, 0], [on, 0]], got


def _released_late(world: mesh.Mesh) -> list:
    """Rank 0 sends rank 1 an array in pieces (the stream path off), which
    rank 1 receives whole and closes its mesh on; ZeroMQ's release of the
    array's frames is told rank 0 only after its wait has seen rank 1's
    goodbye read (pyzmq's garbage thread, late under load)."""
    from mesh.peer import ALIVE
    big = np.arange(N, dtype=np.float64)
    if world.rank == 1:
        return [bool(np.array_equal(world.recv(0, tag=1), big))]
    hold_releases(world, 1)
    peer = world._t._peers[1]
    try:
        world.send(big, 1, tag=1, timeout=30)
    except mesh.MeshError as e:
        return [f"{type(e).__name__}: {e}"]
    return ["sent", peer.state != ALIVE]


def test_a_send_in_pieces_the_peer_received_whole_does_not_fail_as_it_leaves() -> None:
    """A large array to a peer on another host without the stream path goes
    in pieces, each answered by the receiver; the receiver got it whole and
    closed its mesh, and the sender, whose wait for ZeroMQ to let go of its
    frames saw the goodbye first, raised LostPeerError "it closed its mesh"
    for a send that had arrived (test_the_stream_path_off_or_above_the_size_
    goes_through_zeromq[0] under load). Every piece answered, the send ends
    as ZeroMQ lets go."""
    got = mesh.spawn(_released_late, 2, timeout=50, env={**TCP, "MESH_P2P_STREAM_MIN": "0"})
    assert got == [["sent", True], [True]], got


def test_the_stream_path_is_off_under_curve_and_its_size_checked(monkeypatch) -> None:
    assert mstreams.min_bytes(True) == 0
    monkeypatch.setenv("MESH_P2P_STREAM_MIN", "8M")
    assert mstreams.min_bytes(False) == 8 << 20
    monkeypatch.setenv("MESH_P2P_STREAM_MIN", "lots")
    with pytest.raises(ValueError, match="MESH_P2P_STREAM_MIN"):
        mstreams.min_bytes(False)


def _forked_job(world: mesh.Mesh) -> list:
    """A process whose stream listener is open forks a job (mesh.spawn of a
    nested function forks) whose ranks all open streams to each other."""
    from mesh import listener
    parent = listener.the_listener().port

    def pairs(w: mesh.Mesh) -> list:
        peers = [p for p in range(w.size) if p != w.rank]
        _ready(w, *peers)
        small = (4 << 20) // 8
        sends = [w.isend(np.full(small, w.rank, dtype=np.float64), p, tag=1) for p in peers]
        ok = all(np.all(w.recv(p, tag=1, timeout=20) == p) for p in peers)
        for s in sends:
            s.wait(timeout=20)
        return [ok, listener.the_listener().port != parent, w._t.streams.got]
    return mesh.spawn(pairs, 3, timeout=40, env=TCP)


def test_a_job_forked_by_a_process_with_a_listener_has_its_own_per_rank() -> None:
    """Each forked rank makes its own listener: sharing the parent's socket,
    one rank accepted a stream meant for another, which then lost the
    sender ("a stream that was never opened to this rank")."""
    got = mesh.spawn(_forked_job, 1, timeout=55, env=TCP)
    assert got == [[[True, True, 2]] * 3], got


def _gone_while_its_bytes_come(world: mesh.Mesh, result: str, how: str) -> None:
    big = np.arange(N, dtype=np.float64)
    if world.rank == 1:
        def handed_to_the_kernel(sock: socket.socket, mv: memoryview) -> None:
            # The send returns with its bytes in the socket (a slow link: megabytes
            # of them still to cross); a child stands for the kernel, delivering them
            # once this process is gone, and holds nothing else of it (the ZeroMQ
            # connections close with the process, so rank 0 sees them close first).
            # (A copy of the descriptor: a fork closes the child's streams' own.)
            keep = os.dup(sock.fileno())
            child = os.fork()
            if child == 0:
                os.setsid()     # (not stopped with this rank's process group)
                for fd in map(int, os.listdir("/proc/self/fd")):
                    if fd != keep:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                try:
                    out, step = socket.socket(fileno=keep), len(mv) // 8 + 1
                    for i in range(0, len(mv), step):
                        time.sleep(0.15)        # the array in 1.2 s
                        out.sendall(mv[i:i + step])
                finally:
                    os._exit(0)
            os.close(keep)
            Path(result + ".child").write_text(str(child))
        mstreams._send_payload = handed_to_the_kernel
        # its close shuts the socket down, the child's too (the kernel would send
        # what the socket holds, then end it): left to the child
        mstreams._Sender.close = lambda self: None
        _ready(world, 0)
        world.recv(0, tag=9)
        world.send(big, 0, tag=1)
        if how == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ValueError("boom in rank 1")
    deadline = time.monotonic() + 20
    while 1 not in world._t.streams._in:
        assert time.monotonic() < deadline, "no stream from rank 1"
        time.sleep(0.01)
    world.send("go", 1, tag=9)
    # in no receive meanwhile: the progress thread reads the array whole (1.2 s; a
    # fixed 4 s sleep waited for it) or, the sender lost, never does
    deadline = time.monotonic() + 20
    while world._t.streams.got < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    what = []
    for tag in (1, 2):
        try:
            got = world.recv(1, tag=tag, timeout=10)
            what.append(f"received {np.array_equal(got, big)}")
        except mesh.MeshError as e:
            what.append(f"{type(e).__name__} {e}")
    Path(result).write_text("\n".join(what))


@pytest.mark.parametrize("how", ["killed", "raise"])
def test_an_array_sent_whole_before_its_sender_went_is_received(tmp_path: Path,
                                                                how: str) -> None:
    """A send returns once its bytes are in the socket; over a slow link
    they still cross after the sender is gone (killed, or failed and
    closed), while its ZeroMQ connection closes at once. The array is
    received whole (as through ZeroMQ, once it came): its sender is not lost
    to the closed connection while its stream still brings bytes (the stream
    was closed under them); a receive after it names the sender's own error
    (its goodbye, held behind the array, was heard after the loss)."""
    result = tmp_path / "result"
    _fails_leaving_no_child(result, _gone_while_its_bytes_come, how, env=TCP)
    first, second = result.read_text().split("\n")
    assert first == "received True", result.read_text()
    said = "it failed: ValueError: boom in rank 1" if how == "raise" else "peer rank 1 is gone"
    assert second.startswith("LostPeerError") and said in second, result.read_text()
