"""What meshrun knows of a job's ranks: the workers to start, how each one
ended and why the job ended, and the error records a rank wrote as it failed:
rank<R>.error.json, written by ``_bootstrap.write_error_record``, and
rank<R>.torchelastic.json, its ``TORCHELASTIC_ERROR_FILE``, where torch's
``@record`` writes (torch.distributed.elastic.multiprocessing.errors)."""
from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["WorkerSpec", "WorkerExit", "JobOutcome", "signal_name", "error_file",
           "elastic_error_file", "read_records", "log_tracebacks"]


def signal_name(signum: int) -> str:
    """'SIGKILL' for 9; 'signal 42' for numbers without a name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True)
class WorkerSpec:
    """One process to start: its global and local rank, argv and environment;
    stdin: it reads meshrun's standard input (others read /dev/null)."""
    rank: int
    local_rank: int
    argv: Sequence[str]
    env: Mapping[str, str]
    stdin: bool = False


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
    ``told``: ``lost`` is another node's meshrun's word (Job.stop)."""
    reason: str
    exits: list[WorkerExit] = field(default_factory=list)
    signum: int | None = None
    stop_time: float | None = None
    lost: str = ""
    interrupted: bool = False
    told: bool = False


def error_file(err_dir: str, rank: int) -> str:
    """Where rank's error record goes (its ``MESH_ERROR_FILE``)."""
    return os.path.join(err_dir, f"rank{rank}.error.json")


def elastic_error_file(err_dir: str, rank: int) -> str:
    """Where torch's ``@record`` writes rank's error (its ``TORCHELASTIC_ERROR_FILE``)."""
    return os.path.join(err_dir, f"rank{rank}.torchelastic.json")


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
