"""mesh.spawn from where a notebook user calls it: a function typed in
``python -c``, on standard input, a lambda, a closure (forked children on
Linux), and what it says where that cannot work."""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from proctools import alive as proc_alive

import mesh

REPO = Path(__file__).resolve().parents[1]
spawn_mod = importlib.import_module("mesh.spawn")

pytestmark = pytest.mark.timeout(90)

_CODE = textwrap.dedent("""\
    import json
    import sys
    import traceback
    import numpy as np
    import collectives as C
    import mesh

    def fn(world, n):
        a = np.full(2, float(world.rank))
        C.all_reduce(world, a)
        return world.rank * n + int(a[0])

    def bad(world):
        if world.rank == 1:
            raise ValueError("boom in rank 1")
        world.recv(1, timeout=30)

    def say(world):
        print(f"line a of {world.rank}\\nline b")
        sys.stdout.write("part")
        print(" whole")
        print("bar\\r 50%", file=sys.stderr)

    scale = 7
    out = {"fn": mesh.spawn(fn, 3, 10, timeout=40),
           "lambda": mesh.spawn(lambda world: world.rank * scale, 2, timeout=40)}
    with mesh.init() as own:  # a live mesh (ZeroMQ context, threads) in the forked parent
        own.send("kept", 0)
        out["beside a live mesh"] = mesh.spawn(lambda world: world.size, 2, timeout=40)
        out["kept"] = own.recv(0)
    out["prefixed"] = mesh.spawn(say, 2, timeout=40, prefix=True)
    try:
        mesh.spawn(bad, 2, timeout=40)
    except mesh.WorkerError as e:
        out["error"] = [e.rank, e.traceback]
        out["frames"] = [[frame.f_code.co_name, "__tracebackhide__" in frame.f_locals]
                         for frame, _ in traceback.walk_tb(e.__traceback__)]
    print(json.dumps(out))
    """)


def _script_env(**extra: str) -> dict[str, str]:
    """The environment of a script that calls mesh.spawn itself, as a user
    runs one: without conftest's MESH_SPAWN_PRELOAD, which is for this
    process's fork server (the script's own would import torch and
    torch._dynamo before its first rank, for ranks that never use them: 10 s
    on the loaded 2-core machine, each script)."""
    env = {k: v for k, v in os.environ.items() if k != "MESH_SPAWN_PRELOAD"}
    env.update(PYTHONPATH=str(REPO), **extra)
    return env


def _python(*args: str, stdin: str | None = None) -> dict:
    env = _script_env()
    r = subprocess.run([sys.executable, *args], input=stdin, cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=75)
    assert r.returncode == 0, r.stderr
    *printed, last = r.stdout.splitlines()
    return dict(json.loads(last), printed=printed, stderr=r.stderr)


def _check(out: dict) -> None:
    assert out["fn"] == [3, 13, 23]
    assert out["lambda"] == [0, 7]
    assert out["beside a live mesh"] == [2, 2] and out["kept"] == "kept"
    assert out["prefixed"] == [None, None]
    assert sorted(out["printed"]) == [f"[{r}] {line}" for r in (0, 1) for line in (
        f"line a of {r}", "line b", "part whole")], out["printed"]
    # (a bar's "\r", read here as a line's end: it starts the line over, with its prefix)
    assert all(f"[{r}] bar\n[{r}]  50%\n" in out["stderr"] for r in (0, 1)), out["stderr"]
    rank, tb = out["error"]
    assert rank == 1
    assert "ValueError: boom in rank 1" in tb and ", in bad" in tb
    # spawn's own frames: one, where it raised the rank's error, and hidden from a
    # notebook's (IPython's) traceback, which showed them above the rank's
    assert out["frames"] == [["<module>", False], ["spawn", True]], out["frames"]


