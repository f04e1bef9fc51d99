"""The public collectives, on host and device arrays alike.

Every function takes a communicator ``g`` (the world or any ``world.group``)
and must be called by every member of ``g`` in the same order. With
``async_op=True`` it returns a ``Work`` at once (do not touch the arrays
until ``work.wait()``); otherwise it returns its result. A rank that calls a
different collective, op, dtype, shape or root than its peers makes every
member raise ``mesh.MismatchError`` naming both ranks and both calls.

Each call takes the path of its array's kind::

    numpy array                      collectives.host.paths: same-host memory
                                       (collectives.shm) or sockets
    large device array: all_reduce,  collectives.device.paths: CUDA IPC or the
      reduce_scatter, all_gather,      ring through pinned slots, reductions
      broadcast                        on the GPU
    any other device array           staged whole: copied down, the host
                                       collective, copied back
    torch tensor                     as a numpy view (CPU) or a CuPy view (CUDA)
                                       of its memory, on the paths above
                                       (collectives.tensors: bfloat16, results)
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from mesh import Comm, MismatchError, tensors, wire
from mesh.device import is_device
from mesh.tensors import cpu_numpy

from .device import paths as device
from .device.paths import simple
from .host import paths as host
from .host.paths import (all_gather_object, all_to_all_object, barrier, broadcast_object,
                         gather_object, scatter_object)
from .runner import check_comm, named
from . import displs as _displs
from . import userop
from .userop import Op
from .host import tiny as hier_tiny
from .shm import tiny
from .tensors import is_tensor
from .tensors import run as _on_tensor

__all__ = ["all_reduce", "broadcast", "reduce", "all_gather", "reduce_scatter", "gather",
           "scatter", "all_to_all", "all_to_all_v", "all_gather_v", "reduce_scatter_v", "scan",
           "exscan", "gather_v", "scatter_v", "all_reduce_loc", "barrier", "broadcast_object",
           "all_gather_object", "gather_object", "scatter_object", "all_to_all_object",
           "broadcast_state"]

_staged_all_reduce = simple(host.all_reduce, in_place=True)
_staged_all_gather = simple(host.all_gather, in_place=False)
_staged_reduce_scatter = simple(host.reduce_scatter, in_place=False)
_staged_broadcast = simple(host.broadcast, in_place=True)
_staged_reduce = simple(host.reduce, in_place=True)
_staged_gather = simple(host.gather, in_place=False)
_staged_scatter = simple(host.scatter, in_place=False)
_staged_all_to_all = simple(host.all_to_all, in_place=False)
_staged_all_to_all_v = simple(host.all_to_all_v, in_place=False)
_staged_all_gather_v = simple(host.all_gather_v, in_place=False)
_staged_reduce_scatter_v = simple(host.reduce_scatter_v, in_place=False)
_staged_scan = simple(host.scan, in_place=False)
_staged_gather_v = simple(host.gather_v, in_place=False)
_staged_scatter_v = simple(host.scatter_v, in_place=False)

_HALF_WIDE = np.dtype(np.float32, metadata={"name": "float16"})
"""float16 widened for an average: float32 whose fingerprint says float16
(as bfloat16's, mesh.tensors.BFLOAT16_WIDE), so that a rank averaging
float32 beside it is told of the mismatch, not averaged with it."""


def _half_avg(a: Any, op: str, written: bool = True) -> bool:
    """An average of float16 (a numpy array, of either byte order, a torch
    tensor or a CuPy array): taken in float32, so that no partial sum overflows (n
    ranks' 30000 made inf) and the mean is rounded once (as bfloat16's,
    collectives.tensors). ``written``: the call writes ``a`` (not a
    reduce off the root nor a reduce_scatter, whose array may be
    read-only: widened all the same, or its fingerprint would say float16
    where the others' say float16 too, and their float32 bytes would be
    read as float16). A numpy subclass (np.memmap) is widened as a plain
    array is, for the same reason."""
    if op != "avg":
        return False
    if isinstance(a, np.ndarray):   # (a read-only one written: refused as it is, by the call)
        dt = a.dtype
        return dt.kind == "f" and dt.itemsize == 2 and dt.metadata is None and (
            a.flags.writeable or not written)
    if is_tensor(a):
        return str(a.dtype) == "torch.float16"
    # a CuPy array: the device paths summed it in float16 too (three ranks' 30000: inf)
    return is_device(a) and hasattr(a, "astype") and getattr(a, "dtype", None) == np.float16


def _widened(call: Any, a: Any, in_place: bool, async_op: bool, same: bool = False) -> Any:
    """``call(wide)`` on a float32 copy of the float16 ``a``; its result
    rounded back to float16 once: into ``a`` when ``in_place``, else as a
    new array or tensor like ``a`` (``same``: ``a`` itself, untouched, as
    reduce returns it off the root)."""
    numpy, tensor = isinstance(a, np.ndarray), is_tensor(a)
    # (a CuPy array widens on its device, to plain float32: its fingerprint says
    # float32, as a CUDA tensor's does)
    wide = a.astype(_HALF_WIDE) if numpy else a.detach().float() if tensor else \
        a.astype(np.float32)
    cpu = tensor and wide.device.type == "cpu"
    res = call(wide.numpy().view(_HALF_WIDE) if cpu else wide)   # (a CPU tensor: its memory)

    def finish(result: Any) -> Any:
        if same:
            return a
        if not in_place:
            if result is None:
                return None
            if cpu:
                import torch
                return torch.from_numpy(result.astype(np.float16))
            return result.half() if tensor else result.astype(a.dtype)  # (its byte order)
        if not tensor:
            a[...] = wide
        else:
            import torch
            with torch.no_grad():     # (copy_ counts as a write for autograd)
                a.copy_(wide)
        return a
    # a host array's result is written back as the call completes, waited or not, as a
    # call on its own memory writes it (only at wait(): an average never waited left the
    # array as it was); a device array's at wait(), on its stream
    eager = in_place and (numpy or cpu)
    return device.DeviceWork(res, finish, eager) if async_op else finish(res)


def all_reduce(g: Comm, a: Any, op: str | Op = "sum", async_op: bool = False,
               algorithm: str | None = None, timeout: float | None = None) -> Any:
    """collectives.host.paths.all_reduce, for host and device arrays and tensors
    (a tiny numpy array the short way, collectives.shm.tiny, once a first
    call has settled it; float16 averaged in float32; a collectives.Op:
    collectives.userop)."""
    if isinstance(op, Op):
        return userop.all_reduce(g, a, op, async_op, timeout)
    if op == "avg" and _half_avg(a, op):
        return _widened(lambda w: all_reduce(g, w, op, async_op, algorithm, timeout), a,
                        True, async_op)
    if type(a) is np.ndarray and not async_op and algorithm is None:
        if tiny.all_reduce(g, a, op, timeout) is not None \
                or hier_tiny.all_reduce(g, a, op, timeout) is not None:
            return a
    check_comm(g, "all_reduce")
    if type(a) is not np.ndarray and is_tensor(a):
        view = cpu_numpy(a) if not async_op and algorithm is None else None
        if view is not None and (tiny.all_reduce(g, view, op, timeout) is not None
                                 or hier_tiny.all_reduce(g, view, op, timeout) is not None):
            # a tiny CPU tensor the short way too, in its own memory: autograd is told
            return tensors.written(a)
        return _on_tensor(all_reduce, "all_reduce", g, a, op=op, async_op=async_op,
                          algorithm=algorithm, timeout=timeout)
    if device.large(g, a, 1, algorithm, "rd"):
        return device.all_reduce(g, a, op, async_op, timeout)
    return _staged_all_reduce(g, a, op=op, async_op=async_op, timeout=timeout,
                              algorithm=algorithm)


def reduce_scatter(g: Comm, a: Any, op: str | Op = "sum", async_op: bool = False,
                   timeout: float | None = None) -> Any:
    """collectives.host.paths.reduce_scatter, for host and device arrays and tensors
    (a tiny numpy array or CPU tensor the short way, collectives.shm.tiny,
    once a first call has settled it; float16 averaged in float32; ``a``
    is only read; a collectives.Op: collectives.userop)."""
    if isinstance(op, Op):
        return userop.reduce_scatter(g, a, op, async_op, timeout)
    if op == "avg" and _half_avg(a, op, written=False):
        return _widened(lambda w: reduce_scatter(g, w, op, async_op, timeout), a, False,
                        async_op)
    if type(a) is np.ndarray and not async_op:
        if (mine := tiny.reduce_scatter(g, a, op, timeout)) is not None:
            return mine
    check_comm(g, "reduce_scatter")
    if type(a) is not np.ndarray and is_tensor(a):
        view = None if async_op else cpu_numpy(a)
        if view is not None and (mine := tiny.reduce_scatter(g, view, op, timeout)) is not None:
            return tensors.to_torch(mine, a)
        return _on_tensor(reduce_scatter, "reduce_scatter", g, a, op=op, async_op=async_op,
                          timeout=timeout)
    if device.large(g, a):
        return device.reduce_scatter(g, a, op, async_op, timeout)
    return _staged_reduce_scatter(g, a, op=op, async_op=async_op, timeout=timeout)


def all_gather(g: Comm, a: Any, async_op: bool = False, timeout: float | None = None) -> Any:
    """collectives.host.paths.all_gather, for host and device arrays and tensors
    (a tiny numpy array or CPU tensor the short way, collectives.shm.tiny,
    once a first call has settled it)."""
    if type(a) is np.ndarray and not async_op:
        if (rows := tiny.all_gather(g, a, timeout)) is not None:
            return rows
    check_comm(g, "all_gather")
    if type(a) is not np.ndarray and is_tensor(a):
        view = None if async_op else cpu_numpy(a)
        if view is not None and (rows := tiny.all_gather(g, view, timeout)) is not None:
            return tensors.to_torch(rows, a)
        return _on_tensor(all_gather, "all_gather", g, a, async_op=async_op, timeout=timeout)
    if device.large(g, a, g.size):
        return device.all_gather(g, a, async_op, timeout)
    return _staged_all_gather(g, a, async_op=async_op, timeout=timeout)


def broadcast(g: Comm, a: Any, root: int = 0, async_op: bool = False,
              algorithm: str | None = None, timeout: float | None = None) -> Any:
    """collectives.host.paths.broadcast, for host and device arrays and
    tensors: through CUDA IPC when the group can, else staged (a tiny numpy
    array or CPU tensor the short way, collectives.shm.tiny, once a first
    call has settled it)."""
    if type(a) is np.ndarray and not async_op and algorithm is None:
        if tiny.broadcast(g, a, root, timeout) is not None:
            return a
    check_comm(g, "broadcast")
    if type(a) is not np.ndarray and is_tensor(a):
        view = cpu_numpy(a) if not async_op and algorithm is None else None
        if view is not None and tiny.broadcast(g, view, root, timeout) is not None:
            return tensors.written(a)
        return _on_tensor(broadcast, "broadcast", g, a, root=root, async_op=async_op,
                          algorithm=algorithm, timeout=timeout)
    if device.large(g, a) and algorithm is None:
        return device.broadcast(g, a, root, async_op, timeout)
    return _staged_broadcast(g, a, root=root, async_op=async_op, timeout=timeout,
                             algorithm=algorithm)


def reduce(g: Comm, a: Any, root: int = 0, op: str | Op = "sum", async_op: bool = False,
           algorithm: str | None = None, timeout: float | None = None) -> Any:
    """collectives.host.paths.reduce, for host and device arrays and tensors
    (a tiny numpy array or CPU tensor the short way, collectives.shm.tiny,
    once a first call has settled it; float16 averaged in float32; a
    collectives.Op: collectives.userop)."""
    if isinstance(op, Op):
        return userop.reduce(g, a, op, root, async_op, timeout)
    check_comm(g, "reduce")
    if _half_avg(a, op, g.rank == root):
        return _widened(lambda w: reduce(g, w, root, op, async_op, algorithm, timeout), a,
                        g.rank == root, async_op, same=g.rank != root)
    if type(a) is np.ndarray and not async_op and algorithm is None:
        if tiny.reduce(g, a, root, op, timeout) is not None:
            return a
    if type(a) is not np.ndarray and is_tensor(a):
        view = cpu_numpy(a) if not async_op and algorithm is None else None
        if view is not None and tiny.reduce(g, view, root, op, timeout) is not None:
            return tensors.written(a) if g.rank == root else a
        return _on_tensor(reduce, "reduce", g, a, root=root, op=op, async_op=async_op,
                          algorithm=algorithm, timeout=timeout)
    return _staged_reduce(g, a, root=root, op=op, async_op=async_op, algorithm=algorithm,
                          timeout=timeout)


def gather(g: Comm, a: Any, root: int = 0, async_op: bool = False,
           timeout: float | None = None) -> Any:
    """collectives.host.paths.gather, for host and device arrays and tensors
    (a tiny numpy array or CPU tensor the short way, collectives.shm.tiny,
    once a first call has settled it)."""
    if type(a) is np.ndarray and not async_op:
        if (rows := tiny.gather(g, a, root, timeout)) is not None:
            return rows[0]
    check_comm(g, "gather")
    if type(a) is not np.ndarray and is_tensor(a):
        view = None if async_op else cpu_numpy(a)
        if view is not None and (rows := tiny.gather(g, view, root, timeout)) is not None:
            return None if rows[0] is None else tensors.to_torch(rows[0], a)
        return _on_tensor(gather, "gather", g, a, root=root, async_op=async_op,
                          timeout=timeout)
    return _staged_gather(g, a, root=root, async_op=async_op, timeout=timeout)


def scatter(g: Comm, a: Any = None, root: int = 0, async_op: bool = False,
            timeout: float | None = None, dtype: Any = None,
            shape: tuple[int, ...] | None = None) -> Any:
    """collectives.host.paths.scatter, for host and device arrays and tensors.
    A tensor passed on a rank that is not the root (where ``a`` is ignored)
    makes its row come back as a tensor of that dtype and device; the
    root's rows must have that dtype (``dtype=``: a numpy dtype, to check
    it for a row that comes back as a numpy array) and, given ``shape``,
    that shape (a tiny numpy array the short way, collectives.shm.tiny, once
    a first call has settled it)."""
    if (a is None or type(a) is np.ndarray) and not async_op:
        if (row := tiny.scatter(g, a, root, timeout, dtype, shape)) is not None:
            return row
    check_comm(g, "scatter")
    if type(a) is not np.ndarray and is_tensor(a):
        return _on_tensor(scatter, "scatter", g, a, root=root, async_op=async_op,
                          timeout=timeout, shape=shape)
    return _staged_scatter(g, a, root=root, async_op=async_op, timeout=timeout, dtype=dtype,
                           shape=shape)


def all_to_all(g: Comm, a: Any, async_op: bool = False, timeout: float | None = None) -> Any:
    """collectives.host.paths.all_to_all, for host and device arrays and tensors
    (a tiny numpy array or CPU tensor the short way, collectives.shm.tiny,
    once a first call has settled it)."""
    if type(a) is np.ndarray and not async_op:
        if (got := tiny.all_to_all(g, a, timeout)) is not None:
            return got
    check_comm(g, "all_to_all")
    if type(a) is not np.ndarray and is_tensor(a):
        view = None if async_op else cpu_numpy(a)
        if view is not None and (got := tiny.all_to_all(g, view, timeout)) is not None:
            return tensors.to_torch(got, a)
        return _on_tensor(all_to_all, "all_to_all", g, a, async_op=async_op, timeout=timeout)
    return _staged_all_to_all(g, a, async_op=async_op, timeout=timeout)


def all_to_all_v(g: Comm, a: Any, send_counts: Any, recv_counts: Any = None,
                 async_op: bool = False, timeout: float | None = None,
                 send_displs: Any = None, recv_displs: Any = None, out: Any = None) -> Any:
    """all_to_all with blocks of unequal sizes (MPI's Alltoallv, torch's
    ``all_to_all_single`` with split sizes; a mixture of experts'
    dispatch): the first ``send_counts[0]`` rows of ``a`` go to rank 0,
    the next ``send_counts[1]`` to rank 1, and so on; returns the rows
    received, in rank order (``recv_counts[j]`` from rank j), as an array
    (or tensor) like ``a``. ``recv_counts=None``: the counts are exchanged
    first (one more all_to_all, blocking even with ``async_op``). A pair
    of ranks that disagree on a count raise MismatchError naming both
    counts (on one host every rank does); host and device arrays and
    tensors. Tiny and repeated on one host: the short way
    (collectives.shm.tiny). ``send_displs``, ``recv_displs`` and ``out=``
    (MPI's sdispls and rdispls, and its receive buffer): where the blocks
    lie instead (collectives.displs; ``recv_counts`` required with the
    latter two)."""
    if send_displs is not None or recv_displs is not None or out is not None:
        return _displs.all_to_all_v(_all_to_all_v, g, a, send_counts, recv_counts, send_displs,
                                   recv_displs, out, async_op, timeout)
    return _all_to_all_v(g, a, send_counts, recv_counts, async_op, timeout)


def _all_to_all_v(g: Comm, a: Any, send_counts: Any, recv_counts: Any = None,
                  async_op: bool = False, timeout: float | None = None,
                  bad: str | None = None) -> Any:
    """all_to_all_v, packed; ``bad``: what is wrong with the caller's
    other arguments (collectives.displs), failing the call on every rank."""
    check_comm(g, "all_to_all_v")
    if type(a) is not np.ndarray and is_tensor(a):
        return _on_tensor(_all_to_all_v, "all_to_all_v", g, a, send_counts=send_counts,
                          recv_counts=recv_counts, async_op=async_op, timeout=timeout, bad=bad)
    n, me = g.size, f"rank {g.ranks[g.rank]}: all_to_all_v on group {g.name}"
    given_bad = bad
    sends, bad = _counts(send_counts, "send_counts", n, me)
    if recv_counts is None:     # (-1s: this rank's counts are wrong, its peers learn it)
        column = np.array(sends if bad is None else [-1] * n, np.int64).reshape(n, 1)
        got = tiny.all_to_all(g, column, timeout)   # (a loop's counts: the short way)
        if got is None:
            got = host.all_to_all(g, column, timeout=timeout)
        recvs = [int(k) for k in got.reshape(-1)]
        wrong = [named(g, j) for j, k in enumerate(recvs) if k < 0]
        if wrong and bad is None:
            bad = f"{me}: the send_counts of {', '.join(wrong)} are not valid (see their error)"
    else:
        recvs, bad_recv = _counts(recv_counts, "recv_counts", n, me)
        bad = bad or bad_recv
    check = _fails_with(bad or given_bad)        # (under the call's tag: every rank fails the call)
    return _staged_all_to_all_v(g, a, sends, recvs, async_op=async_op, timeout=timeout,
                                check=check)


def all_gather_v(g: Comm, a: Any, counts: Any = None, async_op: bool = False,
                 timeout: float | None = None, displs: Any = None, out: Any = None) -> Any:
    """all_gather of arrays whose first axis differs from rank to rank
    (MPI's Allgatherv, torch's ``all_gather`` of uneven tensors): every
    rank's ``a`` concatenated along axis 0 in rank order, a new array (or
    tensor) of sum(counts) rows; ``a`` is only read. ``counts``: each
    rank's rows (``g.size`` integers >= 0, as a list, array or tensor; this
    rank's ``a`` has ``counts[rank]``); None: exchanged first (one small
    all_gather more, blocking even with ``async_op``). The rows' shape
    (a.shape[1:]) and dtype must be alike on every rank. Counts that
    differ between ranks make every rank raise MismatchError naming two
    ranks and their counts; counts that are not valid, or an ``a`` of
    other rows than its count, fail the call on every rank. Host and
    device arrays and tensors; the ring of all_gather, the same-host board,
    or across hosts its two levels (from MESH_COLL_SMALL of result up), with
    chunks of the counts' sizes (empty ones included). ``displs`` (MPI's,
    in rows; ``counts`` required) places rank r's rows at ``displs[r]``
    instead, in ``out=`` when given (its other rows kept, and returned),
    else in a new zeroed array of the rows they reach; ``out=`` alone
    takes them packed (collectives.displs)."""
    if displs is not None or out is not None:
        return _displs.all_gather_v(_all_gather_v, g, a, counts, displs, out, async_op,
                                    timeout)
    return _all_gather_v(g, a, counts, async_op, timeout)


def _all_gather_v(g: Comm, a: Any, counts: Any = None, async_op: bool = False,
                  timeout: float | None = None, bad: str | None = None) -> Any:
    """all_gather_v, packed; ``bad``: as _all_to_all_v's."""
    check_comm(g, "all_gather_v")
    if type(a) is not np.ndarray and is_tensor(a):
        return _on_tensor(_all_gather_v, "all_gather_v", g, a, counts=counts,
                          async_op=async_op, timeout=timeout, bad=bad)
    n, me = g.size, f"rank {g.ranks[g.rank]}: all_gather_v on group {g.name}"
    given_bad = bad
    if counts is None:      # (-1: this rank's array has no rows, its peers learn it)
        rows: Any = getattr(a, "shape", ())
        mine = int(rows[0]) if len(rows) else -1
        count = np.array([mine], np.int64)
        every = tiny.all_gather(g, count, timeout)  # (a loop's counts: the short way)
        if every is None:
            every = host.all_gather(g, count, timeout=timeout)
        every = every.reshape(-1)
        got = [int(k) for k in every]
        wrong = [named(g, j) for j, k in enumerate(got) if k < 0]
        bad = None if not wrong else f"{me}: the arrays of {', '.join(wrong)} have no rows " \
                                     f"(a 0-d array or not an array: see their error)"
        if bad is not None and mine < 0:
            bad = None      # (this rank's own call says what is wrong with its array)
        sizes = [max(0, k) for k in got]
    else:
        sizes, bad = _counts(counts, "counts", n, me)
    check = _fails_with(bad or given_bad)        # (under the call's tag: every rank fails the call)
    return _staged_all_gather_v(g, a, sizes, async_op=async_op, timeout=timeout, check=check)


