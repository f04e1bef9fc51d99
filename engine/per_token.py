"""A per-token loss: a micro-batch's loss as a sum and a count (Megatron's).

A Pipeline's ``loss_fn`` may return, in place of its micro-batch's mean,
the sum over the tokens (targets) it counts and their count: on torch
stages ``(loss_sum, count)`` (Megatron-core's ``loss_func`` returns
``(loss_sum, num_tokens, ...)``), for numpy stages ``(loss_sum, gradient
of loss_sum, count)`` (engine.layers' ``(loss, gradient)`` and the count
after it)::

    def loss_fn(logits, y):         # y: class ids, -100 where not counted
        return (F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                                reduction="sum"), (y != -100).sum())

A third item after the count, Megatron-core's reports (``{"lm loss":
report}``), is reduced over the step as Megatron's training loop reduces
it (engine.reports); a mean may come with Megatron's older reports,
``(loss_mean, reports)`` (``(loss, gradient, reports)`` for numpy
stages), reduced alike. The step's loss is
then the sum over every micro-batch and dp replica over the count summed
alike, and its gradients that quantity's: each
micro-batch's sum goes back unscaled, and every gradient is scaled once at
the step's end (engine.step's ``settle``), when the counts, known on the
last stage's ranks, have met in the step's closing all-reduce
(engine.rollback's ``agree``). A step counting no token at all has a loss
of 0 and adds nothing to the gradients. This module reads the counts and
keeps a step's (``Counts``).
"""
from __future__ import annotations

import math
import numbers
import sys
from typing import Any

from .reports import StepReports

__all__ = ["Counts", "is_count", "count_of", "split_count", "count_reports", "SUM_COUNT"]

SUM_COUNT = ("or the sum over the tokens it counts and their count, a (sum, count) pair (a "
             "per-token loss: F.cross_entropy(..., ignore_index=-100, reduction='sum'), "
             "(y != -100).sum())")


def is_count(v: Any) -> bool:
    """Whether ``v`` may be a count: a real number (not a bool) or a
    0-dim array or tensor of one."""
    if isinstance(v, bool):
        return False
    if isinstance(v, numbers.Real):
        return True
    if tuple(getattr(v, "shape", (None,))) != ():
        return False
    kind = str(getattr(v, "dtype", ""))
    return bool(kind) and "bool" not in kind and "complex" not in kind


def count_of(v: Any, where: str) -> float:
    """The count a loss returned, as a float (a tensor's read once); a
    negative or non-finite one raises ValueError naming ``where``."""
    n = float(v.item() if hasattr(v, "item") else v)
    if not math.isfinite(n) or n < 0:
        raise ValueError(f"{where}: loss_fn(output, target) returned a count of {n}: the count "
                         f"is the number of tokens (targets) its sum is over, 0 or more")
    return n


def split_count(out: Any) -> tuple[Any, Any, Any]:
    """(loss, count, reports) of what a torch loss returned: ``(out, None,
    None)`` for the loss alone, ``(loss_sum, count, None)`` for a pair
    whose first part is a tensor and second a count, Megatron-core's
    ``(loss_sum, num_tokens, reports)`` (a dict: engine.reports) whole,
    and Megatron's older ``(loss_mean, reports)`` as ``(loss_mean, None,
    reports)`` (a mean with reports: engine.reports)."""
    torch = sys.modules.get("torch")
    if (torch is not None and isinstance(out, tuple) and len(out) in (2, 3)
            and isinstance(out[0], torch.Tensor)):
        if len(out) == 2 and isinstance(out[1], dict):
            return out[0], None, out[1]
        if is_count(out[1]) and (len(out) == 2 or isinstance(out[2], dict)):
            return out[0], out[1], out[2] if len(out) == 3 else None
    return out, None, None


def count_reports(out: tuple[Any, ...]) -> tuple[Any, Any]:
    """(count, reports) of what a Pipeline's ``loss_fn`` returned after its
    (loss, gradient): ``(loss, gradient)`` a mean's, ``(loss, gradient,
    reports)`` (a dict) a mean's with Megatron's older reports, ``(loss_sum,
    gradient, count)`` and ``(loss_sum, gradient, count, reports)`` a
    per-token loss's; None where there is none."""
    if len(out) == 3 and isinstance(out[2], dict):
        return None, out[2]
    return (out[2] if len(out) >= 3 else None), (out[3] if len(out) == 4 else None)


