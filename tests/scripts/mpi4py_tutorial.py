"""The classic mpi4py tutorial programs, as written for mpi4py: run with
``mpirun -n 3 python mpi4py_tutorial.py``, and with its first import changed to
``from collectives import MPI`` under ``meshrun -n 3`` (tests/test_collectives_mpi.py
compares the two outputs byte for byte). Rank 0 prints; every rank checks."""
from mpi4py import MPI
import threading
import numpy as np

# threads touching COMM_WORLD first, at once (mpi4py's demo/threads/sendrecv.py)
seen = []
first = [threading.Thread(target=lambda: seen.append(MPI.COMM_WORLD.Get_size())) for _ in "abc"]
for t in first:
    t.start()
for t in first:
    t.join()
assert len(seen) == 3, seen
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def say(*args):
    if rank == 0:
        print(*args, flush=True)


def pi_by_reduce():
    n = 1000
    h = 1.0 / n
    s = 0.0
    for i in range(rank + 1, n + 1, size):
        x = h * (i - 0.5)
        s += 4.0 / (1.0 + x * x)
    pi = comm.reduce(h * s, op=MPI.SUM, root=0)
    N = np.array(n if rank == 0 else 0, "i")
    comm.Bcast([N, MPI.INT], root=0)
    mypi = np.array(h * s, "d")
    PI = np.array(0.0, "d")
    comm.Reduce([mypi, MPI.DOUBLE], [PI, MPI.DOUBLE], op=MPI.SUM, root=0)
    if rank == 0:
        say("pi", int(N), "%.10f" % pi, "%.10f" % PI, abs(pi - np.pi) < 1e-5)


def matvec():
    n = 2 * size
    A = np.arange(n * n, dtype="d").reshape(n, n) if rank == 0 else None
    rows = np.empty((2, n), "d")
    comm.Scatter(A, rows, root=0)
    x = np.arange(n, dtype="d") if rank == 0 else np.empty(n, "d")
    comm.Bcast(x, root=0)
    y = np.empty(n, "d") if rank == 0 else None
    comm.Gather(rows @ x, y, root=0)
    whole = np.empty(n, "d")
    comm.Allgather(rows @ x, whole)
    say("matvec", y, np.array_equal(whole, y) if rank == 0 else None)


def sample_sort():
    rng = np.random.default_rng(7 + rank)
    mine = rng.integers(0, 1000, 10 + 3 * rank).astype("i")
    splitters = np.array([333, 666][:size - 1] + [1000] * max(0, size - 3), "i")
    dest = np.searchsorted(splitters, mine, side="right")
    order = np.argsort(dest, kind="stable")
    send = mine[order]
    scounts = np.bincount(dest, minlength=size).astype("i")
    rcounts = np.empty(size, "i")
    comm.Alltoall(scounts, rcounts)
    sdispls = np.concatenate([[0], np.cumsum(scounts)[:-1]]).astype("i")
    rdispls = np.concatenate([[0], np.cumsum(rcounts)[:-1]]).astype("i")
    got = np.empty(int(rcounts.sum()), "i")
    comm.Alltoallv([send, scounts, sdispls, MPI.INT], [got, rcounts, rdispls, MPI.INT])
    got.sort()
    sizes = comm.gather(len(got), root=0)
    out = None
    if rank == 0:
        out = np.empty(sum(sizes), "i")
        displs = [sum(sizes[:i]) for i in range(size)]
        comm.Gatherv(got, [out, sizes, displs, MPI.INT], root=0)
    else:
        comm.Gatherv(got, None, root=0)
    every = comm.gather(mine.tolist(), root=0)
    if rank == 0:
        say("sort", sizes, out[:8], bool(np.array_equal(out, np.sort(sum(every, [])))))


def halo():
    dims = MPI.Compute_dims(size, 2)
    cart = comm.Create_cart(dims, periods=[True, False], reorder=False)
    coords = cart.Get_coords(cart.Get_rank())
    u = np.full((3, 4), float(cart.Get_rank()))
    left = np.zeros(3)
    src, dst = cart.Shift(1, 1)
    edge = np.ascontiguousarray(u[:, -1])
    cart.Sendrecv(edge, dest=dst, sendtag=1, recvbuf=left, source=src, recvtag=1)
    up, down = cart.Shift(0, 1)
    row = np.empty(4)
    cart.Sendrecv(u[-1].copy(), dest=down, recvbuf=row, source=up)
    total = cart.allreduce(float(left.sum() + row.sum()), op=MPI.SUM)
    tab = comm.gather([dims, coords, list(cart.Shift(0, 1)), list(cart.Shift(1, 1)),
                       cart.Get_cart_rank(coords)], root=0)
    say("halo", tab, total, cart.Get_topo()[0] if rank == 0 else None)
    cart.Free()


