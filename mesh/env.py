"""Reading the job description from the environment, so one script runs
under any launcher: meshrun, mesh.spawn and torchrun (RANK, WORLD_SIZE...),
Open MPI's mpirun (OMPI_COMM_WORLD_*), SLURM's srun (SLURM_PROCID...) and
PMI launchers (PMI_RANK, PMI_SIZE).

When several launchers' names are present, the innermost launcher describes
this process, in this order: meshrun or torchrun (RANK), then mpirun (which
may run inside an sbatch job or an srun step), then srun, then PMI. RANK and
WORLD_SIZE with neither meshrun's nor torchrun's marks (set by hand, or left
from another job) must agree with mpirun's or srun's numbers, if any.

Where rank 0 serves the rendezvous (under every launcher but meshrun):
MASTER_ADDR:MASTER_PORT when MASTER_PORT is set; otherwise

- torchrun: its agent's store holds MASTER_PORT; rank 0 serves on a port of
  its own and publishes it in that store (mesh.torchelastic);
- mpirun on one host: rank 0 serves on a port of its own and publishes it in
  a file named after the job, in mpirun's session directory (mesh.rdvfile);
- srun: the first host of the step's node list, on the first port of
  SLURM_STEP_RESV_PORTS if the cluster reserves ports, else a port derived
  from SLURM_JOB_ID and SLURM_STEP_ID."""
from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import socket
import tempfile
from dataclasses import dataclass, field
from typing import Mapping

__all__ = ["JobSpec", "from_env", "host_id", "is_loopback", "launcher_seal", "by_mesh",
           "by_other_launcher", "torchrun_env"]


@dataclass(frozen=True)
class JobSpec:
    rank: int
    size: int
    local_rank: int
    local_size: int
    master_addr: str
    master_port: int
    secret: str = field(repr=False)     # (a JobSpec printed or logged keeps it to itself)
    serve_rendezvous: bool  # True when no launcher of ours runs the service: rank 0 does
    agent_store: str | None = None  # torchrun's store key for the rendezvous address
    rendezvous_file: str | None = None  # where rank 0 publishes it under mpirun on one host
    source: str = ""  # the variables the job was read from, for error messages

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"world size must be >= 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside the world of size {self.size}")


# Each launcher's names: rank, size, local rank, local size (None: it has none).
_TORCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
_OMPI = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
         "OMPI_COMM_WORLD_LOCAL_SIZE")
_SLURM = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", None)
_PMI = ("PMI_RANK", "PMI_SIZE", None, None)
_NAMES = {"torch": _TORCH, "ompi": _OMPI, "slurm": _SLURM, "pmi": _PMI}


# The variables a launcher sets, in groups, sealed by meshrun and mesh.spawn for their
# ranks (MESH_LAUNCHER_SEAL, a digest of each group): a launcher started inside one of
# their ranks (torchrun, mpirun, srun) changes some of them while its processes inherit
# MESH_LAUNCHER=1, which then no longer describes them (``_unsealed``).
_SEALED = (_TORCH, ("MASTER_ADDR", "MASTER_PORT"),
           ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"),
           (*_OMPI, "OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE", "SLURM_PROCID", "SLURM_NTASKS",
            "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_JOB_ID", *_PMI[:2]))


def launcher_seal(env: Mapping[str, str]) -> str:
    """What meshrun and mesh.spawn put in MESH_LAUNCHER_SEAL beside
    MESH_LAUNCHER=1: a digest of each group of launcher variables, as they
    start the rank with them."""
    return ".".join(hashlib.sha256("\0".join(f"{n}={env.get(n, '')}" for n in names)
                                   .encode()).hexdigest()[:8] for names in _SEALED)


