"""A torch model's forward as consecutive layers, found by tracing it.

::

    layers = engine.sequential(gpt, target=True)     # an nn.Sequential of the GPT's own modules
    layers.loss(layers(x), y)                         # == gpt(x, y)[1]

``engine.partition`` and ``engine.distribute`` cut an ``nn.Sequential``;
a model written as a plain ``nn.Module`` (nanoGPT's ``GPT``: embeddings,
a loop over ``nn.ModuleList`` blocks, a head, the loss) is first made one
here, without changing its code. torch.fx traces its ``forward`` once,
symbolically; a submodule is called as a whole (its code is not traced)
when it is a member of an ``nn.ModuleList`` or ``nn.Sequential`` (a
block), or holds no ``nn.ModuleList``, ``nn.Sequential`` or
``nn.ModuleDict``; the others (the model, an encoder holding its blocks,
an ``nn.Sequential``) are traced, down to their blocks. The graph is cut
after every tensor that is the only value the rest of the forward reads
(between two blocks, after the embeddings' sum, after a residual's add,
after the final norm), and between two steps of a loop over an
``nn.ModuleList`` where the values the rest reads are all tensors: they
cross that cut together, as a tuple (an attention mask every block reads
beside the activation, a U-Net's skips; a block returning a tuple the loop
takes apart is cut after its items are taken; the pipeline sends each
part, and each gets its gradient back, None for a mask). A piece with no
parameters joins the one before it.
Each piece is an ``fx.GraphModule`` that holds the model's own submodules
and parameters under their names in the model
(``transformer.h.0.attn.c_attn.weight``), so a tensor-parallel plan, a tied
weight and a gathered ``state_dict`` speak the model's names.

With ``target=True`` the forward's parameter named ``targets``,
``target``, ``labels``, ``label`` or ``y`` (else its second; a string
names another) is traced as the target too, and the part of the graph
that reads it is the loss:
``forward(idx, targets)`` returning ``(logits, loss)`` (or the loss alone,
or a dict with it) gives layers ending at the model's output (nanoGPT's
logits as it returns them; the loss alone: what the loss's views reshape,
_output) and ``.loss(output, target)``, which flattens them. The loss part
must call no submodule with parameters (a model whose "target" feeds
its layers, a mask, has no loss to find: pass ``loss_fn=``); a criterion
module (the model's own, or one the forward makes) is part of it. What the
forward computes under ``torch.no_grad()`` is read detached, as it runs;
what it changes in place is changed in the pieces too (_kept_changes). Other parameters keep their
defaults (nanoGPT's ``if targets is None`` takes the training branch only
when ``target=True``).

A forward torch.fx cannot trace (control flow on a tensor's value) raises
a ``TypeError`` that says so and names the way around it: an
``nn.Sequential`` or a list of the layers. Where the rest of the forward
reads a value that may not be a tensor (an int computed from the input's
length and passed to every block), there is no cut: the pieces are fewer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import sys
from typing import Any, Callable

__all__ = ["sequential", "traceable", "few", "given_as_returned", "Reshaped"]


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


def _inputs(n: Any) -> list[Any]:
    return list(n.all_input_nodes)


def _ancestors(roots: list[Any]) -> set[Any]:
    seen: set[Any] = set()
    todo = list(roots)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(_inputs(n))
    return seen


def _has_params(model: Any, nodes: list[Any]) -> bool:
    for n in nodes:
        if n.op == "call_module" and next(model.get_submodule(n.target).parameters(),
                                          None) is not None:
            return True
        if n.op == "get_attr":
            try:
                model.get_parameter(n.target)       # (a buffer or constant raises)
                return True
            except AttributeError:
                pass
    return False


def _piece(model: Any, nodes: list[Any], ins: list[Any], outs: list[Any], name: str,
           extra: tuple[Any, ...] = ()) -> Any:
    """A GraphModule of ``nodes`` (in order) from ``ins`` (one argument: a
    value, or a tuple of several; then ``extra``, more placeholders) to
    ``outs`` (returned alone, or as a tuple of several); get_attr nodes are
    copied where read."""
    import operator

    import torch.fx as fx
    g = fx.Graph()
    env: dict[Any, Any] = {}
    if len(ins) == 1:
        env[ins[0]] = g.placeholder(ins[0].name if ins[0].op == "placeholder" else "x")
        if ins[0].op == "placeholder" and not all(
                u.op == "call_function" and u.target is operator.getitem for u in ins[0].users):
            # the model's one input, read whole (not a tuple it indexes): checked
            env[ins[0]] = g.call_function(_alone, (env[ins[0]], ins[0].name))
    else:
        packed = g.placeholder("xs")
        if all(m.op == "placeholder" for m in ins):     # the model's own inputs: checked
            packed = g.call_function(_given, (packed, tuple(m.name for m in ins)))
        for i, m in enumerate(ins):
            env[m] = g.call_function(operator.getitem, (packed, i))
    for ph in extra:
        env[ph] = g.placeholder(ph.name)

    def value(m: Any) -> Any:
        if m not in env:
            if m.op != "get_attr":
                raise AssertionError(f"{m} is read across a cut")
            env[m] = g.node_copy(m)
        return env[m]

    for n in nodes:
        for m in _inputs(n):
            value(m)
        env[n] = g.node_copy(n, value)
    g.output(value(outs[0]) if len(outs) == 1 else tuple(value(m) for m in outs))
    gm = fx.GraphModule(model, g, class_name=name)
    for n in g.nodes:       # a buffer read here stays out of the state dict if it was
        path, _, attr = n.target.rpartition(".") if n.op == "get_attr" else ("", "", "")
        if attr in getattr(model.get_submodule(path), "_non_persistent_buffers_set", ()) or (
                _constant(n) and attr not in model._buffers):
            # (and a constant the forward makes, which fx put in as a buffer: the job's
            # state dict held a key the model's has not, which strict loading refused)
            gm.get_submodule(path)._non_persistent_buffers_set.add(attr)
    return gm


def _given(xs: Any, names: tuple[str, ...]) -> Any:
    """The first piece's input: a tuple of the inputs the forward was
    traced with (``names``), else a TypeError that says so (a tuple of
    more ran without the rest, position ids left out with no word; a
    tensor alone failed on an index)."""
    if isinstance(xs, (tuple, list)) and len(xs) == len(names):
        return xs
    got = (f"a tuple of {len(xs)}" if isinstance(xs, (tuple, list))
           else f"one {type(xs).__name__}")
    raise TypeError(f"the model's forward was traced with {len(names)} inputs "
                    f"({', '.join(names)}; sample= a tuple of them), which each step takes as "
                    f"one tuple of as many: got {got}")


def _alone(x: Any, name: str) -> Any:
    """The first piece's input where the forward was traced with one
    (``name``), read whole: a tuple or a list raises a TypeError that says
    so (``step((x, mask), y)`` with no sample= tuple given to distribute: the
    forward was traced with x alone, its mask at its default, and the tuple
    failed in the first layer, ``linear(): argument 'input' must be Tensor,
    not tuple``)."""
    if isinstance(x, (tuple, list)):
        raise TypeError(f"the model's forward was traced with 1 input ({name}), which each "
                        f"step takes alone: got a {type(x).__name__} of {len(x)}; to trace "
                        f"its forward with several inputs, give engine.distribute (or "
                        f"engine.sequential: inputs=) sample= a tuple of them, "
                        f"sample=({name}, ...), and each step the same tuple")
    return x


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

_AGAIN = (" (an engine.distribute job traces its model again at the shapes of the inputs "
          "each step gives: pass them to step() on every rank)")
"""Said where a step's shapes differ from those a trace was made for."""


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


