"""Dead and hung peers, injected into real jobs at random moments.

Ranks are started the way any launcher starts them (environment variables,
``mesh.init``; forks of mesh.spawn's fork server running the script), with
the rendezvous served here, so that the test and not a supervisor decides
when a rank dies and the survivors live on to report. A
rank is SIGKILLed while everyone is idle, in the middle of a point-to-point
stream, or in the middle of 16 MiB all_reduces (the socket ring and the
same-host path); or SIGSTOPped, so that only heartbeat silence can tell.
Every survivor must raise LostPeerError naming the victim within a bounded
time, and every later operation involving the victim must fail at once.

MESH_FAULT_TRIALS=N repeats each scenario N times; MESH_FAULT_LOG=path
appends one JSON line per trial (the figures in BENCHMARKS.md).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import runpy
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

import collectives
import mesh
from mesh.auth import Authenticator, make_server
from mesh.liveness import Liveness
from mesh.peer import DEAD, Peer
from mesh.rendezvous import RendezvousServer
from mesh.spawn import _fresh_context
from mesh.transport import link, links
from proctools import alive

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "scripts" / "fault_worker.py"
TRIALS = int(os.environ.get("MESH_FAULT_TRIALS", "1"))
DETECT_S = 5.0        # generous: a dead process is seen in ~0.7 s, MESH_PEER_TIMEOUT=2 for hangs
LATER_S = 2.0         # a later operation involving the dead rank fails at once

pytestmark = pytest.mark.timeout(60 * TRIALS)


def _rank(argv: list[str], env: dict[str, str], log: str) -> None:
    """One rank of fault_worker.py, a fork of mesh.spawn's fork server (numpy,
    ZeroMQ and mesh imported there once: a fresh interpreter took 0.6 s of a
    loaded core to import them, 3-4 a job): the environment a launcher gives
    and the script run as python runs it; its output in ``log``."""
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = [str(WORKER), *argv]
    runpy.run_path(str(WORKER), run_name="__main__")


class Job:
    """n ranks of fault_worker.py; always all killed on exit."""

    def __init__(self, tmp: Path, n: int, scenario: str, victim: int, **env: str) -> None:
        self.out, self.n, self.victim = tmp, n, victim
        secret = secrets.token_hex(16)
        self.server = RendezvousServer(n, secret).start()
        base = dict(os.environ, PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(self.server.port), MESH_SECRET=secret, MESH_LAUNCHER="1",
                    WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), **env)
        ctx = _fresh_context()
        self.procs = [ctx.Process(target=_rank, args=(
            [str(tmp), scenario, str(victim)], dict(base, RANK=str(r), LOCAL_RANK=str(r)),
            str(tmp / f"{r}.log"))) for r in range(n)]
        for p in self.procs:
            p.start()

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.dump_stacks()
        for p in self.procs:
            if p.exitcode is None:
                p.kill()
        for p in self.procs:
            p.join(timeout=10)
        self.server.close()
        if exc[0] is not None:
            for r in range(self.n):
                log = self.out / f"{r}.log"
                if log.exists():
                    print(f"--- rank {r}:\n{log.read_text()}", file=sys.stderr)

    def dump_stacks(self) -> None:
        """On a failure, have each live survivor print where it is stuck."""
        for r, p in enumerate(self.procs):
            if r != self.victim and p.exitcode is None:
                os.kill(p.pid, signal.SIGUSR1)
        time.sleep(0.5)

    def wait_files(self, suffix: str, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(f.name.endswith(suffix) for f in self.out.iterdir()) >= count:
                return
            if any(p.exitcode not in (None, 0) for r, p in enumerate(self.procs)
                   if r != self.victim):
                break
            time.sleep(0.01)
        codes = [p.exitcode for p in self.procs]
        raise AssertionError(f"only {sum(f.name.endswith(suffix) for f in self.out.iterdir())} "
                             f"of {count} *{suffix} files after {timeout}s; exit codes {codes}")

    def strike(self, sig: int, delay: float) -> float:
        """Once every rank is communicating, wait ``delay`` and signal the victim."""
        self.wait_files(".ready", self.n, 30)
        time.sleep(delay)
        os.kill(self.procs[self.victim].pid, sig)
        return time.monotonic()

    def reports(self) -> dict[int, dict]:
        self.wait_files(".json", self.n - 1, 30)
        return {r: json.loads((self.out / f"{r}.json").read_text())
                for r in range(self.n) if r != self.victim}


def _check(reports: dict[int, dict], victim: int, struck: float, bound: float) -> list[float]:
    """Every survivor saw LostPeerError naming the victim in time, and every
    later operation failed the same way at once. Returns times to error."""
    times = []
    for rank, rep in reports.items():
        first = rep.get("first")
        assert first is not None, f"rank {rank} finished without an error: {rep}"
        assert first["type"] == "LostPeerError", f"rank {rank}: {first}"
        assert _names(first, victim), f"rank {rank} blames {first['peer']}: {first}"
        took = first["t"] - struck
        assert took < bound, f"rank {rank} took {took:.2f}s to notice: {first}"
        times.append(took)
        assert not rep.get("wrong"), f"rank {rank} saw wrong all_reduce results: {rep}"
        assert rep["state"] == "dead" or not rep["later"], rep
        for later in rep["later"]:
            assert later["type"] == "LostPeerError", f"rank {rank}, after the death: {later}"
            assert _names(later, victim), later
            assert later["took"] < LATER_S, f"rank {rank}: {later}"
    return times


def _names(err: dict, victim: int) -> bool:
    """The error names the victim: LostPeerError.peer (a world rank), or
    where a relayed abort cannot carry it, the text."""
    if err["peer"] is not None:
        return err["peer"] == victim
    return f"rank {victim}" in err["msg"]


def _log(scenario: str, sig: str, n: int, victim: int, delay: float, times: list[float],
         reports: dict[int, dict]) -> None:
    rounds = max((r.get("rounds") or 0) for r in reports.values())
    print(f"{scenario}: {sig} rank {victim} of {n} after {delay:.2f}s ({rounds} rounds): "
          f"errors after {min(times):.2f}-{max(times):.2f}s")
    path = os.environ.get("MESH_FAULT_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"scenario": scenario, "signal": sig, "n": n, "victim": victim,
                                "delay": delay, "rounds": rounds, "times": times}) + "\n")


CASES = {
    "idle": (3, {}),
    "p2p": (3, {}),
    "all_reduce-ring": (4, {"MESH_CMA": "0"}),
    "all_reduce-same-host": (4, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_killed_rank_is_named_on_every_survivor(tmp_path: Path, case: str) -> None:
    n, env = CASES[case]
    scenario = case.split("-")[0]
    for trial in range(TRIALS):
        out = tmp_path / str(trial)
        out.mkdir()
        victim = random.randrange(1, n) if scenario == "p2p" else random.randrange(n)
        delay = random.uniform(0.0, 0.8)
        with Job(out, n, scenario, victim, **env) as job:
            struck = job.strike(signal.SIGKILL, delay)
            reports = job.reports()
        times = _check(reports, victim, struck, DETECT_S)
        _log(case, "SIGKILL", n, victim, delay, times, reports)


def test_killed_rank_mid_pipeline_step(tmp_path: Path) -> None:
    """dp=2 x pp=2 training, 1F1B. A rank blocked on a live partner cannot
    know of the victim, so the failure spreads: a rank that fails leaves, as
    a failed rank does, and its partners fail in turn. Every survivor must
    raise LostPeerError in bounded time, the first error must name the
    victim, and each later one a rank that had already gone."""
    n = 4
    for trial in range(TRIALS):
        out = tmp_path / str(trial)
        out.mkdir()
        victim, delay = random.randrange(n), random.uniform(0.0, 0.8)
        with Job(out, n, "pipeline", victim) as job:
            struck = job.strike(signal.SIGKILL, delay)
            reports = job.reports()
        errors = sorted((rep["first"]["t"], r, rep["first"]) for r, rep in reports.items())
        gone = {victim}
        for t, r, err in errors:
            assert err["type"] == "LostPeerError", (r, err)
            assert err["peer"] in gone, f"rank {r} blames {err['peer']}, not one of {gone}: {err}"
            assert t - struck < 3 * DETECT_S, (r, t - struck, err)
            gone.add(r)
        assert errors[0][2]["peer"] == victim
        _log("pipeline", "SIGKILL", n, victim, delay, [t - struck for t, _, _ in errors], reports)


def test_hung_rank_is_found_by_heartbeat_silence(tmp_path: Path) -> None:
    """A SIGSTOPped rank keeps its connections open: only its silence shows.
    Idle and mid all_reduce: two jobs at once, each waiting out its peer
    timeout (2 s) beside the other (a job each, one after the other, took
    twice the wait)."""
    n, victim = 3, 1
    for trial in range(TRIALS):
        with contextlib.ExitStack() as stack:
            jobs = {}
            for scenario in ("idle", "all_reduce"):
                out = tmp_path / f"{scenario}-{trial}"
                out.mkdir()
                jobs[scenario] = stack.enter_context(Job(
                    out, n, scenario, victim, MESH_PEER_TIMEOUT="2", MESH_HEARTBEAT="0.2"))
            delays = {scenario: random.uniform(0.0, 0.5) for scenario in jobs}
            struck = {scenario: job.strike(signal.SIGSTOP, delays[scenario])
                      for scenario, job in jobs.items()}
            reports = {scenario: job.reports() for scenario, job in jobs.items()}
        for scenario in jobs:
            times = _check(reports[scenario], victim, struck[scenario], 2.0 + DETECT_S)
            assert min(times) >= 1.5, \
                f"{scenario}: noticed a stopped rank before its peer timeout: {times}"
            _log(scenario, "SIGSTOP", n, victim, delays[scenario], times, reports[scenario])


def test_launcher_names_the_killed_rank_as_root_cause(tmp_path: Path) -> None:
    """Under meshrun, a rank SIGKILLed mid all_reduce is the root cause in
    the table, and the whole job is down within a bounded time."""
    n, victim = 3, random.randrange(3)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("MESH_SECRET", None)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "mesh.launch", "-n", str(n), "--grace", "2", str(WORKER),
         str(tmp_path), "all_reduce", str(victim)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("*.ready"))) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(list(tmp_path.glob("*.ready"))) == n, "the job never started"
        time.sleep(random.uniform(0.0, 0.5))
        pid = json.loads((tmp_path / f"{victim}.ready").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        struck = time.monotonic()
        _, err = launcher.communicate(timeout=20)
        took = time.monotonic() - struck
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode == 128 + signal.SIGKILL, err
    assert f"Root cause: rank {victim} failed first" in err, err
    assert "killed by SIGKILL" in err
    assert took < 10, f"the job took {took:.1f}s to come down"
    for r in range(n):
        assert not alive(json.loads((tmp_path / f"{r}.ready").read_text())["pid"])



def _seen_in(reports: list[str], *needles: str) -> bool:
    return any(all(n in m for n in needles) for m in reports)


# the reports each rank must make (and, below, the test asserts it made)
# (rank 2 comes to barrier #1 last: where the others' messages are in already, no wait
# of its own marks it, and its status may still say "not in a mesh call yet")
_R0_ALL_REDUCE = ("all_reduce #2 on group world", "rank 2 [alive", "not in a mesh call")
_R1_ALL_REDUCE = ("rank 0 [alive", "waiting", "all_reduce #2")
_R0_RECV = ("stalled: recv from rank 1 (tag 0, group world)",
            "not in a mesh call; last: all_reduce #2 on group world")


def _stalls(world: mesh.Mesh, tmp: str) -> list[str]:
    """Rank 2 comes late to an all_reduce, rank 1 late to a send: the ranks
    kept waiting report whom they wait for and what it last did, then finish.
    The late ranks come once the reports they wait for are made (each rank
    says so in a file), not after a sleep that a slow machine can outlast."""
    seen: list[str] = []
    wants = {0: [("all_reduce", _R0_ALL_REDUCE), ("recv", _R0_RECV)],
             1: [("all_reduce", _R1_ALL_REDUCE)]}.get(world.rank, [])

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())
            for name, needles in wants:
                if _seen_in(seen[-1:], *needles):
                    Path(tmp, f"{world.rank}.{name}").touch()

    def after(*names: str) -> None:     # (at most 15 s: a report not made fails the asserts)
        deadline = time.monotonic() + 15
        while (not all(Path(tmp, n).exists() for n in names)
               and time.monotonic() < deadline):
            time.sleep(0.02)

    logging.getLogger("mesh.transport").addHandler(Keep())
    collectives.barrier(world)
    if world.rank == 2:
        after("0.all_reduce", "1.all_reduce")
    a = np.full(1 << 16, world.rank + 1.0)
    collectives.all_reduce(world, a, algorithm="ring")
    assert np.all(a == 6.0)
    if world.rank == 1:
        after("0.recv")
        world.send("late", 0)
    if world.rank == 0:
        assert world.recv(1) == "late"
        with pytest.raises(mesh.MeshTimeoutError) as info:
            world.recv(1, tag=7, timeout=1.5)     # (its report comes after 0.4 s of the 1.5)
        seen.append(f"timeout: {info.value}")
        # waitany waits for both peers: its report and error named the first request's
        # alone; a receive from ANY timed out naming no rank at all
        reqs = [world.irecv(1, tag=7), world.irecv(2, tag=7)]
        with pytest.raises(mesh.MeshTimeoutError) as info:
            mesh.waitany(reqs, timeout=1.0)     # (its report comes after 0.4 s)
        seen.append(f"waitany: {info.value}")
        assert all(r.cancel() for r in reqs)
        with pytest.raises(mesh.MeshTimeoutError) as info:
            world.probe(mesh.ANY, tag=7, timeout=0.2)
        seen.append(f"any: {info.value}")
    collectives.barrier(world)
    return seen


def test_stall_reports_name_the_late_rank_and_what_it_last_did(tmp_path: Path) -> None:
    env = {"MESH_STALL_WARN": "0.4", "MESH_HEARTBEAT": "0.1", "MESH_CMA": "0"}
    logs = mesh.spawn(_stalls, 3, str(tmp_path), timeout=60, env=env)
    text = "\n".join(f"[{r}] {m}" for r, ms in enumerate(logs) for m in ms)
    # rank 0 waits for rank 2 (its left neighbour), which is not in any call yet
    assert _seen_in(logs[0], *_R0_ALL_REDUCE), text
    # rank 1 waits for rank 0, which says it is waiting in the same all_reduce
    assert _seen_in(logs[1], *_R1_ALL_REDUCE), text
    # a point-to-point receive names its source and what it is doing
    assert _seen_in(logs[0], *_R0_RECV), text
    timeout = [m for m in logs[0] if m.startswith("timeout: ")]
    assert timeout and "rank 1 last heard from" in timeout[0] and "it said:" in timeout[0], text
    assert "(times out after 1.5s)" in text
    assert not [m for m in logs[2] if "stalled: all_reduce" in m], text
    # waitany's stall report, and its timeout, name every request and peer it waits for
    assert _seen_in(logs[0], "stalled: waitany on 2 requests: recv from rank 1 (tag 7, group "
                    "world); recv from rank 2 (tag 7, group world) has waited",
                    "for rank 1 [alive", "; rank 2 [alive"), text
    late = [m for m in logs[0] if m.startswith("waitany: ")]
    assert late and "recv from rank 1 (tag 7, group world) (rank 1 last heard from " in late[0] \
        and "recv from rank 2 (tag 7, group world) (rank 2 last heard from " in late[0], text
    # a probe from ANY names the ranks that could send, with what each last said
    late = [m for m in logs[0] if m.startswith("any: ")]
    assert late and late[0].startswith("any: rank 0: probe any rank (tag 7, group world) timed "
                                       "out after 0.2s (rank 1 last heard from "), text
    assert "; rank 2 last heard from " in late[0] and "it said: " in late[0], text


def _forks(world: mesh.Mesh) -> list[Any]:
    """A child forked from a rank: its use of the parent's mesh raises (a
    send wrote into the parent's rings, and the peers read garbage); its
    `with` block's exit leaves at once (it waited for goodbyes 30 s); the
    parent's mesh goes on."""
    import collectives as C
    out: list[Any] = []
    posted = world.irecv(1 - world.rank, tag=99)
    for what in ("send", "collective", "test", "waitany", "exit in with"):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            said = "no error"
            try:
                if what == "send":
                    world.send(np.zeros(3), 1 - world.rank, tag=7, timeout=3)
                elif what == "collective":
                    C.all_reduce(world, np.ones(2), timeout=3)
                elif what == "test":    # (a poll reads the socket: the parent's)
                    posted.test()
                elif what == "waitany":     # (it took the refusal for a closing mesh's
                    mesh.waitany([posted], timeout=5)   # and waited out its timeout)
                else:
                    t0 = time.monotonic()
                    with world:
                        pass
                    said = f"left in {time.monotonic() - t0:.1f}s"
            except mesh.MeshError as e:
                said = str(e)
                try:        # (each refusal its own error: no traceback grown call by call)
                    world.send(np.zeros(3), 1 - world.rank, tag=7, timeout=3)
                except mesh.MeshError as again:
                    if again is e or len(traceback.extract_tb(again.__traceback__)) > \
                            len(traceback.extract_tb(e.__traceback__)) + 2:
                        said = "the same error raised again"
            os.write(w, said.encode()[:500])
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            out.append(f.read().decode())
        os.waitpid(pid, 0)
    assert posted.cancel()
    out.append(collectives.all_reduce(world, np.ones(4), timeout=20).tolist())
    world.send(np.full(3, 1.0 + world.rank), 1 - world.rank)
    out.append(world.recv(1 - world.rank, timeout=20).tolist())
    return out


