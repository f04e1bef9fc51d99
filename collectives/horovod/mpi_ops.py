"""Horovod's torch operations (``horovod.torch.mpi_ops``) over meshrun's
collectives: allreduce, allgather, broadcast, alltoall, reducescatter and
barrier with Horovod's arguments, and their handles (``poll``,
``synchronize``). Each call on the global process set is announced first
for join (collectives.horovod.control)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from .. import api as C
from ..torchsparse import sparse_all_reduce
from . import control, timeline
from .adasum import adasum_all_reduce
from .basics import (OPS, Adasum, Average, Compression, Max, Min, Product, ProcessSet, Sum,
                     _comm, _s, global_process_set)
from .timeline import now

__all__ = ["allreduce", "allreduce_async", "allreduce_", "allreduce_async_",
           "grouped_allreduce", "grouped_allreduce_async", "grouped_allreduce_",
           "grouped_allreduce_async_", "allgather", "allgather_async", "grouped_allgather",
           "broadcast", "broadcast_async", "broadcast_", "broadcast_async_", "alltoall",
           "alltoall_async", "reducescatter", "reducescatter_async", "barrier", "poll",
           "synchronize", "sparse_allreduce_async"]

# -- handles -------------------------------------------------------------------------------

class _Handle:
    """An asynchronous call: meshrun Works, then ``finish`` makes the result."""

    def __init__(self, works: list[Any], finish: Callable[[], Any]) -> None:
        self.works, self.finish = works, finish

    def done(self) -> bool:
        return all(w.done() for w in self.works)

    def result(self) -> Any:
        for w in self.works:
            w.wait()
        return self.finish()


def _handle(works: list[Any], finish: Callable[[], Any], h: int | None = None) -> int:
    h = next(_s.ids) if h is None else h
    _s.handles[h] = _Handle(works, finish)
    return h


def _row(kind: str, name: str | None, h: int, suffix: str = "") -> str | None:
    """The call's timeline row where rank 0 writes a timeline, else None."""
    return None if _s.timeline is None else timeline.row(kind, name, h) + suffix


def poll(handle: int) -> bool:
    """Whether the call is done (``synchronize`` then returns at once)."""
    h = _s.handles.get(handle)
    return h is None or h.done()


def synchronize(handle: int) -> Any:
    """Wait for the call and return its result (None for a handle unknown
    or already synchronized, as Horovod's)."""
    h = _s.handles.pop(handle, None)
    if h is None:
        return None
    out = h.result()
    if _s.timeline is not None:
        _s.timeline.settle()
    return out


def _op(op: int | None, average: bool | None, what: str) -> int:
    if op is None:
        op = Sum if average is False else Average
    elif average is not None:
        raise ValueError(f"hvd.{what}: give op= or the deprecated average=, not both")
    if op == Adasum and what == "allreduce":
        return op
    if op == Adasum:
        raise NotImplementedError(f"rank {_s.world.rank if _s.world else 0}: hvd.{what}: "
                                  f"op=hvd.Adasum is for allreduce (and "
                                  f"DistributedOptimizer) only, as Horovod's")
    if op not in OPS:
        raise ValueError(f"hvd.{what}: op={op!r}: one of hvd.Average, Sum, Min, Max, Product")
    return op


def adasum_checks(process_set: Any, g: Any, what: str) -> None:
    """Horovod's refusals of op=hvd.Adasum (on every rank alike, before
    any message)."""
    if process_set is not global_process_set:
        raise NotImplementedError(f"rank {g.rank}: hvd.{what}: Adasum does not support "
                                  f"non-global process sets yet (as Horovod's)")
    if g.size & (g.size - 1):
        raise NotImplementedError(f"rank {g.rank}: hvd.{what}: Running Adasum with non-power "
                                  f"of 2 ranks is not supported yet ({g.size} ranks; as "
                                  f"Horovod's)")


