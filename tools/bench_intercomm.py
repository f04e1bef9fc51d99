"""MPI's intercommunicator collectives' median call time at 2 + 2 ranks
(COMM_WORLD split by rank % 2, then Create_intercomm), with the same calls
on COMM_WORLD beside them; the same script under both runtimes:

    meshrun -n 4 python tools/bench_intercomm.py mesh [CALLS]     # collectives.MPI
    mpirun -n 4 python tools/bench_intercomm.py mpi4py [CALLS]    # real mpi4py

(before and after a change: the first with PYTHONPATH at each tree, in turn).
Rank 0 prints each call's slowest rank's median over CALLS calls (200; a
tenth of that at 1 MiB), in us."""
import sys
import time

import numpy as np

if sys.argv[1:2] == ["mesh"]:
    from collectives import MPI
else:
    from mpi4py import MPI

N = int(sys.argv[2]) if len(sys.argv) > 2 else 200
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
color = rank % 2
local = comm.Split(color, rank)
inter = local.Create_intercomm(0, comm, 1 - color, tag=7)
lr = local.Get_rank()


def root_of(r=0):
    if color == 0:
        return MPI.ROOT if lr == r else MPI.PROC_NULL
    return r


def med(f, n):
    f(); f()
    comm.Barrier()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e6


rows = []
for nb, n in ((8, N), (1 << 20, max(N // 10, 10))):
    a = np.ones(nb // 8, "f8"); b = np.zeros_like(a)
    rows.append((f"Bcast {nb} B", med(lambda: inter.Bcast(a, root=root_of()), n)))
    obj = b"x" * nb
    rows.append((f"bcast {nb} B", med(lambda: inter.bcast(obj if color == 0 else None,
                                                       root=root_of()), n)))
    rows.append((f"Reduce {nb} B", med(lambda: inter.Reduce(a, b, MPI.SUM, root=root_of()), n)))
    rows.append((f"Allreduce {nb} B", med(lambda: inter.Allreduce(a, b, MPI.SUM), n)))
    rows.append((f"intra Bcast {nb} B", med(lambda: comm.Bcast(a, root=0), n)))
    rows.append((f"intra Allreduce {nb} B", med(lambda: comm.Allreduce(a, b, MPI.SUM), n)))
rows.append(("Barrier", med(lambda: inter.Barrier(), N)))
rows.append(("intra Barrier", med(lambda: comm.Barrier(), N)))
got = comm.gather(rows, root=0)
if rank == 0:
    tag = "meshrun collectives.MPI" if sys.argv[1:2] == ["mesh"] else "mpirun mpi4py"
    for i, (name, _) in enumerate(got[0]):
        print(f"{tag:24s} {name:24s} {max(g[i][1] for g in got):10.1f} us (slowest rank's median)")
