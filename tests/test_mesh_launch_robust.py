"""meshrun robustness beyond tests/test_mesh_launch.py: jobs that share a host
and even a rendezvous address never mix (another job's secret is refused),
and a multi-host job whose other node never comes up ends within the
rendezvous timeout, naming the ranks that never arrived."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MESH_SCRIPT = REPO / "tests" / "scripts" / "launch_mesh.py"

pytestmark = pytest.mark.timeout(60)


def _start(*args: str, **env: str) -> subprocess.Popen[str]:
    full = dict(os.environ, PYTHONPATH=str(REPO), **env)
    return subprocess.Popen([sys.executable, "-m", "mesh.launch", *args], cwd=REPO, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _node(rank: int, port: int | str, *extra: str) -> tuple[str, ...]:
    return ("--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
            "--master-port", str(port), "-n", "2", *extra, str(MESH_SCRIPT))


def _end(procs: list[subprocess.Popen[str]]) -> None:
    """Whatever a test left running, killed and reaped."""
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()


def _second_node_joins(procs: list[subprocess.Popen[str]], port: str, secret: str) -> str:
    """Node 1 launched right joins the job node 0 waits in, and both succeed;
    returns node 0's stderr."""
    node1 = _start(*_node(1, port), MESH_SECRET=secret)
    procs.append(node1)
    _, err1 = node1.communicate(timeout=40)
    out0, err0 = procs[0].communicate(timeout=40)
    assert procs[0].returncode == 0 and node1.returncode == 0, err0 + err1
    assert "[0] rank 0 heard from [1, 2, 3]" in out0
    return err0


def _port(node0: subprocess.Popen[str]) -> str:
    assert node0.stderr is not None
    line = node0.stderr.readline()
    assert "serves the rendezvous on port" in line, line
    return line.split()[-1]


def test_nodes_of_another_job_or_world_size_fail_at_once_and_the_job_goes_on() -> None:
    """Job B waits for its second node. A node of job A (another secret)
    pointed at B's rendezvous is refused and fails on its own, at once; a
    node of B launched with -n 3 against node 0's -n 2 (its ranks are of a
    world of 6, node 0's of 4) fails at once naming the disagreement, and
    node 0 says so as it waits; then B's real second node joins and B
    succeeds. (One job for both strangers: a job less.)"""
    procs = [_start(*_node(0, 0), MESH_SECRET="secret-of-job-b")]
    try:
        port = _port(procs[0])
        stray = _start(*_node(1, port), MESH_SECRET="secret-of-job-a",
                       MESH_RENDEZVOUS_TIMEOUT="2")
        procs.append(stray)
        _, err = stray.communicate(timeout=30)
        assert stray.returncode == 1, err
        assert "refused our credentials: a different job secret" in err, err
        assert procs[0].poll() is None, "job B died of a stranger's attempt"
        wrong = _start("--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1",
                       "--master-port", port, "-n", "3", str(MESH_SCRIPT),
                       MESH_SECRET="secret-of-job-b")
        procs.append(wrong)
        _, err1 = wrong.communicate(timeout=40)
        assert wrong.returncode == 1, err1
        assert "of world 6" in err1 and "cannot join a job of world size 4" in err1, err1
        # named by its host and the address it came from (it said "on vm|net:[4026532239]")
        assert re.search(r"rank \d of world 6 \(pid \d+ on host [^|,()]+, from 127\.0\.0\.1\)",
                         err1), err1
        assert "the launchers disagree on the world size (-n, --nnodes)" in err1, err1
        assert procs[0].stderr is not None
        said = read = ""
        while "the rendezvous refused a join" not in said:
            said = procs[0].stderr.readline()
            assert said, "node 0 ended without saying it refused the node of world 6"
            read += said
        assert "of world 6" in said and "ranks [2, 3]" in said, said
        assert procs[0].poll() is None, "node 0 died of node 1's mistake"
        err0 = read + _second_node_joins(procs, port, "secret-of-job-b")
        # (node 0's meshrun says the refusal is its own, not bare among the ranks' lines)
        assert "\nmeshrun: refused a connection from 127.0.0.1 without the job secret" in \
            "\n" + err0, err0
    finally:
        _end(procs)


