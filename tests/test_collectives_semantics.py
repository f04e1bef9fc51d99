"""Semantics of the numpy collectives where MPI's are the reference
(mpi4py on Open MPI): a broadcast's root may pass a read-only array (only
read, as MPI_Bcast's), and a reduction's overflow gives inf on every rank
whatever a rank's numpy error settings (np.seterr, warnings filters), on
every path: the short way, the board, the ring, sockets, two levels."""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

import collectives as C
import mesh

pytestmark = pytest.mark.timeout(120)

SOCKETS = {"MESH_CMA": "0", "MESH_SHM": "0", "MESH_TIMEOUT": "20"}


def _read_only_root(world: Any, hosts: str, algs: tuple) -> list[str]:
    if hosts:
        world.hosts[:] = ["fake-" + h for h in hosts]
    n, r = world.size, world.rank
    wrong = []
    for k in (5, 40_000):       # (small: a payload on the board; large: read across)
        for root in range(n):
            for alg in algs:
                for view in (lambda x: x, lambda x: x[::-1]):
                    a = view(np.arange(k, dtype=np.float32) + 1000 * r)
                    if r == root:
                        a.flags.writeable = False
                    got = C.broadcast(world, a, root=root, algorithm=alg)
                    want = view(np.arange(k, dtype=np.float32) + 1000 * root)
                    if got is not a or not np.array_equal(a, want):
                        wrong.append(f"k={k} root={root} alg={alg}")
    return wrong


@pytest.mark.parametrize("env,hosts,algs", [
    ({"MESH_TIMEOUT": "20"}, "", (None,)),
    (SOCKETS, "", ("tree", "chain")),
    (SOCKETS, "aab", ("hier",)),
], ids=["board", "sockets", "hier"])
def test_broadcast_root_may_be_read_only(env: dict, hosts: str, algs: tuple) -> None:
    for wrong in mesh.spawn(_read_only_root, 3, hosts, algs, timeout=90, env=env):
        assert wrong == []


def _read_only_state(world: Any) -> bool:
    """broadcast_state of a state whose arrays the root cannot write (a
    checkpoint loaded with np.load(mmap_mode="r"), a frozen buffer)."""
    w = np.arange(6.0).reshape(2, 3)
    w.flags.writeable = False
    got = C.broadcast_state(world, {"w": w, "b": [w[:, ::2]]} if world.rank == 1 else None,
                            root=1)
    return np.array_equal(got["w"], w) and np.array_equal(got["b"][0], w[:, ::2])


def test_broadcast_state_of_read_only_arrays() -> None:
    assert mesh.spawn(_read_only_state, 3, timeout=60, env={"MESH_TIMEOUT": "20"}) == [True] * 3


def _quiet_overflow(world: Any, hosts: str) -> list[str]:
    """Rank 1 raises on floating-point errors (np.seterr), rank 2 turns
    RuntimeWarning into errors; element 0 overflows, and only the rank
    that reduces it (which depends on the path) would see it."""
    if hosts:
        world.hosts[:] = ["fake-" + h for h in hosts]
    n, r = world.size, world.rank
    if r == 1:
        np.seterr(all="raise")
    if r == 2:
        warnings.simplefilter("error", RuntimeWarning)
    wrong = []
    for k in (4, 300_000):
        for alg in (None, "rd", "ring"):
            for rep in range(2):        # (the second small call takes the short way)
                a = np.ones(k, np.float32)
                a[0] = 3e38
                try:
                    C.all_reduce(world, a, algorithm=alg)
                    if not (np.isinf(a[0]) and (a[1:] == n).all()):
                        wrong.append(f"all_reduce k={k} alg={alg}: {a[:3]}")
                except (FloatingPointError, RuntimeWarning, mesh.MeshError) as e:
                    wrong.append(f"all_reduce k={k} alg={alg} #{rep}: {type(e).__name__}")
        b = np.full(3 * k, 3e38, np.float32)
        for name, call in (("reduce_scatter", lambda: C.reduce_scatter(world, b)),
                           ("reduce", lambda: C.reduce(world, b.copy(), root=0)),
                           ("avg", lambda: C.all_reduce(     # (its division underflows)
                               world, np.full(k, 1.1754944e-38 if r == 0 else 0, np.float32),
                               op="avg"))):
            try:
                call()
            except (FloatingPointError, RuntimeWarning, mesh.MeshError) as e:
                wrong.append(f"{name} k={k}: {type(e).__name__}")
    return wrong