def _inputs_at(graph: Any, tgt_param: Any, shaped: list[Any]) -> dict[Any, Any]:
    """The graph's input placeholders (the target's aside) -> the sample's."""
    names = [n for n in graph.nodes if n.op == "placeholder"
             and n.target != getattr(tgt_param, "name", None)]
    return dict(zip(names, shaped))


_MISSING = object()


def _evaluate(model: Any, node: Any, inputs_at: dict[Any, Any],
              env: dict[Any, Any] | None = None) -> Any:
    """``node``'s value run on the sample (``inputs_at``), where it reads
    nothing but the inputs, the model's attributes and its modules without
    buffers (a BatchNorm's statistics would move), and no ``.item()``, no
    ``int()`` of a tensor's values, and runs; else _MISSING. Without
    gradients, the random numbers put back after; ``env``: the values run
    so far, kept between calls on one sample."""
    import operator

    import torch
    import torch.fx as fx
    env = {} if env is None else env
    order: list[Any] = []
    seen: set[Any] = set()

    def visit(n: Any) -> bool:
        if n in seen or n in env:
            return env.get(n, None) is not _MISSING
        seen.add(n)
        if n.op == "placeholder" and n not in inputs_at or n.op == "output" or (
                n.op == "call_method" and n.target in ("item", "tolist")) or (
                n.op == "call_function" and n.target in (int, float, bool)) or (
                n.op == "call_module" and any(
                    True for _ in model.get_submodule(n.target).buffers())):
            return False
        if not all(visit(a) for a in n.all_input_nodes):
            return False
        order.append(n)
        return True
    if not visit(node):
        return _MISSING
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for n in order:
            try:
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
                if n.op == "placeholder":
                    env[n] = inputs_at[n]
                elif n.op == "get_attr":
                    env[n] = operator.attrgetter(n.target)(model)
                elif n.op == "call_module":
                    env[n] = model.get_submodule(n.target)(*args, **kwargs)
                elif n.op == "call_method":
                    env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
                else:
                    env[n] = n.target(*args, **kwargs)
            except Exception:
                env[n] = _MISSING
                return _MISSING
    return env[node]


