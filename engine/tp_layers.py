"""Tensor parallelism for ``engine.layers`` models (numpy), by the same
plans and styles as torch modules (engine.tp_plan, engine.tensor_parallel).

``parallelize(model, group, plan)`` replaces each planned layer of a
``Sequential`` (names are list indices, dotted through nested Sequentials:
``"0"``, ``"2.1"``) by a ``Sharded`` layer: the original layer cut to this
rank's shard, between the collectives of its style, with hand-written
backward passes like every layer here::

    colwise   Linear: weight columns (fan_out) split     enter: f (or all-gather seq)
    rowwise   Linear: weight rows (fan_in) split         leave: all-reduce (or reduce-scatter)
    vocab     Embedding: rows split, others' ids -> 0    leave: all-reduce (or reduce-scatter)
    sequence  any layer, on its part of the sequence     grads summed over the group

``full_params(model)`` gathers the unsharded parameters back, in the order
the unsharded model's ``params()`` has them.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import numpy as np

import collectives

from .layers import Embedding, Linear, Recompute, Sequential, _Activation
from .tp_plan import (Edge, PlanError, Style, abandoned, agree, check_attrs, check_divisible,
                      digest, edges, fed_whole, joined_order, left, logged, match, planned,
                      rewrite_attrs, rowwise_fed_whole, same_on_every_rank, sequence_harm,
                      shard_rows, shard_said, style_said)

__all__ = ["Sharded", "parallelize", "full_params", "full_shapes", "load_full_params",
           "group_of", "named_layers", "describe", "refuse_fed_whole", "cut_edges",
           "refuse_cut_fed_whole", "whole_output"]


@logged
def _comm(group: Any, x: Any, op: str, dim: int, where: str = "tensor parallel",
          timeout: float | None = None) -> Any:
    """One collective on an array: ar (all-reduce), ag (all-gather along
    dim), rs (reduce-scatter along dim), split (this rank's part), id
    (``timeout``: the all-gather's, the group's default if None)."""
    if op == "id" or x is None:
        return x
    n = group.size
    if op == "ar":
        return collectives.all_reduce(group, np.array(x))
    if op == "ag":
        return np.concatenate(list(collectives.all_gather(group, np.ascontiguousarray(x),
                                                          timeout=timeout)), axis=dim)
    if x.shape[dim] % n:
        raise PlanError(f"tp rank {group.rank}: {where}: axis {dim} of a {x.shape} activation "
                        f"is {x.shape[dim]}, not divisible by the tp size {n} "
                        f"(group {group.name})")
    if op == "split":
        return np.split(x, n, axis=dim)[group.rank].copy()
    moved = np.ascontiguousarray(np.moveaxis(x, dim, 0))
    return np.ascontiguousarray(np.moveaxis(collectives.reduce_scatter(group, moved), 0, dim))


class _NoBias:
    """A Linear's weight shard without its bias (a rowwise layer adds the
    bias once, after the reduction)."""

    def __init__(self, weight: Any) -> None:
        self.weight, self.grad_weight = weight, np.zeros_like(weight)

    def forward(self, x: Any) -> tuple[Any, Any]:
        return x @ self.weight, x

    def backward_input(self, ctx: Any, gy: Any) -> tuple[Any, Any]:
        return gy @ self.weight.T, (ctx, gy)

    def backward_weight(self, wctx: Any) -> None:
        x, gy = wctx
        self.grad_weight += x.reshape(-1, x.shape[-1]).T @ gy.reshape(-1, gy.shape[-1])

    def params(self) -> list[Any]:
        return [self.weight]

    def grads(self) -> list[Any]:
        return [self.grad_weight]


class _VocabShard(Embedding):
    """Rows ``lo:lo+len(weight)`` of an embedding of ``total`` rows; other
    ids give zeros, and an id outside every rank's rows raises (each rank
    would give it zeros: a silent zero vector where the whole table raises)."""

    def __init__(self, weight: Any, lo: int, total: int, where: str) -> None:
        self.weight, self.grad_weight, self.lo = weight, np.zeros_like(weight), lo
        self.total, self.where = total, where

    def forward(self, ids: Any) -> tuple[Any, Any]:
        bad = (ids < 0) | (ids >= self.total)
        if bad.any():
            raise IndexError(f"{self.where}: token id {int(ids[bad].reshape(-1)[0])} is out of "
                             f"range for the embedding's {self.total} rows (vocab-sharded)")
        local = ids - self.lo
        outside = (local < 0) | (local >= len(self.weight))
        local = np.where(outside, 0, local)
        return np.where(outside[..., None], 0.0, self.weight[local]), (local, outside)

    def backward_weight(self, wctx: Any) -> None:
        (local, outside), gy = wctx
        super().backward_weight((local, np.where(outside[..., None], 0.0, gy)))


class Sharded:
    """``inner`` (a layer cut to this rank's shard) between the collectives
    of ``style`` over ``group``; a layer of the stage protocol.

    ``dims``: the axis each of ``inner``'s params was cut along (None:
    whole), for ``full_params``; ``bias``: a whole bias added after the
    output's collective (rowwise)."""

    def __init__(self, inner: Any, group: Any, style: Style, dims: list[int | None],
                 bias: Any = None, name: str = "") -> None:
        self.inner, self.group, self.style, self.dims = inner, group, style, dims
        self.name = name
        self.order: list[int] | None = None   # a fused layer's columns, from the shards end to end
        self.bias = bias
        self.grad_bias = None if bias is None else np.zeros_like(bias)
        self.enter, self.leave = edges(style)
        # whole parameters fed a part of the sequence: their gradients are summed
        self.partial = style.style == "sequence" or (style.style, style.input) == (
            "replicate", "shard")          # (whole, fed this rank's part of the features)
        self.partial_bias = style.style == "rowwise" and style.output != "replicate"
        self.add_bias = bias is not None and (style.output != "partial" or group.rank == 0)
        self.defer = False      # True: a Pipeline sums them after its step (engine.tp_sums)
        # (parent, index, layer, name): a Linear the plan leaves whole that this colwise
        # layer's output feeds, refused at the first forward unless a later parallelize
        # call planned it (_watch_feeds)
        self.feeds: tuple[Any, int, Any, str] | None = None
        # input "sequence": whether its first input was checked for whole rows
        self.seen = style.input != "sequence" or style.alike or group.size == 1

    def __deepcopy__(self, memo: dict[int, Any]) -> "Sharded":
        """A copy is sharded over the same group (a Comm is not copied)."""
        memo[id(self.group)] = self.group
        new = Sharded.__new__(Sharded)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def summed_grads(self) -> list[Any]:
        """The gradients summed over the group (engine.tp_sums)."""
        return ((_unplanned_grads(self.inner) if self.partial else [])
                + ([self.grad_bias] if self.partial_bias and self.grad_bias is not None else []))

    def _edge(self, x: Any, edge: Edge | None, backward: bool) -> Any:
        if edge is None:
            return x
        axis = self.style.seq_dim if edge[2] is None else edge[2]
        where = f"{self.name} {'backward' if backward else 'forward'}"
        if edge[2] is None and x is not None and not (
                -x.ndim <= axis < x.ndim and axis % x.ndim != x.ndim - 1):
            self._seq_refused(x, "input" if edge is self.enter else "output", where)
        return _comm(self.group, x, edge[1] if backward else edge[0], axis, where)

    def _seq_refused(self, x: Any, side: str, where: str) -> None:
        """Raise for a sequence axis that is no axis of ``x`` or its last,
        the features every engine.layers layer computes on: cut there, a 2-D
        activation's features were split and a later layer failed on a numpy
        broadcast that named nothing. Every tp rank has the same shape, so
        all raise here, before the edge's collective."""
        g, dim, st = self.group, self.style.seq_dim, self.style
        what = ("its last, the features (engine.layers compute on the last axis)"
                if -x.ndim <= dim < x.ndim else "not there")
        raise PlanError(
            f"tp rank {g.rank} (rank {g.ranks[g.rank]}): {where}: a {st.style!r} layer with "
            f"{side} 'sequence' has the sequence along seq_dim={dim}, but axis {dim} of its "
            f"{x.shape} activation is {what}; activations of two axes, (rows, features), "
            f"take \"seq_dim\": 0 in the plan of {self.name} and of the layers splitting the "
            f"sequence with it (group {g.name})")

    def fed_whole(self) -> str | None:
        """The PlanError's words when this colwise layer's output feeds a
        Linear the plan leaves whole (``feeds``, still in its place), else None."""
        feeds = getattr(self, "feeds", None)
        if feeds is None:
            return None
        parent, i, layer, name = feeds
        if _bare(parent.layers[i]) is not layer:    # planned by a later parallelize call
            self.feeds = None
            return None
        fan_in, fan_out = layer.weight.shape
        return fed_whole(self.group.rank, self.name, self.inner.weight.shape[1], self.group.size,
                         f"{name} ({type(layer).__name__})",
                         f"its weight is ({fan_in}, {fan_out}), for {fan_in} input features",
                         name)

    def forward(self, x: Any) -> tuple[Any, Any]:
        # numpy's matmul error ("Input operand 1 has a mismatch in its core dimension
        # 0") named neither layer, or with matching widths the Linear ran on this rank's
        # part as if whole; every tp rank has the same layers and shapes, so all raise
        # here, before any collective
        said = self.fed_whole()
        if said is not None:
            raise PlanError(said)
        if not getattr(self, "seen", True) and x is not None:
            self.seen = True
            a = np.ascontiguousarray(x)
            same_on_every_rank(self.group, self.name, self.style, a.tobytes(), a.shape,
                               a.size == 0 or bool((a == a.reshape(-1)[0]).all()))
        if self.style.style == "rowwise" and x is not None and np.ndim(x) \
                and x.shape[-1] != self.inner.weight.shape[0]:
            raise PlanError(rowwise_fed_whole(self.group.rank, self.name,
                                              self.inner.weight.shape[0], self.group.size,
                                              x.shape[-1]))
        y, ctx = self.inner.forward(self._edge(x, self.enter, False))
        y = self._edge(y, self.leave, False)
        left(self.name, self.style, self.group.size)
        return (y + self.bias if self.add_bias else y), ctx

    def backward_input(self, ctx: Any, gy: Any) -> tuple[Any, Any]:
        gb = gy if self.add_bias else None
        gx, wctx = self.inner.backward_input(ctx, self._edge(gy, self.leave, True))
        return self._edge(gx, self.enter, True), (wctx, gb)

    def backward_weight(self, wctx: Any) -> None:
        w, gb = wctx
        if self.partial and not self.defer:
            grads = _unplanned_grads(self.inner)
            before = [g.copy() for g in grads]
            for g in grads:
                g[...] = 0
            self.inner.backward_weight(w)
            for g, old in zip(grads, before):
                g[...] = _comm(self.group, g, "ar", 0) + old
        else:
            self.inner.backward_weight(w)
        if self.grad_bias is not None:
            part = (np.zeros_like(self.grad_bias) if gb is None
                    else gb.reshape(-1, gb.shape[-1]).sum(axis=0))
            summed = self.partial_bias and not self.defer
            self.grad_bias += _comm(self.group, part, "ar", 0) if summed else part

    def backward(self, ctx: Any, gy: Any) -> Any:
        gx, wctx = self.backward_input(ctx, gy)
        self.backward_weight(wctx)
        return gx

    def params(self) -> list[Any]:
        return self.inner.params() + ([] if self.bias is None else [self.bias])

    def grads(self) -> list[Any]:
        return self.inner.grads() + ([] if self.grad_bias is None else [self.grad_bias])

    def full_params(self, grads: bool = False, timeout: float | None = None) -> list[Any]:
        """The unsharded parameters, or gradients (collective over the group,
        each all-gather waiting ``timeout``, the group's default if None)."""
        if isinstance(self.inner, Sequential):   # a region: its layers say
            return full_params(self.inner, grads, timeout)
        whole = [p if d is None else _comm(self.group, p, "ag", d, timeout=timeout)
                 for p, d in zip(self.grads() if grads else self.params(), self.dims)]
        if self.order is not None:
            whole = [p if d is None else np.take(p, self.order, axis=d)
                     for p, d in zip(whole, self.dims)]
        return whole


