"""The same-host direct path: a large array message between two ranks of
one host is not copied through the socket; the receiver reads it straight
out of the sender's memory (cross-memory attach, mesh.cma) into its
destination, ``out=`` when a posted receive has one that fits.

    sender                                   receiver (whoever reads the socket)
    DATA header, x=[address, id]  ----->     reads nbytes at address of the
      (no payload; the buffer is kept)       sender's pid, then delivers as usual
    send complete  <-----  DONE x=[id]

The header travels on the peer's socket in order with everything else, so
matching, order per (source, tag), the unexpected queue, flow control
(the payload is charged to the credit window as if it had travelled),
aborts and mismatches are the socket path's. A sender that dies before its
bytes are read fails the read: the peer is lost and the receive raises
LostPeerError naming it.

Whether a peer may read us is probed once per peer, as the mesh starts
(a large message sent before the answer came goes by socket; before, the
first large message to each peer asked, and went by socket: 64 MiB paid
~200 ms instead of ~25): PROBE x=[pid, address of our token, token] is
answered PROBE x=[1] when the peer read the token back, else x=[0]; only
peers reached over ipc:// (same host) are asked.
``MESH_SHM=0`` (on either side) turns the path off; ``MESH_SHM_MIN`` is the
smallest payload that takes it (bytes, default 64 KiB).
"""
from __future__ import annotations

import itertools
import os
import sys
import threading
from typing import Callable

import zmq

from . import cma, wire
from .match import Flag
from .peer import Outgoing, Peer, config_bytes, config_flag

__all__ = ["Direct", "Ack", "enabled"]

UNKNOWN, ASKED, YES, NO = range(4)


def enabled() -> bool:
    return sys.platform == "linux" and config_flag("MESH_SHM", True)


class Ack(zmq.MessageTracker):
    """Stands for ZeroMQ's tracker on a direct send: done once the receiver
    said it has read the buffer (DONE)."""

    def __init__(self) -> None:
        super().__init__()
        self.flag = Flag()

    @property
    def done(self) -> bool:       # type: ignore[override]
        return self.flag.is_set()

    def wait(self, timeout: float | int = -1) -> None:
        if not self.flag.wait(None if timeout is None or timeout < 0 else timeout):
            raise zmq.NotDone


class Direct:
    """Rank ``rank``'s side of the direct path with each of ``peers``
    (``endpoints``: how each is reached); ``control(peer, header)`` sends."""

    def __init__(self, rank: int, peers: list[Peer], endpoints: list[str],
                 control: Callable[[Peer, bytes], None]) -> None:
        self.rank, self._peers, self._control = rank, peers, control
        self.on = enabled()
        self.min_bytes = int(config_bytes("MESH_SHM_MIN", 64 << 10))
        if self.on:
            cma.allow_peers()
        self._state = [UNKNOWN if self.on and r != rank and ep.startswith("ipc://") else NO
                       for r, ep in enumerate(endpoints)]
        self.pids = [0] * len(peers)          # peers whose token we read: their pids
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._sent: dict[int, Outgoing] = {}  # direct sends not yet read, by id

    # ---- sender --------------------------------------------------------------

    def usable(self, dst: int) -> bool:
        """Whether a large message to ``dst`` may go direct now; asks ``dst``
        the first time (the transport does that as it starts)."""
        state = self._state[dst]
        if state == YES:
            return True
        if state == UNKNOWN:
            with self._lock:
                if self._state[dst] != UNKNOWN:
                    return self._state[dst] == YES
                self._state[dst] = ASKED
            tok = cma.token()
            self._control(self._peers[dst], wire.encode(
                wire.PROBE, self.rank, direct=(os.getpid(), tok.ctypes.data, int(tok[0]),
                                               int(tok[1]))))
        return False

    def header(self, out: Outgoing, **fields: object) -> bytes:
        """Register the direct send ``out`` (its ``keep``: a C-contiguous
        array) and return its header; ``out`` completes when it is read."""
        ident = next(self._ids)
        out.tracker = Ack()
        with self._lock:
            self._sent[ident] = out
        return wire.encode(wire.DATA, self.rank, direct=(out.keep.ctypes.data, ident),
                           **fields)  # type: ignore[arg-type]

    def sending(self) -> bool:
        """Whether a direct send waits to be read (its DONE comes by socket)."""
        return bool(self._sent)

    def unread(self, dst: int) -> list[Outgoing]:
        """The direct sends to ``dst`` handed over and not read yet, oldest
        first (those still queued for credit are registered already)."""
        with self._lock:
            return [out for out in self._sent.values()
                    if out.dst == dst and out.event.is_set() and out.error is None]

    def on_done(self, ident: int) -> None:
        """The receiver has read the buffer of send ``ident``."""
        with self._lock:
            out = self._sent.pop(ident, None)
        if out is not None:
            assert isinstance(out.tracker, Ack)
            out.keep = None
            out.tracker.flag.set()

    def forget(self, out: Outgoing) -> None:
        """A direct send that failed before it left."""
        with self._lock:
            for k, v in list(self._sent.items()):
                if v is out:
                    del self._sent[k]

    def on_probe(self, peer: Peer, x: tuple[int, ...]) -> None:
        """A peer asks whether we can read it (x of 4) or answers (x of 1)."""
        if len(x) == 1:
            if self._state[peer.rank] == ASKED:
                self._state[peer.rank] = YES if x[0] == 1 else NO
            return
        pid, addr, t0, t1 = x
        ok = False
        if self.on:
            got = cma.token().copy()
            ok = cma.read_errno(pid, addr, got) == 0 and [int(v) for v in got] == [t0, t1]
        if ok:
            self.pids[peer.rank] = pid
        self._control(peer, wire.encode(wire.PROBE, self.rank, direct=(int(ok),)))

    # ---- receiver ------------------------------------------------------------

    def read_done(self, peer: Peer, ident: int) -> None:
        """We have read ``peer``'s direct send ``ident``: it may complete."""
        self._control(peer, wire.encode(wire.DONE, self.rank, direct=(ident,)))

    def close(self) -> None:
        with self._lock:
            self._sent.clear()
