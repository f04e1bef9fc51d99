"""ZeRO stage 3's prefetch: the next modules' gathers in flight while one runs.

A step run layer by layer (engine.zero_layers) gathers a module's
parameters as it is about to run. Each gather that moves values (an
``acquire`` of parameters none holds: a module's forward, a backward's
unpack, a read outside a forward) is an event, the parameters' indices
its key; a step's events, in order, are recorded, and once every rank of
the pipeline has agreed that the step succeeded they are the order the
next step of its kind (``step()`` or ``eval_step()``) expects, as
DeepSpeed's stage 3 records its modules' order on the first step:

    recorded:  e0  e1  e2  e3  ...        (window 2)
    event e0:  its gather posted, then e1's and e2's (each into a buffer of its own),
               then e0's waited for
    event e1:  the one expected: its values posted ahead taken (waited for), e3's posted
    an event not the one expected: nothing more posted ahead; what was still serves
               the gathers that need it (the rest waited for at the step's end), and
               the step records the order it ran for the next

A parameter held (or posted for an earlier event) when an event that
gathers it again is posted is not sent twice: the buffer it holds is
handed on when it is dropped (``keep``), so a parameter has one buffer at
a time, and a step holds at most the window's events' bytes more of the
others' values than without, never more than all of them. Two bounds in
elements (a parameter's whole elements, whoever owns it: alike on every
replica), DeepSpeed's: the events posted stop at the first whose new
elements would take those posted ahead and not yet used past ``bucket``
(``stage3_prefetch_bucket_size``; the next event is posted whatever its
size, and 0 posts none), or the elements live outside the event running
past ``max_live`` (``stage3_max_live_parameters``, engine.zero_layers').
Every replica makes the same decisions: they follow the recorded order,
the window, the bounds, the parameters held and the events so far, which
are alike on every replica
(the replicas run the same modules in the same order, as the gathers
already need), and a prefetched gather is the gather an event makes
otherwise, under its tag (the owner sends its value once, each other
replica receives it once, paired in order by source and tag). A value
posted ahead and not taken is waited for once the step has succeeded
everywhere: its owner posted it too, unless the replicas ran their
modules in other orders, which raises, naming it, after the job's timeout
(as a gather waiting for a module some replica skipped does).
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

from mesh import MeshTimeoutError

__all__ = ["Prefetch", "PREFETCH", "BUCKET", "MAX_LIVE"]

PREFETCH = 2    # stage3_prefetch's default: the events a step gathers ahead of the one running
BUCKET = 50_000_000     # stage3_prefetch_bucket_size's (DeepSpeed's): elements gathered ahead
MAX_LIVE = 1_000_000_000    # stage3_max_live_parameters' (DeepSpeed's): elements live at once

_END_WAIT_S = 5.0   # a failed step's prefetch: its owner posted it, or aborted the step's tags


class Prefetch:
    """The recorded gather order of a ``LayerGathers``' steps, per kind,
    and the gathers posted ahead in the step running."""

    def __init__(self, window: int = 0) -> None:
        self.window = window        # the events gathered ahead at most (0: none)
        self.bucket = BUCKET        # and their elements not yet used (0: none ahead)
        self.orders: dict[bool, list[tuple[int, ...]]] = {}     # per kind (eval): agreed
        self.kind = False
        self.seen: list[tuple[int, ...]] = []       # this step's events, in order
        self.order: list[tuple[int, ...]] | None = None     # followed (None: none, or left)
        self.pos = 0        # the next event's place in ``order``
        self.posted = 0     # the events of ``order`` posted so far (or passed)
        # the values posted ahead, by parameter index: (buffer, request); a buffer None:
        # this replica's own (sent), a request None: handed on from its holder (``keep``)
        self.ready: dict[int, tuple[Any, Any]] = {}
        self.marks: dict[int, int] = {}     # a parameter's events posted to be handed on
        self.elems = 0      # the whole elements of ``ready``'s parameters
        self.used = 0       # this step's events whose gathers were posted ahead
        self.missed = 0     # and its events that were not the one expected (0 or 1)

    def reset(self) -> None:
        """Forget the orders (the parameters are indexed anew)."""
        self.orders = {}

    def begin(self, kind: bool) -> None:
        """A step of ``kind`` (eval_step: True) starts: it follows the last
        such step's order, if one was agreed."""
        self.kind = kind
        self.seen, self.ready, self.marks = [], {}, {}
        self.pos = self.posted = self.used = self.missed = self.elems = 0
        self.order = self.orders.get(kind) if self.window > 0 and self.bucket > 0 else None

    def match(self, g: Any, new: Sequence[Any]) -> dict[int, tuple[Any, Any]]:
        """The event gathering ``new`` (each held by none): recorded, and
        the values of ``new`` posted ahead (by parameter index) taken; an
        event not the one the order expects leaves the order (no more
        posted ahead; those posted still taken by the events that gather
        them, the rest waited for at the step's end)."""
        key = tuple(g.index[id(p)] for p in new)
        self.seen.append(key)
        got = {i: self.ready.pop(i) for i in key if i in self.ready} if self.ready else {}
        self.used += bool(got)
        self.elems -= sum(g.numel[i] for i in got)
        order = self.order
        if order is not None:
            if self.pos < len(order) and order[self.pos] == key:
                self.pos += 1
            else:
                self.leave()
        return got

    def leave(self) -> None:
        """The step ran otherwise than the order said: nothing more posted
        ahead, nor handed on."""
        self.missed += 1
        self.order, self.marks = None, {}

    def keep(self, g: Any, p: Any) -> bool:
        """``p``, held by none now, handed on to an event posted ahead that
        gathers it again, if any (True): its buffer kept."""
        i = g.index[id(p)]
        if not self.marks.get(i):
            return False
        self.marks[i] -= 1
        mine = g.kept.owner[id(p)] == g.kept.pipe.dp_index
        self.ready[i] = (None if mine else p.data, None)
        self.elems += g.numel[i]
        return True

    def top_up(self, g: Any, running: int = 0) -> None:
        """Post the gathers of the events ``window`` ahead of the one running
        (those not posted yet), in order, each from its owner into a buffer
        of its own, or, held now or posted for an earlier event, handed on
        from its holder when dropped (one buffer a parameter); stopped at the
        first event whose new elements would take those posted ahead and
        not yet used past ``bucket`` (the next event is posted whatever its
        size), or the elements live outside the module running (``running``
        of them) past ``g.max_live``."""
        order = self.order
        if order is None:
            return
        self.posted = max(self.posted, self.pos)
        end = min(len(order), self.pos + self.window)
        torch = sys.modules["torch"]
        pipe = g.kept.pipe
        dp, me, owner, shape = pipe.dp, pipe.dp_index, g.kept.owner, g.kept.shape
        for j in range(self.posted, end):
            add = sum(g.numel[i] for i in order[j]
                      if not (g.count.get(id(g.params[i])) or i in self.ready))
            if (j > self.pos and self.elems + add > self.bucket) or \
                    g.held_elems + self.elems - running + add > g.max_live:
                break
            for i in order[j]:
                p = g.params[i]
                if g.count.get(id(p)) or i in self.ready:
                    self.marks[i] = self.marks.get(i, 0) + 1
                    continue
                r, tag = owner[id(p)], g.tag_of(p)
                self.elems += g.numel[i]
                if r == me:
                    g.sends += [dp.isend(p.detach(), k, tag=tag) for k in range(dp.size)
                                if k != me]
                    self.ready[i] = (None, None)
                    continue
                buf = torch.empty(shape[id(p)], dtype=p.dtype, device=p.device)
                self.ready[i] = (buf, dp.irecv(r, tag=tag, out=buf))
                g.received += 1
                g.held_bytes += buf.numel() * buf.element_size()
            self.posted = j + 1
        g.peak_bytes = max(g.peak_bytes, g.held_bytes)

    def agreed(self, g: Any) -> None:
        """The step succeeded on every rank: the values posted ahead and not
        taken waited for (every replica posted them alike: an owner that did
        not raises here after the timeout, naming it), and its order the
        next step's."""
        if self.order is not None and self.pos < len(self.order):
            self.leave()        # (it ran fewer events than the order)
        pipe = g.kept.pipe
        try:
            for i, (_, req) in list(self.ready.items()):
                if req is not None:
                    req.wait(pipe.timeout)
                del self.ready[i]
                self.elems -= g.numel[i]
        except MeshTimeoutError as e:
            p = g.params[i]
            e.add_note(f"pp rank {pipe.rank} (dp replica {pipe.dp_index}): ZeRO stage 3's "
                       f"prefetch of a {tuple(g.kept.shape[id(p)])} parameter from dp replica "
                       f"{g.kept.owner[id(p)]} (the step's order the last one's) waited out "
                       f"the timeout: the dp replicas ran their modules in other orders; "
                       f"every replica must run the same modules in the same order "
                       f"(stage3_prefetch=0 gathers each module as it runs, none ahead)")
            self.orders.pop(self.kind, None)
            raise
        if self.window > 0:
            self.orders[self.kind] = self.seen

    def end(self) -> None:
        """The step is done (or failed): what is still posted ahead waited
        for (a failed one's error dropped: the step's own is raised)."""
        for _, req in self.ready.values():
            if req is None:
                continue
            try:
                req.wait(_END_WAIT_S)
            except Exception:
                req.cancel()
        self.ready, self.marks, self.order, self.elems = {}, {}, None, 0