def test_the_fork_server_has_its_preload_before_a_test_that_spawns_starts() -> None:
    """conftest forks one process of mesh.spawn's fork server before the
    run's first test that spawns, outside that test's pytest-timeout: the
    server's preload (torch and torch._dynamo, 30-60 s under load) took a
    60 s test's whole time where that test came first in a run (``-k``, a
    file alone). Run alone or not, the server is up when a test starts."""
    import multiprocessing as mp
    if not (spawn_mod._can_fork() and "forkserver" in mp.get_all_start_methods()
            and spawn_mod._server_fits()):
        pytest.skip("mesh.spawn starts fresh interpreters here, not forks of a server")
    assert spawn_mod._server_running()


def test_spawn_from_python_c() -> None:
    _check(_python("-c", _CODE))


def test_spawn_from_standard_input() -> None:
    _check(_python("-", stdin=_CODE))


_NOTEBOOK = textwrap.dedent("""\
    import glob, json, multiprocessing, os, signal, sys, tempfile, threading, time
    import mesh

    class Cell:     # a notebook's stdout: each write sent on as it comes (ipykernel's OutStream)
        def write(self, text):
            told = text if len(text) < 1000 else len(text)     # (a long line: its length)
            os.write(1, (json.dumps(told) + "\\n").encode())
            return len(text)
        def flush(self):
            pass

    def talk(world):
        for i in range(2):
            print("rank", world.rank, "line", i)
        print("no end", end="")
        sys.stdout.flush()
        t0 = time.monotonic()
        for i in range(80000):     # a line of 0.8 MB in small pieces, a progress bar's dots
            sys.stdout.write("0123456789")
        if world.rank == 1:         # (its end after a hold: it comes alone)
            time.sleep(0.5)
        sys.stdout.write("\\n")
        took = time.monotonic() - t0
        return signal.getsignal(signal.SIGINT) is signal.default_int_handler, took

    def slow(world):
        print("rank", world.rank, "waits", end="")     # (its last words: held, then on)
        time.sleep(60)

    out = {}
    sys.stdout = Cell()
    out["plain ^C"] = mesh.spawn(talk, 2, timeout=40)
    me = os.getpid()
    for delay in (1.0, 1.1):    # ^C, and again while the first stops the ranks
        threading.Timer(delay, os.kill, (me, signal.SIGINT)).start()
    t0 = time.monotonic()
    try:
        mesh.spawn(slow, 2, timeout=60, settle=30)
    except KeyboardInterrupt:
        out["interrupted after"] = time.monotonic() - t0
    sys.stdout = sys.__stdout__
    try:
        time.sleep(1)
    except KeyboardInterrupt:
        pass
    out["left"] = [multiprocessing.active_children(),
                   [t.name for t in threading.enumerate() if t.name.startswith("mesh")],
                   glob.glob(os.path.join(tempfile.gettempdir(), f"meshspawn-{me}-*"))]
    print(json.dumps(out, default=str))
    """)


def test_in_a_notebook_lines_come_whole_and_an_interrupt_stops_the_ranks() -> None:
    """What a notebook's kernel has that ``python -`` lacks, done by hand: an
    stdout that sends each write on (ipykernel's: the ranks' prints came into
    the cell mixed word by word, "rank rank 0 1 line line"), and Jupyter's
    interrupt, SIGINT to the kernel, pressed twice (the second, while the
    first stopped the ranks, left them running, the rendezvous service's
    threads in the kernel and the ranks' folder behind; the first waited
    settle= seconds for ranks that never see a ^C), a line of 0.8 MB
    written in 10-byte pieces (it took 9-29 s: the line so far was joined
    and searched at each write), its end alone after a hold (a piece the
    count of the line's bytes left out: 1 run in 32 under load 20-45), and the
    start of a line a rank wrote before it hung (lost when the interrupt
    stopped it). 2.3 s."""
    r = subprocess.run([sys.executable, "-"], input=_NOTEBOOK, cwd=REPO, env=_script_env(),
                       capture_output=True, text=True, timeout=75)
    assert r.returncode == 0, r.stdout + r.stderr
    *pieces, last = r.stdout.splitlines()
    out = json.loads(last)
    written = [json.loads(p) for p in pieces]
    # the long lines: whole where they come within _HOLD_S, else in pieces a hold each
    # (a loaded machine; rank 1's end always), never a byte lost; the short ones whole
    dots = [w for w in written if isinstance(w, int) or w.rstrip("\n").strip("0123456789") == ""]
    assert sum(w if isinstance(w, int) else len(w) for w in dots) == 2 * 800001, dots
    assert any(isinstance(w, int) and w > 1000 for w in dots), dots    # (not write by write)
    written = sorted(w for w in written if isinstance(w, str) and w not in dots)
    assert written == ["no end", "no end", "rank 0 line 0\n", "rank 0 line 1\n",
                       "rank 0 waits", "rank 1 line 0\n", "rank 1 line 1\n",
                       "rank 1 waits"], written
    # a rank's SIGINT is Python's own, as before
    assert [handler for handler, _ in out["plain ^C"]] == [True, True]
    assert out["interrupted after"] < 15, out     # not settle= (30 s) more
    assert out["left"] == [[], [], []], out


