"""mpi4py's ``MPI`` over meshrun: change ``from mpi4py import MPI`` to
``from collectives import MPI`` and a program runs under ``meshrun -n N``
(or mpirun, torchrun, srun) unchanged::

    from collectives import MPI
    comm = MPI.COMM_WORLD                      # mesh.init()'s world, on first use
    total = comm.allreduce(comm.rank, op=MPI.SUM)
    comm.Allreduce(MPI.IN_PLACE, [a, MPI.DOUBLE], op=MPI.MAX)

A thin layer over meshrun's public calls (collectives.mpi_compat: types.py
the ops and constants, datatypes.py the datatypes, the derived ones too;
buffers.py the buffer specs; p2p.py,
requests.py and message.py point-to-point; coll.py the buffer
collectives, objects.py the lowercase ones; comm.py the communicators,
topo.py their topologies, inter.py and intercoll.py the intercommunicators,
spawn.py Spawn's (dynamic processes), ports.py Accept and Connect,
neighbor.py the neighborhood collectives, group.py their groups;
win.py the one-sided windows over comm.window; tuples.py keeps the lowercase
calls' tuples): objects go by msgpack, never pickle, and meshrun's errors
(MismatchError, MeshTimeoutError, LostPeerError) come through unchanged. It
lives in collectives, not mesh, because its collectives are collectives'
(mesh imports nothing above it).
What meshrun does not provide raises NotImplementedError naming the call."""
from __future__ import annotations

import socket
import threading
import time
from typing import Any, Sequence

import numpy as np

import mesh

from .mpi_compat.file import FILE_ERRORS, MODES, SEEK_CUR, SEEK_END, SEEK_SET, File
from .mpi_compat.attrs import KEYVAL_INVALID
from .mpi_compat.comm import COMM_NULL, COMM_TYPE_SHARED, Comm, Intracomm
from .mpi_compat.neighbor import Topocomm
from .mpi_compat.inter import Intercomm
from .mpi_compat.spawn import ARGV_NULL, ERR_SPAWN, child_world
from .mpi_compat.ports import close_port, open_port
from .mpi_compat.topo import UNWEIGHTED, WEIGHTS_EMPTY, Cartcomm, Distgraphcomm, Graphcomm
from .mpi_compat.group import GROUP_EMPTY, GROUP_NULL, Group
from .mpi_compat.objects import fold, scan_fold
from .mpi_compat.message import MESSAGE_NO_PROC, MESSAGE_NULL, Message
from .mpi_compat.requests import REQUEST_NULL, Grequest, Prequest, Request, Status
from .mpi_compat.win import (LOCK_EXCLUSIVE, LOCK_SHARED, MODE_NOCHECK, MODE_NOPRECEDE,
                             MODE_NOPUT, MODE_NOSTORE, MODE_NOSUCCEED, WIN_BASE,
                             WIN_CREATE_FLAVOR, WIN_DISP_UNIT, WIN_FLAVORS, WIN_MODEL, WIN_SIZE,
                             Win)
from .mpi_compat import typecodes as _typecodes
from .mpi_compat.datatypes import (COMBINERS, DATATYPE_NULL, DISTRIBUTES, ORDER_C, ORDER_F,
                                   ORDER_FORTRAN)
from .mpi_compat.types import (ANY_SOURCE, ANY_TAG, BOTTOM, CART, CONGRUENT, DATATYPES,
                               DIST_GRAPH, ERRORS, ERR_OTHER, ERR_TRUNCATE, ERR_TYPE, GRAPH, IDENT,
                               IN_PLACE, OPS, PROC_NULL, ROOT, SIMILAR, SUCCESS, TAG_UB,
                               THREAD_FUNNELED, THREAD_MULTIPLE, THREAD_SERIALIZED,
                               THREAD_SINGLE, UNDEFINED, UNEQUAL, Datatype, Exception, Op)

