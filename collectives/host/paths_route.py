"""Which path a host collective takes (collectives.host.paths): in two
levels across hosts or flat (_hierarchical, _topology), MESH_COLL_DEBUG's
line naming it (_said), the phases its peers run failed with it when a
call fails before its body (_skipped), and a body run on a flat contiguous
view of the caller's array (_in_place)."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from mesh import Comm

from .. import debug
from ..plan import TOPOLOGY_AWARE as plan_TOPOLOGY_AWARE
from ..plan import Tuning, choose, layout
from ..runner import Body, Ctx
from ..shm import board
from . import hier


def _skipped(g: Comm, coll: str, a: Any, root: Any, algorithm: str | None,
             size: Callable[[], int] | None = None) -> Callable[[BaseException, int], None]:
    """For runner.start: when this rank's call fails before its body runs
    and the call runs in two levels, the phases its peers run fail too
    (hier.refuse), so they raise instead of waiting and every sub-group's
    calls stay numbered alike. ``size()``: the bytes the call's layout is
    chosen by, where ``a``'s do not say them (the uneven calls' counts)."""
    def fail(e: BaseException, tag: int) -> None:
        try:
            t = Tuning.from_env()
        except ValueError:  # (the call's own error, e, says so, named: a bare one replaced it)
            t = Tuning()
        try:
            lay = layout(coll, t, algorithm)
        except Exception:
            lay = None
        nbytes = getattr(a, "nbytes", 0) * (g.size if coll == "all_gather" else 1)
        if size is not None:
            try:
                nbytes = size()
            except Exception:   # (counts that fail the call: a's bytes, as said above)
                pass
        if _hierarchical(g.size, coll, lay, nbytes, t):
            try:        # the size rule of the body: the leaders' (columns') algorithm
                large = choose("all_reduce", nbytes, t,
                               algorithm if coll == "all_reduce" else "hier") == "ring"
            except ValueError:
                large = nbytes >= t.small
            hier.refuse(g, tag, coll, root, large, nbytes, e)
    return fail


def _hierarchical(size: int, coll: str, lay: bool | None, nbytes: int, t: Tuning) -> bool:
    """Whether a call may run hierarchically (if its group's layout over
    hosts says so): ``lay`` (collectives.plan.layout) True forces it, False
    forbids it; None chooses it for all_reduce (and reduce_scatter, which
    runs it) at every size (small: one board round on the host around one
    exchange between the leaders), for all_gather and broadcast from
    MESH_COLL_SMALL up (below, the flat tree and ring are quicker)."""
    if lay is False or size < 3:
        return False
    return bool(lay) or nbytes >= t.small or coll in ("all_reduce", "reduce_scatter")



def _topology(ctx: Ctx, coll: str, lay: bool | None, nbytes: int) -> hier.Topology | None:
    """The group's layout over hosts when the call runs hierarchically, else
    None: the flat algorithms (_hierarchical)."""
    if not _hierarchical(ctx.g.size, coll, lay, nbytes, ctx.tuning):
        return None
    return hier.topology(ctx.g)



_SOCKETS = {"rd": "recursive doubling", "ring": "ring", "tree": "binomial tree",
            "chain": "chain", "direct": "direct", "dissemination": "dissemination"}
"""What an algorithm's name is in MESH_COLL_DEBUG's line."""



def _said(ctx: Ctx, coll: str, topo: hier.Topology | None, alg: str,
          nbytes: int | None = None, lay: bool | None = False, kind: str = "") -> None:
    """MESH_COLL_DEBUG's line for this call (collectives.debug): the path
    the body below takes (the two levels' form; the same-host board; else
    ``alg`` over sockets), and why, where forced (``lay``: the layout
    MESH_COLL_ALGO or ``algorithm=`` forced, else None). ``kind``: the
    collective whose paths ``coll`` takes (an uneven call's even one)."""
    kind = kind or coll
    if topo is not None:
        path = hier.form(topo, kind, alg in ("ring", "chain"), nbytes or 0)
    elif ctx.g.size > 1 and board.available(ctx, (nbytes or 0) if coll == "all_reduce"
                                            and alg == "rd" else 0):     # (the body's ask)
        path = f"same-host board ({'small' if alg == 'rd' else 'large'})" \
            if coll == "all_reduce" else "same-host board"
    else:
        path = f"flat, {_SOCKETS.get(alg, alg)} over sockets"
    if lay is not None and kind in plan_TOPOLOGY_AWARE:
        path += " (forced: two levels)" if lay else " (forced: flat)"
    debug.note(ctx.g, coll, path, nbytes)



def _in_place(a: np.ndarray, body: Callable[[Ctx, np.ndarray], None],
              written: bool = True) -> Body:
    """Run ``body`` on a flat contiguous view of ``a`` (a contiguous copy
    written back when ``a`` is not C-contiguous and ``written``: not off a
    reduce's root, whose array is only read and may be read-only); return
    ``a``. A numpy subclass goes as a plain view of its memory: an
    np.matrix stays 2-d when reshaped, and the paths that cut it in chunks
    cut its rows."""
    def run(ctx: Ctx) -> np.ndarray:
        plain = a if type(a) is np.ndarray else a.view(np.ndarray)
        work = plain if plain.flags.c_contiguous else np.ascontiguousarray(plain)
        body(ctx, work.reshape(-1))
        if work is not plain and written:
            plain[...] = work
        return a
    return run
