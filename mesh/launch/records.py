"""What meshrun knows of a job's ranks: the workers to start, how each one
ended and why the job ended, and the error records a rank wrote as it failed:
rank<R>.error.json, written by ``_bootstrap.write_error_record``, and
rank<R>.torchelastic.json, its ``TORCHELASTIC_ERROR_FILE``, where torch's
``@record`` writes (torch.distributed.elastic.multiprocessing.errors), and
rank<R>.where.json, where a rank meshrun stops says where it was
(``_bootstrap.say_where``), and rank<R>.stack.txt, where faulthandler dumps
the Python stack of one that gave no word (``_bootstrap.dump_stack``)."""
from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from . import _bootstrap

__all__ = ["WorkerSpec", "WorkerExit", "JobOutcome", "signal_name", "error_file",
           "elastic_error_file", "where_file", "stack_file", "read_records", "read_stack",
           "drop_unused_stacks", "read_wheres", "where_text",
           "can_answer", "signalled", "ask_where", "log_tracebacks"]


def signal_name(signum: int) -> str:
    """'SIGKILL' for 9; 'signal 42' for numbers without a name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True)
class WorkerSpec:
    """One process to start: its global and local rank, argv and environment;
    stdin: it reads meshrun's standard input (others read /dev/null);
    where: the file it writes where it is to when asked (``where_file``);
    stack: the one faulthandler dumps its stack to, when asked (``stack_file``);
    shown: which of its streams meshrun's console shows ("stdout", "stderr";
    --local-ranks-filter, --redirects), the others going to --log-dir only."""
    rank: int
    local_rank: int
    argv: Sequence[str]
    env: Mapping[str, str]
    stdin: bool = False
    where: str = ""
    stack: str = ""
    shown: tuple[str, ...] = ("stdout", "stderr")


@dataclass(frozen=True)
class WorkerExit:
    """How a worker ended. returncode < 0 means killed by signal -returncode;
    None means it could not be reaped in time. after_stop: it ended after the
    launcher had begun stopping the job, so it is not a root cause."""
    rank: int
    local_rank: int
    pid: int
    returncode: int | None
    time: float
    after_stop: bool

    @property
    def failed(self) -> bool:
        return self.returncode != 0

    def describe(self) -> str:
        if self.returncode is None:
            return "still running after SIGKILL"
        if self.returncode < 0:
            return f"killed by {signal_name(-self.returncode)}"
        return f"exit code {self.returncode}"


@dataclass
class JobOutcome:
    """Why the job ended ('ok', 'failed', 'signal', 'timeout', 'lost': a rank
    of another node was lost, ``lost`` says which) and every exit;
    ``interrupted``: meshrun was sent a signal (Ctrl-C) while it ran, even
    one that came while a failure stopped the job (no restart follows);
    ``told``: ``lost`` is another node's meshrun's word (Job.stop);
    ``asked``: the ranks asked where they were as the job was stopped."""
    reason: str
    exits: list[WorkerExit] = field(default_factory=list)
    signum: int | None = None
    stop_time: float | None = None
    lost: str = ""
    interrupted: bool = False
    told: bool = False
    asked: list[int] = field(default_factory=list)


def error_file(err_dir: str, rank: int) -> str:
    """Where rank's error record goes (its ``MESH_ERROR_FILE``)."""
    return os.path.join(err_dir, f"rank{rank}.error.json")


def elastic_error_file(err_dir: str, rank: int) -> str:
    """Where torch's ``@record`` writes rank's error (its ``TORCHELASTIC_ERROR_FILE``)."""
    return os.path.join(err_dir, f"rank{rank}.torchelastic.json")


def where_file(err_dir: str, rank: int) -> str:
    """Where rank says where it was when meshrun stopped it, beside its error file."""
    return _bootstrap.where_file(error_file(err_dir, rank))


def stack_file(err_dir: str, rank: int) -> str:
    """Where faulthandler dumps rank's Python stack, beside its error file."""
    return _bootstrap.stack_file(error_file(err_dir, rank))


