"""``sequential``: a torch model's forward traced by torch.fx and cut into
an ``nn.Sequential`` of pieces (engine.traced's module docstring says how).

The tracer's helpers that look at the stack (``_model_frame``,
``_asserting``, ``_branch_at``, ``_line_of``) skip this module's own frames
(``__file__``): what runs inside the trace from here (the tracer,
``_sizes_packed``'s factories, ``_stack_forward``'s loops) stays in this
module.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
from typing import Any

from .traced_cuts import _loop_steps, _output, _tensor_valued
from .traced_inplace import _AUGMENTED, _changed_spans, _kept_changes
from .traced_leaves import _holds_layers, _items, _plain
from .traced_modes import _autocast, _detach_no_grad, _NO_GRAD, _read_mode
from .traced_pieces import _ancestors, _has_params, _inputs, _piece, _with_attrs
from .traced_returned import _leaves, _returned
from .traced_sizes import _AGAIN, _bake_sizes, _evaluate, _inputs_at

__all__ = ["sequential"]


_TARGETS = ("targets", "target", "labels", "label", "y")   # the target's usual names


_PACKED = ("ones", "zeros", "empty", "rand", "randn")
"""torch's factories that take a size as several arguments (``torch.ones(T, T)``)."""


@contextlib.contextmanager
def _sizes_packed() -> Any:
    """While fx traces: torch's factories given sizes one by one, some of
    them traced (``torch.tril(torch.ones(T, T))``, a causal mask made from
    the input's length), are given them as one tuple, as they run: torch
    takes traced sizes in a tuple only, and ``ones() takes 1 positional
    argument but 2 were given`` failed every forward making one."""
    import torch
    import torch.fx as fx
    kept = {name: getattr(torch, name) for name in _PACKED}

    def packed(f: Any) -> Any:
        @functools.wraps(f)
        def call(*size: Any, **kwargs: Any) -> Any:
            if len(size) > 1 and any(isinstance(n, fx.Proxy) for n in size):
                return f(size, **kwargs)
            return f(*size, **kwargs)
        return call
    try:
        for name, f in kept.items():
            setattr(torch, name, packed(f))
        yield
    finally:
        for name, f in kept.items():
            setattr(torch, name, f)


def _model_frame() -> Any:
    """The frame of the model's own code that asked torch.fx for the truth of
    a traced value: the first one out of torch.fx and this module; None
    where there is none."""
    fx_dir = os.path.dirname(sys.modules["torch.fx"].__file__ or "")
    frame: Any = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith(fx_dir)
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return frame


def _asserting() -> str | None:
    """Where the model's code tests a traced value in an ``assert`` (the
    frame outside torch.fx that asks for the truth of a proxy, at a jump
    whose fall-through raises AssertionError: nanoGPT's ``assert t <=
    block_size``), as ``file:line``; None for any other test (an ``if``,
    which the trace cannot follow)."""
    import dis
    frame = _model_frame()
    if frame is None:
        return None
    at = frame.f_lasti * (2 if sys.version_info < (3, 11) else 1)   # (3.10: instructions)
    insts = list(dis.get_instructions(frame.f_code))
    for i, inst in enumerate(insts[:-1]):
        if inst.offset == at:
            nxt = insts[i + 1]
            if nxt.opname == "LOAD_ASSERTION_ERROR" or (
                    nxt.opname == "LOAD_GLOBAL" and nxt.argval == "AssertionError"):
                return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
            return None
    return None


def _branch_at() -> str:
    """Where the model's code branches on a traced value (``file:line``), as
    _asserting finds its frame; '' where it cannot tell."""
    frame = _model_frame()
    if frame is None:
        return ""
    return f"at {os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


