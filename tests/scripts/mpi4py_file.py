"""MPI-IO as mpi4py programs write it: run with ``mpirun -n 3 python
mpi4py_file.py PATH``, and with its first import changed to ``from
collectives import MPI`` under ``meshrun -n 3`` (tests/test_collectives_file.py
compares the outputs, and the files written, byte for byte). Rank 0 prints."""
from mpi4py import MPI
import hashlib
import os
import sys

import numpy as np

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
path = sys.argv[1]


def say(*args):
    if rank == 0:
        print(*args, flush=True)


amode = MPI.MODE_CREATE | MPI.MODE_RDWR
f = MPI.File.Open(comm, path, amode)
f.Set_size(0)
# a header of 16 bytes from rank 0, then each rank's 5 doubles at its own offset
if rank == 0:
    f.Write_at(0, np.frombuffer(b"MESHRUN-MPIIO-v1", "u1"))
f.Set_view(16, MPI.DOUBLE, MPI.DOUBLE)
mine = np.arange(5, dtype="d") + 10 * rank
f.Write_at_all(rank * 5, [mine, MPI.DOUBLE])
# then each rank's rank + 1 ints, one after another
f.Set_view(16 + 8 * 5 * size, MPI.INT, MPI.INT)
f.Write_ordered([np.full(rank + 1, 100 + rank, "i"), MPI.INT])
f.Write_ordered([np.full(2, -rank, "i"), MPI.INT])
f.Sync()
comm.Barrier()
say("size", f.Get_size())
st = MPI.Status()
back = np.empty(5, "d")
f.Set_view(16, MPI.DOUBLE, MPI.DOUBLE)
f.Read_at_all(((rank + 1) % size) * 5, back, st)
ok = back.tolist() == (np.arange(5, dtype="d") + 10 * ((rank + 1) % size)).tolist()
say("read_at_all", comm.allreduce(ok, op=MPI.LAND), st.Get_count(MPI.DOUBLE))
f.Set_view(16 + 8 * 5 * size, MPI.INT, MPI.INT)
got = np.empty(rank + 1, "i")
f.Read_ordered(got)
say("read_ordered", comm.gather(got.tolist(), root=0))
# a read past the end: what there is, the count says how much
f.Set_view(0, MPI.BYTE, MPI.BYTE)
tail = np.zeros(8, "u1")
st = MPI.Status()
f.Read_at(f.Get_size() - 3, tail, st)
say("short", st.Get_count(MPI.BYTE), tail.tolist())
head = bytearray(16)
f.Read_at(0, head)
say("head", bytes(head).decode())
# the individual file pointer
f.Seek(4)
w = np.empty(4, "u1")
f.Read(w)
say("pointer", f.Get_position(), bytes(w).decode())
# (what Preallocate puts in the space it adds is undefined: Open MPI's is not zeros)
n = f.Get_size()
comm.Barrier()      # (every rank's n before any grows it: Set_size wants one size)
f.Preallocate(4096)
say("preallocated", f.Get_size())
f.Set_size(n)
f.Close()
comm.Barrier()
if rank == 0:
    with open(path, "rb") as fh:
        data = fh.read()
    print("sha256", len(data), hashlib.sha256(data).hexdigest()[:16], flush=True)
# errors: a file that is not there; an existing file with MODE_EXCL
try:
    MPI.File.Open(comm, path + ".missing", MPI.MODE_RDONLY)
except MPI.Exception as e:
    say("missing", e.Get_error_class() == MPI.ERR_NO_SUCH_FILE)
try:
    MPI.File.Open(comm, path, MPI.MODE_CREATE | MPI.MODE_EXCL | MPI.MODE_WRONLY)
except MPI.Exception as e:
    say("exists", e.Get_error_class() == MPI.ERR_FILE_EXISTS)
# MODE_APPEND: the ordered calls from the end; DELETE_ON_CLOSE
f = MPI.File.Open(comm, path + ".tmp", MPI.MODE_CREATE | MPI.MODE_WRONLY)
f.Write_at_all(rank * 2, np.array([rank, rank], "u1"))
f.Close()
f = MPI.File.Open(comm, path + ".tmp", MPI.MODE_WRONLY | MPI.MODE_APPEND
                  | MPI.MODE_DELETE_ON_CLOSE)
f.Write_ordered(np.full(rank + 1, 50 + rank, "u1"))
say("appended", f.Get_size())
f.Close()
comm.Barrier()
say("deleted", comm.allreduce(not os.path.exists(path + ".tmp"), op=MPI.LAND))
MPI.File.Open(comm, path + ".del", MPI.MODE_CREATE | MPI.MODE_WRONLY).Close()
if rank == 0:
    MPI.File.Delete(path + ".del")
    try:
        MPI.File.Delete(path + ".del")
    except MPI.Exception as e:
        say("delete twice", e.Get_error_class() == MPI.ERR_NO_SUCH_FILE)
comm.Barrier()
say("ALL OK", size)
