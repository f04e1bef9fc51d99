"""The "meshrun" torch.distributed backend against gloo, in one process tree.

    python -m collectives.tools.bench_torch -n 2 --sizes 8,64M --reps 5

``mesh.spawn`` starts n ranks; each makes the default group on meshrun and
a gloo group over the same ranks (``new_group(backend="gloo")``), so every
comparison runs interleaved on the same processes and the same load:

    all_reduce   per size and repetition, three sides in rotating order:
                 meshrun's own ``collectives.all_reduce`` on numpy ("direct"),
                 ``dist.all_reduce`` on meshrun, ``dist.all_reduce`` on gloo;
                 ``--floor`` adds ``dist.all_reduce`` on a ProcessGroup whose
                 ``allreduce`` makes the direct call and returns a finished
                 Work ("floor": torch's own wrapper around the direct call,
                 the least any Python backend can cost)
    ddp          per model (1 M and 25 M parameters) two DDP replicas, one
                 per group, and the plain model ("local": no communication),
                 stepped alternately (forward, backward, SGD step); step
                 minus local is the communication DDP did not hide.
                 ``--floor`` adds a DDP replica whose comm hook does nothing
                 ("floor": DDP's own bucket copies and bookkeeping), the
                 step no backend can go under; ``--cpu`` adds each side's CPU
                 per step and rank, thread by thread (collectives.tools.
                 threadcpu: the main thread's backward and bucket copies,
                 meshrun's lane, the progress thread, gloo's threads), a
                 figure other jobs' load moves far less than the wall clock
    p2p          ``--p2p SIZES``: a ``dist.send``/``dist.recv`` round trip
                 between ranks 0 and 1 on each backend (2 ranks or more)
    overlap      ``--overlap``: per model, where DDP's bucket all-reduces
                 run against its backward pass, on each backend: torch's
                 own ``allreduce_hook`` (the default path's division and
                 all-reduce) registered as a comm hook that stamps each
                 bucket's issue and the completion of its future: the
                 all-reduces' summed time, how much of it ran before the
                 last bucket was issued (while gradients were still being
                 computed), and the backward's tail after that issue

    ops          ``--ops NAMES`` (or ``all``) at ``--op-sizes``: each
                 torch.distributed call on meshrun against the meshrun call
                 it stands for, made directly on the same tensors ("direct":
                 ``collectives.all_reduce(world, t)`` for ``dist.all_reduce(t)``,
                 ``world.send``/``world.recv`` for the send/recv round trip),
                 alternated; ``_async`` names wait on ``async_op=True``'s
                 Work on both sides. A size is what ``collectives.tools.bench``
                 calls it (all_gather's and gather's: the output)

``-n 1`` measures the backend's per-call overhead with no peer to wait for.

Times are the slowest rank's; figures are medians over the repetitions,
with the ratios meshrun/gloo and meshrun/direct. Sizes, iteration counts
and bus factors are those of ``collectives.tools.bench``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from mesh.cliargs import checked, names_in, nonnegative, positive, positive_list

from .bench import bus_factor, parse_sizes, plan_rows

__all__ = ["MODELS", "OPS", "main"]

MODELS = {"1M": (1024, 1), "25M": (2500, 4)}
"""name -> (width, layers) of a stack of width x width Linear layers."""


def _timed(fn: Callable[[], Any], iters: int, barrier: Callable[[], Any]) -> float:
    barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def _all_reduce_sides(world: Any, gloo: Any, count: int,
                      floor: bool = False) -> dict[str, Callable[[], Any]]:
    import torch
    import torch.distributed as dist

    import collectives as C
    from collectives.torchpg import _done

    t = torch.zeros(count)
    a = t.numpy()
    sides = {"direct": lambda: C.all_reduce(world, a),
             "meshrun": lambda: dist.all_reduce(t),
             "gloo": lambda: dist.all_reduce(t, group=gloo)}
    if floor:
        base: Any = dist.ProcessGroup       # (its stubs overload allreduce)

        class Floor(base):                  # the direct call inside torch's wrapper
            def allreduce(self, tensors: Any, opts: Any = None) -> Any:
                C.all_reduce(world, a)
                return _done(tensors)
        pg = Floor(world.rank, world.size)
        sides["floor"] = lambda: dist.all_reduce(t, group=pg)
    return sides


OPS = ("all_reduce", "broadcast", "reduce", "all_gather_into_tensor", "all_gather_single",
       "all_gather", "reduce_scatter_tensor", "reduce_scatter_single", "reduce_scatter",
       "all_to_all_single",
       "all_to_all_single_uneven", "gather", "scatter", "barrier", "send_recv",
       "all_reduce_async", "broadcast_async", "all_gather_into_tensor_async",
       "reduce_scatter_tensor_async", "all_to_all_single_async")
"""The ``--ops`` calls: dist's name (``_async``: with ``async_op=True``, waited);
``_single``: torch 2.13's names of the ``_tensor`` forms (FSDP2's calls; the others
go through a deprecation wrapper that warns)."""

_BENCH_OP = {"all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
             "all_gather_single": "all_gather", "reduce_scatter_single": "reduce_scatter",
             "all_to_all_single": "all_to_all", "all_to_all_single_uneven": "all_to_all",
             "send_recv": "all_reduce"}
"""collectives.tools.bench's name of an op, for its sizes (input_count)."""


