"""Horovod's basics over meshrun: init and the ranks, process sets, the op
constants, Compression, and this process's state (the world, join's control
group, the outstanding handles, the DistributedOptimizers)."""
from __future__ import annotations

import itertools
import os
import re
import weakref
from typing import Any, Sequence

import torch

import mesh
from mesh import Comm, MeshError
from mesh.world import current

__all__ = ["init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size",
           "cross_rank", "cross_size", "is_homogeneous", "Average", "Sum", "Adasum", "Min",
           "Max", "Product", "HorovodInternalError", "ProcessSet", "global_process_set",
           "add_process_set", "remove_process_set", "Compression", "mpi_threads_supported",
           "mpi_enabled", "mpi_built", "gloo_enabled", "gloo_built", "nccl_built", "ddl_built",
           "ccl_built", "cuda_built", "rocm_built"]

# Horovod's op constants (its ReduceOp numbering) and meshrun's names for them
Average, Sum, Adasum, Min, Max, Product = 0, 1, 2, 3, 4, 5
OPS = {Average: "avg", Sum: "sum", Min: "min", Max: "max", Product: "prod"}

HorovodInternalError = MeshError    # meshrun's errors (mismatch, lost peer, timeout)


class ProcessSet:
    """Horovod's process set: the ranks (of the world) an operation runs
    over; a communicator of them (``world.group``) once registered."""

    def __init__(self, ranks: Sequence[int] | None = None) -> None:
        self.ranks = None if ranks is None else [int(r) for r in ranks]
        self.comm: Comm | None = None
        self.process_set_id: int | None = None

    def _g(self, what: str) -> Comm | None:
        if _s.world is None:
            raise ValueError(f"hvd.{what}: Horovod has not been initialized; use hvd.init()")
        if self.process_set_id is None:
            raise ValueError(f"rank {_s.world.rank}: hvd.{what}: process set {self.ranks} "
                             f"was not added (hvd.init(process_sets=...) or "
                             f"hvd.add_process_set)")
        return self.comm

    def size(self) -> int:
        return len(self.ranks) if self.ranks is not None else size()

    def rank(self) -> int:
        g = self._g("ProcessSet.rank")
        return -1 if g is None else g.rank

    def included(self) -> bool:
        return self._g("ProcessSet.included") is not None

    def __repr__(self) -> str:
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks})"


global_process_set = ProcessSet()


class _State:
    """This process's Horovod: the world, the control group join uses, the
    outstanding handles, the process sets and the DistributedOptimizers
    (numbered in creation order, alike on every rank)."""

    def __init__(self) -> None:
        self.world: Comm | None = None
        self.ctl: Comm | None = None
        self.owned: Any = None          # the mesh init() opened (shutdown closes it)
        self.handles: dict[int, Any] = {}
        self.ids = itertools.count(1)
        self.sets: list[ProcessSet] = []
        self.optimizers: list[weakref.ref[Any]] = []
        self.timeline: Any = None       # rank 0's open timeline (collectives.horovod.timeline)
        self.stamps = False     # the control rounds carry each rank's entry time (control.py)


_s = _State()


def init(comm: Any = None, process_sets: Sequence[ProcessSet] | str | None = None) -> None:
    """Join the job (the mesh this process has open, else ``mesh.init()``:
    meshrun, torchrun, mpirun, SLURM); a second call does nothing. ``comm``:
    a meshrun communicator to run over instead of the world, or a
    collectives.MPI one (Horovod's ``hvd.init(comm=MPI.COMM_WORLD)``, its
    mpi4py import changed too): the meshrun communicator it wraps."""
    if _s.world is not None:
        return
    if comm is not None and not isinstance(comm, Comm) \
            and isinstance(getattr(comm, "mesh", None), Comm):
        comm = comm.mesh
    if comm is not None and not isinstance(comm, Comm):
        raise TypeError(f"hvd.init(comm={type(comm).__name__}): pass a meshrun communicator "
                        f"or a collectives.MPI one (real mpi4py's communicators and rank "
                        f"lists are not taken)")
    world = comm if comm is not None else current()
    if world is None:
        world = _s.owned = mesh.init()
    _s.world, _s.ctl = world, world.dup()
    global_process_set.comm, global_process_set.process_set_id = world, 0
    global_process_set.ranks = list(range(world.size))
    _s.sets = [global_process_set]
    path = os.environ.get("HOROVOD_TIMELINE", "")
    if path and path != "DYNAMIC" and world.rank == 0:
        from .timeline import open_timeline
        try:
            open_timeline(path, _env_flag("HOROVOD_TIMELINE_MARK_CYCLES"), "init")
        except ValueError:
            shutdown()
            raise
    if isinstance(process_sets, str):      # ("dynamic": sets added later, as Horovod's)
        if process_sets != "dynamic":
            raise ValueError(f"hvd.init(process_sets={process_sets!r}): a list of "
                             f"ProcessSet, or \"dynamic\"")
        return
    for ps in process_sets or ():
        add_process_set(ps)


