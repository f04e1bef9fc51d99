"""The watch on a colwise output cut in one piece (engine.tensor_parallel):
a tensor subclass that raises where the code that called the module cuts
its features into blocks or mixes them (a fused projection planned
without ``parts``), follows them through views, draws a dropout on them
from the tp rank's own stream, takes ``F.cross_entropy`` of them on the
shards (a head's logits sharded over the vocabulary: engine.tp_loss) and
refuses any other loss, and names the module the plan left whole where
one meets them; and what a pipeline sends so that the next stage watches
it too.
"""
from __future__ import annotations

import copy
import functools
import sys
import weakref
from typing import Any

from .tp_plan import PlanError, Style, fed_whole
from .torch_stage import _torch
from .tp_rng import _Stream, _shared
from .tp_checks import is_conv1d
from .tp_axes import (_CUTS, _MOVES, _VIEWS, _contracted, _cut_at, _index_at, _mixed_at,
                      _over_all, _regroup)
from .tp_watched_loss import LOSSES, watched_loss
from .tp_record import _Meta


def _watch_blocks(y: Any, meta: _Meta, axis: int = -1, unit: int | None = 1,
                  width: int | None = None) -> Any:
    """A colwise output cut in one piece (no ``parts``), which raises where
    the code that called the module cuts its features apart (``split``,
    ``chunk``, ``unbind``, ``narrow``, ``glu``, a slice ``y[..., :n]``): that
    is a fused projection (nanoGPT's ``c_attn`` split into q, k and v, a
    SwiGLU's ``w12`` chunked into gate and up), whose contiguous shard holds
    all of q and half of k on one rank, the rest on the other; each rank
    then attended (or gated) with the wrong blocks, and no error was raised.
    So does a function that mixes the values along that axis (a softmax or
    a sum over it, ``q @ k.transpose(-1, -2)`` or an ``einsum`` contracting
    it on a single head): on the shard, it gave each rank a result of its
    own part of the features.

    The watch follows the features through views of the output: a reshape
    that splits their axis leaves this rank's part on the first new axis,
    the others whole (``view(B, T, heads, hd)``: this rank's heads, each
    head's ``hd`` features all there); a permute or a transpose moves that
    axis, a merge (``reshape(B, T, -1)``) joins it again. A cut or a mix
    of the axis holding this rank's part raises as on the output itself:
    timm's ``qkv(x).reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)``,
    then ``unbind(0)``, cuts the axis of size 3, which on a rank holds
    [q; k; v]'s part of that rank (at tp=2, all of q, then half of k), not
    q, k and v: the same silent wrong result until the thirty-eighth
    session. One over another axis passes (a rotary half of ``hd``, the
    per-head ``[q, k, v]`` of ``view(B, T, heads, 3, hd)``, the heads of
    ``q @ k.transpose(-1, -2)``), and is watched on. ``axis`` is where
    the features are, from the end; ``unit``, how many of them one step
    along it holds (None: not known); ``width``, the output's own.

    A function of each value alone (an activation) passes the watch on to
    its result; a dropout there (T5's between ``wi`` and ``wo``) draws from
    this tp rank's own stream (rng="rank"), as Megatron's does in a tp
    region."""
    narrow = y.as_subclass(_READY[0] if _READY else _blocks_class())
    narrow._tp_meta, narrow._tp_axis, narrow._tp_unit = meta, axis, unit
    narrow._tp_width = y.shape[-1] if width is None else width
    return narrow


def watch_of(v: Any) -> dict[str, Any] | None:
    """What a pipeline sends beside a watched colwise output (_watch_blocks)
    so that the next stage's rank watches it too: its module's name and
    where its features are; None for any other value."""
    meta = getattr(v, "_tp_meta", None)
    if meta is None:
        return None
    return {"name": meta.name, "axis": v._tp_axis, "unit": v._tp_unit, "width": v._tp_width}


def rewatched(v: Any, watch: dict[str, Any], group: Any) -> Any:
    """``v``, received from the previous stage, watched again as the colwise
    output ``watch`` (watch_of) told of, over this rank's tp ``group`` (the
    sender's peers' equal): a layer the plan leaves whole at the top of this
    stage raises the PlanError naming both layers and the fix, as it does
    in one stage (it was torch's shape error alone), and a cut or a dropout
    there is watched as it is there."""
    meta = _Meta(watch["name"], Style("colwise"), group, {})
    return _watch_blocks(v, meta, watch["axis"], watch["unit"], watch["width"])