def torchrun_env(env: Mapping[str, str], rank: int, size: int, local_rank: int,
                 local_size: int, master_addr: str, master_port: int, run_id: str, *,
                 node_rank: int = 0, nnodes: int = 1, restart: int = 0,
                 max_restarts: int = 0) -> dict[str, str]:
    """The variables torchrun's agent (torch 2.13's) gives a worker, with its
    meanings, as meshrun and mesh.spawn give them to a rank of theirs
    (``env``: the rank's environment so far): GROUP_RANK is the node's rank,
    every rank has the one role "default", and TORCHELASTIC_USE_AGENT_STORE
    is False, no torch store listening at MASTER_PORT."""
    return {
        "RANK": str(rank), "WORLD_SIZE": str(size),
        "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local_size),
        "GROUP_RANK": str(node_rank), "GROUP_WORLD_SIZE": str(nnodes),
        "ROLE_RANK": str(rank), "ROLE_NAME": "default", "ROLE_WORLD_SIZE": str(size),
        "TORCHELASTIC_RESTART_COUNT": str(restart),
        "TORCHELASTIC_MAX_RESTARTS": str(max_restarts),
        "TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
    }


def _unsealed(env: Mapping[str, str]) -> Mapping[str, str]:
    """``env`` without the marks of a meshrun (or mesh.spawn) that started an
    ancestor of this process, not the process itself: torchrun, mpirun or srun
    run inside one of its ranks changed variables it sealed. Under torchrun
    the names are torchrun's own; under mpirun or srun RANK, WORLD_SIZE,
    LOCAL_* and MASTER_* as meshrun set them are its leftovers (they made
    every rank of an mpirun in a meshrun rank the outer rank, a world of one
    in `meshrun -n 1`), and go too."""
    sealed = env.get("MESH_LAUNCHER_SEAL", "").split(".")
    if env.get("MESH_LAUNCHER", "") != "1" or len(sealed) != len(_SEALED):
        return env          # (no seal: a job described by hand is taken as it says)
    now = launcher_seal(env).split(".")
    if now == sealed:
        return env
    out = {k: v for k, v in env.items() if k != "MESH_LAUNCHER"}
    if now[2] == sealed[2] and now[3] != sealed[3]:     # mpirun, srun: not torchrun
        for i in (0, 1):
            if now[i] == sealed[i]:
                for name in _SEALED[i]:
                    out.pop(name, None)
    return out


def by_mesh(env: Mapping[str, str] | None = None) -> bool:
    """Whether meshrun or mesh.spawn started this process (and runs the
    rendezvous), not a launcher started inside one of their ranks."""
    env = os.environ if env is None else env
    return _unsealed(env).get("MESH_LAUNCHER", "") == "1"


def by_other_launcher(env: Mapping[str, str] | None = None) -> bool:
    """Whether mpirun, srun (or another PMI launcher) started this process
    and nothing set torch's RANK and WORLD_SIZE: torch's env:// would refuse
    it, while from_env() reads that launcher's own variables. Contradictory
    ones raise ValueError naming them, as from_env() does."""
    env = _unsealed(os.environ if env is None else env)
    if _set(env, "RANK") or _set(env, "WORLD_SIZE"):
        return False            # (torchrun's, or set by hand: torch's env:// takes them)
    return bool(_read(env))


def _set(env: Mapping[str, str], name: str | None) -> bool:
    return name is not None and env.get(name, "") != ""


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name}={env[name]!r} is not an integer") from None


def _read(env: Mapping[str, str]) -> dict[str, tuple[int, int]]:
    """(rank, size) of every launcher present, checked against itself."""
    out: dict[str, tuple[int, int]] = {}
    for kind, (rank, size, local, local_size) in _NAMES.items():
        assert rank is not None and size is not None
        if kind == "slurm":
            if not _set(env, rank):    # an allocation (salloc) has tasks, not a rank
                continue
            if not (_set(env, "SLURM_STEP_ID") or _set(env, "SLURM_STEPID")):
                continue               # sbatch's script: see _refuse_batch_script
        elif not (_set(env, rank) or _set(env, size)):
            continue
        for have, missing in ((rank, size), (size, rank)):
            if not _set(env, missing):
                raise ValueError(f"{have}={env[have]} is set but {missing} is not: the "
                                 "launcher's environment is incomplete")
        r, n = _int(env, rank), _int(env, size)
        if n < 1 or not 0 <= r < n:
            raise ValueError(f"{rank}={r} is outside the world of {size}={n}")
        if local_size is not None and _set(env, local_size) \
                and not 1 <= _int(env, local_size) <= n:    # (0: the job taken for multi-host)
            raise ValueError(f"{local_size}={env[local_size]} is outside 1..{size}={n}")
        if local is not None and local_size is not None and _set(env, local) \
                and _set(env, local_size):
            lr, ln = _int(env, local), _int(env, local_size)
            if not 0 <= lr < ln:
                raise ValueError(f"{local}={lr} is outside its host's {local_size}={ln}")
        out[kind] = (r, n)
    return out


