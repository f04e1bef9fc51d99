"""Soak: thousands of random-size collectives and point-to-point messages on
N ranks, every result checked, memory sampled as it goes.

    python -m collectives.tools.soak [-n 4] [--ops 4000] [--max-bytes 4M] [--seed 1]

Every rank draws the same sequence of operations from one seed: which
collective (all_reduce sum/max/min, async all_reduce overlapped with
point-to-point, broadcast, reduce, all_gather, reduce_scatter, all_to_all,
gather, scatter, barrier, object broadcast) or point-to-point round (each
rank to rank + k, arrays and objects, with and without ``out=``), on which
group (the world or a sub-group), with which dtype and a log-uniform size
from 1 element to ``--max-bytes``. Inputs are built so that the expected
result is known without the peers' data (rank r holds ``base + r``), and
every element is compared. RSS is sampled after a warm-up and then every
5% of the run; buffers of random sizes make it swing, so "flat" means the
second half of the run peaks no higher than the first (plus --rss-slack).

Exits non-zero on any mismatch, error, or RSS growth beyond --rss-slack.
Not part of the test suite (it runs for minutes). It drives collectives, so
unlike the rest of mesh it imports them (lazily, inside the workers).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

from mesh.cliargs import checked, positive
from mesh.peer import parse_size
from mesh import spawn

__all__ = ["main", "soak_worker"]

_DTYPES = [np.float32, np.float64, np.int32, np.int64, np.uint8, np.float16]
_OPS = ["all_reduce", "all_reduce", "all_reduce_async", "broadcast", "reduce", "all_gather",
        "reduce_scatter", "all_to_all", "gather", "scatter", "barrier", "object",
        "p2p", "p2p", "p2p"]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _base(i: int, count: int, dtype: Any) -> np.ndarray:
    """Operation i's common base: small integers, exact in every dtype."""
    return ((np.arange(count, dtype=np.int64) * (i % 13 + 1)) % 89).astype(dtype)


class _Checker:
    def __init__(self) -> None:
        self.mismatches = 0
        self.first: list[str] = []

    def same(self, what: str, got: Any, want: Any) -> None:
        g, w = np.asarray(got), np.asarray(want)
        if g.shape != w.shape or not np.array_equal(g.astype(np.float64), w.astype(np.float64)):
            self.mismatches += 1
            if len(self.first) < 5:
                self.first.append(f"{what}: got {g.ravel()[:4]}... want {w.ravel()[:4]}...")


