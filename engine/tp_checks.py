"""A tensor-parallel plan checked against the torch module it shards
(engine.tensor_parallel), before anything is cut: each style fits its
module, tied parameters are cut alike, head counts and dropouts inside a
module whose heads are split are planned; and how each style cuts a
module's parameters (a Linear's, an Embedding's, a Conv1D's transposed
weight).
"""
from __future__ import annotations

from typing import Any

from .tp_plan import PlanError, Style, check_attrs, check_divisible


def _is_torch(module: Any) -> bool:
    import sys
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(module, torch.nn.Module)


_TYPES = {"colwise": "Linear", "rowwise": "Linear", "vocab": "Embedding"}
_DIMS = {"colwise": {"weight": 0, "bias": 0}, "rowwise": {"weight": 1}, "vocab": {"weight": 0}}
# a Conv1D holds its weight transposed, (in, out): colwise splits its columns
_CONV1D_DIMS = {"colwise": {"weight": 1, "bias": 0}, "rowwise": {"weight": 0}}


def is_conv1d(sub: Any) -> bool:
    """Whether ``sub`` is a Hugging Face ``Conv1D`` (transformers.pytorch_utils:
    GPT-2's c_attn, c_proj, c_fc), known by its duck type: a class named
    Conv1D whose ``weight`` is ``(nx, nf)``, in by out, a Linear's
    transposed, and whose forward is ``addmm(bias, x.view(-1, nx), weight)``
    (transformers is not imported). Its ``nx`` may be missing (older
    transformers kept ``nf`` alone)."""
    shape = tuple(getattr(getattr(sub, "weight", None), "shape", ()))
    nf = getattr(sub, "nf", None)
    return type(sub).__name__ == "Conv1D" and type(nf) is int and len(shape) == 2 and \
        shape[1] == nf and getattr(sub, "nx", shape[0]) == shape[0]


def _dims(sub: Any, style: str) -> dict[str, int]:
    """The axis ``style`` cuts each of ``sub``'s parameters along (a Linear's,
    an Embedding's, a Conv1D's transposed weight's)."""
    return (_CONV1D_DIMS if is_conv1d(sub) else _DIMS).get(style, {})


def _features(sub: Any, out: bool) -> int:
    """A Linear's or a Conv1D's output (``out``) or input features."""
    if is_conv1d(sub):
        return int(sub.nf if out else sub.weight.shape[0])
    return int(sub.out_features if out else sub.in_features)


def _check_ties(named: dict[str, Any], todo: dict[str, tuple[Any, Style]]) -> None:
    """A parameter held by several submodules (tied weights: nanoGPT's token
    embedding and output head) must be cut the same way by each holder's
    style, and every holder must be planned: it is sharded once and the
    holders share the shard, so their gradients add up in it."""
    holders: dict[int, list[str]] = {}
    for mname, sub in named.items():
        for pname, p in sub._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    cuts: dict[int, tuple[Any, set[str]]] = {}     # how each tied one is cut, and by whom
    for name, (sub, style) in todo.items():
        for pname, dim in _dims(sub, style.style).items():
            p = getattr(sub, pname, None)
            if p is None or len(holders.get(id(p), ())) < 2:
                continue
            how, key = (dim, style.parts), f"{name}.{pname}"
            first, keys = cuts.setdefault(id(p), (how, set()))
            if first != how:
                raise PlanError(f"{key} is tied to {min(keys)} (one parameter), but the plan "
                                f"cuts them differently (axis {dim} {style.style} vs axis "
                                f"{first[0]}): give the holders styles that cut it alike "
                                f"(vocab and colwise both split its rows)")
            keys.add(key)
    for pid, (_, keys) in cuts.items():
        for other in holders[pid]:
            if other not in keys:
                raise PlanError(f"{other} is tied to {min(keys)} (one parameter), which the "
                                f"plan shards, but {other.rpartition('.')[0] or 'the module'} "
                                f"is not sharded with it: plan it with a style that cuts the "
                                f"parameter alike (colwise for an output head tied to a "
                                f"vocab embedding)")


def _shard_ids(module: Any) -> set[int]:
    """The ids of the parameters of ``module`` that parallelize has cut to
    this rank's shard already."""
    return {id(getattr(sub, p)) for sub in module.modules()
            if getattr(sub, "_tp", None) is not None for p in sub._tp.dims}


