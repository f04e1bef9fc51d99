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
    replicate any       whole                any|sequence                any|sequence

The first layout listed is the default. Megatron's sequence parallelism is a
"sequence" region (norms, dropouts) between a rowwise (or vocab) module whose
output is ``"sequence"`` (a reduce-scatter instead of an all-reduce) and a
colwise module whose input is ``"sequence"`` (an all-gather on entry). When
module code needs the whole sequence (an attention reading its length from
its input), put the edges on the module: ``replicate`` with input
``"sequence"`` all-gathers on entry (reduce-scatters the gradient) and output
``"sequence"`` reduce-scatters on exit, around colwise modules with input
``"partial"`` and rowwise modules with output ``"partial"`` inside.
``attrs`` rewrites attributes that depend on the shard count after sharding:
a callable gets ``(old value, tp size)``, any other value is set as is.
"""
from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import collectives

__all__ = ["Style", "STYLES", "PlanError", "parse", "match", "edges", "rewrite_attrs",
           "check_divisible", "digest", "agree"]

LAYOUTS = {
    "colwise": (("replicate", "sequence", "partial"), ("shard", "replicate")),
    "rowwise": (("shard",), ("replicate", "sequence", "partial")),
    "vocab": (("replicate",), ("replicate", "sequence")),
    "sequence": (("sequence", "replicate"), ("sequence", "replicate")),
    "replicate": (("any", "sequence"), ("any", "sequence")),
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
    the sequence axis, and attribute rewrites."""
    style: str
    input: str = ""
    output: str = ""
    seq_dim: int = 1
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.style not in LAYOUTS:
            raise PlanError(f"unknown tensor-parallel style {self.style!r}: one of {STYLES}")
        ins, outs = LAYOUTS[self.style]
        object.__setattr__(self, "input", self.input or ins[0])
        object.__setattr__(self, "output", self.output or outs[0])
        if self.input not in ins or self.output not in outs:
            raise PlanError(f"style {self.style!r} takes input in {ins} and output in {outs}, "
                            f"not input={self.input!r} output={self.output!r}")


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
        unknown = set(value) - {"style", "input", "output", "seq_dim", "attrs"}
        if unknown:
            raise PlanError(f"unknown plan keys {sorted(unknown)} in {value!r}")
        return Style(**{**value, "attrs": dict(value.get("attrs", {}))})
    raise PlanError(f"a plan value is a style name, (name, attrs), a dict with 'style' or a "
                    f"Style, not {value!r}")


def match(plan: Mapping[str, Any], names: Iterable[str], strict: bool = True
          ) -> dict[str, Style]:
    """The style of each named submodule the plan covers, in ``names`` order.
    A pattern matching nothing (when ``strict``) or a name matched by two
    patterns raises PlanError."""
    styles = {pattern: parse(value) for pattern, value in plan.items()}
    names = list(names)
    found: dict[str, str] = {}
    for pattern in styles:
        hits = [n for n in names if n and fnmatch.fnmatchcase(n, pattern)]
        if not hits and strict:
            shown = ", ".join(n for n in names[:12] if n) + (" ..." if len(names) > 13 else "")
            raise PlanError(f"plan pattern {pattern!r} matches no submodule (names: {shown})")
        for n in hits:
            if n in found:
                raise PlanError(f"submodule {n!r} is matched by plan patterns {found[n]!r} "
                                f"and {pattern!r}: give it one")
            found[n] = pattern
    return {n: styles[found[n]] for n in names if n in found}


def rewrite_attrs(obj: Any, name: str, style: Style, tp: int) -> None:
    """Apply ``style.attrs`` to ``obj`` (the submodule called ``name``)."""
    for attr, how in style.attrs.items():
        if not hasattr(obj, attr):
            raise PlanError(f"plan rewrites {name}.{attr}, but {name} "
                            f"({type(obj).__name__}) has no attribute {attr!r}")
        setattr(obj, attr, how(getattr(obj, attr), tp) if callable(how) else how)


def check_divisible(name: str, what: str, size: int, tp: int) -> None:
    if size % tp:
        raise PlanError(f"{name}: {what} is {size}, not divisible by the tp size {tp}")


def digest(buffers: Iterable[bytes]) -> str:
    """A short hash of some bytes, for comparing modules across ranks."""
    h = hashlib.blake2b(digest_size=12)
    for b in buffers:
        h.update(b)
    return h.hexdigest()


def agree(group: Any, local: dict[str, str] | str, what: str) -> None:
    """All-gather this rank's ``{name: digest}`` (or its error message) over
    ``group``; raise on every rank if any rank failed (its own error where it
    failed itself) or any name's digest differs, naming the ranks. An empty
    dict compares nothing and only shares the errors."""
    everyone = collectives.all_gather_object(group, local)
    if isinstance(local, str):
        raise PlanError(f"tp rank {group.rank} of group {group.name}: {what}: {local}")
    failed = [(r, e) for r, e in enumerate(everyone) if isinstance(e, str)]
    if failed:
        r, e = failed[0]
        raise PlanError(f"tp rank {group.rank}: {what} failed on tp rank {r} of group "
                        f"{group.name}: {e}")
    assert isinstance(local, dict)
    for name in local:
        seen: dict[str, list[int]] = {}
        for r, d in enumerate(everyone):
            seen.setdefault(d.get(name, "missing"), []).append(r)
        if len(seen) > 1:
            ranks = " vs ".join(str(rs) for rs in seen.values())
            raise PlanError(f"tp rank {group.rank}: {what}: {name} differs across the tp group "
                            f"{group.name} (ranks {ranks}); build the module identically on "
                            f"every rank (same seed) or pass init='broadcast'")
    for r, d in enumerate(everyone):
        extra = set(d) - set(local)  # type: ignore[arg-type]
        if extra:
            raise PlanError(f"tp rank {group.rank}: {what}: tp rank {r} has {sorted(extra)[0]} "
                            f"that rank {group.rank} does not")

