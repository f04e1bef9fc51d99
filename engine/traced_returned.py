"""What a traced forward returns around its output (engine.traced).

A forward returning a dict, a dataclass (Hugging Face's ``ModelOutput``), a
named tuple, a tuple or a list: ``_leaves`` finds its fx Nodes, ``_returned``
records its shape without them (it pickles), and ``given_as_returned`` gives a
``loss_fn`` written for one process's model the last stage's output in that
shape.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

__all__ = ["given_as_returned"]


def _leaves(out: Any) -> list[Any]:
    """The fx Nodes of a forward's returned structure, in order: a
    dataclass's fields as a dict's values (Hugging Face's ``ModelOutput``,
    which torch.fx records as a call making it; it was taken for the
    output tensor, and the last stage handed the loss a dataclass; a named
    tuple's likewise)."""
    import torch.fx as fx
    if isinstance(out, fx.Node) and _made(out):
        return [n for o in (*out.args, *out.kwargs.values()) for n in _leaves(o)]
    if isinstance(out, fx.Node):
        return [out]
    if isinstance(out, (tuple, list)):
        return [n for o in out for n in _leaves(o)]
    if isinstance(out, dict):
        return [n for o in out.values() for n in _leaves(o)]
    return []


def _made(node: Any) -> bool:
    """Whether an fx Node makes the class the forward returns its outputs
    in: a dataclass (Hugging Face's ``ModelOutput``) or a named tuple
    (``Out(logits=y, loss=None)``, which fx records as a call of its class:
    it was taken for the output tensor, and the step failed on the tuple)."""
    t = node.target
    return node.op == "call_function" and isinstance(t, type) and (
        dataclasses.is_dataclass(t) or (issubclass(t, tuple) and hasattr(t, "_fields")))


def _returned(out: Any, end: Any) -> Any:
    """A function giving, for the last piece's output, what the forward
    returns around it (a dict, a dataclass, Hugging Face's ``ModelOutput``,
    a tuple or a list: the output the loss is written for, ``o["logits"]``,
    ``o.logits``, ``o[0]``; its other items as the trace left them: None),
    or None where the forward returns that tensor itself. A ``loss_fn``
    written for one process's model is given it (it was given the bare
    tensor, and ``o.logits`` raised on the last stage at the first step).
    It pickles (a stage carrying it, engine.partition's last, saves with
    ``torch.save``): the trace's nodes are left out of it."""
    import torch.fx as fx
    if out is end:
        return None

    def shape(o: Any) -> Any:
        if isinstance(o, fx.Node):
            if _made(o):
                assert isinstance(o.target, type)
                return _Made(o.target, tuple(shape(a) for a in o.args),
                             {k: shape(v) for k, v in o.kwargs.items()})
            return _Output()                # (the one tensor: _leaves found no other)
        if isinstance(o, tuple):        # (a named tuple as itself)
            items = [shape(a) for a in o]
            return type(o)(*items) if hasattr(o, "_fields") else tuple(items)
        if isinstance(o, list):         # (fx's immutable_list)
            return [shape(a) for a in o]
        if isinstance(o, dict):         # (fx's immutable_dict)
            return {k: shape(v) for k, v in o.items()}
        return o

    return _Returned(shape(out))


class _Output:
    """Where the last piece's output goes in what the forward returns."""


@dataclasses.dataclass(frozen=True)
class _Made:
    """A dataclass (Hugging Face's ``ModelOutput``) or a named tuple the
    forward returns: its
    class and its arguments' shapes."""
    cls: type
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class _Returned:
    """``_returned``'s function: the forward's return value's shape, filled
    in with the last piece's output ``y``."""
    shape: Any

    def __call__(self, y: Any) -> Any:
        return _fill(self.shape, y)


def _fill(o: Any, y: Any) -> Any:
    if isinstance(o, _Output):
        return y
    if isinstance(o, _Made):
        return o.cls(*[_fill(a, y) for a in o.args],
                     **{k: _fill(v, y) for k, v in o.kwargs.items()})
    if isinstance(o, tuple):
        items = [_fill(a, y) for a in o]
        return type(o)(*items) if hasattr(o, "_fields") else tuple(items)
    if isinstance(o, list):
        return [_fill(a, y) for a in o]
    if isinstance(o, dict):
        return {k: _fill(v, y) for k, v in o.items()}
    return o


def given_as_returned(loss_fn: Callable[[Any, Any], Any], returned: Callable[[Any], Any]
                      ) -> Callable[[Any, Any], Any]:
    """``loss_fn`` given the last stage's output as the traced forward
    returns it (a dict, a dataclass, a tuple: ``returned``, _returned's,
    the ``.returned`` of engine.sequential's Sequential and of
    engine.partition's last stage), as one process's ``loss_fn(model(x),
    y)`` is: engine.distribute's (and the Pipeline's of a partition) got
    the bare tensor until the forty-second session, and ``o.logits`` or
    ``o["logits"]`` raised at the first step, ``o[0]`` took the first row."""
    @functools.wraps(loss_fn)
    def loss(output: Any, target: Any) -> Any:
        return loss_fn(returned(output), target)
    return loss