def reduce_scatter_v(g: Comm, a: Any, counts: Any, op: str | Op = "sum",
                     async_op: bool = False, timeout: float | None = None) -> Any:
    """reduce_scatter with shares of unequal sizes (MPI's Reduce_scatter
    with its recvcounts, torch's ``reduce_scatter`` of uneven tensors):
    ``a`` (sum(counts) rows, on every rank) reduced over the group by
    ``op``; rank r gets rows [off_r, off_r + counts[r]) of the result
    (off_r = counts[0] + ... + counts[r-1]; none where its count is 0), a
    new array (or tensor) like ``a``, which is only read. ``counts``: as
    all_gather_v's (required). Counts that differ between ranks make every
    rank raise MismatchError naming two ranks and their counts. Host and
    device arrays and tensors (bfloat16, and float16 averaged, reduced in
    float32); the ring of reduce_scatter, the same-host board, or across
    hosts its two levels, with chunks of the counts' sizes. A collectives.Op:
    collectives.userop."""
    if isinstance(op, Op):
        return userop.reduce_scatter_v(g, a, counts, op, async_op, timeout)
    if _half_avg(a, op, written=False):
        return _widened(lambda w: reduce_scatter_v(g, w, counts, op, async_op, timeout), a,
                        False, async_op)
    check_comm(g, "reduce_scatter_v")
    if type(a) is not np.ndarray and is_tensor(a):
        return _on_tensor(reduce_scatter_v, "reduce_scatter_v", g, a, counts=counts, op=op,
                          async_op=async_op, timeout=timeout)
    sizes, check = _counted(g, counts, "reduce_scatter_v")
    return _staged_reduce_scatter_v(g, a, sizes, op=op, async_op=async_op, timeout=timeout,
                                    check=check)


