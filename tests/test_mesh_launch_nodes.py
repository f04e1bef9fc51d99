"""meshrun --max-restarts across nodes: every node's meshrun starts each try
together, a failure on any node stops the try on every node and starts the
next one everywhere (one TORCHELASTIC_RESTART_COUNT), and the job ends on
every node at its first success, when restarts run out, or when a node's
meshrun is gone. The word between the meshruns (mesh.launch.tries.Tries) is
checked first without a process, then two meshruns run on loopback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mesh.launch.tries import Tries
from proctools import alive

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "launch_nodes.py"

pytestmark = pytest.mark.timeout(60)


class _Meshruns:
    """What Tries told each node's meshrun (node k on connection b"k")."""

    def __init__(self, tries: Tries, gone: tuple[int, ...] = ()) -> None:
        self.tries, self.gone = tries, set(gone)
        self.heard: list[Any] = []
        self.started: list[int] = []
        tries.on_go = self.started.append

    def send(self, ident: bytes, msg: dict[str, Any]) -> bool:
        if int(ident) in self.gone:
            return False
        if msg.get("say") != "beat":
            self.heard.append((int(ident), msg["say"], msg.get("try"), msg.get("why")))
        return True

    def say(self, node: int, say: str, attempt: int = 0, now: float = 0.0, **more: Any) -> list:
        self.heard = []
        msg = {"op": "node", "node": node, "nnodes": self.tries.nnodes, "nproc": 2,
               "max_restarts": self.tries.max_restarts, "say": say, "try": attempt, **more}
        self.tries.handle(str(node).encode(), msg, now, self.send)
        return self.heard


def test_a_try_starts_once_every_node_is_ready_and_stops_everywhere_at_a_failure() -> None:
    m = _Meshruns(Tries(2, 2, 1))
    assert m.say(0, "ready") == [(0, "wait", 0, None)]
    assert not m.tries.running and m.started == []
    assert m.say(1, "ready") == [(0, "go", 0, None), (1, "go", 0, None)]
    assert m.tries.running and m.started == [0]
    assert m.say(1, "ready") == [(1, "go", 0, None)]      # (it had not heard the go yet)
    stop = "node 1: rank 2 ended (exit code 1); the try stops on every node (node 1's " \
           "meshrun reports why)"
    assert m.say(1, "failed", why="rank 2 ended (exit code 1)") == [
        (0, "stop", 0, stop), (1, "stop", 0, stop)]
    assert m.say(0, "failed", why="rank 0 ended (exit code 1)") == []   # (one stop a try)
    assert m.say(0, "ended", code=1, again=True, why="rank 0 lost rank 2", own=False) == []
    again = "node 1: rank 2 failed (exit code 1): RuntimeError: boom"
    assert m.say(1, "ended", code=1, again=True, why="rank 2 failed (exit code 1): "
                 "RuntimeError: boom", own=True) == [(0, "again", 1, again), (1, "again", 1, again)]
    assert (m.tries.attempt, m.tries.running) == (1, False)
    assert m.say(0, "ended", 0, code=1, again=True, why="late", own=True) == []   # (try 0's)
    m.say(0, "ready", 1)
    assert m.say(1, "ready", 1)[0][1:3] == ("go", 1) and m.started == [0, 1]
    m.say(0, "ended", 1, code=3, again=True, why="rank 1 failed", own=True)
    assert m.say(1, "ended", 1, code=1, again=True, why="rank 3 lost", own=False) == [
        (0, "over", 1, "node 0: rank 1 failed"), (1, "over", 1, "node 0: rank 1 failed")]
    assert m.tries._over is not None and m.tries._over["exhausted"]
    assert m.tries._over["code"] == 3       # (the failure's, for every node's meshrun)
    assert not m.tries.settled()
    m.say(0, "bye", 1)
    m.say(1, "bye", 1)
    assert m.tries.settled()


