"""Peak memory of one collective call, meshrun beside gloo and mpi4py.

    python -m collectives.tools.bench_memory -n 2,4 --sizes 64M,256M

For every rank count, size, operation and framework a fresh job (one
operation per job, so one call's high-water mark cannot hide another's)
runs, on each rank: a small warm-up call, then twice: the operands
allocated and touched, a barrier, the kernel's RSS high-water mark reset
(``echo 5 > /proc/self/clear_refs``), the call, and VmHWM read back from
/proc/self/status. A call's extra copies are

    (VmHWM - VmRSS before - the result it returned and the caller did not
     preallocate) / size

so 0 means the call worked in the caller's buffers, 1 that it held one more
buffer of the input's size at its peak. "size" is each rank's input (all
ops, float32): all_gather returns n times it, reduce_scatter 1/n of it,
sendrecv sends it from rank 0 to rank 1 (other ranks idle).

Frameworks (``--frameworks``):

    meshrun   meshrun's own API on numpy arrays (``collectives.all_reduce``,
              ... and ``Comm.send``/``recv``; all_gather, reduce_scatter,
              all_to_all and recv return new arrays), ranks by mesh.spawn
    torch     ``torch.distributed`` on the "meshrun" backend (CPU tensors,
              outputs preallocated), ranks by mesh.spawn
    gloo      ``torch.distributed`` on gloo, the same calls, fresh processes
              meeting at a file (bench_gloo.run_workers)
    mpi       mpi4py on the local MPI (``Allreduce(IN_PLACE)``, ``Bcast``,
              ``Allgather``, ``Reduce_scatter_block``, ``Alltoall``,
              ``Send``/``Recv``, outputs preallocated), by mpirun; skipped,
              saying why, when mpi4py or mpirun is missing

Each cell is "first/second" call, the worst rank; the ratios (torch/gloo:
the two torch.distributed backends; meshrun/mpi: the two numpy APIs) take
the larger of the two calls. Before each size the machine's MemAvailable is
checked against a generous estimate of the jobs' needs; a size that would
not fit is skipped, saying so. Shared memory seen while a call ran (the
rank's RssShmem, and the growth of /dev/shm) is listed under the table
where it reached 5% of the size. Linux only (/proc).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import traceback
import warnings
from typing import Any, Callable, Sequence

from mesh.cliargs import (checked, names_in, positive, positive_float, positive_list,
                          size_text)

from .bench import parse_sizes

__all__ = ["OPS", "FRAMEWORKS", "main"]

OPS = ("all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all", "sendrecv")
FRAMEWORKS = ("meshrun", "torch", "gloo", "mpi")
_ITEM = 4                   # float32
_RANK_OVERHEAD = 400 << 20  # an interpreter with torch, per rank (the fit check)


def _status(key: str) -> int:
    """A /proc/self/status field in bytes."""
    with open("/proc/self/status") as f:
        m = re.search(key + r":\s+(\d+)", f.read())
    return int(m.group(1)) << 10 if m else 0


def _devshm() -> int:
    s = os.statvfs("/dev/shm")
    return (s.f_blocks - s.f_bfree) * s.f_frsize


class _Sampler(threading.Thread):
    """The most RssShmem, and /dev/shm's most growth, while a call runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.done = threading.Event()
        self.shm = 0
        self.devshm0 = _devshm()
        self.devshm = 0

    def run(self) -> None:
        while not self.done.is_set():
            self.shm = max(self.shm, _status("RssShmem"))
            self.devshm = max(self.devshm, _devshm() - self.devshm0)
            self.done.wait(0.002)


def _out_count(op: str, count: int, n: int) -> int:
    if op == "all_gather":
        return count * n
    if op == "reduce_scatter":
        return count // n
    return count