def task_farm():
    tasks = list(range(1, 8))
    if rank == 0:
        results, st, busy = [], MPI.Status(), 0
        for w in range(1, size):
            t = tasks.pop() if tasks else None
            comm.send(t, dest=w, tag=1)
            busy += t is not None
        while busy:
            results.append(comm.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=st))
            t = tasks.pop() if tasks else None
            comm.send(t, dest=st.Get_source(), tag=1)
            busy += (t is not None) - 1
        say("farm", sorted(results))
    else:
        while (t := comm.recv(source=0, tag=1)) is not None:
            comm.send(t * t, dest=0, tag=2)


def nonblocking():
    a = np.arange(5, dtype="d") * (rank + 1)
    b = np.empty_like(a)
    req = comm.Iallreduce(a, b, op=MPI.SUM)
    req.Wait()
    c = np.full(3, float(rank))
    comm.Iallreduce(MPI.IN_PLACE, c, op=MPI.MAX).Wait()
    d = np.arange(4, dtype="i") if rank == 0 else np.zeros(4, "i")
    comm.Ibcast(d, root=0).Wait()
    right, left = (rank + 1) % size, (rank - 1) % size
    out = np.full(2, rank, "i")
    inn = np.empty(2, "i")
    reqs = [comm.Irecv(inn, source=left, tag=4), comm.Isend(out, dest=right, tag=4)]
    MPI.Request.Waitall(reqs)
    ring = comm.gather(inn.tolist(), root=0)
    r = [comm.isend(rank, dest=right, tag=5), comm.irecv(source=left, tag=5)]
    got = MPI.Request.waitall(r)
    every = comm.gather(got[1], root=0)
    rd = np.zeros(2, "i") if rank == 1 else None
    ig = np.zeros(2 * size, "i") if rank == 0 else None
    isc = np.empty(2, "i")
    iag = np.empty(size, "d")
    iat = np.empty(size, "i")
    sends = [np.array([rank, 1], "i"), np.array([rank, -rank], "i"),
             np.arange(2 * size, dtype="i"), np.array([rank / 2]),
             np.arange(size, dtype="i") * (rank + 1)]      # (in use until the waits)
    reqs = [comm.Ireduce(sends[0], rd, op=MPI.SUM, root=1),
            comm.Igather(sends[1], ig, root=0),
            comm.Iscatter(sends[2] if rank == 0 else None, isc, root=0),
            comm.Iallgather(sends[3], iag),
            comm.Ialltoall(sends[4], iat)]
    while not MPI.Request.Testall(reqs):
        pass
    tab = comm.gather([None if rd is None else rd.tolist(), isc.tolist(), iag.tolist(),
                       iat.tolist()], root=0)
    say("nonblocking", b, c, d, ring, every, MPI.Request.Waitany([MPI.REQUEST_NULL]) ==
        MPI.UNDEFINED, ig, tab)


def split():
    sub = comm.Split(color=rank % 2, key=-rank)
    total = sub.allreduce(rank, op=MPI.SUM)
    none = comm.Split(MPI.UNDEFINED if rank == 0 else 1, key=rank)
    tab = comm.gather([sub.Get_rank(), sub.Get_size(), total,
                       none == MPI.COMM_NULL], root=0)
    dup = comm.Dup()
    say("split", tab, dup.allreduce(1, op=MPI.SUM))
    dup.Free()


