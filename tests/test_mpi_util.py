"""collectives.util (mpi4py.util on meshrun): sync's Counter, Mutex,
Sequential, Condition and Semaphore at 3 ranks under mesh.spawn; dtlib's
conversions, pkl5's refusal and pool's ThreadPool without a process;
pool's Pool over the job's workers under ``meshrun -n 3 python -m
collectives.futures``, with get_comm_workers, collect and compose there."""
from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from proctools import launch_env, run_in_session

import mesh

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent


def square(x: Any) -> Any:
    return x * x


def mul(a: Any, b: Any) -> Any:
    return a * b


def _sync_job(world: Any, folder: str) -> dict[str, Any]:
    from collectives import MPI
    from collectives.util import sync
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    out: dict[str, Any] = {}
    counter = sync.Counter(10, 2, typecode="d", comm=comm, root=1)
    mine = [next(counter) for _ in range(4)]
    out["counter"] = sorted(sum(comm.allgather(mine), []))
    counter.free()
    counter.free()
    try:
        counter.next()
    except RuntimeError as e:
        out["freed"] = str(e)
    mutex = sync.Mutex(comm=comm)
    counter = sync.Counter(comm=comm)
    comm.Barrier()
    with mutex:         # (ten draws in a row: no other rank draws while this one holds it)
        out["runs"] = [next(counter) for _ in range(10)]
        time.sleep(0.01)
    comm.Barrier()
    took = mutex.acquire(blocking=False)
    comm.Barrier()
    if took:
        mutex.release()
    out["nonblocking"] = comm.allgather(took).count(True)
    try:
        mutex.release()
    except RuntimeError as e:
        out["unheld"] = str(e)
    mutex.free()
    counter.free()
    rec = sync.Mutex(recursive=True, comm=comm)
    with rec:
        with rec:
            out["count"] = rec.count()
    out["count_after"] = rec.count()
    rec.free()
    counter = sync.Counter(comm=comm)
    with sync.Sequential(comm):
        out["order"] = next(counter)
    counter.free()
    cv = sync.Condition(comm=comm)
    if rank == 0:
        comm.Barrier()
        woken = 0
        while woken < size - 1:
            with cv:
                woken += cv.notify()
        with cv:
            out["notified"] = [woken, cv.notify_all()]
    else:
        comm.Barrier()
        with cv:
            out["waited"] = cv.wait()
    cv.free()
    sem = sync.Semaphore(2, comm=comm)
    counter = sync.Counter(comm=comm)
    inside = sync.Counter(comm=comm)
    peak = 0
    for _ in range(3):
        with sem:
            peak = max(peak, inside.next(1) + 1)
            time.sleep(0.005)
            inside.next(-1)
    out["peak"] = max(comm.allgather(peak))
    try:
        sem.release()
    except ValueError as e:
        out["bounded"] = str(e)
    sem.free()
    counter.free()
    inside.free()
    Path(folder, f"{rank}.json").write_text(json.dumps(out))
    # rank 1 dies queued for the mutex rank 0 holds, beside rank 2: its ticket is
    # passed over (by rank 2's acquire, or rank 0's next, whichever comes after it)
    mutex = sync.Mutex(comm=comm)
    cv = sync.Condition(comm=comm)
    held = sync.Counter(comm=comm, root=2)      # (its value on rank 2: next() raises then)
    if rank == 0:
        mutex.acquire()
    comm.Barrier()
    if rank == 1:
        threading.Thread(target=_dies_when_told, args=(comm,), daemon=True).start()
        mutex.acquire()
    elif rank == 2:
        with mutex:
            comm.send(None, 0)
        comm.recv(source=0)         # rank 2 dies holding it: rank 0's acquire raises
        mutex.acquire()
        comm.send(None, 0)
        os._exit(3)
    said: dict[str, Any] = {}
    while mutex._window.tomemory()[0] < 3:      # (rank 0's word: 3 tickets taken)
        time.sleep(0.01)
    comm.send(None, 1, tag=7)
    try:
        comm.recv(source=1)
    except mesh.LostPeerError:      # (the mesh knows rank 1 lost)
        pass
    mutex.release()
    comm.recv(source=2)
    with mutex:
        said["passed"] = True
    comm.send(None, 2)
    comm.recv(source=2)
    try:
        mutex.acquire()
    except mesh.LostPeerError as e:
        said["acquire"] = f"{type(e).__name__} {e.peer}: {e}"
    try:
        with cv:
            cv.wait()
    except mesh.LostPeerError as e:
        said["wait"] = f"{type(e).__name__} {e.peer}: {e}"
    try:
        held.next()
    except mesh.LostPeerError as e:
        said["counter"] = f"{type(e).__name__} {e.peer}: {e}"
    with cv:        # rank 1, lost, queued before rank 0: passed over
        cv._window.Lock(0)
        cv._set_queue(np.array([2, 1, 0, 0], np.intc))
        cv._window.Unlock(0)
        # (rank 0's words: its own flag, set; the count of waiters, none left)
        said["notify"] = [cv.notify(), cv._window.tomemory()[:2].tolist()]
    Path(folder, "0.lost").write_text(json.dumps(said))
    return out


