"""Reference numpy layers with hand-written backward passes.

Small enough to check by eye, exact enough (float64) to compare a pipeline
against sequential training to 1e-10. Each layer, and ``Sequential`` of
them, is a stage in the sense of the stage protocol::

    y, ctx = layer.forward(x)
    gx = layer.backward(ctx, gy)             # adds to the parameter gradients
    gx, wctx = layer.backward_input(ctx, gy) # split for zero-bubble schedules
    layer.backward_weight(wctx)              # adds to the parameter gradients
    layer.params(), layer.grads()            # same order, arrays updated in place

The code uses array methods, operators and ufuncs (which CuPy overrides),
so CuPy arrays work too.
"""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np

from .ir import Schedule
from .schedules import _said

__all__ = ["Linear", "Embedding", "Tanh", "ReLU", "Sequential", "Recompute", "mse_loss",
           "mlp_stages", "sgd"]


class Linear:
    """``y = x @ weight + bias``; weight is (fan_in, fan_out); ``x`` is
    (..., fan_in): leading axes (batch, sequence) are rows alike."""

    def __init__(self, fan_in: int, fan_out: int, rng: np.random.Generator | None = None,
                 dtype: Any = np.float64) -> None:
        rng = rng if rng is not None else np.random.default_rng(0)
        scale = 1.0 / np.sqrt(fan_in)
        self.weight = rng.uniform(-scale, scale, (fan_in, fan_out)).astype(dtype)
        self.bias = rng.uniform(-scale, scale, (fan_out,)).astype(dtype)
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = np.zeros_like(self.bias)

    def forward(self, x: Any) -> tuple[Any, Any]:
        return x @ self.weight + self.bias, x

    def backward_input(self, ctx: Any, gy: Any) -> tuple[Any, Any]:
        return gy @ self.weight.T, (ctx, gy)

    def backward_weight(self, wctx: Any) -> None:
        x, gy = wctx
        x, gy = x.reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1])
        self.grad_weight += x.T @ gy
        self.grad_bias += gy.sum(axis=0)

    def backward(self, ctx: Any, gy: Any) -> Any:
        gx, wctx = self.backward_input(ctx, gy)
        self.backward_weight(wctx)
        return gx

    def params(self) -> list[Any]:
        return [self.weight, self.bias]

    def grads(self) -> list[Any]:
        return [self.grad_weight, self.grad_bias]


class Embedding:
    """``y = weight[ids]`` for integer ``ids`` of any shape; weight is
    (num, dim). Its input has no gradient (``backward`` returns None).
    numpy only (the gradient is an ``np.add.at``)."""

    def __init__(self, num: int, dim: int, rng: np.random.Generator | None = None,
                 dtype: Any = np.float64) -> None:
        rng = rng if rng is not None else np.random.default_rng(0)
        self.weight = rng.standard_normal((num, dim)).astype(dtype)
        self.grad_weight = np.zeros_like(self.weight)

    def forward(self, ids: Any) -> tuple[Any, Any]:
        return self.weight[ids], ids

    def backward_input(self, ctx: Any, gy: Any) -> tuple[Any, Any]:
        return None, (ctx, gy)

    def backward_weight(self, wctx: Any) -> None:
        ids, gy = wctx
        np.add.at(self.grad_weight, ids.reshape(-1), gy.reshape(-1, gy.shape[-1]))

    def backward(self, ctx: Any, gy: Any) -> Any:
        self.backward_weight(self.backward_input(ctx, gy)[1])
        return None

    def params(self) -> list[Any]:
        return [self.weight]

    def grads(self) -> list[Any]:
        return [self.grad_weight]


