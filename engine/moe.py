"""A mixture of experts with expert parallelism, DeepSpeed's
``deepspeed.moe.layer.MoE`` over meshrun's collectives::

    layer = engine.MoE(hidden_size=64, expert=mlp, num_experts=8, ep_size=2, k=2,
                       world=comm)               # comm: this job's meshrun Comm
    out, l_aux, exp_counts = layer(x)            # x (..., hidden_size)
    loss = task_loss(out) + 0.01 * l_aux
    reducer = engine.MoEGradReducer(comm, model.parameters())
    loss.backward(); reducer.reduce()            # (or ready(i) per gradient, then wait())

The world's ranks are cut into expert-parallel groups of ``ep_size``
consecutive ranks ([0, 1], [2, 3] at 4 ranks and ep_size 2); each rank of
a group holds ``num_experts / ep_size`` experts (rank j of the group the
j-th run of them). A forward gates this rank's tokens (engine.moe_gate),
sends each expert's tokens to its rank (``dispatch="capacity"``, the
default: DeepSpeed's (experts, capacity, hidden), padding included, by
all_to_all; ``"tokens"``: the kept tokens alone, by all_to_all_v;
engine.moe_dispatch, autograd Functions whose backward is the transposed
exchange; the same bits),
runs the local experts on what came, sends the outputs back the same way
and sums each token's expert outputs weighted by its gates. The ranks at one
position of every group (``r % ep_size`` alike: the expert-data-parallel
group) hold copies of the same experts: their gradients are summed over
that group and divided by the world's size, the other parameters'
averaged over the world (DeepSpeed's reduction, which keeps an expert's
gradient the one process's of the whole batch at any ep_size):
``MoEGradReducer``, which ``engine.deepspeed.initialize`` uses for a
model with MoE layers. Expert parameters are marked as DeepSpeed marks
them: ``param.allreduce = False``, ``param.group_name = "ep_size_<n>"``.
"""
from __future__ import annotations

import copy
import weakref
from typing import Any, Callable, Iterable

import torch

import collectives
from mesh.errors import MeshError, MismatchError

from .moe_dispatch import DISPATCHES, by_capacity, by_tokens, meshrun_exchange, \
    meshrun_exchange_v
from .moe_gate import TopKGate
from .step import _in_action

__all__ = ["MoE", "expert_groups", "is_moe_param", "has_moe_layers", "MoEGradReducer",
           "PartsReducer", "expert_parts",
           "split_params_into_different_moe_groups_for_optimizer", "meshrun_exchange",
           "meshrun_exchange_v"]

_GROUPS: "weakref.WeakKeyDictionary[Any, dict[int, tuple[Any, Any]]]" = \
    weakref.WeakKeyDictionary()


def expert_groups(world: Any, ep_size: int) -> tuple[Any, Any]:
    """This rank's (expert-parallel group, expert-data-parallel group) of
    ``world`` at ``ep_size``, made once per world and size (``world.group``
    of every group, in one order on every rank: no message)."""
    made = _GROUPS.setdefault(world, {})
    if ep_size in made:
        return made[ep_size]
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1 \
            or world.size % ep_size:
        raise ValueError(f"rank {world.rank}: MoE: ep_size={ep_size!r} must be a whole number "
                         f">= 1 dividing the world's {world.size} ranks")
    n = world.size
    eps = [world.group(range(k, k + ep_size)) for k in range(0, n, ep_size)]
    edps = [world.group(range(j, n, ep_size)) for j in range(ep_size)]
    made[ep_size] = (next(g for g in eps if g is not None),
                     next(g for g in edps if g is not None))
    return made[ep_size]


def _world(world: Any) -> Any:
    if world is not None:
        return world
    from torch import distributed
    if not distributed.is_initialized():
        raise ValueError("MoE: no world= (a meshrun Comm) and torch.distributed is not "
                         "initialized (deepspeed.init_distributed(), or pass world=)")
    from collectives.torchdist import comm_of
    return comm_of()