def objects():
    data = comm.bcast({"key": [1, 2.5, "x"], "n": 7} if rank == 0 else None, root=0)
    part = comm.scatter([[i, i * i] for i in range(size)] if rank == 0 else None, root=0)
    every = comm.allgather(rank * 10)
    swapped = comm.alltoall([rank * 100 + j for j in range(size)])
    gathered = comm.gather(swapped, root=0)
    mx = comm.allreduce((float(rank % 2), rank), op=MPI.MAXLOC)
    mn = comm.reduce((rank + 3, rank), op=MPI.MINLOC, root=0)
    flags = [comm.allreduce(rank > 0, op=o) for o in (MPI.LAND, MPI.LOR, MPI.LXOR)]
    bits = [comm.allreduce(rank + 5, op=o) for o in (MPI.BAND, MPI.BOR, MPI.BXOR)]
    ext = [comm.allreduce(rank - 1, op=o) for o in (MPI.MIN, MPI.MAX, MPI.PROD)]
    sc = comm.scan(rank + 1, op=MPI.SUM)
    ex = comm.exscan(rank + 1, op=MPI.SUM)
    lists = comm.allreduce([rank], op=MPI.SUM)
    arr = comm.allreduce(np.arange(3) * rank, op=MPI.SUM)
    scalar = comm.allreduce(np.float64(rank) / 4, op=MPI.SUM)
    right, left = (rank + 1) % size, (rank - 1) % size
    ring = comm.sendrecv({"from": rank}, dest=right, source=left)
    tab = comm.gather([part, sc, ex, ring], root=0)
    say("objects", data, every, gathered, mx, mn, flags, bits, ext, lists, arr, scalar, tab)
    # tuples come back as tuples: a user op's fold, nested ones, dict keys, a MAXLOC pair
    cat = MPI.Op.Create(lambda x, y, dt: x + y, commute=False)
    folds = [comm.allreduce((rank,), op=cat), comm.scan((rank, "s"), op=cat),
             comm.reduce([(rank, (rank,))], op=cat, root=0)]
    keyed = comm.allgather({(rank, "k"): (rank, [()])})
    back = comm.sendrecv(((rank,), [rank]), dest=right, source=left)
    say("tuples", folds, keyed, back, mx == (1.0, 1), comm.bcast((1, (2,)), root=0))


def buffers():
    right, left = (rank + 1) % size, (rank - 1) % size
    # a receive buffer longer than the message, Probe and Get_count
    comm.Send([np.arange(rank + 2, dtype="i"), MPI.INT], dest=right, tag=7)
    st = MPI.Status()
    comm.Probe(source=MPI.ANY_SOURCE, tag=7, status=st)
    n = st.Get_count(MPI.INT)
    buf = np.full(10, -1, "i")
    st2 = MPI.Status()
    comm.Recv([buf, MPI.INT], source=MPI.ANY_SOURCE, tag=7, status=st2)
    probed = [n, st.Get_source(), st2.Get_tag(), st2.Get_count(MPI.INT), buf.tolist()]
    # a count and a typecode in the spec, Ssend, Sendrecv_replace
    x = np.zeros(6, "d")
    if rank == 0:
        comm.Ssend([np.arange(6, dtype="d"), 3, MPI.DOUBLE], dest=1, tag=8)
    elif rank == 1:
        comm.Recv([x, 3, "d"], source=0, tag=8)
    y = np.full(2, float(rank))
    comm.Sendrecv_replace(y, dest=right, sendtag=11, source=left, recvtag=11)
    # matched probe
    comm.Isend(np.array([rank, rank], "l"), dest=right, tag=9).Wait()
    msg = comm.Mprobe(source=left, tag=9)
    z = np.empty(2, "l")
    msg.Recv(z)
    # persistent
    sb, rb = np.zeros(1, "i"), np.zeros(1, "i")
    reqs = [comm.Send_init(sb, dest=right, tag=10), comm.Recv_init(rb, source=left, tag=10)]
    acc = 0
    for it in range(3):
        sb[0] = rank * 10 + it
        MPI.Prequest.Startall(reqs)
        MPI.Request.Waitall(reqs)
        acc += int(rb[0])
    # a cancelled receive
    c = comm.Irecv(np.empty(1, "i"), source=left, tag=99)
    c.Cancel()
    cst = MPI.Status()
    c.Wait(cst)
    # the null peer, a fresh status, the largest tag
    pst = MPI.Status()
    comm.Recv(np.empty(1), source=MPI.PROC_NULL, status=pst)
    null = [pst.Get_source(), pst.Get_tag(), pst.Get_count(), MPI.Status().Get_tag(),
            comm.Get_attr(MPI.TAG_UB) >= 32767, MPI.ANY_TAG, MPI.ANY_SOURCE, MPI.UNDEFINED]
    tab = comm.gather([probed, x.tolist(), y.tolist(), z.tolist(), acc, cst.Is_cancelled(),
                       null], root=0)
    say("buffers", tab)


