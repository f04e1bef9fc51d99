"""One-sided windows as mpi4py programs write them, past the tutorial's:
PSCW (Post, Start, Complete, Wait), the request calls (Rput, Raccumulate,
Rget_accumulate), Get_accumulate of several elements, and a shared window
(Allocate_shared, Shared_query, loads and stores, Sync). Run under ``mpirun
-n 3`` and, with its import changed to ``from collectives import MPI``,
under meshrun (tests/test_mesh_window.py compares what rank 0 prints)."""
import json

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
n, r = comm.Get_size(), comm.Get_rank()
right, left = (r + 1) % n, (r - 1) % n


def grp(ranks):
    try:
        return comm.Get_group().Incl(ranks)
    except (AttributeError, NotImplementedError):
        return ranks


a = np.zeros(8, np.int64)
win = MPI.Win.Create(a, a.itemsize, comm=comm)
win.Post(grp([left]))
win.Start(grp([right]))
win.Put(np.array([100 + r]), right, target=(0, 1))
req = win.Rput(np.full(2, r), right, target=(1, 2))
req.Wait()
res = np.zeros(2, np.int64)
win.Get_accumulate(np.array([5, 6]), res, right, target=(3, 2), op=MPI.SUM)
win.Complete()
win.Wait()
post = a.tolist()
win.Fence()
reqs = [win.Raccumulate(np.arange(2) + r, 0, target=(5, 2), op=MPI.SUM),
        win.Rget_accumulate(np.array([1]), np.zeros(1, np.int64), left, target=(0, 1),
                            op=MPI.MAX)]
MPI.Request.Waitall(reqs)
win.Fence()
r2 = np.zeros(2, np.int64)
win.Lock(0, MPI.LOCK_SHARED)
win.Rget_accumulate(np.zeros(2, np.int64), r2, 0, target=(5, 2), op=MPI.NO_OP).Wait()
win.Unlock(0)
win.Free()
sw = MPI.Win.Allocate_shared((r + 1) * 8, 8, comm=comm)
mine = np.frombuffer(sw.tomemory(), dtype="d")
sw.Fence()
mine[:] = 10 * r + np.arange(r + 1)
sw.Sync()
comm.Barrier()
sw.Sync()
seen = []
for q in range(n):
    buf, unit = sw.Shared_query(q)
    seen.append([unit, np.ndarray(buffer=buf, dtype="d", shape=(q + 1,)).tolist()])
sw.Fence()
sw.Put(np.array([-1.0 - r]), right, target=0)
sw.Fence()
buf, _ = sw.Shared_query(right)
seen.append(np.ndarray(buffer=buf, dtype="d", shape=(1,)).tolist())
sw.Free()
out = comm.gather([post, res.tolist(), a.tolist(), r2.tolist(), seen], root=0)
if r == 0:
    print("RESULT2 " + json.dumps(out))