class MoE(torch.nn.Module):
    """DeepSpeed's ``deepspeed.moe.layer.MoE``: ``layer(x, used_token=None)``
    -> ``(output, l_aux, exp_counts)``. ``world``: the meshrun Comm the
    experts are spread over (default: torch.distributed's group on
    "meshrun"), cut into groups of ``ep_size``; or ``ep_group``: the
    expert-parallel group itself (its copies elsewhere are then the user's
    to reduce). The groups are made at the first forward (or by
    ``MoEGradReducer``). ``dispatch``: ``"capacity"`` (the default) or ``"tokens"``
    (what ``use_tutel=True`` asks; engine.moe_dispatch).
    Refused: ``enable_expert_tensor_parallelism``, noisy gates."""

    def __init__(self, hidden_size: int, expert: Any, num_experts: int = 1, ep_size: int = 1,
                 k: int = 1, capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0,
                 min_capacity: int = 4, use_residual: bool = False,
                 noisy_gate_policy: str | None = None, drop_tokens: bool = True,
                 use_rts: bool = True, use_tutel: bool = False,
                 enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True, world: Any = None,
                 ep_group: Any = None, dispatch: str | None = None) -> None:
        super().__init__()
        if enable_expert_tensor_parallelism:
            raise ValueError("MoE: enable_expert_tensor_parallelism: not supported on meshrun "
                             "(leave it False)")
        if dispatch is None:        # (Tutel's: DeepSpeed's faster dispatch, the same values)
            dispatch = "tokens" if use_tutel else "capacity"
        if dispatch not in DISPATCHES:
            raise ValueError(f"MoE: dispatch={dispatch!r}: one of {', '.join(DISPATCHES)}")
        if ep_group is not None:
            ep_size = ep_group.size
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or \
                num_experts < 1:
            raise ValueError(f"MoE: num_experts={num_experts!r} must be a whole number >= 1")
        if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1 or \
                num_experts % ep_size:
            raise ValueError(f"MoE: num_experts={num_experts} is not divisible by "
                             f"ep_size={ep_size!r}: each expert-parallel rank holds "
                             f"num_experts / ep_size experts")
        self.hidden_size, self.num_experts, self.ep_size, self.k = \
            hidden_size, num_experts, ep_size, k
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.use_residual, self.drop_tokens = use_residual, drop_tokens
        self.gate = TopKGate(hidden_size, num_experts, k, capacity_factor,
                             eval_capacity_factor, min_capacity, noisy_gate_policy,
                             drop_tokens, use_rts, top2_2nd_expert_sampling)
        self.experts = torch.nn.ModuleList(copy.deepcopy(expert)
                                           for _ in range(self.num_local_experts))
        for p in self.experts.parameters():     # (DeepSpeed's marks)
            setattr(p, "allreduce", False)
            setattr(p, "group_name", self.expert_group_name)
        if use_residual:
            self.mlp = copy.deepcopy(expert)
            self.coefficient = torch.nn.Linear(hidden_size, 2)
        self.world, self.ep_group = world, ep_group
        # the all_to_all (group, tensor) -> tensor: meshrun's (engine.bench_moe swaps it)
        self.exchange: Callable[[Any, Any], Any] = meshrun_exchange
        # the uneven one (group, tensor, send counts, receive counts) -> tensor
        self.exchange_v: Callable[..., Any] = meshrun_exchange_v
        self.dispatch = dispatch
        self.l_aux: Any = None
        self.exp_counts: Any = None

    def _group(self) -> Any:
        if self.ep_group is None:
            self.world = _world(self.world)
            self._agree(self.world)
            self.ep_group = expert_groups(self.world, self.ep_size)[0]
        elif not self.__dict__.get("_agreed"):
            self._agree(self.ep_group)
        return self.ep_group

    def _agree(self, group: Any) -> None:
        """At the layer's first forward: its settings all-gathered over
        ``group`` (the world, or the ep_group given), a MismatchError on
        every rank naming the ranks and the setting where any differs (one
        small message: else a rank of another ep_size ran alone, or its
        all_to_all met a block of another shape)."""
        self._agreed = True
        mine: dict[str, Any] = {a: getattr(self, a) for a in (
            "hidden_size", "num_experts", "ep_size", "k", "use_residual", "drop_tokens")}
        mine.update({a: getattr(self.gate, a, None) for a in (
            "capacity_factor", "eval_capacity_factor", "min_capacity")})
        if group.size == 1:
            return
        me = f"MoE layer ({self.num_experts} experts, ep_size {self.ep_size}) forward"
        try:
            told = collectives.all_gather_object(group, mine)
        except MeshError as e:      # (a rank that never runs the layer: named so)
            raise _in_action(e, f"{me}: the all-gather of its settings over group "
                                f"{group.name}, at its first forward") from None
        for name, here in mine.items():
            there = {r: t.get(name) for r, t in enumerate(told) if t.get(name) != here}
            if there:
                r = min(there)
                raise MismatchError(
                    f"rank {group.ranks[group.rank]}: {me}: its {name} is {here!r} here but "
                    f"{there[r]!r} on rank {group.ranks[r]}"
                    + (f" (and {len(there) - 1} more ranks differ)" if len(there) > 1 else "")
                    + f" (group {group.name}, checked at the layer's first forward): every "
                    f"rank builds the layer alike (num_experts, ep_size, k, capacity and "
                    f"hidden size)")

    def forward(self, hidden_states: Any, used_token: Any = None) -> tuple[Any, Any, Any]:
        group = self._group()
        x = hidden_states
        me = f"rank {group.ranks[group.rank]}: MoE layer ({self.num_experts} experts, " \
             f"ep_size {self.ep_size})"
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"{me} forward: the input's last axis is {x.shape[-1]}, the "
                             f"layer's hidden_size {self.hidden_size}")
        flat = x.reshape(-1, self.hidden_size)

        def agree(cap: int) -> int:     # (drop_tokens=False: the group's largest)
            if group.size == 1:
                return cap
            return int(collectives.all_reduce(group, torch.tensor([cap]), op="max")[0])

        l_aux, combine, dispatch, counts = self.gate(flat, used_token, agree)
        self.l_aux, self.exp_counts = l_aux, counts
        if self.dispatch == "tokens":
            out = by_tokens(self.experts, group, flat, combine, dispatch, me, self.exchange,
                            self.exchange_v)
        else:
            out = by_capacity(self.experts, group, flat, combine, dispatch, me, self.exchange)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        if self.use_residual:
            coef = torch.nn.functional.softmax(self.coefficient(x), dim=-1)
            out = out * coef[..., 0:1] + self.mlp(x) * coef[..., 1:]
        return out, l_aux, counts


