"""Built-in pipeline schedules: pure functions of integers that emit data.

Each generator returns a compute-only ``Schedule`` (F, B, or I and W); the
sends and receives are added by ``engine.lower``. Every docstring draws the
table that ``render()`` prints for a small case with unit costs, and the
tests check the generator against that drawing exactly.
"""
from __future__ import annotations

import numbers

from .ir import B, F, I, W, Action, Schedule

__all__ = ["gpipe", "one_f_one_b", "interleaved_1f1b", "zero_bubble_h1", "zero_bubble_h2",
           "zb_v", "by_name", "is_name", "given_schedule"]


def _said(v: object) -> str:
    """``v`` as an error names it: its repr, or its type where that is long
    (a Schedule's repr lists every action)."""
    if isinstance(v, Schedule):
        return f"the Schedule {v.name!r}"
    text = repr(v)
    return text if len(text) <= 60 else f"a {type(v).__name__}"


def _check(p: int, m: int, **more: int) -> None:
    for name, v in {"p": p, "m": m, **more}.items():
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            # (True made 1f1b(True,4))
            raise TypeError(f"{name} must be a whole number, got {_said(v)}")
    if p < 1:
        raise ValueError(f"need at least one pipeline rank, got p={p}")
    if m < 1:
        raise ValueError(f"need at least one micro-batch, got m={m}")


def gpipe(p: int, m: int) -> Schedule:
    """GPipe: all forwards, then all backwards; stage r on rank r.

    Simple and memory hungry (every rank holds all m activations). ``gpipe(4, 4)``::

        0 | 0F0 0F1 0F2 0F3  .   .   .   .   .   .  0B0 0B1 0B2 0B3
        1 |  .  1F0 1F1 1F2 1F3  .   .   .   .  1B0 1B1 1B2 1B3  .
        2 |  .   .  2F0 2F1 2F2 2F3  .   .  2B0 2B1 2B2 2B3  .   .
        3 |  .   .   .  3F0 3F1 3F2 3F3 3B0 3B1 3B2 3B3  .   .   .
    """
    _check(p, m)
    ranks = [[Action(r, F, k) for k in range(m)] + [Action(r, B, k) for k in range(m)]
             for r in range(p)]
    return Schedule(tuple(map(tuple, ranks)), m, tuple(range(p)), f"gpipe({p},{m})")


