"""Same-host latency path: mailboxes read with cross-memory attach.

A socket round trip between two processes on this 2-core machine costs
200-400 us; a small all_reduce needs log2(n) of them. Here every rank of a
group keeps a mailbox in its own memory, two slots used alternately::

    head = [cookie | ack | seq0 fplen0 len0 | seq1 fplen1 len1]   (read in one go)
    slot s body = [fingerprint | payload]

To all_reduce, a rank writes its contribution and fingerprint into slot
(seq % 2), then the sequence number, and polls its peers' heads with
``process_vm_readv`` until each shows the same number; then it reads their
contributions and reduces them all in rank order, so every rank computes
the same bits. No socket message at all. ``ack`` is the last collective a
rank is done reading for; a slot is rewritten only once every peer's ack
has passed what it holds (in lockstep the acks seen while polling already
say so, so this costs nothing).

Every rank reads every fingerprint, so every rank sees a mismatch itself.
A peer that took another path (a socket collective) is caught by a receive
posted on the tag after a short wait; a dead peer fails the read.
"""
from __future__ import annotations

import os
import secrets
import threading
import time
import weakref
from typing import Any, Callable

import msgpack
import numpy as np

from mesh import ANY, LostPeerError, MeshError, MeshTimeoutError, MismatchError

from . import cma
from .ops import ReduceOp
from .runner import Ctx

__all__ = ["CAPACITY", "fits", "all_reduce", "barrier"]

CAPACITY = 64 << 10
_FP_ROOM = 1024
_HEAD = 64
_BODY = _FP_ROOM + CAPACITY
_SPIN_S = 0.002
_WATCH_AFTER_S = 0.0005


class _Box:
    """One group's mailboxes: ours, where the peers' are, and the last
    head seen of each peer."""

    def __init__(self, ctx: Ctx) -> None:
        self.mem = np.zeros(_HEAD + 2 * _BODY, np.uint8)
        self.head = self.mem[:64].view(np.int64)[1:]
        self.mem[:8].view(np.int64)[0] = cookie = secrets.randbits(63)
        where = cma._exchange(ctx, [self.mem.ctypes.data, cookie])
        self.addrs = [a for a, _ in where]
        self.cookies = [c for _, c in where]
        self.peek = np.zeros(8, np.int64)
        self.seen = np.zeros((ctx.g.size, 7), np.int64)


_boxes: "weakref.WeakKeyDictionary[Any, _Box]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def fits(ctx: Ctx, nbytes: int) -> bool:
    """Whether a collective of ``nbytes`` may use the mailboxes (a same-host
    group whose members may read each other); sets them up on first use."""
    if nbytes > CAPACITY or ctx.g.size == 1 or not cma.usable(ctx):
        return False
    with _lock:
        box = _boxes.get(ctx.g)
    if box is None:
        box = _Box(ctx)
        with _lock:
            _boxes[ctx.g] = box
    return True


def _peek(ctx: Ctx, box: _Box, peer: int) -> np.ndarray:
    """Refresh and return the last head seen of ``peer``."""
    cma.peer_read(ctx, peer, box.addrs[peer], box.peek)
    if box.peek[0] != box.cookies[peer]:
        raise LostPeerError(f"rank {ctx.g.rank}: collective #{-ctx.tag} on group "
                            f"{getattr(ctx.g, 'name', '?')}: rank {peer}'s mailbox was freed "
                            f"(its group was closed)", ctx.g.ranks[peer])
    box.seen[peer] = box.peek[1:]
    return box.seen[peer]


