"""CUDA IPC between the processes of one host: collectives on device arrays
as device-to-device copies and GPU reductions straight out of the peers'
registered buffers; only small synchronization messages travel (on the
group's same-host board when it has one, else ZeroMQ).

Each rank keeps one registered buffer R per group: raw device memory (not
from CuPy's pool, so its IPC handle maps exactly onto it), grown when a call
needs more, otherwise reused. A peer opens R's handle once per generation
(a grown R is a new generation) and keeps it open until the mesh closes.

    all_reduce, n ranks, c(p) = p's chunk of n even parts:
      a -> R | sync | post (generation, handle)            "R written"
      open new handles; R[c(me)] (op)= R_p[c(me)], p = me+1, me+2, ...
             | sync | stage 2                              "my chunk final"
      for each p: wait its stage 2; a[c(p)] <- R_p[c(p)];  a[c(me)] <- R[c(me)]
             | sync | stage 3                              "done reading you"
      wait for every peer's stage 3: R may then be written by the next call

"sync" is the host waiting (bounded) for this rank's up stream, so no peer
reads R before the writes to it are done, and R is not written again until
every peer has said it is done reading. Chunk c is reduced by rank c alone,
in a fixed order, so every rank ends with the same bits. reduce_scatter,
all_gather and broadcast are the same round with fewer stages.

Used when every rank of the group is on one host, MESH_CUDA_IPC is not 0,
and every rank could open every other's buffer and read a token back (the
probe, once per group); with MESH_CUDA_IPC=1 a failed probe is an error.
Peers on the same GPU are read by the reduction kernel directly; a chunk of
a peer on another GPU is first copied (a peer copy) into local scratch.
"""
from __future__ import annotations

import os
import secrets
import threading
import weakref
from typing import Any

import msgpack
import numpy as np

from mesh import Comm, MeshError, device
from mesh.env import host_id

from ..host.exchange import all_gather_object_direct
from ..ops import ReduceOp
from ..plan import ring_chunks
from ..runner import Ctx, named
from ..shm import board
from .gpu import Call, Lanes, where

__all__ = ["usable", "all_reduce", "reduce_scatter", "all_gather", "broadcast", "mode",
           "env_mode"]

_MIN_BYTES = 1 << 20


def mode() -> str:
    """MESH_CUDA_IPC: "0" off, "1" required, "auto" (or unset, or empty) automatic;
    anything else raises (it was read as automatic: "off" left IPC on)."""
    return env_mode("MESH_CUDA_IPC", "never use CUDA IPC", "require it")


def env_mode(name: str, zero: str, one: str) -> str:
    """Environment variable ``name``: "auto" (unset or empty too), "0" or
    "1" (what ``zero`` and ``one`` mean, for the error); anything else raises."""
    value = os.environ.get(name, "auto").strip().lower() or "auto"
    if value not in ("auto", "0", "1"):
        raise ValueError(f"{name}={os.environ[name]!r}: expected auto, 0 ({zero}) or 1 ({one})")
    return value


def _bus(cp: Any, dev: int) -> str:
    """Which physical GPU: its PCI bus id (device ordinals differ between
    processes with different CUDA_VISIBLE_DEVICES)."""
    try:
        return str(cp.cuda.Device(dev).pci_bus_id)
    except Exception:
        return f"ordinal {dev}"


