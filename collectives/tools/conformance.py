"""What the conformance runners share (mpi4py_conformance: mpi4py's suite;
torch_conformance: torch's): a unittest result that writes one JSON line a
test as it ends, and the one line of a failed test's traceback that says why.
"""
from __future__ import annotations

import json
import re
import traceback
import unittest
from typing import Any

__all__ = ["Record", "reason"]

_ERROR = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt|Failure)\b")
"""A traceback's ``SomeError: ...`` line."""


def reason(text: str, width: int = 240, timeouts: bool = False,
           processes: bool = False) -> str:
    """One line out of a traceback, at most ``width`` characters: its last
    ``SomeError: ...`` line. ``timeouts``: a line saying the test timed out
    (torch's join, "Timing out after ..."; a rank's "... timed out after
    ...") is the reason, as "timeout: <line>". ``processes``: the text holds
    a traceback for each failing rank, headed "Process N ..." (torch's
    MultiProcessTestCase): the first rank's line, its heading counting as one."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if timeouts and any("Timing out after" in ln or "timed out after" in ln for ln in lines):
        return ("timeout: " + next(ln for ln in lines
                                   if "timed out" in ln or "Timing out" in ln))[:width]
    picked = ""
    for ln in lines:
        head = processes and ln.startswith("Process ")
        if head and picked:
            break
        if head or _ERROR.match(ln):
            picked = ln
    return (picked or (lines[-1] if lines else "?"))[:width]


class Record(unittest.TestResult):
    """One JSON line a test, written to ``out`` as it ends: ``line``'s
    {"test", "result", "reason"} (a subclass adds to it); a failed test's
    result and reason are ``failed``'s, a skip's reason its first line."""

    width = 240     # (a reason's characters at most)

    def __init__(self, out: Any) -> None:
        super().__init__()
        self.out = out

    def line(self, test: Any, result: str, why: str) -> dict[str, Any]:
        return {"test": test.id() if hasattr(test, "id") else str(test), "result": result,
                "reason": why}

    def _put(self, test: Any, result: str, why: str = "") -> None:
        self.out.write(json.dumps(self.line(test, result, why)) + "\n")
        self.out.flush()

    def failed(self, kind: type[BaseException], text: str, assertion: bool) -> tuple[str, str]:
        """A failed test's result and reason, from its exception's class,
        its traceback's text and whether it is the test's assertion."""
        return "fail" if assertion else "error", reason(text, self.width)

    def _err(self, test: Any, err: Any, assertion: bool) -> None:
        self._put(test, *self.failed(err[0], "".join(traceback.format_exception(*err)),
                                     assertion))

    def addSuccess(self, test: Any) -> None:
        self._put(test, "pass")

    def addSkip(self, test: Any, why: str) -> None:
        self._put(test, "skip", (why.splitlines() or [""])[0][:self.width])

    def addExpectedFailure(self, test: Any, err: Any) -> None:
        self._put(test, "pass", "expected failure")

    def addUnexpectedSuccess(self, test: Any) -> None:
        self._put(test, "fail", "unexpected success")

    def addFailure(self, test: Any, err: Any) -> None:
        self._err(test, err, True)

    def addError(self, test: Any, err: Any) -> None:
        self._err(test, err, False)

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        if err is not None:
            self._err(test, err, issubclass(err[0], test.failureException))
