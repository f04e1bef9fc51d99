"""Per-peer state: what a rank knows of each peer (its socket, the credit it
has used, whether it is alive, what it last said it was doing) and the sends
in flight to it."""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import Any

import zmq

from .match import Flag, describe

__all__ = ["ALIVE", "CLOSED", "DEAD", "Outgoing", "Peer", "config_float"]

ALIVE, CLOSED, DEAD = 0, 1, 2


def config_float(name: str, default: float) -> float:
    v = os.environ.get(name)
    return float(v) if v else default


class Outgoing:
    """A send in progress: queued (no credit yet), handed to ZeroMQ, then done
    once ZeroMQ has released the caller's buffer."""

    __slots__ = ("dst", "frames", "nbytes", "_desc", "event", "tracker", "error", "keep")

    def __init__(self, dst: int, frames: list | None, nbytes: int, desc: Any, keep: Any) -> None:
        self.frames: list | None
        self.dst, self.frames, self.nbytes, self._desc, self.keep = dst, frames, nbytes, desc, keep
        self.event = Flag()
        self.tracker: zmq.MessageTracker | None = None
        self.error: BaseException | None = None

    @property
    def desc(self) -> str:
        return describe(self._desc)

    def done(self) -> bool:
        return self.event.is_set() and (self.tracker is None or self.tracker.done)

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.frames = None
        self.event.set()


class Peer:
    __slots__ = ("rank", "sock", "monitor", "lock", "inflight", "queue", "state", "why",
                 "last_heard", "last_sent", "to_grant", "suspect_since", "status", "status_at")

    def __init__(self, rank: int, sock: zmq.Socket | None, monitor: zmq.Socket | None) -> None:
        self.rank, self.monitor = rank, monitor
        self.sock: Any = sock
        self.lock = threading.Lock()
        self.inflight = 0
        self.queue: deque[Outgoing] = deque()
        self.state = ALIVE
        self.why = ""
        self.last_heard = self.last_sent = time.monotonic()
        self.to_grant = 0
        self.suspect_since = 0.0
        self.status = ""
        self.status_at = 0.0
