"""What supervision is given and what it reports: the workers to start, how
each one ended, and why the job ended."""
from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = ["WorkerSpec", "WorkerExit", "JobOutcome", "signal_name"]


def signal_name(signum: int) -> str:
    """'SIGKILL' for 9; 'signal 42' for numbers without a name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True)
class WorkerSpec:
    """One process to start: its global and local rank, argv and environment."""
    rank: int
    local_rank: int
    argv: Sequence[str]
    env: Mapping[str, str]


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
    """Why the job ended ('ok', 'failed', 'signal', 'timeout') and every exit."""
    reason: str
    exits: list[WorkerExit] = field(default_factory=list)
    signum: int | None = None
    stop_time: float | None = None