def gather_v(g: Comm, a: Any, counts: Any, root: int = 0, async_op: bool = False,
             timeout: float | None = None, displs: Any = None, out: Any = None) -> Any:
    """gather of arrays whose first axis differs from rank to rank (MPI's
    Gatherv): every rank's ``a`` concatenated along axis 0 in rank order
    on the root, a new array (or tensor) of sum(counts) rows; None on the
    other ranks; ``a`` is only read. ``counts``: as all_gather_v's
    (required; this rank's ``a`` has ``counts[rank]`` rows). The rows'
    shape (a.shape[1:]) and dtype must be alike on every rank. Counts that
    differ between ranks make every rank raise MismatchError naming two
    ranks and their counts; counts that are not valid, or an ``a`` of
    other rows than its count, fail the call on every rank. Host and
    device arrays and tensors; gather's paths (the same-host board,
    sockets: one message a rank). ``displs`` and ``out=``, the root's: as
    all_gather_v's (ignored on the other ranks)."""
    if displs is not None or out is not None:
        return _displs.gather_v(_gather_v, g, a, counts, root, displs, out, async_op, timeout)
    return _gather_v(g, a, counts, root, async_op, timeout)


def _gather_v(g: Comm, a: Any, counts: Any, root: int = 0, async_op: bool = False,
              timeout: float | None = None, bad: str | None = None) -> Any:
    """gather_v, packed; ``bad``: as _all_to_all_v's."""
    check_comm(g, "gather_v")
    if type(a) is not np.ndarray and is_tensor(a):
        return _on_tensor(_gather_v, "gather_v", g, a, counts=counts, root=root,
                          async_op=async_op, timeout=timeout, bad=bad)
    sizes, check = _counted(g, counts, "gather_v", bad)
    return _staged_gather_v(g, a, sizes, root=root, async_op=async_op, timeout=timeout,
                            check=check)


