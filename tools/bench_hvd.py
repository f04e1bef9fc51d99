"""A Horovod synthetic-benchmark-style training step: hvd.DistributedOptimizer
of two source trees (base and head, alternating) and DDP on the meshrun
torch backend, side by side in one process tree.

    python tools/bench_hvd.py --trees BASE HEAD -n 2 4 --passes 3

Each pass runs, for every rank count and tree, one ``mesh.spawn`` (the tree
first on PYTHONPATH) that trains two MLPs in turn (``--small`` and
``--large`` parameters: Linear(width, width) layers, ReLU between, float32,
SGD, ``--rows`` random rows a rank a step): a first step timed alone (for
DistributedOptimizer: the one that learns which gradients are sparse), a
warm-up step, then ``--steps`` steps; rank 0's seconds a step, between
barriers. Then the same with DDP (HEAD's tree, ``dist.init_process_group
("meshrun")``, DDP's default 25 MiB buckets). Prints each pass and the
medians over the passes. ``--turned``: the layers declared last to first
(their gradients come in parameter order, the reverse of the buckets'
first order) and, declared after them, one more layer no step uses (DDP:
``find_unused_parameters=True``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import mesh

__all__ = ["main"]


def _model(params: int, turned: bool = False) -> Any:
    import torch
    depth = 4 if params < 4_000_000 else 5
    width = int((params / depth) ** 0.5)
    torch.manual_seed(0)
    layers: list[Any] = []
    for i in range(depth):
        layers += [torch.nn.Linear(width, width)] + ([torch.nn.ReLU()] if i < depth - 1 else [])
    if not turned:
        return torch.nn.Sequential(*layers), width

    class Turned(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rev = torch.nn.ModuleList(layers[::-1])
            self.spare = torch.nn.Linear(width, width)

        def forward(self, x: Any) -> Any:
            for m in reversed(self.rev):
                x = m(x)
            return x
    return Turned(), width


def _rank(world: Any, kind: str, sizes: list[int], rows: int, steps: int,
          turned: bool = False) -> Any:
    import torch
    torch.set_num_threads(1)
    out = {}
    if kind == "ddp":
        import importlib

        import torch.distributed as dist
        importlib.import_module("collectives.torchdist")     # the "meshrun" backend
        dist.init_process_group("meshrun")
        barrier = dist.barrier
    else:
        import collectives.horovod as hvd
        hvd.init()
        barrier = hvd.barrier
    for params in sizes:
        model, width = _model(params, turned)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        if kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            model = DistributedDataParallel(model, find_unused_parameters=turned)
        else:
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
            opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
        x = torch.randn(rows, width, generator=torch.Generator().manual_seed(world.rank))

        def step() -> None:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        barrier()
        t0 = time.perf_counter()
        step()
        barrier()
        first = time.perf_counter() - t0
        step()
        barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        barrier()
        out[params] = (first, (time.perf_counter() - t0) / steps,
                       sum(p.numel() for p in model.parameters()))
    if kind == "ddp":
        dist.destroy_process_group()
    else:
        hvd.shutdown()
    return out


def _worker(args: argparse.Namespace) -> None:
    res = mesh.spawn(_rank, args.worker_n, args.kind, args.sizes, args.rows, args.steps,
                     args.turned, timeout=900)
    print(json.dumps({str(k): v for k, v in res[0].items()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", nargs=2, metavar=("BASE", "HEAD"))
    ap.add_argument("-n", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 25_000_000])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--kind", default="hvd")
    ap.add_argument("--turned", action="store_true")
    ap.add_argument("--worker-n", type=int, default=0)
    args = ap.parse_args()
    if args.worker_n:
        _worker(args)
        return
    base, head = args.trees
    runs = [("base hvd", base, "hvd"), ("head hvd", head, "hvd"), ("head ddp", head, "ddp")]
    got: dict[tuple[str, int, int], list[tuple[float, float]]] = {}
    for p in range(args.passes):
        for n in args.n:
            for label, tree, kind in runs:
                env = dict(os.environ, PYTHONPATH=tree, PYTHONDONTWRITEBYTECODE="1")
                cmd = [sys.executable, os.path.abspath(__file__), "--kind", kind,
                       "--worker-n", str(n), "--rows", str(args.rows), "--steps",
                       str(args.steps), "--sizes", *map(str, args.sizes)] + \
                    ["--turned"] * args.turned
                line = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True,
                                      timeout=1200).stdout.strip().splitlines()[-1]
                for size, (first, each, count) in json.loads(line).items():
                    got.setdefault((label, n, int(size)), []).append((first, each))
                    print(f"pass {p} n={n} {label} {count / 1e6:.1f}M params: first step "
                          f"{first * 1e3:.0f} ms, then {each * 1e3:.0f} ms a step "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
    print("\nmedians over the passes (rank 0, ms):")
    print(f"{'ranks':>5} {'params':>7} {'run':>9} {'first step':>10} {'a step':>7}")
    for (label, n, size), v in sorted(got.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        print(f"{n:>5} {size / 1e6:>6.0f}M {label:>9} "
              f"{statistics.median(f for f, _ in v) * 1e3:>10.0f} "
              f"{statistics.median(e for _, e in v) * 1e3:>7.0f}")


if __name__ == "__main__":
    main()
