"""mpi4py's one-sided windows (MPI.Win) over meshrun's (``comm.window``,
mesh.window): ``Win.Create(memory, disp_unit, comm=)``, ``Win.Allocate``,
``Put``, ``Get``, ``Rget``, ``Accumulate``, ``Fetch_and_op``,
``Compare_and_swap``, ``Get_accumulate`` of one element, ``Fence``,
``Lock``/``Unlock`` (``LOCK_EXCLUSIVE``, ``LOCK_SHARED``), ``Lock_all``,
``Unlock_all``, ``Flush``, ``Flush_all``, ``Free``.

A meshrun window exposes an array of one dtype and takes element offsets;
MPI's exposes bytes and takes displacements in units of each target's
``disp_unit``. So a Win's elements have the memory's dtype (``Create`` of a
numpy array: its own; of bytes: MPI.BYTE; ``Allocate``: ``datatype=`` or,
by ``disp_unit``, INT for 4 and DOUBLE for 8, else BYTE), agreed by every
rank (one that exposes nothing takes the others'); a target's displacement
times its ``disp_unit`` must fall on one of its elements. ``Put`` and
``Get`` move any datatype's bytes (a whole number of elements);
``Accumulate`` and the atomics take the window's datatype only."""
from __future__ import annotations

from typing import Any

import numpy as np

import mesh
from mesh.errors import MismatchError
from mesh.window import OPS as WINDOW_OPS

from .buffers import _flat, spec
from .requests import Request
from .types import BOTTOM, PROC_NULL, Op, datatype_of

__all__ = ["Win", "LOCK_EXCLUSIVE", "LOCK_SHARED", "MODE_NOCHECK", "MODE_NOSTORE",
           "MODE_NOPUT", "MODE_NOPRECEDE", "MODE_NOSUCCEED", "WIN_BASE", "WIN_SIZE",
           "WIN_DISP_UNIT"]

# (Open MPI's values, as mpi4py has them there)
LOCK_EXCLUSIVE, LOCK_SHARED = 1, 2
MODE_NOCHECK, MODE_NOPRECEDE, MODE_NOPUT, MODE_NOSTORE, MODE_NOSUCCEED = 1, 2, 4, 8, 16
WIN_BASE, WIN_SIZE, WIN_DISP_UNIT = 7, 8, 9

_BY_UNIT = {1: np.uint8, 4: np.intc, 8: np.float64}     # Allocate's elements, by disp_unit

_ABSENT = {
    "Rput": "Put (complete at the epoch's end: Fence, Flush, Unlock)",
    "Raccumulate": "Accumulate (complete at the epoch's end)",
    "Rget_accumulate": "Fetch_and_op (one element)",
    "Post": "Fence (PSCW is not provided)", "Start": "Fence (PSCW is not provided)",
    "Complete": "Fence (PSCW is not provided)", "Wait": "Fence (PSCW is not provided)",
    "Test": "Fence (PSCW is not provided)",
    "Create_dynamic": "Win.Create over memory of its full size (no dynamic windows)",
    "Attach": "Win.Create over memory of its full size (no dynamic windows)",
    "Detach": "Win.Create over memory of its full size (no dynamic windows)",
    "Allocate_shared": "Win.Allocate (no shared-memory windows: Shared_query has no "
                       "counterpart)",
    "Shared_query": "Get, Put (no shared-memory windows)",
    "Get_group": "comm.Get_size() of the communicator the window was made on",
}


def _absent(name: str) -> NotImplementedError:
    why = _ABSENT.get(name, "not provided (README, \"Coming from mpi4py\", lists what is)")
    return NotImplementedError(f"collectives.MPI: Win.{name}: not provided by meshrun's "
                               f"windows; use {why}" if name in _ABSENT else
                               f"collectives.MPI: Win.{name}: {why}")


