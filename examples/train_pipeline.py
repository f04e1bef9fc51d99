"""Train a small numpy MLP on 4 workers: 2 data-parallel replicas x 2 pipeline stages.

    meshrun -n 4 examples/train_pipeline.py [--schedule 1f1b] [--microbatches 4]
        [--steps 20] [--rows 64] [--lr 0.5] [--trace train_pipeline.trace.json]   (the defaults)

--schedule is gpipe, 1f1b, interleaved, zb-h1, zb-h2 or zb-v, or a file of a
schedule of your own (``open("mine.json", "w").write(mine.to_json())``), which
brings its own pipeline ranks and micro-batches. Other numbers of workers run
too: dp=2 where the number is even and at least 4, pp the rest (with a file:
pp its ranks, dp the rest).

Rank 0 prints the schedule grid and the loss of each step (``pipe.step``
returns it on every rank), and writes a Chrome/Perfetto trace of the last
step (open it in ui.perfetto.dev, or `python -m engine.show FILE`).
"""
import argparse
import os

import numpy as np

import engine
import mesh
from engine.layers import mlp_stages, mse_loss, sgd

WIDTHS = [16, 64, 64, 64, 4]


def teacher_batch(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic regression data: a fixed random two-layer network to imitate."""
    teacher = np.random.default_rng(123)
    a, c = teacher.standard_normal((16, 32)) / 4, teacher.standard_normal((32, 4)) / 6
    x = rng.standard_normal((rows, 16))
    return x, np.tanh(x @ a) @ c


def given_schedule(ap: argparse.ArgumentParser, text: str) -> engine.Schedule | None:
    """--schedule's own Schedule where it names a file (None for a built-in's
    name), checked before any worker starts: a usage line, not a traceback
    from inside engine on every rank."""
    if not os.path.isfile(text):
        try:
            engine.schedules.by_name(text, 2, 4)
        except ValueError as e:
            ap.error(f"--schedule: {e}, or a file of a schedule saved as JSON")
        return None
    try:
        with open(text) as f:
            sched = engine.Schedule.from_json(f.read())
        sched.validate()
    except (OSError, ValueError) as e:
        ap.error(f"--schedule {text}: {e}")
    return sched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schedule", default="1f1b",
                    help="gpipe, 1f1b, interleaved, zb-h1, zb-h2 or zb-v, or a JSON file")
    ap.add_argument("--microbatches", type=int, help="4 unless the schedule's file says")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=64, help="rows per replica per step")
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--trace", default="train_pipeline.trace.json")
    args = ap.parse_args()
    own = given_schedule(ap, args.schedule)
    if own is not None and args.microbatches not in (None, own.num_microbatches):
        ap.error(f"--microbatches {args.microbatches}: {args.schedule} runs "
                 f"{own.num_microbatches}")

    with mesh.init() as world:
        dp = 2 if world.size % 2 == 0 and world.size >= 4 else 1
        if own is not None:
            if world.size % own.num_ranks:
                raise SystemExit(f"{args.schedule} is for {own.num_ranks} pipeline ranks: "
                                 f"run a multiple of {own.num_ranks} workers, not {world.size}")
            dp = world.size // own.num_ranks
        grid = mesh.grid(world, dp=dp, pp=world.size // dp)
        pp_rank, replica = grid.coord("pp"), grid.coord("dp")
        sched = own or engine.schedules.by_name(args.schedule, world.size // dp,
                                                args.microbatches or 4)
        if world.rank == 0:
            print(f"{sched.name} on dp={dp} x pp={world.size // dp}:\n{sched.render()}")
            sim = sched.simulate({"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0})
            print(f"simulated with F=1 B=2 and free messages: {sim}\n(the schedule's own "
                  f"idle time: on stages this small a real step is mostly messages and "
                  f"overhead; python -m engine.show {args.trace} shows both)")

        stages = engine.stages_for_rank(mlp_stages(WIDTHS, sched.num_stages, seed=0),
                                        sched, pp_rank)
        pipe = engine.Pipeline(grid, stages, sched, loss_fn=mse_loss)
        rng = np.random.default_rng(1 + replica)  # each replica sees its own data
        for step in range(args.steps):
            x, y = teacher_batch(rng, args.rows)
            loss = pipe.step(x if pipe.first else None, y if pipe.last else None)
            sgd(stages, args.lr)
            if world.rank == 0:                 # (the step's loss, on every rank)
                print(f"step {step:3d}  loss {loss:.6f}", flush=True)

        path = pipe.write_trace(args.trace)
        if path:
            print(f"trace of the last step: {path}")


if __name__ == "__main__":
    main()
