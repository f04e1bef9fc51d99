"""MPI's intercommunicator collectives (inter.py's Intercomm), as MPI-4
moves them (MPI 4.0, 6.2.2): each call one collective of the union of both
groups (collectives' runner: one tag, deadline and abort on every member).
A collective's blocking form, its nonblocking I-form (the runner's
async_op: the union's lane, the result written at the wait, as coll.py's)
and its persistent _init (collectives.persistent's start: each Start the
union's next collective) are made alike of one ``build`` of the call's
buffers (``_forms``), read once, at the call or the init.

The rooted ones (Bcast, Gather, Gatherv, Scatter, Scatterv, Reduce; the
lowercase bcast, gather, scatter, reduce: interobjects.py) take MPI.ROOT
on the root, MPI.PROC_NULL on the rest of its group and the root's rank
on the other group; Allgather(v), Alltoall(v, w) and alltoall give each
group the other group's blocks; Allreduce and allreduce each group the
other group's reduction (by its rank 0, in the other group's rank order,
as MPI's), Reduce_scatter and Reduce_scatter_block each group the other
group's reduction, scattered by its own counts. Every rank's arguments go
first to every other rank of the union at once (``_checked``; by its rank 0
and back above ``_STAR`` ranks), each of which checks them all alike
(interargs.py: two ROOTs, a root out of range, a block whose bytes differ
at its two ends, a group's counts), so that every rank raises the same
error and none waits; Bcast, bcast, Reduce and Allreduce send their data
right behind their arguments (dropped by its receiver where the check
fails), the others after the check. MPI.IN_PLACE is refused, as MPI
refuses it on an intercommunicator."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from mesh import Comm as MeshComm

from .. import persistent as P
from ..runner import Ctx, start
from .buffers import Buf, in_place, spec, vspec
from .coll import packing, unpacking
from .interargs import Sides
from .comm import not_provided
from .requests import Prequest, Request
from .tuples import unwrap, wrap
from .types import OPS, PROC_NULL, ROOT, Op
from .types import Exception as MPIException

__all__ = ["InterCollectives"]

_SUM = OPS["SUM"]
_STAR = 16
"""Above this many ranks in the union, ``_verdict`` goes by its rank 0."""

Body = Callable[[Ctx], Any]
Finish = Callable[[Any], Any]
Plan = tuple[Body, Callable[[Any], Any] | None, Callable[[], None] | None]
"""A call as ``build`` makes it: (its body, run as the union's collective;
what its wait does with the body's value; what each persistent start
does first)."""

_UFUNCS: dict[str, Callable[..., Any]] = {
    "sum": np.add, "prod": np.multiply, "max": np.maximum, "min": np.minimum,
    "land": np.logical_and, "lor": np.logical_or, "lxor": np.logical_xor,
    "band": np.bitwise_and, "bor": np.bitwise_or, "bxor": np.bitwise_xor}


def _combine(op: Any, what: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``a op b`` of two arrays (MPI's order: the lower rank's on the left)."""
    if not isinstance(op, Op):
        raise TypeError(f"collectives.MPI {what}: op must be an MPI.Op, got {op!r:.60}")
    if isinstance(op.coll, str):
        if op.coll not in _UFUNCS:
            raise not_provided(f"{what} by MPI.{op.name} on an intercommunicator")
        f = _UFUNCS[op.coll]
        return lambda a, b: f(a, b).astype(a.dtype, copy=False)

    def user(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(Op.Create's ``fn(inbuf, inoutbuf, datatype)`` writes ``inoutbuf``;
        a two-argument one returns the result)"""
        out = b.copy()
        got = op.coll.fn(a, out, None) if op.coll._dtype_arg else op.coll.fn(a, out)
        return out if got is None else np.asarray(got, out.dtype).reshape(out.shape)
    return user


class _Refused(Exception):
    """What the ranks found wrong with a call's arguments (``error_class``:
    MPI's, where MPI names one, as ERR_ROOT for a root that is no rank)."""

    def __init__(self, why: str, error_class: int | None = None) -> None:
        super().__init__(why)
        self.error_class = error_class


class _Refusal:
    """A ``_verdict`` against a call, as its body returns it (``_settle``
    raises it, after the call: a rank's error inside it would abort its
    peers' call before they heard the verdict)."""

    __slots__ = ("why", "error_class")

    def __init__(self, why: str, error_class: int | None = None) -> None:
        self.why, self.error_class = why, error_class


def _role(root: Any) -> str:
    """A rooted call's rank: 'root' (MPI.ROOT), 'idle' (MPI.PROC_NULL: the
    root's group's others) or 'leaf' (the other group, naming the root)."""
    return "root" if root == ROOT else "idle" if root == PROC_NULL else "leaf"


def _forms(name: str, build: Callable[..., Plan]) -> tuple[Any, Any, Any]:
    """``name``'s blocking call, its nonblocking I-form and its persistent
    _init (MPI-4's; ``info`` taken and not used), each the collective that
    ``build(self, what, *args)`` makes of the call's arguments."""
    later, init = "I" + name[0].lower() + name[1:], name + "_init"

    def blocking(self: "InterCollectives", *args: Any, **kw: Any) -> Any:
        body, finish, _ = build(self, name, *args, **kw)
        return self._settle(name, self._launch(name, body, False), finish)

    def nonblocking(self: "InterCollectives", *args: Any, **kw: Any) -> Request:
        body, finish, _ = build(self, later, *args, **kw)
        work = self._launch(later, body, True)
        return Request(work, finish=lambda got: self._settle(later, got, finish))

    def persistent(self: "InterCollectives", *args: Any, info: Any = None,
                   **kw: Any) -> Prequest:
        body, finish, before = build(self, init, *args, **kw)
        req = P._init(self._g, f"Intercomm.{init}", lambda: self._launch(init, body, True))
        return Prequest(req, before=before, finish=lambda got: self._settle(init, got, finish))

    for f, n in ((blocking, name), (nonblocking, later), (persistent, init)):
        f.__name__ = f.__qualname__ = n
        f.__doc__ = f"MPI's {n} on an intercommunicator (intercoll.py)."
    return blocking, nonblocking, persistent


class InterCollectives:
    """The collectives of collectives.MPI's Intercomm over ``_g``, the
    union of its groups (the local group's ``_nl`` ranks from ``_lo``, the
    remote's ``_nr`` from ``_ro``)."""

    _g: MeshComm
    _lo: int
    _nl: int
    _ro: int
    _nr: int

    def _me(self) -> str:
        """``rank 1 (world rank 3)``: this rank of the local group, as errors name it."""
        return f"rank {self._g.rank - self._lo} (world rank {self._g.ranks[self._g.rank]})"

    @property
    def _first(self) -> int:
        """The union's first group's size."""
        return self._nl if self._lo == 0 else self._nr

    @property
    def _sides(self) -> Sides:
        """The union's two groups, as the verdicts' checks take them."""
        return Sides(self._first, tuple(self._g.ranks))

    # -- running one --------------------------------------------------------------------
    def _launch(self, name: str, body: Body, async_op: bool) -> Any:
        """``body`` as one collective of the union (a Work with ``async_op``):
        its value, or the ``_Refusal`` a ``_verdict`` made."""
        def run(ctx: Ctx) -> Any:
            try:
                return body(ctx)
            except _Refused as e:
                return _Refusal(str(e), e.error_class)
        return start(self._g, f"Intercomm.{name}", lambda tuning: ({"coll": name}, run),
                     async_op)

    def _settle(self, name: str, got: Any, finish: Finish | None) -> Any:
        """A call's value through ``finish`` (at its wait), or its verdict raised."""
        if isinstance(got, _Refusal):
            said = f"{self._me()}: collectives.MPI Intercomm.{name}: {got.why}"
            raise ValueError(said) if got.error_class is None else \
                MPIException(got.error_class, said)
        return got if finish is None else finish(got)

    def _run(self, name: str, body: Body) -> Any:
        """``body`` as one blocking collective of the union."""
        return self._settle(name, self._launch(name, body, False), None)

    def _verdict(self, ctx: Ctx, mine: Any,
                 judge: Callable[[list[Any]], tuple[str, Any]]) -> Any:
        """``_checked``'s verdict, with no data riding it."""
        return self._checked(ctx, mine, judge)[0]

    def _checked(self, ctx: Ctx, mine: Any, judge: Callable[[list[Any]], tuple[str, Any]],
                 eager: list[tuple[int, Any]] | None = None,
                 drain: Callable[[list[Any]], list[int]] | None = None
                 ) -> tuple[Any, list[Any] | None]:
        """Every rank's ``mine`` to every rank of the union, each of which
        ``judge``s them all (in union order; a pure function, so every rank
        reaches the same answer: what is wrong, or what they agree on), every
        rank raising the same error (``_Refused``, which ``_settle`` raises
        after the call). One exchange, all messages at once; above ``_STAR``
        ranks, by the union's rank 0 (every rank's to it, its answer back:
        2(n - 1) messages, not n(n - 1)). ``eager``: (union rank, block) this
        rank sends right behind its arguments, before the verdict (the call's
        data riding the check's exchange: the body receives it once the
        verdict is good; ``drain(got)``, the ranks whose eager blocks come
        here, which a bad verdict receives and drops). Returns the verdict's
        value and those sends (None with no ``eager``, and above ``_STAR``: the
        body sends after)."""
        g = ctx.g
        n, me = g.size, g.rank
        if n > _STAR:
            return self._verdict_by_0(ctx, mine, judge), None
        sent = wrap(mine)
        recvs = [ctx.irecv(r) if r != me else None for r in range(n)]
        sends = [ctx.isend(sent, r) for r in range(n) if r != me]
        early = None if eager is None else [ctx.isend(block, r) for r, block in eager]
        got = [mine if q is None else unwrap(q.wait()) for q in recvs]
        self._wait(sends)
        why, value = judge(got)
        if why:
            if drain is not None:
                self._wait([ctx.irecv(r) for r in drain(got)])
            self._wait(early or [])
            raise _Refused(why, value if isinstance(value, int) else None)
        return value, early

    def _from_remote(self, got: list[Any], says: Callable[[Any], bool]) -> list[int]:
        """The remote group's union ranks whose arguments (in ``got``) ``says``."""
        return [u for u in range(self._ro, self._ro + self._nr) if says(got[u])]

    def _verdict_by_0(self, ctx: Ctx, mine: Any,
                      judge: Callable[[list[Any]], tuple[str, Any]]) -> Any:
        """``_verdict`` by the union's rank 0, which judges and tells the others."""
        g = ctx.g
        if g.rank != 0:
            ctx.isend(wrap(mine), 0).wait()
            why, value = unwrap(ctx.irecv(0).wait())
        else:
            got = [mine] + [unwrap(ctx.irecv(r).wait()) for r in range(1, g.size)]
            why, value = judge(got)
            for s in [ctx.isend(wrap([why, value]), r) for r in range(1, g.size)]:
                s.wait()
        if why:
            raise _Refused(why, value if isinstance(value, int) else None)
        return value

    def _rooted(self, ctx: Ctx, root: int, blocks: Any = None) -> None:
        """A rooted call's arguments checked first on every rank (``_verdict``);
        ``blocks``: this rank's bytes, the root's a list (one a remote rank),
        a leaf's an int."""
        self._verdict(ctx, [int(root), blocks], self._sides.roots)

    def _from_root(self, ctx: Ctx, root: int, blocks: Any, block: Any,
                   sends: bool) -> list[Any] | None:
        """``_rooted`` for a broadcast: where ``sends`` (the root), its
        ``block`` (None too: bcast's) sent to every remote rank with its
        arguments (``_checked``'s eager sends, or None where the root sends
        after the verdict)."""
        return self._checked(
            ctx, [int(root), blocks], self._sides.roots,
            [(self._ro + j, block) for j in range(self._nr)] if sends else None,
            lambda got: self._from_remote(got, lambda a: a[0] == ROOT))[1]

    def _wait(self, reqs: list[Any]) -> list[Any]:
        return [r.wait() for r in reqs]

    def _plain(self, what: str, *bufs: Any) -> None:
        if any(in_place(b) for b in bufs):
            raise ValueError(f"{self._me()}: collectives.MPI Intercomm.{what}: MPI.IN_PLACE "
                             f"is not allowed on an intercommunicator (MPI's)")

    # -- the bodies ---------------------------------------------------------------------
    def _collect(self, root: int, role: str, blocks: list[np.ndarray], sent: Buf | None,
                 recv: Buf | None) -> Plan:
        """A rooted call that gathers: the root's ``blocks`` (of ``recv``, one a
        remote rank) filled by the other group's ``sent``."""
        def body(ctx: Ctx) -> None:
            self._rooted(ctx, root, [b.nbytes for b in blocks] if role == "root" else
                         None if sent is None else sent.view.nbytes)
            if role == "root":
                self._wait([ctx.irecv(self._ro + j, b) for j, b in enumerate(blocks)])
            elif sent is not None:
                ctx.isend(sent.view, self._ro + root).wait()
        return body, unpacking(recv), packing(sent)

    def _deal(self, root: int, role: str, blocks: list[np.ndarray], sent: Buf | None,
              recv: Buf | None) -> Plan:
        """A rooted call that scatters: the root's ``blocks`` (of ``sent``, one
        a remote rank) into the other group's ``recv``."""
        def body(ctx: Ctx) -> None:
            self._rooted(ctx, root, [b.nbytes for b in blocks] if role == "root" else
                         None if recv is None else recv.view.nbytes)
            if role == "root":
                self._wait([ctx.isend(b, self._ro + j) for j, b in enumerate(blocks)])
            elif recv is not None:
                ctx.irecv(self._ro + root, recv.view).wait()
        return body, unpacking(recv), packing(sent)

    def _swap(self, sends: list[np.ndarray], recvs: list[np.ndarray], sent: Buf | None,
              recv: Buf | None) -> Plan:
        """An all-to-all-like call: ``sends[j]`` to remote rank j, ``recvs[j]``
        from it (their bytes checked first)."""
        def body(ctx: Ctx) -> None:
            self._verdict(ctx, [[b.nbytes for b in sends], [b.nbytes for b in recvs]],
                          self._sides.pairs)
            got = [ctx.irecv(self._ro + j, b) for j, b in enumerate(recvs)]
            self._wait([ctx.isend(b, self._ro + j) for j, b in enumerate(sends)] + got)
        return body, unpacking(recv), packing(sent)

    def _reduced(self, ctx: Ctx, mine: Any, fold: Callable[[list[Any]], Any], out: Any,
                 cut: Callable[[Any, int], Any] | None = None,
                 early: list[Any] | None = None) -> Any:
        """Every rank's ``mine`` to the remote group's rank 0, which folds
        them (``fold``) and sends the result (``cut(result, i)``: rank i's
        part) to its group; into ``out``. ``early``: the send of ``mine``
        made already (_checked's eager one)."""
        lead = self._lo

        def part(value: Any, i: int) -> Any:
            return value if cut is None else cut(value, i)
        sent = early[0] if early else ctx.isend(mine, self._ro)
        if self._g.rank == self._lo:
            value = fold(self._wait([ctx.irecv(self._ro + j) for j in range(self._nr)]))
            self._wait([ctx.isend(part(value, i), lead + i) for i in range(1, self._nl)])
            value = part(value, 0)
            if out is not None:
                out[...] = value
        else:
            value = ctx.irecv(lead, out).wait()
        sent.wait()
        return value

    # -- the calls' builds (what, then the call's arguments) ------------------------------
    def _build_barrier(self, what: str) -> Plan:
        def body(ctx: Ctx) -> None:
            self._verdict(ctx, 0, lambda got: ("", None))
        return body, None, None

    def _build_bcast(self, what: str, buf: Any, root: int = 0) -> Plan:
        role = _role(root)
        b = spec(buf, what, packs=True) if role != "idle" else None

        def body(ctx: Ctx) -> None:
            n = None if b is None else b.view.nbytes
            early = self._from_root(ctx, root, [n] * self._nr if role == "root" else n,
                                    None if b is None else b.view,
                                    role == "root" and b is not None)
            if role == "root" and b is not None:
                self._wait([ctx.isend(b.view, self._ro + j) for j in range(self._nr)]
                           if early is None else early)
            elif role == "leaf" and b is not None:
                ctx.irecv(self._ro + root, b.view).wait()
        return body, unpacking(b) if role == "leaf" else None, \
            packing(b) if role == "root" else None

    def _build_gather(self, what: str, sendbuf: Any, recvbuf: Any, root: int = 0) -> Plan:
        self._plain(what, sendbuf, recvbuf)
        role, nr = _role(root), self._nr
        if role == "root":
            r = spec(recvbuf, what, per=max(nr, 1), packs=True)
            rows = r.view.reshape(nr, -1) if nr else r.view
            return self._collect(root, role, [rows[j] for j in range(nr)], None, r)
        sent = spec(sendbuf, what, packs=True) if role == "leaf" else None
        return self._collect(root, role, [], sent, None)

    def _build_gatherv(self, what: str, sendbuf: Any, recvbuf: Any, root: int = 0) -> Plan:
        self._plain(what, sendbuf, recvbuf)
        role = _role(root)
        if role == "root":
            r = vspec(recvbuf, what, self._nr, packs=True)
            return self._collect(root, role, _blocks(r), None, r)
        sent = spec(sendbuf, what, packs=True) if role == "leaf" else None
        return self._collect(root, role, [], sent, None)

    def _build_scatter(self, what: str, sendbuf: Any, recvbuf: Any, root: int = 0) -> Plan:
        self._plain(what, sendbuf, recvbuf)
        role, nr = _role(root), self._nr
        if role == "root":
            s = spec(sendbuf, what, per=max(nr, 1), packs=True)
            rows = s.view.reshape(nr, -1) if nr else s.view
            return self._deal(root, role, [rows[j] for j in range(nr)], s, None)
        recv = spec(recvbuf, what, packs=True) if role == "leaf" else None
        return self._deal(root, role, [], None, recv)

    def _build_scatterv(self, what: str, sendbuf: Any, recvbuf: Any, root: int = 0) -> Plan:
        self._plain(what, sendbuf, recvbuf)
        role = _role(root)
        if role == "root":
            s = vspec(sendbuf, what, self._nr, packs=True)
            return self._deal(root, role, _blocks(s), s, None)
        recv = spec(recvbuf, what, packs=True) if role == "leaf" else None
        return self._deal(root, role, [], None, recv)

    def _build_reduce(self, what: str, sendbuf: Any, recvbuf: Any, op: Op = _SUM,
                root: int = 0) -> Plan:
        self._plain(what, sendbuf, recvbuf)
        f, role = _combine(op, what), _role(root)
        r = spec(recvbuf, what, packs=True) if role == "root" else None
        sent = spec(sendbuf, what, packs=True) if role == "leaf" else None

        here = self._g.rank - self._lo

        def body(ctx: Ctx) -> None:
            to = role == "leaf" and sent is not None and 0 <= int(root) < self._nr
            _, early = self._checked(
                ctx, [int(root), [r.view.nbytes] * self._nr if r is not None else
                      None if sent is None else sent.view.nbytes], self._sides.roots,
                [(self._ro + root, sent.view)] if to and sent is not None else None,
                lambda got: self._from_remote(got, lambda a: a[0] == here and
                                              a[1] is not None))
            if r is not None:
                got = self._wait([ctx.irecv(self._ro + j) for j in range(self._nr)])
                r.view[...] = _fold([np.asarray(v).reshape(r.view.shape) for v in got], f)
            elif sent is not None:
                self._wait(early if early is not None else
                           [ctx.isend(sent.view, self._ro + root)])
        return body, unpacking(r), packing(sent)

    def _build_allreduce(self, what: str, sendbuf: Any, recvbuf: Any, op: Op = _SUM) -> Plan:
        """Each group gets the other's reduction (by its rank 0, which sends
        it to the rest of its group)."""
        self._plain(what, sendbuf, recvbuf)
        f = _combine(op, what)
        sent = spec(sendbuf, what, packs=True)
        r = spec(recvbuf, what, packs=True)
        nr, ns = r.view.nbytes, sent.view.nbytes

        def body(ctx: Ctx) -> None:
            _, early = self._checked(
                ctx, [[ns] * self._nr, [nr] * self._nr], self._sides.pairs,
                [(self._ro, sent.view)], lambda got: self._from_remote(
                    got, lambda a: self._g.rank == self._lo))
            self._reduced(ctx, sent.view, lambda got: _fold(
                [np.asarray(v).reshape(r.view.shape) for v in got], f), r.view, early=early)
        return body, unpacking(r), packing(sent)

    def _build_reduce_scatter(self, what: str, sendbuf: Any, recvbuf: Any, recvcounts: Any = None,
                        op: Op = _SUM) -> Plan:
        """``recvcounts``: the local group's (one a rank of it, MPI's; a
        derived datatype's in its items)."""
        self._plain(what, sendbuf, recvbuf)
        if recvcounts is None:
            raise ValueError(f"{self._me()}: collectives.MPI Intercomm.{what}: recvcounts "
                             f"is needed (one a rank of the local group; mpi4py's too)")
        recv = spec(recvbuf, what, packs=True)
        dt = recv.datatype
        per = dt.typemap.n if dt is not None and dt.typemap is not None else 1
        return self._scattered(what, spec(sendbuf, what, packs=True), recv,
                               [int(k) * per for k in recvcounts], op)

    def _build_reduce_scatter_block(self, what: str, sendbuf: Any, recvbuf: Any,
                              op: Op = _SUM) -> Plan:
        self._plain(what, sendbuf, recvbuf)
        recv = spec(recvbuf, what, packs=True)
        return self._scattered(what, spec(sendbuf, what, packs=True), recv,
                               [len(recv.view)] * self._nl, op)

    def _scattered(self, what: str, sent: Buf, recv: Buf, counts: list[int], op: Op) -> Plan:
        """Reduce_scatter(_block): the other group's reduction, by its rank
        0, scattered over this group by its ``counts`` (elements)."""
        if len(counts) != self._nl:
            raise ValueError(f"{self._me()}: collectives.MPI Intercomm.{what}: {len(counts)} "
                             f"recvcounts for a local group of {self._nl}")
        f, me = _combine(op, what), self._g.rank - self._lo
        if counts[me] > len(recv.view):
            raise ValueError(f"{self._me()}: collectives.MPI Intercomm.{what}: recvcounts "
                             f"gives this rank {counts[me]} elements, its buffer holds "
                             f"{len(recv.view)}")
        out, size = recv.view[:counts[me]], recv.view.itemsize
        at = [sum(counts[:i]) for i in range(len(counts))]

        def body(ctx: Ctx) -> None:
            self._verdict(ctx, [sent.view.nbytes, [k * size for k in counts]], self._sides.sums)
            self._reduced(ctx, sent.view, lambda got: _fold(
                [np.asarray(v).reshape(-1) for v in got], f),
                out, lambda value, i: value[at[i]:at[i] + counts[i]])
        return body, unpacking(recv), packing(sent)

    def _build_allgather(self, what: str, sendbuf: Any, recvbuf: Any) -> Plan:
        self._plain(what, sendbuf, recvbuf)
        sent = spec(sendbuf, what, packs=True)
        r = spec(recvbuf, what, per=max(self._nr, 1), packs=True)
        rows = r.view.reshape(self._nr, -1) if self._nr else r.view
        return self._swap([sent.view] * self._nr, [rows[j] for j in range(self._nr)], sent, r)

    def _build_allgatherv(self, what: str, sendbuf: Any, recvbuf: Any) -> Plan:
        self._plain(what, sendbuf, recvbuf)
        sent = spec(sendbuf, what, packs=True)
        r = vspec(recvbuf, what, self._nr, packs=True)
        return self._swap([sent.view] * self._nr, _blocks(r), sent, r)

    def _build_alltoall(self, what: str, sendbuf: Any, recvbuf: Any) -> Plan:
        self._plain(what, sendbuf, recvbuf)
        nr = max(self._nr, 1)
        s = spec(sendbuf, what, per=nr, packs=True)
        r = spec(recvbuf, what, per=nr, packs=True)
        blocks = s.view.reshape(self._nr, -1) if self._nr else s.view
        rows = r.view.reshape(self._nr, -1) if self._nr else r.view
        return self._swap([blocks[j] for j in range(self._nr)],
                          [rows[j] for j in range(self._nr)], s, r)

    def _build_alltoallv(self, what: str, sendbuf: Any, recvbuf: Any) -> Plan:
        self._plain(what, sendbuf, recvbuf)
        s = vspec(sendbuf, what, self._nr, packs=True)
        r = vspec(recvbuf, what, self._nr, packs=True)
        return self._swap(_blocks(s), _blocks(r), s, r)

    def _build_alltoallw(self, what: str, sendbuf: Any, recvbuf: Any) -> Plan:
        """(neighbor.py's Wblocks: each block's bytes, a derived datatype's
        packed at the call or each start and unpacked at the wait)"""
        from .neighbor import Wblocks       # (neighbor.py imports comm.py, which imports this)
        self._plain(what, sendbuf, recvbuf)
        w = Wblocks(self._g, sendbuf, recvbuf, what, self._nr)
        raw = np.empty(sum(w.recvs), np.uint8)
        body, _, _ = self._swap(_cut(w.flat, w.sends), _cut(raw, w.recvs), None, None)
        return body, lambda _: w.place(raw), w.pack

    Barrier, Ibarrier, Barrier_init = _forms("Barrier", _build_barrier)
    Bcast, Ibcast, Bcast_init = _forms("Bcast", _build_bcast)
    Gather, Igather, Gather_init = _forms("Gather", _build_gather)
    Gatherv, Igatherv, Gatherv_init = _forms("Gatherv", _build_gatherv)
    Scatter, Iscatter, Scatter_init = _forms("Scatter", _build_scatter)
    Scatterv, Iscatterv, Scatterv_init = _forms("Scatterv", _build_scatterv)
    Reduce, Ireduce, Reduce_init = _forms("Reduce", _build_reduce)
    Allreduce, Iallreduce, Allreduce_init = _forms("Allreduce", _build_allreduce)
    Reduce_scatter, Ireduce_scatter, Reduce_scatter_init = \
        _forms("Reduce_scatter", _build_reduce_scatter)
    Reduce_scatter_block, Ireduce_scatter_block, Reduce_scatter_block_init = \
        _forms("Reduce_scatter_block", _build_reduce_scatter_block)
    Allgather, Iallgather, Allgather_init = _forms("Allgather", _build_allgather)
    Allgatherv, Iallgatherv, Allgatherv_init = _forms("Allgatherv", _build_allgatherv)
    Alltoall, Ialltoall, Alltoall_init = _forms("Alltoall", _build_alltoall)
    Alltoallv, Ialltoallv, Alltoallv_init = _forms("Alltoallv", _build_alltoallv)
    Alltoallw, Ialltoallw, Alltoallw_init = _forms("Alltoallw", _build_alltoallw)
    barrier = Barrier


def _blocks(b: Buf) -> list[np.ndarray]:
    """A v-spec's blocks, one a rank (views of its ``view``)."""
    assert b.counts is not None and b.displs is not None
    return [b.view[d:d + k] for k, d in zip(b.counts, b.displs)]


def _cut(flat: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """``flat``'s consecutive blocks of ``sizes``."""
    at = np.cumsum([0] + sizes).tolist()
    return [flat[at[i]:at[i + 1]] for i in range(len(sizes))]


def _fold(items: list[Any], f: Callable[[Any, Any], Any]) -> Any:
    """``items[0] op items[1] op ...``, left to right."""
    acc = items[0]
    for x in items[1:]:
        acc = f(acc, x)
    return acc
