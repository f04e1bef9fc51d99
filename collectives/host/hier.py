"""Collectives across hosts in two levels: within each host over the
same-host path (the board and cross-memory attach, collectives.shm), across
hosts over sockets between one rank per host (the leaders: local rank 0 of
each host), then within each host again::

    all_reduce      small, as many ranks on every host: host all_reduce
                    (one board round; the first call sets the boards up,
                    or messages where there are none) | local rank i
                    all-reduces the host's sum with the local ranks i of
                    the other hosts (recursive doubling over kept TCP
                    links, collectives.host.link; every column at once),
                    later blocking calls the short way
                    (collectives.host.tiny);
                    small otherwise: host reduce to the leader | leaders
                    all_reduce (recursive doubling, over those links) |
                    host broadcast from the leader, in one board round on
                    the host once its boards are up (the others sleep on
                    the leader's bell, collectives.shm.bell, while the
                    leaders talk);
                    large, as many ranks on every host: host reduce_scatter |
                    local rank i all-reduces chunk i with the local ranks i
                    of the other hosts (a ring per column, all at once) |
                    host all_gather; once the host's boards are up, the
                    three in one board round with the column nested
                    (collectives.host.columns; pipelined segment by
                    segment with MESH_COLL_PIPELINE=1);
                    large otherwise: as small, a ring among the leaders
    reduce_scatter  large, as many ranks on every host: host reduce_scatter
                    (local rank i gets the host's sum of its column's
                    rows) | local rank i reduce-scatters those with the
                    local ranks i of the other hosts (a ring per column,
                    all at once); otherwise the all_reduce above on a copy,
                    then this rank's rows
    all_gather      as many ranks on every host: local rank i all-gathers
                    its row with the local ranks i of the other hosts (a
                    ring per column, all at once) | host all_gather of the
                    columns; otherwise host gather to the leader | leaders
                    all_gather of the hosts' blocks | host broadcast of the
                    whole
    broadcast       root's host: broadcast from the root | leaders broadcast
                    from the root's leader | other hosts: host broadcast

reduce_scatter_v and all_gather_v take reduce_scatter's and all_gather's
forms with each rank's part of its count's size (a column's or a host's
parts one after the other, the rings' chunks uneven, empty ones too).

A call takes this layout when its group spans more than one host and some
host holds more than one of its ranks: an all_reduce (reduce_scatter,
reduce_scatter_v) at any size, all_gather (all_gather_v) and broadcast
from MESH_COLL_SMALL (64K; below, the
flat tree and ring are quicker than three phases); MESH_COLL_ALGO /
``algorithm=`` "hier" or "ring" force it either way (collectives.plan.layout). Which rank sits on
which host is the mesh's rendezvous table's (mesh.env.host_id of each
rank; MESH_HOST_ID overrides it), which every rank holds: the per-host and
leaders' groups are made on the group's first collective that asks, the
same on every rank, with ids derived from the group's (no message).

Each phase is a collective of its own on its sub-group (its own tag,
numbered from the top call's, the same on every rank whatever earlier
calls did (numbered); the top call's fingerprint plus the phase's name, so
a mismatch anywhere is seen on some rank of every sub-group), bounded by
what is left of the call's deadline. Whether a host's boards are up does
not change the phases' groups and names across hosts (the one-round forms
run the same phase across hosts as the three phases), so a failed call
that leaves them up on some hosts only changes nothing for the next. A
rank whose phase fails abandons the phases it has not made yet
(runner.abandon), so the ranks waiting in them raise the same error kind
(a lost peer naming the same world rank) instead of waiting, and every
sub-group's calls stay numbered alike. A phase nested in another (the
one-round forms above) is abandoned the same way when the outer one fails
before it is made.
"""
from __future__ import annotations

import hashlib
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from mesh import Comm, MeshTimeoutError
from mesh.peer import config_flag

from .. import scratch
from ..ops import ReduceOp
from ..plan import Tuning, rd_peers, ring_chunks
from ..runner import Ctx, abandon, abort_kind, agreed, caught, start
from ..shm import board, cma, local, tiny as shm_tiny
from ..shm.board import Round
from ..shm.cma import peer_read
from . import columns, link
from .ring import ring
from .rooted import broadcast_chain, broadcast_tree, gather_direct, reduce_chain, reduce_tree
from .small import all_reduce_rd

__all__ = ["Topology", "topology", "topology_of", "refuse", "numbered", "settled", "unsettle",
           "all_reduce", "reduce_scatter", "all_gather", "broadcast", "rd_across",
           "small_columns", "late_named", "SMALL_HOST", "SMALL_COLUMN", "FIRST", "ACROSS",
           "LAST", "stats"]

stats = {"one_round": 0, "small_columns": 0}
"""All_reduces whose host part ran in one board round, small ones over the
columns (tests)."""