def scatter_v(g: Comm, a: Any, counts: Any, root: int = 0, async_op: bool = False,
              timeout: float | None = None, dtype: Any = None, displs: Any = None) -> Any:
    """scatter of blocks of unequal sizes (MPI's Scatterv): rank r gets
    rows [off_r, off_r + counts[r]) of the root's ``a`` (sum(counts) rows;
    off_r = counts[0] + ... + counts[r-1]), a new array (or tensor) like
    it. ``a`` is ignored (may be None) on the other ranks; a tensor there
    makes its rows come back as a tensor of that dtype and device, and the
    root's rows must have that dtype (``dtype=``: a numpy dtype, to check
    it for rows that come back as a numpy array; MismatchError naming
    both). ``counts``: as all_gather_v's (required). Counts that differ
    between ranks make every rank raise MismatchError naming two ranks and
    their counts. Host and device arrays and tensors; scatter's paths (the
    same-host board, sockets). ``displs`` (MPI's, in rows; the root's,
    ignored elsewhere): rank r's rows are ``a[displs[r]:displs[r] +
    counts[r]]`` instead, blocks that may not overlap (collectives.displs:
    cut out of ``a``, one copy)."""
    if displs is not None:
        return _displs.scatter_v(_scatter_v, g, a, counts, root, displs, async_op, timeout,
                                 dtype)
    return _scatter_v(g, a, counts, root, async_op, timeout, dtype)


