"""Waits on peers' boards (collectives.shm.board): a wait spins, then
yields or sleeps on the late peer's bell (collectives.shm.bell), looks for
an abort of the call and at the deadline, and once it gets long posts a
receive on the tag (a peer on a socket path, an abort, a lost peer); and
``agree``, a wait for the peers to enter a call before a choice that rests
on whether they kept the boards."""
from __future__ import annotations

import errno
import os
import time
from typing import Any

import numpy as np

from mesh import Comm, LostPeerError, MeshError, MeshTimeoutError
from mesh.rings import fence

from ..runner import Ctx, caught, named
from . import bell, cma
from .board import (_BELL_WAIT_S, _BUSY_S, _CROWD_YIELD_S, _ENTERED, _FORGOTTEN, _SLOT_WORDS,
                    _SPIN_S, SEQ, _Box, _boxes, _lock, crowded)


_GONE_S = 0.2
"""The least a wait for the abort of a call a peer left takes (gone), its
deadline passed."""


class Stray(MeshError):
    """A peer sent a message on the call's tag where it should have posted
    on its board: it is not on the boards (it is setting them up, after a
    call that failed here while it set them up: collectives.host.hier)."""


class _Waiting:
    """Waits on peers: since when the current one runs (each wait spins
    before it sleeps), the time limit, and the receive posted on the tag
    once a wait gets long."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.t0 = time.monotonic()
        self.watch: Any = None
        self.error: BaseException | None = None
        self.crowded = crowded(ctx.g.size)
        self.busy = 0.0 if self.crowded else _BUSY_S
        self.patient = False    # sleep at once: a long wait, others need the cores
        self.reports = 0
        self.what: str | None = None
        self.told = False       # this rank's status says it waits here (Channel.waiting)

    def where(self) -> str:
        return self.ctx.where()

    def posted(self) -> Any:
        if self.watch is None:
            self.watch = self.ctx.watch()
        return self.watch

    def idle(self, waiting_for: list[int], box: "_Box | None" = None,
             seen: int = 0) -> BaseException | None:
        """Between polls: poll on (when every rank has a core); then, for
        _SPIN_S, look for an abort of the call (a lookup, no message) and at
        the deadline, and give the core away: a yield, or where the group
        has more ranks than cores (past _CROWD_YIELD_S) and the first late
        peer's board is mapped, a sleep on its bell (``seen``: the bell's value before its head was
        looked at) until it rings: polling would take a core from a rank
        with work; a patient wait (one on work across hosts) sleeps on
        the bell from the start. After that, post the receive (a peer on a socket path
        would talk to us there, an abort or a lost peer fails it) and sleep:
        on the bell where the board is mapped, else a nap. Returns the error
        found."""
        now = time.monotonic()
        waited = now - self.t0
        if waited < self.busy and not self.patient:
            return None
        ctx = self.ctx
        peer = waiting_for[0]
        rung = None if box is None else box.bells[peer]
        if waited < _SPIN_S and (not self.patient or rung is not None):
            if self.what is None:
                self.what = ctx.where().split(": ", 1)[1]
            aborted = ctx.ch.aborted(ctx.tag, self.what)
            if aborted is not None:
                return aborted
            if now <= ctx.deadline:
                if (self.patient or (self.crowded and waited >= _CROWD_YIELD_S)) \
                        and box is not None and rung is not None:
                    self._sleep(box, peer, rung[0], seen, _SPIN_S - waited)
                else:
                    os.sched_yield()
                return None
        watch = self.posted()
        if watch.done():
            try:
                watch.wait()
            except MeshError as e:
                return e
            return Stray(f"{self.where()}: a peer sent a message where none was expected")
        if time.monotonic() > ctx.deadline:
            raise _late(ctx, ctx.timed_out(f" waiting for {_ranks(ctx, waiting_for)} "
                                           f"(same-host board)"))
        if not self.told:       # a long wait: the peers' stall reports say where we are
            self.told = True
            ctx.ch.waiting(f"{self.where().split(': ', 1)[1]}: waiting for "
                           f"{_ranks(ctx, waiting_for)} (same-host board)", self.t0)
        self._report(waited, waiting_for)
        if box is None or rung is None:
            time.sleep(min(0.001, max(waited / 20, 0.00002)))
        else:
            self._sleep(box, peer, rung[0], seen,
                        min(_BELL_WAIT_S, max(0.0, ctx.deadline - time.monotonic())))
        return None

    @staticmethod
    def _sleep(box: "_Box", peer: int, addr: int, seen: int, timeout: float) -> None:
        """Sleep on ``peer``'s bell (at ``addr``) while it says ``seen``, at
        most ``timeout``; this rank's word says so meanwhile, for its ring."""
        box.asleep[0] = peer + 1
        fence()     # (the word before the look at the bell: the peer's ring sees one or the other)
        bell.wait(addr, seen, timeout)
        box.asleep[0] = 0

    def _report(self, waited: float, waiting_for: list[int]) -> None:
        """Every MESH_STALL_WARN seconds of one wait, log what the late peers
        last said they were doing (the mesh's stall report)."""
        ch = self.ctx.ch
        every = ch.stall_warn
        if not every or waited < every * (self.reports + 1):
            return
        self.reports += 1
        ch.stalled(self.where(), waiting_for, waited, self.ctx.timeout)

    def gone(self, peer: int, what: str) -> None:
        """``peer`` finished this collective without ``what``: it failed, or
        a member found its call mismatched (a user op's flat call where this
        rank's phase is on the board), and the tag's abort was on its way to
        this rank before the peer went on: a rank sends its own abort, or
        passes on one it heard, before it wakes from it (mesh.inbox's
        abort_local). Its board moving on (shared memory, at once) says
        nothing of when this rank's transport reads that abort (on a loaded
        machine, seconds later), so wait for it until the call's deadline
        (a lost peer fails the wait too) and raise it, as every rank must
        (a MismatchError where the calls differ); only if none comes, say
        that the peer left."""
        err = caught(self.posted(), max(_GONE_S, self.ctx.left()))
        if err is not None:
            raise err
        raise MeshError(f"{self.where()}: {_ranks(self.ctx, [peer])} left it without {what} "
                        f"(it called another collective or failed)")

    def close(self) -> None:
        if self.watch is not None and not self.watch.done():
            caught(self.watch, 0)


