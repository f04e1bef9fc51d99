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
"""
from __future__ import annotations

import threading
import warnings
from datetime import timedelta
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as c10d
from torch._C._distributed_c10d import ReduceOp
from torch.futures import Future

import mesh
from mesh import MeshTimeoutError
from mesh import tensors as _tensors

from . import api as C
from .host.paths import _apart, _into
from .host.paths import all_gather as _host_all_gather
from .host.paths import all_gather_v as _host_all_gather_v
from .host.paths import all_reduce as _host_all_reduce
from .host.paths import all_to_all as _host_all_to_all
from .host.paths import all_to_all_v as _all_to_all_v
from .host.paths import gather as _host_gather
from .host.paths import monitored_barrier as _monitored_barrier
from .host.paths import reduce_scatter as _host_reduce_scatter
from .host.paths import reduce_scatter_v as _host_reduce_scatter_v
from .host.paths import scatter as _host_scatter
from .shm.tiny import all_gather as _tiny_all_gather
from .shm.tiny import all_reduce as _tiny_all_reduce
from .shm.tiny import reduce_scatter as _tiny_reduce_scatter
from .runner import blocking, looked_again, named, release, start
from .torchsparse import sparse_all_reduce

__all__ = ["ProcessGroupMeshrun"]

_R: Any = ReduceOp.RedOpType
_OPS = {int(k): v for k, v in ((_R.SUM, "sum"), (_R.AVG, "avg"), (_R.PRODUCT, "prod"),
                                (_R.MIN, "min"), (_R.MAX, "max"), (_R.BAND, "band"),
                                (_R.BOR, "bor"), (_R.BXOR, "bxor"))}
"""By the enum's value: hashing the pybind enum itself costs a Python-level call."""
_SUM = ReduceOp.SUM
"""``opts.reduceOp == _SUM`` is one C++ comparison: cheaper than reading ``.op.value``."""


def _op(rop: Any) -> tuple[str, Any]:
    """meshrun's op name and the PREMUL_SUM factor (None for the others)."""
    kind = getattr(rop, "op", rop)
    name = _OPS.get(kind.value)
    if name is not None:
        return name, None
    if kind == _R.PREMUL_SUM:
        factor = getattr(rop, "factor", None)
        if factor is None:      # (torch 2.8-2.12: the factor stays in C++)
            raise ValueError(f"meshrun backend: PREMUL_SUM needs torch >= 2.13 (torch "
                             f"{torch.__version__}'s ReduceOp does not show its factor to "
                             f"Python): scale the tensor and use SUM")
        return "sum", factor
    raise ValueError(f"meshrun backend: reduce op {kind} is not supported")


def _torch_words(e: BaseException, secs: float, own: bool = False) -> None:
    """A collective's MeshTimeoutError says it is the process group's timeout
    (``own``: the call's own, _own_timeout) in place, type and traceback
    kept: torch's callers and its own suite match " (Timed out|closed|timeout) "
    in a timed-out collective's error."""
    if isinstance(e, MeshTimeoutError) and e.args and " timeout " not in str(e.args[0]):
        whose = "the call's own" if own else "process group"
        e.args = (f"{e.args[0]} ({whose} timeout of {secs:g}s)",) + e.args[1:]


_UNSET = c10d.BarrierOptions().timeout
"""torch's kUnsetTimeout (-1 ms): options whose timeout is the group's."""


def _own_timeout(opts: Any) -> float | None:
    """A call's own timeout in seconds, where its options set one
    (``dist.barrier(timeout=...)``, ``opts.timeout`` of a ProcessGroup call:
    gloo waits that long, not the group's timeout); None where unset."""
    t = opts.timeout
    return None if t == _UNSET or t <= timedelta(0) else t.total_seconds()


def _factor(factor: Any) -> float:
    return factor.item() if isinstance(factor, torch.Tensor) else float(factor)


def _write(out: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a collective's result (a tensor of the caller's dtype) into ``out``."""
    out.detach().copy_(value.reshape(out.shape))


def _np(t: torch.Tensor) -> np.ndarray | None:
    """A dense CPU tensor's memory as numpy (mesh.tensors.cpu_numpy), else None."""
    return _tensors.cpu_numpy(t) if t.layout == torch.strided else None


def _views(x: torch.Tensor | None, out: Any, shape: tuple[int, ...],
           mine: int | None = None) -> tuple[np.ndarray | None, Any] | None:
    """The input ``x`` (None: none) and the output ``out`` (a tensor, or a
    list of tensors, one per row) of a CPU collective as numpy views of
    their memory, ``out``'s shaped as the host collective's result
    ``shape`` (host.paths._into), where it can write its result straight
    into ``out`` (dense, contiguous, ``x``'s dtype, apart from ``x`` or, given
    ``mine``, ``x`` its row ``mine`` exactly): no temporary of the output's
    size (all_gather_into_tensor's is the group's size times the input)
    and no copy; None: the general way."""
    outs = out if isinstance(out, list) else [out]
    xa = None if x is None else _np(x)
    oa = [a for o in outs if (a := _np(o)) is not None]
    if x is not None and xa is None or len(oa) < len(outs):
        return None
    dest = _into(oa if isinstance(out, list) else oa[0], xa, shape, oa[0].dtype, mine)
    return None if dest is None else (xa, dest)


