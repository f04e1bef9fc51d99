"""torch tensors at meshrun's API: what they are on the wire and back.

A CPU tensor is used through a numpy view of its memory (``numpy_view``,
no copy); a CUDA tensor through a CuPy view
(mesh.device). Every dtype torch and numpy share travels as itself;
bfloat16, which numpy lacks, travels as its raw 16 bits (uint16), named
"bfloat16" in fingerprints (the dtype's metadata) and flagged in message
headers, so a receiver gets a bfloat16 tensor back. Anything else (complex32,
float8, quantized, sparse tensors) raises a TypeError naming the dtype and
the operation.

torch is never imported here: a torch tensor can only exist once the
program has imported torch, so ``is_tensor`` looks torch up in sys.modules.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any

import numpy as np

from . import device

__all__ = ["is_tensor", "BFLOAT16", "BFLOAT16_WIDE", "TORCH", "BF16", "check", "operand",
           "out_unusable", "out_view", "to_torch", "flags", "received", "stream_of", "dtype_name",
           "plain_view", "cpu_numpy", "numpy_view"]

BFLOAT16 = np.dtype(np.uint16, metadata={"name": "bfloat16"})
"""bfloat16's raw bits as numpy holds them; fingerprints read the name."""
BFLOAT16_WIDE = np.dtype(np.float32, metadata={"name": "bfloat16"})
"""bfloat16 widened to float32 for a reduction (rounded back once, at the end)."""

TORCH, BF16 = 2, 4
"""Header flags beside mesh.device's 1: the array was a torch tensor; its
dtype was bfloat16 (sent as uint16)."""

_NAMES = ("bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "complex64", "complex128")


def _torch() -> Any:
    """torch, imported on first need: a receiver that never imported it may
    still be sent a tensor."""
    torch = sys.modules.get("torch")
    if torch is None:
        import torch
    return torch


def is_tensor(x: Any) -> bool:
    """True for a torch tensor (never imports torch; while another thread
    imports it, its module has no Tensor yet, and nothing is one)."""
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)
    return tensor is not None and isinstance(x, tensor)


def dtype_name(dt: np.dtype) -> str:
    """How fingerprints and errors name a dtype: bfloat16 for its bits."""
    md = dt.metadata
    if md is not None:
        return md["name"] if "name" in md else str(dt)
    name = _DTYPE_NAMES.get(dt)     # str(dtype) is slow: every collective call names one
    if name is None:
        name = _DTYPE_NAMES[dt] = str(dt)
    return name


_DTYPE_NAMES: dict[np.dtype, str] = {}
"""Names of dtypes without metadata (a dtype with metadata compares equal
to the plain one, so it is never looked up here)."""
_AS_NUMPY: dict[Any, np.dtype] = {}
"""torch dtype -> the numpy dtype it travels as, for those meshrun carries."""


def _not_dense(t: Any) -> str:
    """What kind of tensor ``t`` is where it is not a dense one ("" where it
    is): its layout (sparse...), or "nested" (a nested tensor says strided)."""
    if t.is_nested:
        return "nested"
    return "" if t.layout == _torch().strided else str(t.layout)


def check(t: Any, what: str) -> np.dtype:
    """The numpy dtype ``t`` travels as; TypeError naming its dtype (or layout,
    or device) and ``what`` when meshrun cannot carry it."""
    torch = _torch()
    kind = _not_dense(t)
    if kind:
        raise TypeError(f"{what}: {kind} tensors cannot be sent; dense (strided) "
                        f"tensors only")
    if not (t.is_cpu or t.is_cuda):
        raise TypeError(f"{what}: tensors on {t.device.type} cannot be sent; CPU and CUDA "
                        f"tensors only")
    dt = _AS_NUMPY.get(t.dtype)
    if dt is not None:
        return dt
    if t.dtype == torch.bfloat16:
        return BFLOAT16
    name = str(t.dtype).replace("torch.", "")
    if name not in _NAMES:
        raise TypeError(f"{what}: dtype {t.dtype} cannot be sent; torch tensors of "
                        f"{', '.join(_NAMES)} and bfloat16 only")
    dt = _AS_NUMPY[t.dtype] = np.dtype(name)
    return dt


