"""One family of errors. Every message names the local rank, the peer(s), the
operation, its group and sequence number, so a log line alone says what failed."""
from __future__ import annotations

import enum

__all__ = [
    "MeshError", "MeshTimeoutError", "LostPeerError", "MismatchError",
    "BadMessageError", "OutMismatchError", "AuthError", "RendezvousError", "WorkerError",
    "AbortKind",
]


class MeshError(RuntimeError):
    """Base class of every error raised by meshrun."""


class MeshTimeoutError(MeshError, TimeoutError):
    """A blocking operation did not complete within its timeout."""


class LostPeerError(MeshError):
    """A peer died or stopped answering; operations involving it fail."""

    def __init__(self, msg: str, peer: int | None = None) -> None:
        super().__init__(msg)
        self.peer = peer


class MismatchError(MeshError):
    """Ranks called different collectives, or the same with another dtype/shape/op."""


class BadMessageError(MeshError):
    """A malformed frame or a message whose payload does not fit its header."""


class OutMismatchError(MismatchError, BadMessageError):
    """A received message does not fit the receive's ``out=`` (dtype, element
    count, or not an array). The message stays queued for the next receive."""


class RendezvousError(MeshError):
    """The job could not be assembled: ranks missing, duplicated, or no service."""


class AuthError(RendezvousError):
    """The rendezvous service refused this rank's credentials: a different job
    secret (MESH_SECRET) or MESH_CURVE setting there."""


class WorkerError(MeshError):
    """A worker process failed; carries its rank and its own traceback
    (``traceback``: without the last frames inside meshrun, below the
    user's last call; ``full_traceback``: all of it)."""

    def __init__(self, rank: int, tb: str, exitcode: int | None = None,
                 head: str | None = None, full: str | None = None) -> None:
        if head is None:
            head = f"rank {rank} failed"
            if exitcode is not None:
                head += f" (exit code {exitcode})"
        super().__init__(f"{head}:\n{tb}")
        self.rank = rank
        self.traceback = tb
        self.full_traceback = tb if full is None else full
        self.exitcode = exitcode


class AbortKind(enum.IntEnum):
    """Which error an abort makes every member raise (an ABORT message
    carries it in a header field of its own): MeshError for OTHER."""

    MISMATCH = 0
    LOST_PEER = 1
    OTHER = 2
    TIMEOUT = 3

    @classmethod
    def of(cls, error: BaseException | type[BaseException]) -> "AbortKind":
        """The kind that makes peers raise ``error``'s class, or OTHER."""
        kind = error if isinstance(error, type) else type(error)
        for k in (cls.MISMATCH, cls.LOST_PEER, cls.TIMEOUT):
            if issubclass(kind, k.error):
                return k
        return cls.OTHER

    @property
    def error(self) -> type[MeshError]:
        return _ERRORS[self]


_ERRORS: dict[AbortKind, type[MeshError]] = {
    AbortKind.MISMATCH: MismatchError, AbortKind.LOST_PEER: LostPeerError,
    AbortKind.OTHER: MeshError, AbortKind.TIMEOUT: MeshTimeoutError}
