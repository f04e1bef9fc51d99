"""Collectives on device arrays (CuPy, CUDA array interface, DLPack): which
path a call takes (collectives.api asks ``large`` and calls the path).

    same host, CUDA IPC usable      all_reduce, reduce_scatter, all_gather,
      (device/cuda_ipc.py)            broadcast: device-to-device copies
                                      out of the peers' registered buffers
    same host, no CUDA IPC          all_reduce, reduce_scatter, all_gather,
      (whole staging)                 broadcast: one copy down into pinned
                                      memory, the host collective's same-host
                                      paths (board, cross-memory attach), one
                                      copy back (what gloo does on CUDA
                                      tensors, with a faster host part)
    across hosts, overlapped        all_reduce, reduce_scatter, all_gather:
      staging (device/ring.py)        the ring, segments through pinned
                                      slots, reductions on the GPU
    simple staging (``simple``)     small arrays (under MESH_COLL_SMALL),
                                      the other collectives: one copy down,
                                      the host collective, one copy back

MESH_CUDA_OVERLAP picks between the staged ways where IPC is not used:
"auto" (the default) as above; "1" the overlapped ring on one host too;
"0" whole staging everywhere (the host ring across hosts), and with
MESH_CUDA_IPC=0 every call staged as ``simple``. Every rank of a group must
set it alike (it is in the call's fingerprint).

Stream semantics (device/gpu.py): a call waits for the work queued on the
caller's current stream before it; its result is complete on the device
when the call, or its ``Work.wait()``, returns. In-place collectives write
into the caller's array; the others return a new CuPy array on its device.

Every rank of a call must pass a device array, or every rank a host array,
when the array is large: the paths differ, and a mix raises MismatchError.
"""
from __future__ import annotations

import functools
import threading
from typing import Any, Callable

import numpy as np

from mesh import Comm, device

from .. import debug
from ..host.paths import _fp, _root, _rows
from ..host.ring import ring as host_ring
from ..host.rooted import broadcast_tree
from ..ops import resolve
from ..plan import Tuning, ring_chunks
from ..runner import Ctx, agreed, start
from ..shm import board, local
from . import cuda_ipc, gpu
from .ring import ring as overlapped

__all__ = ["simple", "DeviceWork", "large", "all_reduce", "reduce_scatter", "all_gather",
           "broadcast"]


class DeviceWork:
    """An async collective that ran on a copy of the caller's array (a
    device array staged, a tensor widened): ``wait()`` copies the result
    back. ``eager`` (a host copy: a float16 average, bfloat16): the copy
    back is the call's last step, in the group's lane (Work.settle_with),
    so the result is in the caller's array once the call completes, waited
    or not, as a call on the caller's own memory leaves it; a device
    array's is copied back by ``wait()``, on the caller's stream."""

    __slots__ = ("_work", "_finish", "_done", "_value", "_lock")

    def __init__(self, work: Any, finish: Callable[[Any], Any], eager: bool = False) -> None:
        self._work, self._finish = work, finish
        self._done = False
        self._value: Any = None
        self._lock = threading.Lock()     # one copy back: the lane's, or a wait()'s
        if eager and not work.settle_with(self._settled):
            try:            # (the call finished already: copied back here, before the return)
                self.wait()
            except BaseException:       # (a failed call: wait() raises it again)
                pass

    def _settled(self, result: Any) -> None:
        with self._lock:
            if not self._done:
                self._value = self._finish(result)
                self._done = True

    def done(self) -> bool:
        """Whether the result is in place (copied back: a caller that polls
        done() and then reads its tensor sees the result, as with torch's
        is_completed())."""
        if self._done:
            return True
        if not self._work.done():
            return False
        try:
            self.wait()
        except BaseException:       # (a failed collective: wait() raises it again)
            pass
        return True

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        """``fn(self)`` once the host collective has finished (see Work's);
        ``wait()`` then copies the result back without waiting."""
        self._work.add_done_callback(lambda _: fn(self))

    def wait(self, timeout: float | None = None) -> Any:
        if not self._done:
            self._settled(self._work.wait(timeout))
        return self._value


def simple(fn: Callable[..., Any], in_place: bool) -> Callable[..., Any]:
    """Wrap a host collective ``fn(g, a, ...)`` so that ``a`` may live on a
    device: copied down whole, the host collective, copied back whole."""
    @functools.wraps(fn)
    def run(g: Comm, a: Any = None, *args: Any, async_op: bool = False,
            timeout: float | None = None, **kw: Any) -> Any:
        if a is None or not device.is_device(a):
            return fn(g, a, *args, async_op=async_op, timeout=timeout, **kw)
        host = device.to_host(a)

        def finish(result: Any) -> Any:
            if in_place:
                device.to_device(host, out=a)
                return a
            return None if result is None else device.to_device(result)

        result = fn(g, host, *args, async_op=async_op, timeout=timeout, **kw)
        return DeviceWork(result, finish) if async_op else finish(result)
    return run


