"""Pure arithmetic of the algorithms: chunk and segment boundaries, ring
steps, recursive-doubling partners, binomial trees, algorithm choice.

Nothing here touches a process or a buffer, so every rule is tested alone.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, Mapping

from mesh.peer import parse_size

from . import debug

__all__ = ["split", "spans", "ring_chunks", "segments", "segment_count", "ring_chunk",
           "RDPlan", "rd_plan", "rd_peers", "tree_parent", "tree_children", "chain",
           "Tuning", "parse_size", "ALGORITHMS", "ACCEPTED", "choose", "HIER", "layout"]


def split(count: int, parts: int) -> list[tuple[int, int]]:
    """``count`` items cut into ``parts`` contiguous ranges as even as they
    can be; the first ``count % parts`` ranges hold one item more. Ranges may
    be empty when count < parts.

    >>> split(7, 3)
    [(0, 3), (3, 5), (5, 7)]
    """
    if parts < 1 or count < 0:
        raise ValueError(f"cannot split {count} items into {parts} parts")
    q, r = divmod(count, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + q + (1 if i < r else 0)
        out.append((start, stop))
        start = stop
    return out


ring_chunks = split
"""The ring's chunks: chunk c of a count-long buffer is ``ring_chunks(count, n)[c]``."""


def spans(sizes: list[int]) -> list[tuple[int, int]]:
    """Where each of ``sizes`` lies laid end to end, ``(lo, hi)`` each (an
    uneven call's parts, by rank, in its flat array): split's ranges for
    sizes of one's choosing.

    >>> spans([3, 0, 2])
    [(0, 3), (3, 3), (3, 5)]
    """
    at = [0, *itertools.accumulate(sizes)]
    return list(zip(at[:-1], at[1:]))


