"""In-place changes in a traced graph (engine.traced).

torch.fx records ``h.mul_(2)`` but not that later reads of ``h`` see the
change: ``_kept_changes`` keeps the changes of what the output is computed
from, and ``_changed_spans`` the cuts that would fall between a value and its
change.
"""
from __future__ import annotations

from typing import Any

from .traced_pieces import _ancestors


_VIEWS = {"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "squeeze",
          "unsqueeze", "expand", "expand_as", "narrow", "select", "flatten", "unflatten",
          "t", "mT", "T", "split", "chunk", "unbind", "as_strided", "diagonal", "movedim",
          "swapaxes", "swapdims", "contiguous", "detach", "getitem", "unfold", "real", "imag"}
"""Calls whose result may share its first argument's memory: a change made
in place through it is a change of that argument."""


_AUGMENTED = ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior",
              "ixor", "ilshift", "irshift", "imatmul")
"""The operator module's in-place functions: ``h += x`` traced (Proxy)."""


def _call_name(n: Any) -> str:
    """The name a call node calls (a method's, a function's), else ""."""
    return (n.target if n.op == "call_method" else
            getattr(n.target, "__name__", "") if n.op == "call_function" else "")


def _changes(model: Any, n: Any) -> Any:
    """The value ``n`` changes in place (its first argument: ``h.mul_(2)``,
    ``F.relu(h, inplace=True)``, a module made with ``inplace=True``), or
    None."""
    name = _call_name(n)
    if n.op == "call_module":
        changing = getattr(model.get_submodule(n.target), "inplace", False) is True
    elif n.op == "call_function" and getattr(n.target, "__module__", "") in ("_operator",
                                                                              "operator"):
        changing = name in _AUGMENTED or name == "setitem"  # (and_, or_: a & b changes nothing)
    else:
        changing = n.op.startswith("call_") and (n.kwargs.get("inplace") is True or (
            name.endswith("_") and not name.endswith("__") and name != "_"))
    first = n.args[0] if changing and n.args else None
    return first if hasattr(first, "all_input_nodes") else None


def _kept_changes(model: Any, nodes: list[Any], needed: set[Any], loss: set[Any]) -> set[Any]:
    """The in-place changes (``h.mul_(2)``, ``h.masked_fill_(m, 0)``, a
    buffer's ``self.steps.add_(1)``) of what the output is computed from,
    with what they read. torch.fx records the call but not that later
    reads of ``h`` see the change (they read ``h``'s node): kept by what
    the output reads alone, the pieces dropped it and computed another
    model than the one given, without a word. A change of a value made
    from what the output needs, or of a buffer, is kept, in its place
    (the loss's own, ``loss``, are the loss's)."""
    kept: set[Any] = set()
    again = True
    while again:
        again = False
        for n in nodes:
            if n in needed or n in kept or n in loss:
                continue
            t = _changes(model, n)
            if t is not None and (t.op == "get_attr" or _ancestors([t]) & (needed | kept)):
                kept |= _ancestors([n])
                again = True
    return kept


def _viewed(t: Any) -> list[Any]:
    """``t`` and the values it is a view of (``h[:, 1:]``: it, then ``h``)."""
    chain = [t]
    while True:
        if _call_name(t) not in _VIEWS or not t.args or not hasattr(t.args[0], "all_input_nodes"):
            return chain
        t = t.args[0]
        chain.append(t)


def _changed_spans(model: Any, body: list[Any], pos: dict[Any, int]
                   ) -> tuple[set[int], dict[Any, Any]]:
    """The cuts (before ``body[c]``) that fall between a value and an
    in-place change of it (or of a view of it, ``h[:, 1:].mul_(3)``): the
    next piece would change the tensor it was given, which autograd
    refuses (a leaf that requires grad), or the earlier piece's output.
    And each change's value (the one viewed): a cut just after the change
    may carry it, as it may after the call that made it."""
    held: set[int] = set()
    bases = {}
    for k, n in enumerate(body):
        t = _changes(model, n)
        if t is None or t.op == "get_attr":     # (a buffer: in the piece that reads it)
            continue
        chain = _viewed(t)
        for m in chain:
            held.update(range(pos.get(m, -1) + 1, k + 1))   # (an input: from the start)
        bases[n] = chain[-1]
    return held, bases
