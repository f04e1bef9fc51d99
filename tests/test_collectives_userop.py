"""User-defined reduction ops (collectives.Op, mpi4py's MPI.Op.Create):
every reducing collective against a one-process numpy reference, for
non-commutative ops (a 2x2 matrix product a row, an affine map's
composition in mpi4py's in-place form) and commutative ones, numpy arrays
and torch tensors, in groups of 1 to 4 ranks inside one spawn, on the
same-host board (payloads, and arrays past them read across processes)
and over sockets (MESH_CMA=0). Ranks that disagree on the op, and an op
that fails, are in test_collectives_mismatch.py; across hosts in
test_collectives_hier.py."""
from __future__ import annotations

import io
import os
import sys
from functools import reduce as fold
from typing import Any

import numpy as np
import pytest

import collectives as C
import mesh

pytestmark = pytest.mark.timeout(120)


def matmul_rows(a: Any, b: Any) -> Any:
    """Rows of 4 read as 2x2 matrices, multiplied row by row: a @ b."""
    return (a.reshape(-1, 2, 2) @ b.reshape(-1, 2, 2)).reshape(a.shape)


def compose(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
    """mpi4py's form: rows (scale, shift) of x -> scale * x + shift, the
    lower ranks' map applied first, written into inoutbuf."""
    x = np.frombuffer(inbuf, datatype).reshape(-1, 2)
    y = np.frombuffer(inoutbuf, datatype).reshape(-1, 2)
    y[:, 1] += x[:, 1] * y[:, 0]
    y[:, 0] *= x[:, 0]


def compose_ref(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.stack([a[:, 0] * b[:, 0], a[:, 1] * b[:, 0] + b[:, 1]], axis=1)


MAT = C.Op(matmul_rows)
AFFINE = C.Op(compose, name="affine")
GCD = C.Op(np.gcd, commute=True)


def mats(seed: int, rows: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(-2, 3, (rows, 4)).astype(np.int64)


def maps(seed: int, rows: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(1, 4, rows), rng.integers(-5, 6, rows)], 1).astype(float)


def _groups(world: Any) -> list[Any]:
    """Groups of 1, 2, 3 and 4 ranks (None where this rank is not in one)."""
    return [world.group([world.rank]), world.group([0, 1]), world.group([1, 2, 3]),
            world.group(list(range(world.size)))]


BIG = 2100
"""Rows of 4 int64 (67 KB): past the board's payload (64 KiB), read across processes."""


def _both_paths(world: Any) -> tuple[list[str], list[str]]:
    """_check on the same-host board, then on new groups with MESH_CMA=0
    (sockets); what was wrong, and MESH_COLL_DEBUG's lines of user ops."""
    said = io.StringIO()
    was, sys.stderr = sys.stderr, said
    try:
        wrong = _check(_groups(world))
        os.environ["MESH_CMA"] = "0"    # (read as a group first asks for the board)
        wrong += [f"sockets: {w}" for w in _check(_groups(world))]
    finally:
        sys.stderr = was
        del os.environ["MESH_CMA"]
    return wrong, [line for line in said.getvalue().splitlines() if "user op" in line]


def _check(groups: list[Any]) -> list[str]:
    import torch
    wrong: list[str] = []

    def same(what: str, got: Any, want: Any) -> None:
        if got is None or want is None:
            ok = got is None and want is None
        else:
            got = got.numpy() if isinstance(got, torch.Tensor) else got
            ok = np.array_equal(got, want) and got.dtype == np.asarray(want).dtype
        if not ok:
            wrong.append(f"{what} on {g.name}: {got!r} != {want!r}")

    for g in groups:
        if g is None:
            continue
        n, r, w = g.size, g.rank, g.ranks
        seed = [10 * x for x in w]
        a = mats(seed[r])
        same("all_reduce", C.all_reduce(g, a, op=MAT), fold(matmul_rows, map(mats, seed)))
        # past the board's payload: read across processes, the order the same
        big = [mats(s + 3, BIG) for s in seed]
        same("big all_reduce", C.all_reduce(g, big[r].copy(), op=MAT), fold(matmul_rows, big))
        a = big[r].copy()
        C.reduce(g, a, root=n - 1, op=MAT)
        same("big reduce", a, fold(matmul_rows, big) if r == n - 1 else big[r])
        counts = [BIG - 7 * (n - 1)] + [7] * (n - 1)
        lo = sum(counts[:r])
        same("big reduce_scatter_v", C.reduce_scatter_v(g, big[r], counts, op=MAT),
             fold(matmul_rows, big)[lo:lo + counts[r]])
        same("big scan", C.scan(g, big[r], op=MAT), fold(matmul_rows, big[:r + 1]))
        same("big exscan", C.exscan(g, big[r], op=MAT),
             fold(matmul_rows, big[:r]) if r else None)
        for root in range(n):
            a = mats(seed[r])
            C.reduce(g, a, root=root, op=MAT)
            same(f"reduce root={root}", a, fold(matmul_rows, map(mats, seed)) if r == root
                 else mats(seed[r]))
        rows = mats(seed[r] + 1, 2 * n)
        want = fold(matmul_rows, [mats(s + 1, 2 * n) for s in seed])
        same("reduce_scatter", C.reduce_scatter(g, rows, op=MAT), want[2 * r:2 * r + 2])
        counts = [(j % 3) for j in range(n)]
        lo = sum(counts[:r])
        rows = mats(seed[r] + 2, sum(counts))
        want = fold(matmul_rows, [mats(s + 2, sum(counts)) for s in seed])
        same("reduce_scatter_v", C.reduce_scatter_v(g, rows, counts, op=MAT),
             want[lo:lo + counts[r]])
        same("scan", C.scan(g, mats(seed[r]), op=MAT),
             fold(matmul_rows, map(mats, seed[:r + 1])))
        same("exscan", C.exscan(g, mats(seed[r]), op=MAT),
             fold(matmul_rows, map(mats, seed[:r])) if r else None)
        # mpi4py's in-place form; a 0-d array; a commutative op
        same("affine", C.all_reduce(g, maps(seed[r]), op=AFFINE),
             fold(compose_ref, map(maps, seed)))
        same("affine scan", C.scan(g, maps(seed[r]), op=AFFINE),
             fold(compose_ref, map(maps, seed[:r + 1])))
        same("gcd 0-d", C.all_reduce(g, np.array(12 * (w[r] + 1)), op=GCD),
             np.array(fold(np.gcd, [12 * (x + 1) for x in w])))
        same("empty", C.all_reduce(g, np.zeros((0, 4), np.int64), op=MAT),
             np.zeros((0, 4), np.int64))
        work = C.all_reduce(g, mats(seed[r]), op=MAT, async_op=True)
        same("async all_reduce", work.wait(), fold(matmul_rows, map(mats, seed)))
        # torch tensors: fn(a, b) gets tensors (bfloat16 widened: float32)
        seen: list[Any] = []

        def tmat(x: Any, y: Any) -> Any:
            seen.append((type(x).__name__, x.dtype))
            return (x.view(-1, 2, 2) @ y.view(-1, 2, 2)).view(x.shape)
        top = C.Op(tmat, name="tmat")
        t = torch.from_numpy(mats(seed[r]).astype(np.float64))
        C.all_reduce(g, t, op=top)
        same("torch all_reduce", t, fold(matmul_rows, map(mats, seed)).astype(np.float64))
        t = torch.from_numpy(mats(seed[r], 2 * n).astype(np.float32)).bfloat16()
        got = C.reduce_scatter(g, t, op=top)
        want = fold(matmul_rows, [mats(s, 2 * n) for s in seed])[2 * r:2 * r + 2]
        if got.dtype != torch.bfloat16:
            wrong.append(f"torch reduce_scatter gave {got.dtype}")
        same("torch bfloat16 reduce_scatter", got.float(), want.astype(np.float32))
        t = torch.from_numpy(mats(seed[r]).astype(np.float64))
        same("torch exscan", C.exscan(g, t, op=top), fold(matmul_rows, map(
            mats, seed[:r])).astype(np.float64) if r else None)
        # mpi4py's form on a tensor: numpy arrays and dtype, as mpi4py's buffers
        same("torch affine scan", C.scan(g, torch.from_numpy(maps(seed[r])), op=AFFINE),
             fold(compose_ref, map(maps, seed[:r + 1])))
        t = torch.from_numpy(maps(seed[r]).astype(np.float32)).bfloat16()
        got = C.all_reduce(g, t, op=AFFINE)
        same("torch bfloat16 affine", got.float(),
             fold(compose_ref, map(maps, seed)).astype(np.float32))
        # (at 3 ranks rank 0 folds into rank 1: its all_reduce and exscan combine nothing)
        if n > 1 and not {("Tensor", torch.float32)} <= set(seen) <= {
                ("Tensor", torch.float64), ("Tensor", torch.float32)}:
            wrong.append(f"torch operands: {set(seen)}")
    return wrong


def test_user_ops_match_numpy_in_groups_of_one_to_four_ranks() -> None:
    """In rank order (the products differ in any other order), the same
    bits on every rank, a reduce's non-roots' arrays untouched; on the
    same-host board, and over sockets where MESH_CMA=0."""
    got = mesh.spawn(_both_paths, 4, timeout=100, env={"MESH_COLL_DEBUG": "1"})
    for rank, (wrong, lines) in enumerate(got):
        assert wrong == [], f"rank {rank}: {wrong}"
        for name in ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_v", "scan",
                     "exscan"):
            took = {line.split(": user op, ", 1)[1].rsplit(", ", 1)[0] for line in lines
                    if line.startswith(f"meshrun rank {rank}: {name} on ")}
            assert "same-host board" in took and any("over sockets" in t for t in took) \
                and len(took) == 2, (rank, name, lines)


def test_an_op_is_checked_where_it_is_made() -> None:
    with pytest.raises(TypeError, match="collectives.Op takes a function"):
        C.Op("sum")     # type: ignore[arg-type]
    with pytest.raises(TypeError, match="commute must be True or False"):
        C.Op(np.add, commute=1)     # type: ignore[arg-type]
    assert repr(AFFINE) == "collectives.Op('affine', commute=False)"
    assert AFFINE.label == "Op('affine')" and GCD.label == "Op('numpy.gcd', commute)"
    first, second = C.Op(lambda a, b: a + b), C.Op(lambda a, b: a * b)
    assert first.name == second.name and first.label != second.label
    assert C.Op(lambda a, b: a + b).label == first.label


def test_a_user_op_where_only_builtin_ones_go_says_where_it_goes() -> None:
    """(all_reduce_loc, the object collectives, the torch backend)"""
    from collectives.ops import resolve
    with pytest.raises(ValueError, match=r"a user op \(collectives.Op\('affine', commute="
                                         r"False\)\) is taken by all_reduce, reduce, "):
        resolve(AFFINE, np.float64)