def test_a_forked_child_cannot_use_its_parents_mesh_and_leaves_at_once() -> None:
    for rank, out in enumerate(mesh.spawn(_forks, 2, timeout=60)):
        for said in out[:4]:
            assert said.startswith(f"rank {rank}: this mesh belongs to process ") and \
                "a child forked from it" in said, out
        assert out[4] in ("left in 0.0s", "left in 0.1s"), out
        assert out[5:] == [[2.0] * 4, [2.0 - rank] * 3], out


def _sends_to_a_stopped_peer(world: mesh.Mesh, out: str) -> None:
    """Rank 1 stops (SIGSTOP) before rank 0 sends it two large arrays, which
    it never reads: a direct send's answer never comes, nor does ZeroMQ let
    go of frames for it; once it is found lost, a loop polling test() and a
    waitany end with LostPeerError naming it (they waited for ever, and
    waitany for its timeout); so does the wait of an issend, whose receive
    never comes, and those of a bsend_init's and an rsend_init's start,
    naming their call."""
    if world.rank == 1:
        world.send(os.getpid(), 0, tag=1)
        world.recv(0, tag=2)        # (all of ours went: nothing waits for us to run)
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(60)
        return
    pid = world.recv(1, tag=1)
    world.send(None, 1, tag=2)
    time.sleep(0.3)
    polled = world.isend(np.ones(4 << 20, np.uint8), 1, tag=3)
    waited = world.isend(np.ones(4 << 20, np.uint8), 1, tag=4)
    synced = world.issend(np.ones(2), 1, tag=5)
    modes = [world.bsend_init(np.ones(4 << 20, np.uint8), 1, tag=6),
             world.rsend_init(np.ones(4 << 20, np.uint8), 1, tag=7)]
    mesh.startall(modes)
    said = []
    start = time.monotonic()
    try:
        while not polled.test()[0]:
            if time.monotonic() - start > 20:
                said.append("test() was still False after 20 s")
                break
    except mesh.MeshError as e:
        said.append(f"{type(e).__name__}: {e}")
    try:
        mesh.waitany([waited], timeout=20)
        said.append("waitany returned")
    except mesh.MeshError as e:
        said.append(f"{type(e).__name__}: {e}")
    try:        # a synchronous send it never received (in its ring, or its socket)
        synced.wait(timeout=20)
        said.append("issend's wait returned")
    except mesh.MeshError as e:
        said.append(f"{type(e).__name__}: {e}")
    for p in modes:
        try:
            p.wait(timeout=20)
            said.append("its wait returned")
        except mesh.MeshError as e:
            said.append(f"{type(e).__name__}: {e}")
    said.append(f"{time.monotonic() - start:.1f}")
    os.kill(pid, signal.SIGKILL)
    Path(out, "said").write_text(json.dumps(said))


