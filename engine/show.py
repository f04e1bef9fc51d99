"""``python -m engine.show``: print a schedule or summarize a trace.

    python -m engine.show 1f1b 4 8                 # grid + simulated figures
    python -m engine.show interleaved 4 8 --chunks 2 --costs F=1,B=2
    python -m engine.show 1f1b 4 8 --cores 2       # the 4 ranks sharing 2 cores
    python -m engine.show 1f1b 2 4 --cores 2 --load 2   # ... with 2 others' processes
    python -m engine.show zb-h1 4 8 --json > s.json
    python -m engine.show s.json                   # a schedule saved as JSON
    python -m engine.show step.trace.json          # a trace written by Pipeline
    python -m engine.show step.trace.json --grid   # the measured timeline as a grid

Invalid schedules print the verifier's marked grid and exit with status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from mesh.cliargs import checked, nonnegative_float, positive, positive_float

from .ir import Schedule, format_program
from .schedules import by_name
from .simulate import DEFAULT_COSTS, _costs
from .verify import ScheduleError

__all__ = ["main", "parse_costs", "legend"]


def parse_costs(text: str | None) -> dict[str, float]:
    """``"F=1,B=2,send=0.1"`` -> ``{"F": 1.0, "B": 2.0, "send": 0.1}``."""
    costs: dict[str, float] = {}
    for part in (text or "").split(","):
        if part.strip():
            key, eq, value = part.partition("=")
            try:
                costs[key.strip()] = float(value)
            except ValueError:
                raise ValueError(f"{part.strip()!r}: costs are KEY=NUMBER, e.g. F=1,B=2"
                                 ) from None
    _costs(costs, 1)     # known keys, finite, not negative
    return costs


def legend(costs: dict[str, float], split: bool) -> str:
    """What the grid's cells mean and the costs it was simulated with:
    the grid and the figures under it are the one simulation."""
    kinds = ("F", "I", "W") if split else ("F", "B")
    shown = " ".join(f"{k}={costs[k]:g}" for k in kinds + ("send",))
    backward = ("I its input gradient, W its weight gradient (a backward split in two)"
                if split else "B its backward")
    return (f"legend: 1F3 = stage 1's forward of micro-batch 3; {backward}; "
            f"'---' the action going on; '.' idle (a bubble)\n"
            f"costs: {shown} (time units, --costs to change); a cell: the shortest action's time\n"
            f"bubble: the ranks' idle share of the whole step (within each rank's span: from its "
            f"first action to its last, the zero-bubble paper's measure); peak activations: "
            f"the micro-batches a rank holds at once")


def _show_schedule(sched: Schedule, args: argparse.Namespace) -> int:
    if args.json:
        print(sched.to_json(indent=None))
        return 0
    # the grid drawn with the costs the figures are simulated with (it was drawn with
    # every action one cell while the figures took B=2: "makespan 33" under 22 cells)
    costs = {**DEFAULT_COSTS, **args.costs}
    try:
        lowered = sched.validate()
        if args.load and args.cores is None:
            print("--load needs --cores: the cores the ranks and the others share",
                  file=sys.stderr)
            return 2
        report = sched.simulate(costs, args.cores, args.load)
    except ScheduleError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{sched.name}: {sched.num_ranks} ranks, {sched.num_stages} stages, "
          f"{sched.num_microbatches} micro-batches")
    split = any(a.kind in ("I", "W") for row in sched.ranks for a in row)
    print(legend(costs, split))
    print(sched.render(costs, args.cores, args.load))
    print(report)
    if args.lowered:
        print(format_program(lowered))
    return 0


def _show_file(path: str, args: argparse.Namespace) -> int:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise SystemExit(f"engine.show: {path!r} is neither a schedule name (gpipe, 1f1b, "
                         f"interleaved, zb-h1, zb-h2, zb-v) nor a file it can read "
                         f"({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"engine.show: {path} is not JSON ({e})") from None
    if isinstance(data, dict) and "ranks" in data:
        try:
            sched = Schedule.from_dict(data)
        except (KeyError, TypeError, ValueError) as e:
            raise SystemExit(f"engine.show: {path} is not a schedule that "
                             f"Schedule.to_json writes: {e!r}") from None
        return _show_schedule(sched, args)
    if not (isinstance(data, dict) and isinstance(data.get("traceEvents"), list)):
        raise SystemExit(f"engine.show: {path} is neither a schedule (Schedule.to_json, "
                         "`engine.show NAME P M --json`) nor a trace (with traceEvents)")
    from .trace import render_trace, summarize_trace
    print(render_trace(data) if args.grid else summarize_trace(data))
    return 0


def _a_name(what: str) -> bool:
    """Whether ``what`` names a built-in schedule."""
    try:
        by_name(what, 2, 4)
    except ValueError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.show", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", help="schedule name (gpipe, 1f1b, interleaved, zb-h1, zb-h2, "
                                 "zb-v) or a JSON file")
    ap.add_argument("p", nargs="?", type=positive, help="pipeline ranks")
    ap.add_argument("m", nargs="?", type=positive, help="micro-batches")
    ap.add_argument("--chunks", type=positive, default=2,
                    help="virtual stages per rank (interleaved)")
    ap.add_argument("--costs", type=checked(parse_costs), default={},
                    help="per-action costs, e.g. F=1,B=2,I=1,W=1,send=0")
    ap.add_argument("--cores", type=positive_float,
                    help="the ranks share this many cores (processor "
                    "sharing: actions that overlap slow down)")
    ap.add_argument("--load", type=nonnegative_float, default=0.0,
                    help="with --cores: others' processes that want those cores "
                    "too, in ranks' worth (every action slows down)")
    ap.add_argument("--json", action="store_true", help="print the schedule as JSON")
    ap.add_argument("--lowered", action="store_true", help="also print each rank's program")
    ap.add_argument("--grid", action="store_true", help="for a trace: the measured grid")
    args = ap.parse_args(argv)
    if args.p is None and (os.path.exists(args.what) or not _a_name(args.what)):
        return _show_file(args.what, args)
    if os.path.isfile(args.what) and not _a_name(args.what):
        ap.error(f"{args.what} is a file: a saved schedule or trace holds its own ranks and "
                 f"micro-batches, so give no p and m: python -m engine.show {args.what}")
    if args.m is None:      # (a name alone was "neither a schedule name nor a file")
        ap.error(f"give both p and m after the schedule name: pipeline ranks and "
                 f"micro-batches, e.g. python -m engine.show {args.what} 4 8")
    try:
        sched = by_name(args.what, args.p, args.m, args.chunks)
    except ValueError as e:
        ap.error(str(e))
    return _show_schedule(sched, args)


if __name__ == "__main__":
    sys.exit(main())
