"""A meshrun script runs unchanged under the real Open MPI mpirun and the real
SLURM srun and sbatch, with none of meshrun's or torchrun's variables set:
the ranks find each other from what those launchers give them alone.

Each test skips, saying why, where its launcher is not installed (CI installs
Debian's openmpi-bin, slurm-wlm and munge in .ci/run). The SLURM tests bring
up a one-node cluster of their own (munged, slurmctld, slurmd in a temporary
directory, on free ports), and stop it and remove its files afterwards."""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest
from proctools import free_port, run_in_session

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "launch_mesh.py"
SBIN = os.pathsep.join(["/usr/sbin", "/sbin"])


def _expected(n: int) -> list[str]:
    return sorted([f"rank 0 heard from {list(range(1, n))}"]
                  + [f"rank {r} got {{'hello': {r}}}" for r in range(1, n)])


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables: the launcher under
    test must provide everything."""
    launcher = ("MESH_", "MASTER_", "OMPI_", "PMIX_", "SLURM_", "TORCHELASTIC_", "PMI_")
    e = {k: v for k, v in os.environ.items() if not k.startswith(launcher)
         and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    e["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), e.get("PATH", ""), SBIN])
    e.update(PYTHONPATH=str(ROOT), MESH_RENDEZVOUS_TIMEOUT="30", **extra)
    return e


def _run(cmd: list[str], env: dict[str, str], timeout: float = 90) -> str:
    """Run a launcher in a session of its own; nothing it started outlives it."""
    code, out = run_in_session(cmd, env, timeout, cwd=ROOT)
    assert code == 0, f"{' '.join(cmd)} exited {code}:\n{out}"
    return out


def _rank_lines(out: str) -> list[str]:
    """The ranks' lines, sorted; split where one starts, too: mpirun forwards
    each rank's writes as they come, and a line's newline may follow another
    rank's line (``rank 0 gloo ... Nonerank 1 gloo ...``)."""
    return sorted(ln.strip() for ln in re.split(r"\n|(?=rank \d+ )", out)
                  if ln.startswith("rank "))


@pytest.mark.skipif(shutil.which("mpirun") is None,
                    reason="Open MPI's mpirun is not installed (apt-get install openmpi-bin)")