@pytest.mark.parametrize("env,hosts", [
    ({"MESH_TIMEOUT": "20"}, ""), (SOCKETS, ""), ({"MESH_TIMEOUT": "20"}, "aab")],
    ids=["board", "sockets", "hier"])
def test_overflow_is_inf_on_every_rank_whatever_its_error_settings(env: dict,
                                                                   hosts: str) -> None:
    for wrong in mesh.spawn(_quiet_overflow, 3, hosts, timeout=90, env=env):
        assert wrong == []


def _half_average(world: Any, where: str, k: int) -> list[str]:
    """float16 averaged (in float32, README) where a rank's array is read-only
    (reduce_scatter only reads it) or an np.memmap: each rank widened or
    not by its own array's flags and type, under the same fingerprint, so
    one rank's float32 bytes were read as float16 by the others."""
    n, r = world.size, world.rank
    wrong = []
    for who in ([1], list(range(n))):
        a = np.full(n * k, 30000 + r, np.float16)
        if r in who:
            a.flags.writeable = False
        got = C.reduce_scatter(world, a, op="avg")
        if got.dtype != np.float16 or not (got == 30001).all():
            wrong.append(f"reduce_scatter, read-only on {who}: {got[:3]}")
    b = np.full(k, 30000 + r, np.float16)
    if r == 1:
        m = np.memmap(f"{where}/m{r}", np.float16, "w+", shape=(k,))
        m[...], b = b, m
    C.all_reduce(world, b, op="avg")
    if not (np.asarray(b) == 30001).all():
        wrong.append(f"all_reduce, an np.memmap on rank 1: {b[:3]}")
    return wrong


@pytest.mark.parametrize("k", [4, 40_000])
def test_float16_average_whatever_the_array(tmp_path: Any, k: int) -> None:
    for wrong in mesh.spawn(_half_average, 3, str(tmp_path), k, timeout=60,
                            env={"MESH_TIMEOUT": "20"}):
        assert wrong == []


def _one_element_bits(world: Any) -> list:
    """One-element all_reduces whose bits depend on the operands' order:
    NaNs of other payloads summed (the first operand's is kept), complex
    products; each call's bits on this rank."""
    r = world.rank
    rng = np.random.default_rng(3)
    seen = []
    for shape in [(), (1,)]:
        for alg in ("rd", None):
            nan = np.array([0x7FF8000000000000 + r + 1], np.uint64).view(np.float64)
            C.all_reduce(world, nan.reshape(shape), algorithm=alg)
            seen.append(nan.view(np.uint64).tolist())
            for _ in range(8):
                x = rng.standard_normal((world.size, 2))
                a = np.array([x[r, 0] + 1j * x[r, 1]], np.complex64).reshape(shape)
                C.all_reduce(world, a, op="prod", algorithm=alg)
                seen.append(a.reshape(-1).view(np.uint64).tolist())
    return seen


@pytest.mark.parametrize("n", [2, 3])
def test_one_element_results_are_the_same_bits_on_every_rank(n: int) -> None:
    """numpy computes a one-element ufunc whose output is its first operand
    another way (a sum of two NaNs gave the second's): the partners of a
    recursive-doubling exchange, one writing into each operand, returned
    other bits of the same all_reduce (README: bitwise identical on every
    rank)."""
    seen = mesh.spawn(_one_element_bits, n, timeout=60, env=SOCKETS)
    for rank, bits in enumerate(seen[1:], 1):
        assert bits == seen[0], f"rank {rank}: calls " \
            f"{[i for i, (a, b) in enumerate(zip(bits, seen[0])) if a != b]} differ from rank 0's"


