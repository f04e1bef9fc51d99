"""The tries of a job whose meshruns restart together (``--max-restarts``
with ``--nnodes`` over 1), agreed through node 0's rendezvous service, as
torchelastic's agents agree through their rendezvous store:

    every meshrun --ready{try t}---> Tries   (a barrier: all nodes, then)
    every meshrun <--go{t}---------- Tries   a fresh rendezvous; ranks start
    a meshrun ----failed{t, why}---> Tries   (a rank of its ended badly)
    every meshrun <--stop{t, why}--- Tries   each stops its ranks
    every meshrun --ended{t, code}-> Tries   (all its ranks ended)
    every meshrun <--again{t+1}----- Tries   once all ended: a restart left
    every meshrun <--over{why}------ Tries   or not (a success, a signal, a
                                              timeout, none left, a node gone)

A meshrun whose connection closes, or that says nothing for
MESH_PEER_TIMEOUT, is gone: the others end the job, without a restart.
A meshrun whose ranks lost a rank of node k asks whether k's is there
(ask{k}: node 0's then looks, and answers known{k}, after the over of a
node gone), so that its table says that node's meshrun is gone, or not.
``Tries`` is node 0's side (in the service's thread, no sockets of its
own), ``Agent`` every meshrun's (node 0's too, a client of its own service).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

import msgpack
import zmq

from .. import auth
from ..liveness import close_watched, monitor_event

__all__ = ["Tries", "Agent"]

_log = logging.getLogger("mesh.launch")
_BEAT_S = 0.5    # a meshrun's word to node 0's service, and back, at least this often
_NOTE_FIRST, _NOTE_EVERY = 10.0, 30.0    # a meshrun's notes of the nodes not come yet
_ASK_S = 3 * _BEAT_S    # how long a meshrun waits for node 0's answer on another node's

Send = Callable[[bytes, "dict[str, Any]"], bool]
"""How Tries answers: False where that meshrun's connection is gone."""


