"""A tp rank's own random stream (a plan's ``rng="rank"``) and the shared
one (``rng="shared"``) for the forwards parallelize wraps
(engine.tensor_parallel): the default stream stays in step on every tp rank.
"""
from __future__ import annotations

import threading
from typing import Any


_shared = threading.local()    # .states: the shared stream's, while a rank's own runs


def _generators(torch: Any, x: Any) -> list[Any]:
    """The default generators a forward on ``x`` draws from: the CPU's, and
    its CUDA device's."""
    if not getattr(x, "is_cuda", False):
        return [torch.random.default_generator]
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return [torch.random.default_generator, torch.cuda.default_generators[idx]]


class _Stream:
    """This tp rank's own random numbers (rng="rank") for one forward at a
    time: the forward runs on a generator seeded from the next number of
    torch's default stream (drawn alike on every tp rank, whose programs
    are the same) and the tp rank, Megatron's ``+ 2718 + rank`` offset, and
    the default generator's state is put back after it but for that one
    draw. So the default stream, which replicated activations draw from,
    stays in step on every rank, each rank's masks differ, and a
    recomputation (``torch.utils.checkpoint`` around the module restores the
    default state first) draws the same seed and the same masks again.
    Inside, a submodule planned ``rng="shared"`` (a dropout on the module's
    replicated output) draws from the default stream as it was outside
    (``_on_shared``), and the draws it made count there after. A module
    that draws nothing (``still``: draws_nothing) runs as it is, after the
    one draw (_drawn)."""

    def __init__(self, torch: Any, rank: int, still: bool = False) -> None:
        self.torch, self.rank, self.still = torch, rank, still

    def run(self, fn: Any, x: Any) -> Any:
        torch = self.torch
        if self.still:
            return fn(self._drawn(x))
        draw = int(torch.randint(0, 2**62, (1,)).item())
        seed = (draw + 2718 + self.rank) % 2**63
        gens = _generators(torch, x)
        outermost = getattr(_shared, "states", None) is None
        states = [g.get_state() for g in gens]
        try:
            if outermost:
                _shared.states = states
            for g in gens:
                g.manual_seed(seed)
            return fn(x)
        finally:
            after = _shared.states if outermost else states
            if outermost:
                _shared.states = None
            for g, state in zip(gens, after):
                g.set_state(state)

    def _drawn(self, x: Any) -> Any:
        """``x`` after the default stream's one draw, for a module that
        draws nothing (``still``): its stream is that draw alone, which
        torch.compile traces (not the generators' states: a graph break
        each). In a graph the draw is tied to ``x`` (``where(draw >= 0, x,
        x)``, ``x`` itself), or AOT autograd drops it, unused: the default
        stream one draw behind eager mode's."""
        torch = self.torch
        draw = torch.randint(0, 2**62, (1,))
        if torch.compiler.is_compiling() and isinstance(x, torch.Tensor):
            return torch.where((draw[0] >= 0).to(x.device), x, x)
        return x


_STILL = ("torch.nn.modules.normalization", "torch.nn.modules.batchnorm",
          "torch.nn.modules.instancenorm")


def draws_nothing(module: Any) -> bool:
    """Whether ``module``'s forward draws no random numbers: torch's own
    norms (LayerNorm, RMSNorm, GroupNorm, the batch and instance norms), no
    submodule in them. On a tp rank's own stream such a module's forward
    is its own, and the stream's one draw from the default one
    (_Stream.still)."""
    return type(module).__module__ in _STILL and next(module.children(), None) is None


def _on_shared(torch: Any, fn: Any, x: Any) -> Any:
    """``fn(x)`` on the shared stream (rng="shared" given in the plan): the
    default one, or inside a module on a rank's own stream, the default
    stream as it stood outside, moved on by what ``fn`` draws."""
    shared = getattr(_shared, "states", None)
    if shared is None:
        return fn(x)
    gens = _generators(torch, x)
    own = [g.get_state() for g in gens]
    for g, state in zip(gens, shared):
        g.set_state(state)
    try:
        return fn(x)
    finally:
        _shared.states = [g.get_state() for g in gens]
        for g, state in zip(gens, own):
            g.set_state(state)
