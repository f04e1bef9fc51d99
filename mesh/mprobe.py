"""Matched probes (MPI's Mprobe, Improbe and Mrecv; mpi4py's ``comm.mprobe``,
``comm.improbe`` and ``Message.recv``/``irecv``).

A plain probe says what waits and leaves it for any receive, so two threads
that probe the same (source, tag) and then receive may each get the other's
message (sized for the wrong one: OutMismatchError). A matched probe takes
the message out of matching when it answers: it is a receive without
``out=`` posted through the inbox's ordinary tables (order per source and
tag, ANY_SOURCE, ANY_TAG, lost peers, timeouts and credit are a receive's),
whose value the returned ``Message`` keeps until its ``recv`` hands it over,
into ``out=`` when given. No other receive or probe sees it meanwhile.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from . import tensors
from .errors import MeshError, OutMismatchError
from .match import ANY, Pending, describe
from .payload import out_problem

if TYPE_CHECKING:
    from .comm import Comm, Request, Status

__all__ = ["Message", "mprobe", "improbe"]


class Message:
    """A message matched by ``Comm.mprobe``/``improbe``, kept for this handle
    alone: ``status`` (and its ``source``, ``tag``, ``count``, ``nbytes``,
    ``dtype``, ``shape``) says what it is; ``recv(out=None)`` or
    ``irecv(out=None)`` receives it, once. An ``out=`` it does not fit
    raises OutMismatchError and the message stays here for another try.
    From PROC_NULL (MPI's MESSAGE_NO_PROC): its receives give ``out=``
    untouched (or None) and PROC_NULL's status, as often as called."""

    __slots__ = ("_c", "_req", "_value", "_lock", "_received", "status")

    def __init__(self, comm: "Comm", req: Pending | None, value: Any) -> None:
        from .comm import Status, _null
        self._c, self._req, self._value = comm, req, value
        self._lock = threading.Lock()
        self._received = False
        self.status: Status = _null(Status()) if req is None else comm._fill(Status(), req)

    source = property(lambda self: self.status.source, doc="the sender's rank in the group")
    tag = property(lambda self: self.status.tag)
    nbytes = property(lambda self: self.status.nbytes)
    dtype = property(lambda self: self.status.dtype)
    shape = property(lambda self: self.status.shape)
    count = property(lambda self: self.status.count, doc="Status.count: elements (0, None)")

    @property
    def received(self) -> bool:
        """Whether a ``recv`` or ``irecv`` has taken the message."""
        return self._received

    def __repr__(self) -> str:
        st = self.status
        what = "nothing (PROC_NULL)" if self._req is None else (
            f"from rank {st.source}, tag {st.tag}, {st.nbytes} bytes"
            f"{'' if st.dtype is None else f', {st.dtype}{list(st.shape or ())}'}")
        return f"<Message {what}{', received' if self._received else ''}>"

    def recv(self, out: Any = None, status: "Status | None" = None) -> Any:
        """The message (MPI's Mrecv, mpi4py's ``Message.recv``/``Recv``):
        a new array or object, or written into ``out=`` (a writable
        C-contiguous numpy or device array or tensor of the message's dtype
        and element count), which is returned; ``status`` filled in."""
        from .comm import _check_status, _null
        c = self._c
        if status is not None:
            _check_status(status, c, "recv")
        if self._req is None:
            if out is not None:
                c._check_out(out, self._desc())
            if status is not None:
                _null(status)
            return out
        value = self._take(out).wait()
        if status is not None:
            c._fill(status, self._req)
        return value

    def irecv(self, out: Any = None) -> "Request":
        """``recv`` as a Request (MPI's Imrecv), done at once (the message is
        here): its ``wait()`` gives the value, or raises OutMismatchError
        where ``out=`` does not fit, the message then kept here."""
        from .comm import _Null
        if self._req is None:
            if out is not None:
                self._c._check_out(out, self._desc())
            return _Null(self._c, out)
        return self._take(out, True)

    def _take(self, out: Any, deferred: bool = False) -> "Request":
        """The receive's Request, done; the message handed over unless it
        does not fit ``out`` (raised here, or by its wait when ``deferred``)."""
        from .comm import Request
        c, req = self._c, self._req
        assert req is not None
        desc = self._desc()
        if out is not None:
            c._check_out(out, desc)
        target, view = None, out
        if out is not None and type(out) is not np.ndarray and tensors.is_tensor(out):
            target, view = out, tensors.out_view(out, f"rank {c._t.rank}: {describe(desc)}")
        src, tag, nbytes = req.got[0], req.got[1], req.got[2]
        into = Pending(req.group, req.src, req.tag, view, None, desc, target)
        with self._lock:
            if self._received:
                raise MeshError(f"rank {c._t.rank}: {describe(desc)}: this message was "
                                f"received already (a matched message is received once)")
            if out is None:
                into.got = req.got      # (its value as the mprobe's own wait delivered it)
                into.complete(self._value)
            else:
                problem = out_problem(view, req.value)
                if problem:
                    error = OutMismatchError(
                        f"rank {c._t.rank}: {describe(desc)}: the message from rank "
                        f"{self.status.source} (tag {tag}) does not fit out=: {problem}; it "
                        f"stays in this Message for a recv with a fitting out= (or none)")
                    if not deferred:
                        raise error
                    into.fail(error)
                    return Request(c, into)
                c._t.inbox.hand(into, src, tag, req.value, nbytes, req.device)
            self._received = True
            self._value = req.value = None     # (the handle no longer holds the message)
        return Request(c, into)

    def _desc(self) -> tuple:
        st, c = self.status, self._c
        world = c.ranks[st.source] if 0 <= st.source < c.size else st.source
        return c._desc("recv (matched) from", st.source, world, st.tag)


def mprobe(comm: "Comm", src: int, tag: int, timeout: float | None) -> Message:
    """Comm.mprobe: a receive without ``out=`` posted as any other, waited for."""
    t = comm._t
    wsrc = ANY if src == ANY else comm._world_rank(src, "probe")
    req = t.irecv(comm.gid, wsrc, tag, None, None, comm._desc("mprobe from", src, wsrc, tag),
                  False, True)
    value = t.wait(req, timeout)
    return Message(comm, req, value)


def improbe(comm: "Comm", src: int, tag: int) -> Message | None:
    """Comm.improbe: the message a receive posted now would take, taken out
    of the unexpected queue (what has come is read first, as iprobe does)."""
    t = comm._t
    wsrc = ANY if src == ANY else comm._world_rank(src, "iprobe")
    desc = comm._desc("improbe from", src, wsrc, tag)
    req = t.inbox.take_waiting(comm.gid, wsrc, tag, desc)
    if req is None:
        t.poke()
        req = t.inbox.take_waiting(comm.gid, wsrc, tag, desc, lost=True)
        if req is None:
            return None
    return Message(comm, req, t.wait(req, None))