globals().update(DATATYPES)
globals().update(OPS)
globals().update(ERRORS)
globals().update(WIN_FLAVORS)
globals().update(MODES)
globals().update(FILE_ERRORS)
globals().update(COMBINERS)
globals().update(DISTRIBUTES)
_typecode, _typealign = _typecodes.typecode, _typecodes.typealign     # (mpi4py's private two)
FILE_NULL = File(None, None, 0)  # type: ignore[arg-type]
OP_NULL = Op("OP_NULL", lambda x, y: x, "op_null")
INFO_NULL = None
WIN_NULL = Win()
MAX_PROCESSOR_NAME = 256

__all__ = ["COMM_WORLD", "COMM_SELF", "COMM_NULL", "COMM_TYPE_SHARED", "Comm", "Intracomm",
           "Intercomm",
           "Topocomm", "Cartcomm", "Graphcomm", "Distgraphcomm", "UNWEIGHTED",
           "WEIGHTS_EMPTY", "Group", "GROUP_EMPTY", "GROUP_NULL", "Status", "Request", "Prequest",
           "Grequest", "Message", "REQUEST_NULL",
           "MESSAGE_NULL", "MESSAGE_NO_PROC", "Datatype", "Op", "Exception", "ANY_SOURCE",
           "ANY_TAG", "PROC_NULL", "UNDEFINED", "ROOT", "IN_PLACE", "BOTTOM", "IDENT",
           "CONGRUENT", "SIMILAR", "UNEQUAL", "CART", "GRAPH", "DIST_GRAPH", "SUCCESS",
           "ERR_TRUNCATE", "ERR_OTHER", "ERR_TYPE", *ERRORS, "ORDER_C", "ORDER_FORTRAN", "ORDER_F",
           "DATATYPE_NULL", "TAG_UB", "KEYVAL_INVALID", "THREAD_SINGLE", "THREAD_FUNNELED",
           "THREAD_SERIALIZED", "THREAD_MULTIPLE", "Init", "Init_thread", "Finalize",
           "Is_initialized", "Is_finalized", "Query_thread", "Is_thread_main", "Wtime",
           "Wtick", "Get_processor_name", "Get_version", "Get_library_version", "get_vendor",
           "Alloc_mem", "Free_mem",
           "Compute_dims", "Pcontrol", "fold", "scan_fold", "Win", "WIN_NULL", "LOCK_EXCLUSIVE",
           "LOCK_SHARED", "MODE_NOCHECK", "MODE_NOPRECEDE", "MODE_NOPUT", "MODE_NOSTORE",
           "MODE_NOSUCCEED", "WIN_BASE", "WIN_SIZE", "WIN_DISP_UNIT",
           "WIN_CREATE_FLAVOR", "WIN_MODEL", *WIN_FLAVORS, "FILE_NULL", *DATATYPES, *OPS,
           "File", "SEEK_SET", "SEEK_CUR", "SEEK_END", *MODES, *FILE_ERRORS, *COMBINERS,
           *DISTRIBUTES, "ARGV_NULL", "ERR_SPAWN", "INFO_NULL", "Open_port", "Close_port"]

_state: dict[str, Any] = {"world": None, "self": None, "opened": None, "finalized": False,
                          "base": None}


_init_lock = threading.Lock()


def _world() -> Comm:
    """COMM_WORLD: the world this process has open (mesh.spawn's, or one
    opened before), else mesh.init()'s, made on first use. Under a lock:
    mpi4py's MPI is initialized at its import, so threads that touch
    COMM_WORLD first at once (its demo/threads) must get one world, where
    each joined the rendezvous again and was refused as a duplicate. In a
    process a Spawn started, the children's group of its bridge
    (mpi_compat.spawn)."""
    with _init_lock:
        w = mesh.world.current()
        kept = _state["world"]
        if kept is None or (w is not None and _state["base"] is not w):  # (a forked worker's)
            if w is None:
                w = _state["opened"] = mesh.init()
            world = child_world(w) or Intracomm(w)
            world._kept = True
            _state.update(world=world, self=None, base=w)
        return _state["world"]