def _one(i: int, kind: str, g: Any, dtype: Any, count: int, shift: int, chk: _Checker) -> int:
    """Run operation i on group g (this rank is a member); returns bytes handed in."""
    import collectives

    n, r = g.size, g.rank
    base = _base(i, count, dtype)
    mine = base + np.asarray(r, dtype=dtype)
    tri = n * (n - 1) // 2
    if kind in ("all_reduce", "all_reduce_async"):
        op = ["sum", "max", "min"][i % 3]
        a = mine.copy()
        want = {"sum": (base.astype(np.int64) * n + tri).astype(dtype),
                "max": base + np.asarray(n - 1, dtype=dtype), "min": base}[op]
        if kind == "all_reduce":
            collectives.all_reduce(g, a, op=op)
        else:
            work = collectives.all_reduce(g, a, op=op, async_op=True)
            _p2p(i, g, np.float64, max(1, count // 4), shift, chk)
            work.wait()
        chk.same(f"#{i} {kind} {op} {dtype.__name__}[{count}] on {g.name}", a, want)
    elif kind == "broadcast":
        root = i % n
        a = mine.copy()
        collectives.broadcast(g, a, root=root)
        chk.same(f"#{i} broadcast", a, base + np.asarray(root, dtype=dtype))
    elif kind == "reduce":
        root = (i + 1) % n
        a = mine.copy()
        collectives.reduce(g, a, root=root)
        want = (base.astype(np.int64) * n + tri).astype(dtype) if r == root else mine
        chk.same(f"#{i} reduce", a, want)
    elif kind == "all_gather":
        got = collectives.all_gather(g, mine)
        chk.same(f"#{i} all_gather", got, np.stack([base + np.asarray(k, dtype=dtype)
                                                      for k in range(n)]))
    elif kind in ("reduce_scatter", "all_to_all"):
        m = max(1, count // n)
        base = _base(i, m * n, dtype)
        mine = base + np.asarray(r, dtype=dtype)
        if kind == "reduce_scatter":
            got = collectives.reduce_scatter(g, mine)
            want = (base.astype(np.int64) * n + tri).astype(dtype)[r * m:(r + 1) * m]
        else:
            got = collectives.all_to_all(g, mine)
            want = np.concatenate([base[r * m:(r + 1) * m] + np.asarray(k, dtype=dtype)
                                   for k in range(n)])
        chk.same(f"#{i} {kind}", got, want)
    elif kind == "gather":
        root = i % n
        got = collectives.gather(g, mine, root=root)
        if r == root:
            chk.same(f"#{i} gather", got, np.stack([base + np.asarray(k, dtype=dtype)
                                                      for k in range(n)]))
    elif kind == "scatter":
        root = (i + 2) % n
        rows = np.stack([base + np.asarray(k, dtype=dtype) for k in range(n)]) \
            if r == root else None
        chk.same(f"#{i} scatter", collectives.scatter(g, rows, root=root), mine)
    elif kind == "barrier":
        collectives.barrier(g)
    elif kind == "object":
        root = i % n
        obj = {"i": i, "root": root, "blob": bytes(range(i % 200))} if r == root else None
        got = collectives.broadcast_object(g, obj, root=root)
        chk.same(f"#{i} broadcast_object", [got["i"], got["root"], len(got["blob"])],
                 [i, root, i % 200])
    elif kind == "p2p":
        return _p2p(i, g, dtype, count, shift, chk)
    return int(mine.nbytes)


def _p2p(i: int, g: Any, dtype: Any, count: int, shift: int, chk: _Checker) -> int:
    """Every rank sends to rank + k and receives from rank - k (k drawn
    alike everywhere): an array (into ``out=`` on odd rounds) and an object."""
    n, r = g.size, g.rank
    if n == 1:
        return 0
    k = shift % (n - 1) + 1
    tag = i % 1000
    base = _base(i, count, dtype)
    src, dst = (r - k) % n, (r + k) % n
    out = np.empty(count, dtype) if i % 2 else None
    rx, ro = g.irecv(src, tag=tag, out=out), g.irecv(src, tag=tag + 1000)
    sx = g.isend(base + np.asarray(r, dtype=dtype), dst, tag=tag)
    so = g.isend({"i": i, "src": r}, dst, tag=tag + 1000)
    got = rx.wait()
    chk.same(f"#{i} p2p {dtype.__name__}[{count}] from {src} on {g.name}", got,
             base + np.asarray(src, dtype=dtype))
    if out is not None and got is not out:
        chk.same(f"#{i} p2p out=", 0, 1)
    chk.same(f"#{i} p2p object", [ro.wait()["src"]], [src])
    sx.wait()
    so.wait()
    return int(base.nbytes)


def soak_worker(world: Any, ops: int, max_bytes: int, seed: int, trace: bool = False) -> dict:
    """One rank's share of the soak; every rank draws the same operations."""
    import tracemalloc

    import collectives

    if trace:
        tracemalloc.start(8)
    snap = None

    rng = np.random.default_rng(seed)
    n = world.size
    groups = [world, world.group(list(range(0, n, 2))), world.group([n - 1, 0]),
              world.group(list(range(n)))]
    chk = _Checker()
    warm = max(1, ops // 20)
    samples: list[tuple[int, int]] = []
    moved = counted = 0
    t0 = time.perf_counter()
    for i in range(ops):
        kind = _OPS[int(rng.integers(len(_OPS)))]
        gi = int(rng.choice(len(groups), p=[0.55, 0.15, 0.1, 0.2]))
        dtype = _DTYPES[int(rng.integers(len(_DTYPES)))]
        itemsize = np.dtype(dtype).itemsize
        count = max(1, int(np.exp(rng.uniform(0, np.log(max_bytes / itemsize)))))
        shift = int(rng.integers(1 << 30))
        g = groups[gi]
        if g is not None:
            moved += _one(i, kind, g, dtype, count, shift, chk)
            counted += 1
        if i + 1 == warm or (i + 1) % max(1, ops // 20) == 0 or i + 1 == ops:
            collectives.barrier(world)
            samples.append((i + 1, _rss()))
            if trace and i + 1 == warm:
                snap = tracemalloc.take_snapshot()
    growth = []
    if snap is not None:
        diff = tracemalloc.take_snapshot().compare_to(snap, "traceback")
        growth = [f"{d.size_diff / 2**10:+.0f} KiB in {d.count_diff:+d} blocks at "
                  + " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}"
                                for f in d.traceback[:4]) for d in diff[:5]]
    return {"growth": growth, "rank": world.rank, "ops": counted, "mismatches": chk.mismatches,
            "first": chk.first, "bytes": moved, "seconds": time.perf_counter() - t0,
            "rss": samples, "bad_messages": world.bad_messages}


def main(argv: list[str] | None = None) -> int:
    # the docstring's first paragraph, whole: its first line stops mid-sentence
    ap = argparse.ArgumentParser(prog="python -m collectives.tools.soak",
                                 description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("-n", type=positive, default=4, help="ranks (default 4)")
    ap.add_argument("--ops", type=positive, default=4000, help="operations (default 4000)")
    ap.add_argument("--max-bytes", default="4M", type=checked(parse_size),
                    help="largest message (default 4M)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rss-slack", default="32M", type=checked(parse_size),
                    help="how much higher a rank's RSS may peak in the second half of the run "
                         "than in the first (default 32M): a leak grows, churn does not")
    ap.add_argument("--json", metavar="PATH", help="also write the per-rank results here")
    ap.add_argument("--trace-malloc", action="store_true",
                    help="report where Python allocations grew from warm-up to end")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = spawn(soak_worker, args.n, args.ops, args.max_bytes, args.seed,
                args.trace_malloc, timeout=24 * 3600)
    wall = time.perf_counter() - t0
    slack = args.rss_slack
    print(f"# meshrun soak: {args.n} ranks, {args.ops} operations (seed {args.seed}, up to "
          f"{args.max_bytes}), {wall:.0f} s, {os.cpu_count()} cores")
    print(f"{'rank':>4} {'ops':>6} {'mismatch':>8} {'GB in':>7} {'RSS warm MiB':>12} "
          f"{'RSS end MiB':>11} {'peak 1st half':>13} {'peak 2nd half':>13}")
    ok = True
    for r in res:
        rss = [s for _, s in r["rss"]]
        half = len(rss) // 2
        first, second = max(rss[:half] or rss), max(rss[half:])
        ok = ok and r["mismatches"] == 0 and second - first <= slack
        print(f"{r['rank']:>4} {r['ops']:>6} {r['mismatches']:>8} {r['bytes'] / 1e9:7.2f} "
              f"{rss[0] / 2**20:12.1f} {rss[-1] / 2**20:11.1f} {first / 2**20:13.1f} "
              f"{second / 2**20:13.1f}")
        for line in r["first"] + r["growth"]:
            print(f"     {line}")
    total = sum(r["ops"] for r in res)
    print(f"total: {total} rank-operations, {sum(r['mismatches'] for r in res)} mismatches, "
          f"RSS samples per rank (MiB): "
          + "; ".join(" ".join(f"{s / 2**20:.0f}" for _, s in r["rss"]) for r in res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "wall": wall, "ranks": res}, f)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
