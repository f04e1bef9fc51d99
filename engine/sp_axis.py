"""``engine.distribute``'s ``sp`` grid axis: Ulysses sequence parallelism
as data.

``mesh.grid(world, dp=1, sp=2, pp=2)`` with ``plan={"blocks.*.attn":
"ulysses"}``: the ranks of an sp group hold the same stages (the same
weights, whole) and each runs its part of every micro-batch's sequence
(axis 1 of every input and target: ``[B, S/P, ...]``); the planned
modules' ``F.scaled_dot_product_attention`` runs over the whole sequence
by Ulysses' all_to_alls on the sp group (engine.ulysses). Everything else
in a step is per token, so the sp ranks are data-parallel replicas of
each other: the pipeline, the gradient average, the loss's mean, the
replicas' first weights and the state's gather all take the dp x sp ranks
as one dp group (``SpGrid``, the grid distribute runs on), and with every
part of equal length each rank's mean over its tokens, averaged, is the
mean over the whole sequence (a per-token loss's sums and counts are
summed over the same ranks). The layers are timed with the sp peers at
once (their all_to_alls in the figures: compute-side time), each timing a
fixed count of runs, as tp peers do.
"""
from __future__ import annotations

from typing import Any, Mapping

from mesh import Comm, Grid

from .tp_plan import PlanError

__all__ = ["ULYSSES", "SpGrid", "sp_group", "replica", "split_plan", "sp_checked", "seq_part",
           "seq_parts"]

ULYSSES = "ulysses"
"""The plan value of a module whose attention runs over the whole sequence on the sp axis."""


class SpGrid(Grid):
    """A grid with an ``sp`` axis as engine.distribute's pipeline sees it:
    the dp and sp axes merged into one ``dp`` axis of ``dp * sp`` ranks
    (the ranks that share the pp and tp coordinates; ``coord("dp")`` this
    rank's index among them), the other axes as the grid's. ``outer``: the
    grid given; ``group("sp")``, ``coord("sp")`` and ``size("sp")`` read
    it. Collective: every rank of the grid makes it."""

    def __init__(self, grid: Grid) -> None:     # (no Grid.__init__: the groups are grid's)
        self.comm, self.outer = grid.comm, grid
        sp = grid.axes["sp"]
        self.axes = {}
        for n, v in grid.axes.items():      # (sp in dp's place where there is no dp axis)
            if n == "dp" or (n == "sp" and "dp" not in grid.axes):
                self.axes["dp"] = grid.axes.get("dp", 1) * sp
            elif n != "sp":
                self.axes[n] = v
        self.names = list(self.axes)
        self._groups = {n: grid.group(n) for n in self.names if n != "dp"}
        lines: dict[tuple[int, ...], list[int]] = {}
        for r in range(grid.comm.size):
            c = grid.coords(r)
            lines.setdefault(tuple(c[a] for a in grid.names if a not in ("dp", "sp")),
                             []).append(r)
        for line in lines.values():     # (every rank makes every line, in the same order)
            g = grid.comm.group(line)
            if g is not None:
                self._groups["dp"] = g
        self._coords = {n: (self._groups["dp"].rank if n == "dp" else grid.coord(n))
                        for n in self.names}

    def coord(self, axis: str) -> int:
        return self.outer.coord(axis) if axis == "sp" else super().coord(axis)

    def group(self, axis: str) -> Comm:
        return self.outer.group(axis) if axis == "sp" else super().group(axis)

    def size(self, axis: str) -> int:
        return self.outer.size(axis) if axis == "sp" else super().size(axis)

    def rank_of(self, **coords: Any) -> int:
        raise NotImplementedError(f"rank {self.comm.rank}: engine.distribute's merged dp x sp "
                                  f"grid: ask the grid given ({self.outer!r})")

    coords = shift = rank_of        # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Grid {self.outer.axes} at {self.outer.coords()}, dp x sp as one dp axis>"


def sp_group(grid: Grid) -> Comm | None:
    """The sp group of engine.distribute's grid, None without one (or sp=1)."""
    return grid.group("sp") if isinstance(grid, SpGrid) and grid.size("sp") > 1 else None


