"""MPI's graph topologies and neighborhood collectives, as written for
mpi4py: run with ``mpirun -n 4 python mpi4py_topologies.py``, and with its
first import changed to ``from collectives import MPI`` under ``meshrun -n
4`` (tests/test_collectives_mpi.py compares the outputs byte for byte, at 3
and 4 ranks). Rank 0 prints; every rank checks."""
from mpi4py import MPI
import numpy as np

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def say(*args):
    if rank == 0:
        print(*args, flush=True)


class _EachStart:
    """A persistent collective's stand-in where the MPI library lacks
    MPI-4's (Open MPI 4.1: NotImplementedError): each Start makes the
    blocking call."""

    def __init__(self, call, args):
        self.call, self.args = call, args

    def Start(self):
        self.call(*self.args)

    def Wait(self):
        return True


def started(topo, name, *args):
    try:
        return getattr(topo, name + "_init")(*args)
    except NotImplementedError:
        return _EachStart(getattr(topo, name), args)


def queries(t):
    """What every topology says of itself (mpi4py's Topocomm properties)."""
    return [type(t).__name__, t.Get_topology(), t.topology, t.is_topo, t.degrees, t.indegree,
            t.outdegree, t.inedges, t.outedges, t.inoutedges]


def exchanges(t, persistent=True):
    """Every neighborhood collective on topology ``t``, blocking, nonblocking
    and persistent (two starts, the send buffers rewritten between), their
    results by rank."""
    r = t.Get_rank()
    nin, nout = t.indegree, t.outdegree
    seen = []
    ag = np.full(2 * nin, -1.0)
    t.Neighbor_allgather(np.array([r, r + 0.5]), ag)
    send = np.arange(2 * nout, dtype="i") + 100 * r
    a2a, ia2a = np.full(2 * nin, -1, "i"), np.full(2 * nin, -1, "i")
    t.Neighbor_alltoall(send, a2a)
    iag = np.full(nin, -1, "i")
    reqs = [t.Ineighbor_allgather(np.array([r], "i"), iag),
            t.Ineighbor_alltoall(send, ia2a)]
    MPI.Request.Waitall(reqs)
    assert (ia2a == a2a).all(), (ia2a, a2a)
    seen += [ag.tolist(), a2a.tolist(), iag.tolist()]
    # the v-forms: a block a neighbour, gaps between them kept
    counts = [1 + s % 3 if s != MPI.PROC_NULL else 1 for s in t.inedges]
    displs = [sum(counts[:i]) + i for i in range(nin)]
    agv, iagv = np.full(sum(counts) + nin + 1, -1.0), np.full(sum(counts) + nin + 1, -1.0)
    req = t.Ineighbor_allgatherv(np.full(1 + r % 3, r + 0.25), [iagv, counts, displs,
                                                                 MPI.DOUBLE])
    t.Neighbor_allgatherv(np.full(1 + r % 3, r + 0.25), [agv, counts, displs, MPI.DOUBLE])
    req.Wait()
    assert (agv == iagv).all(), (agv, iagv)
    sc = [2] * nout
    rc = [2] * nin
    a2av = np.full(3 * nin + 1, -1, "i")
    t.Neighbor_alltoallv([np.arange(2 * nout, dtype="i") + 10 * r, sc, None, MPI.INT],
                         [a2av, rc, [3 * i for i in range(nin)], MPI.INT])
    seen += [agv.tolist(), a2av.tolist()]
    # alltoallw: byte displacements, a datatype a neighbour (a vector's strided receive)
    vec = MPI.INT.Create_vector(2, 1, 2).Commit()
    wsend = np.arange(3 * max(nout, 1), dtype="i") + 1000 * r
    sd = [12 * j for j in range(nout)]
    rt = [MPI.INT if i % 2 else vec for i in range(nin)]
    rcw = [2 if i % 2 else 1 for i in range(nin)]
    rd = [16 * i + 4 for i in range(nin)]
    wrecv, iwrecv = np.full(4 * nin + 2, -1, "i"), np.full(4 * nin + 2, -1, "i")
    t.Neighbor_alltoallw([wsend, [2] * nout, sd, [MPI.INT] * nout], [wrecv, rcw, rd, rt])
    t.Ineighbor_alltoallw([wsend, ([2] * nout, sd), [MPI.INT] * nout],
                          [iwrecv, (rcw, rd), rt]).Wait()
    assert (wrecv == iwrecv).all(), (wrecv, iwrecv)
    seen += [wrecv.tolist(), t.neighbor_allgather({"r": r, "t": (r, "x")}),
             t.neighbor_alltoall([[r, j] for j in range(nout)])]
    if persistent:      # (MPI-4's: set up once, started twice)
        pag, pa2a = np.full(nin, -1, "i"), np.full(nin, -1, "i")
        pw = np.full(4 * nin + 2, -1, "i")
        mine, blocks = np.zeros(1, "i"), np.zeros(nout, "i")
        pagv = np.full(sum(counts) + nin + 1, -1.0)
        pv, pa2av = np.zeros(1 + r % 3), np.full(3 * nin + 1, -1, "i")
        a2avs = np.zeros(2 * nout, "i")
        reqs = [started(t, "Neighbor_allgather", mine, pag),
                started(t, "Neighbor_alltoall", blocks, pa2a),
                started(t, "Neighbor_allgatherv", pv, [pagv, counts, displs, MPI.DOUBLE]),
                started(t, "Neighbor_alltoallv", [a2avs, sc, None, MPI.INT],
                        [pa2av, rc, [3 * i for i in range(nin)], MPI.INT]),
                started(t, "Neighbor_alltoallw", [wsend, [2] * nout, sd, [MPI.INT] * nout],
                        [pw, rcw, rd, rt])]
        for it in range(2):
            mine[:], blocks[:] = 10 * r + it, np.arange(nout) + 100 * r + it
            pv[:], a2avs[:] = r + it, np.arange(2 * nout) + 10 * r + it
            wsend[:] = np.arange(len(wsend)) + 1000 * r + it
            for p in reqs:
                p.Start()
            for p in reqs:
                p.Wait()
            seen.append([pag.tolist(), pa2a.tolist(), pagv.tolist(), pa2av.tolist(),
                         pw.tolist()])
    vec.Free()
    return seen