def _scatter_v(g: Comm, a: Any, counts: Any, root: int = 0, async_op: bool = False,
               timeout: float | None = None, dtype: Any = None,
               bad: str | None = None) -> Any:
    """scatter_v, packed; ``bad``: as _all_to_all_v's."""
    check_comm(g, "scatter_v")
    if type(a) is not np.ndarray and is_tensor(a):
        return _on_tensor(_scatter_v, "scatter_v", g, a, counts=counts, root=root,
                          async_op=async_op, timeout=timeout, bad=bad)
    sizes, check = _counted(g, counts, "scatter_v", bad)
    return _staged_scatter_v(g, a, sizes, root=root, async_op=async_op, timeout=timeout,
                             dtype=dtype, check=check)


def scan(g: Comm, a: Any, op: str | Op = "sum", async_op: bool = False,
         timeout: float | None = None) -> Any:
    """MPI's Scan (an inclusive prefix reduction): rank r gets the ``a`` of
    ranks 0..r reduced by ``op``, as a new array (or tensor) like ``a``;
    ``a`` is only read. Host and device arrays and tensors (bfloat16
    combined in float32); a collectives.Op (collectives.userop) too."""
    if isinstance(op, Op):
        return userop.scan(g, a, op, async_op, timeout)
    check_comm(g, "scan")
    if type(a) is not np.ndarray and is_tensor(a):
        return _on_tensor(scan, "scan", g, a, op=op, async_op=async_op, timeout=timeout)
    return _staged_scan(g, a, op=op, async_op=async_op, timeout=timeout)


