"""mpi4py's one-sided windows (MPI.Win) over meshrun's (``comm.window``,
mesh.window): ``Win.Create(memory, disp_unit, comm=)``, ``Win.Allocate``,
``Win.Allocate_shared`` and ``Shared_query`` (Comm.shared_window), ``Put``,
``Get``, ``Accumulate``, ``Get_accumulate``, their requests ``Rput``,
``Rget``, ``Raccumulate``, ``Rget_accumulate``, ``Fetch_and_op``,
``Compare_and_swap``, ``Fence``, ``Lock``/``Unlock`` (``LOCK_EXCLUSIVE``,
``LOCK_SHARED``), ``Lock_all``, ``Unlock_all``, ``Flush``, ``Flush_all``,
PSCW (``Post``, ``Start``, ``Complete``, ``Wait``, ``Test``), ``Sync``,
``Free``.

A meshrun window exposes an array of one dtype and takes element offsets;
MPI's exposes bytes and takes displacements in units of each target's
``disp_unit``. So a Win's elements have the memory's dtype (``Create`` of a
numpy array: its own; of bytes: MPI.BYTE; ``Allocate``: ``datatype=`` or,
by ``disp_unit``, INT for 4 and DOUBLE for 8, else BYTE), agreed by every
rank (one that exposes nothing takes the others'); a target's displacement
times its ``disp_unit`` must fall on one of its elements. ``Put`` and
``Get`` move any datatype's bytes (a whole number of elements);
``Accumulate`` and the atomics take the window's datatype only.

A derived datatype, the origin's (``[buf, count, datatype]``) or the
target's (``target=(disp, count, datatype)``: a column of a matrix), is
taken by Put, Get, Accumulate, Get_accumulate and their R-forms: the
origin's elements packed (unpacked into their places once a get's reply
is in: at the epoch's end, or the request's wait), the target's places
sent as runs of element offsets with the operation, one request
(mesh.window's ``index=``)."""
from __future__ import annotations

from typing import Any

import numpy as np

import mesh
from mesh.errors import MismatchError
from mesh.window import OPS as WINDOW_OPS

from .attrs import Attributes
from .buffers import Buf, _flat, spec
from .requests import Request
from .types import BOTTOM, PROC_NULL, UNDEFINED, Datatype, Op, datatype_of

__all__ = ["Win", "LOCK_EXCLUSIVE", "LOCK_SHARED", "MODE_NOCHECK", "MODE_NOSTORE",
           "MODE_NOPUT", "MODE_NOPRECEDE", "MODE_NOSUCCEED", "WIN_BASE", "WIN_SIZE",
           "WIN_DISP_UNIT", "WIN_CREATE_FLAVOR", "WIN_MODEL", "WIN_FLAVORS"]

# (Open MPI's values, as mpi4py has them there)
LOCK_EXCLUSIVE, LOCK_SHARED = 1, 2
MODE_NOCHECK, MODE_NOPRECEDE, MODE_NOPUT, MODE_NOSTORE, MODE_NOSUCCEED = 1, 2, 4, 8, 16
WIN_BASE, WIN_SIZE, WIN_DISP_UNIT = 7, 8, 9
WIN_CREATE_FLAVOR, WIN_MODEL = 10, 11
WIN_FLAVORS = {"WIN_FLAVOR_CREATE": 1, "WIN_FLAVOR_ALLOCATE": 2, "WIN_FLAVOR_DYNAMIC": 3,
               "WIN_FLAVOR_SHARED": 4, "WIN_SEPARATE": 1, "WIN_UNIFIED": 0}

_BY_UNIT = {1: np.uint8, 4: np.intc, 8: np.float64}     # Allocate's elements, by disp_unit