def _host(t: torch.Tensor, what: str) -> np.ndarray:
    """``t`` as a numpy array (a view of a CPU tensor's memory, bfloat16 as
    its bits), for the algorithms of this module, which run on the host."""
    return _tensors.operand(t if t.is_cpu else t.cpu(), what)[0]


# torch's stubs overload these methods; the C++ trampoline calls ours by name
_ProcessGroup: Any = dist.ProcessGroup
_Work: Any = dist.Work


class _Done(_Work):
    """The Work of a call that ran synchronously and succeeded (its errors
    raised from the call): nothing to wait for; a future only when asked.
    Made as ``_Done()`` then ``._result = value``: with no ``__init__`` of its
    own, torch's (C++) is the only one that runs (dist.all_reduce's 8 B path)."""

    _result: Any = None

    def wait(self, timeout: timedelta | None = None) -> bool:
        return True

    def get_future(self) -> Future:
        fut: Future = Future()
        fut.set_result(self._result)
        return fut

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True

    def exception(self) -> BaseException | None:
        return None

    def result(self) -> Any:
        return self._result


def _done(result: Any) -> _Done:
    w = _Done()
    w._result = result
    return w


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _unwrap(fut: Future) -> Any:
    value = fut.value()
    if isinstance(value, _Failed):
        raise value.error
    return value


class _FutureWork(_Work):
    """A torch Work that meshrun completes with ``finish``. Its future is a
    ``then`` of a plain one, so that an error is a real error to torch's
    C++ (DDP's reducer): ``Future.set_exception`` only stores the exception
    as the value, and torch's own future-wrapping Work returns from
    ``wait()`` even then. ``wait()`` raises the collective's own error."""

    def __init__(self) -> None:
        super().__init__()
        self._base: Future = Future()
        self._fut = self._base.then(_unwrap)
        self._error: BaseException | None = None
        self._finished = threading.Event()
        self.what = "Work.wait"     # the call, for a timeout ("rank 0: all_reduce #3 on ...")

    def finish(self, result: Any, error: BaseException | None) -> None:
        self._error = error
        self._base.set_result(result if error is None else _Failed(error))
        self._finished.set()

    def wait(self, timeout: timedelta | None = None) -> bool:
        """Until the operation is done (it carries the process group's
        timeout), or ``timeout``: then MeshTimeoutError, the operation
        going on (a later wait may still see it through), as gloo's."""
        secs = timeout.total_seconds() if timeout else 0.0
        if not self._finished.is_set():
            blocking()      # (in a done-callback of the lane: the lane goes on first)
        if secs > 0 and not self._finished.wait(secs):
            raise MeshTimeoutError(f"{self.what}: Work.wait: the operation did not complete "
                                   f"within {secs:g}s (the timeout given; it goes on)")
        try:
            # the future handed out (the base's ``then``), not the base alone: the base's
            # wait returns before its callbacks run, and ``work.wait();
            # work.get_future().value()`` raised torch's INTERNAL ASSERT (it is done
            # before callbacks of its own run, which may wait for this Work)
            self._fut.wait()
        except Exception:  # noqa: BLE001 - the collective's own error raises below
            pass
        if self._error is not None:
            raise self._error
        return True

    def get_future(self) -> Future:
        return self._fut

    def is_completed(self) -> bool:
        return looked_again(self._fut.done)     # (its lane may need the interpreter)

    def is_success(self) -> bool:
        return bool(self._fut.done()) and self._error is None

    def exception(self) -> BaseException | None:
        return self._error

    def result(self) -> Any:
        self.wait()
        return self._base.value()


def _dtypes(out: torch.Tensor, x: torch.Tensor) -> str:
    """The refusal of an output whose dtype is not its input's (gloo's and
    NCCL's too): written through a cast, 1.5 came back as 1 in int64."""
    return (f"its output is {out.dtype} but its input {x.dtype}: the collective writes "
            f"the inputs as they are, in one dtype")


_AllreduceOptions = c10d.AllreduceOptions


def _short(make: Callable[[], Any], timeout: Any, **fields: Any) -> Any:
    """The options of a call in one of ProcessGroup's short forms
    (``pg.allreduce(t)``, ``pg.allreduce([t], op)``, ``pg.broadcast(t, root)``,
    ``pg.reduce(t, root, op)``, ``pg.allgather(outs, t)``, ``pg.gather(outs, t,
    root)``, ``pg.scatter(out, ins, root)``, ``pg.reduce_scatter(out, ins, op)``,
    ``pg.alltoall(outs, ins, timeout)``): torch's C++ ProcessGroup takes them as
    overloads, but they reach a Python subclass's method as they are (DDP's
    join hook calls ``process_group.allreduce(tensor)``). Taken as the options
    themselves, a bare tensor was iterated as a list of its rows: a
    ``pg.allgather(outs, t)`` of n-element tensors at n ranks came back
    transposed, others raised."""
    opts = make()
    for k, v in fields.items():
        setattr(opts, k, v)
    if timeout is not None:
        opts.timeout = timeout
    return opts


def _timeout_only(opts: Any, make: Callable[[], Any]) -> Any:
    """``opts``, or the options of a short form that passes only a timeout."""
    return _short(make, opts) if isinstance(opts, timedelta) else opts