def _check_rewrites(torch: Any, todo: dict[str, tuple[Any, Style]], cut_before: set[int],
                    tp: int) -> None:
    """A count the plan divides by tp (a callable ``attrs`` rewrite: a head
    count) on a module whose parameters all stay whole would run its whole
    weights with a part of its heads: a wrong result on every rank, and no
    error (nn.MultiheadAttention, whose in_proj no plan can shard; an
    attention whose q, k, v and output projections the plan forgot). A
    module with no parameters (an attention core fed sharded q, k, v) may."""
    cut = set(cut_before)
    for sub, style in todo.values():
        cut.update(id(getattr(sub, p)) for p in _dims(sub, style.style)
                   if getattr(sub, p, None) is not None)
    for name, (sub, style) in todo.items():
        counts = sorted(a for a, how in style.attrs.items() if callable(how))
        held = list(sub.named_parameters())
        if not counts or not held:
            continue
        if any(id(p) in cut for _, p in held):
            _check_whole_inside(todo, name, sub, counts)
            if not style.rng:
                _check_dropout_inside(torch, todo, name, sub, counts)
            continue
        params = [n for n, _ in held]
        what = ", ".join(f"{name}.{a}" for a in counts)
        if isinstance(sub, torch.nn.MultiheadAttention):
            raise PlanError(f"plan rewrites {what} for tp={tp}, but nn.MultiheadAttention "
                            f"keeps its projections whole (in_proj_weight is a parameter of "
                            f"its own, which no plan shards): it would attend with fewer "
                            f"heads on whole weights, a wrong result; plan {name} whole "
                            f"without attrs, or write it with nn.Linear projections to shard")
        raise PlanError(f"plan rewrites {what} for tp={tp}, but shards none of {name}'s "
                        f"parameters ({', '.join(params[:3])}{' ...' if len(params) > 3 else ''}"
                        f"): its whole weights would run with a part of the count, a wrong "
                        f"result; plan its projections too (colwise in, rowwise out)")


# the counts an attention cuts its projections' outputs into (q's heads, k's and v's)
HEAD_COUNTS = ("num_heads", "n_head", "n_heads", "nhead", "heads", "num_attention_heads",
               "num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head", "kv_heads")
# the width of one head, where a module keeps it
HEAD_SIZES = ("head_dim", "head_size", "attention_head_size", "d_head", "dim_head", "d_k")


