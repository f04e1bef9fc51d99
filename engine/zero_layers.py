"""ZeRO stage 3 layer by layer: each module's parameters gathered just before it runs.

Under ``engine.ZeroRedundancyOptimizer(..., stage=3)`` (engine.zero_params)
a step of a torch stage gathers its parameters module by module, not the
stage's whole weights at its start (``stage3_per_layer=False``): each
module that holds sharded parameters itself (a ``Linear``, a
norm, a block's own scale: DeepSpeed's unit) gets them just before its
forward (a forward pre-hook) and drops them after it (a forward hook), so
a rank holds one layer's gathered weights at a time, not the stage's:

    forward:   pre-hook(m): gather m's params   m(x)   hook(m): drop them
    backward:  a saved view of a weight, unpacked: gather its module's params again
               (the two newest modules' kept), all dropped at the action's end

A weight that autograd saves for the backward (``Linear`` saves ``W.t()``)
is not kept: a saved-tensor hook packs a view of a gathered parameter as
(parameter, view's geometry), and unpacking it in the backward gathers the
parameter's module again, so the backward too holds a layer or two at a
time (``KEEP``; the older dropped first where the elements live outside
the module would pass ``max_live``, DeepSpeed's stage3_max_live_parameters),
whatever the schedule: a micro-batch's graph waiting for
its backward (1F1B, interleaved, ZB-V's W) holds no gathered weight, so
micro-batches in flight share nothing to count. Each parameter is counted
(its holders: a module running, a backward's unpack, a stray read), and
dropped when none holds it (a weight tied into two modules of a stage is
one parameter). A parameter read through its module's attribute outside
that module's forward (a parent's ``x @ self.embed.weight.T``, a
recomputed checkpointed module's own weight) is gathered on that read and
held until the action ends. A gather may have been posted ahead: the
next modules' (``stage3_prefetch`` of them, in the order the last step
ran them) are posted as a module is gathered, so they travel while it
runs (engine.zero_prefetch; ``acquire`` takes them, ``release`` hands a
parameter's buffer on to a gather of it posted ahead).

Between the gathers a parameter another replica owns holds a placeholder
of its whole shape and no storage (one element, expanded: NaN where the
dtype has one), so its gradient and ``.shape`` are the whole parameter's
during the step; between steps it is empty as before (engine.zero_params).
The values travel point-to-point on the dp group, each from its owner to
the other replicas, under a tag of the step and the parameter: every
replica runs the same modules in the same order, so the messages pair up
in order (per source and tag); a failed step aborts the step's tags
(``abandon``), so a replica waiting for a gather raises at once and a late
message is dropped, and the dp group's collectives stay numbered alike.
"""
from __future__ import annotations

import collections
import contextlib
import math
import sys
import weakref
from typing import Any, Iterator, Sequence

from mesh import MeshTimeoutError

from .zero_prefetch import MAX_LIVE, Prefetch

__all__ = ["LayerGathers", "KEEP"]

KEEP = 2        # the modules a backward keeps gathered at once (the newest)
_GATHER = 1 << 31   # a step's gather tags: above its pipeline messages' indices


class _Ref:
    """A saved tensor that was a view of a gathered parameter: the
    parameter and the view's geometry (made again when unpacked)."""

    __slots__ = ("p", "size", "stride", "offset")

    def __init__(self, p: Any, t: Any) -> None:
        self.p, self.size, self.stride, self.offset = p, t.size(), t.stride(), t.storage_offset()


class _Fetching(collections.OrderedDict):
    """A module's ``_parameters`` that gathers a sharded parameter read
    through the module's attribute while a step runs without it (the
    module's forward not running): held until the step's action ends.
    Pickled and deep-copied as a plain OrderedDict."""

    def __init__(self, items: Any, gathers: "LayerGathers", module: Any) -> None:
        super().__init__(items)
        self.gathers = weakref.ref(gathers)
        self.module = weakref.ref(module)

    def __getitem__(self, name: str) -> Any:
        p = super().__getitem__(name)
        g = self.gathers()
        if g is not None and g.active and g.count.get(id(p)) == 0:
            g.stray_read(self.module())
        return p

    def __reduce__(self) -> Any:
        return (collections.OrderedDict, (list(self.items()),))