@pytest.mark.parametrize("env", [{}, {"MESH_SHM": "0"}], ids=["direct", "socket"])
def test_a_polled_send_to_a_lost_peer_ends(tmp_path: Path, env: dict) -> None:
    with pytest.raises(mesh.WorkerError) as err:
        mesh.spawn(_sends_to_a_stopped_peer, 2, str(tmp_path), timeout=50, settle=40,
                   env={"MESH_PEER_TIMEOUT": "2", **env})
    assert err.value.rank == 1
    polled, waited, synced, buffered, ready, took = json.loads(
        Path(tmp_path, "said").read_text())
    for said, tag, verb in ((polled, 3, "send"), (waited, 4, "send"), (synced, 5, "issend"),
                            (buffered, 6, "bsend_init"), (ready, 7, "rsend_init")):
        assert said.startswith(f"LostPeerError: rank 0: {verb} to rank 1 (tag {tag}, group "
                               f"world) failed: peer rank 1 is gone (silent for "), said
    assert float(took) < 15, took


def _closes_after_a_peer_died(world: mesh.Mesh, out: str) -> None:
    """Rank 1 is SIGKILLed; rank 0, having learnt of it from the process
    table alone (as a same-host collective does, reading the peer's memory),
    closes its mesh at once and writes what its close logged of rank 1.
    Rank 2 waits on rank 0 alone (a receive from rank 1's death does not
    fail) and writes the error rank 0's goodbye gives it."""
    if world.rank == 2:
        try:
            world.recv(0)
            got = "received"
        except mesh.LostPeerError as e:
            got = f"{e.peer} {e}"
        Path(out, "rank2").write_text(got)
        return
    if world.rank == 1:
        world.send(os.getpid(), 0)
        world.recv(0)       # (its pid has reached rank 0: killed, it takes nothing with it)
        os.kill(os.getpid(), signal.SIGKILL)
    said: list[str] = []        # (from the start: the watch may see the death first)
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("mesh.transport").addHandler(handler)
    pid = world.recv(1)
    world.send(None, 1)
    deadline = time.monotonic() + 20
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.002)
    start = time.monotonic()
    world.close()
    Path(out, "said").write_text(json.dumps([f"{time.monotonic() - start:.2f}", *said]))