def _followed(torch: Any, func: Any, args: Any, kwargs: Any, out: Any) -> Any:
    """``out`` (a view of ``args[0]``, a piece of it cut along another
    axis than its features') watched where ``args[0]``'s features went in
    it; ``out`` as it is where that cannot be told (the watch stops)."""
    name, x = getattr(func, "__name__", ""), args[0]
    a, unit, ndim = x._tp_axis % x.dim(), x._tp_unit, x.dim()
    where: int | None = None
    if isinstance(out, (tuple, list)) and name in _CUTS:       # split, chunk, unbind
        if name == "unbind":
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0) % ndim
            a -= dim < a
        return type(out)(_watch_blocks(o, x._tp_meta, a - o.dim(), unit, x._tp_width)
                         for o in out)
    if name == "__iter__":                                     # q, k, v = t: unbind(0)
        if a == 0:
            return out
        return iter([_watch_blocks(o, x._tp_meta, a - 1 - o.dim(), unit, x._tp_width)
                     for o in out])
    if not isinstance(out, torch.Tensor):
        return out
    if name in _VIEWS and out.numel() == x.numel():
        got = _regroup(tuple(x.shape), tuple(out.shape), a, unit)
        if got is not None:
            where, unit = got
    elif name in _MOVES and out.dim() == ndim:
        probe = torch.empty([2 if d == a else 1 for d in range(ndim)])
        where = list(func(probe, *args[1:], **kwargs).shape).index(2)
    elif name == "unsqueeze":
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0) % out.dim()
        where = a + (dim <= a)
    elif name == "squeeze":
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        dims = range(ndim) if dim is None else dim if isinstance(dim, (tuple, list)) else (dim,)
        gone = {d % ndim for d in dims if x.shape[d] == 1}
        where = None if a in gone else a - sum(d < a for d in gone)
    elif name == "__getitem__":
        where = _index_at(torch, args[1], ndim, a)[1]
    elif name in ("narrow", "glu"):
        where = a
    if where is None:
        return out
    return _watch_blocks(out, x._tp_meta, where - out.dim(), unit, x._tp_width)


# functions of each value alone, whose result is the same rank's part of the
# features (watched further: an activation, then a dropout or a cut)
_ELEMENTWISE = frozenset((
    "gelu", "relu", "relu_", "silu", "tanh", "sigmoid", "mish", "softplus", "leaky_relu",
    "elu", "selu", "hardswish", "hardsigmoid", "hardtanh", "relu6", "exp", "neg", "__neg__",
    "abs", "square", "pow", "__pow__", "sqrt", "rsqrt", "mul", "__mul__", "__rmul__", "add",
    "__add__", "__radd__", "sub", "__sub__", "__rsub__", "div", "__truediv__",
    "__rtruediv__", "dropout", "alpha_dropout", "contiguous", "clone", "float", "to",
    "type_as"))


# those of them with two operands, either of which may be the watched one
_ARITHMETIC = frozenset(("mul", "__mul__", "__rmul__", "add", "__add__", "__radd__", "sub",
                         "__sub__", "__rsub__", "div", "__truediv__", "__rtruediv__"))


def _drops(args: Any, kwargs: Any) -> bool:
    """Whether a dropout call (F.dropout's keywords, or torch.dropout's
    positions) drops anything, outside a module on a tp rank's own stream."""
    p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
    train = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else True))
    return bool(train) and p > 0 and getattr(_shared, "states", None) is None


def _flat(x: Any) -> bool:
    """Whether a watched tensor's features are on its last axis, one a step."""
    return x._tp_axis % x.dim() == x.dim() - 1 and x._tp_unit == 1


def _where(x: Any) -> str:
    """The axis holding a watched tensor's features, as an error names it."""
    a = x._tp_axis % x.dim()
    if _flat(x):
        return "its output's last axis"
    return (f"axis {a} (where its output's features went) of the {tuple(x.shape)} tensor "
            f"its code made of that output (a view, a reshape or a permute of it)")


