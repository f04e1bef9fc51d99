"""The inbox without sockets: matching, credit grants, aborts and lost peers,
seen through what it completes and the control messages it would send."""
from __future__ import annotations

import time

import numpy as np
import pytest

from mesh import wire
from mesh.errors import (AbortKind, LostPeerError, MeshError, MeshTimeoutError, MismatchError,
                         OutMismatchError)
from mesh.inbox import RMA_TAGS, Inbox
from mesh.match import ANY, DONE, MATCHED, POSTED
from mesh.launch.report import _peer
from mesh.liveness import Liveness
from mesh.peer import ALIVE, CLOSED, DEAD, MSG_COST, Outgoing, Peer, host_names, named, on_host
from mesh.rendezvous import gone_text

SIZE = 4


def _inbox(window: int = 64 << 20) -> tuple[Inbox, list]:
    """Rank 0 of 4; ``sent`` collects (peer, decoded header) of control messages."""
    peers = [Peer(r, None, None, window) for r in range(SIZE)]
    groups = {0: ("world", list(range(SIZE))), 7: ("world/[0, 2]", [0, 2])}
    sent: list = []
    box = Inbox(0, peers, groups, lambda p, h: sent.append((p.rank, wire.decode(h, SIZE))),
                lambda: None)
    return box, sent


def test_a_message_meets_its_receive_whichever_comes_first() -> None:
    box, _ = _inbox()
    early = np.arange(3.0)
    box.arrive(1, 0, 5, early, early.nbytes, None)            # nobody asked yet: it waits
    assert box.iprobe(0, ANY, 5) == (1, 5, 24, early.dtype, (3,))
    req = box.post(0, 1, 5, None, None, "recv")
    assert req.state == DONE and req.value is early and req.got[:3] == (1, 5, 24)
    later = box.post(0, ANY, 5, None, None, "recv")
    assert later.state == POSTED and box.iprobe(0, ANY, 5) is None
    assert box.claim(0, 2, 5) is later and later.state == MATCHED


def test_a_window_request_goes_to_its_handler_and_the_rest_of_its_group_to_matching() -> None:
    """mesh.window's target side: a request (tag >= RMA_TAGS) of a group with
    a handler is handed to it as it comes, its credit granted back, never
    queued; its replies (lower tags) are matched as any message; a lost
    peer is told to it."""
    box, sent = _inbox(window=4096)                            # grant step: 1024 bytes
    got: list = []

    class Handler:
        def arrive(self, src: int, tag: int, value: object) -> None:
            got.append((src, tag - RMA_TAGS, value))

        def lost(self, rank: int) -> None:
            got.append(("lost", rank))
    box.handlers[7] = Handler()
    box.arrive(2, 7, RMA_TAGS | 5, "request", 1000, None)
    assert got == [(2, 5, "request")] and box.matcher.waiting(7, 2, RMA_TAGS | 5) is None
    assert [(r, h.kind, h.credit) for r, h in sent] == [(2, wire.CREDIT, 1000 + MSG_COST)]
    box.arrive(2, 7, 3, "reply", 10, None)
    assert box.iprobe(7, 2, 3) is not None and len(got) == 1
    box.peer_gone(2, "it died", DEAD, told=True)
    assert got[-1] == ("lost", 2)


def test_credit_is_granted_back_in_steps_of_a_quarter_window() -> None:
    box, sent = _inbox(window=4096)                            # grant step: 1024 bytes
    box.consumed(1, 100)
    box.consumed(1, 100)
    assert sent == []                                          # 712 bytes gathered: not yet
    box.consumed(1, 100)
    assert [(r, h.kind, h.credit) for r, h in sent] == [(1, wire.CREDIT, 3 * (100 + MSG_COST))]
    box.consumed(0, 5000)                                      # from itself: nothing to grant
    assert len(sent) == 1


def test_an_out_that_does_not_fit_fails_and_leaves_the_message_queued() -> None:
    box, _ = _inbox()
    box.arrive(1, 0, 5, np.arange(4.0), 32, None)
    bad = box.post(0, 1, 5, np.empty(3), None, "recv")
    assert isinstance(bad.error, OutMismatchError) and "rank 1 (tag 5)" in str(bad.error)
    good = box.post(0, 1, 5, np.empty(4), None, "recv")
    assert good.error is None and list(good.value) == [0, 1, 2, 3]


