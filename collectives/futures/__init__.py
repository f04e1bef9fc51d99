"""mpi4py.futures on meshrun: concurrent.futures over collectives.MPI, by
one import (``from collectives.futures import MPIPoolExecutor``)::

    codec.py     what crosses: functions by reference, msgpack and arrays, exceptions
    server.py    a worker's loop (and a spawned worker's main)
    pool.py      the master's manager thread: tasks to idle workers, replies to futures
    executor.py  MPIPoolExecutor, MPICommExecutor, map/starmap
    __main__.py  python -m collectives.futures script.py: rank 0 runs it, the others serve
"""
from concurrent.futures import (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION,
                                CancelledError, Future, TimeoutError, as_completed, wait)

from .codec import RemoteTraceback
from .executor import BrokenExecutor, MPICommExecutor, MPIPoolExecutor

__all__ = ["MPIPoolExecutor", "MPICommExecutor", "BrokenExecutor", "RemoteTraceback", "Future",
           "CancelledError", "TimeoutError", "as_completed", "wait", "FIRST_COMPLETED",
           "FIRST_EXCEPTION", "ALL_COMPLETED"]
