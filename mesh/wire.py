"""Wire format: multipart messages ``[header, payload...]``.

The header is a small msgpack map; array payloads follow as raw frames of at
most ``FRAME_BYTES`` each (views of the caller's array, never copies), so the
receiver can write each frame straight into its destination and no single
giant allocation page-faults on the way. Objects travel as one msgpack frame.

    Small messages (payload under INLINE_MAX) travel as ONE frame instead:
    0xC1 | header length (2 bytes, little-endian) | header | payload.
    0xC1 is never used by msgpack, so no plain header starts with it; one
    frame saves a send and a receive per hop, which dominates small messages.

    header keys: k kind, s source world rank, g group id, t tag,
                 d dtype (arrays), sh shape (arrays), n payload bytes,
                 f fingerprint (collectives), c credit bytes, r reason (aborts),
                 e what an abort makes its receivers raise (mesh.AbortKind),
                 status (heartbeats: what the sender is doing, for stall
                 reports) or the error a failing rank leaves with (goodbyes;
                 none: a clean close), p the lost peer an abort names, the
                 first peer a goodbye's sender lost, or the failing rank whose
                 goodbye a heartbeat answers (-1: none),
                 h on BYE: how many messages the sender had read off the
                 addressee's connection when it said goodbye (each peer gets
                 its own goodbye; absent: not said), as the addressee counts
                 what it puts on that connection (Peer.sent): a send of the
                 addressee's still waiting for ZeroMQ to let go of its frames
                 arrived if it was among them,
                 v flags of the array's origin (returned as such): 1 a device
                 array, 2 a torch tensor, 4 a bfloat16 one (sent as uint16),
                 x same-host direct path (mesh.direct), a list of integers:
                 on DATA [address, id] (no payload frames: the receiver reads
                 the bytes from the sender's memory and answers DONE [id]);
                 on PROBE [pid, address, token 0, token 1] (may you read me?)
                 or [1 or 0] (the answer); on RING [pid, fd, token 0, token 1]
                 (where the sender's ring in our region is: mesh.rings),
                 m on DATA and OBJ: 1 when the payload follows in CHUNK
                 messages instead of this message's frames; on DATA, 2 when
                 it follows on the sender's stream (mesh.streams);
                 on STREAM x [port, nonce] and r the token (where to connect
                 a stream to the sender), or x [1] (the sender's stream to
                 the receiver is open); on SYNCED [id] or [id, word]
                 (mesh.wire's SYNC_ words: what became of the message),
                 y on DATA and OBJ: a synchronous send's id (Comm.ssend): the
                 receiver answers SYNCED x=[id] once a receive (a matched
                 probe's too) has taken the message, x=[id, word] once it
                 dropped it unread (SYNC_GROUP, SYNC_CLOSED, SYNC_NO_MEMORY);
                 the sender's SYNCED x=[id, SYNC_CANCEL]
                 asks the receiver to withdraw it (Request.cancel), which
                 answers SYNC_WITHDRAWN (out of its queue, unread) or
                 SYNC_KEPT (not there: taken, dropped, or still coming)

    Across hosts (tcp://) a message of more than CHUNK_BYTES goes as its
    header (m set, no payload), then CHUNK messages ``[header, frames...]``
    (n: their payload bytes) of CHUNK_BYTES each, the last one shorter;
    nothing else of that sender's data comes between them. The receiver
    answers each with GOT (c: its bytes), and the sender keeps at most
    mesh.transport's _AHEAD bytes of pieces unanswered: its heartbeats and
    other control messages go between the pieces, and each piece that
    arrives is word from the sender (a message taking longer than
    MESH_PEER_TIMEOUT to cross does not make its sender look silent).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import msgpack
import numpy as np

from .errors import AbortKind, BadMessageError
from .tensors import BFLOAT16

__all__ = ["DATA", "OBJ", "CREDIT", "HEARTBEAT", "ABORT", "BYE", "PROBE", "DONE", "RING",
           "CHUNK", "GOT", "STREAM", "SYNCED", "SYNC_GROUP", "SYNC_CLOSED",
           "SYNC_NO_MEMORY", "SYNC_WITHDRAWN", "SYNC_KEPT", "SYNC_CANCEL", "STREAMED",
           "FRAME_BYTES", "CHUNK_BYTES", "MAX_HEADER", "INLINE_MAX", "Header", "encode",
           "decode", "frames", "inline", "split_inline", "array_frames", "dtype_ok"]

DATA, OBJ, CREDIT, HEARTBEAT, ABORT, BYE, PROBE, DONE, RING, CHUNK, GOT, STREAM, SYNCED = \
    range(13)
_KINDS = (DATA, OBJ, CREDIT, HEARTBEAT, ABORT, BYE, PROBE, DONE, RING, CHUNK, GOT, STREAM,
          SYNCED)
# SYNCED's word (x[1]; absent: a receive took the message): its receiver dropped it
# unread (its group dropped, its mesh closed, no memory for it), or withdrew it (a
# cancel), or kept it; SYNC_CANCEL, the sender's: withdraw it
SYNC_GROUP, SYNC_CLOSED, SYNC_NO_MEMORY, SYNC_WITHDRAWN, SYNC_KEPT, SYNC_CANCEL = range(1, 7)
STREAMED = 2    # the m field of an array whose payload follows on a stream (mesh.streams)
_MAX_DIRECT = 4
FRAME_BYTES = 1 << 20
# a message across hosts goes in pieces of this (frames); 4 MiB pieces made 64 MiB
# ping-pong across two network namespaces 20% slower (median 1.6 against 2.1 GB/s)
CHUNK_BYTES = 8 * FRAME_BYTES
MAX_HEADER = 16 * 1024
INLINE_MAX = 8 * 1024
INLINE_MARK = 0xC1
_MARK = bytes([INLINE_MARK])


def _max_dims() -> int:
    """The most dimensions an array of this numpy may have: 64 from numpy 2,
    32 before (an array header may name no more: the receiver builds it)."""
    try:
        np.empty((1,) * 64)
    except ValueError:
        return 32
    return 64


_MAX_DIMS = _max_dims()
_NUMERIC_KINDS = "biufc"


class Header(NamedTuple):
    """A decoded header (immutable; a NamedTuple because one is built per message)."""

    kind: int
    src: int
    group: int = 0
    tag: int = 0
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    nbytes: int = 0
    fp: Any = None
    credit: int = 0
    reason: str = ""
    device: int = 0         # the v flags
    peer: int = -1
    dt: Any = None          # np.dtype of ``dtype``, resolved once
    abort: AbortKind = AbortKind.OTHER
    direct: tuple[int, ...] = ()  # the x field
    more: int = 0           # the m field: 1, the payload follows in CHUNK messages;
    #                         STREAMED, on the sender's stream
    heard: int = -1         # the h field (goodbyes; -1: absent)
    sync: int = -1          # the y field: a synchronous send's id (-1: a standard send)


def dtype_ok(dt: np.dtype) -> bool:
    return dt.kind in _NUMERIC_KINDS and not dt.hasobject and dt.fields is None


_DTYPES: dict[str, np.dtype] = {}


def _dtype(name: str) -> np.dtype:
    dt = _DTYPES.get(name)
    if dt is None:
        try:
            dt = np.dtype(name)
        except Exception:
            raise BadMessageError(f"unknown dtype {name!r}") from None
        if not dtype_ok(dt):
            raise BadMessageError(f"dtype {name!r} is not a numeric dtype")
        if len(_DTYPES) < 256:
            _DTYPES[name] = dt
    return dt


def encode(kind: int, src: int, group: int = 0, tag: int = 0, *, dtype: str | None = None,
           shape: tuple[int, ...] | None = None, nbytes: int = 0, fp: Any = None,
           credit: int = 0, reason: str = "", device: int = 0, peer: int = -1,
           abort: AbortKind = AbortKind.OTHER, direct: tuple[int, ...] = (),
           more: int = 0, heard: int = -1, sync: int = -1) -> bytes:
    h: dict[str, Any] = {"k": kind, "s": src}
    if direct:
        h["x"] = list(direct)
    if kind in (DATA, OBJ, ABORT):
        h["g"] = group
        h["t"] = tag
    if kind == DATA:
        h["d"] = dtype
        h["sh"] = list(shape or ())
        if device:
            h["v"] = int(device)
    if kind in (DATA, OBJ):
        h["n"] = nbytes
        if fp is not None:
            h["f"] = fp
        if more:
            h["m"] = int(more)
        if sync >= 0:
            h["y"] = sync
    elif kind == CHUNK:
        h["n"] = nbytes
    elif kind in (CREDIT, GOT):
        h["c"] = credit
    elif kind == ABORT:
        h["r"] = reason
        h["e"] = int(abort)
        if peer >= 0:
            h["p"] = peer
    elif kind in (HEARTBEAT, BYE, STREAM):
        if reason:
            h["r"] = reason
        if peer >= 0:
            h["p"] = peer
        if heard >= 0 and kind == BYE:
            h["h"] = heard
    return msgpack.packb(h)


def _int(h: dict, key: str, lo: int = -(1 << 63), hi: int = (1 << 63) - 1) -> int:
    v = h.get(key, 0)
    if type(v) is not int or not lo <= v <= hi:
        raise BadMessageError(f"header field {key!r} is {v!r}, not an integer in [{lo}, {hi}]")
    return v


def _str(h: dict, key: str) -> str:
    v = h.get(key, "")
    if not isinstance(v, str):
        raise BadMessageError(f"header field {key!r} is a {type(v).__name__}, not a string")
    return v


def decode(frame: bytes | memoryview, world_size: int) -> Header:
    """Parse and validate a header; raise BadMessageError on anything off."""
    if len(frame) > MAX_HEADER:
        raise BadMessageError(f"header of {len(frame)} bytes exceeds {MAX_HEADER}")
    try:
        h = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=0,
                            max_array_len=4096, max_map_len=64, max_str_len=MAX_HEADER)
    except Exception as e:
        raise BadMessageError(f"header is not msgpack ({type(e).__name__})") from None
    if not isinstance(h, dict):
        raise BadMessageError(f"header is a {type(h).__name__}, not a map")
    kind = _int(h, "k")
    if kind not in _KINDS:
        raise BadMessageError(f"unknown message kind {kind}")
    src = _int(h, "s", 0, world_size - 1)
    direct = _direct(h) if "x" in h else ()
    if kind in (PROBE, DONE, RING, SYNCED):
        n = len(direct)
        if kind == SYNCED:      # [id], or [id, a SYNC_ word]
            bad = not (n == 1 or n == 2 and 0 < direct[1] <= SYNC_CANCEL)
        else:
            bad = n != (1 if kind == DONE else 4) and (kind != PROBE or n != 1)
        if bad:
            raise BadMessageError(f"message kind {kind} with direct-path field {direct!r}")
        return Header(kind, src, direct=direct)
    if kind == STREAM:
        if len(direct) not in (1, 2):
            raise BadMessageError(f"a stream message with field x {direct!r}")
        return Header(kind, src, reason=_str(h, "r"), direct=direct)
    if kind in (CREDIT, GOT):
        return Header(kind, src, credit=_int(h, "c", 0))
    if kind == CHUNK:
        return Header(kind, src, nbytes=_int(h, "n", 0))
    if kind in (HEARTBEAT, BYE):
        return Header(kind, src, reason=_str(h, "r"),
                      peer=_int(h, "p", -1, world_size - 1) if "p" in h else -1,
                      heard=_int(h, "h", 0) if "h" in h and kind == BYE else -1)
    group, tag = _int(h, "g", 0), _int(h, "t")
    if kind == ABORT:
        return Header(kind, src, group, tag, reason=_str(h, "r"),
                      peer=_int(h, "p", -1, world_size - 1) if "p" in h else -1,
                      abort=AbortKind(_int(h, "e", 0, max(AbortKind))) if "e" in h
                      else AbortKind.OTHER)
    nbytes = _int(h, "n", 0)
    more = _int(h, "m", 0, STREAMED) if "m" in h else 0
    sync = _int(h, "y", 0) if "y" in h else -1
    if kind == OBJ:
        if more == STREAMED:
            raise BadMessageError("an object message whose payload follows on a stream")
        return Header(kind, src, group, tag, nbytes=nbytes, fp=h.get("f"), more=more, sync=sync)
    dtype, shape = h.get("d"), h.get("sh")
    if not isinstance(dtype, str) or not isinstance(shape, list) or len(shape) > _MAX_DIMS:
        raise BadMessageError(f"array header has dtype {dtype!r} and shape {shape!r}")
    if not all(type(x) is int and x >= 0 for x in shape):
        raise BadMessageError(f"array shape {shape!r} has a non-integer or negative extent")
    v = h.get("v", 0)
    origin = v if type(v) is int and 0 <= v < 8 else int(v) if type(v) is bool else \
        _int(h, "v", 0, 7)
    dt = _dtype(dtype)
    if origin & 4:
        if dt != np.uint16:
            raise BadMessageError(f"a bfloat16 array travels as uint16, not {dtype}")
        dt = BFLOAT16   # uint16 that names itself bfloat16 (in a Status, in errors)
    if math.prod(shape) * dt.itemsize != nbytes:
        raise BadMessageError(f"payload of {nbytes} bytes does not fit dtype {dtype} "
                              f"and shape {tuple(shape)}")
    if direct and (len(direct) != 2 or more):
        raise BadMessageError(f"array header with direct-path field {list(direct)!r}")
    return Header(kind, src, group, tag, dtype, tuple(shape), nbytes, h.get("f"),
                  device=origin, dt=dt, direct=direct, more=more, sync=sync)


def _direct(h: dict) -> tuple[int, ...]:
    x = h["x"]
    if (not isinstance(x, list) or not 0 < len(x) <= _MAX_DIRECT
            or not all(type(v) is int and 0 <= v < 1 << 63 for v in x)):
        raise BadMessageError(f"header field 'x' is {x!r}, not a list of up to {_MAX_DIRECT} "
                              f"non-negative integers")
    return tuple(x)


def inline(header: bytes, *payload: Any) -> bytes:
    """One frame holding ``header`` and a small payload (buffers, joined)."""
    return b"".join((_MARK, len(header).to_bytes(2, "little"), header, *payload))


def frames(header: bytes, payload: list, nbytes: int) -> list:
    """A message's frames: one (``inline``) under INLINE_MAX payload bytes,
    else the header and then the payload frames."""
    return [inline(header, *payload)] if nbytes < INLINE_MAX else [header, *payload]


def split_inline(frame: bytes | memoryview) -> tuple[bytes, memoryview]:
    """(header, payload) of a frame made by ``inline`` (off a socket, or a
    view of a same-host ring); BadMessageError if it is not one, or too
    short for the header length it claims."""
    n = len(frame)
    hl = frame[1] | frame[2] << 8 if n >= 3 else n
    if 3 + hl > n or frame[0] != INLINE_MARK:
        raise BadMessageError(f"one-frame message of {n} bytes claims a {hl}-byte header")
    return bytes(frame[3:3 + hl]), memoryview(frame)[3 + hl:]


def array_frames(arr: np.ndarray) -> list[memoryview]:
    """Views of a C-contiguous array's bytes, cut into frames of FRAME_BYTES."""
    n = arr.nbytes
    if n == 0:
        return []
    mv = memoryview(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    return [mv[i:i + FRAME_BYTES] for i in range(0, n, FRAME_BYTES)]