class _State:
    """One group's registered buffer and the peers' buffers opened here."""

    def __init__(self, cp: Any) -> None:
        self.cp = cp
        self.mem: Any = None
        self.size = self.gen = 0
        self.dev = -1
        self.handle = b""
        self.opened: dict[int, tuple[int, int, int]] = {}   # peer -> (gen, my device, ptr)
        self.retired: list[Any] = []
        self.opens = 0
        self.lock = threading.Lock()

    def ensure(self, nbytes: int, dev: int) -> None:
        """A registered buffer of at least ``nbytes`` on ``dev``; a new one
        (the next generation) when the current one is too small or elsewhere.
        The old one is freed only once every peer has closed it."""
        if self.mem is not None and self.size >= nbytes and self.dev == dev:
            return
        if self.mem is not None:
            self.retired.append(self.mem)
        size = max(_MIN_BYTES, 1 << max(0, (nbytes - 1).bit_length()))
        cp = self.cp
        with cp.cuda.Device(dev):
            mem = cp.cuda.Memory(size)
            handle = bytes(cp.cuda.runtime.ipcGetMemHandle(mem.ptr))
        self.mem, self.size, self.dev, self.handle = mem, size, dev, handle
        self.gen += 1

    def peer(self, p: int, gen: int, handle: bytes, dev: int) -> int:
        """Peer p's buffer of generation ``gen`` opened on ``dev`` (cached)."""
        cur = self.opened.get(p)
        if cur is not None and cur[0] == gen and cur[1] == dev:
            return cur[2]
        if cur is not None:
            self._close(cur)
            del self.opened[p]
        cp = self.cp
        with cp.cuda.Device(dev):
            ptr = int(cp.cuda.runtime.ipcOpenMemHandle(handle))
        self.opens += 1
        self.opened[p] = (gen, dev, ptr)
        return ptr

    def _close(self, entry: tuple[int, int, int]) -> None:
        cp = self.cp
        with cp.cuda.Device(entry[1]):
            cp.cuda.runtime.ipcCloseMemHandle(entry[2])

    def close(self) -> None:
        """Close every opened handle, then free the registered buffers."""
        with self.lock:
            for entry in self.opened.values():
                try:
                    self._close(entry)
                except Exception:
                    pass
            self.opened.clear()
            self.mem = None
            self.retired.clear()


_groups: "weakref.WeakKeyDictionary[Comm, _State | None]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def state(g: Comm) -> _State | None:
    """The group's IPC state (None: not probed, or IPC is not used)."""
    with _lock:
        return _groups.get(g)


def usable(ctx: Ctx, call: Call, nbytes: int) -> bool:
    """Whether this group's device collectives go through CUDA IPC; probed
    (with messages under this collective's tag) on the group's first ask."""
    with _lock:
        known = ctx.g in _groups
    if not known:
        st = _probe(ctx, call, nbytes)
        if st is not None:    # after the peers' goodbyes: none still reads our buffer
            ctx.ch.on_close(st.close)
        with _lock:
            _groups[ctx.g] = st
    return state(ctx.g) is not None


def _probe(ctx: Ctx, call: Call, nbytes: int) -> _State | None:
    """Every rank registers a buffer holding a random token, opens every
    peer's and reads its token back; all must succeed on all ranks."""
    cp, want = call.cp, mode()
    t = ctx.g._t       # (MESH_HOST_ID may list one id per rank)
    me: dict[str, Any] = {"host": host_id(t.rank, t.size), "on": want != "0",
                          "why": "MESH_CUDA_IPC=0"}
    st = _State(cp) if me["on"] else None
    token = np.frombuffer(secrets.token_bytes(8), np.uint8).copy()
    if st is not None:
        try:
            st.ensure(nbytes, call.dev)
            with cp.cuda.Device(call.dev):
                cp.cuda.runtime.memcpy(st.mem.ptr, token.ctypes.data, 8, device.MEMCPY_DEFAULT)
            me.update(handle=st.handle, gen=st.gen, token=token.tobytes(), why="")
        except Exception as e:
            me.update(on=False, why=f"cannot register a buffer: {type(e).__name__}: {e}")
    everyone = all_gather_object_direct(ctx, me)
    ok, why = True, ""
    for p, info in enumerate(everyone):
        if not info["on"]:
            ok, why = False, f"{named(ctx.g, p)}: {info['why']}"
        elif info["host"] != me["host"]:
            ok, why = False, f"{named(ctx.g, p)} is on another host"
    if ok and st is not None:
        got = np.zeros(8, np.uint8)
        for p, info in enumerate(everyone):
            if p == ctx.g.rank:
                continue
            try:
                ptr = st.peer(p, info["gen"], info["handle"], call.dev)
                with cp.cuda.Device(call.dev):
                    cp.cuda.runtime.memcpy(got.ctypes.data, ptr, 8, device.MEMCPY_DEFAULT)
            except Exception as e:
                ok, why = False, (f"{named(ctx.g, ctx.g.rank)} cannot open {named(ctx.g, p)}'s "
                                  f"memory: {e}")
                break
            if got.tobytes() != info["token"]:
                ok, why = False, (f"{named(ctx.g, ctx.g.rank)} read a wrong token from "
                                  f"{named(ctx.g, p)}")
                break
    votes = all_gather_object_direct(ctx, [ok, why])
    if all(v[0] for v in votes):
        return st
    if st is not None:
        st.close()
    if want == "1":
        reason = next(v[1] for v in votes if not v[0])
        raise MeshError(f"{where(ctx)}: MESH_CUDA_IPC=1 but CUDA IPC cannot be used: {reason}")
    return None


