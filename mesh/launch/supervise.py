"""Supervision of one meshrun job's workers: start them, notice the first
failure, and tear everything down within bounded time.

Each worker leads its own process group, so a kill reaches its children too.
A worker's exit is noticed with ``waitid(WNOWAIT)``: the zombie still holds
its pid, so its group id cannot be reused while the launcher kills what is
left in the group, and only then is it reaped. The watchdog (watchdog.py)
kills every group if the launcher itself dies.
"""
from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from typing import BinaryIO, Callable, Sequence, TextIO

from .asking import Asking
from .records import JobOutcome, WorkerExit, WorkerSpec
from .relay import Sink, Stream
from .watchdog import Watchdog

__all__ = ["Job"]

_POLL_S = 0.1  # fallback exit check when no SIGCHLD wakes the loop
_REAP_S = 5.0  # how long SIGKILLed processes get to disappear
_DRAIN_S = 1.0  # how long to keep reading output after the last exit
_ASKED_POLL_S = 0.01


class _Proc:
    def __init__(self, spec: WorkerSpec, popen: subprocess.Popen[bytes]) -> None:
        self.spec, self.popen, self.pid = spec, popen, popen.pid
        self.exit: WorkerExit | None = None


class Job:
    """Starts workers and supervises them until all have ended.

    run() returns once every worker has been reaped: all succeeded, or the
    first failure / a signal to the launcher / the job timeout stopped the
    rest with SIGTERM, then SIGKILL after ``grace`` seconds; before the
    SIGTERM each rank is asked where it is (``_bootstrap.SAY_WHERE``;
    ``asking.Asking``), and given up to a second (no more than ``settle``)
    to write it to its ``WorkerSpec.where``, for the report; one that gives
    no word (wedged in native code) is sent ``_bootstrap.DUMP_STACK``, and
    faulthandler gets up to 0.2 s more to dump its stack to
    ``WorkerSpec.stack``. ``log_dir`` gets each rank's raw output; the
    console its streams ``WorkerSpec.shown``, each line prefixed with the
    rank unless ``prefix`` is False, and ``tails`` the last lines of each
    stderr it did not show (for the report);
    ``scratch`` is a directory the watchdog removes if the launcher dies
    (else removing it is the caller's business).
    ``settle``: how long the first failure lets the others end on their own
    before they are stopped: ranks told of a failure end with errors of
    their own, and the one that failed first may not be the first to end.
    The relayed output still queued is written by ``close``, after run(),
    for as long as each reader takes some of it within ``stall`` seconds."""

    def __init__(self, grace: float = 5.0, log_dir: str | None = None,
                 scratch: str | None = None, stdout: BinaryIO | None = None,
                 stderr: BinaryIO | None = None,
                 settle: float = 0.0, stall: float = 5.0,
                 on_exit: Callable[[WorkerExit], None] | None = None,
                 prefix: bool = True) -> None:
        self.grace = grace
        self.prefix = prefix
        self.settle = settle
        self.stall = stall
        self.on_exit = on_exit      # told of each worker's end, as it is reaped
        self.log_dir = log_dir
        self.scratch = scratch
        self._out = Sink(stdout or _own(sys.stdout), stall, self._reader_gone)
        self._err = Sink(stderr or _own(sys.stderr), stall, self._reader_gone)
        self.reader_gone = False    # a reader of meshrun's output went away (EPIPE)
        if _one_file(self._out, self._err):
            self._err.share_lines(self._out)
        self._procs: list[_Proc] = []
        self._sel = selectors.DefaultSelector()
        self._paused: dict[int, Stream] = {}   # pipes left unread while their sink is full
        self._unshown: dict[int, Stream] = {}  # the stderr the console does not show, by rank
        self._signals: list[int] = []
        self._watchdog: Watchdog | None = None
        self._told = ""             # why another node's meshrun stops this try (``stop``)
        self._asking = Asking()     # the ranks asked where they are, as the job stops
        self._wake = -1             # the loop's wake-up pipe, while it runs
        self._wake_lock = threading.Lock()

    def _start(self, specs: Sequence[WorkerSpec]) -> None:
        """Start every worker, each in a new session (its own process group)."""
        self._watchdog = Watchdog(self.scratch)
        for spec in specs:
            if self._signals or self.reader_gone:   # stopped while starting (a big -n)
                break
            popen = subprocess.Popen(list(spec.argv), env=dict(spec.env),
                                     stdin=None if spec.stdin else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
            self._watchdog.add(popen.pid)
            self._procs.append(_Proc(spec, popen))
            for name, pipe, sink in (("stdout", popen.stdout, self._out),
                                     ("stderr", popen.stderr, self._err)):
                assert pipe is not None
                fd = os.dup(pipe.fileno())
                pipe.close()
                os.set_blocking(fd, False)
                log = (open(os.path.join(self.log_dir, f"rank{spec.rank}.{name}.log"), "wb")
                       if self.log_dir else None)
                stream = Stream(fd, f"[{spec.rank}] ".encode() if self.prefix else b"", sink,
                                log, shown=name in spec.shown)
                if name == "stderr" and not stream.shown:
                    self._unshown[spec.rank] = stream
                self._sel.register(fd, selectors.EVENT_READ, stream)

    def run(self, specs: Sequence[WorkerSpec], timeout: float | None = None) -> JobOutcome:
        """Start the workers and supervise them until all have ended; whatever
        happens (even an error in here), none is left running on return."""
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        self._sel.register(rfd, selectors.EVENT_READ, None)
        self._wake = wfd
        restore = self._install_signals(wfd)
        try:
            self._start(specs)
            return self._loop(timeout)
        finally:
            self._kill_all(signal.SIGKILL)
            for p in self._live():
                try:
                    p.popen.wait(timeout=_REAP_S / len(self._procs))
                except subprocess.TimeoutExpired:
                    pass
            self._drain(time.monotonic() + _DRAIN_S)
            restore()
            self._sel.unregister(rfd)
            with self._wake_lock:
                self._wake = -1
            os.close(rfd)
            os.close(wfd)
            if self._watchdog is not None:
                self._watchdog.close()

    def tails(self) -> dict[int, str]:
        """The last lines of each rank's stderr that the console did not show
        (``WorkerSpec.shown``), by rank: the report shows the root cause's
        where it has no traceback (a crash's, a program's own message)."""
        return {rank: s.tail() for rank, s in self._unshown.items() if s.tail()}

    def close(self, tail: str = "") -> bool:
        """Write the relayed output still queued, then ``tail`` (meshrun's
        report) on stderr, after it: for as long as the readers take it,
        giving up on one that took nothing for ``stall`` seconds, which
        is then told on stderr how much it lost. Returns whether a write
        failed (a full disk: the output lost is told on stderr, where it
        was lost silently and meshrun exited 0; python exits 1)."""
        t0 = time.monotonic()
        if tail:    # (nothing to add: a line a rank left open, unprefixed, stays so)
            self._err.write(tail.encode("utf-8", "replace"), always=True)
        lost = self._out.finish(self.stall, since=t0)
        if lost:
            self._err.write(f"meshrun: {lost} bytes of the ranks' standard output were not "
                            f"written: its reader took none for {self.stall:g} s\n".encode(),
                            always=True)
        if self._out.error:
            self._err.write(f"meshrun: {self._out.failed} bytes of the ranks' standard output "
                            f"were not written: {self._out.error}\n".encode(), always=True)
        self._err.finish(self.stall, since=t0)
        return bool(self._out.error or self._err.error)

    def stop(self, why: str) -> None:
        """Stop the job as for a rank of another node lost (``why``: its node's
        meshrun stopped the try there, or is gone), from any thread: the
        others get ``settle`` seconds to end, then SIGTERM; a no-op once the
        job has ended. Its report's first line says why."""
        self._told = self._told or why
        with self._wake_lock:
            try:
                if self._wake >= 0:
                    os.write(self._wake, b"s")
            except OSError:     # (its pipe full: the loop is awake already)
                pass

    def _reader_gone(self) -> None:
        """A Sink's reader went away (``meshrun ... | head``): the loop stops
        the job, as the reader's going would stop a program writing to it."""
        self.reader_gone = True

    def _install_signals(self, wfd: int) -> Callable[[], None]:
        """Turn SIGINT/SIGTERM/SIGHUP into stop requests and let SIGCHLD wake
        the loop at once; returns the function that restores the old state."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        old_fd = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        names = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD)
        old = {s: signal.getsignal(s) for s in names}
        for s in names[:3]:
            signal.signal(s, lambda signum, frame: self._signals.append(signum))
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

        def restore() -> None:
            for s, h in old.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_fd)
        return restore

    def _loop(self, timeout: float | None) -> JobOutcome:
        t0 = time.monotonic()
        outcome = JobOutcome("ok")
        kill_at: float | None = None
        asked_until: float | None = None
        dump_until: float | None = None
        give_up_at: float | None = None
        failed_at: float | None = None
        signals_seen = 0
        while self._live():
            asking = asked_until is not None and kill_at is None
            self._pump(_ASKED_POLL_S if asking else _POLL_S)
            self._reap(stopping=asked_until is not None)
            now = time.monotonic()
            if asked_until is None:
                failed = [p.exit for p in self._procs if p.exit is not None and p.exit.failed]
                if not failed and not outcome.lost:
                    outcome.lost = self._lost()
                    outcome.told = bool(outcome.lost) and outcome.lost == self._told
                if failed or outcome.lost:     # (a rank of another node lost: as a failure)
                    outcome.reason = "failed" if failed else "lost"
                    failed_at = failed_at or now
                    if (now < failed_at + self.settle and not self._signals
                            and not self.reader_gone
                            and (timeout is None or now - t0 < timeout)):
                        continue
                elif self._signals:
                    outcome.reason, outcome.signum = "signal", self._signals[0]
                elif self.reader_gone:      # as a program writing to it: stopped by SIGPIPE
                    outcome.reason, outcome.signum = "signal", signal.SIGPIPE
                elif timeout is not None and now - t0 >= timeout:
                    outcome.reason = "timeout"
                else:
                    continue
                outcome.stop_time = time.time()
                signals_seen = len(self._signals)
                asked_until = now + self._asking.where(self._live(), self.settle)
            if kill_at is None:
                # SIGTERM once the ranks asked where they are have said it, or their
                # time is up and those that did not have had their stacks dumped, or
                # 0.2 s more is (a second Ctrl-C: at once, and SIGKILL next)
                if len(self._signals) == signals_seen:
                    if now < asked_until and any(self._asking.silent()):
                        continue
                    if dump_until is None:
                        dump_until = now + self._asking.stacks()
                    if now < dump_until and not self._asking.dumped():
                        continue
                self._kill_all(signal.SIGTERM)
                kill_at = now + self.grace
            elif give_up_at is None and (now >= kill_at or len(self._signals) > signals_seen):
                self._kill_all(signal.SIGKILL)
                give_up_at = now + _REAP_S
            elif give_up_at is not None and now >= give_up_at:
                break
        outcome.exits = sorted((p.exit or self._unreaped(p) for p in self._procs),
                               key=lambda e: e.time)
        outcome.interrupted = bool(self._signals)
        outcome.asked = sorted(p.spec.rank for p in self._asking.asked)
        return outcome

    def _lost(self) -> str:
        """What a rank said of a rank of another node it lost (mesh.inbox
        leaves it in the run folder), if any rank did; first, why another
        node's meshrun stopped the try (``stop``)."""
        if self._told:
            return self._told
        try:
            names = sorted(n for n in os.listdir(self.scratch or "") if n.startswith("lost."))
            with open(os.path.join(self.scratch or "", names[0])) as f:
                return f.read(1000) or "a rank of another node was lost"
        except (OSError, IndexError):
            return ""

    def _live(self) -> list[_Proc]:
        return [p for p in self._procs if p.exit is None]

    def _unreaped(self, p: _Proc) -> WorkerExit:
        return WorkerExit(p.spec.rank, p.spec.local_rank, p.pid, None, time.time(), True)

    def _throttle(self) -> None:
        """Leave unread the pipes whose sink is full (Sink.full), and read
        them again once it is not: the ranks then wait in their writes, and
        their output is not dropped while meshrun's reader still reads."""
        for key in list(self._sel.get_map().values()):
            if key.data is not None and key.data.shown and key.data.sink.full():
                self._sel.unregister(key.fd)
                self._paused[key.fd] = key.data
        for fd, stream in list(self._paused.items()):
            if not stream.sink.full():
                del self._paused[fd]
                self._sel.register(fd, selectors.EVENT_READ, stream)

    def _pump(self, wait: float) -> None:
        self._throttle()
        for key, _ in self._sel.select(wait):
            if key.data is None:
                try:
                    while os.read(key.fd, 512):
                        pass
                except OSError:
                    pass
            elif not key.data.pump():
                self._sel.unregister(key.fd)
                key.data.close()
        now = time.monotonic()
        for key in self._sel.get_map().values():
            if key.data is not None:
                key.data.hold(now)     # a prompt waiting for its line's end

    def _reap(self, stopping: bool) -> None:
        """Record workers that ended, after killing what is left of their group."""
        for p in self._live():
            if not _has_exited(p.popen):
                continue
            _killpg(p.pid, signal.SIGKILL)
            rc = p.popen.wait(timeout=_REAP_S)
            if self._watchdog is not None:
                self._watchdog.remove(p.pid)
            p.exit = WorkerExit(p.spec.rank, p.spec.local_rank, p.pid, rc, time.time(), stopping)
            if self.on_exit is not None:
                self.on_exit(p.exit)

    def _kill_all(self, signum: int) -> None:
        for p in self._live():
            _killpg(p.pid, signum)
            if signum == signal.SIGTERM:    # a stopped rank (SIGSTOP, Ctrl-Z) acts on it only
                _killpg(p.pid, signal.SIGCONT)  # once continued (as systemd does), not at SIGKILL

    def _drain(self, deadline: float) -> None:
        """Relay what the workers wrote before they ended, for a bounded time:
        a process outside their groups may still hold a pipe open (the time
        a full sink holds the pipes unread, Sink.full, is not counted)."""
        signals = len(self._signals)
        while self._paused or any(k.data is not None for k in self._sel.get_map().values()):
            if self._paused and len(self._signals) == signals:    # (Ctrl-C: wait no more)
                deadline = max(deadline, time.monotonic() + _DRAIN_S)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._pump(min(left, _POLL_S))
        for fd, stream in self._paused.items():
            self._sel.register(fd, selectors.EVENT_READ, stream)
        self._paused.clear()
        for key in list(self._sel.get_map().values()):
            if key.data is not None:
                self._sel.unregister(key.fd)
                key.data.pump()
                key.data.close()


def _own(stream: TextIO | None) -> BinaryIO:
    """meshrun's own stream, as bytes; the null device where it has none
    (``meshrun ... >&-``: sys.stdout is None), where a program run by python
    writes to nothing (meshrun failed naming nothing: "AttributeError:
    'NoneType' object has no attribute 'buffer'")."""
    return stream.buffer if stream is not None else open(os.devnull, "wb")


def _one_file(a: Sink, b: Sink) -> bool:
    """Whether two sinks write to one file (a terminal, ``2>&1``)."""
    fa, fb = a.fileno(), b.fileno()
    if fa is None or fb is None:
        return False
    try:
        sa, sb = os.fstat(fa), os.fstat(fb)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _has_exited(popen: subprocess.Popen[bytes]) -> bool:
    """Whether the process has ended, leaving it unreaped where the platform
    allows (waitid with WNOWAIT), so that its group id stays reserved."""
    if not hasattr(os, "waitid"):
        return popen.poll() is not None
    try:
        return os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass
