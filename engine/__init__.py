"""engine: pipeline schedules as data, a verifier and simulator, an executor.

The passes run one way, each module importing only the ones before it::

    ir -> lower -> replay -> verify -> simulate -> render -> executor -> distribute

(schedules sits beside lower, on ir alone; choose, which picks a schedule
by simulating it, after render, on its parts: costs, profiling,
candidates, retime; tensor parallelism, tp_plan -> tp_layers ->
tensor_parallel, on layers alone; tied (shared parameters kept equal),
tp_sums (sequence-parallel gradient sums once a step), traced (a
plain module's forward cut into layers by torch.fx), stagebuild (a
model's layers as stages) and partition (where to cut) come before the
executor, then its parts: pipeline_args (what a Pipeline is given), step
(a step's actions), rollback (a failed step); tests/test_engine_layering.py
keeps the order.) ``engine.ZeroRedundancyOptimizer`` (engine.zero: ZeRO
stage 1 over a job's dp axis) is a torch optimizer, so it is imported
only when first named, as are ``engine.DistributedAttention`` and
``engine.ulysses_attention`` (engine.ulysses, Ulysses sequence
parallelism) and ``engine.MoE`` and ``engine.MoEGradReducer`` (engine.moe:
a mixture of experts over expert-parallel ranks): ``import engine``
imports no torch.
"""
from typing import Any

from . import choose, layers, schedules
from .distribute import DistributeFailed, GatherFailed, Job, distribute, load_state
from .executor import Pipeline, StepFailed, split_microbatches, stages_for_rank
from .ir import Action, Schedule
from .lower import lower, strip_comm, with_grad_sync, with_optimizer_step
from .clip import clip_grad_norm_
from .partition import Partition, partition
from .render import render
from .schedules import (gpipe, interleaved_1f1b, one_f_one_b, zb_v, zero_bubble_h1,
                        zero_bubble_h2)
from .simulate import SimReport, simulate
from .tensor_parallel import describe_plan, gather_state_dict, parallelize
from .torch_stage import checkpoint_modules
from .tp_loss import vocab_parallel_cross_entropy
from .tp_plan import PlanError, Style
from .traced import sequential
from .verify import ScheduleError, verify

__all__ = [
    "schedules", "layers", "choose", "distribute", "Job", "DistributeFailed", "GatherFailed",
    "load_state",
    "Action", "Schedule", "ScheduleError", "SimReport", "Pipeline", "StepFailed",
    "gpipe", "one_f_one_b", "interleaved_1f1b", "zero_bubble_h1", "zero_bubble_h2", "zb_v",
    "lower", "strip_comm", "with_grad_sync", "with_optimizer_step",
    "render", "simulate", "verify", "split_microbatches", "stages_for_rank",
    "parallelize", "describe_plan", "gather_state_dict", "Style", "PlanError", "partition",
    "Partition",
    "sequential", "checkpoint_modules", "clip_grad_norm_", "vocab_parallel_cross_entropy",
]


def __getattr__(name: str) -> Any:
    if name == "ZeroRedundancyOptimizer":       # (a torch.optim.Optimizer: torch on first use)
        from .zero import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer
    if name in ("DistributedAttention", "ulysses_attention"):    # (Ulysses: torch too)
        from . import ulysses
        return getattr(ulysses, name)
    if name in ("MoE", "MoEGradReducer"):     # (engine.moe: torch modules, torch on first use)
        from . import moe
        return getattr(moe, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