def _line_of(e: BaseException) -> str:
    """Where the model's own code raised ``e`` while torch.fx traced it (the
    last frame outside torch and this module): ``", at model.py:40: assert
    t <= block_size"``, or "" when there is none; and the line of torch's
    own module code it called that raised, where there is one (a torch
    module's checks of its input): the model's line alone, which calls the
    module, holds no control flow."""
    import traceback
    torch_dir = os.path.dirname(sys.modules["torch"].__file__ or "")
    frames = traceback.extract_tb(e.__traceback__)
    own = [i for i, f in enumerate(frames)
           if not f.filename.startswith(torch_dir) and f.filename != __file__]
    if not own:
        return ""
    f = frames[own[-1]]
    modules = os.path.join(torch_dir, "nn", "modules")
    inner = [g for g in frames[own[-1] + 1:] if g.filename.startswith(modules)]
    within = (f", inside torch's {inner[-1].name}() at {os.path.basename(inner[-1].filename)}"
              f":{inner[-1].lineno}: {(inner[-1].line or '').strip()}" if inner else "")
    return (f", at {os.path.basename(f.filename)}:{f.lineno}: {(f.line or '').strip()}"
            f"{within}")


def _stack_forward(m: Any) -> Any:
    """A forward torch.fx can trace for torch's own ``nn.TransformerEncoder``
    and ``nn.TransformerDecoder`` (None for any other module). Theirs test
    the input's shape (``src.dim() != 3``, for the fast path of inference),
    control flow on a traced value that failed every model holding one,
    then call each layer with the masks they were given, and the norm:
    that loop, recorded here, is what the pieces run, so their layers can
    be cut apart. The masks go to the layers as given (a causal mask
    without ``is_causal=True`` is used as a mask: the same values), and
    inference keeps each layer's own fast path but not the encoder's
    nested tensors for a padding mask (the padded positions' outputs are
    computed, not zeros; the others the same)."""
    from torch import nn
    if type(m).forward is nn.TransformerEncoder.forward:
        def encoder(src: Any, mask: Any = None, src_key_padding_mask: Any = None,
                    is_causal: Any = None) -> Any:
            for layer in m.layers:
                src = layer(src, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                            is_causal=bool(is_causal))
            return src if m.norm is None else m.norm(src)
        return encoder
    if type(m).forward is nn.TransformerDecoder.forward:
        def decoder(tgt: Any, memory: Any, tgt_mask: Any = None, memory_mask: Any = None,
                    tgt_key_padding_mask: Any = None, memory_key_padding_mask: Any = None,
                    tgt_is_causal: Any = None, memory_is_causal: bool = False) -> Any:
            for layer in m.layers:
                tgt = layer(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask,
                            tgt_is_causal=bool(tgt_is_causal),
                            memory_is_causal=memory_is_causal)
            return tgt if m.norm is None else m.norm(tgt)
        return decoder
    return None


