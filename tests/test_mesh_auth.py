"""Only holders of the job secret get in: strangers, wrong secrets and the
wrong mechanism are refused during the handshake, at the rendezvous and at a
worker, and counted. CURVE mode (MESH_CURVE=1) runs the same job encrypted,
and a packet capture on the loopback shows the difference: the payload and
the secret cross the wire in clear with PLAIN, never with CURVE."""
from __future__ import annotations

import os
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

import collectives
import mesh
from mesh import auth, rendezvous
from mesh.rendezvous import RendezvousServer, join

from proctools import EPS, wait_until

pytestmark = pytest.mark.timeout(60)


def _stranger(ctx: zmq.Context, port: int, how: str, secret: str) -> zmq.Socket:
    """A DEALER that tries to join with the wrong credentials and says hello."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if how == "plain-wrong":
        auth.make_client(s, "not-" + secret)
    elif how == "plain-right":
        auth.make_client(s, secret)
    elif how == "curve-wrong":
        auth.make_client(s, "not-" + secret, curve=True)
    s.connect(f"tcp://127.0.0.1:{port}")
    _try_send(s, [b"\x81\xa2op\xa4join"])
    return s


def _try_send(s: zmq.Socket, frames: list[bytes]) -> None:
    """Send without blocking: a refused handshake drops the connection for
    good, and a DEALER without one blocks a send forever (a stranger that
    is descheduled between connect and send, on a loaded machine)."""
    try:
        s.send_multipart(frames, zmq.NOBLOCK)
    except zmq.Again:
        pass


def _join_in_thread(port: int, secret: str, rank: int, size: int, curve: bool,
                    results: dict) -> threading.Thread:
    def run() -> None:
        ctx = zmq.Context()
        try:
            results[rank] = join(ctx, "127.0.0.1", port, secret, rank, size, f"h{rank}", EPS,
                                 10, curve)
        except Exception as e:
            results[rank] = e
        finally:
            ctx.term()
    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_rendezvous_refuses_strangers_and_duplicates(curve: bool) -> None:
    secret = secrets.token_hex(16)
    srv = RendezvousServer(2, secret, curve=curve).start()
    ctx = zmq.Context()
    try:
        strangers = ["none", "plain-wrong", "curve-wrong"] + (["plain-right"] if curve else [])
        socks = [_stranger(ctx, srv.port, how, secret) for how in strangers]
        assert wait_until(lambda: srv.refused >= len(strangers)), srv.refused
        assert not any(s.poll(200) for s in socks), "a stranger got an answer"
        assert srv.missing() == [0, 1]

        results: dict[int, Any] = {}
        first = _join_in_thread(srv.port, secret, 0, 2, curve, results)
        assert wait_until(lambda: srv.missing() == [1])
        dup: dict[int, Any] = {}
        _join_in_thread(srv.port, secret, 0, 2, curve, dup).join(10)
        assert isinstance(dup[0], mesh.RendezvousError)
        assert "rank 0 already joined" in str(dup[0])
        wrong: dict[int, Any] = {}
        _join_in_thread(srv.port, secret, 1, 3, curve, wrong).join(10)
        assert "cannot join a job of world size 2" in str(wrong[1])
        _join_in_thread(srv.port, secret, 1, 2, curve, results).join(10)
        first.join(10)
        assert [p["rank"] for p in results[0]] == [0, 1] and results[0] == results[1]
        assert srv.rejected == 2
        # the table is out: the same processes may join again (their meshes closed,
        # mesh.init() once more), for a new table; another process may not
        again: dict[int, Any] = {}
        first = _join_in_thread(srv.port, secret, 1, 2, curve, again)
        assert wait_until(lambda: srv.missing() == [0])
        other = ctx.socket(zmq.DEALER)
        other.setsockopt(zmq.LINGER, 0)
        auth.make_client(other, secret, curve)
        other.connect(f"tcp://127.0.0.1:{srv.port}")
        other.send(msgpack.packb({"op": "join", "rank": 0, "size": 2, "host": "h0",
                                  "endpoints": EPS, "pid": os.getpid() + 1}))
        assert other.poll(5000)
        assert "rank 0 already joined" in msgpack.unpackb(other.recv())["msg"]
        other.close()
        _join_in_thread(srv.port, secret, 0, 2, curve, again).join(10)
        first.join(10)
        assert again[0] == again[1] and [p["rank"] for p in again[0]] == [0, 1]
        assert srv.rejected == 3
        for s in socks:
            s.close()
    finally:
        ctx.term()
        srv.close()


def _insider(ctx: zmq.Context, port: int, secret: str) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    auth.make_client(s, secret)
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def _refused_at_once(ctx: zmq.Context, port: int, secret: str) -> str:
    """The answer to a join of a wrong world size, from a fresh connection."""
    s = _insider(ctx, port, secret)
    try:
        s.send(msgpack.packb({"op": "join", "rank": 0, "size": 9, "host": "h", "pid": 1,
                              "endpoints": EPS}))
        return msgpack.unpackb(s.recv(), raw=False)["msg"] if s.poll(3000) else ""
    finally:
        s.close()


def test_a_client_that_never_reads_its_answers_does_not_stall_the_rendezvous() -> None:
    """A holder of the secret sends refused joins and never reads the
    answers: past ZeroMQ's queue for it (1000 messages) the service's
    thread blocked in its send for good, and answered nobody again. The
    answers it cannot take are dropped, and what a refusal quotes of the
    request is short (a 60 KB host name was sent back whole, to every
    rank that waits too)."""
    srv = RendezvousServer(2, "s").start()
    ctx = zmq.Context()
    try:
        deaf = _insider(ctx, srv.port, "s")
        deaf.setsockopt(zmq.RCVHWM, 1)
        deaf.setsockopt(zmq.RCVBUF, 1024)
        deaf.setsockopt(zmq.SNDTIMEO, 5000)    # (a stalled service stops reading too)
        bad = msgpack.packb({"op": "join", "rank": 0, "size": 3, "host": "h" * 8000, "pid": 1,
                             "endpoints": EPS})
        for _ in range(5000):
            deaf.send(bad)
        assert wait_until(lambda: srv.rejected == 5000, 20), srv.rejected
        assert "cannot join a job of world size 2" in _refused_at_once(ctx, srv.port, "s")
        s = _insider(ctx, srv.port, "s")
        s.send(msgpack.packb({"op": "join", "rank": 0, "size": 3, "host": "h" * 60_000,
                              "pid": 1, "endpoints": EPS}))
        assert s.poll(3000)
        assert len(msgpack.unpackb(s.recv(), raw=False)["msg"]) < 400
        s.close()
        deaf.close()
    finally:
        ctx.destroy(linger=0)
        srv.close()


def test_a_request_the_checks_did_not_foresee_does_not_end_the_rendezvous() -> None:
    """A join whose host is nested 1000 deep (within the 64 KiB a request
    may take) raised RecursionError as the service quoted or stored it,
    which ended the service's thread: nobody could join again. Such a
    request is counted as rejected, and a pid or window that is not an
    integer (they go to every rank in the table) makes a join malformed."""
    srv = RendezvousServer(2, "s").start()
    ctx = zmq.Context()
    try:
        def deep(rank: int) -> bytes:     # (msgpack.packb itself refuses 512 deep)
            return b"\x85" + b"".join(map(msgpack.packb, [
                "op", "join", "rank", rank, "size", 2, "endpoints", EPS,
                "host"])) + b"\x91" * 1000 + b"\xc0"
        join = {"op": "join", "rank": 1, "size": 2, "host": "h", "endpoints": EPS}
        for req in (deep(5), deep(1), msgpack.packb({**join, "pid": "1"}),
                    msgpack.packb({**join, "pid": 1, "window": [1]})):
            s = _insider(ctx, srv.port, "s")
            before = srv.rejected
            s.send(req)
            assert wait_until(lambda: srv.rejected == before + 1), req[:80]
            s.close()
        assert srv.missing() == [0, 1]
        assert "cannot join a job of world size 2" in _refused_at_once(ctx, srv.port, "s")
    finally:
        ctx.destroy(linger=0)
        srv.close()


def test_malformed_requests_do_not_flood_the_rendezvous_log(
        caplog: pytest.LogCaptureFixture) -> None:
    """Every malformed request (from a holder of the secret) was logged:
    a line each, as fast as it could send. Now the 1st, 2nd, 4th..., as
    the workers log the bad messages they drop; all are counted."""
    srv = RendezvousServer(2, "s").start()
    ctx = zmq.Context()
    try:
        s = _insider(ctx, srv.port, "s")
        with caplog.at_level("WARNING", logger="mesh.rendezvous"):
            for _ in range(300):
                s.send(b"\xc1 not msgpack")
            assert wait_until(lambda: srv.rejected == 300), srv.rejected
        said = [r.getMessage() for r in caplog.records if r.name == "mesh.rendezvous"]
        assert len(said) == 9 and said[-1].endswith("(256 so far)"), said[:3]
        s.close()
    finally:
        ctx.destroy(linger=0)
        srv.close()


def test_a_wrong_secret_fails_the_rendezvous_with_a_clear_error() -> None:
    srv = RendezvousServer(2, "right").start()
    ctx = zmq.Context()
    try:
        t0 = time.monotonic()
        with pytest.raises(mesh.AuthError, match="refused our credentials: a different "
                                                 "job secret"):
            join(ctx, "127.0.0.1", srv.port, "wrong", 0, 2, "h", EPS, 30.0)
        assert time.monotonic() - t0 < 5      # at once, not at the rendezvous timeout
        assert wait_until(lambda: srv.refused >= 1)
    finally:
        ctx.term()
        srv.close()


def test_a_rank_whose_service_never_answers_says_so_before_its_timeout(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens at the rendezvous address (a node started with a wrong
    --master-port, or before node 0): its host's first rank says so every
    while (at 10 s, then every 30 s; here sooner), where it waited its whole
    rendezvous timeout (120 s) in silence; the host's other ranks say nothing.
    At the timeout each says its port refuses connections (a wrong port, or
    node 0 not started), not only that the service never answered."""
    monkeypatch.setattr(rendezvous, "_NOTE_FIRST", 0.3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]       # (closed: nothing listens there)
    ctx = zmq.Context()
    ended: dict[int, str] = {}

    def joins(rank: int, first: bool) -> None:
        try:
            join(ctx, "127.0.0.1", port, "s", rank, 4, "h", EPS, 1.5, first_here=first)
            ended[rank] = "joined"
        except mesh.RendezvousError as e:
            ended[rank] = str(e)
    try:
        with caplog.at_level("WARNING", logger="mesh.rendezvous"):
            # the two ranks side by side, as on their host (one after the other: 3 s)
            threads = [threading.Thread(target=joins, args=a) for a in ((2, True), (3, False))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
    finally:
        ctx.term()
    assert all("the service never answered" in ended.get(r, "") for r in (2, 3)), ended
    # ... and why: nothing listens at that port (it said "wrong address", never the port)
    assert all(f"port {port} of 127.0.0.1 refuses connections: nothing listens there" in
               ended[r] and "--master-port" in ended[r] for r in (2, 3)), ended
    said = [r.getMessage() for r in caplog.records if r.name == "mesh.rendezvous"]
    assert len(said) == 1 and said[0].startswith(
        f"rank 2: rendezvous at tcp://127.0.0.1:{port}: no answer from the service yet"), said


def test_a_rank_that_ended_is_named_with_its_host_by_the_ranks_of_other_hosts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's "peer rank 1 is gone: it ended ... before the mesh was
    complete" names the rank's host as every error naming a peer does
    (mesh.peer.on_host), as each waiting rank sees it: rank 1 joined from
    another namespace of this host name (named by its address) and ended;
    its own host's rank names it bare. Rank 2 never joined: its host is
    the one its launcher's word (``Teller.ended``) says, with its pid (by
    the address that word came from where the name is shared too)."""
    ctx = zmq.Context()
    said: dict[str, str] = {}

    def joins(rank: int, host: str, tcp: str) -> None:
        try:
            join(ctx, "127.0.0.1", srv.port, "s", rank, 3, host, {**EPS, "tcp": tcp}, 5)
        except mesh.LostPeerError as e:
            said[host] = str(e).split(": ", 2)[2]
    for gone, host in ((1, ""), (2, "node-c"), (2, "box|net:[3]")):
        srv = RendezvousServer(3, "s").start()
        said.clear()
        monkeypatch.setenv("MESH_HOST_ID", host or "x")
        teller = rendezvous.Teller("127.0.0.1", srv.port, "s", 3)
        threads = [threading.Thread(target=joins, args=a) for a in (
            (0, "box|net:[1]", "tcp://10.77.0.1:1"), (1, "box|net:[2]", "tcp://10.77.0.2:1"))]
        try:
            for t in threads:
                t.start()
            assert wait_until(lambda: srv.missing() == [2]), srv.missing()
            teller.ended(gone, "exit code 5", 77)
        finally:
            for t in threads:
                t.join(6)
            teller.close()
            srv.close()
        yet = "is gone: it ended (exit code 5) before the mesh was complete"
        if gone == 1:
            assert said == {"box|net:[1]": f"peer rank 1 (on host 10.77.0.2, pid "
                                           f"{os.getpid()}) {yet}",
                            "box|net:[2]": f"peer rank 1 {yet}"}, said
        else:
            name = "node-c" if host == "node-c" else "127.0.0.1"
            assert set(said.values()) == {f"peer rank 2 (on host {name}, pid 77) {yet}"}, said
    ctx.term()


@pytest.mark.parametrize("ipc", [False, True], ids=["tcp", "ipc"])
def test_a_refused_stranger_is_named(ipc: bool, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """The log names where a connection refused for its credentials came
    from: its address over tcp://, and over ipc:// its process and user
    (libzmq says "localhost:UID:GID:PID", which the log quoted as such)."""
    ctx = zmq.Context()
    a = auth.Authenticator(ctx, "s")
    r = ctx.socket(zmq.ROUTER)
    r.setsockopt(zmq.LINGER, 0)
    auth.make_server(r, "s")
    r.bind(f"ipc://{tmp_path}/r.sock" if ipc else "tcp://127.0.0.1:0")
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    auth.make_client(s, "wrong")
    try:
        with caplog.at_level("WARNING", logger="mesh.auth"):
            s.connect(r.getsockopt_string(zmq.LAST_ENDPOINT))
            assert wait_until(lambda: a.refused >= 1)
        said = [rec.getMessage() for rec in caplog.records if rec.name == "mesh.auth"]
        where = (f"from process {os.getpid()} (user id {os.geteuid()}) on this host" if ipc
                 else "from 127.0.0.1 ")
        assert any(where in m and "without the job secret" in m for m in said), said
    finally:
        s.close()
        r.close()
        a.close()
        ctx.term()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_closing_the_service_and_the_authenticator_leaves_nothing_behind() -> None:
    """close() wakes their threads (no poll interval waited): both end, the
    wake pipes are closed, and a second close() does nothing."""
    fds, threads = _fds(), threading.active_count()
    for curve in (False, True):
        srv = RendezvousServer(2, "s", curve=curve).start()
        srv.close()
        srv.close()
        ctx = zmq.Context()
        a = auth.Authenticator(ctx, "s", curve)
        a.close()
        a.close()
        ctx.term()
    assert threading.active_count() == threads
    assert _fds() == fds


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs /proc")
def test_an_idle_authenticator_thread_sleeps() -> None:
    """The ZAP thread wakes for a request or close() only: each wake takes
    the interpreter lock from whatever the process runs (a ping-pong)."""
    ctx = zmq.Context()
    a = auth.Authenticator(ctx, "s")
    try:
        def switches() -> int:
            with open(f"/proc/self/task/{a._thread.native_id}/status") as f:
                return int(f.read().split("\nvoluntary_ctxt_switches:")[1].split()[0])
        time.sleep(0.05)
        before = switches()
        time.sleep(0.5)
        assert switches() - before <= 1      # a poll of 100 ms woke 5 times
    finally:
        a.close()
        ctx.term()


def _curve_job(world: mesh.Mesh) -> list:
    """An encrypted job works; strangers at a worker are refused and counted."""
    secret = os.environ["MESH_SECRET"]
    if world.rank == 1:
        ctx = zmq.Context()
        socks = []
        for how in ("none", "plain-right", "curve-wrong"):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            if how == "plain-right":
                auth.make_client(s, secret)
            elif how == "curve-wrong":
                auth.make_client(s, "not-" + secret, curve=True)
            s.connect(world.endpoints[0])
            _try_send(s, [b"junk", b"more junk"])
            socks.append(s)
        world.recv(0, tag=5)
        for s in socks:
            s.close()
        ctx.term()
    else:
        assert wait_until(lambda: world.refused >= 3)
        world.send("done", 1, tag=5)
    a = np.arange(1000, dtype=np.float64) * (world.rank + 1)
    collectives.all_reduce(world, a)
    assert np.array_equal(a, np.arange(1000) * 3.0)
    big = np.full(3 << 20, world.rank, np.uint8)
    world.send(big, 1 - world.rank)
    got = world.recv(1 - world.rank)
    assert got.shape == big.shape and np.all(got == 1 - world.rank)
    return [world.endpoints, world.refused, world.bad_messages]


def test_curve_job_runs_and_refuses_plain_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_CURVE", "1")       # the spawn parent serves the rendezvous
    monkeypatch.setenv("MESH_FORCE_TCP", "1")
    res = mesh.spawn(_curve_job, 2, timeout=20)
    assert all(ep.startswith("tcp://") for ep in res[0][0])
    assert res[0][1] >= 3 and res[0][2] == 0


# ---- what crosses the wire ---------------------------------------------------

class _Sniffer:
    """Every packet on the loopback (AF_PACKET, needs root), searched as it
    arrives for the needles; small packets (handshakes) are kept."""

    def __init__(self, needles: list[bytes]) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        self.sock.bind(("lo", 0))
        try:    # (other processes' traffic on lo must not crowd the mark out)
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)   # SO_RCVBUFFORCE
        except OSError:
            pass
        self.sock.settimeout(0.05)
        self.needles = needles
        self.found: set[bytes] = set()
        self.small: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        end = None      # (stopped: once what was queued is read, 3 s at most)
        while end is None or time.monotonic() < end:
            if end is None and self._stop.is_set():
                end = time.monotonic() + 3
            try:
                pkt = self.sock.recv(1 << 17)
            except socket.timeout:
                if self._stop.is_set():
                    return
                continue
            for n in self.needles:
                if n in pkt:
                    self.found.add(n)
            if len(pkt) < 2048 and len(self.small) < 100_000:
                self.small.append(pkt)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sock.close()

    def saw(self, needle: bytes) -> bool:
        return needle in self.found or any(needle in p for p in self.small)


MARK = b"MESHRUN-CLEARTEXT-" + secrets.token_hex(7).encode()


def _send_marked(world: mesh.Mesh, mark: bytes) -> str:
    payload = np.frombuffer(mark * 4096, np.uint8)
    if world.rank == 0:
        world.send(payload, 1)
        world.send({"note": mark.decode()}, 1)
    else:
        assert world.recv(0).tobytes() == payload.tobytes()
        assert world.recv(0)["note"] == mark.decode()
    return os.environ["MESH_SECRET"]


@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_only_curve_keeps_payload_and_secret_off_the_wire(
        monkeypatch: pytest.MonkeyPatch, curve: bool) -> None:
    try:
        sniffer = _Sniffer([MARK])
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot capture packets on lo (needs root / CAP_NET_RAW): {e}")
    monkeypatch.setenv("MESH_FORCE_TCP", "1")
    monkeypatch.setenv("MESH_CURVE", "1" if curve else "0")
    try:
        secret = mesh.spawn(_send_marked, 2, MARK, timeout=60)[0]
    finally:
        time.sleep(0.2)
        sniffer.stop()
    assert sniffer.saw(MARK) is not curve
    assert sniffer.saw(secret.encode()) is not curve


def _connect(ep: str) -> socket.socket:
    """A bare socket connected to a worker's endpoint (an abstract ipc one too)."""
    if ep.startswith("ipc://"):
        s = socket.socket(socket.AF_UNIX)
        path = ep[len("ipc://"):]
        s.connect("\0" + path[1:] if path.startswith("@") else path)
        return s
    host, port = ep[len("tcp://"):].rsplit(":", 1)
    return socket.create_connection((host.strip("[]"), int(port)))


