"""mesh: the worker mesh — transport, membership, launcher.

    world = mesh.init()
    world.send(array, dst=1); x = world.recv(src=0)
    results = mesh.spawn(fn, 4)       # fn(world) on four local processes
"""
from .comm import ANY, Comm, Request
from .errors import (AbortKind, AuthError, BadMessageError, LostPeerError, MeshError,
                     MeshTimeoutError, MismatchError, RendezvousError, WorkerError)
from .grid import Grid, grid
from .spawn import spawn
from .world import Mesh, init

__all__ = ["init", "spawn", "grid", "Grid", "Mesh", "Comm", "Request", "ANY",
           "MeshError", "MeshTimeoutError", "LostPeerError", "MismatchError",
           "BadMessageError", "AuthError", "RendezvousError", "WorkerError", "AbortKind"]