def is_moe_param(p: Any) -> bool:
    """DeepSpeed's: an expert's parameter (``allreduce`` False)."""
    return hasattr(p, "allreduce") and not p.allreduce


def has_moe_layers(model: Any) -> bool:
    return any(is_moe_param(p) for p in model.parameters())


def split_params_into_different_moe_groups_for_optimizer(
        param_groups: Any, max_group_size: int | None = None) -> list[dict[str, Any]]:
    """DeepSpeed's: each group (a dict, or a list of them) split into its
    non-expert parameters and one group per expert group name (``"moe":
    True``, ``"name"`` the group name), the others' keys kept."""
    groups = [param_groups] if isinstance(param_groups, dict) else list(param_groups)
    out: list[dict[str, Any]] = []
    for g in groups:
        params = list(g["params"])
        dense = dict(g, params=[p for p in params if not is_moe_param(p)])
        out.append(dense)
        for name in dict.fromkeys(p.group_name for p in params if is_moe_param(p)):
            out.append(dict(g, params=[p for p in params if is_moe_param(p) and
                                       p.group_name == name],
                            name=name, moe=True))
    return out


def expert_parts(world: Any, params: list[Any]) -> tuple[list[tuple[Any, list[Any], int]],
                                                          list[tuple[int, int]]]:
    """``params`` split by expert group name, in one order on every rank
    (the non-expert ones first, then by name): each part's (group its
    gradients are reduced over: ``world``, or the experts' expert-data-
    parallel group; its parameters; its ep_size, 1 for the others), and
    each parameter's (part, index in it), in ``params``' order."""
    held: dict[Any, list[Any]] = {None: []}
    for p in params:
        held.setdefault(p.group_name if is_moe_param(p) else None, []).append(p)
    parts = []
    for key in sorted(held, key=lambda k: (k is not None, str(k))):
        ep = 1 if key is None else int(str(key).rpartition("_")[2])
        parts.append((world if key is None else expert_groups(world, ep)[1], held[key], ep))
    where = {id(p): (k, j) for k, (_, ps, _) in enumerate(parts) for j, p in enumerate(ps)}
    return parts, [where[id(p)] for p in params]