@pytest.mark.parametrize("kind,error", [(AbortKind.MISMATCH, MismatchError),
                                        (AbortKind.OTHER, MeshError),
                                        (AbortKind.TIMEOUT, MeshTimeoutError)])
def test_an_abort_fails_the_tag_now_and_later_and_tells_the_group(kind: AbortKind,
                                                                  error: type) -> None:
    box, sent = _inbox()
    posted = box.post(7, 2, -3, None, None, "all_reduce")
    other = box.post(7, 2, -4, None, None, "all_reduce")
    box.arrive(2, 7, -3, np.zeros(2), 16, None)                # goes to ``posted``
    assert posted.state == DONE
    queued = box.post(7, 2, -3, None, None, "second")          # a second, still posted
    box.abort(7, -3, "boom", kind)
    assert type(queued.error) is error and "second aborted: boom" in str(queued.error)
    late = box.post(7, 2, -3, None, None, "late")
    assert type(late.error) is error and other.state == POSTED
    assert [(r, h.kind, h.tag, h.abort, h.reason) for r, h in sent] == [
        (2, wire.ABORT, -3, int(kind), "boom")]                # the group's members only
    box.abort(7, -3, "again", kind)
    assert len(sent) == 1                                      # once per tag
    assert AbortKind.of(error) == kind


def test_a_dead_peer_fails_what_it_would_have_completed() -> None:
    box, _ = _inbox()
    mine = box.post(0, 1, 5, None, None, "recv from 1")
    anyone = box.post(0, ANY, 6, None, None, "recv from any")
    coll = box.post(7, 2, -1, None, None, "collective of 7")
    unrelated = box.post(0, 2, 5, None, None, "recv from 2")
    out = Outgoing(1, [b"x"], 1, "send to 1", None)
    box.peers[1].queue.append(out)
    box.peer_gone(1, "silent for 10s", DEAD)
    assert box.peers[1].state == DEAD and box.dead == {1}
    for req in (mine, anyone, out):
        assert isinstance(req.error, LostPeerError) and req.error.peer == 1
        assert "peer rank 1 is gone (silent for 10s)" in str(req.error)
    assert coll.state == POSTED and unrelated.state == POSTED  # group 7 is ranks 0 and 2
    later = box.post(0, ANY, 9, None, None, "recv from any")
    assert isinstance(later.error, LostPeerError)
    box.abort(0, -8, "stop")                                   # a group with a dead member
    assert box.aborted[(0, -8)] == (AbortKind.LOST_PEER, "stop", 1)


def test_a_closed_peer_fails_only_what_names_it() -> None:
    box, _ = _inbox()
    mine = box.post(0, 3, 5, None, None, "recv from 3")
    anyone = box.post(0, ANY, 5, None, None, "recv from any")
    box.peer_gone(3, "it closed its mesh", CLOSED)
    assert isinstance(mine.error, LostPeerError) and anyone.state == POSTED
    assert box.dead == set() and box.peers[2].state == ALIVE
    assert box.cancel(anyone) and isinstance(anyone.error, MeshError)


def test_the_first_peer_lost_is_kept_for_the_goodbye_and_named_by_a_clean_leaver() -> None:
    """What a rank's clean goodbye names (Transport.close): the first peer it
    lost, be it by a death the inbox saw or by a collective aborted for it
    (the same-host board's read of a dead peer's memory, which the inbox
    never sees); and what waited on a peer whose clean goodbye named one
    fails naming that one, as ``.peer`` too (a survivor closing on catching
    a kill -9 was named as the lost peer by another survivor)."""
    box, _ = _inbox()
    assert box.first_lost == -1
    box.abort_local(0, -4, AbortKind.MISMATCH, "odd shape", -1)
    assert box.first_lost == -1
    box.abort_local(0, -5, AbortKind.LOST_PEER, "cannot read the board of rank 2", 2)
    box.peer_gone(3, "its connection closed", DEAD)
    assert box.first_lost == 2
    box, _ = _inbox()
    waits = box.post(0, 3, 5, None, None, "recv from rank 3 (tag 5, group world)")
    box.peer_gone(3, "it closed its mesh after it lost world rank 2", CLOSED, cause=2)
    assert isinstance(waits.error, LostPeerError) and waits.error.peer == 2
    assert str(waits.error) == ("rank 0: recv from rank 3 (tag 5, group world) failed: peer "
                                "rank 3 is gone (it closed its mesh after it lost world rank "
                                "2)"), waits.error
    assert box.first_lost == 2 and box.dead == set()     # (its word: rank 2 not declared dead)
    box.peer_gone(1, "its connection closed", DEAD)
    assert box.first_lost == 2


