"""python -m collectives.model: fit, check and extrapolate the cost model.

    python -m collectives.model --fit                 # measure here (2-32 ranks), fit, save
    python -m collectives.model --check               # predicted against measured, fresh run
    python -m collectives.model --check --ranks 2,4,8 --trials 1   # one job per row
    python -m collectives.model --fit-check --ranks 2,4,8 --save rows.jsonl --out fit.json
    python -m collectives.model --predict --ranks 1024 --hosts 128 --link 10gbit
    python -m collectives.model --predict --tables --into docs/scale.md

--fit, --check and --fit-check measure with collectives.tools.sweep (the
benchmark's timing, the median of interleaved rounds, the compute share
from the scheduler), ``--trials`` jobs (3) per world size and path, one
after another, each row the median of its trials (``merge``); all take
``--from FILE`` (its JSON lines, or a saved fit's rows) instead of
measuring. ``--check --from collectives/model/fitted.json`` shows how well
the shipped fit matches its own measurements.

--fit-check measures the fit's sizes and the check's held-out sizes in the
same jobs, their rows alternating in every round (FIT_SIZES and
CHECK_SIZES alternate: INTERLEAVED), fits on the fit sizes, saves that fit and reports
the held-out rows against it as --check does: a machine that gets faster
or slower during the run moves both alike, where a --fit then a --check
would see it as model error.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Sequence

from mesh.cliargs import checked, nonnegative_float, positive, positive_list

from ..tools.bench import parse_sizes
from .costs import PATHS, algorithm, fit_params, rel_errors, row_share
from .scale import ALGORITHMS, Cluster, at_scale, best, parse_link
from .store import Fit, load, save, shipped_path

__all__ = ["main", "merge", "split", "tables", "FIT_RANKS", "FIT_SIZES", "CHECK_SIZES",
           "INTERLEAVED", "TABLES_BEGIN", "TABLES_END"]

FIT_RANKS = (2, 3, 4, 8, 16, 32)
FIT_SIZES = (8, 1 << 10, 16 << 10, 256 << 10, 2 << 20, 16 << 20)
CHECK_SIZES = (64, 4 << 10, 32 << 10, 128 << 10, 1 << 20, 8 << 20)
INTERLEAVED = tuple(s for pair in zip(FIT_SIZES, CHECK_SIZES) for s in pair)
"""--fit-check's sizes: a fit size, a held-out one, and so on (sweep runs its
rows in this order in every round)."""


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
    """One row per (path, op, n, size): the median time over the rows
    given (trials), with each share such that time x share is the median
    of the trials' time x share (as collectives.tools.sweep pairs rounds).

    The median of the trials' medians (each trial's the median of its
    rounds): one trial hit by another job moves it little. Tried against the
    geometric mean and the minimum of the trials on the saved runs of
    2026-12-01 (docs/scale.md, "How to check it"): no statistic was better on
    every run, the minimum the worst on the board path."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:      # by the size asked for: two sizes may move the same bytes
        same_row = (r["path"], r["op"], r["n"], r.get("size", r["bytes"]), r["bytes"])
        groups.setdefault(same_row, []).append(r)
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


def _link(text: str) -> float:
    """--link: parse_link's bits per second, a finite number above 0."""
    try:
        bps = parse_link(text)
    except ValueError:
        bps = 0.0
    if not 0 < bps < float("inf"):
        raise ValueError(f"{text!r}: a link speed above 0 (10gbit, 100gbit, or bits/s)")
    return bps


def _check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What one option alone cannot say: a usage error (exit 2), not a
    traceback from the middle of a run."""
    try:
        parse_sizes(args.sizes, args.factor)
    except ValueError as e:
        ap.error(f"argument --sizes/--factor: {e}")
    for opt, path in (("--from", args.source), ("--params", args.params)):
        if path is not None and not os.path.isfile(path):
            ap.error(f"argument {opt}: {path}: no such file")
    if args.predict:
        if args.ranks is not None and len(args.ranks) != 1:
            ap.error(f"argument --ranks: --predict takes one total, not {len(args.ranks)}")
        ranks = args.ranks[0] if args.ranks else 1024
        hosts = args.hosts or (128 if args.tables else 1)
        if ranks % hosts:
            ap.error(f"--ranks {ranks} is not a multiple of --hosts {hosts}")


def split(rows: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(the rows at FIT_SIZES, the others: held out), by the size asked."""
    fit = [r for r in rows if r.get("size", r["bytes"]) in FIT_SIZES]
    return fit, [r for r in rows if r.get("size", r["bytes"]) not in FIT_SIZES]


