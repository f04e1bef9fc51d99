"""The cost of each collective algorithm meshrun runs, as counts of six
unit costs along one rank's critical path::

    T = (a0 + msgs * alpha + moved * beta + reduced * gamma + ops * delta
         + crowd * kappa) / share

    a0      fixed cost of one call (Python entry, fingerprint, first sync)
    alpha   one message (socket path), or one peer waited for (board path:
            each time a rank waits for all its peers, n - 1 of them)
    beta    one byte moved (a socket hop, or a process_vm_readv copy)
    gamma   one byte reduced (numpy's combine)
    delta   one operation on a peer's data (board path: a cross-memory read
            or a payload copy, a combine: a system call or a numpy call)
    kappa   socket path, ranks outnumbering cores: one message of an
            exchange (recursive doubling, the rings: every rank sends and
            receives in every step) whose receiver was off its core when it
            came, so is switched in after another rank of the step ran
            there (a switch between processes, the caches that rank left):
            crowd = msgs * (1 - cores / n), the chance of that with n / cores
            ranks of the same step on a core (``crowding``). It saturates:
            at most one switch per message, however many ranks share the
            core (the measured CPU per message of the exchanges grows
            little past 4 ranks per core, docs/scale.md; until 2026-12-01
            16:40 crowd was msgs * (n / cores - 1), which over-charged 8
            ranks per core by 40%). None in the tree and chain (broadcast,
            reduce: one hop's two ranks run, the others sleep, and their
            CPU per message stays the 2-rank one at 32 ranks), none with a
            core per rank, so none at scale. (The board's waits already
            count every peer, n - 1.)
    share   the compute share of one rank: as measured (the time its threads
            ran over the time they ran or waited to run, from the kernel's
            scheduler statistics: collectives.tools.sweep's ``ran``), else
            min(1, cores / n); every term here is CPU work on one host (the
            socket hops are loopback copies and wake-ups), so all scale

Which algorithm runs is meshrun's own rule (collectives.plan.choose,
collectives.shm.board.CAPACITY), so the model follows its size switches.
Pure arithmetic: no process, no buffer.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from ..plan import Tuning, choose, segment_count

__all__ = ["PATHS", "OPS", "BOARD_CAPACITY", "Terms", "Params", "share", "algorithm", "terms",
           "crowding", "EXCHANGES", "predict", "row_share", "fit_params", "rel_errors", "nnls"]

PATHS = ("board", "socket")
OPS = ("all_reduce", "broadcast", "all_gather", "reduce", "reduce_scatter")
BOARD_CAPACITY = 64 << 10
"""collectives.shm.board.CAPACITY (not imported, to keep this module light;
tests/test_collectives_model.py checks they agree)."""


class Terms(NamedTuple):
    """Counts of each unit cost on one rank's critical path."""
    calls: float
    msgs: float
    moved: float
    reduced: float
    ops: float = 0.0
    crowd: float = 0.0


@dataclass(frozen=True)
class Params:
    """One path's unit costs, in seconds and seconds per byte."""
    a0: float
    alpha: float
    beta: float
    gamma: float
    delta: float = 0.0      # fits made before 2026-12-01 11:00 have none
    kappa: float = 0.0      # fits made before 2026-12-01 13:30 have none

    def time(self, t: Terms, share: float = 1.0) -> float:
        return (t.calls * self.a0 + t.msgs * self.alpha + t.moved * self.beta
                + t.reduced * self.gamma + t.ops * self.delta + t.crowd * self.kappa) / share

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def share(n: int, cores: float) -> float:
    """The compute share of one of ``n`` ranks on ``cores`` cores."""
    return min(1.0, cores / n)


def algorithm(path: str, op: str, nbytes: int, tuning: Tuning = Tuning()) -> str:
    """The algorithm meshrun runs for ``op`` on ``nbytes`` (the nccl-tests
    size: the all_gather output, the reduce_scatter input) on ``path``."""
    if path == "board":
        if op == "all_reduce":
            if choose("all_reduce", nbytes, tuning) == "rd":
                return "board_small" if nbytes <= BOARD_CAPACITY else "rd"
            return "board_large"
        if op in ("broadcast", "reduce"):
            small = nbytes <= min(tuning.small, BOARD_CAPACITY)
            return "board_small" if small else "board_large"
        return "board_large" if op == "reduce_scatter" else "board"
    if path != "socket":
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    if op in ("all_reduce", "broadcast", "reduce"):
        return choose(op, nbytes, tuning)
    return "ring"