def _count(size: int, n: int) -> int:
    """Elements of each rank's input: a multiple of n (reduce_scatter and
    all_to_all split it)."""
    count = max(n, size // _ITEM)
    return count - count % n


def _measure(count: int, n: int, calls: int, make: Callable[[int, float], Any],
             prealloc: Callable[[int], Any], call: Callable[[Any, Any], Any],
             barrier: Callable[[], Any]) -> dict[str, Any]:
    """On one rank: a warm-up call, then ``calls`` measured ones (see the
    module's doc). Extra copies per call, and the shared memory seen."""
    small = _count(min(count * _ITEM, 1 << 20), n)
    call(make(small, 1.0), prealloc(small))
    barrier()
    extra, shm, devshm = [], 0, 0
    for _ in range(calls):
        a, out = make(count, 1.0), prealloc(count)
        barrier()
        sampler = _Sampler()
        sampler.start()
        base = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        r = call(a, out)
        sampler.done.set()
        sampler.join()
        peak = _status("VmHWM")
        returned = 0
        if r is not None and out is None and r is not a:
            returned = r.nbytes if hasattr(r, "nbytes") else r.numel() * r.element_size()
        extra.append((peak - base - returned) / (count * _ITEM))
        shm, devshm = max(shm, sampler.shm), max(devshm, sampler.devshm)
        del a, out, r
        barrier()
    return {"extra": extra, "shm": shm, "devshm": devshm}


def _numpy_make(count: int, fill: float) -> Any:
    import numpy as np

    a = np.empty(count, np.float32)
    a.fill(fill)            # touched: no call measures the shared zero page
    return a


def _torch_make(count: int, fill: float) -> Any:
    import torch

    t = torch.empty(count, dtype=torch.float32)
    t.fill_(fill)
    return t


def _mesh_worker(world: Any, op: str, count: int, calls: int) -> dict[str, Any]:
    """meshrun's own API on numpy arrays (results it returns are new arrays)."""
    import collectives as C

    rank, n = world.rank, world.size

    def call(a: Any, out: Any) -> Any:
        if op == "sendrecv":
            if rank == 0:
                world.send(a, 1)
            return world.recv(0) if rank == 1 else None
        if op in ("all_reduce", "broadcast"):
            getattr(C, op)(world, a)
            return a
        return getattr(C, op)(world, a)
    return _measure(count, n, calls, _numpy_make, lambda c: None, call,
                    lambda: C.barrier(world))


def _dist_call(op: str, rank: int) -> Callable[[Any, Any], Any]:
    """The torch.distributed call of ``op`` on (input, preallocated output)."""
    import torch.distributed as dist

    def call(a: Any, out: Any) -> Any:
        if op == "all_reduce":
            dist.all_reduce(a)
        elif op == "broadcast":
            dist.broadcast(a, 0)
        elif op == "all_gather":
            dist.all_gather_into_tensor(out, a)
        elif op == "reduce_scatter":
            dist.reduce_scatter_tensor(out, a)
        elif op == "all_to_all":
            dist.all_to_all_single(out, a)
        elif rank == 0:
            dist.send(a, 1)
        elif rank == 1:
            dist.recv(out, 0)
        return out
    return call


def _dist_measure(op: str, count: int, calls: int) -> dict[str, Any]:
    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning)   # all_gather_into_tensor's
    rank, n = dist.get_rank(), dist.get_world_size()

    def prealloc(c: int) -> Any:
        if op in ("all_reduce", "broadcast") or (op == "sendrecv" and rank != 1):
            return None
        return _torch_make(_out_count(op, c, n), 0.0)
    return _measure(count, n, calls, _torch_make, prealloc, _dist_call(op, rank),
                    dist.barrier)


def _torch_worker(world: Any, op: str, count: int, calls: int) -> dict[str, Any]:
    """torch.distributed on the "meshrun" backend, ranks by mesh.spawn."""
    import torch
    import torch.distributed as dist

    import collectives.torchdist  # noqa: F401  registers "meshrun"

    torch.set_num_threads(1)
    dist.init_process_group("meshrun")
    try:
        return _dist_measure(op, count, calls)
    finally:
        dist.destroy_process_group()