def test_a_peer_on_another_host_is_named_with_its_host_one_on_this_host_as_before(
        caplog: pytest.LogCaptureFixture) -> None:
    """mesh.peer's renderer, the one every error and log line naming a peer
    goes through: a peer on another host is named with that host (the name
    its rank reported, or its address where the name is this host's too:
    network namespaces) and its pid; a same-host peer as before. The
    inbox's lost-peer errors and log line, and an abort relayed by a
    member on the lost peer's own host (which named it bare), say so; the
    launcher's report still finds the lost peer's rank in such a text."""
    assert on_host("a|net:[1]", "a|net:[1]", "ipc:///tmp/mr.sock", 42) == ""
    assert on_host("a|net:[1]", "node-b|net:[1]", "tcp://10.0.0.2:4000", 4242) == \
        "on host node-b, pid 4242"
    assert on_host("box|net:[1]", "box|net:[2]", "tcp://10.77.0.2:4000", 7) == \
        "on host 10.77.0.2, pid 7"
    assert on_host("fake-a", "fake-b", "tcp://127.0.0.1:5", 0) == "on host fake-b"  # MESH_HOST_ID
    there = "on host node-b, pid 4242"
    assert (named(5), named(5, there)) == ("rank 5", "rank 5 (on host node-b, pid 4242)")
    assert (named(1, "", "rank", 3), named(3, "", "rank", 3)) == ("rank 1 (world rank 3)", "rank 3")
    assert named(1, there, "root", 3) == "root 1 (world rank 3, on host node-b, pid 4242)"
    box, _ = _inbox()
    box.peers[1].there = there
    far = box.post(0, 1, 5, None, None, "recv from rank 1 (tag 5, group world)")
    near = box.post(0, 2, 5, None, None, "recv from rank 2 (tag 5, group world)")
    with caplog.at_level("ERROR", logger="mesh.transport"):
        box.peer_gone(1, "silent for 10.2s", DEAD)
        box.peer_gone(2, "silent for 10.2s", DEAD)
    assert str(far.error) == ("rank 0: recv from rank 1 (tag 5, group world) failed: peer rank 1 "
                              "(on host node-b, pid 4242) is gone (silent for 10.2s)")
    assert str(near.error) == ("rank 0: recv from rank 2 (tag 5, group world) failed: peer rank 2 "
                               "is gone (silent for 10.2s)")
    assert [r.getMessage() for r in caplog.records] == [
        "rank 0: lost peer rank 1 (on host node-b, pid 4242): silent for 10.2s",
        "rank 0: lost peer rank 2: silent for 10.2s"]
    assert _peer({"exc_type": "LostPeerError", "message": str(far.error)}) == 1
    ended = "is gone: it ended (exit code 5) before the mesh was complete"
    assert (gone_text(1, "exit code 5"), gone_text(1, "exit code 5", there)) == (
        f"peer rank 1 {ended}", f"peer rank 1 ({there}) {ended}")     # (the rendezvous')
    assert _peer({"exc_type": "RuntimeError", "message":
                  f"LostPeerError: rank 0: rendezvous at tcp://a:1: peer rank 1 ({there}) "
                  f"{ended}"}) == 1
    said = "all_reduce #3 failed: LostPeerError: peer {}rank {} is gone (silent for 10.2s)"
    for word in ("", "world "):     # (the sender, on rank 1's host, named it bare)
        assert box.relayed(said.format(word, 1), AbortKind.LOST_PEER, 1) == \
            said.format(word, f"1 ({there})")
    assert box.relayed(said.format("", 2), AbortKind.LOST_PEER, 2) == said.format("", 2)
    assert box.relayed(said.format("", 1), AbortKind.MISMATCH, -1) == said.format("", 1)
    # the member that aborted, on rank 1's host, named itself bare: its host here too
    # (two namespaces, a rank crashed on node 1: "aborted: rank 1 of group world: ...")
    lost = "barrier #23 on group world: recv from rank 3 failed: peer rank 2 is gone"
    for group, words in (("world", f"({there})"), ("world/[1, 2]",
                                                   f"(world rank 1, {there})")):
        whom = "rank 1" if group == "world" else "rank 0"
        sub = "" if group == "world" else " (world rank 1)"
        assert box.relayed(f"{whom} of group {group}{sub}: {lost}", AbortKind.LOST_PEER, 2) == \
            f"{whom} of group {group} {words}: {lost}"
    assert box.relayed(f"rank 2 of group world: {lost}", AbortKind.MISMATCH, -1) == \
        f"rank 2 of group world: {lost}"            # (a member of this rank's host: bare)


