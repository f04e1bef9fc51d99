"""Worker output relayed to meshrun's stdout and stderr, line by line with a
rank prefix, through a writer thread that a reader who stops reading cannot
stall."""
from __future__ import annotations

import os
import threading
import time
from typing import BinaryIO

__all__ = ["Sink", "Stream"]

_SINK_MAX = 64 << 20  # relayed output waiting for a slow reader
_MAX_LINE = 1 << 16  # a longer run without a newline is relayed as a line anyway


class Sink:
    """Relayed output goes to the launcher's stdout/stderr from a thread of
    its own, so a reader that stops reading (a full pipe) can never stall the
    supervision loop: failures, Ctrl-C and --timeout are handled regardless.
    At most ``_SINK_MAX`` bytes wait; beyond that output is dropped and the
    loss is reported."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._chunks: list[bytes] = []
        self._queued = 0
        self._dropped = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="meshrun-output", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        with self._cond:
            if self._queued + len(data) > _SINK_MAX:
                self._dropped += len(data)
                return
            self._chunks.append(data)
            self._queued += len(data)
            self._cond.notify()

    def flush(self) -> None:
        pass

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._chunks and not self._closed:
                    self._cond.wait()
                if not self._chunks:
                    return
                chunks, self._chunks = self._chunks, []
                self._queued = 0
                dropped, self._dropped = self._dropped, 0
            try:
                if dropped:
                    chunks.append(f"[meshrun] {dropped} bytes of output dropped: nobody was "
                                  f"reading them\n".encode())
                self._out.write(b"".join(chunks))
                self._out.flush()
            except (OSError, ValueError):
                pass

    def finish(self, deadline: float) -> None:
        """Write out what is queued, waiting until ``deadline`` at most."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(max(0.0, deadline - time.monotonic()))



class Stream:
    """Relays one pipe line by line with a rank prefix, and keeps a raw copy."""

    def __init__(self, fd: int, prefix: bytes, sink: "Sink", log: BinaryIO | None) -> None:
        self.fd, self.prefix, self.sink, self.log = fd, prefix, sink, log
        self._buf = b""

    def pump(self) -> bool:
        """Read what is there; False at end of stream."""
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if self.log is not None and data:
            self.log.write(data)
        self._buf += data
        lines = self._buf.split(b"\n")
        self._buf = lines.pop()
        if len(self._buf) >= _MAX_LINE or (not data and self._buf):
            lines.append(self._buf)
            self._buf = b""
        if lines:
            self._emit(b"".join(self.prefix + ln + b"\n" for ln in lines))
        return bool(data)

    def _emit(self, data: bytes) -> None:
        try:
            self.sink.write(data)
            self.sink.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self._buf:
            self._emit(self.prefix + self._buf + b"\n")
            self._buf = b""
        os.close(self.fd)
        if self.log is not None:
            self.log.close()
