"""Communicators: the public point-to-point API over a Transport.

The world and every sub-group are the same class; a group's ranks are local
(0..size-1) and its traffic carries the group's id, so it can never be
confused with the world's or another group's."""
from __future__ import annotations

import hashlib
import math
import numbers
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from . import device, tensors
from .errors import MeshTimeoutError
from .match import ANY, ANY_TAG, Pending, describe, got_fields
from .payload import delivered, out_unusable
from .transport import SENT, Outgoing, Transport

if TYPE_CHECKING:
    from .channel import CollectiveChannel
    from .mprobe import Message
    from .persistent import Prequest

__all__ = ["Comm", "Request", "Status", "ANY", "ANY_SOURCE", "ANY_TAG", "PROC_NULL"]

ANY_SOURCE = ANY
PROC_NULL = -2
"""MPI's null peer (its value in Open MPI and mpi4py): a send to it, or a
receive or probe from it, completes at once doing nothing; the receive
gives None (or its ``out=``, untouched) and a Status of source PROC_NULL,
tag ANY_TAG and 0 bytes. Grid.shift gives it at an edge that does not wrap."""


@dataclass
class Status:
    """What a receive or probe matched, as mpi4py's Status: the sender's rank
    in the communicator, the tag, the payload's bytes, and for arrays the
    dtype and shape the sender sent (None for msgpack objects). Pass one as
    ``status=`` to be filled in, or read ``Request.status``."""

    source: int = ANY
    tag: int = ANY_TAG
    nbytes: int = 0
    dtype: np.dtype | None = None
    shape: tuple[int, ...] | None = None

    @property
    def count(self) -> int | None:
        """mpi4py's ``Get_count(datatype)`` for the array's own dtype: its
        number of elements, to size a receive after a probe (0 from
        PROC_NULL); None for a msgpack object (its bytes: ``nbytes``)."""
        if self.shape is not None:
            return math.prod(self.shape)
        return 0 if self.source == PROC_NULL else None

_channel_lock = threading.Lock()


class Request:
    """An operation in flight: ``wait()`` returns its result (None for sends);
    ``cancel()`` withdraws a receive no message has matched yet."""

    __slots__ = ("_c", "_item", "_result", "_finished", "_spent")

    def __init__(self, comm: "Comm", item: Pending | Outgoing) -> None:
        self._c, self._item = comm, item
        self._finished = False
        self._spent = False      # a wait or test has returned its result or raised its error
        self._result: Any = None

    def wait(self, timeout: float | None = None, status: Status | None = None) -> Any:
        """The received value (None for a send); ``status``, when given, is
        filled in with what the receive matched."""
        if self._item is SENT:       # a send by ring: done when it returned (Transport.send_ring)
            if timeout is not None:
                _check_timeout(timeout, self._c, "wait")    # (a bad one raises, as elsewhere)
            self._spent = True
            return None
        if status is not None and isinstance(self._item, Pending):
            _check_status(status, self._c, "wait")
        if not self._finished:
            if timeout is not None:
                timeout = _check_timeout(timeout, self._c, "wait")
            try:
                self._result = self._c._t.wait(self._item, timeout)
            except BaseException:
                # its error is its result once it is done (a timeout that withdrew the
                # receive, a cancel, a lost peer); a send still queued is not done
                self._spent = self._spent or self.done()
                raise
            self._finished = True
        self._spent = True
        if status is not None and isinstance(self._item, Pending):
            self._c._fill(status, self._item)
        return self._result

    @property
    def status(self) -> Status | None:
        """What a completed receive matched; None for sends and until then."""
        item = self._item
        if isinstance(item, Outgoing) or item.got is None or not item.event.is_set():
            return None
        return self._c._fill(Status(), item)

    def done(self) -> bool:
        item = self._item
        if isinstance(item, Outgoing):
            # a send handed to a peer that has left is done too, as its wait ends:
            # returning if the peer's goodbye said it read it, else raising
            # LostPeerError: a direct send's answer never comes, nor does ZeroMQ let go
            # of frames for a stopped peer, and pyzmq's release of those it sent comes
            # late (a loop polling test() never ended, or waited for that release)
            return item.done() or self._c._t.lost_to(item)
        return item.event.is_set()

    def test(self, status: Status | None = None) -> tuple[bool, Any]:
        """mpi4py's ``Request.test``: ``(True, result)`` once done (as
        ``wait()`` returns it, or raises its error), else ``(False, None)``
        without waiting for it (what has come is read first, as MPI_Test
        does: a loop polling test() is answered in microseconds)."""
        if not self.get_status():
            return False, None
        return True, self.wait(status=status)

    def get_status(self, status: Status | None = None) -> bool:
        """mpi4py's ``Request.Get_status`` (MPI_Request_get_status): whether
        it is done, what has come read first as ``test()`` reads it, without
        taking its result (a later wait, test or waitany gives it);
        ``status``, when given and done, is filled in."""
        if status is not None and isinstance(self._item, Pending):
            _check_status(status, self._c, "get_status")
        if not self.done():
            self._c._t.poke()       # (what has come is read here, as MPI_Test does)
            if not self.done():
                return False
        if status is not None and isinstance(self._item, Pending):
            self._c._fill(status, self._item)
        return True

    def cancel(self) -> bool:
        """Withdraw a posted receive that no message has matched yet, like
        ``MPI_Cancel``: True, and then ``done()`` is True and ``wait()``
        raises MeshError; the message it would have taken goes to the next
        matching receive instead. False once a message matched it (its value
        is then what ``wait()`` returns), and always for sends: a send may
        already be on the wire and cannot be cancelled."""
        item = self._item
        return not isinstance(item, Outgoing) and self._c._t.cancel(item)


