"""The calls that complete several requests at once, as mpi4py's:
waitall, testall, waitany, waitsome, testany and testsome, each request's
result given once (a spent one skipped), the caller reading the socket
while it waits; mesh.comm and mesh names them."""
from __future__ import annotations

import threading
import time
from typing import Any, Sequence

from .errors import MeshTimeoutError
from .match import Pending, Several
from .p2pargs import _check_timeout
from .request import Request
from .transport import SENT, Outgoing

__all__ = ["waitall", "testall", "waitany", "waitsome", "testany", "testsome"]


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
    ``timeout`` bounds the whole wait: once it runs out with some not done,
    MeshTimeoutError names them (with what their peers last said) and
    every request stays as it was, none given up, as waitany's timeout
    leaves them (each wait(timeout) in turn withdrew the first receive not
    done, whose message then went to the next receive: a waitall tried
    again raised that stale timeout at once, and never got the message).
    Without one each request waits as its ``wait()`` does. The first
    request that fails raises (the others stay waitable)."""
    reqs = _listed(requests, "waitall")
    if timeout is None or not reqs:
        return [r.wait() for r in reqs]
    c = reqs[0]._c
    limit = _check_timeout(timeout, c, "waitall")
    deadline = time.monotonic() + limit
    every = _AllDone(reqs)
    looked = False
    while not every.is_set():
        now = time.monotonic()
        if now >= deadline:
            if not looked:      # one look at what has come, as a receive's timeout takes
                looked = True
                c._t.poke()
                continue
            left = [(i, r) for i, r in enumerate(reqs) if not r.done()]
            raise MeshTimeoutError(_late(c, left, "waitall", limit, len(reqs)))
        first = reqs[every.at]
        try:
            c._t._drive(first._item, deadline, deadline - now, every,
                        Several("waitall", [(i, r) for i, r in enumerate(reqs)
                                            if i >= every.at and not r.done()]))
        except Exception:
            if not c._t.inbox.closed:
                raise
            break       # (the mesh closed under it: each request fails on its own)
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
    doing: Several | None = None     # (what it waits in, made once it waits)
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
            doing = None
        now = time.monotonic()
        if now >= deadline and not looked:
            # one look at what has come before timing out, as recv(timeout=0) takes: a
            # loop polling waitany(timeout=0) saw a message a switch interval late (15 ms)
            looked = True
            c._t.poke()
            continue
        if now >= deadline:
            late = MeshTimeoutError(_late(c, live, what, limit))
            late.none_done = True   # type: ignore[attr-defined]  # (not a request's own error)
            raise late
        if doing is None:
            doing = Several(what, live)
        try:
            c._t._drive(live[0][1]._item, deadline, deadline - now, anyone, doing)
        except Exception:
            if not c._t.inbox.closed:   # (a forked child's refusal: it waited out its timeout)
                raise
            time.sleep(nap)     # (the mesh closed under it: each request fails on its own)
            nap = min(nap * 2, 2e-3)


def _late(c: Any, live: list[tuple[int, Request]], what: str, limit: float,
          of: int = 0) -> str:
    """The error of ``what`` (waitany, waitsome; waitall: ``of`` requests)
    timed out with none of the ``live`` requests done: the first four, each
    with what its peer (or, from ANY, its group's ranks) last said, as a
    receive's timeout says it."""
    if what.startswith("test"):     # (testany, testsome: never shown, made per call)
        return f"rank {c._t.rank}: {what}: none done"
    t = c._t
    waits, said = [], set()
    for _, r in live[:4]:
        item = r._item
        text = item.described(t.inbox.peers)
        if isinstance(item, (Pending, Outgoing)):
            note = t.live.peer_note(item)
            if note not in said:
                said.add(note)
                text += note
        waits.append(text)
    more = f"; and {len(live) - 4} more" if len(live) > 4 else ""
    if of:
        return (f"rank {t.rank}: {what} on {of} request{'s' if of != 1 else ''} timed out "
                f"after {limit:g}s, {of - len(live)} done; not done: {'; '.join(waits)}{more} "
                f"(none given up: a later waitall, wait or test completes them)")
    return (f"rank {t.rank}: {what} on {len(live)} request{'s' if len(live) != 1 else ''} "
            f"timed out after {limit:g}s, none done: {'; '.join(waits)}{more}")


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


class _Polled:
    """A flag over requests (``is_set``) that another thread's reading may
    set: ``wait`` looks again soon until it is, or ``timeout`` runs out."""

    __slots__ = ()

    def is_set(self) -> bool:
        raise NotImplementedError

    def wait(self, timeout: float) -> bool:
        """Another thread reads (it completes these too): look again soon."""
        end = time.monotonic() + timeout
        while not self.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, 5e-5))
        return True


class _AllDone(_Polled):
    """Set once every one of ``reqs`` is done: the flag ``waitall`` with a
    timeout drives the reading until. ``at``: the first not done yet (a
    request once done stays so: each is looked at until it is, then never
    again, so that a wait for many requests costs no look at all per
    message read)."""

    __slots__ = ("reqs", "at")

    def __init__(self, reqs: list[Request]) -> None:
        self.reqs, self.at = reqs, 0

    def is_set(self) -> bool:
        reqs, at = self.reqs, self.at
        while at < len(reqs) and reqs[at].done():
            at += 1
        self.at = at
        return at == len(reqs)


class _AnyDone(_Polled):
    """Set once any of ``reqs`` is done: the flag ``waitany`` drives the
    reading until (mesh.progress.Progress.drive)."""

    __slots__ = ("reqs",)

    def __init__(self, reqs: list[Request]) -> None:
        self.reqs = reqs

    def is_set(self) -> bool:
        return any(r.done() for r in self.reqs)