def _bake_sizes(model: Any, graph: Any, tgt_param: Any, shaped: list[Any]) -> int:
    """Put in the graph as constants the values made of sizes (ints,
    tuples of them) read across a call of a member of an ``nn.ModuleList``
    (Hugging Face's GPT-2: ``output_shape = (-1,) + input_shape[1:] +
    (hidden.size(-1),)``, read after the last layer) that the sample and
    its first row alone give alike, so the same for every micro-batch of
    inputs shaped as the sample: such a value, not a tensor, could not
    cross a cut between two layers (the model was not cut apart). Where
    made, it is checked against the constant as each step runs. Returns
    how many were put in."""
    import operator

    import torch
    from torch import nn
    nodes = list(graph.nodes)
    tensors = _tensor_valued(nodes)
    full = _inputs_at(graph, tgt_param, shaped)
    if not full or not all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in full.values()):
        return 0
    one = {n: x[:1] for n, x in full.items()}
    envs: tuple[dict[Any, Any], dict[Any, Any]] = ({}, {})
    pos = {n: i for i, n in enumerate(nodes)}
    steps = [pos[n] for n in nodes if n.op == "call_module" and isinstance(
        model.get_submodule(n.target.rpartition(".")[0]), nn.ModuleList)]

    def sizes(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) or (
            isinstance(v, tuple) and all(sizes(i) for i in v))
    baked = 0
    for n in nodes:
        if n in tensors or n.op not in ("call_function", "call_method") or not n.users or (
                n.target is torch._assert) or not any(
                pos[n] < s < max(pos[u] for u in n.users) for s in steps):
            continue
        value = _evaluate(model, n, full, envs[0])
        if value is _MISSING or not sizes(value) or _evaluate(model, n, one, envs[1]) != value:
            continue
        value = tuple(value) if isinstance(value, tuple) else value
        users = list(n.users)
        with graph.inserting_after(n):
            same = graph.call_function(operator.eq, (n, value))
        with graph.inserting_after(same):
            graph.call_function(torch._assert, (same, (
                f"engine.sequential took {value} for a size the forward computes (as the "
                f"sample's shapes gave it) and this step's inputs give another: give "
                f"engine.distribute a sample of their shapes{_AGAIN}")))
        for u in users:
            u.replace_input_with(n, value)
        baked += 1
    return baked


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
    import operator

    import torch
    import torch.fx as fx
    from torch import _assert as torch_assert, nn
    if hasattr(model, "_orig_mod"):
        raise TypeError(
            f"torch.compile(model) gives an {type(model).__name__}, a compiled whole that "
            f"cannot be cut into stages: pass the model itself "
            f"({type(model._orig_mod).__name__}, its ._orig_mod) and compile its blocks "
            f"in their places instead (model.blocks[i] = torch.compile(model.blocks[i]))")
    what = f"{type(model).__name__}.forward"
    way = ("pass an nn.Sequential, or a list of the model's layers in the order they run "
           "(a layer may be a module or a function of one tensor)")
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

    shaped = ([] if sample is None else list(sample) if isinstance(sample, tuple)
              else [sample])

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
    decided: list[str] = []             # where a branch was decided by the sample's shapes
    autocast: list[Any] = []            # nodes made under the forward's own autocast
    try:
        with torch.enable_grad():       # (what the forward's own no_grad() is told from)
            way_in: type = Tracer
            try:
                graph = Tracer().trace(model, concrete_args=concrete or None)
            except Exception as first:
                try:
                    way_in = Baked
                    graph = Baked().trace(model, concrete_args=concrete or None)
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
    if target:
        assert tgt_param is not None
        tgt = by_name.get(tgt_param.name, phs[min(len(phs) - 1, params.index(tgt_param))])
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
    else:
        if len(out) != 1:
            raise TypeError(f"{what} returns {len(out)} tensors (a tuple, a list or a "
                            f"dict); a pipeline's last stage returns one: make the forward "
                            f"return the output the loss reads (the loss given as "
                            f"loss_fn=), or {way}")
        end = out[0]
    needed = _ancestors([end])
    # the asserts on what the layers read (nanoGPT's on the input's length): kept, where
    # their values are made, though nothing reads what they return
    checks = [n for n in nodes if n.op == "call_function" and n.target is torch_assert]
    for n in checks:
        up = _ancestors([n])
        if all(u in ins for u in up if u.op == "placeholder"):
            needed |= up
    needed |= _kept_changes(model, nodes, needed, {*reads, *part} if target else set())
    body = [n for n in nodes if n in needed and n.op not in ("placeholder", "get_attr")]
    if any(n.op == "placeholder" and n not in ins for n in needed):
        raise TypeError(f"{what}: its layers read an input besides "
                        f"{', '.join(repr(q.name) for q in traced)}: {way}")
    pos = {n: i for i, n in enumerate(body)}
    tensors = _tensor_valued(nodes)
    blocks = _loop_steps(model, body, pos)
    held, changed = _changed_spans(model, body, pos)   # no cut between a tensor and its change
    # a value is live from where it is made (the input: before body[0]) to
    # its last reader in the body. A cut after body[i]: its own output is
    # live, a tensor, and either the only value live or (between two steps
    # of a loop over a ModuleList) the live values are all tensors: they
    # cross the cut as a tuple (the input and a mask every block reads, a
    # U-Net's skips). One pass.
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
    seq = nn.Sequential(*pieces)
    object.__setattr__(seq, "loss", loss)       # not a submodule: the layers are the pieces
    object.__setattr__(seq, "traced_from", type(model).__name__)
    # whether the pieces hold what the sample's shapes decided (sizes, branches): a job
    # traces the model again for inputs of other shapes (Reshaped)
    object.__setattr__(seq, "shaped", bool(decided or baked))
    # without the target: what the forward returns around the output (a dict, a
    # dataclass...), which a loss_fn written for the model reads (engine.distribute)
    object.__setattr__(seq, "returned", None if target else _returned(returned, end))
    return seq


