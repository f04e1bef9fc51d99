"""Matching of incoming messages to posted receives (MPI semantics).

A message ``(group, src, tag)`` goes to the earliest posted receive that names
its source or ``ANY``; if none is posted it waits in the unexpected queue, in
arrival order, never dropped. Not thread-safe: the transport holds its lock."""
from __future__ import annotations

import itertools
import threading
from collections import deque
from typing import Any, Callable, Iterator

__all__ = ["ANY", "Flag", "Pending", "Arrived", "Matcher", "describe"]

ANY = -1


def describe(d: Any) -> str:
    """An operation's description. Point-to-point calls pass the parts,
    ``(verb, peer, tag, group name[, peer's world rank, collective])``, and
    the text is made only when an error or a status report needs it, not
    once per message. A peer of a sub-group is named in both numberings
    (its world rank given only for sub-groups); a collective's message
    names the collective, its sequence number (minus the tag) and group::

        recv from rank 1 (tag 7, group world)
        recv from rank 1 of group world/[1, 2] (world rank 2), tag 7
        all_reduce #3 on group world/[1, 2]: recv from rank 1 (world rank 2)
    """
    if type(d) is str:
        return d
    verb, peer, tag, name = d[0], d[1], d[2], d[3]
    world = d[4] if len(d) > 4 else None
    coll = d[5] if len(d) > 5 else None
    who = "any rank" if peer == ANY else f"rank {peer}"
    if coll is not None:
        mine = "" if world is None or peer == ANY else f" (world rank {world})"
        return f"{coll} #{-tag} on group {name}: {verb} {who}{mine}"
    if world is None or peer == ANY:
        return f"{verb} {who} (tag {tag}, group {name})"
    return f"{verb} {who} of group {name} (world rank {world}), tag {tag}"


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


class Pending:
    """A posted receive; completed by the transport, waited on by the caller."""

    __slots__ = ("group", "src", "tag", "out", "fp", "_desc", "order", "event",
                 "value", "error", "state", "device", "source")

    def __init__(self, group: int, src: int, tag: int, out: Any, fp: Any, desc: Any) -> None:
        self.group, self.src, self.tag, self.out, self.fp = group, src, tag, out, fp
        self._desc = desc
        self.order = 0
        self.event = Flag()
        self.value: Any = None
        self.error: BaseException | None = None
        self.state = 0  # 0 posted, 1 matched (payload on its way), 2 complete
        self.device = False  # the message came from a device array
        self.source = -1     # the world rank whose message matched it (src may be ANY)

    @property
    def desc(self) -> str:
        return describe(self._desc)

    def complete(self, value: Any) -> None:
        self.value = value
        self.state = 2
        self.event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.state = 2
        self.event.set()


class Arrived:
    """A message that arrived before its receive was posted."""

    __slots__ = ("src", "value", "nbytes", "fp", "order", "device")

    def __init__(self, src: int, value: Any, nbytes: int, fp: Any, order: int,
                 device: bool = False) -> None:
        self.src, self.value, self.nbytes, self.fp, self.order = src, value, nbytes, fp, order
        self.device = device


class Matcher:
    def __init__(self) -> None:
        self._posted: dict[tuple[int, int, int], deque[Pending]] = {}
        self._posted_any: dict[tuple[int, int], deque[Pending]] = {}
        self._unexpected: dict[tuple[int, int], dict[int, deque[Arrived]]] = {}
        self._count = itertools.count()

    def take_posted(self, group: int, src: int, tag: int) -> Pending | None:
        """The receive an arriving message from ``src`` goes to, removed from the queue."""
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
        req.state = 1
        req.source = src
        return req

    def add_unexpected(self, group: int, tag: int, msg: Arrived) -> None:
        msg.order = next(self._count)
        self._unexpected.setdefault((group, tag), {}).setdefault(msg.src, deque()).append(msg)

    def post(self, req: Pending) -> Arrived | None:
        """Match ``req`` against waiting messages; enqueue it if none fits."""
        by_src = self._unexpected.get((req.group, req.tag))
        if by_src:
            src: int | None
            if req.src == ANY:
                src = min(by_src, key=lambda s: by_src[s][0].order)
            else:
                src = req.src if req.src in by_src else None
            if src is not None:
                q = by_src[src]
                msg = q.popleft()
                if not q:
                    del by_src[src]
                    if not by_src:
                        del self._unexpected[(req.group, req.tag)]
                req.state = 1
                req.source = src
                return msg
        req.order = next(self._count)
        table, key = self._queue_of(req)
        posted = table.get(key)
        if posted is None:
            table[key] = posted = deque()
        posted.append(req)
        return None

    def cancel(self, req: Pending) -> bool:
        """Withdraw a receive still waiting for its message; False once matched."""
        if req.state != 0:
            return False
        table, key = self._queue_of(req)
        q = table.get(key)
        if q is not None and req in q:
            q.remove(req)
            if not q:
                del table[key]    # one empty queue per withdrawn tag would add up
            req.state = 2
            return True
        return False

    def _queue_of(self, req: Pending) -> tuple[dict[Any, deque[Pending]], Any]:
        """The table and key under which ``req`` waits while posted."""
        if req.src == ANY:
            return self._posted_any, (req.group, req.tag)
        return self._posted, (req.group, req.src, req.tag)

    def posted(self) -> Iterator[Pending]:
        for q in list(self._posted.values()) + list(self._posted_any.values()):
            yield from q

    def remove_posted(self, pred: Callable[[Pending], bool]) -> list[Pending]:
        """Take out and return every posted receive for which ``pred`` holds."""
        taken: list[Pending] = []
        tables: tuple[dict[Any, deque[Pending]], ...] = (self._posted, self._posted_any)
        for table in tables:
            for key in list(table):
                q = table[key]
                keep = deque(r for r in q if not pred(r))
                taken.extend(r for r in q if pred(r))
                if keep:
                    table[key] = keep
                else:
                    del table[key]
        return taken

    def drop_unexpected(self, group: int, tag: int) -> list[Arrived]:
        by_src = self._unexpected.pop((group, tag), {})
        return [m for q in by_src.values() for m in q]
