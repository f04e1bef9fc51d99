"""Rendezvous: a small ZeroMQ service that assembles the job.

Each worker binds its own endpoints first (port 0, never probe-then-bind),
then registers ``{rank, size, host, endpoints}`` here and gets the full table
back once every rank has arrived. The service runs in the launcher, in the
parent of ``mesh.spawn``, or in rank 0 under another launcher (torchrun, srun).

    worker r --join{rank, endpoints}--> service
    worker r <--waiting{missing}------- service   (every second until complete; with
                                                   the joins it refused: the last 3,
                                                   and how many in all)
    worker r <--table{peers}----------- service   (once all ranks joined)
    launcher --ended{rank, size, how}-> service   (a rank ended)
    launcher <-node{say}--------------> service   (meshrun --max-restarts across
                                                   nodes: mesh.launch.tries)

A rank that ends will never join again: a launcher that sees one go
(``Teller.ended``) tells the service, which fails the ranks that wait for it
(in the first round, or in a new one once its mesh closed) at once, naming
it, instead of at their rendezvous timeout.

A network drop while a rank waits (its connection reset, the service's host
unreachable for a while) is not the service's end: ZeroMQ connects again,
and the rank sends the same join (its ``call``, drawn once a join) on the
new connection, which the service takes as the same registration, not a
second one; until its rendezvous timeout. The service's process ended
where its port refuses connections now (mesh.liveness.refuses): that fails the rank
at once.

Here: a rank's side, ``join``. The service is mesh.rdvserver
(``RendezvousServer``), the launcher's side mesh.rdvlaunch (its run
folder, ``run_folder``, and its word that a rank ended, ``tell_ended`` and
``Teller``); their names are importable from here too.
"""
from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from . import auth
from .errors import AuthError, LostPeerError, RendezvousError
from .liveness import close_watched, monitor_event, refuses
from .peer import on_host
from .rdvlaunch import (Teller, _ended_here, _launchers_folder, read_hosts, remove_run_folder,
                        run_folder, tell_ended, tell_hosts)
from .rdvserver import RendezvousServer, gone_text
from .rdvwords import MAX_FIELD, table_fault, text

__all__ = ["RendezvousServer", "join", "run_folder", "remove_run_folder", "Teller",
           "tell_ended", "tell_hosts", "read_hosts", "gone_text"]

_log = logging.getLogger("mesh.rendezvous")
_NOTE_FIRST, _NOTE_EVERY = 10.0, 30.0    # rank 0's notes of the ranks not come yet
_SAY_REFUSED = 3     # the refused joins a rank quotes (then says how many in all)
_CONNECT_TIMEOUT = 2.0  # a connect to the service unanswered this long is tried again (s)
_PROBE_EVERY = 1.0      # after a drop, how often a failed connect asks whether the port refuses