class _Holder:
    """What a numpy view of a tensor's memory keeps alive: the tensor."""

    __slots__ = ("__array_interface__", "tensor")

    def __init__(self, tensor: Any, interface: dict) -> None:
        self.tensor, self.__array_interface__ = tensor, interface


_NUMPY_DTYPES: dict[Any, np.dtype] = {}


def numpy_view(t: Any) -> np.ndarray:
    """``t.numpy()`` (a CPU tensor of a dtype numpy has, with no grad and no
    lazy conjugate or negation, else RuntimeError or TypeError as torch
    raises), without what it does besides: torch marks the storage of a
    tensor it hands numpy as not resizable, for ever, so a buffer that had
    been through a collective could not be resized again (DDP's bucket in
    batched PowerSGD, a user's buffer). The view holds ``t`` instead."""
    dt = _NUMPY_DTYPES.get(t.dtype)
    if dt is None:      # (a dtype numpy lacks raises TypeError, as t.numpy() would)
        dt = _NUMPY_DTYPES[t.dtype] = _torch().empty(0, dtype=t.dtype).numpy().dtype
    # (the negative bit is not the complex dtypes' alone: c.conj().imag is a real tensor
    # that has it, and its memory holds the values' negations)
    if t.requires_grad or not t.is_cpu or t.is_neg() or dt.kind == "c" and t.is_conj():
        return np.asarray(t.numpy())        # (raises what it raises)
    ptr = t.data_ptr()
    if not ptr:         # (no elements)
        return np.empty(tuple(t.shape), dt)
    return np.asarray(_Holder(t, {
        "version": 3, "typestr": dt.str, "shape": tuple(t.shape), "data": (ptr, False),
        "strides": None if t.is_contiguous() else tuple(k * dt.itemsize for k in t.stride())}))


def operand(t: Any, what: str, wide: bool = False) -> tuple[Any, bool]:
    """``t`` as the array the host or device paths take, and whether it
    shares ``t``'s memory (else it is a copy, to be copied back into ``t``
    when written). CPU: a numpy view; CUDA: a CuPy view. ``wide``: bfloat16
    widened to float32 (a copy), for reductions."""
    torch = _torch()
    dt = check(t, what)
    d = t.detach() if t.requires_grad else t
    if dt is not BFLOAT16 and d.is_cpu:
        try:
            return numpy_view(d), True
        except RuntimeError:     # a conjugate or negative view: resolved below
            pass
    bf16 = d.dtype == torch.bfloat16
    shares = not (wide and bf16) and not d.is_conj() and not d.is_neg()
    if wide and bf16:
        d = d.float()
    elif not shares:
        d = d.resolve_conj().resolve_neg()
    if d.is_cuda:
        v = device.cupy().from_dlpack(d.view(torch.int16) if bf16 and not wide else d)
        return (v.view(np.uint16) if bf16 and not wide else v), shares
    if bf16:
        return d.numpy().view(BFLOAT16_WIDE) if wide else numpy_view(
            d.view(torch.uint16)).view(BFLOAT16), shares
    return numpy_view(d), shares


def out_view(t: Any, what: str) -> Any:
    """Where a received array goes for ``out=t``: ``t``'s memory as numpy
    (CPU) or CuPy (CUDA), bfloat16 as its raw bits."""
    v, shares = operand(t, what)
    if not shares:
        raise TypeError(f"{what}: out= is a conjugate or negative view; resolve it first "
                        f"(t.resolve_conj(), t.resolve_neg())")
    return v


def out_unusable(t: Any) -> str:
    """Why the tensor ``t`` cannot be a receive's ``out=`` ("" when it can),
    checked when the receive is posted: a message is written straight into
    its memory, so it must be dense, contiguous, and not a lazy conjugate or
    negation. (A dtype meshrun cannot carry raises in ``out_view``.)"""
    kind = _not_dense(t)
    if kind:
        return f"out= is a {kind} {t.dtype} tensor; dense (strided) tensors only"
    if not t.is_contiguous():
        return (f"out= is a non-contiguous {t.dtype} tensor (shape {tuple(t.shape)}, strides "
                f"{t.stride()}); receive into a contiguous one (t.contiguous() is a copy)")
    if t.is_conj() or t.is_neg():
        return (f"out= is a conjugate or negative view of a {t.dtype} tensor; resolve it "
                f"first (t.resolve_conj(), t.resolve_neg())")
    return ""


