"""Horovod's SyncBatchNorm: torch.nn.BatchNorm1d/2d/3d whose training
statistics are those of every rank's batch together (the global set), on
the CPU too (torch's nn.SyncBatchNorm and Horovod's take CUDA tensors only).

Forward: each rank's (count, mean, sum of squared deviations) per channel,
in float64, by one allgather; they combine exactly as one batch would
(Chan's parallel variance, so batches of different sizes, an empty one
included, weigh by their rows). Backward: one allreduce (sum) of each
channel's sum of dy and of dy * (x - mean), which the input's gradient
needs; the weight's and bias's gradients stay this rank's own (the
DistributedOptimizer averages them, as Horovod's and torch's).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .basics import Sum, is_initialized, rank, size
from .mpi_ops import allgather, allreduce_

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(_BatchNorm):
    """``hvd.SyncBatchNorm(num_features, eps, momentum, affine,
    track_running_stats)``: in training (or without running statistics),
    the batch's mean and variance are taken over every rank's batch; the
    running statistics update as torch's BatchNorm's do on that whole batch
    (momentum=None: the cumulative average); in eval they are used as they
    are. Takes (N, C, ...) input of any rank from 2 up."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.shape[1] != self.num_features:     # (before any collective: every rank's own)
            who = f"rank {rank()}: " if is_initialized() else ""
            raise ValueError(f"{who}hvd.SyncBatchNorm({self.num_features}): expected input of "
                             f"{self.num_features} channels (its dimension 1), got size "
                             f"{list(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        if not self.training and self.track_running_stats:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                self.bias, False, factor, self.eps)
        if size() == 1:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                self.bias, True, factor, self.eps)
        return _SyncBatchNorm.apply(input, self.weight, self.bias, self.running_mean,
                                    self.running_var, self.eps, factor)


class _SyncBatchNorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Any, bias: Any,  # type: ignore[override]
                running_mean: Any, running_var: Any, eps: float, factor: float) -> torch.Tensor:
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xd = x.detach().double()
        count = x.numel() // c if c else 0
        mean = xd.mean(dims) if count else xd.new_zeros(c)
        m2 = ((xd - mean.view(shape)) ** 2).sum(dims)
        mine = torch.cat([torch.tensor([float(count)], dtype=torch.float64), mean.cpu(),
                          m2.cpu()])
        every = allgather(mine.unsqueeze(0)).to(xd.device)        # (ranks, 1 + 2c)
        counts, means, m2s = every[:, :1], every[:, 1:1 + c], every[:, 1 + c:]
        total = float(counts.sum())
        if total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"{int(total)} over every rank's batch (input size "
                             f"{list(x.shape)} here)")
        mean = (counts * means).sum(0) / total
        m2 = (m2s + counts * (means - mean) ** 2).sum(0)
        invstd = torch.rsqrt(m2 / total + eps)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - factor).add_(factor * mean.to(running_mean.dtype))
                running_var.mul_(1 - factor).add_(
                    factor * (m2 / (total - 1)).to(running_var.dtype))
        mean, invstd = mean.to(x.dtype), invstd.to(x.dtype)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.total = total
        out = (x - mean.view(shape)) * invstd.view(shape)
        if weight is not None:
            out = out * weight.view(shape)
        if bias is not None:
            out = out + bias.view(shape)
        return out

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> Any:      # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xmu = x - mean.view(shape)
        sums = torch.cat([dy.sum(dims), (dy * xmu).sum(dims)])
        grad_weight = sums[c:] * invstd if weight is not None and ctx.needs_input_grad[1] \
            else None
        grad_bias = sums[:c].clone() if ctx.needs_input_grad[2] else None
        grad_input = None
        if ctx.needs_input_grad[0]:
            allreduce_(sums, op=Sum, name="sync_batch_norm.sums")
            sum_dy, sum_dy_xmu = (sums[:c] / ctx.total).view(shape), \
                (sums[c:] / ctx.total).view(shape)
            scale = invstd if weight is None else invstd * weight
            grad_input = (dy - sum_dy - xmu * (invstd ** 2).view(shape) * sum_dy_xmu) \
                * scale.view(shape)
        return grad_input, grad_weight, grad_bias, None, None, None, None
