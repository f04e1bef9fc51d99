"""The gradient helper: bucket plans, GradReducer against numpy, and the
data-parallel example against single-process training."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import collectives as C
import mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bucket_plan_follows_backward_order_and_dtypes() -> None:
    assert C.bucket_plan([4, 4, 4, 8], ["f4", "f4", "f4", "f8"], 8) == [[3], [2, 1], [0]]
    assert C.bucket_plan([100, 1, 1], ["f4"] * 3, 10) == [[2, 1, 0]]
    assert C.bucket_plan([1, 100, 1], ["f4"] * 3, 10) == [[2, 1], [0]]
    assert C.bucket_plan([], [], 10) == []
    sizes = [30] * 10
    plan = C.bucket_plan(sizes, ["f8"] * 10, C.DEFAULT_BUCKET_BYTES)
    assert plan == [list(range(9, -1, -1))]
    with pytest.raises(ValueError, match="bucket_bytes"):
        C.bucket_plan([1], ["f4"], 0)


def _grads(seed: int, rank: int) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, rank])
    shapes = [(7, 5), (5,), (), (300,), (2, 3, 4)]
    dtypes = ["float32", "float32", "float64", "float64", "float32"]
    return [rng.integers(-5, 5, size=s).astype(d) for s, d in zip(shapes, dtypes)]


def reducer_cases(world: Any) -> bool:
    n, r = world.size, world.rank
    want_sum = [sum(gs) for gs in zip(*(_grads(0, i) for i in range(n)))]
    grads = _grads(0, r)
    red = C.GradReducer(world, grads, bucket_bytes=64)
    assert len(red.buckets) >= 4
    for step in range(3):
        for i, g in enumerate(_grads(0, r)):
            grads[i][...] = g
        for i in reversed(range(len(grads))):
            red.ready(i)
            launched = [b.work is not None for b in red.buckets]
            assert launched == sorted(launched, reverse=True), "buckets launched out of order"
        red.wait()
        for g, w in zip(grads, want_sum):
            np.testing.assert_allclose(g, w / n, rtol=1e-6, err_msg=f"step {step}")
    fresh = _grads(1, r)
    red.ready(0, fresh[0])
    red.wait()
    np.testing.assert_allclose(fresh[0], sum(_grads(1, i)[0] for i in range(n)) / n, rtol=1e-6)
    summed = _grads(2, r)
    C.all_reduce_grads(world, summed, bucket_bytes=1 << 10, op="sum")
    for g, w in zip(summed, [sum(gs) for gs in zip(*(_grads(2, i) for i in range(n)))]):
        assert np.array_equal(g, w)
    return True


@pytest.mark.parametrize("n", [1, 3])
def test_grad_reducer_averages_in_place(n: int) -> None:
    assert mesh.spawn(reducer_cases, n, timeout=60) == [True] * n


def test_data_parallel_example_matches_single_process() -> None:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "mesh.launch", "-n", "3",
                        os.path.join(ROOT, "examples", "data_parallel.py")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "3 ranks: weights equal single-process full-batch training: True" in p.stdout
