"""python -m collectives.model: fit, check and extrapolate the cost model.

    python -m collectives.model --fit                 # measure here (2-32 ranks), fit, save
    python -m collectives.model --check               # predicted against measured, fresh run
    python -m collectives.model --check --ranks 2,4,8 --trials 1   # one job per row
    python -m collectives.model --predict --ranks 1024 --hosts 128 --link 10gbit

--fit and --check measure with collectives.tools.sweep (the benchmark's
timing, medians over interleaved rounds, the compute share from the
scheduler), ``--trials`` jobs (3) per world size and path, one after
another, each row the median of its trials; both take ``--from FILE`` (its
JSON lines, or a saved fit's rows) instead of measuring.
``--check --from collectives/model/fitted.json`` shows how well the shipped
fit matches its own measurements.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Sequence

from ..tools.bench import parse_sizes
from .costs import PATHS, algorithm, fit_params, rel_errors, row_share
from .scale import ALGORITHMS, Cluster, at_scale, best, parse_link
from .store import Fit, load, save, shipped_path

__all__ = ["main", "merge", "FIT_RANKS", "FIT_SIZES", "CHECK_SIZES"]

FIT_RANKS = (2, 3, 4, 8, 16, 32)
FIT_SIZES = (8, 1 << 10, 16 << 10, 256 << 10, 2 << 20, 16 << 20)
CHECK_SIZES = (64, 4 << 10, 32 << 10, 128 << 10, 1 << 20, 8 << 20)


def _measure(ranks: Sequence[int], sizes: Sequence[int], rounds: int, trials: int,
             log: str | None) -> list[dict]:
    """Both paths at each world size, ``trials`` times over (each trial a
    fresh job per world size and path, the trials one after another, so a
    burst of load from another job hits one trial of a row, not all);
    each row the median of its trials (``merge``). Each job's rows are
    appended to ``log`` as they come (JSON lines, with their ``trial``), so
    an interrupted run keeps what it measured."""
    from ..tools.sweep import measure
    rows = []
    if log:
        open(log, "w").close()
    for trial in range(trials):
        for n in ranks:
            for path in PATHS:
                print(f"# trial {trial + 1}/{trials}: measuring {path} path, {n} ranks ...",
                      file=sys.stderr, flush=True)
                got = [dict(r, trial=trial) for r in measure(path, n, sizes=sizes,
                                                             rounds=rounds)]
                rows.extend(got)
                if log:
                    with open(log, "a") as f:
                        f.writelines(json.dumps(r) + "\n" for r in got)
    return merge(rows)


def merge(rows: Sequence[dict]) -> list[dict]:
    """One row per (path, op, n, bytes): the median time over the rows
    given (trials), with each share such that time x share is the median
    of the trials' time x share (as collectives.tools.sweep pairs rounds)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["path"], r["op"], r["n"], r["bytes"]), []).append(r)
    out = []
    for same in groups.values():
        if len(same) == 1:
            out.append(same[0])
            continue
        t = statistics.median(r["t"] for r in same)
        row = {k: v for k, v in same[0].items() if k != "trial"}
        row.update(t=t, trials=len(same))
        for key in ("share", "ran"):
            if all(r.get(key) for r in same):
                row[key] = statistics.median(r["t"] * r[key] for r in same) / t
        out.append(row)
    return out


def _read(path: str) -> list[dict]:
    """Measured rows: sweep's JSON lines, or a saved fit's ``rows``."""
    with open(path) as f:
        text = f.read()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return merge([json.loads(line) for line in text.splitlines()
                      if line.strip().startswith("{")])
    return list(whole["rows"]) if isinstance(whole, dict) and "rows" in whole else [whole]


