"""The "meshrun" ProcessGroup: torch.distributed's calls on a meshrun
communicator (collectives.torchdist registers it and makes its mesh).

torch calls a method per collective with its options; the method hands
torch's tensors to the meshrun collective (collectives.api takes them as
they are: views, bfloat16, CUDA) and returns a torch Work::

    asyncOp False   the collective runs here, in torch's thread; errors
                    (MismatchError, LostPeerError...) raise from the call,
                    and the Work is a finished one (no Future is made);
                    dist.all_reduce of a CPU tensor goes straight to the
                    host collective with the tensor's numpy view
    asyncOp True    the collective runs on meshrun's lane for the group;
    (DDP's buckets)   a torch Future is completed from there, so torch's
                    thread never waits in a call it asked to be asynchronous;
                    all_reduce of one CPU tensor hands the host collective
                    its numpy view there too

Point-to-point calls return a Work over the mesh's request (the mesh's
progress thread moves the data); ``get_future()`` on one waits in a thread.

This module holds the group, how a call runs, all_reduce and point-to-point;
the rest of its methods are in mixins, and what they share beside it:

    torchgather.py    broadcast, reduce, allgather (all its forms), gather,
                      scatter, the barriers
    torchexchange.py  reduce_scatter and alltoall (all their forms)
    torchp2p.py       send, recv and the Work over their mesh request
    torchwork.py      the collectives' Works (finished; completed from a lane)
    torchargs.py      reduce ops, timeouts, options' short forms, tensors as
                      numpy views
"""
from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as c10d

import mesh
from mesh import MeshTimeoutError
from mesh import tensors as _tensors

from . import api as C
from .host.paths import all_reduce as _host_all_reduce
from .shm.tiny import all_reduce as _tiny_all_reduce
from .runner import named, release, start
from .torchargs import (_AllreduceOptions, _OPS, _SUM, _factor, _joinable, _np, _op, _own_timeout,
                        _short, _torch_words, _write)
from .torchexchange import _Exchanges
from .torchgather import _Gathers
from .torchp2p import _PointToPoint
from .torchsparse import sparse_all_reduce
from .torchwork import _Done, _FutureWork, _done, _resolved

__all__ = ["ProcessGroupMeshrun"]


# torch's stubs overload these methods; the C++ trampoline calls ours by name
_ProcessGroup: Any = dist.ProcessGroup


