"""engine.deepspeed's checkpoints: one whole file that loads at any dp size.

``save`` writes ``save_dir/tag/mp_rank_00_model_states.pt`` on rank 0:
every parameter (under ZeRO 3 gathered first), the whole optimizer state
by index (a ZeRO optimizer's shares consolidated on rank 0: torch's
format, as one optimizer's), the scheduler, the loss scale, the counters
and the client's own keys, then ``save_dir/latest``. ``load`` reads it on
every rank; a ZeRO optimizer keeps its own share of the state, so the
number of ranks and the stage may differ from the saving run's. A model
with MoE layers (ZeRO 0 to 2): every expert gathered to rank 0, the file
holding the model under the names of one process holding every expert,
its optimizer state by those names (engine.moe_checkpoint), so it loads
at another ep_size and number of ranks too. A rank
that fails to write or read makes every rank raise, naming it (one
all-gather), where the others would wait in the next collective.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

import collectives

from .moe import has_moe_layers
from .moe_checkpoint import layers, load_whole, whole_name, whole_state

__all__ = ["save", "load", "save_16bit", "FILE"]

FILE = "mp_rank_00_model_states.pt"
_OWN_KEYS = {"module", "optimizer", "lr_scheduler", "loss_scaler", "global_steps",
             "global_samples", "skipped_steps", "dp_world_size", "zero_stage", "ds_version",
             "moe_layout"}


def _told(eng: Any, error: BaseException | None, what: str) -> None:
    """Every rank raises where one failed (one all-gather)."""
    said = None if error is None else f"rank {eng.global_rank}: {type(error).__name__}: {error}"
    told = [t for t in collectives.all_gather_object(eng.world, said) if t]
    if error is not None:
        raise error
    if told:
        raise RuntimeError(f"rank {eng.global_rank}: {what} failed on {told[0]}")


def save(eng: Any, save_dir: str, tag: Any, client_state: Any, save_latest: bool) -> bool:
    """``eng.save_checkpoint``: collective, rank 0 writes."""
    tag = f"global_step{eng.global_steps}" if tag is None else str(tag)
    if has_moe_layers(eng.module):      # (every expert gathered to rank 0: moe_checkpoint)
        whole = whole_state(eng)
        return written(eng, save_dir, tag, save_latest, lambda: dict(
            _counters(eng, client_state), module=whole[0], optimizer=whole[1],
            moe_layout=whole[2]) if whole is not None else {})
    with eng._whole():
        module = {k: v.detach().clone() for k, v in eng.module.state_dict().items()}
    opt = eng.optimizer
    if opt is not None and hasattr(opt, "consolidate_state_dict"):
        opt.consolidate_state_dict(0)
    return written(eng, save_dir, tag, save_latest, lambda: dict(
        _counters(eng, client_state), module=module,
        optimizer=None if opt is None else opt.state_dict()))


def _counters(eng: Any, client_state: Any) -> dict[str, Any]:
    """The checkpoint's keys other than the module's and the optimizer's."""
    return dict(
        client_state or {},
        lr_scheduler=None if eng.lr_scheduler is None else eng.lr_scheduler.state_dict(),
        loss_scaler=None if eng.loss_scaler is None else eng.loss_scaler.state_dict(),
        global_steps=eng.global_steps, global_samples=eng.global_samples,
        skipped_steps=eng.skipped_steps, dp_world_size=eng.dp_world_size,
        zero_stage=eng.cfg.zero_stage, ds_version="meshrun")


def written(eng: Any, save_dir: str, tag: str, save_latest: bool,
            state: Callable[[], dict[str, Any]]) -> bool:
    """Rank 0 writes ``state()`` as ``save_dir/tag/FILE`` (and ``latest``
    naming the tag), every rank raising where it failed (the data-parallel
    engine's checkpoints and the pipeline engine's: ds_pipe)."""
    error: BaseException | None = None
    if eng.global_rank == 0:
        try:
            os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
            torch.save(state(), os.path.join(save_dir, tag, FILE))
            if save_latest:
                with open(os.path.join(save_dir, "latest"), "w") as f:
                    f.write(tag)
        except Exception as e:
            error = e
    _told(eng, error, f"save_checkpoint({save_dir!r}, {tag!r})")
    return True