def _maxloc(world: Any) -> str:
    """all_reduce_loc against numpy: the max (min) over the ranks and the
    lowest index among the ranks holding it (MPI's MAXLOC and MINLOC)."""
    n, r = world.size, world.rank
    val = [3.0, 7.5, 7.5, -1.0, 7.5][r % 5]         # ranks 1 and 2 tie
    vs = [[3.0, 7.5, 7.5, -1.0, 7.5][i % 5] for i in range(n)]
    v, at = C.all_reduce_loc(world, val)
    assert (float(v), int(at)) == (max(vs), vs.index(max(vs))) and at.dtype == np.int64, (v, at)
    v, at = C.all_reduce_loc(world, val, op="min", index=100 - r)   # the lowest index wins
    low = [100 - i for i in range(n) if vs[i] == min(vs)]
    assert (float(v), int(at)) == (min(vs), min(low)), (v, at)
    rng = [np.random.default_rng([7, i]) for i in range(n)]
    for dtype in ("int32", "float64", "bool", "uint8"):
        xs = [g.integers(0, 3, size=(4, 5)).astype(dtype) for g in rng]
        index = np.arange(20).reshape(4, 5) * n + r
        mine = xs[r].copy()
        for op, pick in (("max", np.argmax), ("min", np.argmin)):
            v, at = C.all_reduce_loc(world, mine, index=index, op=op)
            stack = np.stack(xs)
            who = pick(stack, axis=0)           # (the first rank, as numpy's argmax)
            want = np.take_along_axis(stack, who[None], 0)[0]
            assert v.dtype == np.dtype(dtype) and np.array_equal(v, want), (op, dtype, v, want)
            assert np.array_equal(at, np.arange(20).reshape(4, 5) * n + who), (op, dtype, at)
        assert np.array_equal(mine, xs[r])      # only read
    v, at = C.all_reduce_loc(world, np.array([1.0, np.nan if r == n - 1 else 2.0]))
    assert v[0] == 1.0 and int(at[0]) == 0 and np.isnan(v[1]) and int(at[1]) == n - 1, (v, at)
    for bad, said in ((dict(op="sum"), "op must be 'max'"),
                      (dict(index=np.arange(3)), "index of shape (3,)"),
                      (dict(index=0.5), "index must be integers"),
                      (dict(a=["x", "y"]), "values must be real numbers or bool, got dtype <U1"),
                      (dict(a=[[1], [1, 2]]), "inhomogeneous")):       # (np.array raised)
        kw = {"a": np.ones(2), **(bad if r == n - 1 else {})}
        with pytest.raises(mesh.MeshError if r != n - 1 else ValueError) as e:
            C.all_reduce_loc(world, timeout=30, **kw)
        assert f"rank {n - 1}: all_reduce_loc on group world: " in str(e.value) \
            and said in str(e.value), e.value
    v, at = C.all_reduce_loc(world, np.full(2, r))      # the group goes on
    assert v.tolist() == [n - 1] * 2 and at.tolist() == [n - 1] * 2
    return "ok"


@pytest.mark.parametrize("n", [2, 4])
def test_all_reduce_loc_is_mpi_maxloc_and_minloc(n: int) -> None:
    assert mesh.spawn(_maxloc, n, timeout=120) == ["ok"] * n


def _jacobi(world: Any, tol: float) -> tuple[int, np.ndarray]:
    """mpi4py's demo/mpi-ref-v1/ex-2.16.py (Jacobi with sendrecv and null
    processes) as the README ports it: Fortran-ordered blocks, so a column
    is contiguous and takes ``out=`` (its rows 1..n: the demo receives n
    values into the n + 2 of a column, which MPI allows and meshrun
    refuses); convergence (to ``tol``: the demo's 1e-8 takes 970 steps) by
    MPI.LAND of int flags. Returns the steps and the whole grid."""
    n, p, r = 5 * world.size, world.size, world.rank
    m = n // p + (r < n - p * (n // p))
    left = mesh.PROC_NULL if r == 0 else r - 1
    right = mesh.PROC_NULL if r == p - 1 else r + 1
    a = np.ones((n + 2, m + 2), order="F")
    a[0, :] = a[-1, :] = a[:, 0] = a[:, -1] = 0
    b = np.empty((n, m), order="F")
    steps = 0
    while True:
        steps += 1
        b[...] = 0.25 * (a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:])
        a[1:-1, 1:-1] = b
        world.sendrecv(b[:, -1], right, left, out=a[1:-1, 0])
        world.sendrecv(b[:, 0], left, right, out=a[1:-1, -1])
        if C.all_reduce(world, np.array(np.allclose(b, 0, atol=tol), "i"), op="land"):
            return steps, C.all_gather_v(world, np.ascontiguousarray(b.T), [m] * p).T