def dist_graphs():
    # adjacent: the first size - 1 ranks a ring whose every edge is there twice, each a
    # self-loop too; the last rank no neighbour at all
    last = size - 1
    srcs, dsts = [], []
    if rank != last:
        p, q = (rank - 1) % last, (rank + 1) % last
        srcs, dsts = [p, rank, p], [q, q, rank]
    dg = comm.Create_dist_graph_adjacent(srcs, dsts)
    ws = [1, 2, 3][:len(srcs)]
    wg = comm.Create_dist_graph_adjacent(srcs, dsts, ws, [3, 1, 2][:len(dsts)] if dsts else [])
    empty = comm.Create_dist_graph_adjacent([], [], MPI.WEIGHTS_EMPTY, MPI.WEIGHTS_EMPTY)
    lone = comm.Create_dist_graph_adjacent([], [])
    say("dist_graph_adjacent", comm.gather(
        [queries(dg), dg.Get_dist_neighbors_count(), dg.Get_dist_neighbors(),
         wg.Get_dist_neighbors_count(), wg.Get_dist_neighbors(),
         empty.Get_dist_neighbors_count(), empty.Get_dist_neighbors(),
         lone.Get_dist_neighbors_count(), lone.Get_dist_neighbors(),
         dg.Compare(comm) == MPI.CONGRUENT], root=0))
    say("dist_graph_adjacent exchanges", comm.gather(exchanges(dg), root=0))
    say("dist_graph_adjacent weighted", comm.gather(exchanges(wg, False), root=0))
    # the general form, the whole graph named by rank 0 (whose lists each rank receives
    # in order): duplicate edges, self-loops, weights, the last rank out of it
    if rank == 0:
        nodes = list(range(last))
        degrees = [2 + s % 2 for s in nodes]
        targets = [t for s in nodes for t in ([(s + 1) % last, s, (s + 1) % last][:2 + s % 2])]
        g1 = comm.Create_dist_graph(nodes, degrees, targets, [7 + i for i in range(len(targets))])
    else:
        g1 = comm.Create_dist_graph([], [], [], [])
    say("dist_graph one naming", comm.gather(
        [queries(g1), g1.Get_dist_neighbors_count(), g1.Get_dist_neighbors()], root=0))
    say("dist_graph one naming exchanges", comm.gather(exchanges(g1), root=0))
    # each rank naming its own out-edges (in-edges arrive from several ranks, in an order
    # MPI leaves open: sorted here), unweighted
    g2 = comm.Create_dist_graph([rank], [2], [(rank + 1) % size, (rank + 2) % size])
    s, d, w = g2.Get_dist_neighbors()
    got = g2.neighbor_allgather(rank * rank)
    vals = np.full(g2.indegree, -1, "i")
    g2.Neighbor_allgather(np.array([rank], "i"), vals)
    say("dist_graph each naming", comm.gather(
        [g2.Get_dist_neighbors_count(), sorted(s), d, w, sorted(got), sorted(vals.tolist()),
         sorted(g2.inedges) == sorted(vals.tolist())], root=0))
    for t in (dg, wg, empty, lone, g1, g2):
        t.Free()