def _refuse_batch_script(env: Mapping[str, str]) -> None:
    """sbatch runs its script as task 0 of the job's tasks, with no step id:
    a mesh program started there without srun would wait for the others."""
    tasks = env.get("SLURM_NTASKS", "")
    if _set(env, "SLURM_PROCID") and tasks.isdigit() and int(tasks) > 1:
        raise ValueError(f"SLURM_PROCID={env['SLURM_PROCID']} SLURM_NTASKS={tasks} without "
                         "SLURM_STEP_ID: this is the batch script of a SLURM job, not one of "
                         "its tasks: start the ranks with srun (or mpirun, meshrun)")


def _check_agree(env: Mapping[str, str], found: dict[str, tuple[int, int]]) -> None:
    """RANK/WORLD_SIZE that no launcher of ours or torchrun's set must agree
    with mpirun's or srun's numbers: a shell that kept RANK=0 would else make
    every rank of an mpirun job rank 0."""
    launched = env.get("MESH_LAUNCHER", "") == "1" or _set(env, "TORCHELASTIC_RUN_ID")
    if "torch" not in found or launched:
        return
    for kind in ("ompi", "slurm"):
        if kind in found and found[kind] != found["torch"]:
            r, n = _NAMES[kind][:2]
            raise ValueError(
                f"the launchers disagree: RANK={env['RANK']} WORLD_SIZE={env['WORLD_SIZE']} "
                f"(set by neither meshrun nor torchrun) but {r}={env[r]} {n}={env[n]}: "
                "unset RANK and WORLD_SIZE (left from another job?) or make them agree")


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: "gpu[07-09,12],cpu1" -> "gpu07"."""
    out, i = "", 0
    while i < len(nodelist) and nodelist[i] != ",":
        end = nodelist.find("]", i)
        if nodelist[i] == "[" and end > 0:
            out += re.split(r"[-,]", nodelist[i + 1:end])[0]
            i = end + 1
        else:
            out += nodelist[i]
            i += 1
    return out


def _slurm_port(job_id: int, step_id: int) -> int:
    """The rendezvous port of an srun step when none is set or reserved:
    15000 + (job * 101 + step) mod 15000, so the steps of one job, and jobs
    near in number, get different ports, below the ephemeral range."""
    return 15000 + (job_id * 101 + step_id) % 15000


def _names(env: Mapping[str, str], *names: str | None) -> str:
    return " ".join(f"{n}={env[n]}" for n in names if n is not None and _set(env, n))


def from_env(env: Mapping[str, str] | None = None) -> JobSpec:
    """Build a JobSpec from the variables of the launcher that started this
    process (see the module's docstring); no launcher: a world of one.
    Incomplete or contradictory variables raise ValueError naming them.

    MESH_SECRET is set by meshrun and mesh.spawn; under another launcher the
    job may set it itself, else the secret is derived from the job's address
    (all ranks agree on it, but it does not keep strangers out)."""
    env = _unsealed(os.environ if env is None else env)
    found = _read(env)
    if not found:
        _refuse_batch_script(env)
    _check_agree(env, found)
    kind = next(iter(found), "")       # _NAMES' order: the innermost launcher first
    rank, size = found.get(kind, (0, 1))
    _, _, local, local_names = _NAMES.get(kind, _PMI)
    local_rank = _int(env, local) if local is not None and _set(env, local) else 0
    local_size = _int(env, local_names) if local_names is not None and _set(env, local_names) \
        else 1
    if kind == "slurm":
        local_size = _slurm_tasks_here(env) or local_size
    source = _names(env, *_NAMES.get(kind, ()))
    _check_master(env, size, source)
    ours = env.get("MESH_LAUNCHER", "") == "1"
    addr = env.get("MASTER_ADDR") or "127.0.0.1"
    port = env.get("MASTER_PORT") or ""
    secret = f"insecure:{addr}:{port}"
    rdv_file = _ompi_rendezvous_file(env, size, local_size) if kind == "ompi" else None
    if kind == "slurm" and size > 1:
        addr, port, secret, how = _slurm_address(env)
        source += f"; rendezvous at {addr}:{port} from {how}"
    elif rdv_file is not None:
        port, secret = "0", f"insecure:ompi:{os.path.basename(rdv_file)}"
        source += f"; rendezvous address published by rank 0 in {rdv_file}"
    elif port:
        source += f"; rendezvous at MASTER_ADDR={addr} MASTER_PORT={port}"
    elif size == 1:
        port = "0"
    else:
        raise ValueError(f"MASTER_PORT is not set ({source}): start the job with meshrun, "
                         "torchrun, srun or mpirun, or set MASTER_ADDR/MASTER_PORT")
    if len(env.get("MESH_SECRET", "").encode()) > 255:
        raise ValueError(f"MESH_SECRET is {len(env['MESH_SECRET'].encode())} bytes long: at "
                         "most 255 (ZeroMQ's limit for a password)")
    return JobSpec(rank, size, local_rank, local_size, addr, int(port),
                   env.get("MESH_SECRET") or secret, serve_rendezvous=not ours,
                   agent_store=None if ours or kind != "torch" else _agent_store_key(env),
                   rendezvous_file=rdv_file, source=source)


def _check_master(env: Mapping[str, str], size: int, source: str) -> None:
    """MASTER_ADDR is a host (not a URL, no port) and MASTER_PORT a TCP port
    (0, any free one, only in a world of one: the others could not know it).
    Else the ranks waited for a route to the "host" until the rendezvous
    timeout, or met at another port (ZeroMQ took 70000 as 4464), or failed
    with int()'s bare message."""
    addr, port = env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "").strip()
    read = source or "no launcher's variables"
    if port and not (port.isdigit() and (0 < int(port) < 65536 or int(port) == size - 1 == 0)):
        raise ValueError(f"MASTER_PORT={env['MASTER_PORT']!r} is not a TCP port, 1..65535 "
                         f"({read})")
    host, colon, tail = addr.rpartition(":")
    if size > 1 and ("://" in addr or colon and tail.isdigit() and ":" not in host):
        raise ValueError(f"MASTER_ADDR={addr!r} is not a host name or address ({read}): give "
                         "the host alone, its port in MASTER_PORT")