def _not_zeromq(world: mesh.Mesh) -> list:
    """Rank 1 sends rank 0 what is not ZeroMQ at all (an HTTP request, bytes
    that never start a greeting) and hangs up: ZeroMQ reports no failed
    handshake for those, yet each is counted as refused (once no handshake
    under way can be what closed: MESH_HANDSHAKE_TIMEOUT). The ranks' own
    connections are up first (a round trip), as in _silent_stranger: a
    handshake of theirs under way beside the strangers' can be counted with
    them (the monitor's events name no connection; a count of 4 for 3 was
    seen twice under load)."""
    if world.rank == 1:
        world.send(None, 0)
        world.recv(0)
        for junk in (b"GET / HTTP/1.0\r\n\r\n", b"\x00" * 64):
            s = _connect(world.endpoints[0])
            s.sendall(junk)
            s.close()
        ctx = zmq.Context()         # and one ZeroMQ stranger with a wrong secret
        d = ctx.socket(zmq.DEALER)
        d.plain_username, d.plain_password = b"meshrun", b"wrong"
        # one try only: a reconnection within the sleep (ZeroMQ's are 100 ms apart) would
        # be a second refusal (a count of 4 for 3 was seen once, the suite at load 7-14;
        # its cause not proven)
        d.setsockopt(zmq.RECONNECT_IVL, -1)
        d.connect(world.endpoints[0])
        time.sleep(0.5)
        d.close(0)
        ctx.term()
        world.send("sent", 0)
        return []
    world.recv(1)
    world.send(None, 1)
    world.recv(1)
    wait_until(lambda: world.refused >= 3, 20)
    time.sleep(0.5)         # (nothing counted twice, nor a peer's connection)
    return [world.refused]


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _huge_claim(world: mesh.Mesh) -> list:
    """Rank 1, a stranger to rank 0 for this, sends ZeroMQ's greeting and then
    a frame claiming 1 GiB, and streams it: rank 0 drops the connection at
    the claim, buffering nothing (libzmq would allocate and fill it while
    the handshake's 10 s ran); meanwhile an object of 3 MiB, sent in
    frames of 1 MiB as arrays are, still arrives whole."""
    if world.rank == 1:
        world.send({"big": b"x" * (3 << 20)}, 0)
        s = _connect(world.endpoints[0])
        s.sendall(b"\xff" + b"\0" * 8 + b"\x7f\x03\x00" + b"PLAIN".ljust(20, b"\0")
                  + b"\0" * 32)
        s.recv(64)
        sent = 0
        try:
            s.sendall(b"\x06" + struct.pack(">Q", 1 << 30))
            while sent < 256 << 20:
                s.sendall(b"\0" * (1 << 20))
                sent += 1 << 20
        except OSError:
            pass
        s.close()
        world.send(sent, 0)
        return []
    before = _rss_kb()
    got = world.recv(1)
    sent = world.recv(1)
    return [len(got["big"]), sent, _rss_kb() - before]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status")
