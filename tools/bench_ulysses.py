"""Ulysses attention's step on meshrun's all_to_all against gloo's.

    PYTHONPATH=. python tools/bench_ulysses.py -n 2 --seq 2048 --heads 8 --dim 64

One ``mesh.spawn`` of ``-n`` ranks; each also joins a torch.distributed
gloo group (a file rendezvous), so both run in the same processes, the
same tensors and the same local attention. A step: q, k and v of
``[batch, seq/n, heads, dim]`` (float32) through
``engine.DistributedAttention`` (causal SDPA) forward, and backward of its
output's sum: 4 all_to_alls forward, 4 backward. "meshrun" trades the
blocks by ``collectives.all_to_all`` on the world communicator, "gloo" by
``torch.distributed.all_to_all_single`` (the exchange handed to
DistributedAttention); "a2a" times one q-sized all_to_all alone. The two
alternate, ``--passes`` passes of ``--steps`` steps each after a warm-up,
a barrier before each pass; a pass's time is the slowest rank's; the
figures are medians over passes, in ms.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import mesh


def _rank(world: Any, init: str, batch: int, seq: int, heads: int, dim: int, steps: int,
          passes: int) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    import collectives
    from engine import DistributedAttention
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=world.rank,
                            world_size=world.size)

    def gloo(blocks: Any) -> Any:
        out = torch.empty_like(blocks)
        dist.all_to_all_single(out, blocks)
        return out

    def local(q: Any, k: Any, v: Any) -> Any:
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return o.transpose(1, 2)

    def meshrun(blocks: Any) -> Any:
        return collectives.all_to_all(world, blocks)

    # (meshrun's: DistributedAttention's own exchange, exchange=None)
    g = torch.Generator().manual_seed(world.rank)
    qkv = [torch.randn(batch, seq // world.size, heads, dim, generator=g, requires_grad=True)
           for _ in range(3)]
    blocks = torch.randn(world.size, batch, seq // world.size, heads // world.size, dim,
                         generator=g)
    attn = {name: DistributedAttention(local, world, exchange=ex)
            for name, ex in (("meshrun", None), ("gloo", gloo))}
    swap = {"meshrun": meshrun, "gloo": gloo}

    def step(name: str) -> None:
        attn[name](*qkv).sum().backward()

    def a2a(name: str) -> None:
        swap[name](blocks)

    times: dict[str, list[float]] = {}
    for p in range(passes + 1):
        for name in ("meshrun", "gloo"):
            for what, fn in (("step", step), ("a2a", a2a)):
                collectives.barrier(world)
                t0 = time.perf_counter()
                for _ in range(steps):
                    fn(name)
                took = (time.perf_counter() - t0) / steps
                worst = torch.tensor([took])
                collectives.all_reduce(world, worst, op="max")
                if p:
                    times.setdefault(f"{what} {name}", []).append(float(worst[0]) * 1e3)
    dist.destroy_process_group()
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--passes", type=int, default=7)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "gloo-init")
        res = mesh.spawn(_rank, a.n, init, a.batch, a.seq, a.heads, a.dim, a.steps, a.passes,
                         timeout=600)[0]
    mb = a.batch * a.seq // a.n * a.heads * a.dim * 4 / 1e6
    print(f"n={a.n} batch={a.batch} seq={a.seq} heads={a.heads} dim={a.dim} "
          f"(q on a rank: {mb:.2f} MB)")
    for what in ("step", "a2a"):
        m, g = res[f"{what} meshrun"], res[f"{what} gloo"]
        print(f"  {what:5s} meshrun {m:8.2f} ms   gloo {g:8.2f} ms   gloo/meshrun {g / m:.2f}")


if __name__ == "__main__":
    main()