_RESHAPES = {"view", "reshape", "flatten", "contiguous"}
"""Calls that keep every value of their first argument, in another shape."""


def _output(model: Any, nodes: list[Any], out: list[Any], end: Any, ins: list[Any]
            ) -> tuple[Any, set[Any]]:
    """The value the layers end at, and the nodes from it to ``end``, what
    the loss reads (given to the loss with it). The layers' output is what
    ``eval_step(outputs=True)`` hands back, so it is the model's output,
    not the loss's view of it (nanoGPT's ``logits.view(-1, V)``, rows times
    positions): a value the forward returns beside its loss, of which the
    loss reads a function computed without parameters or other values of
    the model (nanoGPT's logits, Hugging Face's, which it reads shifted by
    a position); else, a forward returning the loss alone, what ``end``
    reshapes (view, reshape, flatten, contiguous: the values the loss reads,
    in the shape they were made). ``end`` itself where there is neither."""
    ups = _ancestors([end])

    def between(c: Any) -> set[Any] | None:
        """The nodes from ``c`` to ``end``, where nothing else of the model
        is read on the way (no other value, no parameter or buffer: a
        scaling by one stays in the layers); else None."""
        if c in ins:
            return None
        way, todo = set(), list(c.users)       # what reads c, on the way to end
        while todo:
            n = todo.pop()
            if n in ups and n not in way:
                way.add(n)
                todo.extend(n.users)
        if any(m is not c and m not in way for n in way for m in _inputs(n)) or _has_params(
                model, list(way)):
            return None
        return way

    for c in reversed([n for n in nodes if n in out and n in ups]):
        way = between(c)
        if way is not None:
            return c, way
    way = set()
    while _call_name(end) in _RESHAPES and end.args and hasattr(end.args[0], "all_input_nodes"):
        more = between(end.args[0])
        if more is None:
            break
        end, way = end.args[0], more
    return end, way