def test_a_stranger_claiming_a_huge_frame_is_dropped_before_it_is_buffered() -> None:
    big, sent, grew_kb = mesh.spawn(_huge_claim, 2, timeout=90,
                                    env={"MESH_FORCE_TCP": "1"})[0]
    assert big == 3 << 20 and sent < 256 << 20 and grew_kb < 64 << 10, (sent, grew_kb)


@pytest.mark.parametrize("tcp", ["0", "1"])
def test_a_connection_that_is_not_zeromq_is_counted_as_refused(tcp: str) -> None:
    assert mesh.spawn(_not_zeromq, 2, timeout=60,
                      env={"MESH_FORCE_TCP": tcp, "MESH_HANDSHAKE_TIMEOUT": "1"})[0] == [3]


def _silent_stranger(world: mesh.Mesh) -> list:
    """Rank 1 opens a bare connection to rank 0 and never says a word of the
    handshake: rank 0 drops it after MESH_HANDSHAKE_TIMEOUT and counts it.
    The ranks' own connections are up first (a round trip): a handshake of
    theirs still under way beside the stranger's can be taken for its end
    (the monitor's handshake events name no connection), the likely cause
    of a count of 0 seen once in a dozen runs."""
    if world.rank == 1:
        world.send(None, 0)
        world.recv(0)
        s = _connect(world.endpoints[0])
        s.settimeout(10)          # (ZeroMQ's own limit, without ours, is 30 s)
        closed = False
        try:
            while s.recv(4096):    # ZeroMQ's greeting, then the end: dropped
                pass
            closed = True
        except OSError:
            pass
        s.close()
        world.send(closed, 0)
        return [closed]
    world.recv(1)
    world.send(None, 1)
    closed = world.recv(1)
    wait_until(lambda: world.refused >= 1, 20)   # (the monitor is read on the next tick)
    return [closed, world.refused]


