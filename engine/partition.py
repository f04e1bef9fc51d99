"""Cut an unmodified model into pipeline stages: the partition is data.

::

    stages = engine.partition(model, 4, balance="time", sample=x[:8], schedule=sched)
    pipe = engine.Pipeline(grid, engine.stages_for_rank(stages, sched, pp_rank), sched, ...)

``model`` is a torch ``nn.Sequential`` (or ``nn.ModuleList``), another
torch module (its forward traced into layers: ``engine.sequential``), an
``engine.layers.Sequential``, or a list whose items are layers: torch
modules, engine.layers layers, plain functions of one tensor (made torch
modules), or specs, constructors of a layer (a class, a zero-argument
callable, a ``functools.partial``, a ``(cls, args, kwargs)`` tuple). Specs
are built only for the stages in ``stages=`` (the others come back as
None), so a rank builds only what it holds: ``stages=sched.stages_of(r)``.

A stage is an ``nn.Sequential`` of the model's own modules (the Pipeline
wraps it in a TorchStage) or an ``engine.layers.Sequential``. Where the
traced pieces hold what the sample's shapes decided, the Pipeline traces
the model again at a step's other shapes (engine.traced.Reshaped).
``balance``:

* ``"uniform"``: layer counts as equal as possible (stage s starts at
  layer ``s * n // num_stages``, as engine.layers.mlp_stages cuts);
* ``"parameters"``: the contiguous cut whose largest stage has the fewest
  parameters (a DP over the cut points); specs are built on torch's meta
  device to be counted (no memory), numpy specs for real, one at a time;
* ``"time"``: each layer's forward, input-gradient and weight-gradient
  times are measured on ``sample`` (the layers run in sequence on it, so
  each gets its real input), and the cut is the one whose simulated step
  of ``schedule`` (engine.simulate with per-stage costs; default 1F1B over
  ``2 * num_stages`` micro-batches) is shortest: every cut when there are
  few, else the better of the DP cut minimising the largest stage's time
  and the uniform cut, improved by moving one or two cut points by a layer
  while the simulated step shrinks. Timings differ between processes, so
  pass ``group=`` (every rank of it calls partition): its first rank
  measures (specs built one at a time) and broadcasts the costs, and every
  rank cuts alike;
* ``"type:REGEX"`` (DeepSpeed's ``partition_method``): the layers whose
  class matches (``re.search``, case ignored: ``"type:block"``; a traced
  piece by the modules it calls) spread as evenly as they can be, the
  others weighing nothing (engine.costs.by_type);
* a list of whole layer counts, one per stage (anything else raises, naming it).

A parameter shared by layers of two stages (same object: an embedding and
an output head) is untied into one copy per later stage and marked on the
stages (``stage.tied``); the Pipeline keeps the copies equal (engine.tied).
So is a module that layers of two stages share (ALBERT's one block called
by every layer: the same module several times in an ``nn.Sequential``):
each later stage gets a copy of it, whose parameters are tied to the first
stage's (an engine.layers layer in two stages is refused, naming both).
Specs build separate objects, so ties between spec layers cannot be seen:
name them, ``tied=[("0.weight", "9.weight")]`` (layer index and parameter
name; for engine.layers, the parameter's position in ``params()``), and
the Pipeline gives every copy the first stage's value.
"""
from __future__ import annotations

import itertools
import numbers
from typing import Any, Sequence

from mesh import Comm

from .choose import whole_counts
from .costs import by_type
from .ir import Schedule
from .partition_cuts import (_KINDS, _best_simulated, _measured, _stage_costs, cut_points,
                             uniform_counts)
from .schedules import _said, given_schedule, one_f_one_b
from .stagebuild import (build, inputs_of, is_module, kind_of, layer_classes, layer_names,
                         layers_of, make_stage, model_key, named_stage_parameters, param_count,
                         stage_params, torch_module)
from .stagebuild_ties import declared_tie, unshare, untie
from .tensor_parallel import own_records
from .tied import Tie
from .traced import TracedAt, few, mark, sequential, traceable

__all__ = ["partition", "Partition", "cut_points"]


