"""Waits on peers' boards (collectives.shm.board): a wait spins, then
yields or sleeps on the late peer's bell (collectives.shm.bell), looks for
an abort of the call and at the deadline, and once it gets long posts a
receive on the tag (a peer on a socket path, an abort, a lost peer)."""
from __future__ import annotations

import os
import time
from typing import Any

from mesh import MeshError
from mesh.rings import fence

from ..runner import Ctx, caught, named
from . import bell
from .board import _BELL_WAIT_S, _BUSY_S, _CROWD_YIELD_S, _SPIN_S, _Box, crowded


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
            raise ctx.timed_out(f" waiting for {_ranks(ctx, waiting_for)} (same-host board)")
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
        """``peer`` finished this collective without ``what``: it failed, and
        whoever failed first aborted the tag; raise that."""
        err = caught(self.posted(), 0.2)
        if err is not None:
            raise err
        raise MeshError(f"{self.where()}: {_ranks(self.ctx, [peer])} left it without {what} "
                        f"(it called another collective or failed)")

    def close(self) -> None:
        if self.watch is not None and not self.watch.done():
            caught(self.watch, 0)


def _ranks(ctx: Ctx, peers: list[int]) -> str:
    """Group ranks as errors name them (runner.named: with their world ranks where
    those differ)."""
    return ", ".join(named(ctx.g, p) for p in peers)
