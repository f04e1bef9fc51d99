"""DeepSpeed's pipeline partitions as layer counts (engine.ds_pipe's
``partition_method``): ``uniform`` its ``partition_uniform``, ``balanced``
its ``partition_balanced`` of the layers' weights."""
from __future__ import annotations

__all__ = ["uniform", "balanced"]


def uniform(n: int, parts: int) -> list[int]:
    """DeepSpeed's ``partition_uniform`` as layer counts: ``n // parts``
    each, the first ``n % parts`` stages one more."""
    return [n // parts + (s < n % parts) for s in range(parts)]


def balanced(weights: list[float], parts: int) -> list[int]:
    """DeepSpeed's ``partition_balanced`` as layer counts: the contiguous
    cut into ``parts`` non-empty stages whose heaviest and lightest stage
    differ least (its dynamic program; among equals, the last cut point
    found, as its ``>=``); uniform where there are no more layers than
    stages."""
    n = len(weights)
    if n <= parts:
        return uniform(n, parts)
    inf = float("inf")
    pre = [0.0]
    for w in weights:
        pre.append(pre[-1] + float(w))
    # over the first i layers in j stages: the best spread, its max and min, the last cut
    cost = [[inf] * (parts + 1) for _ in range(n + 1)]
    hi = [[inf] * (parts + 1) for _ in range(n + 1)]
    lo = [[inf] * (parts + 1) for _ in range(n + 1)]
    at = [[0] * (parts + 1) for _ in range(n + 1)]
    cost[0][0] = hi[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, min(i, parts) + 1):
            for k in range(i):
                top = max(hi[k][j - 1], pre[i] - pre[k])
                low = min(lo[k][j - 1], pre[i] - pre[k])
                spread = top - low
                if cost[i][j] >= spread:
                    cost[i][j], hi[i][j], lo[i][j], at[i][j] = spread, top, low, k
    cuts = [n]
    for j in range(parts, 0, -1):
        cuts.append(at[cuts[-1]][j])
    cuts.reverse()
    return [b - a for a, b in zip(cuts, cuts[1:])]