class _Sent(Request):
    """What ``isend`` returns for a send by ring (Transport.send_ring): done
    when it returned. Each send its own (waitany spends it), made as cheaply
    as a Python object is: a stream of 8-byte isends held in a list until
    waited for went at 0.53x raw pyzmq with ``Request(comm, SENT)`` each
    (its __init__, and the collector walking every live one), 0.74x with
    one Request shared by all."""

    __slots__ = ()
    _item, _finished, _result = SENT, True, None


_new = object.__new__


def _sent(comm: "Comm") -> Request:
    r = _new(_Sent)
    r._c, r._spent = comm, False
    return r


class _Null(Request):
    """What a receive from PROC_NULL gives (irecv): done at once, its value
    None or its ``out=`` (untouched), its status PROC_NULL's (_null)."""

    __slots__ = ()

    def __init__(self, comm: "Comm", out: Any) -> None:
        super().__init__(comm, SENT)
        self._finished, self._result = True, out

    def wait(self, timeout: float | None = None, status: Status | None = None) -> Any:
        _answered(self, timeout, status, _null, "wait")
        self._spent = True
        return self._result

    @property
    def status(self) -> Status | None:
        return _null(Status())

    def get_status(self, status: Status | None = None) -> bool:
        _answered(self, None, status, _null, "get_status")
        return True

    def cancel(self) -> bool:
        return False    # (done: MPI's Cancel of a completed request does nothing)


def _answered(req: Request, timeout: float | None, status: Status | None,
              fill: Callable[[Status], Any], what: str) -> None:
    """A ``what`` (wait, get_status) whose answer needs nothing: a
    PROC_NULL request's, an inactive persistent one's (mesh.persistent):
    its arguments checked, ``status`` filled by ``fill``."""
    if timeout is not None:
        _check_timeout(timeout, req._c, what)
    if status is not None:
        _check_status(status, req._c, what)
        fill(status)


def _copy_status(st: Status, into: Status) -> None:
    into.source, into.tag, into.nbytes, into.dtype, into.shape = \
        st.source, st.tag, st.nbytes, st.dtype, st.shape


def _null(status: Status) -> Status:
    """``status`` as MPI fills it for a receive or probe from PROC_NULL."""
    status.source, status.tag, status.nbytes = PROC_NULL, ANY_TAG, 0
    status.dtype = status.shape = None
    return status


def _is_null(r: Any) -> bool:
    """Whether the rank ``r`` is PROC_NULL (a numpy integer's too)."""
    return (type(r) is int or isinstance(r, np.integer)) and r == PROC_NULL


def group_rank_hint(comm: "Comm", r: Any) -> str:
    """For a rank given outside a sub-group's numbering that is a world rank
    of one of its members: "a group numbers its own ranks: world rank 3 is
    its rank 1" (else ""), for errors of calls that take a rank."""
    if not (comm.gid and isinstance(r, (int, np.integer)) and r in comm.ranks):
        return ""
    return (f"a group numbers its own ranks: world rank {r} is its rank "
            f"{comm.ranks.index(int(r))}")


def _listed(requests: Any, what: str) -> list[Request]:
    """``requests`` as a list, or TypeError naming the rank and ``what``
    (mesh.waitall...) for one given a Request itself (it was "'_Sent'
    object is not iterable") or anything that is no request (an array:
    "'numpy.ndarray' object has no attribute 'wait'")."""
    if isinstance(requests, Request) or not hasattr(requests, "__iter__"):
        given = "one request" if isinstance(requests, Request) else _a(requests)
        raise TypeError(f"{_who(requests)}{what} takes a list of requests (those isend and "
                        f"irecv return), not {given}: give [req], or wait for one alone "
                        f"with req.wait()")
    reqs = list(requests)
    for i, r in enumerate(reqs):
        if not isinstance(r, Request):
            raise TypeError(f"{_who(reqs)}{what}: requests[{i}] is {_a(r)}, not a request "
                            f"(what isend and irecv return)")
    return reqs


def _a(x: Any) -> str:
    """"a list", "an int": x's type named with its article."""
    name = type(x).__name__
    return f"{'an' if name[:1] in 'aeiouAEIOU' else 'a'} {name}"


def _who(requests: Any) -> str:
    """"rank R: " for an error about a call's requests: the rank of the first
    one's communicator, else of this process's mesh (or "")."""
    if isinstance(requests, Request):
        return f"rank {requests._c._t.rank}: "
    for r in requests if isinstance(requests, list) else ():
        if isinstance(r, Request):
            return f"rank {r._c._t.rank}: "
    from .world import rank_said
    return rank_said()


def waitall(requests: Sequence[Request], timeout: float | None = None) -> list[Any]:
    """Wait for every request; their results in order (None for sends).
    ``timeout`` bounds the whole wait; the first request that fails raises
    (the others stay waitable)."""
    reqs = _listed(requests, "waitall")
    if timeout is None or not reqs:
        return [r.wait() for r in reqs]
    deadline = time.monotonic() + _check_timeout(timeout, reqs[0]._c, "waitall")
    return [r.wait(timeout=max(0.0, deadline - time.monotonic())) for r in reqs]


