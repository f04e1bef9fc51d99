"""mpi4py's Status and Request (and its persistent form) over
meshrun's: the same completion calls (``Wait``/``wait``, ``Test``,
``Waitall``, ``Waitany``, ``Waitsome``, ``Testall``, ``Testany``,
``Testsome``, ``Cancel``), a cancelled receive completing with
``Is_cancelled()`` as MPI's does, and a receive into a buffer longer than
its message filling the buffer's start (``receive_into``)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

import mesh
from mesh.errors import MeshError, MeshTimeoutError, OutMismatchError

from .buffers import check_signature, copy_into
from .types import ANY_SOURCE, ANY_TAG, ERR_TRUNCATE, UNDEFINED, Datatype, Exception, mpi_tag

__all__ = ["Status", "Request", "Prequest", "Grequest", "REQUEST_NULL", "receive_into", "fill",
           "fit", "Into"]


class Status:
    """mpi4py's Status: the source, tag and size of what a receive or probe
    matched, and whether a cancel withdrew the receive."""

    def __init__(self, status: "Status | None" = None) -> None:
        """(a copy of ``status``'s fields, if given: another Status)"""
        if status is not None and not isinstance(status, Status):
            raise TypeError(f"collectives.MPI Status({status!r}): a Status to copy, or nothing")
        self.source, self.tag, self.error = ANY_SOURCE, ANY_TAG, 0
        self.nbytes, self.cancelled = 0, False
        if status is not None:
            self.__dict__.update(status.__dict__)

    def Get_source(self) -> int:
        return self.source

    def Get_tag(self) -> int:
        return self.tag

    def Get_error(self) -> int:
        return self.error

    def Set_source(self, source: int) -> None:
        self.source = source

    def Set_tag(self, tag: int) -> None:
        self.tag = tag

    def Set_error(self, error: int) -> None:
        self.error = error

    def Get_count(self, datatype: Any = None) -> int:
        """Elements of ``datatype`` (MPI.BYTE: bytes) the message held;
        MPI.UNDEFINED where they are no whole number."""
        size = 1 if datatype is None else (datatype.size if isinstance(datatype, Datatype)
                                          else np.dtype(datatype).itemsize)
        if size == 0:
            return 0
        return self.nbytes // size if self.nbytes % size == 0 else UNDEFINED

    def Get_elements(self, datatype: Any) -> int:
        """Basic elements the message held: a derived datatype's element
        dtype's (a partial item's too), else as Get_count."""
        if isinstance(datatype, Datatype) and datatype.typemap is not None:
            return self.Get_count(datatype.dtype)
        return self.Get_count(datatype)

    def Set_elements(self, datatype: Any, count: int) -> None:
        """MPI_Status_set_elements: the message held ``count`` elements of ``datatype``."""
        size = datatype.size if isinstance(datatype, Datatype) else np.dtype(datatype).itemsize
        self.nbytes = int(count) * size

    count = property(lambda self: self.Get_count(),
                     lambda self, n: self.Set_elements(np.uint8, n))

    def Is_cancelled(self) -> bool:
        return self.cancelled

    def tomemory(self) -> Any:
        raise NotImplementedError("collectives.MPI: Status.tomemory: not provided (a Status "
                                  "here is a Python object, no MPI_Status's memory)")

    def Set_cancelled(self, flag: bool) -> None:
        self.cancelled = bool(flag)

    def __repr__(self) -> str:
        return f"<MPI.Status source={self.source} tag={self.tag} bytes={self.nbytes}>"


def fill(status: Status | None, st: mesh.Status | None) -> None:
    if status is not None and st is not None:
        status.source, status.tag, status.nbytes = st.source, mpi_tag(st.tag), st.nbytes
        status.cancelled = False


def fit(view: np.ndarray, data: Any, st: mesh.Status, what: str, g: mesh.Comm,
        typed: bool = False) -> None:
    """A message that did not fit ``view`` exactly, into its start (MPI's
    receive of a shorter message), or MPI's ERR_TRUNCATE (naming the rank
    of ``g``, the receiver's group, as meshrun's errors do); ``typed``: a
    derived datatype's view, whose elements the message's must be."""
    where = f"rank {g.rank}: collectives.MPI {what} from rank {st.source}, tag {st.tag}, " \
            f"group {g.name}"
    if not isinstance(data, np.ndarray):
        raise TypeError(f"{where}: the message is an object (sent by lowercase send), not an "
                        f"array: receive it with the lowercase recv")
    check_signature(typed, view, data, where)
    if data.nbytes > view.nbytes:
        raise Exception(ERR_TRUNCATE, f"{where}: message truncated (MPI_ERR_TRUNCATE): "
                                      f"{data.nbytes} bytes for a buffer of {view.nbytes}")
    copy_into(view, data, what)


def receive_into(comm: mesh.Comm, view: np.ndarray, src: int, tag: int, st: mesh.Status,
                 what: str, timeout: float | None = None, typed: bool = False) -> None:
    """Recv into ``view``: straight in where the message fits it exactly,
    else (meshrun refuses it, keeping the message) taken by mprobe and
    copied into its start (``typed``: as ``fit``'s)."""
    try:
        comm.recv(src, tag, out=view, status=st, timeout=timeout)
    except OutMismatchError:
        msg = comm.mprobe(src, tag, timeout=timeout)
        fit(view, msg.recv(status=st), st, what, comm, typed)


class Request:
    """A request in flight (mpi4py's Request): a point-to-point one's
    meshrun Request, or a nonblocking collective's Work whose ``finish``
    copies its result into the receive buffer. Once completed it is
    MPI.REQUEST_NULL's equal, and waiting again returns at once."""

    def __init__(self, req: Any = None, *, finish: Callable[[Any], Any] | None = None,
                 into: "Into | None" = None) -> None:
        self._req, self._finish, self._into = req, finish, into
        self._cancelled = False

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Request):
            return self._req is other._req
        return NotImplemented

    __hash__ = object.__hash__

    def __bool__(self) -> bool:
        return self._req is not None

    def _ready(self) -> bool:
        r = self._req
        if r is None or self._cancelled:
            return True
        return bool(r.get_status()) if isinstance(r, mesh.Request) else bool(r.done())

    def _complete(self, status: Status | None, timeout: float | None = None) -> Any:
        """Wait and give the result, the request then null."""
        r = self._req
        if r is None:
            if status is not None:
                fill(status, mesh.Status())
                status.nbytes = 0
            return None
        if self._cancelled:
            self._cancelled = False
            if isinstance(r, mesh.Request):
                try:        # (spent: a persistent one inactive again, ready to Start)
                    r.wait(0)
                except MeshError:
                    pass    # ("... was cancelled", as meshrun's withdrawn requests say)
            if not isinstance(self, Prequest):
                self._req = None
            if status is not None:
                status.cancelled = True
            return None
        if isinstance(r, mesh.Request):
            st = mesh.Status()
            try:
                value = r.wait(timeout, status=st)
            except OutMismatchError:
                into = self._into
                if into is None:
                    raise
                if not into.last():
                    raise NotImplementedError(
                        f"collectives.MPI Irecv from rank {into.src}, tag {into.tag}: the "
                        f"message does not fill the buffer, and a receive posted after this "
                        f"one may have taken it (meshrun hands a message that does not fit "
                        f"to the next receive): give Irecv the message's count (Probe, "
                        f"Status.Get_count), or Mprobe then Message.Irecv") from None
                msg = into.comm.mprobe(into.src, into.tag, timeout=timeout)
                value = into.view
                fit(into.view, msg.recv(status=st), st, "Irecv", into.comm, into.typed)
            fill(status, st)
        else:
            value = r.wait(timeout)
            if status is not None and hasattr(r, "status_into"):    # (a file call's count)
                r.status_into(status)
        if self._finish is not None:
            value = self._finish(value)
        if not isinstance(self, Prequest):
            self._req = None
        return value

    def Wait(self, status: Status | None = None) -> bool:
        self._complete(status)
        return True

    def wait(self, status: Status | None = None) -> Any:
        return self._complete(status)

    def Test(self, status: Status | None = None) -> bool:
        if not self._ready():
            return False
        self._complete(status)
        return True

    def test(self, status: Status | None = None) -> tuple[bool, Any]:
        if not self._ready():
            return False, None
        return True, self._complete(status)

    def Get_status(self, status: Status | None = None) -> bool:
        r = self._req
        if r is None and status is not None:    # (a null request's: the empty status)
            status.__dict__.update(Status().__dict__)
        if self._cancelled:         # (withdrawn: done, its status says so, as its wait's)
            if status is not None:
                status.cancelled = True
            return True
        if isinstance(r, mesh.Request):
            st = mesh.Status()
            if not r.get_status(st):
                return False
            fill(status, st)
            return True
        return self._ready()

    get_status = Get_status

    def Cancel(self) -> None:
        """MPI_Cancel: a receive no message matched yet, or a synchronous
        send's (Issend, an Ssend_init's start) no receive took yet, is
        withdrawn (meshrun's Request.cancel): its wait then completes at
        once, Status.Is_cancelled() True (the receiver never sees the send);
        otherwise, and for a standard, buffered or ready send (whose message
        carries no id to withdraw it by), it completes as it would have,
        Is_cancelled() False, as MPI allows."""
        r = self._req
        if isinstance(r, mesh.Request) and r.cancel():
            self._cancelled = True

    cancel = Cancel

    def Free(self) -> None:
        self._req = None

    free = Free

    @classmethod
    def Waitall(cls, requests: Sequence["Request"], statuses: list | None = None) -> bool:
        cls.waitall(requests, statuses)
        return True

    @classmethod
    def waitall(cls, requests: Sequence["Request"], statuses: list | None = None) -> list[Any]:
        out = []
        for i, r in enumerate(requests):
            out.append(r._complete(_slot(statuses, i)))
        return out

    @classmethod
    def Get_status_all(cls, requests: Sequence["Request"],
                       statuses: Sequence[Any] | None = None) -> bool:
        """MPI-4.1's: whether every request is done (their statuses filled),
        none of them completed (freed)."""
        return all([r.Get_status(_slot(statuses, i)) for i, r in enumerate(requests)])

    get_status_all = Get_status_all

    @classmethod
    def Get_status_any(cls, requests: Sequence["Request"],
                       status: Status | None = None) -> tuple[int, bool]:
        """MPI-4.1's: (the index of a done active request, True), none
        completed; (UNDEFINED, True) where none is active, (UNDEFINED,
        False) where none is done."""
        i = _first_ready(requests, False)
        if i is None:
            return UNDEFINED, False
        if i == UNDEFINED:
            return UNDEFINED, True
        requests[i].Get_status(status)
        return i, True

    get_status_any = Get_status_any

    @classmethod
    def Get_status_some(cls, requests: Sequence["Request"],
                        statuses: Sequence[Any] | None = None) -> list[int] | None:
        """MPI-4.1's: the indices of the done active requests (statuses
        filled), none completed; None where none is active."""
        if _first_ready(requests, False) == UNDEFINED:
            return None
        return [i for i, r in enumerate(requests)
                if r._req is not None and r.Get_status(_slot(statuses, i))]

    get_status_some = Get_status_some

    @classmethod
    def Waitany(cls, requests: Sequence["Request"], status: Status | None = None) -> int:
        return cls.waitany(requests, status)[0]

    @classmethod
    def waitany(cls, requests: Sequence["Request"],
                status: Status | None = None) -> tuple[int, Any]:
        i = _first_ready(requests, True)
        if i == UNDEFINED:
            return UNDEFINED, None
        return i, requests[i]._complete(status)

    @classmethod
    def Testany(cls, requests: Sequence["Request"],
                status: Status | None = None) -> tuple[int, bool]:
        i, flag, _ = cls.testany(requests, status)
        return i, flag

    @classmethod
    def testany(cls, requests: Sequence["Request"],
                status: Status | None = None) -> tuple[int, bool, Any]:
        i = _first_ready(requests, False)
        if i is None:
            return UNDEFINED, False, None
        if i == UNDEFINED:
            return UNDEFINED, True, None
        return i, True, requests[i]._complete(status)

    @classmethod
    def Testall(cls, requests: Sequence["Request"], statuses: list | None = None) -> bool:
        return cls.testall(requests, statuses)[0]

    @classmethod
    def testall(cls, requests: Sequence["Request"],
                statuses: list | None = None) -> tuple[bool, list[Any] | None]:
        if not all(r._ready() for r in requests):
            return False, None
        return True, cls.waitall(requests, statuses)

    @classmethod
    def Waitsome(cls, requests: Sequence["Request"],
                 statuses: list | None = None) -> list[int] | None:
        return cls.waitsome(requests, statuses)[0]

    @classmethod
    def waitsome(cls, requests: Sequence["Request"],
                 statuses: list | None = None) -> tuple[list[int] | None, list[Any] | None]:
        if _first_ready(requests, True) == UNDEFINED:
            return None, None
        return cls.testsome(requests, statuses)

    @classmethod
    def Testsome(cls, requests: Sequence["Request"],
                 statuses: list | None = None) -> list[int] | None:
        return cls.testsome(requests, statuses)[0]

    @classmethod
    def testsome(cls, requests: Sequence["Request"],
                 statuses: list | None = None) -> tuple[list[int] | None, list[Any] | None]:
        if all(r._req is None for r in requests):
            return None, None
        idx = [i for i, r in enumerate(requests) if r._req is not None and r._ready()]
        objs = []
        for k, i in enumerate(idx):
            objs.append(requests[i]._complete(_slot(statuses, k)))
        return idx, objs


