"""Joining under mpirun on one host: a file carries rank 0's rendezvous address.

Open MPI gives its ranks no address to meet at, so rank 0 binds port 0 and
writes where it listens to a file whose name the job's ranks all derive
from what mpirun gave them (its job id and the addresses of its own
servers, see ``mesh.env``), in mpirun's session directory:

    rank 0 --write("127.0.0.1:port")--> <session dir>/meshrun-rendezvous-<key>
    rank r --poll until it exists, read--^

No port is guessed, so two jobs at once never meet, and a file left by an
earlier job never matches a later one's name; rank 0 removes it once every
rank has joined (and mpirun removes its session directory at the end).
"""
from __future__ import annotations

import os
import time

from .env import JobSpec
from .errors import RendezvousError

__all__ = ["rendezvous_address", "withdraw"]


def rendezvous_address(spec: JobSpec, port: int | None, timeout: float) -> tuple[str, int]:
    """Rank 0 (``port``: where its rendezvous service listens) publishes it;
    every other rank (``port=None``) waits up to ``timeout`` seconds for it.
    Returns the (host, port) to join."""
    path = spec.rendezvous_file
    if path is None:
        raise ValueError("this job has no rendezvous file")
    if port is not None:
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{spec.master_addr}:{port}")
            os.replace(tmp, path)
        except OSError as e:
            raise RendezvousError(f"rank {spec.rank}: could not publish the rendezvous address "
                                  f"in {path}: {e}") from e
        return spec.master_addr, port
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                host, _, p = f.read().rpartition(":")
            return host, int(p)
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RendezvousError(
                f"rank {spec.rank}: rank 0 did not publish the rendezvous address in {path} "
                f"within {timeout:.0f}s (did rank 0 start and call mesh.init()? read: "
                f"{spec.source})")
        time.sleep(0.02)


def withdraw(spec: JobSpec) -> None:
    """Rank 0 removes the file once every rank has joined (or joining failed)."""
    if spec.rendezvous_file is not None:
        try:
            os.unlink(spec.rendezvous_file)
        except OSError:
            pass