def testall(requests: Sequence[Request]) -> tuple[bool, list[Any] | None]:
    """mpi4py's ``Request.testall``: ``(True, results)``, as ``waitall``
    gives them, once every request is done, else ``(False, None)`` at once
    with none of them taken (a later wait, test or waitall gives them);
    what has come is read first, as ``test()`` reads it."""
    reqs = _listed(requests, "testall")
    if all(r.get_status() for r in reqs):
        return True, [r.wait() for r in reqs]
    return False, None


def waitany(requests: Sequence[Request], timeout: float | None = None) -> tuple[int, Any]:
    """Wait until one of ``requests`` is done: ``(its index, its result)``
    (the lowest index among those done). As in mpi4py, where a completed
    request becomes MPI.REQUEST_NULL, a request whose result (or error) a
    wait, test or waitany has given already is skipped, so that calling
    it again on the same list gives the next one, never the same message
    twice; ValueError when every request is spent so. The caller reads the
    socket while it waits, as a blocked receive does (it napped, leaving
    that to the progress thread: an 8-byte round trip through waitany took
    100 us, through wait 14); MeshTimeoutError after ``timeout`` seconds
    (default: the mesh's), naming what it waited for."""
    return _waitany(_listed(requests, "waitany"), timeout, "waitany")


def _waitany(reqs: list[Request], timeout: float | None, what: str) -> tuple[int, Any]:
    if not reqs:
        from .world import rank_said    # (no request to say whose call it is)
        gives = {"waitany": "(MPI.UNDEFINED, None)",
                 "testany": "(MPI.UNDEFINED, True, None)"}.get(what, "(None, None)")
        raise ValueError(f"{rank_said()}{what}: no requests "
                         f"(an empty list; mpi4py's {what} returns {gives} "
                         f"for one, meshrun raises, as once every request was waited for)")
    c = reqs[0]._c
    limit = c._t.timeout if timeout is None else _check_timeout(timeout, c, what)
    live = [(i, r) for i, r in enumerate(reqs) if not r._spent]
    if not live:
        raise ValueError(f"rank {c._t.rank}: {what}: each of the {len(reqs)} requests was "
                         f"waited for already (its result given by wait, test or waitany)")
    deadline = time.monotonic() + limit
    anyone = _AnyDone([r for _, r in live])
    nap = 1e-5
    looked = False
    while True:
        for i, r in live:
            if r.done() and _claim(r):
                return i, r.wait()
        if any(r._spent for _, r in live):
            # another thread's waitany (or wait) on the same requests took these: left
            # in, each was given twice (both threads saw it done before either waited)
            live = [(i, r) for i, r in live if not r._spent]
            if not live:
                raise ValueError(f"rank {c._t.rank}: {what}: each of the {len(reqs)} "
                                 f"requests was waited for already (its result given by "
                                 f"wait, test or waitany)")
            anyone = _AnyDone([r for _, r in live])
        now = time.monotonic()
        if now >= deadline and not looked:
            # one look at what has come before timing out, as recv(timeout=0) takes: a
            # loop polling waitany(timeout=0) saw a message a switch interval late (15 ms)
            looked = True
            c._t.poke()
            continue
        if now >= deadline:
            waits = [r._item.described(c._t.inbox.peers) for _, r in live[:4]]
            more = f" and {len(live) - 4} more" if len(live) > 4 else ""
            late = MeshTimeoutError(f"rank {c._t.rank}: {what} on {len(live)} requests timed "
                                    f"out after {limit:g}s, none done: {'; '.join(waits)}{more}")
            late.none_done = True   # type: ignore[attr-defined]  # (not a request's own error)
            raise late
        try:
            c._t._drive(live[0][1]._item, deadline, deadline - now, anyone)
        except Exception:
            if not c._t.inbox.closed:   # (a forked child's refusal: it waited out its timeout)
                raise
            time.sleep(nap)     # (the mesh closed under it: each request fails on its own)
            nap = min(nap * 2, 2e-3)


def waitsome(requests: Sequence[Request],
             timeout: float | None = None) -> tuple[list[int], list[Any]]:
    """mpi4py's ``Request.waitsome``: wait as ``waitany`` does until one of
    ``requests`` is done, then give it and every other one done by then:
    ``(indices, results)``, in index order. Each is spent as by waitany (a
    later call gives the next ones); one done with an error (a lost peer, a
    cancelled receive) is left out for the next call, which raises it, as
    waitany raises for the first it finds. ValueError once every request is
    spent (mpi4py returns ``(None, None)``)."""
    reqs = _listed(requests, "waitsome")
    i, x = _waitany(reqs, timeout, "waitsome")
    return _and_done(reqs, i, x)


def testany(requests: Sequence[Request]) -> tuple[int | None, bool, Any]:
    """mpi4py's ``Request.testany``: ``(index, True, result)`` of a request
    done and not spent (as ``waitany`` gives it, spending it), else
    ``(None, False, None)`` at once, what has come read first as ``test()``
    reads it. ValueError once every request is spent, as waitany."""
    return _testany(_listed(requests, "testany"), "testany")


def _testany(reqs: list[Request], what: str) -> tuple[int | None, bool, Any]:
    try:
        i, x = _waitany(reqs, 0, what)
    except MeshTimeoutError as e:
        if not getattr(e, "none_done", False):
            raise       # (a request's own error, given as waitany gives it)
        return None, False, None
    return i, True, x


