"""Every collective and op against numpy, over the matrix of tests/conftest.py
(transport path x array backend x communicator) and at world sizes 1, 2, 5
and 8.

One spawn per cell runs the whole battery (that is what keeps the suite
fast on two cores); every rank can generate every rank's input from the
shared seed, so each computes the numpy reference itself. Inputs are small
integers (also in float dtypes), so every reduction order gives the exact
same answer and results are compared exactly. The body is written on numpy
arrays against ``C``, the collectives module seen through the cell's array
backend (tests/backends.py).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

import collectives as C
import mesh
from collectives.ops import resolve

from backends import Cell
from conftest import PATHS

DTYPES = ["float32", "float64", "int32", "int64", "uint8", "int16", "float16", "complex64",
          "bool"]
SHAPES = [(), (0,), (1,), (2,), (3,), (7,), (4, 3), (1, 0, 2), (1001,), (3, 333)]


def data(seed: int, rank: int, shape: tuple, dtype: str) -> np.ndarray:
    """Rank ``rank``'s input: small integers, so sums and products stay exact."""
    rng = np.random.default_rng([seed, rank])
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    lo = 0 if dt.kind == "u" else -3
    return rng.integers(lo, 4, size=shape).astype(dt)


def reference(op: str, xs: list[np.ndarray]) -> np.ndarray:
    fn = {"sum": np.add, "avg": np.add, "prod": np.multiply, "min": np.minimum,
          "max": np.maximum, "band": np.bitwise_and, "bor": np.bitwise_or,
          "bxor": np.bitwise_xor, "land": np.logical_and, "lor": np.logical_or,
          "lxor": np.logical_xor}[op]
    acc = xs[0].copy()
    for x in xs[1:]:
        acc = fn(acc, x).astype(xs[0].dtype)
    if op == "avg":     # (integers: truncated toward zero, as astype does)
        acc = (acc / len(xs)).astype(xs[0].dtype)
    return acc


def valid(op: str, dtype: str) -> bool:
    k = np.dtype(dtype).kind
    return not ((op in ("band", "bor", "bxor", "land", "lor", "lxor") and k not in "biu")
                or (op == "avg" and k == "b") or (op in ("min", "max") and k == "c"))


def expect(got: Any, want: Any, what: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, \
        f"{what}: got {got.dtype}{got.shape}, want {want.dtype}{want.shape}"
    if want.dtype.kind in "fc":
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3, err_msg=what)
    else:
        assert np.array_equal(got, want), f"{what}: got {got}, want {want}"


def _all_reduce_cases(C: Any, g: Any, seed: int) -> None:
    n, r = g.size, g.rank
    for alg in ("rd", "ring"):
        for op in C.OPS:
            for dtype in DTYPES:
                if not valid(op, dtype):
                    continue
                shape = (5, 3) if dtype != "float16" else (9,)
                a = data(seed, r, shape, dtype)
                C.all_reduce(g, a, op=op, algorithm=alg)
                want = reference(op, [data(seed, i, shape, dtype) for i in range(n)])
                expect(a, want, f"all_reduce {alg} {op} {dtype} n={n}")
        for shape in SHAPES + [(n - 1,), (n + 1,)]:
            a = data(seed + 1, r, shape, "float32")
            out = C.all_reduce(g, a, algorithm=alg)
            assert out is a
            want = reference("sum", [data(seed + 1, i, shape, "float32") for i in range(n)])
            expect(a, want, f"all_reduce {alg} shape {shape} n={n}")
        want = reference("max", [data(seed + 2, i, (6, 8), "int64") for i in range(n)])
        for pick in (np.s_[:, ::2], np.s_[::-1, 1:5], np.s_[1:4]):
            base = data(seed + 2, r, (6, 8), "int64")
            before = base.copy()
            C.all_reduce(g, base[pick], op="max", algorithm=alg)
            before[pick] = want[pick]
            expect(base, before, f"all_reduce {alg} on view {pick} n={n}")
        fortran = np.asfortranarray(data(seed + 2, r, (6, 8), "int64"))
        C.all_reduce(g, fortran, op="max", algorithm=alg)
        expect(fortran, want, f"all_reduce {alg} Fortran order n={n}")
    rng = np.random.default_rng([seed, r, 9])
    a = rng.standard_normal(777).astype(np.float32)
    C.all_reduce(g, a)
    everyone = C.all_gather(g, a)
    assert all(np.array_equal(everyone[0], x) for x in everyone), "ranks disagree bitwise"