def _fit_and_save(rows: list[dict], args: argparse.Namespace, note: str) -> Fit:
    cores = os.cpu_count() or 1
    params = {p: fit_params([r for r in rows if r["path"] == p], cores) for p in PATHS}
    fit = Fit(params, cores, rows, note=args.note or note)
    where = save(fit, args.out)
    for p, v in params.items():
        print(f"{p:7s} a0 {v.a0 * 1e6:8.2f} us  alpha {v.alpha * 1e6:8.2f} us  "
              f"beta {v.beta * 1e9:7.4f} ns/B ({1 / v.beta / 1e9 if v.beta else 0:6.2f} GB/s)  "
              f"gamma {v.gamma * 1e9:7.4f} ns/B  delta {v.delta * 1e6:7.2f} us  "
              f"kappa {v.kappa * 1e6:7.2f} us")
    print(f"fit saved to {where}")
    return fit


def _note(args: argparse.Namespace) -> str:
    return (f"fitted from {args.source}" if args.source else
            f"load average at the end of the measurement {os.getloadavg()[0]:.1f}")


def cmd_fit(args: argparse.Namespace) -> int:
    rows = _read(args.source) if args.source else _measure(
        args.ranks or FIT_RANKS, FIT_SIZES, args.rounds, args.trials,
        args.save)
    _fit_and_save(rows, args, _note(args))
    return 0


def cmd_fit_check(args: argparse.Namespace) -> int:
    rows = _read(args.source) if args.source else _measure(
        args.ranks or (2, 4, 8),
        INTERLEAVED, args.rounds, args.trials, args.save)
    fit_rows, held = split(rows)
    if not fit_rows or not held:
        raise SystemExit(f"--fit-check needs rows at the fit's sizes {FIT_SIZES} and at "
                         f"others (held out); got {len(fit_rows)} and {len(held)}")
    fit = _fit_and_save(fit_rows, args, _note(args) + "; fitted on the sizes of an "
                        "interleaved --fit-check run, its held-out rows not included")
    own = {p: rel_errors(fit.params[p], fit.cores, [r for r in fit_rows if r["path"] == p])
           for p in PATHS}
    print("# the fit's own rows: " + "; ".join(
        f"{p} median |error| {statistics.median(map(abs, e)) * 100:.1f}%"
        for p, e in own.items() if e))
    print(f"# held-out rows ({len(held)}) against the fit above, measured in the same jobs")
    _report(fit, held, args.markdown)
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
        args.ranks or FIT_RANKS, CHECK_SIZES, args.rounds, args.trials,
        args.save)
    _report(fit, rows, args.markdown)
    return 0


def _report(fit: Fit, rows: list[dict], markdown: bool) -> None:
    """Each row predicted against measured, a table per path (``markdown``)
    and a summary line per path."""
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
        if markdown and mine:
            _markdown(path, mine, errs)
        if errs:
            within = sum(abs(e) <= 0.2 for e in errs) / len(errs)
            byn = ", ".join(
                f"{n}: {statistics.median(e for e, r in zip(errs, mine) if r['n'] == n) * 100:+.0f}%"
                f" ({statistics.median(abs(e) for e, r in zip(errs, mine) if r['n'] == n) * 100:.0f}%)"
                for n in sorted({r["n"] for r in mine}))
            print(f"# {path}: median |error| {statistics.median(map(abs, errs)) * 100:.1f}%, "
                  f"{within * 100:.0f}% of rows within 20% (with the measured share); "
                  f"nominal share min(1, {fit.cores}/n): median |error| "
                  f"{statistics.median(map(abs, nominal)) * 100:.1f}%; "
                  f"median signed (|error|) by ranks {byn}")


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