def large(g: Comm, a: Any, nbytes_factor: int = 1, algorithm: str | None = None,
          small_alg: str = "") -> bool:
    """Whether a call takes the device paths (IPC, or staged in the body: see
    the module's text): a large device array (the same answer on every
    rank, whose shapes agree); otherwise it is staged whole as a small one
    (``simple``) or, for a host array, runs on the host."""
    if isinstance(a, np.ndarray) or a is None or not device.is_device(a) or g.size == 1:
        return False
    if overlap_mode() == "0" and cuda_ipc.mode() == "0":
        return False
    if algorithm is not None and algorithm == small_alg:
        return False
    nbytes = device.nbytes_of(a) * nbytes_factor
    try:
        small = Tuning.from_env().small
    except ValueError:      # (a bad MESH_COLL_*: the staged call raises it, naming the call)
        return False
    return nbytes > 0 and nbytes >= small       # (empty: staged, as small)


def _fp_device(coll: str, arr: Any, mode: str, **kw: Any) -> dict:
    """A device call's fingerprint: its staging mode too (``mode``, read once
    at the call, which its body then follows), so that ranks set apart raise
    MismatchError rather than take different paths."""
    return _fp(coll, arr, alg="device", overlap=mode, **kw)


def _ipc(ctx: Ctx, call: gpu.Call, nbytes: int, coll: str = "") -> bool:
    """Every rank asks (the first ask is the group's collective probe).
    ``coll``: the call's, for MESH_COLL_DEBUG's line when IPC carries it."""
    used = cuda_ipc.usable(ctx, call, nbytes)
    if used and debug.ON and coll:
        debug.note(ctx.g, coll, "device array, CUDA IPC", nbytes)
    return used


_WAYS = {"board": "staged whole over the same-host board",
         "whole": "staged whole, flat ring over sockets",
         "ring": "overlapped ring, staged segment by segment"}


def _way(ctx: Ctx, mode: str, coll: str, nbytes: int) -> str:
    """_staged, and MESH_COLL_DEBUG's line for it."""
    way = _staged(ctx, mode)
    if debug.ON:
        debug.note(ctx.g, coll, f"device array, {_WAYS[way]}", nbytes)
    return way


def overlap_mode() -> str:
    """MESH_CUDA_OVERLAP: "auto" (default), "1" or "0" (see the module's text)."""
    return cuda_ipc.env_mode("MESH_CUDA_OVERLAP", "whole-array staging", "the overlapped ring")


def _staged(ctx: Ctx, mode: str) -> str:
    """Where CUDA IPC is not used, the way the array is staged: "board"
    (whole: down once, the host collective over the same-host board and
    cross-memory attach, up once), "whole" (likewise through the host ring)
    or "ring" (segment by segment, the overlapped ring). The same answer on
    every rank: the mode is in the call's fingerprint, and the board's
    probe is the group's."""
    if mode == "1":
        return "ring"
    if board.available(ctx):
        return "board"
    return "whole" if mode == "0" else "ring"


def _whole(ctx: Ctx, lanes: gpu.Lanes, flat: Any, steps: int, reduce_steps: int,
           op: Any, shift: int = 0) -> None:
    """The ring without overlap (whole staging across hosts): ``flat`` down
    whole into pinned memory, the host ring, back up whole."""
    _via_host(lanes, flat, lambda buf: host_ring(ctx, buf, op, steps, reduce_steps, shift))