class ProcessGroupMeshrun(_Gathers, _Exchanges, _PointToPoint, _ProcessGroup):
    """torch.distributed's ProcessGroup on ``comm`` (a meshrun world or
    group whose ranks are the torch group's). ``on_shutdown`` runs when
    torch destroys the group (closing a mesh made for it)."""

    def __init__(self, comm: Any, timeout: float,
                 on_shutdown: Callable[[], None] | None = None, shared: bool = False) -> None:
        super().__init__(comm.rank, comm.size)
        self.comm = comm
        self.timeout = timeout
        self._on_shutdown = on_shutdown
        # the caller's own mesh (mesh.spawn's, meshrun's world), which its
        # point-to-point shares: what is queued there is not dropped at shutdown
        self._shared = shared
        self._group_name = ""

    def getBackendName(self) -> str:
        return "meshrun"

    # torch takes a Python ProcessGroup as the whole group, with no per-device
    # Backend registered; its Python callers that ask for one (FSDP2's
    # allocation from the process group, split_group, shrink_group, the time
    # estimator) get this group, which declares none of NCCL's extras
    supports_splitting = False
    supports_coalescing = False
    supports_time_estimate = False
    supports_shrinking = False

    def _get_backend(self, device: Any) -> "ProcessGroupMeshrun":
        kind = torch.device(device).type
        if kind not in ("cpu", "cuda"):
            raise RuntimeError(f"meshrun backend: no backend for device type {kind} "
                               f"(it takes cpu and cuda tensors)")
        return self

    @property
    def _device_types(self) -> list[torch.device]:
        """The devices whose tensors the group takes, as a registered backend
        would tell torch (dcp.async_save looks for cpu; object collectives
        pick cpu)."""
        return [torch.device("cpu"), torch.device("cuda")]

    def _get_sequence_number_for_group(self) -> int:
        """How many collectives the group has started (its collective tags)."""
        return int(self.comm.collective_channel().seq)

    def _set_sequence_number_for_group(self) -> None:
        """(Every member numbers its collectives from 0 as it makes them.)"""

    def supports_tensor_alloc(self, device: Any) -> bool:
        """No memory of its own to give: the caller allocates with torch.empty."""
        return False

    def _set_group_name(self, name: str) -> None:
        super()._set_group_name(name)
        self._group_name = name

    @property
    def group_name(self) -> str:
        """torch's name for the group (C++ reads it from a registered backend,
        which a Python ProcessGroup has none of)."""
        return self._group_name

    @property
    def _n(self) -> int:
        return int(self.comm.size)

    def __repr__(self) -> str:
        return f"<ProcessGroupMeshrun {self.comm.name} rank {self.comm.rank}/{self.comm.size}>"

    def shutdown(self) -> None:
        self._drop_unreceived()
        release(self.comm)       # the lane thread exits now, not when its linger runs out
        fn, self._on_shutdown = self._on_shutdown, None
        if fn is not None:
            fn()

    def _drop_unreceived(self) -> None:
        """Name in a warning the messages sent to this rank on the group that
        it never received (an isend with no irecv to match it, which
        batch_isend_irecv lets through; gloo drops them unsaid), and take
        them out: else, on a mesh that outlives the group, a later receive
        of the same peer and tag would take them. Not on the caller's own
        mesh (``shared``: the default group over mesh.spawn's or meshrun's
        world), whose messages may be the caller's own point-to-point: they
        stay queued there, and the warning says so. Only what has come by
        now: a message still on its way when the group goes is missed."""
        left: list[str] = []
        # a probe given a moment reads the same-host rings (mesh.rings) too; iprobe
        # sees only what a reader has taken out of them
        try:
            while len(left) < (1 if self._shared else 1000):
                st = self.comm.probe(mesh.ANY, mesh.ANY_TAG, timeout=0.005)
                if not self._shared:
                    self.comm.recv(st.source, st.tag)
                left.append(f"from rank {st.source} tag {st.tag} ({st.nbytes} bytes)")
        except mesh.MeshError:      # none (a timeout), or a peer gone, the mesh closed
            pass
        if not left:
            return
        if self._shared:
            said = (f"has a message sent to this rank and not received, {left[0]} (maybe "
                    f"more): the mesh outlives the group, so it stays queued there for a "
                    f"later receive of that peer and tag (a send with no matching recv?)")
        else:
            more = f"; and {len(left) - 4} more" if len(left) > 4 else ""
            said = (f"dropped {len(left)} message(s) sent to this rank and never received (a "
                    f"send with no matching recv): {'; '.join(left[:4])}{more}")
        warnings.warn(f"rank {self.comm.rank}: destroy_process_group: group {self.comm.name} "
                      f"{said}", RuntimeWarning, stacklevel=2)

    # -- how a call runs ----------------------------------------------------------

    def _limits(self, opts: Any) -> tuple[float | None, float]:
        """A call's own timeout (_own_timeout: None where its options set
        none) and the seconds it runs by: that, else the group's."""
        limit = _own_timeout(opts)
        return limit, self.timeout if limit is None else limit

    def _run(self, launches: Sequence[Callable[..., Any]],
             finish: Callable[[list[Any]], Any] | None,
             result: Any, async_op: bool, own: float | None = None) -> dist.Work:
        """Start each launch (a meshrun collective, given async_op); once all
        have finished, ``finish(values)`` writes the outputs and torch's
        future gets ``result``. ``own``: the call's own timeout, which the
        launches were given (_own_timeout), for its errors' words."""
        values, error = _launch_all(launches, async_op)
        secs = self.timeout if own is None else own
        if not async_op:
            if error is not None:
                _torch_words(error, secs, own is not None)
                raise error
            if finish is not None:
                finish(values)
            return _done(result)
        work = _FutureWork()
        works = values
        work.what = _what(works, work.what)
        if error is not None:       # torch reads an async call's errors from its Work
            _torch_words(error, secs, own is not None)
            work.finish(None, error)
            return work

        def complete(_: Any = None) -> None:
            try:
                values = [w.wait(0) for w in works]
                if finish is not None:
                    finish(values)
            except BaseException as e:
                _torch_words(e, secs, own is not None)
                work.finish(None, e)
                return
            work.finish(_resolved(result), None)

        if len(works) <= 1:      # one collective (DDP's bucket): nothing to count
            if works:
                works[0].add_done_callback(complete)
            else:
                complete()
            return work
        left = [len(works)]
        lock = threading.Lock()

        def on_done(_: Any) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            complete()

        for w in works:
            w.add_done_callback(on_done)
        return work

    def _refuse(self, op: str, problem: str, async_op: bool, calls: int = 1) -> dist.Work:
        """Fail the call ``op`` on every member, saying ``problem`` (this
        rank's arguments cannot hold its result): the others, in the call,
        raise naming this rank, where a check of our own would leave them
        waiting (gloo's) or torch would fail only here, after the transfer.
        ``calls``: how many collectives the others start for it (one per
        tensor of a coalesced call), each failed, so that every rank spends
        as many and the group's next call lines up."""
        err = ValueError(f"{self._what(op)}: {problem}")

        def refuse(_: Any) -> Any:
            raise err
        return self._run([lambda a: start(self.comm, op, refuse, a, self.timeout)] * calls,
                         None, [], async_op)

    def refuse_unpicklable(self, call: str, error: BaseException) -> None:
        """``call`` (one of torch's object collectives) could not pickle this
        rank's object (collectives.torchdist._object_to_tensor): fail the
        group's collective the others make first for it (one), naming this
        rank and the error, so that they raise there and the group's next
        call lines up; the caller raises ``error`` itself."""
        self._refuse(call, f"its object cannot be pickled: {type(error).__name__}: {error}",
                     True)

    def _unjoined(self, op: str, tensors: Sequence[torch.Tensor],
                  async_op: bool) -> dist.Work | None:
        """A coalesced call whose tensors cannot be joined (_joinable: mixed
        dtypes) is one collective a tensor, so its ranks must agree on the
        tensors first: a rank with one tensor more matched its last with the
        others' next call, which took it in (an all_reduce of ones gave [6,
        6]), and a rank whose tensors were one dtype (one collective) met
        the others' first of two. One small collective where every member
        sends its tensors' dtypes and shapes to every other, in the calling
        thread (a rank whose call disagrees must not start the per-tensor
        ones): every rank whose call is not every member's raises
        MismatchError naming both (or meets a joined call, which differs
        too), and each spent one call. None when they agree; else the
        failed Work of an async call (a blocking one raises). A call of no
        tensors takes it too (a no-op where every member's has none): it
        started nothing, so that rank returned at once and its next call met
        the others' coalesced one (an all_reduce took their tensor in: [2, 2]
        from ones at 2 ranks), or they waited to their timeout."""
        if len(tensors) == 1 or _joinable(tensors):
            return None
        sig = ", ".join(f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"
                        for t in tensors)
        return self._agree(f"{op}_coalesced", {"tensors": f"[{sig}]"}, async_op)

    def coalesced_none(self, async_op: bool, failed: str = "") -> dist.Work | None:
        """A ``_coalescing_manager`` block that made no call torch hands on
        (collectives.torchdist._coalescing_manager): torch calls nothing
        then, so this rank went on while the others' coalesced call waited
        for it, and its next call met theirs (an all_reduce took the
        other's tensor in: [11, 11] from 1 and 10 at 2 ranks, silently on
        both; its rank's call after that waited to its timeout). The
        members' small agreement (_agree) instead: every rank raises
        MismatchError naming this block and the others' call; where every
        member's block is empty it is a no-op. ``failed``: the block raised
        that error here (its own record dropped), and says so. None, or an
        async block's failed Work."""
        fp = {"failed": failed} if failed else {"calls": 0}
        return self._agree("_coalescing_manager", fp, async_op)

    def _agree(self, coll: str, fp: dict, async_op: bool) -> dist.Work | None:
        """One small collective where every member sends its fingerprint
        ``coll(fp)`` to every other, in the calling thread: every rank whose
        call is not every member's raises MismatchError naming both. None
        when they agree; else the failed Work of an async call (a blocking
        one raises)."""
        def prepare(_: Any) -> tuple[dict, Callable[[Any], None]]:
            def body(ctx: Any) -> None:
                me, n = ctx.g.rank, ctx.g.size
                recvs = [ctx.irecv(j) for j in range(n) if j != me]
                sends = [ctx.isend(None, j) for j in range(n) if j != me]
                for req in recvs + sends:
                    req.wait()
            return {"coll": coll, **fp}, body
        try:
            start(self.comm, coll, prepare, False, self.timeout)
        except Exception as e:
            _torch_words(e, self.timeout)
            if not async_op:
                raise
            work = _FutureWork()
            work.finish(None, e)
            return work
        return None

    @staticmethod
    def _premul_problem(factor: Any, tensors: Sequence[torch.Tensor]) -> str:
        """Why PREMUL_SUM (a factor) cannot scale ``tensors`` ('' when it can)."""
        if factor is None:
            return ""
        bad = next((t for t in tensors if not (t.is_floating_point() or t.is_complex())), None)
        if bad is None:
            return ""
        return f"ReduceOp.PREMUL_SUM scales by a float: it needs floating tensors, not {bad.dtype}"

    def _all_reduce(self, tensors: list[torch.Tensor], rop: Any, async_op: bool,
                    limit: float | None = None) -> dist.Work:
        """``limit``: the call's own timeout (_own_timeout), None: the group's."""
        name, factor = _op(rop)
        secs = self.timeout if limit is None else limit
        if problem := self._premul_problem(factor, tensors):
            return self._refuse("all_reduce", problem, async_op, len(tensors))
        if factor is not None:
            for t in tensors:
                t.detach().mul_(_factor(factor))
        if not async_op and len(tensors) == 1:     # dist.all_reduce: nothing but the call
            try:
                C.all_reduce(self.comm, tensors[0], op=name, timeout=secs)
            except MeshTimeoutError as e:
                _torch_words(e, secs, limit is not None)
                raise
            return _done(tensors)
        return self._run([lambda a, t=t: C.all_reduce(self.comm, t, op=name, async_op=a,
                                                       timeout=secs)
                          for t in tensors], None, tensors, async_op, limit)

    # -- collectives --------------------------------------------------------------

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None,
                  timeout: Any = None) -> dist.Work:
        if type(tensors) is not list or opts is not None and type(opts) is not _AllreduceOptions:
            # a short form (_short): pg.allreduce(tensor[, op]), pg.allreduce(tensors, op)
            tensors = [tensors] if isinstance(tensors, torch.Tensor) else tensors
            opts = _short(c10d.AllreduceOptions, timeout, reduceOp=_SUM if opts is None else opts)
        if opts is not None and len(tensors) == 1:
            # dist.all_reduce's call and DDP's bucket, with the least work: a
            # CPU tensor of a dtype numpy has goes to the host collective as
            # the numpy view of its memory (what collectives.tensors would hand
            # it); synchronously on this thread, a tiny one the short way once
            # a first call has settled it, as collectives.all_reduce does
            # (collectives.shm.tiny); asynchronously on the group's lane
            rop = opts.reduceOp
            name = "sum" if rop == _SUM else _OPS.get(rop.op.value)
            if name is not None:
                arr = _tensors.cpu_numpy(tensors[0])    # None: collectives.api's tensor path
                if arr is not None and (name != "avg" or arr.dtype != np.float16):
                    # (float16 averaged: collectives.api's, in float32); written through
                    # its numpy view: autograd is told as the call starts, as torch's
                    # in-place ops tell it (an async call's backward before wait() raises)
                    _tensors.written(tensors[0])
                    limit = _own_timeout(opts)
                    if opts.asyncOp:
                        return self._host_async(arr, name, tensors, limit)
                    comm = self.comm
                    timeout = self.timeout if limit is None else limit
                    try:
                        if _tiny_all_reduce(comm, arr, name, timeout) is None:
                            _host_all_reduce(comm, arr, name, False, None, timeout)
                    except MeshTimeoutError as e:
                        _torch_words(e, timeout, limit is not None)
                        raise
                    done = _Done()
                    done._result = tensors
                    return done
        opts = opts or c10d.AllreduceOptions()
        if tensors and tensors[0].layout is torch.sparse_coo:
            return self._sparse_all_reduce(tensors, opts)
        return self._all_reduce(tensors, opts.reduceOp, opts.asyncOp, _own_timeout(opts))

    def _tiny(self, call: Callable[[np.ndarray, np.ndarray], Any], x: torch.Tensor,
              out: torch.Tensor, secs: float, limit: float | None) -> bool:
        """Whether ``call(input, output)`` on the numpy views of a blocking
        call's one CPU input and output ran the call the short way
        (collectives.shm.tiny, once a first call has settled it; it checks
        the output), ``out`` then written; its timeout's error (``secs``;
        ``limit``: the call's own, _own_timeout) in torch's words. False:
        nothing done."""
        xa, oa = _np(x), _np(out)
        if xa is None or oa is None or self._quick(lambda: call(xa, oa), secs, limit) is None:
            return False
        _tensors.written(out)   # (written through numpy: autograd is told)
        return True

    def _quick(self, call: Callable[[], Any], secs: float, limit: float | None) -> Any:
        """``call()``, a short way's (collectives.shm.tiny: None where it
        takes the long way), its timeout's error (``secs``; ``limit``: the
        call's own, _own_timeout) in torch's words."""
        try:
            return call()
        except MeshTimeoutError as e:
            _torch_words(e, secs, limit is not None)
            raise

    def _host_async(self, arr: np.ndarray, name: str, tensors: list[torch.Tensor],
                    limit: float | None) -> dist.Work:
        """``arr`` (the view of ``tensors[0]``) all-reduced on the group's
        lane by the host collective, its Work's completion finishing torch's
        (no collectives.tensors round trip). ``limit``: the call's own timeout."""
        secs = self.timeout if limit is None else limit
        return self._run([lambda a: _host_all_reduce(self.comm, arr, name, a, None, secs)],
                         None, tensors, True, limit)

    def _sparse_all_reduce(self, tensors: list[torch.Tensor], opts: Any) -> dist.Work:
        """The sum of sparse COO tensors, written into each of them (as
        gloo does: ``copy_`` of the coalesced sum)."""
        limit, secs = self._limits(opts)
        name, factor = _op(opts.reduceOp)
        op = name if factor is None else "premul_sum"

        def finish(values: list[Any]) -> None:
            with torch.no_grad():
                for t in tensors:
                    t.copy_(values[0])
        return self._run([lambda a: sparse_all_reduce(self.comm, tensors, op, a, secs)],
                         finish, tensors, opts.asyncOp, limit)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        """One all_reduce of the tensors joined where they can be (_joinable:
        dist.all_reduce_coalesced's are of one dtype, torch checks), each
        taking its part back."""
        opts = opts or c10d.AllreduceCoalescedOptions()
        limit, secs = self._limits(opts)
        if not _joinable(tensors):
            return self._unjoined("all_reduce", tensors, opts.asyncOp) or self._all_reduce(
                tensors, opts.reduceOp, opts.asyncOp, limit)
        name, factor = _op(opts.reduceOp)
        if problem := self._premul_problem(factor, tensors):
            return self._refuse("all_reduce", problem, opts.asyncOp)
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        if factor is not None:
            flat.mul_(_factor(factor))

        def finish(_: list[Any]) -> None:
            for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
                _write(t, part)
        return self._run([lambda a: C.all_reduce(self.comm, flat, op=name, async_op=a,
                                                 timeout=secs)],
                         finish, tensors, opts.asyncOp, limit)

    def _what(self, op: str) -> str:
        """``op`` on this rank, named as torch's caller knows it too: a
        sub-group's rank 0 on world rank 2 said "rank 0" alone."""
        return f"{named(self.comm, self.comm.rank)}: {op} on group {self.comm.name}"

    # -- point-to-point -----------------------------------------------------------


def _what(works: Sequence[Any], default: str) -> str:
    """The first meshrun Work's description (a DeviceWork's: its inner one's)."""
    for w in works:
        while w is not None and not isinstance(getattr(w, "desc", None), str):
            w = getattr(w, "_work", None)
        if w is not None:
            return str(w.desc)
    return default


def _launch_all(launches: Sequence[Callable[..., Any]],
                async_op: bool) -> tuple[list[Any], BaseException | None]:
    """Each launch's value (a result, or an async call's Work) and the first
    error: every launch is made even after one fails, so that every rank
    spends as many of the group's calls (one per tensor) and the group's
    next call lines up."""
    values, error = [], None
    for launch in launches:
        try:
            values.append(launch(async_op))
        except BaseException as e:
            error = error or e
    return values, error