def _detached(t: Any) -> Any:
    return t.detach() if t.requires_grad else t


# -- allreduce -----------------------------------------------------------------------------

def _allreduce(tensor: Any, average: bool | None, op: int | None, pre: float, post: float,
               process_set: ProcessSet, async_op: bool, name: str | None = None,
               h: int = 0, row: str | None = None) -> tuple[list[Any], Callable[[], Any]]:
    """``tensor`` reduced in place: the call's Works (none where it ran at
    once, the tiny short way included) and what finishes it. ``row``: its
    timeline row (else ``allreduce.<name>``, or ``.noname.<h>``)."""
    op = _op(op, average, "allreduce")
    g = _comm(process_set, "allreduce")
    if tensor.is_sparse:
        return _sparse(tensor, op, pre, post, g, name, h)
    if op == Adasum:
        adasum_checks(process_set, g, "allreduce")
    t = _detached(tensor)
    tl = _s.timeline
    if tl is not None:
        row = row or timeline.row("allreduce", name, h)
    control.announce(g, control.ALLREDUCE, "allreduce", t, op, row)
    begin = now() if tl is not None else 0
    if pre != 1.0:
        t.mul_(pre)
    if op == Adasum:
        work = adasum_all_reduce(g, [t], async_op=async_op)
    else:
        work = C.all_reduce(g, t, op=OPS[op], async_op=async_op)
    if tl is not None and row is not None:
        adasum = "ADASUM" if op == Adasum else ""
        tl.watch(row, adasum or "ALLREDUCE", f"MESHRUN_{adasum and adasum + '_'}ALLREDUCE",
                 begin, work if async_op else None, t)

    def finish() -> Any:
        if post != 1.0:
            t.mul_(post)
        return tensor
    return ([work] if async_op else []), finish


def allreduce_async_(tensor: Any, average: bool | None = None, name: str | None = None,
                     op: int | None = None, prescale_factor: float = 1.0,
                     postscale_factor: float = 1.0,
                     process_set: ProcessSet = global_process_set) -> int:
    """In place; returns a handle for ``poll`` / ``synchronize``. A sparse
    COO tensor: every rank's summed (op=hvd.Sum) or averaged, written into
    it coalesced (``copy_``)."""
    h = next(_s.ids)
    return _handle(*_allreduce(tensor, average, op, prescale_factor, postscale_factor,
                               process_set, True, name, h), h)


def allreduce_async(tensor: Any, average: bool | None = None, name: str | None = None,
                    op: int | None = None, prescale_factor: float = 1.0,
                    postscale_factor: float = 1.0,
                    process_set: ProcessSet = global_process_set) -> int:
    """Into a new tensor (``tensor`` is left as it is)."""
    return allreduce_async_(tensor.detach().clone(), average, name, op, prescale_factor,
                            postscale_factor, process_set)


def allreduce_(tensor: Any, average: bool | None = None, name: str | None = None,
               op: int | None = None, prescale_factor: float = 1.0,
               postscale_factor: float = 1.0,
               process_set: ProcessSet = global_process_set) -> Any:
    return _allreduce(tensor, average, op, prescale_factor, postscale_factor, process_set,
                      False, name, next(_s.ids))[1]()


class _Allreduce(torch.autograd.Function):
    """allreduce as autograd sees it: the gradient is allreduced alike."""

    @staticmethod
    def forward(ctx: Any, tensor: Any, op: int, pre: float, post: float,  # type: ignore[override]
                process_set: ProcessSet) -> Any:
        ctx.args = (op, pre, post, process_set)
        return allreduce_(tensor.detach().clone(), None, None, op, pre, post, process_set)

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:      # type: ignore[override]
        op, pre, post, process_set = ctx.args
        return allreduce(grad, None, None, Compression.none, op, pre, post,
                         process_set), None, None, None, None