class _Staging:
    """A pooled pinned buffer of ``nbytes`` and the copies queued on it.
    ``close()`` gives it back to the pool, unless a copy may still be in
    flight (a ``sync`` that raised: the caller's stream still busy at the
    deadline): then it is dropped, for a later call must not reuse memory a
    late copy still writes (freeing pinned memory waits for the device).
    Copies down wait for what the up stream has queued before (the copy
    ``Call.flat`` makes of a strided array)."""

    def __init__(self, lanes: gpu.Lanes, nbytes: int) -> None:
        lanes.down.wait_event(lanes.event(lanes.up))
        self.lanes = lanes
        self.host = device.POOL.take(nbytes)
        self.busy = False

    def copy(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        self.busy = True
        self.lanes.copy(dst, src, nbytes, stream)

    def sync(self) -> None:
        self.lanes.sync()
        self.busy = False

    def close(self) -> None:
        if not self.busy:
            device.POOL.give(self.host)


def _via_host(lanes: gpu.Lanes, flat: Any, host_op: Callable[[Any], Any],
              down: bool = True, up: bool = True) -> None:
    """Stage ``flat`` whole through a pooled pinned buffer: copy it down
    (when ``down``), run ``host_op(buf)``, copy the buffer back up (when
    ``up``). The buffer goes back to the pool when host_op raises too (no
    copy is in flight then: the copy down has been waited for), not when a
    wait for a copy does (``_Staging``)."""
    nbytes = int(flat.nbytes)
    st = _Staging(lanes, nbytes)
    try:
        buf = st.host[:nbytes].view(flat.dtype)
        if down:
            st.copy(int(buf.ctypes.data), int(flat.data.ptr), nbytes, lanes.down)
            st.sync()
        host_op(buf)
        if up:
            st.copy(int(flat.data.ptr), int(buf.ctypes.data), nbytes, lanes.up)
        st.sync()
    finally:
        st.close()


def all_reduce(g: Comm, a: Any, op: str, async_op: bool, timeout: float | None) -> Any:
    """all_reduce of a large device array: CUDA IPC, else staged (the module's text)."""
    def prepare(t: Tuning) -> tuple[dict, Any]:
        call = gpu.Call(a)
        rop, mode = resolve(op, call.dtype), overlap_mode()
        return (_fp_device("all_reduce", call.arr, mode, op=op),
                lambda ctx: body(ctx, call, rop, mode))

    def body(ctx: Ctx, call: gpu.Call, rop: Any, mode: str) -> Any:
        cp = call.cp
        with cp.cuda.Device(call.dev):
            lanes = gpu.lanes(ctx, call)
            flat = call.flat(lanes)
            if _ipc(ctx, call, flat.nbytes, "all_reduce"):
                cuda_ipc.all_reduce(ctx, lanes, call, flat, rop)
            else:
                n = ctx.g.size
                way = _way(ctx, mode, "all_reduce", flat.nbytes)
                if way == "board":
                    _via_host(lanes, flat, lambda buf: local.all_reduce_large(ctx, buf, rop))
                else:
                    ring = _whole if way == "whole" else overlapped
                    ring(ctx, lanes, flat, 2 * (n - 1), n - 1, rop)
            with lanes.up:
                rop.finish(flat, ctx.g.size)
            call.write_back(lanes, flat)
            lanes.sync()
        return a
    return start(g, "all_reduce", prepare, async_op, timeout)


def reduce_scatter(g: Comm, a: Any, op: str, async_op: bool, timeout: float | None) -> Any:
    """reduce_scatter of a large device array: CUDA IPC, else staged (the module's text)."""
    def prepare(t: Tuning) -> tuple[dict, Any]:
        call = gpu.Call(a)
        _rows("reduce_scatter", call.arr, g.size)
        rop, mode = resolve(op, call.dtype), overlap_mode()
        return (_fp_device("reduce_scatter", call.arr, mode, op=op),
                lambda ctx: body(ctx, call, rop, mode))

    def body(ctx: Ctx, call: gpu.Call, rop: Any, mode: str) -> Any:
        cp, n, rank = call.cp, ctx.g.size, ctx.g.rank
        shape = tuple(call.arr.shape)
        m = shape[0] // n
        with cp.cuda.Device(call.dev):
            lanes = gpu.lanes(ctx, call)
            flat = call.flat(lanes)
            with lanes.up:
                mine = cp.empty((m,) + shape[1:], call.dtype)
            if _ipc(ctx, call, flat.nbytes, "reduce_scatter"):
                cuda_ipc.reduce_scatter(ctx, lanes, call, flat, mine.reshape(-1), rop)
            else:
                way = _way(ctx, mode, "reduce_scatter", flat.nbytes)
                if way == "board":
                    _via_host(lanes, flat, lambda buf: _scatter_on_host(ctx, lanes, buf, mine,
                                                                        rop), up=False)
                else:
                    with lanes.up:
                        work = flat.copy()
                    ring = _whole if way == "whole" else overlapped
                    ring(ctx, lanes, work, n - 1, n - 1, rop, shift=-1)
                    size = mine.size
                    lanes.copy(int(mine.data.ptr),
                               int(work.data.ptr) + rank * size * work.itemsize,
                               size * work.itemsize, lanes.up)
            with lanes.up:
                rop.finish(mine, n)
            lanes.sync()
        return mine
    return start(g, "reduce_scatter", prepare, async_op, timeout)


def _scatter_on_host(ctx: Ctx, lanes: gpu.Lanes, buf: np.ndarray, mine: Any,
                     rop: Any) -> None:
    """reduce_scatter's host part on one host: this rank's chunk of the
    pinned ``buf`` reduced in place over the board (no peer reads that
    chunk of this rank's buffer: each reads its own), then queued up into
    ``mine``."""
    lo, hi = ring_chunks(buf.size, ctx.g.size)[ctx.g.rank]
    local.reduce_scatter(ctx, buf, buf[lo:hi], rop)
    lanes.copy(int(mine.data.ptr), int(buf.ctypes.data) + lo * buf.itemsize,
               (hi - lo) * buf.itemsize, lanes.up)


def _gather_on_host(ctx: Ctx, lanes: gpu.Lanes, flat: Any, out: Any) -> None:
    """all_gather on one host without IPC: ``flat`` down into its row of a
    pooled pinned buffer, the rows gathered over the board, all of them up
    into ``out`` (flat) at once."""
    n, rank, nbytes = ctx.g.size, ctx.g.rank, int(flat.nbytes)
    st = _Staging(lanes, n * nbytes)
    try:
        rows = st.host[:n * nbytes].view(flat.dtype).reshape(n, int(flat.size))
        st.copy(int(rows[rank].ctypes.data), int(flat.data.ptr), nbytes, lanes.down)
        st.sync()
        local.all_gather(ctx, rows[rank], rows)
        st.copy(int(out.data.ptr), int(rows.ctypes.data), n * nbytes, lanes.up)
        st.sync()
    finally:
        st.close()


def all_gather(g: Comm, a: Any, async_op: bool, timeout: float | None) -> Any:
    """all_gather of a large device array: CUDA IPC, else staged (the module's text)."""
    def prepare(t: Tuning) -> tuple[dict, Any]:
        call, mode = gpu.Call(a), overlap_mode()
        return _fp_device("all_gather", call.arr, mode), lambda ctx: body(ctx, call, mode)

    def body(ctx: Ctx, call: gpu.Call, mode: str) -> Any:
        cp, n, rank = call.cp, ctx.g.size, ctx.g.rank
        shape = tuple(call.arr.shape)
        with cp.cuda.Device(call.dev):
            lanes = gpu.lanes(ctx, call)
            flat = call.flat(lanes)
            with lanes.up:
                out = cp.empty((n,) + shape, call.dtype)
            rows = out.reshape(n, -1)
            if _ipc(ctx, call, flat.nbytes, "all_gather"):
                cuda_ipc.all_gather(ctx, lanes, call, flat, rows)
            else:
                way = _way(ctx, mode, "all_gather", flat.nbytes)
                if way == "board":
                    _gather_on_host(ctx, lanes, flat, out.reshape(-1))
                else:
                    lanes.copy(int(rows[rank].data.ptr), int(flat.data.ptr),
                               int(flat.nbytes), lanes.up)
                    ring = _whole if way == "whole" else overlapped
                    ring(ctx, lanes, out.reshape(-1), n - 1, 0, None)
            lanes.sync()
        return out
    return start(g, "all_gather", prepare, async_op, timeout)


def broadcast(g: Comm, a: Any, root: int, async_op: bool, timeout: float | None) -> Any:
    """broadcast of a large device array: CUDA IPC, else staged whole (over
    the board on one host, down the binomial tree elsewhere)."""
    def prepare(t: Tuning) -> tuple[dict, Any]:
        call = gpu.Call(a)
        r, mode = _root(g, root), overlap_mode()
        return (_fp_device("broadcast", call.arr, mode, root=r),
                lambda ctx: body(ctx, call, r, mode))

    def body(ctx: Ctx, call: gpu.Call, r: int, mode: str) -> Any:
        with call.cp.cuda.Device(call.dev):
            lanes = gpu.lanes(ctx, call)
            flat = call.flat(lanes)
            if _ipc(ctx, call, flat.nbytes, "broadcast"):
                cuda_ipc.broadcast(ctx, lanes, call, flat, r)
            else:
                _simple_broadcast_body(ctx, lanes, flat, r, mode)
            call.write_back(lanes, flat)
            lanes.sync()
        return a
    return start(g, "broadcast", prepare, async_op, timeout)


def _simple_broadcast_body(ctx: Ctx, lanes: gpu.Lanes, flat: Any, root: int, mode: str) -> None:
    """Broadcast without IPC inside a device collective: the root's array
    goes down whole, over the board on one host (unless ``mode`` is "1")
    or along the binomial tree; the others copy it up."""
    here = ctx.g.rank == root
    on_board = mode != "1" and board.available(ctx)     # one host: the board
    if debug.ON:
        debug.note(ctx.g, "broadcast", "device array, staged whole " + (
            "over the same-host board" if on_board else "down the binomial tree"),
            int(flat.nbytes))
    if on_board:
        _via_host(lanes, flat, lambda buf: local.broadcast(ctx, buf, root),
                  down=here, up=not here)
        return
    _via_host(lanes, flat, lambda buf: agreed(lambda c: broadcast_tree(c, buf, root))(ctx),
              down=here, up=not here)
