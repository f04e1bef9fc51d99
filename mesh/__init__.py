"""mesh: the worker mesh — transport, membership, launcher."""
from .errors import (AuthError, BadMessageError, LostPeerError, MeshError,
                     MeshTimeoutError, MismatchError, RendezvousError, WorkerError)

__all__ = ["MeshError", "MeshTimeoutError", "LostPeerError", "MismatchError",
           "BadMessageError", "AuthError", "RendezvousError", "WorkerError"]
