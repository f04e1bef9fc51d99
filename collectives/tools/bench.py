"""Collective benchmark, printed as nccl-tests prints it.

    python -m collectives.tools.bench --op all_reduce -n 4 --sizes 8:64M --compare gloo

launches its own n workers (``mesh.spawn``), times every size from 8 bytes to
64 MiB (doubling), and prints one row per size: bytes, element count, dtype,
time per call (the slowest rank's), algbw = bytes / time and busbw = algbw
times the collective's factor (2(n-1)/n for all_reduce, (n-1)/n for
all_gather, reduce_scatter, all_to_all, gather and scatter, 1 for broadcast
and reduce; scan and exscan, which nccl-tests lacks, as all_gather). With
``--compare gloo`` torch.distributed runs the same rows in
the same invocation and each row ends with gloo's time over ours.

With ``--device cuda`` the arrays are CuPy arrays (torch CUDA tensors on the
gloo side) and ``--path`` picks the device path: ``auto`` (CUDA IPC when the
ranks can use it, else staged), ``ipc`` (MESH_CUDA_IPC=1: fail if IPC cannot
be used), ``staged`` (MESH_CUDA_IPC=0: whole staging through the board on one
host, the overlapped ring across hosts), ``ring`` (the overlapped ring
forced, MESH_CUDA_OVERLAP=1 as well) or ``simple`` (every call staged whole
as small arrays are, MESH_CUDA_OVERLAP=0 as well).

``--redop`` picks the reducing collectives' op: a builtin one's name, or
``user``: ``collectives.Op(np.add, commute=True)``, a user-defined op
computing the sum (collectives.userop: what its own paths cost beside the
builtin op's).

With ``--poll`` (all_reduce) each call is made with ``async_op=True`` and
waited for by a loop polling its Work (``done()``; gloo's side
``is_completed()``), as code that overlaps its own Python work does.

As in nccl-tests, "size" is the whole buffer: the all_gather output, the
reduce_scatter input, the array scattered from the root.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from mesh.cliargs import nonnegative, positive

from ..ops import OPS
from ..plan import parse_size

__all__ = ["COLLECTIVES", "PATHS", "bus_factor", "parse_sizes", "input_count", "plan_rows",
           "path_env", "main"]

COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "reduce_scatter",
               "gather", "scatter", "all_to_all", "barrier", "scan", "exscan")


PATHS = {"auto": {}, "ipc": {"MESH_CUDA_IPC": "1"}, "staged": {"MESH_CUDA_IPC": "0"},
         "ring": {"MESH_CUDA_IPC": "0", "MESH_CUDA_OVERLAP": "1"},
         "simple": {"MESH_CUDA_IPC": "0", "MESH_CUDA_OVERLAP": "0"}}
"""--path: the environment the workers get, per device path."""


def path_env(path: str) -> dict[str, str]:
    """The workers' environment for ``--path`` (see PATHS)."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {', '.join(PATHS)}")
    return dict(PATHS[path])


def bus_factor(op: str, n: int) -> float:
    """busbw / algbw for ``op`` on n ranks, as nccl-tests defines it."""
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in ("broadcast", "reduce"):
        return 1.0
    if op == "barrier":
        return 0.0
    return (n - 1) / n


def parse_sizes(text: str, factor: int = 2) -> list[int]:
    """'8:64M' -> [8, 16, ..., 64 MiB]; 'a:b' steps by ``factor``; '1M' alone
    is one size; 'a,b,c' lists sizes."""
    if "," in text:
        sizes = [parse_size(s) for s in text.split(",") if s.strip()]
        if min(sizes, default=0) < 1:
            raise ValueError(f"bad size list {text!r}: sizes of at least 1 byte")
        return sizes
    lo, _, hi = text.partition(":")
    a = parse_size(lo)
    b = parse_size(hi) if hi else a
    if factor < 2:
        raise ValueError(f"a size range steps by a factor of at least 2, not {factor}")
    if a < 1 or b < a:
        raise ValueError(f"bad size range {text!r}: LO:HI with 1 <= LO <= HI, e.g. 8:64M")
    out = []
    while a <= b:
        out.append(a)
        a *= factor
    return out


