"""One collective on the board (collectives.shm.board): ``Round`` posts
this rank's fingerprint and payload (or buffer addresses) in its slot,
waits for the peers' posts (collectives.shm.waiting), checks fingerprints,
reads payloads, arenas and stages; ``announce`` posts a fingerprint alone."""
from __future__ import annotations

import errno
import time
from typing import Any, Callable

import msgpack
import numpy as np

from mesh import Comm, LostPeerError, MeshError, MismatchError
from mesh.rings import fence

from ..runner import Ctx
from . import cma
from .board import (_ARENA_AT, _BODY, _FORGOTTEN, _FP_ROOM, _HEAD, _INLINE, _PEEK, _SIZE,
                    _SLOT_WORDS, _WITHDRAWN, ADDR, ADDR2, FPHASH, FPLEN, PAYLEN, SEQ, STAGE,
                    _boxes, _raw, signature)
from .waiting import _Waiting, _ranks


def mismatch_text(g: Comm, tag: int, peer: int, mine: str, other: str) -> str:
    """A mismatch found on a board or a link, worded as the inbox words
    those it finds: world ranks (group ranks beside them in a sub-group)."""
    me, them = g.ranks[g.rank], g.ranks[peer]
    local = "" if (me, them) == (g.rank, peer) else \
        f" (ranks {g.rank} and {peer} of the group)"
    return (f"rank {me}: collective mismatch on group {g.name} at call #{-tag}: rank {me} "
            f"called {mine} but rank {them} called {other}{local}")


def _fmt(fp: bytes) -> str:
    try:
        d = msgpack.unpackb(fp, raw=False)
        return f"{d.pop('coll', '?')}({', '.join(f'{k}={v}' for k, v in d.items())})"
    except Exception:
        return repr(fp)


