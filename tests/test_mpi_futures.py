"""collectives.futures (mpi4py.futures on meshrun) with real processes: a
master under mesh.spawn of 1 with workers started by Spawn (map with
chunks, unordered and timeouts, starmap, submit of arrays and tuples, an
exception's traceback, cancel, an initializer, functions refused, a worker
that dies breaking the pool, nothing left after shutdown); MPICommExecutor
under ``meshrun -n 3`` (its tasks' get_comm_workers); a program whose tasks
are its ``__main__``'s functions under ``python`` and under ``python -m
collectives.futures`` at 3 ranks; and without a process the codec
(references, msgpack and arrays, exceptions), collect, compose and the
names re-exported from concurrent.futures."""
from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import BrokenExecutor, CancelledError, Future, TimeoutError
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from proctools import launch_env, run_in_session

import mesh
from collectives.futures import codec

pytestmark = pytest.mark.timeout(150)

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "tests" / "scripts" / "futures_main.py"


def square(x: Any) -> Any:
    return x * x


def pair(a: Any, b: Any) -> Any:
    return (a, b, os.getpid())


def nap(s: float) -> float:
    time.sleep(s)
    return s


def broken(x: int) -> None:
    raise ValueError(f"task {x} went wrong")


def dies(x: int) -> int:
    if x == 1:
        os._exit(3)
    time.sleep(x)
    return x


def init(tag: str) -> None:
    os.environ["FUTURES_INIT"] = tag


def said_init() -> str | None:
    return os.environ.get("FUTURES_INIT")


def workers_comm(x: int) -> list[int]:
    from collectives.futures import get_comm_workers
    comm = get_comm_workers()
    return [x, comm.Get_size(), comm.Get_rank()]


class Thing:
    def method(self) -> None:
        pass


def _children() -> list[int]:
    me = str(os.getpid())
    out = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[1] == me:
                    out.append(int(d))
        except (OSError, IndexError, ValueError):
            pass
    return out