def exscan(g: Comm, a: Any, op: str | Op = "sum", async_op: bool = False,
           timeout: float | None = None) -> Any:
    """MPI's Exscan (an exclusive prefix reduction): rank r gets the ``a``
    of ranks 0..r-1 reduced by ``op``; rank 0 gets None (as mpi4py's
    ``exscan``). As ``scan`` otherwise."""
    if isinstance(op, Op):
        return userop.scan(g, a, op, async_op, timeout, exclusive=True)
    check_comm(g, "exscan")
    if type(a) is not np.ndarray and is_tensor(a):
        return _on_tensor(exscan, "exscan", g, a, op=op, async_op=async_op, timeout=timeout)
    return _staged_scan(g, a, op=op, async_op=async_op, timeout=timeout, exclusive=True)


_NO_INDEX = np.iinfo(np.int64).max     # (a rank that does not hold the max: any index wins)


def all_reduce_loc(g: Comm, a: Any, index: Any = None, op: str = "max",
                   timeout: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MPI's MAXLOC and MINLOC (mpi4py's ``allreduce((value, index),
    op=MPI.MAXLOC)``): the max (``op="max"``) or min (``"min"``) of ``a``
    over the group, elementwise, and the ``index`` that came with it, the
    lowest of those of the ranks that hold it (MPI's rule for ties; a NaN
    wins, as in np.maximum). ``a``: a number or a numpy array of real or
    bool dtype, only read; ``index``: integers broadcastable to a's shape
    (default: this rank in ``g``). Returns ``(values, indices)``, new
    arrays of a's shape, of its dtype and int64, on every rank. Two
    all_reduce calls; arguments that are not valid on a rank fail the
    first on every rank."""
    check_comm(g, "all_reduce_loc")
    values, at, bad = _loc_args(g, a, index, op)
    t0 = time.monotonic()
    best = _staged_all_reduce(g, values.copy(), op=op if bad is None else "max",
                              timeout=timeout, check=_fails_with(bad))
    held = values == best
    if values.dtype.kind == "f":
        held |= np.isnan(values) & np.isnan(best)
    at[~held] = _NO_INDEX
    if isinstance(timeout, (int, float)):       # (it bounds the whole call)
        timeout = max(timeout - (time.monotonic() - t0), 1e-3)
    return best, _staged_all_reduce(g, at, op="min", timeout=timeout)


def _loc_args(g: Comm, a: Any, index: Any, op: str) -> tuple[np.ndarray, np.ndarray, str | None]:
    """all_reduce_loc's values (a copy of ``a``) and indices (int64, of its
    shape), and what is wrong with the arguments (None: nothing), for the
    first call's check to raise on every rank."""
    me = f"rank {g.ranks[g.rank]}: all_reduce_loc on group {g.name}"
    try:
        values = np.array(a)      # (a copy: a is only read)
        mine = np.asarray(g.rank if index is None else index)
    except (TypeError, ValueError, RuntimeError) as e:     # (a CUDA tensor, a ragged list)
        return np.zeros(()), np.zeros((), np.int64), f"{me}: {e}"
    at = np.zeros(values.shape, np.int64)
    if op not in ("max", "min"):
        return values, at, f"{me}: op must be 'max' (MPI's MAXLOC) or 'min' (MINLOC), not {op!r}"
    if values.dtype.kind not in "biuf":
        return values, at, f"{me}: values must be real numbers or bool, got dtype {values.dtype}"
    if mine.dtype.kind not in "iu":
        return values, at, f"{me}: index must be integers, got dtype {mine.dtype}"
    try:
        at[...] = np.broadcast_to(mine, values.shape)
    except ValueError as e:
        return values, at, f"{me}: index of shape {mine.shape} for values of shape " \
                           f"{values.shape}: {e}"
    return values, at, None


