"""Horovod's join over meshrun: a rank that called ``join()`` answers its
peers' allreduces with zeros until every rank has joined.

Each call on the global process set first makes one tiny all_reduce (max)
on a second communicator (the control group, ``world.dup()``) saying what
it is (kind, op, dtype, shape) and whether each rank has joined; a joined
rank waits in that round and then makes the same collective with zeros.
Horovod's join covers allreduce only (and the DistributedOptimizer's): the
other collectives raise on every rank, naming a joined rank, where a rank
has joined. A sparse allreduce is answered with an empty sparse tensor.

The round is also Horovod's negotiation on rank 0's timeline: while rank 0
writes one, each rank puts the time it entered in the round (the
timeline's per-rank ready marks).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mesh import Comm, MeshError

from .. import api as C
from ..torchsparse import sparse_all_reduce
from .adasum import adasum_all_reduce
from .basics import OPS, Adasum, _s, _world
from .timeline import now

__all__ = ["join"]

ALLREDUCE, BARRIER, OPTIMIZER, ALLGATHER, BROADCAST, ALLTOALL, REDUCESCATTER, OBJECT = range(1, 9)
_UNFIT = 9      # an allreduce of a tensor a joined rank could not make zeros like
SPARSE = 10     # an allreduce of a sparse COO tensor (its sparse dimensions at [_SD])
# each kind as Horovod's request type (its timeline's NEGOTIATE_<type>)
_REQUEST = {ALLREDUCE: "ALLREDUCE", BARRIER: "BARRIER", OPTIMIZER: "ALLREDUCE",
            ALLGATHER: "ALLGATHER", BROADCAST: "BROADCAST", ALLTOALL: "ALLTOALL",
            REDUCESCATTER: "REDUCESCATTER", SPARSE: "ALLREDUCE"}
_UNJOINABLE = {ALLGATHER: "allgather", BROADCAST: "broadcast", ALLTOALL: "alltoall",
               REDUCESCATTER: "reducescatter", OBJECT: "broadcast_object / allgather_object"}
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
           torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
           torch.complex128]
_DIMS = 8
# [0] 1 where a rank has not joined, [1] a joined rank, [2] a rank joining in this round,
# [3] the kind, [4] the op or optimizer, [5] the dtype, [6] ndim, [7:] the shape, then
# [_SD] a sparse tensor's sparse dimensions, [_TL] 1 where rank 0 writes a timeline,
# [_REGROUP] 1 where a rank asks a DistributedOptimizer to regroup its buckets; while
# rank 0 writes a timeline (the last round said so, alike on every rank), [_LEN + r]
# when rank r entered
_SD = 7 + _DIMS
_TL = _SD + 1
_REGROUP = _TL + 1
_LEN = _REGROUP + 1


def _vector(g: Comm) -> np.ndarray:
    """A round's vector, its slots -1 (the max takes any rank's value);
    each rank's entry time where rank 0 writes a timeline."""
    v = np.full(_LEN + g.size if _s.stamps else _LEN, -1, np.int64)
    if _s.timeline is not None:
        v[_TL] = 1
        if _s.timeline.mark_cycles:
            _s.timeline.marker()
    if _s.stamps:
        v[_LEN + g.rank] = now()
    return v


def _round(v: np.ndarray, what: str) -> None:
    """One round on the control group; its error says which hvd call made it."""
    assert _s.ctl is not None
    try:
        C.all_reduce(_s.ctl, v, op="max")
    except MeshError as e:
        e.args = (f"rank {_s.ctl.rank}: hvd.{what}, in its round on the control group "
                  f"{_s.ctl.name} (the world's dup, for join): {e}",) + e.args[1:]
        raise
    _s.stamps = bool(v[_TL] > 0)


