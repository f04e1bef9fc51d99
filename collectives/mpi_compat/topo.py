"""mpi4py's topologies, each a Topocomm with the neighborhood collectives
(neighbor.py): Cartcomm, a mesh.Grid over the communicator; Graphcomm,
MPI_Graph_create's whole graph (every rank passes it); Distgraphcomm,
each rank's own in- and out-edges, as Create_dist_graph_adjacent gives
them (checked: each edge named at both ends, by one all_gather of the
edges' counts) or as Create_dist_graph's edges, named by any rank, reach
their two ends (one all_to_all). Ranks are kept (``reorder`` is ignored,
as Open MPI ignores it); a graph communicator is a Dup of the old one's
ranks (no message), as MPI's is a new communicator."""
from __future__ import annotations

import math
from typing import Any, Sequence

import mesh
from mesh import Comm as MeshComm

from .. import api as C
from .comm import COMM_NULL, Comm
from .neighbor import Recv, Send, Topocomm
from .types import CART, DIST_GRAPH, GRAPH

__all__ = ["Cartcomm", "Graphcomm", "Distgraphcomm", "UNWEIGHTED", "WEIGHTS_EMPTY",
           "create_cart", "create_graph", "create_dist_graph_adjacent", "create_dist_graph"]

UNWEIGHTED, WEIGHTS_EMPTY = 2, 3    # (Open MPI's, as mpi4py has them: plain ints)


class Cartcomm(Topocomm):
    """mpi4py's Cartcomm: a mesh.Grid with axes d0, d1... over the
    communicator (row-major), periodicity kept per dimension for Shift and
    Get_cart_rank."""

    _dims: list[int]
    _periods: list[int]     # (1 or 0, as mpi4py's Get_topo gives them)
    _grid: mesh.Grid

    def __init__(self, g: "MeshComm | Comm | None" = None, dims: list[int] | None = None,
                 periods: Sequence[Any] | None = None) -> None:
        """``g`` a meshrun communicator with its ``dims`` and ``periods``, or
        a Cartcomm (mpi4py's ``MPI.Cartcomm(cart)``: another handle of it;
        ``MPI.Cartcomm()``: a null one, equal to COMM_NULL)."""
        grid = None
        if g is None and dims is None:
            super().__init__(None)
            self._dims, self._periods = [], []
            return
        if isinstance(g, Comm) and dims is None:
            if not isinstance(g, Cartcomm):
                raise TypeError(f"collectives.MPI Cartcomm: expecting a Cartesian "
                                f"communicator, got {type(g).__name__}")
            dims, periods, grid = g._dims, g._periods, g._grid
        if dims is None or periods is None:
            raise TypeError("collectives.MPI Cartcomm: takes a Cartcomm (MPI.Cartcomm(cart)); "
                            "make one with comm.Create_cart(dims, periods)")
        super().__init__(g)
        self._dims, self._periods = list(dims), [int(bool(p)) for p in periods]
        # (a 0-dimensional one, MPI's of one rank: a grid of one axis of 1, its coordinates [])
        self._grid = grid or mesh.grid(self._g, **({f"d{i}": d for i, d in enumerate(dims)}
                                                    or {"d0": 1}))

    def _like(self, g: MeshComm) -> "Comm":
        return Cartcomm(g, self._dims, self._periods)

    @property
    def dims(self) -> list[int]:
        """(a copy, as mpi4py's: a caller's change leaves the communicator as it was)"""
        return list(self._dims)

    @property
    def periods(self) -> list[int]:
        return list(self._periods)

    def Get_topology(self) -> int:
        return CART

    topology = property(Get_topology)

    def Get_dim(self) -> int:
        return len(self._dims)

    ndim = dim = property(Get_dim)

    def Get_coords(self, rank: int) -> list[int]:
        return list(self._grid.coords(rank).values())[:len(self._dims)]

    @property
    def coords(self) -> list[int]:
        return self.Get_coords(self._g.rank)

    def Get_topo(self) -> tuple[list[int], list[int], list[int]]:
        return list(self._dims), list(self._periods), self.coords

    topo = property(Get_topo)

    def Get_cart_rank(self, coords: Sequence[int]) -> int:
        if not self._dims:
            return 0
        at = {}
        for i, (c, d, p) in enumerate(zip(coords, self._dims, self._periods)):
            at[f"d{i}"] = int(c) % d if p else int(c)
        return self._grid.rank_of(**at)

    def Shift(self, direction: int, disp: int) -> tuple[int, int]:
        return self._grid.shift(f"d{direction}", disp,
                                periodic=bool(self._periods[direction]))

    def Sub(self, remain_dims: Sequence[bool]) -> "Cartcomm":
        """The ranks that share this rank's coordinates along the dimensions
        dropped, ranked along those kept (every rank makes every such
        communicator, in the same order, as mesh.grid does)."""
        keep = [bool(k) for k in remain_dims]
        lines: dict[tuple[int, ...], list[int]] = {}
        for r in range(self._g.size):
            c = self.Get_coords(r)
            lines.setdefault(tuple(v for v, k in zip(c, keep) if not k), []).append(r)
        mine = None
        for line in lines.values():
            g = self._g.group(line)
            if g is not None:
                mine = g
        assert mine is not None
        return Cartcomm(mine, [d for d, k in zip(self._dims, keep) if k] or [1],
                        [p for p, k in zip(self._periods, keep) if k] or [0])

    def _edges(self) -> tuple[list[int], list[int]]:
        """MPI's neighbour order on a Cartesian communicator, the same both
        ways: for each dimension, Shift(d, 1)'s source, then its destination."""
        nbrs = [r for d in range(len(self._dims)) for r in self.Shift(d, 1)]
        return nbrs, list(nbrs)

    def _routes(self) -> tuple[list[Recv], list[Send]]:
        """What goes to the destination of dimension d arrives as the
        receiver's source block, and the other way round. Where one rank
        is a neighbour twice (a periodic dimension of 1 or 2), both
        messages come on the call's tag, so each rank sends in the order
        its peers post: for each d, the destination's block first (as the
        blocking calls of Open MPI 4.1); each message is labelled by the
        block it lands in."""
        nbrs = self._edges()[0]
        return ([(s, {"dir": i}) for i, s in enumerate(nbrs)],
                [(nbrs[i ^ 1], i ^ 1, {"dir": i}) for i in range(len(nbrs))])


