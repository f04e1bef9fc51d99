"""Tuples through collectives.MPI's lowercase object calls. meshrun sends
objects by msgpack, which packs a tuple as an array that comes back a list
(meshrun's own object calls keep that); mpi4py's pickle brings a tuple back,
and programs compare ``allreduce((v, r), op=MAXLOC) == (v, r)`` or key
dicts by tuples. ``wrap`` turns an object holding a tuple into one msgpack
ExtType (code TREE) whose bytes pack each tuple as ExtType TUPLE, at any
depth (in lists, dict values, dict keys); ``unwrap`` undoes it on the other
end. Sets, frozensets and Python complex numbers, which msgpack has no
type for either (and pickle brings back), go the same way (ExtType SET,
FROZENSET, COMPLEX: the items packed; the real and imaginary parts as two
little-endian doubles). An object without tuples goes as it is: its check is one strict
msgpack pack in C (a number, a string, None, bytes or an array: not even
that)."""
from __future__ import annotations

import struct
import threading
from typing import Any

import msgpack
import numpy as np

__all__ = ["wrap", "unwrap", "wrap_state", "unwrap_state", "TREE", "TUPLE", "SET", "FROZENSET",
           "COMPLEX"]

TREE = 84          # ('T') an object with tuples in it, packed
TUPLE = 85         # one tuple's items, packed
SET = 86           # one set's items, packed
FROZENSET = 87     # one frozenset's items, packed
COMPLEX = 88       # a complex: two little-endian doubles
_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})
_STATE = "__collectives.MPI tuples__"   # bcast's marker: broadcast_state walks tuples


_local = threading.local()      # per thread: seen (a tuple met), packers (by depth)


def _ext(o: Any) -> Any:
    """msgpack's default under strict_types: what it does not pack itself."""
    _local.seen = True
    if isinstance(o, tuple):            # (a namedtuple too: a tuple on the other end)
        return msgpack.ExtType(TUPLE, _pack(list(o)))
    if isinstance(o, (set, frozenset)):
        return msgpack.ExtType(FROZENSET if isinstance(o, frozenset) else SET, _pack(list(o)))
    if isinstance(o, complex):
        return msgpack.ExtType(COMPLEX, struct.pack("<dd", o.real, o.imag))
    if isinstance(o, list):
        return list(o)
    if isinstance(o, dict):
        return dict(o)
    if isinstance(o, int):              # (an IntEnum)
        return int(o)
    if isinstance(o, float):            # (numpy's float64)
        return float(o)
    if isinstance(o, str):
        return str(o)
    if isinstance(o, bytes):
        return bytes(o)
    raise TypeError(f"can not serialize {type(o).__name__!r} object")


def _pack(o: Any) -> bytes:
    """``o`` packed by this thread's Packer for the depth (a tuple's items
    are packed inside the default of the one above). Packers are kept:
    packb makes one a call, its 256 KiB buffer malloc'd and freed, 10-20 us
    where two are live at once."""
    packers: list[msgpack.Packer] = _local.__dict__.setdefault("packers", [])
    depth = _local.__dict__.get("depth", 0)
    if depth == len(packers):
        packers.append(msgpack.Packer(use_bin_type=True, strict_types=True, default=_ext))
    _local.depth = depth + 1
    try:
        return packers[depth].pack(o)
    finally:
        _local.depth = depth


def wrap(obj: Any) -> Any:
    """``obj`` to send: as it is, or an ExtType TREE when a tuple is in it
    (what msgpack cannot pack at all also goes as it is, for meshrun's send
    to refuse, naming the rank and the operation; arrays, numpy scalars and
    tensors too, which meshrun sends as arrays). A tuple is found by the
    packer's default, without an exception (a Cython one's traceback: 20 us)."""
    if type(obj) in _PLAIN or isinstance(obj, (np.ndarray, np.generic)) \
            or hasattr(obj, "__dlpack__"):
        return obj
    _local.seen = False
    try:
        packed = _pack(obj)
    except (TypeError, ValueError, OverflowError):
        return obj
    return msgpack.ExtType(TREE, packed) if _local.seen else obj


def _hook(code: int, data: bytes) -> Any:
    if code == TUPLE:
        return tuple(_unpack(data))
    if code == SET:
        return set(_unpack(data))
    if code == FROZENSET:
        return frozenset(_unpack(data))
    if code == COMPLEX:
        return complex(*struct.unpack("<dd", data))
    return msgpack.ExtType(code, data)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_hook)


def unwrap(value: Any) -> Any:
    """A received value with its tuples back."""
    if type(value) is msgpack.ExtType and value.code == TREE:
        return _unpack(value.data)
    return value


def wrap_state(obj: Any) -> Any:
    """bcast's root ``obj`` for broadcast_state (which walks tuples as lists,
    ExtType among them): an object with tuples and no arrays as a one-key
    dict of its packed bytes (with arrays in it, it goes as it is)."""
    w = wrap(obj)
    return {_STATE: w.data} if type(w) is msgpack.ExtType and w.code == TREE else obj


def unwrap_state(value: Any) -> Any:
    if type(value) is dict and len(value) == 1 and type(value.get(_STATE)) is bytes:
        return _unpack(value[_STATE])
    return value
