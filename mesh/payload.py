"""Payloads: what may be sent and how it is turned into frames and back.

Arrays (numeric and bool numpy arrays, any shape, any layout; torch tensors
through mesh.tensors) travel as raw frames; anything else must be
msgpack-able (no pickle on the wire)."""
from __future__ import annotations

import math
import sys
from typing import Any

import msgpack
import numpy as np

from . import device, tensors, wire
from .match import describe

__all__ = ["encode_payload", "decode_object", "as_array", "is_masked", "out_unusable",
           "out_problem", "out_fits", "fill", "fmt_fp", "delivered"]


def encode_payload(obj: Any, desc: Any, rank: int) -> tuple[int, dict, list, Any]:
    """(kind, header fields, payload frames, what must stay alive until sent);
    ``desc`` is the operation's description (see match.describe). A torch
    tensor goes as a view of its memory, flagged so the receiver gets one."""
    bits = 0
    if type(obj) is not np.ndarray and tensors.is_tensor(obj):
        bits = tensors.flags(obj)
        obj, _ = tensors.operand(obj, f"rank {rank}: {describe(desc)}")
    on_device = device.is_device(obj)
    try:
        arr = device.to_host(obj) if on_device else as_array(obj)
    except TypeError as e:
        raise TypeError(f"rank {rank}: {describe(desc)}: {e}") from None
    except (RuntimeError, BufferError) as e:
        if on_device:
            raise
        # DLPack's refusals (a dtype numpy lacks, a tensor that requires grad) named no
        # rank, peer nor operation
        raise TypeError(f"rank {rank}: {describe(desc)}: {type(obj).__name__} cannot be read "
                        f"through DLPack ({type(e).__name__}: {e})") from None
    if arr is not None:
        if not wire.dtype_ok(arr.dtype):
            raise TypeError(f"rank {rank}: {describe(desc)}: dtype {arr.dtype} cannot be sent; "
                            f"numeric and bool arrays only")
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")
        if arr.dtype.metadata is not None and tensors.dtype_name(arr.dtype) == "bfloat16" \
                and arr.dtype.itemsize == 2:       # bfloat16's bits from a numpy view of them:
            bits |= tensors.BF16                   # the receiver's array says bfloat16 too
        kw = {"dtype": arr.dtype.str, "shape": arr.shape, "device": int(on_device) | bits}
        return wire.DATA, kw, wire.array_frames(arr), arr
    try:
        packed = msgpack.packb(obj, use_bin_type=True)
    except Exception as e:
        raise TypeError(f"rank {rank}: {describe(desc)}: {type(obj).__name__} is neither an "
                        f"array nor msgpack-able ({e}){_refused(obj)}") from None
    if len(packed) <= wire.FRAME_BYTES:
        return wire.OBJ, {}, [packed], None
    mv = memoryview(packed)     # in frames of FRAME_BYTES, as arrays: none longer (a
    return wire.OBJ, {}, [mv[i:i + wire.FRAME_BYTES]      # worker refuses a longer one)
                          for i in range(0, len(packed), wire.FRAME_BYTES)], packed


_PLAIN = (type(None), bool, int, float, str, bytes, bytearray, memoryview)


def _refused(obj: Any) -> str:
    """What an object message's error adds: where in ``obj`` the first
    value msgpack does not take is, and what to send instead (a parameter
    server's ``{"step": 3, "grad": array}`` said only "can not serialize
    'numpy.ndarray' object", and a job number from ``np.arange``, a
    numpy.int64 in a dict, as much)."""
    path, bad = _first_refused(obj, "", 0)
    if bad is _NONE:
        return ""
    name = type(bad).__module__ + "." + type(bad).__qualname__ \
        if type(bad).__module__ not in ("builtins", "__builtin__") else type(bad).__name__
    if isinstance(bad, np.generic):
        fix = "x.item() (int(x), float(x)) makes a numpy scalar plain"
    elif isinstance(bad, np.ndarray) or tensors.is_tensor(bad) or device.is_device(bad):
        fix = ("an array travels as a message of its own (send it alone, say with a tag "
               "of its own), or as x.tolist() inside an object")
    elif isinstance(bad, (set, frozenset)):
        fix = "send list(x)"
    elif isinstance(bad, complex):
        fix = "np.complex128(z) goes as a 0-d array"
    elif isinstance(bad, int):
        fix = "an int past 64 bits goes as str(n)"
    else:
        fix = ("objects travel by msgpack, never pickle: None, bool, int, float, str, bytes, "
               "and lists, tuples and dicts of them")
    where = f"its {path} is" if path else "it is"
    return f"; {where} {'an' if name[:1] in 'aeiou' else 'a'} {name}: {fix}"


_NONE = object()


def _first_refused(obj: Any, path: str, depth: int) -> tuple[str, Any]:
    """(where, value) of the first value in ``obj`` msgpack refuses, by
    its path of keys and indices (``["grad"]``, ``[2]``), or ("", _NONE)."""
    if depth > 64:
        return "", _NONE
    if type(obj) is int and not -2**63 <= obj < 2**64:
        return path, obj
    if isinstance(obj, _PLAIN):     # (np.float64 too: a float)
        return "", _NONE
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = _first_refused(v, f"{path}[{i}]", depth + 1)
            if found[1] is not _NONE:
                return found
        return "", _NONE
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _first_refused(k, f"{path} key {k!r}"[:80], depth + 1)
            if found[1] is not _NONE:
                return found
            found = _first_refused(v, f"{path}[{k!r}]"[:80], depth + 1)
            if found[1] is not _NONE:
                return found
        return "", _NONE
    return path, obj


