"""``python -m engine.bench_moe``: an MoE layer's training step (engine.moe)
by each dispatch (``capacity``: every expert's whole capacity, padding
included, by all_to_all; ``tokens``: the kept tokens alone, by
all_to_all_v after their counts) on meshrun's exchanges against the same on
torch.distributed gloo's ``all_to_all_single`` (even, and with split sizes),
at each capacity factor, in one run.

Each of ``-n`` ranks (``mesh.spawn``) builds one ``engine.MoE`` of
``--experts`` FFN experts (Linear(h, 4h), GELU, Linear(4h, h); top-``-k``
gating) at ``--ep`` for each of ``--capacity-factors`` (``--no-drop``:
drop_tokens=False, the capacity the busiest expert's), and joins a gloo
group too (``file://`` rendezvous; ``dist.new_group`` for each
expert-parallel group where ``--ep`` is less than ``-n``). A step is a
forward of ``--tokens`` rows of width ``--hidden``, the backward of its
output's mean square and ``l_aux`` (four exchanges: dispatch, combine and
their reverses; the tokens way one small all_to_all of the counts more);
the four ways alternate ``--rounds`` times, ``--steps`` steps each after a
barrier, and rank 0 reports the median step, the median of the time spent
inside the exchange calls a step, with the rounds' spread, and the rows it
sent a step.

    python -m engine.bench_moe [-n 2] [--ep 2] [--tokens 1024] [--hidden 128]
                               [--experts 4] [-k 1] [--capacity-factors 1.0 1.25 2.0]
                               [--no-drop] [--steps 10] [--rounds 5]
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


def _rank(world: Any, init_file: str, a: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch import distributed as dist

    from .moe import MoE, meshrun_exchange, meshrun_exchange_v
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

        def gloo_v(group: Any, x: Any, sends: list[int], recvs: list[int]) -> Any:
            out = x.new_empty(sum(recvs), *x.shape[1:])
            dist.all_to_all_single(out, x, output_split_sizes=recvs, input_split_sizes=sends,
                                   group=pg)
            return out

        spent, rows = [0.0], [0]

        def timed(fn: Any) -> Any:
            def call(group: Any, x: Any, *counts: Any) -> Any:
                if x.is_floating_point():       # (not the counts)
                    rows[0] += x.shape[0] * (x.shape[1] if x.dim() == 3 else 1)
                t = time.perf_counter()
                try:
                    return fn(group, x, *counts)
                finally:
                    spent[0] += time.perf_counter() - t
            return call

        ways = {f"{lib} {way}": (way, timed(even), timed(uneven))
                for lib, even, uneven in (("meshrun", meshrun_exchange, meshrun_exchange_v),
                                          ("gloo", gloo, gloo_v))
                for way in ("capacity", "tokens")}
        x = torch.randn(a["tokens"], h, generator=torch.Generator().manual_seed(world.rank))
        res: dict[str, Any] = {}
        for factor in a["factors"]:
            torch.manual_seed(0)
            ffn = torch.nn.Sequential(torch.nn.Linear(h, 4 * h), torch.nn.GELU(),
                                      torch.nn.Linear(4 * h, h))
            layer = MoE(h, ffn, num_experts=a["experts"], ep_size=ep, k=a["k"],
                        capacity_factor=factor, min_capacity=0, drop_tokens=a["drop"],
                        world=world)
            for key in ways:
                res[f"{factor} {key}"] = {"step": [], "exchange": [], "rows": 0}
            for r in range(a["rounds"] + 1):        # (round 0: warm-up, not counted)
                for key, (way, even, uneven) in ways.items():
                    layer.dispatch, layer.exchange, layer.exchange_v = way, even, uneven
                    steps, inside = [], []
                    for _ in range(a["steps"]):
                        collectives.barrier(world)
                        spent[0], rows[0] = 0.0, 0
                        torch.manual_seed(r)       # (use_rts: the same draws each way)
                        t = time.perf_counter()
                        out, l_aux, _ = layer(x)
                        (out.pow(2).mean() + 0.01 * l_aux).backward()
                        steps.append(time.perf_counter() - t)
                        inside.append(spent[0])
                        layer.zero_grad()
                    if r:
                        got = res[f"{factor} {key}"]
                        got["step"].append(statistics.median(steps))
                        got["exchange"].append(statistics.median(inside))
                        got["rows"] = rows[0]
        return res
    finally:
        dist.destroy_process_group()


def run(n: int, **a: Any) -> dict[str, Any]:
    """Rank 0's per-round medians (seconds) of each way's step and exchange
    time, and the rows it sent a step, by "<capacity factor> <library> <way>"."""
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
    p.add_argument("--capacity-factors", type=float, nargs="+", default=[1.0, 1.25, 2.0],
                   help="capacity factors (default 1.0 1.25 2.0)")
    p.add_argument("--no-drop", action="store_true",
                   help="drop_tokens=False (the capacity the busiest expert's)")
    p.add_argument("--steps", type=positive, default=10, help="steps a round (default 10)")
    p.add_argument("--rounds", type=positive, default=5, help="rounds (default 5)")
    a = p.parse_args(argv)
    if a.n % a.ep or a.experts % a.ep:
        p.error(f"--ep {a.ep} must divide -n {a.n} and --experts {a.experts}")
    res = run(a.n, ep=a.ep, tokens=a.tokens, hidden=a.hidden, experts=a.experts, k=a.k,
              factors=a.capacity_factors, drop=not a.no_drop, steps=a.steps, rounds=a.rounds)
    print(f"MoE step: {a.n} ranks, ep {a.ep}, {a.experts} experts, top-{a.k}, {a.tokens} "
          f"tokens x {a.hidden} a rank (float32), drop_tokens={not a.no_drop}; medians over "
          f"{a.rounds} rounds of {a.steps} steps (ms; the rounds' min-max), rank 0's rows sent "
          f"a step, and the step against meshrun capacity's")
    for factor in a.capacity_factors:
        anchor = statistics.median(res[f"{factor} meshrun capacity"]["step"])
        print(f"capacity factor {factor}:")
        for key in ("meshrun capacity", "meshrun tokens", "gloo capacity", "gloo tokens"):
            got = res[f"{factor} {key}"]
            line = f"  {key:17s}"
            for what in ("step", "exchange"):
                v = got[what]
                line += f" {what} {statistics.median(v) * 1e3:8.2f} " \
                        f"({min(v) * 1e3:.2f}-{max(v) * 1e3:.2f})"
            print(f"{line}  rows {got['rows']:6d}  x{statistics.median(got['step']) / anchor:.2f}")


if __name__ == "__main__":
    main()
