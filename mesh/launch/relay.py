"""Worker output relayed to meshrun's stdout and stderr, line by line with a
rank prefix (or none: ``--no-prefix``), through a writer thread that a reader
who stops reading cannot stall, and that a slow reader holds back as it would
hold back the ranks writing to it themselves; or kept off them (a rank or a
stream the console does not show), its last lines kept for the report."""
from __future__ import annotations

import os
import re
import select
import threading
import time
from typing import BinaryIO, Callable

__all__ = ["Sink", "Stream"]

_SINK_MAX = 64 << 20  # relayed output waiting for a slow reader
_MAX_LINE = 1 << 16  # a longer run without a newline is relayed as far as it goes
_HOLD_S = 0.2  # a line left unended this long (a prompt) is written as far as it goes
_PIECE = 1 << 16  # written at a time: each piece the reader takes shows it still reads
_CR = re.compile(rb"\r(?=[^\r\n])")  # a carriage return that text follows on its line
_CR_FIRST = re.compile(rb"\r+[^\r\n]")  # a line that starts over at once
_TAIL = 4096  # the last bytes kept of a stream the console does not show (Stream.tail)
_TAIL_LINES = 20


class Sink:
    """Relayed output goes to the launcher's stdout/stderr from a thread of
    its own, so a reader that stops reading (a full pipe) can never stall the
    supervision loop: failures, Ctrl-C and --timeout are handled regardless.
    At most ``_SINK_MAX`` bytes wait: past that the Job leaves the ranks'
    pipes unread while the reader still takes some (``full``), so that the ranks
    wait in their writes as under a slow reader of their own, and output
    is dropped (the loss reported) only once it took none for ``stall``
    seconds. It writes to the stream's file descriptor in pieces,
    not through the interpreter's buffered stream: a piece taken tells that
    the reader still reads (``finish`` waits for as long as it does), and a
    writer blocked on a reader that never reads again holds no lock that
    meshrun's own last writes or its exit would wait on. A reader that
    went away (EPIPE: ``meshrun ... | head``) gets nothing more, and
    ``on_gone`` is told, once: meshrun stops the job, as SIGPIPE stops a
    program writing to it (the ranks wrote on to no one until they ended).
    Any other error of a write (a full disk) loses that write: ``error``
    says what the first one was and ``failed`` counts the bytes lost."""

    def __init__(self, out: BinaryIO, stall: float = 5.0,
                 on_gone: Callable[[], None] | None = None) -> None:
        self._out = out
        self._stall = stall
        self._on_gone = on_gone
        self.gone = False           # the reader closed its end (EPIPE)
        self.error = ""             # the first error a write met (ENOSPC...), if any
        self.failed = 0             # bytes lost to such errors
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
        self._open_by: Stream | None = None    # whose line was written without its end
        self._lines = self      # the Sink that keeps _open_by (share_lines: another's)
        self._thread = threading.Thread(target=self._run, name="meshrun-output", daemon=True)
        self._thread.start()

    def write(self, data: bytes, always: bool = False, by: "Stream | None" = None,
              open_end: bool = False) -> None:
        """Queue data; ``always``: even past the cap (meshrun's own report).
        ``by``: the Stream it comes from; ``open_end``: it ends in a line
        left open (a prompt: Stream.hold). Another stream's output first
        ends that line, and the open one's rest starts a new one, prefixed."""
        lines = self._lines
        if lines._open_by is not None and lines._open_by is not by:
            lines._open_by.open, lines._open_by.cut = False, True
            data = b"\n" + data
        lines._open_by = by if open_end else None
        if self.gone:
            return
        with self._cond:     # (past the cap while the reader reads: a read per pipe at most)
            if self._queued + len(data) > _SINK_MAX and not always and not self._reading():
                self._dropped += len(data)
                return
            self._chunks.append(data)
            self._queued += len(data)
            self._cond.notify()

    def fileno(self) -> int | None:
        """The descriptor written to; None for an in-memory stream."""
        return self._fd

    def share_lines(self, other: "Sink") -> None:
        """Keep the line left open with ``other`` (both write to one file,
        a terminal: meshrun's stdout and stderr): a rank's progress bar on
        stderr, its line open, is ended by any rank's output on stdout first
        (that output came after the bar, on the bar's line)."""
        self._lines = other._lines

    def flush(self) -> None:
        pass

    def full(self) -> bool:
        """Whether the ranks' output should wait in their pipes: ``_SINK_MAX``
        bytes wait here and the reader took some within ``stall`` seconds (a
        reader slower than the ranks lost all past the cap, 19 MB of a rank's
        quick 112 MB to a reader that never paused for 5 ms)."""
        return self._queued + self._pending >= _SINK_MAX and self._reading() and not self.gone

    def _reading(self) -> bool:
        """Whether the reader took some of the output within ``stall`` seconds
        of its coming (a reader that stopped: the output past the cap is
        dropped, and the ranks no longer wait for it)."""
        return time.monotonic() - self._wrote_at < self._stall

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
                self._wrote_at = time.monotonic()   # (the reader's wait starts now)
            try:
                if not self.gone:
                    self._put(memoryview(data))
            except BrokenPipeError:
                self.gone = True    # the reader is gone: nothing can be written
                if self._on_gone is not None:
                    self._on_gone()
            except (OSError, ValueError) as e:     # (a full disk: ENOSPC)
                self.error = self.error or f"{type(e).__name__}: {e}"
                self.failed += self._pending
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
    """Relays one pipe line by line with a rank prefix, and keeps a raw copy.
    A line left unended for ``_HOLD_S`` (a prompt: ``input("x> ")``, pdb's
    ``(Pdb) ``) is written as far as it goes (``hold``), and its end follows
    on the same line unless another rank's output came between. A carriage
    return that starts the line over (a progress bar: tqdm's ``\r 40%|...``)
    is followed by the prefix again, so that the text it writes over the
    line says its rank (the prefix came first, then the bar over it).
    Without a prefix (``b""``) the rank's bytes go as it wrote them, a line
    left open at its end included (another's output still ends it first,
    so that lines of two ranks never mix). ``shown`` False: nothing goes to
    the sink (``--local-ranks-filter``, ``--redirects``); the log gets it
    all, and its last lines are kept for the report (``tail``): a rank that
    fails without a traceback (a crash, a program's own message) says why
    there and nowhere else on the console."""

    def __init__(self, fd: int, prefix: bytes, sink: "Sink", log: BinaryIO | None,
                 shown: bool = True) -> None:
        self.fd, self.prefix, self.sink, self.log = fd, prefix, sink, log
        self.shown = shown
        self._kept = b""        # (not shown: the last _TAIL bytes)
        self._buf = b""
        self._since = 0.0       # when _buf began to wait for its line's end
        self.open = False       # the sink's last bytes of ours are a line without its end
        self._at_cr = False     # ... and they end in a carriage return: the line starts over
        self.cut = False        # our open line was ended by another's output (Sink.write)

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
        if not self.shown:
            self._kept = (self._kept + data)[-_TAIL:]
            return bool(data)
        self._buf += data
        lines = self._buf.split(b"\n")
        self._buf = lines.pop()
        if not data and self._buf and self.prefix:     # (unprefixed: left open, below)
            lines.append(self._buf)
            self._buf = b""
        if lines and self.cut and not lines[0]:     # (its end alone: the line was ended)
            lines.pop(0)
            self.cut = False
        if lines:
            first = self._tagged(lines[0], self._starts(lines[0]))
            rest = (b"\n" + self.prefix).join(lines[1:])
            if b"\r" in rest:      # (a line by line look only where one starts over)
                rest = b"\n".join(self._tagged(ln, True) for ln in lines[1:])
            elif len(lines) > 1:
                rest = self.prefix + rest
            self._emit(first + b"\n" + rest + b"\n" if len(lines) > 1 else first + b"\n")
        if len(self._buf) >= _MAX_LINE or not data:     # (a long line: its end follows,
            self.hold(time.monotonic(), at_once=True)   # unprefixed; at the end: left open)
        if self._buf and not self._since:
            self._since = time.monotonic()
        return bool(data)

    def hold(self, now: float, at_once: bool = False) -> None:
        """Write a line that has waited ``_HOLD_S`` for its end (``at_once``:
        a long one) as far as it goes."""
        if self._buf and (at_once or now - self._since >= _HOLD_S):
            data, self._buf = self._tagged(self._buf, self._starts(self._buf)), b""
            self._emit(data, open_end=True)

    def _starts(self, piece: bytes) -> bool:
        """Whether piece, the next of our output, starts a line of its own
        (or the line over, after a carriage return): it takes the prefix."""
        return not self.open or (self._at_cr and piece != b"")

    def _tagged(self, piece: bytes, start: bool) -> bytes:
        """piece of a line with the prefix after each carriage return that
        text follows, and first where it starts the line (unless it starts
        it over at once: ``\r 40%|...``)."""
        out = _CR.sub(b"\r" + self.prefix, piece)
        return self.prefix + out if start and not _CR_FIRST.match(piece) else out

    def _emit(self, data: bytes, open_end: bool = False) -> None:
        try:
            self.sink.write(data, by=self, open_end=open_end)
            self.sink.flush()
        except (OSError, ValueError):
            pass
        self.open, self._since, self.cut = open_end, 0.0, False
        self._at_cr = open_end and data.endswith(b"\r")

    def tail(self) -> str:
        """The last lines of a stream the console did not show, each as a
        terminal shows it (a progress bar's last state); '' for one shown."""
        lines = self._kept.decode("utf-8", "replace").rstrip("\n").split("\n")
        if len(self._kept) == _TAIL:
            lines = lines[1:]       # (cut: its first line is not whole)
        return "\n".join(ln.rstrip("\r").rsplit("\r", 1)[-1]
                         for ln in lines[-_TAIL_LINES:]).strip("\n")

    def close(self) -> None:
        if self._buf or (self.open and self.prefix):    # (unprefixed: left open, as written)
            end = b"\n" if self.prefix else b""
            self._emit(self._tagged(self._buf, self._starts(self._buf)) + end,
                       open_end=not self.prefix)
            self._buf = b""
        os.close(self.fd)
        if self.log is not None:
            self.log.close()
