"""ZeRO stages 1 to 3 over a job's dp axis: each dp replica keeps the
optimizer state of its own share of the parameters, not of all of them
(stage 1), with ``stage=2`` its share's gradients only too, and with
``stage=3`` its share's parameters only too (between steps).

torch's ``ZeroRedundancyOptimizer`` and DeepSpeed's
``zero_optimization: {"stage": 1}``, on a mesh group::

    opt = engine.ZeroRedundancyOptimizer(job.parameters(), torch.optim.AdamW, job, lr=3e-4)
    opt.zero_grad(); job.step(x, y); job.clip_grad_norm_(1.0); opt.step()
    optim = job.optimizer_state_dict(opt)     # whole, by name, as without ZeRO

The job's step averages the gradients over dp as it does for any optimizer;
``step()`` then runs ``optimizer_class`` on this replica's share alone and
gives every replica the others' updated parameters (each broadcast from
its owner in place, all in flight at once). Whole parameters are dealt
out as torch's are: largest first, each to the replica holding the fewest
elements so far, so a rank keeps about 1/dp of the state (AdamW's two
moments: 2/dp of the weights' bytes instead of 2x).

    dp rank:      0            1
    params:   [w0, b1]     [w1, b0]     each steps its own, then broadcasts it
    state:    w0, b1's     w1, b0's     (nothing of the other's)

``stage=2`` (DeepSpeed's ``{"stage": 2}``; the job must be the process
group): the job's step reduces each gradient to its owner (engine.
zero_grads: ``collectives.reduce``, op="avg", where stage 1's all-reduce
was) and frees it on the others after the step, so between steps a
replica holds its share's gradients (about 1/dp of them);
``job.clip_grad_norm_`` counts each on its owner, and ``step()`` is the
same.

``stage=3`` (DeepSpeed's ``{"stage": 3}``; the job a torch model's): the
parameters too (engine.zero_params): between steps a replica holds its
share's values only (the others' ``.data`` an empty tensor), each step
gathers the others from their owners, module by module as each runs
(engine.zero_layers; ``stage3_per_layer=False``: a stage's whole weights
at the step's start), and drops them again, and ``step()`` sends nothing
(the next step's gathers do). DeepSpeed's bounds, in elements, as its
config names them: ``stage3_prefetch_bucket_size`` and
``stage3_max_live_parameters`` bound the gathers posted ahead and kept
(engine.zero_prefetch, engine.zero_layers); a parameter of
``stage3_param_persistence_threshold`` elements at most stays whole on
every replica, its gradient and state its owner's as under stage 2, and
``step()`` broadcasts it.

This module is the optimizer itself; its arguments are checked and agreed
across the replicas in engine.zero_args.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

import collectives
from mesh.tensors import is_tensor

from .zero_args import _agreed, _dp_of, _numel
from .zero_prefetch import BUCKET, MAX_LIVE, PREFETCH

__all__ = ["ZeroRedundancyOptimizer", "shares"]

_TAG = (1 << 60) + (1 << 42)    # consolidate_state_dict's messages, above the job's own


def shares(sizes: list[int], n: int) -> list[int]:
    """The replica (0..n-1) that owns each of ``sizes``' parameters:
    largest first (ties in order), each to the replica holding the fewest
    elements so far (the lowest of those tied), as torch's
    ZeroRedundancyOptimizer deals them."""
    held = [0] * n
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(n), key=lambda r: (held[r], r))
        owner[i], held[r] = r, held[r] + sizes[i]
    return owner


class ZeroRedundancyOptimizer(torch.optim.Optimizer):
    """``optimizer_class`` over this dp replica's share of ``params`` (a
    list of tensors, or of param groups as torch's optimizers take them),
    its state kept for that share only. ``process_group``: the job
    (``engine.distribute``'s: its dp group and timeout) or a mesh group of
    the replicas. ``param_groups`` are the whole groups (an LR scheduler
    changes them; ``step()`` hands the hyperparameters on to the share's
    optimizer, ``optim``); ``state`` is empty: each replica's is
    ``optim.state``, and ``job.optimizer_state_dict(opt)`` gathers them,
    whole and by name, as for an optimizer without ZeRO. ``stage``: 1, 2
    (``process_group`` the job, whose step then keeps each gradient on
    its owner alone; its parameters the job's) or 3 (each parameter's
    values too, between steps; ``stage3_per_layer``: a step gathers each
    module's as it runs, else a stage's whole weights for the step;
    ``stage3_prefetch``: the modules whose gathers a step posts ahead of
    the one running, in the order the last step ran them, 0 none,
    engine.zero_prefetch; ``stage3_prefetch_bucket_size``: their new
    elements not yet used, at most, but the next module's; ``stage3_max_
    live_parameters``: the elements gathered at once outside the module
    running, at most; ``stage3_param_persistence_threshold``: parameters
    of as many elements or fewer kept whole on every replica, as stage 2
    keeps them): see the module docstring.
    A job's newest such optimizer over a parameter says how the job reduces
    its gradient (a stage 1 one over the job: averaged on every replica
    again). Collective over the dp group: building it (the replicas'
    parameters and stages compared), ``step()`` and
    ``consolidate_state_dict()``."""

    def __init__(self, params: Iterable[Any], optimizer_class: type,
                 process_group: Any, *, stage: int = 1, stage3_per_layer: bool = True,
                 stage3_prefetch: int = PREFETCH, stage3_prefetch_bucket_size: int = BUCKET,
                 stage3_param_persistence_threshold: int = 0,
                 stage3_max_live_parameters: int = MAX_LIVE, **defaults: Any) -> None:
        self.group, self.timeout = _dp_of(process_group)
        g = self.group
        self.where = f"rank {g.ranks[g.rank]}: ZeroRedundancyOptimizer on group {g.name}"
        job = process_group if getattr(process_group, "grid", None) is not None else None
        whole, knobs, told = _agreed(g, self.where, job, self.timeout, params, optimizer_class,
                                     stage, stage3_per_layer, stage3_prefetch,
                                     (stage3_prefetch_bucket_size,
                                      stage3_param_persistence_threshold,
                                      stage3_max_live_parameters), defaults)
        self.stage = stage
        self.stage3_per_layer = stage3_per_layer
        self.stage3_prefetch = stage3_prefetch
        self.stage3_prefetch_bucket_size, self.stage3_param_persistence_threshold, \
            self.stage3_max_live_parameters = knobs[2:]
        self.job: Any = job     # (None: a mesh group, stage 1)
        self._building = True
        super().__init__([dict(grp) for grp in whole.param_groups], dict(whole.defaults))
        self._building = False
        self.consolidated = False     # state holds every replica's share (on rank ``to``)
        self.optimizer_class = optimizer_class
        self.params = [p for grp in self.param_groups for p in grp["params"]]
        other = next((r for r, t in enumerate(told) if t != told[0]), None)
        if other is not None:
            raise ValueError(f"{self.where}: the parameters given differ between ranks "
                             f"{g.ranks[0]} and {g.ranks[other]} (their dtypes and shapes, in "
                             f"order): the group is the job's dp replicas (process_group=job), "
                             f"each making it of its own job.parameters()")
        sizes = [_numel(job, p) for p in self.params]
        self.owner = shares(sizes, g.size)
        self.mine = {id(p) for p, r in zip(self.params, self.owner) if r == g.rank}
        self.optim = optimizer_class(
            [{**self._hyper(grp), "params": [p for p in grp["params"] if id(p) in self.mine]}
             for grp in self.param_groups], **defaults)
        self.optim._zero_share = True   # (stepped from step(): engine.zero_grads' check)
        if job is not None:     # stage 2: each gradient reduced to its owner alone, and kept
            job._grads_kept_by(self.params, self.owner if stage > 1 else None)  # there only
            # stage 3: each parameter's values too, between steps (engine.zero_params), but
            # those of persistence_threshold elements at most (whole on every replica, stage 2)
            job._params_kept_by(self.params, [
                None if n <= self.stage3_param_persistence_threshold else r
                for n, r in zip(sizes, self.owner)] if stage == 3 else None,
                stage3_per_layer, stage3_prefetch, self.stage3_prefetch_bucket_size,
                self.stage3_max_live_parameters)

    def grad_bytes(self) -> int:
        """The bytes of the gradients this replica holds of ``params`` (under
        stage 2, after the step: its share's only)."""
        return sum(p.grad.numel() * p.grad.element_size() for p in self.params
                   if p.grad is not None)

    def param_bytes(self) -> int:
        """The bytes of the values this replica holds of ``params`` (under
        stage 3, between steps: its share's only)."""
        return sum(p.numel() * p.element_size() for p in self.params)

    def peak_gathered_bytes(self) -> int:
        """Under stage 3: the most bytes of other replicas' parameters this
        rank held at once during the job's last step (its stages' whole
        weights' share, or with ``stage3_per_layer`` the modules' gathered
        at one time); else 0."""
        if self.stage != 3 or self.job is None:
            return 0
        return int(self.job.pipeline.owned_params.peak_bytes())

    def gathers_received(self) -> int:
        """Under stage 3: the values of other replicas' parameters this rank
        received in the job's last step (one message each: layer by layer
        from their owners, gathered whole a broadcast each); else 0. A
        persistent parameter (``stage3_param_persistence_threshold``) is none
        of them: ``step()`` broadcasts it from its owner instead."""
        if self.stage != 3 or self.job is None:
            return 0
        return int(self.job.pipeline.owned_params.received())

    def persists(self, p: Any) -> bool:
        """Under stage 3, whether ``p`` stays whole on every replica
        (``stage3_param_persistence_threshold`` elements at most): its
        gradient and state on its owner alone, as stage 2 keeps them."""
        return self.stage == 3 and _numel(self.job, p) <= self.stage3_param_persistence_threshold

    def holds(self, p: Any) -> bool:
        """Whether ``p`` is in this replica's share (its state kept here)."""
        return id(p) in self.mine

    @staticmethod
    def _hyper(grp: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in grp.items() if k != "params"}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_building", True):
            raise NotImplementedError(f"{self.where}: add_param_group after it is made: make "
                                      f"it with every group (the shares are dealt once)")
        super().add_param_group(param_group)

    def _handed_on(self) -> None:
        """The whole groups' hyperparameters (an LR scheduler's lr) on the
        share's optimizer's groups."""
        for grp, own in zip(self.param_groups, self.optim.param_groups):
            own.update(self._hyper(grp))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:   # type: ignore[override]
        """Step this replica's share, then give every replica the others'
        updated parameters (collective over dp)."""
        self._handed_on()
        self.state.clear()
        self.consolidated = False
        loss = self.optim.step(closure) if closure is not None else self.optim.step()
        self._broadcast()
        return loss

    def _broadcast(self) -> None:
        """Each parameter from the replica that stepped it, in place (no
        copy of the model: a gather of the shares into one buffer held the
        weights 1.5 times over at dp=2, more than the state saved), all in
        flight at once, as the job's gradient all-reduces are."""
        # (stage 3: the parameters the job keeps on their owners alone are not sent: the
        # others get them as the next step gathers them; those a newer stage-1 optimizer
        # took back, whole on every replica again, are)
        kept = self.job.pipeline.owned_params.owner if self.stage == 3 else {}
        works = [collectives.broadcast(self.group, p.detach(), root=r, async_op=True,
                                       timeout=self.timeout)
                 for p, r in zip(self.params, self.owner) if kept.get(id(p)) != r]
        for w in works:
            w.wait()

    def state_bytes(self) -> int:
        """The bytes of this replica's optimizer state (its share's)."""
        return sum(v.numel() * v.element_size() for own in self.optim.state.values()
                   for v in own.values() if is_tensor(v))

    # ---- the whole state, as one optimizer's (job.optimizer_state_dict, load)

    def _index(self) -> dict[int, int]:
        """Each parameter's index (by id) in the whole groups' order."""
        return {id(p): i for i, p in enumerate(self.params)}

    def consolidate_state_dict(self, to: int = 0, timeout: float | None = None) -> None:
        """Gather every replica's share of the state on dp rank ``to``,
        whose ``state`` then holds every parameter's (as one optimizer's
        would; ``state_dict()`` there gives it by index, torch's format).
        Collective over dp, as torch's ZeroRedundancyOptimizer's; each
        message waits ``timeout`` (default the job's). A rank's own error
        (a KeyboardInterrupt, a MemoryError as it copies its share) is told
        to the others first (an all-gather): every rank raises at once, it
        its own, the others engine.GatherFailed naming it, nothing sent (rank
        ``to`` waited for its share until the timeout). Where rank ``to``
        fails as it reads the shares, it reads the rest before raising: left
        unread, its next call took them for its own, silently stale."""
        g = self.group
        timeout = self.timeout if timeout is None else timeout
        own: list[Any] = []
        failed: BaseException | None = None
        try:
            index = self._index()
            if g.rank != to:
                own = [[index[id(p)], k, None if is_tensor(v) else v, is_tensor(v)]
                       for p, st in self.optim.state.items() for k, v in st.items()]
                sent = [self.optim.state[self.params[i]][k].detach().contiguous() if t else None
                        for i, k, _, t in own]
        except BaseException as e:
            failed = e
        said = None if failed is None else \
            f"rank {g.ranks[g.rank]}: {type(failed).__name__}: {failed}"[:400]
        told = [w for w in collectives.all_gather_object(g, said, timeout=timeout)
                if w is not None]
        if failed is not None:
            raise failed
        if told:
            from .distribute import GatherFailed
            raise GatherFailed(f"{self.where}: consolidate_state_dict failed on "
                               f"{'; '.join(told)}; nothing was gathered")
        if g.rank != to:
            g.send(own, to, tag=_TAG, timeout=timeout)
            for j, v in enumerate(sent):
                if v is not None:
                    g.send(v, to, tag=_TAG + 1 + j, timeout=timeout)
            self.state.clear()
            self.consolidated = False
            return
        whole: dict[Any, dict[str, Any]] = {p: dict(st) for p, st in self.optim.state.items()}
        srcs = [src for src in range(g.size) if src != to]
        for n, src in enumerate(srcs):
            own, read = [], -1
            try:
                own = g.recv(src, tag=_TAG, timeout=timeout)
                for j, (i, k, v, t) in enumerate(own):
                    if t:
                        v = g.recv(src, tag=_TAG + 1 + j, timeout=timeout)
                        read = j
                        v = v if is_tensor(v) else torch.from_numpy(v)
                    whole.setdefault(self.params[i], {})[k] = v
            except BaseException:
                self._drain(srcs[n:], own, read, timeout)
                raise
        self.state.clear()
        self.state.update(whole)
        self.consolidated = True

    def _drain(self, srcs: list[int], own: list[Any], j: int, timeout: float | None) -> None:
        """Read what ``srcs`` still send of their shares (the first's list
        ``own`` read, and its tensors up to its ``j``-th entry's; none read
        where ``own`` is empty), dropped: ``consolidate_state_dict`` failed as it read them."""
        g = self.group
        try:
            for n, src in enumerate(srcs):
                if n or not own:
                    own, j = g.recv(src, tag=_TAG, timeout=timeout), -1
                for m in range(j + 1, len(own)):
                    if own[m][3]:
                        g.recv(src, tag=_TAG + 1 + m, timeout=timeout)
        except BaseException:       # (its own error is raised)
            pass

    def state_dict(self) -> dict[str, Any]:
        """The whole state by index (torch's format), after
        ``consolidate_state_dict`` on this rank; ``job.optimizer_state_dict``
        gives it by name instead (and consolidates itself)."""
        if self.group.size == 1 and not self.consolidated:    # (its share is the whole)
            self.consolidate_state_dict(0)
        if not self.consolidated:
            raise RuntimeError(f"{self.where}: state_dict() holds this replica's share only: "
                               f"call consolidate_state_dict(to) on every dp rank first, then "
                               f"state_dict() on rank to (or job.optimizer_state_dict(opt))")
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a whole state by index (torch's format, the whole groups'
        order: what ``job.load_optimizer_state_dict`` cuts for each rank):
        this replica keeps its share's, each group's hyperparameters on
        every replica. No message."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{self.where}: load_state_dict: {len(groups)} param groups "
                             f"given, the optimizer has {len(self.param_groups)}")
        for grp, given in zip(self.param_groups, groups):
            grp.update({k: v for k, v in given.items() if k != "params"})
        index = self._index()
        local: dict[str, Any] = {"state": {}, "param_groups": []}
        j = 0
        for grp, own in zip(self.param_groups, self.optim.param_groups):
            local["param_groups"].append({**self._hyper(grp),
                                          "params": list(range(j, j + len(own["params"])))})
            for p in own["params"]:
                st = state_dict["state"].get(index[id(p)])
                if st is not None:
                    local["state"][j] = st
                j += 1
        self.optim.load_state_dict(local)
        self.state.clear()
        self.consolidated = False