class Graphcomm(Topocomm):
    """mpi4py's Graphcomm: MPI_Graph_create's graph, every rank's
    neighbours ``edges[index[r - 1]:index[r]]``; its neighborhood
    collectives take a neighbour's several edges apart by their order, and
    need the graph symmetric (as many edges each way between two ranks:
    MPI's rule, checked at the first)."""

    _index: list[int]
    _edges_all: list[int]

    def __init__(self, g: "MeshComm | Comm | None" = None, index: Sequence[int] | None = None,
                 edges: Sequence[int] | None = None) -> None:
        """``g`` a meshrun communicator with the graph, or a Graphcomm
        (mpi4py's ``MPI.Graphcomm(graph)``: another handle of it;
        ``MPI.Graphcomm()``: a null one, equal to COMM_NULL)."""
        if g is None and index is None:
            super().__init__(None)
            self._index, self._edges_all, self._checked = [], [], False
            return
        if isinstance(g, Comm) and index is None:
            if not isinstance(g, Graphcomm):
                raise TypeError(f"collectives.MPI Graphcomm: expecting a graph communicator, "
                                f"got {type(g).__name__}")
            index, edges = g._index, g._edges_all
        if index is None or edges is None:
            raise TypeError("collectives.MPI Graphcomm: takes a Graphcomm (MPI.Graphcomm(g)); "
                            "make one with comm.Create_graph(index, edges)")
        super().__init__(g)
        self._index, self._edges_all = list(index), list(edges)
        self._checked = False

    def _like(self, g: MeshComm) -> "Comm":
        return Graphcomm(g, self._index, self._edges_all)

    def Get_topology(self) -> int:
        return GRAPH

    topology = property(Get_topology)

    def Get_dims(self) -> tuple[int, int]:
        return len(self._index), len(self._edges_all)

    dims = property(Get_dims)
    nnodes = property(lambda self: len(self._index))
    nedges = property(lambda self: len(self._edges_all))

    def Get_topo(self) -> tuple[list[int], list[int]]:
        return list(self._index), list(self._edges_all)

    topo = property(Get_topo)
    index = property(lambda self: list(self._index))
    edges = property(lambda self: list(self._edges_all))

    def Get_neighbors(self, rank: int) -> list[int]:
        if not 0 <= rank < len(self._index):
            raise ValueError(f"rank {self._g.rank}: collectives.MPI Graphcomm.Get_neighbors: "
                             f"rank {rank} is not a node of the graph (0..{self.nnodes - 1})")
        lo = self._index[rank - 1] if rank else 0
        return self._edges_all[lo:self._index[rank]]

    def Get_neighbors_count(self, rank: int) -> int:
        return len(self.Get_neighbors(rank))

    neighbors = property(lambda self: self.Get_neighbors(self._g.rank))
    nneighbors = property(lambda self: self.Get_neighbors_count(self._g.rank))

    def _edges(self) -> tuple[list[int], list[int]]:
        mine = self.Get_neighbors(self._g.rank)
        return mine, list(mine)

    def _routes(self) -> tuple[list[Recv], list[Send]]:
        if not self._checked:
            every = [self.Get_neighbors(r) for r in range(self.nnodes)]
            for a, nbrs in enumerate(every):
                for b in sorted(set(nbrs)):
                    there, back = nbrs.count(b), every[b].count(a)
                    if there != back:
                        raise ValueError(
                            f"rank {self._g.rank}: collectives.MPI neighborhood collective on "
                            f"a graph: rank {a} has {there} edge(s) to rank {b}, rank {b} "
                            f"{back} to rank {a}: MPI's neighborhood collectives need as many "
                            f"each way (a symmetric graph); use Create_dist_graph_adjacent "
                            f"for a directed one")
            self._checked = True
        return super()._routes()


