"""The collectives on host (numpy) arrays: argument checks, fingerprints,
and the path each call takes. Between processes of one host that may read
each other's memory: the board and cross-memory attach (collectives.shm);
otherwise an algorithm over sockets (ring, small, rooted, exchange, beside
this module), chosen by size or by ``algorithm=`` / MESH_COLL_ALGO
(collectives.plan.choose).

collectives.api runs these on host arrays, and on device arrays staged
whole through host memory. They live beside this module, which names them
all:

    paths_reduce.py    all_reduce, reduce, reduce_scatter, scan
    paths_move.py      broadcast, all_gather, gather, scatter, all_to_all
    paths_uneven.py    all_gather_v, reduce_scatter_v, gather_v, scatter_v, all_to_all_v
    paths_objects.py   broadcast_object, all_gather_object, gather_object,
                       all_to_all_object, scatter_object
    paths_barrier.py   barrier, monitored_barrier
    paths_checks.py    the arguments checked, the caller's result memory, fingerprints
    paths_route.py     which path a call takes, and MESH_COLL_DEBUG's line for it
"""
from __future__ import annotations

from .paths_barrier import barrier, monitored_barrier
from .paths_checks import _apart, _array, _counts_fp, _fp, _into, _root, _rows, _uneven
from .paths_move import all_gather, all_to_all, broadcast, gather, scatter
from .paths_objects import (all_gather_object, all_to_all_object, broadcast_object,
                            gather_object, scatter_object)
from .paths_reduce import all_reduce, reduce, reduce_scatter, scan
from .paths_route import _in_place
from .paths_uneven import all_gather_v, all_to_all_v, gather_v, reduce_scatter_v, scatter_v

__all__ = ["all_reduce", "broadcast", "reduce", "all_gather", "reduce_scatter", "gather",
           "scatter", "all_to_all", "all_to_all_v", "all_gather_v", "reduce_scatter_v", "gather_v",
           "scatter_v", "scan", "barrier", "broadcast_object", "all_gather_object",
           "all_to_all_object", "gather_object", "scatter_object"]

_READ_HERE = (_apart, _array, _counts_fp, _fp, _in_place, _into, _root, _rows, _uneven,
              monitored_barrier)
"""What other modules import from here besides __all__ (collectives.userop,
collectives.device.paths, the torch backend's torchargs, torchexchange and
torchgather, collectives.api's host._root), where it was before it moved."""
