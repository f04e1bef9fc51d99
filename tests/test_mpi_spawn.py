"""collectives.MPI's Spawn, Get_parent and Disconnect with real processes:
tests/scripts/mpi4py_spawn.py (a master and its 3 workers) under
``meshrun -n 2`` prints what real mpi4py prints under ``mpirun -n 2``,
byte for byte; a master under ``mesh.spawn`` of 1: a command not found, an
info key not honoured and a bad maxprocs raise naming them, a program that
ends before it joins fails Spawn at once naming it, a child that dies makes
the parent's call on the intercommunicator raise LostPeerError naming it
(and the parent's end the child's), Spawn_multiple of Python and of any
executable (a shell that execs Python), and nothing of the bridge is left
after Disconnect."""
from __future__ import annotations

import importlib.util
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from proctools import launch_env, run_in_session

import mesh

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
MASTER = ROOT / "tests" / "scripts" / "mpi4py_spawn.py"
WORKER = ROOT / "tests" / "scripts" / "mpi4py_spawn_worker.py"


def test_spawn_gives_mpi4pys_output_under_meshrun(tmp_path: Path) -> None:
    """Spawn collective over a COMM_WORLD of 2, root 0, 3 children: bcast,
    Bcast, scatter, Reduce with MPI.ROOT and MPI.PROC_NULL, send and Recv
    between rank 0 and each child (its Status naming the child), gather,
    allreduce across, the children's own allreduce and Allreduce on their
    COMM_WORLD (before and after Disconnect), Disconnect on both sides;
    real mpi4py's bytes under mpirun where installed. (4-12 s)"""
    ported = {}
    for path in (MASTER, WORKER):
        text = path.read_text()
        assert text.count("from mpi4py import MPI\n") == 1
        ported[path] = tmp_path / path.name
        ported[path].write_text(text.replace("from mpi4py import MPI\n",
                                             "from collectives import MPI\n"))
    code, mine = run_in_session([sys.executable, "-m", "mesh.launch", "-n", "2", "--no-prefix",
                                 str(ported[MASTER]), str(ported[WORKER])],
                                launch_env(ROOT), 100, cwd=ROOT)
    assert code == 0, mine
    assert mine.startswith("parent of the parents: True\nSpawn: True 2 3 [0, 0, 0]\n"), mine
    assert "Reduce: [12.0, 12.0, 12.0]\n" in mine and mine.endswith("Disconnect: True\n"), mine
    if shutil.which("mpirun") is None or importlib.util.find_spec("mpi4py") is None:
        pytest.skip("Open MPI's mpirun or mpi4py is not installed: compared with nothing")
    code, real = run_in_session(["mpirun", "--oversubscribe", "--bind-to", "none", "--mca", "btl",
                                 "self,tcp", "-n", "2", sys.executable, str(MASTER), str(WORKER)],
                                launch_env(ROOT), 100, cwd=ROOT)
    assert code == 0, real
    assert mine == real, f"meshrun:\n{mine}\nmpirun:\n{real}"


def _master(world: Any, worker: str) -> dict[str, Any]:
    """A master under mesh.spawn: the faults, then a shell's children."""
    from collectives import MPI
    from collectives.mpi_compat import spawn as sp
    out: dict[str, Any] = {"parent": MPI.Comm.Get_parent() == MPI.COMM_NULL}
    before = sorted(t.name for t in threading.enumerate())
    self = MPI.COMM_SELF
    for bad in [("no-such-program-xyz", {}), (sys.executable, {"info": {"host": "h1"}}),
                (sys.executable, {"maxprocs": 0}), ("true", {})]:
        try:
            self.Spawn(bad[0], args=[worker], **bad[1])
        except Exception as e:
            out.setdefault("refused", []).append(f"{type(e).__name__}: {e}")
    inter = self.Spawn(sys.executable, args=[worker, "die", worker + ".said"], maxprocs=2)
    try:
        inter.recv(source=1, tag=5)
    except mesh.LostPeerError as e:
        out["lost"] = f"{type(e).__name__}: {e}"
    try:
        inter.Disconnect()
    except mesh.MeshError as e:
        out["disconnect"] = type(e).__name__
    out["null"] = inter == MPI.COMM_NULL
    for p in list(sp._disconnected):
        p.wait(60)
    with open(worker + ".said") as f:
        out["said"] = f.read()
    try:        # (mpi4py's test_spawn: a command where a list of them is due, ValueError)
        self.Spawn_multiple(sys.executable, [[worker]], 1)
    except ValueError as e:
        out["refused"].append(f"{type(e).__name__}: {e}")
    errcodes: list[Any] = []        # (one maxprocs for every command, as mpi4py takes it)
    inter = self.Spawn_multiple([sys.executable, "/bin/sh"], [[worker, "echo"], [
        "-c", f'exec "{sys.executable}" "{worker}" echo']], 1, info=MPI.INFO_NULL,
        errcodes=errcodes)
    inter.bcast("hi", root=MPI.ROOT)
    out["echo"] = inter.gather(None, root=MPI.ROOT)
    out["errcodes"] = errcodes
    inter.Disconnect()
    out["aside"] = mesh.world.current() is world and MPI.COMM_WORLD.mesh is world
    out["held"] = len(sp._held)
    for p in list(sp._disconnected):
        p.wait(60)
    out["threads"] = sorted(t.name for t in threading.enumerate()), before
    out["procs"] = [p.returncode for p in sp._disconnected]
    return out


