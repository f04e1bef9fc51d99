"""Horovod's join over meshrun: a rank that called ``join()`` answers its
peers' allreduces with zeros until every rank has joined.

Each call on the global process set first makes one tiny all_reduce (max)
on a second communicator (the control group, ``world.dup()``) saying what
it is (kind, op, dtype, shape) and whether each rank has joined; a joined
rank waits in that round and then makes the same collective with zeros.
Horovod's join covers allreduce only (and the DistributedOptimizer's): the
other collectives raise on every rank, naming a joined rank, where a rank
has joined.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mesh import Comm, MeshError

from .. import api as C
from .adasum import adasum_all_reduce
from .basics import OPS, Adasum, _s, _world

__all__ = ["join"]

ALLREDUCE, BARRIER, OPTIMIZER, ALLGATHER, BROADCAST, ALLTOALL, REDUCESCATTER, OBJECT = range(1, 9)
_UNFIT = 9      # an allreduce of a tensor a joined rank could not make zeros like
_UNJOINABLE = {ALLGATHER: "allgather", BROADCAST: "broadcast", ALLTOALL: "alltoall",
               REDUCESCATTER: "reducescatter", OBJECT: "broadcast_object / allgather_object"}
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
           torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
           torch.complex128]
_DIMS = 8
# [0] 1 where a rank has not joined, [1] a joined rank, [2] a rank joining in this round,
# [3] the kind, [4] the op or optimizer, [5] the dtype, [6] ndim, [7:] the shape
_LEN = 7 + _DIMS


def _round(v: np.ndarray, what: str) -> None:
    """One round on the control group; its error says which hvd call made it."""
    assert _s.ctl is not None
    try:
        C.all_reduce(_s.ctl, v, op="max")
    except MeshError as e:
        e.args = (f"rank {_s.ctl.rank}: hvd.{what}, in its round on the control group "
                  f"{_s.ctl.name} (the world's dup, for join): {e}",) + e.args[1:]
        raise


def announce(g: Comm, kind: int, what: str, tensor: Any = None, op: int = 0) -> None:
    """Before a call on the global set: tell a joined rank what it is (a
    tiny all_reduce, max, on the control group). A kind join does not
    cover raises on every rank where one has joined."""
    if g is not _s.world or g.size == 1 or _s.ctl is None:
        return
    v = np.full(_LEN, -1, np.int64)
    v[0], v[3], v[4] = 1, kind, op
    if tensor is not None:
        shape = tuple(tensor.shape)
        if len(shape) > _DIMS or tensor.dtype not in _DTYPES:
            v[3] = _UNFIT       # (refused below if a rank has joined)
        else:
            v[5], v[6] = _DTYPES.index(tensor.dtype), len(shape)
            v[7:7 + len(shape)] = shape
    _round(v, what)
    if v[1] >= 0 and kind not in (ALLREDUCE, BARRIER, OPTIMIZER):
        raise RuntimeError(f"rank {g.rank}: hvd.{what}: rank {v[1]} has called hvd.join(): "
                           f"Horovod's join covers allreduce (and DistributedOptimizer) only; "
                           f"stop every rank together instead (a flag reduced each step, "
                           f"op=hvd.Min)")
    if v[1] >= 0 and v[3] == _UNFIT:
        raise RuntimeError(f"rank {g.rank}: hvd.{what}: rank {v[1]} has called hvd.join() and "
                           f"cannot stand in for a {tensor.dtype} tensor of {tensor.dim()} "
                           f"dimensions")


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
        v = np.full(_LEN, -1, np.int64)
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
        elif kind == BARRIER:
            C.barrier(g)
        elif kind == OPTIMIZER:
            opt = _s.optimizers[int(v[4])]()
            if opt is None:
                raise RuntimeError(f"rank {g.rank}: hvd.join: the others step "
                                   f"DistributedOptimizer {int(v[4])}, which this rank no "
                                   f"longer has")
            opt._hvd_join_step()
        else:
            raise RuntimeError(f"rank {g.rank}: hvd.join: the ranks that have not joined called "
                               f"hvd.{_UNJOINABLE.get(kind, 'allreduce')}, which join does not "
                               f"cover (Horovod's covers allreduce only); they raise too")