def op_count(op: str, size: int, n: int) -> int:
    """float32 elements of each rank's input for ``op`` at ``size`` bytes."""
    from .bench import input_count

    base = op.removesuffix("_async")
    return input_count(_BENCH_OP.get(base, base), size, 4, n)


def _op_sides(world: Any, op: str, count: int, floor: bool = False
              ) -> dict[str, Callable[[], Any]]:
    """``op`` (OPS) on ``count`` float32 a rank: the dist call on meshrun and
    the meshrun call it stands for, on the same tensors; ``floor``: the dist
    call on a ProcessGroup whose methods make the direct call and return a
    finished Work (torch's front end and dispatch around the direct call)."""
    import torch
    import torch.distributed as dist

    import collectives as C

    n, me = world.size, world.rank
    base, a = op.removesuffix("_async"), op.endswith("_async")

    def waited(x: Any) -> Any:
        return x.wait() if a else x
    t, rows, out = torch.zeros(count), torch.zeros(n, count // n), torch.empty(count * n)
    mine, got = torch.empty(count // n), torch.empty(count)
    direct: Callable[[], Any]
    call: Callable[[Any], Any]
    if base == "all_reduce":
        direct = lambda: waited(C.all_reduce(world, t, async_op=a))     # noqa: E731
        call = lambda g: waited(dist.all_reduce(t, group=g, async_op=a))    # noqa: E731
    elif base == "broadcast":
        direct = lambda: waited(C.broadcast(world, t, 0, async_op=a))   # noqa: E731
        call = lambda g: waited(dist.broadcast(t, group=g, group_src=0,  # noqa: E731
                                               async_op=a))
    elif base == "reduce":
        direct = lambda: C.reduce(world, t, 0)      # noqa: E731
        call = lambda g: dist.reduce(t, group=g, group_dst=0)   # noqa: E731
    elif base in ("all_gather_into_tensor", "all_gather_single"):
        gather = getattr(dist, base)    # (_single: torch 2.13 on)
        direct = lambda: waited(C.all_gather(world, t, async_op=a))     # noqa: E731
        call = lambda g: waited(gather(out, t, group=g, async_op=a))    # noqa: E731
    elif base == "all_gather":
        outs = list(out.chunk(n))
        direct = lambda: C.all_gather(world, t)     # noqa: E731
        call = lambda g: dist.all_gather(outs, t, group=g)  # noqa: E731
    elif base in ("reduce_scatter_tensor", "reduce_scatter_single"):
        scatter = getattr(dist, base)
        direct = lambda: waited(C.reduce_scatter(world, rows, async_op=a))  # noqa: E731
        call = lambda g: waited(scatter(mine, t, group=g, async_op=a))  # noqa: E731
    elif base == "reduce_scatter":
        parts = list(t.chunk(n))
        direct = lambda: C.reduce_scatter(world, rows)      # noqa: E731
        call = lambda g: dist.reduce_scatter(mine, parts, group=g)  # noqa: E731
    elif op == "all_to_all_single_uneven":
        # rank r sends rank j r + 2j elements more than the even split
        sends = [count // n + me + 2 * j for j in range(n)]
        recvs = [count // n + j + 2 * me for j in range(n)]
        x, into = torch.zeros(sum(sends)), torch.empty(sum(recvs))
        direct = lambda: C.all_to_all_v(world, x, sends, recvs)     # noqa: E731
        call = lambda g: dist.all_to_all_single(into, x, recvs, sends, group=g)  # noqa: E731
    elif base == "all_to_all_single":
        direct = lambda: waited(C.all_to_all(world, rows, async_op=a))  # noqa: E731
        call = lambda g: waited(dist.all_to_all_single(got, t, group=g,  # noqa: E731
                                                       async_op=a))
    elif base == "gather":
        into_list = list(out.chunk(n)) if me == 0 else None
        direct = lambda: C.gather(world, t, 0)      # noqa: E731
        call = lambda g: dist.gather(t, into_list, group=g, group_dst=0)     # noqa: E731
    elif base == "scatter":     # (count: the root's rows together)
        ins = list(t.chunk(n)) if me == 0 else None
        direct = lambda: C.scatter(world, rows if me == 0 else mine, 0)     # noqa: E731
        call = lambda g: dist.scatter(mine, ins, group=g, group_src=0)  # noqa: E731
    elif base == "barrier":
        direct = lambda: C.barrier(world)       # noqa: E731
        call = lambda g: dist.barrier(group=g)      # noqa: E731
    elif base == "send_recv":   # a round trip between ranks 0 and 1; the others wait
        def direct() -> None:
            if me < 2:
                world.send(t, 1 - me) if me == 0 else world.recv(0, out=got)
                world.recv(1, out=got) if me == 0 else world.send(t, 0)

        def call(g: Any) -> None:
            if me < 2:
                if me == 0:
                    dist.send(t, group=g, group_dst=1)
                    dist.recv(got, group=g, group_src=1)
                else:
                    dist.recv(got, group=g, group_src=0)
                    dist.send(t, group=g, group_dst=0)
    else:
        raise ValueError(f"bench_torch: no op {op!r} (one of {', '.join(OPS)})")
    sides = {"direct": direct, "meshrun": lambda: call(None)}
    if floor:
        pg = _floor_group(direct)
        sides["floor"] = lambda: call(pg)     # (its direct is this op's while the op runs)
    return sides


_FLOOR = "meshrun_floor"
"""The backend of ``--ops --floor``'s group (_floor_group)."""


def _floor_group(direct: Callable[[], Any]) -> Any:
    """A group over the world whose ProcessGroup's every method makes
    ``direct()`` and returns a finished Work: registered as a backend (a
    group torch has not made fails in its front end's checks) and made by
    ``new_group`` once; each call sets its ``direct``."""
    import torch.distributed as dist

    from collectives.torchpg import _done

    global _floor
    if _floor is None:
        base: Any = dist.ProcessGroup      # (its stubs overload the methods)

        class Floor(base):
            direct: Callable[[], Any] = staticmethod(lambda: None)

            def _direct(self, *args: Any, **kw: Any) -> Any:
                self.direct()
                return _done([])
            allreduce = broadcast = reduce = allgather = _allgather_base = _direct
            reduce_scatter = _reduce_scatter_base = alltoall_base = gather = _direct
            scatter = barrier = send = all_gather_single = reduce_scatter_single = _direct
            all_to_all_single = _direct

            def recv(self, *args: Any, **kw: Any) -> Any:
                return _done([])    # (the send's direct round trip received it)

            def getBackendName(self) -> str:
                return _FLOOR
        if _FLOOR not in dist.Backend.backend_list:
            dist.Backend.register_backend(_FLOOR, lambda o, _: Floor(o.group_rank, o.group_size),
                                          extended_api=True, devices=["cpu"])
        _floor = dist.new_group(backend=_FLOOR)
    _floor.direct = direct
    return _floor


_floor: Any = None


def _p2p_sides(gloo: Any, count: int) -> dict[str, Callable[[], Any]]:
    """A round trip of ``count`` float32 between ranks 0 and 1 (dist.send,
    dist.recv; the other ranks wait at the barriers), on each backend."""
    import torch
    import torch.distributed as dist

    t, r, me = torch.ones(count), torch.empty(count), dist.get_rank()

    def round_trip(group: Any) -> None:
        if me == 0:
            dist.send(t, 1, group=group)
            dist.recv(r, 1, group=group)
        elif me == 1:
            dist.recv(r, 0, group=group)
            dist.send(t, 0, group=group)
    return {"meshrun": lambda: round_trip(None), "gloo": lambda: round_trip(gloo)}


def _finished(value: Any) -> Any:
    """A torch Future holding ``value``."""
    import torch

    fut: Any = torch.futures.Future()
    fut.set_result(value)
    return fut


def _ddp_sides(gloo: Any, model: str, batch: int,
               floor: bool = False) -> dict[str, Callable[[], Any]]:
    import torch
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    width, layers = MODELS[model]
    sides: dict[str, Callable[[], Any]] = {}
    kinds = [("meshrun", None), ("gloo", gloo), ("local", None)]
    for side, group in kinds + ([("floor", None)] if floor else []):
        torch.manual_seed(0)
        net: Any = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
        if side != "local":
            net = DDP(net, process_group=group)
        if side == "floor":
            # a comm hook that communicates nothing (DDP checks the hook's
            # annotations: a lambda has none)
            net.register_comm_hook(None, lambda state, bucket: _finished(bucket.buffer()))
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        x = torch.randn(batch, width)

        def step(net: Any = net, opt: Any = opt, x: Any = x) -> None:
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
        sides[side] = step
    return sides


def _overlap(gloo: Any, model: str, batch: int, steps: int, warmup: int
             ) -> dict[str, dict[str, float]]:
    """Per side (meshrun, gloo), medians over ``steps`` DDP steps of the
    backward's wall, its buckets, their all-reduces' summed time (issue to
    the future's completion), the part of that before the last bucket's
    issue, and the last issue to the backward's return (ms)."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    width, layers = MODELS[model]
    nets: dict[str, tuple[Any, Any, list[tuple[float, float]]]] = {}
    for side, group in (("meshrun", None), ("gloo", gloo)):
        torch.manual_seed(0)
        net: Any = DDP(nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]),
                       process_group=group)
        log: list[tuple[float, float]] = []

        def stamped(state: Any, bucket: Any, log: list[tuple[float, float]] = log) -> Any:
            issued = time.perf_counter()

            def done(fut: Any) -> Any:
                log.append((issued, time.perf_counter()))
                return fut.value()
            return default_hooks.allreduce_hook(state, bucket).then(done)
        # (DDP checks the hook's annotations: a lambda has none)
        net.register_comm_hook(group, lambda state, bucket, f=stamped: f(state, bucket))
        nets[side] = (net, torch.optim.SGD(net.parameters(), lr=1e-3), log)
    x = torch.randn(batch, width)
    rows: dict[str, list[dict[str, float]]] = {side: [] for side in nets}
    for i in range(warmup + steps):
        for side in (list(nets) if i % 2 else list(nets)[::-1]):     # alternated
            net, opt, log = nets[side]
            dist.barrier()
            opt.zero_grad()
            log.clear()
            loss = net(x).square().mean()
            t0 = time.perf_counter()
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            if i >= warmup and log:
                last = max(a for a, _ in log)
                rows[side].append({"backward": t1 - t0, "buckets": len(log),
                                   "comm": sum(b - a for a, b in log),
                                   "before": sum(max(0.0, min(b, last) - a) for a, b in log),
                                   "tail": t1 - last})
    return {side: {k: statistics.median(r[k] for r in rs) * (1 if k == "buckets" else 1e3)
                   for k in (rs[0] if rs else {})} for side, rs in rows.items()}


def _worker(world: Any, rows: list[tuple[int, int, int]], models: list[str], steps: int,
            warmup: int, reps: int, batch: int, floor: bool = False,
            p2p: Sequence[int] = (), overlap: bool = False,
            ops: Sequence[tuple[str, int, int, int]] = (),
            cpu: bool = False) -> dict[str, list[Any]]:
    """Per benchmark row, per repetition, seconds per call of each side.

    The gloo group outlives every DDP model on it (they live and die in
    ``_measure``), and this frame drops it last: torch frees a group its
    Python object holds with the GIL released, but a DDP Reducer holding
    the last reference frees it holding the GIL, and gloo's destructor then
    waits for a worker thread that may need the GIL to free the tensors of
    a work it has just finished (a deadlock, seen once in ~200 runs)."""
    import gc

    import torch
    import torch.distributed as dist

    import collectives.torchdist  # noqa: F401  registers "meshrun"

    torch.set_num_threads(1)
    dist.init_process_group("meshrun")
    gloo = dist.new_group(backend="gloo")
    out = _measure(world, gloo, rows, models, steps, warmup, reps, batch, floor, p2p, overlap,
                   ops, cpu)
    gc.collect()            # DDP models in a reference cycle go now, while gloo lives
    dist.barrier()
    dist.destroy_process_group()
    del gloo                # the last reference: freed with the GIL released
    return out


def _measure(world: Any, gloo: Any, rows: list[tuple[int, int, int]], models: list[str],
             steps: int, warmup: int, reps: int, batch: int, floor: bool,
             p2p: Sequence[int], overlap: bool,
             ops: Sequence[tuple[str, int, int, int]] = (),
             cpu: bool = False) -> dict[str, list[Any]]:
    import torch.distributed as dist

    from .threadcpu import snapshot, spent

    barrier = dist.barrier
    out: dict[str, list[Any]] = {"all_reduce": [], "ddp": [], "p2p": [], "overlap": [],
                                 "ops": [], "ddp_cpu": []}
    plans = [("all_reduce", _all_reduce_sides(world, gloo, count, floor), it, wu)
             for count, it, wu in rows]
    plans += [("p2p", _p2p_sides(gloo, max(1, size // 4)), 200 if size <= 65536 else 40, 5)
              for size in p2p]
    plans += [("ddp", _ddp_sides(gloo, m, batch, floor), steps, warmup) for m in models]
    # made as they come, so that one op's tensors (64 MiB all_gather's output x n) go first
    plans += [("ops", lambda op=op, c=c: _op_sides(world, op, c, floor), it, wu)  # type: ignore
              for op, c, it, wu in ops]
    for kind, sides, iters, wu in plans:
        if callable(sides):
            sides = sides()
        names = list(sides)
        for name in names:
            for _ in range(wu):
                sides[name]()
        row, cpus = [], []
        for rep in range(reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            times, used = {}, {}
            for name in order:
                before = snapshot() if cpu and kind == "ddp" else None
                times[name] = _timed(sides[name], iters, barrier)
                if before is not None:
                    used[name] = spent(before, snapshot(), iters)
            row.append(times)
            cpus.append(used)
        out[kind].append(row)
        if cpu and kind == "ddp":
            out["ddp_cpu"].append(cpus)
    for m in models if overlap else ():
        out["overlap"].append(_overlap(gloo, m, batch, max(3 * steps, 9), warmup))
    return out


def _medians(per_rank: list[list[list[dict[str, float]]]], i: int,
             of: Callable[[Any], float] = statistics.median) -> dict[str, float]:
    """Row i: per side, the median (``of``) over repetitions of the slowest
    rank's time."""
    reps = len(per_rank[0][i])
    sides = per_rank[0][i][0].keys()
    return {s: of(max(r[i][k][s] for r in per_rank) for k in range(reps)) for s in sides}


def _ratio(a: float, b: float) -> str:
    return f"{a / b:5.2f}" if b > 0 else "  n/a"


def _print_cpu(model: str, per_rank: list[list[dict[str, dict[str, float]]]]) -> None:
    """``--cpu``'s lines for ``model``: per side, the CPU per step (ms), the
    mean over ranks of each rank's median over repetitions, thread kind by
    kind, and the wait for a core."""
    from .threadcpu import KINDS

    for side in per_rank[0][0]:
        ms = {k: statistics.mean(statistics.median(rep[side][k] for rep in reps)
                                 for reps in per_rank) * 1e3 for k in (*KINDS, "waited")}
        parts = " + ".join(f"{k} {ms[k]:.1f}" for k in KINDS if ms[k] >= 0.05)
        print(f"  DDP {model:>4} cpu ms/step {side:>7}: {sum(ms[k] for k in KINDS):8.1f} = "
              f"{parts}  (waited for a core {ms['waited']:.1f})", flush=True)


@checked
def _sizes(text: str) -> list[int]:
    """Sizes as ``parse_sizes`` reads them; "" is none."""
    return parse_sizes(text) if text.strip() else []


@checked
def _op_names(text: str) -> list[str]:
    """OPS's names, comma-separated; "all" is every one, "" none."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if names == ["all"]:
        return list(OPS)
    bad = [s for s in names if s not in OPS]
    if bad:
        raise ValueError(f"no op {', '.join(bad)} (one of {', '.join(OPS)}, or all)")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m collectives.tools.bench_torch",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--nprocs", default=[2, 4], type=positive_list,
                    help="rank counts, e.g. 2,4")
    ap.add_argument("--sizes", default="8,1K,64K,1M,16M,64M", type=_sizes)
    ap.add_argument("--max-iters", type=positive, default=50, help="timed calls per size, at most")
    ap.add_argument("--models", default=["1M", "25M"], type=names_in(MODELS, empty=True))
    ap.add_argument("--steps", type=positive, default=3, help="timed DDP steps per repetition")
    ap.add_argument("--warmup", type=nonnegative, default=2, help="untimed DDP steps")
    ap.add_argument("--batch", type=positive, default=32)
    ap.add_argument("--reps", type=positive, default=5)
    ap.add_argument("--floor", action="store_true",
                    help="also step DDP with a comm hook that does nothing, and time "
                         "dist.all_reduce on a ProcessGroup that makes the direct call")
    ap.add_argument("--overlap", action="store_true",
                    help="per model, where DDP's bucket all-reduces run against its backward "
                         "pass on each backend (torch's allreduce_hook, stamped)")
    ap.add_argument("--cpu", action="store_true",
                    help="per DDP side, the CPU per step and rank thread by thread (main, "
                         "meshrun's lane, progress, gloo, other, ended threads) and the "
                         "wait for a core")
    ap.add_argument("--p2p", default=[], type=_sizes, help="dist.send/dist.recv round trips "
                    "between ranks 0 and 1 at these sizes, e.g. 8,4K,64K,1M")
    ap.add_argument("--ops", default=[], type=_op_names,
                    help=f"each of these dist calls on meshrun against the meshrun call "
                         f"it stands for, made directly (all: every one): {', '.join(OPS)}")
    ap.add_argument("--op-sizes", default=[8, 65536], type=_sizes, help="sizes of --ops")
    a = ap.parse_args(argv)
    import mesh

    sizes, models, p2p = a.sizes, a.models, a.p2p
    for n in a.nprocs:
        rows = [(c, min(it, a.max_iters), min(wu, 5))
                for c, it, wu in plan_rows("all_reduce", sizes, 4, n)]
        names = [op for op in a.ops if n > 1 or op != "send_recv"]     # (it needs a peer)
        ops = [(op, op_count(op, size, n), min(it, a.max_iters), min(wu, 5))
               for op in names
               for size, (_, it, wu) in zip(a.op_sizes, plan_rows("all_reduce", a.op_sizes, 4, n))]
        per_rank = mesh.spawn(_worker, n, rows, models, a.steps, a.warmup, a.reps, a.batch,
                              a.floor, p2p, a.overlap, ops, a.cpu, timeout=3600)
        f = bus_factor("all_reduce", n)
        print(f"# bench_torch: {n} ranks, float32, cpu, median of {a.reps} (slowest rank)")
        print(f"# {'size (B)':>10} | {'direct us':>10} {'meshrun us':>10} {'gloo us':>10} | "
              f"{'busbw GB/s m/g':>15} | {'m/gloo':>6} {'m/direct':>8}"
              + (f" | {'floor us':>9} {'f/direct':>8}" if a.floor and sizes else ""))
        for i, size in enumerate(sizes):
            t = _medians([r["all_reduce"] for r in per_rank], i)
            bw = f"{size / t['meshrun'] / 1e9 * f:6.3f}/{size / t['gloo'] / 1e9 * f:<6.3f}"
            print(f"  {size:>10} | {t['direct'] * 1e6:10.1f} {t['meshrun'] * 1e6:10.1f} "
                  f"{t['gloo'] * 1e6:10.1f} | {bw:>15} | {t['meshrun'] / t['gloo']:6.2f} "
                  f"{t['meshrun'] / t['direct']:8.2f}"
                  + (f" | {t['floor'] * 1e6:9.1f} {t['floor'] / t['direct']:8.2f}"
                     if "floor" in t else ""), flush=True)
        for j, m in enumerate(models):
            t = _medians([r["ddp"] for r in per_rank], j)
            print(f"  DDP {m:>4} step ms: meshrun {t['meshrun'] * 1e3:8.1f}  gloo "
                  f"{t['gloo'] * 1e3:8.1f}  local {t['local'] * 1e3:8.1f}  m/gloo "
                  f"{t['meshrun'] / t['gloo']:5.2f}  exposed comm m/gloo "
                  f"{_ratio(t['meshrun'] - t['local'], t['gloo'] - t['local'])}"
                  + (f"  floor {t['floor'] * 1e3:8.1f}  floor/gloo {t['floor'] / t['gloo']:5.2f}"
                     if "floor" in t else ""), flush=True)
        for j, m in enumerate(models if a.cpu else ()):
            _print_cpu(m, [r["ddp_cpu"][j] for r in per_rank])
        for j, m in enumerate(models if a.overlap else ()):
            for side in ("meshrun", "gloo"):
                o = per_rank[0]["overlap"][j][side]     # rank 0's
                print(f"  DDP {m:>4} overlap {side:>7}: backward {o['backward']:8.1f} ms, "
                      f"{o['buckets']:.0f} buckets' all-reduces {o['comm']:8.1f} ms, of it before "
                      f"the last bucket's issue {o['before']:8.1f}, the last issue to the "
                      f"backward's end {o['tail']:8.1f}", flush=True)
        for j, size in enumerate(p2p):
            t = _medians([r["p2p"] for r in per_rank], j)
            print(f"  p2p {size:>10} B round trip us: meshrun {t['meshrun'] * 1e6:8.1f}  gloo "
                  f"{t['gloo'] * 1e6:8.1f}  gloo/meshrun {t['gloo'] / t['meshrun']:5.2f}",
                  flush=True)
        if ops:     # (best: the fastest repetition's, less moved by other jobs' load)
            print(f"# {'op':>28} {'size (B)':>10} | {'direct us':>10} {'meshrun us':>10} | "
                  f"{'m/direct':>8} {'best':>5}"
                  + (f" | {'floor us':>9} {'f/direct':>8} {'best':>5}" if a.floor else ""))
        for j, (op, size) in enumerate((op, size) for op in names for size in a.op_sizes):
            t = _medians([r["ops"] for r in per_rank], j)
            b = _medians([r["ops"] for r in per_rank], j, min)
            print(f"  {op:>28} {size:>10} | {t['direct'] * 1e6:10.1f} {t['meshrun'] * 1e6:10.1f} "
                  f"| {t['meshrun'] / t['direct']:8.2f} {b['meshrun'] / b['direct']:5.2f}"
                  + (f" | {t['floor'] * 1e6:9.1f} {t['floor'] / t['direct']:8.2f} "
                     f"{b['floor'] / b['direct']:5.2f}" if "floor" in t else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
