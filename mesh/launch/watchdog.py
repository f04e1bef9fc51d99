"""The watchdog: the process that cleans up after meshrun if meshrun dies.

Standard library only: it runs as this file, with ``python -I``.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

__all__ = ["Watchdog"]


class Watchdog:
    """A process in its own session that cleans up if the launcher dies: its
    pipe from the launcher closes without the final "bye", so it SIGKILLs the
    registered process groups and removes the job's scratch directory.
    Workers' parent-death signal covers the workers; this covers their
    children, which that signal does not reach."""

    def __init__(self, scratch: str | None) -> None:
        rfd, self._wfd = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__)],
                stdin=rfd, stdout=subprocess.DEVNULL, start_new_session=True)
        finally:
            os.close(rfd)
        if scratch:
            self._send(f"d{scratch}\n")

    def _send(self, line: str) -> None:
        try:
            os.write(self._wfd, line.encode())
        except OSError:
            pass

    def add(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def remove(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def close(self) -> None:
        self._send("bye\n")
        os.close(self._wfd)
        try:
            self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=2)


def _main() -> None:
    for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    groups: set[int] = set()
    scratch = None
    for line in sys.stdin.buffer:
        op, arg = line[:1], line[1:].rstrip(b"\n")
        if line == b"bye\n":
            return
        if op == b"d":
            scratch = os.fsdecode(arg)
        elif op == b"+":
            groups.add(int(arg))
        elif op == b"-":
            groups.discard(int(arg))
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    _main()
