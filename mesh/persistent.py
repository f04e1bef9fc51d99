"""Persistent requests (MPI's Send_init, Ssend_init, Bsend_init, Rsend_init,
Recv_init, Start and Startall; mpi4py's ``comm.Send_init``, ``Recv_init``,
``Prequest.Start`` and ``Prequest.Startall``), for an exchange that repeats
each iteration (a halo exchange) set up once.

A ``Prequest`` keeps the operation's arguments (checked once, when it is
made) and each ``start()`` posts it as ``isend`` or ``irecv`` would (the
send modes' forms as ``issend``, ``ibsend`` and ``irsend``): the
same paths (rings, the direct path, streams, the socket), order per source
and tag, ``out=``, cancel, timeouts and lost peers are theirs. It is a
``Request`` whose wait, test, get_status, cancel and status are those of
the request its last start made, so ``mesh.waitall``, ``waitany`` and the
others take it as any. Between a start and the wait or test that gives its
result it is active; otherwise inactive, and then, by MPI's rule, its wait
returns None at once with an empty status (waitany skips it), and only an
inactive one may be started again. collectives.persistent makes them of
collectives too (``C.all_reduce_init`` and the rest: each start the
collective's async call).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

from .comm import (ANY, ANY_TAG, Comm, Request, Status, _a, _answered, _check_tag, _is_null,
                   _listed, _Null, _who)
from .errors import MeshError
from .match import describe
from .transport import SENT

__all__ = ["Prequest", "send_init", "recv_init", "startall"]

_starts = threading.Lock()      # a start's check that the request is inactive, and its mark


class Prequest(Request):
    """A persistent send or receive: ``start()`` posts it (or
    ``mesh.startall``), then ``wait()``/``test()`` or ``mesh.waitall``
    complete it as any request's; started again after that, as often
    as wanted. Its wait returns the received value (``out=`` when
    given; None for a send); inactive (never started, or completed
    since its last start), it returns None at once with an empty
    status (source ANY_SOURCE, tag ANY_TAG, 0 bytes)."""

    __slots__ = ("_inner", "_active", "_post", "_desc")

    def __init__(self, comm: Comm, post: Callable[[], Request], desc: tuple | str) -> None:
        super().__init__(comm, SENT)    # (none posted yet: inactive)
        self._inner: Request | None = None
        self._active = False
        self._spent = True      # (inactive: waitany skips it)
        self._post, self._desc = post, desc

    @property
    def active(self) -> bool:
        """Whether it was started and its result not given yet."""
        return self._active

    def __repr__(self) -> str:
        return (f"<Prequest {describe(self._desc)}"
                f"{', active' if self._active else ''}>")

    def start(self) -> None:
        """Post the operation (mpi4py's ``Prequest.Start``): a send
        sends ``buf``'s contents as they are now. An active one (started
        and not completed by a wait or test since) raises MeshError."""
        with _starts:
            if self._active:
                raise self._busy("start")
            self._active = True
        try:
            inner = self._post()
        except BaseException:
            self._active = False
            raise
        # (its item too: waitany drives the reading by the first live request's item)
        self._inner, self._item, self._spent = inner, inner._item, False

    def _busy(self, what: str) -> MeshError:
        return MeshError(f"rank {self._c._t.rank}: {what} of the persistent "
                         f"{describe(self._desc)}: it is active (started, and no wait or "
                         f"test has completed it since): complete it first (MPI's rule)")

    def _ended(self, inner: Request) -> None:
        """The wait or test gave ``inner``'s result (or error): inactive."""
        if inner._spent:
            self._spent, self._active = True, False

    def wait(self, timeout: float | None = None, status: Status | None = None) -> Any:
        inner = self._inner
        if not self._active or inner is None:
            _answered(self, timeout, status, _empty, "wait")
            self._spent = True
            return None
        try:
            return inner.wait(timeout, status)
        finally:
            self._ended(inner)

    def done(self) -> bool:
        inner = self._inner
        return not self._active or inner is None or inner.done()

    def get_status(self, status: Status | None = None) -> bool:
        inner = self._inner
        if not self._active or inner is None:
            _answered(self, None, status, _empty, "get_status")
            return True
        return inner.get_status(status)

    def cancel(self) -> bool:
        """Withdraw the active receive, or an ssend_init's message no
        receive has taken, as ``Request.cancel`` does (True: its wait then
        raises MeshError and makes it inactive, ready to start again);
        False for another send, an inactive one, or one a message matched
        already (or whose message was taken)."""
        inner = self._inner
        return self._active and inner is not None and inner.cancel()

    @property
    def status(self) -> Status | None:
        """What the last completed receive matched (None for sends and
        until one completed)."""
        inner = self._inner
        return None if inner is None else inner.status


