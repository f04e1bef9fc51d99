"""MPI's Spawn, as written for mpi4py: run with ``mpirun -n 2 python
mpi4py_spawn.py WORKER`` (WORKER: tests/scripts/mpi4py_spawn_worker.py),
and with both files' first import changed to ``from collectives import
MPI`` under ``meshrun -n 2`` (tests/test_mpi_spawn.py compares the outputs
byte for byte). Collective over COMM_WORLD, root 0, 3 children: objects and
buffers across the intercommunicator with MPI.ROOT and MPI.PROC_NULL, the
children's own COMM_WORLD, Disconnect on both sides. Rank 0 prints."""
import sys

from mpi4py import MPI
import numpy as np

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
root = MPI.ROOT if rank == 0 else MPI.PROC_NULL


def say(*words):
    if rank == 0:
        print(*words, flush=True)


say("parent of the parents:", MPI.Comm.Get_parent() == MPI.COMM_NULL)
errcodes = []
inter = comm.Spawn(sys.executable, args=[sys.argv[1], "worker"], maxprocs=3, root=0,
                   errcodes=errcodes)
say("Spawn:", inter.Is_inter(), inter.Get_size(), inter.Get_remote_size(), errcodes)
inter.bcast({"scale": 2.0, "from": "parents"}, root=root)
inter.Bcast([np.arange(4, dtype="d") * 1.5, MPI.DOUBLE], root=root)
inter.scatter([["a", 0], ["b", 1], ["c", 2]] if rank == 0 else None, root=root)
out = np.zeros(3)
inter.Reduce(None, [out, MPI.DOUBLE], op=MPI.SUM, root=root)
say("Reduce:", out.tolist())
if rank == 0:
    for k in range(inter.Get_remote_size()):
        inter.send(("hello", k), dest=k, tag=7)
    for k in range(inter.Get_remote_size()):
        buf = np.zeros(2, dtype="i")
        st = MPI.Status()
        inter.Recv([buf, MPI.INT], source=k, tag=8, status=st)
        say("Recv from child", st.Get_source(), "tag", st.Get_tag(), buf.tolist())
rows = inter.gather(None, root=root)
if rank == 0:
    for row in rows:
        say("child:", sorted(row.items()))
both = inter.allreduce(rank + 1, op=MPI.SUM)
say("allreduce across:", both, comm.allreduce(both, op=MPI.SUM))
inter.Barrier()
inter.Disconnect()
say("Disconnect:", inter == MPI.COMM_NULL)
