"""Tensor-parallel plans as data: which submodule gets which style.

A plan maps fnmatch patterns over submodule names (``*`` crosses dots, as in
fnmatch) to a style; ``engine.parallelize`` applies it to a torch module
(engine.tensor_parallel) or an ``engine.layers`` model (engine.tp_layers).
A plan value is one of::

    "colwise"                                   # a style by name, default layouts
    ("replicate", {"num_heads": lambda n, tp: n // tp})   # style + attribute rewrites
    {"style": "rowwise", "output": "sequence", "attrs": {...}}   # any Style field
    Style("colwise", input="sequence")

Styles and the layouts of their input and output (``shard``: split along the
last axis; ``sequence``: split along ``seq_dim``; ``replicate``: whole and
equal on every rank, its gradient too; ``partial``: a colwise input whose
gradient, or a rowwise output whose value, is a per-rank partial sum that an
enclosing module reduces):

    style     fits      parameters           input                       output
    colwise   Linear    rows (out) split     replicate|sequence|partial  shard|replicate
    rowwise   Linear    columns (in) split   shard                       replicate|sequence|partial
    vocab     Embedding rows (vocab) split   replicate (ids)             replicate|sequence
    sequence  any       whole, grads summed  sequence|replicate          sequence|replicate
    replicate any       whole                any|sequence|shard          any|sequence

A Hugging Face ``Conv1D`` (GPT-2's projections: a Linear's weight held
transposed, ``(in, out)``) takes colwise and rowwise as a Linear, its
weight cut along the other axis (engine.tp_checks.is_conv1d).
A colwise output left ``shard`` (a language model's head: its logits split
over the vocabulary) takes ``F.cross_entropy`` on the shards
(engine.tp_loss, Megatron's vocab-parallel cross entropy).
The first layout listed is the default. Megatron's sequence parallelism is a
"sequence" region (norms, dropouts) between a rowwise (or vocab) module whose
output is ``"sequence"`` (a reduce-scatter instead of an all-reduce) and a
colwise module whose input is ``"sequence"`` (an all-gather on entry). When
module code needs the whole sequence (an attention reading its length from
its input), put the edges on the module: ``replicate`` with input
``"sequence"`` all-gathers on entry (reduce-scatters the gradient) and output
``"sequence"`` reduce-scatters on exit, around colwise modules with input
``"partial"`` and rowwise modules with output ``"partial"`` inside.
A module whose parameters stay whole but which runs on this rank's part of
the features or heads (Qwen3's per-head ``q_norm`` inside an attention whose
heads are sharded) takes ``replicate`` with input ``"shard"``: its gradients,
each rank's heads' part, are summed over the group (as a ``sequence``
module's are); parallelize refuses such a submodule left unplanned inside a
module whose head count it divides.
``attrs`` rewrites attributes that depend on the shard count after sharding:
a callable gets ``(old value, tp size)``, any other value is set as is.

``rng``: where a module draws its random numbers (dropout). Unset (""):
the stream it is in, torch's default one, the same on every tp rank as long
as their programs are (what a replicated activation needs: its dropout
mask must be equal on every rank); ``"rank"``: numbers of this tp rank's
own, from a generator seeded for each forward by the default stream's next
number and the tp rank (Megatron's ``+ 2718 + rank`` offset), so the
default stream moves by that one draw, alike on every rank, and a
checkpointed recomputation gets the same masks again; ``"shared"``: the
default stream even inside a module on a rank's own numbers (the dropout
on such a module's replicated output). A ``"sequence"`` module on a part of
the sequence takes ``"rank"`` by default (each rank holds other tokens); a
dropout on sharded heads (attention probabilities) asks for it:
``"*.attn.drop": {"style": "replicate", "rng": "rank"}``; an attention that
draws its heads' dropout inside its own forward (SDPA's ``dropout_p``)
takes ``"rank"`` whole, its output's dropout ``"shared"``:
``"*.attn": {..., "rng": "rank"}, "*.attn.resid_dropout": {"style":
"replicate", "rng": "shared"}``.

``width="shard"`` (replicate only, torch modules): the module's code sees
its input's last axis as this rank's part of it (its size over tp) where
it reads it (``x.size()``, ``x.shape``), while its computations get the
whole input. A module that sizes its heads by its input's width
(nanoGPT's ``B, T, C = x.size()``, then ``C // self.n_head`` and
``.view(B, T, C)``) then works on its sharded heads unchanged, beside an
``attrs`` rewrite of the head count.

``parts`` (colwise only) shards a fused projection whose output is several
blocks side by side, such as a ``[q; k; v]`` Linear (nanoGPT's ``c_attn``,
Phi-3's ``qkv_proj``): an int k for k equal blocks, or the blocks' sizes
(``(heads * hd, kv_heads * hd, kv_heads * hd)`` under grouped-query
attention). Each block is split over the group on its own, so rank r's
output is its part of every block, in order (``[q_r, k_r, v_r]``), and a
``split`` of the output by the blocks' sizes over tp (an ``attrs`` rewrite)
finds them; its output stays sharded (``"shard"``).
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import collectives
from mesh import AbortKind, Comm, MeshError

__all__ = ["Style", "STYLES", "PlanError", "parse", "match", "named_by", "edges", "rewrite_attrs",
           "check_attrs", "check_divisible", "shard_rows", "joined_order", "digest", "agree",
           "abandoned", "style_said", "shard_said", "fed_whole", "rowwise_fed_whole",
           "sequence_harm", "same_on_every_rank", "as_comm"]

LAYOUTS = {
    "colwise": (("replicate", "sequence", "partial"), ("shard", "replicate")),
    "rowwise": (("shard",), ("replicate", "sequence", "partial")),
    "vocab": (("replicate",), ("replicate", "sequence")),
    "sequence": (("sequence", "replicate"), ("sequence", "replicate")),
    "replicate": (("any", "sequence", "shard"), ("any", "sequence")),
}
STYLES = tuple(LAYOUTS)

# The collectives at a sharded module's edges, (forward, backward, axis), by
# (style, layout); axis None is the sequence axis. id: nothing, ar:
# all-reduce, ag: all-gather, rs: reduce-scatter, split: this rank's part.
Edge = tuple[str, str, "int | None"]
_ENTER: dict[tuple[str, str], Edge] = {
    ("colwise", "replicate"): ("id", "ar", 0),           # Megatron's f
    ("colwise", "sequence"): ("ag", "rs", None),
    ("sequence", "replicate"): ("split", "ag", None),
    ("replicate", "sequence"): ("ag", "rs", None)}
_EXIT: dict[tuple[str, str], Edge] = {
    ("colwise", "replicate"): ("ag", "split", -1),
    ("rowwise", "replicate"): ("ar", "id", 0),           # Megatron's g
    ("rowwise", "sequence"): ("rs", "ag", None),
    ("vocab", "replicate"): ("ar", "id", 0),
    ("vocab", "sequence"): ("rs", "ag", None),
    ("sequence", "replicate"): ("ag", "split", None),
    ("replicate", "sequence"): ("rs", "ag", None)}


class PlanError(ValueError):
    """A plan that cannot be applied; raised before any step runs."""


@dataclass(frozen=True)
class Style:
    """One plan entry: the style, its layouts ("": the style's default),
    the sequence axis, attribute rewrites, and a fused colwise module's
    blocks (``parts``: their count or their sizes; () for one block).
    ``parts=1`` said in the plan is one block too, and says that the code
    calling the module may cut its output's features (a loop over its
    heads one by one): such an output is not watched for cuts
    (``watched``). ``alike``: with input "sequence", the tp ranks' parts
    may be equal (a sequence that repeats), so the first call's check
    for whole rows, the same on every rank (``same_on_every_rank``),
    is not made."""
    style: str
    input: str = ""
    output: str = ""
    seq_dim: int = 1
    attrs: Mapping[str, Any] = field(default_factory=dict)
    parts: int | tuple[int, ...] = ()
    rng: str = ""
    width: str = ""
    alike: bool = False
    watched: bool = field(default=True, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.style == "ulysses":
            raise PlanError("'ulysses' is a plan entry of engine.distribute over a grid with an "
                            "sp axis (engine.sp_axis), not a tensor-parallel style: "
                            "engine.ulysses_attention(model, sp_group, names) runs it alone")
        if self.style not in LAYOUTS:
            raise PlanError(f"unknown tensor-parallel style {self.style!r}: one of {STYLES}")
        ins, outs = LAYOUTS[self.style]
        object.__setattr__(self, "input", self.input or ins[0])
        object.__setattr__(self, "output", self.output or outs[0])
        if self.rng not in ("", "rank", "shared"):
            raise PlanError(f"rng= is 'rank' (this tp rank's own random stream) or 'shared', "
                            f"not {self.rng!r}")
        object.__setattr__(self, "rng", self.rng or ("rank" if self.style == "sequence" else ""))
        if self.width not in ("", "shard"):
            raise PlanError(f"width= is 'shard' (the module reads its input's last axis as "
                            f"this rank's part) or '', not {self.width!r}")
        if self.width and self.style != "replicate":
            raise PlanError(f"width='shard' is for a 'replicate' module whose code reads its "
                            f"input's width, not style {self.style!r}")
        if self.alike and self.input != "sequence":
            raise PlanError(f"alike= says that the tp ranks' parts of the sequence may be equal, "
                            f"for input 'sequence', not input {self.input!r}")
        if self.input not in ins or self.output not in outs:
            raise PlanError(f"style {self.style!r} takes input in {ins} and output in {outs}, "
                            f"not input={self.input!r} output={self.output!r}")
        parts = self.parts
        if isinstance(parts, list):
            parts = tuple(parts)
            object.__setattr__(self, "parts", parts)
        if parts in ((), 1, (1,)):
            object.__setattr__(self, "parts", ())
            object.__setattr__(self, "watched", parts == ())
            return
        if self.style != "colwise" or self.output != "shard":
            raise PlanError(f"parts= shards a fused colwise module whose output stays sharded, "
                            f"not style {self.style!r} with output {self.output!r}")
        ok = (isinstance(parts, int) and not isinstance(parts, bool) and parts > 1) or (
            isinstance(parts, tuple) and len(parts) > 1
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in parts))
        if not ok:
            raise PlanError(f"parts= is a count > 1 or a tuple of block sizes > 0, not {parts!r}")


def edges(style: Style) -> tuple[Edge | None, Edge | None]:
    """The collectives on entry to and on exit from a module of ``style``."""
    return _ENTER.get((style.style, style.input)), _EXIT.get((style.style, style.output))


def parse(value: Any) -> Style:
    """A plan value (a name, (name, attrs), a dict of Style fields, a Style) as a Style."""
    if isinstance(value, Style):
        return value
    if isinstance(value, str):
        return Style(value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], Mapping):
        return Style(value[0], attrs=dict(value[1]))
    if isinstance(value, Mapping) and "style" in value:
        unknown = set(value) - {"style", "input", "output", "seq_dim", "attrs", "parts", "rng",
                                  "width", "alike"}
        if unknown:
            raise PlanError(f"unknown plan keys {sorted(unknown)} in {value!r}")
        return Style(**{**value, "attrs": dict(value.get("attrs", {}))})
    raise PlanError(f"a plan value is a style name, (name, attrs), a dict with 'style' or a "
                    f"Style, not {value!r}")


def named_by(names: Iterable[str], pattern: str) -> list[str]:
    """The submodule names ``pattern`` matches (fnmatch, ``*`` crossing
    dots), in ``names`` order; never the root's empty name. A plan's
    patterns and the names to recompute (engine.checkpoint_modules) alike."""
    return [n for n in names if n and fnmatch.fnmatchcase(n, pattern)]


def match(plan: Mapping[str, Any], names: Iterable[str], strict: bool = True
          ) -> dict[str, Style]:
    """The style of each named submodule the plan covers, in ``names`` order.
    A pattern matching nothing (when ``strict``) or a name matched by two
    patterns raises PlanError."""
    if not isinstance(plan, Mapping):
        raise PlanError(f"the plan maps submodule names (patterns) to styles, as a dict "
                        f"({{'mlp.up': 'colwise'}}), not a {type(plan).__name__}")
    styles = {pattern: parse(value) for pattern, value in plan.items()}
    names = list(names)
    found: dict[str, str] = {}
    for pattern in styles:
        hits = named_by(names, pattern)
        if not hits and strict:
            shown = ", ".join(n for n in names[:12] if n) + (" ..." if len(names) > 13 else "")
            root = ("; a plan names submodules, never the module given itself: wrap it "
                    "(nn.Sequential(module)) and plan '0'" if pattern == "" else "")
            raise PlanError(f"plan pattern {pattern!r} matches no submodule (names: "
                            f"{shown}){root}")
        for n in hits:
            if n in found:
                raise PlanError(f"submodule {n!r} is matched by plan patterns {found[n]!r} "
                                f"and {pattern!r}: give it one")
            found[n] = pattern
    return {n: styles[found[n]] for n in names if n in found}


def check_attrs(obj: Any, name: str, style: Style, tp: int) -> None:
    """Raise unless ``obj`` (the submodule called ``name``) has each
    attribute ``style.attrs`` rewrites, and a count the rewrite divides by
    tp (``lambda n, tp: n // tp``: a head count) splits over it: 3 heads
    over 2 ranks would give each rank one, a third of the attention gone
    without an error."""
    for attr, how in style.attrs.items():
        if not hasattr(obj, attr):
            raise PlanError(f"plan rewrites {name}.{attr}, but {name} "
                            f"({type(obj).__name__}) has no attribute {attr!r}")
        old = getattr(obj, attr)
        if not callable(how) or type(old) is not int or old % tp == 0:
            continue
        new = how(old, tp)
        if type(new) is int and new == old // tp:
            raise PlanError(f"plan rewrites {name}.{attr} = {old} to {new} for tp={tp}: "
                            f"{old} is not divisible by {tp} (the {tp} ranks would hold "
                            f"{new * tp} of {old})")


def rewrite_attrs(obj: Any, style: Style, tp: int) -> None:
    """Apply ``style.attrs`` to ``obj`` (check_attrs checked them)."""
    for attr, how in style.attrs.items():
        setattr(obj, attr, how(getattr(obj, attr), tp) if callable(how) else how)


def check_divisible(name: str, what: str, size: int, tp: int, parts: Any = ()) -> None:
    """Raise unless ``size`` (and, for a fused module, each block of it) splits over tp."""
    if size % tp:
        raise PlanError(f"{name}: {what} is {size}, not divisible by the tp size {tp}")
    blocks = _blocks(name, what, size, parts)
    for i, n in enumerate(blocks if len(blocks) > 1 else ()):
        if n % tp:
            raise PlanError(f"{name}: block {i} of {what} ({n} of {tuple(blocks)}) is not "
                            f"divisible by the tp size {tp}")


def _blocks(name: str, what: str, size: int, parts: Any) -> list[int]:
    """The blocks' sizes (one block of ``size`` without parts)."""
    if not parts:
        return [size]
    if isinstance(parts, int):
        if size % parts:
            raise PlanError(f"{name}: {what} is {size}, not {parts} equal blocks (parts={parts})")
        return [size // parts] * parts
    if sum(parts) != size:
        raise PlanError(f"{name}: the blocks {tuple(parts)} add up to {sum(parts)}, but {what} "
                        f"is {size}")
    return list(parts)


def shard_rows(size: int, parts: Any, tp: int, rank: int) -> list[int]:
    """The indices along the sharded axis that tp rank ``rank`` keeps: its
    contiguous part of each block, blocks in order (without parts, rows
    ``rank * size/tp`` on: a plain chunk)."""
    rows: list[int] = []
    start = 0
    for n in _blocks("", "", size, parts):
        k = n // tp
        rows.extend(range(start + rank * k, start + (rank + 1) * k))
        start += n
    return rows


def joined_order(size: int, parts: Any, tp: int) -> list[int] | None:
    """Where each row of the whole comes from in the ranks' shards laid end
    to end (rank 0's, then rank 1's...): None when that is already in order."""
    if not parts:
        return None
    laid = [i for r in range(tp) for i in shard_rows(size, parts, tp, r)]
    order = [0] * size
    for at, row in enumerate(laid):
        order[row] = at
    return order


def digest(buffers: Iterable[bytes]) -> str:
    """A short hash of some bytes, for comparing modules across ranks."""
    h = hashlib.blake2b(digest_size=12)
    for b in buffers:
        h.update(b)
    return h.hexdigest()


_PLAN = "\0plan "     # agree's keys of the plan's entries, beside the state's names


def abandoned(group: Any, e: BaseException) -> None:
    """This rank's own error after agree's exchange (a submodule cut to its
    shard: a KeyboardInterrupt), which it raises: its tp peers' next
    collective, which it will not make, fails on them at once naming it
    (they went on, and waited in it until their timeout). A collective's
    own error its peers know already."""
    if not isinstance(e, MeshError):
        collectives.abandon(group, f"parallelize failed on tp rank {group.rank}: "
                                   f"{type(e).__name__}: {e}"[:400], AbortKind.of(e))


def planned(local: dict[str, str] | str, todo: Mapping[str, Style]) -> dict[str, str] | str:
    """``local`` (agree's) with the style of each submodule the plan
    covers, so that tp ranks given other plans raise before any shard is cut."""
    if isinstance(local, str):
        return local

    def said(st: Style) -> str:
        more = [f"{k} {v!r}" for k, v, plain in (
            ("seq_dim", st.seq_dim, 1), ("parts", st.parts if st.watched else 1, ()),
            ("rng", st.rng, ""), ("alike", st.alike, False),
            ("width", st.width, ""), ("attrs", sorted(map(_rewrite, st.attrs.items())), []))
            if v != plain]
        return f"{st.style} ({', '.join([f'input {st.input}', f'output {st.output}', *more])})"
    return {**local, **{_PLAN + name: said(st) for name, st in todo.items()}}


def _rewrite(item: tuple[str, Any]) -> str:
    """An ``attrs`` rewrite as ranks can compare it: a plain value as it
    is set; a callable by the attribute's name only (its repr holds an
    address)."""
    attr, how = item
    return f"{attr}={how!r}" if isinstance(how, (int, float, str, bool, type(None))) else attr


def agree(group: Any, local: dict[str, str] | str, what: str,
          failed: BaseException | None = None) -> None:
    """All-gather this rank's ``{name: digest}`` (or its error message) over
    ``group``; raise on every rank if any rank failed (its own error where it
    failed itself) or any name's digest differs, naming the ranks. An empty
    dict compares nothing and only shares the errors. ``failed``: this
    rank's own error besides the plan's (a KeyboardInterrupt as it read the
    module; ``local`` its text), raised here; the others' PlanError naming
    it is then a peer's abort (``from_abort``: engine.distribute names this
    rank, not theirs). Alone, it left them waiting here until their timeout."""
    told = collectives.all_gather_object(group, [local, failed is not None])
    if failed is not None:
        raise failed
    if isinstance(local, str):
        raise PlanError(f"tp rank {group.rank} of group {group.name}: {what}: {local}")
    everyone = [t for t, _ in told]
    broke = [(r, e, own) for r, (e, own) in enumerate(told) if isinstance(e, str)]
    if broke:
        r, e, own = broke[0]
        err = PlanError(f"tp rank {group.rank}: {what} failed on tp rank {r} of group "
                        f"{group.name}: {e}")
        err.from_abort = own        # type: ignore[attr-defined]
        raise err
    assert isinstance(local, dict)
    for name in local:
        seen: dict[str, list[int]] = {}
        for r, d in enumerate(everyone):
            seen.setdefault(d.get(name, "missing"), []).append(r)
        if len(seen) > 1 and name.startswith(_PLAN):
            kinds = "; ".join(f"{'not planned' if v == 'missing' else v} on tp ranks {rs}"
                              for v, rs in seen.items())
            raise PlanError(f"tp rank {group.rank}: {what}: the plan differs across the tp "
                            f"group {group.name}: {name[len(_PLAN):]} is {kinds}; every rank "
                            f"passes the same plan")
        if "missing" in seen:       # a model built otherwise there (another layer count)
            have = sorted(r for v, rs in seen.items() if v != "missing" for r in rs)
            raise PlanError(f"tp rank {group.rank}: {what}: {name} is in the module on tp "
                            f"ranks {have} but not on tp ranks {seen['missing']} of group "
                            f"{group.name}; build the module identically on every rank")
        if len(seen) > 1:
            ranks = " vs ".join(str(rs) for rs in seen.values())
            raise PlanError(f"tp rank {group.rank}: {what}: {name} differs across the tp group "
                            f"{group.name} (ranks {ranks}); build the module identically on "
                            f"every rank (same seed) or pass init='broadcast'")
    for r, d in enumerate(everyone):
        extra = set(d) - set(local)  # type: ignore[arg-type]
        if extra and min(extra).startswith(_PLAN):
            raise PlanError(f"tp rank {group.rank}: {what}: the plan differs across the tp "
                            f"group {group.name}: {min(extra)[len(_PLAN):]} is "
                            f"{d[min(extra)]} on tp rank {r}, not planned on tp rank "
                            f"{group.rank}; every rank passes the same plan")
        if extra:
            raise PlanError(f"tp rank {group.rank}: {what}: tp rank {r} has {sorted(extra)[0]} "
                            f"that rank {group.rank} does not")


def fed_whole(rank: int, name: str, part: int, tp: int, what: str, why: str,
              linear: str = "") -> str:
    """The PlanError's words for a layer the plan leaves whole (``what``,
    called ``linear`` when a Linear) fed the colwise ``name``'s output, this
    rank's ``part`` of the features (torch's and engine.layers')."""
    fix = (f"plan {linear} 'rowwise' (it takes the features' parts and sums them), or "
           if linear else "plan it, or ")
    return (f"tp rank {rank}: {name} is sharded colwise, its output this rank's {part} of "
            f"{part * tp} features, and {what}, which the plan leaves whole, takes that output "
            f"as if whole: {why}; {fix}give {name} output 'replicate' ({{'style': 'colwise', "
            f"'output': 'replicate'}}: its output gathered whole)")


def sequence_harm(style: str, tp: int) -> str:
    """What a layer of ``style`` with input "sequence" does with whole rows."""
    return (f"its whole parameters' gradients are summed over the tp group, each rank's the "
            f"whole batch's: {tp} times too large, with no error" if style == "sequence" else
            f"its all-gather joins {tp} copies of the whole rows")


def same_on_every_rank(group: Any, name: str, style: "Style", data: bytes, shape: Any,
                       constant: bool) -> None:
    """Raise PlanError where a layer whose input is "sequence" (this tp
    rank's part of the sequence) gets the same input on every tp rank, at
    its first call (``data``: its bytes; one all-gather of a hash over the
    group): whole rows, as the batch gives them, which it took for its part
    with no error (a "sequence" layer's gradients ``tp`` times too large).
    A ``constant`` input (zeros) may be equal on every rank by right and
    is let through; so is any input of an entry with ``alike=True``."""
    import numpy as np
    mine = np.frombuffer(hashlib.blake2b(data, digest_size=16).digest(), dtype=np.uint64).copy()
    if constant:        # (never alike: the ranks still gather together)
        mine[0] = group.rank
    told = collectives.all_gather(group, mine, timeout=None)
    if constant or any(not np.array_equal(t, told[0]) for t in told):
        return
    raise PlanError(
        f"tp rank {group.rank}: {name} ({style.style}) takes this rank's part of the sequence "
        f"(input 'sequence'), but its first input, {tuple(shape)}, is the same on every tp "
        f"rank: whole rows, which it takes for its part: "
        f"{sequence_harm(style.style, group.size)}; give the layer before it output "
        f"'sequence' (a rowwise or vocab one), or give {name} input 'replicate' (it then "
        f"takes its part itself); if the ranks' parts are meant to be equal (a sequence that "
        f"repeats), add \"alike\": True to its plan entry (group {group.name})")


def rowwise_fed_whole(rank: int, name: str, part: int, tp: int, got: int) -> str:
    """The PlanError's words for a rowwise layer whose input is not this
    rank's part of its features (no colwise layer before it)."""
    said = "all of them, whole" if got == part * tp else "not its part"
    return (f"tp rank {rank}: {name} is sharded rowwise, its weight this rank's {part} of "
            f"{part * tp} input features, but its input has {got} features ({said}): plan the "
            f"layer before it colwise (its output this rank's part of the features), or leave "
            f"{name} whole (no plan entry)")


_exits = threading.local()   # .last: (module, layout, tp size) the latest sharded forward left


def left(name: str, style: Style, tp: int) -> None:
    """Note that the sharded module ``name`` just left its output in
    ``style``'s output layout (output "any": as it came, unless its input
    was gathered): the module that returns last decides the layout of
    what a forward returns (an enclosing module returns after the ones
    inside it; unplanned code keeps the layout it was given)."""
    out = style.output
    if out == "any":
        if style.input != "sequence":
            return
        out = "replicate"
    _exits.last = (name, out, tp, style.style)


def forget_exits() -> None:
    """Forget the layouts noted so far on this thread (before a forward
    whose output ``split_by`` is then asked about)."""
    _exits.last = None


def split_by() -> tuple[str, str] | None:
    """The sharded module (its name and style) that left the output of
    this thread's latest forward split along the sequence over more than
    one rank, if any."""
    last = getattr(_exits, "last", None)
    if last is None or last[1] != "sequence" or last[2] < 2:
        return None
    return last[0], last[3]


_T = TypeVar("_T")
_calls = threading.local()


def logged(fn: Callable[..., _T]) -> Callable[..., _T]:
    """``fn`` (a tp collective, ``fn(group, x, op, ...)``), whose bytes are
    logged while ``logging_calls`` runs on the calling thread, when it
    moves data (op "ar", "ag" or "rs")."""
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> _T:
        log = getattr(_calls, "log", None)
        if log is not None and args[2] in ("ar", "ag", "rs"):
            x = args[1]
            log.append(int(x.nbytes) if hasattr(x, "nbytes") else x.element_size() * x.numel())
        return fn(*args, **kwargs)
    return call


@contextlib.contextmanager
def logging_calls() -> Iterator[list[int]]:
    """The bytes of each tp collective this thread makes meanwhile, in order
    (what Job.retime's dry run has its stand-in stages exchange)."""
    log: list[int] = []
    _calls.log = log
    try:
        yield log
    finally:
        _calls.log = None


def style_said(name: str, kind: str, style: "Style", width: Any = None) -> str:
    """describe_plan's line for one planned layer or submodule (torch's and
    engine.layers')."""
    extra = "".join(f" {k}={v}" for k, v in (("parts", style.parts), ("rng", style.rng),
                                             ("width", width)) if v)
    attrs = f" attrs {sorted(style.attrs)}" if style.attrs else ""
    return f"  {name} ({kind}): {style.style}, input {style.input}, output {style.output}" \
        f"{extra}{attrs}"


def shard_said(whole: tuple[int, ...], axis: int | None, tp: int, style: str) -> str:
    """describe_plan's words for one parameter: cut on ``axis`` (None: whole)."""
    if axis is not None:
        shard = whole[:axis] + (whole[axis] // tp,) + whole[axis + 1:]
        return f"{list(whole)} -> {list(shard)} a rank (axis {axis} split)"
    return f"{list(whole)} whole on every rank" + (
        ", gradients summed over tp" if style == "sequence" else "")


def as_comm(group: Any, call: str) -> Any:
    """A meshrun communicator, or the one under a torch.distributed group
    (or a one-dimensional DeviceMesh) on the "meshrun" backend; else a
    TypeError naming the rank and ``call`` (parallelize, the vocab-parallel
    loss)."""
    if isinstance(group, Comm):
        return group
    import sys
    from mesh.world import rank_said
    me = rank_said()
    dist = sys.modules.get("torch.distributed")
    if group is None and (dist is None or not dist.is_initialized()):
        raise TypeError(f"{me}{call}: the tp group is None (what world.group(ranks) gives "
                        f"the ranks outside it) and torch.distributed has no default group to "
                        f"take instead: pass the tp communicator (a mesh.grid's group('tp'))")
    torchy = dist is not None and (
        group is None or isinstance(group, dist.ProcessGroup)
        or hasattr(group, "mesh_dim_names")               # a DeviceMesh
        or group is dist.GroupMember.NON_GROUP_MEMBER)    # (comm_of says what it is)
    if torchy:
        from collectives.torchdist import comm_of
        return comm_of(group)
    grid = " (a mesh.Grid: pass its group('tp'))" if hasattr(group, "axes") else ""
    raise TypeError(f"{me}{call}: the tp group must be a meshrun communicator (a "
                    f"mesh.grid's group('tp')) or a torch.distributed group on the "
                    f"'meshrun' backend, not a {type(group).__name__}{grid}")
