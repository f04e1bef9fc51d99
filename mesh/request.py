"""What a nonblocking point-to-point call returns (mesh.comm): Request, an
operation in flight, and the two done as they are made: a send by ring
(_Sent) and a receive from PROC_NULL (_Null)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .match import Pending
from .p2pargs import _check_status, _check_timeout
from .status import Status, _null
from .transport import SENT, Outgoing

if TYPE_CHECKING:
    from .comm import Comm

__all__ = ["Request"]


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
        is then what ``wait()`` returns). A synchronous send's (issend, an
        ssend_init's start) is withdrawn likewise while no receive has taken
        its message (its receiver asked, and its answer awaited): True, its
        wait raises MeshError and the receiver never sees it; False once
        taken, and it completes as it would have. A standard send's message
        carries no id its receiver could withdraw it by: False, always."""
        item = self._item
        if isinstance(item, Outgoing):
            return self._c._t.cancel_send(item)
        return self._c._t.cancel(item)


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