class _WinType(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        raise _absent(name)


def _world_self() -> Any:
    from .. import MPI
    return MPI.COMM_SELF


class Win(metaclass=_WinType):
    """mpi4py's Win: a meshrun window (``win.window``, mesh.window) over the
    memory every rank of the communicator exposes."""

    def __init__(self, comm: Any, memory: np.ndarray, disp_unit: int, dtype: Any,
                 what: str) -> None:
        import collectives
        g: mesh.Comm = comm.mesh
        self.rank = g.rank
        unit = int(disp_unit)
        if unit <= 0:
            raise ValueError(f"rank {g.rank}: collectives.MPI {what}: disp_unit {disp_unit} "
                             f"(a positive number of bytes)")
        mine = "" if memory.size == 0 and dtype is None else str(memory.dtype)
        table = collectives.all_gather_object(g, [mine, unit])
        names = sorted({str(d) for d, _ in table if d})
        if len(names) > 1:
            raise MismatchError(
                f"rank {g.rank}: collectives.MPI {what}: the ranks' memory differs in "
                f"datatype ({', '.join(f'rank {r}: {d}' for r, (d, _) in enumerate(table) if d)})"
                f"; a window here has one (Allocate takes datatype=, Create a numpy array's)")
        if memory.size == 0 and names:
            memory = np.empty(0, names[0])
        self._units = [int(u) for _, u in table]
        self._memory = memory
        self.window = g.window(memory)
        self._dtype = self.window.dtype

    # -- making one -----------------------------------------------------------------------
    @classmethod
    def Create(cls, memory: Any, disp_unit: int = 1, info: Any = None,
               comm: Any = None) -> "Win":
        """MPI_Win_create over ``memory`` (a C-contiguous writable numpy array
        or buffer, its elements the window's; None or MPI.BOTTOM: nothing
        exposed), collective over ``comm`` (default COMM_SELF, as mpi4py's)."""
        comm = _world_self() if comm is None else comm
        if memory is None or memory is BOTTOM:
            flat = np.empty(0, np.uint8)
            given = None
        else:
            flat = _flat(memory, None, "Win.Create")
            given = flat.dtype
        return cls(comm, flat, disp_unit, given, "Win.Create")

    @classmethod
    def Allocate(cls, size: int, disp_unit: int = 1, info: Any = None, comm: Any = None,
                 datatype: Any = None) -> "Win":
        """MPI_Win_allocate: ``size`` bytes of zeros, elements of ``datatype``
        (a collectives.MPI addition; default by ``disp_unit``: 4 MPI.INT, 8
        MPI.DOUBLE, else MPI.BYTE); ``win.tomemory()`` is them, a numpy array."""
        comm = _world_self() if comm is None else comm
        dt = datatype_of(datatype, "Win.Allocate")
        kind = np.dtype(dt if dt is not None else _BY_UNIT.get(int(disp_unit), np.uint8))
        if int(size) < 0 or int(size) % kind.itemsize:
            raise ValueError(f"rank {comm.rank}: collectives.MPI Win.Allocate: {size} bytes is "
                             f"no whole number of {kind} elements (pass datatype=)")
        memory = np.zeros(int(size) // kind.itemsize, kind)
        return cls(comm, memory, disp_unit, None if datatype is None and not size else kind,
                   "Win.Allocate")

    def tomemory(self) -> np.ndarray:
        """The memory this rank exposes, a flat numpy array (``np.frombuffer``
        takes it, as mpi4py's buffer)."""
        return self._memory

    def Get_attr(self, keyval: int) -> Any:
        if keyval == WIN_SIZE:
            return int(self._memory.nbytes)
        if keyval == WIN_DISP_UNIT:
            return self._units[self.rank]
        if keyval == WIN_BASE:
            return int(self._memory.ctypes.data)
        return None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name[:1].islower():
            raise AttributeError(f"collectives.MPI.Win has no attribute {name!r}")
        raise _absent(name)

    # -- operations -----------------------------------------------------------------------
    def _where(self, op: str, rank: int) -> str:
        return f"rank {self.rank}: collectives.MPI Win.{op} on rank {rank}"

    def _target(self, op: str, rank: int, target: Any, count: int,
                dtype: np.dtype) -> tuple[int, int]:
        """mpi4py's ``target`` (None, a displacement, or (disp[, count[,
        datatype]])) as the window's element offset and count at ``rank``."""
        if isinstance(target, (tuple, list)):
            if not 1 <= len(target) <= 3:
                raise ValueError(f"{self._where(op, rank)}: target is disp, (disp,), (disp, "
                                 f"count) or (disp, count, datatype), got {target!r}")
            disp = int(target[0])
            tcount = int(target[1]) if len(target) > 1 and target[1] is not None else count
            tdt = datatype_of(target[2], f"Win.{op}") if len(target) > 2 else None
        else:
            disp, tcount, tdt = (0 if target is None else int(target)), count, None
        tdt = dtype if tdt is None else tdt
        if tcount * tdt.itemsize != count * dtype.itemsize:
            raise ValueError(f"{self._where(op, rank)}: the target's {tcount} x {tdt} is not "
                             f"the origin's {count} x {dtype} (MPI's type signatures must match)")
        if not 0 <= rank < len(self._units):
            return disp, tcount     # (meshrun names the bad rank)
        at = disp * self._units[rank]
        size = self._dtype.itemsize
        if disp < 0 or at % size:
            raise ValueError(f"{self._where(op, rank)}: displacement {disp} x disp_unit "
                             f"{self._units[rank]} = byte {at}, not on one of the window's "
                             f"{self._dtype} elements ({size} bytes): meshrun's windows take "
                             f"whole elements")
        return at // size, tcount * tdt.itemsize // size

    def _as_window(self, view: np.ndarray, op: str, rank: int, atomic: bool) -> np.ndarray:
        """``view`` as elements of the window's dtype (the same memory): its
        bytes reinterpreted for Put and Get, refused for the accumulates."""
        if view.dtype == self._dtype:
            return view
        if atomic or view.nbytes % self._dtype.itemsize:
            raise TypeError(f"{self._where(op, rank)}: {view.dtype} into a window of "
                            f"{self._dtype}: "
                            + ("accumulates and atomics take the window's datatype"
                               if atomic else "not a whole number of its elements"))
        return view.view(np.uint8).view(self._dtype)

    def _origin(self, buf: Any, op: str, rank: int, target: Any,
                atomic: bool = False) -> tuple[np.ndarray, int, int]:
        view = spec(buf, f"Win.{op}").view
        off, n = self._target(op, rank, target, len(view), view.dtype)
        return self._as_window(view, op, rank, atomic), off, n

    def Put(self, origin: Any, target_rank: int, target: Any = None) -> None:
        if target_rank == PROC_NULL:
            return
        a, off, _ = self._origin(origin, "Put", target_rank, target)
        self.window.put(a, target_rank, off)

    def Get(self, origin: Any, target_rank: int, target: Any = None) -> None:
        """Into ``origin`` by the epoch's end (Fence, Flush, Unlock), as MPI's."""
        self._rget(origin, target_rank, target, "Get")

    def Rget(self, origin: Any, target_rank: int, target: Any = None) -> Request:
        return Request(self._rget(origin, target_rank, target, "Rget"))

    def _rget(self, origin: Any, target_rank: int, target: Any, op: str) -> Any:
        if target_rank == PROC_NULL:
            return self.window.rget(PROC_NULL)
        a, off, n = self._origin(origin, op, target_rank, target)
        return self.window.rget(target_rank, off, n, out=a)

    def Accumulate(self, origin: Any, target_rank: int, target: Any = None,
                   op: Op | None = None) -> None:
        if target_rank == PROC_NULL:
            return
        name = self._op(op, "Accumulate", target_rank, fetch=False)
        a, off, _ = self._origin(origin, "Accumulate", target_rank, target, atomic=True)
        self.window.accumulate(a, target_rank, off, name)

    def Get_accumulate(self, origin: Any, result: Any, target_rank: int, target: Any = None,
                       op: Op | None = None) -> None:
        """Of one element only (meshrun's fetch_and_op)."""
        res = self._as_window(spec(result, "Win.Get_accumulate").view, "Get_accumulate",
                              target_rank, True)
        if len(res) != 1:
            raise NotImplementedError(
                f"{self._where('Get_accumulate', target_rank)}: of {len(res)} elements: "
                f"meshrun's windows fetch one element atomically (Fetch_and_op); Get then "
                f"Accumulate under an exclusive Lock for more")
        disp = target[0] if isinstance(target, (tuple, list)) else target
        self.Fetch_and_op(origin, res, target_rank, 0 if disp is None else disp, op)

    def Fetch_and_op(self, origin: Any, result: Any, target_rank: int, target_disp: int = 0,
                     op: Op | None = None) -> None:
        name = self._op(op, "Fetch_and_op", target_rank, fetch=True)
        res = self._one(result, "Fetch_and_op", target_rank)
        if target_rank == PROC_NULL:
            return
        value = res if name == "no_op" and origin is None else \
            self._one(origin, "Fetch_and_op", target_rank)
        off, _ = self._target("Fetch_and_op", target_rank, target_disp, 1, self._dtype)
        res[0] = self.window.fetch_and_op(value, target_rank, off, name)

    def Compare_and_swap(self, origin: Any, compare: Any, result: Any, target_rank: int,
                         target_disp: int = 0) -> None:
        res = self._one(result, "Compare_and_swap", target_rank)
        if target_rank == PROC_NULL:
            return
        value = self._one(origin, "Compare_and_swap", target_rank)
        cmp = self._one(compare, "Compare_and_swap", target_rank)
        off, _ = self._target("Compare_and_swap", target_rank, target_disp, 1, self._dtype)
        res[0] = self.window.compare_and_swap(value, cmp, target_rank, off)

    def _one(self, buf: Any, op: str, rank: int) -> np.ndarray:
        """An atomic's buffer: its first element, of the window's datatype."""
        view = self._as_window(spec(buf, f"Win.{op}").view, op, rank, True)
        if len(view) < 1:
            raise ValueError(f"{self._where(op, rank)}: an empty buffer (one element)")
        return view[:1]

    def _op(self, op: Any, what: str, rank: int, fetch: bool) -> str:
        if op is None:
            return "sum"
        name = op.coll if isinstance(op, Op) else None
        if not isinstance(name, str) or name not in WINDOW_OPS + (("no_op",) if fetch else ()):
            raise NotImplementedError(
                f"{self._where(what, rank)}: op {op!r}: meshrun's windows take the builtin "
                f"ops ({', '.join(o.upper() for o in WINDOW_OPS)}"
                f"{', NO_OP' if fetch else ''}), not MAXLOC, MINLOC nor Op.Create's")
        return name

    # -- synchronization ------------------------------------------------------------------
    def Fence(self, assertion: int = 0) -> None:
        self.window.fence()

    def Lock(self, rank: int, lock_type: int = LOCK_EXCLUSIVE, assertion: int = 0) -> None:
        if lock_type not in (LOCK_EXCLUSIVE, LOCK_SHARED):
            raise ValueError(f"{self._where('Lock', rank)}: lock_type {lock_type!r}: "
                             f"MPI.LOCK_EXCLUSIVE or MPI.LOCK_SHARED")
        self.window.lock(rank, exclusive=lock_type == LOCK_EXCLUSIVE)

    def Unlock(self, rank: int) -> None:
        self.window.unlock(rank)

    def Lock_all(self, assertion: int = 0) -> None:
        self.window.lock_all()

    def Unlock_all(self) -> None:
        self.window.unlock_all()

    def Flush(self, rank: int) -> None:
        self.window.flush(rank)

    def Flush_all(self) -> None:
        self.window.flush_all()

    Flush_local = Flush             # (a flush completes locally too)
    Flush_local_all = Flush_all

    def Sync(self) -> None:
        """(one copy of the memory: nothing to synchronize)"""

    def Free(self) -> None:
        self.window.free()

    free = Free

    def __repr__(self) -> str:
        return f"<MPI.Win {self.window!r}>"
