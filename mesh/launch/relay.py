"""Worker output relayed to meshrun's stdout and stderr, line by line with a
rank prefix, through a writer thread that a reader who stops reading cannot
stall."""
from __future__ import annotations

import os
import select
import threading
import time
from typing import BinaryIO

__all__ = ["Sink", "Stream"]

_SINK_MAX = 64 << 20  # relayed output waiting for a slow reader
_MAX_LINE = 1 << 16  # a longer run without a newline is relayed as a line anyway
_PIECE = 1 << 16  # written at a time: each piece the reader takes shows it still reads


class Sink:
    """Relayed output goes to the launcher's stdout/stderr from a thread of
    its own, so a reader that stops reading (a full pipe) can never stall the
    supervision loop: failures, Ctrl-C and --timeout are handled regardless.
    At most ``_SINK_MAX`` bytes wait; beyond that output is dropped and the
    loss is reported. It writes to the stream's file descriptor in pieces,
    not through the interpreter's buffered stream: a piece taken tells that
    the reader still reads (``finish`` waits for as long as it does), and a
    writer blocked on a reader that never reads again holds no lock that
    meshrun's own last writes or its exit would wait on."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        try:
            out.flush()
            self._fd: int | None = out.fileno()
        except (AttributeError, OSError, ValueError):
            self._fd = None         # (no descriptor: an in-memory stream)
        self._chunks: list[bytes] = []
        self._queued = 0
        self._dropped = 0
        self._pending = 0           # taken from the queue, not yet written
        self._wrote_at = time.monotonic()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="meshrun-output", daemon=True)
        self._thread.start()

    def write(self, data: bytes, always: bool = False) -> None:
        """Queue data; ``always``: even past the cap (meshrun's own report)."""
        with self._cond:
            if self._queued + len(data) > _SINK_MAX and not always:
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
                dropped, self._dropped = self._dropped, 0
                if dropped:
                    chunks.append(f"[meshrun] {dropped} bytes of output dropped: nobody was "
                                  f"reading them\n".encode())
                data = b"".join(chunks)
                self._queued, self._pending = 0, len(data)
            try:
                self._put(memoryview(data))
            except (OSError, ValueError):
                pass                # the reader is gone (EPIPE): nothing can be written
            self._pending = 0

    def _put(self, view: memoryview) -> None:
        """Write view in pieces, noting the time each one was taken."""
        while view:
            piece = view[:_PIECE]
            if self._fd is None:
                self._out.write(piece)
                self._out.flush()
                n = len(piece)
            else:
                try:
                    n = os.write(self._fd, piece)
                except BlockingIOError:     # (a descriptor someone made non-blocking)
                    select.select([], [self._fd], [], 0.1)
                    continue
            view = view[n:]
            self._pending -= n
            self._wrote_at = time.monotonic()

    def finish(self, stall: float, since: float | None = None) -> int:
        """Write out what is queued for as long as the reader keeps taking
        it, and give up once it took nothing for ``stall`` seconds (counted
        from ``since`` at the earliest, else from now): a reader that never
        reads again (a stopped pager, a stuck pipe) cannot hold meshrun for
        ever, and a slow one loses nothing. Returns the bytes given up."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        start = time.monotonic() if since is None else since
        while self._thread.is_alive():
            self._thread.join(0.05)
            if (self._thread.is_alive()
                    and time.monotonic() - max(start, self._wrote_at) >= stall):
                return self._queued + self._pending + self._dropped
        return 0


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