def collectives():
    r = rank
    a = np.arange(4, dtype="i") + r
    red = np.zeros(4, "i")
    comm.Allreduce(a, red, op=MPI.SUM)
    mx = a.copy()
    comm.Allreduce(MPI.IN_PLACE, mx, op=MPI.MAX)
    p = np.zeros(4, "i")
    comm.Reduce(a, p, op=MPI.PROD, root=size - 1)
    g = np.zeros(size * 2, "d") if r == 0 else None
    comm.Gather(np.full(2, r, "d"), g, root=0)
    sc = np.empty(2, "d")
    comm.Scatter(np.arange(2 * size, dtype="d") if r == 0 else None, sc, root=0)
    ag = np.zeros(size, "i")
    ag[r] = r * 3
    comm.Allgather(MPI.IN_PLACE, ag)
    at = np.empty(size, "i")
    comm.Alltoall(np.arange(size, dtype="i") + 10 * r, at)
    counts = [i + 1 for i in range(size)]
    displs = [sum(counts[:i]) for i in range(size)]
    agv = np.zeros(sum(counts), "d")
    comm.Allgatherv(np.full(r + 1, float(r)), [agv, counts, displs, MPI.DOUBLE])
    sv = np.empty(r + 1, "d")
    src = np.arange(sum(counts), dtype="d") if r == 0 else None
    comm.Scatterv([src, counts, displs, MPI.DOUBLE] if r == 0 else None, sv, root=0)
    rsb = np.empty(2, "i")
    comm.Reduce_scatter_block(np.arange(2 * size, dtype="i"), rsb, op=MPI.SUM)
    rs = np.empty(counts[r], "i")
    comm.Reduce_scatter(np.ones(sum(counts), "i"), rs, recvcounts=counts, op=MPI.SUM)
    s = np.empty(2, "i")
    comm.Scan(np.array([r, 1], "i"), s, op=MPI.SUM)
    e = np.full(2, -1, "i")
    comm.Exscan(np.array([r, 1], "i"), e, op=MPI.SUM)
    double_int = np.dtype([("v", "f8"), ("i", "i4")], align=True)
    loc = np.zeros(1, dtype=double_int)
    pair = np.array([(float(r % 2), r)], dtype=double_int)
    comm.Allreduce([pair, MPI.DOUBLE_INT], [loc, MPI.DOUBLE_INT], op=MPI.MAXLOC)

    def shift_add(inbuf, inoutbuf, datatype):
        i = np.frombuffer(inbuf, dtype="i")
        io = np.frombuffer(inoutbuf, dtype="i")
        io[:] = i + io

    op = MPI.Op.Create(shift_add, commute=True)
    u = np.zeros(2, "i")
    comm.Allreduce(np.array([r, 2 * r], "i"), u, op=op)
    op.Free()
    comm.Barrier()
    tab = comm.gather([p.tolist(), sc.tolist(), sv.tolist(), rsb.tolist(), rs.tolist(),
                       s.tolist(), e.tolist()], root=0)
    say("collectives", red, mx, g, ag, at, agv, tab, loc["v"], loc["i"], u,
        type(MPI.Wtime()).__name__, MPI.DOUBLE.Get_size(), MPI.INT.Get_size(),
        MPI.Is_initialized())
    # their nonblocking forms, two in flight at once, waited for in the reverse order
    igv = np.full(sum(counts), -1, "i") if r == 0 else None
    isv = np.empty(r + 1, "d")
    first = comm.Igatherv(np.full(r + 1, r, "i"),
                          [igv, counts, displs, MPI.INT] if r == 0 else None, root=0)
    second = comm.Iscatterv([src, counts, displs, MPI.DOUBLE] if r == 0 else None, isv, root=0)
    second.Wait()
    first.Wait()
    iag = np.zeros(sum(counts), "d")
    iag[displs[r]:displs[r] + r + 1] = r + 0.5
    comm.Iallgatherv(MPI.IN_PLACE, [iag, counts, displs, MPI.DOUBLE]).Wait()
    iat = np.empty((r + 1) * size, "i")
    comm.Ialltoallv([np.arange(sum(counts), dtype="i") + 100 * r, counts, displs, MPI.INT],
                    [iat, [r + 1] * size, [i * (r + 1) for i in range(size)],
                     MPI.INT]).Wait()
    irsb = np.arange(2 * size, dtype="i") * (r + 1)
    irs = np.empty(counts[r], "i")
    isc = np.array([r + 1, 2], "i")
    iex = np.full(2, -1, "i")
    reqs = [comm.Ireduce_scatter_block(MPI.IN_PLACE, irsb, op=MPI.SUM),
            comm.Ireduce_scatter(np.arange(sum(counts), dtype="i"), irs, recvcounts=counts,
                                 op=MPI.MAX),
            comm.Iscan(MPI.IN_PLACE, isc, op=MPI.PROD),
            comm.Iexscan(np.array([r, 1], "i"), iex, op=MPI.SUM)]
    MPI.Request.Waitall(reqs[::-1])
    tab = comm.gather([isv.tolist(), iat.tolist(), irsb[:2].tolist(), irs.tolist(),
                       isc.tolist(), iex.tolist() if r else None], root=0)
    say("nonblocking v-collectives", igv, iag, tab)


