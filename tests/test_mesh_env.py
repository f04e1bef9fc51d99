"""Joining a job described by another launcher's environment: torchrun,
SLURM and Open MPI variables, and rank 0 serving the rendezvous itself."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from mesh import env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torchrun_names() -> None:
    spec = env.from_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0",
                         "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
                         "MASTER_PORT": "29500"})
    assert (spec.rank, spec.size, spec.local_rank, spec.local_size) == (2, 4, 0, 2)
    assert (spec.master_addr, spec.master_port) == ("10.0.0.1", 29500)
    assert spec.serve_rendezvous          # no meshrun: rank 0 serves it
    assert spec.agent_store is None       # ... at MASTER_PORT: no torchrun agent holds it


def test_torchrun_agent_store_is_detected_as_torch_does() -> None:
    """torch.distributed's own test: TORCHELASTIC_USE_AGENT_STORE == "True"."""
    tr = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500",
          "TORCHELASTIC_RUN_ID": "abc", "TORCHELASTIC_RESTART_COUNT": "3",
          "TORCHELASTIC_USE_AGENT_STORE": "True"}
    spec = env.from_env(tr)
    assert spec.agent_store == "meshrun/rendezvous/abc/3" and spec.serve_rendezvous
    assert (spec.master_addr, spec.master_port) == ("h", 29500)     # where the store is
    restarted = env.from_env({**tr, "TORCHELASTIC_RESTART_COUNT": "4"})
    assert restarted.agent_store == "meshrun/rendezvous/abc/4"     # never the old attempt's
    for no_store in ({**tr, "TORCHELASTIC_USE_AGENT_STORE": "False"},
                     {**tr, "TORCHELASTIC_USE_AGENT_STORE": ""},
                     {k: v for k, v in tr.items() if k != "TORCHELASTIC_RUN_ID"},
                     {**tr, "MESH_LAUNCHER": "1"}):
        assert env.from_env(no_store).agent_store is None, no_store


def test_slurm_and_open_mpi_names() -> None:
    slurm = env.from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                          "SLURM_NTASKS_PER_NODE": "4(x2)", "MASTER_PORT": "1"})
    assert (slurm.rank, slurm.size, slurm.local_rank, slurm.local_size) == (5, 8, 1, 4)
    ompi = env.from_env({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "6",
                         "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "3",
                         "MASTER_PORT": "1"})
    assert (ompi.rank, ompi.size, ompi.local_rank, ompi.local_size) == (3, 6, 1, 3)


def test_no_job_is_a_world_of_one_and_bad_jobs_are_named() -> None:
    assert env.from_env({}).size == 1
    with pytest.raises(ValueError, match="MASTER_PORT is not set"):
        env.from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="rank 4 is outside the world of size 2"):
        env.from_env({"RANK": "4", "WORLD_SIZE": "2", "MASTER_PORT": "1"})


WORKER = textwrap.dedent("""
    import numpy as np, mesh, collectives
    with mesh.init(timeout=30) as world:
        a = np.full(3, world.rank + 1.0)
        collectives.all_reduce(world, a)
        print("sum", a[0], world.size, flush=True)
""")


def test_ranks_started_by_another_launcher_join_through_rank_0() -> None:
    """As srun or mpirun start them (and torchrun with no agent store): no
    meshrun, rank 0 binds MASTER_PORT itself."""
    with socket.socket() as s:      # a launcher's choice of port, as with MASTER_PORT=...
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(3):
        e = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        e.update(RANK=str(r), WORLD_SIZE="3", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="3",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MESH_SECRET="s3cret",
                 PYTHONPATH=ROOT)
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.split() == ["sum", "6.0", "3"]
