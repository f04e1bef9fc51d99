"""Communicators: the public point-to-point API over a Transport.

The world and every sub-group are the same class; a group's ranks are local
(0..size-1) and its traffic carries the group's id, so it can never be
confused with the world's or another group's."""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

from .errors import LostPeerError, MeshError, MeshTimeoutError, MismatchError
from .match import ANY, Pending
from .transport import Outgoing, Transport, abort_error

__all__ = ["Comm", "Request", "ANY"]


class Request:
    """An operation in flight: ``wait()`` returns its result (None for sends);
    ``cancel()`` withdraws a receive no message has matched yet."""

    __slots__ = ("_t", "_item", "_result", "_finished", "_ranks")

    def __init__(self, transport: Transport, item: Pending | Outgoing,
                 ranks: list[int] | None = None) -> None:
        self._t, self._item = transport, item
        self._finished = False
        self._result: Any = None
        self._ranks = ranks

    @property
    def source(self) -> int | None:
        """The rank (in the receive's group) whose message a receive took,
        also when it was posted for ``mesh.ANY``; None until a message has
        matched it, and for sends."""
        item = self._item
        if isinstance(item, Outgoing) or item.source < 0:
            return None
        return self._ranks.index(item.source) if self._ranks is not None else item.source

    def wait(self, timeout: float | None = None) -> Any:
        if not self._finished:
            self._result = self._t.wait(self._item, timeout)
            self._finished = True
        return self._result

    def done(self) -> bool:
        item = self._item
        return item.done() if isinstance(item, Outgoing) else item.event.is_set()

    def cancel(self) -> bool:
        """Withdraw a posted receive that no message has matched yet, like
        ``MPI_Cancel``: True, and then ``done()`` is True and ``wait()``
        raises MeshError; the message it would have taken goes to the next
        matching receive instead. False once a message matched it (its value
        is then what ``wait()`` returns), and always for sends: a send may
        already be on the wire and cannot be cancelled."""
        item = self._item
        return not isinstance(item, Outgoing) and self._t.cancel(item)