def one_sided():
    # a fence epoch of puts: every rank writes its rank into slot `rank` of every rank's array
    a = np.full(size, -1, "i")
    win = MPI.Win.Create(a, disp_unit=a.itemsize, comm=comm)
    mine = np.array([rank], "i")          # (an origin buffer lives until the epoch's end)
    win.Fence()
    for t in range(size):
        win.Put(mine, t, target=rank)
    win.Fence()
    seen = a.copy()
    comm.Barrier()                        # (read before the next epoch's accumulates come)
    # accumulates from every rank into rank 0's array, then a get of the next rank's
    ones = np.full(size, rank + 1, "i")
    win.Accumulate([ones, MPI.INT], 0, op=MPI.SUM)
    win.Fence()
    nxt = np.empty(size - 1, "i")
    win.Get([nxt, MPI.INT], (rank + 1) % size, target=(1, size - 1, MPI.INT))
    win.Fence()
    win.Free()
    # passive target: a counter on rank 0, tickets drawn by Fetch_and_op under Lock
    cw = MPI.Win.Allocate(2 * 4 if rank == 0 else 0, disp_unit=4, comm=comm)
    if rank == 0:
        np.frombuffer(cw.tomemory(), "i")[:] = 0
    comm.Barrier()
    one, got, tickets = np.ones(1, "i"), np.empty(1, "i"), []
    for _ in range(3):
        cw.Lock(0, MPI.LOCK_EXCLUSIVE)
        cw.Fetch_and_op(one, got, 0, 0, op=MPI.SUM)
        cw.Unlock(0)
        tickets.append(int(got[0]))
    everyone = comm.allgather(tickets)
    cw.Lock(0, MPI.LOCK_SHARED)
    cw.Fetch_and_op(one, got, 0, 0, op=MPI.NO_OP)
    cw.Unlock(0)
    drawn = int(got[0])
    # a spin lock by Compare_and_swap on rank 0's slot 1 guarding a read-modify-write of a
    # value in rank 1's window (Get, Flush, Put, Flush), every rank in one Lock_all epoch
    data = np.zeros(1, "i")
    dw = MPI.Win.Create(data, disp_unit=4, comm=comm)
    comm.Barrier()
    owner = 1 % size
    free, taken, old, val = np.zeros(1, "i"), np.ones(1, "i"), np.empty(1, "i"), np.empty(1, "i")
    spins = 0
    cw.Lock_all()
    dw.Lock_all()
    for _ in range(2):
        while True:
            cw.Compare_and_swap(taken, free, old, 0, 1)
            cw.Flush(0)
            if old[0] == 0:
                break
            spins += 1
        dw.Get(val, owner, target=0)
        dw.Flush(owner)
        val[0] += rank + 1
        dw.Put(val, owner, target=0)
        dw.Flush(owner)
        cw.Compare_and_swap(free, taken, old, 0, 1)
        cw.Flush(0)
        assert old[0] == 1, old
    dw.Unlock_all()
    cw.Unlock_all()
    comm.Barrier()
    total = comm.bcast(int(data[0]) if rank == owner else None, root=owner)
    dw.Free()
    cw.Free()
    assert total == size * (size + 1), total
    say("one_sided", seen, a, nxt, sorted(sum(everyone, [])) == list(range(3 * size)),
        [t == sorted(t) for t in everyone], drawn, total, MPI.LOCK_EXCLUSIVE, MPI.LOCK_SHARED)


