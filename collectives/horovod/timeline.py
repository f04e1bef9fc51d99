"""Horovod's timeline over meshrun: a Chrome trace (chrome://tracing,
ui.perfetto.dev) of the hvd calls, written by rank 0 as Horovod's
coordinator writes it. ``HOROVOD_TIMELINE=/path/file.json`` at
``hvd.init()`` (``DYNAMIC``: none until ``hvd.start_timeline``), or
``hvd.start_timeline(path, mark_cycles)`` / ``hvd.stop_timeline()``.

Each tensor (``allreduce.<name>``, ``allreduce.noname.<handle>``...) is
a "process" row named by metadata events; its operation's phases are
begin/end events with Horovod's names:

    NEGOTIATE_ALLREDUCE   join's agreement round on the control group (a tiny
                          all_reduce), with an instant event named after each
                          rank at the time it entered the round
    ALLREDUCE             the operation, ended with its output's dtype and shape
      WAIT_FOR_OTHER_TENSOR_DATA  DistributedOptimizer: the gradient is final,
                                  its fusion bucket waits for the others in it
      MEMCPY_IN_FUSION_BUFFER     the copy into the bucket
      MESHRUN_ALLREDUCE           the collective (Horovod's MPI_ALLREDUCE)
      MEMCPY_OUT_FUSION_BUFFER    the copy back into the gradient

The file is a JSON array closed after every event (each event is written
over the previous ``]`` and closes it again, as Horovod 0.28 writes), so
it parses even when the job dies. Off, a call tests ``_s.timeline`` (and
its control round ``_s.stamps``).
"""
from __future__ import annotations

import json
import os
import threading
import time
import warnings
from typing import Any

from .basics import _s, _world

__all__ = ["start_timeline", "stop_timeline"]

def now() -> int:
    """Microseconds since the epoch (ranks on one host share the clock)."""
    return time.time_ns() // 1000


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


