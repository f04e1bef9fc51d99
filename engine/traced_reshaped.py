"""``Reshaped``: a traced model's pieces at the shapes of each step's inputs,
traced again where they differ from the sample's (engine.traced).
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, NamedTuple

from .traced_sequential import sequential

__all__ = ["Reshaped", "TracedAt", "mark"]


class TracedAt(NamedTuple):
    """What a Pipeline of engine.partition's stages traces the model again by
    (``Reshaped.of``), where the pieces hold what the sample's shapes
    decided: the model, the traced ``nn.Sequential`` of all its pieces, how
    many inputs its forward takes, the sample, and the stage's pieces'
    indices in it."""
    source: Any
    seq: Any
    inputs: int
    sample: Any
    pieces: range


_TRACED_AT: "weakref.WeakKeyDictionary[Any, TracedAt]" = weakref.WeakKeyDictionary()
"""engine.partition's stages (``mark``) and their TracedAt: beside the stage,
not on it, so that a stage saved (torch.save) or copied carries no model
(a copy's pieces are not the trace's)."""


_OF: "weakref.WeakKeyDictionary[Any, Reshaped]" = weakref.WeakKeyDictionary()
"""The Reshaped of each partition's trace (by its ``nn.Sequential``): one,
which every Pipeline of its stages shares, so that what one moved the
pieces to, the others know (``now``)."""


def mark(stage: Any, at: TracedAt) -> None:
    """Note that ``stage``, engine.partition's, is made of ``at.seq``'s pieces ``at.pieces``."""
    _TRACED_AT[stage] = at


def _marked(stage: Any) -> TracedAt | None:
    """``stage``'s TracedAt; None where it has none (a stage of the user's
    own, that cannot be weakly referenced or hashed, has none)."""
    try:
        return _TRACED_AT.get(stage)
    except TypeError:
        return None


FORMS = 64
"""The most input shapes whose graphs a Reshaped keeps (``Reshaped._keep``)."""


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
    shapes fails, the step runs the sample's graphs (which raise their
    AssertionError) and a warning says why; where it cuts the model
    otherwise (a forward that reads its rows' count across the layers at
    some lengths alone: no cut there), the step raises a ValueError naming
    the shapes and both cuts (the stages hold the sample's pieces, which
    cannot move between ranks). A Pipeline of engine.partition's stages
    gets one (``of``), as an engine.distribute job makes its own. A rank
    given no inputs (``step(None, y)``: a later stage's) follows the first stage's:
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

    @classmethod
    def of(cls, stages: list[Any], where: str) -> "Reshaped | None":
        """The Reshaped of the pieces of ``stages`` (a Pipeline's own stage
        modules, by hand) that engine.partition marked (``mark``), and of
        the other stages of that partition built here: one for every
        Pipeline of them; None where none is marked. Stages of two
        partitions (two traces) raise."""
        marks = [m for m in map(_marked, stages) if m is not None]
        if not marks:
            return None
        if any(m.seq is not marks[0].seq for m in marks):
            raise ValueError(f"{where}: its stages come from {len(marks)} calls of "
                             f"engine.partition (each traced the model anew): give a "
                             f"Pipeline the stages of one")
        first = marks[0]
        if first.seq not in _OF:    # (over every stage of it built here: a Pipeline's or not)
            sample = (tuple(p[:1] for p in first.sample) if isinstance(first.sample, tuple)
                      else first.sample[:1])
            own = sorted(i for m in list(_TRACED_AT.values()) if m.seq is first.seq
                         for i in m.pieces)
            _OF[first.seq] = cls(first.source, first.seq, own, None, False, first.inputs,
                                 sample, where=where)
        return _OF[first.seq]

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
            self._keep(key, self._traced(zeros if self.many else zeros[0], key))
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
            self._keep(key, self._traced(inputs, key))
        # (where it could not be traced: the sample's graphs, whose checks say so)
        self._use(key if self.forms[key] is not None else self.first)

    def sample(self) -> None:
        """Make the pieces run at the sample's shapes (a job's re-time)."""
        self.want = (self.first, self.kinds)
        self._use(self.first)

    def _keep(self, key: Any, forms: list[tuple[Any, ...]] | None) -> None:
        """Keep ``key``'s forms, and at most FORMS shapes' in all: the least
        lately used dropped first (never the sample's, nor those the pieces
        run at now), so that a program of ever new lengths holds the graphs
        of the last few (it held every length's for good); a length dropped
        is traced again when it comes back."""
        while len(self.forms) >= max(FORMS, 3):
            old = next(k for k in self.forms if k != self.first and k != self.now)
            del self.forms[old]
            for seen in [k for k in self.seen if k[0] == old]:
                del self.seen[seen]
        self.forms[key] = forms

    def _use(self, key: Any) -> None:
        forms = self.forms[key]
        self.forms[key] = self.forms.pop(key)       # (the last used, dropped last: _keep)
        if key == self.now or forms is None:
            return
        for (_, piece), form in zip(self.pieces, forms):
            for a, v in zip(_FORM, form):
                setattr(piece, a, v)
            type(piece).forward = form[-1]
        self.now = key

    def _cut_otherwise(self, key: Any, labels: list[str]) -> str:
        """Why a step at inputs' shapes ``key``, whose trace cuts the model
        into ``labels``, is refused: the stages hold the sample's pieces."""
        return (f"{self.where}{': ' if self.where else ''}{type(self.source).__name__}.forward "
                f"at inputs of shapes {list(key)} (rows aside) is cut into {len(labels)} "
                f"pieces, {_names(labels)}, not the {len(self.labels)} the stages hold, "
                f"{_names(self.labels)}, as at the sample's shapes {list(self.first or ())}: "
                f"a step cannot cut the model otherwise (a cut falls only where the rest of "
                f"the forward reads tensors alone: at these shapes it reads another value "
                f"across the layers, an int such as a size of the rows). Give the steps "
                f"inputs of shapes the forward cuts alike (pad or split them to the sample's "
                f"length), or trace it with a sample of these shapes (engine.distribute's or "
                f"engine.partition's sample=) for steps of them")

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
                raise _CutOtherwise(labels)
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
        except _CutOtherwise as e:
            raise ValueError(self._cut_otherwise(key, e.args[0])) from None
        except (TypeError, ValueError, AssertionError) as e:
            warnings.warn(f"{self.where or 'engine.traced'}: {type(self.source).__name__}"
                          f".forward traced at inputs of shapes {list(key)} (but for their "
                          f"rows) fails ({type(e).__name__}: {e}): the step runs the pieces "
                          f"traced at the sample's shapes", stacklevel=3)
            return None
        for piece, name, value in constants:    # (read as it is: no buffer, in no state dict)
            vars(piece)[name] = value
        forms = []
        for (_, piece), gm in zip(self.pieces, made):
            piece.graph = gm.graph      # (recompiled: its forward, from the new graph)
            forms.append(self._form(piece))
        self.now = key
        return forms


class _CutOtherwise(Exception):
    """A trace at new shapes cut into other pieces (their labels, args[0])."""


def _names(labels: list[str]) -> str:
    """Pieces' labels (``GPT[transformer.h.0]``) as their spans: ``[transformer.h.0, ...]``."""
    return "[" + ", ".join(x[x.find("[") + 1:-1] if x.endswith("]") else x
                           for x in labels) + "]"


def _holds(module: Any, target: str) -> bool:
    """Whether ``module`` has the attribute or submodule named ``target``."""
    import operator
    try:
        operator.attrgetter(target)(module)
    except AttributeError:
        return False
    return True