def groups():
    # groups of the world's processes, communicators made of them
    world = comm.Get_group()
    last = size - 1
    rev = world.Range_incl([(last, 0, -1)])
    odd, even = world.Range_incl([(1, last, 2)]), world.Excl(list(range(1, size, 2)))
    top = world.Incl([last, 0])
    both = MPI.Group.Union(top, odd)
    table = [rev.Translate_ranks(), rev.Get_rank(), odd.Get_size(), odd.Get_rank(),
             even.Translate_ranks(None, world), top.Translate_ranks(list(range(2)), rev),
             both.Translate_ranks(), MPI.Group.Intersection(top, odd).Translate_ranks(),
             MPI.Group.Difference(world, top).Translate_ranks(),
             world.Range_excl([(0, last, 2)]).size,
             [rev.Compare(world), world.Compare(comm.group), top.Compare(world)],
             world.Incl([]).Compare(MPI.GROUP_EMPTY), MPI.GROUP_EMPTY.Get_size(),
             MPI.GROUP_EMPTY.Get_rank(), top.Get_rank()]
    made = comm.Create(top)
    sub = [made == MPI.COMM_NULL]
    if made != MPI.COMM_NULL:
        sub += [made.Get_rank(), made.Get_size(), made.allreduce(rank, op=MPI.SUM),
                made.Get_group().Translate_ranks(None, world)]
    mine = comm.Create_group(even if rank % 2 == 0 else odd, tag=7)
    total = mine.allreduce(rank, op=MPI.SUM)
    nul = comm.Create_group(MPI.GROUP_EMPTY) == MPI.COMM_NULL
    dup, split = comm.Dup(), comm.Split(0, key=-rank)
    cmp = [comm.Compare(comm), comm.Compare(dup), comm.Compare(split),
           comm.Compare(MPI.COMM_SELF) if size > 1 else None]
    top.Free()
    tab = comm.gather([sub, mine.Get_rank(), mine.Get_size(), total, nul, cmp], root=0)
    say("groups", table, tab, top == MPI.GROUP_NULL, MPI.UNDEFINED)
    mine.Free()
    dup.Free()


class _EachStart:
    """A persistent collective's stand-in where the MPI library lacks
    MPI-4's (Open MPI 4.1, under mpi4py 4: NotImplementedError): each Start
    makes the blocking call."""

    def __init__(self, call, args):
        self.call, self.args = call, args

    def Start(self):
        self.call(*self.args)

    def Wait(self):
        return True


def started(name, *args):
    try:
        return getattr(comm, name + "_init")(*args)
    except NotImplementedError:
        return _EachStart(getattr(comm, name), args)


def persistent_uneven():
    # MPI-4's persistent collectives of uneven blocks: set up once, started each iteration,
    # each start reading the send buffers as they are then; gaps between the blocks kept
    counts = [i + 1 for i in range(size)]
    displs = [sum(counts[:i]) + i for i in range(size)]
    total = displs[-1] + counts[-1] + 1
    mine, agv = np.zeros(rank + 1), np.full(total, -1.0)
    gs = np.zeros(rank + 1, "i")
    a2s, a2r = np.zeros(sum(counts), "i"), np.full(size * (rank + 2), -1, "i")
    gv = np.full(total, -1, "i") if rank == 0 else None
    src = np.zeros(total) if rank == size - 1 else None
    sv = np.zeros(rank + 1)
    rs_in, rs = np.zeros(sum(counts), "i"), np.zeros(counts[rank], "i")
    reqs = [started("Allgatherv", mine, [agv, counts, displs, MPI.DOUBLE]),
            started("Alltoallv", [a2s, counts, MPI.INT],
                    [a2r, [rank + 1] * size, [j * (rank + 2) for j in range(size)], MPI.INT]),
            started("Gatherv", gs, [gv, counts, displs, MPI.INT] if rank == 0 else None, 0),
            started("Scatterv", [src, counts, displs, MPI.DOUBLE] if src is not None else None, sv,
                    size - 1),
            started("Reduce_scatter", rs_in, rs, counts, MPI.SUM)]
    seen = []
    for it in range(2):
        mine[:], gs[:] = rank + it, 2 * rank + it
        a2s[:] = np.arange(sum(counts)) + 100 * rank + it
        if src is not None:
            src[:] = np.arange(total) + it
        rs_in[:] = np.arange(sum(counts)) * (rank + 1) + it
        for p in reqs:
            p.Start()
        for p in reqs:
            p.Wait()
        seen.append(comm.gather([agv.tolist(), a2r.tolist(), sv.tolist(), rs.tolist()], root=0))
    say("persistent_uneven", seen, gv)