def _log2(n: int) -> int:
    return max(0, (n - 1).bit_length())


def _board(op: str, alg: str, n: int, m: float, nseg: int) -> Terms:
    """Board counts (collectives.shm.local). ``msgs``: peers waited for,
    n - 1 each time a rank waits for all its peers (a post seen, a stage
    reached), since each such wait lasts until every peer has run its part
    (with more ranks than cores the waiting ones poll, yield and run again).
    ``ops``: operations on a peer's data (a read, a payload copy, a
    combine), ``nseg`` segments per chunk where a chunk is reduced."""
    p = n - 1
    if op in ("all_reduce", "reduce"):
        if alg == "board_small":            # one wait; copy and combine each peer's payload
            return Terms(1, p, n * m, p * m, 2 * p)
        # post | wait | read and combine each peer's segments of chunk r | stage 1 |
        # all_reduce: read each peer's final chunk | stage 2 (three waits);
        # reduce: the root reads them, the others wait for it (two and the root)
        waits = 3 * p if op == "all_reduce" else 2 * p + 1
        return Terms(1, waits, 2 * p / n * m, p / n * m, p * (2 * nseg + 1))
    if op == "broadcast":                   # a non-root copies or reads the root's one
        return Terms(1, p, 2 * m, 0, 1) if alg == "board_small" else Terms(1, 2 * p, m, 0, 1)
    if op == "all_gather":                  # every peer's payload, or every peer's buffer
        return Terms(1, p if m / n <= BOARD_CAPACITY else 2 * p, m, 0, p)
    if op == "reduce_scatter":              # wait | reduce chunk r | stage 2
        return Terms(1, 2 * p, p / n * m, p / n * m, 2 * p * nseg)
    raise ValueError(f"no board model for {op}")


def _socket(op: str, alg: str, n: int, m: float, seg: int) -> Terms:
    if op == "all_reduce" and alg == "rd":
        pow2 = 1 << (n.bit_length() - 1)
        k, extra = pow2.bit_length() - 1, int(n != pow2)
        return Terms(1, k + 2 * extra, (k + 2 * extra) * m, (k + extra) * m)
    nseg = segment_count(math.ceil(m / n), 1, seg)
    if op == "all_reduce":
        return Terms(1, 2 * (n - 1) * nseg, 2 * (n - 1) / n * m, (n - 1) / n * m)
    if op in ("all_gather", "reduce_scatter"):
        # both write the whole m into a new array each call (all_gather's
        # output, which the ring receives into; reduce_scatter's working
        # copy of its input), where all_reduce works in place and receives
        # into reused scratch: one more m moved
        red = (n - 1) / n * m if op == "reduce_scatter" else 0
        return Terms(1, (n - 1) * nseg, (n - 1) / n * m + m, red)
    if op in ("broadcast", "reduce"):
        red = 1.0 if op == "reduce" else 0.0
        if alg == "tree":
            d = _log2(n)
            return Terms(1, d, d * m, red * d * m)
        k = segment_count(int(m), 1, seg)
        return Terms(1, n - 2 + k, (n - 2 + k) * m / k, red * (n - 2 + k) * m / k)
    raise ValueError(f"no socket model for {op}")


def terms(path: str, op: str, n: int, nbytes: int, tuning: Tuning = Tuning(),
          cores: float | None = None) -> Terms:
    """The unit-cost counts of ``op`` on ``n`` ranks and ``nbytes`` on
    ``path``, on one host of ``cores`` cores (None: a core per rank, no
    ``crowd``)."""
    if n < 2:
        return Terms(1, 0, 0, 0)
    alg = algorithm(path, op, nbytes, tuning)
    if path == "board" and alg != "rd":
        nseg = segment_count(math.ceil(nbytes / n), 1, tuning.segment)
        return _board(op, alg, n, float(nbytes), nseg)
    t = _socket(op, alg, n, float(nbytes), tuning.segment)
    return t._replace(crowd=t.msgs * crowding(n, cores, alg))