_NO_GRAD = "meshrun_no_grad"


def _constant(n: Any) -> bool:
    """Whether fx Node ``n`` reads a tensor the forward made of constants
    (``torch.tensor(2.0)``), which fx sets aside on the model under a name
    of its own, another each trace (``_tensor_constant0``, then 1...)."""
    return n.op == "get_attr" and n.target.startswith("_tensor_constant")


def _read_mode(graph: Any, other: Any, mode: bool, what: str) -> None:
    """fx bakes what the forward reads of ``self.training`` into the graph
    (``F.dropout(h, 0.1, self.training)``: ``training=True``), so that the
    pieces dropped out in ``eval_step`` too. ``other``, the forward traced
    in the other mode, tells which arguments are the mode: each becomes a
    read of the piece's own ``training``, which ``.eval()`` sets. A forward
    that branches on the mode keeps the traced mode's branch, and is told."""
    import warnings
    if other is None:
        return
    nodes, others = list(graph.nodes), list(other.nodes)
    if len(nodes) != len(others) or any(a.op != b.op or (a.target != b.target and not (
            _constant(a) and _constant(b))) for a, b in zip(nodes, others)):
        warnings.warn(f"engine.sequential: {what} branches on self.training: its pieces run "
                      f"the {'training' if mode else 'eval'} mode's branch in either mode "
                      f"(eval_step included)", stacklevel=3)
        return
    for a, b in zip(nodes, others):
        args = [i for i, (x, y) in enumerate(zip(a.args, b.args))
                if x is mode and isinstance(y, bool) and y is not mode]
        kwargs = [k for k, x in a.kwargs.items() if x is mode and b.kwargs.get(k) is not mode
                  and isinstance(b.kwargs.get(k), bool)]
        if not args and not kwargs:
            continue
        with graph.inserting_before(a):
            flag = graph.get_attr("training")
        a.args = tuple(flag if i in args else x for i, x in enumerate(a.args))
        a.kwargs = {k: flag if k in kwargs else x for k, x in a.kwargs.items()}


def _autocast(torch: Any) -> bool:
    """Whether torch.autocast is on, for the CPU or CUDA."""
    return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))


def _detached(value: Any) -> Any:
    """A value made under the forward's ``torch.no_grad()``, as its code
    saw it: a tensor without its autograd history (other values as they
    are)."""
    import torch
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value


def _detach_no_grad(graph: Any) -> None:
    """torch.fx records no grad mode: what a forward computes inside ``with
    torch.no_grad():`` (a norm used as a scale, a teacher's output) ran with
    gradients in the pieces, so the pipeline trained what one process does
    not. Each such value read where gradients are on is read detached."""
    for n in list(graph.nodes):
        users = [u for u in n.users if not u.meta.get(_NO_GRAD)]
        if n.meta.get(_NO_GRAD) and users:
            with graph.inserting_after(n):
                d = graph.call_function(_detached, (n,))
            for u in users:
                u.replace_input_with(n, d)


