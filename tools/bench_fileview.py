"""Writing a global N x N float64 array from every rank's part through
MPI-IO file views, one Write_all a trial (Open, Set_view, Write_all,
Close), under meshrun (collectives.MPI) or mpirun (real mpi4py):

    meshrun -n 4 python tools/bench_fileview.py PATH N LAYOUT [TRIALS]
    mpirun -n 4 python tools/bench_fileview.py PATH N LAYOUT [TRIALS] --mpi4py

LAYOUT: ``rows`` (each rank's rows, a contiguous view at its displacement:
one run), ``block`` (a block of a 2-D process grid, Create_subarray: one
run a row of it), ``cyclic`` (every size-th double, a resized DOUBLE: one
run a double). Prints, from rank 0, the median and best trial."""
from __future__ import annotations

import os
import sys
import time

import numpy as np

if "--mpi4py" in sys.argv:
    from mpi4py import MPI
else:
    from collectives import MPI


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--mpi4py"]
    path, n, layout = args[0], int(args[1]), args[2]
    trials = int(args[3]) if len(args) > 3 else 5
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    py, px = MPI.Compute_dims(size, 2)
    cy, cx = divmod(rank, px)
    if layout == "block":
        ny, nx = n // py, n // px
        ft = MPI.DOUBLE.Create_subarray([n, n], [ny, nx], [cy * ny, cx * nx]).Commit()
        mine, disp = np.full((ny, nx), float(rank)), 0
    elif layout == "rows":
        ft, mine = MPI.DOUBLE, np.full((n // size, n), float(rank))
        disp = 8 * rank * mine.size
    else:
        ft = MPI.DOUBLE.Create_resized(0, 8 * size).Commit()
        mine, disp = np.full(n * n // size, float(rank)), 8 * rank
    times = []
    for _ in range(trials):
        comm.Barrier()
        t = time.perf_counter()
        f = MPI.File.Open(comm, path, MPI.MODE_CREATE | MPI.MODE_WRONLY)
        f.Set_view(disp, MPI.DOUBLE, ft)
        f.Write_all(mine)
        f.Close()
        comm.Barrier()
        times.append(time.perf_counter() - t)
    if rank == 0:
        times.sort()
        print(f"{layout} N={n} ({8 * n * n >> 20} MiB, {size} ranks): median "
              f"{times[len(times) // 2] * 1e3:.1f} ms, best {times[0] * 1e3:.1f} ms", flush=True)
        os.unlink(path)


if __name__ == "__main__":
    main()
