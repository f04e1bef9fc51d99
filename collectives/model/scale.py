"""Extrapolation to many hosts: all_reduce, broadcast and all_gather on
``hosts`` hosts of ``per_host`` ranks each (ranks host-major: host h holds
ranks h*L .. h*L+L-1), from the unit costs fitted on one host.

    hop between hosts   alpha_sock + wire  +  bytes * max(beta_sock, k * beta_link)
    hop inside a host   alpha_sock         +  bytes * beta_sock     (socket path)
    intra-host stage    the board path's fitted costs, one core per rank

k is how many ranks of a host send across its link at once (its NIC is
shared); beta_sock, meshrun's own per-byte cost on a socket hop, bounds a
hop however fast the link is. No congestion in the switches, no overlap
between a call's phases, one core per rank (share 1, and no kappa: that
is the cost of ranks outnumbering cores). Algorithms::

    ring          flat ring over all N ranks (2(N-1) steps; one stream per
                  NIC: only the last rank of a host sends across)
    rd            recursive doubling over all N (log2 N rounds; the rounds
                  at distance >= L cross hosts, all L ranks of a host at once)
    tree          binomial reduce then binomial broadcast (2 log2 N rounds;
                  at distance >= L only one rank per host is left)
    hier          board reduce in each host | ring all_reduce among the H
                  host leaders over sockets | board broadcast in each host
    hier_rd       the same with recursive doubling among the leaders
    hier_rs       board reduce_scatter | L rings among hosts at once, one per
                  local rank, on m/L each (the NIC shared by L) | board all_gather

    broadcast:  chain (pipelined, 1 MiB segments), tree (binomial), hier
                (binomial tree among the host leaders | board broadcast),
                hier_chain (chain among the leaders | board broadcast)
    all_gather: ring, rd (recursive doubling, blocks doubling each round),
                hier (board gather to the leader | ring among the leaders on
                blocks of m/H | board broadcast of the whole m)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..plan import Tuning, segment_count
from .costs import Params, Terms, terms

__all__ = ["Cluster", "LINKS", "parse_link", "ALGORITHMS", "at_scale", "best"]

LINKS = {"1gbit": 1e9, "10gbit": 10e9, "25gbit": 25e9, "100gbit": 100e9, "200gbit": 200e9,
         "400gbit": 400e9}


def parse_link(text: str) -> float:
    """'10gbit' -> 1e10 bits per second; a plain number is bits per second."""
    t = text.strip().lower()
    if t in LINKS:
        return LINKS[t]
    if t.endswith("gbit"):
        return float(t[:-4]) * 1e9
    return float(t)


@dataclass(frozen=True)
class Cluster:
    """Where the extrapolation runs: hosts, ranks per host, link speed (bits
    per second, each way, per host) and one-way wire latency (seconds)."""
    hosts: int
    per_host: int
    link_bps: float
    wire: float = 10e-6

    def __post_init__(self) -> None:
        if self.hosts < 1 or self.per_host < 1 or self.link_bps <= 0 or self.wire < 0:
            raise ValueError(f"bad cluster {self}")

    @property
    def ranks(self) -> int:
        return self.hosts * self.per_host


ALGORITHMS = {
    "all_reduce": ("ring", "rd", "tree", "hier", "hier_rd", "hier_rs"),
    "broadcast": ("chain", "tree", "hier", "hier_chain"),
    "all_gather": ("ring", "rd", "hier"),
}


class _Hops:
    """Per-hop costs of one cluster from one host's fitted costs."""

    def __init__(self, sock: Params, c: Cluster, tuning: Tuning) -> None:
        self.s, self.c, self.seg = sock, c, tuning.segment
        self.link = 8.0 / c.link_bps

    def intra(self, nbytes: float, msgs: int = 1) -> float:
        return msgs * self.s.alpha + nbytes * self.s.beta

    def inter(self, nbytes: float, msgs: int = 1, sharing: int = 1) -> float:
        return (msgs * self.s.alpha + self.c.wire
                + nbytes * max(self.s.beta, sharing * self.link))

    def nseg(self, nbytes: float) -> int:
        return segment_count(math.ceil(nbytes), 1, self.seg)


def _rounds(c: Cluster) -> tuple[int, int]:
    """(rounds inside a host, rounds across hosts) of a log2 N schedule."""
    total = max(0, (c.ranks - 1).bit_length())
    inside = min(total, max(0, (c.per_host - 1).bit_length()))
    return inside, total - inside


def _board(board: Params, op: str, n: int, m: float) -> float:
    return board.time(terms("board", op, n, int(m))) if n > 1 else 0.0