def test_a_success_a_signal_or_a_node_gone_ends_the_job_without_a_restart() -> None:
    m = _Meshruns(Tries(2, 2, 5))
    m.say(0, "ready")
    m.say(1, "ready")
    assert m.say(0, "ended", code=0, again=False, why="", own=False) == []
    assert m.say(1, "ended", code=0, again=False, why="", own=False) == [
        (0, "over", 0, ""), (1, "over", 0, "")]
    assert m.tries._over is not None and m.tries._over["ok"]

    m = _Meshruns(Tries(2, 2, 5))
    m.say(0, "ready")
    m.say(1, "ready")
    m.say(1, "ended", code=130, again=False, why="its meshrun was stopped by SIGINT", own=True)
    over = [(n, "over", 0, "node 1: its meshrun was stopped by SIGINT") for n in (0, 1)]
    assert m.say(0, "ended", code=1, again=True, why="rank 0 lost rank 2", own=False) == over

    m = _Meshruns(Tries(2, 2, 5, silent_s=10.0))
    m.say(0, "ready")
    m.say(1, "ready")
    m.gone.add(1)           # (its meshrun killed: its connection closed)
    m.heard = []
    m.tries.tick(1.0, m.send)
    assert [h[:2] for h in m.heard] == [(0, "over")] and "node 1's meshrun is gone" in m.heard[0][3]
    assert m.tries._over is not None and m.tries._over["gone"] == 1     # (its ranks' node)
    assert m.say(0, "ready", 1)[0][1] == "over"     # (whatever it says next)

    m = _Meshruns(Tries(2, 2, 5, silent_s=10.0))
    m.say(0, "ready")
    m.say(1, "ready")
    assert m.say(0, "ask", about=1) == [(0, "known", None, None)]      # (there)
    m.gone.add(1)       # (asked whether it is there: found gone then, not at the next beat)
    assert [h[:2] for h in m.say(0, "ask", about=1)] == [(0, "over"), (0, "known")]

    m = _Meshruns(Tries(2, 2, 5, silent_s=10.0))
    m.say(0, "ready", now=0.0)
    m.say(1, "ready", now=0.0)
    m.say(0, "beat", now=10.0)
    m.heard = []
    m.tries.tick(10.5, m.send)      # (node 1 said nothing for 10.5 s: its host lost)
    assert [h[:2] for h in m.heard] == [(0, "over")]

    m = _Meshruns(Tries(2, 2, 5))
    m.say(0, "ready")
    assert m.say(0, "bye") == []        # (node 1 never came: no one to tell)
    assert "node 0's meshrun ended before the job did" in str(m.tries._over)


def test_a_meshrun_that_disagrees_is_refused_and_a_rank_cannot_join_between_tries() -> None:
    m = _Meshruns(Tries(2, 2, 3))
    heard = m.say(1, "ready", max_restarts=2)
    assert heard == [(1, "refused", None, "the launchers disagree: node 1's meshrun has "
                      "--nnodes 2 -n 2 --max-restarts 2, node 0's --nnodes 2 -n 2 "
                      "--max-restarts 3")]
    assert m.say(2, "ready")[0][1] == "refused"
    m.say(0, "ready")
    m.heard = []
    m.tries.handle(b"7", {"op": "node", "node": 0, "nnodes": 2, "nproc": 2,
                          "max_restarts": 3, "say": "ready", "try": 0}, 0.0, m.send)
    assert m.heard == [(7, "refused", None, "node 0's meshrun joined the job already "
                        "(another --node-rank?)")]
    assert "nodes [1] have not said they are ready" in m.tries.closed(2)