def _load(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _from_elastic(path: str, rank: int) -> dict[str, Any] | None:
    """The error torch's ``@record`` wrote, {"message": {"message": "ValueError:
    boom", "extraInfo": {"py_callstack", "timestamp"}}}, as a record of ours
    (its time: the file's, to the millisecond, where @record's is whole seconds)."""
    data = _load(path)
    said: Any = data.get("message") if data else None
    if not isinstance(said, dict) or not isinstance(said.get("message"), str):
        return None
    extra: Any = said.get("extraInfo")
    extra = extra if isinstance(extra, dict) else {}
    kind, _, msg = said["message"].partition(": ")
    tb = str(extra.get("py_callstack") or "")
    try:
        when = os.stat(path).st_mtime
    except OSError:
        when = float(extra.get("timestamp") or 0)
    return {"rank": rank, "exc_type": kind, "from_abort": False, "peer": None, "message": msg,
            "traceback": tb, "brief": tb, "time": when, "torchelastic": True}


def read_records(err_dir: str, ranks: Iterable[int],
                 kept: bool = False) -> dict[int, dict[str, Any]]:
    """The error records found in err_dir, by rank. A rank's ``@record`` error
    stands in for ours where the rank wrote none (``--no-python``: a program
    that runs Python) or ours is only the ``sys.exit`` that followed it (the
    error @record saw is why). kept: err_dir stays (--log-dir), and each
    record names its file ("file")."""
    records: dict[int, dict[str, Any]] = {}
    for rank in ranks:
        path = error_file(err_dir, rank)
        rec = _load(path)
        if rec is None or rec.get("exc_type") == "SystemExit":
            elastic = _from_elastic(elastic_error_file(err_dir, rank), rank)
            if elastic is not None:
                # (a program's own Python printed it whole where meshrun's bootstrap was not)
                rec, path = dict(elastic, printed=rec is None), elastic_error_file(err_dir, rank)
        if rec is not None:
            records[rank] = dict(rec, file=path) if kept else rec
    return records


def read_wheres(err_dir: str, ranks: Iterable[int]) -> dict[int, dict[str, Any]]:
    """What each rank asked as meshrun stopped it said of where it was
    (``_bootstrap.where``), or else its stack faulthandler dumped
    (``read_stack``, as {"dump": ...}), by rank."""
    found: dict[int, dict[str, Any] | None] = {}
    for rank in ranks:
        found[rank] = _load(where_file(err_dir, rank))
        if found[rank] is None and (dump := read_stack(stack_file(err_dir, rank))):
            found[rank] = {"dump": dump}
    return {rank: rec for rank, rec in found.items() if rec is not None}


_THREAD = re.compile(r"(?:Current thread|Thread) (0x[0-9a-fA-F]+) \(most recent call first\):$")
_FILE = re.compile(r'  File "(.*)", line (\d+) in (.*)$')
_MAIN_FRAMES = 3    # the main thread's innermost frames that the report shows


def read_stack(path: str) -> dict[str, Any] | None:
    """The Python stack faulthandler dumped in ``path`` (``_bootstrap.dump_stack``):
    {"main": the main thread's innermost frames, [file, line, function] each
    (the bootstrap's and runpy's left out), "others": each other thread's
    innermost function}; None where the main thread's first frame is not
    there (nothing dumped, or not yet: a line cut short is left out)."""
    try:
        with open(path, "rb") as f:
            lines = f.read(1 << 16).decode("utf-8", "replace").split("\n")[:-1]
        main = int(lines[0].split()[-1], 16)
    except (OSError, IndexError, ValueError):
        return None
    threads: list[tuple[int, list[list[Any]]]] = []
    for line in lines[1:]:
        if m := _THREAD.match(line):
            threads.append((int(m[1], 16), []))
        elif (m := _FILE.match(line)) and threads:
            threads[-1][1].append([m[1], int(m[2]), m[3]])
    own = [frames for ident, frames in threads if ident == main]
    if not own or not own[0]:
        return None
    hidden = (os.path.join("mesh", "launch", "_bootstrap.py"), "runpy.py", "<frozen runpy>")
    return {"main": [f for f in own[0] if not f[0].endswith(hidden)][:_MAIN_FRAMES],
            "others": [frames[0][2] for ident, frames in threads if ident != main and frames]}


def drop_unused_stacks(paths: Iterable[str]) -> None:
    """Remove the stack files that hold no dump: every rank opens one, and
    only those dumped are worth keeping (--log-dir)."""
    for path in paths:
        if path and read_stack(path) is None:
            try:
                os.unlink(path)
            except OSError:
                pass


def can_answer(pid: int, signum: int) -> bool:
    """Whether process pid can answer signal signum at once: it has a handler
    for it and runs (Linux's /proc/PID/status; False where it cannot be read,
    and for a process stopped, SIGSTOP or Ctrl-Z, or dead); one without
    would die of it."""
    caught, running = False, False
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"State:"):
                    running = line.split()[1] not in (b"T", b"t", b"Z", b"X")
                elif line.startswith(b"SigCgt:"):
                    caught = bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        return False
    return caught and running


def signalled(pids: Iterable[int], sig: int) -> list[int]:
    """Those of ``pids`` whose bootstrap catches ``sig`` (``can_answer``),
    sent it (a process gone meanwhile left out)."""
    sent = []
    for pid in pids:
        if can_answer(pid, sig):
            try:
                os.kill(pid, sig)
            except OSError:
                continue
            sent.append(pid)
    return sent