@dataclass(frozen=True)
class Topology:
    """A group spread over hosts: ``hosts[h]`` the group ranks on host h
    (hosts in order of their first rank), this rank's host ``host``, its
    host's group ``local`` (local rank 0 leads) and, on leaders only, the
    leaders' group (leaders' rank h = host h)."""

    hosts: tuple[tuple[int, ...], ...]
    host: int
    local: Comm
    leaders: Comm | None
    column: Comm | None = None


_topos: "weakref.WeakKeyDictionary[Comm, Topology | None]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_making = threading.Lock()     # held while a group's sub-groups are made (topology)


def _sub(g: Comm, members: tuple[int, ...], name: str) -> Comm:
    """A sub-group of ``g`` made without group()'s counter (the user's own
    group() calls stay numbered as they were): its id hashes g's id and
    the name and the members, the same on every rank (the leaders and
    column 0 hold the same ranks but are separate groups)."""
    key = repr((g.gid, "hier", name, members)).encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    sub = Comm(g._t, [g.ranks[r] for r in members], int.from_bytes(digest, "little") >> 1 or 1,
               f"{g.name}/{name}")
    with _lock:
        _topos[sub] = None      # one host, or one rank per host: flat
    board.forgettable(sub)      # (unsettle)
    return sub


def topology(g: Comm) -> Topology | None:
    """The group's layout over hosts, or None when the flat algorithms fit
    (one host, or one rank per host): from the mesh's table of host ids
    (every rank has it, so no message), made once per group."""
    with _lock:
        if g in _topos:
            return _topos[g]
    with _making:       # (one thread makes the sub-groups; another that asks meanwhile waits)
        with _lock:
            if g in _topos:
                return _topos[g]
        topo = _layout(g)
        with _lock:
            _topos[g] = topo
        return topo


def _layout(g: Comm) -> Topology | None:
    topo = None
    if g.size > 2:
        ch = g.collective_channel()
        ids = [ch.host(r) for r in range(g.size)]
        order = list(dict.fromkeys(ids))
        hosts = tuple(tuple(r for r in range(g.size) if ids[r] == h) for h in order)
        if 1 < len(hosts) < g.size:
            mine = order.index(ids[g.rank])
            heads = tuple(h[0] for h in hosts)
            local_g = _sub(g, hosts[mine], f"host{mine}")
            leaders = _sub(g, heads, "leaders") if g.rank in heads else None
            column = None
            if len({len(h) for h in hosts}) == 1:    # as many ranks on every host
                i = hosts[mine].index(g.rank)
                column = _sub(g, tuple(h[i] for h in hosts), f"column{i}")
            topo = Topology(hosts, mine, local_g, leaders, column)
    return topo


def topology_of(g: Comm) -> Topology | None:
    """The layout ``g``'s collectives found (None: flat, or not asked yet)."""
    with _lock:
        return _topos.get(g)


def _columns(topo: Topology, coll: str, large: bool) -> bool:
    """Whether a large all_reduce (reduce_scatter) runs over the columns."""
    return large and coll in ("all_reduce", "reduce_scatter") and topo.column is not None


def _one_round(topo: Topology) -> bool:
    """Whether an all_reduce runs its host's part in one board round with
    the part across hosts nested in it (collectives.host.columns, and
    _all_reduce_small below): the host's boards are up (an earlier call set
    them up) and no peer of the host forgot them (board.kept: it takes the
    three phases, which set them up again). Otherwise its three phases run
    one after the other. As the call finds it (_agreed_one_round), or as
    it stands (MESH_COLL_DEBUG's line)."""
    return topo.local.size > 1 and board.kept(topo.local)


def _agreed_one_round(ctx: Ctx, topo: Topology) -> bool:
    """_one_round for the call ``ctx``, read once every rank of the host with
    the boards up has entered it (board.agree), so that they all read the
    same peers' marks: a peer that forgot the boards writes its mark before
    its next call, but perhaps after this rank's next call has begun."""
    board.agree(ctx, topo.local, -3 * ctx.tag + FIRST)    # (numbered's round; none: no wait)
    return _one_round(topo)


def _pipelined() -> bool:
    """Whether a large all_reduce over the columns, in one board round,
    pipelines its three levels (collectives.host.columns):
    MESH_COLL_PIPELINE=1 (job-wide), off by default: on the 2-core machine
    that hosts both "hosts" it was no quicker than the levels one after the
    other, and slower under load (BENCHMARKS.md, issue 13, seventh and
    thirty-seventh sessions)."""
    return config_flag("MESH_COLL_PIPELINE", False)


def _small_round(topo: Topology, nbytes: int) -> bool:
    """Whether a small all_reduce of ``nbytes`` takes _all_reduce_small."""
    return nbytes <= board.CAPACITY and _one_round(topo)