class LayerGathers:
    """The per-module gathers of a Pipeline's ZeRO stage 3 parameters
    (``ShardedParams``'s, whose ``owner`` and ``shape`` they read)."""

    def __init__(self, kept: Any) -> None:
        self.kept = kept
        self.active = False         # a step runs layer by layer now
        self.stages: set[int] = set()   # the stages it runs so
        self.count: dict[int, int] = {}     # each sharded parameter's holders (by id)
        self.units: dict[int, list[Any]] = {}   # each module's own sharded parameters (by id)
        self.unit_of: dict[int, list[Any]] = {}     # each parameter's first module's
        self.index: dict[int, int] = {}     # each parameter's place (its tag)
        self.params: list[Any] = []         # the parameters by their place
        self.numel: list[int] = []          # and their whole elements
        self.live: dict[int, Any] = {}      # gathered storages' addresses: their parameters
        self.blank: dict[int, Any] = {}     # the placeholders of the others' parameters
        self.back: list[list[Any]] = []     # what the backward gathered (oldest first)
        self.stray: list[list[Any]] = []    # what reads outside a forward gathered
        self.sends: list[Any] = []
        self.tag = 0
        self.held_bytes = 0         # the others' parameters' bytes held now, and the most
        self.peak_bytes = 0         # held at once during the last step
        self.held_elems = 0         # the whole elements of the parameters held now (any owner)
        self.max_live = MAX_LIVE    # those live outside the module running at most
        self.received = 0           # the values this rank received in the last step
        self.ahead = Prefetch()     # the next modules' gathers posted ahead (zero_prefetch)

    # ---- set up (ShardedParams.take)

    def watch(self, params: Sequence[Any], modules: Sequence[Any]) -> None:
        """Index the sharded ``params`` (the replicas' common order: their
        tags) and the ``modules`` holding some of them directly."""
        self.index = {id(p): i for i, p in enumerate(params)}
        self.params = list(params)
        self.numel = [math.prod(self.kept.shape[id(p)]) for p in params]
        self.ahead.reset()
        self.units, self.unit_of = {}, {}
        for m in modules:
            own = [p for p in m.parameters(recurse=False) if id(p) in self.index]
            if own:
                self.units[id(m)] = own
                for p in own:
                    self.unit_of.setdefault(id(p), own)
                if not isinstance(m.__dict__.get("_parameters"), _Fetching):
                    m.__dict__["_parameters"] = _Fetching(m._parameters.items(), self, m)

    # ---- a step

    def begin(self, stages: set[int], tag: int, params: Sequence[Any],
              kind: bool = False) -> None:
        """A step runs ``stages`` layer by layer: the others' ``params``
        (of those stages) get their placeholders; ``tag`` the step's;
        ``kind`` True for an eval_step (its gathers' order its own)."""
        torch = sys.modules["torch"]
        me = self.kept.pipe.dp_index
        self.active, self.stages, self.tag = True, stages, tag
        self.count = {id(p): 0 for p in params}
        self.live, self.back, self.stray, self.sends = {}, [], [], []
        self.held_bytes = self.peak_bytes = self.held_elems = self.received = 0
        self.ahead.begin(kind)
        for p in params:
            if self.kept.owner[id(p)] != me:
                blank = self.blank.get(id(p))
                shape = self.kept.shape[id(p)]
                if blank is None or tuple(blank.shape) != tuple(shape) or \
                        blank.dtype != p.dtype or blank.device != p.device:
                    one = torch.full((1,), float("nan"), dtype=p.dtype, device=p.device) \
                        if p.dtype.is_floating_point else \
                        torch.zeros(1, dtype=p.dtype, device=p.device)
                    blank = self.blank[id(p)] = one.expand(*shape)
                p.data = blank

    def tag_of(self, p: Any) -> int:
        """The tag of ``p``'s gathers in the step running."""
        return self.tag + _GATHER + self.index[id(p)]

    def acquire(self, params: Sequence[Any]) -> None:
        """One more holder of each of ``params``: those held by none get
        their values (each from its owner, all in flight, or posted ahead
        as the step's order predicted: engine.zero_prefetch), the next
        modules' posted ahead, then these waited for."""
        new = [p for p in params if self.count.get(id(p)) == 0]
        for p in params:
            if id(p) in self.count:
                self.count[id(p)] += 1
        if not new:
            return
        torch = sys.modules["torch"]
        pipe = self.kept.pipe
        dp, me, owner = pipe.dp, pipe.dp_index, self.kept.owner
        recvs = []
        got = self.ahead.match(self, new)
        for p in new:
            self.held_elems += self.numel[self.index[id(p)]]
            r = owner[id(p)]
            tag = self.tag_of(p)
            posted = got.get(self.index[id(p)])
            if posted is not None:
                if r != me:
                    p.data = posted[0]
                    if posted[1] is not None:       # (else handed on: its values here)
                        recvs.append(posted[1])
            elif r == me:
                self.sends += [dp.isend(p.detach(), k, tag=tag) for k in range(dp.size)
                               if k != me]
            else:
                p.data = torch.empty(self.kept.shape[id(p)], dtype=p.dtype, device=p.device)
                recvs.append(dp.irecv(r, tag=tag, out=p.detach()))
                self.received += 1
                self.held_bytes += p.numel() * p.element_size()
            self.live[p.untyped_storage().data_ptr()] = p
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        self.ahead.top_up(self, sum(self.numel[self.index[id(p)]] for p in params
                                    if id(p) in self.count))
        try:
            for req in recvs:
                req.wait(pipe.timeout)
        except BaseException as e:
            for p in params:        # (not held: the step fails, end() drops the rest)
                if id(p) in self.count:
                    self.count[id(p)] -= 1
            if isinstance(e, MeshTimeoutError):     # (not a failed peer's abort)
                shapes = ", ".join(f"{tuple(self.kept.shape[id(p)])} from dp replica "
                                   f"{owner[id(p)]}" for p in new if owner[id(p)] != me)
                e.add_note(f"pp rank {pipe.rank} (dp replica {me}): ZeRO stage 3 gathering "
                           f"a module's parameters ({shapes}) as it runs: every dp replica "
                           f"runs the same modules in the same order (a module called on "
                           f"some replicas only waits for its gather; stage3_per_layer=False "
                           f"gathers a stage's weights whole)")
            raise

    def release(self, params: Sequence[Any]) -> None:
        """One holder fewer of each of ``params``: those held by none now
        dropped (the others' back to their placeholders)."""
        me, owner = self.kept.pipe.dp_index, self.kept.owner
        for p in params:
            n = self.count.get(id(p))
            if not n:
                continue
            self.count[id(p)] = n - 1
            if n == 1:
                self.held_elems -= self.numel[self.index[id(p)]]
                self.live.pop(p.untyped_storage().data_ptr(), None)
                if self.ahead.keep(self, p):     # (its values an event posted ahead's)
                    if owner[id(p)] != me:
                        p.data = self.blank[id(p)]
                elif owner[id(p)] != me:
                    self.held_bytes -= p.numel() * p.element_size()
                    p.data = self.blank[id(p)]

    def stray_read(self, module: Any) -> None:
        """``module``'s parameters read through its attribute with none of
        them held: gathered until the action ends."""
        own = self.units.get(id(module)) if module is not None else None
        if own:
            self.acquire(own)
            self.stray.append(own)

    def _pack(self, t: Any) -> Any:
        try:
            p = self.live.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):     # (a sparse tensor has no storage)
            return t
        if p is None or t.dtype != p.dtype or t.device != p.device:
            return t
        return _Ref(p, t)

    def _unpack(self, x: Any) -> Any:
        if not isinstance(x, _Ref):
            return x
        p = x.p
        if self.active and self.count.get(id(p)) == 0:
            own = self.unit_of[id(p)]
            # (the oldest dropped: a view unpacked from it before lives on)
            while self.back and (len(self.back) >= KEEP or self._outside(own) > self.max_live):
                self.release(self.back.pop(0))
            self.acquire(own)
            self.back.append(own)
        return p.detach().as_strided(x.size, x.stride, x.offset)

    def _outside(self, own: Sequence[Any]) -> int:
        """The whole elements live (held, or posted ahead) but ``own``'s."""
        mine = sum(self.numel[self.index[id(p)]] for p in own
                   if self.count.get(id(p)) or self.index[id(p)] in self.ahead.ready)
        return self.held_elems + self.ahead.elems - mine

    @contextlib.contextmanager
    def computing(self, s: int) -> Iterator[None]:
        """Stage ``s``'s forward or backward action: the weights autograd
        saves packed (``_pack``), and what its backward and stray reads
        gathered dropped at its end."""
        if not self.active or s not in self.stages:
            yield
            return
        torch = sys.modules["torch"]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            for held in (self.back, self.stray):
                while held:
                    self.release(held.pop())

    def agreed(self) -> None:
        """Every rank's step succeeded: its gathers' order the next's (and
        its prefetches not used waited for: engine.zero_prefetch)."""
        if self.active:
            self.ahead.agreed(self)

    def end(self) -> None:
        """The step is done (or failed): its sends waited for (a failed
        one's error dropped: the step's own is raised), every count
        cleared; ShardedParams.free drops the values."""
        if not self.active:
            return
        self.ahead.end()
        for w in self.sends:
            try:
                w.wait()
            except Exception:
                pass
        self.sends, self.back, self.stray, self.live = [], [], [], {}
        self.count = {}
        self.held_bytes = self.held_elems = 0
        self.active = False

    def abandon(self, reason: str, kind: Any, lost: int | None) -> None:
        """This rank's step failed: every gather tag of the step aborted on
        the dp group, so a replica waiting for one of this rank's
        parameters raises now, and a message still coming is dropped."""
        if not self.active:
            return
        ch = self.kept.pipe.dp.collective_channel()
        for i in sorted(set(self.index.values())):
            ch.abort(self.tag + _GATHER + i, reason, kind, lost)