def _unplanned_grads(layer: Any) -> list[Any]:
    """The gradients of a "sequence" region's layers that it sums over the
    group: all but a planned (Sharded) layer's inside it, which its own
    style shards, sums or gathers the sequence for (summed by the region
    too, they were a nested "sequence" layer's twice, a colwise one's
    shards over the ranks)."""
    if isinstance(layer, Sharded):
        return []
    if isinstance(layer, Recompute):
        return _unplanned_grads(layer.inner)
    if isinstance(layer, Sequential):
        return [g for sub in layer.layers for g in _unplanned_grads(sub)]
    return list(layer.grads()) if callable(getattr(layer, "grads", None)) else []


def named_layers(model: Any, prefix: str = "") -> list[tuple[str, Any, Any, int]]:
    """(name, layer, parent Sequential or None, index in it), depth first."""
    out: list[tuple[str, Any, Any, int]] = []
    if isinstance(model, Sequential):
        for i, layer in enumerate(model.layers):
            name = f"{prefix}{i}"
            out.append((name, layer, model, i))
            out.extend(named_layers(layer, name + "."))
    return out


def parallelize(model: Any, group: Any, plan: Mapping[str, Any], *, init: str = "check",
                strict: bool = True) -> Any:
    """engine.parallelize for an engine.layers model (see there)."""
    layers: dict[str, tuple[Any, Any, int]] = {}
    todo = {}
    cut: set[int] = set()
    own: BaseException | None = None    # this rank's own error, not the plan's: told in agree
    try:
        layers = {name: (layer, parent, i) for name, layer, parent, i in named_layers(model)}
        # shards an earlier call cut (another part of the model planned apart) differ
        # across the ranks by design: neither compared nor broadcast again
        cut = {id(p) for s in sharded_layers(model) if not isinstance(s.inner, Sequential)
               for p, d in zip(s.params(), s.dims) if d is not None}
        for name, style in match(plan, layers, strict).items():
            _validate(name, layers[name][0], style, group.size)
            todo[name] = style
        local: dict[str, str] | str = {} if init == "broadcast" else {
            f"{name} param {k}": digest([np.ascontiguousarray(p).tobytes(),
                                         str((p.dtype, p.shape)).encode()])
            for name, (layer, _, _) in layers.items() if not isinstance(layer, Sequential)
            for k, p in enumerate(layer.params()) if id(p) not in cut}
    except PlanError as e:
        local = str(e)
    except BaseException as e:      # (a KeyboardInterrupt)
        own, local = e, f"{type(e).__name__}: {e}"[:400]
    agree(group, planned(local, todo), "parallelize", own)
    if init == "broadcast":
        for p in (model.params() if hasattr(model, "params") else []):
            if id(p) not in cut:
                collectives.broadcast(group, p, root=0)
    try:
        for name, style in todo.items():
            layer, parent, i = layers[name]
            parent.layers[i] = _shard(layer, name, style, group)
        _watch_feeds(model)
    except BaseException as e:
        abandoned(group, e)
        raise
    return model