def _table(fit: Fit, op: str, c: Cluster, sizes: Sequence[int]) -> tuple[list[str], list[str]]:
    """Markdown rows of ``op``'s algorithms at ``sizes`` on ``c``, and the
    best algorithm at each size."""
    algs = ALGORITHMS[op]
    lines = ["| size | " + " | ".join(algs) + " | best |", "|---" * (len(algs) + 2) + "|"]
    bests = []
    for size in sizes:
        ts = at_scale(op, fit.params["board"], fit.params["socket"], c, size)
        bests.append(best(ts))
        lines.append(f"| {_fmt_b(size)} | " + " | ".join(_fmt_t(ts[a]) for a in algs)
                     + f" | {bests[-1]} |")
    return lines, bests


def _crossings(sizes: Sequence[int], bests: Sequence[str]) -> list[str]:
    return [f"{a} -> {b} at {_fmt_b(s)}" for s, a, b in zip(sizes[1:], bests, bests[1:]) if a != b]


def _runs(sizes: Sequence[int], bests: Sequence[str]) -> str:
    """"rd up to 4 KiB, hier_rd from 8 KiB, ...": where each algorithm is best."""
    runs: list[tuple[str, int, int]] = []
    for s, b in zip(sizes, bests):
        if runs and runs[-1][0] == b:
            runs[-1] = (b, runs[-1][1], s)
        else:
            runs.append((b, s, s))
    if len(runs) == 1:
        return f"{runs[0][0]} at every size"
    return ", ".join(f"{b} up to {_fmt_b(hi)}" if i == 0 else f"{b} from {_fmt_b(lo)}"
                     for i, (b, lo, hi) in enumerate(runs))


TABLES_BEGIN = "<!-- generated by: python -m collectives.model --predict --tables; do not edit -->"
TABLES_END = "<!-- end of generated tables -->"
TABLE_LINKS = ("10gbit", "100gbit")