def test_an_operation_names_its_peer_on_another_host_with_its_host() -> None:
    """The operation's own words (mesh.match.describe, given the peers) name
    its peer on another host with its host, as ``named`` does, in a timeout
    or lost-peer error, the status a rank's heartbeats carry and the stall
    report's, and what a rank meshrun stops says it waits in; bare for a
    peer on this host, and without the peers (rendered only then). Each
    rank's host as meshrun's table names it (mesh.peer.host_names): the
    name its rank reported, its address where another host has that name."""
    there = "on host node-b, pid 4242"
    box, _ = _inbox()
    box.peers[2].there = there
    world = box.post(0, 2, 5, None, None, ("recv from", 2, 5, "world"))
    pair = box.post(7, 2, 6, None, None, ("recv from", 1, 6, "world/[0, 2]", 2))
    coll = box.post(7, 2, -3, None, None, ("recv from", 1, -3, "world/[0, 2]", 2, "all_reduce"))
    near = box.post(0, 1, 5, None, None, ("recv from", 1, 5, "world"))
    anyone = box.post(0, ANY, 5, None, None, ("recv from", ANY, 5, "world"))
    live = Liveness(0, 60.0, box.peers, box.groups, box, lambda *a, **k: None,
                    None)       # type: ignore[arg-type]
    live.doing, live.doing_since = world, time.monotonic() - 3.7
    what, waited = live.waiting_in() or ("", 0.0)
    assert what == f"recv from rank 2 ({there}) (tag 5, group world)" and waited >= 3.7
    assert live.status().endswith(f"s in recv from rank 2 ({there}) (tag 5, group world)")
    assert world.desc == "recv from rank 2 (tag 5, group world)"     # (no peers: bare)
    box.peer_gone(2, "silent for 10.2s", DEAD)
    assert [str(r.error) for r in (world, pair, coll)] == [
        f"rank 0: recv from rank 2 ({there}) (tag 5, group world) failed: peer rank 2 ({there}) "
        f"is gone (silent for 10.2s)",
        f"rank 0: recv from rank 1 of group world/[0, 2] (world rank 2, {there}), tag 6 "
        f"failed: peer world rank 2 ({there}) is gone (silent for 10.2s)",
        f"rank 0: all_reduce #3 on group world/[0, 2]: recv from rank 1 (world rank 2, "
        f"{there}) failed: peer world rank 2 ({there}) is gone (silent for 10.2s)"]
    assert [r.described(box.peers) for r in (near, anyone)] == [
        "recv from rank 1 (tag 5, group world)", "recv from any rank (tag 5, group world)"]
    assert host_names(["a|net:[1]", "a|net:[1]", "node-b|net:[1]", "fake"],
                      ["tcp://10.0.0.1:1", "tcp://10.0.0.1:2", "tcp://10.0.0.2:3", ""]) == \
        ["a", "a", "node-b", "fake"]
    assert host_names(["vm|net:[1]", "vm|net:[2]"], ["tcp://10.77.0.1:1", "tcp://10.77.0.2:2"]) \
        == ["10.77.0.1", "10.77.0.2"]       # (network namespaces: one host name)


def test_a_failing_goodbye_quoted_names_its_lost_peer_with_its_host() -> None:
    """Rank 2 and rank 1 share host node-b; rank 2 lost rank 1 and leaves
    failing, its error naming rank 1 bare (its own host); its goodbye also
    says it lost rank 1, so what rank 0 (another host) quotes of that error
    names rank 1 with its host, as rank 2 with its own."""
    box, _ = _inbox()
    box.peers[1].there, box.peers[2].there = "on host node-b, pid 41", "on host node-b, pid 42"
    live = Liveness(0, 60.0, box.peers, box.groups, box, lambda *a, **k: None,
                    None)       # type: ignore[arg-type]
    waits = box.post(0, 2, 5, None, None, "recv from rank 2 (tag 5, group world)")
    live.on_bye(box.peers[2], "LostPeerError: rank 2: recv from rank 1 (tag 0, group world) "
                "failed: peer rank 1 is gone (silent for 10.2s)", 1)
    assert str(waits.error) == (
        "rank 0: recv from rank 2 (tag 5, group world) failed: peer rank 2 (on host node-b, "
        "pid 42) is gone (it failed: LostPeerError: rank 2: recv from rank 1 (tag 0, group "
        "world) failed: peer rank 1 (on host node-b, pid 41) is gone (silent for 10.2s))")


