"""A worker for tests/test_mesh_netns.py: netns_job.py (collectives, the
topology), then netns_p2p_job.py (point-to-point arrays across the hosts),
each unchanged with its own mesh.init(), in the same ranks: one meshrun job
per host for both (a job costs each host a meshrun and two interpreters).
Their reports go to OUTDIR/<rank>.json (netns_job.py's) and
OUTDIR/p2p/<rank>.json.

    netns_both_job.py NBYTES OUTDIR
"""
import os
import sys

import netns_job
import netns_p2p_job

if __name__ == "__main__":
    out = sys.argv[2]
    os.makedirs(os.path.join(out, "p2p"), exist_ok=True)
    netns_job.main(out)
    netns_p2p_job.main(os.path.join(out, "p2p"), int(sys.argv[1]))