def _slurm_tasks_here(env: Mapping[str, str]) -> int | None:
    """The tasks of this srun step on this node, from SLURM_STEP_TASKS_PER_NODE
    ("2(x3),1": per node index SLURM_NODEID), or SLURM_NTASKS_PER_NODE."""
    counts: list[int] = []
    for part in env.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            break
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = env.get("SLURM_NODEID", "0")
    if node.isdigit() and int(node) < len(counts):
        return counts[int(node)]
    per_node = re.match(r"\d+", env.get("SLURM_NTASKS_PER_NODE", ""))
    return int(per_node.group(0)) if per_node else None


def _ompi_rendezvous_file(env: Mapping[str, str], size: int, local_size: int) -> str | None:
    """Where rank 0 of an mpirun job on one host publishes its address: a file
    in mpirun's session directory named from what every rank of this job, and
    no other, shares: the job id and the addresses of mpirun's own servers
    (random ports, so a file an earlier job of the same id left never
    matches). None when MASTER_PORT is given or the world is one rank; across
    hosts MASTER_ADDR and MASTER_PORT must be given."""
    given = bool(env.get("MASTER_ADDR")), bool(env.get("MASTER_PORT"))
    if size == 1 or given == (True, True) or (given[1] and local_size == size):
        return None
    if local_size < size:
        raise ValueError(f"{'MASTER_PORT' if given[0] else 'MASTER_ADDR'} is not set and Open "
                         f"MPI started this job on more than one host "
                         f"({_names(env, *_OMPI[1::2])}): pass rank 0's host and a free port to "
                         "every rank: mpirun -x MASTER_ADDR=<host of rank 0> "
                         "-x MASTER_PORT=<port> ...")
    ids = [env.get(n, "") for n in ("OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE")]
    if not any(ids):
        raise ValueError(f"Open MPI's job id (OMPI_MCA_ess_base_jobid, PMIX_NAMESPACE) is not "
                         f"set ({_names(env, *_OMPI)}): set MASTER_ADDR and MASTER_PORT, "
                         "mpirun -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=<port> ...")
    uris = [env[n] for n in sorted(env) if n.startswith("PMIX_SERVER_URI")
            or n == "OMPI_MCA_orte_hnp_uri"]
    key = hashlib.sha256("|".join(ids + uris).encode()).hexdigest()[:32]
    where = env.get("PMIX_SERVER_TMPDIR") or env.get("OMPI_MCA_orte_jobfam_session_dir")
    return os.path.join(where or tempfile.gettempdir(), f"meshrun-rendezvous-{key}")


