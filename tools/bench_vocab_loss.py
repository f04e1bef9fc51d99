"""A language model head's loss at tp=2: logits gathered whole (the head
planned {"style": "colwise", "output": "replicate"}, then F.cross_entropy)
against logits left sharded over the vocabulary (the head planned
"colwise", the same F.cross_entropy, which runs vocab-parallel).

Run: MALLOC_MMAP_THRESHOLD_=65536 meshrun -n 2 tools/bench_vocab_loss.py [rows] [vocab] [dim]
(a fixed mmap threshold: freed tensors go back to the system, so the peak
resident size is the peak of what is held). Per rank: the peak resident
memory above what the model and its input held before (VmHWM, reset through
/proc/self/clear_refs), over the head's forward, the loss and the backward;
and their time, the median of 7 runs after a warm-up."""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import engine
import mesh


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _run(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> float:
    head.zero_grad(set_to_none=False)
    loss = F.cross_entropy(head(h).flatten(0, 1), y.flatten())
    loss.backward()
    return float(loss.detach())


def main() -> None:
    given = sys.argv[1:]
    rows, vocab, dim = (int(a) for a in given + ["2048", "32768", "256"][len(given):])
    torch.set_num_threads(1)
    with mesh.init() as world:
        out = {}
        for name, style in [("gathered", {"style": "colwise", "output": "replicate"}),
                            ("sharded", "colwise")]:
            torch.manual_seed(0)
            head = torch.nn.Sequential(torch.nn.Linear(dim, vocab, bias=False))
            engine.parallelize(head, world, {"0": style})
            h = torch.randn(1, rows, dim, requires_grad=True)
            y = torch.randint(0, vocab, (1, rows))
            losses = [_run(head, h, y)]            # (warm-up: the grads made)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                       # VmHWM back to VmRSS
            before = _rss("VmRSS")
            losses.append(_run(head, h, y))
            peak = _rss("VmHWM") - before
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                _run(head, h, y)
                times.append(time.perf_counter() - t0)
            out[name] = (peak, statistics.median(times), losses[-1])
        if world.rank == 0:
            mib = 2 ** 20
            whole = rows * vocab * 4 / mib
            print(f"tp={world.size} rows={rows} vocab={vocab} dim={dim}: logits "
                  f"{whole:.0f} MiB whole, {whole / world.size:.0f} MiB a shard (float32)")
            for name, (peak, t, loss) in out.items():
                print(f"  {name:9s} peak above start {peak / mib:7.1f} MiB  "
                      f"step {t * 1e3:7.1f} ms  loss {loss:.6f}")
            g, s = out["gathered"], out["sharded"]
            print(f"  sharded / gathered: peak {s[0] / g[0]:.2f}x, time {s[1] / g[1]:.2f}x")


if __name__ == "__main__":
    main()