class Comm:
    """A communicator: ``rank``/``size`` within it, and send/recv by local rank."""

    def __init__(self, transport: Transport, ranks: Sequence[int], gid: int, name: str) -> None:
        self._t = transport
        self.ranks = list(ranks)
        self.size = len(self.ranks)
        self.rank = self.ranks.index(transport.rank)
        self.gid = gid
        self.name = name
        self._coll_seq = 0
        self._children: dict[tuple[int, ...], int] = {}
        transport.groups[gid] = (name, self.ranks)

    @property
    def timeout(self) -> float:
        """The default timeout (s) of this communicator's blocking operations."""
        return self._t.timeout

    def __repr__(self) -> str:
        return f"<Comm {self.name} rank {self.rank}/{self.size}>"

    # -- public point-to-point ---------------------------------------------------

    def send(self, obj: Any, dst: int, tag: int = 0, timeout: float | None = None) -> None:
        """Blocking send; returns when ``obj``'s buffer may be reused."""
        _check_tag(tag, self, "send")
        t = self._t
        wdst = self._world_rank(dst, "send")
        t.wait(t.isend(wdst, self.gid, tag, obj, None, self._desc("send to", dst, wdst, tag)),
               timeout)

    def recv(self, src: int = ANY, tag: int = 0, out: np.ndarray | None = None,
             timeout: float | None = None) -> Any:
        _check_tag(tag, self, "recv")
        t = self._t
        wsrc = ANY if src == ANY else self._world_rank(src, "recv")
        return t.wait(t.irecv(self.gid, wsrc, tag, out, None,
                              self._desc("recv from", src, wsrc, tag)), timeout)

    def isend(self, obj: Any, dst: int, tag: int = 0) -> Request:
        _check_tag(tag, self, "isend")
        return self._isend(obj, dst, tag)

    def irecv(self, src: int = ANY, tag: int = 0, out: np.ndarray | None = None) -> Request:
        _check_tag(tag, self, "irecv")
        return self._irecv(src, tag, out)

    # -- internal: negative tags and fingerprints, for collectives ---------------

    def _isend(self, obj: Any, dst: int, tag: int, fp: Any = None) -> Request:
        wdst = self._world_rank(dst, "send")
        desc = self._desc("send to", dst, wdst, tag, fp)
        return Request(self._t, self._t.isend(wdst, self.gid, tag, obj, fp, desc))

    def _irecv(self, src: int, tag: int, out: np.ndarray | None = None, fp: Any = None) -> Request:
        wsrc = ANY if src == ANY else self._world_rank(src, "recv")
        desc = self._desc("recv from", src, wsrc, tag, fp)
        return Request(self._t, self._t.irecv(self.gid, wsrc, tag, out, fp, desc), self.ranks)

    def _desc(self, verb: str, peer: int, world: int, tag: int, fp: Any = None) -> tuple:
        """The parts of an operation's description (mesh.match.describe):
        the peer's world rank too in a sub-group, and the collective a
        message belongs to."""
        coll = fp.get("coll") if type(fp) is dict else None
        if coll is not None:
            return (verb, peer, tag, self.name, world if self.gid else None, coll)
        if self.gid:
            return (verb, peer, tag, self.name, world)
        return (verb, peer, tag, self.name)

    def _send(self, obj: Any, dst: int, tag: int, fp: Any = None) -> None:
        self._isend(obj, dst, tag, fp).wait()

    def _recv(self, src: int, tag: int, out: np.ndarray | None = None, fp: Any = None) -> Any:
        return self._irecv(src, tag, out, fp).wait()

    def _coll_tag(self) -> int:
        """The next collective's tag: negative, so it never meets a user tag."""
        self._coll_seq += 1
        return -self._coll_seq

    def _abort(self, tag: int, reason: str, error: type[BaseException] | None = None,
               peer: int | None = None) -> None:
        """Fail ``tag`` on every member; they raise ``error``'s kind where the
        wire carries it (mismatch, lost peer, naming ``peer``: a world rank,
        timeout), else MeshError."""
        kind = 2
        if error is not None and issubclass(error, MismatchError):
            kind = 0
        elif error is not None and issubclass(error, LostPeerError):
            kind = 1
        elif error is not None and issubclass(error, MeshTimeoutError):
            kind = 3
        me = f"rank {self.rank} of group {self.name}"
        if self.gid:
            me += f" (world rank {self.ranks[self.rank]})"
        self._t.abort(self.gid, tag, f"{me}: {reason}", kind, -1 if peer is None else peer)

    def _abort_error(self, tag: int, what: str) -> MeshError | None:
        """The error to raise for ``what`` if ``tag`` was aborted here (by a
        peer, before this rank got to it), else None. Cheap: no lock, no message."""
        t = self._t
        record = t._aborted.get((self.gid, tag)) if t._aborted else None
        if record is None:
            return None
        return abort_error(record, f"rank {t.rank}: {what} aborted: {record[1]}")

    def _keep_alive(self, obj: Any) -> None:
        """Hold ``obj`` until the mesh closes, not just while this group
        object lives: peers may still read memory it owns (same-host
        collectives) after this rank has dropped the group."""
        self._t.keep_alive.append(obj)

    def _on_close(self, fn: Any) -> None:
        """Call ``fn()`` when the mesh closes, after every peer has said
        goodbye (so none still reads what it releases), latest first."""
        self._t.on_close.append(fn)

    def _world_rank(self, r: int, op: str) -> int:
        if type(r) is int and 0 <= r < self.size:
            return self.ranks[r]
        if not isinstance(r, (int, np.integer)) or not 0 <= r < self.size:
            raise ValueError(f"rank {self.rank}: {op} to/from rank {r!r}: group {self.name} "
                             f"has ranks 0..{self.size - 1}")
        return self.ranks[int(r)]

    # -- groups ------------------------------------------------------------------

    def group(self, ranks: Sequence[int]) -> "Comm | None":
        """A sub-communicator of ``ranks`` (local to this one). Members get it,
        other ranks get None. Members must create groups of the same ranks in
        the same order, so the group's id agrees without any message."""
        ranks = [int(r) for r in ranks]
        if len(set(ranks)) != len(ranks) or not all(0 <= r < self.size for r in ranks):
            raise ValueError(f"rank {self.rank}: group({ranks}) of group {self.name}: ranks must "
                             f"be distinct and in 0..{self.size - 1}")
        key = tuple(ranks)
        n = self._children.get(key, 0)
        self._children[key] = n + 1
        if self.rank not in ranks:
            return None
        digest = hashlib.blake2b(repr((self.gid, key, n)).encode(), digest_size=8).digest()
        gid = int.from_bytes(digest, "little") >> 1 or 1
        world = [self.ranks[r] for r in ranks]
        name = f"{self.name}/{list(ranks)}" + (f"#{n}" if n else "")
        return Comm(self._t, world, gid, name)


def _check_tag(tag: int, comm: Comm, op: str) -> None:
    if type(tag) is int and tag >= 0:
        return
    if not isinstance(tag, (int, np.integer)) or tag < 0:
        raise ValueError(f"rank {comm.rank}: {op} on group {comm.name}: tag must be an "
                         f"integer >= 0, got {tag!r}")