class _Messages:
    """Stages over ZeroMQ (under the collective's tag, which keeps each
    peer's messages in order): the same calls as _Board."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        n, r = ctx.g.size, ctx.g.rank
        self.peers = [(r + k) % n for k in range(1, n)]
        self.seen = dict.fromkeys(self.peers, 0)
        self.sends: list[Any] = []

    def __enter__(self) -> "_Messages":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            for req in self.sends:
                req.wait()

    def exchange(self, payload: bytes) -> list[Any]:
        return all_gather_object_direct(self.ctx, payload)

    def stage(self, k: int) -> None:
        self.sends += [self.ctx.isend(k, p) for p in self.peers]

    def wait_stage(self, peers: list[int], k: int) -> None:
        for p in peers:
            while self.seen[p] < k:
                self.seen[p] = int(self.ctx.recv(p))


class _Board:
    """Stages on the same-host board (collectives.shm.board): no socket at all."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx, self.round = ctx, board.Round(ctx)
        self.peers = self.round.peers

    def __enter__(self) -> "_Board":
        self.round.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.round.__exit__(*exc)

    def exchange(self, payload: bytes) -> list[Any]:
        self.round.post(payload=np.frombuffer(payload, np.uint8))
        self.round.gather()
        return [payload if p == self.ctx.g.rank else self.round.payload_of(p).tobytes()
                for p in range(self.ctx.g.size)]

    def stage(self, k: int) -> None:
        self.round.stage(k)

    def wait_stage(self, peers: list[int], k: int) -> None:
        self.round.wait_stage(peers, k)


