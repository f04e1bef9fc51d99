"""What a stopping job asks of its ranks before it stops them: where each
one is (``_bootstrap.SAY_WHERE``), for the report, and, of one that gives no
word (wedged in native code), its Python stack (``_bootstrap.DUMP_STACK``,
faulthandler). ``supervise.Job`` asks, and waits for the answers in its
loop, never blocking: its relay of their output goes on meanwhile.

    Job --SAY_WHERE--> each live rank with a where file   (up to 1 s, no more than settle)
    Job --DUMP_STACK-> each of them that gave no word      (up to 0.2 s more)
    Job --SIGTERM----> every rank
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ._bootstrap import DUMP_STACK, SAY_WHERE
from .records import read_stack, signalled

if TYPE_CHECKING:
    from .supervise import _Proc

__all__ = ["Asking"]

_SAY_S = 1.0    # how long the ranks asked where they are get to say it (at most --settle)
_DUMP_S = 0.2   # how long faulthandler gets to dump the stack of a rank that gave no word


def _signalled(procs: list[_Proc], sig: int) -> list[_Proc]:
    """Those of ``procs`` whose bootstrap catches ``sig``, sent it
    (``records.signalled``)."""
    by_pid = {p.pid: p for p in procs}
    return [by_pid[pid] for pid in signalled(by_pid, sig)]


class Asking:
    """The ranks of one job asked where they are (``asked``), and those of
    them asked for their stack; each step says how long its answers get."""

    def __init__(self) -> None:
        self.asked: list[_Proc] = []    # the ranks asked where they are (``where``)
        self._dumping: dict[_Proc, int] = {}    # those asked for their stack: its size seen

    def where(self, live: list[_Proc], settle: float) -> float:
        """Ask every rank of ``live`` that can say it (its bootstrap catches
        ``SAY_WHERE``) where it is; how long they get to say it (0: none asked)."""
        if not SAY_WHERE or settle <= 0:
            return 0.0
        self.asked = _signalled([p for p in live if p.spec.where], SAY_WHERE)
        return min(settle, _SAY_S) if self.asked else 0.0

    def silent(self) -> list[_Proc]:
        """The ranks asked where they are, still running, that have not said it."""
        return [p for p in self.asked if p.exit is None and not os.path.exists(p.spec.where)]

    def stacks(self) -> float:
        """Have faulthandler dump the stack of each rank that gave no word
        (``_bootstrap.DUMP_STACK``); how long it gets (0: none asked)."""
        if DUMP_STACK:
            silent = [p for p in self.silent() if p.spec.stack]
            self._dumping = {p: -1 for p in _signalled(silent, DUMP_STACK)}
        return _DUMP_S if self._dumping else 0.0

    def dumped(self) -> bool:
        """Whether every stack asked for is there: its main thread's frames,
        and no more written since the last look."""
        done = True
        for p, seen in self._dumping.items():
            try:
                self._dumping[p] = os.stat(p.spec.stack).st_size
            except OSError:
                self._dumping[p] = -1
            if p.exit is None and (self._dumping[p] != seen or read_stack(p.spec.stack) is None):
                done = False
        return done
