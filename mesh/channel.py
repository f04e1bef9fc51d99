"""What the layers above mesh (collectives, the engine) use, beside the
public point-to-point API, to run operations that involve a whole group:
``comm.collective_channel()``, one per communicator.

* Tags: ``next_tag()`` numbers the group's collective calls, call n getting
  tag -n, so their messages never meet a user's (user tags are >= 0) and
  members that make the same calls number them alike. The transport knows
  negative tags as collective ones: a member's death fails every receive
  posted on one in its groups, whatever its source.
* Fingerprinted messages: ``isend``/``irecv`` carry ``fp``, a msgpack value
  equal on every member for one call; a receive whose message carries
  another fails with MismatchError and aborts the tag on every member. A
  dict is shown in that error as ``coll(key=value, ...)``, its ``"coll"``
  entry naming the call. ``what`` names the operation in errors and stall
  reports: ``all_reduce #3 on group world: recv from rank 1``.
* Aborts: ``abort(tag, reason, kind)`` fails a tag on every member, now and
  for operations posted on it later; each raises ``kind``'s error.
  ``aborted(tag, what)`` is that error here, if the tag was aborted (or
  a LostPeerError, if a member is known dead or this rank's mesh is
  closed); ``left(rank, what)``, the
  LostPeerError of a wait on a member that has closed its mesh or died.
* Where peers are: ``endpoint(rank)`` (tcp:// or ipc://), ``host(rank)``, ``encrypted``.
* Lifetime: ``keep_alive(obj, reading)`` and ``on_close(fn)`` keep memory
  that peers may read until they have all answered this rank's goodbye (and,
  per ``reading``, have done reading it) or said their own.
* Stall reports: ``stalled(what, peers, waited)`` for waits made outside the
  transport (polling a peer's memory).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from .comm import ANY, Comm, Request
from .errors import AbortKind, MeshError
from .match import Pending
from .peer import ALIVE
from .transport import Transport, abort_error

__all__ = ["CollectiveChannel", "AbortKind", "Watch"]


class Watch:
    """A receive posted on a collective's tag only to catch an abort (no
    member sends one there): ``done()``, ``wait(timeout)`` as a Request's,
    and ``withdraw()``. It holds the transport, not the communicator, so
    the watches a group's state keeps do not keep the group alive."""

    __slots__ = ("_t", "_item")

    def __init__(self, transport: Transport, item: Pending) -> None:
        self._t, self._item = transport, item

    def done(self) -> bool:
        return self._item.event.is_set()

    def wait(self, timeout: float | None = None) -> Any:
        return self._t.wait(self._item, timeout)

    def withdraw(self) -> None:
        """Take it out of the posted receives (nothing if it has completed)."""
        self._t.inbox.withdraw(self._item)


