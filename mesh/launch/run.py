"""One host's share of a meshrun job from start to exit code
(mesh.launch.cli parses the command line): each worker's place in the job
(its environment, its command), node 0's rendezvous service, and the
run/restart loop: a try of the job's ranks (``_attempt``), tried again
after a failure while --max-restarts allows (``launch``), across hosts
together with every node's meshrun (``_launch_together``)."""
from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from typing import Any

from ..env import launcher_seal, torchrun_env
from ..limits import open_files, thread_share
from ..auth import curve_wanted
from ..peer import config_float
from ..rdvlaunch import (Teller, job_folder, read_hosts, remove_run_folder, run_folder,
                         tell_ended)
from .records import (WorkerExit, WorkerSpec, elastic_error_file, error_file, log_tracebacks,
                      drop_unused_stacks, read_records, read_wheres, stack_file, where_file)
from .report import cause, exit_code, format_report, lost_nodes
from .supervise import Job
from .tries import Agent, Tries

__all__ = ["launch"]

_BOOTSTRAP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bootstrap.py")


def _worker_env(a: argparse.Namespace, local_rank: int, port: int, secret: str,
                run_dir: str, err_dir: str, run_id: str = "",
                restart: int = 0) -> dict[str, str]:
    """A rank's environment: torchrun's variables, with torchrun's meanings
    (``torchrun_env``; TORCHELASTIC_ERROR_FILE: where @record writes, read
    for the report), and meshrun's own."""
    rank = a.node_rank * a.nproc + local_rank
    env = dict(os.environ)
    share = thread_share(env, a.nproc)
    if share is not None:
        env["OMP_NUM_THREADS"] = share
    env.update(torchrun_env(env, rank, a.nnodes * a.nproc, local_rank, a.nproc, a.master_addr,
                            port, run_id or "none", node_rank=a.node_rank, nnodes=a.nnodes,
                            restart=restart, max_restarts=a.max_restarts))
    env.update({
        "MESH_SECRET": secret, "MESH_LAUNCHER": "1", "MESH_NODE_RANK": str(a.node_rank),
        "MESH_RESTART_COUNT": str(restart),
        "MESH_LAUNCHER_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1",
        "MESH_RUNTIME_DIR": run_dir,
        "MESH_ERROR_FILE": error_file(err_dir, rank),
        "TORCHELASTIC_ERROR_FILE": elastic_error_file(err_dir, rank),     # (torch's @record's)
    })
    if a.curve:
        env["MESH_CURVE"] = "1"
    env["MESH_LAUNCHER_SEAL"] = launcher_seal(env)   # (what a launcher inside a rank changes)
    return env


def _worker_argv(a: argparse.Namespace) -> list[str]:
    mode = ["-m"] if a.module else ["--exec"] if a.no_python else []
    return [sys.executable, _BOOTSTRAP, *mode, a.target, *a.args]


def _serve_rendezvous(a: argparse.Namespace, secret: str, tries: Tries | None = None) -> Any:
    """Start the rendezvous service (node 0 only); it binds the given port or
    port 0 and the bound port is what workers are told, never a guess.
    ``tries``: it also runs the tries of every node's meshrun."""
    from ..rdvserver import RendezvousServer
    host = "*" if a.nnodes > 1 else a.master_addr
    srv = RendezvousServer(a.nnodes * a.nproc, secret, host=host, port=a.master_port or 0,
                           curve=a.curve or curve_wanted(), tries=tries)
    srv.start()
    if a.nnodes > 1:
        print(f"meshrun: node 0 serves the rendezvous on port {srv.port}",
              file=sys.stderr, flush=True)
    return srv


def _close_bounded(srv: Any, seconds: float = 5.0) -> None:
    t = threading.Thread(target=srv.close, name="meshrun-rdzv-close", daemon=True)
    t.start()
    t.join(seconds)


def launch(a: argparse.Namespace) -> int:
    """Run one host's share of the job, and run it again after a failure
    while --max-restarts allows; returns meshrun's exit code."""
    given = os.environ.get("MESH_SECRET")
    open_files(5 * a.nproc + 256, f"meshrun -n {a.nproc}")  # pipes, logs, connections
    run_id = _run_id(given)
    deadline = None if a.timeout is None else time.monotonic() + a.timeout
    _clear_earlier_tries(a)
    try:
        return _launch(a, given, run_id, deadline)
    finally:    # what the tries kept for each other (hvd.elastic's commits): a later
        shutil.rmtree(job_folder(run_id), ignore_errors=True)   # job starts afresh


def _launch(a: argparse.Namespace, given: str | None, run_id: str,
            deadline: float | None) -> int:
    if given and a.nnodes > 1 and a.max_restarts:
        return _launch_together(a, given, run_id, deadline)
    restart = 0
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        # (a fresh secret for each try of a job whose secret is meshrun's: nothing the
        # last try's ranks left running can join the next try's rendezvous)
        code, again, _ = _attempt(a, given or secrets.token_hex(16), run_id, restart, left)
        if not again or (deadline is not None and time.monotonic() >= deadline):
            return code
        if restart >= a.max_restarts:
            if a.max_restarts:
                print(f"meshrun: no restarts left (--max-restarts {a.max_restarts}): the job "
                      f"failed {restart + 1} times; exit code {code}, the last failure's",
                      file=sys.stderr, flush=True)
            return code
        restart += 1
        _say_again(a, restart)