def small_columns(topo: Topology, nbytes: int) -> bool:
    """Whether a small all_reduce of ``nbytes`` runs over the columns
    (_all_reduce_small_columns), not through the leaders: as many ranks on
    every host, whether or not the hosts' boards are up (so the hosts agree
    even where a failed call left them up on some hosts only: the host's
    part takes its boards or messages, each host alike within).
    MESH_COLL_SMALL_COLUMNS=0 (job-wide) keeps the leaders' form, whose
    other ranks sleep while the leaders talk (under heavy load on 2 cores
    its tail was shorter: BENCHMARKS.md, issue 13, ninth session)."""
    return (topo.column is not None and nbytes <= board.CAPACITY
            and config_flag("MESH_COLL_SMALL_COLUMNS", True))


def _groups(topo: Topology, coll: str, root: int, large: bool,
            nbytes: int) -> list[tuple[Comm, int]]:
    """The sub-groups of ``coll``'s phases on this rank, in order, each with
    its place (what all_reduce, all_gather and broadcast below run)."""
    both = [(topo.local, FIRST)] if topo.local.size > 1 else []
    last = [(topo.local, LAST)] if topo.local.size > 1 else []
    across = [(topo.leaders, ACROSS)] if topo.leaders is not None else []
    reduces = coll in ("all_reduce", "reduce_scatter")
    if coll == "reduce_scatter" and _columns(topo, coll, large):
        assert topo.column is not None
        return both + [(topo.column, ACROSS)]
    if _columns(topo, coll, large):     # (one board round or three phases: the three's groups)
        assert topo.column is not None
        return both + [(topo.column, ACROSS)] + last
    if reduces and not large and small_columns(topo, nbytes):
        assert topo.column is not None
        return both + [(topo.column, ACROSS)]
    if coll == "all_gather" and topo.column is not None:
        return [(topo.column, ACROSS)] + last
    if coll != "broadcast":
        return both + across + last
    home = topo.host == next(h for h, ranks in enumerate(topo.hosts) if root in ranks)
    return (both if home else []) + across + ([] if home else last)


def form(topo: Topology, coll: str, large: bool, nbytes: int) -> str:
    """Which form a two-level ``coll`` takes (MESH_COLL_DEBUG's line), as
    the functions below choose it; ``large``: the leaders' (columns') large
    algorithm (all_reduce's ring, broadcast's chain)."""
    if coll == "reduce_scatter" and _columns(topo, coll, large):
        return "two levels, columns"
    if coll in ("all_reduce", "reduce_scatter"):
        head = "two levels" if coll == "all_reduce" else "two levels, all_reduce then a cut"
        if _columns(topo, "all_reduce", large):
            return f"{head}, columns, " + (("pipelined in one board round" if _pipelined()
                                            else "one board round") if _one_round(topo)
                                           else "three phases")
        if not large and small_columns(topo, nbytes):
            return f"{head}, small, columns"
        if not large and _small_round(topo, nbytes):
            return f"{head}, small, leaders in one board round"
        return f"{head}, leaders ({'ring' if large else 'recursive doubling'}), three phases"
    if coll == "all_gather":
        return "two levels, columns" if topo.column is not None else "two levels, leaders (ring)"
    return f"two levels, leaders ({'chain' if large else 'tree'})"


FIRST, ACROSS, LAST = range(3)
"""A phase's place in its call: the first on the host, the one across hosts,
the last on the host (``numbered``)."""


def numbered(sub: Comm, tag: int, place: int) -> Comm:
    """``sub``, its next collective (a phase of the call of group tag ``tag``,
    or its abandon) numbered from that call's: 3 x the call's number + the
    phase's ``place``. Every rank numbers the group's calls alike, whatever
    happened (a flat call where others made a two-level one, a call that
    failed on some ranks only, a phase some rank never made), so every
    rank's phase of a call meets its peers' on the same tag, never one of
    another call; a counter of the sub-group's own would not. (The numbers
    only grow: the board's rounds, the links' frames count on it.)"""
    sub.collective_channel().seq = -3 * tag + place - 1
    return sub


def settled(sub: Comm) -> bool:
    """Whether ``sub``'s same-host state (the memory probe, the boards) was
    set up by an earlier call (no message: the phases' bodies set it up on
    their first ask, every member alike); boards a peer forgot are not (this
    call sets them up again: a failure in it forgets them, as on a first)."""
    return board.kept(sub) or cma.probed(sub) is False


def unsettle(sub: Comm, was: bool, e: BaseException) -> None:
    """After this rank's phase on ``sub`` failed with ``e`` (``was``: whether
    ``sub`` was settled when it began): a phase that was setting the state
    up may have been cut short (an abort from another host comes at any
    moment) after some members had it and before others did; every member
    whose phase failed forgets it, so the next call sets it up again on
    every member. A member whose phase ended well cannot know that a peer's
    failed after its post (the abort came before it saw the others'): it
    keeps the boards, and its next call sets them up again with that peer,
    whose forgotten board says so (board.available). One that finds a peer
    setting them up again anyway (board.Stray) forgets them too. Otherwise
    the state stays: the layout of the next call does not depend on what
    any call did (numbered, small_columns)."""
    if not was or isinstance(e, board.Stray):
        board.forget(sub)
        shm_tiny.forget(sub)
        cma.forget(sub)