def ask_where(pids: Mapping[int, int], files: Mapping[int, str], signum: int,
              wait: float) -> dict[int, dict[str, Any]]:
    """Ask each rank (its pid, by rank) where it is, with signal signum
    (``_bootstrap.SAY_WHERE``: where it catches it), and wait up to ``wait``
    seconds for each one's ``files[rank]``; what they said, by rank (mesh.spawn's
    timeout; meshrun's ``Job`` asks as it stops the job, without blocking)."""
    rank_of = {pid: rank for rank, pid in pids.items()}
    asked = [rank_of[pid] for pid in signalled(rank_of, signum)] if wait > 0 and signum else []
    end = time.monotonic() + wait
    while asked and time.monotonic() < end and not all(os.path.exists(files[r]) for r in asked):
        time.sleep(0.01)
    return {r: rec for r in asked if (rec := _load(files[r])) is not None}


def _place(f: Sequence[Any]) -> str:
    """'train.py:42': a frame of ``_bootstrap.where``'s, its file relative to
    the current folder where it is inside it."""
    path = str(f[0])
    try:
        rel = os.path.relpath(path)
        path = rel if not rel.startswith(os.pardir) else path
    except ValueError:
        pass
    return f"{path}:{f[1]}"


def _frame(f: Sequence[Any]) -> str:
    return f"{_place(f)} in {f[2]}"


def where_text(rec: dict[str, Any]) -> str:
    """What a rank said of where it was, in words: 'waiting 12.3 s in recv from
    rank 0 (tag 7, group world), called at train.py:9 in main'; 'in init
    (mesh/world.py:301), called at train.py:5 in main' (in a call, not
    waiting); or 'running at train.py:42 in step (called from train.py:50
    in main)' (', importing a module': the import machinery's frames left out)."""
    if isinstance(rec.get("dump"), dict):
        return _dump_text(rec["dump"])
    stack = [f for f in rec.get("stack") or [] if isinstance(f, list) and len(f) >= 5]
    own = next((i for i, f in enumerate(stack) if f[3]), len(stack))
    called = f"called at {_frame(stack[own + 1])}" if own + 1 < len(stack) else ""
    step = f"pipeline step's {rec['step']}" if rec.get("step") else ""
    calls = [c for c in rec.get("calls") or [] if isinstance(c, list) and len(c) == 2]
    if calls:
        said = " and ".join(f"waiting {float(waited):.1f} s in {what}" for what, waited in calls)
        if stack and own == len(stack):     # (another thread waits: the main one is elsewhere)
            called = f"its main thread at {_frame(stack[0])}"
        return ", ".join(p for p in (said, step, called) if p)
    if not stack:
        return "running (no Python frame)"
    if all(f[4] for f in stack[:own]) and own < len(stack):   # (in a call into mesh...,
        inside = f"in {stack[own][2]} ({_place(stack[own])})"  # not waiting; or its libraries)
        return ", ".join(p for p in (inside, step, called) if p)
    # (an import under way, at exit too: the line that imports, not the import machinery's)
    skip = next((i for i, f in enumerate(stack) if not str(f[0]).startswith(_IMPORTING)),
                len(stack))
    importing = ", importing a module" if 0 < skip < len(stack) else ""
    stack = stack[skip:] if importing else stack
    up = f" (called from {_frame(stack[1])})" if len(stack) > 1 and not stack[1][3] else ""
    return f"running at {_frame(stack[0])}{up}{importing}" + (f", {step}" if step else "")


_IMPORTING = "<frozen importlib."
"""The file name of the import machinery's frames (``<frozen importlib._bootstrap>``,
``..._bootstrap_external>``): a rank stopped in an import is shown at the line importing."""


def _dump_text(dump: dict[str, Any]) -> str:
    """'it gave no word of where it was: its Python stack (faulthandler):
    train.py:12 in wedge, called from train.py:20 in main, from train.py:23
    in <module>; 2 other threads, innermost in wait, select' (``read_stack``'s)."""
    main = [_frame(f) for f in dump.get("main") or []]
    said = ", ".join([main[0], *(("called from " if i == 1 else "from ") + f
                                 for i, f in enumerate(main) if i)]) if main else "no frame"
    others = dump.get("others") or []
    more = f"; {len(others)} other thread{'s' if len(others) > 1 else ''}, innermost in " \
        + ", ".join(map(str, others)) if others else ""
    return f"it gave no word of where it was: its Python stack (faulthandler): {said}{more}"


def log_tracebacks(log_dir: str, records: dict[int, dict[str, Any]]) -> None:
    """Add each rank's whole traceback to its stderr log: only its last line
    went through the relay (or none of it: an error @record saw that the
    program then caught)."""
    for rank, rec in records.items():
        if rec.get("printed"):
            continue
        try:
            with open(os.path.join(log_dir, f"rank{rank}.stderr.log"), "a",
                      encoding="utf-8") as f:
                f.write(str(rec.get("traceback", "")))
        except OSError:
            pass