class Tries:
    """Node 0's word on the tries of a job of ``nnodes`` meshruns of ``nproc``
    ranks each: a try starts once every node's meshrun is ready for it,
    stops on every node at the first failure of any, and once every node's
    ranks have ended it is followed by the next try (``max_restarts`` allow
    it and no node was stopped for good: a signal, --timeout) or the job is
    over. ``running``: a try runs (its rendezvous is open); ``on_go`` is
    told the try that starts (the service opens a fresh rendezvous)."""

    def __init__(self, nnodes: int, nproc: int, max_restarts: int,
                 silent_s: float = 10.0) -> None:
        self.nnodes, self.nproc, self.max_restarts = nnodes, nproc, max_restarts
        self.silent_s = silent_s
        self.attempt = 0
        self.running = False
        self.on_go: Callable[[int], None] | None = None
        self._idents: dict[int, bytes] = {}     # node -> its meshrun's connection
        self._seen: dict[int, float] = {}
        self._ready: set[int] = set()
        self._ended: dict[int, dict[str, Any]] = {}
        self._stop: tuple[int, str] | None = None     # the try's first failure: node, why
        self._failing: list[int] = []     # the nodes whose ranks failed, in the order told
        self._over: dict[str, Any] | None = None      # the job's end, once decided
        self._done: set[int] = set()      # nodes whose meshrun said bye, or is gone
        self._lock = threading.Lock()     # (settled() is asked from another thread)

    def settled(self) -> bool:
        """Whether the job is over and every node's meshrun has heard it (or is gone)."""
        with self._lock:
            return self._over is not None and self._done >= set(self._idents)

    def closed(self, rank: int) -> str:
        """Why rank ``rank`` cannot join now: no try runs."""
        missing = [n for n in range(self.nnodes) if n not in self._ready]
        return (f"rank {rank} cannot join now: every node's meshrun (--max-restarts across "
                f"nodes) starts the job's tries together, and no try runs"
                + (f" (nodes {missing} have not said they are ready: give every node's "
                   f"meshrun the same --max-restarts)" if missing else ""))

    def handle(self, ident: bytes, msg: dict[str, Any], now: float, send: Send) -> None:
        """A meshrun's word ``msg`` on connection ``ident``."""
        with self._lock:
            self._handle(ident, msg, now, send)

    def _handle(self, ident: bytes, msg: dict[str, Any], now: float, send: Send) -> None:
        node, say = msg.get("node"), msg.get("say")
        refusal = self._refusal(ident, msg)
        if refusal:
            send(ident, {"op": "node", "say": "refused", "why": refusal})
            return
        assert isinstance(node, int)
        self._idents[node], self._seen[node] = ident, now
        if say == "ask":    # (whether a node's meshrun is there: gone, the "over" comes first)
            about = msg.get("about")
            if type(about) is int:
                self._look(about, now, send)
            send(ident, {"op": "node", "say": "known", "about": about})
            return
        if say == "bye":
            self._done.add(node)
            if self._over is None:      # (its meshrun ended while the job went on: ^C)
                self._over = self._said("over", ok=False, why=f"node {node}'s meshrun ended "
                                                              f"before the job did; the job "
                                                              f"ends on every node")
                self._tell(send, self._over)
            return
        if self._over is not None:
            send(ident, self._over)
            return
        if msg.get("try") != self.attempt:
            return      # (the word of a try that is over)
        if say == "ready":
            self._ready.add(node)
            if self.running:        # (it had not heard the go yet)
                send(ident, self._said("go"))
            elif len(self._ready) == self.nnodes:
                self.running = True
                if self.on_go is not None:
                    self.on_go(self.attempt)
                self._tell(send, self._said("go"))
            else:
                send(ident, self._said("wait", missing=[n for n in range(self.nnodes)
                                                        if n not in self._ready]))
        elif say == "failed" and self.running:
            self._fail(node, str(msg.get("why")), send)
        elif say == "ended" and self.running and node not in self._ended:
            self._ended[node] = msg
            if msg.get("code") != 0:
                self._fail(node, str(msg.get("why")), send)
            if len(self._ended) == self.nnodes:
                self._verdict(send)

    def tick(self, now: float, send: Send) -> None:
        """Tell every meshrun that node 0's is there; one whose connection
        closed, or silent for ``silent_s``, is gone: the job is over."""
        with self._lock:
            self._tick(now, send)

    def _tick(self, now: float, send: Send) -> None:
        for node in list(self._idents):
            self._look(node, now, send)

    def _look(self, node: int, now: float, send: Send) -> None:
        """Send node ``node``'s meshrun a beat: gone where it cannot be sent."""
        ident = self._idents.get(node)
        if ident is not None and node not in self._done:
            closed = not send(ident, {"op": "node", "say": "beat"})
            if closed or now - self._seen[node] > self.silent_s:
                self._done.add(node)
                if self._over is None:
                    how = ("its connection to node 0's closed" if closed else
                           f"it said nothing for {self.silent_s:g} s")
                    gone = f"node {node}'s meshrun is gone ({how}: killed, or its host lost)"
                    self._over = self._said("over", why=f"{gone}; the job ends on every node",
                                            ok=False, gone=node, gone_why=gone)
                    self._tell(send, self._over)

    def _refusal(self, ident: bytes, msg: dict[str, Any]) -> str:
        node = msg.get("node")
        if type(node) is not int or not 0 <= node < self.nnodes:
            return f"node {node!r} is no node of a job of {self.nnodes} (--node-rank)"
        ours = (self.nnodes, self.nproc, self.max_restarts)
        theirs = (msg.get("nnodes"), msg.get("nproc"), msg.get("max_restarts"))
        if theirs != ours:
            return (f"the launchers disagree: node {node}'s meshrun has --nnodes {theirs[0]} "
                    f"-n {theirs[1]} --max-restarts {theirs[2]}, node 0's --nnodes {ours[0]} "
                    f"-n {ours[1]} --max-restarts {ours[2]}")
        if self._idents.get(node, ident) != ident and node not in self._done:
            return f"node {node}'s meshrun joined the job already (another --node-rank?)"
        return ""

    def _said(self, say: str, **more: Any) -> dict[str, Any]:
        return {"op": "node", "say": say, "try": self.attempt, **more}

    def _tell(self, send: Send, msg: dict[str, Any]) -> None:
        for node, ident in self._idents.items():
            if node not in self._done:
                send(ident, msg)

    def _fail(self, node: int, why: str, send: Send) -> None:
        """The try's first failure stops it on every node."""
        if node not in self._failing:
            self._failing.append(node)
        if self._stop is None:
            self._stop = (node, why)
            self._tell(send, self._said("stop", why=f"node {node}: {why}; the try stops on "
                                                    f"every node (node {node}'s meshrun "
                                                    f"reports why)"))

    def _verdict(self, send: Send) -> None:
        """Every node's ranks of the try have ended: the next try, or the end."""
        ends = [self._ended[n] for n in range(self.nnodes)]
        # (the first node to fail of its own, as its meshrun tells once its ranks ended:
        # the first to tell may have lost a peer of a node whose word came later)
        failing = [n for n in self._failing if self._ended[n].get("code")]
        first = next((n for n in failing if self._ended[n].get("own")), None)
        first = first if first is not None else next(iter(failing), None)
        why = "" if first is None else f"node {first}: {self._ended[first].get('why')}"
        if first is None and self._stop is not None:
            why = f"node {self._stop[0]}: {self._stop[1]}"
        final = next((f"node {n}: {e.get('why')}" for n, e in enumerate(ends)
                      if not e.get("again") and e.get("code")), None)
        if all(e.get("code") == 0 for e in ends):
            self._over = self._said("over", why="", ok=True)
        elif final is not None:
            self._over = self._said("over", why=final, ok=False)
        elif self.attempt >= self.max_restarts:
            # (every meshrun exits with the code of the failure that ended the job, as a
            # job on one host does, not its own ranks' 1 for a peer lost on another node)
            code = None if first is None else self._ended[first].get("code")
            self._over = self._said("over", why=why, ok=False, exhausted=True, code=code)
        else:
            again = self._said("again", why=why)
            self.attempt += 1
            again["try"] = self.attempt
            self.running, self._stop, self._failing = False, None, []
            self._ready, self._ended = set(), {}
            self._tell(send, again)
            return
        self._tell(send, self._over)


