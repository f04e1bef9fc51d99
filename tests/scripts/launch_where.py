"""Ranks for tests/test_mesh_launch.py's stop that asks each rank where it is:

    launch_where.py DIR

Rank 1 waits in a receive that never comes; rank 0, once rank 1's
heartbeats say it waits, computes in a Python loop; rank 2 blocks the
signal that asks (as a rank wedged in native code would never answer) and
sleeps. Ranks 0 and 2 write DIR/<rank>.ready once there."""
import os
import signal
import sys
import time

import mesh
from mesh.launch import _bootstrap

SAY_WHERE = getattr(_bootstrap, "SAY_WHERE", 0)     # (tools/bench_stop.py runs older trees)

DIR = sys.argv[1]


def ready(rank: int) -> None:
    open(os.path.join(DIR, f"{rank}.ready"), "w").close()


def spin() -> None:
    ready(0)
    x = 0
    while True:
        x += 1


def main() -> None:
    if os.environ["RANK"] == "2" and SAY_WHERE:    # (before mesh.init: its threads too)
        signal.pthread_sigmask(signal.SIG_BLOCK, [SAY_WHERE])
    with mesh.init() as world:
        if world.rank == 1:
            world.recv(0, tag=7)
        elif world.rank == 0:
            deadline = time.monotonic() + 20
            while not world._t.live.peers[1].status.startswith("waiting") \
                    and time.monotonic() < deadline:
                time.sleep(0.02)
            spin()
        else:
            ready(2)
            time.sleep(60)


main()