def __getattr__(name: str) -> Any:
    if name == "COMM_WORLD":
        return _world()
    if name == "COMM_SELF":
        if _state["self"] is None:
            w = _world().mesh
            me = _state["self"] = Intracomm(w.group([w.rank]))
            me._kept = True
            me.Set_name("MPI_COMM_SELF")
        return _state["self"]
    if name in ("Info", "Errhandler"):
        return _Absent(name)
    if name.startswith("_"):
        raise AttributeError(name)
    raise AttributeError(f"collectives.MPI has no {name} (mpi4py's MPI.{name}): not provided; "
                         f"README, \"Coming from mpi4py\", lists what is")


class _Absent:
    """MPI.Info and MPI.Errhandler, which meshrun does not provide: every
    use raises, naming it."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise NotImplementedError(f"collectives.MPI: {self._name}.{attr}: not provided")

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self.__getattr__("()")


def Init() -> None:
    _world()


def Init_thread(required: int = THREAD_MULTIPLE) -> int:
    _world()
    return THREAD_MULTIPLE


def Query_thread() -> int:
    return THREAD_MULTIPLE


def Is_thread_main() -> bool:
    return threading.current_thread() is threading.main_thread()


def Is_initialized() -> bool:
    return _state["world"] is not None or mesh.world.current() is not None


def Is_finalized() -> bool:
    return bool(_state["finalized"])


def Finalize() -> None:
    """Close the world COMM_WORLD opened (one opened by the caller, or
    mesh.spawn's, is left to it)."""
    w = _state["opened"]
    _state.update(world=None, self=None, opened=None, finalized=True, base=None)
    if w is not None:
        w.close()


def Open_port(info: Any = None) -> str:
    """A port for Comm.Accept, named for Comm.Connect (mpi_compat.ports)."""
    return open_port(info)


def Close_port(port_name: str) -> None:
    close_port(port_name)


def Wtime() -> float:
    return time.perf_counter()


def Wtick() -> float:
    return time.get_clock_info("perf_counter").resolution


def Get_processor_name() -> str:
    return socket.gethostname()


def Get_version() -> tuple[int, int]:
    return 3, 1


def Get_library_version() -> str:
    return "meshrun (collectives.MPI over mesh and collectives)"


def get_vendor() -> tuple[str, tuple[int, int, int]]:
    """mpi4py's ``MPI.get_vendor()``: the library's name and version (meshrun's)."""
    return "meshrun", (0, 1, 0)


def Alloc_mem(size: int, info: Any = None) -> Any:
    """MPI_Alloc_mem: ``size`` bytes of zeros, a numpy uint8 array (as
    mpi4py's MPI.buffer: a buffer that takes ``m[:] = 0``; meshrun's windows
    and messages need no registered memory); Free_mem drops it."""
    if int(size) < 0:
        raise ValueError(f"collectives.MPI Alloc_mem: size {size} (a number of bytes)")
    return np.zeros(int(size), np.uint8).view(_Memory)


class _Memory(np.ndarray):
    """Alloc_mem's bytes: true as a handle is (mpi4py's ``if mem:``), whatever they hold."""

    def __bool__(self) -> bool:
        return True

    def __array_wrap__(self, arr: Any, context: Any = None, return_scalar: bool = False) -> Any:
        """(what numpy computes of it is a plain array or scalar, its truth its own)"""
        out = np.asarray(arr).view(np.ndarray)
        return out[()] if return_scalar else out


def Free_mem(mem: Any) -> None:
    """(the memory goes with its last reference)"""


def Pcontrol(level: int) -> None:
    pass


def Compute_dims(nnodes: int, dims: int | Sequence[int]) -> list[int]:
    """MPI_Dims_create: ``dims`` an int (that many, all free) or a list whose
    zeros are filled, as balanced as can be (mesh.compute_dims), largest
    first."""
    given = [0] * dims if isinstance(dims, int) else [int(d) for d in dims]
    fixed = 1
    for d in given:
        fixed *= d or 1
    free = given.count(0)
    if nnodes % fixed:
        raise ValueError(f"collectives.MPI Compute_dims: {nnodes} is no multiple of the "
                         f"dimensions given, {given}")
    fill = iter(mesh.compute_dims(nnodes // fixed, free) if free else [])
    return [d or next(fill) for d in given]