def test_an_abort_heard_from_a_peer_is_passed_on_once_to_the_others() -> None:
    """What the reader does with an ABORT: fail it here, then tell every other
    member but the sender, so a member failing because of it says goodbye
    only after the abort, on the same connection; a second copy is ignored."""
    box, sent = _inbox()
    assert box.abort_local(0, -4, AbortKind.MISMATCH, "odd shape", -1)
    box.send_abort(0, -4, "odd shape", AbortKind.MISMATCH, -1, heard_from=1)
    assert [(r, h.kind, h.tag, h.abort) for r, h in sent] == [
        (2, wire.ABORT, -4, AbortKind.MISMATCH), (3, wire.ABORT, -4, AbortKind.MISMATCH)]
    assert not box.abort_local(0, -4, AbortKind.MISMATCH, "odd shape", -1)


def test_a_receive_from_any_rank_fails_once_every_other_member_has_closed() -> None:
    """A clean goodbye fails only what names its rank, but a receive or
    probe from any rank of a group whose other members have all closed can
    never be answered: it fails then (and at once when posted later), naming
    them, instead of waiting out its timeout (MESH_TIMEOUT: 300 s)."""
    box, _ = _inbox()
    pair = box.post(7, ANY, 5, None, None, ("recv from", ANY, 5, "world/[0, 2]"))
    world = box.post(0, ANY, 5, None, None, ("recv from", ANY, 5, "world"))
    box.peer_gone(2, "it closed its mesh", CLOSED)
    assert isinstance(pair.error, LostPeerError) and pair.error.peer == 2
    assert str(pair.error) == ("rank 0: recv from any rank (tag 5, group world/[0, 2]) failed: "
                               "every rank that could send it is gone: world rank 2 (it closed "
                               "its mesh)")
    assert world.state == POSTED                               # ranks 1 and 3 may still send
    box.arrive(1, 0, 6, "early", 5, None)
    box.peer_gone(1, "it closed its mesh", CLOSED)
    box.peer_gone(3, "it closed its mesh", CLOSED)
    assert isinstance(world.error, LostPeerError) and str(world.error).endswith(
        "gone: rank 1 (it closed its mesh), rank 2 (it closed its mesh), rank 3 (it closed its "
        "mesh); unmatched here from any rank: tag 6 (rank 1, 5 bytes)")
    assert box.post(0, ANY, 6, None, None, "recv from any").value == "early"   # still taken
    probe = box.post(7, ANY, 1 << 63, None, None, "probe any", probe=True)
    assert isinstance(probe.error, LostPeerError) and box.dead == set()
    assert box.post(0, ANY, -2, None, None, "a collective's").state == POSTED


def test_messages_waiting_unreceived_give_their_credit_back_once_a_receive_waits() -> None:
    """A sender's window full of messages nobody received yet held back its
    next one, the message a receive waited for too (MPI lets a receiver take
    them in any order): a deadlock until the timeout. Once a receive or probe
    that the peer could answer waits, the credit of what waits goes back at
    once (never twice); with none posted, the window still holds them."""
    box, sent = _inbox(window=4096)                            # grant step: 1024 bytes
    for tag in (1, 2, 3):
        box.arrive(1, 0, tag, np.zeros(500, np.uint8), 500, None)
    assert sent == [] and box.held[1] == 3 * (500 + MSG_COST)
    other = box.post(0, 2, 9, None, None, "recv from 2")     # rank 1 cannot answer it
    assert sent == [] and other.state == POSTED
    waiting = box.post(0, 1, 9, None, None, "recv from 1")
    assert [(r, h.kind, h.credit) for r, h in sent] == [(1, wire.CREDIT, 3 * (500 + MSG_COST))]
    for tag in (3, 2, 1):
        assert box.post(0, 1, tag, None, None, "recv").state == DONE
    assert len(sent) == 1 and box.held[1] == 0 and box.peers[1].to_grant == 0
    box.arrive(1, 0, 4, np.zeros(900, np.uint8), 900, None)  # while one waits: at once
    assert sent[1][1].credit == 900 + MSG_COST and waiting.state == POSTED
    box.arrive(1, 0, 9, "it", 2, None)
    assert waiting.value == "it" and len(sent) == 2
