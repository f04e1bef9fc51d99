"""A job for the tests of meshrun --max-restarts across nodes
(tests/test_mesh_launch_nodes.py, tests/test_mesh_netns.py):

    launch_nodes.py FAIL_NODE FAIL_TRIES [SLEEP [EXIT_CODE [OUTDIR]]]

Every rank joins the mesh and prints its rank, try, pid and restart
variables; the first rank of node FAIL_NODE then fails on each try under
FAIL_TRIES, raising (or exiting EXIT_CODE); the ranks sum (rank + 1) * (try
+ 1) in an all_reduce (a try's ranks meet only each other), sleep SLEEP
seconds (outside any mesh call), meet in a barrier and print their sum.
(OUTDIR, which test_mesh_netns.py gives every job, is not read.) With
SLOW_EXIT=S in its environment the failing rank, its mesh closed, lingers
S seconds in an exit handler (a rank slow to end after its error); with
SLEEP_NODE=K only node K's ranks sleep (the others wait in the barrier);
with SAY_SLEEP=1 each rank prints {"rank", "try", "sleeps"} once its
all_reduce is done."""
import atexit
import json
import os
import sys
import time

import numpy as np

import collectives as C
import mesh

FAIL_NODE, FAIL_TRIES = int(sys.argv[1]), int(sys.argv[2])
SLEEP = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
EXIT_CODE = int(sys.argv[4]) if len(sys.argv) > 4 else None
RESTART = int(os.environ["TORCHELASTIC_RESTART_COUNT"])

with mesh.init(timeout=30) as world:
    print(json.dumps({"rank": world.rank, "try": RESTART, "pid": os.getpid(),
                      "env": {k: os.environ.get(k) for k in (
                          "GROUP_RANK", "MESH_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                          "MASTER_ADDR", "MASTER_PORT")}}), flush=True)
    if (int(os.environ["GROUP_RANK"]) == FAIL_NODE and os.environ["LOCAL_RANK"] == "0"
            and RESTART < FAIL_TRIES):
        atexit.register(time.sleep, float(os.environ.get("SLOW_EXIT", "0")))
        if EXIT_CODE is not None:
            sys.exit(EXIT_CODE)
        raise RuntimeError(f"rank {world.rank} fails on try {RESTART}")
    total = C.all_reduce(world, np.array([(world.rank + 1) * (RESTART + 1)]))
    if os.environ.get("SAY_SLEEP"):
        print(json.dumps({"rank": world.rank, "try": RESTART, "sleeps": SLEEP}), flush=True)
    if os.environ.get("SLEEP_NODE", os.environ["GROUP_RANK"]) == os.environ["GROUP_RANK"]:
        time.sleep(SLEEP)
    C.barrier(world)
    print(json.dumps({"rank": world.rank, "try": RESTART, "sum": int(total[0])}), flush=True)