def tables(fit: Fit, where: str, ranks: int, hosts: int, wire: float,
           sizes: Sequence[int], fine: Sequence[int]) -> str:
    """docs/scale.md's extrapolation: a table per collective and link speed
    at ``sizes``, then where each algorithm is best on the ``fine`` grid."""
    c0 = Cluster(hosts, ranks // hosts, 1.0, wire)
    out = [f"Generated from {where} ({fit.note or 'no note'}); {ranks} ranks on {hosts} hosts "
           f"of {c0.per_host}, {wire * 1e6:g} us wire latency. Times per call; \"best\" is "
           "the fastest column.", ""]
    summary = []
    for op in ALGORITHMS:
        row = []
        for link in TABLE_LINKS:
            c = Cluster(hosts, ranks // hosts, parse_link(link), wire)
            lines, bests = _table(fit, op, c, sizes)
            cross = _crossings(sizes, bests)
            out += [f"### {op}, {c.link_bps / 1e9:g} Gb/s", "", *lines, "",
                    f"(crossovers: {'; '.join(cross) if cross else 'none'} on this grid "
                    "of sizes)", ""]
            row.append(_runs(fine, _table(fit, op, c, fine)[1]))
        summary.append(f"| {op} | " + " | ".join(row) + " |")
    out += ["### Where each algorithm is best", "",
            f"Finer grid (sizes {_fmt_b(fine[0])} to {_fmt_b(fine[-1])}, factor "
            f"{fine[1] // fine[0]}):", "",
            "| collective | " + " | ".join(f"{parse_link(x) / 1e9:g} Gb/s"
                                           for x in TABLE_LINKS) + " |",
            "|---" * (len(TABLE_LINKS) + 1) + "|", *summary]
    return "\n".join(out) + "\n"


def _into(path: str, text: str) -> None:
    """Replace what lies between TABLES_BEGIN and TABLES_END in ``path``."""
    with open(path) as f:
        doc = f.read()
    if doc.count(TABLES_BEGIN) != 1 or doc.count(TABLES_END) != 1:
        raise SystemExit(f"{path} must hold the lines {TABLES_BEGIN!r} and {TABLES_END!r} "
                         "once each")
    head, rest = doc.split(TABLES_BEGIN)
    _, tail = rest.split(TABLES_END)
    with open(path, "w") as f:
        f.write(head + TABLES_BEGIN + "\n\n" + text + "\n" + TABLES_END + tail)


def cmd_predict(args: argparse.Namespace) -> int:
    fit, where = load(args.params)
    ranks = args.ranks[0] if args.ranks else 1024      # (main checked these)
    hosts = args.hosts or (128 if args.tables else 1)
    sizes = parse_sizes(args.sizes, args.factor)
    if args.tables:
        name = os.path.relpath(where) if not os.path.isabs(args.params or "") else str(where)
        text = tables(fit, name, ranks, hosts, args.wire_us * 1e-6, sizes,
                      parse_sizes(args.sizes, 2))
        if args.into:
            _into(args.into, text)
            print(f"tables written into {args.into}")
        else:
            print(text, end="")
        return 0
    c = Cluster(hosts, ranks // hosts, args.link, args.wire_us * 1e-6)
    print(f"# {args.op}, {ranks} ranks on {hosts} hosts of {c.per_host}, "
          f"{c.link_bps / 1e9:g} Gb/s links, {args.wire_us:g} us wire latency; "
          f"unit costs from {where}")
    lines, bests = _table(fit, args.op, c, sizes)
    print("\n".join(lines))
    cross = _crossings(sizes, bests)
    print("# crossovers: " + ("; ".join(cross) if cross else "none"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m collectives.model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--fit", action="store_true", help="measure, fit, save")
    mode.add_argument("--check", action="store_true", help="predicted against measured")
    mode.add_argument("--fit-check", action="store_true",
                      help="fit sizes and held-out sizes measured interleaved in one run "
                           "(ranks 2,4,8): fit, save, report the held-out rows")
    mode.add_argument("--predict", action="store_true", help="extrapolate to a cluster")
    ap.add_argument("--ranks", default=None, type=positive_list,
                    help="--fit/--check: world sizes (2,3,4,8,16,32), --fit-check (2,4,8); "
                         "--predict: total ranks (1024)")
    ap.add_argument("--hosts", default=None, type=positive,
                    help="--predict: hosts (ranks split evenly)")
    ap.add_argument("--link", default="10gbit", type=checked(_link),
                    help="--predict: 10gbit, 100gbit, or bits/s")
    ap.add_argument("--wire-us", type=nonnegative_float, default=10.0,
                    help="--predict: one-way latency between hosts, us")
    ap.add_argument("--op", default="all_reduce", choices=tuple(ALGORITHMS))
    ap.add_argument("--tables", action="store_true",
                    help="--predict: every collective at 10 and 100 Gb/s, and where each "
                         "algorithm is best, as docs/scale.md shows them (hosts 128)")
    ap.add_argument("--into", default=None,
                    help="--predict --tables: write them into this file, between its "
                         "generated-tables marks (docs/scale.md)")
    ap.add_argument("--sizes", default="8:1G", help="--predict: lo:hi or a,b,c")
    ap.add_argument("--factor", type=positive, default=8,
                    help="--predict: step of a size range")
    ap.add_argument("--rounds", type=positive, default=5,
                    help="interleaved rounds in each job (median)")
    ap.add_argument("--trials", type=positive, default=3,
                    help="--fit/--check/--fit-check: jobs per world size and path, one after another "
                         "(each row the median of its trials)")
    ap.add_argument("--from", dest="source", default=None,
                    help="read measurements (sweep JSON lines) instead of measuring")
    ap.add_argument("--save", default=None,
                    help="--fit/--check/--fit-check: also write the measurements here, as "
                         "they come")
    ap.add_argument("--markdown", action="store_true",
                    help="--check/--fit-check: also print a table per path (as in "
                         "BENCHMARKS.md)")
    ap.add_argument("--out", default=None,
                    help="--fit/--fit-check: where to save (default: cache)")
    ap.add_argument("--note", default=None,
                    help="--fit/--fit-check: what to record of the conditions (default: the "
                         "load average)")
    ap.add_argument("--params", default=None, help="--check/--predict: the fit to use")
    args = ap.parse_args(argv)
    _check_args(ap, args)
    if args.fit:
        return cmd_fit(args)
    if args.check:
        return cmd_check(args)
    if args.fit_check:
        return cmd_fit_check(args)
    return cmd_predict(args)


if __name__ == "__main__":
    sys.exit(main())
