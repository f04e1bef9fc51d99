"""The rendezvous service and its clients against bad words, in one process:
a launcher's word naming no rank of the job, a service whose thread is slow
to stop, a wait hearing endless refusals, a run folder that cannot be locked;
and against network drops (a TCP relay of the test's own, ``_Link``, cut
and mended). (Strangers, garbage and duplicates: tests/test_mesh_auth.py.)"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import gc
import os
import re
import select
import socket
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack
import pytest
import zmq

import mesh
from mesh import auth, rdvlaunch, rdvserver, rendezvous
from mesh.rendezvous import RendezvousServer, Teller, join, run_folder

from proctools import EPS, wait_until

pytestmark = pytest.mark.timeout(60)


def _service(ctx: zmq.Context) -> tuple[zmq.Socket, int]:
    """A service of the test's own (a ROUTER of the secret "s", on ``ctx``,
    whose Authenticator the test makes) and its port: the test says its words."""
    service = ctx.socket(zmq.ROUTER)
    service.setsockopt(zmq.LINGER, 0)
    auth.make_server(service, "s")
    return service, service.bind_to_random_port("tcp://127.0.0.1")


def test_an_ended_word_for_no_rank_of_the_job_is_refused_not_the_jobs_end(
        caplog: pytest.LogCaptureFixture) -> None:
    """A launcher's word that rank 99 of a world of 2 ended (only a holder
    of the secret can send one) failed the waiting ranks with "peer rank 99
    is gone"; such a word, or one whose rank is no integer, is refused,
    counted and logged, and the job assembles."""
    srv = RendezvousServer(2, "s").start()
    ctx = zmq.Context()
    got: dict[int, Any] = {}

    def joins(rank: int) -> None:
        try:
            got[rank] = join(ctx, "127.0.0.1", srv.port, "s", rank, 2, "h", EPS, 10)
        except Exception as e:
            got[rank] = e
    teller = Teller("127.0.0.1", srv.port, "s", 2)
    first = threading.Thread(target=joins, args=(0,))
    try:
        with caplog.at_level("WARNING", logger="mesh.rendezvous"):
            first.start()
            assert wait_until(lambda: srv.missing() == [1])
            teller.ended(99, "exit code 5")
            teller.ended(-1, "exit code 5")
            assert teller._sock is not None
            teller._sock.send(msgpack.packb({"op": "ended", "rank": "1", "size": 2, "how": ""}))
            assert wait_until(lambda: srv.rejected == 3), srv.rejected
            joins(1)
            first.join(10)
        assert isinstance(got[0], list) and got[0] == got[1], got
        said = [r.getMessage() for r in caplog.records if r.name == "mesh.rendezvous"]
        assert said[0] == ("rendezvous: ignored an ended word for rank 99, not a rank of this "
                           "job of world size 2 (1 so far)"), said
    finally:
        if first.ident is not None:
            first.join(10)
        teller.close()
        srv.close()
        ctx.term()


class _SlowTries:
    """A ``tries`` whose tick holds the service's thread until ``go`` is set."""

    def __init__(self) -> None:
        self.on_go: Any = None
        self.attempt, self.running = 0, True
        self.ticking, self.go = threading.Event(), threading.Event()

    def tick(self, now: float, send: Any) -> None:
        self.ticking.set()
        self.go.wait(10)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_a_service_thread_slow_to_stop_closes_its_own_wake_pipe(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """close() waits a while for the service's thread; one still busy then
    (here a ``tries`` callback) left the wake pipe's descriptors open for
    good, and a second close() wrote to the pipe again and waited again.
    The thread closes its pipe and sockets as it ends; close() runs once."""
    monkeypatch.setattr(rdvserver, "_STOP_WAIT", 0.1, raising=False)
    ctx = zmq.Context()
    ctx.socket(zmq.ROUTER).close()      # (its threads' descriptors: there from now on)
    fds = _fds()
    tries = _SlowTries()
    srv = RendezvousServer(2, "s", ctx=ctx, tries=tries).start()
    try:
        assert tries.ticking.wait(10)
        srv.close()
        assert srv._thread.is_alive()       # (still in the callback)
        tries.go.set()
        srv._thread.join(10)
        assert not srv._thread.is_alive()
        assert wait_until(lambda: _fds() <= fds), "the wake pipe (or a socket) was left open"
        srv.close()
        assert _fds() <= fds
    finally:
        tries.go.set()
        srv.close()
        ctx.term()


def test_a_long_wait_quotes_the_first_refusals_and_counts_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    """A rank waiting beside a node that keeps joining wrongly kept every
    distinct refusal the service told of (its last 3, every second) and
    quoted all in its timeout error, and rank 0 logged each: it quotes the
    first 3 and says how many in all, and logs how many at the 4th, 8th...
    (A service of its own here, telling of 120 refusals at once.)"""
    ctx = zmq.Context()
    authenticator = auth.Authenticator(ctx, "s")
    service, port = _service(ctx)

    def serve() -> None:
        if not service.poll(5000):
            return
        ident = service.recv_multipart()[0]
        for n in range(1, 41):
            said = [f"rank 1 of world 3 (pid {3 * n + i}) cannot join" for i in range(3)]
            service.send_multipart([ident, msgpack.packb(
                {"op": "waiting", "missing": [1], "refused": said, "refusals": 3 * n})])
    server = threading.Thread(target=serve)
    server.start()
    try:
        with caplog.at_level("WARNING", logger="mesh.rendezvous"):
            with pytest.raises(mesh.RendezvousError) as e:
                join(ctx, "127.0.0.1", port, "s", 0, 2, "h", EPS, 1.5)
        said = [r.getMessage() for r in caplog.records if r.name == "mesh.rendezvous"]
    finally:
        server.join(10)
        service.close()
        authenticator.close()
        ctx.term()
    assert str(e.value).endswith(
        "ranks [1] never arrived; it refused meanwhile: rank 1 of world 3 (pid 3) cannot "
        "join; rank 1 of world 3 (pid 4) cannot join; rank 1 of world 3 (pid 5) cannot join "
        "(120 joins refused in all)"), str(e.value)[:400]
    assert [m.split(": ", 1)[1] for m in said[:3]] == [
        f"the rendezvous refused a join while the job waits for ranks [1]: rank 1 of world 3 "
        f"(pid {p}) cannot join" for p in (3, 4, 5)], said
    assert [m.split(" joins")[0] for m in said[3:]] == [
        f"rank 0: the rendezvous has refused {n}" for n in (6, 9, 18, 33, 66)], said


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
@pytest.mark.parametrize("fails", ["open", "flock"])
def test_a_run_folder_that_cannot_be_locked_is_not_left(
        fails: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A launcher out of descriptors (EMFILE) left its new run folder
    without a lock (and the lock's descriptor open where flock failed):
    another PID namespace's launcher sharing /tmp takes such a folder for a
    dead launcher's. The folder is removed, and the error names it."""
    import errno
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    real_open = os.open

    def open_(path: Any, *args: Any, **kwargs: Any) -> int:
        if fails == "open" and str(path).endswith(".lock"):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_open(path, *args, **kwargs)

    class Fcntl:
        LOCK_EX, LOCK_NB = fcntl.LOCK_EX, fcntl.LOCK_NB

        @staticmethod
        def flock(fd: int, how: int) -> None:
            if fails == "flock":
                raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
            fcntl.flock(fd, how)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(rdvlaunch, "fcntl", Fcntl)
    gc.collect()        # (an earlier test's garbage holding descriptors: not ours)
    fds = _fds()
    said = re.escape(f"cannot lock the run folder {tmp_path}/meshrun-")
    with pytest.raises(OSError, match=said) as e:
        run_folder("meshrun")
    assert e.value.errno == (errno.EMFILE if fails == "open" else errno.ENOLCK)
    assert list(tmp_path.iterdir()) == []
    assert _fds() == fds


def test_a_run_folder_whose_lock_a_neighbour_looks_at_is_locked_once_it_lets_go(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two launchers starting at once (two hosts' meshruns restarting): one
    looks at every run folder's lock (``_locked``), the other's new one
    included, holding it an instant; the new folder's lock is tried again,
    not given up ("cannot lock the run folder ... Resource temporarily
    unavailable" ended that host's meshrun)."""
    import errno
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    busy = [3]

    class Fcntl:
        LOCK_EX, LOCK_NB = fcntl.LOCK_EX, fcntl.LOCK_NB

        @staticmethod
        def flock(fd: int, how: int) -> None:
            if busy[0]:
                busy[0] -= 1
                raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            fcntl.flock(fd, how)
    monkeypatch.setattr(rdvlaunch, "fcntl", Fcntl)
    path = run_folder("meshrun")
    try:
        assert busy == [0] and rdvlaunch._locked(path)
    finally:
        rdvlaunch.remove_run_folder(path)


def test_a_service_that_ends_mid_rendezvous_fails_the_waiting_ranks_at_once() -> None:
    """The service's process ends (node 0's meshrun killed) while ranks of
    other hosts wait: they waited their whole rendezvous timeout, then said
    the ranks that never arrived, though the join they made was lost with
    the service. They fail as its connection closes and its port refuses
    connections (a network drop they wait through:
    test_a_rank_waiting_through_a_network_drop_joins_as_the_link_comes_back)."""
    srv = RendezvousServer(2, "s").start()
    ctx = zmq.Context()
    try:
        failed = threading.Event()
        got: dict[str, str] = {}

        def joins() -> None:
            try:
                join(ctx, "127.0.0.1", srv.port, "s", 1, 2, "h", EPS, 30)
            except mesh.RendezvousError as e:
                got["error"] = str(e)
            failed.set()
        waiter = threading.Thread(target=joins)
        waiter.start()
        assert wait_until(lambda: srv.missing() == [0])
        srv.close()
        assert failed.wait(10), "the rank waits on for a service that is gone"
        waiter.join(10)
        assert f"rank 1: rendezvous at tcp://127.0.0.1:{srv.port}: the service closed this " \
               f"rank's connection" in got["error"], got
        assert "and its port refuses connections now: its process ended" in got["error"], got
        # what a service says as it closes comes first: its refusal, not "closed"
        authenticator = auth.Authenticator(ctx, "s")
        for _ in range(5):
            service, port = _service(ctx)
            closing = threading.Thread(target=lambda: (
                service.send_multipart([service.recv_multipart()[0], msgpack.packb(
                    {"op": "error", "msg": "no"})]), service.close(linger=1000)))
            closing.start()
            with pytest.raises(mesh.RendezvousError, match="refused: no$"):
                join(ctx, "127.0.0.1", port, "s", 1, 2, "h", EPS, 10)
            closing.join(10)
        authenticator.close()
    finally:
        srv.close()
        ctx.term()


def test_a_rank_whose_connection_closes_before_the_table_is_waited_for_again(
        caplog: pytest.LogCaptureFixture) -> None:
    """A rank joined, then its process ended (under a launcher that says
    nothing of it): the table went out naming it, and a restarted process
    of that rank was refused as a duplicate. Its join is forgotten as its
    connection closes: the rank is waited for again and may join."""
    srv = RendezvousServer(2, "s").start()
    ctx = zmq.Context()
    got: dict[int, Any] = {}

    def joins(rank: int) -> None:
        got[rank] = join(ctx, "127.0.0.1", srv.port, "s", rank, 2, f"h{rank}", EPS, 10)
    first = threading.Thread(target=joins, args=(0,))
    try:
        with caplog.at_level("WARNING", logger="mesh.rendezvous"):
            gone = ctx.socket(zmq.DEALER)
            gone.setsockopt(zmq.LINGER, 0)
            auth.make_client(gone, "s")
            gone.connect(f"tcp://127.0.0.1:{srv.port}")
            gone.send(msgpack.packb({"op": "join", "rank": 1, "size": 2, "host": "h9",
                                     "endpoints": EPS, "pid": 99}))
            assert wait_until(lambda: srv.missing() == [0])
            gone.close()
            assert wait_until(lambda: srv.missing() == [0, 1])
            first.start()
            joins(1)
            first.join(10)
        assert [p["host"] for p in got[0]] == ["h0", "h1"] and got[0] == got[1], got
        said = [r.getMessage() for r in caplog.records if r.name == "mesh.rendezvous"]
        assert said == ["rendezvous: rank 1 (pid 99 on h9) joined, then its connection closed "
                        "before the job was complete: it is waited for again"], said
    finally:
        if first.ident is not None:
            first.join(10)
        srv.close()
        ctx.term()


def test_a_join_whose_fields_are_oversized_or_mistyped_is_refused_saying_which(
        caplog: pytest.LogCaptureFixture) -> None:
    """A join's host and endpoints go to every rank in the table, and had no
    size but the request's (64 KiB): a holder of the secret could make every
    rank hold 64 KiB a rank. A join whose host id or an endpoint is over 255
    bytes, or of another type, is refused, counted and logged as malformed,
    and the rank hears which field (it had no answer, or joined). A launcher's
    ended word whose ``how`` is no string is ignored the same way."""
    srv = RendezvousServer(2, "s").start()
    ctx = zmq.Context()
    good = {"op": "join", "rank": 0, "size": 2, "host": "h", "endpoints": EPS, "pid": 1}
    bad = [({"host": "h" * 256}, "rank 0: its host id is 256 bytes, more than 255"),
           ({"host": 7}, "rank 0: its host is of type int, not a string"),
           ({"endpoints": {**EPS, "tcp": "tcp://" + "1" * 250}},
            "rank 0: its tcp endpoint is 256 bytes, more than 255"),
           ({"endpoints": {**EPS, "ipc": 1}}, "rank 0: its ipc endpoint is not a string"),
           ({"call": "7"}, "rank 0: its call is of type str, not an integer"),
           ({"rank": "0"}, "a rank: its rank is of type str, not an integer")]
    try:
        with caplog.at_level("WARNING", logger="mesh.rendezvous"):
            with pytest.raises(mesh.RendezvousError, match=re.escape(
                    "rank 1: rendezvous at tcp://127.0.0.1:%d refused: a malformed join of "
                    "rank 1: its host id is 300 bytes, more than 255 (MESH_HOST_ID, or the "
                    "host name)" % srv.port)):
                join(ctx, "127.0.0.1", srv.port, "s", 1, 2, "h" * 300, EPS, 10)
            for change, said in bad:
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                auth.make_client(s, "s")
                s.connect(f"tcp://127.0.0.1:{srv.port}")
                s.send(msgpack.packb({**good, **change}))
                assert s.poll(5000), f"no answer to a join with {str(change)[:60]}"
                answer = msgpack.unpackb(s.recv(), raw=False)
                s.close()
                assert answer["op"] == "error" and said in answer["msg"], (said, answer)
            teller = Teller("127.0.0.1", srv.port, "s", 2)
            teller.ended(0, 5)      # type: ignore[arg-type]
            assert wait_until(lambda: srv.rejected == len(bad) + 2), srv.rejected
            teller.close()
        assert srv.missing() == [0, 1] and not srv._gone
        said = [r.getMessage() for r in caplog.records if r.name == "mesh.rendezvous"]
        assert said[0] == ("rendezvous: ignored a malformed join of rank 1: its host id is 300 "
                           "bytes, more than 255 (MESH_HOST_ID, or the host name) (1 so far)")
        assert len(said) == 4 and said[-1].endswith("(8 so far)"), said  # (1st, 2nd, 4th, 8th)
    finally:
        srv.close()
        ctx.term()


class _FailingTries(_SlowTries):
    """A ``tries`` whose tick raises once ``go`` is set."""

    def tick(self, now: float, send: Any) -> None:
        if self.go.is_set():
            raise RuntimeError("boom")


def test_the_services_end_on_an_error_is_logged_and_told_to_the_waiting_ranks(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's thread ended in silence on an error of its ``tries``
    callback or of its poll: the ranks waiting there heard only that its
    connection closed, as if its process had ended, and meshrun said
    nothing. It logs the error (an error: meshrun shows it; its traceback at
    debug), keeps it in ``failure``, and the waiting ranks hear it."""
    tries = _FailingTries()
    srv = RendezvousServer(2, "s", tries=tries).start()
    ctx = zmq.Context()
    got: dict[str, Any] = {}

    def joins() -> None:
        try:
            join(ctx, "127.0.0.1", srv.port, "s", 1, 2, "h", EPS, 10)
        except Exception as e:
            got["error"] = e
    waiter = threading.Thread(target=joins)
    try:
        with caplog.at_level("DEBUG", logger="mesh.rendezvous"):
            waiter.start()
            assert wait_until(lambda: srv.missing() == [0])
            tries.go.set()
            waiter.join(10)
            srv._thread.join(10)
        assert srv.failure == "RuntimeError: boom"
        assert isinstance(got.get("error"), mesh.RendezvousError), got
        assert str(got["error"]).endswith(
            "refused: the rendezvous service stopped (RuntimeError: boom)"), got
        said = [(r.levelname, r.getMessage(), r.exc_info) for r in caplog.records
                if r.name == "mesh.rendezvous"]
        assert [s[:2] for s in said] == [
            ("ERROR", "rendezvous: the service stopped on an error (RuntimeError: boom): the "
                      "ranks waiting there fail, and none can join it again"),
            ("DEBUG", "rendezvous: the service's error")], said
        assert said[1][2] is not None
    finally:
        waiter.join(10)
        srv.close()
        ctx.term()

    class BadPoller(zmq.Poller):
        def poll(self, timeout: Any = None) -> Any:
            raise zmq.ZMQError(zmq.EFAULT)
    monkeypatch.setattr(zmq, "Poller", BadPoller)
    caplog.clear()
    srv = RendezvousServer(2, "s").start()
    try:
        srv._thread.join(10)
        assert srv.failure.startswith("ZMQError: "), srv.failure
        assert [r.levelname for r in caplog.records if r.name == "mesh.rendezvous"] == ["ERROR"]
    finally:
        srv.close()


def test_a_rank_whose_connection_closed_just_before_the_table_is_not_named_in_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """The service finds the ranks whose connection closed at its waiting
    beat (1 s): one whose process ended in the beat before the last rank
    joined was named in the table. Their connections are checked once more
    just before it goes out. (The service's logic alone, no socket.)"""
    srv = RendezvousServer(2, "s")
    sent: list[tuple[bytes, dict[str, Any]]] = []

    def send(ident: bytes, msg: dict[str, Any]) -> bool:
        sent.append((ident, msg))
        return ident != b"gone"
    srv._send = send        # type: ignore[method-assign]
    try:
        with caplog.at_level("WARNING", logger="mesh.rendezvous"):
            srv._register(b"gone", {"op": "join", "rank": 1, "size": 2, "host": "h9",
                                    "endpoints": EPS, "pid": 99})
            srv._register(b"r0", {"op": "join", "rank": 0, "size": 2, "host": "h0",
                                  "endpoints": EPS, "pid": 10})
            assert not [m for _, m in sent if m["op"] == "table"], sent
            assert srv.missing() == [1] and not srv.complete.is_set()
            srv._register(b"r1", {"op": "join", "rank": 1, "size": 2, "host": "h1",
                                  "endpoints": EPS, "pid": 11})
        tables = [(i, m) for i, m in sent if m["op"] == "table"]
        assert [i for i, _ in tables] == [b"r0", b"r1"]
        assert [p["host"] for p in tables[0][1]["peers"]] == ["h0", "h1"]
        said = [r.getMessage() for r in caplog.records if r.name == "mesh.rendezvous"]
        assert said == ["rendezvous: rank 1 (pid 99 on h9) joined, then its connection closed "
                        "before the job was complete: it is waited for again"], said
    finally:
        srv.close()


def _join_hearing(words: list[Any], size: int = 2) -> Any:
    """What join returns or raises, from a service of its own that answers
    its join with ``words`` (bytes as they are; others packed)."""
    ctx = zmq.Context()
    authenticator = auth.Authenticator(ctx, "s")
    service, port = _service(ctx)

    def serve() -> None:
        if service.poll(5000):
            ident = service.recv_multipart()[0]
            for w in words:
                service.send_multipart([ident, w if isinstance(w, bytes) else msgpack.packb(w)])
    server = threading.Thread(target=serve)
    server.start()
    try:
        return join(ctx, "127.0.0.1", port, "s", 0, size, "h", EPS, 10)
    except Exception as e:
        return e
    finally:
        server.join(10)
        service.close()
        authenticator.close()
        ctx.term()


def test_a_rank_joining_makes_malformed_words_a_clear_error_or_ignores_them(
        caplog: pytest.LogCaptureFixture) -> None:
    """A rank's join raised a bare TypeError or KeyError on a malformed word
    (a table whose peers are not a list of the job's entries, a waiting word
    whose missing ranks are no list) and RecursionError quoting a deeply
    nested one. A malformed table is a RendezvousError saying so; other
    words are ignored, each logged (the 1st, 2nd, 4th...)."""
    deep = b"\x82" + b"".join(map(msgpack.packb, ["op", "error", "msg"])) + b"\x91" * 1000 \
        + b"\xc0"
    peer = {"rank": 0, "host": "h", "endpoints": EPS, "pid": 1, "window": None}
    with caplog.at_level("WARNING", logger="mesh.rendezvous"):
        got = _join_hearing([
            b"\xc1", [1], {"op": "waiting", "missing": 5}, {"op": "waiting", "missing": ["x"]},
            {"op": "waiting", "missing": [1], "refusals": 1, "refused": [[[1]]]},
            {"op": "what"}, {}, {"op": "table"}])
    assert isinstance(got, mesh.RendezvousError), got
    assert "sent a malformed table (its peers are of type NoneType, not a list)" in str(got), got
    said = [re.sub(r"^rank 0: rendezvous at tcp://127.0.0.1:\d+: ", "", r.getMessage())
            for r in caplog.records if r.name == "mesh.rendezvous"]
    assert said == [
        f"ignored {m}" for m in (
            "a message that is not msgpack's map (1 so far)",
            "a message that is not msgpack's map (2 so far)",
            "a waiting word whose missing ranks are not a list of integers (4 so far)")] + [
        "rank 0: the rendezvous refused a join while the job waits for ranks [1]: (not a "
        "string: list)"], said
    for table, fault in (([peer], "1 peers for a world of 2"),
                         ([peer, {**peer, "rank": 0}], "its entry for rank 1 is not"),
                         ([peer, {**peer, "rank": 1, "endpoints": {"tcp": 1}}],
                          "its entry for rank 1 is not"),
                         ([peer, 7], "its entry for rank 1 is not")):
        got = _join_hearing([{"op": "table", "peers": table}])
        assert isinstance(got, mesh.RendezvousError) and fault in str(got), (table, got)
    got = _join_hearing([deep])
    assert isinstance(got, mesh.RendezvousError), got
    assert str(got).endswith("refused: (not a string: list)"), got
    got = _join_hearing([{"op": "table", "peers": [peer, {**peer, "rank": 1}]}])
    assert got == [peer, {**peer, "rank": 1}], got


class _Link:
    """A TCP relay between the ranks and the service, in the test's process:
    ``cut()`` resets every connection through it (RST) and, until ``mend()``,
    each new one as it is accepted (a link down, a middlebox dropping the
    flow: its port accepts, never refuses, as a service's that ended does);
    ``cut(down=False)`` resets them and relays on (a connection reset)."""

    def __init__(self, port: int) -> None:
        self._to = ("127.0.0.1", port)
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self._lsock.getsockname()[1]
        self._up, self._stop = True, threading.Event()
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._lock = threading.Lock()
        self.turned = 0         # connections reset as they were accepted (while cut)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:        # (cut() closes sockets: never one in the select)
                for s in select.select([self._lsock, *self._pairs], [], [], 0.05)[0]:
                    if s is self._lsock:
                        self._accept()
                    elif s in self._pairs:
                        self._relay(s)

    def relaying(self) -> bool:
        """Whether a connection goes through it now."""
        with self._lock:
            return bool(self._pairs)

    def _accept(self) -> None:
        conn, _ = self._lsock.accept()
        if not self._up:
            self.turned += 1
            _reset(conn)
            return
        far = socket.create_connection(self._to)
        self._pairs[conn], self._pairs[far] = far, conn

    def _relay(self, s: socket.socket) -> None:
        try:
            data = s.recv(65536)
            if data:
                self._pairs[s].sendall(data)
                return
        except OSError:
            pass
        self._drop(s)

    def _drop(self, s: socket.socket) -> None:
        other = self._pairs.pop(s)
        self._pairs.pop(other, None)
        _reset(s)
        _reset(other)

    def cut(self, down: bool = True) -> None:
        with self._lock:
            self._up = not down
            for s in list(self._pairs):
                if s in self._pairs:
                    self._drop(s)

    def mend(self) -> None:
        with self._lock:
            self._up = True

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.cut()
        self._lsock.close()


def _joins(ctx: zmq.Context, got: dict[int, Any], rank: int, port: int) -> None:
    """Rank ``rank`` of 2 joins the service at ``port``: its table, or its
    error, in ``got``."""
    try:
        got[rank] = join(ctx, "127.0.0.1", port, "s", rank, 2, f"h{rank}", EPS, 30)
    except Exception as e:
        got[rank] = e


@contextlib.contextmanager
def _dropping() -> Iterator[tuple[RendezvousServer, _Link, dict[int, Any],
                                  Callable[[int, int], None], threading.Thread]]:
    """A service of 2 ranks with a relay before it (``_Link``, to cut), and
    ``waiter``, a thread (not started) where rank 1 joins through the relay;
    ``joins(rank, port)`` joins another, each one's table or error in
    ``got``. All closed after."""
    srv = RendezvousServer(2, "s").start()
    link = _Link(srv.port)
    ctx = zmq.Context()
    got: dict[int, Any] = {}
    joins = functools.partial(_joins, ctx, got)
    waiter = threading.Thread(target=joins, args=(1, link.port))
    try:
        yield srv, link, got, joins, waiter
    finally:
        link.close()
        if waiter.ident is not None:
            waiter.join(10)
        srv.close()
        ctx.term()


def _reset(s: socket.socket) -> None:
    """Close ``s`` with a reset (RST), as a link's far end or a middlebox does."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_a_rank_waiting_through_a_network_drop_joins_as_the_link_comes_back(
        caplog: pytest.LogCaptureFixture) -> None:
    """A rank's connection to the service was reset while it waited (a
    link down, the service's host unreachable for a moment): it failed at
    once, as if the service had ended. It joins again as the link comes
    back (the same join: the service, which forgot it as its connection
    closed, counts it once), until its rendezvous timeout."""
    with _dropping() as (srv, link, got, joins, waiter):
        with caplog.at_level("WARNING", logger="mesh.rendezvous"):
            waiter.start()
            assert wait_until(lambda: srv.missing() == [0])
            link.cut()
            assert wait_until(lambda: srv.missing() == [0, 1] and link.turned >= 3, 10), \
                (srv.missing(), link.turned, got)
            assert 1 not in got, got
            link.mend()
            assert wait_until(lambda: srv.missing() == [0], 10), (srv.missing(), got)
            joins(0, srv.port)
            waiter.join(10)
        assert isinstance(got[1], list) and got[0] == got[1], got
        assert [p["host"] for p in got[0]] == ["h0", "h1"] and srv.rejected == 0
        # (the rank's question whether the port refuses connections may reach the service
        # as the link comes back: counted and logged there as a refused handshake, README's
        # "Network drops")
        said = [re.sub(r"\d+s into", "Ns into", r.getMessage()) for r in caplog.records
                if r.name == "mesh.rendezvous" and "pid" not in r.getMessage()
                and not r.getMessage().startswith("rendezvous: refused a connection that "
                                                  "failed the handshake")]
        dropped = f"rank 1: rendezvous at tcp://127.0.0.1:{link.port}: the connection to the " \
                  f"service dropped Ns into the wait"
        assert said[-1] == f"{dropped} and is back: joined again", said
        assert set(said[:-1]) <= {   # (where a connect failed as the link reset it)
            f"{dropped}, and its port does not refuse connections (the network, not the "
            f"service's end): joining again as it comes back, until the rendezvous timeout "
            f"(30s)"}, said


def test_a_rank_whose_connection_is_reset_joins_again_not_as_a_duplicate() -> None:
    """A connection reset, the link at once good again: the rank joins again
    before the service has seen its first connection close, and was refused
    as a duplicate of itself. The same join again is the same registration."""
    with _dropping() as (srv, link, got, joins, waiter):
        waiter.start()
        for _ in range(3):
            assert wait_until(lambda: srv.missing() == [0] and link.relaying()), got
            link.cut(down=False)
        assert wait_until(lambda: srv.missing() == [0] and link.relaying()), got
        joins(0, srv.port)
        waiter.join(10)
        assert isinstance(got[1], list) and got[0] == got[1], got
        assert srv.rejected == 0


def test_the_same_join_again_is_one_registration_and_gets_the_table_again() -> None:
    """A join sent again on a new connection (its call the same: a network
    drop) replaces the first in its round, and once the table is out (a
    drop may have lost it) gets the table again, no new round; a join of
    another call (the process's next ``mesh.init()``) starts a new round,
    and another process claiming the rank is refused. (The service's logic
    alone, no socket.)"""
    srv = RendezvousServer(2, "s")
    sent: list[tuple[bytes, dict[str, Any]]] = []

    def send(ident: bytes, msg: dict[str, Any]) -> bool:
        sent.append((ident, msg))
        return True
    srv._send = send        # type: ignore[method-assign]

    def joins(ident: bytes, rank: int, call: int, pid: int = 0) -> None:
        srv._register(ident, {"op": "join", "rank": rank, "size": 2, "host": f"h{rank}",
                              "endpoints": EPS, "pid": pid or 10 + rank, "call": call})
    try:
        joins(b"a", 1, 7)
        joins(b"b", 1, 7)
        assert srv.rejected == 0 and srv.missing() == [0] and srv._idents == {1: b"b"}
        joins(b"c", 1, 8, pid=99)
        assert [m["msg"] for i, m in sent if i == b"c"] == [
            "rank 1 already joined (pid 11 on h1); duplicate from pid 99"], sent
        joins(b"r0", 0, 5)
        tables = [(i, m["peers"]) for i, m in sent if m["op"] == "table"]
        assert [i for i, _ in tables] == [b"r0", b"b"] and srv.complete.is_set()
        joins(b"d", 1, 7)
        assert [i for i, m in sent if m["op"] == "table"] == [b"r0", b"b", b"d"]
        assert sent[-1][1]["peers"] == tables[0][1] and srv.missing() == []
        joins(b"e", 1, 9)       # (its mesh closed; mesh.init() again)
        assert srv.missing() == [0] and srv.rejected == 1
    finally:
        srv.close()


def test_a_drop_that_outlasts_the_rendezvous_timeout_names_who_is_missing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A link that stays down: the rank times out naming the ranks the
    service last said it waited for, and that its connection dropped."""
    srv = RendezvousServer(3, "s").start()
    link = _Link(srv.port)
    ctx = zmq.Context()
    heard = threading.Event()
    told = rendezvous._refusals

    def refusals(*args: Any) -> int:        # (a waiting word, read)
        heard.set()
        return told(*args)
    monkeypatch.setattr(rendezvous, "_refusals", refusals)
    cutter = threading.Thread(target=lambda: heard.wait(10) and link.cut())
    try:
        cutter.start()
        with pytest.raises(mesh.RendezvousError) as e:
            join(ctx, "127.0.0.1", link.port, "s", 1, 3, "h", EPS, 3)
        assert heard.is_set() and link.turned > 0
        assert re.search(r"timed out after 3s: ranks \[0, 2\] never arrived; its connection to "
                         r"the service dropped \ds into the wait and has not come back \(the "
                         r"network between them\)$", str(e.value)), e.value
    finally:
        heard.set()
        cutter.join(10)
        link.close()
        srv.close()
        ctx.term()
