"""``Job``'s whole model state (engine.job): ``job.state_dict()`` gathers
every stage, tp shards whole, on world rank 0, after every rank's word that
it called it and its own part's failure told to all (engine.agree);
``job.load_state_dict()`` loads a whole state into any layout, each rank
its own entries and shards, every error raised on every rank first;
``load_state`` loads such a state into a single-process copy of the model.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, NamedTuple

import numpy as np

import collectives
from mesh import AbortKind, Grid, MeshError

from .executor import Pipeline
from .ir import Schedule
from .step import _in_action
from .stagebuild import model_key
from .tensor_parallel import gather_state_dict, load_full_state_dict
from .tp_layers import full_params, load_full_params
from .agree import (_STATE_TAG, GatherFailed, _all_called, _Called, _each_part, _raised, _sent,
                    _tp_agreed)
from .given import _coord, _is_torch, _model_layers, _size


def load_state(model: Any, state: dict[str, Any]) -> None:
    """Load ``Job.state_dict()`` into a single-process copy of the model:
    torch's ``load_state_dict``, or the numpy layers' arrays in place."""
    if _is_torch(model):
        model.load_state_dict(state)
        return
    named, _ = _model_layers(model)
    for name, layer in named:   # all checked first: numpy would broadcast a (1,) bias
        for j, p in enumerate(layer.params()):
            if f"{name}.{j}" not in state:
                raise KeyError(f"load_state: {name}.{j} of the model not in the state given")
            if tuple(np.shape(state[f"{name}.{j}"])) != p.shape:
                raise ValueError(f"load_state: {name}.{j} is "
                                 f"{tuple(np.shape(state[f'{name}.{j}']))} in the state "
                                 f"given, but {p.shape} in the model")
    for name, layer in named:
        for j, p in enumerate(layer.params()):
            p[...] = state[f"{name}.{j}"]

class IncompatibleKeys(NamedTuple):
    """What ``Job.load_state_dict`` left out, as torch's ``load_state_dict``
    returns it: the model's keys not given, the keys given it lacks."""
    missing_keys: list[str]
    unexpected_keys: list[str]


