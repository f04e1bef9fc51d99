"""mpi4py's lowercase (object) collectives on an intercommunicator
(inter.py's Intercomm; its buffer ones: intercoll.py, whose checks and
runs these share): bcast, gather, scatter and reduce with MPI.ROOT on the
root, MPI.PROC_NULL on the rest of its group and the root's rank on the
other group; allgather and alltoall give each group the other group's
objects, allreduce the other group's reduction; each object pickled as
collectives.MPI's other object calls send them (tuples.py)."""
from __future__ import annotations

from typing import Any

from ..runner import Ctx
from .intercoll import InterCollectives, _fold, _role
from .objects import fold
from .tuples import unwrap, wrap
from .types import OPS, Op

__all__ = ["InterObjects"]

_SUM = OPS["SUM"]


class InterObjects(InterCollectives):
    """The object collectives of collectives.MPI's Intercomm."""

    def bcast(self, obj: Any, root: int = 0) -> Any:
        def body(ctx: Ctx) -> Any:
            role = _role(root)
            sent = wrap(obj) if role == "root" else None
            early = self._from_root(ctx, root, None, sent, role == "root")
            if role == "root":
                self._wait([ctx.isend(sent, self._ro + j) for j in range(self._nr)]
                           if early is None else early)
            elif role == "leaf":
                return unwrap(ctx.irecv(self._ro + root).wait())
            return None
        return self._run("bcast", body)

    def gather(self, sendobj: Any, root: int = 0) -> Any:
        def body(ctx: Ctx) -> Any:
            role = _role(root)
            self._rooted(ctx, root)
            if role == "root":
                return [unwrap(v) for v in self._wait([ctx.irecv(self._ro + j)
                                                       for j in range(self._nr)])]
            if role == "leaf":
                ctx.isend(wrap(sendobj), self._ro + root).wait()
            return None
        return self._run("gather", body)

    def scatter(self, sendobj: Any, root: int = 0) -> Any:
        def body(ctx: Ctx) -> Any:
            role = _role(root)
            self._rooted(ctx, root)
            if role == "root":
                if sendobj is None or len(sendobj) != self._nr:
                    raise ValueError(f"{self._me()}: collectives.MPI Intercomm.scatter: "
                                     f"the root passes {self._nr} objects (one a remote "
                                     f"rank), got {sendobj!r:.60}")
                self._wait([ctx.isend(wrap(o), self._ro + j) for j, o in enumerate(sendobj)])
            elif role == "leaf":
                return unwrap(ctx.irecv(self._ro + root).wait())
            return None
        return self._run("scatter", body)

    def reduce(self, sendobj: Any, op: Op = _SUM, root: int = 0) -> Any:
        """The root gets the other group's objects reduced as mpi4py's
        reduce folds them (objects.fold: a binomial tree in rank order)."""
        if not isinstance(op, Op):
            raise TypeError(f"collectives.MPI Intercomm.reduce: op must be an MPI.Op, "
                            f"got {op!r:.60}")

        def body(ctx: Ctx) -> Any:
            role = _role(root)
            self._rooted(ctx, root)
            if role == "root":
                return fold([unwrap(v) for v in self._wait([ctx.irecv(self._ro + j)
                                                            for j in range(self._nr)])],
                            op.fold)
            if role == "leaf":
                ctx.isend(wrap(sendobj), self._ro + root).wait()
            return None
        return self._run("reduce", body)

    def allreduce(self, sendobj: Any, op: Op = _SUM) -> Any:
        if not isinstance(op, Op):
            raise TypeError(f"collectives.MPI Intercomm.allreduce: op must be an MPI.Op, "
                            f"got {op!r:.60}")

        def body(ctx: Ctx) -> Any:
            return unwrap(self._reduced(ctx, wrap(sendobj), lambda got: wrap(
                _fold([unwrap(v) for v in got], op.fold)), None))
        return self._run("allreduce", body)

    def allgather(self, sendobj: Any) -> list[Any]:
        def body(ctx: Ctx) -> list[Any]:
            got = [ctx.irecv(self._ro + j) for j in range(self._nr)]
            self._wait([ctx.isend(wrap(sendobj), self._ro + j) for j in range(self._nr)])
            return [unwrap(v) for v in self._wait(got)]
        return self._run("allgather", body)

    def alltoall(self, sendobj: Any) -> list[Any]:
        """``sendobj[j]`` to remote rank j; a list of the remote group's, one
        a rank."""
        try:
            objs = list(sendobj)
        except TypeError:
            objs = None

        def body(ctx: Ctx) -> list[Any]:
            self._verdict(ctx, -1 if objs is None else len(objs), self._sides.lengths)
            assert objs is not None
            got = [ctx.irecv(self._ro + j) for j in range(self._nr)]
            self._wait([ctx.isend(wrap(o), self._ro + j) for j, o in enumerate(objs)])
            return [unwrap(v) for v in self._wait(got)]
        return self._run("alltoall", body)
