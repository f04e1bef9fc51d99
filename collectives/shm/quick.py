"""The board side of a repeated tiny call (collectives.shm.tiny): ``Quick``,
Round's plain post and gather on one group's boards with every view made
once (collectives.shm.board, collectives.shm.round)."""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from mesh import Comm
from mesh.rings import fence

from .board import (_BODY, _BUSY_S, _CORES, _FENCE, _HEAD, _INLINE, _PEEK, _QUICK_SPIN_S,
                    _QUICK_YIELD_S, _SLOT_WORDS, ADDR, ADDR2, FPHASH, PAYLEN, STAGE, _boxes)


class Quick:
    """The board side of a repeated tiny call (collectives.shm.tiny), for one
    group with every peer's board mapped and one payload (``like``'s dtype
    and shape, inline) under one fingerprint: the plain case of Round's
    ``post`` and ``gather``, with every view made once. The payload is
    posted inline as Round posts it, and the peers' payloads are read
    where they lie, in their mapped boards (``views``: per slot, rank
    order, this rank's own post in its place), until ``done`` acks them.
    Anything else (a peer not done with the slot, a wait past a short
    spin or a few yields, a mismatch) tells the caller to go on with a
    Round, which picks up where this left off."""

    def __init__(self, g: Comm, like: np.ndarray, sig: tuple[bytes, int],
                 sizes: list[int] | None = None, tail: bytes = b"",
                 items: list[int] | None = None) -> None:
        box = _boxes[g]
        self.box, self.head, self.heads, self.peers = box, box.head, box.heads, box.peers
        self.fp, self.hash = sig
        size = like.nbytes
        # (per rank, the payload it posts: like's bytes and this rank's ``tail`` after
        # them, or as ``sizes`` says, 0 where a rank posts none: a scatter's; ``items``,
        # an uneven call's: rank p posts items[p] of like's dtype, its view flat, and
        # sizes[p] bytes in all where given: an all_to_all_v's, its counts after them)
        if items is not None and sizes is None:
            sizes = [k * like.itemsize for k in items]
        self.sizes = [size] * g.size if sizes is None else sizes
        self.size = self.sizes[g.rank]
        self.tail = tail
        self.meta = np.array([0, len(self.fp), self.size, 0, len(tail), self.hash],
                             np.int64).data
        # (the words after seq, as Round.post writes them: stage fplen paylen addr addr2 fphash;
        # addr2, a scatter's: the bytes of the tail, collectives.shm.local.scatter's)

        def payload(row: np.ndarray, slot: int, p: int) -> np.ndarray:
            at = _HEAD + slot * _INLINE
            if items is not None:
                return row[at:at + items[p] * like.itemsize].view(like.dtype)
            return row[at:at + size].view(like.dtype).reshape(like.shape)

        rank = g.rank
        self.views = [[payload(box.mem if p == rank else box.rows[p], s, p)
                       for p in range(g.size)] for s in (0, 1)]
        self.mine = [self.views[0][rank], self.views[1][rank]]
        self.spin = _BUSY_S if g.size <= _CORES else _QUICK_SPIN_S

    def post(self, seq: int, a: np.ndarray | None) -> bool:
        """Round.post of ``a`` (None: no payload) for call ``seq``; False,
        with nothing written, where a peer has not acked this slot's last
        call yet."""
        head, heads, slot = self.head, self.heads, seq & 1
        b = 1 + _SLOT_WORDS * slot
        held = head[b]
        for p in self.peers:
            if heads[p][0] < held:
                return False
        box = self.box
        if box.slot_fp[slot] is not self.fp:
            body = _PEEK + slot * _BODY
            box.mv[body:body + len(self.fp)] = self.fp
            box.slot_fp[slot] = self.fp
        if a is not None:
            self.mine[slot][...] = a
            if self.tail:
                at = _HEAD + slot * _INLINE + a.nbytes
                box.mv[at:at + len(self.tail)] = self.tail
        if box.slot_words[slot] is not self:     # (a Round or another Quick wrote them)
            head[b + 1:b + 1 + 6] = self.meta
            box.slot_words[slot] = self
        if _FENCE:
            fence()
        head[b] = seq
        if head[0] < seq - 1:
            head[0] = seq - 1
        box.ring_asleep()
        return True

    def arrived(self, seq: int) -> bool:
        """Whether every peer has posted call ``seq`` with this fingerprint
        and payload size, after a short wait (``_wait``). False: go on with
        Round.gather (a longer wait, an abort, a lost peer, a mismatch)."""
        heads, b, sizes = self.heads, 1 + _SLOT_WORDS * (seq & 1), self.sizes
        hash_at, size_at = b + FPHASH, b + PAYLEN
        for p in self.peers:
            h = heads[p]
            if h[b] != seq and not self._wait(h, b, seq):
                return False
            if _FENCE:
                fence()     # what the post holds is read after its seq
            if h[hash_at] != self.hash or h[size_at] != sizes[p]:
                return False
        return True

    def staged(self, seq: int, peers: list[int], k: int) -> bool:
        """Whether each of ``peers`` (all there: ``arrived``) has reached
        stage ``k`` of call ``seq`` (Round.wait_stage's), after a short wait
        as ``arrived``'s."""
        at = 1 + _SLOT_WORDS * (seq & 1) + STAGE
        for p in peers:
            h = self.heads[p]
            if h[at] < k and not self._wait_stage(h, at, k):
                return False
        if _FENCE:
            fence()
        return True

    def tails(self, seq: int, peer: int, tail: bytes) -> bool:
        """Whether ``peer``'s post of call ``seq`` (arrived) ends with
        ``tail``, as its addr2 says (and addr 0: a scatter's small form, its
        meta after the rows; an all_to_all_v's, its counts after them)."""
        h, b = self.heads[peer], 1 + _SLOT_WORDS * (seq & 1)
        if h[b + ADDR] != 0 or h[b + ADDR2] != len(tail):
            return False
        at = _HEAD + (seq & 1) * _INLINE + self.sizes[peer] - len(tail)
        return bytes(self.box.rows[peer].data[at:at + len(tail)]) == tail

    def _wait_stage(self, h: Any, at: int, k: int) -> bool:
        """_wait's, until the stage word at ``at`` reaches ``k``."""
        clock = time.perf_counter
        start = clock()
        end = start + self.spin
        while h[at] < k:
            if clock() > end:
                break
        else:
            return True
        end = start + _QUICK_YIELD_S
        while h[at] < k:
            if clock() > end:
                return False
            os.sched_yield()
        return True

    def stage(self, seq: int, k: int) -> None:
        """Round.stage's: this rank has reached stage ``k`` of call ``seq``."""
        b = 1 + _SLOT_WORDS * (seq & 1)
        self.box.slot_words[seq & 1] = None     # (post writes stage 0 again)
        self.head[b + STAGE] = k
        self.box.ring_asleep()

    def _wait(self, h: Any, b: int, seq: int) -> bool:
        """Until ``h``'s slot word at ``b`` says ``seq``: spin (_BUSY_S where
        every rank of the group has a core, else _QUICK_SPIN_S), then yield
        (the rank waited for may need this core) up to _QUICK_YIELD_S.
        False once that is over."""
        clock = time.perf_counter
        start = clock()
        end = start + self.spin
        while h[b] != seq:
            if clock() > end:
                break
        else:
            return True
        end = start + _QUICK_YIELD_S
        while h[b] != seq:
            if clock() > end:
                return False
            os.sched_yield()
        return True

    def done(self, seq: int) -> None:
        """This rank is done reading the peers' posts of call ``seq`` (Round's exit)."""
        if _FENCE:
            fence()     # (the reads above come before the ack)
        head = self.head
        if head[0] < seq:
            head[0] = seq
        self.box.ring_asleep()