class _Round:
    """One IPC collective: this rank's registered buffer filled (or not),
    the peers' opened, and at the end the wait for every peer to be done."""

    def __init__(self, ctx: Ctx, lanes: Lanes, call: Call, src: Any, nbytes: int) -> None:
        st = state(ctx.g)
        assert st is not None
        self.ctx, self.lanes, self.call, self.st = ctx, lanes, call, st
        self.me, self.n = ctx.g.rank, ctx.g.size
        st.ensure(nbytes, call.dev)
        self.mine = int(st.mem.ptr)
        if src is not None:
            lanes.copy(self.mine, int(src.data.ptr), int(src.nbytes), lanes.up)
        lanes.sync()
        self.sync: Any = _Board(ctx) if board.available(ctx, 256) else _Messages(ctx)
        self.ptrs: dict[int, int] = {}
        self.local: dict[int, bool] = {}

    def __enter__(self) -> "_Round":
        self.sync.__enter__()
        st = self.st
        bus = _bus(self.call.cp, self.call.dev)
        infos = self.sync.exchange(msgpack.packb([st.gen, st.handle, bus]))
        for p in self.sync.peers:
            gen, handle, their_bus = msgpack.unpackb(infos[p])
            self.ptrs[p] = st.peer(p, gen, handle, self.call.dev)
            self.local[p] = their_bus == bus
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None:
                self.lanes.sync()
                self.sync.stage(3)
                self.sync.wait_stage(self.sync.peers, 3)
        finally:
            self.sync.__exit__(*exc)
        if exc[0] is None:
            self.st.retired.clear()   # every peer has opened the new generation

    def reduce_into(self, dst: Any, lo: int, hi: int, op: ReduceOp) -> None:
        """dst (op)= every peer's R[lo:hi] (items of dst's dtype), in ring
        order from me + 1, on the up stream."""
        if hi == lo:
            return
        lanes, cp, dt = self.lanes, self.call.cp, np.dtype(dst.dtype)
        ufunc = getattr(cp, op.ufunc_name)
        scratch = None
        with lanes.up:
            for p in self.sync.peers:
                at = self.ptrs[p] + lo * dt.itemsize
                if self.local[p]:
                    src = device.view(at, hi - lo, dt, self.st, self.call.dev)
                else:
                    if scratch is None:
                        scratch = cp.empty(hi - lo, dt)
                    lanes.copy(int(scratch.data.ptr), at, (hi - lo) * dt.itemsize, lanes.up)
                    src = scratch
                ufunc(dst, src, out=dst)

    def read(self, p: int, offset: int, dst: Any) -> None:
        """Copy dst.nbytes bytes at ``offset`` in peer p's R (or mine) into dst."""
        base = self.mine if p == self.me else self.ptrs[p]
        self.lanes.copy(int(dst.data.ptr), base + offset, int(dst.nbytes), self.lanes.up)


def all_reduce(ctx: Ctx, lanes: Lanes, call: Call, flat: Any, op: ReduceOp) -> None:
    """``flat`` (C-contiguous, 1-D) reduced over the group, in place."""
    n, me, item = ctx.g.size, ctx.g.rank, flat.itemsize
    bounds = ring_chunks(flat.size, n)
    lo, hi = bounds[me]
    with _Round(ctx, lanes, call, flat, flat.nbytes) as r:
        mine = device.view(r.mine + lo * item, hi - lo, flat.dtype, r.st, call.dev)
        r.reduce_into(mine, lo, hi, op)
        lanes.sync()
        r.sync.stage(2)
        for p in r.sync.peers:
            r.sync.wait_stage([p], 2)
            a, b = bounds[p]
            if b > a:
                r.read(p, a * item, flat[a:b])
        if hi > lo:
            r.read(me, lo * item, flat[lo:hi])


def reduce_scatter(ctx: Ctx, lanes: Lanes, call: Call, flat: Any, out: Any,
                   op: ReduceOp) -> None:
    """``out`` = this rank's chunk of ``flat`` reduced over the group."""
    lo, hi = ring_chunks(flat.size, ctx.g.size)[ctx.g.rank]
    with _Round(ctx, lanes, call, flat, flat.nbytes) as r:
        r.read(r.me, lo * flat.itemsize, out)
        r.reduce_into(out, lo, hi, op)


def all_gather(ctx: Ctx, lanes: Lanes, call: Call, flat: Any, rows: Any) -> None:
    """Row p of ``rows`` (n rows of flat.size items) = rank p's ``flat``."""
    with _Round(ctx, lanes, call, flat, flat.nbytes) as r:
        for p in range(ctx.g.size):
            if flat.size:
                r.read(p, 0, rows[p])


def broadcast(ctx: Ctx, lanes: Lanes, call: Call, flat: Any, root: int) -> None:
    """The root's ``flat`` copied into every rank's ``flat``."""
    is_root = ctx.g.rank == root
    with _Round(ctx, lanes, call, flat if is_root else None, flat.nbytes) as r:
        if not is_root and flat.size:
            r.read(root, 0, flat)
