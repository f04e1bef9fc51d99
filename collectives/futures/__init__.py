"""mpi4py.futures on meshrun: concurrent.futures over collectives.MPI, by
one import (``from collectives.futures import MPIPoolExecutor``)::

    codec.py     what crosses: functions by reference, msgpack and arrays, exceptions
    server.py    a worker's loop (and a spawned worker's main), get_comm_workers
    pool.py      the master's manager thread: tasks to idle workers, replies to futures
    executor.py  MPIPoolExecutor, MPICommExecutor, map/starmap
    util.py      collect, compose: futures of futures
    __main__.py  python -m collectives.futures script.py: rank 0 runs it, the others serve

ThreadPoolExecutor and ProcessPoolExecutor are concurrent.futures', as mpi4py's.
"""
from concurrent.futures import (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION,
                                CancelledError, Executor, Future, InvalidStateError,
                                ProcessPoolExecutor, ThreadPoolExecutor, TimeoutError,
                                as_completed, wait)

from .codec import RemoteTraceback
from .executor import BrokenExecutor, MPICommExecutor, MPIPoolExecutor
from .server import get_comm_workers
from .util import collect, compose

__all__ = ["MPIPoolExecutor", "MPICommExecutor", "BrokenExecutor", "RemoteTraceback", "Future",
           "Executor", "CancelledError", "TimeoutError", "InvalidStateError", "as_completed",
           "wait", "FIRST_COMPLETED", "FIRST_EXCEPTION", "ALL_COMPLETED", "ThreadPoolExecutor",
           "ProcessPoolExecutor", "get_comm_workers", "collect", "compose"]
