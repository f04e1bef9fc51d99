"""A loss's reports (Megatron's ``loss_func``'s last item), reduced over a step.

Megatron-core's ``loss_func`` returns ``(loss_sum, num_tokens, {"lm loss":
report})``, its older one ``(loss_mean, {"lm loss": averaged_loss})``; a
Pipeline's loss may return either (engine.per_token). Megatron's training
loop (``train_step``) reduces each report by its number of values, in
either form: two, ``[sum, count]``, are summed over the micro-batches and
dp and logged as the sum over the count; one is averaged over the
micro-batches, each one alike (its older ``loss_func`` averaged it over dp
itself); any other number of values it refuses. So does a Pipeline: each
micro-batch's values are summed on the last stage's ranks
(``StepReports.add``) beside a hidden count of the micro-batches
(``_MICRO``, one each), then over the dp replicas in the step's closing
all-reduce (engine.rollback's ``agree``), after which every rank of the
pipeline divides (a two-value report by its second value, a one-value
report by the micro-batches of every replica) and holds what Megatron
logs (``Pipeline.reports``, ``job.reports``). A one-value report is so
averaged over every replica's micro-batches: Megatron's where its
function averaged it over dp, and the same value on every rank.

That all-reduce is one array of the same size on every rank, and only the
last stage's ranks know the reports' names, so the pipeline keeps the
layout its ranks last agreed on (each name, its value's kind and shape) and
sizes the array by it. A step whose reports are laid out otherwise (the
first with reports, a name added) says so there, and the layouts go in the
agreement's all-gather (which a failed step already makes): a new layout
costs that gather once, and a step after it only the array's slots. The
all-reduce takes the largest of each slot, so each value goes as its
positive and its negative part (every other rank's zeros leave both as
they are).
"""
from __future__ import annotations

import numbers
import sys
from typing import Any

import numpy as np

__all__ = ["StepReports", "Layout", "width"]

# each report: (name, kind, shape): kind "tensor" (a torch tensor, or a tuple of 0-dim ones:
# Megatron's older (sum, count)), "number" (a Python or numpy number) or "array" (a numpy
# array, a tuple of numbers)
Layout = tuple[tuple[str, str, tuple[int, ...]], ...]

# the hidden report of the micro-batches (one-value reports' divisor): 1 each, summed alike
_MICRO = "\x00micro-batches"

_WHAT = ("a report's value is a tensor (Megatron's [sum, count]), a number, a numpy array or "
         "a tuple of 0-dim tensors or numbers")
_SIZES = ("Megatron's training loop takes a report of 2 values, [sum, count] (summed over the "
          "step, then divided), or of one (averaged over the micro-batches)")


def width(layout: Layout) -> int:
    """How many numbers a step's reports of ``layout`` are."""
    return sum(int(np.prod(shape)) for _, _, shape in layout)


