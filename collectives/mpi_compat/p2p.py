"""mpi4py's point-to-point calls on a communicator, over meshrun's: the
uppercase ones take buffer specs (collectives.mpi_compat.buffers; a derived
datatype's elements packed to send, unpacked at a receive's end), the
lowercase ones objects (msgpack, never pickle) and arrays; receives take
ANY_SOURCE and ANY_TAG unless told, as mpi4py's do."""
from __future__ import annotations

from typing import Any, Callable

import mesh

from .buffers import Buf, spec
from .message import MESSAGE_NO_PROC, Message
from .requests import Into, Prequest, Request, Status, fill, receive_into
from .tuples import unwrap, wrap
from .types import ANY_SOURCE, ANY_TAG, PROC_NULL, mesh_tag

__all__ = ["PointToPoint"]


def _packing(b: Buf) -> Callable[[], None] | None:
    """A persistent send's step at each start: a derived datatype's
    elements packed again (a predefined one's view is the buffer itself)."""
    return b.refresh if b.typed else None


def _unpacking(b: Buf) -> Callable[[Any], Any] | None:
    """A receive request's step at its wait: a derived datatype's elements
    unpacked into their places."""
    return b.done_with if b.typed else None


class PointToPoint:
    """The point-to-point half of collectives.MPI's Comm (``_g``: its
    meshrun communicator; ``_posted``: receives posted so far)."""

    _g: mesh.Comm
    _posted: int

    def _posting(self) -> int:
        self._posted += 1
        return self._posted

    # -- blocking, buffers --------------------------------------------------------------
    def Send(self, buf: Any, dest: int, tag: int = 0) -> None:
        self._g.send(spec(buf, "Send", packs=True).view, dest, tag)

    def Ssend(self, buf: Any, dest: int, tag: int = 0) -> None:
        self._g.ssend(spec(buf, "Ssend", packs=True).view, dest, tag)

    def Bsend(self, buf: Any, dest: int, tag: int = 0) -> None:
        self._g.bsend(spec(buf, "Bsend", packs=True).view, dest, tag)

    def Rsend(self, buf: Any, dest: int, tag: int = 0) -> None:
        self._g.send(spec(buf, "Rsend", packs=True).view, dest, tag)

    def Recv(self, buf: Any, source: int = ANY_SOURCE, tag: int = ANY_TAG,
             status: Status | None = None) -> None:
        """Into ``buf``; a shorter message fills its start (Status.Get_count
        says how much), a longer one raises MPI.Exception (ERR_TRUNCATE)."""
        b = spec(buf, "Recv", packs=True)
        st = mesh.Status()
        self._posting()
        receive_into(self._g, b.view, source, mesh_tag(tag), st, "Recv", typed=b.typed)
        b.done()
        fill(status, st)

    def Sendrecv(self, sendbuf: Any, dest: int, sendtag: int = 0, recvbuf: Any = None,
                 source: int = ANY_SOURCE, recvtag: int = ANY_TAG,
                 status: Status | None = None) -> None:
        b = spec(recvbuf, "Sendrecv", packs=True)
        st = mesh.Status()
        self._posting()
        try:
            self._g.sendrecv(spec(sendbuf, "Sendrecv", packs=True).view, dest, source, sendtag,
                             mesh_tag(recvtag), out=b.view, status=st)
        except mesh.OutMismatchError:     # (sent: the receive's message kept, as Recv's)
            receive_into(self._g, b.view, source, mesh_tag(recvtag), st, "Sendrecv",
                         typed=b.typed)
        b.done()
        fill(status, st)

    def Sendrecv_replace(self, buf: Any, dest: int, sendtag: int = 0,
                         source: int = ANY_SOURCE, recvtag: int = ANY_TAG,
                         status: Status | None = None) -> None:
        b = spec(buf, "Sendrecv_replace", packs=True)
        st = mesh.Status()
        self._posting()
        try:
            self._g.sendrecv(b.view, dest, source, sendtag, mesh_tag(recvtag), out=b.view,
                             status=st)
        except mesh.OutMismatchError:     # (sent: a shorter message fills the start, as Recv's)
            receive_into(self._g, b.view, source, mesh_tag(recvtag), st, "Sendrecv_replace",
                         typed=b.typed)
        b.done()
        fill(status, st)

    # -- nonblocking, buffers -----------------------------------------------------------
    def Isend(self, buf: Any, dest: int, tag: int = 0) -> Request:
        return Request(self._g.isend(spec(buf, "Isend", packs=True).view, dest, tag))

    def Issend(self, buf: Any, dest: int, tag: int = 0) -> Request:
        return Request(self._g.issend(spec(buf, "Issend", packs=True).view, dest, tag))

    def Ibsend(self, buf: Any, dest: int, tag: int = 0) -> Request:
        return Request(self._g.ibsend(spec(buf, "Ibsend", packs=True).view, dest, tag))

    def Irsend(self, buf: Any, dest: int, tag: int = 0) -> Request:
        return Request(self._g.isend(spec(buf, "Irsend", packs=True).view, dest, tag))

    def Irecv(self, buf: Any, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Request:
        b = spec(buf, "Irecv", packs=True)
        mine = self._posting()
        tag = mesh_tag(tag)
        into = Into(b.view, self._g, source, tag, lambda: self._posted == mine, b.typed)
        return Request(self._g.irecv(source, tag, out=b.view), into=into,
                       finish=_unpacking(b))

    # -- persistent ---------------------------------------------------------------------
    def Send_init(self, buf: Any, dest: int, tag: int = 0) -> Prequest:
        b = spec(buf, "Send_init", packs=True)
        return Prequest(self._g.send_init(b.view, dest, tag), before=_packing(b))

    def Ssend_init(self, buf: Any, dest: int, tag: int = 0) -> Prequest:
        b = spec(buf, "Ssend_init", packs=True)
        return Prequest(self._g.ssend_init(b.view, dest, tag), before=_packing(b))

    def Bsend_init(self, buf: Any, dest: int, tag: int = 0) -> Prequest:
        b = spec(buf, "Bsend_init", packs=True)
        return Prequest(self._g.bsend_init(b.view, dest, tag), before=_packing(b))

    def Rsend_init(self, buf: Any, dest: int, tag: int = 0) -> Prequest:
        b = spec(buf, "Rsend_init", packs=True)
        return Prequest(self._g.rsend_init(b.view, dest, tag), before=_packing(b))

    def Recv_init(self, buf: Any, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Prequest:
        """(each start's message must fill the buffer: meshrun's OutMismatchError
        otherwise)"""
        b = spec(buf, "Recv_init", packs=True)
        self._posting()
        return Prequest(self._g.recv_init(source, mesh_tag(tag), out=b.view),
                        finish=_unpacking(b))

    # -- probes -------------------------------------------------------------------------
    def Probe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG,
              status: Status | None = None) -> bool:
        fill(status, self._g.probe(source, mesh_tag(tag)))
        return True

    probe = Probe

    def Iprobe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG,
               status: Status | None = None) -> bool:
        st = self._g.iprobe(source, mesh_tag(tag))
        fill(status, st)
        return st is not None

    iprobe = Iprobe

    def Mprobe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG,
               status: Status | None = None) -> Message:
        self._posting()
        if source == PROC_NULL:     # (MPI's: MESSAGE_NO_PROC, its receive a no-op)
            return _no_proc(status)
        msg = self._g.mprobe(source, mesh_tag(tag))
        fill(status, msg.status)
        return Message(msg, g=self._g)

    mprobe = Mprobe

    def Improbe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG,
                status: Status | None = None) -> Message | None:
        self._posting()
        if source == PROC_NULL:
            return _no_proc(status)
        msg = self._g.improbe(source, mesh_tag(tag))
        if msg is None:
            return None
        fill(status, msg.status)
        return Message(msg, g=self._g)

    improbe = Improbe

    # -- objects ------------------------------------------------------------------------
    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        self._g.send(wrap(obj), dest, tag)

    def ssend(self, obj: Any, dest: int, tag: int = 0) -> None:
        self._g.ssend(wrap(obj), dest, tag)

    def bsend(self, obj: Any, dest: int, tag: int = 0) -> None:
        self._g.bsend(wrap(obj), dest, tag)

    def recv(self, buf: Any = None, source: int = ANY_SOURCE, tag: int = ANY_TAG,
             status: Status | None = None) -> Any:
        st = mesh.Status()
        self._posting()
        value = self._g.recv(source, mesh_tag(tag), status=st)
        fill(status, st)
        return unwrap(value)

    def sendrecv(self, sendobj: Any, dest: int, sendtag: int = 0, recvbuf: Any = None,
                 source: int = ANY_SOURCE, recvtag: int = ANY_TAG,
                 status: Status | None = None) -> Any:
        st = mesh.Status()
        self._posting()
        value = self._g.sendrecv(wrap(sendobj), dest, source, sendtag, mesh_tag(recvtag),
                                 status=st)
        fill(status, st)
        return unwrap(value)

    def isend(self, obj: Any, dest: int, tag: int = 0) -> Request:
        return Request(self._g.isend(wrap(obj), dest, tag))

    def issend(self, obj: Any, dest: int, tag: int = 0) -> Request:
        return Request(self._g.issend(wrap(obj), dest, tag))

    def ibsend(self, obj: Any, dest: int, tag: int = 0) -> Request:
        return Request(self._g.ibsend(wrap(obj), dest, tag))

    def irecv(self, buf: Any = None, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Request:
        self._posting()
        return Request(self._g.irecv(source, mesh_tag(tag)), finish=unwrap)


def _no_proc(status: Status | None) -> Message:
    """A matched probe of PROC_NULL: a copy of MESSAGE_NO_PROC, the status
    PROC_NULL's (source PROC_NULL, tag ANY_TAG, no bytes), as MPI's."""
    MESSAGE_NO_PROC._received_no_proc(status)     # (the constant stays itself)
    return Message(MESSAGE_NO_PROC)