def test_a_connection_that_stalls_its_handshake_is_dropped_and_counted() -> None:
    closed, refused = mesh.spawn(_silent_stranger, 2, timeout=60,
                                 env={"MESH_HANDSHAKE_TIMEOUT": "0.5"})[0]
    assert closed and refused >= 1


class _FakeMonitor:
    """A ROUTER's monitor socket that hands out the events it is given."""

    def __init__(self) -> None:
        self.queue: list[list[bytes]] = []

    def feed(self, *events: int) -> None:
        self.queue += [[struct.pack("=HI", e, 7), b"tcp://127.0.0.1:5555"] for e in events]

    def recv_multipart(self, flags: int = 0) -> list[bytes]:
        if not self.queue:
            raise zmq.Again()
        return self.queue.pop(0)


def _watch(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, _FakeMonitor]:
    from mesh.liveness import Liveness
    monkeypatch.setenv("MESH_HANDSHAKE_TIMEOUT", "2")
    mon = _FakeMonitor()
    return Liveness(2, 10.0, [], {}, None, None, mon), mon    # type: ignore[arg-type]


def test_a_peer_closing_beside_a_handshake_is_no_stranger(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A clean 4-rank job warned, about once in seven runs on a loaded
    machine, of a stranger at rank 2: its monitor read, at once as it closed,
    three peers accepted, two handshakes done, a closing peer's connection
    gone, then the third handshake done. The monitor's handshake events name
    no connection: the one gone was a peer's, not the one still shaking."""
    A, S, D = (zmq.EVENT_ACCEPTED, zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_DISCONNECTED)
    live, mon = _watch(monkeypatch)
    with caplog.at_level("WARNING", logger="mesh.transport"):
        mon.feed(A, A, A, S, S, D, S)
        live.on_monitor(mon)
        live.tick(time.monotonic() + 60)    # (past any handshake's limit)
        mon.feed(D, D)                      # the others close too
        live.on_monitor(mon)
        live.tick(time.monotonic() + 120)
    assert live.handshake_failures == 0 and not caplog.records, caplog.records
    # a stranger that closes without a word of ZeroMQ gets no failure event: it is
    # counted once no handshake under way can be what closed (MESH_HANDSHAKE_TIMEOUT)
    for seq in ([A, D], [A, A, D, S], [A, S, A, D], [A, A, S, D, D]):
        live, mon = _watch(monkeypatch)
        with caplog.at_level("WARNING", logger="mesh.transport"):
            caplog.clear()
            mon.feed(*seq)
            live.on_monitor(mon)
            live.tick(time.monotonic())
            live.tick(time.monotonic() + 3)
            live.on_monitor(mon)
            live.tick(time.monotonic() + 6)
        assert live.handshake_failures == 1, seq
        assert ["refused a connection that failed the handshake" in r.getMessage()
                for r in caplog.records] == [True], (seq, caplog.records)
    # a failure ZeroMQ reports is counted at once, and its connection's end not again
    for seq in ([A, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, D],
                [A, A, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, D, S]):
        live, mon = _watch(monkeypatch)
        mon.feed(*seq)
        live.on_monitor(mon)
        assert live.handshake_failures == 1, seq
        live.tick(time.monotonic() + 60)
        assert live.handshake_failures == 1, seq


def test_a_handshake_timeout_must_be_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    try:
        for bad, why in (("0", "must be > 0"), ("soon", "not a number")):
            monkeypatch.setenv("MESH_HANDSHAKE_TIMEOUT", bad)
            with pytest.raises(ValueError, match=f"MESH_HANDSHAKE_TIMEOUT.*{why}"):
                auth.make_server(s)
    finally:
        s.close(linger=0)
        ctx.term()


# A rank's ROUTER in a process of its own, its open files held low: libzmq
# aborts a process whose ipc:// accept fails for want of a descriptor
_IPC_SERVER = """
import resource, sys, zmq
from mesh import auth, rendezvous
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
ctx = zmq.Context()
a = auth.Authenticator(ctx, "s")
r = ctx.socket(zmq.ROUTER)
r.setsockopt(zmq.LINGER, 0)
auth.make_server(r, "s")
r.bind(sys.argv[1])
print("bound", flush=True)
sys.stdin.readline()
print("alive", flush=True)
r.close()
a.close()
ctx.term()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                    reason="an abstract ipc:// socket, and root to act as another user")
def test_another_users_process_cannot_hold_a_ranks_ipc_socket() -> None:
    """Under torchrun, srun and mpirun a rank's ipc:// socket is abstract
    (mesh.world._ipc_path): no file permissions, so any user's process may
    connect. One that held enough connections open used up the rank's open
    files (ulimit -n; 64 here), and libzmq aborted the rank (SIGABRT: 'Too many open files
    (src/ipc_listener.cpp)'). A process of another user is now closed as it
    is accepted, before the handshake: it never even hears the greeting."""
    name = f"@mr-test-{os.getpid()}-{secrets.token_hex(4)}.sock"
    srv = subprocess.Popen([sys.executable, "-c", _IPC_SERVER, f"ipc://{name}"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                           env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    try:
        assert srv.stdout is not None and srv.stdout.readline() == "bound\n"
        pid = os.fork()
        if pid == 0:        # nobody: exits 0 when every connection was closed unheard
            heard = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                held = []
                for _ in range(200):
                    held.append(socket.socket(socket.AF_UNIX))
                    held[-1].connect("\0" + name[1:])
                for s in held:
                    s.settimeout(2)
                    if s.recv(10):
                        break
                else:
                    heard = 0
            finally:
                os._exit(heard)
        assert os.waitpid(pid, 0)[1] == 0, "another user's process got a ZeroMQ greeting"
        out, _ = srv.communicate("\n", timeout=10)
        assert srv.returncode == 0 and out == "alive\n", (srv.returncode, out)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