def _say_again(a: argparse.Namespace, restart: int, why: str = "") -> None:
    """meshrun's line as it starts the ranks again (``why``: the failure, on
    whichever node, of a job across hosts)."""
    logs = f"; logs in {_try_logs(a, restart)}" if a.log_dir else ""
    after = f" on every node, after {why}" if why else ""
    print(f"meshrun: starting every rank again (restart {restart} of {a.max_restarts}: "
          f"TORCHELASTIC_RESTART_COUNT={restart}{logs}){after}", file=sys.stderr, flush=True)


def _launch_together(a: argparse.Namespace, secret: str, run_id: str,
                     deadline: float | None) -> int:
    """launch() for a job of several nodes with --max-restarts: every node's
    meshrun starts each try together, stops it at the first failure of any
    node, and then runs the next try or ends, as node 0's ``Tries`` says
    (mesh.launch.tries), through node 0's rendezvous service, which stays
    for the whole job (its port too)."""
    silent = config_float("MESH_PEER_TIMEOUT", 10.0, above=0)
    srv = None
    if a.node_rank == 0:
        srv = _serve_rendezvous(a, secret, Tries(a.nnodes, a.nproc, a.max_restarts, silent))
    agent = Agent(a.master_addr, srv.port if srv else a.master_port, secret,
                  a.curve or curve_wanted(), a.node_rank, a.nnodes, a.nproc, a.max_restarts,
                  silent)
    wait = config_float("MESH_RENDEZVOUS_TIMEOUT", 120.0, above=0)
    code, restart = 1, 0
    try:
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            word = agent.start(restart, wait if left is None else max(0.0, min(wait, left)))
            if word["say"] == "go":
                code, again, why = _attempt(a, secret, run_id, restart, left, srv, agent)
                timed_out = deadline is not None and time.monotonic() >= deadline
                word = agent.ended(code, again and not timed_out, *why)
            if word["say"] == "again":
                restart = word["try"]
                _say_again(a, restart, str(word.get("why")))
                continue
            if word.get("ok"):
                return code
            if word["say"] == "refused":
                print(f"meshrun: node 0's meshrun refused node {a.node_rank}'s: "
                      f"{word.get('why')}", file=sys.stderr, flush=True)
                return 1
            code = code or 1
            if word.get("exhausted"):
                code = int(word.get("code") or code)
                print(f"meshrun: no restarts left (--max-restarts {a.max_restarts}): the job "
                      f"failed {restart + 1} times; exit code {code}; the last try failed "
                      f"first on {word.get('why')}", file=sys.stderr, flush=True)
            else:
                print(f"meshrun: no restart: {word.get('why')}", file=sys.stderr, flush=True)
            return code
    finally:
        agent.close()
        if srv is not None:     # (the other nodes' meshruns hear how the job ends first)
            give_up = time.monotonic() + 5.0
            while not srv.tries.settled() and time.monotonic() < give_up:
                time.sleep(0.05)
            _close_bounded(srv)


def _shown(a: argparse.Namespace, local_rank: int) -> tuple[str, ...]:
    """The streams of a local rank that the console shows, as torchrun's
    options say: those of the ranks of --local-ranks-filter (every rank's
    without it), less those --redirects sends to --log-dir alone (unless
    --tee names them too: a stream both redirected and teed is teed)."""
    if a.local_ranks_filter and local_rank not in a.local_ranks_filter:
        return ()
    hidden = a.redirects.get(local_rank, 0) & ~a.tee.get(local_rank, 0)
    return tuple(name for bit, name in ((1, "stdout"), (2, "stderr")) if not hidden & bit)


def _try_logs(a: argparse.Namespace, restart: int) -> str | None:
    """Where a try's logs go: --log-dir, or with --max-restarts its
    attempt_<N> folder there (N: the try's TORCHELASTIC_RESTART_COUNT), as
    torchrun keeps each try's."""
    if not a.log_dir or not a.max_restarts:
        return a.log_dir
    return os.path.join(a.log_dir, f"attempt_{restart}")


def _clear_earlier_tries(a: argparse.Namespace) -> None:
    """Remove this node's ranks' files from the ``attempt_<N>`` folders an
    earlier job left in --log-dir (and each folder left empty), as torchrun
    clears a try's folder before it: an earlier job's attempt_3 stood beside
    this job's attempt_0, as if it were one of its tries. The other nodes'
    files, in a folder they share, are theirs to clear."""
    if not a.log_dir or not a.max_restarts or not os.path.isdir(a.log_dir):
        return
    ours = tuple(f"rank{a.node_rank * a.nproc + local}." for local in range(a.nproc))
    for name in os.listdir(a.log_dir):
        folder = os.path.join(a.log_dir, name)
        if not (name.startswith("attempt_") and name[8:].isdigit() and os.path.isdir(folder)):
            continue
        for file in os.listdir(folder):
            if file.startswith(ours):
                try:
                    os.unlink(os.path.join(folder, file))
                except OSError:
                    pass
        try:
            os.rmdir(folder)
        except OSError:     # (not empty: another node's files, or the user's)
            pass