class Partition(list):
    """The stages (None where not built), and how they were cut: ``counts``
    (layers per stage), ``labels`` (a name per layer) and ``params`` (its
    parameter count, None for a spec not counted) and, for
    ``balance="time"``, ``layer_costs`` (seconds per layer for F, I, W);
    ``stage_costs()`` sums them per stage, in the form ``engine.simulate``
    takes. ``print(parts)`` shows the cut: each stage's layers, parameters
    and measured costs, and the ties. ``names``: each layer's name in the
    model (``"0"``, ``"head"``; ``""`` for a traced forward's pieces, whose
    parameters keep the model's keys); ``named_parameters(s)``: stage s's
    parameters, each with its name in the model (a stage is an
    ``nn.Sequential`` numbered from 0: stage 1's ``0.0.weight`` may be the
    model's ``2.0.weight``), as ``Job.named_parameters()`` names them."""

    def __init__(self, stages: Sequence[Any], counts: Sequence[int],
                 layer_costs: dict[str, list[float]] | None, ties: Sequence[Tie],
                 labels: Sequence[str] = (), params: Sequence[int | None] = (),
                 names: Sequence[str] = ()) -> None:
        super().__init__(stages)
        self.counts = tuple(counts)
        self.layer_costs = layer_costs
        self.ties = tuple(ties)
        self.labels = tuple(labels)
        self.params = tuple(params)
        self.names = tuple(names) or tuple(str(i) for i in range(sum(self.counts)))

    def named_parameters(self, s: int) -> list[tuple[str, Any]]:
        """Stage ``s``'s parameters, in its order, each with its name in the
        whole model (engine.stagebuild.named_stage_parameters; an
        engine.layers layer's: ``"layer.index"``). A stage not built here
        (``stages=``) raises."""
        if self[s] is None:
            raise ValueError(f"stage {s} was not built here (stages= left it out)")
        first = sum(self.counts[:s])
        return named_stage_parameters(self[s], self.names[first:first + self.counts[s]])

    def stage_costs(self) -> dict[str, list[float]] | None:
        if self.layer_costs is None:
            return None
        return _stage_costs(self.layer_costs, self.counts)

    def __str__(self) -> str:
        n = sum(self.counts)
        lines = [f"{len(self.counts)} stages of {n} layers"]
        costs = self.stage_costs()
        first = 0
        for s, c in enumerate(self.counts):
            span = range(first, first + c)
            first += c
            sizes = [self.params[i] for i in span] if self.params else []
            count = ("" if not sizes or None in sizes
                     else f"  {sum(int(x) for x in sizes if x is not None):,} parameters")
            timed = ("" if costs is None else "  F/I/W " + "/".join(
                f"{costs[k][s] * 1e3:.2f}" for k in _KINDS) + " ms")
            names = ", ".join(self.labels[i] for i in span) if self.labels else ""
            lines.append(f"  stage {s}: layer{'s' if c > 1 else ''} {span[0]}"
                         f"{f'-{span[-1]}' if c > 1 else ''}{count}{timed}"
                         f"{'  ' + names if names else ''}")
        for tie in self.ties:
            lines.append(f"  tied: {tie.name} on stages "
                         f"{', '.join(map(str, tie.stages))} (kept equal)")
        return "\n".join(lines)


def _label(x: Any, kind: str, given: str = "") -> str:
    """A layer's name for ``print(partition)``: what a traced piece calls
    (``transformer.h.0``), its name in the model where that is a name
    (``nn.Sequential(OrderedDict(embed=..., head=...))``: ``head``), else
    its class's (or a function's) name, a torch container's with its
    children's classes (``Sequential(Linear, GELU)``: nested blocks were
    all ``Sequential``)."""
    if kind == "spec":                              # the class it builds
        return f"{layer_classes(x, kind)[0]}()"
    name = type(x).__name__
    if "[" in name and name.endswith("]"):         # engine.sequential's pieces
        return name[name.index("[") + 1:-1]
    if given and not given.isdigit():
        return given
    if kind == "fn":
        return getattr(x, "__name__", name)
    torch = torch_module()
    if torch is not None and isinstance(x, (torch.nn.Sequential, torch.nn.ModuleList)):
        inner = [type(m).__name__ for m in x if m is not None]
        return f"{name}({', '.join(inner[:4])}{', ...' if len(inner) > 4 else ''})"
    return name