def _units(seq: Any, prefix: str = "", regions: bool = True) -> list[tuple[str, Any, Any, int]]:
    """(name, layer, parent, index) of each layer in the order a forward
    runs them, inside Sequentials and (``regions``) sharded regions."""
    out: list[tuple[str, Any, Any, int]] = []
    for i, layer in enumerate(seq.layers):
        name, inner = f"{prefix}{i}", _bare(layer)
        if regions and isinstance(inner, Sharded) and isinstance(inner.inner, Sequential):
            inner = inner.inner
        if isinstance(inner, Sequential):
            out.extend(_units(inner, name + ".", regions))
        else:
            out.append((name, layer, seq, i))
    return out


def _watch_feeds(model: Any) -> "Sharded | None":
    """Note on each colwise layer whose output (this rank's part of the
    features, through activations) meets a Linear the plan leaves whole,
    which Linear (Sharded.feeds): it is refused at the first forward, or at
    once by engine.distribute, which has the whole plan (refuse_fed_whole);
    a later parallelize call may still plan it. Returns the colwise layer
    whose part of the features ``model`` ends with (None: none)."""
    if not isinstance(model, Sequential):
        return None
    source: Sharded | None = None
    for name, layer, parent, i in _units(model):
        if isinstance(layer, Sharded):
            st = layer.style
            if st.style == "colwise":
                layer.feeds = None
                source = layer if st.output == "shard" and layer.group.size > 1 else None
            elif (st.style, st.input) != ("replicate", "shard"):   # (that one keeps the part)
                source = None
        elif isinstance(layer, _Activation):       # elementwise: the part passes on
            continue
        elif isinstance(layer, Linear) and source is not None:
            source.feeds = (parent, i, layer, name)
            source = None
        else:
            source = None
    return source


