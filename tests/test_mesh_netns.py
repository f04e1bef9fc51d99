"""Multi-host on one machine: two network namespaces joined by a veth pair,
each with its own address, are two "hosts". One meshrun per namespace runs a
real ``--nnodes 2`` job (2 ranks per host). Ranks on one host talk over
ipc://, across hosts over tcp:// to the other namespace's address (also with
``meshrun --curve``, encrypted), and the
collectives agree with numpy; also over a slowed link (``tc netem`` delay,
or a token-bucket rate limit where the kernel has no netem). The same with
one real ``torchrun --nnodes 2`` per namespace (c10d rendezvous on the first
one's address), whose ranks run a meshrun script and then torch.distributed
code on the "meshrun" backend, the hosts named as Debian names them (a
host's own name is 127.0.1.1 in its /etc/hosts). And a job of two meshruns
with --max-restarts, whose ranks start again on both hosts together after a
failure on one; and one Open MPI mpirun across both (``-x MASTER_ADDR -x
MASTER_PORT``). Skipped with the reason where namespaces
cannot be made; the namespaces are always deleted."""
from __future__ import annotations

import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from proctools import node0_port

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "tests" / "scripts" / "netns_job.py"
TORCH_JOB = REPO / "tests" / "scripts" / "netns_torch_job.py"
P2P_JOB = REPO / "tests" / "scripts" / "netns_p2p_job.py"
BOTH_JOB = REPO / "tests" / "scripts" / "netns_both_job.py"
NODES_JOB = REPO / "tests" / "scripts" / "launch_nodes.py"
ADDR = ["10.77.0.1", "10.77.0.2"]
NAME = ["node0", "node1"]

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def _reap_stale() -> None:
    """Delete the namespaces of test processes that died without their
    exit (a pytest killed by a timeout): each name carries its maker's pid."""
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if len(parts) != 4 or parts[0] != "mesh" or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue                    # (its maker lives: another run's)
        except ProcessLookupError:
            pass
        except OSError:
            continue
        _ip("netns", "del", name)
        shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