class Distgraphcomm(Topocomm):
    """mpi4py's Distgraphcomm: this rank's sources and destinations in
    order, and their weights where given (``weighted``, as Open MPI's: a
    rank that passed weights, MPI.WEIGHTS_EMPTY or an empty list too)."""

    _srcs: list[int]
    _dsts: list[int]
    _weights: tuple[list[int], list[int]] | None

    def __init__(self, g: "MeshComm | Comm | None" = None,
                 sources: Sequence[int] | None = None,
                 destinations: Sequence[int] | None = None,
                 weights: tuple[list[int], list[int]] | None = None) -> None:
        """``g`` a meshrun communicator with this rank's edges, or a
        Distgraphcomm (``MPI.Distgraphcomm(dg)``: another handle of it;
        ``MPI.Distgraphcomm()``: a null one, equal to COMM_NULL)."""
        if g is None and sources is None:
            super().__init__(None)
            self._srcs, self._dsts, self._weights = [], [], None
            return
        if isinstance(g, Comm) and sources is None:
            if not isinstance(g, Distgraphcomm):
                raise TypeError(f"collectives.MPI Distgraphcomm: expecting a distributed "
                                f"graph communicator, got {type(g).__name__}")
            sources, destinations, weights = g._srcs, g._dsts, g._weights
        if sources is None or destinations is None:
            raise TypeError("collectives.MPI Distgraphcomm: takes a Distgraphcomm; make one "
                            "with comm.Create_dist_graph_adjacent or Create_dist_graph")
        super().__init__(g)
        self._srcs, self._dsts, self._weights = list(sources), list(destinations), weights

    def _like(self, g: MeshComm) -> "Comm":
        return Distgraphcomm(g, self._srcs, self._dsts, self._weights)

    def Get_topology(self) -> int:
        return DIST_GRAPH

    topology = property(Get_topology)

    def Get_dist_neighbors_count(self) -> tuple[int, int, bool]:
        return len(self._srcs), len(self._dsts), self._weights is not None

    def Get_dist_neighbors(self) -> tuple[list[int], list[int],
                                          tuple[list[int], list[int]] | None]:
        w = self._weights
        return list(self._srcs), list(self._dsts), None if w is None else (list(w[0]),
                                                                          list(w[1]))

    def _edges(self) -> tuple[list[int], list[int]]:
        return list(self._srcs), list(self._dsts)


# -- making them ---------------------------------------------------------------------------
def _ints(x: Any, what: str, name: str) -> list[int]:
    try:
        return [int(v) for v in x]
    except (TypeError, ValueError):
        raise TypeError(f"collectives.MPI {name}: {what} must be a sequence of ints, got "
                        f"{x!r:.60}") from None


def _weights(w: Any, what: str, name: str) -> list[int] | None:
    """None for MPI.UNWEIGHTED (None), [] for MPI.WEIGHTS_EMPTY, else the list."""
    if w is None or isinstance(w, int) and w == UNWEIGHTED:
        return None
    if isinstance(w, int) and w == WEIGHTS_EMPTY:
        return []
    return _ints(w, what, name)