def whole_output(stage: Any, y: Any) -> Any:
    """``y``, an engine.layers ``stage``'s output (its micro-batches'
    joined), gathered over the vocabulary where the stage ends with a
    colwise layer's part of its features (a head planned colwise, its
    logits left split for engine.vocab_parallel_cross_entropy): an
    evaluation's outputs are whole, as a torch head's are (they were this
    rank's part, another on each tp rank). ``y`` as it is elsewhere."""
    end = _watch_feeds(_bare(stage))
    if end is None or not isinstance(y, np.ndarray):
        return y
    return _comm(end.group, y, "ag", -1, end.name)


def cut_edges(stage: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """What a Pipeline's stages tell each other of a cut between them
    (``refuse_cut_fed_whole``), for an engine.layers ``stage``: the colwise
    layer whose part of the features its output is (its name, that part
    and the tp size), and the Linear the plan leaves whole that its input
    meets first, through activations (its name and weight's shape); None
    for each it has not (a torch stage: None, None)."""
    stage = _bare(stage)
    if not isinstance(stage, Sequential):
        return None, None
    end = _watch_feeds(stage)
    told = None if end is None else {"name": end.name, "part": end.inner.weight.shape[1],
                                     "tp": end.group.size}
    top = None
    for name, layer, _, _ in _units(stage):
        if isinstance(layer, _Activation) or isinstance(layer, Sharded) and (
                layer.style.style, layer.style.input) == ("replicate", "shard"):
            continue
        if isinstance(layer, Linear):
            top = {"name": name, "kind": type(layer).__name__,
                   "shape": tuple(layer.weight.shape)}
        break
    return told, top


def refuse_cut_fed_whole(edges: Mapping[int, tuple[Any, Any]], tp_rank: int) -> None:
    """Raise the PlanError of a colwise layer fed to a Linear the plan leaves
    whole (``fed_whole``) where one ends stage s and the other begins stage
    s + 1 (``edges``: each stage's ``cut_edges``, gathered from every pp
    rank, so every rank raises alike, before any step): planned stage by
    stage by hand, numpy's matmul error named neither, on the next stage's
    ranks alone (engine.distribute sees the whole model: refuse_fed_whole)."""
    for s, (end, _) in sorted(edges.items()):
        top = edges.get(s + 1, (None, None))[1]
        if end is None or top is None:
            continue
        fan_in, fan_out = top["shape"]
        what = f"stage {s + 1}'s {top['name']}"
        raise PlanError(fed_whole(tp_rank, f"stage {s}'s {end['name']}", end["part"],
                                  end["tp"], f"{what} ({top['kind']})",
                                  f"its weight is ({fan_in}, {fan_out}), for {fan_in} input "
                                  f"features", what))


def refuse_fed_whole(model: Any) -> None:
    """Raise the PlanError a colwise layer of ``model`` feeding a Linear
    the plan leaves whole raises at its first forward (engine.distribute,
    with the whole plan applied, before any layer is timed; alike on every
    rank: no message)."""
    for s in sharded_layers(model):
        said = s.fed_whole()
        if said is not None:
            raise PlanError(said)
    _refuse_sequence_fed_whole(model)


def _refuse_sequence_fed_whole(model: Any) -> None:
    """Raise where a layer whose input is "sequence" (this rank's part of
    the sequence) is given whole rows: by the model's input (the batch,
    whole on every tp rank) or a layer that leaves them whole. A "sequence"
    layer ran on them with no error and summed its gradients over the
    group, each rank's the whole batch's (tp times too large); a colwise or
    replicate one gathered tp copies of them."""
    rows, source = "whole", "the model's input (the batch, whole on every tp rank)"
    for name, layer, _, _ in _units(model, regions=False):
        inner = _bare(layer)
        if not isinstance(inner, Sharded):
            if not isinstance(inner, (_Activation, Linear, Embedding, Sequential)):
                rows = "?"          # (a layer of its own: its rows are not known)
            continue
        st, g = inner.style, inner.group
        if st.input == "sequence" and rows == "whole" and g.size > 1:
            harm = sequence_harm(st.style, g.size)
            raise PlanError(
                f"tp rank {g.rank}: {name} ({st.style}) takes this rank's part of the "
                f"sequence (input 'sequence'), but {source} gives it whole rows: {harm}; give "
                f"the layer before it output 'sequence' (a rowwise or vocab one), or give "
                f"{name} input 'replicate' (it then takes its part itself)")
        if st.style == "sequence" or st.output == "sequence":
            rows = "whole" if st.output == "replicate" else "sequence"
        elif st.input == "sequence" or st.output == "replicate":
            rows = "whole"
        source = f"{name} ({st.style}, output {st.output!r})"


# the axis of each parameter (by its position in params()) a style splits
_SPLIT = {"colwise": {0: 1, 1: 0}, "rowwise": {0: 0}, "vocab": {0: 0}}


def describe(model: Any, plan: Mapping[str, Any], tp: int, strict: bool = True) -> str:
    """engine.describe_plan for an engine.layers model: what ``parallelize``
    does at tp size ``tp``, with no group and nothing changed. Each
    parameter is called by its key (``"layer.index"``: its top-level
    layer's name and its place in that layer's ``params()``, as
    ``Job.named_parameters()`` and ``state_dict()`` call it) and its
    attribute (``weight``); an engine.layers Linear's weight is (fan_in,
    fan_out), so colwise splits its axis 1."""
    layers = {name: layer for name, layer, _, _ in named_layers(model)}
    keys: dict[int, str] = {}
    for t, layer in enumerate(model.layers):
        keys.update((id(p), f"{t}.{j}") for j, p in enumerate(layer.params()))
    paths = {id(layer): name for name, layer in layers.items()}

    def said(layer: Any, k: int, p: Any) -> str:
        attr = next((a for a, v in vars(layer).items() if v is p), str(k))
        return f"{paths.get(id(layer), '?')}.{attr}"

    styles = match(plan, layers, strict)
    lines = [f"tensor-parallel plan over {tp} ranks: {len(styles)} of {len(layers)} layers "
             f"planned (engine.layers)"]
    planned: set[int] = set()
    for name, style in styles.items():
        layer = layers[name]
        _validate(name, layer, style, tp)
        lines.append(style_said(name, type(layer).__name__, style))
        split = _SPLIT.get(style.style, {})
        leaves = [(sub, k, p) for sub in _leaves(layer) for k, p in enumerate(sub.params())]
        for sub, k, p in leaves:
            planned.add(id(p))
            cut = sub is layer and k in split
            how = shard_said(tuple(p.shape), split[k] if cut else None, tp, style.style)
            lines.append(f"    {said(sub, k, p)} (key {keys[id(p)]}): {how}")
    rest = [said(sub, k, p) for sub in _leaves(model) for k, p in enumerate(sub.params())
            if id(p) not in planned]
    if rest:
        shown = ", ".join(rest[:8]) + (" ..." if len(rest) > 8 else "")
        lines.append(f"  not planned, whole on every tp rank ({len(rest)} tensors): {shown}")
    return "\n".join(lines)


def _leaves(layer: Any) -> list[Any]:
    """The layers holding parameters under ``layer`` (itself, or those of a
    Sequential or a Recompute), in ``params()``'s order."""
    if isinstance(layer, Recompute):
        return _leaves(layer.inner)
    if isinstance(layer, Sequential):
        return [leaf for sub in layer.layers for leaf in _leaves(sub)]
    return [layer]


def _validate(name: str, layer: Any, style: Style, tp: int) -> None:
    if isinstance(layer, Sharded):
        raise PlanError(f"{name} is sharded already (parallelize ran on it before)")
    if style.width:
        raise PlanError(f"{name}: width='shard' is for torch modules that read their input's "
                        f"width; engine.layers take their sizes from their weights")
    kind = {"colwise": Linear, "rowwise": Linear, "vocab": Embedding}.get(style.style)
    if kind is not None and type(layer) is not kind:
        raise PlanError(f"style {style.style!r} fits an engine.layers.{kind.__name__}, but "
                        f"{name} is a {type(layer).__name__}")
    if style.style == "colwise":
        check_divisible(name, "fan_out (weight columns)", layer.weight.shape[1], tp, style.parts)
    elif style.style == "rowwise":
        check_divisible(name, "fan_in (weight rows)", layer.weight.shape[0], tp)
    elif style.style == "vocab":
        check_divisible(name, "num (weight rows)", layer.weight.shape[0], tp)
    check_attrs(layer, name, style, tp)


def _part(a: Any, group: Any, axis: int) -> Any:
    return np.split(a, group.size, axis=axis)[group.rank].copy()


def _shard(layer: Any, name: str, style: Style, group: Any) -> Any:
    rewrite_attrs(layer, style, group.size)
    if style.style == "replicate" and (style.input, style.output) == ("any", "any"):
        return layer
    if style.style == "colwise":     # its columns (of each block, when fused)
        width = layer.weight.shape[1]
        rows = shard_rows(width, style.parts, group.size, group.rank)
        layer.weight, layer.bias = layer.weight[:, rows], layer.bias[rows]
        layer.grad_weight, layer.grad_bias = (np.zeros_like(layer.weight),
                                              np.zeros_like(layer.bias))
        sharded = Sharded(layer, group, style, [1, 0], name=name)
        sharded.order = joined_order(width, style.parts, group.size)
        return sharded
    if style.style == "rowwise":
        return Sharded(_NoBias(_part(layer.weight, group, 0)), group, style, [0, None],
                       bias=layer.bias.copy(), name=name)
    if style.style == "vocab":
        part = _part(layer.weight, group, 0)
        shard = _VocabShard(part, group.rank * len(part), len(layer.weight),
                            f"tp rank {group.rank}: {name}")
        return Sharded(shard, group, style, [0], name=name)
    return Sharded(layer, group, style, [None] * len(layer.params()), name=name)


def sharded_layers(model: Any) -> list[Sharded]:
    """Every Sharded layer in ``model`` (a layer or a Sequential), depth first."""
    if isinstance(model, Sharded):
        return [model] + sharded_layers(model.inner)
    if isinstance(model, Recompute):
        return sharded_layers(_bare(model))
    if isinstance(model, Sequential):
        return [s for layer in model.layers for s in sharded_layers(layer)]
    return []


def _bare(model: Any) -> Any:
    """``model`` without an engine.layers.Recompute around it."""
    return model.inner if isinstance(model, Recompute) else model


def group_of(model: Any) -> Any:
    """The tp group of the first sharded layer in ``model`` (None: none is)."""
    model = _bare(model)
    if isinstance(model, Sharded):
        return model.group
    for layer in model.layers if isinstance(model, Sequential) else []:
        group = group_of(layer)
        if group is not None:
            return group
    return None


def full_shapes(model: Any) -> list[tuple[int, ...]]:
    """The shapes of ``full_params(model)``, the unsharded parameters,
    without a message (every split divides its axis by the tp size)."""
    model = _bare(model)
    if isinstance(model, Sharded) and isinstance(model.inner, Sequential):
        return full_shapes(model.inner)
    if isinstance(model, Sequential):
        return [shape for layer in model.layers for shape in full_shapes(layer)]
    dims = model.dims if isinstance(model, Sharded) else [None] * len(model.params())
    return [tuple(n * model.group.size if i == d else n for i, n in enumerate(p.shape))
            for p, d in zip(model.params(), dims, strict=True)]


def load_full_params(model: Any, whole: list[Any]) -> None:
    """Copy the unsharded parameters ``whole`` (in the unsharded model's
    ``params()`` order, as ``full_params`` gives them) into ``model``: each
    sharded layer takes its own shard of its, cut as parallelize cut it (no
    message). An array not of its parameter's unsharded shape raises
    ValueError before anything is copied (numpy broadcast a (1,) bias
    into every entry of the parameter, with nothing said); None leaves its
    parameter as it is."""
    for j, (w, want) in enumerate(zip(whole, full_shapes(model), strict=True)):
        if w is not None and tuple(np.shape(w)) != want:
            raise ValueError(f"load_full_params: parameter {j} is {want} unsharded, but the "
                             f"array given for it is {tuple(np.shape(w))}")
    _load_full(model, whole)


def _load_full(model: Any, whole: list[Any]) -> None:
    model = _bare(model)
    if isinstance(model, Sharded) and isinstance(model.inner, Sequential):
        return _load_full(model.inner, whole)      # a region: its layers say
    if isinstance(model, Sequential):
        at = 0
        for layer in model.layers:
            n = len(layer.params())
            _load_full(layer, whole[at:at + n])
            at += n
        return
    dims = model.dims if isinstance(model, Sharded) else [None] * len(model.params())
    for p, w, d in zip(model.params(), whole, dims, strict=True):
        if w is None:
            continue
        if d is not None:
            w = np.take(w, shard_rows(w.shape[d], model.style.parts, model.group.size,
                                      model.group.rank), axis=d)
        p[...] = w


def full_params(model: Any, grads: bool = False, timeout: float | None = None) -> list[Any]:
    """``model.params()`` (``grads()`` with ``grads=True``) with every sharded
    layer's gathered whole (collective over each tp group; ``timeout``:
    each gather's, the group's default if None)."""
    model = _bare(model)
    if isinstance(model, Sharded):
        return model.full_params(grads, timeout)
    if isinstance(model, Sequential):
        return [p for layer in model.layers for p in full_params(layer, grads, timeout)]
    return list(model.grads() if grads else model.params())