def refuse(g: Comm, tag: int, coll: str, root: Any, large: bool, nbytes: int,
           e: BaseException) -> None:
    """A call (group tag ``tag``) that would have run in two levels failed on
    this rank before it started (its own arguments): fail the phases its
    peers wait in."""
    topo = topology(g)
    if topo is None:
        return
    if not isinstance(root, (int, np.integer)) or not 0 <= root < g.size:
        root = 0
    reason = (f"rank {g.ranks[g.rank]}: {coll} on group {g.name} failed: "
              f"{type(e).__name__}: {e}")
    for sub, place in _groups(topo, coll, int(root), large, nbytes):
        abandon(numbered(sub, tag, place), reason, *abort_kind(g, e))


Phase = tuple[Comm, int, str, Callable[[Ctx], Any]]
"""A phase: its sub-group, its place (FIRST, ACROSS, LAST), name, body."""


def _run(ctx: Ctx, phases: list[Phase] | Callable[[], list[Phase]],
         greet: bool = True) -> None:
    """Run the phases in order, each a collective on its sub-group; on a
    failure, abandon the ones not made yet and raise (``phases`` may be
    their choice, made once the receives below are posted). Meanwhile a receive
    watches the call's own tag, where its members send nothing but one
    greeting: a rank that made a flat collective instead (a small broadcast
    where the others all-reduce) sends there, its fingerprint fails the
    receive and aborts the tag on every member, and each rank's phase then
    running is aborted with it (_follow), so its waits raise instead of
    waiting out the deadline. ``greet``: each rank also sends its
    fingerprint to its right neighbour there and takes its left one's
    before it returns, so two two-level calls whose phases never meet (a
    broadcast from another host where the others all-reduce: each waits in
    a phase the other never makes) are a mismatch too, not a timeout. (The
    small all_reduce over the columns does not greet: collectives.host.tiny
    takes the same tags without a Ctx.)"""
    n, me = ctx.g.size, ctx.g.rank
    hello = ctx.irecv((me - 1) % n) if greet else None     # (before the watch: it takes it)
    sent = ctx.isend(None, (me + 1) % n) if greet else None
    watch = ctx.watch()
    try:
        _phases(ctx, phases() if callable(phases) else phases)
        if hello is not None and sent is not None:
            hello.wait()
            sent.wait()
    finally:
        ctx.ch.unfollow(ctx.tag)
        if not watch.done():
            caught(watch, 0)        # withdrawn


def _phases(ctx: Ctx, phases: list[Phase]) -> None:
    for i, (sub, place, what, body) in enumerate(phases):
        fp = dict(ctx.fp, phase=what)

        def prepare(t: Tuning, fp: dict = fp, body: Callable[[Ctx], Any] = body) -> tuple:
            return fp, body
        made = False
        was = settled(sub)
        try:
            _follow(ctx, sub, place)
            made = True
            start(sub, f"{ctx.name} ({what})", prepare, False, ctx.left())
        except BaseException as e:
            if made:        # (first: a peer told of it by the abandons sees it done)
                unsettle(sub, was, e)
            err = late_named(ctx.g, ctx.tag, e)
            reason = f"{ctx.where()}: {what} failed: {err}"
            for later, at, _, _ in phases[i + (1 if made else 0):]:
                abandon(numbered(later, ctx.tag, at), reason, *abort_kind(ctx.g, err))
            if err is not e:
                raise err from e
            raise


_LATE = "has not called it"


def late_named(g: Comm, tag: int, e: BaseException) -> BaseException:
    """A phase of this rank's call ``tag`` on ``g`` timed out (``e``): the
    same error naming the members of ``g`` that, as their heartbeats last
    said, are in none of the call's phases nor its own tag: the ranks that
    have not called it. The phase itself may know them only through a chain
    (a column peer that waits on its host for one: its status quoted in
    ``e``), where the flat ring's wait names its late neighbour. Else ``e``
    itself. (The long way's phases, and collectives.host.tiny's short way.)"""
    if not isinstance(e, MeshTimeoutError) or _LATE in str(e):
        return e
    n = -tag        # (a phase's sub-group, whichever: "<group>/host1", numbered)
    marks = [f" #{n} on group {g.name}:"] + [
        f" #{3 * n + place} on group {g.name}/" for place in (FIRST, ACROSS, LAST)]
    ch = g.collective_channel()
    late = []
    for p in range(g.size):
        said = ch.said(p) if p != g.rank else None
        if said is not None and not any(m in said[0] for m in marks):
            late.append(f"world rank {g.ranks[p]} {_LATE} (it said {said[1]:.1f}s ago: "
                        f"{said[0]})")
    return MeshTimeoutError(f"{e}; {'; '.join(late)}") if late else e