_ABSENT = {
    "Create_dynamic": "Win.Create over memory of its full size (no dynamic windows)",
    "Attach": "Win.Create over memory of its full size (no dynamic windows)",
    "Detach": "Win.Create over memory of its full size (no dynamic windows)",
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


class Win(Attributes, metaclass=_WinType):
    """mpi4py's Win: a meshrun window (``win.window``, mesh.window) over the
    memory every rank of the communicator exposes. ``MPI.Win()`` is a null
    one, equal to WIN_NULL (as a freed window is); ``MPI.Win(win)`` another
    handle of ``win``."""

    window: Any

    def __init__(self, comm: Any = None, memory: np.ndarray | None = None, disp_unit: int = 1,
                 dtype: Any = None, what: str = "", shared: bool = False) -> None:
        import collectives
        if memory is None:
            if comm is not None and not isinstance(comm, Win):
                raise TypeError(f"collectives.MPI.Win(): expecting a Win, got "
                                f"{type(comm).__name__} (Win.Create, Win.Allocate make one)")
            if comm is None:
                self.window, self.rank = None, -1
            else:       # (another handle: the same window, memory and attributes)
                self.__dict__.update(comm.__dict__)
                self.__dict__["_attr_values"] = comm._attrs
            return
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
        self._comm = comm
        self._flavor = WIN_FLAVORS["WIN_FLAVOR_" + what.split(".")[1].split("_")[-1].upper()]
        self.window = g.shared_window(memory.size, memory.dtype) if shared else g.window(memory)
        self._memory = self.window.array
        self._dtype = self.window.dtype
        # gets into a derived datatype's buffer: (target, the get, the buffer to unpack into)
        self._unpacks: list[tuple[int, Any, Buf]] = []

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
        kind = cls._kind(size, disp_unit, comm, datatype, "Win.Allocate")
        memory = np.zeros(int(size) // kind.itemsize, kind)
        return cls(comm, memory, disp_unit, None if datatype is None and not size else kind,
                   "Win.Allocate")

    @classmethod
    def Allocate_shared(cls, size: int, disp_unit: int = 1, info: Any = None,
                        comm: Any = None, datatype: Any = None) -> "Win":
        """MPI_Win_allocate_shared, collective over ranks of one host (else
        mesh.MeshError on every rank): as ``Allocate``, in memory every rank
        maps (``Shared_query``'s buffers: numpy arrays to load and store)."""
        comm = _world_self() if comm is None else comm
        kind = cls._kind(size, disp_unit, comm, datatype, "Win.Allocate_shared")
        memory = np.empty(int(size) // kind.itemsize, kind)    # (its size and dtype only)
        return cls(comm, memory, disp_unit, None if datatype is None and not size else kind,
                   "Win.Allocate_shared", shared=True)

    @staticmethod
    def _kind(size: int, disp_unit: int, comm: Any, datatype: Any, what: str) -> np.dtype:
        dt = datatype_of(datatype, what)
        kind = np.dtype(dt if dt is not None else _BY_UNIT.get(int(disp_unit), np.uint8))
        if int(size) < 0 or int(size) % kind.itemsize:
            raise ValueError(f"rank {comm.rank}: collectives.MPI {what}: {size} bytes is "
                             f"no whole number of {kind} elements (pass datatype=)")
        return kind

    def Shared_query(self, rank: int) -> tuple[np.ndarray, int]:
        """(rank ``rank``'s memory, its disp_unit); mpi4py's buffer is a
        numpy array here (``np.frombuffer`` and ``np.ndarray(buffer=)`` take
        it). MPI.PROC_NULL: the first rank's with memory, as MPI's."""
        if rank == PROC_NULL:
            rank = next((r for r, n in enumerate(self.window.sizes) if n), 0)
        return self.window.shared(rank), self._units[rank]

    def Get_group(self) -> Any:
        """The group of the communicator the window was made on."""
        get = getattr(self._comm, "Get_group", None)
        if get is None:
            raise _absent("Get_group")
        return get()

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
        if keyval == WIN_CREATE_FLAVOR:
            return self._flavor
        if keyval == WIN_MODEL:         # (meshrun's windows: one copy, as MPI's unified model)
            return WIN_FLAVORS["WIN_UNIFIED"]
        return super().Get_attr(keyval)

    flavor = property(lambda self: self.Get_attr(WIN_CREATE_FLAVOR))
    model = property(lambda self: self.Get_attr(WIN_MODEL))
    attrs = property(lambda self: (self.Get_attr(WIN_BASE), self.Get_attr(WIN_SIZE),
                                   self.Get_attr(WIN_DISP_UNIT)))
    group = property(lambda self: self.Get_group())

    def __getattr__(self, name: str) -> Any:
        # (Dup: MPI has no window duplicate, nor mpi4py's Win: hasattr(win, "Dup") is False)
        if name.startswith("_") or name[:1].islower() or name == "Dup":
            raise AttributeError(f"collectives.MPI.Win has no attribute {name!r}")
        raise _absent(name)

    # -- operations -----------------------------------------------------------------------
    def _where(self, op: str, rank: int) -> str:
        return f"rank {self.rank}: collectives.MPI Win.{op} on rank {rank}"

    def _target(self, op: str, rank: int, target: Any, count: int, dtype: np.dtype,
                atomic: bool = False) -> tuple[int, int, np.ndarray | None]:
        """mpi4py's ``target`` (None, a displacement, or (disp[, count[,
        datatype]])) as the window's element offset and count at ``rank``,
        and, for a derived target datatype, its elements' offsets from it."""
        tdt: Any = None
        if isinstance(target, (tuple, list)):
            if not 1 <= len(target) <= 3:
                raise ValueError(f"{self._where(op, rank)}: target is disp, (disp,), (disp, "
                                 f"count) or (disp, count, datatype), got {target!r}")
            disp = int(target[0])
            tcount = int(target[1]) if len(target) > 1 and target[1] is not None else count
            if len(target) > 2:
                tdt = target[2]
        else:
            disp, tcount = (0 if target is None else int(target)), count
        if isinstance(tdt, Datatype) and tdt.typemap is not None:
            return self._strided(op, rank, disp, tcount, tdt, count, dtype, atomic)
        tdt = dtype if tdt is None else datatype_of(tdt, f"Win.{op}")
        if tcount * tdt.itemsize != count * dtype.itemsize:
            raise ValueError(f"{self._where(op, rank)}: the target's {tcount} x {tdt} is not "
                             f"the origin's {count} x {dtype} (MPI's type signatures must match)")
        if not 0 <= rank < len(self._units):
            return disp, tcount, None   # (meshrun names the bad rank)
        at = disp * self._units[rank]
        size = self._dtype.itemsize
        if disp < 0 or at % size:
            raise ValueError(f"{self._where(op, rank)}: displacement {disp} x disp_unit "
                             f"{self._units[rank]} = byte {at}, not on one of the window's "
                             f"{self._dtype} elements ({size} bytes): meshrun's windows take "
                             f"whole elements")
        return at // size, tcount * tdt.itemsize // size, None

    def _strided(self, op: str, rank: int, disp: int, tcount: int, tdt: Datatype, count: int,
                 dtype: np.dtype, atomic: bool) -> tuple[int, int, np.ndarray | None]:
        """A derived target datatype's ``tcount`` items from ``disp``: (the
        window's offset of its first element, their count, the offsets of
        the window's elements from it, in typemap order)."""
        tm = tdt._map()
        if not tdt.committed or tdt.freed:
            spec([np.empty(0), 0, tdt], f"Win.{op}", packs=True)    # (raises ERR_TYPE)
        elem, size = tdt.dtype, self._dtype.itemsize
        if tcount * tm.n * elem.itemsize != count * dtype.itemsize or (
                atomic and elem != self._dtype):
            raise ValueError(f"{self._where(op, rank)}: the target's {tcount} x {tdt!r} "
                             f"({tcount * tm.n} x {elem}) is not the origin's {count} x {dtype}"
                             f" (MPI's type signatures must match"
                             + (f"; an accumulate's are the window's {self._dtype}"
                                if atomic else "") + ")")
        if not 0 <= rank < len(self._units):
            return disp, count, None    # (meshrun names the bad rank)
        at = (disp * self._units[rank] + np.arange(tcount, dtype=np.int64)[:, None] * tm.extent
              + tm.flat()[None, :]).reshape(-1)
        if at.size and (at.min() < 0 or (at % size).any() or elem.itemsize % size):
            raise ValueError(f"{self._where(op, rank)}: {tcount} x {tdt!r} from displacement "
                             f"{disp} x disp_unit {self._units[rank]}: its elements are not all "
                             f"on the window's {self._dtype} elements ({size} bytes) from "
                             f"byte 0: meshrun's windows take whole elements")
        per = elem.itemsize // size
        idx = ((at // size)[:, None] + np.arange(per, dtype=np.int64)[None, :]).reshape(-1)
        first = int(idx.min()) if idx.size else 0
        return first, len(idx), idx - first

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

    def _origin(self, buf: Any, op: str, rank: int, target: Any, atomic: bool = False
                ) -> tuple[Buf, np.ndarray, int, int, np.ndarray | None]:
        """(the origin's buffer, its elements as the window's, the target's
        offset, count and elements' offsets: _target's)."""
        b = spec(buf, f"Win.{op}", packs=True)
        off, n, idx = self._target(op, rank, target, len(b.view), b.view.dtype, atomic)
        return b, self._as_window(b.view, op, rank, atomic), off, n, idx

    def Put(self, origin: Any, target_rank: int, target: Any = None) -> None:
        if target_rank == PROC_NULL:
            return
        _, a, off, _, idx = self._origin(origin, "Put", target_rank, target)
        self.window.put(a, target_rank, off, index=idx)

    def Rput(self, origin: Any, target_rank: int, target: Any = None) -> Request:
        """Done once ``origin`` may be reused (MPI's local completion)."""
        if target_rank == PROC_NULL:
            return Request(self.window.rput([], PROC_NULL))
        _, a, off, _, idx = self._origin(origin, "Rput", target_rank, target)
        return Request(self.window.rput(a, target_rank, off, index=idx))

    def Get(self, origin: Any, target_rank: int, target: Any = None) -> None:
        """Into ``origin`` by the epoch's end (Fence, Flush, Unlock), as MPI's."""
        self._rget(origin, target_rank, target, "Get", False)

    def Rget(self, origin: Any, target_rank: int, target: Any = None) -> Request:
        return self._rget(origin, target_rank, target, "Rget", True)

    def _rget(self, origin: Any, target_rank: int, target: Any, op: str, wanted: bool) -> Any:
        if target_rank == PROC_NULL:
            return Request(self.window.rget(PROC_NULL))
        b, a, off, n, idx = self._origin(origin, op, target_rank, target)
        return self._getting(target_rank, b, self.window.rget(target_rank, off, n, out=a,
                                                              index=idx), wanted)

    def _getting(self, rank: int, b: Buf, req: Any, wanted: bool) -> Request | None:
        """A get into ``b``: a derived datatype's elements unpacked at the
        request's wait (``wanted``: an R-call's) or the epoch's end."""
        if not b.typed:
            return Request(req) if wanted else None
        if wanted:
            return Request(req, finish=b.done_with)
        self._unpacks.append((rank, req, b))
        return None

    def _unpacked(self, ranks: Any = None) -> None:
        """The gets into derived datatypes' buffers from ``ranks`` (None:
        every rank), complete after a synchronization: unpacked."""
        keep = []
        for rank, req, b in self._unpacks:
            if ranks is None or rank in ranks:
                req.wait(0)
                b.done()
            else:
                keep.append((rank, req, b))
        self._unpacks = keep

    def Accumulate(self, origin: Any, target_rank: int, target: Any = None,
                   op: Op | None = None) -> None:
        if target_rank == PROC_NULL:
            return
        name = self._op(op, "Accumulate", target_rank, fetch=False)
        _, a, off, _, idx = self._origin(origin, "Accumulate", target_rank, target, atomic=True)
        self.window.accumulate(a, target_rank, off, name, index=idx)

    def Raccumulate(self, origin: Any, target_rank: int, target: Any = None,
                    op: Op | None = None) -> Request:
        """Done once ``origin`` may be reused (MPI's local completion)."""
        name = self._op(op, "Raccumulate", target_rank, fetch=False)
        if target_rank == PROC_NULL:
            return Request(self.window.rput([], PROC_NULL))
        _, a, off, _, idx = self._origin(origin, "Raccumulate", target_rank, target,
                                         atomic=True)
        return Request(self.window.raccumulate(a, target_rank, off, name, index=idx))

    def Get_accumulate(self, origin: Any, result: Any, target_rank: int, target: Any = None,
                       op: Op | None = None) -> None:
        """Into ``result`` by the epoch's end, as MPI's."""
        self._rget_accumulate(origin, result, target_rank, target, op, "Get_accumulate",
                              False)

    def Rget_accumulate(self, origin: Any, result: Any, target_rank: int, target: Any = None,
                        op: Op | None = None) -> Request:
        return self._rget_accumulate(origin, result, target_rank, target, op,
                                     "Rget_accumulate", True)

    def _rget_accumulate(self, origin: Any, result: Any, target_rank: int, target: Any,
                         op: Op | None, what: str, wanted: bool) -> Any:
        """meshrun's rget_accumulate: ``result``'s count from the target
        (MPI's: the origin's, which NO_OP's may leave out: None)."""
        name = self._op(op, what, target_rank, fetch=True)
        got = spec(result, f"Win.{what}", packs=True)
        res = self._as_window(got.view, what, target_rank, True)
        if target_rank == PROC_NULL:
            return Request(self.window.rget(PROC_NULL))
        off, n, idx = self._target(what, target_rank, target, len(res), self._dtype, True)
        if origin is None and name == "no_op":
            a = np.zeros(n, self._dtype)
        else:
            a = self._as_window(spec(origin, f"Win.{what}", packs=True).view, what,
                                target_rank, True)
            if len(a) != n:
                raise ValueError(f"{self._where(what, target_rank)}: {len(a)} origin elements, "
                                 f"{n} result elements (one count)")
        req = self.window.rget_accumulate(a, target_rank, off, name, out=res, index=idx)
        return self._getting(target_rank, got, req, wanted)

    def Fetch_and_op(self, origin: Any, result: Any, target_rank: int, target_disp: int = 0,
                     op: Op | None = None) -> None:
        name = self._op(op, "Fetch_and_op", target_rank, fetch=True)
        res = self._one(result, "Fetch_and_op", target_rank)
        if target_rank == PROC_NULL:
            return
        value = res if name == "no_op" and origin is None else \
            self._one(origin, "Fetch_and_op", target_rank)
        off, _, _ = self._target("Fetch_and_op", target_rank, target_disp, 1, self._dtype)
        res[0] = self.window.fetch_and_op(value, target_rank, off, name)

    def Compare_and_swap(self, origin: Any, compare: Any, result: Any, target_rank: int,
                         target_disp: int = 0) -> None:
        res = self._one(result, "Compare_and_swap", target_rank)
        if target_rank == PROC_NULL:
            return
        value = self._one(origin, "Compare_and_swap", target_rank)
        cmp = self._one(compare, "Compare_and_swap", target_rank)
        off, _, _ = self._target("Compare_and_swap", target_rank, target_disp, 1, self._dtype)
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
        self._unpacked()

    def Post(self, group: Any, assertion: int = 0) -> None:
        self.window.post(self._group(group, "Post"))

    def Start(self, group: Any, assertion: int = 0) -> None:
        self.window.start(self._group(group, "Start"))

    def Complete(self) -> None:
        self.window.complete()
        self._unpacked()

    def Wait(self) -> None:
        self.window.wait()

    def Test(self) -> bool:
        return self.window.test()

    def _group(self, group: Any, what: str) -> list[int]:
        """PSCW's group as the window's ranks: an MPI.Group (its ranks
        translated by ``Translate_ranks`` into the window's communicator's
        group), or a list of the window's ranks (a collectives.MPI addition)."""
        if not hasattr(group, "Translate_ranks"):
            try:
                return [int(r) for r in group]
            except TypeError:
                raise TypeError(f"rank {self.rank}: collectives.MPI Win.{what}: group "
                                f"{group!r}: an MPI.Group or a list of ranks") from None
        size = group.Get_size() if hasattr(group, "Get_size") else group.size
        ranks = list(group.Translate_ranks(list(range(size)), self.Get_group()))
        if UNDEFINED in ranks:
            raise ValueError(f"rank {self.rank}: collectives.MPI Win.{what}: group member(s) "
                             f"{[i for i, r in enumerate(ranks) if r == UNDEFINED]} are not in "
                             f"the window's group")
        return [int(r) for r in ranks]

    def Lock(self, rank: int, lock_type: int = LOCK_EXCLUSIVE, assertion: int = 0) -> None:
        if lock_type not in (LOCK_EXCLUSIVE, LOCK_SHARED):
            raise ValueError(f"{self._where('Lock', rank)}: lock_type {lock_type!r}: "
                             f"MPI.LOCK_EXCLUSIVE or MPI.LOCK_SHARED")
        self.window.lock(rank, exclusive=lock_type == LOCK_EXCLUSIVE)

    def Unlock(self, rank: int) -> None:
        self.window.unlock(rank)
        self._unpacked([rank])

    def Lock_all(self, assertion: int = 0) -> None:
        self.window.lock_all()

    def Unlock_all(self) -> None:
        self.window.unlock_all()
        self._unpacked()

    def Flush(self, rank: int) -> None:
        self.window.flush(rank)
        self._unpacked([rank])

    def Flush_all(self) -> None:
        self.window.flush_all()
        self._unpacked()

    Flush_local = Flush             # (a flush completes locally too)
    Flush_local_all = Flush_all

    def Sync(self) -> None:
        """A memory fence (one copy of the memory: nothing else to synchronize)."""
        self.window.sync()

    def Free(self) -> None:
        """(its attributes' delete_fn run, then the window freed: every handle
        of it equals WIN_NULL after)"""
        if self.window is None:
            raise ValueError("collectives.MPI Win.Free: WIN_NULL (freed already) has no "
                             "window to free")
        self._delete_attrs()
        self.window.free()

    def Get_name(self) -> str:
        """(WIN_NULL's "MPI_WIN_NULL", as mpi4py's; a window's what Set_name set)"""
        return "MPI_WIN_NULL" if self.window is None else str(self.__dict__.get("_name", ""))

    def Set_name(self, name: str) -> None:
        self.__dict__["_name"] = str(name)

    name = property(Get_name, Set_name)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Win):
            return self.window is other.window or self._null() and other._null()
        return NotImplemented

    __hash__ = object.__hash__

    def __bool__(self) -> bool:
        return not self._null()

    def _null(self) -> bool:
        return self.window is None or bool(self.window.freed)

    free = Free

    def __repr__(self) -> str:
        return "MPI.WIN_NULL" if self._null() else f"<MPI.Win {self.window!r}>"
