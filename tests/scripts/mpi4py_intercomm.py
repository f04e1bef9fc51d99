"""MPI's Alltoallw and intercommunicators, as written for mpi4py: run with
``mpirun -n 4 python mpi4py_intercomm.py``, and with its first import
changed to ``from collectives import MPI`` under ``meshrun -n 4``
(tests/test_collectives_mpi.py compares the outputs byte for byte). Rank 0
prints every rank's results; every rank checks."""
from mpi4py import MPI
import numpy as np

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def say(name, value):
    got = comm.gather(value, root=0)
    if rank == 0:
        print(name, got, flush=True)


def alltoallw():
    # rank r sends j + 1 ints to rank j from an int32 buffer, receives r + 1 from each
    # rank, at byte displacements with gaps; a derived datatype (a column) on one side
    sb = np.arange(4 * size * size, dtype="i4") + 100 * rank
    counts = [j + 1 for j in range(size)]
    displs = [4 * sum(counts[:j]) for j in range(size)]
    rcounts, rdispls = [rank + 1] * size, [4 * (rank + 2) * i + 4 for i in range(size)]
    rb = np.full(4 * size * size, -1, dtype="i4")
    comm.Alltoallw([sb, counts, displs, [MPI.INT] * size],
                   [rb, rcounts, rdispls, [MPI.INT] * size])
    say("Alltoallw", rb.tolist())
    rb2 = np.full_like(rb, -1)
    req = comm.Ialltoallw([sb, (counts, displs), [MPI.INT] * size],
                          [rb2, (rcounts, rdispls), [MPI.INT] * size])
    req.Wait()
    assert (rb2 == rb).all()
    try:            # (MPI-4's; Open MPI 4.1 has none: the blocking call twice instead)
        p = comm.Alltoallw_init([sb, counts, displs, [MPI.INT] * size],
                                [rb2, rcounts, rdispls, [MPI.INT] * size])
    except NotImplementedError:
        p = None
    seen = []
    for k in range(2):
        sb += 1000
        rb2[:] = -1
        if p is None:
            comm.Alltoallw([sb, counts, displs, [MPI.INT] * size],
                           [rb2, rcounts, rdispls, [MPI.INT] * size])
        else:
            p.Start()
            p.Wait()
        seen.append(rb2[:12].tolist())
    say("Alltoallw_init", seen)
    ib = np.arange(size * 2, dtype="d") + 10 * rank
    comm.Alltoallw(MPI.IN_PLACE, [ib, [2] * size, [16 * j for j in range(size)],
                                  [MPI.DOUBLE] * size])
    say("Alltoallw IN_PLACE", ib.tolist())
    col = MPI.DOUBLE.Create_vector(2, 1, size).Commit()
    m = np.arange(2 * size, dtype="d").reshape(2, size) + 100 * rank
    out = np.zeros(2 * size)
    comm.Alltoallw([m, [1] * size, [8 * j for j in range(size)], [col] * size],
                   [out, [2] * size, [16 * j for j in range(size)], [MPI.DOUBLE] * size])
    say("Alltoallw column", out.tolist())
    back = np.zeros((2, size))
    comm.Alltoallw([out, [2] * size, [16 * j for j in range(size)], [MPI.DOUBLE] * size],
                   [back, [1] * size, [8 * j for j in range(size)], [col] * size])
    assert (back == m).all()
    col.Free()


