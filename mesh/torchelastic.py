"""Joining under torchrun: its agent's store carries the rendezvous address.

torchrun's agent already listens on MASTER_ADDR:MASTER_PORT (a TCPStore that
workers reach as clients), so rank 0 cannot serve the rendezvous there. It
binds port 0 instead and publishes where it listens under the job's key:

    rank 0 --set(key, "MASTER_ADDR:port")--> agent store <--wait/get(key)-- rank r

Rank 0 runs on the store's host (node rank 0 hosts both), so MASTER_ADDR
reaches it wherever it reaches the store. torch is imported only here.
"""
from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from .env import JobSpec, is_loopback
from .errors import RendezvousError

__all__ = ["rendezvous_address"]


def rendezvous_address(spec: JobSpec, port: int | None, timeout: float,
                       store: Any = None) -> tuple[str, int]:
    """Rank 0 (``port``: where its rendezvous service listens) publishes it;
    every other rank (``port=None``) waits up to ``timeout`` seconds for it.
    Returns the (host, port) to join. ``store``: a torch Store to use in
    place of the agent's (torch.distributed's own, for tcp:// and file://)."""
    key = spec.agent_store
    if key is None:
        raise ValueError("this job has no torchrun agent store")
    store_at = f"{spec.master_addr}:{spec.master_port}"
    where = f"rank {spec.rank}: torchrun's agent store at {store_at}"
    deadline = time.monotonic() + timeout
    if store is not None:
        where = f"rank {spec.rank}: torch.distributed's store ({type(store).__name__})"
    else:
        try:
            from torch.distributed import TCPStore
        except ImportError as e:
            raise RendezvousError(f"{where} needs torch to be importable: {e}") from e
        try:
            store = TCPStore(spec.master_addr, spec.master_port, is_master=False,
                             timeout=timedelta(seconds=timeout), wait_for_workers=False)
        except RuntimeError as e:
            raise RendezvousError(f"{where} could not be reached within {timeout:.0f}s: "
                                  f"{_first_line(e)}{_loopback_note(spec)}") from e
        key = _round_key(store, key, spec.size, where)
    if port is not None:
        try:
            store.set(key, f"{spec.master_addr}:{port}")
        except RuntimeError as e:
            raise RendezvousError(f"{where}: could not publish the rendezvous address under "
                                  f"key {key!r}: {_first_line(e)}") from e
        return spec.master_addr, port
    try:
        store.wait([key], timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
        value = store.get(key).decode()
    except RuntimeError as e:
        raise RendezvousError(f"{where}: rank 0 did not publish the rendezvous address under "
                              f"key {key!r} within {timeout:.0f}s (did rank 0 start and call "
                              f"mesh.init()?): {_first_line(e)}") from e
    host, _, p = value.rpartition(":")
    return host, int(p)


def _round_key(store: Any, key: str, size: int, where: str) -> str:
    """The key of this round of the rendezvous. A rank's ``mesh.init()``
    after its mesh closed is a new round, whose address rank 0 publishes
    anew (its service closed with its mesh): under one key, a rank that came
    back before rank 0 read the last round's address and waited there until
    its rendezvous timeout. Each rank counts itself in; every ``size``
    arrivals make a round (a round takes every rank, so none counts into the
    next before all have counted into this one). The first round's key is
    the job's own."""
    try:
        arrived = int(store.add(f"{key}/arrived", 1)) - 1
    except RuntimeError as e:
        raise RendezvousError(f"{where}: could not count this rank in under key "
                              f"{key + '/arrived'!r}: {_first_line(e)}") from e
    return key if arrived < size else f"{key}/round{arrived // size}"


def _loopback_note(spec: JobSpec) -> str:
    """Why a host may not reach node 0: MASTER_ADDR is loopback in a job
    across hosts (torchrun's node 0 gave its host name, loopback there)."""
    if spec.size <= spec.local_size or not is_loopback(spec.master_addr):
        return ""
    return (f"; MASTER_ADDR={spec.master_addr} is a loopback address, yet the job spans hosts "
            f"(WORLD_SIZE={spec.size}, LOCAL_WORLD_SIZE={spec.local_size}): torchrun takes it "
            f"from node 0's host name, which resolves to loopback there; start each torchrun "
            f"with --local-addr set to its host's address")


def _first_line(e: BaseException) -> str:
    """torch's store errors carry a C++ backtrace after the first line."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