def sequential(model: Any, target: bool | str = False, inputs: int = 1,
               sample: Any = None) -> Any:
    """``model``'s forward as an ``nn.Sequential`` of pieces of its traced
    graph (module docstring); with ``target`` its ``.loss(output, target)``
    is the forward's own loss, else ``.loss`` is None. ``target=True``
    traces as the target the parameter named targets, target, labels,
    label or y, else the one after the inputs; a string names it.
    ``inputs``: how many of the forward's first parameters (the target
    aside) are inputs: with more than one (``forward(input_ids,
    attention_mask, labels)``) the first piece takes them as one tuple,
    as a pipeline's first stage gets ``step((ids, mask), labels)``.
    ``sample``: the inputs (a tensor, or a tuple of them): an ``if`` on a
    value computed from their shapes alone (Hugging Face's mask code, ``if
    q_length == kv_length``), which the trace cannot follow, is decided by
    the sample's shapes and checked as each step runs (an AssertionError
    naming the line where a step's inputs decide otherwise)."""
    from torch import nn
    if hasattr(model, "_orig_mod"):
        raise TypeError(
            f"torch.compile(model) gives an {type(model).__name__}, a compiled whole that "
            f"cannot be cut into stages: pass the model itself "
            f"({type(model._orig_mod).__name__}, its ._orig_mod) and compile its blocks "
            f"in their places instead (model.blocks[i] = torch.compile(model.blocks[i]))")
    what = f"{type(model).__name__}.forward"
    way = ("pass an nn.Sequential, or a list of the model's layers in the order they run "
           "(a layer may be a module or a function of one tensor)")
    params, tgt_param, traced, concrete = _parameters(model, target, inputs, what, way)
    shaped = ([] if sample is None else list(sample) if isinstance(sample, tuple)
              else [sample])
    decided: list[str] = []             # where a branch was decided by the sample's shapes
    autocast: list[Any] = []            # nodes made under the forward's own autocast
    graph, other = _traced(model, _tracers(model, tgt_param, shaped, decided, autocast),
                           concrete, what, way)
    _read_mode(graph, other, model.training, what)      # (before nodes are added)
    _detach_no_grad(graph)
    baked = _bake_sizes(model, graph, tgt_param, shaped) if shaped else 0
    if autocast:
        import warnings
        warnings.warn(f"engine.sequential: {what} computes part of its output under "
                      f"torch.autocast, which torch.fx does not record: the pieces compute "
                      f"it in the dtypes they are given (float32 where the model ran "
                      f"bfloat16 or float16); cast in the model's code (.to(dtype)) to keep "
                      f"them", stacklevel=2)
    nodes = list(graph.nodes)
    phs = [n for n in nodes if n.op == "placeholder"]
    by_name = {n.target: n for n in phs}
    ins = [by_name.get(q.name, phs[i]) for i, q in enumerate(traced)]
    returned = next(n for n in nodes if n.op == "output").args[0]
    out = _leaves(returned)
    loss = None
    of_loss: set[Any] = set()           # the nodes the forward's own loss computes from
    if target:
        assert tgt_param is not None
        tgt = by_name.get(tgt_param.name, phs[min(len(phs) - 1, params.index(tgt_param))])
        loss, end, of_loss = _own_loss(model, nodes, out, ins, tgt, tgt_param, traced, what)
    else:
        if len(out) != 1:
            raise TypeError(f"{what} returns {len(out)} tensors (a tuple, a list or a "
                            f"dict); a pipeline's last stage returns one: make the forward "
                            f"return the output the loss reads (the loss given as "
                            f"loss_fn=), or {way}")
        end = out[0]
    body = _body(model, nodes, ins, end, of_loss, traced, what, way)
    seq = nn.Sequential(*_pieces(model, body, _crossings(model, nodes, body, ins)))
    object.__setattr__(seq, "loss", loss)       # not a submodule: the layers are the pieces
    object.__setattr__(seq, "traced_from", type(model).__name__)
    # whether the pieces hold what the sample's shapes decided (sizes, branches): a job
    # traces the model again for inputs of other shapes (Reshaped)
    object.__setattr__(seq, "shaped", bool(decided or baked))
    # without the target: what the forward returns around the output (a dict, a
    # dataclass...), which a loss_fn written for the model reads (engine.distribute)
    object.__setattr__(seq, "returned", None if target else _returned(returned, end))
    return seq


def _parameters(model: Any, target: bool | str, inputs: int, what: str, way: str
                ) -> tuple[list[Any], Any, list[Any], dict[str, Any]]:
    """The forward's parameters (``inspect.Parameter``s, its ``*args`` and
    ``**kwargs`` aside), the target's among them (None without ``target``),
    the ``inputs`` traced, and the rest, each kept at its default
    (``concrete_args``): a TypeError where the forward's signature cannot
    give what ``sequential`` was asked to trace."""
    params = [q for q in inspect.signature(model.forward).parameters.values()
              if q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)]
    if len(params) < inputs:
        raise TypeError(f"{what} takes {len(params)} input(s) to trace, not {inputs}: {way}")
    tgt_param = None
    if target:
        named = [q for q in params[1:] if q.name == target or
                 (target is True and q.name in _TARGETS)]
        if not named and target is True and len(params) > inputs:
            named = params[inputs:inputs + 1]
        if not named:
            raise TypeError(f"{what} takes no target "
                            f"{repr(target) + ' ' if isinstance(target, str) else ''}to trace "
                            f"(pass loss_fn=)")
        tgt_param = named[0]
    traced = [q for q in params if q is not tgt_param][:inputs]
    if len(traced) < inputs:
        raise TypeError(f"{what} takes {len(traced)} input(s) besides its target "
                        f"{getattr(tgt_param, 'name', '')!r}, not {inputs}")
    concrete = {}
    for q in params:
        if q in traced or q is tgt_param:
            continue
        if q.default is q.empty:
            raise TypeError(f"{what}: its parameter {q.name!r} has no default; only the "
                            f"input{'s' if inputs > 1 else ''}"
                            f"{' and the target' if target else ''} can be traced (several "
                            f"inputs: a sample= tuple of them, step((x, {q.name}), ...)): "
                            f"{way}")
        concrete[q.name] = q.default
    return params, tgt_param, traced, concrete


