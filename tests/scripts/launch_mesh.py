"""A mesh program for the launcher tests (tests/test_mesh_launch.py, and
tests/test_mesh_launchers.py under the real mpirun and srun): join through
mesh.init(), have rank 0 greet every rank and collect the replies, check an
all_reduce against its known sum, then leave. Each line is one write, so
that launchers that relay unbuffered output (mpirun) never split it.
MESH_TEST_EXIT_BEFORE_INIT="R:CODE,...": rank R exits with CODE first;
MESH_TEST_EXIT_AFTER_RENDEZVOUS="R:CODE": rank R exits with CODE once it has the
rendezvous' table, before it links to any peer (its peers' links to it fail);
MESH_TEST_MORE_STEPS=N: N more all_reduces, 50 ms apart, to die in;
MESH_TEST_SLEEP_BEFORE_INIT=S: every rank sleeps S seconds first (a slow start);
MESH_TEST_SLEEP_AFTER=S: every rank sleeps S seconds at the end, in its mesh (a long
computation outside mesh calls)."""
import os
import sys
import time

_EXITS = dict(e.split(":") for e in os.environ.get("MESH_TEST_EXIT_BEFORE_INIT", "").split(",")
              if e)
if os.environ.get("RANK") in _EXITS:
    sys.exit(int(_EXITS[os.environ["RANK"]]))
if float(os.environ.get("MESH_TEST_SLEEP_BEFORE_INIT", "0")):
    sys.stdout.write(f"rank {os.environ.get('RANK')} sleeps before init\n")
    sys.stdout.flush()
    time.sleep(float(os.environ["MESH_TEST_SLEEP_BEFORE_INIT"]))

import numpy as np

import collectives
import mesh
import mesh.world

_AFTER = dict(e.split(":") for e in os.environ.get("MESH_TEST_EXIT_AFTER_RENDEZVOUS", "").split(",")
              if e)
if os.environ.get("RANK") in _AFTER:
    def _exit(*args: object, **kw: object) -> None:
        os._exit(int(_AFTER[os.environ["RANK"]]))
    mesh.world.Transport = _exit      # (made once the table is in: mesh.world.init)

with mesh.init(timeout=20) as world:
    if world.rank == 0:
        for dst in range(1, world.size):
            world.send({"hello": dst}, dst)
        replies = [world.recv(src)["from"] for src in range(1, world.size)]
        sys.stdout.write(f"rank 0 heard from {replies}\n")
    else:
        msg = world.recv(0)
        world.send({"from": world.rank, "echo": msg["hello"]}, 0)
        sys.stdout.write(f"rank {world.rank} got {msg}\n")
    total = collectives.all_reduce(world, np.full(3, world.rank + 1.0))
    assert (total == world.size * (world.size + 1) / 2).all(), f"rank {world.rank}: {total}"
    for _ in range(int(os.environ.get("MESH_TEST_MORE_STEPS", "0"))):
        collectives.all_reduce(world, np.ones(4))
        time.sleep(0.05)
    if float(os.environ.get("MESH_TEST_SLEEP_AFTER", "0")):
        sys.stdout.write(f"rank {world.rank} sleeps\n")
        time.sleep(float(os.environ["MESH_TEST_SLEEP_AFTER"]))
