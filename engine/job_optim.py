"""``Job``'s whole optimizer state (engine.job), by the model's parameter
names in torch DCP's format: ``job.optimizer_state_dict(opt)`` gathers
every stage's, tp shards whole (a ZeRO optimizer's shares first), on world
rank 0; ``job.load_optimizer_state_dict(opt, state)`` cuts a whole state to
any layout's ranks, every rank checking it before any loads.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import collectives
from mesh import Grid, MeshError
from mesh.tensors import is_tensor

from .executor import Pipeline
from .ir import Schedule
from .step import _in_action
from .tensor_parallel import cut_like, gather_like, param_shards
from .agree import _OPTIM_TAG, _Called, _each_part, _sent


class _Optimizers:
    """Several torch optimizers as one (a list, as DCP's
    ``get_optimizer_state_dict`` takes it): their param groups one after
    another, in the list's order, and their states; ``load_state_dict``
    gives each its own groups and their parameters' states."""

    def __init__(self, opts: Sequence[Any]) -> None:
        self.opts = list(opts)
        self.param_groups = [g for o in self.opts for g in o.param_groups]
        self.state: dict[Any, Any] = {}
        for o in self.opts:
            self.state.update(o.state)
        self._of = {id(p): o for o in self.opts for g in o.param_groups for p in g["params"]}

    def holds(self, p: Any) -> bool:
        """Whether the optimizer of ``p`` keeps its state here (all but a
        ZeRO optimizer's other shares)."""
        holds = getattr(self._of.get(id(p)), "holds", None)
        return holds is None or bool(holds(p))

    def load_state_dict(self, local: dict[str, Any]) -> None:
        at = first = 0
        for o in self.opts:
            groups = local["param_groups"][at:at + len(o.param_groups)]
            count = sum(len(g["params"]) for g in groups)
            o.load_state_dict({
                "state": {i - first: v for i, v in local["state"].items()
                          if first <= i < first + count},
                "param_groups": [{**g, "params": [i - first for i in g["params"]]}
                                 for g in groups]})
            at, first = at + len(o.param_groups), first + count


def _one_optimizer(opt: Any) -> Any:
    """``opt``, or a list (tuple) of optimizers as one (_Optimizers)."""
    return _Optimizers(opt) if isinstance(opt, (list, tuple)) else opt


def _said(v: Any) -> str:
    """A param group's value as rank 0 compares it with the other pp ranks':
    its repr, a tuple as a list (``betas`` (0.9, 0.999) on the rank that
    broadcast a loaded state, [0.9, 0.999] on those that got it:
    collectives.broadcast_state gives tuples back as lists)."""
    def listed(x: Any) -> Any:
        if isinstance(x, (tuple, list)):
            return [listed(e) for e in x]
        return {k: listed(e) for k, e in x.items()} if isinstance(x, dict) else x
    return repr(listed(v))


