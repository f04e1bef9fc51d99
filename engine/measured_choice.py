"""``engine.distribute``'s choice of schedule on the measured costs: the
leading candidate costed again by a dry run of its own schedule (the
executor's costs, the load that dry run fits: ``fitted_load``) until the
leader is one so costed, and the stand-in gradients and messages of a cut.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from mesh import Grid

from .calibrate import Calibration, DryRun, dry_run
from .choose import Candidate, LayerCost, Span, as_run, best_first, loaded, recosted, stage_costs
from .ir import Schedule
from .stagebuild import is_module


def _stretch(cpu: dict[str, list[float]], wall: dict[str, list[float]],
             floor: float = 1.0) -> list[float]:
    """Per stage, the wall its compute actions took in the busy dry run
    (``wall``: engine.calibrate.DryRun.compute) over the CPU they burnt
    there (``cpu``: their re-timed thread CPU, which ``_Spin`` burns), at
    least ``floor``: the share of a core the schedule's actions get as its
    steps run them (the mesh threads' reading of messages, others' load; a
    rank that waits for messages is woken ahead of a process that computes
    without pause, so a stage timed back to back on a loaded host takes a
    smaller share than the steps get, and one timed on a quiet host none of
    the mesh threads'). Where the ranks outnumber the cores, ``cpu`` is
    instead what the simulator's sharing of the cores makes of that CPU
    (``_shared_walls``), and the stretch what the sharing leaves out
    (``floor`` 0: it can be under 1 too)."""
    out = []
    for s in range(len(cpu["F"])):
        c = sum(cpu[k][s] for k in cpu if wall.get(k) and wall[k][s] > 0)
        w = sum(wall[k][s] for k in cpu if wall.get(k) and wall[k][s] > 0)
        out.append(max(floor, w / c) if c > 0 else 1.0)
    return out


def _shared_walls(sched: Schedule, spin: dict[str, list[float]], cal: Calibration
                  ) -> dict[str, list[float]]:
    """Per kind and stage, the mean wall of a compute action of the dry run
    as the simulator predicts it with the ranks sharing ``cal.cores`` (and
    others' processes, ``cal.load``)
    (``spin``: each action's CPU; the executor's own time per action, its
    messages and receives as the dry run measured them), without the
    executor's own time: what ``_stretch`` compares the dry run's with."""
    n = sched.num_stages
    costs = {**spin, "send": [cal.message] * n, "recv": [cal.receive] * n,
             "fixed": [cal.action] * n}
    sums: dict[tuple[str, int], list[float]] = {}
    for e in sched.simulate(costs, cal.cores, cal.load).events:
        if e.action.kind in ("F", "B", "I", "W"):
            sums.setdefault((e.action.kind, e.action.stage), []).append(
                e.end - e.start - cal.action)
    return {k: [sum(v) / len(v) if (v := sums.get((k, s))) else 0.0 for s in range(n)]
            for k in ("F", "B", "I", "W")}


# The dry run's compute walls over the simulator's, past which the rest is
# taken for others' processes on the cores (fitted_load)
_LOADED = 1.1


def fitted_load(sched: Schedule, spin: dict[str, list[float]], cal: Calibration,
                cores: float, wall: dict[str, list[float]]) -> float:
    """Others' processes on the host's cores, in pp ranks' worth
    (engine.simulate's ``load``), that make the simulator's compute walls
    of the dry run of ``sched`` (its actions' CPU ``spin``, the ranks
    sharing ``cores`` pp ranks' worth, ``cal``'s executor costs) as long,
    summed over the stages and kinds it ran, as the dry run's (``wall``:
    DryRun.compute): what the share of the cores the dry run got says of
    the others, with the steps' own pattern of waits (a rank that waited
    for a message is woken ahead of processes that compute without
    pause). 0 where the dry run is within 10% of the simulator without
    any: a quiet machine predicts as before."""
    pairs = [(k, s) for k in ("F", "B", "I", "W") for s in range(sched.num_stages)
             if wall.get(k) and wall[k][s] > 0 and spin[k][s] > 0]
    measured = sum(wall[k][s] for k, s in pairs)

    def simulated(load: float) -> float:
        walls = _shared_walls(sched, spin, replace(cal, cores=cores, load=load))
        return sum(walls[k][s] for k, s in pairs)

    if not pairs or measured <= _LOADED * simulated(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while simulated(hi) < measured and hi < 1024:
        lo, hi = hi, 2 * hi
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if simulated(mid) < measured else (lo, mid)
    return hi


def _stretched(lc: LayerCost, by: float) -> LayerCost:
    return replace(lc, F=lc.F * by, B=lc.B * by, I=lc.I * by, W=lc.W * by)


def _grad_bytes(layer: Any) -> list[int]:
    """The bytes of each gradient of a layer's parameters (its shards',
    where tensor-parallel), in the order its stage lists them."""
    if is_module(layer):
        return [p.numel() * p.element_size() for p in layer.parameters() if p.requires_grad]
    params = getattr(layer, "params", None)
    return [int(a.nbytes) for a in params()] if callable(params) else []


def _stage_grads(grads: list[list[int]], counts: tuple[int, ...], stages: Any
                 ) -> dict[int, list[int]]:
    """Per stage in ``stages`` of a cut (``counts`` layers a stage), the
    bytes of each of its layers' gradients (``grads``, per layer), for a
    dry run's stand-ins: with a dp axis the step's end averages them."""
    bounds = [sum(counts[:s]) for s in range(len(counts))]
    return {s: [n for layer in grads[bounds[s]:bounds[s] + counts[s]] for n in layer]
            for s in stages}


def _stage_messages(row: dict[int, LayerCost], counts: tuple[int, ...]) -> list[tuple[int, int]]:
    """Per stage of a cut, the bytes it sends forward (its output) and
    backward (its input's gradient), from a profile row."""
    bounds = [sum(counts[:s]) for s in range(len(counts))]
    out = [row[b + c - 1].act_bytes for b, c in zip(bounds, counts)]
    return [(o, out[s - 1] if s else 0) for s, o in enumerate(out)]


def _measured_choice(grid: Grid, cands: list[Candidate], profile: dict[int, dict[int, LayerCost]],
                     whole: dict[int, dict[Span, LayerCost]], rows: int,
                     crowded: bool, tag_base: int, timeout: float | None, tries: int = 4,
                     tensors: bool = False,
                     grads: list[list[int]] | None = None) -> list[Candidate]:
    """``cands`` ranked again, the leader costed with the executor's costs
    measured on a busy dry run of its own schedule (engine.calibrate's
    ``dry_run``: its stages' profiled times, its messages' sizes) until the
    leader is one so costed, or ``tries`` dry runs are spent: the
    candidates' figures come from a no-op 1F1B dry run at their micro-batch
    count, which a zero-bubble schedule with its split backward and two
    micro-batches pays several times over (175-400 us per action against
    30-150, quiet), so a leader whose own run costs more drops behind the
    next, which is then measured in turn; when the tries are spent first,
    the best of the measured leads. Every rank gets the same dry-run
    figures, so all rank alike. ``tensors``: a torch job's (its dry runs'
    messages torch tensors); ``grads``, with a dp axis: each layer's
    gradients' bytes, which the leader's dry run averages over dp as its
    steps will (the step's end in its figures). Where the ranks share the
    cores (the candidates' ``cores``), each leader's dry run also fits
    others' processes on them (``fitted_load``, as ``Job.retime`` does on
    the chosen one's), and every candidate is ranked ``loaded`` with the
    latest such load."""
    for _ in range(tries):
        lead = cands[0]
        if lead.measured or not lead.fits:
            break
        size = -(-rows // lead.schedule.num_microbatches)
        row, w = profile[size], whole.get(size)
        run_row, run_whole = as_run(row, w, lead.recompute, lead.counts)
        spin = stage_costs(run_row, lead.counts, whole=run_whole)
        stand_ins = None if grads is None else _stage_grads(
            grads, lead.counts, lead.schedule.stages_of(grid.coord("pp")))
        ranked: list[list[Candidate]] = []

        def rank(d: DryRun) -> None:        # (called within this try's dry run)
            # where the ranks share the cores: others' processes on them too, fitted to
            # this dry run as Job.retime fits them to its own (none within 10%), and
            # every candidate simulated with them: a loaded host ranks them otherwise;
            # the mesh threads' CPU is then in the load (they ran in the dry run), not
            # charged to the actions besides (``loaded``)
            load, helper = lead.load, d.helper if crowded else 0.0
            if lead.cores is not None:
                load = fitted_load(lead.schedule, {k: spin[k] for k in "FBIW"},
                                   Calibration(d.action, d.message, receive=d.receive),
                                   lead.cores, d.compute or {})
                helper = 0.0
            ranked.append(best_first([recosted(replace(lead, load=load), row, 1.0, w, d.action,
                                               d.message, helper, d.receive)]
                                     + [loaded(c, load) for c in cands[1:]]))
        # (the ranking in the dry run's last word: its error, a KeyboardInterrupt, is told
        # there, and every rank raises at once; after it, the ranks' next call depends on it)
        dry_run(grid.comm, grid.group("pp"), lead.schedule, _stage_messages(row, lead.counts),
                steps=3, tag_base=tag_base, timeout=timeout,
                costs={k: spin[k] for k in "FBIW"}, tensors=tensors,
                grid=None if grads is None else grid, grads=stand_ins, then=rank)
        cands = ranked[0]
    if cands[0].measured or not any(c.measured for c in cands):
        return cands
    # the tries spent: the best of those measured leads (the others' figures are a lower bound)
    return [c for c in cands if c.measured] + [c for c in cands if not c.measured]
