"""mesh: the worker mesh — transport, membership, launcher.

    world = mesh.init()
    world.send(array, dst=1); x = world.recv(src=0)
    results = mesh.spawn(fn, 4)       # fn(world) on four local processes
"""
from .comm import (ANY, ANY_SOURCE, ANY_TAG, PROC_NULL, Comm, Request, Status, testall,
                   testany, testsome, waitall, waitany, waitsome)
from .errors import (AbortKind, AuthError, BadMessageError, LostPeerError, MeshError,
                     MeshTimeoutError, MismatchError, OutMismatchError, RendezvousError,
                     WorkerError)
from .grid import Grid, compute_dims, grid
from .spawn import spawn
from .mprobe import Message
from .persistent import Prequest, startall
from .window import Window
from .world import Mesh, init

__all__ = ["init", "spawn", "grid", "Grid", "compute_dims", "Mesh", "Comm", "Request", "Status",
           "Message", "Prequest", "Window", "startall", "waitall", "waitany", "waitsome", "testall",
           "testany", "testsome", "ANY", "ANY_SOURCE", "ANY_TAG", "PROC_NULL", "MeshError",
           "MeshTimeoutError", "LostPeerError", "MismatchError", "OutMismatchError",
           "BadMessageError", "AuthError", "RendezvousError", "WorkerError", "AbortKind"]