class Timeline:
    """Rank 0's open timeline file. Every write takes the lock: the
    collectives' completions are written from their lanes' threads."""

    def __init__(self, path: str, mark_cycles: bool) -> None:
        self.path, self.mark_cycles = path, mark_cycles
        self._f: Any = open(path, "wb", buffering=0)    # (OSError: the caller names it)
        self._lock = threading.RLock()     # (re-entered: _finish writes holding it)
        self._rows: dict[str, int] = {}
        self._pending: dict[object, tuple[Any, Any]] = {}    # watched calls not yet written
        self._end = 0       # the file's length (its last byte the closing "]")
        self.start = now()
        self._raw("[\n" + ",\n".join(json.dumps(e) for e in (
            {"name": "process_name", "ph": "M", "pid": 0,
             "args": {"start_time_since_epoch_in_micros": self.start}},
            {"name": "process_sort_index", "ph": "M", "pid": 0, "args": {"sort_index": 0}}))
            + "]", first=True)

    def _raw(self, text: str, first: bool = False) -> None:
        f = self._f
        if f is None:
            return
        data = text.encode()
        at = 0 if first else self._end - 1      # over the "]" that closed the last event
        try:
            while data:
                k = os.pwrite(f.fileno(), data, at)
                data, at = data[k:], at + k
            self._end = at
        except OSError as e:        # (disk full: the timeline stops, as Horovod's)
            self._f = None
            warnings.warn(f"rank 0: the Horovod timeline {self.path}: {e}; no more events "
                          f"are written")

    def _events(self, row: str | None, events: list[dict[str, Any]]) -> None:
        """``events`` of ``row`` (None: global ones), their ts absolute."""
        with self._lock:
            out = []
            pid = 0
            if row is not None:
                pid = self._rows.get(row, 0)
                if not pid:
                    pid = self._rows[row] = len(self._rows) + 1
                    out += [{"name": "process_name", "ph": "M", "pid": pid,
                             "args": {"name": row}},
                            {"name": "process_sort_index", "ph": "M", "pid": pid,
                             "args": {"sort_index": pid}}]
            for e in events:
                e["ts"] = max(0, e["ts"] - self.start)
                if row is not None:
                    e["pid"] = pid
                out.append(e)
            self._raw(",\n" + json.dumps(out)[1:-1] + "]")    # (a line a batch)

    def negotiated(self, row: str, request: str, stamps: dict[int, int], end: int) -> None:
        """A control round: NEGOTIATE_<type> from the first rank's entry to
        ``end``, an instant event named after each rank as it entered."""
        ready = sorted((min(t, end), r) for r, t in stamps.items())
        events: list[dict[str, Any]] = [
            {"ph": "B", "name": "NEGOTIATE_" + request,
             "ts": ready[0][0] if ready else end}]
        events += [{"ph": "X", "name": str(r), "ts": t, "dur": 0} for t, r in ready]
        events.append({"ph": "E", "ts": end})
        self._events(row, events)

    def op(self, row: str, top: str, begin: int, phases: list[tuple[str, int, int]],
           end: int, out: Any = None) -> None:
        """Operation ``top`` from ``begin`` to ``end``, its activities
        ``phases`` (name, start, stop) inside; ``out``: its output tensor."""
        events: list[dict[str, Any]] = [{"ph": "B", "name": top, "ts": begin}]
        for name, t0, t1 in phases:
            events += [{"ph": "B", "name": name, "ts": t0}, {"ph": "E", "ts": t1}]
        last: dict[str, Any] = {"ph": "E", "ts": end}
        if out is not None and hasattr(out, "dtype"):
            last["args"] = {"dtype": dtype_name(out.dtype),
                            "shape": "[" + ", ".join(str(d) for d in out.shape) + "]"}
        events.append(last)
        self._events(row, events)

    def watch(self, row: str, top: str, activity: str, begin: int, work: Any,
              out: Any = None, start: int | None = None) -> None:
        """The operation started at ``begin``, its collective ``work`` (a
        meshrun Work, or None where the call has returned; from ``start``,
        else ``begin``): written when it finishes, with its value's dtype
        and shape (or ``out``'s)."""
        start = begin if start is None else start

        def write(end: int) -> None:
            value = out
            if value is None and work is not None:
                try:
                    value = work.wait()
                except BaseException:       # (an error: no output, as Horovod's)
                    value = None
            if isinstance(value, tuple):
                value = value[0]
            self.op(row, top, begin, [(activity, start, end)], end, value)
        if work is None:
            write(now())
            return
        key = object()
        with self._lock:
            self._pending[key] = (work, write)
        work.add_done_callback(lambda w: self._finish(key))

    def _finish(self, key: object) -> None:
        """An operation's events, once: at its collective's done-callback,
        or where its waiter got there first (``settle``). Claimed and
        written under the lock: a ``settle`` that finds it claimed by the
        lane's thread returns only once it is in the file."""
        with self._lock:
            item = self._pending.pop(key, None)
            if item is not None:
                item[1](now())

    def settle(self) -> None:
        """The operations whose collectives have finished written now (a
        Work's waiter may return before its done-callbacks have run):
        ``synchronize`` and ``step()`` leave the file complete."""
        with self._lock:
            items = list(self._pending.items())
        for key, (work, _) in items:
            if work.done():
                self._finish(key)

    def marker(self) -> None:
        """HOROVOD_TIMELINE_MARK_CYCLES: a control round starts (meshrun's
        analogue of Horovod's coordination cycle)."""
        self._events(None, [{"ph": "i", "name": "CYCLE_START", "ts": now(), "s": "g"}])

    def close(self) -> None:
        self.settle()
        with self._lock:
            f, self._f = self._f, None
        if f is not None:
            f.close()


def row(kind: str, name: str | None, handle: int) -> str:
    """Horovod's name of a call's tensor: ``allreduce.<name>``, else
    ``allreduce.noname.<handle>``."""
    return f"{kind}.{name}" if name else f"{kind}.noname.{handle}"


def open_timeline(path: str, mark_cycles: bool, what: str) -> None:
    """Rank 0: start writing ``path`` (the one open is closed first)."""
    g = _world(what)
    if g.rank != 0:
        return
    close_timeline()
    try:
        _s.timeline = Timeline(path, mark_cycles)
    except OSError as e:
        said = " (HOROVOD_TIMELINE)" if what == "init" else ""
        raise ValueError(f"rank 0: hvd.{what}: cannot write the timeline to {path!r}{said}: "
                         f"{e.strerror or e}") from None


def close_timeline() -> None:
    tl, _s.timeline = _s.timeline, None
    if tl is not None:
        tl.close()


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Start writing Horovod's timeline to ``file_path`` (rank 0 writes;
    the others' calls do nothing); one being written is closed first.
    ``mark_cycles``: a CYCLE_START marker at each control round."""
    if _s.world is None:
        raise ValueError("Horovod has not been initialized; use hvd.init().")
    open_timeline(str(file_path), bool(mark_cycles), "start_timeline")


def stop_timeline() -> None:
    """Stop writing the timeline and close its file (a valid JSON array)."""
    if _s.world is None:
        raise ValueError("Horovod has not been initialized; use hvd.init().")
    close_timeline()