def _loop_steps(model: Any, body: list[Any], pos: dict[Any, int]) -> set[Any]:
    """The calls of ``body`` that end a step of a loop over an
    ``nn.ModuleList``: a call of its member i whose next module call is
    member i + 1, or of its last member (where the values still live may
    cross a cut together). Not a member of an ``nn.Sequential`` called by
    a forward of the model's own (a residual around a few of them: a cut
    there would carry the branch and the residual both). A block returning
    a tuple that the loop takes apart (Hugging Face's ``layer_outputs =
    layer(hidden, mask); hidden = layer_outputs[0]``): its last item taken
    ends the step."""
    import operator

    from torch import nn
    calls = [n for n in body if n.op == "call_module"]
    steps = set()
    for n, after in zip(calls, [*calls[1:], None]):
        parent, _, name = n.target.rpartition(".")
        members = model.get_submodule(parent)
        if not isinstance(members, nn.ModuleList) or not name.isdigit():
            continue
        i = int(name)
        if i == len(members) - 1 or (after is not None and after.target == f"{parent}.{i + 1}"):
            items = [u for u in n.users if u in pos]
            if items and all(u.target is operator.getitem for u in items):
                steps.add(max(items, key=pos.__getitem__))
            else:
                steps.add(n)
    return steps


def few(source: str | None, n: int) -> str:
    """What to add to "the model has n layers" when they come from tracing
    ``source``'s forward (a class name; None: they did not)."""
    return (f" ({source}.forward traced into {n} by engine.sequential: a cut falls only "
            "where one tensor is all that the rest of the forward reads, or between two "
            "steps of a loop over a ModuleList where it reads tensors only)" if source else "")


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


_NOT_TENSORS = {"size", "dim", "numel", "item", "tolist", "stride", "element_size",
                "is_contiguous", "is_floating_point", "data_ptr", "__len__"}


def _tensor_valued(nodes: list[Any]) -> set[Any]:
    """The nodes whose value is surely a tensor, found without running the
    graph: the input, a submodule's output (a tuple's items where it is
    taken apart by indexing), a parameter, an operation on a tensor
    other than those that read its size, shape, dtype or device (an int
    computed from a size is not one), and a tensor made from sizes alone
    (``torch.arange(t)``: Hugging Face's position ids where none are
    given, read by every layer; left out, no layers were cut apart)."""
    import builtins
    import operator

    import torch
    made = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.eye,
            torch.linspace, torch.logspace, torch.tril_indices, torch.triu_indices}
    out: set[Any] = set()
    tuples: set[Any] = set()    # modules returning a tuple, taken apart
    for n in nodes:
        if n.op == "call_module" and n.users and all(
                u.target is operator.getitem for u in n.users):
            tuples.add(n)
            continue
        if n.target is operator.getitem and n.args[0] in tuples:
            out.add(n)
            continue
        if n.op in ("placeholder", "call_module", "get_attr"):
            out.add(n)
        elif n.op in ("call_function", "call_method"):
            if n.target in _NOT_TENSORS or n.target in (builtins.getattr, builtins.len):
                continue
            args = _inputs(n)
            if n.target is operator.getitem:      # a tensor's item, not a size's
                args = args[:1]
            if any(m in out for m in args) or n.target in made:
                out.add(n)
    return out


def _with_attrs(nodes: list[Any]) -> list[Any]:
    """``nodes`` and the get_attr nodes they read."""
    return nodes + [m for n in nodes for m in _inputs(n) if m.op == "get_attr"]


def _shape_key(inputs: Any) -> tuple[tuple[int, ...], ...] | None:
    """The shapes of ``inputs`` (a tensor, or a tuple of them) but for their
    rows, which micro-batches take apart anyway: what a trace made with a
    sample of those shapes holds (sizes, branches); None for anything else."""
    parts = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    shapes = [tuple(getattr(p, "shape", ())) for p in parts]
    if not parts or not all(shapes):
        return None
    return tuple(tuple(int(d) for d in s[1:]) for s in shapes)


def _dtypes(inputs: Any) -> tuple[str, ...]:
    """The dtypes of ``inputs`` (a tensor, or a tuple of them), by name
    (``"int64"``): what zeros made to trace with take (``Reshaped.follow``)."""
    parts = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    return tuple(str(getattr(p, "dtype", "")).rpartition(".")[2] for p in parts)


_FORM = ("_graph", "_code", "_lineno_map", "_prologue_start")
"""A GraphModule's attributes that ``recompile`` makes from its graph (with
its class's ``forward``): what one trace of a piece is, kept per shapes."""


