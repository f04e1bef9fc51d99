"""Property-based tests of the frame decoder: whatever bytes arrive as a
header, ``mesh.wire.decode`` returns a Header that satisfies every invariant
the transport relies on, or raises BadMessageError; never anything else.
The same holds for one-frame small messages (``mesh.wire.split_inline``)."""
from __future__ import annotations

import math
import os

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh import AbortKind, BadMessageError, wire

pytestmark = pytest.mark.timeout(120)

KEYS = ["k", "s", "g", "t", "d", "sh", "n", "f", "c", "r", "e", "h"]
INT64 = st.integers(-(1 << 63), (1 << 64) - 1)        # what msgpack can carry
SMALL = st.integers(-3, 40)
DTYPES = ["<f4", "<f8", "|u1", "<i8", "|b1", "<c16", ">f4", "|O", "V8", "<M8[s]", "S3",
          "<U2", "i4,i4", "(2,)f8", "float128", "", "nope", "\x00"]
SETTINGS = settings(max_examples=int(os.environ.get("MESH_FUZZ_EXAMPLES", "300")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
# the recursive msgpack values cost hypothesis 15-25 ms an example to draw:
# 120 of them in the suite (hypothesis's default is 100); MESH_FUZZ_EXAMPLES
# sets both (BENCHMARKS.md's run: 10000)
RICH = settings(SETTINGS, max_examples=int(os.environ.get("MESH_FUZZ_EXAMPLES", "120")))

scalars = st.one_of(st.none(), st.booleans(), INT64, SMALL, st.floats(allow_nan=True),
                    st.text(max_size=20), st.binary(max_size=20), st.sampled_from(DTYPES))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=4), inner, max_size=4)),
    max_leaves=20)
shapes = st.lists(st.one_of(st.integers(0, 8), INT64, st.just(-1), st.text(max_size=2)),
                  max_size=40)


def _header_maps() -> st.SearchStrategy[dict]:
    """Maps that look like headers: the real keys, plausible and absurd values."""
    field = {"k": st.one_of(st.integers(-1, 7), values), "s": st.one_of(SMALL, values),
             "sh": st.one_of(shapes, values), "d": st.one_of(st.sampled_from(DTYPES), values),
             "n": st.one_of(st.integers(-1, 1 << 40), values)}
    known = st.fixed_dictionaries({}, optional={k: field.get(k, values) for k in KEYS})
    extra = st.dictionaries(st.one_of(st.text(max_size=3), INT64), values, max_size=3)
    return st.tuples(known, extra).map(lambda p: {**p[1], **p[0]})


def _check(frame: bytes, size: int) -> None:
    """decode accepts or rejects cleanly, and what it accepts is sound."""
    try:
        h = wire.decode(frame, size)
    except BadMessageError:
        return
    assert isinstance(h, wire.Header)
    assert h.kind in (wire.DATA, wire.OBJ, wire.CREDIT, wire.HEARTBEAT, wire.ABORT, wire.BYE,
                      wire.PROBE, wire.DONE, wire.RING, wire.CHUNK, wire.GOT)
    assert type(h.src) is int and 0 <= h.src < size
    assert type(h.group) is int and h.group >= 0 and type(h.tag) is int
    assert type(h.nbytes) is int and h.nbytes >= 0
    assert type(h.credit) is int and h.credit >= 0
    assert isinstance(h.reason, str)
    if h.kind == wire.DATA:
        dt = np.dtype(h.dtype)
        assert wire.dtype_ok(dt)
        assert all(type(x) is int and x >= 0 for x in h.shape)
        assert math.prod(h.shape) * dt.itemsize == h.nbytes
    if h.kind == wire.ABORT:
        assert type(h.abort) is AbortKind and 0 <= h.abort <= 3   # the four abort kinds
    assert type(h.peer) is int and -1 <= h.peer < size
    assert type(h.heard) is int and h.heard >= -1 and (h.kind == wire.BYE or h.heard == -1)


@SETTINGS
@given(st.binary(max_size=256), st.integers(1, 8))
def test_arbitrary_bytes(frame: bytes, size: int) -> None:
    _check(frame, size)