def _check_heads(named: dict[str, Any], todo: dict[str, tuple[Any, Style]], tp: int) -> None:
    """A module whose own projections the plan shards colwise (their outputs
    split: each rank holds a part of the heads) must have its head counts
    (``num_heads``, ``n_head``...) rewritten by the plan too. Left whole, a
    forward that takes the head size from the tensor (``q.view(b, t,
    self.num_heads, -1)``) cut this rank's part into that many heads of
    1/tp the width: another attention on every rank, no error. Where the
    module keeps its head size too (``head_dim``), a count that already
    fits this rank's projections (divided by hand before parallelize, as
    torchtitan does) passes, as does one that fits none of them."""
    if tp == 1:
        return
    for name, sub in named.items():
        cut = {child: _features(m, True) for child, (m, st) in todo.items()
               if st.style == "colwise" and st.output == "shard"
               and child.rpartition(".")[0] == name and child != name}
        if not cut:
            continue
        own = todo.get(name)
        meta = getattr(sub, "_tp", None)
        rewritten = set(own[1].attrs if own else ()) | set(meta.style.attrs if meta else ())
        size = next((vars(sub)[a] for a in HEAD_SIZES if type(vars(sub).get(a)) is int), None)
        # counts divided by hand are all divided so; where the plan rewrites one, the
        # others are not (grouped-query attention at tp = heads / kv_heads: the whole
        # kv_heads * head_dim is q's shard width, and passed for a divided count)
        by_hand = not rewritten & set(HEAD_COUNTS)
        for attr in HEAD_COUNTS:
            count = vars(sub).get(attr)
            if type(count) is not int or attr in rewritten:
                continue
            shard = count * size in {w // tp for w in cut.values()} if size else False
            if size is not None and ((by_hand and shard) or count * size not in cut.values()):
                continue        # this rank's count already, or no projection's
            names = list(cut)
            entry = (f"\"{name}\": (\"replicate\", {{\"{attr}\": lambda n, tp: n // tp}})"
                     if name else f"wrap the module in nn.Sequential and rewrite \"0\"'s {attr}")
            raise PlanError(
                f"{', '.join(names[:3])} {'is' if len(names) == 1 else 'are'} sharded colwise "
                f"(output split: each of the {tp} ranks holds a part of the heads), but the plan "
                f"leaves {name or 'the module'}.{attr} = {count}: its code would cut this "
                f"rank's part into {count} heads of 1/{tp} the width (a view(..., "
                f"self.{attr}, -1)), another attention with no error; rewrite it in the same "
                f"plan: {entry} (a count that is no head count: set it to itself there)")


def _check_whole_inside(todo: dict[str, tuple[Any, Style]], name: str, sub: Any,
                        counts: list[str]) -> None:
    """Refuse an unplanned submodule with trainable parameters inside
    ``sub``, whose head count (``counts``) the plan divides by tp: run on
    this rank's heads (Qwen3's per-head ``q_norm``, ``k_norm``), its whole
    parameters got the gradient of those heads only, another on each tp
    rank, and the ranks' copies drifted apart with nothing said. Whether it
    sees the rank's part or whole activations is the plan's to say:
    ``replicate`` with input ``shard`` sums its gradients over tp, plain
    ``replicate`` keeps them."""
    styles = {id(m): st for m, st in todo.values()}
    theirs: set[int] = set()         # under a planned submodule: its style decides
    for m in sub.modules():
        if m is not sub and (id(m) in styles or getattr(m, "_tp", None) is not None):
            theirs.update(id(p) for p in m.parameters())
    for rel, m in sub.named_modules():
        own = [n for n, p in m.named_parameters(recurse=False)
               if p.requires_grad and id(p) not in theirs]
        if not rel or not own:
            continue
        raise PlanError(
            f"{name}.{rel} ({type(m).__name__}) holds whole parameters ({', '.join(own)}) "
            f"inside {name}, whose {', '.join(counts)} the plan divides by tp, and the plan "
            f"does not say what it sees: on this rank's part of the heads (a per-head q/k "
            f"norm) its gradient would be those heads' only, another on each tp rank, a "
            f"wrong result; plan it: '{name}.{rel}': {{'style': 'replicate', 'input': "
            f"'shard'}} (its gradients summed over tp), or 'replicate' where it sees whole "
            f"activations")


def _check_dropout_inside(torch: Any, todo: dict[str, tuple[Any, Style]], name: str,
                          sub: Any, counts: list[str]) -> None:
    """Refuse an unplanned dropout inside ``sub``, whose head count the plan
    divides and whose entry sets no ``rng``: it draws torch's default
    stream, in step on every tp rank, so where it sees this rank's heads
    (the attention probabilities' dropout) head h got head h + heads/tp's
    mask on the other rank, with nothing said. The plan says which stream:
    the rank's own for the heads, the shared one for the whole output."""
    planned = {id(m) for m, _ in todo.values()}
    under: set[int] = set()         # inside a planned submodule: its style decides
    for m in sub.modules():
        if m is not sub and (id(m) in planned or getattr(m, "_tp", None) is not None):
            under.update(id(d) for d in m.modules())
    for rel, m in sub.named_modules():
        if not rel or id(m) in under or not isinstance(m, torch.nn.modules.dropout._DropoutNd) \
                or not m.p:
            continue
        raise PlanError(
            f"{name}.{rel} ({type(m).__name__}, p={m.p}) inside {name}, whose "
            f"{', '.join(counts)} the plan divides by tp, draws torch's default stream, the "
            f"same on every tp rank: on this rank's part of the heads (the attention "
            f"probabilities) each rank's heads would get the other's masks, not one "
            f"process's independent ones; plan it: '{name}.{rel}': {{'style': 'replicate', "
            f"'rng': 'rank'}}, or 'rng': 'shared' where it sees the whole output (or give "
            f"{name} an 'rng')")


def _validate(torch: Any, name: str, sub: Any, style: Style, tp: int) -> None:
    if hasattr(sub, "_tp"):
        raise PlanError(f"{name} is sharded already (parallelize ran on it before)")
    kind = _TYPES.get(style.style)
    conv1d = kind == "Linear" and is_conv1d(sub)
    if kind and not conv1d and not isinstance(sub, getattr(torch.nn, kind)):
        also = " or a Hugging Face Conv1D" if kind == "Linear" else ""
        odd = "" if type(sub).__name__ != "Conv1D" else (
            f" whose weight ({tuple(getattr(getattr(sub, 'weight', None), 'shape', ()))}) is "
            f"not (nx, nf) = ({getattr(sub, 'nx', '?')}, {getattr(sub, 'nf', '?')}), as Hugging "
            f"Face's is (in by out)")
        raise PlanError(f"style {style.style!r} fits an nn.{kind}{also}, but {name} is a "
                        f"{type(sub).__name__}{odd}")
    base: Any = getattr(torch.nn, kind) if kind else None
    if style.style in ("rowwise", "vocab") and not conv1d and \
            type(sub).forward is not base.forward:
        # these run the base class's computation on the shards (a partial product,
        # masked ids) and sum it: a forward of the subclass's own would be skipped
        raise PlanError(f"style {style.style!r} computes nn.{kind}'s forward on the shards, "
                        f"but {name} is a {type(sub).__name__} with a forward of its own "
                        f"(it would not run): leave it whole ('replicate')"
                        + (", or plan it colwise" if style.style == "rowwise" else ""))
    if style.style == "colwise":
        what = "nf (weight columns)" if conv1d else "out_features (weight rows)"
        check_divisible(name, what, _features(sub, True), tp, style.parts)
    elif style.style == "rowwise":
        what = "nx (weight rows)" if conv1d else "in_features (weight columns)"
        check_divisible(name, what, _features(sub, False), tp)
    elif style.style == "vocab":
        check_divisible(name, "num_embeddings (weight rows)", sub.num_embeddings, tp)
        if sub.max_norm is not None:
            raise PlanError(f"{name}: a vocab-sharded Embedding cannot renormalize (max_norm)")
    check_attrs(sub, name, style, tp)