def segment_count(max_len: int, itemsize: int, seg_bytes: int) -> int:
    """How many segments each chunk is cut into so that none exceeds
    ``seg_bytes`` (at least one, and at least one item per segment)."""
    per = max(1, seg_bytes // max(1, itemsize))
    return max(1, -(-max_len // per))


def segments(start: int, stop: int, nseg: int) -> list[tuple[int, int]]:
    """A chunk ``[start, stop)`` cut into ``nseg`` even segments; every chunk of
    a ring uses the same nseg, so segment j of any step lines up across ranks."""
    return [(start + a, start + b) for a, b in split(stop - start, nseg)]


def ring_chunk(rank: int, step: int, n: int, shift: int = 0) -> tuple[int, int]:
    """(chunk sent, chunk received) by ``rank`` at ring ``step``.

    Rank r sends chunk r - step and receives chunk r - step - 1 from its left
    neighbour, so what it receives at one step is what it sends at the next.
    With shift 0, after n - 1 reducing steps rank r owns the sum of chunk
    r + 1; with shift -1 it owns chunk r (reduce_scatter's layout)::

        step:    0    1    2          n = 4, shift 0
        rank 0:  0>   3>   2>   ...   ">" sent to the right
        rank 1:  1>   0>   3>
    """
    return (rank - step + shift) % n, (rank - step - 1 + shift) % n


@dataclass(frozen=True)
class RDPlan:
    """Recursive doubling for any n: ranks beyond the largest power of two p
    first fold into a partner (``fold_to``/``fold_from``), the p remaining
    ranks exchange with ``partners`` (distance 1, 2, 4...), and the folded
    ranks get the result back at the end from the same partner."""

    fold_to: int | None      # this rank hands its data to fold_to, then waits
    fold_from: int | None    # this rank first absorbs fold_from's data
    partners: tuple[int, ...]


def rd_plan(rank: int, n: int) -> RDPlan:
    """The recursive-doubling plan of ``rank`` in a world of ``n``.

    Of the first 2r ranks (r = n - p), each even one folds into the odd one
    after it; the others renumber 0..p-1 and run plain recursive doubling."""
    p = 1 << (n.bit_length() - 1)
    r = n - p
    if rank < 2 * r and rank % 2 == 0:
        return RDPlan(rank + 1, None, ())
    fold_from = rank - 1 if rank < 2 * r else None
    new = rank // 2 if rank < 2 * r else rank - r
    partners = []
    d = 1
    while d < p:
        peer_new = new ^ d
        partners.append(peer_new * 2 + 1 if peer_new < r else peer_new + r)
        d <<= 1
    return RDPlan(None, fold_from, tuple(partners))


def rd_peers(rank: int, n: int) -> list[int]:
    """Every rank ``rank`` exchanges with in recursive doubling on ``n``."""
    plan = rd_plan(rank, n)
    return [p for p in (plan.fold_to, plan.fold_from, *plan.partners) if p is not None]


def tree_parent(rank: int, n: int, root: int = 0) -> int | None:
    """Parent of ``rank`` in the binomial tree rooted at ``root``."""
    rel = (rank - root) % n
    if rel == 0:
        return None
    return ((rel & (rel - 1)) + root) % n


def tree_children(rank: int, n: int, root: int = 0) -> list[int]:
    """Children of ``rank`` in the binomial tree, the largest subtree first
    (that is the order a broadcast should feed them)."""
    rel = (rank - root) % n
    low = rel & -rel if rel else 1 << max(0, (n - 1).bit_length())
    kids = []
    d = low >> 1
    while d:
        if rel + d < n:
            kids.append((rel + d + root) % n)
        d >>= 1
    return kids


def chain(rank: int, n: int, root: int = 0) -> tuple[int | None, int | None]:
    """(previous, next) of ``rank`` on the chain root, root+1, ... root-1."""
    rel = (rank - root) % n
    prev = None if rel == 0 else (rank - 1) % n
    nxt = None if rel == n - 1 else (rank + 1) % n
    return prev, nxt


ALGORITHMS = {
    "all_reduce": ("rd", "ring"),
    "broadcast": ("tree", "chain"),
    "reduce": ("tree", "chain"),
}
"""Per collective: (algorithm for small buffers, algorithm for large ones)."""
_ALGS = {a for pair in ALGORITHMS.values() for a in pair} | {"hier"}    # ("ring": flat too)
_FORCEABLE = set(ALGORITHMS) | {"all_gather", "reduce_scatter", "*"}
ACCEPTED = {
    "all_reduce": ("rd", "ring", "hier"),
    "broadcast": ("tree", "chain", "hier", "ring"),
    "reduce": ("tree", "chain"),
    "all_gather": ("ring", "hier"),
    "reduce_scatter": ("ring", "hier"),
}
"""What MESH_COLL_ALGO's ``collective=algorithm`` takes, by collective (each
takes effect: an algorithm of ALGORITHMS', "hier" the two-level layout of
the topology-aware ones, "ring" the flat layout of all_gather,
reduce_scatter and broadcast, whose algorithm is then chosen by size, as
"*=ring" has it); another pair raises naming it (``reduce=hier`` was taken
and ran flat: reduce is not topology-aware; ``broadcast=ring`` was refused
though "ring" alone made broadcast flat). A value alone (``*``) applies to
the collectives that take it."""


@dataclass(frozen=True)
class Tuning:
    """Knobs read from the environment, the same on every rank of a job.

    MESH_COLL_SEGMENT   segment size of pipelined algorithms (default 1M)
    MESH_COLL_WINDOW    segments in flight per peer (default 8)
    MESH_COLL_SMALL     below this many bytes the small algorithm is used (64K)
    MESH_COLL_ALGO      force algorithms: "ring" or "all_reduce=ring,broadcast=tree";
                        "hier" / "ring" force the hierarchical / flat layout
                        across hosts ("hier", "all_reduce=hier,all_gather=ring")
    """

    segment: int = 1 << 20
    window: int = 8
    small: int = 64 << 10
    forced: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.segment < 1 or self.window < 1 or self.small < 0:
            raise ValueError(f"bad collective tuning {self}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Tuning":
        if env is None:
            key = _env_key()
            cached = _tuning_cache.get(key)
            if cached is None:
                env = os.environ.copy()
                cached = cls.from_env(env)
                was = debug.ON
                debug.read(env)             # (MESH_COLL_DEBUG: one of the keys)
                if debug.ON != was:         # every key kept reads as ON now: a hit sets none
                    _tuning_cache.clear()
                _tuning_cache[key] = cached
            return cached
        forced = []
        algo = env.get("MESH_COLL_ALGO", "")
        for item in filter(None, algo.replace(" ", "").split(",")):
            coll, _, alg = item.rpartition("=")
            if (coll or "*") not in _FORCEABLE or alg not in _ALGS:
                raise ValueError(f"MESH_COLL_ALGO={algo!r}: {item!r} is not an algorithm "
                                 f"({', '.join(sorted(_ALGS))}), alone or after a collective "
                                 f"and '=' ({', '.join(sorted(_FORCEABLE - {'*'}))})")
            if coll and alg not in ACCEPTED[coll]:
                raise ValueError(f"MESH_COLL_ALGO={algo!r}: {item!r}: {coll} has no algorithm "
                                 f"{alg!r}; it takes {' or '.join(map(repr, ACCEPTED[coll]))}")
            forced.append((coll or "*", alg))

        def read(name: str, default: str, parse: Any, least: int) -> Any:
            try:
                value = parse(env.get(name) or default)
            except ValueError as e:
                raise ValueError(f"{name}={env.get(name)!r}: {e}") from None
            if value < least:
                raise ValueError(f"{name}={env.get(name)!r}: must be at least {least}")
            return value
        return cls(read("MESH_COLL_SEGMENT", "1M", parse_size, 1),
                   read("MESH_COLL_WINDOW", "8", int, 1),
                   read("MESH_COLL_SMALL", "64K", parse_size, 0), tuple(forced))


_ENV_KEYS = ("MESH_COLL_SEGMENT", "MESH_COLL_WINDOW", "MESH_COLL_SMALL", "MESH_COLL_ALGO",
             "MESH_COLL_DEBUG")
_tuning_cache: dict[tuple[Any, ...], Tuning] = {}
_encode = getattr(os.environ, "encodekey", None)
_RAW_KEYS = tuple(_encode(k) for k in _ENV_KEYS) if _encode is not None else ()


def _env_key() -> tuple[Any, ...]:
    """The tuning variables' values as os.environ holds them (every collective
    call asks: its own dict is read directly, as os.environ.get costs four
    times more; a change made through os.environ is seen at the next call)."""
    data = getattr(os.environ, "_data", None)
    if _RAW_KEYS and type(data) is dict:
        return (data.get(_RAW_KEYS[0]), data.get(_RAW_KEYS[1]), data.get(_RAW_KEYS[2]),
                data.get(_RAW_KEYS[3]), data.get(_RAW_KEYS[4]))
    return tuple(os.environ.get(k) for k in _ENV_KEYS)


def choose(coll: str, nbytes: int, tuning: Tuning, forced: str | None = None) -> str:
    """Which algorithm ``coll`` uses for ``nbytes`` on ``n`` ranks: the per-call
    ``forced`` one, else the environment's, else small/large by size."""
    small, large = ALGORITHMS[coll]
    if forced == HIER:
        if HIER not in ACCEPTED[coll]:      # (reduce: no two-level form; it ran flat)
            raise ValueError(f"{coll} has no algorithm {HIER!r}; expected {small!r} or "
                             f"{large!r} (it is not topology-aware)")
        forced = None
    if forced is None:
        for c, alg in tuning.forced:    # (broadcast=ring: its layout only, as "*=ring")
            if (c == coll or c == "*") and alg in (small, large):
                forced = alg
    if forced is not None:
        if forced not in (small, large):
            raise ValueError(f"{coll} has no algorithm {forced!r}; "
                             f"expected {small!r} or {large!r}")
        return forced
    return small if nbytes < tuning.small else large


HIER = "hier"
TOPOLOGY_AWARE = ("all_reduce", "reduce_scatter", "all_gather", "broadcast")


def layout(coll: str, tuning: Tuning, forced: str | None = None) -> bool | None:
    """Whether ``coll`` runs hierarchically across hosts (collectives.host.hier):
    True when "hier" is forced (per call, else by MESH_COLL_ALGO for ``coll``
    or "*"), False when a flat algorithm is ("ring", or one of the
    collective's own), None to choose by topology: hierarchical when the
    group spans hosts with more than one rank on some host."""
    if coll not in TOPOLOGY_AWARE:
        return False
    flat = ("ring",) + ALGORITHMS.get(coll, ())
    wanted = [forced] if forced is not None else \
        [alg for c, alg in tuning.forced if c == coll or (c == "*" and (alg == HIER or alg in flat))]
    for alg in reversed(wanted):
        if alg == HIER:
            return True
        if alg in flat:
            return False
    return None
