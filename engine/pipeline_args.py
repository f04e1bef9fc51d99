"""What a Pipeline is given, checked: batches, stage objects, arguments.

The batch side: ``rows_of`` and ``split_microbatches`` cut a batch (an
array, a tensor or a tuple of them) into micro-batches along axis 0,
``_paired`` says whether targets pair with the inputs row for row, and
``_joined`` puts the micro-batches' outputs back together. The stage side:
``stages_for_rank`` picks a rank's stage objects out of the whole model's,
``_as_stage`` wraps a torch module (recomputing or not, ``_recomputing``
and ``_checkpointed`` reading ``recompute=``). ``_given_alike`` checks, in
one all_gather on the pp group, that every rank was given the same
schedule, tag_base and partition cut, so that all raise alike
(``_retold``). engine.executor's Pipeline calls them; nothing here runs a
step.
"""
from __future__ import annotations

import hashlib
import numbers
import sys
from typing import Any, Collection, Iterable, Sequence

import numpy as np

import collectives
from mesh import Comm, MeshError

from .ir import Schedule
from .layers import Recompute, deterministic
from .schedules import given_schedule
from .torch_stage import TorchStage, checkpoint_modules
from .tp_plan import named_by
from .tp_comm import _gather

__all__ = ["rows_of", "split_microbatches", "stages_for_rank"]


def rows_of(batch: Any) -> int:
    """The rows of a batch; of a tuple (a model of several inputs), those
    every part has (else ValueError). A dict raises a TypeError saying what
    a batch is (its len() was taken for its rows: distribute's sample=
    {"x": x, "mask": m} then failed in its layers' timing on "unhashable
    type: 'slice'")."""
    _no_dict(batch)
    if not isinstance(batch, tuple):
        return len(batch)
    rows = {len(part) for part in batch}
    if len(rows) != 1:
        raise ValueError(f"the parts of a tuple batch have {sorted(rows)} rows: "
                         "each part is cut into the same micro-batches")
    return rows.pop()


_PAIRED = ("each of the {m} micro-batches of the targets holds those of the inputs' "
           "micro-batch: as many rows, or c times as many (per-token targets, flattened)")


class _Rows:
    """A batch of several inputs (a tuple: ``(input_ids, attention_mask)``)
    as one: its length is its rows, a slice of it the tuple of its parts'
    slices (what the first stage takes)."""

    def __init__(self, parts: tuple[Any, ...]) -> None:
        self.rows = rows_of(parts)
        self.parts = parts

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, rows: slice) -> tuple[Any, ...]:
        return tuple(p[rows] for p in self.parts)


