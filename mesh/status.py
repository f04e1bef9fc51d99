"""What a receive or probe matched (Status, as mpi4py's), and MPI's null
peer (PROC_NULL) and the status a call on it gives; mesh.comm names them."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .match import ANY, ANY_TAG

__all__ = ["Status", "ANY_SOURCE", "PROC_NULL"]


ANY_SOURCE = ANY
PROC_NULL = -2
"""MPI's null peer (its value in Open MPI and mpi4py): a send to it, or a
receive or probe from it, completes at once doing nothing; the receive
gives None (or its ``out=``, untouched) and a Status of source PROC_NULL,
tag ANY_TAG and 0 bytes. Grid.shift gives it at an edge that does not wrap."""


@dataclass
class Status:
    """What a receive or probe matched, as mpi4py's Status: the sender's rank
    in the communicator, the tag, the payload's bytes, and for arrays the
    dtype and shape the sender sent (None for msgpack objects). Pass one as
    ``status=`` to be filled in, or read ``Request.status``."""

    source: int = ANY
    tag: int = ANY_TAG
    nbytes: int = 0
    dtype: np.dtype | None = None
    shape: tuple[int, ...] | None = None

    @property
    def count(self) -> int | None:
        """mpi4py's ``Get_count(datatype)`` for the array's own dtype: its
        number of elements, to size a receive after a probe (0 from
        PROC_NULL); None for a msgpack object (its bytes: ``nbytes``)."""
        if self.shape is not None:
            return math.prod(self.shape)
        return 0 if self.source == PROC_NULL else None


def _copy_status(st: Status, into: Status) -> None:
    into.source, into.tag, into.nbytes, into.dtype, into.shape = \
        st.source, st.tag, st.nbytes, st.dtype, st.shape


def _null(status: Status) -> Status:
    """``status`` as MPI fills it for a receive or probe from PROC_NULL."""
    status.source, status.tag, status.nbytes = PROC_NULL, ANY_TAG, 0
    status.dtype = status.shape = None
    return status


def _is_null(r: Any) -> bool:
    """Whether the rank ``r`` is PROC_NULL (a numpy integer's too)."""
    return (type(r) is int or isinstance(r, np.integer)) and r == PROC_NULL