class _Activation:
    """A parameter-free elementwise layer: backward_weight has nothing to do."""

    def forward(self, x: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def backward(self, ctx: Any, gy: Any) -> Any:
        raise NotImplementedError

    def backward_input(self, ctx: Any, gy: Any) -> tuple[Any, Any]:
        return self.backward(ctx, gy), None

    def backward_weight(self, wctx: Any) -> None:
        return None

    def params(self) -> list[Any]:
        return []

    def grads(self) -> list[Any]:
        return []


class Tanh(_Activation):
    def forward(self, x: Any) -> tuple[Any, Any]:
        y = np.tanh(x)
        return y, y

    def backward(self, ctx: Any, gy: Any) -> Any:
        return gy * (1.0 - ctx * ctx)


class ReLU(_Activation):
    def forward(self, x: Any) -> tuple[Any, Any]:
        mask = x > 0
        return x * mask, mask

    def backward(self, ctx: Any, gy: Any) -> Any:
        return gy * ctx


class Sequential:
    """Layers applied in order; a whole pipeline stage."""

    def __init__(self, *layers: Any) -> None:
        self.layers = list(layers)

    def forward(self, x: Any) -> tuple[Any, Any]:
        ctxs = []
        for layer in self.layers:
            x, ctx = layer.forward(x)
            ctxs.append(ctx)
        return x, ctxs

    def backward(self, ctx: Any, gy: Any) -> Any:
        for layer, c in zip(reversed(self.layers), reversed(ctx)):
            gy = layer.backward(c, gy)
        return gy

    def backward_input(self, ctx: Any, gy: Any) -> tuple[Any, Any]:
        """Input gradient through every layer; the weight-gradient inputs are
        kept for ``backward_weight``, which runs later."""
        wctxs = []
        for layer, c in zip(reversed(self.layers), reversed(ctx)):
            gy, w = layer.backward_input(c, gy)
            wctxs.append((layer, w))
        return gy, wctxs

    def backward_weight(self, wctx: Any) -> None:
        for layer, w in wctx:
            layer.backward_weight(w)

    def params(self) -> list[Any]:
        return [p for layer in self.layers for p in layer.params()]

    def grads(self) -> list[Any]:
        return [g for layer in self.layers for g in layer.grads()]


class Recompute:
    """A stage that keeps only its input from its forward to its backward
    and runs its forward again there (activation checkpointing, as a torch
    stage's ``recompute=True``): the memory of its activations traded for
    one more forward. Gradients are those of ``inner`` kept, bit for bit,
    when ``inner``'s forward is deterministic, which is why a Pipeline's
    ``recompute=`` wraps only stages made of engine.layers' own layers
    (``deterministic``) and a stage of your own is wrapped by you::

        stage = Recompute(MyStage(...))     # its forward draws no random numbers

    Everything else (``params``, ``layers``, ``tied``...) is ``inner``'s."""

    recompute = True

    def __init__(self, inner: Any) -> None:
        self.inner: Any = vars(inner)["inner"] if isinstance(inner, Recompute) else inner

    def forward(self, x: Any) -> tuple[Any, Any]:
        y, _ = self.inner.forward(x)
        return y, _Input(x)

    def _again(self, ctx: Any) -> Any:
        return self.inner.forward(ctx.x)[1]

    def backward(self, ctx: Any, gy: Any) -> Any:
        return self.inner.backward(self._again(ctx), gy)

    def backward_input(self, ctx: Any, gy: Any) -> tuple[Any, Any]:
        return self.inner.backward_input(self._again(ctx), gy)

    def backward_weight(self, wctx: Any) -> None:
        self.inner.backward_weight(wctx)

    def params(self) -> list[Any]:
        return self.inner.params()

    def grads(self) -> list[Any]:
        return self.inner.grads()

    def __getattr__(self, name: str) -> Any:
        if name == "inner":         # (not set yet: copy, pickle)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"Recompute({self.inner!r})"


class _Input:
    """A recomputing stage's forward context: only its input."""

    __slots__ = ("x",)

    def __init__(self, x: Any) -> None:
        self.x = x


def deterministic(stage: Any) -> bool:
    """Whether ``stage`` is made of engine.layers' (and engine.tp_layers')
    own layers only, whose forward draws no random numbers, so that it
    recomputes exactly (``Recompute``)."""
    if type(stage).__module__ not in ("engine.layers", "engine.tp_layers"):
        return False
    inner = vars(stage).get("inner")
    parts = list(vars(stage).get("layers", ())) + ([inner] if inner is not None else [])
    return all(deterministic(p) for p in parts)


def mse_loss(y: Any, target: Any) -> tuple[float, Any]:
    """Mean squared error over every element of the micro-batch, and its
    gradient ``2 (y - target) / y.size``. Shapes must match: numpy would
    broadcast a target of (n, 1) over an output of (n, 2) without a word."""
    if tuple(getattr(target, "shape", ())) != tuple(y.shape):
        raise ValueError(f"mse_loss: a target of shape {tuple(getattr(target, 'shape', ()))} "
                         f"for an output of shape {tuple(y.shape)}: they must match")
    diff = y - target
    return float((diff * diff).sum()) / diff.size, diff * (2.0 / diff.size)


def mlp_stages(widths: Sequence[int], num_stages: int, seed: int = 0,
               dtype: Any = np.float64) -> list[Sequential]:
    """A tanh MLP through ``widths`` cut into ``num_stages`` stages, built
    identically on every rank from ``seed``; the last layer is linear.

    ``widths`` has one entry per layer boundary, so ``len(widths) - 1``
    Linear layers, which must be at least ``num_stages``."""
    n_layers = len(widths) - 1
    if isinstance(num_stages, bool) or not isinstance(num_stages, numbers.Integral):
        # (a Schedule: "'<' not supported between instances of 'int' and 'Schedule'")
        raise TypeError(f"mlp_stages: num_stages={_said(num_stages)}: a whole number of stages"
                        + (" (the schedule's: sched.num_stages)"
                           if isinstance(num_stages, Schedule) else ""))
    if num_stages < 1:              # (0: a bare IndexError)
        raise ValueError(f"mlp_stages: num_stages={num_stages}: at least 1")
    if n_layers < num_stages:
        raise ValueError(f"mlp_stages: widths {list(widths)} make {n_layers} Linear layers, "
                         f"too few for {num_stages} stages (a layer each at least)")
    rng = np.random.default_rng(seed)
    layers: list[list[Any]] = [[] for _ in range(num_stages)]
    for i in range(n_layers):
        s = i * num_stages // n_layers
        layers[s].append(Linear(widths[i], widths[i + 1], rng, dtype))
        if i < n_layers - 1:
            layers[s].append(Tanh())
    return [Sequential(*ls) for ls in layers]


def sgd(stages: Sequence[Any], lr: float) -> None:
    """Plain SGD on each stage, then zero its gradients."""
    for stage in stages:
        for p, g in zip(stage.params(), stage.grads()):
            p -= lr * g
            g[...] = 0
