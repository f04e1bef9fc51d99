"""Horovod's broadcast_parameters, broadcast_optimizer_state,
broadcast_object and allgather_object, over collectives.broadcast_state and
all_gather_object (msgpack, never pickle: plain values, and tensors and
arrays where broadcast_state takes them)."""
from __future__ import annotations

from typing import Any

import torch

from .. import api as C
from ..mpi_compat.tuples import unwrap, unwrap_state, wrap, wrap_state
from . import control
from .basics import ProcessSet, _comm, global_process_set

__all__ = ["broadcast_parameters", "broadcast_optimizer_state", "broadcast_object",
           "allgather_object"]


def broadcast_parameters(params: Any, root_rank: int,
                         process_set: ProcessSet = global_process_set) -> None:
    """The root's values in place into ``params``: a ``model.state_dict()``
    or ``model.named_parameters()`` (pairs). Every rank's names and shapes
    are checked against the root's first (MismatchError naming both)."""
    if isinstance(params, dict):
        items = sorted(params.items())
    elif isinstance(params, list) or hasattr(params, "__iter__"):
        items = list(params)
        if not all(isinstance(p, tuple) and len(p) == 2 for p in items):
            raise ValueError("hvd.broadcast_parameters: params is a dict (state_dict()) or "
                             "(name, tensor) pairs (named_parameters())")
    else:
        raise ValueError(f"hvd.broadcast_parameters: invalid params of type {type(params)}")
    g = _comm(process_set, "broadcast_parameters")
    control.announce(g, control.BROADCAST, "broadcast_parameters")
    got = C.broadcast_state(g, {str(k): v.detach() for k, v in items}, root=root_rank)
    if g.rank != root_rank:
        with torch.no_grad():
            for k, v in items:
                v.copy_(got[str(k)])


def broadcast_optimizer_state(optimizer: Any, root_rank: int,
                              process_set: ProcessSet = global_process_set) -> None:
    """The root's ``optimizer.state_dict()`` loaded on every rank (its
    hyperparameters and its state: Adam's moments, an optimizer that has
    not stepped yet included)."""
    g = _comm(process_set, "broadcast_optimizer_state")
    control.announce(g, control.BROADCAST, "broadcast_optimizer_state")
    state = C.broadcast_state(g, optimizer.state_dict() if g.rank == root_rank else None,
                              root=root_rank)
    if g.rank != root_rank:
        optimizer.load_state_dict(state)


_UNPICKLED = ("(Horovod pickles it; meshrun never unpickles what another rank sends: "
              "pass plain values, vars(obj) for an argparse.Namespace)")


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> Any:
    """The root's ``obj`` on every rank: nested dicts, lists and tuples of
    plain values, tensors and arrays (not pickled: no class instances).
    Tuples come back tuples on every rank, as Horovod's pickle gives them
    (collectives.MPI's bcast's packing), but in an object holding arrays."""
    g = _comm(process_set, "broadcast_object")
    control.announce(g, control.OBJECT, "broadcast_object")
    try:
        if g.rank == root_rank:
            C.broadcast_state(g, wrap_state(obj), root=root_rank)
            return obj
        return unwrap_state(C.broadcast_state(g, None, root=root_rank))
    except TypeError as e:
        raise TypeError(f"hvd.broadcast_object: {e} {_UNPICKLED}") from None


def allgather_object(obj: Any, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> list[Any]:
    """Every rank's ``obj``, in rank order (plain values: msgpack; tuples
    come back tuples, as Horovod's pickle gives them)."""
    g = _comm(process_set, "allgather_object")
    control.announce(g, control.OBJECT, "allgather_object")
    try:
        return [unwrap(x) for x in C.all_gather_object(g, wrap(obj))]
    except TypeError as e:
        raise TypeError(f"hvd.allgather_object: {e} {_UNPICKLED}") from None