class Reshaped:
    """A traced model's pieces at the shapes of each step's inputs. The
    pieces of a forward traced with a sample (``sequential(sample=)``) hold
    what the sample's shapes decided: sizes read across the layers taken as
    constants (Hugging Face's GPT-2's ``output_shape``), ``if``s on lengths
    (its mask code); a step of another sequence length raised an
    AssertionError. ``at(inputs)`` traces ``source`` again with inputs of
    those shapes (two rows of them), checks that it is cut alike (the same
    pieces, in order), and gives each of the pieces this rank runs (``own``,
    by index; and ``loss``, the traced loss, where given) the new trace's
    graph, in place: the modules, parameters and shards are the pieces'
    own, not the new trace's, so what an optimizer holds stays what it
    updates. Each shape's graphs are kept (a step at the sample's shapes
    again, or at any seen before, traces nothing); where a trace at new
    shapes fails or cuts otherwise, the step runs the sample's graphs (which
    raise their AssertionError) and a warning says why. A rank given no
    inputs (``step(None, y)``: a later stage's) follows the first stage's:
    ``told()``, the shapes (and dtypes) of the inputs this rank runs at, go
    with the first micro-batch's activations to the next stage's rank, whose
    ``follow(told)`` traces again with zeros of them before its first
    forward (engine.step); where none came, its stages' first pieces
    (``entries``) raise a ValueError where they are given other shapes than
    at the shapes they run at (``where``: the rank, for it)."""

    def __init__(self, source: Any, seq: Any, own: list[int], loss: Any, target: bool,
                 inputs: int, sample: Any, entries: dict[int, Any] | None = None,
                 where: str = "") -> None:
        self.source, self.target, self.inputs, self.where = source, target, inputs, where
        self.labels = [type(p).__name__ for p in seq]
        self.pieces = [(i, seq[i]) for i in own] + ([(-1, loss)] if loss is not None else [])
        self.now = self.first = _shape_key(sample)
        self.many = isinstance(sample, (tuple, list))       # (several inputs: a tuple)
        # the shapes (rows aside) and dtypes of the inputs this rank's step runs at: told
        # to the next stage's rank, which may have none
        self.kinds = _dtypes(sample)
        self.want: tuple[Any, tuple[str, ...]] = (self.first, self.kinds)
        self.forms: dict[Any, list[tuple[Any, ...]] | None] = {
            self.now: [self._form(p) for _, p in self.pieces]}
        # a rank given no inputs (a later stage's: ``step(None, y)``) cannot tell a new
        # length from them: its stages' first pieces (``entries``: their inputs at the
        # sample's shapes) check what they are given against what they were given at the
        # shapes they run at (their sizes, taken as constants, ran wrong with no word)
        self.blind = False
        self.seen = {(self.first, i): _shape_key(x) for i, x in (entries or {}).items()}
        for i in entries or {}:
            seq[i].register_forward_pre_hook(functools.partial(self._check, i))

    def step(self, inputs: Any) -> None:
        """A step's (or eval_step's) ``inputs`` on this rank: None where it
        was given none (see ``_check``)."""
        self.blind = inputs is None
        if inputs is not None:
            self.at(inputs)

    def told(self) -> tuple[Any, tuple[str, ...]]:
        """What this rank tells the next stage's rank with its first
        micro-batch's activations: the shapes (rows aside) and dtypes of the
        inputs its step runs at (given, or ``follow``ed)."""
        return self.want

    def follow(self, told: Any) -> None:
        """Make the pieces run at the inputs' shapes the previous stage's
        rank ``told()`` (a rank given no inputs learns a new length so,
        before its first forward): traced again with zeros of those shapes
        and dtypes where not seen before."""
        import torch
        key, dtypes = told
        key = tuple(tuple(s) for s in key)
        self.want = (key, tuple(dtypes))
        if key == self.now:
            return
        if key not in self.forms:
            at = next((p.device for p in self.source.parameters() if p.device.type != "meta"),
                      torch.device("cpu"))
            zeros = tuple(torch.zeros((2, *s), dtype=getattr(torch, d), device=at)
                          for s, d in zip(key, dtypes))
            self.forms[key] = self._traced(zeros if self.many else zeros[0], key)
        self._use(key if self.forms[key] is not None else self.first)

    def _check(self, i: int, piece: Any, args: tuple[Any, ...]) -> None:
        shapes = _shape_key(args[0]) if args else None
        want = self.seen.get((self.now, i))
        if shapes is None or want is None or not self.blind:
            if shapes is not None:
                self.seen[self.now, i] = shapes
            return
        if shapes != want:
            raise ValueError(f"{self.where}{': ' if self.where else ''}{type(piece).__name__} "
                             f"is given inputs of shapes {list(shapes)} "
                             f"(rows aside), not {list(want)} as at the inputs' shapes it was "
                             f"traced at, and this rank was given no inputs to trace it again "
                             f"by, nor told their shapes by the previous stage's rank (with "
                             f"its first micro-batch's activations): give this rank the "
                             f"inputs too")

    @staticmethod
    def _form(piece: Any) -> tuple[Any, ...]:
        return (*[getattr(piece, a) for a in _FORM], type(piece).forward)

    def at(self, inputs: Any) -> None:
        """Make the pieces run at ``inputs``' shapes (see the class)."""
        key = _shape_key(inputs)
        if key is not None:
            self.want = (key, _dtypes(inputs))
        if key is None or key == self.now:
            return
        if key not in self.forms:
            self.forms[key] = self._traced(inputs, key)
        # (where it could not be traced: the sample's graphs, whose checks say so)
        self._use(key if self.forms[key] is not None else self.first)

    def sample(self) -> None:
        """Make the pieces run at the sample's shapes (a job's re-time)."""
        self.want = (self.first, self.kinds)
        self._use(self.first)

    def _use(self, key: Any) -> None:
        forms = self.forms[key]
        if key == self.now or forms is None:
            return
        for (_, piece), form in zip(self.pieces, forms):
            for a, v in zip(_FORM, form):
                setattr(piece, a, v)
            type(piece).forward = form[-1]
        self.now = key

    def _traced(self, inputs: Any, key: Any) -> list[tuple[Any, ...]] | None:
        """The pieces' forms traced at ``inputs``' shapes; None, and a
        warning, where they cannot be."""
        import warnings

        import torch
        parts = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        two = tuple(p[:2] if len(p) > 1 else torch.cat([p, p]) for p in parts)
        try:
            with warnings.catch_warnings():     # (said when it was first traced)
                warnings.simplefilter("ignore")
                new = sequential(self.source, target=self.target, inputs=self.inputs,
                                 sample=two if isinstance(inputs, (tuple, list)) else two[0])
            labels = [type(p).__name__ for p in new]
            if labels != self.labels:
                raise ValueError(f"it is cut into {labels}, not {self.labels}")
            made = [new[i] if i >= 0 else new.loss for i, _ in self.pieces]
            constants = []      # (a tensor the forward makes of constants: fx keeps it aside,
            for (_, piece), gm in zip(self.pieces, made):       # named anew each trace)
                for n in gm.graph.nodes:
                    if n.op not in ("get_attr", "call_module") or _holds(piece, n.target):
                        continue
                    value = getattr(gm, n.target, None)
                    if "." in n.target or not isinstance(value, torch.Tensor) or isinstance(
                            value, torch.nn.Parameter):
                        raise ValueError(f"its piece {type(piece).__name__} reads "
                                         f"{n.target!r}, which the sample's did not")
                    constants.append((piece, n.target, value))
        except (TypeError, ValueError, AssertionError) as e:
            warnings.warn(f"engine.distribute: {type(self.source).__name__}.forward traced "
                          f"at inputs of shapes {list(key)} (but for their rows) fails "
                          f"({type(e).__name__}: {e}): the step runs the pieces traced at the "
                          f"sample's shapes", stacklevel=3)
            return None
        for piece, name, value in constants:    # (read as it is: no buffer, in no state dict)
            vars(piece)[name] = value
        forms = []
        for (_, piece), gm in zip(self.pieces, made):
            piece.graph = gm.graph      # (recompiled: its forward, from the new graph)
            forms.append(self._form(piece))
        self.now = key
        return forms


def _holds(module: Any, target: str) -> bool:
    """Whether ``module`` has the attribute or submodule named ``target``."""
    import operator
    try:
        operator.attrgetter(target)(module)
    except AttributeError:
        return False
    return True
