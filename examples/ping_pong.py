"""Ping-pong between two workers: the smallest meshrun program.

    meshrun -n 2 examples/ping_pong.py [--rounds 1000] [--bytes 8]   (the defaults)

Rank 0 sends an array, rank 1 sends it back; rank 0 reports round-trip time
and bandwidth. Any even number of ranks works: pairs (0,1), (2,3), ...
"""
import argparse
import time

import numpy as np

import mesh


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--bytes", type=int, default=8)
    args = ap.parse_args()
    if args.rounds < 1:     # (0 ended in a ZeroDivisionError's traceback on every pair)
        ap.error(f"--rounds {args.rounds}: at least 1")

    with mesh.init() as world:
        if world.size % 2:
            raise SystemExit("ping_pong needs an even number of ranks")
        peer = world.rank ^ 1
        buf = np.zeros(max(args.bytes, 1), np.uint8)
        start = time.perf_counter()
        for _ in range(args.rounds):
            if world.rank % 2 == 0:
                world.send(buf, peer)
                world.recv(peer, out=buf)
            else:
                world.recv(peer, out=buf)
                world.send(buf, peer)
        elapsed = time.perf_counter() - start
        if world.rank % 2 == 0:
            rtt = elapsed / args.rounds
            print(f"rank {world.rank} <-> {peer}: {args.rounds} round trips of {buf.nbytes} B, "
                  f"{rtt * 1e6:.1f} us each, {2 * buf.nbytes / rtt / 1e9:.3f} GB/s")


if __name__ == "__main__":
    main()
