"""A step of engine.deepspeed with ``communication_data_type`` fp32 against
fp16 (and bf16), side by side.

    PYTHONPATH=. python tools/bench_ds_comm.py -n 2 --depth 6 --width 2048

One ``mesh.spawn`` of ``-n`` ranks; on each, one engine per communication
type over the same MLP (``--depth`` Linear(width, width), Tanh between;
float32; SGD; ZeRO ``--stage``; ``--rows`` rows a rank's micro-batch, one a
step), all made first; then ``--passes`` passes, each timing ``--steps``
steps of every engine in turn (interleaved: the load the machine has
falls on each alike), one warm-up step each before. A step is
``engine(x)``, ``engine.backward(loss)``, ``engine.step()``; printed: the
median over the passes of each engine's mean step (rank 0's wall clock,
ms), and the bytes one step's gradients take on the wire per rank and
type (float32's 4 a parameter, float16's and bfloat16's 2: bfloat16 as its
raw bits, engine.grad_wire).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import collectives
import mesh

KINDS = ("fp32", "fp16", "bf16")


def _rank(world: Any, depth: int, width: int, rows: int, stage: int, steps: int,
          passes: int, kinds: list[str]) -> Any:
    import torch

    from engine import deepspeed
    torch.set_num_threads(1)
    engines = {}
    for k in kinds:
        torch.manual_seed(0)
        layers: list[Any] = []
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
        m = torch.nn.Sequential(*layers[:-1])
        engines[k], _, _, _ = deepspeed.initialize(model=m, config={
            "train_batch_size": rows * world.size, "steps_per_print": None,
            "optimizer": {"type": "SGD", "params": {"lr": 1e-4}},
            "zero_optimization": {"stage": stage}, "communication_data_type": k})
    x = torch.randn(rows, width)

    def step(eng: Any) -> None:
        loss = eng(x).square().mean()
        eng.backward(loss)
        eng.step()

    for eng in engines.values():
        step(eng)
    took: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(passes):
        for k, eng in engines.items():
            collectives.barrier(world)
            t = time.perf_counter()
            for _ in range(steps):
                step(eng)
            took[k].append((time.perf_counter() - t) / steps * 1e3)
    n = sum(p.numel() for p in engines[kinds[0]].module.parameters())
    return {"params": n, "ms": {k: statistics.median(v) for k, v in took.items()},
            "all": took}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=2)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--kinds", default="fp32,fp16")
    a = ap.parse_args()
    kinds = a.kinds.split(",")
    res = mesh.spawn(_rank, a.n, a.depth, a.width, a.rows, a.stage, a.steps, a.passes, kinds,
                     timeout=3000)
    r = res[0]
    wire = {"fp32": 4, "fp16": 2, "bf16": 2}
    print(json.dumps({"params": r["params"], "ranks": a.n, "stage": a.stage,
                      "median step ms (rank 0)": {k: round(v, 1) for k, v in r["ms"].items()},
                      "gradient MB a step on the wire": {
                          k: round(r["params"] * wire[k] / 1e6, 1) for k in kinds},
                      "passes": {k: [round(v, 1) for v in vs] for k, vs in r["all"].items()}}))


if __name__ == "__main__":
    main()