def intercomm():
    color = rank % 2
    local = comm.Split(color, rank)
    inter = local.Create_intercomm(0, comm, 1 - color, tag=7)
    r, n, rn = inter.Get_rank(), inter.Get_size(), inter.Get_remote_size()
    g, rg = inter.Get_group(), inter.Get_remote_group()
    say("queries", [r, n, rn, inter.remote_size, inter.Is_inter(), inter.is_inter,
                    inter.is_intra, g.Get_size(), g.Get_rank(), rg.Get_size(), rg.Get_rank(),
                    MPI.Group.Translate_ranks(rg, list(range(rn)), comm.Get_group())])
    # point-to-point: local rank r and remote rank r pair up (the smaller group's size)
    st = MPI.Status()
    a = np.full(3, rank, "i")
    b = np.zeros(3, "i")
    if r < rn:
        inter.Sendrecv(a, r, 5, b, r, 5, status=st)
    say("Sendrecv", [b.tolist(), st.Get_source(), st.Get_tag()])
    if color == 0:
        for j in range(rn if r == n - 1 else 0):     # (one message a remote rank)
            inter.Send(np.array([rank, j], "i"), j, tag=j)
        got = inter.recv(source=MPI.ANY_SOURCE, tag=3, status=st) if r == 0 else None
        out = [got, st.Get_source() if r == 0 else None]
    else:
        got = np.zeros(2, "i")
        inter.Recv(got, source=MPI.ANY_SOURCE, tag=r, status=st)
        out = [got.tolist(), st.Get_source(), st.Get_tag()]
        if r == 0:
            inter.send({"from": rank}, 0, tag=3)
    say("Send/Recv", out)
    req = inter.Irecv(b, source=(r + 1) % rn)      # (remote rank j hears from (j + 1) % n)
    MPI.Request.Waitall([inter.Isend(a * 2, j) for j in range(rn) if (j + 1) % n == r])
    req.Wait(st)
    say("Isend/Irecv", [b.tolist(), st.Get_source()])
    o = inter.isend(("obj", rank), 0, tag=9) if r == 0 else None
    got = inter.irecv(source=0, tag=9).wait(st) if r == 0 else None
    if o is not None:
        o.wait()
    say("isend/irecv", [got, st.Get_source()])
    say("sendrecv", inter.sendrecv(rank * 3, 0, 4, None, 0, 4) if r == 0 else None)
    # the collectives: group 0's rank 0 (world rank 0) the root
    roots = (MPI.ROOT if r == 0 else MPI.PROC_NULL) if color == 0 else 0
    inter.Barrier()
    buf = np.arange(4, dtype="d") * (rank + 1)
    inter.Bcast(buf, root=roots)
    say("Bcast", buf.tolist())
    rows = np.full((rn, 2), -1, "i")
    inter.Gather(np.array([rank, 7], "i"), rows if roots == MPI.ROOT else None, root=roots)
    say("Gather", rows.tolist())
    mine = np.full(2, -1, "i")
    inter.Scatter(np.arange(2 * rn, dtype="i").reshape(rn, 2) + 50 if roots == MPI.ROOT
                  else None, mine, root=roots)
    say("Scatter", mine.tolist())
    red = np.full(3, -1, "l")
    inter.Reduce(np.arange(3, dtype="l") + rank, red, op=MPI.SUM, root=roots)
    say("Reduce", red.tolist())
    red2 = np.zeros(3, "l")
    inter.Allreduce(np.arange(3, dtype="l") * (rank + 1), red2, op=MPI.MAX)
    inter.Allreduce(np.arange(3, dtype="l") + rank, red, op=MPI.SUM)
    def tenfold(a, b, datatype):       # (not commutative: MPI's order, the lower rank first)
        x, y = np.frombuffer(a, "d"), np.frombuffer(b, "d")
        y[:] = 10 * x + y
    op = MPI.Op.Create(tenfold, commute=False)
    red3 = np.zeros(2)
    inter.Allreduce(np.full(2, rank + 1.0), red3, op=op)
    op.Free()
    say("Allreduce", [red.tolist(), red2.tolist(), red3.tolist()])
    ag = np.zeros((rn, 2), "d")
    inter.Allgather(np.array([rank, rank / 2]), ag)
    say("Allgather", ag.tolist())
    at = np.zeros(rn, "i")
    inter.Alltoall(np.arange(rn, dtype="i") + 10 * rank, at)
    say("Alltoall", at.tolist())
    say("objects", [inter.bcast(("x", rank), root=roots), inter.gather(rank * 10, root=roots),
                    inter.scatter([[j] * 2 for j in range(rn)] if roots == MPI.ROOT else None,
                                  root=roots),
                    inter.allgather(rank), inter.allreduce(rank + 1),
                    inter.allreduce(rank + 1, op=MPI.PROD)])
    # group 1's last rank the root this time
    last = local.Get_size() - 1
    roots = (MPI.ROOT if r == last else MPI.PROC_NULL) if color == 1 else \
        comm.Get_size() // 2 - 1
    say("bcast from the other group", inter.bcast(rank, root=roots))
    # Merge, Dup, Compare
    m1 = inter.Merge()
    m2 = inter.Merge(high=(color == 0))
    m3 = inter.Merge(high=True)
    d = inter.Dup()
    say("Merge", [m1.Get_rank(), m1.Get_size(), m2.Get_rank(), m3.Get_rank(),
                  m1.allreduce(rank), m2.allgather(rank), d.Get_remote_size(),
                  inter.Compare(inter), inter.Compare(d), MPI.Comm.Compare(m1, comm),
                  d.allgather(rank)])
    for c in (m1, m2, m3, d, inter, local):
        c.Free()


