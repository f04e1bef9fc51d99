"""MPI-IO file views, nonblocking, split collective and shared pointer
calls as mpi4py programs write them: run with ``mpirun -n N python
mpi4py_fileview.py PATH`` and, its first import changed to ``from
collectives import MPI``, under ``meshrun -n N`` (tests/test_collectives_file.py
compares the outputs and the files, byte for byte, at 3 and 4 ranks). A
global 2-D array split over a process grid is written through subarray
views (Write_all of each rank's block, then a second copy from blocks kept
with a halo, by a derived memory datatype), read back through row-cyclic,
column-block (vector), indexed and darray views by Iread_at_all, split
collectives, Read_all and Iread; then the shared file pointer. Rank 0 prints."""
from mpi4py import MPI
import hashlib
import sys

import numpy as np

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
path = sys.argv[1] + ".view"


def say(*args):
    if rank == 0:
        print(*args, flush=True)


def split(n, parts, k):
    """(start, length) of part k of n split as evenly as it goes"""
    q, r = divmod(n, parts)
    return k * q + min(k, r), q + (k < r)


NY, NX, HEAD = 7, 10, 32
glob = np.arange(NY * NX, dtype="d").reshape(NY, NX) + 0.5
py, px = MPI.Compute_dims(size, 2)
cy, cx = divmod(rank, px)
(y0, ny), (x0, nx) = split(NY, py, cy), split(NX, px, cx)
say("grid", py, px)

f = MPI.File.Open(comm, path, MPI.MODE_CREATE | MPI.MODE_RDWR)
f.Set_size(0)
if rank == 0:       # a header, and bytes the strided writes leave as they are
    f.Write_at(0, np.frombuffer(b"MESHRUN-FILEVIEW-v1".ljust(HEAD, b"."), "u1"))
    f.Write_at(HEAD + 8 * NY * NX, np.full(8 * 3, 0xAB, "u1"))
comm.Barrier()

# 1. each rank's block through a subarray view, Write_all: the global array, row-major
block = MPI.DOUBLE.Create_subarray([NY, NX], [ny, nx], [y0, x0]).Commit()
f.Set_view(HEAD, MPI.DOUBLE, block)
disp, et, ft, rep = f.Get_view()
say("view", disp, rep, f.Get_type_extent(block), block.Get_size())
st = MPI.Status()
f.Write_all(np.ascontiguousarray(glob[y0:y0 + ny, x0:x0 + nx]), st)
say("write_all", comm.gather((st.Get_count(MPI.DOUBLE), f.Get_position()), root=0))
say("byte_offset", comm.gather([f.Get_byte_offset(k) for k in (0, 1, nx, ny * nx)], root=0))

# 2. a second copy after it, from blocks kept with a halo of one (a derived memory type)
halo = np.full((ny + 2, nx + 2), -1.0)
halo[1:-1, 1:-1] = glob[y0:y0 + ny, x0:x0 + nx]
inner = MPI.DOUBLE.Create_subarray([ny + 2, nx + 2], [ny, nx], [1, 1]).Commit()
f.Set_view(HEAD + 8 * NY * NX + 24, MPI.DOUBLE, block)
f.Write_at_all(0, [halo, 1, inner])
f.Sync()
comm.Barrier()

# 3. read back: rows cyclically (a resized contiguous row), by Iread_at_all
row = MPI.DOUBLE.Create_contiguous(NX).Create_resized(0, 8 * NX * size).Commit()
f.Set_view(HEAD + 8 * NX * rank, MPI.DOUBLE, row)
mine = list(range(rank, NY, size))
rows = np.zeros((len(mine), NX))
req = f.Iread_at_all(0, rows)
req.Wait(st)
ok = rows.tolist() == glob[mine].tolist()
say("rows", comm.allreduce(ok, op=MPI.LAND), comm.gather(st.Get_count(MPI.DOUBLE), root=0))

# column blocks (a vector), split collective from the second copy
c0, w = split(NX, size, rank)
cols = MPI.DOUBLE.Create_vector(NY, w, NX).Commit()
f.Set_view(HEAD + 8 * NY * NX + 24 + 8 * c0, MPI.DOUBLE, cols)
got = np.zeros((NY, w))
f.Read_all_begin(got)
f.Read_all_end(got, st)
ok = got.tolist() == glob[:, c0:c0 + w].tolist()
say("cols", comm.allreduce(ok, op=MPI.LAND), f.Get_position(),
    float(comm.allreduce(got.sum())))