def _run_id(secret: str | None) -> str:
    """TORCHELASTIC_RUN_ID, the job's id (torchrun's --rdzv-id): the same on
    every node and for every restart; derived from the secret the nodes share,
    which it does not reveal, else new for a job on one host."""
    if secret is None:
        return secrets.token_hex(8)
    return hashlib.sha256(b"meshrun run id\0" + secret.encode()).hexdigest()[:16]


def _attempt(a: argparse.Namespace, secret: str, run_id: str, restart: int,
             timeout: float | None, kept: Any = None,
             agent: Agent | None = None) -> tuple[int, bool, tuple[str, bool]]:
    """Run the job's ranks once, each try with its own rendezvous service
    (a port of its own unless --master-port; ``kept``: node 0's service of
    every try) and run folder; returns the exit code, whether the job may be
    started again (a rank failed; not a signal to meshrun, a timeout, or a
    reader gone) and why it ended (``report.cause``: why, and whether it is
    of this node's own). ``agent``: the other nodes' meshruns hear of a
    rank's failure here, and may stop the try."""
    run_dir = run_folder("meshrun")
    log_dir = _try_logs(a, restart)
    err_dir = log_dir or run_dir
    srv = None
    try:
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
        port = a.master_port if kept is None else kept.port
        if a.node_rank == 0 and kept is None:
            srv = _serve_rendezvous(a, secret)
            port = srv.port
        specs = []
        for local in range(a.nproc):
            env = _worker_env(a, local, int(port or 0), secret, run_dir, err_dir, run_id,
                              restart)
            rank = int(env["RANK"])     # rank 0 reads meshrun's stdin, as under mpirun
            where, stack = where_file(err_dir, rank), stack_file(err_dir, rank)
            for path in (env["MESH_ERROR_FILE"], env["TORCHELASTIC_ERROR_FILE"], where, stack):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            specs.append(WorkerSpec(rank, local, _worker_argv(a), env, stdin=rank == 0,
                                    where=where, stack=stack, shown=_shown(a, local)))
        teller = Teller(a.master_addr, int(port or 0), secret, a.nnodes * a.nproc,
                        a.curve or curve_wanted(), restart)

        def ended(e: WorkerExit) -> None:    # the ranks waiting for it to join hear it
            # (after a table too: a mesh.init() after a close waits); one this meshrun
            # stopped too (Ctrl-C, --timeout): the other nodes' ranks waited 120 s for it
            stopped = f", stopped by node {a.node_rank}'s meshrun" if e.after_stop else ""
            teller.ended(e.rank, e.describe() + stopped, e.pid)
            tell_ended(run_dir, e.rank, e.describe() + stopped)     # (its ranks here hear it)
            if agent is not None and e.failed and not e.after_stop:
                agent.failed(f"rank {e.rank} ended ({e.describe()})")
        job = Job(grace=a.grace, log_dir=log_dir, scratch=run_dir, settle=a.settle,
                  stall=a.output_stall, on_exit=ended, prefix=a.prefix)
        if agent is not None:
            agent.watch(job.stop)
        report = ""     # written after the relayed output, through the same writer
        why = ("", False)
        again = False
        try:
            try:
                outcome = job.run(specs, timeout=timeout)
            finally:
                teller.close()
            records = read_records(err_dir, (e.rank for e in outcome.exits),
                                   kept=bool(log_dir))
            if log_dir:
                log_tracebacks(log_dir, records)
            piped = outcome.reason == "signal" and outcome.signum == signal.SIGPIPE
            if outcome.reason != "ok" and not piped:    # (`| head`: as quiet as `yes | head`)
                gone: dict[int, str] = {}   # (a node lost with its meshrun: that says nothing)
                if agent is not None:
                    gone = {n: how for n in set(lost_nodes(outcome, records, a.nproc))
                            if (how := agent.gone(n))}
                wheres = read_wheres(err_dir, outcome.asked)
                report = format_report(outcome, records, a.nproc, a.timeout, a.no_python, gone,
                                       wheres, read_hosts(run_dir), job.tails())
            if log_dir:
                drop_unused_stacks(s.stack for s in specs)
            code = exit_code(outcome, records)
            why = cause(outcome, records, a.timeout)
            again = outcome.reason in ("failed", "lost") and not outcome.interrupted \
                and not job.reader_gone
        finally:
            write_failed = job.close(report)
        return (1 if write_failed and code == 0 else code), again and not write_failed, why
    finally:
        if srv is not None:
            _close_bounded(srv)
        remove_run_folder(run_dir)