def _empty(status: Status) -> None:
    """MPI's empty status, as a wait on an inactive request gives it."""
    status.source, status.tag, status.nbytes = ANY, ANY_TAG, 0
    status.dtype = status.shape = None


def send_init(comm: Comm, buf: Any, dst: int, tag: int, op: str = "send_init") -> Prequest:
    """Comm.send_init: ``isend(buf, dst, tag)`` at each start, its
    arguments checked now (a PROC_NULL ``dst``: each start does nothing);
    ``op`` the send mode's call, whose send each start makes instead:
    ``ssend_init`` an issend, ``bsend_init`` an ibsend (``buf`` copied at
    the start), ``rsend_init`` an irsend (isend). Its errors name ``op``."""
    tag = _check_tag(tag, comm, op)
    verb = "send to" if op == "send_init" else f"{op} to"
    if _is_null(dst):
        return Prequest(comm, lambda: comm.isend(buf, dst, tag), comm._desc(verb, dst, dst, tag))
    wdst = comm._world_rank(dst, op)
    dst = int(dst)      # (a numpy integer's value: isend's ring path takes ints)
    post: Callable[[], Request]
    if op == "ssend_init":
        post = lambda: Request(comm, comm._issend(buf, dst, tag, op))
    elif op == "bsend_init":
        post = lambda: comm._ibsend(buf, dst, tag, op)
    elif op == "rsend_init":
        post = lambda: comm._isend_as(buf, dst, tag, op)
    else:
        post = lambda: comm.isend(buf, dst, tag)
    return Prequest(comm, post, comm._desc(verb, dst, wdst, tag))


def recv_init(comm: Comm, src: int, tag: int, out: Any) -> Prequest:
    """Comm.recv_init: ``irecv(src, tag, out=out)`` at each start, its
    arguments (``out=`` too) checked now, its description made once."""
    tag = _check_tag(tag, comm, "recv_init", True)
    if _is_null(src):
        desc: tuple = comm._desc("recv from", src, src, tag)
        if out is not None:
            comm._check_out(out, desc)
        return Prequest(comm, lambda: _Null(comm, out), desc)
    wsrc = ANY if src == ANY else comm._world_rank(src, "recv_init")
    desc = comm._desc("recv from", src if src == ANY else int(src), wsrc, tag)
    if out is not None:
        comm._check_out(out, desc)
    t, gid = comm._t, comm.gid
    return Prequest(comm, lambda: Request(comm, t.irecv(gid, wsrc, tag, out, None, desc)), desc)


def startall(requests: Sequence[Request]) -> None:
    """mesh.startall (mpi4py's ``Prequest.Startall``): start each, in
    order; none is started when one is no persistent request, is listed
    twice or is active (raised naming it)."""
    reqs = _listed(requests, "startall")
    seen: set[int] = set()
    for i, r in enumerate(reqs):
        if not isinstance(r, Prequest):
            raise TypeError(f"{_who(reqs)}startall: requests[{i}] is {_a(r)}, not a persistent "
                            f"request (what send_init and recv_init return)")
        if id(r) in seen:
            raise MeshError(f"rank {r._c._t.rank}: startall: requests[{i}], the persistent "
                            f"{describe(r._desc)}, is listed twice (a request is started once "
                            f"until a wait or test completes it)")
        seen.add(id(r))
        if r._active:
            raise r._busy(f"startall (requests[{i}])")
    for r in reqs:
        assert isinstance(r, Prequest)
        r.start()