def _dies_when_told(comm: Any) -> None:
    """Rank 1's: its process ends (queued for a mutex) once rank 0 says."""
    comm.recv(source=0, tag=7)
    os._exit(3)


def test_sync_at_three_ranks(tmp_path: Path) -> None:
    """(one job of 3 ranks: 2-8 s) Rank 1 dies queued for a Mutex: its
    ticket is passed over, and rank 2, then rank 0 take it in turn. Then
    rank 2 dies holding it: rank 0's acquire raises LostPeerError naming
    it and the call (they polled for ever), as does its Condition.wait
    (any lost rank: the notifier is not known), and a Counter.next of the
    counter rank 2 held; its notify passes a lost waiter over."""
    with pytest.raises(mesh.WorkerError, match="rank [12]"):
        mesh.spawn(_sync_job, 3, str(tmp_path), timeout=100, settle=20)
    said = json.loads((tmp_path / "0.lost").read_text())
    assert said["passed"], said
    assert said["acquire"].startswith("LostPeerError 2: rank 0: collectives.util.sync."
                                      "Mutex.acquire failed: rank 2, which holds the mutex "
                                      "and may have left what it guards half-written, is "
                                      "lost: "), said
    assert said["wait"].startswith("LostPeerError ") and (
        "rank 0: collectives.util.sync.Condition.wait failed: rank " in said["wait"]), said
    assert said["notify"] == [1, [1, 0]], said
    assert said["counter"].startswith("LostPeerError 2: rank 0: collectives.util.sync."
                                      "Counter.next failed: rank 2, which holds the counter's "
                                      "value, is lost: "), said
    got = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(3)]
    for rank, out in enumerate(got):
        assert out["counter"] == [10.0 + 2 * i for i in range(12)], out
        assert out["freed"] == "counter already freed", out
        runs = out["runs"]
        assert runs == list(range(runs[0], runs[0] + 10)) and runs[0] % 10 == 0, out
        assert out["nonblocking"] == 1 and "unheld" in out["unheld"], out
        assert out["count"] == 2 and out["count_after"] == 0, out
        assert out["order"] == rank, out
        assert out["peak"] <= 2 and "released too many times" in out["bounded"], out
    assert sorted(o["runs"][0] for o in got) == [0, 10, 20]
    assert got[0]["notified"] == [2, 0] and got[1]["waited"] and got[2]["waited"], got