def partition(model: Any, num_stages: int, balance: str | Sequence[int] = "uniform",
              sample: Any = None, *, schedule: Schedule | None = None,
              stages: Sequence[int] | None = None, group: Any = None,
              tied: Sequence[Sequence[str]] = (), reps: int = 3,
              names: Sequence[str] | None = None) -> Partition:
    """Cut ``model`` into ``num_stages`` stages (see the module docstring).
    ``names``: each layer's name in the model, where ``model`` is a list of
    its layers (engine.distribute's); by default the model's own
    (engine.stagebuild.layer_names)."""
    try:
        return _partition(model, num_stages, balance, sample, schedule=schedule, stages=stages,
                          group=group, tied=tied, reps=reps, names=names)
    except (ValueError, TypeError) as e:
        _said_by_rank(e, group)
        raise


def _said_by_rank(e: BaseException, group: Any) -> None:
    """Start ``e``, a ValueError or TypeError out of engine.partition, with
    the rank and the call, as every other error does (where a mesh runs:
    each rank cuts its model alone, and what went wrong named neither)."""
    if type(e) not in (ValueError, TypeError) or len(e.args) != 1 \
            or not isinstance(e.args[0], str) or e.args[0].startswith("rank "):
        return
    if isinstance(group, Comm):
        who = f"rank {group.ranks[group.rank]}: "
    else:
        from mesh.world import rank_said
        who = rank_said()
    call = "" if e.args[0].startswith("engine.") else "engine.partition: "
    e.args = (f"{who}{call}{e.args[0]}",)


def _stage_count(num_stages: Any, schedule: Any) -> None:
    """Refuse a ``num_stages`` that is no whole number (a Schedule given in its
    place: "'<' not supported between instances of 'Schedule' and 'int'"), a
    ``schedule=`` that is no Schedule (a name: "'str' object has no attribute
    'num_stages'"), and one of another stage count (a cut it was not made for)."""
    if isinstance(num_stages, bool) or not isinstance(num_stages, numbers.Integral):
        raise TypeError(f"num_stages={_said(num_stages)}: a whole number of stages"
                        + (f" (pass sched.num_stages, {num_stages.num_stages} for "
                           f"{num_stages.name!r}; the schedule itself goes in schedule=)"
                           if isinstance(num_stages, Schedule) else ""))
    if schedule is not None:
        given_schedule(schedule, "engine.partition(schedule=...)")
        if schedule.num_stages != num_stages:
            raise ValueError(f"schedule {schedule.name!r} has {schedule.num_stages} stages, "
                             f"not {num_stages}")


