"""mpi4py's derived datatypes as scientific codes use them, written for
mpi4py: run with ``mpirun -n 3 python mpi4py_datatypes.py``, and with its
first import changed to ``from collectives import MPI`` under ``meshrun -n
3`` (tests/test_collectives_mpi.py compares the two outputs byte for byte).
Any size from 2 on. Rank 0 prints; every rank checks."""
from mpi4py import MPI
import numpy as np

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
right, left = (rank + 1) % size, (rank - 1) % size


def say(*args):
    if rank == 0:
        print(*args, flush=True)


def table(label, rows):
    every = comm.gather(rows, root=0)
    say(label, every)


def layouts():
    """Sizes, extents and true extents (Open MPI's padding, markers)."""
    D, I = MPI.DOUBLE, MPI.INT
    v = D.Create_vector(3, 2, 4)
    types = [v, v.Create_resized(8, 16), D.Create_subarray([4, 5], [2, 3], [1, 1]),
             D.Create_subarray([4, 5], [2, 3], [1, 1], order=MPI.ORDER_FORTRAN),
             D.Create_indexed([2, 1], [5, 0]), D.Create_indexed_block(2, [3, 0]),
             D.Create_hvector(2, 1, 12), D.Create_hindexed([1, 1], [16, 3]),
             D.Create_contiguous(3), v.Create_vector(2, 1, 2), I.Create_vector(3, 1, -2),
             I.Create_hvector(3, 2, 5), D.Create_hvector(2, 1, 12).Create_contiguous(3),
             I.Create_resized(0, 12).Create_contiguous(2),
             D.Create_resized(-4, 8).Create_vector(2, 2, 3),
             D.Create_hindexed([2, 1], [4, 40]).Create_contiguous(2),
             I.Create_subarray([3, 4, 5], [2, 2, 3], [1, 0, 2]),
             I.Create_subarray([3, 4, 5], [2, 2, 3], [1, 0, 2], order=MPI.ORDER_F),
             D.Create_vector(0, 1, 2), MPI.BYTE.Create_hvector(2, 3, 7),
             I.Create_hindexed_block(2, [0, 10]), v.Dup()]
    say("layouts", [[t.Get_size(), t.Get_extent(), t.Get_true_extent(), t.lb, t.ub, t.extent,
                     t.size] for t in types], MPI.DOUBLE.is_predefined, v.is_predefined)
    for t in types:
        t.Free()