def _bad_ranks(ranks: list[int], size: int, what: str) -> str | None:
    wrong = [r for r in ranks if not 0 <= r < size]
    return f"{what} {wrong} out of range (0..{size - 1})" if wrong else None


def _bad_weights(w: list[int] | None, n: int, what: str) -> str | None:
    if w is None:
        return None
    if len(w) != n:
        return f"{len(w)} {what} for {n} edges"
    return f"negative {what} {[v for v in w if v < 0]}" if any(v < 0 for v in w) else None


def create_cart(comm: Comm, dims: Sequence[int], periods: Sequence[bool] | bool | None) -> Comm:
    """A Cartcomm over the first prod(dims) ranks (row-major, as MPI's
    without reorder); COMM_NULL on the others."""
    g = comm.mesh
    dims = [int(d) for d in dims]
    n = math.prod(dims)
    if n > g.size:
        raise ValueError(f"rank {g.rank}: Create_cart: dims {dims} need {n} ranks, "
                         f"the communicator has {g.size}")
    if periods is None or isinstance(periods, (bool, int)):     # (mpi4py's: one for every
        periods = [bool(periods)] * len(dims)                      # dimension)
    per = [bool(p) for p in periods]
    if len(per) != len(dims):       # (before the group: every rank raises)
        raise ValueError(f"rank {g.rank}: Create_cart: {len(per)} periods for {len(dims)} dims")
    sub = g if n == g.size else g.group(list(range(n)))
    if sub is None:
        return COMM_NULL
    return Cartcomm(sub, dims, per)


def standard_index(index: list[int], edges: list[int]) -> tuple[list[int], list[int]]:
    """mpi4py's extension: an index that starts at 0 and ends at the edges'
    count (a "standard" adjacency array, nnodes + 1 offsets) loses its 0."""
    if len(index) > 1 and index[0] == 0 and index[-1] == len(edges):
        return index[1:], edges
    return index, edges


def create_graph(comm: Comm, index: Sequence[int], edges: Sequence[int]) -> Comm:
    """A Graphcomm over the first len(index) ranks (every rank passes the
    same graph, so each checks it alone); COMM_NULL on the others."""
    g, name = comm.mesh, "Create_graph"
    index, edges = standard_index(_ints(index, "index", name), _ints(edges, "edges", name))
    nnodes = len(index)
    bad = None
    if nnodes > g.size:
        bad = f"{nnodes} nodes, the communicator has {g.size} ranks"
    elif any(b < a for a, b in zip([0] + index, index)):
        bad = f"index {index} is not a nondecreasing list of counts from 0"
    elif nnodes and index[-1] != len(edges):
        bad = f"index {index} ends at {index[-1]}, edges has {len(edges)}"
    else:
        bad = _bad_ranks(edges, nnodes, "edges")
    if bad is not None:
        raise ValueError(f"rank {g.rank}: collectives.MPI {name}: {bad}")
    if nnodes == 0:
        return COMM_NULL
    sub = g.dup() if nnodes == g.size else g.group(list(range(nnodes)))
    return COMM_NULL if sub is None else Graphcomm(sub, index, edges)


def _refuse(g: MeshComm, name: str, errors: list[Any]) -> None:
    """Every rank raises the first rank's error that any rank passed (they
    all see them: no rank is left waiting)."""
    for r, err in enumerate(errors):
        if err:
            raise ValueError(f"rank {g.rank}: collectives.MPI {name}: rank {r} passed {err}")