def replica(grid: Grid) -> tuple[int, int]:
    """This rank's dp replica and their count, the sp ranks one replica."""
    if isinstance(grid, SpGrid):
        outer = grid.outer
        return ((outer.coord("dp"), outer.size("dp")) if "dp" in outer.axes else (0, 1))
    return (grid.coord("dp"), grid.size("dp")) if "dp" in grid.axes else (0, 1)


def split_plan(plan: Mapping[str, Any] | None) -> tuple[dict[str, Any] | None, list[str]]:
    """``plan`` without its ``"ulysses"`` entries (None: nothing left), and
    their patterns."""
    if not plan:
        return (dict(plan) if plan is not None else None), []
    if not isinstance(plan, Mapping):
        return plan, []         # (parallelize says what a plan is)
    names = [k for k, v in plan.items() if isinstance(v, str) and v == ULYSSES]
    rest = {k: v for k, v in plan.items() if k not in names}
    return rest or None, names


def sp_checked(grid: Grid, names: list[str], model: Any, traced: bool, is_torch: bool) -> None:
    """The sp axis and the plan's ``"ulysses"`` entries checked against each
    other and the model, alike on every rank (PlanError, a ValueError)."""
    def _size(axis: str) -> int:
        return grid.size(axis) if axis in grid.names else 1
    sp = _size("sp")
    if names and "sp" not in grid.names:
        raise PlanError(f"plan entries {names}: 'ulysses' runs attention over the grid's sp "
                        f"axis, and the grid {grid.axes} has none (mesh.grid(world, sp=2, "
                        f"pp=...))")
    if sp > 1 and not names:
        raise PlanError(f"the grid's sp axis (sp={sp}) splits each micro-batch's sequence "
                        f"(axis 1) over {sp} ranks: the plan names the attention modules that "
                        f"see all of it, plan={{'blocks.*.attn': 'ulysses'}}")
    if not names:
        return
    if not is_torch:
        raise PlanError(f"plan entries {names}: 'ulysses' needs a torch model (its "
                        f"F.scaled_dot_product_attention), not an engine.layers model")
    if _size("tp") > 1 and sp > 1:
        raise PlanError(f"the grid {grid.axes}: sp={sp} with tp={_size('tp')} is not "
                        f"supported; an sp axis runs beside dp and pp only")
    import fnmatch
    from .traced import called_whole
    mods = [n for n, _ in model.named_modules() if n]
    for pat in names:
        hits = [n for n in mods if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise PlanError(f"plan entry {pat!r}: 'ulysses' matches no submodule of the "
                            f"{type(model).__name__}")
        inlined = [n for n in hits if traced and not called_whole(model, n)]
        if inlined:
            raise PlanError(f"plan entry {pat!r}: 'ulysses' names {inlined}, which "
                            f"engine.sequential's trace runs through rather than calls: name "
                            f"the attention modules inside the blocks")


def seq_part(x: Any, comm: Comm, what: str) -> Any:
    """This sp rank's part of ``x`` along axis 1 (a tuple: of each part;
    None as is): ``x[:, r * S // P:(r + 1) * S // P]``. A sequence that
    ``P`` does not divide, or a part with no axis 1, raises ValueError
    naming the rank."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(seq_part(p, comm, what) for p in x)
    shape = tuple(getattr(x, "shape", ()))
    n, r = comm.size, comm.rank
    if len(shape) < 2:
        raise ValueError(f"{what}: a {type(x).__name__} of shape {shape} has no sequence axis "
                         f"(axis 1) to split over the sp axis's {n} ranks")
    if shape[1] % n:
        raise ValueError(f"{what}: axis 1 (the sequence) of a {shape} batch is {shape[1]}, not "
                         f"divisible by sp={n}: give every sp rank a part of equal length")
    k = shape[1] // n
    return x[:, r * k:(r + 1) * k]


def seq_parts(comm: Comm, rank: int) -> Any:
    """A step's inputs and targets cut to this sp rank's parts (the Pipeline's
    ``seq_split(inputs, targets, call)``), its error naming the rank (``rank``,
    the grid's) and ``call``."""
    def split(inputs: Any, targets: Any, call: str) -> tuple[Any, Any]:
        where = f"rank {rank} (sp rank {comm.rank} of {comm.size}): {call}"
        return (seq_part(inputs, comm, f"{where}'s inputs"),
                seq_part(targets, comm, f"{where}'s targets"))
    return split