def _tracers(model: Any, tgt_param: Any, shaped: list[Any], decided: list[str],
             autocast: list[Any]) -> tuple[type, type]:
    """The torch.fx tracers ``sequential`` traces ``model`` with: the first
    reads buffers as traced values (a buffer sliced by a traced size), the
    second, tried where the first fails, reads their values (a flag). Both
    record augmented and item assignment as the in-place calls they are,
    call a member of a list of layers whole, decide a branch on a value
    the sample's ``shaped`` inputs compute (appending where to
    ``decided``), keep an ``assert`` on a traced value as a check each step
    runs, and append the nodes made under the forward's own autocast to
    ``autocast``."""
    import operator

    import torch
    import torch.fx as fx
    from torch import _assert as torch_assert, nn

    class Proxy(fx.Proxy):
        """fx's Proxy, with augmented assignment recorded as the in-place
        call it is (fx's has no ``__iadd__``: ``h *= 2`` became ``h = h * 2``,
        and another name for the tensor, ``r = h`` before it, read the old
        values in the pieces where it read the new ones in the model)."""
    for aug in _AUGMENTED:
        setattr(Proxy, f"__{aug}__", lambda self, other, f=getattr(operator, aug):
                self.tracer.create_proxy("call_function", f, (self, other), {}))
    # and item assignment (``out[rows] += y``, ``h[:, 0] = cls``), which fx's
    # refuses ("'Proxy' object does not support item assignment"), as the
    # in-place change of ``self`` it is
    setattr(Proxy, "__setitem__", lambda self, key, value: self.tracer.create_proxy(
        "call_function", operator.setitem, (self, key, value), {}))

    class Tracer(fx.Tracer):
        proxy_buffer_attributes = True      # a buffer sliced by a traced size (position ids)

        def proxy(self, node: Any) -> Any:
            return Proxy(node, self)

        def create_args_for_root(self, root_fn: Any, is_module: bool,
                                 concrete_args: Any = None) -> Any:
            return super().create_args_for_root(_plain(root_fn), is_module, concrete_args)

        def is_leaf_module(self, m: Any, qualname: str) -> bool:
            parent = qualname.rpartition(".")[0]     # ("": the model itself)
            if isinstance(model.get_submodule(parent), (nn.ModuleList, nn.Sequential)):
                return True         # a member of a list of layers: a block, called whole
            return not _holds_layers(m)

        evaluating = False      # (_by_shapes running the sample through the model)

        def trace(self, root: Any, concrete_args: Any = None) -> Any:
            with _sizes_packed():
                return super().trace(root, concrete_args)

        def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: Any) -> Any:
            if self.evaluating:
                return attr_val
            return super().getattr(attr, attr_val, parameter_proxy_cache)

        def call_module(self, m: Any, forward: Any, args: Any, kwargs: Any) -> Any:
            if self.evaluating:
                return forward(*args, **kwargs)
            try:
                path = self.path_of_module(m)
            except NameError:   # made in the forward (Hugging Face's loss_fct =
                return forward(*args, **kwargs)     # CrossEntropyLoss()): its code traced
            leaf = self.is_leaf_module(m, path)
            out = super().call_module(m, forward if leaf else _stack_forward(m) or forward,
                                      args, kwargs)
            k = _items(m) if leaf else None
            # a tuple (Hugging Face's rotary (cos, sin), passed whole to every block):
            # its items, each a tensor that may cross a cut (the tuple crossed as one
            # part, and the stage took it for a tensor: "'tuple' object has no
            # attribute 'requires_grad'")
            return out if k is None else tuple(out[i] for i in range(k))

        def create_node(self, kind: str, target: Any, args: Any, kwargs: Any,
                        name: str | None = None, type_expr: Any = None) -> Any:
            node = super().create_node(kind, target, args, kwargs, name, type_expr)
            if kind.startswith("call_") and not torch.is_grad_enabled():
                node.meta[_NO_GRAD] = True      # made inside the forward's torch.no_grad()
            if kind.startswith("call_") and _autocast(torch) and not outer_autocast:
                autocast.append(node)           # made inside the forward's torch.autocast()
            return node

        def create_arg(self, a: Any) -> Any:
            import dataclasses
            if isinstance(a, dict) and dataclasses.is_dataclass(a) and not isinstance(a, type):
                # Hugging Face's ModelOutput, a dict and a dataclass: fx keeps a plain dict
                # of it, and the loss_fn written for it would be given one (_returned)
                return self.create_node("call_function", type(a), (), {
                    f.name: self.create_arg(getattr(a, f.name))
                    for f in dataclasses.fields(a)})
            return super().create_arg(a)

        def to_bool(self, obj: Any) -> bool:
            where = _asserting()    # an assert on a traced value: checked as the step runs
            if where is None:
                value = _by_shapes(obj.node, self)
                if value is None:
                    return bool(super().to_bool(obj))
                # decided by the sample's shapes: the other way raises as the step runs
                held = obj if value else self.create_proxy("call_function", operator.not_,
                                                           (obj,), {})
                self.create_proxy("call_function", torch_assert, (held, (
                    f"the traced forward took the branch {_branch_at()} as the sample's "
                    f"shapes decided it ({bool(value)}), and this step's inputs decide "
                    f"otherwise: give engine.distribute a sample of their shapes{_AGAIN}")), {})
                decided.append(_branch_at())
                return bool(value)
            self.create_proxy("call_function", torch_assert, (obj, f"assert at {where}"), {})
            return True

    def _by_shapes(node: Any, tracer: Any) -> Any:
        """``node``'s value computed on the sample, where it is a Python
        number or bool (a length compared, not a tensor's values: those,
        and ``.item()``, are left to fx's error), else None."""
        if not shaped:
            return None
        tracer.evaluating = True    # (fx's patched module calls and reads: run as they are)
        try:
            value = _evaluate(model, node, _inputs_at(node.graph, tgt_param, shaped))
        finally:
            tracer.evaluating = False
        return value if isinstance(value, (bool, int, float)) else None

    class Baked(Tracer):
        proxy_buffer_attributes = False     # a buffer's value read (a flag): its value now

    outer_autocast = _autocast(torch)
    return Tracer, Baked