def create_dist_graph_adjacent(comm: Comm, sources: Sequence[int], destinations: Sequence[int],
                               sourceweights: Any, destweights: Any) -> Distgraphcomm:
    """Each rank's own edges, checked by one all_gather of each rank's
    count and weights' sum of edges to and from every peer: every edge must
    be named at both ends (the same number of times, the same weights
    where both give them), MPI's rule, which Open MPI leaves unchecked (its
    neighborhood collectives then hang)."""
    g, name = comm.mesh.dup(), "Create_dist_graph_adjacent"
    srcs = _ints([] if sources is None else sources, "sources", name)   # (None: none,
    dsts = _ints([] if destinations is None else destinations, "destinations", name)  # as mpi4py)
    sw = _weights(sourceweights, "sourceweights", name)
    dw = _weights(destweights, "destweights", name)
    err = _bad_ranks(srcs, g.size, "sources") or _bad_ranks(dsts, g.size, "destinations") or \
        _bad_weights(sw, len(srcs), "sourceweights") or \
        _bad_weights(dw, len(dsts), "destweights")
    every = C.all_gather_object(g, [err, _tally(dsts, dw), _tally(srcs, sw)])
    _refuse(g, name, [e[0] for e in every])
    out = {(s, d): v for s, e in enumerate(every) for d, *v in e[1]}
    into = {(s, d): v for d, e in enumerate(every) for s, *v in e[2]}
    for s, d in sorted(set(out) | set(into)):
        (a, wa), (b, wb) = out.get((s, d), (0, None)), into.get((s, d), (0, None))
        if a != b or None not in (wa, wb) and wa != wb:
            raise ValueError(
                f"rank {g.rank}: collectives.MPI {name}: rank {s} names rank {d} among its "
                f"destinations {a} time(s)" + (f", weights summing to {wa}" if a == b else "") +
                f"; rank {d} names rank {s} among its sources {b} time(s)" +
                (f", weights summing to {wb}" if a == b else "") + ": each edge must be "
                "given at both ends, with the same weights (MPI)")
    weights = None
    if sw is not None or dw is not None:   # (Open MPI's: the side not given weighs 1)
        weights = ([1] * len(srcs) if sw is None else sw, [1] * len(dsts) if dw is None else dw)
    return Distgraphcomm(g, srcs, dsts, weights)


def _tally(peers: list[int], w: list[int] | None) -> list[list[Any]]:
    """[peer, edges to it, their weights' sum (None: unweighted)], a peer each."""
    count: dict[int, list[Any]] = {}
    for i, p in enumerate(peers):
        c = count.setdefault(p, [p, 0, None if w is None else 0])
        c[1] += 1
        if w is not None and i < len(w):
            c[2] += w[i]
    return list(count.values())


def create_dist_graph(comm: Comm, sources: Sequence[int], degrees: Sequence[int],
                      destinations: Sequence[int], weights: Any) -> Distgraphcomm:
    """Edges named by any rank (``degrees[i]`` destinations of
    ``sources[i]``, in turn), each sent to its two ends by one
    all_to_all: a rank's in-edges (out-edges) in the order of the ranks
    that named them, then of their lists (Open MPI's keeps each rank's
    list in order, the ranks in the order their messages arrive)."""
    g, name = comm.mesh.dup(), "Create_dist_graph"
    nodes, degs = _ints(sources, "sources", name), _ints(degrees, "degrees", name)
    dsts = _ints(destinations, "destinations", name)
    w = _weights(weights, "weights", name)
    err = None
    if len(nodes) != len(degs) or any(k < 0 for k in degs) or sum(degs) != len(dsts):
        err = f"{len(nodes)} sources, degrees {degs} and {len(dsts)} destinations: a " \
              f"nonnegative degree a source, summing to the destinations"
    err = err or _bad_ranks(nodes, g.size, "sources") or \
        _bad_ranks(dsts, g.size, "destinations") or _bad_weights(w, len(dsts), "weights")
    outs: list[list[Any]] = [[] for _ in range(g.size)]
    ins: list[list[Any]] = [[] for _ in range(g.size)]
    if err is None:
        at = 0
        for s, k in zip(nodes, degs):
            for d in dsts[at:at + k]:
                outs[s].append([d, None if w is None else w[at]])
                ins[d].append([s, None if w is None else w[at]])
                at += 1
    got = C.all_to_all_object(g, [[err, w is not None, outs[p], ins[p]] for p in range(g.size)])
    _refuse(g, name, [e[0] for e in got])
    flags = [e[1] for e in got]
    if len(set(flags)) > 1:
        raise ValueError(f"rank {g.rank}: collectives.MPI {name}: ranks "
                         f"{[r for r, f in enumerate(flags) if f]} passed weights, ranks "
                         f"{[r for r, f in enumerate(flags) if not f]} MPI.UNWEIGHTED: every "
                         f"rank or none must (MPI)")
    mine_in = [e for q in got for e in q[3]]
    mine_out = [e for q in got for e in q[2]]
    return Distgraphcomm(g, [s for s, _ in mine_in], [d for d, _ in mine_out],
                         None if w is None else ([v for _, v in mine_in],
                                                 [v for _, v in mine_out]))