def announce(g: Comm, kind: int, what: str, tensor: Any = None, op: int = 0,
             row: str | None = None, regroup: bool = False) -> bool:
    """Before a call on the global set: tell a joined rank what it is (a
    tiny all_reduce, max, on the control group). A kind join does not
    cover raises on every rank where one has joined. ``row``: the call's
    timeline row where rank 0 writes one (its NEGOTIATE_ phase). Returns
    whether a rank passed ``regroup=True`` (a DistributedOptimizer's step:
    a gradient its buckets waited for did not come; False, alike on every
    rank, where no round is made)."""
    if g is not _s.world or g.size == 1 or _s.ctl is None:
        if row is not None and g is _s.world and _s.timeline is not None:
            _negotiated(row, kind, op, {0: now()})
        return False
    v = _vector(g)
    v[0], v[3], v[4], v[_REGROUP] = 1, kind, op, int(regroup)
    if tensor is not None:
        shape = tuple(tensor.shape)
        if len(shape) > _DIMS or tensor.dtype not in _DTYPES:
            v[3] = _UNFIT       # (refused below if a rank has joined)
        else:
            v[5], v[6] = _DTYPES.index(tensor.dtype), len(shape)
            v[7:7 + len(shape)] = shape
            if kind == SPARSE:
                v[_SD] = tensor.sparse_dim()
    entered = now() if row is not None and _s.timeline is not None else 0
    _round(v, what)
    if entered and _s.timeline is not None:
        stamps = {r: int(t) for r, t in enumerate(v[_LEN:]) if t >= 0} or {0: entered}
        _negotiated(str(row), kind, op, stamps)
    if v[1] >= 0 and kind not in (ALLREDUCE, BARRIER, OPTIMIZER, SPARSE):
        raise RuntimeError(f"rank {g.rank}: hvd.{what}: rank {v[1]} has called hvd.join(): "
                           f"Horovod's join covers allreduce (and DistributedOptimizer) only; "
                           f"stop every rank together instead (a flag reduced each step, "
                           f"op=hvd.Min)")
    if v[1] >= 0 and v[3] == _UNFIT:
        raise RuntimeError(f"rank {g.rank}: hvd.{what}: rank {v[1]} has called hvd.join() and "
                           f"cannot stand in for a {tensor.dtype} tensor of {tensor.dim()} "
                           f"dimensions")
    return bool(v[_REGROUP] > 0)


def _negotiated(row: str, kind: int, op: int, stamps: dict[int, int]) -> None:
    request = "ADASUM" if kind == ALLREDUCE and op == Adasum else _REQUEST.get(kind, "ALLREDUCE")
    _s.timeline.negotiated(row, request, stamps, now())


def join(device: int = -1) -> int:
    """This rank has no more data: until every rank has joined, it answers
    the others' allreduces (and DistributedOptimizer steps) with zeros, as
    Horovod's. Returns the rank that joined last."""
    g = _world("join")
    if g.size == 1 or _s.ctl is None:
        return g.rank
    where = torch.device("cpu") if device < 0 else torch.device("cuda", device)
    first = True
    while True:
        v = _vector(g)
        v[0], v[1], v[2] = 0, g.rank, g.rank if first else -1
        first = False
        _round(v, "join")
        if v[0] == 0:
            return int(v[2])
        kind = int(v[3])
        if kind == ALLREDUCE:
            shape = [int(d) for d in v[7:7 + int(v[6])]]
            zeros = torch.zeros(shape, dtype=_DTYPES[v[5]], device=where)
            if v[4] == Adasum:      # (zeros leave the others' Adasum as it is)
                adasum_all_reduce(g, [zeros])
            else:
                C.all_reduce(g, zeros, op=OPS[int(v[4])])
        elif kind == SPARSE:
            shape, sd = [int(d) for d in v[7:7 + int(v[6])]], int(v[_SD])
            empty = torch.sparse_coo_tensor(torch.zeros(sd, 0, dtype=torch.int64),
                                            torch.zeros([0] + shape[sd:], dtype=_DTYPES[v[5]]),
                                            shape, device=where, check_invariants=True)
            sparse_all_reduce(g, [empty], "sum", False, None)
        elif kind == BARRIER:
            C.barrier(g)
        elif kind == OPTIMIZER:
            opt = _s.optimizers[int(v[4])]()
            if opt is None:
                raise RuntimeError(f"rank {g.rank}: hvd.join: the others step "
                                   f"DistributedOptimizer {int(v[4])}, which this rank no "
                                   f"longer has")
            opt._hvd_join_step(bool(v[_REGROUP] > 0))
        else:
            raise RuntimeError(f"rank {g.rank}: hvd.join: the ranks that have not joined called "
                               f"hvd.{_UNJOINABLE.get(kind, 'allreduce')}, which join does not "
                               f"cover (Horovod's covers allreduce only); they raise too")
