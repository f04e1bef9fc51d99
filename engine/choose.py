"""Choose a schedule by simulating it: measured layer costs in, candidates out.

``time_layer`` and ``measure`` time each layer's forward, backward and split backward (I, W)
on micro-batches of the sizes a step may use; ``cut`` splits per-layer
weights into contiguous stages so that the heaviest stage is as light as it
can be; ``candidates`` cuts the layers for every built-in schedule and
micro-batch count, simulates each with its per-stage costs (``{"F": [...]}``),
and returns them best first: feasible under the memory limit, then by
predicted step time. A stage of several layers costs more than its layers
timed one by one (each timed alone keeps its weights in the core's cache; a
stage runs through all of its layers' weights, as the step does: mostly
1.05-1.35x the sum on the 2-core machine, BENCHMARKS.md), so ``stage_spans`` lists the
candidates' stages and ``measure_stages`` times each whole, and
``candidates`` takes those times where it has them. ``time_program`` times
a rank's stages as a step runs them (its actions in the schedule's order),
for the chosen schedule's re-time. ``table`` prints them::

    schedule                 m  layers/stage   pred ms  bubble   peak MB
    zero_bubble_h1(2,8)      8  3 3              41.2    7.9%      1.5  <- chosen
    1f1b(2,8)                8  3 3              44.0   13.6%      1.0

The parts: engine.costs (``LayerCost``, the cut, the simulator's costs,
the peak), engine.profiling (the timing), engine.candidates (the
candidates, ranked), engine.retime (simulated again: under load,
re-timed, re-costed); this module prints the table and gives every
part's names, as ``engine.choose.X``.
"""
from __future__ import annotations

from typing import Sequence

from .candidates import (SCHEDULES, Candidate, Unrun, best_first, builtin, candidates, fewest,
                         microbatch_counts, stage_spans, yours)
from .costs import (KEEPS_INPUT, KEEPS_OUTPUT, LayerCost, Span, as_run, counts_for, cut,
                    helper_charge, layer_by_layer, peak_bytes, recomputed, stage_costs,
                    stage_held, whole_counts)
from .profiling import (held_by, kept_buffers, kept_random, measure, measure_stages,
                        time_layer, time_program)
from .retime import busiest_compute, calibrated, loaded, recosted, retimed, under_load

__all__ = ["LayerCost", "KEEPS_INPUT", "KEEPS_OUTPUT", "stage_held", "layer_by_layer",
           "held_by", "Candidate", "kept_random", "calibrated",
           "time_layer", "kept_buffers", "time_program", "measure", "measure_stages",
           "stage_spans", "cut", "counts_for", "stage_costs", "helper_charge", "peak_bytes",
           "microbatch_counts", "builtin", "candidates", "retimed", "recosted", "best_first",
           "table", "SCHEDULES", "Span",
           "recomputed", "as_run", "whole_counts", "fewest", "loaded", "under_load",
           "busiest_compute", "recomputing", "legend", "retimed_said", "yours", "Unrun",
           "in_bytes"]


def recomputing(recompute: bool | frozenset[int],
                layered: bool | int | Sequence[int] = False) -> str:
    """How a candidate's stages hold their activations, in words (per stage
    runs: the recomputing stages' Ns in stage order, "all" where whole:
    "recomputed by 2,3 layers")."""
    if isinstance(layered, (tuple, list)):
        stages = sorted(recompute) if isinstance(recompute, frozenset) else range(len(layered))
        how = " by " + ",".join(str(layered[s]) if layered[s] else "all" for s in stages) + \
            " layers"
    else:
        how = " by layer" if layered == 1 else f" by {layered} layers" if layered else ""
    if isinstance(recompute, frozenset):
        return f"recomputed{how} in stage" + ("s " if len(recompute) > 1 else " ") + ",".join(
            map(str, sorted(recompute)))
    return f"recomputed{how}" if recompute else "kept"


def legend(cands: Sequence[Candidate], why: bool = True) -> str:
    """What ``table``'s columns are and, with ``why``, why its mark is where
    it is (a row under the chosen one may show less time: its figure is a
    lower bound); without, for a schedule given by name."""
    own = any(c.measured for c in cands)
    limit = "" if all(c.fits for c in cands) else " under the memory limit"
    columns = ("pred ms: the simulated step (every micro-batch, all ranks); bubble: the "
               "ranks' idle share of it; peak MB: the most activations one rank holds")
    if not why:
        return columns
    if any(c.retimed is not None for c in cands):     # (``calibrated``)
        return (columns + "\n"
                f"chosen: the fastest{limit}" + (
                    ", once costed by a dry run of its own schedule (its own dry run)"
                    if own else "") + ", before the rows were re-timed: each row now holds "
                "what the chosen schedule's re-time found, so another may show less time")
    return (columns + "\n"
            f"chosen: the fastest{limit}" + (
                ", once costed by a dry run of its own schedule (its own dry run); the "
                "other rows' figures are from a 1F1B dry run, a lower bound" if own else ""))