def _slurm_address(env: Mapping[str, str]) -> tuple[str, str, str, str]:
    """(addr, port, secret, the variables read) of an srun step's rendezvous:
    MASTER_ADDR, else the first host of the step's node list (where srun's
    block and cyclic distributions put task 0); MASTER_PORT, else the first
    port SLURM reserved for the step, else one derived from the job and step."""
    read = []
    addr = env.get("MASTER_ADDR", "")
    for name in ("MASTER_ADDR", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if _set(env, name):
            addr = addr or _first_host(env[name])
            read.append(name)
            break
    step = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID", "")
    resv = re.match(r"\d+", env.get("SLURM_STEP_RESV_PORTS", ""))
    if env.get("MASTER_PORT"):
        port = env["MASTER_PORT"]
        read.append("MASTER_PORT")
    elif resv:
        port = resv.group(0)
        read.append("SLURM_STEP_RESV_PORTS")
    elif _set(env, "SLURM_JOB_ID") and step.isdigit():
        port = str(_slurm_port(_int(env, "SLURM_JOB_ID"), int(step)))
        read += ["SLURM_JOB_ID", "SLURM_STEP_ID" if _set(env, "SLURM_STEP_ID") else "SLURM_STEPID"]
    else:
        raise ValueError(f"MASTER_PORT is not set and SLURM_JOB_ID/SLURM_STEP_ID are not "
                         f"usable ({_names(env, *_SLURM, 'SLURM_JOB_ID', 'SLURM_STEP_ID')}): "
                         "set MASTER_PORT (srun --export=ALL,MASTER_PORT=<port> ...)")
    addr = addr or "127.0.0.1"
    secret = f"insecure:{addr}:{port}:slurm:{env.get('SLURM_JOB_ID', '')}.{step}"
    return addr, port, secret, _names(env, *read)


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


def host_id(rank: int | None = None, size: int | None = None) -> str:
    """Which ranks share a host (and so use ipc://): the host name plus the
    network namespace, so that namespaces on one machine count as hosts.
    MESH_HOST_ID overrides: this rank's id, or one id per rank of the world
    separated by commas (``a,a,b,b``: rank ``rank`` takes its own), so that
    ranks sharing one environment (mesh.spawn's ``env``, meshrun's) fake
    several hosts on one machine."""
    forced = os.environ.get("MESH_HOST_ID")
    if forced and "," in forced:
        ids = [h.strip() for h in forced.split(",")]
        why = ("one of its ids is empty" if not all(ids) else
               "the caller does not know its rank" if rank is None else
               f"it has {len(ids)} ids for a world of {size} ranks"
               if size is not None and len(ids) != size else "")
        if why:
            raise ValueError(f"{'' if rank is None else f'rank {rank}: '}MESH_HOST_ID={forced!r}: "
                             f"a list holds one host id per rank of the world (rank r takes "
                             f"item r), but {why}")
        return ids[rank or 0]    # (rank is known here)
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