def _one_f_one_b_order(p: int, m: int, r: int) -> list[tuple[str, int]]:
    """1F1B order of rank r: p-1-r warm-up forwards, then alternate, then drain."""
    warmup = min(p - 1 - r, m)
    order = [(F, k) for k in range(warmup)]
    for k in range(m - warmup):
        order += [(F, warmup + k), (B, k)]
    order += [(B, k) for k in range(m - warmup, m)]
    return order


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B (PipeDream-Flush): rank r runs p-1-r forwards, then one forward
    and one backward in turn, so it never holds more than p-r activations.

    Same bubble as GPipe, much less memory. ``one_f_one_b(4, 6)``::

        0 | 0F0 0F1 0F2 0F3  .   .   .  0B0 0F4 0B1 0F5 0B2  .  0B3  .  0B4  .  0B5
        1 |  .  1F0 1F1 1F2  .   .  1B0 1F3 1B1 1F4 1B2 1F5 1B3  .  1B4  .  1B5  .
        2 |  .   .  2F0 2F1  .  2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4  .  2B5  .   .
        3 |  .   .   .  3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5  .   .   .
    """
    _check(p, m)
    ranks = [tuple(Action(r, kind, k) for kind, k in _one_f_one_b_order(p, m, r))
             for r in range(p)]
    return Schedule(tuple(ranks), m, tuple(range(p)), f"1f1b({p},{m})")


def interleaved_1f1b(p: int, m: int, chunks: int) -> Schedule:
    """Interleaved 1F1B (Megatron-LM): ``chunks`` virtual stages per rank,
    stage s on rank s % p, which cuts the bubble by about ``chunks``.

    Micro-batches go through a rank's chunks in groups of p; warm-up is
    2(p-1-r) + (chunks-1)p forwards. Needs m % p == 0.
    ``interleaved_1f1b(2, 4, 2)`` (stages 0, 2 on rank 0; 1, 3 on rank 1)::

        0 | 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1  .  2B2  .  2B3 0B2 0B3
        1 |  .  1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3  .
    """
    _check(p, m, chunks=chunks)
    if chunks < 1:
        raise ValueError(f"need at least one chunk per rank, got chunks={chunks}")
    if m % p:
        raise ValueError(f"interleaved 1F1B needs m % p == 0, got m={m}, p={p}")
    total = m * chunks

    def stage(r: int, k: int, forward: bool) -> int:
        c = (k // p) % chunks
        return (c if forward else chunks - 1 - c) * p + r

    def mb(k: int) -> int:
        return (k // (p * chunks)) * p + k % p

    ranks = []
    for r in range(p):
        warmup = min(2 * (p - 1 - r) + (chunks - 1) * p, total)
        order = [Action(stage(r, k, True), F, mb(k)) for k in range(warmup)]
        for i in range(total - warmup):
            order += [Action(stage(r, warmup + i, True), F, mb(warmup + i)),
                      Action(stage(r, i, False), B, mb(i))]
        order += [Action(stage(r, k, False), B, mb(k)) for k in range(total - warmup, total)]
        ranks.append(tuple(order))
    stage_ranks = tuple(s % p for s in range(p * chunks))
    return Schedule(tuple(ranks), m, stage_ranks, f"interleaved_1f1b({p},{m},{chunks})")


def zero_bubble_h1(p: int, m: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023): backward split into I (input gradient, on the
    critical path) and W (weight gradient, deferred into what would be bubbles).

    The 1F1B order with B replaced by I; rank r defers its first r weight
    gradients and then runs one W after every I, so the later ranks return
    input gradients sooner and their deferred W's fill the drain. The F-to-W
    activation peak is p on every rank, 1F1B's peak on rank 0. Each rank idles
    (p-1)(F+I-W) against 1F1B's (p-1)(F+I+W): a third when F = I = W.
    ``zero_bubble_h1(4, 6)``::

        0 | 0F0 0F1 0F2 0F3  .   .   .  0I0 0W0 0F4 0I1 0W1 0F5 0I2 0W2 0I3 0W3 0I4 0W4 0I5 0W5
        1 |  .  1F0 1F1 1F2  .   .  1I0 1F3 1I1 1W0 1F4 1I2 1W1 1F5 1I3 1W2 1I4 1W3 1I5 1W4 1W5
        2 |  .   .  2F0 2F1  .  2I0 2F2 2I1 2F3 2I2 2W0 2F4 2I3 2W1 2F5 2I4 2W2 2I5 2W3 2W4 2W5
        3 |  .   .   .  3F0 3I0 3F1 3I1 3F2 3I2 3F3 3I3 3W0 3F4 3I4 3W1 3F5 3I5 3W2 3W3 3W4 3W5
    """
    _check(p, m)
    ranks = []
    for r in range(p):
        defer = r
        order: list[Action] = []
        w_next = 0
        i_done = 0
        for kind, k in _one_f_one_b_order(p, m, r):
            if kind == F:
                order.append(Action(r, F, k))
                continue
            order.append(Action(r, I, k))
            i_done += 1
            if i_done > defer:
                order.append(Action(r, W, w_next))
                w_next += 1
        order += [Action(r, W, k) for k in range(w_next, m)]
        ranks.append(tuple(order))
    return Schedule(tuple(ranks), m, tuple(range(p)), f"zero_bubble_h1({p},{m})")