def _follow(ctx: Ctx, sub: Comm, place: int) -> None:
    """Before a phase on ``sub`` at ``place`` (numbered so): an abort of the
    call's own tag (a rank that made a flat collective there instead) aborts
    the phase here too, so its waits raise it; raise it now if it came
    already."""
    ctx.ch.follow(ctx.tag, sub, -(numbered(sub, ctx.tag, place).collective_channel().seq + 1))
    if ctx.ch.aborted(ctx.tag, "") is not None:      # (the text made only when it is)
        raise ctx.ch.aborted(ctx.tag, ctx.where().split(": ", 1)[1])  # type: ignore[misc]


Body = Callable[[Ctx], Any]


def _nested(ctx: Ctx, topo: Topology, what: str, inner: Comm | None, inner_what: str,
            body_of: Callable[[Callable[[Body], None]], Body], three: list[Phase]) -> None:
    """One phase on the host (the first there) whose body
    (``body_of(across)``) runs the phase across hosts on ``inner`` inside it
    by calling ``across(its body)`` (a rank without
    ``inner`` does not); if the outer one fails before that, ``inner`` is
    abandoned, so its peers raise too. Where the host's boards are not
    kept by all (_agreed_one_round), ``three`` instead: the same call in
    phases one after the other (its groups, at its places, include the
    one round's; a failure of the choice abandons them)."""
    made, one = [False], [False]

    def across(body: Body) -> None:
        assert inner is not None
        _follow(ctx, inner, ACROSS)
        made[0] = True
        fp = dict(ctx.fp, phase=inner_what)
        start(inner, f"{ctx.name} ({inner_what})", lambda t: (fp, body), False, ctx.left())

    def choose() -> list[Phase]:
        try:
            one[0] = _agreed_one_round(ctx, topo)
        except BaseException as e:
            err = late_named(ctx.g, ctx.tag, e)
            reason = f"{ctx.where()}: {what} failed: {err}"
            for sub, at, _, _ in three:
                abandon(numbered(sub, ctx.tag, at), reason, *abort_kind(ctx.g, err))
            if err is not e:
                raise err from e
            raise
        if not one[0]:
            return three
        stats["one_round"] += 1
        return [(topo.local, FIRST, what, body_of(across))]
    try:
        _run(ctx, choose)
    except BaseException as e:
        if one[0] and inner is not None and not made[0]:
            abandon(numbered(inner, ctx.tag, ACROSS), f"{ctx.where()}: {what} failed: {e}",
                    *abort_kind(ctx.g, e))
        raise


def _host_reduce(buf: np.ndarray, op: ReduceOp, large: bool) -> Callable[[Ctx], None]:
    def body(c: Ctx) -> None:
        if board.available(c):
            local.reduce(c, buf, op, 0)
        else:
            agreed(lambda c2: (reduce_chain if large else reduce_tree)(c2, buf, op, 0))(c)
    return body


def _host_broadcast(buf: np.ndarray, root: int, large: bool) -> Callable[[Ctx], None]:
    def body(c: Ctx) -> None:
        if board.available(c):
            local.broadcast(c, buf, root)
        else:
            agreed(lambda c2: (broadcast_chain if large else broadcast_tree)(c2, buf, root))(c)
    return body


def all_reduce(ctx: Ctx, topo: Topology, buf: np.ndarray, op: ReduceOp, alg: str) -> None:
    """Reduce the flat ``buf`` over the group in place (``op.finish`` left to
    the caller); ``alg`` ("rd" / "ring") is the leaders' algorithm."""
    large = alg != "rd"
    if _columns(topo, "all_reduce", large):
        _all_reduce_columns(ctx, topo, buf, op)
        return
    if not large and small_columns(topo, buf.nbytes):
        _all_reduce_small_columns(ctx, topo, buf, op)
        return
    phases: list[Phase] = []
    if topo.local.size > 1:
        phases.append((topo.local, FIRST, "host reduce", _host_reduce(buf, op, large)))
    if topo.leaders is not None:
        def across(c: Ctx) -> None:
            if large:
                ring(c, buf, op, 2 * (c.g.size - 1), c.g.size - 1)
            else:
                rd_across(c, buf, op)
        phases.append((topo.leaders, ACROSS, "leaders all_reduce", across))
    if topo.local.size > 1:
        phases.append((topo.local, LAST, "host broadcast", _host_broadcast(buf, 0, large)))
    if not large and buf.nbytes <= board.CAPACITY and topo.local.size > 1 \
            and board.ready(topo.local):
        _all_reduce_small(ctx, topo, buf, op, phases)
        return
    _run(ctx, phases)