def decode_object(packed: Any) -> Any:
    """An object message's value. A dict's tuple keys arrive as tuples:
    msgpack packs a tuple as an array, which comes back a list, and a list
    is no dict key (such a message was dropped as malformed, its send long
    returned, and its receive waited out its timeout). Tried only when the
    plain unpack fails, so other objects pay nothing."""
    try:
        return msgpack.unpackb(packed, raw=False, strict_map_key=False)
    except TypeError:       # (unhashable type: 'list')
        return msgpack.unpackb(packed, raw=False, strict_map_key=False,
                               object_pairs_hook=_tuple_keys)


def _tuple_keys(pairs: list) -> dict:
    return {_key(k): v for k, v in pairs}


def _key(k: Any) -> Any:
    return tuple(_key(x) for x in k) if type(k) is list else k


MASKED = ("a masked array's mask would not travel (its masked values would be used as "
          "they are): pass a.filled(value), or send the data and np.ma.getmaskarray(a)")
"""What point-to-point and the collectives say of a numpy masked array."""


def is_masked(obj: Any) -> bool:
    """Whether ``obj`` is a numpy masked array, without importing numpy.ma
    (numpy 2 loads it lazily, 5-15 ms on a first object send or collective):
    while numpy.ma is not imported no masked array can exist."""
    ma = sys.modules.get("numpy.ma")
    return ma is not None and isinstance(obj, ma.MaskedArray)


def as_array(obj: Any) -> np.ndarray | None:
    if type(obj) is np.ndarray:
        return obj
    if is_masked(obj):
        raise TypeError(MASKED)
    if isinstance(obj, np.ndarray):     # (np.matrix and other subclasses: their memory)
        return obj.view(np.ndarray)
    if isinstance(obj, np.generic):
        return np.asarray(obj)
    if hasattr(obj, "__dlpack__"):
        return np.from_dlpack(obj)
    return None


def out_unusable(out: Any) -> str:
    """Why ``out=`` cannot take any message ("" when it can), checked when
    the receive is posted: not an array, read-only, not C-contiguous."""
    if isinstance(out, np.ndarray):
        flags = out.flags
        contiguous, writable = flags.c_contiguous, flags.writeable
    elif tensors.is_tensor(out):
        return tensors.out_unusable(out)
    elif device.is_device(out):
        _, _, contiguous, writable = device.layout(out)
    else:
        return f"out= is a {type(out).__name__}, not a numpy or device array"
    if not writable:
        return "out= is read-only"
    if not contiguous:
        return "out= is not C-contiguous"
    return ""


def out_problem(out: Any, value: Any) -> str:
    """Why a received ``value`` cannot go into ``out=`` ("" when it can)."""
    if type(out) is np.ndarray and type(value) is np.ndarray and out.dtype == value.dtype \
            and out.size == value.size and (f := out.flags).c_contiguous and f.writeable \
            and (out.dtype.char != "H"     # uint16: bfloat16's bits on one side only?
                 or (out.dtype.metadata is None) is (value.dtype.metadata is None)):
        return ""
    if not isinstance(value, np.ndarray):
        return f"the message is a {type(value).__name__}, not an array"
    return out_fits(out, value.dtype, value.shape)


def out_fits(out: Any, dtype: np.dtype, shape: tuple[int, ...]) -> str:
    """Why an array message of ``dtype`` and ``shape`` cannot be written into
    ``out=`` ("" when it can): same dtype and element count, any shape."""
    if isinstance(out, np.ndarray):
        odt, oshape = out.dtype, out.shape
        usable = out.flags.c_contiguous and out.flags.writeable
    elif device.is_device(out):
        odt, oshape, contiguous, writable = device.layout(out)
        usable = contiguous and writable
    else:
        return f"out= is a {type(out).__name__}, not a numpy or device array"
    name = tensors.dtype_name      # bfloat16's raw bits are named bfloat16, not uint16
    if odt != dtype or math.prod(oshape) != math.prod(shape) or (
            isinstance(out, np.ndarray) and odt.char == "H"     # (a device view: bits)
            and name(odt) != name(dtype)):
        return f"the message is {name(dtype)}{list(shape)}, out= is {name(odt)}{list(oshape)}"
    return "" if usable else "out= is not a writable C-contiguous array"


def delivered(value: np.ndarray, bits: int) -> Any:
    """A received array as its sender's kind (header flags ``bits``): on the
    device when it came from one, a torch tensor when it was one."""
    if bits & tensors.TORCH:
        return tensors.received(value, bool(bits & 1), bits)
    return device.to_device(value) if bits & 1 else value   # (bfloat16's bits: as they are)


def fill(dest: np.ndarray, parts: list) -> None:
    """Copy received frames, in order, into the C-contiguous array ``dest``."""
    if not parts or dest.nbytes == 0:
        return
    view = dest.data.cast("B")
    if len(parts) == 1:
        view[:] = parts[0]
        return
    off = 0
    for p in parts:    # bytes-like: bytes, or memoryviews of zero-copy frames
        n = len(p)
        view[off:off + n] = p
        off += n


def fmt_fp(fp: Any) -> str:
    if isinstance(fp, dict):
        name = fp.get("coll", "?")
        args = ", ".join(f"{k}={v}" for k, v in fp.items() if k != "coll" and v is not None)
        return f"{name}({args})"
    return repr(fp)
