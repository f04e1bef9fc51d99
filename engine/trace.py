"""Chrome/Perfetto traces of real pipeline steps, merged from every rank.

Each rank records one row per executed action: name, kind, wall-clock
start and end (``time.time_ns``, which all processes on a host share), and
for a send or receive the id of its message, which becomes a flow arrow
from the send to the end of the receive's wait. ``gather`` collects the
rows on world rank 0 (pp group first, then the dp group of first-stage
ranks); ``chrome_trace`` turns them into the JSON that chrome://tracing and
ui.perfetto.dev open: one process per dp replica, one thread per pp rank.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from mesh import Comm

from .ir import Schedule
from .simulate import SimReport

__all__ = ["Record", "flow_id", "gather", "chrome_trace", "write", "measured",
           "compute_costs", "simulated", "summarize_trace", "render_trace"]

# [name, kind, start_ns, end_ns, flow_dir ("s", "f" or ""), flow_id (0 if none)]
Record = list
_COMPUTE = ("F", "B", "I", "W")


def flow_id(dp_index: int, kind: str, dst_stage: int, mb: int, num_stages: int,
            num_microbatches: int) -> int:
    """The same positive integer on the sending and the receiving rank."""
    k = 0 if kind == "F" else 1
    return ((dp_index * 2 + k) * num_stages + dst_stage) * num_microbatches + mb + 1


def gather(pp: Comm, dp: Comm | None, rows: dict[str, Any], tag: int
           ) -> list[dict[str, Any]] | None:
    """Collect every rank's ``rows`` on pp rank 0 of dp rank 0; None elsewhere.

    ``rows`` must be msgpack-able (it crosses the wire as an object)."""
    if pp.rank != 0:
        pp.send(rows, 0, tag=tag)
        return None
    mine = [rows] + [pp.recv(r, tag=tag) for r in range(1, pp.size)]
    if dp is None or dp.size == 1:
        return mine
    if dp.rank != 0:
        dp.send(mine, 0, tag=tag)
        return None
    for r in range(1, dp.size):
        mine.extend(dp.recv(r, tag=tag))
    return mine


def chrome_trace(ranks: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Trace Event Format from gathered rows (``{"dp", "pp", "events"}`` each)."""
    starts = [e[2] for r in ranks for e in r["events"]]
    t0 = min(starts) if starts else 0
    out: list[dict[str, Any]] = []
    for dp in sorted({r["dp"] for r in ranks}):
        out.append({"name": "process_name", "ph": "M", "pid": dp,
                    "args": {"name": f"dp replica {dp}"}})
    for r in ranks:
        pid, tid = r["dp"], r["pp"]
        out.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                    "args": {"name": f"pp rank {tid}"}})
        for name, kind, start, end, fdir, fid in r["events"]:
            ts, dur = (start - t0) / 1e3, max(end - start, 0) / 1e3
            out.append({"name": name, "cat": kind, "ph": "X", "ts": ts, "dur": dur,
                        "pid": pid, "tid": tid})
            if fdir == "s":
                out.append({"name": "p2p", "cat": "p2p", "ph": "s", "id": fid, "ts": ts,
                            "pid": pid, "tid": tid})
            elif fdir == "f":
                out.append({"name": "p2p", "cat": "p2p", "ph": "f", "bp": "e", "id": fid,
                            "ts": max(ts, ts + dur - 0.001), "pid": pid, "tid": tid})
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": dict(meta or {})}


def write(path: str, trace: dict[str, Any]) -> str:
    with open(path, "w") as f:
        json.dump(trace, f)
    return path


def _slices(trace: dict[str, Any]) -> dict[tuple[int, int], list[dict[str, Any]]]:
    rows: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X":
            rows.setdefault((e["pid"], e["tid"]), []).append(e)
    return rows


def _spans(rows: dict[tuple[int, int], list[dict[str, Any]]]) -> dict[int, float]:
    """Each dp replica's step: from its first action's start to its last's end."""
    ends: dict[int, tuple[float, float]] = {}
    for (pid, _), es in rows.items():
        lo = min(e["ts"] for e in es)
        hi = max(e["ts"] + e["dur"] for e in es)
        a, b = ends.get(pid, (lo, hi))
        ends[pid] = (min(a, lo), max(b, hi))
    return {pid: hi - lo for pid, (lo, hi) in ends.items()}


def measured(trace: dict[str, Any]) -> tuple[float, float]:
    """(step time in microseconds: the longest replica's, bubble) of a trace.
    The bubble is the simulator's, measured: the idle fraction of every rank
    over its replica's step (replicas start unsynchronized), only F/B/I/W
    counting as busy; so waiting for messages, starting sends and
    all-reduces, and the Python between actions count as idle."""
    rows = _slices(trace)
    spans = _spans(rows)
    if not rows:
        return 0.0, 0.0
    busy = sum(e["dur"] for es in rows.values() for e in es if e["cat"] in _COMPUTE)
    total = sum(spans[pid] for pid, _ in rows)
    return max(spans.values()), (1.0 - busy / total if total else 0.0)