def test_a_rank_closes_at_once_after_a_same_host_peer_died(tmp_path: Path) -> None:
    """A close waits for every live peer's goodbye; a peer whose connection
    closed was given half a second's grace (a reconnect) before it counted
    as lost, and what was queued to it lingered 0.2 s more in the context's
    term(): a rank whose peer had crashed took 0.7-0.9 s to leave (the
    survivors of test_tcp_and_file_init_no_thread_left_and_a_dead_rank_fails_ddp
    among them). A same-host peer whose process has exited is lost at once:
    the close neither waits for it nor sends it its goodbye.

    Its goodbye names that lost peer, the root cause: rank 2, waiting on
    rank 0, raised naming rank 0 (``.peer`` 0, "it closed its mesh"), where
    rank 0 had closed on catching rank 1's loss before rank 2 saw it (4
    ranks on two fake hosts, kill -9 of one mid all_reduce: a survivor
    blamed another)."""
    with pytest.raises(mesh.WorkerError) as err:
        mesh.spawn(_closes_after_a_peer_died, 3, str(tmp_path), timeout=60, settle=20)
    assert err.value.rank == 1
    took, *said = json.loads(Path(tmp_path, "said").read_text())
    lost = [s for s in said if s.startswith("rank 0: lost peer rank 1: ")]
    assert lost, said
    # seen by the close; or, rank 0 held off its core half a second before it
    # closed, by the watch, and then the close had nothing to wait for
    assert ("its process " in lost[0] and ("gone" in lost[0] or "zombie" in lost[0])
            or "connection closed" in lost[0] and float(took) < 0.3), said
    got = Path(tmp_path, "rank2").read_text()
    assert got.startswith("1 rank 2: recv from rank 0 (tag 0, group world) failed: peer rank 0 "
                          "is gone (it closed its mesh after it lost world rank 1)"), got