def allreduce(tensor: Any, average: bool | None = None, name: str | None = None,
              compression: Any = Compression.none, op: int | None = None,
              prescale_factor: float = 1.0, postscale_factor: float = 1.0,
              process_set: ProcessSet = global_process_set) -> Any:
    """A new tensor: ``tensor`` averaged (op=hvd.Average, the default),
    summed... over the ranks; differentiable, as Horovod's (every rank's
    backward then makes the gradient's allreduce)."""
    op = _op(op, average, "allreduce")
    if tensor.is_sparse:        # (uncompressed, as Horovod's sparse allreduce)
        return synchronize(allreduce_async(tensor, None, name, op, prescale_factor,
                                           postscale_factor, process_set))
    sent, ctx = compression.compress(tensor)
    if sent.requires_grad and torch.is_grad_enabled():
        out = _Allreduce.apply(sent, op, prescale_factor, postscale_factor, process_set)
    else:
        out = allreduce_(sent.clone(), None, name, op, prescale_factor, postscale_factor,
                         process_set)
    return compression.decompress(out, ctx)


def grouped_allreduce_async_(tensors: Sequence[Any], average: bool | None = None,
                             name: str | None = None, op: int | None = None,
                             prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                             process_set: ProcessSet = global_process_set) -> int:
    gh, n = next(_s.ids), len(tensors)
    hs = []
    for i, t in enumerate(tensors):     # (Horovod's rows: grouped_allreduce.<name>_1of2...)
        h = next(_s.ids)
        row = _row("grouped_allreduce", name, gh, f"_{i + 1}of{n}")
        hs.append(_handle(*_allreduce(t, average, op, prescale_factor, postscale_factor,
                                      process_set, True, name, h, row), h))
    return _handle([], lambda: [synchronize(h) for h in hs], gh)


def grouped_allreduce_async(tensors: Sequence[Any], average: bool | None = None,
                            name: str | None = None, op: int | None = None,
                            prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                            process_set: ProcessSet = global_process_set) -> int:
    return grouped_allreduce_async_([t.detach().clone() for t in tensors], average, name, op,
                                    prescale_factor, postscale_factor, process_set)


def grouped_allreduce_(tensors: Sequence[Any], average: bool | None = None,
                       name: str | None = None, op: int | None = None,
                       prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                       process_set: ProcessSet = global_process_set) -> list[Any]:
    return synchronize(grouped_allreduce_async_(tensors, average, name, op, prescale_factor,
                                                postscale_factor, process_set))


def grouped_allreduce(tensors: Sequence[Any], average: bool | None = None,
                      name: str | None = None, compression: Any = Compression.none,
                      op: int | None = None, prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0,
                      process_set: ProcessSet = global_process_set) -> list[Any]:
    n = len(tensors)
    return [allreduce(t, average, name and f"{name}_{i + 1}of{n}", compression, op,
                      prescale_factor, postscale_factor, process_set)
            for i, t in enumerate(tensors)]


# -- sparse --------------------------------------------------------------------------------

def _sparse(tensor: Any, op: int, pre: float, post: float, g: Any, name: str | None,
            h: int) -> tuple[list[Any], Callable[[], Any]]:
    """A sparse COO ``tensor``'s allreduce (collectives.torchsparse: every
    rank's indices and values, summed; op=hvd.Average then divides the
    values), written into it coalesced."""
    if op not in (Sum, Average):
        said = {Adasum: "Adasum", Min: "Min", Max: "Max", Product: "Product"}.get(op, op)
        raise NotImplementedError(f"rank {g.rank}: hvd.allreduce: a sparse tensor is reduced "
                                  f"with op=hvd.Sum or hvd.Average only, as Horovod's "
                                  f"sparse_allreduce_async (every rank's indices and values "
                                  f"gathered and summed), not op=hvd.{said}: pass "
                                  f"tensor.to_dense() for that")
    tl = _s.timeline
    row = timeline.row("allreduce", name, h) if tl is not None else None
    control.announce(g, control.SPARSE, "allreduce", tensor, op, row)
    begin = now() if tl is not None else 0
    t = tensor.detach()
    work = sparse_all_reduce(g, [t * pre if pre != 1.0 else t], "sum", True, None)
    if tl is not None and row is not None:
        tl.watch(row, "ALLREDUCE", "MESHRUN_ALLGATHER", begin, work)

    def finish() -> Any:
        out = _scaled(work.wait(), post, g.size if op == Average else 1)
        with torch.no_grad():
            tensor.copy_(out)
        return tensor
    return [work], finish