def _task_farm(world: Any) -> list | int:
    """A master/worker farm: rank 0 hands out tasks by tag, takes results
    from ANY_SOURCE (Status: the worker), probes each result's size first."""
    work, die, tasks = 1, 2, list(range(1, 12))
    if world.rank == 0:
        for w in range(1, world.size):
            world.send(tasks.pop(), w, tag=work)
        got: list = []
        while len(got) < 11:
            st = world.probe(mesh.ANY_SOURCE, tag=3)
            got.append(world.recv(st.source, 3, out=np.empty(st.count, st.dtype)).tolist())
            world.send(tasks.pop() if tasks else None, st.source, tag=work if tasks else die)
        return sorted(got, key=len)
    done, st = 0, mesh.Status()
    while (t := world.recv(0, mesh.ANY_TAG, status=st)) is not None or st.tag != die:
        world.send(np.arange(t, dtype=np.int16), 0, tag=3)
        done += 1
    return done


def _mpi4py_programs(world: Any) -> str:
    """mpi4py's demo programs, ported as the README's "Coming from mpi4py"
    says, checked against numpy (the answers the originals print under
    mpirun): MPI's logical reductions on int and bool flags, a Jacobi loop,
    a task farm."""
    n, r = world.size, world.rank
    for dtype in ("int32", "bool", "uint8"):        # MPI.LAND, LOR, LXOR (ex-2.16's flags)
        xs = [np.array([5, 0, 3, 0, 2, i % 2, (i + 1) % 3]).astype(dtype) for i in range(n)]
        for op, fn in (("land", np.logical_and), ("lor", np.logical_or),
                       ("lxor", np.logical_xor)):
            want = fn.reduce(np.stack(xs).astype(bool), axis=0).astype(dtype)
            for rep in range(2):                    # (the second: the short way)
                got = C.all_reduce(world, xs[r].copy(), op=op)
                assert got.dtype == np.dtype(dtype) and np.array_equal(got, want), (op, got)
            got = C.reduce_scatter(world, np.tile(xs[r], n), op=op)
            assert np.array_equal(got, want), (op, dtype, got)
    big = np.full(100_000, r + 1, np.int64)
    big[7] = 0 if r == n - 1 else 9
    C.all_reduce(world, big, op="land")           # (the ring, or read across)
    assert big[7] == 0 and (np.delete(big, 7) == 1).all(), big[:9]
    steps, u = _jacobi(world, 0.05)
    blocks = [np.ones((5 * n + 2, 7)) for _ in range(n)]    # (the same loop in one process)
    for a in blocks:
        a[0, :] = a[-1, :] = a[:, 0] = a[:, -1] = 0
    for step in range(1, steps + 1):
        for a in blocks:
            a[1:-1, 1:-1] = 0.25 * (a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:])
        for a, b in zip(blocks, blocks[1:]):
            a[1:-1, -1], b[1:-1, 0] = b[1:-1, 1], a[1:-1, -2]
        assert all(np.allclose(a[1:-1, 1:-1], 0, atol=0.05) for a in blocks) == (step == steps)
    assert np.array_equal(u, np.hstack([a[1:-1, 1:-1] for a in blocks]))
    farm = _task_farm(world)
    assert farm == ([list(range(t)) for t in range(1, 12)] if r == 0 else farm), farm
    done = C.reduce(world, np.array(0 if r == 0 else farm), root=0)
    assert r != 0 or done == 11, done           # (every task done once)
    _persistent(world)
    return "ok"


