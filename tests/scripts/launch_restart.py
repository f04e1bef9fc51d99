"""A job that resumes from its checkpoint when its launcher starts it
again (meshrun --max-restarts, torchrun --max-restarts), for
tests/test_mesh_launch.py and tests/test_collectives_torchdist.py:

    launch_restart.py CKPT_DIR mesh|torch FAIL_TRIES [THEN]

It runs 4 steps of an all_reduce on mesh.init()'s world (mesh) or on
torch.distributed's "meshrun" backend (torch), rank 0 saving the next step
after each; rank 1 raises at step 2 on each try whose restart count is under
FAIL_TRIES. Each rank prints where it starts (the try, its rendezvous
port, run folder and secret) and how it ended: the try, the step it resumed
from, the sum it got and the variables the launcher gave it. THEN: a script
the ranks of the try that ends run after that, as ``python THEN`` would (a
job less: each job's ranks import torch)."""
import json
import os
import sys

CKPT, KIND, FAIL_TRIES = sys.argv[1], sys.argv[2], int(sys.argv[3])
RESTART = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
STATE = os.path.join(CKPT, "state.json")
print(json.dumps({"start": RESTART, "rank": int(os.environ["RANK"]),
                  "port": os.environ["MASTER_PORT"], "run_dir": os.environ["MESH_RUNTIME_DIR"],
                  "secret": os.environ["MESH_SECRET"]}), flush=True)


def resume() -> int:
    try:
        with open(STATE) as f:
            return int(json.load(f)["step"])
    except FileNotFoundError:
        return 0


def save(step: int) -> None:
    with open(STATE + ".tmp", "w") as f:
        json.dump({"step": step}, f)
    os.replace(STATE + ".tmp", STATE)


def train(rank: int, all_reduce, barrier) -> tuple[int, float]:
    first = step = resume()
    total = 0.0
    for step in range(first, 4):
        total += all_reduce(step + 1.0)
        if rank == 0:
            save(step + 1)
        barrier()
        if step == 2 and rank == 1 and RESTART < FAIL_TRIES:
            raise RuntimeError(f"rank 1 fails at step 2 of try {RESTART}")
    return first, total


if KIND == "mesh":
    import numpy as np

    import collectives as C
    import mesh
    with mesh.init(timeout=20) as world:
        rank = world.rank
        first, total = train(rank, lambda x: float(C.all_reduce(world, np.array([x]))[0]),
                             lambda: C.barrier(world))
else:
    import torch
    import torch.distributed as dist

    import collectives.torchdist  # noqa: F401
    dist.init_process_group("meshrun")
    rank = dist.get_rank()

    def all_reduce(x: float) -> float:
        t = torch.tensor([x])
        dist.all_reduce(t)
        return float(t[0])
    first, total = train(rank, all_reduce, dist.barrier)
    dist.destroy_process_group()
print(json.dumps({"rank": rank, "restart": RESTART, "resumed_at": first, "total": total,
                  "env": {k: os.environ.get(k) for k in (
                      "MESH_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                      "TORCHELASTIC_RUN_ID")}}), flush=True)
if len(sys.argv) > 4:
    import runpy
    sys.argv = sys.argv[4:]
    runpy.run_path(sys.argv[0], run_name="__main__")
