"""The inbox: what one rank expects and what has come in, without sockets.

Posted receives and probes meet arriving messages here (mesh.match holds the
tables); a message nobody asked for waits. Aborted tags fail what is posted
on them and whatever is posted later; a lost peer fails the receives that
name it and, when it died, every receive from any rank and every
collective's (negative tag) in its groups, and the sends queued for it.

What leaves the inbox goes through two callables given by the transport:
``control(rank, header)`` sends a control message (credit grants, aborts),
``nudge()`` wakes a thread blocked reading the socket after a request was
completed elsewhere. Thread-safe: one lock guards the tables.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any, Callable

import numpy as np

from . import tensors, wire
from .errors import AbortKind, LostPeerError, MeshError, MismatchError, OutMismatchError
from .match import ANY, MATCHED, POSTED, Arrived, Matcher, Pending, Probe, Watched, describe
from .payload import fmt_fp, out_problem
from .peer import ALIVE, CLOSED, DEAD, MSG_COST, Peer, named

__all__ = ["Inbox", "abort_error", "RMA_TAGS"]
RMA_TAGS = 1 << 62
"""A message of a group with a handler (an RMA window's, mesh.window) whose
tag is at least this is a one-sided request: handed to the handler as it
comes, never matched to a receive (the window's replies and markers, on
lower tags, are)."""
_KEEP_ABORTED = 4096
"""Aborted collectives whose records (what a late arrival at the call
raises, and the mark that drops its late messages) are kept."""
_KEEP_FORGOTTEN = 4096
"""Dropped groups whose late messages are dropped (older ones' would wait
unmatched)."""

_log = logging.getLogger("mesh.transport")


def _tell_launcher(me: int, rank: int, why: str) -> None:
    """Under meshrun, a lost peer of another node is left in the run folder
    for this node's meshrun, which stops the job here as for a failure of
    its own: ranks busy outside mesh calls (computing, sleeping) ran on
    until their next call, their node's meshrun never told, when another
    node failed, was stopped or died."""
    folder, node = os.environ.get("MESH_RUNTIME_DIR"), os.environ.get("MESH_NODE_RANK", "")
    per_node = os.environ.get("LOCAL_WORLD_SIZE", "")
    if (not folder or not node.isdigit() or not per_node.isdigit() or int(per_node) < 1
            or rank // int(per_node) == int(node)):
        return          # (not meshrun's rank, or a peer of this node: meshrun sees it end)
    from .env import by_mesh
    if not by_mesh():   # (a launcher started inside a meshrun rank: not meshrun's)
        return
    final = os.path.join(folder, f"lost.{me}")
    if os.path.exists(final):
        return          # (the first loss it saw: the one meshrun names)
    part = os.path.join(folder, f".lost.{me}.{rank}")
    try:        # (whole or not at all: meshrun read an empty file it had just made)
        with open(part, "w") as f:
            f.write(f"rank {rank} of node {rank // int(per_node)} was lost (rank {me} here: "
                    f"{why})")
        os.replace(part, final)
    except OSError:
        pass


def _nothing() -> None:
    pass


def _no_ack(src: int, ident: int, word: int = 0) -> None:
    pass


class Inbox:
    """Matching, aborts and lost peers for the rank ``rank`` of ``peers``
    (indexed by world rank; this rank's own entry has no socket)."""

    def __init__(self, rank: int, peers: list[Peer], groups: dict[int, tuple[str, list[int]]],
                 control: Callable[[Peer, bytes], None], nudge: Callable[[], None]) -> None:
        self.rank, self.peers, self.groups = rank, peers, groups
        self.lock = threading.Lock()
        self.matcher = Matcher()
        self.aborted: dict[tuple[int, int], tuple[AbortKind, str, int]] = {}
        self.dead: set[int] = set()
        # the first peer this rank lost (died, failed, or left cleanly after losing one:
        # that one; or a collective of its aborted for its loss), which its own clean
        # goodbye carries; -1: none
        self.first_lost = -1
        self.left: set[int] = set()     # peers that closed their mesh (said goodbye cleanly)
        # Per peer, the credit (bytes and MSG_COST each) of its messages that wait
        # unmatched and were not granted back yet. A sender whose window they fill
        # queues every later message behind them, the one a receive waits for too:
        # once they make a grant step and such a receive or probe is posted, their
        # credit goes back at once (``_release``), so that waiting for one message
        # while others of that peer wait unreceived (MPI allows any order) cannot
        # deadlock; the window then bounds what waits only while nothing is awaited.
        self.held = [0] * len(peers)
        self.closed = False     # this rank has said goodbye (its close): nothing new works
        # (group, tag) -> the (group, tag)s aborted here with it (CollectiveChannel.follow)
        self.follows: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self.forgotten: dict[int, None] = {}   # the latest groups dropped (forget)
        self._control, self._nudge = control, nudge
        self.unpark: Callable[[], None] = _nothing    # a receive stays posted (mesh.progress)
        # tells a synchronous send's sender (world rank, its id) that a receive took it,
        # or (a mesh.wire SYNC_ word) what else became of it
        self.ack: Callable[..., None] = _no_ack
        # per group id, the target side of an RMA window (mesh.window): its requests
        # (tags >= RMA_TAGS) go to its ``arrive``, applied by the thread that reads
        self.handlers: dict[int, Any] = {}

    # ---- posting -------------------------------------------------------------

    def post(self, group: int, src: int, tag: int, out: Any, fp: Any, desc: Any,
             probe: bool = False, waited: bool = False, watch: bool = False) -> Pending:
        """Post a receive: matched with a waiting message at once, or queued.
        A waiting message that does not fit ``out`` fails it and stays queued.
        A Probe when ``probe``: complete, ``got`` set, once a message it
        matches waits in the unexpected queue, which keeps the message.
        A torch tensor ``out`` is received into through a numpy (or CuPy)
        view of its memory; the tensor is the request's ``target``, which
        the transport's ``wait`` returns. One that stays posted wakes a
        parked progress thread (mesh.progress), unless ``waited``: its
        caller waits for it at once, reading for itself. ``watch``: one
        posted only to catch an abort (a Watched)."""
        target = None
        if out is not None and type(out) is not np.ndarray and tensors.is_tensor(out):
            target, out = out, tensors.out_view(out, f"rank {self.rank}: {describe(desc)}")
        req = Probe(group, src, tag, out, fp, desc) if probe else \
            Watched(group, src, tag, out, fp, desc) if watch else \
            Pending(group, src, tag, out, fp, desc, target)
        msg = gone = None
        misfit = ""
        release: list[tuple[int, int]] = []
        with self.lock:
            aborted = self.aborted.get((group, tag)) if self.aborted else None
            if aborted:
                pass
            elif out is None:
                msg = self.matcher.post(req, not probe)
            else:
                msg = self.matcher.post(req, False)
                if msg is None or (msg.fp == fp and (misfit := out_problem(out, msg.value))):
                    pass
                else:
                    self.matcher.take(group, msg)
                    req.state = MATCHED
            if msg is not None and not (probe or misfit or msg.granted) and msg.src != self.rank:
                self.held[msg.src] -= msg.nbytes + MSG_COST    # (taken: consumed below)
            if msg is None and not aborted:
                gone = self._cannot_come(req)
                if gone is not None:
                    self.matcher.cancel(req)
                elif src != ANY:
                    if self.held[src]:
                        release = [(src, self._release(src))]
                elif any(self.held):
                    release = [(r, self._release(r)) for r, n in enumerate(self.held) if n]
        if msg is not None:
            if misfit:
                req.fail(self._misfit(req, msg.src, msg.tag, misfit))
            elif probe:
                req.got = msg.got
                req.complete(None)
            else:
                self._finish(req, msg.src, msg.tag, msg.value, msg.nbytes, msg.fp, msg.device,
                             msg.granted, msg.sync)
        elif aborted:
            req.fail(abort_error(aborted, f"rank {self.rank}: {req.described(self.peers)} "
                                          f"aborted: {aborted[1]}"))
        elif gone is not None:
            req.fail(gone)
        elif not waited:     # (a receive its caller waits for at once: read by that caller)
            self.unpark()
        for r, n in release:
            self._grant(r, n)
        return req

    def _failed(self, src: int) -> bool:
        """Whether a poll (iprobe, improbe) finding nothing raises: its
        source failed (died, or left on an error); from ANY, a rank did.
        A quick look, under the lock. Not a peer that closed its mesh
        cleanly (a look for what it left finds nothing), nor once this
        rank's own mesh is closed (a poll then reads nothing more)."""
        if self.closed:
            return False
        return self.peers[src].state == DEAD if src != ANY else bool(self.dead)

    def _cannot_come(self, req: Pending, failed: bool = False) -> LostPeerError | None:
        """The error of receive or probe ``req``, which no waiting message
        matched, where none can come any more: its source lost; from
        ``ANY``, a member of its group lost, or every other member gone
        (the lock held). None while one may. ``failed``: a poll's, only
        where a rank failed (``_failed``)."""
        group, src, tag = req.group, req.src, req.tag
        lost = src if src != ANY and self.peers[src].state not in (
            (ALIVE, CLOSED) if failed else (ALIVE,)) else \
            self.dead_member(group) if self.dead and (src == ANY or tag < 0) else None
        if lost is not None:
            return self.gone(self.peers[lost], req.described(self.peers), group,
                             self._unmatched(req) if lost == src else "")
        if not failed and src == ANY and self.left and tag >= 0 and self.deserted(group):
            return self.deserted_error(req)
        return None

    def iprobe(self, group: int, src: int, tag: int,
               desc: Callable[[], Any] | None = None) -> tuple | None:
        """``got`` of the message a receive posted now would take, if any.
        None: the credit of what waits unmatched from ``src`` (from any
        rank: ``ANY``) goes back as for a posted probe (``held``): a loop
        polling iprobe waits as a probe does, and never saw a message
        queued behind a window full of others. ``desc`` (the call's
        description, made when needed): where none can come any more (its
        source failed, or from ANY a rank of ``group``: ``_failed``),
        LostPeerError, as a probe raises (it gave None for ever: a
        coordinator polling for its workers' word never learnt that one had
        died)."""
        release: list[tuple[int, int]] = []
        with self.lock:
            msg = self.matcher.waiting(group, src, tag)
            if msg is None and desc is not None and self._failed(src):
                gone = self._cannot_come(Probe(group, src, tag, None, None, desc()), True)
                if gone is not None:
                    raise gone
            if msg is None and any(self.held):
                release = [(r, self._release(r, True)) for r in
                           ((src,) if src != ANY else range(len(self.held))) if self.held[r]]
        for r, n in release:
            self._grant(r, n)
        return None if msg is None else msg.got

    def take_waiting(self, group: int, src: int, tag: int, desc: Any,
                     lost: bool = False) -> Pending | None:
        """A receive without ``out=`` completed with the message one posted
        now would take, which leaves the queue; None where none waits, and
        nothing is posted (mesh.mprobe's improbe). Credit goes back as for
        ``iprobe``, and as for a receive that takes a waiting message.
        ``lost``: where its source failed, LostPeerError (iprobe's)."""
        release: list[tuple[int, int]] = []
        with self.lock:
            msg = self.matcher.waiting(group, src, tag)
            if msg is not None:
                self.matcher.take(group, msg)
                if not msg.granted and msg.src != self.rank:
                    self.held[msg.src] -= msg.nbytes + MSG_COST    # (consumed below)
            elif lost and self._failed(src) and \
                    (gone := self._cannot_come(Probe(group, src, tag, None, None, desc), True)):
                raise gone
            elif any(self.held):
                release = [(r, self._release(r, True)) for r in
                           ((src,) if src != ANY else range(len(self.held))) if self.held[r]]
        for r, n in release:
            self._grant(r, n)
        if msg is None:
            return None
        req = Pending(group, src, tag, None, None, desc)
        req.state = MATCHED
        self._finish(req, msg.src, msg.tag, msg.value, msg.nbytes, msg.fp, msg.device,
                     msg.granted, msg.sync)
        return req

    def hand(self, req: Pending, src: int, tag: int, value: Any, nbytes: int,
             on_device: int) -> None:
        """Complete ``req`` with a message received already, its credit given
        back then, that fits ``req.out`` (a matched probe's, mesh.mprobe)."""
        self._finish(req, src, tag, value, nbytes, None, on_device, True)

    def cancel(self, req: Pending) -> bool:
        """Withdraw ``req`` if no message has matched it (Request.cancel). The
        error is in place before the request reads as complete, so a thread
        already waiting on it raises instead of returning None."""
        with self.lock:
            # (the error goes in only once it is withdrawn: one taken out to fail
            # elsewhere, a lost peer's or a close's, reads POSTED until it fails, and
            # putting back None over that error made its wait return None)
            if req.state != POSTED or not self.matcher.cancel(
                    req, MeshError(f"rank {self.rank}: {req.described(self.peers)} was cancelled")):
                return False
        req.event.set()
        self._nudge()
        return True

    def withdraw(self, req: Pending) -> bool:
        """Take a timed-out receive out of the tables; False once matched."""
        with self.lock:
            return self.matcher.cancel(req)

    # ---- arrivals ------------------------------------------------------------

    def claim(self, group: int, src: int, tag: int, nbytes: int = -1) -> Pending | None:
        """The posted receive a message arriving now goes to, taken out (None:
        none is posted, or the tag was aborted). A window's put of ``nbytes``
        is claimed by the window: its bytes go straight into place."""
        if tag >= RMA_TAGS and self.handlers:
            handler = self.handlers.get(group)
            if handler is not None:
                return handler.claim(src, tag, nbytes)
        with self.lock:
            if self.aborted and (group, tag) in self.aborted:
                return None
            return self.matcher.take_posted(group, src, tag)

    def drops(self, group: int, tag: int) -> bool:
        """Whether a message of ``group`` and ``tag`` that no receive claimed
        is dropped on arrival (its tag aborted, its group forgotten), as
        ``arrive`` drops it: known before its bytes are read."""
        with self.lock:
            return (group, tag) in self.aborted or group in self.forgotten

    def arrive(self, src: int, group: int, tag: int, value: Any, nbytes: int, fp: Any,
               on_device: int = 0, sync: int = -1) -> None:
        """Deliver a fully received message that no posted receive had claimed:
        to the first posted receive it fits (those it does not fit fail), else
        to the unexpected queue, waking the probes it matches. ``sync``: a
        synchronous send's id (mesh.wire's y), answered once a receive takes it.
        A window's request goes to its handler instead (``handlers``)."""
        if tag >= RMA_TAGS and self.handlers:
            handler = self.handlers.get(group)
            if handler is not None:
                handler.arrive(src, tag, value)
                self.consumed(src, nbytes)
                return
        while True:
            with self.lock:
                if (group, tag) in self.aborted or self.forgotten and group in self.forgotten:
                    req = None
                else:
                    req = self.matcher.take_posted(group, src, tag)
                    if req is None:
                        probes = self.matcher.add_unexpected(
                            group, tag, Arrived(src, tag, value, nbytes, fp, on_device, sync))
                        release = 0
                        if src != self.rank:
                            self.held[src] += nbytes + MSG_COST
                            release = self._release(src)
                        break
            if req is None:
                self.consumed(src, nbytes)
                if sync >= 0:   # its sender told (a user tag's: dropped with its group)
                    self.ack(src, sync, wire.SYNC_GROUP)
                return
            if self.complete(req, src, tag, value, nbytes, fp, on_device, sync):
                return
        self._grant(src, release)
        for p in probes:
            p.complete(None)

    def complete(self, req: Pending, src: int, tag: int, value: Any, nbytes: int, fp: Any,
                 on_device: int = 0, sync: int = -1) -> bool:
        """Finish a matched receive with a value that is not yet in ``req.out``.
        False when the value does not fit ``req.out``: ``req`` fails and the
        message is still the caller's to deliver (see arrive)."""
        out = req.out
        if out is not None and fp == req.fp:
            problem = out_problem(out, value)
            if problem:
                req.fail(self._misfit(req, src, tag, problem))
                return False
        self._finish(req, src, tag, value, nbytes, fp, on_device, False, sync)
        return True

    def _finish(self, req: Pending, src: int, tag: int, value: Any, nbytes: int, fp: Any,
                on_device: int, granted: bool = False, sync: int = -1) -> None:
        """complete once the value is known to fit ``req.out`` (``granted``:
        its credit went back already, see ``held``); a synchronous send's
        (``sync``: its id) sender is told its message was taken."""
        if not granted:
            self.consumed(src, nbytes)
        if fp != req.fp:
            return self._mismatch(req, src, fp)
        if sync >= 0:
            self.ack(src, sync)
        req.device = on_device
        out = req.out
        if type(value) is np.ndarray:
            req.got = (src, tag, nbytes, value.dtype, value.shape)
            if out is not None and isinstance(out, np.ndarray):
                np.copyto(out, value.reshape(out.shape), casting="no")
                value = out
        else:
            req.got = (src, tag, nbytes, None, None)
        req.complete(value)

    def _unread(self, dropped: list[Arrived], word: int) -> None:
        """Tell the senders of the synchronous sends among ``dropped`` (taken
        out unmatched) that their message was dropped unread (``word``)."""
        for m in dropped:
            if m.sync >= 0:
                self.ack(m.src, m.sync, word)

    def withdraw_synced(self, src: int, ident: int) -> bool:
        """World rank ``src`` cancels its synchronous send ``ident``: taken
        out of the unexpected queue (its credit granted back) if it waits
        there unmatched, and never seen here; False where it does not
        (taken by a receive, dropped, or not come whole yet)."""
        with self.lock:
            m = self.matcher.take_synced(src, ident)
            dropped = self._ungranted([m]) if m is not None else []
        for d in dropped:
            self.consumed(d.src, d.nbytes)
        return m is not None

    def close_unread(self) -> None:
        """This rank closes its mesh (cleanly): the synchronous sends whose
        messages wait unmatched are dropped, each sender told it was closed
        with it unread (before the goodbye: it fails naming that)."""
        with self.lock:
            gone = self.matcher.drop_synced()
            dropped = self._ungranted(gone)
        for m in dropped:
            self.consumed(m.src, m.nbytes)
        self._unread(gone, wire.SYNC_CLOSED)

    def ack_of(self, h: wire.Header) -> None:
        """A receive took the message of header ``h`` (mesh.reader, which
        completed it): its sender told, if it waits to be (a synchronous send)."""
        if h.sync >= 0:
            self.ack(h.src, h.sync)

    def consumed(self, src: int, nbytes: int) -> None:
        """A message from ``src`` left our buffers: grant its bytes back."""
        if src == self.rank:
            return
        peer = self.peers[src]
        grant = peer.consumed(nbytes)
        if grant:
            self._control(peer, wire.encode(wire.CREDIT, self.rank, credit=grant))
        elif self.held[src] and self.held[src] + peer.to_grant >= peer.grant_step:
            with self.lock:
                release = self._release(src)
            self._grant(src, release)

    def _release(self, src: int, asked: bool = False) -> int:
        """With the lock held: the credit of ``src``'s messages that wait
        unmatched, taken out of ``held`` to be granted back now (``_grant``)
        if, with what is owed to it, it makes a grant step (its window may
        be full) and a receive or probe that ``src`` could answer is posted
        (or ``asked``: an iprobe that found nothing); else 0 (see ``held``)."""
        held = self.held[src]
        peer = self.peers[src]
        if not held or held + peer.to_grant < peer.grant_step or not (
                asked or self.matcher.waits_for(src)):
            return 0
        self.matcher.mark_granted(src)
        self.held[src] = 0
        return held

    def _grant(self, src: int, held: int) -> None:
        """Grant ``src`` back ``held`` bytes (``_release``) and what it is owed."""
        if held:
            peer = self.peers[src]
            self._control(peer, wire.encode(wire.CREDIT, self.rank, credit=peer.flush(held)))

    def _misfit(self, req: Pending, src: int, tag: int, problem: str) -> MeshError:
        ranks = self.groups.get(req.group, ("", []))[1]
        who = f"rank {ranks.index(src)}" if src in ranks else f"world rank {src}"
        return OutMismatchError(f"rank {self.rank}: {req.described(self.peers)}: the message "
                                f"from {who} (tag {tag}) does not fit out=: {problem}; the "
                                f"message stays queued for the next receive")

    def _mismatch(self, req: Pending, src: int, fp: Any) -> None:
        at = f" at call #{-req.tag}" if req.tag < 0 else ""
        text = (f"collective mismatch on group {self.groups.get(req.group, ('?',))[0]}{at}: "
                f"rank {self.rank} called {fmt_fp(req.fp)} but rank {src} called {fmt_fp(fp)}")
        # the abort is on its way to the members before the waiter wakes (see abort_local)
        self.abort(req.group, req.tag, text, AbortKind.MISMATCH)
        req.fail(MismatchError(f"rank {self.rank}: {text}"))

    # ---- aborts --------------------------------------------------------------

    def abort(self, group: int, tag: int, reason: str, kind: AbortKind = AbortKind.OTHER,
              peer: int = -1) -> None:
        """Fail ``tag`` on every member of ``group``: pending and future ops raise.
        A lost-peer abort names ``peer`` (a world rank) when given; else, with
        a member of the group known dead, the error is a lost peer naming it."""
        if kind != AbortKind.LOST_PEER or peer < 0:
            lost = self.dead_member(group) if self.dead and kind != AbortKind.MISMATCH else None
            if lost is not None:
                kind = AbortKind.LOST_PEER
            peer = -1 if lost is None else lost
        self.abort_local(group, tag, kind, reason, peer,
                         tell=lambda: self.send_abort(group, tag, reason, kind, peer))

    def send_abort(self, group: int, tag: int, reason: str, kind: AbortKind, peer: int,
                   heard_from: int = -1) -> None:
        """Tell the group's members (but ``heard_from``) that ``tag`` is aborted."""
        header = wire.encode(wire.ABORT, self.rank, group, tag, reason=reason, abort=kind,
                             peer=peer)
        for r in self.groups.get(group, ("", []))[1]:
            if r != self.rank and r != heard_from:
                self._control(self.peers[r], header)

    def relayed(self, reason: str, kind: AbortKind, peer: int) -> str:
        """An abort's reason as a member sent it, the member that aborted
        (the reason starts with it: ``rank 1 of group world``) and its lost
        peer (world rank ``peer``) named with their hosts where those are
        not this rank's: the member named both bare where they were its own
        host's."""
        said = _ABORTED_BY.match(reason)
        if said is not None:
            world = int(said.group(3) or said.group(1))
            there = self.peers[world].there if 0 <= world < len(self.peers) else ""
            if there:
                notes = f"world rank {world}, {there}" if said.group(3) else there
                reason = (f"rank {said.group(1)} of group {said.group(2)} ({notes}): "
                          + reason[said.end():])
        there = self.peers[peer].there if kind == AbortKind.LOST_PEER and \
            0 <= peer < len(self.peers) else ""
        if not there:
            return reason
        return re.sub(rf"\bpeer (world )?rank {peer} is gone", lambda m: f"peer "
                      f"{named(peer, there, (m.group(1) or '') + 'rank')} is gone", reason, 1)

    def abort_local(self, group: int, tag: int, kind: AbortKind, reason: str,
                    peer: int = -1, tell: Callable[[], None] | None = None) -> bool:
        """Fail ``tag`` here (an abort of ours, or one a peer sent); False if
        it was aborted already. ``tell()`` (sending the abort to the group's
        members) runs once it is recorded and before any waiter on the tag
        wakes: whatever a woken waiter sends next (the group's next call, a
        goodbye, a message) follows the abort on each connection, so no
        member hears of it first."""
        with self.lock:
            if (group, tag) in self.aborted or self.forgotten and group in self.forgotten:
                return False    # (a peer's abort of a group dropped here: nothing waits)
            if kind == AbortKind.LOST_PEER and peer < 0 and self.dead:
                lost = self.dead_member(group)
                peer = -1 if lost is None else lost
            record = self.aborted[(group, tag)] = (kind, reason, peer)
            if kind == AbortKind.LOST_PEER and peer >= 0 and self.first_lost < 0:
                self.first_lost = peer      # (a collective that lost it, here or relayed: the
                #                             same-host board's read of a dead peer's memory)
            if len(self.aborted) > _KEEP_ABORTED:    # the oldest: long over everywhere
                del self.aborted[next(iter(self.aborted))]
            reqs = self.matcher.remove_posted(lambda q: q.group == group and q.tag == tag)
            dropped = self._ungranted(self.matcher.drop_unexpected(group, tag))
            followers = list(self.follows.get((group, tag), ())) if self.follows else []
        if tell is not None:
            tell()
        for m in dropped:
            self.consumed(m.src, m.nbytes)
        for q in reqs:
            q.fail(abort_error(record, f"rank {self.rank}: {q.described(self.peers)} aborted: "
                                       f"{reason}"))
        for sub, sub_tag in followers:      # a phase of the call, here only
            self.abort_local(sub, sub_tag, kind, reason, peer)
        self._nudge()
        return True

    def forget(self, group: int) -> None:
        """Group ``group`` was dropped here (its id is never made again): its
        aborts, the receives posted on it (a collective's watches: no waiter
        is left) and its messages waiting unmatched go, and a message for it
        that comes later is dropped."""
        self.handlers.pop(group, None)      # (a freed window's: mesh.window)
        with self.lock:
            self.forgotten[group] = None
            if len(self.forgotten) > _KEEP_FORGOTTEN:
                del self.forgotten[next(iter(self.forgotten))]
            for key in [k for k in self.aborted if k[0] == group]:
                del self.aborted[key]
            for key in [k for k in self.follows if k[0] == group]:
                del self.follows[key]
            self.matcher.remove_posted(lambda q: q.group == group)
            gone = self.matcher.drop_group(group)
            dropped = self._ungranted(gone)
        for m in dropped:
            self.consumed(m.src, m.nbytes)
        self._unread(gone, wire.SYNC_GROUP)

    def _ungranted(self, dropped: list[Arrived]) -> list[Arrived]:
        """Of messages taken out unmatched (the lock held), those whose credit
        is still to grant, taken out of ``held``."""
        for m in dropped:
            if not m.granted and m.src != self.rank:
                self.held[m.src] -= m.nbytes + MSG_COST
        return [m for m in dropped if not m.granted]

    def unmatched_note(self, req: Pending) -> str:
        """What waits here unmatched from the peer ``req`` waits for (from any
        rank: ``ANY``): the tags and groups of its messages, which a sender
        and a receiver that disagree on a tag or a group show. '' if none."""
        with self.lock:
            return self._unmatched(req)

    def _unmatched(self, req: Pending) -> str:
        """unmatched_note, the lock held."""
        found = self.matcher.unmatched(req.src)
        if not found:
            return ""
        parts = []
        stranger = False
        for g, t, msg, n in found:
            what = f"collective call #{-t}" if t < 0 else f"tag {t}"
            if g != req.group:
                known = self.groups.get(g)
                stranger |= known is None
                what += f" on group {known[0]}" if known else " on a group this rank has not made"
            who = "" if req.src != ANY else (f"world rank {msg.src}, " if req.group
                                             else f"rank {msg.src}, ")
            many = f"{n} messages, the first " if n > 1 else ""
            parts.append(f"{what} ({who}{many}{msg.nbytes} bytes)")
        whose = "any rank" if req.src == ANY else \
            f"world rank {req.src}" if req.group else f"rank {req.src}"
        hint = (" (its members make a group with the same ranks in the same order)"
                if stranger else "")
        return f"; unmatched here from {whose}: {'; '.join(parts)}{hint}"

    # ---- lost peers ----------------------------------------------------------

    def gone(self, peer: Peer, desc: str, group: int = 0, note: str = "") -> LostPeerError:
        """The error of an operation (of ``group``) that involves a lost
        peer; in a sub-group the peer is named by its world rank, as such.
        ``note``: what waits unmatched from it (see unmatched_note)."""
        if self.closed:         # not the peer's doing
            return self.closed_error(desc, peer.rank)
        who = named(peer.rank, peer.there, "world rank" if group else "rank")
        return LostPeerError(f"rank {self.rank}: {desc} failed: peer {who} is gone "
                             f"({peer.why}){note}",
                             peer.rank if peer.cause < 0 else peer.cause)

    def closed_error(self, desc: str, peer: int | None = None) -> LostPeerError:
        """The error of an operation made after this rank closed its mesh."""
        return LostPeerError(f"rank {self.rank}: {desc} failed: this rank's mesh is closed "
                             f"(world.close(), or destroy_process_group() of the group it "
                             f"made), so every peer is gone to it", peer)

    def deserted(self, group: int) -> bool:
        """Whether every member of ``group`` but this rank has left (closed
        its mesh, or died), and there is one at least: a receive from any
        rank of it can only time out (the lock held)."""
        ranks = self.groups.get(group, ("", []))[1]
        return len(ranks) > 1 and all(r == self.rank or self.peers[r].state != ALIVE
                                      for r in ranks)

    def deserted_error(self, req: Pending) -> LostPeerError:
        """The error of ``req``, a receive or probe from any rank of a
        group whose other members have all left (``deserted``; the lock held)."""
        if self.closed:
            return self.closed_error(req.described(self.peers))
        ranks = self.groups.get(req.group, ("", []))[1]
        word = "world rank" if req.group else "rank"
        who = [f"{named(r, self.peers[r].there, word)} ({self.peers[r].why})"
               for r in ranks if r != self.rank]
        return LostPeerError(f"rank {self.rank}: {req.described(self.peers)} failed: every rank "
                             f"that could send it is gone: {', '.join(who)}"
                             f"{self._unmatched(req)}",
                             next(r for r in ranks if r != self.rank))

    def dead_member(self, group: int) -> int | None:
        """The lowest rank of ``group`` known dead, if any."""
        dead = [r for r in self.groups.get(group, ("", []))[1] if r in self.dead]
        return min(dead) if dead else None

    def fail_posted(self, p2p_only: bool = False) -> None:
        """This rank's mesh closes: every receive and probe still posted
        (another thread's, from any source) fails now, saying so, before
        the sockets and rings it would read go. ``p2p_only``: the user's
        own (tags >= 0), not a collective's still under way."""
        with self.lock:
            reqs = self.matcher.remove_posted(lambda q: not p2p_only or q.tag >= 0)
        for q in reqs:
            q.fail(self.closed_error(q.described(self.peers)))
        self._nudge()

    def peer_gone(self, rank: int, why: str, state: int, told: bool = False,
                  cause: int = -1) -> None:
        """Fail what involves ``rank``: receives from it and, when it died,
        receives from any rank and every collective's (negative tag) in its
        groups; then the sends queued for it. A death is logged unless the
        peer ``told`` us (it reports its own error). ``cause``: the world
        rank whose loss made ``rank`` leave (its clean goodbye says so), which
        the errors then name as their lost peer."""
        peer = self.peers[rank]
        with self.lock:
            if peer.state != ALIVE:
                return
            peer.state, peer.why, peer.cause = state, why, cause
            if self.first_lost < 0:
                self.first_lost = rank if state == DEAD else cause
            if state == DEAD:
                self.dead.add(rank)
            else:
                self.left.add(rank)
            members = {g for g, (_, ranks) in list(self.groups.items()) if rank in ranks}
            # after a clean goodbye, a user's receive from any rank fails too once no
            # other member of its group is left to send it anything
            deserted = {g for g in members if self.deserted(g)} if state != DEAD else set()
            reqs = self.matcher.remove_posted(
                lambda q: q.src == rank or (state == DEAD and (q.src == ANY or q.tag < 0)
                                            and q.group in members)
                or (q.src == ANY and q.tag >= 0 and q.group in deserted))
            errors = [self.gone(peer, q.described(self.peers), q.group, self._unmatched(q))
                      if q.src == rank else self.deserted_error(q) if state != DEAD
                      else self.gone(peer, q.described(self.peers), q.group) for q in reqs]
            # a call of one of its groups running as phases on sub-groups without it
            # (collectives.host.hier): the phase under way fails too, as it does when
            # the call is aborted. Its waits are on the others only: a rank waited
            # there for a peer that had raised, until that peer's process ended
            phases = [f for (g, _), fs in self.follows.items() if g in members for f in fs] \
                if state == DEAD and self.follows else []
        if state == DEAD and not told:
            _log.error("rank %d: lost peer %s: %s", self.rank, named(rank, peer.there), why)
        if state == DEAD and not self.closed:
            # (once this rank's goodbye is out, a peer's exit is expected, its own goodbye
            # perhaps not read yet: its node's meshrun reports how it ended)
            _tell_launcher(self.rank, rank, why)
        for sub, sub_tag in phases:
            self.abort_local(sub, sub_tag, AbortKind.LOST_PEER,
                             f"peer {named(rank, peer.there, 'world rank')} is gone ({why})",
                             rank)
        for q, error in zip(reqs, errors):
            q.fail(error)
        self._nudge()
        with peer.lock:
            while peer.queue:
                out = peer.queue.popleft()
                out.fail(self.gone(peer, out.described(self.peers)))
        for handler in list(self.handlers.values()):    # (a window's locks it held go)
            handler.lost(rank)


_ABORTED_BY = re.compile(r"rank (\d+) of group (.+?)(?: \(world rank (\d+)\))?: ")
"""How an abort's reason starts: the member that aborted (mesh.channel's
``CollectiveChannel._me``), with its world rank in a sub-group."""


def abort_error(record: tuple[AbortKind, str, int], text: str) -> MeshError:
    """The error an operation on an aborted tag raises (``record``: the
    abort's kind, reason and lost peer), with ``text``; its ``from_abort``
    is True (another rank's failure, not this one's own)."""
    kind, _, peer = record
    if kind == AbortKind.LOST_PEER:
        err: MeshError = LostPeerError(text, peer if peer >= 0 else None)
    else:
        err = kind.error(text)
    err.from_abort = True       # type: ignore[attr-defined]
    return err