def _sockets() -> int:
    fds = os.listdir("/proc/self/fd")
    return sum(1 for fd in fds if os.path.islink(f"/proc/self/fd/{fd}") and
               os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"))


def _master(world: Any) -> dict[str, Any]:
    from collectives import MPI
    from collectives.futures import MPIPoolExecutor
    out: dict[str, Any] = {}
    MPI.COMM_SELF.Barrier()
    before = sorted(t.name for t in threading.enumerate())
    sockets = _sockets()
    ex = MPIPoolExecutor(max_workers=2, initializer=init, initargs=("yes",))
    out["workers"] = ex.num_workers
    out["map"] = list(ex.map(square, range(7)))
    out["chunks"] = list(ex.map(square, range(7), chunksize=3))
    out["unordered"] = sorted(ex.map(square, range(7), unordered=True, chunksize=2))
    star = list(ex.starmap(pair, [(1, (2, 3)), ("a", {"k": [1.5]})]))
    out["star"] = [s[:2] for s in star]
    out["pids"] = len({s[2] for s in list(ex.map(pair, range(6), range(6)))} - {os.getpid()})
    a = ex.submit(square, np.arange(4.0)).result()
    out["array"] = [type(a).__name__, a.tolist()]
    out["init"] = ex.submit(said_init).result()
    try:
        ex.submit(broken, 4).result()
    except ValueError as e:
        out["raised"] = [repr(e), str(e.__cause__)]
    try:
        list(ex.map(nap, [2.0], timeout=0.2))
    except TimeoutError:
        out["timeout"] = True
    slow = [ex.submit(nap, 1.0) for _ in range(2)]
    pending = ex.submit(square, 3)
    out["cancel"] = [pending.cancel(), pending.cancelled()]
    try:
        pending.result()
    except CancelledError:
        out["cancelled"] = True
    out["slow"] = [f.result() for f in slow]
    refused = []
    for bad in [lambda v: v, Thing().method, _children.__globals__["_master"].__call__]:
        try:
            ex.submit(bad)
        except TypeError as e:
            refused.append(str(e))
    try:
        ex.submit(square, {1, 2})
    except TypeError as e:
        refused.append(str(e))
    out["refused"] = refused
    tail = [ex.submit(nap, 0.5) for _ in range(6)]
    ex.shutdown(wait=True, cancel_futures=True)
    out["tail"] = sorted("c" if f.cancelled() else "d" for f in tail)
    try:
        ex.submit(square, 1)
    except RuntimeError as e:
        out["after"] = str(e)
    with MPIPoolExecutor(max_workers=2) as ex:
        fs = [ex.submit(dies, x) for x in (1, 30, 0)]
        out["lost"] = []
        for f in fs:
            try:
                f.result(timeout=100)
            except BrokenExecutor as e:
                out["lost"].append(str(e))
        try:
            ex.submit(square, 1)
        except BrokenExecutor as e:
            out["broken"] = str(e)
        out["num"] = ex.num_workers
    out["threads"] = sorted(t.name for t in threading.enumerate()), before
    out["children"] = _children()
    out["sockets"] = [_sockets(), sockets]
    return out


def test_pool_of_spawned_workers_under_mesh_spawn() -> None:
    """(two Spawns of 2 workers: 5-30 s)"""
    got = mesh.spawn(_master, 1, timeout=140)[0]
    sq = [x * x for x in range(7)]
    assert got["workers"] == 2 and got["map"] == sq and got["chunks"] == sq, got
    assert got["unordered"] == sq and got["pids"] >= 1, got
    assert got["star"] == [(1, (2, 3)), ("a", {"k": [1.5]})], got
    assert got["array"] == ["ndarray", [0.0, 1.0, 4.0, 9.0]] and got["init"] == "yes", got
    text, tb = got["raised"]
    assert text == "ValueError('task 4 went wrong')", text
    assert "### Worker" in tb and "in broken" in tb and "task 4 went wrong" in tb, tb
    assert got["timeout"] and got["cancel"] == [True, True] and got["cancelled"], got
    assert got["slow"] == [1.0, 1.0], got
    lam, meth, call, aset = got["refused"]
    assert "cannot send test_mpi_futures._master.<locals>.<lambda> to the workers" in lam, lam
    assert "define it at the top level of a module" in lam, lam
    assert "Thing.method" in meth and "bound method" in meth, meth
    assert "cannot send" in call, call
    assert "an argument of test_mpi_futures.square cannot go to another process" in aset and \
        "set" in aset, aset
    assert "c" in got["tail"] and got["after"].startswith("cannot schedule"), got
    assert len(got["lost"]) == 3 and all("worker 0 (pid " in e and "was lost, the pool is "
                                         "broken" in e for e in got["lost"]), got["lost"]
    assert "worker 0" in got["broken"] and got["num"] == 0, got
    assert got["threads"][0] == got["threads"][1] and got["children"] == [], got
    assert got["sockets"][0] == got["sockets"][1], got


def test_comm_executor_under_meshrun(tmp_path: Path) -> None:
    """MPICommExecutor(COMM_WORLD, root=1) at 3 ranks: rank 1 the master,
    ranks 0 and 2 its workers, whose ``with`` body is skipped, and whose
    tasks' get_comm_workers() is the two of them; a task of the script's
    own, whose unguarded top level a worker runs to find it, raises the
    RuntimeError saying to guard it (the executor it meets made no
    collective: that waited for the timeout). (3-10 s)"""
    script = tmp_path / "comm.py"
    script.write_text(
        "from collectives import MPI\n"
        "from collectives.futures import MPICommExecutor\n"
        "from test_mpi_futures import pair, workers_comm\n"
        "def mine(x):\n"
        "    return x\n"
        "with MPICommExecutor(MPI.COMM_WORLD, root=1) as ex:\n"
        "    if ex is not None:\n"
        "        got = list(ex.map(pair, range(6), range(6)))\n"
        "        print('master', MPI.COMM_WORLD.rank, ex.num_workers,\n"
        "              [a for a, _, _ in got], len({p for _, _, p in got}) >= 1)\n"
        "        comms = {tuple(c[1:]) for c in ex.map(workers_comm, range(4))}\n"
        "        print('workers comm', comms <= {(2, 0), (2, 1)} and len(comms) >= 1)\n"
        "        try:\n"     # (a worker runs this unguarded script to find mine: refused)
        "            ex.submit(mine, 1).result(timeout=60)\n"
        "        except RuntimeError as e:\n"
        "            print('unguarded', 'executor made at the script' in str(e))\n"
        "print('after', MPI.COMM_WORLD.rank)\n")
    env = launch_env(ROOT)
    env["PYTHONPATH"] += os.pathsep + str(ROOT / "tests")
    code, out = run_in_session([sys.executable, "-m", "mesh.launch", "-n", "3", str(script)],
                               env, 100, cwd=ROOT)
    assert code == 0, out
    assert "[1] master 1 2 [0, 1, 2, 3, 4, 5] True\n" in out, out
    assert "[1] workers comm True\n" in out, out      # (get_comm_workers: the 2 workers')
    assert "[1] unguarded True\n" in out, out       # (not a worker's collective: a hang)
    assert all(f"[{r}] after {r}\n" in out for r in range(3)), out


def test_main_functions_under_python_and_dash_m_futures() -> None:
    """tests/scripts/futures_main.py under ``python`` and under ``meshrun
    -n 3 python -m collectives.futures``: the same lines. (6-20 s)"""
    env = launch_env(ROOT)
    code, alone = run_in_session([sys.executable, str(MAIN), "x"], env, 100, cwd=ROOT)
    assert code == 0, alone
    assert alone.startswith("args ['x']\nworkers 2\nmap [0, 10, 20, 30, 40] [0, 4, 8]\n"
                            "submit 60\nraised KeyError('no key') True True\nrefused "
                            "collectives.futures: cannot send __main__.<lambda> to the wo\n"
                            "done\n"), alone
    code, out = run_in_session([sys.executable, "-m", "mesh.launch", "-n", "3", "--no-prefix",
                                "-m", "collectives.futures", str(MAIN), "x"], env, 100, cwd=ROOT)
    assert code == 0, out
    assert out == alone, f"meshrun -m collectives.futures:\n{out}\npython:\n{alone}"


def test_collect_and_compose() -> None:
    from collectives.futures import collect, compose
    a, b = Future(), Future()
    both = collect([a, b, a])
    b.set_result(2)
    assert not both.done()
    a.set_result(1)
    assert both.result(0) == [1, 2, 1]
    assert collect([]).result(0) == []
    c, d = Future(), Future()
    failed = collect([c, d])
    c.set_exception(KeyError("k"))
    with pytest.raises(KeyError):
        failed.result(0)
    assert d.cancelled()
    e = Future()
    assert collect([e]).cancel() and e.cancelled()
    f = Future()
    doubled = compose(f, lambda v: 2 * v)
    f.set_result(4)
    assert doubled.result(0) == 8
    g = Future()
    kept = compose(g, excepthook=lambda exc: f"caught {exc!r}")
    g.set_exception(ValueError("x"))
    assert kept.result(0) == "caught ValueError('x')"
    h = Future()
    changed = compose(h, excepthook=lambda exc: RuntimeError("other"))
    h.set_exception(ValueError("x"))
    with pytest.raises(RuntimeError, match="other"):
        changed.result(0)
    i = Future()
    out = compose(i)
    assert out.cancel() and i.cancelled()
    with pytest.raises(CancelledError):
        out.result(0)


def test_futures_names_and_get_comm_workers_outside_a_task() -> None:
    import concurrent.futures as cf

    from collectives import futures
    assert futures.ThreadPoolExecutor is cf.ThreadPoolExecutor
    assert futures.ProcessPoolExecutor is cf.ProcessPoolExecutor
    with pytest.raises(RuntimeError, match="communicator is not accessible"):
        futures.get_comm_workers()


def test_codec_references_arrays_and_exceptions() -> None:
    with pytest.raises(TypeError, match=r"cannot send .*<lambda>.* define it at the top"):
        codec.ref(lambda: 0)

    def inner() -> None:
        pass
    with pytest.raises(TypeError, match=r"test_mpi_futures\..*<locals>\.inner"):
        codec.ref(inner)
    with pytest.raises(TypeError, match=r"not callable"):
        codec.ref(3)
    assert codec.ref(square) == ["test_mpi_futures", "square"]
    assert codec.ref(Thing.method) == ["test_mpi_futures", "Thing.method"]
    assert codec.resolve(codec.ref(os.path.join)) is os.path.join
    obj = [(1, (2.5, "s")), {"a": np.arange(3), 4: b"x"}, np.float32(2), None]
    data, arrays = codec.dumps(obj, "it")
    assert len(arrays) == 1
    back = codec._loads(data, arrays)
    assert back[0] == (1, (2.5, "s")) and back[1]["a"] is arrays[0] and back[1][4] == b"x"
    with pytest.raises(TypeError, match=r"it cannot go to another process \(an object of "
                                        r"type Thing\)"):
        codec.dumps([Thing()], "it")
    try:
        raise OSError(2, "gone")
    except OSError as e:
        said = codec.exc_out(e, "Worker 0")
    back_e = codec.exc_in(said)
    assert type(back_e) is FileNotFoundError and back_e.errno == 2
    assert "### Worker 0" in str(back_e.__cause__) and "OSError" in str(back_e.__cause__)
    said[0] = ["nowhere", "Missing"]
    assert repr(codec.exc_in(said)) == "RuntimeError('nowhere.Missing: [Errno 2] gone')"
    from collectives.futures import MPIPoolExecutor
    codec._main["running"] = "script.py"      # (a worker running an unguarded main script)
    try:
        with pytest.raises(RuntimeError, match=r"main script script.py .* executor made at "
                                               r"the script's top level: put that code under"):
            MPIPoolExecutor().submit(square, 2)
    finally:
        codec._main["running"] = None