def _late(ctx: Ctx, e: MeshTimeoutError) -> BaseException:
    """A board wait's timeout ``e``, naming the members that, as their
    heartbeats last said, have not called the collective (hier.late_named):
    the peers a wait lists are those whose posts have not come, and a peer
    in the call may itself be waiting for the one that never came (at 3
    ranks and more: rank 0 waits for ranks 1 and 2, rank 2 for rank 1)."""
    from ..host.hier import late_named     # (hier imports this module: at the timeout)
    return late_named(ctx.g, ctx.tag, e)


def _ranks(ctx: Ctx, peers: list[int]) -> str:
    """Group ranks as errors name them (runner.named: with their world ranks where
    those differ)."""
    return ", ".join(named(ctx.g, p) for p in peers)


def agree(ctx: Ctx, g: Comm, seq: int) -> None:
    """Before this rank's choice between ``g``'s boards and setting them up
    again (available; collectives.host.hier's one board round or three
    phases), made for the call whose first round on ``g`` is ``seq``: wait
    until each peer has entered that call (its board's mark, or a post of
    it or later) or has forgotten the boards (its cookie), so that every
    member of ``g`` then reads the same cookies (kept). A peer forgets them
    after a failed call that set them up (collectives.host.hier.unsettle)
    and before its next call, but it may be descheduled between its abort
    and the mark, while this rank, whose part ended well, starts its next
    call: read then, the cookies said kept, and this rank took the boards
    (one board round) where the peer set them up again (three phases), a
    MismatchError or a Stray. Once every peer has posted after the round
    that set the boards up (none of them forgets them then: its part of
    that call ended well), no wait and no mark: a load per call. The wait
    is bounded by ``ctx``'s deadline and raises its abort or the loss of
    a peer (no receive posted: a peer that forgot may be setting them up
    again by messages on the tag, which one would take). Meanwhile this
    rank's ack says it is done with the rounds before ``seq`` (as its post
    would), which a peer that does not wait here may wait for to post."""
    with _lock:
        box = _boxes.get(g)
    if box is None or box.confirmed:
        return
    if all(_posted(box, p) > box.since for p in box.peers):
        box.confirmed = True
        return
    box.entered[0] = max(int(box.entered[0]), seq)
    box.head[0] = max(box.head[0], seq - 1)     # (done with the rounds before: as a post says)
    box.ring()
    todo = [p for p in box.peers if not _entered(ctx, box, p, seq)]
    t0 = time.monotonic()
    what = None
    try:
        while todo:
            waited = time.monotonic() - t0
            if waited > _SPIN_S:
                if what is None:    # (the peers' stall reports, and a timeout's
                    what = ctx.where().split(": ", 1)[1]    # late ranks: in the call)
                    ctx.ch.waiting(f"{what}: waiting for {_entering(box, todo)}", t0)
                aborted = ctx.ch.aborted(ctx.tag, what)
                if aborted is not None:
                    raise aborted
                for p in todo:
                    world = box.ranks[p]
                    if world in ctx.g.ranks:
                        left = ctx.ch.left(ctx.g.ranks.index(world), what)
                        if left is not None:
                            raise left
                if time.monotonic() > ctx.deadline:
                    raise ctx.timed_out(f" waiting for {_entering(box, todo)}")
                time.sleep(min(0.001, waited / 20))
            else:
                os.sched_yield()
            todo = [p for p in todo if not _entered(ctx, box, p, seq)]
    finally:
        if what is not None:
            ctx.ch.waiting(None)


def _entering(box: _Box, todo: list[int]) -> str:
    late = ", ".join(f"world rank {box.ranks[p]}" for p in todo)
    return f"{late} to enter it (same-host board)"


def _posted(box: _Box, p: int) -> int:
    """The last call peer ``p`` posted on its board, as this rank last read it."""
    h = box.heads[p]
    return max(h[1 + SEQ], h[1 + _SLOT_WORDS + SEQ])


def _entered(ctx: Ctx, box: _Box, p: int, seq: int) -> bool:
    """Whether peer ``p`` has entered the call whose first round is ``seq``
    (its mark, its posts) or forgot the boards (agree), read afresh."""
    board = box.boards[p]
    if board is None:
        err = box.readers[p]()
        if err == errno.ESRCH:
            raise LostPeerError(f"{ctx.where()}: cannot read the board of world rank "
                                f"{box.ranks[p]} (no such process): it is gone", box.ranks[p])
    if box.seen_cookie[p][0] == _FORGOTTEN or _posted(box, p) >= seq:
        return True
    if board is not None:
        return int(board[_ENTERED:_ENTERED + 8].view(np.int64)[0]) >= seq
    word = np.zeros(1, np.int64)
    try:
        cma.read(box.pids[p], box.addrs[p] + _ENTERED, word)
    except OSError:
        return False
    return int(word[0]) >= seq
