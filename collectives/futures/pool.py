"""The master's side of a pool of workers: one thread (the manager) owns
the intercommunicator to the workers, hands each idle worker the next
pending task, and sets each future from its worker's reply. A worker
lost (a peer lost on the intercommunicator) breaks the pool: every future
not done fails with BrokenExecutor naming it, as concurrent.futures'
broken pools do. At the end the manager tells the workers to stop and,
for workers it spawned, leaves the bridge and reaps them (killed past
MESH_CLOSE_WAIT)."""
from __future__ import annotations

import collections
import subprocess
import sys
import threading
from concurrent.futures import BrokenExecutor, Future
from typing import Any, Callable

import mesh
from mesh.peer import config_float

from . import codec
from .server import REPLY, TASK

__all__ = ["Pool", "spawn_workers", "BrokenExecutor"]

_BUSY_WAIT = 0.05
"""How long the manager's wait for a reply lasts at most while every worker
is busy (it then looks at the queue and the end again)."""

_WORKER = "import sys; sys.path[:0] = [{!r}]; from collectives.futures.server import main; main()"


def spawn_workers(n: int, python: str | None = None) -> Any:
    """``n`` worker processes started by collectives.MPI's Spawn over
    COMM_SELF: their intercommunicator."""
    import os

    from .. import MPI
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return MPI.COMM_SELF.Spawn(python or sys.executable, ["-c", _WORKER.format(top)],
                               maxprocs=n)


