"""The rendezvous service (mesh.rendezvous draws its messages): one per job,
in the launcher, the parent of ``mesh.spawn``, or rank 0 under another
launcher. It hands every rank the table once all have joined, answers the
ranks that wait with whom they wait for, fails them at once, naming it,
where a rank ended (a launcher's word: mesh.rdvlaunch.Teller), and carries
the meshruns' word on the job's tries (mesh.launch.tries). It logs as
``mesh.rendezvous``, as a rank's ``join`` does: the one name a user's
logging configuration needs for both.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import msgpack
import zmq

from . import auth
from .errors import RendezvousError
from .liveness import close_watched, monitor_event
from .peer import named
from .rdvwords import MAX_FIELD, join_fault, kind

__all__ = ["RendezvousServer", "gone_text"]

_log = logging.getLogger("mesh.rendezvous")
_MAX_REQUEST = 64 * 1024
_STOP_WAIT = 2.0    # how long close() waits for the service's thread to end


class RendezvousServer:
    """Collects one registration per rank and hands every rank the table.
    Once the table is out, a rank's process may join again (its mesh
    closed, ``mesh.init()`` or ``init_process_group`` once more): that
    starts a new round, which only the processes of the last table join.
    A join is one registration however often it comes (its ``call``, drawn
    once a join): a rank whose connection dropped (a network drop) sends it
    again on a new one, which replaces the first, in its round or once the
    table is out (the table again, which the drop may have lost), where a
    second process claiming the rank is refused.

    ``refused`` counts connections that failed the handshake (no secret, a
    wrong one, another mechanism); ``rejected`` counts requests refused after
    it (malformed, wrong world size, a rank that already joined).

    ``tries`` (``mesh.launch.tries.Tries``): the service also carries the
    meshruns' word on the job's tries, which restart on every node together;
    each try is a new rendezvous, open only while the meshruns run it."""

    def __init__(self, world_size: int, secret: str, host: str = "127.0.0.1",
                 port: int = 0, ctx: zmq.Context | None = None,
                 curve: bool | None = None, tries: Any = None) -> None:
        self.world_size = world_size
        self.tries = tries
        if tries is not None:
            tries.on_go = self._new_try
        self.curve = auth.curve_wanted() if curve is None else curve
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        self._auth = auth.Authenticator(self._ctx, secret, self.curve) if self._own_ctx else None
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.MAXMSGSIZE, _MAX_REQUEST)
        auth.make_server(self._sock, secret, self.curve)
        self._mon = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        bind_host = "*" if host in ("", "0.0.0.0", "*") else host
        try:
            self._sock.bind(f"tcp://{bind_host}:{port}")
        except zmq.ZMQError as e:
            close_watched(self._sock, self._mon)
            raise RendezvousError(f"rendezvous: cannot bind tcp://{bind_host}:{port}: {e}") from e
        self.port = int(self._sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.rejected = 0
        self.failure = ""       # the error the service's thread ended on, if it did
        self._ignored = 0       # (malformed requests, of those rejected: the log's count)
        self.refused = 0
        self.complete = threading.Event()
        self._peers: dict[int, dict[str, Any]] = {}
        self._idents: dict[int, bytes] = {}
        self._calls: dict[int, Any] = {}    # each join's call (None: a rank's of an older mesh)
        self._last: dict[int, dict[str, Any]] | None = None   # the last table, by rank
        self._refusals: list[str] = []      # the last joins refused, as the waiting hear
        self._refused_joins = 0             # and how many in all (they say the first few)
        # ranks that ended before the job was complete: how, and where (``_where_gone``)
        self._gone: dict[int, tuple[str, dict[str, Any]]] = {}
        self._from = ""     # the address the request in hand came from ('' not known)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()      # close() wakes the poll at once
        self._wake_lock = threading.Lock()      # (close() writes it, the thread's end closes it)
        self._thread = threading.Thread(target=self._run, name="mesh-rendezvous", daemon=True)

    def start(self) -> "RendezvousServer":
        self._thread.start()
        return self

    def missing(self) -> list[int]:
        return [r for r in range(self.world_size) if r not in self._peers]

    def _send(self, ident: bytes, msg: dict[str, Any]) -> bool:
        """Send ``msg`` to ``ident``, never waiting: an answer that finds its
        queue full (a client that does not read: 1000 answers) is dropped,
        where a blocking send stalled the service for every rank. False where
        ``ident``'s connection is gone (a meshrun killed: ROUTER_MANDATORY),
        which the meshruns' word (``tries``) needs to know."""
        try:
            self._sock.send_multipart([ident, msgpack.packb(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            return e.errno != zmq.EHOSTUNREACH
        return True

    def _new_try(self, attempt: int) -> None:
        """Every node's meshrun starts try ``attempt``: a rendezvous of its own,
        nothing of the last try's ranks (all ended) kept."""
        self._peers, self._idents, self._calls, self._last = {}, {}, {}, None
        self._refusals, self._refused_joins, self._gone = [], 0, {}
        self.complete.clear()

    def _was(self, rank: int, who: tuple[Any, str]) -> bool:
        """Whether ``who`` (pid, host) is the process the last table has at ``rank``."""
        last = None if self._last is None else self._last[rank]
        return last is not None and (last["pid"], last["host"]) == who

    def _ended(self, req: dict[str, Any]) -> None:
        """A launcher says rank ``rank`` ended: before it joined, or after a
        table (a new round joins only the last table's processes). Nobody
        will fill its place, so the ranks waiting now fail, naming it, and
        so does every later join (a ``mesh.init()`` after a close, which
        waited in silence for its rendezvous timeout)."""
        rank = req.get("rank")
        if (req.get("size") != self.world_size      # (another job's)
                or self.tries is not None and req.get("try") != self.tries.attempt):
            return
        if type(rank) is not int or not 0 <= rank < self.world_size:
            self._ignore(f"an ended word for rank {_said(rank)}, not a rank of this job of "
                         f"world size {self.world_size}")
            return
        if rank in self._gone:
            return
        if not isinstance(req.get("how", ""), str):
            self._ignore(f"an ended word for rank {rank} whose how is {kind(req['how'])}, "
                         f"not a string")
            return
        self._gone[rank] = (req.get("how", "")[:200], self._where_gone(rank, req))
        if len(self._peers) < self.world_size:     # (a round open; else the table is out)
            self._fail_waiting()

    def _where_gone(self, rank: int, req: dict[str, Any]) -> dict[str, Any]:
        """Where rank ``rank``, said to have ended, was: its host id, pid and
        TCP endpoint as it joined (this round or the last table), else the
        host id and pid its launcher's word (``req``, ``Teller.ended``) says,
        and the address that word came from (its host's, as a peer on another
        host whose name is this one's too is named: mesh.peer.on_host)."""
        came = self._peers.get(rank) or (self._last or {}).get(rank)
        if came is not None:
            return {"host": came["host"], "pid": came.get("pid") or 0,
                    "endpoint": came["endpoints"]["tcp"]}
        host, pid = req.get("host"), req.get("pid")
        if not (isinstance(host, str) and len(host.encode()) <= MAX_FIELD):
            host = ""       # (not known; or too long to send every rank that waits)
        return {"host": host,
                "pid": pid if type(pid) is int else 0,
                "endpoint": f"tcp://{self._from}:0" if self._from else ""}

    def _joined_from(self, host: Any) -> str:
        """Where a join came from, as a refusal names it: its host name (a
        host id's, without its network namespace) and the address it came
        from, which tells apart hosts of one name (network namespaces)."""
        name = _said(host.split("|", 1)[0] if isinstance(host, str) else host)
        return f"on host {name}" + (f", from {self._from}" if self._from else "")

    def _fail_waiting(self) -> None:
        """Fail every rank that waits, naming the first rank that ended (each
        rank names its host, as it sees it: ``gone_text``)."""
        rank, (how, where) = next(iter(self._gone.items()))
        for ident in self._idents.values():
            self._send(ident, {"op": "error", "msg": gone_text(rank, how), "peer": rank,
                               "how": how, **where})
        self._peers, self._idents, self._calls = {}, {}, {}

    def _register(self, ident: bytes, req: Any) -> None:
        if isinstance(req, dict) and req.get("op") == "ended":
            self._ended(req)
            return
        if isinstance(req, dict) and req.get("op") == "node":
            if self.tries is None:
                self._send(ident, {"op": "node", "say": "refused", "why":
                                   "node 0's meshrun restarts nothing (no --max-restarts): "
                                   "give every node's meshrun the same --max-restarts"})
            else:
                self.tries.handle(ident, req, time.monotonic(), self._send)
            return
        if not (isinstance(req, dict) and req.get("op") == "join"):
            self._ignore("a malformed request")
            return
        fault = join_fault(req)
        if fault:       # (its fields go to every rank, in the table: mesh.world)
            of = f"rank {req['rank']}" if type(req.get("rank")) is int else "a rank"
            said = f"a malformed join of {of}: {fault}"
            self._ignore(said)
            self._send(ident, {"op": "error", "msg": said})
            return
        rank, size = req["rank"], req["size"]
        if self.tries is not None and not self.tries.running:
            self.rejected += 1
            self._send(ident, {"op": "error", "msg": self.tries.closed(rank)})
            return
        if size != self.world_size or not 0 <= rank < size:
            msg = (f"rank {rank} of world {size} (pid {req.get('pid')} "
                   f"{self._joined_from(req.get('host'))}) cannot join a job of world size "
                   f"{self.world_size}"
                   + (": the launchers disagree on the world size (-n, --nnodes)"
                      if size != self.world_size else ""))
            self.rejected += 1
            self._send(ident, {"op": "error", "msg": msg})
            self._refusals = (self._refusals + [msg])[-3:]   # told to the ranks that wait
            self._refused_joins += 1
            return
        who, call = (req.get("pid"), req.get("host", "")), req.get("call")
        again = call is not None and call == self._calls.get(rank)     # (the same join)
        if len(self._peers) == self.world_size and self._was(rank, who):
            if again:       # the table's join, on a new connection: the table again
                self._idents[rank] = ident
                self._send(ident, {"op": "table",
                                   "peers": [self._peers[r] for r in range(self.world_size)]})
                return
            self._peers, self._idents, self._calls = {}, {}, {}    # the table is out: a new round
        prev = self._peers.get(rank)
        if prev is not None:             # joined this round already, from another socket?
            duplicate = self._idents[rank] != ident and not again
        else:                            # a new round's ranks are the last table's processes
            prev = None if self._last is None else self._last[rank]
            duplicate = prev is not None and not self._was(rank, who)
        if duplicate:
            assert prev is not None
            self.rejected += 1
            self._send(ident, {"op": "error", "msg":
                               f"rank {rank} already joined (pid {prev.get('pid')} on "
                               f"{_said(prev.get('host'))}); duplicate from pid "
                               f"{req.get('pid')}"})
            return
        self._peers[rank] = {"rank": rank, "host": req.get("host", ""),
                             "endpoints": req["endpoints"], "pid": req.get("pid"),
                             "window": req.get("window")}
        self._idents[rank] = ident
        self._calls[rank] = call
        if self._gone:              # one of the ranks ended already: none will come
            self._fail_waiting()
            return
        if len(self._peers) == self.world_size and self._all_there():
            table = {"op": "table", "peers": [self._peers[r] for r in range(self.world_size)]}
            for r in range(self.world_size):
                self._send(self._idents[r], table)
            self._last = dict(self._peers)
            self.complete.set()

    def _ignore(self, what: str) -> None:
        """Count a request ignored; logged at the 1st, 2nd, 4th, 8th...: a
        client holding the secret may send any number."""
        self.rejected += 1
        self._ignored += 1
        n = self._ignored
        if n & (n - 1) == 0:
            _log.warning("rendezvous: ignored %s (%d so far)", what, n)

    def _on_monitor(self) -> None:
        while True:
            try:
                event = monitor_event(self._mon.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            self.refused += 1       # any event is a refusal; the ZAP handler logs the secret's
            n = self.refused
            if event != zmq.EVENT_HANDSHAKE_FAILED_AUTH and n & (n - 1) == 0:
                _log.warning("rendezvous: refused a connection that failed the handshake "
                             "(not ZeroMQ, another mechanism, too slow, or a peer that exited "
                             "while connecting; %d so far)", n)

    def _run(self) -> None:
        linger = 0
        try:
            self._serve()
        except Exception as e:      # (a poll error; a ``tries`` callback's)
            linger = self._failed(e)
        finally:
            close_watched(self._sock, self._mon, linger)
            self._close_wake()

    def _failed(self, e: Exception) -> int:
        """The service's thread ends on error ``e``: it says so (meshrun
        shows its warnings), where it ended in silence (the ranks that
        waited heard only that its connection closed, as if its process
        had ended); and tells the ranks that wait. Returns the linger its
        socket needs for that."""
        self.failure = f"{type(e).__name__}: {str(e)[:200]}"
        _log.error("rendezvous: the service stopped on an error (%s): the ranks waiting there "
                   "fail, and none can join it again", self.failure)
        _log.debug("rendezvous: the service's error", exc_info=e)
        waiting = self._idents if len(self._peers) < self.world_size else {}
        for ident in waiting.values():
            self._send(ident, {"op": "error",
                               "msg": f"the rendezvous service stopped ({self.failure})"})
        return 500 if waiting else 0

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._mon, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        last_status = last_tick = time.monotonic()
        while not self._stop.is_set():
            try:
                events = dict(poller.poll(200))
            except zmq.ZMQError:
                if self._stop.is_set():
                    break
                raise
            if self._mon in events:
                self._on_monitor()
            if self._sock in events:
                try:
                    got = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.ZMQError:
                    continue
                frames, self._from = [f.bytes for f in got], _peer_address(got[-1])
                try:
                    req = msgpack.unpackb(frames[1], raw=False) if len(frames) == 2 else None
                except Exception:
                    req = None
                try:
                    self._register(frames[0], req)
                except Exception as e:     # a request no check foresaw: not the service's end
                    self._ignore(f"a request it could not handle ({type(e).__name__}: "
                                 f"{str(e)[:200]})")
            now = time.monotonic()
            if self.tries is not None and now - last_tick > 0.5:
                last_tick = now
                self.tries.tick(now, self._send)
            if now - last_status > 1.0 and len(self._peers) < self.world_size:
                # (a round open: the first, or a new one once the table is out)
                last_status = now
                self._all_there()

    def _all_there(self) -> bool:
        """Tell each rank that joined whom the job waits for, and forget each
        whose connection has closed (``_left``); whether none had. At the
        beat, and just before the table goes out: a rank whose process ended
        in the beat before the table was named in it."""
        word = {"op": "waiting", "missing": self.missing(), "refused": self._refusals,
                "refusals": self._refused_joins}
        gone = [rank for rank, ident in self._idents.items() if not self._send(ident, word)]
        for rank in gone:
            self._left(rank)
        return not gone

    def _left(self, rank: int) -> None:
        """Rank ``rank`` joined, and its connection closed before the table
        (its process ended, or it gave up): its join is forgotten, so that
        the table does not name a rank that cannot hear it (the others
        failed connecting to it, or a restarted process was refused as a
        duplicate), and it is waited for again."""
        came = self._peers.pop(rank)
        del self._idents[rank]
        self._calls.pop(rank, None)
        _log.warning("rendezvous: rank %d (pid %s on %s) joined, then its connection closed "
                     "before the job was complete: it is waited for again", rank,
                     came.get("pid"), _said(came.get("host")))

    def _close_wake(self) -> None:
        with self._wake_lock:
            if self._wake_w >= 0:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1

    def close(self) -> None:
        """Stop the service; a second call does nothing. Its thread closes
        its sockets and wake pipe as it ends: one still busy after
        ``_STOP_WAIT`` (a slow ``tries`` callback) ends on its own, where
        its pipe's descriptors stayed open for good and a second close()
        wrote to it again."""
        if self._stop.is_set():
            return
        self._stop.set()
        with self._wake_lock:
            if self._wake_w >= 0:
                os.write(self._wake_w, b"x")
        if self._thread.ident is None:      # (never started: nothing else will close them)
            close_watched(self._sock, self._mon)
            self._close_wake()
        else:
            self._thread.join(timeout=_STOP_WAIT)
            if self._thread.is_alive():
                _log.warning("rendezvous: the service's thread has not stopped %g s after "
                             "close(); it closes its sockets as it ends", _STOP_WAIT)
        if self._auth is not None:
            self._auth.close()
        if self._own_ctx:
            self._ctx.term()


def gone_text(rank: int, how: str, there: str = "") -> str:
    """What the ranks waiting for rank ``rank``, which ended (``how``), hear:
    ``peer rank 2 is gone: it ended (exit code 5) before the mesh was
    complete``, with its host beside it for a rank on another host
    (``there``: mesh.peer.on_host, as every error naming a peer)."""
    return f"peer {named(rank, there)} is gone: it ended ({how}) before the mesh was complete"


def _peer_address(frame: zmq.Frame) -> str:
    """The address a TCP connection's message came from ('' for another transport)."""
    try:
        return str(frame.get("Peer-Address"))
    except zmq.ZMQError:
        return ""


def _said(value: Any) -> str:
    """What a request said (a host), quoted in a refusal: at most 200
    characters (a request may take 64 KiB, and a refusal goes to every rank
    that waits too)."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 200 else text[:200] + "..."