def _coordinator_goes_on(world: mesh.Mesh, out: str) -> None:
    """README's work queue that outlives a worker: rank 1 fails; rank 0's
    receives from ANY fail for good, but an irecv per worker under waitany
    raises once for the lost one and then gives the others', and ANY on a
    group of the ranks left works. Rank 0 writes what it saw."""
    if world.rank == 1:
        world.recv(0, tag=9, timeout=30)
        raise RuntimeError("worker bug")
    if world.rank == 2:
        world.recv(0, tag=9, timeout=30)
        left = world.group([0, 2])
        assert left is not None
        world.send("by name", 0, tag=1)
        left.send("from ANY", 0, tag=1)
        world.recv(0, tag=9, timeout=30)
        return
    seen: list[Any] = []
    reqs = [world.irecv(1, tag=1), world.irecv(2, tag=1)]
    world.send("go", 1, tag=9)
    try:
        mesh.waitany(reqs, timeout=30)
    except mesh.LostPeerError as e:
        seen.append(e.peer)
    for _ in range(2):
        try:
            world.recv(mesh.ANY, tag=1, timeout=30)
        except mesh.LostPeerError as e:
            seen.append(e.peer)
    # a loop polling for the lost worker's word ends too (iprobe gave None for ever)
    for poll in (lambda: world.iprobe(mesh.ANY), lambda: world.iprobe(1, tag=1),
                 lambda: world.improbe(1, tag=1)):
        try:
            seen.append(f"polled: {poll()}")
        except mesh.LostPeerError as e:
            seen.append(e.peer)
    left = world.group([0, 2])
    assert left is not None
    seen.append(left.iprobe(mesh.ANY, tag=1))
    world.send("go", 2, tag=9)
    seen.append(mesh.waitany(reqs, timeout=30))
    seen.append(left.recv(mesh.ANY, tag=1, timeout=30))
    world.send("done", 2, tag=9)
    Path(out, "seen").write_text(json.dumps(seen))