@functools.cache
def _blocks_class() -> Any:
    torch = _torch()

    class ColwiseOutput(torch.Tensor):  # type: ignore[name-defined,misc]
        """A colwise module's output, a contiguous part of its features,
        whose features may not be cut into blocks nor mixed, and whose
        dropout draws this rank's own masks (_watch_blocks)."""

        def __deepcopy__(self, memo: dict[int, Any]) -> Any:
            """A copy, watched as this one (torch's own deepcopy of a
            subclass failed: engine.distribute copies a last stage's output
            to time its loss on)."""
            plain = copy.deepcopy(self.as_subclass(torch.Tensor), memo)
            return _watch_blocks(plain, self._tp_meta, self._tp_axis, self._tp_unit,
                                 self._tp_width)

        @classmethod
        def __torch_function__(cls, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            first = bool(args) and type(args[0]) is cls
            name = getattr(func, "__name__", "")
            if name in LOSSES:          # cross entropy on the shards; any other, refused
                x = next((a for a in (*args, *kwargs.values()) if type(a) is cls), None)
                if x is not None:       # (its collectives eager under torch.compile)
                    loss = _READY[1] if torch.compiler.is_compiling() and _READY else \
                        watched_loss
                    return loss(func, args, kwargs, x)
            with torch._C.DisableTorchFunctionSubclass():
                if first and name in ("dropout", "alpha_dropout") and _drops(args, kwargs):
                    # this rank's features: masks of its own (Megatron's tp region
                    # dropout); on the default stream every rank drew the same mask
                    # for its part, feature j dropped with feature j + n/tp
                    drop = _READY[2] if torch.compiler.is_compiling() and _READY else \
                        _own_dropout
                    out = drop(func, args, kwargs)
                else:
                    try:
                        out = func(*args, **kwargs)  # a plain tensor: the watch stays here
                    except RuntimeError as e:
                        _unplanned_consumer(cls, func, args, e)
                        raise
                x = args[0] if first else args[1] if len(args) > 1 and type(
                    args[1]) is cls and name in _ARITHMETIC else None
                if x is not None and name in _ELEMENTWISE:   # still this rank's part
                    ax = x._tp_axis
                    if isinstance(out, torch.Tensor) and out.dim() >= x.dim() and \
                            out.shape[ax] == x.shape[ax]:
                        return _watch_blocks(out, x._tp_meta, ax, x._tp_unit, x._tp_width)
                    return out
                sizes, mixed = None, _contracted(cls, func, args)
                if mixed is None and first:
                    x = args[0]
                    sizes = _cut_at(torch, func, args, kwargs, out)
                    if sizes is None and _mixed_at(func, args, kwargs):
                        mixed = x
                    elif sizes is None:
                        return _followed(torch, func, args, kwargs, out)
                elif mixed is None:
                    return out
                x = mixed if mixed is not None else x
                assert x is not None        # (a mix, or a cut of args[0]'s features)
                meta, full, flat = x._tp_meta, x.shape[x._tp_axis], _flat(x)
            tp, fname = meta.group.size, getattr(func, "__name__", func)
            if mixed is not None:
                held = f"{full} of {full * tp}{' features' if flat else ''} (colwise)"
                fix = "cut that axis into heads first (a view)" if flat else \
                    "leave that axis out of it (a batch axis, as the heads' to an attention)"
                where = _where(x)
                if x is args[0] and _over_all(func, args, kwargs):
                    where, fix = f"every axis, {where} among them", "name another axis (dim=)"
                raise PlanError(
                    f"tp rank {meta.group.rank}: {meta.name}: the code calling it takes "
                    f"{fname}() over {where}, of which this rank holds {held}: a result "
                    f"of this rank's part only, another on each rank, with no error; give "
                    f"{meta.name} output 'replicate' ({{'style': 'colwise', 'output': "
                    f"'replicate'}}: its output whole), or {fix}")
            assert sizes is not None
            width, unit = x._tp_width, x._tp_unit
            guess = len(sizes) if len(set(sizes)) == 1 else \
                tuple(n * unit * tp for n in sizes) if unit else len(sizes)
            blocks = "" if flat else (
                " (its blocks made an axis of their own, as timm's qkv(x).reshape(B, N, 3, "
                "heads, hd) then unbind(0) after a permute: here that axis holds this rank's "
                "part of them all, not a block a step)")
            raise PlanError(
                f"tp rank {meta.group.rank}: {meta.name}: the code calling it cuts "
                f"{_where(x)} into {len(sizes)} pieces ({fname}: "
                f"{sizes} of this rank's {full}{' features' if flat else ''}), but its plan "
                f"entry (colwise) shards that axis in one piece over tp={tp}: a fused "
                f"projection ([q; k; v], a SwiGLU's gate and up){blocks} would mix its "
                f"blocks across the ranks, a wrong result; plan it {{'style': 'colwise', "
                f"'parts': {guess!r}}} (the count of equal blocks, or their sizes in its "
                f"{width * tp} output features) and rewrite the sizes its caller cuts by "
                f"for tp (attrs)" + ("" if flat else "; or, if that axis holds heads that "
                "the code takes one by one (right on the shard), plan it {'style': "
                "'colwise', 'parts': 1}: one block, its cuts not watched"))

    return ColwiseOutput


def _own_dropout(func: Any, args: Any, kwargs: Any) -> Any:
    """A dropout of a watched tensor ``args[0]`` on its tp rank's own stream."""
    torch = _torch()
    stream = _Stream(torch, args[0]._tp_meta.group.rank)
    with torch._C.DisableTorchFunctionSubclass():
        return stream.run(lambda v: func(v, *args[1:], **kwargs), args[0])


def _uncompiled(torch: Any, cls: Any) -> None:
    """Have torch.compile run each function of a ``cls`` tensor that a
    compiled function is given (an input of its graph: a compiled loss of
    a compiled model's logits) eagerly, a graph break each, through its
    ``__torch_function__``: traced, the watch was not (a cross entropy of
    vocab-sharded logits under a compiled loss failed in AOT autograd; a
    view of them, left plain in the graph, lost the watch). One made in the
    traced code (watched) is traced, its ``__torch_function__`` too."""
    never = getattr(torch._dynamo.config, "nontraceable_tensor_subclasses", None)
    if never is not None:
        never.add(cls)


_READY: list[Any] = []
"""What torch.compile meets when it traces a colwise output's watch, made
by _ready: the ColwiseOutput class, and watched_loss and _own_dropout as
it runs them, eagerly (a graph break each: their collectives and random
streams are meshrun's). Dynamo traced the code that makes them (a class
statement, a graph break)."""


def _ready() -> bool:
    """Make _READY, once, as dynamo calls it while it traces a watch: not
    traced (torch.compiler.assume_constant_result's mark, set here without
    the second it takes to import dynamo where nothing is compiled)."""
    torch = _torch()
    if not _READY:
        _READY.extend((_blocks_class(), torch.compiler.disable(watched_loss),
                       torch.compiler.disable(_own_dropout)))
    _uncompiled(torch, _READY[0])
    return True


setattr(_ready, "_dynamo_marked_constant", True)


def watched(torch: Any, y: Any, meta: _Meta) -> Any:
    """``_watch_blocks(y, meta)``, a colwise module's output watched, under
    torch.compile too: the compiled model returned its logits plain, and
    the user's ``F.cross_entropy`` of them took this rank's part of the
    vocabulary for the whole (a wrong loss, or an IndexError for a target
    of another rank). There dynamo traces the watch (ColwiseOutput's
    ``__torch_function__``: its checks run as it traces, on the shapes, and
    leave nothing in the graph) but for a loss of it or a dropout on the
    rank's own stream, which run eagerly (a graph break each); a compiled
    model returns the watched tensor."""
    if not torch.compiler.is_compiling():
        if "torch._dynamo" in sys.modules:    # (a compiled loss may meet it: not imported
            _uncompiled(torch, _blocks_class())    # for it, a second or so)
        return _watch_blocks(y, meta)
    _ready()
    return _watch_blocks(y, meta)


_NAMES: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
"""Each submodule of a module parallelize sharded, and its name there."""


def _consumer(torch: Any) -> Any:
    """The innermost module whose forward is running (a frame of its
    ``forward``, or of a sharded one's wrapped ``_forward``), or None."""
    f: Any = sys._getframe(2)
    while f is not None:
        if f.f_code.co_name in ("forward", "_forward"):
            m = f.f_locals.get("self")
            if isinstance(m, torch.nn.Module):
                return m
        f = f.f_back
    return None


def _unplanned_consumer(cls: Any, func: Any, args: Any, e: RuntimeError) -> None:
    """Raise a PlanError where ``func`` failed on a colwise output in a module
    the plan left whole (a Linear or a LayerNorm after a colwise Linear, its
    "rowwise" forgotten): its whole weights met this rank's part of the
    features, and torch's shape error named neither (``mat1 and mat2 shapes
    cannot be multiplied (2x4 and 8x2)``). Return where it is not that."""
    torch = _torch()
    x = next((a for a in args if type(a) is cls), None)
    if x is None:
        return
    meta: _Meta = x._tp_meta
    m = _consumer(torch)
    if m is None or hasattr(m, "_tp"):     # a planned module's own error: as it is
        return
    name = _NAMES.get(m)
    what = f"{name} ({type(m).__name__})" if name else f"a {type(m).__name__}'s forward"
    tp, full = meta.group.size, x.shape[x._tp_axis]
    raise PlanError(fed_whole(
        meta.group.rank, meta.name, full, tp, what,
        f"{getattr(func, '__name__', func)}() raised {type(e).__name__}: {e}",
        name if name and (isinstance(m, torch.nn.Linear) or is_conv1d(m)) else "")) from e
