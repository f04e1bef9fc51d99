"""ZeroMQ's release of a zero-copy send made late, for the tests of a send
whose receiver leaves before that release comes (pyzmq's garbage thread,
late on a loaded machine)."""
from __future__ import annotations

import time
from pathlib import Path

import zmq

import mesh

__all__ = ["hold_releases"]


def hold_releases(world: mesh.Mesh, dst: int, handed: str = "") -> None:
    """From now on this process's sends tell ZeroMQ's release of their
    frames only once their wait has seen rank ``dst`` leave (not alive), on
    a later look than the one that saw it. ``handed``: a file written when
    the first such wait begins (the send is handed to ZeroMQ)."""
    from mesh import sendpath
    from mesh.peer import ALIVE
    peer, real = world._t._peers[dst], zmq.MessageTracker

    class Late:
        def __init__(self, *trackers: object) -> None:
            self.real, self.told = real(*trackers), False

        @property
        def done(self) -> bool:
            return self.told and self.real.done

        def wait(self, timeout: float = -1) -> None:
            if handed and not Path(handed).exists():
                Path(handed).write_text("handed")
            gone = peer.state != ALIVE
            if not (gone and self.told):
                self.told = gone            # (released once seen gone, not before)
                time.sleep(0.02)
                raise zmq.NotDone
            self.real.wait(timeout)

    class Zmq:      # (sendpath's zmq, whose trackers are Late ones)
        MessageTracker = Late

        def __getattr__(self, name: str) -> object:
            return getattr(zmq, name)

    sendpath.zmq = Zmq()    # type: ignore[assignment]
