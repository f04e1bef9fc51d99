"""Horovod's torch API over meshrun: ``import collectives.horovod as hvd``
in place of ``import horovod.torch as hvd`` runs a Horovod training script
under ``meshrun -n N`` (or torchrun, mpirun, srun, ``mesh.spawn``).

    basics.py     init and the ranks, process sets, the ops, Compression
    mpi_ops.py    the collectives with Horovod's arguments, handles (poll, synchronize)
    adasum.py     op=hvd.Adasum: Horovod's pairwise combination, vector-halving distance-doubling
    control.py    join: each call announced on a control group first
    functions.py  broadcast_parameters, broadcast_optimizer_state, *_object
    optimizer.py  DistributedOptimizer over collectives.GradReducer, overlapped with backward
    adasum_optimizer.py  op=hvd.Adasum's: Horovod's delta optimizer
    named.py      named_parameters' checks, the backward passes counted
    sync_batch_norm.py  SyncBatchNorm: batch statistics over every rank's batch
    timeline.py   HOROVOD_TIMELINE, start_timeline: rank 0's Chrome trace of the calls
    elastic.py    hvd.elastic: run, TorchState, ElasticSampler on meshrun's restarts (commits)
"""
from .basics import (Adasum, Average, Compression, HorovodInternalError, Max, Min, Product,
                     ProcessSet, Sum, add_process_set, ccl_built, cross_rank, cross_size,
                     cuda_built, ddl_built, global_process_set, gloo_built, gloo_enabled, init,
                     is_homogeneous, is_initialized, local_rank, local_size, mpi_built,
                     mpi_enabled, mpi_threads_supported, nccl_built, rank, remove_process_set,
                     rocm_built, shutdown, size)
from .functions import (allgather_object, broadcast_object, broadcast_optimizer_state,
                        broadcast_parameters)
from . import elastic
from .control import join
from .mpi_ops import (allgather, allgather_async, allreduce, allreduce_, allreduce_async,
                      allreduce_async_, alltoall, alltoall_async, barrier, broadcast,
                      broadcast_, broadcast_async, broadcast_async_, grouped_allgather,
                      grouped_allreduce, grouped_allreduce_, grouped_allreduce_async,
                      grouped_allreduce_async_, poll, reducescatter, reducescatter_async,
                      sparse_allreduce_async, synchronize)
from .optimizer import DistributedOptimizer
from .sync_batch_norm import SyncBatchNorm
from .timeline import start_timeline, stop_timeline

__all__ = ["init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size",
           "cross_rank", "cross_size", "is_homogeneous", "Average", "Sum", "Adasum", "Min",
           "Max", "Product", "HorovodInternalError", "ProcessSet", "global_process_set",
           "add_process_set", "remove_process_set", "Compression", "allreduce",
           "allreduce_async", "allreduce_", "allreduce_async_", "grouped_allreduce",
           "grouped_allreduce_async", "grouped_allreduce_", "grouped_allreduce_async_",
           "sparse_allreduce_async", "start_timeline", "stop_timeline",
           "allgather", "allgather_async", "grouped_allgather", "broadcast", "broadcast_async",
           "broadcast_", "broadcast_async_", "alltoall", "alltoall_async", "reducescatter",
           "reducescatter_async", "barrier", "join", "poll", "synchronize",
           "broadcast_parameters", "broadcast_optimizer_state", "broadcast_object",
           "allgather_object", "DistributedOptimizer", "SyncBatchNorm", "mpi_threads_supported",
           "mpi_enabled", "mpi_built", "gloo_enabled", "gloo_built", "nccl_built", "ddl_built",
           "ccl_built", "cuda_built", "rocm_built", "elastic"]