def _scaled(x: Any, factor: float, divisor: int) -> Any:
    """A coalesced sparse ``x``, its values times ``factor`` over ``divisor``
    (integers: divided as C divides)."""
    if factor != 1.0:
        x = x * factor
    if divisor == 1:
        return x
    return x / divisor if x.is_floating_point() or x.is_complex() else \
        torch.div(x, divisor, rounding_mode="trunc")


def sparse_allreduce_async(tensor: Any, name: str | None, op: int | None,
                           process_set: ProcessSet = global_process_set) -> Callable[[], Any]:
    """Horovod's: a sparse COO tensor's allreduce (op=hvd.Sum or Average);
    returns a function that waits and returns the coalesced result (a new
    tensor; ``tensor`` is left as it is)."""
    if not getattr(tensor, "is_sparse", False):
        raise TypeError(f"hvd.sparse_allreduce_async: a sparse COO tensor, not a "
                        f"{getattr(tensor, 'layout', type(tensor).__name__)} one "
                        f"(hvd.allreduce_async takes a dense one)")
    h = allreduce_async(tensor, None, name, op, 1.0, 1.0, process_set)
    return lambda: synchronize(h)


# -- the others ----------------------------------------------------------------------------

def allgather_async(tensor: Any, name: str | None = None,
                    process_set: ProcessSet = global_process_set) -> int:
    """Every rank's tensor concatenated along the first dimension, in rank
    order (first dimensions may differ; the others must not)."""
    g = _comm(process_set, "allgather")
    h, tl = next(_s.ids), _s.timeline
    row = _row("allgather", name, h)
    control.announce(g, control.ALLGATHER, "allgather", row=row)
    begin = now() if tl is not None else 0
    work = C.all_gather_v(g, tensor.detach(), async_op=True)
    if tl is not None and row is not None:
        tl.watch(row, "ALLGATHER", "MESHRUN_ALLGATHER", begin, work)
    return _handle([], work.wait, h)


def allgather(tensor: Any, name: str | None = None,
              process_set: ProcessSet = global_process_set) -> Any:
    return synchronize(allgather_async(tensor, name, process_set))


def grouped_allgather(tensors: Sequence[Any], name: str | None = None,
                      process_set: ProcessSet = global_process_set) -> list[Any]:
    return [allgather(t, name, process_set) for t in tensors]