def _traced(model: Any, tracers: tuple[type, type], concrete: dict[str, Any], what: str,
            way: str) -> tuple[Any, Any]:
    """``model``'s forward traced (by the first of ``tracers`` that can),
    and traced again in the other mode (train or eval; None where that
    fails), so ``_read_mode`` can tell what reads ``self.training``. A
    forward no tracer follows is a TypeError saying where it failed and
    what to pass instead."""
    import torch
    try:
        with torch.enable_grad():       # (what the forward's own no_grad() is told from)
            way_in: type = tracers[0]
            try:
                graph = tracers[0]().trace(model, concrete_args=concrete or None)
            except Exception as first:
                try:
                    way_in = tracers[1]
                    graph = tracers[1]().trace(model, concrete_args=concrete or None)
                except Exception:
                    raise first from None
            modes = [(m, m.training) for m in model.modules()]
            try:        # in the other mode: what reads self.training (F.dropout's training=)
                model.train(not model.training)
                other = way_in().trace(model, concrete_args=concrete or None)
            except Exception:
                other = None
            finally:
                for m, was in modes:
                    m.training = was
    except Exception as e:
        kept = ", ".join(map(repr, concrete))
        fixed = (f"; {kept} kept {'its' if len(concrete) == 1 else 'their'} default(s): "
                 "to trace a forward of several inputs, pass sample= a tuple of them "
                 "(engine.sequential: inputs=)" if concrete else "")
        if isinstance(e, NotImplementedError) and "Cache" in str(e):    # (fx's create_arg)
            fixed += ("; a key-value cache made in the forward is no value the layers can "
                      "be given (transformers: config.use_cache=False, as for training)")
        raise TypeError(f"torch.fx cannot trace {what} ({type(e).__name__}: {e}"
                        f"{_line_of(e)}){fixed}; {way}") from e
    return graph, other