# an indexed view: a diagonal run of each rank's, by Read_at_all_begin / end
idx = MPI.DOUBLE.Create_indexed([2, 1, 3], [rank, NX + 2 * rank, 3 * NX + rank]).Commit()
f.Set_view(HEAD, MPI.DOUBLE, idx)
diag = np.zeros(6)
f.Read_at_all_begin(0, diag)
f.Read_at_all_end(diag)
flat = glob.reshape(-1)
want = np.concatenate([flat[rank:rank + 2], flat[NX + 2 * rank:NX + 2 * rank + 1],
                       flat[3 * NX + rank:3 * NX + rank + 3]])
say("indexed", comm.allreduce(diag.tolist() == want.tolist(), op=MPI.LAND))

# a darray view (rows block-cyclic by 2, columns in blocks over the grid), by Read_all
da = MPI.DOUBLE.Create_darray(size, rank, [NY, NX], [MPI.DISTRIBUTE_CYCLIC,
                              MPI.DISTRIBUTE_BLOCK], [2, MPI.DISTRIBUTE_DFLT_DARG],
                              [py, px]).Commit()
f.Set_view(HEAD, MPI.DOUBLE, da)
part = np.zeros(da.Get_size() // 8)
f.Read_all(part, st)
say("darray", comm.gather((st.Get_count(MPI.DOUBLE), float(part.sum()),
                           float((part * np.arange(len(part))).sum())), root=0))

# each rank's block by Iread (its pointer) into the halo buffer's inner part; then rows
# of its own written back through the block view: Iwrite_at (row 0), Iwrite_all (row 1),
# Write_at_all_begin / end (its last row, where it has a third)
f.Set_view(HEAD, MPI.DOUBLE, block)
halo[1:-1, 1:-1] = 0
MPI.Request.Waitall([f.Iread([halo, 1, inner])])
ok = halo[1:-1, 1:-1].tolist() == glob[y0:y0 + ny, x0:x0 + nx].tolist()
say("iread", comm.allreduce(ok and halo[0].tolist() == [-1.0] * (nx + 2), op=MPI.LAND),
    f.Get_position())
f.Seek(nx)
reqs = [f.Iwrite_at(0, np.full(nx, 1000.0 + rank)), f.Iwrite_all(np.full(nx, 2000.0 + rank))]
while not reqs[1].Test():
    pass
reqs[0].Wait(st)
say("iwrite", st.Get_count(MPI.DOUBLE), f.Get_position())
last = np.full(nx if ny > 2 else 0, 3000.0 + rank)
f.Write_at_all_begin((ny - 1) * nx, last)
f.Write_at_all_end(last)
comm.Barrier()

# 4. the shared file pointer after both copies, in ints: each rank in turn, then ordered
f.Set_view(HEAD + 2 * 8 * NY * NX + 24, MPI.INT, MPI.INT)
for turn in range(size):
    if rank == turn:
        f.Write_shared(np.full(rank + 1, 10 + rank, "i"))
        f.Iwrite_shared(np.array([-rank], "i")).Wait()
    comm.Barrier()
say("shared", f.Get_position_shared(), size * (size + 3) // 2)
two = np.full(2, 50 + rank, "i")
f.Write_ordered_begin(two)
f.Write_ordered_end(two)
say("ordered", f.Get_position_shared())
f.Seek_shared(0)
for turn in range(size):
    if rank == turn:
        back = np.zeros(rank + 2, "i")
        f.Read_shared(back)
        seen = back.tolist()
    comm.Barrier()
say("read_shared", comm.gather(seen, root=0))
f.Seek_shared(size * (size + 3) // 2)
tail = np.zeros(2, "i")
f.Read_ordered_begin(tail)
f.Read_ordered_end(tail, st)
say("read_ordered", comm.gather(tail.tolist(), root=0), st.Get_count(MPI.INT),
    f.Get_position_shared())
f.Seek_shared(1, MPI.SEEK_SET)
r2 = f.Iread_shared(tail)
MPI.Request.Waitall([r2])
f.Close()
comm.Barrier()
if rank == 0:
    with open(path, "rb") as fh:
        data = fh.read()
    print("sha256", len(data), hashlib.sha256(data).hexdigest()[:16], flush=True)
    for k in range(0, len(data), 48):
        print(data[k:k + 48].hex(), flush=True)
comm.Barrier()
say("ALL OK", size)
