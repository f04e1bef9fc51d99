"""Peak memory per rank of engine.deepspeed's ZeRO stages 0-3.

    PYTHONPATH=. python tools/bench_ds_zero.py -n 2 --depth 12 --width 1024

Each stage is one ``mesh.spawn`` of ``-n`` ranks training an MLP of
``--depth`` Linear(width, width) layers (Tanh between; float32) through
``from engine import deepspeed`` (AdamW, ``--rows`` rows a step, one
micro-batch a rank). On each rank: glibc's mmap threshold fixed at 128 KiB
(so a freed weight's or gradient's memory goes back to the kernel, and RSS
follows the tensors held), a warm-up step, then the kernel's RSS high-water
mark reset (``echo 5 > /proc/self/clear_refs``), ``--steps`` steps, and
VmHWM read back: "peak" is that high-water mark, "rest" the RSS after the
steps, both in MB above the RSS before the model was built (torch and
meshrun imported), the worst rank's; "params", "grads" and "state" the
bytes (MB) the rank holds of each at rest, "gathered" (stage 3) the most
bytes of other ranks' parameters it held at once in the last step
(``opt.peak_gathered_bytes()``). Linux only.
"""
from __future__ import annotations

import argparse
import ctypes
import json
from typing import Any

import mesh

_M_MMAP_THRESHOLD = -3


def _kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _rank(world: Any, stage: int, depth: int, width: int, rows: int, steps: int) -> Any:
    ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    import torch
    torch.set_num_threads(1)
    from engine import deepspeed
    base = _kb("VmRSS")
    torch.manual_seed(0)
    layers: list[Any] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers)
    cfg = {"train_batch_size": rows, "steps_per_print": None,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
           "zero_optimization": {"stage": stage}}
    eng, opt, _, _ = deepspeed.initialize(model=model, config=cfg)
    mb = eng.train_micro_batch_size_per_gpu()
    g = torch.Generator().manual_seed(world.rank)

    def step() -> None:
        x = torch.randn(mb, width, generator=g)
        loss = eng(x).square().mean()
        eng.backward(loss)
        eng.step()

    step()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _kb("VmRSS")
    for _ in range(steps):
        step()
    mb_ = 1 << 20
    return {"peak": (_kb("VmHWM") - base) / 1024, "before": (before - base) / 1024,
            "rest": (_kb("VmRSS") - base) / 1024,
            "params": sum(p.numel() * p.element_size() for p in model.parameters()) / mb_,
            "grads": sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                         if p.grad is not None) / mb_,
            "gathered": (opt.peak_gathered_bytes() if hasattr(opt, "peak_gathered_bytes")
                         else 0) / mb_,
            "state": (opt.state_bytes() if hasattr(opt, "state_bytes") else sum(
                v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))) / mb_}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=2)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    n_params = a.depth * (a.width * a.width + a.width)
    print(f"{n_params / 1e6:.1f} M parameters ({n_params * 4 / (1 << 20):.0f} MB float32), "
          f"{a.n} ranks")
    print(f"{'stage':>5} {'peak MB':>8} {'rest MB':>8} {'params':>7} {'grads':>7} "
          f"{'state':>7} {'gathered':>8}")
    out = {}
    for stage in [int(s) for s in a.stages.split(",")]:
        res = mesh.spawn(_rank, a.n, stage, a.depth, a.width, a.rows, a.steps, timeout=300)
        worst = {k: max(r[k] for r in res) for k in res[0]}
        out[stage] = res
        print(f"{stage:>5} {worst['peak']:>8.0f} {worst['rest']:>8.0f} {worst['params']:>7.0f} "
              f"{worst['grads']:>7.0f} {worst['state']:>7.0f} {worst['gathered']:>8.1f}",
              flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
