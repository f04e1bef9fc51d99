"""A mesh program for tests/test_launch.py: a job where a rank fails, or
finishes late.

    launch_fail.py with    rank 2 raises inside ``with mesh.init()`` while the
                           others wait for it in a small all_reduce
    launch_fail.py bare    the same with no ``with`` and no close at all
    launch_fail.py late S  rank 0 works S seconds more after the last collective

Rank 2 prints when it fails; the others print the error they see, and
ignore SIGTERM so that meshrun stopping the job cannot cut that short: they
leave by themselves, or by SIGKILL after --grace.
"""
import signal
import sys
import time

import numpy as np

import collectives
import mesh


def run(world: mesh.Mesh, mode: str) -> None:
    a = np.ones(4)
    collectives.all_reduce(world, a)
    if mode == "late":
        if world.rank == 0:
            time.sleep(float(sys.argv[2]))
        return
    if world.rank == 2:
        print(f"failing at {time.time()}", flush=True)
        raise RuntimeError("rank 2 fails on purpose")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        collectives.all_reduce(world, a)
    except mesh.MeshError as e:
        print(f"saw {type(e).__name__}: {e}", flush=True)
        raise


if sys.argv[1] == "bare":
    run(mesh.init(), sys.argv[1])
else:
    with mesh.init() as world:
        run(world, sys.argv[1])
