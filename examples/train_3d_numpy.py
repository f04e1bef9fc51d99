"""train_3d.py without torch: an engine.layers MLP on dp=2 x pp=2 x tp=2.

    meshrun -n 8 examples/train_3d_numpy.py [--steps 20] [--rows 64] [--lr 0.3]
        [--out train_3d.npz] [--memory-limit MB] [--recompute auto|yes|no]   (the defaults)

Any number of workers runs, the grid shrinking as train_3d.py's: tp=2 where
the number is even, pp=2 where it divides by 4, dp the rest.

The model is a plain engine.layers.Sequential; ``engine.distribute`` cuts,
shards (the same plan styles as torch) and schedules it. Rank 0 prints the
plan, the candidates and the chosen grid; the loss is printed each step; the
gathered model is saved, reloaded into a one-process copy and checked.
"""
import argparse
import os
import statistics
import time

import numpy as np

import engine
import mesh
from engine.layers import Linear, Sequential, Tanh, mse_loss, sgd

PLAN = {"0": "colwise", "2": "rowwise", "4": "colwise", "6": "rowwise"}  # one all-reduce a pair
WIDTHS = [16, 256, 256, 256, 4]


def model() -> Sequential:
    rng = np.random.default_rng(0)
    layers = []
    for i, (a, b) in enumerate(zip(WIDTHS, WIDTHS[1:])):
        layers += [Linear(a, b, rng)] + ([Tanh()] if i < len(WIDTHS) - 2 else [])
    return Sequential(*layers)


def batch(step: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random two-layer network to imitate."""
    t = np.random.default_rng(123)
    a, c = t.standard_normal((16, 32)) / 4, t.standard_normal((32, 4)) / 6
    x = np.random.default_rng(step).standard_normal((rows, 16))
    return x, np.tanh(x @ a) @ c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=int(os.environ.get("TRAIN_3D_STEPS", 20)))
    ap.add_argument("--rows", type=int, default=64, help="rows per step, all replicas")
    ap.add_argument("--lr", type=float, default=0.3)
    ap.add_argument("--out", default="train_3d.npz")
    ap.add_argument("--memory-limit", type=float, default=None,
                    help="MB of activations a rank may hold (the choice recomputes "
                         "activations, engine.layers.Recompute, where that lets a faster "
                         "schedule fit)")
    ap.add_argument("--recompute", choices=("auto", "yes", "no"), default="auto",
                    help="'auto': the choice decides; 'yes': every stage recomputes")
    args = ap.parse_args()
    recompute = {"auto": "auto", "yes": True, "no": False}[args.recompute]
    with mesh.init() as world:
        tp = 2 if world.size % 2 == 0 else 1
        pp = 2 if world.size % (2 * tp) == 0 else 1
        grid = mesh.grid(world, dp=world.size // (pp * tp), pp=pp, tp=tp)
        dp, d = grid.size("dp"), grid.coord("dp")

        def mine(step: int) -> tuple[np.ndarray, np.ndarray]:
            x, y = batch(step, args.rows)
            return x[d::dp], y[d::dp]

        if world.rank == 0:
            print(f"grid {grid.axes}; plan: {PLAN}")
        job = engine.distribute(model(), grid, plan=PLAN if tp > 1 else None,
                                sample=mine(0)[0], loss_fn=mse_loss, recompute=recompute,
                                memory_limit=args.memory_limit and args.memory_limit * 2**20)
        if world.rank == 0:
            print(f"chosen: {job.schedule.name}\n{job.schedule.render()}", flush=True)
        took = []
        for step in range(args.steps):
            t0 = time.perf_counter()
            loss = job.step(*mine(step))
            sgd(job.stages, args.lr)
            took.append(time.perf_counter() - t0)
            if world.rank == 0:                     # (the step's loss, on every rank)
                print(f"step {step:3d}  loss {loss:.6f}", flush=True)
        if world.rank == 0 and job.predicted and len(took) > 1:
            print(f"steps took {statistics.median(took[1:]) * 1e3:.2f} ms (median; rank 0, "
                  f"with the optimizer); predicted {job.predicted * 1e3:.2f} ms", flush=True)

        final = job.step(*mine(args.steps))
        for g in job.grads():
            g[...] = 0
        state = job.state_dict()
        if world.rank == 0:
            np.savez(args.out, **state)
            copy = model()
            engine.load_state(copy, dict(np.load(args.out)))
            again = mse_loss(copy.forward(batch(args.steps, args.rows)[0])[0],
                             batch(args.steps, args.rows)[1])[0]
            print(f"saved {args.out}; one process on the reloaded model: loss {again:.8f}, "
                  f"distributed: {final:.8f}")
            assert abs(again - final) < 1e-10 * max(1.0, abs(final)), (again, final)


if __name__ == "__main__":
    main()