@RICH
@given(_header_maps(), st.integers(1, 8))
def test_arbitrary_msgpack_maps(h: dict, size: int) -> None:
    try:
        frame = msgpack.packb(h, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return
    _check(frame, size)


@RICH
@given(values, st.integers(1, 8))
def test_arbitrary_msgpack_values(v: object, size: int) -> None:
    _check(msgpack.packb(v, use_bin_type=True), size)


valid = st.one_of(
    st.builds(lambda s, g, t, d, sh, f: wire.encode(
        wire.DATA, s, g, t, dtype=np.dtype(d).str, shape=tuple(sh),
        nbytes=math.prod(sh) * np.dtype(d).itemsize, fp=f),
        st.integers(0, 3), st.integers(0, 1 << 62), st.integers(-(1 << 62), 1 << 62),
        st.sampled_from(["<f4", "<f8", "|u1", "<c8", "|b1", "<i2"]),
        st.lists(st.integers(0, 5), max_size=4),
        st.one_of(st.none(), st.dictionaries(st.text(max_size=4), SMALL, max_size=3))),
    st.builds(lambda s, n: wire.encode(wire.OBJ, s, nbytes=n), st.integers(0, 3),
              st.integers(0, 1 << 40)),
    st.builds(lambda s, c: wire.encode(wire.CREDIT, s, credit=c), st.integers(0, 3),
              st.integers(0, 1 << 40)),
    st.builds(lambda s, r, e, p: wire.encode(wire.ABORT, s, reason=r, abort=e, peer=p),
              st.integers(0, 3), st.text(max_size=30), st.sampled_from(AbortKind),
              st.integers(-1, 3)),
    st.builds(lambda k, s, r, p, n: wire.encode(k, s, reason=r, peer=p, heard=n),
              st.sampled_from([wire.HEARTBEAT, wire.BYE]), st.integers(0, 3),
              st.text(max_size=30), st.integers(-1, 3), st.integers(-1, 1 << 62)))


@SETTINGS
@given(valid, st.data())
def test_mutated_valid_headers(frame: bytes, data: st.DataObject) -> None:
    """Valid headers decode; any byte flip, cut or splice of one is still
    either a sound Header or a BadMessageError."""
    assert wire.decode(frame, 4).src < 4
    buf = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        how = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if how == "flip" and buf:
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "cut":
            del buf[i:i + data.draw(st.integers(1, 8))]
        else:
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    _check(bytes(buf), data.draw(st.integers(1, 4)))


def test_hostile_shapes_and_sizes() -> None:
    """Named cases the generators may not reach: oversized, deep, huge, lying."""
    deep = b"\x91" * 5000 + b"\x00"
    cases = [
        b"", b"\x80", b"\xc1", deep, b"\x81\xa1k" + b"\x91" * 3000 + b"\x00",
        b"\x00" * (wire.MAX_HEADER + 1),
        msgpack.packb({"k": 0, "s": 0, "g": 0, "t": 0, "d": "<f8", "sh": [1 << 40] * 4,
                       "n": 8}),
        msgpack.packb({"k": 0, "s": 0, "g": 0, "t": 0, "d": "<f8",
                       "sh": [0] * (wire._MAX_DIMS + 1), "n": 0}),
        msgpack.packb({"k": 0, "s": 0, "g": 0, "t": 0, "d": "<f8", "sh": [2], "n": 15}),
        msgpack.packb({"k": 0, "s": 0, "g": 0, "t": 0, "d": "|O", "sh": [1], "n": 8}),
        msgpack.packb({"k": 0, "s": 0, "g": 0, "t": 0, "d": "f8,f8", "sh": [1], "n": 16}),
        msgpack.packb({"k": True, "s": 0}), msgpack.packb({"k": 2, "s": 1.0, "c": 1}),
        msgpack.packb({"k": 2, "s": 0, "c": -1}), msgpack.packb({"k": 4, "s": 0, "r": 5}),
        msgpack.packb({"k": 3, "s": 9}), msgpack.packb({1: 2}), msgpack.packb([3, 0]),
        msgpack.packb({"k": 3, "s": 0, "r": 7}), msgpack.packb({"k": 4, "s": 0, "p": 2}),
        msgpack.packb({"k": 1, "s": 0, "n": 1, "pad": "x" * wire.MAX_HEADER}),
        msgpack.packb({"k": 5, "s": 0, "h": -1}), msgpack.packb({"k": 5, "s": 0, "h": "3"}),
        msgpack.packb({"k": 5, "s": 0, "h": 1.0}), msgpack.packb({"k": 5, "s": 0, "h": 1 << 63}),
    ]
    for frame in cases:
        with pytest.raises(BadMessageError):
            wire.decode(frame, 2)
    assert wire.decode(msgpack.packb({"k": 3, "s": 1}), 2).src == 1


@SETTINGS
@given(valid, st.binary(max_size=64), st.data())
def test_one_frame_messages(header: bytes, payload: bytes, data: st.DataObject) -> None:
    """inline/split_inline round-trip; a cut, flipped or padded one-frame
    message splits into a header the decoder judges, or raises cleanly."""
    frame = wire.inline(header, payload)
    h, body = wire.split_inline(frame)
    assert h == header and bytes(body) == payload
    buf = bytearray(frame)
    how = data.draw(st.sampled_from(["flip", "cut", "pad"]))
    i = data.draw(st.integers(0, len(buf) - 1))
    if how == "flip":
        buf[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "cut":
        del buf[i:]
    else:
        buf[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        h, body = wire.split_inline(bytes(buf))
    except BadMessageError:
        return
    assert len(h) + len(body) + 3 == len(buf)
    _check(h, 4)


@pytest.mark.parametrize("kind", list(AbortKind))
def test_abort_kind_has_its_own_field(kind: AbortKind) -> None:
    """An abort's kind travels in field "e", not in the credit field."""
    frame = wire.encode(wire.ABORT, 1, 5, -3, reason="why", abort=kind, peer=0)
    assert msgpack.unpackb(frame)["e"] == kind and "c" not in msgpack.unpackb(frame)
    h = wire.decode(frame, 2)
    assert (h.abort, h.credit, h.reason, h.peer) == (kind, 0, "why", 0)
    with pytest.raises(BadMessageError):
        wire.decode(msgpack.packb({**msgpack.unpackb(frame), "e": len(AbortKind)}), 2)


def test_a_goodbye_says_how_many_of_its_addressees_messages_were_read() -> None:
    """A goodbye's field h: how many of the addressee's messages the leaving
    rank had read (absent: not said); a heartbeat carries none."""
    assert wire.decode(wire.encode(wire.BYE, 1, heard=7), 2).heard == 7
    assert wire.decode(wire.encode(wire.BYE, 1, reason="it failed", heard=0), 2).heard == 0
    assert wire.decode(wire.encode(wire.BYE, 1), 2).heard == -1
    assert "h" not in msgpack.unpackb(wire.encode(wire.HEARTBEAT, 1, heard=7))
    assert wire.decode(msgpack.packb({"k": wire.HEARTBEAT, "s": 1, "h": 7}), 2).heard == -1