def testsome(requests: Sequence[Request]) -> tuple[list[int], list[Any]]:
    """mpi4py's ``Request.testsome``: as ``waitsome``, but ``([], [])`` at
    once when none is done."""
    reqs = _listed(requests, "testsome")
    i, ok, x = _testany(reqs, "testsome")
    return _and_done(reqs, i, x) if ok and i is not None else ([], [])


def _and_done(reqs: list[Request], first: int, value: Any) -> tuple[list[int], list[Any]]:
    """``first`` (given by waitany) and every other request of ``reqs`` done
    with a value by now, each spent: (indices, results) in index order."""
    got = {first: value}
    for j, r in enumerate(reqs):
        if j != first and not r._spent and _valued(r) and _claim(r):
            got[j] = r.wait()
    order = sorted(got)
    return order, [got[k] for k in order]


def _valued(r: Request) -> bool:
    """Whether ``r`` is done and its wait returns a value (not an error)."""
    item = r._item
    if item is SENT:
        return True
    if isinstance(item, Outgoing):
        t = r._c._t     # (a send to a peer that left: its wait returns if it read it)
        return item.error is None and (item.done() or t.lost_to(item)
                                       and t.read_before_leaving(item))
    return item.event.is_set() and item.error is None


_claims = threading.Lock()


def _claim(r: Request) -> bool:
    """Whether this waitany may give ``r``'s result: True once only, so that
    threads calling waitany on one list never both give one message."""
    with _claims:
        if r._spent:
            return False
        r._spent = True
        return True


class _AnyDone:
    """Set once any of ``reqs`` is done: the flag ``waitany`` drives the
    reading until (mesh.progress.Progress.drive)."""

    __slots__ = ("reqs",)

    def __init__(self, reqs: list[Request]) -> None:
        self.reqs = reqs

    def is_set(self) -> bool:
        return any(r.done() for r in self.reqs)

    def wait(self, timeout: float) -> bool:
        """Another thread reads (it completes these too): look again soon."""
        end = time.monotonic() + timeout
        while not self.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, 5e-5))
        return True


