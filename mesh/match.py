"""Matching of incoming messages to posted receives (MPI semantics).

A message ``(group, src, tag)`` goes to the earliest posted receive that names
its source or ``ANY`` and its tag or ``ANY_TAG``; if none is posted it waits
in the unexpected queue, in arrival order, never dropped, and wakes the probes
that match it. ``ANY_TAG`` matches user tags (>= 0) only, never the negative
tags of collectives. Not thread-safe: the transport holds its lock."""
from __future__ import annotations

import enum
import itertools
import threading
from collections import deque
from typing import Any, Callable, Iterator, Sequence

import numpy as np

__all__ = ["ANY", "ANY_TAG", "Flag", "State", "POSTED", "MATCHED", "DONE", "Pending", "Probe",
           "Watched", "Arrived", "Matcher", "Several", "describe", "named", "got_fields"]

ANY = -1
ANY_TAG = 1 << 63
"""A receive's tag that matches any user tag. Message tags are int64 on the
wire (user tags 0..2**63-1, collectives' negative), so no message has it."""


def named(rank: int, there: str = "", word: str = "rank", world: int | None = None) -> str:
    """A peer as every error and log line names it: ``rank 5``; a group's
    rank with its world rank where the two differ, ``rank 1 (world rank 3)``;
    a peer on another host than this rank's with ``there`` beside it (its
    ``Peer.there``, mesh.peer.on_host): ``rank 5 (on host node-b, pid 4242)``,
    ``rank 1 (world rank 3, on host node-b, pid 4242)``. (``word``: ``world
    rank``, ``root``...) Only errors and reports call it."""
    notes = _also(f"world rank {world}" if world is not None and world != rank else "", there)
    return f"{word} {rank} ({notes})" if notes else f"{word} {rank}"


def _also(notes: str, there: str) -> str:
    """``notes`` with ``there`` (a peer's host, ``named``) after them."""
    return f"{notes}, {there}" if notes and there else notes or there


def describe(d: Any, peers: Sequence[Any] | None = None) -> str:
    """An operation's description. Point-to-point calls pass the parts,
    ``(verb, peer, tag, group name[, peer's world rank, collective])``, and
    the text is made only when an error or a status report needs it, not
    once per message. A peer of a sub-group is named in both numberings
    (its world rank given only for sub-groups); a collective's message
    names the collective, its sequence number (minus the tag) and group::

        recv from rank 1 (tag 7, group world)
        recv from rank 1 of group world/[1, 2] (world rank 2), tag 7
        all_reduce #3 on group world/[1, 2]: recv from rank 1 (world rank 2)

    ``peers``: the transport's (mesh.peer.Peer, by world rank): a peer on
    another host than this rank's is named with its host as ``named`` says
    it (``recv from rank 1 (on host node-b, pid 4242) (tag 7, group
    world)``; ``... (world rank 2, on host node-b, pid 4242), tag 7``)."""
    if type(d) is str:
        return d
    verb, peer, tag, name = d[0], d[1], d[2], d[3]
    world = d[4] if len(d) > 4 else None
    coll = d[5] if len(d) > 5 else None
    at = peer if world is None else world
    there = peers[at].there if peers is not None and peer != ANY and 0 <= at < len(peers) \
        else ""
    if peer == ANY:
        who = "any rank"
    elif world is None:
        who = named(peer, there)
    else:   # (in a sub-group, its world rank is always said, the same number or not)
        who = f"rank {peer} ({_also(f'world rank {world}', there)})"
    tagged = "any tag" if tag == ANY_TAG else f"tag {tag}"
    if coll is not None:
        return f"{coll} #{-tag} on group {name}: {verb} {who}"
    if world is None or peer == ANY:
        return f"{verb} {who} ({tagged}, group {name})"
    return f"{verb} rank {peer} of group {name} ({_also(f'world rank {world}', there)}), {tagged}"


class Several:
    """What a wait for any (or all) of several requests waits in
    (mesh.completion's waitany, waitsome, waitall): ``live``, its
    ``(index, request)`` pairs, each request's operation its ``_item``.
    Heartbeats, stall reports and a stopped rank's word of where it waits
    name them all, not the first alone::

        waitany on 3 requests: recv from rank 1 (tag 1, group world); ...

    Made per wait that blocks, so it only keeps the caller's list: the
    descriptions are made when a report asks for them."""

    __slots__ = ("verb", "live")

    def __init__(self, verb: str, live: Sequence[tuple[int, Any]]) -> None:
        self.verb, self.live = verb, live

    def items(self) -> list[Any]:
        """The operations waited for (Pending, Outgoing): each request's."""
        return [it for it in (r._item for _, r in self.live) if hasattr(it, "_desc")]

    def described(self, peers: Sequence[Any] | None = None) -> str:
        descs = [it._desc for it in self.items()]
        n = len(descs)
        shown = "; ".join(describe(d, peers) for d in descs[:4])
        more = f"; and {n - 4} more" if n > 4 else ""
        return f"{self.verb} on {n} request{'s' if n != 1 else ''}: {shown}{more}"