def test_a_rank_slow_to_end_after_its_error_is_its_nodes_cause_though_a_stop_came_first() -> None:
    """Rank 2 exits 3 but ends slowly (its mesh closing, a loaded host); node
    0's ranks lost it at once, so node 0's word stops the try here first, and
    meshrun SIGTERMs what is left after the settle: rank 2, ended after that
    (by itself or by the SIGTERM), is still this node's own cause, its error
    recorded before; not node 0's loss of it (else each node blamed the other
    and every meshrun exited 1). Killed by the SIGTERM, its exit is the code
    it recorded, 3, not the signal's 143 (that of a record without one, torch's
    @record's); so is rank 3, which lost it, in the table: its lost peer, not
    the SIGTERM, is why it ended. (tests/test_mesh_netns.py: two hosts)"""
    from mesh.launch.records import JobOutcome, WorkerExit
    from mesh.launch.report import cause, exit_code, format_report
    told = "node 0: rank 0 ended (exit code 1); the try stops on every node"
    records = {2: {"exc_type": "SystemExit", "message": "3", "time": 9.9, "exit_code": 3},
               3: {"exc_type": "LostPeerError", "peer": 2, "message": "rank 3: lost rank 2",
                   "time": 10.0, "exit_code": 1}}
    for code in (3, -15):
        exits = [WorkerExit(3, 1, 103, -15, 10.3, True), WorkerExit(2, 0, 102, code, 10.4, True)]
        outcome = JobOutcome("lost", exits, stop_time=10.2, lost=told, told=True)
        assert cause(outcome, records) == ("rank 2 failed (exit code 3): SystemExit: 3", True)
        assert exit_code(outcome, records) == 3
    assert "\n  rank 3    exit code 1 (failed, a consequence; killed by SIGTERM by meshrun's " \
        "stop as it was exiting); LostPeerError: rank 3: lost rank 2\n" in format_report(
            outcome, records, 2)
    del records[2]["exit_code"]
    assert cause(outcome, records)[0] == "rank 2 failed (killed by SIGTERM): SystemExit: 3"
    assert exit_code(outcome, records) == 143
    records[2]["time"] = 10.25      # (its error came after meshrun's SIGTERM: not its own)
    assert cause(outcome, records) == (told, False) and exit_code(outcome, records) == 1


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), MESH_SECRET="secret-of-the-nodes-test",
                **extra)


def _node(rank: int, port: int | str, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mesh.launch", "--nnodes", "2", "--node-rank", str(rank),
         "--master-addr", "127.0.0.1", "--master-port", str(port), "-n", "1", "--settle", "0.2",
         "--grace", "2", *args], cwd=REPO, env=_env(**env), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def _two_nodes(*args: str, **env: str) -> list[subprocess.Popen[str]]:
    """Node 0's meshrun (on a port of its choosing), then node 1's."""
    node0 = _node(0, 0, *args, **env)
    assert node0.stderr is not None
    line = node0.stderr.readline()
    assert "serves the rendezvous on port" in line, line
    return [node0, _node(1, line.split()[-1], *args, **env)]