def _own_loss(model: Any, nodes: list[Any], out: list[Any], ins: list[Any], tgt: Any,
              tgt_param: Any, traced: list[Any], what: str) -> tuple[Any, Any, set[Any]]:
    """The forward's own loss as a piece of its graph (``.loss(output,
    target)``): the one returned value computed from the target ``tgt``,
    and the one output of the layers it reads. Returns that piece, the
    output (where the layers end) and the nodes the loss computes from the
    target (a TypeError, naming what to pass instead, where the forward's
    loss is not a function of one output and the target)."""
    reads: set[Any] = set()
    for n in nodes:                 # what depends on the target
        if n is tgt or any(m in reads for m in _inputs(n)):
            reads.add(n)
    found = [n for n in out if n in reads]
    if len(found) != 1:
        raise TypeError(f"{what}({', '.join(q.name for q in [*traced, tgt_param])}) "
                        f"returns {len(found)} values computed from {tgt_param.name!r}, "
                        "not one loss: pass loss_fn=")
    needed = _ancestors(found)
    part = [n for n in nodes if n in needed and n in reads and n is not tgt]
    # a criterion of the model's own (self.criterion = nn.CrossEntropyLoss()) is part
    # of the loss; a module with parameters is a layer, which a target must not feed
    layers = [n.target for n in part if n.op == "call_module"
              and _has_params(model, [n])]
    if layers:
        raise TypeError(f"{what}: what it computes from {tgt_param.name!r} calls the "
                        f"model's modules with parameters ({', '.join(layers)}), so it "
                        "is no loss of the output alone: pass loss_fn=")
    fed = {m for n in part for m in _inputs(n) if m not in reads and m.op != "get_attr"}
    # the device of the model's output the loss reads (Hugging Face's
    # ForCausalLMLoss: labels.to(logits.device)) is the device of what it reads of
    # the output, not a second value (the loss of one output was refused)
    about = {m for m in fed if m.op == "call_function" and m.target is getattr
             and m.args[1:] == ("device",)}
    if len(fed - about) == 1 and about:
        (rest,) = fed - about
        for m in about:
            m.args = (rest, "device")
        fed -= about
        part = [n for n in nodes if n in about or n in part]
    if len(fed) != 1 or any(m in fed for m in ins):
        raise TypeError(f"{what}: its loss reads {len(fed)} values of the model "
                        f"besides {tgt_param.name!r}, not one output: pass loss_fn=")
    (end,) = fed
    end, way_to = _output(model, nodes, out, end, ins)
    way_to.update(part)
    part = [n for n in nodes if n in way_to]
    loss = _piece(model, part, [end], [found[0]], f"{type(model).__name__}Loss", (tgt,))
    return loss, end, {*reads, *part}