# the kinds of a micro-batch's loss (_MEANT: a mean and Megatron's older reports)
_MEAN, _PAIR, _REPORTED, _MEANT = 0, 1, 2, 3
_SAID = {_PAIR: "a per-token (sum, count)", _MEAN: "a mean (a loss alone)",
         _REPORTED: "a per-token (sum, count, reports)",
         _MEANT: "a mean and its reports (loss, reports)"}


class Counts:
    """One step's losses on one rank, as they come (``note``): whether
    they are per-token, and this replica's count; then (``agreed``, from
    every replica's ``slots`` met in the step's closing all-reduce, or this
    rank's own where it is alone) the step's: ``per_token`` and ``total``,
    the count over every replica, which ``scale`` turns into the factor of
    its gradients and loss."""

    def __init__(self) -> None:
        self.first: tuple[int, int] | None = None   # (micro-batch, its kind) of the first
        self.count = 0.0
        self.per_token, self.total = False, 0.0
        self.reports = StepReports()

    def note(self, k: int, count: Any, where: str, has_opt: bool, reports: Any = None) -> bool:
        """Micro-batch ``k``'s loss: a per-token one's ``count`` (and its
        ``reports``: engine.reports), or a mean (``count`` None; its
        ``reports``, Megatron's older ones, alike); True for a per-token
        one. A step's micro-batches return one kind (a
        mean weighed by rows beside a sum over tokens is neither one
        process's loss; reports of some micro-batches only are no step's),
        else ValueError naming both; a per-token loss cannot run under OPT
        actions (``has_opt``), whose optimizer steps inside the step,
        before the step's count is known."""
        kind = ((_MEAN if reports is None else _MEANT) if count is None
                else _PAIR if reports is None else _REPORTED)
        if self.first is None:
            self.first = (k, kind)
        elif self.first[1] != kind:
            raise ValueError(f"{where}: loss_fn(output, target) returned {_SAID[kind]} for "
                             f"micro-batch {k} but {_SAID[self.first[1]]} for micro-batch "
                             f"{self.first[0]}: a step's micro-batches return one kind (the "
                             "step's loss is the mean of the means, weighed by rows, or the "
                             "sum of the sums over the sum of the counts)")
        if kind == _MEANT:      # (Megatron's older reports)
            self.reports.add(k, reports, where)
        if kind in (_MEAN, _MEANT):
            return False
        if has_opt:
            raise ValueError(f"{where}: loss_fn(output, target) returned a per-token (sum, "
                             "count), but the schedule has OPT actions: its optimizer steps "
                             "inside the step, before the step's count (every micro-batch's, "
                             "every dp replica's) scales the gradients; use a schedule without "
                             "them and step the optimizer after step()")
        self.count += count_of(count, where)
        if reports is not None:
            self.reports.add(k, reports, where)
        return True

    def kind(self) -> bool | None:
        """This rank's kind of loss: per-token, a mean, or None (no loss here)."""
        return None if self.first is None else self.first[1] in (_PAIR, _REPORTED)

    def slots(self) -> tuple[float, float]:
        """This rank's two numbers for the step's closing all-reduce (a max):
        (count + 1, 0) per-token, (0, 1) a mean, (0, 0) no loss here."""
        kind = self.kind()
        return (0.0, 0.0) if kind is None else (self.count + 1, 0.0) if kind else (0.0, 1.0)

    def agreed(self, slots: Any) -> tuple[list[int], list[int]]:
        """Take every replica's ``slots`` (a (replicas, 2) array, maxed over
        the grid; None: this rank alone); return the replicas whose loss
        was per-token and those whose was a mean (both: the step fails)."""
        if slots is None:
            self.per_token, self.total = bool(self.kind()), self.count
            self.reports.alone()
            return [], []
        tokens = [d for d, (c, _) in enumerate(slots) if c > 0]
        self.per_token = bool(tokens)
        self.total = float(sum(c - 1 for c, _ in slots if c > 0))
        return tokens, [d for d, (_, mean) in enumerate(slots) if mean > 0]

    def scale(self, dp: int) -> float:
        """The factor of a per-token step's dp-averaged gradients and loss:
        dp / the count (0 where it counted nothing)."""
        return dp / self.total if self.total > 0 else 0.0