class Comm:
    """A communicator: ``rank``/``size`` within it, and send/recv by local rank."""

    def __init__(self, transport: Transport, ranks: Sequence[int], gid: int, name: str) -> None:
        self._t = transport
        self.ranks = list(ranks)
        self.size = len(self.ranks)
        self.rank = self.ranks.index(transport.rank)
        self.gid = gid
        self.name = name
        self._channel: CollectiveChannel | None = None
        self._children: dict[tuple[int, ...], int] = {}
        self._splits = 0     # split() calls made (collective: the same count on every rank)
        transport.groups[gid] = (name, self.ranks)
        if gid:     # dropped, it is forgotten (Transport.sweep); the world lives as the mesh
            transport.sweep()
            transport.comms.setdefault(gid, weakref.WeakSet()).add(self)
            weakref.finalize(self, transport.dropped.append, gid)

    @property
    def timeout(self) -> float:
        """The default timeout (s) of this communicator's blocking operations."""
        return self._t.timeout

    def __repr__(self) -> str:
        return f"<Comm {self.name} rank {self.rank}/{self.size}>"

    # -- public point-to-point ---------------------------------------------------

    def send(self, obj: Any, dst: int, tag: int = 0, timeout: float | None = None) -> None:
        """Blocking send; returns when ``obj``'s buffer may be reused."""
        t = self._t
        if timeout is not None:
            timeout = _check_timeout(timeout, self, "send")
        if type(dst) is int and 0 <= dst < self.size and type(tag) is int and 0 <= tag < ANY_TAG:
            if type(obj) is np.ndarray:
                if t.send_ring(self.ranks[dst], self.gid, tag, obj) is not None:
                    return
            elif self._ring_tensor(obj, dst, tag):
                return
        tag = _check_tag(tag, self, "send")
        if _is_null(dst):
            return
        wdst = self._world_rank(dst, "send")
        t.wait(t.isend(wdst, self.gid, tag, obj, None, self._desc("send to", dst, wdst, tag)),
               timeout, True)

    def recv(self, src: int = ANY, tag: int = 0, out: Any = None, timeout: float | None = None,
             status: Status | None = None) -> Any:
        """Blocking receive from ``src`` (or ANY) of ``tag`` (or ANY_TAG), into
        ``out=`` when given; ``status`` is filled in with what it matched."""
        t = self._t
        if timeout is not None:
            timeout = _check_timeout(timeout, self, "recv")
        if status is not None:
            _check_status(status, self, "recv")
        if (type(src) is int and 0 <= src < self.size and type(tag) is int and 0 <= tag < ANY_TAG
                and (out is None or type(out) is np.ndarray)):     # (read-only, strided: below)
            got = t.recv_ring(self.gid, self.ranks[src], tag, out, timeout)
            if got is not None:        # from a same-host ring, by this thread
                if status is not None:
                    self._status(status, got[1])
                bits = got[1].device        # a torch tensor's message: a tensor (no out=)
                return got[0] if out is not None or not bits else delivered(got[0], bits)
        tag = _check_tag(tag, self, "recv", True)
        if _is_null(src):
            if status is not None:
                _null(status)
            return out
        wsrc = ANY if src == ANY else self._world_rank(src, "recv")
        desc = self._desc("recv from", src, wsrc, tag)
        if out is not None and not (type(out) is np.ndarray and (f := out.flags).c_contiguous
                                    and f.writeable):
            self._check_out(out, desc)
        req = t.irecv(self.gid, wsrc, tag, out, None, desc, False, True)
        value = t.wait(req, timeout)
        if status is not None:
            self._fill(status, req)
        return value

    def isend(self, obj: Any, dst: int, tag: int = 0) -> Request:
        if type(dst) is int and 0 <= dst < self.size and type(tag) is int and 0 <= tag < ANY_TAG:
            if type(obj) is np.ndarray:
                if self._t.send_ring(self.ranks[dst], self.gid, tag, obj) is not None:
                    return _sent(self)      # done already
            elif self._ring_tensor(obj, dst, tag):
                return _sent(self)
        tag = _check_tag(tag, self, "isend")
        if _is_null(dst):
            return _sent(self)      # done: nothing to send
        return self._isend(obj, dst, tag)

    def ssend(self, obj: Any, dst: int, tag: int = 0, timeout: float | None = None) -> None:
        """MPI's synchronous send (mpi4py's ``ssend``/``Ssend``): ``send``,
        returning only once a receive of ``dst`` (a ``recv``, ``irecv``,
        ``mprobe``, from ``dst``'s rank or ANY_SOURCE) has taken the
        message; its buffer may be reused then too. MeshTimeoutError after
        ``timeout`` (the message stays for a later receive), LostPeerError
        when ``dst`` leaves without taking it."""
        tag = _check_tag(tag, self, "ssend")
        if timeout is not None:
            timeout = _check_timeout(timeout, self, "ssend")
        if _is_null(dst):
            return
        t = self._t
        t.wait(self._issend(obj, dst, tag), timeout, True)

    def issend(self, obj: Any, dst: int, tag: int = 0) -> Request:
        """``ssend`` as a request (MPI's Issend): its ``wait``, ``test`` and
        ``done`` complete once a receive of ``dst`` has taken the message."""
        tag = _check_tag(tag, self, "issend")
        if _is_null(dst):
            return _sent(self)
        return Request(self, self._issend(obj, dst, tag))

    def _issend(self, obj: Any, dst: int, tag: int) -> Outgoing:
        wdst = self._world_rank(dst, "ssend")
        desc = self._desc("ssend to", dst, wdst, tag)
        if type(obj) is np.ndarray and wdst != self._t.rank:
            out = self._t.ssend_ring(wdst, self.gid, tag, obj, desc)
            if out is not None:
                return out
        return self._t.isend(wdst, self.gid, tag, obj, None, desc, True)

    def bsend(self, obj: Any, dst: int, tag: int = 0) -> None:
        """MPI's buffered send (mpi4py's ``bsend``/``Bsend``): returns at once,
        the message copied (no ``Attach_buffer``: each copy is its own, held
        until it has gone); sent as ``isend`` sends the copy. An error of
        the send (a lost peer) is not reported: use ``ibsend`` to see it."""
        self.ibsend(obj, dst, tag)

    def ibsend(self, obj: Any, dst: int, tag: int = 0) -> Request:
        """``bsend`` giving the copy's ``isend`` request: ``obj`` may be
        reused at once; its ``wait`` returns once the copy is handed over
        (or raises the send's error)."""
        tag = _check_tag(tag, self, "ibsend")
        if _is_null(dst):
            return _sent(self)
        return self.isend(_copied(obj), dst, tag)

    rsend = send
    """MPI's ready send (mpi4py's ``rsend``/``Rsend``, which requires the
    receive to be posted already): ``send``, which is correct for it."""
    irsend = isend
    """MPI's Irsend: ``isend``."""

    def _ring_tensor(self, obj: Any, dst: int, tag: int) -> bool:
        """Send a plain CPU torch tensor by ring (as a numpy array is, its
        header flagged so the receiver gets a tensor); False: the usual way."""
        if not tensors.is_tensor(obj):
            return False
        view = tensors.plain_view(obj)
        return view is not None and self._t.send_ring(self.ranks[dst], self.gid, tag, view[0],
                                                      view[1]) is not None

    def irecv(self, src: int = ANY, tag: int = 0, out: Any = None) -> Request:
        tag = _check_tag(tag, self, "irecv", True)
        if _is_null(src):
            return _Null(self, out)
        return Request(self, self._post_recv(src, tag, out, "recv from"))

    def send_init(self, buf: Any, dst: int, tag: int = 0) -> "Prequest":
        """MPI's Send_init (mpi4py's ``comm.Send_init``): a persistent send,
        set up once; each ``start()`` (or ``mesh.startall``) sends ``buf``'s
        contents as they are then, as ``isend`` (mesh.persistent)."""
        from .persistent import send_init
        return send_init(self, buf, dst, tag)

    def recv_init(self, src: int = ANY, tag: int = 0, out: Any = None) -> "Prequest":
        """MPI's Recv_init: a persistent receive into ``out=``; each
        ``start()`` posts it as ``irecv`` (mesh.persistent)."""
        from .persistent import recv_init
        return recv_init(self, src, tag, out)

    def sendrecv(self, obj: Any, dst: int, src: int = ANY, sendtag: int = 0,
                 recvtag: int = ANY_TAG, out: Any = None, timeout: float | None = None,
                 status: Status | None = None) -> Any:
        """Send ``obj`` to ``dst`` and receive from ``src``, as one call: the
        receive is posted before the send, so ranks exchanging with each
        other never deadlock. ``timeout`` bounds the whole call; if the send
        fails, the receive is withdrawn (unless a message matched it)."""
        sendtag = _check_tag(sendtag, self, "sendrecv")
        recvtag = _check_tag(recvtag, self, "sendrecv", True)
        if timeout is not None:
            timeout = _check_timeout(timeout, self, "sendrecv")
        if status is not None:
            _check_status(status, self, "sendrecv")
        t = self._t
        deadline = time.monotonic() + (t.timeout if timeout is None else timeout)
        if out is not None and _overlap(obj, out):
            # MPI's Sendrecv_replace: the send reads obj after the receive is posted (a
            # ring copy, the peer's direct read, zero-copy socket frames), and the message
            # coming into out= meanwhile would be sent back in part; send a copy instead
            obj = obj.detach().clone() if tensors.is_tensor(obj) else obj.copy()
        req = None if _is_null(src) else self._post_recv(src, recvtag, out, "sendrecv from")
        try:
            if not _is_null(dst):
                wdst = self._world_rank(dst, "sendrecv")
                t.wait(t.isend(wdst, self.gid, sendtag, obj, None,
                               self._desc("sendrecv to", dst, wdst, sendtag)), timeout, True)
        except BaseException:
            if req is not None:
                t.cancel(req)
            raise
        if req is None:     # (from PROC_NULL: out=, untouched, or None)
            if status is not None:
                _null(status)
            return out
        value = t.wait(req, max(0.0, deadline - time.monotonic()))
        if status is not None:
            self._fill(status, req)
        return value

    def probe(self, src: int = ANY, tag: int = ANY_TAG, timeout: float | None = None) -> Status:
        """Block until a message from ``src`` with ``tag`` is waiting, and say
        what it is, without receiving it: the next receive that matches it
        (and has a fitting ``out=``, or none) takes it."""
        tag = _check_tag(tag, self, "probe", True)
        if timeout is not None:
            timeout = _check_timeout(timeout, self, "probe")
        if _is_null(src):
            return _null(Status())
        wsrc = ANY if src == ANY else self._world_rank(src, "probe")
        req = self._t.irecv(self.gid, wsrc, tag, None, None, self._desc("probe", src, wsrc, tag),
                            True, True)
        self._t.wait(req, timeout)
        return self._fill(Status(), req)

    def iprobe(self, src: int = ANY, tag: int = ANY_TAG) -> Status | None:
        """probe without blocking: the waiting message's Status, or None
        (what has come is read first, as MPI_Iprobe does)."""
        tag = _check_tag(tag, self, "iprobe", True)
        if _is_null(src):
            return _null(Status())      # (as MPI_Iprobe: flag true, the null status)
        wsrc = ANY if src == ANY else self._world_rank(src, "iprobe")
        got = self._t.iprobe(self.gid, wsrc, tag)
        if got is None:
            self._t.poke()      # (what has come is read here, as MPI_Iprobe does)
            got = self._t.iprobe(self.gid, wsrc, tag)
        return None if got is None else self._status(Status(), got)

    def mprobe(self, src: int = ANY, tag: int = ANY_TAG, timeout: float | None = None,
               status: Status | None = None) -> "Message":
        """MPI's Mprobe (mpi4py's ``comm.mprobe``): block until a message from
        ``src`` with ``tag`` comes and take it out of matching: no other
        receive or probe sees it; the returned Message says what it is and
        its ``recv(out=None)``/``irecv`` receives it (mesh.mprobe)."""
        from .mprobe import Message, mprobe
        tag = _check_tag(tag, self, "mprobe", True)
        if timeout is not None:
            timeout = _check_timeout(timeout, self, "mprobe")
        if status is not None:
            _check_status(status, self, "mprobe")
        msg = Message(self, None, None) if _is_null(src) else mprobe(self, src, tag, timeout)
        if status is not None:
            _copy_status(msg.status, status)
        return msg

    def improbe(self, src: int = ANY, tag: int = ANY_TAG,
                status: Status | None = None) -> "Message | None":
        """mprobe without blocking (MPI's Improbe): the waiting message,
        taken out of matching, or None (what has come is read first)."""
        from .mprobe import Message, improbe
        tag = _check_tag(tag, self, "improbe", True)
        if status is not None:
            _check_status(status, self, "improbe")
        msg = Message(self, None, None) if _is_null(src) else improbe(self, src, tag)
        if msg is not None and status is not None:
            _copy_status(msg.status, status)
        return msg

    # -- internal: the collectives' side (mesh.channel) -----------------------------

    def collective_channel(self) -> CollectiveChannel:
        """The interface collectives use (mesh.channel): collective tags,
        fingerprinted messages, aborts. One per communicator, made on first use."""
        if self._channel is None:
            with _channel_lock:
                if self._channel is None:
                    from .channel import CollectiveChannel
                    self._channel = CollectiveChannel(self, self._t)
        return self._channel

    def _isend(self, obj: Any, dst: int, tag: int, fp: Any = None,
               what: str | None = None) -> Request:
        wdst = self._world_rank(dst, "send")
        desc = self._desc("send to", dst, wdst, tag, what)
        return Request(self, self._t.isend(wdst, self.gid, tag, obj, fp, desc))

    def _irecv(self, src: int, tag: int, out: np.ndarray | None = None, fp: Any = None,
               what: str | None = None) -> Request:
        wsrc = ANY if src == ANY else self._world_rank(src, "recv")
        desc = self._desc("recv from", src, wsrc, tag, what)
        return Request(self, self._t.irecv(self.gid, wsrc, tag, out, fp, desc))

    def _post_recv(self, src: int, tag: int, out: Any, verb: str) -> Pending:
        """Post a user receive (``out=`` checked first, see _check_out)."""
        wsrc = ANY if src == ANY else self._world_rank(src, "recv")
        desc = self._desc(verb, src, wsrc, tag)
        if out is not None:
            self._check_out(out, desc)
        return self._t.irecv(self.gid, wsrc, tag, out, None, desc)

    def _check_out(self, out: Any, desc: tuple) -> None:
        """An ``out=`` no message could be written into (not an array,
        read-only, not C-contiguous) raises ValueError before anything is posted."""
        why = out_unusable(out)
        if why:
            raise ValueError(f"rank {self._t.rank}: {describe(desc)}: {why}")

    def _fill(self, status: Status, item: Pending) -> Status:
        return self._status(status, item.got) if item.got is not None else status

    def _status(self, status: Status, got: Any) -> Status:
        src, status.tag, status.nbytes, status.dtype, status.shape = got_fields(got)
        status.source = src if self.gid == 0 else self.ranks.index(src)
        return status

    def _desc(self, verb: str, peer: int, world: int, tag: int, what: str | None = None) -> tuple:
        """The parts of an operation's description (mesh.match.describe):
        the peer's world rank too in a sub-group, and the collective
        ``what`` a message belongs to."""
        if what is not None:
            return (verb, peer, tag, self.name, world if self.gid else None, what)
        if self.gid:
            return (verb, peer, tag, self.name, world)
        return (verb, peer, tag, self.name)

    def _world_rank(self, r: int, op: str) -> int:
        if type(r) is int and 0 <= r < self.size:
            return self.ranks[r]
        way = "from" if op in ("recv", "probe", "iprobe", "recv_init") else "to"
        if not isinstance(r, (int, np.integer)) or isinstance(r, (bool, np.bool_)):
            raise ValueError(f"rank {self._t.rank}: {op} {way} rank {r!r}: a rank is an int "
                             f"(group {self.name} has ranks 0..{self.size - 1}), not "
                             f"{type(r).__name__}")
        if not 0 <= r < self.size:
            hint = group_rank_hint(self, r)
            raise ValueError(f"rank {self._t.rank}: {op} {way} rank {r!r}: group {self.name} "
                             f"has ranks 0..{self.size - 1}{f' ({hint})' if hint else ''}")
        return self.ranks[int(r)]

    # -- groups ------------------------------------------------------------------

    def group(self, ranks: Sequence[int]) -> "Comm | None":
        """A sub-communicator of ``ranks`` (local to this one). Members get it,
        other ranks get None. Members must create groups of the same ranks in
        the same order, so the group's id agrees without any message."""
        try:
            given: list[Any] = list(ranks)
        except TypeError:
            given = [None]          # (one rank alone is not a list of them: refused below)
        if not all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) for r in given):
            raise TypeError(f"rank {self._t.rank}: group({ranks!r}) of group {self.name}: ranks "
                            f"is a list of ints in 0..{self.size - 1}")   # (int() takes 1.7, "1")
        ranks = [int(r) for r in given]
        if len(set(ranks)) != len(ranks) or not all(0 <= r < self.size for r in ranks):
            raise ValueError(f"rank {self._t.rank}: group({ranks}) of group {self.name}: ranks "
                             f"must be distinct and in 0..{self.size - 1}")
        key = tuple(ranks)
        n = self._children.get(key, 0)
        self._children[key] = n + 1
        if self.rank not in ranks:
            return None
        return self._sub((key, n), ranks, f"{self.name}/{list(ranks)}" + (f"#{n}" if n else ""))

    def dup(self) -> "Comm":
        """MPI's ``Comm_dup``: a communicator of the same ranks, numbered
        alike, whose traffic (messages and collectives) never mixes with
        this one's or another dup's. It is ``group(range(size))`` (no
        message): every rank calls it, in the same order among its groups
        of this communicator."""
        sub = self.group(range(self.size))
        assert sub is not None
        return sub

    def split(self, color: int | None, key: int = 0,
              timeout: float | None = None) -> "Comm | None":
        """MPI's ``Comm_split``, a collective over this communicator: the
        ranks that pass the same ``color`` (an int >= 0) form one new
        communicator, ranked by ``key`` and then by their rank here; a rank
        that passes None joins none and gets None. Every rank of this one
        calls it, in the same order among its collectives (the colors and
        keys travel by one all_gather, which raises as collectives do: a
        lost peer, a timeout, a rank that called another collective)."""
        def whole(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool) \
                and bool(-2**62 <= v < 2**62)
        bad = None
        for what, ok, v in (("color", color is None or whole(color) and color >= 0, color),
                            ("key", whole(key), key)):
            if not ok and bad is None:
                bad = ValueError(f"rank {self._t.rank}: split on group {self.name}: {what} must "
                                 f"be an int{' >= 0 or None' if what == 'color' else ''}, "
                                 f"got {v!r}")
        import collectives     # the exchange is a collective (mesh does not import them)
        # (a rank's bad color goes as -2, so that every rank raises, none waits for it)
        mine = np.array([-2, 0] if bad else [-1 if color is None else color, key], np.int64)
        table = collectives.all_gather(self, mine, timeout=timeout)
        n = self._splits
        self._splits += 1
        if bad is not None:
            raise bad
        wrong = [self.ranks[r] for r, (c, _) in enumerate(table) if c == -2]   # (world ranks)
        if wrong:
            raise ValueError(f"rank {self._t.rank}: split on group {self.name}: the color or key "
                             f"of rank(s) {wrong} is not valid (see their error)")
        if color is None:
            return None
        ranks = [r for _, r in sorted((int(k), r) for r, (c, k) in enumerate(table) if c == color)]
        return self._sub(("split", n, int(color)), ranks, f"{self.name}/split{n}:{color}")

    def split_host(self, key: int = 0, timeout: float | None = None) -> "Comm":
        """The ranks of this communicator that share this rank's host, as
        MPI's ``Comm_split_type(COMM_TYPE_SHARED)``: ``split`` with the
        host (the rendezvous table's host id) as the color; collective."""
        hosts = [self._t.hosts[w] for w in self.ranks]
        color = hosts.index(hosts[self.rank])      # each host by its first rank here
        sub = self.split(color, key, timeout)
        assert sub is not None
        return sub

    def _sub(self, ident: tuple, ranks: Sequence[int], name: str) -> "Comm":
        """The sub-communicator of local ``ranks`` named ``ident``, which its
        members agree on: its id hashes this one's and ``ident``."""
        digest = hashlib.blake2b(repr((self.gid, *ident)).encode(), digest_size=8).digest()
        gid = int.from_bytes(digest, "little") >> 1 or 1
        return Comm(self._t, [self.ranks[r] for r in ranks], gid, name)