class _OptimizerState:
    """Job's whole optimizer state, gathered and loaded (engine.job)."""

    # (Job's, set in its __init__ or by its other parts)
    _agreed_part: Callable[[Callable[[], Any], str, float | None, BaseException | None],
                           tuple[Any, _Called] | None]
    _aliases: dict[str, str]
    _expected: dict[str, tuple[int, ...]]
    _part_failed: bool
    _timeout: float | None
    _tp_after: Callable[[], str]
    grid: Grid
    is_torch: bool
    named_parameters: Callable[[], list[tuple[str, Any]]]
    pipeline: Pipeline
    schedule: Schedule
    sharded: bool
    stages: list[Any]

    # ---- the optimizer's state, whole, by the model's parameter names (torch DCP's
    # full optimizer state dict: get_optimizer_state_dict(..., full_state_dict=True))

    def _canonical(self) -> list[tuple[str, Any]]:
        """``named_parameters()``, each named as one process's model's
        ``named_parameters()`` names it: a tied tensor by its first name."""
        return [(self._aliases.get(n, n), p) for n, p in self.named_parameters()]

    def _torch_only(self, what: str) -> None:
        if not self.is_torch:
            raise TypeError(f"rank {self.grid.comm.rank}: {what}: an engine.layers model's "
                            f"SGD keeps no state; it takes a torch optimizer's")

    def optimizer_state_dict(self, opt: Any, timeout: float | None = None
                             ) -> dict[str, Any] | None:
        """The whole state of ``opt`` (a torch optimizer made on this rank's
        ``job.parameters()``, as on every rank, or a list of several, as
        DCP's ``get_optimizer_state_dict`` takes it: their groups one after
        another) on world rank 0, None
        elsewhere, as ``state_dict()`` returns the model, keyed by the
        parameters' names in the one-process model (its ``named_parameters()``:
        a tied tensor under its first name), in torch DCP's format
        (``get_optimizer_state_dict(model, opt, options=StateDictOptions(
        full_state_dict=True))``): ``{"state": {name: {"exp_avg": ...,
        "step": ...}}, "param_groups": [{"lr": ..., "params": [name, ...]}]}``,
        each group's parameters in the optimizer's order, as DCP lists them
        (over several pp ranks: stage by stage, each stage's in its rank's
        optimizer's order), and the states in the groups' order. A tensor
        of a tp shard's shape (Adam's ``exp_avg``) is gathered as
        its parameter is, whole; each stage gives its own parameters'; dp
        replicas hold the same, replica 0's is taken; a scalar (``step``) or
        any other value as it is. ``load_optimizer_state_dict`` loads it
        into any layout's job (another dp, pp or tp), or DCP's
        ``set_optimizer_state_dict`` into one process's model and optimizer.
        An ``engine.ZeroRedundancyOptimizer`` (ZeRO stage 1: each dp replica
        holds its share's state) gives the same dict: its shares are
        gathered on dp replica 0 first (engine.zero).
        Every rank must call it (a collective); rank 0 waiting for the others'
        stages raises after ``timeout`` (default the job's), saying so."""
        self._torch_only("optimizer_state_dict")
        timeout = self._timeout if timeout is None else timeout
        with self.pipeline.owned_params.whole(fill=False):  # (ZeRO stage 3: the shapes)
            return self._optimizer_state(opt, timeout)

    def _optimizer_state(self, opt: Any, timeout: float | None) -> dict[str, Any] | None:
        zeros = self._zeros(opt, "optimizer_state_dict")
        self._part_failed = False
        consolidating: BaseException | None = None
        try:
            try:    # (each replica's share on dp rank 0, whose state is then whole)
                for z in zeros:
                    z.consolidate_state_dict(0, timeout)
            except BaseException as e:      # (the first replica's pp and tp peers told first)
                consolidating = e
            return self._gathered_optimizer(_one_optimizer(opt), timeout, consolidating)
        except MeshError as e:
            if getattr(e, "from_abort", False):     # (another rank's error, told: as it is)
                raise
            if self._part_failed and e is not consolidating:    # (its own gather's error)
                raise _in_action(e, "job.optimizer_state_dict(opt), gathering its tp "
                                 "shards") from None
            raise _in_action(e, "job.optimizer_state_dict(opt) gathers every stage's optimizer "
                             "state on rank 0, so every rank must call it" + self._tp_after()
                             + "; it waited here") from None
        finally:
            for z in zeros:
                z.state.clear()
                z.consolidated = False

    def _zeros(self, opt: Any, what: str) -> list[Any]:
        """The engine.ZeroRedundancyOptimizers among ``opt`` (one or a list),
        each checked to shard over this job's dp group; torch's own
        ZeroRedundancyOptimizer, whose shares this cannot see, refused."""
        out = []
        dp = self.grid.group("dp").ranks if "dp" in self.grid.axes else None
        for o in (opt if isinstance(opt, (list, tuple)) else [opt]):
            if type(o).__name__ == "ZeroRedundancyOptimizer" and \
                    type(o).__module__.startswith("torch.distributed"):
                raise TypeError(f"rank {self.grid.comm.rank}: {what}: torch's "
                                f"ZeroRedundancyOptimizer keeps each rank's share of the state "
                                f"in its .optim, out of this job's sight (its .state is empty): "
                                f"use engine.ZeroRedundancyOptimizer(job.parameters(), "
                                f"torch.optim.AdamW, job, lr=...), which the job gathers")
            if hasattr(o, "consolidate_state_dict") and hasattr(o, "consolidated"):
                if dp is None or list(o.group.ranks) != list(dp):
                    raise ValueError(f"rank {self.grid.comm.rank}: {what}: the "
                                     f"ZeroRedundancyOptimizer shards over ranks "
                                     f"{list(o.group.ranks)}, not this job's dp group "
                                     f"{dp}: make it with process_group=job")
                out.append(o)
        return out

    def _named_groups(self, opt: Any, where: str) -> tuple[list[list[str]],
                                                           dict[int, tuple[Any, int]]]:
        """Each of ``opt``'s param groups as its parameters' names (one
        process's model's: ``_canonical``), and the tp cut of each sharded
        parameter, by id (``param_shards``)."""
        names = {id(p): n for n, p in self._canonical()}
        cuts: dict[int, tuple[Any, int]] = {}
        if self.sharded:
            for st in self.stages:
                cuts.update(param_shards(st.module))
        groups = []
        for g in opt.param_groups:
            stray = next((p for p in g["params"] if id(p) not in names), None)
            if stray is not None:
                raise ValueError(f"{where}: the optimizer holds a {tuple(stray.shape)} tensor "
                                 f"that is not in job.parameters() (make the optimizer of "
                                 f"job.parameters() or job.named_parameters())")
            groups.append([names[id(p)] for p in g["params"]])
        return groups, cuts

    def _local_optimizer(self, opt: Any) -> tuple[dict[str, dict[str, Any]],
                                                  list[tuple[dict[str, Any], list[str]]]]:
        """This rank's part of ``opt``'s state by parameter name, tp shards
        gathered whole (collective over the tp group), and its groups'
        hyperparameters, each with its parameters' names."""
        where = f"rank {self.grid.comm.rank}: optimizer_state_dict"
        named, cuts = self._named_groups(opt, where)
        state: dict[str, dict[str, Any]] = {}
        groups = [({k: v for k, v in g.items() if k != "params"}, held)
                  for g, held in zip(opt.param_groups, named)]
        names = {id(p): n for g, held in zip(opt.param_groups, named)
                 for p, n in zip(g["params"], held)}
        for g in opt.param_groups:     # (every tp rank in the same order: the gathers pair)
            for p in g["params"]:
                own = opt.state.get(p)
                if not own:
                    continue
                cut = cuts.get(id(p))
                mine: dict[str, Any] = {}
                for k, v in own.items():
                    if not is_tensor(v) or v.dim() == 0 or cut is None:
                        mine[k] = v.detach().clone() if is_tensor(v) else copy.deepcopy(v)
                    elif v.shape != p.shape:
                        raise ValueError(f"{where}: {names[id(p)]}'s {k} is {tuple(v.shape)}, "
                                         f"not its tp shard's shape {tuple(p.shape)}: this "
                                         f"optimizer's state cannot be gathered as the "
                                         f"parameter is")
                    else:
                        mine[k] = gather_like(cut, v)
                state[names[id(p)]] = mine
        return state, groups

    def _gathered_optimizer(self, opt: Any, timeout: float | None,
                            failed: BaseException | None = None) -> dict[str, Any] | None:
        agreed = self._agreed_part(lambda: self._local_optimizer(opt),
                                   "job.optimizer_state_dict(opt)", timeout, failed)
        if agreed is None:
            return None
        (state, groups), call = agreed
        pp = call.g
        tensors = [(n, k) for n, own in state.items() for k, v in own.items() if is_tensor(v)]
        stage = self._stage_of()
        staged = [(h, [(n, stage[n]) for n in ns]) for h, ns in groups]
        if pp.rank:      # (msgpack, no pickle: rank 0 compares the groups' values by repr)
            plain = {n: {k: None if is_tensor(v) else v for k, v in own.items()}
                     for n, own in state.items()}
            told = [({k: _said(v) for k, v in h.items()}, ns) for h, ns in staged]
            _sent(call, [plain, told, tensors], [state[n][k] for n, k in tensors], _OPTIM_TAG,
                  "job.optimizer_state_dict(opt)")
            return None
        whole = dict(state)
        hyper = [h for h, _ in groups]
        held: list[list[tuple[str, int]]] = [[] for _ in staged]
        seen: list[set[str]] = [set() for _ in staged]

        def add(j: int, ns: Any) -> None:
            for n, st in ns:    # (a tied tensor's copies, on two stages: one name, the first)
                if n not in seen[j]:
                    seen[j].add(n)
                    held[j].append((n, st))
        for j, (_, ns) in enumerate(staged):
            add(j, ns)

        def take(src: int, first: Any, values: list[Any]) -> None:
            plain, theirs, tensors = first
            for (n, k), v in zip(tensors, values):
                plain[n][k] = v
            for n, own in plain.items():     # (a tied tensor's copies hold the same)
                whole.setdefault(n, own)
            if len(theirs) != len(groups):
                raise ValueError(f"rank 0: optimizer_state_dict: the optimizer has "
                                 f"{len(groups)} param groups on rank 0 but {len(theirs)} on "
                                 f"{self._pp_peer(src)}: make it alike on every rank (a "
                                 f"group may be empty)")
            for j, ((h, ns), mine) in enumerate(zip(theirs, hyper)):
                said = {k: _said(v) for k, v in mine.items()}
                differ = [k for k in {*h, *said} if h.get(k) != said.get(k)]
                if differ:
                    k = sorted(differ)[0]
                    raise ValueError(f"rank 0: optimizer_state_dict: param group {j}'s {k} is "
                                     f"{said.get(k)} on rank 0 but {h.get(k)} on "
                                     f"{self._pp_peer(src)}: one process's optimizer has "
                                     f"one value per group")
                add(j, ns)
        _each_part(call, _OPTIM_TAG, lambda first: len(first[2]),
                   "job.optimizer_state_dict(opt)", take)
        # each group's in the optimizer's order, as DCP's (over pp ranks, the stages' in
        # the model's: a stage's parameters are its rank's, in its optimizer's order); the
        # state in the groups' order, as DCP's
        names = [[n for n, _ in (sorted(ns, key=lambda e: e[1]) if pp.size > 1 else ns)]
                 for ns in held]
        return {"state": {n: whole[n] for ns in names for n in ns if n in whole},
                "param_groups": [{**h, "params": ns} for h, ns in zip(hyper, names)]}

    def _stage_of(self) -> dict[str, int]:
        """The stage of each of this rank's parameters, by name
        (``_canonical``'s)."""
        out: dict[str, int] = {}
        for s, st in zip(self.schedule.stages_of(self.pipeline.rank), self.stages):
            ids = {id(p) for p in st.module.parameters()}
            out.update((n, s) for n, p in self._canonical() if id(p) in ids and n not in out)
        return out

    def _pp_peer(self, src: int) -> str:
        """pp rank ``src`` of this rank's pp group, as a world rank."""
        return f"rank {self.grid.group('pp').ranks[src]} (pp stage rank {src})"

    def load_optimizer_state_dict(self, opt: Any, state: dict[str, Any]) -> None:
        """Load a whole optimizer state (``optimizer_state_dict``'s, of any
        layout, or torch DCP's full one) into ``opt``, this rank's optimizer
        (made on ``job.parameters()``, its groups as the saved one's; or a
        list of optimizers, their groups one after another): each
        parameter's state, cut to this rank's shard where tp shards it, and
        each group's hyperparameters (a group is matched by its parameters'
        names). Every rank checks every name and every tensor's shape
        against the whole model before any rank loads anything, and raises
        alike (a name the model lacks: ``KeyError``; a tensor neither a
        scalar nor of its parameter's whole shape: ``ValueError`` naming
        both shapes). A parameter with no state given keeps none, as
        torch's. Every rank must call it: before any loads, the ranks tell
        each other whether each could cut its part (a rank whose optimizer
        groups its parameters otherwise than the state, or that was given
        None, the state on rank 0 only, makes every rank raise, naming it).
        An ``engine.ZeroRedundancyOptimizer`` keeps its share's state."""
        self._torch_only("load_optimizer_state_dict")
        where = f"rank {self.grid.comm.rank}: load_optimizer_state_dict"
        fault: Exception | None = None
        opt = _one_optimizer(opt)
        try:
            with self.pipeline.owned_params.whole(fill=False):  # (ZeRO stage 3: the shapes)
                local = self._checked_cut(opt, state, where)
        except (TypeError, KeyError, ValueError) as e:
            fault = e
        # (every rank hears of any rank's fault before one loads: nothing half-loaded; a
        # state given on rank 0 only, None on the others, left rank 0 waiting here)
        said = None if fault is None else [type(fault).__name__, str(fault)]
        told = collectives.all_gather_object(self.grid.comm, said, timeout=self._timeout)
        if fault is not None:
            raise fault
        bad = next(((r, t) for r, t in enumerate(told) if t is not None), None)
        if bad is not None:
            r, (kind, text) = bad
            raise {"KeyError": KeyError, "TypeError": TypeError}.get(kind, ValueError)(
                f"{where}: not loaded, rank {r} could not: {text}")
        opt.load_state_dict(local)

    def _checked_cut(self, opt: Any, state: Any, where: str) -> dict[str, Any]:
        """``state`` checked against the whole model, then cut as this rank's
        ``opt.state_dict()`` (``_cut_optimizer``)."""
        if not isinstance(state, dict) or not isinstance(state.get("state"), dict) or \
                not isinstance(state.get("param_groups"), list):
            rank0 = (": job.optimizer_state_dict(opt) returns it on rank 0 only, None on the "
                     "others; give every rank the whole state (torch.load it on each)"
                     if state is None else "")
            raise TypeError(f"{where}: takes {{'state': {{name: {{...}}}}, 'param_groups': "
                            f"[...]}}, what job.optimizer_state_dict(opt) returns (or DCP's "
                            f"get_optimizer_state_dict with full_state_dict=True), not a "
                            f"{type(state).__name__}"
                            f"{f' of {list(state)[:4]}' if isinstance(state, dict) else ''}"
                            f"{rank0}")
        named = [*state["state"], *(n for g in state["param_groups"] for n in g.get("params", ()))]
        if any(not isinstance(n, str) for n in named):
            raise TypeError(f"{where}: takes the state by parameter name, not an optimizer's "
                            f"own opt.state_dict() (by index: {named[:4]}); on one process "
                            f"DCP's get_optimizer_state_dict(model, opt, options="
                            f"StateDictOptions(full_state_dict=True)) gives it by name")
        unknown = [n for n in named if n not in self._expected]
        if unknown:
            more = " ..." if len(unknown) > 4 else ""
            raise KeyError(f"{where}: {', '.join(unknown[:4])}{more} not a parameter of the "
                           f"model (the state of another model?)")
        for n, own in state["state"].items():
            want = self._expected[n]
            for k, v in own.items():
                got = tuple(v.shape) if hasattr(v, "shape") else ()
                if got != () and got != want:
                    raise ValueError(f"{where}: {n}'s {k} is {got} in the state given, but {n} "
                                     f"is {want} in the model")
        # by the one-process model's names (a tied tensor given under another of its names)
        given: dict[str, dict[str, Any]] = {}
        for n, own in state["state"].items():
            given.setdefault(self._aliases.get(n, n), own)
        homes = [{self._aliases.get(n, n) for n in g.get("params", ())}
                 for g in state["param_groups"]]
        return self._cut_optimizer(opt, state, given, homes, where)

    def _cut_optimizer(self, opt: Any, state: dict[str, Any], given: dict[str, Any],
                       homes: list[set[str]], where: str) -> dict[str, Any]:
        """This rank's ``opt.state_dict()`` of the whole ``state``: each
        parameter's state cut to its shard, each group's hyperparameters."""
        named, cuts = self._named_groups(opt, where)
        holds = getattr(opt, "holds", None)     # ZeRO: its share's state only, not cut for all
        local: dict[str, Any] = {"state": {}, "param_groups": []}
        i = 0
        for j, (g, ns) in enumerate(zip(opt.param_groups, named)):
            at = sorted({h for n in ns for h, home in enumerate(homes) if n in home})
            lost = [n for n in ns if not any(n in home for home in homes)]
            if lost:
                raise KeyError(f"{where}: {', '.join(lost[:4])} in param group {j} of the "
                               f"optimizer but in no param group of the state given")
            if len(at) > 1:
                raise ValueError(f"{where}: param group {j}'s parameters are in the state's "
                                 f"groups {at}: group the optimizer as the one that saved it")
            src = state["param_groups"][at[0]] if at else (
                state["param_groups"][j] if j < len(state["param_groups"]) else g)
            local["param_groups"].append({**{k: v for k, v in src.items() if k != "params"},
                                          "params": list(range(i, i + len(ns)))})
            for p, n in zip(g["params"], ns):
                own = given.get(n)
                if own is not None and (holds is None or holds(p)):
                    cut = cuts.get(id(p))
                    local["state"][i] = {
                        k: (cut_like(cut, v) if cut is not None and is_tensor(v) and v.dim()
                            else v.detach().clone() if is_tensor(v) else copy.deepcopy(v))
                        for k, v in own.items()}
                i += 1
        return local