def _ranks(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def cmd_fit(args: argparse.Namespace) -> int:
    rows = _read(args.source) if args.source else _measure(
        _ranks(args.ranks) if args.ranks else FIT_RANKS, FIT_SIZES, args.rounds, args.trials,
        args.save)
    cores = os.cpu_count() or 1
    params = {p: fit_params([r for r in rows if r["path"] == p], cores) for p in PATHS}
    note = (f"fitted from {args.source}" if args.source else
            f"load average at the end of the measurement {os.getloadavg()[0]:.1f}")
    fit = Fit(params, cores, rows, note=args.note or note)
    where = save(fit, args.out)
    for p, v in params.items():
        print(f"{p:7s} a0 {v.a0 * 1e6:8.2f} us  alpha {v.alpha * 1e6:8.2f} us  "
              f"beta {v.beta * 1e9:7.4f} ns/B ({1 / v.beta / 1e9 if v.beta else 0:6.2f} GB/s)  "
              f"gamma {v.gamma * 1e9:7.4f} ns/B  delta {v.delta * 1e6:7.2f} us")
    print(f"fit saved to {where}")
    return 0


def _markdown(path: str, rows: list[dict], errs: list[float]) -> None:
    """One table per path: a row per (op, size), a column per world size,
    each cell "measured / predicted (error)" in microseconds."""
    ns = sorted({r["n"] for r in rows})
    cells: dict[tuple[str, int], dict[int, str]] = {}
    for r, e in zip(rows, errs):
        key = (r["op"], r.get("size") or min(CHECK_SIZES + FIT_SIZES,
                                             key=lambda s: abs(s - r["bytes"])))
        cells.setdefault(key, {})[r["n"]] = (f"{r['t'] * 1e6:.0f} / {r['t'] * (1 + e) * 1e6:.0f}"
                                             f" ({e * 100:+.0f}%)")
    print(f"\n{path} path, us, measured / predicted (error):\n")
    print("| op | size | " + " | ".join(f"{n} ranks" for n in ns) + " |")
    print("|---" * (len(ns) + 2) + "|")
    for (op, size), byn in cells.items():
        print(f"| {op} | {_fmt_b(size)} | " + " | ".join(byn.get(n, "") for n in ns) + " |")


def cmd_check(args: argparse.Namespace) -> int:
    fit, where = load(args.params)
    print(f"# parameters from {where}" + (" (shipped: no fit made on this machine)"
                                          if where == shipped_path() else ""))
    rows = _read(args.source) if args.source else _measure(
        _ranks(args.ranks) if args.ranks else FIT_RANKS, CHECK_SIZES, args.rounds, args.trials,
        args.save)
    print(f"# {'path':6s} {'op':10s} {'n':>3s} {'bytes':>9s} {'alg':>11s} {'share':>5s} "
          f"{'measured':>10s} {'predicted':>10s} {'error':>7s} | {'nominal':>7s}")
    for path in PATHS:
        mine = [r for r in rows if r["path"] == path]
        errs = rel_errors(fit.params[path], fit.cores, mine)
        nominal = rel_errors(fit.params[path], fit.cores, mine, measured_share=False)
        for r, e, e0 in zip(mine, errs, nominal):
            print(f"  {path:6s} {r['op']:10s} {r['n']:3d} {r['bytes']:9d} "
                  f"{algorithm(path, r['op'], r['bytes']):>11s} "
                  f"{row_share(r, fit.cores):5.2f} {r['t'] * 1e6:10.1f} "
                  f"{r['t'] * (1 + e) * 1e6:10.1f} {e * 100:+6.1f}% | {e0 * 100:+6.1f}%")
        if args.markdown and mine:
            _markdown(path, mine, errs)
        if errs:
            within = sum(abs(e) <= 0.2 for e in errs) / len(errs)
            print(f"# {path}: median |error| {statistics.median(map(abs, errs)) * 100:.1f}%, "
                  f"{within * 100:.0f}% of rows within 20% (with the measured share); "
                  f"nominal share min(1, {fit.cores}/n): median |error| "
                  f"{statistics.median(map(abs, nominal)) * 100:.1f}%")
    return 0


def _fmt_t(t: float) -> str:
    if t < 1e-3:
        return f"{t * 1e6:.0f} us"
    if t < 1:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.2f} s"


def _fmt_b(b: int) -> str:
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if b >= 1 << k and b % (1 << k) == 0:
            return f"{b >> k} {unit}"
    return f"{b} B"


def cmd_predict(args: argparse.Namespace) -> int:
    fit, where = load(args.params)
    ranks = int(args.ranks or 1024)
    hosts = int(args.hosts or 1)
    if ranks % hosts:
        raise SystemExit(f"--ranks {ranks} is not a multiple of --hosts {hosts}")
    c = Cluster(hosts, ranks // hosts, parse_link(args.link), args.wire_us * 1e-6)
    sizes = parse_sizes(args.sizes, args.factor)
    print(f"# {args.op}, {ranks} ranks on {hosts} hosts of {c.per_host}, "
          f"{c.link_bps / 1e9:g} Gb/s links, {args.wire_us:g} us wire latency; "
          f"unit costs from {where}")
    algs = ALGORITHMS[args.op]
    print("| size | " + " | ".join(algs) + " | best |")
    print("|---" * (len(algs) + 2) + "|")
    prev = None
    crossings = []
    for size in sizes:
        ts = at_scale(args.op, fit.params["board"], fit.params["socket"], c, size)
        b = best(ts)
        if prev is not None and b != prev:
            crossings.append(f"{prev} -> {b} at {_fmt_b(size)}")
        prev = b
        print(f"| {_fmt_b(size)} | " + " | ".join(_fmt_t(ts[a]) for a in algs) + f" | {b} |")
    print("# crossovers: " + ("; ".join(crossings) if crossings else "none"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m collectives.model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--fit", action="store_true", help="measure, fit, save")
    mode.add_argument("--check", action="store_true", help="predicted against measured")
    mode.add_argument("--predict", action="store_true", help="extrapolate to a cluster")
    ap.add_argument("--ranks", default=None,
                    help="--fit/--check: world sizes (2,4,8); --predict: total ranks (1024)")
    ap.add_argument("--hosts", default=None, help="--predict: hosts (ranks split evenly)")
    ap.add_argument("--link", default="10gbit", help="--predict: 10gbit, 100gbit, or bits/s")
    ap.add_argument("--wire-us", type=float, default=10.0,
                    help="--predict: one-way latency between hosts, us")
    ap.add_argument("--op", default="all_reduce", choices=tuple(ALGORITHMS))
    ap.add_argument("--sizes", default="8:1G", help="--predict: lo:hi or a,b,c")
    ap.add_argument("--factor", type=int, default=8, help="--predict: step of a size range")
    ap.add_argument("--rounds", type=int, default=5,
                    help="interleaved rounds in each job (median)")
    ap.add_argument("--trials", type=int, default=3,
                    help="--fit/--check: jobs per world size and path, one after another "
                         "(each row the median of its trials)")
    ap.add_argument("--from", dest="source", default=None,
                    help="read measurements (sweep JSON lines) instead of measuring")
    ap.add_argument("--save", default=None,
                    help="--fit/--check: also write the measurements here, as they come")
    ap.add_argument("--markdown", action="store_true",
                    help="--check: also print a table per path (as in BENCHMARKS.md)")
    ap.add_argument("--out", default=None, help="--fit: where to save (default: cache)")
    ap.add_argument("--note", default=None,
                    help="--fit: what to record of the conditions (default: the load average)")
    ap.add_argument("--params", default=None, help="--check/--predict: the fit to use")
    args = ap.parse_args(argv)
    if args.fit:
        return cmd_fit(args)
    if args.check:
        return cmd_check(args)
    return cmd_predict(args)


if __name__ == "__main__":
    sys.exit(main())