class Pool:
    """Tasks to ``comm``'s remote group (the workers); ``spawned``: the
    workers are this pool's own (disconnected and reaped at the end);
    ``stop``: they are told to stop at the end (not -m's shared pool's);
    ``on_end`` is called once the manager is done with ``comm``."""

    def __init__(self, comm: Any, spawned: bool, setup: dict[str, Any],
                 stop: bool = True, on_end: Callable[[], None] | None = None) -> None:
        self.comm, self.spawned, self.stop, self.on_end = comm, spawned, stop, on_end
        self.size = comm.Get_remote_size()
        self.queue: collections.deque[Any] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.broken: str | None = None
        self.ids = iter(range(1 << 62))
        self.failed: BaseException | None = None
        try:
            self._check_setup(setup)
        except BaseException as e:      # (a worker lost at once: broken, cleaned up below)
            self.failed = e
        self.thread = threading.Thread(target=self._manage, name="futures-manager", daemon=True)
        self.thread.start()

    def _check_setup(self, setup: dict[str, Any]) -> None:
        """Every worker's path, main script and initializer (its error, if
        one's raised, breaks the pool before a task runs)."""
        for w in range(self.size):
            self.comm.send(["setup", setup], dest=w, tag=TASK)
        failed = []
        for w in range(self.size):
            head = self.comm.recv(source=w, tag=REPLY)
            said = codec.finish(self.comm, head[2:], w, REPLY)
            if not head[1]:
                failed.append(f"worker {w}: {codec.exc_in(said)!r}{said[3]}")
        if failed:
            self.broken = "collectives.futures: the initializer failed: " + "; ".join(failed)

    def push(self, future: Future, task: tuple[bytes, list[Any]]) -> None:
        with self.cond:
            if self.broken is not None:
                raise BrokenExecutor(self.broken)
            self.queue.append((future, task))
            self.cond.notify()

    def done(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def cancel(self) -> None:
        with self.cond:
            while self.queue:
                self.queue.popleft()[0].cancel()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def _manage(self) -> None:
        running: dict[int, tuple[Future, int]] = {}
        idle = collections.deque(range(self.size))
        error: BaseException | None = self.failed
        try:
            if self.broken is None and error is None:
                self._loop(running, idle)
        except BaseException as e:      # (a worker lost, the mesh failed)
            error = e
        if error is not None or self.broken is not None:
            self._break(running, error)
        self._end(error)
        if self.on_end is not None:
            self.on_end()

    def _loop(self, running: dict[int, tuple[Future, int]], idle: collections.deque[int]) -> None:
        from ..MPI import ANY_SOURCE, Status
        st = Status()
        wait = 0.0
        while True:
            sends = []
            with self.cond:
                while idle and self.queue:
                    future, task = self.queue.popleft()
                    if future.set_running_or_notify_cancel():
                        id_ = next(self.ids)
                        running[id_] = (future, idle[0])
                        sends.append((idle.popleft(), id_, task))
                if self.stopping and not self.queue and not running and not sends:
                    return
                if not sends and not running:
                    self.cond.wait()        # (nothing out: woken by a push or the end)
                    continue
                busy = not sends and not idle       # (no push can go out before a reply)
                if not sends and wait and not busy:
                    self.cond.wait(wait)
            if busy and wait:
                self._await_reply()
            if sends:
                wait = 0.0
            for w, id_, (data, arrays) in sends:
                self.comm.send(["task", id_, data, len(arrays)], dest=w, tag=TASK)
                for a in arrays:
                    self.comm.send(a, dest=w, tag=TASK)
            if not self.comm.Iprobe(source=ANY_SOURCE, tag=REPLY, status=st):
                wait = min(0.01, max(0.00002, wait * 2))
                continue
            wait = 0.0
            w = st.Get_source()
            head = self.comm.recv(source=w, tag=REPLY)
            value = codec.finish(self.comm, head[2:], w, REPLY)
            future, _ = running.pop(head[0])
            idle.append(w)
            if head[1]:
                future.set_result(value)
            else:
                future.set_exception(codec.exc_in(value))
            del future, value

    def _await_reply(self) -> None:
        """Every worker busy: block until a reply comes (a probe of the
        intercommunicator's processes, at most ``_BUSY_WAIT`` s at a time),
        not sleeps between polls, which kept a reply waiting up to a
        sleep's length."""
        g = getattr(self.comm, "mesh", None)
        if not isinstance(g, mesh.Comm):
            return
        try:
            g.probe(mesh.ANY, REPLY, timeout=_BUSY_WAIT)
        except mesh.MeshTimeoutError:
            pass

    def _break(self, running: dict[int, tuple[Future, int]], error: BaseException | None) -> None:
        on = sorted({w for _, w in running.values()})
        why = self.broken
        if error is not None:
            why = f"collectives.futures: {self._lost(error)}, the pool is broken (tasks " \
                  f"running on worker{'s' if len(on) > 1 else ''} " \
                  f"{', '.join(map(str, on)) or '-'}): {type(error).__name__}: {error}"
        with self.cond:
            self.broken = why
            queued = [f for f, _ in self.queue]
            self.queue.clear()
        for f in [f for f, _ in running.values()] + \
                [f for f in queued if f.set_running_or_notify_cancel()]:
            f.set_exception(BrokenExecutor(self.broken))

    def _lost(self, error: BaseException) -> str:
        """Which worker ``error`` lost (by the peer's world rank), its pid
        where this pool spawned it."""
        peer = getattr(error, "peer", None)
        ranks = self.comm._world(self.comm._ro, self.size) if hasattr(self.comm, "_world") \
            else []
        if peer not in ranks:
            return "a worker was lost"
        w = ranks.index(peer)
        procs = getattr(getattr(self.comm, "_bridge", None), "procs", None) or []
        pid = f" (pid {procs[w].pid})" if w < len(procs) else ""
        return f"worker {w}{pid} was lost"

    def _end(self, error: BaseException | None) -> None:
        """The workers told to stop; spawned ones' bridge left and reaped."""
        procs = list(getattr(getattr(self.comm, "_bridge", None), "procs", None) or [])
        if error is None and self.stop:
            for w in range(self.size):
                try:
                    self.comm.send(["stop"], dest=w, tag=TASK)
                except mesh.MeshError:
                    break
        if not self.spawned:
            return
        try:
            self.comm.Disconnect()
        except mesh.MeshError:
            pass
        wait = config_float("MESH_CLOSE_WAIT", 30.0, least=0)
        if error is not None:       # (the others' tasks have failed here: nothing to wait for)
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for p in procs:
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