def graphs():
    # MPI_Graph_create: rank 0 twice to rank 1 and once to itself, rank 1 to rank 2, rank 3
    # (at 4 ranks) nothing; then a graph of size - 1 nodes (COMM_NULL on the last rank)
    index = [3, 6, 7] + [7] * (size - 3)
    edges = [1, 1, 0, 0, 0, 2, 1]
    g = comm.Create_graph(index, edges)
    say("graph", comm.gather(
        [queries(g), g.Get_dims(), g.dims, g.Get_topo(), g.topo, g.nnodes, g.nedges, g.index,
         g.edges, g.nneighbors, g.neighbors, [g.Get_neighbors_count(i) for i in range(size)],
         [g.Get_neighbors(i) for i in range(size)]], root=0))
    say("graph exchanges", comm.gather(exchanges(g), root=0))
    ring = comm.Create_graph([2 * (i + 1) for i in range(size - 1)],
                             [x for i in range(size - 1) for x in ((i - 1) % (size - 1),
                                                                    (i + 1) % (size - 1))])
    say("graph of fewer", comm.gather(
        [comm.Graph_map([1] * (size - 1), [0]) if rank < size - 1 else "-", None
         if ring == MPI.COMM_NULL else
         [ring.Get_size(), ring.neighbors, ring.neighbor_allgather(rank)]], root=0))
    g.Free()


def carts():
    # the Topocomm properties and the w- and persistent forms on Cartesian grids
    seen = []
    for dims, periods in (([size], [True]), ([size], [False]), ([2, size // 2], [False, False])):
        cart = comm.Create_cart(dims, periods=periods)
        if cart == MPI.COMM_NULL:
            seen.append(None)
            continue
        seen.append([queries(cart), cart.dim, exchanges(cart)])
        cart.Free()
    # (Cart_map and Graph_map give ranks past the map MPI.UNDEFINED; Open MPI 4.1 their rank)
    say("carts", comm.gather([seen, comm.Cart_map([size - 1]) if rank < size - 1 else "-"],
                             root=0), comm.topology, comm.is_topo)


for prog in (dist_graphs, graphs, carts):
    prog()
say("ALL OK", size)