def _persistent(world: Any) -> None:
    """Persistent collectives (MPI-4's Allreduce_init and the rest): each
    start uses the arrays' contents then, results in place or in the
    init's out=; MPI's rules (an active one's start raises, an inactive
    one's wait returns None at once); mesh.startall, waitall, waitany,
    testall and test take them beside point-to-point requests; a start
    completes with no wait (its peers' waits need it); a tiny numpy
    all_reduce's starts take the board's short way once one has settled
    it."""
    n, r = world.size, world.rank
    ways = []
    for size in (1, 3, 200_000):    # (the short way, the board, the board's large form)
        a = np.zeros(size)
        p = C.all_reduce_init(world, a, op="sum")
        assert p.wait() is None and not p.active       # (never started: inactive)
        for i in range(4):
            a[:] = r + i
            p.start()
            ways.append(type(p._inner).__name__)
            with pytest.raises(mesh.MeshError, match=r"rank \d: start of the persistent "
                               r"all_reduce on group world: it is active"):
                p.start()
            assert p.wait() is a and (a == n * i + n * (n - 1) / 2).all(), (size, i, a[:3])
            assert p.wait() is None     # (completed: inactive again)
    # the first start settles the short way, the next post on the board at their start
    assert ways[:4] == ["_Started", "_Posted", "_Posted", "_Posted"], ways
    assert ways[8:] == ["_Started"] * 4, ways
    a = np.zeros(1)
    p, b = C.all_reduce_init(world, a), C.barrier_init(world)
    for i in range(3):      # behind another start: through the lane's queue, its short way
        a[:] = r + i
        mesh.startall([b, p])
        assert mesh.waitall([b, p])[1] is a and a[0] == n * i + n * (n - 1) / 2, a
        assert type(p._inner).__name__ == "_Started"
    x = np.arange(4, dtype=np.int32) + 10 * r
    rows = np.empty((n, 4), np.int32)
    b = np.zeros(2)
    red = np.zeros(3, np.int64)
    blocks = np.empty(2 * n)
    reqs = [C.all_gather_init(world, x, out=rows), C.broadcast_init(world, b, root=1),
            C.reduce_init(world, red, root=2, op="max"),
            C.all_to_all_init(world, np.arange(2 * n) + 100.0 * r, out=blocks),
            C.reduce_scatter_init(world, np.ones((2 * n, 2))),
            C.gather_init(world, np.array([r, -r]), root=0),
            C.scatter_init(world, np.arange(3 * n).reshape(n, 3) if r == 1 else None, root=1),
            C.scan_init(world, np.array([r + 1.0])), C.exscan_init(world, np.array([r + 1])),
            C.barrier_init(world), world.irecv(mesh.PROC_NULL)]
    for i in range(6):      # (a lane that ran the next while its waiter ran one: seen)
        x[:] = np.arange(4) + 10 * r + i
        b[:] = [i, -i] if r == 1 else 7
        red[:] = [r, -r, i]
        mesh.startall(reqs[:-1])
        got = mesh.waitall(reqs)
        assert got[0] is rows and (rows == np.arange(4) + 10 * np.arange(n)[:, None] + i).all()
        assert got[1] is b and list(b) == [i, -i], b
        assert got[2] is red and (r != 2 or list(red) == [n - 1, 0, i]), red
        assert got[3] is blocks and list(blocks) == [100.0 * k + 2 * r + j
                                                     for k in range(n) for j in range(2)]
        assert got[4].shape == (2, 2) and (got[4] == n).all()
        assert (got[5] is None) if r else got[5].tolist() == [[k, -k] for k in range(n)]
        assert list(got[6]) == [3 * r, 3 * r + 1, 3 * r + 2], got[6]
        assert got[7][0] == (r + 1) * (r + 2) / 2 and (got[8] is None if r == 0
                                                       else got[8][0] == r * (r + 1) / 2)
        assert got[9] is None and got[10] is None
        reqs.pop()
        reqs.append(world.irecv(mesh.PROC_NULL))
    # a start completes though its rank waits for something else first: rank 0 starts,
    # then receives what rank 1 sends only once its own all_reduce is done
    a = np.full(5, r + 1.0)
    p = C.all_reduce_init(world, a)
    p.start()
    if r == 0:
        assert world.recv(1, tag=3, timeout=20) == "after"
    k, v = mesh.waitany([p])
    assert k == 0 and v is a and (a == n * (n + 1) / 2).all(), a
    if r == 1:
        world.send("after", 0, tag=3)
    for i in range(2):      # polled by test(), by testall
        p.start()
        while not (p.test()[0] if i == 0 else mesh.testall([p])[0]):
            pass
        assert not p.active
    q = C.all_reduce_init(world, np.zeros(2, np.float32), op="band")     # (float: refused)
    with pytest.raises((TypeError, mesh.MeshError), match="all_reduce"):
        q.start()
        q.wait()
    assert not q.active
    q = C.all_gather_init(world, x, out=np.empty(3, np.int32))      # (rows of 4 a rank)
    with pytest.raises((ValueError, mesh.MeshError), match=r"all_gather_init on group world: "
                       r"out= has 3 elements, shaped \(3,\); the result has"):
        q.start()
        q.wait()


def test_mpi4py_programs_give_mpi4pys_answers() -> None:
    """README's "Coming from mpi4py": its ports of mpi4py's programs (a
    Jacobi loop with sendrecv, PROC_NULL and MPI.LAND, a task farm with
    probe and ANY_SOURCE) and MPI's logical reductions, at 3 ranks."""
    assert mesh.spawn(_mpi4py_programs, 3, timeout=90, env={"MESH_TIMEOUT": "30"}) == ["ok"] * 3