def intercomm_more():
    # the v- and w-collectives, Reduce_scatter(_block), alltoall and reduce, the nonblocking
    # and persistent forms, Split and Create (groups of 2 and 1 at 3 ranks, 2 and 2 at 4)
    color = rank % 2
    local = comm.Split(color, rank)
    inter = local.Create_intercomm(0, comm, 1 - color, tag=8)
    r, n, rn = inter.Get_rank(), inter.Get_size(), inter.Get_remote_size()
    roots = (MPI.ROOT if r == 0 else MPI.PROC_NULL) if color == 0 else 0
    top = roots == MPI.ROOT
    counts = [j + 1 for j in range(rn)]                 # (remote rank j's: j + 1 ints)
    displs = [sum(counts[:j]) + j for j in range(rn)]   # (a gap after each block)
    mine = np.arange(r + 1, dtype="i") + 10 * rank

    def vbuf():
        return np.full(sum(counts) + rn, -1, "i")
    gv, sv = vbuf(), np.full(r + 1, -1, "i")
    inter.Gatherv(None if top else mine, [gv, counts, displs, MPI.INT] if top else None,
                  root=roots)
    inter.Scatterv([np.arange(20, dtype="i") * 3, (counts, displs), MPI.INT] if top else None,
                   None if top or roots == MPI.PROC_NULL else sv, root=roots)
    say("Gatherv/Scatterv", [gv.tolist(), sv.tolist()])
    agv = vbuf()
    inter.Allgatherv(mine, [agv, counts, displs, MPI.INT])
    sc = [(r + j) % 2 + 1 for j in range(rn)]          # (to remote j; it expects as many)
    atv = np.full(2 * rn + 1, -1, "d")
    inter.Alltoallv([np.arange(2 * rn, dtype="d") + rank / 4, sc, [2 * j for j in range(rn)],
                     MPI.DOUBLE], [atv, (sc, [2 * j + 1 for j in range(rn)]), MPI.DOUBLE])
    pairs = MPI.INT.Create_vector(2, 1, 2).Commit()     # (two ints, a gap after each)
    aw = np.full(4 * rn, -1, "i")
    inter.Alltoallw([np.arange(2 * rn, dtype="i") + 100 * rank, [2] * rn,
                     [8 * j for j in range(rn)], [MPI.INT] * rn],
                    [aw, [1] * rn, [16 * j for j in range(rn)], [pairs] * rn])
    say("Allgatherv/Alltoallv/w", [agv.tolist(), atv.tolist(), aw.tolist()])
    rc = [6 - 2 * (n - 1)] + [2] * (n - 1)              # (6 ints a group, either size)
    rs = np.full(rc[r], -1, "l")
    inter.Reduce_scatter(np.arange(6, dtype="l") * (rank + 1), rs, rc, op=MPI.SUM)
    rsb = np.full(4 // n, -1, "i")
    inter.Reduce_scatter_block(np.arange(4, dtype="i") + rank, rsb, op=MPI.MAX)
    say("Reduce_scatter(_block)", [rs.tolist(), rsb.tolist()])
    say("alltoall/reduce", [inter.alltoall([(rank, j) for j in range(rn)]),
                            inter.reduce(rank + 1, op=MPI.SUM, root=roots),
                            inter.reduce([rank], op=MPI.SUM, root=roots)])
    # nonblocking, all in flight, waited for in the order other than their calls'; the rooted
    # ones last (Open MPI 4.1's libnbc leaves an MPI.PROC_NULL rank's tag behind its group's,
    # and a nonblocking call after one then never matches there)
    al, iag, iat = np.zeros(2, "i"), np.zeros((rn, 1), "i"), np.zeros(rn, "i")
    agv2, atv2, aw2 = vbuf(), np.full_like(atv, -1), np.full_like(aw, -1)
    rs2, rsb2 = np.full_like(rs, -1), np.full_like(rsb, -1)
    reqs = [inter.Iallreduce(np.array([rank, -rank], "i"), al, op=MPI.MIN),
            inter.Ibarrier(), inter.Iallgather(np.array([rank], "i"), iag),
            inter.Ialltoall(np.arange(rn, dtype="i") + 10 * rank, iat),
            inter.Iallgatherv(mine, [agv2, counts, displs, MPI.INT]),
            inter.Ialltoallv([np.arange(2 * rn, dtype="d") + rank / 4, sc,
                              [2 * j for j in range(rn)], MPI.DOUBLE],
                             [atv2, (sc, [2 * j + 1 for j in range(rn)]), MPI.DOUBLE]),
            inter.Ialltoallw([np.arange(2 * rn, dtype="i") + 100 * rank, [2] * rn,
                              [8 * j for j in range(rn)], [MPI.INT] * rn],
                             [aw2, [1] * rn, [16 * j for j in range(rn)], [pairs] * rn]),
            inter.Ireduce_scatter(np.arange(6, dtype="l") * (rank + 1), rs2, rc, op=MPI.SUM),
            inter.Ireduce_scatter_block(np.arange(4, dtype="i") + rank, rsb2, op=MPI.MAX)]
    MPI.Request.Waitall(reqs[::-1])
    assert [agv2.tolist(), atv2.tolist(), aw2.tolist(), rs2.tolist(), rsb2.tolist()] == \
        [agv.tolist(), atv.tolist(), aw.tolist(), rs.tolist(), rsb.tolist()]
    b = np.arange(3, dtype="d") * (rank + 1)
    red, ig, isc = np.full(2, -1, "i"), np.full((rn, 2), -1, "i"), np.full(2, -1, "i")
    gv2, sv2 = vbuf(), np.full(r + 1, -1, "i")
    leaf = not top and roots != MPI.PROC_NULL
    reqs = [inter.Ibcast(b, root=roots),
            inter.Ireduce(np.array([rank, 1], "i"), red, op=MPI.SUM, root=roots),
            inter.Igather(np.array([rank, 5], "i"), ig if top else None, root=roots),
            inter.Iscatter(np.arange(2 * rn, dtype="i") + 7 if top else None,
                           isc if leaf else None, root=roots),
            inter.Igatherv(None if top else mine, [gv2, counts, displs, MPI.INT] if top
                           else None, root=roots),
            inter.Iscatterv([np.arange(20, dtype="i") * 3, (counts, displs), MPI.INT] if top
                            else None, sv2 if leaf else None, root=roots)]
    for q in reqs[::-1]:
        q.Wait()
    assert [gv2.tolist(), sv2.tolist()] == [gv.tolist(), sv.tolist()]
    say("Iallreduce/Iallgather/Ialltoall/Ibcast/Ireduce/Igather/Iscatter",
        [al.tolist(), iag.tolist(), iat.tolist(), b.tolist(), red.tolist(), ig.tolist(),
         isc.tolist()])
    # persistent (MPI-4's; Open MPI 4.1 has none: the blocking calls instead), started twice
    pb, pr, pa = np.zeros(2, "i"), np.full(2, -1, "i"), np.zeros(rn, "i")
    psend, pg = np.zeros(2, "i"), np.full(sum(counts) + rn, -1, "i")
    calls = [lambda: inter.Bcast(pb, root=roots),
             lambda: inter.Allreduce(psend, pr, op=MPI.SUM),
             lambda: inter.Alltoall(np.arange(rn, dtype="i") * 0 + psend[0], pa),
             lambda: inter.Gatherv(None if top else mine + psend[0],
                                   [pg, counts, displs, MPI.INT] if top else None, root=roots),
             lambda: inter.Barrier()]
    ab = np.zeros(rn, "i")
    gsend = np.zeros_like(mine)
    try:
        inits = [inter.Bcast_init(pb, root=roots), inter.Allreduce_init(psend, pr, op=MPI.SUM),
                 inter.Alltoall_init(ab, pa),
                 inter.Gatherv_init(None if top else gsend,
                                    [pg, counts, displs, MPI.INT] if top else None, root=roots),
                 inter.Barrier_init()]
    except NotImplementedError:
        inits = None
    seen = []
    for k in range(2):
        psend[:] = [rank + k, k]
        if top:
            pb[:] = [k + 1, 2 * k]
        if inits is None:
            for c in calls:
                c()
        else:
            ab[:] = psend[0]
            gsend[:] = mine + psend[0]
            MPI.Prequest.Startall(inits)
            MPI.Request.Waitall(inits)
        seen.append([pb.tolist(), pr.tolist(), pa.tolist(), pg.tolist()])
    say("persistent", seen)
    # Split: every rank one color, keys reversed; then the first half's and the second's
    s = inter.Split(0, -rank)
    say("Split", [s.Get_rank(), s.Get_size(), s.Get_remote_size(), s.allgather(rank),
                  s.Get_remote_group().Translate_ranks(list(range(s.Get_remote_size())),
                                                      comm.Get_group())])
    h = inter.Split(rank // 2 if rank < 3 else MPI.UNDEFINED, rank)
    say("Split halves", h == MPI.COMM_NULL or [h.Get_rank(), h.Get_size(),
                                               h.Get_remote_size(), h.allgather(rank)])
    # Create: each group's last rank (Open MPI 4.1's intercommunicator of a group in another
    # order than the local group's never completes its collectives)
    c = inter.Create(inter.Get_group().Incl([n - 1]))
    say("Create", c == MPI.COMM_NULL or [c.Get_rank(), c.Get_size(), c.Get_remote_size(),
                                         c.allgather(rank), c.Is_inter()])
    pairs.Free()
    for x in (s, h, c, inter, local):
        if x != MPI.COMM_NULL:
            x.Free()


for prog in (alltoallw, intercomm, intercomm_more):
    prog()
if rank == 0:
    print("ALL OK", size, flush=True)
