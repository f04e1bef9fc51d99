"""Scripts started by the real torchrun (python -m torch.distributed.run) join
with a plain ``mesh.init()``, whichever rendezvous torchrun itself uses; and
the DDP example runs unchanged under it."""
from __future__ import annotations

import os
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from proctools import free_port, run_in_session

pytest.importorskip("torch.distributed", reason="torchrun ships with torch (the test extra)")

from torch.distributed import TCPStore  # noqa: E402

from mesh import RendezvousError, env, torchelastic  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import collectives, mesh
    with mesh.init(timeout=30) as world:
        r, n = world.rank, world.size
        world.send(np.arange(4.0) + r, dst=(r + 1) % n)
        got = world.recv(src=(r - 1) % n)
        a = np.full(3, r + 1.0)
        collectives.all_reduce(world, a)
        ok = (got == np.arange(4.0) + (r - 1) % n).all() and (a == n * (n + 1) / 2).all()
        sys.stdout.write(f"rank {r} of {n}: {'ok' if ok else f'wrong {got} {a}'}\\n")
""")


EXAMPLE = os.path.join(ROOT, "examples", "torch_ddp.py")


def _torchrun(tmp_path: Path, args: list[str], extra_env: dict[str, str] | None = None,
              timeout: float = 90, then: str | None = None, in_meshrun: bool = False) -> str:
    """torchrun ``args`` the job SCRIPT, and after it (``then``) a script
    run unchanged in the same ranks, as ``python then`` would (a torchrun
    job costs a torch import in the agent and in each rank). ``in_meshrun``:
    torchrun started by the rank of a ``meshrun -n 1`` job (its output
    prefixed "[0] " there, taken off here)."""
    script = tmp_path / "job.py"
    script.write_text(SCRIPT + (f"import runpy\nrunpy.run_path({then!r}, run_name='__main__')\n"
                                if then else ""))
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("MESH_", "TORCHELASTIC_", "MASTER_")) and k not in
         ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    # (TMPDIR: torchrun leaves a torchelastic_* folder there; tmp_path is cleaned)
    e.update(PYTHONPATH=ROOT, MESH_RENDEZVOUS_TIMEOUT="30", TMPDIR=str(tmp_path),
             **(extra_env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, str(script)]
    if in_meshrun:
        inner = tmp_path / "inner.py"
        inner.write_text(f"import subprocess, sys\nsys.exit(subprocess.run({cmd!r}).returncode)\n")
        cmd = [sys.executable, "-m", "mesh.launch", "-n", "1", str(inner)]
    code, out = run_in_session(cmd, e, timeout)   # no worker outlives the test
    if in_meshrun:
        out = "\n".join(ln.removeprefix("[0] ") for ln in out.splitlines())
    assert code == 0, f"torchrun {' '.join(args)} exited {code}:\n{out}"
    assert "Address already in use" not in out, out
    assert sorted(ln for ln in out.splitlines() if ln.startswith("rank ")) == \
        ["rank 0 of 2: ok", "rank 1 of 2: ok"], out
    return out


@pytest.mark.timeout(240)
def test_standalone_then_the_ddp_example_runs_unchanged(tmp_path: Path) -> None:
    """Then examples/torch_ddp.py in the same ranks: torch.distributed on the
    "meshrun" backend, its own mesh (test_collectives_torchdist.py runs it
    under meshrun). --standalone is torchrun's c10d rendezvous, the agent
    store shared, on localhost: this job is also the c10d rendezvous test
    (one torchrun job less: an agent and two ranks importing torch). Its ranks
    get the same variables as under ``--rdzv-backend c10d --rdzv-endpoint
    127.0.0.1:PORT`` (MASTER_ADDR=localhost, MASTER_PORT the agent store's,
    TORCHELASTIC_USE_AGENT_STORE=True) but TORCHELASTIC_RUN_ID (a uuid here,
    "none" there); that spelling has a job of its own, the store not shared
    (test_c10d_rendezvous_without_a_shared_agent_store)."""
    out = _torchrun(tmp_path, ["--standalone", "--nproc-per-node", "2"], then=EXAMPLE,
                    timeout=180)     # the time of both jobs it replaces
    losses = [float(ln.rsplit(" ", 1)[1]) for ln in out.splitlines()
              if ln.startswith("step ") and "loss" in ln]
    assert len(losses) == 6 and losses[-1] < losses[0], out


def test_static_rendezvous_with_master_port_started_inside_a_meshrun_rank(
        tmp_path: Path) -> None:
    """torchrun's static rendezvous at --master-port; torchrun started by a
    meshrun rank, a job of its own inside one: its processes inherit
    meshrun's marks (MESH_LAUNCHER=1, RANK, MASTER_PORT), and its ranks
    waited for a rendezvous at the agent's store until the timeout. (One
    torchrun job for both: tests/test_mesh_launchers.py starts mpirun
    inside a meshrun rank.)"""
    _torchrun(tmp_path, ["--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                         "--master-port", str(free_port()), "--rdzv-backend", "static"],
              in_meshrun=True)


def test_c10d_rendezvous_without_a_shared_agent_store(tmp_path: Path) -> None:
    """TORCHELASTIC_USE_AGENT_STORE=False: nobody holds MASTER_PORT, rank 0 binds it."""
    _torchrun(tmp_path, ["--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                         "--rdzv-endpoint", f"127.0.0.1:{free_port()}"],
              {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})


def _spec(rank: int, port: int, restart: str = "0") -> env.JobSpec:
    return env.from_env({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "job",
                         "TORCHELASTIC_RESTART_COUNT": restart,
                         "TORCHELASTIC_USE_AGENT_STORE": "True"})


def test_rank_0_publishes_and_a_restart_never_reads_the_old_address() -> None:
    agent = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    assert torchelastic.rendezvous_address(_spec(0, agent.port), 4321, 5) == ("127.0.0.1", 4321)
    assert torchelastic.rendezvous_address(_spec(1, agent.port), None, 5) == ("127.0.0.1", 4321)
    with pytest.raises(RendezvousError) as e:       # attempt 1: rank 0 has not published yet
        torchelastic.rendezvous_address(_spec(1, agent.port, restart="1"), None, 0.5)
    msg = str(e.value)
    assert f"rank 1: torchrun's agent store at 127.0.0.1:{agent.port}" in msg
    assert "'meshrun/rendezvous/job/1'" in msg and "MASTER_PORT" not in msg


@pytest.mark.timeout(30)
def test_a_new_round_never_reads_the_last_rounds_address() -> None:
    """mesh.init() after a close under torchrun: rank 1 comes back first and
    waits for the address rank 0 publishes for this round, where it read the
    last round's (a service closed with rank 0's mesh) and waited there
    until its rendezvous timeout."""
    agent = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    assert torchelastic.rendezvous_address(_spec(0, agent.port), 4321, 5) == ("127.0.0.1", 4321)
    assert torchelastic.rendezvous_address(_spec(1, agent.port), None, 5) == ("127.0.0.1", 4321)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(
        torchelastic.rendezvous_address(_spec(1, agent.port), None, 10)))
    waiter.start()              # round 2: rank 1 first
    time.sleep(0.5)
    assert got == [], "rank 1 took the last round's address"
    assert torchelastic.rendezvous_address(_spec(0, agent.port), 5555, 5) == ("127.0.0.1", 5555)
    waiter.join(10)
    assert got == [("127.0.0.1", 5555)]


@pytest.mark.parametrize("local_size", ["2", "4"], ids=["across-hosts", "one-host"])
def test_an_unreachable_loopback_agent_store_across_hosts_says_local_addr(
        local_size: str) -> None:
    """torchrun --nnodes 2 where node 0's host name is loopback there: the
    other host's ranks cannot reach MASTER_ADDR; the error names the
    variables and says what to pass (only when the job spans hosts)."""
    spec = env.from_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": local_size,
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                         "TORCHELASTIC_RUN_ID": "job", "TORCHELASTIC_USE_AGENT_STORE": "True"})
    with pytest.raises(RendezvousError) as e:
        torchelastic.rendezvous_address(spec, None, 0.5)
    msg = str(e.value)
    assert "rank 2: torchrun's agent store at 127.0.0.1:" in msg
    hint = "MASTER_ADDR=127.0.0.1 is a loopback address, yet the job spans hosts " \
           "(WORLD_SIZE=4, LOCAL_WORLD_SIZE=2)"
    assert (hint in msg and "--local-addr" in msg) is (local_size == "2"), msg