def rd_across(c: Ctx, buf: np.ndarray, op: ReduceOp) -> None:
    """The leaders' recursive doubling of a small all_reduce, over their kept
    TCP links (collectives.host.link) where they have them."""
    all_reduce_rd(link.via(c, rd_peers(c.g.rank, c.g.size), buf.nbytes), buf, op)


SMALL_HOST, SMALL_COLUMN = "host all_reduce", "column all_reduce"
"""The phases of a small all_reduce over the columns (their fingerprints'
``phase``, their names), which collectives.host.tiny repeats."""


def _all_reduce_small_columns(ctx: Ctx, topo: Topology, buf: np.ndarray, op: ReduceOp) -> None:
    """As many ranks on every host: every rank of the host reduces every
    post of the host (one board round, no leader, no one asleep for a
    result; where the host's boards are not up, the first call sets them
    up; where they cannot be, recursive doubling over messages), then each
    rank all-reduces the host's sum with its counterparts on the other hosts
    over its column's kept links (the columns at once; each combines the
    hosts' sums in the same order, so every rank ends with the same bits).
    Its later blocking calls take the short way (collectives.host.tiny)."""
    stats["small_columns"] += 1
    column = topo.column
    assert column is not None

    def host(c: Ctx) -> None:
        if board.available(c, buf.nbytes):
            local.all_reduce_small(c, buf, op)
        else:
            all_reduce_rd(c, buf, op)
    _run(ctx, [(topo.local, FIRST, SMALL_HOST, host),
               (column, ACROSS, SMALL_COLUMN, lambda c: rd_across(c, buf, op))], greet=False)


def _all_reduce_small(ctx: Ctx, topo: Topology, buf: np.ndarray, op: ReduceOp,
                      three: list[Phase]) -> None:
    """One board round on the host: the others post their ``buf``, the
    leader reduces them in rank order, all-reduces the host's sum with the
    other leaders (recursive doubling, nested), and publishes the result in
    its board; the others sleep (not spin: the leaders need the cores)
    until it is there, and copy it. Where the host's boards are not kept by
    all, ``three`` (_nested)."""
    def body_of(across: Callable[[Body], None]) -> Body:
        def body(lc: Ctx) -> None:
            lead = lc.g.rank == 0
            with Round(lc) as r:
                if lead:
                    outs: list[np.ndarray | None] = [None] + [np.empty_like(buf)
                                                              for _ in r.peers]
                    r.post()
                    r.gather(outs)
                    for got in outs[1:]:
                        assert got is not None
                        op.combine(buf, got)
                    if topo.leaders is not None:
                        across(lambda c: rd_across(c, buf, op))
                    r.publish(buf, 1)
                else:
                    r.post(payload=buf)
                    r.wait_stage([0], 1, patient=True)
                    r.gather()      # (every post is there once the leader has published)
                    r.payload_into(0, buf)
        return body
    _nested(ctx, topo, "host reduce, leaders all_reduce, host broadcast",
            topo.leaders, "leaders all_reduce", body_of, three)


def _all_reduce_columns(ctx: Ctx, topo: Topology, buf: np.ndarray, op: ReduceOp) -> None:
    """As many ranks on every host: local rank i reduces chunk i over its
    host, all-reduces it with the local ranks i of the other hosts (every
    column at once, so every rank's link to the others carries a share), and
    the host gathers the chunks back: in one board round once the host's
    boards are up (collectives.host.columns; pipelined segment by segment
    with MESH_COLL_PIPELINE=1), else in three phases."""
    k, i = topo.local.size, topo.hosts[topo.host].index(ctx.g.rank)
    bounds = ring_chunks(buf.size, k)
    lo, hi = bounds[i]
    item = buf.itemsize
    column = topo.column
    assert column is not None

    def scatter(c: Ctx) -> None:
        if board.available(c):
            local.reduce_scatter(c, buf, buf[lo:hi], op)
        else:
            ring(c, buf, op, k - 1, k - 1, shift=-1)

    def across(c: Ctx) -> None:
        ring(c, buf[lo:hi], op, 2 * (c.g.size - 1), c.g.size - 1)

    def gather(c: Ctx) -> None:
        if not board.available(c):
            ring(c, buf, None, k - 1, 0)
            return
        with Round(c) as r:
            r.post(addr=buf.ctypes.data)
            addrs = r.gather()
            for p in r.peers:
                a, b = bounds[p]
                if b > a:
                    peer_read(c, p, addrs[p] + a * item, buf[a:b])
            r.stage(2)
            r.wait_stage(r.peers, 2)
    phases: list[Phase] = []
    if k > 1:
        phases.append((topo.local, FIRST, "host reduce_scatter", scatter))
    phases.append((column, ACROSS, "column all_reduce", across))
    if k > 1:
        phases.append((topo.local, LAST, "host all_gather", gather))
    if k > 1 and board.ready(topo.local):
        _nested(ctx, topo, "host reduce_scatter, column all_reduce, host all_gather",
                column, "column all_reduce",
                lambda across: columns.host_body(buf, op, i, k, len(topo.hosts), topo.host,
                                                 across, _pipelined()), phases)
        return
    _run(ctx, phases)


