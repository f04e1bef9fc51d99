"""Helpers shared by the tests that check no process outlives a job, those
that start ranks as plain subprocesses, and those that join a rendezvous
of their own."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import pytest

__all__ = ["alive", "free_port", "run_in_session", "rank_env", "run_ranks", "node0_port"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


EPS = {"ipc": "ipc:///tmp/nowhere", "tcp": "tcp://127.0.0.1:1"}
"""Endpoints no rank listens on: a join's, where no mesh is made from the table."""


def wait_until(cond: Any, timeout: float = 5.0) -> bool:
    """Whether ``cond()`` holds within ``timeout`` seconds (looked at each 20 ms)."""
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(cond())


def alive(pid: int) -> bool:
    """True while pid is a live process (a zombie awaiting its reaper is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return True


def free_port() -> int:
    """A free TCP port for a launcher's command line (torchrun, mpirun, slurm
    and MASTER_PORT take a number, not port 0), picked below the kernel's
    ephemeral range: a port bound to 0 and closed comes from that range, where
    any process's next listener may take it before the launcher binds it (a
    c10d rendezvous then met a stranger's socket and timed out, once, on a
    busy machine)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(1000):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port below the ephemeral range")


def run_in_session(cmd: list[str], env: dict[str, str], timeout: float,
                   cwd: str | os.PathLike | None = None) -> tuple[int, str]:
    """Run a launcher in a session of its own and return (exit code, output);
    nothing it started outlives it (its process group is killed either
    way), and a run past ``timeout`` fails the test with the output so far."""
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} timed out after {timeout}s:\n{out}")
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return p.returncode, out


def rank_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment for a rank started by hand (torch's init methods):
    no meshrun, torchelastic or torch.distributed variables of the test
    run's own, the checkout first on PYTHONPATH, then ``extra``."""
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("MESH_", "TORCHELASTIC_")) and k not in (
             "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e.update(extra or {})
    return e


def _script_rank(script: str, argv: list[str], env: dict[str, str], log: str) -> None:
    """``python script *argv`` in this process, a fork of mesh.spawn's fork
    server: the environment ``env``, the working folder the checkout, the
    output (stdout and stderr merged) in ``log``."""
    import runpy
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def run_ranks(script: str, args: list[list[str]], env: dict[str, str],
              waits: list[float]) -> tuple[list[Any], list[str]]:
    """Run ``python script *args[r]`` for each rank r (output merged, cwd the
    checkout), wait for rank i at most ``waits[i]`` seconds in turn (a wait
    past it fails the test), then kill every rank: (processes, outputs); a
    process's ``returncode`` is its exit code (-N: killed by signal N). The
    ranks are forks of mesh.spawn's fork server, which has imported torch
    (conftest's MESH_SPAWN_PRELOAD): a fresh interpreter imported it anew,
    3.5 s of CPU a rank on the 2-core machine."""
    from mesh.spawn import _fresh_context
    ctx = _fresh_context()
    logs = [tempfile.mkstemp(prefix="run-ranks-", suffix=".log") for _ in args]
    procs = [ctx.Process(target=_script_rank, args=(script, a, env, path))
             for a, (_, path) in zip(args, logs)]
    try:
        for p in procs:
            p.start()
        for r, (p, limit) in enumerate(zip(procs, waits)):
            p.join(timeout=limit)
            if p.exitcode is None:
                pytest.fail(f"{script} rank {r} still ran after {limit}s")
    finally:
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                p.kill()
            if p.pid is not None:
                p.join()
            p.returncode = p.exitcode       # type: ignore[attr-defined]
        outs = []
        for fd, path in logs:
            with os.fdopen(fd) as f:
                outs.append(f.read())
            os.unlink(path)
    return procs, outs


def launch_env(root: Any) -> dict[str, str]:
    """This process's environment for a job started by a launcher in a
    test (meshrun, mpirun): no launcher's variables of the test's own run,
    the repository ``root`` on PYTHONPATH, the venv's bin first on PATH,
    timeouts a test can wait out, and mpirun allowed as root (CI's)."""
    launcher = ("MESH_", "MASTER_", "OMPI_", "PMIX_", "SLURM_", "TORCHELASTIC_", "PMI_")
    e = {k: v for k, v in os.environ.items() if not k.startswith(launcher)
         and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    e.update(PYTHONPATH=str(root), MESH_RENDEZVOUS_TIMEOUT="30", MESH_TIMEOUT="30",
             OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    return e


def node0_port(proc: "subprocess.Popen[str]", timeout: float = 30) -> int:
    """The port node 0's meshrun (``--nnodes``, started with port 0 and its
    standard error piped as text) says it serves the rendezvous on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        if "serves the rendezvous on port" in line:
            return int(line.rsplit(" ", 1)[1])
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"node 0 never reported its port (exit {proc.poll()})")