def written(t: Any) -> Any:
    """Tell autograd that ``t`` was written in place through a view of its
    memory (a collective, a receive's out=), as torch's own in-place ops
    do: a backward that saved ``t`` then raises instead of computing with
    the new values. Returns ``t``."""
    torch = _torch()
    torch.autograd.graph.increment_version(t)
    return t


def to_torch(a: Any, like: Any) -> Any:
    """The array ``a`` (numpy, or CuPy) as a tensor of ``like``'s dtype on
    ``like``'s device: shared memory where the dtype matches, bfloat16 from
    its bits or rounded once from float32."""
    torch = _torch()
    if isinstance(a, np.generic):       # a row of a 1-d array, as numpy indexing gives it
        a = np.array(a)
    if isinstance(a, np.ndarray):
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
        if like.is_cuda:
            t = t.to(like.device)
    else:
        if a.dtype == np.uint16:
            a = a.view(np.int16)
        t = torch.from_dlpack(a)
    if like.dtype == torch.bfloat16 and t.dtype in (torch.uint16, torch.int16):
        return t.view(torch.bfloat16)
    return t if t.dtype == like.dtype else t.to(like.dtype)


def plain_view(t: Any) -> tuple[np.ndarray, int] | None:
    """A plain CPU tensor's memory as a C-contiguous numpy array (bfloat16
    as its raw bits) and its header flags, for a send by ring (mesh.rings);
    None for anything that takes the usual way (CUDA, non-contiguous, a
    dtype numpy lacks, a lazy conjugate or negation: ``operand`` says why
    it fails)."""
    try:
        if not t.is_contiguous():
            return None
    except RuntimeError:    # (a sparse CSR tensor has no is_contiguous: ``check`` names it)
        return None
    d = t.detach() if t.requires_grad else t
    a = cpu_numpy(d)
    if a is not None:
        return a, TORCH
    torch = _torch()
    if d.is_cpu and d.dtype == torch.bfloat16 and not (d.is_conj() or d.is_neg()):
        return numpy_view(d.view(torch.uint16)).view(BFLOAT16), TORCH | BF16
    return None


def cpu_numpy(t: Any) -> np.ndarray | None:
    """A CPU tensor's memory as numpy, where torch gives it as it is (a
    dtype numpy has, no grad, no lazy conjugate or negation); else None."""
    if not t.is_cpu:
        return None
    try:
        return numpy_view(t)
    except (RuntimeError, TypeError):
        return None


def flags(t: Any) -> int:
    torch = _torch()
    return TORCH | (BF16 if t.dtype == torch.bfloat16 else 0)


def received(value: np.ndarray, on_device: bool, bits: int) -> Any:
    """A received array as the sender's kind: a torch tensor (bfloat16 from
    its bits) on the current CUDA device when it came from one, else on CPU."""
    torch = _torch()
    if on_device:
        v = device.to_device(value)
        t = torch.from_dlpack(v.view(np.int16) if v.dtype == np.uint16 else v)
    else:
        t = torch.from_numpy(value if value.flags.writeable else value.copy())
    return t.view(torch.bfloat16) if bits & BF16 else t


def stream_of(t: Any) -> Any:
    """A context that makes ``t``'s CUDA device and torch's current stream
    on it CuPy's current ones, so that device paths order their work after
    torch's (nothing for a CPU tensor)."""
    if not t.is_cuda:
        return contextlib.nullcontext()
    torch, cp = _torch(), device.cupy()
    stack = contextlib.ExitStack()
    stack.enter_context(cp.cuda.Device(t.device.index))
    s = torch.cuda.current_stream(t.device).cuda_stream
    if s:
        stack.enter_context(cp.cuda.ExternalStream(s))
    return stack
