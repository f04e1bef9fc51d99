"""Ranks for tests/test_mesh_launch.py's stop that asks each rank where it is:

    launch_where.py DIR

Rank 1 waits in a receive that never comes; rank 0, once rank 1's
heartbeats say it waits, computes in a Python loop; rank 2 is wedged in
native code: a C call that holds the GIL, where no Python signal handler
runs (it never answers meshrun's question). Ranks 0 and 2 write
DIR/<rank>.ready once there."""
import ctypes
import os
import sys
import time

import mesh

DIR = sys.argv[1]


def ready(rank: int) -> None:
    open(os.path.join(DIR, f"{rank}.ready"), "w").close()


def spin() -> None:
    ready(0)
    x = 0
    while True:
        x += 1


def wedge() -> None:
    """Deadlock in C holding the GIL: a lock acquired twice through ctypes.pythonapi,
    whose calls keep the GIL, and whose wait a signal does not end (EINTR: again)."""
    api = ctypes.pythonapi
    api.PyThread_allocate_lock.restype = ctypes.c_void_p
    api.PyThread_acquire_lock.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lock = api.PyThread_allocate_lock()
    api.PyThread_acquire_lock(lock, 1)
    ready(2)
    api.PyThread_acquire_lock(lock, 1)


def main() -> None:
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
            wedge()


main()
