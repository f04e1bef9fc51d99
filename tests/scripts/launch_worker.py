"""A worker for tests/test_mesh_launch.py whose behaviour is given per rank:

    launch_worker.py PIDDIR RANKS:ACTION ...     RANKS is '*' or '0,2'

It writes PIDDIR/<rank>.pid first (and <rank>.child.pid for 'child') so the
test can check that no process outlives the job."""
import json
import os
import signal
import subprocess
import sys
import time

RANK = int(os.environ["RANK"])
SIZE = int(os.environ["WORLD_SIZE"])
PIDDIR = sys.argv[1]


def _write(name, value):
    tmp = os.path.join(PIDDIR, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write(str(value))
    os.replace(tmp, os.path.join(PIDDIR, name))


def _barrier():
    """Wait (bounded) until every rank has reached this point."""
    _write(f"{RANK}.ready", "")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if sum(n.endswith(".ready") for n in os.listdir(PIDDIR)) >= SIZE:
            return
        time.sleep(0.02)


def _boom():
    raise ValueError(f"boom from rank {RANK}")


TORCHRUN = ("GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE",
            "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID",
            "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING", "MESH_RESTART_COUNT")
"""torchrun's variables beside RANK...MASTER_PORT (its agent's, torch 2.13), and meshrun's
restart count."""

ACTIONS = {
    "print": lambda: print(json.dumps({"rank": RANK, "argv": sys.argv, "path0": sys.path[0],
                                       "main": __name__, "env": {
        k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                       "MASTER_ADDR", "MASTER_PORT", "MESH_SECRET",
                                       "MESH_LAUNCHER", "MESH_NODE_RANK", "MESH_ERROR_FILE",
                                       "PYTHONUNBUFFERED", *TORCHRUN)}})),
    "stderr": lambda: print(f"complaint from rank {RANK}", file=sys.stderr),
    "child": lambda: _write(f"{RANK}.child.pid", subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"]).pid),
    "barrier": _barrier,
    "rundir": lambda: _write(f"{RANK}.rundir", os.environ["MESH_RUNTIME_DIR"]),
    "ignoreterm": lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN),
    "raise": _boom,
    "sigkill": lambda: os.kill(os.getpid(), signal.SIGKILL),
    "segv": lambda: __import__("ctypes").string_at(0),
    "exit3": lambda: sys.exit(3),
    "sleep": lambda: time.sleep(60),
    # launch_mesh.py's mesh: rank 0 greets every rank, then an all_reduce
    "mesh": lambda: __import__("runpy").run_path(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "launch_mesh.py")),
}

if __name__ == "__main__":
    _write(f"{RANK}.pid", os.getpid())
    for item in sys.argv[2:]:
        ranks, _, action = item.partition(":")
        if ranks == "*" or str(RANK) in ranks.split(","):
            ACTIONS[action]()