def _unit_list_schedule(p: int, m: int, stage_ranks: tuple[int, ...], cap: int,
                        name: str) -> Schedule:
    """Orders found by running every rank at unit costs (F = I = W = 1, free
    messages): a rank that is free runs, in this order of preference, an
    input gradient that is ready (its latest stage first), a forward that is
    ready if it holds fewer than ``cap`` activations (forward to weight
    gradient; its latest stage first), a weight gradient (earliest stage
    first). Each stage runs its micro-batches in order."""
    n = len(stage_ranks)
    done: dict[tuple[str, int, int], int] = {}
    nxt = {kind: [0] * n for kind in (F, I, W)}
    live = [0] * p
    mine = [sorted((s for s in range(n) if stage_ranks[s] == r), reverse=True) for r in range(p)]
    orders: list[list[Action]] = [[] for _ in range(p)]
    t = 0

    def ready(key: tuple[str, int, int]) -> bool:
        return done.get(key, t + 1) <= t

    while len(done) < 3 * m * n:
        for r in range(p):
            pick = next(((I, s) for s in mine[r] if nxt[I][s] < m
                         and ready((F, s, nxt[I][s]))
                         and (s == n - 1 or ready((I, s + 1, nxt[I][s])))), None)
            if pick is None and live[r] < cap:
                pick = next(((F, s) for s in mine[r] if nxt[F][s] < m
                             and (s == 0 or ready((F, s - 1, nxt[F][s])))), None)
            if pick is None:
                pick = next(((W, s) for s in reversed(mine[r]) if nxt[W][s] < nxt[I][s]
                             and ready((I, s, nxt[W][s]))), None)
            if pick is None:
                continue
            kind, s = pick
            done[(kind, s, nxt[kind][s])] = t + 1
            orders[r].append(Action(s, kind, nxt[kind][s]))
            nxt[kind][s] += 1
            live[r] += {F: 1, I: 0, W: -1}[kind]
        t += 1
    return Schedule(tuple(map(tuple, orders)), m, stage_ranks, name)


def zero_bubble_h2(p: int, m: int) -> Schedule:
    """ZB-H2 (Qi et al. 2023): ZB-H1 with more warm-up forwards, so that each
    rank is busy from its first action to its last when F = I = W: the step
    is a parallelogram, and a next step that starts on each rank as soon as
    that rank is done (no flush) has no bubble. Costs up to 2p-1 activations
    per rank (1F1B: p). Found by ``_unit_list_schedule`` with cap 2p-1.
    ``zero_bubble_h2(4, 6)``::

        0 | 0F0 0F1 0F2 0F3 0F4 0F5  .  0I0 0W0 0I1 0W1 0I2 0W2 0I3 0W3 0I4 0W4 0I5 0W5  .   .
        1 |  .  1F0 1F1 1F2 1F3 1F4 1I0 1F5 1I1 1W0 1I2 1W1 1I3 1W2 1I4 1W3 1I5 1W4 1W5  .   .
        2 |  .   .  2F0 2F1 2F2 2I0 2F3 2I1 2F4 2I2 2F5 2I3 2W0 2I4 2W1 2I5 2W2 2W3 2W4 2W5  .
        3 |  .   .   .  3F0 3I0 3F1 3I1 3F2 3I2 3F3 3I3 3F4 3I4 3F5 3I5 3W0 3W1 3W2 3W3 3W4 3W5
    """
    _check(p, m)
    return _unit_list_schedule(p, m, tuple(range(p)), 2 * p - 1, f"zero_bubble_h2({p},{m})")


