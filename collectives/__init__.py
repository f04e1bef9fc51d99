"""collectives: all_reduce and the rest, as algorithms over mesh point-to-point.

    import collectives
    collectives.all_reduce(world, grads, op="avg")      # in place
    work = collectives.all_reduce(g, a, async_op=True); work.wait()
"""
from .api import (all_gather, all_gather_object, all_reduce, all_to_all, barrier, broadcast,
                  broadcast_object, gather, reduce, reduce_scatter, scatter)
from .buckets import DEFAULT_BUCKET_BYTES, GradReducer, all_reduce_grads, bucket_plan
from .ops import OPS
from .plan import Tuning
from .runner import Work

__all__ = ["all_reduce", "broadcast", "reduce", "all_gather", "reduce_scatter", "gather",
           "scatter", "all_to_all", "barrier", "broadcast_object", "all_gather_object",
           "GradReducer", "all_reduce_grads", "bucket_plan", "DEFAULT_BUCKET_BYTES",
           "Work", "Tuning", "OPS"]