def _spans(sizes: list[int], at: int = 0) -> list[tuple[int, int]]:
    """[lo, hi) of parts of ``sizes`` laid one after the other from ``at``."""
    spans = []
    for k in sizes:
        spans.append((at, at + k))
        at += k
    return spans


def reduce_scatter(ctx: Ctx, topo: Topology, parts: list[np.ndarray], mine: np.ndarray,
                   op: ReduceOp, alg: str) -> None:
    """The flat ``mine`` = part ``rank`` reduced over the group (``op.finish``
    left to the caller): ``parts`` are this rank's operand, cut into the
    group's n flat parts in rank order (even: reduce_scatter's rows; of any
    sizes, empty ones too, alike on every rank: reduce_scatter_v's); ``alg``
    the all_reduce's ("rd" / "ring"). Large, as many ranks on every host:
    each part's partial sums cross to its own host once, over the columns
    (the all_reduce, whose result this rank would then cut, sent every part
    to every host: twice the bytes across at 2 hosts); the sums take the
    host's order (the board's: from local rank i + 1 around, or the host's
    ring), then the column ring's over the hosts. Else that all_reduce, of
    the parts joined. Even parts and uneven ones of the same sizes take
    the same steps: the same bits."""
    column = topo.column
    sizes = [p.size for p in parts]
    dtype = parts[ctx.g.rank].dtype
    if not _columns(topo, "reduce_scatter", alg != "rd"):
        work = np.concatenate(parts)
        all_reduce(ctx, topo, work, op, alg)
        lo, hi = _spans(sizes)[ctx.g.rank]
        mine[...] = work[lo:hi]
        return
    assert column is not None
    k, i = topo.local.size, topo.hosts[topo.host].index(ctx.g.rank)
    across_bounds = [_spans([sizes[h[p]] for h in topo.hosts]) for p in range(k)]
    columns_at = _spans([b[-1][1] for b in across_bounds])    # column p's, in by_column
    total, widest = sum(sizes), max(hi - lo for lo, hi in columns_at)
    warm = scratch.take(dtype, total, 1) + scratch.take(dtype, widest, 1)
    by_column = warm[0].view(dtype)     # (the dtype's metadata too: bfloat16's mark)
    for p, (at, _) in enumerate(columns_at):     # local rank p's column's parts, in host order
        for ranks, (lo, hi) in zip(topo.hosts, across_bounds[p]):
            by_column[at + lo:at + hi] = parts[ranks[p]]
    lo, hi = columns_at[i]
    col = [by_column[lo:hi]]        # the host's sums of this column's parts (the ring's: in place)

    def host(c: Ctx) -> None:
        if board.available(c):
            col[0] = warm[1].view(dtype)[:hi - lo]
            local.reduce_scatter(c, by_column, col[0], op, columns_at)
        else:
            ring(c, by_column, op, k - 1, k - 1, shift=-1, bounds=columns_at)

    def across(c: Ctx) -> None:
        ring(c, col[0], op, c.g.size - 1, c.g.size - 1, shift=-1, bounds=across_bounds[i])
    phases: list[Phase] = [(topo.local, FIRST, "host reduce_scatter", host)] if k > 1 else []
    phases.append((column, ACROSS, "column reduce_scatter", across))
    _run(ctx, phases)
    a, b = across_bounds[i][topo.host]
    mine[...] = col[0][a:b]
    scratch.give(warm[:1])      # (warm memory: not after a failure, when a peer may still read)
    scratch.give(warm[1:])