def _env_flag(name: str) -> bool:
    """Horovod's reading of a flag: a number above 0 (as strtol reads it)."""
    digits = re.match(r"\s*[+-]?\d+", os.environ.get(name, ""))
    return digits is not None and int(digits.group()) > 0


def shutdown() -> None:
    """Leave: the mesh init() opened is closed (one given to it, or opened
    before it, is left open); init() may be called again. The timeline
    being written is closed."""
    owned = _s.owned
    if _s.timeline is not None:
        _s.timeline.close()
    _s.__init__()       # type: ignore[misc]
    global_process_set.comm = global_process_set.process_set_id = None
    if owned is not None:
        owned.close()


def is_initialized() -> bool:
    return _s.world is not None


def _world(what: str) -> Comm:
    if _s.world is None:
        raise ValueError(f"hvd.{what}: Horovod has not been initialized; use hvd.init()")
    return _s.world


def rank() -> int:
    return _world("rank").rank


def size() -> int:
    return _world("size").size


def local_rank() -> int:
    return int(getattr(_world("local_rank"), "local_rank", 0))


def local_size() -> int:
    return int(getattr(_world("local_size"), "local_size", 1))


def _hosts(what: str) -> list[str]:
    """Each rank's host id (ranks alike share a host)."""
    g = _world(what)
    channel = g.collective_channel()
    return [channel.host(r) for r in range(g.size)]


def cross_rank() -> int:
    """This rank's host's index among the job's hosts (in rank order)."""
    hosts = _hosts("cross_rank")
    return list(dict.fromkeys(hosts)).index(hosts[rank()])


def cross_size() -> int:
    """How many hosts the job runs on."""
    return len(set(_hosts("cross_size")))


def is_homogeneous() -> bool:
    """Whether every host runs as many ranks."""
    hosts = _hosts("is_homogeneous")
    return len({hosts.count(h) for h in hosts}) == 1


def add_process_set(process_set: ProcessSet | Sequence[int]) -> ProcessSet:
    """Register a process set (every rank, in the same order, as Horovod's):
    its communicator is ``world.group(ranks)``, no message."""
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    world = _world("add_process_set")
    if ps.ranks is None:
        raise ValueError(f"rank {world.rank}: hvd.add_process_set: give the set's ranks")
    ps.comm = world.group(ps.ranks)
    ps.process_set_id = len(_s.sets)
    _s.sets.append(ps)
    return ps


def remove_process_set(process_set: ProcessSet) -> bool:
    if process_set is global_process_set or process_set not in _s.sets:
        return False
    _s.sets[_s.sets.index(process_set)] = ProcessSet()   # (ids stay as they were)
    process_set.comm = process_set.process_set_id = None
    return True


def mpi_threads_supported() -> bool:
    return False


mpi_enabled = mpi_built = gloo_enabled = gloo_built = mpi_threads_supported
nccl_built = ddl_built = ccl_built = cuda_built = rocm_built = mpi_threads_supported


class _NoneCompressor:
    @staticmethod
    def compress(tensor: Any) -> tuple[Any, Any]:
        return tensor, None

    @staticmethod
    def decompress(tensor: Any, ctx: Any) -> Any:
        return tensor


class _FP16Compressor:
    """Floating tensors go as float16 (averaged in float32 and rounded once,
    as meshrun averages float16), and come back in their own dtype."""

    @staticmethod
    def compress(tensor: Any) -> tuple[Any, Any]:
        if tensor.dtype.is_floating_point:
            return tensor.type(torch.float16), tensor.dtype
        return tensor, tensor.dtype

    @staticmethod
    def decompress(tensor: Any, ctx: Any) -> Any:
        return tensor if ctx is None or not ctx.is_floating_point else tensor.type(ctx)


class Compression:
    none = _NoneCompressor
    fp16 = _FP16Compressor


def _comm(process_set: ProcessSet, what: str) -> Comm:
    g = process_set._g(what)
    if g is None:
        raise ValueError(f"rank {_world(what).rank}: hvd.{what}: this rank is not in "
                         f"process set {process_set.ranks}")
    return g
