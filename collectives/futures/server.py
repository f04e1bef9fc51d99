"""A futures worker: it serves its master's tasks over an intercommunicator
(rank 0 of the other group the master) until the master says stop::

    master -> worker, tag TASK:   ["setup", {"path", "main", "init"}]
                                  ["task", id, data, n]  (then n arrays)
                                  ["stop"]
    worker -> master, tag REPLY:  [id, ok, data, n]      (then n arrays)

``data`` is codec.dumps' bytes: a task's ``[ref, args, kwargs, chunked]``
(``chunked``: ``args`` a list of argument tuples, the reply the list of
their results), a reply's result, or (``ok`` false) codec.exc_out's
exception. The setup's reply has id -1. ``main`` runs a spawned worker
(``python -m collectives.futures.server``). While a task runs,
``get_comm_workers()`` is the workers' own intracommunicator (a spawned pool's
COMM_WORLD; MPICommExecutor's and -m's: the ranks that serve)."""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any

import mesh

from . import codec

__all__ = ["serve", "main", "get_comm_workers", "TASK", "REPLY"]

TASK, REPLY = 31, 32
_here = threading.local()       # .workers: the serving thread's workers' communicator


def get_comm_workers() -> Any:
    """mpi4py.futures' ``get_comm_workers()``: inside a task on a worker,
    the intracommunicator of the pool's workers (for collectives among
    them: every worker must be running such a task); RuntimeError elsewhere."""
    comm = getattr(_here, "workers", None)
    if comm is None:
        raise RuntimeError("communicator is not accessible: get_comm_workers() is for a "
                           "task running on a worker of MPIPoolExecutor or MPICommExecutor")
    return comm


def _reply(comm: Any, id_: int, ok: bool, value: Any, what: str) -> None:
    try:
        data, arrays = codec.dumps(value, what)
    except TypeError as e:
        ok, (data, arrays) = False, codec.dumps(codec.exc_out(e, what), what)
    comm.send([id_, ok, data, len(arrays)], dest=0, tag=REPLY)
    for a in arrays:
        comm.send(a, dest=0, tag=REPLY)


def _setup(said: dict[str, Any], where: str) -> list[Any]:
    for p in said.get("path") or []:
        if p not in sys.path:
            sys.path.append(p)
    codec.set_main(said.get("main"))
    init = said.get("init")
    if init is not None:
        try:
            codec.resolve(init[0])(*init[1])
        except BaseException as e:
            return codec.exc_out(e, where)
    return []


def _run(task: list[Any]) -> Any:
    r, args, kwargs, chunked = task
    fn = codec.resolve(r)
    if chunked:
        return [fn(*a) for a in args]
    return fn(*args, **kwargs)


def _idle(comm: Any) -> None:
    """Until the master's next message is here: probes, a sleep between
    them from 0.2 ms doubling to 10 ms (a worker may idle longer than any
    blocking receive's MESH_TIMEOUT; a master lost raises LostPeerError)."""
    wait = 0.0002
    while not comm.Iprobe(source=0, tag=TASK):
        time.sleep(wait)
        wait = min(0.01, wait * 2)


def serve(comm: Any, workers: Any = None) -> None:
    """Run ``comm``'s master's tasks here until it says stop (or is lost:
    nothing left to serve); ``workers``: the workers' intracommunicator,
    get_comm_workers()'s meanwhile."""
    _here.workers = workers
    try:
        _serve(comm)
    finally:
        _here.workers = None


def _serve(comm: Any) -> None:
    where = f"Worker {comm.Get_rank()} of {comm.Get_size()} (pid {os.getpid()}) on " \
            f"{socket.gethostname()}"
    try:
        while True:
            _idle(comm)
            msg = comm.recv(source=0, tag=TASK)
            if msg[0] == "stop":
                return
            if msg[0] == "setup":
                failed = _setup(msg[1], where)
                _reply(comm, -1, not failed, failed, "the initializer's error")
                continue
            _, id_, data, n = msg
            task = codec.finish(comm, [data, n], 0, TASK)
            try:
                value, ok = _run(task), True
            except BaseException as e:
                value, ok = codec.exc_out(e, where), False
            what = f"the result of {'.'.join(task[0])}" if ok else "the exception"
            _reply(comm, id_, ok, value, what)
            del task, value
    except mesh.LostPeerError:
        return      # (the master is gone: its futures failed there)


def main() -> None:
    """A spawned worker: serve the parent, then leave its bridge."""
    from .. import MPI
    parent = MPI.Comm.Get_parent()
    if parent == MPI.COMM_NULL:
        raise SystemExit("collectives.futures.server: not a process MPIPoolExecutor spawned")
    serve(parent, MPI.COMM_WORLD)
    try:
        parent.Disconnect()
    except mesh.MeshError:
        pass


if __name__ == "__main__":
    main()