def _joinable(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a coalesced call's tensors (two or more) can be joined into
    one: dense, of one dtype and device. Such a call is then one collective,
    as gloo's (which joins them too): one collective a tensor let a rank
    with one tensor more than the others match its last with their next
    call of that signature, which took it in and returned; now the sizes
    differ in the one call, and every rank raises MismatchError."""
    return len(tensors) > 1 and tensors[0].layout is torch.strided and len(
        {(t.dtype, t.device, t.layout) for t in tensors}) == 1


def _nested(outputs: list[list[torch.Tensor]]) -> Any:
    """What torch's future of a call with lists of outputs (all_gather,
    gather) holds, as gloo's does: the one list of a call with one input,
    else the list of lists."""
    return outputs[0] if len(outputs) == 1 else outputs


class ProcessGroupMeshrun(_ProcessGroup):
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
            work.finish(result, None)

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
                    # (float16 averaged: collectives.api's, in float32)
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
        if xa is None or oa is None:
            return False
        try:
            if call(xa, oa) is None:
                return False
        except MeshTimeoutError as e:
            _torch_words(e, secs, limit is not None)
            raise
        _tensors.written(out)   # (written through numpy: autograd is told)
        return True

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

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None,
                  timeout: Any = None) -> dist.Work:
        if isinstance(tensors, torch.Tensor):       # pg.broadcast(tensor, root): _short
            tensors, opts = [tensors], _short(c10d.BroadcastOptions, timeout, rootRank=opts)
        opts = opts or c10d.BroadcastOptions()
        limit, secs = self._limits(opts)
        root = opts.rootRank
        return self._run([lambda a, t=t: C.broadcast(self.comm, t, root=root, async_op=a,
                                                      timeout=secs)
                          for t in tensors], None, tensors, opts.asyncOp, limit)

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None, op: Any = _SUM,
               timeout: Any = None) -> dist.Work:
        if isinstance(tensors, torch.Tensor):       # pg.reduce(tensor, root, op): _short
            tensors, opts = [tensors], _short(c10d.ReduceOptions, timeout, rootRank=opts,
                                              reduceOp=op)
        opts = opts or c10d.ReduceOptions()
        limit, secs = self._limits(opts)
        name, factor = _op(opts.reduceOp)
        root = opts.rootRank
        if problem := self._premul_problem(factor, tensors):
            return self._refuse("reduce", problem, opts.asyncOp, len(tensors))
        ins = tensors
        if factor is not None:
            # the root's tensor takes the result, so it may be scaled in place; the others'
            # are inputs only, left as they were (as by every other op, and by NCCL's
            # PREMUL_SUM): a copy of theirs is scaled
            f = _factor(factor)
            if self.comm.rank == root:
                for t in tensors:
                    t.detach().mul_(f)
            else:
                ins = [t.detach() * f for t in tensors]
        return self._run([lambda a, t=t: C.reduce(self.comm, t, root=root, op=name, async_op=a,
                                                   timeout=secs)
                          for t in ins], None, tensors, opts.asyncOp, limit)

    def allgather(self, output_tensors: list[list[torch.Tensor]],
                  input_tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        if isinstance(input_tensors, torch.Tensor):     # pg.allgather(outputs, input): _short
            output_tensors, input_tensors = [output_tensors], [input_tensors]
        opts = _timeout_only(opts, c10d.AllgatherOptions) or c10d.AllgatherOptions()
        limit, secs = self._limits(opts)
        for outs in output_tensors:
            if len(outs) != self._n:
                return self._refuse("all_gather", f"its output list holds {len(outs)} "
                                    f"tensors, one for each of {self._n} ranks needed",
                                    opts.asyncOp, len(input_tensors))
        if any(len({o.shape for o in outs}) > 1 or outs[0].numel() != x.numel()
               for outs, x in zip(output_tensors, input_tensors)):
            return self._allgather_v(output_tensors, input_tensors, opts)

        views = [_views(x, outs, (self._n,) + tuple(x.shape), self.comm.rank)
                 for outs, x in zip(output_tensors, input_tensors)]

        def finish(values: list[Any]) -> None:
            for outs, value, v in zip(output_tensors, values, views):
                for j, o in enumerate(outs):
                    if v is None:
                        _write(o, value[j])
                    else:       # (written through numpy: autograd is told)
                        _tensors.written(o)
        return self._run([lambda a, x=x, v=v: C.all_gather(self.comm, x, async_op=a,
                                                            timeout=secs)
                          if v is None else _host_all_gather(self.comm, v[0], async_op=a,
                                                             timeout=secs, out=v[1])
                          for x, v in zip(input_tensors, views)], finish,
                         _nested(output_tensors), opts.asyncOp, limit)

    def _allgather_v(self, output_tensors: list[list[torch.Tensor]],
                     input_tensors: list[torch.Tensor], opts: Any) -> dist.Work:
        """all_gather where the ranks' tensors differ in size (output j takes
        rank j's, whatever its size; gloo refuses these): all_gather_v of
        the inputs flattened, the outputs' sizes its counts (the ring, or
        the same-host board, straight into the outputs: it sent every
        rank's input to each by an uneven all_to_all of n copies of it,
        2.4-3.2x the time at 16 MiB, and at 2 ranks 162 MiB more at its
        peak for 32 MiB a rank). Outputs whose sizes differ between ranks raise
        MismatchError on every rank, naming both ranks' sizes; an input
        that is not its own output's size too, naming both sizes."""
        limit, secs = self._limits(opts)
        launches, finishes = [], []
        for outs, x in zip(output_tensors, input_tensors):
            arr = _host(x.detach().reshape(-1), self._what("all_gather"))
            sizes = [o.numel() for o in outs]
            views = [_np(o) for o in outs]     # (written straight where they can be)
            straight = None if any(v is None for v in views) else views
            launches.append(lambda a, arr=arr, sizes=sizes, straight=straight: _host_all_gather_v(
                self.comm, arr, sizes, a, secs, name="all_gather", out=straight,
                check=self._fits(sizes[self.comm.rank], arr.size, "all_gather",
                                 "its output tensor for this rank vs its input")))
            finishes.append((outs, sizes))

        def finish(values: list[Any]) -> None:
            for (outs, sizes), value in zip(finishes, values):
                if isinstance(value, list):     # (written through numpy: autograd is told)
                    for o in outs:
                        _tensors.written(o)
                    continue
                got = _tensors.to_torch(value, outs[0]).split(sizes)
                for o, piece in zip(outs, got):
                    _write(o, piece)
        return self._run(launches, finish, _nested(output_tensors), opts.asyncOp, limit)

    def _fits(self, want: int, got: int, name: str, sizes: str) -> Callable[[], None]:
        """An uneven all_gather's or reduce_scatter's check (run in the call,
        failing it on every rank): this rank's own part is ``want`` elements
        where its input holds ``got``."""
        def check() -> None:
            if want != got:
                me = self.comm.rank
                raise mesh.MismatchError(
                    f"rank {self.comm.ranks[me]}: {name} on group {self.comm.name}: "
                    f"{named(self.comm, me)} expects {want} rows from rank {me} (itself), "
                    f"which sends {got} ({sizes})")
        return check

    def allgather_coalesced(self, output_lists: list[list[torch.Tensor]],
                            input_list: list[torch.Tensor], opts: Any = None) -> dist.Work:
        """output_lists[rank][j] receives that rank's input_list[j] (allgather's
        outputs transposed)."""
        return self.allgather([list(outs) for outs in zip(*output_lists)], input_list, opts)

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor,
                        opts: Any = None) -> dist.Work:
        """all_gather_into_tensor; its future holds what gloo's holds: the
        output's rows, one view per rank (``output.chunk``), where they have
        the input's shape (gloo takes no other output), else [output]."""
        rows = list(output.chunk(self._n)) if output.dim() and output.shape[0] else []
        rows = rows if len(rows) == self._n and all(
            p.shape == input.shape for p in rows) else [output]
        return self.allgather_into_tensor_coalesced([output], [input], opts, rows)

    def allgather_into_tensor_coalesced(self, outputs: list[torch.Tensor],
                                        inputs: list[torch.Tensor],
                                        opts: Any = None, result: Any = None) -> dist.Work:
        opts = opts or c10d.AllgatherOptions()
        limit, secs = self._limits(opts)
        joined = _joinable(inputs)      # (one collective, else one a tensor: its refusal too)
        if failed := self._unjoined("all_gather_into_tensor", inputs, opts.asyncOp):
            return failed
        for o, x in zip(outputs, inputs):
            if o.dtype != x.dtype:
                return self._refuse("all_gather_into_tensor", _dtypes(o, x), opts.asyncOp,
                                    1 if joined else len(inputs))
            if o.numel() != x.numel() * self._n:
                return self._refuse("all_gather_into_tensor", f"its output holds {o.numel()} "
                                    f"elements, where {self._n} ranks' inputs of {x.numel()} "
                                    f"make {x.numel() * self._n}", opts.asyncOp,
                                    1 if joined else len(inputs))
        if joined:      # one all_gather of the inputs joined; each output takes its columns
            sizes = [x.numel() for x in inputs]
            flat = torch.cat([x.detach().reshape(-1) for x in inputs])

            def apart(values: list[Any]) -> None:
                rows = values[0].reshape(self._n, -1)
                for o, part in zip(outputs, rows.split(sizes, dim=1)):
                    _write(o, part)
            return self._run([lambda a: C.all_gather(self.comm, flat, async_op=a,
                                                     timeout=secs)],
                             apart, outputs if result is None else result, opts.asyncOp, limit)

        if not opts.asyncOp and len(inputs) == 1 and self._tiny(
                lambda x, out: _tiny_all_gather(self.comm, x, secs, out),
                inputs[0], outputs[0], secs, limit):
            return _done(outputs if result is None else result)
        views = [_views(x, o, (self._n,) + tuple(x.shape), self.comm.rank)
                 for o, x in zip(outputs, inputs)]

        def finish(values: list[Any]) -> None:
            for o, value, v in zip(outputs, values, views):
                if v is None:
                    _write(o, value)
                else:           # (written through numpy: autograd is told, as copy_ tells it)
                    _tensors.written(o)
        return self._run([lambda a, x=x, v=v: C.all_gather(self.comm, x, async_op=a,
                                                            timeout=secs)
                          if v is None else _host_all_gather(self.comm, v[0], async_op=a,
                                                             timeout=secs, out=v[1])
                          for x, v in zip(inputs, views)], finish,
                         outputs if result is None else result, opts.asyncOp, limit)

    def reduce_scatter(self, output_tensors: list[torch.Tensor],
                       input_tensors: list[list[torch.Tensor]], opts: Any = None,
                       timeout: Any = None) -> dist.Work:
        if isinstance(output_tensors, torch.Tensor):    # pg.reduce_scatter(out, ins, op): _short
            output_tensors, input_tensors = [output_tensors], [input_tensors]
            opts = _short(c10d.ReduceScatterOptions, timeout,
                          reduceOp=_SUM if opts is None else opts)
        opts = opts or c10d.ReduceScatterOptions()
        for ins in input_tensors:
            if len(ins) != self._n:
                return self._refuse("reduce_scatter", f"its input list holds {len(ins)} "
                                    f"tensors, one for each of {self._n} ranks needed",
                                    opts.asyncOp, len(input_tensors))
        if any(len({x.shape for x in ins}) > 1 or o.numel() != ins[0].numel()
               for o, ins in zip(output_tensors, input_tensors)):
            return self._reduce_scatter_v(output_tensors, input_tensors, opts)
        return self._reduce_scatter(output_tensors, [torch.stack([x.detach() for x in ins])
                                                     for ins in input_tensors], opts, True)

    def _reduce_scatter_v(self, output_tensors: list[torch.Tensor],
                          input_tensors: list[list[torch.Tensor]], opts: Any) -> dist.Work:
        """reduce_scatter where rank j's part differs in size from the others'
        (as gloo allows): reduce_scatter_v of the parts, their sizes its
        counts (on the same-host board each rank's part is reduced out of
        the peers' parts where they lie; over sockets they are joined for
        the ring; it was an uneven all_to_all and each rank combining the
        parts it received), with
        the collectives' own ops (bfloat16, and float16 averaged, widened
        to float32 and rounded once, as collectives.tensors and
        collectives.api do). Part sizes that differ between ranks raise
        MismatchError on every rank naming both ranks' sizes; an output
        that is not this rank's part's size, or an op its dtype cannot
        take, raises on every rank."""
        limit, secs = self._limits(opts)
        name, factor = _op(opts.reduceOp)
        what = self._what("reduce_scatter")
        launches, finishes = [], []
        for out, ins in zip(output_tensors, input_tensors):
            # the parts as they are (views of CPU tensors of one dtype): the board reduces
            # each rank's part out of the peers' without a joined copy of the input
            apart = len({x.dtype for x in ins}) == 1
            pieces = [x.detach().reshape(-1) for x in ins] if apart else \
                [torch.cat([x.detach().reshape(-1) for x in ins])]
            if factor is not None:
                pieces = [x * _factor(factor) for x in pieces]
            arrs = [_tensors.operand(x if x.is_cpu else x.cpu(), what, True)[0] for x in pieces]
            if name == "avg" and pieces[0].dtype == torch.float16:
                # averaged in float32 and rounded once, as collectives.api averages
                # float16 (its partial sums overflowed: three ranks' 30000 gave inf where
                # even parts gave 30000); the fingerprint still says float16
                arrs = [x.astype(C._HALF_WIDE) for x in arrs]
            sizes = [x.numel() for x in ins]
            v = _views(None, out, (out.numel(),))   # (written straight where it can be)
            straight = None if v is None else v[1]
            launches.append(lambda a, arrs=arrs, sizes=sizes, k=out.numel(), apart=apart,
                            straight=straight: _host_reduce_scatter_v(
                self.comm, None if apart else arrs[0], sizes, name, a, secs,
                name="reduce_scatter", parts=arrs if apart else None, out=straight,
                check=self._fits(k, sizes[self.comm.rank], "reduce_scatter",
                                 "its output vs that rank's input for it")))
            finishes.append((out, straight))

        def finish(values: list[Any]) -> None:
            for (out, straight), value in zip(finishes, values):
                if straight is not None and value.size and \
                        value.ctypes.data == straight.ctypes.data:
                    _tensors.written(out)   # (written through numpy: autograd is told)
                else:
                    _write(out, _tensors.to_torch(value, out))
        return self._run(launches, finish, output_tensors, opts.asyncOp, limit)

    def _reduce_scatter_base(self, output: torch.Tensor, input: torch.Tensor,
                             opts: Any = None) -> dist.Work:
        return self.reduce_scatter_tensor_coalesced([output], [input], opts)

    def reduce_scatter_tensor_coalesced(self, outputs: list[torch.Tensor],
                                        inputs: list[torch.Tensor],
                                        opts: Any = None) -> dist.Work:
        opts = opts or c10d.ReduceScatterOptions()
        if failed := self._unjoined("reduce_scatter_tensor", inputs, opts.asyncOp):
            return failed
        for o, x in zip(outputs, inputs):
            if o.dtype != x.dtype:
                return self._refuse("reduce_scatter_tensor", _dtypes(o, x), opts.asyncOp,
                                    1 if _joinable(inputs) else len(inputs))
            if x.numel() != o.numel() * self._n:
                return self._refuse("reduce_scatter_tensor", f"its input holds {x.numel()} "
                                    f"elements, where {self._n} ranks' outputs of {o.numel()} "
                                    f"take {o.numel() * self._n}", opts.asyncOp,
                                    1 if _joinable(inputs) else len(inputs))
        if _joinable(inputs):   # one reduce_scatter of the inputs joined (rank j's columns)
            joined = torch.cat([x.detach().reshape(self._n, -1) for x in inputs], dim=1)
            return self._reduce_scatter([joined.new_empty(joined.shape[1])], [joined], opts,
                                        True, outputs)
        return self._reduce_scatter(outputs, [x.detach().reshape(self._n, -1) for x in inputs],
                                    opts, False)

    def _reduce_scatter(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                        opts: Any, own: bool,
                        parts: list[torch.Tensor] | None = None) -> dist.Work:
        """``inputs`` shaped (group size, ...); ``own``: they are copies made
        here, which a PREMUL_SUM factor may scale in place. ``parts``: the
        caller's outputs, which the one output (a temporary) is split into."""
        limit, secs = self._limits(opts)
        name, factor = _op(opts.reduceOp)
        if problem := self._premul_problem(factor, inputs):
            return self._refuse("reduce_scatter", problem, opts.asyncOp, len(inputs))
        if factor is not None:
            f = _factor(factor)
            inputs = [x.mul_(f) if own else x * f for x in inputs]

        if not opts.asyncOp and len(inputs) == 1 and parts is None and not (
                name == "avg" and inputs[0].dtype == torch.float16) and self._tiny(
                lambda x, out: _tiny_reduce_scatter(self.comm, x, name, secs, out),
                inputs[0], outputs[0], secs, limit):
            return _done(outputs)
        views = [None if name == "avg" and x.dtype == torch.float16    # (in float32: api's)
                 else _views(x, o, (x.shape[0] // self._n,) + tuple(x.shape[1:]))
                 for o, x in zip(outputs, inputs)]

        def finish(values: list[Any]) -> None:
            for o, value, v in zip(outputs, values, views):
                if v is None:
                    _write(o, value)
                else:
                    _tensors.written(o)
            if parts is not None:
                for o, part in zip(parts, outputs[0].split([p.numel() for p in parts])):
                    _write(o, part)
        return self._run([lambda a, x=x, v=v: C.reduce_scatter(
            self.comm, x, op=name, async_op=a, timeout=secs) if v is None
                          else _host_reduce_scatter(self.comm, v[0], op=name, async_op=a,
                                                    timeout=secs, out=v[1])
                          for x, v in zip(inputs, views)], finish,
                         outputs if parts is None else parts, opts.asyncOp, limit)

    def alltoall_base(self, output: torch.Tensor, input: torch.Tensor,
                      output_split_sizes: list[int], input_split_sizes: list[int],
                      opts: Any = None) -> dist.Work:
        opts = _timeout_only(opts, c10d.AllToAllOptions) or c10d.AllToAllOptions()
        limit, secs = self._limits(opts)
        n = self._n
        if problem := self._a2a_output_problem(output, input, output_split_sizes,
                                               input_split_sizes):
            return self._refuse("all_to_all_single", problem, opts.asyncOp)
        if not output_split_sizes and not input_split_sizes:
            if output.shape == input.shape and (
                    v := _views(input, output, tuple(input.shape))) is not None:
                return self._run([lambda a: _host_all_to_all(self.comm, v[0], async_op=a,
                                                              timeout=secs, out=v[1])],
                                 lambda _: _tensors.written(output), [output], opts.asyncOp,
                                 limit)
            return self._run([lambda a: C.all_to_all(self.comm, input, async_op=a,
                                                     timeout=secs)],
                             lambda v: _write(output, v[0]), [output], opts.asyncOp, limit)
        ins = list(input_split_sizes) or [input.shape[0] // n] * n
        outs = list(output_split_sizes) or [output.shape[0] // n] * n
        arr = _host(input, self._what("all_to_all_single"))
        return self._run([lambda a: _all_to_all_v(self.comm, arr, ins, outs, a, secs,
                                                  "output_split_sizes vs input_split_sizes",
                                                  name="all_to_all_single")],
                         lambda v: _write(output, _tensors.to_torch(v[0], output)), [output],
                         opts.asyncOp, limit)

    def _a2a_output_problem(self, output: torch.Tensor, input: torch.Tensor,
                            output_split_sizes: list[int], input_split_sizes: list[int]) -> str:
        """Why all_to_all_single's ``output`` cannot hold what this rank
        receives ('' when it can): checked before anything moves, as
        gloo's checkSplitSizes does, else the other ranks' calls succeed and
        this one fails after the transfer in torch's reshape, naming no rank.
        (The input and the splits' count and values: _all_to_all_v's own.)"""
        if input.dim() == 0:
            return ""       # (the collective's own error says it needs rows)
        if not output_split_sizes and not input_split_sizes:
            if output.numel() == input.numel():
                return ""
            return (f"its output holds {output.numel()} elements, where an even "
                    f"all_to_all_single returns as many as its input holds, {input.numel()}")
        if output_split_sizes:
            outs, how = list(output_split_sizes), f"output_split_sizes {list(output_split_sizes)}"
        else:
            outs = [output.shape[0] // self._n if output.dim() else 0] * self._n
            how = f"its output's dim 0 split evenly, {outs}"
        row = int(np.prod(input.shape[1:]))      # (elements of a row: 1 for a 1-d input)
        if len(outs) != self._n or any(not isinstance(k, int) or k < 0 for k in outs) \
                or sum(outs) * row == output.numel():
            return ""       # (bad splits: _all_to_all_v names them)
        return (f"its output holds {output.numel()} elements, where the {sum(outs)} rows of "
                f"{row} it receives ({how}) take {sum(outs) * row}")

    def alltoall(self, output_tensors: list[torch.Tensor], input_tensors: list[torch.Tensor],
                 opts: Any = None) -> dist.Work:
        opts = _timeout_only(opts, c10d.AllToAllOptions) or c10d.AllToAllOptions()
        limit, secs = self._limits(opts)
        if len(output_tensors) != self._n or len(input_tensors) != self._n:
            return self._refuse("all_to_all", f"its lists hold {len(output_tensors)} output "
                                f"and {len(input_tensors)} input tensors, one for each of "
                                f"{self._n} ranks needed", opts.asyncOp)
        flat = torch.cat([x.detach().reshape(-1) for x in input_tensors])
        ins = [x.numel() for x in input_tensors]
        outs = [o.numel() for o in output_tensors]
        arr = _host(flat, self._what("all_to_all"))
        dest = _apart([None if (o := _np(t)) is None else _into(o, arr, (t.numel(),))
                       for t in output_tensors], self._n)

        def finish(values: list[Any]) -> None:
            if dest is not None:
                for o in output_tensors:
                    _tensors.written(o)
                return
            pieces = _tensors.to_torch(values[0], output_tensors[0]).split(outs)
            for o, piece in zip(output_tensors, pieces):
                _write(o, piece)
        return self._run([lambda a: _all_to_all_v(
            self.comm, arr, ins, outs, a, secs,
            "its output tensors vs the ranks' input tensors for it", name="all_to_all",
            out=dest)], finish, output_tensors, opts.asyncOp, limit)

    all_gather_single = _allgather_base
    all_gather_single_coalesced = allgather_into_tensor_coalesced
    reduce_scatter_single = _reduce_scatter_base
    reduce_scatter_single_coalesced = reduce_scatter_tensor_coalesced
    all_to_all_single = alltoall_base

    def gather(self, output_tensors: list[list[torch.Tensor]],
               input_tensors: list[torch.Tensor], opts: Any = None,
               timeout: Any = None) -> dist.Work:
        if isinstance(input_tensors, torch.Tensor):     # pg.gather(outputs, input, root): _short
            output_tensors, input_tensors = [output_tensors], [input_tensors]
            opts = _short(c10d.GatherOptions, timeout, rootRank=opts)
        opts = opts or c10d.GatherOptions()
        limit, secs = self._limits(opts)
        root = opts.rootRank
        x = input_tensors[0]
        if self.comm.rank == root and (len(output_tensors[0]) != self._n or any(
                o.numel() != x.numel() for o in output_tensors[0])):
            return self._refuse("gather", f"the root's {len(output_tensors[0])} output tensors "
                                f"of {[o.numel() for o in output_tensors[0]]} elements cannot "
                                f"take {self._n} ranks' inputs of {x.numel()}", opts.asyncOp)

        v = _views(x, output_tensors[0], (self._n,) + tuple(x.shape), root) \
            if self.comm.rank == root else None

        def finish(values: list[Any]) -> None:
            if v is not None:
                for o in output_tensors[0]:
                    _tensors.written(o)
            elif values[0] is not None:
                for j, o in enumerate(output_tensors[0]):
                    _write(o, values[0][j])
        return self._run([lambda a: C.gather(self.comm, x, root=root, async_op=a,
                                             timeout=secs) if v is None
                          else _host_gather(self.comm, v[0], root, a, secs, out=v[1])],
                         finish, _nested(output_tensors), opts.asyncOp, limit)

    def scatter(self, output_tensors: list[torch.Tensor],
                input_tensors: list[list[torch.Tensor]], opts: Any = None,
                timeout: Any = None) -> dist.Work:
        """The root scatters its stacked inputs; elsewhere the output tensor
        passed says the dtype and device the row comes back as."""
        if isinstance(output_tensors, torch.Tensor):    # pg.scatter(out, inputs, root): _short
            output_tensors, input_tensors = [output_tensors], [input_tensors]
            opts = _short(c10d.ScatterOptions, timeout, rootRank=opts)
        opts = opts or c10d.ScatterOptions()
        limit, secs = self._limits(opts)
        root = opts.rootRank
        out = output_tensors[0]
        if self.comm.rank == root and (len(input_tensors[0]) != self._n or any(
                x.shape != input_tensors[0][0].shape for x in input_tensors[0])
                or input_tensors[0][0].numel() != out.numel()):
            return self._refuse("scatter", f"the root's {len(input_tensors[0])} inputs of "
                                f"{[x.numel() for x in input_tensors[0]]} elements are not "
                                f"{self._n} of its output's {out.numel()}", opts.asyncOp)
        mine = self.comm.rank == root
        src = torch.stack([x.detach() for x in input_tensors[0]]) if mine else out
        v = _views(src if mine else None, out, tuple(src.shape[1:] if mine else out.shape))
        if v is not None:
            return self._run([lambda a: _host_scatter(
                self.comm, v[0], root, a, secs, v[1].dtype, tuple(out.shape), v[1])],
                             lambda _: _tensors.written(out), output_tensors, opts.asyncOp,
                             limit)
        return self._run([lambda a: C.scatter(self.comm, src, root=root, async_op=a,
                                              timeout=secs, shape=tuple(out.shape))],
                         lambda v: _write(out, v[0]), output_tensors, opts.asyncOp, limit)

    def barrier(self, opts: Any = None) -> dist.Work:
        """``dist.barrier(timeout=...)`` waits that long, as gloo's: it waited
        the group's timeout (30 minutes by default) for a rank that never came."""
        opts = opts or c10d.BarrierOptions()
        limit, secs = self._limits(opts)
        return self._run([lambda a: C.barrier(self.comm, async_op=a, timeout=secs)],
                         None, [], opts.asyncOp, limit)

    def monitored_barrier(self, timeout: timedelta | None = None,
                          wait_all_ranks: bool = False) -> None:
        """gloo's monitored barrier, in gloo's words
        (collectives.host.paths.monitored_barrier): rank 0 names the ranks
        that did not come within ``timeout``."""
        _monitored_barrier(self.comm, self.timeout if timeout is None
                           else timeout.total_seconds(), wait_all_ranks)

    def _what(self, op: str) -> str:
        """``op`` on this rank, named as torch's caller knows it too: a
        sub-group's rank 0 on world rank 2 said "rank 0" alone."""
        return f"{named(self.comm, self.comm.rank)}: {op} on group {self.comm.name}"

    # -- point-to-point -----------------------------------------------------------

    def send(self, tensors: list[torch.Tensor], dstRank: int, tag: int) -> dist.Work:
        return _P2PWork(self.comm.isend(tensors[0], dstRank, tag), None, tensors, self.timeout,
                        sent=f"{named(self.comm, self.comm.rank)}: send to rank {dstRank} "
                             f"(tag {tag}, group {self.comm.name})")

    def recv(self, tensors: list[torch.Tensor], srcRank: int, tag: int) -> dist.Work:
        return self._recv(tensors[0], srcRank, tag)

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int) -> dist.Work:
        return self._recv(tensors[0], mesh.ANY, tag)

    def _recv(self, t: torch.Tensor, src: int, tag: int) -> dist.Work:
        """Straight into ``t`` where a message can go (dense, contiguous);
        else into a contiguous tensor of ``t``'s dtype and shape, copied
        into ``t``: the message is checked against it as against ``t``
        (OutMismatchError naming the rank, the peer and the tag; the message
        stays queued). A fresh tensor of the message's own was cast into a
        strided ``t`` (float32 1.5 received as 1 into an int32 column) or
        failed in torch's reshape, naming no one, the message lost."""
        if not _tensors.out_unusable(t):
            return _P2PWork(self.comm.irecv(src, tag, out=t), None, [t], self.timeout)
        if t.layout is not torch.strided:
            return _P2PWork(self.comm.irecv(src, tag), lambda v: _write(t, v), [t],
                            self.timeout)
        buf = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        return _P2PWork(self.comm.irecv(src, tag, out=buf), lambda _: _write(t, buf), [t],
                        self.timeout)


class _P2PWork(_Work):
    """A torch Work over a mesh request; ``finish(value)`` copies a received
    value where the tensor could not take it directly. ``wait()`` without a
    timeout waits the process group's (``limit``), as gloo's does."""

    def __init__(self, req: Any, finish: Callable[[Any], None] | None,
                 tensors: list[torch.Tensor], limit: float, sent: str = "") -> None:
        super().__init__()
        self._req, self._finish, self._tensors, self._limit = req, finish, tensors, limit
        self._sent = sent       # a send's description ('': a receive)
        self._lock = threading.Lock()
        self._done: _FutureWork | None = None

    def wait(self, timeout: timedelta | None = None) -> bool:
        secs = timeout.total_seconds() if timeout else 0.0
        try:
            value = self._req.wait(secs if secs > 0 else self._limit)
        except MeshTimeoutError as e:
            if secs <= 0:
                _torch_words(e, self._limit)
            raise
        with self._lock:
            fn, self._finish = self._finish, None
        if fn is not None:
            fn(value)
        return True

    def is_completed(self) -> bool:
        """Whether the transfer is done (what has come is read: a polling
        loop); a receive's tensor holds the message once it says so: one
        received through a buffer of its own (a strided tensor) is copied
        in here, where only ``wait()`` copied it (gloo refuses one)."""
        if not self._req.get_status():
            return False
        if self._finish is not None:
            self.exception()        # (the copy, or the error that wait() raises)
        return True

    def is_success(self) -> bool:
        return bool(self._req.get_status()) and self.exception() is None

    def exception(self) -> BaseException | None:
        """The transfer's error once it is done (a receive that timed out, a
        peer lost), as the collectives' Work gives it; None while it goes on
        or when it succeeded (torch's own said None even after a failure)."""
        if not self._req.done():
            return None
        try:
            self.wait()
        except Exception as e:  # noqa: BLE001 - the error is the answer
            return e
        return None

    def source_rank(self) -> int:
        """The sender's rank in the receive's group. A send's Work has none:
        it said "the receive has not matched a message yet", of a send."""
        if self._sent:
            raise RuntimeError(f"source_rank: {self._sent}: only the Work of a recv or a "
                               f"recv from any source has a source rank (this is a send's)")
        status = self._req.status      # the sender's rank in the receive's group
        if status is None:
            raise RuntimeError("source_rank: the receive has not matched a message yet")
        return int(status.source)

    def _source_rank(self) -> int:
        return self.source_rank()

    def result(self) -> list[torch.Tensor]:
        return self._tensors

    def get_future(self) -> Future:
        """A future completed once the transfer is done (a thread waits for it;
        none where it is done already: the future is then complete on return,
        as a finished collective's is, for ``work.wait(); get_future().value()``)."""
        with self._lock:
            done, made = self._done, self._done is None
            if done is None:
                done = self._done = _FutureWork()
        if made and self._req.done():
            self._complete(done)
        elif made:
            threading.Thread(target=self._complete, args=(done,),
                             name="meshrun-p2p-future", daemon=True).start()
        return done.get_future()

    def _complete(self, done: _FutureWork) -> None:
        try:
            self.wait()
        except BaseException as e:
            done.finish(None, e)
            return
        done.finish(self._tensors, None)


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