def save_16bit(eng: Any, save_dir: str, filename: str, exclude_frozen: bool) -> bool:
    """``eng.save_16bit_model``: the module's whole state_dict in the
    training's half type (none: as it is), collective, rank 0 writes."""
    dtype = torch.float16 if eng.fp16_enabled() else \
        torch.bfloat16 if eng.bfloat16_enabled() else None
    frozen = {n for n, p in eng.module.named_parameters() if not p.requires_grad} \
        if exclude_frozen else set()
    if has_moe_layers(eng.module):      # (every expert, gathered to rank 0: moe_checkpoint)
        whole = whole_state(eng, optimizer=False)
        frozen = {whole_name(k, layers(eng.module)) for k in frozen}
        state = {} if whole is None else {
            k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
            for k, v in whole[0].items() if k not in frozen}
    else:
        with eng._whole():
            state = {k: v.detach().to(dtype) if dtype is not None and v.is_floating_point()
                     else v.detach().clone() for k, v in eng.module.state_dict().items()
                     if k not in frozen}
    error: BaseException | None = None
    if eng.global_rank == 0:
        try:
            os.makedirs(save_dir, exist_ok=True)
            torch.save(state, os.path.join(save_dir, filename))
        except Exception as e:
            error = e
    _told(eng, error, f"save_16bit_model({save_dir!r}, {filename!r})")
    return True


def read(eng: Any, load_dir: str, tag: Any) -> tuple[str | None, dict[str, Any]]:
    """The checkpoint ``load_dir/tag/FILE`` read on every rank (``tag`` None:
    the one ``load_dir/latest`` names; ``(None, {})`` where it is missing, as
    DeepSpeed's), every rank raising where one could not read it (the
    data-parallel engine's checkpoints and the pipeline engine's: ds_pipe)."""
    if tag is None:
        latest = os.path.join(load_dir, "latest")
        if not os.path.isfile(latest):
            return None, {}
        with open(latest) as f:
            tag = f.read().strip()
    path = os.path.join(load_dir, str(tag), FILE)
    error: BaseException | None = None
    ck: dict[str, Any] = {}
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        error = e
    _told(eng, error, f"load_checkpoint({path!r})")
    return path, ck


def load(eng: Any, load_dir: str, tag: Any, strict: bool, optimizer_states: bool,
         scheduler_states: bool, module_only: bool) -> tuple[str | None, Any]:
    """``eng.load_checkpoint``: ``(path, client_state)``, or ``(None, None)``
    where no tag is given and ``load_dir/latest`` is missing (DeepSpeed's)."""
    path, ck = read(eng, load_dir, tag)
    if path is None:
        return None, None
    moe = has_moe_layers(eng.module)
    if moe:     # (each rank's own experts and optimizer share: moe_checkpoint)
        load_whole(eng, ck, strict, optimizer_states, module_only)
    elif isinstance(ck.get("optimizer"), dict) and ck["optimizer"].get("by_name"):
        raise ValueError(f"rank {eng.global_rank}: load_checkpoint({path!r}): saved from a "
                         f"model with MoE layers ({ck.get('moe_layout')}); this one has none")
    else:
        with eng._whole(fill=False):        # (under ZeRO 3 each rank keeps its share's)
            eng.module.load_state_dict(ck["module"], strict=strict)
    if not module_only:
        if optimizer_states and eng.optimizer is not None and ck["optimizer"] and not moe:
            eng.optimizer.load_state_dict(ck["optimizer"])      # (its lr too)
        if scheduler_states and eng.lr_scheduler is not None and \
                ck["lr_scheduler"] is not None:
            eng.lr_scheduler.load_state_dict(ck["lr_scheduler"])
        eng._handed(back=True)
        if eng.loss_scaler is not None and ck["loss_scaler"] is not None:
            eng.loss_scaler.load_state_dict(ck["loss_scaler"])
        eng.global_steps = ck["global_steps"]
        eng.global_samples = ck["global_samples"]
        eng.skipped_steps = ck["skipped_steps"]
    return path, {k: v for k, v in ck.items() if k not in _OWN_KEYS}
