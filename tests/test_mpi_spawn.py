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
    errcodes: list[int] = []
    inter = self.Spawn_multiple([sys.executable, "/bin/sh"], [[worker, "echo"], [
        "-c", f'exec "{sys.executable}" "{worker}" echo']], [1, 1], info=MPI.INFO_NULL,
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
    assert got["parent"] and len(refused) == 4, got
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
    assert got["echo"] == [[r, 2, 1, "hi"] for r in range(2)] and got["errcodes"] == [0] * 2
    assert got["aside"] and got["held"] == 0, got
    assert got["threads"][0] == got["threads"][1] and got["procs"] == [0, 0], got
