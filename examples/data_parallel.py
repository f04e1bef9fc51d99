"""Data-parallel training of a small numpy MLP.

    meshrun -n 4 examples/data_parallel.py

Every rank trains on its shard of the batch; a GradReducer averages the
gradients over the ranks, each bucket launched while backward is still
computing the layers below it. At the end every rank checks that its weights
equal those of single-process training on the full batch.
"""
from __future__ import annotations

import sys
from typing import Callable

import numpy as np

import collectives
import mesh

STEPS, BATCH, LR, WIDTH = 40, 840, 0.05, 64   # 840: divisible by every n up to 8


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, 16))
    y = np.sin(x @ rng.standard_normal((16, 1)))
    return x, y


def init_params(seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((16, WIDTH)) / 4, np.zeros(WIDTH),
            rng.standard_normal((WIDTH, 1)) / 8, np.zeros(1)]


def loss_and_grads(p: list[np.ndarray], x: np.ndarray, y: np.ndarray, grads: list[np.ndarray],
                   ready: Callable[[int], None] = lambda i: None) -> float:
    """Mean squared error; writes the gradients, last layer first, calling
    ``ready(i)`` as soon as grads[i] is final."""
    h = np.tanh(x @ p[0] + p[1])
    err = (h @ p[2] + p[3] - y) / len(x)
    grads[3][...] = 2 * err.sum(0)
    ready(3)
    grads[2][...] = 2 * h.T @ err
    ready(2)
    dh = 2 * err @ p[2].T * (1 - h * h)
    grads[1][...] = dh.sum(0)
    ready(1)
    grads[0][...] = x.T @ dh
    ready(0)
    return float((err * err).sum() * len(x))


def sgd(params: list[np.ndarray], grads: list[np.ndarray]) -> None:
    for w, g in zip(params, grads):
        w -= LR * g


def main() -> int:
    x, y = make_data()
    with mesh.init() as world:
        n, rank = world.size, world.rank
        mine = slice(rank * BATCH // n, (rank + 1) * BATCH // n)
        params = init_params()
        grads = [np.zeros_like(w) for w in params]
        reducer = collectives.GradReducer(world, grads, bucket_bytes=2048)
        for step in range(STEPS):
            loss = loss_and_grads(params, x[mine], y[mine], grads, reducer.ready)
            reducer.wait()
            sgd(params, grads)
            if rank == 0 and step % 10 == 0:
                print(f"step {step:3d}  loss on rank 0's shard {loss:.5f}")

        ref = init_params()
        ref_grads = [np.zeros_like(w) for w in ref]
        for _ in range(STEPS):
            loss_and_grads(ref, x, y, ref_grads)
            sgd(ref, ref_grads)
        ok = all(np.allclose(w, r, rtol=1e-10, atol=1e-12) for w, r in zip(params, ref))
        agree = collectives.all_gather_object(world, ok)
        if rank == 0:
            print(f"{n} ranks: weights equal single-process full-batch training: {all(agree)}")
    return 0 if all(agree) else 1


if __name__ == "__main__":
    sys.exit(main())
