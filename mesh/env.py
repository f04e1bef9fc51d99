"""Reading the job description from the environment: torchrun's names first,
then SLURM's and Open MPI's, so one script runs under any launcher.

Under torchrun the agent's TCPStore usually holds MASTER_PORT already
(TORCHELASTIC_USE_AGENT_STORE=True); rank 0 then serves the rendezvous on a
port of its own and publishes it in that store, under ``agent_store``."""
from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Mapping

__all__ = ["JobSpec", "from_env", "host_id", "is_loopback"]


@dataclass(frozen=True)
class JobSpec:
    rank: int
    size: int
    local_rank: int
    local_size: int
    master_addr: str
    master_port: int
    secret: str
    serve_rendezvous: bool  # True when no launcher of ours runs the service: rank 0 does
    agent_store: str | None = None  # torchrun's store key for the rendezvous address

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"world size must be >= 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside the world of size {self.size}")


def _first(env: Mapping[str, str], *names: str) -> str | None:
    for n in names:
        if env.get(n, "") != "":
            return env[n]
    return None


def from_env(env: Mapping[str, str] | None = None) -> JobSpec:
    """Build a JobSpec from torchrun, SLURM or Open MPI variables.

    MESH_SECRET is set by meshrun and mesh.spawn; under another launcher the
    job may set it itself, else the secret is derived from MASTER_ADDR/PORT
    (all ranks agree on it, but it does not keep strangers out)."""
    env = os.environ if env is None else env
    rank = _first(env, "RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    size = _first(env, "WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    if rank is None or size is None:
        rank, size = "0", "1"
    local_rank = _first(env, "LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK") or "0"
    local_size = _first(env, "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE",
                         "OMPI_COMM_WORLD_LOCAL_SIZE") or "1"
    addr = _first(env, "MASTER_ADDR") or "127.0.0.1"
    port = _first(env, "MASTER_PORT")
    ours = env.get("MESH_LAUNCHER", "") == "1"
    if port is None:
        if int(size) > 1:
            raise ValueError("MASTER_PORT is not set: start the job with meshrun, "
                             "torchrun, srun or mpirun, or set MASTER_ADDR/MASTER_PORT")
        port = "0"
    secret = env.get("MESH_SECRET") or f"insecure:{addr}:{port}"
    return JobSpec(int(rank), int(size), int(local_rank), int(local_size.split("(")[0]),
                   addr, int(port), secret, serve_rendezvous=not ours,
                   agent_store=None if ours else _agent_store_key(env))


def _agent_store_key(env: Mapping[str, str]) -> str | None:
    """The key under which rank 0 publishes the rendezvous address in the
    torchrun agent's store at MASTER_ADDR:MASTER_PORT, or None when the agent
    keeps no store there (no torchrun, or TORCHELASTIC_USE_AGENT_STORE is not
    "True", torch's own test; then MASTER_PORT is free and rank 0 binds it).
    The run id and restart count in the key keep a restarted job from reading
    the address of its previous attempt."""
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if not run_id or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return f"meshrun/rendezvous/{run_id}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def host_id() -> str:
    """Which ranks share a host (and so use ipc://): the host name plus the
    network namespace, so that namespaces on one machine count as hosts.
    MESH_HOST_ID overrides."""
    forced = os.environ.get("MESH_HOST_ID")
    if forced:
        return forced
    try:
        ns = os.readlink("/proc/self/ns/net")
    except OSError:
        ns = ""
    return f"{socket.gethostname()}|{ns}"


def is_loopback(addr: str) -> bool:
    """True for "localhost" and loopback IP addresses (127.0.0.0/8, ::1)."""
    try:
        return addr == "localhost" or ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False