class _Waiting:
    """One collective's wait on its peers: since when, until when, and the
    receive posted on the tag once the wait gets long."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.t0 = time.monotonic()
        self.limit = float(getattr(getattr(ctx.g, "_t", None), "timeout", 300.0))
        self.watch: Any = None
        self.error: BaseException | None = None

    def where(self) -> str:
        return (f"rank {self.ctx.g.rank}: collective #{-self.ctx.tag} on group "
                f"{getattr(self.ctx.g, 'name', '?')}")

    def posted(self) -> Any:
        if self.watch is None:
            self.watch = self.ctx.g._irecv(ANY, self.ctx.tag, fp=self.ctx.fp)
        return self.watch

    def idle(self) -> BaseException | None:
        """Between polls: yield the core; after a while post a receive on the
        tag (a peer on a socket path would be talking to us there, and an
        abort fails it) and sleep. Returns the error the receive caught."""
        waited = time.monotonic() - self.t0
        if waited < _SPIN_S:
            os.sched_yield()
            if waited < _WATCH_AFTER_S:
                return None
        watch = self.posted()
        if watch.done():
            try:
                watch.wait()
            except MeshError as e:
                return e
            return MeshError(f"{self.where()}: a peer sent a message where none was expected")
        if waited > self.limit:
            raise MeshTimeoutError(f"{self.where()} timed out after {self.limit:g}s waiting "
                                   f"for its peers' mailboxes")
        if waited >= _SPIN_S:
            time.sleep(min(0.001, waited / 20))
        return None

    def skipped(self, peer: int) -> None:
        """``peer`` went on to later collectives without posting this one: it
        failed here, and whoever failed first aborted the tag; raise that."""
        try:
            self.posted().wait(timeout=0.2)
        except MeshTimeoutError:
            pass
        raise MeshError(f"{self.where()}: rank {peer} has moved past it without taking part "
                        f"(it called another collective or failed)")

    def close(self) -> None:
        if self.watch is not None and not self.watch.done():
            try:
                self.watch.wait(timeout=0)
            except MeshTimeoutError:
                pass


def _wait(ctx: Ctx, box: _Box, ready: Callable[[np.ndarray], bool], w: _Waiting) -> None:
    """Poll every peer's head until ``ready(head)`` holds for all of them. If
    the tag is aborted meanwhile and a peer never gets there, raise why; if
    they all do get there, carry on (each rank then sees a mismatch itself,
    as a MismatchError) and raise it at the end."""
    n, rank = ctx.g.size, ctx.g.rank
    todo = [(rank + k) % n for k in range(1, n) if not ready(box.seen[(rank + k) % n])]
    while todo:
        todo = [p for p in todo if not ready(_peek(ctx, box, p))]
        if todo:
            err = w.idle()
            if err is not None:
                todo = [p for p in todo if not ready(_peek(ctx, box, p))]
                if todo:
                    raise err
                w.error = err


def _fmt(fp: bytes) -> str:
    try:
        d = msgpack.unpackb(fp, raw=False)
        return f"{d.pop('coll', '?')}({', '.join(f'{k}={v}' for k, v in d.items())})"
    except Exception:
        return repr(fp)


def _run(ctx: Ctx, payload: np.ndarray, outs: list[np.ndarray | None]) -> None:
    """Post our payload, collect every peer's into ``outs[peer]``."""
    box = _boxes[ctx.g]
    seq, slot = -ctx.tag, -ctx.tag % 2
    fp = msgpack.packb(ctx.fp)
    if len(fp) > _FP_ROOM:
        raise ValueError(f"fingerprint of {len(fp)} bytes does not fit a mailbox")
    w = _Waiting(ctx)
    head, base = box.head, 1 + 3 * slot
    try:
        held = int(head[base])
        _wait(ctx, box, lambda h: h[0] >= held, w)
        body = box.mem[_HEAD + slot * _BODY:_HEAD + (slot + 1) * _BODY]
        raw = payload.reshape(-1).view(np.uint8)
        body[:len(fp)] = np.frombuffer(fp, np.uint8)
        body[_FP_ROOM:_FP_ROOM + raw.size] = raw
        head[base + 1], head[base + 2] = len(fp), raw.size
        head[base] = seq
        head[0] = max(head[0], seq - 1)
        _wait(ctx, box, lambda h: h[base] == seq or h[0] >= seq, w)
        n, rank = ctx.g.size, ctx.g.rank
        inbox = np.empty(_FP_ROOM + raw.size, np.uint8)
        for k in range(1, n):
            p = (rank + k) % n
            h = box.seen[p]
            if h[base] != seq:
                w.skipped(p)
            cma.peer_read(ctx, p, box.addrs[p] + _HEAD + slot * _BODY, inbox)
            theirs = bytes(inbox[:int(h[base + 1])])
            if theirs != fp or int(h[base + 2]) != raw.size:
                raise MismatchError(
                    f"rank {rank}: collective mismatch on group {getattr(ctx.g, 'name', '?')}: "
                    f"rank {rank} called {_fmt(fp)} but rank {p} called {_fmt(theirs)}")
            if outs[p] is not None:
                outs[p].reshape(-1).view(np.uint8)[...] = inbox[_FP_ROOM:]
        if w.error is not None:
            raise w.error
    finally:
        head[0] = max(head[0], seq)
        w.close()


def all_reduce(ctx: Ctx, buf: np.ndarray, op: ReduceOp) -> None:
    """``buf`` = every rank's ``buf`` combined in rank order."""
    n, rank = ctx.g.size, ctx.g.rank
    parts: list[np.ndarray | None] = [np.empty_like(buf) if p != rank else None
                                      for p in range(n)]
    _run(ctx, buf, parts)
    acc = buf.copy() if rank == 0 else parts[0]
    for p in range(1, n):
        op.combine(acc, buf if p == rank else parts[p])
    if acc is not buf:
        buf[...] = acc


def barrier(ctx: Ctx) -> None:
    _run(ctx, np.empty(0, np.uint8), [None] * ctx.g.size)