def got_fields(got: Any) -> tuple:
    """(world source, tag, nbytes, dtype, shape) of a receive's ``got``: the
    message's wire header (the fast path stores it as is) or that tuple."""
    if type(got) is tuple:
        return got
    return got.src, got.tag, got.nbytes, got.dt, got.shape


class Flag:
    """A one-shot completion flag: a held lock, released once. Ten times
    cheaper to make than a threading.Event, which matters once per message."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:
            pass

    def is_set(self) -> bool:
        return not self._lock.locked()

    def wait(self, timeout: float | None = None) -> bool:
        if not self._lock.locked():
            return True
        if self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            self._lock.release()
            return True
        return False


class State(enum.IntEnum):
    """Where a receive is: posted (waiting in the tables), matched (a
    message claimed it; its payload may still be on its way), done
    (completed, failed or withdrawn)."""

    POSTED = 0
    MATCHED = 1
    DONE = 2


# The members as module constants: on the hot path, State.DONE (an enum
# class attribute) costs ten times a global's lookup.
POSTED, MATCHED, DONE = State.POSTED, State.MATCHED, State.DONE


class Pending:
    """A posted receive; completed by the transport, waited on by the caller."""

    __slots__ = ("group", "src", "tag", "out", "fp", "_desc", "order", "event",
                 "value", "error", "state", "device", "got", "target")

    def __init__(self, group: int, src: int, tag: int, out: Any, fp: Any, desc: Any,
                 target: Any = None) -> None:
        self.group, self.src, self.tag, self.out, self.fp = group, src, tag, out, fp
        self._desc = desc
        self.order = 0
        self.event = Flag()
        self.value: Any = None
        self.error: BaseException | None = None
        self.state = POSTED
        self.device = 0      # the message's origin flags (mesh.wire: device, torch)
        self.got: Any = None  # what matched: its wire header, or see got_fields
        self.target = target  # the caller's out= when ``out`` is a view of it (a tensor)

    @property
    def desc(self) -> str:
        return describe(self._desc)

    def described(self, peers: Sequence[Any]) -> str:
        """``desc``, its peer named with its host where that is not this
        rank's (``peers``: the transport's): what errors and reports say."""
        return describe(self._desc, peers)

    def complete(self, value: Any) -> None:
        self.value = value
        self.state = DONE
        self.event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.state = DONE
        self.event.set()


class Probe(Pending):
    """A posted probe: completed, with ``got`` and no value, when a message
    it matches is waiting in the unexpected queue, which keeps the message."""

    __slots__ = ()


class Watched(Pending):
    """A collective's receive posted only to catch an abort (mesh.channel's
    Watch): nothing is sent to it, so it holds nothing up (a closing rank
    does not stay for it)."""

    __slots__ = ()


class Arrived:
    """A message that arrived before its receive was posted (``sync``: a
    synchronous send's id, answered when a receive takes it; -1: none)."""

    __slots__ = ("src", "tag", "value", "nbytes", "fp", "order", "device", "granted", "sync")

    def __init__(self, src: int, tag: int, value: Any, nbytes: int, fp: Any,
                 device: int = 0, sync: int = -1) -> None:
        self.src, self.tag, self.value, self.nbytes, self.fp = src, tag, value, nbytes, fp
        self.order = 0
        self.device = device
        self.sync = sync
        self.granted = False     # its credit went back before a receive took it (Inbox.held)

    @property
    def got(self) -> tuple:
        """(src, tag, nbytes, dtype, shape) as a receive records it."""
        v = self.value
        arr = type(v) is np.ndarray
        return (self.src, self.tag, self.nbytes, v.dtype if arr else None,
                v.shape if arr else None)


class Matcher:
    """Posted receives by how they match, and messages nobody has asked for:

        _posted[(group, src, tag)]   receives naming a source and a tag
        _posted_any[(group, tag)]    receives from ANY source, naming a tag
        _wild[group]                 receives for ANY_TAG (any or one source)
        _probes[group]               probes (any source and tag combination)
        _unexpected[(group, tag)][src]   arrived messages, oldest first

    A message goes to the matching receive posted first (``order``); the
    wildcard tables are scanned, and only looked at when they hold anything,
    so exact receives cost what they did."""

    def __init__(self) -> None:
        self._posted: dict[tuple[int, int, int], deque[Pending]] = {}
        self._posted_any: dict[tuple[int, int], deque[Pending]] = {}
        self._wild: dict[int, deque[Pending]] = {}
        self._probes: dict[int, deque[Pending]] = {}
        self._unexpected: dict[tuple[int, int], dict[int, deque[Arrived]]] = {}
        self._count = itertools.count()

    def take_posted(self, group: int, src: int, tag: int) -> Pending | None:
        """The receive an arriving message from ``src`` goes to, removed from the queue."""
        if self._wild and tag >= 0 and group in self._wild:
            return self._take_wild(group, src, tag)
        q = self._posted.get((group, src, tag))
        qa = self._posted_any.get((group, tag))
        if q and (not qa or q[0].order < qa[0].order):
            req = q.popleft()
            if not q:
                del self._posted[(group, src, tag)]
        elif qa:
            req = qa.popleft()
            if not qa:
                del self._posted_any[(group, tag)]
        else:
            return None
        req.state = MATCHED
        return req

    def _take_wild(self, group: int, src: int, tag: int) -> Pending | None:
        """take_posted when any-tag receives are posted in ``group``: the
        earliest posted of the exact, any-source and first fitting any-tag one."""
        best: Pending | None = None
        for q in (self._posted.get((group, src, tag)), self._posted_any.get((group, tag))):
            if q and (best is None or q[0].order < best.order):
                best = q[0]
        for r in self._wild[group]:
            if r.src == ANY or r.src == src:
                if best is None or r.order < best.order:
                    best = r
                break
        if best is None:
            return None
        table, key = self._queue_of(best)
        q = table[key]
        q.remove(best)
        if not q:
            del table[key]
        best.state = MATCHED
        return best

    def quiet(self, group: int, src: int, tag: int) -> bool:
        """Whether a message ``(group, src, tag)`` (a user tag) may go to a
        receive that is not posted (mesh.transport.recv_ring): no posted
        receive could take it, and no message it would overtake waits."""
        if ((self._posted and (group, src, tag) in self._posted)    # (empty tables: no key)
                or (self._posted_any and (group, tag) in self._posted_any)
                or (self._wild and group in self._wild)):
            return False
        if not self._unexpected:
            return True
        by_src = self._unexpected.get((group, tag))
        return not by_src or src not in by_src

    def add_unexpected(self, group: int, tag: int, msg: Arrived) -> Sequence[Pending]:
        """Queue ``msg``; return the probes it completes (taken out, ``got`` set)."""
        msg.order = next(self._count)
        self._unexpected.setdefault((group, tag), {}).setdefault(msg.src, deque()).append(msg)
        if not self._probes or group not in self._probes:
            return _NONE
        q = self._probes[group]
        hit = [p for p in q if (p.src == ANY or p.src == msg.src)
               and (p.tag == tag or (p.tag == ANY_TAG and tag >= 0))]
        if hit:
            for p in hit:
                q.remove(p)
                p.got, p.state = msg.got, MATCHED
            if not q:
                del self._probes[group]
        return hit

    def waiting(self, group: int, src: int, tag: int) -> Arrived | None:
        """The message a receive of ``(group, src, tag)`` posted now would
        take, left in the queue: the oldest of those it matches."""
        if tag != ANY_TAG:
            by_src = self._unexpected.get((group, tag))
            if not by_src:
                return None
            if src != ANY:
                q = by_src.get(src)
                return q[0] if q else None
            return min((q[0] for q in by_src.values()), key=_order)
        heads = [q[0] for (g, t), by_src in self._unexpected.items() if g == group and t >= 0
                 for s, q in by_src.items() if src == ANY or s == src]
        return min(heads, key=_order) if heads else None

    def waits_for(self, src: int) -> bool:
        """Whether a receive or probe is posted that a message from world
        rank ``src`` could answer (one naming it, or any rank)."""
        if self._posted_any or any(k[1] == src for k in self._posted):
            return True
        return any(r.src == ANY or r.src == src for table in (self._wild, self._probes)
                   for q in table.values() for r in q)

    def mark_granted(self, src: int) -> None:
        """Mark every message from ``src`` waiting unmatched as granted."""
        for by_src in self._unexpected.values():
            for m in by_src.get(src, ()):
                m.granted = True

    def take(self, group: int, msg: Arrived) -> None:
        """Remove ``msg``, the head of its (source, tag) queue (see waiting)."""
        by_src = self._unexpected[(group, msg.tag)]
        q = by_src[msg.src]
        q.popleft()
        if not q:
            del by_src[msg.src]
            if not by_src:
                del self._unexpected[(group, msg.tag)]

    def post(self, req: Pending, take: bool = True) -> Arrived | None:
        """Match ``req`` against waiting messages and return the one it
        matched, taken from the queue (left there when not ``take``: a probe,
        or a receive that must check its ``out=`` first, see take); enqueue
        ``req`` if none matches."""
        msg = self.waiting(req.group, req.src, req.tag)
        if msg is not None:
            if take:
                self.take(req.group, msg)
                req.state = MATCHED
            return msg
        req.order = next(self._count)
        table, key = self._queue_of(req)
        posted = table.get(key)
        if posted is None:
            table[key] = posted = deque()
        posted.append(req)
        return None

    def cancel(self, req: Pending, error: BaseException | None = None) -> bool:
        """Withdraw a receive still waiting for its message; False once matched
        (or taken out otherwise). ``error``: its error, in place before it
        reads as DONE."""
        if req.state != POSTED:
            return False
        table, key = self._queue_of(req)
        q = table.get(key)
        if q is not None and req in q:
            q.remove(req)
            if not q:
                del table[key]    # one empty queue per withdrawn tag would add up
            if error is not None:
                req.error = error
            req.state = DONE
            return True
        return False

    def _queue_of(self, req: Pending) -> tuple[dict[Any, deque[Pending]], Any]:
        """The table and key under which ``req`` waits while posted."""
        if type(req) is Probe:
            return self._probes, req.group
        if req.tag == ANY_TAG:
            return self._wild, req.group
        if req.src == ANY:
            return self._posted_any, (req.group, req.tag)
        return self._posted, (req.group, req.src, req.tag)

    def _tables(self) -> tuple[dict[Any, deque[Pending]], ...]:
        return (self._posted, self._posted_any, self._wild, self._probes)

    def quiet_tables(self) -> tuple[dict, dict, dict, dict]:
        """The tables ``quiet`` reads (never replaced): while all four are
        empty, ``quiet`` is true for every message, and a caller may skip it."""
        return (self._posted, self._posted_any, self._wild, self._unexpected)

    def posted_some(self) -> bool:
        """Whether any receive or probe is posted."""
        return bool(self._posted or self._posted_any or self._wild or self._probes)

    def posted(self) -> Iterator[Pending]:
        for q in [q for table in self._tables() for q in table.values()]:
            yield from q

    def remove_posted(self, pred: Callable[[Pending], bool]) -> list[Pending]:
        """Take out and return every posted receive for which ``pred`` holds."""
        taken: list[Pending] = []
        for table in self._tables():
            for key in list(table):
                q = table[key]
                keep = deque(r for r in q if not pred(r))
                taken.extend(r for r in q if pred(r))
                if keep:
                    table[key] = keep
                else:
                    del table[key]
        return taken

    def unmatched(self, src: int, limit: int = 4) -> list[tuple[int, int, Arrived, int]]:
        """``(group, tag, oldest message, count)`` of the messages that wait
        from world rank ``src`` (from any rank: ``ANY``), oldest first, at
        most ``limit`` of them: what a timeout's error names (a tag or a
        group the sender and the receiver do not agree on)."""
        found = [(g, t, q[0], len(q)) for (g, t), by_src in self._unexpected.items()
                 for s, q in by_src.items() if q and (src == ANY or s == src)]
        found.sort(key=lambda f: f[2].order)
        return found[:limit]

    def drop_unexpected(self, group: int, tag: int) -> list[Arrived]:
        by_src = self._unexpected.pop((group, tag), {})
        return [m for q in by_src.values() for m in q]

    def take_synced(self, src: int, ident: int) -> Arrived | None:
        """World rank ``src``'s synchronous send ``ident`` (Arrived.sync),
        taken out if it waits here unmatched (a cancel withdraws it); None
        if it does not."""
        for key, by_src in self._unexpected.items():
            q = by_src.get(src)
            if q:
                for m in q:
                    if m.sync == ident:
                        q.remove(m)
                        if not q:
                            del by_src[src]
                            if not by_src:
                                del self._unexpected[key]
                        return m
        return None

    def drop_synced(self) -> list[Arrived]:
        """Every synchronous send's message waiting unmatched, taken out (a
        closing rank's: each sender told it was dropped unread)."""
        dropped = []
        for key in list(self._unexpected):
            by_src = self._unexpected[key]
            for src in list(by_src):
                q = by_src[src]
                dropped += [m for m in q if m.sync >= 0]
                by_src[src] = q = deque(m for m in q if m.sync < 0)
                if not q:
                    del by_src[src]
            if not by_src:
                del self._unexpected[key]
        return dropped

    def drop_group(self, group: int) -> list[Arrived]:
        """Every message of ``group`` waiting unmatched, taken out."""
        return [m for key in [k for k in self._unexpected if k[0] == group]
                for m in self.drop_unexpected(*key)]


_NONE: tuple[Pending, ...] = ()


def _order(m: Arrived) -> int:
    return m.order
