"""What the "meshrun" ProcessGroup (collectives.torchpg) makes of torch's
arguments: reduce ops, timeouts, the short forms of its options, and CPU
tensors as numpy views of their memory for the host collectives; and
_Members, what its mixins (torchgather, torchexchange, torchp2p) read of it.
"""
from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as c10d
from torch._C._distributed_c10d import ReduceOp

from mesh import MeshTimeoutError
from mesh import tensors as _tensors

from .host.paths import _into


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


class _Members:
    """What ProcessGroupMeshrun's mixins read of it (set or defined in
    collectives.torchpg): declared for the type checker, nothing at run time."""

    comm: Any
    timeout: float
    if TYPE_CHECKING:
        @property
        def _n(self) -> int: ...
    _limits: Callable[[Any], tuple[float | None, float]]
    _run: Callable[..., dist.Work]
    _refuse: Callable[..., dist.Work]
    _unjoined: Callable[[str, Sequence[torch.Tensor], bool], dist.Work | None]
    _premul_problem: Callable[[Any, Sequence[torch.Tensor]], str]
    _tiny: Callable[..., bool]
    _quick: Callable[..., Any]
    _what: Callable[[str], str]
    _fits: Callable[[int, int, str, str], Callable[[], None]]
