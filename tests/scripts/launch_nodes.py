"""A job for the tests of meshrun --max-restarts across nodes
(tests/test_mesh_launch_nodes.py):

    launch_nodes.py FAIL_NODE FAIL_TRIES [SLEEP]

Every rank joins the mesh and prints its rank, try and restart variables;
the first rank of node FAIL_NODE then raises on each try under FAIL_TRIES;
the ranks sleep SLEEP seconds (outside any mesh call) and meet in a barrier."""
import json
import os
import sys
import time

import collectives as C
import mesh

FAIL_NODE, FAIL_TRIES = int(sys.argv[1]), int(sys.argv[2])
SLEEP = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
RESTART = int(os.environ["TORCHELASTIC_RESTART_COUNT"])

with mesh.init(timeout=30) as world:
    print(json.dumps({"rank": world.rank, "try": RESTART, "env": {k: os.environ.get(k) for k in (
        "GROUP_RANK", "MESH_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "MASTER_PORT")}}),
        flush=True)
    if (int(os.environ["GROUP_RANK"]) == FAIL_NODE and os.environ["LOCAL_RANK"] == "0"
            and RESTART < FAIL_TRIES):
        raise RuntimeError(f"rank {world.rank} fails on try {RESTART}")
    time.sleep(SLEEP)
    C.barrier(world)