def _fails_with(bad: str | None) -> Callable[[], None]:
    """The check a staged call runs under its tag, so that every rank fails
    the call: it raises ValueError(bad) where this rank's arguments were not
    valid (``bad``: what is wrong with them, or None)."""
    def check() -> None:
        if bad is not None:
            raise ValueError(bad)
    return check


def _counted(g: Comm, counts: Any, what: str,
             more: str | None = None) -> tuple[list[int], Callable[[], None]]:
    """An uneven call's ``counts`` given whole, as ints (_counts), and
    the check its staged call runs under its tag (_fails_with; ``more``:
    what else is wrong with the call's arguments, if anything)."""
    sizes, bad = _counts(counts, "counts", g.size,
                         f"rank {g.ranks[g.rank]}: {what} on group {g.name}")
    return sizes, _fails_with(bad or more)


def _counts(counts: Any, what: str, n: int, me: str) -> tuple[list[int], str | None]:
    """``counts`` (a sequence, numpy array or tensor of ``n`` integers) as
    ints, or n zeros and what is wrong with them."""
    if is_tensor(counts) or isinstance(counts, np.ndarray):
        counts = counts.tolist()
    try:
        got = list(counts)
    except TypeError:
        return [0] * n, f"{me}: {what} must be a sequence of {n} row counts, got {counts!r:.80}"
    if len(got) != n or any(not isinstance(k, (int, np.integer)) or isinstance(k, bool)
                            or k < 0 for k in got):
        return [0] * n, f"{me}: {what} must be {n} integers >= 0 (one a rank), got {got!r:.200}"
    return [int(k) for k in got], None


_ARRAY = "__meshrun_array__"     # a leaf's place in broadcast_state's skeleton


def _unlike(mine: Any, root: Any, at: str) -> str:
    """Where a rank's state skeleton (broadcast_state) is not one the root's
    can replace: a key the root's lacks (the root may have more: an
    optimizer's state made by a step only the root has taken), a container
    of another kind, a list of another length, an array of another shape
    (dtypes may differ, a number may stand where the root has an array:
    the root's wins); "" where it is."""
    def kind(x: Any) -> str:
        if isinstance(x, dict):
            return "an array" if _ARRAY in x else "a dict"
        return "a list" if isinstance(x, list) else "a value"
    km, kr = kind(mine), kind(root)
    if km != kr and mine is not None and {km, kr} != {"a value", "an array"}:
        return f"{at} is {km}, the root's {kr}"     # (a number where the root has a
    if km != kr:                                    # tensor: an older optimizer's step)
        return ""
    if km == "a dict":
        for k, v in mine.items():
            if k not in root:
                return f"{at} has the key {k!r}, the root's has not (its keys: " \
                       f"{', '.join(map(repr, list(root)[:8]))}{', ...' if len(root) > 8 else ''})"
            why = _unlike(v, root[k], f"{at}[{k!r}]")
            if why:
                return why
    elif km == "a list":
        if len(mine) != len(root):
            return f"{at} has {len(mine)} items, the root's {len(root)}"
        for i, (v, w) in enumerate(zip(mine, root)):
            why = _unlike(v, w, f"{at}[{i}]")
            if why:
                return why
    elif km == "an array" and list(mine["shape"]) != list(root["shape"]):
        return f"{at} has shape {tuple(mine['shape'])}, the root's {tuple(root['shape'])}"
    return ""


