"""Sleeping on a word of shared memory until its owner changes it: Linux's
futex on a page of a memfd mapped into several processes (a board,
collectives.shm.board), so a rank waiting for a peer sleeps, leaving the
core to the ranks that have work, and wakes as soon as the peer rings,
instead of polling on a timer.

    waiter:  v = word; check the state; if not there: wait(word, v, timeout)
    owner:   change the state; word += 1; wake(word) where a waiter said so

``wait`` returns at once when the word is no longer ``v``, so a change
between the check and the sleep is never slept through; a missed ring
costs at most ``timeout``. Where there is no futex (not Linux, another
architecture), ``available()`` is False and callers sleep on a timer.
"""
from __future__ import annotations

import ctypes
import errno
import platform
import sys
from typing import Any

__all__ = ["available", "wait", "wake"]

_NR: int = {"x86_64": 202, "amd64": 202, "aarch64": 98,
            "arm64": 98}.get(platform.machine().lower(), 0)
"""The futex system call's number (0: none known here)."""
_WAIT, _WAKE = 0, 1         # shared futexes (not FUTEX_PRIVATE_FLAG): across processes
_ALL = 0x7FFFFFFF
_fn: Any = None


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _syscall() -> Any:
    global _fn
    if _fn is None:
        _fn = ctypes.CDLL(None, use_errno=True).syscall
    return _fn


def available() -> bool:
    """Whether this system has the futex (Linux on x86-64 or arm64)."""
    return sys.platform == "linux" and _NR != 0


def wait(addr: int, value: int, timeout: float) -> bool:
    """Sleep while the 32-bit word at ``addr`` holds ``value``, at most
    ``timeout`` seconds. True when a wake or a change of the word ended it,
    False when the timeout (or a signal) did; the caller checks what it
    waits for either way."""
    secs = max(0.0, timeout)
    ts = _Timespec(int(secs), int((secs % 1) * 1e9))
    got = _syscall()(ctypes.c_long(_NR), ctypes.c_void_p(addr), ctypes.c_int(_WAIT),
                     ctypes.c_int(value), ctypes.byref(ts), None, ctypes.c_int(0))
    return got == 0 or ctypes.get_errno() == errno.EAGAIN


def wake(addr: int) -> None:
    """Wake every process sleeping on the 32-bit word at ``addr``."""
    _syscall()(ctypes.c_long(_NR), ctypes.c_void_p(addr), ctypes.c_int(_WAKE),
               ctypes.c_int(_ALL), None, None, ctypes.c_int(0))