def compute_costs(trace: dict[str, Any]) -> dict[str, float]:
    """The mean duration (microseconds) of each compute kind in a trace."""
    durs: dict[str, list[float]] = {}
    for es in _slices(trace).values():
        for e in es:
            if e["cat"] in _COMPUTE:
                durs.setdefault(e["cat"], []).append(e["dur"])
    return {k: sum(v) / len(v) for k, v in durs.items()}


def simulated(trace: dict[str, Any]) -> SimReport | None:
    """The simulator's report for the traced schedule at the trace's own mean
    compute times, messages free (microseconds): the bubble the schedule
    itself leaves, without communication or overhead. None when the trace
    holds no schedule."""
    sched = trace.get("otherData", {}).get("schedule")
    costs = compute_costs(trace)
    if not sched or not costs:
        return None
    return Schedule.from_dict(sched).simulate(costs)


def summarize_trace(trace: dict[str, Any]) -> str:
    """Per-rank compute, receive waits, other actions (sends, all-reduce
    starts) and the gaps between actions; the step's measured bubble beside
    the simulator's for the same schedule at the same compute times."""
    rows = _slices(trace)
    span, bubble = measured(trace)
    spans = _spans(rows)
    lines = [f"{'dp':>3} {'pp':>3} {'actions':>8} {'compute ms':>11} {'recv wait ms':>13} "
             f"{'other ms':>9} {'gaps ms':>8} {'idle':>6}"]
    for (pid, tid), es in sorted(rows.items()):
        busy = sum(e["dur"] for e in es if e["cat"] in _COMPUTE)
        wait = sum(e["dur"] for e in es if e["cat"].startswith("RECV"))
        other = sum(e["dur"] for e in es) - busy - wait
        gaps = spans[pid] - busy - wait - other
        idle = 1.0 - busy / spans[pid] if spans[pid] else 0.0
        lines.append(f"{pid:>3} {tid:>3} {len(es):>8} {busy / 1e3:>11.3f} {wait / 1e3:>13.3f} "
                     f"{other / 1e3:>9.3f} {gaps / 1e3:>8.3f} {idle:>6.1%}")
    lines.append(f"step {span / 1e3:.3f} ms, measured bubble {bubble:.1%} (the idle share of "
                 f"each replica's step; only F/B/I/W are busy,\n  so message waits, sends, "
                 f"all-reduce starts and the gaps between actions count as idle)")
    sim = simulated(trace)
    if sim is not None and sim.makespan:
        costs = " ".join(f"{k} {v / 1e3:.3f}" for k, v in sorted(compute_costs(trace).items()))
        lines.append(f"simulator, same schedule at these mean compute times ({costs} ms) and "
                     f"free messages:\n  makespan {sim.makespan / 1e3:.3f} ms, bubble "
                     f"{sim.bubble:.1%}; communication and overhead make the step "
                     f"{span / sim.makespan:.1f}x longer")
    pred = trace.get("otherData", {}).get("predicted_makespan_ms")
    if pred:
        by = trace["otherData"].get("predicted_by", "simulator")
        lines.append(f"{by} predicted {pred:.3f} ms; measured/predicted "
                     f"{span / 1e3 / pred:.2f}")
    return "\n".join(lines)


_GRID_CELLS = 120      # the measured grid's widest row, in cells


def render_trace(trace: dict[str, Any]) -> str:
    """The measured timeline as a text grid like ``Schedule.render``: each
    column is the shortest compute action's duration, or the step's
    1/120th where that is longer (a real step's W of microseconds among
    forwards of milliseconds made rows of thousands of cells); an action
    shorter than a cell takes one, after the one before it on its row, so
    every action is shown, in order. A first line says a cell's time."""
    rows = _slices(trace)
    comp = {k: [e for e in es if e["cat"] in _COMPUTE and e["dur"] > 0]
            for k, es in rows.items()}
    every = [e for es in comp.values() for e in es]
    if not every:
        return "(no compute actions in this trace)"
    t0 = min(e["ts"] for e in every)
    span = max(e["ts"] + e["dur"] for e in every) - t0
    unit = max(min(e["dur"] for e in every), span / _GRID_CELLS)
    width = max(len(e["name"]) for e in every)
    placed = {}
    for key, es in comp.items():
        free, cells = 0, []
        for e in sorted(es, key=lambda e: e["ts"]):
            col = max(round((e["ts"] - t0) / unit), free)
            free = col + max(1, round(e["dur"] / unit))
            cells.append((e["name"], col, free))
        placed[key] = cells
    ncols = max(stop for cells in placed.values() for _, _, stop in cells)
    lines = [f"one cell = {unit / 1e3:.3g} ms (measured; '.' idle or waiting)"]
    for (pid, tid), cells in sorted(placed.items()):
        row = [".".center(width)] * ncols
        for name, col, stop in cells:
            row[col] = name.center(width)
            for c in range(col + 1, stop):
                row[c] = "-" * width
        lines.append(f"dp{pid} pp{tid} | {' '.join(row)}".rstrip())
    return "\n".join(lines)
