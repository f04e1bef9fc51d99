"""A worker for tests/test_mesh_netns.py: point-to-point across the hosts.
World rank 0 sends one large array to world rank 2 (the other host) and
rank 2 sends one to rank 0, each checked; the peers must stay alive however
long one message takes to cross (the test slows the link and shortens
MESH_PEER_TIMEOUT); then a small exchange and a barrier. With BENCH set,
also the bandwidth of 64 MiB sends from rank 0 to rank 2 (ping-pong of a
64 MiB array and an 8-byte answer). With PROBE set, instead: rank 0 sends
the array to rank 2 with timeout=2 while rank 2 waits in its receive; the
send times out (the link is slow), its error is reported, and the rest of
the message still arrives whole. With PROBE=2: rank 0 sends the array (not
in pieces: NBYTES at most 8 MiB) to rank 2 while rank 1 (rank 0's own host)
waits for a message from rank 0 that never comes; rank 1's timeout is
reported. Ranks 0 and 2 wait for their streams to each other (mesh.streams)
to open first, and report how many arrays went and came by them. Writes
OUTDIR/<rank>.json.

    netns_p2p_job.py NBYTES OUTDIR
"""
import json
import os
import sys
import time

import numpy as np

import collectives
import mesh


def main(outdir: str, nbytes: int) -> None:
    report: dict = {}
    with mesh.init(timeout=120) as world:
        r = world.rank
        report["endpoints"] = world._t.endpoints
        streams = world._t.streams
        if streams.on and r in (0, 2):     # (a large array sent before goes through ZeroMQ)
            deadline = time.monotonic() + 10
            while not streams.usable(2 - r, 1 << 40) and time.monotonic() < deadline:
                time.sleep(0.01)
        collectives.barrier(world)
        t = time.monotonic()
        if os.environ.get("PROBE") == "2":
            a = np.arange(nbytes // 4, dtype=np.float32)
            if r == 0:
                world.send(a, 2, tag=4)
            elif r == 1:
                try:
                    world.recv(0, tag=4, timeout=2)
                except mesh.MeshError as e:
                    report["error"] = str(e)
            elif r == 2:
                assert np.array_equal(world.recv(0, tag=4), a)
        elif os.environ.get("PROBE") and r in (0, 2):
            if r == 0:
                a = np.arange(nbytes // 4, dtype=np.float32)
                try:
                    world.send(a, 2, tag=4, timeout=2)
                except mesh.MeshError as e:
                    report["error"] = str(e)
            else:       # (into its receive at once: making 100 MiB first took >1 s loaded)
                got = world.recv(0, tag=4)
                assert np.array_equal(got, np.arange(nbytes // 4, dtype=np.float32))
        elif r in (0, 2):
            peer = 2 - r
            a = np.arange(nbytes // 4, dtype=np.float32) + r
            req = world.isend(a, peer, tag=5)
            out = np.empty_like(a) if r == 2 else None      # into out=, and a fresh array
            b = world.recv(peer, tag=5, out=out)
            req.wait()
            assert np.array_equal(b, np.arange(nbytes // 4, dtype=np.float32) + peer), b[:4]
            assert out is None or b is out
            report["big"] = time.monotonic() - t
            world.send({"small": r}, peer, tag=6)
            assert world.recv(peer, tag=6) == {"small": peer}
        if os.environ.get("BENCH") and r in (0, 2):
            a = np.ones(64 << 18, np.float32)
            ans = np.zeros(1)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                if r == 0:
                    world.send(a, 2, tag=7)
                    world.recv(2, tag=8, out=ans)
                else:
                    world.recv(0, tag=7, out=a)
                    world.send(ans, 0, tag=8)
                times.append(time.perf_counter() - t)
            report["bench_gbs"] = (64 << 20) / min(times[1:]) / 1e9
        collectives.barrier(world)
        report["rank"] = r
        report["streams"] = [streams.sent, streams.got]
    with open(os.path.join(outdir, f"{r}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[2], int(sys.argv[1]))