def _span(x: Any) -> tuple[int, int] | None:
    """The bytes [start, end) of host memory that ``x`` (a numpy array, a
    dense CPU tensor, views and lazy conjugates included) lies within; None
    for anything else (a device array goes as a copy made at once) or no
    elements."""
    try:
        if isinstance(x, np.ndarray):
            at, shape, strides, size = x.ctypes.data, x.shape, x.strides, x.itemsize
        elif tensors.is_tensor(x) and x.is_cpu:
            size = x.element_size()
            at, shape, strides = x.data_ptr(), x.shape, tuple(k * size for k in x.stride())
        else:
            return None
    except (RuntimeError, NotImplementedError):      # (a sparse tensor has no strides)
        return None
    if 0 in shape:
        return None
    return (at + sum((n - 1) * k for n, k in zip(shape, strides) if k < 0),
            at + sum((n - 1) * k for n, k in zip(shape, strides) if k > 0) + size)


def _copied(obj: Any) -> Any:
    """What ``bsend`` sends: a copy of ``obj``'s host memory (a numpy array's,
    a CPU tensor's, a DLPack object's), which the send may read after the
    call returns. A device array is copied to the host as its send starts,
    and an object encoded: they go as they are."""
    if isinstance(obj, np.ndarray):
        return obj.copy()       # (a subclass stays one: a masked array is refused as ever)
    if tensors.is_tensor(obj):
        return obj.detach().clone()
    if hasattr(obj, "__dlpack__") and not device.is_device(obj):
        try:
            return np.from_dlpack(obj).copy()
        except (RuntimeError, BufferError, TypeError):
            return obj          # (the send refuses it, saying why)
    return obj


