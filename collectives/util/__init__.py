"""mpi4py.util over collectives.MPI (``from collectives.util import sync``)::

    sync.py   Sequential, Counter, Mutex, Condition, Semaphore over MPI.Win
              (syncbase.py Sequential, Counter; synclock.py the others and their
              waits, which raise LostPeerError on a lost holder)
    dtlib.py  from_numpy_dtype, to_numpy_dtype: numpy dtypes and collectives.MPI's datatypes
    pool.py   Pool, ThreadPool, AsyncResult... (multiprocessing.pool's) over collectives.futures
    pkl5.py   not provided: meshrun never pickles (importing it says what to use instead)
"""
__all__ = ["dtlib", "pool", "sync"]
