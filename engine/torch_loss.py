"""A torch loss as a Pipeline's ``loss_fn``: ``torch_loss`` wraps an
ordinary one (the mean over its micro-batch, a per-token sum and count,
Megatron's forms with reports) so that it returns its gradient too, taken
by autograd; ``first_loss`` and ``as_pipeline_loss`` tell from a loss
function's first call whether it is a torch loss or a ``(loss, gradient)``
pair of numbers and arrays, and refuse anything else saying what a loss
returns. The tensor helpers a stage shares with its loss (``_torch``,
``_tensor``, ``_target``, ``_detached``) live here, below engine.torch_stage,
which re-exports this module's public names. torch is imported only when
called.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Any

import numpy as np

from .per_token import SUM_COUNT, count_of, is_count, split_count
from .per_token_call import watched
from .per_token_loss import summed

__all__ = ["torch_loss", "as_pipeline_loss", "first_loss", "plain_torch_loss"]


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError("TorchStage needs torch: pip install torch") from e
    return torch


def _tensor(torch: Any, x: Any, device: Any = None) -> Any:
    """``x`` (a tensor or an array) as a tensor, on ``device`` when given."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t if device is None else t.to(device)


def _target(torch: Any, target: Any, device: Any) -> Any:
    """A loss's target as tensors on ``device``: a tuple of targets (labels
    and a loss mask) part by part, each as it is, not one array of them."""
    if isinstance(target, tuple):
        return tuple(_target(torch, t, device) for t in target)
    return _tensor(torch, target, device)


def _detached(o: Any) -> Any:
    """``o.detach()``, a colwise output still watched as one
    (engine.tp_watch's ColwiseOutput, its attributes kept): a layer
    the plan left whole after it, in the next stage on this rank or as
    engine.distribute measures the layers one by one, raises a PlanError
    naming both (it was torch's shape error alone)."""
    d = o.detach()
    if getattr(o, "_tp_meta", None) is not None and type(d) is not type(o):
        d = d.as_subclass(type(o))
        d.__dict__.update(o.__dict__)
    return d


def torch_loss(fn: Any, per_token: bool = True) -> Any:
    """Wrap a torch loss (``fn(y, target) -> scalar tensor``, mean over the
    micro-batch, or with Megatron's older reports after it, ``(loss,
    reports)``; or a per-token loss's ``(loss_sum, count)``, engine.per_token,
    or Megatron-core's ``(loss_sum, num_tokens, reports)``) as a pipeline
    ``loss_fn`` on tensors (or numpy arrays), which returns ``(loss,
    gradient)`` (and the reports), or ``(loss_sum, gradient, count)`` (and the
    reports); the target (each
    part of a tuple of them) goes to the output's device. A mean cross
    entropy (``nn.CrossEntropyLoss()``, a traced model's own
    ``F.cross_entropy``: engine.per_token_loss; a function returning one's
    value: engine.per_token_call) runs as its per-token sum and count unless
    ``per_token`` is False; the wrapper's ``as_written`` is the loss as
    written (a schedule with OPT actions takes that). ``seed``: the loss's
    gradient to start its backward from (a loss scale's, engine.scaled);
    ``sum_seed``: a per-token loss's sum's, in its place."""
    torch = _torch()
    form = (summed(fn) or watched(fn)) if per_token else None
    given, fn = fn, form or fn

    def loss_fn(y: Any, target: Any, seed: float | None = None,
                sum_seed: float | None = None, probe: bool = False) -> Any:
        if not torch.is_grad_enabled():     # (the stages' forwards made no graph either)
            raise TypeError("step() ran with grad mode off (under torch.no_grad() or "
                            "torch.inference_mode()): a step trains; evaluate with "
                            "eval_step(), which keeps no graph itself")
        # (a colwise output kept watched: F.cross_entropy of it runs vocab-parallel)
        ty = _detached(_tensor(torch, y)).requires_grad_(True)
        leaving = _leaving_torch() if probe else contextlib.nullcontext()
        with leaving:       # (the probe: a pair's .numpy() of the output, detached)
            out = fn(ty, _target(torch, target, ty.device))
        loss, count, reports = split_count(out)
        left = getattr(leaving, "left", False)
        if probe and (left or not (isinstance(loss, torch.Tensor) and loss.dim() == 0)):
            return _Unwrapped(out, left)    # (no torch loss: first_loss reads it)
        if isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad:
            raise TypeError("loss_fn(output, target) returned a scalar tensor without a "
                            "gradient: compute it from the output (no .detach(), no "
                            "torch.no_grad())")
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
            raise TypeError(f"loss_fn(output, target) returned {_described(loss)}: a torch "
                            "model's loss_fn returns the loss as a scalar tensor of the "
                            "output, the mean over the micro-batch (F.mse_loss, "
                            f"F.cross_entropy), {SUM_COUNT}" + _hint(loss))
        # (a loss scale's seed, engine.scaled: one process's scaler.scale(loss).backward())
        if count is not None and sum_seed is not None:
            seed = sum_seed
        loss.backward(None if seed is None else torch.tensor(seed, dtype=loss.dtype,
                                                             device=loss.device))
        if count is None:       # (a mean; Megatron's older reports after it: averaged)
            return (float(loss.detach()), ty.grad) if reports is None else (
                float(loss.detach()), ty.grad, reports)
        if reports is None:
            return float(loss.detach()), ty.grad, count_of(count, "a per-token loss")
        return float(loss.detach()), ty.grad, count_of(count, "a per-token loss"), reports

    def value(y: Any, target: Any) -> Any:
        """The loss alone, without its gradient (an evaluation): a float,
        or a per-token loss's ``(sum, count)`` (``(sum, count, reports)``),
        or a mean's with Megatron's older reports, ``(loss, None, reports)``."""
        with torch.no_grad():
            ty = _tensor(torch, y)
            loss, count, reports = split_count(fn(ty, _target(torch, target, ty.device)))
            if count is None:
                return float(loss) if reports is None else (float(loss), None, reports)
            pair = float(loss), count_of(count, "a per-token loss")
            return pair if reports is None else (*pair, reports)

    loss_fn.value = value       # type: ignore[attr-defined]
    loss_fn.seeded = True       # type: ignore[attr-defined]
    if form is not None:
        loss_fn.as_written = torch_loss(given, per_token=False)     # type: ignore[attr-defined]
    return loss_fn