def test_dtlib_round_trips() -> None:
    from collectives import MPI
    from collectives.util.dtlib import from_numpy_dtype, to_numpy_dtype
    for spec, align in [("i", False), ("(3,4)f", False), ("c,i,d", False), ("c,i,d", True),
                        ([("a", "i4"), ("b", "f8", (2,))], True)]:
        dt = np.dtype(spec, align=align)
        mt = from_numpy_dtype(dt)
        assert mt.extent == dt.itemsize, spec
        back = to_numpy_dtype(mt)
        assert back.itemsize == dt.itemsize and back.isalignedstruct == dt.isalignedstruct
        assert to_numpy_dtype(from_numpy_dtype(back)) == back, spec
        mt.Free()
    assert to_numpy_dtype(MPI.DOUBLE) == np.float64
    assert to_numpy_dtype(MPI.INT.Create_contiguous(3)) == np.dtype(("i4", (3,)))
    vec = to_numpy_dtype(MPI.DOUBLE.Create_vector(3, 2, 4))
    assert vec.names == ("f0", "f1", "f2") and [vec.fields[n][1] for n in vec.names] == \
        [0, 32, 64] and vec.itemsize == MPI.DOUBLE.Create_vector(3, 2, 4).extent
    assert to_numpy_dtype(MPI.INT.Create_subarray([3, 4], [3, 4], [0, 0],
                                                  MPI.ORDER_FORTRAN)) == np.dtype(("i4", (4, 3)))
    pair = to_numpy_dtype(MPI.DOUBLE_INT)
    assert pair.names == ("f0", "f1") and pair.itemsize == 16
    with pytest.raises(ValueError, match="subarray"):
        to_numpy_dtype(MPI.INT.Create_subarray([4], [2], [1]))
    with pytest.raises(ValueError, match="null"):
        to_numpy_dtype(MPI.DATATYPE_NULL)
    with pytest.raises(ValueError, match="object"):
        from_numpy_dtype(object)


def test_pkl5_refused_saying_what_to_use() -> None:
    with pytest.raises(NotImplementedError, match=r"pkl5.*not provided.*never pickles.*"
                                                  r"comm\.send"):
        importlib.import_module("collectives.util.pkl5")


def test_thread_pool() -> None:
    from collectives.util.pool import ThreadPool
    with ThreadPool(2) as pool:
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]
        assert sorted(pool.imap_unordered(square, range(4))) == [0, 1, 4, 9]
        assert pool.starmap_async(mul, [(2, 3), (4, 5)]).get(30) == [6, 20]
        assert pool.apply_async(square, (3,)).get(30) == 9
    pool.join()


def test_pool_and_get_comm_workers_under_dash_m_futures(tmp_path: Path) -> None:
    """util.pool's Pool over the job's 2 workers (``-m collectives.futures``),
    get_comm_workers in their tasks, collect and compose of their futures. (3-10 s)"""
    script = tmp_path / "pool.py"
    script.write_text(
        "from collectives.futures import MPIPoolExecutor, collect, compose\n"
        "from collectives.util.pool import Pool\n"
        "from test_mpi_futures import workers_comm\n"
        "from test_mpi_util import mul, square\n"
        "if __name__ == '__main__':\n"
        "    pool = Pool(2)\n"
        "    print('apply', pool.apply(square, (7,)))\n"
        "    print('map', pool.map(square, range(6)), pool.map(square, range(9), 2))\n"
        "    print('unordered', sorted(pool.imap_unordered(square, range(5))))\n"
        "    r = pool.starmap_async(mul, [(1, 2), (3, 4)])\n"
        "    print('async', r.get(60), r.ready(), r.successful())\n"
        "    comms = pool.map(workers_comm, range(4))\n"
        "    print('comm', sorted({tuple(c[1:]) for c in comms}) in ([(2, 0), (2, 1)],\n"
        "          [(2, 0)], [(2, 1)]), [c[0] for c in comms])\n"
        "    pool.close()\n"
        "    pool.join()\n"
        "    with MPIPoolExecutor() as ex:\n"
        "        fs = [ex.submit(square, i) for i in range(4)]\n"
        "        print('collect', collect(fs).result(60))\n"
        "        print('compose', compose(ex.submit(square, 3), str).result(60))\n")
    env = launch_env(ROOT)
    env["PYTHONPATH"] += ":" + str(ROOT / "tests")
    code, out = run_in_session([sys.executable, "-m", "mesh.launch", "-n", "3", "--no-prefix",
                                "-m", "collectives.futures", str(script)], env, 100, cwd=ROOT)
    assert code == 0, out
    assert out == ("apply 49\nmap [0, 1, 4, 9, 16, 25] [0, 1, 4, 9, 16, 25, 36, 49, 64]\n"
                   "unordered [0, 1, 4, 9, 16]\nasync [2, 12] True True\n"
                   "comm True [0, 1, 2, 3]\ncollect [0, 1, 4, 9]\ncompose 9\n"), out