def _slot(statuses: Sequence[Any] | None, k: int) -> Status | None:
    """mpi4py's ``statuses`` list: item k, a new Status put there (the list
    grown) where it holds none; of a tuple, its item k if a Status (else
    None: a tuple is filled, never grown)."""
    if statuses is None:
        return None
    if not isinstance(statuses, list):
        got = statuses[k] if k < len(statuses) else None
        return got if isinstance(got, Status) else None
    while len(statuses) <= k:
        statuses.append(None)
    if not isinstance(statuses[k], Status):
        statuses[k] = Status()
    return statuses[k]


def _first_ready(requests: Sequence[Request], block: bool) -> Any:
    """The index of the first active request done (waiting for one where
    ``block``), MPI.UNDEFINED if none is active, None if none is done."""
    active = [i for i, r in enumerate(requests) if r._req is not None]
    if not active:
        return UNDEFINED
    limit = None
    nap = 0.0
    while True:
        for i in active:
            if requests[i]._ready():
                return i
        if not block:
            return None
        if limit is None:
            r = requests[active[0]]._req
            comm = getattr(r, "_c", None)
            limit = time.monotonic() + (comm.timeout if comm is not None else 300.0)
        if time.monotonic() > limit:
            raise MeshTimeoutError(f"collectives.MPI Request.Waitany: none of {len(active)} "
                                   f"requests completed in time (MESH_TIMEOUT)")
        nap = min(0.001, nap * 2 or 2e-5)
        time.sleep(nap)


