"""A per-token loss's reports (Megatron-core's third item), summed over a step.

Megatron-core's ``loss_func`` returns ``(loss_sum, num_tokens, {"lm loss":
report})``: each report a value to log (a tensor ``[sum, count]``, which
Megatron sums over micro-batches and all-reduces over dp, and divides when
it logs). A Pipeline's per-token loss may return that third item too: each
micro-batch's reports are summed on the last stage's ranks
(``StepReports.add``), then over the dp replicas in the step's closing
all-reduce (engine.rollback's ``agree``), after which every rank of the
pipeline holds the step's sums (``Pipeline.reports``, ``job.reports``).

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

Megatron's older ``loss_func`` returned a mean and its reports, ``(loss,
{"lm loss": averaged_loss})``, each value averaged over dp in the
function and over the micro-batches by its training loop (a mean of the
means, each micro-batch one). A Pipeline's loss may return that pair: its
reports are averaged over the step's micro-batches and dp replicas alike,
as sums beside a hidden count of the micro-batches (``_MICRO``, one each),
by which every rank divides the sums once they have met.
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

# the hidden report of averaged ones (a mean's reports): 1 a micro-batch, summed alike
_MICRO = "\x00micro-batches"

_WHAT = ("a report's value is a tensor (Megatron's [sum, count]), a number, a numpy array or "
         "a tuple of 0-dim tensors or numbers")


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


def _value(kind: str, shape: tuple[int, ...], values: np.ndarray) -> Any:
    """A report's sum as its values were: a float64 tensor (on the CPU), a
    float, or a float64 array, of their shape."""
    if kind == "number":
        return float(values[0])
    if kind == "tensor":
        return sys.modules["torch"].from_numpy(values.reshape(shape).copy())
    return values.reshape(shape).copy()


def _names(layout: Layout) -> str:
    said = ", ".join(f"{n!r}: " + ("a number" if k == "number" else f"{k} of shape {s}")
                     for n, k, s in layout if n != _MICRO)
    return "{" + said + "}" + (" averaged (a mean's)" if _averaged(layout) else "")


def _averaged(layout: Layout) -> bool:
    return any(n == _MICRO for n, _, _ in layout)


class StepReports:
    """One step's reports on one rank: its micro-batches' summed
    (``add``), then the step's over every replica (``total``)."""

    def __init__(self) -> None:
        self.layout: Layout | None = None       # this rank's micro-batches' (None: no reports)
        self.first = -1                         # the micro-batch that laid it out
        self.sums = np.zeros(0)
        self.total: dict[str, Any] = {}

    def add(self, k: int, reports: Any, where: str, averaged: bool = False) -> None:
        """Micro-batch ``k``'s reports (a dict of name: value) added
        (``averaged``: a mean's, counted to be averaged); a name or a shape
        other than the step's first micro-batch's raises ValueError naming
        both (the sums would mix them)."""
        if not isinstance(reports, dict) or not all(isinstance(n, str) for n in reports):
            raise TypeError(f"{where}: loss_fn(output, target) returned {type(reports).__name__} "
                            "as its third item: a per-token loss's reports are a dict of "
                            "names and values (Megatron's {'lm loss': torch.cat([loss_sum."
                            "detach().view(1), num_tokens.view(1)])})")
        flat = [(n, *_flat(n, v, where)) for n, v in sorted(reports.items())]
        if averaged:
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
        """The step's reports from their sums: each averaged over the
        hidden count of micro-batches where the layout has one."""
        parts, at = {}, 0
        for name, kind, shape in layout:
            n = int(np.prod(shape))
            parts[name] = (kind, shape, sums[at:at + n])
            at += n
        micro = parts.pop(_MICRO, None)
        over = micro[2][0] if micro is not None and micro[2][0] > 0 else 1.0
        return {name: _value(kind, shape, values / over)
                for name, (kind, shape, values) in parts.items()}
