"""Collectives between processes of one host: synchronized on the board
(collectives.shm.board), data copied once, straight out of the peers' memory
(collectives.shm.cma). No socket carries data or waits here. Those that
reduce are in local_reduce, those that move data in local_move; this module
keeps the barrier and names them all.

    small all_reduce, all_gather,  post payload | read the peers' | reduce in rank order
      broadcast, gather, reduce    (tiny ones: collectives.shm.tiny's short way, then
                                   these; scatter and all_to_all's too)
    large all_reduce               post address | reduce chunk r from every peer's buffer |
                                   stage 1 | read each peer's final chunk | stage 2 | exit;
                                   up to 8 MiB where ranks outnumber cores: copy into the
                                   arena | post | reduce chunk r
                                   from every arena | stage 1 | copy each arena's final chunk
    large reduce                   post addresses | reduce chunk r | stage 1 | root reads chunks
    small reduce_scatter           post payload | reduce chunk r of the peers' payloads
    small scan, exscan             post payload | read ranks 0..r-1's | combine them as
                                   recursive doubling over sockets would
    reduce_scatter                 post address | reduce chunk r | stage 2 | exit
    reduce_scatter of n parts      post the parts' addresses | reduce part r | stage 2 | exit
    small scatter                  root: post rows and meta | the others copy their row | stage 2
    small all_to_all               post payload | copy block r of each peer's
    all_to_all_v                   post rows and counts (large: counts and address) | check
                                   every rank's counts | copy (read) this rank's rows of each
                                   peer's | stage 2 and exit where a rank posted an address
    large broadcast, gather,       post address | read what this rank needs | stage 2 | exit
      all_gather, scatter, all_to_all

"Exit" waits until every peer that reads this rank's buffer has said stage 2,
so a buffer is never changed or freed under a reader (an arena is written
again only once the peers have left the call that read it). Every reduction
runs in a fixed order (rank order, or ring order from the chunk's owner for the
owner alone), so all ranks get the same bits.
"""
from __future__ import annotations

from ..runner import Ctx
from .board import Round
from .local_move import all_gather, all_to_all, all_to_all_v, broadcast, gather, scatter
from .local_move import scatter_meta
from .local_reduce import all_reduce_large, all_reduce_small, reduce
from .local_reduce import reduce_scatter, reduce_scatter_parts, scan

__all__ = ["all_reduce_small", "all_reduce_large", "barrier", "all_gather", "reduce_scatter",
           "reduce_scatter_parts", "broadcast", "reduce", "scatter", "gather", "all_to_all",
           "all_to_all_v", "scan", "scatter_meta"]


def barrier(ctx: Ctx) -> None:
    with Round(ctx) as r:
        r.post()
        r.gather()