def _finish(procs: list[subprocess.Popen[str]], timeout: float = 40) -> list[tuple[str, str]]:
    """Each meshrun's stdout and stderr once it ended; whatever is left, killed."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        _kill(procs)


def _kill(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def _records(out: str) -> list[dict[str, Any]]:
    return [json.loads(line.partition(" ")[2]) for line in out.splitlines()]


def test_a_failure_on_one_node_restarts_the_ranks_of_every_node() -> None:
    """Node 1's first rank fails on try 0 only: both meshruns start their
    ranks again, which see one TORCHELASTIC_RESTART_COUNT, 1, and meet in a
    fresh rendezvous at the same port (only each other: their all_reduce of
    (rank + 1) * (try + 1) sums to 6); both succeed. (2.5 s)"""
    procs = _two_nodes("--max-restarts", "2", str(SCRIPT), "1", "1")
    (out0, err0), (out1, err1) = _finish(procs)
    assert [p.returncode for p in procs] == [0, 0], err0 + err1
    records = _records(out0 + out1)
    tries = {(r["rank"], r["try"]): r["env"] for r in records if "env" in r}
    assert sorted((r["rank"], r["try"], r["sum"]) for r in records if "sum" in r) == [
        (0, 1, 6), (1, 1, 6)]
    assert sorted(tries) == [(rank, t) for rank in range(2) for t in (0, 1)], tries
    for (rank, t), env in tries.items():
        assert env["GROUP_RANK"] == str(rank) and env["MESH_RESTART_COUNT"] == str(t)
        assert env["TORCHELASTIC_MAX_RESTARTS"] == "2"
    assert len({env["MASTER_PORT"] for env in tries.values()}) == 1
    for err in (err0, err1):
        assert err.count("meshrun: starting every rank again (restart 1 of 2: "
                         "TORCHELASTIC_RESTART_COUNT=1) on every node, after node 1: rank 1 "
                         "failed (exit code 1): RuntimeError: rank 1 fails on try 0") == 1, err
        assert "restart 2" not in err, err
    assert "Root cause: rank 1 failed first" in err1


@pytest.mark.parametrize("slow", [False, True], ids=["ends-at-once", "slow-to-end"])
def test_restarts_run_out_on_every_node_naming_the_failing_rank(slow: bool) -> None:
    """Node 1's first rank exits 3 on every try: after --max-restarts 1 both
    meshruns end with its code, 3 (node 0's ranks, which lost it, exit 1),
    naming it; so they do where it is slow to end (its mesh closed, its exit
    handler sleeps): node 0's ranks lost it at once, node 0's word stopped
    the try, and node 1's meshrun SIGTERMed it as it was exiting (they
    said 143, its SIGTERM's, not the 3 it recorded). (3 s each)"""
    procs = _two_nodes("--max-restarts", "1", str(SCRIPT), "1", "9", "0", "3",
                       **({"SLOW_EXIT": "30"} if slow else {}))
    (out0, err0), (out1, err1) = _finish(procs)
    assert [p.returncode for p in procs] == [3, 3], err0 + err1
    if slow:
        assert "exit       : exit code 3 (as it recorded; killed by SIGTERM by meshrun's " \
               "stop as it was exiting)" in err1, err1
    assert sorted((r["rank"], r["try"]) for r in _records(out0 + out1)) == [
        (rank, t) for rank in range(2) for t in (0, 1)]
    for err in (err0, err1):
        assert err.rstrip().endswith(
            "meshrun: no restarts left (--max-restarts 1): the job failed 2 times; exit code "
            "3; the last try failed first on node 1: rank 1 failed (exit code 3): "
            "SystemExit: 3"), err


@pytest.mark.parametrize("signum, victim, mid_call", [
    (signal.SIGKILL, 0, False), (signal.SIGKILL, 1, False), (signal.SIGINT, 1, False),
    (signal.SIGKILL, 0, True), (signal.SIGKILL, 1, True)],
    ids=["node-0-killed", "node-1-killed", "node-1-ctrl-c", "node-0-killed-mid-collective",
         "node-1-killed-mid-collective"])
def test_a_node_whose_meshrun_is_killed_or_stopped_ends_the_job_on_the_other(
        signum: int, victim: int, mid_call: bool) -> None:
    """A node's meshrun SIGKILLed while its ranks and the other node's are
    busy outside mesh calls: the other ends its ranks and the job at once
    (its connection to node 0's, or node 0's to it, closed), naming it (node
    0 by its address), and restarts nothing, and no rank is left (the killed
    meshrun's die with it); so it does after a Ctrl-C there. Where the other
    node's ranks wait for the killed one's in a collective, they fail at
    once, lost peers of another node, and the table says that node's meshrun
    is gone, not that it "reports why" (it said so). (2.5 s each)"""
    settle = ["--settle", "10"] if mid_call else []     # (they fail before: not waited for)
    procs = _two_nodes("--max-restarts", "3", *settle, str(SCRIPT), "9", "0", "60",
                       **({"SLEEP_NODE": str(victim)} if mid_call else {"SAY_SLEEP": "1"}))
    port = procs[1].args[procs[1].args.index("--master-port") + 1]
    try:
        pids = []
        for p in procs:         # (both nodes' ranks are in the job)
            assert p.stdout is not None
            pids += [r["pid"] for r in _records(p.stdout.readline())]
        # outside mesh calls: once both have done their all_reduce (killed as the ranks
        # joined, the other's rank still in it raised a lost peer, as mid_call's do)
        for p in procs if not mid_call else []:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert all("sleeps" in r for r in _records(line)), line
        procs[victim].send_signal(signum)
        other = procs[1 - victim]
        _, err = other.communicate(timeout=40)     # (its ranks sleep 60 s: not waited for)
        _, err_victim = procs[victim].communicate(timeout=40)
    finally:
        _kill(procs)
    assert other.returncode == 1, err
    last = err.rstrip().splitlines()[-1]
    where = f" at tcp://127.0.0.1:{port}" if victim == 0 else ""
    if signum == signal.SIGKILL:
        assert last.startswith(f"meshrun: no restart: node {victim}'s meshrun{where} is "
                               f"gone"), err
    else:
        assert procs[victim].returncode == 130, err_victim
        assert last == f"meshrun: no restart: node {victim}: its meshrun was stopped by " \
                       f"SIGINT", err
    assert "starting every rank again" not in err
    if mid_call:
        assert f"(node {victim}) was lost, a rank of another node (node {victim}'s meshrun" \
               f"{where} is gone (" in err, err
        assert "reports why" not in err, err
    else:
        assert "killed by SIGTERM (stopped by meshrun)" in err, err
    deadline = time.monotonic() + 10
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(alive, pids)), pids