def _paired(inputs: int, targets: int, m: int) -> bool:
    """Whether ``targets`` rows cut into ``m`` micro-batches pair with
    ``inputs`` rows so cut: as many, or c times as many in every
    micro-batch (a language model's targets flattened over its tokens
    beside inputs of (batch, tokens)). Fewer rows, or a multiple whose
    cuts fall elsewhere, pair micro-batch k's outputs with other rows'
    targets, silently where the loss broadcasts."""
    if targets == inputs:
        return True
    if inputs <= 0 or targets % inputs:
        return False
    c = targets // inputs
    return all(k * targets // m == c * (k * inputs // m) for k in range(m + 1))


def _no_dict(batch: Any) -> None:
    """Raise where ``batch`` is a dict (keyword inputs), saying what a batch is."""
    if isinstance(batch, dict):
        raise TypeError(f"a batch is an array, a tensor or a tuple of them (a model of "
                        f"several inputs takes them as a tuple, in its forward's order), not "
                        f"a dict ({', '.join(map(str, list(batch)[:4]))})")


def split_microbatches(batch: Any, m: int) -> list[Any]:
    """``m`` slices of ``batch`` along axis 0, sizes differing by at most
    one; of a tuple (a model of several inputs), tuples of its parts' slices."""
    if isinstance(batch, tuple):
        rows_of(batch)
        return list(zip(*(split_microbatches(part, m) for part in batch)))
    _no_dict(batch)                 # (sliced as a dict: "unhashable type: 'slice'")
    n = len(batch)
    if n < m:
        raise ValueError(f"a batch of {n} rows cannot be cut into {m} micro-batches: give "
                         f"each step at least {m} rows (a dp replica's own batch), or the "
                         "job fewer micro-batches (distribute's microbatches=, or a "
                         "schedule of fewer)")
    bounds = [k * n // m for k in range(m + 1)]
    return [batch[bounds[k]:bounds[k + 1]] for k in range(m)]


def _in_place(given: Sequence[Any], mine: Sequence[int], rank: int, schedule: Schedule) -> None:
    """Refuse engine.partition's stages given for other stages of the
    schedule than their own (each carries its index): a stage on two ranks,
    or a V's stages picked as ``parts[rank]``, ran a stage's layers where
    another's belong, failing in a layer on a shape, or not at all where
    the widths agree. A cut into another count is _given_alike's to name."""
    wrong = [(s, o.partition_stage) for s, o in zip(mine, given)
             if len(getattr(o, "partition_cut", ())) == schedule.num_stages
             and getattr(o, "partition_stage", s) != s]
    if wrong:
        raise ValueError(
            f"pp rank {rank} holds stages {list(mine)} of {schedule.name!r} but was given "
            + ", ".join(f"engine.partition's stage {got} for stage {s}" for s, got in wrong)
            + ": pass engine.stages_for_rank(parts, schedule, grid.coord('pp')), this rank's "
              "stages in stage order")


def _recomputing(recompute: bool | Collection[int], num_stages: int) -> frozenset[int]:
    """The stages that recompute, out of ``Pipeline``'s ``recompute``: all
    of them, none, or the stage indices given (each checked)."""
    if isinstance(recompute, bool):
        return frozenset(range(num_stages)) if recompute else frozenset()
    if isinstance(recompute, (str, bytes)) or not isinstance(recompute, Iterable):
        raise TypeError(f"recompute= takes True, False, a collection of stage indices or "
                        f"submodule name patterns, not {type(recompute).__name__}")
    chosen = frozenset(recompute)
    wrong = sorted((s for s in chosen
                    if isinstance(s, bool) or not isinstance(s, int)
                    or not 0 <= s < num_stages), key=repr)
    if wrong:
        raise ValueError(f"recompute={sorted(chosen, key=repr)!r}: {wrong!r} are not stage "
                         f"indices of a {num_stages}-stage schedule (0..{num_stages - 1})")
    return chosen


def _given_alike(pp: Comm, schedule: Schedule, tag_base: int, given: Sequence[Any],
                 mine: Sequence[int], timeout: float | None,
                 fault: BaseException | None = None,
                 edges: dict[int, Any] | None = None,
                 failed: BaseException | None = None) -> None:
    """Every pp rank was given the same schedule and tag_base, and stages
    of the same engine.partition cut (its stages carry it: layers per
    stage), checked in one small all_gather on the pp group before anything
    else is sent, all ranks raising alike. Ranks given other schedules
    waited for each other's messages until the timeout, or paired
    micro-batches of other sizes; stages of other cuts (another balance=,
    or balance="time" timed on each rank alone) skipped or repeated
    layers without a word. ``fault``: what is wrong with this rank's own
    arguments (a tag_base out of range, a missing loss_fn...): raised here,
    and by every other rank as a ValueError naming it (alone, they waited
    for this rank in their next collective). ``edges``: this rank's stages'
    ``cut_edges``, to which every pp rank's are added. ``failed``: this
    rank's own error else, before the exchange (a KeyboardInterrupt):
    raised here, and by every other rank as a MeshError naming it (a
    peer's abort: ``from_abort``; alone, they waited here until their
    timeout)."""
    ranks = getattr(pp, "ranks", range(pp.size))       # (a stand-in group of one rank)
    me = f"rank {ranks[pp.rank]}: Pipeline on group {getattr(pp, 'name', '?')}"
    cuts = {tuple(c) for c in (getattr(o, "partition_cut", None) for o in given) if c}
    apart = (f"pp rank {pp.rank}'s stages {list(mine)} come from different engine.partition "
             f"cuts: {sorted(cuts)}" if len(cuts) > 1 else None if fault is None else str(fault))
    if not apart and cuts and len(next(iter(cuts))) != schedule.num_stages:
        apart = (f"schedule {schedule.name!r} runs {schedule.num_stages} stages, but pp rank "
                 f"{pp.rank}'s come from an engine.partition cut into "
                 f"{len(next(iter(cuts)))}: cut the model into schedule.num_stages")
    if pp.size == 1:
        if failed is not None:
            raise failed
        if fault is not None:
            raise _retold(fault, f"{me}: {fault}")
        if apart:
            raise ValueError(f"{me}: {apart}")
        return
    said = hashlib.blake2b(schedule.to_json().encode(), digest_size=8).hexdigest()
    cut = None if apart else next(iter(cuts), None)
    ends = [[s, *e] for s, e in (edges or {}).items() if any(e)]
    broke = None if failed is None else f"{type(failed).__name__}: {failed}"[:400]
    ties = sorted({(tie.name, *tie.stages) for o in given for tie, _ in getattr(o, "tied", ())})
    told = collectives.all_gather_object(pp, [schedule.name, said, tag_base, cut, apart, ends,
                                              broke, ties], timeout=timeout)  # (by every rank)
    if failed is not None:
        raise failed
    if edges is not None:
        edges.update((s, (end, top)) for t in told for s, end, top in t[5])
    faults = [t[4] for t in told if t[4]]
    if fault is not None:
        raise _retold(fault, f"{me}: {fault}")
    if faults:
        raise ValueError(f"{me}: {apart or faults[0]}")
    _broke(me, [t[6] for t in told])
    _same_ties(me, schedule, [[tuple(t) for t in word[7]] for word in told])
    told = [t[:4] for t in told]
    kinds: dict[tuple, list[int]] = {}
    for r, (name, digest, base, _) in enumerate(told):
        kinds.setdefault((name, digest, base), []).append(r)
    if len(kinds) > 1:
        raise ValueError(f"{me}: its pp ranks were given different schedules or tag_bases ("
                         + "; ".join(f"pp ranks {rs}: schedule {name!r} ({digest}), tag_base "
                                     f"{base}" for (name, digest, base), rs in kinds.items())
                         + "): every rank passes the same ones")
    if len({tuple(c) for *_, c in told if c is not None}) > 1:
        raise ValueError(f"{me}: the pp ranks' stages come from different engine.partition "
                         "cuts (layers per stage): " + ", ".join(
                             f"pp rank {r}: {list(c)}" for r, (*_, c) in enumerate(told)
                             if c is not None)
                         + "; every rank must cut alike (the same balance=; for "
                           "balance='time', pass group= so that one timing decides)")


def _broke(me: str, words: Sequence[str | None]) -> None:
    """After an exchange of the pp ranks' words (``words``: each one's
    error, or None), a MeshError naming the first that failed (a peer's
    abort, ``from_abort``: its own error is the root cause)."""
    r, text = next(((r, w) for r, w in enumerate(words) if w), (None, None))
    if text is not None:
        err = MeshError(f"{me}: failed on pp rank {r}: {text}")
        err.from_abort = True       # type: ignore[attr-defined]
        raise err


def _same_ties(me: str, schedule: Schedule, ties: list[list[tuple[Any, ...]]]) -> None:
    """Every pp rank holding a stage of a tied parameter marks it alike
    (``ties``: each pp rank's ``(name, *stages)``, engine.tied): a rank
    alone with a tie broadcast its value to one that never came, and both
    waited out their timeout (a model whose weights are shared on some
    ranks only; before engine.stagebuild_ties's marks, one distributed twice)."""
    for tie in sorted({t for mine in ties for t in mine}):
        name, stages = tie[0], tie[1:]
        owners = sorted({schedule.rank_of(s) for s in stages if 0 <= s < schedule.num_stages})
        lack = [r for r in owners if tie not in ties[r]]
        if lack:
            raise ValueError(
                f"{me}: pp ranks {[r for r in owners if r not in lack]} mark tied parameter "
                f"{name!r} (stages {list(stages)}) on their stages, pp ranks {lack}, which hold "
                "stages of it too, do not: every rank must cut the same model, its parameters "
                "shared alike (an embedding tied to its head on every rank)")


def _checkpointed(pp: Comm, stages: dict[int, Any], patterns: Sequence[str],
                  timeout: float | None) -> dict[int, list[str]]:
    """``checkpoint_modules`` of ``patterns`` on each of this rank's torch
    stages: ``{stage: names wrapped}``; a pattern no stage of the pipeline
    holds (the pp ranks' hits gathered) raises on every rank, naming it;
    so does this rank's own error as it wraps them (a KeyboardInterrupt:
    raised here, a MeshError naming it on the others, which waited for it
    in the gather until their timeout)."""
    wrong = [f"stage {s}, a {type(stage).__name__}, is not a torch module"
             for s, stage in stages.items() if not isinstance(stage, TorchStage)]
    failed: BaseException | None = None
    done: dict[int, list[str]] = {}
    mine: list[str] = []
    try:
        done = {} if wrong else {
            s: checkpoint_modules(stage.module, patterns, f"stage {s}", missing=True)
            for s, stage in stages.items()}
        names = [[n for n, _ in stages[s].module.named_modules() if n] for s in done]
        mine = [p for p in patterns if any(named_by(v, p) for v in names)]
    except BaseException as e:
        failed = e
    broke = None if failed is None else f"{type(failed).__name__}: {failed}"[:400]
    # every rank learns every rank's hits and refusals, so all raise alike
    held = collectives.all_gather_object(pp, [mine, wrong, broke], timeout=timeout)
    if failed is not None:
        raise failed
    ranks = getattr(pp, "ranks", range(pp.size))       # (a stand-in group of one rank)
    _broke(f"rank {ranks[pp.rank]}: Pipeline on group {getattr(pp, 'name', '?')}",
           [h[2] for h in held])
    refused = [f"pp rank {r}: {w}" for r, (_, ws, _) in enumerate(held) for w in ws]
    if refused:
        raise TypeError(f"recompute={list(patterns)!r} (submodules by name): "
                        + "; ".join(refused))
    nowhere = [p for p in patterns if not any(p in h for h, _, _ in held)]
    if nowhere:
        raise ValueError(f"recompute={list(patterns)!r}: {nowhere!r} match no submodule of "
                         f"any stage of the pipeline (names as in each stage's module: "
                         f"pp rank {pp.rank}'s stages {sorted(stages)})")
    return done


def _as_stage(obj: Any, recompute: bool = False, index: int = 0, given: Any = True,
              layered: bool | int = False) -> Any:
    """``obj`` (stage ``index``), or a TorchStage of it when it is a torch
    module (keeping the partition's marks of tied parameters; ``layered``:
    an ``nn.Sequential`` recomputing layer by layer, or in runs of that many
    layers); ``given``: Pipeline's
    ``recompute``, for the error."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(obj, torch.nn.Module):
        if not recompute or getattr(obj, "recompute", False):
            return obj
        if deterministic(obj):          # engine.layers' own: recomputes exactly
            return Recompute(obj)
        asked = given if isinstance(given, bool) else sorted(given, key=repr)
        raise TypeError(f"recompute={asked!r}: stage {index}, a {type(obj).__name__}, is not "
                        "made of engine.layers' own layers, so its forward may not give the "
                        "same result twice: wrap it as engine.layers.Recompute(stage) where it "
                        "does (torch modules recompute with their random draws kept)")
    by_layer = layered if recompute and isinstance(obj, torch.nn.Sequential) else 0
    stage: Any = TorchStage(obj, recompute, layered=by_layer)
    stage.tied = getattr(obj, "tied", ())
    return stage


def _joined(parts: list[Any]) -> Any:
    """The micro-batches' outputs joined along axis 0 (tensors or arrays);
    a list of them where they are tuples (several tensors). Logits a head
    planned colwise left sharded over the vocabulary (a watched colwise
    output, its features on its last axis) are gathered whole over its tp
    group, as every tp rank of the last stage joins its own."""
    if not parts or isinstance(parts[0], tuple):
        return parts
    torch = sys.modules.get("torch")
    if torch is not None and all(isinstance(p, torch.Tensor) for p in parts):
        meta = getattr(parts[0], "_tp_meta", None)
        if meta is not None and parts[0]._tp_axis % parts[0].dim() == parts[0].dim() - 1 \
                and parts[0]._tp_unit == 1:
            plain = torch.cat([p.as_subclass(torch.Tensor) for p in parts])
            return _gather(torch, meta.group, plain, -1)
        return torch.cat(parts)
    return np.concatenate([np.asarray(p) for p in parts])


def _retold(fault: BaseException, text: str) -> BaseException:
    """``fault`` again with message ``text``, its traceback kept: of its own
    class where that takes a message alone, else a TypeError or ValueError
    (as ``fault`` is one) caused by it."""
    try:
        new = type(fault)(text)
    except Exception:                        # a class with its own arguments
        new = (TypeError if isinstance(fault, TypeError) else ValueError)(text)
        new.__cause__ = fault
    return new.with_traceback(fault.__traceback__)


def stages_for_rank(all_stages: Sequence[Any], schedule: Schedule, pp_rank: int) -> list[Any]:
    """This rank's stage objects, in stage order, out of the whole model's
    (as many as the schedule's stages: another count raises, naming both;
    a rank the schedule lacks raises, naming its ranks)."""
    given_schedule(schedule, "stages_for_rank")
    if isinstance(pp_rank, bool) or not isinstance(pp_rank, numbers.Integral) or not (
            0 <= pp_rank < schedule.num_ranks):
        raise ValueError(f"pp rank {pp_rank!r} is not a rank of schedule {schedule.name!r}, "
                         f"whose ranks are 0..{schedule.num_ranks - 1}: pass this rank's "
                         f"coordinate on the pp axis (grid.coord('pp'))")
    if len(all_stages) != schedule.num_stages:
        raise ValueError(f"schedule {schedule.name!r} runs {schedule.num_stages} stages, but "
                         f"the model was cut into {len(all_stages)}: cut it into "
                         f"schedule.num_stages (engine.partition(model, sched.num_stages))")
    return [all_stages[s] for s in schedule.stages_of(int(pp_rank))]
