"""The schedule IR: for every pipeline rank an ordered list of actions.

A schedule is plain data, so a user's own schedule is as good as a built-in
one: it can be printed, stored as JSON, verified and simulated before any
process starts.

Short string forms (``s`` = stage, ``k`` = micro-batch)::

    sFk         forward of stage s on micro-batch k
    sBk         full backward (input and weight gradients)
    sIk  sWk    backward split: input gradient, then weight gradient
    sSEND_Fk    stage s sends its forward output of k to stage s+1
    sRECV_Fk    stage s receives its forward input of k from stage s-1
    sSEND_Bk    stage s sends the gradient of its input for k to stage s-1
    sRECV_Bk    stage s receives the gradient of its output for k from s+1
    sAR         all-reduce stage s's gradients over the data-parallel group
    sOPT        optimizer step of stage s

``Schedule.stage_ranks[s]`` is the pipeline rank that holds stage s; a rank
may hold several (virtual) stages, listed in stage order by ``stages_of``.

This module imports nothing else from the engine. ``Schedule.lower``,
``validate``, ``simulate`` and ``render`` are the users' short forms of the
later passes (see ``engine``): each imports its pass when called, and no
pass calls them.
"""
from __future__ import annotations

import json
import numbers
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from .simulate import SimReport

__all__ = [
    "Action", "Schedule", "COMPUTE", "COMM", "KINDS", "MessageKey", "message_key",
    "format_program",
    "F", "B", "I", "W", "SEND_F", "RECV_F", "SEND_B", "RECV_B", "AR", "OPT",
]

F, B, I, W = "F", "B", "I", "W"
SEND_F, RECV_F, SEND_B, RECV_B = "SEND_F", "RECV_F", "SEND_B", "RECV_B"
AR, OPT = "AR", "OPT"

COMPUTE = (F, B, I, W)
COMM = (SEND_F, RECV_F, SEND_B, RECV_B)
_PER_STAGE = (AR, OPT)
KINDS = COMPUTE + COMM + _PER_STAGE

_ACTION_RE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|AR|OPT|F|B|I|W)(\d+)?$")


@dataclass(frozen=True)
class Action:
    """One step of one rank: ``kind`` applied to ``stage`` for micro-batch ``mb``.

    ``mb`` is None exactly for the per-stage actions AR and OPT."""

    stage: int
    kind: str
    mb: int | None = None

    def __post_init__(self) -> None:
        if type(self.stage) is not int or not (self.mb is None or type(self.mb) is int):
            self._whole_numbers()       # (plain ints skip it: the simulator makes many)
        if self.kind not in KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.stage < 0:
            raise ValueError(f"negative stage in action {self.stage}{self.kind}")
        if (self.mb is None) != (self.kind in _PER_STAGE):
            want = "no micro-batch" if self.kind in _PER_STAGE else "a micro-batch"
            raise ValueError(f"action kind {self.kind} takes {want}")
        if self.mb is not None and self.mb < 0:
            raise ValueError(f"negative micro-batch in action {self.stage}{self.kind}{self.mb}")

    def _whole_numbers(self) -> None:
        """Stage and micro-batch as ints (numpy's taken), or a TypeError: an
        mb of 1.0 equals 1, so the verifier passed it; its message tag 6.0 was
        then dropped on the wire and the receiving rank timed out."""
        for what, v in (("stage", self.stage), ("micro-batch", self.mb)):
            if v is not None and not _whole(v):
                raise TypeError(f"{what} of action ({self.stage!r}, {self.kind!r}, "
                                f"{self.mb!r}) must be a whole number, got {v!r}")
        object.__setattr__(self, "stage", int(self.stage))
        if self.mb is not None:
            object.__setattr__(self, "mb", int(self.mb))

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{'' if self.mb is None else self.mb}"

    def __repr__(self) -> str:
        return f"Action({str(self)!r})"

    @classmethod
    def parse(cls, text: str) -> "Action":
        """Inverse of ``str()``: ``Action.parse("1F3") == Action(1, "F", 3)``."""
        match = _ACTION_RE.match(text.strip())
        if match is None:
            raise ValueError(f"not an action: {text!r} (forms: 1F3, 1B3, 1I3, 1W3, "
                             "1SEND_F3, 1RECV_F3, 1SEND_B3, 1RECV_B3, 1AR, 1OPT)")
        stage, kind, mb = match.groups()
        return cls(int(stage), kind, None if mb is None else int(mb))

    @property
    def is_comm(self) -> bool:
        return self.kind in COMM