def _body(model: Any, nodes: list[Any], ins: list[Any], end: Any, of_loss: set[Any],
          traced: list[Any], what: str, way: str) -> list[Any]:
    """The nodes the layers run, in order: what ``end`` (the output) needs,
    the asserts on what the layers read (nanoGPT's on the input's length),
    kept where their values are made though nothing reads what they
    return, and the in-place changes kept (``_kept_changes``; ``of_loss``:
    the loss's nodes, not the layers'). A TypeError where the layers read
    an input that is not traced."""
    from torch import _assert as torch_assert
    needed = _ancestors([end])
    checks = [n for n in nodes if n.op == "call_function" and n.target is torch_assert]
    for n in checks:
        up = _ancestors([n])
        if all(u in ins for u in up if u.op == "placeholder"):
            needed |= up
    needed |= _kept_changes(model, nodes, needed, of_loss)
    body = [n for n in nodes if n in needed and n.op not in ("placeholder", "get_attr")]
    if any(n.op == "placeholder" and n not in ins for n in needed):
        raise TypeError(f"{what}: its layers read an input besides "
                        f"{', '.join(repr(q.name) for q in traced)}: {way}")
    return body


def _crossings(model: Any, nodes: list[Any], body: list[Any], ins: list[Any]
               ) -> dict[int, list[Any]]:
    """Where ``body`` may be cut, each cut with the values that cross it
    (cut 0: the inputs ``ins``).

    A value is live from where it is made (the input: before body[0]) to
    its last reader in the body. A cut after body[i]: its own output is
    live, a tensor, and either the only value live or (between two steps
    of a loop over a ModuleList) the live values are all tensors: they
    cross the cut as a tuple (the input and a mask every block reads, a
    U-Net's skips). One pass; no cut between a tensor and its in-place
    change."""
    pos = {n: i for i, n in enumerate(body)}
    tensors = _tensor_valued(nodes)
    blocks = _loop_steps(model, body, pos)
    held, changed = _changed_spans(model, body, pos)   # no cut between a tensor and its change
    last = {m: max((pos[u] for u in m.users if u in pos), default=-1) for m in [*ins, *body]}
    dies: dict[int, list[Any]] = {}     # values whose last reader is body[i]
    for m, at in last.items():
        dies.setdefault(at, []).append(m)
    live = {m for m in ins if last[m] >= 0}
    order = {n: i for i, n in enumerate(nodes)}
    crossing: dict[int, list[Any]] = {0: ins}     # cut -> the values crossing it
    for i, n in enumerate(body[:-1]):
        if last[n] > i:
            live.add(n)
        live.difference_update(dies.get(i, ()))
        n = changed.get(n, n) if n not in live else n   # (h.mul_(2): a cut after it carries h)
        if n in live and n in tensors and i + 1 not in held and (len(live) == 1 or (
                n in blocks and live <= tensors)):
            crossing[i + 1] = sorted(live, key=order.__getitem__)
    return crossing


def _pieces(model: Any, body: list[Any], crossing: dict[int, list[Any]]) -> list[Any]:
    """``body`` cut at the ``crossing`` cuts into pieces (modules), a piece
    with no parameters joined to the one before it (a first one, to the
    next), each named after the modules it calls."""
    cuts = sorted(crossing)[1:]
    merged: list[tuple[int, int]] = []
    for a, b in zip([0, *cuts], [*cuts, len(body)]):
        # a piece with no parameters joins the one before it (a first one, the next)
        if merged and not (_has_params(model, _with_attrs(body[a:b]))
                           and _has_params(model, _with_attrs(body[slice(*merged[-1])]))):
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    pieces = []
    for a, b in merged:
        mods = [n.target for n in body[a:b] if n.op == "call_module"] or list(dict.fromkeys(
            m.target for m in _with_attrs(body[a:b]) if m.op == "get_attr"))  # (its weights)
        label = mods[0] if len(mods) == 1 else f"{mods[0]}..{mods[-1]}" if mods else "fn"
        pieces.append(_piece(model, body[a:b], crossing[a], crossing.get(b, [body[-1]]),
                             f"{type(model).__name__}[{label}]"))
    return pieces