def test_a_coordinator_goes_on_without_a_lost_worker(tmp_path: Path) -> None:
    with pytest.raises(mesh.WorkerError) as err:
        mesh.spawn(_coordinator_goes_on, 3, str(tmp_path), timeout=60, settle=20)
    assert err.value.rank == 1
    assert json.loads(Path(tmp_path, "seen").read_text()) == \
        [1, 1, 1, 1, 1, 1, None, [1, "by name"], "from ANY"]


def _waits_on_a_peer_dead_unseen(world: mesh.Mesh, out: str) -> None:
    """Rank 1 is SIGKILLed while rank 0 waits to receive from it, rank 0's
    watch blind to its sockets to the peers (their events read and dropped:
    as where ZeroMQ had not made the connection yet when the peer died, which
    then tells nothing). Rank 0 writes what its receive raised."""
    if world.rank == 1:
        world.send(os.getpid(), 0)
        world.recv(0)       # (rank 0's watch is blind by now)
        os.kill(os.getpid(), signal.SIGKILL)
    live = world._t.live
    seen = live.on_monitor

    def blind(mon: zmq.Socket) -> None:
        if live.monitors[mon] is None:      # (the router's: strangers)
            seen(mon)
            return
        while True:
            try:
                mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return

    live.on_monitor = blind     # type: ignore[method-assign]
    pid = world.recv(1)
    world.send(None, 1)
    try:
        world.recv(1, timeout=8)
        got = "received"
    except mesh.MeshError as e:
        got = f"{type(e).__name__}: {e}"
    Path(out, "said").write_text(json.dumps([pid, got]))


def test_a_same_host_peer_dead_unseen_by_its_connection_is_lost_by_its_process(
        tmp_path: Path) -> None:
    """A same-host peer's death is seen as its connection closes; where
    ZeroMQ had not made the connection to it yet (under load: two meshruns
    on one host, node 1's killed 0.3 s after its rank joined), no event
    came, and its silence alone found it lost, after the peer timeout (10
    s): the other node's meshrun, settling 10 s, stopped its rank first,
    whose report then had no root cause (1 round in 9 of
    test_mesh_launch_nodes.py at load 20-40). A same-host peer silent for
    two heartbeats whose process has exited is now lost then; here the
    receive, given 8 s and a peer timeout of 30 s, timed out before."""
    with pytest.raises(mesh.WorkerError) as err:
        mesh.spawn(_waits_on_a_peer_dead_unseen, 2, str(tmp_path), timeout=60, settle=20,
                   env={"MESH_PEER_TIMEOUT": "30"})
    assert err.value.rank == 1
    pid, got = json.loads(Path(tmp_path, "said").read_text())
    assert got.startswith("LostPeerError: rank 0: recv from rank 1 (tag 0, group world) failed: "
                          f"peer rank 1 is gone (its process {pid} "), got
    assert got.endswith(("is gone)", "has exited (a zombie))")), got