MessageKey = tuple[str, int, int, int]


def message_key(a: Action) -> MessageKey:
    """Identity of the message a SEND/RECV moves: (F|B, from stage, to stage, mb).

    ``1SEND_F3`` and ``2RECV_F3`` both name ("F", 1, 2, 3)."""
    assert a.mb is not None
    if a.kind == SEND_F:
        return (F, a.stage, a.stage + 1, a.mb)
    if a.kind == RECV_F:
        return (F, a.stage - 1, a.stage, a.mb)
    if a.kind == SEND_B:
        return (B, a.stage, a.stage - 1, a.mb)
    if a.kind == RECV_B:
        return (B, a.stage + 1, a.stage, a.mb)
    raise ValueError(f"{a} moves no message")


def _whole(v: Any) -> bool:
    """An int (numpy's too), not a bool or a float that happens to be whole."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _as_action(a: Action | str) -> Action:
    if isinstance(a, Action):
        return a
    if not isinstance(a, str):
        raise TypeError(f"not an action: {a!r} (an Action, or its string form: '1F3')")
    return Action.parse(a)


def _as_row(r: int, row: Iterable[Action | str]) -> tuple[Action, ...]:
    """Rank r's list as actions; an error says which rank and which entry
    (a rank's list given as one string was read letter by letter: "not an
    action: '0'", no rank named)."""
    if isinstance(row, str):
        raise TypeError(f"rank {r}'s list is the string {row!r}: give a list of actions "
                        f"({row.split()!r})")
    out = []
    for i, a in enumerate(row):
        try:
            out.append(_as_action(a))
        except (TypeError, ValueError) as e:
            raise type(e)(f"rank {r}, action {i} ({a!r}): {e}") from None
    return tuple(out)


@dataclass(frozen=True)
class Schedule:
    """Per-rank action lists plus the stage-to-rank map.

    ``ranks[r]`` is the ordered program of pipeline rank r. ``num_stages``
    and ``num_microbatches`` are what the program must cover; the verifier
    checks that it does, exactly once each."""

    ranks: tuple[tuple[Action, ...], ...]
    num_microbatches: int
    stage_ranks: tuple[int, ...]
    name: str = "custom"
    _index: dict[int, tuple[int, ...]] = field(default_factory=dict, init=False,
                                              repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(_as_row(r, row) for r, row in
                                                enumerate(self.ranks)))
        stage_ranks = tuple(self.stage_ranks)
        for s, r in enumerate(stage_ranks):
            if not _whole(r):       # (int() made a rank of 1.7 rank 1, without a word)
                raise TypeError(f"stage {s} is mapped to {r!r}: a rank is a whole number")
        object.__setattr__(self, "stage_ranks", tuple(int(r) for r in stage_ranks))
        if not self.ranks:
            raise ValueError("a schedule needs at least one rank")
        if not _whole(self.num_microbatches):
            raise TypeError(f"num_microbatches must be a whole number, "
                            f"got {self.num_microbatches!r}")
        object.__setattr__(self, "num_microbatches", int(self.num_microbatches))
        if self.num_microbatches < 1:
            raise ValueError(f"need at least one micro-batch, got {self.num_microbatches}")
        if not self.stage_ranks:
            raise ValueError("a schedule needs at least one stage")
        for s, r in enumerate(self.stage_ranks):
            if not 0 <= r < len(self.ranks):
                raise ValueError(f"stage {s} is mapped to rank {r}, outside 0..{len(self.ranks) - 1}")
        for r in range(len(self.ranks)):
            self._index[r] = tuple(s for s, rr in enumerate(self.stage_ranks) if rr == r)

    @classmethod
    def build(cls, ranks: Iterable[Iterable[Action | str]], num_microbatches: int,
              stage_ranks: Sequence[int], name: str = "custom") -> "Schedule":
        """Build from any iterables of actions or their string forms."""
        return cls(tuple(_as_row(r, row) for r, row in enumerate(ranks)),
                   num_microbatches, tuple(stage_ranks), name)

    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    @property
    def num_stages(self) -> int:
        return len(self.stage_ranks)

    def rank_of(self, stage: int) -> int:
        """The pipeline rank that holds ``stage``."""
        return self.stage_ranks[stage]

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages held by ``rank``, in stage order."""
        return self._index[rank]

    @property
    def is_lowered(self) -> bool:
        """True when the program already names its sends and receives."""
        return any(a.is_comm for row in self.ranks for a in row)

    def replace(self, ranks: Iterable[Iterable[Action]], name: str | None = None) -> "Schedule":
        """The same stage map and micro-batch count with other programs."""
        return Schedule(tuple(tuple(row) for row in ranks), self.num_microbatches,
                        self.stage_ranks, self.name if name is None else name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_microbatches": self.num_microbatches,
            "stage_ranks": list(self.stage_ranks),
            "ranks": [[str(a) for a in row] for row in self.ranks],
        }

    def to_json(self, indent: int | None = None) -> str:
        """JSON text with actions in their short string form."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Schedule":
        try:
            return cls.build(data["ranks"], data["num_microbatches"],
                             data["stage_ranks"], str(data.get("name", "custom")))
        except KeyError as e:
            raise ValueError(f"schedule JSON lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        """Inverse of ``to_json``."""
        return cls.from_dict(json.loads(text))

    def lower(self) -> "Schedule":
        """This schedule with sends and receives inserted (see engine.lower)."""
        from .lower import lower
        return lower(self)

    def validate(self) -> "Schedule":
        """Raise ScheduleError (with the grid, bad action marked) unless valid.

        Returns the lowered schedule that was checked."""
        from .verify import verify
        return verify(self)

    def simulate(self, costs: Mapping[str, Any] | None = None,
                 cores: float | None = None, load: float = 0.0) -> "SimReport":
        """Predicted timeline, makespan, bubble and peak activations
        (``cores`` and ``load``: engine.simulate's)."""
        from .simulate import simulate
        return simulate(self, costs, cores, load)

    def render(self, costs: Mapping[str, Any] | None = None,
               cores: float | None = None, load: float = 0.0) -> str:
        """Text grid, ranks x time, bubbles shown as '.', simulated with
        ``costs`` (None: every action one cell, unlike ``simulate()``'s
        B=2; see engine.render)."""
        from .render import render
        return render(self, costs, cores, load)

    def __str__(self) -> str:
        """Name, sizes and each rank's list; cheap (``render()`` draws the grid)."""
        return (f"{self.name}: {self.num_ranks} ranks, {self.num_stages} stages, "
                f"{self.num_microbatches} micro-batches\n{format_program(self)}")


def format_program(sched: Schedule, marks: Sequence[tuple[int, int]] = (),
                   notes: Mapping[int, str] | None = None) -> str:
    """Each rank's list on one line; ``^`` under each (rank, index) in marks,
    and ``<- note`` after the rows named in notes."""
    lines = []
    for r, row in enumerate(sched.ranks):
        head = f"  rank {r} | "
        cells = [str(a) for a in row]
        note = f"   <- {notes[r]}" if notes and r in notes else ""
        lines.append(head + " ".join(cells) + note)
        marked = sorted(i for rr, i in marks if rr == r)
        if marked:
            under = " ".join(("^" if i in marked else " ") * len(c) for i, c in enumerate(cells))
            lines.append((" " * len(head) + under).rstrip())
    return "\n".join(lines)
