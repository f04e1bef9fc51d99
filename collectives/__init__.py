"""collectives: all_reduce and the rest, as algorithms over mesh point-to-point.

    import collectives
    collectives.all_reduce(world, grads, op="avg")      # in place
    work = collectives.all_reduce(g, a, async_op=True); work.wait()

    api.py        the public collectives: each call takes its array kind's path
    tensors.py    torch tensors through them (views, bfloat16, results as tensors)
    buckets.py    GradReducer: gradient all-reduce in fusion buckets
    persistent.py all_reduce_init and the rest: persistent collectives (MPI-4's)
    runner.py     how one call runs: tag, fingerprint, deadline, abort, lanes, Work
    plan.py       pure arithmetic: chunks, segments, trees, algorithm choice, Tuning
    ops.py        reduction operators;  scratch.py: buffers kept between calls
    userop.py     Op: a reduction given by a Python function, and its paths
    file.py       File: parallel file I/O over a group (MPI-IO), each rank at its offset;
                  fileview.py its views' filetypes (Filetype), fileagree.py how the
                  ranks agree on a call's outcome (FileError, Agreement)
    host/         numpy arrays: paths.py (every call's path: paths_reduce.py,
                  paths_move.py, paths_uneven.py, paths_objects.py, paths_barrier.py;
                  paths_checks.py their arguments, paths_route.py which path), and the
                  algorithms over sockets: ring.py, small.py (recursive doubling, barrier),
                  rooted.py (broadcast, reduce, gather, scatter), exchange.py
    shm/          same host, no sockets: board.py (sync: round.py a call on it,
                  waiting.py its waits, quick.py a tiny call's), cma.py (reading a
                  peer's memory), local.py (the collectives on them: those that
                  reduce in local_reduce.py, those that move data in
                  local_move.py), tiny.py
                  (the short way of a repeated tiny collective; its plans in
                  tiny_reduce.py: all_reduce, reduce, reduce_scatter, and
                  tiny_move.py: broadcast, all_gather, gather, scatter, all_to_all)
    device/       device arrays: paths.py (which path, whole-array staging),
                  gpu.py (a call's array and streams), ring.py (the ring through
                  pinned slots), cuda_ipc.py (peers' device memory)
    tools/        python -m collectives.tools.bench | .soak (bench_gloo.py: torch's side)
    horovod/      Horovod's torch API (import collectives.horovod as hvd; imported
                  only by a program that asks for it, as it imports torch)
"""
from . import api
from .api import (all_gather, all_gather_object, all_gather_v, all_reduce, all_reduce_loc,
                  all_to_all, all_to_all_object, all_to_all_v, barrier, broadcast, broadcast_object,
                  broadcast_state, exscan, gather, gather_object, gather_v, reduce,
                  reduce_scatter, reduce_scatter_v, scan, scatter, scatter_object, scatter_v)
from .file import File, FileError
from .fileview import Filetype
from .buckets import DEFAULT_BUCKET_BYTES, GradReducer, all_reduce_grads, bucket_plan
from .ops import OPS
from .persistent import (all_gather_init, all_gather_v_init, all_reduce_init, all_to_all_init,
                         all_to_all_v_init, barrier_init, broadcast_init, exscan_init,
                         gather_init, gather_v_init, reduce_init, reduce_scatter_init,
                         reduce_scatter_v_init, scan_init, scatter_init, scatter_v_init)
from .userop import Op
from .plan import Tuning
from .runner import Work, abandon

__all__ = ["all_reduce", "broadcast", "reduce", "all_gather", "reduce_scatter", "gather",
           "scatter", "all_to_all", "all_to_all_v", "all_gather_v", "reduce_scatter_v", "scan",
           "exscan", "gather_v", "scatter_v", "all_reduce_loc", "barrier",
           "broadcast_object", "all_gather_object", "gather_object", "scatter_object",
           "all_to_all_object", "broadcast_state", "GradReducer", "all_reduce_grads", "bucket_plan",
           "DEFAULT_BUCKET_BYTES", "Work", "Tuning", "OPS", "Op", "abandon", "all_reduce_init",
           "broadcast_init", "reduce_init", "all_gather_init", "reduce_scatter_init",
           "all_to_all_init", "gather_init", "scatter_init", "scan_init", "exscan_init",
           "barrier_init", "all_gather_v_init", "all_to_all_v_init", "gather_v_init",
           "scatter_v_init", "reduce_scatter_v_init", "File", "FileError",
           "Filetype"]