def zb_v(p: int, m: int) -> Schedule:
    """ZB-V (Qi et al. 2024): 2p stages placed in a V, rank r holding stages
    r and 2p-1-r, so the forward runs down the ranks and back up and rank 0
    holds the first and the last stage; with the backward split into I and W
    each rank is busy almost all its span when F = I = W, at 1F1B's
    activation memory (2p stages of half the size: at most 2p live per
    rank). Found by ``_unit_list_schedule`` with cap 2p. ``zb_v(2, 3)``::

        0 | 0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 0I0 0W0 0I1 0W1 3W1 3F2 3I2 3W2  .  0I2 0W2
        1 |  .  1F0 2F0 1F1 2F1 2I0 1I0 1W0 2I1 1I1 1F2 1W1 2F2 2W0 2W1 2I2 1I2 1W2 2W2
    """
    _check(p, m)
    stage_ranks = tuple(s if s < p else 2 * p - 1 - s for s in range(2 * p))
    return _unit_list_schedule(p, m, stage_ranks, 2 * p, f"zb_v({p},{m})")


_NAMES = "gpipe, 1f1b, interleaved, zb-h1, zb-h2 or zb-v"
# each name by_name takes (lower case, without "-" and "_"): the generator it means
_KEYS = {"gpipe": "gpipe", "1f1b": "1f1b", "onefoneb": "1f1b", "interleaved": "interleaved",
         "interleaved1f1b": "interleaved", "zbh1": "zb-h1", "zerobubble": "zb-h1",
         "zerobubbleh1": "zb-h1", "zb": "zb-h1", "zbh2": "zb-h2", "zerobubbleh2": "zb-h2",
         "zbv": "zb-v", "zerobubblev": "zb-v"}


def is_name(name: object) -> bool:
    """Whether ``name`` names a built-in schedule (by_name's)."""
    return isinstance(name, str) and name.lower().replace("_", "").replace("-", "") in _KEYS


def given_schedule(obj: object, where: str) -> Schedule:
    """``obj``, where a Schedule is what ``where`` (a Pipeline, stages_for_rank,
    partition's ``schedule=``) takes; anything else raises a TypeError saying
    what it takes. A name was read as one ("'str' object has no attribute
    'num_ranks'"): names are engine.distribute's, which makes the schedule."""
    if isinstance(obj, Schedule):
        return obj
    if isinstance(obj, str):
        how = (f": a name is engine.distribute's schedule= alone; make the Schedule, "
               f"engine.schedules.by_name({obj!r}, p, m)" if is_name(obj) else
               ": a schedule saved as JSON is read by engine.Schedule.from_json(text)"
               if obj.lstrip().startswith("{") else "")
        return _refuse(where, f"the str {obj!r}" if len(obj) <= 40 else "a str", how)
    if callable(obj) and getattr(obj, "__module__", "") == __name__:
        name = getattr(obj, "__name__", "")
        return _refuse(where, f"the function {name}", f": call it, {name}(p, m)")
    return _refuse(where, _said(obj), "")


def _refuse(where: str, what: str, how: str) -> Schedule:
    raise TypeError(f"{where}: the schedule is an engine.Schedule (engine.schedules."
                    f"one_f_one_b(p, m), engine.Schedule.build(ranks, ...)), not {what}{how}")


def by_name(name: str, p: int, m: int, chunks: int = 2) -> Schedule:
    """Look a generator up by a short name: gpipe, 1f1b, interleaved, zb-h1,
    zb-h2, zb-v."""
    if not isinstance(name, str):       # (None, a generator not called: 'no attribute lower')
        raise TypeError(f"a schedule name is a str ({_NAMES}), not {_said(name)}")
    kind = _KEYS.get(name.lower().replace("_", "").replace("-", ""))
    if kind == "gpipe":
        return gpipe(p, m)
    if kind == "1f1b":
        return one_f_one_b(p, m)
    if kind == "interleaved":
        return interleaved_1f1b(p, m, chunks)
    if kind == "zb-h1":
        return zero_bubble_h1(p, m)
    if kind == "zb-h2":
        return zero_bubble_h2(p, m)
    if kind == "zb-v":
        return zb_v(p, m)
    raise ValueError(f"unknown schedule {name!r}: use {_NAMES}")