def _partition(model: Any, num_stages: int, balance: str | Sequence[int], sample: Any, *,
               schedule: Schedule | None, stages: Sequence[int] | None, group: Any,
               tied: Sequence[Sequence[str]], reps: int,
               names: Sequence[str] | None) -> Partition:
    _stage_count(num_stages, schedule)
    # a plain module: its forward's pieces, and what the forward returns around
    # the last one's output (a dict, a dataclass...), which the last stage
    # carries for the Pipeline's loss_fn (engine.traced.given_as_returned)
    # (with the sample: a forward that reads its inputs' lengths, an ``if`` on one, traced
    # as the sample's shapes decide it, its stages running at those shapes)
    traced = (sequential(model, inputs=inputs_of(sample), sample=sample) if traceable(model)
              else model)
    returned = getattr(traced, "returned", None)
    items = layers_of(traced, inputs_of(sample))
    n = len(items)
    names = list(layer_names(model, n) if names is None else names)
    if len(names) != n:
        raise ValueError(f"names= gives {len(names)} names for {n} layers")
    if num_stages < 1 or num_stages > n:
        source = type(model).__name__ if traceable(model) else None
        raise ValueError(f"cannot cut {n} layers{few(source, n)} into {num_stages} stages: "
                         "each stage needs at least one layer")
    kinds = [kind_of(i, x) for i, x in enumerate(items)]
    layer_costs = None
    sizes: list[int | None] = [None if k == "spec" else param_count(x, k)
                               for x, k in zip(items, kinds)]
    if balance == "uniform":
        counts = uniform_counts(n, num_stages)
    elif balance == "parameters":
        counted = [param_count(x, k) if c is None else c             # specs counted too
                   for c, x, k in zip(sizes, items, kinds)]
        counts = cut_points([(p, 1) for p in counted], num_stages)
        sizes = list(counted)
    elif balance == "time":
        if sample is None and group is None:    # (with a group, its first rank's: _measured)
            raise ValueError(f"balance='time' measures each of the {n} layers on a sample "
                             "micro-batch: pass sample=")
        sched = schedule or one_f_one_b(num_stages, 2 * num_stages)
        layer_costs = _measured(items, kinds, sample, reps, group)
        counts = _best_simulated(layer_costs, sched)
    elif isinstance(balance, str) and balance.startswith("type:"):
        counts = list(by_type(balance, [layer_classes(x, k) for x, k in zip(items, kinds)]
                              ).counts(num_stages))
    elif isinstance(balance, str):
        raise ValueError(f"unknown balance {balance!r}: use 'uniform', 'parameters', 'time', "
                         "'type:REGEX' or a list of layer counts")
    else:
        counts = whole_counts(balance)
        if len(counts) != num_stages or sum(counts) != n or min(counts) < 1:
            raise ValueError(f"balance {counts} must give {num_stages} stages of at least one "
                             f"layer each, {n} layers in all (it gives {len(counts)} stages, "
                             f"{sum(counts)} layers)")
    wanted = set(range(num_stages) if stages is None else stages)
    built: list[Any] = []
    present: list[Any] = []       # what each stage holds already, built here or not
    start = 0
    for s, c in enumerate(counts):
        if s in wanted:
            built.append([build(items[i], kinds[i]) for i in range(start, start + c)])
        else:
            built.append(None)
        present.append(built[-1] or [items[i] for i in range(start, start + c)
                                     if kinds[i] != "spec"])
        start += c
    unshare(present, counts)
    ties = untie(built, counts, present)
    for pair in tied:       # (not ``names``: the layers' names, which Partition keeps)
        ties.update(declared_tie(built, counts, [str(x) for x in pair], ties))
    # each tie by its parameter's name in the model (``tok_emb.weight``), as
    # job.named_parameters() and state_dict() name it: "layer.parameter" gave a traced
    # piece's index ("0.tok_emb.weight"), a named child's too ("0.weight" for "embed.weight")
    ties = {Tie(model_key(names, t.name), t.stages): m for t, m in ties.items()}
    out: list[Any] = [None if ls is None else make_stage(ls, s) for s, ls in enumerate(built)]
    for stage in out:       # a shared module's copy: its tp sums over its own parameters
        if stage is not None and is_module(stage):
            own_records(stage)
    for s, stage in enumerate(out):
        if stage is not None:       # the Pipeline checks that every pp rank cut alike
            stage.partition_cut = tuple(counts)
            stage.partition_stage = s       # (and that each is given for its own stage)
    if returned is not None and out[-1] is not None:
        out[-1].returned = returned
    if getattr(traced, "shaped", False):
        # its pieces hold what the sample's shapes decided: a Pipeline of these stages traces
        # the model again at a step's other shapes (engine.traced.Reshaped) by these marks
        starts = list(itertools.accumulate(counts, initial=0))
        for s, stage in enumerate(out):
            if stage is not None:
                mark(stage, TracedAt(model, traced, inputs_of(sample), sample,
                                     range(starts[s], starts[s + 1])))
    for tie, members in ties.items():
        for s, p in members:
            index = next(i for i, q in enumerate(stage_params(out[s])) if q is p)
            out[s].tied = getattr(out[s], "tied", ()) + ((tie, index),)
    return Partition(out, counts, layer_costs, list(ties),
                     [_label(x, k, g) for x, k, g in zip(items, kinds, names)], sizes, names)