def _gloo_worker(rank: int, n: int, init_file: str, op: str, count: int, calls: int,
                 conn: Any) -> None:
    """torch.distributed on gloo (bench_gloo.run_workers' protocol)."""
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=n)
        try:
            res = _dist_measure(op, count, calls)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        conn.send((True, res))
    except BaseException:
        conn.send((False, traceback.format_exc()))


def _mpi_worker(op: str, count: int, calls: int) -> None:
    """One rank under mpirun; rank 0 prints every rank's figures."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()

    def call(a: Any, out: Any) -> Any:
        if op == "all_reduce":
            comm.Allreduce(MPI.IN_PLACE, a)
        elif op == "broadcast":
            comm.Bcast(a, 0)
        elif op == "all_gather":
            comm.Allgather(a, out)
        elif op == "reduce_scatter":
            comm.Reduce_scatter_block(a, out)
        elif op == "all_to_all":
            comm.Alltoall(a, out)
        elif rank == 0:
            comm.Send(a, 1)
        elif rank == 1:
            comm.Recv(out, 0)
        return out

    def prealloc(c: int) -> Any:
        if op in ("all_reduce", "broadcast") or (op == "sendrecv" and rank != 1):
            return None
        return _numpy_make(_out_count(op, c, n), 0.0)
    res = comm.gather(_measure(count, n, calls, _numpy_make, prealloc, call,
                               comm.Barrier), root=0)
    if rank == 0:
        print("MESHBENCH " + json.dumps(res), flush=True)


def _run(fw: str, op: str, n: int, count: int, calls: int, timeout: float) -> list[Any]:
    """One fresh job: per rank, what ``_measure`` returned."""
    if fw in ("meshrun", "torch"):
        import mesh
        worker = _mesh_worker if fw == "meshrun" else _torch_worker
        return mesh.spawn(worker, n, op, count, calls, timeout=timeout)
    if fw == "gloo":
        from .bench_gloo import run_workers
        return run_workers(_gloo_worker, n, (op, count, calls), "gloo", timeout)
    from mesh.bench import mpirun
    return mpirun(n, "collectives.tools.bench_memory",
                  ["--mpi-worker", op, str(count), str(calls)], timeout)


def _need(op: str, size: int, n: int) -> int:
    """Bytes a job of ``op`` could take at most, generously: per rank the
    input, the output, two more of the larger, and an interpreter."""
    count = _count(size, n)
    big = max(count, _out_count(op, count, n)) * _ITEM
    return n * (count * _ITEM + _out_count(op, count, n) * _ITEM + 2 * big + _RANK_OVERHEAD)


def _available() -> int:
    with open("/proc/meminfo") as f:
        m = re.search(r"MemAvailable:\s+(\d+)", f.read())
    return int(m.group(1)) << 10 if m else 0


def _cell(per_rank: list[Any] | str) -> str:
    if isinstance(per_rank, str):
        return per_rank
    calls = [max(r["extra"][i] for r in per_rank) for i in range(len(per_rank[0]["extra"]))]
    return "/".join(f"{max(x, 0.0):.2f}" for x in calls)


def _worst(per_rank: list[Any] | str | None) -> float | None:
    if per_rank is None or isinstance(per_rank, str):
        return None
    return max(max(r["extra"]) for r in per_rank)


def _ratio(a: float | None, b: float | None) -> str:
    """a/b; "-" when both are (near) zero, "inf" when only b is (under
    0.05 of a buffer: page and allocator noise)."""
    if a is None or b is None:
        return "n/a"
    a, b = max(a, 0.0), max(b, 0.0)
    if b < 0.05:
        return "-" if a < 0.05 else "inf"
    return f"{a / b:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m collectives.tools.bench_memory",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--nprocs", default=[2, 4], type=positive_list,
                    help="rank counts, e.g. 2,4 (at least 2)")
    ap.add_argument("--sizes", default=[64 << 20, 256 << 20], type=checked(parse_sizes),
                    help="each rank's input, e.g. 64M,256M")
    ap.add_argument("--ops", default=list(OPS), type=names_in(OPS))
    ap.add_argument("--frameworks", default=list(FRAMEWORKS), type=names_in(FRAMEWORKS),
                    help="meshrun (numpy API), torch (backend meshrun), gloo, mpi")
    ap.add_argument("--calls", default=2, type=positive, help="measured calls per job")
    ap.add_argument("--timeout", default=600.0, type=positive_float, help="seconds per job")
    ap.add_argument("--mpi-worker", nargs=3, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.mpi_worker:
        op, count, calls = a.mpi_worker
        _mpi_worker(op, int(count), int(calls))
        return 0
    if min(a.nprocs) < 2:
        ap.error("-n: every rank count needs at least 2 ranks (sendrecv, the ratios)")
    if not os.path.exists("/proc/self/clear_refs"):
        print("# bench_memory needs Linux's /proc/self/clear_refs", file=sys.stderr)
        return 2
    fws = list(a.frameworks)
    if "mpi" in fws:
        from mesh.bench import mpi_missing
        why = mpi_missing()
        if why:
            print(f"# mpi skipped: {why}")
            fws.remove("mpi")
    if "torch" in fws or "gloo" in fws:
        from .bench_gloo import available
        if not available():
            print("# torch and gloo skipped: torch with gloo is not installed")
            fws = [f for f in fws if f not in ("torch", "gloo")]
    sides = [("torch", "gloo"), ("meshrun", "mpi")]
    sides += [("meshrun", "gloo")] if "torch" not in fws else []
    pairs = [(f"{x}/{y}", x, y) for x, y in sides if x in fws and y in fws]
    for n in a.nprocs:
        print(f"# bench_memory: {n} ranks, float32, cpu; extra copies of the input's size "
              f"held at the peak beyond the input and the result, calls "
              f"{'/'.join(str(i + 1) for i in range(a.calls))}, the worst rank", flush=True)
        print(f"# {'op':>14} {'size':>6} | " + " ".join(f"{f:>14}" for f in fws)
              + (" | " + " ".join(f"{p:>12}" for p, _, _ in pairs) if pairs else ""),
              flush=True)
        notes: list[str] = []
        for size in a.sizes:
            need = max(_need(op, size, n) for op in a.ops)
            avail = _available()
            if need > avail:
                print(f"# {size_text(size)} on {n} ranks skipped: its jobs could need "
                      f"{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available", flush=True)
                continue
            count = _count(size, n)
            for op in a.ops:
                got: dict[str, Any] = {}
                for fw in fws:
                    try:
                        got[fw] = _run(fw, op, n, count, a.calls, a.timeout)
                    except Exception as e:      # one failed job: say so, keep going
                        got[fw] = "error"
                        first = (str(e).strip().splitlines() or [""])[-1]
                        notes.append(f"# {op} {size_text(size)} {fw}: "
                                     f"{type(e).__name__}: {first[:200]}")
                    else:
                        shm = max(r["shm"] for r in got[fw]) >> 20
                        dev = max(r["devshm"] for r in got[fw]) >> 20
                        if max(shm, dev) << 20 >= 0.05 * count * _ITEM:
                            notes.append(f"# {op} {size_text(size)} {fw}: RssShmem up to "
                                         f"{shm} MiB, /dev/shm grew {dev} MiB")
                print(f"  {op:>14} {size_text(size):>6} | "
                      + " ".join(f"{_cell(got[f]):>14}" for f in fws)
                      + (" | " + " ".join(f"{_ratio(_worst(got[x]), _worst(got[y])):>12}"
                                          for _, x, y in pairs) if pairs else ""), flush=True)
        for line in notes:
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