def join(ctx: zmq.Context, addr: str, port: int, secret: str, rank: int, size: int,
         host: str, endpoints: dict[str, str], timeout: float,
         curve: bool = False, window: int | None = None,
         first_here: bool | None = None) -> list[dict[str, Any]]:
    """Register with the service and return the table of all peers, by rank
    (with ``window``, this rank's MESH_WINDOW_BYTES, for the peers to agree
    on each pair's credit window: mesh.transport). ``first_here``: this is
    its host's first rank (default: rank 0), which says now and then that
    the service has not answered yet: a node started with a wrong
    --master-port, or before node 0, waited its whole rendezvous timeout
    (120 s) in silence."""
    where = f"tcp://{addr}:{port}"
    folder = _launchers_folder()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, int(_CONNECT_TIMEOUT * 1000))   # (a link down: again)
    deadline = time.monotonic() + timeout
    missing: list[int] | None = None
    refused: list[str] = []     # the first joins the service refused while this rank waited
    heard = 0                   # how many it refused in all
    odd = 0                     # messages ignored (malformed; not the service's)
    t0 = time.monotonic()
    note_at = t0 + _NOTE_FIRST     # rank 0 says whom the job still waits for, now and then
    mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                  | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
    line = _Line()              # the connection to the service, as the monitor tells
    poller = zmq.Poller()       # (its monitor too: a refused secret or a closed service at once)
    poller.register(sock, zmq.POLLIN)
    poller.register(mon, zmq.POLLIN)
    request = msgpack.packb({"op": "join", "rank": rank, "size": size, "host": host,
                             "endpoints": endpoints, "pid": os.getpid(), "window": window,
                             "call": secrets.randbits(62)})   # (the same join, sent again)
    try:
        auth.make_client(sock, secret, curve)
        sock.connect(where)
        sock.send(request)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                who = (f"ranks {missing} never arrived" if missing is not None
                       else "the service never said whom it waits for" if line.shook
                       else _unanswered(addr, port))
                if refused:
                    who += "; it refused meanwhile: " + "; ".join(refused) + (
                        f" ({heard} joins refused in all)" if heard > len(refused) else "")
                if line.shook and not line.up:
                    who += (f"; its connection to the service dropped "
                            f"{line.dropped_at - t0:.0f}s into the wait and has not come back "
                            f"(the network between them)")
                raise RendezvousError(f"rank {rank}: rendezvous at {where} timed out after "
                                      f"{timeout:.0f}s: {who}")
            ended = _ended_here(folder, rank) if folder else None
            if ended is not None:       # (its meshrun says so: the service may be gone)
                raise LostPeerError(f"rank {rank}: rendezvous at {where}: "
                                    f"{gone_text(*ended)}", ended[0])
            ready = dict(poller.poll(int(min(left, 0.25 if folder else 1.0) * 1000) + 1))
            if sock not in ready:
                now = time.monotonic()
                if _heard(mon, line, now) == "auth":   # the service answered: not our secret
                    raise AuthError(
                        f"rank {rank}: rendezvous at {where} refused our credentials: a "
                        f"different job secret (MESH_SECRET) or MESH_CURVE setting there")
                _rejoin(sock, line, request, rank, where, line.dropped_at - t0)
                if line.failed and now >= line.probe_at and not sock.poll(0):
                    _away(line, now, addr, port, rank, where, line.dropped_at - t0, timeout)
                if missing is None and now >= note_at and (
                        rank == 0 if first_here is None else first_here):
                    note_at = now + _NOTE_EVERY
                    _log.warning("rank %d: rendezvous at %s: no answer from the service yet "
                                 "(%.0fs of %.0fs): is it running there (node 0's meshrun, "
                                 "or rank 0), at that address and port?",
                                 rank, where, now - t0, timeout)
                continue
            try:
                msg = msgpack.unpackb(sock.recv(), raw=False)
            except Exception:
                msg = None
            if not isinstance(msg, dict):
                odd = _odd(odd, rank, where, "a message that is not msgpack's map")
                continue
            if msg.get("op") == "table":
                fault = table_fault(msg.get("peers"), size)
                if fault:
                    raise RendezvousError(
                        f"rank {rank}: rendezvous at {where} sent a malformed table ({fault}): "
                        f"a service of another version of mesh, or not mesh's")
                return list(msg["peers"])
            if msg.get("op") == "waiting":
                said = msg.get("missing", [])
                if not (isinstance(said, list) and all(type(r) is int for r in said)):
                    odd = _odd(odd, rank, where, "a waiting word whose missing ranks are "
                                                 "not a list of integers")
                    continue
                missing = said
                now = time.monotonic()
                if rank == 0 and now >= note_at and missing:
                    note_at = now + _NOTE_EVERY
                    _log.warning("rank 0: rendezvous at %s: still waiting for ranks %s "
                                 "(%.0fs of %.0fs)", where, missing, now - t0, timeout)
                heard = _refusals(msg, heard, refused, rank == 0, missing)
            elif msg.get("op") == "error" and type(msg.get("peer")) is int:
                said, far = text(msg.get("msg")), msg.get("host")
                if isinstance(msg.get("how"), str) and far and isinstance(far, str):
                    said = gone_text(msg["peer"], msg["how"][:200], on_host(   # (as it sees it)
                        host, far[:MAX_FIELD], text(msg.get("endpoint", "")),
                        msg["pid"] if type(msg.get("pid")) is int else 0))
                raise LostPeerError(f"rank {rank}: rendezvous at {where}: {said}", msg["peer"])
            elif msg.get("op") == "error":
                raise RendezvousError(f"rank {rank}: rendezvous at {where} refused: "
                                      f"{text(msg.get('msg'))}")
            else:
                odd = _odd(odd, rank, where, f"a word it does not know ({text(msg.get('op'))})")
    finally:
        close_watched(sock, mon)


def _unanswered(addr: str, port: int) -> str:
    """Why a service that never answered did not: its port refusing
    connections (nothing listens there: not started yet, ended, or another
    port) told apart from silence (a different secret, or the network)."""
    if refuses(addr, port, _PROBE_EVERY / 2):
        return (f"the service never answered, and port {port} of {addr} refuses connections: "
                f"nothing listens there (node 0's meshrun, or rank 0 under another launcher, "
                f"not started or ended, or a wrong --master-port / MASTER_PORT)")
    return ("the service never answered (not running, a wrong address or port, or a "
            "different job secret or MESH_CURVE setting)")


@dataclass
class _Line:
    """The join's connection to the service, as its monitor tells (``_heard``)."""
    shook: bool = False         # a handshake with the service went through, once at least
    up: bool = False            # and the connection it made is up now
    dropped_at: float = 0.0     # when it last dropped (after a handshake)
    fresh: bool = False         # a drop not said yet
    again: bool = False         # a handshake after a drop: the join goes again (``_rejoin``)
    failed: bool = False        # a connect failed since the drop: does the port refuse?
    probe_at: float = 0.0       # (not before then)


