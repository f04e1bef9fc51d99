"""mpi4py.util.pkl5 is not provided: its ``Comm``, ``Intracomm`` and
``Request`` send the lowercase calls' objects as pickle protocol 5, their
buffers out of band (for messages past MPI's int count), and meshrun never
pickles. What to use instead: collectives.MPI's lowercase calls
(``comm.send``, ``recv``, ``bcast``...: msgpack-able objects, a numpy array
alone as its bytes) and, for large arrays, the buffer calls (``Send``,
``Recv``, ``Bcast``...), which move an array's memory without a copy into a
message object. Importing this module raises NotImplementedError (what
collectives.MPI raises for what it does not provide)."""
raise NotImplementedError(
    "collectives.MPI: mpi4py.util.pkl5 (collectives.util.pkl5): not provided: meshrun never "
    "pickles; use collectives.MPI's lowercase calls (comm.send, comm.bcast...: msgpack-able "
    "objects and numpy arrays) or, for large arrays, the buffer calls (Send, Recv, Bcast)")