class Hosts:
    """Two namespaces with a veth pair between them; deleted on exit (and,
    where a run died before its exit, by the next run)."""

    def __init__(self) -> None:
        tok = secrets.token_hex(3)
        self.ns = [f"mesh-{os.getpid()}-{tok}-0", f"mesh-{os.getpid()}-{tok}-1"]
        self.dev = [f"mr{tok}a", f"mr{tok}b"]

    def __enter__(self) -> "Hosts":
        if shutil.which("ip") is None:
            pytest.skip("no `ip` command (iproute2) to make network namespaces")
        if os.geteuid() != 0:
            pytest.skip("network namespaces need root")
        _reap_stale()
        made = _ip("netns", "add", self.ns[0])
        if made.returncode != 0:
            pytest.skip(f"cannot make a network namespace: {made.stderr.strip()}")
        try:
            self._setup()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _setup(self) -> None:
        steps = [("netns", "add", self.ns[1]),
                 ("link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])]
        for i in (0, 1):
            steps += [("link", "set", self.dev[i], "netns", self.ns[i]),
                      ("-n", self.ns[i], "addr", "add", f"{ADDR[i]}/24", "dev", self.dev[i]),
                      ("-n", self.ns[i], "link", "set", self.dev[i], "up"),
                      ("-n", self.ns[i], "link", "set", "lo", "up")]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                pytest.skip(f"cannot set up namespaces (ip {' '.join(step)}): "
                            f"{done.stderr.strip()}")

    def netns(self, i: int) -> str:
        """Namespace i as /proc/PID/ns/net names it."""
        return f"net:[{os.stat(f'/run/netns/{self.ns[i]}').st_ino}]"

    def slow_down(self) -> str:
        """Slow the link both ways: 10 ms netem delay, or where the kernel
        lacks netem, a 300 Mbit/s token bucket (queueing delay for bulk).
        Returns which, or skips the test with both errors."""
        errors = []
        for name, qdisc in (("netem", ["netem", "delay", "10ms"]),
                            ("tbf", ["tbf", "rate", "300mbit", "burst", "64kb",
                                     "latency", "200ms"])):
            for i in (0, 1):
                done = subprocess.run(["tc", "-n", self.ns[i], "qdisc", "replace", "dev",
                                       self.dev[i], "root", *qdisc],
                                      capture_output=True, text=True, timeout=10)
                if done.returncode != 0:
                    errors.append(f"{name}: {done.stderr.strip()}")
                    break
            else:
                return name
        pytest.skip(f"cannot shape the link with tc: {'; '.join(errors)}")

    def limit(self, rate: str) -> None:
        """Cap the link both ways at ``rate`` (a token bucket, ``tc`` tbf)."""
        for i in (0, 1):
            done = subprocess.run(["tc", "-n", self.ns[i], "qdisc", "replace", "dev",
                                   self.dev[i], "root", "tbf", "rate", rate, "burst", "64kb",
                                   "latency", "200ms"], capture_output=True, text=True, timeout=10)
            if done.returncode != 0:
                pytest.skip(f"cannot shape the link with tc: {done.stderr.strip()}")

    def __exit__(self, *exc: object) -> None:
        for ns in self.ns:      # what a failed job left there (torchrun's workers
            for pid in _ip("netns", "pids", ns).stdout.split():   # have their own sessions)
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)

    def name_hosts(self) -> None:
        """Name the hosts node0 and node1 in each namespace's /etc/hosts (ip
        netns exec mounts /etc/netns/NS/hosts there), as Debian does: a host's
        own name (and the machine's) is 127.0.1.1, the other's its address."""
        for i in (0, 1):
            etc = Path("/etc/netns") / self.ns[i]
            try:
                etc.mkdir(parents=True)
                (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {NAME[i]} "
                                           f"{socket.gethostname()}\n{ADDR[1 - i]} {NAME[1 - i]}\n")
            except OSError as e:
                pytest.skip(f"cannot give the namespaces their own /etc/hosts: {e}")

    def link(self, i: int, state: str) -> None:
        """Set host i's end of the link "up" or "down"."""
        done = _ip("-n", self.ns[i], "link", "set", self.dev[i], state)
        assert done.returncode == 0, done.stderr

    def launch(self, i: int, port: int, out: Path, secret: str,
               curve: bool, job: list[str] | None = None,
               opts: tuple[str, ...] = (), **extra: str) -> subprocess.Popen[str]:
        """Host i's meshrun of the job (``opts``: more of meshrun's options)."""
        env = dict(os.environ, PYTHONPATH=str(REPO), MESH_SECRET=secret, **extra)
        env.pop("MESH_CURVE", None)
        return subprocess.Popen(
            ["ip", "netns", "exec", self.ns[i], sys.executable, "-m", "mesh.launch",
             *(["--curve"] if curve else []),
             "--nnodes", "2", "--node-rank", str(i), "--master-addr", ADDR[0],
             "--master-port", str(port), "-n", "2", "--timeout", "60", *opts,
             *(job or [str(JOB)]), str(out)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _torchrun(hosts: Hosts, script: Path, out: Path) -> None:
    """One torchrun per namespace, c10d rendezvous served by node 0's agent
    on its address; each host gives its name as --local-addr (torchrun's
    default, the FQDN, is this machine's one name in both namespaces)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MESH_", "TORCHELASTIC_", "MASTER_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(REPO), MESH_RENDEZVOUS_TIMEOUT="60", MESH_TIMEOUT="60",
               TMPDIR=str(out))       # (where torchrun leaves its torchelastic_* folder)
    logs = [out / f"torchrun{i}.log" for i in (0, 1)]
    procs = []
    for i in (0, 1):
        with open(logs[i], "w") as log:
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", hosts.ns[i], sys.executable, "-m",
                 "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                 "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{ADDR[0]}:29400",
                 "--rdzv-id", "netns", "--local-addr", NAME[i],
                 *(["--rdzv-conf", "is_host=1"] if i == 0 else []), str(script), str(out)],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 200   # both scripts, one after the other
        for i, p in enumerate(procs):
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            what = "did not end in 200 s" if p.returncode is None else f"exited {p.returncode}"
            assert p.returncode == 0, f"torchrun on node {i} {what}:\n" + \
                logs[i].read_text()[-6000:]
    finally:
        for p in procs:         # the agent stops its workers on SIGTERM
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _reports(out: Path) -> list[dict]:
    return [json.loads((out / f"{r}.json").read_text()) for r in range(4)]


def _both(hosts: Hosts, out: Path, secret: str, curve: bool, job: list[str] | None,
          opts: tuple[str, ...] = (), timeout: float = 60,
          **extra: str) -> tuple[list[subprocess.Popen[str]], list[tuple[str, str]]]:
    """Both hosts' meshruns of the job, node 1 given the port node 0 serves
    on, run to their ends (killed after ``timeout``): the processes, and
    each one's (stdout, stderr)."""
    procs = [hosts.launch(0, 0, out, secret, curve, job, opts, **extra)]
    try:
        port = node0_port(procs[0], 20)
        procs.append(hosts.launch(1, port, out, secret, curve, job, opts, **extra))
        ends = [p.communicate(timeout=timeout) for p in procs]
    finally:
        _stop(procs)
    return procs, ends


def _run_job(hosts: Hosts, out: Path, curve: bool = False, job: list[str] | None = None,
             **extra: str) -> list[dict]:
    procs, ends = _both(hosts, out, secret=secrets.token_hex(16), curve=curve, job=job,
                        timeout=70, **extra)
    for p, (_, err) in zip(procs, ends):
        assert p.returncode == 0, err
    return _reports(out)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    with Hosts() as h:
        yield h


def _check_topology(reports: list[dict], tcp_to: list[str] = ADDR, checked: int = 12) -> None:
    """Ranks 0,1 on node 0 and 2,3 on node 1: two hosts, told apart by
    namespace; within a host ipc://, across to the other's tcp_to."""
    assert reports[0]["host"] == reports[1]["host"] != reports[2]["host"] == reports[3]["host"]
    assert reports[0]["netns"] != reports[2]["netns"]
    for rep in reports:
        r, eps = rep["rank"], rep["endpoints"]
        mine = {0: (0, 1), 1: (0, 1), 2: (2, 3), 3: (2, 3)}[r]
        for peer, ep in enumerate(eps):
            if peer in mine:
                assert ep.startswith("ipc://"), (r, peer, ep)
            else:
                assert ep.startswith(f"tcp://{tcp_to[peer // 2]}:"), (r, peer, ep)
        assert rep["checked"] == checked
        if "hier" in rep:      # netns_job.py: collectives ran in two levels
            assert rep["hier"] == [[0, 1], [2, 3]], rep["hier"]


@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_two_hosts_tcp_across_ipc_within(hosts: Hosts, tmp_path: Path, curve: bool) -> None:
    """2 ranks a host: ipc:// within a host, tcp:// across (--curve: encrypted).
    Plain: then, in the same ranks (netns_both_job.py, a job less), a
    16 MiB array each way between the hosts at once (into out= and a fresh
    array), then small messages after them: the arrays go by the senders'
    plain TCP streams (mesh.streams). (MESH_P2P_STREAM_MIN=0, through ZeroMQ
    as before: the "pieces" case below, and tests/test_mesh_streams.py.)"""
    reports = _run_job(hosts, tmp_path, curve,
                       job=None if curve else [str(BOTH_JOB), str(16 << 20)])
    if not curve:
        p2p = _reports(tmp_path / "p2p")
        assert p2p[0]["endpoints"][2].startswith("tcp://"), p2p[0]
        assert [p2p[r]["streams"] for r in (0, 2)] == [[1, 1], [1, 1]], \
            f"the 16 MiB arrays did not go by the streams: {p2p}"
    _check_topology(reports)
    assert all(rep["curve"] is curve for rep in reports)
    # the ring's links across the hosts ran over plain TCP streams
    # (collectives.host.stream), except under CurveZMQ (they are not encrypted)
    assert all((rep["streams"] > 0) is not curve for rep in reports), reports


def test_collectives_stay_right_over_a_slow_link(hosts: Hosts, tmp_path: Path) -> None:
    how = hosts.slow_down()
    reports = _run_job(hosts, tmp_path)
    _check_topology(reports)
    if how == "netem":
        assert reports[0]["rtt"] >= 0.02, f"netem delay not in effect: rtt {reports[0]['rtt']}"


@pytest.mark.parametrize("stream", ["pieces", "stream"])
def test_a_message_slower_than_the_peer_timeout_arrives(hosts: Hosts, tmp_path: Path,
                                                        stream: str) -> None:
    """One point-to-point array across the hosts that takes twice
    MESH_PEER_TIMEOUT to cross a 96 Mbit/s link, each way at once (rank 0
    to rank 2 into a fresh array, rank 2 to rank 0 into out=): it arrives
    whole, and its sender is not declared lost meanwhile, though its
    heartbeats cannot overtake the message (it travels in pieces, each
    heard; the heartbeats go between them). By stream (mesh.streams) the
    heartbeats go beside it, and each read of the stream is word too."""
    # (an 8 MiB piece in 0.7 s: 1.3 s of the timeout left for a stall, as 1.7 s
    # pieces under a timeout of 3 s left; the message in 4.2 s, twice the timeout)
    hosts.limit("96mbit")
    reports = _run_job(hosts, tmp_path, job=[str(P2P_JOB), str(48 << 20)],
                       MESH_PEER_TIMEOUT="2",
                       MESH_P2P_STREAM_MIN="4M" if stream == "stream" else "0")
    assert reports[0]["endpoints"][2].startswith("tcp://"), reports[0]
    assert min(reports[r]["big"] for r in (0, 2)) > 4, reports    # (longer than the timeout)
    assert reports[0]["streams"] == ([1, 1] if stream == "stream" else [0, 0]), reports


def test_a_send_timing_out_midway_names_what_the_receiver_does(hosts: Hosts,
                                                              tmp_path: Path) -> None:
    """A send in pieces over a slow link that times out says what its
    receiver last said it was doing (waiting in its receive): the receiver's
    heartbeats go between its answers to the pieces, not replaced by them;
    and that the message is still crossing (not that rank 2 is not reading);
    and rank 2's host (its address: one host name) and pid, in the send's
    own words too, as rank 2's word names rank 0's."""
    hosts.limit("200mbit")      # (a piece answered every 0.17 s; 100 MiB in 4 s)
    reports = _run_job(hosts, tmp_path, job=[str(P2P_JOB), str(100 << 20)], PROBE="1")
    error = reports[0]["error"]
    assert "timed out" in error and "it said: waiting" in error, error
    assert re.search(rf"\(rank 2 \(on host {ADDR[1]}, pid \d+\) last heard from ", error), error
    assert re.match(rf"rank 0: send to rank 2 \(on host {ADDR[1]}, pid \d+\) \(tag 4, group "
                    rf"world\) timed out", error), error
    assert re.search(rf"in recv from rank 0 \(on host {ADDR[0]}, pid \d+\) \(tag 4", error), error
    assert "on their way to rank 2" in error or "bytes handed over" in error, error


def test_a_rank_blocked_in_a_slow_send_says_so(hosts: Hosts, tmp_path: Path) -> None:
    """Rank 0 waits in a send of 8 MiB (one message, not in pieces) that
    takes 3.4 s to cross a 20 Mbit/s link to rank 2; rank 1, on rank 0's
    host, times out waiting for rank 0 and says what rank 0 is doing: its
    send, naming rank 2 by its host; rank 1's own receive names rank 0 bare."""
    hosts.limit("20mbit")
    reports = _run_job(hosts, tmp_path, job=[str(P2P_JOB), str(8 << 20)], PROBE="2")
    error = reports[1]["error"]
    assert "timed out" in error and "it said: waiting" in error, error
    assert re.search(rf"in send to rank 2 \(on host {ADDR[1]}, pid \d+\) \(tag 4", error), error
    assert error.startswith("rank 1: recv from rank 0 (tag 4, group world) timed out"), error


@pytest.mark.slow
@pytest.mark.timeout(260)
def test_torchrun_two_hosts(hosts: Hosts, tmp_path: Path) -> None:
    """The same scripts as on one host, unchanged: the meshrun script
    (netns_job.py), then torch.distributed code, in the ranks of one
    torchrun job (netns_torch_job.py), each making its own mesh. Node 0's
    own name is loopback where it runs: its ranks bind tcp:// on every
    address and are reached by that name (not 127.0.0.1) from node 1."""
    pytest.importorskip("torch.distributed", reason="torchrun ships with torch (the test extra)")
    hosts.name_hosts()
    _torchrun(hosts, TORCH_JOB, tmp_path)
    for out, checked in ((tmp_path, 12), (tmp_path / "torch", 4)):
        reports = _reports(out)
        assert [rep["netns"] for rep in reports] == [hosts.netns(i) for i in (0, 0, 1, 1)]
        _check_topology(reports, [NAME[0], ADDR[1]], checked)


def test_mpirun_two_hosts(hosts: Hosts, tmp_path: Path) -> None:
    """README's ``mpirun -H node1:2,node2:2 -x MASTER_ADDR -x MASTER_PORT``
    across the hosts: one mpirun in node 0's namespace starts node 1's
    ranks through an rsh agent that enters node 1's namespace (as ssh
    would reach the host); the meshrun script (netns_job.py) unchanged.
    (torch.distributed under mpirun: test_mesh_launchers.py, one host.)"""
    if shutil.which("mpirun") is None:
        pytest.skip("Open MPI's mpirun is not installed (apt-get install openmpi-bin)")
    agent = tmp_path / "nsrsh"
    agent.write_text("#!/bin/sh\nwhile [ \"${1#-}\" != \"$1\" ]; do shift; done\n"
                     f"case $1 in {ADDR[0]}) ns={hosts.ns[0]};; {ADDR[1]}) ns={hosts.ns[1]};; "
                     "*) exit 1;; esac\nshift\nexec ip netns exec $ns /bin/sh -c \"$*\"\n")
    agent.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MESH_", "TORCHELASTIC_", "MASTER_", "OMPI_", "PMIX_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(REPO), MESH_RENDEZVOUS_TIMEOUT="60", MESH_TIMEOUT="60",
               TMPDIR=str(tmp_path), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    done = subprocess.run(
        ["ip", "netns", "exec", hosts.ns[0], "mpirun", "--mca", "plm_rsh_agent", str(agent),
         "-H", f"{ADDR[0]}:2,{ADDR[1]}:2", "-n", "4", "--oversubscribe", "--bind-to", "none",
         "-x", "PYTHONPATH", "-x", "MESH_RENDEZVOUS_TIMEOUT", "-x", "MESH_TIMEOUT",
         "-x", f"MASTER_ADDR={ADDR[0]}", "-x", "MASTER_PORT=29500",
         sys.executable, str(JOB), str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=80)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = _reports(tmp_path)
    assert [rep["netns"] for rep in reports] == [hosts.netns(i) for i in (0, 0, 1, 1)]
    _check_topology(reports)


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def test_a_host_whose_link_comes_up_late_joins(hosts: Hosts, tmp_path: Path) -> None:
    """Node 1's link is down as its ranks start (no route to MASTER_ADDR),
    up again moments later: its ranks wait for the route, then bind the
    address they reach MASTER_ADDR from (not loopback, where node 0's
    ranks would connect to their own host and find node 1 silent).
    Then, their checks done, the link is cut as they all-reduce (CUT): on
    each host a rank whose phase of the call lost a rank of the other host
    aborts the call on its host's other rank, which raises that relayed
    abort, often before the first one raises its own. Each meshrun's table
    names the lost rank of the other host as the root cause, reported by a
    rank of its own that saw the loss itself (its error is no abort another
    rank sent it: ``aborted: rank 1 of group world: ...``), and the other as
    a consequence: the table named the relayed one, on one host or both, in
    each of five runs. (3 s more)"""
    secret, extra = secrets.token_hex(16), {"CUT": "1", "MESH_PEER_TIMEOUT": "2"}
    procs = [hosts.launch(0, 0, tmp_path, secret, False, **extra)]
    try:
        port = node0_port(procs[0], 20)
        hosts.link(1, "down")
        procs.append(hosts.launch(1, port, tmp_path, secret, False, **extra))
        deadline = time.monotonic() + 5     # (its ranks say they wait for the route)
        while (left := deadline - time.monotonic()) > 0 and procs[1].poll() is None:
            if select.select([procs[1].stderr], [], [], left)[0] and \
                    "cannot reach MASTER_ADDR" in procs[1].stderr.readline():
                break
        hosts.link(1, "up")
        deadline = time.monotonic() + 70
        while (len(list(tmp_path.glob("*.json"))) < 4 and time.monotonic() < deadline
               and all(p.poll() is None for p in procs)):
            time.sleep(0.05)
        hosts.link(0, "down")
        errs = [p.communicate(timeout=70)[1] for p in procs]
    finally:
        _stop(procs)
    _check_topology(_reports(tmp_path))
    for node, err in enumerate(errs):
        assert procs[node].returncode == 1, err
        _saw_the_loss(node, err)


def _saw_the_loss(node: int, err: str) -> None:
    """Node ``node``'s table, its link cut: the root cause a lost rank of the
    other host, reported by a rank here whose error is its own loss, not an
    abort relayed from its host's other rank, which is a consequence."""
    head = re.search(r"Root cause: rank (\d) \(node (\d), on host (\S+), pid \d+\) was lost, a "
                     r"rank of another node .*; rank (\d) here reported it first:\n"
                     r"  error      : LostPeerError: (.*)\n", err)
    assert head and int(head[2]) == 1 - node and head[3] == ADDR[1 - node], err
    assert int(head[4]) // 2 == node, err
    assert not head[5].partition(" aborted: ")[2].startswith("rank "), err
    assert re.search(rf"\n  rank {int(head[4]) ^ 1}    exit code 1 \(failed, a consequence\); "
                     r"LostPeerError: ", err), err


def test_a_host_that_cannot_reach_master_addr_says_so(hosts: Hosts, tmp_path: Path) -> None:
    """Node 1's link stays down: its ranks fail within the rendezvous
    timeout naming MASTER_ADDR and why, not a silent service."""
    secret = secrets.token_hex(16)
    procs = [hosts.launch(0, 0, tmp_path, secret, False, MESH_RENDEZVOUS_TIMEOUT="2")]
    try:
        port = node0_port(procs[0], 20)
        hosts.link(1, "down")
        t = time.monotonic()
        procs.append(hosts.launch(1, port, tmp_path, secret, False,
                                  MESH_RENDEZVOUS_TIMEOUT="2"))
        _, err = procs[1].communicate(timeout=40)
        assert procs[1].returncode != 0 and time.monotonic() - t < 30, err
        assert f"rank 2: cannot reach MASTER_ADDR {ADDR[0]} from this host" in err, err
        assert "Network is unreachable" in err, err
    finally:
        _stop(procs)


def test_a_rank_ended_before_the_mesh_was_complete_is_named_by_its_host(
        hosts: Hosts, tmp_path: Path) -> None:
    """Node 1's rank 2 exits 5 before it joins: node 0's ranks, failed at once
    by the rendezvous, name it with its host (its address: both namespaces
    have one host name) and pid; node 1's rank 3, its own host's, bare. (2 s)"""
    secret, exits = secrets.token_hex(16), {"MESH_TEST_EXIT_BEFORE_INIT": "2:5"}
    job = [str(REPO / "tests" / "scripts" / "launch_mesh.py")]
    procs = [hosts.launch(0, 0, tmp_path, secret, False, job, **exits)]
    try:
        port = node0_port(procs[0], 20)
        procs.append(hosts.launch(1, port, tmp_path, secret, False, job, **exits))
        errs = [p.communicate(timeout=40)[1] for p in procs]
    finally:
        _stop(procs)
    said = "is gone: it ended (exit code 5) before the mesh was complete"
    assert re.search(rf"rank 0: rendezvous at \S+: peer rank 2 \(on host {ADDR[1]}, pid "
                     rf"\d+\) {re.escape(said)}", errs[0]), errs[0]
    assert f"rank 3: rendezvous at tcp://{ADDR[0]}:{port}: peer rank 2 {said}" in errs[1], errs[1]


def test_a_rank_ended_as_the_mesh_starts_is_named_at_once_on_the_other_host(
        hosts: Hosts, tmp_path: Path) -> None:
    """Node 1's rank 2 exits 5 with the rendezvous' table in hand, before
    it links to anyone: node 0's ranks, whose first connects to it are
    refused (its port closed with it), name it at once, where they tried it
    for MESH_PEER_TIMEOUT (set to 60 here: they fail well within it; they
    were stuck in mesh.init until meshrun's --timeout). (3 s)"""
    secret, peer_timeout = secrets.token_hex(16), 60.0
    job = [str(REPO / "tests" / "scripts" / "launch_mesh.py")]
    extra = {"MESH_TEST_EXIT_AFTER_RENDEZVOUS": "2:5", "MESH_PEER_TIMEOUT": str(peer_timeout)}
    t = time.monotonic()
    procs, ends = _both(hosts, tmp_path, secret, False, job, timeout=80, **extra)
    errs = [e for _, e in ends]
    took = time.monotonic() - t
    assert procs[0].returncode != 0 and procs[1].returncode == 5, errs
    # (each says how: "could not be made" where its connects were refused; its link
    # made already, as rank 2's ZeroMQ answered before it died, "closed or was reset")
    assert re.search(rf"\[[01]\] rank [01]: lost peer rank 2 \(on host {ADDR[1]}, pid \d+\): "
                     rf"(this rank's connection to it could not be made|its connection closed)",
                     errs[0]), errs[0]
    assert took < peer_timeout / 2, (took, errs[0])


def _restarting(hosts: Hosts, out: Path, max_restarts: int,
                fail_tries: int) -> list[tuple[int, list[dict], str]]:
    """A job of both hosts' meshruns with --max-restarts whose rank 2 (node
    1's first) exits 3 on each try under ``fail_tries`` (launch_nodes.py):
    each meshrun's exit code, its ranks' records and its stderr."""
    secret = secrets.token_hex(16)
    opts = ("--max-restarts", str(max_restarts))
    job = [str(NODES_JOB), "1", str(fail_tries), "0", "3"]
    procs, ends = _both(hosts, out, secret, False, job, opts)
    return [(p.returncode, [json.loads(line.partition(" ")[2]) for line in o.splitlines()], e)
            for p, (o, e) in zip(procs, ends)]


def test_a_failure_on_one_host_restarts_the_ranks_of_both(hosts: Hosts,
                                                          tmp_path: Path) -> None:
    """--max-restarts 2: rank 2 exits 3 on the first try; both hosts' meshruns
    start their ranks again together, which see TORCHELASTIC_RESTART_COUNT=1
    and meet only each other (their all_reduce of (rank + 1) * (try + 1) sums
    to 20), and the job succeeds on both. (5 s) Node 0's ranks, which lost
    rank 2, name its host (its address: both namespaces have one host name)
    and pid in their errors."""
    ends = _restarting(hosts, tmp_path, 2, 1)
    assert [code for code, _, _ in ends] == [0, 0], [err for _, _, err in ends]
    lost = next(r["pid"] for r in ends[1][1] if r.get("rank") == 2 and "env" in r)
    assert f"rank 2 (on host {ADDR[1]}, pid {lost}) is gone (it failed: SystemExit: 3)" \
        in ends[0][2] or f"world rank 2, on host {ADDR[1]}, pid {lost})" in ends[0][2], ends[0][2]
    for node, (_, records, err) in enumerate(ends):
        ranks = (2 * node, 2 * node + 1)
        started = [r for r in records if "env" in r]
        assert sorted((r["rank"], r["try"]) for r in started) == [
            (rank, t) for rank in ranks for t in (0, 1)], err
        assert sorted((r["rank"], r["try"], r["sum"]) for r in records if "sum" in r) == [
            (rank, 1, 20) for rank in ranks], err
        for r in started:
            assert r["env"]["MESH_RESTART_COUNT"] == str(r["try"]), r
            assert (r["env"]["GROUP_RANK"], r["env"]["MASTER_ADDR"]) == (str(node), ADDR[0])
        assert err.count("meshrun: starting every rank again (restart 1 of 2: "
                         "TORCHELASTIC_RESTART_COUNT=1) on every node, after node 1: rank 2 "
                         "failed (exit code 3): SystemExit: 3") == 1, err
        assert "restart 2" not in err, err


def test_restarts_run_out_on_both_hosts_with_the_failures_code(hosts: Hosts,
                                                               tmp_path: Path) -> None:
    """--max-restarts 1: rank 2 exits 3 on every try; after two tries both
    meshruns end with its code (node 0's ranks, which lost it, exit 1) and
    name it. (5 s) Each table names a rank by its own host as the ranks'
    errors do (its address: both namespaces have one host name), not the
    host name of the meshrun that prints it: rank 2 on node 1's, and node
    0's lost rank 2 too."""
    ends = _restarting(hosts, tmp_path, 1, 9)
    assert [code for code, _, _ in ends] == [3, 3], [err for _, _, err in ends]
    for node, (_, records, err) in enumerate(ends):
        roots = re.findall(r"  rank       : (\d+) \(node (\d), local rank \d, pid \d+, host "
                           r"(\S+)\)", err)
        assert len(roots) == 2 and all(int(r) // 2 == int(n) == node and h == ADDR[node]
                                       for r, n, h in roots), err
        assert not re.search(r"\(node 1\) was lost", err), err      # (it says its host)
        if node == 1:
            assert [r for r, _, _ in roots] == ["2", "2"], err
        assert sorted((r["rank"], r["try"]) for r in records) == [
            (rank, t) for rank in (2 * node, 2 * node + 1) for t in (0, 1)], err
        assert err.rstrip().endswith(
            "meshrun: no restarts left (--max-restarts 1): the job failed 2 times; exit code "
            "3; the last try failed first on node 1: rank 2 failed (exit code 3): "
            "SystemExit: 3"), err


@pytest.mark.parametrize("p2p", [False, True], ids=["all_reduce", "p2p"])
def test_the_two_host_benchmark_runs(hosts: Hosts, p2p: bool) -> None:
    """``python -m collectives.tools.bench_hosts`` (its own namespaces), at
    two small sizes, one pass, meshrun only: it prints its table."""
    done = subprocess.run([sys.executable, "-m", "collectives.tools.bench_hosts", "--sizes",
                           "8,64K", "--per-host", "1", "--passes", "1", "--slow", "0",
                           "--budget", "0.02", "--no-gloo", *(["--p2p"] if p2p else [])],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=80)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| 8 ", "| 64K "))]
    assert len(rows) == 2, done.stdout
    assert ("ping-pong" in done.stdout) is p2p, done.stdout