def _heard(mon: zmq.Socket, line: _Line, now: float) -> str:
    """Read what the join's monitor ``mon`` says into ``line``; "auth" where
    the service refused the handshake (not our secret). A connection that
    closed after the handshake went through (``dropped_at``) is a network
    drop until a connect fails to a port that refuses it (``failed``, then
    mesh.liveness.refuses): ZeroMQ connects again, and the join goes again
    (``again``: the service answers a join on the connection it came by).
    A connect that fails before any handshake is a service not started
    yet: waited for, saying so (``join``'s note)."""
    while mon.poll(0):
        event = monitor_event(mon.recv_multipart())
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return "auth"
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            line.again = line.again or line.shook
            line.shook = line.up = True
            line.failed = False
        elif event == zmq.EVENT_DISCONNECTED and line.up:
            line.up, line.dropped_at, line.fresh = False, now, True
        elif event == zmq.EVENT_CLOSED and line.shook and not line.up:
            line.failed = True
    return ""


def _rejoin(sock: zmq.Socket, line: _Line, request: bytes, rank: int, where: str,
            dropped: float) -> None:
    """Once ZeroMQ has connected to the service again after a drop
    (``line``; ``dropped`` s into the wait), send the same join
    (``request``) again, and say so."""
    if line.again and line.up:
        line.again = line.fresh = False
        try:
            sock.send(request, zmq.NOBLOCK)
        except zmq.Again:       # (its queue full: the first join's still there)
            pass
        _log.warning("rank %d: rendezvous at %s: the connection to the service dropped %.0fs "
                     "into the wait and is back: joined again", rank, where, dropped)


def _away(line: _Line, now: float, addr: str, port: int, rank: int, where: str,
          dropped: float, timeout: float) -> None:
    """A connect to the service failed after a drop (``line``, ``dropped`` s
    into the wait): raise where its port refuses connections now (what it
    said last read first), else say, once a drop, that the rank waits for
    the network, until its rendezvous ``timeout``. Asked each
    ``_PROBE_EVERY`` s at most."""
    line.failed, line.probe_at = False, now + _PROBE_EVERY
    if refuses(addr, port, _PROBE_EVERY / 2):
        raise RendezvousError(
            f"rank {rank}: rendezvous at {where}: the service closed this rank's connection "
            f"{dropped:.0f}s into its wait, before the job was complete, and its port "
            f"refuses connections now: its process ended (node 0's meshrun, or rank 0 under "
            f"another launcher), and this rank's join with it")
    if line.fresh:
        line.fresh = False
        _log.warning("rank %d: rendezvous at %s: the connection to the service dropped %.0fs "
                     "into the wait, and its port does not refuse connections (the network, "
                     "not the service's end): joining again as it comes back, until the "
                     "rendezvous timeout (%.0fs)", rank, where, dropped, timeout)


def _refusals(msg: dict[str, Any], heard: int, refused: list[str], says: bool,
              missing: list[int]) -> int:
    """The joins refused that a ``waiting`` word ``msg`` tells of: the last
    few (3) and how many in all; those not ``heard`` of yet go to
    ``refused`` while it has fewer than ``_SAY_REFUSED``, each said by rank
    0 (``says``: once a job, not once a rank), then rank 0 says how many at
    the 4th, 8th, 16th...: a long wait beside a node that keeps joining
    wrongly kept every distinct one, all quoted in its timeout error.
    Returns how many it refused in all."""
    total, last = msg.get("refusals"), msg.get("refused")
    if type(total) is not int or total <= heard or not isinstance(last, list):
        return heard
    last = [text(said) for said in last]
    for said in last[max(0, len(last) - (total - heard)):]:
        if said not in refused and len(refused) < _SAY_REFUSED:
            refused.append(said)
            if says:
                _log.warning("rank 0: the rendezvous refused a join while the job waits for "
                             "ranks %s: %s", missing, said)
    top = 1 << (total.bit_length() - 1)
    if says and heard < top and top > _SAY_REFUSED:
        _log.warning("rank 0: the rendezvous has refused %d joins while the job waits for "
                     "ranks %s (the last: %s)", total, missing, last[-1] if last else "")
    return total


def _odd(n: int, rank: int, where: str, what: str) -> int:
    """Log a message ``join`` ignored (``what``), the 1st, 2nd, 4th...; returns
    how many it ignored now."""
    n += 1
    if n & (n - 1) == 0:
        _log.warning("rank %d: rendezvous at %s: ignored %s (%d so far)", rank, where, what, n)
    return n