def broadcast_state(g: Comm, state: Any = None, root: int = 0,
                    timeout: float | None = None) -> Any:
    """The root's ``state`` on every rank: a nested structure of dicts,
    lists and tuples (tuples come back as lists) whose leaves are numpy
    arrays, torch tensors and msgpack-able values (numbers, strings, None)
    -- a ``model.state_dict()``, an ``optimizer.state_dict()``, Horovod's
    ``broadcast_parameters`` / ``broadcast_optimizer_state``::

        model.load_state_dict(C.broadcast_state(world, model.state_dict()))
        opt.load_state_dict(C.broadcast_state(world, opt.state_dict()))

    (an optimizer whose state other ranks have not made yet, as Adam's
    before its first step, takes the root's). Collective; elsewhere
    ``state`` may be None, or this rank's own state, which is checked
    against the root's (a key the root's lacks, a list of another length,
    an array of another shape: every rank raises MismatchError naming the
    ranks and where, before any array moves: states passed in another
    order on one rank). The structures go as one object each, then each
    array by ``broadcast``; the other ranks get new arrays and tensors (a
    tensor on the CPU: ``load_state_dict`` moves it), the root its own
    ``state``."""
    check_comm(g, "broadcast_state")
    leaves: list[Any] = []
    me = f"rank {g.ranks[g.rank]}: broadcast_state on group {g.name}"

    def skeleton(x: Any, at: str) -> Any:
        if isinstance(x, dict):
            for k in x:
                if not isinstance(k, (str, int, float, bool)) and k is not None or k == _ARRAY:
                    ours = " (not this one: meshrun marks arrays with it)" if k == _ARRAY else ""
                    raise TypeError(f"{at} has the key {k!r}: keys are strings and numbers{ours}")
            return {k: skeleton(v, f"{at}[{k!r}]") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [skeleton(v, f"{at}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, np.ndarray) or is_tensor(x):
            if is_tensor(x):
                tensors.check(x, f"{at}")       # (a sparse or meta tensor, float8: named)
            elif not wire.dtype_ok(x.dtype):
                raise TypeError(f"{at} is an array of {x.dtype}: numeric and bool only")
            leaves.append(x)
            torch_dtype = str(x.dtype).removeprefix("torch.") if is_tensor(x) else None
            return {_ARRAY: len(leaves) - 1, "dtype": torch_dtype or x.dtype.str,
                    "shape": list(x.shape), "torch": torch_dtype is not None}
        if isinstance(x, np.generic):
            return x.item()
        if x is None or isinstance(x, (str, bytes, int, float, bool)):
            return x
        raise TypeError(f"{at} is of type {type(x).__name__}: the leaves are arrays, "
                        f"tensors, numbers, strings and None")
    bad = ""        # (told to the others by the exchange: every rank fails the call)
    try:
        root = host._root(g, root)
    except ValueError as e:
        bad, root = f"{me}: {e}", -1
    mine = g.rank == root
    sent: Any = None
    if bad:
        pass
    elif mine:
        try:
            sent = skeleton(state, "state")
        except TypeError as e:      # every rank raises it, none waits for the arrays
            sent = {_ARRAY: -1, "error": str(e)}
    elif state is not None:
        try:
            sent = skeleton(state, "state")
        except TypeError:           # (not sent: the root's is the one that counts)
            sent = None
        leaves.clear()
    # every rank's structure to every rank: each judges them all alike
    every = all_gather_object(g, [root, sent], timeout=timeout)
    roots = [r for r, _ in every]
    if bad:
        raise ValueError(bad)
    if -1 in roots:
        raise ValueError(f"{me}: {', '.join(named(g, r) for r, w in enumerate(roots) if w < 0)}"
                         f" gave a root that is not a rank of the group")
    if roots != [root] * g.size:
        raise MismatchError(f"{me}: the ranks gave other roots: " + ", ".join(
            f"{named(g, r)} root={w}" for r, w in enumerate(roots)))
    shape = every[root][1]
    if isinstance(shape, dict) and shape.get(_ARRAY) == -1:
        raise TypeError(f"{me}: the root's ({named(g, root)}'s) {shape['error']}")
    differ = [f"{named(g, r)}'s {why}" for r, (_, theirs) in enumerate(every)
              if r != root and theirs is not None
              for why in [_unlike(theirs, shape, "state")] if why]
    if differ:
        raise MismatchError(f"{me}: the state passed differs from the root's "
                            f"({named(g, root)}'s): " + "; ".join(differ))
    made: list[Any] = []

    def build(x: Any) -> Any:
        if isinstance(x, dict):
            if _ARRAY in x:
                if x["torch"]:
                    import torch
                    a: Any = torch.empty(x["shape"], dtype=getattr(torch, x["dtype"]))
                else:
                    a = np.empty(x["shape"], np.dtype(x["dtype"]))
                made.append(a)
                return a
            return {k: build(v) for k, v in x.items()}
        if isinstance(x, list):
            return [build(v) for v in x]
        return x
    out = state if mine else build(shape)
    for k in range(len(leaves) if mine else len(made)):
        if mine:
            a = leaves[k]
            a = a.detach() if is_tensor(a) else a
            if not (a.is_contiguous() if is_tensor(a) else a.flags.c_contiguous):
                a = a.contiguous() if is_tensor(a) else np.ascontiguousarray(a)
        else:
            a = made[k]
        broadcast(g, a, root=root, timeout=timeout)
    return out