class _Unwrapped:
    """What a loss function returned that is no torch loss, or that took a
    tensor requiring its gradient out of torch (``left``): ``torch_loss``'s
    probe."""

    def __init__(self, out: Any, left: bool) -> None:
        self.out, self.left = out, left


_IN_PLACE = {"__setitem__"} | {f"__i{op}__" for op in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift",
    "rshift", "matmul")}


def _leaving_torch() -> Any:
    """A torch function mode under which what torch refuses a tensor
    requiring its gradient is done to its detached self: leaving torch
    (``.numpy()``, ``np.asarray``, CuPy's ``__cuda_array_interface__``,
    ``__dlpack__``), and, a leaf's, an in-place change (``o -= t``,
    ``o.sub_(t)``, ``o[m] = 0``); ``left``: whether any was. ``first_loss``'s
    call hands the output requiring its gradient, in case the function is a
    torch loss: a (loss, gradient) pair that does either so runs once, as on
    the output itself."""
    from torch.overrides import TorchFunctionMode
    torch = _torch()
    t = torch.Tensor
    leaving = (t.numpy, t.__array__, t.__cuda_array_interface__.__get__, t.__dlpack__)

    def in_place(func: Any, v: Any) -> bool:       # (add_, __iadd__, __setitem__)
        name = getattr(func, "__name__", "")
        return v.is_leaf and torch.is_grad_enabled() and (
            name in _IN_PLACE or name[-1:] == "_" and name[:1] != "_")

    class Leaving(TorchFunctionMode):
        left = False

        def __torch_function__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            v: Any = args[0] if args else None
            if getattr(v, "requires_grad", False) and (func in leaving or in_place(func, v)):
                d = v.detach()
                out = func(d, *args[1:], **(kwargs or {}))
                self.left = True        # (not where it raised: hasattr of a CPU tensor's
                return v if out is d else out   # __cuda_array_interface__)
            return func(*args, **(kwargs or {}))
    return Leaving()


def first_loss(fn: Any, y: Any, target: Any, where: str, as_written: bool,
               seed: float | None = None, sum_seed: float | None = None) -> tuple[Any, Any]:
    """A user's loss function's first call on a torch output ``y``, made
    once: ``(the Pipeline's loss_fn, what it returned)``. The call is made
    as ``torch_loss(fn)`` makes it (``as_written``: not per token, under OPT
    actions), whose loss_fn that is where ``fn`` returned a torch loss; else
    ``fn`` itself where it returned a (loss, gradient) pair (its tensors
    detached: it was handed the output as a tensor requiring its gradient,
    which it may take to numpy or change in place: ``_leaving_torch``), or
    ``as_pipeline_loss``'s TypeError. A torch loss that did either is
    refused (RuntimeError), as torch refuses its next calls."""
    wrapped = torch_loss(fn, per_token=not as_written)
    with warnings.catch_warnings():     # (a pair's float(loss) of it: no torch warning)
        warnings.filterwarnings("ignore", "Converting a tensor with requires_grad=True")
        got = wrapped(y, target, seed=seed, sum_seed=sum_seed, probe=True)
    if not isinstance(got, _Unwrapped):
        return wrapped, got
    out = got.out
    torch = _torch()
    loss = split_count(out)[0]
    if got.left and isinstance(loss, torch.Tensor) and loss.dim() == 0:
        raise RuntimeError(f"{where}: loss_fn(output, target) returned a torch loss but took "
                           "a tensor requiring its gradient out of torch (.numpy(), "
                           "np.asarray) or changed it in place, which torch refuses: use "
                           ".detach().numpy() or .clone() there, or return a (loss, gradient) "
                           "pair of numbers and arrays")
    fn = as_pipeline_loss(fn, out, where, y)        # (raises: no torch loss either)
    if isinstance(out, tuple):
        out = tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in out)
    return fn, out


