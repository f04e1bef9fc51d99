"""A spawned rank's standard streams (``mesh.spawn``'s children): lines
passed on whole where the caller's stream is not a file (``_Lines``: a
notebook's, whose stream sends each write as it comes), each line started
with "[rank] " under ``spawn(prefix=True)`` (``_Prefixed``), and both
flushed before the parent may stop the process (``_flush_std``).
"""
from __future__ import annotations

import io
import os
import re
import sys
import threading
import time
from typing import Any

__all__: list[str] = []


def _flush_std() -> None:
    """What the rank wrote, out before the parent may stop the process: a
    line left without its end (held by ``_Lines``, or a file's buffer) was
    lost when the parent, told the rank had closed, stopped it before the
    interpreter's exit flushed it."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


_HOLD_S = 0.2     # a line's start waits for its end at most this long (ipykernel's interval)


class _Lines:
    """A rank's sys.stdout or sys.stderr, where the caller's is a stream that is
    not a file (ipykernel's OutStream in a notebook, a fork of the kernel): it
    passes whole lines on. Such a stream sends each write as it comes, and a
    print writes its words and its end apart, so the ranks' lines came into
    the cell mixed word by word ("rank rank 0 1 line"); a file's own buffer
    writes lines whole. ``flush()`` passes on what is left of a line, and so
    does a thread once it waited ``_HOLD_S`` for its end: the last words of a
    rank that hangs after them ("loading...", end="") were lost when the
    timeout or an interrupt stopped it, where they had come into the cell."""

    _all: list["_Lines"] = []
    _waiting = threading.Event()        # a line's start is held
    _ticker: threading.Thread | None = None

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        # the line so far, in its pieces: each write looks for an end in its own text
        # only (joining and searching the whole line at each write took minutes for a
        # line of MBs written in small pieces: 0.8 MB in 10-byte writes, 9 s)
        self._part: list[str] = []
        self._since = 0.0
        self._lock = threading.Lock()
        if not _Lines._all:
            os.register_at_fork(after_in_child=_Lines._forked)
        _Lines._all.append(self)

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            return self._stream.write(text)     # (its own error)
        with self._lock:
            cut = text.rfind("\n") + 1
            if cut:
                self._stream.write("".join([*self._part, text[:cut]]))
                self._part = [text[cut:]] if cut < len(text) else []
            elif text:
                self._part.append(text)
            if self._part and len(self._part) == 1:    # a line's start, held from now
                self._since = time.monotonic()
                _Lines._tell()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            part, self._part = "".join(self._part), []
            if part:
                self._stream.write(part)
        self._stream.flush()

    def _pass_held(self, now: float) -> bool:
        """The line's start, on if held ``_HOLD_S``; whether one is left held."""
        with self._lock:
            if self._part and now - self._since >= _HOLD_S:
                part, self._part = "".join(self._part), []
                self._stream.write(part)
            return bool(self._part)

    @staticmethod
    def _tell() -> None:
        _Lines._waiting.set()
        if _Lines._ticker is None:
            _Lines._ticker = threading.Thread(target=_Lines._tick, name="mesh-rank-lines",
                                              daemon=True)
            _Lines._ticker.start()

    @staticmethod
    def _tick() -> None:
        while True:
            _Lines._waiting.wait()
            time.sleep(_HOLD_S)
            _Lines._waiting.clear()
            now = time.monotonic()
            for lines in list(_Lines._all):
                try:
                    if lines._pass_held(now):
                        _Lines._waiting.set()
                except Exception:       # (the stream's own error: its writer sees it too)
                    pass

    @staticmethod
    def _forked() -> None:
        """A fork of the rank (a DataLoader's worker): no thread, no lock held."""
        _Lines._ticker, _Lines._waiting = None, threading.Event()
        for lines in _Lines._all:
            lines._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        if name == "_stream":       # (not set yet: a copy being made)
            raise AttributeError(name)
        return getattr(self._stream, name)


def _whole_lines() -> None:
    """Lines whole on a standard stream that is not a file (``_Lines``)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, (io.TextIOWrapper, _Lines)):
            setattr(sys, name, _Lines(stream))


class _Prefixed:
    """A rank's sys.stdout or sys.stderr under ``spawn(prefix=True)``: each
    line it writes starts with "[rank] ", as meshrun's relay starts them,
    and so does a line started over by a carriage return (a progress bar)."""

    _LINES = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")

    def __init__(self, stream: Any, rank: int) -> None:
        self._stream = stream
        self._prefix = f"[{rank}] "
        self._fresh = True      # the next write starts a line

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            return self._stream.write(text)     # (its own error)
        pieces = []
        for line in self._LINES.findall(text):
            if self._fresh:
                pieces.append(self._prefix)
            pieces.append(line)
            self._fresh = line[-1] in "\r\n"
        self._stream.write("".join(pieces))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        if name == "_stream":       # (not set yet: a copy being made)
            raise AttributeError(name)
        return getattr(self._stream, name)


def _prefix_lines(rank: int) -> None:
    """Each line on the standard streams prefixed, and passed on whole
    (``_Lines``): a print writes its text and its end apart, and unbuffered
    (PYTHONUNBUFFERED) the ranks' lines came mixed ("[1] line b[0] line a")."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None:
            setattr(sys, name, _Prefixed(stream if isinstance(stream, _Lines) else
                                         _Lines(stream), rank))