def test_a_missing_node_ends_the_job_within_the_rendezvous_timeout() -> None:
    t0 = time.monotonic()
    node0 = _start(*_node(0, 0), MESH_SECRET="lonely", MESH_RENDEZVOUS_TIMEOUT="2")
    try:
        _port(node0)
        _, err = node0.communicate(timeout=30)
    finally:
        _end([node0])
    assert node0.returncode == 1, err
    # (node 1's ranks; node 0's own too where the load kept one of them from joining in 2 s:
    # rank 1 named [0, 2, 3] where rank 0's interpreter started that late)
    assert re.search(r"ranks \[(0, )?(1, )?2, 3\] never arrived", err) \
        and "Root cause: rank" in err, err
    assert time.monotonic() - t0 < 20


def test_a_reader_that_stops_reading_cannot_stall_teardown(tmp_path) -> None:
    """meshrun's own stdout is a pipe nobody reads: --timeout must still fire
    (and meshrun give up the output: after --output-stall, 5 s by default)."""
    script = tmp_path / "spew.py"
    script.write_text("import sys, time\nsys.stdout.write(('x' * 99 + '\\n') * 200000)\n"
                      "sys.stdout.flush()\ntime.sleep(60)\n")
    r, w = os.pipe()   # never read from r
    start = time.monotonic()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mesh.launch", "-n", "2", "--timeout", "2",
                                 "--output-stall", "0.5", str(script)], stdout=w,
                                stderr=subprocess.DEVNULL, cwd=REPO)
        os.close(w)
        code = proc.wait(timeout=30)
    finally:
        os.close(r)
    assert code == 124
    assert time.monotonic() - start < 20



