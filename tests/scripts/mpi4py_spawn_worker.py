"""The children of tests/scripts/mpi4py_spawn.py (``worker``) and of
tests/test_mpi_spawn.py (``echo``: the parents' word back, with the
children's own allreduce; ``die``: child 1 ends at once, code 3, the others
wait for the parents' word and write the error that comes instead in the
file argv[2] names)."""
import sys

from mpi4py import MPI
import numpy as np

parent = MPI.Comm.Get_parent()
world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
assert parent != MPI.COMM_NULL and parent.Is_inter()

if sys.argv[1] == "die":
    if rank == 1:
        import os
        os._exit(3)
    try:
        parent.recv(source=0, tag=9)
    except Exception as e:
        with open(sys.argv[2], "w") as f:
            f.write(f"child {rank}: {type(e).__name__}: {e}\n")
    sys.exit(0)
if sys.argv[1] == "echo":
    word = parent.bcast(None, root=0)
    parent.gather([rank, size, world.allreduce(rank, op=MPI.SUM), word], root=0)
    parent.Disconnect()
    sys.exit(0)

assert parent.Get_size() == size and parent.Get_rank() == rank
data = parent.bcast(None, root=0)
arr = np.zeros(4, dtype="d")
parent.Bcast([arr, MPI.DOUBLE], root=0)
part = parent.scatter(None, root=0)
mine = np.full(3, rank + 1.0) * data["scale"]
parent.Reduce([mine, MPI.DOUBLE], None, op=MPI.SUM, root=0)
got = parent.recv(source=0, tag=7)
parent.Send([np.arange(2, dtype="i") + 10 * rank, MPI.INT], dest=0, tag=8)
total = world.allreduce(rank + 1, op=MPI.SUM)
own = np.array([float(rank)])
world.Allreduce(MPI.IN_PLACE, [own, MPI.DOUBLE], op=MPI.MAX)
parent.gather({"rank": rank, "of": size, "bcast": data, "Bcast": arr.tolist(), "part": part,
               "got": got, "allreduce": total, "Allreduce": own.tolist(),
               "parents": parent.Get_remote_size()}, root=0)
both = parent.allreduce(rank * 100, op=MPI.SUM)
parent.Barrier()
parent.Disconnect()
assert MPI.Comm.Get_parent() == MPI.COMM_NULL
after = world.allreduce(both + rank, op=MPI.SUM)     # (their own world goes on: checked here,
assert after == size * both + size * (size - 1) // 2, after     # where a failure shows)