def broadcast_async_(tensor: Any, root_rank: int, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> int:
    g = _comm(process_set, "broadcast")
    h, tl = next(_s.ids), _s.timeline
    row = _row("broadcast", name, h)
    control.announce(g, control.BROADCAST, "broadcast", row=row)
    begin = now() if tl is not None else 0
    work = C.broadcast(g, _detached(tensor), root=root_rank, async_op=True)
    if tl is not None and row is not None:
        tl.watch(row, "BROADCAST", "MESHRUN_BCAST", begin, work, tensor)
    return _handle([work], lambda: tensor, h)


def broadcast_async(tensor: Any, root_rank: int, name: str | None = None,
                    process_set: ProcessSet = global_process_set) -> int:
    return broadcast_async_(tensor.detach().clone(), root_rank, name, process_set)


def broadcast_(tensor: Any, root_rank: int, name: str | None = None,
               process_set: ProcessSet = global_process_set) -> Any:
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


def broadcast(tensor: Any, root_rank: int, name: str | None = None,
              process_set: ProcessSet = global_process_set) -> Any:
    return synchronize(broadcast_async(tensor, root_rank, name, process_set))


def alltoall_async(tensor: Any, splits: Any = None, name: str | None = None,
                   process_set: ProcessSet = global_process_set) -> int:
    """Rows ``splits[j]`` of ``tensor`` (first dimension, in rank order) go
    to rank j (None: equal shares); the handle's result is (the rows
    received in rank order, the splits received: an int32 tensor)."""
    g = _comm(process_set, "alltoall")
    h, tl = next(_s.ids), _s.timeline
    row = _row("alltoall", name, h)
    control.announce(g, control.ALLTOALL, "alltoall", row=row)
    begin = now() if tl is not None else 0
    n = g.size
    if splits is None:
        rows = tensor.shape[0] if tensor.dim() else 0
        if rows % n:
            raise ValueError(f"rank {g.rank}: hvd.alltoall: the first dimension ({rows}) "
                             f"must divide by the number of ranks ({n}) when no splits are "
                             f"given")
        sends = [rows // n] * n
    else:
        sends = [int(k) for k in (splits.tolist() if hasattr(splits, "tolist") else splits)]
    counts = C.all_to_all(g, np.array(sends if len(sends) == n else [-1] * n,
                                      np.int64).reshape(n, 1)).reshape(-1)
    work = C.all_to_all_v(g, tensor.detach(), sends, [int(k) for k in counts], async_op=True)
    if tl is not None and row is not None:
        tl.watch(row, "ALLTOALL", "MESHRUN_ALLTOALL", begin, work)
    got = torch.tensor([int(k) for k in counts], dtype=torch.int32)
    return _handle([], lambda: (work.wait(), got), h)


def alltoall(tensor: Any, splits: Any = None, name: str | None = None,
             process_set: ProcessSet = global_process_set) -> Any:
    """The rows received; with ``splits``, (rows, received splits), as
    Horovod's."""
    out, got = synchronize(alltoall_async(tensor, splits, name, process_set))
    return out if splits is None else (out, got)


def reducescatter_async(tensor: Any, name: str | None = None, op: int = Average,
                        process_set: ProcessSet = global_process_set,
                        prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> int:
    """``tensor`` reduced over the ranks; rank r gets its share of the
    first dimension (the first ``rows % size`` ranks one row more)."""
    op = _op(op, None, "reducescatter")
    g = _comm(process_set, "reducescatter")
    h, tl = next(_s.ids), _s.timeline
    row = _row("reducescatter", name, h)
    control.announce(g, control.REDUCESCATTER, "reducescatter", row=row)
    begin = now() if tl is not None else 0
    n = g.size
    rows = tensor.shape[0] if tensor.dim() else 0
    counts = [rows // n + (1 if r < rows % n else 0) for r in range(n)]
    t = tensor.detach()
    if prescale_factor != 1.0:
        t = t * prescale_factor
    work = C.reduce_scatter_v(g, t, counts, op=OPS[op], async_op=True)
    if tl is not None and row is not None:
        tl.watch(row, "REDUCESCATTER", "MESHRUN_REDUCESCATTER", begin, work)

    def finish() -> Any:
        out = work.wait()
        return out.mul_(postscale_factor) if postscale_factor != 1.0 else out
    return _handle([], finish, h)


def reducescatter(tensor: Any, name: str | None = None, compression: Any = Compression.none,
                  op: int = Average, process_set: ProcessSet = global_process_set,
                  prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> Any:
    sent, ctx = compression.compress(tensor)
    out = synchronize(reducescatter_async(sent, name, op, process_set, prescale_factor,
                                          postscale_factor))
    return compression.decompress(out, ctx)


def barrier(process_set: ProcessSet = global_process_set) -> None:
    g = _comm(process_set, "barrier")
    control.announce(g, control.BARRIER, "barrier")
    C.barrier(g)
