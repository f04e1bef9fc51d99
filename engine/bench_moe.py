"""``python -m engine.bench_moe``: an MoE layer's training step (engine.moe)
with its dispatch and combine on meshrun's all_to_all against the same
layer's on torch.distributed gloo's ``all_to_all_single``, in one run.

Each of ``-n`` ranks (``mesh.spawn``) builds one ``engine.MoE`` of
``--experts`` FFN experts (Linear(h, 4h), GELU, Linear(4h, h); top-``-k``
gating, capacity factor 1) at ``--ep``, and joins a gloo group too
(``file://`` rendezvous; ``dist.new_group`` for each expert-parallel group
where ``--ep`` is less than ``-n``). A step is a forward of ``--tokens``
rows of width ``--hidden``, the backward of its output's mean square and
``l_aux`` (four all_to_alls: dispatch, combine and their reverses); the
two exchanges alternate ``--rounds`` times, ``--steps`` steps each after a
barrier, and rank 0 reports the median step and the median of the time
spent inside the exchange calls a step, with the rounds' spread.

    python -m engine.bench_moe [-n 2] [--ep 2] [--tokens 1024] [--hidden 128]
                               [--experts 4] [-k 1] [--steps 10] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import collectives
import mesh

from mesh.cliargs import positive

__all__ = ["main", "run"]


def _rank(world: Any, init_file: str, a: dict[str, Any]) -> dict[str, list[float]]:
    import torch
    from torch import distributed as dist

    from .moe import MoE, meshrun_exchange
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=world.rank,
                            world_size=world.size)
    try:
        ep, n = a["ep"], world.size
        pgs = [dist.new_group(list(range(k, k + ep))) for k in range(0, n, ep)]
        pg = pgs[world.rank // ep]
        h = a["hidden"]

        def gloo(group: Any, x: Any) -> Any:
            out = torch.empty_like(x)
            dist.all_to_all_single(out, x, group=pg)
            return out

        spent = [0.0]

        def timed(fn: Any) -> Any:
            def call(group: Any, x: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(group, x)
                finally:
                    spent[0] += time.perf_counter() - t
            return call

        torch.manual_seed(0)
        ffn = torch.nn.Sequential(torch.nn.Linear(h, 4 * h), torch.nn.GELU(),
                                  torch.nn.Linear(4 * h, h))
        layer = MoE(h, ffn, num_experts=a["experts"], ep_size=ep, k=a["k"], min_capacity=0,
                    world=world)
        x = torch.randn(a["tokens"], h, generator=torch.Generator().manual_seed(world.rank))
        ways = {"meshrun": timed(meshrun_exchange), "gloo": timed(gloo)}
        res: dict[str, list[float]] = {f"{w} {what}": [] for w in ways
                                       for what in ("step", "exchange")}
        for r in range(a["rounds"] + 1):        # (round 0: warm-up, not counted)
            for way, fn in ways.items():
                layer.exchange = fn
                steps, inside = [], []
                for _ in range(a["steps"]):
                    collectives.barrier(world)
                    spent[0] = 0.0
                    t = time.perf_counter()
                    out, l_aux, _ = layer(x)
                    (out.pow(2).mean() + 0.01 * l_aux).backward()
                    steps.append(time.perf_counter() - t)
                    inside.append(spent[0])
                    layer.zero_grad()
                if r:
                    res[f"{way} step"].append(statistics.median(steps))
                    res[f"{way} exchange"].append(statistics.median(inside))
        return res
    finally:
        dist.destroy_process_group()


def run(n: int, **a: Any) -> dict[str, list[float]]:
    """Rank 0's per-round medians (seconds) of each way's step and exchange time."""
    fd, init_file = tempfile.mkstemp(prefix="meshrun-bench-moe-")
    os.close(fd)
    os.unlink(init_file)
    try:
        return mesh.spawn(_rank, n, init_file, a, timeout=600)[0]
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m engine.bench_moe", description=__doc__)
    p.add_argument("-n", type=positive, default=2, help="ranks (default 2)")
    p.add_argument("--ep", type=positive, default=2, help="expert-parallel size (default 2)")
    p.add_argument("--tokens", type=positive, default=1024, help="rows a rank (default 1024)")
    p.add_argument("--hidden", type=positive, default=128, help="width (default 128)")
    p.add_argument("--experts", type=positive, default=4, help="experts (default 4)")
    p.add_argument("-k", type=int, choices=(1, 2), default=1, help="top-k (default 1)")
    p.add_argument("--steps", type=positive, default=10, help="steps a round (default 10)")
    p.add_argument("--rounds", type=positive, default=5, help="rounds (default 5)")
    a = p.parse_args(argv)
    if a.n % a.ep or a.experts % a.ep:
        p.error(f"--ep {a.ep} must divide -n {a.n} and --experts {a.experts}")
    res = run(a.n, ep=a.ep, tokens=a.tokens, hidden=a.hidden, experts=a.experts, k=a.k,
              steps=a.steps, rounds=a.rounds)
    print(f"MoE step: {a.n} ranks, ep {a.ep}, {a.experts} experts, top-{a.k}, {a.tokens} "
          f"tokens x {a.hidden} a rank (float32); medians over {a.rounds} rounds of "
          f"{a.steps} steps (ms; the rounds' min-max)")
    for key, v in res.items():
        print(f"  {key:18s} {statistics.median(v) * 1e3:9.2f}   "
              f"({min(v) * 1e3:.2f}-{max(v) * 1e3:.2f})")


if __name__ == "__main__":
    main()