def retimed_said(row: Candidate, again: Candidate) -> str:
    """The re-timed prediction (``again``: engine.distribute's
    ``job.predicted``) of the chosen schedule whose profiled row is ``row``
    (``job.profiled``; the table prints every row re-timed: ``calibrated``),
    beside the row's figure, and what moved it: the row was simulated from
    the profile (each layer, or stage, timed on its own; the executor's
    costs from the choice's dry run), the re-time from its stages timed
    again in the schedule's order and a dry run of the schedule itself
    (its messages at their sizes, the dp step's end)."""
    ms = 1e3
    said = (f"{again.schedule.name} re-timed as its steps will run: {again.makespan * ms:.2f} "
            f"ms a step (job.predicted: the figure to set a measured step against)")
    if f"{again.makespan * ms:.2f}" == f"{row.makespan * ms:.2f}":
        return said
    moved = [f"the busiest rank's compute {busiest_compute(row) * ms:.2f} -> "
             f"{busiest_compute(again) * ms:.2f} ms (its stages timed again, in its order)"]
    if f"{row.overhead * ms:.2f}" != f"{again.overhead * ms:.2f}":
        moved.append(f"the executor's own {row.overhead * ms:.2f} -> {again.overhead * ms:.2f} "
                     f"ms an action")
    send = (max(row.costs["send"], default=0.0), max(again.costs["send"], default=0.0))
    if f"{send[0] * ms:.2f}" != f"{send[1] * ms:.2f}":
        moved.append(f"a message {send[0] * ms:.2f} -> {send[1] * ms:.2f} ms")
    return (said + f"; the profile's {row.makespan * ms:.2f} ms before it:\n  "
            + ", ".join(moved) + (" (a dry run of the schedule itself)" if len(moved) > 1
                                  else ""))


def in_bytes(n: float) -> str:
    """``n`` bytes in words: "1.30 GiB", "12.0 MiB", "512 B"."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n < 100 * size else f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"


def table(cands: Sequence[Candidate], chosen: Candidate | None = None,
          skipped: Sequence[Unrun] = ()) -> str:
    """The candidates as a text table, the chosen one marked, one over the
    memory limit saying by how much; then those ``skipped`` (name,
    micro-batches, why: a schedule that cannot run, its layers failed on
    its micro-batches, a BatchNorm given one row; interleaved at ``m % p``;
    more stages than the model has layers)."""
    again = any(c.recompute for c in cands)     # a column saying which recompute
    lines = [f"{'schedule':<28} {'m':>3}  {'layers/stage':<14} {'pred ms':>9} {'bubble':>7} "
             f"{'peak MB':>8}" + ("  activations" if again else "")]
    for c in cands:
        note = "  <- chosen" if c is chosen else ("" if c.fits else "  over the memory limit" + (
            "" if c.limit is None else
            f": {in_bytes(c.peak_bytes)} > {in_bytes(c.limit)}"))
        note = ("  (its own dry run)" if c.measured else "") + note
        counts = " ".join(str(n) for n in c.counts)
        if len(counts) > 14:
            counts = counts[:11] + "..."
        lines.append(f"{c.schedule.name:<28} {c.schedule.num_microbatches:>3}  {counts:<14} "
                     f"{c.makespan * 1e3:>9.2f} {c.bubble:>7.1%} {c.peak_bytes / 2**20:>8.2f}"
                     + (f"  {recomputing(c.recompute, c.layered):<11}" if again else "")
                     + note)
    for name, m, why in skipped:
        why = why if len(why) <= 120 else why[:117] + "..."
        lines.append(f"{name:<28} {m:>3}  {'-':<14} {'-':>9} "
                     f"{'-':>7} {'-':>8}  cannot run: {why}")
    timed = next((c for c in cands if c.retimed is not None), None)
    if timed is not None and timed.retimed is not None:
        # (``calibrated``: every row as the chosen one's re-time corrects it)
        by, rest = timed.retimed
        lines.append(f"(every row re-timed as the chosen schedule's re-time found the steps: "
                     f"compute x{by:.2f}, the executor's {timed.overhead * 1e3:.2f} ms an "
                     f"action, a message {max(timed.costs['send'], default=0.0) * 1e3:.2f} "
                     f"ms, then x{rest:.2f} to its prediction)")
    loads = sorted({c.load for c in cands if c.load})
    if loads:       # (the simulator's figures then hold others' processes: ``loaded``)
        lines.append("(simulated with others' processes on the shared cores: "
                     + ", ".join(f"{x:.2f}" for x in loads) + " pp ranks' worth, fitted to a "
                     "dry run)")
    return "\n".join(lines)