def point_to_point():
    a = np.arange(20.0).reshape(4, 5) + 100 * rank
    col = MPI.DOUBLE.Create_vector(4, 1, 5).Commit()      # a column of a 4 x 5 C array
    one, three = (MPI.DOUBLE.Create_subarray([4, 5], [4, 1], [0, j]).Commit() for j in (1, 3))
    # a column sent into another column, the rest untouched
    b = np.full((4, 5), -1.0)
    comm.Sendrecv([a, 1, one], dest=right, recvbuf=[b, 1, three], source=left)
    # a column received as 4 contiguous doubles, and 4 doubles into a column
    c = np.full(6, -1.0)
    st = MPI.Status()
    comm.Sendrecv([a, 1, col], dest=right, sendtag=2, recvbuf=[c, 4, MPI.DOUBLE], source=left,
                  recvtag=2, status=st)
    d = np.full(40, -1.0)           # (the second item of col: its displacement in extents)
    comm.Sendrecv([a, 4, MPI.DOUBLE], dest=right, sendtag=3, recvbuf=[d, (1, 1), col],
                  source=left, recvtag=3)
    # a shorter message fills the first places (Get_count UNDEFINED, Get_elements the doubles)
    e = np.full((4, 5), -1.0)
    comm.Sendrecv([a, 3, MPI.DOUBLE], dest=right, sendtag=4, recvbuf=[e, 1, col], source=left,
                  recvtag=4, status=st)
    short = [st.Get_count(col), st.Get_elements(col), st.Get_count(MPI.DOUBLE)]
    # Isend/Irecv of an indexed type and a subarray, Sendrecv_replace of an hvector
    idx = MPI.INT.Create_indexed([2, 1, 3], [7, 0, 3]).Commit()
    sub = MPI.INT.Create_subarray([4, 6], [2, 3], [1, 2]).Commit()
    x = np.arange(24, dtype="i") + 1000 * rank
    y, z = np.full(24, -1, "i"), np.full((4, 6), -1, "i")
    reqs = [comm.Irecv([y, 1, idx], source=left, tag=5),
            comm.Irecv([z, 1, sub], source=left, tag=6),
            comm.Isend([x, 1, idx], dest=right, tag=5), comm.Isend([x, 1, sub], dest=right, tag=6)]
    MPI.Request.Waitall(reqs)
    hv = MPI.INT.Create_hvector(3, 1, 12).Commit()
    w = np.arange(9, dtype="i") + 10 * rank
    comm.Sendrecv_replace([w, 1, hv], dest=right, sendtag=7, source=left, recvtag=7)
    # a matched probe's Recv, persistent requests re-packed at each start
    comm.Send([a, 2, MPI.DOUBLE.Create_vector(2, 1, 3).Commit()], dest=right, tag=8)
    m = comm.Mprobe(source=left, tag=8)
    f = np.full(8, -1.0)
    m.Recv([f, 1, MPI.DOUBLE.Create_indexed_block(1, [7, 5, 3, 1]).Commit()])
    s, r = np.arange(10.0) + rank, np.full(10, -1.0)
    every2 = MPI.DOUBLE.Create_vector(5, 1, 2).Commit()
    reqs = [comm.Send_init([s, 1, every2], dest=right, tag=9),
            comm.Recv_init([r[1:], 1, every2], source=left, tag=9)]
    rounds = []
    for it in range(2):
        s *= 2
        MPI.Prequest.Startall(reqs)
        MPI.Request.Waitall(reqs)
        rounds.append(r.tolist())
    table("p2p", [b.tolist(), c.tolist(), d.tolist(), e.tolist(), short, y.tolist(),
                  z.tolist(), w.tolist(), f.tolist(), rounds])
    for t in (col, one, three, idx, sub, hv, every2):
        t.Free()


def collectives():
    n = 4
    # Bcast of a block of a 2-D array
    blk = MPI.DOUBLE.Create_subarray([n, n], [2, 2], [1, 1]).Commit()
    g = np.arange(n * n, dtype="d").reshape(n, n) if rank == 0 else np.full((n, n), -1.0)
    comm.Bcast([g, 1, blk], root=0)
    # Scatter of column blocks of an n x 2*size matrix (a vector resized to one column)
    cols = MPI.DOUBLE.Create_vector(n, 2, 2 * size).Create_resized(0, 2 * 8).Commit()
    A = np.arange(n * 2 * size, dtype="d").reshape(n, 2 * size) if rank == 0 else None
    mine = np.empty((n, 2))
    comm.Scatter([A, 1, cols] if rank == 0 else None, [mine, MPI.DOUBLE], root=0)
    # ... and Gather them back, each block doubled, into the other places left as they were
    back = np.full((n, 2 * size), -1.0) if rank == 0 else None
    comm.Gather(mine * 2, [back, 1, cols] if rank == 0 else None, root=0)
    # Allgather of a column, Alltoall of column blocks (a transpose of the block layout)
    col = MPI.INT.Create_vector(3, 1, size).Create_resized(0, 4).Commit()
    ag = np.full((3, size), -1, "i")
    comm.Allgather(np.array([rank, 10 + rank, 20 + rank], "i"), [ag, 1, col])
    rows = (np.arange(3 * size, dtype="i") + 100 * rank).reshape(3, size)
    at = np.full((3, size), -1, "i")
    comm.Alltoall([rows, 1, col], [at, 1, col])
    # the nonblocking forms, IN_PLACE
    ib = np.full((n, n), -1.0) if rank else np.arange(n * n, dtype="d").reshape(n, n)
    gi = np.full((3, size), -1, "i")
    gi[:, rank] = [rank, rank * 2, rank * 3]
    reqs = [comm.Ibcast([ib, 1, blk], root=0), comm.Iallgather(MPI.IN_PLACE, [gi, 1, col])]
    MPI.Request.Waitall(reqs)
    table("coll", [g.tolist(), mine.tolist(), ag.tolist(), at.tolist(), ib.tolist(), gi.tolist()])
    say("gather", back.tolist() if rank == 0 else None)
    for t in (blk, cols, col):
        t.Free()


