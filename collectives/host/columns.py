"""The large hierarchical all_reduce with as many ranks on every host, its
three levels in one board round on the host (once the host's boards are
up). Local rank i owns chunk i of the buffer: it reduces the chunk over its
host, all-reduces it with the local ranks i of the other hosts (the
column's ring, collectives.host.ring) and its host reads it back.

By default the levels run one after the other inside the round::

    one board round on the host for the whole call (post the buffer's address)
      chunk i += each local peer's chunk i             (out of its buffer)
      column ring over chunk i
      stage = all of chunk i final; read each local peer's chunk once it
              says so                                  (sleeping on its stage)
      stage DONE, wait for every peer's DONE           (no one reads us any more)

One round, one preparation and one fingerprint check on the host instead of
the three phases' two (collectives.host.hier), and fewer waits on the
board: less of the call's fixed cost (BENCHMARKS.md, thirty-seventh
session). With MESH_COLL_PIPELINE=1 the levels are pipelined segment by
segment instead, so a segment crosses hosts while the next one is reduced
within the host and the one before is read back::

      column ring over chunk i, with its hooks:
        first(seg)   seg += each local peer's seg      (out of its buffer)
        final(seg)   stage = segments final so far; read what the local
                     peers have made final by now      (no wait)
      read the local peers' remaining final segments   (sleeping on their stage)

The local peers know which segment a stage number means: the column ring's
``final_regions`` of their chunk (one after the other, the stage jumps to
their count at once). Peer p's chunk of this rank's buffer is read by p in
its ``first`` and written here only after p's stage says it is final, so
it never changes under its reader; this rank's column writes only chunk i,
which its local peers read only once its stage says so. So the two forms
interoperate on one host, and the column's ring (and its messages) is the
one the three phases run one after the other (collectives.host.hier), so
hosts that take one round and hosts that do not (no boards) interoperate.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .. import scratch
from ..ops import ReduceOp
from ..plan import ring_chunks
from ..runner import Ctx
from ..shm.board import Round
from ..shm.cma import peer_read
from .ring import final_regions, ring

__all__ = ["host_body"]

_DONE = 1 << 40
"""The stage that says: done reading the local peers (above any segment count)."""


def host_body(buf: np.ndarray, op: ReduceOp, i: int, k: int, hosts: int, host: int,
              column: Callable[[Callable[[Ctx], None]], None],
              pipelined: bool = False) -> Callable[[Ctx], None]:
    """The host group's body of the all_reduce of the flat ``buf`` for local
    rank ``i`` of ``k`` on host ``host`` of ``hosts``, its levels one after
    the other or ``pipelined``; ``column(body)`` runs ``body`` as the
    column's collective."""
    bounds = ring_chunks(buf.size, k)
    lo, hi = bounds[i]
    mine, item = buf[lo:hi], buf.itemsize

    def body(lc: Ctx) -> None:
        t = lc.tuning
        finals = [final_regions(hosts, host, b - a, item, t.segment, t.window)
                  for a, b in bounds]
        bufs = scratch.take(buf.dtype, max(1, t.segment // item), 1)
        tmp = bufs[0]
        with Round(lc) as r:
            r.post(addr=buf.ctypes.data)
            addrs = r.gather()
            peers = r.peers
            read = dict.fromkeys(peers, 0)      # peer p's final segments read so far
            count = 0

            def first(a: int, b: int) -> None:
                if b <= a:
                    return
                out = mine[a:b]
                for p in peers:
                    part = tmp[:b - a]
                    peer_read(lc, p, addrs[p] + (lo + a) * item, part)
                    op.combine(out, part)

            def pull(wait: bool) -> None:
                for p in peers:
                    base, regions = bounds[p][0], finals[p]
                    while read[p] < len(regions):
                        if r.stage_of(p) <= read[p]:
                            if not wait:
                                break
                            r.wait_stage([p], read[p] + 1, patient=True)
                        a, b = regions[read[p]]
                        if b > a:
                            peer_read(lc, p, addrs[p] + (base + a) * item,
                                      buf[base + a:base + b])
                        read[p] += 1

            def final(a: int, b: int) -> None:
                nonlocal count
                count += 1
                r.stage(count)
                pull(False)

            if pipelined:
                column(lambda cc: ring(cc, mine, op, 2 * (hosts - 1), hosts - 1,
                                       hooks=(first, final)))
                pull(True)
            else:
                step = max(1, t.segment // item)    # (tmp's size)
                for a in range(0, hi - lo, step):
                    first(a, min(a + step, hi - lo))
                column(lambda cc: ring(cc, mine, op, 2 * (hosts - 1), hosts - 1))
                r.stage(len(finals[i]))
                for p in peers:
                    r.wait_stage([p], len(finals[p]), patient=True)
                    a, b = bounds[p]
                    if b > a:
                        peer_read(lc, p, addrs[p] + a * item, buf[a:b])
            r.stage(_DONE)
            r.wait_stage(peers, _DONE)
        scratch.give(bufs)
    return body