@dataclass
class Into:
    """An Irecv's buffer and match: a message that does not fit it exactly is
    taken by mprobe where ``last()`` says no receive was posted after it
    (else meshrun may have handed it to that one)."""

    view: np.ndarray
    comm: mesh.Comm
    src: int
    tag: int
    last: Callable[[], bool]
    typed: bool = False


class Prequest(Request):
    """mpi4py's Prequest (Send_init, Recv_init, Allreduce_init...): Start,
    Startall, then the completion calls; it stays usable after its wait.
    ``before``: what each start does first (a persistent collective's send
    buffer copied into the receive buffer it runs in place on, a derived
    datatype's elements packed); ``finish``, as Request's, at each wait."""

    def __init__(self, req: Any = None, *, before: Callable[[], None] | None = None,
                 finish: Callable[[Any], Any] | None = None) -> None:
        super().__init__(req, finish=finish)
        self._before = before

    def _starting(self) -> None:
        self._cancelled = False
        if self._before is not None and not self._req.active:   # (an active one: start raises)
            self._before()

    def Start(self) -> None:
        self._starting()
        self._req.start()

    start = Start

    @classmethod
    def Startall(cls, requests: Sequence["Prequest"]) -> None:
        for r in requests:
            r._starting()
        mesh.startall([r._req for r in requests])

    startall = Startall

    def _ready(self) -> bool:
        return self._cancelled or bool(self._req.get_status())


class Grequest(Request):
    def __init__(self, *args: Any, **kw: Any) -> None:
        raise NotImplementedError("collectives.MPI: generalized requests (Grequest) are not "
                                  "provided: run the work in a thread and poll it")


REQUEST_NULL = Request()