class PartsReducer:
    """``ready(i)`` and ``wait()`` over ``expert_parts``' parts, each with
    its own reducer (``_run``: (reducer or None, parameters, ep_size)); an
    expert's gradient divided by its ep_size once reduced (averaged over
    world / ep copies: the sum over the world divided by its size)."""
    _where: list[tuple[int, int]]
    _run: list[tuple[Any, list[Any], int]]

    def ready(self, i: int) -> None:
        part, j = self._where[i]
        reducer = self._run[part][0]
        if reducer is not None:
            reducer.ready(j)

    def wait(self) -> None:
        """Post what is left, wait for every reduce, then divide the experts'
        by ``ep_size``."""
        for reducer, held, ep in self._run:
            if reducer is not None:
                reducer.wait()
            if ep > 1:
                for p in held:
                    if p.grad is not None:
                        p.grad.div_(ep)


class MoEGradReducer(PartsReducer):
    """The gradients of a model with MoE layers reduced as DeepSpeed's: the
    non-expert parameters' averaged over ``world``, each expert group's
    summed over its expert-data-parallel group and divided by the world's
    size (collectives.GradReducer's, bucket by bucket). ``ready(i)`` as
    backward makes parameter ``i`` final (optional), ``wait()`` after it;
    ``reduce()``: both at once. ``clip(params, max_norm)``: the norm of the
    whole model's gradients (each expert counted once) clipped on every
    rank alike."""

    def __init__(self, world: Any, params: Iterable[Any]) -> None:
        self.world = world
        self.params = [p for p in params if p.requires_grad]
        parts, self._where = expert_parts(world, self.params)
        self._run = [(collectives.GradReducer(group, held) if held and group.size > 1
                      else None, held, ep) for group, held, ep in parts]

    def reduce(self) -> None:
        """Every gradient reduced now (after backward)."""
        for i in range(len(self.params)):
            self.ready(i)
        self.wait()

    def clip(self, params: Iterable[Any], max_norm: float) -> float:
        """The gradients of ``params`` scaled so that the whole model's norm
        is at most ``max_norm``; returns that norm (every rank alike: the
        experts' squares summed over their expert-parallel group)."""
        held = [p for p in params if p.grad is not None]
        dense = sum(float(p.grad.double().pow(2).sum()) for p in held if not is_moe_param(p))
        # (every expert group of the model's, in one order on every rank)
        per = dict.fromkeys(sorted({p.group_name for p in self.params if is_moe_param(p)}),
                            0.0)
        for p in held:
            if is_moe_param(p):
                per[p.group_name] += float(p.grad.double().pow(2).sum())
        total = dense
        for key in sorted(per):
            ep = int(key.rpartition("_")[2])
            group = expert_groups(self.world, ep)[0]
            total += float(collectives.all_reduce(group, torch.tensor([per[key]],
                                                                      dtype=torch.float64))[0])
        norm = total ** 0.5
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for p in held:
                p.grad.mul_(coef)
        return norm

    def summed(self, x: float) -> float:
        """``x`` summed over the world (fp16's overflow flag: the experts'
        gradients differ between ranks, the skip must not)."""
        return float(collectives.all_reduce(self.world, torch.tensor([float(x)],
                                                                     dtype=torch.float64))[0])


def deepspeed_checks(model: Any, rank: int, stage: int) -> bool:
    """engine.deepspeed.initialize's: whether ``model`` has MoE layers;
    refused with them: ZeRO stage 3 (its parameters gathered over the whole
    world, where the experts differ between ranks; stages 1 and 2 are
    engine.moe_zero's)."""
    if not has_moe_layers(model):
        return False
    if stage >= 3:
        raise ValueError(f"rank {rank}: deepspeed.initialize: zero_optimization.stage {stage} "
                         f"with MoE layers: not supported on meshrun; use stage 2 (each "
                         f"expert's gradients and optimizer state sharded over its "
                         f"expert-data-parallel group, the other parameters' over the world; "
                         f"the parameters themselves kept whole)")
    return True


# DeepSpeed's deepspeed.moe, .layer and .utils (engine.deepspeed.moe), the engine's
# checks beside them
deepspeed_namespace = type(copy)("deepspeed.moe")
_what: tuple[Any, ...]
for _name, _what in (("layer", (MoE,)), ("utils", (
        split_params_into_different_moe_groups_for_optimizer, is_moe_param, has_moe_layers))):
    _part = type(copy)(f"deepspeed.moe.{_name}")
    for _f in _what:
        setattr(_part, _f.__name__, _f)
    setattr(deepspeed_namespace, _name, _part)
for _g in (MoE, MoEGradReducer, deepspeed_checks):
    setattr(deepspeed_namespace, _g.__name__, _g)