class Round:
    """One collective on the board; use as a context manager::

        with Round(ctx) as r:
            r.post(payload=a)            # or addr=buf.ctypes.data
            r.gather(outs)               # peers' payloads; fingerprints checked
            ...; r.stage(1); r.wait_stage(peers, 1) ...

    ``sig``: ``signature(ctx.fp)``, when the caller keeps it between calls.
    """

    def __init__(self, ctx: Ctx, sig: tuple[bytes, int] | None = None) -> None:
        self.ctx, self.box = ctx, _boxes[ctx.g]
        self.seq = -ctx.tag
        self.slot = self.seq % 2
        self.base = _SLOT_WORDS * self.slot
        self.fp, self.hash = signature(ctx.fp) if sig is None else sig
        self.wait = _Waiting(ctx)
        self.addr2: list[int] = []
        self.peers = self.box.peers

    def __enter__(self) -> "Round":
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        box = self.box
        head, b = box.head, 1 + self.base
        if kind is not None and head[b + SEQ] == self.seq and not issubclass(kind,
                                                                             MismatchError):
            # failed (not on what the posts say, which every rank sees for itself):
            # the post is withdrawn, so that a peer that comes to the call later
            # raises its abort (gather) instead of finishing on what was posted (a
            # rank stopped past its peers' timeout: resumed, its main thread may
            # run before its transport reads their aborts)
            head[b + FPHASH] = _WITHDRAWN
            box.slot_words[self.slot] = None
        head[0] = max(head[0], self.seq)
        self.box.ring()
        self.wait.close()

    def _peek(self, peer: int) -> Any:
        box = self.box
        if box.boards[peer] is None:
            err = box.readers[peer]()
            if err:
                raise cma.failed_read(self.ctx, peer, err, "the board")
        cookie = box.seen_cookie[peer][0]
        if cookie != box.cookies[peer] and cookie != _FORGOTTEN:   # (its posts still hold)
            raise LostPeerError(f"{self.wait.where()}: {_ranks(self.ctx, [peer])}'s board was "
                                f"freed (its group was closed)", self.ctx.g.ranks[peer])
        return box.heads[peer]

    def _alive(self, peer: int) -> MeshError | None:
        """A mapped board outlives its process: read it across processes to
        learn that the peer is gone (ESRCH): the error, returned, so that
        the caller looks at the board once more (the peer may have done its
        part, then left, since the last look). Another failure (EFAULT) only
        says that the peer has let its own mapping go (it dropped the group
        after its part): this rank's mapping still holds the board."""
        box = self.box
        if box.boards[peer] is not None:
            err = box.readers[peer]()
            if err == errno.ESRCH:
                return cma.failed_read(self.ctx, peer, err, "the board")
        return None

    def _left(self, peers: list[int]) -> MeshError | None:
        """LostPeerError if one of ``peers`` has closed its mesh (a goodbye
        reaches the transport's waits, not this poll of memory) or died."""
        ch, what = self.ctx.ch, self.wait.what or self.wait.where().split(": ", 1)[1]
        for p in peers:
            err = ch.left(p, what)
            if err is not None:     # one that aborted this call and then left: its abort says why
                return ch.aborted(self.ctx.tag, what) or err
        return None

    def _until(self, peers: list[int], ready: Callable[[Any], bool]) -> None:
        """Poll peers' heads until ``ready`` holds for all (one at a time:
        all must get there). If the tag is aborted meanwhile, or the mesh
        loses a peer, and a peer never gets there, raise why; if they all
        get there, carry on (each rank then sees a mismatch itself, as a
        MismatchError; a peer that left after doing its part is no error)
        and raise an abort at the end."""
        box = self.box
        heads, bells = box.heads, box.bells
        todo = [p for p in peers if not ready(heads[p])]
        if not todo:
            return
        wait = self.wait
        wait.t0, wait.reports = time.monotonic(), 0
        try:
            self._until_all(todo, ready, bells)
        finally:
            if wait.told:
                wait.told = False
                self.ctx.ch.waiting(None)

    def _until_all(self, todo: list[int], ready: Callable[[Any], bool], bells: Any) -> None:
        """_until's loop, once some peer is not there yet."""
        wait, box = self.wait, self.box
        seen = 0
        while todo:
            while todo:
                rung = bells[todo[0]]
                if rung is not None:
                    seen = int(rung[1][0])    # (before the look: a ring after it wakes us)
                if not ready(self._peek(todo[0])):
                    break
                todo.pop(0)
            if not todo:
                break
            err = wait.idle(todo, box, seen)
            if err is None and wait.watch is not None:
                err = self._alive(todo[0]) or self._left(todo)
            if err is not None:
                todo = [p for p in todo if not ready(self._peek(p))]
                if todo:
                    raise err
                if not isinstance(err, LostPeerError):
                    wait.error = err

    def post(self, payload: np.ndarray | None = None, addr: int = 0, addr2: int = 0) -> None:
        """Publish this rank's fingerprint and payload (or buffer addresses)."""
        box = self.box
        head, b, slot = box.head, 1 + self.base, self.slot
        held = head[b + SEQ]
        self._until(self.peers, lambda h: h[0] >= held)
        body = _PEEK + slot * _BODY
        if box.slot_fp[slot] != self.fp:
            box.mv[body:body + len(self.fp)] = self.fp
            box.slot_fp[slot] = self.fp
        size = 0
        if payload is not None:
            raw = _raw(payload)
            size = raw.nbytes
            at = _HEAD + slot * _INLINE if size <= _INLINE else body + _FP_ROOM
            box.mv[at:at + size] = raw
        box.slot_words[slot] = None
        head[b + STAGE], head[b + FPLEN], head[b + PAYLEN] = 0, len(self.fp), size
        head[b + ADDR], head[b + ADDR2], head[b + FPHASH] = addr, addr2, self.hash
        fence()
        head[b + SEQ] = self.seq
        head[0] = max(head[0], self.seq - 1)
        box.ring()

    def gather(self, outs: list[np.ndarray | None] | None = None) -> list[int]:
        """Wait for every peer's post; check fingerprints; copy the payload of
        each peer p with an ``outs[p]`` (contiguous, its exact size) there.
        Returns the peers' ``addr`` by rank (``addr2`` in ``self.addr2``)."""
        seq, b, slot = self.seq, 1 + self.base, self.slot
        self._until(self.peers, lambda h: h[b + SEQ] == seq or h[0] >= seq)
        fence()      # what the posts hold is read after their seq (mapped boards)
        box = self.box
        n = self.ctx.g.size
        addrs, self.addr2 = [0] * n, [0] * n
        inline = slot * _INLINE
        for p in self.peers:
            h = self._peek(p)       # (the second read, where the board is not mapped)
            if h[b + SEQ] != seq or h[b + FPHASH] == _WITHDRAWN:
                self.wait.gone(p, "taking part")
            out = None if outs is None else outs[p]
            size = h[b + PAYLEN]
            if h[b + FPHASH] != self.hash or (out is not None and size != out.nbytes):
                self._mismatch(p, h, None if out is None else out.nbytes)
            if out is not None and size:
                if size <= _INLINE:
                    _raw(out)[:] = box.inline[p][inline:inline + size]
                else:
                    box.read_body(self.ctx, p, _PEEK + slot * _BODY + _FP_ROOM, out)
            addrs[p], self.addr2[p] = h[b + ADDR], h[b + ADDR2]
        if self.wait.error is not None:
            raise self.wait.error
        return addrs

    def arena(self, dtype: np.dtype) -> np.ndarray:
        """This rank's arena as ``dtype`` items (all of it), once no
        peer may still read what an earlier call left there: each peer's ack
        has reached that call (it has left it). Before ``post``."""
        box = self.box
        held = box.arena_seq
        self._until(self.peers, lambda h: h[0] >= held)
        box.arena_seq = self.seq
        return box.mem[_ARENA_AT:_SIZE].view(dtype)

    def arena_of(self, peer: int, dtype: np.dtype, lo: int, hi: int,
                 out: np.ndarray | None) -> np.ndarray:
        """Items [lo, hi) of ``peer``'s arena as ``dtype``: a view of its
        mapped board (no copy), else read across processes into ``out``
        (that many items), which is returned. After a wait for the stage
        at which the peer wrote them."""
        size = dtype.itemsize
        board = self.box.boards[peer]
        if board is not None:
            return board[_ARENA_AT + lo * size:_ARENA_AT + hi * size].view(dtype)
        assert out is not None
        self.box.read_body(self.ctx, peer, _ARENA_AT + lo * size, out)
        return out

    def publish(self, payload: np.ndarray, k: int) -> None:
        """Put ``payload`` (at most CAPACITY bytes) in this rank's slot, in
        place of what it posted (which no peer may still read: it posted
        none that peers gather), then reach stage ``k``: peers that waited
        for it take it with ``payload_into``."""
        box, b, slot = self.box, 1 + self.base, self.slot
        raw = _raw(payload)
        size = raw.nbytes
        at = _HEAD + slot * _INLINE if size <= _INLINE else _PEEK + slot * _BODY + _FP_ROOM
        box.mv[at:at + size] = raw
        box.head[b + PAYLEN] = size
        fence()
        box.head[b + STAGE] = k
        box.ring()

    def payload_into(self, peer: int, out: np.ndarray) -> None:
        """``peer``'s payload into ``out`` (contiguous, its exact size), after
        a wait for the stage it published it at."""
        b = 1 + self.base
        h = self._peek(peer)        # (the second read, where the board is not mapped)
        size = h[b + PAYLEN]
        if size != out.nbytes:
            self._mismatch(peer, h, out.nbytes)
        if size <= _INLINE:
            at = self.slot * _INLINE
            _raw(out)[:] = self.box.inline[peer][at:at + size]
        else:
            self.box.read_body(self.ctx, peer, _PEEK + self.slot * _BODY + _FP_ROOM, out)

    def payload_size(self, peer: int) -> int:
        """The bytes of ``peer``'s payload (after ``gather``)."""
        return int(self.box.heads[peer][1 + self.base + PAYLEN])

    def payload_part(self, peer: int, start: int, out: np.ndarray) -> np.ndarray:
        """Bytes [start, start + out.nbytes) of ``peer``'s payload (after
        ``gather``) as ``out``'s dtype: a view of its inline room as gather
        saw it or of its mapped board (no copy), else read across processes
        into ``out``, which is returned."""
        size, slot, end = self.box.heads[peer][1 + self.base + PAYLEN], self.slot, \
            start + out.nbytes
        if size <= _INLINE:
            at = _HEAD + slot * _INLINE
            return self.box.rows[peer][at + start:at + end].view(out.dtype)
        at = _PEEK + slot * _BODY + _FP_ROOM + start
        board = self.box.boards[peer]
        if board is not None:
            return board[at:at + out.nbytes].view(out.dtype)
        self.box.read_body(self.ctx, peer, at, out)
        return out

    def payload_of(self, peer: int) -> np.ndarray:
        """A copy of ``peer``'s payload, whatever its size (after ``gather``)."""
        h, slot = self.box.heads[peer], self.slot
        size = h[1 + self.base + PAYLEN]
        if size <= _INLINE:
            at = _HEAD + slot * _INLINE
            return self.box.rows[peer][at:at + size].copy()
        out = np.empty(size, np.uint8)
        self.box.read_body(self.ctx, peer, _PEEK + slot * _BODY + _FP_ROOM, out)
        return out

    def _mismatch(self, peer: int, h: Any, want: int | None) -> None:
        b = 1 + self.base
        theirs = np.zeros(min(max(h[b + FPLEN], 0), _FP_ROOM), np.uint8)
        try:
            self.box.read_body(self.ctx, peer, _PEEK + self.slot * _BODY, theirs)
        except MeshError:
            pass
        mine, other = _fmt(self.fp), _fmt(theirs.tobytes())
        if mine == other:
            other += (f" with a {h[b + PAYLEN]}-byte payload, {want} expected"
                      if h[b + FPHASH] == self.hash else
                      f" (fingerprint hash {h[b + FPHASH]:x}, ours {self.hash:x})")
        raise MismatchError(mismatch_text(self.ctx.g, self.ctx.tag, peer, mine, other))

    def stage(self, k: int) -> None:
        """Tell peers this rank has reached stage ``k`` of the collective."""
        self.box.slot_words[self.slot] = None
        self.box.head[1 + self.base + STAGE] = k
        self.box.ring()

    def stage_of(self, peer: int) -> int:
        """``peer``'s stage in this collective now, without waiting (0 before
        it has posted); what it wrote before that stage may be read then."""
        b = 1 + self.base
        h = self._peek(peer)
        if h[b + SEQ] != self.seq:
            return 0
        stage = int(h[b + STAGE])
        fence()
        return stage

    def wait_stage(self, peers: list[int], k: int, patient: bool = False) -> None:
        """Wait until each of ``peers`` has reached stage ``k``; ``patient``:
        sleeping between polls from the start (a wait on work across hosts)."""
        seq, b = self.seq, 1 + self.base
        self.wait.patient = patient
        try:
            self._until(peers, lambda h: (h[b + SEQ] == seq and h[b + STAGE] >= k)
                        or h[0] >= seq)
        finally:
            self.wait.patient = False
        fence()
        for p in peers:
            h = self.box.heads[p]
            if h[b + SEQ] != seq or h[b + STAGE] < k:
                self.wait.gone(p, f"reaching stage {k}")
        if self.wait.error is not None:
            raise self.wait.error


def announce(ctx: Ctx) -> None:
    """Post this call's fingerprint on this rank's board, no payload, and
    go: for a rank whose part runs over sockets where, by their own sizes,
    its peers' may run on their boards (a forced recursive doubling across
    the board's payload). A peer on the board that waits for this rank then
    sees the mismatch, as a MismatchError, and its abort reaches this rank's
    receives (one that only receives first, a fold at 3 ranks, sends nothing
    a board's watch could catch: every rank waited for the timeout)."""
    with Round(ctx) as r:
        r.post()
