"""meshrun end to end: output, failure propagation, root-cause table, and no
process outliving the job (workers and their children) after a failure, a
signal, or the launcher itself being killed."""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
from proctools import alive, free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "scripts"
WORKER = SCRIPTS / "launch_worker.py"

pytestmark = pytest.mark.timeout(30)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(SCRIPTS)])
    env.pop("MESH_SECRET", None)
    env.update(extra)
    return env


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mesh.launch", *args]


def meshrun(*args: str, timeout: float = 20, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cmd(*args), cwd=REPO, env=_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def start(*args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(_cmd(*args), cwd=REPO, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)



def pids(piddir: Path) -> list[int]:
    return [int(p.read_text()) for p in piddir.glob("*.pid")]


def wait_for_files(piddir: Path, count: int, pattern: str = "*.pid",
                  timeout: float = 15) -> None:
    """Wait until count files match pattern: pids written, or ranks at the barrier."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(piddir.glob(pattern))) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"only {len(list(piddir.glob(pattern)))} of {count} {pattern} appeared")


def assert_all_gone(piddir: Path, expect: int, timeout: float = 5) -> None:
    found = pids(piddir)
    assert len(found) == expect, f"expected {expect} pid files, found {sorted(found)}"
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in found) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [p for p in found if alive(p)], "processes outlived the job"


def test_normal_run_prefixes_every_line(tmp_path: Path) -> None:
    r = meshrun("-n", "3", str(WORKER), str(tmp_path), "*:print", "*:stderr")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    seen = {}
    for line in lines:
        prefix, _, body = line.partition(" ")
        rec = json.loads(body)
        assert prefix == f"[{rec['rank']}]"
        seen[rec["rank"]] = rec
    assert sorted(seen) == [0, 1, 2]
    for rank, rec in seen.items():
        env = rec["env"]
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "3"
        assert env["MESH_LAUNCHER"] == "1" and env["MESH_NODE_RANK"] == "0"
        assert env["PYTHONUNBUFFERED"] == "1" and env["MASTER_ADDR"] == "127.0.0.1"
        assert int(env["MASTER_PORT"]) > 0 and len(env["MESH_SECRET"]) >= 32
        assert env["MESH_ERROR_FILE"].endswith(f"rank{rank}.error.json")
        assert env["TORCHELASTIC_ERROR_FILE"] == \
            env["MESH_ERROR_FILE"][:-len("error.json")] + "torchelastic.json"
        # torchrun's other variables, with its meanings (torch 2.13's agent, one node)
        assert env["GROUP_RANK"] == "0" and env["GROUP_WORLD_SIZE"] == "1"
        assert env["ROLE_RANK"] == str(rank) and env["ROLE_WORLD_SIZE"] == "3"
        assert env["ROLE_NAME"] == "default" and env["TORCHELASTIC_USE_AGENT_STORE"] == "False"
        assert env["TORCHELASTIC_RESTART_COUNT"] == env["MESH_RESTART_COUNT"] == "0"
        assert env["TORCHELASTIC_MAX_RESTARTS"] == "0"
        assert len(env["TORCHELASTIC_RUN_ID"]) == 16
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert rec["argv"] == [str(WORKER), str(tmp_path), "*:print", "*:stderr"]
        assert rec["path0"] == str(SCRIPTS) and rec["main"] == "__main__"
    assert len({rec["env"]["MESH_SECRET"] for rec in seen.values()}) == 1
    assert len({rec["env"]["TORCHELASTIC_RUN_ID"] for rec in seen.values()}) == 1
    assert sorted(r.stderr.splitlines()) == [f"[{i}] complaint from rank {i}" for i in range(3)]
    assert_all_gone(tmp_path, 3)


def test_failing_rank_is_root_cause_and_others_are_stopped(tmp_path: Path) -> None:
    t0 = time.monotonic()
    # --settle 0.5: the others sleep; they would not end on their own in meshrun's 3 s
    r = meshrun("-n", "3", "--settle", "0.5", str(WORKER), str(tmp_path),
                "*:child", "*:barrier", "1:raise", "*:sleep", timeout=50)
    assert r.returncode == 1
    # stopped, not left to their 60 s sleep (a bound of 10 s failed on a loaded 2-core
    # machine: the three interpreters' start alone took most of it)
    assert time.monotonic() - t0 < 40
    table = r.stderr[r.stderr.index("=" * 20):]
    assert "Root cause: rank 1 failed first" in table
    assert "exit       : exit code 1" in table
    assert "ValueError: boom from rank 1" in table
    assert f'File "{WORKER}"' in table and "in _boom" in table
    assert "_bootstrap" not in r.stderr and "runpy" not in r.stderr
    for other in (0, 2):
        assert f"rank {other}    killed by SIGTERM (stopped by meshrun)" in table
    assert "[1] ValueError: boom from rank 1" in r.stderr
    assert_all_gone(tmp_path, 6)


def test_rank_killed_by_signal(tmp_path: Path) -> None:
    """A crash in native code: exit 128+N, and the rank's Python stack on its
    stderr (faulthandler; it showed nothing), which the table points to; the
    rank's output kept off the console (--local-ranks-filter), the table
    shows that stderr's last lines: nothing else said why it crashed."""
    r = meshrun("-n", "2", "--settle", "0.5", "--local-ranks-filter", "1", str(WORKER),
                str(tmp_path), "*:barrier", "0:segv", "*:sleep")
    assert r.returncode == 128 + signal.SIGSEGV
    assert "Root cause: rank 0 failed first" in r.stderr
    assert "exit       : killed by SIGSEGV" in r.stderr
    assert "no traceback: killed by SIGSEGV (its threads' Python stacks are in its stderr" \
        in r.stderr
    assert "[0]" not in r.stdout + r.stderr, r.stderr
    table = r.stderr[r.stderr.index("=" * 20):]
    assert "  stderr     : its last lines (the console did not show them):\n" \
           "    Fatal Python error: Segmentation fault\n" in table, table
    assert re.search(r"\n      File \".*launch_worker.py\", line \d+ in <lambda>\n", table)
    assert_all_gone(tmp_path, 2)


def test_exit_code_of_first_failure_and_sigterm_escalation(tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = meshrun("-n", "2", "--grace", "0.5", "--settle", "0.5", str(WORKER), str(tmp_path),
                "*:ignoreterm", "*:barrier", "1:exit3", "*:sleep", timeout=50)
    assert r.returncode == 3
    # sys.exit(3) is the rank's error, where it was called (it said "no traceback ...")
    assert "  error      : SystemExit: 3\n" in r.stderr and "sys.exit(3)" in r.stderr
    assert "rank 0    killed by SIGKILL (stopped by meshrun)" in r.stderr
    assert time.monotonic() - t0 < 40      # killed, not left to its 60 s sleep
    assert_all_gone(tmp_path, 2)


def test_module_mode(tmp_path: Path) -> None:
    r = meshrun("-n", "2", "-m", "launch_worker", str(tmp_path), "*:print")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line.partition(" ")[2]) for line in r.stdout.splitlines()]
    assert sorted(rec["rank"] for rec in recs) == [0, 1]
    for rec in recs:
        assert rec["argv"] == [str(WORKER), str(tmp_path), "*:print"]
        assert rec["path0"] == str(REPO) and rec["main"] == "__main__"
    assert_all_gone(tmp_path, 2)


def test_rank_0_reads_the_launchers_stdin(tmp_path: Path) -> None:
    """`meshrun ... < data` gives rank 0 the data (as mpirun does), the
    others an empty stdin; every rank read /dev/null until then."""
    script = tmp_path / "echo.py"
    script.write_text("import os, sys\nprint(os.environ['RANK'], repr(sys.stdin.read()))\n")
    r = subprocess.run(_cmd("-n", "2", str(script)), cwd=REPO, env=_env(), input="a b\nc\n",
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == ["[0] 0 'a b\\nc\\n'", "[1] 1 ''"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_a_folder_or_zip_with_a_main_runs_as_under_python(tmp_path: Path, kind: str) -> None:
    """`python app` runs app/__main__.py (or a zip's) with app on sys.path;
    meshrun refused a folder as "no such file"."""
    import zipfile
    app = tmp_path / "app"
    app.mkdir()
    (app / "helper.py").write_text("WHO = 'helper'\n")
    (app / "__main__.py").write_text(
        "import os, sys, helper\nprint(os.environ['RANK'], helper.WHO, sys.argv[1:])\n")
    target = app
    if kind == "zip":
        target = tmp_path / "app.pyz"
        with zipfile.ZipFile(target, "w") as z:
            for f in app.iterdir():
                z.write(f, f.name)
    r = subprocess.run(_cmd("-n", "2", str(target), "x"), cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == ["[0] 0 helper ['x']", "[1] 1 helper ['x']"]


@pytest.mark.timeout(60)
def test_a_prompt_without_its_line_end_is_shown_before_the_answer(tmp_path: Path) -> None:
    """input("name> ") on rank 0 (pdb's "(Pdb) " alike): the prompt is
    shown while the rank waits for its answer, not only once a line ends."""
    import select
    script = tmp_path / "ask.py"
    script.write_text("import os\nif os.environ['RANK'] == '0':\n"
                      "    print('hello', input('name> '))\n")
    p = subprocess.Popen(_cmd("-n", "2", str(script)), cwd=REPO, env=_env(),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdin is not None and p.stdout is not None
    try:
        seen, deadline = b"", time.monotonic() + 30
        while b"[0] name> " not in seen and time.monotonic() < deadline:
            if select.select([p.stdout], [], [], 0.5)[0]:
                got = os.read(p.stdout.fileno(), 4096)
                if not got:
                    break
                seen += got
        assert b"[0] name> " in seen, seen    # (before: nothing until the answer came)
        p.stdin.write(b"bob\n")
        p.stdin.close()
        rest = p.stdout.read()
        err = p.stderr.read() if p.stderr is not None else b""
        p.wait(timeout=30)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 0, err
    assert (seen + rest).decode() == "[0] name> hello bob\n", seen + rest


def _two_ranks_relayed(prefix: bool = True) -> tuple:
    """Two ranks' pipes relayed, prefixed (or not), into one in-memory sink."""
    import io
    from mesh.launch import relay
    out = io.BytesIO()
    sink = relay.Sink(out)
    pipes = [os.pipe() for _ in range(2)]
    for r, _ in pipes:
        os.set_blocking(r, False)
    streams = tuple(relay.Stream(r, f"[{i}] ".encode() if prefix else b"", sink, None)
                    for i, (r, _) in enumerate(pipes))
    return out, pipes, streams


def _end_relayed(pipes: list, streams: tuple) -> None:
    for (_, w), st in zip(pipes, streams):
        os.close(w)
        st.close()
    streams[0].sink.finish(5)


def test_a_line_left_open_is_ended_by_another_ranks_output_and_goes_on_prefixed() -> None:
    out, pipes, (s0, s1) = _two_ranks_relayed()
    os.write(pipes[0][1], b"ask> ")
    s0.pump()
    s0.hold(time.monotonic() + 1)        # the prompt, as far as it goes
    os.write(pipes[0][1], b"more")
    s0.pump()
    s0.hold(time.monotonic() + 1)        # on the same line
    os.write(pipes[1][1], b"other\n")
    s1.pump()                            # ends rank 0's line first
    os.write(pipes[0][1], b" end\nnext\n")
    s0.pump()                            # rank 0's rest: a line of its own, prefixed
    _end_relayed(pipes, (s0, s1))
    assert out.getvalue() == b"[0] ask> more\n[1] other\n[0]  end\n[0] next\n", out.getvalue()


def test_unprefixed_output_is_as_the_ranks_wrote_it_in_whole_lines() -> None:
    """--no-prefix: a rank's bytes go as it wrote them, a progress bar's
    carriage returns and a last line left open included (as under python);
    another rank's output still ends an open line first, so that two ranks'
    lines never mix (and that line's own end then makes no empty line)."""
    out, pipes, (s0, s1) = _two_ranks_relayed(prefix=False)
    for st, data in ((s0, b"ask> "), (s1, b"other\n"), (s0, b"\n\r 10%|#"), (s0, b"\r 20%"),
                     (s0, b"\ndone\nno end")):
        os.write(pipes[st is s1][1], data)
        st.pump()
        st.hold(time.monotonic() + (data != b"\ndone\nno end"))
    for (_, w), st in zip(pipes, (s0, s1)):
        os.close(w)
        st.pump()   # (its end: the line left open is written so)
        st.close()
    s0.sink.finish(5)
    assert out.getvalue() == b"ask> \nother\n\r 10%|#\r 20%\ndone\nno end", out.getvalue()


def test_a_progress_bar_says_its_rank_each_time_it_starts_its_line_over() -> None:
    """A rank's progress bar (tqdm's "\\r 40%|####") written over its own
    line: the prefix follows each carriage return, where the bar wrote over
    the prefix (a terminal showed " 40%|####" with no rank); a bar's line
    ended by another rank's output ends without a line of its own."""
    out, pipes, (s0, s1) = _two_ranks_relayed()
    for st, data in ((s0, b"\r 10%|#"), (s0, b"\r 20%|##"), (s1, b"\r 50%"),
                     (s0, b"\ndone\n"), (s1, b" 60%\r"), (s1, b" 70%\r\n")):
        os.write(pipes[st is s1][1], data)
        st.pump()
        st.hold(time.monotonic() + 1)   # (a line left open: shown as far as it goes)
    _end_relayed(pipes, (s0, s1))
    assert out.getvalue() == (b"\r[0]  10%|#\r[0]  20%|##\n\r[1]  50%\n[0] done\n"
                              b"[1]  60%\r[1]  70%\r\n"), out.getvalue()


def test_a_bar_on_stderr_is_ended_by_output_on_stdout_where_both_are_one_file(
        tmp_path: Path) -> None:
    """meshrun's stdout and stderr one terminal (or file): a rank's progress
    bar on stderr, its line left open, is ended before output on stdout, and
    the bar's own line end then makes no empty line: the output came on the
    bar's line ("\\r[1] 100%|###|[0] done") and an empty "[1] " line after.
    In this process, on the Job (its time: the bar held 0.2 s, as a prompt)."""
    from mesh.launch.records import WorkerSpec
    from mesh.launch.supervise import Job
    bar = ("import sys, time\nsys.stderr.write('\\r 50%'); sys.stderr.flush()\n"
           "time.sleep(0.5)\nprint('done', flush=True)\nsys.stderr.write('\\n')\n")
    with open(tmp_path / "both", "wb") as both:
        job = Job(stdout=both, stderr=both)
        try:
            outcome = job.run([WorkerSpec(0, 0, [sys.executable, "-c", bar], dict(os.environ))],
                              timeout=30)
        finally:
            job.close()
    assert outcome.reason == "ok"
    assert (tmp_path / "both").read_bytes() == b"\r[0]  50%\n[0] done\n"


def test_unprefixed_output_of_one_rank_is_its_bytes(tmp_path: Path) -> None:
    """--no-prefix, one rank, meshrun's stdout and stderr one file (a
    terminal): the file holds the rank's bytes, its last line left open as
    under python (the end of the job wrote a line end after it). In this
    process, on the Job, as the test above."""
    from mesh.launch.records import WorkerSpec
    from mesh.launch.supervise import Job
    text = "import sys\nsys.stdout.write('50%\\r100%\\n\\tno end')\n"
    with open(tmp_path / "both", "wb") as both:
        job = Job(stdout=both, stderr=both, prefix=False)
        try:
            outcome = job.run([WorkerSpec(0, 0, [sys.executable, "-c", text],
                                          dict(os.environ))], timeout=30)
        finally:
            job.close()
    assert outcome.reason == "ok"
    assert (tmp_path / "both").read_bytes() == b"50%\r100%\n\tno end"


def test_a_line_longer_than_a_read_stays_one_line() -> None:
    """A line of 150 KB (a JSON dump) comes out whole, prefixed once: it was
    cut every 64 KiB, each piece a line of its own with the rank's prefix."""
    import io
    from mesh.launch import relay
    out = io.BytesIO()
    sink = relay.Sink(out)
    r, w = os.pipe()
    os.set_blocking(r, False)
    stream = relay.Stream(r, b"[0] ", sink, None)
    for piece in (b"x" * 50000, b"x" * 50000, b"x" * 50000 + b"\nend\n"):
        os.write(w, piece)      # (a pipe holds 64 KiB: read as the rank writes)
        stream.pump()
    os.close(w)
    stream.pump()
    stream.close()
    sink.finish(5)
    assert out.getvalue() == b"[0] " + b"x" * 150000 + b"\n[0] end\n"


def test_log_dir_keeps_raw_output_and_error_records(tmp_path: Path) -> None:
    """Everything in --log-dir, the console showing what its options leave
    it: rank 0's stdout as written (--no-prefix; its stderr --redirects'),
    and of rank 1, kept off it (--local-ranks-filter), the error it failed
    with, in the report."""
    piddir, logs = tmp_path / "pids", tmp_path / "logs"
    piddir.mkdir()
    r = meshrun("-n", "2", "--log-dir", str(logs), "--no-prefix", "--local-ranks-filter", "0",
                "--redirects", "0:2", str(WORKER), str(piddir),
                "*:print", "*:stderr", "*:barrier", "1:raise")
    assert r.returncode == 1
    assert json.loads(r.stdout)["rank"] == 0, r.stdout
    head, table = r.stderr.split("=" * 72 + "\n", 1)
    assert head == "", r.stderr
    assert "ValueError: boom from rank 1" in table and "in _boom" in table
    for rank in (0, 1):
        out = json.loads((logs / f"rank{rank}.stdout.log").read_text())
        assert out["rank"] == rank
        err = (logs / f"rank{rank}.stderr.log").read_text()
        assert err.startswith(f"complaint from rank {rank}\n")
    rec = json.loads((logs / "rank1.error.json").read_text())
    assert rec["rank"] == 1 and rec["exc_type"] == "ValueError"
    assert rec["message"] == "boom from rank 1" and "_boom" in rec["traceback"]
    assert abs(rec["time"] - time.time()) < 60
    assert not (logs / "rank0.error.json").exists()
    assert_all_gone(piddir, 2)


def test_launcher_killed_leaves_no_worker_or_child(tmp_path: Path) -> None:
    proc = start("-n", "2", str(WORKER), str(tmp_path), "*:rundir", "*:child", "*:sleep")
    try:
        wait_for_files(tmp_path, 4)
        proc.kill()
        proc.wait(timeout=5)
    finally:
        proc.kill()
        proc.communicate(timeout=5)
    assert_all_gone(tmp_path, 4)
    run_dir = Path((tmp_path / "0.rundir").read_text())
    deadline = time.monotonic() + 5
    while run_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not run_dir.exists(), "the job's scratch directory outlived the launcher"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_launcher_stops_the_job(tmp_path: Path, signum: int) -> None:
    proc = start("-n", "2", "--max-restarts", "1", str(WORKER), str(tmp_path), "*:child",
                 "*:sleep")
    try:
        wait_for_files(tmp_path, 4)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum
    assert f"stopped by {signal.Signals(signum).name}" in err
    assert "starting every rank again" not in err   # (--max-restarts 1: never after a signal)
    assert_all_gone(tmp_path, 4)


def test_a_stopped_job_says_where_each_rank_was(tmp_path: Path) -> None:
    """Ctrl-C: each rank, asked before its SIGTERM, says where it is: rank 1
    in its receive from rank 0, rank 0 at its line of a Python loop; rank 2,
    which never answers (wedged in native code, a C call holding the GIL),
    is stopped all the same, after a bounded wait, said to give no word, and
    its line shows its Python stack, which faulthandler dumped."""
    # (--settle 0.3: how long the ranks get to answer, at most; rank 2 never does)
    proc = start("-n", "3", "--settle", "0.3", str(SCRIPTS / "launch_where.py"),
                 str(tmp_path), MESH_HEARTBEAT="0.1")
    try:
        wait_for_files(tmp_path, 2, "*.ready")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    script = "tests/scripts/launch_where.py"
    assert re.search(r"rank 0    killed by SIGTERM \(stopped by meshrun\)\n +running at "
                     + script + r":\d+ in spin \(called from " + script + r":\d+ in main\)",
                     err), err
    assert re.search(r"rank 1    killed by SIGTERM \(stopped by meshrun\)\n +waiting [\d.]+ s "
                     r"in recv from rank 0 \(tag 7, group world\), called at " + script
                     + r":\d+ in main\n", err), err
    assert re.search(r"rank 2    killed by SIGTERM \(stopped by meshrun\)\n +it gave no word "
                     r"of where it was: its Python stack \(faulthandler\): " + script
                     + r":\d+ in wedge, called from " + script + r":\d+ in main, from "
                     + script + r":\d+ in <module>(; \d+ other threads?, innermost in \w+"
                     r"(, \w+)*)?\n", err), err


def test_max_restarts_starts_every_rank_again_and_the_job_resumes(tmp_path: Path) -> None:
    """--max-restarts 2: rank 1 fails on the first try; meshrun reports it,
    then starts both ranks again (TORCHELASTIC_RESTART_COUNT=1), with a
    rendezvous, run folder and secret of their own, and the job resumes
    from its checkpoint and succeeds. (0.8 s)"""
    r = meshrun("-n", "2", "--max-restarts", "2", str(SCRIPTS / "launch_restart.py"),
                str(tmp_path), "mesh", "1")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line.partition(" ")[2]) for line in r.stdout.splitlines()]
    starts = {(rec["start"], rec["rank"]): rec for rec in recs if "start" in rec}
    assert sorted(starts) == [(0, 0), (0, 1), (1, 0), (1, 1)], r.stdout
    for what in ("run_dir", "secret"):     # (the port too, but bind(0) may give it again)
        assert starts[0, 0][what] == starts[0, 1][what] != starts[1, 0][what], what
    for what in ("port", "run_dir", "secret"):
        assert starts[1, 0][what] == starts[1, 1][what], what
    assert not os.path.exists(starts[0, 0]["run_dir"])
    ends = sorted((rec for rec in recs if "start" not in rec), key=lambda rec: rec["rank"])
    assert [(e["rank"], e["restart"], e["resumed_at"], e["total"]) for e in ends] == [
        (0, 1, 3, 8.0), (1, 1, 3, 8.0)], r.stdout
    assert ends[0]["env"] == {"MESH_RESTART_COUNT": "1", "TORCHELASTIC_MAX_RESTARTS": "2",
                              "TORCHELASTIC_RUN_ID": ends[1]["env"]["TORCHELASTIC_RUN_ID"]}
    assert r.stderr.count("Root cause: rank 1 failed first") == 1, r.stderr
    assert "RuntimeError: rank 1 fails at step 2 of try 0" in r.stderr
    assert "meshrun: starting every rank again (restart 1 of 2: " \
           "TORCHELASTIC_RESTART_COUNT=1)" in r.stderr
    assert "restart 2" not in r.stderr


def test_max_restarts_ends_with_the_last_failures_code(tmp_path: Path) -> None:
    """A job that fails on every try runs 1 + --max-restarts times and exits
    with the last failure's code; its logs keep every try's output, each in
    its attempt_<N> folder, as torchrun's, which each report names. (1.0 s)"""
    logs = tmp_path / "logs"
    r = meshrun("-n", "2", "--max-restarts", "2", "--log-dir", str(logs), str(WORKER),
                str(tmp_path), "*:stderr", "1:exit3")
    assert r.returncode == 3, r.stderr
    assert r.stderr.count("Root cause: rank 1 failed first") == 3, r.stderr
    assert r.stderr.count("meshrun: starting every rank again") == 2
    assert r.stderr.rstrip().endswith("meshrun: no restarts left (--max-restarts 2): the job "
                                      "failed 3 times; exit code 3, the last failure's")
    assert sorted(p.name for p in logs.iterdir()) == ["attempt_0", "attempt_1", "attempt_2"]
    for n in range(3):
        for rank in (0, 1):
            err = (logs / f"attempt_{n}" / f"rank{rank}.stderr.log").read_text()
            assert err.startswith(f"complaint from rank {rank}\n"), err
            assert err.count("complaint") == 1 and err.count("Traceback") == rank, err
        assert f"  error file : {logs / f'attempt_{n}' / 'rank1.error.json'}\n" in r.stderr
        assert n == 0 or f"TORCHELASTIC_RESTART_COUNT={n}; logs in {logs}/attempt_{n})" \
            in r.stderr


def test_a_log_dir_reused_keeps_no_try_of_an_earlier_job(tmp_path: Path) -> None:
    """The attempt_<N> folders an earlier job left in --log-dir are cleared
    of the ranks' files as the job starts (torchrun clears each try's): a job
    that succeeds at once has one try's logs, not the earlier job's too; a
    file of another node's rank, or of the user's, stays. (0.5 s)"""
    logs = tmp_path / "logs"
    for n in range(3):
        (logs / f"attempt_{n}").mkdir(parents=True)
        for rank in (0, 1):
            (logs / f"attempt_{n}" / f"rank{rank}.stderr.log").write_text("earlier job\n")
            (logs / f"attempt_{n}" / f"rank{rank}.error.json").write_text("{}")
    (logs / "attempt_2" / "rank2.stdout.log").write_text("node 1's\n")
    (logs / "attempt_1" / "notes.txt").write_text("mine\n")
    r = meshrun("-n", "2", "--max-restarts", "2", "--log-dir", str(logs), str(WORKER),
                str(tmp_path), "*:print")
    assert r.returncode == 0, r.stderr
    assert sorted(str(p.relative_to(logs)) for p in logs.rglob("*")) == [
        "attempt_0", "attempt_0/rank0.stderr.log", "attempt_0/rank0.stdout.log",
        "attempt_0/rank1.stderr.log", "attempt_0/rank1.stdout.log",
        "attempt_1", "attempt_1/notes.txt", "attempt_2", "attempt_2/rank2.stdout.log"]
    assert "earlier job" not in (logs / "attempt_0" / "rank1.stderr.log").read_text()


def test_ctrl_c_while_a_failure_settles_does_not_restart(tmp_path: Path) -> None:
    """Ctrl-C stops the job for good, even while meshrun waits for the
    ranks to end after a failure it would restart them for. (1.5 s)"""
    proc = start("-n", "2", "--max-restarts", "3", "--settle", "30", str(WORKER),
                 str(tmp_path), "*:barrier", "1:raise", "*:sleep")
    try:
        wait_for_files(tmp_path, 2, "*.ready")
        deadline = time.monotonic() + 10
        while alive(int((tmp_path / "1.pid").read_text())) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(1.0)     # (meshrun's loop has seen it: a tenth of a second, unloaded)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 1, err        # (the failure's, as without --max-restarts)
    assert "Root cause: rank 1 failed first" in err
    assert "starting every rank again" not in err, err
    assert_all_gone(tmp_path, 2)


def test_job_timeout(tmp_path: Path) -> None:
    # 3 s: long enough for both ranks to start Python and write their pid
    # files on a loaded machine, which assert_all_gone then checks are gone
    r = meshrun("-n", "2", "--timeout", "3", "--max-restarts", "1", str(WORKER), str(tmp_path),
                "*:sleep")
    assert r.returncode == 124
    assert "timed out after 3 s" in r.stderr
    assert "starting every rank again" not in r.stderr     # (a timeout is never restarted)
    assert "rank 0    killed by SIGTERM (stopped by meshrun)\n            running at " \
        "tests/scripts/launch_worker.py:" in r.stderr, r.stderr     # (where it was)
    assert_all_gone(tmp_path, 2)


def test_two_nodes_share_one_rendezvous_and_form_one_mesh(tmp_path: Path) -> None:
    """Two meshruns (--nnodes 2) on one host: their ranks get one job's
    variables, then form one mesh of 4 (launch_mesh.py: rank 0 greets every
    rank, each answers; an all_reduce)."""
    secret = "s3cret-for-this-test"
    common = ("--nnodes", "2", "-n", "2", "--master-addr", "127.0.0.1")
    node0 = start(*common, "--node-rank", "0", "--master-port", "0",
                  str(WORKER), str(tmp_path), "*:print", "*:mesh", MESH_SECRET=secret)
    try:
        assert node0.stderr is not None
        announce = node0.stderr.readline()
        assert "node 0 serves the rendezvous on port" in announce
        port = announce.split()[-1]
        r1 = meshrun(*common, "--node-rank", "1", "--master-port", port,
                     str(WORKER), str(tmp_path), "*:print", "*:mesh", MESH_SECRET=secret)
        out0, err0 = node0.communicate(timeout=20)
    finally:
        node0.kill()
    assert node0.returncode == 0 and r1.returncode == 0, err0 + r1.stderr
    lines = (out0 + r1.stdout).splitlines()
    assert sorted(ln for ln in lines if " rank " in ln) == [
        "[0] rank 0 heard from [1, 2, 3]", "[1] rank 1 got {'hello': 1}",
        "[2] rank 2 got {'hello': 2}", "[3] rank 3 got {'hello': 3}"], \
        f"the two nodes' ranks did not form one mesh: {lines}"
    recs = [json.loads(ln.partition(" ")[2]) for ln in lines if " rank " not in ln]
    by_rank = {rec["rank"]: rec["env"] for rec in recs}
    assert sorted(by_rank) == [0, 1, 2, 3]
    for rank, env in by_rank.items():
        assert env["WORLD_SIZE"] == "4" and env["LOCAL_RANK"] == str(rank % 2)
        assert env["MESH_NODE_RANK"] == str(rank // 2)
        assert env["MASTER_PORT"] == port and env["MESH_SECRET"] == secret
        assert env["GROUP_RANK"] == str(rank // 2) and env["GROUP_WORLD_SIZE"] == "2"
        assert env["ROLE_RANK"] == str(rank) and env["ROLE_WORLD_SIZE"] == "4"
    assert len({env["TORCHELASTIC_RUN_ID"] for env in by_rank.values()}) == 1  # (both nodes)
    assert_all_gone(tmp_path, 4)


@pytest.mark.parametrize("args, message", [
    (("-n", "2", "no_such_script.py"), "no such file"),
    (("--nnodes", "2", str(WORKER)), "--master-port is required"),
    (("--nnodes", "2", "--master-port", "1234", str(WORKER)), "MESH_SECRET"),
    (("--nnodes", "2", "--node-rank", "2", "--master-port", "1", str(WORKER)), "--node-rank"),
    (("--max-restarts", "-1", str(WORKER)), "'-1': a whole number of at least 0"),
    (("--grace", "nan", str(WORKER)), "argument --grace: 'nan': a number of at least 0"),
    (("--timeout", "nan", str(WORKER)), "argument --timeout: 'nan': a number above 0"),
    (("--settle", "nan", str(WORKER)), "argument --settle: 'nan': a number of at least 0"),
    (("--output-stall", "nan", str(WORKER)),
     "argument --output-stall: 'nan': a number of at least 0"),
    (("--master-addr", "tcp://10.0.0.1", str(WORKER)), "give the host alone (e.g. 10.0.0.1)"),
    (("--master-addr", "10.0.0.1:29500", str(WORKER)), "give the port with --master-port"),
    (("--nnodes", "2", "--master-addr", "10.0.0.1:29500", str(WORKER)),
     "10.0.0.1:29500: give the port with --master-port 29500"),
    (("--master-addr", "no-such-host.invalid", str(WORKER)), "cannot resolve it"),
    (("--no-python", "no-such-program-here"), "no such program (not a file, nor on PATH)"),
    (("--log_dir", "logs", "--no_python", "no-such-program-here"),     # (torchrun's spelling)
     "no such program (not a file, nor on PATH)"),
    (("--log-dir", str(WORKER), str(WORKER)), "not a directory"),
    (("--local-ranks-filter", "0,x", str(WORKER)), "'0,x': local ranks, comma-separated"),
    (("-n", "2", "--local_ranks_filter", "1,2", str(WORKER)),
     "--local-ranks-filter: local rank 2 is none of this node's 0..1 (-n 2)"),
    (("--redirects", "3", str(WORKER)), "--redirects needs --log-dir"),
    (("--log-dir", "logs", "--tee", "0:4", str(WORKER)), "'0:4': 0-3 (1 stdout, 2 stderr"),
    (("--log-dir", "logs", "-r", "0:3,1:1,0:1", str(WORKER)),
     "'0:3,1:1,0:1': local rank 0 is given twice"),
    (("--standalone", "--nnodes", "2", "--master-port", "1", str(WORKER)),
     "--standalone is one node: drop --nnodes 2, or --standalone"),
    (("--standalone", "--master_addr", "localhost", "--master-port", "29500", str(WORKER)),
     "--standalone places the rendezvous itself (on this host, a free port): drop "
     "--master_addr and --master-port, or --standalone"),
    (("--standalone", "--node-rank", "0", str(WORKER)), "drop --node-rank, or --standalone"),
    (("--output", "tag,merge-stderr-to-stdout,timestamp", str(WORKER)),
     "--output tag,merge-stderr-to-stdout,timestamp: meshrun cannot do merge-stderr-to-stdout, "
     "timestamp (it takes tag"),
    (("--output", "dir=logs:nocopy", str(WORKER)), "meshrun cannot do dir=logs:nocopy"),
    (("--merge-stderr-to-stdout", str(WORKER)),
     "--merge-stderr-to-stdout: meshrun cannot do merge-stderr-to-stdout"),
    # horovodrun's command line: -np is -n; its `python train.py` and other options say
    # what to use (were "invalid int value: 'p'", "python: no such file", "unrecognized")
    (("-np", "2", "python", str(WORKER), "--lr", "1"),
     f"python {WORKER} --lr 1: meshrun runs the script in its own Python: meshrun -n 2 "
     f"{WORKER} --lr 1 (horovodrun's and mpirun's `-np 2 python {WORKER} --lr 1`)"),
    (("-np", "2", "-H", "localhost:2", str(WORKER)),
     "-H localhost:2 is horovodrun's, not meshrun's: one meshrun a host: meshrun --nnodes K"),
    (("--timeline-filename", "t.json", str(WORKER)),
     "--timeline-filename t.json is horovodrun's, not meshrun's: export HOROVOD_TIMELINE=t.json"),
    (("--gloo", str(WORKER)), "--gloo is horovodrun's, not meshrun's: meshrun's ranks talk"),
    (("-np", "2", "--min-np", "1", "--max-np", "4", str(WORKER)),
     "--min-np 1 is horovodrun's, not meshrun's: a mesh does not grow or shrink: every try "
     "of a job has the same -n N; meshrun -n N --max-restarts K"),
])
def test_usage_errors(args: tuple[str, ...], message: str, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (as tests/test_tools_args.py calls the tools' main):
    each is refused before anything starts, and a meshrun of its own cost
    the interpreter's start-up and mesh's imports, 13 times."""
    from mesh.launch import main
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("MESH_SECRET", raising=False)
    with pytest.raises(SystemExit) as stop:
        main(list(args))
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_the_console_shows_the_streams_torchruns_options_leave_it(tmp_path: Path) -> None:
    """--local-ranks-filter, --redirects and --tee as torchrun's: a stream
    both redirected and teed is teed; a rank left out shows nothing."""
    from mesh.launch.cli import _check, build_parser
    from mesh.launch.run import _shown
    p = build_parser()
    a = p.parse_args(["-n", "4", "--log-dir", str(tmp_path), "-r", "3", "-t", "0:1,2:3",
                      "--local-ranks-filter=0,1,2", str(WORKER)])
    _check(p, a)
    assert [_shown(a, i) for i in range(4)] == [("stdout",), (), ("stdout", "stderr"), ()]
    a = p.parse_args(["-n", "2", "--no-prefix", "--tag-output", str(WORKER)])
    _check(p, a)
    assert a.prefix and _shown(a, 1) == ("stdout", "stderr")    # (the last word: prefixed)


def test_mpiruns_output_spellings_are_meshruns_options() -> None:
    """Open MPI 5's --output tag,dir=DIR and 4's --output-filename were
    "unrecognized arguments": they are --tag-output and --log-dir (the last
    word wins, as between --no-prefix and --tag-output); the rest are
    refused by name in test_usage_errors."""
    from mesh.launch.cli import _check, build_parser
    p = build_parser()
    a = p.parse_args(["--no-prefix", "--output", "tag,dir=logs", str(WORKER)])
    _check(p, a)
    assert a.prefix and a.log_dir == "logs"
    a = p.parse_args(["--output", "tag", "--no-prefix", "--output-filename", "out", str(WORKER)])
    assert not a.prefix and a.log_dir == "out"
    a = p.parse_args(["-np", "3", str(WORKER)])     # (mpirun's and horovodrun's -np)
    assert a.nproc == 3


def test_torchruns_pet_variables_are_the_defaults(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """torchrun takes each option's default from PET_<OPTION> (what
    Kubeflow's PyTorchJob sets): meshrun ignored them. The command line
    wins; --standalone, set either way, drops the rendezvous's variables as
    torchrun does; a bad value is a usage error naming the variable."""
    from mesh.launch import main
    from mesh.launch.cli import _check, build_parser, env_defaults

    def parsed(*argv: str) -> argparse.Namespace:
        p = build_parser()
        env_defaults(p)
        a = p.parse_args([*argv, str(WORKER)])
        _check(p, a)
        return a

    for name, value in [("PET_NPROC_PER_NODE", "3"), ("PET_MAX_RESTARTS", "2"),
                        ("PET_MASTER_PORT", "29511"), ("PET_LOG_DIR", "logs"),
                        ("PET_REDIRECTS", "1"), ("PET_STANDALONE", "0")]:
        monkeypatch.setenv(name, value)
    a = parsed()
    assert (a.nproc, a.max_restarts, a.master_port, a.log_dir, a.standalone) == (
        3, 2, 29511, "logs", False)
    assert a.redirects == {0: 1, 1: 1, 2: 1}
    a = parsed("-n", "2", "--max-restarts", "0", "--master-port", "7")
    assert (a.nproc, a.max_restarts, a.master_port) == (2, 0, 7)
    monkeypatch.setenv("PET_STANDALONE", "1")
    a = parsed()
    assert a.standalone and a.master_port is None
    for name, value, message in [
            ("PET_NNODES", "1:2", "PET_NNODES='1:2' (torchrun's default for --nnodes): a whole "
                                  "number (meshrun takes no MIN:MAX range of nodes)"),
            ("PET_STANDALONE", "yes", "PET_STANDALONE='yes' (torchrun's default for "
                                      "--standalone): a number, 0 false"),
            ("PET_TEE", "9", "PET_TEE='9' (torchrun's default for --tee): '9': 0-3")]:
        monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit) as stop:
            main([str(WORKER)])
        assert stop.value.code == 2 and message in capsys.readouterr().err
        monkeypatch.delenv(name)


def test_a_torchrun_standalone_command_line_is_taken() -> None:
    """torchrun's --standalone (one node, a local rendezvous on a free port)
    was "unrecognized arguments": it is what meshrun on one node does. Its
    documented line, --nnodes=1 included, passes; what it refuses is in
    test_usage_errors."""
    from mesh.launch.cli import _check, _split_target, build_parser
    p = build_parser()
    head, rest = _split_target(p, ["--standalone", "--nnodes=1", "--nproc-per-node=2",
                                   str(WORKER), "--standalone"])
    assert rest == ["--standalone"]     # (the script's own)
    a = p.parse_args(head)
    _check(p, a)
    assert a.standalone and a.nnodes == 1 and a.nproc == 2 and a.master_port is None


def test_no_python_says_why_a_file_that_is_there_cannot_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A script without its x bit, or one in the current directory named
    without ./, was 'no such program (not a file, nor on PATH)'. (Usage
    errors, refused in this process as in test_usage_errors.)"""
    from mesh.launch import main

    def refused(*args: str) -> str:
        with pytest.raises(SystemExit) as stop:
            main(["--no-python", *args])
        err = capsys.readouterr().err
        assert stop.value.code == 2, err
        return err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.sh").write_text("#!/bin/sh\necho hi\n")
    for args, message in ((("./job.sh",), "./job.sh: not executable (chmod +x ./job.sh)"),
                          (("job.sh",), "job.sh: not executable (chmod +x job.sh)")):
        err = refused(*args)
        assert message in err, err
    (tmp_path / "job.sh").chmod(0o755)
    assert "job.sh: not on PATH; give ./job.sh to run the file here" in refused("job.sh")


def test_a_script_that_is_not_python_is_a_usage_error_saying_no_python(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A shell script or a compiled program given without --no-python ran
    as Python on every rank, each failing with a SyntaxError in its second
    line (or a null byte's ValueError). A Python script with a #! line runs.
    (Usage errors, refused in this process as in test_usage_errors.)"""
    from mesh.launch.cli import _check, build_parser
    monkeypatch.chdir(tmp_path)
    files = {"job.sh": b"#!/bin/sh\necho hi\n",
             "job2.sh": b"#!/usr/bin/env -S bash -e\necho hi\n",
             "prog": b"\x7fELF\x02\x01\x01\x00" + bytes(64),
             "ok.py": b"#!/usr/bin/env python3\nprint('hi')\n",
             "plain.py": b"print('hi')\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    parser = build_parser()

    def check(*argv: str) -> str:
        with pytest.raises(SystemExit) as stop:
            _check(parser, parser.parse_args(["-n", "2", *argv]))
        err = capsys.readouterr().err
        assert stop.value.code == 2, err
        return err
    assert ("job.sh: a sh script (its first line: #!/bin/sh), not Python: run it with "
            "--no-python (meshrun -n 2 --no-python ./job.sh ...)") in check("job.sh")
    assert "job2.sh: a bash script (its first line: #!/usr/bin/env -S bash -e), not " \
           "Python" in check("job2.sh")
    assert "prog: a compiled program (ELF), not Python" in check("prog")
    for name in ("ok.py", "plain.py"):
        _check(parser, parser.parse_args(["-n", "2", name]))
    (tmp_path / "job.sh").chmod(0o755)
    _check(parser, parser.parse_args(["-n", "2", "--no-python", "./job.sh"]))


def test_a_module_found_nowhere_is_a_usage_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`meshrun -n 2 -m no_such_module` was reported by every rank (their
    'No module named'), where a script that is not there is refused up
    front. Looked for as the ranks' python -m will, the current directory
    first, a package's submodule in its folders, without importing it (its
    code is the ranks' to run); a module that is there but fails to import
    is the ranks' error."""
    from mesh.launch import main
    from mesh.launch.cli import _check, build_parser
    monkeypatch.chdir(tmp_path)
    for name in ("no_such_module_here", "no_such_package_here.train"):
        with pytest.raises(SystemExit) as stop:
            main(["-n", "2", "-m", name, "x"])
        err = capsys.readouterr().err
        assert stop.value.code == 2, err
        assert f"-m {name}: no module named '{name.split('.')[0]}' (looked for as the " \
               f"ranks' python -m will: in the current directory, then on sys.path)" in err, err
    (tmp_path / "here_only.py").write_text("")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "__init__.py").write_text("raise ImportError('broken')\n")
    (tmp_path / "broken" / "train.py").write_text("")
    (tmp_path / "grown").mkdir()      # (its __init__ may add what its folder lacks)
    (tmp_path / "grown" / "__init__.py").write_text(
        "import pkgutil\n__path__ = pkgutil.extend_path(__path__, __name__)\n")
    # a package that is there without the submodule (or __main__) to run: each rank
    # said "No module named ..."; refused, and the package is not imported here
    for name, why in (("broken.tarin", "no module named 'broken.tarin' (the package "
                                       f"'broken' is {tmp_path / 'broken'})"),
                      ("broken", "'broken' is a package without a __main__ module"),
                      ("here_only.x", "'here_only' ("),
                      ("json.nope", "no module named 'json.nope' (the package 'json' is ")):
        with pytest.raises(SystemExit) as stop:
            main(["-n", "2", "-m", name])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"-m {name}: {why}" in err, err
    parser = build_parser()
    for name in ("here_only", "broken.train", "json.tool", "grown.anything", "os.path"):
        _check(parser, parser.parse_args(["-n", "2", "-m", name]))     # not refused
    assert "broken" not in sys.modules and "here_only" not in sys.modules
    assert "grown" not in sys.modules


MESH_SCRIPT = SCRIPTS / "launch_mesh.py"


def test_workers_join_one_mesh_and_exchange_messages() -> None:
    r = meshrun("-n", "3", str(MESH_SCRIPT))
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == [
        "[0] rank 0 heard from [1, 2]", "[1] rank 1 got {'hello': 1}",
        "[2] rank 2 got {'hello': 2}"]


def test_a_rank_may_close_its_mesh_and_init_again(tmp_path: Path) -> None:
    """mesh.init() after the first mesh closed (torch's init_process_group
    after destroy_process_group): the launcher's rendezvous takes each
    rank's process again, for a new table."""
    script = tmp_path / "again.py"
    script.write_text("import numpy as np, mesh, collectives as C\n"
                      "for i in range(3):\n"
                      "    with mesh.init() as w:\n"
                      "        a = np.ones(1) * (i + 1)\n"
                      "        C.all_reduce(w, a)\n"
                      "        print(i, a[0], flush=True)\n")
    r = meshrun("-n", "2", str(script))
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == sorted(f"[{k}] {i} {2.0 * (i + 1)}"
                                                   for i in range(3) for k in (0, 1))


_AGAIN = ("import os, sys, time, numpy as np, mesh, collectives as C\n"
          "with mesh.init() as w:\n"
          "    C.all_reduce(w, np.ones(1))\n"
          "if w.rank == 1:\n"
          "    time.sleep(float(sys.argv[1]))\n"
          "    sys.exit(0)            # done: rank 0 goes on to a second phase alone\n"
          "with mesh.init() as w:\n"
          "    C.all_reduce(w, np.ones(1))\n")


def test_a_second_init_waiting_for_a_rank_that_ended_fails_at_once(tmp_path: Path) -> None:
    """Rank 1 closes its mesh and ends; rank 0 calls mesh.init() again. The
    launcher tells the rendezvous of every rank that ends, not only of those
    that never joined, so rank 0 fails at once naming rank 1, as in the
    first round: it waited in silence for its rendezvous timeout, then said
    the service never answered, and the report named no cause."""
    script = tmp_path / "second.py"
    script.write_text(_AGAIN)
    t0 = time.monotonic()
    r = meshrun("-n", "2", str(script), "0", MESH_RENDEZVOUS_TIMEOUT="45")
    assert r.returncode == 1, r.stderr
    assert "peer rank 1 is gone: it ended (exit code 0) before the mesh was complete" in r.stderr
    assert "Root cause: rank 1 finished (exit code 0) while rank 0 still waited" in r.stderr
    assert time.monotonic() - t0 < 35, r.stderr      # (not the 45 s timeout; a loaded machine
    #                                                   starts the interpreters slowly)


def test_a_second_init_says_whom_it_waits_for(tmp_path: Path) -> None:
    """A new round of the rendezvous that times out names the ranks that
    never arrived, as the first round does (it said the service never
    answered: not running, a wrong address or secret)."""
    script = tmp_path / "second.py"
    script.write_text(_AGAIN)
    # (--settle 0.5: rank 1 sleeps on; the test is rank 0's error, not how rank 1 ends)
    r = meshrun("-n", "2", "--settle", "0.5", str(script), "10", MESH_RENDEZVOUS_TIMEOUT="2")
    assert r.returncode == 1, r.stderr
    assert "timed out after 2s: ranks [1] never arrived" in r.stderr, r.stderr
    assert "never answered" not in r.stderr, r.stderr


@pytest.mark.parametrize("where", ["recv", "all_reduce"])
def test_an_error_that_says_nothing_is_named_without_a_dangling_colon(
        tmp_path: Path, where: str) -> None:
    """Rank 1 leaves on a KeyboardInterrupt (its str() is empty) while rank 0
    waits for it, before a receive or inside an all_reduce (a signal handler
    raises it there): rank 0's error (the goodbye's or the collective's
    abort) and the report say "KeyboardInterrupt", where they said
    "KeyboardInterrupt: "."""
    script = tmp_path / "kbi.py"
    script.write_text("import signal, sys, time, numpy as np, mesh, collectives as C\n"
                      "def interrupt(*_):\n"
                      "    raise KeyboardInterrupt\n"
                      "signal.signal(signal.SIGALRM, interrupt)\n"
                      "with mesh.init() as w:\n"
                      "    C.all_reduce(w, np.ones(1))\n"
                      "    if sys.argv[1] == 'recv':\n"
                      "        if w.rank == 1:\n"
                      "            raise KeyboardInterrupt\n"
                      "        w.recv(src=1)\n"
                      "    if w.rank == 1:\n"
                      "        signal.setitimer(signal.ITIMER_REAL, 0.5)  # (inside the call)\n"
                      "    else:        # (comes once rank 1 is gone, not after a fixed 2 s)\n"
                      "        while w._t.peer_state(1) == 'alive':\n"
                      "            time.sleep(0.01)\n"
                      "    C.all_reduce(w, np.ones(1))\n")
    r = meshrun("-n", "2", str(script), where)
    assert r.returncode == 130, r.stderr
    said = ("peer rank 1 is gone (it failed: KeyboardInterrupt)" if where == "recv" else
            "all_reduce #2 failed: KeyboardInterrupt")
    assert said in r.stderr, r.stderr
    assert "  error      : KeyboardInterrupt\n" in r.stderr, r.stderr
    assert "KeyboardInterrupt: " not in r.stderr, r.stderr


def test_a_rank_that_exits_saying_why_has_its_why_in_the_report(tmp_path: Path) -> None:
    """sys.exit("why") (SystemExit with a message: the interpreter prints it
    and exits 1) is the root cause's error, with the line that said it, where
    the table said "no traceback ... without an uncaught Python exception"."""
    script = tmp_path / "leave.py"
    script.write_text("import sys, mesh\n"
                      "with mesh.init() as w:\n"
                      "    if w.rank == 1:\n"
                      "        sys.exit('rank 1 needs an even world')\n"
                      "    w.recv(src=1)\n")
    r = meshrun("-n", "2", str(script))
    assert r.returncode == 1, r.stderr
    table = r.stderr[r.stderr.index("=" * 20):]
    assert "Root cause: rank 1 failed first" in table, table
    assert "  error      : SystemExit: rank 1 needs an even world\n" in table, table
    assert "sys.exit('rank 1 needs an even world')" in table, table
    assert "no traceback" not in table, table


@pytest.mark.timeout(60)
def test_a_rank_stopped_on_its_errors_way_out_of_its_mesh_is_still_the_root_cause(
        tmp_path: Path) -> None:
    """A rank's error that closed its ``with mesh.init()`` told its peers
    (its goodbye), which failed at once, and meshrun's stop came while the
    error still went its way out (here a handler of the program's that
    takes its time; under load, the interpreter alone: test_mesh_launch_nodes'
    slow-to-end case failed so): its record, written once the error reached
    the bootstrap, never was, and the table named rank 0's lost peer, exit
    code 1. The record is written before the goodbye goes: rank 1 is the
    root cause, with the code it was ending with. So is a survivor's lost
    peer that stops it, rank 2's, ended only by meshrun's stop as it exits
    (its ``atexit``, as torch's teardown on a loaded machine): it read "killed
    by SIGTERM (stopped by meshrun)", as if stopping it were a second cause."""
    script = tmp_path / "slow_out.py"
    script.write_text("import atexit, os, sys, time, mesh\n"
                      "class Slow:\n"
                      "    def __enter__(self): return self\n"
                      "    def __exit__(self, *exc):\n"
                      "        if exc[0] is SystemExit: time.sleep(120)\n"
                      "with Slow():\n"
                      "    with mesh.init() as w:\n"
                      "        if w.rank == 1:\n"
                      "            sys.exit(3)\n"
                      "        if w.rank == 2:\n"
                      "            atexit.register(time.sleep, 120)\n"
                      "        try:\n"
                      "            w.recv(src=1)\n"
                      "        finally:    # (rank 0 ends once rank 2 has recorded its error)\n"
                      "            t, err = time.monotonic(), os.environ['MESH_ERROR_FILE']\n"
                      "            while w.rank == 0 and time.monotonic() < t + 20 and not "
                      "os.path.exists(err.replace('rank0.', 'rank2.')):\n"
                      "                time.sleep(0.01)\n")
    r = meshrun("-n", "3", "--settle", "0.5", "--grace", "1", str(script), timeout=50)
    assert r.returncode == 3, r.stderr
    table = r.stderr[r.stderr.index("=" * 20):]
    assert "Root cause: rank 1 failed first" in table, table
    assert "  exit       : exit code 3 (as it recorded; killed by SIGTERM by meshrun's stop as " \
           "it was exiting)\n" in table, table
    assert "slow_out.py\", line 9, in <module>\n        sys.exit(3)\n" in table, table
    assert "\n  rank 0    exit code 1 (failed, a consequence); LostPeerError: " in table, table
    assert "\n  rank 2    exit code 1 (failed, a consequence; killed by SIGTERM by meshrun's " \
           "stop as it was exiting); LostPeerError: rank 2: recv from rank 1 " in table, table


def test_a_rank_interrupted_in_a_collective_is_a_lost_peer_to_the_others(
        tmp_path: Path) -> None:
    """Rank 1 leaves on Ctrl-C's KeyboardInterrupt inside an all_reduce that
    rank 0 waits in and rank 2 has not reached: rank 0 raised a plain
    MeshError, and rank 2, at the call once rank 1 was gone, "an earlier
    collective failed on a peer after it had finished here: ...
    broadcast_object #1 ..." (the watch of a call that had not failed; its
    LostPeerError without the peer). Both raise LostPeerError naming rank 1
    and the interrupt now."""
    script = tmp_path / "kbi3.py"
    script.write_text("import signal, time, numpy as np, mesh, collectives as C\n"
                      "def interrupt(*_):\n"
                      "    raise KeyboardInterrupt\n"
                      "signal.signal(signal.SIGALRM, interrupt)\n"
                      "with mesh.init() as w:\n"
                      "    C.broadcast_object(w, 'hi')    # (leaves a watch)\n"
                      "    if w.rank == 1:    # (once the others have finished it: a member\n"
                      "        w.recv(0), w.recv(2)   # gone fails the group's call in flight)\n"
                      "        signal.setitimer(signal.ITIMER_REAL, 0.5)  # (inside the call)\n"
                      "    else:\n"
                      "        w.send('done', 1)\n"
                      "    if w.rank == 2:    # (once rank 1 is gone, not after a fixed 2 s)\n"
                      "        while w._t.peer_state(1) == 'alive':\n"
                      "            time.sleep(0.01)\n"
                      "    try:\n"
                      "        C.all_reduce(w, np.ones(1))\n"
                      "    except mesh.MeshError as e:\n"
                      "        who = getattr(e, 'peer', None)\n"
                      "        print('SAID', type(e).__name__, who, e, flush=True)\n")
    r = meshrun("-n", "3", str(script))
    said = [ln.split(" ", 1)[1] for ln in r.stdout.splitlines() if ln.startswith(("[0] SAID",
                                                                                  "[2] SAID"))]
    assert len(said) == 2, (r.stdout, r.stderr)
    for line in said:
        assert line.startswith("SAID LostPeerError 1 rank "), line
        assert "rank 1 of group world: all_reduce #2 failed: KeyboardInterrupt" in line, line


def test_the_scripts_own_options_are_its_own(tmp_path: Path) -> None:
    """Options after the script go to it, even ones that look like a prefix
    of several of meshrun's (--m: --master-addr, --master-port, --module)."""
    script = tmp_path / "argv.py"
    script.write_text("import sys\nprint(sys.argv[1:])\n")
    r = meshrun("-n", "1", str(script), "--m", "4", "--n", "1", "--timeout", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "[0] ['--m', '4', '--n', '1', '--timeout', '5']\n", r.stdout + r.stderr


def test_a_double_dash_after_the_script_is_the_scripts(tmp_path: Path) -> None:
    """`meshrun train.py -- --x` ran train.py with ['--x']: argparse took the
    "--" for meshrun's; python and mpirun give the script ['--', '--x']. One
    before the script is meshrun's own (its end of options)."""
    script = tmp_path / "my dir" / "arg v.py"
    script.parent.mkdir()
    script.write_text("import sys\nprint(sys.argv[1:])\n")
    r = meshrun("-n", "1", str(script), "--", "--x", "--grace", "1")
    assert r.stdout == "[0] ['--', '--x', '--grace', '1']\n", r.stdout + r.stderr
    r = meshrun("--grace", "1", "--", str(script), "--", "a b")
    assert r.stdout == "[0] ['--', 'a b']\n", r.stdout + r.stderr


def test_a_script_that_sets_master_port_meets_there(tmp_path: Path) -> None:
    """torch's tutorials set MASTER_ADDR and MASTER_PORT in the script:
    under meshrun its ranks waited for each other until the job's timeout."""
    port = free_port()
    script = tmp_path / "tutorial.py"
    script.write_text("import os\n"
                      "os.environ['MASTER_ADDR'] = 'localhost'\n"
                      f"os.environ['MASTER_PORT'] = '{port}'\n"
                      "import mesh\n"
                      "with mesh.init() as world:\n"
                      "    print(world.rank, world.size, world.recv(1 - world.rank)\n"
                      "          if world.rank else world.send('hi', 1))\n")
    r = meshrun("-n", "2", "--timeout", "60", str(script))
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == ["[0] 0 2 None", "[1] 1 2 hi"], r.stdout


def test_a_rank_that_finishes_early_is_named_as_the_cause(tmp_path: Path) -> None:
    """Rank 2 returns while the others wait for it in a collective: they
    fail with LostPeerError at once, and the report names rank 2's exit,
    not the first survivor, as what went wrong."""
    script = tmp_path / "early.py"
    script.write_text("import numpy as np, mesh, collectives as C\n"
                      "with mesh.init() as w:\n"
                      "    C.barrier(w)\n"
                      "    if w.rank != 2:\n"
                      "        C.all_reduce(w, np.ones(4))\n")
    r = meshrun("-n", "3", str(script), timeout=60)
    assert r.returncode == 1, r.stderr
    assert re.search(r"Root cause: rank 2 finished \(exit code 0\) while rank [01] still "
                     r"waited for it", r.stderr), r.stderr
    assert "(failed, a consequence); LostPeerError" in r.stderr, r.stderr


def test_two_jobs_at_once_do_not_collide() -> None:
    jobs = [start("-n", "2", str(MESH_SCRIPT)) for _ in range(2)]
    try:
        results = [job.communicate(timeout=20) for job in jobs]
    finally:
        for job in jobs:
            job.kill()
    for job, (out, err) in zip(jobs, results):
        assert job.returncode == 0, err
        assert "[0] rank 0 heard from [1]" in out


def test_no_python_runs_a_program_under_the_same_supervision() -> None:
    r = meshrun("-n", "2", "--no-python", "sh", "-c",
                'echo "rank $RANK of $WORLD_SIZE"; exit $RANK')
    assert r.returncode == 1
    assert "[1] rank 1 of 2" in r.stdout
    assert "Root cause: rank 1 failed first" in r.stderr
    assert "no traceback: the program exited with code 1" in r.stderr
    assert "Python" not in r.stderr     # (the ranks ran sh, not Python)


def test_the_readme_names_every_option_of_the_launcher() -> None:
    """The README shows each of meshrun's options under one of its
    spellings (``--no-python`` was in none of its lines)."""
    from mesh.launch.cli import build_parser
    readme = (REPO / "README.md").read_text()
    missing = [a.option_strings for a in build_parser()._actions
               if a.option_strings and a.dest != "help"
               and not any(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", readme)
                           for o in a.option_strings)]
    assert not missing, missing


def _readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readmes_quick_start_prints_what_it_says(tmp_path: Path) -> None:
    """The Quick start's command, run as written from a checkout, prints the
    line the README shows (its figures aside); and "A first program", run
    under plain python, fails as the README says it does."""
    quick = _readme_section("Quick start")
    command = re.search(r"```\n(PYTHONPATH=\. python .*?)\s+#", quick).group(1).split()
    assert command[:2] == ["PYTHONPATH=.", "python"], command
    shown = re.search(r"prints rank 0's line, `(.*?), \.\.\.`", quick).group(1)
    pattern = re.escape(shown).replace(re.escape("24.4"), r"[\d.]+")
    env = _env()
    env["PYTHONPATH"] = "."
    r = subprocess.run([sys.executable, *command[2:]], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=25)
    assert r.returncode == 0, r.stderr
    assert re.match(pattern + ", ", r.stdout), (pattern, r.stdout)
    first = _readme_section("A first program")
    code = re.search(r"```python\n(.*?)```", first, re.S).group(1)
    said = re.search(r"fails at its send: `(.*?)`", " ".join(first.split())).group(1)
    (tmp_path / "first.py").write_text(code)
    r = subprocess.run([sys.executable, "first.py"], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=25)
    assert r.returncode == 1 and r.stderr.splitlines()[-1] == said, (said, r.stderr)


def test_help_says_every_node_needs_the_same_max_restarts() -> None:
    """``--max-restarts``'s help says what the README and node 0's refusal
    say: across hosts every node's meshrun is given the same N."""
    from mesh.launch.cli import build_parser
    text = " ".join(build_parser().format_help().split())
    assert "with --nnodes > 1 give every node's meshrun the same N" in text, text


def test_second_ctrl_c_kills_at_once(tmp_path: Path) -> None:
    proc = start("-n", "2", "--grace", "60", str(WORKER), str(tmp_path),
                 "*:ignoreterm", "*:barrier", "*:sleep")
    try:
        wait_for_files(tmp_path, 2, "*.ready")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "killed by SIGKILL (stopped by meshrun)" in err
    assert_all_gone(tmp_path, 2)


def test_mismatch_report_leads_with_the_root_cause_and_stays_short(tmp_path: Path) -> None:
    """Three ranks raise the same MismatchError: the report shows it once,
    with the root cause's traceback cut to the user's frames, one line for
    each other rank; --log-dir keeps every rank's whole traceback."""
    r = meshrun("-n", "3", "--log-dir", str(tmp_path), str(SCRIPTS / "launch_mismatch.py"))
    assert r.returncode == 1
    out = (r.stdout + r.stderr).splitlines()
    assert len(out) < 30, "\n".join(out)
    table = r.stderr[r.stderr.index("=" * 20):].splitlines()
    assert table[1].startswith("Root cause: rank ")
    root = int(table[1].split()[3])
    assert table[2].startswith("  error      : MismatchError: ")
    assert "shape=[4]" in table[2] and "shape=[5]" in table[2] and "rank 1 called" in table[2]
    assert sum("Traceback (most recent call last)" in ln for ln in out) == 1
    assert any("C.all_reduce(world, a)" in ln for ln in table)
    assert any("frames inside mesh/collectives/engine left out" in ln for ln in table)
    assert not any("collectives/runner.py" in ln for ln in out)
    others = table[table.index("Other ranks:") + 1:-1]
    assert sorted(int(ln.split()[1]) for ln in others) == sorted({0, 1, 2} - {root})
    assert all("MismatchError" in ln for ln in others)
    for rank in range(3):
        rec = json.loads((tmp_path / f"rank{rank}.error.json").read_text())
        assert rec["exc_type"] == "MismatchError"
        err = (tmp_path / f"rank{rank}.stderr.log").read_text()
        assert "Traceback (most recent call last)" in err
        assert "collectives/runner.py" in err and "launch_mismatch.py" in err


FAIL_SCRIPT = SCRIPTS / "launch_fail.py"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["with", "bare"])
def test_a_rank_that_raises_ends_the_job_at_once(mode: str) -> None:
    """Rank 2 raises while ranks 0 and 1 wait for it in a small all_reduce,
    inside ``with mesh.init()`` or with no close at all. Its goodbye says it
    failed: the others fail at once, naming it and its error, the launcher
    shows rank 2's own exception as the root cause, and no live rank is
    reported silent. With MESH_PEER_TIMEOUT=30, a job that waited on
    silence would still run when meshrun's --timeout stops it."""
    r = meshrun("--timeout", "20", "--grace", "3", "-n", "3", str(FAIL_SCRIPT), mode,
                timeout=40, MESH_PEER_TIMEOUT="30")
    ended = time.time()
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "Root cause: rank 2 failed first" in r.stderr, out
    assert "error      : RuntimeError: rank 2 fails on purpose" in r.stderr, out
    for rank in (0, 1):
        saw = [ln for ln in r.stdout.splitlines() if ln.startswith(f"[{rank}] saw ")]
        assert saw and "rank 2 is gone (it failed: RuntimeError: rank 2 fails on purpose)" \
            in saw[0], out
    assert not [ln for ln in out.splitlines() if "silent" in ln], out
    failed_at = [float(ln.split()[-1]) for ln in r.stdout.splitlines()
                 if ln.startswith("[2] failing at ")]
    assert failed_at and ended - failed_at[0] < 10, out


def test_the_report_leaves_out_an_error_raised_and_handled_inside_mesh() -> None:
    """An error the user sees, raised inside mesh while it handled one of
    its own (a collective's link across hosts closed: its private _Closed
    became the LostPeerError), is cut after the user's last call without
    the internal one before it ("During handling of the above exception"
    and link.py's frames: the report showed them); one of the user's own
    in the chain stays, and --log-dir's whole traceback keeps both. (no
    process)"""
    from mesh.launch._bootstrap import brief_traceback
    inside = {}
    exec(compile("class _Closed(Exception):\n    pass\n"
                 "def take():\n    raise _Closed('the link from it closed')\n"
                 "def recv():\n    try:\n        take()\n    except _Closed as e:\n"
                 "        if CAUSE:\n            raise RuntimeError('rank 1: lost') from e\n"
                 "        raise RuntimeError('rank 1: lost peer rank 3')\n"
                 "def call(fn):\n    try:\n        fn()\n    except ValueError:\n"
                 "        raise RuntimeError('rank 1: bad op')\n",
                 str(REPO / "collectives" / "host" / "fake_link.py"), "exec"), inside)

    def user() -> None:
        inside["recv"]()

    def user_op() -> None:
        raise ValueError("the user's own")

    for cause in (False, True):     # raised while handling it, and `from` it
        inside["CAUSE"] = cause
        try:
            user()
        except RuntimeError as e:
            brief = brief_traceback(e, e.__traceback__)
            whole = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        assert "_Closed" not in brief and "fake_link.py" not in brief, brief
        assert brief.count("Traceback (most recent call last)") == 1, brief
        assert "inside mesh/collectives/engine left out" in brief, brief
        assert "_Closed: the link from it closed" in whole, whole
    try:
        inside["call"](user_op)
    except RuntimeError as e:
        brief = brief_traceback(e, e.__traceback__)
    assert "ValueError: the user's own" in brief and "in user_op" in brief, brief


def test_a_rank_that_finishes_late_is_not_reported_lost() -> None:
    """Rank 0 works on (as if saving a checkpoint) longer than the peer
    timeout after the last collective, while rank 1 waits in its close:
    both keep beating, so nobody is reported lost and the job succeeds."""
    r = meshrun("-n", "2", str(FAIL_SCRIPT), "late", "3", MESH_PEER_TIMEOUT="2")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "lost peer" not in out and "silent" not in out, out


def test_a_world_the_open_files_limit_cannot_hold_is_a_usage_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    """-n past what the hard limit on open files allows each rank (five a
    peer) is refused before any worker starts, not warned about while
    thousands start. (In this process, as test_usage_errors: a meshrun
    started here inherits this process's limit.)"""
    from mesh.launch import main
    from mesh.limits import hard_open_files
    hard = hard_open_files()
    if hard is None:
        pytest.skip("no hard limit on open files here")
    with pytest.raises(SystemExit) as stop:
        main(["-n", str(hard // 4 + 1), str(WORKER)])
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert "open files a rank" in err and f"the hard limit is {hard}" in err


def test_a_lost_peer_that_ddp_rethrew_is_a_consequence_not_the_root_cause() -> None:
    """torch's DDP reducer rethrows a LostPeerError as RuntimeError('... got
    the following error ... LostPeerError: ...'): the SIGKILLed rank, not the
    survivor whose error says so, is the root cause (meshrun exits 137)."""
    from mesh.launch.records import JobOutcome, WorkerExit
    from mesh.launch.report import exit_code, format_report
    exits = [WorkerExit(3, 3, 103, 1, 10.0, False), WorkerExit(1, 1, 101, -9, 10.2, False)]
    records = {3: {"exc_type": "RuntimeError", "time": 10.0, "message":
                   "Got the following error when running the callback: LostPeerError: rank "
                   "3: all_reduce #101 on group world failed: peer rank 1 is gone"}}
    outcome = JobOutcome("failed", exits)
    report = format_report(outcome, records, 4)
    assert "Root cause: rank 1 failed first" in report, report
    assert "(failed, a consequence); RuntimeError" in report, report
    assert exit_code(outcome, records) == 137


@pytest.mark.parametrize("ours", [None, "sys.exit"])
def test_an_error_torchs_record_wrote_is_the_reports(tmp_path: Path, ours: str | None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank's TORCHELASTIC_ERROR_FILE, as torch's @record writes it, is
    its error in the table (and in its stderr log, unless its own Python
    printed it) where the bootstrap recorded none (--no-python running
    Python) or only the sys.exit that followed (the program caught it);
    the table names the file, as torchrun's error_file. (no process)"""
    torch_errors = pytest.importorskip("torch.distributed.elastic.multiprocessing.errors")
    from mesh.launch._bootstrap import write_error_record
    from mesh.launch.records import (JobOutcome, WorkerExit, elastic_error_file, error_file,
                                     log_tracebacks, read_records)
    from mesh.launch.report import format_report
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", elastic_error_file(str(tmp_path), 1))

    @torch_errors.record
    def main() -> None:
        _inner()
    with pytest.raises(KeyError):
        main()
    if ours:
        write_error_record(error_file(str(tmp_path), 1), SystemExit(2), "Traceback...\n")
    records = read_records(str(tmp_path), [0, 1], kept=True)
    assert records[1]["exc_type"] == "KeyError" and records[1]["message"] == "'missing key'"
    exits = [WorkerExit(0, 0, 100, 0, 9.0, False), WorkerExit(1, 1, 101, 2, 10.0, False)]
    report = format_report(JobOutcome("failed", exits), records, 2)
    assert "Root cause: rank 1 failed first\n  error      : KeyError: 'missing key'\n  rank" \
        f"       : 1 (node 0, local rank 1, pid 101, host {socket.gethostname()})" in report
    assert f"  error file : {elastic_error_file(str(tmp_path), 1)}\n" in report, report
    assert "in _inner\n" in report and '        {}["missing key"]' in report, report
    log_tracebacks(str(tmp_path), records)
    logged = (tmp_path / "rank1.stderr.log").read_text() if ours else None
    assert logged is None or "KeyError: 'missing key'" in logged


def _inner() -> None:
    {}["missing key"]


def test_a_job_stopped_with_no_failed_rank_lists_ranks_not_other_ranks() -> None:
    """Ctrl-C or --timeout with no rank failed: no first rank is shown, so
    the list is not of 'Other ranks:' (of none)."""
    from mesh.launch.records import JobOutcome, WorkerExit
    from mesh.launch.report import format_report
    exits = [WorkerExit(r, r, 100 + r, -15, 10.0, True) for r in (0, 1)]
    report = format_report(JobOutcome("signal", exits, signum=2), {}, 2)
    assert "meshrun: stopped by SIGINT\nRanks:\n  rank 0    killed by SIGTERM" in report, report
    assert "Other ranks" not in report, report


def test_a_rank_killed_as_it_exited_after_its_error_is_said_so() -> None:
    """A rank whose uncaught error was recorded before meshrun stopped the
    job, then killed by the SIGTERM while it still exited (torch's and its
    libraries' teardown under load): its line said only 'stopped by meshrun',
    as if it had run on, and where it was in the import machinery's words."""
    from mesh.launch.records import JobOutcome, WorkerExit
    from mesh.launch.report import format_report
    exits = [WorkerExit(2, 2, 102, -9, 9.0, False), WorkerExit(0, 0, 100, -15, 11.0, True),
             WorkerExit(1, 1, 101, -15, 11.0, True)]
    lost = {"exc_type": "RuntimeError", "message": "Got the following error when running the "
            "callback: LostPeerError: rank 0: all_reduce #17 on group world failed: peer rank "
            "2 is gone (its process 102 is gone)", "time": 9.5}
    report = format_report(JobOutcome("failed", exits, stop_time=10.0), {0: lost}, 4)
    assert "rank 0    killed by SIGTERM (stopped by meshrun as it exited after its error); " \
        "RuntimeError" in report, report
    assert "rank 1    killed by SIGTERM (stopped by meshrun)" in report, report


def test_where_a_rank_was_reads_as_its_call_or_its_line(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """What a stopped rank said (``_bootstrap.where``), in the table's words:
    the mesh call it waits in and the line that called it; the call it is in
    (through the libraries it calls: zmq's poll), not waiting; or its line;
    or, from one that gave no word, its main thread's frames in the stack
    faulthandler dumped (the bootstrap's left out; a line cut short, not yet
    written whole, too)."""
    from mesh.launch._bootstrap import where
    from mesh.launch.records import read_stack, where_text
    monkeypatch.chdir(REPO)     # (a file in it is named from there)
    job, own, lib = "/j/job.py", str(REPO / "mesh" / "world.py"), "/v/site-packages/zmq/poll.py"
    waiting = {"calls": [["recv from rank 0 (tag 7, group world)", 12.34]],
               "stack": [[own, 300, "recv", True, False], [job, 9, "main", False, False]]}
    assert where_text(waiting) == ("waiting 12.3 s in recv from rank 0 (tag 7, group world), "
                                   "called at /j/job.py:9 in main")
    elsewhere = {"calls": waiting["calls"], "stack": [[job, 3, "main", False, False]]}
    assert where_text(elsewhere).endswith("(tag 7, group world), its main thread at "
                                          "/j/job.py:3 in main")    # (another thread waits)
    inside = {"calls": [], "stack": [[lib, 106, "poll", False, True],
                                     [own, 347, "init", True, False],
                                     [job, 5, "<module>", False, False]]}
    assert where_text(inside) == "in init (mesh/world.py:347), called at /j/job.py:5 in <module>"
    running = {"calls": [], "step": None, "stack": [[job, 42, "step", False, False],
                                                    [job, 50, "main", False, False]]}
    assert where_text(running) == ("running at /j/job.py:42 in step (called from "
                                   "/j/job.py:50 in main)")
    importing = {"calls": [], "step": None, "stack": [
        ["<frozen importlib._bootstrap>", 241, "_call_with_frames_removed", False, False],
        ["<frozen importlib._bootstrap_external>", 1004, "source_to_code", False, False],
        [job, 7, "close", False, False], [job, 50, "main", False, False]]}
    assert where_text(importing) == ("running at /j/job.py:7 in close (called from "
                                     "/j/job.py:50 in main), importing a module")
    dumped = tmp_path / "rank2.stack.txt"
    dumped.write_text('main thread 0x7f00aa\nThread 0x00007f00bb (most recent call first):\n'
                      '  File "/v/threading.py", line 320 in wait\n\nCurrent thread 0x00007f00aa'
                      ' (most recent call first):\n  File "/j/job.py", line 12 in wedge\n'
                      '  File "/r/mesh/launch/_bootstrap.py", line 298 in _run\n  File "/j/jo')
    assert where_text({"dump": read_stack(str(dumped))}) == (
        "it gave no word of where it was: its Python stack (faulthandler): /j/job.py:12 in "
        "wedge; 1 other thread, innermost in wait")
    dumped.write_text("main thread 0x7f00aa\n")    # (nothing dumped: not asked, or not yet)
    assert read_stack(str(dumped)) is None
    here, line = where(sys._getframe()), sys._getframe().f_lineno   # (this test's frame)
    assert here["calls"] == [] and here["stack"][0] == [
        __file__, line, "test_where_a_rank_was_reads_as_its_call_or_its_line", False, False]


@pytest.mark.parametrize("record", [
    {"exc_type": "RuntimeError", "message": "Got the following error when running the "
     "callback: LostPeerError: rank 0: all_reduce #12 on group world failed: peer rank 1 is "
     "gone (it closed its mesh)"},
    {"exc_type": "LostPeerError", "peer": 1, "message": "rank 0: all_reduce #11 on group "
     "world: cannot read the board of rank 1 (no such process): it is gone"},
    {"exc_type": "LostPeerError", "peer": 1, "message": "rank 0: recv from rank 1 (tag 0, "
     "group world) failed: peer rank 1 is gone (its process 9 is gone)"}])
def test_a_rank_that_finished_while_others_waited_is_named_whatever_said_so(
        record: dict) -> None:
    """It was named only when the survivor's error said '(it closed its
    mesh)' and carried the peer: a rank leaving by os._exit(0), or DDP's
    RuntimeError around the lost peer, made the survivor the root cause."""
    from mesh.launch.records import JobOutcome, WorkerExit
    from mesh.launch.report import format_report
    exits = [WorkerExit(1, 1, 101, 0, 9.0, False), WorkerExit(0, 0, 100, 1, 10.0, False)]
    report = format_report(JobOutcome("failed", exits), {0: dict(record, time=10.0)}, 2)
    assert "Root cause: rank 1 finished (exit code 0) while rank 0 still waited for it" \
        in report, report


def test_a_forked_childs_uncaught_error_is_printed_whole_and_is_not_the_ranks(
        tmp_path: Path) -> None:
    """The child's error was written as its rank's error record (the rank's
    own, if it failed later, would have been the child's) and printed as
    one line promising a report that never came (the job succeeded)."""
    script = tmp_path / "forker.py"
    script.write_text(
        "import os\nimport mesh\nwith mesh.init() as world:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        raise RuntimeError('the child failed')\n"
        "    os.waitpid(pid, 0)\n"
        "    print('parent done', flush=True)\n")
    out = meshrun("-n", "2", str(script))
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert text.count("Traceback (most recent call last)") == 2, text
    assert "RuntimeError: the child failed" in text and "reports it at the end" not in text
    assert text.count("parent done") == 2, text


@pytest.mark.parametrize("ddp", [False, True], ids=["LostPeerError", "ddp"])
def test_a_stopped_rank_its_peers_gave_up_is_the_root_cause_not_the_first_survivor(
        ddp: bool) -> None:
    """A rank stopped (SIGSTOP, a debugger) or silent until its peers declared
    it lost never ends by itself: meshrun kills it after the others fail, so
    it was never a candidate and the table blamed the first survivor's
    LostPeerError ("Root cause: rank 5 failed first"). So it did where
    torch's DDP rethrew that as a RuntimeError (no peer kept: its text names
    it); and the cause the other nodes' meshruns print (their restart line)
    named the survivor, as another's failure, not the stopped rank here."""
    from mesh.launch.records import JobOutcome, WorkerExit
    from mesh.launch.report import cause, format_report
    msg = ("rank 5: all_reduce #666 on group world aborted: rank 9 of group world: all_reduce "
           "#666 on group world failed: peer rank 3 is gone (silent for 10.1s; its process 14 "
           "is stopped: SIGSTOP, Ctrl-Z or a debugger; lost to this job even if resumed)")
    exits = [WorkerExit(5, 5, 105, 1, 10.0, False), WorkerExit(0, 0, 100, 1, 10.1, False),
             WorkerExit(3, 3, 103, -9, 19.0, True)]
    kind = {"exc_type": "RuntimeError", "message": "Got the following error when running the "
            "callback: LostPeerError: " + msg} if ddp else \
        {"exc_type": "LostPeerError", "from_abort": True, "peer": 3, "message": msg}
    records = {5: dict(kind, time=10.0),
               0: {"exc_type": "LostPeerError", "peer": 3, "message": msg, "time": 10.1}}
    outcome = JobOutcome("failed", exits)
    report = format_report(outcome, records, 8)
    head = report.splitlines()[1]
    assert head.startswith("Root cause: rank 3 was lost"), report
    assert "rank 5 reported it first" in head, report
    assert f"  error      : {kind['exc_type']}: " in report and msg in report, report
    why, own = cause(outcome, records)
    assert why.startswith("rank 3 was lost and then stopped by meshrun (killed by SIGKILL); "
                          "rank 5 reported it: ") and own, why


def test_a_rank_of_another_node_that_ddp_names_is_the_root_cause(tmp_path: Path) -> None:
    """Node 0's rank 0 raised DDP's RuntimeError around a LostPeerError for
    rank 3 of node 1 (stopped there, so node 1's word came later): the table
    blamed rank 0 ("Root cause: rank 0 failed first"), not the rank lost.
    Where the ranks left where each rank is (a job across hosts), the table
    names each by its own host, rank 3 of node 1 too, not by this meshrun's
    host name (which network namespaces of one machine share)."""
    from mesh.launch.records import JobOutcome, WorkerExit
    from mesh.rendezvous import read_hosts, tell_hosts
    from mesh.launch.report import format_report, lost_nodes
    exits = [WorkerExit(0, 0, 100, 1, 10.0, False), WorkerExit(1, 1, 101, 1, 10.1, False)]
    records = {r: {"exc_type": "RuntimeError", "time": 10.0 + r / 10, "message":
                   "Got the following error when running the callback: LostPeerError: rank "
                   f"{r}: all_reduce #103 on group world/column{r} aborted: peer world rank 3 "
                   "is gone (silent for 3.2s)"} for r in (0, 1)}
    report = format_report(JobOutcome("failed", exits), records, 2)
    assert "Root cause: rank 3 (node 1) was lost, a rank of another node (its meshrun " \
        "reports why, unless it is gone too); rank 0 here reported it first:" in report, report
    assert f"pid 100, host {socket.gethostname()})" in report, report
    assert lost_nodes(JobOutcome("failed", exits), records, 2) == [1]
    assert read_hosts(str(tmp_path)) == {}
    tell_hosts(str(tmp_path), ["10.77.0.1", "10.77.0.1", "10.77.0.2", "10.77.0.2"],
               [100, 101, 102, 103])
    tell_hosts(str(tmp_path), ["x"] * 4, [0] * 4)       # (a folder's first word stays)
    hosts = read_hosts(str(tmp_path))
    assert hosts[3] == ("10.77.0.2", 103) and len(hosts) == 4
    report = format_report(JobOutcome("failed", exits), records, 2, hosts=hosts)
    assert "Root cause: rank 3 (node 1, on host 10.77.0.2, pid 103) was lost, a rank of " \
        "another node" in report, report
    assert "  rank       : 0 (node 0, local rank 0, pid 100, host 10.77.0.1)" in report, report


_CUT = ("rank {r}: all_reduce (column all_reduce) #136 on group world/column{r}: recv from rank "
        "1 (world rank {p}, on host 10.77.0.2, pid 4{p}) aborted: ")
_SAW = "peer world rank 2 (on host 10.77.0.2, pid 42) is gone (silent for 2.0s)"


@pytest.mark.parametrize("wrap", ["", "Got the following error when running the callback: "
                                      "LostPeerError: "], ids=["LostPeerError", "ddp"])
def test_a_rank_that_saw_a_cut_links_loss_itself_is_the_root_cause_not_one_it_told(
        wrap: str) -> None:
    """The link to node 1 cut: rank 1's phase of an all_reduce lost rank 2
    (its own loss: ``aborted: peer world rank 2 is gone``) and it aborted
    the call on rank 0, which raised that relayed abort ``aborted: rank 1 of
    group world: ...`` and recorded it first (rank 1 had more to do before
    its raise). The table named rank 0, whose error only quotes rank 1's,
    as the one that reported the loss first; rank 1 is, rank 0 a
    consequence. Records as two namespaces with their link cut wrote them
    (so DDP's RuntimeError around them)."""
    from mesh.launch.records import JobOutcome, WorkerExit
    from mesh.launch.report import cause, format_report, lost_nodes
    saw = _CUT.format(r=1, p=3) + _SAW
    told = _CUT.format(r=0, p=2) + "rank 1 of group world: all_reduce #45 failed: " \
        "LostPeerError: " + saw
    kind = {"exc_type": "RuntimeError"} if wrap else \
        {"exc_type": "LostPeerError", "from_abort": True, "peer": 2}
    records = {0: dict(kind, message=wrap + told, time=33.441),
               1: dict(kind, message=wrap + saw, time=33.503)}
    exits = [WorkerExit(0, 0, 100, 1, 33.6, False), WorkerExit(1, 1, 101, 1, 33.7, False)]
    outcome = JobOutcome("failed", exits)
    report = format_report(outcome, records, 2)
    assert "Root cause: rank 2 (node 1) was lost, a rank of another node (its meshrun " \
        "reports why, unless it is gone too); rank 1 here reported it first:\n  error      : " \
        f"{kind['exc_type']}: {wrap}{saw}\n  rank       : 1 (node 0, local rank 1" in report, \
        report
    assert "\n  rank 0    exit code 1 (failed, a consequence); " in report, report
    assert lost_nodes(outcome, records, 2) == [1]
    assert cause(outcome, records)[0].startswith("rank 1 failed (exit code 1): "), report
    # relayed in a sub-group (its member's world rank said), its own abort quoted (as
    # before), an engine error telling of rank 1's
    sub = dict(records[0], message=wrap + _CUT.format(r=0, p=2) + "rank 0 of group g (world "
               f"rank 1, on host 10.77.0.1, pid 41): {saw}")
    assert "rank 1 here reported it first" in format_report(
        JobOutcome("failed", exits), {**records, 0: sub}, 2)
    own = dict(records[0], message=wrap + _CUT.format(r=0, p=2) + f"rank 0 of group world: {saw}")
    assert "rank 0 here reported it first" in format_report(
        JobOutcome("failed", exits), {**records, 0: own}, 2)
    told = {"exc_type": "DistributeFailed", "from_abort": True, "time": 33.441,
            "message": f"rank 0: engine.distribute failed on rank 1: LostPeerError: {saw}"}
    assert "rank 1 here reported it first" in format_report(
        JobOutcome("failed", exits), {**records, 0: told}, 2)


@pytest.mark.parametrize("said", [
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
    "[127.0.0.1]:22936: Connection reset by peer. This is typically caused by a remote worker "
    "hanging or bugs in the application.",
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
    "by peer [127.0.0.1]:22223. This is typically caused by a remote worker crashing."])
def test_a_gloo_survivors_error_is_a_consequence_of_the_rank_killed(said: str) -> None:
    """pytorch/examples' multigpu_torchrun.py on backend "gloo" under meshrun,
    rank 1 SIGKILLed mid-epoch: rank 0's gloo error (recorded at 43.005)
    came before meshrun reaped rank 1 (43.1), and the table said "Root
    cause: rank 0 failed first", rank 1 "killed by SIGKILL (failed on its
    own)" beside it: gloo's peer-gone errors name no rank, but are a
    consequence, as meshrun's LostPeerError is."""
    from mesh.launch.records import JobOutcome, WorkerExit
    from mesh.launch.report import cause, format_report
    exits = [WorkerExit(0, 0, 100, 1, 43.2, False), WorkerExit(1, 1, 101, -9, 43.1, False)]
    records = {0: {"exc_type": "RuntimeError", "message": said, "time": 43.005}}
    report = format_report(JobOutcome("failed", exits), records, 2)
    assert "Root cause: rank 1 failed first" in report, report
    assert "  exit       : killed by SIGKILL" in report, report
    assert "\n  rank 0    exit code 1 (failed, a consequence); RuntimeError: " in report, report
    assert cause(JobOutcome("failed", exits), records)[0].startswith("rank 1 "), report
    # gloo's own failures stay the rank's own: a timeout, a size mismatch
    own = {0: {"exc_type": "RuntimeError", "time": 43.005, "message": "[../third_party/gloo/"
               "gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for recv"}}
    assert "Root cause: rank 0 failed first" in format_report(
        JobOutcome("failed", exits), own, 2)
