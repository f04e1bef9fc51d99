"""mpi4py's point-to-point calls on a communicator, over meshrun's: the
uppercase ones take buffer specs (collectives.mpi_compat.buffers), the
lowercase ones objects (msgpack, never pickle) and arrays; receives take
ANY_SOURCE and ANY_TAG unless told, as mpi4py's do."""
from __future__ import annotations

from typing import Any

import mesh

from .buffers import spec
from .message import Message
from .requests import Into, Prequest, Request, Status, fill, receive_into
from .tuples import unwrap, wrap
from .types import ANY_SOURCE, ANY_TAG, mesh_tag

__all__ = ["PointToPoint"]


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
        self._g.send(spec(buf, "Send").view, dest, tag)

    def Ssend(self, buf: Any, dest: int, tag: int = 0) -> None:
        self._g.ssend(spec(buf, "Ssend").view, dest, tag)

    def Bsend(self, buf: Any, dest: int, tag: int = 0) -> None:
        self._g.bsend(spec(buf, "Bsend").view, dest, tag)

    def Rsend(self, buf: Any, dest: int, tag: int = 0) -> None:
        self._g.send(spec(buf, "Rsend").view, dest, tag)

    def Recv(self, buf: Any, source: int = ANY_SOURCE, tag: int = ANY_TAG,
             status: Status | None = None) -> None:
        """Into ``buf``; a shorter message fills its start (Status.Get_count
        says how much), a longer one raises MPI.Exception (ERR_TRUNCATE)."""
        st = mesh.Status()
        self._posting()
        receive_into(self._g, spec(buf, "Recv").view, source, mesh_tag(tag), st, "Recv")
        fill(status, st)

    def Sendrecv(self, sendbuf: Any, dest: int, sendtag: int = 0, recvbuf: Any = None,
                 source: int = ANY_SOURCE, recvtag: int = ANY_TAG,
                 status: Status | None = None) -> None:
        view = spec(recvbuf, "Sendrecv").view
        st = mesh.Status()
        self._posting()
        try:
            self._g.sendrecv(spec(sendbuf, "Sendrecv").view, dest, source, sendtag,
                             mesh_tag(recvtag), out=view, status=st)
        except mesh.OutMismatchError:     # (sent: the receive's message kept, as Recv's)
            receive_into(self._g, view, source, mesh_tag(recvtag), st, "Sendrecv")
        fill(status, st)

    def Sendrecv_replace(self, buf: Any, dest: int, sendtag: int = 0,
                         source: int = ANY_SOURCE, recvtag: int = ANY_TAG,
                         status: Status | None = None) -> None:
        view = spec(buf, "Sendrecv_replace").view
        st = mesh.Status()
        self._posting()
        self._g.sendrecv(view, dest, source, sendtag, mesh_tag(recvtag), out=view, status=st)
        fill(status, st)

    # -- nonblocking, buffers -----------------------------------------------------------
    def Isend(self, buf: Any, dest: int, tag: int = 0) -> Request:
        return Request(self._g.isend(spec(buf, "Isend").view, dest, tag))

    def Issend(self, buf: Any, dest: int, tag: int = 0) -> Request:
        return Request(self._g.issend(spec(buf, "Issend").view, dest, tag))

    def Ibsend(self, buf: Any, dest: int, tag: int = 0) -> Request:
        return Request(self._g.ibsend(spec(buf, "Ibsend").view, dest, tag))

    def Irsend(self, buf: Any, dest: int, tag: int = 0) -> Request:
        return Request(self._g.isend(spec(buf, "Irsend").view, dest, tag))

    def Irecv(self, buf: Any, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Request:
        view = spec(buf, "Irecv").view
        mine = self._posting()
        tag = mesh_tag(tag)
        into = Into(view, self._g, source, tag, lambda: self._posted == mine)
        return Request(self._g.irecv(source, tag, out=view), into=into)

    # -- persistent ---------------------------------------------------------------------
    def Send_init(self, buf: Any, dest: int, tag: int = 0) -> Prequest:
        return Prequest(self._g.send_init(spec(buf, "Send_init").view, dest, tag))

    def Ssend_init(self, buf: Any, dest: int, tag: int = 0) -> Prequest:
        return Prequest(self._g.ssend_init(spec(buf, "Ssend_init").view, dest, tag))

    def Bsend_init(self, buf: Any, dest: int, tag: int = 0) -> Prequest:
        return Prequest(self._g.bsend_init(spec(buf, "Bsend_init").view, dest, tag))

    def Rsend_init(self, buf: Any, dest: int, tag: int = 0) -> Prequest:
        return Prequest(self._g.rsend_init(spec(buf, "Rsend_init").view, dest, tag))

    def Recv_init(self, buf: Any, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Prequest:
        """(each start's message must fill the buffer: meshrun's OutMismatchError
        otherwise)"""
        self._posting()
        return Prequest(self._g.recv_init(source, mesh_tag(tag),
                                          out=spec(buf, "Recv_init").view))

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
        msg = self._g.mprobe(source, mesh_tag(tag))
        fill(status, msg.status)
        return Message(msg, g=self._g)

    mprobe = Mprobe

    def Improbe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG,
                status: Status | None = None) -> Message | None:
        self._posting()
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