def _overlap(obj: Any, out: Any) -> bool:
    """Whether a send of ``obj`` may read memory that a receive into ``out`` writes."""
    a, b = _span(obj), _span(out)
    return a is not None and b is not None and a[0] < b[1] and b[0] < a[1]


def _check_tag(tag: int, comm: Comm, op: str, any_tag: bool = False) -> int:
    """A user tag is 0..2**63-1 (int64 on the wire; negative ones are the
    collectives'); receives and probes may also ask for ANY_TAG. Returns it
    as a Python int (a numpy integer's value); True and False are no tags."""
    if type(tag) is int and 0 <= tag < ANY_TAG:
        return tag
    if isinstance(tag, (int, np.integer)) and not isinstance(tag, (bool, np.bool_)) and (
            0 <= tag < ANY_TAG or (any_tag and tag == ANY_TAG)):
        return int(tag)
    extra = " or mesh.ANY_TAG" if any_tag else ""
    raise ValueError(f"rank {comm._t.rank}: {op} on group {comm.name}: tag must be an integer "
                     f">= 0 (and < 2**63){extra}, got {tag!r}")


def _check_timeout(timeout: Any, comm: Comm, op: str) -> float:
    """A blocking call's ``timeout=``: seconds >= 0 (math.inf: no limit but
    the mesh's own), as a float; anything else is the caller's error."""
    if type(timeout) is float and timeout >= 0 or type(timeout) is int and timeout >= 0:
        return min(float(timeout), _FOREVER)
    if isinstance(timeout, numbers.Real) and not isinstance(timeout, bool) \
            and float(timeout) >= 0:
        return min(float(timeout), _FOREVER)
    raise ValueError(f"rank {comm._t.rank}: {op} on group {comm.name}: timeout must be a "
                     f"number of seconds >= 0 or None, got {timeout!r}")


def _check_status(status: Any, comm: Comm, op: str) -> None:
    """A ``status=`` that could not be filled in raises before anything is
    received (after, the message would be lost with the error)."""
    if not isinstance(status, Status):
        raise TypeError(f"rank {comm._t.rank}: {op} on group {comm.name}: status= takes a "
                        f"mesh.Status (or None), got {type(status).__name__}")


_FOREVER = 10.0 * 365 * 86400    # what an infinite timeout waits (the clocks' arithmetic)