def test_mpirun_on_one_host_with_nothing_set() -> None:
    """mpirun -n 4 python script.py; a second job at once meets only its own."""
    root = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    e = _clean_env(**root)
    cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-n"]
    other = subprocess.Popen([*cmd, "2", sys.executable, str(SCRIPT)], env=e, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        out = _run([*cmd, "4", sys.executable, str(SCRIPT)], e)
        other_out, _ = other.communicate(timeout=60)
    finally:
        try:
            os.killpg(other.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert _rank_lines(out) == _expected(4), out
    assert other.returncode == 0 and _rank_lines(other_out) == _expected(2), other_out


@pytest.mark.skipif(shutil.which("mpirun") is None,
                    reason="Open MPI's mpirun is not installed (apt-get install openmpi-bin)")
@pytest.mark.timeout(90)
def test_mpirun_runs_a_torch_script_with_nothing_set(tmp_path: Path) -> None:
    """``init_process_group`` with env:// (the default), "meshrun" then
    gloo, under ``mpirun -n 2`` with no RANK or WORLD_SIZE: torch's env://
    refused it ("environment variable RANK expected"); the store is made
    over a mesh that mpirun's own variables assemble, closed by the
    meshrun group's destroy, and as the gloo group starts. (4 s)"""
    pytest.importorskip("torch.distributed", reason="the torch extra")
    script = tmp_path / "torch_env.py"
    script.write_text(textwrap.dedent("""\
        import torch, torch.distributed as dist
        import collectives.torchdist
        from mesh import world
        for backend in ("meshrun", "gloo"):
            dist.init_process_group(backend)
            t = torch.ones(2)
            dist.all_reduce(t)
            rank = dist.get_rank()
            dist.destroy_process_group()
            print(f"rank {rank} {backend} {t.tolist()} {world.current()}", flush=True)
        """))
    root = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    out = _run(["mpirun", "--oversubscribe", "--bind-to", "none", "-n", "2", sys.executable,
                str(script)], _clean_env(**root))
    assert _rank_lines(out) == [f"rank {r} {b} [2.0, 2.0] None" for r in (0, 1)
                                for b in ("gloo", "meshrun")], out


@pytest.mark.skipif(shutil.which("mpirun") is None,
                    reason="Open MPI's mpirun is not installed (apt-get install openmpi-bin)")
@pytest.mark.timeout(90)
def test_mpirun_inside_a_meshrun_rank(tmp_path: Path) -> None:
    """A meshrun rank that starts a job of its own: the inner launcher's
    processes inherit meshrun's marks (MESH_LAUNCHER=1, RANK, MASTER_PORT).
    mpirun's ranks were each rank 0 of a world of one (meshrun -n 1).
    (torchrun inside a meshrun rank: tests/test_mesh_torchrun.py's static
    rendezvous job.)"""
    inner = tmp_path / "inner.py"
    mpirun = ["mpirun", "--oversubscribe", "--bind-to", "none", "-n", "3", sys.executable,
              str(SCRIPT)]
    inner.write_text(f"import subprocess, sys\nsys.exit(subprocess.run({mpirun!r}).returncode)\n")
    root = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    out = _run([sys.executable, "-m", "mesh.launch", "-n", "1", str(inner)],
               _clean_env(**root))
    assert sorted(ln[4:] for ln in out.splitlines() if ln.startswith("[0] rank ")) == \
        _expected(3), out


SLURM_CONF = """\
ClusterName=meshtest
SlurmctldHost={host}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.sock
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
# linuxproc, not pgid: pgid's slurmstepd slept 1 s, then 2 s, till the batch
# script's process group was gone, and the sbatch job ended 2-3 s after its script
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=300
FirstJobId={first_job}
NodeName={host} CPUs=4 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm() -> Iterator[dict[str, str]]:
    """A one-node SLURM cluster (4 CPUs declared, whatever the machine has):
    the environment in which srun and sbatch talk to it."""
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root")
    path = os.pathsep.join([os.environ.get("PATH", ""), SBIN])
    missing = [p for p in ("munged", "slurmctld", "slurmd", "srun", "sbatch", "sinfo")
               if shutil.which(p, path=path) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing: apt-get install "
                    "slurm-wlm munge)")
    d = tempfile.mkdtemp(prefix="mslurm-")      # short: munged's socket path must fit
    procs: list[subprocess.Popen[bytes]] = []
    e = _clean_env(SLURM_CONF=f"{d}/slurm.conf")
    try:
        for sub in ("state", "spool"):
            os.mkdir(os.path.join(d, sub))
        key = os.path.join(d, "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(os.urandom(1024))
        host = socket.gethostname()
        try:
            socket.gethostbyname(host)      # srun's ranks meet at the node's name
        except OSError as e:
            pytest.skip(f"this host's name {host!r} does not resolve: {e}")
        # a random first job id: the ports srun's jobs derive differ from those
        # of another such cluster running at once
        Path(e["SLURM_CONF"]).write_text(SLURM_CONF.format(
            host=host, user="root", d=d, ctld_port=free_port(), d_port=free_port(),
            first_job=random.randrange(1000, 10**6)))
        for cmd in (["munged", "-F", "-f", f"--key-file={key}", f"--socket={d}/munge.sock",
                     f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
                     f"--seed-file={d}/munged.seed"],
                    ["slurmctld", "-D", "-f", e["SLURM_CONF"]],
                    ["slurmd", "-D", "-f", e["SLURM_CONF"], "-N", host]):
            with open(os.path.join(d, f"{cmd[0]}.out"), "wb") as log:
                procs.append(subprocess.Popen([shutil.which(cmd[0], path=path) or cmd[0],
                                               *cmd[1:]], env=e, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
            if cmd[0] == "munged":
                _wait(lambda: os.path.exists(f"{d}/munge.sock"), 10)
        ready = _wait(lambda: subprocess.run(
            ["sinfo", "-h", "-o", "%T"], env=e, capture_output=True, text=True,
            timeout=10).stdout.strip() == "idle", 30)
        if not ready:
            pytest.skip("the SLURM daemons did not come up:\n" + _logs(d, procs))
        yield e
    finally:
        if procs:
            subprocess.run(["scancel", "--full", "--user", "root"], env=e,
                           capture_output=True, timeout=10)
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(d, ignore_errors=True)


def _wait(cond: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():  # type: ignore[operator]
                return True
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.2)
    return False


def _logs(d: str, procs: list[subprocess.Popen[bytes]]) -> str:
    out = [f"exit codes: {[p.poll() for p in procs]}"]
    for name in ("munged.out", "slurmctld.out", "slurmd.out"):
        try:
            out.append(f"{name}: " + Path(d, name).read_text()[-2000:])
        except OSError:
            pass
    return "\n".join(out)


def test_srun_with_nothing_set(slurm: dict[str, str]) -> None:
    out = _run(["srun", "-n", "4", "--kill-on-bad-exit=1", sys.executable, str(SCRIPT)], slurm)
    assert _rank_lines(out) == _expected(4), out


def _wait_for_job(job: str, env: dict[str, str], timeout: float) -> dict[str, str]:
    """The ended job's fields (JobState, ExitCode, ...), polled every 0.25 s:
    ``sbatch --wait`` slept 2 s between its own polls (MinJobAge=2 kept it
    from sleeping longer ones), one or two of them past the job's end.
    MinJobAge=300 keeps the ended job's record for these polls."""
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
             "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY")
    deadline = time.monotonic() + timeout
    while True:
        r = subprocess.run(["scontrol", "-o", "show", "job", job], env=env,
                           capture_output=True, text=True, timeout=30)
        fields = dict(f.split("=", 1) for f in r.stdout.split() if "=" in f)
        if fields.get("JobState") in ended:
            return fields
        assert time.monotonic() < deadline, f"job {job} not ended after {timeout}s: {r}"
        time.sleep(0.25)


def test_sbatch_job_from_the_example_script(slurm: dict[str, str], tmp_path: Path) -> None:
    """examples/slurm_job.sbatch, as the README shows it, on one node."""
    log = tmp_path / "job.out"
    job = _run(["sbatch", "--parsable", "--nodes=1", "--ntasks=4", f"--output={log}",
                str(ROOT / "examples" / "slurm_job.sbatch"), str(SCRIPT)], slurm)
    fields = _wait_for_job(job.strip().split(";")[0], slurm, 90)
    out = log.read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), \
        (fields["JobState"], fields["ExitCode"], out)
    assert _rank_lines(out) == _expected(4), out