def _rooted_cases(C: Any, g: Any, seed: int) -> None:
    n, r = g.size, g.rank
    for root in sorted({0, n - 1, n // 2}):
        for alg in ("tree", "chain"):
            for shape, dtype in [((), "int32"), ((0,), "float32"), ((1001,), "float64"),
                                 ((3, 4), "uint8")]:
                a = data(seed + root, r, shape, dtype)
                assert C.broadcast(g, a, root=root, algorithm=alg) is a
                expect(a, data(seed + root, root, shape, dtype),
                       f"broadcast {alg} root {root} {shape} n={n}")
            for op in ("sum", "prod", "max", "bxor", "avg"):
                dtype = "float64" if op == "avg" else "int64"
                a = data(seed + 3, r, (2, 51), dtype)
                mine = a.copy()
                C.reduce(g, a, root=root, op=op, algorithm=alg)
                want = reference(op, [data(seed + 3, i, (2, 51), dtype) for i in range(n)])
                expect(a, want if r == root else mine, f"reduce {alg} {op} root {root} n={n}")
        for shape, dtype in [((2, 3), "int16"), ((), "float32")]:
            got = C.gather(g, data(seed, r, shape, dtype), root=root)
            if r == root:
                expect(got, np.stack([data(seed, i, shape, dtype) for i in range(n)]),
                       f"gather {shape} root {root} n={n}")
            else:
                assert got is None
        for shape in [(n, 5), (n,)]:
            src = data(seed + 4, root, shape, "float32")
            row = C.scatter(g, src if r == root else None, root=root)
            expect(row, src[r], f"scatter {shape} root {root} n={n}")


def _gather_scatter_cases(C: Any, g: Any, seed: int) -> None:
    n, r = g.size, g.rank
    for shape, dtype in [((), "float32"), ((0,), "int8"), ((5,), "int64"), ((3, 700), "float32"),
                         ((2, 2), "bool")]:
        got = C.all_gather(g, data(seed, r, shape, dtype))
        expect(got, np.stack([data(seed, i, shape, dtype) for i in range(n)]).reshape(
            (n,) + shape), f"all_gather {shape} {dtype} n={n}")
    for rows, op, dtype in [(n, "sum", "float32"), (3 * n, "min", "int32"),
                            (2 * n, "avg", "float64"), (n, "bor", "uint8"), (0, "sum", "int64")]:
        shape = (rows, 37)
        got = C.reduce_scatter(g, data(seed, r, shape, dtype), op=op)
        want = reference(op, [data(seed, i, shape, dtype) for i in range(n)])
        m = rows // n
        expect(got, want[r * m:(r + 1) * m], f"reduce_scatter {op} {shape} n={n}")
    _uneven_cases(C, g, seed)
    for shape in [(n,), (2 * n, 3), (0,)]:
        got = C.all_to_all(g, data(seed, r, shape, "int32"))
        m = shape[0] // n
        want = np.concatenate([data(seed, i, shape, "int32")[r * m:(r + 1) * m] for i in range(n)])
        expect(got, want.reshape(shape), f"all_to_all {shape} n={n}")
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        C.all_to_all(g, data(seed, r, (), "int32"))
    for shape, dtype, op in [((), "int64", "sum"), ((5,), "float32", "prod"), ((0,), "int8", "sum"),
                             ((3, 4), "int32", "max"), ((7,), "bool", "bor"),
                             ((1001,), "float64", "min"), ((2,), "complex64", "sum")]:
        xs = [data(seed, i, shape, dtype) for i in range(n)]
        mine = xs[r].copy()
        expect(C.scan(g, mine, op=op), reference(op, xs[:r + 1]), f"scan {op} {shape} n={n}")
        got = (C.exscan(g, mine, op=op, async_op=True).wait() if dtype == "float32"
               else C.exscan(g, mine, op=op))
        if r == 0:
            assert got is None, f"exscan on rank 0 gave {got}"
        else:
            expect(got, reference(op, xs[:r]), f"exscan {op} {shape} n={n}")
        expect(mine, xs[r], f"scan's input {op} {shape} n={n}")      # only read
    with pytest.raises(ValueError, match=r"rank \d+: scan on group .* takes sum prod min max "
                                         r"band bor bxor land lor lxor, not 'avg'"):
        C.scan(g, data(seed, r, (2,), "float32"), op="avg")
    C.barrier(g)
    assert C.all_gather_object(g, {"rank": r, "t": (r, "x")}) == \
        [{"rank": i, "t": [i, "x"]} for i in range(n)]
    assert C.broadcast_object(g, {"w": [1.5, None, "s"]} if r == n - 1 else None,
                              root=n - 1) == {"w": [1.5, None, "s"]}
    got = C.all_gather_object(g, {"step": np.int64(r), "loss": np.float32(0.5)})   # numpy
    assert got == [{"step": i, "loss": 0.5} for i in range(n)] and type(got[r]["step"]) is int
    got = C.gather_object(g, {"r": r, "t": (r, "x")}, root=n - 1)     # mpi4py's gather
    assert got == ([{"r": i, "t": [i, "x"]} for i in range(n)] if r == n - 1 else None), got
    assert C.scatter_object(g, [[i, None] for i in range(n)] if r == 0 else None) == [r, None]
    assert C.scatter_object(g, tuple(range(n)) if r == n - 1 else None, root=n - 1,
                            async_op=True).wait() == r
    assert C.all_to_all_object(g, [{"to": j, "t": (r, "x")} for j in range(n)]) == \
        [{"to": r, "t": [i, "x"]} for i in range(n)]                # mpi4py's alltoall
    assert C.all_to_all_object(g, tuple(range(r, r + n)), async_op=True).wait() == \
        [i + r for i in range(n)]


def _uneven_cases(C: Any, g: Any, seed: int) -> None:
    """all_gather_v and reduce_scatter_v (MPI's Allgatherv, Reduce_scatter):
    counts with zeros, given and (all_gather_v) exchanged, async, small
    (payloads on the board) and 80 KiB up (read across, the ring); and
    counts that differ on one rank: MismatchError on every rank, naming
    both ranks' counts."""
    n, r = g.size, g.rank
    cases = [([(2 * i + 1) % 4 for i in range(n)], "float32", "sum"),
             ([0] * n, "int64", "max"), ([0] * (n - 1) + [3], "float16", "avg")]
    if os.environ.get("MESH_SHM") != "0":   # (80 KiB up: read across on the board)
        cases.append(([4000 * (i % 2) for i in range(n)], "int32", "max"))
    for k, (counts, dtype, op) in enumerate(cases):
        xs = [data(seed + 1, i, (counts[i], 5), dtype) for i in range(n)]
        want = np.concatenate(xs)
        if k % 2 == 0:
            got = C.all_gather_v(g, xs[r], counts)
        else:       # the counts exchanged
            got = C.all_gather_v(g, xs[r], async_op=True).wait()
        expect(got, want, f"all_gather_v {counts} n={n}")
        ys = [data(seed + 2, i, (sum(counts), 5), dtype) for i in range(n)]
        at = sum(counts[:r])
        want = reference(op, ys)[at:at + counts[r]]
        if k % 2 == 0:
            got = C.reduce_scatter_v(g, ys[r], counts, op=op)
        else:
            got = C.reduce_scatter_v(g, ys[r], np.array(counts), op=op, async_op=True).wait()
        expect(got, want, f"reduce_scatter_v {op} {counts} n={n}")
        root = k % n
        got = (C.gather_v(g, xs[r], counts, root=root) if k % 2 == 0 else
               C.gather_v(g, xs[r], np.array(counts), root=root, async_op=True).wait())
        if r == root:
            expect(got, np.concatenate(xs), f"gather_v {counts} root={root} n={n}")
        else:
            assert got is None, f"gather_v off the root gave {got}"
        got = (C.scatter_v(g, ys[r] if r == root else None, counts, root=root) if k % 2 == 0
               else C.scatter_v(g, ys[r], counts, root=root, async_op=True).wait())
        at = sum(counts[:r])
        expect(got, ys[root][at:at + counts[r]], f"scatter_v {counts} root={root} n={n}")
    if n == 1:
        return
    if os.environ.get("MESH_SHM") != "0":
        # on the board a reduce_scatter's share has the same bits at every size: its
        # own rows first, then the peers' in ring order (small, as payloads, too; the
        # small reduce_scatter_v took all_reduce's rank order)
        rng = np.random.default_rng([seed, r])
        counts = [(3 * i) % 5 + 1 for i in range(n)]
        z = rng.standard_normal((sum(counts), 3))
        zs = C.all_gather(g, z)
        zs = [np.asarray(zs[i]) for i in range(n)]
        for got, (lo, hi) in ((C.reduce_scatter_v(g, z, counts), (sum(counts[:r]),
                                                                  sum(counts[:r + 1]))),
                              (C.reduce_scatter(g, z[:n * (len(z) // n)]),
                               (r * (len(z) // n), (r + 1) * (len(z) // n)))):
            want = zs[r][lo:hi].copy()
            for k in range(1, n):
                want += zs[(r + k) % n][lo:hi]
            assert np.asarray(got).tobytes() == want.tobytes(), \
                f"rank {r}: reduce_scatter share {np.asarray(got)} is not {want} bit for bit"
    odd = n - 1         # the last rank's counts differ from the others'
    # (all zero but the odd rank's first: over sockets the ring's links carried no
    # message, so rank 0 returned and the odd rank waited out its timeout)
    for same, other in (([1] * n, [1] * (n - 1) + [2]), ([0] * n, [1] + [0] * (n - 1))):
        counts = same if r != odd else other
        for call in (lambda: C.all_gather_v(g, data(seed, r, (counts[r], 2), "int32"), counts,
                                            timeout=20),
                     lambda: C.reduce_scatter_v(g, data(seed, r, (sum(counts), 2), "int32"),
                                                counts, op="max", timeout=20)):
            with pytest.raises(mesh.MismatchError) as e:
                call()
            said = str(e.value)
            assert f"counts={same}" in said and f"counts={other}" in said \
                and f"rank {g.ranks[odd]} called" in said, said
        # gather_v's leaves and scatter_v's receivers whose ring neighbours agree with
        # them may finish first (over sockets): they raise it at the group's next call
        for call in (lambda: C.gather_v(g, data(seed, r, (counts[r], 2), "int32"), counts,
                                        root=odd, timeout=20),
                     lambda: C.scatter_v(g, data(seed, r, (sum(counts), 2), "int32"), counts,
                                         root=0, timeout=20)):
            said = ""
            try:
                call()
            except mesh.MismatchError as e:
                said = str(e)
            _heard_from_all(g)
            try:
                C.barrier(g)
            except mesh.MeshError as e:     # (a late rank's MismatchError aborts the others')
                assert said or isinstance(e, mesh.MismatchError), e
                said = said or str(e)
            assert f"counts={same}" in said and f"counts={other}" in said, said
    C.barrier(g)    # (the group goes on)


def _heard_from_all(g: Any) -> None:
    """A message to and from every other member of ``g`` (not a collective):
    the aborts of its last call, sent before this, have arrived."""
    sent = [g.isend(None, j, tag=11) for j in range(g.size) if j != g.rank]
    for j in range(g.size):
        if j != g.rank:
            g.recv(j, tag=11, timeout=60.0)
    for req in sent:
        req.wait()


def _async_cases(C: Any, g: Any, seed: int) -> None:
    n, r = g.size, g.rank
    arrays = [data(seed + k, r, (50 * k + 1,), "float64") for k in range(6)]
    works = [C.all_reduce(g, a, async_op=True, algorithm=("rd", "ring")[k % 2])
             for k, a in enumerate(arrays)]
    gathered = C.all_gather(g, np.array([r]), async_op=True)
    busy = np.ones((200, 200)) @ np.ones((200, 200))
    assert busy[0, 0] == 200
    expect(gathered.wait(), np.arange(n)[:, None], "async all_gather")
    assert all(w.done() for w in works), "lane finished a later collective before earlier ones"
    for k in reversed(range(6)):
        assert works[k].wait() is arrays[k]
        want = reference("sum", [data(seed + k, i, (50 * k + 1,), "float64") for i in range(n)])
        expect(arrays[k], want, f"async all_reduce #{k} n={n}")
    b = data(seed, r, (4,), "int32")
    w = C.broadcast(g, b, root=0, async_op=True)
    C.barrier(g)
    assert w.done()
    if C.backend.host:   # a device result is copied back at wait()
        expect(b, data(seed, 0, (4,), "int32"), "blocking call after async")
    w.wait()
    expect(b, data(seed, 0, (4,), "int32"), "async broadcast after wait")
    _lane_lingers(C, g)


def _lane_lingers(C: Any, g: Any) -> None:
    """One lane thread runs consecutive async calls (it waits for the next
    one instead of exiting, and a thread is not started per call), and
    runner.release makes it exit at once."""
    from collectives import lane, runner
    runner.release(g)       # the lane of the calls above, with its own linger
    linger, lane._LINGER_S = lane._LINGER_S, 60.0
    try:
        threads = []
        for _ in range(2):
            C.all_reduce(g, np.ones(3), async_op=True).wait()
            threads.append(runner._state(g).thread)
        assert threads[0] is threads[1] and threads[0] is not None, threads
        assert threads[0].is_alive()
        runner.release(g)
        assert not threads[0].is_alive(), "the lane outlived runner.release"
    finally:
        lane._LINGER_S = linger


def _random_cases(C: Any, g: Any, seed: int, count: int = 16) -> None:
    """Shapes, dtypes and ops drawn from a generator every rank seeds alike."""
    n, r = g.size, g.rank
    rng = np.random.default_rng([seed, 4242])
    for case in range(count):
        dtype = DTYPES[rng.integers(len(DTYPES))]
        ops = [o for o in C.OPS if valid(o, dtype)]
        op = ops[rng.integers(len(ops))]
        shape = tuple(int(d) for d in rng.integers(0, 7, size=rng.integers(0, 4)))
        what = f"random case {case}: {op} {dtype} {shape} n={n}"
        xs = [data(seed + case, i, shape, dtype) for i in range(n)]
        a = xs[r].copy()
        C.all_reduce(g, a, op=op)
        expect(a, reference(op, xs), "all_reduce " + what)
        expect(C.all_gather(g, xs[r]), np.stack(xs), "all_gather " + what)
        rows = (n * int(rng.integers(0, 3)),) + shape
        ys = [data(seed + case, i, rows, dtype) for i in range(n)]
        m = rows[0] // n
        expect(C.reduce_scatter(g, ys[r], op=op), reference(op, ys)[r * m:(r + 1) * m],
               "reduce_scatter " + what)


def _torch_cases(g: Any, seed: int) -> None:
    """What the numpy-written body cannot say: bfloat16 through every
    collective (reductions widened to float32 and rounded once: the same
    bits on every rank), tensors' own non-contiguous views, results as
    tensors of the caller's dtype, and the dtypes meshrun refuses."""
    import torch
    n, r = g.size, g.rank
    bf = torch.bfloat16

    def tdata(rank: int, shape: tuple, dtype: Any = bf) -> Any:
        return torch.from_numpy(data(seed, rank, shape, "float32")).to(dtype)

    def same(got: Any, want: Any, what: str) -> None:
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype, \
            f"{what}: got {type(got).__name__} {getattr(got, 'dtype', '')}, want {want.dtype}"
        assert torch.equal(got, want), f"{what}: got {got}, want {want}"

    xs = [tdata(i, (5, 3)) for i in range(n)]
    for alg in ("rd", "ring"):
        for op in ("sum", "prod", "min", "max", "avg"):
            a = xs[r].clone()
            assert C.all_reduce(g, a, op=op, algorithm=alg) is a
            wide = torch.from_numpy(reference(op, [x.float().numpy() for x in xs]))
            same(a, wide.to(bf), f"bfloat16 all_reduce {alg} {op} n={n}")
    rng = np.random.default_rng([seed, r, 5])
    for count, alg in [(999, "rd"), (999, "ring"), (40000, None)]:
        a = torch.from_numpy(1 + 0.1 * rng.standard_normal(count).astype(np.float32)).to(bf)
        wide = a.float()
        C.all_reduce(g, a, op="avg", algorithm=alg)
        C.all_reduce(g, wide, op="avg", algorithm=alg)
        same(a, wide.to(bf), f"bfloat16 all_reduce {alg} {count}: rounded once, from float32")
        everyone = C.all_gather(g, a)
        assert all(torch.equal(everyone[0].view(torch.int16), e.view(torch.int16))
                   for e in everyone), f"bfloat16 all_reduce {alg} {count}: ranks differ"
    for root in sorted({0, n - 1}):
        b = xs[r].clone()
        assert C.broadcast(g, b, root=root) is b
        same(b, xs[root], f"bfloat16 broadcast root {root}")
        b = xs[r].clone()
        C.reduce(g, b, root=root, op="max")
        same(b, torch.stack(xs).max(0).values if r == root else xs[r], f"bfloat16 reduce {root}")
        got = C.gather(g, xs[r], root=root)
        assert got is None if r != root else torch.equal(got, torch.stack(xs))
        rows = torch.stack(xs)
        same(C.scatter(g, rows if r == root else torch.empty(0, dtype=bf), root=root), xs[r],
             f"bfloat16 scatter root {root}")
        same(C.scatter(g, rows[:, 0, 0] if r == root else torch.empty(0, dtype=bf), root=root),
             xs[r][0, 0], f"bfloat16 scatter of 0-d rows root {root}")
    same(C.all_gather(g, xs[r]), torch.stack(xs), "bfloat16 all_gather")
    ys = [tdata(i, (2 * n, 3)) for i in range(n)]
    same(C.reduce_scatter(g, ys[r]), sum(y.float() for y in ys)[2 * r:2 * r + 2].to(bf),
         "bfloat16 reduce_scatter")
    same(C.all_to_all(g, ys[r]), torch.cat([y[2 * r:2 * r + 2] for y in ys]),
         "bfloat16 all_to_all")
    for dtype in (bf, torch.float32, torch.int64):    # the tensor's own strided views
        base = tdata(r, (6, 8), dtype)
        want = base.clone()
        want[1:, ::3] = sum(tdata(i, (6, 8), dtype) for i in range(n))[1:, ::3].to(dtype)
        C.all_reduce(g, base[1:, ::3], algorithm="ring")
        same(base, want, f"all_reduce of a strided {dtype} view")
        t = tdata(r, (4, 3), dtype).t()
        C.broadcast(g, t, root=0)
        same(t, tdata(0, (4, 3), dtype).t(), f"broadcast into a transposed {dtype} tensor")
    for dtype in (torch.float32, torch.int64):   # tiny ones: the short way once settled
        for _ in range(3):
            t = tdata(r, (3,), dtype)
            assert C.all_reduce(g, t) is t       # in place, the tensor itself
            same(t, sum(tdata(i, (3,), dtype) for i in range(n)).to(dtype), f"tiny {dtype}")
            base = tdata(r, (6, 8), dtype)
            want = base.clone()
            want[1:, ::3] = sum(tdata(i, (6, 8), dtype) for i in range(n))[1:, ::3].to(dtype)
            C.all_reduce(g, base[1:, ::3], op="sum")
            same(base, want, f"tiny all_reduce of a strided {dtype} view")
    p = torch.nn.Parameter(tdata(r, (3,), torch.float32))
    C.broadcast(g, p, root=0)      # as DDP does at the start: in place, autograd untouched
    assert p.requires_grad and torch.equal(p.detach(), tdata(0, (3,), torch.float32))
    for bad in (torch.ones(2, dtype=torch.complex32),
                torch.quantize_per_tensor(torch.ones(2), 0.5, 0, torch.quint8)):
        with pytest.raises(TypeError) as err:
            C.all_reduce(g, bad)
        assert str(bad.dtype) in str(err.value) and "all_reduce" in str(err.value) \
            and "collectives.all_reduce" not in str(err.value), str(err.value)
        with pytest.raises(TypeError, match=str(bad.dtype)):
            C.all_gather(g, bad)


def battery(world: Any, seed: int, cell: Cell) -> int | None:
    """Every case of the battery on the cell's communicator and backend;
    returns the communicator's size (None on a rank outside it)."""
    g = cell.communicator(world)
    if g is None:
        return None
    C = cell.collectives(world)
    _random_cases(C, g, seed)
    _all_reduce_cases(C, g, seed)
    _rooted_cases(C, g, seed)
    _gather_scatter_cases(C, g, seed)
    _async_cases(C, g, seed)
    if cell.backend == "torch":
        _torch_cases(g, seed)
    return g.size


def test_every_collective_matches_numpy(cell: Cell) -> None:
    """One spawn per cell of tests/conftest.py's matrix."""
    want = [None if cell.ranks is not None and i not in cell.ranks else
            len(cell.ranks or range(cell.size)) for i in range(cell.size)]
    assert mesh.spawn(battery, cell.size, 1234, cell, timeout=100, env=cell.env) == want


@pytest.mark.parametrize("n", [1, 2, pytest.param(5, marks=pytest.mark.slow),
                               pytest.param(8, marks=pytest.mark.slow)])
def test_every_collective_matches_numpy_at_world_size(n: int) -> None:
    """The world sizes the matrix (4 ranks, a group of 3) leaves out."""
    cell = Cell("same-host", "numpy", "world", n)
    assert mesh.spawn(battery, n, 1234 + n, cell, timeout=100) == [n] * n


def groups_battery(world: Any, seed: int) -> list[int | None]:
    """Sub-groups with reordered ranks, and groups overlapping in time."""
    r = world.rank
    g_even = world.group([4, 2, 0])
    g_odd = world.group([3, 1])
    g_mid = world.group([1, 2, 3])
    mine = [g for g in (g_even, g_odd) if g is not None]
    assert len(mine) == 1
    g = mine[0]
    assert g.rank == {4: 0, 2: 1, 0: 2, 3: 0, 1: 1}[r]
    a = data(seed, g.rank, (10,), "int64")
    w1 = C.all_reduce(g, a, async_op=True)
    b = data(seed + 1, r, (300,), "float32")
    w2 = C.all_reduce(g_mid, b, async_op=True, algorithm="ring") if g_mid is not None else None
    c = data(seed + 2, r, (5,), "int32")
    C.all_reduce(world, c, op="max")
    expect(c, reference("max", [data(seed + 2, i, (5,), "int32") for i in range(5)]),
           "world all_reduce while groups are in flight")
    w1.wait()
    expect(a, reference("sum", [data(seed, i, (10,), "int64") for i in range(g.size)]),
           "async all_reduce on a sub-group")
    if w2 is not None:
        w2.wait()
        expect(b, reference("sum", [data(seed + 1, i, (300,), "float32") for i in (1, 2, 3)]),
               "overlapping group all_reduce")
    return [None if x is None else x.rank for x in (g_even, g_odd, g_mid)]


@pytest.mark.parametrize("path", PATHS)
def test_subgroups_overlapping_in_time(path: str) -> None:
    """Every collective on a reordered sub-group is in the matrix; here two
    disjoint groups and one across them run at once, beside the world."""
    got = mesh.spawn(groups_battery, 5, 77, timeout=100, env=PATHS[path])
    assert got == [[2, None, None], [None, 1, 0], [1, None, 1], [None, 0, 2], [0, None, None]]


def peak_extra_mib(world: Any, nbytes: int) -> float:
    import resource
    a = np.ones(nbytes // 4, np.float32)
    C.all_reduce(world, np.ones(1 << 20, np.float32))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    C.all_reduce(world, a)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert a[0] == world.size and a[-1] == world.size
    return (peak - base) / 1024


@pytest.mark.slow
def test_256mib_all_reduce_needs_at_most_64mib_beyond_its_input() -> None:
    extra = mesh.spawn(peak_extra_mib, 2, 256 << 20, timeout=100)
    assert max(extra) <= 64, f"peak memory beyond the input, MiB per rank: {extra}"


BITWISE_DTYPES = ["float32", "float64", "complex64", "complex128", "float16", "int64"]


def bitwise_battery(world: Any, seed: int) -> list[str]:
    """all_reduce of random (not integer-valued) data, every op and several
    dtypes, at a size for each algorithm: every rank's result must be the
    same bytes. Returns what differed."""
    n, r = world.size, world.rank
    rng = np.random.default_rng([seed, r])
    bad = []
    for count, alg in [(1000, "rd"), (1000, "ring"), (40000, None)]:
        for dtype in BITWISE_DTYPES:
            for op in C.OPS:
                if not valid(op, dtype):
                    continue
                dt = np.dtype(dtype)
                if dt.kind == "i":
                    a = rng.integers(-1000, 1000, count).astype(dt)
                else:
                    a = (1 + 0.1 * rng.standard_normal(count)).astype(dt)
                    if dt.kind == "c":
                        a += (0.1j * rng.standard_normal(count)).astype(dt)
                C.all_reduce(world, a, op=op, algorithm=alg)
                everyone = C.all_gather(world, a.view(np.uint8))
                differ = [i for i in range(n) if everyone[i].tobytes() != everyone[0].tobytes()]
                if differ:
                    bad.append(f"{alg or 'auto'} {count} {op} {dtype}: ranks {differ} differ "
                               f"from rank 0")
    # scan and exscan (the board's small one too): the bits of recursive doubling,
    # whose round k combines what rank - 2**k held before what this rank holds
    for count, dtype, op in [(7, "float32", "sum"), (1, "complex64", "prod"),
                             (20_000, "float64", "sum")]:
        a = (1 + 0.1 * rng.standard_normal(count)).astype(dtype)
        if np.dtype(dtype).kind == "c":
            a += (0.1j * rng.standard_normal(count)).astype(dtype)
        rows = C.all_gather(world, a)
        rop = resolve(op, a.dtype)

        def held(k: int, j: int) -> np.ndarray:
            if k == 0:
                return rows[j].copy()
            mine = held(k - 1, j)
            if j >= 1 << (k - 1):
                rop.combine(mine, held(k - 1, j - (1 << (k - 1))), src_first=True)
            return mine
        rounds = (n - 1).bit_length()
        before = None
        for k in range(1, rounds + 1):
            if r >= 1 << (k - 1):
                lower = held(k - 1, r - (1 << (k - 1)))
                if before is None:
                    before = lower
                else:
                    rop.combine(before, lower, src_first=True)
        got = [C.scan(world, a, op=op), C.exscan(world, a, op=op)]
        for what, x, want in zip(("scan", "exscan"), got, (held(rounds, r), before)):
            if (x is None or want is None) and x is not want or \
                    x is not None and x.tobytes() != want.tobytes():
                bad.append(f"{what} {count} {op} {dtype} on rank {r}: not the doubling's bits")
    return bad


@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("env", [{"MESH_CMA": "0"}, {}], ids=["sockets", "same-host"])
def test_all_reduce_is_bitwise_identical_on_every_rank(n: int, env: dict) -> None:
    got = mesh.spawn(bitwise_battery, n, 99 + n, timeout=100, env=env)
    assert got == [[]] * n, got[0]


def _written_in_place(world: Any) -> list:
    import torch
    seen: list = []
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = x * 2
    z = (y * y).sum()         # saves y for its backward
    C.all_reduce(world, y)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()
    b = (torch.ones(3, dtype=torch.bfloat16, requires_grad=True) * 1)
    z = (b * b).sum()
    C.all_reduce(world, b)    # (bfloat16: reduced in float32, copied back)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()
    for _ in range(3):        # a tiny one the short way after the first (collectives.shm.tiny)
        y, w = torch.ones(2), torch.ones(2, requires_grad=True)
        z = (y * w).sum()     # saves y (which needs no grad), for w's gradient
        C.all_reduce(world, y)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            z.backward()
    p = torch.nn.Parameter(torch.full((2,), float(world.rank)))
    C.broadcast(world, p, root=0)     # a leaf that needs grad: as torch.distributed allows
    seen.append(p.tolist())
    out = torch.zeros(2, requires_grad=True) * 1
    before = out._version
    if world.rank == 0:
        world.send(torch.ones(2), 1)
    else:
        world.recv(0, out=out)
        seen.append(out._version > before)
    t, u = torch.zeros(3, dtype=torch.bfloat16), torch.zeros(3)
    rows = torch.empty(world.size, 3)
    reqs = [C.all_reduce_init(world, t, op="avg"), C.all_gather_init(world, u, out=rows)]
    for i in range(2):      # persistent: bfloat16 copied back at each start, rows into out=
        t.fill_(world.rank + i)
        u.fill_(10 * world.rank + i)
        mesh.startall(reqs)
        got = mesh.waitall(reqs)
        assert got[0] is t and t.tolist() == [0.5 + i] * 3, t
        assert got[1] is rows and rows[:, 0].tolist() == [i, 10.0 + i], rows
    return seen


def test_torch_tensors_written_in_place_tell_autograd() -> None:
    """A collective or a receive that writes a tensor through a view of its
    memory counts as an in-place write, as torch's own ops do: a backward
    that saved the tensor raises instead of using the new values."""
    pytest.importorskip("torch")
    assert mesh.spawn(_written_in_place, 2, timeout=60) == [[[0.0, 0.0]], [[0.0, 0.0], True]]


def _negative_views(world: Any) -> list:
    """Real tensors with torch's negative bit (``c.conj().imag``) were
    reduced, gathered and broadcast as their memory, without the minus; in
    place, the result goes back through the view."""
    import torch
    r, n = world.rank, world.size

    def neg(*values: float) -> Any:
        t = torch.tensor([complex(0, -v) for v in values]).conj().imag
        assert t.is_neg() and t.tolist() == list(values)
        return t
    seen = []
    for alg in (None, "ring"):
        t = neg(r + 1.0, -2.0)
        C.all_reduce(world, t, op="prod", algorithm=alg)
        seen.append(t.tolist())
    for _ in range(2):                          # (the second: a tiny all_reduce's short way)
        t = neg(r + 1.0, -2.0)
        seen.append(C.all_reduce(world, t, op="max").tolist())
    seen.append(C.all_gather(world, neg(-r - 1.0)).tolist())
    b = neg(-r - 1.0)
    seen.append(C.broadcast(world, b, root=n - 1).tolist())
    seen.append(C.reduce_scatter(world, neg(*[-1.0] * n), op="min").tolist())
    return seen


def test_tensors_with_the_negative_bit_take_part_as_their_values() -> None:
    pytest.importorskip("torch")
    want = [[6.0, -8.0]] * 2 + [[3.0, -2.0]] * 2 + [[[-1.0], [-2.0], [-3.0]], [-3.0], [-1.0]]
    assert mesh.spawn(_negative_views, 3, timeout=60) == [want] * 3


def _uneven_exchange(world: Any) -> list[str]:
    import torch
    r, n = world.rank, world.size
    sends = [(r + j) % 3 for j in range(n)]          # rank r sends (r + j) % 3 rows to rank j
    recvs = [(j + r) % 3 for j in range(n)]
    a = np.concatenate([np.full((k, 2), 10 * r + j, np.float64) for j, k in enumerate(sends)])
    want = np.concatenate([np.full((k, 2), 10 * j + r, np.float64) for j, k in enumerate(recvs)])
    got = C.all_to_all_v(world, a, sends)          # the counts exchanged first
    assert got.shape == want.shape and (got == want).all(), (got, want)
    t = torch.tensor(a, dtype=torch.bfloat16)      # counts as a tensor, async
    back = C.all_to_all_v(world, t, torch.tensor(sends), recvs, async_op=True).wait()
    assert back.dtype == torch.bfloat16 and torch.equal(back.float(), torch.tensor(want).float())
    none = C.all_to_all_v(world, np.zeros((0, 3), np.int32), [0] * n, [0] * n)
    assert none.shape == (0, 3) and none.dtype == np.int32
    said = []
    for bad in ([1, -1, 0], "xx"):
        with pytest.raises(ValueError) as e:
            C.all_to_all_v(world, a, bad if r == 1 else sends, timeout=20)
        said.append(str(e.value))
    with pytest.raises(TypeError) as t_err:
        C.all_to_all(world, [torch.ones(2)] * n)
    said.append(str(t_err.value))
    C.barrier(world)
    _displaced(world)
    return said


def _displaced(world: Any) -> None:
    """The v-collectives' displacements (MPI's displs, in rows), on numpy
    arrays and tensors, sync and async; bad ones fail the call everywhere."""
    import torch
    r = world.rank
    counts, displs = [2, 1, 3], [1, 5, 8]       # gaps between the blocks, and before
    A = np.arange(24.0).reshape(12, 2)
    got = C.scatter_v(world, A if r == 0 else None, counts, displs=displs)
    assert np.array_equal(got, A[displs[r]:displs[r] + counts[r]]), got
    got = C.scatter_v(world, torch.tensor(A) if r == 2 else torch.zeros(0, 2, dtype=torch.float64),
                      counts, root=2, displs=torch.tensor(displs), async_op=True).wait()
    assert torch.equal(got, torch.tensor(A[displs[r]:displs[r] + counts[r]])), got
    mine = np.full((counts[r], 2), r, np.float64)
    want = np.full((12, 2), -1.0)
    for j in range(3):
        want[displs[j]:displs[j] + counts[j]] = j
    out = np.full((12, 2), -1.0)
    got = C.gather_v(world, mine, counts, root=1, displs=displs, out=out)
    assert (got is out and np.array_equal(out, want)) if r == 1 else got is None, got
    got = C.all_gather_v(world, mine, counts, displs=displs, async_op=True).wait()
    assert np.array_equal(got, np.where(want < 0, 0, want)[:11]), got   # (to the last's end)
    into = torch.full((6, 2), -1.0, dtype=torch.float64)
    got = C.all_gather_v(world, torch.tensor(mine), counts, out=into)    # out= alone: packed
    assert got is into and torch.equal(into, torch.tensor(np.repeat([0.0, 0, 1, 2, 2, 2], 2)
                                                          .reshape(6, 2))), into
    # all_to_all_v: rank r sends rows [r, r + j + 1) to rank j (overlapping: only read),
    # and gets rank j's r + 1 rows at 4 j
    a = np.arange(5.0) + 100 * r
    recv = [r + 1] * 3
    o = np.full(12, -1.0)
    got = C.all_to_all_v(world, a, [1, 2, 3], recv, send_displs=[r] * 3,
                         recv_displs=[0, 4, 8], out=o)
    want_o = np.full(12, -1.0)
    for j in range(3):
        want_o[4 * j:4 * j + r + 1] = np.arange(j, j + r + 1) + 100 * j
    assert got is o and np.array_equal(o, want_o), o
    got = C.all_to_all_v(world, torch.tensor(a), [1, 2, 3], recv, send_displs=[r] * 3,
                         recv_displs=[8, 4, 0], async_op=True).wait()
    want_t = np.zeros(9 + r)        # (a new array: zeros between the blocks)
    for j in range(3):
        want_t[8 - 4 * j:9 - 4 * j + r] = want_o[4 * j:4 * j + r + 1]
    assert torch.equal(got, torch.tensor(want_t)), got
    for call, text, bad in (
            (lambda: C.gather_v(world, mine, counts, root=0, displs=[0, 1, 7], timeout=20),
             "gather_v on group world: rank 1's block, rows [1, 2) (displs[1] = 1), overlaps "
             "rank 0's, rows [0, 2) (displs[0] = 0): blocks may not overlap", 0),
            (lambda: C.scatter_v(world, A if r == 0 else None, counts, displs=[0, 2, 10],
                                 timeout=20),
             "scatter_v on group world: rank 2's block, rows [10, 13) (displs[2] = 10, 3 "
             "rows), ends past the array's 12 rows", 0),
            (lambda: C.all_gather_v(world, mine, counts, displs=displs, timeout=20,
                                    out=np.zeros((12, 2), np.float32 if r == 2 else float)),
             "all_gather_v on group world: out= is float32[12, 2]: its rows must be "
             "float64[2], as the array's", 2)):
        # the rank whose arguments are wrong raises ValueError, the others the abort
        with pytest.raises(ValueError if r == bad else mesh.MeshError) as e:
            call()
        assert text in str(e.value) and f"rank {bad}: " in str(e.value), (r, str(e.value))
    C.barrier(world)


def test_all_to_all_v_exchanges_uneven_blocks_and_refuses_bad_counts_everywhere() -> None:
    pytest.importorskip("torch")
    for rank, said in enumerate(mesh.spawn(_uneven_exchange, 3, timeout=120)):
        me = f"rank {rank}: all_to_all_v on group world: "
        if rank == 1:
            assert said[0] == me + "send_counts must be 3 integers >= 0 (one a rank), got " \
                                   "[1, -1, 0]", said
            assert said[1].startswith(me + "send_counts must be 3 integers"), said
        else:
            assert said[:2] == [me + "the send_counts of rank 1 are not valid (see their "
                                     "error)"] * 2, said
        assert said[2] == (f"rank {rank}: all_to_all on group world takes one array (or "
                           f"tensor), got a list of 3: stack them into one (np.stack, "
                           f"torch.stack; all_to_all sends its rows in rank order), or for "
                           f"blocks of unequal sizes use collectives.all_to_all_v(g, rows, "
                           f"send_counts)"), said


def _lists_of_arrays(world: mesh.Mesh) -> list[str]:
    said = []
    rows = [np.zeros((1, 2)) for _ in range(world.size)]
    for call in (lambda: C.all_to_all_v(world, rows, [1] * world.size, timeout=20),
                 lambda: C.all_reduce(world, rows, timeout=20),
                 lambda: C.all_gather(world, rows, timeout=20),
                 lambda: C.all_gather_object(world, {"rows": rows}, timeout=20),
                 lambda: C.broadcast_object(world, None if world.rank else rows[0], timeout=20)):
        with pytest.raises((TypeError, mesh.MeshError)) as e:
            call()
        said.append(str(e.value))
    return said


def test_a_list_of_arrays_is_refused_with_advice_for_the_collective_called() -> None:
    """all_to_all_v given a list of blocks says to concatenate them (not to
    call all_to_all_v); all_reduce given a list of gradients says to call it
    once per array (or all_reduce_grads), not to use all_to_all_v. An
    object collective given arrays says which collectives take them."""
    for rank, said in enumerate(mesh.spawn(_lists_of_arrays, 2, timeout=60)):
        me = f"rank {rank}: "
        assert said[0] == (me + "all_to_all_v on group world takes one array (or tensor), got "
                           "a list of 2: concatenate the blocks for the ranks into one, in "
                           "rank order (np.concatenate, torch.cat), with send_counts their "
                           "numbers of rows"), said
        assert said[1].startswith(me + "all_reduce on group world takes one array (or tensor), "
                                  "got a list of 2: call it once per array"), said
        assert said[2].startswith(me + "all_gather on group world takes one array (or tensor), "
                                  "got a list of 2: call it once per array"), said
        assert not any("all_to_all" in s for s in said[1:]), said
        # mpi4py's bcast and allgather pickle arrays: these say what takes them
        advice = ("object collectives take msgpack values (no pickle); arrays go by the array "
                  "collectives (broadcast, gather, all_gather_v), or nested in dicts and "
                  "lists, from a root to every rank, by C.broadcast_state")
        assert said[3] == (me + "all_gather_object on group world: dict is not msgpack-able "
                           "(can not serialize 'ndarray' object); " + advice), said
        assert said[4].endswith(advice), said


def _not_communicators(world: mesh.Mesh) -> list[str]:
    said = []
    for call in (lambda: C.all_reduce(mesh.grid(world, dp=world.size), np.ones(2)),
                 lambda: C.barrier(0),
                 lambda: C.all_reduce_init(mesh.grid(world, dp=world.size), np.ones(2))):
        with pytest.raises(TypeError) as e:
            call()
        said.append(str(e.value))
    return said


def test_a_grid_or_other_object_for_a_communicator_is_named() -> None:
    """A mesh.Grid (or a torch group) where a communicator goes raised a
    bare AttributeError ('Grid' object has no attribute 'ranks')."""
    for r, said in enumerate(mesh.spawn(_not_communicators, 2, timeout=60)):
        assert said[0].startswith(f"rank {r}: all_reduce: the communicator is a mesh.Grid: "
                                  f"pass the group of one of its axes, grid.group('dp')"), said
        assert said[1].startswith(f"rank {r}: barrier: the communicator is an int; "
                                  f"collectives take a meshrun communicator"), said
        assert said[2].startswith(f"rank {r}: all_reduce_init: the communicator is a "
                                  f"mesh.Grid"), said


def _tensor_without_communicator(world: mesh.Mesh) -> list[str]:
    import torch
    said = []
    for call in (C.reduce, C.gather, C.scatter, C.all_to_all):
        for g in (None, 3):
            with pytest.raises(TypeError) as e:
                call(g, torch.ones(2))
            said.append(str(e.value))
    return said


@pytest.mark.timeout(60)
def test_a_tensor_given_something_else_for_a_communicator_is_named() -> None:
    """reduce, gather, scatter and all_to_all of a torch tensor read the
    communicator's ranks before checking it: None (a non-member's group) or
    any other object raised a bare AttributeError ('NoneType' object has
    no attribute 'ranks')."""
    for r, said in enumerate(mesh.spawn(_tensor_without_communicator, 2, timeout=60)):
        assert len(said) == 8, said
        for call, text in zip(("reduce", "gather", "scatter", "all_to_all"), said[::2]):
            assert text.startswith(f"rank {r}: {call}: the communicator is None; "), text
        for call, text in zip(("reduce", "gather", "scatter", "all_to_all"), said[1::2]):
            assert text.startswith(f"rank {r}: {call}: the communicator is an int; "), text


def _read_only_off_the_root(world: mesh.Mesh) -> list:
    r, n = world.rank, world.size
    got = []
    for alg in (None, "tree", "chain"):
        for size in (3, 30_000):    # the board's payloads, and its large path
            base = np.arange(8.0 * size).reshape(4, 2 * size) + r
            before = base.copy()
            base.flags.writeable = r == 0
            view = base[:, ::2]     # not C-contiguous
            C.reduce(world, view, root=0, algorithm=alg)
            if r == 0:
                before[:, ::2] = before[:, ::2] * n + sum(range(n))
            got.append(bool((base == before).all()))
    for dt in (np.float16, np.dtype(np.float16).newbyteorder()):
        a = np.full(4, 30000.0, dt)
        a.flags.writeable = r == 0
        assert C.reduce(world, a, root=0, op="avg") is a
        got.append(a.tolist())
    return got


@pytest.mark.timeout(60)
def test_reduce_takes_a_read_only_array_off_the_root() -> None:
    """Only the root's array of a reduce is written, so the others' may be
    read-only. One that was not C-contiguous failed after the call had
    finished ('assignment destination is read-only', naming neither rank
    nor call: its contiguous copy was written back); a read-only float16
    one averaged was not widened where the root's was, and every rank
    raised MismatchError (float16 against float32)."""
    got = mesh.spawn(_read_only_off_the_root, 3, timeout=60)
    assert got == [[True] * 6 + [[30000.0] * 4] * 2] * 3, got


def _numpy_subclasses(world: mesh.Mesh) -> list[str]:
    """A masked array is refused by point-to-point and every collective (its
    mask would not travel); np.matrix travels as its memory."""
    r = world.rank
    said = []
    masked = np.ma.array([1.0, 2.0], mask=[0, 1])
    for call in (lambda: world.send(masked, 1 - r), lambda: C.all_reduce(world, masked),
                 lambda: C.all_gather(world, masked), lambda: C.broadcast(world, masked),
                 lambda: C.scatter(world, np.ma.array(np.ones((2, 2)), mask=True))):
        with pytest.raises((TypeError, mesh.MeshError)) as e:      # (scatter off the root:
            call()                                                  # the root's error)
        said.append(str(e.value))
    m = np.matrix([[1.0, 2.0]]) * (r + 1)
    world.send(m, 1 - r)
    got = world.recv(1 - r)
    assert type(got) is np.ndarray and got.tolist() == [[1.0 * (2 - r), 2.0 * (2 - r)]], got
    assert C.all_reduce(world, m) is m and m.tolist() == [[3.0, 6.0]]
    for alg in ("rd", "ring", None):    # a large one too: a matrix stays 2-d when reshaped,
        big = np.matrix(np.full((2, 150_000), r + 1.0))         # so the paths cut its rows
        assert C.all_reduce(world, big, algorithm=alg) is big and (big == 3.0).all(), alg
    big = np.matrix(np.full((2, 150_000), r + 1.0))
    assert C.reduce(world, big, root=1) is big and (big == (3.0 if r == 1 else 1.0)).all()
    big = np.matrix(np.full((2, 150_000), r + 1.0))
    assert C.broadcast(world, big, root=1) is big and (big == 2.0).all()
    return said


def test_masked_arrays_are_refused_saying_why_and_matrices_travel() -> None:
    for rank, said in enumerate(mesh.spawn(_numpy_subclasses, 2, timeout=60)):
        assert len(said) == 5, said
        for text in said:
            assert text.startswith(f"rank {rank}: ") and "a masked array's mask would not " \
                "travel" in text and "a.filled(value)" in text, text
        assert "send to rank" in said[0] and "all_reduce" in said[1], said


@pytest.mark.timeout(60)
def test_checking_for_masked_arrays_does_not_import_numpy_ma() -> None:
    """numpy 2 imports numpy.ma on first use (5-15 ms): a first object send or
    collective that checked for a masked array paid it; none can exist while
    numpy.ma is not imported."""
    import os
    import subprocess
    import sys
    code = ("import sys, numpy as np, mesh, collectives as C\n"
            "with mesh.init() as w:\n"
            "    w.send({'a': 1}, 0); assert w.recv(0) == {'a': 1}\n"
            "    C.all_reduce(w, np.ones(4)); C.broadcast(w, np.ones(4))\n"
            "print('numpy.ma' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=50, env=env, cwd=root)
    assert out.returncode == 0 and out.stdout.split() == ["False"], out.stdout + out.stderr


def _while_torch_imports(world: Any) -> list[float]:
    """Another thread of the process is importing torch (its module is in
    sys.modules, not yet holding Tensor) while numpy collectives run, async
    ones in the group's lane: they take no notice of it."""
    import sys
    import types
    had = sys.modules.get("torch")
    sys.modules["torch"] = types.ModuleType("torch")      # (as torch/__init__ starts)
    try:
        w = C.all_reduce(world, np.ones(3), async_op=True, timeout=20)
        got = [float(w.wait()[0]), float(C.broadcast(world, np.ones(3), timeout=20)[0])]
    finally:
        if had is None:
            del sys.modules["torch"]
        else:
            sys.modules["torch"] = had
    return got


@pytest.mark.timeout(60)
def test_collectives_while_another_thread_imports_torch() -> None:
    assert mesh.spawn(_while_torch_imports, 2, timeout=40) == [[2.0, 1.0]] * 2


@pytest.mark.timeout(120)
def test_the_benchmark_polls_async_calls(capsys: pytest.CaptureFixture[str]) -> None:
    """``--poll``: each all_reduce made with async_op=True and waited for by
    a loop polling Work.done() (which lets the lane that runs it have the
    interpreter: such a loop took 27 ms a call)."""
    from collectives.tools import bench
    assert bench.main(["--op", "all_reduce", "--sizes", "8", "--iters", "5", "--warmup", "1",
                       "--poll", "--only", "meshrun"]) == 0
    out = capsys.readouterr().out
    assert "each call polled" in out and out.rstrip().splitlines()[-1].split()[0] == "8"


@pytest.mark.timeout(120)
def test_the_benchmark_times_a_user_op(capsys: pytest.CaptureFixture[str]) -> None:
    """``--redop user``: the reducing collectives with collectives.Op(np.add),
    for BENCHMARKS' comparison of a user op's paths with "sum"'s."""
    from collectives.tools import bench
    assert bench.main(["--op", "reduce_scatter", "--sizes", "64", "--iters", "3", "--warmup",
                       "1", "--redop", "user", "--only", "meshrun"]) == 0
    row = capsys.readouterr().out.rstrip().splitlines()[-1].split()
    assert row[:4] == ["64", "16", "float32", "user"], row


def test_a_float16_sum_combines_by_torch_with_numpys_bits() -> None:
    """A float16 sum's combine runs torch's add where torch is loaded
    (numpy's converts element by element, 20 times slower: the collectives
    of engine.deepspeed's communication_data_type "fp16"): the bits of
    numpy's add, infinities, NaN, overflow and subnormals among them."""
    torch = pytest.importorskip("torch")
    from collectives import ops
    rng = np.random.default_rng(3)
    a = (rng.standard_normal(9000) * 100).astype(np.float16)
    b = (rng.standard_normal(9000) * 1e-3).astype(np.float16)      # (subnormals among them)
    a[:10], b[5:15], a[20], a[30], b[30] = np.inf, -np.inf, np.nan, 60000, 60000
    with np.errstate(all="ignore"):
        want = np.add(a, b)
    got = a.copy()
    assert ops._half_add(got, b) and "torch" in str(type(torch.from_numpy(got)))
    assert got.tobytes() == want.tobytes()
    got = a.copy()
    resolve("sum", got.dtype).combine(got, b)
    assert got.tobytes() == want.tobytes()
    odd = a.astype(">f2")       # (another byte order, or a small operand: numpy's)
    assert not ops._half_add(odd, b) and not ops._half_add(a[:100].copy(), b[:100])