class Agent:
    """A meshrun's side of ``Tries``: says when it is ready for a try, when
    a rank of its failed and when its ranks ended; hears when the try
    starts, when it stops (``watch``: told from a thread of its own, at
    once) and what follows. All its socket's work is done in its thread."""

    def __init__(self, addr: str, port: int, secret: str, curve: bool, node: int, nnodes: int,
                 nproc: int, max_restarts: int, silent_s: float = 10.0) -> None:
        self.node = node
        self._where = f"tcp://{addr}:{port}"
        self._mine = {"op": "node", "node": node, "nnodes": nnodes, "nproc": nproc,
                      "max_restarts": max_restarts}
        self._silent_s = silent_s
        self._out: queue.Queue[dict[str, Any]] = queue.Queue()
        self._in: queue.Queue[dict[str, Any]] = queue.Queue()
        self._lock = threading.Lock()
        self._try = 0
        self._on_stop: Callable[[str], None] | None = None
        self._stopped = ""      # why the current try stops, once told
        self._gone: dict[int, str] = {}   # the nodes whose meshrun is gone, and how
        self._known: set[int] = set()     # the nodes node 0's has answered for (``gone``)
        self._ready = False     # saying it is ready for self._try, until an answer comes
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)     # (nothing queued for a service not there)
        auth.make_client(self._sock, secret, curve)
        self._mon = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED
                                                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self._sock.connect(self._where)
        self._thread = threading.Thread(target=self._run, name="meshrun-tries", daemon=True)
        self._thread.start()

    def start(self, attempt: int, timeout: float) -> dict[str, Any]:
        """Say this node is ready for try ``attempt`` and wait until every node
        is: the word that came, ``go`` (start the ranks), else ``over`` or
        ``refused`` (with ``why``); ``over`` after ``timeout`` seconds."""
        with self._lock:
            self._try, self._stopped, self._on_stop, self._ready = attempt, "", None, True
        self._out.put(dict(self._mine, say="ready", **{"try": attempt}))
        t0 = time.monotonic()
        note_at = t0 + _NOTE_FIRST
        missing: list[int] | None = None
        try:
            while True:
                left = t0 + timeout - time.monotonic()
                if left <= 0:
                    who = (f"nodes {missing} never said they were ready" if missing is not None
                           else f"node 0's meshrun never answered at {self._where}")
                    return {"say": "over", "why": f"try {attempt} did not start within "
                                                  f"{timeout:g} s: {who}"}
                try:
                    msg = self._in.get(timeout=min(left, 1.0))
                except queue.Empty:
                    msg = {}
                say = msg.get("say")
                if say == "wait":
                    missing = list(msg.get("missing", []))
                elif say in ("over", "refused") or say == "go" and msg.get("try") == attempt:
                    return msg
                now = time.monotonic()
                if now >= note_at:
                    note_at = now + _NOTE_EVERY
                    _log.warning("node %d: waiting for %s to start try %d (%.0fs of %.0fs)",
                                 self.node, f"nodes {missing}" if missing is not None else
                                 f"node 0's meshrun at {self._where} to answer", attempt,
                                 now - t0, timeout)
        finally:
            with self._lock:
                self._ready = False

    def watch(self, stop: Callable[[str], None]) -> None:
        """Have ``stop(why)`` called when the try is stopped (at once where it
        was already)."""
        with self._lock:
            self._on_stop = stop
            why = self._stopped
        if why:
            stop(why)

    def failed(self, why: str) -> None:
        """A rank of this node ended badly: every node stops the try."""
        self._out.put(dict(self._mine, say="failed", why=why, **{"try": self._try}))

    def ended(self, code: int, again: bool, why: str, own: bool) -> dict[str, Any]:
        """Every rank of this node ended (``code``: meshrun's exit code for
        the try; ``again``: a restart may follow, not a signal or --timeout;
        ``why``: the cause, ``own``: of this node's, not a peer lost elsewhere);
        waits for what every node does next: ``again`` (with ``try``) or
        ``over``."""
        with self._lock:
            self._on_stop = None
        self._out.put(dict(self._mine, say="ended", code=code, again=again, why=why, own=own,
                           **{"try": self._try}))
        while True:
            try:
                msg = self._in.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():     # (an error of its own: said on stderr)
                    return {"say": "over", "why": "this meshrun lost its word with node 0's"}
                continue
            if msg.get("say") in ("again", "over", "refused"):
                return msg

    def gone(self, node: int) -> str:
        """How node ``node``'s meshrun is gone, '' where it is there: the
        ranks here lose its ranks as their connections close, before node
        0's next beat finds its meshrun's closed too, so node 0's is asked
        now (where node 0's is gone, its connection closed first); ''
        where no answer came in a few beats."""
        with self._lock:
            self._known.discard(node)
        self._out.put(dict(self._mine, say="ask", about=node))
        give_up = time.monotonic() + _ASK_S
        while True:
            with self._lock:
                if node in self._gone or node in self._known or time.monotonic() >= give_up:
                    return self._gone.get(node, "")
            time.sleep(0.01)

    def close(self) -> None:
        """Say bye (node 0's waits for every node's before its service goes)."""
        self._out.put(dict(self._mine, say="bye"))
        self._thread.join(timeout=5)

    def _told(self, msg: dict[str, Any]) -> None:
        say = msg.get("say")
        with self._lock:
            if type(msg.get("gone")) is int:
                self._gone[msg["gone"]] = str(msg.get("gone_why"))
            if say == "known" and type(msg.get("about")) is int:
                self._known.add(msg["about"])
            current = msg.get("try") == self._try or say in ("over", "refused")
            stop = say in ("stop", "over", "refused") and current and not self._stopped
            if stop:
                self._stopped = str(msg.get("why") or "the job is over")
            on_stop = self._on_stop if stop else None
        if on_stop is not None:
            on_stop(self._stopped)
        if say in ("go", "wait", "again", "over", "refused"):
            self._in.put(msg)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._mon, zmq.POLLIN)
        heard: float | None = None      # when node 0's service last said anything
        said = 0.0
        gone = ""
        try:
            while True:
                events = dict(poller.poll(50))
                now = time.monotonic()
                if self._mon in events:
                    if monitor_event(self._mon.recv_multipart()) != zmq.EVENT_DISCONNECTED:
                        self._told({"say": "refused", "why": "not our credentials: a "
                                    "different job secret (MESH_SECRET) or MESH_CURVE "
                                    "setting there"})
                    elif heard is not None:
                        gone = "its connection closed"
                if self._sock in events:
                    while self._sock.poll(0):
                        try:
                            msg = msgpack.unpackb(self._sock.recv(), raw=False)
                        except Exception:
                            continue
                        heard = now
                        if isinstance(msg, dict):
                            self._told(msg)
                if heard is not None and now - heard > self._silent_s and not gone:
                    gone = f"it said nothing for {self._silent_s:g} s"
                if gone:
                    gone = f"node 0's meshrun at {self._where} is gone ({gone}: killed, or " \
                           f"its host lost)"
                    self._told({"say": "over", "why": f"{gone}; the job ends on every node",
                                "gone": 0, "gone_why": gone})
                    heard, gone = None, ""
                while not self._out.empty():
                    msg = self._out.get()
                    self._send(msg)
                    if msg.get("say") == "bye":
                        return
                if now - said >= _BEAT_S:
                    said = now
                    with self._lock:
                        beat = dict(self._mine, say="ready" if self._ready else "beat",
                                    **{"try": self._try})
                    self._send(beat)
        finally:
            close_watched(self._sock, self._mon, 1000)    # (a bye: a moment to go out)
            self._ctx.term()

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self._sock.send(msgpack.packb(msg), zmq.NOBLOCK)
        except zmq.ZMQError:    # (not connected yet: the next beat says it again)
            pass
