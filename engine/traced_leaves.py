"""What engine.sequential traces and what it calls whole (engine.traced).

``traceable``: whether a model is traced; ``called_whole``: whether a
submodule is a leaf of the trace; ``_items``: how many items a leaf returns
as a tuple; ``_plain``: a forward as torch.fx can trace it.
"""
from __future__ import annotations

import inspect
from typing import Any

__all__ = ["traceable", "called_whole"]


def traceable(model: Any) -> bool:
    """Whether ``model`` is a torch module that ``sequential`` would trace:
    neither an ``nn.ModuleList`` nor an ``nn.Sequential`` (cut as they are,
    their members in order), except a subclass of ``nn.Sequential`` with a
    forward of its own, which may not call them in order."""
    import sys
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(model, torch.nn.Module):
        return False
    if isinstance(model, torch.nn.Sequential):
        return type(model).forward is not torch.nn.Sequential.forward
    return not isinstance(model, torch.nn.ModuleList)


def _holds_layers(m: Any) -> bool:
    """Whether ``m`` holds a list of layers, itself or in a submodule of
    its own (torch's ``nn.Transformer``: its encoder's and decoder's)."""
    from torch import nn
    return isinstance(m, nn.Sequential) or any(
        isinstance(c, (nn.ModuleList, nn.Sequential, nn.ModuleDict)) or _holds_layers(c)
        for c in m.children())


def called_whole(model: Any, name: str) -> bool:
    """Whether submodule ``name`` of ``model`` is called as a module when
    its traced pieces run (it, or a module holding it, is a leaf of the
    trace: a member of a list of layers, or a module holding none), not
    run through by the trace (a module holding the list of layers)."""
    from torch import nn
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        parent = model.get_submodule(".".join(parts[:i - 1]))
        m = model.get_submodule(".".join(parts[:i]))
        if isinstance(parent, (nn.ModuleList, nn.Sequential)) or not _holds_layers(m):
            return True
    return False


def _items(m: Any) -> int | None:
    """How many items a module without parameters or submodules (a leaf
    of the trace: called whole) returns as a tuple or a list, found by
    tracing its own forward (buffers as proxies: nothing changes); None
    where it returns something else or cannot be traced (what its forward
    sets on the module, a cache, is put back). Modules with
    parameters are layers, whose outputs the model's code takes apart
    itself where it must."""
    import torch.fx as fx
    if next(m.parameters(), None) is not None or next(m.children(), None) is not None:
        return None

    class Quiet(fx.Tracer):
        proxy_buffer_attributes = True

    kept, buffers = dict(vars(m)), dict(m._buffers)
    try:
        graph = Quiet().trace(m)
    except Exception:
        return None
    finally:        # what its forward set on itself, a proxy among it, put back
        vars(m).clear()
        vars(m).update(kept)
        m._buffers.clear()
        m._buffers.update(buffers)
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    return len(out) if isinstance(out, (tuple, list)) else None


def _plain(fn: Any) -> Any:
    """``fn`` (a forward) as torch.fx can trace it: itself, or where it has
    ``*args``, ``**kwargs`` or keyword-only parameters, or is a decorator's
    wrapper (``functools.wraps``: Hugging Face's ``@can_return_tuple``), a
    function of the innermost one's parameters, each a plain one, that calls
    ``fn`` with them (``*args`` and ``**kwargs`` empty). fx reads the
    parameters off the innermost function (``inspect.unwrap``) but rewrites
    the code of the one it calls to take ``*args`` and ``**kwargs`` as
    plain parameters: a wrapper's own ``(*args, **kwargs)`` could not hold
    them ("code: co_varnames is too small"), and ``**kwargs`` traced as a
    value ("Proxy object cannot be iterated") failed every forward that
    passes it on to its submodules."""
    inner = inspect.unwrap(fn)
    flags = inner.__code__.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS)
    if inner is fn and not flags and not inner.__code__.co_kwonlyargcount:
        return fn
    ps = [q for q in inspect.signature(inner).parameters.values()
          if q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)]
    names = [q.name for q in ps]
    passed = [q.name if q.kind != q.KEYWORD_ONLY else f"{q.name}={q.name}" for q in ps]
    ns: dict[str, Any] = {}     # (its globals the forward's own, for fx's autowrap)
    exec(f"def make(_engine_forward_):\n def forward({', '.join(names)}):\n"  # noqa: S102
         f"  return _engine_forward_({', '.join(passed)})\n return forward",
         inner.__globals__, ns)
    forward = ns["make"](fn)
    forward.__annotations__ = {k: v for k, v in getattr(inner, "__annotations__", {}).items()
                               if k in names}
    return forward
