"""The connecting job of tests/test_mpi_spawn.py's ports test, under
``meshrun -n 2``: waits for the port name in the file argv[1] names,
Connects, answers the accepting job, Disconnects."""
import os
import sys
import time

from collectives import MPI

comm = MPI.COMM_WORLD
port = None
if comm.rank == 0:
    deadline = time.monotonic() + 60
    while not os.path.exists(sys.argv[1]):
        if time.monotonic() > deadline:
            sys.exit("no port name came")
        time.sleep(0.05)
    with open(sys.argv[1]) as f:
        port = f.read()
inter = comm.Connect(port, root=0)
word = inter.bcast(None, root=0)
inter.gather([comm.rank, comm.size, inter.Get_remote_size(), word,
              comm.allreduce(comm.rank, op=MPI.SUM)], root=0)
back = inter.allreduce(10 * (comm.rank + 1), op=MPI.SUM)
inter.Disconnect()
print(f"connect side {comm.rank}: {back} {inter == MPI.COMM_NULL} {comm.allreduce(1)}",
      flush=True)