def _flat(name: str, v: Any, where: str) -> tuple[str, tuple[int, ...], np.ndarray]:
    """(kind, shape, float64 values) of report ``name``'s value ``v``."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(v, torch.Tensor):
        return "tensor", tuple(v.shape), v.detach().to("cpu", torch.float64).numpy().ravel()
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return "number", (), np.array([float(v)])
    if isinstance(v, np.ndarray) and v.dtype.kind in "iuf":
        return "array", v.shape, v.astype(np.float64).ravel()
    if isinstance(v, (tuple, list)) and v:
        parts = [_flat(name, p, where) for p in v]
        if all(shape == () for _, shape, _ in parts):
            kind = "tensor" if any(k == "tensor" for k, _, _ in parts) else "array"
            return kind, (len(parts),), np.concatenate([a for _, _, a in parts])
    raise TypeError(f"{where}: loss_fn(output, target) returned the report {name!r} as "
                    f"{type(v).__name__} {v!r:.80}: {_WHAT}")


def _value(kind: str, value: np.float64) -> Any:
    """A report's logged value as Megatron's loop gives it: a 0-dim
    float64 tensor (on the CPU) where it was a tensor, else a float."""
    if kind == "tensor":
        return sys.modules["torch"].tensor(float(value), dtype=sys.modules["torch"].float64)
    return float(value)


def _names(layout: Layout) -> str:
    said = ", ".join(f"{n!r}: " + ("a number" if k == "number" else f"{k} of shape {s}")
                     for n, k, s in layout if n != _MICRO)
    return "{" + said + "}"


class StepReports:
    """One step's reports on one rank: its micro-batches' summed
    (``add``), then the step's over every replica (``total``)."""

    def __init__(self) -> None:
        self.layout: Layout | None = None       # this rank's micro-batches' (None: no reports)
        self.first = -1                         # the micro-batch that laid it out
        self.sums = np.zeros(0)
        self.total: dict[str, Any] = {}

    def add(self, k: int, reports: Any, where: str) -> None:
        """Micro-batch ``k``'s reports (a dict of name: value) added, and
        the micro-batch counted; a value of other than 1 or 2 numbers raises
        ValueError (Megatron's loop does), as do a name or a shape other
        than the step's first micro-batch's, naming both (the sums would
        mix them)."""
        if not isinstance(reports, dict) or not all(isinstance(n, str) for n in reports):
            raise TypeError(f"{where}: loss_fn(output, target) returned {type(reports).__name__} "
                            "as its third item: a per-token loss's reports are a dict of "
                            "names and values (Megatron's {'lm loss': torch.cat([loss_sum."
                            "detach().view(1), num_tokens.view(1)])})")
        flat = [(n, *_flat(n, v, where)) for n, v in sorted(reports.items())]
        for name, _, shape, a in flat:
            if a.size not in (1, 2):
                raise ValueError(f"{where}: loss_fn(output, target) returned the report "
                                 f"{name!r} of shape {shape}, {a.size} values: {_SIZES}")
        if flat:
            flat.append((_MICRO, "number", (), np.ones(1)))
        layout: Layout = tuple((n, kind, shape) for n, kind, shape, _ in flat)
        values = np.concatenate([a for *_, a in flat]) if flat else np.zeros(0)
        if self.layout is None:
            self.layout, self.first, self.sums = layout, k, values
        elif layout != self.layout:
            raise ValueError(f"{where}: loss_fn(output, target) returned the reports "
                             f"{_names(layout)} for micro-batch {k} but {_names(self.layout)} "
                             f"for micro-batch {self.first}: a step's micro-batches report "
                             "the same names, each a value of one kind and shape")
        else:
            self.sums = self.sums + values

    def said(self, agreed: Layout, loss_here: bool) -> tuple[float, np.ndarray]:
        """This rank's word in the closing all-reduce (a max): 0 where it has
        no loss (or none and nothing is agreed), 1 and its sums (each as its
        positive, then its negative part) where they are laid out as
        ``agreed``, 2 where they are not (the layouts then go in the
        all-gather: ``told``)."""
        mine = self.layout or ()
        empty = np.zeros(2 * width(agreed))
        if not loss_here or (not mine and not agreed):
            return 0.0, empty
        if mine != agreed:
            return 2.0, empty
        return 1.0, np.concatenate([np.maximum(self.sums, 0), np.maximum(-self.sums, 0)])

    def told(self, loss_here: bool) -> tuple[Layout, list[float]] | None:
        """What this rank tells in the agreement's all-gather: its layout and
        its sums, None where it has no loss."""
        return (self.layout or (), self.sums.tolist()) if loss_here else None

    def from_slots(self, agreed: Layout, slots: np.ndarray) -> None:
        """The step's reports from every replica's maxed slots (a
        (replicas, 2 * width) array), summed over the replicas."""
        n = width(agreed)
        self.total = self._rebuilt(agreed, (slots[:, :n] - slots[:, n:]).sum(axis=0))

    def from_told(self, told: dict[int, tuple[Layout, list[float]]]) -> tuple[Layout, str | None]:
        """The step's reports from each replica's ``told`` (by dp index):
        their layout, and None; or, replicas of other layouts, () and what
        to raise (the step fails on every rank)."""
        # (as sent: the object all-gather may hand tuples back as lists)
        laid = {d: tuple((n, k, tuple(s)) for n, k, s in t[0]) for d, t in told.items()}
        layouts = set(laid.values())
        if len(layouts) > 1:
            said = "; ".join(f"dp replica {d}: {_names(t) if t else 'none'}"
                             for d, t in sorted(laid.items()))
            return (), (f"loss_fn(output, target) returned other reports on other dp replicas "
                        f"({said}): every replica's loss reports the same names")
        layout: Layout = layouts.pop() if layouts else ()
        sums = np.sum([np.asarray(t[1], dtype=np.float64) for t in told.values()], axis=0) \
            if told else np.zeros(0)
        self.total = self._rebuilt(layout, sums)
        return layout, None

    def alone(self) -> None:
        """The step's reports where this rank is the whole pipeline."""
        self.total = self._rebuilt(self.layout or (), self.sums)

    @staticmethod
    def _rebuilt(layout: Layout, sums: np.ndarray) -> dict[str, Any]:
        """The step's reports from their sums, as Megatron's loop logs
        them: a [sum, count] the sum over the count (nan where both are 0),
        one value its mean over the hidden count of micro-batches."""
        parts, at = {}, 0
        for name, kind, shape in layout:
            n = int(np.prod(shape))
            parts[name] = (kind, sums[at:at + n])
            at += n
        micro = parts.pop(_MICRO, None)
        over = micro[1][0] if micro is not None and micro[1][0] > 0 else 1.0
        with np.errstate(divide="ignore", invalid="ignore"):
            return {name: _value(kind, np.float64(v[0]) / (v[1] if len(v) == 2 else over))
                    for name, (kind, v) in parts.items()}