def test_a_reader_that_goes_away_stops_the_job_as_sigpipe_would(tmp_path) -> None:
    """``meshrun -n 2 script.py | head -1``: once the reader has closed its
    end, the ranks are stopped and meshrun exits 141 (128+SIGPIPE, as a
    program writing to the pipe would end) without a report or traceback;
    it wrote on to no one until the ranks ended (here never: --timeout),
    and does not start them again (--max-restarts)."""
    script = tmp_path / "spew.py"
    script.write_text("import os, time\n"
                      f"open(os.path.join({str(tmp_path)!r}, os.environ['RANK']), 'w')"
                      ".write(str(os.getpid()))\n"
                      "while True:\n    print('x' * 99, flush=True)\n    time.sleep(0.001)\n")
    proc = subprocess.Popen([sys.executable, "-m", "mesh.launch", "-n", "2", "--timeout", "30",
                             "--max-restarts", "1", str(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert proc.stdout is not None and proc.stdout.readline().endswith(b"x\n")
        proc.stdout.close()        # (head -1 exits)
        t0 = time.monotonic()
        err = proc.communicate(timeout=20)[1].decode()
        took = time.monotonic() - t0
    finally:
        _end([proc])
    assert proc.returncode == 128 + signal.SIGPIPE, err
    assert err == "" and took < 10, (took, err)
    pids = [int((tmp_path / r).read_text()) for r in "01" if (tmp_path / r).exists()]
    assert pids and not [p for p in pids if os.path.exists(f"/proc/{p}")], "ranks outlived it"


def test_a_slow_reader_gets_all_the_output(tmp_path) -> None:
    """The ranks end long before the reader of meshrun's stdout reads (a
    pager, a busy tee): meshrun writes on while it takes the output, and
    until then lost all but a pipe's worth a second after the last exit."""
    script = tmp_path / "spew.py"
    script.write_text("import os, sys\nsys.stdout.write(('x' * 99 + '\\n') * 20000)\n"
                      "sys.stdout.flush()\n"
                      f"open(os.path.join({str(tmp_path)!r}, os.environ['RANK']), 'w')\n")
    proc = subprocess.Popen([sys.executable, "-m", "mesh.launch", "-n", "2", str(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        # the ranks are done (each wrote its file: a fixed 3 s was waited before), and
        # meshrun's second of reading after the last exit is past; nothing is read yet
        deadline = time.monotonic() + 30
        while not all((tmp_path / r).exists() for r in "01"):
            assert time.monotonic() < deadline and proc.poll() is None, "the ranks never ended"
            time.sleep(0.02)
        time.sleep(1.5)
        out, err = proc.communicate(timeout=30)
    finally:
        _end([proc])
    assert proc.returncode == 0, err
    assert out.count(b"\n") == 40000, (out.count(b"\n"), err[-2000:])


def test_a_reader_slower_than_the_ranks_loses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank writes faster than meshrun's reader reads, which never stops
    for long: once the relay's cap waits (here 1 MiB, 64 MiB in meshrun)
    the rank waits in its writes, as under a slow reader of its own; past
    the cap the output was dropped (19 MB of a rank's quick 112 MB with a
    reader that never paused for 5 ms). In this process, on the Job."""
    import threading
    from mesh.launch import relay
    from mesh.launch.records import WorkerSpec
    from mesh.launch.supervise import Job
    monkeypatch.setattr(relay, "_SINK_MAX", 1 << 20)
    r, w = os.pipe()
    got: list[bytes] = []

    def read() -> None:         # 64 KiB every 5 ms: slower than the rank writes
        while True:
            data = os.read(r, 1 << 16)
            if not data:
                return
            got.append(data)
            time.sleep(0.005)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    spew = "import sys\nsys.stdout.write(('x' * 99 + '\\n') * 60000)\n"    # 6 MB
    with os.fdopen(w, "wb") as out:
        job = Job(stdout=out, stall=5)
        try:
            outcome = job.run([WorkerSpec(0, 0, [sys.executable, "-c", spew], dict(os.environ))],
                              timeout=50)
        finally:
            job.close()
    reader.join(30)
    os.close(r)
    data = b"".join(got)
    assert outcome.reason == "ok"
    assert b"dropped" not in data and data.count(b"[0] " + b"x" * 99 + b"\n") == 60000


def test_a_launcher_whose_stdout_is_closed_runs_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """``meshrun ... >&-`` (sys.stdout is None, as python leaves it): the
    ranks' output goes nowhere, as a program's would under python; meshrun
    failed before the job, naming nothing ("AttributeError: 'NoneType'
    object has no attribute 'buffer'"). In this process, on the Job."""
    from mesh.launch.records import WorkerSpec
    from mesh.launch.supervise import Job
    monkeypatch.setattr(sys, "stdout", None)
    job = Job()
    try:
        outcome = job.run([WorkerSpec(0, 0, [sys.executable, "-c", "print('x' * 99)"],
                                      dict(os.environ))], timeout=30)
    finally:
        job.close()
    assert outcome.reason == "ok"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_output_a_full_disk_refused_is_told_and_fails_meshrun() -> None:
    """``meshrun ... > /dev/full``: the ranks' output was lost silently and
    meshrun exited 0 (python says "No space left on device" and exits 1).
    Now Job.close says on stderr what was lost and why, and returns True
    (meshrun then exits 1 where the job did not fail). In this process."""
    import io
    from mesh.launch.records import WorkerSpec
    from mesh.launch.supervise import Job
    err = io.BytesIO()
    with open("/dev/full", "wb") as full:
        job = Job(stdout=full, stderr=err)
        try:
            outcome = job.run([WorkerSpec(0, 0, [sys.executable, "-c", "print('x' * 99)"],
                                          dict(os.environ))], timeout=30)
        finally:
            failed = job.close()
    assert outcome.reason == "ok" and failed
    assert err.getvalue() == (b"meshrun: 104 bytes of the ranks' standard output were not "
                              b"written: OSError: [Errno 28] No space left on device\n")


def test_a_stuck_reader_of_both_streams_cannot_hold_meshrun_after_a_failure(tmp_path) -> None:
    """stdout and stderr go to one pipe nobody reads, and a rank fails:
    meshrun gives up on the reader and ends with the rank's code, where
    writing its report used to block it for ever (here after 0.5 s: the
    default --output-stall is 5 s)."""
    script = tmp_path / "spew_fail.py"
    script.write_text("import os, sys\nsys.stdout.write(('x' * 99 + '\\n') * 20000)\n"
                      "sys.stdout.flush()\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n")
    r, w = os.pipe()   # never read from r
    start = time.monotonic()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mesh.launch", "-n", "2",
                                 "--output-stall", "0.5", str(script)], stdout=w, stderr=w,
                                cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
        os.close(w)
        try:
            code = proc.wait(timeout=30)
        finally:
            _end([proc])
    finally:
        os.close(r)
    assert code == 3
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("code", [0, 3])
def test_a_rank_that_ends_before_it_joins_fails_the_waiting_ranks_at_once(code: int) -> None:
    """Rank 3 ends before mesh.init (cleanly or not): the launcher tells the
    rendezvous, and ranks 0-2 fail at once naming it, instead of waiting for
    their rendezvous timeout (300 s); the report's headline names rank 3."""
    t0 = time.monotonic()
    job = _start("-n", "4", str(MESH_SCRIPT), MESH_TEST_EXIT_BEFORE_INIT=f"3:{code}")
    try:
        _, err = job.communicate(timeout=40)
    finally:
        _end([job])
    assert job.returncode == (code or 1), err
    assert "peer rank 3 is gone: it ended (exit code " in err, err
    assert "before the mesh was complete" in err, err
    head = "Root cause: rank 3 " + ("finished (exit code 0) while rank" if code == 0
                                    else "failed first")
    assert head in err, err
    assert time.monotonic() - t0 < 30


def test_a_node_whose_rank_ends_before_it_joins_fails_the_other_node_at_once() -> None:
    """Node 1's rank 2 fails before it joins (a script error on that host):
    node 1's launcher tells node 0's rendezvous, whose waiting ranks fail at
    once naming rank 2, instead of waiting for their rendezvous timeout; and
    its own rank 3, which waited on in its rendezvous (node 0's service gone
    with its job) until its meshrun stopped it after --settle (3 s), fails
    at once too, naming rank 2 (its meshrun tells it)."""
    t0 = time.monotonic()
    procs = [_start(*_node(0, 0), MESH_SECRET="job")]
    try:
        port = _port(procs[0])
        procs.append(_start(*_node(1, port), MESH_SECRET="job",
                            MESH_TEST_EXIT_BEFORE_INIT="2:5"))
        errs = [p.communicate(timeout=40)[1] for p in procs]
    finally:
        _end(procs)
    assert procs[1].returncode == 5, errs[1]
    assert procs[0].returncode == 1, errs[0]
    said = "peer rank 2 is gone: it ended (exit code 5) before the mesh was complete"
    assert said in errs[0], errs[0]
    assert re.search(r"rank 3 +exit code 1 \(failed, a consequence\); LostPeerError: rank 3: "
                     r"rendezvous at \S+: " + re.escape(said), errs[1]), errs[1]
    assert time.monotonic() - t0 < 30


def _interrupted(procs: list[subprocess.Popen[str]], node: int,
                 ready: list[subprocess.Popen[str]], word: str) -> list[str]:
    """Once both ranks of each node in ``ready`` have said ``word`` (their
    other lines read past), Ctrl-C at ``node``'s meshrun, which exits 130,
    and the other node 1, every node within 30 s (the failures these tests
    catch waited 60-120 s): every node's stderr."""
    for p in ready:
        assert p.stdout is not None
        said: list[str] = []
        while sum(word in s for s in said) < 2:
            said.append(p.stdout.readline())
            assert said[-1], said       # (it ended first)
    t0 = time.monotonic()
    procs[node].send_signal(signal.SIGINT)
    errs = [p.communicate(timeout=40)[1] for p in procs]
    took = time.monotonic() - t0
    assert [p.returncode for p in procs] == [130 if i == node else 1 for i in (0, 1)], errs
    assert took < 30, (took, errs)
    return errs


def test_a_node_stopped_before_its_ranks_join_fails_the_other_node_at_once() -> None:
    """Ctrl-C on node 1 while its ranks have not joined yet (a slow start):
    its meshrun told the rendezvous nothing of the ranks it stopped itself,
    and node 0's ranks waited in silence for their rendezvous timeout
    (120 s). Now they fail at once, naming a stopped rank and the node whose
    meshrun stopped it (node 0's stopped ranks are told to its own service
    the same way)."""
    procs = [_start(*_node(0, 0), MESH_SECRET="job")]
    try:
        port = _port(procs[0])
        procs.append(_start(*_node(1, port), MESH_SECRET="job",
                            MESH_TEST_SLEEP_BEFORE_INIT="60"))
        errs = _interrupted(procs, 1, [procs[1]], "sleeps before init")
    finally:
        _end(procs)
    assert re.search(r"peer rank [23] is gone: it ended \(killed by SIGTERM, stopped by node 1's "
                     r"meshrun\) before the mesh was complete", errs[0]), errs[0]


def test_a_node_that_dies_is_named_as_the_root_cause_on_the_other() -> None:
    """Node 1's meshrun is SIGKILLed mid-run (its watchdog takes its ranks):
    node 0's ranks lose theirs within seconds, and node 0's report leads
    with the lost rank of node 1, not with its own rank that saw it first."""
    procs = [_start(*_node(0, 0), MESH_SECRET="job", MESH_TEST_MORE_STEPS="600")]
    try:
        port = _port(procs[0])
        procs.append(_start(*_node(1, port), MESH_SECRET="job", MESH_TEST_MORE_STEPS="600"))
        assert procs[0].stdout is not None
        line = procs[0].stdout.readline()   # the job runs: rank 0's or rank 1's line first
        assert "got {'hello'" in line or "rank 0 heard from" in line, line
        time.sleep(0.5)
        t0 = time.monotonic()
        procs[1].kill()
        _, err = procs[0].communicate(timeout=40)
        took = time.monotonic() - t0
    finally:
        _end(procs)
    assert procs[0].returncode == 1, err
    assert re.search(r"Root cause: rank [23] \(node 1\) was lost, a rank of another node", err), err
    assert took < 20, took


def test_a_node_stopped_mid_job_stops_the_other_node_busy_outside_mesh_calls() -> None:
    """Ctrl-C on node 0 while every rank computes outside mesh calls (here:
    sleeps): node 1's ranks lost node 0's but ran on until their next mesh
    call, and node 1's meshrun with them, never told. Now a rank that loses
    a rank of another node tells its meshrun, which stops its ranks as for
    a failure (after --settle) and says which rank of which node was lost."""
    slow = {"MESH_TEST_SLEEP_AFTER": "60", "MESH_SECRET": "job"}
    procs = [_start(*_node(0, 0, "--settle", "0.5"), **slow)]
    try:
        port = _port(procs[0])
        procs.append(_start(*_node(1, port, "--settle", "0.5"), **slow))
        errs = _interrupted(procs, 0, procs, "sleeps")
    finally:
        _end(procs)
    assert re.search(r"meshrun: rank [01] of node 0 was lost \(rank [23] here: .*\); its "
                     r"node's meshrun reports why, unless it is gone too; stopped every rank "
                     r"here", errs[1]), errs[1]


STOPS = """
import os, signal, numpy as np, mesh, collectives as C
w = mesh.init()
a = np.ones(64)
for i in range(100000):
    if w.rank == 1 and i == 20:
        os.kill(os.getpid(), signal.SIGSTOP)      # as Ctrl-Z, or a debugger
    C.all_reduce(w, a)
"""


def test_a_stopped_rank_is_continued_to_end_by_sigterm_and_named_as_the_root_cause(
        tmp_path: Path) -> None:
    """Rank 1 stops itself: its peers give it up after MESH_PEER_TIMEOUT;
    meshrun's SIGTERM reaches it because a SIGCONT follows (a stopped
    process acts on no signal but SIGKILL), and the report's first line
    names rank 1, not the survivor that reported the loss first."""
    script = tmp_path / "stops.py"
    script.write_text(STOPS)
    # --settle 1: the survivors end on their own at once (a lost peer); rank 1 never would
    job = _start("-n", "3", "--settle", "1", str(script), MESH_PEER_TIMEOUT="2")
    try:
        _, err = job.communicate(timeout=50)
    finally:
        _end([job])
    assert job.returncode == 1, err
    assert "Root cause: rank 1 was lost" in err, err
    assert re.search(r"rank 1 +killed by SIGTERM \(stopped by meshrun\)", err), err