def _described(v: Any) -> str:
    name = type(v).__name__
    a = "an" if name[:1].lower() in "aeiou" else "a"
    shape = getattr(v, "shape", None)
    if shape is not None:
        return f"{a} {name} of shape {tuple(shape)}"
    return f"{a} {name}" + (f" of {len(v)}" if isinstance(v, tuple) else "")


def _hint(v: Any) -> str:
    if isinstance(v, tuple):
        return ("; a (loss, gradient) pair is an engine.layers model's loss "
                "(engine.layers.mse_loss)")
    if getattr(v, "shape", ()) != ():
        return "; reduce it (reduction='mean')"
    if not hasattr(v, "shape"):
        return "; return the tensor, not a number (no .item())"
    return ""


def plain_torch_loss(fn: Any) -> bool:
    """Whether ``fn`` is one of torch's own losses, which return the loss
    alone (``torch.nn.functional``'s, or a module such as ``nn.MSELoss()``)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return isinstance(fn, torch.nn.Module) or (
        getattr(fn, "__module__", None) or "").startswith("torch.nn.functional")


def as_pipeline_loss(fn: Any, first: Any, where: str, output: Any = None) -> Any:
    """A Pipeline's ``loss_fn`` from what ``fn(y, target)`` returned on its
    first call (``first``): ``fn`` itself where that is a ``(loss,
    gradient)`` pair (the loss a number, the gradient of the output
    ``output`` where that is a torch tensor: its shape) or a per-token
    ``(loss_sum, gradient, count)`` (engine.per_token; a dict of reports
    after the count, or after a mean's pair, Megatron's older ones:
    engine.reports); ``torch_loss(fn)`` where it is a torch scalar (an
    ordinary torch loss, F.mse_loss) or a per-token ``(loss_sum, count)`` of
    tensors (Megatron-core's ``(loss_sum, num_tokens, reports)``; the older
    ``(loss_mean, reports)``); else TypeError, saying what
    it must return (``where``: the rank, for the error). A tuple whose first
    part is a tensor and second no count is a torch loss returned with
    something else (``(loss, logits)``), not a pair: refused too."""
    torch = sys.modules.get("torch")
    if isinstance(first, tuple) and len(first) in (2, 3) and split_count(first)[0] is not first \
            and first[0].dim() == 0:
        return torch_loss(fn)
    if isinstance(first, tuple) and (len(first) == 2 or len(first) == 3 and (
                                     is_count(first[2]) or isinstance(first[2], dict))
                                     or len(first) == 4 and is_count(first[2])
                                     and isinstance(first[3], dict)):
        loss, grad = first[:2]
        if torch is not None and isinstance(loss, torch.Tensor):
            raise TypeError(f"{where}: loss_fn(output, target) returned a tuple of "
                            f"{len(first)}, ({', '.join(map(_described, first))}): on torch "
                            "stages a Pipeline's loss_fn returns the loss alone, as a scalar "
                            "tensor of the output (F.mse_loss: the mean over the micro-batch), "
                            "not with logits or anything else, or a per-token loss's (sum, "
                            "count), the count a number or a 0-dim tensor; a (loss, gradient) "
                            "pair is an engine.layers model's loss (engine.layers.mse_loss: the "
                            "loss a number, then the gradient of the output)")
        if torch is not None and isinstance(output, torch.Tensor) and (
                tuple(getattr(grad, "shape", (None,))) != tuple(output.shape)):
            raise TypeError(f"{where}: loss_fn(output, target) returned a (loss, gradient) "
                            f"pair whose gradient is {_described(grad)}, not of the "
                            f"output's shape {tuple(output.shape)}: the gradient of the "
                            "loss with respect to the output (or, on torch stages, return "
                            "the loss alone as a scalar tensor, F.mse_loss, and autograd "
                            "takes it)")
        return fn
    if torch is not None and isinstance(first, torch.Tensor) and first.dim() == 0:
        return torch_loss(fn)
    raise TypeError(f"{where}: loss_fn(output, target) returned {_described(first)}: a "
                    "Pipeline's loss_fn returns (loss, gradient of the output) "
                    "(engine.layers.mse_loss), or, per token, (loss_sum, its gradient, "
                    "count); on torch stages the loss as a scalar tensor (F.mse_loss: the "
                    f"mean over the micro-batch), {SUM_COUNT}")
