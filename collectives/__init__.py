"""collectives: all_reduce and the rest, as algorithms over mesh point-to-point.

    import collectives
    collectives.all_reduce(world, grads, op="avg")      # in place
    work = collectives.all_reduce(g, a, async_op=True); work.wait()
"""
from . import api
from .api import all_gather_object, barrier, broadcast_object
from .buckets import DEFAULT_BUCKET_BYTES, GradReducer, all_reduce_grads, bucket_plan
from .ops import OPS
from .plan import Tuning
from .runner import Work
from .staged import staged

# Device arrays (CuPy, CUDA array interface, DLPack) go through pinned host buffers.
all_reduce = staged(api.all_reduce, in_place=True)
broadcast = staged(api.broadcast, in_place=True)
reduce = staged(api.reduce, in_place=True)
all_gather = staged(api.all_gather, in_place=False)
reduce_scatter = staged(api.reduce_scatter, in_place=False)
gather = staged(api.gather, in_place=False)
scatter = staged(api.scatter, in_place=False)
all_to_all = staged(api.all_to_all, in_place=False)

__all__ = ["all_reduce", "broadcast", "reduce", "all_gather", "reduce_scatter", "gather",
           "scatter", "all_to_all", "barrier", "broadcast_object", "all_gather_object",
           "GradReducer", "all_reduce_grads", "bucket_plan", "DEFAULT_BUCKET_BYTES",
           "Work", "Tuning", "OPS"]