def test_the_watch_looks_up_a_silent_same_host_peer_in_the_process_table(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The watch's tick, without a process: a same-host peer silent past two
    heartbeats (1 s here) whose process has exited is lost, naming its
    process; one that runs is not, nor one heard from lately, nor after this
    rank's goodbye (its close looks then)."""
    monkeypatch.delenv("MESH_PEER_TIMEOUT", raising=False)
    monkeypatch.delenv("MESH_HEARTBEAT", raising=False)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    lost: list[tuple[int, str, int]] = []

    class _Inbox:
        def peer_gone(self, rank: int, why: str, state: int, told: bool = False) -> None:
            lost.append((rank, why, state))

    peers = [Peer(0, None, None), Peer(1, object(), None), Peer(2, object(), None)]
    live = Liveness(0, 60.0, peers, {}, _Inbox(), lambda *a, **k: None,  # type: ignore[arg-type]
                    None, {1: child.pid, 2: os.getpid()})   # type: ignore[arg-type]
    now = time.monotonic()
    for p in peers:
        p.last_heard = p.last_sent = now - 0.5
    live.tick(now)
    live.leaving = True
    live.tick(now + 0.9)
    assert lost == []
    live.leaving = False
    live.tick(now + 0.95)
    assert lost == [(1, f"its process {child.pid} is gone", DEAD)]


def _closes_as_a_peer_of_another_node_exits(world: mesh.Mesh, folder: str) -> str:
    """Rank 0 plays a rank of node 0 under meshrun, rank 1 one of node 1.
    Rank 1 stops (no answer to rank 0's goodbye); once rank 0's goodbye is
    out, its close finds rank 1's process gone (as if it had exited, its
    own goodbye not read yet): what a loaded machine made of a clean end."""
    if world.rank == 1:
        world.send(os.getpid(), 0)
        world.recv(0)       # (its pid is in: the stop stops its sockets' thread too)
        os.kill(os.getpid(), signal.SIGSTOP)
        return ""
    pid = world.recv(1)
    world.send(None, 1)
    os.environ.update(MESH_RUNTIME_DIR=folder, MESH_NODE_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.pop("MESH_LAUNCHER_SEAL", None)      # (described by hand, as it says)
    t = world._t
    t.live.exited = lambda r: f"its process {pid} is gone" if t.inbox.closed and r == 1 \
        else None
    world.close()
    Path(folder).with_suffix(".state").write_text(t.peer_state(1))
    os.kill(pid, signal.SIGCONT)
    return ""


def test_a_closing_rank_tells_its_launcher_of_no_lost_peer(tmp_path: Path) -> None:
    """A rank that has said goodbye and finds a peer of another node gone
    (its close's look for exited same-host peers, before that peer's goodbye
    was read) left a "lost" note for its node's meshrun, which then failed
    a job whose every rank had finished (two launchers on one host, under
    load: "rank 2 of node 1 was lost (rank 0 here: its process ... is
    gone)", exit code 1). Its peers' exits are expected by then: their own
    launchers report how they ended."""
    folder = tmp_path / "run"
    folder.mkdir()
    mesh.spawn(_closes_as_a_peer_of_another_node_exits, 2, str(folder), timeout=60)
    # (the close took rank 1 for gone: else the check below is void)
    assert (tmp_path / "run.state").read_text() == "dead"
    assert sorted(p.name for p in folder.iterdir()) == [], "a lost note for a clean end"


def _reset_links(world: mesh.Mesh) -> int:
    """Reset, as a network would, the ZeroMQ links between this rank and
    the others (its connections to their endpoints and theirs to its own),
    under ZeroMQ's feet: each socket shut down, then closed with RST as
    ZeroMQ closes it. How many it reset."""
    ends = set()
    for ep in world.endpoints:
        kind, where = ep.split("://", 1)
        ends.add(int(where.rsplit(":", 1)[1]) if kind == "tcp" else where)
    n = 0
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            s = socket.socket(fileno=fd)
        except OSError:     # (not a socket, or gone)
            continue
        try:
            if s.type != socket.SOCK_STREAM or s.family not in (
                    socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
                continue
            try:
                names = [s.getsockname(), s.getpeername()]
            except OSError:     # (a listener)
                continue
            if s.family == socket.AF_UNIX:      # (the abstract namespace's: "@name")
                names = [f"@{a[1:].decode()}" if isinstance(a, bytes) else a for a in names]
            else:
                names = [a[1] for a in names]
            if ends & set(names):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
                n += 1
        finally:
            s.detach()
    return n


def _through_a_reset(world: mesh.Mesh) -> list:
    """Rank 0 streams numbered arrays to rank 1 (an answer every 50), and
    at the 200th resets both links between them (``_reset_links``). What
    each says: the numbers it missed, then how it ended."""
    said: list = []
    i = 0
    try:
        while i < 400:
            if world.rank == 0:
                if i == 200:
                    said.append(f"reset {_reset_links(world)}")
                world.send(np.full(1024, i), 1)
                if i % 50 == 49:
                    world.recv(1, timeout=20)
            else:
                x = world.recv(0, timeout=20)
                if x[0] != i:
                    said.append(f"took {x[0]} for {i}")
                    i = int(x[0])
                if i % 50 == 49:
                    world.send(None, 0)
            i += 1
        said.append("done")
    except mesh.MeshError as e:
        said.append(f"{type(e).__name__} {getattr(e, 'peer', None)}: {e}")
    return said


@pytest.mark.parametrize("env", [{"MESH_FORCE_TCP": "1"}, {"MESH_SHM": "0"}],
                         ids=["tcp", "ipc"])
def test_a_reset_link_fails_both_ranks_naming_the_peer_and_loses_nothing_silently(
        env: dict) -> None:
    """A connection between two ranks on different hosts reset mid-job (a
    firewall or NAT dropping its state, ``ss -K``): ZeroMQ made it again
    within 100 ms, the peer was not declared lost, and what was in flight
    was lost without an error (seen across two network namespaces: the
    receiver took the sender's next array in the place of one lost). A link
    is made once now: both ranks fail with LostPeerError naming the other,
    and what the receiver took before that came in order. The same over
    ipc:// (where only a peer's exit closes a connection)."""
    got = mesh.spawn(_through_a_reset, 2, timeout=60, env=env)
    for rank, said in enumerate(got):
        assert said[-1].startswith(f"LostPeerError {1 - rank}: rank {rank}: "), got
        assert "connection" in said[-1] and ("closed" in said[-1] or "reset" in said[-1]), got
        assert said[:-1] == (["reset 2"] if rank == 0 else []), got


def test_a_first_connect_that_fails_is_tried_again_until_the_link_is_made(
        tmp_path: Path) -> None:
    """A peer's first connect that fails (its listener not there yet: its
    ipc:// path not bound, its process alive) is tried again on a new link
    (mesh.transport.links), and the link made 0.3 s later carries what is
    sent: nothing had crossed before it. A link ZeroMQ made once was not
    made again, and liveness lost the peer half a second later. A peer
    whose TCP port refuses connections (its listener, bound before it
    joined the rendezvous, closed: its process ended; it was tried for
    the whole limit, MESH_PEER_TIMEOUT, where it was on another host) and
    one on this host whose process is gone are handed over failed at
    once, well within the limit: liveness then loses both (its half
    second)."""
    lost: list[tuple[int, str]] = []

    class _Inbox:
        def peer_gone(self, rank: int, why: str, state: int, told: bool = False) -> None:
            lost.append((rank, why))

    ctx = zmq.Context()
    authenticator = Authenticator(ctx, "s", False)
    socks: list[zmq.Socket] = []
    hold = socket.socket()      # (bound, not listening: a connect is refused)
    made: list[Any] = []
    gone = subprocess.Popen(["true"])
    gone.wait()
    late = ctx.socket(zmq.ROUTER)
    socks.append(late)
    late.setsockopt(zmq.LINGER, 0)
    make_server(late, "s", False)
    try:
        hold.bind(("127.0.0.1", 0))
        path = f"ipc://{tmp_path}/late.sock"

        def listen_late() -> None:
            time.sleep(0.3)
            late.bind(path)
        binder = threading.Thread(target=listen_late)
        binder.start()
        eps = ["", path, f"tcp://127.0.0.1:{hold.getsockname()[1]}",
               f"ipc://{tmp_path}/gone.sock"]
        t0 = time.monotonic()
        limit = 30.0
        made, failed = links(ctx, 0, eps, "s", False, [0, os.getpid(), 0, gone.pid], limit)
        binder.join()
        assert time.monotonic() - t0 < limit / 2
        assert made[0] is None and all(m is not None for m in made[1:]), made
        assert failed == {2: zmq.EVENT_CLOSED, 3: zmq.EVENT_CLOSED}, failed
        made[1][0].send(b"one")
        assert late.poll(10000) and late.recv_multipart() == [b"0", b"one"]
        peers = [Peer(0, None, None)] + [Peer(r, *made[r]) for r in (1, 2, 3)]
        live = Liveness(0, 60.0, peers, {}, _Inbox(), lambda *a, **k: None,  # type: ignore
                        None, {})   # type: ignore[arg-type]
        for r, event in failed.items():
            live.on_link(peers[r], event)
        for p in peers[1:]:
            while p.monitor.poll(100):
                live.on_monitor(p.monitor)
        now = time.monotonic()
        live.tick(now + 0.6)
        assert [r for r, _ in lost] == [2, 3], lost
        assert all(why.startswith("this rank's connection to it could not be made")
                   for _, why in lost), lost
    finally:
        for m in made[1:]:
            if m is not None:
                socks += list(m)
        for s in socks:
            s.close(linger=0)
        hold.close()
        authenticator.close()
        ctx.term()


def test_a_peer_link_is_made_once_and_its_break_or_failed_connect_loses_the_peer() -> None:
    """A peer's link (mesh.transport.link), its connection closed under it,
    is not made again: a peer listening there anew gets nothing, and a send
    finds no connection at once (ZeroMQ made it again within 100 ms and sent
    on, what the drop lost taken by nobody). Liveness declares the peer
    lost half a second after the close, or after a connect that failed (one
    ZeroMQ tried again for ever, the peer left to its silence)."""
    lost: list[tuple[int, str]] = []

    class _Inbox:
        def peer_gone(self, rank: int, why: str, state: int, told: bool = False) -> None:
            lost.append((rank, why))

    ctx = zmq.Context()
    authenticator = Authenticator(ctx, "s", False)
    socks: list[zmq.Socket] = []
    free = socket.socket()
    try:
        def router() -> tuple[zmq.Socket, int]:
            r = ctx.socket(zmq.ROUTER)
            r.setsockopt(zmq.LINGER, 0)
            make_server(r, "s", False)
            socks.append(r)
            return r, r.bind_to_random_port("tcp://127.0.0.1")

        far, port = router()
        free.bind(("127.0.0.1", 0))     # (bound, not listening: a connect is refused)
        made = [link(ctx, 0, f"tcp://127.0.0.1:{p}", "s", False) for p in
                (port, free.getsockname()[1])]
        socks += [s for pair in made for s in pair]
        peers = [Peer(0, None, None), Peer(1, made[0][0], made[0][1]),
                 Peer(2, made[1][0], made[1][1])]
        live = Liveness(0, 60.0, peers, {}, _Inbox(), lambda *a, **k: None,  # type: ignore
                        None, {})   # type: ignore[arg-type]
        made[0][0].send(b"one")
        assert far.poll(10000) and far.recv_multipart() == [b"0", b"one"]
        far.close(linger=0)
        socks.remove(far)
        for p in peers[1:]:     # (the made link's handshake told first)
            while not p.suspect_since and p.monitor.poll(10000):
                live.on_monitor(p.monitor)
            assert p.suspect_since, p.rank
        again = ctx.socket(zmq.ROUTER)
        socks.append(again)
        make_server(again, "s", False)
        again.bind(f"tcp://127.0.0.1:{port}")
        with pytest.raises(zmq.Again):     # (once the dropped pipe is let go of: soon)
            for _ in range(1000):
                made[0][0].send(b"two")
                time.sleep(0.01)
        now = time.monotonic()
        live.tick(now)
        assert lost == []
        live.tick(now + 0.6)
        assert [r for r, _ in lost] == [1, 2], lost
        assert lost[0][1].startswith("its connection closed or was reset: its process exited "
                                     "or crashed, or the network dropped the connection"), lost
        assert lost[1][1].startswith("this rank's connection to it could not be made"), lost
        assert not again.poll(300), "the link was made again"
    finally:
        for s in socks:
            s.close(linger=0)
        free.close()
        authenticator.close()
        ctx.term()