def input_count(op: str, size: int, itemsize: int, n: int) -> int:
    """Elements of each rank's input array for a ``size``-byte row."""
    count = max(1, size // itemsize)
    if op in ("all_gather", "gather"):
        return max(1, count // n)
    if op in ("reduce_scatter", "scatter", "all_to_all"):
        return max(n, count - count % n)
    return count


def plan_rows(op: str, sizes: Sequence[int], itemsize: int, n: int,
              iters: int | None = None, warmup: int | None = None) -> list[tuple[int, int, int]]:
    """(input count, timed iterations, warm-up calls) per size: more
    iterations for small sizes, at least 5 timed calls for the largest."""
    rows = []
    for size in sizes:
        it = iters if iters is not None else max(5, min(200, (512 << 20) // max(size, 1)))
        wu = warmup if warmup is not None else 2 + it // 10
        rows.append((input_count(op, size, itemsize, n), it, wu))
    return rows


def _make(xp: Any, op: str, count: int, dtype: str, n: int, rank: int) -> Any:
    """The input array, zero-filled (sums stay finite call after call) and
    touched, so no row measures the kernel's shared zero page."""
    if op == "scatter" and rank != 0:
        return None
    shape = (n, count // n) if op in ("scatter", "reduce_scatter", "all_to_all") else (count,)
    a = xp.empty(shape, dtype=dtype)
    a.fill(0)
    return a


def polled(work: Any, done: str = "done") -> Any:
    """Wait for ``work`` by polling it (``--poll``): ``done()`` (torch's
    ``is_completed()``) in a loop, then its result."""
    look = getattr(work, done)
    while not look():
        pass
    return work.wait()


REDUCING = ("all_reduce", "reduce", "reduce_scatter", "scan", "exscan")


def _mesh_worker(world: Any, op: str, rows: list[tuple[int, int, int]], dtype: str,
                 device: str, poll: bool = False,
                 redop: str = "sum") -> list[tuple[float, float]]:
    """(seconds per call, MiB of peak memory beyond the input) per row; the
    memory figure is exact for the first row and a lower bound after it."""
    import resource

    import collectives as C

    xp: Any = np
    if device == "cuda":
        import cupy
        cupy.cuda.Device(world.rank % cupy.cuda.runtime.getDeviceCount()).use()
        xp = cupy
    fn = getattr(C, op)
    if op in REDUCING and redop != "sum":
        fn = functools.partial(fn, op=C.Op(np.add, commute=True, name="user sum")
                               if redop == "user" else redop)
    times = []
    for count, iters, warmup in rows:
        a = _make(xp, op, count, dtype, world.size, world.rank)
        call = (lambda: fn(world)) if op == "barrier" else \
            (lambda: polled(fn(world, a, async_op=True))) if poll else (lambda: fn(world, a))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(warmup):
            call()
        C.barrier(world)
        t0 = time.perf_counter()
        for _ in range(iters):
            call()
        if device == "cuda":
            xp.cuda.get_current_stream().synchronize()
        dt = (time.perf_counter() - t0) / iters
        extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        times.append((dt, extra))
    C.barrier(world)
    return times


def _slowest(per_rank: list[list[Any]], i: int) -> float | str:
    vals = [r[i] for r in per_rank]
    errs = [v for v in vals if isinstance(v, str)]
    return errs[0] if errs else max(vals)


def _fmt_side(size: int, t: float | str, factor: float) -> str:
    if isinstance(t, str):
        return f"{'n/a':>10} {'':>8} {'':>8}"
    algbw = size / t / 1e9
    return f"{t * 1e6:10.1f} {algbw:8.3f} {algbw * factor:8.3f}"


def _plot(path: str, op: str, n: int, sizes: list[int], sides: dict[str, list[Any]]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"# --plot: matplotlib is not installed, {path} not written", file=sys.stderr)
        return
    f = bus_factor(op, n)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ts in sides.items():
        pts = [(s, s / t / 1e9 * f) for s, t in zip(sizes, ts) if not isinstance(t, str)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title(f"{op}, {n} ranks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"# plot written to {path}")


def _best(a: list[Any], b: list[Any]) -> list[Any]:
    """Row by row, the faster of two trials (an error row loses)."""
    return [x if isinstance(y, str) or (not isinstance(x, str) and x <= y) else y
            for x, y in zip(a, b)]


def _measure(args: argparse.Namespace, rows: list[tuple[int, int, int]]
             ) -> tuple[dict[str, list[Any]], list[float]]:
    """Per side, seconds per call by row (best of the trials, sides
    alternating), and meshrun's peak extra memory by row."""
    n = args.nprocs
    want_gloo = args.compare == "gloo" or args.only == "gloo"
    if want_gloo and args.redop != "sum" and args.op in REDUCING:
        print(f"# --compare gloo: gloo's side reduces by sum only, not {args.redop}; skipped",
              file=sys.stderr)
        want_gloo = False
    if want_gloo:
        from .bench_gloo import available, run_gloo
        if not available():
            print("# --compare gloo: torch with gloo is not installed; skipped", file=sys.stderr)
            want_gloo = False
    sides: dict[str, list[Any]] = {}
    memory: list[float] = []
    for _ in range(args.trials):
        if args.only != "gloo":
            import mesh
            per_rank = mesh.spawn(_mesh_worker, n, args.op, rows, args.dtype, args.device,
                                  args.poll, args.redop, timeout=3600,
                                  env=path_env(args.path))
            ts = [_slowest([[t for t, _ in r] for r in per_rank], i) for i in range(len(rows))]
            sides["meshrun"] = _best(sides.get("meshrun", ts), ts)
            memory = [max(r[i][1] for r in per_rank) for i in range(len(rows))]
        if want_gloo:
            per_rank = run_gloo(args.op, n, rows, args.dtype, args.device, poll=args.poll)
            ts = [_slowest(per_rank, i) for i in range(len(rows))]
            sides["gloo"] = _best(sides.get("gloo", ts), ts)
    return sides, memory


def _print_table(args: argparse.Namespace, sizes: list[int], rows: list[tuple[int, int, int]],
                 sides: dict[str, list[Any]], memory: list[float]) -> None:
    f = bus_factor(args.op, args.nprocs)
    head = f"# {'size':>10} {'count':>10} {'type':>8} {'redop':>5}"
    unit = f"# {'(B)':>10} {'(elems)':>10} {'':>8} {'':>5}"
    for name in sides:
        head += f" | {name + ' time':>10} {'algbw':>8} {'busbw':>8}"
        unit += f" | {'(us)':>10} {'(GB/s)':>8} {'(GB/s)':>8}"
    if len(sides) == 2:
        head += f" | {'ratio':>6}"
        unit += f" | {'(x)':>6}"
    if args.memory:
        head += f" | {'extra mem':>9}"
        unit += f" | {'(MiB)':>9}"
    print(head)
    print(unit)
    redop = args.redop if args.op in REDUCING else "none"
    for i, size in enumerate(sizes):
        line = f"  {size:>10} {rows[i][0]:>10} {args.dtype:>8} {redop:>5}"
        for ts in sides.values():
            line += " | " + _fmt_side(size, ts[i], f)
        if len(sides) == 2:
            a, b = sides["meshrun"][i], sides["gloo"][i]
            ok = not isinstance(a, str) and not isinstance(b, str)
            line += f" | {b / a:6.2f}" if ok else f" | {'n/a':>6}"
        if args.memory and memory:
            line += f" | {memory[i]:9.1f}"
        print(line, flush=True)
    for name, ts in sides.items():
        for t in ts:
            if isinstance(t, str):
                print(f"# {name}: {t}")
                break




def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m collectives.tools.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", default="all_reduce", choices=COLLECTIVES)
    ap.add_argument("--redop", default="sum", choices=OPS + ("user",),
                    help="the reducing collectives' op; user: collectives.Op(np.add)")
    ap.add_argument("-n", "--nprocs", type=positive, default=2)
    ap.add_argument("--sizes", default="8:64M", help="lo:hi (doubling), or a,b,c; K M G suffixes")
    ap.add_argument("--factor", type=positive, default=2, help="step between sizes of a range")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--iters", type=positive, default=None, help="timed calls per size")
    ap.add_argument("--warmup", type=nonnegative, default=None, help="untimed calls per size")
    ap.add_argument("--trials", type=positive, default=1,
                    help="alternate the sides this many times, keep each row's best")
    ap.add_argument("--compare", choices=("gloo",), default=None)
    ap.add_argument("--only", choices=("meshrun", "gloo"), default=None,
                    help="run one side only (e.g. to measure the gloo anchors)")
    ap.add_argument("--plot", default=None, help="write busbw vs size to this PNG")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--path", choices=tuple(PATHS), default="auto",
                    help="device path with --device cuda (auto, ipc, staged, ring, simple)")
    ap.add_argument("--memory", action="store_true",
                    help="also print meshrun's peak memory beyond the input, worst rank "
                         "(exact for the first size only: run one size)")
    ap.add_argument("--poll", action="store_true",
                    help="all_reduce with async_op=True, waited for by polling its Work")
    args = ap.parse_args(argv)
    if args.poll and args.op != "all_reduce":
        ap.error("--poll: all_reduce only")
    if args.op in ("scan", "exscan") and "gloo" in (args.compare, args.only):
        ap.error(f"--op {args.op}: gloo has none (--only meshrun)")
    try:
        itemsize = np.dtype(args.dtype).itemsize
        sizes = [0] if args.op == "barrier" else parse_sizes(args.sizes, args.factor)
    except (TypeError, ValueError) as e:
        ap.error(str(e))

    if args.device == "cuda":
        try:
            import cupy  # noqa: F401
        except ImportError:
            print("# --device cuda needs CuPy: pip install 'meshrun[gpu]'", file=sys.stderr)
            return 2
    rows = plan_rows(args.op, sizes, itemsize, args.nprocs, args.iters,
                     args.warmup)
    where = args.device + (f" ({args.path} path)" if args.device == "cuda" else "")
    where += ", each call polled" if args.poll else ""
    print(f"# collectives.bench: {args.op}, {args.nprocs} ranks, {args.dtype}, {where}, "
          f"best of {args.trials}, pid {os.getpid()}")
    sides, memory = _measure(args, rows)
    _print_table(args, sizes, rows, sides, memory)
    if args.plot:
        _plot(args.plot, args.op, args.nprocs, sizes, sides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
