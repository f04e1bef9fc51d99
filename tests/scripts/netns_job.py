"""A worker for tests/test_mesh_netns.py, run by meshrun inside a network
namespace ("host"): it records where it lives and what it connected to,
checks collectives against numpy (hierarchical across the hosts, the flat
ring forced, and a user op), times a cross-host round trip, and writes
OUTDIR/<rank>.json. (netns_torch_job.py runs it too, under torchrun.) With
CUT set, the ranks then all-reduce until the link between the hosts is cut
(and fail: a lost peer).

    netns_job.py OUTDIR
"""
import json
import os
import sys
import time

import numpy as np

import collectives
import mesh
from mesh.auth import curve_wanted
from collectives.host import stream
from collectives.host.hier import topology_of
from mesh.env import host_id


def main(outdir: str) -> None:
    with mesh.init(timeout=60) as world:
        n, r = world.size, world.rank
        checked = 0
        for size in (1, 1000, 300_000, 2 << 20):
            a = np.arange(size, dtype=np.float32) + r
            collectives.all_reduce(world, a)
            assert np.array_equal(a, n * np.arange(size, dtype=np.float32) + n * (n - 1) / 2)
            g = collectives.all_gather(world, np.full(size % 1000 + 1, r, np.int64))
            assert np.array_equal(g[:, 0], np.arange(n))
            b = np.full(size, r, np.int32)
            collectives.broadcast(world, b, root=n - 1)
            assert np.all(b == n - 1)
            rows = np.tile(np.arange(size % 1000 + 1, dtype=np.float64), (n, 1)) * (r + 1)
            mine = collectives.reduce_scatter(world, rows)
            assert np.array_equal(mine[0], rows[0] / (r + 1) * n * (n + 1) / 2)
            flat = np.arange(size, dtype=np.float32) + r
            collectives.all_reduce(world, flat, algorithm="ring")   # the flat ring, forced
            assert np.array_equal(flat, a)
            checked += 3
        # a user op across the hosts (collectives.userop: flat, over sockets), in rank
        # order: a 2x2 matrix product a row
        mat = collectives.Op(lambda x, y: (x.reshape(-1, 2, 2) @ y.reshape(-1, 2, 2))
                             .reshape(x.shape), name="mat")
        mats = [np.arange(8.0).reshape(2, 4) % (p + 2) - p for p in range(n)]
        prods = [mats[0]]
        for p in range(1, n):
            prods.append((prods[-1].reshape(-1, 2, 2) @ mats[p].reshape(-1, 2, 2)).reshape(2, 4))
        assert np.array_equal(collectives.all_reduce(world, mats[r].copy(), op=mat), prods[-1])
        assert np.array_equal(collectives.scan(world, mats[r], op=mat), prods[r])
        # a round trip between rank 0 and the first rank of the other host
        other = world.hosts.index(next(h for h in world.hosts if h != world.hosts[0]))
        rtt = None
        if r in (0, other):
            peer = other if r == 0 else 0
            for _ in range(3):
                t = time.perf_counter()
                if r == 0:
                    world.send(np.zeros(1), peer)
                    world.recv(peer)
                else:
                    world.send(world.recv(peer), peer)
                rtt = time.perf_counter() - t
        collectives.barrier(world)
        topo = topology_of(world)     # 2 ranks on each host: the hierarchical layout
        out = {"hier": None if topo is None else [list(h) for h in topo.hosts],"rank": r, "host": host_id(), "hosts": world.hosts, "endpoints": world.endpoints,
               "checked": checked, "rtt": rtt, "netns": os.readlink("/proc/self/ns/net"),
               "curve": curve_wanted(), "streams": stream.stats["links"]}
        with open(os.path.join(outdir, f"{r}.json"), "w") as f:
            json.dump(out, f)
        while os.environ.get("CUT"):      # (256 KiB: in two levels, a phase a host)
            collectives.all_reduce(world, np.ones(1 << 16, np.float32))
            time.sleep(0.01)


if __name__ == "__main__":
    main(sys.argv[1])
