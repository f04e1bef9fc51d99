"""collectives: all_reduce and the rest, as algorithms over mesh point-to-point.

    import collectives
    collectives.all_reduce(world, grads, op="avg")      # in place
    work = collectives.all_reduce(g, a, async_op=True); work.wait()
"""
from .host.paths import all_gather_object, barrier, broadcast_object
from .buckets import DEFAULT_BUCKET_BYTES, GradReducer, all_reduce_grads, bucket_plan
from .ops import OPS
from .plan import Tuning
from .runner import Work
# Host arrays go straight to collectives.host.paths; device arrays (CuPy, CUDA array
# interface, DLPack) take CUDA IPC, the overlapped staged ring or simple
# staging through pinned host buffers (collectives.device.paths says which).
from .device.paths import (all_gather, all_reduce, all_to_all, broadcast, gather, reduce,
                          reduce_scatter, scatter, staged)

__all__ = ["all_reduce", "broadcast", "reduce", "all_gather", "reduce_scatter", "gather",
           "scatter", "all_to_all", "barrier", "broadcast_object", "all_gather_object",
           "GradReducer", "all_reduce_grads", "bucket_plan", "DEFAULT_BUCKET_BYTES",
           "Work", "Tuning", "OPS"]
