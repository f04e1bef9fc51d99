"""The host barriers (collectives.host.paths): barrier (the same-host
board, else dissemination over sockets) and torch's monitored_barrier
(every member reports to rank 0, which names the ones that did not)."""
from __future__ import annotations

from typing import Any

from mesh import Comm, MeshError, MeshTimeoutError

from .. import debug
from ..plan import Tuning
from ..runner import Body, Ctx, start
from ..shm import board, local
from .paths_checks import _fp
from .paths_route import _said
from .small import barrier_dissemination

__all__ = ["barrier", "monitored_barrier"]



def barrier(g: Comm, async_op: bool = False, timeout: float | None = None) -> Any:
    """Return once every member of ``g`` has entered the barrier."""
    def body(ctx: Ctx) -> None:
        if debug.ON:
            _said(ctx, "barrier", None, "dissemination")
        if board.available(ctx):
            local.barrier(ctx)
        else:
            barrier_dissemination(ctx)
    return start(g, "barrier", lambda t: (_fp("barrier"), body), async_op, timeout)


def _like(cause: MeshError, text: str) -> MeshError:
    """An error of ``cause``'s class (a lost peer's names the peer) saying ``text``."""
    e = type(cause)(text)
    if hasattr(cause, "peer"):
        e.peer = cause.peer      # type: ignore[attr-defined]
    return e


def monitored_barrier(g: Comm, timeout: float | None = None,
                      wait_all_ranks: bool = False) -> None:
    """torch's monitored barrier, in gloo's words: every member reports to
    rank 0, which waits for each until ``timeout`` (default: the group's)
    and then releases them all. Rank 0 raises naming the first member (with
    ``wait_all_ranks``, every member) that did not come or died ("Rank 1
    failed to pass monitoredBarrier in 2000 ms: ..."); the others raise
    saying they came but were not released ("Rank 2 successfully reached
    monitoredBarrier, but received errors while waiting for send/recv from
    rank 0: ...", by rank 0's abort; they wait up to a second longer than
    rank 0 for it). Ranks are the group's."""
    secs = float(g.timeout) if timeout is None else float(timeout)

    def body(ctx: Ctx) -> None:
        if g.rank:
            ctx.send(None, 0)
            ctx.recv(0)
            return
        came = [(r, ctx.irecv(r)) for r in range(1, g.size)]
        failed: list[tuple[int, MeshError]] = []
        for r, req in came:
            if failed and not wait_all_ranks:
                break
            try:
                req.wait()
            except MeshError as e:
                failed.append((r, e))
        if failed:
            for _, req in came:
                if not req.done():
                    req.req.cancel()
            who, cause = [r for r, _ in failed], failed[0][1]
            late = f" in {secs * 1e3:g} ms" if isinstance(cause, MeshTimeoutError) else ""
            raise _like(cause, f"Rank{'s' if len(who) > 1 else ''} {', '.join(map(str, who))} "
                               f"failed to pass monitoredBarrier{late}: {cause}") from cause
        for req in [ctx.isend(None, r) for r in range(1, g.size)]:
            req.wait()

    def prepare(t: Tuning) -> tuple[dict, Body]:
        if secs <= 0:
            raise MeshTimeoutError(f"Rank {g.rank} timed out in monitoredBarrier after 0 ms")
        return _fp("monitored_barrier"), body
    try:    # the others wait a little longer, so that rank 0's verdict reaches them first
        start(g, "monitored_barrier", prepare, False,
              max(secs, 0.0) + (min(secs, 1.0) if g.rank and secs > 0 else 0.0))
    except MeshError as e:
        if g.rank and secs > 0:     # (rank 0's abort may come before this rank starts)
            raise _like(e, f"Rank {g.rank} successfully reached monitoredBarrier, but "
                           f"received errors while waiting for send/recv from rank 0: "
                           f"{e}") from e
        if isinstance(e, MeshTimeoutError) and "monitoredBarrier" not in str(e):
            raise _like(e, f"Rank {g.rank} timed out in monitoredBarrier after "
                           f"{secs * 1e3:g} ms: {e}") from e     # (queued behind others)
        raise