def _top_level(world: mesh.Mesh) -> int:
    return world.rank


def test_importable_functions_start_fresh_interpreters_others_fork() -> None:
    assert spawn_mod._by_name(_top_level, (1, "x")) is not None
    assert spawn_mod._by_name(lambda world: 0, ()) is None
    assert spawn_mod._by_name(_top_level, (lambda: 0,)) is None


def _env_of(world: mesh.Mesh, name: str) -> str | None:
    return os.environ.get(name)


_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
             "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE",
             "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID",
             "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "MASTER_ADDR")


def _torchrun_env(world: mesh.Mesh) -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in _TORCHRUN}


def test_ranks_see_the_callers_environment_as_of_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fork server started at an earlier spawn; its ranks still see what
    the caller set and unset since. They have torchrun's variables, as
    meshrun's ranks have them (one node, no restart; a run id of the call's)."""
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    envs = mesh.spawn(_torchrun_env, 2, timeout=40)
    run_id = envs[0]["TORCHELASTIC_RUN_ID"]
    assert run_id is not None and len(run_id) == 16
    assert envs == [{"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                     "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1",
                     "ROLE_RANK": str(r), "ROLE_NAME": "default", "ROLE_WORLD_SIZE": "2",
                     "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
                     "TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_USE_AGENT_STORE": "False",
                     "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "MASTER_ADDR": "127.0.0.1"}
                    for r in range(2)]
    monkeypatch.setenv("MESH_TEST_LATE", "set after the first spawn")
    monkeypatch.delenv("MESH_SPAWN_PRELOAD", raising=False)
    assert mesh.spawn(_env_of, 2, "MESH_TEST_LATE", timeout=40) == ["set after the first spawn"] * 2
    assert mesh.spawn(_env_of, 2, "MESH_SPAWN_PRELOAD", timeout=40) == [None] * 2


def _outer_env(world: mesh.Mesh) -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in spawn_mod._OUTER_RANKS}


def test_a_spawn_in_a_meshrun_rank_hands_on_none_of_that_ranks_own_variables(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Called in a meshrun rank, spawn's ranks do not get the rank's error
    files (torch's @record in them wrote the outer rank's, which meshrun then
    reported as that rank's error), nor its node, try or launcher; env= may
    still set them."""
    outer = {"TORCHELASTIC_ERROR_FILE": str(tmp_path / "rank5.torchelastic.json"),
             "MESH_ERROR_FILE": str(tmp_path / "rank5.error.json"), "MESH_NODE_RANK": "1",
             "MESH_RESTART_COUNT": "2", "MESH_LAUNCHER_PID": "1"}
    for name, value in outer.items():
        monkeypatch.setenv(name, value)
    assert sorted(outer) == sorted(spawn_mod._OUTER_RANKS)
    assert mesh.spawn(_outer_env, 2, timeout=40) == [dict.fromkeys(outer)] * 2
    assert mesh.spawn(_outer_env, 1, timeout=40, env={"MESH_NODE_RANK": "0"}) == [
        dict(dict.fromkeys(outer), MESH_NODE_RANK="0")]


