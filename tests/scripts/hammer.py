"""A foreign process for tests/test_mesh_bad_input.py: hammers a worker's socket
with garbage until told to stop (stdin closes) or SECONDS pass.

    hammer.py ENDPOINT SECRET WORLD_SIZE SECONDS

Strangers without the secret (refused at the handshake) and an insider with
the secret but no rank, who sends every kind of malformed message the
transport must drop: random frames, headers that are not msgpack, wrong
field types, oversized headers, payloads whose length does not fit dtype and
shape, unknown and spoofed source ranks, non-msgpack objects, control
messages with payloads. Prints how many messages it sent (after a first line, "started", once its sockets are up).
"""
import os
import random
import select
import sys
import time

import msgpack
import zmq

from mesh import auth, wire

ENDPOINT, SECRET, SIZE, SECONDS = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])


def _header(**h):
    return msgpack.packb(h)


def garbage(rng: random.Random) -> list:
    """One malformed message (frames after the routing id)."""
    k = rng.randrange(12)
    tag = -rng.randrange(1, 60) if rng.random() < 0.7 else rng.randrange(5)
    if k == 0:
        return [os.urandom(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 4))]
    if k == 1:
        return [b"\xc1" + os.urandom(8), os.urandom(16)]
    if k == 2:
        return [_header(k="0", s=[1], g=None, t=1.5, d=3, sh="x", n=-4)]
    if k == 3:
        return [_header(k=0, s=1, g=0, t=tag, d="<f8", sh=[4], n=32, pad="x" * 20000), b"x" * 32]
    if k == 4:   # payload shorter or longer than dtype x shape: never delivered
        n = rng.choice([8, 64, 4096, 1 << 20])
        body = b"\x7f" * (n + rng.choice([-8, -1, 1, 8, n]))
        return [wire.encode(wire.DATA, 1, 0, tag, dtype="<f8", shape=(n // 8,), nbytes=n), body]
    if k == 5:   # a rank that does not exist
        return [wire.encode(wire.DATA, SIZE + rng.randrange(5), 0, tag, dtype="<f8", shape=(1,),
                            nbytes=8), b"\x00" * 8]
    if k == 6:   # a real rank's number, from a connection that is not that rank
        return [wire.encode(wire.DATA, rng.randrange(SIZE), 0, tag, dtype="<f8", shape=(2,),
                            nbytes=16), b"\x00" * 16]
    if k == 7:
        return [wire.encode(wire.OBJ, 1, 0, tag, nbytes=5), b"\xc1\xc1\xc1\xc1\xc1"]
    if k == 8:
        return [wire.encode(wire.CREDIT, 1, credit=1 << 40), b"payload"]
    if k == 9:
        return [wire.encode(wire.ABORT, rng.randrange(SIZE), 0, tag, reason="bogus")]
    if k == 10:
        return [_header(k=0, s=1, g=0, t=tag, d="|O", sh=[1], n=8), b"\x00" * 8]
    return [_header(k=0, s=1, g=0, t=tag, d="<f8", sh=[1 << 40, 1 << 40], n=8), b"\x00" * 8]


def main() -> None:
    rng = random.Random()
    ctx = zmq.Context()
    socks = []
    for how in ("none", "wrong", "insider", "self", "rank1"):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 1000)
        if how == "wrong":
            auth.make_client(s, "not-" + SECRET, auth.curve_wanted())
        elif how != "none":
            auth.make_client(s, SECRET, auth.curve_wanted())
        # "self" claims the worker's own rank 0; "rank1" a rank already connected
        s.setsockopt(zmq.IDENTITY, {"self": b"0", "rank1": b"1"}.get(how, b"x"))
        s.connect(ENDPOINT)
        socks.append(s)
    print("started", flush=True)   # the test's ranks start their all_reduces only now
    sent = 0
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline and not select.select([sys.stdin], [], [], 0)[0]:
        for s in socks:
            try:
                s.send_multipart(garbage(rng), zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                pass
        time.sleep(0.0005)
    print(sent, flush=True)
    for s in socks:
        s.close()
    ctx.term()


if __name__ == "__main__":
    main()