def all_gather(ctx: Ctx, topo: Topology, arr: np.ndarray, out: np.ndarray, large: bool,
               bounds: list[tuple[int, int]] | None = None) -> None:
    """The flat ``out`` holds every rank's flat ``arr``, rank p's at
    ``bounds[p]`` ([lo, hi), in rank order, alike on every rank:
    all_gather_v's, of any sizes; None: all_gather's, arr.size each): over
    the columns where every host holds as many ranks, else through the
    leaders (host gather | leaders all_gather of the hosts' blocks | host
    broadcast)."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    if bounds is None:
        bounds = _spans([flat.size] * ctx.g.size)
    if topo.column is not None:
        _all_gather_columns(ctx, topo, flat, out, bounds)
        return
    sizes = [hi - lo for lo, hi in bounds]
    mine = topo.hosts[topo.host]
    at = _spans([sum(sizes[p] for p in ranks) for ranks in topo.hosts])    # the hosts' blocks
    blocks = np.empty(at[-1][1], out.dtype)
    home = blocks[at[topo.host][0]:at[topo.host][1]]
    phases: list[Phase] = []
    if topo.local.size > 1:
        def gather(c: Ctx) -> None:
            dst = [home[lo:hi] for lo, hi in _spans([sizes[p] for p in mine])] \
                if c.g.rank == 0 else None
            if board.available(c):
                local.gather(c, flat, dst, 0, max(sizes[p] for p in mine) * flat.itemsize)
            else:
                agreed(lambda c2: gather_direct(c2, flat, dst, 0))(c)
        phases.append((topo.local, FIRST, "host gather", gather))
    else:
        home[...] = flat
    if topo.leaders is not None:
        def across(c: Ctx) -> None:
            ring(c, blocks, None, c.g.size - 1, 0, bounds=at)
            for ranks, (at0, _) in zip(topo.hosts, at):
                for p, (lo, hi) in zip(ranks, _spans([sizes[p] for p in ranks], at0)):
                    out[bounds[p][0]:bounds[p][1]] = blocks[lo:hi]
        phases.append((topo.leaders, ACROSS, "leaders all_gather", across))
    if topo.local.size > 1:
        phases.append((topo.local, LAST, "host broadcast", _host_broadcast(out, 0, large)))
    _run(ctx, phases)


def _all_gather_columns(ctx: Ctx, topo: Topology, flat: np.ndarray, out: np.ndarray,
                        bounds: list[tuple[int, int]]) -> None:
    """As many ranks on every host: local rank i all-gathers its part with
    the local ranks i of the other hosts (a ring per column, every column
    at once, so each part crosses to each other host once, on its own
    rank's link), then the host all-gathers the columns (each rank reads its
    host peers' columns across processes). Through the leaders instead,
    every part crossed on the leaders' one link and the host then broadcast
    the whole result: at 2 hosts x 2 ranks and 150 Mbit/s (a token bucket
    one flow does not fill), 16 MiB a rank took 2.9 s across (one stream)
    and 0.8 s on the host, against 1.8 s for the bytes (BENCHMARKS.md,
    issue 13, thirty-ninth session)."""
    column = topo.column
    assert column is not None
    k, i = topo.local.size, topo.hosts[topo.host].index(ctx.g.rank)
    at = [[h[p] for h in topo.hosts] for p in range(k)]    # local rank p's column's ranks
    spans = [_spans([bounds[q][1] - bounds[q][0] for q in ranks]) for ranks in at]
    warm = scratch.take(out.dtype, max(s[-1][1] for s in spans), 1)
    mine = warm[0].view(out.dtype)[:spans[i][-1][1]]    # column i's parts, in host order
    lo, hi = spans[i][topo.host]
    mine[lo:hi] = flat

    def put(p: int, col: np.ndarray) -> None:
        for q, (a, b) in zip(at[p], spans[p]):
            out[bounds[q][0]:bounds[q][1]] = col[a:b]

    def across(c: Ctx) -> None:
        ring(c, mine, None, c.g.size - 1, 0, bounds=spans[i])
        put(i, mine)

    def gather(c: Ctx) -> None:
        if not board.available(c):
            cols = _spans([s[-1][1] for s in spans])
            every = np.empty(cols[-1][1], out.dtype)
            every[cols[i][0]:cols[i][1]] = mine
            ring(c, every, None, k - 1, 0, bounds=cols)
            for p, (a, b) in enumerate(cols):
                put(p, every[a:b])
            return
        item = out.itemsize
        with Round(c) as r:
            r.post(addr=mine.ctypes.data)
            addrs = r.gather()
            for p in r.peers:
                for q, (a, b) in zip(at[p], spans[p]):
                    if b > a:
                        peer_read(c, p, addrs[p] + a * item, out[bounds[q][0]:bounds[q][1]])
            r.stage(2)
            r.wait_stage(r.peers, 2)
    phases: list[Phase] = [(column, ACROSS, "column all_gather", across)]
    if k > 1:
        phases.append((topo.local, LAST, "host all_gather", gather))
    _run(ctx, phases)
    scratch.give(warm)


def broadcast(ctx: Ctx, topo: Topology, buf: np.ndarray, root: int, large: bool) -> None:
    """The root's flat ``buf`` into ``buf`` on every rank."""
    home = next(h for h, ranks in enumerate(topo.hosts) if root in ranks)
    phases: list[Phase] = []
    if topo.host == home and topo.local.size > 1:
        phases.append((topo.local, FIRST, "host broadcast",
                       _host_broadcast(buf, topo.hosts[home].index(root), large)))
    if topo.leaders is not None:
        def across(c: Ctx) -> None:
            agreed(lambda c2: (broadcast_chain if large else broadcast_tree)(c2, buf, home))(c)
        phases.append((topo.leaders, ACROSS, "leaders broadcast", across))
    if topo.host != home and topo.local.size > 1:
        phases.append((topo.local, LAST, "host broadcast", _host_broadcast(buf, 0, large)))
    _run(ctx, phases)