def test_where_fork_is_not_used_it_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spawn_mod, "_can_fork", lambda: False)
    with pytest.raises(ValueError, match="Move it to a .py module"):
        mesh.spawn(lambda world: 0, 2, timeout=10)


def test_function_under_the_main_guard_is_named_in_the_error(tmp_path: Path) -> None:
    script = tmp_path / "guarded.py"
    script.write_text(textwrap.dedent("""\
        import mesh
        if __name__ == "__main__":
            def fn(world):
                return 1
            try:
                mesh.spawn(fn, 2, timeout=40)
            except mesh.WorkerError as e:
                print(str(e).splitlines()[-1])
        """))
    env = _script_env()
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=75)
    assert "not under `if __name__ == '__main__':`" in r.stdout, r.stdout + r.stderr


def test_a_call_at_the_scripts_top_level_runs_in_forks(tmp_path: Path) -> None:
    """The README's first snippet pasted into a script as it is, no main
    guard: fresh interpreters would import the script and call spawn again
    (multiprocessing's bootstrapping error, then "the process died")."""
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""\
        import mesh
        def fn(world, n):
            return world.rank * n
        print(mesh.spawn(fn, 2, 10, timeout=40))
        """))
    env = _script_env()
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=75)
    assert r.stdout == "[0, 10]\n", r.stdout + r.stderr


_ORPHAN = textwrap.dedent("""\
    import os, sys, time
    import mesh

    def fn(world, path):
        with open(f"{path}.{world.rank}", "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)

    if __name__ == "__main__":
        mesh.spawn(fn, 2, sys.argv[1], timeout=80)
    """)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_ranks_die_with_the_process_that_spawned_them(tmp_path: Path, sig: str) -> None:
    import signal
    import time
    script = tmp_path / "orphans.py"
    script.write_text(_ORPHAN)
    # (TMPDIR: the folder of the ranks' sockets, which a killed caller leaves, stays in tmp_path)
    env = _script_env(TMPDIR=str(tmp_path))
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path / "pid")], env=env,
                              cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        files = [tmp_path / f"pid.{r}" for r in (0, 1)]
        while not all(f.exists() and f.read_text() for f in files):
            assert parent.poll() is None and time.monotonic() < deadline, "ranks never started"
            time.sleep(0.05)
        pids = [int(f.read_text()) for f in files]
        parent.send_signal(getattr(signal, sig))
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [p for p in pids if proc_alive(p)]
            time.sleep(0.05)
        assert not alive, f"ranks {alive} outlived the process that spawned them ({sig})"
        # the next launch removes the folder a killed caller left, and no living one's
        live = tmp_path / f"meshspawn-{os.getpid()}-x"
        live.mkdir()
        locked = tmp_path / "meshspawn-999999999-y"   # a pid not seen here, its lock held: kept
        locked.mkdir()
        import fcntl
        held = os.open(locked / ".lock", os.O_CREAT | os.O_RDWR)
        fcntl.flock(held, fcntl.LOCK_EX)
        subprocess.run([sys.executable, "-c", "from mesh.rendezvous import run_folder, "
                        "remove_run_folder; remove_run_folder(run_folder('meshspawn'))"],
                       env=env, check=True, timeout=60)
        os.close(held)
        assert sorted(p.name for p in tmp_path.glob("meshspawn-*")) == [live.name, locked.name]
    finally:
        parent.kill()
        parent.wait()



def test_a_folder_too_long_for_a_unix_socket_is_not_used(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Sockets go to the launcher's folder where their path fits (107
    bytes), else to Linux's abstract namespace (elsewhere: the temporary
    folder, /tmp)."""
    import tempfile

    from mesh.world import _ipc_path
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    monkeypatch.setenv("MESH_RUNTIME_DIR", str(tmp_path))
    assert _ipc_path("mr-1-ab.sock") == str(tmp_path / "mr-1-ab.sock")
    monkeypatch.setenv("MESH_RUNTIME_DIR", str(deep))
    linux = sys.platform.startswith("linux")
    assert _ipc_path("mr-1-ab.sock") == ("@mr-1-ab.sock" if linux else "/tmp/mr-1-ab.sock")
    monkeypatch.delenv("MESH_RUNTIME_DIR")
    assert _ipc_path("mr-1-ab.sock") == ("@mr-1-ab.sock" if linux else "/tmp/mr-1-ab.sock")
    monkeypatch.undo()
    script = tmp_path / "sum.py"      # (meshrun's folder, and the ranks' TMPDIR, in ``deep``)
    script.write_text("import mesh, collectives, numpy as np\nw = mesh.init()\n"
                      "print('sum', collectives.all_reduce(w, np.array([w.rank]))[0])\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(deep))
    r = subprocess.run([sys.executable, "-m", "mesh.launch", "-n", "2", str(script)], env=env,
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0 and r.stdout.count("sum 1") == 2, r.stdout + r.stderr


def _threads_of(world: mesh.Mesh) -> tuple[str | None, int | None]:
    """OMP_NUM_THREADS here, and the thread count of numpy's OpenBLAS."""
    import ctypes

    import numpy  # noqa: F401  (loaded by mesh already)
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    for path in paths:
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                     "scipy_openblas_get_num_threads", "openblas_get_num_threads"):
            if hasattr(lib, name):
                return os.environ.get("OMP_NUM_THREADS"), int(getattr(lib, name)())
    return os.environ.get("OMP_NUM_THREADS"), None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps")
def test_ranks_share_the_cores_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """N ranks get cpus/N threads each (numpy's OpenBLAS too, loaded by the
    fork server before them), as meshrun's ranks do; OMP_NUM_THREADS set by
    the caller (or by spawn's ``env``) is theirs, numpy's OpenBLAS's too
    (it kept the fork server's count: a lone rank told one thread ran
    numpy on every core)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    share = max(1, (os.cpu_count() or 1) // 2)
    for omp, blas in mesh.spawn(_threads_of, 2, timeout=40):
        assert omp == str(share) and blas in (share, None), (omp, blas)
    assert mesh.spawn(_threads_of, 1, timeout=40, env={"OMP_NUM_THREADS": "1"})[0][1] in (1, None)
    # a lone rank told nothing has OpenBLAS's default, a thread per core (the
    # fork server's OpenBLAS starts with one, so that no pool is left to stop)
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("GOTO_NUM_THREADS", raising=False)
    assert mesh.spawn(_threads_of, 1, timeout=40)[0][1] in (len(os.sched_getaffinity(0)), None)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")      # ...or the caller's OpenBLAS count
    assert mesh.spawn(_threads_of, 1, timeout=40)[0][1] in (1, None)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    for omp, blas in mesh.spawn(_threads_of, 2, timeout=40):
        assert omp == "3" and blas in (3, None), (omp, blas)


def _native_threads(world: mesh.Mesh) -> int:
    """This rank's threads that are neither Python's nor ZeroMQ's: the
    fewest of a few looks, as a thread of Python's own just ending (out of
    threading's list, its task not yet gone: a loaded CI machine saw one)
    is not one that stays, as a BLAS pool's does."""
    import threading
    import time

    def once() -> int:
        ours = {t.native_id for t in threading.enumerate()}
        count = 0
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = f.read().strip()
            except FileNotFoundError:       # (ended meanwhile)
                continue
            if int(tid) not in ours and not name.startswith("ZMQbg"):
                count += 1
        return count
    fewest = once()
    for _ in range(20):
        if not fewest:
            break
        time.sleep(0.05)
        fewest = min(fewest, once())
    return fewest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/task")
def test_ranks_restart_no_blas_threads_past_their_share(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fork stops numpy's OpenBLAS thread pool, and setting a rank's share
    restarted it with a thread per core of the fork server's: each thread
    past the first spun a core for its first 0.1 s (an 8-byte round trip
    took 2-4 ms then). Now a rank of a one-thread share runs no BLAS
    thread of its own (those of a larger share may: cpus/N - 1)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    n = max(2, os.cpu_count() or 1)          # a share of one thread each
    assert mesh.spawn(_native_threads, n, timeout=60) == [0] * n


ONE_BLAS_SERVER = """
import multiprocessing as mp, os, sys
sys.path.insert(0, sys.argv[1])
import mesh, mesh.spawn
from test_mesh_spawn import _native_threads, _threads_of
sys.modules["mesh.spawn"].pool_unreachable = lambda: True    # as under numpy 2.5's OpenBLAS
print("share", mesh.spawn(_native_threads, 2, timeout=60))
print("lone", mesh.spawn(_threads_of, 1, timeout=60)[0][1])
with mp.get_context("forkserver").Pool(1) as pool:
    print("theirs", pool.apply(os.getenv, ("OPENBLAS_NUM_THREADS",)))
print("caller", os.environ.get("OPENBLAS_NUM_THREADS"))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/task")
def test_a_fork_server_started_with_one_blas_thread_gives_back_the_callers_setting() -> None:
    """Where numpy's OpenBLAS hides its pool (numpy 2.5), the fork server
    starts with OPENBLAS_NUM_THREADS=1: ranks of a one-thread share run no
    BLAS thread, a lone rank gets OpenBLAS's default, and neither the caller
    nor the caller's own fork-server processes see the variable."""
    env = {k: v for k, v in _script_env().items()
           if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", ONE_BLAS_SERVER, str(REPO / "tests")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    cores = len(os.sched_getaffinity(0))
    said = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    if cores <= 2:
        assert said["share"] == "[0, 0]", said
    assert said["lone"] in (str(cores), "None"), said
    assert said["theirs"] == "None" and said["caller"] == "None", said


def _gc_state(world: mesh.Mesh) -> tuple[int, int]:
    import gc
    return gc.get_freeze_count(), len(gc.get_objects())


def test_a_ranks_full_collection_skips_what_the_fork_server_preloaded() -> None:
    """The fork server's modules (mesh, numpy, and the suite's pytest, torch
    and torch._dynamo) are frozen before it forks: each full collection in
    a rank scanned them all, 0.15-0.35 s of CPU with torch preloaded (one
    before each of engine.distribute's measurements), where it now scans
    what the rank made."""
    frozen, tracked = mesh.spawn(_gc_state, 1, timeout=40)[0]
    assert frozen > tracked, (frozen, tracked)


def _tensor_of(world: mesh.Mesh) -> object:
    import torch
    return {"t": torch.arange(3) + world.rank}


def test_ranks_return_torch_tensors() -> None:
    """A tensor comes back whole (a Connection's own pickler shared its
    memory by a file descriptor that died with the rank: 'no result')."""
    torch = pytest.importorskip("torch")
    got = mesh.spawn(_tensor_of, 2, timeout=40)
    assert [r["t"].tolist() for r in got] == [[0, 1, 2], [1, 2, 3]]
    assert all(isinstance(r["t"], torch.Tensor) for r in got)


def _one_sleeps(world: mesh.Mesh) -> int:
    import time
    if world.rank == 1:
        time.sleep(60)
    return world.rank


def _starts_processes(world: mesh.Mesh, out: str) -> int:
    import multiprocessing
    import subprocess
    with multiprocessing.get_context("fork").Pool(2) as pool:    # a rank may have children
        assert pool.map(abs, [-1, -2]) == [1, 2]
    child = subprocess.Popen(["sleep", "300"])
    with open(os.path.join(out, f"{world.rank}.pid"), "w") as f:
        f.write(str(child.pid))
    if world.rank == 1:
        time.sleep(60)
    return world.rank


def test_a_spawn_leaves_no_process_socket_or_descriptor_behind(tmp_path: Path) -> None:
    """A rank may start processes of its own (a Pool, DataLoader workers);
    on a timeout they are stopped with it, and neither the ranks' sockets
    nor the call's pipes outlive the call (kept by the error's frames).
    The timeout says it is spawn's own: not 'rank 0 failed' (rank 0
    returned; no rank failed), the call ran out of time (a test of its own
    waited out a second spawn timeout for that); and without waiting
    settle= seconds more for rank 1, still in fn."""
    if spawn_mod._fresh_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver      # (started here, run alone, its folder
        forkserver.ensure_running()                 # and torch's were left in TMPDIR)
    before = len(os.listdir("/proc/self/fd"))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp)
    try:
        import tempfile
        tempfile.tempdir = None
        for limit in (2, 10):
            t0 = time.monotonic()
            with pytest.raises(mesh.WorkerError) as err:
                mesh.spawn(_starts_processes, 2, str(tmp_path), timeout=limit, settle=30)
            took = time.monotonic() - t0
            if "(rank 0: " not in str(err.value):
                break       # (rank 0 had not returned in 2 s, still starting: a loaded machine)
    finally:
        if old is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = old
        tempfile.tempdir = None
    assert str(err.value).startswith(f"mesh.spawn timed out after {limit}s (rank 1: "), \
        str(err.value)
    # rank 1, still in fn, is stopped at once: settle= is for the ranks that ended their
    # call to end their process (it waited 30 s more here, for rank 1's sleep and rank
    # 0's close, which waited for rank 1); 20 s: the fork server's start, if not warm
    assert took < limit + 18, took
    assert "ranks still running: [1]" in str(err.value)     # (rank 0 returned; it closes)
    assert "\n  rank 1: running at " in str(err.value), str(err.value)    # (where it was)
    assert err.value.rank == 1
    kept = err.value     # (the error, with its frames, still held)
    pids = [int((tmp_path / f"{r}.pid").read_text()) for r in range(2)]
    deadline = time.monotonic() + 10
    while any(proc_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if proc_alive(p)], "a rank's own child outlived it"
    assert os.listdir(tmp) == [], "the ranks' sockets outlived the call"
    assert len(os.listdir("/proc/self/fd")) <= before + 2, kept


def test_spawn_names_a_bad_argument_before_it_starts_a_rank() -> None:
    for call, said in [
            (lambda: mesh.spawn(_one_sleeps, "2"), "nprocs is a whole number of ranks"),
            (lambda: mesh.spawn(_one_sleeps, 0), "nprocs must be at least 1, got 0"),
            (lambda: mesh.spawn(_one_sleeps, 2, timeout=-1), "timeout is a number of seconds"),
            (lambda: mesh.spawn(_one_sleeps, 2, env={"FOO": 1}), "env['FOO'] is 1"),
            (lambda: mesh.spawn("_one_sleeps", 2), "fn is the function each rank runs")]:
        with pytest.raises((TypeError, ValueError), match=re.escape(said)) as err:
            call()
        assert str(err.value).startswith("mesh.spawn: "), err.value    # (as every check's)


def test_a_world_past_the_open_files_hard_limit_is_refused_before_a_rank_starts() -> None:
    """As meshrun refuses it: mesh.spawn(fn, 100000) started ranks one by one
    (its timeout counts only once all have started) until the machine choked."""
    code = textwrap.dedent("""\
        import resource
        import mesh
        def fn(world):
            return world.rank
        if __name__ == "__main__":
            resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))
            try:
                print("returned", mesh.spawn(fn, 10, timeout=30))
            except ValueError as e:
                print(e)
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == (
        "mesh.spawn: a world of 10 ranks needs about 316 open files a rank (about 5 a peer), "
        "but the hard limit is 300 (ulimit -Hn): raise it, or run fewer ranks"), \
        out.stdout + out.stderr


def _fails(world: mesh.Mesh) -> None:
    raise ValueError(f"rank {world.rank} fails")


def test_settle_none_is_the_default_and_a_bad_one_is_refused_before_a_rank_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(mesh.WorkerError, match="rank 0 fails|rank 1 fails"):
        mesh.spawn(_fails, 2, timeout=40, settle=None)      # (it raised a TypeError)
    monkeypatch.setattr(spawn_mod, "_by_name", lambda fn, args: 1 / 0)   # (no rank starts)
    for settle in (-1, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match=re.escape(
                f"mesh.spawn: settle is a number of seconds, 0 or more (None: 1), "
                f"got {settle!r}")):
            mesh.spawn(_top_level, 2, timeout=40, settle=settle)


def test_a_temporary_folder_too_long_for_the_fork_servers_socket(tmp_path: Path) -> None:
    """multiprocessing's fork server binds its Unix socket under TMPDIR: past
    about 75 bytes the path does not fit (107), and spawn raised "AF_UNIX
    path too long"; the ranks start as fresh interpreters there instead."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    code = "import mesh, operator; print(mesh.spawn(operator.attrgetter('rank'), 2, timeout=40))"
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(deep))
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=75)
    assert r.returncode == 0 and r.stdout.split() == ["[0,", "1]"], r.stdout + r.stderr


def _returns_a_lock(world: mesh.Mesh) -> object:
    import threading
    return threading.Lock()


def test_a_result_that_cannot_travel_back_is_named() -> None:
    with pytest.raises(mesh.WorkerError, match=r"rank 0: mesh.spawn: the value fn returned "
                                               r"cannot be pickled to travel back \(lock"):
        mesh.spawn(_returns_a_lock, 1, timeout=30)


def _cleans_up_slowly(world: mesh.Mesh, folder: str) -> None:
    from multiprocessing import util

    def done() -> None:         # (a DataLoader's workers and semaphores, say)
        time.sleep(0.3)
        with open(os.path.join(folder, f"rank{world.rank}"), "w") as f:
            f.write("cleaned up")
    util.Finalize(None, done, exitpriority=0)
    if world.rank == 1:
        raise RuntimeError("rank 1 fails")
    world.recv(1, timeout=20)       # (rank 0: lost peer)


def test_after_a_failure_the_ranks_end_their_process_before_they_are_killed(
        tmp_path: Path) -> None:
    """Every rank was killed as soon as all had reported: a rank's own
    clean-up at exit (a DataLoader's persistent workers: 14 semaphores left
    in /dev/shm until the caller exited) never ran."""
    with pytest.raises(mesh.WorkerError, match="rank 1 fails"):
        mesh.spawn(_cleans_up_slowly, 2, str(tmp_path), timeout=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1"]


def _forks_a_helper(world: mesh.Mesh, how: str) -> str:
    import collectives as C
    pid = os.fork()
    if pid == 0:        # the helper: a copy of this rank's stack, leaving fn
        if how == "raise":
            raise ValueError("the helper's own error")
        if how == "exit":
            sys.exit(0)
        return "the helper's value"
    os.waitpid(pid, 0)
    C.barrier(world, timeout=20)
    return f"rank{world.rank}"


@pytest.mark.parametrize("how", ["raise", "exit", "return"])
def test_a_child_forked_in_fn_does_not_speak_for_its_rank(how: str) -> None:
    """The child sent on the rank's result pipe: its error failed the spawn,
    or its value replaced the rank's."""
    assert mesh.spawn(_forks_a_helper, 2, how, timeout=60) == ["rank0", "rank1"]


def _mismatched(world: mesh.Mesh) -> None:
    import numpy as np
    import collectives as C
    C.all_reduce(world, np.ones(4 if world.rank else 5))


def test_a_failed_ranks_traceback_ends_at_the_users_call() -> None:
    """A WorkerError shows the failed rank's traceback from the user's
    function to its last call, with meshrun's own frames below it counted,
    not printed (as the launcher's report does); spawn's own frame is left
    out; full_traceback keeps them all."""
    with pytest.raises(mesh.WorkerError) as info:
        mesh.spawn(_mismatched, 2, timeout=60)
    brief, full = info.value.traceback, info.value.full_traceback
    assert "in _mismatched" in brief and "C.all_reduce(world" in brief, brief
    assert re.search(r"\.\.\. \d+ frames inside mesh/collectives/engine left out "
                     r"\(WorkerError.full_traceback has them\)", brief), brief
    assert "MismatchError: rank " in brief.splitlines()[-1], brief
    assert "collectives/runner.py" not in brief and "collectives/runner.py" in full
    assert "mesh/spawn.py" not in full, full
    assert str(info.value) == f"rank {info.value.rank} failed:\n{brief}"