def test_spawn_faults_and_any_executable_under_mesh_spawn(tmp_path: Path) -> None:
    """(6-15 s: three Spawns of Python children)"""
    worker = tmp_path / WORKER.name
    worker.write_text(WORKER.read_text().replace("from mpi4py import MPI\n",
                                                 "from collectives import MPI\n"))
    got = mesh.spawn(_master, 1, str(worker), timeout=100)[0]
    refused = got["refused"]
    assert got["parent"] and len(refused) == 5, got
    assert refused[4].startswith("ValueError: rank 0: collectives.MPI Spawn_multiple: command "
                                 "is a list of commands, got "), refused
    assert refused[0].startswith("Exception: rank 0: collectives.MPI Spawn: command "
                                 "'no-such-program-xyz' not found on PATH"), refused
    assert refused[1].startswith("NotImplementedError: rank 0: collectives.MPI Spawn: info "
                                 "keys ['host'] are not honoured"), refused
    assert "maxprocs must be a whole number of processes, 1 or more, got 0" in refused[2]
    assert re.search(r"LostPeerError: .* Spawn: the 1 process of '/\S*/true' \(bridge ranks "
                     r"1\.\.1\) never joined: ", refused[3]) and \
        "peer rank 1" in refused[3] and "exit code 0" in refused[3], refused
    assert got["lost"].startswith("LostPeerError") and "rank 2" in got["lost"], got
    assert got["disconnect"] == "LostPeerError" and got["null"], got
    assert got["said"].startswith("child 0: LostPeerError: rank 1: recv from rank 0") and \
        "rank 0" in got["said"], got
    assert got["echo"] == [[r, 2, 1, "hi"] for r in range(2)] and got["errcodes"] == [[0], [0]]
    assert got["aside"] and got["held"] == 0, got
    assert got["threads"][0] == got["threads"][1] and got["procs"] == [0, 0], got


def _acceptor(world: Any, portfile: str) -> dict[str, Any]:
    """The accepting job (mesh.spawn of 2): its port's name in ``portfile``."""
    import os
    from collectives import MPI
    comm = MPI.COMM_WORLD
    port = MPI.Open_port(MPI.INFO_NULL) if comm.rank == 0 else None
    if port is not None:
        with open(portfile + ".part", "w") as f:
            f.write(port)
        os.replace(portfile + ".part", portfile)
    inter = comm.Accept(port, root=0)
    root = MPI.ROOT if comm.rank == 0 else MPI.PROC_NULL
    inter.bcast("from the acceptor", root=root)
    got = inter.gather(None, root=root)
    back = inter.allreduce(comm.rank + 1, op=MPI.SUM)
    inter.Disconnect()
    if port is not None:
        MPI.Close_port(port)
        try:
            MPI.Close_port(port)
        except ValueError as e:
            got.append(str(e))
    return {"got": got, "back": back, "null": inter == MPI.COMM_NULL,
            "current": mesh.world.current() is world}


def test_accept_and_connect_join_two_running_jobs(tmp_path: Path) -> None:
    """Open_port, Accept under mesh.spawn of 2, Connect under meshrun -n 2
    (its port's name passed in a file), both sides' collectives across,
    Disconnect on both, Close_port (twice: the second refused). (5-15 s)"""
    import subprocess
    portfile = str(tmp_path / "port")
    client = subprocess.Popen([sys.executable, "-m", "mesh.launch", "-n", "2", "--no-prefix",
                               str(ROOT / "tests" / "scripts" / "mpi_connect.py"), portfile],
                              env=launch_env(ROOT), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        got = mesh.spawn(_acceptor, 2, portfile, timeout=100)
        out, _ = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
    assert client.returncode == 0, out
    assert got[0]["got"][:2] == [[r, 2, 2, "from the acceptor", 1] for r in range(2)], got
    assert "Close_port: " in got[0]["got"][2] and "is no port this process opened" in \
        got[0]["got"][2], got
    assert all(g["back"] == 30 and g["null"] and g["current"] for g in got), got
    assert sorted(out.splitlines()) == ["connect side 0: 3 True 2", "connect side 1: 3 True 2"], out