def blocks():
    """A 2-D array cut into 2 x 2 blocks over a process grid: Scatterv of a
    subarray resized to one element, the displacements each block's first
    element; Gatherv and Allgatherv back; Alltoallv of columns."""
    py, px = MPI.Compute_dims(size, 2)
    R, C = 2 * py, 2 * px
    blk = MPI.DOUBLE.Create_subarray([R, C], [2, 2], [0, 0]).Create_resized(0, 8).Commit()
    counts = [1] * size
    displs = [(r // px) * 2 * C + (r % px) * 2 for r in range(size)]
    A = np.arange(R * C, dtype="d").reshape(R, C) if rank == 0 else None
    mine = np.empty((2, 2))
    comm.Scatterv([A, counts, displs, blk] if rank == 0 else None, [mine, MPI.DOUBLE], root=0)
    B = np.full((R, C + 1), -1.0) if rank == 0 else None     # (a wider array: its own type)
    wide = MPI.DOUBLE.Create_subarray([R, C + 1], [2, 2], [0, 0]).Create_resized(0, 8).Commit()
    wdispls = [(r // px) * 2 * (C + 1) + (r % px) * 2 for r in range(size)]
    comm.Gatherv(mine * 10, [B, counts, wdispls, wide] if rank == 0 else None, root=0)
    every = np.full((R, C), -1.0)
    comm.Allgatherv(mine + 0.5, [every, counts, displs, blk])
    col = MPI.INT.Create_vector(2, 1, size).Create_resized(0, 4).Commit()
    rows = (np.arange(2 * size, dtype="i") + 100 * rank).reshape(2, size)
    cols = np.full((2, size), -1, "i")
    comm.Alltoallv([rows, [1] * size, list(range(size)), col],
                   [cols, [1] * size, list(range(size))[::-1], col])
    table("blocks", [mine.tolist(), every.tolist(), cols.tolist()])
    say("gatherv", B.tolist() if rank == 0 else None)
    for t in (blk, wide, col):
        t.Free()


def errors():
    """What MPI refuses: an uncommitted datatype (MPI_ERR_TYPE), a count not
    inferable from the buffer."""
    out = []
    v = MPI.DOUBLE.Create_vector(2, 1, 2)
    try:
        comm.Send([np.zeros(4), 1, v], dest=right, tag=20)
    except MPI.Exception as e:
        out.append(["uncommitted", e.Get_error_class() == MPI.ERR_TYPE])
    v.Commit()
    try:
        comm.Send([np.zeros(4), v], dest=right, tag=20)
    except ValueError:
        out.append(["no count", "ValueError"])
    v.Free()
    say("errors", out)


def twice_plus(inbuf, inoutbuf, datatype):
    """y = x + 2 y over the datatype's elements, in its layout"""
    lb, ext = datatype.Get_extent()
    x = np.frombuffer(inbuf, 'd')
    y = np.frombuffer(inoutbuf, 'd')
    n = len(x) // (ext // 8)
    idx = (np.arange(n)[:, None] * (ext // 8) + np.array([0, 3])[None, :]).reshape(-1)
    y[idx] = x[idx] + y[idx]

def reductions():
    col = MPI.DOUBLE.Create_vector(2, 1, 3).Commit()
    op = MPI.Op.Create(twice_plus, commute=False)
    a = np.arange(12.0) + 10 * rank
    b = np.full(12, -1.0)
    comm.Allreduce([a, 2, col], [b, 2, col], op=op)
    c = np.full(12, -1.0)
    comm.Reduce([a, 2, col], [c, 2, col], op=op, root=1)
    d = a.copy()
    comm.Allreduce(MPI.IN_PLACE, [d, 2, col], op=op)
    e = np.full(12, -1.0)
    comm.Scan([a, 2, col], [e, 2, col], op=op)
    f = np.full(12, -1.0)
    comm.Exscan([a, 2, col], [f, 2, col], op=op)
    g = np.full(12, -1.0)
    req = comm.Iallreduce([a, 2, col], [g, 2, col], op=op)
    req.Wait()
    h = np.full(12, -1.0)
    comm.Ireduce([a, 2, col], [h, 2, col], op=op, root=0).Wait()
    w = np.full(4 * size, -1.0)
    src = np.arange(8.0 * size) + rank
    comm.Reduce_scatter_block([src, 2, col], [w, 2, col], op=op)
    v = np.full(4 * size, -1.0)
    total = sum(1 + (r % 2) for r in range(size))
    comm.Reduce_scatter([src, total, col], [v, 1 + (rank % 2), col],
                        recvcounts=[1 + (r % 2) for r in range(size)], op=op)
    # builtin ops: Open MPI refuses them on a derived datatype (MPI_ERR_OP), MPICH and
    # meshrun reduce elementwise; the elements' sums either way
    s = np.full(12, -1.0)
    try:
        comm.Allreduce([a, 2, col], [s, 2, col], op=MPI.SUM)
    except MPI.Exception:
        t = np.empty(4); comm.Allreduce(a[[0, 3, 4, 7]].copy(), t, op=MPI.SUM); s[[0, 3, 4, 7]] = t
    table("reductions", [b.tolist(), c.tolist(), d.tolist(), e.tolist(), f.tolist(), g.tolist(),
                         h.tolist(), w.tolist(), v.tolist(), s.tolist()])
    col.Free()
    op.Free()


def windows():
    """One-sided operations with derived datatypes: a column of the target's
    matrix (a vector target datatype), a strided origin."""
    m = np.zeros((4, 4))
    win = MPI.Win.Create(m, 8, comm=comm)
    col = MPI.DOUBLE.Create_vector(4, 1, 4).Commit()
    every2 = MPI.DOUBLE.Create_vector(4, 1, 2).Commit()
    win.Fence()
    win.Put([np.arange(4.0) + 10 * rank, 4, MPI.DOUBLE], right, target=(1, 1, col))
    win.Fence()
    put = m.tolist()
    comm.Barrier()      # (read before the next epoch's accumulates come)
    win.Accumulate([np.arange(8.0) + rank, 1, every2], 0, target=(2, 1, col), op=MPI.SUM)
    win.Fence()
    acc = m.tolist()
    comm.Barrier()
    g = np.full(8, -1.0)
    win.Get([g, 1, every2], right, target=(1, 1, col))
    win.Fence()
    res = np.full(8, -1.0)
    win.Get_accumulate([np.ones(4) + rank, 4, MPI.DOUBLE], [res, 1, every2], right,
                       target=(3, 1, col), op=MPI.SUM)
    win.Fence()
    ga = m.tolist()
    comm.Barrier()
    # the request forms under a lock; a 2 x 2 block (a subarray) of the target
    blk = MPI.DOUBLE.Create_subarray([4, 4], [2, 2], [1, 1]).Commit()
    win.Lock(right, MPI.LOCK_EXCLUSIVE)
    r1 = win.Rput([np.array([-1.0, -2.0, -3.0, -4.0]) - rank, 4, MPI.DOUBLE], right,
                  target=(0, 1, blk))
    r1.Wait()
    win.Flush(right)
    r2 = np.full(4, 0.0)
    req = win.Rget([r2, 4, MPI.DOUBLE], right, target=(0, 1, blk))
    req.Wait()
    r3 = np.full(8, -1.0)
    req = win.Raccumulate([np.ones(8), 1, every2], right, target=(0, 1, col), op=MPI.MAX)
    req.Wait()
    req = win.Rget_accumulate([np.ones(4), 4, MPI.DOUBLE], [r3, 1, every2], right,
                              target=(0, 1, col), op=MPI.SUM)
    req.Wait()
    win.Unlock(right)
    comm.Barrier()
    table("windows", [put, acc, g.tolist(), res.tolist(), r2.tolist(), r3.tolist(), m.tolist()])
    table("get_accumulate", ga)
    win.Free()
    for t in (col, every2, blk):
        t.Free()

def structs():
    """Create_struct: a C struct's fields (offsetof), its sizes and extents as
    Open MPI pads them, decode; sent point-to-point, broadcast and gathered
    as a numpy structured array's records."""
    D, I, C = MPI.DOUBLE, MPI.INT, MPI.CHAR
    S = MPI.Datatype.Create_struct
    types = [S([1, 2], [0, 8], [I, D]), S([1, 1], [0, 8], [D, C]), S([1, 1], [0, 4], [D, C]),
             S([2, 1], [16, 0], [I, MPI.SHORT]), S([1, 1], [0, 8], [I, D.Create_vector(2, 1, 2)]),
             S([1, 1], [0, 4], [C, I.Create_resized(0, 12)]), S([1, 1], [-8, 4], [I, D]),
             S([1, 2], [0, 16], [D, D]), S([1], [0], [D.Create_resized(-4, 16)]),
             S([1, 2], [0, 8], [I, D]).Create_contiguous(2),
             MPI.DOUBLE.Create_struct([0, 1], [0, 8], [I, D])]
    out = []
    for t in types:
        base, name, p = t.decode()
        out.append([t.Get_size(), t.Get_extent(), t.Get_true_extent(), t.Get_envelope(), name,
                    base == MPI.DATATYPE_NULL, p.get('blocklengths'), p.get('displacements'),
                    t.Get_contents()[:2], [x == D for x in t.Get_contents()[3]]])
    say("structs", out)
    for t in types:
        t.Free()
    rec = np.dtype([("id", "i4"), ("x", "f8", 2), ("tag", "S3")], align=True)
    offs = [rec.fields[f][1] for f in rec.names]
    T = S([1, 2, 3], offs, [I, D, C]).Commit()
    a = np.zeros(4, rec)
    a["id"], a["x"] = np.arange(4) + 10 * rank, np.arange(8.0).reshape(4, 2) + rank
    a["tag"] = b"r%d" % rank
    b = np.zeros(4, rec)
    comm.Sendrecv([a, 4, T], dest=right, recvbuf=[b, 4, T], source=left)
    c = np.zeros(2, rec)
    if rank == 0:
        c[:] = a[:2]
    comm.Bcast([c, 2, T], root=0)
    g = np.zeros(size, rec) if rank == 1 else None
    comm.Gather([a[1:2], 1, T], [g, 1, T] if rank == 1 else None, root=1)
    # a pair of fields only: the other bytes left as they were
    part = S([1, 1], [rec.fields["id"][1], rec.fields["tag"][1]], [I, C])
    part = part.Create_resized(0, rec.itemsize).Commit()
    h = np.zeros(4, rec)
    h["x"] = -1
    comm.Sendrecv([a, 4, part], dest=right, sendtag=2, recvbuf=[h, 4, part], source=left,
                  recvtag=2)
    st = MPI.Status()
    comm.Sendrecv([a, 1, T], dest=right, sendtag=3, recvbuf=[np.zeros(64, 'B'), MPI.BYTE],
                  source=left, recvtag=3, status=st)
    def recs(x):
        return None if x is None else [x["id"].tolist(), x["x"].tolist(), x["tag"].tolist()]
    table("struct", [recs(b), recs(c), recs(g), recs(h),
                     st.Get_count(MPI.BYTE), T.Get_size(), T.Get_extent()])
    for t in (T, part):
        t.Free()

def started(name, *args):
    """MPI-4's persistent collective; where the library lacks it (Open MPI 4.1,
    under mpi4py 4: NotImplementedError), a stand-in making the blocking
    call at each Start."""
    try:
        return getattr(comm, name + "_init")(*args)
    except NotImplementedError:
        call = getattr(comm, name)

        class EachStart:
            def Start(self):
                call(*args)

            def Wait(self):
                return True
        return EachStart()


def persistent():
    """The persistent collectives with derived datatypes: set up once, started
    twice, each start packing the send buffer's elements as they are then,
    each wait unpacking into the receive buffer's places (the rest kept)."""
    col = MPI.DOUBLE.Create_vector(2, 1, 3).Commit()
    icol = MPI.INT.Create_vector(2, 1, 3).Create_resized(0, 4).Commit()
    op = MPI.Op.Create(twice_plus, commute=True)
    a = np.zeros(12)
    bc = np.zeros(12)
    ar, rd, sc, ex = (np.full(12, -1.0) for _ in range(4))
    ag, at, gr = np.full(4 * size, -1.0), np.full(4 * size, -1.0), np.full(4 * size, -1.0)
    sr = np.full(4, -1.0)
    whole = np.zeros(4 * size)
    rsb = np.full(4, -1.0)
    n = 5 * size + 2        # (each block's places apart from the others')
    agv, gv, atv = np.full(n, -1, "i"), np.full(n, -1, "i"), np.full(n, -1, "i")
    small, back = np.zeros(n, "i"), np.full(n, -1, "i")
    counts, displs = [1 + (r % 2) for r in range(size)], [5 * r for r in range(size)]
    mine = counts[rank]
    reqs = [started("Bcast", [bc, 2, col], 1),
            started("Allreduce", [a, 2, col], [ar, 2, col], op),
            started("Reduce", [a, 2, col], [rd, 2, col], op, 0),
            started("Allgather", [a, 1, col], [ag, 1, col]),
            started("Alltoall", [whole, 1, col], [at, 1, col]),
            started("Gather", [a, 1, col], [gr, 1, col], size - 1),
            started("Scatter", [whole, 1, col], [sr, 1, col], 0),
            started("Scan", [a, 2, col], [sc, 2, col], op),
            started("Exscan", [a, 2, col], [ex, 2, col], op),
            started("Reduce_scatter_block", [whole, 1, col], [rsb, 1, col], op),
            started("Allgatherv", [small, mine, icol], [agv, counts, displs, icol]),
            started("Gatherv", [small, mine, icol], [gv, counts, displs, icol], 0),
            started("Alltoallv", [small, counts, displs, icol],
                    [atv, [mine] * size, displs, icol]),
            started("Scatterv", [small, counts, displs, icol], [back, mine, icol], 1)]
    seen = []
    for it in range(2):
        a[:] = np.arange(12.0) + 10 * rank + it
        whole[:] = np.arange(4.0 * size) + rank + it
        small[:] = np.arange(n) + 100 * rank + it
        if rank == 1:
            bc[:] = np.arange(12.0) + it
        for p in reqs:
            p.Start()
        for p in reqs:
            p.Wait()
        seen.append([x.tolist() for x in (bc, ar, rd, ag, at, gr, sr, sc, ex, rsb, agv, gv, atv,
                                          back)])
    table("persistent", seen)
    col.Free()
    icol.Free()
    op.Free()


def darrays():
    """Create_darray: a 2-D array of 7 x 6 distributed over the ranks' grid
    (Compute_dims), block by rows and cyclic by columns, and the other way
    in Fortran order: layouts, decode; rank 0 sends each rank its part and
    gets it back, times 10, into the same places of another array."""
    dims = MPI.Compute_dims(size, 2)
    B, Cy, Dflt = MPI.DISTRIBUTE_BLOCK, MPI.DISTRIBUTE_CYCLIC, MPI.DISTRIBUTE_DFLT_DARG
    kinds = [([B, Cy], [Dflt, 2], MPI.ORDER_C), ([Cy, B], [1, Dflt], MPI.ORDER_FORTRAN),
             ([B, MPI.DISTRIBUTE_NONE], [Dflt, Dflt], MPI.ORDER_C)]
    out = []
    for distribs, dargs, order in kinds:
        psizes = dims if distribs[1] != MPI.DISTRIBUTE_NONE else [size, 1]
        part = [MPI.DOUBLE.Create_darray(size, r, [7, 6], distribs, dargs, psizes, order)
                for r in range(size)]
        for t in part:
            t.Commit()
        mine = part[rank]
        _, name, p = mine.decode()
        got = np.full(mine.Get_size() // 8, -1.0)
        reqs = [comm.Irecv(got, source=0, tag=40)]
        if rank == 0:
            G = np.arange(42.0)
            reqs += [comm.Isend([G, 1, part[r]], dest=r, tag=40) for r in range(size)]
        MPI.Request.Waitall(reqs)
        back = np.full(42, -1.0) if rank == 0 else None
        reqs = [comm.Isend(got * 10, dest=0, tag=41)]
        if rank == 0:
            reqs += [comm.Irecv([back, 1, part[r]], source=r, tag=41) for r in range(size)]
        MPI.Request.Waitall(reqs)
        out.append([mine.Get_size(), mine.Get_extent(), mine.Get_true_extent(),
                    mine.Get_envelope(), mine.Get_contents()[0], name, p["psizes"],
                    got.tolist(), None if back is None else back.tolist()])
        for t in part:
            t.Free()
    table("darrays", out)


for prog in (layouts, point_to_point, collectives, blocks, errors, reductions, windows,
             structs, persistent, darrays):
    prog()
say("ALL OK", size)