class CollectiveChannel:
    """A communicator's collective side (see the module docstring). Ranks
    are the communicator's, except where a world rank is said."""

    __slots__ = ("_comm", "_t", "_me", "seq")

    def __init__(self, comm: Comm, transport: Transport) -> None:
        self._comm, self._t = comm, transport
        self.seq = 0     # how many tags next_tag() has handed out
        self._me = f"rank {comm.rank} of group {comm.name}" + (
            f" (world rank {comm.ranks[comm.rank]})" if comm.gid else "")

    def next_tag(self) -> int:
        """The group's next collective's tag; take it in the calling thread,
        in call order, so every member numbers its calls alike."""
        if self._t.forked:
            from .transport import forked_error
            raise forked_error(self._t.rank, self._t.pid)
        self.seq += 1
        return -self.seq

    def isend(self, obj: Any, dst: int, tag: int, fp: Any, what: str) -> Request:
        return self._comm._isend(obj, dst, tag, fp, what)

    def irecv(self, src: int, tag: int, fp: Any, what: str, out: Any = None) -> Request:
        """``src`` may be mesh.ANY (a receive posted only to catch an abort)."""
        return self._comm._irecv(src, tag, out, fp, what)

    def watch(self, tag: int, fp: Any, what: str, src: int = ANY) -> Watch:
        """A receive from any member (or member ``src``, which sends nothing
        there) on ``tag``, posted only to catch an abort."""
        c = self._comm
        wsrc = ANY if src == ANY else c.ranks[src]
        return Watch(self._t, self._t.irecv(c.gid, wsrc, tag, None, fp,
                                            c._desc("recv from", src, wsrc, tag, what),
                                            watch=True))

    def abort(self, tag: int, reason: str, kind: AbortKind = AbortKind.OTHER,
              peer: int | None = None) -> None:
        """Fail ``tag`` on every member; they raise ``kind``'s error (a lost
        peer names ``peer``, a world rank), its text naming this rank."""
        self._t.abort(self._comm.gid, tag, f"{self._me}: {reason}", kind,
                      -1 if peer is None else peer)

    def aborted(self, tag: int, what: str) -> MeshError | None:
        """The error to raise for ``what`` if ``tag`` was aborted here (by a
        peer, before this rank got to it), or if a member of the group is
        known dead (LostPeerError naming it: a call that started anyway would
        send its first messages to members still in the group's previous
        call, which would take them for a mismatch), else None. Cheap: no
        lock, no message."""
        t = self._t
        inbox = t.inbox
        aborted = inbox.aborted
        record = aborted.get((self._comm.gid, tag)) if aborted else None
        if record is None:
            if inbox.closed:    # this rank's own mesh: its peers are gone to it
                return inbox.closed_error(what)
            if inbox.dead:
                lost = inbox.dead_member(self._comm.gid)
                if lost is not None:
                    return inbox.gone(inbox.peers[lost], what, self._comm.gid)
            return None
        return abort_error(record, f"rank {t.rank}: {what} aborted: {record[1]}")

    def left(self, rank: int, what: str) -> MeshError | None:
        """LostPeerError for ``what`` if group rank ``rank`` has left the mesh
        (closed it, or died), else None: for waits made outside the
        transport (polling a peer's memory), which a goodbye does not reach.
        Cheap: no lock, no message."""
        inbox = self._t.inbox
        peer = inbox.peers[self._comm.ranks[rank]]
        return None if peer.state == ALIVE else inbox.gone(peer, what, self._comm.gid)

    def follow(self, tag: int, sub: Comm, sub_tag: int) -> None:
        """Until ``unfollow(tag)``: an abort of this group's ``tag`` here (a
        peer's, or a mismatch seen here) aborts ``sub_tag`` of group ``sub``
        here too, its waits raising the same error: a phase of a call, run
        as a collective of a sub-group (collectives.host.hier)."""
        inbox = self._t.inbox
        with inbox.lock:
            inbox.follows.setdefault((self._comm.gid, tag), []).append((sub.gid, sub_tag))

    def unfollow(self, tag: int) -> None:
        inbox = self._t.inbox
        with inbox.lock:
            inbox.follows.pop((self._comm.gid, tag), None)

    def endpoint(self, rank: int) -> str:
        """How this rank reaches group rank ``rank``: ``tcp://host:port``
        (another host, or MESH_FORCE_TCP) or ``ipc://...`` (this host)."""
        return self._t.endpoints[self._comm.ranks[rank]]

    def host(self, rank: int) -> str:
        """Group rank ``rank``'s host id (mesh.env.host_id, as the rendezvous
        table has it): ranks with the same one share a host."""
        return self._t.hosts[self._comm.ranks[rank]]

    @property
    def encrypted(self) -> bool:
        """Whether the mesh's sockets run CurveZMQ (MESH_CURVE=1)."""
        return bool(self._t.curve)

    def keep_alive(self, obj: Any, reading: Callable[[int], bool] | None = None) -> None:
        """Hold ``obj`` until the mesh closes, not just while the group
        object lives: peers may still read memory it owns (same-host
        collectives) after this rank has dropped the group. ``reading(r)``:
        whether world rank ``r`` may still read it; close() then waits for
        that peer (up to MESH_CLOSE_WAIT, or its own goodbye) even once its
        reader has answered this rank's goodbye."""
        self._t.keep_alive.append(obj)
        if reading is not None:
            self._t.reading.append(reading)

    def on_drop(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` once, when this rank drops the communicator (it is
        garbage; run by the next group made or collective started) or the
        mesh closes, whichever comes first; ``fn`` must not hold the
        communicator. For what the group owns here alone (its sockets)."""
        self._t.drop_hooks.setdefault(self._comm.gid, []).append(fn)

    def sweep(self) -> None:
        """Forget the groups dropped here since (Transport.sweep)."""
        if self._t.dropped:
            self._t.sweep()

    def on_close(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` when the mesh closes, after every peer has said
        goodbye (so none still reads what it releases), latest first."""
        self._t.on_close.append(fn)

    @property
    def stall_warn(self) -> float:
        """Seconds a wait may last before it logs a stall report (0: never)."""
        return self._t.stall_warn

    def waiting(self, what: str | None, since: float = 0.0) -> None:
        """A wait outside the transport (``what``, since ``since`` on the
        monotonic clock) tells the peers' stall reports, through this
        rank's heartbeats, what it waits in; None: it is over."""
        live = self._t.live
        if what is not None:
            live.doing, live.doing_since = what, since
        elif type(live.doing) is str:
            live.doing, live.last, live.last_end = None, live.doing, time.monotonic()

    def said(self, rank: int) -> tuple[str, float] | None:
        """What group rank ``rank`` last said it was doing (its heartbeats'
        status, as stall reports quote it) and how many seconds ago; None
        before its first."""
        p = self._t.live.peers[self._comm.ranks[rank]]
        return (p.status, time.monotonic() - p.status_at) if p.status else None

    def stalled(self, what: str, peers: Iterable[int], waited: float,
                limit: float | None = None) -> None:
        """Log that ``what`` has waited ``waited`` seconds for ``peers``, with
        what each of them last said it was doing (the mesh's stall report)."""
        self._t.stalled(what, [self._comm.ranks[p] for p in peers], waited, limit)
