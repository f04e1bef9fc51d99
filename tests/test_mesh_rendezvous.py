"""The rendezvous service and its clients against bad words, in one process:
a launcher's word naming no rank of the job, a service whose thread is slow
to stop, a wait hearing endless refusals, a run folder that cannot be locked.
(Strangers, garbage and duplicates: tests/test_mesh_auth.py.)"""
from __future__ import annotations

import threading
import time
from typing import Any

import msgpack
import pytest
import zmq

from mesh.rendezvous import RendezvousServer, Teller, join

pytestmark = pytest.mark.timeout(60)

EPS = {"ipc": "ipc:///tmp/nowhere", "tcp": "tcp://127.0.0.1:1"}


def _wait(cond: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(cond())


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
            assert _wait(lambda: srv.missing() == [1])
            teller.ended(99, "exit code 5")
            teller.ended(-1, "exit code 5")
            assert teller._sock is not None
            teller._sock.send(msgpack.packb({"op": "ended", "rank": "1", "size": 2, "how": ""}))
            assert _wait(lambda: srv.rejected == 3), srv.rejected
            joins(1)
            first.join(10)
        assert isinstance(got[0], list) and got[0] == got[1], got
        said = [r.getMessage() for r in caplog.records if r.name == "mesh.rendezvous"]
        assert said[0] == ("rendezvous: ignored an ended word for rank 99, not a rank of this "
                           "job of world size 2 (1 so far)"), said
    finally:
        first.join(10)
        teller.close()
        srv.close()
        ctx.term()