EXCHANGES = ("rd", "ring")
"""The socket algorithms whose every step has every rank send and receive
(recursive doubling, the rings): the ones kappa is charged in."""


def crowding(n: int, cores: float | None, alg: str = "ring") -> float:
    """kappa's count per message of ``alg`` on ``n`` ranks of ``cores``
    cores: 1 - cores / n, the chance that the message's receiver does not
    hold its core when the message comes (the other r - 1 of the r = n /
    cores ranks there, all in the same step, hold it the rest of the
    time), so it is switched in after another rank ran there; at most one
    such switch per message, however many ranks share the core. 0 with a
    core per rank (``cores`` None or >= n) and outside the exchanges
    (EXCHANGES): in a tree or chain step only the hop's two ranks run, the
    others sleep in their receive."""
    if not cores or alg not in EXCHANGES or n <= cores:
        return 0.0
    return 1.0 - cores / n


def predict(params: Params, cores: float, path: str, op: str, n: int, nbytes: int,
            tuning: Tuning = Tuning()) -> float:
    """Predicted seconds per call of ``op`` on ``n`` ranks of one host."""
    return params.time(terms(path, op, n, nbytes, tuning, cores), share(n, cores))


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: solve, drop the most
    negative column, solve again (enough for six well-scaled columns)."""
    keep = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while keep:
        sol, *_ = np.linalg.lstsq(a[:, keep], b, rcond=None)
        if (sol >= 0).all():
            x[keep] = sol
            return x
        del keep[int(np.argmin(sol))]
    return x


def row_share(row: dict, cores: float) -> float:
    """A measured row's compute share: the scheduler's (``"ran"``,
    collectives.tools.sweep), else the probe's (``"share"``: rows measured
    before ``ran`` was kept), else min(1, cores / n).

    ``ran`` is taken over the timed calls themselves and counts only the
    time a thread wanted a core, so it sees oversubscription and other jobs
    alike and is not fooled by threads asleep in a receive. The probe (a
    numpy loop run by every rank at once between the timed calls) reads
    0.6-0.8 for 2 ranks on 2 idle cores, where ``ran`` reads 0.95, and so
    made every 2-rank prediction 1.3-1.7x too slow."""
    got = row.get("ran") or row.get("share")
    return float(got) if got else share(row["n"], cores)


def fit_params(rows: Iterable[dict], cores: float, tuning: Tuning = Tuning()) -> Params:
    """Unit costs fitted to measured rows (``{"path", "op", "n", "bytes",
    "t"}`` and maybe ``"share"``, one path): least absolute relative error
    (iteratively reweighted non-negative least squares), so small and large
    sizes weigh alike and a row hit by another job pulls less than it would
    on its square."""
    rows = list(rows)
    if not rows:
        raise ValueError("no measurements to fit")
    paths = {r["path"] for r in rows}
    if len(paths) != 1:
        raise ValueError(f"fit one path at a time, got {sorted(paths)}")
    path = paths.pop()
    a = np.array([np.array(terms(path, r["op"], r["n"], r["bytes"], tuning, cores))
                  / row_share(r, cores) / r["t"] for r in rows])
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    a /= scale
    ones = np.ones(len(rows))
    w = ones
    for _ in range(_IRLS_ROUNDS):
        x = nnls(a * w[:, None], w)
        w = 1 / np.sqrt(np.maximum(np.abs(a @ x - ones), _IRLS_FLOOR))
    return Params(*(float(v) for v in x / scale))


_IRLS_ROUNDS = 30
_IRLS_FLOOR = 0.01


def rel_errors(params: Params, cores: float, rows: Sequence[dict],
               measured_share: bool = True) -> list[float]:
    """(predicted - measured) / measured for each row, predicted with the
    row's measured share (or with min(1, cores / n))."""
    out = []
    for r in rows:
        sh = row_share(r, cores) if measured_share else share(r["n"], cores)
        t = terms(r["path"], r["op"], r["n"], r["bytes"], cores=cores)
        out.append(params.time(t, sh) / r["t"] - 1)
    return out