def _ring(h: _Hops, ring_n: int, across: bool, m: float, steps: int,
          sharing: int = 1) -> float:
    """``steps`` ring steps over chunks of m/ring_n, each step as slow as its
    hop between hosts when the ring crosses hosts."""
    chunk = m / ring_n
    k = h.nseg(chunk)
    return steps * (h.inter(chunk, k, sharing) if across else h.intra(chunk, k))


def _all_reduce(alg: str, h: _Hops, board: Params, c: Cluster, m: float,
                tuning: Tuning) -> float:
    sock, n, hosts, L = h.s, c.ranks, c.hosts, c.per_host
    if alg == "ring":
        return sock.a0 + _ring(h, n, hosts > 1, m, 2 * (n - 1)) + (n - 1) / n * m * sock.gamma
    inside, across = _rounds(c)
    if alg == "rd":
        return (sock.a0 + inside * h.intra(m) + across * h.inter(m, sharing=L)
                + (inside + across) * m * sock.gamma)
    if alg == "tree":
        hop = inside * h.intra(m) + across * h.inter(m)
        return 2 * (sock.a0 + hop) + (inside + across) * m * sock.gamma
    if alg in ("hier", "hier_rd"):
        lead = Cluster(hosts, 1, c.link_bps, c.wire)
        across_t = _all_reduce("ring" if alg == "hier" else "rd", h, board, lead, m, tuning)
        return (_board(board, "reduce", L, m) + (across_t if hosts > 1 else 0.0)
                + _board(board, "broadcast", L, m))
    if alg == "hier_rs":
        part = m / L
        across_t = 0.0
        if hosts > 1:
            across_t = (sock.a0 + _ring(h, hosts, True, part, 2 * (hosts - 1), sharing=L)
                        + (hosts - 1) / hosts * part * sock.gamma)
        return (_board(board, "reduce_scatter", L, m) + across_t
                + _board(board, "all_gather", L, m))
    raise ValueError(f"no all_reduce algorithm {alg!r}")


def _broadcast(alg: str, h: _Hops, board: Params, c: Cluster, m: float) -> float:
    sock, n, hosts, L = h.s, c.ranks, c.hosts, c.per_host
    if alg == "tree":
        inside, across = _rounds(c)
        return sock.a0 + inside * h.intra(m) + across * h.inter(m)
    if alg == "chain":
        k = h.nseg(m)
        seg = m / k
        fill = (n - hosts) * h.intra(seg) + (hosts - 1) * h.inter(seg)
        slowest = h.inter(seg) if hosts > 1 else h.intra(seg)
        return sock.a0 + fill + (k - 1) * slowest
    if alg in ("hier", "hier_chain"):
        lead = Cluster(hosts, 1, c.link_bps, c.wire)
        inner = "tree" if alg == "hier" else "chain"
        across_t = _broadcast(inner, h, board, lead, m) if hosts > 1 else 0.0
        return across_t + _board(board, "broadcast", L, m)
    raise ValueError(f"no broadcast algorithm {alg!r}")


def _all_gather(alg: str, h: _Hops, board: Params, c: Cluster, m: float) -> float:
    sock, n, hosts, L = h.s, c.ranks, c.hosts, c.per_host
    if alg == "ring":
        return sock.a0 + _ring(h, n, hosts > 1, m, n - 1)
    if alg == "rd":
        inside, across = _rounds(c)
        t, block = sock.a0, m / n
        for r in range(inside + across):
            t += h.intra(block) if r < inside else h.inter(block, sharing=L)
            block *= 2
        return t
    if alg == "hier":
        across_t = sock.a0 + _ring(h, hosts, True, m, hosts - 1) if hosts > 1 else 0.0
        gather = board.time(Terms(1, L - 1, m / hosts, 0, L - 1)) if L > 1 else 0.0
        return gather + across_t + _board(board, "broadcast", L, m)
    raise ValueError(f"no all_gather algorithm {alg!r}")


def at_scale(op: str, board: Params, sock: Params, c: Cluster, nbytes: int,
             tuning: Tuning = Tuning()) -> dict[str, float]:
    """Predicted seconds of ``op`` on ``nbytes`` by each algorithm of
    ALGORITHMS[op] on cluster ``c``."""
    h = _Hops(sock, c, tuning)
    m = float(nbytes)
    if op == "all_reduce":
        return {a: _all_reduce(a, h, board, c, m, tuning) for a in ALGORITHMS[op]}
    if op == "broadcast":
        return {a: _broadcast(a, h, board, c, m) for a in ALGORITHMS[op]}
    if op == "all_gather":
        return {a: _all_gather(a, h, board, c, m) for a in ALGORITHMS[op]}
    raise ValueError(f"no scale model for {op!r}; expected one of {tuple(ALGORITHMS)}")


def best(times: dict[str, float]) -> str:
    """The fastest algorithm of an ``at_scale`` result."""
    return min(times, key=lambda a: times[a])
