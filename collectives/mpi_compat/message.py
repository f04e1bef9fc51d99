"""mpi4py's Message (Mprobe, Improbe, mprobe, improbe) over meshrun's
matched probe: ``Recv(buf)`` (a buffer longer than the message filled at
its start, as Recv's), ``Irecv(buf)``, ``recv()``, ``irecv()``."""
from __future__ import annotations

from typing import Any

import mesh
from mesh.errors import OutMismatchError

from .requests import Request, Status, fill, fit
from .tuples import unwrap
from .types import ANY_SOURCE, ANY_TAG, PROC_NULL

__all__ = ["Message", "MESSAGE_NULL", "MESSAGE_NO_PROC"]


class Message:
    """mpi4py's Message (Mprobe, Improbe): ``Recv(buf)`` / ``Irecv(buf)`` /
    ``recv()`` / ``irecv()`` over meshrun's matched probe."""

    def __init__(self, msg: "mesh.Message | Message | None" = None, what: str = "Mprobe",
                 g: mesh.Comm | None = None) -> None:
        """(mpi4py's ``MPI.Message()``: MESSAGE_NULL; ``MPI.Message(m)``: ``m``'s handle)"""
        of = msg if isinstance(msg, Message) else None
        self._msg: mesh.Message | None = of._msg if of is not None else \
            msg if not isinstance(msg, Message) else None
        self._what: str = of._what if of is not None else what
        self._g: mesh.Comm | None = of._g if of is not None else g

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Message):
            return self._msg is other._msg and (self._msg is not None or
                                                self._what == other._what)
        return NotImplemented

    __hash__ = object.__hash__

    @classmethod
    def Probe(cls, comm: Any, source: int = ANY_SOURCE, tag: int = ANY_TAG,
              status: Any = None) -> "Message":
        """mpi4py's ``MPI.Message.Probe(comm, ...)``: ``comm.Mprobe(...)``."""
        return comm.Mprobe(source, tag, status)

    @classmethod
    def Iprobe(cls, comm: Any, source: int = ANY_SOURCE, tag: int = ANY_TAG,
               status: Any = None) -> "Message | None":
        """``comm.Improbe(...)``: None where no message waits."""
        return comm.Improbe(source, tag, status)

    def __bool__(self) -> bool:
        """(MESSAGE_NULL false; MESSAGE_NO_PROC and its copies true, as mpi4py's)"""
        return self._msg is not None or self._no_proc()

    def _no_proc(self) -> bool:
        return self._msg is None and self._what == "MESSAGE_NO_PROC"

    def _received_no_proc(self, status: Status | None) -> bool:
        """MESSAGE_NO_PROC's receive (MPI's from PROC_NULL: nothing, the
        status source PROC_NULL, tag ANY_TAG, no bytes); a copy of it is
        MESSAGE_NULL after, the constant stays itself, as mpi4py's."""
        if not self._no_proc():
            return False
        if status is not None:
            status.source, status.tag, status.nbytes = PROC_NULL, ANY_TAG, 0
            status.cancelled = False
        if self is not MESSAGE_NO_PROC:
            self._what = "Mprobe"
        return True

    def Recv(self, buf: Any, status: Status | None = None) -> None:
        from .buffers import spec
        if self._received_no_proc(status):
            return
        b = spec(buf, "Message.Recv", packs=True)
        st = mesh.Status()
        msg = self._need()
        try:
            msg.recv(out=b.view, status=st)
        except OutMismatchError:
            assert self._g is not None      # (a Message with a message has its group)
            fit(b.view, msg.recv(status=st), st, "Message.Recv", self._g, b.typed)
        b.done()
        fill(status, st)
        self._msg = None

    def Irecv(self, buf: Any) -> Request:
        self.Recv(buf)
        return Request(_done_request())

    def recv(self, status: Status | None = None) -> Any:
        if self._received_no_proc(status):
            return None
        st = mesh.Status()
        value = self._need().recv(status=st)
        fill(status, st)
        self._msg = None
        return unwrap(value)

    def irecv(self) -> Request:
        value = self.recv()
        return Request(_done_request(), finish=lambda _: value)

    def _need(self) -> mesh.Message:
        if self._msg is None:
            raise ValueError("collectives.MPI Message: MESSAGE_NULL (received already, or "
                             "none matched) has nothing to receive")
        return self._msg

    @classmethod
    def probe(cls, comm: Any, source: int = ANY_SOURCE, tag: int = ANY_TAG,
              status: Status | None = None) -> "Message":
        return comm.mprobe(source, tag, status)

    @classmethod
    def iprobe(cls, comm: Any, source: int = ANY_SOURCE, tag: int = ANY_TAG,
               status: Status | None = None) -> "Message | None":
        return comm.improbe(source, tag, status)


class _Done:
    """A request done at once (Message.Irecv's: the message was here)."""

    def done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> Any:
        return None


def _done_request() -> Any:
    return _Done()


MESSAGE_NULL = Message(None)
MESSAGE_NO_PROC = Message(None, "MESSAGE_NO_PROC")