class _ModelState:
    """Job's whole model state, gathered and loaded (engine.job)."""

    # (Job's, set in its __init__)
    _aliases: dict[str, str]
    _expected: dict[str, tuple[int, ...]]
    _in_tp_gather: bool
    _keys: list[str] | None
    _part_failed: bool
    _rest: dict[str, Any]
    _timeout: float | None
    counts: tuple[int, ...]
    first: list[int]
    grid: Grid
    is_torch: bool
    names: list[str]
    pipeline: Pipeline
    schedule: Schedule
    sharded: bool
    stages: list[Any]

    def _local_state(self, timeout: float | None = None) -> OrderedDict[str, Any]:
        """This rank's stages, unsharded (collective over the tp group, each
        gather waiting ``timeout``), keyed by the model's names: a stage's
        layer j is the model's layer ``first[s] + j``."""
        out: OrderedDict[str, Any] = OrderedDict()
        for s, st in zip(self.schedule.stages_of(self.pipeline.rank), self.stages):
            mine = self.names[self.first[s]:self.first[s] + self.counts[s]]
            if self.is_torch:
                state = (gather_state_dict(st.module, timeout=timeout) if self.sharded
                         else st.module.state_dict())
                assert state is not None        # root=None: on every tp rank
                for k, v in state.items():
                    out[model_key(mine, k)] = v.detach().contiguous()
            else:
                for name, layer in zip(mine, st.layers):
                    for j, p in enumerate(full_params(layer, timeout=timeout)):
                        out[f"{name}.{j}"] = p
        return out

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> IncompatibleKeys:
        """Load the whole model's state (keyed as ``state_dict()`` gives it,
        the model's own keys, unsharded) into this rank's stages: each takes
        its own entries, and with tp its own shards of them (no message).
        As torch's ``load_state_dict``: keys the model lacks, and keys of the
        model not given, raise ``KeyError`` (``strict=False``: ignored, a
        key not given leaves its tensor as it is; the return value names
        both, ``missing_keys`` and ``unexpected_keys``), and an entry not of
        its tensor's whole shape raises ``ValueError`` naming both shapes.
        Every rank knows every key's whole shape, so each error is raised
        on every rank, before any rank loads anything. A tensor the model
        holds under several names (tied weights) takes, on every stage
        holding a copy, the value of its last name given in the model's
        order, the one torch's load leaves in one process; one of its names
        is enough. Values are cast to the tensor's dtype, as torch's are."""
        rank = self.grid.comm.rank
        unexpected = [k for k in state if k not in self._expected]
        if strict and self._expected and unexpected:
            raise KeyError(f"rank {rank}: load_state_dict: "
                           f"{', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}"
                           f" not in the model (a checkpoint of another model?); "
                           f"strict=False ignores them")
        # every rank knows every key and its whole shape: a missing or misshapen one raises
        # on all before any loads (until the forty-second session a misshapen one raised
        # on its stage's ranks only, torch's half-loaded stage, after the other stages'
        # ranks had loaded theirs; those then waited in their next step)
        for k, v in state.items():
            want = self._expected.get(k)
            got = np.shape(v) if hasattr(v, "shape") or not self.is_torch else None
            if want is not None and got is not None and tuple(got) != want:
                raise ValueError(f"rank {rank}: load_state_dict: {k} is {tuple(got)} in the "
                                 f"state given, but {want} in the model")
        state = self._named_once(state)
        missing = [k for k in self._expected if k not in state]
        if strict and missing:
            raise KeyError(f"rank {rank}: load_state_dict: "
                           f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                           f"of the model not in the state given (strict=False leaves "
                           f"{'them' if len(missing) > 1 else 'it'} as it is)")
        with self.pipeline.owned_params.whole(fill=False):   # (ZeRO stage 3: the owners'
            self._loaded(state, strict)                      # values kept, no message)
        return IncompatibleKeys(missing, unexpected)

    def _loaded(self, state: dict[str, Any], strict: bool) -> None:
        """Each of this rank's stages' entries of ``state``, loaded."""
        for s, st in zip(self.schedule.stages_of(self.pipeline.rank), self.stages):
            mine = self.names[self.first[s]:self.first[s] + self.counts[s]]
            if not self.is_torch:      # None: not given, left as it is
                for name, layer in zip(mine, st.layers):
                    load_full_params(layer, [state.get(f"{name}.{j}")
                                             for j in range(len(layer.params()))])
                continue
            keys = {k: model_key(mine, k) for k in st.module.state_dict()}
            given = {k: state[m] for k, m in keys.items() if m in state}
            if self.sharded:
                load_full_state_dict(st.module, given, strict=strict)
            else:
                st.module.load_state_dict(given, strict=strict)
        if self._rest:      # (every rank: the last stage's loss may read them)
            import torch
            with torch.no_grad():
                for k, v in self._rest.items():
                    if k in state:
                        v.copy_(state[k])

    def _named_once(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with each tensor the model holds under several names
        (an embedding tied to its head) under every one of them, each the
        value of its last name given in the model's order (what torch's load
        leaves in one process; Hugging Face's checkpoints name a tied weight
        once)."""
        if not self._aliases:
            return state
        names: dict[str, list[str]] = {}        # first key -> every key of its tensor
        for k, first in self._aliases.items():
            names.setdefault(first, [first]).append(k)
        out = dict(state)
        for keys in names.values():
            given = [k for k in keys if k in state]
            for k in keys:
                if given:
                    out[k] = state[given[-1]]
        return out

    def state_dict(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The whole model's state on world rank 0 (None elsewhere), keyed
        as the model's own ``state_dict()`` (torch: a module or parameter
        the model holds under several names is under each, as torch lists
        it, though a traced model's pieces name it once) or
        ``"layer.index"`` (numpy: see ``load_state``). Every rank must
        call it (a collective, as torch's full state dict of FSDP): a rank
        waiting for the others raises after ``timeout`` (default the
        job's), saying so, having made no tp collective and sent no state
        (``_all_called``), so the job's next step runs."""
        timeout = self._timeout if timeout is None else timeout
        try:
            with self.pipeline.owned_params.whole():    # (ZeRO stage 3: every value)
                return self._gathered_state(timeout)
        except MeshError as e:    # (it said "recv ... tag 1152921504606846976 timed out")
            if getattr(e, "from_abort", False):     # (another rank's error, told: as it is)
                raise
            if self._part_failed:       # (every rank called it: its own gather's error)
                raise _in_action(e, "job.state_dict(), gathering its tp shards") from None
            raise _in_action(e, "job.state_dict() gathers every stage on rank 0, so every "
                             "rank must call it (sd = job.state_dict(), then if rank == 0: "
                             "torch.save(sd, path))" + self._tp_after() + "; it waited "
                             "here") from None

    def _local_part(self, make: Callable[[], Any], what: str, timeout: float | None,
                    before: BaseException | None = None) -> tuple[Any, BaseException | None]:
        """``make()``: this rank's part of a state gather (its tp gathers),
        and the error it raised (None: none). Where it raises this rank's own
        error (not a collective's, which its peers learn of from the
        collective), the tp peers' next gather, which this rank will not
        make, fails on them at once naming it (they waited in it until their
        timeout, then were a collective apart: the job's steps after failed
        on every rank). ``before``: what failed this rank's call before its
        part (its ZeRO optimizer's consolidation, over dp): no part made,
        the tp peers' gather failed so too. Then the tp ranks tell each other
        whether their part failed (``_tp_agreed``): a rank whose part ran is
        given GatherFailed where a peer's failed, and all take the same
        collective number. Its error is returned, never raised: the pp ranks
        are told it first."""
        tp = self.grid.group("tp") if self.sharded and _size(self.grid, "tp") > 1 else None
        out, failed = None, before
        try:
            if before is None:
                out = make()
        except BaseException as e:
            failed = e
        if tp is not None and failed is not None and (
                failed is before or not isinstance(failed, MeshError)):
            collectives.abandon(tp, f"{what} failed on tp rank {tp.rank}: "
                                f"{type(failed).__name__}: {failed}"[:400],
                                AbortKind.of(failed))
        if tp is not None:
            try:
                failed = _tp_agreed(tp, timeout, failed, what) or failed
            except MeshError as e:      # (a peer lost: the pp ranks are told it, or this)
                failed = failed or e
        return out, failed

    def _tp_after(self) -> str:
        """What a gather's failure leaves of the job, with tp (its error's)."""
        if not self.sharded or _size(self.grid, "tp") < 1 + 1:
            return ""
        if self._in_tp_gather:      # (the words came, one a lone call's left unread)
            return ("; its tp peers' next tp collective fails at once, naming this (a step "
                    "then fails on every rank, rolled back, and the steps after it run)")
        return ("; it made no tp collective, so the job's next step runs (its tp peers "
                "number theirs as this rank does)")

    def _agreed_part(self, make: Callable[[], Any], what: str, timeout: float | None,
                     before: BaseException | None = None) -> tuple[Any, _Called] | None:
        """What both gathers begin with: every rank's word taken (tp, then
        pp), this rank's part made (``make``, with its tp peers' gathers),
        and this rank's own failure raised once the others are told (and
        ``before``, what failed its call before its part: its ZeRO
        consolidation's error; left to its own timeout, the first replica's
        pp rank 0 and tp peers waited for this rank here). None where this
        rank's part goes no further (a dp replica but the first, a tp rank
        but the first); else ``(made, the pp group's call)``, whose ``_sent``
        or ``_each_part`` send the parts to pp rank 0 or take them there."""
        self._in_tp_gather = self._part_failed = False
        if _coord(self.grid, "dp"):
            _raised(before)
            return None
        if self.sharded:
            try:
                _all_called(self.grid.group("tp"), timeout, what=what)
            except GatherFailed as e:   # (a tp peer's call ended: its pp peers are told too)
                if not _coord(self.grid, "tp"):
                    _all_called(self.grid.group("pp"), timeout, e, what)
                raise
        self._in_tp_gather = self.sharded
        made, failed = self._local_part(make, what, timeout, before)
        self._in_tp_gather, self._part_failed = False, failed is not None
        if _coord(self.grid, "tp"):
            _raised(failed)
            return None
        pp = self.grid.group("pp")
        call = _all_called(pp, timeout, failed, what, keep=True)
        _raised(failed)
        return made, call or _Called(pp, timeout)

    def _gathered_state(self, timeout: float | None) -> dict[str, Any] | None:
        agreed = self._agreed_part(lambda: self._local_state(timeout), "job.state_dict()",
                                   timeout)
        if agreed is None:
            return None
        local, call = agreed
        if call.g.rank:
            _sent(call, list(local), list(local.values()), _STATE_TAG, "job.state_dict()")
            return None
        state = dict(local)
        _each_part(call, _STATE_TAG, len, "job.state_dict()",
                   lambda _, keys, values: state.update(zip(keys, values)))
        for k, v in self._rest.items():     # what no stage holds: this rank's own copy
            state.setdefault(k, v.detach().clone())
        for k, first in self._aliases.items():    # a shared module's other names, as torch's
            if k not in state and first in state:
                state[k] = state[first]
        if self._keys is not None:            # a traced model: its own keys, in its order
            at = {k: i for i, k in enumerate(self._keys)}
            return dict(sorted(state.items(), key=lambda kv: at.get(kv[0], len(at))))
        order = {n: i for i, n in enumerate(self.names)}
        return dict(sorted(state.items(), key=lambda kv: order[kv[0].split(".")[0]]))
