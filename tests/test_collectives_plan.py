"""The pure parts of collectives: op table, chunk and segment arithmetic,
ring steps, recursive doubling, trees, algorithm choice, bench arithmetic.
No process is started here."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from collectives.tools.bench import bus_factor, input_count, parse_sizes, plan_rows
from collectives.ops import OPS, resolve
from collectives.plan import (ALGORITHMS, Tuning, chain, choose, layout, parse_size, rd_peers,
                              rd_plan, ring_chunk, ring_chunks, segment_count, segments, split,
                              tree_children, tree_parent)

NUMERIC = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
           "float16", "float32", "float64", "complex64", "complex128"]


# ---- ops ---------------------------------------------------------------------------------

def _allowed(op: str, dt: np.dtype) -> bool:
    if op in ("band", "bor", "bxor", "land", "lor", "lxor"):
        return dt.kind in "biu"
    if op == "avg":
        return dt.kind != "b"
    if op in ("min", "max"):
        return dt.kind != "c"
    return True


@pytest.mark.parametrize("dtype", NUMERIC)
@pytest.mark.parametrize("op", OPS)
def test_op_table_matches_numpy(op: str, dtype: str) -> None:
    dt = np.dtype(dtype)
    if not _allowed(op, dt):
        with pytest.raises(TypeError, match=f"{op}.*{dt}|{dt}.*{op}"):
            resolve(op, dt)
        return
    rop = resolve(op, dt)
    rng = np.random.default_rng(0)
    xs = [(rng.integers(0, 5, size=7)).astype(dt) for _ in range(3)]
    ref = {"sum": lambda: xs[0] + xs[1] + xs[2], "avg": lambda: (xs[0] + xs[1] + xs[2]) / 3,
           "prod": lambda: xs[0] * xs[1] * xs[2],
           "min": lambda: np.minimum(np.minimum(xs[0], xs[1]), xs[2]),
           "max": lambda: np.maximum(np.maximum(xs[0], xs[1]), xs[2]),
           "band": lambda: xs[0] & xs[1] & xs[2], "bor": lambda: xs[0] | xs[1] | xs[2],
           "bxor": lambda: xs[0] ^ xs[1] ^ xs[2],
           "land": lambda: xs[0].astype(bool) & xs[1].astype(bool) & xs[2].astype(bool),
           "lor": lambda: xs[0].astype(bool) | xs[1].astype(bool) | xs[2].astype(bool),
           "lxor": lambda: xs[0].astype(bool) ^ xs[1].astype(bool) ^ xs[2].astype(bool)}[op]()
    acc = xs[0].copy()
    rop.combine(acc, xs[1])
    rop.combine(acc, xs[2])
    rop.finish(acc, 3)
    assert acc.dtype == dt
    np.testing.assert_array_equal(acc, np.asarray(ref).astype(dt))


@pytest.mark.parametrize("dtype", ["int8", "int32", "int64", "uint8", "uint64"])
def test_avg_of_integers_is_truncated_toward_zero_at_any_magnitude(dtype: str) -> None:
    """As NCCL's (and C's) division, not numpy's floor: -7 / 4 is -1."""
    info = np.iinfo(dtype)
    vals = [7, 6, 0, 1, int(info.max), int(info.max) - 3] + (
        [-7, -6, -1, int(info.min), int(info.min) + 3] if info.min < 0 else [])
    a = np.array(vals, dtype)
    resolve("avg", a.dtype).finish(a, 4)
    want = [abs(v) // 4 * (1 if v >= 0 else -1) for v in vals]
    assert a.tolist() == want, (a.tolist(), want)
    with pytest.raises(TypeError, match="bool"):
        resolve("avg", np.bool_)
    few = np.array([-128, 127, -3], np.int8)       # more ranks than int8 counts
    resolve("avg", few.dtype).finish(few, 128)
    assert few.tolist() == [-1, 0, 0]


def test_bool_ops_are_logical() -> None:
    a, b = np.array([True, True, False, False]), np.array([True, False, True, False])
    for op, want in [("sum", a | b), ("max", a | b), ("prod", a & b), ("min", a & b),
                     ("bxor", a ^ b)]:
        acc = a.copy()
        resolve(op, bool).combine(acc, b)
        assert acc.tolist() == want.tolist(), op


def test_unknown_op_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown reduction op 'mean'.*sum"):
        resolve("mean", np.float32)


# ---- chunks and segments -----------------------------------------------------------------

@given(st.integers(0, 10_000), st.integers(1, 64))
def test_split_covers_evenly(count: int, parts: int) -> None:
    b = split(count, parts)
    assert len(b) == parts and b[0][0] == 0 and b[-1][1] == count
    assert all(b[i][1] == b[i + 1][0] for i in range(parts - 1))
    lens = [hi - lo for lo, hi in b]
    assert max(lens) - min(lens) <= 1 and lens == sorted(lens, reverse=True)


def test_ring_chunks_shorter_than_world() -> None:
    assert ring_chunks(3, 5) == [(0, 1), (1, 2), (2, 3), (3, 3), (3, 3)]
    assert ring_chunks(0, 3) == [(0, 0)] * 3
    assert ring_chunks(7, 3) == [(0, 3), (3, 5), (5, 7)]


@given(st.integers(0, 5_000_000), st.sampled_from([1, 2, 4, 8]), st.integers(4096, 1 << 21))
def test_segments_bounded_and_aligned(length: int, itemsize: int, seg_bytes: int) -> None:
    nseg = segment_count(length, itemsize, seg_bytes)
    segs = segments(100, 100 + length, nseg)
    assert segs[0][0] == 100 and segs[-1][1] == 100 + length
    per = max(1, seg_bytes // itemsize)
    assert all(hi - lo <= per for lo, hi in segs)
    assert nseg == 1 or (nseg - 1) * per < length


def test_segments_of_one_mib() -> None:
    assert segment_count(16 << 20, 4, 1 << 20) == 64
    assert segment_count((16 << 20) + 1, 4, 1 << 20) == 65
    assert segment_count(0, 4, 1 << 20) == 1


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("shift", [0, -1])
def test_ring_steps_chain_and_end_owned(n: int, shift: int) -> None:
    for r in range(n):
        for s in range(2 * n - 3):
            assert ring_chunk(r, s, n, shift)[1] == ring_chunk(r, s + 1, n, shift)[0]
            assert ring_chunk(r, s, n, shift)[1] == ring_chunk((r - 1) % n, s, n, shift)[0]
        if n > 1:
            owned = ring_chunk(r, n - 2, n, shift)[1]
            assert owned == ((r + 1) % n if shift == 0 else r)


# ---- recursive doubling and trees --------------------------------------------------------


@pytest.mark.parametrize("n", range(1, 10))
def test_rd_peers_are_mutual(n: int) -> None:
    """collectives.host.link sets a pair up only where both ends name each other."""
    for r in range(n):
        for p in rd_peers(r, n):
            assert r in rd_peers(p, n) and p != r, (n, r, p)

@pytest.mark.parametrize("n", range(1, 17))
def test_rd_plan_reduces_everything_everywhere(n: int) -> None:
    """Simulate the plan on sets of contributions: every rank ends with all."""
    plans = [rd_plan(r, n) for r in range(n)]
    have = [{r} for r in range(n)]
    for r, p in enumerate(plans):
        if p.fold_to is not None:
            assert plans[p.fold_to].fold_from == r
            have[p.fold_to] |= have[r]
    rounds = {len(p.partners) for p in plans if p.fold_to is None}
    assert len(rounds) == 1
    for i in range(rounds.pop()):
        nxt = [set(h) for h in have]
        for r, p in enumerate(plans):
            if p.fold_to is None:
                assert plans[p.partners[i]].partners[i] == r
                nxt[r] |= have[p.partners[i]]
        have = nxt
    for r, p in enumerate(plans):
        if p.fold_to is not None:
            have[r] = have[p.fold_to]
    assert all(h == set(range(n)) for h in have)


@pytest.mark.parametrize("n", range(1, 17))
@pytest.mark.parametrize("root", [0, 1, 4])
def test_binomial_tree_spans(n: int, root: int) -> None:
    root %= n
    for r in range(n):
        for c in tree_children(r, n, root):
            assert tree_parent(c, n, root) == r
    reached, frontier = {root}, [root]
    while frontier:
        kids = [c for r in frontier for c in tree_children(r, n, root)]
        assert not reached & set(kids)
        reached |= set(kids)
        frontier = kids
    assert reached == set(range(n))
    assert tree_parent(root, n, root) is None


def test_chain_order() -> None:
    assert [chain(r, 4, 2) for r in range(4)] == [(3, 1), (0, None), (None, 3), (2, 0)]
    assert chain(0, 1) == (None, None)


# ---- tuning and choice -------------------------------------------------------------------

def test_parse_size() -> None:
    assert [parse_size(s) for s in ["8", "64K", "1M", "1MiB", "2g", "3B"]] == \
        [8, 65536, 1 << 20, 1 << 20, 2 << 30, 3]
    with pytest.raises(ValueError, match="not a size"):
        parse_size("12X")


def test_choose_by_size_call_and_env() -> None:
    t = Tuning.from_env({})
    assert choose("all_reduce", 8, t) == "rd"
    assert choose("all_reduce", 64 << 20, t) == "ring"
    assert choose("all_reduce", 8, t, forced="ring") == "ring"
    env = Tuning.from_env({"MESH_COLL_ALGO": "all_reduce=ring, broadcast=chain",
                           "MESH_COLL_SEGMENT": "256K", "MESH_COLL_SMALL": "1K"})
    assert env.segment == 256 << 10 and env.small == 1024
    assert choose("all_reduce", 8, env) == "ring"
    assert choose("broadcast", 8, env) == "chain"
    assert choose("reduce", 8, env) == "tree"
    assert choose("reduce", 8, Tuning.from_env({"MESH_COLL_ALGO": "chain"})) == "chain"
    with pytest.raises(ValueError, match="all_reduce has no algorithm 'tree'"):
        choose("all_reduce", 8, t, forced="tree")
    # a typo is named, not ignored; so is a tuning value that is not a number
    for algo in ("rnig", "allreduce=ring", "all_reduce=bogus"):
        with pytest.raises(ValueError, match=rf"MESH_COLL_ALGO='{algo}': .* is not an algorithm"):
            Tuning.from_env({"MESH_COLL_ALGO": algo})
    # every collective=algorithm pair MESH_COLL_ALGO takes has its effect; any other raises
    # naming the pair and what the collective takes (reduce=hier was taken and ran flat)
    accepted = {"all_reduce": ("rd", "ring", "hier"),
                "broadcast": ("tree", "chain", "hier", "ring"),     # (ring: as "*=ring")
                "reduce": ("tree", "chain"), "all_gather": ("ring", "hier"),
                "reduce_scatter": ("ring", "hier")}     # (README's table says so)
    for coll, takes in accepted.items():
        for alg in sorted({"rd", "ring", "tree", "chain", "hier"}):
            item = f"{coll}={alg}"
            if alg not in takes:
                with pytest.raises(ValueError, match=rf"MESH_COLL_ALGO='{item}': '{item}': "
                                                     rf"{coll} has no algorithm '{alg}'; it "
                                                     rf"takes {' or '.join(map(repr, takes))}"):
                    Tuning.from_env({"MESH_COLL_ALGO": item})
                continue
            env = Tuning.from_env({"MESH_COLL_ALGO": item})
            if alg == "hier":
                assert layout(coll, env) is True, item
            elif alg in ALGORITHMS.get(coll, ()):
                assert choose(coll, 8, env) == choose(coll, 1 << 30, env) == alg, item
            else:
                assert layout(coll, env) is False, item      # ring: the flat layout
                if coll in ALGORITHMS:      # broadcast: its algorithm by size, as "*=ring"
                    star = Tuning.from_env({"MESH_COLL_ALGO": alg})
                    assert layout(coll, star) is False
                    assert [choose(coll, n, env) for n in (8, 1 << 30)] == \
                        [choose(coll, n, star) for n in (8, 1 << 30)] == \
                        list(ALGORITHMS[coll]), item
    with pytest.raises(ValueError, match="reduce has no algorithm 'hier'; expected 'tree' "
                                         "or 'chain'"):
        choose("reduce", 8, t, forced="hier")               # reduce(algorithm="hier")
    with pytest.raises(ValueError, match=r"MESH_COLL_WINDOW='abc': invalid literal"):
        Tuning.from_env({"MESH_COLL_WINDOW": "abc"})
    with pytest.raises(ValueError, match=r"MESH_COLL_WINDOW='-1': must be at least 1"):
        Tuning.from_env({"MESH_COLL_WINDOW": "-1"})
    with pytest.raises(ValueError, match=r"MESH_COLL_SEGMENT='0': must be at least 1"):
        Tuning.from_env({"MESH_COLL_SEGMENT": "0"})



def test_tuning_follows_the_environment_as_it_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call reads the knobs (from os.environ's own dict, cheaply): a
    change made in the process applies to the next collective."""
    for k in ("MESH_COLL_SEGMENT", "MESH_COLL_WINDOW", "MESH_COLL_SMALL", "MESH_COLL_ALGO",
              "MESH_COLL_DEBUG"):
        monkeypatch.delenv(k, raising=False)
    assert Tuning.from_env() == Tuning()
    monkeypatch.setenv("MESH_COLL_WINDOW", "3")
    monkeypatch.setenv("MESH_COLL_ALGO", "ring")
    assert Tuning.from_env() == Tuning(window=3, forced=(("*", "ring"),))
    monkeypatch.setenv("MESH_COLL_WINDOW", "5")
    assert Tuning.from_env().window == 5
    monkeypatch.delenv("MESH_COLL_WINDOW")
    monkeypatch.delenv("MESH_COLL_ALGO")
    assert Tuning.from_env() == Tuning()
    # MESH_COLL_DEBUG is read with them (collectives.debug.ON, the one test a call makes)
    from collectives import debug
    assert not debug.ON
    monkeypatch.setenv("MESH_COLL_DEBUG", "1")
    assert Tuning.from_env() == Tuning() and debug.ON
    monkeypatch.setenv("MESH_COLL_DEBUG", "maybe")
    with pytest.raises(ValueError, match="MESH_COLL_DEBUG='maybe': a switch"):
        Tuning.from_env()
    monkeypatch.delenv("MESH_COLL_DEBUG")
    assert Tuning.from_env() == Tuning() and not debug.ON

# ---- benchmark arithmetic ----------------------------------------------------------------

def test_bench_arithmetic() -> None:
    assert parse_sizes("8:64") == [8, 16, 32, 64]
    assert parse_sizes("8:64M")[-1] == 64 << 20 and len(parse_sizes("8:64M")) == 24
    assert parse_sizes("1K,3") == [1024, 3]
    assert bus_factor("all_reduce", 4) == 1.5 and bus_factor("all_gather", 4) == 0.75
    assert bus_factor("broadcast", 4) == 1.0
    assert input_count("all_gather", 64, 4, 4) == 4
    assert input_count("reduce_scatter", 40, 4, 4) == 8
    assert input_count("all_reduce", 8, 4, 4) == 2
    rows = plan_rows("all_reduce", [8, 64 << 20], 4, 2)
    assert rows[0][1] == 200 and rows[1][1] >= 5