def neighbors():
    # MPI-3's neighborhood collectives on Cartesian grids: for each dimension, Shift(d, 1)'s
    # source then destination; a non-periodic edge's block untouched (None for objects); a
    # periodic dimension of 1 or 2 makes one rank a neighbour twice (the blocks kept apart)
    seen = []
    for dims, periods in (([size], [True]), ([size], [False]), ([1, size], [True, False]),
                          ([2], [True]), ([size, 1], [False, True])):
        cart = comm.Create_cart(dims, periods=periods, reorder=False)
        if cart == MPI.COMM_NULL:
            seen.append(None)
            continue
        r, n = cart.Get_rank(), 2 * len(dims)
        ag = np.full(2 * n, -1.0)
        cart.Neighbor_allgather(np.array([r, r + 0.5]), ag)
        send = np.arange(3 * n, dtype="i") + 100 * r
        a2a, ia2a = np.full(3 * n, -1, "i"), np.full(3 * n, -1, "i")
        cart.Neighbor_alltoall(send, a2a)
        iag = np.full(n, -1, "i")
        reqs = [cart.Ineighbor_allgather(np.array([r], "i"), iag)]
        peers = [p for d in range(len(dims)) for p in cart.Shift(d, 1) if p != MPI.PROC_NULL]
        once = len(set(peers)) == len(peers)    # (Open MPI 4.1's Ineighbor_alltoall swaps
        if once:                                # the two blocks of a neighbour twice)
            reqs.append(cart.Ineighbor_alltoall(send, ia2a))
        MPI.Request.Waitall(reqs)
        assert not once or (ia2a == a2a).all(), (ia2a, a2a)
        objs = cart.neighbor_allgather({"r": r, "c": cart.Get_coords(r)})
        pairs = cart.neighbor_alltoall([[r, i] for i in range(n)])
        # the v-forms: a block a neighbour, gaps between them kept
        nbrs = [p for d in range(len(dims)) for p in cart.Shift(d, 1)]
        counts = [1 if p == MPI.PROC_NULL else p + 1 for p in nbrs]
        displs = [sum(counts[:i]) + i for i in range(n)]
        agv, iagv = np.full(sum(counts) + n, -1.0), np.full(sum(counts) + n, -1.0)
        req = cart.Ineighbor_allgatherv(np.full(r + 1, r + 0.25), [iagv, counts, displs,
                                                                   MPI.DOUBLE])
        cart.Neighbor_allgatherv(np.full(r + 1, r + 0.25), [agv, counts, displs, MPI.DOUBLE])
        req.Wait()
        assert (agv == iagv).all(), (agv, iagv)
        sc, rc = [i + 1 for i in range(n)], [(i ^ 1) + 1 for i in range(n)]
        a2av = np.full(sum(rc) + n, -1, "i")
        cart.Neighbor_alltoallv([np.arange(sum(sc), dtype="i") + 100 * r, sc, None, MPI.INT],
                                [a2av, rc, [sum(rc[:i]) + i for i in range(n)], MPI.INT])
        seen.append([ag.tolist(), a2a.tolist(), iag.tolist(), objs, pairs, agv.tolist(),
                     a2av.tolist()])
        cart.Free()
    say("neighbors", comm.gather(seen, root=0))


for prog in (pi_by_reduce, matvec, sample_sort, halo, task_farm, nonblocking, split,
             objects, buffers, collectives, one_sided, groups, persistent_uneven, neighbors):
    prog()
say("ALL OK", size)
